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

import functools
import os

import torch
import triton
import triton.language as tl

BLOCK_M = 16  # rows (tokens) per program: tl.dot's smallest tile
# Tile sizes. At batch 1 each kernel reads a few hundred KB of weights: many small programs keep
# more SMs reading at once. scripts/layer_tune.py times alternatives on a GPU.
TUNE = {
    "qkv_sub": 32,  # q/k/v output dims per program (of each head half; its rope partners come along)
    "gate_block_n": 32,  # gate/up output columns per program
    "linear_block_n": 32,  # output columns per program (tl.dot needs >= 16)
    "head_block_n": 64,  # vocabulary columns per program of the LM head
    "prefetch_bytes": 96 * 1024,  # weights a program loads up front (registers, then shared memory for tl.dot)
    "linear_block_k": 512,  # reduction tile (16-bit weights) for the columns past the prefetch (larger models)
    "norm_block_k": 256,  # the same for the kernels that also normalise
    "attn_split_s": 256,  # keys per attention program (split-K: a long context is read by many programs at once;
    # on an H200 at 4096 keys 256 ran 729 us per decode step, 128 781, 64 958; all ~540 at 32 keys)
    "attn_block_s": 64,  # keys per step of an attention program's loop
    "attn_combine_chunk": 8,  # partial results the combining program loads at a time
    "num_warps": 4,
    "pdl": True,  # programmatic dependent launch (sm90+): the next kernel starts reading its weights early
}


