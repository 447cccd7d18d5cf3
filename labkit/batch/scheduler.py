"""Continuous batching over a BatchEngine: requests join and leave between steps.

Each `step()` first admits waiting requests into free slots (their prompts prefilled together where
that keeps batch-1 prefill's bits, BatchEngine.admit_many: prefill and decode run as separate steps),
then decodes one token for every active request in one batched step. A request that finishes
(max_new_tokens, or an end-of-sequence token once min_new_tokens allow it) leaves at once and its
slot takes the next request at the next step (held for a few to join together while a queue waited, speculative
systems ran 3-7% slower at 8-32 rows on the H200: 16 prompts prefilled together took 28 ms, one at a time 34;
results/gpu/admission-NVIDIA-H200-ac6bfb7.txt). Admission keeps within the cache: a request whose
prompt and new tokens do not fit a slot is refused when submitted; one waits while every slot is busy.

Speculation: with a drafter factory and K, every step drafts up to K tokens for each row (one K
for the whole batch; a row may propose fewer, and drafts past a request's last token are not
asked for) and verifies all rows in one batched pass; each row keeps the longest prefix of its
draft that matches the target's argmax, plus the target's own next token, and its slot rolls back
past the rest. Speculation is greedy only.

Sampling (temperature > 0, without speculation): each request draws its token from its own
generator, seeded by its config as `generate` seeds one, one draw per token; so in invariant mode
(a row's logits the same bits as at batch 1) a sampled request's tokens are `generate`'s.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from labkit.batch.chunking import chunk_steps, rows_go_on
from labkit.batch.controller import BatchKController
from labkit.batch.engine import BatchEngine
from labkit.batch.graphs import bucket
from labkit.batch.lookup import BatchLookup
from labkit.batch.request import BatchRequest
from labkit.batch.shadow import ShadowDrafts
from labkit.batch.transfer import HostCopy, constant, to_device
from labkit.config import GenerationConfig
from labkit.errors import LabkitError
from labkit.sampling import make_generator, sample_rows
from labkit.specdec.draft import Drafter


@dataclass
class _InFlight:
    """A plain step launched and not yet read."""
    requests: list[BatchRequest]  # its rows, in the order it ran them
    chosen: torch.Tensor  # (n,) each row's next token, on the device
    host: HostCopy  # the same tokens on their way to the host
    rows: dict[int, int]  # id(request) -> its row
    rated: bool = True  # False: an admission ran while it was in flight, so its time is not its own


class ContinuousBatcher:
    def __init__(self, batch: BatchEngine, drafter: Callable[[], Drafter] | None = None, k: int = 0,
                 controller: BatchKController | None = None, ahead: bool | None = None,
                 lookup: BatchLookup | Sequence[BatchLookup] | None = None) -> None:
        """k: draft tokens per row and step (K max with a controller, which picks K per step from
        0..k by measured throughput, per rows bucket). ahead: launch plain steps ahead of reading
        the last (`_plain_ahead`); None: on CUDA, whose steps run while the host works. On a CPU a
        step runs in the call itself, so nothing overlaps, and launching ahead only adds the
        finished rows' extra step (0.93-1.00x at batch 1-8, scripts/batch_ahead.py). lookup: device
        lookup steps of one K or several (a controller's candidates): a step that drafts a K they
        cover runs as a chunk of prompt lookup on the device (batch/lookup.py: one host read per
        chunk) wherever every row is greedy, shares its EOS ids and has room; elsewhere, and for
        other K, the drafter drafts on the host."""
        if (drafter is None) != (k == 0) or k < 0 or (controller is not None and controller.k_max != k):
            raise LabkitError("speculation takes a drafter and K >= 1 together (K 0: plain; a controller's K max is K)")
        lookups = [lookup] if isinstance(lookup, BatchLookup) else list(lookup or [])
        if any(lu.batch is not batch or not 1 <= lu.k <= k for lu in lookups):
            raise LabkitError(f"device lookup steps are built for their batch engine and K up to K (got K {[lu.k for lu in lookups]} for K {k})")
        self.batch, self.new_drafter, self.k, self.controller = batch, drafter, k, controller
        self.lookups = {lu.k: lu for lu in lookups}  # K -> its device lookup steps
        self.ahead = batch.engine.device.type == "cuda" if ahead is None else ahead
        self.waiting: collections.deque[BatchRequest] = collections.deque()
        self.rows: list[BatchRequest] = []  # rows[i]: the request in slot i
        self.steps = 0  # batched decode steps taken
        self.rows_stepped = 0  # sum of active rows over those steps (mean batch = rows_stepped / steps)
        self.in_flight: _InFlight | None = None  # a plain step launched and not yet read
        self.chunk_ahead: tuple[BatchLookup, tuple[list[BatchRequest], int]] | None = None  # device steps launched ahead: theirs, (rows, steps)
        self.chosen: tuple[int, int] | None = None  # a controller's choice made ahead of its step (`_ahead_steps`): (bucket, K)
        self.accounted = time.perf_counter()  # where the last step timed for the controller ended
        # the rows' acceptance during plain steps (not where a hook drafts, EAGLE: the host's n-gram drafts would misjudge it)
        self.shadow = ShadowDrafts(k) if controller is not None and k and not any(lu.hook is not None for lu in lookups) else None

    def submit(self, prompt_ids: list[int], config: GenerationConfig) -> BatchRequest:
        """Queue a request (EOS ids as `generate` takes them: the config's, else the model's)."""
        config.validate()
        if config.temperature != 0 and self.k:
            raise LabkitError("batched speculation is greedy (temperature 0); sampled requests batch without drafts")
        need = len(prompt_ids) + config.max_new_tokens + self.k  # a verify may write K positions past the last token
        if not prompt_ids or need > self.batch.cfg.max_seq_len:
            raise LabkitError(f"{need} positions (prompt + max_new_tokens) exceed a batch slot of {self.batch.cfg.max_seq_len}")
        eos = tuple(sorted(set(config.eos_token_ids or self.batch.engine.eos_token_ids)))
        request = BatchRequest(list(prompt_ids), config, eos, context=list(prompt_ids), submitted=time.perf_counter(),
                               generator=make_generator(config, self.batch.engine.device))
        if self.new_drafter is not None:
            request.drafter = self.new_drafter()
            request.drafter.start(request.prompt_ids, need)
        self.waiting.append(request)
        return request

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.rows or self.in_flight or self.chunk_ahead)

    @staticmethod
    def _greedy(requests: list[BatchRequest], logits: torch.Tensor) -> list[list[int]]:
        """The chosen tokens at every fed position of every row (`_choose`), read by the host. logits (n, T, V)."""
        return ContinuousBatcher._choose(requests, logits, [len(r.tokens) for r in requests]).tolist()

    @staticmethod
    def _choose(requests: list[BatchRequest], logits: torch.Tensor, produced: list[int]) -> torch.Tensor:
        """The target's argmax at every fed position of every row, EOS blocked where a row's
        min_new_tokens asks (produced[i]: the tokens row i has before this step's); a sampled row
        (one fed position) draws its token from its generator instead. On the device, nothing
        read: logits (n, T, V) -> (n, T)."""
        groups: dict[tuple[int, ...], list[int]] = {}  # EOS ids -> each row's positions blocked (0: none)
        for i, (r, done) in enumerate(zip(requests, produced, strict=True)):
            block = r.config.min_new_tokens - done
            if block > 0 and r.eos_ids:
                groups.setdefault(r.eos_ids, [0] * len(requests))[i] = block
        blocked_logits = None
        for eos, blocks in groups.items():  # a few launches per group (one usually), none per row
            dev, T = logits.device, logits.shape[1]
            cols = constant(eos, dev)  # (E,)
            blocked = constant(tuple(range(T)), dev)[None, :] < to_device(blocks, dev)[:, None]  # (n, T)
            eos_logits = logits.index_select(2, cols).masked_fill_(blocked[:, :, None], float("-inf"))  # (n, T, E)
            if blocked_logits is None:
                blocked_logits = logits.index_copy(2, cols, eos_logits)  # a copy: the step's own logits stay as they are
            else:
                blocked_logits.index_copy_(2, cols, eos_logits)
        if blocked_logits is not None:
            logits = blocked_logits
        chosen = logits.argmax(-1)  # (n, T)
        sampled = [i for i, r in enumerate(requests) if r.generator is not None]
        if sampled:  # one warp for all of them (sample_rows), then a draw per row from its own generator
            rows = to_device(sampled, logits.device)  # (m,)
            picked = sample_rows(logits[:, -1].index_select(0, rows), [requests[i].config for i in sampled],
                                 [requests[i].generator for i in sampled])  # (m,)
            chosen[:, -1].index_copy_(0, rows, picked)
        return chosen

    def _take(self, request: BatchRequest, greedy: list[int], draft: Sequence[int] = (), now: float | None = None) -> int:
        """Keep the longest prefix of `draft` the target agrees with (greedy: its argmax at the fed
        positions), then its own next token. Returns the drafts kept."""
        cfg = request.config
        kept = 0
        while kept < len(draft) and greedy[kept] == draft[kept]:
            kept += 1
        now = time.perf_counter() if now is None else now  # when the host has the tokens (a chunk's, all at its read)
        for token in greedy[: kept + 1]:
            request.tokens.append(token)
            request.context.append(token)
            request.token_times.append(now)
            if cfg.stop_at_eos and token in request.eos_ids:
                request.finished, request.stop_reason = True, "eos"
            elif len(request.tokens) >= cfg.max_new_tokens:
                request.finished, request.stop_reason = True, "max_new_tokens"
            if request.finished:
                break
        return kept

    def _feed(self, request: BatchRequest, k_step: int) -> list[int]:
        """The last token and up to k_step drafts (none past the request's last token)."""
        k = min(k_step, request.config.max_new_tokens - len(request.tokens) - 1)
        if request.drafter is None or k <= 0:
            return [request.tokens[-1]]
        draft = request.drafter.propose(request.context, k, request.config, None).tokens[:k]
        return [request.tokens[-1], *draft]

    def _leave(self) -> None:
        if self.chunk_ahead is not None:  # its rows are running: they leave once it is read
            return
        for slot in range(len(self.rows) - 1, -1, -1):  # from the end: a move only brings a kept row down
            if self.rows[slot].finished:
                moved = self.batch.release(slot)
                last = self.rows.pop()
                if moved is not None:
                    self.rows[slot] = last

    def step(self) -> None:
        """Admit what fits, then one decode step over every active request. A plain step (K 0) is
        launched ahead (with `ahead`): its tokens come from the step before it on the device, and
        that step's tokens are read and taken while it runs (`_plain_ahead`); any other step first
        reads the step in flight (`_settle`). A chunk launched ahead (`_ahead_steps`) is read first."""
        if self.chunk_ahead is not None:
            self._lookup_chunk(*self.chunk_ahead)
            return
        self._admit()
        if not self.rows:
            self.in_flight = None  # its requests all left (cancelled): nothing to read
            return
        k_step = self._choose_k()
        flight = self.in_flight
        if k_step == 0 and self.ahead and (flight is None or any(len(r.tokens) + (id(r) in flight.rows) < r.config.max_new_tokens for r in self.rows)):
            self._plain_ahead()  # (a step after which every row is done by max_new_tokens would be wasted)
            return
        self._settle_in_flight()
        lookup = self.lookups.get(k_step)
        if self.rows and lookup is not None and self._lookup_fits(lookup):
            self._lookup_chunk(lookup)
        elif self.rows:
            self._read_step(k_step)

    def _choose_k(self) -> int:
        """The next step's K: fixed, or the controller's (a choice made ahead for these rows' bucket stands)."""
        chosen, self.chosen, rows = self.chosen, None, bucket(len(self.rows))
        if self.controller is None:
            return self.k
        return chosen[1] if chosen is not None and chosen[0] == rows else self.controller.choose(rows)

    def _admit(self) -> None:
        """Prefill the waiting requests that fit into free slots; each takes its first token."""
        joining = [self.waiting.popleft() for _ in range(min(len(self.waiting), self.batch.free))]
        if joining and self.in_flight is not None:  # the prefill's time would be charged to the step in flight
            self.in_flight.rated = False
        if joining:
            assert self.batch.active == len(self.rows)
            logits = self.batch.admit_many([r.prompt_ids for r in joining])  # (m, V): slots len(rows)...
            self.rows.extend(joining)
            for request, first in zip(joining, self._greedy(joining, logits[:, None]), strict=True):
                self._take(request, first)
            self.accounted = time.perf_counter()  # the prefill's time is no step's
        self._leave()

    def _plain_ahead(self) -> None:
        """Launch a plain step over every row, then read the step in flight while it runs. A row
        in the step in flight is fed that step's token on the device; one that joined since, its
        last token from the host. A row that the read finishes has had one step too many, whose
        result no one reads (its slot is released after it, in the device's order)."""
        flight, n = self.in_flight, len(self.rows)
        in_flight = [flight.rows.get(id(r), -1) if flight else -1 for r in self.rows]  # each row's row in the flight, -1: none
        if flight is None or in_flight != list(range(n)):
            ids = to_device([r.tokens[-1] for r in self.rows], self.batch.engine.device)  # (n,)
            if flight is not None:
                at = to_device([max(i, 0) for i in in_flight], ids.device)
                ids = torch.where(to_device(in_flight, ids.device) >= 0, flight.chosen[at], ids)
        else:
            ids = flight.chosen[:n]
        logits = self.batch.advance(ids)  # (n, V)
        self.steps += 1
        self.rows_stepped += n
        chosen = self._choose(self.rows, logits[:, None], [len(r.tokens) + (i >= 0) for r, i in zip(self.rows, in_flight, strict=True)])
        self.in_flight = _InFlight(list(self.rows), chosen[:, 0], HostCopy(chosen[:, 0]), {id(r): i for i, r in enumerate(self.rows)})
        if flight is not None:
            self._settle(flight)

    def _settle_in_flight(self) -> None:
        if self.in_flight is not None:
            flight, self.in_flight = self.in_flight, None
            self._settle(flight)

    def _settle(self, flight: _InFlight) -> None:
        """Read a plain step's tokens and take them (rows finished since it was launched skip theirs).
        The controller is told the time from where the step before it was timed to end, as every
        step is: in a run of plain steps each is charged one period (its launch overlaps the step
        before), one after a drafting step its launch too (charged only from its read, it looked
        nearly free), and each the host's work between steps (the choice of K, rows leaving). A
        step in flight while requests were admitted is not rated: the prefill's time is not its own
        (charged to it, an admission of 64 prompts made plain look half as fast as it ran)."""
        t0 = self.accounted
        before = sum(len(r.tokens) for r in flight.requests)
        for request, token in zip(flight.requests, flight.host.tolist(), strict=True):
            if not request.finished:
                self._take(request, [token])
                request.verify_steps += 1
                if self.k:
                    request.draft_tokens.append([])
                    request.accepted_lengths.append(0)
        if self.controller and flight.rated:
            self.controller.observe(bucket(len(flight.requests)), 0, sum(len(r.tokens) for r in flight.requests) - before, time.perf_counter() - t0)
        self._shadow_drafts()  # (the next step is running: this host work hides behind it)
        self.accounted = time.perf_counter()
        self._leave()

    def _shadow_drafts(self) -> None:
        """After a plain step, with a controller: the drafts its rows' tokens settle are judged and
        told to the controller, and the next rows in turn draft (batch/shadow.py): the controller
        knows what rows keep of drafts while the batch runs plain."""
        if self.controller is not None and self.shadow is not None:
            for asked, kept in self.shadow.judged(len(self.rows)).items():
                self.controller.observe_drafts(asked, kept)
            self.shadow.propose(self.rows)

    def _read_step(self, k_step: int) -> None:
        """One step read at once: the rows' drafts (K k_step) verified, each row's verdict taken.
        Timed from where the last step's timing ended, as plain steps are (`_settle`): the host's
        work between steps (the choice of K, rows leaving) is every step's."""
        t0 = self.accounted
        feeds = [self._feed(r, k_step) for r in self.rows]
        before = sum(len(r.tokens) for r in self.rows)
        width = k_step + 1 if k_step and self.batch.cfg.invariant else None  # invariant: one width whatever the batch drafts
        starts = self.batch.lengths[: len(feeds)]
        logits = self.batch.verify(feeds, width)  # (n, T, V)
        self.steps += 1
        self.rows_stepped += len(self.rows)
        greedy = self._greedy(self.rows, logits)  # (n, T)
        kept_rows = []  # each row's accepted drafts
        for slot, (request, feed, row) in enumerate(zip(self.rows, feeds, greedy, strict=True)):
            kept = self._verdict(request, feed[1:], row)
            kept_rows.append(kept)
            self.batch.rollback(slot, starts[slot] + 1 + kept)
        if self.controller:
            self.controller.observe(bucket(len(self.rows)), k_step, sum(len(r.tokens) for r in self.rows) - before, time.perf_counter() - t0,
                                    kept_rows)
        if not k_step:
            self._shadow_drafts()
        self.accounted = time.perf_counter()
        self._leave()

    def _verdict(self, request: BatchRequest, draft: list[int], greedy: list[int], now: float | None = None) -> int:
        """Take a drafting step's verdict for one row (`_take`) and count it; returns the drafts kept."""
        kept = self._take(request, greedy, draft, now)
        request.drafted, request.accepted, request.verify_steps = request.drafted + len(draft), request.accepted + kept, request.verify_steps + 1
        if self.k:
            request.draft_tokens.append(draft)
            request.accepted_lengths.append(kept)
        return kept

    def _lookup_fits(self, lookup: BatchLookup) -> bool:
        """Whether the next drafting steps can run as a chunk of these device lookup steps."""
        return all(r.generator is None and r.eos_ids == self.rows[0].eos_ids for r in self.rows) and lookup.fits([r.context for r in self.rows])

    def _ahead_steps(self, lookup: BatchLookup, rows: list[BatchRequest], tokens: list[list[list[int]]]) -> int:
        """Steps of a chunk to launch before the host takes the last one's tokens (0: none; chunking.py): with `ahead`,
        where every row goes on, no waiting request could take a free slot and the next step drafts this K: fixed, or
        a controller's choice that is its best (a try runs one step). The controller chooses here, a chunk early (it
        has not yet heard of the chunk just read); a choice not taken here is the next step's (`_choose_k`)."""
        if not self.ahead or (self.waiting and self.batch.free) or (coming := rows_go_on(rows, tokens, lookup.room)) is None:
            return 0
        if self.controller is not None:
            self.chosen = (rows_bucket := bucket(len(rows)), self.controller.choose(rows_bucket))
            if self.chosen[1] != lookup.k or self.controller.best(rows_bucket) != lookup.k:
                return 0
            self.chosen = None
        return chunk_steps(rows, coming, len(tokens))

    def _lookup_chunk(self, lookup: BatchLookup, ahead: tuple[list[BatchRequest], int] | None = None) -> None:
        """A chunk of drafting steps on the device (`ahead`: one launched before, its rows and
        steps), read at once: each row takes its verdicts in order (a row that finishes inside the
        chunk ignores the steps after it). The controller is told each step's share of the chunk's
        cost at its full length: its device time plus its host work spread over a full chunk (a
        one-step try charged the whole host work rated K 5 at 1,915 tok/s at batch 1 on the H200
        where its chunks ran at 2,593: batch-NVIDIA-H200-20261202-032933.json), its load of rows back
        from plain told apart (`BatchKController.observe_load`), requests' first loads in its steps (not
        counted, EAGLE's K 5 was rated 1.28x plain at 16 rows on the H200 where it ran 0.77x: a request
        joined every few steps; batch-NVIDIA-H200-20261203-230058.json). Timed from where the last step's timing ended."""
        t0 = self.accounted
        if ahead is None:
            rows = list(self.rows)
            full = chunk_steps(rows)
            ctl, b = self.controller, bucket(len(rows))
            m = ctl.steps_of(b, lookup.k, full) if ctl is not None else full  # a try: a step, or a few across a switch
            captured = lookup.run(rows, rows[0].eos_ids, m)
        else:  # launched ahead (its full length: its time per step is the period its chunks run at)
            (rows, m), captured, self.chunk_ahead = ahead, False, None
            full = m
        drafts, tokens, n_ctx = lookup.read(rows)
        read = time.perf_counter()  # every token of the chunk reaches the host now (a stream gets them in one burst)
        load, device = ((lookup.load_time.seconds(), lookup.step_time.seconds())
                        if ahead is None and self.controller else (0.0, 0.0))  # (before steps ahead time theirs)
        more = self._ahead_steps(lookup, rows, tokens)
        if more:
            lookup.run_on(len(rows), more)
        per_step = []  # of the steps that gave a row a token: the tokens, and each row's kept drafts
        taken = sum(len(r.tokens) for r in rows)
        for step in range(m):
            live = [not r.finished for r in rows]
            if any(live):
                kept = [self._verdict(r, drafts[step][i], tokens[step][i], read) for i, (r, on) in enumerate(zip(rows, live, strict=True)) if on]
                before, taken = taken, sum(len(r.tokens) for r in rows)
                per_step.append((taken - before, kept))  # kept: the rows still running, each its accepted drafts
        lookup.taken(rows, n_ctx)
        self.batch.set_lengths([c - 1 for c in n_ctx])  # each cache holds its context but the last token
        self.steps += m
        self.rows_stepped += m * len(rows)
        if self.controller and not captured:  # each step that gave tokens, the chunk's time shared among them (steps after every row finished cost too)
            wall = time.perf_counter() - t0 - load  # rows back from plain told apart (a switch's cost); requests' first loads K's own
            device = min(device, wall)
            seconds = (device + (wall - device) * m / full) / len(per_step)
            self.controller.observe_load(bucket(len(rows)), lookup.k, load)
            self.controller.observe_chunk(bucket(len(rows)), lookup.k, per_step, seconds)
        self.chunk_ahead = (lookup, (rows, more)) if more else None
        self.accounted = time.perf_counter()
        self._leave()

    def cancel(self, request: BatchRequest) -> None:
        """Stop a request: a waiting one never starts, a running one leaves before the next step."""
        if request in self.waiting:
            self.waiting.remove(request)
        if not request.finished:
            request.finished, request.stop_reason = True, "cancelled"
        self._leave()

    def run(self) -> None:
        while self.busy:
            self.step()
