import pytest
import torch

from labkit.config import Flags, GenerationConfig, env_flag, resolve_device, resolve_dtype
from labkit.errors import LabkitError


def test_auto_device_is_cpu_without_accelerators() -> None:
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("machine has an accelerator")
    assert resolve_device("auto").type == "cpu"


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "mps"])
def test_missing_device_is_a_clear_error(name: str) -> None:
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("machine has an accelerator")
    with pytest.raises(LabkitError, match="not available"):
        resolve_device(name)


def test_unknown_device() -> None:
    with pytest.raises(LabkitError, match="unknown device"):
        resolve_device("tpu-9000")


def test_dtype_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("fp16", cpu) == torch.float16
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(LabkitError, match="unknown dtype"):
        resolve_dtype("int3", cpu)


def test_bf16_on_a_card_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(LabkitError, match="bfloat16 is not supported"):
        resolve_dtype("bfloat16", torch.device("cuda"))
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16


def test_env_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECDEC_AMP", "1")
    monkeypatch.setenv("SPECDEC_DTYPE", "float16")
    flags = Flags.from_env()
    assert flags.amp and flags.dtype == "float16" and not flags.cuda_graph
    monkeypatch.setenv("SPECDEC_CUDA_GRAPH", "maybe")
    with pytest.raises(LabkitError, match="SPECDEC_CUDA_GRAPH"):
        env_flag("SPECDEC_CUDA_GRAPH")


def test_labkit_switches_refuse_what_is_not_a_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """LABKIT_IF_NODES=off turns IF nodes off (it once read as on: only "0" was off), and a value that
    is no switch is an error, as the SPECDEC_* ones are; so for the fused EAGLE chain's."""
    from labkit.graphs import if_nodes, if_nodes_status
    from labkit.specdec.eagle_chain import fused_chain_default

    monkeypatch.setenv("LABKIT_IF_NODES", "off")
    assert not if_nodes() and if_nodes_status() == "off"
    monkeypatch.setenv("LABKIT_IF_NODES", "1")
    if not torch.cuda.is_available():
        assert if_nodes_status() == "no CUDA device"
    monkeypatch.setenv("LABKIT_FUSED_CHAIN", "yes")
    assert fused_chain_default()
    for name, read in (("LABKIT_IF_NODES", if_nodes), ("LABKIT_FUSED_CHAIN", fused_chain_default)):
        monkeypatch.setenv(name, "maybe")
        with pytest.raises(LabkitError, match=name):
            read()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "at least 1"),
        ({"max_new_tokens": -3}, "at least 1"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top-p"),
        ({"top_k": -1}, "top-k"),
        ({"max_new_tokens": 4, "min_new_tokens": 5}, "min new tokens"),
    ],
)
def test_generation_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(LabkitError, match=message):
        GenerationConfig(**kwargs).validate()
