"""Model families: the one table that says which transformers `model_type` maps to which of our
decoders, what it costs in memory, and which of labkit's kernels and weight formats serve it.
Loading, sizing (doctor) and the engine read it; adding a family is a module in this folder and
a row here (docs/extending.md: "Adding a model family").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from labkit.errors import LabkitError
from labkit.models import gpt2, llama, opt


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # transformers config.model_type values it serves
    build: Callable[[Any], torch.nn.Module]  # a transformers model -> our decoder (weights shared where they can be)
    count_params: Callable[[Any], int]  # from the config alone (labkit doctor, the fit check)
    kv_shape: Callable[[Any], tuple[int, int, int]]  # config -> (layers, KV heads, head dim)
    fused_layers: bool = False  # the fused layer kernels (Triton on CUDA, C on the CPU) run its layers
    gguf_blocks: bool = False  # a GGUF file's quantised blocks can serve as its weights


FAMILIES = (
    Family("llama", ("llama", "mistral", "qwen2"), llama.Llama.from_hf, llama.count_params, llama.kv_shape,
           fused_layers=True, gguf_blocks=True),
    Family("gpt2", ("gpt2",), gpt2.GPT2.from_hf, gpt2.count_params, gpt2.kv_shape),
    Family("opt", ("opt",), opt.from_hf, opt.count_params, opt.kv_shape),
)
SUPPORTED_TYPES = tuple(t for family in FAMILIES for t in family.model_types)


def family_of(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise LabkitError(f"architecture {model_type!r} is not supported by labkit's engine: use {', '.join(SUPPORTED_TYPES)}")


def family_of_model(model: torch.nn.Module) -> Family:
    """The family of one of our decoders (each carries its family's name in `family`)."""
    name = model.family
    for family in FAMILIES:
        if family.name == name:
            return family
    raise LabkitError(f"{type(model).__name__} names no model family (a decoder sets `family`)")


def build_decoder(hf_model: Any) -> torch.nn.Module:
    """Our compact forward for a transformers model, sharing its weights where it can."""
    return family_of(hf_model.config.model_type).build(hf_model)
