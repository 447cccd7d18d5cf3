"""Kernel microbenchmark (phase 3C): each backend of each kernel against two floors measured in
the same run: the launch floor (a one-element kernel) and the bytes floor (bytes moved at the
device's measured copy bandwidth)."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from labkit.kernels.registry import BACKENDS, KERNELS, backend_status, backends, get
from labkit.metrics.timers import synchronize


@dataclass
class KernelBenchConfig:
    vocab: int = 49152  # rejection_sample's V (SmolLM2's vocabulary)
    k: int = 4  # draft tokens
    batch: int = 1
    heads: int = 3  # kv_append: SmolLM2's kv heads, head_dim 64
    head_dim: int = 64
    cache_len: int = 2048
    repeats: int = 50


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, inner: int = 20) -> float:
    """Median seconds per call over `repeats` samples of `inner` back-to-back calls (so the timer's
    own overhead is spread out), after a warm-up; CUDA events on a GPU, perf_counter elsewhere."""
    for _ in range(3):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, mib: int = 256) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device, 5, inner=2)
    return 2 * src.numel() * 4 / seconds


def cases(cfg: KernelBenchConfig, device: torch.device) -> dict[str, tuple[tuple[Any, ...], int]]:
    """Inputs for each kernel and the bytes it must move at least. lookup_commit is left out: it
    advances its own context on every call (a few integers moved; scripts/step_costs.py times the
    step it belongs to)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    B, K, V = cfg.batch, cfg.k, cfg.vocab
    target = torch.randint(0, V, (B, K + 1), generator=g)
    draft = target[:, :K].clone()
    p = torch.randn(B, K + 1, V, generator=g).softmax(-1)
    q = torch.randn(B, K, V, generator=g).softmax(-1)
    cache = torch.randn(B, cfg.heads, cfg.cache_len, cfg.head_dim, generator=g)
    new = torch.randn(B, cfg.heads, K + 1, cfg.head_dim, generator=g)
    keep = torch.arange(K + 1).expand(B, K + 1).contiguous()
    start = torch.full((B,), cfg.cache_len // 2)
    history = torch.randint(0, 64, (B, cfg.cache_len + K + 1), generator=g)  # a small vocabulary: many matches
    logits = torch.randn(B, K + 1, V, generator=g).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    to = lambda *ts: tuple(t.to(device) for t in ts)
    return {
        "verify_prefix": (to(draft, target), (draft.numel() + target.numel() + 2 * B) * 8),
        "rejection_sample": (to(draft, q, p, torch.rand(B, K, generator=g), torch.rand(B, generator=g)), (p.numel() + q.numel()) * 4),
        "kv_append": (to(cache, new, keep, start), 2 * new.numel() * 4),
        # a verify's logits in the model's dtype (bf16 on a GPU): read once
        "greedy_verdict": (to(logits, target, torch.zeros(V, dtype=torch.bool), torch.tensor([1])), logits.numel() * logits.element_size()),
        # prompt lookup over a half-full cache's worth of context per row: reads each context once
        "lookup_draft": ((history.to(device), torch.full((B,), cfg.cache_len // 2, device=device), K), B * cfg.cache_len // 2 * 8),
    }


def run_kernel_bench(device: torch.device, cfg: KernelBenchConfig | None = None) -> dict[str, Any]:
    cfg = cfg or KernelBenchConfig()
    one = torch.zeros(1, device=device)
    launch = time_call(lambda: one.add_(1), device, cfg.repeats)
    bandwidth = copy_bandwidth(device)
    rows = []
    for name, (args, nbytes) in cases(cfg, device).items():
        assert name in KERNELS
        for backend in BACKENDS:
            status = backend_status(backend, device)
            if backend not in backends(name):
                rows.append({"kernel": name, "backend": backend, "available": False, "reason": "Triton and PyTorch only"})
                continue
            if not status.ok:
                rows.append({"kernel": name, "backend": backend, "available": False, "reason": status.reason})
                continue
            fn = get(name, device, backend)
            seconds = time_call(functools.partial(fn, *args), device, cfg.repeats, inner=1 if backend == "triton" and device.type != "cuda" else 20)
            floor = max(launch, nbytes / bandwidth)
            rows.append({"kernel": name, "backend": backend, "available": True, "reason": status.reason, "us": seconds * 1e6,
                         "launch_floor_us": launch * 1e6, "bytes": nbytes, "bytes_floor_us": nbytes / bandwidth * 1e6,
                         "x_over_floor": seconds / floor})
    return {"launch_floor_us": launch * 1e6, "copy_bandwidth_gb_s": bandwidth / 1e9, "config": cfg.__dict__, "rows": rows}


def kernels_payload(device: torch.device, result: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A kernel benchmark's results file (its rows go beside it): where it ran and the floors."""
    from labkit.bench.results import provenance

    return {"benchmark": "kernels", **provenance(device, result["config"]), "launch_floor_us": result["launch_floor_us"],
            "copy_bandwidth_gb_s": result["copy_bandwidth_gb_s"], **extra}


def kernels_report(result: dict[str, Any]) -> list[str]:
    """The lines `labkit bench kernels` prints: each kernel and backend against the floors."""
    out = [f"launch floor {result['launch_floor_us']:.1f} us, copy bandwidth {result['copy_bandwidth_gb_s']:.0f} GB/s"]
    for r in result["rows"]:
        if r["available"]:
            out.append(f"{r['kernel']:<18}{r['backend']:<8}{r['us']:>10.1f} us  {r['x_over_floor']:>7.1f}x the floor")
        else:
            out.append(f"{r['kernel']:<18}{r['backend']:<8}  unavailable: {r['reason']}")
    return out
