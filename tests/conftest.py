from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in CI

from labkit.models.loading import LoadedModel, load_model
from labkit.models.tiny import tiny_hf_model

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    import subprocess

    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "labkit", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def run_cli_here(*args: str) -> tuple[int, str, str]:
    """run_cli in this process (labkit.cli.main with its output captured): for commands that fail before they generate
    or train, where a fresh interpreter's start (~2.5 s of torch's import on a 2-core machine) is most of their time."""
    import contextlib
    import io
    import warnings

    from labkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            rc = main(list(args))
        except SystemExit as exit_:  # argparse's own errors
            rc = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            torch.set_num_threads(threads)  # (main applies --threads)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def embedded() -> LoadedModel:
    """The real default model (converted once into the cache)."""
    return load_model("default")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory, embedded: LoadedModel) -> Path:
    """A tiny random Llama saved as a model folder, with the embedded model's tokenizer (and chat template)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_hf_model("llama", seed=3, vocab_size=len(embedded.tokenizer))
    model.config.max_position_embeddings = 256
    model.config.eos_token_id = embedded.hf_model.config.eos_token_id
    model.generation_config.eos_token_id = embedded.hf_model.config.eos_token_id
    model.save_pretrained(folder)
    embedded.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
