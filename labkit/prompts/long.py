"""Long prompts of an exact token count, for long-context benchmarks: documents, then a request.

The documents (`documents.json`: an operations report, a meeting transcript, a history essay and
a Python module, about 9,400 tokens together, written for labkit) run one after another and are
cut at the token where the prompt is full; the request to summarise them comes last, as it does
in a RAG or summarisation prompt. Every length uses the same frame, the chat template with an
empty system turn (the default system prompt alone would not leave room in a 32-token prompt),
so that only the length changes from one prompt to the next.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from labkit.errors import LabkitError

REQUEST = "Summarize the text above in a few sentences."


@functools.cache
def documents() -> tuple[str, ...]:
    raw: list[dict[str, str]] = json.loads(resources.files(__package__).joinpath("documents.json").read_text("utf-8"))
    return tuple(d["text"] for d in raw)  # each text opens with its title


def _frame(tokenizer: Any, chat: bool) -> tuple[list[int], list[int]]:
    """Token ids before and after the documents."""
    if not chat:
        return [], list(tokenizer("\n\n" + REQUEST + "\n", add_special_tokens=False).input_ids)
    if getattr(tokenizer, "chat_template", None) is None:
        raise LabkitError("this model's tokenizer has no chat template; use chat=False (--no-chat)")
    marker = "\x00DOCUMENTS\x00"
    text = tokenizer.apply_chat_template([{"role": "system", "content": ""}, {"role": "user", "content": marker + "\n\n" + REQUEST}],
                                         tokenize=False, add_generation_prompt=True)
    before, after = text.split(marker)
    return list(tokenizer(before, add_special_tokens=False).input_ids), list(tokenizer(after, add_special_tokens=False).input_ids)


def min_tokens(tokenizer: Any, chat: bool = True) -> int:
    before, after = _frame(tokenizer, chat)
    return len(before) + len(after) + 1


def long_prompt(tokenizer: Any, n_tokens: int, chat: bool = True, start: int = 0) -> list[int]:
    """Token ids of a prompt exactly `n_tokens` long: the frame, the documents cut to fit, the request.
    `start`: the document to open with (the others follow in turn), so that prompts of one length differ."""
    before, after = _frame(tokenizer, chat)
    docs = documents()
    docs = docs[start % len(docs) :] + docs[: start % len(docs)]
    room = n_tokens - len(before) - len(after)
    if room < 1:
        raise LabkitError(f"a long prompt needs at least {len(before) + len(after) + 1} tokens with this tokenizer, got {n_tokens}")
    body: list[int] = []
    for text in docs:
        if len(body) >= room:
            break
        body += tokenizer(("\n\n" if body else "") + text, add_special_tokens=False).input_ids
    if len(body) < room:
        raise LabkitError(f"the documents hold {len(body)} tokens, fewer than the {room} a {n_tokens}-token prompt needs")
    return before + body[:room] + after
