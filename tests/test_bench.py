import json

import pytest

from labkit.bench.baseline import BaselineConfig, run_baseline, summarize
from labkit.errors import LabkitError
from labkit.models.loading import LoadedModel, load_model


def test_baseline_writes_results_with_provenance(tiny_folder, tmp_path) -> None:
    loaded: LoadedModel = load_model(str(tiny_folder))
    cfg = BaselineConfig(device="cpu", dtypes=["float32", "bfloat16"], max_new_tokens=6, categories=["math", "rag"], repeats=2, output_dir=str(tmp_path), progress=False)
    payload = run_baseline(cfg, loaded)
    rows = payload["rows"]
    assert len(rows) == 2 * 2 * 2 * 2  # dtypes × prompts × repeats × systems
    assert {r["system"] for r in rows} == {"hf_generate", "labkit"}
    assert all(r["new_tokens"] == 6 for r in rows)  # fixed length: EOS suppressed in both
    fp32 = [r for r in rows if r["dtype"] == "float32"]
    assert all(r["identical_tokens"] for r in fp32)
    json_file = next(tmp_path.glob("baseline-cpu-*.json"))
    data = json.loads(json_file.read_text())
    for key in ("machine", "device", "versions", "git_commit", "parameters", "summary", "rows"):
        assert key in data
    assert data["device"]["name"].startswith("CPU")
    assert next(tmp_path.glob("baseline-cpu-*.csv")).read_text().count("\n") == len(rows) + 1


def test_summary_ratio_is_per_pair() -> None:
    rows = []
    for i, (hf, ours) in enumerate(((10.0, 20.0), (20.0, 30.0), (5.0, 20.0))):
        key = {"dtype": "float32", "prompt_id": f"p{i}", "repeat": 0, "identical_tokens": True}
        rows.append({**key, "system": "hf_generate", "tok_per_s": hf})
        rows.append({**key, "system": "labkit", "tok_per_s": ours})
    (s,) = summarize(rows)
    assert s["speedup_median"] == 2.0 and s["speedup_min"] == 1.5 and s["speedup_max"] == 4.0
    assert s["hf_tok_per_s"] == 10.0 and s["labkit_tok_per_s"] == 20.0


def test_weight_bytes_count_a_tied_head_once() -> None:
    from labkit.bench.validation import weight_bytes_per_token
    from labkit.engine import Engine
    from labkit.models.tiny import tiny_hf_model

    for arch, tied in (("llama", True), ("llama-untied", False)):
        engine = Engine.from_hf(tiny_hf_model(arch, seed=1), "cpu", "float32")
        params = {p.data_ptr(): p for p in engine.model.parameters()}
        total = sum(p.numel() * 4 for p in params.values())
        embed = engine.model.embed.weight
        want = total if tied else total - embed.numel() * 4 + embed.shape[1] * 4
        assert weight_bytes_per_token(engine) == want, arch


def test_explain_finds_the_first_difference_and_measures_the_gap() -> None:
    import torch

    from labkit.bench.divergence import explain
    from labkit.engine import Engine
    from labkit.models.tiny import tiny_hf_model

    engine = Engine.from_hf(tiny_hf_model("llama", seed=2), "cpu", "float32")
    prompt = [3, 4, 5, 6]
    engine.ensure_capacity(8)
    logits = engine.prefill(torch.tensor([prompt + [7, 8]]))[0]
    top2 = logits.topk(2).indices.tolist()
    ours, theirs = [7, 8, top2[0]], [7, 8, top2[1]]
    out = explain(engine, engine, prompt, ours, theirs)
    assert out["first_diff"] == 2 and out["token_ref"] == top2[0] and out["token_other"] == top2[1]
    assert abs(out["fp32_gap"] - float(logits[top2[0]] - logits[top2[1]])) < 1e-4 and out["fp32_gap"] > 0
    assert out["kind"] == ("near-tie" if out["gap_in_bf16_steps"] <= 4 else "unexplained")
    assert explain(engine, engine, prompt, [7, 8], [7, 8, 9])["kind"] == "length"


