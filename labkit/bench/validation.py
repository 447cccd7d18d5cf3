"""CUDA validation (phase 3D): every way of decoding the same prompts, in one run.

Systems (greedy, batch 1, the same prompts and length):
- hf_generate: transformers `generate`, eager;
- hf_assisted_<drafter>: transformers' own speculative decoding with the same kind of draft:
  prompt lookup for ngram, `assistant_early_exit` for layerskip, the truncated copy of the
  model as `assistant_model` for truncated; fixed K (the labkit drafter's best K);
- labkit_plain: our engine, eager steps (like HF, on the first prompts of each category only);
- labkit_graph: our engine with CUDA graphs (and torch.compile'd steps) — CUDA only;
- labkit_fused: CUDA graphs over our fused Triton layers (five kernels a layer) — CUDA only;
- labkit_<drafter>: speculative greedy on the fastest labkit engine that carries every drafter asked for (timed on the tuning prompts),
  each drafter at its best K, chosen in a tuning pass over the first prompt of each category.

Each is reported as tok/s, speed-up over HF generate and over labkit's fastest plain decoding,
and as a share of the weight-bandwidth roofline: the device's copy bandwidth (measured in the
same run) over the bytes of weights one decode step must read. Speculative systems can pass
100%: they emit several tokens per read of the weights.

Every output is compared with labkit's fastest plain greedy. Where tokens differ, `explain`
looks at the first differing position: in bf16, two candidates whose logits lie within a few
bf16 steps of each other are a near-tie that different kernel orderings may break either way.
"""

from __future__ import annotations

import copy
import itertools
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from labkit.bench.common import finish_log, rotated, run_params, start_log, time_hf_generate
from labkit.bench.divergence import explain
from labkit.bench.kernels import copy_bandwidth
from labkit.bench.results import RowLog, provenance, warn_if_busy
from labkit.config import DRAFTERS, GenerationConfig, device_name, dtype_name, resolve_device, resolve_dtype
from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.generate import GenerationResult, Speculation, encode_prompt, generate, warm_up
from labkit.models.loading import LoadedModel, load_model
from labkit.prompts import Prompt, load_suite
from labkit.prompts.long import long_prompt
from labkit.specdec.drafters import Drafter, build_drafter
from labkit.specdec.heads import check_heads_option


