"""What a batched EAGLE step costs on this GPU against prompt lookup's (diagnostic; prints medians).

    python3 scripts/batch_eagle_costs.py EAGLE_FOLDER [sizes] [K]

For rows r of each size (the suite's prompts, mid-request: admitted and a chunk decoded through a
ContinuousBatcher), each system's captured device step (batch/lookup.py) replayed back to back, no
host read between: the GPU's own time per step of ngram-device-K, eagle-device-K (batch/eagle.py:
a catch-up and a chain per row inside the step) and eagle-mix-device-K (the same and the lookup's
choice); and one row's load (BatchEagle.load: the catch-up over its context and the first chains),
with a batch-1 prefill of its own, from its admission's hidden states (a new request's), and caught up
over 8 positions from the hidden states plain steps kept (a row back from plain steps). PROFILE_STEPS=1: each
system's kernels in a chunk of replays, by GPU time; PROFILE_LOAD=1: a load's host and device time. First: one
row's first load caught up over each of several lengths, timed once each, before and after the hook's
capture_all (which runs a catch-up of each length class its kernels compile apart). ORDER=eagle-mix,eagle,ngram,eagle-mix:
the systems timed at each size in that order (repeats allowed: is a step's time the order's?), each also with the host's
time to launch its chunk of replays (before the sync: whether the launches, not the GPU, set the pace).
"""

import os
import sys
import time

import torch

from batch_setup import engine_and_suite
from labkit.batch.eagle import BatchEagle
from labkit.batch.engine import BatchConfig, BatchEngine
from labkit.batch.lookup import CHUNK, BatchLookup
from labkit.batch.scheduler import ContinuousBatcher
from labkit.config import GenerationConfig
from labkit.metrics import timers
from labkit.specdec.drafters import NgramDrafter
from labkit.specdec.eagle import load_eagle
from labkit.specdec.heads import fingerprint

folder = sys.argv[1]
sizes = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "1,2,4,8").split(",")]
K = int(sys.argv[3]) if len(sys.argv) > 3 else 5
engine, suite, gpu = engine_and_suite(128)
sync = torch.cuda.synchronize if gpu else (lambda: None)
head = load_eagle(folder, fingerprint(engine.model.lm_head.weight))
batch = BatchEngine(engine, BatchConfig(slots=max(sizes), max_seq_len=1024, cuda_graph=gpu))
systems = {f"ngram-device-{K}": BatchLookup(batch, K), f"eagle-device-{K}": BatchLookup(batch, K, hook=BatchEagle(batch, head, K)),
           f"eagle-mix-device-{K}": BatchLookup(batch, K, hook=BatchEagle(batch, head, K, copy_after=2))}
for steps in systems.values():
    steps.capture_all()
gen = GenerationConfig(max_new_tokens=600, min_new_tokens=600)
hook = systems[f"eagle-device-{K}"].hook
assert isinstance(hook, BatchEagle)


def caught_up_load(context: list[int], hidden: torch.Tensor, m: int) -> None:
    """One row's load caught up over the m positions before its last, as after m plain steps (hidden: (n-1, D))."""
    n = len(context)
    for listener in batch.step_listeners:  # as m plain steps since its last chunk hand their hidden states over
        listener([n - 1 - m], torch.arange(n - 1 - m, n - 1, device=hidden.device)[None], hidden[None, n - 1 - m : n - 1])
    hook.load([0], [context], [n - m], [n - 1 - m])
    sync()


def hidden_of(context: list[int]) -> torch.Tensor:
    engine.ensure_capacity(len(context))
    engine.prefill(torch.tensor([context[:-1]], device=engine.device))
    return engine.hidden_span(0, len(context) - 1)[0].clone()  # (n-1, D) as the steps hand them over


# the first load caught up over each length, before and after the hook's capture_all (which warms its catch-ups' kernels)
context = (suite[0] * (300 // len(suite[0]) + 1))[:300]
hidden = hidden_of(context)
for when, lengths in (("cold", (8, 1, 16, 8, 3)), ("after capture_all", (2, 32, 85, 5))):
    if when != "cold":
        hook.capture_all()
    line = f"first loads caught up, {when}:"
    for m in lengths:
        t0 = time.perf_counter()
        caught_up_load(context, hidden, m)
        line += f"  {m} positions {1e3 * (time.perf_counter() - t0):7.1f} ms"
    print(line)

order = [f"{s}-device-{K}" for s in os.environ["ORDER"].split(",")] if os.environ.get("ORDER") else list(systems)
for r in sizes:
    line = f"rows {r:2d}:"
    for name in order:
        steps = systems[name]
        batcher = ContinuousBatcher(batch, lambda: NgramDrafter(3, 1), K, lookup=[steps])
        asks = [batcher.submit(suite[i % len(suite)], gen) for i in range(r)]
        for _ in range(3):
            batcher.step()  # admission, loads, a chunk or so
        sync()

        launched: list[float] = []

        def replays(steps: BatchLookup = steps, r: int = r, launched: list[float] = launched) -> None:
            t0 = time.perf_counter()
            steps.run_on(r, CHUNK)  # a chunk of the rows' steps (replays of the bucket's graph where captured)
            launched.append(time.perf_counter() - t0)
            sync()

        line += f"  {name} {timers.median_us(replays, 5, warm=1) / CHUNK:7.1f} us"
        if os.environ.get("ORDER"):
            line += f" (launch {1e6 * sorted(launched)[len(launched) // 2] / CHUNK:5.1f})"
        if os.environ.get("PROFILE_STEPS") and gpu:  # the kernels of a chunk's replays, by their GPU time
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                replays()
            print(f"-- {name} at {r} rows, {CHUNK} steps:")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
        for a in asks:
            batcher.cancel(a)
        batcher.run()
    print(line)

for n in (64, 256):
    context = (suite[0] * (n // len(suite[0]) + 1))[:n]
    prompt = torch.tensor([context[:-1]], device=engine.device)
    hidden = hidden_of(context)  # as an admission hands it over

    def kept_load(context: list[int] = context, hidden: torch.Tensor = hidden) -> None:
        for listener in batch.prompt_listeners:  # as admit_many hands each prompt's hidden states over
            listener(0, context[:-1], hidden)
        hook.load([0], [context])
        sync()

    passed = timers.median_us(lambda context=context: (hook.load([0], [context]), sync()), 10, warm=2)
    kept = timers.median_us(kept_load, 10, warm=2)
    back = timers.median_us(lambda context=context, hidden=hidden: caught_up_load(context, hidden, 8), 10, warm=2)
    prefill = timers.median_us(lambda prompt=prompt: (engine.prefill(prompt), sync()), 10, warm=2)
    if os.environ.get("PROFILE_LOAD"):  # where a load from its admission's hidden states spends its time (host and device)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                kept_load()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
    print(f"load of a {n}-token context: {passed:7.1f} us with a prefill of its own, {kept:7.1f} us from its admission's hidden states, "
          f"{back:7.1f} us caught up after 8 plain steps (a prefill alone {prefill:7.1f} us)")
