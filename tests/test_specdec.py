"""Speculative decoding: lossless greedy for every drafter and K, the sampling guarantee, bad input."""

import pytest
import torch

from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.generate import Speculation, generate
from labkit.models.tiny import tiny_hf_model
from labkit.specdec import ModelDrafter, make_drafter
from labkit.specdec.drafters import NgramDrafter, check_draft_pair
from labkit.specdec.heads import DraftHeads, HeadsConfig
from labkit.specdec.policies import GreedyMatch, RejectionSampling, Verdict

PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7], [11, 12, 13], [40, 41, 42, 43, 44, 45, 46, 47, 48, 40, 41]]


@pytest.fixture(scope="module")
def target() -> Engine:
    return Engine.from_hf(tiny_hf_model("llama", seed=5), "cpu", "float32")


def plain(engine: Engine, prompt: list[int], n: int = 30, **kw) -> list[int]:
    return generate(engine, prompt, GenerationConfig(max_new_tokens=n, stop_at_eos=False, **kw)).tokens


def drafters(target: Engine) -> dict:
    random_draft = Engine.from_hf(tiny_hf_model("llama", seed=99), "cpu", "float32")
    self_draft = Engine.from_hf(tiny_hf_model("llama", seed=5), "cpu", "float32")  # the target's own weights
    return {
        "ngram": make_drafter("ngram", target),
        "layerskip": make_drafter("layerskip", target, layers=2),
        "truncated": make_drafter("truncated", target, layers=1),
        "random-model": ModelDrafter(random_draft, 96, name="random"),
        "self-model": ModelDrafter(self_draft, 96, name="self"),
    }


def bigram_hf():
    """The tiny target with every attention output zeroed: its next token depends on the last one
    only, so its greedy text soon cycles, and prompt lookup gets long runs of drafts accepted."""
    hf = tiny_hf_model("llama", seed=5)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    return hf


@pytest.fixture(scope="module")
def lossless_cases(target: Engine) -> dict:
    """Each drafter on a target where it proposes and gets some drafts accepted (asserted below)."""
    bigram = Engine.from_hf(bigram_hf(), "cpu", "float32")
    noisy = tiny_hf_model("llama", seed=5)  # the target's weights plus 10% noise: accepts often, not always
    with torch.no_grad():
        for param in noisy.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=torch.Generator().manual_seed(7)))
    with_heads = Engine.from_hf(tiny_hf_model("llama", seed=5), "cpu", "float32")  # heads change the engine's steps
    return {
        "ngram": (target, make_drafter("ngram", target)),
        "ngram-cycle": (bigram, make_drafter("ngram", bigram)),  # long accepted runs
        "ngram-graph": (target, make_drafter("ngram-graph", target)),
        "layerskip": (target, make_drafter("layerskip", target, layers=2)),
        "truncated": (target, make_drafter("truncated", target, layers=1)),
        "model": (target, make_drafter("model", target, draft_engine=Engine.from_hf(noisy, "cpu", "float32"))),
        # untrained heads repeat the last token: accepted where the target repeats one
        "heads": (with_heads, make_drafter("heads", with_heads, heads=DraftHeads(with_heads.args.dim, HeadsConfig(n_heads=8)))),
    }


@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("kind", ["ngram", "ngram-cycle", "ngram-graph", "layerskip", "truncated", "model", "heads"])
def test_greedy_speculation_is_token_identical(lossless_cases: dict, kind: str, k: int) -> None:
    """Every drafter at every K gives plain greedy's tokens, on prompts where it really drafts:
    drafts were proposed and some accepted (else this would compare plain decoding with itself),
    and, but for prompt lookup on a cycle, some rejected (so the cache was rolled back). The
    target is the tiny random model, whose keys matter; on its attention-free twin (ngram-cycle)
    prompt lookup gets long runs of drafts accepted."""
    engine, drafter = lossless_cases[kind]
    drafted = accepted = 0
    for prompt in PROMPTS:
        want = plain(engine, prompt, 40)
        got = generate(engine, prompt, GenerationConfig(max_new_tokens=40, stop_at_eos=False), Speculation(drafter, k))
        assert got.tokens == want, (kind, k, prompt)
        assert all(0 <= a <= d <= k for a, d in zip(got.stats.accepted_lengths, got.stats.drafted_lengths, strict=True))
        drafted += sum(got.stats.drafted_lengths)
        accepted += sum(got.stats.accepted_lengths)
    assert accepted > 0, (kind, k, drafted)
    if kind != "ngram-cycle":
        assert accepted < drafted, (kind, k)


