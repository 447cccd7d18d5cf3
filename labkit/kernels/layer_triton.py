"""Triton kernels for one Llama decoder layer at small T: five launches per layer instead of ~12.

At batch 1 a step of a 135M model moves ~270 MB of weights, 70 us at H200 bandwidth, but runs
hundreds of small kernels: the step is bound by kernel count, not bytes. These kernels fuse what
sits between the matmuls:

    norm_qkv_rope    RMSNorm → q/k/v projection → RoPE on q, k → k, v written into the cache
    decode_attention softmax(q k^T) v over the cache positions each query may see (no mask tensor),
                     split-K: a long context is read by many programs, combined in the same launch
    linear_residual  residual + x W^T                      (attention output, MLP down)
    norm_gate_up     RMSNorm → gate/up projection → silu(gate) * up
    norm_head        the final RMSNorm → LM head (once per step, after the last layer)

Same arguments and results as layer_reference.py (the PyTorch twins). Rows are M = B*T tokens;
matmuls use tl.dot on blocks of 16 rows, so one launch serves a decode step (T=1) and a verify
(T=K+1). Positions come from a device tensor, so a captured CUDA graph serves every position.

Each kernel loads its weight tile (registers, within TUNE["prefetch_bytes"]) before it touches
anything an earlier kernel wrote. On sm90+ the kernels are launched with programmatic dependent
launch: a kernel lets the next one start at once and then waits (griddepcontrol) for the previous
kernel's writes, so the next layer op's weight reads overlap this one's work.
Runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (how CI tests it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from labkit.kernels.attention_triton import decode_attention  # noqa: F401  (the layer's attention op)
from labkit.kernels.draft_triton import chain_inputs, draft_argmax, embed_fc  # noqa: F401  (an EAGLE draft pass's ends)
from labkit.kernels.norm_triton import _norm_projections, _normed
from labkit.kernels.triton_common import (
    BLOCK_M,
    TUNE,  # noqa: F401  (the one tile table)
    _called_off,
    _ieee,
    _k_tiles,
    _launch,
    _only_if_args,
    _pdl,
    _tile,
    _tiled_dot,
    _vec,
    _wait_for_inputs,
    _weight_tiles,
)

TREES = True  # token trees: rope_pos apart from the slots, a tree mask in decode_attention
TAKES_ONLY_IF = True  # the ops take `only_if`: a launch whose flag is false returns after its inputs' wait (specdec/eagle_ops.OnlyIf)
ROW_POSITIONS = True  # input_pos may be (B, T): each batch row at its own positions (batched decoding)
# A prompt's causal pass of up to this many tokens runs through these kernels too (16-row tiles over
# any T). Captured on an H200 (scripts/prefill_costs.py, results/gpu/prefill-costs-NVIDIA-H200-c922de7.txt):
# 0.55 / 0.86 / 1.37 / 2.53 / 4.81 ms at 32 / 128 / 256 / 512 / 1024 tokens against the PyTorch layers'
# 1.15 / 2.14 / 2.28 / 2.54 / 3.25 ms, and the same bits as 16-token steps.
PROMPT_MAX_T = 256


def _loop_k(key: str, x: torch.Tensor) -> int:
    """The loop's reduction tile, halved for 32-bit weights (same bytes in shared memory)."""
    return int(TUNE[key]) * 2 // x.element_size()


