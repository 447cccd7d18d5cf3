"""eagle-mix (specdec/eagle_mix.py): EAGLE's chain or lookup's copy, chosen at every device step."""

from __future__ import annotations

import os
import random

import pytest
import torch

from labkit.config import GenerationConfig
from labkit.errors import LabkitError
from labkit.generate import Speculation, generate
from tests.test_eagle import _engine, random_head


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lookups_match_n_is_the_host_rule_on_the_device(backend: str) -> None:
    """lookup_draft's match_n >= n holds exactly where latest_match(context, n, n) finds a copy
    (n = 1, 2, 3), whatever lies in the history past the context: eagle-mix's choice."""
    from labkit.kernels.registry import get
    from labkit.specdec.lookup import latest_match

    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on the CPU runs under TRITON_INTERPRET=1")
    lookup = get("lookup_draft", torch.device("cpu"), backend)
    rng = random.Random(5)
    seen = set()
    for _ in range(200):
        L = rng.randint(1, 24)
        context = [rng.randint(0, 4) for _ in range(L)]
        history = torch.tensor([context + [rng.randint(0, 4) for _ in range(8)]])  # past the context: anything
        match_n = torch.full((1,), -1)
        lookup(history, torch.tensor([L]), 4, match_n)
        for n in (1, 2, 3):
            got = bool(match_n[0] >= n)
            assert got == (latest_match(context, n, n) is not None), (context, n, match_n)
            seen.add((n, got))
    assert len(seen) == 6


def log_mixed(monkeypatch) -> list:
    """Every chunk EagleMixDrafter's device steps run from now: (context, its steps, the only_if
    flag each of its steps' chains got: whether the chain's launches were to run)."""
    from labkit.specdec.eagle_mix import EagleMixDrafter

    chunks, flags = [], []
    run_steps, chain = EagleMixDrafter.run_steps, EagleMixDrafter.chain

    def logged(self, context, k, m, eos_mask, eos_until):
        flags.clear()
        out = run_steps(self, context, k, m, eos_mask, eos_until)
        chunks.append((list(context), out, list(flags)))
        return out

    def flagged(self, *args, only_if=None, **kwargs):
        flags.append(None if only_if is None else bool(only_if.item()))
        return chain(self, *args, only_if=only_if, **kwargs)

    monkeypatch.setattr(EagleMixDrafter, "run_steps", logged)
    monkeypatch.setattr(EagleMixDrafter, "chain", flagged)
    return chunks


def fresh_chain(engine, ctx: list[int], k: int, head=None) -> list[int]:  # type: ignore[no-untyped-def]
    """The chain a fresh drafter (host steps, its draft cache caught up over the whole context) makes after ctx."""
    from labkit.specdec.eagle_drafter import EagleDrafter

    fresh = EagleDrafter(engine, head if head is not None else random_head(), device_steps=False)
    engine.reset()
    engine.prefill(torch.tensor([ctx[:-1]]))
    fresh.start(ctx, len(ctx) + 8)
    return fresh.propose(ctx, k, GenerationConfig(), None).tokens


@pytest.mark.parametrize("min_n", [pytest.param(1, marks=pytest.mark.slow), 2])  # (1: make test-slow, for make test's 20 minutes)
def test_eagle_mix_takes_lookups_copy_or_the_chain_at_every_step(monkeypatch, min_n: int) -> None:
    """Device steps (run eagerly here): plain greedy's tokens; every step after a chunk's first
    verifies lookup's copy (COPY_K wide) where its context ends in an n-gram of min_n tokens seen
    before, else the chain a fresh drafter makes from that whole context (its last draft repeated
    to the width): the draft cache stays true through copy steps, which catch it up too."""
    from labkit.specdec.eagle_drafter import COPY_K
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
    for context, out, flags in chunks:
        ctx, flags = list(context), [f for f in flags if f is not None]  # (None: the host's proposal for the first step)
        assert len(flags) == len(out)  # each step's verify drafted the next step's chain, called off where it copies
        for i, (draft, new) in enumerate(out):
            assert len(draft) == COPY_K
            if i:  # the device's own choice (a chunk's first step verifies the host's)
                copy = latest_match(ctx, min_n, min_n) is not None
                assert flags[i - 1] is (not copy), (ctx, flags)
                kinds.append(copy)
                if copy:
                    assert draft == lookup_reference(ctx, COPY_K), (ctx, draft)
                else:
                    chains.append((list(ctx), draft))
            ctx += new
    assert True in kinds and False in kinds
    for ctx, draft in chains[:6]:
        chain = fresh_chain(engine, ctx, 3)
        assert draft == chain + chain[-1:] * (COPY_K - 3), ctx


