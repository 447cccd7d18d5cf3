"""What every Triton kernel of labkit's layers shares: the tile table (TUNE) and the weight tiles a
program loads up front (_k_tiles), the launch options (programmatic dependent launch on Hopper),
and two device helpers (a dot that stays in fp32 where it must, the wait for the previous
kernel's writes). layer_triton.py, attention_triton.py and draft_triton.py import from here;
scripts/layer_tune.py overrides TUNE.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

BLOCK_M = 16  # rows (tokens) per program: tl.dot's smallest tile
# Tried 32-row programs for launches of 17-32 rows (a 4-row verify of K 5 is 24 rows, two 16-row programs
# that each read the weights; H200, session 42, scripts/with_tune.py): every row's bits the same, but a
# 4-row K 5 lookup step ran 1,685 against 656 us and a 32-token prompt pass 5.6 against 0.6 ms (1.5 ms
# with 8 warps): the prefetched weight tiles beside a 32-row tile spill. Kept at 16 for every launch.
# Tile sizes. At batch 1 each kernel reads a few hundred KB of weights: many small programs keep
# more SMs reading at once. scripts/layer_tune.py times alternatives on a GPU.
TUNE = {
    "qkv_sub": 32,  # q/k/v output dims per program (of each head half; its rope partners come along)
    "gate_block_n": 32,  # gate/up output columns per program
    "linear_block_n": 32,  # output columns per program (tl.dot needs >= 16)
    "head_block_n": 64,  # vocabulary columns per program of the LM head
    "prefetch_bytes": 96 * 1024,  # weights a program loads up front (registers, then shared memory for tl.dot)
    "linear_block_k": 512,  # reduction tile (16-bit weights) for the columns past the prefetch (larger models)
    "norm_block_k": 256,  # the same for the kernels that also normalise
    "attn_split_s": 256,  # keys per attention program (split-K: a long context is read by many programs at once;
    # on an H200 at 4096 keys 256 ran 729 us per decode step, 128 781, 64 958; all ~540 at 32 keys)
    "attn_block_s": 128,  # keys per step of an attention program's loop (64, 128, 256 within noise on an H200)
    "attn_combine_chunk": 8,  # partial results the combining program loads at a time (32 ran slower)
    # Tried: reading a split's first key block before waiting for the previous kernel (safe only if every
    # kernel waits before it lets the next start) gained 3% at 4096 keys, but that wait order cost every
    # decode step ~20% (H200, commit 7217fec).
    "num_warps": 4,
    "pdl": True,  # programmatic dependent launch (sm90+): the next kernel starts reading its weights early
}


def _k_tiles(K: int, row_bytes: int) -> tuple[int, int]:
    """Two power-of-two tiles (KA, KB) of reduction columns that a program loads before its wait,
    within prefetch_bytes; row_bytes is what one column costs it (weight rows x matrices x element
    size). 576 = 512 + 64, 1536 = 1024 + 512; a loop covers any columns past KA + KB."""
    pre = max(16, min(K, int(TUNE["prefetch_bytes"]) // row_bytes))
    ka = 1 << (pre.bit_length() - 1)
    rest = pre - ka
    kb = 1 << (rest.bit_length() - 1) if rest >= 16 else 0  # tl.dot needs K >= 16
    return ka, kb


def _ieee(x: torch.Tensor) -> int:
    """How the kernels multiply (their IEEE argument): 0 tensor cores in x's half precision, 1 fp32
    products (no silent TF32), 2 the interpreter's row-by-row fp32 sums (_dot)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 2
    return int(x.dtype == torch.float32)


