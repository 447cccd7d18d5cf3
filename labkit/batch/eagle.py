"""EAGLE chains for batched rows, drafted inside each batched verify: the batched twin of the EAGLE
drafter's device steps (specdec/eagle_drafter.py), as the drafting hook of BatchLookup's chunks.

A chunk runs greedy steps of rows [0, r) on the device (batch/lookup.py); with this hook a step
verifies, for every row, the chain the step before drafted for it, and then drafts the next:

    catch-up  every verified position of every row into that row's draft cache
              (EagleDrafter.catch_up: row j's token is the draft after it, or the target's next
              token at the accepted position), from the verify's hidden states (r, K+1, D)
    chain     K drafts from each row's accepted position (EagleDrafter.chain, an anchor per row)

so row i drafts what a single-request EAGLE drafter drafts for its request, step for step
(tests/test_batch_eagle.py holds them to it). With `copy_after` n (eagle-mix, specdec/eagle_mix.py)
a row whose context ends in an n-gram of at least n tokens seen before drafts prompt lookup's copy
instead (the lookup_draft kernel over its context, after the step's commit): a lone request's
eagle-ngram drafts (EagleDrafter(lookup_over=n)), step for step. Every row's chain is still
drafted (one captured step serves every row), and K may exceed the head's depth: copies fill the
columns, a chain repeats its last draft. The verify keeps the target's own argmax, so every
row's output is its plain greedy output whatever the head drafts.

The draft cache has a row per slot, (1, B, nkv, S, hd). A request a release moved into another
slot takes its row along (`_moved`: the draft cache row and its next drafts copied at the release). A row whose
device state is not its request's otherwise (a new request, host or plain steps taken since) is
loaded from its context: the row's draft cache caught up over the positions the draft layer's
window reaches, from the target's hidden states there, and its first chain (one pass for the rows
loaded together in neighbouring slots, as admissions place them). A new request's come
from its admission (BatchEngine.listen_prompts: batch-1 prefill's bits, which a lone request's
first proposal reads); other rows' from one batch-1 pass of the engine over their context (the
scratch admissions use). On the H200 a load with that pass cost 4.1 ms for a 64-token context, a
second prefill most of it (results/gpu/batch-eagle-costs-NVIDIA-H200-9e5e491.txt). (Moved rows
loaded so drafted otherwise in bf16 on the H200 at 86c75b7, 34 steps into a request, tokens
identical: a prefill's hidden states over generated tokens are not the verifies' bits; they move.)
Under a K controller a switch back from plain steps paid 9-47 ms of such passes at 1-8 rows
(batch-NVIDIA-H200-20261203-171930.json). So the hidden states of every step not drafted here
(plain or host steps, BatchEngine.listen_steps) are kept by slot and position (`feats`, allocated
at the first such step: slots x the draft layer's window x D, by position mod its length), and a row whose draft cache its request's last
chunk left in place catches up over the positions since from them alone (`load`'s `since`). An admitted prompt's hidden
states go into its slot's ring too, and a release that moves a request moves its ring row (BatchEngine.listen_releases):
a request's first load, however many plain steps and moves came before it, catches up from its admission's and its steps'
states (a pass over its context only where they do not reach back far enough).
Where steps are captured, a load's first chains are too (`capture_all`): one replay over the rows
[0, bucket) with the loaded ones marked (`loading`; the others chain in the headroom, their drafts
kept), not a draft-layer pass per depth from the host; and on CUDA its catch-up is a pass padded to
one of a few lengths through a scratch row (batch/eagle_load.py), captured: a replay, not the ~20
launches of an eager pass that kept the GPU idle for 0.67 ms a request joining.
"""

from __future__ import annotations

import torch

from labkit.batch.eagle_load import PaddedCatchUp
from labkit.batch.engine import BatchEngine
from labkit.batch.graphs import bucket
from labkit.batch.lookup import BatchLookup
from labkit.batch.transfer import to_device
from labkit.errors import LabkitError
from labkit.graphs import GRAPH_HEADROOM, capture
from labkit.kernels import registry
from labkit.kernels.reference import LOOKUP_MAX_N
from labkit.models.kvcache import KVCache
from labkit.specdec.eagle import EagleHead
from labkit.specdec.eagle_drafter import WINDOW, EagleDrafter


