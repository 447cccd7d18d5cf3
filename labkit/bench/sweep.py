"""The K-sweep (phases 2A and 2B): every drafter x policy x K controller x K against plain
decoding of our engine, measured in the same run, per prompt and category. For adaptive
controllers K is the largest K they may pick. Lossy policies also get their drift from plain
decoding: token agreement, identical outputs and the target's perplexity on what they wrote.
Replaces the seed's comprehensive_k_sweep.py.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from labkit.bench.common import finish_log, rotated, run_params, start_log
from labkit.bench.drift import agreement, perplexity
from labkit.bench.replay import replay_setups
from labkit.bench.results import RowLog, provenance, warn_if_busy
from labkit.bench.sweep_report import plot_sweep
from labkit.config import DRAFTERS, EngineConfig, GenerationConfig, resolve_device
from labkit.engine import Engine
from labkit.engine_build import from_config
from labkit.errors import LabkitError
from labkit.generate import MAX_K, GenerationResult, Speculation, encode_prompt, generate, valid_k, warm_up
from labkit.models.loading import LoadedModel, load_model
from labkit.prompts import load_suite
from labkit.specdec.controllers import CONTROLLERS, make_controller
from labkit.specdec.drafters import Drafter, build_drafter, check_drafter_options
from labkit.specdec.policies import POLICIES, TYPICAL_ALPHA, TYPICAL_THRESHOLD, Policy, make_policy
from labkit.specdec.speedup import alpha_from_steps, compare


@dataclass
class SweepConfig:
    base_model: str = "default"
    draft_model: str | None = None  # for the "model" drafter
    heads: str | None = None  # draft heads folder (python -m labkit heads train), for the "heads" drafter
    drafters: list[str] = field(default_factory=lambda: ["ngram"])
    layers: int | None = None  # layer-skip / truncated depth (default: a third of the target)
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # fixed K, or the K_max of an adaptive controller
    adaptive_ks: list[int] | None = None  # K max of the adaptive controllers, if not every K of ks
    policies: list[str] = field(default_factory=lambda: ["default"])  # default, greedy, rejection, typical, topk, confidence
    controllers: list[str] = field(default_factory=lambda: ["fixed"])  # fixed, heuristic, aimd, cost
    posterior_threshold: float = TYPICAL_THRESHOLD  # typical acceptance (Medusa's defaults)
    posterior_alpha: float = TYPICAL_ALPHA
    policy_top_k: int = 2  # top-k agreement
    confidence: float = 0.5  # draft-confidence early stop threshold (policy "confidence")
    max_new_tokens: int = 64
    iterations: int = 1
    categories: list[str] | None = None
    prompts_per_category: int = 1
    engine: EngineConfig = field(default_factory=EngineConfig)  # how the target runs (the drafters' engines follow it)
    temperature: float = 0.0  # 0: greedy, where every drafter must reproduce plain decoding exactly
    seed: int = 0
    replay: bool = False  # also replay every controller on a recorded acceptance oracle (bench/replay.py): K choices without noise
    output_dir: str | None = "results"
    plots: bool = True
    progress: bool = True

    def ks_for(self, controller: str) -> list[int]:
        """The Ks a controller runs at: every K for fixed, K max values for the adaptive ones."""
        return self.ks if controller == "fixed" or self.adaptive_ks is None else self.adaptive_ks

    def validate(self) -> None:
        if not self.ks or not all(valid_k(k) for k in self.ks):
            raise LabkitError(f"every K must be at least 1 and at most {MAX_K}, got {self.ks}")
        if self.adaptive_ks is not None and (not self.adaptive_ks or not all(valid_k(k) for k in self.adaptive_ks)):
            raise LabkitError(f"every adaptive K max must be at least 1 and at most {MAX_K}, got {self.adaptive_ks}")
        for name in ("max_new_tokens", "iterations", "prompts_per_category"):
            if getattr(self, name) < 1:
                raise LabkitError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        unknown = [d for d in self.drafters if d not in DRAFTERS]
        if unknown or not self.drafters:
            raise LabkitError(f"unknown drafter(s) {unknown}: use {', '.join(DRAFTERS)}")
        known = ("default", *POLICIES, "confidence")
        if not self.policies or any(p not in known for p in self.policies):
            raise LabkitError(f"unknown policy in {self.policies}: use {', '.join(known)}")
        if not self.controllers or any(c not in CONTROLLERS for c in self.controllers):
            raise LabkitError(f"unknown controller in {self.controllers}: use {', '.join(CONTROLLERS)}")
        gen = GenerationConfig(temperature=self.temperature)
        for p in self.policies:  # bad thresholds and greedy-with-sampling fail here, before any loading
            if p != "confidence":
                make_policy(p, gen, posterior_threshold=self.posterior_threshold, posterior_alpha=self.posterior_alpha, top_k=self.policy_top_k)
        if "confidence" in self.policies and not 0 < self.confidence < 1:
            raise LabkitError(f"the confidence threshold must be in (0, 1), got {self.confidence}")
        if self.replay and self.temperature != 0:
            raise LabkitError("--replay needs greedy decoding (temperature 0): only then is the output, and so the oracle, fixed")
        check_drafter_options(self.drafters, self.draft_model, self.heads)
        self.engine.validate()


def build_drafters(cfg: SweepConfig, target: Engine, loaded: LoadedModel, stop_below: float = 0.0) -> list[Drafter]:
    # n-gram lookup and the heads have no confidence to stop on
    kinds = [k for k in cfg.drafters if not (stop_below > 0 and (k.startswith("ngram") or k == "heads"))]
    return [build_drafter(kind, target, layers=cfg.layers, draft_model=cfg.draft_model, target_tokenizer=loaded.tokenizer, stop_below=stop_below,
                          heads_path=cfg.heads) for kind in kinds]


def run_row(result: GenerationResult, plain: GenerationResult, base: dict[str, Any]) -> dict[str, Any]:
    s, p = result.stats, plain.stats
    drafted = s.drafted_lengths
    spec_steps = [d for d in drafted if d > 0]
    return {
        **base, "lossless": s.lossless, "new_tokens": s.new_tokens, "seconds": s.total_s, "tok_per_s": s.tok_per_s,
        "decode_tok_per_s": s.decode_tok_per_s, "ttft_ms": s.ttft_s * 1e3,
        "mean_latency_ms": s.mean_token_latency_ms, "acceptance_rate": s.acceptance_rate, "tau": s.tau,
        "alpha": alpha_from_steps(s.accepted_lengths, drafted), "drafted_tokens": sum(drafted),
        "mean_drafted": sum(spec_steps) / len(spec_steps) if spec_steps else 0.0,
        "draft_share": len(spec_steps) / len(drafted) if drafted else 0.0,  # target steps that verified a draft
        "target_steps": s.target_steps, "draft_s": s.draft_s, "verify_s": s.verify_s, "other_s": s.other_s,
        "peak_memory_mb": s.peak_memory_bytes / 2**20, "speedup": s.tok_per_s / p.tok_per_s,
        "decode_speedup": s.decode_tok_per_s / p.decode_tok_per_s if p.decode_tok_per_s else float("nan"),
        "identical_to_plain": result.tokens == plain.tokens, "agreement_with_plain": agreement(result.tokens, plain.tokens),
        "accepted_lengths": " ".join(map(str, s.accepted_lengths)), "k_trace": " ".join(map(str, s.k_trace)),
    }


def _setups(cfg: SweepConfig, target: Engine, loaded: LoadedModel, drafters: list[Drafter],
            gen: GenerationConfig) -> list[tuple[Drafter, str, Policy | None]]:
    """(drafter, policy label, policy) for every policy asked; None: the default policy. The
    confidence "policy" is drafter-side: the same drafters, stopping below the threshold."""
    setups: list[tuple[Drafter, str, Policy | None]] = []
    for name in cfg.policies:
        if name == "confidence":
            setups += [(d, f"confidence-{cfg.confidence:g}", None) for d in build_drafters(cfg, target, loaded, cfg.confidence)]
        else:
            policy = make_policy(name, gen, posterior_threshold=cfg.posterior_threshold, posterior_alpha=cfg.posterior_alpha, top_k=cfg.policy_top_k)
            setups += [(d, policy.name, policy) for d in drafters]
    return setups


def _measure(cfg: SweepConfig, target: Engine, prompts: list[tuple[Any, list[int]]], setups: list[tuple[Drafter, str, Policy | None]],
             gen: GenerationConfig, log: RowLog | None) -> list[dict[str, Any]]:
    """Plain decoding, then every setup at every controller and K (in rotating order), on every prompt."""
    # One controller per setup and K for the whole sweep: adaptive ones learn this device's costs
    # across requests, and never hear which category a prompt is from.
    controllers = {(d.name, label, c, k): make_controller(c, k, target.device.type) for d, label, _ in setups for c in cfg.controllers for k in cfg.ks_for(c)}
    runs = [(drafter, label, policy, c, k) for drafter, label, policy in setups for c in cfg.controllers for k in cfg.ks_for(c)]
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=cfg.iterations * len(prompts) * (1 + len(controllers)), desc="sweep", disable=not cfg.progress)

    def keep(row: dict[str, Any]) -> None:  # logged as it comes: a run cut short keeps what it measured
        rows.append(row)
        if log:
            log.add(row)
        bar.update()

    for it in range(cfg.iterations):
        for i, (prompt, ids) in enumerate(prompts):
            base = {"iteration": it, "prompt_id": prompt.id, "category": prompt.category, "prompt_tokens": len(ids)}
            plain = generate(target, ids, gen)
            plain_ppl = perplexity(target, ids, plain.tokens)
            keep({**run_row(plain, plain, {**base, "drafter": "plain", "k": 0, "policy": "", "controller": ""}), "perplexity": plain_ppl})
            for drafter, label, setup_policy, controller_name, k in rotated(runs, it + i):  # slow drift favours no setup
                controller = controllers[(drafter.name, label, controller_name, k)]
                result = generate(target, ids, gen, Speculation(drafter, k, setup_policy, controller))
                row = run_row(result, plain, {**base, "drafter": drafter.name, "k": k, "policy": label, "controller": controller_name})
                # drift only where it can exist: lossy policies, or any sampling
                row["perplexity"] = perplexity(target, ids, result.tokens) if not result.stats.lossless or cfg.temperature > 0 else plain_ppl
                keep(row)
    bar.close()
    return rows


def run_sweep(cfg: SweepConfig, loaded: LoadedModel | None = None) -> dict[str, Any]:
    cfg.validate()
    device = resolve_device(cfg.engine.device)
    log = start_log(cfg.output_dir, f"sweep-{device.type}")  # before anything is measured
    loaded = loaded or load_model(cfg.base_model)
    target = from_config(loaded, cfg.engine)
    drafters = build_drafters(cfg, target, loaded)
    prompts = [(p, encode_prompt(loaded.tokenizer, p.content)) for p in load_suite(cfg.categories, cfg.prompts_per_category)]
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed)
    k_top = max(cfg.ks + (cfg.adaptive_ks or []))
    for drafter in drafters:  # captures with each drafter's verify hook (the heads'), then a repeated prompt, so that the n-gram drafter proposes
        warm_up(target, k_top, drafter=drafter)
        generate(target, prompts[0][1] * 2, GenerationConfig(max_new_tokens=8), Speculation(drafter, k_top))
    rows = _measure(cfg, target, prompts, _setups(cfg, target, loaded, drafters, gen), gen, log)
    summary, per_category = summarize(rows)
    params = run_params(cfg)
    params.update(model_source=loaded.source, device_resolved=str(device), dtype_resolved=str(target.dtype), weights_resolved=target.weights,
                  weights_note=target.weights_note, cuda_graph_resolved=target.cuda_graph, layer_kernels_resolved=target.layer_kernels)
    payload: dict[str, Any] = {"benchmark": "sweep", **provenance(device, params), "summary": summary, "per_category": per_category,
                               "speedup_model": compare(rows)}
    if any(c != "fixed" for c in cfg.controllers) and "fixed" in cfg.controllers:
        payload["adaptive_vs_fixed"] = {c: adaptive_vs_fixed(rows, c) for c in cfg.controllers if c != "fixed"}
    if cfg.replay:  # greedy acceptance only: lossy policies change the output the oracle records
        payload["replay"] = replay_setups(target, drafters, prompts, gen, {c: cfg.ks_for(c) for c in cfg.controllers})
    files = finish_log(log, payload, rows)
    if files and cfg.plots:
        payload["files"] += plot_sweep(rows, Path(files[0]).with_suffix(""))
    payload["rows"] = rows
    warn_if_busy()  # after the run: a competing process shows in the load average
    return payload


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


SETUP = ("drafter", "policy", "controller", "k")


def summarize(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per (drafter, policy, controller, K): mean ± std over iterations and prompts; per category:
    mean speed-up and the best lossless setting (greedy runs must also be token-identical to plain)."""
    summary = []
    keys = list(dict.fromkeys(tuple(r[c] for c in SETUP) for r in rows))
    for key in keys:
        sel = [r for r in rows if tuple(r[c] for c in SETUP) == key]
        entry: dict[str, Any] = {**dict(zip(SETUP, key, strict=True)), "lossless": sel[0]["lossless"], "runs": len(sel),
                                 "identical_share": sum(r["identical_to_plain"] for r in sel) / len(sel)}
        for metric in ("tok_per_s", "speedup", "decode_speedup", "acceptance_rate", "alpha", "tau", "mean_drafted", "agreement_with_plain",
                       "perplexity", "mean_latency_ms", "peak_memory_mb", "draft_s", "verify_s", "other_s"):
            entry[metric], entry[metric + "_std"] = _mean_std([r[metric] for r in sel])
        summary.append(entry)
    per_category = []
    for cat in dict.fromkeys(r["category"] for r in rows):
        best: dict[str, Any] | None = None
        for key in keys:
            if key[0] == "plain":
                continue
            sel = [r for r in rows if tuple(r[c] for c in SETUP) == key and r["category"] == cat]
            speedup = statistics.fmean(r["speedup"] for r in sel)
            lossless = all(r["lossless"] and r["identical_to_plain"] for r in sel)
            if lossless and (best is None or speedup > best["speedup"]):
                best = {"category": cat, **dict(zip(SETUP, key, strict=True)), "speedup": speedup,
                        "acceptance_rate": statistics.fmean(r["acceptance_rate"] for r in sel)}
        plain = [r["tok_per_s"] for r in rows if r["drafter"] == "plain" and r["category"] == cat]
        per_category.append({"category": cat, "plain_tok_per_s": statistics.fmean(plain), **(best or {"drafter": None, "k": None, "speedup": None})})
    return summary, per_category


