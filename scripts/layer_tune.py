"""Times the fused Triton layers' tile sizes on a GPU, in one run (plain greedy, CUDA graphs).

    python3 scripts/layer_tune.py [prompts] [repeats] [combos|pdl|pdl2]

Each configuration overrides labkit.kernels.layer_triton.TUNE, recaptures the graphs, and
decodes 128 tokens (EOS blocked) for the first prompt of a few categories; configurations are
interleaved over the repeats so that drift in the machine hits them all alike.
"""

import statistics
import sys

import torch

from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.generate import encode_prompt, generate, warm_up
from labkit.kernels import layer_triton
from labkit.models.loading import load_model
from labkit.prompts import load_suite

n_prompts = int(sys.argv[1]) if len(sys.argv) > 1 else 4
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
base = dict(layer_triton.TUNE)
configs = {
    "default": {},
    "first (wide tiles)": dict(qkv_sub=32, gate_block_n=32, linear_block_k=128, norm_block_k=64),
    "attn_block_s=128": dict(attn_block_s=128),
    "attn_block_s=32": dict(attn_block_s=32),
    "linear_block_k=512": dict(linear_block_k=512),
    "linear_block_k=128": dict(linear_block_k=128),
    "norm_block_k=64": dict(norm_block_k=64),
    "norm_block_k=256": dict(norm_block_k=256),
    "num_warps=2": dict(num_warps=2),
    "num_warps=8": dict(num_warps=8),
}
if len(sys.argv) > 3 and sys.argv[3] == "pdl":  # third round: weights loaded before the wait, PDL on/off
    configs = {
        "default": {}, "pdl off": dict(pdl=False), "num_warps=8": dict(num_warps=8), "num_warps=2": dict(num_warps=2),
        "prefetch_k=512": dict(prefetch_k=512), "qkv_sub32": dict(qkv_sub=32), "gate32": dict(gate_block_n=32),
        "linear_n32": dict(linear_block_n=32), "pdl off, prefetch_k=512": dict(pdl=False, prefetch_k=512),
    }
if len(sys.argv) > 3 and sys.argv[3] == "pdl2":  # fourth round: with PDL, fewer and larger programs won
    big = dict(linear_block_n=32, gate_block_n=32)
    configs = {
        "default": {}, "linear_n32": dict(linear_block_n=32), "+gate32": big, "+gate32 +qkv32": dict(big, qkv_sub=32),
        "+gate32 +warps2": dict(big, num_warps=2), "+gate32 +warps8": dict(big, num_warps=8),
        "+gate32 +qkv32 +warps2": dict(big, qkv_sub=32, num_warps=2), "linear_n64 gate64": dict(linear_block_n=64, gate_block_n=64),
        "+gate32 +attn64": dict(big, attn_block_s=64),
    }
if len(sys.argv) > 3 and sys.argv[3] == "combos":  # second round: the single changes that helped, together
    nk = dict(norm_block_k=256)
    configs = {
        "default": {}, "norm_block_k=256": nk, "+attn128": dict(nk, attn_block_s=128),
        "+attn128 +warps8": dict(nk, attn_block_s=128, num_warps=8),
        "+attn128 +lin512": dict(nk, attn_block_s=128, linear_block_k=512),
        "+attn128 +lin512 +warps8": dict(nk, attn_block_s=128, linear_block_k=512, num_warps=8),
        "+qkv_sub32": dict(nk, qkv_sub=32), "+gate32": dict(nk, gate_block_n=32),
        "+linear_n32": dict(nk, linear_block_n=32),
    }
loaded = load_model("default")
prompts = [encode_prompt(loaded.tokenizer, p.content) for p in load_suite(None, 1)][:n_prompts]
gen = GenerationConfig(max_new_tokens=128, min_new_tokens=128)
engines = {}
for name, override in configs.items():  # one engine each: its captured graphs hold its tiles
    layer_triton.TUNE.clear()
    layer_triton.TUNE.update(base, **override)
    engines[name] = Engine.from_loaded(loaded, "cuda", torch.bfloat16, weights="dense", cuda_graph=True, layer_kernels="triton")
    warm_up(engines[name], 1)
speeds: dict[str, list[float]] = {name: [] for name in configs}
reference = None
for r in range(repeats):
    for name, override in configs.items():
        layer_triton.TUNE.clear()
        layer_triton.TUNE.update(base, **override)
        results = [generate(engines[name], ids, gen) for ids in prompts]
        speeds[name].append(sum(len(x.tokens) for x in results) / sum(x.stats.total_s for x in results))
        same = reference is None or [x.tokens for x in results] == reference
        reference = reference or [x.tokens for x in results]
        if r == 0 and not same:
            print(f"{name}: tokens differ from the default's (bf16 reduction order)")
for name, runs in sorted(speeds.items(), key=lambda kv: -statistics.median(kv[1])):
    print(f"{name:<22} {statistics.median(runs):8.1f} tok/s  (runs {', '.join(f'{x:.0f}' for x in runs)})")
