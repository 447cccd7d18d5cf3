"""Long context: time to first token and decode speed against the prompt's length, in one run.

Systems, on the same prompts (labkit/prompts/long.py: documents cut to an exact token count,
then a request to summarise them), greedy, EOS blocked until max_new_tokens:
- labkit_plain: the engine as `generate` runs it by default here (CUDA graphs over the fused
  layers on a GPU; the GGUF's blocks on a CPU where they apply);
- labkit_<drafter>: the same engine with the best lossless drafter (prompt lookup on the device,
  ngram-graph, on a GPU with graphs; ngram elsewhere) and the K controller `generate` gives a
  user (auto: cost-aware on a CPU, fixed K elsewhere), checked token for token against plain;
- hf_generate: transformers `generate` (SDPA attention); its time to first token is read by a
  streamer when the first new token comes out;
- hf_forward: one transformers forward over the prompt (the last position's logits, as
  generate's prefill computes them): what a prompt costs without any decoding.

Per system and length: median time to first token, median decode tok/s (tokens after the first
over the time after it) and end-to-end tok/s. Systems take turns at each length.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from labkit.bench.common import finish_log, log2_panels, rotated, run_params, start_log, time_hf_generate
from labkit.bench.results import provenance, warn_if_busy
from labkit.config import EngineConfig, GenerationConfig, device_name, dtype_name, resolve_device
from labkit.engine import Engine
from labkit.engine_build import from_config
from labkit.errors import LabkitError
from labkit.generate import Speculation, generate, warm_up
from labkit.metrics.timers import now, synchronize
from labkit.models.loading import LoadedModel, load_model
from labkit.prompts.long import long_prompt, min_tokens
from labkit.specdec.controllers import Controller, make_controller
from labkit.specdec.draft import Drafter
from labkit.specdec.drafters import build_drafter

GPU_LENGTHS = [32, 128, 512, 800, 1024, 2048, 4096, 8064]  # 8064 + 128 new tokens fill SmolLM2's 8,192 positions
CPU_LENGTHS = [32, 128, 512, 1024, 2048]


@dataclass
class ContextConfig:
    model: str = "default"
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(dtype="auto", cuda_graph=True))  # CUDA graphs: labkit's fast path (CUDA only)
    lengths: list[int] | None = None  # prompt tokens; None: GPU_LENGTHS on a GPU, CPU_LENGTHS elsewhere
    max_new_tokens: int = 128
    drafter: str = "auto"  # "auto": ngram-graph on a GPU with CUDA graphs, ngram elsewhere; "none": plain only
    k: int = 0  # draft tokens per step; 0: 8 for ngram-graph, 3 otherwise
    repeats: int = 2
    hf: bool = True  # also transformers generate and its forward over the prompt
    chat: bool = True  # the chat template around the documents
    output_dir: str | None = "results"  # None: write nothing
    progress: bool = True

    def validate(self) -> None:
        if self.max_new_tokens < 2:
            raise LabkitError(f"max new tokens must be at least 2 (decode speed needs a token after the first), got {self.max_new_tokens}")
        if self.repeats < 1:
            raise LabkitError(f"repeats must be at least 1, got {self.repeats}")
        if self.k < 0:
            raise LabkitError(f"K must be at least 1 (or 0 for the drafter's default), got {self.k}")
        if self.lengths is not None and (not self.lengths or min(self.lengths) < 1):
            raise LabkitError(f"prompt lengths must be positive, got {self.lengths}")
        if self.drafter not in ("auto", "none", "ngram", "ngram-graph"):
            raise LabkitError(f"drafter must be auto, none, ngram or ngram-graph (the lossless drafters with no weights), got {self.drafter!r}")
        self.engine.validate()


class _FirstTokenClock:
    """A transformers streamer that notes when generate hands out its first new token."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.calls, self.first = device, 0, 0.0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.first = now(self.device)

    def end(self) -> None:
        pass


