"""`labkit bench batch`: throughput and latency against batch size, plain and speculative, in one run.

Systems, each at every batch size B (the systems take turns at each size):
- plain: continuous batching, greedy, one token per row per step;
- plain-invariant: the same in invariant mode (fixed tiles of rows: a row's bits do not depend on
  its batch; labkit/batch/engine.py);
- ngram-K (with --drafter ngram): every row drafts up to K tokens by prompt lookup and all rows are
  verified in one batched pass (one K for the batch);
- ngram-auto-K: the same with K chosen per step from 0, K/2 and K by measured throughput, per rows
  bucket (batch/controller.py): plain steps where drafting stops paying. One controller serves the
  system at every size, as a server's lives across its load (the untimed run at each size is its
  warm-up: a few steps of every K per rows bucket); the share of steps its timed run gave each K is
  reported (`k_steps`), so the best K's move with the batch size can be read off.
- ngram-device-K, ngram-device-auto-K (K chosen like ngram-auto-K's): the drafting steps as chunks of
  prompt lookup drafted, verified and accepted on the device, the host reading once per chunk
  (batch/lookup.py; the lookup's rule is the kernels', n-grams of 3 down to 1 tokens, always K).
- eagle-device-K (with --heads, a trained EAGLE head): the same chunks, each row's drafts the EAGLE
  chain drafted inside the step before's batched verify (batch/eagle.py); eagle-mix-device-K the
  same with prompt lookup's copy where a row's context ends in a bigram seen before (eagle-mix's rule);
  eagle-device-auto-K the EAGLE chunks with K chosen like ngram-auto-K's (plain where they stop
  paying; rows back from plain steps are loaded again, a pass over their context each).
  A chain is at most the head's depth: with K past it, eagle-device runs at the depth (its name says
  which K) and eagle-mix-device at K (copies fill the columns a chain leaves).

Each run sends max(`requests_per_slot` x B, `min_requests`) prompts from the suite through B slots,
its categories taken in turn, so that every run sees every category it has room for (the suite lists
its prompts category by category: taken in that order, batch 1 and 2 had run writing prompts alone,
and a size's ratio said as much about its categories as about its batch), or with `prompt_tokens`
long prompts of that many tokens (a RAG or summarisation request: documents, each prompt opening
with another, then the request); greedy, EOS blocked
until max_new_tokens, so every request has the same length (with `length_spread`, lengths drawn around it,
`request_lengths`: rows that end apart, as a serving load's do). At each size every system first runs
once untimed, then `repeats` timed runs (3 on a GPU), the systems taking turns; a row is a system's
median run by aggregate tok/s (every run's figure beside it), so one run disturbed by the machine
moves no ratio. Per run: aggregate output tok/s (every new token over the wall time), output tok/s
while every slot was busy (`busy_tok_per_s`: the drain at the end left out, which speculative rows
pay and plain's equal rows do not), per-request decode tok/s, median inter-token latency (the gap
between tokens' arrivals at the host: for ngram-device systems, between chunks) and time to first
token, mean rows per step, tau (tokens per row per step), and two identities: with batch-1 plain
greedy through `generate`, and with the same system run one request at a time.

The speedup model at batch B (batch_model.py): speculation pays tau(B) tokens per step, so it
predicts tau(B) x t_plain(B) / t_draft(B), with the scheduler's plain and drafting steps timed on
their own over B busy slots (the host's work included, which a step of the device alone leaves
out; that ratio is reported beside it). Its crossover (the first batch size where it predicts below 1) is set
beside the measured one (the first where ngram-K's aggregate tok/s falls below plain's).
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from labkit.batch.controller import BatchKController
from labkit.batch.eagle import device_eagles
from labkit.batch.engine import BatchConfig, BatchEngine
from labkit.batch.lookup import BatchLookup, device_lookups
from labkit.batch.scheduler import BatchRequest, ContinuousBatcher
from labkit.bench.batch_model import crossover, predicted_speedups, step_costs
from labkit.bench.batch_report import plot_batch
from labkit.bench.common import finish_log, run_params, start_log
from labkit.bench.results import provenance, warn_if_busy
from labkit.config import EngineConfig, GenerationConfig, device_name, dtype_name, resolve_device
from labkit.engine_build import from_config
from labkit.errors import LabkitError
from labkit.generate import generate
from labkit.metrics.timers import collector_paused
from labkit.models.loading import LoadedModel, load_model
from labkit.prompting import encode_prompt
from labkit.prompts import Prompt, load_suite
from labkit.prompts.long import documents, long_prompt
from labkit.specdec.drafters import NgramDrafter
from labkit.specdec.eagle import load_eagle, load_eagle_config
from labkit.specdec.eagle_mix import MIX_MIN_N
from labkit.specdec.heads import fingerprint

GPU_SIZES = [1, 2, 4, 8, 16, 32, 64]
CPU_SIZES = [1, 2, 4, 8]


@dataclass
class BatchBenchConfig:
    model: str = "default"
    engine: EngineConfig = field(default_factory=EngineConfig)
    sizes: list[int] | None = None  # batch sizes; None: GPU_SIZES on a GPU, CPU_SIZES elsewhere
    invariant: bool = True  # also plain decoding in invariant mode
    drafter: str = "ngram"  # "ngram" (prompt lookup in every row) or "none"
    heads: str | None = None  # a trained EAGLE head's folder: also eagle-device-K and eagle-mix-device-K (batch/eagle.py)
    k: int = 3  # draft tokens per row and step
    max_new_tokens: int = 64
    length_spread: float = 0.0  # > 0: each request's new tokens drawn (seeded) from max_new_tokens x [1 - s, 1 + s] (`request_lengths`)
    requests_per_slot: int = 2  # requests per run = this x B ...
    min_requests: int = 8  # ... and at least this many (one per category of the suite)
    prompt_tokens: int = 0  # > 0: every prompt a long one of this many tokens (documents, then a request to summarise them; each opening with another document) instead of the suite's
    repeats: int | None = None  # timed runs of each system at each size, taking turns (a row: the median run); None: 3 on a GPU, 1 on a CPU
    max_seq_len: int = 1024  # positions per slot
    output_dir: str | None = "results"
    progress: bool = True

    def validate(self) -> None:
        self.engine.validate()
        if any(b < 1 for b in self.sizes or [1]) or self.max_new_tokens < 1 or self.requests_per_slot < 1 or (self.repeats or 1) < 1 \
                or self.min_requests < 1:
            raise LabkitError("batch sizes, max new tokens, requests per slot, min requests and repeats must be at least 1")
        if not 0 <= self.length_spread < 1:
            raise LabkitError(f"the length spread is a share of max new tokens from 0 up to 1 (got {self.length_spread})")
        if self.prompt_tokens < 0 or self.prompt_tokens + round(self.max_new_tokens * (1 + self.length_spread)) + self.k >= self.max_seq_len:
            raise LabkitError(f"a slot of {self.max_seq_len} positions cannot hold a {self.prompt_tokens}-token prompt, {self.max_new_tokens} "
                              f"new tokens and {self.k} drafts (raise --slot-len)")
        if self.drafter not in ("ngram", "none") or not 1 <= self.k <= 16:
            raise LabkitError(f"the batched drafter is ngram or none, with K from 1 to 16 (got {self.drafter}, K {self.k})")
        if self.heads:
            load_eagle_config(self.heads)  # a folder without a head: one clear error before anything runs


@dataclass(frozen=True)
class System:
    name: str
    invariant: bool
    k: int  # 0: plain
    auto: bool = False  # K chosen per step from 0..k by measured throughput (batch/controller.py)
    device: bool = False  # drafting steps as chunks of prompt lookup on the device (batch/lookup.py)
    eagle: bool = False  # ... of EAGLE chains drafted inside each verify (batch/eagle.py)
    copy_after: int = 0  # ... or prompt lookup's copy after an n-gram of this many tokens seen before (eagle-mix)


def request_lengths(max_new_tokens: int, spread: float, count: int) -> list[int]:
    """Each request's new tokens: max_new_tokens, or with spread s > 0 drawn uniformly from max_new_tokens x [1 - s, 1 + s]
    (mean max_new_tokens; seeded, so every system and size runs the same requests). Equal lengths let plain's rows finish
    together where speculative rows finish apart and drain; a serving load's requests end apart whatever decodes them."""
    rng = random.Random(0)
    return [max(1, round(max_new_tokens * (1 - spread + 2 * spread * rng.random()))) if spread else max_new_tokens for _ in range(count)]


