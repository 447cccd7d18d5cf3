"""Where a speculative step's time goes on this GPU (diagnostic; prints medians in microseconds).

    python3 scripts/step_costs.py [heads_folder]

On the fused engine (CUDA graphs over the Triton layers, bf16), at a context of ~300 tokens:
- plain: one greedy chunk of 16 tokens per host read (what plain decoding does), per token;
- single: one greedy token per host read (what a speculative run does when nothing is drafted);
- verify K: a greedy verify of K drafts (K+1 tokens) and its host read, K = 1..8 (and with the heads'
  next draft made inside it, when a heads folder is given);
- gpu T: back-to-back replays of the T-token step (no host read between): the GPU's own time;
- lookup K: the n-gram graph drafter's device steps (lookup + verify + acceptance), 8 per host read;
- ngram: the n-gram drafter's proposal (host only);
- heads K: the heads drafter's proposal of K tokens (from the kept hidden state), when a folder is given;
- eager kernels: the profiler's GPU time per kernel of an eager 4- and 5-token step.
The step measurements run twice: with the fused final norm + LM head, and with PyTorch's.
"""

import os
import sys
from types import SimpleNamespace

import torch

from labkit.engine import Engine
from labkit.generate import encode_prompt, warm_up
from labkit.graphs import GREEDY_CHUNK, greedy_verdict
from labkit.kernels import layer_reference
from labkit.metrics import timers
from labkit.models.loading import load_model
from labkit.prompts import load_suite
from labkit.specdec.drafters import NgramDrafter, build_drafter, make_drafter

REPS = int(os.environ.get("REPS", 200))
DEV = os.environ.get("DEV", "cuda")  # cpu: a quick check of the script itself


def median_us(fn, reps: int = REPS) -> float:
    return timers.median_us(fn, reps, warm=0)


loaded = load_model("default")
gpu = DEV == "cuda"
engine = Engine.from_loaded(loaded, DEV, torch.bfloat16 if gpu else torch.float32, weights="dense", cuda_graph=gpu,
                            layer_kernels="triton" if gpu else "torch")
drafter = build_drafter("heads", engine, heads_path=sys.argv[1]) if len(sys.argv) > 1 else None
warm_up(engine, 8)
ids = max((encode_prompt(loaded.tokenizer, p.content) for p in load_suite(None, None)), key=len)  # the longest prompt
engine.ensure_capacity(len(ids) + 64)
eos = torch.zeros(engine.args.vocab_size, dtype=torch.bool, device=DEV)
engine.reset()
engine.prefill(torch.tensor([ids], device=DEV))
start = engine.length
last = torch.tensor([[ids[-1]]], device=DEV)
print(f"context {start} tokens, {torch.cuda.get_device_name() if gpu else DEV}")


def plain() -> None:
    engine.rollback(start)
    engine.decode_greedy(last, GREEDY_CHUNK, eos, 0)[0].tolist()


def single() -> None:
    engine.rollback(start)
    engine.decode_greedy(last, 1, eos, 0)[0].tolist()


def kernel_times(T: int) -> dict[str, float]:
    """GPU time per kernel name (us) of one eager T-token step and its greedy verdict, from the profiler."""
    toks = torch.tensor([ids[-T:]], device=DEV)
    pos = torch.arange(start, start + T, device=DEV)
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.inference_mode(), torch.profiler.profile(activities=acts) as prof:
        for _ in range(10):
            greedy_verdict(engine.static_step(toks, pos, None), toks, eos, torch.zeros(1, dtype=torch.long, device=DEV))
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for e in prof.events():  # the kernels themselves (CPU-side ops would count their kernels twice)
        if e.device_type == torch.autograd.DeviceType.CUDA:
            times[e.name] = times.get(e.name, 0.0) + e.time_range.elapsed_us() / 10
    return times


def measure() -> None:
    print(f"plain   {median_us(plain) / GREEDY_CHUNK:7.1f} us/token (chunks of {GREEDY_CHUNK})")
    print(f"single  {median_us(single):7.1f} us/token (one host read per token)")
    for heads_too in (False, True) if drafter else (False,):
        for K in range(1, drafter.heads.cfg.n_heads + 1 if heads_too else 9):
            feed_list = [ids[-1], *ids[-K:]]

            def verify(feed_list: list[int] = feed_list, heads_too: bool = heads_too) -> None:
                engine.rollback(start)
                feed = torch.tensor([feed_list], device=DEV)
                engine.verify_greedy(feed, eos, 0, hook=drafter.verify_hook if heads_too else None)[0].tolist()

            print(f"verify {K} {median_us(verify):7.1f} us (with the host-built feed){' + heads draft in the graph' if heads_too else ''}")
    if gpu:  # back-to-back replays with no host read between: the GPU's own time per step of width T
        for T in (1, 2, 4, 5, 9):
            graph_step = engine.graph_step(T, None)
            toks = torch.tensor([ids[-T:]], device=DEV)

            @torch.inference_mode()  # the captured step's buffers are inference tensors
            def replays(graph_step=graph_step, toks=toks) -> None:
                for _ in range(20):
                    graph_step.run(toks, start)
                torch.cuda.synchronize()

            print(f"gpu T={T} {median_us(replays, 20) / 20:7.1f} us per step (20 replays per read)")
    lookup = make_drafter("ngram-graph", engine)
    for K in (2, 3, 4, 6, 8):
        steps = lookup.steps_for(K)

        def chunk(steps=steps) -> None:
            engine.rollback(start)
            steps.on_device = 0
            steps.run([*ids, ids[-1]], 8, eos, 0)

        print(f"lookup K={K} {median_us(chunk, 50) / 8:7.1f} us per step (8 device steps per read: lookup, verify, accept)")
    if gpu:  # which kernels make a 5-token step dearer than a 4-token one
        t4, t5 = kernel_times(4), kernel_times(5)
        print(f"eager kernels: T=4 {sum(t4.values()):.1f} us, T=5 {sum(t5.values()):.1f} us; largest changes:")
        for name in sorted(set(t4) | set(t5), key=lambda n: -abs(t5.get(n, 0) - t4.get(n, 0)))[:6]:
            print(f"  {t4.get(name, 0):7.1f} -> {t5.get(name, 0):7.1f} us  {name[:90]}")


fused_ops = engine.model.layer_ops
variants = [("fused norm+head" if fused_ops is not None else "PyTorch layers", fused_ops)]
if fused_ops is not None:  # the same layers with the final norm and head as PyTorch ops (cuBLAS GEMM)
    variants.append(("torch norm+head", SimpleNamespace(**{**vars(fused_ops), "norm_head": layer_reference.norm_head})))
for label, ops in variants:
    engine.model.layer_ops = ops
    engine.graphs.clear()  # captured again with these ops
    print(f"== {label}")
    measure()
engine.model.layer_ops = fused_ops
ngram = NgramDrafter()
ngram.start(ids, len(ids) + 64)
ctx = list(ids)
print(f"ngram   {median_us(lambda: ngram.propose(ctx, 8, None, None)):7.1f} us")
if drafter is not None:
    engine.rollback(start)
    engine.decode_greedy(last, 1, eos, 0)
    ctx2 = ctx + [0]
    for K in range(1, drafter.heads.cfg.n_heads + 1):
        print(f"heads {K} {median_us(lambda K=K: drafter.propose(ctx2, K, None, None)):7.1f} us")
