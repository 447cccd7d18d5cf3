"""Sizing: what the device (or the machine) has free, and what a model would need, from its config
alone. The engine refuses a model that would not fit before loading it; `labkit doctor` reports it.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from labkit.errors import LabkitError

DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def available_bytes(device: torch.device) -> tuple[int, int]:
    """(free, total) memory where the weights would live: the card's, or the machine's RAM."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines() if ":" in line)
        return int(info["MemAvailable"].split()[0]) * 1024, int(info["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages, pages


def count_params(config: Any) -> int:
    """Parameters of a supported architecture, from its config alone (no weights loaded)."""
    if config.model_type == "gpt2":
        d, L, V, P = config.n_embd, config.n_layer, config.vocab_size, config.n_positions
        inner = config.n_inner or 4 * d
        return V * d + P * d + L * (4 * d * d + 2 * d * inner + 9 * d + inner) + 2 * d
    d, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or d // heads
    inter = config.intermediate_size
    attn = d * heads * hd * 2 + d * kv * hd * 2
    if getattr(config, "attention_bias", False) or config.model_type == "qwen2":
        attn += heads * hd + 2 * kv * hd  # q, k, v biases
    if getattr(config, "attention_bias", False):
        attn += d  # o_proj bias (Llama's attention_bias)
    mlp = 3 * d * inter + ((2 * inter + d) if getattr(config, "mlp_bias", False) else 0)
    head = 0 if getattr(config, "tie_word_embeddings", True) else V * d
    return V * d + head + L * (attn + mlp + 2 * d) + d


def kv_cache_bytes(config: Any, seq_len: int, dtype: torch.dtype, batch: int = 1) -> int:
    if config.model_type == "gpt2":
        layers, kv, hd = config.n_layer, config.n_head, config.n_embd // config.n_head
    else:
        layers = config.num_hidden_layers
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * layers * batch * kv * seq_len * hd * DTYPE_BYTES[dtype]


def estimate_model_bytes(config: Any, dtype: torch.dtype, seq_len: int = 2048) -> int:
    """Weights + KV cache + 20% for activations, logits and allocator slack."""
    weights = count_params(config) * DTYPE_BYTES[dtype]
    return int((weights + kv_cache_bytes(config, seq_len, dtype)) * 1.2)


def check_fits(need_bytes: int, device: torch.device, what: str) -> None:
    free, total = available_bytes(device)
    if need_bytes > free:
        raise LabkitError(f"{what} needs about {need_bytes / 2**30:.2f} GiB but {device} has {free / 2**30:.2f} GiB free "
                          f"of {total / 2**30:.2f} GiB; use a smaller model, --dtype float16/bfloat16, or another device")
