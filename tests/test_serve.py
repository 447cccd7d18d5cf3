"""`labkit serve` against a real server (a subprocess on a free port, serving a tiny random Llama
with the embedded model's tokenizer, so that decoding is fast and its text is arbitrary bytes),
and the detokenizer and client it relies on."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from labkit.bench.serve_client import free_port, wait_for_server  # noqa: E402
from labkit.config import GenerationConfig  # noqa: E402
from labkit.engine import Engine  # noqa: E402
from labkit.errors import LabkitError  # noqa: E402
from labkit.generate import Speculation, encode_prompt, generate  # noqa: E402
from labkit.models.loading import load_model  # noqa: E402
from labkit.serve.detok import IncrementalDetokenizer  # noqa: E402
from labkit.specdec.drafters import make_drafter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHAT = [{"role": "user", "content": "Write a short poem about the sea, with an emoji: 🌊."}]


def test_detokenizer_streams_the_whole_text_once(embedded) -> None:
    """Pushed token by token or in random chunks, the pieces join to the full decode: no character
    split (a multi-byte one spans tokens), none repeated, none lost."""
    tok = embedded.tokenizer
    rng = random.Random(0)
    texts = ["naïve café — 東京 🌊🎉 ok", "plain ascii text, with  spaces", "Ünïcödé\n\ttabs 😀😀 x"]
    ids_list = [tok(t, add_special_tokens=False).input_ids for t in texts]
    ids_list.append([rng.randrange(len(tok)) for _ in range(200)])  # arbitrary ids: bytes that need not form characters
    for ids in ids_list:
        for chunked in (False, True):
            detok, out, i = IncrementalDetokenizer(tok), "", 0
            while i < len(ids):
                n = rng.randint(1, 4) if chunked else 1
                piece = detok.push(ids[i : i + n])
                assert "\ufffd" not in piece or not ids[i + n :]  # a half character waits for its other bytes
                out += piece
                i += n
            out += detok.flush()
            assert out == tok.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def server(tiny_folder: Path):
    port = free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "labkit", "serve", "--model", str(tiny_folder), "--device", "cpu", "--dtype", "float32",
                             "--weights", "dense", "--port", str(port), "--max-tokens", "16", "--max-queue", "32", "--threads", "1"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, proc, timeout_s=120)
    except LabkitError:
        proc.kill()
        raise RuntimeError(f"labkit serve did not come up: {proc.stdout.read() if proc.stdout else ''}") from None
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def local(tiny_folder: Path):
    """The same model in-process: what the server must answer, token for token."""
    loaded = load_model(str(tiny_folder))
    return loaded, Engine.from_loaded(loaded, "cpu", "float32", weights="dense")


def _expected(local, messages, max_tokens: int, drafter: str | None = None) -> str:
    loaded, engine = local
    spec = Speculation(make_drafter(drafter, engine), 3) if drafter else None
    tokens = generate(engine, encode_prompt(loaded.tokenizer, messages), GenerationConfig(max_new_tokens=max_tokens), spec).tokens
    return loaded.tokenizer.decode(tokens, skip_special_tokens=True)


def _stream(url: str, body: dict) -> tuple[list[dict], bool]:
    """The data events of a streamed answer, and whether [DONE] ended it."""
    events, done = [], False
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                if line == "data: [DONE]":
                    done = True
                else:
                    events.append(json.loads(line[6:]))
    return events, done


@pytest.mark.parametrize("drafter", [None, "ngram"])
def test_answers_are_in_process_greedy_streamed_or_not(server: str, local, drafter: str | None) -> None:
    extra = {"drafter": drafter, "k": 3} if drafter else {}
    want = _expected(local, CHAT, 16, drafter)
    body = {"model": "default", "messages": CHAT, "max_tokens": 16, **extra}
    whole = httpx.post(server + "/v1/chat/completions", json=body, timeout=60).json()
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"]["content"] == want
    assert whole["usage"]["completion_tokens"] <= 16 and whole["choices"][0]["finish_reason"] in ("stop", "length")
    events, done = _stream(server + "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert done and events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == want and events[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]


def test_text_completions(server: str, local) -> None:
    loaded, engine = local
    ids = encode_prompt(loaded.tokenizer, "Once upon a time", chat=False)
    want = loaded.tokenizer.decode(generate(engine, ids, GenerationConfig(max_new_tokens=8)).tokens, skip_special_tokens=True)
    got = httpx.post(server + "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 8}, timeout=60).json()
    assert got["object"] == "text_completion" and got["choices"][0]["text"] == want
    events, done = _stream(server + "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 8})
    assert done and "".join(e["choices"][0]["text"] for e in events) == want
    models = httpx.get(server + "/v1/models").json()
    assert models["data"][0]["id"] and httpx.get(server + "/health").json()["status"] == "ok"


def _concurrent_answers(url: str, prompts: list, max_tokens: int) -> list[str]:
    """Every prompt at once, half of them streamed: the answers' texts, in order."""

    async def ask(client, i: int) -> str:
        body = {"messages": prompts[i], "max_tokens": max_tokens}
        if i % 2:
            got = ""
            async with client.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        got += json.loads(line[6:])["choices"][0]["delta"].get("content", "")
            return got
        r = await client.post(url + "/v1/chat/completions", json=body)
        return r.json()["choices"][0]["message"]["content"]

    async def main() -> list[str]:
        async with httpx.AsyncClient(timeout=120) as client:
            return list(await asyncio.gather(*(ask(client, i) for i in range(len(prompts)))))

    return asyncio.run(main())


