"""Wall-clock timing that is honest on asynchronous devices."""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Iterator

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def now(device: torch.device) -> float:
    """perf_counter after the device has finished its queued work."""
    synchronize(device)
    return time.perf_counter()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Timed work with Python's garbage collector paused, collected first (as timeit times). A
    benchmark keeps what it measured, so a full collection walks every result kept so far: on a
    2-core CPU up to 0.3 s each (bench batch, K 3, 16 tokens, batch 1 and 4: 11 of them, 2 s of a
    110 s run). One landed in a timed run at random: on the H200 one run in three at 64 rows ran
    30-40% slow (aggregate_tok_per_s_runs in results/gpu/batch-NVIDIA-H200-20261202-065846.json)."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def median_us(fn: Callable[[], object], reps: int, warm: int = 0) -> float:
    """Median microseconds of `fn()` on the host clock over `reps` calls, after `warm` untimed ones
    (fn synchronises the device itself when its work is asynchronous)."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


class DeviceSpan:
    """The device's time for the work queued between `start` and `stop`: a CUDA event pair (no
    synchronisation until `seconds`, which waits for the end event); elsewhere the host's time
    between them, the work having run in the calls (on MPS after a synchronise)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.cuda = device, device.type == "cuda"
        if self.cuda:
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.t0 = self.t1 = 0.0

    def start(self) -> None:
        if self.cuda:
            self.begin.record()
        else:
            self.t0 = now(self.device)

    def stop(self) -> None:
        if self.cuda:
            self.end.record()
        else:
            self.t1 = now(self.device)

    def seconds(self) -> float:
        if self.cuda:
            self.end.synchronize()
            return self.begin.elapsed_time(self.end) / 1e3
        return self.t1 - self.t0
