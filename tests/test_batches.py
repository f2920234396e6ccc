"""Grouping corpus records into requests: never across a shard, each shard's last batch marked."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from teacher_farm.client.cache import Batch, CacheOptions, make_batches
from teacher_farm.client.inputs import Line, Reject


def opts(rows_per_shard: int = 10, batch_lines: int = 4, batch_chars: int = 10_000) -> CacheOptions:
    return CacheOptions(
        input="-",
        out_dir=Path("unused"),
        rows_per_shard=rows_per_shard,
        batch_lines=batch_lines,
        batch_chars=batch_chars,
    )


def lines(numbers, text: str = "abc") -> list[Line]:
    return [Line(n, f"id{n}", text) for n in numbers]


def records_of(batch: Batch) -> list[Line | Reject]:
    return sorted([*batch.lines, *batch.rejects], key=lambda r: r.line)


def mixed_corpus(size: int, seed: int = 0) -> list[Line | Reject]:
    rng = np.random.default_rng(seed)
    return [
        Reject(n, "blank line") if rng.random() < 0.3 else Line(n, str(n), "x" * int(rng.integers(1, 50)))
        for n in range(size)
    ]


def test_batches_never_mix_shards_and_hold_every_record_once():
    records = mixed_corpus(250)
    batches = list(make_batches(records, opts(rows_per_shard=16, batch_lines=5, batch_chars=120)))
    for b in batches:
        assert {r.line // 16 for r in records_of(b)} == {b.shard}
        assert b.last_line == max(r.line for r in records_of(b))
    seen = [r for b in batches for r in records_of(b)]
    assert Counter(r.line for r in seen) == Counter(range(250))
    assert seen == records  # in input order, nothing changed


def test_exactly_the_last_batch_of_each_shard_closes_it():
    batches = list(make_batches(mixed_corpus(95), opts(rows_per_shard=20, batch_lines=3)))
    shards = [b.shard for b in batches]
    assert shards == sorted(shards)
    assert sorted(set(shards)) == [0, 1, 2, 3, 4]
    for i, b in enumerate(batches):
        is_last_of_shard = i == len(batches) - 1 or batches[i + 1].shard != b.shard
        assert b.closes_shard is is_last_of_shard, (i, b.shard)


def test_batch_lines_caps_the_lines_of_a_batch():
    batches = list(make_batches(lines(range(10)), opts(rows_per_shard=100, batch_lines=3)))
    assert [len(b.lines) for b in batches] == [3, 3, 3, 1]
    assert [b.closes_shard for b in batches] == [False, False, False, True]


def test_batch_chars_ends_a_batch_once_reached():
    batches = list(
        make_batches(
            lines(range(10), text="x" * 40), opts(rows_per_shard=100, batch_lines=100, batch_chars=100)
        )
    )
    assert [len(b.lines) for b in batches] == [3, 3, 3, 1]
    for b in batches:
        assert b.chars == sum(len(x.text) for x in b.lines)
        # A batch grows only while under the limit: without its last line it is below batch_chars.
        assert b.chars - len(b.lines[-1].text) < 100


def test_reaching_batch_chars_exactly_ends_the_batch():
    batches = list(
        make_batches(
            lines(range(5), text="x" * 50), opts(rows_per_shard=100, batch_lines=100, batch_chars=100)
        )
    )
    assert [b.chars for b in batches] == [100, 100, 50]


def test_a_line_longer_than_batch_chars_goes_alone():
    records = [Line(0, "a", "short"), Line(1, "b", "y" * 500), Line(2, "c", "short")]
    batches = list(make_batches(records, opts(rows_per_shard=100, batch_lines=100, batch_chars=100)))
    assert [[x.line for x in b.lines] for b in batches] == [[0, 1], [2]]


def test_rejects_stay_with_the_batch_of_their_shard():
    records = [*lines([0, 1]), Reject(2, "blank line"), *lines([3]), Reject(4, "blank line"), *lines([5])]
    batches = list(make_batches(records, opts(rows_per_shard=3, batch_lines=10)))
    assert [(b.shard, [x.line for x in b.lines], [r.line for r in b.rejects]) for b in batches] == [
        (0, [0, 1], [2]),
        (1, [3, 5], [4]),
    ]
    assert [b.last_line for b in batches] == [2, 5]


def test_a_shard_made_only_of_rejects_still_gets_a_closing_batch():
    records = [*lines(range(4)), *(Reject(n, "blank line") for n in range(4, 8)), *lines([8, 9])]
    batches = list(make_batches(records, opts(rows_per_shard=4, batch_lines=10)))
    assert [b.shard for b in batches] == [0, 1, 2]
    middle = batches[1]
    assert middle.lines == [] and middle.chars == 0
    assert [r.line for r in middle.rejects] == [4, 5, 6, 7]
    assert middle.closes_shard and middle.last_line == 7


def test_shards_skipped_on_resume_make_no_batches():
    records = [*lines(range(0, 5)), *lines(range(10, 13))]  # shard 1 (lines 5..9) already done
    batches = list(make_batches(records, opts(rows_per_shard=5, batch_lines=10)))
    assert [(b.shard, b.closes_shard, b.last_line) for b in batches] == [(0, True, 4), (2, True, 12)]


def test_empty_input_makes_no_batches():
    assert list(make_batches([], opts())) == []
