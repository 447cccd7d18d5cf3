import json

from labkit.bench.baseline import BaselineConfig, run_baseline, summarize
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
