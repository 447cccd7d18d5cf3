"""Where the host's time goes in batched steps (diagnostic): cProfile of ContinuousBatcher.run.

    python3 scripts/batch_host.py [sizes] [new_tokens]

For each batch size, plain continuous batching and prompt lookup with the batch K controller
(K up to 5, as `bench batch`'s ngram-auto-5), after an untimed run each: the wall time per step and
the functions with the most time of their own. A launched-ahead plain step overlaps the host's work
with the device's, so where the host's share of a step exceeds the device's, the host sets the pace.
On CUDA: the fused layers and batched CUDA graphs (bf16); on a CPU: the engine's default.
"""

import cProfile
import pstats
import sys
import time

from batch_setup import engine_and_suite  # scripts/batch_setup.py, beside this script

from labkit.batch.controller import BatchKController
from labkit.batch.engine import BatchConfig, BatchEngine
from labkit.batch.scheduler import ContinuousBatcher
from labkit.config import GenerationConfig
from labkit.specdec.drafters import NgramDrafter

sizes = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "4,16").split(",")]
new_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 128
engine, suite, gpu = engine_and_suite(new_tokens)


def run(batch: BatchEngine, controller: BatchKController | None) -> ContinuousBatcher:
    batcher = ContinuousBatcher(batch, (lambda: NgramDrafter(3, 1)) if controller else None, controller.k_max if controller else 0, controller)
    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    for i in range(2 * batch.cfg.slots):
        batcher.submit(suite[i % len(suite)], gen)
    batcher.run()
    return batcher


for size in sizes:
    batch = BatchEngine(engine, BatchConfig(slots=size, max_seq_len=1024, cuda_graph=gpu))
    batch.capture_graphs(list(range(1, 7)))
    for name, controller in (("plain", None), ("ngram-auto-5", BatchKController(5))):
        run(batch, controller)  # untimed: first passes, the controller's first tries
        profile = cProfile.Profile()
        t0 = time.perf_counter()
        profile.enable()
        batcher = run(batch, controller)
        profile.disable()
        wall = time.perf_counter() - t0
        print(f"\n== batch {size}, {name}: {1e3 * wall / batcher.steps:.3f} ms per step ({batcher.steps} steps, profiled)")
        pstats.Stats(profile).sort_stats("tottime").print_stats(14)
