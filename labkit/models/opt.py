"""OPT (facebook/opt-125m and its kin) in GPT-2's shape: both are learned-position pre-LayerNorm
decoders with a tied head, so our GPT-2 forward runs OPT once its weights are laid out the same
way (q, k and v fused into one projection; the position table without OPT's offset of 2 rows).

What differs is only in the weights and the config: ReLU, and positions that start at row 2 of
OPT's table. OPT-350m's projected embeddings (word_embed_proj_dim != hidden_size) and its
post-LayerNorm layers are refused clearly rather than run wrong.
"""

from __future__ import annotations

from typing import Any

import torch

from labkit.errors import LabkitError
from labkit.models.gpt2 import GPT2, GPT2Args

POSITION_OFFSET = 2  # OPT's learned position table starts its positions at row 2
NORM_EPS = 1e-5  # OPT's LayerNorms use PyTorch's default


def check_config(config: Any) -> None:
    if config.word_embed_proj_dim != config.hidden_size:
        raise LabkitError("OPT models with projected embeddings (word_embed_proj_dim != hidden_size, e.g. opt-350m) are not supported")
    if not config.do_layer_norm_before or getattr(config, "_remove_final_layer_norm", False):
        raise LabkitError("OPT models with LayerNorm after each layer (e.g. opt-350m) are not supported: only pre-LayerNorm ones")
    if not getattr(config, "enable_bias", True) or not getattr(config, "layer_norm_elementwise_affine", True):
        raise LabkitError("OPT models without biases or LayerNorm weights are not supported")


def args_from_hf(config: Any) -> GPT2Args:
    check_config(config)
    return GPT2Args(vocab_size=config.vocab_size, dim=config.hidden_size, n_layers=config.num_hidden_layers,
                    n_heads=config.num_attention_heads, hidden_dim=config.ffn_dim, norm_eps=NORM_EPS,
                    context_len=config.max_position_embeddings, activation=config.activation_function)


def from_hf(hf_model: Any) -> GPT2:
    """Our GPT-2 forward over an OPT model's weights (shared, except q/k/v, which are concatenated)."""
    sd = hf_model.state_dict()
    args = args_from_hf(hf_model.config)
    with torch.device("meta"):
        model = GPT2(args)
    t = "model.decoder."
    ours = {
        "wte.weight": sd[t + "embed_tokens.weight"],
        "wpe.weight": sd[t + "embed_positions.weight"][POSITION_OFFSET:],  # (context_len, dim)
        "ln_f.weight": sd[t + "final_layer_norm.weight"],
        "ln_f.bias": sd[t + "final_layer_norm.bias"],
        "lm_head.weight": sd.get("lm_head.weight", sd[t + "embed_tokens.weight"]),
    }
    for i in range(args.n_layers):
        h, o = f"{t}layers.{i}.", f"layers.{i}."
        for part in ("weight", "bias"):
            ours[o + "c_attn." + part] = torch.cat([sd[f"{h}self_attn.{x}_proj.{part}"] for x in "qkv"], 0)  # (3*dim, dim) / (3*dim,)
            for ours_name, hf_name in (("ln_1", "self_attn_layer_norm"), ("c_proj", "self_attn.out_proj"), ("ln_2", "final_layer_norm"),
                                       ("c_fc", "fc1"), ("mlp_proj", "fc2")):
                ours[f"{o}{ours_name}.{part}"] = sd[f"{h}{hf_name}.{part}"]
    model.load_state_dict(ours, assign=True, strict=True)
    if ours["lm_head.weight"].data_ptr() == ours["wte.weight"].data_ptr():
        model.lm_head.weight = model.wte.weight
    model.family = "opt"
    return model


def count_params(config: Any) -> int:
    """Parameters from an OPT config alone (no weights loaded): embeddings, positions (with the
    offset rows), per layer q/k/v/out with biases, two LayerNorms and the MLP; the final norm."""
    d, L, V, F = config.hidden_size, config.num_hidden_layers, config.vocab_size, config.ffn_dim
    positions = (config.max_position_embeddings + POSITION_OFFSET) * d
    layer = 4 * (d * d + d) + 2 * (2 * d) + (d * F + F) + (F * d + d)
    head = 0 if getattr(config, "tie_word_embeddings", True) else V * d
    return V * d + positions + L * layer + 2 * d + head


def kv_shape(config: Any) -> tuple[int, int, int]:
    return config.num_hidden_layers, config.num_attention_heads, config.hidden_size // config.num_attention_heads