@triton.jit
def _norm_qkv_rope_kernel(
    x_ptr, nw_ptr, w_ptr, b_ptr, cos_ptr, sin_ptr, pos_ptr, rope_ptr, q_ptr, kc_ptr, vc_ptr, only_if_ptr,
    M, T, stride_pb, eps, stride_cb, stride_ch, stride_cs, SEP_ROPE: tl.constexpr,
    DIM: tl.constexpr, NH: tl.constexpr, NKV: tl.constexpr, HALF: tl.constexpr, HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr, GDC: tl.constexpr, BLOCK_M: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr,
    BLOCK_K: tl.constexpr, SUB: tl.constexpr, ONLY_IF: tl.constexpr,
):
    h = tl.program_id(0)  # output head: q heads, then k heads, then v heads
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    D: tl.constexpr = 2 * HALF
    offs_d = tl.program_id(1) * SUB + tl.arange(0, SUB)  # SUB dims of the first half, and their rope partners
    rows_lo = h * D + offs_d  # weight rows of this head's first and second halves
    rows_hi = rows_lo + HALF
    r_ok = offs_d < HALF
    acc_lo, acc_hi, _ = _norm_projections(x_ptr, nw_ptr, w_ptr, rows_lo, rows_hi, r_ok, offs_m, m_ok, eps, only_if_ptr, DIM, IEEE,
                                          GDC, KA, KB, BLOCK_K, True, ONLY_IF)  # (BLOCK_M, SUB) each
    if _called_off(only_if_ptr, ONLY_IF):  # (after the wait, inside _norm_projections)
        return
    _qkv_rope_out(acc_lo, acc_hi, h, offs_d, offs_m, m_ok, T, b_ptr, cos_ptr, sin_ptr, pos_ptr, rope_ptr, q_ptr, kc_ptr, vc_ptr,
                  stride_pb, stride_cb, stride_ch, stride_cs, SEP_ROPE, NH, NKV, HALF, HAS_BIAS)


