"""Before anything is timed: capture every step shape a request will use (`warm_up_steps`), and
measure what a verify of each width costs on this device (`time_verify`, for the cost-aware
controller). Both run at the cache's start and leave it empty."""

from __future__ import annotations

import statistics

import torch

from labkit.engine import Engine
from labkit.graphs import GRAPH_MAX_T, VerifyHook, prefill_bucket
from labkit.metrics.timers import now


@torch.inference_mode()
def time_verify(engine: Engine, max_k: int, reps: int = 5) -> dict[int, float]:
    """Median seconds (host clock, device synchronised) of a verify of K drafts, i.e. K+1
    tokens, for K = 0..max_k: the shape of a step's cost against its width, measured on this
    device for the cost-aware controller. Widths take turns so drift hits them alike; the
    first round is a warm-up."""
    engine.ensure_capacity(max_k + 1)
    tokens = torch.zeros(engine.batch_size, max_k + 1, dtype=torch.long, device=engine.device)  # (B, max_k+1)
    times: dict[int, list[float]] = {K: [] for K in range(max_k + 1)}
    for rep in range(reps + 1):
        for K in times:
            engine.reset()
            t0 = now(engine.device)
            engine.forward(tokens[:, : K + 1])
            if rep:
                times[K].append(now(engine.device) - t0)
    engine.reset()
    return {K: statistics.median(ts) for K, ts in times.items()}


@torch.inference_mode()
def warm_up_steps(engine: Engine, max_t: int = 1, prompt_len: int = 1024, hook: VerifyHook | None = None) -> None:
    """Capture (and compile) every step shape up to `max_t` tokens, the greedy chunk, and the
    prompt passes for prompts of up to `prompt_len` tokens, now rather than inside a timed
    request (a longer prompt's pass is captured when it first comes). A speculative verify is
    2..K+1 tokens wide (and has a greedy-verdict graph of its own, and one with the drafter's
    verify hook up to the widest it drafts after)."""
    verify_t = min(max_t, GRAPH_MAX_T)
    if engine.cuda_graph:  # prompts run as chunks of up to GRAPH_MAX_T tokens
        max_t = max(max_t, GRAPH_MAX_T)
    engine.ensure_capacity(max_t + 1)
    B = engine.batch_size
    token = torch.zeros(B, 1, dtype=torch.long, device=engine.device)
    eos_mask = torch.zeros(engine.args.vocab_size, dtype=torch.bool, device=engine.device)
    for T in range(1, max_t + 1):
        engine.reset()
        engine.forward(token.expand(B, T).contiguous())
        if 2 <= T <= verify_t:
            engine.reset()
            engine.verify_greedy(token.expand(B, T).contiguous(), eos_mask, 0)
            if hook is not None and T <= hook.max_t:
                engine.reset()
                engine.verify_greedy(token.expand(B, T).contiguous(), eos_mask, 0, hook=hook)
    engine.reset()
    engine.decode_greedy(token, 1)
    _warm_up_prompt_passes(engine, prompt_len, token)
    engine.reset()


def _warm_up_prompt_passes(engine: Engine, prompt_len: int, token: torch.Tensor) -> None:
    """The captured prompt passes (PrefillGraph) for every bucket up to prompt_len's."""
    shortest = engine.prompt_pass_min_t
    bucket = prefill_bucket(shortest) if shortest else 0
    while shortest and bucket <= prefill_bucket(min(prompt_len, engine.max_seq_len)):
        T = max(bucket // 2 + 1, shortest)  # a prompt this bucket serves
        engine.ensure_capacity(T)
        if engine.graphs_safe:
            engine.prefill(token.expand(engine.batch_size, T).contiguous())
        bucket *= 2