def test_validation_speedups_use_the_prompts_both_systems_ran() -> None:
    from labkit.bench.validation import summarize as summarize_validation

    rows = [{"system": "hf_generate", "prompt_id": "a", "tok_per_s": 10.0, "identical_to_plain": True},
            {"system": "labkit_graph", "prompt_id": "a", "tok_per_s": 100.0, "identical_to_plain": True},
            {"system": "labkit_graph", "prompt_id": "b", "tok_per_s": 300.0, "identical_to_plain": False}]
    out = {r["system"]: r for r in summarize_validation(rows, "labkit_graph", roofline=1000.0)}
    assert out["labkit_graph"]["speedup_vs_hf"] == 10.0  # prompt a only
    assert out["labkit_graph"]["tok_per_s"] == 200.0 and out["labkit_graph"]["roofline_share"] == 0.2
    assert out["labkit_graph"]["identical_share"] == 0.5


def test_validation_time_budget_stops_between_prompts_and_says_so(tiny_folder) -> None:
    from labkit.bench.validation import ValidationConfig, run_validation

    cfg = ValidationConfig(device="cpu", dtype="float32", max_new_tokens=3, categories=["writing", "coding"], prompts_per_category=1,
                           drafters=["ngram"], ks=[1], hf_assisted=False, fused=False, compile=False, output_dir=None,
                           progress=False, time_budget_s=1e-6)
    payload = run_validation(cfg, load_model(str(tiny_folder)))
    stopped = payload["stopped_early"]
    assert stopped["prompts_done"] == 1 and stopped["prompts_planned"] == 2 and len(stopped["not_run"]) == 1
    first = payload["parameters"]["prompts"][0]
    assert {r["prompt_id"] for r in payload["rows"]} == {first}
    # the slow systems run after the fast ones, on the prompts that ran: HF still has its one prompt
    assert stopped["slow_prompts_done"] == 1 and stopped["slow_prompts_planned"] == 2 and stopped["slow_not_run"] == stopped["not_run"]
    assert {r["system"] for r in payload["rows"]} == {"hf_generate", "labkit_plain", "labkit_ngram"}
    assert [r["system"] for r in payload["rows"]][-1] == "hf_generate"
    with pytest.raises(LabkitError, match="time_budget_s"):
        ValidationConfig(time_budget_s=0).validate()


def test_validation_warms_every_system_on_the_long_prompts_before_timing_them(tiny_folder, monkeypatch) -> None:
    """A long prompt's attention span is a shape of its own (compiled kernels, captured graphs):
    every engine and drafter meets it untimed before its first timed request."""
    import labkit.bench.validation as validation

    calls: list[tuple[int, int, bool]] = []  # (prompt length, new tokens, speculative)
    generate = validation.generate

    def logged(engine, ids, cfg, spec=None, *args, **kwargs):
        calls.append((len(ids), cfg.max_new_tokens, spec is not None))
        return generate(engine, ids, cfg, spec, *args, **kwargs)

    monkeypatch.setattr(validation, "generate", logged)
    cfg = validation.ValidationConfig(device="cpu", dtype="float32", max_new_tokens=5, categories=["writing"], prompts_per_category=1,
                                      drafters=["ngram"], ks=[1], hf_assisted=False, fused=False, compile=False, output_dir=None,
                                      progress=False, long_prompts=[120])
    payload = validation.run_validation(cfg, load_model(str(tiny_folder)))
    assert {r["prompt_id"] for r in payload["rows"]} >= {"long-120"}
    for speculative in (False, True):
        timed = calls.index((120, 5, speculative))
        assert (120, 16 if speculative else 8, speculative) in calls[:timed], calls


def test_validation_runs_the_heads_and_graph_lookup_drafters_lossless(tiny_folder, tmp_path) -> None:
    from labkit.bench.validation import ValidationConfig, run_validation
    from labkit.specdec.heads import fingerprint, save_heads
    from tests.test_heads import random_heads

    loaded = load_model(str(tiny_folder))
    head = loaded.hf_model.get_output_embeddings().weight
    save_heads(random_heads(head.shape[1], 2), tmp_path / "h", fingerprint(head))
    cfg = ValidationConfig(device="cpu", dtype="float32", max_new_tokens=6, categories=["writing"], prompts_per_category=1,
                           drafters=["ngram", "heads", "ngram-graph"], heads=str(tmp_path / "h"), ks=[1, 2], hf_assisted=True,
                           fused=False, compile=False, output_dir=None, progress=False)
    payload = run_validation(cfg, loaded)
    for system in ("labkit_heads", "labkit_ngram-graph"):
        rows = [r for r in payload["rows"] if r["system"] == system]
        assert len(rows) == 1 and rows[0]["identical_to_plain"]
    systems = {r["system"] for r in payload["rows"]}
    assert "hf_assisted_heads" not in systems  # transformers has no Medusa heads
    assert "hf_assisted_ngram-graph" not in systems and "hf_assisted_ngram" in systems  # its prompt lookup, once
    with pytest.raises(LabkitError, match="needs heads"):
        ValidationConfig(drafters=["heads"]).validate()


