"""PyTorch references for every kernel: slow, obvious, and what the tests compare against."""

from __future__ import annotations

import torch

GROUP = 32  # weights per GGUF block


def dequant_q4_1(
    qs: torch.Tensor,  # (N, K/2) uint8, llama.cpp nibble order within each 16-byte block
    d: torch.Tensor,  # (N, K/32) float32
    m: torch.Tensor,  # (N, K/32) float32
) -> torch.Tensor:  # (N, K) float32, w = d*q + m
    N = qs.shape[0]
    blocks = qs.view(N, -1, 16).to(torch.int32)  # (N, B, 16)
    q = torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).float()  # (N, B, 32): element j, then j+16
    return (d[..., None] * q + m[..., None]).reshape(N, -1)


def dequant_q8_0(
    qs: torch.Tensor,  # (N, K) int8
    d: torch.Tensor,  # (N, K/32) float32
) -> torch.Tensor:  # (N, K) float32, w = d*q
    N = qs.shape[0]
    return (d[..., None] * qs.view(N, -1, GROUP).float()).reshape(N, -1)


def quant_linear_ref(
    x: torch.Tensor,  # (M, K) float32
    kind: str,  # "q4_1" or "q8_0"
    qs: torch.Tensor,
    d: torch.Tensor,
    m: torch.Tensor | None,
) -> torch.Tensor:  # (M, N)
    w = dequant_q4_1(qs, d, m) if kind == "q4_1" else dequant_q8_0(qs, d)  # type: ignore[arg-type]
    return x @ w.T
