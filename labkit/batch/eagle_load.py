"""A row's EAGLE catch-up (batch/eagle.py's `load`) as a pass of a fixed length, captured where steps are.

An eager catch-up is a draft-layer pass of n elements launched from the host: on the H200 ~20 kernel
launches and ~50 tensor ops, 0.67 ms for a 64-token prompt with the GPU idle meanwhile
(results/gpu/eagle-load-NVIDIA-H200-c55e15c.txt), paid by every request that joins a batch. Here
the n elements are padded at the end to a length class (16, 32, ... up to the draft layer's
window), and the pass runs on a scratch row that the slot's row is copied into and back out of,
so one captured graph per class serves every slot, start and length:

    in     the slot's row -> scratch (every position: those before the first element, which its attention reads)
    pass   elements at positions start .. start + C - 1 of the scratch row: the n given, then C - n padding
    out    scratch -> the slot's row; the last given element's predicted feature -> anchor_feat[slot]

The padding's elements land past the context's last position: the row's first chain writes its
positions before any query reads them, and no query reads past its own position (EagleHead.
forward_cached's invariant), so they are stale elements like a rejected chain's. A given element's
bits are the same in a pass of any length where the layer kernels keep each row's bits whatever rows
share a launch (tests/test_layer_kernels.py) and the attention each query's; the tests hold padded
loads' drafts to a lone request's, step for step.
"""

from __future__ import annotations

import torch

from labkit.batch.graphs import bucket
from labkit.batch.transfer import to_device
from labkit.engine import Engine
from labkit.graphs import capture
from labkit.models.kvcache import KVCache
from labkit.specdec.eagle_drafter import EagleDrafter

FIRST_CLASS = 16  # the shortest padded pass; longer ones are powers of two (rows buckets' rule), the last reaches the window


def length_class(n: int) -> int:
    """The padded pass that holds n elements: the next power of two, at least FIRST_CLASS."""
    return max(FIRST_CLASS, bucket(n))


class PaddedCatchUp:
    """Catch-ups of one draft cache's rows through padded passes (module docstring); `capture_all` captures them."""

    def __init__(self, engine: Engine, drafter: EagleDrafter, cache: KVCache, anchor_feat: torch.Tensor) -> None:
        """cache: the rows' draft cache (1, B, nkv, S, hd); anchor_feat (B, D): where each load's last predicted feature goes."""
        _, _, nkv, S, hd = cache.k.shape
        device = cache.k.device
        self.engine, self.drafter, self.cache, self.anchor_feat = engine, drafter, cache, anchor_feat
        self.classes = sorted({length_class(n) for n in range(1, drafter.window + 1)})  # 16, 32, ... (a catch-up is at most the window)
        C = self.classes[-1]
        self.scratch = KVCache(1, 1, nkv, S, hd, dtype=cache.k.dtype, device=device)  # (1, 1, nkv, S, hd)
        self.feats = torch.zeros(1, C, anchor_feat.shape[-1], dtype=drafter.dtype, device=device)  # (1, C, D) the given hidden states, then stale
        self.args = torch.zeros(3 + C, dtype=torch.long, device=device)  # start, slot, n - 1, then the elements' tokens (C,): one copy a load
        self.counting = torch.arange(C, device=device)  # (C,)
        self.zero = torch.zeros(1, dtype=torch.long, device=device)  # (1,) the scratch's row
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # class -> its pass, captured

    def capture_all(self, headroom: int, graphs: bool) -> None:
        """Capture each class's pass (graphs), or run each once (a CUDA batch without graphs: so that no load compiles
        a kernel: one that did stalled 1.1 s at one row on the H200, results/gpu/batch-NVIDIA-H200-20261203-222841.json).
        Warm-ups and capture write slot 0's row from `headroom` on (past every request's positions) and its anchor."""
        def aside() -> None:
            self.args[:3] = torch.tensor([headroom, 0, 0])

        for c in self.classes:
            if graphs:
                self.graphs[c] = capture(self.engine, lambda c=c: self._pass(c), aside)
            else:
                aside()
                with self.engine.autocast():
                    self._pass(c)

    def load(self, slot: int, tokens: list[int], feats: torch.Tensor, start: int) -> None:
        """Slot's draft cache row written at positions start.. from the target's hidden states there, feats (1, n, D)
        (n <= the window), and `tokens` (n,) the context's tokens after each; its last predicted feature into anchor_feat[slot]."""
        n = feats.shape[1]
        c = length_class(n)
        self.feats[:, :n] = feats
        self.args[: 3 + n] = to_device([start, slot, n - 1, *tokens], self.args.device)  # (queued: no wait for the stream)
        if c in self.graphs:
            self.graphs[c].replay()
        else:
            with self.engine.autocast():
                self._pass(c)

    def _pass(self, c: int) -> None:
        """The load of class c from `feats` and `args` (static: a captured graph reads them)."""
        start, slot, last = self.args[0:1], self.args[1:2], self.args[2:3]  # (1,) each
        self.scratch.copy_rows(self.zero, self.cache, slot)  # every position of the slot's row
        pos = start + self.counting[:c]  # (c,)
        out = self.drafter.elements(self.feats[:, :c], self.args[None, 3 : 3 + c], pos, cache=self.scratch)  # (1, c, D)
        self.anchor_feat.index_copy_(0, slot, out[0].index_select(0, last).to(self.anchor_feat.dtype))
        self.cache.copy_rows(slot, self.scratch, self.zero)
