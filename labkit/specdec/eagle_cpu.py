"""EAGLE's draft layer on a CPU target that reads its GGUF's blocks: run as the target runs.

A draft pass in fp32 PyTorch read the draft layer (4.2 M weights) and its draft-vocabulary head
(4.7 M) as fp32, about 36 MB a pass, against about 70 MB of 4-bit blocks for a whole target step,
so a chain of passes cost more than two target steps. Here the layer's linears become Q8_0 blocks
(their dense weights set to the blocks' values, so both paths compute with one set of values),
the head reads the draft vocabulary's rows of the target's own head blocks, and the C layer
operations run the layer (kernels/cpu_layer.c): about 9 MB a pass. Its products take the target's
activations (fp32, or 8-bit with --weights gguf-q8, on kernels/cpu_q8_tiles.c's tiles where the build
has them). Drafts change where the rounding moves an argmax; the verify keeps the output the target's
either way.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from labkit.kernels.layer_cpu import CpuLayerOps
from labkit.models.gguf_weights import QuantLinear, QuantWeight, block_linear
from labkit.specdec.eagle import EagleHead

LINEARS = ("fc", "wqkv", "wo", "w_gate_up", "w_down")


def cpu_draft_layer(head: EagleHead, lm_head: QuantLinear, weight: torch.Tensor) -> tuple[EagleHead, CpuLayerOps, QuantLinear]:
    """A copy of the head with its linears on Q8_0 blocks (the caller's head is left as it was) and
    the draft head's rows of the target's head blocks -> (that head, the C operations over them,
    the draft head as a linear: (M, D) -> (M, N))."""
    head = copy.deepcopy(head)
    for name in LINEARS:
        layer = getattr(head, name)
        if not isinstance(layer, QuantLinear):
            setattr(head, name, block_linear(layer))
    rows = QuantWeight(lm_head.kind, lm_head.qs, lm_head.d, lm_head.m)
    if weight.shape[0] != rows.qs.shape[0]:  # a reduced draft vocabulary: its rows of the blocks
        rows = rows.take_rows(head.vocab_ids.to(rows.qs.device))
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    dense.weight = nn.Parameter(weight, requires_grad=False)  # (N, D): the same values, dequantised
    draft_head = QuantLinear(dense, rows)
    linears = [*(getattr(head, name) for name in LINEARS), draft_head]
    for layer in linears:  # the target's activations (--weights gguf-q8: 8 bits, on tiles where the build has them)
        layer.act = lm_head.act
    return head, CpuLayerOps(linears), draft_head
