"""A static KV cache written by position, and the attention that reads it.

Buffers are allocated once, (n_layers, B, n_kv_heads, max_len, head_dim), so shapes stay
fixed for CUDA graphs. The valid length lives on the host: rolling back a rejected draft is
`cache.length = n`, O(1), with no copy. Stale entries past `length` are never read: eager
steps slice the cache to the positions they attend to, and fixed-shape steps mask them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

CAUSAL = "causal"  # a mask that is plain causal attention over keys 0..T-1 for queries 0..T-1


class RowSpans:
    """Attention for a batch whose rows sit at their own positions (input_pos (B, T)): row b's
    query t sees keys 0..input_pos[b, t] of its own cache row.

    exact=False: one masked attention over the longest row's keys (fast). exact=True: each row
    attends over exactly its own keys, as a batch-1 step would, so a row's result does not depend
    on which rows share the batch (labkit.batch's invariant mode)."""

    def __init__(self, input_pos: torch.Tensor, ends: list[int], exact: bool) -> None:  # input_pos: (B, T)
        self.input_pos, self.exact = input_pos, exact
        self.ends = ends  # keys row b may see: [0, ends[b]) (input_pos[b, -1] + 1, from the host: no device read)
        self._masks: dict[tuple[int, int | None], torch.Tensor] = {}  # built once per step, not once per layer

    def mask(self, keys: int, sliding_window: int | None) -> torch.Tensor:
        """(B, 1, T, keys) bool: which keys each row's queries see."""
        if (keys, sliding_window) not in self._masks:
            pos = self.input_pos
            key = torch.arange(keys, device=pos.device)  # (S,)
            allowed = key[None, None, :] <= pos[:, :, None]  # (B, T, S)
            if sliding_window is not None:
                allowed &= key[None, None, :] > pos[:, :, None] - sliding_window
            self._masks[(keys, sliding_window)] = allowed[:, None]
        return self._masks[(keys, sliding_window)]


@dataclass
class TreeAttention:
    """A token tree's pass (specdec/tree.py): node t sits at cache slot input_pos[t] and rotary
    position rope_pos[t], and sees the cache before `base` and its ancestors' slots (mask)."""

    rope_pos: torch.Tensor  # (T,) start + depth of each node
    base: torch.Tensor  # (1,) the first node's slot (start)
    mask: torch.Tensor  # (T, T) int8: [t, j] when node j is t or an ancestor of t


Mask = torch.Tensor | str | RowSpans | None  # (T, S) bool, CAUSAL, RowSpans, or None for "every key is visible"
COUNTER_BLOCKS = 256  # attention row blocks per (batch row, kv head) the counters cover
COUNTER_ROWS = COUNTER_BLOCKS * 16  # so one fused attention pass takes T * group <= this many rows (tiles of 16 rows)


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, H, S, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, H, S, D)
        self.k_layers = list(self.k.unbind(0))  # per-layer views, made once: (B, H, S, D) each
        self.v_layers = list(self.v.unbind(0))
        self.positions = torch.arange(max_len, device=device)  # (S,)
        # scratch for the split-K attention kernel (layer_triton.decode_attention): per layer, one
        # count per (batch row, kv head, row block), always left at zero between launches
        self.counters = torch.zeros(n_layers, batch_size * n_kv_heads * COUNTER_BLOCKS, dtype=torch.int32, device=device)
        self.max_len = max_len
        self.batch_size = batch_size
        self.length = 0  # host-side: positions [0, length) hold valid keys and values

    def rollback(self, length: int) -> None:
        """Forget everything from `length` on (rejected draft tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: cache holds {self.length}")
        self.length = length

    def update(
        self,
        layer: int,
        input_pos: torch.Tensor,  # (T,) positions being written
        k: torch.Tensor,  # (B, H, T, D)
        v: torch.Tensor,  # (B, H, T, D)
        attend_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v at their positions (input_pos (T,), or (B, T): each row at its own) and return
        the first `attend_len` positions."""
        k_cache, v_cache = self.k_layers[layer], self.v_layers[layer]
        if k.dtype != k_cache.dtype:  # autocast: activations may come out wider than the cache
            k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
        if input_pos.dim() == 2:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
            k_cache[rows, :, input_pos] = k.transpose(1, 2)  # indexed (B, T, H, D)
            v_cache[rows, :, input_pos] = v.transpose(1, 2)
        else:
            k_cache.index_copy_(2, input_pos, k)
            v_cache.index_copy_(2, input_pos, v)
        if attend_len == self.max_len:
            return k_cache, v_cache
        return k_cache[:, :, :attend_len], v_cache[:, :, :attend_len]  # (B, H, attend_len, D)

    def copy_rows(self, dst: int | torch.Tensor, src_cache: KVCache, src: int | torch.Tensor, length: int | None = None) -> None:
        """Rows `src` of src_cache (this one or another of the same layers and heads), positions [0, length) (None: all),
        into rows `dst` of this cache: a slot index each, or (n,) index tensors (gathered first, so a row may be both)."""
        self.k[:, dst, :, :length] = src_cache.k[:, src, :, :length]  # (L, n, H, length, D)
        self.v[:, dst, :, :length] = src_cache.v[:, src, :, :length]

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows [start, stop) of this cache as a cache of their own: views, no copy."""
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.k_layers, view.v_layers = list(view.k.unbind(0)), list(view.v.unbind(0))
        view.positions, view.counters, view.max_len = self.positions, self.counters, self.max_len
        view.batch_size, view.length = stop - start, 0
        return view

    def mask(
        self,
        input_pos: torch.Tensor,  # (T,)
        attend_len: int,
        sliding_window: int | None = None,
        *,
        decode_step: bool = False,
        start: int | None = None,
    ) -> Mask:
        """Boolean (T, attend_len) mask: query i sees key j when j <= pos_i (and within the window).

        A one-token step that attends to exactly the valid prefix needs no mask at all, and a
        prompt from position 0 (`start` = 0, attend_len = T) is plain causal attention (CAUSAL),
        which runs as flash attention without building a (T, T) mask.
        """
        window_bites = sliding_window is not None and attend_len > sliding_window
        if decode_step and not window_bites:
            return None
        if start == 0 and attend_len == input_pos.shape[0] and not window_bites:
            return CAUSAL
        keys = self.positions[:attend_len]  # (S,)
        allowed = keys[None, :] <= input_pos[:, None]  # (T, S)
        if window_bites and sliding_window is not None:
            allowed &= keys[None, :] > input_pos[:, None] - sliding_window
        return allowed


# cuDNN's attention (PyTorch's first choice on Hopper for masked inputs) is not run-to-run
# deterministic: the same request twice could flip a bf16 near-tie. The other kernels are.
DETERMINISTIC_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attend_rows(
    q: torch.Tensor,  # (B, nh, T, D)
    k: torch.Tensor,  # (B, nkv, S, D)
    v: torch.Tensor,  # (B, nkv, S, D)
    spans: RowSpans,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:  # (B, nh, T, D)
    """Attention for rows at their own positions (see RowSpans)."""
    if not spans.exact:
        return attend(q, k, v, spans.mask(k.shape[2], sliding_window), scale)  # the mask broadcast over heads
    pos = spans.input_pos  # (B, T)
    keys = torch.arange(k.shape[2], device=k.device)  # (S,)
    out = []
    for b, end in enumerate(spans.ends):  # each row over exactly its keys: a batch-1 step's shapes
        T = pos.shape[1]
        mask: Mask = None
        if T > 1 or (sliding_window is not None and end > sliding_window):
            mask = keys[None, :end] <= pos[b, :, None]  # (T, end)
            if sliding_window is not None:
                mask &= keys[None, :end] > pos[b, :, None] - sliding_window
            if T == end and pos[b, 0] == 0 and (sliding_window is None or end <= sliding_window):
                mask = CAUSAL
        out.append(attend(q[b : b + 1], k[b : b + 1, :, :end], v[b : b + 1, :, :end], mask, scale))
    return torch.cat(out)


def attend(
    q: torch.Tensor,  # (B, nh, T, D)
    k: torch.Tensor,  # (B, nkv, S, D)
    v: torch.Tensor,  # (B, nkv, S, D)
    mask: Mask,  # (T, S) or (B, 1, T, S) bool, CAUSAL, or None for "see everything"
    scale: float,
) -> torch.Tensor:  # (B, nh, T, D)
    assert not isinstance(mask, RowSpans), "rows at their own positions: attend_rows"
    gqa = q.shape[1] != k.shape[1]
    if isinstance(mask, torch.Tensor) and gqa and q.shape[2] > 1:
        # a masked prompt: PyTorch's memory-efficient kernel takes masks but not grouped heads
        # (with both it would fall back to the math kernel, which builds the (T, S) scores)
        group = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), False
    causal = isinstance(mask, str)
    with sdpa_kernel(DETERMINISTIC_SDPA):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask if isinstance(mask, torch.Tensor) else None, is_causal=causal, scale=scale, enable_gqa=gqa
        )
