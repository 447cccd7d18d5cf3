"""The fused layer kernels and an EAGLE draft pass's two ends (kernels/layer_triton.py,
attention_triton.py, draft_triton.py) against their PyTorch twins (kernels/layer_reference.py), on
random inputs of one layer's shapes (notebook 3C).

Per operation: the largest difference from the twin relative to the output's scale, against the
dtype's tolerance (the argmax: how far the logit it chose lies below the best); whether a launch
called off by its `only_if` flag left the cache, the attention's counters and the argmax's scratch
as they were; and on a GPU each side's time (microseconds a call). On a CPU the Triton kernels run
in the interpreter: checked, not timed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from labkit.bench.kernels import time_call

TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # relative to the output's scale


@dataclass
class FusedCheckConfig:
    dim: int = 96  # the layer's width (SmolLM2: 576)
    n_heads: int = 6
    n_kv_heads: int = 2
    head_dim: int = 32
    hidden: int = 80  # the MLP's width (SmolLM2: 1536)
    cache_len: int = 48  # cache positions; the rows sit at the end of the filled part
    rows: int = 5  # tokens per call (a verify of K + 1)
    vocab: int = 200  # embedding rows
    draft_vocab: int = 120  # the draft head's rows (FR-Spec's reduced vocabulary)
    seed: int = 0
    repeats: int = 20  # timing samples on a GPU


def triton_runs(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device`, or None: CUDA, or the CPU under TRITON_INTERPRET=1."""
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed"
        return None
    return "on a CPU the Triton kernels need TRITON_INTERPRET=1"


