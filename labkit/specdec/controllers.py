"""K controllers: how many tokens to draft next. Each keeps K in [1, k_max]; the cost-aware one,
calibrated, may also answer 0 (a plain step) where no draft pays by its measured costs.

The loop calls `reset()` at the start of a request, `next_k()` before each draft, and
`update(drafted, accepted, draft_s, verify_s)` after each verify (seconds as the host saw them;
the verify includes the policy's device sync, so it is the step's real cost). A controller that
wants the device's verify cost per width says so in `wants_costs` (the widest K it needs, else 0),
and the loop times them once (`Engine.time_verify`) and hands the table to `calibrate`.
"""

from __future__ import annotations

from labkit.config import CONTROLLERS
from labkit.errors import LabkitError
from labkit.specdec.speedup import expected_tokens


class Controller:
    """The base: no verify costs wanted, nothing to reset."""

    name = "controller"
    k_max = 1
    wants_costs = 0  # the widest K whose verify cost the controller wants timed (0: none)

    def calibrate(self, verify_s: dict[int, float]) -> None:
        """Verify seconds for K = 0..wants_costs drafts, measured on this device."""

    def reset(self) -> None:
        """A new request starts."""

    def next_k(self) -> int:
        raise NotImplementedError

    def update(self, drafted: int, accepted: int, draft_s: float, verify_s: float) -> None:
        """What the last step drafted, how many stood, and what drafting and verifying cost."""


def _check(k: int, k_max: int) -> None:
    if not 1 <= k <= k_max:
        raise LabkitError(f"K must be in [1, {k_max}], got {k}")


class FixedK(Controller):
    name = "fixed"

    def __init__(self, k: int) -> None:
        _check(k, k)
        self.k_max = k

    def next_k(self) -> int:
        return self.k_max


class HeuristicK(Controller):
    """transformers' assisted-generation schedule: +2 after a draft accepted in full, -1 otherwise."""

    name = "heuristic"

    def __init__(self, k_max: int, k_start: int = 4) -> None:
        self.k_max, self.k_start = k_max, min(k_start, k_max)
        _check(self.k_start, k_max)
        self.k = self.k_start

    def reset(self) -> None:
        self.k = self.k_start

    def next_k(self) -> int:
        return self.k

    def update(self, drafted: int, accepted: int, draft_s: float, verify_s: float) -> None:
        self.k = min(self.k_max, self.k + 2) if accepted == drafted else max(1, self.k - 1)


class AIMD(Controller):
    """Additive increase (+1 after a full accept), multiplicative decrease (K * beta after a rejection)."""

    name = "aimd"

    def __init__(self, k_max: int, k_start: int = 2, beta: float = 0.5) -> None:
        if not 0 < beta < 1:
            raise LabkitError(f"AIMD needs 0 < beta < 1, got {beta}")
        self.k_max, self.k_start, self.beta = k_max, min(k_start, k_max), beta
        _check(self.k_start, k_max)
        self.k = float(self.k_start)

    def reset(self) -> None:
        self.k = float(self.k_start)

    def next_k(self) -> int:
        return max(1, min(self.k_max, int(self.k)))

    def update(self, drafted: int, accepted: int, draft_s: float, verify_s: float) -> None:
        self.k = min(float(self.k_max), self.k + 1) if accepted == drafted else max(1.0, self.k * self.beta)


PROBE_BACKOFF = 4  # CostAware's longest wait between probes, in units of probe_every


