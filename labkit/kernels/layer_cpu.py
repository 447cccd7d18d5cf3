"""The fused layer operations on the CPU (kernels/cpu_layer.c), for an engine that reads the GGUF's
blocks: the same five operations, with the same signatures, as layer_triton.py and their PyTorch
reference layer_reference.py, so `LlamaBlock.forward_fused` runs either.

The operations receive a linear layer's dense weight, as the others do; this op set finds that
layer's blocks by the weight's storage (`CpuLayerOps(model)` indexes every QuantLinear of the
model once). fp32; rows are the step's tokens, of one batch row or of several, each at its own
positions in its own cache row (batched steps), through one operation or a whole stack of layers
in one call.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from labkit.errors import LabkitError
from labkit.kernels import cpu_quant

_p, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class BlockWeight(ctypes.Structure):
    """kernels/cpu_layer.c's block_weight: one linear layer's blocks, pointers into tensors the
    QuantLinear keeps alive."""

    _fields_ = [("kind", _i64), ("qs", _p), ("d", _p), ("m", _p), ("bias", _p), ("N", _i64), ("K", _i64)]


class LayerWeights(ctypes.Structure):
    """kernels/cpu_layer.c's layer_weights: one decoder layer for decode_layers."""

    _fields_ = [("attn_norm", _p), ("mlp_norm", _p), ("qkv", BlockWeight), ("o", BlockWeight), ("gate_up", BlockWeight),
                ("down", BlockWeight), ("k_cache", _p), ("v_cache", _p)]


@dataclass(frozen=True)
class LayerTensors:
    """What decode_layers reads of one decoder layer (llama.LlamaBlock.fused_tensors): the dense
    weights name the blocks, as in the five operations."""

    attn_norm: torch.Tensor  # (dim,)
    mlp_norm: torch.Tensor  # (dim,)
    eps: float
    qkv: tuple[torch.Tensor, torch.Tensor | None]  # weight ((nh + 2 nkv) D, dim), bias
    o: tuple[torch.Tensor, torch.Tensor | None]
    gate_up: tuple[torch.Tensor, torch.Tensor | None]
    down: tuple[torch.Tensor, torch.Tensor | None]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _bind(lib: ctypes.CDLL) -> None:
    w = ctypes.POINTER(BlockWeight)
    lib.norm_qkv_rope.argtypes = [_p, _i64, _i64, _p, _f32, w, _p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _p, _p, _p, _i64]
    lib.attention.argtypes = [_p, _i64, _p, _p, _i64, _p, _i64, _i64, _i64, _f32, _i64, _p, _p, _p, _i64, _i64, _i64]
    lib.linear_residual.argtypes = [_p, _i64, w, _p, _p]
    lib.norm_gate_up.argtypes = [_p, _i64, _i64, _p, _f32, w, _p, _p]
    lib.norm_head.argtypes = [_p, _i64, _i64, _p, _f32, w, _p, _p]
    for name in ("norm_qkv_rope", "attention", "linear_residual", "norm_gate_up", "norm_head"):
        getattr(lib, name).restype = None
    lib.decode_layers.argtypes = [_p, _i64, _i64, ctypes.POINTER(LayerWeights), _i64, _f32, _p, _p, _p, _p, _i64, _i64, _i64, _i64,
                                  _f32, _i64, _p, _i64, _i64, _i64]
    lib.decode_layers.restype = ctypes.c_int


