"""The kinds of step the generate loop takes, one small unit each, chosen once per request.

Every step advances a `Request` by one or more target forwards and books the tokens they make
(`Request.keep`). Invariant between steps: the target's cache holds every context token but the last.

    PlainGreedy        greedy decoding, a chunk of tokens per host read on an asynchronous device
    PlainSampled       one sampled token per forward
    HostSpeculation    the drafter proposes on the host; the target verifies; the policy accepts
                       (greedy: inside the verify step, with the drafter's verify hook if it has one)
    DeviceSpeculation  the drafter's device steps: draft, verify and accept with no host in between

`choose_step` picks from what the drafter, policy and controller declare (specdec/draft.py):
nothing here asks what class an object is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

import torch

from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.metrics.phases import PhaseTimer
from labkit.metrics.stats import GenerationStats
from labkit.sampling import sample
from labkit.specdec.controllers import Controller
from labkit.specdec.draft import DeviceSteps, Draft, Drafter
from labkit.specdec.policies import Policy, TreePolicy, Verdict
from labkit.specdec.tree import TokenTree
from labkit.tree_verify import tree_verify


@dataclass
class Request:
    """One request's state, shared by its steps."""

    engine: Engine
    config: GenerationConfig
    generator: torch.Generator | None
    timer: PhaseTimer
    eos: set[int]  # ids that end the output (empty without stop_at_eos)
    eos_mask: torch.Tensor  # (V,) bool: EOS ids, blocked before min_new_tokens
    has_eos: bool  # the model (or the config) names EOS ids at all
    budget: int  # new tokens at most (the token budget or the context's end)
    prompt_len: int
    stats: GenerationStats
    tokens: list[int] = field(default_factory=list)  # new tokens so far
    context: list[int] = field(default_factory=list)  # prompt and new tokens
    stop_reason: str = ""
    t_prev: float = 0.0  # host clock at the last booked step
    on_tokens: Callable[[list[int]], bool] | None = None  # sees each step's new tokens; False stops the request ("cancelled")

    @property
    def remaining(self) -> int:
        return self.budget - len(self.tokens)

    @property
    def eos_block(self) -> int:
        """New tokens that must still come before an EOS may (min_new_tokens)."""
        return self.config.min_new_tokens - len(self.tokens) if self.has_eos else 0

    def suppress_eos(self, logits: torch.Tensor) -> torch.Tensor:  # (T, V): row j is new token len(tokens) + j
        rows = min(logits.shape[0], self.config.min_new_tokens - len(self.tokens))
        if rows > 0 and self.has_eos:
            logits = logits.clone()
            logits[:rows] = logits[:rows].masked_fill(self.eos_mask, float("-inf"))
        return logits

    def keep(self, new: list[int], drafted: list[int]) -> None:
        """Book one step's new tokens (an EOS inside them, or the budget, ends the output there)."""
        before = len(self.tokens)
        for token in new:
            if len(self.tokens) == self.budget:
                break
            self.tokens.append(token)
            if token in self.eos:
                self.stop_reason = "eos"
                break
        kept = len(self.tokens) - before
        stats = self.stats
        if drafted:
            stats.draft_tokens.append(drafted)
            stats.accepted_lengths.append(len(new) - 1)
        else:  # one target forward per kept token (a chunk's steps past an EOS are not counted)
            stats.draft_tokens.extend([] for _ in range(kept))
            stats.accepted_lengths.extend(0 for _ in range(kept))
        self.context.extend(self.tokens[len(self.context) - self.prompt_len :])
        self.hand_out(self.tokens[before:])
        t = time.perf_counter()
        stats.token_latencies_ms.extend([(t - self.t_prev) * 1e3 / len(new)] * len(new))
        self.t_prev = t


    def hand_out(self, new: list[int]) -> None:
        """Give the kept tokens to on_tokens (a streaming server); its False ends the request."""
        if self.on_tokens is not None and not self.on_tokens(new) and not self.stop_reason:
            self.stop_reason = "cancelled"


class Step(Protocol):
    def __call__(self, req: Request) -> None:
        """Run one or more target forwards (at most req.remaining new tokens) and book them."""
        ...