class CostAware(Controller):
    """Picks the K that maximises expected tokens per second (Leviathan et al.):

        tokens(alpha, K) = (1 - alpha^(K+1)) / (1 - alpha)
        time(K)          = K * draft_per_token + verify(K)
        K*               = argmax_K tokens / time

    alpha, the chance that one draft token stands, is an EMA over the request's draft tokens
    (each step observes `accepted` successes and one failure unless all stood), kept apart for
    two states: after a step whose every draft stood, and otherwise. Acceptance comes in runs (a
    lookup that copies a passage keeps copying; after a miss it often misses again), so the step
    after a full accept drafts with that state's alpha, usually higher, and one after a miss with
    the other's. Each state learns from every step taken in it, whatever K it drafted. Both
    restart from the last request's estimates with the weight of one draft token; a request starts
    in the "otherwise" state. Draft seconds per token are an EMA too. Costs carry over between
    requests: they belong to the device.

    verify(K) is measured on this device. With `calibrate` (generate does it before the first
    request, `Engine.time_verify`): a table of verify seconds per width, medians of a few timed
    steps, times a factor that follows the live steps (context growth, the policy, the host). A
    factor, not an added offset: attention's work grows with the context for every row a verify
    runs, so a long context makes the wide verifies dearer, not only every step alike (2-core
    Sapphire Rapids, GGUF blocks: a 2-token verify 1.27 one-token steps at 40 tokens of context,
    1.39 at 2,048; the table plus an offset learnt from live steps put it at 1.13, and n-gram
    lookup at 2,048 prompt tokens drafted where it lost: 0.92x plain decode). One
    step's time is noisy (a CPU step jitters by more than the cost of one more token), so a shape
    fitted from live steps alone mistakes noise for slope; with the table, live noise moves every
    width alike and cannot tip K. With the table K=0 is a candidate too (one token at verify(0),
    a plain step): where no draft pays (a CPU, where a verify of 2 tokens costs about 1.2 plain
    steps, on text that lookup cannot copy) the request decodes plainly, and after `probe_every`
    plain steps in a row it drafts one token instead, since plain steps teach nothing of alpha. A
    probe that keeps nothing doubles the wait for the next (up to PROBE_BACKOFF times
    `probe_every`); one that keeps a token, or a step that drafts by choice, resets it, and a new
    request probes at its first plain step (new text: the last request's alpha is only a prior). A probe
    costs what a verify of two tokens and a draft cost (on a 2-core CPU at 2,048 tokens of context
    with EAGLE, two plain steps): probing every sixth plain step lost 12% where no draft stood.

    Without a table, verify(K) is a line fitted to the widths seen in the last `fresh` steps,
    and every `probe_every` steps the controller tries the width next to its choice to keep a
    fresh neighbour to compare with (a width seen long ago, in a shorter context, is stale)."""

    name = "cost"

    def __init__(self, k_max: int, ema: float = 0.3, alpha_prior: float = 0.5, k_start: int = 2,
                 fresh: int = 24, probe_every: int = 6) -> None:
        if not 0 < ema <= 1 or not 0 <= alpha_prior < 1 or fresh < 1 or probe_every < 2:
            raise LabkitError(f"cost-aware needs 0 < ema <= 1, 0 <= alpha_prior < 1, fresh >= 1 and probe_every >= 2, "
                              f"got {ema}, {alpha_prior}, {fresh}, {probe_every}")
        self.k_max, self.ema, self.alpha_prior = k_max, ema, alpha_prior
        self.fresh, self.probe_every = fresh, probe_every
        self.k_start = min(k_start, k_max)
        _check(self.k_start, k_max)
        self.hits, self.trials = [alpha_prior, alpha_prior], [1.0, 1.0]  # EMA'd counts per state: alpha = hits / trials
        self.state = 0  # 1 after a step whose every draft stood, else 0
        self.draft_per_token: float | None = None
        self.verify_table: dict[int, float] | None = None  # calibrated seconds per width K = 0..k_max
        self.scale: float | None = None  # EMA of live verify seconds over the table's
        self.verify_by_k: dict[int, float] = {}  # without a table: EMA of verify seconds per width K
        self.seen_at: dict[int, int] = {}  # width -> step it was last measured
        self.steps = 0
        self.until_probe = self.probe_gap = probe_every  # plain steps (K 0) before the next probe; the wait it restarts from
        self.probing = False  # the last answer was a probe, its outcome not yet seen

    def calibrate(self, verify_s: dict[int, float]) -> None:
        """Verify seconds for K = 0..k_max drafts, measured on this device."""
        if any(k not in verify_s or not verify_s[k] > 0 for k in range(self.k_max + 1)):
            raise LabkitError(f"a verify cost table needs a positive time for every K in 0..{self.k_max}, got {sorted(verify_s)}")
        self.verify_table = {k: verify_s[k] for k in range(self.k_max + 1)}
        self.scale = None

    @property
    def wants_costs(self) -> int:  # type: ignore[override]
        """Once per controller: the costs belong to the device."""
        return self.k_max if self.verify_table is None else 0

    def reset(self) -> None:
        # the last request's alphas become this one's priors, worth one draft token each (the
        # first request starts from alpha_prior): less of each request is spent finding its level
        self.hits = [self.state_alpha(s) if self.steps else self.alpha_prior for s in (0, 1)]
        self.trials = [1.0, 1.0]
        self.state = 0
        self.until_probe, self.probe_gap = 1, self.probe_every  # new text: a probe at once if no draft pays, then the first wait
        self.probing = False

    def state_alpha(self, state: int) -> float:
        return min(self.hits[state] / self.trials[state], 0.999)

    @property
    def alpha(self) -> float:
        """The acceptance rate for the next step: its state's."""
        return self.state_alpha(self.state)

    def verify_line(self) -> tuple[float, float, float]:
        """(mean width, mean seconds, slope >= 0): the least-squares line through the widths seen
        in the last `fresh` steps (at least the two most recent ones)."""
        recent = sorted(self.seen_at, key=lambda w: -self.seen_at[w])
        fresh = [w for w in recent if self.steps - self.seen_at[w] <= self.fresh]
        seen = [(w, self.verify_by_k[w]) for w in (fresh if len(fresh) >= 2 else recent[:2])]
        if not seen:
            return 0.0, 1.0, 0.0
        n = len(seen)
        mk = sum(x for x, _ in seen) / n
        mv = sum(v for _, v in seen) / n
        var = sum((x - mk) ** 2 for x, _ in seen)
        slope = sum((x - mk) * (v - mv) for x, v in seen) / var if var else 0.0
        return mk, mv, max(slope, 0.0)

    def verify_cost(self, k: int, line: tuple[float, float, float] | None = None) -> float:
        if self.verify_table is not None:
            return max(self.verify_table[k] * (self.scale or 1.0), 1e-9)
        mk, mv, slope = line or self.verify_line()
        return max(mv + slope * (k - mk), 1e-9)

    def rate(self, k: int, line: tuple[float, float, float] | None = None) -> float:
        """Expected tokens per second at width k under the current estimates."""
        cost = k * (self.draft_per_token or 0.0) + self.verify_cost(k, line)
        return expected_tokens(self.alpha, k) / cost

    def next_k(self) -> int:
        if self.verify_table is not None:
            best = max(range(self.k_max + 1), key=self.rate)  # K 0: a plain step, one token at verify(0)
            if self.probing:  # a probe whose outcome never came (nothing drafted): a probe that kept nothing
                self._probed(kept=False)
            if best:
                self.until_probe = self.probe_gap = self.probe_every
                return best
            self.until_probe -= 1
            if self.until_probe <= 0:  # a plain step teaches nothing of alpha: probe one draft
                self.probing = True
                return 1
            return 0
        if not self.verify_by_k:
            return self.k_start
        line = self.verify_line()  # fitted once per decision
        best = max(range(1, self.k_max + 1), key=lambda k: self.rate(k, line))
        if self.steps % self.probe_every == self.probe_every - 1 and self.k_max > 1:  # probe a neighbour
            return best + 1 if best < self.k_max else best - 1
        return best

    def _probed(self, kept: bool) -> None:
        self.probing = False
        self.probe_gap = self.probe_every if kept else min(2 * self.probe_gap, PROBE_BACKOFF * self.probe_every)
        self.until_probe = self.probe_gap

    def update(self, drafted: int, accepted: int, draft_s: float, verify_s: float) -> None:
        if self.probing:
            self._probed(kept=accepted > 0)
        if not 1 <= drafted <= self.k_max:  # none, or a token tree's nodes (a tree drafter sets its own size): nothing on chains
            return
        a, s = self.ema, self.state
        failures = 0 if accepted == drafted else 1
        self.hits[s] = (1 - a) * self.hits[s] + a * accepted
        self.trials[s] = (1 - a) * self.trials[s] + a * (accepted + failures)
        self.state = 1 - failures
        per_token = draft_s / drafted
        self.draft_per_token = per_token if self.draft_per_token is None else (1 - a) * self.draft_per_token + a * per_token
        self.steps += 1
        if self.verify_table is not None:
            ratio = verify_s / self.verify_table[drafted]
            self.scale = ratio if self.scale is None else (1 - a) * self.scale + a * ratio
            return
        old = self.verify_by_k.get(drafted)
        if old is None or self.steps - 1 - self.seen_at[drafted] > self.fresh:
            self.verify_by_k[drafted] = verify_s  # first or stale measure of this width: start over
        else:
            self.verify_by_k[drafted] = (1 - a) * old + a * verify_s
        self.seen_at[drafted] = self.steps