def test_validation_carries_the_drafters_on_the_fastest_engine_that_can(tiny_folder, monkeypatch) -> None:
    """A drafter the fastest plain engine cannot carry (dynamic EAGLE trees need fused layers: an
    fp32 run on a GPU, where the PyTorch graphs beat fp32 Triton) moves every drafter to the next
    fastest, says why, and speedups stay against the fastest plain engine."""
    import labkit.bench.validation as validation
    from labkit.engine import Engine

    def two_engines(cfg, loaded, device, dtype):
        return {**real_engines(cfg, loaded, device, dtype), "labkit_other": Engine.from_loaded(loaded, device, dtype, weights="dense")}

    def picky_build(kind, target, **kw):
        refused.setdefault("engine", target)  # the first engine tried is the fastest: it cannot carry this drafter
        if target is refused["engine"]:
            raise LabkitError("this engine cannot carry it")
        return real_build(kind, target, **kw)

    real_engines, real_build, refused = validation._engines, validation.build_drafter, {}
    monkeypatch.setattr(validation, "_engines", two_engines)
    monkeypatch.setattr(validation, "build_drafter", picky_build)
    cfg = validation.ValidationConfig(device="cpu", dtype="float32", max_new_tokens=4, categories=["writing"], prompts_per_category=1,
                                      drafters=["ngram"], ks=[1], hf_assisted=False, fused=False, compile=False, output_dir=None, progress=False)
    payload = validation.run_validation(cfg, load_model(str(tiny_folder)))
    params = payload["parameters"]
    assert params["drafters_on"] != params["fastest_plain"] and params["plain_passed_over"] == {params["fastest_plain"]: "this engine cannot carry it"}
    rows = [r for r in payload["rows"] if r["system"] == "labkit_ngram"]
    assert len(rows) == 1 and rows[0]["identical_to_plain"]
    plain = next(s for s in payload["summary"] if s["system"] == params["fastest_plain"])
    assert plain["speedup_vs_labkit_plain"] == pytest.approx(1.0)


