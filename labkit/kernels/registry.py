"""Picks, per kernel, the best backend that works here: cuda > triton > torch.

`SPECDEC_FORCE_PY=1` skips compilation and uses the PyTorch references. A backend that cannot
be built or imported falls back safely, and the reason is kept (and logged once) so that
`python -m labkit kernels` can show what was chosen and why.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from labkit.config import env_flag

log = logging.getLogger(__name__)
KERNELS = ("verify_prefix", "rejection_sample", "kv_append", "greedy_verdict", "lookup_draft", "step_feed", "lookup_commit")
NO_CUDA = ("greedy_verdict", "lookup_draft", "step_feed", "lookup_commit")  # kernels with Triton and PyTorch backends only
# The fused Llama layer (layer_triton.py / layer_reference.py): Triton or PyTorch, chosen per
# engine by engine.pick_layer_ops (it needs the model's shapes), listed here beside the others.
FUSED_LAYER_OPS = ("norm_qkv_rope", "decode_attention", "linear_residual", "norm_gate_up")
BACKENDS = ("cuda", "triton", "torch")
# Triton kernels chosen only when asked for (LABKIT_GLUE_KERNELS=1; by name always): tested bit for bit
# against their twins (interpreter and H200); on the H200 their gain is below the noise (docs/speculation.md)
OPT_IN = ("step_feed",)


def glue_kernels() -> bool:
    """Whether the opt-in Triton kernels (OPT_IN, and the EAGLE draft layer's chain_inputs) are asked for."""
    return env_flag("LABKIT_GLUE_KERNELS")


def backends(name: str) -> tuple[str, ...]:
    """The backends a kernel has, best first: NO_CUDA and the layer kernels have no CUDA C++ one."""
    return tuple(b for b in BACKENDS if not (b == "cuda" and name in NO_CUDA + FUSED_LAYER_OPS))


@dataclass
class BackendStatus:
    backend: str
    ok: bool  # works here when asked for by name
    reason: str
    auto: bool = True  # may be chosen automatically (the Triton interpreter works but is far slower than torch)


def backend_status(backend: str, device: torch.device) -> BackendStatus:
    if backend == "torch":
        return BackendStatus(backend, True, "PyTorch reference")
    if env_flag("SPECDEC_FORCE_PY"):
        return BackendStatus(backend, False, "SPECDEC_FORCE_PY=1")
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return BackendStatus(backend, False, "triton is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return BackendStatus(backend, False, f"triton needs CUDA on {device.type} (or TRITON_INTERPRET=1)")
        try:
            import labkit.kernels.triton_ops  # noqa: F401
        except Exception as err:  # noqa: BLE001
            return BackendStatus(backend, False, f"import failed: {str(err).splitlines()[0][:200]}")
        if device.type != "cuda":
            return BackendStatus(backend, True, "interpreter (only when named: slower than torch)", auto=False)
        return BackendStatus(backend, True, "compiled")
    if backend == "cuda":
        if device.type != "cuda":
            return BackendStatus(backend, False, f"not a CUDA device ({device.type})")
        from labkit.kernels import cuda_ops

        module, reason = cuda_ops.load()
        return BackendStatus(backend, module is not None, reason)
    raise ValueError(f"unknown backend {backend!r}")


def _module(backend: str) -> Any:
    if backend == "torch":
        from labkit.kernels import reference

        return reference
    if backend == "triton":
        from labkit.kernels import triton_ops

        return triton_ops
    from labkit.kernels import cuda_ops

    return cuda_ops


_chosen: dict[tuple[str, str, bool, bool], tuple[str, Callable[..., Any]]] = {}


def get(name: str, device: torch.device, backend: str | None = None) -> Callable[..., Any]:
    """The kernel `name` for tensors on `device`: a named backend, or the best one available."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; choose from {KERNELS}")
    if backend is not None:
        if backend not in backends(name):
            raise RuntimeError(f"{name}: backend {backend} unavailable (Triton and PyTorch only)")
        status = backend_status(backend, device)
        if not status.ok:
            raise RuntimeError(f"{name}: backend {backend} unavailable ({status.reason})")
        return getattr(_module(backend), name)
    key = (name, device.type, env_flag("SPECDEC_FORCE_PY"), glue_kernels())
    if key not in _chosen:
        for candidate in backends(name):
            status = backend_status(candidate, device)
            if _chosen_automatically(name, candidate, status):
                _chosen[key] = (candidate, getattr(_module(candidate), name))
                break
            log.info("kernel %s: %s unavailable (%s), falling back", name, candidate, status.reason)
    return _chosen[key][1]


def _chosen_automatically(name: str, backend: str, status: BackendStatus) -> bool:
    return status.ok and status.auto and not (backend == "triton" and name in OPT_IN and not glue_kernels())


def table(device: torch.device) -> list[dict[str, Any]]:
    """One row per kernel: each backend's status and the one chosen."""
    rows = []
    statuses = {b: backend_status(b, device) for b in BACKENDS}
    for name in KERNELS + FUSED_LAYER_OPS:
        row: dict[str, Any] = {"kernel": name, "chosen": next(b for b in backends(name) if _chosen_automatically(name, b, statuses[b]))}
        for b in BACKENDS:
            status = statuses[b]
            row[b] = ("ok" if status.auto else f"named only: {status.reason}") if status.ok else f"no: {status.reason}"
            if status.ok and status.auto and not _chosen_automatically(name, b, status):
                row[b] = "named only: LABKIT_GLUE_KERNELS=1 to choose it (no measurable gain on an H200)"
        if "cuda" not in backends(name):
            row["cuda"] = "no: Triton and PyTorch only"
        rows.append(row)
    return rows
