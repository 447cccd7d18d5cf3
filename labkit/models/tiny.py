"""Tiny random-initialised models of every supported architecture, for tests and offline demos."""

from __future__ import annotations

from typing import Any

import torch

TINY_ARCHS = ("llama", "llama3-rope", "mistral", "qwen2", "gpt2", "llama-untied", "opt")


def tiny_config(arch: str, vocab_size: int = 96) -> Any:
    from transformers import GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common: dict[str, Any] = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llama_like: dict[str, Any] = dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,  # head_dim 32 (fused layers)
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, **common,
    )
    if arch == "llama":
        return LlamaConfig(tie_word_embeddings=True, **llama_like)
    if arch == "llama-untied":
        return LlamaConfig(tie_word_embeddings=False, attention_bias=True, mlp_bias=True, **llama_like)
    if arch == "llama3-rope":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 32, "rope_theta": 10000.0}
        return LlamaConfig(tie_word_embeddings=True, rope_parameters=scaling, **llama_like)
    if arch == "mistral":
        return MistralConfig(tie_word_embeddings=False, sliding_window=8, **llama_like)
    if arch == "qwen2":
        return Qwen2Config(tie_word_embeddings=True, **llama_like)
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=256, **common)
    if arch == "opt":
        return OPTConfig(hidden_size=64, word_embed_proj_dim=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                         max_position_embeddings=256, **common)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {TINY_ARCHS}")


def tiny_hf_model(arch: str, seed: int = 0, vocab_size: int = 96) -> Any:
    """A random-initialised transformers model (fp32, CPU, eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    # HF's default init is tiny (std 0.02): widen it so logits are far from ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model.eval()
