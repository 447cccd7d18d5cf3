"""Turning logits into tokens: greedy, or temperature with top-k / top-p, seeded."""

from __future__ import annotations

import torch

from labkit.config import GenerationConfig


def warp_logits(
    logits: torch.Tensor,  # (..., V)
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:  # (..., V) fp32, -inf outside the kept set
    """Temperature, then top-k, then top-p (nucleus), the order transformers applies them."""
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p; the top token always stays
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def target_probs(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """The distribution a request samples from (..., V); greedy is one-hot on the argmax."""
    if config.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return warp_logits(logits, config.temperature, config.top_k, config.top_p).softmax(-1)


def sample(
    logits: torch.Tensor,  # (B, V)
    config: GenerationConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:  # (B,) long
    if config.temperature == 0:
        return logits.argmax(-1)
    probs = warp_logits(logits, config.temperature, config.top_k, config.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(config: GenerationConfig, device: torch.device) -> torch.Generator | None:
    if config.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed if config.seed is not None else torch.seed())
    return generator
