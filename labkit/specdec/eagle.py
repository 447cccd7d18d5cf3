"""EAGLE-lite: a one-layer autoregressive draft head on the target's features (Li et al. 2024,
EAGLE-1, with EAGLE-3's training-time test and FR-Spec's reduced draft vocabulary).

Terms. The target's feature h_p is its final hidden state at position p (after the final norm,
what its LM head reads); it predicts token x_{p+1}. The draft's element p is the pair
(h_p, x_{p+1}): fc(concat(embed(x_{p+1}), h_p)) goes through one decoder layer (causal attention
over the draft's own cache of earlier elements, RoPE at position p, SwiGLU), giving a predicted
feature f_{p+1}; the LM head on it drafts x_{p+2}. The next element is (f_{p+1}, that draft),
and so on: a chain of drafts, one layer each.

    anchor c   the last element whose feature is the target's own (c = the last context position
               the target's cache holds); depth-1 drafts come from it
    depth d    the d-th draft after the anchor; its element sits at position c + d - 1 and sees
               the true elements 0..c and its own chain's elements c+1..c+d-1

Training-time test (EAGLE-3): training unrolls the chain for `train_depth` depths at every anchor at
once, feeding each depth the features the head itself predicted at the depth before, with
attention over the true elements up to the anchor plus the chain's own (a diagonal), exactly what
a chain sees at inference (`unrolled` checks against `forward_cached` in the tests). Tokens are the
target's (teacher forcing): the accuracy at depth d is the acceptance of the d-th draft given the
ones before it were accepted.

Reduced vocabulary: the head's logits are over `vocab_ids`, the N tokens the target writes most
in its own texts, through those rows of the target's frozen LM head. Verification stays over the
full vocabulary, so decoding stays lossless; a token outside them is never drafted.

The draft's weights (fc, one layer, its norms) are new; the embedding and LM head are the
target's, frozen, passed in and never stored.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from labkit.errors import LabkitError
from labkit.models.kvcache import KVCache, TreeAttention
from labkit.models.llama import apply_rope

ROPE_THETA = 10000.0


@dataclass
class EagleConfig:
    depth: int = 5  # draft tokens a chain proposes at most (K max)
    draft_vocab: int = 8192  # N most frequent target tokens the head drafts over (0: the full vocabulary)
    train_depth: int = 3  # depths unrolled in training (the training-time test)

    def validate(self) -> None:
        if self.depth < 1 or self.train_depth < 1 or self.draft_vocab < 0:
            raise LabkitError(f"EAGLE needs depth >= 1, train_depth >= 1 and draft_vocab >= 0, "
                              f"got {self.depth}, {self.train_depth}, {self.draft_vocab}")


@dataclass
class EagleDims:
    """The target's shapes the layer copies (its attention heads, head size, MLP width)."""

    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    norm_eps: float = 1e-5


def rope_frequencies(head_dim: int, device: torch.device) -> torch.Tensor:  # -> (D/2,) fp32
    return 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)