# auto: the controller measured best on the device. On a CPU a verify of K+1 tokens costs more than
# a step per token it adds (2.1 plain steps at K=3 on a 2-core EPYC: the products turn
# compute-bound), so a fixed K that pays on a GPU loses there; the cost-aware controller drafts
# what pays by the measured verify costs: 1.01-1.06x plain for every drafter against 0.57-0.99x at
# a fixed K (results/sweep-cpu-20261201-201300.json, AVX2 build). On a GPU fixed K is what was measured best.
AUTO_CONTROLLER = {"cpu": "cost"}


def controller_name(name: str, device_type: str) -> str:
    """The controller a name means on this kind of device (auto: AUTO_CONTROLLER's, else fixed)."""
    return AUTO_CONTROLLER.get(device_type, "fixed") if name == "auto" else name


def make_controller(name: str, k_max: int, device_type: str = "cpu") -> Controller:
    """fixed (K = k_max) | heuristic | aimd | cost | auto (by the device); each stays in [1, k_max]
    (the cost-aware one, calibrated, in [0, k_max])."""
    name = controller_name(name, device_type)
    if k_max < 1:
        raise LabkitError(f"K must be at least 1, got {k_max}")
    if name == "fixed":
        return FixedK(k_max)
    if name == "heuristic":
        return HeuristicK(k_max)
    if name == "aimd":
        return AIMD(k_max)
    if name == "cost":
        return CostAware(k_max)
    raise LabkitError(f"unknown controller {name!r}: use {', '.join(CONTROLLERS)}")
