"""labkit as pip installs it from a wheel (Kaggle, Colab): the C and CUDA kernel sources travel
inside the package, so an installed labkit still builds its CPU block kernel; `labkit doctor` and a
tiny `generate` run from a fresh venv holding the wheel."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_an_installed_wheel_builds_its_kernel_and_runs(tmp_path: Path, tiny_folder: Path) -> None:
    import shutil

    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # a fresh copy: an in-tree build would reuse an old build/ folder
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("labkit", "kernels"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(src)],
                           capture_output=True, text=True, timeout=300)
    if built.returncode != 0:
        pytest.skip(f"no wheel build here: {built.stderr[-300:]}")
    wheel = next((tmp_path / "wheel").glob("labkit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    from labkit.kernels.cpu_quant import SOURCE_NAMES

    assert {f"labkit/kernels/csrc/{n}" for n in (*SOURCE_NAMES, "specdec_kernels.cu", "graph_if.cu")} <= set(names)  # every source the library builds from
    # a fresh venv with labkit from the wheel; its dependencies (torch, transformers, ...) are this
    # interpreter's, through a .pth file, so nothing is downloaded
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    deps = [p for p in sys.path if p.endswith("site-packages") and "/venv/" not in p]
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True,
                               check=True).stdout.strip())
    zipfile.ZipFile(wheel).extractall(site)  # what pip does for a pure-Python wheel
    (site / "labkit-deps.pth").write_text("\n".join(deps) + "\n")
    env = {**os.environ, "LABKIT_CACHE": os.environ.get("LABKIT_CACHE", str(tmp_path / "cache")), "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    code = "from labkit.kernels import cpu_quant; import labkit; print(labkit.__file__); print(cpu_quant.available())"
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and lines[0].startswith(str(site)), out.stderr[-500:]  # the wheel's labkit, not the checkout
    if "no C compiler" not in lines[1]:
        assert lines[1].startswith("(True"), lines[1]
    doctor = subprocess.run([str(py), "-m", "labkit", "doctor", "--device", "cpu", "--model", str(tiny_folder)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, env=env)
    assert doctor.returncode == 0 and "CPU block kernel" in doctor.stdout and "not found" not in doctor.stdout, doctor.stdout + doctor.stderr
    gen = subprocess.run([str(py), "-m", "labkit", "generate", "--model", str(tiny_folder), "--device", "cpu", "--prompt", "Hi", "--max-tokens", "4",
                          "--json"], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert gen.returncode == 0 and len(json.loads(gen.stdout.strip().splitlines()[-1])["token_ids"]) >= 1, gen.stderr[-500:]
    # a notebook headless from the installed wheel, outside any checkout: its slider cell shows a plot
    if subprocess.run([str(py), "-c", "import papermill"], capture_output=True, env=env).returncode == 0:
        run = subprocess.run([str(py), "-m", "papermill", str(REPO / "notebooks" / "3C_kernels.ipynb"), "out.ipynb", "-p", "device", "cpu",
                              "-p", "repeats", "1", "-p", "vocab", "256"], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                             env={**env, "LABKIT_RESULTS_DIR": str(tmp_path / "results")})
        assert run.returncode == 0, run.stderr[-800:]
        cells = json.loads((tmp_path / "out.ipynb").read_text())["cells"]
        slider = [o for c in cells if "slider_plot(" in "".join(c["source"]) for o in c.get("outputs", [])]
        assert any("image/png" in o.get("data", {}) for o in slider), slider
        assert list((tmp_path / "results" / "3C").glob("kernels-cpu-*.json"))


def test_kaggle_bundle_is_valid_offline_kernels(tmp_path: Path) -> None:
    """labkit kaggle prepare (without downloads): a dataset with labkit's wheel, and per notebook a
    kernel folder whose metadata passes the Kaggle CLI's fields check, whose first cell installs the
    wheels offline, and whose parameters cell is still the tagged one."""
    pytest.importorskip("setuptools")
    from labkit.errors import LabkitError
    from labkit.kaggle import check_kernel_metadata, prepare

    notebooks = [REPO / "notebooks" / "1A_baseline.ipynb", REPO / "notebooks" / "3E_long_context.ipynb"]
    got = prepare(tmp_path / "kaggle", "someone", notebooks, gpu=True, download=False)
    assert any(w.startswith("labkit-") for w in got["wheels"]) and len(got["kernels"]) == 2
    for folder in map(Path, got["kernels"]):
        meta = json.loads((folder / "kernel-metadata.json").read_text())
        check_kernel_metadata(meta)
        assert meta["enable_internet"] is False and meta["enable_gpu"] is True and meta["dataset_sources"] == ["someone/labkit-wheels"]
        nb = json.loads((folder / meta["code_file"]).read_text())
        assert "--no-index" in "".join(nb["cells"][0]["source"])
        assert sum("parameters" in c.get("metadata", {}).get("tags", []) for c in nb["cells"]) == 1
    bad = {**meta, "id": "someone/another-name"}
    with pytest.raises(LabkitError, match="slug"):
        check_kernel_metadata(bad)
    with pytest.raises(LabkitError, match="lacks"):
        check_kernel_metadata({k: v for k, v in meta.items() if k != "code_file"})