def rope_tables(head_dim: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (n, D) cos and sin tables for positions [0, n), sin's first half negated: the layout
    llama.apply_rope and the fused layer kernels read (one lookup per position, any position a
    device tensor). Kept fp32 whatever the head's dtype: in bf16 a position of a few hundred
    turns by radians."""
    angles = torch.outer(torch.arange(n, device=device, dtype=torch.float32), rope_frequencies(head_dim, device))  # (n, D/2)
    emb = torch.cat((angles, angles), dim=-1)  # (n, D)
    sin = emb.sin()
    sin[:, : head_dim // 2] = -sin[:, : head_dim // 2]
    return emb.cos(), sin


class EagleHead(nn.Module):
    """fc + one Llama-style decoder layer; features in, predicted features out."""

    vocab_ids: torch.Tensor

    def __init__(self, dims: EagleDims, cfg: EagleConfig, vocab_ids: torch.Tensor) -> None:
        super().__init__()
        cfg.validate()
        self.dims, self.cfg = dims, cfg
        d, nh, nkv, hd = dims.dim, dims.n_heads, dims.n_kv_heads, dims.head_dim
        self.fc = nn.Linear(2 * d, d, bias=False)
        self.attn_norm = nn.RMSNorm(d, eps=dims.norm_eps)
        self.wqkv = nn.Linear(d, (nh + 2 * nkv) * hd, bias=False)
        self.wo = nn.Linear(nh * hd, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d, eps=dims.norm_eps)
        self.w_gate_up = nn.Linear(d, 2 * dims.hidden_dim, bias=False)
        self.w_down = nn.Linear(dims.hidden_dim, d, bias=False)
        self.register_buffer("vocab_ids", vocab_ids.long().clone())  # (N,) target ids the head drafts over
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # fp32 (n, D) cos, sin (rope_tables)
        self._retired: list[tuple[torch.Tensor, torch.Tensor]] = []  # tables grown past, kept: captured graphs read them

    def cast(self, device: torch.device, dtype: torch.dtype) -> EagleHead:
        """On the target's device and dtype for drafting (the rotary tables stay fp32, and stay: a
        drafter's captured steps read them by address, and another drafter may cast the same head)."""
        self.to(device=device, dtype=dtype)
        return self

    def rope_table(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (>= n, D) cos and sin tables on `device`, made once and grown when a longer one is
        asked for (never inside a captured graph: the drafter asks for its whole cache up front).
        A table grown past is kept alive, not freed: a graph captured on it reads its address at
        every replay. (Dropped at each cast and freed at each growth, the tables of the drafters
        built first on a shared head were freed memory that others reused; `bench batch` builds a
        drafter per system and size on one head, and on the H200 its EAGLE rows drafted at tau 1.68
        where a lone request drafted at 2.33, output lossless all the same: docs/batching.md.)"""
        if self._rope is None or self._rope[0].shape[0] < n or self._rope[0].device != device:
            if self._rope is not None:
                self._retired.append(self._rope)
            self._rope = rope_tables(self.dims.head_dim, max(n, 256), device)
        return self._rope

    # -- pieces shared by the cached and the unrolled forms ------------------------------------
    def _qkv(self, feat: torch.Tensor, emb: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """feat, emb (B, T, D), pos (B, T) or (T,) -> x (B, T, D), q (B, nh, T, hd), k, v (B, nkv, T, hd).
        The rotary table must already cover pos (rope_table): no host read of positions."""
        B, T, _ = feat.shape
        nh, nkv, hd = self.dims.n_heads, self.dims.n_kv_heads, self.dims.head_dim
        x = self.fc(torch.cat((emb, feat), dim=-1))  # (B, T, D)
        qkv = self.wqkv(self.attn_norm(x)).view(B, T, nh + 2 * nkv, hd)
        assert self._rope is not None, "rope_table first"
        cos, sin = self._rope  # (>= every position, hd) fp32
        c, s = cos[pos].unsqueeze(-2).to(x.dtype), sin[pos].unsqueeze(-2).to(x.dtype)  # (B, T, 1, hd) or (T, 1, hd)
        qk = apply_rope(qkv[:, :, : nh + nkv], c, s)  # (B, T, nh+nkv, hd)
        return x, qk[:, :, :nh].transpose(1, 2), qk[:, :, nh:].transpose(1, 2), qkv[:, :, nh + nkv :].transpose(1, 2)

    def _finish(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Residual attention output y (B, nh, T, hd) and the MLP -> predicted features (B, T, D)."""
        B, T, _ = x.shape
        x = x + self.wo(y.transpose(1, 2).reshape(B, T, -1))
        gate, up = self.w_gate_up(self.mlp_norm(x)).chunk(2, dim=-1)  # (B, T, hidden) each
        return x + self.w_down(F.silu(gate) * up)

    # -- inference: the draft's own cache, written by position -------------------------------
    def forward_cached(
        self,
        feat: torch.Tensor,  # (B, T, D) features of the elements
        emb: torch.Tensor | None,  # (B, T, D) embeddings of their tokens; None: `tokens` through `embed` (fused ops)
        pos: torch.Tensor,  # (B, T) or (T,) their positions (a device tensor: one graph serves every position)
        cache: KVCache,  # one layer, (1, B, nkv, S, hd), written at pos
        ops: Any = None,  # fused layer operations (kernels/layer_triton or layer_reference), or None
        tree: TreeAttention | None = None,  # elements of a draft tree (pos: their cache slots; fused ops only)
        tokens: torch.Tensor | None = None,  # (B, T) int64 the elements' tokens, when emb is None
        embed: torch.Tensor | None = None,  # (V, D) the target's token embedding, when emb is None
        window: int | None = None,  # each element attends to the elements at most this many positions back (None: all)
    ) -> torch.Tensor:  # (B, T, D) predicted features
        """Elements at their positions; each attends to every cached element at or before its own
        position. The cache past a position may hold stale elements of a rejected chain: a
        query never sees them, since every element at or before it was written afterwards.
        With `ops` the layer runs as the target's fused layers do (five operations, attention
        over the positions each query sees, and the fc with its embedding gather as a sixth where
        the ops have `embed_fc`); without, as PyTorch ops over the whole cache with a mask (any
        device, capturable)."""
        self.rope_table(cache.max_len, feat.device)
        if emb is None:
            assert tokens is not None and embed is not None, "the tokens and the embedding, or their embeddings"
            if ops is not None and hasattr(ops, "embed_fc"):
                B, T, D = feat.shape
                x = ops.embed_fc(tokens.reshape(B * T), embed, feat.reshape(B * T, D), self.fc.weight)  # (M, D)
                return self._fused_layer(ops, x, B, T, pos, cache, tree, window)
            emb = F.embedding(tokens, embed).to(feat.dtype)
        if ops is not None:
            B, T, D = feat.shape
            return self._fused_layer(ops, self.fc(torch.cat((emb, feat), dim=-1)).reshape(B * T, D), B, T, pos, cache, tree, window)
        if tree is not None:
            raise LabkitError("draft trees run the draft layer through the fused layer operations (a CPU, or a GPU's Triton layers)")
        x, q, k, v = self._qkv(feat, emb, pos)
        B, _, T, _ = k.shape
        k_cache, v_cache = cache.k_layers[0], cache.v_layers[0]  # (B, nkv, S, hd)
        pos = pos.expand(B, T)
        index = pos[:, None, :, None].expand_as(k)  # (B, nkv, T, hd)
        k_cache.scatter_(2, index, k.to(k_cache.dtype))
        v_cache.scatter_(2, index, v.to(v_cache.dtype))
        mask = cache.positions <= pos[:, None, :, None]  # (B, 1, T, S)
        if window:
            mask &= cache.positions > pos[:, None, :, None] - window
        y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=True)  # (B, nh, T, hd)
        return self._finish(x, y)

    def _fused_layer(self, ops: Any, x: torch.Tensor, B: int, T: int, pos: torch.Tensor, cache: KVCache,
                     tree: TreeAttention | None = None, window: int | None = None) -> torch.Tensor:  # x (M, D), the fc's output -> (B, T, D)
        """The layer after the fc through the fused layer operations (llama.LlamaBlock.forward_fused's five)."""
        eps, D = self.dims.norm_eps, self.dims.dim
        cos, sin = self.rope_table(cache.max_len, x.device)  # (>= S, hd) fp32, made by forward_cached
        k_cache, v_cache = cache.k_layers[0], cache.v_layers[0]  # (B, nkv, S, hd)
        q = ops.norm_qkv_rope(x, self.attn_norm.weight, eps, self.wqkv.weight, None, cos, sin, pos, k_cache, v_cache,
                              self.dims.n_heads, *(() if tree is None else (tree.rope_pos,)))  # (M, nh, hd)
        tree_args = {} if tree is None else {"tree_base": tree.base, "tree_mask": tree.mask}
        y = ops.decode_attention(q, k_cache, v_cache, pos, 1.0 / math.sqrt(self.dims.head_dim), window, cache.counters[0],
                                 **tree_args)  # (M, nh*hd)
        x = ops.linear_residual(y, self.wo.weight, None, x)  # (M, D)
        h = ops.norm_gate_up(x, self.mlp_norm.weight, eps, self.w_gate_up.weight, None)  # (M, hidden)
        return ops.linear_residual(h, self.w_down.weight, None, x).view(B, T, D)

    # -- training: every anchor's chain at once ---------------------------------------------
    def unrolled(
        self,
        feats: torch.Tensor,  # (B, T, D) the target's features h_0..h_{T-1}
        tokens: torch.Tensor,  # (B, T) the tokens x_0..x_{T-1}
        embed: nn.Module,  # the target's token embedding
        depth: int,
    ) -> list[torch.Tensor]:  # depth x (B, T, D): at anchor c, the feature depth d predicts (f_{c+d})
        """The chain from every anchor c, depths 1..depth, in one pass per depth. Depth d's
        element at anchor c is (its own previous prediction, x_{c+d}) at position c + d - 1 and
        sees the true elements 0..c plus its chain's elements (a diagonal per earlier depth).
        Anchors whose tokens run past the end see padding (their labels are ignored)."""
        B, T, _ = feats.shape
        self.rope_table(T + depth, feats.device)
        scale = 1.0 / math.sqrt(self.dims.head_dim)
        group = self.dims.n_heads // self.dims.n_kv_heads
        anchors = torch.arange(T, device=feats.device)  # (T,)
        causal = anchors[None, :] <= anchors[:, None]  # (T, T) key <= anchor
        outs: list[torch.Tensor] = []
        keys: list[tuple[torch.Tensor, torch.Tensor]] = []  # (k, v) per depth, (B, nh, T, hd) by anchor
        feat = feats
        for d in range(1, depth + 1):
            shifted = torch.cat((tokens[:, d:], tokens.new_zeros(B, d)), dim=1)  # (B, T): x_{c+d}
            x, q, k, v = self._qkv(feat, embed(shifted), anchors + d - 1)
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, nh, T, hd)
            keys.append((k, v))
            k1, v1 = keys[0]
            scores = (q @ k1.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))  # (B, nh, T, T)
            diag = [(q * kj).sum(-1, keepdim=True) * scale for kj, _ in keys[1:]]  # (d-1) x (B, nh, T, 1)
            weights = torch.cat([scores, *diag], dim=-1).float().softmax(-1).to(q.dtype)  # (B, nh, T, T + d - 1)
            y = weights[..., :T] @ v1  # (B, nh, T, hd)
            for j, (_, vj) in enumerate(keys[1:]):
                y = y + weights[..., T + j : T + j + 1] * vj
            feat = self._finish(x, y)
            outs.append(feat)
        return outs


