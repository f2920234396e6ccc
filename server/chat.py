"""Where a chat record's assistant turns lie in its tokens, for the ``assistant`` position rule.

An SFT-style student is trained on the assistant's tokens only; the positions whose next token is
one of them are the ones whose targets the cache keeps. The turns are found in the rendered text:
each assistant message spans from the end of the conversation before it, rendered with the
generation prompt (the assistant's header), to the end of the conversation through it (its end-of-turn
token included). Tokens are matched to those character spans through the tokenizer's offsets, so
a token merged across a turn's edge is never split.

Rendering every prefix of a conversation costs turns² message renders; instead each turn's own text
is rendered after the two turns before it (a window that keeps alternation-sensitive templates in
step), and the pieces must add up to the whole conversation rendered once. A template for which
they do not falls back to rendering every prefix (bounded by the server's ``max_chat_turns``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from teacher_farm.schemas.errors import InputError

#: Turns rendered before a turn to find its own text (two: a user/assistant alternation stays in step).
WINDOW = 2


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _spans_by_window(tokenizer: Any, messages: list[dict], text: str) -> list[tuple[int, int]] | None:
    """The assistant turns' character spans from a few-turn render per turn (linear), or None where the
    pieces do not add up to ``text`` exactly."""
    spans, pos = [], 0
    for j, message in enumerate(messages):
        window = messages[max(0, j - WINDOW) : j]
        if not window and message["role"] == "assistant":
            return None  # its header is that of an empty conversation, which tokenizers refuse to render
        try:
            before = _render(tokenizer, window, False) if window else ""
            after = _render(tokenizer, [*window, message], False)
            prompt = _render(tokenizer, window, True) if message["role"] == "assistant" else before
        except Exception:  # noqa: BLE001 - a template that refuses a window's first turn: render every prefix
            return None
        if not (after.startswith(before) and prompt.startswith(before)):
            return None
        piece = after[len(before) :]
        if not text.startswith(piece, pos):
            return None
        if message["role"] == "assistant":
            spans.append((pos + len(prompt) - len(before), pos + len(piece)))
        pos += len(piece)
    return spans if pos == len(text) else None


def _spans_by_prefixes(tokenizer: Any, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """The assistant turns' character spans from every prefix rendered (quadratic in turns)."""
    spans = []
    for j, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        through = _render(tokenizer, messages[: j + 1], False)
        if not text.startswith(through):
            raise InputError(
                "the teacher's chat template does not render a conversation as the rendering of its first "
                "turns followed by the rest: the assistant turns cannot be found (use --positions all)"
            )
        spans.append((len(_render(tokenizer, messages[:j], True)), len(through)))
    return spans


def assistant_tokens(tokenizer: Any, messages: list[dict]) -> tuple[list[int], np.ndarray]:
    """The chat's token ids as the teacher renders them, and per token whether an assistant turn holds it."""
    text = _render(tokenizer, messages, False)
    spans = _spans_by_window(tokenizer, messages, text)
    if spans is None:
        spans = _spans_by_prefixes(tokenizer, messages, text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
    inside = np.zeros(len(starts), dtype=bool)
    if spans:
        # Each token's span by one search over the sorted span edges, not one pass per turn.
        lo = np.asarray([s for s, _ in spans], dtype=np.int64)
        hi = np.asarray([e for _, e in spans], dtype=np.int64)
        j = np.searchsorted(lo, starts, side="right") - 1
        inside = (j >= 0) & (starts < hi[np.maximum(j, 0)])
    return list(enc["input_ids"]), inside


def next_token_inside(inside: np.ndarray, n: int) -> np.ndarray:
    """(n,) bool: the positions whose next token is an assistant token (the last position has none)."""
    selected = np.zeros(n, dtype=bool)
    selected[: n - 1] = inside[1:n]
    return selected
