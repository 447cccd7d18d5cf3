"""The K-sweep (phase 2A): every drafter at every K against plain greedy of our engine,
measured in the same run, per prompt and category. Replaces the seed's comprehensive_k_sweep.py.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from labkit.bench.results import provenance, write_results
from labkit.config import GenerationConfig, resolve_device, resolve_dtype
from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.generate import GenerationResult, Speculation, encode_prompt, generate, warm_up
from labkit.models.loading import LoadedModel, load_model
from labkit.prompts import load_suite
from labkit.specdec.drafters import Drafter, build_drafter

DRAFTERS = ("ngram", "layerskip", "truncated", "model")


@dataclass
class SweepConfig:
    base_model: str = "default"
    draft_model: str | None = None  # for the "model" drafter
    drafters: list[str] = field(default_factory=lambda: ["ngram"])
    layers: int | None = None  # layer-skip / truncated depth (default: a third of the target)
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    max_new_tokens: int = 64
    iterations: int = 1
    categories: list[str] | None = None
    prompts_per_category: int = 1
    device: str = "auto"
    dtype: str | None = None
    weights: str = "auto"  # target weights: auto, dense, gguf
    temperature: float = 0.0  # 0: greedy, where every drafter must reproduce plain decoding exactly
    seed: int = 0
    cuda_graph: bool | None = None  # None: SPECDEC_CUDA_GRAPH
    compile: bool = False  # torch.compile the target's fixed-shape steps
    output_dir: str | None = "results"
    plots: bool = True
    progress: bool = True

    def validate(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise LabkitError(f"every K must be at least 1, got {self.ks}")
        for name in ("max_new_tokens", "iterations", "prompts_per_category"):
            if getattr(self, name) < 1:
                raise LabkitError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        unknown = [d for d in self.drafters if d not in DRAFTERS]
        if unknown or not self.drafters:
            raise LabkitError(f"unknown drafter(s) {unknown}: use {', '.join(DRAFTERS)}")
        if "model" in self.drafters and not self.draft_model:
            raise LabkitError("the model drafter needs --draft-model")


def build_drafters(cfg: SweepConfig, target: Engine, loaded: LoadedModel) -> list[Drafter]:
    return [build_drafter(kind, target, layers=cfg.layers, draft_model=cfg.draft_model, target_tokenizer=loaded.tokenizer)
            for kind in cfg.drafters]


def run_row(result: GenerationResult, plain: GenerationResult, base: dict[str, Any]) -> dict[str, Any]:
    s = result.stats
    return {
        **base, "new_tokens": s.new_tokens, "seconds": s.total_s, "tok_per_s": s.tok_per_s, "ttft_ms": s.ttft_s * 1e3,
        "mean_latency_ms": s.mean_token_latency_ms, "acceptance_rate": s.acceptance_rate, "tau": s.tau,
        "target_steps": s.target_steps, "draft_s": s.draft_s, "verify_s": s.verify_s, "other_s": s.other_s,
        "peak_memory_mb": s.peak_memory_bytes / 2**20, "speedup": s.tok_per_s / plain.stats.tok_per_s,
        "identical_to_plain": result.tokens == plain.tokens, "accepted_lengths": " ".join(map(str, s.accepted_lengths)),
    }


def run_sweep(cfg: SweepConfig, loaded: LoadedModel | None = None) -> dict[str, Any]:
    cfg.validate()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    loaded = loaded or load_model(cfg.base_model)
    target = Engine.from_loaded(loaded, device, dtype, weights=cfg.weights, cuda_graph=cfg.cuda_graph, compile=cfg.compile)
    drafters = build_drafters(cfg, target, loaded)
    prompts = [(p, encode_prompt(loaded.tokenizer, p.content)) for p in load_suite(cfg.categories, cfg.prompts_per_category)]
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed)
    warm_up(target, max(cfg.ks))
    for drafter in drafters:  # a repeated prompt, so that the n-gram drafter proposes
        generate(target, prompts[0][1] * 2, GenerationConfig(max_new_tokens=8), Speculation(drafter, max(cfg.ks)))
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=cfg.iterations * len(prompts) * (1 + len(drafters) * len(cfg.ks)), desc="sweep", disable=not cfg.progress)
    for it in range(cfg.iterations):
        for prompt, ids in prompts:
            base = {"iteration": it, "prompt_id": prompt.id, "category": prompt.category, "prompt_tokens": len(ids)}
            plain = generate(target, ids, gen)
            rows.append(run_row(plain, plain, {**base, "drafter": "plain", "k": 0}))
            bar.update()
            for drafter in drafters:
                for k in cfg.ks:
                    result = generate(target, ids, gen, Speculation(drafter, k))
                    rows.append(run_row(result, plain, {**base, "drafter": drafter.name, "k": k}))
                    bar.update()
    bar.close()
    summary, per_category = summarize(rows)
    params = {k: v for k, v in asdict(cfg).items() if k != "progress"}
    params.update(model_source=loaded.source, device_resolved=str(device), dtype_resolved=str(dtype), weights_resolved=target.weights,
                  cuda_graph_resolved=target.cuda_graph)
    payload: dict[str, Any] = {"benchmark": "sweep", **provenance(device, params), "summary": summary, "per_category": per_category}
    if cfg.output_dir:
        json_path, csv_path = write_results(cfg.output_dir, f"sweep-{device.type}", payload, rows)
        payload["files"] = [str(json_path), str(csv_path)]
        if cfg.plots:
            payload["files"] += plot_sweep(rows, json_path.with_suffix(""))
    payload["rows"] = rows
    return payload


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per (drafter, K): mean ± std over iterations and prompts; per category: mean speed-up and
    the best lossless drafter/K (greedy runs must also be token-identical to plain)."""
    summary = []
    keys = list(dict.fromkeys((r["drafter"], r["k"]) for r in rows))
    for drafter, k in keys:
        sel = [r for r in rows if r["drafter"] == drafter and r["k"] == k]
        entry: dict[str, Any] = {"drafter": drafter, "k": k, "runs": len(sel), "identical_share": sum(r["identical_to_plain"] for r in sel) / len(sel)}
        for metric in ("tok_per_s", "speedup", "acceptance_rate", "tau", "mean_latency_ms", "peak_memory_mb", "draft_s", "verify_s", "other_s"):
            entry[metric], entry[metric + "_std"] = _mean_std([r[metric] for r in sel])
        summary.append(entry)
    per_category = []
    for cat in dict.fromkeys(r["category"] for r in rows):
        best: dict[str, Any] | None = None
        for drafter, k in keys:
            if drafter == "plain":
                continue
            sel = [r for r in rows if r["drafter"] == drafter and r["k"] == k and r["category"] == cat]
            speedup = statistics.fmean(r["speedup"] for r in sel)
            lossless = all(r["identical_to_plain"] for r in sel)
            if lossless and (best is None or speedup > best["speedup"]):
                best = {"category": cat, "drafter": drafter, "k": k, "speedup": speedup,
                        "acceptance_rate": statistics.fmean(r["acceptance_rate"] for r in sel)}
        plain = [r["tok_per_s"] for r in rows if r["drafter"] == "plain" and r["category"] == cat]
        per_category.append({"category": cat, "plain_tok_per_s": statistics.fmean(plain), **(best or {"drafter": None, "k": None, "speedup": None})})
    return summary, per_category


def plot_sweep(rows: list[dict[str, Any]], stem: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    df = pd.DataFrame([r for r in rows if r["drafter"] != "plain"])
    if df.empty:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    sns.lineplot(data=df, x="k", y="tok_per_s", hue="drafter", marker="o", ax=axes[0])
    plain = statistics.fmean(r["tok_per_s"] for r in rows if r["drafter"] == "plain")
    axes[0].axhline(plain, color="grey", ls="--", label="plain greedy")
    axes[0].set(title="throughput", ylabel="tokens / s")
    sns.lineplot(data=df, x="k", y="acceptance_rate", hue="drafter", marker="o", ax=axes[1])
    axes[1].set(title="acceptance rate")
    sns.barplot(data=df, x="category", y="speedup", hue="drafter", ax=axes[2], errorbar=None)
    axes[2].axhline(1.0, color="grey", ls="--")
    axes[2].tick_params(axis="x", rotation=45)
    axes[2].set(title="speed-up over plain greedy (mean over K)")
    fig.tight_layout()
    path = f"{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
