"""K controllers: how many tokens to draft next. Each keeps K in [1, k_max]."""

from __future__ import annotations

from typing import Protocol


class Controller(Protocol):
    name: str
    k_max: int

    def next_k(self) -> int: ...

    def update(self, drafted: int, accepted: int) -> None: ...


class FixedK:
    name = "fixed"

    def __init__(self, k: int) -> None:
        self.k_max = k

    def next_k(self) -> int:
        return self.k_max

    def update(self, drafted: int, accepted: int) -> None:
        pass
