"""What the continuous batcher keeps of a request, and of a step it launched and has not yet read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from labkit.batch.transfer import HostCopy
from labkit.config import GenerationConfig
from labkit.metrics.timers import DeviceSpan
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


@dataclass
class PlainInFlight:
    """A plain step launched and not yet read."""
    requests: list[BatchRequest]  # its rows, in the order it ran them
    chosen: torch.Tensor  # (n,) each row's next token, on the device
    host: HostCopy  # the same tokens on their way to the host
    rows: dict[int, int]  # id(request) -> its row
    launched: float  # perf_counter when the call that launched it began
    rated: bool = True  # False: an admission ran while it was in flight, so its time is not its own


@dataclass
class ChunkInFlight:
    """A chunk of device lookup steps launched and not yet read."""
    lookup: Any  # the BatchLookup that ran it
    requests: list[BatchRequest]  # its rows, in order
    steps: int  # steps it ran
    full: int  # steps a whole chunk of these rows runs (its host work is rated as shared by so many)
    launched: float  # perf_counter when the call that launched it began
    captured: bool  # its bucket's step was captured first (its time is not its own)
    span: DeviceSpan  # the device's time for its steps
    log: HostCopy  # its log on its way to the host (BatchLookup.collect)