def categories_in_turn(prompts: list[Prompt]) -> list[Prompt]:
    """The prompts reordered so that their categories take turns: the first of each category, then
    the second of each, and so on (each category's own order kept)."""
    by_category: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_category.setdefault(p.category, []).append(p)
    return [p for turn in itertools.zip_longest(*by_category.values()) for p in turn if p is not None]


def _systems(cfg: BatchBenchConfig) -> list[System]:
    out = [System("plain", False, 0)]
    if cfg.invariant:
        out.append(System("plain-invariant", True, 0))
    if cfg.drafter == "ngram":
        out += [System(f"ngram-{cfg.k}", False, cfg.k), System(f"ngram-auto-{cfg.k}", False, cfg.k, auto=True),
                System(f"ngram-device-{cfg.k}", False, cfg.k, device=True), System(f"ngram-device-auto-{cfg.k}", False, cfg.k, auto=True, device=True)]
    if cfg.heads:
        chain_k = min(cfg.k, load_eagle_config(cfg.heads).depth)  # a chain is at most the head's depth; eagle-mix's copies go past it
        out += [System(f"eagle-device-{chain_k}", False, chain_k, device=True, eagle=True),
                System(f"eagle-device-auto-{chain_k}", False, chain_k, auto=True, device=True, eagle=True),
                System(f"eagle-mix-device-{cfg.k}", False, cfg.k, device=True, eagle=True, copy_after=MIX_MIN_N)]
    return out