def _ieee(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _sm90(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _pdl(x: torch.Tensor) -> bool:
    """Launch with programmatic dependent launch: on Hopper and later, not under the interpreter."""
    return bool(TUNE["pdl"]) and os.environ.get("TRITON_INTERPRET") != "1" and _sm90(x.device)


def _k_tiles(K: int, row_bytes: int) -> tuple[int, int]:
    """Two power-of-two tiles (KA, KB) of reduction columns that a program loads before its wait,
    within prefetch_bytes; row_bytes is what one column costs it (weight rows x matrices x element
    size). 576 = 512 + 64, 1536 = 1024 + 512; a loop covers any columns past KA + KB."""
    pre = max(16, min(K, int(TUNE["prefetch_bytes"]) // row_bytes))
    ka = 1 << (pre.bit_length() - 1)
    rest = pre - ka
    kb = 1 << (rest.bit_length() - 1) if rest >= 16 else 0  # tl.dot needs K >= 16
    return ka, kb


def _loop_k(key: str, x: torch.Tensor) -> int:
    """The loop's reduction tile, halved for 32-bit weights (same bytes in shared memory)."""
    return int(TUNE[key]) * 2 // x.element_size()


def _launch(pdl: bool) -> dict:
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # fp32 weights (no silent TF32), or the interpreter (whose half-precision dot is wrong)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _tile(ptr, rows, r_ok, k0, K: tl.constexpr, KT: tl.constexpr):
    """Columns k0..k0+KT of the given rows of a row-major (*, K) matrix, zeros past K."""
    offs_k = k0 + tl.arange(0, KT)
    return tl.load(ptr + rows[:, None] * K + offs_k[None, :], mask=r_ok[:, None] & (offs_k[None, :] < K), other=0.0)


@triton.jit
def _vec(ptr, k0, K: tl.constexpr, KT: tl.constexpr):
    offs_k = k0 + tl.arange(0, KT)
    return tl.load(ptr + offs_k, mask=offs_k < K, other=0.0)


@triton.jit
def _wait_for_inputs(GDC: tl.constexpr):
    """Under programmatic dependent launch: let the next kernel start (it only reads weights until
    its own wait), then wait until the previous kernel's writes are visible. Nothing a kernel
    writes, and nothing an earlier kernel wrote, may be touched before this."""
    if GDC:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


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
def _norm_projections(
    x_ptr, nw_ptr, w_ptr, rows_a, rows_b, r_ok, offs_m, m_ok, eps, DIM: tl.constexpr, IEEE: tl.constexpr,
    GDC: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BLOCK_K: tl.constexpr, TWO: tl.constexpr,
):
    """RMSNorm(x) @ W[rows_a]^T and (with TWO) @ W[rows_b]^T, fp32 (BLOCK_M, len(rows)) each, and the
    rows' 1/RMS: the weight tiles (and the norm's weight) are loaded before waiting on the previous
    kernel. Without TWO the second result is the first."""
    w_a_lo = _tile(w_ptr, rows_a, r_ok, 0, DIM, KA)  # (rows, KA)
    if TWO:
        w_b_lo = _tile(w_ptr, rows_b, r_ok, 0, DIM, KA)
    nw_lo = _vec(nw_ptr, 0, DIM, KA)
    if KB > 0:
        w_a_hi = _tile(w_ptr, rows_a, r_ok, KA, DIM, KB)  # (rows, KB)
        if TWO:
            w_b_hi = _tile(w_ptr, rows_b, r_ok, KA, DIM, KB)
        nw_hi = _vec(nw_ptr, KA, DIM, KB)
    _wait_for_inputs(GDC)
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
def _norm_qkv_rope_kernel(
    x_ptr, nw_ptr, w_ptr, b_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, kc_ptr, vc_ptr,
    M, T, eps, stride_cb, stride_ch, stride_cs,
    DIM: tl.constexpr, NH: tl.constexpr, NKV: tl.constexpr, HALF: tl.constexpr, HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr, GDC: tl.constexpr, BLOCK_M: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr,
    BLOCK_K: tl.constexpr, SUB: tl.constexpr,
):
    h = tl.program_id(0)  # output head: q heads, then k heads, then v heads
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    D: tl.constexpr = 2 * HALF
    offs_d = tl.program_id(1) * SUB + tl.arange(0, SUB)  # SUB dims of the first half, and their rope partners
    rows_lo = h * D + offs_d  # weight rows of this head's first and second halves
    rows_hi = rows_lo + HALF
    r_ok = offs_d < HALF
    acc_lo, acc_hi, _ = _norm_projections(x_ptr, nw_ptr, w_ptr, rows_lo, rows_hi, r_ok, offs_m, m_ok, eps, DIM, IEEE, GDC,
                                          KA, KB, BLOCK_K, True)  # (BLOCK_M, SUB) each
    if HAS_BIAS:
        acc_lo += tl.load(b_ptr + rows_lo).to(tl.float32)[None, :]
        acc_hi += tl.load(b_ptr + rows_hi).to(tl.float32)[None, :]
    dtype = q_ptr.dtype.element_ty
    a_lo = acc_lo.to(dtype).to(tl.float32)  # the projection's output, rounded like nn.Linear's
    a_hi = acc_hi.to(dtype).to(tl.float32)
    t = offs_m % T
    b = offs_m // T
    pos = tl.load(pos_ptr + t, mask=m_ok, other=0)  # (BLOCK_M,)
    is_v = h >= NH + NKV
    if not is_v:  # RoPE: x*cos + rotate_half(x)*sin, with the tables' sin already negated in its first half
        c_lo = tl.load(cos_ptr + pos[:, None] * D + offs_d[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
        c_hi = tl.load(cos_ptr + pos[:, None] * D + HALF + offs_d[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
        s_lo = tl.load(sin_ptr + pos[:, None] * D + offs_d[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
        s_hi = tl.load(sin_ptr + pos[:, None] * D + HALF + offs_d[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
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
    input_pos: torch.Tensor,  # (T,) positions of the T tokens
    k_cache: torch.Tensor,  # (B, NKV, S, D) this layer's cache, written at input_pos
    v_cache: torch.Tensor,  # (B, NKV, S, D)
    n_heads: int,
) -> torch.Tensor:  # q: (M, NH, D), roped
    M, dim = x.shape
    _, nkv, _, D = k_cache.shape
    assert D % 32 == 0 and k_cache.stride(3) == 1 and x.is_contiguous() and w.is_contiguous()
    q = torch.empty(M, n_heads, D, dtype=x.dtype, device=x.device)
    sub = min(TUNE["qkv_sub"], D // 2)
    grid = (n_heads + 2 * nkv, D // 2 // sub, triton.cdiv(M, BLOCK_M))
    ka, kb = _k_tiles(dim, 2 * sub * w.element_size())  # lo and hi rows
    pdl = _pdl(x)
    _norm_qkv_rope_kernel[grid](
        x, norm_w, w, bias if bias is not None else w, cos, sin, input_pos, q, k_cache, v_cache,
        M, input_pos.shape[0], eps, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        DIM=dim, NH=n_heads, NKV=nkv, HALF=D // 2, HAS_BIAS=bias is not None, IEEE=_ieee(x), GDC=pdl,
        BLOCK_M=BLOCK_M, KA=ka, KB=kb, BLOCK_K=_loop_k("norm_block_k", w), SUB=sub, num_warps=TUNE["num_warps"], **_launch(pdl),
    )
    return q


@triton.jit
def _attention_kernel(
    q_ptr, kc_ptr, vc_ptr, pos_ptr, out_ptr, part_o_ptr, part_ml_ptr, count_ptr, T, R, R_BLOCKS, N_SPLITS, scale,
    stride_cb, stride_ch, stride_cs, NH: tl.constexpr, NKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    WINDOW: tl.constexpr, SPLIT_S: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, NS_POW2: tl.constexpr,
    CHUNK: tl.constexpr, IEEE: tl.constexpr, GDC: tl.constexpr,
):
    """Program (tile, split): the rows of one (batch row, kv head, block of BLOCK_R rows) against
    the keys of split `split`, positions [split * SPLIT_S, (split + 1) * SPLIT_S). Rows are (token
    t, query head g of the kv head's group), so a key block is read once for every query head that
    shares it. Split boundaries are absolute positions and every tile has BLOCK_R rows, so a row's
    sums run in the same order whatever tokens share its tile: a verify row gets a decode step's bits."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    rb = tile % R_BLOCKS
    kvh = (tile // R_BLOCKS) % NKV
    b = tile // (R_BLOCKS * NKV)
    _wait_for_inputs(GDC)  # everything it reads but the positions comes from the kernel before
    local = tl.arange(0, BLOCK_R)
    offs_r = rb * BLOCK_R + local  # (BLOCK_R,) row r = t * GROUP + g
    r_ok = offs_r < R
    t = offs_r // GROUP
    head = kvh * GROUP + offs_r % GROUP
    pos = tl.load(pos_ptr + t, mask=r_ok, other=-1)  # (BLOCK_R,) row r sees keys lo_r..pos_r
    if WINDOW > 0:
        lo_r = tl.maximum(pos - WINDOW + 1, 0)
    else:
        lo_r = pos * 0
    hi = tl.max(pos, axis=0)  # the last key any row sees
    lo = tl.min(tl.where(r_ok, lo_r, hi), axis=0)  # the first
    first = lo // SPLIT_S  # the splits holding visible keys: first..last (the grid may end sooner:
    last = tl.minimum(hi // SPLIT_S, N_SPLITS - 1)  # rows past the span are tokens nobody keeps)
    if (split >= first) & (split <= last):
        offs_d = tl.arange(0, D)
        q_rows = (b * T + t) * NH + head  # (BLOCK_R,) rows of q (M, NH, D) and of out (M, NH*D)
        q = tl.load(q_ptr + q_rows[:, None] * D + offs_d[None, :], mask=r_ok[:, None], other=0.0)  # (BLOCK_R, D)
        base = b * stride_cb + kvh * stride_ch
        qk_scale = scale * 1.4426950408889634  # scores in log2 units: exp2 instead of exp
        m_i = tl.full([BLOCK_R], -float("inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R, D], dtype=tl.float32)
        s_first = tl.maximum(split * SPLIT_S, lo)
        s_end = tl.minimum(split * SPLIT_S + SPLIT_S, hi + 1)
        for s0 in range((s_first // BLOCK_S) * BLOCK_S, s_end, BLOCK_S):  # blocks start BLOCK_S-aligned
            offs_s = s0 + tl.arange(0, BLOCK_S)  # (BLOCK_S,)
            s_ok = (offs_s >= s_first) & (offs_s < s_end)
            k = tl.load(kc_ptr + base + offs_s[:, None] * stride_cs + offs_d[None, :], mask=s_ok[:, None], other=0.0)  # (BLOCK_S, D)
            v = tl.load(vc_ptr + base + offs_s[:, None] * stride_cs + offs_d[None, :], mask=s_ok[:, None], other=0.0)
            seen = (offs_s[None, :] >= lo_r[:, None]) & (offs_s[None, :] <= pos[:, None]) & s_ok[None, :]  # (BLOCK_R, BLOCK_S)
            s = tl.where(seen, _dot(q, tl.trans(k), IEEE) * qk_scale, -float("inf"))  # (BLOCK_R, BLOCK_S) fp32
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # a row with no key seen yet keeps zeros
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            if IEEE:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:  # half precision: p rounded to v's type for the tensor cores, as flash attention does
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        out_dtype = out_ptr.dtype.element_ty
        if first == last:  # one split holds every visible key: the result is final
            tl.store(out_ptr + q_rows[:, None] * D + offs_d[None, :], (acc / l_i[:, None]).to(out_dtype), mask=r_ok[:, None])
        else:  # keep this split's partial result; the last split to finish combines them
            at = (tile * N_SPLITS + split) * BLOCK_R + local  # (BLOCK_R,)
            tl.store(part_o_ptr + at[:, None] * D + offs_d[None, :], acc, mask=r_ok[:, None])
            tl.store(part_ml_ptr + at * 2, m_i, mask=r_ok)
            tl.store(part_ml_ptr + at * 2 + 1, l_i, mask=r_ok)
            tl.debug_barrier()  # every thread's partial is written before the count goes up
            done = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if done == last - first:
                # .cg: read past this SM's L1, which may hold another launch's partials at these addresses
                sp = first + tl.arange(0, NS_POW2)
                ok = r_ok[:, None] & (sp[None, :] <= last)
                m_all = tl.load(part_ml_ptr + ((tile * N_SPLITS + sp[None, :]) * BLOCK_R + local[:, None]) * 2, mask=ok,
                                other=-float("inf"), cache_modifier=".cg")  # (BLOCK_R, NS_POW2)
                m_max = tl.max(m_all, axis=1)  # exact, whatever the order
                m_max = tl.where(m_max == -float("inf"), 0.0, m_max)
                den = tl.zeros([BLOCK_R], dtype=tl.float32)
                o = tl.zeros([BLOCK_R, D], dtype=tl.float32)
                for c0 in range(first, last + 1, CHUNK):  # in split order, CHUNK loads in flight at a time
                    for c in tl.static_range(CHUNK):
                        c_ok = r_ok & (local * 0 + c0 + c <= last)  # (BLOCK_R,)
                        c_at = (tile * N_SPLITS + c0 + c) * BLOCK_R + local
                        w = tl.exp2(tl.load(part_ml_ptr + c_at * 2, mask=c_ok, other=-float("inf"), cache_modifier=".cg") - m_max)
                        den += w * tl.load(part_ml_ptr + c_at * 2 + 1, mask=c_ok, other=0.0, cache_modifier=".cg")
                        o += w[:, None] * tl.load(part_o_ptr + c_at[:, None] * D + offs_d[None, :], mask=c_ok[:, None], other=0.0,
                                                  cache_modifier=".cg")
                tl.store(out_ptr + q_rows[:, None] * D + offs_d[None, :], (o / den[:, None]).to(out_dtype), mask=r_ok[:, None])
                tl.store(count_ptr + tile, 0)  # ready for the next launch


def decode_attention(
    q: torch.Tensor,  # (M, NH, D), M = B*T
    k_cache: torch.Tensor,  # (B, NKV, S, D)
    v_cache: torch.Tensor,  # (B, NKV, S, D)
    input_pos: torch.Tensor,  # (T,) query t sees keys at positions <= input_pos[t]
    scale: float,
    window: int | None,  # sliding window: also only keys > input_pos[t] - window
    counters: torch.Tensor,  # (>= B*NKV*row blocks,) int32 zeros, owned by the caller (the cache), left zero
    span: int | None = None,  # positions a kept query may see: [0, span) (default: the whole cache)
) -> torch.Tensor:  # (M, NH*D)
    """Split-K (flash-decoding) attention in one launch. The keys [0, span) are cut into splits of
    attn_split_s positions, one program per (tile of rows, split), so a long context is read by
    many programs at once; each split keeps its partial softmax (running max, sum and weighted
    values), and the last split of a tile to finish (an atomic count) combines them in split
    order, so the result does not depend on which finished last. A tile whose keys lie in one
    split (every short context) writes its result directly. The grid depends on `span`, never on
    the positions, so one captured CUDA graph serves every position below it."""
    M, nh, D = q.shape
    B, nkv, S, _ = k_cache.shape
    T = input_pos.shape[0]
    group = nh // nkv
    R = T * group  # rows per (batch row, kv head)
    block_r = 16  # the same for every T: a row's arithmetic never depends on its neighbours
    r_blocks = triton.cdiv(R, block_r)
    split_s = int(TUNE["attn_split_s"])
    n_splits = triton.cdiv(min(span or S, S), split_s)
    tiles = B * nkv * r_blocks
    if counters.numel() < tiles or counters.dtype != torch.int32:
        raise ValueError(f"attention needs {tiles} int32 counters, got {counters.numel()} {counters.dtype}")
    out = torch.empty(M, nh * D, dtype=q.dtype, device=q.device)
    part_o = torch.empty(tiles * n_splits * block_r, D, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(tiles * n_splits * block_r, 2, dtype=torch.float32, device=q.device)
    pdl = _pdl(q)
    _attention_kernel[(tiles, n_splits)](
        q, k_cache, v_cache, input_pos, out, part_o, part_ml, counters, T, R, r_blocks, n_splits, scale,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NH=nh, NKV=nkv, GROUP=group, D=D, WINDOW=window or 0, SPLIT_S=split_s, BLOCK_S=min(int(TUNE["attn_block_s"]), split_s),
        BLOCK_R=block_r, NS_POW2=triton.next_power_of_2(n_splits), CHUNK=int(TUNE["attn_combine_chunk"]), IEEE=_ieee(q), GDC=pdl,
        num_warps=TUNE["num_warps"], **_launch(pdl),
    )
    return out


@triton.jit
def _linear_residual_kernel(
    x_ptr, w_ptr, b_ptr, res_ptr, out_ptr, M, N: tl.constexpr, K: tl.constexpr, HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr, GDC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KA: tl.constexpr,
    KB: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok, n_ok = offs_m < M, offs_n < N
    w_a = _tile(w_ptr, offs_n, n_ok, 0, K, KA)  # (BLOCK_N, KA): weights first, before the wait
    if KB > 0:
        w_b = _tile(w_ptr, offs_n, n_ok, KA, K, KB)  # (BLOCK_N, KB)
    _wait_for_inputs(GDC)
    acc = _dot(_tile(x_ptr, offs_m, m_ok, 0, K, KA), tl.trans(w_a), IEEE)  # (BLOCK_M, BLOCK_N)
    if KB > 0:
        acc += _dot(_tile(x_ptr, offs_m, m_ok, KA, K, KB), tl.trans(w_b), IEEE)
    for k0 in range(KA + KB, K, BLOCK_K):  # columns past the prefetched tiles (larger models)
        acc += _dot(_tile(x_ptr, offs_m, m_ok, k0, K, BLOCK_K), tl.trans(_tile(w_ptr, offs_n, n_ok, k0, K, BLOCK_K)), IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    dtype = out_ptr.dtype.element_ty
    ok = m_ok[:, None] & n_ok[None, :]
    res = tl.load(res_ptr + offs_m[:, None] * N + offs_n[None, :], mask=ok, other=0.0)
    y = acc.to(dtype).to(tl.float32) + res.to(tl.float32)  # rounded like x + linear(y)
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], y.to(dtype), mask=ok)


def linear_residual(
    x: torch.Tensor,  # (M, K)
    w: torch.Tensor,  # (N, K)
    bias: torch.Tensor | None,  # (N,)
    residual: torch.Tensor,  # (M, N)
) -> torch.Tensor:  # (M, N): residual + x w^T + bias
    M, K = x.shape
    N = w.shape[0]
    assert x.is_contiguous() and w.is_contiguous() and residual.is_contiguous()
    out = torch.empty(M, N, dtype=residual.dtype, device=x.device)
    BLOCK_N = TUNE["linear_block_n"]  # many small programs: at M <= 16 the work is reading w, spread over the SMs
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(M, BLOCK_M))
    ka, kb = _k_tiles(K, BLOCK_N * w.element_size())
    pdl = _pdl(x)
    _linear_residual_kernel[grid](
        x, w, bias if bias is not None else w, residual, out, M, N, K, HAS_BIAS=bias is not None, IEEE=_ieee(x),
        GDC=pdl, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, KA=ka, KB=kb, BLOCK_K=_loop_k("linear_block_k", w),
        num_warps=TUNE["num_warps"], **_launch(pdl),
    )
    return out


@triton.jit
def _norm_gate_up_kernel(
    x_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, M, eps, DIM: tl.constexpr, HID: tl.constexpr, HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr, GDC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KA: tl.constexpr,
    KB: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok, n_ok = offs_m < M, offs_n < HID
    acc_g, acc_u, _ = _norm_projections(x_ptr, nw_ptr, w_ptr, offs_n, HID + offs_n, n_ok, offs_m, m_ok, eps, DIM, IEEE, GDC,
                                        KA, KB, BLOCK_K, True)  # (BLOCK_M, BLOCK_N) each
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
) -> torch.Tensor:  # (M, hidden): silu(gate) * up
    M, dim = x.shape
    hid = w.shape[0] // 2
    assert x.is_contiguous() and w.is_contiguous()
    out = torch.empty(M, hid, dtype=x.dtype, device=x.device)
    BLOCK_N = TUNE["gate_block_n"]
    grid = (triton.cdiv(hid, BLOCK_N), triton.cdiv(M, BLOCK_M))
    ka, kb = _k_tiles(dim, 2 * BLOCK_N * w.element_size())  # gate and up rows
    pdl = _pdl(x)
    _norm_gate_up_kernel[grid](
        x, norm_w, w, bias if bias is not None else w, out, M, eps, DIM=dim, HID=hid, HAS_BIAS=bias is not None,
        IEEE=_ieee(x), GDC=pdl, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, KA=ka, KB=kb, BLOCK_K=_loop_k("norm_block_k", w),
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
    acc, _, rstd = _norm_projections(x_ptr, nw_ptr, w_ptr, offs_n, offs_n, n_ok, offs_m, m_ok, eps, DIM, IEEE, GDC,
                                     KA, KB, BLOCK_K, False)  # (BLOCK_M, BLOCK_N), (BLOCK_M,)
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
