"""An EAGLE chain in one launch (labkit/kernels/chain_triton.py, specdec/eagle_chain.py) against the
same chain's launches one by one: the same drafts and the same draft cache, bit for bit (the same
tile code), under TRITON_INTERPRET=1 on the CPU (each phase its own launch there) or on a GPU."""

from __future__ import annotations

import os

import pytest
import torch

from tests.test_eagle import random_head

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="Triton needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _drafter(window: int, depth: int, dtype: str = "float32"):
    from labkit.engine import Engine
    from labkit.kernels import layer_triton
    from labkit.models.tiny import tiny_hf_model
    from labkit.specdec.eagle_drafter import EagleDrafter

    engine = Engine.from_hf(tiny_hf_model("llama", seed=4), DEVICE, dtype)
    drafter = EagleDrafter(engine, random_head(depth=depth, vocab=96), device_steps=False, window=window)
    drafter.ops = layer_triton
    drafter._warm = True  # (its warm-up would run every width through the interpreter)
    return drafter


def _filled(drafter, n: int, seed: int) -> torch.Tensor:
    """The draft cache's first n elements from random features: -> a random anchor feature (1, D)."""
    g = torch.Generator().manual_seed(seed)
    D = drafter.head.dims.dim
    drafter.start(list(range(3, 3 + n)), 64)
    feats = torch.randn(1, n, D, generator=g).to(drafter.dtype).to(DEVICE)
    tokens = torch.randint(0, 96, (1, n), generator=g).to(DEVICE)
    drafter.elements(feats, tokens, torch.arange(n, device=DEVICE))
    return torch.randn(1, D, generator=g).to(drafter.dtype).to(DEVICE)


@pytest.mark.parametrize("n, window, split, programs", [(9, 512, 256, 3), (30, 12, 16, 1), (30, 40, 16, 4)])
def test_the_fused_chain_drafts_what_the_chains_launches_do(monkeypatch, n: int, window: int, split: int, programs: int) -> None:
    """Drafts, the draft cache it writes and its scratch left zero: equal to the launches one by one,
    with one split of keys or several (combined in the program), a window reaching back past the
    first key or not, and programs taking one tile or several of each operation."""
    from labkit.kernels import triton_common

    monkeypatch.setitem(triton_common.TUNE, "attn_split_s", split)
    monkeypatch.setitem(triton_common.TUNE, "chain_programs", programs)
    drafter = _drafter(window, depth=4)
    runs = {}
    for fused in (False, True):
        drafter.fused_chain = fused
        feat = _filled(drafter, n, seed=1)
        drafts = drafter.chain(feat, torch.tensor([n - 1], device=DEVICE))  # (1, 4, 1)
        cache = drafter._draft_cache
        runs[fused] = (drafts.clone(), cache.k_layers[0][:, :, : n + 3].clone(), cache.v_layers[0][:, :, : n + 3].clone())
    (want, k0, v0), (got, k1, v1) = runs[False], runs[True]
    assert got.shape == want.shape == (1, 4, 1)
    assert torch.equal(got, want), (got.flatten().tolist(), want.flatten().tolist())
    assert torch.equal(k1, k0) and torch.equal(v1, v0)
    scratch = next(iter(drafter._fused._scratch.values()))
    assert not scratch.keys.any() and not scratch.done.any() and drafter._fused.stalls() == 0  # (each phase's wait met, counts reset)
    assert len(set(want.flatten().tolist())) > 1  # a random head's chain, not one token repeated


