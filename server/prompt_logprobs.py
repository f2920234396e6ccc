"""vLLM's ``prompt_logprobs`` answer, written as JSON straight from the scored arrays.

A choice's ``prompt_logprobs`` (``vllm/entrypoints/openai/completion/protocol.py``,
``CompletionResponseChoice``) holds one entry per prompt position: ``null`` at position 0 (nothing
predicts the first token), else ``{"<token id>": {"logprob", "rank", "decoded_token"}, ...}`` with the
actual prompt token first, then the top K by rank. Where the actual token is among the top K, vLLM's
dict keeps its first place and the top-K entry's values (``vllm/logprobs.py``,
``append_logprobs_for_next_position``), so the entry holds K keys, else K + 1. ``-inf`` becomes
``-9999.0`` (``clamp_prompt_logprobs``).

vLLM builds a ``Logprob`` object per entry and serializes them with pydantic; here every entry is
pieces of bytes taken from per-token tables (the key and ``decoded_token`` of each id of the
vocabulary, encoded once per tokenizer) and from one encoding of each array, joined by
``bytes.join``: no Python object per entry beyond its pieces.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import orjson

from teacher_farm.schemas.arrow import ScoredSequence

#: What vLLM sends for a ``-inf`` logprob (JSON has no infinities).
MIN_LOGPROB = -9999.0
#: Entries joined per ``bytes.join`` call: each call holds the GIL, so the event loop waits at most one.
BLOCK_ENTRIES = 1 << 15

_RANK = b',"rank":'
REPLACEMENT = "\ufffd"
#: Prompt tokens before a partial token that vLLM's mending looks at (enough for any UTF-8 character).
MEND_CONTEXT = 4


class TokenTable:
    """Per token id of a vocabulary: its JSON key with the entry's opening, and its closing with
    ``decoded_token``, as vLLM's ``convert_ids_list_to_tokens`` decodes a token alone."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        ids = list(range(vocab_size))
        # A model's vocabulary may be padded beyond its tokenizer's: those ids decode to nothing.
        known = ids[: min(vocab_size, len(tokenizer))] if hasattr(tokenizer, "__len__") else ids
        texts = tokenizer.batch_decode([[i] for i in known], skip_special_tokens=False)
        marker = leading_space_marker(tokenizer)
        if marker is not None:
            raws = tokenizer.convert_ids_to_tokens(known)
            texts = [restore_leading_spaces(raw or "", text, marker) for raw, text in zip(raws, texts)]
        texts += [""] * (vocab_size - len(known))
        self.tokenizer = tokenizer
        self.heads = np.array([b'"%d":{"logprob":' % i for i in ids], dtype=object)
        self.tails = np.array([tail(text or "") for text in texts], dtype=object)
        #: Tokens whose lone decoding ends in half a UTF-8 character: vLLM mends them with their context.
        self.partial = np.array([(text or "").endswith(REPLACEMENT) for text in texts], dtype=bool)

    def mended(self, token_id: int, context: list[int]) -> bytes:
        """The closing of a partial token's entry after ``context`` (the prompt tokens before it)."""
        return tail(mend(self.tokenizer, token_id, context))


def tail(text: str) -> bytes:
    return b',"decoded_token":' + orjson.dumps(text) + b"}"


def mend(tokenizer: Any, token_id: int, context: list[int]) -> str:
    """What a token ending in half a UTF-8 character reads as after ``context``, as vLLM's output
    processor decodes it (``LogprobsProcessor._correct_decoded_token``): the text it completes with up
    to 4 tokens before it, less what those clean tokens read alone; "" if nothing completes it."""
    for n in range(1, min(len(context), MEND_CONTEXT) + 1):
        ctx = context[-n:]
        full = tokenizer.decode(ctx + [token_id])
        if full.endswith(REPLACEMENT):
            continue
        clean = len(ctx)
        while clean > 0 and tokenizer.decode([ctx[clean - 1]]).endswith(REPLACEMENT):
            clean -= 1
        prefix = tokenizer.decode(ctx[:clean]) if clean else ""
        if full.startswith(prefix):
            return full[len(prefix) :]
        common = 0
        for a, b in zip(prefix, full):
            if a != b:
                break
            common += 1
        return full[common:]
    return ""


_tables: dict[int, tuple[Any, TokenTable]] = {}
_tables_lock = threading.Lock()


