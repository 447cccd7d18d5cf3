"""`labkit bench serve`: a load generator for any OpenAI-compatible server (labkit's, vLLM's,
SGLang's, llama.cpp's), or for labkit's engine in-process (the dual mode: the same worker the
server runs, without HTTP).

Requests stream (chat completions, usage included); prompts arrive as a Poisson process at
`request_rate` per second (inf: all at once), at most `concurrency` in flight. Per request it
notes the time to the first token, the time of every later chunk and the tokens out; the report
(named after vLLM's benchmark_serving) gives TTFT, TPOT (time per output token after the first),
ITL (between chunks) and end-to-end latency at mean/p50/p90/p99, request throughput and output
tok/s, and, for a labkit server, acceptance and tau from /metrics over the run.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labkit.bench.common import finish_log, run_params, start_log
from labkit.bench.results import provenance
from labkit.config import EngineConfig, GenerationConfig, resolve_device
from labkit.errors import LabkitError

PERCENTILES = (50, 90, 99)
SPEC_COUNTERS = ("num_draft_tokens", "num_accepted_tokens", "num_target_steps", "num_emitted_tokens")


@dataclass
class ServeBenchConfig:
    backend: str = "local"  # "http": any OpenAI-compatible server at base_url; "local": labkit's engine in-process
    base_url: str = "http://127.0.0.1:8000"
    model: str = "default"  # the model name sent (http), or the model loaded (local)
    engine: EngineConfig = field(default_factory=EngineConfig)  # local backend only
    dataset: str = "suite"  # "suite" (labkit's prompts) or a .jsonl file of {"prompt": ...} or {"messages": [...]}
    num_prompts: int = 16
    concurrency: int = 1  # requests in flight at most
    request_rate: float = math.inf  # Poisson arrivals per second; inf: all at once
    max_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    extra_body: dict[str, Any] = field(default_factory=dict)  # e.g. {"drafter": "ngram", "k": 3} for a labkit server
    output_dir: str | None = "results"
    progress: bool = True

    def validate(self) -> None:
        if self.backend not in ("http", "local"):
            raise LabkitError(f"unknown backend {self.backend!r}: use http or local")
        if self.num_prompts < 1 or self.concurrency < 1 or self.max_tokens < 1:
            raise LabkitError("--num-prompts, --concurrency and --max-tokens must each be at least 1")
        if not self.request_rate > 0 or math.isnan(self.request_rate):
            raise LabkitError(f"--request-rate must be a positive number or inf, got {self.request_rate}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise LabkitError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.backend == "http" and not self.base_url.startswith(("http://", "https://")):
            raise LabkitError(f"--base-url must start with http:// or https://, got {self.base_url!r}")
        if self.dataset != "suite" and not Path(self.dataset).is_file():
            raise LabkitError(f"--dataset must be suite or a .jsonl file, and {self.dataset!r} is not a file")


@dataclass
class RequestOutput:
    prompt_id: str
    success: bool = False
    error: str = ""
    text: str = ""
    output_tokens: int = 0
    prompt_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)  # between chunks after the first
    chunks: int = 0
    started: float = field(default_factory=time.perf_counter)
    last: float = 0.0

    def arrive(self, text: str) -> None:
        """A chunk of text: the first sets the time to first token, later ones an inter-token gap."""
        if not text:
            return
        now = time.perf_counter()
        if self.chunks == 0:
            self.ttft_s = now - self.started
        else:
            self.itl_s.append(now - self.last)
        self.last, self.chunks = now, self.chunks + 1
        self.text += text


def load_dataset(cfg: ServeBenchConfig) -> list[tuple[str, list[dict[str, str]]]]:
    """(id, chat messages) for num_prompts requests, the dataset repeated as needed."""
    items: list[tuple[str, Any]] = []
    if cfg.dataset == "suite":
        from labkit.prompts import load_suite

        items = [(p.id, [{"role": "user", "content": p.content}]) for p in load_suite(None, None)]
    else:
        for i, line in enumerate(Path(cfg.dataset).read_text().splitlines()):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise LabkitError(f"{cfg.dataset}: line {i + 1} is not JSON") from None
            if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
                items.append((str(obj.get("id", i)), obj["messages"]))
            elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
                items.append((str(obj.get("id", i)), [{"role": "user", "content": obj["prompt"]}]))
            else:
                raise LabkitError(f"{cfg.dataset}: line {i + 1} needs a string 'prompt' or a list of 'messages'")
        if not items:
            raise LabkitError(f"{cfg.dataset} holds no prompts")
    return [items[i % len(items)] for i in range(cfg.num_prompts)]


async def _arrivals(n: int, rate: float, seed: int) -> Any:
    rng = random.Random(seed)
    for i in range(n):
        yield i
        if math.isfinite(rate):
            await asyncio.sleep(rng.expovariate(rate))


async def _http_request(client: Any, cfg: ServeBenchConfig, pid: str, messages: list[dict[str, str]]) -> RequestOutput:
    out = RequestOutput(pid)
    body = {"model": cfg.model, "messages": messages, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "stream": True,
            "stream_options": {"include_usage": True}, **cfg.extra_body}
    try:
        async with client.stream("POST", cfg.base_url.rstrip("/") + "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                out.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return out
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    out.error = str(obj["error"].get("message", obj["error"]))
                    return out
                if obj.get("usage"):
                    out.output_tokens, out.prompt_tokens = obj["usage"]["completion_tokens"], obj["usage"]["prompt_tokens"]
                out.arrive("".join((c.get("delta") or {}).get("content") or c.get("text") or "" for c in obj.get("choices", [])))
    except Exception as err:  # noqa: BLE001 - a failed request is a result, not a crash
        out.error = f"{type(err).__name__}: {err}"
        return out
    out.latency_s = time.perf_counter() - out.started
    out.output_tokens = out.output_tokens or out.chunks
    out.success = True
    return out


class _Local:
    """labkit's engine in-process, behind the server's own worker: the same queue and steps, no HTTP."""

    def __init__(self, cfg: ServeBenchConfig) -> None:
        from labkit.engine_build import from_config
        from labkit.generate import warm_up
        from labkit.models.loading import load_model
        from labkit.serve.metrics import ServeMetrics
        from labkit.serve.worker import FifoWorker, SpecDefaults

        self.loaded = load_model(cfg.model)
        self.engine = from_config(self.loaded, cfg.engine)
        warm_up(self.engine, int(cfg.extra_body.get("k", 0)) if cfg.extra_body.get("drafter") else 0)
        self.worker = FifoWorker(self.engine, SpecDefaults(), cfg.num_prompts + 1, ServeMetrics())
        self.cfg = cfg

    async def request(self, pid: str, messages: list[dict[str, str]]) -> RequestOutput:
        from labkit.generate import encode_prompt
        from labkit.serve.detok import IncrementalDetokenizer
        from labkit.serve.protocol import ServeRequest
        from labkit.serve.worker import Job

        cfg, out = self.cfg, RequestOutput(pid)
        ids = encode_prompt(self.loaded.tokenizer, messages)
        gen = GenerationConfig(max_new_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=cfg.seed)
        eb = cfg.extra_body
        r = ServeRequest("chat", messages, gen, True, True, eb.get("drafter"), eb.get("k"), eb.get("controller"), eb.get("policy"), pid, 0)
        self.worker.check(r)
        job = Job(r, ids, asyncio.get_running_loop(), None)
        self.worker.submit(job)
        detok = IncrementalDetokenizer(self.loaded.tokenizer)
        while True:
            kind, payload = await job.events.get()
            if kind == "error":
                out.error = payload.message
                return out
            if kind == "done":
                break
            out.arrive(detok.push(payload))
        out.arrive(detok.flush())
        result, _ = payload
        out.latency_s, out.output_tokens, out.prompt_tokens, out.success = time.perf_counter() - out.started, len(result.tokens), len(ids), True
        return out

    def close(self) -> None:
        self.worker.close()


def _stats(values: list[float], name: str) -> dict[str, float]:
    """mean, std and percentiles in ms (vLLM's field names: mean_ttft_ms, p99_ttft_ms, ...)."""
    ms = sorted(v * 1e3 for v in values) or [float("nan")]
    out = {f"mean_{name}_ms": statistics.fmean(ms), f"std_{name}_ms": statistics.pstdev(ms) if len(ms) > 1 else 0.0,
           f"median_{name}_ms": statistics.median(ms)}
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = ms[min(len(ms) - 1, max(0, math.ceil(p / 100 * len(ms)) - 1))]
    return out


def summarize(outputs: list[RequestOutput], duration_s: float) -> dict[str, Any]:
    ok = [o for o in outputs if o.success]
    out_tokens = sum(o.output_tokens for o in ok)
    tpot = [(o.latency_s - o.ttft_s) / (o.output_tokens - 1) for o in ok if o.output_tokens > 1]
    return {
        "completed": len(ok), "failed": len(outputs) - len(ok), "duration_s": duration_s,
        "total_input_tokens": sum(o.prompt_tokens for o in ok), "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s, "output_throughput": out_tokens / duration_s,
        **_stats([o.ttft_s for o in ok], "ttft"), **_stats(tpot, "tpot"),
        **_stats([x for o in ok for x in o.itl_s], "itl"), **_stats([o.latency_s for o in ok], "e2el"),
    }


def read_spec_counters(text: str) -> dict[str, float]:
    """labkit's speculation counters from Prometheus text (empty for other servers)."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        for name in SPEC_COUNTERS:
            if line.startswith(f"labkit_spec_decode_{name}_total "):
                found[name] = float(line.split()[-1])
    return found


def spec_over_run(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in SPEC_COUNTERS}
    out: dict[str, float] = {}
    if d["num_draft_tokens"] > 0:
        out["acceptance_rate"] = d["num_accepted_tokens"] / d["num_draft_tokens"]
    if d["num_target_steps"] > 0:
        out["tau"] = d["num_emitted_tokens"] / d["num_target_steps"]
    return out


async def _run(cfg: ServeBenchConfig, prompts: list[tuple[str, list[dict[str, str]]]], send: Any) -> tuple[list[RequestOutput], float]:
    from tqdm.auto import tqdm

    limit = asyncio.Semaphore(cfg.concurrency)
    bar = tqdm(total=len(prompts), desc="bench serve", disable=not cfg.progress)

    async def one(i: int) -> RequestOutput:
        async with limit:
            out = await send(*prompts[i])
        bar.update()
        return out

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(one(i)) async for i in _arrivals(len(prompts), cfg.request_rate, cfg.seed)]
    outputs = list(await asyncio.gather(*tasks))
    bar.close()
    return outputs, time.perf_counter() - t0


async def _bench_http(cfg: ServeBenchConfig, prompts: list[tuple[str, list[dict[str, str]]]]) -> tuple[list[RequestOutput], float, dict[str, float]]:
    import httpx

    limits = httpx.Limits(max_connections=cfg.concurrency + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), limits=limits) as client:
        try:
            before = read_spec_counters((await client.get(cfg.base_url.rstrip("/") + "/metrics")).text)
        except httpx.HTTPError as err:
            raise LabkitError(f"no server answers at {cfg.base_url} ({type(err).__name__}); start one with `python -m labkit serve`") from None
        outputs, duration = await _run(cfg, prompts, lambda pid, messages: _http_request(client, cfg, pid, messages))
        after = read_spec_counters((await client.get(cfg.base_url.rstrip("/") + "/metrics")).text)
    return outputs, duration, spec_over_run(before, after)


def run_async(coro: Any) -> Any:
    """asyncio.run, also where a loop already runs (a Jupyter kernel): then on a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def run_serve_bench(cfg: ServeBenchConfig) -> dict[str, Any]:
    cfg.validate()
    prompts = load_dataset(cfg)
    device = resolve_device(cfg.engine.device if cfg.backend == "local" else "cpu")
    log = start_log(cfg.output_dir, f"serve-{cfg.backend}")  # before anything is measured
    spec: dict[str, float] = {}
    if cfg.backend == "http":
        outputs, duration, spec = run_async(_bench_http(cfg, prompts))
    else:
        local = _Local(cfg)
        try:
            outputs, duration = run_async(_run(cfg, prompts, local.request))
            spec = spec_over_run({}, local.worker.metrics.spec_totals())
        finally:
            local.close()
    rows = [{"prompt_id": o.prompt_id, "success": o.success, "error": o.error, "prompt_tokens": o.prompt_tokens, "output_tokens": o.output_tokens,
             "ttft_ms": o.ttft_s * 1e3, "latency_ms": o.latency_s * 1e3, "mean_itl_ms": statistics.fmean(o.itl_s) * 1e3 if o.itl_s else float("nan")}
            for o in outputs]
    payload: dict[str, Any] = {"benchmark": "serve", **provenance(device, run_params(cfg)), "summary": {**summarize(outputs, duration), **spec}}
    finish_log(log, payload, rows)
    payload["outputs"] = outputs
    return payload


def serve_report(payload: dict[str, Any]) -> list[str]:
    """The lines `labkit bench serve` prints (vLLM's layout)."""
    s, p = payload["summary"], payload["parameters"]
    out = [f"{'=' * 16} Serving Benchmark Result ({p['backend']}, concurrency {p['concurrency']}, rate {p['request_rate']}) {'=' * 16}",
           f"{'Successful requests:':<40}{s['completed']:<10}", f"{'Failed requests:':<40}{s['failed']:<10}",
           f"{'Benchmark duration (s):':<40}{s['duration_s']:<10.2f}", f"{'Total input tokens:':<40}{s['total_input_tokens']:<10}",
           f"{'Total generated tokens:':<40}{s['total_output_tokens']:<10}", f"{'Request throughput (req/s):':<40}{s['request_throughput']:<10.2f}",
           f"{'Output token throughput (tok/s):':<40}{s['output_throughput']:<10.2f}"]
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"), ("itl", "Inter-token Latency"),
                        ("e2el", "End-to-end Latency")):
        out.append(f"{'-' * 16}{title}{'-' * 16}")
        out += [f"{'Mean ' + name.upper() + ' (ms):':<40}{s[f'mean_{name}_ms']:<10.2f}"]
        out += [f"{f'P{q} ' + name.upper() + ' (ms):':<40}{s[f'p{q}_{name}_ms']:<10.2f}" for q in PERCENTILES]
    if "acceptance_rate" in s:
        out.append(f"{'Acceptance rate:':<40}{s['acceptance_rate']:<10.2%}")
    if "tau" in s:
        out.append(f"{'Tokens per target step (tau):':<40}{s['tau']:<10.2f}")
    return out + [f"wrote {f}" for f in payload.get("files", [])]


def free_port() -> int:
    """A TCP port nothing listens on now (for a server this process starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_server(url: str, proc: Any = None, timeout_s: float = 300.0) -> None:
    """Until an OpenAI-compatible server at `url` lists its models (labkit's, llama.cpp's, vLLM's);
    a LabkitError if its process (a subprocess.Popen) exits first or the time runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise LabkitError(f"the server for {url} exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise LabkitError(f"no server came up at {url} within {timeout_s:g} s")
