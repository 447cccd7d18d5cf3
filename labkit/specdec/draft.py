"""What a drafter hands the generate loop (`Draft`), and the protocol every drafter follows: a
leaf module, so the drafters and the device-step drafter (lookup_steps.py) import it, not each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from labkit.config import GenerationConfig


@dataclass
class Draft:
    tokens: list[int]  # up to k proposed ids
    probs: torch.Tensor | None = None  # (len(tokens), V_target) draft distribution, None = one-hot


class Drafter(Protocol):
    name: str

    def begin(self, prompt_ids: list[int], capacity: int) -> None:
        """A new request: make room for `capacity` positions and forget earlier state."""
        ...

    def propose(self, context: list[int], k: int, config: GenerationConfig, generator: torch.Generator | None) -> Draft: ...
