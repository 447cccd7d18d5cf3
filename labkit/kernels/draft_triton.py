"""Triton kernels for the two ends of an EAGLE draft pass, so a chain's depths stay in the fused
kernels' launch chain (programmatic dependent launch) with no PyTorch op between them:

    embed_fc       x = concat(embed[token], feat) fc^T   (the token's embedding gathered in the kernel)
    draft_argmax   the best token of feat @ head^T over the draft vocabulary, as a target id
    chain_inputs   after a verify: the catch-up's tokens and positions, the chain's positions (one
                   launch for six small PyTorch ops, ~2 us each inside a captured step; chosen only with
                   LABKIT_GLUE_KERNELS=1 until timed on a GPU: specdec/eagle_ops.after_verify_inputs)

Between a chain's depths the PyTorch path ran about ten launches a depth (the embedding, the
concat, cuBLAS's GEMV, the argmax, the id lookup, position arithmetic), each a full launch
latency on a GPU where a depth's arithmetic takes a few microseconds. Here a depth is seven
launches: these two and the layer's five (layer_triton.py).

draft_argmax is one launch: each program takes a tile of the vocabulary, keeps its rows' best
(value, index) as one int64 key (an order-preserving integer of the logit rounded to the
activations' dtype, then the index reversed, so the larger key is the larger logit and, among
equal ones, the smaller index: torch.argmax's choice), and folds it into the row's key with an
atomic max; the last program to finish (an atomic count, as decode_attention combines its splits)
turns the keys into target ids and leaves its scratch zero for the next launch.

Same arguments and results as their PyTorch twins in layer_reference.py. Runs on CUDA, or on the
CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from labkit.kernels.triton_common import (
    BLOCK_M,
    TUNE,
    _called_off,
    _dot,
    _ieee,
    _k_tiles,
    _launch,
    _only_if_args,
    _pdl,
    _tile,
    _tiled_dot,
    _wait_for_inputs,
    _weight_tiles,
)

KEY_INDEX = 1 << 31  # a key is (ordered logit bits) * KEY_INDEX + (KEY_INDEX - 1 - index)


@triton.jit
def _cat_tile(tok, emb_ptr, feat_ptr, offs_m, m_ok, k0, D: tl.constexpr, KT: tl.constexpr):
    """Columns k0..k0+KT of the rows of concat(embed[tok], feat), (BLOCK_M, KT) in feat's dtype."""
    offs_k = k0 + tl.arange(0, KT)
    from_emb = offs_k < D
    e = tl.load(emb_ptr + tok[:, None] * D + offs_k[None, :], mask=m_ok[:, None] & from_emb[None, :], other=0.0)
    f = tl.load(feat_ptr + offs_m[:, None] * D + (offs_k - D)[None, :],
                mask=m_ok[:, None] & (~from_emb & (offs_k < 2 * D))[None, :], other=0.0)
    return tl.where(from_emb[None, :], e.to(f.dtype), f)


