"""`python -m labkit bench ...`: the benchmarks' command line (baseline, kernels, context, batch, serve), a thin
layer over labkit.bench; the printing sits beside the code that produces the numbers where it can."""

from __future__ import annotations

import argparse
from typing import Any

from labkit.cli_args import Parser, _csv, _engine_args, _ints, _model_args, _results_args, engine_config
from labkit.cli_serve import add_bench_serve_parser
from labkit.config import resolve_device, resolve_dtype
from labkit.errors import LabkitError


def add_bench_parser(sub: Any) -> None:
    """The `bench` command and its subcommands, on the main parser's subparsers."""
    b = sub.add_parser("bench", help="benchmarks that write results/")
    bsub = b.add_subparsers(dest="bench", required=True, parser_class=Parser)
    bb = bsub.add_parser("baseline", help="our engine against Hugging Face generate, in one run")
    _model_args(bb)
    bb.add_argument("--dtype", type=_csv, default=["auto"], help="comma list, each run for both systems, e.g. float32,float16")
    bb.add_argument("--max-tokens", type=int, default=128)
    bb.add_argument("--prompts-per-category", type=int, default=1)
    bb.add_argument("--categories", type=_csv, default=None)
    bb.add_argument("--repeats", type=int, default=2)
    bb.add_argument("--chat", dest="chat", action="store_true", default=None)
    bb.add_argument("--no-chat", dest="chat", action="store_false")
    bb.add_argument("--no-gguf", action="store_true", help="skip our engine on the GGUF's own blocks")
    bb.add_argument("--gguf-q8", action="store_true", help="also time the GGUF's blocks with 8-bit activations (--weights gguf-q8)")
    bb.add_argument("--compile", action="store_true", help="on CUDA, also time torch.compile'd steps inside CUDA graphs")
    bb.add_argument("--llama-cpp", choices=["auto", "on", "off"], default="auto",
                    help="llama.cpp on the same GGUF, CPU float32 (auto: where llama-cpp-python is installed)")
    _results_args(bb)
    bk = bsub.add_parser("kernels", help="each kernel backend against the launch and bytes floors, in one run")
    bk.add_argument("--device", default="auto")
    bk.add_argument("--repeats", type=int, default=50)
    _results_args(bk, no_write=False)
    add_bench_serve_parser(bsub)
    bc = bsub.add_parser("context", help="time to first token and decode tok/s against prompt length, labkit and transformers in one run")
    _model_args(bc)
    _engine_args(bc, cuda_graph_default=True)
    bc.add_argument("--lengths", type=_csv, default=None, help="prompt tokens, comma list (default: 32 to 8064 on a GPU, 32 to 2048 on a CPU)")
    bc.add_argument("--max-tokens", type=int, default=128)
    bc.add_argument("--drafter", default="auto", choices=["auto", "none", "ngram", "ngram-graph"],
                    help="the lossless drafter beside plain decoding (auto: ngram-graph on a GPU, ngram on a CPU)")
    bc.add_argument("--k", type=int, default=0, help="draft tokens per step (default: 8 for ngram-graph, 3 for ngram)")
    bc.add_argument("--repeats", type=int, default=2)
    bc.add_argument("--no-hf", action="store_true", help="skip transformers generate and its forward")
    bc.add_argument("--no-chat", dest="chat", action="store_false", default=True)
    _results_args(bc)
    bt = bsub.add_parser("batch", help="continuous batching: aggregate and per-request tok/s, ITL and TTFT against batch size")
    _model_args(bt)
    _engine_args(bt)
    bt.add_argument("--sizes", type=_csv, default=None, help="batch sizes, comma list (default: 1..64 on a GPU, 1,2,4,8 on a CPU)")
    bt.add_argument("--no-invariant", dest="invariant", action="store_false", help="skip plain decoding in invariant mode")
    bt.add_argument("--drafter", choices=["ngram", "none"], default="ngram", help="speculation in every row (prompt lookup), or none")
    bt.add_argument("--k", type=int, default=3, help="draft tokens per row and step")
    bt.add_argument("--heads", default=None, help="a trained EAGLE head's folder: also eagle-device-K (EAGLE chains drafted inside each batched verify) and eagle-mix-device-K (those or prompt lookup's copies)")
    bt.add_argument("--max-tokens", type=int, default=64)
    bt.add_argument("--requests-per-slot", type=int, default=2)
    bt.add_argument("--min-requests", type=int, default=8, help="at least this many requests per run (8: one per category of the suite)")
    bt.add_argument("--length-spread", type=float, default=0.0,
                    help="each request's new tokens drawn (seeded) from max-tokens x [1 - s, 1 + s]: rows that end apart (0: all equal)")
    bt.add_argument("--prompt-tokens", type=int, default=0, help="long prompts of this many tokens (documents to summarise) instead of the suite's")
    bt.add_argument("--repeats", type=int, default=None, help="timed runs per system and size, taking turns; rows are medians (default: 3 on a GPU, 1 on a CPU)")
    bt.add_argument("--slot-len", type=int, default=1024, help="positions per slot (prompt + new tokens)")
    _results_args(bt)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench == "baseline":
        from labkit.bench.baseline import BaselineConfig, baseline_report, run_baseline

        for name, value in (("--max-tokens", args.max_tokens), ("--repeats", args.repeats), ("--prompts-per-category", args.prompts_per_category)):
            if value < 1:
                raise LabkitError(f"{name} must be at least 1, got {value}")
        device = resolve_device(args.device)
        for d in args.dtype:
            resolve_dtype(d, device)
        cfg = BaselineConfig(
            model=args.model, device=args.device, dtypes=args.dtype, max_new_tokens=args.max_tokens,
            prompts_per_category=args.prompts_per_category, categories=args.categories, repeats=args.repeats,
            chat=args.chat, gguf_weights=not args.no_gguf, gguf_q8=args.gguf_q8, compile=args.compile, llama_cpp=args.llama_cpp,
            output_dir=None if args.no_write else args.output_dir,
        )
        try:
            payload = run_baseline(cfg)
        except ValueError as err:  # unknown category and similar
            raise LabkitError(str(err)) from None
        print("\n".join(baseline_report(payload)))
        return 0
    if args.bench == "kernels":
        from labkit.bench.kernels import KernelBenchConfig, kernels_payload, kernels_report, run_kernel_bench
        from labkit.bench.results import write_results

        if args.repeats < 1:
            raise LabkitError(f"--repeats must be at least 1, got {args.repeats}")
        from labkit.bench.results import check_output_dir

        check_output_dir(args.output_dir)  # before anything is measured
        device = resolve_device(args.device)
        result = run_kernel_bench(device, KernelBenchConfig(repeats=args.repeats))
        payload = kernels_payload(device, result)
        print("\n".join(kernels_report(result)))
        for f in write_results(args.output_dir, f"kernels-{device.type}", payload, result["rows"]):
            print(f"wrote {f}")
        return 0
    if args.bench == "context":
        return cmd_bench_context(args)
    if args.bench == "batch":
        return cmd_bench_batch(args)
    if args.bench == "serve":
        from labkit.cli_serve import cmd_bench_serve

        return cmd_bench_serve(args)
    raise LabkitError(f"unknown benchmark {args.bench!r}")