def time_hf_generate_ttft(hf_model: Any, prompt_ids: list[int], gen: GenerationConfig, device: torch.device) -> tuple[list[int], float, float]:
    """transformers generate (common.time_hf_generate): (new tokens, seconds to the first token, seconds in all)."""
    clock = _FirstTokenClock(device)
    start = now(device)
    tokens, total = time_hf_generate(hf_model, prompt_ids, gen, device, streamer=clock)
    return tokens, clock.first - start, total


def time_hf_forward(hf_model: Any, prompt_ids: list[int], device: torch.device, repeats: int) -> float:
    """Median seconds of one transformers forward over the prompt (last position's logits)."""
    ids = torch.tensor([prompt_ids], device=device)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first is a warm-up
            synchronize(device)
            t0 = time.perf_counter()
            hf_model(ids, logits_to_keep=1)
            synchronize(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _row(system: str, length: int, rep: int, tokens: list[int], ttft_s: float, total_s: float, plain: list[int] | None,
         result: Any = None) -> dict[str, Any]:
    decode_s = total_s - ttft_s
    row = {"system": system, "prompt_tokens": length, "repeat": rep, "new_tokens": len(tokens), "ttft_ms": ttft_s * 1e3,
           "total_s": total_s, "tok_per_s": len(tokens) / total_s, "decode_tok_per_s": (len(tokens) - 1) / decode_s if decode_s > 0 else 0.0,
           "identical_to_plain": plain is None or tokens == plain}
    if result is not None and result.stats.accepted_lengths:
        row.update(tau=result.stats.tau, acceptance_rate=result.stats.acceptance_rate)
    return row


@dataclass
class _Systems:
    """What one context run times: our engine plain and with its drafter, and transformers."""

    engine: Engine
    drafter: Drafter | None
    kind: str  # the drafter's kind, or "none"
    k: int
    controller: Controller | None  # K max k, "auto": cost-aware on a CPU (a fixed K loses there), fixed K elsewhere
    hf_model: Any  # None: transformers not timed
    names: list[str]

    def run(self, system: str, ids: list[int], gen: GenerationConfig) -> dict[str, Any]:
        if system == "hf_generate":
            tokens, ttft, total = time_hf_generate_ttft(self.hf_model, ids, gen, self.engine.device)
            return {"tokens": tokens, "ttft": ttft, "total": total, "result": None}
        spec = Speculation(self.drafter, self.k, controller=self.controller) if system != "labkit_plain" and self.drafter is not None else None
        result = generate(self.engine, ids, gen, spec)
        return {"tokens": result.tokens, "ttft": result.stats.ttft_s, "total": result.stats.total_s, "result": result}


def _systems(cfg: ContextConfig, loaded: LoadedModel, device: torch.device, context: int) -> _Systems:
    graphs = bool(cfg.engine.cuda_graph) and device.type == "cuda"
    engine_cfg = dataclasses.replace(cfg.engine, cuda_graph=graphs, max_seq_len=cfg.engine.max_seq_len or context)
    engine = from_config(loaded, engine_cfg)
    kind = ("ngram-graph" if graphs else "ngram") if cfg.drafter == "auto" else cfg.drafter
    k = cfg.k or (8 if kind == "ngram-graph" else 3)
    drafter = build_drafter(kind, engine) if kind != "none" else None
    hf_model = copy.deepcopy(loaded.hf_model).to(device=device, dtype=engine.dtype).eval() if cfg.hf else None
    names = ["labkit_plain", *([f"labkit_{kind}"] if drafter is not None else []), *(["hf_generate"] if hf_model is not None else [])]
    warm_up(engine, k if drafter is not None else 0)
    controller = make_controller("auto", k, device.type) if drafter is not None else None  # what generate gives a user
    return _Systems(engine, drafter, kind, k, controller, hf_model, names)


def _check_lengths(cfg: ContextConfig, lengths: list[int], tokenizer: Any, context: int) -> None:
    shortest = min_tokens(tokenizer, cfg.chat)
    if lengths[0] < shortest:
        raise LabkitError(f"the shortest prompt this frame allows is {shortest} tokens; got {lengths[0]}")
    if lengths[-1] + cfg.max_new_tokens > context:
        raise LabkitError(f"a {lengths[-1]}-token prompt and {cfg.max_new_tokens} new tokens exceed the model's context of {context}")


def _measure_length(cfg: ContextConfig, systems: _Systems, n: int, ids: list[int], first: int) -> tuple[list[dict[str, Any]], float | None]:
    """Every system on one prompt length, `repeats` times in rotating order: rows, and one
    transformers forward over the prompt (ms; None without transformers)."""
    short = GenerationConfig(max_new_tokens=4)  # untimed: first passes at this length (kernel choices, allocations)
    for system in systems.names:
        systems.run(system, ids, short)
    forward = time_hf_forward(systems.hf_model, ids, systems.engine.device, cfg.repeats) * 1e3 if systems.hf_model is not None else None
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.max_new_tokens)
    rows = []
    for rep in range(cfg.repeats):
        got = {system: systems.run(system, ids, gen) for system in rotated(systems.names, first + rep)}
        plain = got["labkit_plain"]["tokens"]
        for system in systems.names:
            g = got[system]
            rows.append(_row(system, n, rep, g["tokens"], g["ttft"], g["total"], None if system == "labkit_plain" else plain, g["result"]))
    return rows, forward


