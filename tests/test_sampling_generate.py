"""The sampling guarantee through `generate` itself: speculative sampling at temperature 0.8 with
top-k and top-p emits the target's own distribution over whole continuations, every position
counted, the bonus token included (4 new tokens: the first from the prompt's pass, then K = 2
drafts; when both are accepted the fourth token is the bonus).

The expected probabilities come from an independent path: transformers' forward for the logits
and a plain-Python temperature / top-k / top-p here, enumerated over every continuation the
warped distribution allows. A chi-square goodness-of-fit test (scipy) at n draws judges the
sampled frequencies; two deliberately broken rules, in test-local subclasses, fail it.
"""

import collections
import math

import pytest
import torch
from scipy.stats import chisquare

from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.generate import Speculation, generate
from labkit.models.tiny import tiny_hf_model
from labkit.specdec import ModelDrafter
from labkit.specdec.draft import Draft, Drafter
from labkit.specdec.policies import RejectionSampling, Verdict

TEMPERATURE, TOP_K, TOP_P = 0.8, 3, 0.9
PROMPT = [5, 6, 7]
K, NEW = 2, 4  # the first new token comes from the prompt's pass, then K drafts and the bonus
DRAWS = 1500
TREE_DRAWS = 800  # a tree's steps cost more; 800 separate the right rule (p 0.95) from the broken ones (p < 1e-9) here
ALPHA = 1e-3  # a correct sampler fails one run in a thousand (the seeds are fixed: it passes or fails for good)


