"""Wall-clock timing that is honest on asynchronous devices."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

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
