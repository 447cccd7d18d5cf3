"""Token trees: several drafts verified in one target pass (SpecInfer, Medusa, EAGLE-2).

Terms. A tree's nodes are numbered in topological order: node 0 is the root, the last token the
target has accepted (the one a chain's verify feeds first), and every other node's parent comes
before it. Node i drafts token tokens[i] after the path root -> ... -> parent(i). Its depth is
its distance from the root; in a verify pass it sits at cache slot start + i and rotary position
start + depth(i), and attends to the context before `start` and to its ancestors (and itself):
the ancestor mask. A chain is the tree whose parents are 0, 1, 2, ...

Greedy acceptance walks from the root: the target's token after node n (argmax of its logits)
is accepted where a child of n drafted it, and the walk goes on from that child; where no child
did, it is the step's next token. The accepted nodes' keys and values are then moved to the
contiguous slots start+1.. (labkit/tree_verify.py), so the cache holds the accepted text in order.

A static tree is given as a list of paths of child ranks ((0,), (1,), (0, 0), ...): path (a, b)
is the b-th choice after the a-th choice at the first depth. Every prefix of a path must be a
path too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from labkit.errors import LabkitError


@dataclass
class TokenTree:
    parents: list[int]  # (N,) parents[0] == -1 (the root), parents[i] < i

    def __post_init__(self) -> None:
        if not self.parents or self.parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(self.parents) if i):
            raise LabkitError(f"a token tree's nodes come in topological order from the root (parents[0] = -1, "
                              f"parents[i] < i), got {self.parents}")

    @property
    def size(self) -> int:
        return len(self.parents)

    def depths(self) -> list[int]:
        depth = [0] * self.size
        for i in range(1, self.size):
            depth[i] = depth[self.parents[i]] + 1
        return depth

    def ancestor_mask(self) -> torch.Tensor:  # -> (N, N) bool: [i, j] when j is i or an ancestor of i
        mask = torch.eye(self.size, dtype=torch.bool)
        for i in range(1, self.size):
            mask[i] |= mask[self.parents[i]]
        return mask

    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in range(self.size)]
        for i in range(1, self.size):
            kids[self.parents[i]].append(i)
        return kids

    @classmethod
    def of_draft(cls, parents: list[int]) -> TokenTree:
        """The tree of a draft's parents (specdec/draft.py: -1 under the root): the root becomes node 0."""
        return cls([-1, *(p + 1 for p in parents)])

    @classmethod
    def chain(cls, k: int) -> TokenTree:
        return cls([-1, *range(k)])

    @classmethod
    def from_paths(cls, paths: list[tuple[int, ...]]) -> TokenTree:
        """The tree of these paths of child ranks (root excluded), nodes by depth then by path."""
        order = sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p))
        index: dict[tuple[int, ...], int] = {(): 0}
        parents = [-1]
        for path in order:
            if not path or any(r < 0 for r in path) or path[:-1] not in index:
                raise LabkitError(f"tree path {path} needs its prefix {path[:-1]} in the tree too (ranks >= 0)")
            index[path] = len(parents)
            parents.append(index[path[:-1]])
        return cls(parents)


def parse_tree(spec: str) -> list[tuple[int, ...]]:
    """'0;1;0.0;0.1' -> [(0,), (1,), (0, 0), (0, 1)]: paths of child ranks, ';' between paths."""
    try:
        paths = [tuple(int(r) for r in part.split(".")) for part in spec.replace(" ", "").split(";") if part]
    except ValueError:
        raise LabkitError(f"a tree is paths of child ranks like '0;1;0.0;0.1', got {spec!r}") from None
    TokenTree.from_paths(paths)  # checks prefixes
    return paths


def greedy_walk(tokens: list[int], tree: TokenTree, targets: list[int]) -> tuple[list[int], int]:
    """tokens (N,) the nodes' tokens (tokens[0] the root's), targets (N,) the target's greedy token
    after each node -> (accepted nodes in path order, root excluded; the step's next token)."""
    kids = tree.children()
    node, path = 0, list[int]()
    while True:
        want = targets[node]
        hit = next((c for c in kids[node] if tokens[c] == want), None)
        if hit is None:
            return path, want
        path.append(hit)
        node = hit


def trie(sequences: list[list[int]], max_nodes: int) -> tuple[list[int], list[int]]:
    """Token sequences (each a path from the root, best first) merged where they share a prefix:
    (tokens, parents) of a tree draft (parents index the tokens, -1 under the root), nodes in
    topological order, the first sequence's path first-ranked, at most max_nodes nodes."""
    tokens: list[int] = []
    parents: list[int] = []
    index: dict[tuple[int, ...], int] = {}
    for seq in sequences:
        for d in range(len(seq)):
            prefix = tuple(seq[: d + 1])
            if prefix in index:
                continue
            if len(tokens) == max_nodes:
                return tokens, parents
            index[prefix] = len(tokens)
            tokens.append(seq[d])
            parents.append(index[prefix[:-1]] if d else -1)
    return tokens, parents


def parallel_chains(branches: int, k: int) -> list[int]:
    """A tree draft's parents for `branches` chains of k tokens each under the root (chain b's
    tokens at b*k..b*k+k-1)."""
    return [-1 if d == 0 else b * k + d - 1 for b in range(branches) for d in range(k)]