def _inputs(cfg: FusedCheckConfig, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    g = torch.Generator().manual_seed(cfg.seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    D, M = cfg.head_dim, cfg.rows
    angles = torch.rand(cfg.cache_len, D // 2, generator=g) * 6
    return dict(
        x=rnd(M, cfg.dim), norm_w=(1 + 0.1 * torch.randn(cfg.dim, generator=g)).to(dtype).to(device),
        w_qkv=rnd((cfg.n_heads + 2 * cfg.n_kv_heads) * D, cfg.dim, scale=cfg.dim**-0.5),
        cos=torch.cat([angles.cos()] * 2, -1).to(dtype).to(device), sin=torch.cat([-angles.sin(), angles.sin()], -1).to(dtype).to(device),
        pos=torch.arange(cfg.cache_len - M - 3, cfg.cache_len - 3, device=device),
        k_cache=rnd(1, cfg.n_kv_heads, cfg.cache_len, D), v_cache=rnd(1, cfg.n_kv_heads, cfg.cache_len, D),
        q=rnd(M, cfg.n_heads, D), attn=rnd(M, cfg.n_heads * D), w_o=rnd(cfg.dim, cfg.n_heads * D, scale=(cfg.n_heads * D) ** -0.5),
        w_gate_up=rnd(2 * cfg.hidden, cfg.dim, scale=cfg.dim**-0.5), tokens=torch.randint(0, cfg.vocab, (M,), generator=g).to(device),
        embed=rnd(cfg.vocab, cfg.dim), w_fc=rnd(cfg.dim, 2 * cfg.dim, scale=(2 * cfg.dim) ** -0.5),
        head=rnd(cfg.draft_vocab, cfg.dim, scale=cfg.dim**-0.5), ids=torch.randperm(cfg.vocab, generator=g)[: cfg.draft_vocab].to(device),
    )


def _calls(cfg: FusedCheckConfig, a: dict[str, Any], device: torch.device) -> dict[str, Callable[..., Any]]:
    """Each operation as ops, state, flag -> its output; `state` holds the buffers it writes or counts in."""
    tiles = cfg.n_kv_heads * -(-cfg.rows * (cfg.n_heads // cfg.n_kv_heads) // 16)  # the attention's (kv head, block of 16 rows)
    counters = lambda: torch.zeros(tiles, dtype=torch.int32, device=device)  # noqa: E731
    scratch = lambda: (torch.zeros(max(16, cfg.rows), dtype=torch.long, device=device),  # noqa: E731
                       torch.zeros(cfg.rows // 16 + 1, dtype=torch.int32, device=device))

    def qkv(ops: Any, st: dict[str, Any], **flag: Any) -> torch.Tensor:
        st.update(k_cache=a["k_cache"].clone(), v_cache=a["v_cache"].clone())
        return ops.norm_qkv_rope(a["x"], a["norm_w"], 1e-5, a["w_qkv"], None, a["cos"], a["sin"], a["pos"], st["k_cache"], st["v_cache"],
                                 cfg.n_heads, **flag)

    def attention(ops: Any, st: dict[str, Any], **flag: Any) -> torch.Tensor:
        st.update(counters=counters())
        return ops.decode_attention(a["q"], a["k_cache"], a["v_cache"], a["pos"], cfg.head_dim**-0.5, None, st["counters"], **flag)

    def argmax(ops: Any, st: dict[str, Any], **flag: Any) -> torch.Tensor:
        st.update(scratch=scratch())
        return ops.draft_argmax(a["x"], a["head"], a["ids"], st["scratch"], **flag)

    return {
        "norm_qkv_rope": qkv,
        "decode_attention": attention,
        "linear_residual": lambda ops, st, **flag: ops.linear_residual(a["attn"], a["w_o"], None, a["x"], **flag),
        "norm_gate_up": lambda ops, st, **flag: ops.norm_gate_up(a["x"], a["norm_w"], 1e-5, a["w_gate_up"], None, **flag),
        "embed_fc": lambda ops, st, **flag: ops.embed_fc(a["tokens"], a["embed"], a["x"], a["w_fc"], **flag),
        "draft_argmax": argmax,
    }


def _difference(name: str, got: torch.Tensor, want: torch.Tensor, a: dict[str, Any]) -> float:
    """The largest difference relative to the output's scale; for the argmax, the chosen logit's gap to the best."""
    if name == "draft_argmax":
        logits = a["x"].float() @ a["head"].float().T  # (M, N)
        chosen = logits.gather(1, (a["ids"][None, :] == got[:, None]).float().argmax(1, keepdim=True))[:, 0]
        return ((logits.max(1).values - chosen).max() / (logits.abs().max() + 1.0)).item()
    return ((got.float() - want.float()).abs().max() / (want.float().abs().max() + 1.0)).item()


def run_fused_check(device: torch.device, dtype: torch.dtype, cfg: FusedCheckConfig | None = None) -> list[dict[str, Any]]:
    """One row per operation (module docstring). Raises RuntimeError where Triton cannot run."""
    why = triton_runs(device)
    if why is not None:
        raise RuntimeError(why)
    from labkit.kernels import layer_reference as twin
    from labkit.kernels import layer_triton as fused

    cfg = cfg or FusedCheckConfig()
    a = _inputs(cfg, device, dtype)
    off = torch.zeros(1, dtype=torch.bool, device=device)
    rows = []
    for name, call in _calls(cfg, a, device).items():
        st_fused: dict[str, Any] = {}
        st_twin: dict[str, Any] = {}
        got, want = call(fused, st_fused), call(twin, st_twin)
        diff = max([_difference(name, got, want, a)] + [_difference(k, st_fused[k], st_twin[k], a) for k in ("k_cache", "v_cache") if k in st_fused])
        st_off: dict[str, Any] = {}
        call(fused, st_off, only_if=off)
        untouched = all(torch.equal(st_off[k], a[k]) for k in ("k_cache", "v_cache") if k in st_off)
        untouched = untouched and all(not t.any() for k in ("counters", "scratch") if k in st_off
                                      for t in (st_off[k] if isinstance(st_off[k], tuple) else (st_off[k],)))
        row = {"op": name, "dtype": str(dtype).removeprefix("torch."), "max_rel_diff": diff, "tolerance": TOLERANCE[dtype],
               "matches": diff <= TOLERANCE[dtype], "called_off_untouched": untouched, "triton_us": None, "twin_us": None}
        if device.type == "cuda":
            row["triton_us"] = time_call(functools.partial(call, fused, {}), device, cfg.repeats) * 1e6
            row["twin_us"] = time_call(functools.partial(call, twin, {}), device, cfg.repeats) * 1e6
        rows.append(row)
    return rows
