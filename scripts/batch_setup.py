"""What the batching diagnostics share (scripts/batch_ahead.py, scripts/batch_host.py): the embedded
model's engine as `bench batch` runs it on this machine, and the suite's prompts.

On CUDA: the fused layers and batched CUDA graphs (bf16); on a CPU: the engine's default.
"""

import torch

from labkit.engine import Engine
from labkit.generate import encode_prompt
from labkit.models.loading import load_model
from labkit.prompts import load_suite


def engine_and_suite(new_tokens: int) -> tuple[Engine, list[list[int]], bool]:
    """(engine, the suite's prompts as token ids, whether on CUDA), after a line naming them."""
    gpu = torch.cuda.is_available()
    loaded = load_model("default")
    if gpu:
        engine = Engine.from_loaded(loaded, "cuda", torch.bfloat16, weights="dense", cuda_graph=True, layer_kernels="triton")
    else:
        engine = Engine.from_loaded(loaded, "cpu", torch.float32)
    suite = [encode_prompt(loaded.tokenizer, p.content) for p in load_suite(None, None)]
    print(f"{torch.cuda.get_device_name() if gpu else 'CPU'}, {engine.weights} weights, {engine.layer_kernels} layers, {new_tokens} new tokens")
    return engine, suite, gpu
