"""What every labkit command line shares: a parser that ends bad input in one line, comma lists,
the model options, whole numbers from comma lists."""

from __future__ import annotations

import argparse
from typing import NoReturn

from labkit.config import EngineConfig
from labkit.errors import LabkitError


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"labkit: error: {message} (see {self.prog} --help)\n")


def _csv(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="embedded default (SmolLM2-135M-Instruct), a Hugging Face id, or a folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: LABKIT_THREADS, else the physical cores)")


def _results_args(p: argparse.ArgumentParser, no_write: bool = True) -> None:
    """Where a benchmark writes its results files, and whether it may from a dirty checkout."""
    p.add_argument("--output-dir", default="results")
    if no_write:
        p.add_argument("--no-write", action="store_true", help="measure and print, write no files")
    p.add_argument("--allow-dirty", action="store_true",
                   help="write results into the repository from a checkout with uncommitted changes (the file records it)")


def _ints(name: str, values: list[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise LabkitError(f"{name} take whole numbers, got {','.join(values)}") from None


def _engine_args(p: argparse.ArgumentParser, cuda_graph_default: bool | None = None) -> None:
    """The options of EngineConfig (config.py), with its defaults: one spelling for every command."""
    from labkit.config import LAYER_KERNELS, WEIGHTS

    p.add_argument("--dtype", default=None, help="auto, float32, float16, bfloat16 (default: SPECDEC_DTYPE or auto)")
    p.add_argument("--weights", default="auto", choices=WEIGHTS,
                   help="gguf: read the embedded model's own Q4_1 blocks (CPU, float32); auto: gguf where it applies and a timed step says it is faster; "
                        "gguf-q8: the blocks with 8-bit activations, as llama.cpp (faster; its text may differ from gguf's, speculation stays lossless against its plain steps)")
    p.add_argument("--compile", action="store_true", help="torch.compile the fixed-shape steps")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=cuda_graph_default,
                   help="replay the fixed-shape steps as CUDA graphs" + (" (default: SPECDEC_CUDA_GRAPH)" if cuda_graph_default is None else ""))
    p.add_argument("--layer-kernels", default="auto", choices=LAYER_KERNELS,
                   help="Llama layers as fused kernels (triton: CUDA; cpu: C on the GGUF blocks; auto: where they apply) or PyTorch ops")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="KV cache positions, allocated once at load (default: the model's context, at most 8192)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from the options _model_args and _engine_args added, checked before anything loads."""
    from labkit.config import Flags, resolve_device, resolve_dtype, resolve_max_seq_len

    cfg = EngineConfig(device=args.device, dtype=args.dtype, compile=args.compile, cuda_graph=args.cuda_graph,
                       layer_kernels=args.layer_kernels, weights=args.weights, max_seq_len=args.max_seq_len)
    cfg.validate()
    resolve_dtype(cfg.dtype or Flags.from_env().dtype, resolve_device(cfg.device))
    if cfg.max_seq_len is not None:
        resolve_max_seq_len(cfg.max_seq_len, cfg.max_seq_len)  # a whole number of at least 2
    return cfg
