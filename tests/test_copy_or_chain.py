"""eagle-ngram's choice per chunk of device steps (labkit/specdec/copy_or_chain.py)."""

from __future__ import annotations

from labkit.specdec.copy_or_chain import COPY_COST_GUESS, CopyOrChain, agreement

PASSAGE = list(range(100, 140))  # a source text the answer quotes


def steps_of(tokens: list[int], sizes: list[int]) -> list[tuple[list[int], list[int]]]:
    out, at = [], 0
    for n in sizes:
        out.append(([], tokens[at : at + n]))
        at += n
    return out


def test_agreement_is_the_prefix_a_greedy_verify_keeps() -> None:
    assert agreement([1, 2, 3], [1, 2, 4, 5]) == 2
    assert agreement([1, 2, 3], [1, 2]) == 2  # the text known so far
    assert agreement([], [1]) == 0 and agreement([9], [1]) == 0


def test_a_chain_chunk_counts_what_lookups_copy_would_have_kept() -> None:
    """The chain made the passage's next 12 tokens in steps of 3: at each step start lookup's copy
    (8 wide) agrees with the text that followed, as far as that text is known."""
    choice = CopyOrChain(min_n=3)
    context = [1, 2, *PASSAGE, 7, 8, *PASSAGE[:5]]  # the quote has begun
    choice.start(context, 256)
    made = PASSAGE[5:17]
    copy = choice.after_chunk(context, steps_of(made, [3, 3, 3, 3]), copy=False, seconds=4e-3, k_copy=8)
    # step starts at 0, 3, 6, 9 into `made`: lookup's 8 agree with 12, 9, 6 and 3 known tokens
    assert choice.tokens[True] == 1 + (8 + 8 + 6 + 3) / 4 and choice.tokens[False] == 3
    assert copy  # 7.25 tokens a step at 0.7 of a chain step's time, against 3


def test_fresh_text_stays_on_chains_and_a_copy_that_stops_paying_goes_back() -> None:
    choice = CopyOrChain(min_n=3)
    context = [1, 2, 3, 4, 5]
    choice.start(context, 256)
    fresh = list(range(200, 216))  # nothing to copy: lookup keeps nothing
    assert not choice.after_chunk(context, steps_of(fresh, [2] * 8), copy=False, seconds=8e-3, k_copy=8)
    assert choice.tokens[True] == 1.0 and choice.seconds[False] == 1e-3
    # a copy chunk that made one token a step: worse than chains' 2 at any cost below 2x
    assert not choice.after_chunk(context + fresh, steps_of(list(range(300, 308)), [1] * 8), copy=True, seconds=6e-3, k_copy=8)


def test_copy_steps_timed_slower_lose_even_with_more_tokens() -> None:
    choice = CopyOrChain(min_n=3)
    choice.tokens, choice.seconds = {False: 3.0, True: 4.0}, {False: 1e-3}
    assert 4.0 / (COPY_COST_GUESS * 1e-3) > 3.0 / 1e-3  # untimed: the guess says copy
    context = [1, 2, 3]
    choice.start(context, 64)
    choice.tokens = {False: 3.0}
    # a copy chunk: 4 tokens a step, but 2 ms a step against chains' 1 ms -> chains
    assert not choice.after_chunk(context, steps_of(list(range(10, 42)), [4] * 8), copy=True, seconds=16e-3, k_copy=8)
    assert choice.tokens[True] == 4.0 and choice.seconds[True] == 2e-3


def test_going_to_copy_steps_is_weighed_with_the_switch_back() -> None:
    """Copy steps rate a little above chains per step (2.2 against 2 tokens a millisecond), but a
    chunk of them and the switch back to chains (the proposal's catch-up and first chain, 3 ms
    here) do not pay: chains stay. Already copying, the rates alone decide (the switch was
    weighed on the way in); with no switch timed yet, copy steps go."""
    context = list(range(1, 9))
    fresh = steps_of(list(range(20, 36)), [2] * 8)  # 8 steps of 2 tokens, nothing lookup could copy

    def choice_after(switch_s: float | None, copy: bool) -> bool:
        choice = CopyOrChain(min_n=3)
        choice.start(context, 64)
        # priors that the chunk below moves to 2.2 copied and 2 chained tokens a step, 1 ms a step each
        choice.tokens, choice.seconds = {False: 2.0, True: 2.4 if copy else 3.4}, {False: 1e-3, True: 1e-3}
        decision = choice.after_chunk(context, fresh, copy=copy, seconds=8e-3, k_copy=8, switch_s=switch_s)
        assert abs(choice.tokens[True] - 2.2) < 1e-9 and choice.tokens[False] == 2.0
        return decision

    assert choice_after(None, copy=False)  # no switch timed: 2.2 against 2 -> copy
    assert not choice_after(3e-3, copy=False)  # 8 x 2.2 tokens in 8 + 3 ms: 1.6 a ms against chains' 2
    assert choice_after(3e-3, copy=True)  # copying: 2.2 against 2, the switch not weighed again


def test_a_chain_chunks_proposal_after_copy_steps_is_timed_as_the_switch(monkeypatch) -> None:
    """eagle-ngram's device steps: the proposal before a chain chunk that follows copy steps is
    handed over as the switch's time, not counted in the chunk's seconds; after a chain chunk it
    is neither."""
    import time

    import torch

    from labkit.config import GenerationConfig
    from labkit.generate import Speculation, generate
    from labkit.specdec.eagle_drafter import EagleDrafter
    from tests.test_eagle import _engine, random_head

    engine = _engine()
    drafter = EagleDrafter(engine, random_head(), device_steps=True, lookup_over=3)
    booked: list[tuple[bool, float, float | None]] = []
    kinds = iter([True, False, False, True, False] + [False] * 20)  # copy, chain, chain, copy, chain, ...

    def next_copying(self, context, steps, seconds, k_copy, switch_s=None):  # noqa: ANN001, ANN202
        booked.append((self.copying, seconds, switch_s))
        return next(kinds)

    propose = EagleDrafter.propose

    def slow_propose(self, *args, **kwargs):  # noqa: ANN001, ANN202
        time.sleep(0.2)
        return propose(self, *args, **kwargs)

    monkeypatch.setattr(EagleDrafter, "next_copying", next_copying)
    monkeypatch.setattr(EagleDrafter, "propose", slow_propose)
    prompt = [5, 6, 7, 8, 9, 10, 11] * 3 + [40, 41, 5, 6]
    cfg = GenerationConfig(max_new_tokens=60, stop_at_eos=False)
    with torch.inference_mode():
        out = generate(engine, prompt, cfg, Speculation(drafter, 3))
    assert out.tokens == generate(engine, prompt, cfg).tokens
    assert [c for c, _, _ in booked[:5]] == [False, True, False, False, True]
    assert all(seconds < 0.2 for _, seconds, _ in booked[:5])  # no proposal in any chunk's seconds
    assert booked[2][2] is not None and booked[2][2] >= 0.2  # the chain chunk after copy steps: its switch
    assert booked[0][2] is None and booked[3][2] is None  # the first chunk's and a chain after chains: none
