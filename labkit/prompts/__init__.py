"""labkit's own prompt suite: a few dozen prompts in categories, so results split by category."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

CATEGORIES = ("writing", "coding", "math", "summarization", "translation", "open_qa", "rag", "multi_turn")


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    content: str | list[dict[str, str]]  # a single user turn, or a multi-turn chat

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.content, str)


def load_suite(categories: list[str] | None = None, per_category: int | None = None) -> list[Prompt]:
    """The suite, optionally narrowed to some categories and the first N prompts of each."""
    raw: list[dict[str, Any]] = json.loads(resources.files(__package__).joinpath("suite.json").read_text("utf-8"))
    unknown = set(categories or ()) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown categories {sorted(unknown)}; choose from {', '.join(CATEGORIES)}")
    prompts: list[Prompt] = []
    taken: dict[str, int] = {}
    for item in raw:
        cat = item["category"]
        if categories and cat not in categories:
            continue
        if per_category is not None and taken.get(cat, 0) >= per_category:
            continue
        taken[cat] = taken.get(cat, 0) + 1
        prompts.append(Prompt(item["id"], cat, item.get("messages") or item["prompt"]))
    return prompts