def last_token(req: Request) -> torch.Tensor:
    return torch.tensor([[req.context[-1]]], device=req.engine.device)  # (1, 1)


class PlainGreedy:
    """Greedy decoding: `chunk` tokens per host synchronisation at most (the engine's greedy chunk)."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk

    def __call__(self, req: Request) -> None:
        t0 = time.perf_counter()
        with req.timer.phase("decode"):
            new = req.engine.decode_greedy(last_token(req), min(self.chunk, req.remaining), req.eos_mask,
                                           req.config.min_new_tokens - len(req.tokens))[0].tolist()
        req.stats.verify_s += time.perf_counter() - t0
        req.keep(new, [])


class PlainSampled:
    """One token sampled from the target's distribution per forward."""

    def __call__(self, req: Request) -> None:
        t0 = time.perf_counter()
        with req.timer.phase("decode"):
            logits = req.suppress_eos(req.engine.decode(last_token(req)))  # (1, V)
        with req.timer.phase("sampling"):
            new = [int(sample(logits, req.config, req.generator).item())]
        req.stats.verify_s += time.perf_counter() - t0
        req.keep(new, [])


class HostSpeculation:
    """Draft on the host, verify K+1 tokens in one target pass, accept by the policy. A greedy
    policy that the engine can decide (`fused_greedy`, and phases not timed apart) runs inside
    the verify step: two integers come back, plus the drafter's next draft when it has a verify
    hook. Where the controller asks for no draft (or one would not fit), a plain step runs."""

    def __init__(self, drafter: Drafter, policy: Policy, controller: Controller, plain: Step, fused: bool) -> None:
        self.drafter, self.policy, self.controller, self.plain = drafter, policy, controller, plain
        self.fused = fused
        self.hook = drafter.verify_hook if fused else None

    def __call__(self, req: Request) -> None:
        self.run(req, self.controller.next_k())

    def run(self, req: Request, k_wanted: int) -> None:
        k = min(k_wanted, req.remaining - 1)
        if k < 1:
            self.plain(req)
            return
        req.stats.k_trace.append(k)
        t0 = time.perf_counter()
        with req.timer.phase("draft"):
            draft = self.drafter.propose(req.context, k, req.config, req.generator)
        tree = draft.tree() if draft.parents is not None else None
        if tree is not None and (not (self.fused or self.sampled_trees(draft)) or tree.size > req.engine.max_seq_len - req.engine.length
                                 or max(tree.depths()) > req.remaining - 1):
            draft, tree = draft.main_chain(), None  # trees: an acceptance rule for trees, room for every node, within the budget
        if draft.parents is None:
            draft.tokens = draft.tokens[:k]
        draft_s = time.perf_counter() - t0
        req.stats.draft_s += draft_s
        if not draft.tokens:
            self.plain(req)
            return
        t0 = time.perf_counter()
        if tree is None:
            verdict = self.verify(req, draft)
            new = draft.tokens[: verdict.accepted] + [verdict.next_token]
        else:
            new = self.verify_tree(req, draft, tree)
            verdict = Verdict(len(new) - 1, new[-1])
        self.controller.update(len(draft.tokens), verdict.accepted, draft_s, time.perf_counter() - t0)
        req.stats.verify_s += time.perf_counter() - t0
        req.keep(new, draft.tokens)

    def verify(self, req: Request, draft: Draft) -> Verdict:
        engine = req.engine
        start = engine.length
        feed = torch.tensor([[req.context[-1], *draft.tokens]], device=engine.device)  # (1, K+1)
        if self.fused:  # verify and greedy acceptance in one step: two integers read back (and the hook's draft)
            row = engine.verify_greedy(feed, req.eos_mask, req.eos_block, hook=self.hook)[0].tolist()
            if self.hook is not None:
                self.hook.take(row[2:], len(req.context) + 1 + row[0])
            verdict = Verdict(row[0], row[1])
        else:
            with req.timer.phase("verify"):
                logits = req.suppress_eos(engine.verify(feed)[0])  # (K+1, V)
            with req.timer.phase("accept"):
                verdict = self.policy.accept(feed[0, 1:], draft.probs, logits, req.config, req.generator)
        with req.timer.phase("kv_update"):
            engine.rollback(start + 1 + verdict.accepted)  # keep the last token and the accepted drafts
        return verdict

    def sampled_trees(self, draft: Draft) -> bool:
        """Whether this policy verifies a tree under sampling (one-hot drafts, multi-draft rejection)."""
        return self.policy.trees and draft.probs is None

    def verify_tree(self, req: Request, draft: Draft, tree: TokenTree) -> list[int]:
        """A token tree in one pass (labkit/tree_verify.py): the accepted path's tokens and the
        target's next token; the cache keeps the path. Greedy: inside the step; sampling: the
        policy's tree rule on the host between the pass and the commit."""
        engine = req.engine
        tokens = [req.context[-1], *draft.tokens]  # node 0: the last context token
        node_depths = tree.depths()
        if self.fused:
            step = tree_verify(engine, tree.size, max(node_depths), self.hook)
            path, next_token, columns = step.run(tree, tokens, req.eos_mask, req.eos_block)
        else:
            depths = torch.tensor(node_depths, device=engine.device)  # (N,) node i's row is new token len(tokens) + depth(i)

            def pick(logits: torch.Tensor) -> tuple[list[int], int]:  # (N, V)
                if req.eos_block > 0:
                    logits = logits.masked_fill((depths < req.eos_block)[:, None] & req.eos_mask[None, :], float("-inf"))
                return cast(TreePolicy, self.policy).accept_tree(tree, tokens, logits, req.config, req.generator)

            path, next_token = tree_verify(engine, tree.size, max(node_depths)).run_host(tree, tokens, pick)
            columns = []
        parents = [p - 1 for p in tree.parents[1:]]  # the draft's own (-1 under the root)
        req.stats.tree_steps.append((len(req.stats.draft_tokens), parents, [n - 1 for n in path]))
        if self.hook is not None:
            self.hook.take(columns, len(req.context) + 1 + len(path))
        return [tokens[n] for n in path] + [next_token]


