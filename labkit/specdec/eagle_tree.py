"""EAGLE-2's dynamic draft trees: the draft layer expands its most confident candidates.

Terms. A candidate is a drafted token with its path score, the sum of the draft head's
log-probabilities along its path from the anchor: how likely the draft head thinks the whole
path is. Depth 1's candidates are the anchor's best `width` tokens. At each later depth the
`expand` best candidates of the depth before run through the draft layer together, each
attending to the context and to its own expanded ancestors (the tree attention the target's
verify uses), and each offers its best `width` tokens. The tree the target verifies is the
`nodes` best candidates of all depths (a path's score never rises along it, and a small depth
penalty breaks ties, so a chosen node's ancestors are chosen too), by depth, then score.

Everything has a fixed shape (the candidates, the expanded rows, the chosen nodes), so the
expansion runs inside the captured verify step like the chain does; the tree's structure comes
back as data (parents), and labkit/tree_verify.py verifies any structure of `nodes` nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from labkit.errors import LabkitError
from labkit.models.kvcache import TreeAttention
from labkit.specdec.draft import Draft

DEPTH_PENALTY = 1e-3  # subtracted per depth from a path's score: an ancestor always outranks its descendants


@dataclass
class DynamicTreeConfig:
    depth: int = 4  # draft depths (at most the head's)
    expand: int = 3  # candidates the draft layer expands per depth
    width: int = 3  # tokens each expanded candidate offers (>= expand)
    nodes: int = 15  # nodes the target verifies besides the root (the fused verify takes 16 rows)

    def validate(self, head_depth: int) -> None:
        if not 1 <= self.depth <= head_depth or self.expand < 1 or self.width < self.expand or self.nodes < 1:
            raise LabkitError(f"a dynamic tree needs 1 <= depth <= {head_depth}, expand >= 1, width >= expand and nodes >= 1, "
                              f"got {self.depth}, {self.expand}, {self.width}, {self.nodes}")
        if self.nodes > self.width + (self.depth - 1) * self.expand * self.width:
            raise LabkitError(f"a dynamic tree of depth {self.depth}, expand {self.expand}, width {self.width} has fewer "
                              f"candidates than {self.nodes} nodes")

    @classmethod
    def square(cls, depth: int, width: int) -> DynamicTreeConfig:
        """Every expanded candidate offers as many tokens as are expanded (width), and the target
        verifies as many nodes as there are, at most the default 15."""
        return cls(depth=depth, expand=width, width=width, nodes=min(cls.nodes, width + (depth - 1) * width * width))

    @property
    def slots(self) -> int:
        """Draft-cache slots the expanded candidates take past the anchor."""
        return (self.depth - 1) * self.expand


class DraftLayer(Protocol):
    """What the expansion needs of the EAGLE drafter."""

    ids: torch.Tensor  # (N,) draft vocabulary row -> target id

    def log_probs(self, feat: torch.Tensor) -> torch.Tensor:  # (M, D) -> (M, N) over the draft vocabulary
        ...

    def elements(self, feats: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor, tree: TreeAttention | None = None) -> torch.Tensor:
        ...


def dynamic_tree(layer: DraftLayer, feat: torch.Tensor, anchor: torch.Tensor, cfg: DynamicTreeConfig) -> torch.Tensor:
    """feat (1, D) the anchor's predicted feature, anchor (1,) its position -> (2 * nodes,) the
    tree's target ids, then each node's parent (an index into the nodes, -1 under the root)."""
    E, W, device = cfg.expand, cfg.width, feat.device
    top = layer.log_probs(feat).topk(W, dim=-1)  # (1, W)
    tokens, scores = [layer.ids[top.indices[0]]], [top.values[0].float()]  # per depth: (n,) each
    parents = [torch.full((W,), -1, device=device)]  # flat candidate index of each candidate's parent
    source = [torch.zeros(W, dtype=torch.long, device=device)]  # row of `feats` that predicted it
    ancestry = [torch.zeros(W, cfg.slots, dtype=torch.bool, device=device)]  # expanded slots on its path
    feats = [feat]  # row 0: the anchor's; then each run's outputs
    offset = 0  # flat index of the current depth's first candidate
    slot = torch.arange(cfg.slots, device=device)
    for r in range(1, cfg.depth):  # run r expands depth r's candidates into depth r + 1
        best = scores[-1].topk(E).indices  # (E,) among this depth's candidates
        rows = slot[(r - 1) * E : r * E]  # (E,) their slots, past the anchor
        seen = ancestry[-1][best] | (slot[None, :] == rows[:, None])  # (E, slots): ancestors and itself
        tree = TreeAttention((anchor + r).expand(E).contiguous(), anchor + 1, seen.to(torch.int8))
        out = layer.elements(torch.cat(feats)[source[-1][best]][None], tokens[-1][best][None], anchor + 1 + rows, tree)[0]  # (E, D)
        top = layer.log_probs(out).topk(W, dim=-1)  # (E, W)
        tokens.append(layer.ids[top.indices].flatten())
        scores.append((scores[-1][best][:, None] + top.values.float()).flatten())
        parents.append((offset + best).repeat_interleave(W))
        source.append((1 + (r - 1) * E + torch.arange(E, device=device)).repeat_interleave(W))  # out's rows in `feats`
        ancestry.append(seen.repeat_interleave(W, dim=0))
        feats.append(out)
        offset += scores[-2].shape[0]
    depth = torch.cat([torch.full_like(s, d, dtype=torch.float32) for d, s in enumerate(scores, start=1)])  # (C,)
    score = torch.cat(scores) - DEPTH_PENALTY * depth  # (C,)
    chosen = score.topk(cfg.nodes).indices  # (nodes,)
    order = chosen[torch.sort(depth[chosen] * 1e4 - score[chosen], stable=True).indices]  # by depth, then score
    position = torch.full((score.shape[0] + 1,), -1, device=device)  # candidate -> its node index (last: the root's -1)
    position[order] = torch.arange(cfg.nodes, device=device)
    parent = torch.cat(parents)[order]  # (nodes,) candidate index or -1
    return torch.cat((torch.cat(tokens)[order], position[parent]))


def chain_with_siblings(top: list[list[int]]) -> Draft:
    """The token tree of a chain (top[d][0] at depth d+1, each the child of the one before) whose
    nodes also have the other candidates top[d][1:] as leaf siblings, at every depth."""
    tokens: list[int] = []
    parents: list[int] = []
    prev = -1
    for candidates in top:
        chain_node = len(tokens)
        tokens.extend(candidates)
        parents.extend([prev] * len(candidates))
        prev = chain_node
    return Draft(tokens, parents=parents)
