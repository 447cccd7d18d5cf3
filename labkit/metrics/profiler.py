"""An optional torch profiler trace around a request (generate --profile PATH).

The trace opens in chrome://tracing or https://ui.perfetto.dev; `top_ops` gives the
operators that took the most device time (CPU time on a CPU), for a printed table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from labkit.errors import LabkitError


def check_trace_path(path: str | Path) -> Path:
    """A new .json file in an existing folder: an existing file is never overwritten."""
    p = Path(path)
    if p.suffix != ".json":
        raise LabkitError(f"the profiler trace is a Chrome trace: give a .json path, not {str(p)!r}")
    if p.exists():
        raise LabkitError(f"{p} exists; choose a new path (labkit never overwrites a file you have)")
    if not p.parent.is_dir():
        raise LabkitError(f"folder {p.parent} does not exist")
    return p


@contextlib.contextmanager
def profile(device: torch.device) -> Iterator[Any]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        yield prof


def top_ops(prof: Any, device: torch.device, n: int = 12) -> list[dict[str, Any]]:
    """The n kernels with the most time on a GPU (operators by self CPU time when there is no GPU)."""
    on_gpu = device.type == "cuda"
    rows = []
    for e in prof.key_averages():
        if on_gpu and getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue  # operators' device time is their kernels' time: count the kernels only
        self_us = (e.self_device_time_total if on_gpu else e.self_cpu_time_total)
        rows.append({"name": e.key, "calls": e.count, "self_us": float(self_us)})
    rows.sort(key=lambda r: -r["self_us"])
    total = sum(r["self_us"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["self_us"] / total
    return rows[:n]
