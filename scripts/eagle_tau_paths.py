"""Does every way of running EAGLE draft alike? (diagnostic; prints tau per path and where drafts part)

    python3 scripts/eagle_tau_paths.py EAGLE_FOLDER [prompts, default 8] [K, default 5]

The same prompts (the suite's categories in turn, as `bench batch` sends them), 128 new tokens,
greedy, EOS blocked, drafted by: a lone request's EAGLE host loop (device_steps=False), its device
steps (where the engine has CUDA graphs), and batched rows at batch 1 (batch/eagle.py); each also
with lookup's copies (eagle-ngram / eagle-mix's rule, n-gram of 2). Every output is plain greedy's
(checked); the drafts, and so tau, should be the same on the host loop and the batched rows (the
tests hold them to it on tiny models). For each prompt the first step where the batched drafts
leave the host loop's is printed.
"""

import sys

from batch_setup import engine_and_suite
from labkit.batch.eagle import device_eagles
from labkit.batch.engine import BatchConfig, BatchEngine
from labkit.bench.batch import System, _run, categories_in_turn
from labkit.config import GenerationConfig
from labkit.generate import Speculation, encode_prompt, generate
from labkit.models.loading import load_model
from labkit.prompts import load_suite
from labkit.specdec.eagle import load_eagle
from labkit.specdec.eagle_drafter import EagleDrafter
from labkit.specdec.heads import fingerprint

folder = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 8
K = int(sys.argv[3]) if len(sys.argv) > 3 else 5
engine, _, gpu = engine_and_suite(128)
tokenizer = load_model("default").tokenizer
prompts = [encode_prompt(tokenizer, p.content) for p in categories_in_turn(load_suite())][:n]
head = load_eagle(folder, fingerprint(engine.model.lm_head.weight))
gen = GenerationConfig(max_new_tokens=128, min_new_tokens=128)
plain = [generate(engine, p, gen).tokens for p in prompts]


def tau(tokens: list[list[int]], steps: int) -> float:
    return sum(len(t) - 1 for t in tokens) / max(1, steps)


for over in (0, 2):
    host = [generate(engine, p, gen, Speculation(EagleDrafter(engine, head, device_steps=False, lookup_over=over), K)) for p in prompts]
    print(f"lookup_over {over}: host loop tau {tau([o.tokens for o in host], sum(len(o.stats.accepted_lengths) for o in host)):.3f}"
          f"{'' if [o.tokens for o in host] == plain else ' NOT plain greedy'}", flush=True)
    if gpu:
        dev = [generate(engine, p, gen, Speculation(EagleDrafter(engine, head, lookup_over=over), K)) for p in prompts]
        print(f"lookup_over {over}: device steps tau {tau([o.tokens for o in dev], sum(len(o.stats.accepted_lengths) for o in dev)):.3f}"
              f"{'' if [o.tokens for o in dev] == plain else ' NOT plain greedy'}", flush=True)
    batch = BatchEngine(engine, BatchConfig(1, 1024, False, gpu))
    steps = device_eagles(batch, head, [K], over)
    requests, _, _ = _run(batch, System("eagle", False, K, device=True, eagle=True, copy_after=over), prompts, [gen] * len(prompts), None, steps)
    print(f"lookup_over {over}: batched rows tau {tau([r.tokens for r in requests], sum(r.verify_steps for r in requests)):.3f}"
          f"{'' if [r.tokens for r in requests] == plain else ' NOT plain greedy'}", flush=True)
    for i, (r, o) in enumerate(zip(requests, host, strict=True)):
        part = next((s for s, (a, b) in enumerate(zip(r.draft_tokens, o.stats.draft_tokens, strict=False)) if a != b), None)
        if part is not None:
            print(f"  prompt {i}: drafts part at step {part} of {len(o.stats.draft_tokens)}: batched {r.draft_tokens[part]} host {o.stats.draft_tokens[part]}")
