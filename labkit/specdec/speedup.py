"""The speedup model of speculative decoding (Leviathan et al. 2023), fitted to measured costs.

Terms: alpha, the chance that one draft token stands (independent per token); K, draft tokens
per step; c, the cost of one draft step relative to one target step; v(K), the cost of a verify
of K+1 tokens relative to one plain target step (1 in the paper; measured here, often more on a
CPU, where K+1 rows cost more than one).

    tokens per step   E(alpha, K) = (1 - alpha^(K+1)) / (1 - alpha)        (K+1 when alpha = 1)
    speedup           S = E(alpha, K) / (K * c + v(K))

E(0.8, 4) = (1 - 0.8^5) / 0.2 = 3.3616: with free drafts and a verify as cheap as a step, 3.36x.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens emitted per target step: accepted drafts plus the target's own token."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def predicted_speedup(alpha: float, c: float, k: int, v: float = 1.0) -> float:
    """Speedup over plain decoding: E(alpha, K) / (K * c + v)."""
    return expected_tokens(alpha, k) / (k * c + v)


def predicted_mixed_speedup(alpha: float, c: float, k: float, v: float, draft_share: float) -> float:
    """The same model when only a share of the steps draft (an n-gram drafter without a match
    leaves a plain step: one token for one step's cost), with k the mean draft length when it drafts.
    E(alpha, k) is evaluated at a fractional k by the same closed form."""
    tokens = (1.0 - alpha ** (k + 1)) / (1.0 - alpha) if alpha < 1 else k + 1.0
    return (draft_share * tokens + (1 - draft_share)) / (draft_share * (k * c + v) + (1 - draft_share))


def alpha_from_steps(accepted_lengths: list[int], drafted_lengths: list[int]) -> float:
    """Per-token acceptance alpha (maximum likelihood under the independence assumption): every
    step saw `accepted` successes, then one failure unless the whole draft stood."""
    hits = sum(accepted_lengths)
    trials = hits + sum(1 for a, d in zip(accepted_lengths, drafted_lengths, strict=True) if d > 0 and a < d)
    return hits / trials if trials else 0.0


@dataclass
class FittedCosts:
    step_s: float  # one plain decode step
    draft_s_per_token: float  # one draft step
    verify_v0: float  # verify(K) / step = v0 + v1 * K (least squares over the measured widths)
    verify_v1: float

    @property
    def c(self) -> float:
        return self.draft_s_per_token / self.step_s

    def v(self, k: int) -> float:
        return self.verify_v0 + self.verify_v1 * k


def fit_costs(rows: list[dict[str, Any]]) -> dict[str, FittedCosts]:
    """Per drafter, from sweep rows (one per run): the plain step time, the draft time per drafted
    token and the verify time per step as a line in K, all measured in the same run."""
    plain = [r for r in rows if r["drafter"] == "plain"]
    step_s = statistics.fmean(r["verify_s"] / max(1, r["target_steps"]) for r in plain)
    out = {}
    for drafter in dict.fromkeys(r["drafter"] for r in rows if r["drafter"] != "plain"):
        sel = [r for r in rows if r["drafter"] == drafter and r["drafted_tokens"] > 0]
        if not sel:
            continue
        draft = sum(r["draft_s"] for r in sel) / sum(r["drafted_tokens"] for r in sel)
        points = []  # (draft length, verify cost in plain steps), plain steps of the same run taken out
        for r in sel:
            drafting = r["draft_share"] * r["target_steps"]
            plain_steps = r["target_steps"] - drafting
            points.append((r["mean_drafted"], max(r["verify_s"] / step_s - plain_steps, 0.0) / max(drafting, 1e-9)))
        mk = statistics.fmean(k for k, _ in points)
        mv = statistics.fmean(v for _, v in points)
        var = sum((k - mk) ** 2 for k, _ in points)
        slope = sum((k - mk) * (v - mv) for k, v in points) / var if var else 0.0
        out[drafter] = FittedCosts(step_s, draft, mv - slope * mk, slope)
    return out


def compare(rows: list[dict[str, Any]], tolerance: float = 0.15) -> list[dict[str, Any]]:
    """Predicted against measured speedup for every (drafter, K) the sweep ran with a fixed K and a
    lossless policy, with why the prediction misses where it misses by more than `tolerance`."""
    costs = fit_costs(rows)
    out = []
    keys = dict.fromkeys((r["drafter"], r["k"]) for r in rows if r["drafter"] != "plain" and r.get("controller", "fixed") == "fixed"
                         and r.get("lossless", True))
    for drafter, k in keys:
        sel = [r for r in rows if r["drafter"] == drafter and r["k"] == k and r.get("controller", "fixed") == "fixed" and r.get("lossless", True)]
        if drafter not in costs:
            continue
        fit = costs[drafter]
        drafting = [r for r in sel if r["drafted_tokens"] > 0] or sel
        weight = sum(r["drafted_tokens"] for r in drafting) or 1
        alpha = sum(r["alpha"] * r["drafted_tokens"] for r in drafting) / weight
        mean_drafted = statistics.fmean(r["mean_drafted"] for r in drafting)
        draft_share = statistics.fmean(r["draft_share"] for r in sel)
        textbook = predicted_speedup(alpha, fit.c, k, fit.v(k))  # every step drafts K
        predicted = predicted_mixed_speedup(alpha, fit.c, mean_drafted, fit.v(round(mean_drafted)), draft_share)
        measured = statistics.fmean(r["decode_speedup"] for r in sel)  # the model says nothing of the prefill
        error = predicted / measured - 1 if measured else float("inf")
        reasons = []
        if abs(error) > tolerance:
            if abs(textbook / measured - 1) > abs(error) + 0.05:
                reasons.append(f"the textbook form (every step drafts K) would say {textbook:.2f}x: here {1 - draft_share:.0%} of the steps "
                               f"had no draft and drafts averaged {mean_drafted:.1f} tokens, which the fitted form takes in")
            other = statistics.fmean(r["other_s"] / r["seconds"] for r in sel if r["seconds"] > 0)
            if other > 0.1:
                reasons.append(f"bookkeeping outside draft and verify takes {other:.0%} of the time")
            if not reasons:
                reasons.append("acceptance is not independent per token (alpha varies along the draft and between prompts)")
        out.append({"drafter": drafter, "k": k, "alpha": alpha, "c": fit.c, "v": fit.v(k), "mean_drafted": mean_drafted,
                    "draft_share": draft_share, "textbook_speedup": textbook, "predicted_speedup": predicted, "measured_speedup": measured, "error": error,
                    "miss": abs(error) > tolerance, "why": "; ".join(reasons)})
    return out
