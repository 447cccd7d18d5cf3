"""eagle-mix (specdec/eagle_mix.py): EAGLE's chain or lookup's copy, chosen at every device step."""

from __future__ import annotations

import random

import pytest
import torch

from labkit.config import GenerationConfig
from labkit.generate import Speculation, generate
from tests.test_eagle import _engine, random_head


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ngram_seen_is_the_host_rule_on_the_device(n: int) -> None:
    """ngram_seen(history, n_ctx, n) holds exactly where latest_match(context, n, n) finds a copy,
    whatever lies in the history past the context."""
    from labkit.specdec.eagle_mix import ngram_seen
    from labkit.specdec.lookup import latest_match

    rng = random.Random(n)
    seen = set()
    for _ in range(300):
        L = rng.randint(1, 24)
        context = [rng.randint(0, 4) for _ in range(L)]
        history = torch.tensor(context + [rng.randint(0, 4) for _ in range(8)])  # past the context: anything
        got = bool(ngram_seen(history, torch.tensor([L]), n)[0])
        assert got == (latest_match(context, n, n) is not None), (context, n)
        seen.add(got)
    assert seen == {True, False}


def log_mixed(monkeypatch) -> list:
    """Every chunk EagleMixDrafter's device steps run from now: (context, its steps)."""
    from labkit.specdec.eagle_mix import EagleMixDrafter

    chunks = []
    run_steps = EagleMixDrafter.run_steps

    def logged(self, context, k, m, eos_mask, eos_until):
        out = run_steps(self, context, k, m, eos_mask, eos_until)
        chunks.append((list(context), out))
        return out

    monkeypatch.setattr(EagleMixDrafter, "run_steps", logged)
    return chunks


@pytest.mark.parametrize("min_n", [1, 2])
def test_eagle_mix_takes_lookups_copy_or_the_chain_at_every_step(monkeypatch, min_n: int) -> None:
    """Device steps (run eagerly here): plain greedy's tokens; every step after a chunk's first
    verifies lookup's copy (COPY_K wide) where its context ends in an n-gram of min_n tokens seen
    before, else the chain a fresh drafter makes from that whole context (its last draft repeated
    to the width): the draft cache stays true through copy steps, which catch it up too."""
    from labkit.specdec.eagle_drafter import COPY_K, EagleDrafter
    from labkit.specdec.eagle_mix import EagleMixDrafter
    from labkit.specdec.lookup import latest_match, lookup_reference

    engine = _engine()
    prompt = [5, 6, 7, 8, 9, 10, 11] * 3 + [40, 41, 5, 6]  # copies to find, and stretches with none
    cfg = GenerationConfig(max_new_tokens=60, stop_at_eos=False)
    want = generate(engine, prompt, cfg).tokens
    chunks = log_mixed(monkeypatch)
    drafter = EagleMixDrafter(engine, random_head(), min_n=min_n, device_steps=True)
    got = generate(engine, prompt, cfg, Speculation(drafter, 3))
    assert got.tokens == want and drafter.name.endswith(f"+mix{min_n}")
    kinds, chains = [], []
    for context, out in chunks:
        ctx = list(context)
        for i, (draft, new) in enumerate(out):
            assert len(draft) == COPY_K
            if i:  # the device's own choice (a chunk's first step verifies the host's)
                copy = latest_match(ctx, min_n, min_n) is not None
                kinds.append(copy)
                if copy:
                    assert draft == lookup_reference(ctx, COPY_K), (ctx, draft)
                else:
                    chains.append((list(ctx), draft))
            ctx += new
    assert True in kinds and False in kinds
    for ctx, draft in chains[:6]:
        fresh = EagleDrafter(engine, random_head(), device_steps=False)
        engine.reset()
        engine.prefill(torch.tensor([ctx[:-1]]))
        fresh.start(ctx, len(ctx) + 8)
        chain = fresh.propose(ctx, 3, GenerationConfig(), None).tokens
        assert draft == chain + chain[-1:] * (COPY_K - 3), ctx


def test_eagle_mix_is_built_by_name_and_checked() -> None:
    from labkit.errors import LabkitError
    from labkit.specdec.drafters import make_drafter
    from labkit.specdec.eagle_mix import MIX_MIN_N, EagleMixDrafter

    engine = _engine()
    drafter = make_drafter("eagle-mix", engine, heads=random_head())
    assert isinstance(drafter, EagleMixDrafter) and drafter.lookup_over == MIX_MIN_N
    with pytest.raises(LabkitError, match="eagle-mix needs --heads"):
        make_drafter("eagle-mix", engine)
    for bad in (0, 4):
        with pytest.raises(LabkitError, match="eagle-mix copies after an n-gram of 1 to 3"):
            EagleMixDrafter(engine, random_head(), min_n=bad)
