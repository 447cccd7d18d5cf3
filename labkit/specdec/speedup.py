"""The speedup model of speculative decoding (Leviathan et al. 2023), fitted to measured costs.

Terms: alpha, the chance that one draft token stands (independent per token); K, draft tokens
per step; c, the cost of one draft step relative to one target step; v(K), the cost of a verify
of K+1 tokens relative to one plain target step (1 in the paper; measured here, often more on a
CPU, where K+1 rows cost more than one).

    tokens per step   E(alpha, K) = (1 - alpha^(K+1)) / (1 - alpha)        (K+1 when alpha = 1)
    speedup           S = E(alpha, K) / (K * c + v(K))

E(0.8, 4) = (1 - 0.8^5) / 0.2 = 3.3616: with free drafts and a verify as cheap as a step, 3.36x.

Tree form (SpecInfer, Sequoia). A token tree's node of rank r among its siblings (r = 0: the
drafter's first choice) stands, given its parent stood, with chance p_r (the ranks exclude each
other: the target's token is one of them at most). A node is on the accepted path when it and
every ancestor stood, so

    tokens per step   E(tree, p) = 1 + sum over nodes n of  prod over m on the path root..n of p_rank(m)
    speedup           S = E(tree, p) / (depth * c + v(N))        (a chain with siblings drafts depth steps)

A chain is the tree with one rank, p_0 = alpha: E = 1 + alpha + ... + alpha^K, the form above.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from labkit.specdec.tree import TokenTree


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


# -- the tree form ---------------------------------------------------------------------------
def child_ranks(tree: TokenTree) -> list[int]:
    """Each node's rank among its siblings (their order in the tree; the root's is 0)."""
    ranks = [0] * tree.size
    for kids in tree.children():
        for r, c in enumerate(kids):
            ranks[c] = r
    return ranks


def expected_tree_tokens(tree: TokenTree, p: list[float]) -> float:
    """E(tree, p): tokens per step (the accepted path and the target's own token), ranks past p never stand."""
    ranks = child_ranks(tree)
    stands = [1.0] * tree.size  # chance that the node and every ancestor stood
    for n in range(1, tree.size):
        stands[n] = stands[tree.parents[n]] * (p[ranks[n]] if ranks[n] < len(p) else 0.0)
    return 1.0 + sum(stands[1:])


def rank_acceptance(tree_steps: list[tuple[int, list[int], list[int]]]) -> list[float]:
    """p_r from tree steps (GenerationStats.tree_steps: step, the draft's parents, the accepted path):
    at every node the path reached, each rank its children offer was a trial, and the rank the
    path took (if any) a success. The chain's alpha_from_steps when every node has one child."""
    hits: list[int] = []
    trials: list[int] = []
    for _, parents, path in tree_steps:
        tree = TokenTree.of_draft(parents)
        kids, ranks = tree.children(), child_ranks(tree)
        for node, taken in zip([0, *(n + 1 for n in path)], [*(n + 1 for n in path), None], strict=True):
            for r in range(len(kids[node])):
                if r >= len(trials):
                    hits.append(0)
                    trials.append(0)
                trials[r] += 1
            if taken is not None:
                hits[ranks[taken]] += 1
    return [h / t if t else 0.0 for h, t in zip(hits, trials, strict=True)]


def predicted_tree_speedup(tree: TokenTree, p: list[float], c: float, v: float) -> float:
    """Speedup over plain decoding of drafting `tree` (depth draft steps of cost c each, the
    chain's siblings for free) and verifying its N nodes (cost v, in plain steps)."""
    return expected_tree_tokens(tree, p) / (max(tree.depths()) * c + v)
