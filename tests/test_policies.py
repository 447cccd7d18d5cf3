"""Phase 2B: acceptance policies, K controllers and the speedup model."""

import copy
import math
import random

import pytest
import torch

from labkit.bench.drift import agreement, perplexity
from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.engine_warmup import time_verify
from labkit.errors import LabkitError
from labkit.generate import Speculation, generate
from labkit.models.tiny import tiny_hf_model
from labkit.specdec import make_drafter
from labkit.specdec.controllers import AIMD, CONTROLLERS, CostAware, HeuristicK, controller_name, make_controller
from labkit.specdec.policies import TopKAgreement, TypicalAcceptance, Verdict, make_policy
from labkit.specdec.speedup import alpha_from_steps, expected_tokens, predicted_speedup

PROMPT = [5, 6, 7, 8, 9, 5, 6, 7]


@pytest.fixture(scope="module")
def target() -> Engine:
    return Engine.from_hf(tiny_hf_model("llama", seed=5), "cpu", "float32")


# --- the speedup model -----------------------------------------------------------------------

def test_speedup_model_reproduces_the_textbook_values() -> None:
    assert expected_tokens(0.8, 4) == pytest.approx((1 - 0.8**5) / 0.2) == pytest.approx(3.3616)
    assert predicted_speedup(0.8, 0.0, 4) == pytest.approx(3.3616)
    assert expected_tokens(1.0, 4) == 5 and expected_tokens(0.0, 4) == 1
    assert predicted_speedup(0.8, 0.05, 4) == pytest.approx(3.3616 / 1.2)  # Leviathan: E / (K c + 1)
    assert predicted_speedup(0.6, 0.0, 3, v=1.5) == pytest.approx((1 - 0.6**4) / 0.4 / 1.5)
    with pytest.raises(ValueError):
        expected_tokens(1.2, 3)


def test_alpha_is_the_per_token_maximum_likelihood() -> None:
    # steps: 2 of 4 stood (then a failure), 4 of 4 stood, 0 of 3 (a failure): 6 hits in 8 trials
    assert alpha_from_steps([2, 4, 0], [4, 4, 3]) == pytest.approx(6 / 8)
    assert alpha_from_steps([0], [0]) == 0.0  # a plain step observes nothing


# --- controllers -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", CONTROLLERS)
@pytest.mark.parametrize("k_max", [1, 2, 5, 8])
def test_controllers_stay_within_one_and_k_max(name: str, k_max: int) -> None:
    rng = random.Random(k_max)
    controller = make_controller(name, k_max)
    for _request in range(3):
        controller.reset()
        for _ in range(200):
            k = controller.next_k()
            assert 1 <= k <= k_max and isinstance(k, int)
            drafted = rng.randint(0, k)  # a drafter may propose fewer (n-gram without a match)
            accepted = rng.choice([drafted, rng.randint(0, drafted)])
            controller.update(drafted, accepted, rng.choice([0.0, rng.random() * 1e-2]), rng.random() * 1e-2)


def test_heuristic_and_aimd_schedules() -> None:
    h = HeuristicK(8, k_start=4)
    h.update(4, 4, 0, 0)
    assert h.next_k() == 6
    h.update(6, 2, 0, 0)
    assert h.next_k() == 5
    a = AIMD(8, k_start=4)
    a.update(4, 4, 0, 0)
    assert a.next_k() == 5
    a.update(5, 1, 0, 0)
    assert a.next_k() == 2  # 5 * 0.5


