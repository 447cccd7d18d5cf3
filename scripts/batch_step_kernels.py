"""Where a busy batch's time goes, by system and rows (diagnostic; prints per generated token).

    python3 scripts/batch_step_kernels.py EAGLE_FOLDER [sizes] [K] [steps]

For each rows count r and system (plain, ngram-device-K, eagle-device-K: bench batch's), r requests
of the suite (850 new tokens each, so none ends) run through a ContinuousBatcher past their
admission and first loads; then `steps` scheduler steps are timed, and as many more run under the profiler. Per
generated batched step: the host's wall time (against plain's), the tokens a row gained, and the kernels that
take the most device time (their durations overlap under programmatic dependent launch: compare
them between systems, not with the wall). Generations this long repeat themselves, so the tokens a
row a step run far above the suite's 128-token requests': read the steps' costs here, tau from
bench batch.
"""

import sys
import time

import torch
from batch_setup import engine_and_suite

from labkit.batch.eagle import device_eagles
from labkit.batch.engine import BatchConfig, BatchEngine
from labkit.batch.lookup import device_lookups
from labkit.batch.scheduler import ContinuousBatcher
from labkit.config import GenerationConfig
from labkit.specdec.drafters import NgramDrafter
from labkit.specdec.eagle import load_eagle
from labkit.specdec.heads import fingerprint

folder = sys.argv[1]
sizes = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "1,2,4,8").split(",")]
K = int(sys.argv[3]) if len(sys.argv) > 3 else 5
STEPS = int(sys.argv[4]) if len(sys.argv) > 4 else 16
engine, suite, gpu = engine_and_suite(850)
sync = torch.cuda.synchronize if gpu else (lambda: None)
head = load_eagle(folder, fingerprint(engine.model.lm_head.weight))
gen = GenerationConfig(max_new_tokens=850, min_new_tokens=850)
kind = torch.autograd.DeviceType.CUDA if gpu else torch.autograd.DeviceType.CPU
acts = [torch.profiler.ProfilerActivity.CUDA if gpu else torch.profiler.ProfilerActivity.CPU]

for r in sizes:
    batch = BatchEngine(engine, BatchConfig(slots=r, max_seq_len=1024, cuda_graph=gpu))
    systems = {"plain": None, f"ngram-device-{K}": device_lookups(batch, [K]), f"eagle-device-{K}": device_eagles(batch, head, [K])}
    batch.capture_graphs(list(range(1, K + 2)))
    walls = {}
    for name, lookups in systems.items():
        batcher = ContinuousBatcher(batch, (lambda: NgramDrafter(3, 1)) if lookups else None, K if lookups else 0, lookup=lookups)
        asks = [batcher.submit(suite[(i * 7) % len(suite)], gen) for i in range(r)]
        for _ in range(4):
            batcher.step()  # admission, loads, first chunks
        sync()
        before, steps0 = sum(len(a.tokens) for a in asks), batcher.steps
        t0 = time.perf_counter()
        for _ in range(STEPS):  # timed without the profiler (its own host work would slow the host)
            batcher.step()
        sync()
        wall = time.perf_counter() - t0
        timed, steps = sum(len(a.tokens) for a in asks) - before, batcher.steps - steps0
        before += timed
        steps0 = batcher.steps
        with torch.inference_mode(), torch.profiler.profile(activities=acts) as prof:
            for _ in range(STEPS):
                batcher.step()
            sync()
        tokens = max(1, sum(len(a.tokens) for a in asks) - before)
        per = max(1, batcher.steps - steps0)  # batched steps profiled
        times: dict[str, float] = {}
        for e in prof.events():
            if e.device_type == kind:
                times[e.name] = times.get(e.name, 0.0) + e.time_range.elapsed_us()
        walls[name] = 1e6 * wall / steps
        print(f"rows {r:2d} {name:16s} {steps:4d} steps: wall {walls[name]:7.1f} us/step = {walls[name] / walls['plain']:.2f} plain steps, "
              f"{timed / (r * steps):.2f} tokens a row a step; kernels {sum(times.values()) / per:7.1f} us/step (overlapping under PDL)")
        for kname, us in sorted(times.items(), key=lambda kv: -kv[1])[:8]:
            print(f"      {us / per:7.2f} us/step  {kname[:110]}")
        for a in asks:
            batcher.cancel(a)
        batcher.run()
print(f"done {time.strftime('%H:%M:%S')}")
