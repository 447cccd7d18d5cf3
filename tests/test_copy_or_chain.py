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
