"""Prompt-lookup drafters on the host: NgramDrafter (chains, the rule of specdec/lookup.py) and
NgramTreeDrafter (token trees from several earlier occurrences). No weights, no device work.
"""

from __future__ import annotations

import torch

from labkit.config import GenerationConfig
from labkit.errors import LabkitError
from labkit.graphs import GRAPH_MAX_T
from labkit.specdec.draft import Draft, Drafter
from labkit.specdec.lookup import latest_match
from labkit.specdec.tree import TokenTree, parallel_chains, trie


class NgramDrafter(Drafter):
    """Prompt lookup: the rule of specdec/lookup.py (`latest_match`: the latest earlier
    occurrence of the longest recent suffix, n = max_n down to min_n), and what followed it. No weights.

    An index from each n-gram to its latest start grows with the context (which only grows
    within a request), so a proposal costs O(max_n) dictionary lookups instead of a scan of the
    whole context: on a GPU a step is a few hundred microseconds, and a Python scan of a few
    hundred tokens is a sizeable share of it."""

    name = "ngram"
    replayable = True

    def __init__(self, max_n: int = 3, min_n: int = 2, keep: int = 1) -> None:
        # min_n 2: a single-token match guesses too often wrong, and on a CPU a verify of
        # K+1 positions costs 1.2-1.5 decode steps (measured in the K-sweep).
        if not 1 <= min_n <= max_n:
            raise LabkitError(f"n-gram sizes need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.max_n, self.min_n, self.keep = max_n, min_n, keep
        self._latest: dict[tuple[int, ...], int] = {}  # n-gram -> latest start that has a token after it
        self._starts: dict[tuple[int, ...], list[int]] = {}  # with keep > 1: its latest `keep` starts, oldest first
        self._done = 0  # the index covers the context's first _done tokens ...
        self._tail: tuple[int, ...] = ()  # ... which ended with these (the last max_n + 1 of them)

    def start(self, prompt_ids: list[int], capacity: int) -> None:
        self._latest, self._starts, self._done, self._tail = {}, {}, 0, ()

    def _extend(self, context: list[int]) -> None:
        """Index the n-grams that end before the context's last token and are not indexed yet.
        Within a request the context only grows; a context that is not the indexed one grown
        (shorter, or another ending where the index stopped) is indexed afresh. Checking the
        tail, not the whole prefix, keeps a step O(new tokens) on a long prompt."""
        done = self._done
        if done > len(context) or tuple(context[max(0, done - len(self._tail)) : done]) != self._tail:
            self._latest, self._starts, done = {}, {}, 0
        for end in range(max(done, 1), len(context)):  # n-grams ending at end-1 have context[end] after them
            for n in range(self.min_n, self.max_n + 1):
                if end - n >= 0:
                    gram = tuple(context[end - n : end])
                    self._latest[gram] = end - n
                    if self.keep > 1:
                        starts = self._starts.setdefault(gram, [])
                        starts.append(end - n)
                        del starts[: -self.keep]
        self._done, self._tail = len(context), tuple(context[-(self.max_n + 1) :])

    def match(self, context: list[int]) -> int | None:
        """Where the copy starts in the context (latest_match's rule, by the index), or None."""
        self._extend(context)
        return latest_match(context, self.max_n, self.min_n, self._latest.get)

    def propose(self, context: list[int], k: int, config: GenerationConfig, generator: torch.Generator | None) -> Draft:
        match = self.match(context)
        return Draft([] if match is None else context[match : match + k])


class NgramTreeDrafter(NgramDrafter):
    """Prompt lookup proposing token trees: the continuations of up to `branches` distinct earlier
    occurrences of the context's suffix (the longest suffix's latest first, as NgramDrafter's
    chain, then its earlier occurrences, then shorter suffixes'), as one tree verified in one
    pass. `fixed`: always `branches` chains of k (the first repeated where fewer occurrences
    exist), one tree shape per K, so that a GPU captures each once; else merged where they share
    a prefix (fewer nodes, which a CPU verify pays for)."""

    def __init__(self, max_n: int = 3, min_n: int = 2, branches: int = 3, fixed: bool = False) -> None:
        if branches < 2:
            raise LabkitError(f"an n-gram tree needs branches >= 2, got {branches}")
        super().__init__(max_n, min_n, keep=branches)
        self.branches, self.fixed = branches, fixed
        self.name = f"ngram-tree-{branches}"

    def continuations(self, context: list[int], k: int) -> list[list[int]]:
        """Up to `branches` distinct drafts of at most k tokens, best first (the chain's first)."""
        first = latest_match(context, self.max_n, self.min_n, self._latest.get)
        if first is None:
            return []
        found, L = [context[first : first + k]], len(context)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            for start in reversed(self._starts.get(tuple(context[L - n :]), [])):
                seq = context[start + n : start + n + k]
                if seq and seq not in found and len(found) < self.branches:
                    found.append(seq)
        return found

    def propose(self, context: list[int], k: int, config: GenerationConfig, generator: torch.Generator | None) -> Draft:
        self._extend(context)
        found = self.continuations(context, k)
        if self.fixed:
            if not found or len(found[0]) < k:
                return Draft(found[0] if found else [])  # a short copy: the chain (no captured shape for it)
            found = [seq if len(seq) == k else found[0] for seq in found] + [found[0]] * (self.branches - len(found))
            return Draft([t for seq in found for t in seq], parents=parallel_chains(self.branches, k))
        if len(found) < 2:
            return Draft(found[0] if found else [])
        tokens, parents = trie(found, GRAPH_MAX_T - 1)
        return Draft(tokens, parents=parents)

    def tree_shapes(self, max_k: int) -> list[TokenTree]:
        if not self.fixed:
            return []
        return [Draft([0] * (self.branches * k), parents=parallel_chains(self.branches, k)).tree() for k in range(1, max_k + 1)]
