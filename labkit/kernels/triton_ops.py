"""Triton twins of the speculative-decoding kernels in reference.py (same arguments, same results).

Runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (how CI tests it). Import is lazy: the
registry imports this module only where triton is installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _verify_prefix_kernel(draft_ptr, target_ptr, accepted_ptr, bonus_ptr, K, BLOCK_K: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    inside = offs < K
    d = tl.load(draft_ptr + b * K + offs, mask=inside, other=0)
    t = tl.load(target_ptr + b * (K + 1) + offs, mask=inside, other=0)
    first = tl.min(tl.where((d != t) & inside, offs, K), axis=0)
    tl.store(accepted_ptr + b, first.to(tl.int64))
    tl.store(bonus_ptr + b, tl.load(target_ptr + b * (K + 1) + first))


def verify_prefix(draft: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, K = draft.shape
    accepted = torch.empty(B, dtype=torch.long, device=draft.device)
    bonus = torch.empty(B, dtype=torch.long, device=draft.device)
    _verify_prefix_kernel[(B,)](draft.contiguous(), target.contiguous(), accepted, bonus, K, BLOCK_K=max(16, triton.next_power_of_2(K)))
    return accepted, bonus


@triton.jit
def _rejection_sample_kernel(draft_ptr, q_ptr, p_ptr, ua_ptr, us_ptr, accepted_ptr, token_ptr, K, V,
                             BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    b = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    inside = offs_k < K
    x = tl.load(draft_ptr + b * K + offs_k, mask=inside, other=0)
    p_x = tl.load(p_ptr + (b * (K + 1) + offs_k) * V + x, mask=inside, other=0.0)
    q_x = tl.load(q_ptr + (b * K + offs_k) * V + x, mask=inside, other=0.0)
    u = tl.load(ua_ptr + b * K + offs_k, mask=inside, other=0.0)
    first = tl.min(tl.where((u * q_x > p_x) & inside, offs_k, K), axis=0)
    q_scale = tl.where(first < K, 1.0, 0.0)  # all accepted: the bonus comes from p_K alone
    p_row = p_ptr + (b * (K + 1) + first) * V
    q_row = q_ptr + (b * K + tl.minimum(first, K - 1)) * V
    # pass 1: the residual's mass, and p's own for when the residual is empty
    total_res = 0.0
    total_p = 0.0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        m = offs < V
        p_v = tl.load(p_row + offs, mask=m, other=0.0)
        total_res += tl.sum(tl.maximum(p_v - q_scale * tl.load(q_row + offs, mask=m, other=0.0), 0.0), axis=0)
        total_p += tl.sum(p_v, axis=0)
    q_scale = tl.where(total_res > 0, q_scale, 0.0)
    total2 = tl.where(total_res > 0, total_res, total_p)
    threshold = tl.load(us_ptr + b) * total2
    # pass 2: inverse CDF, the first index whose running sum exceeds the threshold
    running = 0.0
    found = V - 1
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        m = offs < V
        w = tl.maximum(tl.load(p_row + offs, mask=m, other=0.0) - q_scale * tl.load(q_row + offs, mask=m, other=0.0), 0.0)
        cdf = tl.cumsum(w, axis=0) + running
        hit = tl.min(tl.where((cdf > threshold) & m, offs, V - 1), axis=0)
        found = tl.minimum(found, hit)
        running += tl.sum(w, axis=0)
    tl.store(accepted_ptr + b, first.to(tl.int64))
    tl.store(token_ptr + b, found.to(tl.int64))


def rejection_sample(draft: torch.Tensor, q: torch.Tensor, p: torch.Tensor, u_accept: torch.Tensor, u_sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, K, V = q.shape
    accepted = torch.empty(B, dtype=torch.long, device=draft.device)
    token = torch.empty(B, dtype=torch.long, device=draft.device)
    _rejection_sample_kernel[(B,)](draft.contiguous(), q.float().contiguous(), p.float().contiguous(), u_accept.float().contiguous(),
                                   u_sample.float().contiguous(), accepted, token, K, V,
                                   BLOCK_K=max(16, triton.next_power_of_2(K)), BLOCK_V=1024)
    return accepted, token


@triton.jit
def _kv_append_kernel(cache_ptr, new_ptr, keep_ptr, start_ptr, H, S, T, D, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    j = tl.program_id(2)
    src = tl.load(keep_ptr + b * T + j)
    if src >= 0:
        dst = tl.load(start_ptr + b) + j
        offs = tl.arange(0, BLOCK_D)
        m = offs < D
        vals = tl.load(new_ptr + ((b * H + h) * T + src) * D + offs, mask=m)
        tl.store(cache_ptr + ((b * H + h) * S + dst) * D + offs, vals, mask=m)


def kv_append(cache: torch.Tensor, new: torch.Tensor, keep: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    B, H, S, D = cache.shape
    T = keep.shape[1]
    assert cache.is_contiguous(), "kv_append writes a contiguous (B, H, S, D) cache"
    _kv_append_kernel[(B, H, T)](cache, new.contiguous(), keep.contiguous(), start.contiguous(), H, S, T, D, BLOCK_D=triton.next_power_of_2(D))
    return cache


@triton.jit
def _lookup_draft_kernel(history_ptr, n_ctx_ptr, out_ptr, n_out_ptr, Lh, K, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                         HAS_N: tl.constexpr):
    """Program b: row b's three shifted comparisons and the max, a block of positions at a time
    over its context only (not the whole buffer), then its k-token gather (and the match's n)."""
    b = tl.program_id(0).to(tl.int64)
    row_ptr = history_ptr + b * Lh
    L = tl.load(n_ctx_ptr + b)  # () int64
    last1 = tl.load(row_ptr + L - 1)
    last2 = tl.load(row_ptr + tl.maximum(L - 2, 0))
    last3 = tl.load(row_ptr + tl.maximum(L - 3, 0))
    best = tl.full((), -1, tl.int64)
    for s0 in range(0, L, BLOCK):
        c = s0 + tl.arange(0, BLOCK).to(tl.int64)  # (BLOCK,) continuation positions
        inside = c < L
        m1 = inside & (c >= 1) & (tl.load(row_ptr + c - 1, mask=inside & (c >= 1), other=-1) == last1)
        m2 = m1 & (c >= 2) & (tl.load(row_ptr + c - 2, mask=m1 & (c >= 2), other=-1) == last2)
        m3 = m2 & (c >= 3) & (tl.load(row_ptr + c - 3, mask=m2 & (c >= 3), other=-1) == last3)
        score = m1.to(tl.int64) + m2.to(tl.int64) + m3.to(tl.int64)
        best = tl.maximum(best, tl.max(tl.where(m1, score * Lh + c, -1), axis=0))
    start = tl.where(best >= 0, best % Lh, L - 1)
    if HAS_N:
        tl.store(n_out_ptr + b, tl.where(best >= 0, best // Lh, 0))
    period = L - start
    j = tl.arange(0, BLOCK_K).to(tl.int64)
    ok = j < K
    tl.store(out_ptr + b * K + j, tl.load(row_ptr + start + j % period, mask=ok, other=0), mask=ok)


def lookup_draft(history: torch.Tensor, n_ctx: torch.Tensor, k: int, match_n: torch.Tensor | None = None) -> torch.Tensor:
    """reference.lookup_draft (3-gram lookup) as one launch, a program per row."""
    B, Lh = history.shape
    assert history.stride(1) == 1 and history.stride(0) == Lh and n_ctx.is_contiguous(), "rows of one contiguous history"
    out = torch.empty(B, k, dtype=history.dtype, device=history.device)
    assert match_n is None or (match_n.shape == (B,) and match_n.dtype == torch.long and match_n.is_contiguous())
    _lookup_draft_kernel[(B,)](history, n_ctx, out, out if match_n is None else match_n, Lh, k, BLOCK=1024,
                               BLOCK_K=max(16, triton.next_power_of_2(k)), HAS_N=match_n is not None)
    return out


@triton.jit
def _argmax_tiles_kernel(logits_ptr, eos_ptr, block_rows_ptr, block_stride, max_ptr, idx_ptr, T, V, N_TILES, BLOCK_V: tl.constexpr):
    """Program (row, tile): the largest logit of one vocabulary tile and its first index, EOS
    masked out at the blocked positions (block_stride 0: one count for every batch row). Many
    programs read the logits at once."""
    row = tl.program_id(0)  # b*T + t
    tile = tl.program_id(1)
    offs = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    inside = offs < V
    x = tl.load(logits_ptr + row * V + offs, mask=inside, other=-float("inf")).to(tl.float32)
    blocked = (row % T) < tl.load(block_rows_ptr + (row // T) * block_stride)
    eos = tl.load(eos_ptr + offs, mask=inside, other=0) != 0
    x = tl.where(eos & blocked, -float("inf"), x)
    best = tl.max(x, axis=0)
    first = tl.min(tl.where((x == best) & inside, offs, V), axis=0)
    tl.store(max_ptr + row * N_TILES + tile, best)
    tl.store(idx_ptr + row * N_TILES + tile, first.to(tl.int64))


@triton.jit
def _verdict_kernel(max_ptr, idx_ptr, tokens_ptr, out_ptr, T, N_TILES, BLOCK_T: tl.constexpr, BLOCK_TILES: tl.constexpr):
    """Program b: each row's argmax from its tiles' (max, first index) (the first tile holding the
    maximum has its first index), then the accepted prefix of drafts and the token after it."""
    b = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    j = tl.arange(0, BLOCK_TILES)
    ok = (t[:, None] < T) & (j[None, :] < N_TILES)
    at = (b * T + t[:, None]) * N_TILES + j[None, :]
    m = tl.load(max_ptr + at, mask=ok, other=-float("inf"))  # (BLOCK_T, BLOCK_TILES)
    ix = tl.load(idx_ptr + at, mask=ok, other=0)
    best = tl.max(m, axis=1)  # (BLOCK_T,)
    target = tl.min(tl.where((m == best[:, None]) & ok, ix, 2**62), axis=1)  # (BLOCK_T,) int64
    draft = tl.load(tokens_ptr + b * T + t + 1, mask=t < T - 1, other=-1)  # draft t is row t + 1's token
    accepted = tl.min(tl.where((draft != target) & (t < T - 1), t, T - 1), axis=0)
    bonus = tl.sum(tl.where(t == accepted, target, 0), axis=0)
    tl.store(out_ptr + b * 2, accepted.to(tl.int64))
    tl.store(out_ptr + b * 2 + 1, bonus.to(tl.int64))


def greedy_verdict(logits: torch.Tensor, tokens: torch.Tensor, eos_mask: torch.Tensor, block_rows: torch.Tensor) -> torch.Tensor:
    """reference.greedy_verdict in two launches: per-tile maxima over the vocabulary, then one
    program per row of the batch (instead of a mask, an argmax, a comparison and a stack)."""
    B, T, V = logits.shape
    BLOCK_V = 2048
    n_tiles = triton.cdiv(V, BLOCK_V)
    maxima = torch.empty(B * T, n_tiles, dtype=torch.float32, device=logits.device)
    first = torch.empty(B * T, n_tiles, dtype=torch.long, device=logits.device)
    assert block_rows.numel() in (1, B) and block_rows.is_contiguous(), "one EOS block count, or one per row"
    _argmax_tiles_kernel[(B * T, n_tiles)](logits.contiguous(), eos_mask, block_rows, int(block_rows.numel() > 1), maxima, first, T, V, n_tiles,
                                           BLOCK_V=BLOCK_V)
    out = torch.empty(B, 2, dtype=torch.long, device=logits.device)
    _verdict_kernel[(B,)](maxima, first, tokens.contiguous(), out, T, n_tiles,
                          BLOCK_T=max(16, triton.next_power_of_2(T)), BLOCK_TILES=max(16, triton.next_power_of_2(n_tiles)))
    return out


@triton.jit
def _step_feed_kernel(history_ptr, n_ctx_ptr, draft_ptr, feed_ptr, pos_ptr, K, Lh, draft_stride, BLOCK_K: tl.constexpr):
    """Program b: row b's last context token and drafts (feed), and their cache positions."""
    b = tl.program_id(0).to(tl.int64)
    L = tl.load(n_ctx_ptr + b)
    j = tl.arange(0, BLOCK_K).to(tl.int64)
    ok = j <= K
    last = tl.load(history_ptr + b * Lh + L - 1)
    draft = tl.load(draft_ptr + b * draft_stride + j - 1, mask=ok & (j >= 1), other=0)
    tl.store(feed_ptr + b * (K + 1) + j, tl.where(j == 0, last, draft), mask=ok)
    tl.store(pos_ptr + b * (K + 1) + j, L - 1 + j, mask=ok)


def step_feed(history: torch.Tensor, n_ctx: torch.Tensor, draft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.step_feed as one launch (a one-warp program per row), not five (a subtraction, a
    gather, a concatenation, a range and an addition: ~2 us each inside a captured step on an H200).
    Chosen automatically only with LABKIT_GLUE_KERNELS=1 until timed on a GPU (registry.OPT_IN)."""
    B, Lh = history.shape
    K = draft.shape[1]
    assert history.stride(1) == 1 and history.stride(0) == Lh and draft.stride(1) == 1 and n_ctx.is_contiguous(), "contiguous rows"
    feed = torch.empty(B, K + 1, dtype=history.dtype, device=history.device)
    input_pos = torch.empty(B, K + 1, dtype=torch.long, device=history.device)
    _step_feed_kernel[(B,)](history, n_ctx, draft, feed, input_pos, K, Lh, draft.stride(0),
                            BLOCK_K=max(16, triton.next_power_of_2(K + 1)), num_warps=1)
    return feed, input_pos


@triton.jit
def _lookup_commit_kernel(history_ptr, n_ctx_ptr, feed_ptr, verdict_ptr, drafts_log_ptr, accepted_log_ptr, step_ptr, K, Lh,
                          drafts_step_stride, drafts_row_stride, accepted_step_stride, accepted_row_stride, BLOCK_K: tl.constexpr):
    """Program b: row b's commit. The step index is only read here (its wrapper advances it after)."""
    b = tl.program_id(0).to(tl.int64)
    L = tl.load(n_ctx_ptr + b)
    accepted = tl.load(verdict_ptr + b * 2)
    bonus = tl.load(verdict_ptr + b * 2 + 1)
    step = tl.load(step_ptr)
    j = tl.arange(0, BLOCK_K)
    draft = tl.load(feed_ptr + b * (K + 1) + 1 + j, mask=j < K, other=0)  # (BLOCK_K,)
    tl.debug_barrier()  # every thread has read n_ctx before any writes it
    # one store per position: the drafts, with the target's token at the first rejected one (or after all)
    tl.store(history_ptr + b * Lh + L + j, tl.where(j == accepted, bonus, draft), mask=(j < K) | (j == accepted))
    tl.store(drafts_log_ptr + step * drafts_step_stride + b * drafts_row_stride + j, draft, mask=j < K)
    tl.store(accepted_log_ptr + step * accepted_step_stride + b * accepted_row_stride, accepted)
    tl.store(n_ctx_ptr + b, L + accepted + 1)


def lookup_commit(history: torch.Tensor, n_ctx: torch.Tensor, feed: torch.Tensor, verdict: torch.Tensor,
                  drafts_log: torch.Tensor, accepted_log: torch.Tensor, step_idx: torch.Tensor) -> None:
    """reference.lookup_commit as one launch (a one-warp program per row), then the step index advanced."""
    B, Lh = history.shape
    K = feed.shape[1] - 1
    assert history.stride(0) == Lh and drafts_log.stride(2) == 1 and n_ctx.is_contiguous(), "contiguous rows"
    _lookup_commit_kernel[(B,)](history, n_ctx, feed.contiguous(), verdict.contiguous(), drafts_log, accepted_log, step_idx, K, Lh,
                                drafts_log.stride(0), drafts_log.stride(1), accepted_log.stride(0), accepted_log.stride(1),
                                BLOCK_K=max(16, triton.next_power_of_2(K + 1)), num_warps=1)
    step_idx.add_(1)
