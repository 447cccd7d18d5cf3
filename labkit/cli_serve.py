"""`python -m labkit serve` (the OpenAI-compatible server) and `python -m labkit bench serve` (the client)."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from labkit.cli_args import _engine_args, _model_args, _results_args, engine_config
from labkit.errors import LabkitError


def add_serve_parser(sub: Any) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible server (chat and text completions, streaming, /metrics) over one engine")
    _model_args(s)
    _engine_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", default=None, help="the name /v1/models lists (default: --model)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting past this get 429")
    s.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may run (0: no limit); past it, 504")
    s.add_argument("--max-tokens", type=int, default=256, help="when a request names no max_tokens")
    s.add_argument("--drafter", default=None, help="speculation by default (a request may override it with its own 'drafter' field)")
    s.add_argument("--k", type=int, default=4, help="draft tokens per step (K max for adaptive controllers)")
    s.add_argument("--controller", default="auto", help="auto (cost-aware on a CPU, fixed K elsewhere), fixed, heuristic, aimd, cost")
    s.add_argument("--policy", default="default", help="default, greedy, rejection, typical, topk")
    s.add_argument("--draft-model", default=None, help="for --drafter model")
    s.add_argument("--heads", default=None, metavar="FOLDER", help="for --drafter heads or eagle (EAGLE heads; with --batch, EAGLE chains in every row)")
    s.add_argument("--layers", type=int, default=None, help="layer-skip / truncated depth")
    s.add_argument("--batch", type=int, default=0, metavar="N",
                   help="continuous batching over N slots, greedy (with --drafter ngram, ngram-graph or eagle: drafts in every row); 0: one request at a time")
    s.add_argument("--batch-slot-len", type=int, default=2048, help="positions per batch slot (prompt + max_tokens + K)")


def add_bench_serve_parser(bsub: Any) -> None:
    b = bsub.add_parser("serve", help="load an OpenAI-compatible server (or labkit in-process) and report TTFT, TPOT, ITL and throughput")
    b.add_argument("--backend", choices=["http", "local"], default="http", help="http: any OpenAI-compatible server; local: labkit's engine in-process")
    b.add_argument("--base-url", default="http://127.0.0.1:8000")
    _model_args(b)
    _engine_args(b)
    b.add_argument("--dataset", default="suite", help="suite (labkit's prompts) or a .jsonl file of {\"prompt\"} or {\"messages\"}")
    b.add_argument("--num-prompts", type=int, default=16)
    b.add_argument("--concurrency", "--max-concurrency", dest="concurrency", type=int, default=1, help="requests in flight at most")
    b.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (default inf: all at once)")
    b.add_argument("--max-tokens", type=int, default=128)
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--extra-body", default=None, help="JSON merged into each request, e.g. '{\"drafter\": \"ngram\", \"k\": 3}'")
    _results_args(b)


def cmd_serve(args: argparse.Namespace) -> int:
    from labkit.serve.app import ServeConfig
    from labkit.serve.worker import SpecDefaults

    for name, value in (("--port", args.port), ("--max-queue", args.max_queue), ("--max-tokens", args.max_tokens), ("--k", args.k)):
        if value < 1 or (name == "--port" and value > 65535):
            raise LabkitError(f"{name} must be a whole number of at least 1{' and at most 65535' if name == '--port' else ''}, got {value}")
    if args.request_timeout < 0:
        raise LabkitError(f"--request-timeout must be >= 0 (0: no limit), got {args.request_timeout}")
    spec = SpecDefaults(drafter=args.drafter if args.drafter not in (None, "none") else None, k=args.k, controller=args.controller, policy=args.policy)
    if args.batch < 0 or args.batch_slot_len < 2:
        raise LabkitError(f"--batch takes 0 (off) or a number of slots, --batch-slot-len at least 2; got {args.batch}, {args.batch_slot_len}")
    cfg = ServeConfig(host=args.host, port=args.port, served_model_name=args.served_model_name or args.model, max_queue=args.max_queue,
                      request_timeout_s=args.request_timeout or None, max_tokens_default=args.max_tokens, spec=spec,
                      batch=args.batch, batch_slot_len=args.batch_slot_len)
    return serve(cfg, args, engine_config(args))


def serve(cfg: Any, args: argparse.Namespace, engine_cfg: Any) -> int:
    import uvicorn

    from labkit.serve.app import build_app

    app, what = build_app(args.model, engine_cfg, cfg, args.draft_model, args.heads, args.layers)
    print(f"labkit serve: {what}, http://{cfg.host}:{cfg.port}/v1", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from labkit.bench.serve_client import ServeBenchConfig, run_serve_bench, serve_report

    try:
        extra = json.loads(args.extra_body) if args.extra_body else {}
    except json.JSONDecodeError:
        raise LabkitError(f"--extra-body is not JSON: {args.extra_body!r}") from None
    if not isinstance(extra, dict):
        raise LabkitError("--extra-body must be a JSON object")
    cfg = ServeBenchConfig(backend=args.backend, base_url=args.base_url, model=args.model, engine=engine_config(args), dataset=args.dataset,
                           num_prompts=args.num_prompts, concurrency=args.concurrency, request_rate=args.request_rate, max_tokens=args.max_tokens,
                           temperature=args.temperature, seed=args.seed, extra_body=extra, output_dir=None if args.no_write else args.output_dir)
    payload = run_serve_bench(cfg)
    print("\n".join(serve_report(payload)))
    return 0
