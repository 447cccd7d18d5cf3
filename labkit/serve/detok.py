"""Incremental detokenisation for streaming: text as tokens arrive, never a split multi-byte
character and never a repeat.

Decoding token by token breaks byte-level BPE: one character may span tokens (the first decodes
to U+FFFD), and a tokenizer may clean up spaces differently once it sees what follows. So each
push decodes a short window, from `prefix` (a few tokens back) to the end, and hands out only what
that window adds beyond its first part, once it does not end in a half character (the method of
Hugging Face's text-generation-inference and vLLM)."""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # the window starts here ...
        self.read = 0  # ... and its text up to here has been handed out

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=self.skip))

    def push(self, new_ids: list[int]) -> str:
        """The text the new tokens add ("" while a character is still incomplete)."""
        self.ids += new_ids
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if len(text) > len(before) and not text.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (a trailing incomplete character decodes as U+FFFD)."""
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(before) :] if len(text) > len(before) else ""
