"""A prompt's prefill on the CPU: our engine against transformers' own forward, on the same model
and threads (diagnostic; best of 3 in milliseconds).

    python3 scripts/cpu_prefill.py [tokens ...]     (default: 512 1024 2048)

Our engine runs a prompt of more than 16 tokens through the PyTorch layers on the dense weights
(one GEMM per layer), writing its static cache; transformers runs the same weights with
use_cache=True, as `generate`'s first step does. The prompt is random token ids (no chat template).
"""

import sys
import time

import torch

from labkit.engine import Engine
from labkit.models.loading import load_model

loaded = load_model("default")
engine = Engine.from_loaded(loaded, "cpu", torch.float32, weights="auto")
print(f"threads {torch.get_num_threads()}, weights {engine.weights}, layer kernels {engine.layer_kernels}")
for T in [int(t) for t in sys.argv[1:]] or [512, 1024, 2048]:
    ids = torch.randint(10, 40000, (1, T), generator=torch.Generator().manual_seed(0))
    engine.ensure_capacity(T + 8)
    best = {"labkit": float("inf"), "transformers": float("inf")}
    with torch.inference_mode():
        for _ in range(3):  # interleaved
            engine.reset()
            start = time.perf_counter()
            engine.prefill(ids)
            best["labkit"] = min(best["labkit"], time.perf_counter() - start)
            start = time.perf_counter()
            loaded.hf_model(ids, use_cache=True)
            best["transformers"] = min(best["transformers"], time.perf_counter() - start)
    print(f"{T:>6} tokens: labkit {best['labkit'] * 1e3:7.0f} ms, transformers {best['transformers'] * 1e3:7.0f} ms, "
          f"ratio {best['labkit'] / best['transformers']:.2f}")
