"""Plain batched steps launched ahead against read at once, interleaved (diagnostic).

    python3 scripts/batch_ahead.py [sizes] [new_tokens] [rounds]

Continuous batching over the suite's prompts (2 requests per slot, EOS blocked until the last
token), plain greedy, with `ContinuousBatcher(ahead=True)` (each step launched from the last
step's tokens on the device, that step read while it runs) and `ahead=False` (read, then launch),
taking turns; prints the median aggregate tok/s of each and whether every request's tokens are the
same. On CUDA: the fused layers and batched CUDA graphs (bf16); on a CPU: the engine's default.
"""

import statistics
import sys
import time

import torch
from batch_setup import engine_and_suite  # scripts/batch_setup.py, beside this script

from labkit.batch.engine import BatchConfig, BatchEngine
from labkit.batch.scheduler import ContinuousBatcher
from labkit.config import GenerationConfig

sizes = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "1,4,8").split(",")]
new_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 48
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
engine, suite, gpu = engine_and_suite(new_tokens)


def run(batch: BatchEngine, ahead: bool) -> tuple[float, list[list[int]]]:
    batcher = ContinuousBatcher(batch, ahead=ahead)
    asks = [suite[i % len(suite)] for i in range(2 * batch.cfg.slots)]
    requests = [batcher.submit(p, GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)) for p in asks]
    if gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    batcher.run()
    seconds = time.perf_counter() - t0
    return sum(len(r.tokens) for r in requests) / seconds, [r.tokens for r in requests]


for size in sizes:
    batch = BatchEngine(engine, BatchConfig(slots=size, max_seq_len=1024, cuda_graph=gpu))
    batch.capture_graphs([1])
    run(batch, True)  # untimed: captures and first passes
    rates: dict[bool, list[float]] = {True: [], False: []}
    tokens: dict[bool, list[list[int]]] = {}
    for _ in range(rounds):
        for ahead in (True, False):
            rate, tokens[ahead] = run(batch, ahead)
            rates[ahead].append(rate)
    a, r = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"batch {size:3d}: ahead {a:9.1f} tok/s, read {r:9.1f} tok/s, ahead / read {a / r:5.3f}, same tokens {tokens[True] == tokens[False]}", flush=True)
