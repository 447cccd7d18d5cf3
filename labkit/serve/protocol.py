"""OpenAI's wire format for /v1/chat/completions and /v1/completions: requests checked into a
`ServeRequest`, and the response bodies and stream chunks built from what a request produced.

Speculation is set by the server's defaults; a request may override it with extra body fields
(`drafter`, `k`, `controller`, `policy`), as vLLM takes its own extra fields.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from labkit.config import GenerationConfig

FINISH = {"eos": "stop", "max_new_tokens": "length", "context": "length"}  # labkit's stop reason -> OpenAI's finish_reason


class APIError(Exception):
    """An error the client gets as an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """Fields both endpoints share; unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int = 1
    # labkit's own: speculation for this request (None: the server's default)
    drafter: str | None = None
    k: int | None = None
    controller: str | None = None
    policy: str | None = None
    min_tokens: int = 0


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: str


@dataclass
class ServeRequest:
    """A checked request, as the worker takes it."""

    kind: Literal["chat", "completion"]
    prompt: str | list[dict[str, str]]
    config: GenerationConfig
    stream: bool
    include_usage: bool
    drafter: str | None
    k: int | None
    controller: str | None
    policy: str | None
    id: str
    created: int


def check_sampling(req: _Common) -> None:
    """What OpenAI's API refuses and what labkit cannot do, as 400s naming the field."""
    if not math.isfinite(req.temperature) or req.temperature < 0:
        raise APIError(400, f"temperature must be a finite number >= 0, got {req.temperature}", "temperature")
    if not math.isfinite(req.top_p) or not 0 < req.top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {req.top_p}", "top_p")
    if req.n != 1:
        raise APIError(400, "n must be 1: labkit answers one choice per request", "n")
    if req.stop:
        raise APIError(400, "stop sequences are not supported: labkit stops at the model's end-of-sequence token and max_tokens", "stop")


def to_serve_request(req: ChatRequest | CompletionRequest, default_max_tokens: int) -> ServeRequest:
    check_sampling(req)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:
        max_tokens = default_max_tokens
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    config = GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=min(req.min_tokens, max_tokens), temperature=req.temperature,
                              top_k=req.top_k, top_p=req.top_p, seed=req.seed)
    if isinstance(req, ChatRequest):
        kind: Literal["chat", "completion"] = "chat"
        prompt: str | list[dict[str, str]] = [{"role": m.role, "content": m.content} for m in req.messages]
        prefix = "chatcmpl"
    else:
        kind, prompt, prefix = "completion", req.prompt, "cmpl"
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return ServeRequest(kind, prompt, config, req.stream, include_usage, req.drafter, req.k, req.controller, req.policy,
                        f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time()))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def response_body(r: ServeRequest, model: str, text: str, finish: str | None, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    if r.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice, obj = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}, "text_completion"
    return {"id": r.id, "object": obj, "created": r.created, "model": model, "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}


def chunk(r: ServeRequest, model: str, text: str | None, finish: str | None = None, first: bool = False) -> dict[str, Any]:
    """One stream chunk: new text (the first chat chunk also carries the role), or the finish reason."""
    if r.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice, obj = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}, "text_completion"
    return {"id": r.id, "object": obj, "created": r.created, "model": model, "choices": [choice]}


def usage_chunk(r: ServeRequest, model: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    obj = "chat.completion.chunk" if r.kind == "chat" else "text_completion"
    return {"id": r.id, "object": obj, "created": r.created, "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