def test_cost_aware_follows_acceptance_and_costs() -> None:
    good = CostAware(8)
    for _ in range(30):  # every draft stands, drafts are free, a verify costs the same at any width
        good.update(good.next_k(), good.next_k(), 0.0, 0.01)
    assert good.next_k() == 8
    bad = CostAware(8)
    for _ in range(30):  # nothing stands, and a wider verify costs a little more
        k = bad.next_k()
        bad.update(k, 0, 0.0, 0.01 + 0.002 * k)
    assert bad.next_k() == 1
    pricey = CostAware(8)
    for _ in range(30):  # alpha 0.5 but each draft token costs as much as a verify
        k = pricey.next_k()
        pricey.update(k, k // 2, 0.01 * k, 0.01)
    assert pricey.next_k() <= 2
    assert pricey.rate(1) > pricey.rate(8)


@pytest.mark.parametrize("controller", CONTROLLERS)
@pytest.mark.parametrize("kind", ["ngram", "layerskip"])
def test_lossless_policies_stay_identical_with_every_controller(target: Engine, controller: str, kind: str) -> None:
    cfg = GenerationConfig(max_new_tokens=30, stop_at_eos=False)
    want = generate(target, PROMPT, cfg).tokens
    drafter = make_drafter(kind, target, layers=2)
    result = generate(target, PROMPT, cfg, Speculation(drafter, 6, None, make_controller(controller, 6)))
    assert result.tokens == want and result.stats.lossless
    assert all(1 <= k <= 6 for k in result.stats.k_trace) and result.stats.controller == controller_name(controller, "cpu")


@pytest.mark.parametrize("kind", ["layerskip", "truncated"])
def test_draft_confidence_stop_is_lossless_and_drafts_less(target: Engine, kind: str) -> None:
    cfg = GenerationConfig(max_new_tokens=30, stop_at_eos=False)
    want = generate(target, PROMPT, cfg).tokens
    full = generate(target, PROMPT, cfg, Speculation(make_drafter(kind, target, layers=2), 4))
    stopped = generate(target, PROMPT, cfg, Speculation(make_drafter(kind, target, layers=2, stop_below=0.99), 4))
    assert stopped.tokens == want and full.tokens == want
    assert sum(stopped.stats.drafted_lengths) < sum(full.stats.drafted_lengths)
    with pytest.raises(LabkitError, match="no probabilities"):
        make_drafter("ngram", target, stop_below=0.5)


# --- lossy policies ----------------------------------------------------------------------------

def forced_logits(rows: list[list[float]]) -> torch.Tensor:  # (K+1, V) logits whose softmax is each row
    return torch.tensor(rows).log()


def test_typical_acceptance_accepts_plausible_tokens() -> None:
    logits = forced_logits([[0.5, 0.4, 0.05, 0.05], [0.25, 0.25, 0.25, 0.25], [0.97, 0.01, 0.01, 0.01]])
    policy = TypicalAcceptance(posterior_threshold=0.3, posterior_alpha=0.3)
    assert not policy.lossless
    # row 0: 0.4 > min(0.3, 0.3 e^-H) → accepted though not the argmax; row 1 is flat: 0.25 > 0.3 * e^-ln4 = 0.075
    assert policy.accept(torch.tensor([1, 3]), None, logits, GenerationConfig(), None) == Verdict(2, 0)
    # a token with 0.05 fails the bar in row 0; the next token is the target's argmax there
    assert policy.accept(torch.tensor([2, 3]), None, logits, GenerationConfig(), None) == Verdict(0, 0)


def test_top_k_agreement() -> None:
    logits = forced_logits([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
    assert TopKAgreement(2).accept(torch.tensor([1, 2]), None, logits, GenerationConfig(), None) == Verdict(2, 0)
    assert TopKAgreement(2).accept(torch.tensor([1, 1]), None, logits, GenerationConfig(), None) == Verdict(1, 3)
    assert TopKAgreement(1).accept(torch.tensor([1, 2]), None, logits, GenerationConfig(), None) == Verdict(0, 0)


def test_lossy_policies_are_marked_and_may_drift(target: Engine) -> None:
    cfg = GenerationConfig(max_new_tokens=30, stop_at_eos=False)
    want = generate(target, PROMPT, cfg).tokens
    loose = generate(target, PROMPT, cfg, Speculation(make_drafter("layerskip", target, layers=1), 4, TopKAgreement(50)))
    assert not loose.stats.lossless and loose.stats.policy == "topk-50"
    assert loose.tokens != want  # top-50 of a 96-token vocabulary lets wrong drafts through
    assert 0 <= agreement(loose.tokens, want) < 1


def test_make_policy_rejects_bad_input() -> None:
    with pytest.raises(LabkitError, match="temperature 0"):
        make_policy("greedy", GenerationConfig(temperature=0.7))
    with pytest.raises(LabkitError, match="unknown policy"):
        make_policy("nope", GenerationConfig())
    with pytest.raises(LabkitError):
        make_policy("typical", GenerationConfig(), posterior_threshold=0.0)
    with pytest.raises(LabkitError, match="unknown controller"):
        make_controller("nope", 4)


def test_the_auto_controller_is_cost_aware_on_a_cpu_and_fixed_elsewhere() -> None:
    assert isinstance(make_controller("auto", 4, "cpu"), CostAware)
    fixed = make_controller("auto", 4, "cuda")
    assert fixed.name == "fixed" and fixed.next_k() == 4
    assert make_controller("aimd", 4, "cpu").name == "aimd"  # a name asked for is kept on any device
    cost = make_controller("cost", 3)
    cost.calibrate({0: 1.0, 1: 1.2, 2: 1.4, 3: 1.6})
    cost.update(15, 2, 0.001, 2.0)  # a token tree's 15 nodes (eagle-tree sets its own size): not a chain's K
    assert cost.steps == 0 and cost.next_k() in (1, 2, 3)


def test_perplexity_matches_the_model() -> None:
    hf = tiny_hf_model("llama", seed=5)
    engine = Engine.from_hf(hf, "cpu", "float32")
    prompt, tokens = [5, 6, 7], [8, 9, 10, 11]
    with torch.no_grad():
        logp = hf(torch.tensor([prompt + tokens])).logits[0].log_softmax(-1)
    nll = -sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(tokens)) / len(tokens)
    assert perplexity(engine, prompt, tokens) == pytest.approx(math.exp(nll), rel=1e-4)


def test_mixed_model_reduces_to_the_textbook_and_to_plain() -> None:
    from labkit.specdec.speedup import predicted_mixed_speedup

    assert predicted_mixed_speedup(0.8, 0.1, 4, 1.2, 1.0) == pytest.approx(predicted_speedup(0.8, 0.1, 4, v=1.2))
    assert predicted_mixed_speedup(0.8, 0.1, 4, 1.2, 0.0) == pytest.approx(1.0)


def test_cost_aware_decodes_plainly_where_no_draft_pays_and_probes_for_alpha() -> None:
    """With a verify cost table (a CPU's: a draft token costs 0.25 of a step) K=0, a plain step,
    is a candidate: where nothing stands the controller answers 0, drafting one token after
    probe_every plain steps to keep alpha fresh, each probe that keeps nothing doubling the wait
    (up to PROBE_BACKOFF times); where drafts stand again it drafts again, and a probe that keeps
    a token brings the first wait back."""
    from labkit.specdec.controllers import PROBE_BACKOFF

    table = {k: 1.0 + 0.25 * k for k in range(4)}
    cost = CostAware(3, probe_every=6, alpha_prior=0.0)  # no draft pays from the start
    cost.calibrate(table)
    ks = []
    for _ in range(100):  # nothing stands
        k = cost.next_k()
        ks.append(k)
        if k:
            cost.update(k, 0, 0.0, table[k])
    probes = [i for i, k in enumerate(ks) if k]
    assert set(ks) == {0, 1}  # plain steps and one-token probes
    assert probes[0] == 5 and [b - a for a, b in zip(probes, probes[1:], strict=False)] == [12, 24, 24, 24] and PROBE_BACKOFF * 6 == 24
    for _ in range(40):  # every draft stands: the next probe keeps its token, and drafting resumes
        k = cost.next_k()
        if k:
            cost.update(k, k, 0.0, table[k])
    assert cost.next_k() == 3


def test_cost_aware_probes_at_the_first_rate_after_a_probe_that_keeps_a_token() -> None:
    table = {k: 1.0 + 0.25 * k for k in range(4)}
    cost = CostAware(3, probe_every=6, alpha_prior=0.0)
    cost.calibrate(table)
    for _ in range(40):  # nothing stands: the wait grows
        k = cost.next_k()
        if k:
            cost.update(k, 0, 0.0, table[k])
    assert cost.probe_gap == 24
    fresh = copy.deepcopy(cost)
    fresh.reset()  # a new request: a probe at its first plain step, the waits from the first one again
    assert fresh.next_k() == 1
    fresh.update(1, 0, 0.0, table[1])
    assert [fresh.next_k() for _ in range(12)] == [0] * 11 + [1]
    while not (k := cost.next_k()):
        pass
    cost.update(k, 1, 0.0, table[k])  # the probe keeps its token
    ks = [cost.next_k() for _ in range(6)]
    assert ks == [0, 0, 0, 0, 0, 1]


def test_cost_aware_starts_a_request_from_the_last_ones_alpha() -> None:
    c = CostAware(8)
    c.reset()
    assert c.alpha == 0.5 and c.state == 0  # the prior, before any request
    for _ in range(20):
        c.update(4, 4, 0.0, 0.01)  # every draft stands: the first step in state 0, the rest after full accepts
    high, first = c.state_alpha(1), c.state_alpha(0)
    assert c.state == 1 and c.alpha == high > 0.9 and 0.5 < first < high
    c.reset()  # a request starts in state 0, from the last one's estimates
    assert c.state == 0 and c.alpha == pytest.approx(first) and c.state_alpha(1) == pytest.approx(high)
    c.update(4, 0, 0.0, 0.01)  # one weight of evidence moves it at once
    assert c.state_alpha(0) < first - 0.2 and c.state == 0


def test_cost_aware_drafts_long_in_a_run_and_short_after_a_miss() -> None:
    """Acceptance in runs (a lookup copying a passage, then missing): after a fully accepted step
    the controller drafts long, after a miss short, though the overall rate is middling. Steps of
    K=1 are evidence for the state they start in, so a run seen only at K=1 still lifts K."""
    c = CostAware(6)
    c.calibrate({k: 0.010 + 0.0005 * k for k in range(7)})
    rng = random.Random(0)
    for _ in range(300):
        k = c.next_k()
        in_run = c.state == 1 and rng.random() < 0.95 or c.state == 0 and rng.random() < 0.3
        c.update(k, k if in_run else 0, 0.0, c.verify_table[k])  # type: ignore[index]
    assert c.state_alpha(1) > 0.85 and c.state_alpha(0) < 0.45
    c.state = 1
    assert c.next_k() == 6
    c.state = 0
    assert c.next_k() <= 2
    stuck = CostAware(6)
    stuck.calibrate({k: 0.010 + 0.0005 * k for k in range(7)})
    for _ in range(5):
        stuck.update(1, 0, 0.0, 0.0105)  # misses: K=1 looks best
    assert stuck.next_k() == 1
    for _ in range(6):
        stuck.update(1, 1, 0.0, 0.0105)  # then every single draft stands
    assert stuck.state == 1 and stuck.next_k() >= 4


def test_cost_aware_is_not_held_at_k1_by_a_stale_expensive_width() -> None:
    """A wide verify measured once when it was slow (another request, a longer context) must not
    keep the controller at K=1 while nearly every draft stands: stale widths leave the cost line
    and a neighbouring width is probed now and then."""
    c = CostAware(6)
    c.update(6, 0, 0.0, 0.2)  # one very slow width-6 verify, long ago
    c.update(1, 1, 0.0, 0.010)
    for _ in range(120):
        k = c.next_k()
        c.update(k, k, 0.0, 0.010 + 0.001 * k)  # now: every draft stands, a wider verify costs 10% more a token
    assert c.next_k() >= 5
    assert all(1 <= c.next_k() <= 6 for _ in range(3))


def test_cost_aware_with_a_calibrated_table_is_not_tipped_by_one_slow_step() -> None:
    """alpha 0.35 and a verify 2% dearer per token: K=3 gives the most tokens per second. One
    step hit by a 15 ms hiccup (a CPU thread descheduled) makes a fitted line steep for a while;
    with the measured table the hiccup moves every width alike."""
    table = {k: 0.018 + 0.0003 * k for k in range(7)}
    assert max(range(1, 7), key=lambda k: expected_tokens(0.35, k) / table[k]) == 3
    calibrated, fitted = CostAware(6), CostAware(6)
    calibrated.calibrate(table)
    for c in (calibrated, fitted):
        for i in range(40):  # steady: 7 of 20 draft tokens stand
            k = c.next_k()
            c.update(k, 1 if i % 3 else 0, 0.0, table[k])
    assert calibrated.next_k() == 3
    for c in (calibrated, fitted):
        c.update(5, 1, 0.0, table[5] + 0.015)  # the hiccup, in a 5-token draft (the widest one seen lately)
    assert calibrated.next_k() >= 3 and fitted.next_k() < 3


def test_cost_aware_scale_follows_a_slower_context_and_keeps_the_shape() -> None:
    c = CostAware(4)
    c.calibrate({0: 0.010, 1: 0.011, 2: 0.012, 3: 0.013, 4: 0.030})  # width 4 falls off a cliff here
    for _ in range(30):  # every draft stands; every live step 5 ms slower than the table (longer context)
        k = c.next_k()
        c.update(k, k, 0.0, c.verify_table[k] + 0.005)  # type: ignore[index]
    assert c.scale == pytest.approx(1.4, abs=0.06) and c.next_k() == 3  # 5 ms on 11-13 ms: every width ~1.4x
    with pytest.raises(LabkitError, match="every K in 0..4"):
        c.calibrate({0: 0.01, 1: 0.01})


def test_generate_calibrates_the_cost_aware_controller_once(target: Engine) -> None:
    table = time_verify(target, 3, reps=2)
    assert sorted(table) == [0, 1, 2, 3] and all(t > 0 for t in table.values()) and target.length == 0
    c = CostAware(3)
    cfg = GenerationConfig(max_new_tokens=12, stop_at_eos=False)
    want = generate(target, PROMPT, cfg).tokens
    assert generate(target, PROMPT, cfg, Speculation(make_drafter("ngram", target), 3, None, c)).tokens == want
    first = c.verify_table
    assert first is not None and sorted(first) == [0, 1, 2, 3]
    generate(target, PROMPT, cfg, Speculation(make_drafter("ngram", target), 3, None, c))
    assert c.verify_table is first  # measured once: the costs belong to the device


def _confidence_trials(pick, q: list[float], p: list[float], threshold: float, n: int = 20000) -> list[int]:
    """Counts of each first output token when a confidence-stopping drafter (`pick`, with draft
    distribution q) proposes one token and rejection sampling decides it against the target p."""
    from labkit.specdec.policies import RejectionSampling

    cfg = GenerationConfig(temperature=1.0, max_new_tokens=1)
    g = torch.Generator().manual_seed(123)
    draft_logits = torch.tensor([q]).log()  # (1, V)
    target_logits = torch.tensor([p, p]).log()  # (2, V): the draft's position and one past it
    policy = RejectionSampling()
    counts = [0] * len(p)
    for _ in range(n):
        token, probs = pick(draft_logits, len(p), cfg, g, threshold)
        if token is None:  # no draft: the target samples its own token
            out = int(torch.multinomial(torch.tensor(p), 1, generator=g))
        else:
            verdict = policy.accept(torch.tensor([token]), probs[None], target_logits, cfg, g)
            out = token if verdict.accepted == 1 else verdict.next_token
        counts[out] += 1
    return counts


def _sampled_token_confidence_pick(logits, vocab, config, generator, stop_below):
    """The old, broken rule, kept here to prove the test can fail: stop on the probability of the
    token just drawn (so whether a token gets drafted depends on which token it is)."""
    q = logits[0].float().softmax(-1)
    token = int(torch.multinomial(q, 1, generator=generator))
    return (None, None) if float(q[token]) < stop_below else (token, q)


@pytest.mark.parametrize("q, p", [([0.9, 0.1], [0.5, 0.5]), ([0.45, 0.35, 0.2], [0.2, 0.3, 0.5])])  # always drafts; never drafts
def test_confidence_stop_keeps_the_target_distribution_under_sampling(q: list[float], p: list[float]) -> None:
    """The drafter-side confidence stop is lossless: it decides from the draft distribution before
    sampling (here threshold 0.5), so the output follows p within 5 standard deviations of the
    binomial at 6,000 draws; the old rule (stop on the drawn token's q) fails the same check on
    the issue's example (q = 0.9/0.1, p = 0.5/0.5: about 0.55/0.45)."""
    from labkit.specdec.drafters import _pick

    n = 6000
    counts = _confidence_trials(_pick, q, p, 0.5, n)
    for c, pi in zip(counts, p, strict=True):
        assert abs(c / n - pi) < 5 * math.sqrt(pi * (1 - pi) / n), (counts, p)
    if q == [0.9, 0.1]:
        broken = _confidence_trials(_sampled_token_confidence_pick, q, p, 0.5, n)
        assert abs(broken[0] / n - 0.5) > 5 * math.sqrt(0.25 / n), broken


def test_cost_aware_at_a_long_context_prices_wide_verifies_as_they_grew() -> None:
    """The table timed at a short context (2-core Sapphire Rapids, GGUF blocks, 40 tokens: 6.3 /
    8.1 / 9.4 / 10.6 ms for 1-4 tokens), the request's steps at 2,048 tokens (13.7 / 19.0 / 22.0 /
    24.9 ms: a 2-token verify 1.39 one-token steps), and drafts that stand as a lookup's do on a
    long summarisation prompt, rarely and in runs (0.4 after a draft stood, 0.2 otherwise): plain
    pays. An added offset learnt from the live steps priced the 2-token verify at 1.10 steps and
    drafted where it lost: 0.92-0.93 of plain's rate on every seed (0.86-0.92x plain decode
    measured); a factor prices it at 1.27: >= 0.94 (the rest is the probes that keep alpha fresh)."""
    short = {0: 0.00633, 1: 0.00807, 2: 0.0094, 3: 0.01064}
    long = {0: 0.01365, 1: 0.01903, 2: 0.0220, 3: 0.02492}
    for seed in range(6):
        c, rng = CostAware(3), random.Random(seed)
        c.calibrate(short)
        stood, tokens, seconds = False, 0, 0.0
        for _ in range(400):
            k, kept = c.next_k(), 0
            while kept < k and rng.random() < (0.4 if stood else 0.2):
                kept += 1
            stood = kept > 0 and kept == k if k else stood
            if k:
                c.update(k, kept, 0.0, long[k])
            tokens, seconds = tokens + 1 + kept, seconds + long[k]
        assert tokens / seconds * long[0] >= 0.94, seed
