"""Before and after: the same requests through two source trees of labkit, in one run.

Each round starts one process per tree (the order swaps every round, so slow drift favours
neither); a process loads the embedded model once, warms up, and times every setting on every
prompt of the suite's first prompt per category. The report gives per setting the median
tok/s of each tree and their ratio, after over before (the ratio of medians of paired rounds).

    python scripts/compare_commits.py --before /tmp/before --after . --device cpu --rounds 3 --out results
    python scripts/compare_commits.py ... --weights gguf-q8          # the CPU settings on these block weights

A tree is a checkout (`git worktree add /tmp/before <commit>`, or `git archive <commit> | tar -x`);
the settings use only APIs both trees have (load_model, Engine.from_loaded, make_drafter,
Speculation, generate, warm_up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch
from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.generate import Speculation, encode_prompt, generate, warm_up
from labkit.models.loading import load_model
from labkit.prompts import load_suite
from labkit.specdec.drafters import make_drafter

device, max_new, settings, prompt_tokens = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
loaded = load_model("default")
prompts = [encode_prompt(loaded.tokenizer, p.content) for p in load_suite(None, 1)]
if prompt_tokens:  # one long prompt (a document cut to this many tokens) instead of the suite's
    from labkit.prompts.long import long_prompt
    prompts = [long_prompt(loaded.tokenizer, prompt_tokens)]
gen = GenerationConfig(max_new_tokens=max_new, min_new_tokens=max_new)
out = {}
for s in settings:
    engine = Engine.from_loaded(loaded, device, None, weights=s.get("weights", "auto"), cuda_graph=s.get("cuda_graph", False))
    drafter = make_drafter(s["drafter"], engine) if s.get("drafter") else None
    spec = (lambda: Speculation(drafter, s["k"])) if drafter is not None else (lambda: None)
    warm_up(engine, s.get("k", 0) if drafter is not None else 0)
    for ids in prompts[:2]:
        generate(engine, ids, GenerationConfig(max_new_tokens=8), spec())
    t0 = time.perf_counter()
    tokens = decoded = decode_s = 0
    for ids in prompts:
        stats = generate(engine, ids, gen, spec()).stats
        tokens, decoded, decode_s = tokens + stats.new_tokens, decoded + stats.new_tokens - 1, decode_s + stats.total_s - stats.ttft_s
    out[s["name"]] = {"tok_per_s": tokens / (time.perf_counter() - t0), "decode_tok_per_s": decoded / decode_s,
                      "weights": engine.weights, "layer_kernels": engine.layer_kernels}
    del engine, drafter
print("RESULT " + json.dumps(out))
"""

CPU_SETTINGS = [
    {"name": "plain (auto weights)"},
    {"name": "plain dense", "weights": "dense"},
    {"name": "ngram K=3", "drafter": "ngram", "k": 3},
]
GPU_SETTINGS = [
    {"name": "plain graphs", "cuda_graph": True},
    {"name": "ngram K=4 graphs", "drafter": "ngram", "k": 4, "cuda_graph": True},
    {"name": "ngram-graph K=8", "drafter": "ngram-graph", "k": 8, "cuda_graph": True},
]


def run_tree(tree: Path, device: str, max_new: int, settings: list[dict], prompt_tokens: int = 0) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree.resolve()), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CHILD, device, str(max_new), json.dumps(settings), str(prompt_tokens)], cwd=tree, env=env,
                          capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"{tree}: no result\n{proc.stderr[-3000:]}")


def git_commit(tree: Path) -> str:
    got = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True, check=False).stdout.strip()
    return got or os.environ.get(f"COMMIT_{tree.name.upper()}", "unknown")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--before-commit", default=None)
    ap.add_argument("--after-commit", default=None)
    ap.add_argument("--out", default=None, help="folder for the JSON record")
    ap.add_argument("--prompt-tokens", type=int, default=0, help="one long prompt of this many tokens instead of the suite's (CPU: no dense setting)")
    ap.add_argument("--weights", default=None, help="the CPU settings' block weights (gguf-q8, say) instead of the timed choice; the dense control stays")
    args = ap.parse_args()
    settings = GPU_SETTINGS if args.device.startswith("cuda") else CPU_SETTINGS
    if args.weights:
        settings = [s if s.get("weights") == "dense" else {**s, "name": f"{s['name']} {args.weights}", "weights": args.weights} for s in settings]
    if args.prompt_tokens and not args.device.startswith("cuda"):
        settings = [s for s in settings if s.get("weights") != "dense"]
    trees = {"before": args.before, "after": args.after}
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
            runs[name].append(run_tree(trees[name], args.device, args.max_tokens, settings, args.prompt_tokens))
            print(f"round {r} {name}: " + ", ".join(f"{k} {v['tok_per_s']:.1f} (decode {v['decode_tok_per_s']:.1f})" for k, v in runs[name][-1].items()), flush=True)
    summary = []
    metric = "decode_tok_per_s" if args.prompt_tokens else "tok_per_s"  # a long prompt's prefill would hide the decode
    for s in settings:
        before = [run[s["name"]][metric] for run in runs["before"]]
        after = [run[s["name"]][metric] for run in runs["after"]]
        ratios = [a / b for a, b in zip(after, before, strict=True)]
        summary.append({"setting": s["name"], "metric": metric, "before_tok_per_s": statistics.median(before), "after_tok_per_s": statistics.median(after),
                        "after_over_before": statistics.median(ratios), "ratios": ratios,
                        "weights": runs["after"][0][s["name"]]["weights"], "layer_kernels": runs["after"][0][s["name"]]["layer_kernels"]})
        print(f"{s['name']:<22} before {summary[-1]['before_tok_per_s']:8.1f}  after {summary[-1]['after_tok_per_s']:8.1f} tok/s"
              f"  after/before {summary[-1]['after_over_before']:.3f} (rounds: {', '.join(f'{x:.3f}' for x in ratios)})")
    if args.out:
        import torch

        sys.path.insert(0, str(args.after.resolve()))
        from labkit.bench.results import provenance, write_results  # noqa: E402
        from labkit.config import resolve_device  # noqa: E402

        device = resolve_device(args.device)
        params = {"before_commit": args.before_commit or git_commit(args.before), "after_commit": args.after_commit or git_commit(args.after),
                  "rounds": args.rounds, "max_new_tokens": args.max_tokens, "prompt_tokens": args.prompt_tokens, "settings": settings, "torch_threads": torch.get_num_threads()}
        payload = {"benchmark": "before-after", **provenance(device, params), "summary": summary, "runs": runs}
        for f in write_results(args.out, f"before-after-{device.type}", payload, [{**row, "ratios": " ".join(f"{x:.4f}" for x in row["ratios"])} for row in summary]):
            print(f"wrote {f}")


if __name__ == "__main__":
    main()
