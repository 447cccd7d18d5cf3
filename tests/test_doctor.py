import json

import pytest
import torch

from labkit.errors import LabkitError
from labkit.models import sizing
from labkit.models.tiny import TINY_ARCHS, tiny_hf_model
from tests.conftest import run_cli


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_parameter_count_from_the_config_alone(arch: str) -> None:
    model = tiny_hf_model(arch)
    real = sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert sizing.count_params(model.config) == real


def test_estimate_covers_weights_and_cache(embedded) -> None:
    cfg = embedded.hf_model.config
    weights = sum(p.numel() for p in embedded.hf_model.parameters()) * 2
    est = sizing.estimate_model_bytes(cfg, torch.bfloat16, seq_len=2048)
    assert weights < est < 2 * weights
    assert sizing.kv_cache_bytes(cfg, 2048, torch.bfloat16) == 2 * 30 * 3 * 2048 * 64 * 2


def test_a_model_too_big_is_refused_clearly(monkeypatch) -> None:
    monkeypatch.setattr(sizing, "available_bytes", lambda device: (2**20, 2**30))
    with pytest.raises(LabkitError, match="needs about .* GiB but cuda has 0.00 GiB free"):
        sizing.check_fits(2**31, torch.device("cuda"), "the llama model")


def test_doctor_cli_reports_and_checks_the_pair(tiny_folder) -> None:
    rc, out, err = run_cli("doctor", "--device", "cpu", "--json", "--model", "default", "--draft-model", str(tiny_folder))
    assert rc == 0, err
    report = json.loads(out)
    assert report["device"] == "cpu" and report["total_gib"] > 0 and report["cuda_graph_if_nodes"] == ""
    assert [f["model"] for f in report["fits"]] == ["default", str(tiny_folder), "together"]
    assert all(f["fits"] for f in report["fits"])
    rc, out, err = run_cli("doctor", "--device", "cpu")
    assert rc == 0 and "CPU block kernel" in out and "fits" in out
