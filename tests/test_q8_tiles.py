"""--weights gguf-q8's products over weights tiled sixteen rows at a time (kernels/cpu_q8_tiles.c, AVX-512 VNNI):
the layout, the products against their PyTorch reference, each row's bits whatever rows share a call, both
paths of a layer (its own product, the C layer operations) on the same tiles, and speculation in the mode (on the
tiles where this build has them). The build's path per instruction set: tests/test_q8_gemv.py."""

import pytest
import torch

from labkit.errors import LabkitError
from labkit.kernels import cpu_quant
from labkit.kernels.reference import quant_linear_q8_ref
from tests.test_kernels import random_q4, random_q8


@pytest.fixture
def tiles_here() -> None:
    if not cpu_quant.q8_tile_rows():
        pytest.skip("this CPU's build has no AVX-512 VNNI tiles")




@pytest.mark.parametrize("make", [random_q4, random_q8])
def test_tiles_hold_each_lanes_row_four_quants_to_a_lane(make, tiles_here: None) -> None:  # type: ignore[no-untyped-def]
    """kernels/cpu_q8_tiles.c's layouts: tile g, block b, quad p, lane i holds row 16g+i's block b bytes 4p..4p+3
    (Q4_1's packed nibbles as the GGUF keeps them; Q8_0's quants); scales by lane; Q8_0's block sums of quants."""
    qw = make(64, 224)  # 4 tiles, 7 blocks
    tiles = cpu_quant.tile_q8(qw.kind, qw.qs, qw.d, qw.m)
    assert tiles is not None
    per_block = 16 if qw.kind == "q4_1" else 32
    for g, b, p, i, t in ((0, 0, 0, 0, 0), (3, 6, 3, 15, 3), (1, 2, 1, 7, 2), (2, 5, per_block // 4 - 1, 9, 1)):
        assert tiles.qt[g, b, p, i, t].item() == qw.qs[16 * g + i, per_block * b + 4 * p + t].item()
    assert tiles.dt.dtype == torch.float16 and torch.equal(tiles.dt[2, 5].float(), qw.d[32:48, 5])  # the GGUF's half floats
    if qw.kind == "q4_1":
        assert tiles.extra.dtype == torch.float16 and torch.equal(tiles.extra[1, 3].float(), qw.m[16:32, 3])
    else:
        assert tiles.extra.dtype == torch.int16 and torch.equal(tiles.extra[1, 3].int(), qw.qs[16:32, 96:128].to(torch.int32).sum(-1))
    with pytest.raises(LabkitError, match="float16"):  # a scale no float16 holds: refused, not rounded
        cpu_quant.tile_q8(qw.kind, qw.qs, qw.d + 1e-6, qw.m)
    assert cpu_quant.tile_q8(qw.kind, qw.qs[:40], qw.d[:40], None if qw.m is None else qw.m[:40]) is None  # 40 rows: no whole tiles


@pytest.mark.parametrize("make", [random_q4, random_q8])
def test_tiled_products_match_the_reference_and_keep_each_rows_bits(make, tiles_here: None) -> None:  # type: ignore[no-untyped-def]
    for N, K in ((96, 576), (64, 224), (48, 1536)):
        qw = make(N, K)
        tiles = cpu_quant.tile_q8(qw.kind, qw.qs, qw.d, qw.m)
        assert tiles is not None
        x = torch.randn(70, K) * torch.rand(70, 1) * 3 + 0.3  # rows of different scales, a mean off 0 (Q4_1's m term)
        together = cpu_quant.quant_linear_tiles(x, tiles)  # a prompt's rows: a group of 64 and one of 6, in eights
        ref = quant_linear_q8_ref(x, qw.kind, qw.qs, qw.d, qw.m)
        assert (together - ref).abs().max().item() < 2e-6 * ref.abs().max().item() + 1e-6, (make.__name__, K)
        for rows in (1, 3, 8, 13):
            assert torch.equal(cpu_quant.quant_linear_tiles(x[:rows].contiguous(), tiles), together[:rows]), (make.__name__, K, rows)
        for r in (*range(13), 63, 64, 69):
            assert torch.equal(cpu_quant.quant_linear_tiles(x[r : r + 1].contiguous(), tiles)[0], together[r]), (make.__name__, K, r)


def test_a_q8_layer_runs_on_its_tiles_in_both_paths(tiles_here: None) -> None:
    """QuantLinear's own product and the C layer operations' read the same tiles (kinds 4 and 5), so a step through
    either gives a row the same bits, and a prompt's rows past max_rows stay on them; a layer of rows not in whole
    tiles keeps the row-at-a-time product (and the dense weight past max_rows)."""
    from labkit.kernels.layer_cpu import CpuLayerOps
    from labkit.models.gguf_weights import QuantLinear

    for make, N in ((random_q4, 64), (random_q8, 64), (random_q4, 40)):
        qw = make(N, 128)
        layer = QuantLinear(torch.nn.Linear(128, N, bias=False), qw)
        layer.act = "q8"
        x = torch.randn(3, 128)
        tiles = layer.q8_tiles()
        assert (tiles is None) == (N % 16 != 0) and layer.q8_tiles() is tiles  # made once
        want = cpu_quant.quant_linear_tiles(x, tiles) if tiles is not None else cpu_quant.quant_linear(x, qw.kind, qw.qs, qw.d, qw.m, act="q8")
        with torch.no_grad():
            assert torch.equal(layer(x), want)
            prompt = torch.randn(40, 128)  # past max_rows: on the tiles still (a prompt in gguf-q8), else the dense weight
            want = cpu_quant.quant_linear_tiles(prompt, tiles) if tiles is not None else torch.nn.functional.linear(prompt, layer.weight)
            assert torch.equal(layer(prompt), want)
        blocks = CpuLayerOps([layer])._blocks_of(layer.weight, layer.bias)
        assert blocks.kind == (0 if qw.kind == "q4_1" else 1) + (4 if tiles is not None else 2)


def test_speculation_under_gguf_q8_keeps_its_plain_greedy_tokens() -> None:
    """A tiny engine on random blocks (tests/test_layer_cpu.py) reading them with 8-bit activations: its
    logits are not the fp32 blocks' (the mode is in effect) but near them, a verify's rows are its decode
    steps' bits, and n-gram speculation (K 4) gives exactly its own plain greedy tokens. Where the build tiles the
    weights, the C layer operations run on the tiles, and a step through them is a step through the PyTorch
    layers (each linear's own product on the same tiles) up to the other operations' fp32 rounding."""
    from labkit.config import GenerationConfig
    from labkit.generate import Speculation, generate
    from labkit.specdec.ngram import NgramDrafter
    from tests.test_layer_cpu import block_engine

    engine = block_engine("llama")
    prompt = torch.randint(3, 96, (1, 24), generator=torch.Generator().manual_seed(2))[0].tolist() * 2  # copyable: drafts kept
    logits = {}
    for act in ("fp32", "q8"):
        engine.read_blocks(True, act)
        engine.reset()
        with torch.inference_mode():
            logits[act] = engine.forward(torch.tensor([prompt[:12]])).clone()
    assert engine.weights == "gguf-q8" and engine.layer_kernels == "cpu"
    if cpu_quant.q8_tile_rows():
        assert {blocks.kind for blocks, _ in engine.model.layer_ops._blocks.values()} == {4, 5}
        ops, engine.model.layer_ops = engine.model.layer_ops, None  # the PyTorch layers over the same QuantLinears
        engine.reset()
        with torch.inference_mode():
            torch_layers = engine.forward(torch.tensor([prompt[:12]]))
        engine.model.layer_ops = ops
        assert (torch_layers - logits["q8"]).abs().max().item() < 1e-4 * logits["q8"].abs().max().item()
    with pytest.raises(LabkitError, match="activations"):
        engine.read_blocks(True, "q4")
    diff = (logits["q8"] - logits["fp32"]).abs().max().item()
    assert 0 < diff < 0.05 * logits["fp32"].abs().max().item()
    with torch.inference_mode():  # a verify's rows are the decode steps' bits
        engine.rollback(12)
        verify = engine.forward(torch.tensor([prompt[12:17]]))[0].clone()  # (5, V)
        engine.rollback(12)
        steps = torch.cat([engine.forward(torch.tensor([prompt[i : i + 1]]))[0] for i in range(12, 17)])  # (5, V)
    assert torch.equal(verify, steps)
    cfg = GenerationConfig(max_new_tokens=40, stop_at_eos=False)
    plain = generate(engine, prompt, cfg).tokens
    drafted = generate(engine, prompt, cfg, Speculation(NgramDrafter(3, 1), 4))
    assert drafted.tokens == plain and sum(drafted.stats.accepted_lengths) > 0
