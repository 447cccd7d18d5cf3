"""Split-K attention over the cache (layer_triton.decode_attention) against its PyTorch twin, and
the twin against a naive softmax written out here: decode (1 query row) and verify (K+1 rows),
short and long contexts up to the model's context, sliding windows, one split and many."""

import math
import os

import pytest
import torch

from labkit.kernels import layer_reference as ref

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                 reason="Triton needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def naive_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, input_pos: torch.Tensor, scale: float,
                    window: int | None) -> torch.Tensor:
    """softmax(q k^T * scale) v, one (batch row, token, head) at a time, in float64."""
    B, nkv, _, D = k_cache.shape
    M, nh, _ = q.shape
    T = input_pos.shape[0]
    out = torch.zeros(M, nh, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            pos = int(input_pos[t])
            lo = max(0, pos - window + 1) if window else 0
            for h in range(nh):
                keys = k_cache[b, h // (nh // nkv), lo : pos + 1].double().cpu()  # (n, D)
                vals = v_cache[b, h // (nh // nkv), lo : pos + 1].double().cpu()
                w = torch.softmax(keys @ q[b * T + t, h].double().cpu() * scale, 0)  # (n,)
                out[b * T + t, h] = w @ vals
    return out.reshape(M, nh * D)


def inputs(B: int, T: int, S: int, last: int, dtype: torch.dtype, nh: int = 9, nkv: int = 3, D: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B * T, nh, D, generator=g).to(dtype).to(DEVICE)
    k = (torch.randn(B, nkv, S, D, generator=g) * 2).to(dtype).to(DEVICE)  # scores spread wide: the max matters
    v = torch.randn(B, nkv, S, D, generator=g).to(dtype).to(DEVICE)
    pos = torch.arange(last - T + 1, last + 1, device=DEVICE)  # (T,) the last query sees keys 0..last
    return q, k, v, pos


def counters(B: int, nkv: int) -> torch.Tensor:
    return torch.zeros(B * nkv * 16, dtype=torch.int32, device=DEVICE)


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    return (a.double().cpu() - b.double().cpu()).abs().max().item() <= TOL[dtype] * (b.double().abs().max().item() + 1.0)


@pytest.mark.parametrize("T, last, window", [(1, 0, None), (1, 37, None), (3, 20, 8), (2, 150, 40), (9, 199, None)])
def test_twin_matches_a_naive_softmax(T: int, last: int, window: int | None) -> None:
    q, k, v, pos = inputs(2, T, 200, last, torch.float32, nh=4, nkv=2, D=16)
    scale = 16**-0.5
    assert close(ref.decode_attention(q, k, v, pos, scale, window), naive_attention(q, k, v, pos, scale, window), torch.float32)


def test_naive_softmax_catches_a_wrong_window() -> None:
    """The naive reference is strict enough to tell a window from no window (or the check is blind)."""
    q, k, v, pos = inputs(1, 2, 64, 50, torch.float32, nh=2, nkv=1, D=16)
    assert not close(ref.decode_attention(q, k, v, pos, 0.25, None), naive_attention(q, k, v, pos, 0.25, 10), torch.float32)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, T, last, window", [
    (1, 1, 0, None), (1, 1, 15, None), (1, 1, 16, None), (1, 1, 150, None), (1, 9, 16, None), (1, 9, 150, None),
    (2, 5, 123, None), (1, 1, 150, 40), (1, 9, 150, 33), (1, 16, 199, None), (1, 20, 199, 64),
])
def test_many_splits_match_reference(B: int, T: int, last: int, window: int | None, dtype: torch.dtype,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Splits of 32 keys in blocks of 16 over a 200-position cache: one split, two, and seven
    combined (in chunks of 3); windows that start inside a split; more rows than one tile; batch
    rows with their own cache."""
    from labkit.kernels import layer_triton as tri

    monkeypatch.setitem(tri.TUNE, "attn_split_s", 32)
    monkeypatch.setitem(tri.TUNE, "attn_block_s", 16)
    monkeypatch.setitem(tri.TUNE, "attn_combine_chunk", 3)
    q, k, v, pos = inputs(B, T, 200, last, dtype)
    scratch = counters(B, 3)
    want = ref.decode_attention(q, k, v, pos, 0.125, window)
    got = tri.decode_attention(q, k, v, pos, 0.125, window, scratch)
    assert got.shape == want.shape and got.dtype == dtype
    assert close(got, want, dtype), (got.float() - want.float()).abs().max().item()
    assert not scratch.any(), "the counters must be left at zero for the next launch"
    assert torch.equal(tri.decode_attention(q, k, v, pos, 0.125, window, scratch), got), "not deterministic"


@interpreted
@pytest.mark.parametrize("split_s", [64, 512])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_split_of_many_blocks_and_many_splits_of_one(split_s: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 700-key context as 11 one-block splits and as 2 splits of 8 blocks; a span shorter than
    the cache (a smaller grid) gives the same values."""
    from labkit.kernels import layer_triton as tri

    monkeypatch.setitem(tri.TUNE, "attn_split_s", split_s)
    q, k, v, pos = inputs(1, 9, 1024, 700, dtype, seed=split_s)
    want = ref.decode_attention(q, k, v, pos, 0.125, None)
    got = tri.decode_attention(q, k, v, pos, 0.125, None, counters(1, 3))
    assert close(got, want, dtype), (got.float() - want.float()).abs().max().item()
    assert torch.equal(tri.decode_attention(q, k, v, pos, 0.125, None, counters(1, 3), span=701), got)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_gets_the_same_bits_whatever_shares_its_tile(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """A query decoded alone (T=1) and the same query inside a verify of 9 (its neighbours in
    other splits): bit for bit the same output, so greedy speculation matches plain greedy."""
    from labkit.kernels import layer_triton as tri

    monkeypatch.setitem(tri.TUNE, "attn_split_s", 32)
    monkeypatch.setitem(tri.TUNE, "attn_block_s", 16)
    q, k, v, pos = inputs(1, 9, 256, 200, dtype, seed=7)  # positions 192..200: the verify crosses a split boundary
    wide = tri.decode_attention(q, k, v, pos, 0.125, None, counters(1, 3))  # (9, NH*D)
    for t in (0, 4, 8):
        alone = tri.decode_attention(q[t : t + 1], k, v, pos[t : t + 1], 0.125, None, counters(1, 3))
        assert torch.equal(alone[0], wide[t]), t


@interpreted
@pytest.mark.parametrize("T, last", [(1, 8191), (9, 4095)])
def test_long_contexts_match_reference(T: int, last: int) -> None:
    """The default splits at the embedded model's shapes, up to its context of 8,192 positions."""
    from labkit.kernels import layer_triton as tri

    q, k, v, pos = inputs(1, T, 8192, last, torch.bfloat16, seed=last)
    want = ref.decode_attention(q, k, v, pos, 0.125, None)
    got = tri.decode_attention(q, k, v, pos, 0.125, None, counters(1, 3))
    assert close(got, want, torch.bfloat16), (got.float() - want.float()).abs().max().item()


@interpreted
def test_too_few_counters_is_an_error() -> None:
    from labkit.kernels import layer_triton as tri

    q, k, v, pos = inputs(2, 1, 64, 10, torch.float32)
    with pytest.raises(ValueError, match="counters"):
        tri.decode_attention(q, k, v, pos, 0.125, None, torch.zeros(2, dtype=torch.int32, device=DEVICE))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="concurrent programs need a GPU")
@pytest.mark.parametrize("T", [1, 9])
def test_cuda_combine_is_deterministic_and_right_at_every_length(T: int) -> None:
    """On a GPU the splits really run at once: the last one to finish combines. Many lengths, each
    run several times: always the reference's values, always the same bits."""
    from labkit.kernels import layer_triton as tri

    q, k, v, _ = inputs(1, T, 8192, 8191, torch.bfloat16)
    scratch = counters(1, 3)
    for last in [T - 1, 127, 128, 129, 1000, 2047, 2048, 4095, 5000, 8191]:
        pos = torch.arange(last - T + 1, last + 1, device=DEVICE)
        want = ref.decode_attention(q, k, v, pos, 1 / math.sqrt(64), None)
        runs = [tri.decode_attention(q, k, v, pos, 1 / math.sqrt(64), None, scratch) for _ in range(5)]
        assert close(runs[0], want, torch.bfloat16), last
        assert all(torch.equal(r, runs[0]) for r in runs), last
        assert not scratch.any()


def tree_inputs(dtype: torch.dtype, base: int, S: int = 256):
    """A 7-node token tree whose nodes sit at slots base..base+6 of the cache (test_tree_* below)."""
    from labkit.specdec.tree import TokenTree

    tree = TokenTree([-1, 0, 0, 1, 1, 2, 3])
    q, k, v, _ = inputs(1, tree.size, S, base + tree.size - 1, dtype, seed=base)
    slots = torch.arange(base, base + tree.size, device=DEVICE)  # (N,)
    return q, k, v, slots, torch.tensor([base], device=DEVICE), tree.ancestor_mask().to(DEVICE)


def naive_tree_attention(q, k_cache, v_cache, base: int, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Node t sees the keys before base and the tree nodes its mask row allows, in float64."""
    _, nkv, _, D = k_cache.shape
    M, nh, _ = q.shape
    out = torch.zeros(M, nh, D, dtype=torch.float64)
    for t in range(M):
        seen = list(range(base)) + [base + j for j in range(mask.shape[1]) if mask[t, j]]
        for h in range(nh):
            keys = k_cache[0, h // (nh // nkv), seen].double().cpu()
            w = torch.softmax(keys @ q[t, h].double().cpu() * scale, 0)
            out[t, h] = w @ v_cache[0, h // (nh // nkv), seen].double().cpu()
    return out.reshape(M, nh * D)


def test_tree_twin_sees_the_context_and_each_nodes_ancestors() -> None:
    q, k, v, slots, base, mask = tree_inputs(torch.float32, 40)
    got = ref.decode_attention(q, k, v, slots, 0.125, None, tree_base=base, tree_mask=mask)
    assert close(got, naive_tree_attention(q, k, v, 40, mask, 0.125), torch.float32)
    assert not close(ref.decode_attention(q, k, v, slots, 0.125, None), got, torch.float32)  # causal over the slots differs


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base", [40, 60])  # tree inside one 64-key split; across a split boundary
def test_triton_tree_nodes_get_a_decode_steps_bits_over_their_path(base: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each tree node's attention equals, bit for bit, a decode step's over a cache that holds the
    node's path right after the context (where plain decoding puts those tokens): every other
    operation of a layer is row by row, so a tree's verify gives plain greedy's tokens in any dtype."""
    from labkit.kernels import layer_triton as tri

    monkeypatch.setitem(tri.TUNE, "attn_split_s", 64)
    q, k, v, slots, tree_base, mask = tree_inputs(dtype, base)
    got = tri.decode_attention(q, k, v, slots, 0.125, None, counters(1, 3), tree_base=tree_base, tree_mask=mask.to(torch.int8))
    deep = 0
    for t in range(mask.shape[0]):
        path = [base + j for j in range(mask.shape[1]) if mask[t, j]]  # its ancestors' slots and its own, root first
        k_chain, v_chain = k.clone(), v.clone()
        k_chain[:, :, base : base + len(path)] = k[:, :, path]
        v_chain[:, :, base : base + len(path)] = v[:, :, path]
        pos = torch.tensor([base + len(path) - 1], device=DEVICE)
        want = tri.decode_attention(q[t : t + 1], k_chain, v_chain, pos, 0.125, None, counters(1, 3))  # (1, NH*D)
        assert torch.equal(got[t], want[0]), (t, path)
        deep += path != list(range(base, base + len(path)))
    assert deep >= 3  # nodes whose path skips slots (the case a mask over the slots sums in another order)


@interpreted
@pytest.mark.parametrize("base", [40, 60])  # tree inside one 64-key split; across a split boundary
def test_triton_tree_attention_matches_its_twin(base: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from labkit.kernels import layer_triton as tri

    monkeypatch.setitem(tri.TUNE, "attn_split_s", 64)
    q, k, v, slots, tree_base, mask = tree_inputs(torch.float32, base)
    want = ref.decode_attention(q, k, v, slots, 0.125, None, tree_base=tree_base, tree_mask=mask)
    got = tri.decode_attention(q, k, v, slots, 0.125, None, counters(1, 3), tree_base=tree_base, tree_mask=mask.to(torch.int8))
    assert close(got, want, torch.float32), (got - want).abs().max().item()
