"""A compact Llama-family forward: Llama, SmolLM2, Mistral, Qwen2.

RMSNorm, RoPE (with whatever rope scaling the config asks for: the inverse frequencies are
taken from the Hugging Face model itself), grouped-query attention, SwiGLU, tied or untied
head. q/k/v and gate/up are fused into one matmul each, which matters at batch size 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from labkit.kernels.layer_cpu import LayerTensors
from labkit.models.kvcache import CAUSAL, KVCache, Mask, RowSpans, TreeAttention, attend, attend_rows

# Fused layer kernels serve steps of up to this many tokens (decode, verify), and a prompt's causal pass up to their
# op set's PROMPT_MAX_T; a longer input runs through the PyTorch layers: cuBLAS GEMMs and flash attention, in one pass.
FUSED_MAX_T = 16


@dataclass
class LlamaArgs:
    vocab_size: int
    dim: int  # hidden size
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads means grouped-query attention
    head_dim: int
    hidden_dim: int  # MLP intermediate size
    norm_eps: float
    context_len: int  # max_position_embeddings
    qkv_bias: bool = False  # Qwen2 has it
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = True
    sliding_window: int | None = None  # Mistral-style local attention
    rope_scaling: float = 1.0  # HF's attention_scaling, multiplied into cos and sin

    @classmethod
    def from_hf(cls, config: Any, state_dict: dict[str, torch.Tensor], attention_scaling: float) -> LlamaArgs:
        n_heads = config.num_attention_heads
        window = getattr(config, "sliding_window", None)
        if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
            window = None
        return cls(
            vocab_size=config.vocab_size,
            dim=config.hidden_size,
            n_layers=config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // n_heads,
            hidden_dim=config.intermediate_size,
            norm_eps=config.rms_norm_eps,
            context_len=config.max_position_embeddings,
            qkv_bias="model.layers.0.self_attn.q_proj.bias" in state_dict,
            o_bias="model.layers.0.self_attn.o_proj.bias" in state_dict,
            mlp_bias="model.layers.0.mlp.up_proj.bias" in state_dict,
            tie_embeddings="lm_head.weight" not in state_dict
            or state_dict["lm_head.weight"].data_ptr() == state_dict["model.embed_tokens.weight"].data_ptr(),
            sliding_window=window,
            rope_scaling=float(attention_scaling),
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Half precision: normalise in fp32, round, then scale, the order HF uses.
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def apply_rope(
    x: torch.Tensor,  # (B, T, H, D)
    cos: torch.Tensor,  # (T, 1, D)
    sin_signed: torch.Tensor,  # (T, 1, D): sin with its first half negated
) -> torch.Tensor:
    # rotate_half(x) * sin == roll(x, D/2) * [-sin_lo, sin_hi]: one roll instead of slices and a cat
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


class LlamaBlock(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        qkv_dim = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.wqkv = nn.Linear(args.dim, qkv_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        self.mlp_norm = RMSNorm(args.dim, args.norm_eps)
        self.w_gate_up = nn.Linear(args.dim, 2 * args.hidden_dim, bias=args.mlp_bias)
        self.w_down = nn.Linear(args.hidden_dim, args.dim, bias=args.mlp_bias)
        self.scale = 1.0 / math.sqrt(args.head_dim)
        self.sliding_window = args.sliding_window

    def forward(
        self,
        x: torch.Tensor,  # (B, T, dim)
        cos: torch.Tensor,  # (T, 1, D), or (B, T, 1, D) for rows at their own positions
        sin: torch.Tensor,  # (T, 1, D), or (B, T, 1, D)
        cache: KVCache,
        layer: int,
        input_pos: torch.Tensor,  # (T,), or (B, T)
        attend_len: int,
        mask: Mask,  # (T, S) bool, CAUSAL, None, or RowSpans with input_pos (B, T)
    ) -> torch.Tensor:  # (B, T, dim)
        B, T, _ = x.shape
        nh, nkv = self.n_heads, self.n_kv_heads
        qkv = self.wqkv(self.attn_norm(x)).view(B, T, nh + 2 * nkv, self.head_dim)
        qk = apply_rope(qkv[:, :, : nh + nkv], cos, sin)  # (B, T, nh+nkv, D)
        q = qk[:, :, :nh].transpose(1, 2)  # (B, nh, T, D)
        k = qk[:, :, nh:].transpose(1, 2)  # (B, nkv, T, D)
        v = qkv[:, :, nh + nkv :].transpose(1, 2)  # (B, nkv, T, D)
        k_all, v_all = cache.update(layer, input_pos, k, v, attend_len)  # (B, nkv, S, D)
        if isinstance(mask, RowSpans):
            y = attend_rows(q, k_all, v_all, mask, self.scale, self.sliding_window)  # (B, nh, T, D)
        else:
            y = attend(q, k_all, v_all, mask, self.scale)  # (B, nh, T, D)
        x = x + self.wo(y.transpose(1, 2).reshape(B, T, nh * self.head_dim))
        gate, up = self.w_gate_up(self.mlp_norm(x)).chunk(2, dim=-1)  # (B, T, hidden) each
        return x + self.w_down(F.silu(gate) * up)

    def forward_fused(
        self,
        ops: Any,  # labkit.kernels.layer_triton or layer_reference
        x: torch.Tensor,  # (B, T, dim)
        cos: torch.Tensor,  # (S, D) the whole rope table: the kernel reads row input_pos[t]
        sin: torch.Tensor,  # (S, D)
        cache: KVCache,
        layer: int,
        input_pos: torch.Tensor,  # (T,)
        attend_len: int,  # keys a kept query may see: [0, attend_len)
        tree: TreeAttention | None = None,  # a token tree's nodes (input_pos: their slots)
    ) -> torch.Tensor:  # (B, T, dim)
        """The same layer in five fused operations; attention reads keys up to each query's
        position straight from the cache, so no mask is built (a tree's mask is T x T)."""
        B, T, dim = x.shape
        x2 = x.reshape(B * T, dim)  # (M, dim)
        k_cache, v_cache = cache.k_layers[layer], cache.v_layers[layer]  # (B, nkv, S, D)
        tree_args = {} if tree is None else {"tree_base": tree.base, "tree_mask": tree.mask}
        q = ops.norm_qkv_rope(x2, self.attn_norm.weight, self.attn_norm.eps, self.wqkv.weight, self.wqkv.bias,
                              cos, sin, input_pos, k_cache, v_cache, self.n_heads,
                              *(() if tree is None else (tree.rope_pos,)))  # (M, nh, D)
        y = ops.decode_attention(q, k_cache, v_cache, input_pos, self.scale, self.sliding_window, cache.counters[layer], attend_len,
                                 **tree_args)  # (M, nh*D)
        x2 = ops.linear_residual(y, self.wo.weight, self.wo.bias, x2)  # (M, dim)
        h = ops.norm_gate_up(x2, self.mlp_norm.weight, self.mlp_norm.eps, self.w_gate_up.weight, self.w_gate_up.bias)
        return ops.linear_residual(h, self.w_down.weight, self.w_down.bias, x2).view(B, T, dim)

    def fused_tensors(self) -> LayerTensors:
        """What an op set that runs a whole stack in one call (STACKS) reads of this layer."""
        return LayerTensors(self.attn_norm.weight, self.mlp_norm.weight, self.attn_norm.eps, (self.wqkv.weight, self.wqkv.bias),
                            (self.wo.weight, self.wo.bias), (self.w_gate_up.weight, self.w_gate_up.bias), (self.w_down.weight, self.w_down.bias))


class Llama(nn.Module):
    family = "llama"  # models/families.py
    inv_freq: torch.Tensor

    def __init__(self, args: LlamaArgs, inv_freq: torch.Tensor) -> None:
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(LlamaBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", inv_freq.detach().float().clone(), persistent=False)  # (D/2,)
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None
        self.layer_ops: Any = None  # a fused-kernel module (engine.pick_layer_ops), or None for the layers above
        self._stack_tensors: list[LayerTensors] = []  # forward_stack's, for the op set in _stack_ops
        self._stack_ops: Any = None
        self.fused_max_t = FUSED_MAX_T  # steps of up to this many tokens run through layer_ops, longer ones through the layers
        self.keep_hidden = False  # keep the final hidden state of full passes (draft heads read it)
        self.keep_every_hidden = False  # ... of every position of a pass that returns the last row's logits only (EAGLE)
        self.last_hidden: torch.Tensor | None = None  # (B, T or 1, dim) after the final norm

    def runs_fused(self, T: int, prompt: bool = False) -> bool:
        """Whether a step of T tokens runs through the fused layer kernels (which need no mask); a
        prompt's causal pass (mask CAUSAL) also up to the op set's PROMPT_MAX_T where it has one."""
        return self.layer_ops is not None and (T <= self.fused_max_t or prompt and T <= getattr(self.layer_ops, "PROMPT_MAX_T", 0))

    def setup_rope(self, max_len: int) -> None:
        """Tables for positions [0, max_len), computed in fp32 and rounded to the weights' dtype."""
        inv_freq = self.inv_freq.to(torch.float32)  # (D/2,)
        freqs = torch.outer(torch.arange(max_len, device=inv_freq.device, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (S, D)
        dtype = self.embed.weight.dtype
        half = inv_freq.shape[0]
        sin = emb.sin() * self.args.rope_scaling
        sin[:, :half] = -sin[:, :half]
        self.cos = (emb.cos() * self.args.rope_scaling).to(dtype)  # (S, D)
        self.sin = sin.to(dtype)  # (S, D), first half negated: see apply_rope

    def forward(
        self,
        tokens: torch.Tensor,  # (B, T)
        input_pos: torch.Tensor,  # (T,), or (B, T): each row at its own positions (PyTorch layers, mask a RowSpans)
        cache: KVCache,
        attend_len: int,
        mask: Mask,  # (T, attend_len) bool, CAUSAL, RowSpans, or None when every key is visible (unused by fused layers)
        last_only: bool | torch.Tensor = False,  # True: logits of the last row only; a (1,) tensor: of that row
        n_layers: int | None = None,  # run only the first n layers, then the head (layer-skip drafts)
        tree: TreeAttention | None = None,  # a token tree's nodes at slots input_pos (T,); mask: the tree's, for PyTorch layers
    ) -> torch.Tensor:  # (B, T or 1, vocab)
        assert self.cos is not None and self.sin is not None, "call setup_rope first"
        x = self.embed(tokens)  # (B, T, dim)
        n = self.args.n_layers if n_layers is None else n_layers
        # rows at their own positions (input_pos (B, T)) run fused where the kernels take them; trees where they take trees
        fused_ok = self.layer_ops is not None and (input_pos.dim() == 1 or self.layer_ops.ROW_POSITIONS)
        fused_ok = fused_ok and (tree is None or getattr(self.layer_ops, "TREES", False))
        fused_ok = fused_ok and self.runs_fused(tokens.shape[1], prompt=isinstance(mask, str) and mask == CAUSAL)
        if fused_ok and getattr(self.layer_ops, "STACKS", False):
            x = self.forward_stack(x, cache, input_pos, n, tree)
        elif fused_ok:
            for i in range(n):
                block: LlamaBlock = self.layers[i]  # type: ignore[assignment]
                x = block.forward_fused(self.layer_ops, x, self.cos, self.sin, cache, i, input_pos, attend_len, tree)
        else:
            rope_pos = input_pos if tree is None else tree.rope_pos
            cos = self.cos[rope_pos].unsqueeze(-2)  # (T, 1, D) or (B, T, 1, D)
            sin = self.sin[rope_pos].unsqueeze(-2)
            for i in range(n):
                x = self.layers[i](x, cos, sin, cache, i, input_pos, attend_len, mask)
        keep = self.keep_hidden and n == self.args.n_layers
        if keep and self.keep_every_hidden and (isinstance(last_only, torch.Tensor) or last_only):
            if fused_ok and tokens.shape[1] > self.fused_max_t:  # a fused prompt pass: every row through the fused head
                # (an LM head over every row), so the hidden states kept are the bits its 16-token steps keep (batched admission's)
                return self._rows_picked(self._fused_head(x, True), last_only)
            self.last_hidden, keep = self.norm(x), False  # (B, T, dim): every row's, before the last is picked
        if isinstance(last_only, torch.Tensor) or last_only:
            x = self._rows_picked(x, last_only)  # (B, 1, dim)
        if fused_ok:  # the final norm and the head in one fused operation
            return self._fused_head(x, keep)
        h = self.norm(x)  # (B, T or 1, dim)
        if keep:
            self.last_hidden = h
        return self.lm_head(h)

    def _fused_head(self, x: torch.Tensor, keep: bool) -> torch.Tensor:  # x (B, T, dim) -> logits (B, T, vocab)
        """The final norm and the LM head in one fused operation (its normed rows kept as last_hidden where `keep`)."""
        B, T, dim = x.shape
        logits, h = self.layer_ops.norm_head(x.reshape(B * T, dim).contiguous(), self.norm.weight, self.norm.eps,
                                             self.lm_head.weight, keep)  # (B*T, vocab), (B*T, dim) or None
        if keep:
            assert h is not None
            self.last_hidden = h.view(B, T, dim)
        return logits.view(B, T, -1)

    @staticmethod
    def _rows_picked(x: torch.Tensor, last_only: bool | torch.Tensor) -> torch.Tensor:  # (B, T, ...) -> (B, 1, ...)
        return x.index_select(1, last_only) if isinstance(last_only, torch.Tensor) else x[:, -1:]

    def forward_stack(self, x: torch.Tensor, cache: KVCache, input_pos: torch.Tensor, n: int,
                       tree: TreeAttention | None) -> torch.Tensor:  # x (B, T, dim) → (B, T, dim)
        """The first n layers in one call of the op set (the CPU's decode_layers)."""
        if self._stack_ops is not self.layer_ops:  # the tensors each layer hands over, gathered once per op set
            self._stack_tensors, self._stack_ops = [block.fused_tensors() for block in self.layers], self.layer_ops  # type: ignore[operator]
        first: LlamaBlock = self.layers[0]  # type: ignore[assignment]
        B, T, dim = x.shape
        out = self.layer_ops.decode_layers(x.reshape(B * T, dim), self._stack_tensors[:n], cache.k_layers, cache.v_layers, self.cos, self.sin,
                                           input_pos, first.n_heads, first.scale, first.sliding_window, tree)
        return out.view(B, T, dim)

    @classmethod
    def from_hf(cls, hf_model: Any) -> Llama:
        """Build from a transformers Llama/Mistral/Qwen2 model; weights shared where not fused."""
        sd = hf_model.state_dict()
        rotary = hf_model.model.rotary_emb
        args = LlamaArgs.from_hf(hf_model.config, sd, getattr(rotary, "attention_scaling", 1.0))
        with torch.device("meta"):
            model = cls(args, torch.empty(args.head_dim // 2))
        ours: dict[str, torch.Tensor] = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
        for i in range(args.n_layers):
            p = f"model.layers.{i}."
            ours[f"layers.{i}.attn_norm.weight"] = sd[p + "input_layernorm.weight"]
            ours[f"layers.{i}.mlp_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
            for kind in ("weight", "bias") if args.qkv_bias else ("weight",):
                ours[f"layers.{i}.wqkv.{kind}"] = torch.cat([sd[p + f"self_attn.{n}_proj.{kind}"] for n in "qkv"])
            for kind in ("weight", "bias") if args.mlp_bias else ("weight",):
                ours[f"layers.{i}.w_gate_up.{kind}"] = torch.cat([sd[p + f"mlp.{n}_proj.{kind}"] for n in ("gate", "up")])
                ours[f"layers.{i}.w_down.{kind}"] = sd[p + f"mlp.down_proj.{kind}"]
            ours[f"layers.{i}.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
            if args.o_bias:
                ours[f"layers.{i}.wo.bias"] = sd[p + "self_attn.o_proj.bias"]
        ours["lm_head.weight"] = sd["model.embed_tokens.weight"] if args.tie_embeddings else sd["lm_head.weight"]
        model.load_state_dict(ours, assign=True, strict=True)
        if args.tie_embeddings:
            model.lm_head.weight = model.embed.weight
        model.inv_freq = rotary.inv_freq.detach().float().clone()
        return model


def count_params(config: Any) -> int:
    """Parameters from a Llama-family config alone (no weights loaded)."""
    d, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    _, kv, hd = kv_shape(config)
    heads = config.num_attention_heads
    inter = config.intermediate_size
    attn = d * heads * hd * 2 + d * kv * hd * 2
    if getattr(config, "attention_bias", False) or config.model_type == "qwen2":
        attn += heads * hd + 2 * kv * hd  # q, k, v biases
    if getattr(config, "attention_bias", False):
        attn += d  # o_proj bias (Llama's attention_bias)
    mlp = 3 * d * inter + ((2 * inter + d) if getattr(config, "mlp_bias", False) else 0)
    head = 0 if getattr(config, "tie_word_embeddings", True) else V * d
    return V * d + head + L * (attn + mlp + 2 * d) + d


def kv_shape(config: Any) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a Llama-family config."""
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, kv, hd
