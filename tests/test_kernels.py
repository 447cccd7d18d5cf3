"""Every kernel against its PyTorch reference, on random inputs (never zeros)."""

import pytest
import torch

from labkit.kernels import cpu_quant
from labkit.kernels.reference import dequant_q4_1, quant_linear_ref
from labkit.models.gguf_weights import QuantLinear, QuantWeight, unpermute_rows

needs_kernel = pytest.mark.skipif(not cpu_quant.available()[0], reason=f"cpu_quant: {cpu_quant.available()[1]}")


def random_q4(N: int, K: int) -> QuantWeight:
    return QuantWeight("q4_1", torch.randint(0, 256, (N, K // 2), dtype=torch.uint8), torch.rand(N, K // 32) * 0.02 + 1e-3, -torch.rand(N, K // 32) * 0.1)


def random_q8(N: int, K: int) -> QuantWeight:
    return QuantWeight("q8_0", torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N, K // 32) * 0.01 + 1e-4, None)


@needs_kernel
@pytest.mark.parametrize("make", [random_q4, random_q8])
@pytest.mark.parametrize("M, N, K", [(1, 96, 64), (1, 577, 576), (5, 192, 1536), (16, 33, 96)])
def test_quant_gemv_matches_reference(make, M: int, N: int, K: int) -> None:
    qw = make(N, K)
    x = torch.randn(M, K)
    ours = cpu_quant.quant_linear(x, qw.kind, qw.qs, qw.d, qw.m)
    ref = quant_linear_ref(x, qw.kind, qw.qs, qw.d, qw.m)
    assert ours.shape == (M, N)
    assert (ours - ref).abs().max().item() < 1e-5 * ref.abs().max().item() + 1e-5


def test_q4_1_nibble_order() -> None:
    """Block byte j holds element j in its low nibble and element j+16 in its high nibble."""
    qs = torch.zeros(1, 16, dtype=torch.uint8)
    qs[0, 0] = 0x21  # element 0 → 1, element 16 → 2
    w = dequant_q4_1(qs, torch.ones(1, 1), torch.zeros(1, 1))
    assert w[0, 0] == 1 and w[0, 16] == 2 and w.abs().sum() == 3


def test_unpermute_rows_is_a_permutation() -> None:
    idx = unpermute_rows(24, 3)
    assert sorted(idx.tolist()) == list(range(24))
    assert idx[:8].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]  # per head: even rows, then odd rows


@needs_kernel
def test_quant_linear_uses_blocks_for_few_rows_and_dense_beyond() -> None:
    qw = random_q4(64, 96)
    dense = torch.nn.Linear(96, 64, bias=True)
    with torch.no_grad():
        dense.weight.copy_(qw.dequantize())
    layer = QuantLinear(dense, qw)
    for rows in (1, 3, layer.max_rows, layer.max_rows + 5):
        x = torch.randn(1, rows, 96)
        assert (layer(x) - dense(x)).abs().max().item() < 1e-4
    # the block path really reads the blocks: corrupt them and the small-batch output moves
    layer.qs.zero_()
    x = torch.randn(1, 1, 96)
    assert (layer(x) - dense(x)).abs().max().item() > 1e-2


def test_force_py_disables_the_kernel(monkeypatch) -> None:
    cpu_quant._load.cache_clear()
    monkeypatch.setenv("SPECDEC_FORCE_PY", "1")
    try:
        ok, reason = cpu_quant.available()
        assert not ok and "SPECDEC_FORCE_PY" in reason
    finally:
        cpu_quant._load.cache_clear()
