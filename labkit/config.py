"""Dataclass configs and the SPECDEC_* environment flags, in one place.

Every knob the CLI or a notebook exposes lives here with its default; the CLI and the
notebooks' parameter cells are thin layers over these dataclasses.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from labkit.errors import LabkitError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def env_flag(name: str, default: bool = False) -> bool:
    """SPECDEC_X=1/0/true/false/yes/no; anything else is an error, not a silent default."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise LabkitError(f"{name}={raw!r} is not a switch: use 1 or 0")


DRAFTERS = ("ngram", "ngram-graph", "layerskip", "truncated", "model", "heads", "eagle", "eagle-tree", "eagle-ngram",
            "eagle-mix", "eagle-agree", "eagle-lazy", "ngram-tree")  # kinds make_drafter builds
EAGLE_KINDS = ("eagle", "eagle-tree", "eagle-ngram", "eagle-mix", "eagle-agree", "eagle-lazy")  # drafters that run a trained EagleHead (--heads)
CONTROLLERS = ("fixed", "heuristic", "aimd", "cost", "auto")  # K controllers make_controller builds (auto: by the device)


@dataclass
class Flags:
    """The SPECDEC_* environment switches, read once (`Flags.from_env()`)."""

    dtype: str = "auto"  # SPECDEC_DTYPE: auto, float32, float16, bfloat16
    amp: bool = False  # SPECDEC_AMP: fp32 weights, matmuls under autocast in `dtype`
    cuda_graph: bool = False  # SPECDEC_CUDA_GRAPH: capture the fixed-shape steps
    detailed_metrics: bool = False  # SPECDEC_DETAILED_METRICS: per-phase timings

    @classmethod
    def from_env(cls) -> Flags:
        return cls(
            dtype=os.environ.get("SPECDEC_DTYPE", "auto") or "auto",
            amp=env_flag("SPECDEC_AMP"),
            cuda_graph=env_flag("SPECDEC_CUDA_GRAPH"),
            detailed_metrics=env_flag("SPECDEC_DETAILED_METRICS"),
        )


WEIGHTS = ("auto", "dense", "gguf", "gguf-q8")  # gguf: the GGUF's own quantised blocks (CPU fp32); auto: the faster, timed at load;
# gguf-q8: the blocks with activations rounded to 8 bits per block of 32 (llama.cpp's way: faster, not the dequantised model's values)
LAYER_KERNELS = ("auto", "triton", "cpu", "torch")  # triton: fused layers on CUDA; cpu: C layers on GGUF blocks


DEFAULT_MAX_SEQ_LEN = 8192  # cache positions allocated at load when --max-seq-len is not given (at most the model's context)


def resolve_max_seq_len(asked: int | None, context_len: int) -> int:
    """Cache positions for an engine: what was asked (at most the model's context), or the whole
    context up to DEFAULT_MAX_SEQ_LEN."""
    if asked is None:
        return min(context_len, DEFAULT_MAX_SEQ_LEN)
    if isinstance(asked, bool) or not isinstance(asked, int) or asked < 2:
        raise LabkitError(f"--max-seq-len must be an integer of at least 2, got {asked!r}")
    if asked > context_len:
        raise LabkitError(f"--max-seq-len {asked} exceeds the model's context of {context_len} tokens")
    return asked


@dataclass
class EngineConfig:
    """How an engine runs its model. The CLI's engine options and the benchmarks' configs embed
    this one dataclass; None reads the SPECDEC_* flag of the same name (`Flags`)."""

    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps
    dtype: str | None = None  # auto, float32, float16, bfloat16 (None: SPECDEC_DTYPE, default auto: bf16 on CUDA, fp32 on CPU)
    amp: bool | None = None  # fp32 weights, matmuls under autocast in dtype
    compile: bool = False  # torch.compile the fixed-shape steps
    cuda_graph: bool | None = None  # capture the fixed-shape steps as CUDA graphs (CUDA only)
    layer_kernels: str = "auto"  # one of LAYER_KERNELS (auto: triton on CUDA without compile, cpu on GGUF blocks)
    weights: str = "auto"  # one of WEIGHTS
    max_seq_len: int | None = None  # cache positions (None: the model's context, at most 8192)

    def validate(self) -> None:
        if self.weights not in WEIGHTS:
            raise LabkitError(f"unknown weights {self.weights!r}: use {', '.join(WEIGHTS)}")
        if self.layer_kernels not in LAYER_KERNELS:
            raise LabkitError(f"unknown layer kernels {self.layer_kernels!r}: use {', '.join(LAYER_KERNELS)}")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; a named device must exist here."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise LabkitError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LabkitError("device 'cuda' is not available on this machine (no CUDA GPU or a CPU-only torch); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LabkitError(f"device {name!r} is not there: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise LabkitError("device 'mps' is not available on this machine; use --device cpu or auto")
    elif device.type != "cpu":
        raise LabkitError(f"device type {device.type!r} is not supported: use cpu, cuda or mps")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """'auto' gives bf16 on a CUDA card that has it (else fp16), fp16 on MPS, fp32 on CPU."""
    name = (name or "auto").strip().lower()
    name = DTYPE_ALIASES.get(name, name)
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if name not in DTYPES:
        raise LabkitError(f"unknown dtype {name!r}: use auto, {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise LabkitError("bfloat16 is not supported on this CUDA device (compute capability < 8.0); use float16 or float32")
    if dtype == torch.bfloat16 and device.type == "mps":
        try:
            torch.zeros(1, dtype=dtype, device=device)
        except (RuntimeError, TypeError):
            raise LabkitError("bfloat16 is not supported on this MPS device; use float16 or float32") from None
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


MIN_TEMPERATURE = 1e-3  # below this, logits / temperature overflow; use 0 for greedy


@dataclass
class GenerationConfig:
    """How one request decodes. temperature 0 means greedy."""

    max_new_tokens: int = 128  # never exceeded
    min_new_tokens: int = 0  # EOS is suppressed until this many (as transformers does); benchmarks fix the length
    temperature: float = 0.0  # 0 → greedy argmax
    top_k: int = 0  # 0 → off
    top_p: float = 1.0  # 1.0 → off
    seed: int | None = None  # sampling seed; same seed, same tokens
    stop_at_eos: bool = True
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)  # filled from the model when empty

    def validate(self) -> None:
        for name in ("max_new_tokens", "min_new_tokens", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise LabkitError(f"{name.replace('_', ' ')} must be a whole number, got {value!r}")
        if self.max_new_tokens < 1:
            raise LabkitError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise LabkitError(f"min new tokens must be in [0, max new tokens], got {self.min_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0 or 0 < self.temperature < MIN_TEMPERATURE:
            raise LabkitError(f"temperature must be 0 (greedy) or a finite number from {MIN_TEMPERATURE:g}, got {self.temperature}")
        if self.top_k < 0:
            raise LabkitError(f"top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise LabkitError(f"top-p must be in (0, 1], got {self.top_p}")


def cache_dir() -> Path:
    """Where labkit keeps what it builds (LABKIT_CACHE, default ~/.cache/labkit): made if missing,
    and one clear error when it cannot be (a path under a file, a folder not writable)."""
    path = Path(os.environ.get("LABKIT_CACHE") or Path.home() / ".cache" / "labkit")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LabkitError(f"labkit's cache folder {path} cannot be created ({err.strerror or err}); set LABKIT_CACHE to a writable folder") from None
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise LabkitError(f"labkit's cache folder {path} is not a writable folder; set LABKIT_CACHE to one")
    return path


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
