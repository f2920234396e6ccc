"""The cache client's memory stays bounded whatever the input size.

    python benchmarks/client_memory.py [--gib 1.0] [--work DIR]

Writes a JSONL corpus of the given size, then runs the real cache pipeline (reader, batching,
in-order writer, shards, manifest) against an in-process stand-in teacher that answers instantly
with a one-position result per line, so the run measures the client alone. Prints the peak RSS at
several points of the run: it must not grow with the input.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from teacher_farm.client.cache import CacheOptions, CacheRun  # noqa: E402
from teacher_farm.schemas.arrow import ScoredSequence, results_to_table  # noqa: E402
from teacher_farm.schemas.scoring import Scoring  # noqa: E402
from teacher_farm.schemas.wire import Info, Versions  # noqa: E402


class InstantTeacher:
    """Answers every line with one position of k entries, at once: the client is all that runs."""

    name = "instant"

    def __init__(self, k: int) -> None:
        self.k = k
        self.samples: list[tuple[int, float]] = []
        self.lines = 0

    async def info(self) -> Info:
        return Info(
            model="instant",
            model_fingerprint="0" * 16,
            tokenizer_fingerprint="0" * 16,
            vocab_size=1000,
            k_max=64,
            max_model_len=8192,
            max_input_tokens=8191,
            max_inputs_per_request=1024,
            adds_bos=True,
            versions=Versions(teacher_farm="-", schema_version=1, vllm="-"),
        )

    async def score(self, lines, scoring, max_length, *, wire_dtype="float32"):
        k = scoring.k
        self.lines += len(lines)
        if self.lines // 20_000 > len(self.samples):
            self.samples.append((self.lines, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
        rows = [
            ScoredSequence(
                x.id,
                np.array([1], np.int32),
                np.zeros((1, k), np.int32),
                np.zeros((1, k), np.float32),
                np.zeros(0, np.float32),
                np.zeros(0, np.int32),
            )
            for x in lines
        ]
        return results_to_table(rows, k)

    async def aclose(self) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--work", type=Path, default=ROOT / "bench-out" / "memory")
    a = p.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    corpus = a.work / "corpus.jsonl"
    line = orjson.dumps({"text": "lorem ipsum dolor sit amet " * 80}) + b"\n"
    with open(corpus, "wb") as f:
        for _ in range(int(a.gib * 2**30) // len(line)):
            f.write(line)
    teacher = InstantTeacher(16)
    started = time.monotonic()
    summary = asyncio.run(
        CacheRun(
            CacheOptions(
                input=str(corpus),
                out_dir=a.work / "out",
                scoring=Scoring(k=16),
                rows_per_shard=50_000,
                concurrency=8,
            ),
            teacher,
        ).run()
    )
    print(
        f"{corpus.stat().st_size / 2**30:.2f} GiB, {summary.rows:,} lines in "
        f"{time.monotonic() - started:.0f} s"
    )
    print("lines read -> peak RSS (MiB): " + ", ".join(f"{n:,} -> {rss:.0f}" for n, rss in teacher.samples))


if __name__ == "__main__":
    main()