def run_context(cfg: ContextConfig, loaded: LoadedModel | None = None) -> dict[str, Any]:
    cfg.validate()
    device = resolve_device(cfg.engine.device)
    lengths = sorted(set(cfg.lengths or (GPU_LENGTHS if device.type == "cuda" else CPU_LENGTHS)))
    log = start_log(cfg.output_dir, f"context-{device.type}")  # before anything is measured
    loaded = loaded or load_model(cfg.model)
    context = loaded.hf_model.config.max_position_embeddings
    _check_lengths(cfg, lengths, loaded.tokenizer, context)
    systems = _systems(cfg, loaded, device, context)
    rows: list[dict[str, Any]] = []
    forward_ms: dict[int, float] = {}
    for i, n in enumerate(tqdm(lengths, desc="context", disable=not cfg.progress)):
        length_rows, forward = _measure_length(cfg, systems, n, long_prompt(loaded.tokenizer, n, cfg.chat), i)
        rows += length_rows
        if forward is not None:
            forward_ms[n] = forward
        for row in length_rows:
            if log:
                log.add(row)
    summary = summarize(rows, forward_ms)
    engine = systems.engine
    params = run_params(cfg)
    params.update(model_source=loaded.source, device_resolved=str(device), dtype_resolved=dtype_name(engine.dtype), lengths_resolved=lengths,
                  drafter_resolved=systems.kind, k_resolved=systems.k,
                  controller_resolved=systems.controller.name if systems.controller else "", weights=engine.weights, layer_kernels=engine.layer_kernels,
                  max_seq_len=engine.max_seq_len)
    payload: dict[str, Any] = {"benchmark": "context", **provenance(device, params), "card": device_name(device), "summary": summary,
                               "hf_forward_ms": {str(n): ms for n, ms in forward_ms.items()}, "targets": targets(summary, forward_ms)}
    files = finish_log(log, payload, rows)
    if files:
        png = Path(files[0]).with_suffix(".png")
        plot_context(payload, png)
        files.append(str(png))
    payload["rows"] = rows
    warn_if_busy()  # after the run: a competing process shows in the load average
    return payload


def summarize(rows: list[dict[str, Any]], forward_ms: dict[int, float]) -> list[dict[str, Any]]:
    """Per system and prompt length: medians over the repeats."""
    out = []
    for system in dict.fromkeys(r["system"] for r in rows):
        for n in sorted({r["prompt_tokens"] for r in rows if r["system"] == system}):
            sel = [r for r in rows if r["system"] == system and r["prompt_tokens"] == n]
            entry: dict[str, Any] = {
                "system": system, "prompt_tokens": n, "runs": len(sel),
                "ttft_ms": statistics.median(r["ttft_ms"] for r in sel),
                "decode_tok_per_s": statistics.median(r["decode_tok_per_s"] for r in sel),
                "tok_per_s": statistics.median(r["tok_per_s"] for r in sel),
                "identical_share": sum(r["identical_to_plain"] for r in sel) / len(sel),
                "hf_forward_ms": forward_ms.get(n),
            }
            if "tau" in sel[0]:
                entry["tau"] = statistics.median(r["tau"] for r in sel)
            out.append(entry)
    return out


