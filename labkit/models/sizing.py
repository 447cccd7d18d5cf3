"""Sizing: what the device (or the machine) has free, and what a model would need, from its config
alone. The engine refuses a model that would not fit before loading it; `labkit doctor` reports it.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from labkit.errors import LabkitError
from labkit.models.families import family_of

DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def available_bytes(device: torch.device) -> tuple[int, int]:
    """(free, total) memory where the weights would live: the card's, or the machine's RAM."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines() if ":" in line)
        return int(info["MemAvailable"].split()[0]) * 1024, int(info["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages, pages


def count_params(config: Any) -> int:
    """Parameters of a supported architecture, from its config alone (no weights loaded)."""
    return family_of(config.model_type).count_params(config)


def kv_cache_bytes(config: Any, seq_len: int, dtype: torch.dtype, batch: int = 1) -> int:
    layers, kv, hd = family_of(config.model_type).kv_shape(config)
    return 2 * layers * batch * kv * seq_len * hd * DTYPE_BYTES[dtype]


def estimate_model_bytes(config: Any, dtype: torch.dtype, seq_len: int = 2048) -> int:
    """Weights + KV cache + 20% for activations, logits and allocator slack."""
    weights = count_params(config) * DTYPE_BYTES[dtype]
    return int((weights + kv_cache_bytes(config, seq_len, dtype)) * 1.2)


def check_fits(need_bytes: int, device: torch.device, what: str) -> None:
    free, total = available_bytes(device)
    if need_bytes > free:
        raise LabkitError(f"{what} needs about {need_bytes / 2**30:.2f} GiB but {device} has {free / 2**30:.2f} GiB free "
                          f"of {total / 2**30:.2f} GiB; use a smaller model, --dtype float16/bfloat16, or another device")
