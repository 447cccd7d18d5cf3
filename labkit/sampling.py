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


def sample_rows(
    logits: torch.Tensor,  # (n, V), row i sampled by configs[i] (temperature > 0) with generators[i]
    configs: list[GenerationConfig],
    generators: list[torch.Generator | None],
) -> torch.Tensor:  # (n,) long
    """Row i's token as `sample(logits[i:i+1], configs[i], generators[i])` draws it, with the
    warp and softmax done once for every row that shares temperature, top-k and top-p (a
    batch's sampled rows: a few launches a step, not a few per row); each row still draws once
    from its own generator."""
    out = torch.empty(len(configs), dtype=torch.long, device=logits.device)
    groups: dict[tuple[float, int, float], list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault((c.temperature, c.top_k, c.top_p), []).append(i)
    for (temperature, top_k, top_p), rows in groups.items():
        index = torch.tensor(rows, device=logits.device) if len(rows) < len(configs) else None
        probs = warp_logits(logits if index is None else logits.index_select(0, index), temperature, top_k, top_p).softmax(-1)  # (m, V)
        draws = torch.cat([torch.multinomial(probs[j : j + 1], 1, generator=generators[i])[0] for j, i in enumerate(rows)])  # (m,)
        if index is None:
            out.copy_(draws)
        else:
            out.index_copy_(0, index, draws)
    return out


def make_generator(config: GenerationConfig, device: torch.device) -> torch.Generator | None:
    if config.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed if config.seed is not None else torch.seed())
    return generator
