"""Precision and profiling (phase 3A): what each dtype costs and changes, and where a step's time goes.

For each precision (fp32, fp16, bf16, each optionally under AMP with fp32 weights), on the same
prompts and in one run:
- speed: plain greedy tok/s (CUDA graphs where asked);
- drift from fp32: the largest logit difference on the prompts' prefill, the share of greedy
  tokens that agree with fp32 position by position, and the share of identical outputs;
- phases: a speculative run with detailed metrics, so the time splits into draft, verify,
  accept, kv_update, sampling (and decode for plain steps).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from labkit.bench.drift import agreement
from labkit.bench.results import provenance
from labkit.config import GenerationConfig, dtype_name, resolve_device, resolve_dtype
from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.generate import Speculation, encode_prompt, generate, warm_up
from labkit.models.loading import LoadedModel, load_model
from labkit.prompts import load_suite
from labkit.specdec.drafters import make_drafter


@dataclass
class PrecisionConfig:
    model: str = "default"
    device: str = "auto"
    dtypes: list[str] = field(default_factory=lambda: ["float32", "bfloat16", "float16"])
    amp: bool = False  # also run each half precision as AMP (fp32 weights, autocast matmuls)
    cuda_graph: bool = True  # CUDA only
    max_new_tokens: int = 64
    categories: list[str] | None = None
    prompts_per_category: int = 1
    drafter: str = "ngram"  # the speculative run whose phases are timed
    k: int = 4

    def validate(self) -> None:
        if self.max_new_tokens < 1 or self.prompts_per_category < 1 or self.k < 1:
            raise LabkitError("max_new_tokens, prompts_per_category and k must be at least 1")
        if not self.dtypes:
            raise LabkitError("give at least one dtype")


@torch.inference_mode()
def run_precision(cfg: PrecisionConfig, loaded: LoadedModel | None = None) -> dict[str, Any]:
    cfg.validate()
    device = resolve_device(cfg.device)
    loaded = loaded or load_model(cfg.model)
    try:
        prompts = [(p, encode_prompt(loaded.tokenizer, p.content)) for p in load_suite(cfg.categories, cfg.prompts_per_category)]
    except ValueError as err:
        raise LabkitError(str(err)) from None
    graphs = cfg.cuda_graph and device.type == "cuda"
    variants: list[tuple[torch.dtype, bool]] = []
    for name in cfg.dtypes:
        dtype = resolve_dtype(name, device)
        variants.append((dtype, False))
        if cfg.amp and dtype != torch.float32:
            variants.append((dtype, True))
    reference = Engine.from_loaded(loaded, device, torch.float32, weights="dense", cuda_graph=False)
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.max_new_tokens)
    ref_tokens = {p.id: generate(reference, ids, gen).tokens for p, ids in prompts}
    ref_logits = {}
    for p, ids in prompts:
        reference.ensure_capacity(len(ids))
        ref_logits[p.id] = reference.forward(torch.tensor([ids], device=device))[0].float()  # (T, V)
    rows: list[dict[str, Any]] = []
    phase_rows: list[dict[str, Any]] = []
    for dtype, amp in variants:
        label = dtype_name(dtype) + ("+amp" if amp else "")
        engine = Engine.from_loaded(loaded, device, dtype, weights="dense", amp=amp, cuda_graph=graphs)
        drafter = make_drafter(cfg.drafter, engine)
        warm_up(engine, cfg.k)
        generate(engine, prompts[0][1] * 2, GenerationConfig(max_new_tokens=8), Speculation(drafter, cfg.k))
        for p, ids in prompts:
            engine.ensure_capacity(len(ids))
            logits = engine.forward(torch.tensor([ids], device=device))[0].float()  # (T, V)
            diff = (logits - ref_logits[p.id]).abs().max().item()
            result = generate(engine, ids, gen)
            spec = generate(engine, ids, gen, Speculation(drafter, cfg.k), detailed_metrics=True)
            rows.append({
                "precision": label, "prompt_id": p.id, "category": p.category, "tok_per_s": result.stats.tok_per_s,
                "spec_tok_per_s": spec.stats.tok_per_s, "max_logit_diff": diff,
                "max_logit_diff_rel": diff / ref_logits[p.id].abs().max().item(),
                "agreement_with_fp32": agreement(result.tokens, ref_tokens[p.id]),
                "identical_to_fp32": result.tokens == ref_tokens[p.id], "spec_identical_to_plain": spec.tokens == result.tokens,
            })
            assert spec.stats.phases is not None
            for phase, seconds in spec.stats.phases["host_s"].items():
                phase_rows.append({"precision": label, "prompt_id": p.id, "phase": phase, "host_ms": seconds * 1e3,
                                   "device_ms": spec.stats.phases["device_s"].get(phase, float("nan")) * 1e3,
                                   "calls": spec.stats.phases["count"][phase]})
        del engine, drafter
    summary = []
    for label in dict.fromkeys(r["precision"] for r in rows):
        sel = [r for r in rows if r["precision"] == label]
        summary.append({"precision": label, **{m: statistics.fmean(float(r[m]) for r in sel) for m in (
            "tok_per_s", "spec_tok_per_s", "max_logit_diff", "max_logit_diff_rel", "agreement_with_fp32", "identical_to_fp32",
            "spec_identical_to_plain")}})
    params = asdict(cfg)
    params.update(model_source=loaded.source, device_resolved=str(device), cuda_graph_resolved=graphs, prompts=[p.id for p, _ in prompts])
    return {"benchmark": "precision", **provenance(device, params), "summary": summary, "phases": phase_rows, "rows": rows}
