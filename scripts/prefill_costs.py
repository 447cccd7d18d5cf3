"""Prompt and long-context step costs on this GPU (diagnostic; prints medians in milliseconds).

    python3 scripts/prefill_costs.py [lengths] [configs]

For each prompt length on the embedded model (bf16, CUDA graphs, fused layers):
- prefill by each strategy: one captured pass padded to a power of two ("graph", the default),
  the same pass through the fused layer kernels ("fgraph"), captured 16-token chunks ("chunks"),
  the fused kernels in one eager pass ("fused"), the PyTorch layers in one eager pass, cuBLAS GEMMs
  and flash attention ("torch"); and whether fgraph's logits are the chunks' bits (the fused
  kernels' arithmetic for a token does not depend on what shares its step);
- one transformers forward over the prompt (the last position's logits);
- a greedy decode step at that context, per token (16 captured steps per host read), for each
  tile configuration of the split-K attention: keys per split, keys per loop step, partials the
  combining program loads at a time (TUNE["attn_split_s"], ["attn_block_s"], ["attn_combine_chunk"]),
  given as split:block:chunk (e.g. 256:64:8,512:128:16).
"""

import statistics
import sys
import time

import torch

import labkit.engine as eng
from labkit.engine import Engine
from labkit.generate import warm_up
from labkit.kernels import layer_triton
from labkit.models.loading import load_model
from labkit.prompts.long import long_prompt

lengths = [int(x) for x in sys.argv[1].split(",")] if len(sys.argv) > 1 else [32, 64, 128, 256, 512, 1024, 2048, 4096, 8064]
ATTN_KEYS = ("attn_split_s", "attn_block_s", "attn_combine_chunk")
CONFIGS = [tuple(int(v) for v in c.split(":")) for c in (sys.argv[2] if len(sys.argv) > 2 else "64:64:8,128:64:8,256:64:8").split(",")]
defaults = {key: layer_triton.TUNE[key] for key in ATTN_KEYS}
loaded = load_model("default")
engine = Engine.from_loaded(loaded, "cuda", torch.bfloat16, weights="dense", cuda_graph=True, layer_kernels="triton")
hf = loaded.hf_model.to("cuda", torch.bfloat16).eval()
warm_up(engine, 8)
print(f"{torch.cuda.get_device_name()}, cache {engine.max_seq_len} positions")


def median_ms(fn, reps: int = 7) -> float:
    times = []
    for i in range(reps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


# (PREFILL_GRAPHS, PREFILL_GRAPH_CHUNKS_MAX_T, fused_max_t)
STRATEGIES = {"graph": (True, 64, 16), "fgraph": (True, 16, 10**9), "chunks": (False, 10**9, 16), "fused": (False, 0, 10**9),
              "torch": (False, 0, 16)}
print(f"{'tokens':>7}" + "".join(f"{s:>10}" for s in STRATEGIES) + f"{'hf fwd':>10}" + "  fgraph=chunks   decode us/token by split:block:chunk")
for n in lengths:
    ids = long_prompt(loaded.tokenizer, n)
    prompt = torch.tensor([ids], device="cuda")
    row = f"{n:>7}"
    logits = {}
    with torch.inference_mode():
        for name, (graphs, chunks_max, fused_max) in STRATEGIES.items():
            if (chunks_max > 64 or fused_max > 16) and n > 1024:  # (the attention counters cover 1,365 fused rows)
                row += f"{'-':>10}"
                continue
            eng.PREFILL_GRAPHS, eng.PREFILL_GRAPH_CHUNKS_MAX_T, engine.model.fused_max_t = graphs, chunks_max, fused_max
            engine.graphs.clear()  # "graph" and "fgraph" capture under the same key

            def prefill(n: int = n, prompt: torch.Tensor = prompt) -> torch.Tensor:
                engine.ensure_capacity(n + 32)
                return engine.prefill(prompt)

            row += f"{median_ms(prefill):>10.2f}"
            logits[name] = prefill().float().clone()
        same = "-" if "chunks" not in logits else ("yes" if torch.equal(logits["fgraph"], logits["chunks"]) else
                                                  f"no {(logits['fgraph'] - logits['chunks']).abs().max().item():.3g}")
        eng.PREFILL_GRAPHS, eng.PREFILL_GRAPH_CHUNKS_MAX_T, engine.model.fused_max_t = True, 64, 16
        row += f"{median_ms(lambda prompt=prompt: hf(prompt, logits_to_keep=1)):>10.2f}  {same:>13}"
        last = torch.tensor([[ids[-1]]], device="cuda")
        for config in CONFIGS:
            layer_triton.TUNE.update(zip(ATTN_KEYS, config, strict=True))
            engine.graphs.clear()
            engine.ensure_capacity(n + 32)
            engine.prefill(prompt)
            engine.decode_greedy(last, 16)  # capture

            def decode(n: int = n, last: torch.Tensor = last) -> None:
                engine.rollback(n)
                engine.decode_greedy(last, 16)[0].tolist()

            row += f"   {':'.join(map(str, config))}: {median_ms(decode) / 16 * 1e3:6.1f}"
        layer_triton.TUNE.update(defaults)
        engine.graphs.clear()
    print(row, flush=True)
