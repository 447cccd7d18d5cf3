"""Prompt lookup on the device (specdec/lookup_steps.py): the lookup against its host twin, and
whole speculative steps run on the device giving plain greedy decoding's tokens."""

import random

import pytest
import torch

from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.generate import Speculation, generate
from labkit.kernels.reference import lookup_draft
from labkit.models.tiny import tiny_hf_model
from labkit.specdec.drafters import make_drafter
from labkit.specdec.lookup import lookup_reference


def test_lookup_reference_by_hand() -> None:
    assert lookup_reference([5, 6, 7, 9, 5, 6, 7], 3) == [9, 5, 6]  # the 3-gram [5, 6, 7] was followed by 9
    # no earlier [4, 2]; the latest earlier [2] is followed by 4, and the copy runs into the end: period 2
    assert lookup_reference([1, 2, 3, 1, 2, 4, 2], 3) == [4, 2, 4]
    assert lookup_reference([8, 8, 8], 4) == [8, 8, 8, 8]
    assert lookup_reference([3, 4], 3) == [4, 4, 4]  # no match: the last token again
    assert lookup_reference([7], 2) == [7, 7]
    assert lookup_reference([1, 2, 1, 2, 1], 5) == [2, 1, 2, 1, 2]  # a loop continues with its period


def test_lookup_draft_matches_the_host_lookup() -> None:
    rng = random.Random(0)
    for _ in range(300):
        L = rng.randint(1, 40)
        vocab = rng.choice([2, 3, 5, 50])
        context = [rng.randrange(vocab) for _ in range(L)]
        k = rng.randint(1, 8)
        history = torch.tensor(context + [rng.randrange(60) for _ in range(20)])  # anything after the context
        got = lookup_draft(history[None], torch.tensor([L]), k)[0].tolist()
        assert got == lookup_reference(context, k), (context, k)


def test_both_ngram_drafters_follow_one_matching_rule() -> None:
    """The host drafter's n-gram index finds what a scan finds (latest_match), and with the device
    drafter's sizes (3 down to 1) it proposes the start of the device drafter's draft: the same
    match, cut where the copy ends instead of repeated."""
    from labkit.specdec.drafters import NgramDrafter
    from labkit.specdec.lookup import latest_match

    rng = random.Random(1)
    host, host_123 = NgramDrafter(max_n=3, min_n=2), NgramDrafter(max_n=3, min_n=1)
    cfg = GenerationConfig()
    for trial in range(300):
        vocab = rng.choice([2, 3, 5, 50])
        context = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        k = rng.randint(1, 8)
        if trial % 3 == 0:  # a fresh request sometimes; otherwise the index grows with a context
            host.start(context, 64)
            host_123.start(context, 64)
        c = latest_match(context, 3, 2)
        assert host.propose(context, k, cfg, None).tokens == ([] if c is None else context[c : c + k]), context
        got = host_123.propose(context, k, cfg, None).tokens
        if latest_match(context, 3, 1) is None:  # no match: the device drafter repeats the last token, the host proposes nothing
            assert got == [], context
        else:
            assert got and got == lookup_reference(context, k)[: len(got)], (context, k)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_steps_on_the_device_give_plain_greedy_tokens(arch: str) -> None:
    """Whole steps (lookup, verify, acceptance) run as one device step, several per host read:
    the same tokens as plain greedy decoding, every draft K long, and the stats add up."""
    engine = Engine.from_hf(tiny_hf_model(arch, seed=4), "cpu", "float32")
    drafter = make_drafter("ngram-graph", engine)
    prompt = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4]  # something to copy
    for max_new, k in ((40, 3), (17, 5), (2, 1)):
        cfg = GenerationConfig(max_new_tokens=max_new, stop_at_eos=False)
        want = generate(engine, prompt, cfg).tokens
        result = generate(engine, prompt, cfg, Speculation(drafter, k))
        assert result.tokens == want and len(result.tokens) == max_new
        st = result.stats
        assert st.drafter == "ngram-graph" and all(len(d) == k for d in st.draft_tokens)
        assert 1 + sum(a + 1 for a in st.accepted_lengths) >= max_new  # the last step may run past the budget


def test_steps_on_the_device_block_eos_while_asked_and_stop_at_it() -> None:
    engine = Engine.from_hf(tiny_hf_model("llama", seed=4), "cpu", "float32")
    prompt = [3, 4, 5, 6, 3, 4, 5]
    plain = generate(engine, prompt, GenerationConfig(max_new_tokens=30, stop_at_eos=False)).tokens
    eos = plain[12]  # a token the model emits: call it EOS
    drafter = make_drafter("ngram-graph", engine)
    for min_new in (0, 20):
        cfg = GenerationConfig(max_new_tokens=30, min_new_tokens=min_new, eos_token_ids=(eos,))
        want = generate(engine, prompt, cfg)
        got = generate(engine, prompt, cfg, Speculation(drafter, 4))
        assert got.tokens == want.tokens and got.stats.stop_reason == want.stats.stop_reason
        assert (eos in got.tokens[:min_new]) is False


def test_ngram_graph_drafter_proposes_from_the_host_elsewhere() -> None:
    """With sampling (rejection sampling) the loop runs on the host: the drafter proposes the same
    lookup; bad settings are refused clearly."""
    engine = Engine.from_hf(tiny_hf_model("llama", seed=4), "cpu", "float32")
    drafter = make_drafter("ngram-graph", engine)
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.8, seed=3, stop_at_eos=False)
    result = generate(engine, [3, 4, 5, 3, 4], cfg, Speculation(drafter, 3))
    assert len(result.tokens) == 12 and result.stats.draft_tokens
    with pytest.raises(LabkitError, match="no probabilities"):
        make_drafter("ngram-graph", engine, stop_below=0.5)
    engine.ensure_capacity(40)
    with pytest.raises(LabkitError, match="drafts 1 to 15"):
        drafter.steps_for(16)
