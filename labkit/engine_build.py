"""Building an engine: from a transformers model (our decoder for its family, the device and
precision, a refusal before anything is copied to a device it would not fit), from a loaded model
(the GGUF's blocks as weights where they serve), or from an EngineConfig. `Engine.from_hf`,
`Engine.from_hf` and `Engine.from_loaded` call these."""

from __future__ import annotations

from typing import Any

import torch

from labkit.config import EngineConfig, Flags, resolve_device, resolve_dtype, resolve_max_seq_len
from labkit.engine import Engine
from labkit.engine_choices import choose_weights
from labkit.models.families import build_decoder
from labkit.models.loading import LoadedModel, eos_token_ids


def from_hf(
    hf_model: Any,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    *,
    amp: bool | None = None,
    compile: bool = False,
    cuda_graph: bool | None = None,
    batch_size: int = 1,
    max_seq_len: int | None = None,
    layer_kernels: str = "auto",
) -> Engine:
    """Build from a transformers model. None reads the SPECDEC_* flags: dtype (default auto),
    amp, cuda_graph. layer_kernels: see config.LAYER_KERNELS."""
    flags = Flags.from_env()
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype or flags.dtype, dev)
    if dev.type != "cpu":  # the weights are copied there: refuse clearly rather than crash
        from labkit.models.sizing import check_fits, estimate_model_bytes

        seq_len = resolve_max_seq_len(max_seq_len, hf_model.config.max_position_embeddings)
        check_fits(estimate_model_bytes(hf_model.config, dt, seq_len), dev, f"the {hf_model.config.model_type} model")
    engine = Engine(
        build_decoder(hf_model), device=dev, dtype=dt, amp=flags.amp if amp is None else amp,
        compile=compile, cuda_graph=flags.cuda_graph if cuda_graph is None else cuda_graph,
        batch_size=batch_size, max_seq_len=max_seq_len, layer_kernels=layer_kernels,
    )
    engine.eos_token_ids = eos_token_ids(hf_model)
    return engine


def from_loaded(
    loaded: LoadedModel,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    *,
    weights: str = "auto",
    **kwargs: Any,
) -> Engine:
    """Build for a loaded model. weights: "dense", "gguf" (the GGUF's own quantised blocks,
    CPU fp32 only), "gguf-q8" (the same with 8-bit activations), or "auto" (gguf where it applies
    and a timed step says it is faster; never gguf-q8, whose values are not the model's)."""
    EngineConfig(weights=weights).validate()  # before anything loads
    engine = from_hf(loaded.hf_model, device, dtype, **kwargs)
    choose_weights(engine, loaded, weights)
    return engine


def from_config(loaded: LoadedModel, cfg: EngineConfig) -> Engine:
    """Build for a loaded model as an EngineConfig says."""
    cfg.validate()
    return from_loaded(loaded, cfg.device, cfg.dtype, weights=cfg.weights, amp=cfg.amp, compile=cfg.compile,
                       cuda_graph=cfg.cuda_graph, layer_kernels=cfg.layer_kernels, max_seq_len=cfg.max_seq_len)
