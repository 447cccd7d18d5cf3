"""Prompt lookup for batched rows with no host in the loop: the batched twin of specdec/lookup_steps.py.

A batched drafting step driven from the host waits for its verdict before the next proposal, so
the host's per-row work (proposing, accepting, building the next feed) sits between every two
verifies, while a plain step launched ahead hides it (scheduler.py): on an H200 a K=5 drafting
step cost 1.35-1.73 plain steps at 1-8 rows against 1.02-1.14 for the device alone
(results/gpu/batch-NVIDIA-H200-20261201-231228.json). Here every row drafts, is verified and
accepts on the device, and the host reads once per chunk of CHUNK steps. A step is the single
stream's (specdec/lookup_steps.greedy_step) over r rows: the same four registry kernels, each
taking every row at once (a program per row in Triton), around one batched verify:

    draft   (r, K)      = lookup_draft: each row's n-gram lookup over its own context
    feed    (r, K+1)    = step_feed: [last token, draft] and their positions (n_ctx - 1 on)
    logits  (r, K+1, V) = one batched pass of the feed at each row's own positions
    verdict (r, 2)      = greedy_verdict: accepted drafts and the target's next token, EOS blocked
                          at context positions < eos_until (min_new_tokens)
    lookup_commit       = the accepted drafts and that token after each row's context; logged

The accepted drafts are the target's own argmax and the next token its token after them, so every
row's output is its plain greedy output. The drafts past the accepted ones (in the history and the
cache) are overwritten by the next step, as a rollback would leave them. Rows of the bucket past
the active ones are padding: they step too, from position 0 of free slots, whose contents no
request reads. (A first version drafted with the reference vmapped over rows and accepted with a
dozen PyTorch ops: ~40 launches a step, and a chunk step cost 1.34 plain steps at batch 1 on an
H200, results/gpu/batch-NVIDIA-H200-20261202-005543.json.)

State per slot lives on the device (history, n_ctx = context length, eos_until); the host rewrites
a slot's row from its request's context whenever the slot holds another request or the request
took host steps since (`load`), and reads the chunk's log at its end (`read`).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from labkit.batch.engine import BatchEngine
from labkit.batch.graphs import bucket
from labkit.batch.transfer import to_device
from labkit.errors import LabkitError
from labkit.graphs import GRAPH_HEADROOM, capture
from labkit.metrics.timers import DeviceSpan
from labkit.specdec.lookup_steps import greedy_step

CHUNK = 8  # device steps per host read


def device_lookups(batch: BatchEngine, ks: list[int]) -> list[BatchLookup]:
    """Device lookup steps for each drafting K of `ks` (a fixed K, or a controller's candidates; 0 is
    plain), every rows bucket's step captured now (`capture_all`)."""
    lookups = [BatchLookup(batch, k) for k in ks if k]
    for lookup in lookups:
        lookup.capture_all()
    return lookups


class RowsHook(Protocol):
    """A drafter whose drafts for the next step come out of each batched verify (EAGLE: batch/eagle.py)."""

    cols: torch.Tensor  # (B, K) each slot's drafts for its next step

    def bind(self, history: torch.Tensor, n_ctx: torch.Tensor) -> None:
        """The steps' contexts: history (B, Lh) holds each slot's tokens in [0, n_ctx) (B,), as each step's commit leaves them."""

    def load(self, slots: list[int], contexts: list[list[int]], since: list[int] | None = None, prompt_lens: list[int] | None = None) -> None:
        """Slots whose device state is not their request's context: make it so, their next drafts into cols
        (since[i] > 0: the slot's state is its request's context of that length, left by this hook's last
        chunk; prompt_lens[i]: how much of the context is the request's prompt)."""

    def after_verify(self, r: int, verdict: torch.Tensor, feed: torch.Tensor, input_pos: torch.Tensor) -> None:
        """Inside the step of rows [0, r): verdict (r, 2), feed and input_pos (r, K+1) -> the next drafts into cols[:r]."""


