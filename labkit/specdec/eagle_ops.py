"""How EAGLE's draft layer runs on a target (specdec/eagle_drafter.py): which layer operations it
shares with the target, the same with every launch under a device flag, the target's token
embedding it reads, and a verify's catch-up and chain inputs.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.kernels.registry import glue_kernels


def target_runs_triton(target: Engine) -> bool:
    """Whether the target runs the fused Triton layers, which the draft layer then shares."""
    return target.layer_kernels == "triton"


def draft_layer_ops(target: Engine) -> Any:
    """How the draft layer runs: through the target's fused Triton kernels where the target runs
    them (five launches a layer, attention over the positions each query sees); on a CPU through
    their PyTorch twins (attention up to the last position, not the whole cache); else as PyTorch
    ops over the whole draft cache with a mask (capturable on any GPU)."""
    if target_runs_triton(target):
        from labkit.kernels import layer_triton

        return layer_triton
    if target.device.type == "cpu":
        from labkit.kernels import layer_reference

        return layer_reference
    return None


def draft_layer(target: Engine, head: Any, weight: torch.Tensor) -> tuple[Any, Any, torch.nn.Module | None]:
    """(the head that drafts, how its layer runs (draft_layer_ops), the draft head as a linear on blocks) where
    the target reads GGUF blocks on a CPU (eagle_cpu.py, on a copy of the head); else (head, ops, None: a product)."""
    if target.layer_kernels != "cpu":
        return head, draft_layer_ops(target), None
    from labkit.specdec.eagle_cpu import cpu_draft_layer

    return cpu_draft_layer(head, target.model.lm_head, weight)


class OnlyIf:
    """The fused layer operations `ops` with every call given `only_if` (1,) bool: a Triton launch
    whose flag is false returns right after its inputs' wait, writing nothing (the PyTorch twins
    compute anyway). eagle-mix's captured steps call a step's chain off where it copies, on a
    PyTorch without conditional graph nodes (specdec/eagle_mix.py)."""

    def __init__(self, ops: Any, only_if: torch.Tensor) -> None:
        self.ops, self.only_if = ops, only_if

    def __getattr__(self, name: str) -> Any:
        return functools.partial(getattr(self.ops, name), only_if=self.only_if)


def token_embedding(model: Any) -> torch.nn.Module:
    """The target's token embedding (Llama: embed; GPT-2 and OPT: wte)."""
    embed = getattr(model, "embed", None)
    embed = getattr(model, "wte", None) if embed is None else embed
    if embed is None:
        raise LabkitError(f"EAGLE needs the target's token embedding; {type(model).__name__} has none it knows")
    return embed


def after_verify_inputs(ops: Any, tokens: torch.Tensor, verdict: torch.Tensor, input_pos: torch.Tensor, depth: int,
                        last_pos: int, counting: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """After a verify of tokens (B, T) at input_pos (B, T) or (T,) with this verdict (B, 2): the catch-up's
    tokens (B, T) and positions (input_pos's shape) and the chain's positions (depth - 1, B), clamped to
    last_pos (layer_reference.chain_inputs; counting: 0, 1, ... on the device, sliced there). One Triton launch
    where the ops are the Triton kernels and LABKIT_GLUE_KERNELS=1 asks for it (no measurable gain on an H200)."""
    if glue_kernels() and hasattr(ops, "chain_inputs"):
        return ops.chain_inputs(tokens, verdict, input_pos, depth, last_pos)
    from labkit.kernels import layer_reference

    return layer_reference.chain_inputs(tokens, verdict, input_pos, depth, last_pos, counting)