def cmd_bench_batch(args: argparse.Namespace) -> int:
    from labkit.bench.batch import BatchBenchConfig, run_batch_bench
    from labkit.bench.batch_report import batch_report

    cfg = BatchBenchConfig(model=args.model, engine=engine_config(args), sizes=_ints("--sizes", args.sizes) if args.sizes else None,
                           invariant=args.invariant, drafter=args.drafter, heads=args.heads, k=args.k, max_new_tokens=args.max_tokens, length_spread=args.length_spread, requests_per_slot=args.requests_per_slot, min_requests=args.min_requests, prompt_tokens=args.prompt_tokens, repeats=args.repeats,
                           max_seq_len=args.slot_len, output_dir=None if args.no_write else args.output_dir)
    cfg.validate()
    payload = run_batch_bench(cfg)  # checks where its results go before it measures anything
    print("\n".join(batch_report(payload)))
    return 0


def cmd_bench_context(args: argparse.Namespace) -> int:
    from labkit.bench.context import ContextConfig, context_report, run_context

    cfg = ContextConfig(model=args.model, engine=engine_config(args), lengths=_ints("--lengths", args.lengths) if args.lengths else None,
                        max_new_tokens=args.max_tokens, drafter=args.drafter, k=args.k, repeats=args.repeats, hf=not args.no_hf,
                        chat=args.chat, output_dir=None if args.no_write else args.output_dir)
    cfg.validate()
    payload = run_context(cfg)  # checks where its results go before it measures anything
    print("\n".join(context_report(payload)))
    return 0
