"""CPU matrix-vector products straight from GGUF Q4_1 / Q8_0 blocks (kernels/cpu_quant_gemv.c), with fp32
activations or (act "q8", --weights gguf-q8) activations quantised to 8 bits per block (kernels/cpu_q8_gemv.c).

Built once with the system C compiler into the labkit cache and loaded with ctypes: no torch
headers, so the build takes about a second. It links the same libgomp torch already loaded,
so the two share one OpenMP thread pool. `available()` says whether it could be built and why
not; callers fall back to dense weights.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from labkit.config import cache_dir, env_flag
from labkit.errors import LabkitError

log = logging.getLogger(__name__)
SOURCE_NAME = "cpu_quant_gemv.c"
SOURCE_NAMES = (SOURCE_NAME, "cpu_q8_gemv.c", "cpu_q8_tiles.c", "cpu_layer.c")  # built into one library: the products, and the layer operations over them
ACTIVATIONS = ("fp32", "q8")  # a product's activations: as they are, or quantised per block of 32 (llama.cpp's Q8)


def cpu_signature() -> str:
    """What a -march=native build depends on: the CPU's model and instruction-set flags (Linux's
    /proc/cpuinfo), else the platform's names. Part of the built kernel's cache key, so a cache
    shared between machines never loads a kernel built for another instruction set."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip().lower()
            if key in ("flags", "features"):  # x86, arm
                return f"{platform.machine()}:{line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"{platform.machine()}:{platform.processor()}:{platform.platform()}"


def _sources() -> list[Path] | None:
    for folder in (Path(__file__).resolve().parents[2] / "kernels", Path(__file__).parent / "csrc"):  # a checkout, an installed wheel
        paths = [folder / name for name in SOURCE_NAMES]
        if all(p.is_file() for p in paths):
            return paths
    return None


@lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    if env_flag("SPECDEC_FORCE_PY"):
        return None, "SPECDEC_FORCE_PY=1"
    srcs = _sources()
    if srcs is None:
        return None, f"{' and '.join(SOURCE_NAMES)} not found"
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc or gcc) on PATH"
    from labkit.errors import LabkitError

    code = b"".join(p.read_bytes() for p in srcs)
    extra = os.environ.get("LABKIT_CPU_KERNEL_FLAGS", "").split()  # e.g. -mno-avx512f: the path CPUs without AVX-512 take
    tag = hashlib.sha256(code + compiler.encode() + cpu_signature().encode() + " ".join(extra).encode()).hexdigest()[:16]
    try:
        lib_path = cache_dir() / "kernels" / f"cpu_quant_gemv-{tag}.so"
    except LabkitError as err:
        return None, str(err)
    if not lib_path.is_file():
        lib_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib_path.with_suffix(f".{os.getpid()}.tmp")
        cmd = [compiler, "-O3", "-march=native", *extra, "-fopenmp", "-shared", "-fPIC", *map(str, srcs), "-o", str(tmp), "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            reason = f"compile failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}"
            log.warning("cpu_quant kernel unavailable, using dense weights (%s)", reason)
            return None, reason
        os.replace(tmp, lib_path)
    lib = ctypes.CDLL(str(lib_path))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.gemv_q4_1.argtypes = [p, p, p, p, p, i64, i64, i64]
    lib.gemv_q8_0.argtypes = [p, p, p, p, i64, i64, i64]
    lib.gemv_q4_1_q8.argtypes = [p, p, p, p, p, i64, i64, i64]
    lib.gemv_q8_0_q8.argtypes = [p, p, p, p, i64, i64, i64]
    lib.gemv_q4_1_q8_tiles.argtypes = [p, p, p, p, p, i64, i64, i64]
    lib.gemv_q8_0_q8_tiles.argtypes = [p, p, p, p, p, i64, i64, i64]
    lib.q8_tile_rows.restype = ctypes.c_int
    lib.q8_kernel_path.restype = ctypes.c_char_p
    lib.max_rows.restype = ctypes.c_int
    lib.kernel_path.restype = ctypes.c_char_p
    lib.kernel_threads.restype = ctypes.c_int
    return lib, "built"


def library() -> ctypes.CDLL | None:
    """The built library (None when unavailable): for kernels/cpu_layer.c's operations (layer_cpu.py)."""
    return _load()[0]


def _built() -> ctypes.CDLL:
    """The built library for a product's call; RuntimeError with the reason where there is none."""
    lib, reason = _load()
    if lib is None:
        raise RuntimeError(f"cpu_quant kernel unavailable: {reason}")
    return lib


def available() -> tuple[bool, str]:
    lib, reason = _load()
    return lib is not None, reason


def kernel_path() -> str:
    """The instruction-set path the build took: "avx512", "avx2" (with FMA) or "portable" ("" when unavailable)."""
    lib, _ = _load()
    return lib.kernel_path().decode() if lib is not None else ""


def kernel_threads() -> int:
    """Threads the kernel's OpenMP loops run on (torch.set_num_threads sets them: one pool); 0 when unavailable."""
    lib, _ = _load()
    return int(lib.kernel_threads()) if lib is not None else 0


