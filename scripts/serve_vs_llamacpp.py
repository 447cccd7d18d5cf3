"""labkit's server beside llama.cpp's (llama-cpp-python[server]) on the CPU: the same GGUF file,
prompts, client (`labkit bench serve`'s), threads and greedy decoding, in alternating rounds of
one run. Both servers stay up; only one is loaded at a time.

    pip install 'llama-cpp-python[server]'   (builds from source: cmake and a C++ compiler)
    python scripts/serve_vs_llamacpp.py --rounds 3 --num-prompts 8 --max-tokens 64 --concurrency 1 --out results
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from labkit.bench.results import provenance, write_results  # noqa: E402
from labkit.bench.serve_client import ServeBenchConfig, _bench_http, free_port, load_dataset, summarize, wait_for_server  # noqa: E402
from labkit.config import resolve_device  # noqa: E402
from labkit.models.loading import embedded_gguf_path  # noqa: E402
from labkit.threads import resolve_threads  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    threads = resolve_threads(None)
    gguf = embedded_gguf_path()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ports = {"labkit": free_port(), "llama.cpp": free_port()}
    procs = {
        "labkit": subprocess.Popen([sys.executable, "-m", "labkit", "serve", "--device", "cpu", "--port", str(ports["labkit"]), "--threads", str(threads)],
                                   cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        "llama.cpp": subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(ports["llama.cpp"]),
                                       "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "4096", "--model_alias", "default"],
                                      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    }
    rounds = []
    try:
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        for name, url in urls.items():
            wait_for_server(url, procs[name])
        cfgs = {name: ServeBenchConfig(backend="http", base_url=url, num_prompts=args.num_prompts, concurrency=args.concurrency,
                                       max_tokens=args.max_tokens, output_dir=None, progress=False) for name, url in urls.items()}
        prompts = load_dataset(cfgs["labkit"])
        for name in urls:  # warm both
            asyncio.run(_bench_http(cfgs[name], prompts[:2]))
        for r in range(args.rounds):
            got = {}
            for name in (list(urls) if r % 2 == 0 else list(urls)[::-1]):
                outputs, duration, _ = asyncio.run(_bench_http(cfgs[name], prompts))
                got[name] = summarize(outputs, duration)
            rounds.append({"labkit_over_llamacpp_tok_s": got["labkit"]["output_throughput"] / got["llama.cpp"]["output_throughput"], **got})
            print(f"round {r}: " + ", ".join(f"{n} {g['output_throughput']:.1f} tok/s, TTFT p50 {g['median_ttft_ms']:.1f} ms, "
                                             f"TPOT p50 {g['median_tpot_ms']:.2f} ms, failed {g['failed']}" for n, g in got.items())
                  + f"; labkit / llama.cpp {rounds[-1]['labkit_over_llamacpp_tok_s']:.3f}", flush=True)
    finally:
        for proc in procs.values():
            proc.terminate()
    summary = {"labkit_over_llamacpp_tok_s": statistics.median(r["labkit_over_llamacpp_tok_s"] for r in rounds),
               **{f"{n}_tok_s": statistics.median(r[n]["output_throughput"] for r in rounds) for n in ("labkit", "llama.cpp")},
               **{f"{n}_ttft_p50_ms": statistics.median(r[n]["median_ttft_ms"] for r in rounds) for n in ("labkit", "llama.cpp")}}
    print("median: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    if args.out:
        import llama_cpp

        params = {**vars(args), "threads": threads, "llama_cpp_python": llama_cpp.__version__, "gguf": gguf.name}
        payload = {"benchmark": "serve-vs-llamacpp", **provenance(resolve_device("cpu"), params), "summary": summary, "rounds": rounds}
        rows = [{"round": i, "labkit_over_llamacpp_tok_s": r["labkit_over_llamacpp_tok_s"],
                 **{f"{n}_{k}": r[n][k] for n in ("labkit", "llama.cpp") for k in ("output_throughput", "median_ttft_ms", "median_tpot_ms", "failed")}}
                for i, r in enumerate(rounds)]
        for f in write_results(args.out, "serve-vs-llamacpp-cpu", payload, rows):
            print(f"wrote {f}")


if __name__ == "__main__":
    main()