def targets(summary: list[dict[str, Any]], forward_ms: dict[int, float]) -> dict[str, Any]:
    """The long-context figures the project tracks, where the run measured them, per prompt
    length: plain decode speed there over the shortest prompt's, time to first token over
    transformers' forward over the same prompt, end-to-end tok/s, and each drafter's speed-up."""
    plain = {e["prompt_tokens"]: e for e in summary if e["system"] == "labkit_plain"}
    if not plain:
        return {}
    short = min(plain)
    out: dict[str, Any] = {
        "shortest": short,
        "decode_retained": {n: e["decode_tok_per_s"] / plain[short]["decode_tok_per_s"] for n, e in plain.items()},
        "ttft_ms": {n: e["ttft_ms"] for n, e in plain.items()},
        "ttft_over_hf_forward": {n: e["ttft_ms"] / forward_ms[n] for n, e in plain.items() if n in forward_ms},
        "tok_per_s": {n: e["tok_per_s"] for n, e in plain.items()},
    }
    spec = [e for e in summary if e["system"].startswith("labkit_") and e["system"] != "labkit_plain"]
    if spec:
        out["speculative_identical_share"] = min(e["identical_share"] for e in spec)
        out["speculative_speedup"] = {e["prompt_tokens"]: e["tok_per_s"] / plain[e["prompt_tokens"]]["tok_per_s"] for e in spec}
    return out


def context_report(payload: dict[str, Any]) -> list[str]:
    """The lines `labkit bench context` prints: per system and length, and the targets."""
    out = [f"context on {payload['card']}, {payload['parameters']['max_new_tokens']} new tokens, median of {payload['parameters']['repeats']}",
           f"{'system':<22}{'prompt':>8}{'TTFT ms':>10}{'decode t/s':>12}{'tok/s':>9}{'identical':>11}{'HF fwd ms':>11}"]
    for e in payload["summary"]:
        fwd = f"{e['hf_forward_ms']:>11.1f}" if e["hf_forward_ms"] is not None else ""
        out.append(f"{e['system']:<22}{e['prompt_tokens']:>8}{e['ttft_ms']:>10.1f}{e['decode_tok_per_s']:>12.1f}{e['tok_per_s']:>9.1f}"
                   f"{e['identical_share']:>10.0%}{fwd}")
    t = payload["targets"]
    for n, kept in t.get("decode_retained", {}).items():
        line = f"at {n:>5} prompt tokens plain decode keeps {kept:.0%} of its speed at {t['shortest']}"
        if n in t["ttft_over_hf_forward"]:
            line += f"; TTFT {t['ttft_ms'][n]:.1f} ms = {t['ttft_over_hf_forward'][n]:.2f}x one transformers forward"
        out.append(line)
    return out + [f"wrote {f}" for f in payload.get("files", [])]


def plot_context(payload: dict[str, Any], path: Any = None) -> Any:
    """Time to first token and decode tok/s against prompt length, one line per system."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    summary = payload["summary"]
    for system in dict.fromkeys(e["system"] for e in summary):
        sel = [e for e in summary if e["system"] == system]
        xs = [e["prompt_tokens"] for e in sel]
        ax1.plot(xs, [e["ttft_ms"] for e in sel], marker="o", label=system)
        ax2.plot(xs, [e["decode_tok_per_s"] for e in sel], marker="o", label=system)
    forward = {int(n): ms for n, ms in payload.get("hf_forward_ms", {}).items()}
    if forward:
        ax1.plot(sorted(forward), [forward[n] for n in sorted(forward)], marker="x", linestyle="--", label="hf_forward (prompt only)")
    ax1.set_yscale("log")
    log2_panels(fig, [(ax1, "time to first token (ms)"), (ax2, "decode tok/s")], "prompt tokens",
                f"{payload.get('card', '')}, {payload['parameters'].get('dtype_resolved', '')}", path)
    if path is not None:
        plt.close(fig)
    return fig
