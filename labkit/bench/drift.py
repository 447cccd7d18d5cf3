"""How far a lossy policy's output drifts from the target's own (greedy) output."""

from __future__ import annotations

import math

import torch

from labkit.engine import Engine


def agreement(a: list[int], b: list[int]) -> float:
    """Share of positions where two outputs hold the same token (over the longer output)."""
    n = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b, strict=False)) / n if n else 1.0


@torch.inference_mode()
def perplexity(engine: Engine, prompt_ids: list[int], tokens: list[int]) -> float:
    """The target's perplexity on `tokens` following the prompt: exp(mean negative log-likelihood)."""
    if not tokens:
        return float("nan")
    ids = list(prompt_ids) + list(tokens)
    engine.ensure_capacity(len(ids))
    logits = engine.forward(torch.tensor([ids], device=engine.device))[0].float()  # (T, V)
    logp = logits[len(prompt_ids) - 1 : -1].log_softmax(-1)  # (N, V): row j predicts tokens[j]
    nll = -logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None]).mean()
    return math.exp(float(nll))
