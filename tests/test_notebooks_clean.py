"""Notebooks are committed without outputs, and each follows the skeleton (a tagged parameters cell)."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped_and_parameterised(path: Path) -> None:
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "run `make strip`"
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    assert 'device: str = "auto"' in "".join(tagged[0]["source"])
    validate = "".join(code[code.index(tagged[0]) + 1]["source"])
    assert "out_dir = results_dir(" in validate, "the results folder is checked before anything is measured"
    assert "write_results(out_dir" in "".join(code[-1]["source"]), "the last cell writes results"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_papermill_sees_every_parameter(path: Path) -> None:
    """`papermill --help-notebook` lists every name the parameters cell sets (a comment with quotes
    or "=" in it made papermill skip its line)."""
    import re

    translators = pytest.importorskip("papermill.translators")
    nb = json.loads(path.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    source = "".join(cell["source"])
    names = [m.group(1) for line in source.splitlines() if (m := re.match(r"^(\w+)\s*[:=]", line))]
    inferred = [p.name for p in translators.PythonTranslator.inspect({"source": source})]
    assert names and inferred == names
