"""Running the embedded model from the GGUF's own quantised blocks.

The default model ships as Q4_1 (token embedding Q8_0). Transformers dequantises it to fp32,
so HF `generate` reads 4 bytes per weight per token; reading the blocks reads ~0.6. The values
are the same: a QuantLinear holds the GGUF blocks for small batches (decode, verify) and the
dequantised weight for large ones (prefill), and both give the weights HF uses.

llama.cpp stores q and k rows permuted for its rope layout; transformers un-permutes them on
load, and so do we (rows only: the 32-weight blocks run along the input dimension).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from labkit.errors import LabkitError
from labkit.kernels import cpu_quant
from labkit.kernels.reference import dequant_q4_1, dequant_q8_0

BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}  # per 32 weights: fp16 d (+ fp16 m) + quants


@dataclass
class QuantWeight:
    kind: str  # "q4_1" or "q8_0"
    qs: torch.Tensor  # q4_1: (N, K/2) uint8; q8_0: (N, K) int8
    d: torch.Tensor  # (N, K/32) float32
    m: torch.Tensor | None  # (N, K/32) float32, q4_1 only

    def dequantize(self) -> torch.Tensor:  # (N, K) float32
        return dequant_q4_1(self.qs, self.d, self.m) if self.kind == "q4_1" else dequant_q8_0(self.qs, self.d)  # type: ignore[arg-type]

    def take_rows(self, index: torch.Tensor) -> QuantWeight:
        return QuantWeight(self.kind, self.qs[index], self.d[index], None if self.m is None else self.m[index])

    @staticmethod
    def cat(parts: list[QuantWeight]) -> QuantWeight:
        kinds = {p.kind for p in parts}
        assert len(kinds) == 1, kinds
        m = None if parts[0].m is None else torch.cat([p.m for p in parts if p.m is not None])
        return QuantWeight(parts[0].kind, torch.cat([p.qs for p in parts]), torch.cat([p.d for p in parts]), m)


def quantize_q8_0(w: torch.Tensor) -> QuantWeight:  # (N, K) float, K a multiple of 32
    """GGUF's Q8_0 of a dense weight: per block of 32, d = max |w| / 127 kept as a float16 (rounded up, so
    no |q| passes 127) and q = round(w / d)."""
    N, K = w.shape
    if K % 32:
        raise LabkitError(f"Q8_0 blocks take rows of a multiple of 32 weights, got {K}")
    blocks = w.detach().float().cpu().reshape(N, K // 32, 32)  # (N, B, 32)
    exact = blocks.abs().amax(-1) / 127  # (N, B)
    d = exact.half().float()
    d = torch.where(d < exact, torch.nextafter(d.half(), torch.tensor(torch.inf, dtype=torch.half)).float(), d)  # (N, B), float16 values
    qs = torch.where(d[..., None] > 0, blocks / d.clamp(min=torch.finfo(torch.float32).tiny)[..., None], 0.0)
    return QuantWeight("q8_0", qs.round().clamp(-127, 127).to(torch.int8).reshape(N, K), d, None)


def block_linear(dense: nn.Linear) -> QuantLinear:
    """A QuantLinear over the Q8_0 blocks of a dense layer, its dense weight set to their values."""
    qw = quantize_q8_0(dense.weight)
    with torch.no_grad():
        dense.weight.copy_(qw.dequantize())
    return QuantLinear(dense, qw)


def _from_blocks(kind: str, raw: np.ndarray) -> QuantWeight:
    """raw: (N, B * block_bytes) uint8 as GGUFReader gives it."""
    N = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(N, -1, BLOCK_BYTES[kind])  # (N, B, bytes)
    d = torch.from_numpy(blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32))  # (N, B)
    if kind == "Q4_1":
        m = torch.from_numpy(blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
        qs = torch.from_numpy(blocks[:, :, 4:20].reshape(N, -1).copy())  # (N, K/2) uint8
        return QuantWeight("q4_1", qs, d, m)
    qs = torch.from_numpy(blocks[:, :, 2:34].reshape(N, -1).copy().view(np.int8))  # (N, K) int8
    return QuantWeight("q8_0", qs, d, None)


def read_gguf_blocks(path: Path) -> dict[str, QuantWeight]:
    """Every Q4_1 / Q8_0 tensor of a GGUF file, by its GGUF name, rows as stored."""
    from gguf import GGUFReader

    out = {}
    for tensor in GGUFReader(path).tensors:
        kind = tensor.tensor_type.name
        if kind in BLOCK_BYTES:
            out[tensor.name] = _from_blocks(kind, np.asarray(tensor.data))
    return out


def unpermute_rows(n_rows: int, n_heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (what transformers applies on load)."""
    half = n_rows // n_heads // 2
    return torch.arange(n_rows).view(n_heads, half, 2).transpose(1, 2).reshape(-1)