def token_table(tokenizer: Any, vocab_size: int) -> TokenTable:
    """The table of ``tokenizer`` (built on first use: a pass over the vocabulary, then kept)."""
    key = id(tokenizer)
    with _tables_lock:
        held = _tables.get(key)
        if held is not None and held[0] is tokenizer and len(held[1].heads) >= vocab_size:
            return held[1]
        table = TokenTable(tokenizer, vocab_size)
        _tables[key] = (tokenizer, table)  # the tokenizer is held so that its id stays its own
        return table


def leading_space_marker(tokenizer: Any) -> str | None:
    """The Metaspace replacement character whose leading instance ``decode`` strips (vLLM's
    ``get_leading_space_marker``), or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    except ValueError:
        return None
    for sub in [pre, *(pre.get("pretokenizers") or [])] if pre.get("type") == "Sequence" else [pre]:
        if sub.get("type") == "Metaspace":
            return sub.get("replacement", "▁")
    return None


def restore_leading_spaces(raw: str, text: str, marker: str) -> str:
    """The spaces a single token's ``decode`` dropped from its vocabulary piece put back (as vLLM does)."""
    markers = len(raw) - len(raw.lstrip(marker))
    missing = markers - (len(text) - len(text.lstrip(" ")))
    return " " * missing + text if missing > 0 else text


def _numbers(values: np.ndarray) -> list[bytes]:
    """Each number of a 1-d array as its JSON text (one orjson call for all)."""
    if not len(values):
        return []
    return orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",")


def prompt_logprobs_json(s: ScoredSequence, k: int, table: TokenTable) -> bytes:
    """One choice's ``prompt_logprobs`` as JSON: the actual token and the top ``k`` at every position.

    Position i (from 1) is scored by row i - 1: ``target_logprobs``/``target_ranks`` for the actual
    token, ``topk_*`` for the top k.
    """
    rows = len(s.input_ids) - 1
    if rows <= 0:
        return b"[null]"
    target = s.input_ids[1:].astype(np.int64)
    top_ids = s.topk_ids[:rows, :k].astype(np.int64)
    top_lps = s.topk_logprobs[:rows, :k]
    match = top_ids == target[:, None]
    inside = match.any(axis=1)
    ids = np.concatenate([target[:, None], top_ids], axis=1)
    lps = np.concatenate([s.target_logprobs[:rows, None], top_lps], axis=1).astype(np.float64)
    ranks = np.empty((rows, k + 1), dtype=np.int64)
    ranks[:, 0] = s.target_ranks[:rows]
    ranks[:, 1:] = np.arange(1, k + 1)
    # The actual token among the top k: vLLM's dict keeps its place and the top-k entry's values.
    if k:
        where = match.argmax(axis=1)[inside]
        ranks[inside, 0] = where + 1
        lps[inside, 0] = top_lps[inside, where]
    keep = np.ones((rows, k + 1), dtype=bool)
    keep[:, 1:] = ~match
    np.copyto(lps, MIN_LOGPROB, where=np.isneginf(lps))

    flat_keep = keep.reshape(-1)
    ids, lps, ranks = ids.reshape(-1)[flat_keep], lps.reshape(-1)[flat_keep], ranks.reshape(-1)[flat_keep]
    row_of = np.repeat(np.arange(rows), keep.sum(axis=1))
    first = np.ones(len(ids), dtype=bool)
    first[1:] = row_of[1:] != row_of[:-1]
    last = np.ones(len(ids), dtype=bool)
    last[:-1] = first[1:]
    opens = np.where(first, b"{", b",").astype(object)
    closes = np.where(last, b"},", b"").astype(object)
    closes[-1] = b"}"
    tails = table.tails[ids]
    # Partial tokens (rare in real text): mended one by one with the prompt tokens before them.
    # Position p (row p - 1) has as context the prompt tokens at positions 1..p-1, the last four.
    prompt = s.input_ids.tolist()
    for e in np.flatnonzero(table.partial[ids]).tolist():
        p = int(row_of[e]) + 1
        tails[e] = table.mended(int(ids[e]), prompt[max(1, p - MEND_CONTEXT) : p])

    parts = [b"[null,"]
    for a in range(0, len(ids), BLOCK_ENTRIES):
        b = min(a + BLOCK_ENTRIES, len(ids))
        block = np.empty((b - a, 7), dtype=object)
        block[:, 0] = opens[a:b]
        block[:, 1] = table.heads[ids[a:b]]
        block[:, 2] = _numbers(lps[a:b])
        block[:, 3] = _RANK
        block[:, 4] = _numbers(ranks[a:b])
        block[:, 5] = tails[a:b]
        block[:, 6] = closes[a:b]
        parts.append(b"".join(block.reshape(-1).tolist()))
    parts.append(b"]")
    return b"".join(parts)
