"""EAGLE chains and token trees over a grid of depths (K) and widths, in one run: what notebook
2C's tree section shows, with the speedup model's tree form beside each measurement.

Every cell generates the same prompts greedily at K: the chain (width 1), the chain with the
next width - 1 candidates of each depth as leaves (width > 1), and EAGLE-2's dynamic tree
(kind "dynamic": the draft layer expands its `width` best candidates per depth, 15 nodes at
most). A cell's row: tokens per target step (tau) measured, the per-rank acceptance p_r fitted
from its own tree steps, and tau predicted from them by E(tree, p) (specdec/speedup.py) over the
trees it drafted, plus throughput and whether every output equals plain greedy's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.generate import Speculation, generate
from labkit.specdec.eagle import EagleHead
from labkit.specdec.eagle_drafter import EagleDrafter
from labkit.specdec.eagle_tree import DynamicTreeConfig
from labkit.specdec.speedup import expected_tree_tokens, rank_acceptance
from labkit.specdec.tree import TokenTree


@dataclass
class TreeGridConfig:
    depths: list[int] = field(default_factory=lambda: [1, 2, 3])  # K: draft depth
    widths: list[int] = field(default_factory=lambda: [1, 2, 3])  # candidates per depth (1: the chain)
    max_new_tokens: int = 64
    dynamic: bool = True  # also EAGLE-2's dynamic trees at each depth (needs the fused draft layer)

    def validate(self, head_depth: int) -> None:
        if not self.depths or not self.widths or min(self.depths) < 1 or min(self.widths) < 1 or self.max_new_tokens < 2:
            raise LabkitError(f"a tree grid needs depths and widths >= 1 and max_new_tokens >= 2, got {self.depths}, "
                              f"{self.widths}, {self.max_new_tokens}")
        if max(self.depths) > head_depth:
            raise LabkitError(f"this EAGLE head drafts {head_depth} deep at most, got depths up to {max(self.depths)}")


def tree_grid(engine: Engine, head: EagleHead, prompts: list[list[int]], cfg: TreeGridConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(one row per (depth, width) cell, the generation results of the widest, deepest cell: for
    drawing its trees)."""
    cfg.validate(head.cfg.depth)
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, stop_at_eos=False)
    plain = [generate(engine, ids, gen) for ids in prompts]
    rows, shown = [], {}
    cells = [("chain" if w == 1 else "siblings", w) for w in cfg.widths] + ([("dynamic", max(cfg.widths))] if cfg.dynamic else [])
    for kind, width in cells:
        for depth in cfg.depths:
            drafter = EagleDrafter(engine, head, width=width) if kind != "dynamic" else EagleDrafter(engine, head, tree=DynamicTreeConfig.square(depth, width))
            results = [generate(engine, ids, gen, Speculation(drafter, depth)) for ids in prompts]
            steps = sum(r.stats.target_steps for r in results)
            tree_steps = [s for r in results for s in r.stats.tree_steps]
            if tree_steps:
                p = rank_acceptance(tree_steps)
                predicted = sum(expected_tree_tokens(TokenTree.of_draft(parents), p)
                                for _, parents, _ in tree_steps) / len(tree_steps)
            else:
                p = [r_alpha(results)]
                predicted = expected_tree_tokens(TokenTree.chain(depth), p)
            rows.append({
                "kind": kind, "depth": depth, "width": width,
                "nodes": sum(len(r.stats.draft_tokens[s]) for r in results for s, _, _ in r.stats.tree_steps) / len(tree_steps)
                if tree_steps else depth,
                "tau": sum(r.stats.new_tokens - 1 for r in results) / max(1, steps),
                "tau_predicted": predicted,
                "p_rank": p,
                "tok_per_s": sum(r.stats.new_tokens for r in results) / sum(r.stats.total_s for r in results),
                "identical": all(r.tokens == q.tokens for r, q in zip(results, plain, strict=True)),
            })
            shown = {"results": results, "depth": depth, "width": width, "kind": kind}
    return rows, shown


def r_alpha(results: list[Any]) -> float:
    """A chain's per-token acceptance over several results (speedup.alpha_from_steps)."""
    from labkit.specdec.speedup import alpha_from_steps

    return alpha_from_steps([a for r in results for a in r.stats.accepted_lengths],
                            [d for r in results for d in r.stats.drafted_lengths])
