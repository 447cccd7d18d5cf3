"""EAGLE chains against EAGLE trees on one prompt per suite category, in one run (diagnostic).

    python3 scripts/tree_check.py EAGLE_FOLDER [K]

Fused bf16 engine with CUDA graphs; plain greedy, eagle (device steps: 8 per host read),
eagle-host (a host read every step) and eagle-tree at K; prints tok/s over all prompts, tokens
per target step (tau) and how many outputs equal plain greedy's.
"""

import sys

import torch

from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.generate import Speculation, encode_prompt, generate, warm_up
from labkit.models.loading import load_model
from labkit.prompts import load_suite
from labkit.specdec.drafters import build_drafter
from labkit.specdec.eagle import load_eagle
from labkit.specdec.eagle_drafter import EagleDrafter
from labkit.specdec.heads import fingerprint

folder, k = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3
loaded = load_model("default")
engine = Engine.from_loaded(loaded, "cuda", torch.bfloat16, weights="dense", cuda_graph=True, layer_kernels="triton")
drafters = {kind: build_drafter(kind, engine, heads_path=folder) for kind in ("eagle", "eagle-tree")}
drafters["eagle-host"] = EagleDrafter(engine, load_eagle(folder, fingerprint(engine.model.lm_head.weight)), device_steps=False)
for drafter in drafters.values():
    warm_up(engine, k, drafter=drafter)
cfg = GenerationConfig(max_new_tokens=128, stop_at_eos=False)
prompts = [(p.category, encode_prompt(loaded.tokenizer, p.content)) for p in load_suite(None, 1)]
for _, ids in prompts[:2]:  # captures at the requests' attention span
    for drafter in drafters.values():
        generate(engine, ids, cfg, Speculation(drafter, k))
totals = {name: [0, 0.0, 0, 0] for name in ("plain", *drafters)}  # tokens, seconds, target steps, identical
for category, ids in prompts:
    want = generate(engine, ids, cfg)
    runs = {"plain": want, **{name: generate(engine, ids, cfg, Speculation(d, k)) for name, d in drafters.items()}}
    for name, r in runs.items():
        t = totals[name]
        t[0] += len(r.tokens)
        t[1] += r.stats.total_s
        t[2] += len(r.stats.accepted_lengths)
        t[3] += r.tokens == want.tokens
    print(category, {name: round(len(r.tokens) / len(r.stats.accepted_lengths), 2) for name, r in runs.items()})
print(f"{torch.cuda.get_device_name()}, K={k}, {len(prompts)} prompts")
for name, (n, s, steps, same) in totals.items():
    print(f"{name:11s} {n / s:7.1f} tok/s  tau {n / steps:.2f}  identical {same}/{len(prompts)}")
