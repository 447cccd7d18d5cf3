"""The CLI as a user meets it: one clear line and a non-zero exit for bad input, never a traceback."""

import json
import shutil

import pytest
import torch

from tests.conftest import run_cli, run_cli_here

NO_GPU = not torch.cuda.is_available()


def assert_clean_error(rc: int, out: str, err: str, needle: str) -> None:
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--prompt", "", "--max-tokens", "4"], "prompt is empty"),
        (["--prompt", "   ", "--max-tokens", "4"], "prompt is empty"),
        (["--prompt", "hi", "--max-tokens", "0"], "at least 1"),
        (["--prompt", "hi", "--max-tokens", "-5"], "at least 1"),
        (["--prompt", "hi", "--max-tokens", "ten"], "invalid int"),
        (["--prompt", "hi", "--dtype", "int4"], "unknown dtype"),
        (["--prompt", "hi", "--model", "no-such-org/no-such-model-xyz"], "could not be loaded"),
        (["--prompt", "hi", "--top-p", "1.5"], "top-p"),
        (["--prompt", "hi", "--temperature", "nan"], "temperature"),
        (["--prompt", "hi", "--temperature", "inf"], "temperature"),
        (["--prompt", "hi", "--temperature", "1e-45"], "temperature"),
        (["--prompt", "hi", "--drafter", "ngram", "--k", "1000"], "at most 64"),
        (["--prompt", "hi", "--max-seq-len", "1"], "max-seq-len"),
        (["--prompt", "hi\udcff", "--max-tokens", "4"], "UTF-8"),
        # checked before the model loads: this model does not exist, and the error is not about it
        (["--prompt", "hi", "--model", "no-such-org/no-such-model-xyz", "--drafter", "model"], "--draft-model"),
        (["--prompt", "hi", "--model", "no-such-org/no-such-model-xyz", "--drafter", "heads"], "--heads"),
    ],
)
def test_generate_bad_input(args: list[str], needle: str) -> None:
    assert_clean_error(*run_cli("generate", *args), needle)


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without CUDA")
def test_missing_device() -> None:
    assert_clean_error(*run_cli("generate", "--prompt", "hi", "--device", "cuda"), "not available")


def test_prompt_longer_than_context(tiny_folder) -> None:
    long_prompt = "word " * 400  # the tiny model's context is 256
    assert_clean_error(*run_cli("generate", "--model", str(tiny_folder), "--prompt", long_prompt, "--device", "cpu"), "context")


