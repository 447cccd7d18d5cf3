"""What the batch K controller saw and chose, step by step (diagnostic; writes JSON).

    python3 scripts/batch_trace.py OUT.json [sizes, default 4,8] [repeats, default 3] [an EAGLE head's folder]
    (SYSTEMS=plain,eagle-device-auto-5 runs those systems alone; DEVICE=cpu MAX_TOKENS=16 for a quick check here;
    SPREAD=0.5 draws each request's new tokens within +-50% of them: `bench batch --length-spread`)

Runs `labkit bench batch`'s own flow (the suite's categories in turn, 128 new tokens, K 5, the
device's defaults) at the given sizes with every -auto system's controller recording: each choice
(every step's: the rows bucket, the K, each candidate's value then) and each observed step
(tokens, seconds, the rows' kept drafts, and the tokens a row was expected to take with that K
when it was chosen). From it: how far the expected tokens of the steps drafting took were from
what they gave (a choice's rates are estimates, and the K chosen is the one estimated highest),
and where the time went by bucket and K.
"""

import json
import os
import sys
import time
from typing import Any

import labkit.bench.batch as bench
from labkit.batch.controller import BatchKController
from labkit.batch.transfer import HostCopy
from labkit.bench.batch_report import batch_report
from labkit.config import EngineConfig


class TracingController(BatchKController):
    traces: list[list[dict[str, Any]]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trace: list[dict[str, Any]] = []
        self.expected: dict[int, float] = {}
        TracingController.traces.append(self.trace)

    def choose(self, bucket: int) -> int:
        values = self.values(bucket)
        k = super().choose(bucket)
        self.trace.append({"e": "choose", "t": time.perf_counter(), "b": bucket, "k": k, "best": max(values, key=values.__getitem__) if values else None, "values": values})
        self.expected[bucket] = self.acceptance.tokens(k) if k and self.acceptance.known else 0.0
        return k

    def observe(self, bucket: int, k: int, tokens: int, seconds: float, kept: list[int] | None = None) -> None:
        self.trace.append({"e": "obs", "t": time.perf_counter(), "b": bucket, "k": k, "tokens": tokens, "s": seconds, "kept": kept,
                           "expected": self.expected.get(bucket, 0.0) if k else 0.0})
        super().observe(bucket, k, tokens, seconds, kept)

    def observe_chunk(self, bucket: int, k: int, steps: list[tuple[int, list[int]]], seconds: float) -> None:
        for tokens, kept in steps:
            self.trace.append({"e": "obs", "t": time.perf_counter(), "b": bucket, "k": k, "tokens": tokens, "s": seconds, "kept": kept,
                               "expected": self.expected.get(bucket, 0.0)})
        super().observe_chunk(bucket, k, steps, seconds)

    def observe_load(self, bucket: int, k: int, seconds: float) -> None:
        self.trace.append({"e": "load", "t": time.perf_counter(), "b": bucket, "k": k, "s": seconds})
        super().observe_load(bucket, k, seconds)

    def observe_drafts(self, k: int, kept: list[int]) -> None:
        self.trace.append({"e": "judged", "k": k, "kept": kept})
        super().observe_drafts(k, kept)


WAITS: list[float] = []  # each plain step's read: the host's wait for its tokens (0 where the host is what a step waits for)
RUNS: list[str] = []  # each run: system, rows, steps, wall per step, the plain reads' median wait


def _waited_tolist(self: HostCopy) -> list:
    t0 = time.perf_counter()
    if self.event is not None:
        self.event.synchronize()
    WAITS.append(time.perf_counter() - t0)
    return self.host.tolist()


def _traced_run(*args: Any, **kwargs: Any) -> Any:
    batch, system = args[0], args[1]
    start = len(WAITS)
    out = _run(*args, **kwargs)
    waits = sorted(WAITS[start:])
    steps = max(1, sum(r.verify_steps for r in out[0]) // max(1, round(out[2])))
    mid = 1e3 * waits[len(waits) // 2] if waits else float("nan")
    RUNS.append(f"{system.name:<22} rows {batch.cfg.slots:>3}  wall {1e3 * out[1]:7.1f} ms  ~{1e3 * out[1] / steps:.3f} ms/step  "
                f"plain reads {len(waits):>4}, wait median {mid:.3f} ms, under 0.05 ms {sum(w < 5e-5 for w in waits)}")
    return out


_run = bench._run


def main() -> None:
    out = sys.argv[1]
    sizes = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "4,8").split(",")]
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    heads = sys.argv[4] if len(sys.argv) > 4 else None
    bench.BatchKController = TracingController  # type: ignore[misc]
    HostCopy.tolist = _waited_tolist  # type: ignore[method-assign]
    bench._run = _traced_run  # type: ignore[assignment]
    drafter = "ngram"
    if os.environ.get("SYSTEMS"):
        keep, systems = os.environ["SYSTEMS"].split(","), bench._systems
        if any(name.startswith("ngram") for name in keep):
            keep.append("ngram-5")  # (bench batch's step costs run on its host-drafting system)
        else:
            drafter = "none"  # (no prompt-lookup systems built at all)
        bench._systems = lambda cfg: [s for s in systems(cfg) if s.name in keep]  # type: ignore[assignment]
    device = os.environ.get("DEVICE", "cuda")
    cfg = bench.BatchBenchConfig(engine=EngineConfig(device=device, cuda_graph=device == "cuda"), sizes=sizes, invariant=False, k=5,
                                 max_new_tokens=int(os.environ.get("MAX_TOKENS", "128")), drafter=drafter, repeats=repeats,
                                 output_dir=None, progress=False, heads=heads, length_spread=float(os.environ.get("SPREAD", "0")))
    payload = bench.run_batch_bench(cfg)
    for line in batch_report(payload):
        print(line)
    for line in RUNS:
        print(line)
    with open(out + ".runs.txt", "w") as f:
        f.write("\n".join(RUNS) + "\n")
    json.dump({"summary": payload["summary"], "traces": TracingController.traces}, open(out, "w"))
    for i, trace in enumerate(TracingController.traces):
        steps = [e for e in trace if e["e"] == "obs" and e["k"] and e["kept"] and e["expected"]]
        for b in sorted({e["b"] for e in steps}):
            sel = [e for e in steps if e["b"] == b]
            exp = sum(e["expected"] * len(e["kept"]) for e in sel)
            got = sum(len(e["kept"]) + sum(e["kept"]) for e in sel)
            print(f"controller {i} bucket {b}: {len(sel)} drafting steps, expected {exp:.0f} tokens, got {got} ({got / exp:.2f})")
        chosen = [e for e in trace if e["e"] == "choose"]
        for b in sorted({e["b"] for e in chosen}):
            sel = [e for e in chosen if e["b"] == b]
            counts: dict[str, int] = {}
            for e in sel:
                key = f"k{e['k']}/best{e['best']}"
                counts[key] = counts.get(key, 0) + 1
            loads = [round(1e3 * e["s"], 2) for e in trace if e["e"] == "load" and e["b"] == b and e["s"] > 0]
            print(f"controller {i} bucket {b}: choices {counts}; loads after plain (ms) {loads[:20]}")


if __name__ == "__main__":
    main()
