"""How EAGLE's draft layer runs on a target (specdec/eagle_drafter.py): which layer operations it
shares with the target, the same with every launch under a device flag, and the target's token
embedding it reads.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from labkit.engine import Engine
from labkit.errors import LabkitError


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
