"""Builds and loads the CUDA C++ sources under kernels/ with torch.utils.cpp_extension (cached by torch):
specdec_kernels.cu (the registry's CUDA backend) and graph_if.cu (CUDA graph IF nodes)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any


def _source(name: str) -> Path:
    """A CUDA source under kernels/ in a checkout, else the wheel's copy under csrc/."""
    checkout = Path(__file__).resolve().parents[2] / "kernels" / name
    return checkout if checkout.is_file() else Path(__file__).parent / "csrc" / name


SOURCE = _source("specdec_kernels.cu")
GRAPH_IF_SOURCE = _source("graph_if.cu")


def _build(name: str, source: Path) -> tuple[Any, str]:
    """(module, "built") or (None, why not). Never raises: callers fall back."""
    import torch

    if not torch.cuda.is_available():
        return None, "no CUDA device"
    if not source.is_file():
        return None, f"{source.name} not found"
    try:
        from torch.utils.cpp_extension import load as load_extension

        from labkit.config import cache_dir

        build = cache_dir() / "cuda_ext" / name
        build.mkdir(parents=True, exist_ok=True)
        major, minor = torch.cuda.get_device_capability()
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
        module = load_extension(name=name, sources=[str(source)], extra_cuda_cflags=["-O3"],
                                build_directory=str(build), verbose=False)
    except Exception as err:  # noqa: BLE001 - a failed build is a reason, not a crash
        lines = str(err).strip().splitlines() or [type(err).__name__]
        return None, f"build failed: {lines[-1][:200]}"
    return module, "built"


@lru_cache(maxsize=1)
def load() -> tuple[Any, str]:
    """The speculative-decoding kernels (kernels/specdec_kernels.cu): (module, "built") or (None, why not)."""
    return _build("labkit_specdec", SOURCE)


@lru_cache(maxsize=1)
def graph_if() -> tuple[Any, str]:
    """CUDA graph IF nodes for a PyTorch without them (kernels/graph_if.cu; graphs.only_where):
    (module, "built") or (None, why not)."""
    module, reason = _build("labkit_graph_if", GRAPH_IF_SOURCE)
    if module is not None and not module.available():
        return None, "CUDA graph IF nodes need CUDA 12.4"
    return module, reason


def verify_prefix(draft: Any, target: Any) -> Any:
    module, _ = load()
    return tuple(module.verify_prefix(draft, target))


def rejection_sample(draft: Any, q: Any, p: Any, u_accept: Any, u_sample: Any) -> Any:
    module, _ = load()
    return tuple(module.rejection_sample(draft, q, p, u_accept, u_sample))


def kv_append(cache: Any, new: Any, keep: Any, start: Any) -> Any:
    module, _ = load()
    return module.kv_append(cache, new, keep, start)
