"""llama.cpp (through `llama-cpp-python`, an optional extra) as a system of `bench baseline`: the
same GGUF file, the same prompt token ids, greedy decoding, EOS suppressed until the requested
length as for the other systems, and labkit's CPU threads.

llama.cpp multiplies its quantised weights with activations it quantises to 8 bits on the fly, so
its tokens may part from the fp32 systems' after a while; the benchmark compares them and reports
speed either way.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from labkit.errors import LabkitError


def llama_cpp_status() -> tuple[bool, str]:
    """Whether llama-cpp-python can be imported here, and its version or why not."""
    try:
        import llama_cpp
    except Exception as err:  # noqa: BLE001 - not installed, or a broken build: "not there"
        return False, f"llama-cpp-python is not installed ({type(err).__name__})"
    return True, str(getattr(llama_cpp, "__version__", "?"))


# The benchmark's own LlamaCpp, decoding a few tokens, in a child process: what it must survive.
PROBE = """
import sys
from labkit.bench.llamacpp import LlamaCpp
LlamaCpp(sys.argv[1], 64, int(sys.argv[2])).generate([1, 2, 3], 2)
print("decoded")
"""


def llama_cpp_probe(gguf_path: str | Path, threads: int, code: str = PROBE, timeout_s: float = 300.0) -> tuple[bool, str]:
    """Whether llama.cpp loads this GGUF and decodes on this machine, tried in a child process
    first: a build that crashes here would take the benchmark down with it, and what it had
    measured (llama-cpp-python 0.3.36 built natively on a Sapphire Rapids VM died in its first
    decode with SIGSEGV). Returns (True, "") or (False, why, in one line)."""
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(gguf_path), str(threads)], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, f"a test decode did not finish in {timeout_s:.0f} s"
    if proc.returncode == 0 and proc.stdout.strip().endswith("decoded"):
        return True, ""
    if proc.returncode < 0:
        try:
            how = f"it died with {signal.Signals(-proc.returncode).name}"
        except ValueError:  # a signal without a name (a real-time one)
            how = f"it died with signal {-proc.returncode}"
    else:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1][:200]
        how = f"exit {proc.returncode}: {last}"
    return False, (f"llama.cpp failed a test decode on this machine ({how}); a build for this CPU may help, e.g. "
                   "CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX512=OFF' pip install --force-reinstall --no-binary llama-cpp-python llama-cpp-python")


class LlamaCpp:
    """One llama.cpp model over a GGUF file, decoding greedily from token ids."""

    def __init__(self, gguf_path: str | Path, n_ctx: int, threads: int | None = None, eos_token_ids: tuple[int, ...] = ()) -> None:
        ok, why = llama_cpp_status()
        if not ok:
            raise LabkitError(why)
        from llama_cpp import Llama

        threads = threads or torch.get_num_threads()
        self.llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, verbose=False)
        self.threads, self.eos_token_ids = threads, eos_token_ids
        self.version = llama_cpp_status()[1]

    def generate(self, prompt_ids: list[int], max_new_tokens: int, min_new_tokens: int = 0) -> tuple[list[int], float, float]:
        """(new tokens, seconds, milliseconds to the first token): greedy, EOS blocked for the
        first `min_new_tokens`, stopping at EOS after that or at `max_new_tokens`."""
        import numpy as np
        from llama_cpp import LogitsProcessorList

        tokens: list[int] = []
        eos = list(self.eos_token_ids)

        def block_eos(input_ids: Any, scores: Any) -> Any:  # scores: (V,) float32 numpy
            if len(tokens) < min_new_tokens and eos:
                scores[eos] = -np.inf
            return scores

        self.llm.reset()
        t0 = time.perf_counter()
        ttft_ms = float("nan")
        stream = self.llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True,
                                   logits_processor=LogitsProcessorList([block_eos]))
        for token in stream:
            if not tokens:
                ttft_ms = (time.perf_counter() - t0) * 1e3
            if token in self.eos_token_ids and len(tokens) >= min_new_tokens:
                break
            tokens.append(int(token))
            if len(tokens) >= max_new_tokens:
                break
        return tokens, time.perf_counter() - t0, ttft_ms
