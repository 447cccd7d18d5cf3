"""The FastAPI app of `labkit serve`: OpenAI's chat and text completions (streamed with
sse-starlette), the model list, health, and Prometheus metrics, over one engine that the worker
owns. Errors come back as OpenAI-style bodies with a 4xx status, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette.sse import EventSourceResponse

from labkit.config import EngineConfig
from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.generate import GenerationResult, check_prompt, encode_prompt
from labkit.graphs import GRAPH_HEADROOM
from labkit.serve.batch_worker import BatchWorker
from labkit.serve.detok import IncrementalDetokenizer
from labkit.serve.metrics import ServeMetrics
from labkit.serve.protocol import APIError, ChatRequest, CompletionRequest, chunk, response_body, to_serve_request, usage_chunk
from labkit.serve.worker import FifoWorker, Job, Scheduler, SpecDefaults, finish_reason
from labkit.specdec.draft import Drafter
from labkit.specdec.eagle_drafter import EagleDrafter


@dataclass
class ServeConfig:
    """`labkit serve`'s options beside the engine's."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str = "default"  # what /v1/models lists and requests name ("default" and the model's own name also answer)
    max_queue: int = 64  # requests waiting past this get 429
    request_timeout_s: float | None = 600.0  # a request still running after this stops (504); None: no limit
    max_tokens_default: int = 256  # when a request names no max_tokens
    max_body_bytes: int = 1 << 20  # a larger request body gets 413
    spec: SpecDefaults = field(default_factory=SpecDefaults)
    batch: int = 0  # slots of continuous batching (serve/batch_worker.py); 0: one request at a time (FifoWorker)
    batch_slot_len: int = 2048  # positions per slot


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    first = err.errors()[0] if err.errors() else {}
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    return f"{param or 'body'}: {first.get('msg', 'invalid')}", param


