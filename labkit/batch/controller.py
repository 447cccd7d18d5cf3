"""How many tokens a batch drafts per row: K chosen per batch, by measured throughput.

At batch 1 a verify of K+1 tokens costs about one decode step, so drafting pays; as the batch grows the step turns from
reading weights to computing, a verify of K+1 tokens per row costs more, and past some batch size drafting stops paying
(batched speculation's crossover). Where exactly depends on the device, the kernels, the host's own per-row work and the
acceptance the prompts allow, so this controller measures: per rows bucket (1, 2, 4, ...) it keeps, for each candidate K (0
= plain steps), the seconds of its steps (and its tokens) as sums that decay by `memory` at each new step; it tries every
candidate a few times first, then takes the best, and tries another now and then so that the rates follow the load. A K
choice never changes the output (greedy verification), only its speed.

How K is rated. A step's cost is the bucket's and K's (the device, the kernels, the host's work), while what the rows keep
of their drafts is the text's, the same in every bucket. So, where the scheduler reports each row's accepted drafts, K's
rate is the bucket's rows x a row's expected tokens with K (`Acceptance`: per draft position j, the share of recent rows
that kept their first j drafts, over every bucket) / K's mean step in the bucket. Every drafting step, of any bucket and K,
then updates every K's rate at once: when the text turns copyable under K 2, K 5 is rated higher at the next choice, not
after its next try (a larger K than the one drafting continues the last positions' ratio). Rated by each K's own recent
steps (tokens over seconds) and a bound for the larger K from rows that kept every draft, the controller reached 92% of an
oracle's rate at batch 1 with acceptance alternating 0.3 / 0.85 every 100 steps, 86% on the worst seed; so rated, 96% and
93% (tests/test_batch.py). Without drafts reported (a caller that passes none) K is rated by its steps' tokens over their
seconds. While the batch runs plain nothing is drafted and the acceptance known goes stale (a copying request began with a
writing one's at batch 1 on the H200: 1.24x plain where K 5 alone ran 1.39x, batch-NVIDIA-H200-20261202-061702.json), so the
scheduler judges drafts during plain steps too (batch/shadow.py, `observe_drafts`: under greedy, the tokens rows go on to
take say what a verify would have kept), and the acceptance decays faster (ACCEPTANCE_MEMORY) than a step's rates. Sums, not
an average of per-step rates: a drafting step's tokens vary, a plain step's never, and a greedy choice over swinging
averages drifts to the steadiest candidate, not the fastest (tests/test_batch.py). A candidate close to the best (within
CLOSE) is tried again often, since noise may have put it behind, and less often each time it stays behind (its wait doubles
from CLOSE_EVERY choices up to CLOSE_MAX): every try switches, and a switch costs (the plain run's first step hides nothing,
a chunk of device steps has host work of its own), so a K a few percent behind, tried every CLOSE_EVERY choices, had the
batch switching all the time (simulated at 8 rows with K 2 at 0.996 of plain and K 5 at 0.92: 0.84-0.85 of plain, 0.90-0.92
with waits that double; 0.92x on the H200 at 8 rows). Nor more often than keeps a try's cost to TRY_SHARE of the bucket's
time, the switch's bubbles there and back counted (simulated with the suite's categories, K 5 near even at 8 rows: 0.93 of
plain, so bounded 0.96-0.97). A clear loser is tried rarely, its wait doubling from `explore_every` up to MAX_WAIT steps and
at least what keeps its tries to TRY_SHARE (a try loses K's step over the best's x the share of the best's rate it lacks):
at 64 rows on the H200, where a try of K 5 costs about 3 plain steps, tries every 16 steps cost 5% of plain's speed, every
MAX_WAIT 2%. The rows' acceptance comes from judged drafts as well, so a try mostly refreshes the K's step time; but a
drafting hook's drafts (EAGLE's) are judged only in its own steps, so there (`for_eagle`) a try of a drafting K from plain
runs a chunk of TRY_STEPS, not one step (`try_steps`): it pays the switch's cost anyway, and one step's drafts barely moved
the acceptance a plain run left. (Prompt lookup's tries so long drafted 23% of its steps at 32 rows on the H200, 0.75x
plain: ...-20261203-230058.json.) A K's first step in a bucket is its warm-up, not rated (the first replay of a step shape
took 26 ms on the H200 against 0.7 after it: rated, K 2 looked 9x slower than plain at one row for the rest of the run:
scripts/batch_trace.py). One slow step must not decide: a loser is tried rarely, so its sums are rarely refreshed, and a
single stall in them (an admission's prefill, the host's garbage collector) would keep it losing for hundreds of steps. Past
its first tries, a K's step counts at most OUTLIER times its mean. (On the H200 the controller once rated plain steps at 2
rows at 992 tok/s, where plain ran at 3,513: `k_rates` in results/gpu/batch-NVIDIA-H200-20261201-231228.json.) Plain steps
are rated in runs. The scheduler launches a plain step ahead of reading the one before, so in a run of them the host's work
hides behind the device's; a lone plain step between drafting steps cannot hide it and costs its whole latency. Rated by
lone steps, plain looked as slow as drafting where a run of it was a third faster (H200, 4 rows: 4,814 tok/s against 6,710
measured, results/gpu/batch-NVIDIA-H200-20261202-005543.json), and the controller drafted where it should not. So plain is
rated by the steps of a run after its first (the fill, which a long run spreads thin): the rate plain keeps once chosen. A
choice of K 0 holds for `plain_run` steps (a try of it for 2). But a switch between plain and drafting pays that first
step's unhidden host work (the bubble: the measured `fill` less a run's plain step), either way: valued as paid once over
SWITCH_HORIZON steps of the K switched to. Rated by runs alone, at batch 1 where K 5 and plain were nearly even, the
controller switched to plain and back and paid each time (simulated: 0.985 of K 5 alone; valued so, 1.01); on the H200
plain's first step after a chunk took 1.0-1.4 ms at 1-8 rows, against 0.5 ms in a run (`k_costs` in
results/gpu/batch-NVIDIA-H200-20261202-065040.json), and the controller drafted at 8 rows where drafting lost (0.87x plain;
K 5 alone 0.91x). A fill is kept once a run's plain step is known to bound it (OUTLIER of them): a bucket's very first step,
a fill with nothing to bound it by, once stalled 18 ms on the H200 against 0.47 ms steps, and priced every switch out for
the rest of the run (a row left to run alone stayed plain where K 5 ran 1.2x faster). A switch is counted from the K last
taken as the best, not the last step's: after a try of K 5, plain looked like the switch (simulated at 8 rows with drafting
near even: 0.88 of plain, switching every 12 steps; so counted, 0.97). The switch's cost is spread over the steps the side
switched to lasted its last stays (`horizon`): over 8 alone, EAGLE at 2 rows on the H200 stayed plain where K 5 was rated
1.26x (results/gpu/batch-NVIDIA-H200-20261203-222841.json); over the last stay of either side, ngram-device-auto-5 at 8
rows switched 19 times, not 7, and ran 0.85x plain (-224800.json). A drafting K may also have to load rows that plain steps
moved on (EAGLE: a pass over each row's context, its draft cache caught up): told apart from K's steps (`observe_load`), it
joins the bubble of a switch from plain to that K and a try's cost, never K's rate (charged to a one-step try, it rated
EAGLE's K 5 at 3.4 ms a step on the H200 where its steps took 0.8, and the controller never drafted:
results/gpu/batch-NVIDIA-H200-20261203-170508.json). (Tried: runs of 8 while plain is the best: on the H200 0.92-0.95x from
8 to 64 rows against 0.92-0.98x with runs of 2 the same day: results/gpu/batch-NVIDIA-H200-20261202-034541.json,
-032933.json.)
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from labkit.errors import LabkitError

CLOSE = 0.9  # a candidate within this share of the best's rate is a close call ...
CLOSE_EVERY = 8  # ... tried again after this many choices, then after twice as many while it stays behind ...
CLOSE_MAX = 32  # ... up to this many (a clear loser waits steps, doubling from explore_every)
SWITCH_HORIZON, MAX_HORIZON = 8, 64  # a switch's cost spread over steps: at least / most (BucketStats.horizon)
STAY_MEMORY = 0.5  # a side's mean stay decays by this at each of its stays (flapping shortens it within a few)
MAX_WAIT = 256  # steps a clear loser's doubling wait reaches at most ...
TRY_SHARE = 0.005  # ... and past it, a wait long enough that its try costs this share of the bucket's time ...
LONG_WAIT = 4096  # ... up to this many steps
ACCEPTANCE_MEMORY = 0.9  # the rows' acceptance decays by this at each drafting step or judged draft (rates by `memory`)
FRESH = 0.25  # a draft position's acceptance counts while its recent rows are at least this share of the first position's
TRY_STEPS = 8  # an EAGLE try of a drafting K from plain steps runs this many steps (try_steps; a device chunk)
OUTLIER = 4.0  # a step timed at more than this many times its K's mean step counts as this many (after the first tries)
LOAD_STEPS = 4  # a load of rows counts at most this many of its K's mean steps (a pass over a window and a chain: 1-2 on the H200)


class Acceptance:
    """How often rows keep their drafts, by draft position, over every bucket (it is the text's, not
    the batch's): for position j, the rows of recent drafting steps that drafted it and, of them,
    those that kept it (decayed sums). tokens(K) is a row's expected tokens from a step with K."""

    def __init__(self, k_max: int, memory: float) -> None:
        self.memory = memory
        self.rows = [0.0] * (k_max + 1)  # [j]: decayed rows whose step drafted position j (j >= 1)
        self.kept = [0.0] * (k_max + 1)  # [j]: of them, those that kept their first j drafts

    def observe(self, k: int, kept: list[int]) -> None:
        for j in range(1, len(self.rows)):
            self.rows[j] *= self.memory
            self.kept[j] *= self.memory
        for j in range(1, min(k, len(self.rows) - 1) + 1):
            self.rows[j] += len(kept)
            self.kept[j] += sum(a >= j for a in kept)

    @property
    def known(self) -> bool:
        return len(self.rows) > 1 and self.rows[1] > 0

    def tokens(self, k: int) -> float:
        """1 + the sum over positions j <= K of P(a row keeps its first j drafts). A position not
        drafted lately (its rows below FRESH of the first's) continues the last ratio P(j-1)/P(j-2):
        a larger K than the one drafting is rated from what the rows keep now, not from a stale past."""
        out, last, before = 1.0, 1.0, 1.0
        for j in range(1, k + 1):
            if j < len(self.rows) and self.rows[j] >= FRESH * self.rows[1]:
                p = min(self.kept[j] / self.rows[j], last)
            else:
                p = last * (last / before if before > 0 else 0.0)
            out, before, last = out + p, last, p
        return out


@dataclass
class BucketStats:
    acceptance: Acceptance | None = None  # the controller's, shared by every bucket
    tokens: dict[int, float] = field(default_factory=dict)  # K -> decayed sum of the tokens its steps gave
    seconds: dict[int, float] = field(default_factory=dict)  # K -> decayed sum of those steps' seconds
    own_steps: dict[int, float] = field(default_factory=dict)  # K -> decayed count of those steps
    rows: float = 0.0  # decayed mean of the rows a step ran (0: none yet)
    tries: dict[int, int] = field(default_factory=dict)  # K -> steps taken with it
    wait: dict[int, int] = field(default_factory=dict)  # K -> steps between its tries while it clearly loses
    next_try: dict[int, int] = field(default_factory=dict)  # K -> the step from which a clear loser is tried again
    close_wait: dict[int, int] = field(default_factory=dict)  # K -> choices between its tries while it is a close call behind
    close_next: dict[int, int] = field(default_factory=dict)  # K -> the choice from which that close call is tried again
    close_step: dict[int, int] = field(default_factory=dict)  # K -> ... and the step before which it is not (what a try costs: TRY_SHARE)
    steps: int = 0
    decisions: int = 0  # choices made (a run of plain steps is one)
    plain_left: int = 0  # steps of the current run of plain steps still to take
    last_k: int = -1  # the K of the step observed last
    fill: float = 0.0  # decayed mean seconds of a run's first plain step after drafting (0: none yet)
    load: dict[int, float] = field(default_factory=dict)  # K -> decayed mean seconds its first chunk after plain steps took to load the rows
    loads_seen: set[int] = field(default_factory=set)  # the drafting K whose first such load (a warm-up, not kept) was seen
    chosen: int = -1  # the K last taken as the best (-1: none yet)
    switches: int = 0  # such choices that went from plain to drafting or back
    stay_from: int = 0  # `observed` at the last switch
    plain_try_steps: int = 1  # the steps a try of drafting from plain runs (BatchKController.for_eagle: TRY_STEPS)
    stays: dict[bool, float] = field(default_factory=dict)  # drafting or not -> the steps its last stays lasted (a mean, STAY_MEMORY)

    @property
    def observed(self) -> int:  # steps observed here, every K
        return sum(self.tries.values())

    def horizon(self, k: int) -> float:
        """Steps a switch to K's side (plain or drafting) is spread over: what that side's last stays lasted (bounded)."""
        return min(MAX_HORIZON, max(SWITCH_HORIZON, self.stays.get(k > 0, 0.0)))

    def step(self, k: int) -> float:
        """K's mean step here, in seconds (0 before its first)."""
        return self.seconds[k] / self.own_steps[k] if self.own_steps.get(k) else 0.0

    def value(self, k: int) -> float:
        """K's rate for the choice now. A switch between plain and drafting (either way, from the K
        last taken as the best) leaves the device a step's host work that nothing hides (measured: the
        fill, a run's first plain step after drafting, less a plain step in a run): valued as paid once
        over `horizon(k)` steps of K; a switch to drafting, also K's load of the rows plain steps moved on
        (`BatchKController.observe_load`). Staying, K's rate."""
        switch = self.chosen != -1 and (k == 0) != (self.chosen == 0)
        if not switch or not self.step(k):
            return self.rate(k)
        bubble = max(0.0, self.fill - self.step(0)) if self.fill and self.step(0) else 0.0
        bubble += self.load.get(k, 0.0)
        horizon = self.horizon(k)
        return self.rate(k) * horizon * self.step(k) / (horizon * self.step(k) + bubble)

    def switch_cost(self, k: int, best: int) -> float:
        """Seconds a try of K from the best pays however many steps it runs: where it crosses between
        plain and drafting, the bubble there and back and the drafting K's load of the rows."""
        if (k == 0) == (best == 0):
            return 0.0
        bubbles = 2 * max(0.0, self.fill - self.step(0)) if self.fill and self.step(0) else 0.0
        return bubbles + self.load.get(k or best, 0.0)

    def try_steps(self, k: int, best: int) -> int:
        """The steps a try of drafting K runs: one, or from plain steps TRY_STEPS. Such a try pays the
        switch's cost (`switch_cost`: the bubbles, an EAGLE row's load) however long it runs, and it
        is what tells the rows' acceptance how the text turned while plain steps ran (an EAGLE hook
        judges no drafts then): one step moves that acceptance by 1 - ACCEPTANCE_MEMORY, a chunk by
        1 - ACCEPTANCE_MEMORY ** 8. Simulated at one row with the H200's EAGLE costs and a text that
        turns copyable after plain steps won (tests/test_batch.py), one-step tries ran 1.73x plain on
        average over six seeds (0.95x on the worst: it stayed plain), tries of a chunk 1.86x (1.62x;
        K 5 alone about 2.1x). Its wait counts its steps (`try_cost`)."""
        return self.plain_try_steps if k and not best else 1

    def try_cost(self, k: int, best: int, value: dict[int, float]) -> float:
        """The best's steps a try of K loses: K's steps over the best's x the share of the best's rate
        K lacks, and where the try switches between plain and drafting, the switch's cost (`switch_cost`)."""
        if not self.step(best) or not value[best]:
            return 0.0
        lost = self.try_steps(k, best) * self.step(k) / self.step(best) * max(0.0, 1 - value[k] / value[best])
        return lost + self.switch_cost(k, best) / self.step(best)

    def rate(self, k: int) -> float:
        """K's tokens per second (0 before its first step): where the rows' acceptance is known,
        this bucket's rows x a row's expected tokens with K (plain: one) / K's mean step here; else
        (no drafts reported) the ratio of its recent steps' tokens and seconds. Plain is rated by
        the same rows as drafting: a bucket spans several row counts (5 to 8 rows in bucket 8), and
        rated by its own steps' tokens, plain measured while 5 rows ran stayed behind K 5 rated at
        8 rows (H200, `scripts/batch_trace.py`: plain's last steps at 5-6 rows, 10,658 tok/s,
        against K 5's 12,014, where plain ran 15,100 at 8 rows and K 5 14,300)."""
        if not self.seconds.get(k):
            return 0.0
        if self.acceptance is not None and self.acceptance.known and self.rows:
            return self.rows * (self.acceptance.tokens(k) if k else 1.0) / self.step(k)
        return self.tokens.get(k, 0.0) / self.seconds[k]


class BatchKController:
    def __init__(self, k_max: int, candidates: list[int] | None = None, warm: int = 3, explore_every: int = 16, memory: float = 0.95,
                 plain_run: int = 2, plain_try_steps: int = 1) -> None:
        if plain_run < 2:
            raise LabkitError(f"plain steps are rated after a run's first, so a run takes at least 2 (got plain_run {plain_run})")
        self.k_max = k_max
        self.candidates = sorted(set(candidates if candidates is not None else [0, max(1, k_max // 2), k_max]))
        self.warm, self.explore_every, self.memory, self.plain_run, self.plain_try_steps = warm, explore_every, memory, plain_run, plain_try_steps
        self.buckets: dict[int, BucketStats] = {}
        self.acceptance = Acceptance(max(self.candidates), ACCEPTANCE_MEMORY)

    @classmethod
    def for_eagle(cls, k: int) -> BatchKController:
        """K or plain for EAGLE rows (each K's chunks keep a draft cache of their own: a switch between two
        reloads the rows), a try from plain a chunk of TRY_STEPS (its drafts judged in its own steps alone)."""
        return cls(k, [0, k], plain_try_steps=TRY_STEPS)

    def choose(self, bucket: int) -> int:
        """The K for a step of this many rows (rounded up to its bucket). K 0, once chosen, holds
        for `plain_run` steps (the module docstring)."""
        stats = self._stats(bucket)
        stats.steps += 1
        if stats.plain_left > 0:
            stats.plain_left -= 1
            return 0
        k, tried = self._decide(stats)
        if not tried:  # (a try is a detour: the batch returns to the best)
            if stats.chosen != -1 and (k == 0) != (stats.chosen == 0):
                stay, stats.stay_from, side = stats.observed - stats.stay_from, stats.observed, stats.chosen > 0
                stats.stays[side] = STAY_MEMORY * stats.stays[side] + (1 - STAY_MEMORY) * stay if side in stats.stays else float(stay)
                stats.switches += 1
            stats.chosen = k
        if k == 0:  # a run while plain is the best; a try of it, the least that rates it (a fill, then one step)
            stats.plain_left = (2 if tried else self.plain_run) - 1
        return k

    def _decide(self, stats: BucketStats) -> tuple[int, bool]:
        """The next K, and whether it is a try (else the best, taken)."""
        stats.decisions += 1
        untried = [k for k in self.candidates if stats.tries.get(k, 0) < self.warm]
        if untried:
            return untried[0], True
        value = {k: stats.value(k) for k in self.candidates}  # each K's rate for this choice, once
        best = max(self.candidates, key=value.__getitem__)
        close = [k for k in self.candidates if k != best and value[k] >= CLOSE * value[best]]
        for k in (best, *close):  # back in the race: a later clear loss waits from the start again
            stats.wait.pop(k, None)
            stats.next_try.pop(k, None)
        stats.close_wait.pop(best, None)  # the best, once behind again, is checked often from the start
        stats.close_next.pop(best, None)
        due_close = [k for k in close if stats.close_next.setdefault(k, stats.decisions + CLOSE_EVERY) <= stats.decisions
                     and stats.close_step.get(k, 0) <= stats.steps]
        if due_close:  # a close call is checked often (the rates are noisy), less often each time it stays behind
            k = min(due_close, key=lambda k: stats.tries.get(k, 0))
            stats.close_wait[k] = min(CLOSE_MAX, 2 * stats.close_wait.get(k, CLOSE_EVERY // 2))
            stats.close_next[k] = stats.decisions + stats.close_wait[k]
            stats.close_step[k] = stats.steps + min(LONG_WAIT, round(stats.try_cost(k, best, value) / TRY_SHARE))
            return k, True
        losers = [k for k in self.candidates if k != best and k not in close]
        due = [k for k in losers if stats.next_try.setdefault(k, stats.steps + self.explore_every) <= stats.steps]
        if due:  # the least tried clear loser, whose next wait doubles, and is at least what keeps its tries' cost to TRY_SHARE
            k = min(due, key=lambda k: stats.tries.get(k, 0))
            stats.wait[k] = min(MAX_WAIT, 2 * stats.wait.get(k, self.explore_every // 2))
            stats.next_try[k] = stats.steps + min(LONG_WAIT, max(stats.wait[k], round(stats.try_cost(k, best, value) / TRY_SHARE)))
            return k, True
        return best, False

    def steps_by_k(self) -> dict[int, int]:
        """Steps taken with each K so far, every bucket together."""
        return dict(sum((collections.Counter(stats.tries) for stats in self.buckets.values()), collections.Counter()))

    def rates(self) -> dict[int, dict[int, float]]:
        """Each rows bucket's rate of each K tried there (tokens per second, BucketStats.rate): what
        the choice rests on, for a report."""
        return {b: {k: stats.rate(k) for k in self.candidates if stats.seconds.get(k)} for b, stats in sorted(self.buckets.items())}

    def costs(self) -> dict[int, dict[str, object]]:
        """Per rows bucket, what the rates rest on, for a report: each K's mean step, the fill and its loads (ms),
        the switches between plain and drafting, and a row's expected tokens with each K now."""
        tokens = {k: self.acceptance.tokens(k) for k in self.candidates if k} if self.acceptance.known else {}
        return {b: {"step_ms": {k: 1e3 * st.step(k) for k in self.candidates if st.step(k)}, "fill_ms": 1e3 * st.fill,
                    "load_ms": {k: 1e3 * v for k, v in st.load.items()},
                    "switches": st.switches, "tokens": tokens} for b, st in sorted(self.buckets.items())}

    def values(self, bucket: int) -> dict[int, float]:
        """Each candidate K's rate for a choice in this bucket now, a switch's bubble counted ({} before its first step)."""
        stats = self.buckets.get(bucket)
        return {k: stats.value(k) for k in self.candidates} if stats else {}

    def steps_of(self, bucket: int, k: int, full: int) -> int:
        """The steps a chunk of K in this bucket runs: `full` where K is rated best, else a try's (BucketStats.try_steps), at most `full`."""
        return full if k == (best := self.best(bucket)) else min(full, self._stats(bucket).try_steps(k, best))

    def best(self, bucket: int) -> int:
        """The K rated fastest for this bucket (K max where nothing is known yet)."""
        values = self.values(bucket)
        return max(values, key=values.__getitem__) if values else self.k_max

    def observe(self, bucket: int, k: int, tokens: int, seconds: float, kept: list[int] | None = None) -> None:
        """A step of this bucket drafted with K gave `tokens` new tokens (all rows) in `seconds`;
        `kept`: the accepted drafts of each row still running (`Acceptance`; None: not reported)."""
        if seconds > 0:
            self._observe(self._stats(bucket), k, tokens, seconds, kept, True)

    def observe_chunk(self, bucket: int, k: int, steps: list[tuple[int, list[int]]], seconds: float) -> None:
        """A chunk of K's steps on the device (batch/lookup.py): each step's tokens and its rows' kept drafts, each
        charged `seconds` (the chunk's time shared). A stall in a chunk is one stall: the chunk counts at most (steps - 1
        + OUTLIER) of K's mean steps, bounded once by the mean before it. (Bounded step by step, each bound raised by the
        steps before it: a 71 ms chunk at 4 rows on the H200, four requests' first loads, charged 8.84 ms a step against
        0.85, K 5 rated 3,052 tok/s against plain's 7,275, 750 steps plain: results/gpu/batch-trace-NVIDIA-H200-1cb6fac.txt.)"""
        if not steps or seconds <= 0:
            return
        stats = self._stats(bucket)
        if stats.tries.get(k, 0) >= self.warm and stats.step(k):
            seconds = min(seconds, (len(steps) - 1 + OUTLIER) * stats.step(k) / len(steps))
        for tokens, kept in steps:
            self._observe(stats, k, tokens, seconds, kept, False)

    def _observe(self, stats: BucketStats, k: int, tokens: int, seconds: float, kept: list[int] | None, bound: bool) -> None:  # bound: OUTLIER here
        fill, stats.last_k = k == 0 and stats.last_k != 0, k
        if fill:  # a run's first plain step: tried, not rated, but its cost kept for a switch to plain (the module docstring)
            stats.tries[k] = stats.tries.get(k, 0) + 1
            if not stats.step(0):  # nothing yet to bound a stall by (a bucket's very first step, say): not kept
                return
            seconds = min(seconds, OUTLIER * stats.step(0))
            stats.fill = self.memory * stats.fill + (1 - self.memory) * seconds if stats.fill else seconds
            return
        if kept is not None and k > 0:  # a plain step says nothing of drafts
            self.acceptance.observe(k, kept)
        first = k > 0 and not stats.tries.get(k)
        stats.tries[k] = stats.tries.get(k, 0) + 1
        if first:  # a drafting K's first step here is its warm-up, not its speed (a step shape's first replay: 26 ms against 0.7 on the H200)
            return
        if bound and stats.tries[k] > self.warm and stats.own_steps.get(k):  # a stall (an admission, a capture, the host's garbage collector) is not the K's speed
            seconds = min(seconds, OUTLIER * stats.step(k))
        stats.tokens[k] = self.memory * stats.tokens.get(k, 0.0) + tokens
        stats.seconds[k] = self.memory * stats.seconds.get(k, 0.0) + seconds
        stats.own_steps[k] = self.memory * stats.own_steps.get(k, 0.0) + 1
        rows = len(kept) if kept is not None and k > 0 else tokens if k == 0 else 0
        if rows:
            stats.rows = self.memory * stats.rows + (1 - self.memory) * rows if stats.rows else float(rows)

    def observe_load(self, bucket: int, k: int, seconds: float) -> None:
        """A chunk of K took `seconds` to load rows whose device state was not their requests' (batch/
        lookup.py; EAGLE: a pass over each such row's context, 9 / 47 ms at 1 / 8 rows on the H200). Told
        before the chunk's steps; after plain steps it is the switch's cost, kept apart from K's step
        (charged to a one-step try, it rated EAGLE's K 5 at 3.4 ms a step where its steps took 0.8
        and the controller never drafted: results/gpu/batch-NVIDIA-H200-20261203-170508.json). Within
        a drafting run it is no one's. A request's first load (its prompt's draft cache) is not told
        (BatchLookup.load_time times rows back alone): told, it priced switches at 8-42 ms at 1-8 rows on the H200
        (-195731.json); it is drafting's cost, in K's steps (the scheduler's). A load counts at most
        LOAD_STEPS of K's steps (before any mean can bound a stall: a kernel compiled for a new catch-up
        length stalled one 1.1 s on the H200 and the controller stayed plain: ...-20261203-222841.json)."""
        stats = self._stats(bucket)
        if k > 0 and stats.last_k == 0 and seconds > 0:
            if k not in stats.loads_seen:  # K's first load here is its warm-up (kernels' first launches at new shapes), not kept:
                stats.loads_seen.add(k)  # a first one of 73 ms at one row on the H200, later ones 0.6, priced every switch out
                return  # (results/gpu/batch-NVIDIA-H200-20261203-200622.json)
            if not stats.step(k):  # nothing yet to bound a stall by: not kept
                return
            seconds = min(seconds, LOAD_STEPS * stats.step(k))
            if k in stats.load:
                stats.load[k] = self.memory * stats.load[k] + (1 - self.memory) * min(seconds, OUTLIER * stats.load[k])
            else:
                stats.load[k] = seconds

    def observe_drafts(self, k: int, kept: list[int]) -> None:
        """Rows' drafts of K judged without a verify (batch/shadow.py: by the tokens plain steps gave
        them; under greedy, what a verify would have kept): the rows' acceptance, no step to rate."""
        if k > 0 and kept:
            self.acceptance.observe(k, kept)

    def _stats(self, bucket: int) -> BucketStats:
        if bucket not in self.buckets:  # (not setdefault, which built a BucketStats every call: a few us of each step's host work)
            self.buckets[bucket] = BucketStats(self.acceptance, plain_try_steps=self.plain_try_steps)
        return self.buckets[bucket]