def test_sixteen_concurrent_clients_each_get_their_own_answer(server: str, local) -> None:
    prompts = [[{"role": "user", "content": f"Tell me fact number {i} about rivers."}] for i in range(16)]
    want = [_expected(local, p, 12) for p in prompts]
    assert _concurrent_answers(server, prompts, 12) == want  # none lost, none mixed, every one the in-process answer


@pytest.mark.parametrize("drafter", ["ngram", "ngram-graph", "eagle", "eagle-mix"])
def test_the_batching_server_gives_every_client_its_batch_1_answer(tiny_folder: Path, local, drafter: str, tmp_path: Path) -> None:
    """`labkit serve --batch 3 --drafter ngram` (drafts on the host), `ngram-graph` (chunks of
    device lookup steps), `eagle --heads FOLDER` (chunks whose rows draft EAGLE chains inside each
    verify) or `eagle-mix` (those chains or lookup's copies): continuous batching with drafts in every row; ten clients at once each get in-process
    plain greedy's answer; sampling is refused in one line."""
    heads = []
    if drafter.startswith("eagle"):
        from labkit.specdec.eagle import save_eagle
        from labkit.specdec.heads import fingerprint
        from tests.test_eagle import random_head

        save_eagle(random_head(), tmp_path / "eagle", fingerprint(local[1].model.lm_head.weight), {})
        heads = ["--heads", str(tmp_path / "eagle")]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "labkit", "serve", "--model", str(tiny_folder), "--device", "cpu", "--dtype", "float32",
                             "--weights", "dense", "--port", str(port), "--threads", "1", "--batch", "3", "--drafter", drafter, "--k", "3", "--controller", "cost",
                             "--batch-slot-len", "256", *heads], cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, proc, timeout_s=120)
        prompts = [[{"role": "user", "content": f"Name river number {i} and repeat it twice."}] for i in range(10)]
        assert _concurrent_answers(url, prompts, 14) == [_expected(local, p, 14) for p in prompts]
        bad = httpx.post(url + "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4, "temperature": 0.7}, timeout=60)
        assert bad.status_code == 400 and "greedy" in bad.json()["error"]["message"]
        metrics = httpx.get(url + "/metrics").text
        # every request finished; the random model seldom repeats, so rows seldom draft here:
        # tests/test_batch.py holds drafting rows to plain greedy
        assert _finished(metrics) == 10 and "labkit_requests_total{status=\"max_new_tokens\"} 10.0" in metrics
        if drafter != "ngram":  # device chunks draft K tokens every step (EAGLE's chains, or lookup's K)
            assert float(next(line for line in metrics.splitlines() if line.startswith("labkit_spec_decode_num_draft_tokens_total")).split()[-1]) > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _finished(metrics: str) -> float:
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("labkit_requests_total{"))