class DeviceSpeculation:
    """m speculative greedy steps on the device per host read (the drafter's DeviceSteps). Each
    runs at the full K even at the budget's end, where tokens past it are dropped: one captured
    width. Where the cache has no room for a step of K+1, the host step runs instead."""

    def __init__(self, steps: DeviceSteps, controller: Controller, host: HostSpeculation) -> None:
        self.steps, self.controller, self.host = steps, controller, host

    def __call__(self, req: Request) -> None:
        k = self.controller.next_k()
        room = (req.engine.max_seq_len - len(req.context) + 1) // (k + 1)
        if room < 1 or k < 1:  # no room, or no draft asked (a plain step)
            self.host.run(req, k)
            return
        m = min(self.steps.chunk, max(1, req.remaining // 2), room)
        t0 = time.perf_counter()
        steps = self.steps.run_steps(req.context, k, m, req.eos_mask, req.prompt_len + req.config.min_new_tokens)
        step_s = (time.perf_counter() - t0) / len(steps)
        req.stats.verify_s += step_s * len(steps)
        for drafted, new in steps:
            req.stats.k_trace.append(k)
            self.controller.update(len(drafted), len(new) - 1, 0.0, step_s)
            req.keep(new, drafted)
            if req.stop_reason or req.remaining == 0:
                break


def choose_step(engine: Engine, config: GenerationConfig, timed_phases: bool,
                drafter: Drafter | None, policy: Policy | None, controller: Controller | None) -> Step:
    """The step for one request, from what its parts declare. Greedy acceptance runs inside the
    verify step unless phases are timed one by one (which needs them apart)."""
    greedy = config.temperature == 0
    if drafter is None or policy is None or controller is None:
        return PlainGreedy(engine.greedy_chunk) if greedy else PlainSampled()
    plain: Step = PlainGreedy(1) if greedy else PlainSampled()  # a drafter gets its say every step
    fused = policy.fused_greedy and not timed_phases
    host = HostSpeculation(drafter, policy, controller, plain, fused)
    if fused and drafter.device_steps is not None:
        return DeviceSpeculation(drafter.device_steps, controller, host)
    return host
