"""How many device steps the next chunk runs, and whether it may start before the host has taken
the last one's tokens (batch/scheduler.py's chunks of batch/lookup.py's steps).

A chunk's rows step together until its end, so a row that finishes inside it idles through the
steps after it, and one that needs more after a short chunk costs a host read: a chunk runs CHUNK
steps, or fewer where every row should be done sooner by its tokens per step so far. (Tried: where
a request waited for a slot, ending a chunk where its first row should be done, so that its slot
idled no steps. On the H200 under a steady load at 4 rows, against the same day's run without it:
eagle-mix-device-3 1.33x plain against 1.37x, eagle-device-auto-3 1.22x against 1.27x,
eagle-device-3 1.36x against 1.33x: no gain beyond the runs' noise, so not kept (the short chunks
near each row's end cost host reads that no chunk ahead hides; results/gpu/batch-NVIDIA-H200-20261204-165814.json,
-170345.json. Also tried: the next chunk queued behind the last before it is read, where no row could
reach its token budget in it, each chunk's log copied to the host behind it: eagle-mix-device-3 at 4 rows
10,734 against 10,726 tok/s in the same call, nothing measurable, so not kept:
results/gpu/batch-NVIDIA-H200-20261204-190024.json, -190204.json.)

Ahead: the host's work on a chunk (reading it, taking each row's verdicts) leaves the device idle
unless the next chunk already runs. The device holds every row's state, so the next chunk can be
launched as soon as the last is read, where no row's slot changes: none ends in it (an ended row's
slot is freed, and maybe refilled, by the host) and every row has room for another chunk.
"""

from __future__ import annotations

import math
from typing import Any

from labkit.batch.lookup import CHUNK


def chunk_steps(rows: list[Any], coming: list[int] | None = None, uncounted: int = 0) -> int:
    """Steps for the next chunk of these requests (BatchRequest: tokens, verify_steps, config).
    coming, uncounted: each row's tokens and the steps of a chunk read but not yet taken."""
    def left(r: Any, extra: int) -> int:
        done = len(r.tokens) + extra
        per_step = max(1.0, (done - 1) / max(1, r.verify_steps + uncounted))
        return math.ceil((r.config.max_new_tokens - done) / per_step)

    return max(1, min(CHUNK, max(left(r, c) for r, c in zip(rows, coming or [0] * len(rows), strict=True))))


def rows_go_on(rows: list[Any], tokens: list[list[list[int]]], room: int) -> list[int] | None:
    """Each row's tokens in a chunk just read (tokens[step][row], BatchLookup.read), where every row
    goes on after it: not finished (nor cancelled), short of max_new_tokens and of an EOS that ends
    it, and its context within `room`; else None."""
    coming = [[t for step in tokens for t in step[i]] for i in range(len(rows))]
    for r, new in zip(rows, coming, strict=True):
        if r.finished or len(r.tokens) + len(new) >= r.config.max_new_tokens or len(r.context) + len(new) > room \
                or (r.config.stop_at_eos and any(t in r.eos_ids for t in new)):
            return None
    return [len(new) for new in coming]
