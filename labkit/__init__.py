"""labkit: see, measure and speed up how a language model decodes.

`import labkit` works on a CPU-only machine; CUDA and Triton code is imported lazily.
"""

from labkit.config import Flags, GenerationConfig, resolve_device, resolve_dtype
from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.generate import GenerationResult, GenerationStats, encode_prompt, generate, generate_text
from labkit.models.loading import DEFAULT_MODEL, LoadedModel, load_model
from labkit.prompts import load_suite

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL", "Engine", "Flags", "GenerationConfig", "GenerationResult", "GenerationStats", "LabkitError",
    "LoadedModel", "encode_prompt", "generate", "generate_text", "load_model", "load_suite", "resolve_device",
    "resolve_dtype", "__version__",
]
