"""Prompt lookup with no host in the loop: drafting, verify and greedy acceptance in one CUDA graph.

A speculative step driven from Python pays a host round trip per step: the verdict is read back,
the drafter runs on the host, the next verify is launched. On a GPU, where a step of a small model
takes half a millisecond, that gap costs more than the wider verify (scripts/step_costs.py). Here
one captured step does it all on the device, and the host replays it m times per read:

    draft    = lookup_draft(history, n_ctx, K)      n-gram lookup over the context (a registry kernel)
    feed, positions = step_feed(history, n_ctx, draft)   [last, *draft] at n_ctx - 1 on (opt-in: one launch)
    accepted, next = greedy_verdict(verify(feed))   one (K+1)-token pass, EOS blocked while asked
    lookup_commit: history[n_ctx:] = draft[:accepted], next; n_ctx += accepted + 1; log the step

The accepted drafts are the target's own argmax and `next` is its token after them, so the output
is plain greedy decoding's, token for token. Positions written past the accepted
ones (cache and history) are rewritten by the next step, as a rollback would.

The lookup follows the n-gram rule of specdec/lookup.py (`lookup_reference` is the host twin that
the tests hold the kernel to), with n = 3, 2, 1. The draft is always K tokens, since a verify of
fixed width costs the same whatever it holds: where the copy would run into the context's end it
repeats with the match's period (text that loops continues its loop), and with no match at all it
repeats the last token.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from labkit.config import GenerationConfig
from labkit.errors import LabkitError
from labkit.graphs import GRAPH_MAX_T, VerifyHook, capture, greedy_verdict
from labkit.specdec.draft import Draft, Drafter, Step
from labkit.specdec.lookup import lookup_reference

CHUNK = 8  # speculative steps per host read


def greedy_step(
    step: Any,  # (tokens (B, T), input_pos (B, T)) -> logits (B, T, V): a static verify of rows [0, B)
    history: torch.Tensor,  # (B, Lh) updated in place
    n_ctx: torch.Tensor,  # (B,) updated in place
    eos_mask: torch.Tensor,  # (V,) bool
    eos_until: torch.Tensor,  # (B,) EOS is blocked for tokens at context positions < this (min_new_tokens)
    k: int,
    drafts_log: torch.Tensor,  # (chunk, B, k): [step_idx] gets the drafts
    accepted_log: torch.Tensor,  # (chunk, B): [step_idx] gets the accepted counts
    step_idx: torch.Tensor,  # (1,) advanced in place
    draft: torch.Tensor | None = None,  # (B, k) the step's drafts (a verify hook's, made by the step before); None: the lookup's
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # verdict (B, 2), feed (B, k+1), input_pos (B, k+1)
    """One speculative greedy step of B rows on the device (see the module docstring), each row on
    its own: four registry kernels around the verify pass. One stream is one row; batched rows
    (batch/lookup.py) are many. Each row's cache holds its context but its last token, before and after."""
    from labkit.kernels import registry

    device = history.device
    L = n_ctx  # (B,)
    if draft is None:
        draft = registry.get("lookup_draft", device)(history, L, k)  # (B, k)
    feed, input_pos = registry.get("step_feed", device)(history, L, draft)  # (B, k+1) each: the last token, then the draft; cache positions
    logits = step(feed, input_pos)  # (B, k+1, V)
    verdict = greedy_verdict(logits, feed, eos_mask, eos_until - L)  # (B, 2): feed column j is token L + j
    registry.get("lookup_commit", device)(history, n_ctx, feed, verdict, drafts_log, accepted_log, step_idx)
    return verdict, feed, input_pos


@runtime_checkable
class ReadsHistory(Protocol):
    """A verify hook that also reads the steps' context on the device (eagle-mix's lookup)."""

    def bind_history(self, history: torch.Tensor, n_ctx: torch.Tensor) -> None:
        """history (Lh,) the context's tokens in [0, n_ctx), n_ctx (1,): LookupSteps' own buffers, as each step's commit left them."""


