"""The worker that owns the engine: requests wait in a FIFO queue and run one at a time (batch 1)
on one thread, so nothing else ever touches the engine or its drafters. The server talks to it
through the small `Scheduler` interface (submit, depth, close), which a batching scheduler can
implement later without the server changing.

Tokens travel back as they are accepted (several per step when a draft stands) through the job's
event queue on the server's event loop. A job whose client went away, or whose time ran out,
stops at the next step and frees the engine.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from labkit.config import DRAFTERS
from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.generate import MAX_K, GenerationResult, Speculation, generate, valid_k
from labkit.serve.metrics import ServeMetrics
from labkit.serve.protocol import FINISH, APIError, ServeRequest
from labkit.specdec.controllers import CONTROLLERS, Controller, make_controller
from labkit.specdec.draft import Drafter
from labkit.specdec.drafters import make_drafter
from labkit.specdec.policies import POLICIES, make_policy

NO_WEIGHTS = ("ngram", "ngram-graph", "layerskip", "truncated")  # drafters a request may ask for by name


@dataclass
class SpecDefaults:
    """The server's speculation: --drafter (None: plain decoding), --k, --controller, --policy."""

    drafter: str | None = None
    k: int = 4
    controller: str = "auto"  # cost-aware on a CPU, fixed K elsewhere (controllers.AUTO_CONTROLLER)
    policy: str = "default"


@dataclass
class Job:
    request: ServeRequest
    prompt_ids: list[int]
    loop: asyncio.AbstractEventLoop
    deadline: float | None  # host clock (time.monotonic) after which the job stops
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)

    def emit(self, kind: str, payload: Any) -> None:
        """Hand an event to the server's loop ("tokens", "done" or "error"), from the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is gone (server shutting down)
            self.cancelled.set()


def queue_full(max_queue: int) -> APIError:
    """The 429 a worker answers when max_queue requests already wait."""
    return APIError(429, f"the server's queue is full ({max_queue} requests waiting); try again later", kind="rate_limit_error", code="queue_full")


class Scheduler(Protocol):
    """What the server needs of a worker: FifoWorker here, BatchWorker (serve/batch_worker.py)."""

    @property
    def depth(self) -> int: ...  # requests waiting (not running)

    def check(self, r: ServeRequest) -> None: ...  # refuse a request's settings (APIError) before it queues

    def submit(self, job: Job) -> None: ...

    def close(self) -> None: ...


class FifoWorker:
    """First in, first out, one request at a time on a thread that owns the engine."""

    def __init__(self, engine: Engine, spec: SpecDefaults, max_queue: int, metrics: ServeMetrics, default_drafter: Drafter | None = None) -> None:
        self.engine, self.spec, self.max_queue, self.metrics = engine, spec, max_queue, metrics
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._drafters: dict[str, Drafter] = {spec.drafter: default_drafter} if spec.drafter and default_drafter else {}
        self._controllers: dict[tuple[str, int], Controller] = {}  # kept across requests: adaptive ones learn the device
        self._waiting = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="labkit-engine", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._waiting

    def check(self, r: ServeRequest) -> None:
        """A request's speculation settings, refused before it queues (400 naming the field)."""
        kind = r.drafter if r.drafter is not None else self.spec.drafter
        if r.drafter is not None and r.drafter not in (*NO_WEIGHTS, "none", self.spec.drafter):
            known = [d for d in DRAFTERS if d in NO_WEIGHTS or d == self.spec.drafter]
            raise APIError(400, f"unknown drafter {r.drafter!r}: use none or {', '.join(known)}", "drafter")
        if r.k is not None and not valid_k(r.k):
            raise APIError(400, f"k must be a whole number from 1 to {MAX_K}, got {r.k}", "k")
        if r.controller is not None and r.controller not in CONTROLLERS:
            raise APIError(400, f"unknown controller {r.controller!r}: use {', '.join(CONTROLLERS)}", "controller")
        if r.policy is not None and r.policy not in ("default", *POLICIES):
            raise APIError(400, f"unknown policy {r.policy!r}: use default, {', '.join(POLICIES)}", "policy")
        if kind and kind != "none":
            try:
                self._policy(r)
            except LabkitError as err:
                raise APIError(400, str(err), "policy") from None

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._waiting >= self.max_queue:
                raise queue_full(self.max_queue)
            self._waiting += 1
        self.metrics.queue_depth.set(self._waiting)
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _policy(self, r: ServeRequest) -> Any:
        name = r.policy or self.spec.policy
        return None if name == "default" else make_policy(name, r.config)

    def _speculation(self, r: ServeRequest) -> Speculation | None:
        kind = r.drafter if r.drafter is not None else self.spec.drafter
        if not kind or kind == "none":
            return None
        if kind not in self._drafters:
            self._drafters[kind] = make_drafter(kind, self.engine)
        k = r.k or self.spec.k
        name = r.controller or self.spec.controller
        key = (name, k)
        if key not in self._controllers:
            self._controllers[key] = make_controller(name, k, self.engine.device.type)
        return Speculation(self._drafters[kind], k, self._policy(r), self._controllers[key])

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
            self.metrics.queue_depth.set(self._waiting)
            if job.cancelled.is_set():
                continue
            self.metrics.running.set(1)
            try:
                self._serve(job)
            finally:
                self.metrics.running.set(0)

    def _serve(self, job: Job) -> None:
        last = [job.arrived]

        def on_tokens(new: list[int]) -> bool:
            now = time.perf_counter()
            if last[0] == job.arrived:
                self.metrics.ttft.observe(now - job.arrived)
            elif new:
                for _ in new:
                    self.metrics.itl.observe((now - last[0]) / len(new))
            last[0] = now
            job.emit("tokens", new)
            return not job.cancelled.is_set() and (job.deadline is None or time.monotonic() < job.deadline)

        try:
            spec = self._speculation(job.request)
            result = generate(self.engine, job.prompt_ids, job.request.config, spec, on_tokens=on_tokens)
        except LabkitError as err:
            job.emit("error", APIError(400, str(err)))
            self.metrics.requests.labels(status="error").inc()
            return
        except Exception as err:  # noqa: BLE001 - the worker must survive anything one request does
            job.emit("error", APIError(500, f"{type(err).__name__}: {err}", kind="server_error"))
            self.metrics.requests.labels(status="error").inc()
            return
        timed_out = result.stats.stop_reason == "cancelled" and not job.cancelled.is_set()
        self.metrics.observe_result(result, time.perf_counter() - job.arrived, "timeout" if timed_out else result.stats.stop_reason)
        job.emit("done", (result, timed_out))


def finish_reason(result: GenerationResult, timed_out: bool) -> str | None:
    """OpenAI's finish_reason for a finished request (protocol.FINISH maps labkit's stop reasons)."""
    return "length" if timed_out else FINISH.get(result.stats.stop_reason)