@triton.jit
def _qkv_rope_out(
    acc_lo, acc_hi, h, offs_d, offs_m, m_ok, T, b_ptr, cos_ptr, sin_ptr, pos_ptr, rope_ptr, q_ptr, kc_ptr, vc_ptr,
    stride_pb, stride_cb, stride_ch, stride_cs, SEP_ROPE: tl.constexpr, NH: tl.constexpr, NKV: tl.constexpr,
    HALF: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Head h's dims offs_d and their rope partners (BLOCK_M, SUB) fp32 each: bias, RoPE on q and k,
    q stored, k and v written into the cache at their positions (norm_qkv_rope, the fused chain)."""
    D: tl.constexpr = 2 * HALF
    rows_lo = h * D + offs_d
    rows_hi = rows_lo + HALF
    if HAS_BIAS:
        acc_lo += tl.load(b_ptr + rows_lo).to(tl.float32)[None, :]
        acc_hi += tl.load(b_ptr + rows_hi).to(tl.float32)[None, :]
    dtype = q_ptr.dtype.element_ty
    a_lo = acc_lo.to(dtype).to(tl.float32)  # the projection's output, rounded like nn.Linear's
    a_hi = acc_hi.to(dtype).to(tl.float32)
    t = offs_m % T
    b = offs_m // T
    pos = tl.load(pos_ptr + b * stride_pb + t, mask=m_ok, other=0)  # (BLOCK_M,): stride_pb 0 when rows share positions
    rpos = pos
    if SEP_ROPE:  # tree nodes: rotary position (their depth) apart from their cache slot
        rpos = tl.load(rope_ptr + t, mask=m_ok, other=0)
    is_v = h >= NH + NKV
    if not is_v:  # RoPE: x*cos + rotate_half(x)*sin, with the tables' sin already negated in its first half
        c_lo = tl.load(cos_ptr + rpos[:, None] * D + offs_d[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
        c_hi = tl.load(cos_ptr + rpos[:, None] * D + HALF + offs_d[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
        s_lo = tl.load(sin_ptr + rpos[:, None] * D + offs_d[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
        s_hi = tl.load(sin_ptr + rpos[:, None] * D + HALF + offs_d[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
        y_lo = a_lo * c_lo + a_hi * s_lo
        y_hi = a_hi * c_hi + a_lo * s_hi
    else:
        y_lo = a_lo
        y_hi = a_hi
    if h < NH:  # q: (M, NH, D)
        dst = q_ptr + offs_m[:, None] * (NH * D) + h * D + offs_d[None, :]
    elif h < NH + NKV:  # k and v go straight into the cache at their positions
        dst = kc_ptr + b[:, None] * stride_cb + (h - NH) * stride_ch + pos[:, None] * stride_cs + offs_d[None, :]
    else:
        dst = vc_ptr + b[:, None] * stride_cb + (h - NH - NKV) * stride_ch + pos[:, None] * stride_cs + offs_d[None, :]
    tl.store(dst, y_lo.to(dtype), mask=m_ok[:, None])
    tl.store(dst + HALF, y_hi.to(dtype), mask=m_ok[:, None])


def norm_qkv_rope(
    x: torch.Tensor,  # (M, dim), M = B*T rows in (b, t) order
    norm_w: torch.Tensor,  # (dim,)
    eps: float,
    w: torch.Tensor,  # (NH*D + 2*NKV*D, dim) q, k, v rows
    bias: torch.Tensor | None,  # (NH*D + 2*NKV*D,)
    cos: torch.Tensor,  # (S, D) rope table
    sin: torch.Tensor,  # (S, D) rope table, first half negated
    input_pos: torch.Tensor,  # (T,) positions of the T tokens, or (B, T): each batch row at its own
    k_cache: torch.Tensor,  # (B, NKV, S, D) this layer's cache, written at input_pos
    v_cache: torch.Tensor,  # (B, NKV, S, D)
    n_heads: int,
    rope_pos: torch.Tensor | None = None,  # (T,) rotary positions when they are not the cache slots (tree nodes)
    only_if: torch.Tensor | None = None,  # (1,) bool on the device: where false the launch does nothing past
    # its inputs' wait, its outputs unwritten (triton_common._called_off)
) -> torch.Tensor:  # q: (M, NH, D), roped
    M, dim = x.shape
    _, nkv, _, D = k_cache.shape
    assert D % 32 == 0 and k_cache.stride(3) == 1 and x.is_contiguous() and w.is_contiguous() and input_pos.is_contiguous()
    q = torch.empty(M, n_heads, D, dtype=x.dtype, device=x.device)
    sub = min(TUNE["qkv_sub"], D // 2)
    grid = (n_heads + 2 * nkv, D // 2 // sub, triton.cdiv(M, BLOCK_M))
    ka, kb = _k_tiles(dim, 2 * sub * w.element_size())  # lo and hi rows
    pdl = _pdl(x)
    flag, only = _only_if_args(only_if, x)
    _norm_qkv_rope_kernel[grid](
        x, norm_w, w, bias if bias is not None else w, cos, sin, input_pos, rope_pos if rope_pos is not None else input_pos,
        q, k_cache, v_cache, flag, M, input_pos.shape[-1], input_pos.shape[-1] if input_pos.dim() == 2 else 0, eps,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), SEP_ROPE=rope_pos is not None, DIM=dim, NH=n_heads, NKV=nkv, HALF=D // 2, HAS_BIAS=bias is not None, IEEE=_ieee(x), GDC=pdl,
        BLOCK_M=BLOCK_M, KA=ka, KB=kb, BLOCK_K=_loop_k("norm_block_k", w), SUB=sub, ONLY_IF=only, num_warps=TUNE["num_warps"], **_launch(pdl),
    )
    return q


@triton.jit
def _linear_residual_rows(
    x_ptr, w_ptr, b_ptr, res_ptr, out_ptr, offs_m, m_ok, offs_n, n_ok, w_a, w_b, N: tl.constexpr, K: tl.constexpr,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """After the inputs' wait: residual + x W^T + bias for a tile of rows and columns (w_a, w_b the
    weight tiles loaded up front), stored and returned (linear_residual, chain_triton's fused chain)."""
    acc = _tiled_dot(x_ptr, offs_m, m_ok, w_ptr, offs_n, n_ok, w_a, w_b, K, IEEE, KA, KB, BLOCK_K)  # (BLOCK_M, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    dtype = out_ptr.dtype.element_ty
    ok = m_ok[:, None] & n_ok[None, :]
    res = tl.load(res_ptr + offs_m[:, None] * N + offs_n[None, :], mask=ok, other=0.0)
    y = acc.to(dtype).to(tl.float32) + res.to(tl.float32)  # rounded like x + linear(y)
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], y.to(dtype), mask=ok)
    return y.to(dtype)


