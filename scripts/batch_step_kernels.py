"""Where a busy batch's time goes, by system and rows (diagnostic; prints per generated token).

    python3 scripts/batch_step_kernels.py EAGLE_FOLDER [sizes] [K] [steps]

For each rows count r and system (plain, ngram-device-K, eagle-device-K: bench batch's), r requests
of the suite (850 new tokens each, so none ends) run through a ContinuousBatcher past their
admission and first loads; then `steps` scheduler steps are timed, and as many more run under the profiler. Per
generated token (all rows): the host's wall time, the device's kernel time (the rest of the wall the device
sat idle: the host's work or a read's wait), and the kernels that take the most. plain's wall per
token over a system's is that system's speed-up with every slot busy, without admissions or a drain.
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
        before = sum(len(a.tokens) for a in asks)
        t0 = time.perf_counter()
        for _ in range(STEPS):  # timed without the profiler (its own host work would slow the host)
            batcher.step()
        sync()
        wall = time.perf_counter() - t0
        timed = sum(len(a.tokens) for a in asks) - before
        before += timed
        with torch.inference_mode(), torch.profiler.profile(activities=acts) as prof:
            for _ in range(STEPS):
                batcher.step()
            sync()
        tokens = max(1, sum(len(a.tokens) for a in asks) - before)
        times: dict[str, float] = {}
        for e in prof.events():
            if e.device_type == kind:
                times[e.name] = times.get(e.name, 0.0) + e.time_range.elapsed_us()
        walls[name] = 1e6 * wall / timed
        busy = sum(times.values()) / tokens
        print(f"rows {r:2d} {name:16s} {tokens:5d} tokens: wall {walls[name]:7.1f} us/token, kernels {busy:7.1f} us/token "
              f"(device idle {max(0.0, 1 - busy / walls[name]):4.0%}), {len(times)} kernel names; speed-up over plain {walls['plain'] / walls[name]:.2f}x")
        for kname, us in sorted(times.items(), key=lambda kv: -kv[1])[:8]:
            print(f"      {us / tokens:7.2f} us/token  {kname[:110]}")
        for a in asks:
            batcher.cancel(a)
        batcher.run()
print(f"done {time.strftime('%H:%M:%S')}")
