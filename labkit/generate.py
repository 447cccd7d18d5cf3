"""The one generate loop: prefill, then steps until EOS or the token budget.

Tokens are counted as generated ids, never by re-tokenising text, so a baseline and a
method are counted the same way. Each kind of step (plain, host speculation, device
speculation) is a unit of its own in labkit/steps.py, chosen once per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from labkit.config import Flags, GenerationConfig
from labkit.engine import Engine
from labkit.engine_warmup import time_verify, warm_up_steps
from labkit.errors import LabkitError
from labkit.metrics.memory import read_peak, reset_peak
from labkit.metrics.phases import PhaseTimer
from labkit.metrics.stats import GenerationStats
from labkit.metrics.timers import now
from labkit.prompting import Messages, check_prompt, check_text, encode_prompt
from labkit.sampling import make_generator, sample
from labkit.specdec.controllers import Controller, FixedK
from labkit.specdec.draft import Draft, Drafter
from labkit.specdec.policies import Policy, default_policy, warm_up_kernels
from labkit.steps import Request, choose_step
from labkit.tree_verify import tree_verify

__all__ = ["Draft", "GenerationResult", "GenerationStats", "Messages", "Speculation", "check_prompt", "check_text",
           "encode_prompt", "generate", "generate_text", "warm_up"]
MAX_K = 64  # draft tokens per step at most: a verify of K+1 rows past this costs more than any draft saves


def valid_k(k: object) -> bool:
    """Whether k is a K speculation takes: a whole number from 1 to MAX_K (not a bool)."""
    return isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= MAX_K


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    tokens: list[int]  # new token ids, EOS included when it ended the output
    stats: GenerationStats
    text: str = ""


@dataclass
class Speculation:
    """Draft-and-verify settings for `generate`. Policy None: greedy match for greedy decoding,
    rejection sampling otherwise; controller None: fixed K."""

    drafter: Drafter
    k: int = 4
    policy: Policy | None = None
    controller: Controller | None = None

    def validate(self) -> None:
        if not valid_k(self.k):
            raise LabkitError(f"K (draft tokens per step) must be a whole number, at least 1 and at most {MAX_K}, got {self.k!r}")


def generate(
    engine: Engine,
    prompt_ids: Sequence[int],
    config: GenerationConfig,
    spec: Speculation | None = None,
    detailed_metrics: bool | None = None,
    on_tokens: Callable[[list[int]], bool] | None = None,
) -> GenerationResult:
    """Decode one prompt (batch 1): greedy when temperature is 0; speculative when `spec` is given.
    detailed_metrics (None: SPECDEC_DETAILED_METRICS) times each phase, synchronising around it.
    on_tokens sees the new tokens as each step keeps them (the first token, then several per
    step when a draft stands); returning False stops the request there (stop reason "cancelled").

    One request at a time holds the engine (and the drafter that works on it): a second thread
    calling generate on the same engine waits for the first to finish.
    """
    with engine.request_lock:
        return _generate(engine, prompt_ids, config, spec, detailed_metrics, on_tokens)


def _start(engine: Engine, prompt_ids: Sequence[int], config: GenerationConfig, spec: Speculation | None,
           timer: PhaseTimer) -> Request:
    """Check the request, make room for it, and set up its parts (controller calibrated once)."""
    config.validate()
    check_prompt(prompt_ids, engine.context_len, engine.args.vocab_size)
    if spec is not None:
        spec.validate()
    budget = min(config.max_new_tokens, engine.context_len - len(prompt_ids))
    engine.ensure_capacity(len(prompt_ids) + budget)
    eos_all = sorted(set(config.eos_token_ids or engine.eos_token_ids))
    eos_mask = torch.zeros(engine.args.vocab_size, dtype=torch.bool, device=engine.device)  # (V,)
    eos_mask[eos_all] = True
    stats = GenerationStats(prompt_tokens=len(prompt_ids), new_tokens=0, stop_reason="", ttft_s=0.0, total_s=0.0)
    return Request(engine, config, make_generator(config, engine.device), timer, set(eos_all) if config.stop_at_eos else set(),
                   eos_mask, bool(eos_all), budget, len(prompt_ids), stats, context=list(prompt_ids))


def _generate(
    engine: Engine,
    prompt_ids: Sequence[int],
    config: GenerationConfig,
    spec: Speculation | None,
    detailed_metrics: bool | None,
    on_tokens: Callable[[list[int]], bool] | None = None,
) -> GenerationResult:
    """The loop. Invariant between steps: the target's cache holds every context token but the last."""
    timer = PhaseTimer(engine.device, Flags.from_env().detailed_metrics if detailed_metrics is None else detailed_metrics)
    req = _start(engine, prompt_ids, config, spec, timer)
    req.on_tokens = on_tokens
    drafter = spec.drafter if spec else None
    controller = (spec.controller or FixedK(spec.k)) if spec else None
    policy = (spec.policy or default_policy(config)) if spec else None
    if controller is not None:
        if controller.wants_costs:  # timed before the request, never inside it
            controller.calibrate(time_verify(engine, controller.wants_costs))
        controller.reset()
    if drafter is not None:
        drafter.start(list(prompt_ids), len(prompt_ids) + req.budget)
    step = choose_step(engine, config, timer.enabled, drafter, policy, controller)
    stats = req.stats
    stats.drafter, stats.policy = (drafter.name if drafter else ""), (policy.name if policy else "")
    stats.controller, stats.lossless = (controller.name if controller else ""), (policy.lossless if policy else True)
    reset_peak(engine.device)
    t_start = now(engine.device)
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=engine.device)  # (1, T)
    with timer.phase("prefill"):
        logits = engine.prefill(prompt)  # (1, V)
    with timer.phase("sampling"):
        req.tokens.append(int(sample(req.suppress_eos(logits), config, req.generator).item()))
    req.context.append(req.tokens[0])
    req.t_prev = time.perf_counter()
    stats.ttft_s = req.t_prev - t_start
    req.stop_reason = "eos" if req.tokens[0] in req.eos else ""
    req.hand_out(req.tokens[:1])
    while not req.stop_reason:
        if req.remaining <= 0:
            req.stop_reason = "max_new_tokens" if req.budget == config.max_new_tokens else "context"
            break
        step(req)
    return _finish(req, t_start)


