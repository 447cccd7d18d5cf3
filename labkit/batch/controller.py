"""How many tokens a batch drafts per row: K chosen per batch, by measured throughput.

At batch 1 a verify of K+1 tokens costs about one decode step, so drafting pays; as the batch
grows the step turns from reading weights to computing, a verify of K+1 tokens per row costs more,
and past some batch size drafting stops paying (batched speculation's crossover). Where exactly
depends on the device, the kernels, the host's own per-row work and the acceptance the prompts
allow, so this controller measures instead of modelling: per rows bucket (1, 2, 4, ...) it keeps
an exponential average of tokens per second for each candidate K (0 = plain steps), tries every
candidate a few times first, then takes the best, and tries another every `explore_every` steps
so that the averages follow the load. A K choice never changes the output (greedy verification),
only its speed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BucketStats:
    rate: dict[int, float] = field(default_factory=dict)  # K -> EMA of tokens per second
    tries: dict[int, int] = field(default_factory=dict)  # K -> steps taken with it
    steps: int = 0


class BatchKController:
    def __init__(self, k_max: int, candidates: list[int] | None = None, warm: int = 3, explore_every: int = 16, ema: float = 0.3) -> None:
        self.k_max = k_max
        self.candidates = sorted(set(candidates if candidates is not None else [0, max(1, k_max // 2), k_max]))
        self.warm, self.explore_every, self.ema = warm, explore_every, ema
        self.buckets: dict[int, BucketStats] = {}

    def choose(self, bucket: int) -> int:
        """The K for a step of this many rows (rounded up to its bucket)."""
        stats = self.buckets.setdefault(bucket, BucketStats())
        stats.steps += 1
        untried = [k for k in self.candidates if stats.tries.get(k, 0) < self.warm]
        if untried:
            return untried[0]
        if stats.steps % self.explore_every == 0:  # the least tried other candidate
            best = self.best(bucket)
            return min((k for k in self.candidates if k != best), key=lambda k: stats.tries.get(k, 0), default=best)
        return self.best(bucket)

    def best(self, bucket: int) -> int:
        rate = self.buckets[bucket].rate
        return max(self.candidates, key=lambda k: rate.get(k, 0.0))

    def observe(self, bucket: int, k: int, tokens: int, seconds: float) -> None:
        """A step of this bucket drafted with K gave `tokens` new tokens (all rows) in `seconds`."""
        if seconds <= 0:
            return
        stats = self.buckets.setdefault(bucket, BucketStats())
        rate = tokens / seconds
        old = stats.rate.get(k)
        stats.rate[k] = rate if old is None else (1 - self.ema) * old + self.ema * rate
        stats.tries[k] = stats.tries.get(k, 0) + 1
