"""What an engine runs: the fused layer kernels or PyTorch's, and whether the embedded GGUF's own
blocks can serve as its weights (each with the reason when not; the model family's table,
models/families.py, says what each family allows)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from labkit.config import LAYER_KERNELS, WEIGHTS
from labkit.errors import LabkitError
from labkit.kernels import cpu_quant
from labkit.kernels.layer_cpu import CpuLayerOps
from labkit.models.families import family_of_model
from labkit.models.gguf_weights import QuantLinear, attach_gguf_blocks
from labkit.models.loading import LoadedModel

if TYPE_CHECKING:
    from labkit.engine import Engine


def gguf_unusable(engine: Engine, loaded: LoadedModel) -> str:
    """Why the GGUF block weights cannot serve this engine ("" when they can)."""
    if loaded.gguf_path is None:
        return "the model was not loaded from a GGUF file"
    if engine.device.type != "cpu" or engine.dtype != torch.float32 or engine.amp:
        return "the block kernel runs on the CPU in float32 only"
    if not family_of_model(engine.model).gguf_blocks:
        return "only Llama-family GGUF files are supported"
    if engine.layer_kernels != "torch":
        return "the fused Triton layers read dense weights"
    ok, reason = cpu_quant.available()
    return "" if ok else f"the CPU kernel is unavailable ({reason})"


@torch.inference_mode()
def time_block_weights(engine: Engine, reps: int = 5) -> tuple[float, float]:
    """Milliseconds of one decode step reading the GGUF blocks, and reading the dense weights
    (medians of `reps`, interleaved, after one warm-up each). The engine is left empty, reading
    the blocks."""
    token = torch.zeros(engine.batch_size, 1, dtype=torch.long)  # (B, 1)
    times: dict[bool, list[float]] = {True: [], False: []}
    for rep in range(reps + 1):
        for blocks in (True, False):
            engine.read_blocks(blocks)
            engine.reset()
            t0 = time.perf_counter()
            engine.forward(token)
            if rep:
                times[blocks].append(time.perf_counter() - t0)
    engine.read_blocks(True)
    engine.reset()
    return statistics.median(times[True]) * 1e3, statistics.median(times[False]) * 1e3


def block_linears(model: torch.nn.Module) -> list[QuantLinear]:
    """The model's linear layers that hold GGUF blocks."""
    return [module for module in model.modules() if isinstance(module, QuantLinear)]


def cpu_layers_unusable(model: Any, batch_size: int) -> str:
    """Why the CPU layer operations cannot run this model ("" when they can)."""
    if not family_of_model(model).fused_layers:
        return "only Llama-family models have fused layers"
    if batch_size != 1:
        return "the CPU layer operations decode batch 1"
    if cpu_quant.library() is None:
        return f"the CPU kernel is unavailable ({cpu_quant.available()[1]})"
    linears = [model.lm_head] + [lin for block in model.layers for lin in (block.wqkv, block.wo, block.w_gate_up, block.w_down)]
    if not all(isinstance(lin, QuantLinear) for lin in linears):
        return "the CPU layer operations read GGUF blocks, and some layers have none"
    return ""


def pick_layer_ops(model: Any, device: torch.device, dtype: torch.dtype, amp: bool,
                   compile: bool, choice: str) -> tuple[Any, str]:
    """The fused layer kernels for this engine: (module or None, why). "auto" takes Triton's on a
    CUDA device for a Llama-family model without AMP or torch.compile (which fuses on its own)."""
    if choice not in LAYER_KERNELS:
        raise LabkitError(f"unknown layer kernels {choice!r}: use {', '.join(LAYER_KERNELS)}")
    if choice == "torch":
        return None, "asked for torch layers"
    if choice == "cpu":  # the CPU's fused layers come with the GGUF blocks (Engine.read_blocks)
        return None, "the CPU's fused layers run on GGUF blocks"
    from labkit.kernels.registry import backend_status

    status = backend_status("triton", device)
    why_not = ""
    if not family_of_model(model).fused_layers:
        why_not = "only Llama-family models have fused layers"
    elif model.args.head_dim not in (32, 64, 128, 256):
        why_not = f"head_dim {model.args.head_dim} is not 32, 64, 128 or 256"
    elif amp:
        why_not = "AMP keeps fp32 weights and casts per op; the fused layers need one dtype"
    elif dtype not in (torch.float32, torch.float16, torch.bfloat16):
        why_not = f"{dtype} is not a float type the kernels take"
    elif compile:
        why_not = "torch.compile fuses the layers itself (use one or the other)"
    elif device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
        why_not = "bf16 tensor-core dots need compute capability 8.0 or newer"
    elif not status.ok or (choice == "auto" and not status.auto):
        why_not = f"triton: {status.reason}"
    if why_not:
        if choice == "triton":
            raise LabkitError(f"--layer-kernels triton is not possible here: {why_not}")
        return None, why_not
    from labkit.kernels import layer_triton

    return layer_triton, "Triton: 5 fused kernels per layer"


def cpu_layer_ops(model: Any, batch_size: int, on: bool, choice: str) -> tuple[CpuLayerOps | None, str]:
    """The CPU layer operations over the GGUF blocks where they can run and `choice` allows them,
    else None; and why."""
    why_not = cpu_layers_unusable(model, batch_size) if on else "dense weights"
    if on and not why_not and choice in ("auto", "cpu"):
        return CpuLayerOps(block_linears(model)), "CPU: 5 fused C operations per layer on the GGUF blocks"
    return None, why_not or "asked for torch layers"


def choose_weights(engine: Engine, loaded: LoadedModel, weights: str) -> None:
    """Give the engine the GGUF's blocks as weights where asked (or, for "auto", where they apply
    and a timed decode step says they are faster), with a note on how "auto" chose."""
    if weights not in WEIGHTS:
        raise LabkitError(f"unknown weights {weights!r}: use {', '.join(WEIGHTS)}")
    why_not = gguf_unusable(engine, loaded)
    if weights in ("gguf", "gguf-q8") and why_not:
        raise LabkitError(f"--weights {weights} is not possible here: {why_not}")
    if weights in ("gguf", "gguf-q8") or (weights == "auto" and not why_not):
        assert loaded.gguf_path is not None
        attach_gguf_blocks(engine.model, loaded.gguf_path)
        engine.read_blocks(True, "q8" if weights == "gguf-q8" else "fp32")
        if weights == "auto":  # the same values either way: keep the faster, measured here
            blocks_ms, dense_ms = time_block_weights(engine)
            if dense_ms < blocks_ms:
                engine.read_blocks(False)
            engine.weights_note = f"auto, one decode step: GGUF blocks {blocks_ms:.1f} ms, dense {dense_ms:.1f} ms"
    elif weights == "auto" and loaded.gguf_path is not None and engine.device.type == "cpu":
        engine.weights_note = f"GGUF blocks not used: {why_not}"  # the values are the same; the speed is not
    if engine.layer_choice == "cpu" and engine.layer_kernels != "cpu":
        raise LabkitError("--layer-kernels cpu runs the layers on GGUF blocks: the embedded model on the CPU in float32, --weights gguf")


def compile_step(step: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """torch.compile a fixed-shape step. Decode (T=1) compiles for its static shape; the second
    width (a verify) makes dynamo compile once more with T dynamic, which then serves every
    verify width 2..K+1."""
    import torch._dynamo as dynamo

    dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)
    return torch.compile(step, fullgraph=True)
