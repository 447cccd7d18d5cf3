"""Token trees (specdec/tree.py, labkit/tree_verify.py): shapes, greedy walks, and generation
with trees that is token-identical to plain greedy for every tree shape and layer path."""

from __future__ import annotations

import os
import random

import pytest
import torch

from labkit.config import GenerationConfig
from labkit.errors import LabkitError
from labkit.generate import Speculation, generate
from labkit.specdec.draft import Draft, Drafter
from labkit.specdec.tree import TokenTree, greedy_walk, parse_tree

SHAPES = {
    "chain": [(0,), (0, 0), (0, 0, 0)],
    "wide": [(0,), (1,), (2,), (3,)],
    "binary": [(0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1), (0, 0, 0)],
    "lopsided": [(0,), (1,), (2,), (1, 0), (1, 0, 0), (1, 0, 0, 0), (2, 0)],
}


def test_tree_shapes_from_paths() -> None:
    tree = TokenTree.from_paths(SHAPES["binary"])
    assert tree.parents == [-1, 0, 0, 1, 1, 2, 2, 3]
    assert tree.depths() == [0, 1, 1, 2, 2, 2, 2, 3]
    mask = tree.ancestor_mask()
    assert mask[7].nonzero().flatten().tolist() == [0, 1, 3, 7] and mask[5].nonzero().flatten().tolist() == [0, 2, 5]
    assert TokenTree.from_paths(SHAPES["chain"]).parents == TokenTree.chain(3).parents
    assert parse_tree("0;1;0.0") == [(0,), (1,), (0, 0)]
    with pytest.raises(LabkitError, match="prefix"):
        TokenTree.from_paths([(0,), (1, 0)])
    with pytest.raises(LabkitError, match="topological"):
        TokenTree([-1, 2, 0])
    with pytest.raises(LabkitError, match="child ranks"):
        parse_tree("0;x")


def test_greedy_walk_follows_the_targets_token_down_the_tree() -> None:
    tree = TokenTree.from_paths(SHAPES["binary"])  # nodes 1, 2 under the root; 3, 4 under 1; 5, 6 under 2; 7 under 3
    tokens = [9, 10, 11, 12, 13, 14, 15, 16]
    # the target says 11 after the root (node 2), then 15 after node 2 (node 6), then 40 after node 6
    targets = [11, 0, 15, 0, 0, 0, 40, 0]
    assert greedy_walk(tokens, tree, targets) == ([2, 6], 40)
    assert greedy_walk(tokens, tree, [99, *targets[1:]]) == ([], 99)


class OracleTreeDrafter(Drafter):
    """Proposes a fixed tree shape around the true continuation (plain greedy's output): each
    node drafts the true next token with some chance, where its path is right so far, else a
    wrong one; so walks end on first, later and leaf branches alike."""

    name = "oracle-tree"

    def __init__(self, truth: list[int], prompt_len: int, paths: list[tuple[int, ...]], vocab: int, seed: int = 0) -> None:
        self.truth, self.prompt_len, self.vocab = truth, prompt_len, vocab
        self.tree = TokenTree.from_paths(paths)
        self.rng = random.Random(seed)

    def propose(self, context, k, config, generator) -> Draft:
        done = len(context) - self.prompt_len  # new tokens so far
        parents = self.tree.parents
        right = [True] * self.tree.size  # node's path drafts the truth so far
        tokens = [context[-1]]
        for i in range(1, self.tree.size):
            depth_true = done + self.tree.depths()[i] - 1
            true = self.truth[depth_true] if depth_true < len(self.truth) else 0
            ok = right[parents[i]] and self.rng.random() < 0.6 and true not in (tokens[c] for c in range(i) if parents[c] == parents[i])
            right[i] = ok
            tokens.append(true if ok else (true + 1 + self.rng.randrange(self.vocab - 1)) % self.vocab)
        return Draft(tokens[1:], parents=[p - 1 for p in parents[1:]])


def _engine(kernels: str):
    from labkit.engine import Engine
    from labkit.kernels import layer_reference
    from labkit.models.tiny import tiny_hf_model

    engine = Engine.from_hf(tiny_hf_model("llama", seed=4), "cpu", "float32")
    if kernels == "reference":
        engine.model.layer_ops = layer_reference  # the fused layers' twins: the tree mask in decode_attention
    if kernels == "triton":
        from labkit.kernels import layer_triton

        engine.model.layer_ops = layer_triton
    if kernels == "cpu":  # GGUF blocks through the C layer operations (their tree mask and rotary positions)
        from tests.test_layer_cpu import block_engine

        engine = block_engine("llama", seed=4)
        assert engine.layer_kernels == "cpu"
    return engine


