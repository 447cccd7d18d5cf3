"""Does the same engine give the same greedy tokens when a request is repeated? (GPU diagnostic)

    python3 scripts/repeatability.py [modes] [repeats]     modes: comma list of eager, graph, compile,
                                                            compile-cudnn (cuDNN attention allowed again),
                                                            fused (graphs over the Triton layers)

For each mode, every suite prompt's first-category prompt is decoded `repeats` times (128 tokens,
EOS blocked); prints, per mode, how many prompts gave more than one distinct output and the first
position where outputs split. bf16 on CUDA, where near-tied logits make bit-level run-to-run
differences visible as different tokens.
"""

import sys

import torch

from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.generate import encode_prompt, generate, warm_up
from labkit.models import kvcache
from labkit.models.loading import load_model
from labkit.prompts import load_suite

modes = (sys.argv[1] if len(sys.argv) > 1 else "eager,graph,compile").split(",")
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 4
loaded = load_model("default")
prompts = [(p.id, encode_prompt(loaded.tokenizer, p.content)) for p in load_suite(None, 1)]
gen = GenerationConfig(max_new_tokens=128, min_new_tokens=128)
default_backends = list(kvcache.DETERMINISTIC_SDPA)
for mode in modes:
    kvcache.DETERMINISTIC_SDPA[:] = default_backends + ([torch.nn.attention.SDPBackend.CUDNN_ATTENTION] if mode.endswith("-cudnn") else [])
    torch._dynamo.reset()
    engine = Engine.from_loaded(loaded, "cuda", torch.bfloat16, weights="dense", cuda_graph=mode != "eager",
                                compile=mode.startswith("compile"), layer_kernels="triton" if mode == "fused" else "torch")
    if mode != "eager":
        warm_up(engine, 8)
    split, seconds = [], 0.0
    for pid, ids in prompts:
        results = [generate(engine, ids, gen) for _ in range(repeats)]
        seconds += sum(r.stats.total_s for r in results)
        outs = [tuple(r.tokens) for r in results]
        if len(set(outs)) > 1:
            first = min(next(i for i, (a, b) in enumerate(zip(outs[0], o, strict=True)) if a != b) for o in outs if o != outs[0])
            split.append(f"{pid}@{first}")
    tok_s = len(prompts) * repeats * gen.max_new_tokens / seconds
    print(f"{mode:<14} {tok_s:7.1f} tok/s  {len(split)}/{len(prompts)} prompts not repeatable: {' '.join(split)}", flush=True)