def _finish(req: Request, t_start: float) -> GenerationResult:
    stats, tokens = req.stats, req.tokens
    memory = read_peak(req.engine.device)
    stats.new_tokens, stats.stop_reason, stats.total_s = len(tokens), req.stop_reason, req.t_prev - t_start
    stats.peak_memory_bytes, stats.memory_kind = memory.peak_bytes, memory.kind
    if req.timer.enabled:
        stats.phases = req.timer.finish().to_dict()
    if stats.token_latencies_ms:
        stats.token_latencies_ms = stats.token_latencies_ms[: len(tokens) - 1]
    return GenerationResult(prompt_ids=list(req.context[: req.prompt_len]), tokens=tokens, stats=stats)


def warm_up(engine: Engine, max_k: int = 0, prompt_len: int = 1024, drafter: Drafter | None = None) -> None:
    """Before anything is timed: capture (and compile) the target's step shapes for plain
    decoding, verifies of up to max_k drafts (with the drafter's verify hook, if it has one) and
    prompts of up to prompt_len tokens, and load the acceptance kernels (and CUDA graph IF nodes, built at
    first use where PyTorch has none, for a drafter with device steps)."""
    warm_up_steps(engine, max_k + 1, prompt_len, hook=drafter.verify_hook if drafter is not None else None)
    if drafter is not None:
        for tree in drafter.tree_shapes(max_k):  # token trees: one captured step per shape
            engine.ensure_capacity(tree.size + 1)
            tree_verify(engine, tree.size, max(tree.depths()), drafter.verify_hook)
        engine.reset()
    if max_k:
        warm_up_kernels(engine.device)
    if drafter is not None and drafter.device_steps is not None and engine.cuda_graph:
        from labkit.graphs import if_nodes

        if_nodes()  # device steps may capture IF nodes (eagle-mix): labkit's own are built now, not in a request


def generate_text(
    engine: Engine,
    tokenizer: Any,
    prompt: str | Messages,
    config: GenerationConfig,
    chat: bool | None = None,
    spec: Speculation | None = None,
    detailed_metrics: bool | None = None,
) -> GenerationResult:
    """Text in, text out: encode (chat template when the model has one), generate, decode."""
    ids = encode_prompt(tokenizer, prompt, chat)
    result = generate(engine, ids, config, spec, detailed_metrics)
    result.text = tokenizer.decode(result.tokens, skip_special_tokens=True)
    return result
