"""Prompt lookup for batched rows with no host in the loop: the batched twin of specdec/lookup_steps.py.

A batched drafting step driven from the host waits for its verdict before the next proposal, so
the host's per-row work (proposing, accepting, building the next feed) sits between every two
verifies, while a plain step launched ahead hides it (scheduler.py): on an H200 a K=5 drafting
step cost 1.35-1.73 plain steps at 1-8 rows against 1.02-1.14 for the device alone
(results/gpu/batch-NVIDIA-H200-20261201-231228.json). Here every row drafts, is verified and
accepts on the device, and the host reads once per chunk of CHUNK steps:

    draft   (r, K)    = lookup_draft per row (the kernels' PyTorch reference, vmapped over rows)
    logits  (r, K+1, V) = one batched pass of [last token, draft] at each row's own positions
    chosen  (r, K+1)  = argmax, EOS blocked at context positions < eos_until (min_new_tokens)
    accepted (r,)     = the drafts' prefix equal to chosen; the context grows by chosen[:accepted+1]

chosen[:accepted] are the accepted drafts themselves and chosen[accepted] the target's token after
them, so every row's output is its plain greedy output. All K+1 chosen tokens are written after
the context; those past the accepted ones (in the history and the cache) are overwritten by the
next step, as a rollback would leave them. Rows of the bucket past the active ones are padding:
they step too, from position 0 of free slots, whose contents no request reads.

State per slot lives on the device (history, n_ctx = context length, eos_until); the host rewrites
a slot's row from its request's context whenever the slot holds another request or the request
took host steps since (`load`), and reads the chunk's log at its end (`read`).
"""

from __future__ import annotations

from typing import Any

import torch

from labkit.batch.engine import BatchEngine
from labkit.batch.graphs import bucket
from labkit.batch.transfer import to_device
from labkit.errors import LabkitError
from labkit.graphs import GRAPH_HEADROOM, capture
from labkit.kernels.reference import lookup_draft

CHUNK = 8  # device steps per host read


class BatchLookup:
    def __init__(self, batch: BatchEngine, k: int) -> None:
        if batch.cfg.invariant or not 1 <= k < GRAPH_HEADROOM:
            raise LabkitError(f"device lookup steps need a batch outside invariant mode and 1 <= K < {GRAPH_HEADROOM} (got K {k})")
        self.batch, self.k = batch, k
        dev, slots = batch.engine.device, batch.cache.batch_size
        self.room = batch.cfg.max_seq_len - CHUNK * (k + 1) - 1  # a row whose context is longer has no room for a chunk
        self.history = torch.zeros(slots, batch.cfg.max_seq_len + CHUNK * (k + 1) + 2, dtype=torch.long, device=dev)  # (B, Lh)
        self.n_ctx = torch.ones(slots, dtype=torch.long, device=dev)  # (B,) context length; the cache holds all but its last token
        self.eos_until = torch.zeros(slots, dtype=torch.long, device=dev)  # (B,) EOS blocked for tokens at context positions below
        self.eos_mask = torch.zeros(batch.engine.model.args.vocab_size, dtype=torch.bool, device=dev)  # (V,)
        self.eos_ids: tuple[int, ...] | None = None
        self.drafts_log = torch.zeros(CHUNK, slots, k, dtype=torch.long, device=dev)  # (CHUNK, B, K)
        self.chosen_log = torch.zeros(CHUNK, slots, k + 1, dtype=torch.long, device=dev)  # (CHUNK, B, K+1)
        self.step_idx = torch.zeros(1, dtype=torch.long, device=dev)  # (1,)
        self.offsets = torch.arange(k + 1, device=dev)  # (K+1,)
        self.synced: list[tuple[Any, int] | None] = [None] * slots  # per slot: (request, context length) its device row holds
        self.graphs: dict[int, Any] = {}  # rows bucket -> captured step

    def fits(self, contexts: list[list[int]]) -> bool:
        """Whether every row has room for a chunk of steps in its slot."""
        return all(len(c) <= self.room for c in contexts)

    def run(self, requests: list[Any], eos_ids: tuple[int, ...]) -> None:
        """CHUNK steps of rows [0, n), one per request (BatchRequest: context, prompt_ids, config),
        every row's EOS ids these: replays of the bucket's captured step on CUDA."""
        n = len(requests)
        r = bucket(n) if self.batch.graphs_ok else n
        if self.batch.graphs_ok and r not in self.graphs:
            self.capture(r)
        self._load(requests, eos_ids, r)
        self.step_idx.zero_()
        for _ in range(CHUNK):
            if self.batch.graphs_ok:
                self.graphs[r].replay()
            else:
                self._step(r)

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
        if stale:
            self.n_ctx[stale] = to_device([len(requests[i].context) for i in stale], dev)
            self.eos_until[stale] = to_device([len(requests[i].prompt_ids) + requests[i].config.min_new_tokens for i in stale], dev)
        if rows > len(requests):
            self.n_ctx[len(requests) : rows] = 1
            self.synced[len(requests) : rows] = [None] * (rows - len(requests))

    def _holds(self, slot: int, request: Any) -> bool:
        """Whether the device's row `slot` holds this request's context as it is now."""
        synced = self.synced[slot]
        return synced is not None and synced[0] is request and synced[1] == len(request.context)

    def _step(self, r: int) -> None:
        """One speculative greedy step of rows [0, r) (the module docstring), logged at step_idx."""
        k, hist, n_ctx = self.k, self.history[:r], self.n_ctx[:r]
        draft = torch.vmap(lookup_draft, in_dims=(0, 0, None))(hist, n_ctx[:, None], k)  # (r, K)
        feed = torch.cat([hist.gather(1, (n_ctx - 1)[:, None]), draft], 1)  # (r, K+1): the last token, then the draft
        at = n_ctx[:, None] + self.offsets  # (r, K+1) the context positions the chosen tokens take
        logits = self.batch.step_rows(feed, at - 1)  # (r, K+1, V), fed at positions n_ctx-1 ...
        blocked = (at < self.eos_until[:r, None])[:, :, None] & self.eos_mask  # (r, K+1, V)
        chosen = logits.masked_fill(blocked, float("-inf")).argmax(-1)  # (r, K+1)
        accepted = (draft == chosen[:, :k]).long().cumprod(1).sum(1)  # (r,)
        hist.scatter_(1, at, chosen)
        n_ctx.add_(accepted + 1)
        self.drafts_log[:, :r].index_copy_(0, self.step_idx, draft[None])
        self.chosen_log[:, :r].index_copy_(0, self.step_idx, chosen[None])
        self.step_idx.add_(1)

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
        """The chunk's log for rows [0, n), read at once: drafts [step][row] (K), chosen [step][row]
        (K+1), and each row's context length after it. The caller takes the tokens, then `taken`."""
        n = len(requests)
        return self.drafts_log[:, :n].tolist(), self.chosen_log[:, :n].tolist(), self.n_ctx[:n].tolist()

    def taken(self, requests: list[Any], n_ctx: list[int]) -> None:
        """The host took the chunk's tokens: a row whose request's context now has the device's
        length holds that context (a row that finished inside the chunk does not)."""
        for i, (r, length) in enumerate(zip(requests, n_ctx, strict=True)):
            self.synced[i] = (r, length) if len(r.context) == length else None
