"""PyTorch references for every kernel: slow, obvious, and what the tests compare against."""

from __future__ import annotations

import torch

GROUP = 32  # weights per GGUF block


def dequant_q4_1(
    qs: torch.Tensor,  # (N, K/2) uint8, llama.cpp nibble order within each 16-byte block
    d: torch.Tensor,  # (N, K/32) float32
    m: torch.Tensor,  # (N, K/32) float32
) -> torch.Tensor:  # (N, K) float32, w = d*q + m
    N = qs.shape[0]
    blocks = qs.view(N, -1, 16).to(torch.int32)  # (N, B, 16)
    q = torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).float()  # (N, B, 32): element j, then j+16
    return (d[..., None] * q + m[..., None]).reshape(N, -1)


def dequant_q8_0(
    qs: torch.Tensor,  # (N, K) int8
    d: torch.Tensor,  # (N, K/32) float32
) -> torch.Tensor:  # (N, K) float32, w = d*q
    N = qs.shape[0]
    return (d[..., None] * qs.view(N, -1, GROUP).float()).reshape(N, -1)


def quant_linear_ref(
    x: torch.Tensor,  # (M, K) float32
    kind: str,  # "q4_1" or "q8_0"
    qs: torch.Tensor,
    d: torch.Tensor,
    m: torch.Tensor | None,
) -> torch.Tensor:  # (M, N)
    w = dequant_q4_1(qs, d, m) if kind == "q4_1" else dequant_q8_0(qs, d)  # type: ignore[arg-type]
    return x @ w.T


def quantize_rows_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # x (M, K) float32
    """Each row's blocks of 32 as llama.cpp's Q8 activations: xq (M, K/32, 32) int8 values (as int32) in
    [-127, 127], dx (M, K/32) = max|x| / 127, and sx (M, K/32). xq rounds x * (1 / dx)
    to nearest, ties to even (0 where dx is 0); sx = dx * the block's sum of xq (llama.cpp's Q8_1: the m term of
    Q4_1 then meets the same rounding as the rest, kernels/cpu_q8_gemv.c)."""
    blocks = x.reshape(x.shape[0], -1, 32)  # (M, B, 32)
    dx = blocks.abs().amax(-1) / 127.0  # (M, B)
    inv = torch.where(dx > 0, 1.0 / dx, torch.zeros_like(dx))
    xq = torch.round(blocks * inv[..., None]).to(torch.int32)  # (M, B, 32)
    return xq, dx, dx * xq.sum(-1).float()


def quant_linear_q8_ref(
    x: torch.Tensor,  # (M, K) float32
    kind: str,  # "q4_1" or "q8_0"
    qs: torch.Tensor,
    d: torch.Tensor,  # (N, K/32)
    m: torch.Tensor | None,  # (N, K/32) for q4_1
) -> torch.Tensor:  # (M, N)
    """kernels/cpu_q8_gemv.c's product: per block b, d_b dx_b (the integer dot product of the weights' quants
    and xq) + m_b sx_b (Q4_1), summed over blocks (in float64 here: the kernel's order of fp32 sums differs)."""
    xq, dx, sx = quantize_rows_q8(x)  # (M, B, 32), (M, B), (M, B)
    if kind == "q4_1":
        blocks = qs.view(qs.shape[0], -1, 16).to(torch.int32)  # (N, B, 16)
        q = torch.cat([blocks & 0x0F, blocks >> 4], dim=-1)  # (N, B, 32): element j, then j+16 (dequant_q4_1's order)
    else:
        q = qs.reshape(qs.shape[0], -1, 32).to(torch.int32)  # (N, B, 32)
    dots = torch.einsum("mbj,nbj->mnb", xq.double(), q.double())  # (M, N, B): exact integers
    y = (dots * (d[None].float() * dx[:, None]).double()).sum(-1)  # (M, N): d_b * dx_b rounded in fp32, as the kernel's
    if kind == "q4_1":
        assert m is not None
        y = y + (m[None].double() * sx[:, None].double()).sum(-1)
    return y.float()


# --- speculative decoding kernels ---------------------------------------------------------
# Each has a Triton twin (triton_ops.py), and the first three a CUDA one (kernels/specdec_kernels.cu);
# the registry picks one. Random numbers come in as arguments, so every backend can be checked exactly.


def verify_prefix(
    draft: torch.Tensor,  # (B, K) long: draft tokens
    target: torch.Tensor,  # (B, K+1) long: the target's argmax at each position
) -> tuple[torch.Tensor, torch.Tensor]:  # accepted (B,) long, bonus (B,) long
    """Greedy verification: accepted = length of the longest prefix where draft == target;
    bonus = target[accepted] (the target's own token after the accepted run)."""
    B, K = draft.shape
    mismatch = draft != target[:, :K]  # (B, K)
    pos = torch.arange(K, device=draft.device).expand(B, K)
    accepted = torch.where(mismatch, pos, K).min(dim=1).values if K else torch.zeros(B, dtype=torch.long, device=draft.device)
    bonus = target.gather(1, accepted[:, None]).squeeze(1)
    return accepted, bonus


