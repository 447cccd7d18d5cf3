"""Where a steady batched load's wall time goes outside the GPU's work (diagnostic; prints a table).

    python3 scripts/batch_gaps.py [EAGLE_FOLDER] [rows, default 4] [K, default 3]

`bench batch`'s flow at one size (the suite's categories in turn, 128 new tokens each, 8 requests a
slot) for plain, ngram-device-K and, with a head, eagle-device-K and eagle-mix-device-K: one warm
run, then one under torch.profiler with the scheduler's phases marked (admission, its first tokens'
read, a chunk's launch, a row's load, the chunk's read, the tokens' take, plain steps). From the
trace: the GPU's busy time (kernels and copies), and for each phase the host's time in it and the
time the GPU sat idle meanwhile, so the wall time a request costs beyond its steps is told apart
by where the host was. (The profiler's own overhead stretches host time; compare systems, not
absolute numbers.)
"""

import json
import os
import sys
import tempfile
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from batch_setup import engine_and_suite
from labkit.batch.eagle import device_eagles
from labkit.batch.engine import BatchConfig, BatchEngine
from labkit.batch.lookup import device_lookups
from labkit.batch.scheduler import ContinuousBatcher
from labkit.config import GenerationConfig
from labkit.specdec.drafters import NgramDrafter
from labkit.specdec.eagle import load_eagle
from labkit.specdec.heads import fingerprint

folder = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "-" else None
rows = int(sys.argv[2]) if len(sys.argv) > 2 else 4
K = int(sys.argv[3]) if len(sys.argv) > 3 else 3
engine, suite, gpu = engine_and_suite(128)
n = 8 * rows
asks = [suite[i % len(suite)] for i in range(n)]
gen = GenerationConfig(max_new_tokens=128, min_new_tokens=128)
batch = BatchEngine(engine, BatchConfig(slots=rows, max_seq_len=1024, cuda_graph=gpu))
systems = {"plain": (0, None), f"ngram-device-{K}": (K, device_lookups(batch, [K]))}
if folder:
    head = load_eagle(folder, fingerprint(engine.model.lm_head.weight))
    systems[f"eagle-device-{K}"] = (K, device_eagles(batch, head, [K]))
    systems[f"eagle-mix-device-{K}"] = (K, device_eagles(batch, head, [K], copy_after=2))
batch.capture_graphs(list(range(1, K + 2)))

PHASES = {  # (object's attribute path, label)
    "_admit": "admit", "_greedy": "tokens read (admission's, host steps')", "_lookup_chunk": "chunk", "_plain_ahead": "plain step ahead",
    "_settle": "plain: read and take", "_read_step": "host-read step", "_leave": "leave",
}


def marked(obj, name: str, label: str):  # type: ignore[no-untyped-def]
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        with record_function(label):
            return fn(*args, **kwargs)
    setattr(obj, name, wrapper)


def run(k: int, lookups, traced: bool) -> float:  # type: ignore[no-untyped-def]
    batcher = ContinuousBatcher(batch, (lambda: NgramDrafter(3, 1)) if k else None, k, lookup=lookups)
    if traced:
        for name, label in PHASES.items():
            marked(batcher, name, label)
        marked(batch, "admit_many", "admit: prefill")
        for steps in lookups or []:
            for name, label in (("run", "chunk: launch"), ("read", "chunk: read"), ("taken", "chunk: take"), ("run_on", "chunk: launch ahead")):
                marked(steps, name, label)
            if steps.hook is not None:
                marked(steps.hook, "load", "chunk: launch: EAGLE load")
    requests = [batcher.submit(a, gen) for a in asks]
    batcher.run()
    if traced:
        del batch.admit_many  # (the instance's wrapper: the class's method again)
    return sum(len(r.tokens) for r in requests)


def intervals(events: list[dict], cats: set[str]) -> list[tuple[float, float]]:
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("ph") == "X" and e.get("cat") in cats)
    merged: list[list[float]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def overlap(a: float, b: float, busy: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(b, y) - max(a, x)) for x, y in busy)


for name, (k, lookups) in systems.items():
    run(k, lookups, False)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        with record_function("whole run"):
            tokens = run(k, lookups, True)
        if gpu:
            torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    events = json.load(open(path))["traceEvents"]
    busy = intervals(events, {"kernel", "gpu_memcpy", "gpu_memset"})
    marks = [e for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"]
    whole = next(e for e in marks if e["name"] == "whole run")
    w0, w1 = whole["ts"], whole["ts"] + whole["dur"]
    gpu_busy = overlap(w0, w1, busy)
    print(f"== {name} at {rows} rows: {n} requests, {tokens} tokens in {(w1 - w0) / 1e3:.1f} ms (traced), GPU busy {gpu_busy / 1e3:.1f} ms, "
          f"idle {(w1 - w0 - gpu_busy) / 1e3:.1f} ms ({(w1 - w0 - gpu_busy) / 1e3 / n:.2f} ms a request)")
    table: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for e in marks:
        if e["name"] == "whole run":
            continue
        a, b = e["ts"], e["ts"] + e["dur"]
        row = table[e["name"]]
        row[0] += 1
        row[1] += b - a
        row[2] += (b - a) - overlap(a, b, busy)
    for label, (count, host, idle) in sorted(table.items()):
        print(f"  {label:34s} {int(count):5d} x  host {host / 1e3:8.1f} ms  GPU idle meanwhile {idle / 1e3:7.1f} ms ({idle / 1e3 / n:.2f} a request)")
