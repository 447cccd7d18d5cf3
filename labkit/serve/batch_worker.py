"""The batching worker (`labkit serve --batch N`): continuous batching behind the server's
Scheduler interface (submit, depth, close), in place of the FIFO worker.

One thread owns the engine and a ContinuousBatcher over N slots. Between batched steps it takes
the requests that arrived, cancels the ones whose client left or whose time ran out, and hands
each running request the tokens its step accepted. Requests decode greedily; the server's
--drafter ngram and --k, when given, draft for every row (with --controller cost, K per step
from 0..K by measured throughput: batch/controller.py); --drafter ngram-graph drafts, verifies and
accepts on the device in chunks of steps (batch/lookup.py; K per chunk from 0, K/2 and K), so a
client's stream gets its tokens a chunk at a time; --drafter eagle (with --heads) runs the same
chunks at K, each row's EAGLE chain drafted inside the step before's verify (batch/eagle.py), and
--drafter eagle-mix those chains or prompt lookup's copies (eagle-mix's rule). A request that asks for sampling or
for its own speculation settings is refused (400) before it queues.
"""

from __future__ import annotations

import queue
import threading
import time

from labkit.batch.controller import BatchKController
from labkit.batch.eagle import device_eagles
from labkit.batch.engine import BatchConfig, BatchEngine
from labkit.batch.lookup import device_lookups
from labkit.batch.scheduler import BatchRequest, ContinuousBatcher
from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.generate import GenerationResult
from labkit.metrics.stats import GenerationStats
from labkit.serve.metrics import ServeMetrics
from labkit.serve.protocol import APIError, ServeRequest
from labkit.serve.worker import Job, SpecDefaults, queue_full
from labkit.specdec.drafters import NgramDrafter
from labkit.specdec.eagle import EagleHead
from labkit.specdec.eagle_mix import MIX_MIN_N


