"""The GGUF block kernel's instruction-set paths on this CPU, and a decode step on each (diagnostic).

    python3 scripts/cpu_paths.py [reps]

Builds kernels/cpu_quant_gemv.c as this CPU's native build, without AVX-512 (the AVX2+FMA path)
and without AVX2 (the portable path), then, interleaved: microseconds per product for the
embedded model's shapes (Q4_1 at M = 1 and 5 rows; one weight, so from cache: a compute
comparison), and milliseconds per decode step of the embedded model on its blocks with each
build (the CPU layer operations), against its dense weights (PyTorch layers).
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
print(f"{'product':<22}{'rows':>5}" + "".join(f"{name + ' (' + use_build(flags) + ')':>22}" for name, flags in BUILDS.items()) + f"{'dense torch':>14}")
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
        print(row, flush=True)

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
    engine.read_blocks(False)
    row += f"dense (PyTorch layers): {median_us(step) / 1e3:.2f} ms"
    print(row)
