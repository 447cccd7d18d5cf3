"""The one generate loop: prefill, then steps until EOS or the token budget.

Tokens are counted as generated ids, never by re-tokenising text, so a baseline and a
method are counted the same way.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from labkit.config import Flags, GenerationConfig
from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.metrics.memory import read_peak, reset_peak
from labkit.metrics.phases import PhaseTimer
from labkit.metrics.timers import now
from labkit.sampling import make_generator, sample
from labkit.specdec.controllers import Controller, CostAware, FixedK
from labkit.specdec.drafters import Draft, Drafter
from labkit.specdec.lookup_steps import CHUNK as LOOKUP_CHUNK
from labkit.specdec.policies import GreedyMatch, Policy, Verdict, default_policy, warm_up_kernels

Messages = list[dict[str, str]]
MAX_K = 64  # draft tokens per step at most: a verify of K+1 rows past this costs more than any draft saves


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    stop_reason: str  # "eos", "max_new_tokens" or "context" (the model's context ran out)
    ttft_s: float  # prefill + first token
    total_s: float
    token_latencies_ms: list[float] = field(default_factory=list)  # per step after the first token, spread over its tokens
    peak_memory_bytes: int = 0
    memory_kind: str = ""
    # speculative decoding (empty for plain decoding)
    drafter: str = ""
    policy: str = ""
    accepted_lengths: list[int] = field(default_factory=list)  # per target step: draft tokens that stood
    draft_tokens: list[list[int]] = field(default_factory=list)  # per target step: the proposals themselves
    k_trace: list[int] = field(default_factory=list)  # per speculative step: the K the controller asked for
    controller: str = ""
    lossless: bool = True  # False when a lossy acceptance policy decided
    draft_s: float = 0.0
    verify_s: float = 0.0  # target forwards after the prefill (verify or plain decode)
    phases: dict[str, Any] | None = None  # per-phase host and device seconds (detailed metrics only)

    @property
    def tok_per_s(self) -> float:
        """New tokens over the whole request, prefill included: what a user waits for."""
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def decode_tok_per_s(self) -> float:
        decode_s = self.total_s - self.ttft_s
        return (self.new_tokens - 1) / decode_s if self.new_tokens > 1 and decode_s > 0 else 0.0

    @property
    def mean_token_latency_ms(self) -> float:
        lat = self.token_latencies_ms
        return sum(lat) / len(lat) if lat else 0.0

    @property
    def drafted_lengths(self) -> list[int]:
        """Per target step: how many draft tokens were proposed."""
        return [len(d) for d in self.draft_tokens]

    @property
    def target_steps(self) -> int:
        return len(self.accepted_lengths)

    @property
    def acceptance_rate(self) -> float:
        drafted = sum(self.drafted_lengths)
        return sum(self.accepted_lengths) / drafted if drafted else 0.0

    @property
    def tau(self) -> float:
        """Mean tokens per target forward after the prefill (1.0 for plain decoding)."""
        steps = self.target_steps
        return (self.new_tokens - 1) / steps if steps else 1.0

    @property
    def other_s(self) -> float:
        """Bookkeeping: everything after the first token that is neither drafting nor the target."""
        return max(0.0, self.total_s - self.ttft_s - self.draft_s - self.verify_s)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(tok_per_s=self.tok_per_s, decode_tok_per_s=self.decode_tok_per_s, mean_token_latency_ms=self.mean_token_latency_ms,
                   acceptance_rate=self.acceptance_rate, tau=self.tau, other_s=self.other_s, target_steps=self.target_steps,
                   drafted_lengths=self.drafted_lengths)
        return out


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    tokens: list[int]  # new token ids, EOS included when it ended the output
    stats: GenerationStats
    text: str = ""


def encode_prompt(tokenizer: Any, prompt: str | Messages, chat: bool | None = None) -> list[int]:
    """Prompt text (or chat messages) → ids; the chat template is applied when the model has one."""
    check_text(prompt)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise LabkitError("the prompt is empty")
        messages: Messages = [{"role": "user", "content": prompt}]
    else:
        if not prompt or not any(m.get("content", "").strip() for m in prompt):
            raise LabkitError("the prompt is empty")
        messages = prompt
    use_chat = getattr(tokenizer, "chat_template", None) is not None if chat is None else chat
    if use_chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise LabkitError("this model's tokenizer has no chat template; use --no-chat")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    if not isinstance(prompt, str):
        text = "\n".join(m["content"] for m in messages)
    else:
        text = prompt
    return list(tokenizer(text).input_ids)


def check_text(prompt: str | Messages) -> None:
    """Text a tokenizer can take: valid UTF-8 (no lone surrogates), and chat messages that each
    have a string role and content."""
    if isinstance(prompt, str):
        texts = [prompt]
    elif isinstance(prompt, list):
        texts = []
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise LabkitError(f"chat message {i} needs a string 'role' and 'content', got {str(m)[:80]}")
            texts += [m["role"], m["content"]]
    else:
        raise LabkitError(f"a prompt is text or a list of chat messages, got {type(prompt).__name__}")
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise LabkitError(f"the prompt is not valid UTF-8 text (at character {err.start})") from None


def check_prompt(prompt_ids: Sequence[int], context_len: int, vocab_size: int | None = None) -> None:
    if len(prompt_ids) == 0:
        raise LabkitError("the prompt is empty")
    if len(prompt_ids) >= context_len:
        raise LabkitError(f"the prompt has {len(prompt_ids)} tokens but the model's context is {context_len}: shorten it")
    if vocab_size is not None:
        bad = [t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise LabkitError(f"token ids must be whole numbers in [0, {vocab_size}) for this model, got {bad[0]!r}")


@dataclass
class Speculation:
    """Draft-and-verify settings for `generate`. Policy None: greedy match for greedy decoding,
    rejection sampling otherwise; controller None: fixed K."""

    drafter: Drafter
    k: int = 4
    policy: Policy | None = None
    controller: Controller | None = None

    def validate(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= MAX_K:
            raise LabkitError(f"K (draft tokens per step) must be a whole number, at least 1 and at most {MAX_K}, got {self.k!r}")


def generate(
    engine: Engine,
    prompt_ids: Sequence[int],
    config: GenerationConfig,
    spec: Speculation | None = None,
    detailed_metrics: bool | None = None,
) -> GenerationResult:
    """Decode one prompt (batch 1): greedy when temperature is 0; speculative when `spec` is given.
    detailed_metrics (None: SPECDEC_DETAILED_METRICS) times each phase, synchronising around it.

    One request at a time holds the engine (and the drafter that works on it): a second thread
    calling generate on the same engine waits for the first to finish.
    """
    with engine.request_lock:
        return _generate(engine, prompt_ids, config, spec, detailed_metrics)


def _generate(
    engine: Engine,
    prompt_ids: Sequence[int],
    config: GenerationConfig,
    spec: Speculation | None,
    detailed_metrics: bool | None,
) -> GenerationResult:
    """The loop. Invariant between steps: the target's cache holds every context token but the last."""
    config.validate()
    check_prompt(prompt_ids, engine.context_len, engine.args.vocab_size)
    if spec is not None:
        spec.validate()
    budget = min(config.max_new_tokens, engine.context_len - len(prompt_ids))
    controller = (spec.controller or FixedK(spec.k)) if spec else None
    if isinstance(controller, CostAware) and controller.verify_table is None:  # once per controller, before any timing
        controller.calibrate(engine.time_verify(controller.k_max))
    engine.ensure_capacity(len(prompt_ids) + budget)
    eos_all = sorted(set(config.eos_token_ids or engine.eos_token_ids))
    eos = set(eos_all) if config.stop_at_eos else set()
    generator = make_generator(config, engine.device)
    device = engine.device
    eos_mask = torch.zeros(engine.args.vocab_size, dtype=torch.bool, device=device)  # (V,) EOS ids, blocked before min_new_tokens
    eos_mask[eos_all] = True
    policy = (spec.policy or default_policy(config)) if spec else None
    if spec is not None:
        spec.drafter.begin(list(prompt_ids), len(prompt_ids) + budget)
    if controller is not None:
        controller.begin()

    def suppress_eos(logits: torch.Tensor, n_done: int) -> torch.Tensor:  # (T, V): row j is token n_done + j
        rows = min(logits.shape[0], config.min_new_tokens - n_done)
        if rows > 0 and eos_all:
            logits = logits.clone()
            logits[:rows] = logits[:rows].masked_fill(eos_mask, float("-inf"))
        return logits

    timer = PhaseTimer(device, Flags.from_env().detailed_metrics if detailed_metrics is None else detailed_metrics)
    # greedy acceptance needs only the target's argmax: the engine decides it inside the verify
    # step (unless phases are timed one by one, which needs them apart)
    fused_greedy = isinstance(policy, GreedyMatch) and not timer.enabled
    # a drafter with `prepare` (draft heads) drafts inside that step: the next draft comes back with
    # the verdict; one with `run_steps` runs whole steps on the device, several per host read
    prepare_draft = getattr(spec.drafter, "prepare", None) if fused_greedy and spec else None
    run_steps = getattr(spec.drafter, "run_steps", None) if fused_greedy and spec else None
    reset_peak(device)
    t_start = now(device)
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # (1, T)
    with timer.phase("prefill"):
        logits = engine.prefill(prompt)  # (1, V)
    with timer.phase("sampling"):
        tokens = [int(sample(suppress_eos(logits, 0), config, generator).item())]
    context = list(prompt_ids) + tokens
    t_prev = time.perf_counter()
    ttft = t_prev - t_start
    stats = GenerationStats(prompt_tokens=len(prompt_ids), new_tokens=0, stop_reason="", ttft_s=ttft, total_s=0.0,
                            drafter=spec.drafter.name if spec else "", policy=policy.name if policy else "",
                            controller=controller.name if controller else "", lossless=policy.lossless if policy else True)
    stop_reason = "eos" if tokens[0] in eos else ""

    def keep(new: list[int], drafted: list[int]) -> None:
        """Book one step's new tokens (an EOS inside them, or the budget, ends the output there)."""
        nonlocal stop_reason, t_prev
        before = len(tokens)
        for token in new:
            if len(tokens) == budget:
                break
            tokens.append(token)
            if token in eos:
                stop_reason = "eos"
                break
        kept = len(tokens) - before
        if drafted:
            stats.draft_tokens.append(drafted)
            stats.accepted_lengths.append(len(new) - 1)
        else:  # one target forward per kept token (a chunk's steps past an EOS are not counted)
            stats.draft_tokens.extend([] for _ in range(kept))
            stats.accepted_lengths.extend(0 for _ in range(kept))
        context.extend(tokens[len(context) - len(prompt_ids):])
        t = time.perf_counter()
        stats.token_latencies_ms.extend([(t - t_prev) * 1e3 / len(new)] * len(new))
        t_prev = t

    while not stop_reason:
        remaining = budget - len(tokens)
        if remaining <= 0:
            stop_reason = "max_new_tokens" if budget == config.max_new_tokens else "context"
            break
        k_wanted = controller.next_k() if controller else 0
        k = min(k_wanted, remaining - 1)
        room = (engine.max_seq_len - len(context) + 1) // (k_wanted + 1) if run_steps is not None else 0
        if room >= 1 and k_wanted >= 1:  # m speculative steps on the device, one host read
            # the full K even at the budget's end (tokens past it are dropped): one captured width
            assert run_steps is not None and controller is not None
            k = k_wanted
            m = min(LOOKUP_CHUNK, max(1, remaining // 2), room)
            t0 = time.perf_counter()
            steps = run_steps(context, k, m, eos_mask, len(prompt_ids) + config.min_new_tokens)
            step_s = (time.perf_counter() - t0) / len(steps)
            stats.verify_s += step_s * len(steps)
            for drafted, new in steps:
                stats.k_trace.append(k)
                controller.update(len(drafted), len(new) - 1, 0.0, step_s)
                keep(new, drafted)
                if stop_reason or len(tokens) == budget:
                    break
            continue
        draft = Draft([])
        step_draft_s = 0.0
        if k >= 1 and spec is not None:
            stats.k_trace.append(k)
            t0 = time.perf_counter()
            with timer.phase("draft"):
                draft = spec.drafter.propose(context, k, config, generator)
            draft.tokens = draft.tokens[:k]
            step_draft_s = time.perf_counter() - t0
            stats.draft_s += step_draft_s
        t0 = time.perf_counter()
        if draft.tokens:
            start = engine.length
            feed = torch.tensor([[context[-1], *draft.tokens]], device=device)  # (1, K+1)
            assert policy is not None and controller is not None
            if fused_greedy:  # verify and greedy acceptance in one step, two integers read back
                row = engine.verify_greedy(feed, eos_mask, config.min_new_tokens - len(tokens) if eos_all else 0,
                                           draft_heads=prepare_draft is not None)[0].tolist()
                verdict = Verdict(row[0], row[1])
                if prepare_draft is not None:
                    prepare_draft(row[2:])
            else:
                with timer.phase("verify"):
                    logits = suppress_eos(engine.verify(feed)[0], len(tokens))  # (K+1, V)
                with timer.phase("accept"):
                    verdict = policy.accept(feed[0, 1:], draft.probs, logits, config, generator)
            with timer.phase("kv_update"):
                engine.rollback(start + 1 + verdict.accepted)  # keep the last token and the accepted drafts
            new = draft.tokens[: verdict.accepted] + [verdict.next_token]
            controller.update(len(draft.tokens), verdict.accepted, step_draft_s, time.perf_counter() - t0)
        elif config.temperature == 0:  # plain greedy: a chunk of steps per host synchronisation
            n = min(engine.greedy_chunk, remaining) if spec is None else 1  # a drafter gets its say every step
            last = torch.tensor([[context[-1]]], device=device)  # (1, 1)
            with timer.phase("decode"):
                new = engine.decode_greedy(last, n, eos_mask, config.min_new_tokens - len(tokens))[0].tolist()
        else:
            with timer.phase("decode"):
                logits = suppress_eos(engine.decode(torch.tensor([[context[-1]]], device=device)), len(tokens))
            with timer.phase("sampling"):
                new = [int(sample(logits, config, generator).item())]
        stats.verify_s += time.perf_counter() - t0
        keep(new, draft.tokens)
    memory = read_peak(device)
    stats.new_tokens, stats.stop_reason, stats.total_s = len(tokens), stop_reason, t_prev - t_start
    stats.peak_memory_bytes, stats.memory_kind = memory.peak_bytes, memory.kind
    if timer.enabled:
        stats.phases = timer.finish().to_dict()
    if stats.token_latencies_ms:
        stats.token_latencies_ms = stats.token_latencies_ms[: len(tokens) - 1]
    return GenerationResult(prompt_ids=list(prompt_ids), tokens=tokens, stats=stats)


def warm_up(engine: Engine, max_k: int = 0, prompt_len: int = 1024) -> None:
    """Before anything is timed: capture (and compile) the target's step shapes for plain
    decoding, verifies of up to max_k drafts and prompts of up to prompt_len tokens, and load
    the acceptance kernels."""
    engine.warm_up(max_k + 1, prompt_len)
    if max_k:
        warm_up_kernels(engine.device)


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
