"""Replay: K controllers against a recorded acceptance oracle, without the machine's noise.

Under greedy decoding with a drafter whose proposal depends only on the context (n-gram lookup,
a draft model), how many of K draft tokens stand at output position i depends only on i: every
lossless run writes the plain greedy output, so the context there is always prompt + output[:i].
One plain run per prompt plus one proposal of K max tokens per position therefore records, for
every position and every K at once, the draft offered and how much of it stands (`PromptOracle`).

A controller then replays against the oracle step by step, as the generate loop would drive it:
next_k(), a draft of min(K, offered, room) tokens, update() with what stood. Each step costs the
verify seconds measured on this device for its width (`Engine.time_verify`), scaled to the
prompt's measured plain step time (a longer context makes every step slower alike), plus the
drafter's measured seconds per draft token. Every controller meets the same tokens and the same
costs, so the comparison has none of the run-to-run noise that on a shared CPU is 10-20% over
minutes, more than the gap between good and best K choices.

What comes out is a model of time built from measured parts, not a measured speed: the sweep
measures. Replay answers "which K choices are better", the sweep "how fast is it here".
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.engine_warmup import time_verify
from labkit.errors import LabkitError
from labkit.generate import generate
from labkit.specdec.controllers import Controller, make_controller
from labkit.specdec.draft import Drafter


def replayable(drafter: Drafter) -> bool:
    """Whether the drafter's proposal depends on the context alone (n-gram lookup, a draft model)."""
    return drafter.replayable


@dataclass
class PromptOracle:
    prompt_id: str
    category: str
    new_tokens: int  # the plain output's length
    prefill_s: float  # measured: prompt to first token
    step_s: float  # measured: plain decode seconds per token after the first
    offered: list[int]  # (new_tokens,) draft tokens the drafter offers at position i (<= k_max)
    standing: list[int]  # (new_tokens,) how many of them match the plain output from position i
    draft_s_per_token: float  # measured while recording


def record_oracle(engine: Engine, drafter: Drafter, prompt_id: str, category: str, prompt_ids: list[int], k_max: int,
                  config: GenerationConfig) -> PromptOracle:
    """One plain greedy run, then the drafter's K max proposal at every output position."""
    if config.temperature != 0:
        raise LabkitError("replay needs greedy decoding (temperature 0): only then is the output fixed")
    if not replayable(drafter):
        raise LabkitError(f"replay needs a drafter whose proposal depends only on the context (ngram, model), got {drafter.name}")
    plain = generate(engine, prompt_ids, config)
    out = plain.tokens
    drafter.start(list(prompt_ids), len(prompt_ids) + len(out))
    offered, standing = [], []
    draft_s = 0.0
    for i in range(len(out)):
        t0 = time.perf_counter()
        proposal = drafter.propose(list(prompt_ids) + out[:i], k_max, config, None).tokens[:k_max]
        draft_s += time.perf_counter() - t0
        stand = 0
        while stand < len(proposal) and i + stand < len(out) and proposal[stand] == out[i + stand]:
            stand += 1
        offered.append(len(proposal))
        standing.append(stand)
    steps = max(len(out) - 1, 1)
    return PromptOracle(prompt_id, category, len(out), plain.stats.ttft_s, (plain.stats.total_s - plain.stats.ttft_s) / steps,
                        offered, standing, draft_s / max(sum(offered), 1))


def replay(oracle: PromptOracle, controller: Controller, verify_s: dict[int, float]) -> dict[str, Any]:
    """Drive one request's steps through the oracle. verify_s: seconds of a verify of K drafts,
    K = 0..k_max (K = 0: a plain step), measured on this device."""
    scale = oracle.step_s / verify_s[0]  # this prompt's context makes every width slower alike
    seconds, i = oracle.prefill_s, 1  # the first token comes with the prefill
    k_trace: list[int] = []
    accepted: list[int] = []
    controller.reset()
    while i < oracle.new_tokens:
        k = min(controller.next_k(), oracle.new_tokens - i - 1)
        drafted = min(k, oracle.offered[i])
        if k >= 1:
            k_trace.append(k)
        if drafted == 0:  # nothing offered (or no room): a plain step
            seconds += verify_s[0] * scale
            i += 1
            continue
        stood = min(oracle.standing[i], drafted)
        draft_s = drafted * oracle.draft_s_per_token
        step_s = verify_s[drafted] * scale
        seconds += draft_s + step_s
        controller.update(drafted, stood, draft_s, step_s)
        accepted.append(stood)
        i += stood + 1
    return {"prompt_id": oracle.prompt_id, "category": oracle.category, "new_tokens": oracle.new_tokens, "seconds": seconds,
            "tok_per_s": oracle.new_tokens / seconds, "k_trace": k_trace, "accepted_lengths": accepted}


def replay_suite(oracles: list[PromptOracle], controllers: Mapping[str, Callable[[], Controller]], verify_s: dict[int, float],
                 passes: int = 2) -> dict[str, Any]:
    """Every controller over every prompt in order, `passes` times (the sweep keeps one controller
    per setup across requests; the last pass is reported, after the first has warmed it).
    Per category: each controller's tok/s (mean over prompts) and its ratio to the best fixed K."""
    if passes < 1:
        raise LabkitError(f"passes must be at least 1, got {passes}")
    rows: list[dict[str, Any]] = []
    for name, make in controllers.items():
        controller = make()
        if controller.wants_costs:
            controller.calibrate({k: verify_s[k] for k in range(controller.wants_costs + 1)})
        for it in range(passes):
            for oracle in oracles:
                row = replay(oracle, controller, verify_s)
                if it == passes - 1:
                    rows.append({"controller": name, **row})
    fixed = [n for n in controllers if n.startswith("fixed")]
    per_category = []
    for cat in dict.fromkeys(o.category for o in oracles):
        means = {n: statistics.fmean(r["tok_per_s"] for r in rows if r["controller"] == n and r["category"] == cat) for n in controllers}
        best = max(fixed, key=lambda n: means[n]) if fixed else None
        per_category.append({"category": cat, "tok_per_s": means, "best_fixed": best,
                             "ratio_to_best_fixed": {n: means[n] / means[best] for n in controllers} if best else {}})
    overall = {n: statistics.fmean(r["tok_per_s"] for r in rows if r["controller"] == n) for n in controllers}
    return {"rows": rows, "per_category": per_category, "overall": overall}


def replay_setups(target: Engine, drafters: list[Drafter], prompts: list[tuple[Any, list[int]]], config: GenerationConfig,
                  controllers: dict[str, list[int]], passes: int = 2) -> dict[str, Any]:
    """For each drafter that replay supports: record its oracle on every prompt, time the verify
    widths once, and replay every controller at every K it runs (controllers: name -> Ks; for the
    adaptive ones K is K max). Drafters it cannot replay are listed under "skipped"."""
    out: dict[str, Any] = {"passes": passes, "skipped": [], "drafters": {}}
    k_max = max(k for ks in controllers.values() for k in ks)
    for drafter in drafters:
        if not replayable(drafter):
            out["skipped"].append(drafter.name)
            continue
        oracles = [record_oracle(target, drafter, p.id, p.category, ids, k_max, config) for p, ids in prompts]
        verify_s = time_verify(target, k_max)
        makers = {f"{c}-{k}": partial(make_controller, c, k) for c, ks in controllers.items() for k in ks}
        result = replay_suite(oracles, makers, verify_s, passes)
        out["drafters"][drafter.name] = {"verify_s": verify_s, **result}
    return out
