"""Baseline (phase 1A): our engine against Hugging Face `generate`, same model, prompts and
settings, in one run. Runs alternate between the two systems so that drift on a noisy
machine hits both; the ratio is taken per pair, then summarised.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from labkit.bench.results import provenance, write_results
from labkit.config import GenerationConfig, dtype_name, resolve_device, resolve_dtype
from labkit.engine import Engine
from labkit.generate import encode_prompt, generate
from labkit.metrics.timers import now
from labkit.models.loading import LoadedModel, load_model
from labkit.prompts import load_suite


@dataclass
class BaselineConfig:
    model: str = "default"
    device: str = "auto"
    dtypes: list[str] = field(default_factory=lambda: ["auto"])  # each dtype is benchmarked for both systems
    max_new_tokens: int = 128
    fixed_length: bool = True  # suppress EOS until max_new_tokens (HF's min_new_tokens), so every run is N tokens
    prompts_per_category: int = 1  # from the prompt suite
    categories: list[str] | None = None
    repeats: int = 2
    chat: bool | None = None  # None: the chat template when the model has one
    output_dir: str | None = "results"  # None: write nothing
    progress: bool = True


def time_hf_generate(hf_model: Any, prompt_ids: list[int], gen: GenerationConfig, device: torch.device) -> tuple[list[int], float]:
    ids = torch.tensor([prompt_ids], device=device)
    t0 = now(device)
    with torch.inference_mode():
        out = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen.max_new_tokens,
            min_new_tokens=gen.min_new_tokens or None, do_sample=False, num_beams=1,
            pad_token_id=hf_model.generation_config.pad_token_id or 0,
        )
    elapsed = now(device) - t0
    return out[0, len(prompt_ids):].tolist(), elapsed


def run_baseline(cfg: BaselineConfig, loaded: LoadedModel | None = None) -> dict[str, Any]:
    """Measure both systems; returns provenance, rows and a summary per dtype (and writes them)."""
    device = resolve_device(cfg.device)
    dtypes = [resolve_dtype(d, device) for d in cfg.dtypes]
    loaded = loaded or load_model(cfg.model)
    prompts = load_suite(cfg.categories, cfg.prompts_per_category)
    encoded = [(p, encode_prompt(loaded.tokenizer, p.content, cfg.chat)) for p in prompts]
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.max_new_tokens if cfg.fixed_length else 0)
    rows: list[dict[str, Any]] = []
    total_runs = len(dtypes) * len(encoded) * cfg.repeats
    bar = tqdm(total=total_runs, desc="baseline", disable=not cfg.progress)
    for dtype in dtypes:
        engine = Engine.from_hf(loaded.hf_model, device, dtype, amp=False)
        # A copy, so the fp32 original stays exact for the next dtype.
        hf_model = copy.deepcopy(loaded.hf_model).to(device=device, dtype=dtype)
        warm = encoded[0][1]
        time_hf_generate(hf_model, warm, GenerationConfig(max_new_tokens=4), device)
        generate(engine, warm, GenerationConfig(max_new_tokens=4))
        for rep in range(cfg.repeats):
            for i, (prompt, ids) in enumerate(encoded):
                base = {"dtype": dtype_name(dtype), "prompt_id": prompt.id, "category": prompt.category, "repeat": rep, "prompt_tokens": len(ids)}
                order = ("hf", "labkit") if (rep + i) % 2 == 0 else ("labkit", "hf")
                got: dict[str, tuple[list[int], float, float]] = {}
                for system in order:
                    if system == "hf":
                        tokens, seconds = time_hf_generate(hf_model, ids, gen, device)
                        got["hf"] = (tokens, seconds, float("nan"))
                    else:
                        result = generate(engine, ids, gen)
                        got["labkit"] = (result.tokens, result.stats.total_s, result.stats.ttft_s * 1e3)
                identical = got["hf"][0] == got["labkit"][0]
                for system, (tokens, seconds, ttft_ms) in got.items():
                    rows.append({**base, "system": "hf_generate" if system == "hf" else "labkit", "new_tokens": len(tokens),
                                 "seconds": seconds, "tok_per_s": len(tokens) / seconds, "ttft_ms": ttft_ms, "identical_tokens": identical})
                bar.update()
        del engine, hf_model
    bar.close()
    summary = summarize(rows)
    params = {k: v for k, v in asdict(cfg).items() if k != "progress"}
    params.update(model_source=loaded.source, device_resolved=str(device), prompts=[p.id for p in prompts])
    payload = {"benchmark": "baseline", **provenance(device, params), "summary": summary}
    if cfg.output_dir:
        json_path, csv_path = write_results(cfg.output_dir, f"baseline-{device.type}", payload, rows)
        payload["files"] = [str(json_path), str(csv_path)]
    payload["rows"] = rows
    return payload


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dtype: median tok/s of each system, and the median of the per-pair speed ratios."""
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        sel = [r for r in rows if r["dtype"] == dtype]
        hf = [r for r in sel if r["system"] == "hf_generate"]
        ours = [r for r in sel if r["system"] == "labkit"]
        ratios = [o["tok_per_s"] / h["tok_per_s"] for h, o in zip(hf, ours, strict=True)]
        out.append({
            "dtype": dtype,
            "hf_tok_per_s": statistics.median(r["tok_per_s"] for r in hf),
            "labkit_tok_per_s": statistics.median(r["tok_per_s"] for r in ours),
            "speedup_median": statistics.median(ratios),
            "speedup_min": min(ratios),
            "speedup_max": max(ratios),
            "identical_share": sum(r["identical_tokens"] for r in ours) / len(ours),
            "pairs": len(ratios),
        })
    return out
