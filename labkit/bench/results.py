"""Results are data: every file names the machine, device, library versions, commit and parameters."""

from __future__ import annotations

import csv
import datetime as dt
import functools
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from labkit.config import device_name
from labkit.threads import load_average


def git_commit() -> str:
    """HEAD (with -dirty when tracked files changed); LABKIT_GIT_COMMIT names it where there is no
    repository, as on a machine that got a copy of the working tree."""
    if os.environ.get("LABKIT_GIT_COMMIT"):
        return os.environ["LABKIT_GIT_COMMIT"]
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    if len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def _git(*args: str) -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def committable(folder: Path) -> bool:
    """Whether files written into `folder` could be committed: inside this labkit's checkout and
    not ignored by git (results/ is; .nbval-results/ and a scratch folder outside are not)."""
    top = _git("rev-parse", "--show-toplevel")
    if not top or os.environ.get("LABKIT_GIT_COMMIT"):
        return False
    folder = folder.resolve()
    if not folder.is_relative_to(Path(top).resolve()):
        return False
    here = Path(__file__).resolve().parent
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{folder}/"], cwd=here, capture_output=True, timeout=5)
    return ignored.returncode != 0


def require_clean_tree(folder: Path) -> bool:
    """Refuse results meant for the repository from a checkout with uncommitted changes: their commit
    would not reproduce them. LABKIT_ALLOW_DIRTY=1 (`--allow-dirty`) lets them through; returns
    whether the tree is dirty, so the file can say so."""
    from labkit.errors import LabkitError

    dirty = git_commit().endswith("-dirty")
    if dirty and committable(folder) and os.environ.get("LABKIT_ALLOW_DIRTY", "") not in ("1", "true", "yes"):
        raise LabkitError(f"the checkout has uncommitted changes, so results in {folder} would not match their commit: "
                          "commit first, or pass --allow-dirty (LABKIT_ALLOW_DIRTY=1) and the file records the dirty tree")
    return dirty


def provenance(device: torch.device, parameters: dict[str, Any]) -> dict[str, Any]:
    import transformers

    return {
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "device": {"type": device.type, "name": device_name(device), "torch_threads": torch.get_num_threads(),
                   "load_average": load_average(), "cpu_kernel_path": _cpu_kernel_path(),  # avx512, avx2, portable
                   "cpu_kernel_flags": os.environ.get("LABKIT_CPU_KERNEL_FLAGS", "")},  # extra build flags of the CPU block kernel
        "switches": switches(),
        "cuda_graph_if_nodes": _if_nodes(device),  # eagle-mix's copy steps skip the chain's launches where these exist
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "labkit": _labkit_version(),
                     "triton": _dist_version("triton"), "cuda": torch.version.cuda or "", "driver": _driver_version(device)},
        "git_commit": git_commit(),
        "model_sha256": model_digest(str(parameters.get("model_source", ""))),
        "parameters": parameters,
    }


def _if_nodes(device: torch.device) -> str:
    from labkit.graphs import if_nodes_status

    return if_nodes_status() if device.type == "cuda" else ""


def switches() -> dict[str, str]:
    """The environment switches set for this run that change what runs (LABKIT_*, SPECDEC_*; not the
    paths or names that only say where things are): a result measured with IF nodes off says so."""
    where = {"LABKIT_CACHE", "LABKIT_RESULTS_DIR", "LABKIT_GIT_COMMIT", "LABKIT_ALLOW_DIRTY", "LABKIT_CPU_KERNEL_FLAGS"}
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(("LABKIT_", "SPECDEC_")) and k not in where}


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return ""


def _driver_version(device: torch.device) -> str:
    """The NVIDIA driver's version on a CUDA run (nvidia-smi), else ""."""
    if device.type != "cuda":
        return ""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""


