"""The GGUF block kernel's instruction-set paths on this CPU, and a decode step on each (diagnostic).

    python3 scripts/cpu_paths.py [reps]

Builds kernels/cpu_quant_gemv.c as this CPU's native build, without AVX-512 (the AVX2+FMA path)
and without AVX2 (the portable path), then, interleaved: microseconds per product for the
embedded model's shapes (Q4_1 at M = 1 and 5 rows; one weight, so from cache: a compute
comparison), and milliseconds per decode step of the embedded model on its blocks with each
build (the CPU layer operations; on the native build also with five calls per layer from Python
instead of one per step), against its dense weights (PyTorch layers). Beside them,
PyTorch's own int4 CPU product (`aten._weight_int4pack_mm_for_cpu`, group 32, Q4_1's w = d q + m
as scale d and zero m + 8 d) with fp32 and with bf16 activations, and its largest error against
the exactly dequantised weights.
"""

import os
import sys

import torch

from labkit.engine import Engine
from labkit.kernels import cpu_quant
from labkit.metrics import timers
from labkit.models.loading import load_model

REPS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
BUILDS = {"native": "", "avx2": "-mno-avx512f", "portable": "-mno-avx512f -mno-avx2 -mno-fma"}
SHAPES = {"qkv 576->960": (960, 576), "gate/up 576->3072": (3072, 576), "down 1536->576": (576, 1536)}


def use_build(flags: str) -> str:
    os.environ["LABKIT_CPU_KERNEL_FLAGS"] = flags
    cpu_quant._load.cache_clear()
    return cpu_quant.kernel_path()


def median_us(fn, reps: int = REPS) -> float:
    return timers.median_us(fn, reps, warm=1)


torch.manual_seed(0)
print(f"threads {torch.get_num_threads()}, CPU {cpu_quant.cpu_signature().split(':')[0]}")
print(f"{'product':<22}{'rows':>5}" + "".join(f"{name + ' (' + use_build(flags) + ')':>22}" for name, flags in BUILDS.items())
      + f"{'dense torch':>14}{'int4pack fp32':>16}{'int4pack bf16':>16}  int4pack error fp32 / bf16")


def int4pack(qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch's int4 layout of Q4_1 blocks: (packed weight, (K/32, N, 2) scales and zeros, dense values)."""
    q = torch.stack([qs & 15, qs >> 4], dim=-1).view(qs.shape[0], -1).to(torch.int32)  # (N, K): GGUF's low nibbles first per 16
    q = torch.cat([q.view(q.shape[0], -1, 16, 2)[..., 0], q.view(q.shape[0], -1, 16, 2)[..., 1]], dim=-1).view(q.shape[0], -1)
    dense = d.repeat_interleave(32, 1) * q + m.repeat_interleave(32, 1)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8), torch.stack([d, m + 8 * d], -1).transpose(0, 1).contiguous(), dense


def int4_mm(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(dtype), packed, 32, sz.to(dtype)).float()
for label, (N, K) in SHAPES.items():
    qs = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    d, m = torch.rand(N, K // 32), torch.rand(N, K // 32)
    w = torch.randn(N, K)
    for rows in (1, 5):
        x = torch.randn(rows, K)
        row = f"{label:<22}{rows:>5}"
        for flags in BUILDS.values():
            use_build(flags)
            row += f"{median_us(lambda x=x, qs=qs, d=d, m=m: cpu_quant.quant_linear(x, 'q4_1', qs, d, m)):>19.1f} us"
        row += f"{median_us(lambda x=x, w=w: torch.nn.functional.linear(x, w)):>11.1f} us"
        packed, sz, dense = int4pack(qs, d, m)
        errors = []
        for dtype in (torch.float32, torch.bfloat16):
            row += f"{median_us(lambda x=x, dtype=dtype, packed=packed, sz=sz: int4_mm(x, packed, sz, dtype)):>13.1f} us"
            errors.append(f"{(int4_mm(x, packed, sz, dtype) - x @ dense.T).abs().max().item():.1e}")
        print(row + "  " + " / ".join(errors), flush=True)

loaded = load_model("default")
use_build("")
engine = Engine.from_loaded(loaded, "cpu", torch.float32, weights="gguf")
token = torch.zeros(1, 1, dtype=torch.long)


def step() -> None:
    engine.reset()
    engine.forward(token)


with torch.inference_mode():
    row = "decode step (embedded)  "
    for name, flags in BUILDS.items():
        use_build(flags)
        engine.read_blocks(True)  # the CPU layer operations, bound to this build
        row += f"{name}: {median_us(step) / 1e3:.2f} ms  "
        if name == "native":  # the same build with five calls per layer from Python instead of decode_layers' one per step
            engine.model.layer_ops.STACKS = False
            row += f"(five calls per layer: {median_us(step) / 1e3:.2f} ms)  "
    engine.read_blocks(False)
    row += f"dense (PyTorch layers): {median_us(step) / 1e3:.2f} ms"
    print(row)