@triton.jit
def _linear_residual_kernel(
    x_ptr, w_ptr, b_ptr, res_ptr, out_ptr, only_if_ptr, M, N: tl.constexpr, K: tl.constexpr, HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr, GDC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KA: tl.constexpr,
    KB: tl.constexpr, BLOCK_K: tl.constexpr, ONLY_IF: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok, n_ok = offs_m < M, offs_n < N
    w_a, w_b = _weight_tiles(w_ptr, offs_n, n_ok, K, KA, KB)  # (BLOCK_N, KA), (BLOCK_N, KB): weights first, before the wait
    _wait_for_inputs(GDC)
    if _called_off(only_if_ptr, ONLY_IF):
        return
    _linear_residual_rows(x_ptr, w_ptr, b_ptr, res_ptr, out_ptr, offs_m, m_ok, offs_n, n_ok, w_a, w_b, N, K, HAS_BIAS, IEEE,
                          KA, KB, BLOCK_K)


def linear_residual(
    x: torch.Tensor,  # (M, K)
    w: torch.Tensor,  # (N, K)
    bias: torch.Tensor | None,  # (N,)
    residual: torch.Tensor,  # (M, N)
    only_if: torch.Tensor | None = None,  # (1,) bool on the device: where false the launch does nothing past
    # its inputs' wait, its outputs unwritten (triton_common._called_off)
) -> torch.Tensor:  # (M, N): residual + x w^T + bias
    M, K = x.shape
    N = w.shape[0]
    assert x.is_contiguous() and w.is_contiguous() and residual.is_contiguous()
    out = torch.empty(M, N, dtype=residual.dtype, device=x.device)
    BLOCK_N = TUNE["linear_block_n"]  # many small programs: at M <= 16 the work is reading w, spread over the SMs
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(M, BLOCK_M))
    ka, kb = _k_tiles(K, BLOCK_N * w.element_size())
    pdl = _pdl(x)
    flag, only = _only_if_args(only_if, x)
    _linear_residual_kernel[grid](
        x, w, bias if bias is not None else w, residual, out, flag, M, N, K, HAS_BIAS=bias is not None, IEEE=_ieee(x),
        GDC=pdl, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, KA=ka, KB=kb, BLOCK_K=_loop_k("linear_block_k", w), ONLY_IF=only,
        num_warps=TUNE["num_warps"], **_launch(pdl),
    )
    return out


