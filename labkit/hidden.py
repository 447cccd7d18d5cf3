"""The target's final hidden states that drafters read (draft heads, EAGLE): what the engine's
last full pass left, and, for a drafter that reads every position, a prompt's states gathered
across the passes it ran as.

Positions are cache positions: the kept rows cover [start, end). Captured steps hand out their
output buffer, valid until the step replays; a prompt's gathered states are copies.
"""

from __future__ import annotations

import torch

from labkit.errors import LabkitError


class KeptHidden:
    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None  # (B, n, D) final hidden states ...
        self.start = 0  # ... whose first row is this cache position
        self._parts: list[torch.Tensor] | None = None  # a prompt's passes, while they run (gather)
        self._parts_start = 0

    def keep(self, hidden: torch.Tensor | None, end: int) -> None:  # hidden: (B, rows, D) for positions up to end-1
        if hidden is None:  # None unless a drafter asked for hidden states (the model keeps nothing then)
            return
        self.rows, self.start = hidden, end - hidden.shape[1]
        if self._parts is not None:
            if not self._parts:
                self._parts_start = self.start
            self._parts.append(hidden.clone())  # a captured step's buffer is rewritten by the next pass

    def gather(self) -> None:
        """From now until `gathered`, every pass's rows are copied (a prompt run as several passes)."""
        self._parts = []

    def gathered(self) -> None:
        """The rows of every pass since `gather`, as one span (consecutive passes only)."""
        parts, self._parts = self._parts, None
        if parts and len(parts) > 1:
            self.rows, self.start = torch.cat(parts, dim=1), self._parts_start

    def span(self, start: int, end: int) -> torch.Tensor:  # -> (B, end - start, D)
        """The states at cache positions [start, end), all from the last pass (or gathered prompt)."""
        if self.rows is None:
            raise LabkitError("no hidden states kept: attach draft heads (keep_hidden_states) before decoding")
        lo, hi = start - self.start, end - self.start
        if not 0 <= lo <= hi <= self.rows.shape[1]:
            raise LabkitError(f"positions {start}..{end - 1} are not all in the last pass (positions {self.start}.."
                              f"{self.start + self.rows.shape[1] - 1})")
        return self.rows[:, lo:hi]

    def at(self, pos: int) -> torch.Tensor:  # -> (B, D)
        return self.span(pos, pos + 1)[:, 0]