def greedy_verdict(
    logits: torch.Tensor,  # (B, T, V) a verify step's logits, T = K+1
    tokens: torch.Tensor,  # (B, T) long: the last token, then the K drafts
    eos_mask: torch.Tensor,  # (V,) bool
    block_rows: torch.Tensor,  # (B,) or (1,) long: EOS is blocked at positions t < block_rows[b] of row b (min_new_tokens)
) -> torch.Tensor:  # (B, 2) long: accepted drafts, and the target's token after them
    """Greedy acceptance on the device: the target's argmax per position (the first of equal
    maxima; EOS blocked where asked), then verify_prefix. The same tokens as GreedyMatch."""
    T = tokens.shape[1]
    rows = torch.arange(T, device=tokens.device) < block_rows[:, None]  # (B or 1, T)
    target = logits.masked_fill(eos_mask[None, None, :] & rows[:, :, None], float("-inf")).argmax(-1)  # (B, T)
    accepted, bonus = verify_prefix(tokens[:, 1:], target)  # (B,), (B,)
    return torch.stack([accepted, bonus], dim=1)


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:  # (B, V), (B,) → (B,) long
    """The first index whose running sum exceeds u * total (sampling by the inverse CDF)."""
    cdf = weights.cumsum(-1)  # (B, V)
    threshold = u * cdf[:, -1]  # (B,)
    idx = (cdf <= threshold[:, None]).sum(-1)
    return idx.clamp_max(weights.shape[-1] - 1)


def rejection_sample(
    draft: torch.Tensor,  # (B, K) long
    q: torch.Tensor,  # (B, K, V) float: draft probabilities
    p: torch.Tensor,  # (B, K+1, V) float: target probabilities
    u_accept: torch.Tensor,  # (B, K) uniforms in [0, 1)
    u_sample: torch.Tensor,  # (B,) uniform in [0, 1) for the recovered or bonus token
) -> tuple[torch.Tensor, torch.Tensor]:  # accepted (B,) long, next token (B,) long
    """Accept x_i while u_i * q_i(x_i) <= p_i(x_i); at the first rejection i sample norm(max(0, p_i - q_i))
    (p_i itself if that is empty); after K accepts sample the bonus from p_K."""
    B, K, V = q.shape
    x = draft[..., None]  # (B, K, 1)
    p_x = p[:, :K].gather(2, x).squeeze(2)  # (B, K)
    q_x = q.gather(2, x).squeeze(2)  # (B, K)
    rejected = u_accept * q_x > p_x  # (B, K)
    pos = torch.arange(K, device=draft.device).expand(B, K)
    accepted = torch.where(rejected, pos, K).min(dim=1).values  # (B,)
    rows = torch.arange(B, device=draft.device)
    p_row = p[rows, accepted]  # (B, V)
    q_row = q[rows, accepted.clamp_max(K - 1)] * (accepted < K)[:, None]  # (B, V); zero when all accepted
    residual = (p_row - q_row).clamp_min(0)
    empty = residual.sum(-1) <= 0
    weights = torch.where(empty[:, None], p_row, residual)
    return accepted, inverse_cdf(weights, u_sample)


def kv_append(
    cache: torch.Tensor,  # (B, H, S, D): one layer's keys (or values), written in place
    new: torch.Tensor,  # (B, H, T, D): the verify pass's keys (or values); must not alias cache
    keep: torch.Tensor,  # (B, T) long: which of the T new entries to keep, in order; -1 pads
    start: torch.Tensor,  # (B,) long: where row b's kept entries go
) -> torch.Tensor:
    """cache[b, :, start[b] + j] = new[b, :, keep[b, j]] for every keep[b, j] >= 0: appends the
    accepted entries, compacting them when they are not contiguous (e.g. accepted tree branches)."""
    B, T = keep.shape
    for b in range(B):
        valid = keep[b][keep[b] >= 0]
        if valid.numel():
            cache[b, :, int(start[b]) : int(start[b]) + valid.numel()] = new[b, :, valid]
    return cache


LOOKUP_MAX_N = 3  # longest n-gram lookup_draft looks up


