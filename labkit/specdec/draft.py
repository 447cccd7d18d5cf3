"""What a drafter is and what it hands the generate loop: a leaf module, so every drafter (and
the loop's steps) import it, not each other.

A drafter declares what it can do, and the loop (labkit/steps.py) picks its step from that once
per request, never by asking what class a drafter is:

    propose(context, k)   host proposals: every drafter has them (any policy, sampling, timed phases)
    device_steps          DeviceSteps or None: whole greedy steps (draft, verify, accept) on the device
    verify_hook           VerifyHook or None: draft work that runs inside the target's greedy verify
    replayable            proposals depend on the context alone (bench/replay.py records them once)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from labkit.config import GenerationConfig
from labkit.graphs import VerifyHook
from labkit.specdec.tree import TokenTree

__all__ = ["DeviceSteps", "Draft", "Drafter", "Step", "VerifyHook"]


@dataclass
class Draft:
    tokens: list[int]  # up to k proposed ids (a tree's nodes in topological order)
    probs: torch.Tensor | None = None  # (len(tokens), V_target) draft distribution, None = one-hot
    parents: list[int] | None = None  # a token tree (specdec/tree.py): parents[i] < i, -1 for a child of the root; None: a chain

    def tree(self) -> TokenTree:
        """The token tree a tree draft is (node 0: the last context token, then the drafts)."""
        assert self.parents is not None
        return TokenTree.of_draft(self.parents)

    def main_chain(self) -> Draft:
        """A tree's first path (each node's first child): what a step that verifies chains only
        takes from it (sampling, lossy policies)."""
        if self.parents is None:
            return self
        chain, node = [], -1
        for i, parent in enumerate(self.parents):
            if parent == node:
                chain.append(self.tokens[i])
                node = i
        return Draft(chain)


Step = tuple[list[int], list[int]]  # one target step: (draft tokens, new tokens: the accepted drafts and the target's next)


class DeviceSteps(Protocol):
    """Speculative greedy steps that run on the device, `chunk` at most per host read."""

    chunk: int

    def run_steps(self, context: list[int], k: int, m: int, eos_mask: torch.Tensor, eos_until: int) -> list[Step]:
        """m steps of width k from `context` (the target's cache holds all but its last token);
        eos_mask (V,) is blocked for tokens at context positions < eos_until. Leaves the cache
        holding the new context but its last token."""
        ...


class Drafter:
    """The base every drafter builds on: host proposals, and no device steps or verify hook
    unless a drafter sets them."""

    name = "drafter"
    replayable = False
    device_steps: DeviceSteps | None = None
    verify_hook: VerifyHook | None = None

    def start(self, prompt_ids: list[int], capacity: int) -> None:
        """A new request: make room for `capacity` positions and forget earlier state."""

    def tree_shapes(self, max_k: int) -> list[TokenTree]:
        """The token trees it drafts at K up to max_k (warm-ups capture their steps); none: chains."""
        return []

    def propose(self, context: list[int], k: int, config: GenerationConfig, generator: torch.Generator | None) -> Draft:
        """Up to k tokens after `context` (every token so far; the target's cache holds all but the last)."""
        raise NotImplementedError