class CpuLayerOps:
    """The op set over one model's block-weight linears (engine_choices.cpu_layers_unusable says when it applies)."""

    name = "cpu"
    ROW_POSITIONS = True  # batch rows at their own positions, each in its own cache row (batch/engine.py)
    TREES = True  # token trees: rope_pos apart from the slots, a tree mask in decode_attention
    STACKS = True  # decode_layers: a whole stack of layers in one call

    def __init__(self, linears: Iterable[Any]) -> None:
        """linears: the model's QuantLinear layers (a dense `weight`, its `bias`, the blocks `kind`, `qs`, `d`,
        `m`, their activations `act` and, for act "q8", `q8_tiles()`), whose storage they keep alive."""
        lib = cpu_quant.library()
        if lib is None:
            raise LabkitError(f"CPU layer operations: the CPU kernel is unavailable ({cpu_quant.available()[1]})")
        _bind(lib)
        self.lib = lib
        self._stacks: dict[tuple[int, ...], Any] = {}  # decode_layers' weight arrays, by layers and cache
        self._blocks: dict[int, tuple[BlockWeight, Any]] = {}
        for module in linears:
            N, K = module.weight.shape
            kind = (0 if module.kind == "q4_1" else 1) + (2 if module.act == "q8" else 0)  # cpu_layer.c's block_weight.kind
            tiles = module.q8_tiles() if module.act == "q8" else None  # (the module keeps them)
            if tiles is not None:  # kinds 4, 5: the q8 products over tiles
                blocks = BlockWeight(kind + 2, _ptr(tiles.qt), _ptr(tiles.dt), _ptr(tiles.extra), _ptr(module.bias), N, K)
            else:
                blocks = BlockWeight(kind, _ptr(module.qs), _ptr(module.d), _ptr(module.m), _ptr(module.bias), N, K)
            self._blocks[module.weight.data_ptr()] = (blocks, module)

    def _weight(self, w: torch.Tensor, bias: torch.Tensor | None) -> Any:
        return ctypes.byref(self._blocks_of(w, bias))

    def _blocks_of(self, w: torch.Tensor, bias: torch.Tensor | None) -> BlockWeight:
        found = self._blocks.get(w.data_ptr())
        if found is None:
            raise LabkitError("the CPU layer operations were handed a weight they hold no blocks for")
        blocks, module = found
        if _ptr(bias) != _ptr(module.bias):
            raise LabkitError("the CPU layer operations read the bias their blocks came with")
        return blocks

    @staticmethod
    def _check(*tensors: torch.Tensor) -> None:
        for t in tensors:
            if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.long) or not t.is_contiguous():
                raise LabkitError(f"the CPU layer operations take contiguous fp32 CPU tensors, got {t.dtype} {t.device} {tuple(t.stride())}")

    def norm_qkv_rope(self, x: torch.Tensor, norm_w: torch.Tensor, eps: float, w: torch.Tensor, bias: torch.Tensor | None,
                      cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      n_heads: int, rope_pos: torch.Tensor | None = None) -> torch.Tensor:  # x (M, dim), caches (B, NKV, S, D) → q (M, NH, D)
        """Rows are B batch rows of M / B tokens each, row b's written into cache row b at
        input_pos (T,) for all of them, or (B, T) each at its own (batch/engine.py)."""
        B, nkv, S, D = k_cache.shape
        M, dim = x.shape
        pos = self._row_positions(input_pos, B, M)
        self._check(x, norm_w, cos, sin, pos, k_cache, v_cache, *([] if rope_pos is None else [rope_pos]))
        if B > 1 and rope_pos is not None:
            raise LabkitError("the CPU layer operations take token trees at batch 1")
        q = torch.empty(M, n_heads, D)
        scratch = torch.empty(M * (dim + (n_heads + 2 * nkv) * D))
        self.lib.norm_qkv_rope(x.data_ptr(), M, dim, norm_w.data_ptr(), eps, self._weight(w, bias), cos.data_ptr(), sin.data_ptr(),
                               pos.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), S, n_heads, nkv, D, q.data_ptr(), scratch.data_ptr(),
                               _ptr(rope_pos), M // B)
        return q

    @staticmethod
    def _row_positions(input_pos: torch.Tensor, B: int, M: int) -> torch.Tensor:  # -> (M,) each row's position
        if M % B or input_pos.numel() not in (M, M // B):
            raise LabkitError(f"{M} rows over {B} cache rows at positions {tuple(input_pos.shape)}: not one batch row's tokens each")
        return (input_pos if input_pos.numel() == M else input_pos.reshape(1, -1).expand(B, -1)).reshape(M).contiguous()

    def decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, input_pos: torch.Tensor, scale: float,
                         window: int | None, counters: torch.Tensor | None = None, span: int | None = None,
                         tree_base: torch.Tensor | None = None, tree_mask: torch.Tensor | None = None) -> torch.Tensor:  # (M, NH*D)
        B, nkv, S, D = k_cache.shape
        M, nh, _ = q.shape
        pos = self._row_positions(input_pos, B, M)
        self._check(q, k_cache, v_cache, pos)
        if tree_mask is not None and (tree_mask.dtype != torch.int8 or not tree_mask.is_contiguous() or tree_mask.shape[0] != M):
            raise LabkitError(f"a tree mask is ({M}, N) contiguous int8, got {tuple(tree_mask.shape)} {tree_mask.dtype}")
        out = torch.empty(M, nh * D)
        scratch = torch.empty(M * nh * (S + 1))  # each (row, head)'s scores (only its visible positions touched), then its 1 / sum
        self.lib.attention(q.data_ptr(), M, k_cache.data_ptr(), v_cache.data_ptr(), S, pos.data_ptr(), nh, nkv, D, scale,
                           window or 0, out.data_ptr(), scratch.data_ptr(), _ptr(tree_mask),
                           0 if tree_base is None else int(tree_base), 0 if tree_mask is None else tree_mask.shape[1], M // B)
        return out

    def linear_residual(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
        self._check(x, residual)
        out = torch.empty(x.shape[0], w.shape[0])
        self.lib.linear_residual(x.data_ptr(), x.shape[0], self._weight(w, bias), residual.data_ptr(), out.data_ptr())
        return out

    def norm_gate_up(self, x: torch.Tensor, norm_w: torch.Tensor, eps: float, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        M, dim = x.shape
        self._check(x, norm_w)
        out = torch.empty(M, w.shape[0] // 2)
        scratch = torch.empty(M * (dim + w.shape[0]))
        self.lib.norm_gate_up(x.data_ptr(), M, dim, norm_w.data_ptr(), eps, self._weight(w, bias), out.data_ptr(), scratch.data_ptr())
        return out

    def norm_head(self, x: torch.Tensor, norm_w: torch.Tensor, eps: float, w: torch.Tensor,
                  keep_normed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:  # logits (M, vocab); RMSNorm(x) (M, dim) when kept
        M, dim = x.shape
        self._check(x, norm_w)
        logits, normed = torch.empty(M, w.shape[0]), torch.empty(M, dim)
        self.lib.norm_head(x.data_ptr(), M, dim, norm_w.data_ptr(), eps, self._weight(w, None), logits.data_ptr(), normed.data_ptr())
        return logits, normed if keep_normed else None

    def decode_layers(self, x: torch.Tensor, layers: Sequence[LayerTensors], k_layers: Sequence[torch.Tensor],
                      v_layers: Sequence[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor,
                      n_heads: int, scale: float, window: int | None, tree: Any = None) -> torch.Tensor:  # x (M, dim) → (M, dim)
        """The first four operations through every layer in `layers` in one call: the same
        functions in the same order as the per-layer calls, so the same bits. x is not changed.
        k_layers, v_layers: each layer's cache (B, nkv, S, D), x's rows B batch rows of M / B
        tokens at input_pos (T,) or (B, T) (norm_qkv_rope's rule); tree: a kvcache.TreeAttention
        (batch 1) or None."""
        M, dim = x.shape
        B, nkv, S, D = k_layers[0].shape
        if len({layer.eps for layer in layers}) != 1 or (B > 1 and tree is not None):
            raise LabkitError("decode_layers runs one norm epsilon, and token trees at batch 1")
        pos = self._row_positions(input_pos, B, M)
        rope_pos: torch.Tensor | None = None if tree is None else tree.rope_pos
        self._check(x, cos, sin, pos, k_layers[0], v_layers[0])  # the layers' caches: views of one tensor
        if rope_pos is not None:
            self._check(rope_pos)
        if tree is not None and (tree.mask.dtype != torch.int8 or not tree.mask.is_contiguous() or tree.mask.shape[0] != M):
            raise LabkitError(f"a tree mask is ({M}, N) contiguous int8, got {tuple(tree.mask.shape)} {tree.mask.dtype}")
        out = x.clone()
        status = self.lib.decode_layers(out.data_ptr(), M, dim, self._stack(layers, k_layers, v_layers), len(layers), layers[0].eps,
                                        cos.data_ptr(), sin.data_ptr(), pos.data_ptr(), _ptr(rope_pos), S, n_heads, nkv, D,
                                        scale, window or 0, None if tree is None else tree.mask.data_ptr(),
                                        0 if tree is None else int(tree.base), 0 if tree is None else tree.mask.shape[1], M // B)
        if status != 0:
            raise LabkitError(f"decode_layers could not allocate its scratch ({M} rows, a cache of {S})")
        return out

    def _stack(self, layers: Sequence[LayerTensors], k_layers: Sequence[torch.Tensor], v_layers: Sequence[torch.Tensor]) -> Any:
        """The layer_weights array for these layers and caches, built once (a grown cache is a new key)."""
        n = len(layers)
        key = (n, id(layers[0]), k_layers[0].data_ptr(), v_layers[0].data_ptr(), k_layers[n - 1].data_ptr(), v_layers[n - 1].data_ptr())
        found = self._stacks.get(key)
        if found is None:
            found = (LayerWeights * n)(*(
                LayerWeights(layer.attn_norm.data_ptr(), layer.mlp_norm.data_ptr(), self._blocks_of(*layer.qkv), self._blocks_of(*layer.o),
                             self._blocks_of(*layer.gate_up), self._blocks_of(*layer.down), k.data_ptr(), v.data_ptr())
                for layer, k, v in zip(layers, k_layers[:n], v_layers[:n], strict=True)))
            if len(self._stacks) >= 4:  # a few stacks (the whole model, a layer-skip draft's first layers), not every cache ever seen
                self._stacks.clear()
            self._stacks[key] = (found, layers)  # the layers kept alive beside their pointers
        return found[0]
