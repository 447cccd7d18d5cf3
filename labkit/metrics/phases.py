"""Per-phase timings of the generate loop (SPECDEC_DETAILED_METRICS / --metrics-detailed).

Phases: prefill, draft, verify (the target's K+1 pass), accept (the policy), kv_update
(rolling the cache back to the accepted prefix), sampling (plain decoding's next token) and
decode (plain greedy steps, argmax included, one chunk at a time).

Off (the default) it records nothing and never synchronises. On a CUDA device each phase
is bracketed by a pair of CUDA events (device time, read once at the end of the request)
and also timed on the host; host timing synchronises at phase boundaries so that each
phase's wall time is its own. Elsewhere it is host time after a synchronise.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from labkit.metrics.timers import synchronize

PHASES = ("prefill", "draft", "verify", "accept", "kv_update", "sampling", "decode")


@dataclass
class PhaseTotals:
    host_s: dict[str, float] = field(default_factory=dict)  # wall seconds per phase
    device_s: dict[str, float] = field(default_factory=dict)  # CUDA-event seconds per phase (CUDA only)
    count: dict[str, int] = field(default_factory=dict)  # times each phase ran

    def to_dict(self) -> dict[str, Any]:
        return {"host_s": self.host_s, "device_s": self.device_s, "count": self.count}


class PhaseTimer:
    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.device, self.enabled = device, enabled
        self._events: list[tuple[str, Any, Any]] = []  # (phase, start event, end event)
        self.totals = PhaseTotals()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        cuda = self.device.type == "cuda"
        synchronize(self.device)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                end.record()
                self._events.append((name, start, end))
            synchronize(self.device)
            t = self.totals
            t.host_s[name] = t.host_s.get(name, 0.0) + time.perf_counter() - t0
            t.count[name] = t.count.get(name, 0) + 1

    def finish(self) -> PhaseTotals:
        """Read the CUDA events (one synchronisation) and return the totals."""
        if self._events:
            synchronize(self.device)
            for name, start, end in self._events:
                self.totals.device_s[name] = self.totals.device_s.get(name, 0.0) + start.elapsed_time(end) / 1e3
            self._events = []
        return self.totals
