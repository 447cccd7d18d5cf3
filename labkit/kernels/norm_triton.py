"""RMSNorm inside the fused layer kernels (layer_triton.py; chain_triton.py's fused chain): a
program's rows normalised as PyTorch rounds them, then multiplied by its weight tiles. The weight
tiles load first (_norm_weights), so a kernel can wait on the one before between the two halves
(_norm_projections does both, the wait between).
"""

from __future__ import annotations

import triton
import triton.language as tl

from labkit.kernels.triton_common import _called_off, _dot, _tile, _vec, _wait_for_inputs


@triton.jit
def _sumsq(x):
    xf = x.to(tl.float32)
    return tl.sum(xf * xf, axis=1)


@triton.jit
def _normed(x, nw, rstd):
    """RMSNorm(x) for a tile of rows, rounded as the PyTorch norm rounds: half precision
    normalises in fp32, rounds, then scales (HF's order); fp32 does the same in fp32."""
    xn = (x.to(tl.float32) * rstd[:, None]).to(x.dtype).to(tl.float32)
    return (xn * nw.to(tl.float32)[None, :]).to(x.dtype)


@triton.jit
def _rstd(x_a, x_b, x_ptr, offs_m, m_ok, eps, DIM: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / RMS of each row, in fp32, from the tiles in hand and a loop over the columns past them."""
    ss = _sumsq(x_a)
    if KB > 0:
        ss += _sumsq(x_b)
    for k0 in range(KA + KB, DIM, BLOCK_K):
        ss += _sumsq(_tile(x_ptr, offs_m, m_ok, k0, DIM, BLOCK_K))
    return 1.0 / tl.sqrt(ss / DIM + eps)


@triton.jit
def _norm_weights(w_ptr, nw_ptr, rows_a, rows_b, r_ok, DIM: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, TWO: tl.constexpr):
    """The tiles _norm_products reads, loaded up front: W[rows_a] and (TWO) W[rows_b] columns
    [0, KA) and [KA, KA + KB), and the norm's weight there (tiles repeated where absent)."""
    w_a_lo = _tile(w_ptr, rows_a, r_ok, 0, DIM, KA)  # (rows, KA)
    w_b_lo = w_a_lo
    if TWO:
        w_b_lo = _tile(w_ptr, rows_b, r_ok, 0, DIM, KA)
    nw_lo = _vec(nw_ptr, 0, DIM, KA)
    w_a_hi, w_b_hi, nw_hi = w_a_lo, w_b_lo, nw_lo
    if KB > 0:
        w_a_hi = _tile(w_ptr, rows_a, r_ok, KA, DIM, KB)  # (rows, KB)
        w_b_hi = w_a_hi
        if TWO:
            w_b_hi = _tile(w_ptr, rows_b, r_ok, KA, DIM, KB)
        nw_hi = _vec(nw_ptr, KA, DIM, KB)
    return w_a_lo, w_b_lo, nw_lo, w_a_hi, w_b_hi, nw_hi


@triton.jit
def _norm_products(
    x_ptr, nw_ptr, w_ptr, rows_a, rows_b, r_ok, offs_m, m_ok, eps, w_a_lo, w_b_lo, nw_lo, w_a_hi, w_b_hi, nw_hi, DIM: tl.constexpr,
    IEEE: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BLOCK_K: tl.constexpr, TWO: tl.constexpr,
):
    """After the inputs' wait: RMSNorm(x) @ W[rows_a]^T and (TWO) @ W[rows_b]^T, fp32 (BLOCK_M,
    len(rows)) each, and the rows' 1/RMS, from _norm_weights' tiles. Without TWO the second result
    is the first."""
    x_lo = _tile(x_ptr, offs_m, m_ok, 0, DIM, KA)  # (BLOCK_M, KA)
    x_hi = x_lo
    if KB > 0:
        x_hi = _tile(x_ptr, offs_m, m_ok, KA, DIM, KB)
    rstd = _rstd(x_lo, x_hi, x_ptr, offs_m, m_ok, eps, DIM, KA, KB, BLOCK_K)  # (BLOCK_M,)
    xn = _normed(x_lo, nw_lo, rstd)
    acc_a = _dot(xn, tl.trans(w_a_lo), IEEE)  # (BLOCK_M, rows)
    if TWO:
        acc_b = _dot(xn, tl.trans(w_b_lo), IEEE)
    if KB > 0:
        xn_hi = _normed(x_hi, nw_hi, rstd)
        acc_a += _dot(xn_hi, tl.trans(w_a_hi), IEEE)
        if TWO:
            acc_b += _dot(xn_hi, tl.trans(w_b_hi), IEEE)
    for k0 in range(KA + KB, DIM, BLOCK_K):  # columns past the prefetched tiles (larger models)
        xk = _normed(_tile(x_ptr, offs_m, m_ok, k0, DIM, BLOCK_K), _vec(nw_ptr, k0, DIM, BLOCK_K), rstd)
        acc_a += _dot(xk, tl.trans(_tile(w_ptr, rows_a, r_ok, k0, DIM, BLOCK_K)), IEEE)
        if TWO:
            acc_b += _dot(xk, tl.trans(_tile(w_ptr, rows_b, r_ok, k0, DIM, BLOCK_K)), IEEE)
    if not TWO:
        acc_b = acc_a
    return acc_a, acc_b, rstd


@triton.jit
def _norm_projections(
    x_ptr, nw_ptr, w_ptr, rows_a, rows_b, r_ok, offs_m, m_ok, eps, only_if_ptr, DIM: tl.constexpr, IEEE: tl.constexpr,
    GDC: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BLOCK_K: tl.constexpr, TWO: tl.constexpr, ONLY_IF: tl.constexpr,
):
    """_norm_weights, the wait on the previous kernel, then _norm_products. A launch called off
    (_called_off) reads no row of x (its kernel then returns before writing)."""
    w_a_lo, w_b_lo, nw_lo, w_a_hi, w_b_hi, nw_hi = _norm_weights(w_ptr, nw_ptr, rows_a, rows_b, r_ok, DIM, KA, KB, TWO)
    _wait_for_inputs(GDC)
    if _called_off(only_if_ptr, ONLY_IF):
        m_ok = m_ok & (offs_m < 0)
    return _norm_products(x_ptr, nw_ptr, w_ptr, rows_a, rows_b, r_ok, offs_m, m_ok, eps, w_a_lo, w_b_lo, nw_lo, w_a_hi, w_b_hi, nw_hi,
                          DIM, IEEE, KA, KB, BLOCK_K, TWO)
