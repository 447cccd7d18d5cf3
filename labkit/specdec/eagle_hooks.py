"""The verify hooks of EAGLE's device and CPU steps (specdec/eagle_drafter.py): small objects
that a verify calls with its hidden states and verdict (graphs.VerifyHook), each running one part
of the drafter's work inside the verify.

    ChainOf       device chain steps of width K: the catch-up and a chain K deep (eagle_mix.MixOf:
                  the same, or lookup's copy, at every step)
    CatchUpOnly   eagle-ngram on a CPU: the catch-up only; the proposal drafts a chain where it takes no copy
    KeepHidden    eagle-ngram's device copy steps: the verify's hidden states kept by position
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from labkit.graphs import GRAPH_MAX_T

if TYPE_CHECKING:
    from labkit.specdec.eagle_drafter import EagleDrafter


class ChainOf:
    """Chain steps' verify hook: EagleDrafter.draft_after with chains as deep as the steps' K (the
    drafter's own draft_after drafts its whole depth inside a captured verify, which then serves
    any K; device steps are captured per K, so depths past it would be drafted for nothing)."""

    def __init__(self, drafter: EagleDrafter, depth: int) -> None:
        self.drafter, self.depth = drafter, depth
        self.max_t = drafter.max_t

    def draft_after(self, hidden: torch.Tensor, verdict: torch.Tensor, lm_head: torch.nn.Module,
                    tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:  # -> (B, depth)
        return self.drafter.catch_up_chain(hidden, verdict, tokens, input_pos, self.depth)

    def chain_from(self, anchor_feat: torch.Tensor, verdict: torch.Tensor, input_pos: torch.Tensor,
                   only_if: torch.Tensor | None = None, pos: torch.Tensor | None = None) -> torch.Tensor:  # (B, D), (B, 2), (T,) -> (B, depth)
        """The chain from the accepted row (its predicted feature after the catch-up; pos: the chain's positions,
        EagleDrafter.verify_inputs'), launches called off where only_if is false (EagleDrafter.chain)."""
        anchor = input_pos[0] + verdict[:, 0] if pos is None else None
        return self.drafter.chain(anchor_feat, anchor, 1, self.depth, only_if=only_if, pos=pos).flatten(1)

    def take(self, tokens: list[int], context_len: int) -> None:
        pass


class CatchUpOnly:
    """eagle-ngram's verify hook on a CPU: the catch-up inside the verify (the draft cache's
    elements for the verified rows, and the anchor's feature kept), no chain. The next proposal
    drafts a chain from that anchor only where it takes no copy: on a CPU the chain costs the same
    inside the verify or after it, and a copy step needs none."""

    def __init__(self, drafter: EagleDrafter) -> None:
        self.drafter = drafter
        self.max_t = drafter.max_t

    def draft_after(self, hidden: torch.Tensor, verdict: torch.Tensor, lm_head: torch.nn.Module,
                    tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:  # -> (B, 0)
        self.drafter.anchor_feat.copy_(self.drafter.catch_up(hidden, verdict, tokens, input_pos))
        return tokens[:, :0]

    def take(self, tokens: list[int], context_len: int) -> None:
        self.drafter.anchored(context_len)


class KeepHidden:
    """eagle-ngram's copy steps' watching hook: inside each verify it keeps the pass's hidden states
    at their positions (one copy; rows past the accepted ones are rewritten by the next step's pass),
    so the chain after the copy steps catches the draft cache up over their whole span in one go
    (EagleDrafter._propose) instead of a draft-layer pass inside every copy step."""

    def __init__(self, drafter: EagleDrafter) -> None:
        self.drafter = drafter
        self.max_t = GRAPH_MAX_T

    def draft_after(self, hidden: torch.Tensor, verdict: torch.Tensor, lm_head: torch.nn.Module,
                    tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:  # -> (B, 0)
        self.drafter.keep_hidden(hidden, input_pos)
        return tokens[:, :0]

    def take(self, tokens: list[int], context_len: int) -> None:
        pass
