"""EAGLE on a long prompt on the CPU (diagnostic): plain greedy, then eagle-ngram, eagle-mix and eagle with
fixed K=3 and the cost-aware controller, each against a plain run right after it (decode tok/s,
after the first token), token identity with plain, tau, steps and drafting steps.

    python scripts/eagle_long_cpu.py PROMPT_TOKENS [EAGLE_FOLDER]   (default folder: /tmp/eagle10k)
"""

import sys

import torch

import labkit
from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.generate import Speculation, generate
from labkit.models.loading import load_model
from labkit.prompts.long import long_prompt
from labkit.specdec.controllers import make_controller
from labkit.specdec.eagle import load_eagle
from labkit.specdec.eagle_drafter import EagleDrafter
from labkit.specdec.eagle_mix import EagleMixDrafter
from labkit.specdec.heads import fingerprint

print(labkit.__file__)
loaded = load_model("default")
engine = Engine.from_loaded(loaded, "cpu", torch.float32)
head = load_eagle(sys.argv[2] if len(sys.argv) > 2 else "/tmp/eagle10k", fingerprint(engine.model.lm_head.weight))
cfg = GenerationConfig(max_new_tokens=64, stop_at_eos=False)
n = int(sys.argv[1])
prompt = long_prompt(loaded.tokenizer, n)
engine.ensure_capacity(len(prompt) + 80)
dp = lambda x: (x.stats.new_tokens - 1) / (x.stats.total_s - x.stats.ttft_s)
plain = generate(engine, prompt, cfg)
for d in (EagleDrafter(engine, head, lookup_over=3), EagleMixDrafter(engine, head), EagleDrafter(engine, head)):
    for ctl in ("fixed", "cost"):
        r = generate(engine, prompt, cfg, Speculation(d, 3, controller=make_controller(ctl, 3, "cpu")))
        p2 = generate(engine, prompt, cfg)
        print(n, d.name, ctl, "identical", r.tokens == plain.tokens, f"decode {dp(r):.1f} vs plain {dp(p2):.1f} tok/s", "tau", round(r.stats.new_tokens / max(1, len(r.stats.accepted_lengths)), 2), "steps", len(r.stats.accepted_lengths), "drafting", len(r.stats.k_trace))
