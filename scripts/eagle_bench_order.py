"""Does `bench batch` see the EAGLE tau of a lone request? (diagnostic; prints tau per run)

    python3 scripts/eagle_bench_order.py EAGLE_FOLDER [sizes, default 1]

scripts/eagle_tau_paths.py found the host loop, the device steps and batched rows at tau 2.33 on the
H200 for the bench's first 8 prompts, where `bench batch` reported eagle-device-5 at tau 1.68: the
bench builds a drafter per system and size on one head, and each new drafter freed the rotary
table the earlier ones' captured steps read (fixed in 79dceb4: EagleHead.rope_table). This runs the
bench twice, as it is and with the engine's hidden states kept from its start, and prints each
EAGLE run's tau as it goes (its own batch-1 run, the untimed run, the timed ones) with the loads so
far: every run should draft at a lone request's tau.
"""

import os
import sys

import labkit.bench.batch as bench
from labkit.config import EngineConfig

folder = sys.argv[1]
sizes = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "1").split(",")]
build = bench.from_config
run = bench._run


def traced_run(batch, system, prompts, gen, controller=None, lookups=None):  # type: ignore[no-untyped-def]
    requests, wall, rows = run(batch, system, prompts, gen, controller, lookups)
    if system.eagle:
        hook = lookups[0].hook if lookups else None
        tau = sum(len(r.tokens) - 1 for r in requests) / max(1, sum(r.verify_steps for r in requests))
        print(f"  {system.name} batch {batch.cfg.slots}: tau {tau:.3f}"
              f" (loads {getattr(hook, 'loaded', '?')}, with a prefill of their own {getattr(hook, 'prefilled', '?')})", flush=True)
    return requests, wall, rows


bench._run = traced_run


def kept_from_start(*args, **kwargs):  # type: ignore[no-untyped-def]
    engine = build(*args, **kwargs)
    engine.keep_hidden_states(every_position=True)
    return engine


for name, maker in (("as the bench runs", build), ("hidden states kept from the start", kept_from_start)):
    bench.from_config = maker
    cfg = bench.BatchBenchConfig(engine=EngineConfig(device=os.environ.get("DEVICE", "cuda"), cuda_graph=os.environ.get("DEVICE", "cuda") == "cuda"), sizes=sizes, invariant=False, k=5,
                                 max_new_tokens=int(os.environ.get("TOKENS", "128")), repeats=1, heads=folder, output_dir=None, progress=False)
    payload = bench.run_batch_bench(cfg)
    print(name + ": " + ", ".join(f"{r['system']} b{r['batch']} tau {r['tau']:.3f} {r['aggregate_tok_per_s']:,.0f} tok/s"
                                  for r in payload["summary"] if r["system"] in ("plain", "ngram-device-5") or "eagle" in r["system"]), flush=True)