@triton.jit
def _norm_gate_up_kernel(
    x_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, only_if_ptr, M, eps, DIM: tl.constexpr, HID: tl.constexpr, HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr, GDC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KA: tl.constexpr,
    KB: tl.constexpr, BLOCK_K: tl.constexpr, ONLY_IF: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok, n_ok = offs_m < M, offs_n < HID
    acc_g, acc_u, _ = _norm_projections(x_ptr, nw_ptr, w_ptr, offs_n, HID + offs_n, n_ok, offs_m, m_ok, eps, only_if_ptr, DIM, IEEE,
                                        GDC, KA, KB, BLOCK_K, True, ONLY_IF)  # (BLOCK_M, BLOCK_N) each
    if _called_off(only_if_ptr, ONLY_IF):  # (after the wait, inside _norm_projections)
        return
    _gate_up_out(acc_g, acc_u, b_ptr, out_ptr, offs_m, m_ok, offs_n, n_ok, HID, HAS_BIAS)


@triton.jit
def _gate_up_out(acc_g, acc_u, b_ptr, out_ptr, offs_m, m_ok, offs_n, n_ok, HID: tl.constexpr, HAS_BIAS: tl.constexpr):
    """silu(gate) * up from the two products (BLOCK_M, BLOCK_N) fp32, stored (norm_gate_up, the fused chain)."""
    if HAS_BIAS:
        acc_g += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b_ptr + HID + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    dtype = out_ptr.dtype.element_ty
    g = acc_g.to(dtype).to(tl.float32)  # rounded at the points where PyTorch rounds
    u = acc_u.to(dtype).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    ok = m_ok[:, None] & n_ok[None, :]
    tl.store(out_ptr + offs_m[:, None] * HID + offs_n[None, :], (act * u).to(dtype), mask=ok)


def norm_gate_up(
    x: torch.Tensor,  # (M, dim)
    norm_w: torch.Tensor,  # (dim,)
    eps: float,
    w: torch.Tensor,  # (2*hidden, dim): gate rows, then up rows
    bias: torch.Tensor | None,  # (2*hidden,)
    only_if: torch.Tensor | None = None,  # (1,) bool on the device: where false the launch does nothing past
    # its inputs' wait, its outputs unwritten (triton_common._called_off)
) -> torch.Tensor:  # (M, hidden): silu(gate) * up
    M, dim = x.shape
    hid = w.shape[0] // 2
    assert x.is_contiguous() and w.is_contiguous()
    out = torch.empty(M, hid, dtype=x.dtype, device=x.device)
    BLOCK_N = TUNE["gate_block_n"]
    grid = (triton.cdiv(hid, BLOCK_N), triton.cdiv(M, BLOCK_M))
    ka, kb = _k_tiles(dim, 2 * BLOCK_N * w.element_size())  # gate and up rows
    pdl = _pdl(x)
    flag, only = _only_if_args(only_if, x)
    _norm_gate_up_kernel[grid](
        x, norm_w, w, bias if bias is not None else w, out, flag, M, eps, DIM=dim, HID=hid, HAS_BIAS=bias is not None,
        IEEE=_ieee(x), GDC=pdl, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, KA=ka, KB=kb, BLOCK_K=_loop_k("norm_block_k", w), ONLY_IF=only,
        num_warps=TUNE["num_warps"], **_launch(pdl),
    )
    return out


@triton.jit
def _norm_head_kernel(
    x_ptr, nw_ptr, w_ptr, out_ptr, h_ptr, M, eps, DIM: tl.constexpr, V: tl.constexpr, KEEP_H: tl.constexpr,
    IEEE: tl.constexpr, GDC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KA: tl.constexpr,
    KB: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok, n_ok = offs_m < M, offs_n < V
    acc, _, rstd = _norm_projections(x_ptr, nw_ptr, w_ptr, offs_n, offs_n, n_ok, offs_m, m_ok, eps, x_ptr, DIM, IEEE, GDC,
                                     KA, KB, BLOCK_K, False, False)  # (BLOCK_M, BLOCK_N), (BLOCK_M,)
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + offs_m[:, None] * V + offs_n[None, :], acc.to(dtype), mask=m_ok[:, None] & n_ok[None, :])
    if KEEP_H:
        if tl.program_id(0) == 0:  # one column of programs also writes the normalised rows
            for k0 in range(0, DIM, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                h = _normed(_tile(x_ptr, offs_m, m_ok, k0, DIM, BLOCK_K), _vec(nw_ptr, k0, DIM, BLOCK_K), rstd)
                tl.store(h_ptr + offs_m[:, None] * DIM + offs_k[None, :], h, mask=m_ok[:, None] & (offs_k[None, :] < DIM))


def norm_head(
    x: torch.Tensor,  # (M, dim) the last layer's output
    norm_w: torch.Tensor,  # (dim,) the final norm's weight
    eps: float,
    w: torch.Tensor,  # (vocab, dim) the LM head
    keep_normed: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # logits (M, vocab); RMSNorm(x) (M, dim) when kept
    """The final RMSNorm and the LM head in one launch (cuBLAS's GEMM picks its kernel by M, and
    the norm is four small kernels of its own)."""
    M, dim = x.shape
    V = w.shape[0]
    assert x.is_contiguous() and w.is_contiguous()
    out = torch.empty(M, V, dtype=x.dtype, device=x.device)
    h = torch.empty(M, dim, dtype=x.dtype, device=x.device) if keep_normed else out
    BLOCK_N = TUNE["head_block_n"]
    grid = (triton.cdiv(V, BLOCK_N), triton.cdiv(M, BLOCK_M))
    ka, kb = _k_tiles(dim, BLOCK_N * w.element_size())
    pdl = _pdl(x)
    _norm_head_kernel[grid](
        x, norm_w, w, out, h, M, eps, DIM=dim, V=V, KEEP_H=keep_normed, IEEE=_ieee(x), GDC=pdl, BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N, KA=ka, KB=kb, BLOCK_K=_loop_k("norm_block_k", w), num_warps=TUNE["num_warps"], **_launch(pdl),
    )
    return out, h if keep_normed else None
