"""When waiting requests join a busy batch: as each slot frees, or a few together.

Terms. A request is *joinable* when it waits and a slot is free for it; the batch is *saturated* when
more requests wait than slots are free (a queue forms, as under load). An *admission* prefills the
joining prompts (batch/engine.py, admit_many): several together run as rows of one pass
(batch/prefill.py), each alone is a pass of its own, and either way the host reads their first
tokens, so the step launched ahead (scheduler.py) waits for it.

Why hold. Rows of one length that decode plain steps finish together, and their successors join in
one pass. Speculative rows finish at different steps (each keeps its own drafts), so admitting as
each slot frees prefills the successors one at a time: at 16 rows on the H200, prompt lookup under
the K controller ran 0.91x plain where its steps, as the controller rated them, ran 1.03x
(results/gpu/batch-trace-NVIDIA-H200-60a1612.txt: about 20 ms more a run than plain, outside the
steps). So while the batch is saturated, a joinable request is held until `group` requests can join
together, or until the first held has waited `hold` steps. A held slot costs its row's tokens for
the steps it idles (one row of the batch's step); batching saves a pass per request joined.

Never held: a request that can join with every other waiting one (no queue: holding it gains no
company, only latency), or any request when no row runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from labkit.errors import LabkitError

HOLD = 8  # steps the first held request waits at most (a device chunk of steps: batch/lookup.CHUNK)


@dataclass
class Admission:
    group: int = 0  # requests that join a saturated batch together (0: a quarter of its slots, at least 1: no holding up to 7 slots)
    hold: int = HOLD  # steps the first of them waits at most for the others

    def validate(self) -> None:
        if self.group < 0 or self.hold < 0:
            raise LabkitError(f"an admission group and hold are counts, not {self.group} and {self.hold}")


class AdmissionGate:
    """Says how many waiting requests join now (`joining`), and holds them by the Admission policy."""

    def __init__(self, slots: int, policy: Admission | None = None) -> None:
        policy = policy or Admission()
        policy.validate()
        self.group = policy.group or max(1, slots // 4)
        self.hold = policy.hold
        self.since: int | None = None  # the step at which the first held request became joinable

    def joining(self, waiting: int, free: int, running: int, step: int, at: int | None = None) -> int:
        """Requests to admit at `step` (0: none, or held): waiting requests, free slots, rows running, steps
        taken so far; `at`: the step the admission would come at (default `step`: a caller launching steps
        ahead asks whether a hold would still stand after them). Pure: `record` keeps the outcome."""
        joinable = min(waiting, free)
        if not joinable:
            return 0
        if joinable == waiting or not running or joinable >= self.group:
            return joinable
        held_from = self.since if self.since is not None else step
        return joinable if (step if at is None else at) - held_from >= self.hold else 0

    def record(self, joined: int, joinable: int, step: int) -> None:
        """What the step did: `joined` requests admitted of `joinable` (a hold starts at the first held step)."""
        if joined or not joinable:
            self.since = None
        elif self.since is None:
            self.since = step
