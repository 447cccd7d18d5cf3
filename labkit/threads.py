"""CPU threads: how many labkit uses, set once for PyTorch and the GGUF block kernel, and a word
when the machine is too busy for clean timings.

PyTorch's CPU wheels ship their own libgomp; the block kernel (kernels/cpu_quant_gemv.c) is built
with -fopenmp and links libgomp by the same name, so the loader hands it the copy torch already
loaded: one OpenMP pool, sized by `torch.set_num_threads`, never two pools fighting over the cores
(`labkit doctor` shows both counts). The default is the physical cores this process may run on:
a second hyper-thread per core adds little to memory-bound decoding and contends with the first.
"""

from __future__ import annotations

import os

import torch

from labkit.errors import LabkitError

ENV = "LABKIT_THREADS"


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask, e.g. under taskset or a container)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def physical_cores() -> int:
    """Physical cores, at most the usable CPUs."""
    import psutil

    return max(1, min(psutil.cpu_count(logical=False) or usable_cpus(), usable_cpus()))


def resolve_threads(requested: int | None = None) -> int:
    """--threads, else LABKIT_THREADS, else the physical cores."""
    source, value = ("--threads", requested) if requested is not None else (ENV, os.environ.get(ENV))
    if value is None or value == "":
        return physical_cores()
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise LabkitError(f"{source} takes a whole number of threads, got {value!r}") from None
    if isinstance(value, bool) or n < 1:
        raise LabkitError(f"{source} must be at least 1, got {value!r}")
    return n


def apply_threads(requested: int | None = None) -> int:
    """Set PyTorch's (and so the block kernel's) thread count; returns it."""
    n = resolve_threads(requested)
    torch.set_num_threads(n)
    return n


def load_average() -> float | None:
    """The one-minute load average (None where the system has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def busy_warning() -> str:
    """A sentence when the one-minute load average exceeds the usable CPUs, else ""."""
    load = load_average()
    cpus = usable_cpus()
    if load is None or load <= cpus:
        return ""
    return (f"this machine is busy (load average {load:.1f} on {cpus} CPUs): timings will be noisy; "
            f"fewer threads (--threads, {ENV}) may help")
