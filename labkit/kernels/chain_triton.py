"""An EAGLE draft chain, and the catch-up before it, in one persistent Triton launch.

A chain of depth n runs 1 + 7 (n - 1) dependent operations: the first depth's pick, then at each
depth the draft layer (embed_fc, norm_qkv_rope, attention, wo, norm_gate_up, down) and its pick
(draft_argmax); inside a verify the draft cache's catch-up over the verified rows (a draft-layer
pass) comes first. As kernels one by one (layer_triton.py, draft_triton.py) each costs a launch
and the wait on the one before, ~4 us on an H200 where its arithmetic takes a microsecond or two.
Here one launch runs every operation in turn (a phase each), every program resident (the grid at
most the SM count). A program loads a phase's weight tile first, then waits until the phase before
has counted all its tiles finished (an atomic count per phase, acquire on each poll, a release
after each tile's stores): inside one launch, the dependency programmatic dependent launch gives
kernels one by one; programs without a tile in a phase go straight on. A step whose chain is
called off (`only_if`) runs the catch-up only.

Measured on the H200 it is the slower way (specdec/eagle_chain.py, off by default): a K=8 verify's
catch-up and 5-deep chain ran 240 us fused with a grid-wide barrier between phases
(results/gpu/eagle-chain-cost-NVIDIA-H200-7274f8c.txt), and 233 us with these per-phase counts,
each phase's weights loaded before its wait, against 149 us as launches one by one
(results/gpu/eagle-chain-cost-NVIDIA-H200-c5f2665.txt): ~6.5 us a phase against ~4 a launch.

Each operation runs the same tile code as its own kernel (the helpers of layer_triton,
norm_triton, draft_triton and attention_triton, with the same tiles), so the drafts are bit for
bit those of the launches one by one; a program takes tiles pid, pid + P, ... of each operation.
Under TRITON_INTERPRET=1 programs run one after another (none could wait for another), so there
each operation is its own launch of the same kernel, waiting on the one before's count (met at
once there): how CI tests the same code and counts. A wait past SPIN_LIMIT polls gives up and
counts a stall (`ChainScratch.stalls`): the drafts are then wrong, never the output.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from labkit.kernels.attention_triton import _attend_split, _combine_splits, _tile_rows
from labkit.kernels.draft_triton import KEY_INDEX, _embed_fc_rows, _fold_best, _key_ids
from labkit.kernels.layer_triton import _gate_up_out, _linear_residual_rows, _loop_k, _qkv_rope_out
from labkit.kernels.norm_triton import _norm_products, _norm_weights
from labkit.kernels.triton_common import BLOCK_M, TUNE, _called_off, _ieee, _k_tiles, _launch, _only_if_args, _pdl, _wait_for_inputs, _weight_tiles

OPS = 7  # a depth's operations: embed_fc, norm_qkv_rope, attention, wo, norm_gate_up, down, pick
SPIN_LIMIT = 1 << 22  # polls before a wait gives up (~seconds: never, unless a program was not resident)
MAX_PHASES = 64  # 6 + 2 + 7 (depth - 1) phases at the most: depth <= 8


@dataclass(frozen=True)
class ChainLayer:
    """The draft layer and head a chain runs: the weights of EagleHead and EagleDrafter's pick."""

    embed: torch.Tensor  # (V, D) the target's token embedding
    fc: torch.Tensor  # (D, 2D)
    attn_norm: torch.Tensor  # (D,)
    wqkv: torch.Tensor  # ((NH + 2 NKV) HD, D)
    cos: torch.Tensor  # (S, HD) rope tables over the draft cache
    sin: torch.Tensor  # (S, HD)
    wo: torch.Tensor  # (D, NH HD)
    mlp_norm: torch.Tensor  # (D,)
    gate_up: torch.Tensor  # (2 HID, D)
    down: torch.Tensor  # (D, HID)
    head: torch.Tensor  # (N, D) the draft vocabulary's rows of the LM head
    ids: torch.Tensor  # (N,) int64 target ids of those rows
    n_heads: int
    eps: float
    window: int  # keys at most this many positions back (0: all)


@dataclass(frozen=True)
class CatchUp:
    """A verify's rows for the draft cache's catch-up before the chain (EagleDrafter.catch_up): row
    j's element is (hidden_j, the token after it: the draft after it, or the target's next token
    at the accepted row); the chain starts from the accepted row."""

    hidden: torch.Tensor  # (B, T, D) the verify's hidden states
    tokens: torch.Tensor  # (B, T) int64 the tokens it verified
    verdict: torch.Tensor  # (B, 2) int64: accepted rows, the target's next token
    input_pos: torch.Tensor  # (T,) int64 their positions