def _run(batch: BatchEngine, system: System, prompts: list[list[int]], gens: list[GenerationConfig],
         controller: BatchKController | None = None, lookups: list[BatchLookup] | None = None) -> tuple[list[BatchRequest], float, float]:
    batcher = ContinuousBatcher(batch, (lambda: NgramDrafter(3, 1)) if system.k else None, system.k, controller, lookup=lookups)
    t0 = time.perf_counter()
    requests = [batcher.submit(p, gen) for p, gen in zip(prompts, gens, strict=True)]
    batcher.run()
    return requests, time.perf_counter() - t0, batcher.rows_stepped / max(1, batcher.steps)


def _timed_run(batch: BatchEngine, system: System, prompts: list[list[int]], gens: list[GenerationConfig],
               controller: BatchKController | None, lookups: list[BatchLookup] | None) -> tuple[list[BatchRequest], float, float, dict[int, int] | None]:
    """_run, with the garbage collector paused (`collector_paused`); with a controller, also the
    steps this run gave each K."""
    before = controller.steps_by_k() if controller else {}
    with collector_paused():
        requests, wall, mean_rows = _run(batch, system, prompts, gens, controller, lookups)
    return requests, wall, mean_rows, {k: v - before.get(k, 0) for k, v in controller.steps_by_k().items()} if controller else None


def _row(system: System, size: int, requests: list[BatchRequest], wall: float, mean_rows: float,
         plain: list[list[int]], own: list[list[int]]) -> dict[str, Any]:
    gaps = [b - a for r in requests for a, b in zip(r.token_times, r.token_times[1:], strict=False) if b > a]
    per_request = [(len(r.tokens) - 1) / (r.token_times[-1] - r.token_times[0]) for r in requests if r.token_times[-1] > r.token_times[0]]
    steps = sum(r.verify_steps for r in requests)
    return {"system": system.name, "batch": size, "k": system.k, "invariant": system.invariant, "requests": len(requests),
            "new_tokens": sum(len(r.tokens) for r in requests),
            "aggregate_tok_per_s": sum(len(r.tokens) for r in requests) / wall,
            "per_request_tok_per_s": statistics.median(per_request) if per_request else 0.0,
            "itl_ms_p50": 1000 * statistics.median(gaps) if gaps else 0.0,
            "ttft_ms_p50": 1000 * statistics.median(r.token_times[0] - r.submitted for r in requests),
            "busy_tok_per_s": busy_tok_per_s(requests, size),
            "mean_rows_per_step": mean_rows,
            "tau": sum(len(r.tokens) - 1 for r in requests) / max(1, steps),  # tokens per row per batched step
            "acceptance_rate": sum(r.accepted for r in requests) / max(1, sum(r.drafted for r in requests)),
            "identical_to_batch_1": sum(r.tokens == p for r, p in zip(requests, plain, strict=True)) / len(requests),
            "identical_to_own_batch_1": sum(r.tokens == p for r, p in zip(requests, own, strict=True)) / len(requests)}


