"""The one generate loop: prefill, then steps until EOS or the token budget.

Tokens are counted as generated ids, never by re-tokenising text, so a baseline and a
method are counted the same way.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.metrics.memory import read_peak, reset_peak
from labkit.metrics.timers import now
from labkit.sampling import make_generator, sample

Messages = list[dict[str, str]]


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    stop_reason: str  # "eos", "max_new_tokens" or "context" (the model's context ran out)
    ttft_s: float  # prefill + first token
    total_s: float
    token_latencies_ms: list[float] = field(default_factory=list)  # gap before each token after the first
    peak_memory_bytes: int = 0
    memory_kind: str = ""

    @property
    def tok_per_s(self) -> float:
        """New tokens over the whole request, prefill included: what a user waits for."""
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def decode_tok_per_s(self) -> float:
        decode_s = self.total_s - self.ttft_s
        return (self.new_tokens - 1) / decode_s if self.new_tokens > 1 and decode_s > 0 else 0.0

    @property
    def mean_token_latency_ms(self) -> float:
        lat = self.token_latencies_ms
        return sum(lat) / len(lat) if lat else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(tok_per_s=self.tok_per_s, decode_tok_per_s=self.decode_tok_per_s, mean_token_latency_ms=self.mean_token_latency_ms)
        return out


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    tokens: list[int]  # new token ids, EOS included when it ended the output
    stats: GenerationStats
    text: str = ""


def encode_prompt(tokenizer: Any, prompt: str | Messages, chat: bool | None = None) -> list[int]:
    """Prompt text (or chat messages) → ids; the chat template is applied when the model has one."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise LabkitError("the prompt is empty")
        messages: Messages = [{"role": "user", "content": prompt}]
    else:
        if not prompt or not any(m.get("content", "").strip() for m in prompt):
            raise LabkitError("the prompt is empty")
        messages = prompt
    use_chat = getattr(tokenizer, "chat_template", None) is not None if chat is None else chat
    if use_chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise LabkitError("this model's tokenizer has no chat template; use --no-chat")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    if not isinstance(prompt, str):
        text = "\n".join(m["content"] for m in messages)
    else:
        text = prompt
    return list(tokenizer(text).input_ids)


def check_prompt(prompt_ids: Sequence[int], context_len: int) -> None:
    if len(prompt_ids) == 0:
        raise LabkitError("the prompt is empty")
    if len(prompt_ids) >= context_len:
        raise LabkitError(f"the prompt has {len(prompt_ids)} tokens but the model's context is {context_len}: shorten it")


def generate(engine: Engine, prompt_ids: Sequence[int], config: GenerationConfig) -> GenerationResult:
    """Decode one prompt (batch 1). Greedy when temperature is 0."""
    config.validate()
    check_prompt(prompt_ids, engine.context_len)
    budget = min(config.max_new_tokens, engine.context_len - len(prompt_ids))
    engine.ensure_capacity(len(prompt_ids) + budget)
    eos = set(config.eos_token_ids or engine.eos_token_ids) if config.stop_at_eos else set()
    generator = make_generator(config, engine.device)
    device = engine.device

    eos_ids = torch.tensor(sorted(set(config.eos_token_ids or engine.eos_token_ids)), dtype=torch.long, device=device)

    def next_token(logits: torch.Tensor, n_done: int) -> torch.Tensor:  # (1, V) → (1,)
        if n_done < config.min_new_tokens and eos_ids.numel():
            logits = logits.index_fill(-1, eos_ids, float("-inf"))
        return sample(logits, config, generator)

    reset_peak(device)
    t_start = now(device)
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # (1, T)
    token = next_token(engine.prefill(prompt), 0)  # (1,)
    tokens = [int(token.item())]  # .item() waits for the device: timings below are real
    t_prev = time.perf_counter()
    ttft = t_prev - t_start
    latencies: list[float] = []
    stop_reason = "max_new_tokens" if budget == config.max_new_tokens else "context"
    while True:
        if tokens[-1] in eos:
            stop_reason = "eos"
            break
        if len(tokens) >= budget:
            break
        token = next_token(engine.decode(token.view(1, 1)), len(tokens))
        tokens.append(int(token.item()))
        t = time.perf_counter()
        latencies.append((t - t_prev) * 1e3)
        t_prev = t
    total = t_prev - t_start
    memory = read_peak(device)
    stats = GenerationStats(
        prompt_tokens=len(prompt_ids), new_tokens=len(tokens), stop_reason=stop_reason, ttft_s=ttft,
        total_s=total, token_latencies_ms=latencies, peak_memory_bytes=memory.peak_bytes, memory_kind=memory.kind,
    )
    return GenerationResult(prompt_ids=list(prompt_ids), tokens=tokens, stats=stats)


def generate_text(
    engine: Engine,
    tokenizer: Any,
    prompt: str | Messages,
    config: GenerationConfig,
    chat: bool | None = None,
) -> GenerationResult:
    """Text in, text out: encode (chat template when the model has one), generate, decode."""
    ids = encode_prompt(tokenizer, prompt, chat)
    result = generate(engine, ids, config)
    result.text = tokenizer.decode(result.tokens, skip_special_tokens=True)
    return result
