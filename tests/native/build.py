"""Standalone C checks (tests/native/*.c) built for the instruction sets this machine's own build
does not take: x86 without AVX (the portable paths), and aarch64 (NEON) cross builds by GCC and by
clang, run under qemu where they are installed (`apt install gcc-aarch64-linux-gnu qemu-user clang`)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

TARGETS = ["portable", "aarch64", "clang-aarch64"]


def build_and_run(src: Path, target: str, tmp_path: Path) -> str:
    """Build `src` for `target` (skipping where this machine cannot), run it on two threads, and
    return what it printed."""
    exe = tmp_path / "check"
    if target in ("native", "portable") and not shutil.which("gcc"):
        pytest.skip("no gcc here")
    if target == "native":
        build, run = ["gcc", "-O3", "-march=native", "-fopenmp"], [str(exe)]
    elif target == "portable":
        if platform.machine() not in ("x86_64", "AMD64"):
            pytest.skip("x86 gcc")
        build, run = ["gcc", "-O3", "-fopenmp", "-mno-avx512f", "-mno-avx2", "-mno-fma"], [str(exe)]
    elif target == "aarch64":
        if not shutil.which("aarch64-linux-gnu-gcc") or not shutil.which("qemu-aarch64"):
            pytest.skip("no aarch64 cross compiler and qemu here")
        build, run = ["aarch64-linux-gnu-gcc", "-O3", "-march=armv8-a", "-fopenmp", "-static"], ["qemu-aarch64", str(exe)]
    else:  # clang's spelling (Apple's compiler), one thread: an omp.h stub stands in for libomp
        if not shutil.which("clang") or not shutil.which("qemu-aarch64") or not Path("/usr/aarch64-linux-gnu").is_dir():
            pytest.skip("no clang, aarch64 sysroot and qemu here")
        (tmp_path / "omp.h").write_text("static inline int omp_get_max_threads(void) { return 1; }\n")
        build = ["clang", "--target=aarch64-linux-gnu", "-O3", "-march=armv8-a", "-static", f"-I{tmp_path}", "-Wno-unknown-pragmas"]
        run = ["qemu-aarch64", str(exe)]
    subprocess.run([*build, str(src), "-o", str(exe), "-lm"], check=True, capture_output=True, timeout=120)
    out = subprocess.run(run, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return out.stdout + out.stderr if out.returncode else out.stdout