def test_unsupported_architecture(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    assert_clean_error(*run_cli("generate", "--model", str(tmp_path), "--prompt", "hi"), "supports")


def test_generate_json(tiny_folder) -> None:
    rc, out, err = run_cli("generate", "--model", str(tiny_folder), "--prompt", "Tell me a story", "--max-tokens", "9", "--json", "--device", "cpu")
    assert rc == 0, err
    data = json.loads(out)
    assert 1 <= len(data["token_ids"]) <= 9
    assert data["stats"]["new_tokens"] == len(data["token_ids"])
    assert data["stats"]["tok_per_s"] > 0 and data["dtype"] == "float32"
    assert len(data["stats"]["token_latencies_ms"]) == len(data["token_ids"]) - 1


def test_generate_text_report_on_the_embedded_model() -> None:
    rc, out, err = run_cli("generate", "--prompt", "What is 2 + 2?", "--max-tokens", "12", "--device", "cpu")
    assert rc == 0, err
    for label in ("tok/s", "time to first", "per token", "peak memory"):
        assert label in out


def test_bench_bad_input() -> None:
    assert_clean_error(*run_cli("bench", "baseline", "--max-tokens", "0"), "at least 1")
    assert_clean_error(*run_cli("bench", "baseline", "--dtype", "float8"), "unknown dtype")
    assert_clean_error(*run_cli("bench", "nonsense"), "invalid choice")


def test_generate_with_a_drafter_reports_accepted_lengths(tiny_folder) -> None:
    rc, out, err = run_cli("generate", "--model", str(tiny_folder), "--prompt", "one two one two one two", "--max-tokens", "12",
                           "--json", "--device", "cpu", "--drafter", "ngram", "--k", "3")
    assert rc == 0, err
    stats = json.loads(out)["stats"]
    assert stats["drafter"] == "ngram" and stats["policy"] == "greedy"
    assert len(stats["accepted_lengths"]) == stats["target_steps"] >= 1
    assert stats["controller"] == "cost"  # auto, on a CPU: K by the measured verify costs
    rc, out, err = run_cli("generate", "--model", str(tiny_folder), "--prompt", "one two one two", "--max-tokens", "6",
                           "--json", "--device", "cpu", "--drafter", "ngram", "--k", "3", "--controller", "fixed")
    assert rc == 0, err
    assert json.loads(out)["stats"]["controller"] == "fixed"


def test_speculation_bad_input(tiny_folder) -> None:
    base = ["generate", "--model", str(tiny_folder), "--prompt", "hi", "--device", "cpu"]
    assert_clean_error(*run_cli(*base, "--drafter", "ngram", "--k", "0"), "at most 64")
    assert_clean_error(*run_cli(*base, "--drafter", "model"), "--draft-model")
    assert_clean_error(*run_cli(*base, "--drafter", "layerskip", "--layers", "9"), "layer")
    assert_clean_error(*run_cli("sweep", "--k", "0,2", "--no-plots"), "at least 1")
    assert_clean_error(*run_cli("sweep", "--drafter", "oracle"), "unknown drafter")


def test_sweep_writes_results(tiny_folder, tmp_path) -> None:
    rc, out, err = run_cli("sweep", "--model", str(tiny_folder), "--drafter", "ngram,layerskip", "--layers", "1", "--k", "1,3",
                           "--max-tokens", "8", "--categories", "math,rag", "--device", "cpu", "--output-dir", str(tmp_path), "--replay")
    assert rc == 0, err
    assert "best lossless setting per category" in out and "speedup model:" in out
    assert "replay (ngram" in out and "replay skipped layerskip-1" in out
    data = json.loads(next(tmp_path.glob("sweep-cpu-*.json")).read_text())
    replayed = data["replay"]["drafters"]["ngram"]
    assert set(replayed["overall"]) == {"fixed-1", "fixed-3"} and len(replayed["per_category"]) == 2
    assert {(r["drafter"], r["k"]) for r in data["summary"]} == {("plain", 0), ("ngram", 1), ("ngram", 3), ("layerskip-1", 1), ("layerskip-1", 3)}
    assert all(r["identical_to_plain"] for r in data["rows"])  # greedy speculation is lossless
    assert next(tmp_path.glob("sweep-cpu-*.png")).stat().st_size > 10_000


def test_kernel_commands(tmp_path) -> None:
    rc, out, err = run_cli("kernels", "--device", "cpu", "--json")
    assert rc == 0, err
    rows = json.loads(out)
    assert [r["kernel"] for r in rows] == ["verify_prefix", "rejection_sample", "kv_append", "greedy_verdict", "lookup_draft",
                                            "step_feed", "lookup_commit", "norm_qkv_rope", "decode_attention", "linear_residual", "norm_gate_up"]
    assert {r["chosen"] for r in rows} == {"torch"}  # the CPU: never the interpreter unless named
    rc, out, err = run_cli("bench", "kernels", "--device", "cpu", "--repeats", "1", "--output-dir", str(tmp_path))
    assert rc == 0, err
    assert "launch floor" in out
    rows = json.loads(next(tmp_path.glob("kernels-cpu-*.json")).read_text())["rows"]
    assert {r["backend"] for r in rows if r["available"]} >= {"torch"}
    assert {r["kernel"] for r in rows} == {"verify_prefix", "rejection_sample", "kv_append", "greedy_verdict", "lookup_draft"}
    assert_clean_error(*run_cli("bench", "kernels", "--repeats", "0"), "at least 1")


def test_generate_layer_kernels_flag(tiny_folder) -> None:
    rc, out, err = run_cli("generate", "--model", str(tiny_folder), "--prompt", "hello", "--max-tokens", "3", "--device", "cpu",
                           "--layer-kernels", "torch")
    assert rc == 0, err
    assert "torch layers" in out
    assert_clean_error(*run_cli("generate", "--model", str(tiny_folder), "--prompt", "hello", "--device", "cpu",
                                "--layer-kernels", "triton", "--compile"), "compile")


def test_generate_metrics_and_profiler_trace(tiny_folder, tmp_path) -> None:
    trace = tmp_path / "trace.json"
    rc, out, err = run_cli("generate", "--model", str(tiny_folder), "--prompt", "hello there", "--max-tokens", "6", "--device", "cpu",
                           "--drafter", "ngram", "--metrics-detailed", "--profile", str(trace))
    assert rc == 0, err
    assert "phases" in out and "prefill" in out and "top operators" in out
    assert json.loads(trace.read_text())["traceEvents"]
    before = trace.read_text()
    rc, out, err = run_cli("generate", "--model", str(tiny_folder), "--prompt", "hi", "--max-tokens", "2", "--device", "cpu", "--profile", str(trace))
    assert_clean_error(rc, out, err, "exists")
    assert trace.read_text() == before  # never overwritten
    rc, out, err = run_cli("generate", "--model", str(tiny_folder), "--prompt", "hi", "--max-tokens", "2", "--device", "cpu", "--profile", str(tmp_path / "t.txt"))
    assert_clean_error(rc, out, err, ".json")


def test_sweep_policies_and_controllers(tiny_folder, tmp_path) -> None:
    rc, out, err = run_cli("sweep", "--model", str(tiny_folder), "--drafter", "layerskip", "--layers", "1", "--k", "1,3",
                           "--adaptive-k", "3", "--policy", "default,topk,confidence", "--controller", "fixed,cost", "--confidence", "0.2",
                           "--max-tokens", "8", "--iterations", "2", "--categories", "math", "--device", "cpu", "--output-dir", str(tmp_path), "--no-plots")
    assert rc == 0, err
    data = json.loads(next(tmp_path.glob("sweep-cpu-*.json")).read_text())
    setups = {(r["policy"], r["controller"], r["lossless"]) for r in data["summary"] if r["drafter"] != "plain"}
    assert setups == {(p, c, p != "topk-2") for p in ("greedy", "topk-2", "confidence-0.2") for c in ("fixed", "cost")}
    ks = {(r["controller"], r["k"]) for r in data["summary"] if r["drafter"] != "plain"}
    assert ks == {("fixed", 1), ("fixed", 3), ("cost", 3)}  # --adaptive-k: the cost controller only at K max 3
    assert "cost" in data["adaptive_vs_fixed"] and "topk-2*" in out
    for r in data["adaptive_vs_fixed"]["cost"]["per_category"]:
        lo, hi = r["ratio_ci90"]
        assert lo <= r["ratio"] <= hi and "90% interval" in out


@pytest.mark.parametrize("args, needle", [
    (["--policy", "nope"], "unknown policy"),
    (["--controller", "pid"], "unknown controller"),
    (["--controller", "cost", "--adaptive-k", "0"], "adaptive K max must be at least 1"),
    (["--k", "99"], "every K must be at least 1 and at most 64"),
    (["--controller", "cost", "--adaptive-k", "x"], "take whole numbers"),
    (["--replay", "--temperature", "0.7"], "--replay needs greedy decoding"),
    (["--policy", "greedy", "--temperature", "0.8"], "temperature 0"),
    (["--policy", "typical", "--posterior-alpha", "0"], "posterior_alpha"),
    (["--policy", "confidence", "--confidence", "1.5"], "confidence threshold"),
    (["--drafter", "heads"], "needs heads"),
    (["--drafter", "ngram,heads", "--heads", "/nonexistent/heads"], "holds no draft heads"),
])
def test_sweep_policy_bad_input(args: list[str], needle: str) -> None:
    assert_clean_error(*run_cli("sweep", "--max-tokens", "4", "--device", "cpu", *args), needle)


def test_heads_train_then_generate_with_them(tiny_folder, tmp_path) -> None:
    out = tmp_path / "heads"
    rc, stdout, err = run_cli("heads", "train", "--model", str(tiny_folder), "--device", "cpu", "--out", str(out), "--n-heads", "2",
                              "--texts", "6", "--user-tokens", "4", "--greedy-tokens", "12", "--steps", "5", "--batch-size", "2")
    assert rc == 0, err
    assert "trained 2 heads on 5 texts" in stdout and "held-out top-1 (1 texts): head 1" in stdout
    assert (out / "heads.json").is_file() and (out / "heads.safetensors").is_file()
    info = json.loads((out / "heads.json").read_text())["info"]
    assert info["chat"] is True  # the model has a chat template
    assert info["provenance"]["device"]["type"] == "cpu" and info["provenance"]["git_commit"]  # where the heads came from
    shutil.copytree(out, tmp_path / "plain")  # heads alone: the folder --drafter eagle refuses below
    rc, stdout, err = run_cli("generate", "--model", str(tiny_folder), "--device", "cpu", "--prompt", "Tell me a story",
                              "--max-tokens", "12", "--drafter", "heads", "--heads", str(out), "--k", "2", "--json")
    assert rc == 0, err
    assert json.loads(stdout)["stats"]["drafter"] == "heads-2"
    # an EAGLE head beside the heads, in the same folder (its texts without the chat template); --drafter eagle reads it
    rc, stdout, err = run_cli("heads", "train", "--kind", "eagle", "--model", str(tiny_folder), "--device", "cpu", "--out", str(out),
                              "--no-chat", "--depth", "3", "--draft-vocab", "50", "--texts", "6", "--sampled-tokens", "2", "--greedy-tokens", "12",
                              "--steps", "5", "--batch-size", "2")
    assert rc == 0, err
    assert "trained an EAGLE head" in stdout and "depth 3" in stdout and (out / "eagle.safetensors").is_file() and (out / "heads.json").is_file()
    assert json.loads((out / "eagle.json").read_text())["info"]["chat"] is False
    for kind in ("eagle", "eagle-tree"):  # the chain, and EAGLE-2's dynamic trees
        rc, stdout, err = run_cli("generate", "--model", str(tiny_folder), "--device", "cpu", "--prompt", "Tell me a story",
                                  "--max-tokens", "12", "--drafter", kind, "--heads", str(out), "--k", "3", "--json")
        assert rc == 0, err
        stats = json.loads(stdout)["stats"]
        assert stats["drafter"].startswith("eagle-3") and (("-tree" in stats["drafter"]) == (kind == "eagle-tree"))
    # nothing a user wrote is overwritten; a missing folder is a clear error (each fails before generating or training: run in this process)
    for kind in ("heads", "eagle"):
        assert_clean_error(*run_cli_here("heads", "train", "--kind", kind, "--model", str(tiny_folder), "--device", "cpu", "--out", str(out)),
                           f"already holds {kind} files")
    assert_clean_error(*run_cli_here("generate", "--model", str(tiny_folder), "--device", "cpu", "--prompt", "hi", "--drafter", "eagle",
                                     "--heads", str(tmp_path / "plain")), "holds no EAGLE head")
    assert_clean_error(*run_cli_here("generate", "--model", str(tiny_folder), "--device", "cpu", "--prompt", "hi", "--drafter", "heads",
                                     "--heads", str(tmp_path / "none")), "holds no draft heads")
    assert_clean_error(*run_cli_here("generate", "--model", str(tiny_folder), "--device", "cpu", "--prompt", "hi", "--drafter", "heads"),
                       "needs heads: --heads")
    assert_clean_error(*run_cli_here("heads", "train", "--model", str(tiny_folder), "--device", "cpu", "--out", str(tmp_path / "x"),
                                     "--greedy-tokens", "2"), "greedy_tokens > n_heads")
    blocker = tmp_path / "a-file"  # a folder that cannot be made: said before the writing and training it would lose
    blocker.write_text("")
    small = ("--no-chat", "--texts", "4", "--sampled-tokens", "2", "--greedy-tokens", "8", "--steps", "1", "--batch-size", "2")  # (quick, were it to run)
    assert_clean_error(*run_cli_here("heads", "train", "--model", str(tiny_folder), "--device", "cpu", "--out", str(blocker / "heads"), *small),
                       "cannot be made")
    assert_clean_error(*run_cli_here("heads", "train", "--kind", "eagle", "--model", str(tiny_folder), "--device", "cpu", "--out", str(tmp_path / "y"),
                                     "--texts-file", str(blocker / "texts.json"), "--draft-vocab", "50", *small), "--texts-file's folder")
    assert_clean_error(*run_cli_here("heads", "train", "--kind", "eagle", "--model", str(tiny_folder), "--device", "cpu",
                                     "--out", str(tmp_path / "x"), "--time-limit", "-1"), "time limit is a number of seconds >= 0")


def test_bench_context_runs_end_to_end(tiny_folder, tmp_path) -> None:
    """labkit bench context on a tiny model: every system at every length, the plot, the targets."""
    rc, out, err = run_cli("bench", "context", "--model", str(tiny_folder), "--device", "cpu", "--lengths", "32,80", "--max-tokens", "4",
                           "--repeats", "1", "--k", "2", "--output-dir", str(tmp_path))
    assert rc == 0, err
    data = json.loads(next(tmp_path.glob("context-cpu-*.json")).read_text())
    assert {(e["system"], e["prompt_tokens"]) for e in data["summary"]} == {
        (s, n) for s in ("labkit_plain", "labkit_ngram", "hf_generate") for n in (32, 80)}
    assert all(r["prompt_tokens"] in (32, 80) and r["new_tokens"] == 4 for r in data["rows"])
    assert data["targets"]["speculative_identical_share"] == 1.0 and set(data["hf_forward_ms"]) == {"32", "80"}
    assert next(tmp_path.glob("context-cpu-*.png")).stat().st_size > 10_000 and not list(tmp_path.glob("*.rows.jsonl"))
    assert "keeps" in out
