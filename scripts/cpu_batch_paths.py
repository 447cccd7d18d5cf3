"""Continuous batching on the CPU: batched steps through the C layer operations against the PyTorch
layers on the same GGUF blocks, interleaved in one run (diagnostic).

    python3 scripts/cpu_batch_paths.py [sizes] [new_tokens] [rounds] [prompt_tokens]     e.g. 1,2,4,8 64 2

With prompt_tokens, every request is one long prompt (a document cut to that many tokens, a
different cut per slot) and each size runs one request per slot: prompts are prefilled one at a
time by the engine's own prefill either way, so the table's rate is the decode's, from the last
request's first token to the end.

The embedded model on the CPU's default engine (GGUF blocks). For each batch size B, 2 x B of the
suite's prompts go through B slots, plain greedy, EOS blocked; once with the C operations taking
the batch's rows at their own positions (each in its own cache row), once with the batched steps
on the PyTorch layers (what every batch ran before), alternating for `rounds`. Prints aggregate
tok/s (median over rounds), their ratio, and whether both gave every request its batch-1 tokens.
"""

import statistics
import sys
import time

import torch

from labkit.batch.engine import BatchConfig, BatchEngine
from labkit.batch.scheduler import ContinuousBatcher
from labkit.bench.results import git_commit
from labkit.config import EngineConfig, GenerationConfig, device_name
from labkit.engine_build import from_config
from labkit.generate import generate
from labkit.kernels import cpu_quant
from labkit.models.loading import load_model
from labkit.prompting import encode_prompt
from labkit.prompts import load_suite

sizes = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "1,2,4,8").split(",")]
new_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 64
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
prompt_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 0
loaded = load_model("default")
engine = from_config(loaded, EngineConfig(device="cpu"))
ops = engine.model.layer_ops
if ops is None or ops.name != "cpu":
    sys.exit(f"this engine runs no CPU layer operations ({engine.layer_kernels_reason})")
per_slot = 1 if prompt_tokens else 2
if prompt_tokens:
    from labkit.prompts.long import long_prompt

    suite = [long_prompt(loaded.tokenizer, prompt_tokens - 8 * i) for i in range(max(sizes))]
else:
    suite = [encode_prompt(loaded.tokenizer, p.content) for p in load_suite()]
cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
want = {i: generate(engine, suite[i % len(suite)], cfg).tokens for i in range(per_slot * max(sizes))}


def run(size: int, c_ops: bool) -> tuple[float, bool]:
    ops.ROW_POSITIONS = c_ops  # False: batched steps (rows at their own positions) take the PyTorch layers
    try:
        batcher = ContinuousBatcher(BatchEngine(engine, BatchConfig(slots=size, max_seq_len=max(1024, prompt_tokens + new_tokens + 8))))
        t0 = time.perf_counter()
        requests = [batcher.submit(suite[i % len(suite)], cfg) for i in range(per_slot * size)]
        batcher.run()
        wall = time.perf_counter() - t0
    finally:
        del ops.ROW_POSITIONS
    same = all(r.tokens == want[i] for i, r in enumerate(requests))
    if prompt_tokens:  # the decode: from the last request's first token
        start = max(r.token_times[0] for r in requests)
        after = sum(sum(t > start for t in r.token_times) for r in requests)
        return after / (max(r.token_times[-1] for r in requests) - start), same
    return sum(len(r.tokens) for r in requests) / wall, same


print(f"{device_name(torch.device('cpu'))}, kernel path {cpu_quant.kernel_path()}, commit {git_commit()}, "
      f"{new_tokens} new tokens, {per_slot} request(s) per slot" + (f" of {prompt_tokens} prompt tokens (decode rates)" if prompt_tokens else "")
      + f", {rounds} rounds interleaved")
print(f"{'batch':>5} {'C operations tok/s':>19} {'PyTorch layers tok/s':>21} {'ratio':>6}  identical to batch 1 (C / PyTorch)")
for size in sizes:
    rates: dict[bool, list[float]] = {True: [], False: []}
    same = {True: True, False: True}
    for _ in range(rounds):
        for c_ops in (True, False):
            rate, ok = run(size, c_ops)
            rates[c_ops].append(rate)
            same[c_ops] &= ok
    c, t = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"{size:>5} {c:>19.1f} {t:>21.1f} {c / t:>5.2f}x  {same[True]} / {same[False]}", flush=True)
