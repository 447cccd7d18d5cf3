"""What every labkit command line shares: a parser that ends bad input in one line, comma lists,
the model options, whole numbers from comma lists."""

from __future__ import annotations

import argparse
from typing import NoReturn

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


def _ints(name: str, values: list[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise LabkitError(f"{name} take whole numbers, got {','.join(values)}") from None