class BatchWorker:
    def __init__(self, engine: Engine, spec: SpecDefaults, max_queue: int, metrics: ServeMetrics, slots: int, slot_len: int,
                 head: EagleHead | None = None) -> None:
        """head: the EAGLE head --drafter eagle drafts with."""
        eagle = spec.drafter in ("eagle", "eagle-mix")
        if spec.drafter not in (None, "none", "ngram", "ngram-graph", "eagle", "eagle-mix") or spec.controller not in ("fixed", "cost", "auto") \
                or spec.policy != "default" or (eagle and head is None):
            raise LabkitError("the batching server drafts greedily by prompt lookup (--drafter ngram, ngram-graph or none) or EAGLE chains "
                              "(--drafter eagle or eagle-mix --heads FOLDER), at a fixed K or --controller cost or auto (K per step from 0..K by measured throughput)")
        k = spec.k if spec.drafter in ("ngram", "ngram-graph", "eagle", "eagle-mix") else 0
        device = spec.drafter == "ngram-graph" or eagle
        graphs = bool(engine.cuda_graph) and engine.layer_kernels == "triton"
        batch = BatchEngine(engine, BatchConfig(slots, slot_len, cuda_graph=graphs))
        # by throughput, K 0 included (EAGLE: K or plain, BatchKController.for_eagle)
        controller = (BatchKController.for_eagle(k) if eagle else BatchKController(k)) if k and spec.controller != "fixed" else None
        ks = controller.candidates if controller else [k]
        copy_after = MIX_MIN_N if spec.drafter == "eagle-mix" else 0
        lookups = (device_eagles(batch, head, ks, copy_after) if head is not None else device_lookups(batch, ks)) if device else []  # each drafting K's device steps
        self.batcher = ContinuousBatcher(batch, (lambda: NgramDrafter(3, 1)) if k else None, k, controller, lookup=lookups)
        self.drafter = (spec.drafter or "") if k else ""
        self.batcher.batch.capture_graphs(list(range(1, k + 2)))
        self.max_queue, self.metrics = max_queue, metrics
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self._jobs: dict[int, tuple[Job, BatchRequest]] = {}  # id(request) -> its job
        self._sent: dict[int, int] = {}  # id(request) -> tokens already handed to the client
        self._waiting = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="labkit-batch", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._waiting

    def check(self, r: ServeRequest) -> None:
        if r.config.temperature != 0 and self.batcher.k:
            raise APIError(400, "this server drafts for every request, and drafting is greedy: temperature must be 0 (start it with --drafter none to batch sampled requests)", "temperature")
        for name, value in (("drafter", r.drafter), ("k", r.k), ("controller", r.controller), ("policy", r.policy)):
            if value is not None:
                raise APIError(400, f"this batching server takes no per-request {name}: it drafts as it was started", name)

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._waiting >= self.max_queue:
                raise queue_full(self.max_queue)
            need = len(job.prompt_ids) + job.request.config.max_new_tokens + self.batcher.k
            if need > self.batcher.batch.cfg.max_seq_len:
                raise APIError(400, f"the prompt and max_tokens take {need} positions, past a batch slot's "
                                    f"{self.batcher.batch.cfg.max_seq_len} (--batch-slot-len)", "max_tokens")
            self._waiting += 1
        self.metrics.queue_depth.set(self._waiting)
        self._inbox.put(job)

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=30)

    def _take_arrivals(self) -> bool:
        """Queue what arrived (waiting for one when idle); False when the server closes."""
        block = not self.batcher.busy
        while True:
            try:
                job = self._inbox.get(block=block)
            except queue.Empty:
                return True
            if job is None:
                return False
            block = False
            try:
                request = self.batcher.submit(job.prompt_ids, job.request.config)
            except LabkitError as err:
                job.emit("error", APIError(400, str(err)))
                continue
            self._jobs[id(request)] = (job, request)
            self._sent[id(request)] = 0

    def _run(self) -> None:
        while self._take_arrivals():
            for job, request in list(self._jobs.values()):
                if job.cancelled.is_set() or (job.deadline is not None and time.monotonic() >= job.deadline):
                    self.batcher.cancel(request)
            try:
                self.batcher.step()
            except Exception as err:  # noqa: BLE001 - the worker must survive anything a step does
                for job, request in self._jobs.values():
                    job.emit("error", APIError(500, f"{type(err).__name__}: {err}", kind="server_error"))
                    self.batcher.cancel(request)
                self._jobs.clear()
            with self._lock:
                self._waiting = len(self.batcher.waiting) + self._inbox.qsize()
            self.metrics.queue_depth.set(self._waiting)
            self.metrics.running.set(len(self.batcher.rows))
            self._hand_out()

    def _hand_out(self) -> None:
        for key, (job, request) in list(self._jobs.items()):
            sent = self._sent[key]
            new = request.tokens[sent:]
            if new:
                now = time.perf_counter()
                if sent == 0:
                    self.metrics.ttft.observe(request.token_times[0] - job.arrived)
                else:
                    for _ in new:
                        self.metrics.itl.observe((now - request.token_times[sent - 1]) / len(new))
                job.emit("tokens", new)
                self._sent[key] = len(request.tokens)
            if request.finished:
                timed_out = request.stop_reason == "cancelled" and not job.cancelled.is_set()
                result = to_result(request, self.drafter)
                self.metrics.observe_result(result, time.perf_counter() - job.arrived, "timeout" if timed_out else request.stop_reason)
                job.emit("done", (result, timed_out))
                del self._jobs[key], self._sent[key]


def to_result(request: BatchRequest, drafter: str = "") -> GenerationResult:
    """A finished batched request as `generate` would have returned it."""
    times = request.token_times
    gaps = [1000 * (b - a) for a, b in zip(times, times[1:], strict=False)]
    stats = GenerationStats(
        prompt_tokens=len(request.prompt_ids), new_tokens=len(request.tokens), stop_reason=request.stop_reason,
        ttft_s=(times[0] - request.submitted) if times else 0.0, total_s=(times[-1] - request.submitted) if times else 0.0,
        token_latencies_ms=gaps, drafter=drafter if request.draft_tokens else "", draft_tokens=request.draft_tokens,
        accepted_lengths=request.accepted_lengths,
    )
    return GenerationResult(request.prompt_ids, list(request.tokens), stats)
