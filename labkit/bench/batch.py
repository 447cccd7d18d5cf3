"""`labkit bench batch`: throughput and latency against batch size, in one run.

For each batch size B, `requests_per_slot` x B prompts from the suite go through continuous
batching with B slots (greedy, EOS blocked until max_new_tokens, so every request has the same
length), once per mode (fast, and invariant: fixed tiles of rows, see labkit/batch/engine.py),
the modes and sizes taking turns. Per run: aggregate output tok/s (every new token over the wall
time), per-request decode tok/s, median inter-token latency, median time to first token, the mean
rows per step, and the share of requests whose tokens equal batch-1 plain greedy through
`generate` (the batch-invariance check at this size).

Speculation inside batches is not measured yet: the batched engine decodes greedily without
drafts (its crossover against plain is the next step).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from labkit.batch.engine import BatchConfig, BatchEngine
from labkit.batch.scheduler import BatchRequest, ContinuousBatcher
from labkit.bench.common import finish_log, run_params, start_log
from labkit.bench.results import provenance, warn_if_busy
from labkit.config import EngineConfig, GenerationConfig, device_name, dtype_name, resolve_device
from labkit.engine_build import from_config
from labkit.errors import LabkitError
from labkit.generate import generate
from labkit.models.loading import LoadedModel, load_model
from labkit.prompting import encode_prompt
from labkit.prompts import load_suite

GPU_SIZES = [1, 2, 4, 8, 16, 32, 64]
CPU_SIZES = [1, 2, 4, 8]


@dataclass
class BatchBenchConfig:
    model: str = "default"
    engine: EngineConfig = field(default_factory=EngineConfig)
    sizes: list[int] | None = None  # batch sizes; None: GPU_SIZES on a GPU, CPU_SIZES elsewhere
    modes: list[str] = field(default_factory=lambda: ["fast", "invariant"])
    max_new_tokens: int = 64
    requests_per_slot: int = 2  # requests per run = this x B
    max_seq_len: int = 1024  # positions per slot
    output_dir: str | None = "results"
    progress: bool = True

    def validate(self) -> None:
        self.engine.validate()
        if any(b < 1 for b in self.sizes or [1]) or self.max_new_tokens < 1 or self.requests_per_slot < 1:
            raise LabkitError("batch sizes, max new tokens and requests per slot must be at least 1")
        if not self.modes or set(self.modes) - {"fast", "invariant"}:
            raise LabkitError(f"modes are fast and invariant, got {','.join(self.modes)}")


def _run(batch: BatchEngine, prompts: list[list[int]], gen: GenerationConfig) -> tuple[list[BatchRequest], float, float]:
    batcher = ContinuousBatcher(batch)
    t0 = time.perf_counter()
    requests = [batcher.submit(p, gen) for p in prompts]
    batcher.run()
    return requests, time.perf_counter() - t0, batcher.rows_stepped / max(1, batcher.steps)


def _row(mode: str, size: int, requests: list[BatchRequest], wall: float, mean_rows: float, plain: list[list[int]]) -> dict[str, Any]:
    gaps = [b - a for r in requests for a, b in zip(r.token_times, r.token_times[1:], strict=False)]
    per_request = [(len(r.tokens) - 1) / (r.token_times[-1] - r.token_times[0]) for r in requests if len(r.tokens) > 1]
    return {"mode": mode, "batch": size, "requests": len(requests), "new_tokens": sum(len(r.tokens) for r in requests),
            "aggregate_tok_per_s": sum(len(r.tokens) for r in requests) / wall,
            "per_request_tok_per_s": statistics.median(per_request) if per_request else 0.0,
            "itl_ms_p50": 1000 * statistics.median(gaps) if gaps else 0.0,
            "ttft_ms_p50": 1000 * statistics.median(r.token_times[0] - r.submitted for r in requests),
            "mean_rows_per_step": mean_rows,
            "identical_to_batch_1": sum(r.tokens == p for r, p in zip(requests, plain, strict=True)) / len(requests)}


def run_batch_bench(cfg: BatchBenchConfig, loaded: LoadedModel | None = None) -> dict[str, Any]:
    cfg.validate()
    device = resolve_device(cfg.engine.device)
    sizes = sorted(set(cfg.sizes or (GPU_SIZES if device.type == "cuda" else CPU_SIZES)))
    log = start_log(cfg.output_dir, f"batch-{device.type}")  # before anything is measured
    loaded = loaded or load_model(cfg.model)
    engine = from_config(loaded, cfg.engine)
    suite = [encode_prompt(loaded.tokenizer, p.content) for p in load_suite()]
    need = max(sizes) * cfg.requests_per_slot
    prompts = [suite[i % len(suite)] for i in range(need)]
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.max_new_tokens)
    plain = [generate(engine, p, gen).tokens for p in tqdm(prompts, desc="batch-1 plain greedy", disable=not cfg.progress)]
    slot_len = min(cfg.max_seq_len, engine.max_seq_len)  # at most the model's context
    batches = {(m, b): BatchEngine(engine, BatchConfig(slots=b, max_seq_len=slot_len, invariant=m == "invariant"))
               for m in cfg.modes for b in sizes}
    _run(batches[(cfg.modes[0], sizes[0])], prompts[:1], GenerationConfig(max_new_tokens=2))  # warm-up
    runs = [(m, b) for b in sizes for m in cfg.modes]  # the modes take turns at each size
    rows = []
    for mode, size in tqdm(runs, desc="bench batch", disable=not cfg.progress):
        n = size * cfg.requests_per_slot
        requests, wall, mean_rows = _run(batches[(mode, size)], prompts[:n], gen)
        row = _row(mode, size, requests, wall, mean_rows, plain[:n])
        rows.append(row)
        if log:
            log.add(row)
    params = run_params(cfg)
    params.update(model_source=loaded.source, device_resolved=str(device), dtype_resolved=dtype_name(engine.dtype), sizes_resolved=sizes,
                  weights=engine.weights, slot_len=slot_len, speculation="none (batched speculation is not measured yet)")
    payload: dict[str, Any] = {"benchmark": "batch", **provenance(device, params), "card": device_name(device), "summary": rows}
    finish_log(log, payload, rows)
    payload["rows"] = rows
    warn_if_busy()
    return payload


def batch_report(payload: dict[str, Any]) -> list[str]:
    out = [f"{payload['card']}: continuous batching, greedy, {payload['parameters']['max_new_tokens']} new tokens per request"]
    out.append(f"{'mode':<10} {'batch':>5} {'aggregate tok/s':>16} {'per request':>12} {'ITL ms':>8} {'TTFT ms':>8} {'rows/step':>9} {'= batch 1':>9}")
    base = {r["mode"]: r["aggregate_tok_per_s"] for r in payload["summary"] if r["batch"] == min(x["batch"] for x in payload["summary"])}
    for r in payload["summary"]:
        gain = r["aggregate_tok_per_s"] / base[r["mode"]]
        out.append(f"{r['mode']:<10} {r['batch']:>5} {r['aggregate_tok_per_s']:>9.1f} ({gain:4.2f}x) {r['per_request_tok_per_s']:>12.1f} "
                   f"{r['itl_ms_p50']:>8.1f} {r['ttft_ms_p50']:>8.1f} {r['mean_rows_per_step']:>9.2f} {r['identical_to_batch_1']:>9.0%}")
    return out
