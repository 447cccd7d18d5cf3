"""A request's state in the continuous batcher (batch/scheduler.py): what it asked for, what it
has generated, and what its drafts did."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from labkit.config import GenerationConfig
from labkit.specdec.draft import Drafter


@dataclass
class BatchRequest:
    prompt_ids: list[int]
    config: GenerationConfig
    eos_ids: tuple[int, ...] = ()  # blocked before min_new_tokens; they end the output when config.stop_at_eos
    drafter: Drafter | None = None
    generator: torch.Generator | None = None  # sampling only: the request's own draws
    context: list[int] = field(default_factory=list)  # prompt + generated: what the drafter reads
    tokens: list[int] = field(default_factory=list)  # generated so far
    token_times: list[float] = field(default_factory=list)  # host clock (perf_counter) as each token came
    submitted: float = 0.0
    finished: bool = False
    stop_reason: str = ""  # "max_new_tokens", "eos" or "cancelled", as generate names them
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # of them, kept
    verify_steps: int = 0  # batched steps this request took part in
    draft_tokens: list[list[int]] = field(default_factory=list)  # per step: the proposal (speculation only)
    accepted_lengths: list[int] = field(default_factory=list)  # per step: how much of it stood