def test_a_client_that_leaves_mid_stream_frees_the_server(server: str) -> None:
    """The abandoned request ends (at the next step once the server sees the disconnect, or at its
    end if it got there first): counted as finished, and the next request is served."""
    before = _finished(httpx.get(server + "/metrics").text)
    with httpx.stream("POST", server + "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 200, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"role"' not in line:
                break  # text has come: hang up
    ok = httpx.post(server + "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4}, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None
    assert _finished(httpx.get(server + "/metrics").text) == before + 2


def test_the_batching_server_takes_sampled_requests_unless_it_drafts(local) -> None:
    """Batched rows sample from their own generators (tests/test_batch.py), so a batching server
    without a drafter takes temperature > 0; one that drafts (greedy verification) refuses it."""
    from labkit.serve.batch_worker import BatchWorker
    from labkit.serve.metrics import ServeMetrics
    from labkit.serve.protocol import APIError, ServeRequest
    from labkit.serve.worker import SpecDefaults

    _, engine = local
    sampled = ServeRequest("chat", CHAT, GenerationConfig(max_new_tokens=4, temperature=0.7, seed=1), False, False, None, None, None, None, "s", 0)
    plain = BatchWorker(engine, SpecDefaults(), 4, ServeMetrics(), 2, 128)
    drafting = BatchWorker(engine, SpecDefaults(drafter="ngram", k=2), 4, ServeMetrics(), 2, 128)
    try:
        plain.check(sampled)
        with pytest.raises(APIError, match="greedy"):
            drafting.check(sampled)
    finally:
        plain.close()
        drafting.close()


def test_a_cancelled_job_stops_at_the_next_step(local) -> None:
    """The worker's side of a disconnect: once the job is cancelled, generation stops at the next
    step (stop reason "cancelled"), the engine is free, and the metrics say so."""
    from labkit.serve.metrics import ServeMetrics
    from labkit.serve.protocol import ServeRequest
    from labkit.serve.worker import FifoWorker, Job, SpecDefaults

    loaded, engine = local
    worker = FifoWorker(engine, SpecDefaults(), 4, ServeMetrics())
    ids = encode_prompt(loaded.tokenizer, CHAT)

    async def run(cancel_after: int | None) -> tuple[int, object]:
        r = ServeRequest("chat", CHAT, GenerationConfig(max_new_tokens=150, min_new_tokens=150), True, False, None, None, None, None, "x", 0)
        job = Job(r, ids, asyncio.get_running_loop(), None)
        worker.submit(job)
        seen = 0
        while True:
            kind, payload = await job.events.get()
            if kind == "tokens":
                seen += len(payload)
                if cancel_after is not None and seen >= cancel_after:
                    job.cancelled.set()
            else:
                return seen, payload

    try:
        seen, (result, timed_out) = asyncio.run(run(3))
        assert result.stats.stop_reason == "cancelled" and not timed_out and len(result.tokens) < 150 and seen == len(result.tokens)
        seen, (result, _) = asyncio.run(run(None))  # the next job runs to its end on the same engine
        assert result.stats.stop_reason == "max_new_tokens" and len(result.tokens) == 150
        assert 'labkit_requests_total{status="cancelled"} 1.0' in worker.metrics.text().decode()
    finally:
        worker.close()


@pytest.mark.parametrize("body,status,param", [
    ("{not json", 400, None),
    ({"model": "default"}, 400, "messages"),
    ({"messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": CHAT, "max_tokens": 10**6}, 400, "max_tokens"),
    ({"messages": CHAT, "drafter": "telepathy"}, 400, "drafter"),
    ({"messages": CHAT, "drafter": "ngram", "k": 65}, 400, "k"),
    ({"messages": CHAT, "temperature": -0.5}, 400, "temperature"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature"),
    ({"messages": CHAT, "model": "gpt-4o"}, 404, "model"),
    ({"messages": [{"role": "user", "content": "x" * (2 << 20)}]}, 413, None),
])
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server: str, body, status: int, param: str | None) -> None:
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server + "/v1/chat/completions", content=data, headers={"content-type": "application/json"}, timeout=60)
    err = r.json()["error"]
    assert r.status_code == status and err["message"] and err["type"] and err["param"] == param
    assert httpx.post(server + "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2}, timeout=60).status_code == 200


def test_the_official_openai_client_talks_to_it(server: str, local) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    got = client.chat.completions.create(model="default", messages=CHAT, max_tokens=10)
    assert got.choices[0].message.content == _expected(local, CHAT, 10)
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(model="default", messages=CHAT, max_tokens=10, stream=True)
              if c.choices]
    assert "".join(pieces) == got.choices[0].message.content


def test_the_client_end_to_end(server: str, tmp_path: Path) -> None:
    from labkit.bench.serve_client import ServeBenchConfig, run_serve_bench, serve_report

    cfg = ServeBenchConfig(backend="http", base_url=server, num_prompts=6, concurrency=3, max_tokens=6, extra_body={"drafter": "ngram", "k": 2},
                           output_dir=str(tmp_path), progress=False)
    payload = run_serve_bench(cfg)
    s = payload["summary"]
    assert s["completed"] == 6 and s["failed"] == 0 and 0 < s["total_output_tokens"] <= 36
    assert 0 < s["p50_ttft_ms"] <= s["p99_ttft_ms"] and s["output_throughput"] > 0 and "tau" in s and s["tau"] >= 1.0
    assert len(payload["files"]) == 2 and all(Path(f).exists() for f in payload["files"])
    assert any("Output token throughput" in line for line in serve_report(payload))


def test_a_full_queue_answers_429_and_a_timeout_stops_the_request(local) -> None:
    """Past --max-queue waiting requests, submit refuses with 429; a request past its deadline
    stops at its next step and is reported as timed out (the server answers 504)."""
    from labkit.serve.metrics import ServeMetrics
    from labkit.serve.protocol import APIError, ServeRequest
    from labkit.serve.worker import FifoWorker, Job, SpecDefaults

    loaded, engine = local
    ids = encode_prompt(loaded.tokenizer, CHAT)
    r = ServeRequest("chat", CHAT, GenerationConfig(max_new_tokens=50, min_new_tokens=50), False, False, None, None, None, None, "x", 0)
    full = FifoWorker(engine, SpecDefaults(), 0, ServeMetrics())
    try:

        async def refused() -> None:
            with pytest.raises(APIError) as err:
                full.submit(Job(r, ids, asyncio.get_running_loop(), None))
            assert err.value.status == 429 and err.value.body()["error"]["code"] == "queue_full"

        asyncio.run(refused())
    finally:
        full.close()
    worker = FifoWorker(engine, SpecDefaults(), 4, ServeMetrics())
    try:

        async def late() -> tuple:
            job = Job(r, ids, asyncio.get_running_loop(), time.monotonic() - 1.0)  # already past its deadline
            worker.submit(job)
            while True:
                kind, payload = await job.events.get()
                if kind == "done":
                    return payload

        result, timed_out = asyncio.run(late())
        assert timed_out and result.stats.stop_reason == "cancelled" and len(result.tokens) == 1
        assert 'labkit_requests_total{status="timeout"} 1.0' in worker.metrics.text().decode()
    finally:
        worker.close()
