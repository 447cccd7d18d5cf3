"""`python -m labkit generate`: one request, its text, and what it measured."""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any

from labkit.cli_args import _engine_args, _model_args, engine_config
from labkit.config import CONTROLLERS, DRAFTERS, GenerationConfig
from labkit.errors import LabkitError


def add_generate_parser(sub: Any) -> None:
    g = sub.add_parser("generate", help="generate text and print speed and memory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=128, help="new tokens at most")
    _model_args(g)
    _engine_args(g)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", dest="chat", action="store_true", default=None, help="apply the chat template (default when the model has one)")
    g.add_argument("--no-chat", dest="chat", action="store_false")
    g.add_argument("--json", action="store_true", help="print one JSON object instead (adds per-step accepted lengths)")
    g.add_argument("--metrics-detailed", dest="metrics_detailed", action="store_true", default=None,
                   help="per-phase timings (CUDA events on a GPU); synchronises around each phase (default: SPECDEC_DETAILED_METRICS)")
    g.add_argument("--profile", default=None, metavar="TRACE.json", help="write a torch profiler trace of the request and print the top operators")
    add_drafter_args(g)
    g.add_argument("--k", type=int, default=4, help="draft tokens per step (K max for adaptive controllers)")
    g.add_argument("--controller", default="auto", choices=CONTROLLERS,
                   help="how many tokens to draft each step: auto (cost-aware on a CPU, fixed K elsewhere), fixed, heuristic, aimd, cost")


def add_drafter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drafter", default=None, choices=DRAFTERS, help="speculative decoding with this drafter")
    p.add_argument("--heads", default=None, metavar="FOLDER", help="draft heads for --drafter heads (written by `python -m labkit heads train`)")
    p.add_argument("--draft-model", default=None, help="draft model (HF id or folder) sharing the target's tokenizer")
    p.add_argument("--layers", type=int, default=None, help="layer-skip / truncated depth (default: a third of the target)")


def check_generate_args(args: argparse.Namespace) -> tuple[GenerationConfig, str | None]:
    """Everything about the request that can be checked before the model loads: the generation
    config, and the drafter it asks for (None: plain decoding)."""
    from labkit.generate import MAX_K, check_text
    from labkit.specdec.drafters import check_drafter_options

    config = GenerationConfig(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    config.validate()
    check_text(args.prompt)  # text a tokenizer can take
    if not args.prompt.strip():
        raise LabkitError("the prompt is empty")
    if not 1 <= args.k <= MAX_K:
        raise LabkitError(f"--k must be at least 1 and at most {MAX_K}, got {args.k}")
    drafter_kind = args.drafter or ("model" if args.draft_model else heads_kind(args.heads) if args.heads else None)
    check_drafter_options([drafter_kind] if drafter_kind else [], args.draft_model, args.heads)
    if drafter_kind == "heads":
        from labkit.specdec.heads import load_heads_config

        n_heads = load_heads_config(args.heads).n_heads
        if args.k > n_heads:
            raise LabkitError(f"these heads draft at most {n_heads} tokens per step (one per head), got --k {args.k}")
    return config, drafter_kind


def heads_kind(folder: str) -> str:
    """The drafter a --heads folder serves by default: its draft heads, else its EAGLE head."""
    from pathlib import Path

    return "eagle" if (Path(folder) / "eagle.json").is_file() and not (Path(folder) / "heads.json").is_file() else "heads"


def cmd_generate(args: argparse.Namespace) -> int:
    from labkit.bench.results import warn_if_busy
    from labkit.config import dtype_name
    from labkit.engine_build import from_config
    from labkit.generate import Speculation, generate_text, warm_up
    from labkit.metrics.profiler import check_trace_path, profile, top_ops
    from labkit.models.loading import load_model
    from labkit.specdec.controllers import make_controller
    from labkit.specdec.drafters import build_drafter

    config, drafter_kind = check_generate_args(args)
    engine_cfg = engine_config(args)
    trace_path = check_trace_path(args.profile) if args.profile else None  # before the slow part
    loaded = load_model(args.model)
    engine = from_config(loaded, engine_cfg)
    spec = None
    if drafter_kind:
        drafter = build_drafter(drafter_kind, engine, layers=args.layers, draft_model=args.draft_model, target_tokenizer=loaded.tokenizer,
                                heads_path=args.heads)
        spec = Speculation(drafter, k=args.k, controller=make_controller(args.controller, args.k, engine.device.type))
    if engine.cuda_graph or engine.compiled:  # capture and compile now, not inside the timed request
        warm_up(engine, args.k if spec else 0, drafter=spec.drafter if spec else None)
        if spec is not None:
            generate_text(engine, loaded.tokenizer, args.prompt, GenerationConfig(max_new_tokens=8), chat=args.chat, spec=spec)
    ops: list[dict[str, Any]] = []
    with profile(engine.device) if trace_path else contextlib.nullcontext() as prof:
        result = generate_text(engine, loaded.tokenizer, args.prompt, config, chat=args.chat, spec=spec, detailed_metrics=args.metrics_detailed)
    if trace_path and prof is not None:
        prof.export_chrome_trace(str(trace_path))
        ops = top_ops(prof, engine.device)
    warn_if_busy()  # after the request, so that bad input stays one line
    s = result.stats
    if args.json:
        out: dict[str, Any] = {
            "model": loaded.name, "device": str(engine.device), "dtype": dtype_name(engine.dtype), "weights": engine.weights,
            "weights_note": engine.weights_note, "layer_kernels": engine.layer_kernels, "text": result.text,
            "prompt_ids": result.prompt_ids, "token_ids": result.tokens, "stats": s.to_dict(),
        }
        if trace_path:
            out.update(profile_trace=str(trace_path), top_ops=ops)
        print(json.dumps(out))
        return 0
    warmed = " (after a warm-up: capture/compile)" if engine.cuda_graph or engine.compiled else ""
    weights = engine.weights + (f" ({engine.weights_note})" if engine.weights_note else "")
    print(result.text, "", sep="\n")
    print(f"[{loaded.name} on {engine.device} {dtype_name(engine.dtype)}, {weights} weights, {engine.layer_kernels} layers{warmed}] "
          f"{s.new_tokens} new tokens in {s.total_s:.2f} s, stop: {s.stop_reason}")
    print("\n".join(s.report()))
    if trace_path:
        print(f"  profiler trace  {trace_path} (chrome://tracing or ui.perfetto.dev); top operators by self time:")
        for op in ops:
            print(f"    {op['share']:>6.1%} {op['self_us'] / 1e3:>9.2f} ms {op['calls']:>6}x  {op['name'][:70]}")
    return 0
