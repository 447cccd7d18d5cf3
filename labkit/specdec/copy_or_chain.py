"""eagle-ngram's choice per chunk of device steps: copy steps or chain steps, by measured rates.

A chunk of CHUNK device steps replays one captured graph, so the kind of step is chosen per chunk,
on the host, from what the last chunks showed:

    chain steps   EAGLE's chain (0.78-0.79 ms a step on the H200: a catch-up and a pass per depth)
    copy steps    prompt lookup's copy, COPY_K wide (ngram-graph's step, 0.57 ms there, and one copy
                  of the verify's hidden states, kept for the chain that follows to catch up over)

Each is rated in tokens per second = (tokens per step) / (seconds per step). Seconds per step are
the host's clock around each chunk's device steps (one read per chunk: the clock sees the device's
time). Tokens per step come from the chunks of that kind, and for copy steps also from chain
chunks, without running them: the text a chain chunk made is known, so for each of its steps the
tokens lookup's draft would have kept are counted against it (its agreement with what followed,
which a greedy verify would have accepted; a later step's draft may run past the chunk's text and
is counted short). A copy chunk's tokens cannot say what a chain would have made, so chains keep
their last rate until they run again, which they do as soon as copying rates below them.

The host's proposal before a chain chunk is not in the chunk's seconds. After copy steps it is a
switch (the chain catches the draft cache up over the copied span and drafts its first chain,
eagerly), timed on its own (`switch_s`): going to copy steps is weighed with one switch back over
a chunk's steps, leaving them by the rates alone (the switch was weighed on the way in). Counted
in the chain chunk's seconds, as before, every switch made chains look slower than they step.
"""

from __future__ import annotations

from labkit.kernels.reference import LOOKUP_MAX_N
from labkit.specdec.draft import Step
from labkit.specdec.lookup import periodic_copy
from labkit.specdec.ngram import NgramDrafter

COPY_COST_GUESS = 0.7  # a copy step's seconds over a chain step's, until a copy chunk is timed
MEMORY = 0.5  # weight of the earlier estimate when a chunk updates one


def agreement(draft: list[int], after: list[int]) -> int:
    """How many of the draft's tokens a greedy verify keeps where the text goes on as `after`."""
    n = 0
    while n < len(draft) and n < len(after) and draft[n] == after[n]:
        n += 1
    return n


class CopyOrChain:
    def __init__(self, min_n: int) -> None:
        self.index = NgramDrafter(max_n=LOOKUP_MAX_N, min_n=min_n)  # lookup's match (the rule of specdec/lookup.py), O(new tokens) a step
        self.tokens: dict[bool, float] = {}  # copy steps? -> tokens per step
        self.seconds: dict[bool, float] = {}  # copy steps? -> seconds per step (kept across requests: the device's own)
        self.switch_s = 0.0  # the host's work before a chain chunk that follows copy steps (kept across requests)

    def start(self, prompt_ids: list[int], capacity: int) -> None:
        self.index.start(prompt_ids, capacity)
        self.tokens = {}

    def copy(self, context: list[int], k: int) -> list[int] | None:
        """Lookup's k-token draft (the device's rule: periodic_copy) where the context ends in a match
        of at least min_n tokens; else None."""
        c = self.index.match(context)
        return None if c is None else periodic_copy(context, c, k)

    def _update(self, table: dict[bool, float], copy: bool, value: float) -> None:
        table[copy] = value if copy not in table else MEMORY * table[copy] + (1 - MEMORY) * value

    def after_chunk(self, context: list[int], steps: list[Step], copy: bool, seconds: float, k_copy: int,
                    switch_s: float | None = None) -> bool:
        """Book a chunk of `steps` from `context` (copy or chain steps, `seconds` of device steps on
        the host's clock; copy steps draft k_copy tokens; switch_s: a chain chunk's proposal time
        after copy steps) -> whether the next chunk runs copy steps."""
        if switch_s is not None:
            self.switch_s = switch_s if not self.switch_s else MEMORY * self.switch_s + (1 - MEMORY) * switch_s
        if not steps:
            return copy
        self._update(self.seconds, copy, seconds / len(steps))
        made = [t for _, new in steps for t in new]
        self._update(self.tokens, copy, len(made) / len(steps))
        if not copy:  # what copy steps would have kept at each of these steps
            at, kept = len(context), 0
            text = context + made
            for _, new in steps:
                kept += 1 + agreement(self.copy(text[:at], k_copy) or [], text[at:])
                at += len(new)
            self._update(self.tokens, True, kept / len(steps))
        chain_s = self.seconds.get(False)
        if chain_s is None or False not in self.tokens or True not in self.tokens:
            return False
        copy_s = self.seconds.get(True, COPY_COST_GUESS * chain_s)
        chain_rate = self.tokens[False] / chain_s
        if copy:  # the switch back was weighed on the way in: the rates alone
            return self.tokens[True] / copy_s > chain_rate
        n = len(steps)  # a copy run of at least a chunk like this one, then one switch back to chains
        return self.tokens[True] * n / (copy_s * n + self.switch_s) > chain_rate