@dataclass(frozen=True)
class ChainScratch:
    """Buffers per pass (slots 0..depth-1 the chain's depths, slot depth the catch-up's: no address
    is written twice in a launch), and the zeros a launch leaves zero."""

    x: torch.Tensor  # (depth + 1, BLOCK_M, D) embed_fc's outputs
    q: torch.Tensor  # (depth + 1, BLOCK_M, NH HD)
    y: torch.Tensor  # (depth + 1, BLOCK_M, NH HD) attention's
    x2: torch.Tensor  # (depth + 1, BLOCK_M, D) after wo
    act: torch.Tensor  # (depth + 1, BLOCK_M, HID)
    feat: torch.Tensor  # (depth + 1, BLOCK_M, D) after down: each pass's predicted features
    anchor: torch.Tensor  # (BLOCK_M, D) the catch-up's accepted rows: the chain's first feature
    pos: torch.Tensor  # (depth * BLOCK_M,) int64: the chain's positions after a catch-up
    keys: torch.Tensor  # (depth, BLOCK_M) int64 zeros: each depth's best (logit, index)
    part_o: torch.Tensor  # (tiles * splits * 16, HD) fp32: attention's partial results
    part_ml: torch.Tensor  # (tiles * splits * 16, 2) fp32
    done: torch.Tensor  # (MAX_PHASES + 2,) int32 zeros: 0, each phase's finished tiles, the programs out
    stalls: torch.Tensor  # (1,) int32: waits that gave up (never expected)


