"""Split-K (flash-decoding) attention over the KV cache, for decode and verify steps (one fused
layer kernel of layer_triton.py; its PyTorch twin is layer_reference.decode_attention).

Runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (how CI tests it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from labkit.kernels.triton_common import TUNE, _called_off, _dot, _ieee, _launch, _only_if_args, _pdl, _wait_for_inputs


@triton.jit
def _attend_keys(q, k_ptr, v_ptr, stride_cs, lo_r, pos, s_first, s_end, qk_scale, t_r, tree_ptr, tree_base,
                 N_TREE: tl.constexpr, N_POW2: tl.constexpr, TREE: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr):
    """Online softmax of the rows q (BLOCK_R, D) over keys [s_first, s_end), each row seeing keys
    lo_r..pos (scores in log2 units): (acc (BLOCK_R, D) unnormalised, l (BLOCK_R,) sums, m (BLOCK_R,)
    maxima). With TREE the rows are one tree node's (t_r) and key position tree_base + j is its
    ancestor at depth j (`_tree_path`): the node's path laid out as a chain's keys."""
    offs_d = tl.arange(0, D)
    m_i = tl.full([BLOCK_R], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, D], dtype=tl.float32)
    if TREE:
        on_path, rank, _ = _tree_path(tree_ptr, tl.min(t_r, axis=0), N_TREE, N_POW2)  # (row 0 is the token's; padding rows past it)
    for s0 in range((s_first // BLOCK_S) * BLOCK_S, s_end, BLOCK_S):  # blocks start BLOCK_S-aligned
        offs_s = s0 + tl.arange(0, BLOCK_S)  # (BLOCK_S,)
        s_ok = (offs_s >= s_first) & (offs_s < s_end)
        slot = offs_s
        if TREE:  # position tree_base + j: the slot of the path's node of rank j (positions past the node's depth are not seen)
            nodes = tl.arange(0, N_POW2)
            match = on_path[None, :] & (rank[None, :] == (offs_s - tree_base)[:, None])  # (BLOCK_S, N_POW2)
            slot = tl.where(offs_s >= tree_base, tree_base + tl.sum(tl.where(match, nodes[None, :], 0), axis=1), offs_s)
        k = tl.load(k_ptr + slot[:, None] * stride_cs + offs_d[None, :], mask=s_ok[:, None], other=0.0)  # (BLOCK_S, D)
        v = tl.load(v_ptr + slot[:, None] * stride_cs + offs_d[None, :], mask=s_ok[:, None], other=0.0)
        seen = (offs_s[None, :] >= lo_r[:, None]) & (offs_s[None, :] <= pos[:, None]) & s_ok[None, :]  # (BLOCK_R, BLOCK_S)
        s = tl.where(seen, _dot(q, tl.trans(k), IEEE) * qk_scale, -float("inf"))  # (BLOCK_R, BLOCK_S) fp32
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # a row with no key seen yet keeps zeros
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        if IEEE:
            pv = _dot(p, v, IEEE)  # fp32 products
        else:  # half precision: p rounded to v's type for the tensor cores, as flash attention does
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _combine_splits(out_ptr, part_o_ptr, part_ml_ptr, q_rows, tile_base, local, r_ok, first, last,
                    BLOCK_R: tl.constexpr, D: tl.constexpr, NS_POW2: tl.constexpr, CHUNK: tl.constexpr):
    """The last split of a tile to finish: the partial results of splits first..last, in split
    order, into the output rows. .cg reads past this SM's L1, which may hold another launch's
    partials at these addresses."""
    offs_d = tl.arange(0, D)
    sp = first + tl.arange(0, NS_POW2)
    ok = r_ok[:, None] & (sp[None, :] <= last)
    m_all = tl.load(part_ml_ptr + ((tile_base + sp[None, :]) * BLOCK_R + local[:, None]) * 2, mask=ok,
                    other=-float("inf"), cache_modifier=".cg")  # (BLOCK_R, NS_POW2)
    m_max = tl.max(m_all, axis=1)  # exact, whatever the order
    m_max = tl.where(m_max == -float("inf"), 0.0, m_max)
    den = tl.zeros([BLOCK_R], dtype=tl.float32)
    o = tl.zeros([BLOCK_R, D], dtype=tl.float32)
    for c0 in range(first, last + 1, CHUNK):  # CHUNK loads in flight at a time
        for c in tl.static_range(CHUNK):
            c_ok = r_ok & (local * 0 + c0 + c <= last)  # (BLOCK_R,)
            c_at = (tile_base + c0 + c) * BLOCK_R + local
            w = tl.exp2(tl.load(part_ml_ptr + c_at * 2, mask=c_ok, other=-float("inf"), cache_modifier=".cg") - m_max)
            den += w * tl.load(part_ml_ptr + c_at * 2 + 1, mask=c_ok, other=0.0, cache_modifier=".cg")
            o += w[:, None] * tl.load(part_o_ptr + c_at[:, None] * D + offs_d[None, :], mask=c_ok[:, None], other=0.0,
                                      cache_modifier=".cg")
    tl.store(out_ptr + q_rows[:, None] * D + offs_d[None, :], (o / den[:, None]).to(out_ptr.dtype.element_ty), mask=r_ok[:, None])


@triton.jit
def _tree_path(tree_ptr, t, N_TREE: tl.constexpr, N_POW2: tl.constexpr):
    """Tree node t's path (its mask row in tree_ptr (T, N_TREE) int8: its ancestors and itself, a
    parent's slot before its children's): (on_path (N_POW2,), each node's rank on it, t's depth)."""
    nodes = tl.arange(0, N_POW2)
    on_path = tl.load(tree_ptr + t * N_TREE + nodes, mask=nodes < N_TREE, other=0) != 0
    rank = tl.cumsum(on_path.to(tl.int32), axis=0) - 1
    return on_path, rank, tl.sum(on_path.to(tl.int32), axis=0) - 1


@triton.jit
def _tile_rows(tile, pos_ptr, T, stride_pb, R, R_BLOCKS, N_SPLITS, tree_ptr, tree_base_ptr, NKV: tl.constexpr, GROUP: tl.constexpr,
               WINDOW: tl.constexpr, SPLIT_S: tl.constexpr, BLOCK_R: tl.constexpr, N_TREE: tl.constexpr, N_POW2: tl.constexpr,
               TREE: tl.constexpr):
    """The rows of tile `tile` (batch row b, kv head, block of BLOCK_R rows r = t * GROUP + g), the keys
    they see (lo..hi) and the splits holding them: (b, kvh, local, t, r_ok, head, pos, lo_r, lo, hi, first, last).
    With TREE a tile holds one token's GROUP rows, and a tree node sees keys up to tree_base + its
    depth: its path takes the positions after the context that a chain's tokens would (`_attend_keys`)."""
    rb = tile % R_BLOCKS
    kvh = (tile // R_BLOCKS) % NKV
    b = tile // (R_BLOCKS * NKV)
    local = tl.arange(0, BLOCK_R)
    if TREE:
        offs_r = rb * GROUP + local  # (BLOCK_R,) token rb's query heads, the rest padding
        r_ok = local < GROUP
    else:
        offs_r = rb * BLOCK_R + local  # (BLOCK_R,)
        r_ok = offs_r < R
    t = offs_r // GROUP
    head = kvh * GROUP + offs_r % GROUP
    pos = tl.load(pos_ptr + b * stride_pb + t, mask=r_ok, other=-1)  # (BLOCK_R,) row r sees keys lo_r..pos_r (stride_pb 0: shared)
    if WINDOW > 0:
        lo_r = tl.maximum(pos - WINDOW + 1, 0)
    else:
        lo_r = pos * 0
    if TREE:  # a node (its slot at or past tree_base) sees its path as a chain at its depth would
        tree_base = tl.load(tree_base_ptr)
        pos = tl.where(pos >= tree_base, tree_base + _tree_path(tree_ptr, rb, N_TREE, N_POW2)[2], pos)
    hi = tl.max(pos, axis=0)  # the last key any row sees
    lo = tl.min(tl.where(r_ok, lo_r, hi), axis=0)  # the first
    first = lo // SPLIT_S  # the splits holding visible keys: first..last (the grid may end sooner:
    last = tl.minimum(hi // SPLIT_S, N_SPLITS - 1)  # rows past the span are tokens nobody keeps)
    return b, kvh, local, t, r_ok, head, pos, lo_r, lo, hi, first, last


@triton.jit
def _attend_split(
    q_ptr, kc_ptr, vc_ptr, out_ptr, part_o_ptr, part_ml_ptr, tile, split, b, kvh, local, t, r_ok, head, pos, lo_r, lo, hi, first,
    last, T, N_SPLITS, scale, stride_cb, stride_ch, stride_cs, tree_ptr, tree_base_ptr, NH: tl.constexpr, D: tl.constexpr,
    SPLIT_S: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr, N_TREE: tl.constexpr,
    N_POW2: tl.constexpr, TREE: tl.constexpr,
):
    """A tile's rows against the keys of one split: the result where one split holds every
    visible key, else the split's partial (running max, sum, weighted values) for _combine_splits."""
    offs_d = tl.arange(0, D)
    q_rows = (b * T + t) * NH + head  # (BLOCK_R,) rows of q (M, NH, D) and of out (M, NH*D)
    q = tl.load(q_ptr + q_rows[:, None] * D + offs_d[None, :], mask=r_ok[:, None], other=0.0)  # (BLOCK_R, D)
    base = b * stride_cb + kvh * stride_ch
    qk_scale = scale * 1.4426950408889634  # scores in log2 units: exp2 instead of exp
    s_first = tl.maximum(split * SPLIT_S, lo)
    s_end = tl.minimum(split * SPLIT_S + SPLIT_S, hi + 1)
    tree_base = 0
    if TREE:
        tree_base = tl.load(tree_base_ptr)
    acc, l_i, m_i = _attend_keys(q, kc_ptr + base, vc_ptr + base, stride_cs, lo_r, pos, s_first, s_end, qk_scale,
                                 t, tree_ptr, tree_base, N_TREE, N_POW2, TREE, BLOCK_R, BLOCK_S, D, IEEE)
    if first == last:  # one split holds every visible key: the result is final
        tl.store(out_ptr + q_rows[:, None] * D + offs_d[None, :], (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=r_ok[:, None])
    else:  # keep this split's partial result
        at = (tile * N_SPLITS + split) * BLOCK_R + local  # (BLOCK_R,)
        tl.store(part_o_ptr + at[:, None] * D + offs_d[None, :], acc, mask=r_ok[:, None])
        tl.store(part_ml_ptr + at * 2, m_i, mask=r_ok)
        tl.store(part_ml_ptr + at * 2 + 1, l_i, mask=r_ok)
    return q_rows


@triton.jit
def _attention_kernel(
    q_ptr, kc_ptr, vc_ptr, pos_ptr, out_ptr, part_o_ptr, part_ml_ptr, count_ptr, T, stride_pb, R, R_BLOCKS, N_SPLITS, scale,
    stride_cb, stride_ch, stride_cs, tree_ptr, tree_base_ptr, only_if_ptr, NH: tl.constexpr, NKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    WINDOW: tl.constexpr, SPLIT_S: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, NS_POW2: tl.constexpr,
    CHUNK: tl.constexpr, IEEE: tl.constexpr, GDC: tl.constexpr, N_TREE: tl.constexpr, N_POW2: tl.constexpr, TREE: tl.constexpr,
    ONLY_IF: tl.constexpr,
):
    """Program (tile, split): the rows of one (batch row, kv head, block of BLOCK_R rows) against
    the keys of split `split`, positions [split * SPLIT_S, (split + 1) * SPLIT_S). Rows are (token
    t, query head g of the kv head's group), so a key block is read once for every query head that
    shares it. Split boundaries are absolute positions and every tile has BLOCK_R rows, so a row's
    sums run in the same order whatever tokens share its tile: a verify row gets a decode step's bits."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    _wait_for_inputs(GDC)  # everything it reads but the positions comes from the kernel before
    if _called_off(only_if_ptr, ONLY_IF):  # every program returns here: the counters stay zero
        return
    b, kvh, local, t, r_ok, head, pos, lo_r, lo, hi, first, last = _tile_rows(tile, pos_ptr, T, stride_pb, R, R_BLOCKS, N_SPLITS,
                                                                              tree_ptr, tree_base_ptr, NKV, GROUP, WINDOW, SPLIT_S,
                                                                              BLOCK_R, N_TREE, N_POW2, TREE)
    if (split >= first) & (split <= last):
        q_rows = _attend_split(q_ptr, kc_ptr, vc_ptr, out_ptr, part_o_ptr, part_ml_ptr, tile, split, b, kvh, local, t, r_ok, head,
                               pos, lo_r, lo, hi, first, last, T, N_SPLITS, scale, stride_cb, stride_ch, stride_cs, tree_ptr,
                               tree_base_ptr, NH, D, SPLIT_S, BLOCK_S, BLOCK_R, IEEE, N_TREE, N_POW2, TREE)
        if first != last:  # the last split to finish combines the partials
            tl.debug_barrier()  # every thread's partial is written before the count goes up
            done = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if done == last - first:
                _combine_splits(out_ptr, part_o_ptr, part_ml_ptr, q_rows, tile * N_SPLITS, local, r_ok, first, last,
                                BLOCK_R, D, NS_POW2, CHUNK)
                tl.store(count_ptr + tile, 0)  # ready for the next launch


def decode_attention(
    q: torch.Tensor,  # (M, NH, D), M = B*T
    k_cache: torch.Tensor,  # (B, NKV, S, D)
    v_cache: torch.Tensor,  # (B, NKV, S, D)
    input_pos: torch.Tensor,  # (T,) query t sees keys at positions <= input_pos[t]; or (B, T), per batch row
    scale: float,
    window: int | None,  # sliding window: also only keys > input_pos[t] - window
    counters: torch.Tensor,  # (>= B*NKV*row blocks,) int32 zeros, owned by the caller (the cache), left zero
    span: int | None = None,  # positions a kept query may see: [0, span) (default: the whole cache)
    tree_base: torch.Tensor | None = None,  # (1,) int64: first cache slot of a token tree's N nodes
    tree_mask: torch.Tensor | None = None,  # (T, N) int8: query t sees tree node j (its ancestors and itself; a parent's slot before its children's)
    only_if: torch.Tensor | None = None,  # (1,) bool on the device: where false the launch does nothing past
    # its inputs' wait, its outputs unwritten (triton_common._called_off)
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
    T = input_pos.shape[-1]
    stride_pb = T if input_pos.dim() == 2 else 0  # a tile's rows are one batch row's: its own positions
    assert input_pos.is_contiguous()
    group = nh // nkv
    R = T * group  # rows per (batch row, kv head)
    block_r = 16  # the same for every T: a row's arithmetic never depends on its neighbours
    tree = tree_mask is not None and tree_base is not None
    r_blocks = T if tree else triton.cdiv(R, block_r)  # a tree: one token's rows a tile (its own keys' order, _tile_rows)
    split_s = int(TUNE["attn_split_s"])
    n_splits = triton.cdiv(min(span or S, S), split_s)
    tiles = B * nkv * r_blocks
    if counters.numel() < tiles or counters.dtype != torch.int32:
        raise ValueError(f"attention needs {tiles} int32 counters, got {counters.numel()} {counters.dtype}")
    out = torch.empty(M, nh * D, dtype=q.dtype, device=q.device)
    part_o = torch.empty(tiles * n_splits * block_r, D, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(tiles * n_splits * block_r, 2, dtype=torch.float32, device=q.device)
    if tree_mask is not None:
        assert tree_base is not None and tree_mask.dtype == torch.int8 and tree_mask.is_contiguous() and tree_mask.shape[0] == T
        assert group <= block_r
    n_tree = tree_mask.shape[1] if tree_mask is not None else 1
    pdl = _pdl(q)
    flag, only = _only_if_args(only_if, q)
    _attention_kernel[(tiles, n_splits)](
        q, k_cache, v_cache, input_pos, out, part_o, part_ml, counters, T, stride_pb, R, r_blocks, n_splits, scale,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), tree_mask if tree else q, tree_base if tree else input_pos, flag,
        ONLY_IF=only, N_TREE=n_tree, N_POW2=triton.next_power_of_2(n_tree), TREE=tree, NH=nh, NKV=nkv, GROUP=group, D=D, WINDOW=window or 0, SPLIT_S=split_s, BLOCK_S=min(int(TUNE["attn_block_s"]), split_s),
        BLOCK_R=block_r, NS_POW2=triton.next_power_of_2(n_splits), CHUNK=int(TUNE["attn_combine_chunk"]), IEEE=_ieee(q), GDC=pdl,
        num_warps=TUNE["num_warps"], **_launch(pdl),
    )
    return out
