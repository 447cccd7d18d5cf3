"""labkit as pip installs it from a wheel (Kaggle, Colab): the C and CUDA kernel sources travel
inside the package, so an installed labkit still builds its CPU block kernel."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_an_installed_wheel_builds_the_cpu_kernel(tmp_path: Path) -> None:
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
    assert {f"labkit/kernels/csrc/{n}" for n in ("cpu_quant_gemv.c", "cpu_layer.c", "specdec_kernels.cu")} <= set(names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "from labkit.kernels import cpu_quant; import labkit; print(labkit.__file__); print(cpu_quant.available())"
    env = {**os.environ, "PYTHONPATH": str(site), "LABKIT_CACHE": str(tmp_path / "cache"), "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and lines[0].startswith(str(site)), out.stderr[-500:]  # the wheel's labkit, not the checkout
    if "no C compiler" in lines[1]:
        pytest.skip("no C compiler here")
    assert lines[1].startswith("(True"), lines[1]