@triton.jit
def _embed_fc_rows(
    tok, emb_ptr, feat_ptr, w_ptr, out_ptr, offs_m, m_ok, offs_n, n_ok, w_a, w_b, D: tl.constexpr, IEEE: tl.constexpr,
    KA: tl.constexpr, KB: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """After the inputs' wait: concat(embed[tok], feat) @ w^T for a tile of rows (tok (BLOCK_M,) their
    tokens) and columns (w_a, w_b the weight tiles loaded up front), stored (embed_fc, the fused chain)."""
    K: tl.constexpr = 2 * D
    acc = _dot(_cat_tile(tok, emb_ptr, feat_ptr, offs_m, m_ok, 0, D, KA), tl.trans(w_a), IEEE)  # (BLOCK_M, BLOCK_N)
    if KB > 0:
        acc += _dot(_cat_tile(tok, emb_ptr, feat_ptr, offs_m, m_ok, KA, D, KB), tl.trans(w_b), IEEE)
    for k0 in range(KA + KB, K, BLOCK_K):  # columns past the prefetched tiles
        acc += _dot(_cat_tile(tok, emb_ptr, feat_ptr, offs_m, m_ok, k0, D, BLOCK_K), tl.trans(_tile(w_ptr, offs_n, n_ok, k0, K, BLOCK_K)), IEEE)
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + offs_m[:, None] * D + offs_n[None, :], acc.to(dtype), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _embed_fc_kernel(
    tok_ptr, emb_ptr, feat_ptr, w_ptr, out_ptr, only_if_ptr, M, D: tl.constexpr, IEEE: tl.constexpr, GDC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BLOCK_K: tl.constexpr, ONLY_IF: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok, n_ok = offs_m < M, offs_n < D
    w_a, w_b = _weight_tiles(w_ptr, offs_n, n_ok, 2 * D, KA, KB)  # weights first, before the wait
    _wait_for_inputs(GDC)  # the tokens and the features come from the kernels before
    if _called_off(only_if_ptr, ONLY_IF):
        return
    tok = tl.load(tok_ptr + offs_m, mask=m_ok, other=0)
    _embed_fc_rows(tok, emb_ptr, feat_ptr, w_ptr, out_ptr, offs_m, m_ok, offs_n, n_ok, w_a, w_b, D, IEEE, KA, KB, BLOCK_K)


def embed_fc(
    tokens: torch.Tensor,  # (M,) int64 token ids
    embed: torch.Tensor,  # (V, D) the token embedding
    feat: torch.Tensor,  # (M, D) the elements' features
    w: torch.Tensor,  # (D, 2D) fc: the embedding's columns, then the feature's
    only_if: torch.Tensor | None = None,  # (1,) bool on the device: where false the launch does nothing past
    # its inputs' wait, its outputs unwritten (triton_common._called_off)
) -> torch.Tensor:  # (M, D) in feat's dtype: concat(embed[tokens], feat) @ w^T
    M, D = feat.shape
    assert w.shape == (D, 2 * D) and embed.shape[1] == D and tokens.shape == (M,)
    assert tokens.is_contiguous() and embed.is_contiguous() and feat.is_contiguous() and w.is_contiguous()
    out = torch.empty(M, D, dtype=feat.dtype, device=feat.device)
    BLOCK_N = TUNE["linear_block_n"]
    ka, kb = _k_tiles(2 * D, BLOCK_N * w.element_size())
    pdl = _pdl(feat)
    flag, only = _only_if_args(only_if, tokens)
    _embed_fc_kernel[(triton.cdiv(D, BLOCK_N), triton.cdiv(M, BLOCK_M))](
        tokens, embed, feat, w, out, flag, M, D=D, IEEE=_ieee(feat), GDC=pdl, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, KA=ka, KB=kb,
        BLOCK_K=int(TUNE["linear_block_k"]) * 2 // w.element_size(), ONLY_IF=only, num_warps=TUNE["num_warps"], **_launch(pdl),
    )
    return out


@triton.jit
def _ordered(v):
    """fp32 values -> int64 in [0, 2^32) that order as the values do."""
    bits = v.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    return tl.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits + 0x80000000)


@triton.jit
def _fold_best(
    x_ptr, w_ptr, key_ptr, offs_m, m_ok, offs_n, n_ok, w_a, w_b, D: tl.constexpr, IEEE: tl.constexpr, KA: tl.constexpr,
    KB: tl.constexpr, BLOCK_K: tl.constexpr, KEY_INDEX: tl.constexpr,
):
    """After the inputs' wait: each row's best (logit, index) over a tile of the draft vocabulary,
    folded into its key by an atomic max (draft_argmax, the fused chain)."""
    acc = _tiled_dot(x_ptr, offs_m, m_ok, w_ptr, offs_n, n_ok, w_a, w_b, D, IEEE, KA, KB, BLOCK_K)  # (BLOCK_M, BLOCK_N)
    logits = acc.to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded as the PyTorch product's output is
    key = _ordered(logits) * KEY_INDEX + (KEY_INDEX - 1 - offs_n.to(tl.int64))[None, :]  # (BLOCK_M, BLOCK_N)
    key = tl.where(n_ok[None, :], key, 0)
    tl.atomic_max(key_ptr + offs_m, tl.max(key, axis=1), mask=m_ok, sem="relaxed", scope="gpu")


@triton.jit
def _key_ids(best, ids_ptr, m_ok, KEY_INDEX: tl.constexpr):
    """Rows' keys (BLOCK_M,) int64 -> their target ids."""
    return tl.load(ids_ptr + (KEY_INDEX - 1 - best % KEY_INDEX), mask=m_ok, other=0)


@triton.jit
def _draft_argmax_kernel(
    x_ptr, w_ptr, ids_ptr, key_ptr, count_ptr, out_ptr, only_if_ptr, M, N, N_PROGRAMS, D: tl.constexpr, IEEE: tl.constexpr,
    GDC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr,
    BLOCK_K: tl.constexpr, KEY_INDEX: tl.constexpr, ONLY_IF: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mb = tl.program_id(1)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok, n_ok = offs_m < M, offs_n < N
    w_a, w_b = _weight_tiles(w_ptr, offs_n, n_ok, D, KA, KB)  # weights first, before the wait
    _wait_for_inputs(GDC)  # the features come from the kernel before
    if _called_off(only_if_ptr, ONLY_IF):  # every program returns here: the count and the keys stay zero
        return
    _fold_best(x_ptr, w_ptr, key_ptr, offs_m, m_ok, offs_n, n_ok, w_a, w_b, D, IEEE, KA, KB, BLOCK_K, KEY_INDEX)
    tl.debug_barrier()  # every thread's maximum is in before the count goes up
    done = tl.atomic_add(count_ptr + mb, 1, sem="acq_rel", scope="gpu")
    if done == N_PROGRAMS - 1:  # the last tile of these rows: every maximum is in
        best = tl.atomic_xchg(key_ptr + offs_m, tl.zeros([BLOCK_M], dtype=tl.int64), mask=m_ok, sem="acq_rel", scope="gpu")
        tl.store(out_ptr + offs_m, _key_ids(best, ids_ptr, m_ok, KEY_INDEX), mask=m_ok)
        tl.store(count_ptr + mb, 0)  # ready for the next launch


def draft_argmax(
    x: torch.Tensor,  # (M, D) predicted features
    w: torch.Tensor,  # (N, D) the draft vocabulary's rows of the LM head
    ids: torch.Tensor,  # (N,) int64: row -> target token id
    scratch: tuple[torch.Tensor, torch.Tensor],  # int64 (>= M,) and int32 (>= row blocks,) zeros, owned by the caller, left zero
    only_if: torch.Tensor | None = None,  # (1,) bool on the device: where false the launch does nothing past
    # its inputs' wait, its outputs unwritten (triton_common._called_off)
) -> torch.Tensor:  # (M,) int64 target ids: ids[argmax(x w^T)], the first of equal logits
    M, D = x.shape
    N = w.shape[0]
    keys, counts = scratch
    assert w.shape[1] == D and ids.shape == (N,) and N < KEY_INDEX and x.is_contiguous() and w.is_contiguous()
    if keys.numel() < M or keys.dtype != torch.int64 or counts.numel() < triton.cdiv(M, BLOCK_M) or counts.dtype != torch.int32:
        raise ValueError(f"draft_argmax needs {M} int64 and {triton.cdiv(M, BLOCK_M)} int32 zeros, "
                         f"got {keys.numel()} {keys.dtype} and {counts.numel()} {counts.dtype}")
    out = torch.empty(M, dtype=torch.int64, device=x.device)
    BLOCK_N = TUNE["head_block_n"]
    n_programs = triton.cdiv(N, BLOCK_N)
    ka, kb = _k_tiles(D, BLOCK_N * w.element_size())
    pdl = _pdl(x)
    flag, only = _only_if_args(only_if, ids)
    _draft_argmax_kernel[(n_programs, triton.cdiv(M, BLOCK_M))](
        x, w, ids, keys, counts, out, flag, M, N, n_programs, D=D, IEEE=_ieee(x), GDC=pdl, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        KA=ka, KB=kb, BLOCK_K=int(TUNE["norm_block_k"]) * 2 // w.element_size(), KEY_INDEX=KEY_INDEX, ONLY_IF=only,
        num_warps=TUNE["num_warps"], **_launch(pdl),
    )
    return out


@triton.jit
def _chain_inputs_kernel(tokens_ptr, verdict_ptr, input_pos_ptr, after_ptr, at_ptr, chain_pos_ptr, B, T, last_pos, n_chain,
                         SHARED: tl.constexpr, GDC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program b: row b's tokens after each verified one, their positions (clamped), and the chain's positions."""
    _wait_for_inputs(GDC)
    b = tl.program_id(0).to(tl.int64)
    accepted = tl.load(verdict_ptr + b * 2)
    nxt = tl.load(verdict_ptr + b * 2 + 1)
    t = tl.arange(0, BLOCK_T).to(tl.int64)
    ok = t < T
    following = tl.load(tokens_ptr + b * T + t + 1, mask=t + 1 < T, other=nxt)  # (BLOCK_T,) the fed token after each, the target's after the last
    tl.store(after_ptr + b * T + t, tl.where(t == accepted, nxt, following), mask=ok)
    if SHARED:  # positions (T,) every row shares: row 0 writes them clamped
        pos = tl.load(input_pos_ptr + t, mask=ok, other=0)
        tl.store(at_ptr + t, tl.minimum(pos, last_pos), mask=t < tl.where(b == 0, T, 0))
        anchor = tl.load(input_pos_ptr) + accepted
    else:  # (B, T)
        pos = tl.load(input_pos_ptr + b * T + t, mask=ok, other=0)
        tl.store(at_ptr + b * T + t, tl.minimum(pos, last_pos), mask=ok)
        anchor = tl.load(input_pos_ptr + b * T) + accepted
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    tl.store(chain_pos_ptr + d * B + b, tl.minimum(anchor + 1 + d, last_pos), mask=d < n_chain)


def chain_inputs(
    tokens: torch.Tensor,  # (B, T) int64: the verify's fed tokens
    verdict: torch.Tensor,  # (B, 2) int64: each row's accepted drafts and the target's next token
    input_pos: torch.Tensor,  # (B, T) or (T,) int64: their positions
    depth: int,  # the chain's depth
    last_pos: int,  # the draft cache's last position
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # (B, T), input_pos's shape, (depth - 1, B): layer_reference.chain_inputs
    B, T = tokens.shape
    assert verdict.shape == (B, 2) and verdict.is_contiguous() and tokens.is_contiguous() and input_pos.shape[-1] == T
    assert input_pos.is_contiguous() and input_pos.dim() in (1, 2), "positions (B, T) or (T,), contiguous"
    after = torch.empty(B, T, dtype=torch.int64, device=tokens.device)
    at = torch.empty(input_pos.shape, dtype=torch.int64, device=tokens.device)
    chain_pos = torch.empty(max(depth - 1, 0), B, dtype=torch.int64, device=tokens.device)
    pdl = _pdl(tokens)
    _chain_inputs_kernel[(B,)](tokens, verdict, input_pos, after, at, chain_pos, B, T, last_pos, depth - 1, SHARED=input_pos.dim() == 1, GDC=pdl, BLOCK_T=max(16, triton.next_power_of_2(T)),
                               BLOCK_D=max(16, triton.next_power_of_2(max(depth - 1, 1))), num_warps=1, **_launch(pdl))
    return after, at, chain_pos