class _Server:
    """What the endpoints share: the engine, the tokenizer, the worker, the metrics."""

    def __init__(self, engine: Engine, tokenizer: Any, names: tuple[str, ...], cfg: ServeConfig, drafter: Drafter | None) -> None:
        self.engine, self.tokenizer, self.names, self.cfg = engine, tokenizer, names, cfg
        self.metrics = ServeMetrics()
        self.worker: Scheduler
        if cfg.batch:
            slot_len = min(cfg.batch_slot_len, engine.max_seq_len - GRAPH_HEADROOM)
            head = drafter.head if isinstance(drafter, EagleDrafter) else None  # the EAGLE head, for every row's chains
            self.worker = BatchWorker(engine, cfg.spec, cfg.max_queue, self.metrics, cfg.batch, slot_len, head)
        else:
            self.worker = FifoWorker(engine, cfg.spec, cfg.max_queue, self.metrics, drafter)

    def admit(self, body: ChatRequest | CompletionRequest) -> Job:
        """Check a request and queue it (every refusal is an APIError before it queues)."""
        if body.model is not None and body.model not in self.names:
            raise APIError(404, f"model {body.model!r} is not served here: use {self.names[0]}", "model", code="model_not_found")
        r = to_serve_request(body, self.cfg.max_tokens_default)
        try:
            ids = encode_prompt(self.tokenizer, r.prompt, chat=None if r.kind == "chat" else False)  # chat: the template where the model has one
            check_prompt(ids, self.engine.context_len, self.engine.args.vocab_size)
        except LabkitError as err:
            raise APIError(400, str(err), "messages" if r.kind == "chat" else "prompt") from None
        room = self.engine.max_seq_len - len(ids)
        if r.config.max_new_tokens > room:
            raise APIError(400, f"max_tokens {r.config.max_new_tokens} and the prompt's {len(ids)} tokens exceed the context of "
                                f"{self.engine.max_seq_len}: ask for at most {max(room, 0)}", "max_tokens")
        self.worker.check(r)
        timeout = self.cfg.request_timeout_s
        job = Job(r, ids, asyncio.get_running_loop(), time.monotonic() + timeout if timeout else None)
        self.worker.submit(job)
        return job

    def text(self, result: GenerationResult) -> str:
        return str(self.tokenizer.decode(result.tokens, skip_special_tokens=True))

    def timeout_error(self) -> APIError:
        return APIError(504, f"the request ran past the server's timeout of {self.cfg.request_timeout_s:g} s", kind="timeout_error", code="timeout")

    async def collect(self, job: Job, request: Request) -> Response:
        """A whole answer; a client that goes away cancels its request at the next step."""
        r = job.request
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(job.events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                if kind == "error":
                    return _error(payload)
                if kind == "done":
                    result, timed_out = payload
                    if timed_out:
                        return _error(self.timeout_error())
                    body = response_body(r, self.names[0], self.text(result), finish_reason(result, False), len(job.prompt_ids), len(result.tokens))
                    return JSONResponse(body)
        finally:
            job.cancelled.set()

    async def stream(self, job: Job) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's format: text as tokens are accepted, the finish reason,
        usage when asked, then [DONE]. A disconnect closes this generator and cancels the request."""
        r, name = job.request, self.names[0]
        detok = IncrementalDetokenizer(self.tokenizer)
        try:
            if r.kind == "chat":
                yield _json(chunk(r, name, "", first=True))
            while True:
                kind, payload = await job.events.get()
                if kind == "tokens":
                    text = detok.push(payload)
                    if text:
                        yield _json(chunk(r, name, text))
                    continue
                if kind == "error":
                    yield _json(payload.body())
                    break
                result, timed_out = payload
                if timed_out:
                    yield _json(self.timeout_error().body())
                    break
                tail = detok.flush()
                if tail:
                    yield _json(chunk(r, name, tail))
                yield _json(chunk(r, name, None, finish_reason(result, False)))
                if r.include_usage:
                    yield _json(usage_chunk(r, name, len(job.prompt_ids), len(result.tokens)))
                break
            yield "[DONE]"
        finally:
            job.cancelled.set()

    async def answer(self, body: ChatRequest | CompletionRequest, request: Request) -> Response:
        job = self.admit(body)
        if job.request.stream:
            return EventSourceResponse(self.stream(job), sep="\n", ping=15)
        return await self.collect(job, request)


def create_app(engine: Engine, tokenizer: Any, cfg: ServeConfig, model_names: tuple[str, ...] = (), drafter: Drafter | None = None) -> FastAPI:
    """The app over one engine. model_names: the names requests may use (the first is what the server reports)."""
    names = tuple(dict.fromkeys((cfg.served_model_name, *model_names, "default")))
    server = _Server(engine, tokenizer, names, cfg, drafter)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        server.worker.close()

    app = FastAPI(title="labkit", lifespan=lifespan)
    app.state.server = server

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Response:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > cfg.max_body_bytes:
            return _error(APIError(413, f"the request body has {size} bytes; the limit is {cfg.max_body_bytes}"))
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return _error(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(err)
        return _error(APIError(400, message, param))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "waiting": server.worker.depth}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": names[0], "object": "model", "created": 0, "owned_by": "labkit", "max_model_len": engine.max_seq_len}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        return await server.answer(body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await server.answer(body, request)

    return app


def build_app(model: str, engine_cfg: EngineConfig, cfg: ServeConfig, draft_model: str | None = None, heads: str | None = None,
              layers: int | None = None) -> tuple[FastAPI, str]:
    """Load the model, build its engine and the default drafter, capture the step shapes, and
    return the app with a line that says what it serves."""
    from labkit.engine_build import from_config
    from labkit.generate import warm_up
    from labkit.models.loading import load_model
    from labkit.specdec.drafters import build_drafter, check_drafter_options

    if cfg.spec.drafter:
        check_drafter_options([cfg.spec.drafter], draft_model, heads)
    loaded = load_model(model)
    engine = from_config(loaded, engine_cfg)
    drafter = None
    if cfg.spec.drafter:
        drafter = build_drafter(cfg.spec.drafter, engine, layers=layers, draft_model=draft_model, target_tokenizer=loaded.tokenizer, heads_path=heads)
    warm_up(engine, cfg.spec.k if drafter else 0, drafter=drafter)
    what = f"{loaded.name} on {engine.device} ({engine.weights} weights, {engine.layer_kernels} layers)"
    return create_app(engine, loaded.tokenizer, cfg, (loaded.name, model), drafter), what


class BackgroundServer:
    """An app served by uvicorn on a thread of this process (a notebook, a script): `url` once
    started, `stop()` to shut it down. Port 0 takes a free port."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import threading

        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="labkit-serve", daemon=True)
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                break
            time.sleep(0.05)
        else:
            raise LabkitError("the server did not start")
        bound = self.server.servers[0].sockets[0].getsockname()
        self.url = f"http://{host}:{bound[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