def chain_scratch(depth: int, layer: ChainLayer, k_cache: torch.Tensor) -> ChainScratch:
    B, nkv, S, hd = k_cache.shape
    D, hid, dev, dt = layer.fc.shape[0], layer.down.shape[1], k_cache.device, layer.fc.dtype
    rows = triton.cdiv(BLOCK_M * (layer.n_heads // nkv), 16)  # the attention's row blocks at most (a catch-up of 16 rows)
    parts = B * nkv * rows * triton.cdiv(S, int(TUNE["attn_split_s"])) * 16

    def buf(width: int) -> torch.Tensor:
        return torch.zeros(depth + 1, BLOCK_M, width, dtype=dt, device=dev)

    def zeros(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device=dev)

    return ChainScratch(buf(D), buf(layer.n_heads * hd), buf(layer.n_heads * hd), buf(D), buf(hid), buf(D), zeros(BLOCK_M, D, dtype=dt),
                        zeros(depth * BLOCK_M, dtype=torch.int64), zeros(depth, BLOCK_M, dtype=torch.int64), zeros(parts, hd),
                        zeros(parts, 2), zeros(MAX_PHASES + 2, dtype=torch.int32), zeros(1, dtype=torch.int32))


@triton.jit
def _await(done_ptr, target, stall_ptr, SPIN_LIMIT: tl.constexpr):
    """Wait until the phase before has counted `target` finished tiles (acquire on each poll): every
    write of those tiles is then visible to this program's threads."""
    seen = tl.atomic_add(done_ptr, 0, sem="acquire", scope="gpu")
    spins = 0
    while (seen < target) & (spins < SPIN_LIMIT):
        seen = tl.atomic_add(done_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    if seen < target:
        tl.atomic_add(stall_ptr, 1, sem="relaxed", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _phase_tiles(p, C, last_phase, T_CU, M, N_VOCAB, DIM: tl.constexpr, NH: tl.constexpr, NKV: tl.constexpr, HALF: tl.constexpr,
                 HID: tl.constexpr, BN: tl.constexpr, GBN: tl.constexpr, HBN: tl.constexpr, SUB: tl.constexpr, N_OPS: tl.constexpr):
    """How many tiles phase p has (0 before the first): what the phase after it waits to see counted."""
    q = p - C
    op = (q - 1) % N_OPS
    T = T_CU * 0 + 1
    if q < 0:
        op = p
        T = T_CU
    n = T * 0 + tl.cdiv(DIM, BN)  # embed_fc, wo, down
    if p < 0:
        n = T * 0
    elif p == last_phase:  # the drafts: program 0
        n = T * 0 + 1
    elif (q == 0) | ((q > 0) & (op == 6)):  # a pick
        n = T * 0 + tl.cdiv(N_VOCAB, HBN)
    elif op == 1:
        n = T * 0 + (NH + 2 * NKV) * (HALF // SUB)
    elif op == 2:
        n = M * NKV * tl.cdiv(T * (NH // NKV), 16)
    elif op == 4:
        n = T * 0 + tl.cdiv(HID, GBN)
    return n


@triton.jit
def _signal(done_ptr):
    """A tile of this phase is written: count it (release), after every thread's stores."""
    tl.debug_barrier()
    tl.atomic_add(done_ptr, 1, sem="release", scope="gpu")


@triton.jit(do_not_specialize=["M", "T_CU", "DEPTH", "PHASE_FIRST", "PHASE_LAST", "N_PHASES"])  # runtime values whatever they are (1 included)
def _chain_kernel(
    feat0_ptr, pos_ptr, hid_ptr, tok_ptr, verdict_ptr, ipos_ptr, anc_ptr, emb_ptr, fc_ptr, an_ptr, wqkv_ptr, cos_ptr, sin_ptr,
    wo_ptr, mn_ptr, wgu_ptr, wd_ptr, head_ptr, ids_ptr, kc_ptr, vc_ptr, xs_ptr, qs_ptr, ys_ptr, x2s_ptr, acts_ptr, feats_ptr,
    keys_ptr, part_o_ptr, part_ml_ptr, done_ptr, stall_ptr, only_if_ptr, out_ptr, M, T_CU, S_LAST, N_VOCAB, N_SPLITS, eps, scale,
    stride_cb, stride_ch, stride_cs, PHASE_FIRST, PHASE_LAST, N_PHASES, DEPTH,
    DIM: tl.constexpr, NH: tl.constexpr, NKV: tl.constexpr, HALF: tl.constexpr, HID: tl.constexpr,
    WINDOW: tl.constexpr, IEEE: tl.constexpr, GDC: tl.constexpr, ONLY_IF: tl.constexpr, CATCH: tl.constexpr,
    BLOCK_M: tl.constexpr, BN: tl.constexpr, FC_KA: tl.constexpr, FC_KB: tl.constexpr, LIN_K: tl.constexpr,
    SUB: tl.constexpr, QKV_KA: tl.constexpr, QKV_KB: tl.constexpr, NORM_K: tl.constexpr,
    WO_KA: tl.constexpr, WO_KB: tl.constexpr, GBN: tl.constexpr, GU_KA: tl.constexpr, GU_KB: tl.constexpr,
    DN_KA: tl.constexpr, DN_KB: tl.constexpr, HBN: tl.constexpr, HD_KA: tl.constexpr, HD_KB: tl.constexpr,
    SPLIT_S: tl.constexpr, BLOCK_S: tl.constexpr, NS_POW2: tl.constexpr, CHUNK: tl.constexpr,
    KEY_INDEX: tl.constexpr, SPIN_LIMIT: tl.constexpr, N_OPS: tl.constexpr, MAX_PHASES: tl.constexpr,
):
    """Phases PHASE_FIRST..PHASE_LAST-1 of: with CATCH, the catch-up's draft-layer pass over the
    verified rows (6 phases, slot DEPTH of the buffers); then the chain's first pick (depth 0), each
    depth's pass and pick (N_OPS phases, slot d), and the drafts written."""
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    _wait_for_inputs(GDC)
    C: tl.constexpr = 6 if CATCH else 0  # the catch-up's phases
    p_end = PHASE_LAST
    if ONLY_IF:  # called off: the catch-up only (without one, nothing: the counts stay zero)
        p_end = tl.where(_called_off(only_if_ptr, ONLY_IF), tl.minimum(PHASE_LAST, C), PHASE_LAST)
    D: tl.constexpr = 2 * HALF
    GROUP: tl.constexpr = NH // NKV
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M  # the chain's rows: one per batch row
    last_phase = C + 1 + N_OPS * (DEPTH - 1)  # the phase that writes the drafts
    for p in range(PHASE_FIRST, p_end):
        q = p - C  # the chain's phase (negative: the catch-up's)
        d = (q + N_OPS - 1) // N_OPS  # the depth (0-based) whose element a chain phase computes
        op = (q - 1) % N_OPS
        T = T_CU * 0 + 1  # a pass's rows per batch row, their positions (stride_pb 0: shared by the batch rows)
        pos_s = pos_ptr + (d - 1) * M
        stride_pb = T
        if q < 0:  # the catch-up: the verified rows at their positions, into the last slot
            d = DEPTH
            op = p
            T = T_CU
            pos_s = ipos_ptr
            stride_pb = T * 0
        rows_ok = offs_m < M * T
        x_d = xs_ptr + d * BLOCK_M * DIM  # this pass's buffers
        q_d = qs_ptr + d * BLOCK_M * NH * D
        y_d = ys_ptr + d * BLOCK_M * NH * D
        x2_d = x2s_ptr + d * BLOCK_M * DIM
        act_d = acts_ptr + d * BLOCK_M * HID
        feat_d = feats_ptr + d * BLOCK_M * DIM
        done_before, done_here = done_ptr + p, done_ptr + p + 1  # the phase before's count of finished tiles (slot 0: none), this one's
        n_tiles = _phase_tiles(p, C, last_phase, T_CU, M, N_VOCAB, DIM, NH, NKV, HALF, HID, BN, GBN, HBN, SUB, N_OPS)
        prev_tiles = _phase_tiles(p - 1, C, last_phase, T_CU, M, N_VOCAB, DIM, NH, NKV, HALF, HID, BN, GBN, HBN, SUB, N_OPS)
        if p == last_phase:  # the drafts: each depth's best as target ids; the keys left zero
            if pid == 0:
                _await(done_before, prev_tiles, stall_ptr, SPIN_LIMIT)
                for dd in range(DEPTH):
                    best = tl.load(keys_ptr + dd * BLOCK_M + offs_m, mask=m_ok, other=0)
                    tl.store(out_ptr + dd * M + offs_m, _key_ids(best, ids_ptr, m_ok, KEY_INDEX), mask=m_ok)
                    tl.store(keys_ptr + dd * BLOCK_M + offs_m, tl.zeros([BLOCK_M], dtype=tl.int64), mask=m_ok)
        elif (q == 0) | ((q > 0) & (op == 6)):  # pick: depth d's feature against the draft vocabulary
            src = feat0_ptr
            if q > 0:
                src = feat_d
            for tile in range(pid, n_tiles, P):
                offs_n = tile * HBN + tl.arange(0, HBN)
                n_ok = offs_n < N_VOCAB
                w_a, w_b = _weight_tiles(head_ptr, offs_n, n_ok, DIM, HD_KA, HD_KB)  # weights first, then the wait
                _await(done_before, prev_tiles, stall_ptr, SPIN_LIMIT)
                _fold_best(src, head_ptr, keys_ptr + d * BLOCK_M, offs_m, m_ok, offs_n, n_ok, w_a, w_b, DIM, IEEE, HD_KA, HD_KB,
                           NORM_K, KEY_INDEX)
                _signal(done_here)
        elif op == 0:  # embed_fc: (the token after each row, its feature)
            for tile in range(pid, n_tiles, P):
                offs_n = tile * BN + tl.arange(0, BN)
                n_ok = offs_n < DIM
                w_a, w_b = _weight_tiles(fc_ptr, offs_n, n_ok, 2 * DIM, FC_KA, FC_KB)
                _await(done_before, prev_tiles, stall_ptr, SPIN_LIMIT)
                if q < 0:  # the catch-up: row j's token is the draft after it, or the target's next at the accepted row
                    b = offs_m // T
                    j = offs_m % T
                    acc = tl.load(verdict_ptr + b * 2, mask=rows_ok, other=-1)
                    nxt = tl.load(verdict_ptr + b * 2 + 1, mask=rows_ok, other=0)
                    after = tl.load(tok_ptr + offs_m + 1, mask=rows_ok & (j < T - 1), other=0)
                    tok = tl.where((j == acc) | (j == T - 1), nxt, after)
                    src = hid_ptr
                    if tile == 0:  # the chain's positions: depth dd's element at input_pos[0] + accepted + dd
                        chain_b = offs_m < M
                        anchor = tl.load(ipos_ptr) + tl.load(verdict_ptr + offs_m * 2, mask=chain_b, other=0)
                        for dd in range(1, DEPTH):
                            tl.store(pos_ptr + (dd - 1) * M + offs_m, tl.minimum(anchor + dd, S_LAST), mask=chain_b)
                else:  # the chain: the last depth's draft and feature
                    tok = _key_ids(tl.load(keys_ptr + (d - 1) * BLOCK_M + offs_m, mask=m_ok, other=0), ids_ptr, m_ok, KEY_INDEX)
                    src = feat0_ptr
                    if d > 1:
                        src = feats_ptr + (d - 1) * BLOCK_M * DIM
                _embed_fc_rows(tok, emb_ptr, src, fc_ptr, x_d, offs_m, rows_ok, offs_n, n_ok, w_a, w_b, DIM, IEEE, FC_KA, FC_KB, LIN_K)
                _signal(done_here)
        elif op == 1:  # norm_qkv_rope: q, and k, v into the draft cache at the pass's positions
            for tile in range(pid, n_tiles, P):
                h = tile // (HALF // SUB)
                offs_d = (tile % (HALF // SUB)) * SUB + tl.arange(0, SUB)
                rows_lo = h * D + offs_d
                r_ok = offs_d < HALF
                w_a_lo, w_b_lo, nw_lo, w_a_hi, w_b_hi, nw_hi = _norm_weights(wqkv_ptr, an_ptr, rows_lo, rows_lo + HALF, r_ok, DIM,
                                                                             QKV_KA, QKV_KB, True)
                _await(done_before, prev_tiles, stall_ptr, SPIN_LIMIT)
                acc_lo, acc_hi, _ = _norm_products(x_d, an_ptr, wqkv_ptr, rows_lo, rows_lo + HALF, r_ok, offs_m, rows_ok, eps, w_a_lo,
                                                   w_b_lo, nw_lo, w_a_hi, w_b_hi, nw_hi, DIM, IEEE, QKV_KA, QKV_KB, NORM_K, True)
                _qkv_rope_out(acc_lo, acc_hi, h, offs_d, offs_m, rows_ok, T, wqkv_ptr, cos_ptr, sin_ptr, pos_s, pos_s, q_d, kc_ptr, vc_ptr,
                              stride_pb, stride_cb, stride_ch, stride_cs, False, NH, NKV, HALF, False)
                _signal(done_here)
        elif op == 2:  # attention over the draft cache, every split of a tile in this program
            r_blocks = tl.cdiv(T * GROUP, 16)
            for tile in range(pid, n_tiles, P):
                _await(done_before, prev_tiles, stall_ptr, SPIN_LIMIT)
                b, kvh, local, t, r_ok, head, pos, lo_r, lo, hi, first, last = _tile_rows(tile, pos_s, T, stride_pb, T * GROUP, r_blocks, N_SPLITS,
                                                                                  pos_s, pos_s, NKV, GROUP, WINDOW, SPLIT_S, 16, 1, 1, False)
                for split in range(first, last + 1):
                    _attend_split(q_d, kc_ptr, vc_ptr, y_d, part_o_ptr, part_ml_ptr, tile, split, b, kvh, local, t, r_ok, head, pos, lo_r,
                                  lo, hi, first, last, T, N_SPLITS, scale, stride_cb, stride_ch, stride_cs, pos_s, pos_s, NH, D, SPLIT_S, BLOCK_S,
                                  16, IEEE, 1, 1, False)
                if first != last:
                    tl.debug_barrier()  # this program's partials are written before it reads them back
                    q_rows = (b * T + t) * NH + head
                    _combine_splits(y_d, part_o_ptr, part_ml_ptr, q_rows, tile * N_SPLITS, local, r_ok, first, last, 16, D, NS_POW2, CHUNK)
                _signal(done_here)
        elif op == 3:  # wo: attention's output onto the residual
            for tile in range(pid, n_tiles, P):
                offs_n = tile * BN + tl.arange(0, BN)
                n_ok = offs_n < DIM
                w_a, w_b = _weight_tiles(wo_ptr, offs_n, n_ok, NH * D, WO_KA, WO_KB)
                _await(done_before, prev_tiles, stall_ptr, SPIN_LIMIT)
                _linear_residual_rows(y_d, wo_ptr, wo_ptr, x_d, x2_d, offs_m, rows_ok, offs_n, n_ok, w_a, w_b, DIM, NH * D, False, IEEE,
                                      WO_KA, WO_KB, LIN_K)
                _signal(done_here)
        elif op == 5:  # down: the MLP's output onto the residual, the pass's predicted features
            for tile in range(pid, n_tiles, P):
                offs_n = tile * BN + tl.arange(0, BN)
                n_ok = offs_n < DIM
                w_a, w_b = _weight_tiles(wd_ptr, offs_n, n_ok, HID, DN_KA, DN_KB)
                _await(done_before, prev_tiles, stall_ptr, SPIN_LIMIT)
                y = _linear_residual_rows(act_d, wd_ptr, wd_ptr, x2_d, feat_d, offs_m, rows_ok, offs_n, n_ok, w_a, w_b, DIM, HID, False,
                                          IEEE, DN_KA, DN_KB, LIN_K)
                if q < 0:  # the catch-up: each batch row's accepted row is the chain's anchor
                    b = offs_m // T
                    acc = tl.load(verdict_ptr + b * 2, mask=rows_ok, other=-1)
                    tl.store(anc_ptr + b[:, None] * DIM + offs_n[None, :], y, mask=(rows_ok & (offs_m % T == acc))[:, None] & n_ok[None, :])
                _signal(done_here)
        else:  # op == 4: norm_gate_up
            for tile in range(pid, n_tiles, P):
                offs_n = tile * GBN + tl.arange(0, GBN)
                n_ok = offs_n < HID
                w_a_lo, w_b_lo, nw_lo, w_a_hi, w_b_hi, nw_hi = _norm_weights(wgu_ptr, mn_ptr, offs_n, HID + offs_n, n_ok, DIM, GU_KA, GU_KB,
                                                                             True)
                _await(done_before, prev_tiles, stall_ptr, SPIN_LIMIT)
                acc_g, acc_u, _ = _norm_products(x2_d, mn_ptr, wgu_ptr, offs_n, HID + offs_n, n_ok, offs_m, rows_ok, eps, w_a_lo, w_b_lo,
                                                 nw_lo, w_a_hi, w_b_hi, nw_hi, DIM, IEEE, GU_KA, GU_KB, NORM_K, True)
                _gate_up_out(acc_g, acc_u, wgu_ptr, act_d, offs_m, rows_ok, offs_n, n_ok, HID, False)
                _signal(done_here)
    if PHASE_LAST == N_PHASES:  # the last program out of the last launch leaves the counts zero for the next chain
        tl.debug_barrier()
        if tl.atomic_add(done_ptr + MAX_PHASES + 1, 1, sem="acq_rel", scope="gpu") == P - 1:
            at = tl.arange(0, MAX_PHASES)
            tl.store(done_ptr + 1 + at, tl.zeros([MAX_PHASES], dtype=tl.int32))
            tl.store(done_ptr + MAX_PHASES + 1, 0)


def draft_chain(
    feat: torch.Tensor | None,  # (M, D) the anchor's predicted feature, M <= 16 rows (batch rows); None: catch_up's
    pos: torch.Tensor | None,  # (depth - 1, M) int64: depth d's element sits at pos[d - 2]; None: after catch_up's accepted row
    layer: ChainLayer,
    k_cache: torch.Tensor,  # (B, NKV, S, HD) the draft layer's cache, written at pos
    v_cache: torch.Tensor,  # (B, NKV, S, HD)
    scratch: ChainScratch,  # chain_scratch(at least depth, ...), owned by the caller, its zeros left zero
    only_if: torch.Tensor | None = None,  # (1,) bool on the device: where false the launch runs the catch-up only, the chain
    # called off (its outputs and draft cache unwritten)
    catch_up: CatchUp | None = None,  # the draft cache caught up over a verify's rows first, the chain from its accepted row
    depth: int | None = None,  # the chain's depth (with catch_up; else pos's rows + 1)
    programs: int | None = None,  # the grid (default: TUNE["chain_programs"], at most the SM count)
) -> torch.Tensor:  # (M, depth) int64 target ids: each depth's best draft, as EagleDrafter.chain's
    B, nkv, S, hd = k_cache.shape
    dim, hid = layer.fc.shape[0], layer.down.shape[1]
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if catch_up is None:
        assert feat is not None and pos is not None and feat.is_contiguous() and pos.is_contiguous()
        depth, t_cu, hidden, tokens, verdict, input_pos = pos.shape[0] + 1, 0, feat, pos, pos, pos
    else:
        assert depth is not None and catch_up.hidden.dtype == layer.fc.dtype and catch_up.tokens.is_contiguous()
        t_cu, hidden, tokens = catch_up.tokens.shape[1], catch_up.hidden.contiguous(), catch_up.tokens
        verdict, input_pos = catch_up.verdict.contiguous(), catch_up.input_pos.contiguous()
        feat, pos = scratch.anchor, scratch.pos
        assert B * t_cu <= BLOCK_M, f"a fused catch-up takes at most {BLOCK_M} rows"
    M = B
    assert M <= BLOCK_M and depth + 1 <= scratch.x.shape[0] and k_cache.stride(3) == 1 and layer.n_heads % nkv == 0
    out = torch.empty(depth, M, dtype=torch.int64, device=k_cache.device)
    elt = layer.fc.element_size()
    bn, gbn, hbn = int(TUNE["linear_block_n"]), int(TUNE["gate_block_n"]), int(TUNE["head_block_n"])
    sub = min(int(TUNE["qkv_sub"]), hd // 2)
    split_s = int(TUNE["attn_split_s"])
    n_splits = triton.cdiv(S, split_s)
    phases = (6 if catch_up is not None else 0) + 2 + OPS * (depth - 1)
    assert phases <= MAX_PHASES, f"a fused chain runs at most {MAX_PHASES} phases"
    P = programs or int(TUNE.get("chain_programs", 128))
    if k_cache.device.type == "cuda":  # every program resident at once: at most one per SM
        P = min(P, torch.cuda.get_device_properties(k_cache.device).multi_processor_count)
    elif interpreted:  # programs run one after another there: a few take every tile
        P = min(P, 4)
    pdl = _pdl(k_cache)
    flag, only = _only_if_args(only_if, out)
    fc_ka, fc_kb = _k_tiles(2 * dim, bn * elt)
    qkv_ka, qkv_kb = _k_tiles(dim, 2 * sub * elt)
    wo_ka, wo_kb = _k_tiles(layer.n_heads * hd, bn * elt)
    gu_ka, gu_kb = _k_tiles(dim, 2 * gbn * elt)
    dn_ka, dn_kb = _k_tiles(hid, bn * elt)
    hd_ka, hd_kb = _k_tiles(dim, hbn * elt)
    spans = [(p, p + 1) for p in range(phases)] if interpreted else [(0, phases)]  # no program waits on another there
    for first, last in spans:
        _chain_kernel[(P,)](
            feat, pos, hidden, tokens, verdict, input_pos, scratch.anchor, layer.embed, layer.fc, layer.attn_norm, layer.wqkv, layer.cos, layer.sin, layer.wo, layer.mlp_norm,
            layer.gate_up, layer.down, layer.head, layer.ids, k_cache, v_cache, scratch.x, scratch.q, scratch.y, scratch.x2,
            scratch.act, scratch.feat, scratch.keys, scratch.part_o, scratch.part_ml, scratch.done, scratch.stalls, flag, out,
            M, t_cu, S - 1, layer.head.shape[0], n_splits, layer.eps, 1.0 / math.sqrt(hd), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            first, last, phases, depth, DIM=dim, NH=layer.n_heads, NKV=nkv, HALF=hd // 2, HID=hid, WINDOW=layer.window,
            IEEE=_ieee(feat), GDC=pdl, ONLY_IF=only, CATCH=catch_up is not None, BLOCK_M=BLOCK_M, BN=bn, FC_KA=fc_ka, FC_KB=fc_kb,
            LIN_K=_loop_k("linear_block_k", layer.fc), SUB=sub, QKV_KA=qkv_ka, QKV_KB=qkv_kb, NORM_K=_loop_k("norm_block_k", layer.fc),
            WO_KA=wo_ka, WO_KB=wo_kb, GBN=gbn, GU_KA=gu_ka, GU_KB=gu_kb, DN_KA=dn_ka, DN_KB=dn_kb, HBN=hbn, HD_KA=hd_ka, HD_KB=hd_kb,
            SPLIT_S=split_s, BLOCK_S=min(int(TUNE["attn_block_s"]), split_s), NS_POW2=triton.next_power_of_2(n_splits),
            CHUNK=int(TUNE["attn_combine_chunk"]), KEY_INDEX=KEY_INDEX, SPIN_LIMIT=4 if interpreted else SPIN_LIMIT, N_OPS=OPS, MAX_PHASES=MAX_PHASES, num_warps=TUNE["num_warps"],
            num_stages=1,  # no software pipelining: its loops take a tile or two, and stages of every phase's tiles overflowed shared memory
            **_launch(pdl),
        )
    return out.t()