@pytest.mark.parametrize("lazy", [3, 64])
def test_eagle_lazy_catches_up_where_it_chains(monkeypatch, lazy: int) -> None:
    """eagle-lazy's device steps (run eagerly, skipping the IF node's body as a graph does): eagle-mix's
    choice at every step and plain greedy's tokens; copy steps leave the draft cache alone, and a chain
    step catches it up over the `lazy` positions up to its anchor (none before the request's first
    verified one) from the states the verifies kept. With a window past the whole generation (64) each
    chain is the one a fresh drafter makes from the whole context."""
    from labkit.specdec.eagle_drafter import COPY_K, EagleDrafter
    from labkit.specdec.eagle_mix import EagleMixDrafter, MixOf
    from labkit.specdec.lookup import latest_match

    engine = _engine()
    prompt = [5, 6, 7, 8, 9, 10, 11] * 3 + [40, 41, 5, 6]
    cfg = GenerationConfig(max_new_tokens=60, stop_at_eos=False)
    want = generate(engine, prompt, cfg).tokens
    chunks = log_mixed(monkeypatch)
    windows: list[list[int]] = []  # the positions of each draft-layer pass a chain step's catch-up made
    elements, window, inside = EagleDrafter.elements, MixOf.caught_up_chain, [False]

    def logged(self, feats, tokens, pos, *args, **kwargs):
        if inside[0]:
            windows.append(pos.tolist())
        return elements(self, feats, tokens, pos, *args, **kwargs)

    def caught_up(self, kept, only_if):
        inside[0] = True
        try:
            return window(self, kept, only_if)
        finally:
            inside[0] = False

    monkeypatch.setattr(EagleDrafter, "elements", logged)
    monkeypatch.setattr(MixOf, "caught_up_chain", caught_up)
    drafter = EagleMixDrafter(engine, random_head(), lazy=lazy, device_steps=True)
    got = generate(engine, prompt, cfg, Speculation(drafter, 3))
    assert got.tokens == want and drafter.name.endswith(f"+mix2+lazy{lazy}")
    first = len(chunks[0][0]) - 1  # the first chunk's first verify: at its context's last position
    full = generate(engine, prompt, GenerationConfig(max_new_tokens=60 + 8 * COPY_K, stop_at_eos=False)).tokens
    full = prompt + full  # plain greedy past the budget too (a chunk's last steps may run past it)
    chained = [f for _, _, flags in chunks for f in flags if f is not None]  # the chain steps' (copy steps draft no chain)
    assert chained and all(chained) and len(windows) == len(chained)  # one catch-up a chain step, none a copy step
    anchors = [pos[-1] for pos in windows]  # each the context's last position but one
    for pos in windows:
        assert pos == [max(pos[-1] + j, first) for j in range(1 - lazy, 1)], pos
    steps = [len(context) + sum(len(new) for _, new in out[: i + 1]) - 2 for context, out, _ in chunks for i in range(len(out))]
    for a in steps:  # every step's choice, after it, by eagle-mix's rule
        if a < len(full) - 1:
            assert (a in anchors) is (latest_match(full[: a + 2], 2, 2) is None), a
    assert len(anchors) < len(steps)  # some copies
    if lazy == 64:
        for context, out, _ in chunks:
            ctx = list(context)
            for i, (draft, new) in enumerate(out):
                if i and latest_match(ctx, 2, 2) is None:
                    chain = fresh_chain(engine, ctx, 3)
                    assert draft == chain + chain[-1:] * (COPY_K - 3), ctx
                ctx += new
    with pytest.raises(LabkitError, match="eagle-lazy"):
        EagleMixDrafter(engine, random_head(), lazy=4, unsure=0.5)


