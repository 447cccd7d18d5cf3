"""EAGLE chains for batched rows, drafted inside each batched verify: the batched twin of the EAGLE
drafter's device steps (specdec/eagle_drafter.py), as the drafting hook of BatchLookup's chunks.

A chunk runs greedy steps of rows [0, r) on the device (batch/lookup.py); with this hook a step
verifies, for every row, the chain the step before drafted for it, and then drafts the next:

    catch-up  every verified position of every row into that row's draft cache
              (EagleDrafter.catch_up: row j's token is the draft after it, or the target's next
              token at the accepted position), from the verify's hidden states (r, K+1, D)
    chain     K drafts from each row's accepted position (EagleDrafter.chain, an anchor per row)

so row i drafts what a single-request EAGLE drafter drafts for its request, step for step
(tests/test_batch_eagle.py holds them to it). The verify keeps the target's own argmax, so every
row's output is its plain greedy output whatever the head drafts.

The draft cache has a row per slot, (1, B, nkv, S, hd). A request a release moved into another
slot takes its row along (`move`: the draft cache row and its next drafts copied). A row whose
device state is not its request's otherwise (a new request, host or plain steps taken since) is
loaded from its context: the target's hidden states over it from one batch-1 pass of the engine
(the scratch admissions use), the row's draft cache caught up over the positions the draft
layer's window reaches, and its first chain. For a new request that pass is its prompt's prefill
again (the same bits as a lone request's first proposal); keeping the hidden states of admissions
and plain steps would save it. (Moved rows loaded so drafted otherwise in bf16 on the H200 at
86c75b7, 34 steps into a request, tokens identical: likely a prefill's hidden states over generated
tokens are not the verifies' bits.)
"""

from __future__ import annotations

import torch

from labkit.batch.engine import BatchEngine
from labkit.batch.lookup import BatchLookup
from labkit.errors import LabkitError
from labkit.models.kvcache import KVCache
from labkit.specdec.eagle import EagleHead
from labkit.specdec.eagle_drafter import EagleDrafter


def device_eagles(batch: BatchEngine, head: EagleHead, ks: list[int]) -> list[BatchLookup]:
    """Device steps drafting EAGLE chains for each drafting K of `ks` (0 is plain), every rows
    bucket's step captured now where steps are captured."""
    eagles = [BatchLookup(batch, k, hook=BatchEagle(batch, head, k)) for k in ks if k]
    for steps in eagles:
        steps.capture_all()
    return eagles


class BatchEagle:
    """BatchLookup's drafting hook (batch/lookup.RowsHook): K-deep EAGLE chains for every row."""

    def __init__(self, batch: BatchEngine, head: EagleHead, k: int) -> None:
        engine = batch.engine
        self.drafter = EagleDrafter(engine, head, device_steps=False, batch_rows=batch.cache.batch_size)  # the draft layer (not its own cache)
        if not 1 <= k <= self.drafter.depth:
            raise LabkitError(f"this EAGLE head drafts 1 to {self.drafter.depth} tokens a step, not K {k}")
        dims, rows = head.dims, batch.cache.batch_size
        S = batch.cache.max_len + k + self.drafter.depth + 2  # a step's chain past a slot's last position (capture warm-ups too)
        self.cache = KVCache(1, rows, dims.n_kv_heads, S, dims.head_dim, dtype=self.drafter.dtype, device=engine.device)  # (1, B, nkv, S, hd)
        self.cols = torch.zeros(rows, k, dtype=torch.long, device=engine.device)  # (B, K) each slot's next drafts
        self.views: dict[int, KVCache] = {}  # r -> the draft cache's rows [0, r) (one view per bucket: a captured step reads it)
        self.batch, self.k = batch, k
        self.loaded = self.moved = 0  # rows loaded from their context (a batch-1 pass each), rows moved along with a release

    def _rows(self, start: int, stop: int) -> KVCache:
        if start:
            return self.cache.rows(start, stop)
        if stop not in self.views:
            self.views[stop] = self.cache.rows(0, stop)
        return self.views[stop]

    @torch.inference_mode()
    def load(self, slots: list[int], contexts: list[list[int]]) -> None:
        """Each slot's draft cache row caught up over its context (but its last token), and its first chain."""
        engine, drafter = self.batch.engine, self.drafter
        for slot, context in zip(slots, contexts, strict=True):
            L = len(context)  # the row's cache holds context[:-1]: elements 0..L-2 are true
            if L < 2:
                raise LabkitError("a row drafts after its prompt's first token")
            first, view = drafter.first_needed(L), self._rows(slot, slot + 1)
            self.loaded += 1
            with engine.request_lock:  # the engine's batch-1 cache is scratch, as for admissions
                engine.ensure_capacity(L)
                engine.prefill(torch.tensor([context[:-1]], device=engine.device))
                with engine.autocast():
                    anchor_feat = drafter.elements_at(context, engine.hidden_span(first, L - 1), first, cache=view)  # (1, D)
                    anchor = torch.tensor([L - 2], device=engine.device)
                    self.cols[slot] = drafter.chain(anchor_feat, anchor, 1, self.k, cache=view)[0, :, 0]

    @torch.inference_mode()
    def move(self, sources: list[int], slots: list[int]) -> None:
        """Rows a release moved: their draft cache rows and next drafts copied along (gathered first, so a slot may be both)."""
        src, dst = torch.tensor(sources, device=self.cols.device), torch.tensor(slots, device=self.cols.device)
        self.cache.k[:, dst] = self.cache.k[:, src]  # (1, n, nkv, S, hd)
        self.cache.v[:, dst] = self.cache.v[:, src]
        self.cols[dst] = self.cols[src]
        self.moved += len(slots)

    @torch.inference_mode()
    def after_verify(self, r: int, verdict: torch.Tensor, feed: torch.Tensor, input_pos: torch.Tensor) -> None:
        """Inside the step: the verify's hidden states (r, K+1, D) into each row's draft cache, then each row's next chain."""
        view, drafter = self._rows(0, r), self.drafter
        anchor_feat = drafter.catch_up(self.batch.model.last_hidden, verdict, feed, input_pos, cache=view)  # (r, D)
        self.cols[:r] = drafter.chain(anchor_feat, input_pos[:, 0] + verdict[:, 0], 1, self.k, cache=view)[:, :, 0]