def test_the_greedy_test_catches_a_verdict_that_accepts_one_draft_too_many(lossless_cases: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutation check: with the verify step's greedy verdict off by one, the identity test fails
    for every drafter that ever has a draft rejected."""
    import labkit.graphs as graphs_module
    from labkit.specdec import lookup_steps

    right = graphs_module.greedy_verdict

    def one_too_many(logits, tokens, eos_mask, block_rows):  # type: ignore[no-untyped-def]
        verdict = right(logits, tokens, eos_mask, block_rows).clone()  # (B, 2)
        short = verdict[:, 0] < tokens.shape[1] - 1
        verdict[:, 0] += short.long()
        verdict[:, 1] = torch.where(short, (verdict[:, 1] + 1) % logits.shape[-1], verdict[:, 1])
        return verdict

    def use(verdict) -> None:  # type: ignore[no-untyped-def]  # both places a greedy verify decides
        monkeypatch.setattr(graphs_module, "greedy_verdict", verdict)  # an eager verify's (Engine.eager_verdict)
        monkeypatch.setattr(lookup_steps, "greedy_verdict", verdict)

    for kind in ("ngram", "ngram-graph", "layerskip", "truncated", "model", "heads"):
        engine, drafter = lossless_cases[kind]
        use(right)
        want = [plain(engine, prompt, 40) for prompt in PROMPTS]
        use(one_too_many)
        got = [generate(engine, prompt, GenerationConfig(max_new_tokens=40, stop_at_eos=False), Speculation(drafter, 4)).tokens
               for prompt in PROMPTS]
        assert got != want, kind


def test_a_verify_blocks_eos_before_min_new_tokens(target: Engine) -> None:
    """EOS, plain greedy's third token, drafted by the target's own weights: a verify step must
    block it at the positions before min_new_tokens (plain greedy's longer answer), and may take it
    after (the answer ends there)."""
    self_draft = ModelDrafter(Engine.from_hf(tiny_hf_model("llama", seed=5), "cpu", "float32"), 96, name="self")
    prompt = PROMPTS[0]
    eos = plain(target, prompt, 12)[2]
    for min_new in (12, 2):
        cfg = GenerationConfig(max_new_tokens=12, min_new_tokens=min_new, eos_token_ids=(eos,))
        want = generate(target, prompt, cfg).tokens
        got = generate(target, prompt, cfg, Speculation(self_draft, 4)).tokens
        assert got == want, (min_new, got, want)
        assert (eos not in want) if min_new == 12 else (want[-1] == eos and len(want) == 3)


def test_edge_cases_self_draft_accepts_all_random_draft_almost_nothing(target: Engine) -> None:
    d = drafters(target)
    cfg = GenerationConfig(max_new_tokens=33, stop_at_eos=False)
    everything = generate(target, PROMPTS[0], cfg, Speculation(d["self-model"], 4)).stats
    assert everything.acceptance_rate == 1.0
    assert everything.tau == pytest.approx(5.0, abs=0.5)  # K+1 tokens per target step
    nothing = generate(target, PROMPTS[0], cfg, Speculation(d["random-model"], 4)).stats
    assert nothing.acceptance_rate < 0.25
    assert nothing.tau < 1.5


def test_eos_inside_an_accepted_block_ends_the_output(target: Engine) -> None:
    want = plain(target, PROMPTS[1], 30)
    eos = want[6]
    cut = want[: want.index(eos) + 1]
    self_draft = ModelDrafter(Engine.from_hf(tiny_hf_model("llama", seed=5), "cpu", "float32"), 96)
    got = generate(target, PROMPTS[1], GenerationConfig(max_new_tokens=30, eos_token_ids=(eos,)), Speculation(self_draft, 8))
    assert got.tokens == cut and got.stats.stop_reason == "eos"


@pytest.mark.parametrize("n", [1, 2, 7, 13])
def test_max_new_tokens_is_never_exceeded(target: Engine, n: int) -> None:
    self_draft = ModelDrafter(Engine.from_hf(tiny_hf_model("llama", seed=5), "cpu", "float32"), 96)
    got = generate(target, PROMPTS[0], GenerationConfig(max_new_tokens=n, stop_at_eos=False), Speculation(self_draft, 8))
    assert got.tokens == plain(target, PROMPTS[0], n)


def test_draft_vocabularies_of_other_sizes(target: Engine) -> None:
    for vocab in (100, 90):  # padded embeddings, or a draft that lacks the last ids
        draft = ModelDrafter(Engine.from_hf(tiny_hf_model("llama", seed=3, vocab_size=vocab), "cpu", "float32"), 96)
        got = generate(target, PROMPTS[2], GenerationConfig(max_new_tokens=20, stop_at_eos=False), Speculation(draft, 3))
        assert got.tokens == plain(target, PROMPTS[2], 20)
        sampled = generate(target, PROMPTS[2], GenerationConfig(max_new_tokens=20, temperature=1.0, seed=1, stop_at_eos=False), Speculation(draft, 3))
        assert all(0 <= t < 96 for t in sampled.tokens)


def test_ngram_lookup_proposes_what_followed_the_latest_match() -> None:
    ngram = NgramDrafter(max_n=3, min_n=1)
    cfg = GenerationConfig()
    assert ngram.propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 2, cfg, None).tokens == [7, 8]
    assert ngram.propose([4, 5, 6], 3, cfg, None).tokens == []
    assert ngram.propose([4, 5, 4], 3, cfg, None).tokens == [5, 4]
    assert NgramDrafter(max_n=3, min_n=2).propose([4, 5, 4], 3, cfg, None).tokens == []  # a 1-token match is not enough
    assert NgramDrafter(max_n=3, min_n=2).propose([4, 5, 6, 4, 5], 3, cfg, None).tokens == [6, 4, 5]


def scan_lookup(context: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """The n-gram lookup written as a plain backward scan: what the drafter's index must equal."""
    for n in range(min(max_n, len(context) - 1), min_n - 1, -1):
        for start in range(len(context) - n - 1, -1, -1):
            if context[start : start + n] == context[len(context) - n :]:
                return context[start + n : start + n + k]
    return []


def test_ngram_index_equals_a_full_scan_as_the_context_grows() -> None:
    import random

    rng = random.Random(0)
    cfg = GenerationConfig()
    for max_n, min_n in ((3, 2), (4, 1)):
        ngram = NgramDrafter(max_n=max_n, min_n=min_n)
        for _ in range(5):  # requests: start() forgets the last one
            context = [rng.randrange(6) for _ in range(rng.randrange(1, 12))]
            ngram.start(context, 200)
            while len(context) < 120:
                k = rng.randrange(1, 7)
                assert ngram.propose(context, k, cfg, None).tokens == scan_lookup(context, k, max_n, min_n)
                context = context + [rng.randrange(6) for _ in range(rng.randrange(1, 4))]
        other = [5, 4, 3, 5, 4]  # a context that does not extend the indexed one: the index starts over
        assert ngram.propose(other, 3, cfg, None).tokens == scan_lookup(other, 3, max_n, min_n)


def test_greedy_match_policy() -> None:
    logits = torch.full((4, 10), -5.0)
    for i, t in enumerate([3, 4, 9, 1]):
        logits[i, t] = 5.0
    policy = GreedyMatch()
    assert policy.accept(torch.tensor([3, 4, 5]), None, logits, GenerationConfig(), None) == Verdict(2, 9)
    assert policy.accept(torch.tensor([3, 4, 9]), None, logits, GenerationConfig(), None) == Verdict(3, 1)
    assert policy.accept(torch.tensor([0, 4, 9]), None, logits, GenerationConfig(), None) == Verdict(0, 3)


# --- the sampling guarantee --------------------------------------------------------------

P = torch.tensor([[0.45, 0.25, 0.15, 0.1, 0.05], [0.1, 0.2, 0.3, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2, 0.2]])  # target, K+1 = 3 rows
Q = torch.tensor([[0.1, 0.5, 0.1, 0.2, 0.1], [0.3, 0.3, 0.2, 0.1, 0.1]])  # draft, K = 2 rows


class AlwaysAccept(RejectionSampling):
    def accept(self, draft_tokens, draft_probs, target_logits, config, generator):  # type: ignore[no-untyped-def]
        return Verdict(len(draft_tokens), int(torch.multinomial(target_logits[-1].softmax(-1), 1, generator=generator)))


class ResidualIsTarget(RejectionSampling):
    """Wrong: on rejection, sample from p instead of norm(max(0, p - q))."""

    def accept(self, draft_tokens, draft_probs, target_logits, config, generator):  # type: ignore[no-untyped-def]
        verdict = super().accept(draft_tokens, draft_probs, target_logits, config, generator)
        if verdict.accepted < len(draft_tokens):
            p = target_logits[verdict.accepted].softmax(-1)
            return Verdict(verdict.accepted, int(torch.multinomial(p, 1, generator=generator)))
        return verdict


def emitted_distribution(policy, n: int = 20000, one_hot: bool = False) -> torch.Tensor:
    """Frequencies of the first two emitted tokens (flattened 5x5 joint) over n speculative steps."""
    gen = torch.Generator().manual_seed(0)
    cfg = GenerationConfig(temperature=1.0)
    logits = P.log()
    counts = torch.zeros(25)
    for _ in range(n):
        draft = [int(torch.multinomial(Q[i], 1, generator=gen)) for i in range(2)]
        verdict = policy.accept(torch.tensor(draft), None if one_hot else Q, logits, cfg, gen)
        out = draft[: verdict.accepted] + [verdict.next_token]
        if len(out) < 2:  # rejected at the first position: the second token comes from the target's next row
            out.append(int(torch.multinomial(P[1], 1, generator=gen)))
        counts[out[0] * 5 + out[1]] += 1
    return counts / n


def within_sigma(freq: torch.Tensor, n: int = 20000, sigmas: float = 4.5) -> bool:
    want = (P[0][:, None] * P[1][None, :]).reshape(-1)  # the target's own joint of two tokens
    sigma = (want * (1 - want) / n).sqrt()
    return bool(((freq - want).abs() < sigmas * sigma + 1e-3).all())


def test_rejection_sampling_reproduces_the_target_distribution() -> None:
    assert within_sigma(emitted_distribution(RejectionSampling()))


def test_one_hot_drafter_keeps_the_guarantee() -> None:
    assert within_sigma(emitted_distribution(RejectionSampling(), one_hot=True))


@pytest.mark.parametrize("wrong", [AlwaysAccept(), ResidualIsTarget()])
def test_the_statistical_test_catches_wrong_rules(wrong) -> None:
    assert not within_sigma(emitted_distribution(wrong))


def test_speculative_sampling_end_to_end_is_seeded(target: Engine) -> None:
    d = make_drafter("layerskip", target, layers=2)
    cfg = GenerationConfig(max_new_tokens=25, temperature=0.9, top_p=0.95, seed=4, stop_at_eos=False)
    a = generate(target, PROMPTS[0], cfg, Speculation(d, 3)).tokens
    b = generate(target, PROMPTS[0], cfg, Speculation(d, 3)).tokens
    assert a == b and len(a) == 25


# --- bad input -----------------------------------------------------------------------------

def test_k_below_one(target: Engine) -> None:
    with pytest.raises(LabkitError, match="at least 1"):
        generate(target, PROMPTS[0], GenerationConfig(max_new_tokens=5), Speculation(make_drafter("ngram", target), k=0))


def test_draft_on_another_device_or_dtype(target: Engine) -> None:
    other = Engine.from_hf(tiny_hf_model("llama", seed=3), "cpu", "float16")
    with pytest.raises(LabkitError, match="dtype"):
        make_drafter("model", target, draft_engine=other)
    same = Engine.from_hf(tiny_hf_model("llama", seed=3), "cpu", "float32")
    same.device = torch.device("cuda")  # as if it had been built on a GPU
    with pytest.raises(LabkitError, match="device"):
        check_draft_pair(target, same)


def test_mismatched_tokenizers(target: Engine) -> None:
    class Tok:
        def __init__(self, vocab: dict) -> None:
            self.vocab = vocab

        def get_vocab(self) -> dict:
            return self.vocab

    with pytest.raises(LabkitError, match="tokenizer"):
        check_draft_pair(target, target, Tok({"a": 0, "b": 1}), Tok({"a": 0, "c": 1}))


def test_prompt_longer_than_context_with_speculation(target: Engine) -> None:
    with pytest.raises(LabkitError, match="context"):
        generate(target, list(range(3, 300)), GenerationConfig(max_new_tokens=5), Speculation(make_drafter("ngram", target), k=2))


def test_bad_layer_counts(target: Engine) -> None:
    with pytest.raises(LabkitError, match="layer"):
        make_drafter("layerskip", target, layers=3)  # the tiny target has 3 layers
    with pytest.raises(LabkitError, match="unknown drafter"):
        make_drafter("oracle", target)
