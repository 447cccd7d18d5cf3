"""--weights gguf against gguf-q8 (8-bit activations, kernels/cpu_q8_gemv.c) on this CPU (diagnostic).

    python3 scripts/cpu_q8.py [reps]

For this CPU's native build and the AVX2 build (-mno-avx512f, the path CPUs without AVX-512 take),
interleaved: milliseconds of a decode step (1 token) and of a K = 3 verify (4 tokens) at position 256,
each weights mode, and the verify over the step (what speculation pays a step). Then how far gguf-q8's
next-token choices are from gguf's: teacher-forced over the README's first 400 tokens in steps of 8
tokens, the share of positions whose argmax agrees, and the mean KL(gguf || gguf-q8).
"""

import os
import sys
from pathlib import Path

import torch

from labkit.engine import Engine
from labkit.kernels import cpu_quant
from labkit.metrics import timers
from labkit.models.loading import load_model

REPS = int(sys.argv[1]) if len(sys.argv) > 1 else 30
BUILDS = {"native": "", "avx2": "-mno-avx512f"}


def use_build(flags: str) -> str:
    os.environ["LABKIT_CPU_KERNEL_FLAGS"] = flags
    cpu_quant._load.cache_clear()
    return f"{cpu_quant.kernel_path()} / {cpu_quant.q8_kernel_path()}"


loaded = load_model("default")
engines = {w: Engine.from_loaded(loaded, "cpu", torch.float32, weights=w) for w in ("gguf", "gguf-q8")}
prompt = torch.randint(100, 1000, (1, 256))


def timed(engine: Engine, tokens: int) -> float:
    def step() -> None:
        engine.rollback(256)
        engine.forward(torch.zeros(1, tokens, dtype=torch.long))
    return timers.median_us(step, REPS, warm=2) / 1e3


print(f"threads {torch.get_num_threads()}, CPU {cpu_quant.cpu_signature().split(':')[0]}")
with torch.inference_mode():
    for name, flags in BUILDS.items():
        path = use_build(flags)
        ms: dict[str, tuple[float, float]] = {}
        for w, engine in engines.items():
            engine.read_blocks(True, "q8" if w == "gguf-q8" else "fp32")  # the CPU layer operations, bound to this build
            engine.reset()
            engine.forward(prompt)
        for w, engine in engines.items():
            ms[w] = (timed(engine, 1), timed(engine, 4))
        print(f"{name} ({path}): " + "; ".join(f"{w} step {a:.2f} ms, verify of 4 {b:.2f} ms ({b / a:.2f} steps)" for w, (a, b) in ms.items())
              + f"; gguf-q8's step {ms['gguf'][0] / ms['gguf-q8'][0]:.2f}x as fast", flush=True)
    use_build("")
    ids = loaded.tokenizer((Path(__file__).resolve().parents[1] / "README.md").read_text()[:3000])["input_ids"][:400]
    logits = {}
    for w, engine in engines.items():
        engine.read_blocks(True, "q8" if w == "gguf-q8" else "fp32")
        engine.reset()
        logits[w] = torch.cat([engine.forward(torch.tensor([ids[i : i + 8]]))[0] for i in range(0, len(ids), 8)])
    a, b = logits["gguf"].log_softmax(-1), logits["gguf-q8"].log_softmax(-1)
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(f"teacher-forced over {len(ids)} README tokens: argmax agrees at {agree:.1%} of positions, mean KL(gguf || gguf-q8) {(a.exp() * (a - b)).sum(-1).mean().item():.4f}")
