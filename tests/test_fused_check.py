"""bench/fused_ops.py (notebook 3C): the fused kernels against their twins, and calls called off."""

from __future__ import annotations

import os

import pytest
import torch

from labkit.bench.fused_ops import FusedCheckConfig, run_fused_check

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                  reason="Triton needs CUDA or TRITON_INTERPRET=1")


@needs_triton
def test_every_fused_op_matches_its_twin_and_a_called_off_launch_touches_nothing() -> None:
    rows = run_fused_check(DEVICE, torch.float32, FusedCheckConfig(rows=3))
    assert [r["op"] for r in rows] == ["norm_qkv_rope", "decode_attention", "linear_residual", "norm_gate_up", "embed_fc", "draft_argmax"]
    assert all(r["matches"] and r["called_off_untouched"] for r in rows), rows
    assert all((r["triton_us"] is not None) == (DEVICE.type == "cuda") for r in rows)


@needs_triton
def test_a_twin_that_drifts_is_reported(monkeypatch) -> None:
    """The check can fail: a twin off by 0.1% (past fp32's tolerance) is reported, the others not."""
    from labkit.kernels import layer_reference

    real = layer_reference.linear_residual
    monkeypatch.setattr(layer_reference, "linear_residual", lambda *a, **k: real(*a, **k) * 1.001)
    rows = {r["op"]: r for r in run_fused_check(DEVICE, torch.float32, FusedCheckConfig(rows=3))}
    assert not rows["linear_residual"]["matches"] and rows["norm_gate_up"]["matches"]


@needs_triton
def test_a_launch_that_ignores_its_flag_is_reported(monkeypatch) -> None:
    from labkit.kernels import layer_triton

    real = layer_triton.norm_qkv_rope
    monkeypatch.setattr(layer_triton, "norm_qkv_rope", lambda *a, only_if=None, **k: real(*a, **k))
    rows = {r["op"]: r for r in run_fused_check(DEVICE, torch.float32, FusedCheckConfig(rows=3))}
    assert not rows["norm_qkv_rope"]["called_off_untouched"] and rows["decode_attention"]["called_off_untouched"]


def test_without_triton_here_it_says_why(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        run_fused_check(torch.device("cpu"), torch.float32)
