"""A real English corpus that ships with Python: the reference manual's topics (``pydoc_data.topics``).

About 465,000 characters (~110,000 SmolLM2 tokens) of prose and code examples in 79 topics, cut at
paragraph boundaries into documents of about ``--doc-chars`` characters, in a fixed order, written as
JSONL (``{"id", "text"}``). Every document whose index is a multiple of ``--held-out-every`` goes to
the held-out file instead, so a benchmark can train on one part and evaluate on text it never saw.

    python benchmarks/real_corpus.py --out corpus.jsonl [--held-out held.jsonl] [--max-docs N]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path


def documents(doc_chars: int = 2000) -> Iterator[tuple[str, str]]:
    """(id, text) of every document, topics in sorted order, each cut into pieces of ~``doc_chars``."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        piece: list[str] = []
        size, part = 0, 0
        for para in topics[name].split("\n\n"):
            if not para.strip():
                continue
            piece.append(para)
            size += len(para) + 2
            if size >= doc_chars:
                yield f"{name}/{part}", "\n\n".join(piece)
                piece, size, part = [], 0, part + 1
        if piece and size >= doc_chars // 4:
            yield f"{name}/{part}", "\n\n".join(piece)


def write(
    out: Path,
    held_out: Path | None = None,
    *,
    doc_chars: int = 2000,
    every: int = 10,
    max_docs: int | None = None,
) -> tuple[int, int]:
    """Write the corpus (and the held-out part); returns how many documents each got."""
    counts = [0, 0]
    files = [open(out, "w", encoding="utf-8"), open(held_out, "w", encoding="utf-8") if held_out else None]
    try:
        for i, (doc_id, text) in enumerate(documents(doc_chars)):
            side = 1 if held_out is not None and i % every == every - 1 else 0
            if side == 0 and max_docs is not None and counts[0] >= max_docs:
                continue
            f = files[side]
            assert f is not None
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
            counts[side] += 1
    finally:
        for f in files:
            if f is not None:
                f.close()
    return counts[0], counts[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--held-out", type=Path, help="where every --held-out-every-th document goes")
    p.add_argument("--held-out-every", type=int, default=10)
    p.add_argument("--doc-chars", type=int, default=2000, help="about this many characters a document")
    p.add_argument("--max-docs", type=int, help="at most this many documents in --out")
    a = p.parse_args()
    n, held = write(a.out, a.held_out, doc_chars=a.doc_chars, every=a.held_out_every, max_docs=a.max_docs)
    print(f"{n} documents in {a.out}" + (f", {held} held out in {a.held_out}" if a.held_out else ""))


if __name__ == "__main__":
    main()
