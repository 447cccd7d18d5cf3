"""Drafts judged by plain steps: the rows' acceptance while the batch does not draft (greedy only).

The K controller rates each drafting K by what rows keep of their drafts now (batch/controller.py,
`Acceptance`), and text turns copyable, or stops being so, within a request and from one request to
the next. While the batch runs plain steps nothing is drafted, so the acceptance it knew went stale:
at batch 1 on the H200 a writing prompt sent the controller to plain, and the next request, which
copied, began with the last one's acceptance and waited for a try of K to learn otherwise (the
controller ran 1.24x plain where K 5 alone ran 1.39x: results/gpu/batch-NVIDIA-H200-20261202-061702.json).

Under greedy verification a draft's fate does not depend on the K the batch runs: a row keeps the
longest prefix of its draft that the target's own next tokens match, and those tokens are the same
whether they come from plain steps or from verifies. So during plain steps a few rows each propose a
draft on the host (their own drafter, asked as a drafting step asks it), and once the row's next
tokens are in, the draft is judged against them: what a verify would have kept, without one.

The drafting rows are a sample: the first SAMPLE slots, in turn (their requests change as rows
finish and others join). A row that drafts keeps its n-gram index current, about 1 us a token on
the host; turns over all 64 rows had every row index every token (~70 us a step), and at 16-64
rows, where plain steps are short and the host's work shows, the controller ran 0.82-0.89x plain
on plain steps alone (results/gpu/batch-NVIDIA-H200-20261202-120124.json).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from labkit.config import GenerationConfig
from labkit.specdec.draft import Drafter

SAMPLE = 8  # slots whose rows take turns to draft


class Row(Protocol):
    context: list[int]  # prompt + generated: grows in place as the row takes tokens
    tokens: list[int]
    config: GenerationConfig
    drafter: Drafter | None
    finished: bool


@dataclass
class _Pending:
    row: Row
    start: int  # len(row.context) when it drafted: the draft guesses context[start:]
    asked: int  # the K it was asked for (a shorter draft counts as rejected past its end, as a verify counts it)
    draft: list[int]


class ShadowDrafts:
    """Rows of the first SAMPLE slots take turns to draft up to K tokens during plain steps
    (`per_step` rows a step); `judged` hands over, a batch's worth at a time, what each draft would
    have kept."""

    def __init__(self, k: int, per_step: int = 1) -> None:
        self.k, self.per_step = k, per_step
        self.pending: dict[int, _Pending] = {}  # id(row) -> its draft awaiting the row's next tokens
        self.turn = 0  # the row whose turn to draft comes next (rotating over the sample)
        self.ready: list[tuple[int, int]] = []  # (K asked, kept) judged and not yet handed over

    def propose(self, rows: Sequence[Row]) -> None:
        """The next `per_step` rows of the first SAMPLE without a draft pending draft now (none past
        a row's last token, as `ContinuousBatcher._feed` asks)."""
        asked, sample = 0, min(len(rows), SAMPLE)
        for _ in range(sample):
            if asked == self.per_step:
                break
            row = rows[self.turn % sample]
            self.turn += 1
            k = min(self.k, row.config.max_new_tokens - len(row.tokens) - 1)
            if row.finished or row.drafter is None or k <= 0 or id(row) in self.pending:
                continue
            draft = row.drafter.propose(row.context, k, row.config, None).tokens[:k]
            self.pending[id(row)] = _Pending(row, len(row.context), k, list(draft))
            asked += 1

    def judged(self, sweep: int) -> dict[int, list[int]]:
        """K asked -> drafts kept, for the drafts whose rows have taken their next len(draft) tokens
        since; handed over once `sweep` of them are in (the batch's rows: told as one step of that
        many rows, as a drafting step's verdicts are, so that one row's copying does not sway the
        batch's acceptance as much as a whole step of rows), else {}. A row that finished first
        (EOS) is forgotten, its draft never judged."""
        for key, p in list(self.pending.items()):
            if len(p.row.context) >= p.start + len(p.draft):  # (checked first: most rows are still waiting, every plain step)
                kept = 0
                while kept < len(p.draft) and p.row.context[p.start + kept] == p.draft[kept]:
                    kept += 1
                self.ready.append((p.asked, kept))
            elif not p.row.finished:
                continue
            del self.pending[key]
        if len(self.ready) < sweep:
            return {}
        out: dict[int, list[int]] = {}
        for asked, kept in self.ready:
            out.setdefault(asked, []).append(kept)
        self.ready = []
        return out