def draft_head_weight(head: EagleHead, lm_head_weight: torch.Tensor) -> torch.Tensor:  # (V, D) -> (N, D)
    """The target LM head's rows for the draft vocabulary (all of it when N is the vocabulary)."""
    if head.vocab_ids.numel() == lm_head_weight.shape[0]:
        return lm_head_weight
    return lm_head_weight.index_select(0, head.vocab_ids.to(lm_head_weight.device))


def random_eagle_head(dims: EagleDims, depth: int = 4, vocab: int = 96, seed: int = 0, ids: torch.Tensor | None = None) -> EagleHead:
    """An untrained head of random weights (normal, std 0.1; torch's global seed set to `seed`) over the first
    `vocab` token ids or `ids`: for tests and diagnostics on tiny models (models/tiny.py), not for drafting."""
    torch.manual_seed(seed)
    head = EagleHead(dims, EagleConfig(depth=depth, draft_vocab=0), torch.arange(vocab) if ids is None else ids)
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    return head.eval()


def top_tokens(texts: list[tuple[list[int], int]], n: int, vocab_size: int) -> torch.Tensor:  # -> (N,) ids
    """The n tokens the target writes most in the greedy part of its texts (all ids, by id, when
    n is 0 or not smaller than the vocabulary); ties by id. Tokens it never wrote are left out."""
    if n == 0 or n >= vocab_size:
        return torch.arange(vocab_size)
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for toks, first in texts:
        counts += torch.bincount(torch.tensor(toks[first:], dtype=torch.long), minlength=vocab_size)
    seen = int((counts > 0).sum())
    order = torch.argsort(-counts, stable=True)[: min(n, seen)]
    return order.sort().values


