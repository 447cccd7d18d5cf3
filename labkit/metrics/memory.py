"""Peak memory on the device a run used: CUDA allocator peak, MPS driver memory, or process RSS."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch


@dataclass
class MemoryReading:
    peak_bytes: int
    kind: str  # "cuda_max_allocated", "mps_driver_allocated" or "process_peak_rss"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def read_peak(device: torch.device) -> MemoryReading:
    if device.type == "cuda":
        return MemoryReading(int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated")
    if device.type == "mps":
        return MemoryReading(int(torch.mps.driver_allocated_memory()), "mps_driver_allocated")
    # ru_maxrss is the process's lifetime peak: KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return MemoryReading(int(rss if sys.platform == "darwin" else rss * 1024), "process_peak_rss")