class LookupSteps:
    """`chunk` speculative steps of width K per host read, as one captured step replayed (CUDA
    graphs) or run eagerly (any device: the same operations, for tests and the CPU). It points
    into the engine's cache, so the engine owns it (`Engine.captured`) and drops it with the cache.

    With a verify `hook` (a drafter that drafts inside the verify: EAGLE chains), a step's draft is
    the first K of the `n_cols` columns the hook made from the step before (its `draft_after` on
    the pass's hidden states and verdict, on the device); the first step's come from the host.
    A hook with no columns only watches: the lookup drafts and the hook sees each verify
    (eagle-ngram's copy steps keep EAGLE's draft cache true so, specdec/eagle_drafter.py)."""

    def __init__(self, engine: Any, k: int, chunk: int = CHUNK, hook: VerifyHook | None = None, n_cols: int = 0) -> None:
        max_len = engine.cache.max_len  # warm-ups write its last positions, past every request
        if engine.batch_size != 1:
            raise LabkitError("the n-gram graph drafter decodes batch 1")
        if not 1 <= k < GRAPH_MAX_T:
            raise LabkitError(f"the n-gram graph drafter drafts 1 to {GRAPH_MAX_T - 1} tokens per step, got {k}")
        device, self.engine, self.k, self.chunk = engine.device, engine, k, chunk
        self.history = torch.zeros(max_len + k + 1, dtype=torch.long, device=device)  # (Lh,) room for a step past the end
        self.n_ctx = torch.ones(1, dtype=torch.long, device=device)  # (1,)
        self.on_device = 0  # context tokens the history holds (a host mirror)
        self.eos_mask = torch.zeros(engine.args.vocab_size, dtype=torch.bool, device=device)  # (V,)
        self.eos_until = torch.zeros(1, dtype=torch.long, device=device)  # (1,)
        self.step_idx = torch.zeros(1, dtype=torch.long, device=device)  # (1,)
        self.drafts = torch.zeros(chunk, 1, k, dtype=torch.long, device=device)  # (chunk, 1, k): one row
        self.accepted = torch.zeros(chunk, 1, dtype=torch.long, device=device)  # (chunk, 1)
        if hook is not None and 0 < n_cols < k:
            raise LabkitError(f"a verify hook's {n_cols} columns cannot draft {k} tokens a step")
        self.cols = torch.zeros(n_cols, dtype=torch.long, device=device)  # (n_cols,) the hook's next draft
        self.last_cols: list[int] = []  # the hook's columns after the last run (host)
        self.hook = hook
        if isinstance(hook, ReadsHistory):  # a hook that reads the steps' context (eagle-mix's lookup)
            hook.bind_history(self.history, self.n_ctx)
        self.graph = None
        static = engine.static_step

        def body() -> None:
            draft = self.cols[None, :k] if n_cols else None  # (1, k)
            verdict, feed, input_pos = greedy_step(lambda tokens, pos: static(tokens, pos[0], None), self.history[None], self.n_ctx,
                                                   self.eos_mask, self.eos_until, k, self.drafts, self.accepted, self.step_idx, draft)
            if hook is not None:  # the next step's draft, from this pass (none from a watching hook)
                self.cols.copy_(hook.draft_after(engine.model.last_hidden, verdict, engine.model.lm_head, feed, input_pos[0])[0])

        self.body = body
        if engine.cuda_graph:

            def prepare() -> None:  # warm-ups write the cache's last positions, out of every request's reach
                self.n_ctx.fill_(max_len - k)
                self.step_idx.zero_()

            self.graph = capture(engine, body, prepare)

    @torch.inference_mode()
    def run(self, context: list[int], m: int, eos_mask: torch.Tensor, eos_until: int, fresh: bool = False,
            cols: list[int] | None = None) -> list[tuple[list[int], list[int]]]:
        """m steps from `context` (the engine's cache holds all but its last token); returns each
        step's (draft, new tokens) and leaves the cache holding the new context but its last token.
        `fresh`: a new request (the history on the device is not its own). `cols`: with a hook, its
        columns for the first step (the host's draft); the hook's last ones are in `last_cols`."""
        engine, k = self.engine, self.k
        L0 = len(context)
        if not 1 <= m <= self.chunk or L0 - 1 != engine.length or L0 - 1 + m * (k + 1) > engine.max_seq_len:
            raise LabkitError(f"{m} steps of {k + 1} tokens from position {L0 - 1} do not fit (cache {engine.length}/{engine.max_seq_len})")
        if fresh or self.on_device > L0:  # not this request's history
            self.on_device = 0
        new = context[self.on_device :]
        if new:
            self.history[self.on_device : L0] = torch.tensor(new, device=engine.device)
        self.n_ctx.fill_(L0)
        self.eos_mask.copy_(eos_mask)
        self.eos_until.fill_(eos_until)
        self.step_idx.zero_()
        if cols is not None:
            n = self.cols.numel()
            self.cols.copy_(torch.tensor((list(cols) + [0] * n)[:n], device=engine.device))
        with engine.autocast():
            for _ in range(m):
                if self.graph is not None and engine.graphs_safe:  # near the context's end: eagerly
                    self.graph.replay()
                else:
                    self.body()
        # one read: the context length, the tokens written, the drafts and the accepted counts
        span = m * (k + 1)
        back = torch.cat([self.n_ctx, self.history[L0 : L0 + span], self.drafts[:m].flatten(), self.accepted[:m, 0], self.cols]).tolist()
        n_ctx, written = back[0], back[1 : 1 + span]
        drafts = back[1 + span : 1 + span + m * k]
        accepted = back[1 + span + m * k : 1 + span + m * k + m]
        self.last_cols = back[1 + span + m * k + m :]
        steps, at = [], 0
        for i, a in enumerate(accepted):
            steps.append((drafts[i * k : (i + 1) * k], written[at : at + a + 1]))
            at += a + 1
        assert at == n_ctx - L0
        self.on_device = n_ctx
        engine.set_length(n_ctx - 1)
        return steps


class LookupGraphDrafter(Drafter):
    """Prompt lookup (3-, 2- and 1-grams, see lookup_reference) whose greedy steps run on the
    device, CHUNK steps per host read (`run_steps`: it is its own DeviceSteps), captured as one
    CUDA graph where the engine has graphs. Elsewhere (sampling, other policies, timed phases) it
    proposes from the host like any drafter, with the same lookup."""

    name = "ngram-graph"
    chunk = CHUNK

    def __init__(self, target: Any) -> None:
        self.target = target
        self.device_steps = self
        self._used: set[int] = set()  # widths that ran steps in this request

    def start(self, prompt_ids: list[int], capacity: int) -> None:
        self._used = set()

    def propose(self, context: list[int], k: int, config: GenerationConfig, generator: torch.Generator | None) -> Draft:
        return Draft(lookup_reference(context, k))

    @torch.inference_mode()  # like the engine's own steps: buffers and capture without autograd
    def steps_for(self, k: int) -> LookupSteps:
        """The device steps of width k: held by the engine with its other captured graphs, so a
        new cache never meets an old graph."""
        return self.target.captured(("lookup", k), lambda: LookupSteps(self.target, k))

    def run_steps(self, context: list[int], k: int, m: int, eos_mask: torch.Tensor, eos_until: int) -> list[Step]:
        fresh = k not in self._used
        self._used.add(k)
        return self.steps_for(k).run(context, m, eos_mask, eos_until, fresh)