@functools.cache
def _sm90(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _pdl(x: torch.Tensor) -> bool:
    """Launch with programmatic dependent launch: on Hopper and later, not under the interpreter."""
    return bool(TUNE["pdl"]) and os.environ.get("TRITON_INTERPRET") != "1" and _sm90(x.device)


def _launch(pdl: bool) -> dict:
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE == 2:  # the interpreter: each row's sums in one order whatever shares its tile, as on
        # tensor cores (numpy's matmul, which tl.dot becomes there, may give a row other bits at
        # another place in the tile on some CPUs); fp32, since its half-precision dot is wrong
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    if IEEE:  # fp32 weights (no silent TF32)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _wait_for_inputs(GDC: tl.constexpr):
    """Under programmatic dependent launch: let the next kernel start (it only reads weights until
    its own wait), then wait until the previous kernel's writes are visible. Nothing a kernel
    writes, and nothing an earlier kernel wrote, may be touched before this."""
    if GDC:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def _called_off(only_if_ptr, ONLY_IF: tl.constexpr):
    """After _wait_for_inputs: whether this launch has nothing to do, its `only_if` flag (a device
    bool, read only now: an earlier kernel may write it) being false. Layer and draft kernels take
    the flag so a captured step can call a whole EAGLE chain off on the device (specdec/eagle_mix.py)
    where PyTorch captures no conditional nodes; a launch called off leaves its outputs unwritten."""
    if ONLY_IF:
        return tl.load(only_if_ptr) == 0
    else:
        return False


def _only_if_args(only_if: torch.Tensor | None, dummy: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A kernel's (only_if_ptr, ONLY_IF) for a wrapper's `only_if` argument."""
    if only_if is None:
        return dummy, False
    assert only_if.numel() == 1 and only_if.dtype == torch.bool, "only_if is one device bool"
    return only_if, True


@triton.jit
def _tile(ptr, rows, r_ok, k0, K: tl.constexpr, KT: tl.constexpr):
    """Columns k0..k0+KT of the given rows of a row-major (*, K) matrix, zeros past K."""
    offs_k = k0 + tl.arange(0, KT)
    return tl.load(ptr + rows[:, None] * K + offs_k[None, :], mask=r_ok[:, None] & (offs_k[None, :] < K), other=0.0)


@triton.jit
def _weight_tiles(w_ptr, rows, r_ok, K: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr):
    """The weight tiles a program loads up front: columns [0, KA) and [KA, KA + KB) of its rows
    (the first again where KB is 0)."""
    w_a = _tile(w_ptr, rows, r_ok, 0, K, KA)  # (rows, KA)
    w_b = w_a
    if KB > 0:
        w_b = _tile(w_ptr, rows, r_ok, KA, K, KB)  # (rows, KB)
    return w_a, w_b


@triton.jit
def _tiled_dot(x_ptr, offs_m, m_ok, w_ptr, rows, r_ok, w_a, w_b, K: tl.constexpr, IEEE: tl.constexpr, KA: tl.constexpr,
               KB: tl.constexpr, BLOCK_K: tl.constexpr):
    """x[offs_m] @ W[rows]^T, fp32 (BLOCK_M, len(rows)): the tiles in hand, then a loop over the
    columns past them. One order of sums for every caller, so every kernel that runs a product
    gives it the same bits."""
    acc = _dot(_tile(x_ptr, offs_m, m_ok, 0, K, KA), tl.trans(w_a), IEEE)
    if KB > 0:
        acc += _dot(_tile(x_ptr, offs_m, m_ok, KA, K, KB), tl.trans(w_b), IEEE)
    for k0 in range(KA + KB, K, BLOCK_K):  # columns past the prefetched tiles (larger models)
        acc += _dot(_tile(x_ptr, offs_m, m_ok, k0, K, BLOCK_K), tl.trans(_tile(w_ptr, rows, r_ok, k0, K, BLOCK_K)), IEEE)
    return acc


@triton.jit
def _vec(ptr, k0, K: tl.constexpr, KT: tl.constexpr):
    offs_k = k0 + tl.arange(0, KT)
    return tl.load(ptr + offs_k, mask=offs_k < K, other=0.0)
