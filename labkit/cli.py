"""`python -m labkit ...`: a thin argparse layer over labkit's dataclasses.

Bad input ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from labkit.cli_args import Parser, _csv, _ints, _model_args
from labkit.cli_bench import add_bench_parser, cmd_bench
from labkit.config import DRAFTERS, resolve_device, resolve_dtype
from labkit.errors import LabkitError


def _drafter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drafter", default=None, choices=DRAFTERS, help="speculative decoding with this drafter")
    p.add_argument("--heads", default=None, metavar="FOLDER", help="draft heads for --drafter heads (written by `python -m labkit heads train`)")
    p.add_argument("--draft-model", default=None, help="draft model (HF id or folder) sharing the target's tokenizer")
    p.add_argument("--layers", type=int, default=None, help="layer-skip / truncated depth (default: a third of the target)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m labkit", description="labkit: see, measure and speed up LLM decoding")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    g = sub.add_parser("generate", help="generate text and print speed and memory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=128, help="new tokens at most")
    _model_args(g)
    g.add_argument("--dtype", default=None, help="auto, float32, float16, bfloat16 (default: SPECDEC_DTYPE or auto)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", dest="chat", action="store_true", default=None, help="apply the chat template (default when the model has one)")
    g.add_argument("--no-chat", dest="chat", action="store_false")
    g.add_argument("--weights", default="auto", choices=["auto", "dense", "gguf"],
                   help="gguf: read the embedded model's own Q4_1 blocks (CPU, float32); auto: gguf where it applies")
    g.add_argument("--compile", action="store_true", help="torch.compile the fixed-shape decode step")
    g.add_argument("--cuda-graph", action="store_true", default=None, help="replay the fixed-shape steps as CUDA graphs (default: SPECDEC_CUDA_GRAPH)")
    g.add_argument("--layer-kernels", default="auto", choices=["auto", "triton", "cpu", "torch"],
                   help="Llama layers as 5 fused Triton kernels each (auto: on CUDA without --compile) or as PyTorch ops")
    g.add_argument("--max-seq-len", type=int, default=None,
                   help="KV cache positions, allocated once at load (default: the model's context, at most 8192)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead (adds per-step accepted lengths)")
    g.add_argument("--metrics-detailed", dest="metrics_detailed", action="store_true", default=None,
                   help="per-phase timings (CUDA events on a GPU); synchronises around each phase (default: SPECDEC_DETAILED_METRICS)")
    g.add_argument("--profile", default=None, metavar="TRACE.json", help="write a torch profiler trace of the request and print the top operators")
    _drafter_args(g)
    g.add_argument("--k", type=int, default=4, help="draft tokens per step")

    sw = sub.add_parser("sweep", help="every drafter at every K against plain greedy, in one run")
    sw.add_argument("--base-model", "--model", dest="model", default="default")
    sw.add_argument("--device", default="auto")
    sw.add_argument("--dtype", default=None)
    sw.add_argument("--weights", default="auto", choices=["auto", "dense", "gguf"])
    sw.add_argument("--drafter", type=_csv, default=None,
                    help="comma list of ngram, ngram-graph, layerskip, truncated, model, heads (default: ngram, or model with --draft-model)")
    sw.add_argument("--draft-model", default=None)
    sw.add_argument("--heads", default=None, metavar="FOLDER", help="draft heads for the heads drafter (python -m labkit heads train)")
    sw.add_argument("--layers", type=int, default=None, help="layer-skip / truncated depth (default: a third of the target)")
    sw.add_argument("--k", type=_csv, default=["1", "2", "4", "8"])
    sw.add_argument("--max-tokens", type=int, default=64)
    sw.add_argument("--iterations", type=int, default=1)
    sw.add_argument("--categories", type=_csv, default=None)
    sw.add_argument("--prompts-per-category", type=int, default=1)
    sw.add_argument("--temperature", type=float, default=0.0)
    sw.add_argument("--output-dir", default="results")
    sw.add_argument("--no-plots", action="store_true")
    sw.add_argument("--cuda-graph", action="store_true", default=None, help="CUDA graphs for the target's and drafts' fixed-shape steps")
    sw.add_argument("--compile", action="store_true", help="torch.compile the fixed-shape steps")
    sw.add_argument("--layer-kernels", default="auto", choices=["auto", "triton", "cpu", "torch"], help="fused Triton layers or PyTorch ops")
    sw.add_argument("--policy", type=_csv, default=["default"],
                    help="comma list: default, greedy, rejection (lossless), typical, topk (lossy), confidence (drafter-side early stop, lossless)")
    sw.add_argument("--controller", type=_csv, default=["fixed"], help="comma list: fixed, heuristic, aimd, cost (--k is then K max)")
    sw.add_argument("--replay", action="store_true",
                    help="also replay every controller on a recorded acceptance oracle with measured costs: K choices compared without run-to-run noise")
    sw.add_argument("--adaptive-k", type=_csv, default=None, help="comma list: K max of the adaptive controllers (default: every --k)")
    sw.add_argument("--posterior-threshold", type=float, default=0.09, help="typical acceptance")
    sw.add_argument("--posterior-alpha", type=float, default=0.3, help="typical acceptance")
    sw.add_argument("--policy-top-k", type=int, default=2, help="top-k agreement")
    sw.add_argument("--confidence", type=float, default=0.5, help="draft-confidence early stop threshold")

    d = sub.add_parser("doctor", help="GPU pre-check: device, memory, toolchain, kernels, and whether a model pair fits")
    _model_args(d)
    d.add_argument("--draft-model", default=None)
    d.add_argument("--dtype", default=None)
    d.add_argument("--seq-len", type=int, default=2048, help="KV cache length to budget for")
    d.add_argument("--json", action="store_true")

    kn = sub.add_parser("kernels", help="which kernel backends are available here and which one is chosen")
    kn.add_argument("--device", default="auto")
    kn.add_argument("--json", action="store_true")

    add_bench_parser(sub)

    hd = sub.add_parser("heads", help="Medusa-style draft heads for --drafter heads")
    hsub = hd.add_subparsers(dest="heads_command", required=True, parser_class=Parser)
    ht = hsub.add_parser("train", help="train draft heads on texts the target writes itself (no dataset, never the prompt suite)")
    _model_args(ht)
    ht.add_argument("--dtype", default=None, help="auto, float32, float16, bfloat16")
    ht.add_argument("--out", required=True, metavar="FOLDER", help="new folder for heads.safetensors and heads.json")
    ht.add_argument("--n-heads", type=int, default=4, help="draft tokens the heads can propose (K max)")
    ht.add_argument("--blocks", type=int, default=1, help="residual blocks per head")
    ht.add_argument("--texts", type=int, default=256, help="texts the target writes (a share is held out)")
    ht.add_argument("--sampled-tokens", type=int, default=8, help="tokens sampled at temperature 1 to start each text (--no-chat)")
    ht.add_argument("--user-tokens", type=int, default=48, help="at most this many tokens of each self-written user turn (chat)")
    ht.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                    help="texts are answers to self-written user turns in the chat template (default: when the model has one)")
    ht.add_argument("--greedy-tokens", type=int, default=128, help="greedy tokens per text after those: the labels")
    ht.add_argument("--steps", type=int, default=400)
    ht.add_argument("--batch-size", type=int, default=8)
    ht.add_argument("--lr", type=float, default=1e-3)
    ht.add_argument("--seed", type=int, default=0)
    return parser


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def cmd_generate(args: argparse.Namespace) -> int:
    from labkit.config import Flags, GenerationConfig, dtype_name

    config = GenerationConfig(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    config.validate()
    from labkit.generate import check_text

    check_text(args.prompt)  # before the slow part: text a tokenizer can take
    if not args.prompt.strip():
        raise LabkitError("the prompt is empty")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise LabkitError(f"--max-seq-len must be at least 2, got {args.max_seq_len}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or Flags.from_env().dtype, device)

    from labkit.engine import Engine
    from labkit.generate import MAX_K, generate_text
    from labkit.metrics.profiler import check_trace_path, profile, top_ops
    from labkit.models.loading import load_model

    if not 1 <= args.k <= MAX_K:
        raise LabkitError(f"--k must be at least 1 and at most {MAX_K}, got {args.k}")
    if args.heads and args.drafter in (None, "heads"):
        from labkit.specdec.heads import load_heads_config

        n_heads = load_heads_config(args.heads).n_heads
        if args.k > n_heads:
            raise LabkitError(f"these heads draft at most {n_heads} tokens per step (one per head), got --k {args.k}")
    trace_path = check_trace_path(args.profile) if args.profile else None  # before the slow part
    drafter_kind = args.drafter or ("model" if args.draft_model else "heads" if args.heads else None)
    from labkit.specdec.drafters import check_drafter_options

    check_drafter_options([drafter_kind] if drafter_kind else [], args.draft_model, args.heads)  # before the slow part
    if args.heads:
        from labkit.specdec.heads import check_heads_folder

        check_heads_folder(args.heads)  # before the slow part
    loaded = load_model(args.model)
    engine = Engine.from_loaded(loaded, device, dtype, weights=args.weights, compile=args.compile, cuda_graph=args.cuda_graph,
                                layer_kernels=args.layer_kernels, max_seq_len=args.max_seq_len)
    spec = None
    if drafter_kind:
        from labkit.generate import Speculation
        from labkit.specdec.drafters import build_drafter

        drafter = build_drafter(drafter_kind, engine, layers=args.layers, draft_model=args.draft_model, target_tokenizer=loaded.tokenizer,
                                heads_path=args.heads)
        spec = Speculation(drafter, k=args.k)
    if engine.cuda_graph or args.compile:  # capture and compile now, not inside the timed request
        from labkit.generate import warm_up

        warm_up(engine, args.k if spec else 0, drafter=spec.drafter if spec else None)
        if spec is not None:
            generate_text(engine, loaded.tokenizer, args.prompt, GenerationConfig(max_new_tokens=8), chat=args.chat, spec=spec)
    ops: list[dict[str, Any]] = []
    with profile(device) if trace_path else contextlib.nullcontext() as prof:
        result = generate_text(engine, loaded.tokenizer, args.prompt, config, chat=args.chat, spec=spec, detailed_metrics=args.metrics_detailed)
    if trace_path:
        assert prof is not None
        prof.export_chrome_trace(str(trace_path))
        ops = top_ops(prof, device)
    s = result.stats
    from labkit.bench.results import warn_if_busy

    warn_if_busy()  # after the request, so that bad input stays one line
    if args.json:
        out: dict[str, Any] = {
            "model": loaded.name, "device": str(device), "dtype": dtype_name(dtype), "weights": engine.weights, "weights_note": engine.weights_note,
            "layer_kernels": engine.layer_kernels, "text": result.text,
            "prompt_ids": result.prompt_ids, "token_ids": result.tokens, "stats": s.to_dict(),
        }
        if trace_path:
            out.update(profile_trace=str(trace_path), top_ops=ops)
        print(json.dumps(out))
        return 0
    print(result.text)
    print()
    warmed = " (after a warm-up: capture/compile)" if engine.cuda_graph or args.compile else ""
    weights = engine.weights + (f" ({engine.weights_note})" if engine.weights_note else "")
    print(f"[{loaded.name} on {device} {dtype_name(dtype)}, {weights} weights, {engine.layer_kernels} layers{warmed}] {s.new_tokens} new tokens in {s.total_s:.2f} s, stop: {s.stop_reason}")
    print(f"  throughput      {s.tok_per_s:.1f} tok/s (decode only {s.decode_tok_per_s:.1f} tok/s)")
    print(f"  time to first   {s.ttft_s * 1e3:.1f} ms ({s.prompt_tokens} prompt tokens)")
    print(f"  per token       {s.mean_token_latency_ms:.2f} ms")
    print(f"  peak memory     {_fmt_bytes(s.peak_memory_bytes)} ({s.memory_kind})")
    if spec is not None:
        print(f"  speculation     {s.drafter}, K={args.k}, {s.policy}: acceptance {s.acceptance_rate:.0%}, "
              f"{s.tau:.2f} tokens per target step, draft {s.draft_s:.2f} s / target {s.verify_s:.2f} s / other {s.other_s:.2f} s")
    if s.phases:
        print("  phases          " + "host ms".rjust(10) + ("device ms".rjust(11) if s.phases["device_s"] else "") + "  calls")
        for name, host in s.phases["host_s"].items():
            dev = s.phases["device_s"].get(name)
            print(f"    {name:<14}{host * 1e3:>10.2f}" + (f"{dev * 1e3:>11.2f}" if dev is not None else "") + f"  {s.phases['count'][name]:>5}")
    if trace_path:
        print(f"  profiler trace  {trace_path} (chrome://tracing or ui.perfetto.dev); top operators by self time:")
        for op in ops:
            print(f"    {op['share']:>6.1%} {op['self_us'] / 1e3:>9.2f} ms {op['calls']:>6}x  {op['name'][:70]}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from labkit.bench.sweep import SweepConfig, run_sweep

    ints = _ints("--k and --adaptive-k", args.k + (args.adaptive_k or []))  # one message for both lists
    ks, adaptive_ks = ints[: len(args.k)], (ints[len(args.k) :] or None)
    drafters = args.drafter or (["model"] if args.draft_model else ["ngram"])
    cfg = SweepConfig(
        base_model=args.model, draft_model=args.draft_model, heads=args.heads, drafters=drafters, layers=args.layers, ks=ks, adaptive_ks=adaptive_ks,
        max_new_tokens=args.max_tokens, iterations=args.iterations, categories=args.categories,
        prompts_per_category=args.prompts_per_category, device=args.device, dtype=args.dtype, weights=args.weights,
        temperature=args.temperature, output_dir=args.output_dir, plots=not args.no_plots, cuda_graph=args.cuda_graph,
        compile=args.compile, layer_kernels=args.layer_kernels, policies=args.policy, controllers=args.controller, posterior_threshold=args.posterior_threshold,
        posterior_alpha=args.posterior_alpha, policy_top_k=args.policy_top_k, confidence=args.confidence, replay=args.replay,
    )
    cfg.validate()
    resolve_device(args.device)
    try:
        payload = run_sweep(cfg)
    except ValueError as err:
        raise LabkitError(str(err)) from None
    note = payload["parameters"].get("weights_note")
    print(f"sweep on {payload['device']['name']}, {cfg.max_new_tokens} new tokens, weights {payload['parameters']['weights_resolved']}"
          + (f" ({note})" if note else ""))
    print(f"{'drafter':<22}{'policy':<18}{'controller':<11}{'K':>3}{'tok/s':>16}{'speedup':>16}{'accept':>8}{'tau':>6}"
          f"{'agree':>7}{'ppl':>7}{'identical':>10}")
    for r in payload["summary"]:
        policy = r["policy"] + ("" if r["lossless"] else "*")
        print(f"{r['drafter']:<22}{policy:<18}{r['controller']:<11}{r['k']:>3}{r['tok_per_s']:>9.1f} ± {r['tok_per_s_std']:<4.1f}"
              f"{r['speedup']:>9.2f} ± {r['speedup_std']:<4.2f}{r['acceptance_rate']:>7.0%}{r['tau']:>6.2f}"
              f"{r['agreement_with_plain']:>7.0%}{r['perplexity']:>7.2f}{r['identical_share']:>9.0%}")
    print("(* lossy policy: agreement, perplexity and identical measure its drift from plain decoding)")
    print("best lossless setting per category:")
    for r in payload["per_category"]:
        best = f"{r['drafter']} {r['policy']} {r['controller']} K={r['k']}: {r['speedup']:.2f}x" if r["drafter"] else "none faster"
        print(f"  {r['category']:<14} plain {r['plain_tok_per_s']:.1f} tok/s, {best}")
    for name, table in payload.get("adaptive_vs_fixed", {}).items():
        for r in table["overall"]:
            print(f"{name} (K max {r['adaptive_k_max']}) vs fixed K={r['fixed_k']} ({r['drafter']}, {r['policy']}): "
                  f"{r['adaptive_tok_per_s']:.1f} vs {r['fixed_tok_per_s']:.1f} tok/s = {r['ratio']:.3f}x")
        for r in table["per_category"]:
            spread = " (90% interval {:.3f}-{:.3f})".format(*r["ratio_ci90"]) if r["ratio_ci90"] else " (one run each: no interval)"
            print(f"  {r['category']:<14} {name} {r['adaptive_tok_per_s']:.1f} vs fixed K={r['best_fixed_k']} {r['best_fixed_tok_per_s']:.1f} tok/s"
                  f" = {r['ratio']:.3f}x{spread}")
        hits = [r for r in table["per_category"] if r["within_5pct"]]
        print(f"{name}: within 5% of the best fixed K in {len(hits)} of {len(table['per_category'])} categories")
    replayed = payload.get("replay", {})
    for drafter, result in replayed.get("drafters", {}).items():
        print(f"replay ({drafter}, {replayed['passes']} passes, modelled time from measured costs), per category over the best fixed K:")
        names = [n for n in result["overall"] if not n.startswith("fixed")]
        for r in result["per_category"]:
            ratios = ", ".join(f"{n} {r['ratio_to_best_fixed'][n]:.3f}x" for n in names)
            print(f"  {r['category']:<14} best {r['best_fixed']}: {ratios}")
        print("  overall tok/s: " + ", ".join(f"{n} {v:.1f}" for n, v in result["overall"].items()))
    if replayed.get("skipped"):
        print(f"replay skipped {', '.join(replayed['skipped'])}: their proposals depend on more than the context")
    misses = [m for m in payload["speedup_model"] if m["miss"]]
    print(f"speedup model: {len(payload['speedup_model']) - len(misses)} of {len(payload['speedup_model'])} fixed-K settings within 15%")
    for m in misses:
        print(f"  {m['drafter']} K={m['k']}: predicted {m['predicted_speedup']:.2f}x, measured {m['measured_speedup']:.2f}x: {m['why']}")
    for f in payload.get("files", []):
        print(f"wrote {f}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from labkit.config import Flags
    from labkit.doctor import run_doctor
    from labkit.models.loading import load_config

    if args.seq_len < 1:
        raise LabkitError(f"--seq-len must be at least 1, got {args.seq_len}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or Flags.from_env().dtype, device)
    models = [(args.model, load_config(args.model))]
    if args.draft_model:
        models.append((args.draft_model, load_config(args.draft_model)))
    r = run_doctor(device, models, dtype, args.seq_len)
    if args.json:
        print(json.dumps(r.to_dict()))
        return 0
    print(f"device           {r.device} ({r.device_name})")
    print(f"compute cap.     {r.compute_capability or '-'}")
    print(f"memory           {r.free_gib:.1f} GiB free of {r.total_gib:.1f} GiB")
    print(f"bf16             {'yes' if r.bf16 else 'no'}")
    print(f"nvcc             {r.nvcc or 'not found'}")
    print(f"triton           {r.triton or 'not installed'}")
    print(f"C compiler       {r.c_compiler or 'not found'}")
    print(f"CPU block kernel {r.cpu_block_kernel}" + (f", {r.cpu_kernel_path} path (CPU has: {r.cpu_instruction_sets})" if r.cpu_kernel_path else ""))
    load = f", load average {r.load_average}" if r.load_average is not None else ""
    print(f"CPU threads      {r.threads} (block kernel: {r.kernel_threads}; {r.physical_cores} physical cores{load})")
    print(f"CUDA graphs      {'available' if r.cuda_graphs else 'need a CUDA device'}")
    for fit in r.fits:
        verdict = "fits" if fit["fits"] else "DOES NOT FIT"
        print(f"{fit['model']:<16} ~{fit['estimate_gib']:.2f} GiB ({args.seq_len}-token cache): {verdict}")
    return 0


def cmd_heads_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from labkit.config import Flags
    from labkit.heads_train import HeadsTrainConfig, train_for_model
    from labkit.models.loading import load_model
    from labkit.specdec.heads import HeadsConfig, save_heads

    cfg = HeadsTrainConfig(heads=HeadsConfig(n_heads=args.n_heads, n_blocks=args.blocks), texts=args.texts,
                           sampled_tokens=args.sampled_tokens, user_tokens=args.user_tokens, greedy_tokens=args.greedy_tokens, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    cfg.validate()
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LabkitError(f"{out} already exists and is not an empty folder; choose a new --out (nothing was overwritten)")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or Flags.from_env().dtype, device)
    loaded = load_model(args.model)
    heads, report, target = train_for_model(loaded, device, dtype, cfg, chat=args.chat)
    save_heads(heads, out, target, {**report, "model_source": loaded.source, "device": str(device), "dtype": str(dtype),
                                    "arguments": vars(args)})
    top1 = ", ".join(f"head {j + 1} {a:.0%} (untrained {b:.0%})"
                     for j, (a, b) in enumerate(zip(report["held_out_top1"], report["held_out_top1_before"], strict=True)))
    print(f"trained {cfg.heads.n_heads} heads on {report['train_texts']} texts ({report['label_tokens']} labelled tokens), "
          f"loss {report['loss_first']:.2f} -> {report['loss_last']:.2f}")
    print(f"held-out top-1 ({report['held_out_texts']} texts): {top1}")
    print(f"wrote {out}; use it with --drafter heads --heads {out}")
    return 0


def cmd_kernels(args: argparse.Namespace) -> int:
    from labkit.kernels.registry import table

    rows = table(resolve_device(args.device))
    if args.json:
        print(json.dumps(rows))
        return 0
    for row in rows:
        print(f"{row['kernel']:<18} chosen: {row['chosen']:<7} cuda: {row['cuda']}; triton: {row['triton']}; torch: {row['torch']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from labkit.threads import apply_threads

        apply_threads(getattr(args, "threads", None))  # also for commands without --threads: LABKIT_THREADS, else the cores
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "sweep":
            return cmd_sweep(args)
        if args.command == "doctor":
            return cmd_doctor(args)
        if args.command == "kernels":
            return cmd_kernels(args)
        if args.command == "heads":
            return cmd_heads_train(args)
    except LabkitError as err:
        print(f"labkit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("labkit: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("labkit: error: out of memory; try a smaller model, --dtype float16 or fewer tokens", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if "out of memory" in str(err).lower():
            print(f"labkit: error: out of device memory ({str(err).splitlines()[0][:200]})", file=sys.stderr)
            return 2
        raise
    return 1
