"""EAGLE-2's dynamic trees (labkit/specdec/eagle_tree.py) on a tiny target: the expansion against
a plain-Python reference that runs each path as a chain, and generation that stays plain greedy."""

from __future__ import annotations

import pytest
import torch

from labkit.config import GenerationConfig
from labkit.errors import LabkitError
from labkit.generate import Speculation, generate
from labkit.specdec.eagle_tree import DEPTH_PENALTY, DynamicTreeConfig, dynamic_tree
from tests.test_eagle import random_head


def _engine():
    from labkit.engine import Engine
    from labkit.models.tiny import tiny_hf_model

    return Engine.from_hf(tiny_hf_model("llama", seed=4), "cpu", "float32")


def reference_tree(drafter, feat: torch.Tensor, anchor: int, cfg: DynamicTreeConfig) -> list[int]:
    """The expansion written plainly: every expanded candidate's feature from its path run as a
    chain (contiguous positions, causal attention, on a copy of the draft cache)."""
    cache = drafter._draft_cache
    saved = (cache.k.clone(), cache.v.clone())

    def path_feature(path: list[int]) -> torch.Tensor:
        cache.k.copy_(saved[0])
        cache.v.copy_(saved[1])
        f = feat
        for j, token in enumerate(path):
            f = drafter.elements(f[:, None], torch.tensor([[token]]), torch.tensor([anchor + 1 + j]))[:, 0]
        return f

    cands = []  # (score, depth, parent index or -1, token, path)
    logp = drafter.log_probs(feat)[0]
    for v, i in zip(*logp.topk(cfg.width), strict=True):
        cands.append((float(v), 1, -1, int(drafter.ids[i]), [int(drafter.ids[i])]))
    for r in range(1, cfg.depth):
        level = [(c[0], n) for n, c in enumerate(cands) if c[1] == r]
        for _, n in sorted(level, key=lambda x: -x[0])[: cfg.expand]:
            logp = drafter.log_probs(path_feature(cands[n][4]))[0]
            for v, i in zip(*logp.topk(cfg.width), strict=True):
                cands.append((cands[n][0] + float(v), r + 1, n, int(drafter.ids[i]), cands[n][4] + [int(drafter.ids[i])]))
    cache.k.copy_(saved[0])
    cache.v.copy_(saved[1])
    ranked = sorted(range(len(cands)), key=lambda n: -(cands[n][0] - DEPTH_PENALTY * cands[n][1]))[: cfg.nodes]
    order = sorted(ranked, key=lambda n: (cands[n][1], -cands[n][0]))
    index = {n: i for i, n in enumerate(order)}
    return [cands[n][3] for n in order] + [index.get(cands[n][2], -1) for n in order]


@pytest.mark.parametrize("cfg", [DynamicTreeConfig(depth=3, expand=2, width=3, nodes=7), DynamicTreeConfig(depth=4, expand=3, width=3, nodes=15)])
def test_the_expansion_is_each_path_run_as_a_chain(cfg: DynamicTreeConfig) -> None:
    from labkit.specdec.eagle_drafter import EagleDrafter

    engine = _engine()
    drafter = EagleDrafter(engine, random_head(depth=4), tree=cfg)
    engine.ensure_capacity(64)
    prompt = list(range(3, 23))
    engine.prefill(torch.tensor([prompt[:-1]]))
    drafter.start(prompt, 64)
    drafter.propose(prompt, 1, GenerationConfig(), None)  # catches up: the draft cache holds the prompt's elements
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        feat = torch.randn(1, engine.args.dim, generator=g)
        with torch.inference_mode():
            got = dynamic_tree(drafter, feat, torch.tensor([len(prompt) - 2]), cfg).tolist()
            want = reference_tree(drafter, feat, len(prompt) - 2, cfg)
        assert got == want
        parents = got[cfg.nodes :]
        assert all(-1 <= p < i for i, p in enumerate(parents)) and max(parents) >= 0  # topological, and it branches deeper


@pytest.mark.parametrize("prompt_len", [6, 40])
def test_dynamic_tree_speculation_is_plain_greedy(prompt_len: int) -> None:
    from labkit.specdec.eagle_drafter import EagleDrafter

    engine = _engine()
    prompt, cfg = list(range(3, 3 + prompt_len)), GenerationConfig(max_new_tokens=40, stop_at_eos=False)
    want = generate(engine, prompt, cfg).tokens
    drafter = EagleDrafter(engine, random_head(depth=4), tree=DynamicTreeConfig(depth=3, expand=2, width=2, nodes=6))
    got = generate(engine, prompt, cfg, Speculation(drafter, 3))
    assert got.tokens == want and got.stats.tree_steps and all(len(d) <= 6 for d in got.stats.draft_tokens)


def test_dynamic_tree_settings_are_checked() -> None:
    with pytest.raises(LabkitError, match="fewer candidates"):
        DynamicTreeConfig(depth=2, expand=1, width=2, nodes=9).validate(4)
    with pytest.raises(LabkitError, match="depth <= 3"):
        DynamicTreeConfig(depth=4).validate(3)
