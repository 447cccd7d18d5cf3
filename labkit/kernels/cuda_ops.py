"""Builds and loads kernels/specdec_kernels.cu with torch.utils.cpp_extension (cached by torch)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

_CHECKOUT = Path(__file__).resolve().parents[2] / "kernels" / "specdec_kernels.cu"
SOURCE = _CHECKOUT if _CHECKOUT.is_file() else Path(__file__).parent / "csrc" / "specdec_kernels.cu"  # a checkout, an installed wheel


@lru_cache(maxsize=1)
def load() -> tuple[Any, str]:
    """(module, "built") or (None, why not). Never raises: the registry falls back."""
    import torch

    if not torch.cuda.is_available():
        return None, "no CUDA device"
    if not SOURCE.is_file():
        return None, f"{SOURCE.name} not found"
    try:
        from torch.utils.cpp_extension import load as load_extension

        from labkit.config import cache_dir

        build = cache_dir() / "cuda_ext"
        build.mkdir(parents=True, exist_ok=True)
        major, minor = torch.cuda.get_device_capability()
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
        module = load_extension(name="labkit_specdec", sources=[str(SOURCE)], extra_cuda_cflags=["-O3"],
                                build_directory=str(build), verbose=False)
    except Exception as err:  # noqa: BLE001 - a failed build is a reason, not a crash
        lines = str(err).strip().splitlines() or [type(err).__name__]
        return None, f"build failed: {lines[-1][:200]}"
    return module, "built"


def verify_prefix(draft: Any, target: Any) -> Any:
    module, _ = load()
    return tuple(module.verify_prefix(draft, target))


def rejection_sample(draft: Any, q: Any, p: Any, u_accept: Any, u_sample: Any) -> Any:
    module, _ = load()
    return tuple(module.rejection_sample(draft, q, p, u_accept, u_sample))


def kv_append(cache: Any, new: Any, keep: Any, start: Any) -> Any:
    module, _ = load()
    return module.kv_append(cache, new, keep, start)