@functools.lru_cache(maxsize=8)
def model_digest(source: str) -> str:
    """SHA-256 of the weights a run loaded: the embedded model's conversion records it; for another
    model folder, of its weight files (safetensors or bin) in name order. "" when not a folder."""
    folder = Path(source) if source else None
    if folder is None or not folder.is_dir():
        return ""
    try:
        stamp = json.loads((folder / "labkit.json").read_text())
        if isinstance(stamp, dict) and isinstance(stamp.get("weights_sha256"), str):
            return stamp["weights_sha256"]
    except (OSError, ValueError):
        pass
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        return ""
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def _cpu_kernel_path() -> str:
    from labkit.kernels import cpu_quant

    return cpu_quant.kernel_path() if cpu_quant.available()[0] else ""


def warn_if_busy() -> None:
    """After a run: one line on stderr when the machine is visibly busy (the load average counts this
    process too, so only a competitor pushes it past the CPUs)."""
    import sys

    from labkit.threads import busy_warning

    warning = busy_warning()
    if warning:
        print(f"labkit: warning: {warning}", file=sys.stderr)


def _labkit_version() -> str:
    """The installed distribution's version (pyproject.toml's), read without importing the package's top."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("labkit")
    except PackageNotFoundError:
        return "unknown"


def check_output_dir(output_dir: str | Path) -> Path:
    """Make sure results can be written there before anything is measured: a folder (made if
    missing) that this process may write into."""
    from labkit.errors import LabkitError

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise LabkitError(f"output folder {out} is a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LabkitError(f"cannot create output folder {out}: {err.strerror or err}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise LabkitError(f"cannot write into output folder {out}")
    return out


class RowLog:
    """A run's results files. The folder is checked (and a dirty checkout refused, when the folder could
    be committed) before anything is measured; the files themselves are claimed at the first row, so
    a run stopped before it measured anything leaves nothing behind. <stem>-<time>.rows.jsonl then gets
    each row the moment it is measured (a run that dies keeps them), and `finish` writes the .json
    (provenance, summary, rows) and .csv beside it, then drops the JSONL. Names are never reused: two
    runs in the same second get -2, -3, ... (the JSONL is created exclusively)."""

    def __init__(self, output_dir: str | Path, stem: str) -> None:
        self.out = check_output_dir(output_dir)
        self.dirty = require_clean_tree(self.out)
        self.base = f"{stem}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"  # the run's start names its files
        self.partial: Path | None = None  # <base>.rows.jsonl once claimed
        self.json_path: Path  # <base>.json and .csv beside it, named with the claim
        self.csv_path: Path

    def _claim(self) -> Path:
        """The first free <base>[-n] whose .rows.jsonl this call creates (exclusively)."""
        for n in range(1, 1000):
            base = self.base + (f"-{n}" if n > 1 else "")
            self.json_path, self.csv_path = self.out / f"{base}.json", self.out / f"{base}.csv"
            if self.json_path.exists() or self.csv_path.exists():
                continue
            try:
                (self.out / f"{base}.rows.jsonl").open("x").close()
            except FileExistsError:
                continue
            self.partial = self.out / f"{base}.rows.jsonl"
            return self.partial
        raise FileExistsError(f"no free results file name for {self.base} in {self.out}")

    def add(self, row: dict[str, Any]) -> None:
        with (self.partial or self._claim()).open("a") as fh:
            fh.write(json.dumps(row, default=str) + "\n")

    def finish(self, payload: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[Path, Path]:
        partial = self.partial or self._claim()
        with self.json_path.open("x") as fh:
            fh.write(json.dumps({**payload, "dirty_tree": self.dirty, "rows": rows}, indent=2, default=str))
        if rows:
            fields = list(dict.fromkeys(k for row in rows for k in row))
            with self.csv_path.open("x", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
        partial.unlink(missing_ok=True)
        return self.json_path, self.csv_path


def write_results(output_dir: str | Path, stem: str, payload: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """Write <stem>-<time>.json (provenance, summary, rows) and the rows as .csv; returns both
    paths. Never over an existing file."""
    return RowLog(output_dir, stem).finish(payload, rows)