def q8_kernel_path() -> str:
    """Which path the 8-bit-activation products took in this build ("avx2-int8", with VNNI "avx2-int8-vnni", "portable-int8"), "" when unbuilt."""
    lib, _ = _load()
    return lib.q8_kernel_path().decode() if lib is not None else ""


def q8_tile_rows() -> int:
    """Weight rows a tile of the 8-bit-activation products holds (kernels/cpu_q8_tiles.c: 16 where the
    build has AVX-512 VNNI), 0 where there are no tiles (unbuilt, or another instruction set)."""
    lib, _ = _load()
    return int(lib.q8_tile_rows()) if lib is not None else 0


def max_rows() -> int:
    lib, _ = _load()
    return int(lib.max_rows()) if lib is not None else 0


def quant_linear(
    x: torch.Tensor,  # (M, K) float32, contiguous, CPU
    kind: str,  # "q4_1" or "q8_0"
    qs: torch.Tensor,  # q4_1: (N, K/2) uint8; q8_0: (N, K) int8
    d: torch.Tensor,  # (N, K/32) float32
    m: torch.Tensor | None,  # (N, K/32) float32 for q4_1
    act: str = "fp32",  # "q8": x quantised per block of 32 first (kernels/cpu_q8_gemv.c; reference.quant_linear_q8_ref)
) -> torch.Tensor:  # (M, N) float32
    lib = _built()
    M, K = x.shape
    N = qs.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    q8 = act == "q8"
    if kind == "q4_1":
        assert m is not None
        (lib.gemv_q4_1_q8 if q8 else lib.gemv_q4_1)(x.data_ptr(), qs.data_ptr(), d.data_ptr(), m.data_ptr(), y.data_ptr(), M, N, K)
    else:
        (lib.gemv_q8_0_q8 if q8 else lib.gemv_q8_0)(x.data_ptr(), qs.data_ptr(), d.data_ptr(), y.data_ptr(), M, N, K)
    return y


@dataclass(frozen=True)
class Q8Tiles:
    """A linear layer's GGUF blocks tiled sixteen weight rows at a time for the 8-bit-activation
    products (kernels/cpu_q8_tiles.c's header: the layouts). The same values as the blocks; a copy."""

    kind: str  # "q4_1" or "q8_0"
    qt: torch.Tensor  # q4_1: (N/16, B, 4, 16, 4) uint8; q8_0: (N/16, B, 8, 16, 4) int8
    dt: torch.Tensor  # (N/16, B, 16) float16: d by lane (the GGUF's own half floats: a fifth fewer bytes to stream than fp32)
    extra: torch.Tensor  # q4_1: mt (N/16, B, 16) float16, m by lane; q8_0: wt (N/16, B, 16) int16, each lane's block sum of quants
    N: int
    K: int


def tile_q8(
    kind: str,  # "q4_1" or "q8_0"
    qs: torch.Tensor,  # q4_1: (N, K/2) uint8; q8_0: (N, K) int8
    d: torch.Tensor,  # (N, B) float32, B = K/32, each a float16's value (the GGUF's blocks; quantize_q8_0's)
    m: torch.Tensor | None,  # (N, B) float32 for q4_1, as d
) -> Q8Tiles | None:
    """The blocks as tiles of the build's tile rows, or None where it has none or N is not a multiple of them."""
    rows = q8_tile_rows()
    N, B = d.shape
    if not rows or N % rows:
        return None
    for name, t in (("d", d), ("m", m)):
        if t is not None and not torch.equal(t.half().float(), t):
            raise LabkitError(f"the q8 tiles keep block scales as float16, as the GGUF does: this weight's {name} is not")

    def by_lane(t: torch.Tensor) -> torch.Tensor:  # (N, B) -> (N/16, B, 16)
        return t.reshape(N // rows, rows, B).transpose(1, 2).contiguous()

    if kind == "q4_1":
        assert m is not None
        qt = qs.reshape(N // rows, rows, B, 4, 4).permute(0, 2, 3, 1, 4).contiguous()  # (N/16, B, 4 quads, 16 lanes, 4 bytes)
        return Q8Tiles(kind, qt, by_lane(d.half()), by_lane(m.half()), N, B * 32)
    q = qs.reshape(N, B, 32)  # (N, B, 32) int8
    qt = q.reshape(N // rows, rows, B, 8, 4).permute(0, 2, 3, 1, 4).contiguous()  # (N/16, B, 8 quads, 16 lanes, 4 bytes)
    return Q8Tiles(kind, qt, by_lane(d.half()), by_lane(q.sum(-1, dtype=torch.int32).to(torch.int16)), N, B * 32)  # |sum| <= 32 * 128


def quant_linear_tiles(
    x: torch.Tensor,  # (M, K) float32, contiguous, CPU
    tiles: Q8Tiles,
) -> torch.Tensor:  # (M, N) float32: quant_linear(x, ..., act="q8")'s product, but for the order of fp32 sums
    lib = _built()
    M = x.shape[0]
    y = torch.empty(M, tiles.N, dtype=torch.float32)
    fn = lib.gemv_q4_1_q8_tiles if tiles.kind == "q4_1" else lib.gemv_q8_0_q8_tiles
    fn(x.data_ptr(), tiles.qt.data_ptr(), tiles.dt.data_ptr(), tiles.extra.data_ptr(), y.data_ptr(), M, tiles.N, tiles.K)
    return y