def device_eagles(batch: BatchEngine, head: EagleHead, ks: list[int], copy_after: int = 0) -> list[BatchLookup]:
    """Device steps drafting EAGLE chains (copy_after n: or lookup's copies, eagle-mix) for each
    drafting K of `ks` (0 is plain), every rows bucket's step captured now where steps are captured."""
    eagles = []
    for k in ks:
        if k:
            hook = BatchEagle(batch, head, k, copy_after)
            eagles.append(BatchLookup(batch, k, hook=hook))
            eagles[-1].capture_all()
            hook.capture_all()
    return eagles


class BatchEagle:
    """BatchLookup's drafting hook (batch/lookup.RowsHook): K-deep EAGLE chains for every row."""

    def __init__(self, batch: BatchEngine, head: EagleHead, k: int, copy_after: int = 0, window: int = WINDOW,
                 padded: bool | None = None) -> None:
        """copy_after n > 0: eagle-mix (module docstring), lookup's copy after an n-gram of n tokens seen before;
        window: the positions back the draft layer attends to (specdec/eagle_drafter.WINDOW); padded: loads'
        catch-ups as passes of a few fixed lengths (batch/eagle_load.py; None: on CUDA, captured where steps are)."""
        engine = batch.engine
        self.drafter = EagleDrafter(engine, head, device_steps=False, window=window, batch_rows=batch.cache.batch_size)  # the draft layer (not its own cache)
        if not 1 <= k <= (GRAPH_HEADROOM - 1 if copy_after else self.drafter.depth) or not 0 <= copy_after <= LOOKUP_MAX_N:
            raise LabkitError(f"this EAGLE head drafts 1 to {self.drafter.depth} tokens a step (more only with copies, after an n-gram "
                              f"of 1 to {LOOKUP_MAX_N} tokens), not K {k} (copies after {copy_after})")
        dims, rows = head.dims, batch.cache.batch_size
        self.depth = min(k, self.drafter.depth)  # each chain's drafts
        S = batch.cache.max_len + k + self.depth + 2  # a step's chain past a slot's last position (capture warm-ups too)
        self.cache = KVCache(1, rows, dims.n_kv_heads, S, dims.head_dim, dtype=self.drafter.dtype, device=engine.device)  # (1, B, nkv, S, hd)
        self.cols = torch.zeros(rows, k, dtype=torch.long, device=engine.device)  # (B, K) each slot's next drafts
        self.match_n = torch.zeros(rows, dtype=torch.long, device=engine.device)  # (B,) the n-gram each row's lookup matched (eagle-mix)
        self.anchor_feat = torch.zeros(rows, dims.dim, dtype=self.drafter.dtype, device=engine.device)  # (B, D) loaded rows' anchors' predicted features
        self.anchor_at = torch.zeros(rows, dtype=torch.long, device=engine.device)  # (B,) and positions: their first chains' start
        self.loading = torch.zeros(rows, dtype=torch.bool, device=engine.device)  # (B,) the rows a load's first chains are for
        self.first_chains: dict[int, torch.cuda.CUDAGraph] = {}  # rows bucket -> its first chains, captured (where steps are)
        self.whole_bucket = batch.graphs_ok  # a load's first chains: over its bucket's rows, `loading` marking its own (as captured)
        self.history: torch.Tensor | None = None  # (B, Lh) and n_ctx (B,): the steps' contexts (BatchLookup's, `bind`)
        self.n_ctx: torch.Tensor | None = None
        self.views: dict[int, KVCache] = {}  # r -> the draft cache's rows [0, r) (one view per bucket: a captured step reads it)
        self.batch, self.k, self.copy_after = batch, k, copy_after
        padded = engine.device.type == "cuda" if padded is None else padded
        self.padded = PaddedCatchUp(engine, self.drafter, self.cache, self.anchor_feat) if padded else None
        self.loaded = self.moved = self.prefilled = self.chained = 0  # rows loaded (of them by a pass of their own), their first chains' passes; rows moved
        self.caught_up = 0  # rows loaded from the hidden states the steps since their last chunk kept (no pass of their own)
        # (B, R, D) the hidden states of admitted prompts and of steps not drafted here (plain steps), by slot and position mod R: a
        # catch-up reads at most the draft layer's window back, and a step writes at most GRAPH_HEADROOM positions past what it keeps
        # (a slot's whole length would cost slots x max_seq_len x D: 604 MB in bf16 at 64 slots of 8,192 positions)
        self.feats: torch.Tensor | None = None
        self.ring = self.drafter.window + GRAPH_HEADROOM + 1  # R
        self.slot_ids = torch.empty(0, 1, dtype=torch.long)  # (B, 1) row indices for feats' writes (allocated with it)
        self.fed = [(0, 0, -1)] * rows  # per slot: the positions [from, to) those steps wrote one after another, for its request (BatchEngine.turns)
        batch.listen_prompts(self._keep)
        batch.listen_steps(self._keep_step)
        batch.listen_releases(self._moved)

    def _ring(self, hidden: torch.Tensor) -> torch.Tensor:
        """`feats`, allocated at the first hidden states kept (their dtype and device)."""
        if self.feats is None:
            self.feats = torch.zeros(self.cols.shape[0], self.ring, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
            self.slot_ids = torch.arange(self.cols.shape[0], device=hidden.device)[:, None]  # (B, 1): a step's rows, made once (every plain step writes)
        return self.feats

    def _keep(self, slot: int, prompt_ids: list[int], hidden: torch.Tensor) -> None:
        """An admitted prompt's hidden states (T, D) kept in its slot's ring, from the first position its
        first chain reads: its first load catches up from them and the steps' after them, whenever it comes.
        (Kept by prompt, a few per slot, a request that ran plain while many others were admitted found its
        own gone, and its load was a pass over its context: on the H200 a chunk at 16 rows with such loads
        stalled 1.8 s, a pass of a new length captured then, as it seems: results/gpu/batch-trace-spread-NVIDIA-H200-bbe0f45.txt.)"""
        T = len(prompt_ids)
        first = self.drafter.first_needed(T + 1)
        ring = self._ring(hidden)
        for at, part in self._spans(first, T):  # (slices: a copy or two, no index tensors built on the host's time)
            ring[slot, at] = hidden[first:T][part]
        self.fed[slot] = (first, T, self.batch.turns[slot])

    @torch.inference_mode()
    def _moved(self, slot: int, source: int) -> None:
        """A release moved source's request into slot: its state here goes along, its draft cache row and next drafts
        (BatchLookup's record of the slot says whether they are its request's) and the hidden states kept for it (else
        its next load is a pass)."""
        self.cache.copy_rows(slot, self.cache, source)  # the draft cache row, every position
        self.cols[slot] = self.cols[source]
        self.moved += 1
        first, to, turn = self.fed[source]
        if self.feats is not None and turn == self.batch.turns[source]:
            self.feats[slot] = self.feats[source]
            self.fed[slot] = (first, to, self.batch.turns[slot])

    def _keep_step(self, starts: list[int], input_pos: torch.Tensor, hidden: torch.Tensor) -> None:
        """A step's hidden states (n, T, D) at input_pos (n, T) kept by slot and position: a row that
        comes back to the chunks after such steps catches its draft cache up from them (`load`)."""
        n, T = input_pos.shape
        ring = self._ring(hidden)
        ring[self.slot_ids[:n], input_pos % self.ring] = hidden.to(ring.dtype)
        for slot, start in enumerate(starts):
            first, end, turn = self.fed[slot]
            same = turn == self.batch.turns[slot] and first <= start <= end
            self.fed[slot] = (first if same else start, start + T, self.batch.turns[slot])

    def _stepped(self, slot: int, start: int, end: int) -> bool:
        """Whether the steps kept slot's hidden states at positions [start, end), all for its request now."""
        first, to, turn = self.fed[slot]
        # (positions from `to` - window - 1 on: a step's verify wrote up to GRAPH_HEADROOM - 1 past `to`, the ring's older ones)
        return self.feats is not None and turn == self.batch.turns[slot] and max(first, to + GRAPH_HEADROOM - self.ring) <= start and end <= to

    def _spans(self, start: int, end: int) -> list[tuple[slice, slice]]:
        """Positions [start, end) (at most R of them) as (their ring slots, their part of the span): one
        piece, or two where they wrap past the ring's end."""
        a, n = start % self.ring, end - start
        if a + n <= self.ring:
            return [(slice(a, a + n), slice(0, n))]
        head = self.ring - a
        return [(slice(a, self.ring), slice(0, head)), (slice(0, n - head), slice(head, n))]

    def _kept(self, slot: int, start: int, end: int) -> torch.Tensor:
        """(end - start, D) the steps' hidden states of slot at positions [start, end) (`_stepped` says they are there)."""
        assert self.feats is not None
        pieces = [self.feats[slot, at] for at, _ in self._spans(start, end)]  # (a view where they do not wrap)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def bind(self, history: torch.Tensor, n_ctx: torch.Tensor) -> None:
        self.history, self.n_ctx = history, n_ctx

    def _choose(self, chain: torch.Tensor, start: int, stop: int, only: torch.Tensor | None = None) -> None:
        """cols[start:stop] = each row's chain (n, depth), its last draft repeated to K, or (eagle-mix)
        lookup's copy where the row's context ends in an n-gram of copy_after tokens seen before.
        only (n,) bool: the rows chosen for, the others' cols kept (their matches are found again
        over the contexts their last step's commit left: the same)."""
        cols = torch.cat((chain, chain[:, -1:].expand(-1, self.k - self.depth)), 1) if self.k > self.depth else chain  # (n, K)
        if self.copy_after:
            assert self.history is not None and self.n_ctx is not None
            match_n = self.match_n[start:stop]  # (n,)
            copied = registry.get("lookup_draft", chain.device)(self.history[start:stop], self.n_ctx[start:stop], self.k, match_n)  # (n, K)
            cols = torch.where((match_n >= self.copy_after)[:, None], copied, cols)
        self.cols[start:stop] = cols if only is None else torch.where(only[:, None], cols, self.cols[start:stop])

    def capture_all(self) -> None:
        """Capture each rows bucket's first chains (`load`) now, where steps are captured: one replay
        for the rows a load takes, not a draft-layer pass per depth launched from the host (a load
        after plain steps took 8.3 ms at one row on the H200, most of it those launches:
        results/gpu/batch-NVIDIA-H200-20261203-194159.json). Warm-ups and capture chain for no row (`_headroom`).
        Padded catch-ups: each length's pass captured, or (no graphs) run once, in slot 0's headroom."""
        if self.batch.graphs_ok:
            for r in sorted({bucket(n) for n in range(1, self.cols.shape[0] + 1)} - set(self.first_chains)):
                self._capture(r)
        if self.padded is not None:
            with torch.inference_mode():
                self.padded.capture_all(self.batch.cfg.max_seq_len + 1, self.batch.graphs_ok)

    def _capture(self, r: int) -> None:
        self.first_chains[r] = capture(self.batch.engine, lambda: self._first_chains(0, r), self._headroom)

    def _headroom(self) -> None:
        """Every row's first chain for no row: from a position past every request's, in the draft cache's headroom."""
        self.anchor_at.fill_(self.batch.cfg.max_seq_len + 1)
        self.loading.zero_()

    def _first_chains(self, start: int, stop: int, only: bool = True) -> None:
        """Rows [start, stop)'s chains from their anchors (anchor_feat, anchor_at); only: for the rows `loading` alone."""
        chain = self.drafter.chain(self.anchor_feat[start:stop], self.anchor_at[start:stop], 1, self.depth, cache=self._rows(start, stop))
        self._choose(chain[:, :, 0], start, stop, self.loading[start:stop] if only else None)

    def _rows(self, start: int, stop: int) -> KVCache:
        if start:
            return self.cache.rows(start, stop)
        if stop not in self.views:
            self.views[stop] = self.cache.rows(0, stop)
        return self.views[stop]

    @torch.inference_mode()
    def load(self, slots: list[int], contexts: list[list[int]], since: list[int] | None = None, prompt_lens: list[int] | None = None) -> None:
        """Each slot's draft cache row caught up over its context (but its last token), then the first
        chains: one for each run of neighbouring slots (rows admitted together), not one a row.
        since[i] > 0: slot i's draft cache holds its request's context of that length (a chunk left it
        so): where the steps since kept every hidden state after it, only those positions are caught up.
        prompt_lens[i]: the request's prompt length (None: a context of its prompt and one token)."""
        engine, drafter = self.batch.engine, self.drafter
        anchors: dict[int, int] = {}  # slot -> its anchor's position (its predicted feature: anchor_feat[slot])
        with engine.request_lock:  # the engine's batch-1 cache is scratch, as for admissions
            for slot, context, held, prompt_len in zip(slots, contexts, since or [0] * len(slots),
                                                       prompt_lens or [len(c) - 1 for c in contexts], strict=True):
                L = len(context)  # the row's cache holds context[:-1]: elements 0..L-2 are true
                if L < 2:
                    raise LabkitError("a row drafts after its prompt's first token")
                first = drafter.first_needed(L)
                self.loaded += 1
                if self._stepped(slot, start := max(first, held - 1), L - 1):  # (before held - 1 the elements are the chunks': not needed)
                    # every position from there kept: the admission's (a request before its first chunk) and the steps' since
                    first = start
                    self.caught_up += held > 0 or prompt_len < L - 1
                    feats = self._kept(slot, first, L - 1)[None]  # (1, L-1-first, D)
                else:
                    self.prefilled += 1
                    engine.ensure_capacity(L)
                    engine.prefill(torch.tensor([context[:-1]], device=engine.device))
                    feats = engine.hidden_span(first, L - 1)  # (1, L-1-first, D)
                if self.padded is not None:
                    self.padded.load(slot, context[first + 1 : L], feats, first)
                else:
                    with engine.autocast():
                        self.anchor_feat[slot] = drafter.elements_at(context, feats, first, cache=self._rows(slot, slot + 1))[0]  # (D,)
                anchors[slot] = L - 2
            self._chain_loaded(anchors)

    def _chain_loaded(self, anchors: dict[int, int]) -> None:
        """The loaded rows' first chains: with `whole_bucket` (as captured) one pass over the rows
        [0, bucket) with the loaded ones marked (`loading`), the others chaining in the headroom;
        else one pass for each run of neighbouring slots (rows admitted together). A row's chain is
        its own whatever rows share the pass (the steps' run every row)."""
        slots = sorted(anchors)
        # one row (an admission's): a fill of it; several: a device index (a host list's would be a copy that waits for the stream)
        at: int | torch.Tensor = slots[0] if len(slots) == 1 else to_device(slots, self.cols.device)
        runs: list[list[int]] = []
        if self.whole_bucket:
            self._headroom()
            self.loading[at] = True
            runs.append(list(range(bucket(slots[-1] + 1))))
        else:
            for slot in slots:
                if runs and runs[-1][-1] == slot - 1:
                    runs[-1].append(slot)
                else:
                    runs.append([slot])
        self.anchor_at[at] = anchors[slots[0]] if len(slots) == 1 else to_device([anchors[slot] for slot in slots], self.cols.device)
        self.chained += len(runs)
        for run in runs:
            if self.batch.graphs_ok and self.whole_bucket:
                if len(run) not in self.first_chains:
                    self._capture(len(run))
                self.first_chains[len(run)].replay()
            else:
                with self.batch.engine.autocast():
                    self._first_chains(run[0], run[-1] + 1, only=self.whole_bucket)

    @torch.inference_mode()
    def after_verify(self, r: int, verdict: torch.Tensor, feed: torch.Tensor, input_pos: torch.Tensor) -> None:
        """Inside the step: the verify's hidden states (r, K+1, D) into each row's draft cache, then each row's next chain."""
        chain = self.drafter.catch_up_chain(self.batch.model.last_hidden, verdict, feed, input_pos, self.depth, cache=self._rows(0, r))
        self._choose(chain, 0, r)  # (r, depth)
