"""Prompts in: text or chat messages to token ids, and the checks a prompt must pass first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from labkit.errors import LabkitError

Messages = list[dict[str, str]]


def encode_prompt(tokenizer: Any, prompt: str | Messages, chat: bool | None = None) -> list[int]:
    """Prompt text (or chat messages) → ids; the chat template is applied when the model has one."""
    check_text(prompt)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise LabkitError("the prompt is empty")
        messages: Messages = [{"role": "user", "content": prompt}]
    else:
        if not prompt or not any(m.get("content", "").strip() for m in prompt):
            raise LabkitError("the prompt is empty")
        messages = prompt
    use_chat = getattr(tokenizer, "chat_template", None) is not None if chat is None else chat
    if use_chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise LabkitError("this model's tokenizer has no chat template; use --no-chat")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    if not isinstance(prompt, str):
        text = "\n".join(m["content"] for m in messages)
    else:
        text = prompt
    return list(tokenizer(text).input_ids)


def check_text(prompt: str | Messages) -> None:
    """Text a tokenizer can take: valid UTF-8 (no lone surrogates), and chat messages that each
    have a string role and content."""
    if isinstance(prompt, str):
        texts = [prompt]
    elif isinstance(prompt, list):
        texts = []
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise LabkitError(f"chat message {i} needs a string 'role' and 'content', got {str(m)[:80]}")
            texts += [m["role"], m["content"]]
    else:
        raise LabkitError(f"a prompt is text or a list of chat messages, got {type(prompt).__name__}")
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise LabkitError(f"the prompt is not valid UTF-8 text (at character {err.start})") from None


def check_prompt(prompt_ids: Sequence[int], context_len: int, vocab_size: int | None = None) -> None:
    if len(prompt_ids) == 0:
        raise LabkitError("the prompt is empty")
    if len(prompt_ids) >= context_len:
        raise LabkitError(f"the prompt has {len(prompt_ids)} tokens but the model's context is {context_len}: shorten it")
    if vocab_size is not None:
        bad = [t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise LabkitError(f"token ids must be whole numbers in [0, {vocab_size}) for this model, got {bad[0]!r}")