def vocab_index(vocab_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:  # (N,) -> (V,): id -> row, -1 if absent
    index = torch.full((vocab_size,), -1, dtype=torch.long, device=vocab_ids.device)
    index[vocab_ids] = torch.arange(vocab_ids.numel(), device=vocab_ids.device)
    return index


# -- files: eagle.json and eagle.safetensors in a folder (beside draft heads, if any) -----------
def save_eagle(head: EagleHead, path: str | Path, target_fingerprint: dict[str, Any], info: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(out / "eagle.safetensors"))
    meta = {"config": asdict(head.cfg), "dims": asdict(head.dims), "target": target_fingerprint, "info": info or {}}
    (out / "eagle.json").write_text(json.dumps(meta, indent=1))
    return out


def check_eagle_folder(path: str | Path) -> Path:
    folder = Path(path)
    if not (folder / "eagle.json").is_file() or not (folder / "eagle.safetensors").is_file():
        raise LabkitError(f"{folder} holds no EAGLE head (eagle.json and eagle.safetensors): "
                          "train one with `python -m labkit heads train --kind eagle --out FOLDER`")
    return folder


def _read_eagle_meta(folder: Path) -> tuple[EagleConfig, EagleDims, dict[str, Any]]:
    try:
        meta = json.loads((folder / "eagle.json").read_text())
        cfg, dims = EagleConfig(**meta["config"]), EagleDims(**meta["dims"])
        cfg.validate()
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, LabkitError) as err:
        raise LabkitError(f"{folder / 'eagle.json'} is not an EAGLE description written by `labkit heads train --kind eagle` "
                          f"({type(err).__name__}: {str(err)[:120]}); train it again") from None
    return cfg, dims, meta