def llama_blocks(path: Path, n_layers: int, n_heads: int, n_kv_heads: int) -> dict[str, QuantWeight]:
    """GGUF blocks keyed by labkit Llama parameter names (fused like our model)."""
    raw = read_gguf_blocks(path)
    out: dict[str, QuantWeight] = {}
    try:
        for i in range(n_layers):
            p = f"blk.{i}."
            q = raw[p + "attn_q.weight"]
            k = raw[p + "attn_k.weight"]
            q = q.take_rows(unpermute_rows(q.qs.shape[0], n_heads))
            k = k.take_rows(unpermute_rows(k.qs.shape[0], n_kv_heads))
            out[f"layers.{i}.wqkv"] = QuantWeight.cat([q, k, raw[p + "attn_v.weight"]])
            out[f"layers.{i}.wo"] = raw[p + "attn_output.weight"]
            out[f"layers.{i}.w_gate_up"] = QuantWeight.cat([raw[p + "ffn_gate.weight"], raw[p + "ffn_up.weight"]])
            out[f"layers.{i}.w_down"] = raw[p + "ffn_down.weight"]
        out["lm_head"] = raw.get("output.weight") or raw["token_embd.weight"]
    except KeyError as err:
        raise LabkitError(f"the GGUF file has no quantised tensor {err}; run it with dense weights") from None
    return out


class QuantLinear(nn.Module):
    """A linear layer that reads GGUF blocks for up to `max_rows` rows, the dense weight beyond; on the q8 tiles
    (--weights gguf-q8 where the build has them) for any rows: a prompt's too, eight rows a pass over the tiles."""

    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None

    def __init__(self, dense: nn.Linear, qw: QuantWeight) -> None:
        super().__init__()
        self.weight = dense.weight  # (N, K): the same values, dequantised (prefill path)
        self.bias = dense.bias
        self.kind = qw.kind
        self.register_buffer("qs", qw.qs, persistent=False)
        self.register_buffer("d", qw.d, persistent=False)
        self.register_buffer("m", qw.m, persistent=False)
        self.max_rows = cpu_quant.max_rows()
        self.use_blocks = True  # False: the dense weight for every row count (set_block_weights)
        self.act = "fp32"  # the block products' activations: "q8", quantised per block of 32 (cpu_quant.ACTIVATIONS)
        self._tiles: cpu_quant.Q8Tiles | None = None  # the blocks tiled for the q8 products, made at their first use
        self._tiled = False

    def q8_tiles(self) -> cpu_quant.Q8Tiles | None:
        """The blocks as tiles for the 8-bit-activation products (kernels/cpu_q8_tiles.c), made once; None where
        this build has none. Every q8 product of this layer runs on them then, so a row's bits are one path's."""
        if not self._tiled:
            self._tiles, self._tiled = cpu_quant.tile_q8(self.kind, self.qs, self.d, self.m), True
        return self._tiles

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) → (..., N)
        rows = x.numel() // x.shape[-1]
        tiles = self.q8_tiles() if self.use_blocks and self.act == "q8" else None
        # a prompt's many rows: one dense GEMM beats row-at-a-time products (not the tiles, which take eight a pass)
        if not self.use_blocks or (rows > self.max_rows and tiles is None) or x.dtype != torch.float32 or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(rows, -1).contiguous()  # (rows, K)
        y = cpu_quant.quant_linear_tiles(x2, tiles) if tiles is not None else cpu_quant.quant_linear(x2, self.kind, self.qs, self.d, self.m, self.act)  # (rows, N)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], y.shape[-1])


def attach_gguf_blocks(model: nn.Module, path: Path) -> int:
    """Swap a labkit Llama's linears for QuantLinears over the GGUF's blocks; returns how many."""
    ok, reason = cpu_quant.available()
    if not ok:
        raise LabkitError(f"GGUF block weights need the CPU kernel, which is unavailable: {reason}")
    args: Any = cast(Any, model).args
    blocks = llama_blocks(path, args.n_layers, args.n_heads, args.n_kv_heads)
    swapped = 0
    for name, qw in blocks.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        dense = getattr(parent, attr)
        if tuple(dense.weight.shape) != (qw.qs.shape[0], qw.d.shape[1] * 32):
            raise LabkitError(f"GGUF tensor for {name} has shape {tuple(qw.qs.shape)}, the model expects {tuple(dense.weight.shape)}")
        setattr(parent, attr, QuantLinear(dense, qw))
        swapped += 1
    return swapped


def set_block_weights(model: nn.Module, on: bool, act: str = "fp32") -> int:
    """Let the model's QuantLinears read their blocks (on) or their dense weights (off): the same
    values either way, with act "fp32"; act "q8" rounds the blocks' activations to 8 bits (cpu_quant).
    Returns how many layers it set."""
    if act not in cpu_quant.ACTIVATIONS:
        raise LabkitError(f"the blocks' products take activations {' or '.join(cpu_quant.ACTIVATIONS)}, not {act!r}")
    layers = [module for module in model.modules() if isinstance(module, QuantLinear)]
    for layer in layers:
        layer.use_blocks, layer.act = on, act
    return len(layers)