def lookup_draft(
    history: torch.Tensor,  # (B, Lh) each row's context tokens in [0, n_ctx[b]), anything after
    n_ctx: torch.Tensor,  # (B,) each row's context length, >= 1
    k: int,
    match_n: torch.Tensor | None = None,  # (B,) long, written if given: the matched n-gram's length n (0: none)
) -> torch.Tensor:  # (B, k) each row's draft
    """Prompt lookup on the device, each row on its own: at the context's end the longest n-gram
    (n = 3, 2, 1) seen before, its latest occurrence, and the k tokens that followed it, repeating
    with the match's period where the copy runs into the context's end (the last token k times when
    nothing matches). Fixed shapes and no host read, so it can be captured in a CUDA graph. The host
    twin is specdec/lookup.lookup_reference; one stream is one row. match_n >= n holds exactly where
    latest_match(context, n, n) finds a copy (eagle-mix's choice, without a launch of its own)."""
    B, Lh = history.shape
    dev = history.device
    pos = torch.arange(Lh, device=dev)  # (Lh,)
    # each context's last LOOKUP_MAX_N tokens (clamped in a short context: a match needs c - n >= 0 and c < n_ctx,
    # so a clamped entry is never compared where it counts)
    tail = history.gather(1, (n_ctx[:, None] - LOOKUP_MAX_N + torch.arange(LOOKUP_MAX_N, device=dev)).clamp(min=0))  # (B, N)
    # a continuation position c follows an n-gram match when history[c-n : c] == the context's last n
    # tokens; eq[b, c] says history[b, c-1-j] == tail[b, -1-j] (shifted so that c indexes the continuation)
    score = torch.zeros(B, Lh, dtype=torch.long, device=dev)  # (B, Lh) length of the match ending before c
    run = torch.ones(B, Lh, dtype=torch.bool, device=dev)  # (B, Lh)
    for j in range(LOOKUP_MAX_N):
        eq = torch.nn.functional.pad(history == tail[:, LOOKUP_MAX_N - 1 - j, None], (j + 1, 0))[:, :Lh]  # (B, Lh)
        run = run & eq & (pos > j)  # the whole n-gram lies inside the history
        score = score + run.long()
    valid = (pos < n_ctx[:, None]) & (score > 0)  # a token follows the match inside the context
    best = torch.where(valid, score * Lh + pos, -1).amax(1)  # (B,) longest n, then latest occurrence
    c = torch.where(best >= 0, best % Lh, n_ctx - 1)  # (B,) continuation start
    if match_n is not None:
        match_n.copy_(torch.where(best >= 0, best // Lh, 0))
    q = n_ctx - c  # (B,) period
    return history.gather(1, c[:, None] + torch.arange(k, device=dev) % q[:, None])  # (B, k)


def step_feed(
    history: torch.Tensor,  # (B, Lh) each row's context tokens in [0, n_ctx[b]), anything after
    n_ctx: torch.Tensor,  # (B,) each row's context length, >= 1
    draft: torch.Tensor,  # (B, K) long: each row's drafts
) -> tuple[torch.Tensor, torch.Tensor]:  # feed (B, K+1), input_pos (B, K+1)
    """The verify input of a device lookup step (specdec/lookup_steps.py), each row on its own: its
    context's last token, then its K drafts, at cache positions n_ctx - 1 on (the cache holds the
    context but its last token)."""
    last = (n_ctx - 1)[:, None]  # (B, 1)
    feed = torch.cat([history.gather(1, last), draft], 1)  # (B, K+1)
    return feed, last + torch.arange(draft.shape[1] + 1, device=history.device)


def lookup_commit(
    history: torch.Tensor,  # (B, Lh) long, written in place
    n_ctx: torch.Tensor,  # (B,) long: each row's context length, advanced in place
    feed: torch.Tensor,  # (B, K+1) long: each row's last context token, then its K drafts
    verdict: torch.Tensor,  # (B, 2) long: greedy_verdict's accepted drafts and next token per row
    drafts_log: torch.Tensor,  # (chunk, B, K) long: [step_idx] gets this step's drafts
    accepted_log: torch.Tensor,  # (chunk, B) long: [step_idx] gets the accepted counts
    step_idx: torch.Tensor,  # (1,) long: advanced in place
) -> None:
    """The end of a device lookup step (specdec/lookup_steps.py), each row on its own: the drafts go
    into the history after the context, the target's token after the accepted ones (so the context
    grows by the accepted drafts and that token), and the step is logged for the host's one read
    per chunk."""
    K = feed.shape[1] - 1
    accepted, bonus = verdict[:, 0], verdict[:, 1]  # (B,), (B,)
    history.scatter_(1, n_ctx[:, None] + torch.arange(K, device=history.device), feed[:, 1:])
    history.scatter_(1, (n_ctx + accepted)[:, None], bonus[:, None])
    n_ctx.add_(accepted + 1)
    drafts_log.index_copy_(0, step_idx, feed[None, :, 1:])
    accepted_log.index_copy_(0, step_idx, accepted[None])
    step_idx.add_(1)
