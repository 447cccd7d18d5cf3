"""Where a batched step's time goes on this GPU (diagnostic; prints medians).

    python3 scripts/batch_costs.py [slots]

On the fused engine (CUDA graphs per rows bucket over the Triton layers, bf16), the suite's prompts:
- admission: `slots` prompts admitted one at a time (each its own batch-1 prefill, then copied into
  its slot) and together (BatchEngine.admit_many: the short ones as rows of one step per chunk), per request;
- gpu rows/T: back-to-back replays of the batched step graph (no host read between): the GPU's own
  time per step at rows 1..slots, T = 1 and 4;
- step rows: one plain batched step as the scheduler takes it: the host-built feed, the replay,
  the argmax and its host read, the rollback;
- scheduler rows/K: a whole ContinuousBatcher step over busy requests, plain (launched ahead: the
  verify is not timed alone) and drafting K=3 by prompt lookup, and the verify inside it (the rest: the host's per-row work and the verdict);
- kernels: the profiler's GPU time per kernel of a step over every slot (the largest).
"""

import os
import statistics
import sys
import time

import torch

from labkit.batch.engine import BatchConfig, BatchEngine
from labkit.batch.scheduler import ContinuousBatcher
from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.generate import encode_prompt, warm_up
from labkit.metrics import timers
from labkit.models.loading import load_model
from labkit.prompts import load_suite
from labkit.specdec.drafters import NgramDrafter

slots = int(sys.argv[1]) if len(sys.argv) > 1 else 64
DEV = os.environ.get("DEV", "cuda")  # cpu: a quick check of the script itself (PyTorch layers, no graphs)
gpu = DEV == "cuda"
loaded = load_model("default")
engine = Engine.from_loaded(loaded, DEV, torch.bfloat16 if gpu else torch.float32, weights="dense", cuda_graph=gpu,
                            layer_kernels="triton" if gpu else "torch")
warm_up(engine, 8)
sync = torch.cuda.synchronize if gpu else (lambda: None)
suite = [encode_prompt(loaded.tokenizer, p.content) for p in load_suite(None, None)]
asks = [suite[i % len(suite)] for i in range(slots)]
batch = BatchEngine(engine, BatchConfig(slots=slots, max_seq_len=1024, cuda_graph=gpu))
batch.capture_graphs([1, 4])
short = sum(batch.staging is not None and batch.staging.takes(len(p)) for p in asks)
print(f"{torch.cuda.get_device_name() if gpu else DEV}, {slots} slots, prompts {min(map(len, asks))}-{max(map(len, asks))} tokens, {short} staged")


def release_all() -> None:
    for slot in range(batch.active - 1, -1, -1):
        batch.release(slot)


def admit_each() -> None:
    release_all()
    for p in asks:
        batch.admit(p)
    sync()


def admit_together() -> None:
    release_all()
    batch.admit_many(asks)
    sync()


for label, fn in (("one at a time", admit_each), ("together", admit_together)):
    fn()  # captures what it needs
    us = timers.median_us(fn, 5)
    print(f"admission {label:14s} {us / 1e3:8.2f} ms for {slots} requests, {us / slots:7.1f} us each")

admit_together()
starts = list(batch.lengths[:slots])


@torch.inference_mode()
def replays(rows: int, T: int) -> None:
    graph = batch.graphs[(rows, T)]
    ids = torch.tensor([p[-1:] * T for p in asks[:rows]], device=DEV)  # (rows, T)
    pos = torch.tensor(starts[:rows], device=DEV)[:, None] + torch.arange(T, device=DEV)
    for _ in range(20):
        graph.run(ids, pos)
    sync()


rows = 1
while rows <= slots:
    line = f"gpu rows {rows:3d}"
    for T in (1, 4) if gpu else ():
        line += f"  T={T} {timers.median_us(lambda rows=rows, T=T: replays(rows, T), 10) / 20:7.1f} us"
    release_all()
    batch.admit_many(asks[:rows])

    def step(rows: int = rows) -> None:
        logits = batch.verify([[p[-1]] for p in asks[:rows]])  # (rows, 1, V)
        logits.argmax(-1).tolist()
        for slot in range(rows):
            batch.rollback(slot, starts[slot])

    us = timers.median_us(step, 50)
    line += f"  step {us:7.1f} us ({us / rows:6.1f} per row)"
    print(line)
    release_all()
    batch.admit_many(asks)
    rows *= 2

def scheduler_steps(rows: int, k: int, steps: int = 40) -> tuple[float, float]:
    """Median ms of a ContinuousBatcher step over `rows` busy requests (128 new tokens each, EOS
    blocked as `bench batch` blocks it), plain (k 0) or drafting K by prompt lookup, and the
    median ms of the verify inside it (the rest is the host's per-row work and the verdict). Plain
    steps run launched ahead (the host's work on one step while the next runs), so for them only
    the whole step is timed (a timed verify would wait for the device)."""
    release_all()
    batcher = ContinuousBatcher(batch, (lambda: NgramDrafter(3, 1)) if k else None, k)
    gen = GenerationConfig(max_new_tokens=128, min_new_tokens=128)
    for p in asks[:rows]:
        batcher.submit(p, gen)
    batcher.step()  # admission and the first step
    inner: list[float] = []
    verify = batch.verify

    def timed(feeds: list[list[int]], width: int | None = None) -> torch.Tensor:
        t0 = time.perf_counter()
        out = verify(feeds, width)
        sync()
        inner.append(time.perf_counter() - t0)
        return out

    if k:
        batch.verify = timed  # type: ignore[method-assign]
    whole = []
    for _ in range(steps):
        t0 = time.perf_counter()
        batcher.step()
        whole.append(time.perf_counter() - t0)
    batch.verify = verify  # type: ignore[method-assign]
    return statistics.median(whole) * 1e3, statistics.median(inner) * 1e3 if inner else float("nan")


for rows in (1, 8, 64):
    if rows <= slots:
        line = f"scheduler rows {rows:3d}"
        for k in (0, 3):
            whole, inner = scheduler_steps(rows, k)
            line += f"  K={k}: step {whole:6.2f} ms, verify {inner:6.2f} ms, rest {whole - inner:6.2f} ms"
        print(line, flush=True)
release_all()
batch.admit_many(asks)
acts = [torch.profiler.ProfilerActivity.CUDA if gpu else torch.profiler.ProfilerActivity.CPU]
with torch.inference_mode(), torch.profiler.profile(activities=acts) as prof:
    for _ in range(5):
        batch.verify([[p[-1]] for p in asks])
        for slot in range(slots):
            batch.rollback(slot, starts[slot])
    sync()
times: dict[str, float] = {}
for e in prof.events():
    if e.device_type == (torch.autograd.DeviceType.CUDA if gpu else torch.autograd.DeviceType.CPU):
        times[e.name] = times.get(e.name, 0.0) + e.time_range.elapsed_us() / 5
print(f"a step over {slots} rows: {sum(times.values()):.1f} us of kernels; largest:")
for name, us in sorted(times.items(), key=lambda kv: -kv[1])[:10]:
    print(f"  {us:8.1f} us  {name[:100]}")
print(f"done {time.strftime('%H:%M:%S')}")