def test_paired_ratio_interval_keeps_drift_common() -> None:
    from labkit.bench.sweep import paired_ratio_interval

    def rows(speeds: list[float]) -> list[dict]:
        return [{"prompt_id": f"p{i % 3}", "iteration": i // 3, "tok_per_s": s} for i, s in enumerate(speeds)]

    drift = [60.0, 35.0, 50.0, 40.0, 65.0, 30.0]  # the machine's speed wanders; each pair shares it
    lo, hi = paired_ratio_interval(rows([1.1 * s for s in drift]), rows(drift))
    assert lo == pytest.approx(1.1) and hi == pytest.approx(1.1)  # a constant paired ratio: no width from the drift
    lo, hi = paired_ratio_interval(rows([s * f for s, f in zip(drift, (1.2, 0.9, 1.0, 1.1, 0.95, 1.05), strict=True)]), rows(drift))
    point = sum(s * f for s, f in zip(drift, (1.2, 0.9, 1.0, 1.1, 0.95, 1.05), strict=True)) / sum(drift)
    assert 0.9 < lo < point < hi < 1.2
    assert paired_ratio_interval(rows([1.0]), rows([1.0])) != paired_ratio_interval(rows([1.0]), rows([1.0]))  # NaN: too few pairs


def test_adaptive_vs_fixed_per_category_with_and_without_an_interval() -> None:
    from labkit.bench.sweep import adaptive_vs_fixed

    def row(it: int, pid: str, cat: str, controller: str, k: int, tok_s: float) -> dict:
        return {"iteration": it, "prompt_id": pid, "category": cat, "drafter": "ngram", "policy": "greedy", "controller": controller,
                "k": k, "lossless": True, "tok_per_s": tok_s}

    rows = [row(0, "a", "copy", "fixed", 1, 50.0), row(0, "a", "copy", "fixed", 4, 80.0), row(0, "a", "copy", "cost", 4, 78.0),
            row(0, "b", "chat", "fixed", 1, 60.0), row(0, "b", "chat", "fixed", 4, 50.0), row(0, "b", "chat", "cost", 4, 57.0)]
    out = adaptive_vs_fixed(rows, "cost")
    by_cat = {r["category"]: r for r in out["per_category"]}
    assert by_cat["copy"]["best_fixed_k"] == 4 and by_cat["copy"]["ratio"] == pytest.approx(78 / 80)
    assert by_cat["chat"]["best_fixed_k"] == 1 and by_cat["chat"]["within_5pct"] is True  # 57 / 60 = 0.95
    assert by_cat["copy"]["ratio_ci90"] is None  # one run each: no interval
    overall = {r["fixed_k"]: r for r in out["overall"]}
    assert overall[1]["ratio"] == pytest.approx(67.5 / 55) and overall[4]["beats"] is True
    again = adaptive_vs_fixed(rows + [{**r, "iteration": 1, "tok_per_s": r["tok_per_s"] * 0.5} for r in rows], "cost")
    lo, hi = {r["category"]: r for r in again["per_category"]}["copy"]["ratio_ci90"]
    assert lo == pytest.approx(78 / 80) and hi == pytest.approx(78 / 80)  # drift common to each pair leaves no width


def test_results_files_are_never_overwritten(tmp_path) -> None:
    """Two runs finishing in the same second each keep their own files."""
    from labkit.bench.results import write_results

    rows = [{"a": 1}]
    first = write_results(tmp_path, "same", {"run": 1}, rows)
    second = write_results(tmp_path, "same", {"run": 2}, rows)
    third = write_results(tmp_path, "same", {"run": 3}, [])
    names = {p.name for pair in (first, second, third) for p in pair}
    assert len(names) == 6 and len({first[0], second[0], third[0]}) == 3
    import json

    assert [json.loads(p[0].read_text())["run"] for p in (first, second, third)] == [1, 2, 3]


def test_rows_survive_a_run_that_dies(tmp_path) -> None:
    """Rows land in <stem>.rows.jsonl as they are measured; finish() turns them into .json and .csv."""
    from labkit.bench.results import RowLog

    log = RowLog(tmp_path, "sweep-cpu")
    log.add({"prompt": 1, "tok_per_s": 10.0})
    log.add({"prompt": 2, "tok_per_s": 11.0})
    lines = log.partial.read_text().splitlines()  # what a crash here would leave
    assert [json.loads(line)["prompt"] for line in lines] == [1, 2]
    json_path, csv_path = log.finish({"benchmark": "sweep"}, [{"prompt": 1}, {"prompt": 2}])
    assert not log.partial.exists() and json_path.exists() and csv_path.exists()


def test_a_run_stopped_before_its_first_row_leaves_no_file(tmp_path) -> None:
    """A run's files are claimed at its first row: one stopped before it measured anything leaves
    nothing (whoever called it: the CLI, a notebook), and one that measured keeps its rows."""
    from labkit.bench import results
    from tests.conftest import run_cli_here

    empty = results.RowLog(tmp_path, "sweep-cpu")
    measured = results.RowLog(tmp_path, "sweep-cpu")
    measured.add({"prompt": 1})
    assert empty.partial is None and [p.name for p in tmp_path.iterdir()] == [measured.partial.name]
    json_path, _ = empty.finish({"benchmark": "sweep"}, [])  # a run with no rows still writes its payload, under its own name
    assert json_path.exists() and json_path.name != measured.partial.name.replace(".rows.jsonl", ".json")
    out = tmp_path / "cli"
    rc, _, err = run_cli_here("sweep", "--max-tokens", "4", "--device", "cpu", "--model", "/nonexistent/model", "--output-dir", str(out))
    assert rc == 2 and "error" in err and not list(out.glob("*")), err  # the folder checked, then the model failed to load


def test_an_output_folder_that_is_a_file_fails_before_measuring(tmp_path) -> None:
    from tests.conftest import run_cli
    from tests.test_cli import assert_clean_error

    blocker = tmp_path / "results"
    blocker.write_text("")
    for args in (["sweep", "--k", "1"], ["bench", "baseline"], ["bench", "kernels"], ["bench", "context", "--lengths", "64"]):
        assert_clean_error(*run_cli(*args, "--output-dir", str(blocker), timeout=60), "is a file")


def test_summary_compares_each_labkit_system_with_the_same_pairs_llama_cpp_run() -> None:
    rows = []
    for i, (hf, peer, ours) in enumerate(((10.0, 40.0, 20.0), (20.0, 30.0, 60.0), (5.0, 10.0, 20.0))):
        key = {"dtype": "float32", "prompt_id": f"p{i}", "repeat": 0, "identical_tokens": True}
        rows += [{**key, "system": "hf_generate", "tok_per_s": hf}, {**key, "system": "llama_cpp", "tok_per_s": peer},
                 {**key, "system": "labkit_gguf", "tok_per_s": ours}]
    by_system = {s["system"]: s for s in summarize(rows)}
    assert by_system["labkit_gguf"]["over_llama_cpp_median"] == 2.0  # 0.5, 2, 2
    assert "over_llama_cpp_median" not in by_system["llama_cpp"] and by_system["llama_cpp"]["speedup_median"] == 2.0


def test_llama_cpp_required_but_missing_is_one_clear_error_before_loading(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import labkit.bench.baseline as baseline

    monkeypatch.setattr(baseline, "llama_cpp_status", lambda: (False, "llama-cpp-python is not installed"))
    cfg = BaselineConfig(model=str(tmp_path / "no-model"), device="cpu", llama_cpp="on", output_dir=None, progress=False)
    with pytest.raises(LabkitError, match="--llama-cpp on: llama-cpp-python is not installed"):
        run_baseline(cfg)  # the model does not exist: the error comes first


def test_a_llama_cpp_that_crashes_here_is_left_out_in_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """llama.cpp is tried in a child process before the benchmark loads it: a build that dies on
    this CPU (a segfault, as a native build did on a Sapphire Rapids VM) or fails is named in one
    line, and left out under "auto"; "on" stops with that line. Nothing runs it in this process."""
    import signal

    import torch

    from labkit.bench import baseline
    from labkit.bench.llamacpp import llama_cpp_probe

    crash = f"import os, signal; os.kill(os.getpid(), signal.{signal.SIGSEGV.name})"
    ok, why = llama_cpp_probe("any.gguf", 2, code=crash)
    assert not ok and "SIGSEGV" in why and "\n" not in why
    ok, why = llama_cpp_probe("any.gguf", 2, code="import sys; sys.exit('no such file: any.gguf')")
    assert not ok and "exit 1: no such file: any.gguf" in why
    assert llama_cpp_probe("any.gguf", 2, code="print('decoded')") == (True, "")

    monkeypatch.setattr(baseline, "llama_cpp_status", lambda: (True, "0.3.36"))
    monkeypatch.setattr(baseline, "llama_cpp_probe", lambda path, threads: (False, "llama.cpp failed a test decode on this machine (it died with SIGSEGV)"))
    monkeypatch.setattr(baseline, "LlamaCpp", lambda *a, **k: pytest.fail("a crashing llama.cpp must not be loaded"))
    loaded = type("Loaded", (), {"gguf_path": "model.gguf", "eos_token_ids": ()})()
    cfg = BaselineConfig(device="cpu", llama_cpp="auto", output_dir=None, progress=False)
    assert baseline.llama_cpp_peer(cfg, loaded, torch.device("cpu"), torch.float32, 256) is None  # type: ignore[arg-type]
    assert "llama.cpp left out: llama.cpp failed a test decode on this machine (it died with SIGSEGV)" in capsys.readouterr().err
    with pytest.raises(LabkitError, match="^--llama-cpp on: llama.cpp failed a test decode"):
        baseline.llama_cpp_peer(BaselineConfig(device="cpu", llama_cpp="on", output_dir=None, progress=False), loaded, torch.device("cpu"), torch.float32, 256)  # type: ignore[arg-type]


def test_llama_cpp_runs_beside_labkit_on_the_same_gguf(embedded) -> None:
    """Where llama-cpp-python is installed: the third system of the baseline, on the embedded
    GGUF, greedy, at the requested length with EOS blocked, against labkit's tokens."""
    pytest.importorskip("llama_cpp")
    from labkit.bench.llamacpp import LlamaCpp

    peer = LlamaCpp(embedded.gguf_path, 256, 1, embedded.eos_token_ids)
    from labkit.generate import encode_prompt

    ids = encode_prompt(embedded.tokenizer, "Say OK.", None)
    short, _, _ = peer.generate(ids, 64)
    assert short and short[-1] not in embedded.eos_token_ids and len(short) < 64  # stopped at EOS
    tokens, seconds, ttft_ms = peer.generate(ids, 64, min_new_tokens=64)
    assert len(tokens) == 64 and seconds > 0 and 0 < ttft_ms < seconds * 1e3 and tokens[: len(short)] == short
    cfg = BaselineConfig(device="cpu", max_new_tokens=8, categories=["math"], repeats=1, llama_cpp="on", output_dir=None, progress=False)
    summary = {s["system"]: s for s in run_baseline(cfg, embedded)["summary"]}
    assert "llama_cpp" in summary and "over_llama_cpp_median" in summary["labkit"]


def test_baseline_times_the_gguf_blocks_with_8_bit_activations_when_asked(embedded) -> None:
    """--gguf-q8: a fourth system, our engine on the GGUF's blocks with 8-bit activations, beside the
    GGUF's fp32 one (whose tokens stay HF's); asked without the GGUF's own system, one clear error."""
    cfg = BaselineConfig(device="cpu", max_new_tokens=8, categories=["math"], repeats=1, gguf_q8=True, llama_cpp="off", output_dir=None, progress=False)
    summary = {s["system"]: s for s in run_baseline(cfg, embedded)["summary"]}
    assert set(summary) == {"labkit", "labkit_gguf", "labkit_gguf_q8"}
    assert summary["labkit_gguf_q8"]["weights"] == "gguf-q8" and summary["labkit_gguf"]["weights"] == "gguf"
    assert summary["labkit_gguf"]["identical_share"] == 1.0 and summary["labkit_gguf_q8"]["labkit_tok_per_s"] > 0
    with pytest.raises(LabkitError, match="drop --no-gguf"):
        run_baseline(BaselineConfig(device="cpu", gguf_weights=False, gguf_q8=True, output_dir=None, progress=False), embedded)


def test_provenance_names_the_weights_and_the_toolchain(tiny_folder, embedded, monkeypatch) -> None:
    """Every results file says which weights ran (SHA-256), the triton, CUDA and driver versions, and
    the switches set that change what runs (not the ones that only say where things are)."""
    import hashlib

    import torch

    from labkit.bench.results import provenance

    monkeypatch.setenv("LABKIT_IF_NODES", "0")
    monkeypatch.setenv("SPECDEC_CUDA_GRAPH", "1")
    p = provenance(torch.device("cpu"), {"model_source": str(tiny_folder)})
    assert p["switches"]["LABKIT_IF_NODES"] == "0" and p["switches"]["SPECDEC_CUDA_GRAPH"] == "1"
    assert p["cuda_graph_if_nodes"] == ""  # a CPU run: none to speak of
    assert "LABKIT_CACHE" not in p["switches"]
    want = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(tiny_folder.glob("*.safetensors")))).hexdigest()
    assert p["model_sha256"] == want and {"triton", "cuda", "driver"} <= set(p["versions"])
    stamped = provenance(torch.device("cpu"), {"model_source": embedded.source})["model_sha256"]
    assert len(stamped) == 64 and stamped != want  # the embedded conversion's recorded digest


def test_a_dirty_checkout_is_refused_for_results_that_could_be_committed(tmp_path, monkeypatch) -> None:
    """Before anything is measured; --allow-dirty (LABKIT_ALLOW_DIRTY=1) lets it through and the file says so."""
    from labkit.bench import results

    monkeypatch.delenv("LABKIT_ALLOW_DIRTY", raising=False)
    monkeypatch.setattr(results, "git_commit", lambda: "0" * 40 + "-dirty")
    monkeypatch.setattr(results, "committable", lambda folder: True)
    with pytest.raises(LabkitError, match="uncommitted changes.*--allow-dirty"):
        results.RowLog(tmp_path, "sweep-cpu")
    assert not list(tmp_path.iterdir())  # nothing claimed
    monkeypatch.setenv("LABKIT_ALLOW_DIRTY", "1")
    json_path, _ = results.write_results(tmp_path, "sweep-cpu", {"benchmark": "sweep"}, [{"a": 1}])
    assert json.loads(json_path.read_text())["dirty_tree"] is True
    monkeypatch.setattr(results, "committable", lambda folder: False)  # scratch: written, marked
    monkeypatch.delenv("LABKIT_ALLOW_DIRTY")
    assert json.loads(results.write_results(tmp_path, "x", {}, [])[0].read_text())["dirty_tree"] is True


def test_results_inside_the_checkout_are_committable_unless_ignored(tmp_path, monkeypatch) -> None:
    from labkit.bench.results import committable
    from labkit.notebook import repo_root

    root = repo_root()
    if root is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    monkeypatch.delenv("LABKIT_GIT_COMMIT", raising=False)
    assert committable(root / "results")
    assert not committable(root / ".nbval-results")  # ignored by git
    assert not committable(tmp_path)


def test_cli_allow_dirty_reaches_the_results_check(monkeypatch) -> None:
    from labkit.cli import build_parser

    args = build_parser().parse_args(["bench", "kernels", "--allow-dirty"])
    assert args.allow_dirty and args.output_dir == "results"