def warped_probs(logits: list[float]) -> dict[int, float]:
    """Temperature, then the TOP_K largest, then the smallest set whose mass reaches TOP_P (the
    top token always kept), renormalised: {token: probability}. Written apart from labkit."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])[:TOP_K]
    weights = [math.exp((logits[i] - logits[order[0]]) / TEMPERATURE) for i in order]
    total = sum(weights)
    kept, mass = {}, 0.0
    for token, w in zip(order, weights, strict=True):
        if kept and mass >= TOP_P:
            break
        kept[token] = w / total
        mass += w / total
    norm = sum(kept.values())
    return {t: p / norm for t, p in kept.items()}


def exact_distribution(hf) -> dict[tuple[int, ...], float]:
    """Every NEW-token continuation of PROMPT the warped target allows, with its probability."""
    out = {(): 1.0}
    with torch.no_grad():
        for _ in range(NEW):
            longer = {}
            for seq, prob in out.items():
                logits = hf(torch.tensor([PROMPT + list(seq)])).logits[0, -1].tolist()
                for token, p in warped_probs(logits).items():
                    longer[(*seq, token)] = prob * p
            out = longer
    return out


def chi_square_p(samples: list[tuple[int, ...]], expected: dict[tuple[int, ...], float]) -> float:
    """p-value of the samples against `expected`; a sample outside its support gives 0. Cells
    expecting fewer than 5 draws are pooled (the chi-square approximation needs it)."""
    if any(s not in expected for s in samples):
        return 0.0
    n = len(samples)
    big = [s for s, p in expected.items() if p * n >= 5]
    observed = [sum(1 for x in samples if x == s) for s in big]
    want = [expected[s] * n for s in big]
    rest = n - sum(observed)
    if n - sum(want) > 1e-9:
        observed.append(rest)
        want.append(n - sum(want))
    return float(chisquare(observed, want).pvalue)


class IgnoresTopKAndTopP(RejectionSampling):
    """Wrong: judges the drafts against the target at the temperature alone (no top-k, no top-p)."""

    def accept(self, draft_tokens, draft_probs, target_logits, config, generator):  # type: ignore[no-untyped-def]
        from dataclasses import replace

        return super().accept(draft_tokens, draft_probs, target_logits, replace(config, top_k=0, top_p=1.0), generator)


class BonusFromTheLastDraftRow(RejectionSampling):
    """Wrong: after every draft is accepted, samples the bonus from the target's row for the last
    draft (p_{K-1}) instead of the row after it (p_K)."""

    def accept(self, draft_tokens, draft_probs, target_logits, config, generator):  # type: ignore[no-untyped-def]
        verdict = super().accept(draft_tokens, draft_probs, target_logits, config, generator)
        if verdict.accepted < len(draft_tokens):
            return verdict
        from labkit.sampling import target_probs

        p = target_probs(target_logits[len(draft_tokens) - 1], config)  # (V,)
        return Verdict(verdict.accepted, int(torch.multinomial(p, 1, generator=generator)))


@pytest.fixture(scope="module")
def setup():
    hf = tiny_hf_model("llama", seed=5)
    target = Engine.from_hf(hf, "cpu", "float32")
    draft = tiny_hf_model("llama", seed=5)  # the target's weights plus noise: some drafts accepted, some not
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(7)))
    drafter = ModelDrafter(Engine.from_hf(draft, "cpu", "float32"), 96, name="noisy-copy")
    return target, drafter, exact_distribution(hf)


def draws(target: Engine, spec: Speculation | None, n: int = DRAWS) -> tuple[list[tuple[int, ...]], int, int]:
    """n seeded requests: their continuations, and how many bonus tokens and rejections they had."""
    samples, bonus, rejected = [], 0, 0
    for seed in range(n):
        cfg = GenerationConfig(max_new_tokens=NEW, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P, seed=seed, stop_at_eos=False)
        result = generate(target, PROMPT, cfg, spec)
        samples.append(tuple(result.tokens))
        if spec is not None:
            steps = list(zip(result.stats.accepted_lengths, result.stats.drafted_lengths, strict=True))
            bonus += sum(1 for a, d in steps if a == d)  # every draft accepted: the bonus token
            rejected += sum(1 for a, d in steps if a < d)
    return samples, bonus, rejected


def test_the_exact_distribution_is_a_distribution_over_a_small_support(setup) -> None:
    expected = setup[2]
    assert abs(sum(expected.values()) - 1) < 1e-9
    assert 4 <= len(expected) <= TOP_K**NEW  # top-k and top-p really cut the 96-token vocabulary


def test_speculative_sampling_through_generate_follows_the_target(setup) -> None:
    target, drafter, expected = setup
    samples, bonus, rejected = draws(target, Speculation(drafter, K))
    assert bonus > DRAWS // 4 and rejected > DRAWS // 4  # both paths taken often
    assert chi_square_p(samples, expected) > ALPHA


def test_plain_sampling_through_generate_follows_the_target(setup) -> None:
    target, _, expected = setup
    samples, _, _ = draws(target, None, DRAWS // 2)
    assert chi_square_p(samples, expected) > ALPHA


@pytest.mark.parametrize("wrong", [IgnoresTopKAndTopP(), BonusFromTheLastDraftRow()], ids=lambda w: type(w).__name__)
def test_the_distribution_test_catches_broken_rules(setup, wrong: RejectionSampling) -> None:
    target, drafter, expected = setup
    samples, _, _ = draws(target, Speculation(drafter, K, policy=wrong), DRAWS // 3)
    assert chi_square_p(samples, expected) < ALPHA


class TopTree(Drafter):
    """A tree of one-hot drafts from the target itself (transformers): the 2 likeliest tokens,
    each followed by its likeliest next one (nodes 0, 1 under the root; 2 under 0, 3 under 1).
    Its drafts are often in the warped support and often rejected there."""

    name = "top-tree"

    def __init__(self, hf) -> None:
        self.hf = hf

    @torch.no_grad()
    def propose(self, context, k, config, generator):  # type: ignore[no-untyped-def]
        first = self.hf(torch.tensor([context])).logits[0, -1].topk(2).indices.tolist()
        second = [int(self.hf(torch.tensor([context + [t]])).logits[0, -1].argmax()) for t in first]
        return Draft(first + second, parents=[-1, -1, 0, 1])


class TriesEveryChildAgainstTheFullDistribution(RejectionSampling):
    """Wrong: a child tried after a rejection stands with p(x), not r(x) / sum(r), and the next
    token is drawn from p (the rejected children's mass is never taken out)."""

    def accept_tree(self, tree, tokens, target_logits, config, generator):  # type: ignore[no-untyped-def]
        from labkit.sampling import target_probs

        p = target_probs(target_logits, config).float()
        u = iter(torch.rand(p.shape[0] + 1, generator=generator).tolist())
        kids, node, path = tree.children(), 0, []
        while True:
            for child in kids[node]:
                if next(u) < float(p[node, tokens[child]]):
                    break
            else:
                return path, int(torch.multinomial(p[node], 1, generator=generator))
            path.append(child)
            node = child


def test_tree_speculative_sampling_follows_the_target(setup) -> None:
    """Multi-draft rejection over a token tree (RejectionSampling.accept_tree): sibling tried after
    a rejection, the residual draw and the bonus after a leaf all taken, and the continuations
    follow the target; the same tree with the residual left out fails."""
    target, _, expected = setup
    hf = tiny_hf_model("llama", seed=5)
    samples, paths = [], collections.Counter()
    for seed in range(TREE_DRAWS):
        cfg = GenerationConfig(max_new_tokens=NEW, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P, seed=seed, stop_at_eos=False)
        result = generate(target, PROMPT, cfg, Speculation(TopTree(hf), K))
        samples.append(tuple(result.tokens))
        paths.update(tuple(path) for _, _, path in result.stats.tree_steps)
    # the first child and its leaf (then the bonus), the second child after the first's rejection, and none (the residual draw)
    assert min(paths[(0, 2)], paths[(1,)] + paths[(1, 3)], paths[()]) > TREE_DRAWS // 50, paths
    assert chi_square_p(samples, expected) > ALPHA
    wrong, _, _ = draws(target, Speculation(TopTree(hf), K, policy=TriesEveryChildAgainstTheFullDistribution()), TREE_DRAWS // 3)
    assert chi_square_p(wrong, expected) < ALPHA