@dataclass
class ValidationConfig:
    model: str = "default"
    device: str = "auto"
    dtype: str = "auto"  # bf16 on CUDA
    max_new_tokens: int = 128
    fixed_length: bool = True  # EOS blocked until max_new_tokens, so every system emits the same count
    categories: list[str] | None = None  # None: every category
    prompts_per_category: int | None = None  # None: the whole suite
    long_prompts: list[int] = field(default_factory=list)  # also long prompts of these token counts (category "long", prompts/long.py)
    slow_prompts_per_category: int | None = 1  # HF systems and eager labkit are slow: the first N per category (None: all)
    drafters: list[str] = field(default_factory=lambda: ["ngram", "layerskip", "truncated"])
    ks: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 6, 8])  # tried in the tuning pass
    layers: int | None = None  # layerskip / truncated depth (default: a third of the model)
    compile: bool = True  # torch.compile'd steps inside the CUDA graphs (CUDA only)
    fused: bool = True  # also CUDA graphs over the fused Triton layers (CUDA with triton only)
    hf_assisted: bool = True
    heads: str | None = None  # draft heads folder (python -m labkit heads train [--kind eagle]), for "heads" and "eagle"
    explain_limit: int = 40  # differing outputs to analyse at most
    time_budget_s: float | None = None  # start no new prompt after this long (the rest are reported as not run); the slow systems run last
    output_dir: str | None = "results"
    progress: bool = True

    def validate(self) -> None:
        if self.max_new_tokens < 2:
            raise LabkitError(f"max_new_tokens must be at least 2, got {self.max_new_tokens}")
        if not self.ks or min(self.ks) < 1:
            raise LabkitError(f"every K must be at least 1, got {self.ks}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise LabkitError(f"time_budget_s must be positive, got {self.time_budget_s}")
        if any(n < 1 for n in self.long_prompts):
            raise LabkitError(f"long prompt lengths must be positive, got {self.long_prompts}")
        for name in ("prompts_per_category", "slow_prompts_per_category"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LabkitError(f"{name} must be at least 1 (or None for all), got {value}")
        kinds = [d for d in DRAFTERS if d != "model"]  # drafts from the target itself (or no weights)
        unknown = set(self.drafters) - set(kinds)
        if unknown:
            raise LabkitError(f"unknown drafter(s) {sorted(unknown)}: use {', '.join(kinds)}")
        check_heads_option(self.drafters, self.heads)


def weight_bytes_per_token(engine: Engine) -> int:
    """Bytes of weights one decode step reads: every parameter once (a tied head once), except
    the embedding table when untied (a step reads one row of it)."""
    model = engine.model
    seen: set[int] = set()
    total = 0
    embed = getattr(model, "embed", None) or getattr(model, "wte", None)
    head = getattr(model, "lm_head", None)
    tied = embed is not None and head is not None and embed.weight.data_ptr() == head.weight.data_ptr()
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if embed is not None and p is embed.weight and not tied:
            total += p.shape[-1] * p.element_size()
            continue
        total += p.numel() * p.element_size()
    return total


def hf_truncated(hf_model: Any, depth: int) -> Any:
    """A copy of the HF model with its first `depth` layers: transformers' assistant for the truncated drafter."""
    small = copy.deepcopy(hf_model)
    small.model.layers = small.model.layers[:depth]
    small.config.num_hidden_layers = depth
    if getattr(small.config, "layer_types", None):
        small.config.layer_types = small.config.layer_types[:depth]
    return small


HF_ASSISTED = ("ngram", "layerskip", "truncated")  # drafters transformers' assisted generation has a kind of


def time_hf_assisted(hf_model: Any, kind: str, k: int, depth: int, assistant: Any, prompt_ids: list[int],
                     gen: GenerationConfig, device: torch.device) -> tuple[list[int], float]:
    """transformers' assisted generate (prompt lookup, early exit or an assistant model) at K."""
    kwargs: dict[str, Any] = {"num_assistant_tokens": k, "num_assistant_tokens_schedule": "constant", "assistant_confidence_threshold": 0.0}
    if kind == "ngram":
        kwargs = {"prompt_lookup_num_tokens": k, "max_matching_ngram_size": 3}
    elif kind == "layerskip":
        kwargs["assistant_early_exit"] = depth
    else:
        kwargs["assistant_model"] = assistant
        assistant.generation_config.num_assistant_tokens = k
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
    return time_hf_generate(hf_model, prompt_ids, gen, device, **kwargs)


def _row(system: str, result_tokens: list[int], seconds: float, reference: list[int], base: dict[str, Any],
         stats: GenerationResult | None = None) -> dict[str, Any]:
    row = {**base, "system": system, "new_tokens": len(result_tokens), "seconds": seconds,
           "tok_per_s": len(result_tokens) / seconds, "identical_to_plain": result_tokens == reference}
    if stats is not None:
        row.update(acceptance_rate=stats.stats.acceptance_rate, tau=stats.stats.tau)
    return row


def _prompts(cfg: ValidationConfig, tokenizer: Any) -> tuple[list[tuple[Prompt, list[int]]], set[str]]:
    """The suite's prompts (and long ones: documents cut to n tokens, then a request to summarise
    them), encoded; and the ids of those the slow systems also run."""
    try:
        suite = load_suite(cfg.categories, cfg.prompts_per_category)
    except ValueError as err:
        raise LabkitError(str(err)) from None
    prompts = [(p, encode_prompt(tokenizer, p.content)) for p in suite]
    for n in cfg.long_prompts:
        ids = long_prompt(tokenizer, n)
        prompts.append((Prompt(f"long-{n}", "long", tokenizer.decode(ids)), ids))
    slow_ids = {p.id for p in load_suite(cfg.categories, cfg.slow_prompts_per_category)}
    slow_ids |= {f"long-{n}" for n in cfg.long_prompts[: cfg.slow_prompts_per_category or None]}
    return prompts, slow_ids


def _engines(cfg: ValidationConfig, loaded: LoadedModel, device: torch.device, dtype: torch.dtype) -> dict[str, Engine]:
    """Plain eager labkit; on CUDA also CUDA graphs (compiled if asked) and graphs over the fused layers."""
    engines = {"labkit_plain": Engine.from_loaded(loaded, device, dtype, weights="dense", cuda_graph=False, layer_kernels="torch")}
    if device.type == "cuda":
        engines["labkit_graph"] = Engine.from_loaded(loaded, device, dtype, weights="dense", cuda_graph=True, compile=cfg.compile,
                                                     layer_kernels="torch")
        if cfg.fused:
            fused = Engine.from_loaded(loaded, device, dtype, weights="dense", cuda_graph=True, layer_kernels="auto")
            if fused.layer_kernels == "triton":
                engines["labkit_fused"] = fused
    return engines


class _Validation:
    """One validation run's systems and state: labkit's engines and drafters (each drafter at
    the K tuned for it), transformers with and without assisted generation, the reference
    output every system is compared with, and the rows."""

    def __init__(self, cfg: ValidationConfig, loaded: LoadedModel, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg, self.loaded, self.device, self.dtype = cfg, loaded, device, dtype
        self.t_start = time.perf_counter()
        self.prompts, self.slow_ids = _prompts(cfg, loaded.tokenizer)
        self.gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.max_new_tokens if cfg.fixed_length else 0)
        self.engines = _engines(cfg, loaded, device, dtype)
        self.hf_model = copy.deepcopy(loaded.hf_model).to(device=device, dtype=dtype).eval()
        self.warm = self.prompts[0][1] * 2  # a repeated prompt, so that the n-gram drafter proposes
        # and each long prompt: its attention span is a shape of its own (Triton compiles it, graphs are captured for it);
        # the first system to meet it paid seconds for that (eagle-mix at 1,024 tokens: 53 tok/s, then 2,026)
        self.warm_long = [ids for p, ids in self.prompts if p.category == "long"]
        self.rows: list[dict[str, Any]] = []
        self.pending: list[tuple[str, list[int], list[int], list[int], str]] = []  # outputs that differ, for explain
        self.references: dict[str, list[int]] = {}  # labkit's fastest plain greedy: what every output is compared with
        self.best_k: dict[str, int] = {}
        self.passed_over: dict[str, str] = {}  # plain engines faster than the one chosen that cannot carry a drafter: why
        self.tuning: list[dict[str, Any]] = []

    def warm_up(self) -> None:
        """Every engine, graph and compiled shape before anything is timed."""
        for engine in self.engines.values():
            if engine.cuda_graph:
                warm_up(engine, max(self.cfg.ks))
            for ids in (self.warm, *self.warm_long):
                generate(engine, ids, GenerationConfig(max_new_tokens=8))
        time_hf_generate(self.hf_model, self.warm, GenerationConfig(max_new_tokens=4), self.device)

    def pick_fast(self) -> None:
        """The fastest plain engine carries the drafters: timed on the first prompt of each category."""
        cfg = self.cfg
        self.tune = [(p, ids) for p, ids in self.prompts if p.id in {q.id for q in load_suite(cfg.categories, 1)}]  # the suite's, not the long ones
        candidates = [name for name, e in self.engines.items() if e.cuda_graph] or list(self.engines)
        self.plain_speed = {name: statistics.fmean(generate(self.engines[name], ids, self.gen).stats.tok_per_s for _, ids in self.tune)
                            for name in candidates} if len(candidates) > 1 else {}
        ranked = sorted(candidates, key=lambda name: -self.plain_speed.get(name, 0.0))
        self.fastest = ranked[0]  # speedups are against it, even where the drafters ride a slower engine
        self.depth = cfg.layers if cfg.layers is not None else max(1, self.engines[ranked[0]].args.n_layers // 3)
        for i, name in enumerate(ranked):  # the fastest that carries every drafter asked for (dynamic trees: fused layers)
            try:
                self.drafters: dict[str, Drafter] = {kind: build_drafter(kind, self.engines[name], layers=self.depth, heads_path=cfg.heads)
                                                     for kind in cfg.drafters}
            except LabkitError as error:
                if i == len(ranked) - 1:
                    raise
                self.passed_over[name] = str(error)
                continue
            self.fast_name, self.fast = name, self.engines[name]
            break
        for drafter in self.drafters.values():  # heads and EAGLE keep hidden states and draft inside the verify: capture again
            if drafter.verify_hook is not None and self.fast.cuda_graph:
                warm_up(self.fast, max(cfg.ks), drafter=drafter)
        self.assistant = hf_truncated(self.hf_model, self.depth) if cfg.hf_assisted and "truncated" in cfg.drafters else None
        for drafter in self.drafters.values():
            for k, ids in itertools.product(cfg.ks, (self.warm, *self.warm_long)):
                generate(self.fast, ids, GenerationConfig(max_new_tokens=16), Speculation(drafter, k))

    def tune_k(self) -> None:
        """Each drafter's best K on the first prompt of each category."""
        for kind, drafter in self.drafters.items():
            speed = {}
            for k in self.cfg.ks:
                speed[k] = statistics.fmean(generate(self.fast, ids, self.gen, Speculation(drafter, k)).stats.tok_per_s for _, ids in self.tune)
                self.tuning.append({"drafter": kind, "k": k, "tok_per_s": speed[k]})
            self.best_k[kind] = max(speed, key=lambda k: speed[k])

    def systems(self) -> tuple[list[str], list[str]]:
        """Two passes, so that a time budget cuts the slow systems, not the suite: first every
        prompt with labkit's graph engines and drafters (a second or two each), then the slow
        systems (transformers, eager labkit) on the first prompts of each category."""
        cfg = self.cfg
        fast = [*(name for name in self.engines if name == self.fast_name or self.engines[name].cuda_graph), *(f"labkit_{d}" for d in cfg.drafters)]
        # transformers' assisted generation has prompt lookup (hf_assisted_ngram) and draft models, no heads, EAGLE or trees
        assisted = [f"hf_assisted_{d}" for d in (cfg.drafters if cfg.hf_assisted else []) if d in HF_ASSISTED]
        return fast, ["hf_generate", *assisted, *(name for name in self.engines if name not in fast)]

    def out_of_time(self, i: int) -> bool:
        """Checked between prompts; the first prompt of a pass always runs."""
        budget = self.cfg.time_budget_s
        return budget is not None and i > 0 and time.perf_counter() - self.t_start > budget

    def run(self, system: str, prompt: Any, ids: list[int], log: RowLog | None) -> None:
        base = {"prompt_id": prompt.id, "category": prompt.category, "prompt_tokens": len(ids)}
        reference, gen = self.references[prompt.id], self.gen
        if system == "hf_generate":
            tokens, seconds = time_hf_generate(self.hf_model, ids, gen, self.device)
            row = _row(system, tokens, seconds, reference, base)
        elif system.startswith("hf_assisted_"):
            kind = system.removeprefix("hf_assisted_")
            tokens, seconds = time_hf_assisted(self.hf_model, kind, self.best_k[kind], self.depth, self.assistant, ids, gen, self.device)
            row = {**_row(system, tokens, seconds, reference, base), "k": self.best_k[kind]}
        elif system in self.engines:
            result = generate(self.engines[system], ids, gen)
            tokens = result.tokens
            row = _row(system, tokens, result.stats.total_s, reference, base, result)
        else:
            kind = system.removeprefix("labkit_")
            result = generate(self.fast, ids, gen, Speculation(self.drafters[kind], self.best_k[kind]))
            tokens = result.tokens
            row = {**_row(system, tokens, result.stats.total_s, reference, base, result), "k": self.best_k[kind]}
        self.rows.append(row)
        if log:
            log.add(row)
        if not row["identical_to_plain"]:
            self.pending.append((system, ids, reference, tokens, prompt.id))

    def run_passes(self, log: RowLog | None) -> dict[str, Any] | None:
        """Both passes; what a time budget left out (None when everything ran)."""
        fast_systems, slow_systems = self.systems()
        prompts = self.prompts
        done = len(prompts)
        for i, (prompt, ids) in enumerate(tqdm(prompts, desc="validation", disable=not self.cfg.progress)):
            if self.out_of_time(i):
                done = i
                break
            self.references[prompt.id] = generate(self.fast, ids, self.gen).tokens
            for system in rotated(fast_systems, i):
                self.run(system, prompt, ids, log)
        slow = [(p, ids) for p, ids in prompts[:done] if p.id in self.slow_ids]
        slow_done = len(slow)
        for j, (prompt, ids) in enumerate(slow):
            if self.out_of_time(j):
                slow_done = j
                break
            for system in rotated(slow_systems, j):
                self.run(system, prompt, ids, log)
        if done == len(prompts) and slow_done == len(slow):
            return None
        ran_slow = {q.id for q, _ in slow[:slow_done]}
        return {"time_budget_s": self.cfg.time_budget_s, "prompts_done": done, "prompts_planned": len(prompts),
                "not_run": [p.id for p, _ in prompts[done:]], "slow_prompts_done": slow_done,
                "slow_prompts_planned": len([p for p, _ in prompts if p.id in self.slow_ids]),
                "slow_not_run": [p.id for p, _ in prompts if p.id in self.slow_ids and p.id not in ran_slow]}

    def explain_divergences(self) -> list[dict[str, Any]]:
        if not self.pending:
            return []
        reference_engine = Engine.from_loaded(self.loaded, self.device, torch.float32, weights="dense", cuda_graph=False)
        return [{"system": system, "prompt_id": pid, **explain(self.engines["labkit_plain"], reference_engine, ids, ref_tokens, tokens)}
                for system, ids, ref_tokens, tokens, pid in self.pending[: self.cfg.explain_limit]]


def run_validation(cfg: ValidationConfig, loaded: LoadedModel | None = None) -> dict[str, Any]:
    cfg.validate()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    log = start_log(cfg.output_dir, results_stem({"card": device_name(device)}))  # before anything is measured
    loaded = loaded or load_model(cfg.model)
    bandwidth = copy_bandwidth(device)
    v = _Validation(cfg, loaded, device, dtype)
    v.warm_up()
    v.pick_fast()
    weight_bytes = weight_bytes_per_token(v.fast)
    roofline = bandwidth / weight_bytes  # tok/s if one step costs one read of the weights
    v.tune_k()
    stopped = v.run_passes(log)
    explanations = v.explain_divergences()
    params = run_params(cfg)
    params.update(model_source=loaded.source, device_resolved=str(device), dtype_resolved=dtype_name(dtype), best_k=v.best_k,
                  layers_resolved=v.depth, fastest_plain=v.fastest, drafters_on=v.fast_name, plain_passed_over=v.passed_over, plain_tuning_tok_per_s=v.plain_speed,
                  layer_kernels={name: e.layer_kernels for name, e in v.engines.items()}, prompts=[p.id for p, _ in v.prompts],
                  slow_prompts=sorted(v.slow_ids & {p.id for p, _ in v.prompts}))
    payload: dict[str, Any] = {
        "benchmark": "validation", **provenance(device, params), "card": device_name(device),
        "copy_bandwidth_gb_s": bandwidth / 1e9, "weight_bytes_per_token": weight_bytes, "roofline_tok_per_s": roofline,
        "tuning": v.tuning, "summary": summarize(v.rows, v.fastest, roofline), "divergences": explanations,
        "divergences_total": len(v.pending), "stopped_early": stopped,
    }
    finish_log(log, payload, v.rows)
    payload["rows"] = v.rows
    warn_if_busy()  # after the run: a competing process shows in the load average
    return payload


def results_stem(payload: dict[str, Any]) -> str:
    """File name stem that names the card, e.g. validation-NVIDIA-H200."""
    return "validation-" + (re.sub(r"[^A-Za-z0-9]+", "-", payload["card"]).strip("-") or "device")


def summarize(rows: list[dict[str, Any]], fast_name: str, roofline: float) -> list[dict[str, Any]]:
    """Per system: mean tok/s over its prompts; speed-ups are ratios of mean tok/s over the
    prompts both systems ran (HF systems run on a subset)."""
    by_system: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_system.setdefault(r["system"], {})[r["prompt_id"]] = r

    def ratio(a: str, b: str) -> float | None:
        shared = set(by_system.get(a, {})) & set(by_system.get(b, {}))
        if not shared:
            return None
        return statistics.fmean(by_system[a][p]["tok_per_s"] for p in shared) / statistics.fmean(by_system[b][p]["tok_per_s"] for p in shared)

    out = []
    for system, runs in by_system.items():
        sel = list(runs.values())
        tok_s = statistics.fmean(r["tok_per_s"] for r in sel)
        entry: dict[str, Any] = {
            "system": system, "prompts": len(sel), "k": sel[0].get("k"), "tok_per_s": tok_s,
            "tok_per_s_std": statistics.stdev([r["tok_per_s"] for r in sel]) if len(sel) > 1 else 0.0,
            "speedup_vs_hf": ratio(system, "hf_generate"), "speedup_vs_labkit_plain": ratio(system, fast_name),
            "roofline_share": tok_s / roofline, "identical_share": sum(r["identical_to_plain"] for r in sel) / len(sel),
        }
        if "tau" in sel[0]:
            entry["tau"] = statistics.fmean(r["tau"] for r in sel)
            entry["acceptance_rate"] = statistics.fmean(r["acceptance_rate"] for r in sel)
        out.append(entry)
    return out
