"""The one n-gram matching rule both prompt-lookup drafters follow (`NgramDrafter` on the host,
`LookupGraphDrafter` and its lookup_draft kernel on the device):

    the longest suffix of the context, n = max_n down to min_n tokens, that occurred earlier with
    a token after it; of its occurrences, the latest. The draft is what followed it.

They differ only in their sizes (the host drafter skips 1-grams, whose guesses a CPU verify
pays for) and in what a short copy becomes: the host drafter proposes fewer tokens, the device
one repeats the match's period so that a verify keeps its captured width.
"""

from __future__ import annotations

from collections.abc import Callable

from labkit.kernels.reference import LOOKUP_MAX_N


def scan_latest(context: list[int], gram: tuple[int, ...]) -> int | None:
    """The latest start i of `gram` in the context with a token after it (i + n <= len - 1), by scanning."""
    n, L = len(gram), len(context)
    for i in range(L - n - 1, -1, -1):
        if tuple(context[i : i + n]) == gram:
            return i
    return None


def latest_match(context: list[int], max_n: int, min_n: int,
                 find: Callable[[tuple[int, ...]], int | None] | None = None) -> int | None:
    """Where the copy starts in the context (the token after the matched n-gram), or None.
    `find(gram)` gives an n-gram's latest start with a token after it (default: a scan; the host
    drafter passes its index, which the tests hold to the scan)."""
    L = len(context)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        gram = tuple(context[L - n :])
        start = find(gram) if find is not None else scan_latest(context, gram)
        if start is not None:
            return start + n
    return None


def lookup_reference(context: list[int], k: int) -> list[int]:
    """The draft the lookup_draft kernel makes (kernels/reference.py, triton_ops.py), computed on the
    host: n-grams of LOOKUP_MAX_N down to 1 tokens, always k tokens. Where the copy would run into
    the context's end it repeats with the match's period; with no match it repeats the last token.
    The tests' reference, and the device drafter's proposal where the loop runs on the host."""
    c = latest_match(context, LOOKUP_MAX_N, 1)
    return periodic_copy(context, len(context) - 1 if c is None else c, k)  # no match: repeat the last token


def periodic_copy(context: list[int], c: int, k: int) -> list[int]:
    """k tokens copied from context[c:], repeating with the period len(context) - c where the copy
    runs into the context's end (the lookup_draft kernel's rule)."""
    q = len(context) - c  # the match's period
    return [context[c + j % q] for j in range(k)]
