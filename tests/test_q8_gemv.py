"""The 8-bit-activation block products (kernels/cpu_q8_gemv.c, --weights gguf-q8) against their PyTorch
reference, every path this machine can build, and each row's result independent of the rows beside it."""


import pytest
import torch

from labkit.kernels import cpu_quant
from labkit.kernels.reference import quant_linear_q8_ref, quant_linear_ref, quantize_rows_q8
from tests.test_kernels import random_q4, random_q8, use_kernel_build

BUILDS = [("", None), ("-mno-avx512f", "avx2-int8"), ("-mno-avx512f -mno-avx2 -mno-fma", "portable-int8")]


@pytest.fixture(scope="module", params=BUILDS, ids=["native", "avx2", "portable"])
def build(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    """The kernel library built with these flags (LABKIT_CPU_KERNEL_FLAGS; the native one in the session's cache,
    the others into a cache of their own, once for this module's tests): the path it took."""
    flags, path = request.param
    with pytest.MonkeyPatch.context() as mp:
        try:
            use_kernel_build(mp, tmp_path_factory.mktemp("kernels") if flags else None, flags)
            if path is not None:
                assert cpu_quant.q8_kernel_path() == path
            yield cpu_quant.q8_kernel_path()
        finally:
            cpu_quant._load.cache_clear()


def test_q8_products_match_the_reference_on_every_path(build: str) -> None:
    for make in (random_q4, random_q8):
        qw = make(577, 576)
        for rows in (1, 3, 8, 11):  # one variant, a middle one, a full chunk, a chunk and a rest
            x = torch.randn(rows, 576) * torch.rand(rows, 1) * 3  # rows of different scales
            ours = cpu_quant.quant_linear(x, qw.kind, qw.qs, qw.d, qw.m, act="q8")
            ref = quant_linear_q8_ref(x, qw.kind, qw.qs, qw.d, qw.m)
            assert (ours - ref).abs().max().item() < 2e-6 * ref.abs().max().item() + 1e-6, (build, make.__name__, rows)


def test_a_rows_q8_product_is_the_same_bits_whatever_rows_share_the_call(build: str) -> None:
    """A verify's row is a decode step's: speculation under --weights gguf-q8 keeps plain steps' tokens."""
    for make in (random_q4, random_q8):
        for N, K in ((192, 1536), (64, 128), (64, 224)):  # blocks: 48, and 4 and 7 (Q4_1's m term: a tail past eight)
            qw = make(N, K)
            x = torch.randn(13, K)
            together = cpu_quant.quant_linear(x, qw.kind, qw.qs, qw.d, qw.m, act="q8")
            for r in range(13):
                alone = cpu_quant.quant_linear(x[r : r + 1].contiguous(), qw.kind, qw.qs, qw.d, qw.m, act="q8")
                assert torch.equal(alone[0], together[r]), (build, make.__name__, K, r)


def test_only_a_build_with_avx512_vnni_tiles_the_weights(build: str) -> None:
    """kernels/cpu_q8_tiles.c: tiles where the build targets AVX-512 with VNNI (tests/test_q8_tiles.py), none elsewhere."""
    flags = cpu_quant.cpu_signature().split()
    assert (cpu_quant.q8_tile_rows() == 16) == (build == "avx2-int8-vnni" and "avx512_vnni" in flags and "avx512bw" in flags), build


def test_q8_activations_are_rounded_and_the_product_near_the_fp32_one() -> None:
    """The reference's quantisation: x * (1 / dx) to nearest, ties to even, within [-127, 127], a zero block
    all zeros; the product within the activations' rounding of the fp32 product, and not equal to it."""
    x = torch.zeros(2, 64)
    x[0, :32] = torch.linspace(-1, 1, 32)  # dx = 1/127: xq = round(127 x)
    x[0, 0] = 2.5 / 127  # 2.5 units of dx: ties to even, 2
    xq, dx, sx = quantize_rows_q8(x)
    assert xq[0, 0, 0].item() == 2 and xq.abs().max().item() == 127
    assert torch.equal(xq[:, 1], torch.zeros_like(xq[:, 1])) and dx[0, 1].item() == 0.0 and dx[1].abs().sum().item() == 0.0
    assert sx[0, 0].item() == (dx[0, 0] * xq[0, 0].sum()).item()
    qw = random_q4(64, 576)
    x = torch.randn(4, 576)
    q8 = quant_linear_q8_ref(x, qw.kind, qw.qs, qw.d, qw.m)
    fp32 = quant_linear_ref(x, qw.kind, qw.qs, qw.d, qw.m)
    err = (q8 - fp32).abs().max().item()
    assert 0 < err < 0.02 * fp32.abs().max().item()


@pytest.mark.parametrize("make", [random_q4, random_q8])
def test_a_q8_product_is_the_fp32_product_of_the_rounded_activations(make) -> None:  # type: ignore[no-untyped-def]
    """x rounded to dx * xq, then multiplied in fp32 by the dequantised weights: the same product (Q4_1's m term
    included: summed over x's own values instead, its error was 2-4x this one's on the model's activations)."""
    qw = make(96, 576)
    x = torch.randn(5, 576) + 0.5  # a mean away from 0: the m term matters
    xq, dx, _ = quantize_rows_q8(x)
    rounded = (xq.float() * dx[..., None]).reshape(x.shape)
    want = quant_linear_ref(rounded, qw.kind, qw.qs, qw.d, qw.m)
    for got in (quant_linear_q8_ref(x, qw.kind, qw.qs, qw.d, qw.m), cpu_quant.quant_linear(x, qw.kind, qw.qs, qw.d, qw.m, act="q8")):
        assert (got - want).abs().max().item() < 2e-6 * want.abs().max().item() + 1e-6