def busy_tok_per_s(requests: list[BatchRequest], size: int) -> float | None:
    """Output tok/s while all `size` slots were busy: from the moment the size-th request had its
    first token (every slot filled) to the first finish after the last request had its first (a
    slot freed with nothing left to take it: the drain begins). A run's aggregate counts the drain,
    and with every request the same length plain's rows finish together while speculative rows,
    whose steps keep different counts of tokens, finish apart and drain with fewer rows (a serving
    load that keeps coming has no drain). None where the slots were never all busy."""
    firsts = sorted(r.token_times[0] for r in requests if r.token_times)
    if len(firsts) < size:
        return None
    start = firsts[size - 1]
    end = min((r.token_times[-1] for r in requests if r.token_times and r.token_times[-1] > firsts[-1]), default=firsts[-1])
    tokens = sum(start < t <= end for r in requests for t in r.token_times)
    return tokens / (end - start) if end > start and tokens else None


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median aggregate tok/s (the lower middle one of an even count), with every
    run's aggregate tok/s beside it and whether every run's tokens were identical to batch 1."""
    ordered = sorted(runs, key=lambda r: r["aggregate_tok_per_s"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["aggregate_tok_per_s_runs"] = [r["aggregate_tok_per_s"] for r in runs]
    for key in ("identical_to_batch_1", "identical_to_own_batch_1"):
        row[key] = min(r[key] for r in runs)
    return row


def run_batch_bench(cfg: BatchBenchConfig, loaded: LoadedModel | None = None) -> dict[str, Any]:
    cfg.validate()
    device = resolve_device(cfg.engine.device)
    sizes = sorted(set(cfg.sizes or (GPU_SIZES if device.type == "cuda" else CPU_SIZES)))
    repeats = cfg.repeats or (3 if device.type == "cuda" else 1)
    log = start_log(cfg.output_dir, f"batch-{device.type}")  # before anything is measured
    loaded = loaded or load_model(cfg.model)
    engine = from_config(loaded, cfg.engine)
    head = load_eagle(cfg.heads, fingerprint(engine.model.lm_head.weight)) if cfg.heads else None

    if cfg.prompt_tokens:
        suite = [long_prompt(loaded.tokenizer, cfg.prompt_tokens, start=i) for i in range(len(documents()))]
    else:
        suite = [encode_prompt(loaded.tokenizer, p.content) for p in categories_in_turn(load_suite())]
    prompts = [suite[i % len(suite)] for i in range(max(max(sizes) * cfg.requests_per_slot, cfg.min_requests))]
    gens = [GenerationConfig(max_new_tokens=n, min_new_tokens=n) for n in request_lengths(cfg.max_new_tokens, cfg.length_spread, len(prompts))]
    systems = _systems(cfg)  # (with a head, its eagle.json read once)
    bar = tqdm(desc="bench batch", total=len(prompts) * (1 + len(systems)) + len(sizes) * len(systems) * (1 + repeats), disable=not cfg.progress)
    plain = []
    for p, gen in zip(prompts, gens, strict=True):
        plain.append(generate(engine, p, gen).tokens)
        bar.update()
    slot_len = min(cfg.max_seq_len, engine.max_seq_len - 16)  # at most the model's context, less the graphs' headroom
    graphs = bool(engine.cuda_graph) and engine.layer_kernels == "triton"  # batched steps as CUDA graphs per rows bucket
    batches = {(s, b): BatchEngine(engine, BatchConfig(b, slot_len, s.invariant, graphs and not s.invariant)) for s in systems for b in sizes}
    # one per system, across sizes
    controllers = {s: BatchKController.for_eagle(s.k) if s.eagle else BatchKController(s.k) for s in systems if s.auto}
    drafting_ks = {s: controllers[s].candidates if s.auto else [s.k] for s in systems if s.device}  # a device system's K with steps of their own

    def device_steps(s: System, batch: BatchEngine) -> list[BatchLookup]:  # a device system's steps: prompt lookup's or EAGLE's
        if s.eagle:
            assert head is not None
            return device_eagles(batch, head, drafting_ks[s], s.copy_after)
        return device_lookups(batch, drafting_ks[s])

    lookups = {key: device_steps(key[0], batch) for key, batch in batches.items() if key[0].device}  # kept across runs: their captured steps
    for (s, _), batch in batches.items():  # every step shape captured before anything is timed (after EAGLE's: the model keeps hidden states)
        batch.capture_graphs(list(range(1, s.k + 2)))
    own = {}
    for s in systems:  # each system one request at a time: its own batch-1 tokens
        one = batches[(s, sizes[0])] if sizes[0] == 1 else BatchEngine(engine, BatchConfig(1, slot_len, s.invariant, graphs and not s.invariant))
        requests, _, _ = _run(one, s, prompts, gens, controllers.get(s), lookups.get((s, 1)) or (device_steps(s, one) if s.device else None))
        own[s] = [r.tokens for r in requests]
        bar.update(len(prompts))
    rows, costs = [], {}
    for size in sizes:
        n = max(size * cfg.requests_per_slot, cfg.min_requests)
        for s in systems:  # untimed: first passes at this size, and a controller's first tries
            _run(batches[(s, size)], s, prompts[:n], gens[:n], controllers.get(s), lookups.get((s, size)))
            bar.update()
        runs: dict[System, list[dict[str, Any]]] = {s: [] for s in systems}
        for _ in range(repeats):  # the systems take turns, so that a drift of the machine's speed reaches each alike
            for s in systems:
                requests, wall, mean_rows, k_steps = _timed_run(batches[(s, size)], s, prompts[:n], gens[:n], controllers.get(s), lookups.get((s, size)))
                row = _row(s, size, requests, wall, mean_rows, plain[:n], own[s][:n])
                if k_steps is not None:
                    row["k_steps"] = k_steps
                    row["k_rates"] = controllers[s].rates()  # per rows bucket, each K's tokens/s as the controller saw them
                    row["k_costs"] = controllers[s].costs()  # ... and what they rest on: steps, fill, switches, acceptance
                runs[s].append(row)
                bar.update()
        for s in systems:
            row = median_run(runs[s])
            rows.append(row)
            if log:
                log.add(row)
        if cfg.drafter != "none":
            drafting = next(s for s in systems if s.k == cfg.k and not s.auto and not s.device)  # host drafting; its engine has every width captured
            costs[size] = step_costs(batches[(drafting, size)], prompts, cfg.k, lambda: NgramDrafter(3, 1))
    bar.close()
    model = predicted_speedups(rows, costs, cfg.k) if cfg.drafter != "none" else []
    params = run_params(cfg)
    params.update(model_source=loaded.source, device_resolved=str(device), dtype_resolved=dtype_name(engine.dtype), sizes_resolved=sizes,
                  weights=engine.weights, slot_len=slot_len, layer_kernels=engine.layer_kernels, batched_graphs=graphs)
    payload: dict[str, Any] = {"benchmark": "batch", **provenance(device, params), "card": device_name(device), "summary": rows,
                               "speedup_model": model, "crossover_measured": crossover(model, "measured_speedup") if model else None,
                               "crossover_predicted": crossover(model, "predicted_speedup") if model else None}
    files = finish_log(log, payload, rows)
    if files:
        png = str(Path(files[0]).with_suffix(".png"))
        plot_batch(payload, png)
        files.append(png)
    payload["rows"] = rows
    warn_if_busy()
    return payload
