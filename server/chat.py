"""Where a chat record's assistant turns lie in its tokens, for the ``assistant`` position rule.

An SFT-style student is trained on the assistant's tokens only; the positions whose next token is
one of them are the ones whose targets the cache keeps. The turns are found in the rendered text:
each assistant message spans from the end of the conversation before it, rendered with the
generation prompt (the assistant's header), to the end of the conversation through it (its end-of-turn
token included). Tokens are matched to those character spans through the tokenizer's offsets, so
a token merged across a turn's edge is never split.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from teacher_farm.schemas.errors import InputError


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_tokens(tokenizer: Any, messages: list[dict]) -> tuple[list[int], np.ndarray]:
    """The chat's token ids as the teacher renders them, and per token whether an assistant turn holds it."""
    text = _render(tokenizer, messages, False)
    spans = []
    for j, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = len(_render(tokenizer, messages[:j], True)), len(_render(tokenizer, messages[:j + 1], False))
        if not text.startswith(_render(tokenizer, messages[:j + 1], False)):
            raise InputError(
                "the teacher's chat template does not render a conversation as the rendering of its first turns "
                "followed by the rest: the assistant turns cannot be found (use --positions all)"
            )
        spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
    inside = np.zeros(len(starts), dtype=bool)
    for start, end in spans:
        inside |= (starts >= start) & (starts < end)
    return list(enc["input_ids"]), inside


def next_token_inside(inside: np.ndarray, n: int) -> np.ndarray:
    """(n,) bool: the positions whose next token is an assistant token (the last position has none)."""
    selected = np.zeros(n, dtype=bool)
    selected[: n - 1] = inside[1:n]
    return selected