class BatchLookup:
    def __init__(self, batch: BatchEngine, k: int, hook: RowsHook | None = None) -> None:
        """hook: the drafts come from it (each step's, made inside the step before) instead of prompt lookup."""
        if batch.cfg.invariant or not 1 <= k < GRAPH_HEADROOM:
            raise LabkitError(f"device lookup steps need a batch outside invariant mode and 1 <= K < {GRAPH_HEADROOM} (got K {k})")
        if hook is not None and hook.cols.shape[1] != k:
            raise LabkitError(f"a drafting hook of {hook.cols.shape[1]} columns cannot draft K {k}")
        self.batch, self.k, self.hook = batch, k, hook
        dev, slots = batch.engine.device, batch.cache.batch_size
        self.room = batch.cfg.max_seq_len - CHUNK * (k + 1) - 1  # a row whose context is longer has no room for a chunk
        self.history = torch.zeros(slots, batch.cfg.max_seq_len + CHUNK * (k + 1) + 2, dtype=torch.long, device=dev)  # (B, Lh)
        self.n_ctx = torch.ones(slots, dtype=torch.long, device=dev)  # (B,) context length; the cache holds all but its last token
        self.eos_until = torch.zeros(slots, dtype=torch.long, device=dev)  # (B,) EOS blocked for tokens at context positions below
        self.eos_mask = torch.zeros(batch.engine.model.args.vocab_size, dtype=torch.bool, device=dev)  # (V,)
        self.eos_ids: tuple[int, ...] | None = None
        self.n_start = torch.ones(slots, dtype=torch.long, device=dev)  # (B,) context length at the chunk's start
        self.drafts_log = torch.zeros(CHUNK, slots, k, dtype=torch.long, device=dev)  # (CHUNK, B, K)
        self.accepted_log = torch.zeros(CHUNK, slots, dtype=torch.long, device=dev)  # (CHUNK, B)
        self.step_idx = torch.zeros(1, dtype=torch.long, device=dev)  # (1,)
        self.span = torch.arange(CHUNK * (k + 1), device=dev)  # (CHUNK*(K+1),) the most history positions a chunk writes
        self.synced: list[tuple[Any, int] | None] = [None] * slots  # per slot: (request, context length) its device row holds
        self.graphs: dict[int, Any] = {}  # rows bucket -> captured step
        self.steps = CHUNK  # steps the last chunk ran
        # the last chunk's device time (`run` only): loading rows back from steps elsewhere (plain, host; not requests'
        # first loads: drafting's cost, not a switch's), its steps
        self.load_time, self.step_time = DeviceSpan(dev), DeviceSpan(dev)
        if hook is not None:
            hook.bind(self.history, self.n_ctx)
        batch.listen_releases(self._released)

    def fits(self, contexts: list[list[int]]) -> bool:
        """Whether every row has room for a chunk of steps in its slot."""
        return all(len(c) <= self.room for c in contexts)

    def run(self, requests: list[Any], eos_ids: tuple[int, ...], steps: int = CHUNK) -> bool:
        """`steps` (<= CHUNK) steps of rows [0, n), one per request (BatchRequest: context,
        prompt_ids, config), every row's EOS ids these: replays of the bucket's captured step on CUDA.
        Returns whether the bucket's step was captured first (the chunk's time is then not its own).
        The device's time of the loads of rows back and of the steps: `load_time`, `step_time`."""
        r = self._chunk_rows(len(requests), steps)
        captured = self.batch.graphs_ok and r not in self.graphs
        if captured:
            self.capture(r)
        self._load(requests, eos_ids, r)
        self._replay(r, steps)
        return captured

    def run_on(self, n: int, steps: int) -> None:
        """`steps` (<= CHUNK) more steps of the last chunk's rows [0, n), launched before the host
        takes that chunk's tokens (the scheduler's chunks ahead): the device's rows are theirs
        already, so nothing is loaded; read, then `taken`, as after `run`."""
        r = self._chunk_rows(n, steps)
        self._pad(n, r)
        self._replay(r, steps)

    def _chunk_rows(self, n: int, steps: int) -> int:
        """A chunk of `steps` over n rows: checked, kept as this chunk's, and its rows (the bucket's where steps are captured)."""
        if not 1 <= steps <= CHUNK:
            raise LabkitError(f"a chunk takes 1 to {CHUNK} steps, not {steps}")
        self.steps = steps
        return bucket(n) if self.batch.graphs_ok else n

    def _replay(self, r: int, steps: int) -> None:
        self.step_time.start()
        self.n_start.copy_(self.n_ctx)
        self.step_idx.zero_()
        for _ in range(steps):
            if self.batch.graphs_ok:
                self.graphs[r].replay()
            else:
                self._step(r)
        self.step_time.stop()

    def _pad(self, n: int, rows: int) -> None:
        """Rows of the bucket past the n active ones start at position 0 (of free slots)."""
        if rows > n:
            self.n_ctx[n:rows] = 1
            self.synced[n:rows] = [None] * (rows - n)

    def _load(self, requests: list[Any], eos_ids: tuple[int, ...], rows: int) -> None:
        """Rows [0, n) from their requests where the device's row is not already theirs; rows of
        the bucket past them start at position 0."""
        dev = self.history.device
        if eos_ids != self.eos_ids:
            self.eos_mask.zero_()
            if eos_ids:
                self.eos_mask[to_device(list(eos_ids), dev)] = True
            self.eos_ids = eos_ids
        stale = [i for i, r in enumerate(requests) if not self._holds(i, r)]
        for i in stale:
            self.history[i, : len(requests[i].context)] = to_device(requests[i].context, dev)
        since: dict[int, int] = {}  # rows the hook loads -> the length its last chunk left the slot's request at (0: the request's first here)
        if stale:
            rows_at = to_device(stale, dev)  # (a host list as the index would be copied, waiting for the stream)
            self.n_ctx[rows_at] = to_device([len(requests[i].context) for i in stale], dev)
            self.eos_until[rows_at] = to_device([len(requests[i].prompt_ids) + requests[i].config.min_new_tokens for i in stale], dev)
            if self.hook is not None:  # (a request a release moved took its row along: `_released`)
                since = {i: held[1] if (held := self.synced[i]) is not None and held[0] is requests[i] else 0 for i in stale}
        self.load_time.start()  # rows back from steps elsewhere, timed apart (a switch's cost) ...
        self._hook_load(requests, {i: n for i, n in since.items() if n})
        self.load_time.stop()
        self._hook_load(requests, {i: n for i, n in since.items() if not n})  # ... then requests' first loads (the chunk's own cost)
        self._pad(len(requests), rows)

    def _hook_load(self, requests: list[Any], since: dict[int, int]) -> None:
        """The hook's load of these rows (row -> the length its last chunk left it at, 0: none)."""
        if since and self.hook is not None:
            rows = list(since)
            self.hook.load(rows, [requests[i].context for i in rows], list(since.values()), [len(requests[i].prompt_ids) for i in rows])

    def _released(self, slot: int, source: int) -> None:
        """A release moved source's request into slot (BatchEngine.listen_releases; no chunk is in flight then): the
        device row it holds goes along (a hook moves its own state: BatchEagle._moved), so that its next chunk starts from it, or catches up from
        where its last chunk left it, whatever plain steps came between. (Moved at its next chunk, and only if no step
        had come between, a request that ran plain steps after a chunk and then moved was loaded by a pass over its
        context: the positions before its plain steps were in its old slot's draft cache alone.)"""
        held, self.synced[source] = self.synced[source], None
        self.synced[slot] = held
        if held is not None:
            self.history[slot] = self.history[source]
            self.n_ctx[slot] = self.n_ctx[source]
            self.eos_until[slot] = self.eos_until[source]

    def _holds(self, slot: int, request: Any) -> bool:
        """Whether the device's row `slot` holds this request's context as it is now."""
        synced = self.synced[slot]
        return synced is not None and synced[0] is request and synced[1] == len(request.context)

    def _step(self, r: int) -> None:
        """One speculative greedy step of rows [0, r) (the module docstring), logged at step_idx."""
        hook = self.hook
        verdict, feed, input_pos = greedy_step(self.batch.step_rows, self.history[:r], self.n_ctx[:r], self.eos_mask, self.eos_until[:r],
                                               self.k, self.drafts_log[:, :r], self.accepted_log[:, :r], self.step_idx,
                                               None if hook is None else hook.cols[:r])
        if hook is not None:
            hook.after_verify(r, verdict, feed, input_pos)

    def capture_all(self) -> None:
        """Capture every rows bucket's step now (where steps are captured), so that no chunk a
        request waits on pays for one."""
        if self.batch.graphs_ok:
            for r in sorted({bucket(n) for n in range(1, self.batch.cfg.slots + 1)} - set(self.graphs)):
                self.capture(r)

    def capture(self, r: int) -> None:
        """Capture the step of bucket r: warm-ups and capture start from a position past every
        request's (the slots' headroom), then every device row is marked stale."""
        past = self.batch.cfg.max_seq_len + 1

        def prepare() -> None:
            self.n_ctx[:r] = past
            self.step_idx.zero_()

        self.graphs[r] = capture(self.batch.engine, lambda: self._step(r), prepare)
        self.synced = [None] * len(self.synced)

    def read(self, requests: list[Any]) -> tuple[list[list[list[int]]], list[list[list[int]]], list[int]]:
        """The last chunk's log for rows [0, n), read at once: drafts [step][row] (K), the tokens each
        step gave each row [step][row] (its accepted drafts, then the target's next token), and each
        row's context length after it. The caller takes the tokens, then `taken`."""
        n, k, m = len(requests), self.k, self.steps
        written = self.history[:n].gather(1, self.n_start[:n, None] + self.span[: m * (k + 1)])  # (n, m*(K+1)) from each row's start
        back = torch.cat([self.drafts_log[:m, :n].transpose(0, 1).flatten(1), self.accepted_log[:m, :n].T, written, self.n_ctx[:n, None]], 1).tolist()
        drafts = [[row[s * k : (s + 1) * k] for row in back] for s in range(m)]
        tokens: list[list[list[int]]] = [[] for _ in range(m)]
        for row in back:
            accepted, at, out = row[m * k : m * (k + 1)], 0, row[m * (k + 1) : -1]
            for s, a in enumerate(accepted):
                tokens[s].append(out[at : at + a + 1])
                at += a + 1
        return drafts, tokens, [row[-1] for row in back]

    def taken(self, requests: list[Any], n_ctx: list[int]) -> None:
        """The host took the chunk's tokens: a row whose request's context now has the device's
        length holds that context (a row that finished inside the chunk does not)."""
        for i, (r, length) in enumerate(zip(requests, n_ctx, strict=True)):
            self.synced[i] = (r, length) if len(r.context) == length else None
