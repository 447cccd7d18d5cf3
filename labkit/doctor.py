"""GPU pre-check (phase 3B): what this machine offers, and whether a model pair fits before loading it.

`python -m labkit doctor` prints a report; `estimate_model_bytes` and `check_fits` are what the
engine uses to refuse, with a clear message, a model that would not fit on the device.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from labkit.errors import LabkitError

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
    if config.model_type == "gpt2":
        d, L, V, P = config.n_embd, config.n_layer, config.vocab_size, config.n_positions
        inner = config.n_inner or 4 * d
        return V * d + P * d + L * (4 * d * d + 2 * d * inner + 9 * d + inner) + 2 * d
    d, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or d // heads
    inter = config.intermediate_size
    attn = d * heads * hd * 2 + d * kv * hd * 2
    if getattr(config, "attention_bias", False) or config.model_type == "qwen2":
        attn += heads * hd + 2 * kv * hd  # q, k, v biases
    if getattr(config, "attention_bias", False):
        attn += d  # o_proj bias (Llama's attention_bias)
    mlp = 3 * d * inter + ((2 * inter + d) if getattr(config, "mlp_bias", False) else 0)
    head = 0 if getattr(config, "tie_word_embeddings", True) else V * d
    return V * d + head + L * (attn + mlp + 2 * d) + d


def kv_cache_bytes(config: Any, seq_len: int, dtype: torch.dtype, batch: int = 1) -> int:
    if config.model_type == "gpt2":
        layers, kv, hd = config.n_layer, config.n_head, config.n_embd // config.n_head
    else:
        layers = config.num_hidden_layers
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
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
    threads: int  # PyTorch's, which the block kernel shares (labkit/threads.py)
    kernel_threads: int
    physical_cores: int
    load_average: float | None
    cuda_graphs: bool
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
    return " ".join(f for f in ("avx512f", "avx2", "fma", "asimd", "neon") if f in flags) or "none of avx512f, avx2, fma, neon"


def run_doctor(device: torch.device, models: list[tuple[str, Any]], dtype: torch.dtype, seq_len: int = 2048) -> DoctorReport:
    """models: (name, transformers config) pairs to check for fit (no weights are loaded)."""
    from labkit.bench.results import device_name
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
        cpu_kernel_path=cpu_quant.kernel_path(), threads=torch.get_num_threads(), kernel_threads=cpu_quant.kernel_threads(),
        physical_cores=physical_cores(), load_average=load_average(), cuda_graphs=device.type == "cuda",
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
