"""Acceptance policies: how many draft tokens stand, and which token comes after them.

Terms (as in vLLM's rejection sampler):
- draft tokens: the K tokens a drafter proposed, with their draft probabilities q (K, V) or
  none (a drafter without probabilities is one-hot: q = 1 on its token);
- target probabilities p (K+1, V): the target's distribution at each draft position and one
  past the last;
- accepted: the longest run of draft tokens the policy keeps;
- recovered token: sampled from the residual max(0, p - q) at the first rejected position;
- bonus token: sampled from p at position K when every draft token was accepted.

A lossless policy leaves the output distribution exactly the target's (greedy: identical tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from labkit.config import GenerationConfig
from labkit.sampling import target_probs


@dataclass
class Verdict:
    accepted: int  # how many draft tokens stand
    next_token: int  # the recovered or bonus token that follows them


class Policy(Protocol):
    name: str
    lossless: bool

    def accept(
        self,
        draft_tokens: list[int],  # K
        draft_probs: torch.Tensor | None,  # (K, V) or None (one-hot drafter)
        target_logits: torch.Tensor,  # (K+1, V)
        config: GenerationConfig,
        generator: torch.Generator | None,
    ) -> Verdict: ...


class GreedyMatch:
    """Keep draft tokens while they equal the target's argmax; the next argmax is the bonus."""

    name = "greedy"
    lossless = True

    def accept(
        self,
        draft_tokens: list[int],
        draft_probs: torch.Tensor | None,
        target_logits: torch.Tensor,
        config: GenerationConfig,
        generator: torch.Generator | None,
    ) -> Verdict:
        target = target_logits.argmax(-1).tolist()  # K+1 ids, one device sync
        n = 0
        while n < len(draft_tokens) and draft_tokens[n] == target[n]:
            n += 1
        return Verdict(n, target[n])


def one_hot_probs(tokens: list[int], vocab: int, device: torch.device) -> torch.Tensor:  # (K, V)
    q = torch.zeros(len(tokens), vocab, device=device)
    q[torch.arange(len(tokens)), torch.tensor(tokens, device=device)] = 1.0
    return q


class RejectionSampling:
    """Speculative sampling (Leviathan et al., Chen et al.): accept x_i with prob min(1, p_i(x)/q_i(x));
    at the first rejection sample from norm(max(0, p_i - q_i)); after K accepts, a bonus from p_K."""

    name = "rejection"
    lossless = True

    def accept(
        self,
        draft_tokens: list[int],
        draft_probs: torch.Tensor | None,
        target_logits: torch.Tensor,
        config: GenerationConfig,
        generator: torch.Generator | None,
    ) -> Verdict:
        K, V = len(draft_tokens), target_logits.shape[-1]
        device = target_logits.device
        p = target_probs(target_logits, config)  # (K+1, V)
        q = draft_probs.float() if draft_probs is not None else one_hot_probs(draft_tokens, V, device)  # (K, V)
        idx = torch.arange(K, device=device)
        x = torch.tensor(draft_tokens, device=device)
        p_x, q_x = p[idx, x], q[idx, x]  # (K,)
        u = torch.rand(K, device=device, generator=generator)
        rejected = (u * q_x > p_x).nonzero()  # u < p/q  ⇔  accept (q_x > 0 for a proposed token)
        if rejected.numel() == 0:
            return Verdict(K, int(torch.multinomial(p[K], 1, generator=generator).item()))
        i = int(rejected[0].item())
        residual = (p[i] - q[i]).clamp_min(0)
        if residual.sum() <= 0:  # p == q up to rounding: the residual is empty, fall back to p
            residual = p[i]
        return Verdict(i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator).item()))


def default_policy(config: GenerationConfig) -> Policy:
    """Greedy match for greedy decoding, rejection sampling otherwise: both lossless."""
    return GreedyMatch() if config.temperature == 0 else RejectionSampling()
