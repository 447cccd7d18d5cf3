"""Continuous batching over a BatchEngine: requests join and leave between steps.

Each `step()` first admits waiting requests into free slots (each prompt is prefilled on its own:
prefill and decode run as separate steps), then decodes one token for every active request in one
batched step. A request that finishes (max_new_tokens, or an end-of-sequence token once
min_new_tokens allow it) leaves at once and its slot takes the next request at the next step.
Admission keeps within the cache: a request whose prompt and new tokens do not fit a slot is
refused when it is submitted, and one waits while every slot is busy.

Greedy decoding only, for now: sampling and speculation run through `labkit.generate` at batch 1.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import torch

from labkit.batch.engine import BatchEngine
from labkit.config import GenerationConfig
from labkit.errors import LabkitError


@dataclass
class BatchRequest:
    prompt_ids: list[int]
    config: GenerationConfig
    eos_ids: tuple[int, ...] = ()  # blocked before min_new_tokens; they end the output when config.stop_at_eos
    tokens: list[int] = field(default_factory=list)  # generated so far
    token_times: list[float] = field(default_factory=list)  # host clock (perf_counter) as each token came
    submitted: float = 0.0
    finished: bool = False
    stop_reason: str = ""  # "length" or "eos"


class ContinuousBatcher:
    def __init__(self, batch: BatchEngine) -> None:
        self.batch = batch
        self.waiting: collections.deque[BatchRequest] = collections.deque()
        self.rows: list[BatchRequest] = []  # rows[i]: the request in slot i
        self.steps = 0  # batched decode steps taken
        self.rows_stepped = 0  # sum of active rows over those steps (mean batch = rows_stepped / steps)

    def submit(self, prompt_ids: list[int], config: GenerationConfig) -> BatchRequest:
        """Queue a request (EOS ids as `generate` takes them: the config's, else the model's)."""
        config.validate()
        if config.temperature != 0:
            raise LabkitError("batched decoding is greedy for now (temperature 0)")
        need = len(prompt_ids) + config.max_new_tokens
        if not prompt_ids or need > self.batch.cfg.max_seq_len:
            raise LabkitError(f"{need} positions (prompt + max_new_tokens) exceed a batch slot of {self.batch.cfg.max_seq_len}")
        eos = tuple(sorted(set(config.eos_token_ids or self.batch.engine.eos_token_ids)))
        request = BatchRequest(list(prompt_ids), config, eos, submitted=time.perf_counter())
        self.waiting.append(request)
        return request

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.rows)

    def _take(self, request: BatchRequest, logits: torch.Tensor) -> None:  # logits: (V,)
        cfg = request.config
        if len(request.tokens) < cfg.min_new_tokens and request.eos_ids:  # EOS blocked while min_new_tokens asks
            logits = logits.clone()
            logits[list(request.eos_ids)] = float("-inf")
        token = int(logits.argmax())
        request.tokens.append(token)
        request.token_times.append(time.perf_counter())
        if cfg.stop_at_eos and token in request.eos_ids:
            request.finished, request.stop_reason = True, "eos"
        elif len(request.tokens) >= cfg.max_new_tokens:
            request.finished, request.stop_reason = True, "length"

    def _leave(self) -> None:
        for slot in range(len(self.rows) - 1, -1, -1):  # from the end: a move only brings a kept row down
            if self.rows[slot].finished:
                moved = self.batch.release(slot)
                last = self.rows.pop()
                if moved is not None:
                    self.rows[slot] = last

    def step(self) -> None:
        """Admit what fits, then one decode step over every active request."""
        while self.waiting and self.batch.free:
            request = self.waiting.popleft()
            slot, logits = self.batch.admit(request.prompt_ids)
            assert slot == len(self.rows)
            self.rows.append(request)
            self._take(request, logits)
        self._leave()
        if not self.rows:
            return
        logits = self.batch.step([r.tokens[-1] for r in self.rows])  # (n, V)
        self.steps += 1
        self.rows_stepped += len(self.rows)
        for request, row in zip(self.rows, logits, strict=True):
            self._take(request, row)
        self._leave()

    def run(self) -> None:
        while self.busy:
            self.step()
