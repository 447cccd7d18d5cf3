"""A compact GPT-2 forward: learned positions, LayerNorm, fused qkv, GELU MLP, tied head."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from labkit.models.kvcache import KVCache, Mask, attend

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass
class GPT2Args:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int
    norm_eps: float
    context_len: int  # n_positions
    activation: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_by_inverse_layer_idx: bool = False
    sliding_window: int | None = None  # GPT-2 attends to its whole context

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_hf(cls, config: Any) -> GPT2Args:
        return cls(
            vocab_size=config.vocab_size,
            dim=config.n_embd,
            n_layers=config.n_layer,
            n_heads=config.n_head,
            hidden_dim=config.n_inner or 4 * config.n_embd,
            norm_eps=config.layer_norm_epsilon,
            context_len=config.n_positions,
            activation=config.activation_function,
            scale_attn_weights=config.scale_attn_weights,
            scale_by_inverse_layer_idx=config.scale_attn_by_inverse_layer_idx,
        )


class GPT2Block(nn.Module):
    def __init__(self, args: GPT2Args, layer: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = args.n_heads, args.head_dim
        self.ln_1 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.c_attn = nn.Linear(args.dim, 3 * args.dim)
        self.c_proj = nn.Linear(args.dim, args.dim)
        self.ln_2 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.c_fc = nn.Linear(args.dim, args.hidden_dim)
        self.mlp_proj = nn.Linear(args.hidden_dim, args.dim)
        self.act = ACTIVATIONS[args.activation]
        scale = 1.0 / math.sqrt(self.head_dim) if args.scale_attn_weights else 1.0
        self.scale = scale / (layer + 1) if args.scale_by_inverse_layer_idx else scale

    def forward(
        self,
        x: torch.Tensor,  # (B, T, dim)
        cache: KVCache,
        layer: int,
        input_pos: torch.Tensor,  # (T,)
        attend_len: int,
        mask: Mask,  # (T, S) bool, CAUSAL or None
    ) -> torch.Tensor:  # (B, T, dim)
        B, T, C = x.shape
        qkv = self.c_attn(self.ln_1(x)).view(B, T, 3, self.n_heads, self.head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, nh, T, D) each
        k_all, v_all = cache.update(layer, input_pos, k, v, attend_len)
        y = attend(q, k_all, v_all, mask, self.scale)  # (B, nh, T, D)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(self.act(self.c_fc(self.ln_2(x))))


class GPT2(nn.Module):
    """A learned-position pre-LayerNorm decoder: GPT-2, and OPT (models/opt.py) in GPT-2's shape."""

    learned_positions = True  # positions past the context have no embedding
    family = "gpt2"  # models/families.py (OPT's builder sets "opt")

    def __init__(self, args: GPT2Args) -> None:
        super().__init__()
        self.args = args
        self.wte = nn.Embedding(args.vocab_size, args.dim)
        self.wpe = nn.Embedding(args.context_len, args.dim)
        self.layers = nn.ModuleList(GPT2Block(args, i) for i in range(args.n_layers))
        self.ln_f = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.keep_hidden = False  # keep the final hidden state of full passes (draft heads read it)
        self.keep_every_hidden = False  # ... of every position of a pass that returns the last row's logits only (EAGLE)
        self.last_hidden: torch.Tensor | None = None  # (B, T or 1, dim) after the final norm
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)

    def setup_rope(self, max_len: int) -> None:
        """GPT-2 has learned positions: nothing to precompute."""

    def forward(
        self,
        tokens: torch.Tensor,  # (B, T)
        input_pos: torch.Tensor,  # (T,)
        cache: KVCache,
        attend_len: int,
        mask: Mask,  # (T, attend_len) bool, CAUSAL, or None when every key is visible
        last_only: bool | torch.Tensor = False,  # True: logits of the last row only; a (1,) tensor: of that row
        n_layers: int | None = None,  # run only the first n layers, then the head (layer-skip drafts)
    ) -> torch.Tensor:  # (B, T or 1, vocab)
        x = self.wte(tokens) + self.wpe(input_pos)  # (B, T, dim)
        n = self.args.n_layers if n_layers is None else n_layers
        for i in range(n):
            block = self.layers[i]
            x = block(x, cache, i, input_pos, attend_len, mask)
        keep = self.keep_hidden and n == self.args.n_layers
        if keep and self.keep_every_hidden and (isinstance(last_only, torch.Tensor) or last_only):
            self.last_hidden, keep = self.ln_f(x), False  # (B, T, dim): every row's, before the last is picked
        if isinstance(last_only, torch.Tensor):
            x = x.index_select(1, last_only)  # (B, 1, dim)
        elif last_only:
            x = x[:, -1:]
        h = self.ln_f(x)  # (B, T or 1, dim)
        if keep:
            self.last_hidden = h
        return self.lm_head(h)

    @classmethod
    def from_hf(cls, hf_model: Any) -> GPT2:
        sd = hf_model.state_dict()
        args = GPT2Args.from_hf(hf_model.config)
        with torch.device("meta"):
            model = cls(args)
        t = "transformer."
        ours = {
            "wte.weight": sd[t + "wte.weight"],
            "wpe.weight": sd[t + "wpe.weight"],
            "ln_f.weight": sd[t + "ln_f.weight"],
            "ln_f.bias": sd[t + "ln_f.bias"],
            "lm_head.weight": sd.get("lm_head.weight", sd[t + "wte.weight"]),
        }
        # HF's Conv1D stores (in, out); nn.Linear wants (out, in).
        names = {"ln_1": "ln_1", "ln_2": "ln_2", "c_attn": "attn.c_attn", "c_proj": "attn.c_proj", "c_fc": "mlp.c_fc", "mlp_proj": "mlp.c_proj"}
        for i in range(args.n_layers):
            for ours_name, hf_name in names.items():
                w = sd[f"{t}h.{i}.{hf_name}.weight"]
                ours[f"layers.{i}.{ours_name}.weight"] = w if ours_name.startswith("ln") else w.t().contiguous()
                ours[f"layers.{i}.{ours_name}.bias"] = sd[f"{t}h.{i}.{hf_name}.bias"]
        model.load_state_dict(ours, assign=True, strict=True)
        if ours["lm_head.weight"].data_ptr() == ours["wte.weight"].data_ptr():
            model.lm_head.weight = model.wte.weight
        return model


def count_params(config: Any) -> int:
    """Parameters from a GPT-2 config alone (no weights loaded)."""
    d, L, V, P = config.n_embd, config.n_layer, config.vocab_size, config.n_positions
    inner = config.n_inner or 4 * d
    return V * d + P * d + L * (4 * d * d + 2 * d * inner + 9 * d + inner) + 2 * d


def kv_shape(config: Any) -> tuple[int, int, int]:
    return config.n_layer, config.n_head, config.n_embd // config.n_head
