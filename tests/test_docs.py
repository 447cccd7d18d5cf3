"""The documentation's references hold: every results file the README and docs cite by its path
exists (results are data; a figure without its file is a claim), and every relative link resolves."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "results" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CITED = re.compile(r"`(results/[A-Za-z0-9_./-]+\.(?:json|txt|csv|png|md))`")  # a results file by its path from the root
LINK = re.compile(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)")  # [text](relative/path#anchor); a URL has a colon


def broken_references(doc: Path) -> list[str]:
    text = doc.read_text()
    missing = [f"cites {m.group(1)}" for m in CITED.finditer(text) if not (REPO / m.group(1)).exists()]
    return missing + [f"links {m.group(1)}" for m in LINK.finditer(text) if not (doc.parent / m.group(1)).exists()]


def test_every_cited_results_file_and_relative_link_exists() -> None:
    broken = {doc.relative_to(REPO).as_posix(): refs for doc in DOCS if (refs := broken_references(doc))}
    assert not broken, broken


def test_a_missing_file_or_link_is_reported(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("see `results/no-such-run.json` and [cpu](no/such.md), [web](https://example.org)")
    assert broken_references(doc) == ["cites results/no-such-run.json", "links no/such.md"]