@pytest.mark.parametrize("kernels", ["torch", "reference", "cpu"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_tree_speculation_is_plain_greedy_for_every_shape(shape: str, kernels: str) -> None:
    engine = _engine(kernels)
    prompt, cfg = list(range(3, 25)), GenerationConfig(max_new_tokens=40, stop_at_eos=False)
    want = generate(engine, prompt, cfg).tokens
    drafter = OracleTreeDrafter(want, len(prompt), SHAPES[shape], engine.args.vocab_size, seed=len(shape))
    depth = max(len(p) for p in SHAPES[shape])
    got = generate(engine, prompt, cfg, Speculation(drafter, depth))
    assert got.tokens == want
    assert sum(got.stats.accepted_lengths) >= 10 and len(got.stats.accepted_lengths) < 35  # trees were accepted from


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_device_walk_is_the_greedy_walk(shape: str) -> None:
    """TreeVerify.walk (tensors, no host read) against greedy_walk, on random tokens and targets
    drawn from a few ids so that walks end at every depth and on every branch."""
    from labkit.tree_verify import TreeVerify

    tree = TokenTree.from_paths(SHAPES[shape])
    verify = TreeVerify(_engine("torch"), tree.size, max(tree.depths()))
    verify.set_tree(tree)
    g = torch.Generator().manual_seed(0)
    seen_depths = set()
    for _ in range(300):
        targets = torch.randint(0, 3, (tree.size,), generator=g)
        tokens = torch.randint(0, 3, (tree.size,), generator=g)
        for kids in tree.children():  # siblings draft distinct tokens, as drafters do
            for r, c in enumerate(kids):
                tokens[c] = (tokens[kids[0]] + r) % 5
        path, nxt = greedy_walk(tokens.tolist(), tree, targets.tolist())
        verdict, on_device = verify.walk(tokens, targets)
        assert verdict.tolist() == [len(path), nxt] and on_device[: len(path)].tolist() == path
        seen_depths.add(len(path))
    assert seen_depths == set(range(max(tree.depths()) + 1))


@pytest.mark.parametrize("kernels", ["reference", "triton", "cpu"])
def test_a_tree_step_that_accepts_a_later_branch_moves_its_keys(kernels: str) -> None:
    """After a walk down a non-first branch the cache holds the path's keys in order: the next
    logits equal a plain pass over the accepted text (the fused layers' twins, and the Triton
    kernels: rotary positions apart from the slots, the tree mask)."""
    from labkit.tree_verify import tree_verify

    if kernels == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's kernels run on the CPU under TRITON_INTERPRET=1")
    engine = _engine(kernels)
    prompt = list(range(3, 20))
    engine.ensure_capacity(64)
    engine.prefill(torch.tensor([prompt[:-1]]))
    start = engine.length
    tree = TokenTree.from_paths(SHAPES["binary"])
    verify = tree_verify(engine, tree.size, max(tree.depths()))
    no_eos = torch.zeros(engine.args.vocab_size, dtype=torch.bool)
    tokens = [prompt[-1], 50, 51, 52, 53, 54, 55, 56]
    _, tokens[2], _ = verify.run(tree, tokens, no_eos, 0)  # make node 2 (the second branch) right ...
    engine.set_length(start)
    path, tokens[6], _ = verify.run(tree, tokens, no_eos, 0)  # ... then its second child (node 6)
    assert path == [2]
    engine.set_length(start)
    path, nxt, _ = verify.run(tree, tokens, no_eos, 0)
    assert path == [2, 6] and engine.length == start + 3
    after = engine.decode(torch.tensor([[nxt]]))  # (1, V)
    fresh = _engine("cpu" if kernels == "cpu" else "reference")  # the same weights
    fresh.ensure_capacity(64)
    want = fresh.prefill(torch.tensor([prompt[:-1] + [prompt[-1], tokens[2], tokens[6], nxt]]))
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-4)


def tree_and_path_logits(engine, tree: TokenTree, tokens: list[int], start: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The target's logits after every node of `tree` in one tree pass at slots start.., and after
    each node as the last row of a chain verify of its path (root first) at positions start.."""
    from labkit.models.kvcache import TreeAttention

    N, depths, dev = tree.size, tree.depths(), engine.device
    mask = tree.ancestor_mask()
    attn = TreeAttention(torch.tensor(depths, device=dev) + start, torch.tensor([start], device=dev), mask.to(torch.int8).to(dev))
    slots = torch.arange(start, start + N, device=dev)
    with torch.inference_mode(), engine.autocast():
        tree_logits = engine.model(torch.tensor([tokens], device=dev), slots, engine.cache, start + N, None, False, None, tree=attn)[0].clone()
        chains = []
        for t in range(N):
            engine.set_length(start)
            path = [tokens[j] for j in range(N) if mask[t, j]]
            chains.append(engine.forward(torch.tensor([path], device=dev))[0, -1].clone())
    return tree_logits, chains


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton's kernels run on the CPU under TRITON_INTERPRET=1")
def test_a_tree_nodes_logits_are_a_chain_verifys_bits_for_its_path() -> None:
    """Through the fused Triton layers a tree node's logits are the bits a chain verify of its path
    gives (and a chain's are plain decoding's), so trees keep plain greedy's tokens in any dtype:
    the tree's attention lays each node's path out where the chain's tokens sit."""
    engine = _engine("triton")
    prompt = list(range(3, 30))
    engine.ensure_capacity(64)
    engine.prefill(torch.tensor([prompt[:-1]]))
    start = engine.length
    tree = TokenTree.from_paths(SHAPES["lopsided"])
    tree_logits, chains = tree_and_path_logits(engine, tree, [prompt[-1], *range(40, 40 + tree.size - 1)], start)
    for t, chain in enumerate(chains):
        assert torch.equal(tree_logits[t], chain), t


def _walk_with_ranks(tree: TokenTree, outcome) -> list[int]:
    """The accepted path when the target's token is, at each node the path reaches, the child of
    rank outcome(node) (None: no child)."""
    kids, path, node = tree.children(), [], 0
    while True:
        r = outcome(node)
        if r is None or r >= len(kids[node]):
            return path
        node = kids[node][r]
        path.append(node)


def test_the_speedup_models_tree_form() -> None:
    """E(tree, p) is the chain's closed form for a chain, and the mean accepted length when the
    target picks rank r with chance p_r at every node (exact enumeration over the outcomes)."""
    import itertools

    from labkit.specdec.speedup import expected_tokens, expected_tree_tokens, predicted_tree_speedup

    assert expected_tree_tokens(TokenTree.chain(4), [0.7]) == pytest.approx(expected_tokens(0.7, 4))
    tree, p = TokenTree.from_paths(SHAPES["binary"]), [0.5, 0.2]
    outcomes = [0, 1, None]
    chance = {0: p[0], 1: p[1], None: 1 - sum(p)}
    exact = 0.0
    for pick in itertools.product(outcomes, repeat=tree.size):  # the outcome at each node
        weight = 1.0
        for o in pick:
            weight *= chance[o]
        exact += weight * (1 + len(_walk_with_ranks(tree, lambda n, pick=pick: pick[n])))
    assert expected_tree_tokens(tree, p) == pytest.approx(exact)
    assert predicted_tree_speedup(tree, p, 0.1, 1.2) == pytest.approx(exact / (3 * 0.1 + 1.2))


def test_rank_acceptance_recovers_the_chances_it_was_drawn_with() -> None:
    from labkit.specdec.speedup import expected_tree_tokens, rank_acceptance

    tree, p = TokenTree.from_paths(SHAPES["binary"]), [0.55, 0.25]
    rng = random.Random(1)

    def outcome(node: int) -> int | None:
        u = rng.random()
        return 0 if u < p[0] else 1 if u < p[0] + p[1] else None

    steps = [(i, [q - 1 for q in tree.parents[1:]], [n - 1 for n in _walk_with_ranks(tree, outcome)]) for i in range(4000)]
    fitted = rank_acceptance(steps)
    assert fitted == pytest.approx(p, abs=0.03)
    measured_tau = 1 + sum(len(path) for _, _, path in steps) / len(steps)
    assert expected_tree_tokens(tree, fitted) == pytest.approx(measured_tau, rel=0.03)


def test_step_views_show_the_accepted_path_of_each_tree() -> None:
    """spec_steps_html and tree_steps_html on a tree run: the green (accepted) and blue (the
    target's) tokens, in order, are the output; every drafted node is drawn once."""
    import re

    from labkit.notebook import spec_steps_html, tree_steps_html

    class Tok:
        def decode(self, ids, **_):
            return "".join(f"<{i}>" for i in ids)

    engine = _engine("torch")
    prompt, cfg = list(range(3, 25)), GenerationConfig(max_new_tokens=30, stop_at_eos=False)
    want = generate(engine, prompt, cfg).tokens
    result = generate(engine, prompt, cfg, Speculation(OracleTreeDrafter(want, len(prompt), SHAPES["binary"], 96, seed=3), 3))
    steps_view = spec_steps_html(Tok(), result)
    kept = re.findall(r"style='(background:#c8f0c8|color:#1f5fbf[^']*)'>&lt;(\d+)&gt;", steps_view)
    assert [int(t) for _, t in kept] == result.tokens
    trees_view = tree_steps_html(Tok(), result, max_steps=100)
    tree_steps = result.stats.tree_steps
    assert trees_view.count("└") == sum(len(result.stats.draft_tokens[step]) for step, _, _ in tree_steps)
    assert trees_view.count("background:#c8f0c8") == sum(len(path) for _, _, path in tree_steps) > 0
    assert 0 < trees_view.count("(the target's)") <= len(tree_steps)


class ChainOf(Drafter):
    """The first path of another drafter's trees, as a chain."""

    def __init__(self, inner: Drafter) -> None:
        self.inner, self.name = inner, "chain-of"

    def propose(self, context, k, config, generator) -> Draft:
        return self.inner.propose(context, k, config, generator).main_chain()


def test_sampling_verifies_trees_and_a_lossy_policy_their_first_path() -> None:
    """Rejection sampling verifies a tree draft whole (multi-draft rejection over the tree: its
    distribution is held in tests/test_sampling_generate.py); a lossy policy (typical acceptance)
    cuts a tree to its first path: the same tokens, seed for seed, as a drafter that proposes that
    chain."""
    from labkit.specdec.policies import TypicalAcceptance

    engine = _engine("torch")
    prompt = list(range(3, 25))
    want = generate(engine, prompt, GenerationConfig(max_new_tokens=30, stop_at_eos=False)).tokens
    cfg = GenerationConfig(max_new_tokens=30, stop_at_eos=False, temperature=0.8, seed=5)
    sampled = generate(engine, prompt, cfg, Speculation(OracleTreeDrafter(want, len(prompt), SHAPES["binary"], 96), 3))
    assert sampled.stats.tree_steps and max(map(len, sampled.stats.draft_tokens)) > 3
    typical = TypicalAcceptance()
    tree_run = generate(engine, prompt, cfg, Speculation(OracleTreeDrafter(want, len(prompt), SHAPES["binary"], 96), 3, policy=typical))
    chain_run = generate(engine, prompt, cfg, Speculation(ChainOf(OracleTreeDrafter(want, len(prompt), SHAPES["binary"], 96)), 3, policy=typical))
    assert tree_run.tokens == chain_run.tokens and not tree_run.stats.tree_steps
    assert tree_run.stats.draft_tokens == chain_run.stats.draft_tokens and max(map(len, tree_run.stats.draft_tokens)) <= 3


def test_ngram_trees_start_with_the_chain_and_follow_earlier_occurrences() -> None:
    """NgramTreeDrafter's first path is NgramDrafter's chain, its other paths continue earlier
    occurrences of the suffix (distinct), merged where they share a prefix; `fixed` keeps one
    shape per K (branches chains of k, the first repeated)."""
    from labkit.specdec.ngram import NgramDrafter, NgramTreeDrafter

    cfg = GenerationConfig()
    context = [1, 2, 3, 7, 8, 1, 2, 3, 9, 9, 1, 2, 3, 7, 5, 4, 1, 2, 3]  # "1 2 3" was followed by 7 8, 9 9, 7 5
    chain = NgramDrafter().propose(context, 3, cfg, None)
    tree = NgramTreeDrafter(branches=3).propose(context, 3, cfg, None)
    assert chain.tokens == [7, 5, 4]
    paths = {tuple(tree.tokens[n] for n in _path_to(tree.parents, leaf)) for leaf in _leaves(tree.parents)}
    assert paths == {(7, 5, 4), (9, 9, 1), (7, 8, 1)}
    assert tree.main_chain().tokens == chain.tokens and len(tree.tokens) == 8  # "7" shared by two paths
    fixed = NgramTreeDrafter(branches=3, fixed=True)
    drafts = fixed.propose(context, 3, cfg, None)
    assert drafts.tree().parents == fixed.tree_shapes(3)[2].parents and drafts.tokens[:3] == [7, 5, 4]
    rng = random.Random(0)
    for _ in range(200):  # on random contexts the first path is always the chain drafter's draft
        ctx = [rng.randrange(4) for _ in range(rng.randrange(2, 40))]
        want = NgramDrafter().propose(ctx, 4, cfg, None).tokens
        for drafter in (NgramTreeDrafter(branches=3), NgramTreeDrafter(branches=2, fixed=True)):
            got = drafter.propose(ctx, 4, cfg, None)
            assert got.main_chain().tokens[: len(want)] == want


def _leaves(parents: list[int]) -> list[int]:
    return [i for i in range(len(parents)) if i not in parents]


def _path_to(parents: list[int], node: int) -> list[int]:
    path = [node]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]
