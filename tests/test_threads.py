"""CPU threads: the count labkit sets (one OpenMP pool for PyTorch and the block kernel), bad
settings in one line, and the busy-machine warning."""

import os

import pytest
import torch

from labkit.errors import LabkitError
from labkit.threads import ENV, apply_threads, busy_warning, physical_cores, resolve_threads, usable_cpus
from tests.conftest import run_cli


@pytest.fixture(autouse=True)
def _keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_is_the_physical_cores_then_the_variable_then_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert resolve_threads() == physical_cores() <= usable_cpus()
    monkeypatch.setenv(ENV, "3")
    assert resolve_threads() == 3
    assert resolve_threads(1) == 1  # the option wins


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_thread_counts_are_one_clear_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(ENV, value)
    with pytest.raises(LabkitError, match=ENV):
        resolve_threads()


def test_pytorch_and_the_block_kernel_share_one_pool() -> None:
    from labkit.kernels import cpu_quant

    if not cpu_quant.available()[0]:
        pytest.skip(f"cpu_quant: {cpu_quant.available()[1]}")
    for n in (1, 2):
        assert apply_threads(n) == n == torch.get_num_threads() == cpu_quant.kernel_threads()


def test_busy_warning_follows_the_load(monkeypatch: pytest.MonkeyPatch) -> None:
    cpus = usable_cpus()
    monkeypatch.setattr(os, "getloadavg", lambda: (cpus + 1.5, 0.0, 0.0))
    assert "busy" in busy_warning() and f"on {cpus} CPUs" in busy_warning()
    monkeypatch.setattr(os, "getloadavg", lambda: (cpus * 0.5, 0.0, 0.0))
    assert busy_warning() == ""


def test_cli_threads_option_and_variable_are_checked() -> None:
    rc, out, err = run_cli("generate", "--prompt", "hi", "--threads", "0")
    assert rc == 2 and "--threads must be at least 1" in err and "Traceback" not in err
    rc, out, err = run_cli("doctor", env={ENV: "many"})
    assert rc == 2 and ENV in err and "Traceback" not in err
