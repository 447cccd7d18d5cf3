"""Self-written training texts kept in a file as they are written, so that writing can span runs.

Writing 20k texts takes longer than one call on a lent GPU may run. With a texts file, training
writes its texts in parts (SAVE_EVERY texts), saves the file after each, and a later run with the
same settings reads them back and writes only what is missing. Text i is seeded by its own index
(heads_train.self_written_texts), so texts written in parts are the texts written in one go.

The file is JSON: {"settings": what the texts depend on (seeds, lengths, the chat frame, the
target's fingerprint), "texts": [[tokens, first greedy index], ...]}. A file written with other
settings is refused with one line, never mixed in. It is replaced atomically (a temporary file,
then a rename), so a run stopped mid-save leaves the last complete file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from labkit.errors import LabkitError

SAVE_EVERY = 2048  # texts written between saves

Texts = list[tuple[list[int], int]]


class TextsFile:
    def __init__(self, path: str | Path, settings: dict[str, Any]) -> None:
        self.path, self.settings = Path(path), json.loads(json.dumps(settings))  # as the file will hold them (tuples -> lists)

    def load(self) -> Texts:
        """The texts already written with these settings ([] when the file does not exist yet)."""
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text())
            settings, texts = data["settings"], [(list(t), int(f)) for t, f in data["texts"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LabkitError(f"{self.path} is not a texts file labkit wrote ({e.__class__.__name__}); move it or name another") from None
        if settings != self.settings:
            differ = sorted(k for k in set(settings) | set(self.settings) if settings.get(k) != self.settings.get(k))
            raise LabkitError(f"{self.path} holds texts written with other settings ({', '.join(differ)}); name another file")
        return texts

    def save(self, texts: Texts) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"settings": self.settings, "texts": [[t, f] for t, f in texts]}))
        os.replace(tmp, self.path)