def test_a_fused_chain_called_off_writes_nothing() -> None:
    """only_if false: the draft cache, the scratch and its counts untouched; true: as no flag."""
    drafter = _drafter(512, depth=3)
    drafter.fused_chain = True
    feat = _filled(drafter, 9, seed=2)
    anchor = torch.tensor([8], device=DEVICE)
    cache = drafter._draft_cache
    before = (cache.k.clone(), cache.v.clone())
    drafter.chain(feat, anchor, only_if=torch.tensor([False], device=DEVICE))
    assert torch.equal(cache.k, before[0]) and torch.equal(cache.v, before[1])
    scratch = next(iter(drafter._fused._scratch.values()))
    assert not scratch.x.any() and not scratch.feat.any() and not scratch.keys.any() and not scratch.done.any()
    on = drafter.chain(feat, anchor, only_if=torch.tensor([True], device=DEVICE))
    drafter.fused_chain = False
    assert torch.equal(on, drafter.chain(feat, anchor))


def test_the_fused_chain_serves_triton_chains_only() -> None:
    """Off by default; on, widths past one, a CPU's PyTorch twins: the launches one by one."""
    from labkit.kernels import layer_reference, layer_triton

    drafter = _drafter(512, depth=3)
    fused = drafter._fused
    assert not fused.serves(layer_triton, 1)  # off by default (eagle_chain.py: slower on the H200)
    drafter.fused_chain = True
    assert fused.serves(layer_triton, 1)
    assert not fused.serves(layer_triton, 2) and not fused.serves(layer_reference, 1) and not fused.serves(None, 1)
    drafter.fused_chain = False
    assert not fused.serves(layer_triton, 1)


@pytest.mark.parametrize("T, accepted, split", [(4, 1, 256), (9, 8, 16), (6, 0, 16)])
@pytest.mark.parametrize("chain", [True, False])
def test_a_fused_catch_up_and_chain_is_the_two_apart(monkeypatch, T: int, accepted: int, split: int, chain: bool) -> None:
    """A verify's catch-up over its rows (row j's token the draft after it, the target's next at the
    accepted row), then the chain from the accepted row at positions past it: the drafts and the
    draft cache of catch_up and chain one by one; with the chain called off (only_if false) the
    catch-up's elements all the same, nothing past them written."""
    from labkit.kernels import triton_common

    monkeypatch.setitem(triton_common.TUNE, "attn_split_s", split)
    drafter = _drafter(512, depth=4)
    D, n = drafter.head.dims.dim, 20
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(1, T, D, generator=g).to(drafter.dtype).to(DEVICE)
    tokens = torch.randint(0, 96, (1, T), generator=g).to(DEVICE)
    verdict = torch.tensor([[accepted, 77]], device=DEVICE)
    input_pos = torch.arange(n, n + T, device=DEVICE)
    flag = None if chain else torch.tensor([False], device=DEVICE)
    runs = {}
    for fused in (False, True):
        drafter.fused_chain = fused
        _filled(drafter, n, seed=3)
        cache = drafter._draft_cache
        cache.k[:, :, :, n:].fill_(0.5)  # past the true elements: what a called-off chain must leave
        cache.v[:, :, :, n:].fill_(0.5)
        drafts = drafter.catch_up_chain(hidden, verdict, tokens, input_pos, 4, only_if=flag)
        runs[fused] = (drafts.clone(), cache.k.clone(), cache.v.clone())
    (want, k0, v0), (got, k1, v1) = runs[False], runs[True]
    assert torch.equal(k1, k0) and torch.equal(v1, v0)
    past = k1[0][:, :, n + T :]  # (B, nkv, S - n - T, hd): the chain's positions and beyond
    reach = accepted + 4 - T  # chain positions (accepted + 1 .. accepted + 3) past the verified rows
    if reach > 0:
        assert past[:, :, :reach].ne(0.5).any().item() == chain  # written where the chain runs only
    assert not past[:, :, max(reach, 0) :].ne(0.5).any()
    if chain:
        assert got.shape == want.shape == (1, 4) and torch.equal(got, want), (got.tolist(), want.tolist())
    scratch = next(iter(drafter._fused._scratch.values()))
    assert drafter._fused.stalls() == 0 and not scratch.done.any()  # every phase waited on counts that came, then left zero