def load_eagle_config(path: str | Path) -> EagleConfig:
    """The configuration of the EAGLE head in a folder (before any model loads)."""
    return _read_eagle_meta(check_eagle_folder(path))[0]


def load_eagle(path: str | Path, target_fingerprint: dict[str, Any]) -> EagleHead:
    """The head save_eagle wrote; refuses one trained for another target, and damaged files."""
    from safetensors.torch import load_file

    from labkit.specdec.heads import same_target

    folder = check_eagle_folder(path)
    cfg, dims, meta = _read_eagle_meta(folder)
    if not same_target(meta.get("target", {}), target_fingerprint):
        raise LabkitError(f"the EAGLE head in {folder} was trained for another target model "
                          f"(vocab {meta.get('target', {}).get('vocab_size')}, dim {meta.get('target', {}).get('dim')}; "
                          f"this one: vocab {target_fingerprint['vocab_size']}, dim {target_fingerprint['dim']})")
    try:
        state = load_file(str(folder / "eagle.safetensors"))
        head = EagleHead(dims, cfg, state["vocab_ids"])
        head.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 - safetensors and torch raise their own errors for a damaged file
        raise LabkitError(f"{folder / 'eagle.safetensors'} cannot be read as this EAGLE head ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:120]}); train it again") from None
    return head
