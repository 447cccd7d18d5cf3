"""GPU pre-check (phase 3B): what this machine offers, and whether a model pair fits before loading it.

`python -m labkit doctor` prints a report; the estimates come from labkit/models/sizing.py, which the
engine also uses to refuse a model that would not fit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from labkit.models.sizing import available_bytes, count_params, estimate_model_bytes


@dataclass
class DoctorReport:
    torch: str
    device: str
    device_name: str
    compute_capability: str | None
    free_gib: float
    total_gib: float
    bf16: bool
    nvcc: str | None
    triton: str | None
    c_compiler: str | None
    cpu_block_kernel: str
    cpu_instruction_sets: str  # those the block kernel's paths use, of the CPU's flags
    cpu_kernel_path: str  # avx512, avx2 or portable: the path its -march=native build took
    cpu_q8_kernel_path: str  # --weights gguf-q8's: avx2-int8(-vnni) or portable-int8
    threads: int  # PyTorch's, which the block kernel shares (labkit/threads.py)
    kernel_threads: int
    physical_cores: int
    load_average: float | None
    cuda_graphs: bool
    cuda_graph_if_nodes: str  # graphs.if_nodes_status after a try (labkit's own built here where PyTorch has none), "" off CUDA
    fits: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nvcc_version() -> str | None:
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    release = [line for line in out.splitlines() if "release" in line]
    return release[0].split("release")[-1].strip() if release else nvcc


def _triton_version() -> str | None:
    try:
        import triton

        return str(triton.__version__)
    except Exception:  # noqa: BLE001 - a broken install is "not there"
        return None


def _kernel_isa(signature: str) -> str:
    flags = set(signature.replace(":", " ").split())
    return " ".join(f for f in ("avx512f", "avx2", "fma", "avx512_vnni", "avx_vnni", "asimd", "neon") if f in flags) or "none of avx512f, avx2, fma, neon"


def _if_nodes(device: torch.device) -> str:
    """Whether eagle-mix's captured copy steps can skip the chain (CUDA graph IF nodes): tried here, so a
    build that fails says why now rather than in a request (graphs.if_nodes_status)."""
    if device.type != "cuda":
        return ""
    from labkit.graphs import if_nodes, if_nodes_status

    if_nodes()
    return if_nodes_status()


def run_doctor(device: torch.device, models: list[tuple[str, Any]], dtype: torch.dtype, seq_len: int = 2048) -> DoctorReport:
    """models: (name, transformers config) pairs to check for fit (no weights are loaded)."""
    from labkit.config import device_name
    from labkit.kernels import cpu_quant
    from labkit.threads import load_average, physical_cores

    free, total = available_bytes(device)
    cc = None
    bf16 = True
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        cc = f"{major}.{minor}"
        bf16 = bool(torch.cuda.is_bf16_supported())
    ok, reason = cpu_quant.available()
    report = DoctorReport(
        torch=torch.__version__, device=str(device), device_name=device_name(device), compute_capability=cc,
        free_gib=free / 2**30, total_gib=total / 2**30, bf16=bf16, nvcc=_nvcc_version(), triton=_triton_version(),
        c_compiler=shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc"),
        cpu_block_kernel="builds" if ok else f"unavailable ({reason})", cpu_instruction_sets=_kernel_isa(cpu_quant.cpu_signature()),
        cpu_kernel_path=cpu_quant.kernel_path(), cpu_q8_kernel_path=cpu_quant.q8_kernel_path(), threads=torch.get_num_threads(), kernel_threads=cpu_quant.kernel_threads(),
        physical_cores=physical_cores(), load_average=load_average(), cuda_graphs=device.type == "cuda",
        cuda_graph_if_nodes=_if_nodes(device),
    )
    need_total = 0
    for name, config in models:
        need = estimate_model_bytes(config, dtype, seq_len)
        need_total += need
        report.fits.append({"model": name, "params": count_params(config), "dtype": str(dtype).removeprefix("torch."),
                            "estimate_gib": need / 2**30, "fits": need <= free})
    if len(models) > 1:
        report.fits.append({"model": "together", "estimate_gib": need_total / 2**30, "fits": need_total <= free})
    return report
