"""What admitting requests costs a batch: prompts one at a time against all together (diagnostic).

    python3 scripts/admission_costs.py [slots, default 16] [device, default cuda]

Speculative rows finish at different steps, so continuous batching admits the next requests one at a
time as slots free, where plain rows of one length finish together and their successors join in one
batched prefill (batch/prefill.py; prompts of more than 48 tokens, whose batch-1 prefill is one PyTorch
pass, join one at a time either way). This times both on `bench batch`'s prompts (the suite's categories
in turn) and a plain step of the full batch beside them, each synchronised, four rounds.
"""

import statistics
import sys
import time

import torch

from labkit.batch.engine import BatchConfig, BatchEngine
from labkit.bench.batch import categories_in_turn
from labkit.config import EngineConfig, device_name
from labkit.engine_build import from_config
from labkit.models.loading import load_model
from labkit.prompting import encode_prompt
from labkit.prompts import load_suite


def timed(device: torch.device, fn) -> float:  # type: ignore[no-untyped-def]
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    out.argmax(-1).tolist()  # the first tokens read, as the scheduler reads them
    return time.perf_counter() - t0


def main() -> None:
    slots = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    device = torch.device(sys.argv[2] if len(sys.argv) > 2 else "cuda")
    loaded = load_model("default")
    engine = from_config(loaded, EngineConfig(device=device.type, cuda_graph=device.type == "cuda"))
    suite = [encode_prompt(loaded.tokenizer, p.content) for p in categories_in_turn(load_suite())]
    prompts = [suite[i % len(suite)] for i in range(slots)]
    graphs = bool(engine.cuda_graph) and engine.layer_kernels == "triton"
    batch = BatchEngine(engine, BatchConfig(slots, 2048, False, graphs))
    batch.capture_graphs([1])
    print(f"{device_name(device)}: {slots} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens")
    together, alone, step = [], [], []
    for _ in range(4):
        together.append(timed(device, lambda: batch.admit_many(prompts)))
        step.append(timed(device, lambda: batch.advance(torch.zeros(slots, dtype=torch.long, device=device))))
        while batch.active:
            batch.release(batch.active - 1)
        alone.append(sum(timed(device, lambda p=p: batch.admit_many([p])) for p in prompts))
        while batch.active:
            batch.release(batch.active - 1)
    med = statistics.median
    print(f"all {slots} together: {1e3 * med(together):.2f} ms; one at a time: {1e3 * med(alone):.2f} ms "
          f"({1e3 * med(alone) / slots:.2f} ms each); a plain step of {slots} rows {1e3 * med(step):.3f} ms (first tokens read)")
    print("rounds together", [round(1e3 * t, 2) for t in together], "alone", [round(1e3 * t, 2) for t in alone])


if __name__ == "__main__":
    main()
