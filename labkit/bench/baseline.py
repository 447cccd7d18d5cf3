"""Baseline (phase 1A): our engine against Hugging Face `generate`, same model, prompts and
settings, in one run. Runs alternate between the two systems so that drift on a noisy
machine hits both; the ratio is taken per pair, then summarised.
"""

from __future__ import annotations

import copy
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from labkit.bench.common import finish_log, rotated, run_params, start_log, time_hf_generate
from labkit.bench.llamacpp import LlamaCpp, llama_cpp_probe, llama_cpp_status
from labkit.bench.results import RowLog, provenance, warn_if_busy
from labkit.config import GenerationConfig, dtype_name, resolve_device, resolve_dtype
from labkit.engine import Engine
from labkit.engine_choices import gguf_unusable
from labkit.errors import LabkitError
from labkit.generate import encode_prompt, generate, warm_up
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
    gguf_weights: bool = True  # also time our engine on the GGUF's own blocks, where it applies ...
    gguf_q8: bool = False  # ... and on them with 8-bit activations (labkit_gguf_q8: faster; its tokens may differ from HF's)
    cuda_graph: bool = True  # on CUDA, also time our engine with its fixed-shape steps as CUDA graphs
    compile: bool = False  # on CUDA, also time torch.compile'd steps inside the CUDA graphs
    llama_cpp: str = "auto"  # llama.cpp on the same GGUF (CPU): "auto" where llama-cpp-python is installed, "on" (required), "off"
    output_dir: str | None = "results"  # None: write nothing
    progress: bool = True


def describe(engine: Engine) -> str:
    """Weights and step mode of an engine, e.g. 'dense+compile+graph'."""
    return engine.weights + ("+compile" if engine.compiled else "") + ("+graph" if engine.cuda_graph else "")


def llama_cpp_peer(cfg: BaselineConfig, loaded: LoadedModel, device: torch.device, dtype: torch.dtype, n_ctx: int) -> LlamaCpp | None:
    """llama.cpp on the model's GGUF with labkit's threads, where asked for and possible (CPU, a GGUF
    model, fp32 activations like labkit's, llama-cpp-python installed); "on" insists."""
    if cfg.llama_cpp == "off":
        return None
    ok, why = llama_cpp_status()
    path, threads = loaded.gguf_path, torch.get_num_threads()
    if device.type != "cpu" or dtype != torch.float32 or path is None:
        ok, why = False, "llama.cpp runs here on the CPU against float32, on a GGUF model"
    elif ok:
        ok, why = llama_cpp_probe(path, threads)
        if not ok and cfg.llama_cpp == "auto":  # installed, so expected: say why it is left out
            print(f"bench baseline: llama.cpp left out: {why}", file=sys.stderr)
    if not ok or path is None:
        if cfg.llama_cpp == "on":
            raise LabkitError(f"--llama-cpp on: {why}")
        return None
    return LlamaCpp(path, n_ctx, threads, loaded.eos_token_ids)


def _engines(cfg: BaselineConfig, loaded: LoadedModel, device: torch.device, dtype: torch.dtype) -> dict[str, Engine]:
    """labkit's variants at one dtype: eager dense steps; on CUDA also CUDA graphs (and compiled
    steps inside them); where they apply, the GGUF's own blocks (and, asked, with 8-bit activations)."""
    engines = {"labkit": Engine.from_loaded(loaded, device, dtype, weights="dense", amp=False, cuda_graph=False)}
    if cfg.cuda_graph and device.type == "cuda":
        engines["labkit_cuda_graph"] = Engine.from_loaded(loaded, device, dtype, weights="dense", amp=False, cuda_graph=True)
        if cfg.compile:
            engines["labkit_compiled_graph"] = Engine.from_loaded(loaded, device, dtype, weights="dense", amp=False, cuda_graph=True, compile=True)
    if cfg.gguf_weights and loaded.gguf_path is not None and not gguf_unusable(engines["labkit"], loaded):
        engines["labkit_gguf"] = Engine.from_loaded(loaded, device, dtype, weights="gguf", amp=False, cuda_graph=False)
        if cfg.gguf_q8:
            engines["labkit_gguf_q8"] = Engine.from_loaded(loaded, device, dtype, weights="gguf-q8", amp=False, cuda_graph=False)
    return engines


def _run_dtype(cfg: BaselineConfig, loaded: LoadedModel, device: torch.device, dtype: torch.dtype,
               encoded: list[tuple[Any, list[int]]], log: RowLog | None, bar: Any) -> list[dict[str, Any]]:
    """Every system at one dtype, over every prompt, `repeats` times, in rotating order."""
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.max_new_tokens if cfg.fixed_length else 0)
    engines = _engines(cfg, loaded, device, dtype)
    peer = llama_cpp_peer(cfg, loaded, device, dtype, max(len(ids) for _, ids in encoded) + cfg.max_new_tokens + 8)
    hf_model = copy.deepcopy(loaded.hf_model).to(device=device, dtype=dtype)  # a copy: the fp32 original stays exact for the next dtype
    warm = encoded[0][1]
    time_hf_generate(hf_model, warm, GenerationConfig(max_new_tokens=4), device)
    for engine in engines.values():
        warm_up(engine)
        generate(engine, warm, GenerationConfig(max_new_tokens=4))
    if peer is not None:
        peer.generate(warm, 4)

    def run(system: str, ids: list[int]) -> tuple[list[int], float, float]:  # tokens, seconds, ms to the first token
        if system == "hf_generate":
            return (*time_hf_generate(hf_model, ids, gen, device), float("nan"))
        if system == "llama_cpp":
            assert peer is not None
            return peer.generate(ids, gen.max_new_tokens, gen.min_new_tokens)
        result = generate(engines[system], ids, gen)
        return result.tokens, result.stats.total_s, result.stats.ttft_s * 1e3

    systems = ["hf_generate", *engines, *(["llama_cpp"] if peer is not None else [])]
    labels = {"hf_generate": "hf", "llama_cpp": f"gguf, llama.cpp {peer.version if peer else ''}", **{n: describe(e) for n, e in engines.items()}}
    rows: list[dict[str, Any]] = []
    for rep in range(cfg.repeats):
        for i, (prompt, ids) in enumerate(encoded):
            base = {"dtype": dtype_name(dtype), "prompt_id": prompt.id, "category": prompt.category, "repeat": rep, "prompt_tokens": len(ids)}
            got = {system: run(system, ids) for system in rotated(systems, rep + i)}
            for system in systems:
                tokens, seconds, ttft_ms = got[system]
                rows.append({**base, "system": system, "weights": labels[system], "new_tokens": len(tokens), "seconds": seconds,
                             "tok_per_s": len(tokens) / seconds, "ttft_ms": ttft_ms, "identical_tokens": tokens == got["hf_generate"][0]})
                if log:
                    log.add(rows[-1])
            bar.update()
    return rows


