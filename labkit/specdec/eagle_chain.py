"""EagleDrafter.chain, and the catch-up before it inside a verify, in one launch
(kernels/chain_triton.py) where the draft layer runs the target's Triton kernels: the same drafts
bit for bit as the launches one by one (the same tile code), without a launch and a wait per
operation.

Off by default: measured on the H200, a K=8 verify's catch-up and 5-deep chain captured ran
240-296 us fused with a grid-wide barrier between phases (results/gpu/eagle-chain-cost-NVIDIA-H200-7274f8c.txt)
and 233-310 us waiting per phase on the phase before's count, weights loaded first, against 149 us
as launches one by one (results/gpu/eagle-chain-cost-NVIDIA-H200-c5f2665.txt; whole eagle steps
~80 us slower, eagle-mix's on copying prompts faster). On with `LABKIT_FUSED_CHAIN=1`, or per
drafter `drafter.fused_chain = True`.
"""

from __future__ import annotations

from typing import Any

import torch

from labkit.config import env_flag
from labkit.models.kvcache import KVCache


def fused_chain_default() -> bool:
    """Drafters' default (module docstring): LABKIT_FUSED_CHAIN=1 asks for it."""
    return env_flag("LABKIT_FUSED_CHAIN")


class FusedChain:
    """A drafter's chains as one launch each. Its buffers (kernels/chain_triton.ChainScratch) are
    made for a draft cache and depth the first time they are asked for, outside any capture (the
    drafter's warm-up runs its chains eagerly first)."""

    def __init__(self, drafter: Any) -> None:
        self.drafter = drafter
        self._scratch: dict[tuple, Any] = {}

    def serves(self, ops: Any, width: int, hidden: torch.Tensor | None = None) -> bool:
        """Whether a chain of `width` 1 through `ops` runs here (and with `hidden` (B, T, D), a verify's
        catch-up before it): the Triton kernels, a draft head that is a product (no CPU blocks), the
        embedding a table, one batch row (the kernel takes up to 16, tested with one: batched EAGLE
        does not exist yet), a catch-up of at most 16 rows in the drafter's dtype."""
        d = self.drafter
        if not (d.fused_chain and width == 1 and d.draft_head is None and d.embed_weight is not None):
            return False
        if hidden is not None and (hidden.shape[0] * hidden.shape[1] > 16 or hidden.dtype != d.dtype):
            return False
        from labkit.kernels import layer_triton

        return ops is layer_triton and d.target.batch_size == 1

    def __call__(self, feat: torch.Tensor | None, pos: torch.Tensor | None, cache: KVCache, only_if: torch.Tensor | None,
                 catch_up: Any = None, depth: int | None = None) -> torch.Tensor:
        """feat (B, D) the anchor's predicted feature, pos (depth - 1, B) the chain's positions ->
        (B, depth) drafts, the draft cache written at pos (where only_if is true, or None). With
        catch_up (chain_triton.CatchUp) the draft cache first catches up over a verify's rows (even
        where only_if is false) and the chain, `depth` deep, starts from its accepted row."""
        from labkit.kernels.chain_triton import ChainLayer, chain_scratch, draft_chain

        d = self.drafter
        head = d.head
        k_cache, v_cache = cache.k_layers[0], cache.v_layers[0]  # (B, nkv, S, hd)
        cos, sin = head.rope_table(cache.max_len, k_cache.device)
        layer = ChainLayer(d.embed_weight, head.fc.weight, head.attn_norm.weight, head.wqkv.weight, cos, sin, head.wo.weight,
                           head.mlp_norm.weight, head.w_gate_up.weight, head.w_down.weight, d.weight, d.ids, head.dims.n_heads,
                           head.dims.norm_eps, d.window or 0)
        key = (k_cache.data_ptr(), k_cache.shape)
        if key not in self._scratch:  # (a new draft cache: the old one's buffers go with it)
            self._scratch = {key: chain_scratch(d.depth, layer, k_cache)}
        if feat is not None:
            feat = feat.to(d.dtype).contiguous()
        return draft_chain(feat, pos, layer, k_cache, v_cache, self._scratch[key], only_if, catch_up, depth)

    def after_verify(self, hidden: torch.Tensor, verdict: torch.Tensor, tokens: torch.Tensor, input_pos: torch.Tensor,
                     cache: KVCache | None, depth: int, only_if: torch.Tensor | None) -> torch.Tensor:  # -> (B, depth)
        """EagleDrafter.catch_up over a verify's rows, then the chain from its accepted row, one launch."""
        from labkit.kernels.chain_triton import CatchUp

        assert cache is not None, "the drafter's draft cache is made at its start"
        return self(None, None, cache, only_if, CatchUp(hidden, tokens, verdict, input_pos), depth)

    def stalls(self) -> int:
        """Waits that gave up, over the chains on this draft cache (never expected: see chain_triton)."""
        return sum(int(s.stalls.item()) for s in self._scratch.values())
