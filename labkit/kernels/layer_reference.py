"""PyTorch twins of layer_triton.py: the same fused layer operations, written plainly.

They define what the Triton kernels must compute (tests compare the two on random inputs), and
they run a whole Llama layer through the same interface on any device. A Triton launch may be
called off on the device (`only_if` false: its outputs are then unwritten, and a caller picks past
them); a twin takes the flag and always computes, which meets that contract too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TREES = True  # token trees: rope_pos apart from the slots, a tree mask in decode_attention
ROW_POSITIONS = True  # input_pos may be (B, T), as in layer_triton
TAKES_ONLY_IF = True  # the ops take `only_if` (computed regardless), as layer_triton's


def rms_normed(x: torch.Tensor, norm_w: torch.Tensor, eps: float) -> torch.Tensor:  # (M, dim)
    """RMSNorm as llama.RMSNorm computes it: fp32 statistics, rounded, then scaled."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, norm_w.shape, norm_w, eps)
    return norm_w * F.rms_norm(x.float(), norm_w.shape, None, eps).to(x.dtype)


def norm_qkv_rope(
    x: torch.Tensor,  # (M, dim), M = B*T rows in (b, t) order
    norm_w: torch.Tensor,  # (dim,)
    eps: float,
    w: torch.Tensor,  # (NH*D + 2*NKV*D, dim)
    bias: torch.Tensor | None,
    cos: torch.Tensor,  # (S, D)
    sin: torch.Tensor,  # (S, D), first half negated
    input_pos: torch.Tensor,  # (T,), or (B, T): each batch row at its own positions
    k_cache: torch.Tensor,  # (B, NKV, S, D), written at input_pos
    v_cache: torch.Tensor,  # (B, NKV, S, D)
    n_heads: int,
    rope_pos: torch.Tensor | None = None,  # (T,) rotary positions when they are not the cache slots (tree nodes)
    only_if: torch.Tensor | None = None,  # the Triton launch's flag; computed regardless here
) -> torch.Tensor:  # q: (M, NH, D)
    B, nkv, _, D = k_cache.shape
    M = x.shape[0]
    pos = input_pos.expand(B, -1)  # (B, T)
    T = pos.shape[1]
    qkv = F.linear(rms_normed(x, norm_w, eps), w, bias).view(B, T, n_heads + 2 * nkv, D)
    rpos = pos if rope_pos is None else rope_pos.expand(B, -1)  # (B, T)
    c = cos[rpos].unsqueeze(2)  # (B, T, 1, D)
    s = sin[rpos].unsqueeze(2)
    rot = qkv[:, :, : n_heads + nkv]
    roped = torch.addcmul(rot * c, rot.roll(D // 2, dims=-1), s).to(x.dtype)  # (B, T, NH+NKV, D): fp32 tables, the rows' dtype out (as the kernels store)
    rows = torch.arange(B, device=x.device)[:, None]  # (B, 1)
    k_cache[rows, :, pos] = roped[:, :, n_heads:]  # indexed (B, T, NKV, D)
    v_cache[rows, :, pos] = qkv[:, :, n_heads + nkv :]
    return roped[:, :, :n_heads].reshape(M, n_heads, D)


def tree_keys_seen(keys: torch.Tensor, tree_base: torch.Tensor, tree_mask: torch.Tensor) -> torch.Tensor:
    """keys (S,) cache positions -> (T, S) bool: which of them query t may see as far as the tree
    goes (every key outside the tree's slots tree_base..+N, and the tree nodes its mask row allows)."""
    node = keys - tree_base  # (S,) tree node of each key, negative before the tree
    in_tree = (node >= 0) & (node < tree_mask.shape[1])
    allowed = tree_mask.bool()[:, node.clamp(0, tree_mask.shape[1] - 1)]  # (T, S)
    return ~in_tree[None, :] | allowed


def decode_attention(
    q: torch.Tensor,  # (M, NH, D)
    k_cache: torch.Tensor,  # (B, NKV, S, D)
    v_cache: torch.Tensor,  # (B, NKV, S, D)
    input_pos: torch.Tensor,  # (T,) query t sees keys at positions <= input_pos[t]; or (B, T), per batch row
    scale: float,
    window: int | None,
    counters: torch.Tensor | None = None,  # the Triton kernel's scratch; unused here
    span: int | None = None,  # the Triton kernel's grid; every query here sees all its keys
    tree_base: torch.Tensor | None = None,  # (1,) first cache slot of a token tree's N nodes
    tree_mask: torch.Tensor | None = None,  # (T, N) bool: query t sees tree node j (its ancestors and itself)
    only_if: torch.Tensor | None = None,  # the Triton launch's flag; computed regardless here
) -> torch.Tensor:  # (M, NH*D)
    """With a tree, query t sees the keys before tree_base and the tree nodes (at slots
    tree_base + j) that tree_mask allows, all at or before its own slot input_pos[t]."""
    B, nkv, S, D = k_cache.shape
    M, nh, _ = q.shape
    pos = input_pos.expand(B, -1)  # (B, T)
    T = pos.shape[1]
    end = int(pos.max()) + 1
    keys = torch.arange(end, device=q.device)
    seen = keys[None, None, :] <= pos[:, :, None]  # (B, T, end)
    if window:
        seen &= keys[None, None, :] > pos[:, :, None] - window
    if tree_mask is not None:
        assert tree_base is not None
        seen &= tree_keys_seen(keys, tree_base, tree_mask)[None]
    seen = seen[:, None]  # (B, 1, T, end): over every head
    qb = q.view(B, T, nh, D).transpose(1, 2)  # (B, NH, T, D)
    y = F.scaled_dot_product_attention(
        qb, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=seen, scale=scale, enable_gqa=nh != nkv
    )  # (B, NH, T, D)
    return y.transpose(1, 2).reshape(M, nh * D)


def linear_residual(
    x: torch.Tensor,  # (M, K)
    w: torch.Tensor,  # (N, K)
    bias: torch.Tensor | None,
    residual: torch.Tensor,  # (M, N)
    only_if: torch.Tensor | None = None,  # the Triton launch's flag; computed regardless here
) -> torch.Tensor:  # (M, N)
    return residual + F.linear(x, w, bias)


def norm_gate_up(
    x: torch.Tensor,  # (M, dim)
    norm_w: torch.Tensor,  # (dim,)
    eps: float,
    w: torch.Tensor,  # (2*hidden, dim)
    bias: torch.Tensor | None,
    only_if: torch.Tensor | None = None,  # the Triton launch's flag; computed regardless here
) -> torch.Tensor:  # (M, hidden)
    gate, up = F.linear(rms_normed(x, norm_w, eps), w, bias).chunk(2, dim=-1)
    return F.silu(gate) * up


def norm_head(
    x: torch.Tensor,  # (M, dim)
    norm_w: torch.Tensor,  # (dim,)
    eps: float,
    w: torch.Tensor,  # (vocab, dim)
    keep_normed: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # logits (M, vocab); RMSNorm(x) (M, dim) when kept
    h = rms_normed(x, norm_w, eps)
    return F.linear(h, w), h if keep_normed else None


def embed_fc(
    tokens: torch.Tensor,  # (M,) int64 token ids
    embed: torch.Tensor,  # (V, D) the token embedding
    feat: torch.Tensor,  # (M, D) the elements' features
    w: torch.Tensor,  # (D, 2D) fc: the embedding's columns, then the feature's
    only_if: torch.Tensor | None = None,  # the Triton launch's flag; computed regardless here
) -> torch.Tensor:  # (M, D): an EAGLE draft pass's input, fc(concat(embed[tokens], feat))
    return F.linear(torch.cat((F.embedding(tokens, embed).to(feat.dtype), feat), dim=-1), w)


def draft_argmax(
    x: torch.Tensor,  # (M, D) predicted features
    w: torch.Tensor,  # (N, D) the draft vocabulary's rows of the LM head
    ids: torch.Tensor,  # (N,) int64: row -> target token id
    scratch: tuple[torch.Tensor, torch.Tensor] | None = None,  # the Triton kernel's; unused here
    only_if: torch.Tensor | None = None,  # the Triton launch's flag; computed regardless here
) -> torch.Tensor:  # (M,) int64 target ids of the best draft-vocabulary logit (the first of equal ones)
    return ids[F.linear(x, w).argmax(-1)]


def chain_inputs(
    tokens: torch.Tensor,  # (B, T) int64: a verify's fed tokens
    verdict: torch.Tensor,  # (B, 2) int64: each row's accepted drafts and the target's next token
    input_pos: torch.Tensor,  # (B, T) or (T,) int64: their positions
    depth: int,  # the chain's depth
    last_pos: int,  # the draft cache's last position
    counting: torch.Tensor | None = None,  # (>= depth,) 0, 1, ... on the device (sliced, not made: a launch fewer)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # (B, T), input_pos's shape, (depth - 1, B) int64
    """An EAGLE catch-up's and chain's inputs after a verify (specdec/eagle_drafter.py): the token after
    each fed one (B, T) (the next fed token; the target's own at the accepted row and after the last),
    the fed positions clamped to the draft cache (input_pos's shape), and the chain's depths 2..depth
    positions (depth - 1, B): anchor (the accepted row's position) + 1, + 2, ..., clamped."""
    accepted, nxt = verdict[:, 0:1], verdict[:, 1:2]  # (B, 1) each
    after = torch.cat((tokens[:, 1:], nxt), dim=1).scatter_(1, accepted, nxt)  # (B, T)
    at = input_pos.clamp(max=last_pos)  # (B, T) or (T,)
    anchor = input_pos[..., 0] + verdict[:, 0]  # (B,)
    steps = torch.arange(1, depth, device=tokens.device) if counting is None else counting[1:depth]  # (depth - 1,)
    chain_pos = (anchor[None, :] + steps[:, None]).clamp_(max=last_pos)  # (depth - 1, B)
    return after, at, chain_pos