def run_baseline(cfg: BaselineConfig, loaded: LoadedModel | None = None) -> dict[str, Any]:
    """Measure both systems; returns provenance, rows and a summary per dtype (and writes them)."""
    device = resolve_device(cfg.device)
    dtypes = [resolve_dtype(d, device) for d in cfg.dtypes]
    if cfg.llama_cpp == "on" and not llama_cpp_status()[0]:  # before anything loads
        raise LabkitError(f"--llama-cpp on: {llama_cpp_status()[1]}")
    if cfg.gguf_q8 and not cfg.gguf_weights:
        raise LabkitError("--gguf-q8 times the GGUF's blocks with 8-bit activations beside them: drop --no-gguf")
    log = start_log(cfg.output_dir, f"baseline-{device.type}")  # before anything is measured
    loaded = loaded or load_model(cfg.model)
    prompts = load_suite(cfg.categories, cfg.prompts_per_category)
    encoded = [(p, encode_prompt(loaded.tokenizer, p.content, cfg.chat)) for p in prompts]
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(dtypes) * len(encoded) * cfg.repeats, desc="baseline", disable=not cfg.progress)
    for dtype in dtypes:
        rows += _run_dtype(cfg, loaded, device, dtype, encoded, log, bar)
    bar.close()
    params = run_params(cfg)
    params.update(model_source=loaded.source, device_resolved=str(device), prompts=[p.id for p in prompts])
    payload = {"benchmark": "baseline", **provenance(device, params), "summary": summarize(rows)}
    finish_log(log, payload, rows)
    payload["rows"] = rows
    warn_if_busy()  # after the run: a competing process shows in the load average
    return payload


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dtype and labkit system: median tok/s, and the per-pair speed-up over HF generate."""
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        sel = [r for r in rows if r["dtype"] == dtype]
        hf = {(r["prompt_id"], r["repeat"]): r for r in sel if r["system"] == "hf_generate"}
        peer = {(r["prompt_id"], r["repeat"]): r for r in sel if r["system"] == "llama_cpp"}
        for system in dict.fromkeys(r["system"] for r in sel if r["system"] != "hf_generate"):
            ours = [r for r in sel if r["system"] == system]
            ratios = [r["tok_per_s"] / hf[(r["prompt_id"], r["repeat"])]["tok_per_s"] for r in ours]
            if peer and system != "llama_cpp":  # the same pair's llama.cpp run
                over_peer = [r["tok_per_s"] / peer[(r["prompt_id"], r["repeat"])]["tok_per_s"] for r in ours]
            out.append({
                "dtype": dtype,
                "system": system,
                "weights": ours[0].get("weights", "dense"),
                "hf_tok_per_s": statistics.median(r["tok_per_s"] for r in hf.values()),
                "labkit_tok_per_s": statistics.median(r["tok_per_s"] for r in ours),
                "speedup_median": statistics.median(ratios),
                "speedup_min": min(ratios),
                "speedup_max": max(ratios),
                "identical_share": sum(r["identical_tokens"] for r in ours) / len(ours),
                "pairs": len(ratios),
                **({"over_llama_cpp_median": statistics.median(over_peer)} if peer and system != "llama_cpp" else {}),
            })
    return out


def baseline_report(payload: dict[str, Any]) -> list[str]:
    """The table `labkit bench baseline` prints: per dtype and system, both speeds and the ratio."""
    out: list[str] = []
    out.append(f"baseline on {payload['device']['name']}, {payload['parameters']['max_new_tokens']} new tokens, {payload['summary'][0]['pairs']} runs per system and dtype")
    out.append(f"{'dtype':<10}{'system':<20}{'weights':<26}{'HF generate':>14}{'system':>12}{'speedup':>10}{'range':>16}{'identical':>11}"
               f"{'vs llama.cpp':>14}")
    for row in payload["summary"]:
        peer = f"{row['over_llama_cpp_median']:>13.2f}x" if "over_llama_cpp_median" in row else ""
        out.append(f"{row['dtype']:<10}{row['system']:<20}{row['weights'][:25]:<26}{row['hf_tok_per_s']:>10.1f} t/s{row['labkit_tok_per_s']:>8.1f} t/s"
                   f"{row['speedup_median']:>9.2f}x{row['speedup_min']:>9.2f}-{row['speedup_max']:.2f}x{row['identical_share']:>10.0%}{peer}")
    out += [f"wrote {f}" for f in payload.get("files", [])]
    return out
