"""The speedup model of `labkit bench batch`: where batched speculation stops paying, predicted
from its parts.

Terms. tau(B): tokens per row per step that speculation gave at batch B. A *plain step* over B busy
rows and a *drafting step* (K drafts per row) are timed as the scheduler takes them, each over a
few dozen steps of their own, apart from the runs whose speed-up they predict:
- a plain step is launched ahead (scheduler.py), so it costs the larger of the device's step and
  the host's per-row work;
- a drafting step waits for its verdict before the next proposal, so it costs the verify of K+1
  tokens per row plus the host's drafting and accepting.
The model predicts tau(B) x t_plain(B) / t_draft(B). The device's share alone (a step of K+1
tokens per row over a step of one, `verify_over_step`) is kept beside it: at batch 1-4 it is near
1 on a GPU, and the host's work, not the device's, decides where speculation stops paying.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from labkit.batch.engine import BatchEngine
from labkit.batch.scheduler import ContinuousBatcher
from labkit.config import GenerationConfig
from labkit.errors import LabkitError
from labkit.metrics.timers import now
from labkit.specdec.draft import Drafter

WARM_STEPS = 2  # untimed steps before the timed ones: first passes, the first step in flight


def device_step_times(batch: BatchEngine, prompts: list[list[int]], widths: list[int], repeats: int = 5) -> dict[int, float]:
    """Seconds per batched step of each width (tokens per row) with every slot busy, read at once:
    median of `repeats`, each slot rolled back after every step so that the context stays put."""
    device = batch.engine.device
    for p in prompts[: batch.free]:
        batch.admit(p)
    n = batch.active
    starts = batch.lengths[:n]
    out = {}
    for width in widths:
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            t0 = now(device)
            batch.verify([[1] * width for _ in range(n)])
            times.append(now(device) - t0)
            for slot in range(n):
                batch.rollback(slot, starts[slot])
        out[width] = statistics.median(times[1:])
    while batch.active:
        batch.release(batch.active - 1)
    return out


def scheduler_step_time(batch: BatchEngine, prompts: list[list[int]], k: int, new_drafter: Callable[[], Drafter] | None,
                        steps: int = 24) -> float:
    """Mean seconds of a ContinuousBatcher step over every slot busy with one of `prompts`:
    plain (k 0, launched ahead as the scheduler launches them) or drafting K by `new_drafter`.
    EOS is blocked and no request ends inside the timed steps; fewer steps where the slots have
    less room for them."""
    asks = prompts[: batch.free]
    room = batch.cfg.max_seq_len - max(len(p) for p in asks) - 1
    steps = min(steps, room // (k + 1) - WARM_STEPS)
    if steps < 1:
        raise LabkitError(f"a slot of {batch.cfg.max_seq_len} positions leaves no room to time steps of K {k} after these prompts")
    new = (WARM_STEPS + steps) * (k + 1) + 1
    batcher = ContinuousBatcher(batch, new_drafter if k else None, k)
    requests = [batcher.submit(p, GenerationConfig(max_new_tokens=new, min_new_tokens=new)) for p in asks]
    for _ in range(WARM_STEPS):
        batcher.step()
    t0 = now(batch.engine.device)
    for _ in range(steps):
        batcher.step()
    seconds = (now(batch.engine.device) - t0) / steps  # the step in flight at the end finished inside
    for r in requests:
        batcher.cancel(r)
    batcher.step()  # nothing left to step: the step in flight is dropped
    assert batch.active == 0 and not batcher.busy
    return seconds


def step_costs(batch: BatchEngine, prompts: list[list[int]], k: int, new_drafter: Callable[[], Drafter]) -> dict[str, float]:
    """What the model reads at one batch size: the scheduler's plain and K-drafting steps, and the device's steps of 1 and K+1 tokens."""
    device = device_step_times(batch, prompts, [1, k + 1])
    return {"plain_step": scheduler_step_time(batch, prompts, 0, None), "spec_step": scheduler_step_time(batch, prompts, k, new_drafter),
            "device_step": device[1], "device_verify": device[k + 1]}


def predicted_speedups(rows: list[dict[str, Any]], costs: dict[int, dict[str, float]], k: int) -> list[dict[str, Any]]:
    """The speedup model per batch size: tau(B) x t_plain(B) / t_draft(B), beside the measured ratio."""
    out = []
    for size, t in sorted(costs.items()):
        plain = next(r for r in rows if r["batch"] == size and r["system"] == "plain")
        spec = next(r for r in rows if r["batch"] == size and r["system"] == f"ngram-{k}")
        out.append({"batch": size, "tau": spec["tau"], **t,
                    "spec_over_plain_step": t["spec_step"] / t["plain_step"], "verify_over_step": t["device_verify"] / t["device_step"],
                    "predicted_speedup": spec["tau"] * t["plain_step"] / t["spec_step"],
                    "measured_speedup": spec["aggregate_tok_per_s"] / plain["aggregate_tok_per_s"]})
    return out


def crossover(model: list[dict[str, Any]], key: str) -> int | None:
    """The first batch size where speculation stops paying (None: it pays at every size)."""
    return next((m["batch"] for m in model if m[key] < 1.0), None)
