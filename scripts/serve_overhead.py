"""What serving costs: the same requests through `labkit serve` (HTTP, SSE, detokenising) and
through the same engine in-process (`labkit bench serve --backend local`), in alternating rounds
of one run, at concurrency 1. Reports served over in-process output tok/s and the time to first
token added, per round and as medians.

    python scripts/serve_overhead.py --device cpu --rounds 3 --num-prompts 8 --max-tokens 64 --out results
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from labkit.bench.results import provenance, write_results  # noqa: E402
from labkit.bench.serve_client import ServeBenchConfig, _bench_http, _Local, _run, free_port, load_dataset, summarize, wait_for_server  # noqa: E402
from labkit.config import EngineConfig, resolve_device  # noqa: E402


def start_server(device: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "labkit", "serve", "--device", device, "--port", str(port), *extra], cwd=REPO,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, proc)
    except Exception:
        proc.kill()
        raise
    return proc, url


def main() -> None:
    import asyncio

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--cuda-graph", action="store_true")
    ap.add_argument("--weights", default="auto", help="the same for both (auto times a step at each load, and the two loads may choose apart)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    extra = ["--weights", args.weights, *(["--cuda-graph"] if args.cuda_graph else [])]
    proc, url = start_server(args.device, extra)
    try:
        common = dict(num_prompts=args.num_prompts, concurrency=1, max_tokens=args.max_tokens, output_dir=None, progress=False)
        http_cfg = ServeBenchConfig(backend="http", base_url=url, **common)
        local_cfg = ServeBenchConfig(backend="local", engine=EngineConfig(device=args.device, cuda_graph=args.cuda_graph or None, weights=args.weights), **common)
        prompts = load_dataset(http_cfg)
        local = _Local(local_cfg)
        asyncio.run(_bench_http(ServeBenchConfig(backend="http", base_url=url, **{**common, "num_prompts": 2}), prompts[:2]))  # warm the server
        asyncio.run(_run(local_cfg, prompts[:2], local.request))
        rounds = []
        for r in range(args.rounds):
            got = {}
            for backend in (("http", "local") if r % 2 == 0 else ("local", "http")):
                if backend == "http":
                    outputs, duration, _ = asyncio.run(_bench_http(http_cfg, prompts))
                else:
                    outputs, duration = asyncio.run(_run(local_cfg, prompts, local.request))
                got[backend] = summarize(outputs, duration)
            rounds.append({"served_over_local_tok_s": got["http"]["output_throughput"] / got["local"]["output_throughput"],
                           "ttft_added_ms": got["http"]["median_ttft_ms"] - got["local"]["median_ttft_ms"],
                           "served": got["http"], "local": got["local"]})
            print(f"round {r}: served {got['http']['output_throughput']:.1f} tok/s, in-process {got['local']['output_throughput']:.1f} tok/s "
                  f"= {rounds[-1]['served_over_local_tok_s']:.3f}; TTFT p50 {got['http']['median_ttft_ms']:.1f} vs {got['local']['median_ttft_ms']:.1f} ms", flush=True)
        local.close()
    finally:
        proc.terminate()
    summary = {"served_over_local_tok_s": statistics.median(r["served_over_local_tok_s"] for r in rounds),
               "ttft_added_ms": statistics.median(r["ttft_added_ms"] for r in rounds),
               "failed": sum(r["served"]["failed"] + r["local"]["failed"] for r in rounds)}
    print(f"served / in-process output tok/s: {summary['served_over_local_tok_s']:.3f} (median of {args.rounds}); "
          f"TTFT added: {summary['ttft_added_ms']:.2f} ms; failed requests: {summary['failed']}")
    if args.out:
        device = resolve_device(args.device)
        payload = {"benchmark": "serve-overhead", **provenance(device, vars(args)), "summary": summary, "rounds": rounds}
        for f in write_results(args.out, f"serve-overhead-{device.type}", payload, [{k: v for k, v in r.items() if not isinstance(v, dict)} for r in rounds]):
            print(f"wrote {f}")


if __name__ == "__main__":
    main()