def adaptive_vs_fixed(rows: list[dict[str, Any]], controller: str = "cost") -> dict[str, Any]:
    """An adaptive controller at its largest K max against every fixed K, per drafter and policy:
    per category, its tok/s over the best fixed K's there (it is never told the category), and
    overall, against each fixed K over all prompts. Lossless settings only."""
    out: dict[str, Any] = {"controller": controller, "per_category": [], "overall": []}
    runs = [r for r in rows if r["drafter"] != "plain" and r["lossless"]]
    for drafter, policy in dict.fromkeys((r["drafter"], r["policy"]) for r in runs):
        sel = [r for r in runs if r["drafter"] == drafter and r["policy"] == policy]
        adaptive = [r for r in sel if r["controller"] == controller]
        fixed = [r for r in sel if r["controller"] == "fixed"]
        if not adaptive or not fixed:
            continue
        k_max = max(r["k"] for r in adaptive)
        adaptive = [r for r in adaptive if r["k"] == k_max]
        ks = sorted({r["k"] for r in fixed})

        def mean_tok_s(rs: list[dict[str, Any]]) -> float:
            return statistics.fmean(r["tok_per_s"] for r in rs)

        for cat in dict.fromkeys(r["category"] for r in sel):
            by_k = {k: mean_tok_s([r for r in fixed if r["k"] == k and r["category"] == cat]) for k in ks}
            best_k = max(by_k, key=lambda k: by_k[k])
            ours_rows = [r for r in adaptive if r["category"] == cat]
            ours = mean_tok_s(ours_rows)
            lo, hi = paired_ratio_interval(ours_rows, [r for r in fixed if r["k"] == best_k and r["category"] == cat])
            out["per_category"].append({"drafter": drafter, "policy": policy, "category": cat, "best_fixed_k": best_k,
                                        "best_fixed_tok_per_s": by_k[best_k], "adaptive_tok_per_s": ours,
                                        "ratio": ours / by_k[best_k], "ratio_ci90": [lo, hi] if math.isfinite(lo) else None, "within_5pct": ours >= 0.95 * by_k[best_k]})
        ours = mean_tok_s(adaptive)
        for k in ks:
            theirs = mean_tok_s([r for r in fixed if r["k"] == k])
            out["overall"].append({"drafter": drafter, "policy": policy, "fixed_k": k, "fixed_tok_per_s": theirs,
                                   "adaptive_k_max": k_max, "adaptive_tok_per_s": ours, "ratio": ours / theirs, "beats": ours > theirs})
    return out


def paired_ratio_interval(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], resamples: int = 2000,
                          level: float = 0.9) -> tuple[float, float]:
    """A bootstrap interval for mean(ours tok/s) / mean(theirs tok/s) over the (prompt, iteration)
    pairs both ran: the two runs of a pair ran seconds apart, so resampling pairs keeps the
    machine's slow drift (a CPU's speed wanders by 10-20% over minutes) common to both sides.
    Seeded, so one results file always reports the same interval."""
    theirs_by = {(r["prompt_id"], r["iteration"]): r["tok_per_s"] for r in theirs}
    pairs = [(r["tok_per_s"], theirs_by[(r["prompt_id"], r["iteration"])]) for r in ours if (r["prompt_id"], r["iteration"]) in theirs_by]
    if len(pairs) < 2:
        return float("nan"), float("nan")
    rng = random.Random(0)
    ratios = []
    for _ in range(resamples):
        sample = [pairs[rng.randrange(len(pairs))] for _ in pairs]
        ratios.append(sum(a for a, _ in sample) / sum(b for _, b in sample))
    ratios.sort()
    tail = (1 - level) / 2
    return ratios[int(tail * resamples)], ratios[min(resamples - 1, int((1 - tail) * resamples))]
