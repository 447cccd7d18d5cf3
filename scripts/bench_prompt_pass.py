"""bench batch with every prompt prefilled as before session 40 and as now, in one run (diagnostic).

    python3 scripts/bench_prompt_pass.py [sizes] [eagle_folder] [spread]

Before: a prompt past 48 tokens took a captured pass through the PyTorch layers (cuBLAS GEMMs,
flash attention; `layer_triton.PROMPT_MAX_T` = 0); now one of up to PROMPT_MAX_T tokens takes a
captured pass through the fused layer kernels. Each way builds its own engine and runs `bench
batch` (the embedded model, bf16, CUDA graphs, K 5, 128 new tokens with the given length spread,
three repeats; plain and, with a head, the EAGLE systems), before first; then per system and size
the aggregate tok/s and the median time to first token both ways.
"""

import sys

from labkit.bench.batch import BatchBenchConfig, run_batch_bench
from labkit.config import EngineConfig
from labkit.kernels import layer_triton
from labkit.models.loading import load_model

sizes = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "1,16,64").split(",")]
heads = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else None
spread = float(sys.argv[3]) if len(sys.argv) > 3 else 0.5
loaded = load_model("default")
now = layer_triton.PROMPT_MAX_T
rows = {}
for label, max_t in (("before", 0), ("now", now)):
    layer_triton.PROMPT_MAX_T = max_t
    cfg = BatchBenchConfig(engine=EngineConfig(device="cuda", cuda_graph=True), sizes=sizes, invariant=False, drafter="none",
                           heads=heads, k=5, max_new_tokens=128, length_spread=spread, repeats=3, output_dir=None, progress=False)
    rows[label] = {(r["system"], r["batch"]): r for r in run_batch_bench(cfg, loaded)["rows"]}
    print(f"{label}: done", flush=True)
layer_triton.PROMPT_MAX_T = now
print(f"prompt passes through the PyTorch layers (before) and the fused kernels up to {now} tokens (now); spread {spread}")
print(f"{'system':22s} {'batch':>5s} {'tok/s before':>13s} {'now':>9s} {'ratio':>6s}   {'TTFT ms before':>15s} {'now':>7s}  identical")
for key, b in rows["before"].items():
    n = rows["now"][key]
    print(f"{key[0]:22s} {key[1]:5d} {b['aggregate_tok_per_s']:13,.0f} {n['aggregate_tok_per_s']:9,.0f} "
          f"{n['aggregate_tok_per_s'] / b['aggregate_tok_per_s']:5.2f}x   {b['ttft_ms_p50']:15.1f} {n['ttft_ms_p50']:7.1f}  "
          f"{b['identical_to_batch_1']:.0%} / {n['identical_to_batch_1']:.0%}")