@pytest.mark.parametrize("unsure", [pytest.param(0.0, marks=pytest.mark.slow), 0.6])  # (0.0: make test-slow; 0.6 takes both branches)
def test_eagle_agree_copies_where_lookup_and_the_chain_agree_or_the_head_is_unsure(monkeypatch, unsure: float) -> None:
    """eagle-agree's device steps (run eagerly): plain greedy's tokens; a step copies where the context
    ends in any n-gram seen before and lookup's first token is the chain's first draft (that of a fresh
    drafter from the whole context) or the head gives that draft less than `unsure`; else it verifies
    the chain. The head drafts only the prompt's tokens, so its first draft often is lookup's."""
    from labkit.specdec.eagle_drafter import EagleDrafter
    from labkit.specdec.eagle_mix import EagleMixDrafter
    from labkit.specdec.lookup import latest_match, lookup_reference

    engine = _engine()
    prompt = [5, 6, 7, 8, 9, 10, 11] * 3 + [40, 41, 5, 6]
    cfg = GenerationConfig(max_new_tokens=60, stop_at_eos=False)
    want = generate(engine, prompt, cfg).tokens
    chunks = log_mixed(monkeypatch)
    firsts = []
    first_draft = EagleDrafter.first_draft

    def logged(self, feat):
        first, prob = first_draft(self, feat)
        firsts.append((int(first[0]), float(prob[0])))
        return first, prob

    monkeypatch.setattr(EagleDrafter, "first_draft", logged)
    head = random_head(vocab=7, ids=torch.arange(5, 12))
    drafter = EagleMixDrafter(engine, head, unsure=unsure, device_steps=True)
    got = generate(engine, prompt, cfg, Speculation(drafter, 3))
    assert got.tokens == want and drafter.name.endswith(f"+agree{unsure:g}")
    seen, at = set(), 0
    for context, out, flags in chunks:
        ctx, flags = list(context), [f for f in flags if f is not None]
        mine, at = firsts[at : at + len(out)], at + len(out)  # this chunk's steps' choices (the first's: the host's proposal)
        for i, (draft, new) in enumerate(out):
            if i:
                first, prob = mine[i - 1]
                lookup = lookup_reference(ctx, len(draft))
                agree = first == lookup[0]
                copy = latest_match(ctx, 1, 1) is not None and (agree or prob < unsure)
                assert flags[i - 1] is (not copy), (ctx, first, prob)
                seen.add((copy, agree))
                if copy:
                    assert draft == lookup, (ctx, draft)
                else:
                    assert fresh_chain(engine, ctx, 1, head) == [first] == draft[:1], ctx
            ctx += new
    want = {(True, True), (False, False)} | ({(True, False)} if unsure else set())  # copies where they agree or the head is unsure
    assert want <= seen, seen
    with pytest.raises(LabkitError, match="probability"):
        EagleMixDrafter(engine, head, unsure=1.5)


def test_eagle_mix_is_built_by_name_and_checked() -> None:
    from labkit.errors import LabkitError
    from labkit.specdec.drafters import make_drafter
    from labkit.specdec.eagle_mix import LAZY_WINDOW, MIX_MIN_N, EagleMixDrafter

    engine = _engine()
    drafter = make_drafter("eagle-mix", engine, heads=random_head())
    assert isinstance(drafter, EagleMixDrafter) and drafter.lookup_over == MIX_MIN_N and not drafter.lazy
    lazy = make_drafter("eagle-lazy", engine, heads=random_head())
    assert isinstance(lazy, EagleMixDrafter) and lazy.lazy == LAZY_WINDOW and lazy.unsure is None and lazy.name.endswith("+lazy32")
    with pytest.raises(LabkitError, match="one draft-layer pass"):
        EagleMixDrafter(engine, random_head(), lazy=10_000)
    with pytest.raises(LabkitError, match="eagle-mix needs --heads"):
        make_drafter("eagle-mix", engine)
    for bad in (0, 4):
        with pytest.raises(LabkitError, match="eagle-mix copies after an n-gram of 1 to 3"):
            EagleMixDrafter(engine, random_head(), min_n=bad)
