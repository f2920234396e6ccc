"""``teacher-farm verify``: re-scoring a sample of a cache against a real server, and the comparison."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from teacher_farm.client.fsutil import sha256_file
from teacher_farm.client.manifest import save_manifest
from teacher_farm.client.verify import CACHE_COLUMNS, compare_row, read_rows, sample_positions, table_rows
from teacher_farm.schemas.arrow import cast_logprobs, decode_rows, encode_rows
from teacher_farm.schemas.cache_dir import RunIdentity, ShardRecord
from teacher_farm.schemas.formats import GAP_STEP
from tests.conftest import API_KEY, SAMPLE, load_manifest, read_lines, teacher_farm

pytestmark = pytest.mark.engine

LINES = 6
K = 4


@pytest.fixture(scope="module")
def cached(server, tmp_path_factory):
    """A cache of the first lines of the sample corpus, in two shards."""
    root = tmp_path_factory.mktemp("verify")
    inp = root / "in.jsonl"
    inp.write_text("\n".join(read_lines(SAMPLE, LINES)) + "\n", encoding="utf-8")
    out = root / "cache"
    proc = teacher_farm(
        "cache",
        "--server",
        server.url,
        "--api-key",
        API_KEY,
        "--input",
        str(inp),
        "--out",
        str(out),
        "--k",
        str(K),
        "--rows-per-shard",
        "3",
        "--max-length",
        "96",
        "--logprob-dtype",
        "float32",
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture
def cache_copy(cached, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(cached, out)
    return out


def verify(server, out, *extra):
    return teacher_farm("verify", str(out), "--server", server.url, "--api-key", API_KEY, *extra)


def corrupt_logprob(out, line: int, position: int, delta: float = 0.5):
    """Rewrite the shard holding ``line`` with one top-k logprob changed; returns the shard's path."""
    for path in sorted(out.glob("part-*.parquet")):
        table = pq.read_table(path)
        lines = table.column("line").to_pylist()
        if line in lines:
            break
    else:
        raise AssertionError(f"line {line} not cached")
    row = lines.index(line)
    values = table.column("topk_logprobs").to_pylist()
    values[row][position][0] += delta
    rewrite_column(path, table, "topk_logprobs", values)
    return path


def rewrite_column(path, table, name: str, values: list) -> None:
    """Write ``table`` to ``path`` with column ``name`` replaced by ``values`` (its type kept)."""
    index = table.schema.get_field_index(name)
    field = table.schema.field(index)
    pq.write_table(table.set_column(index, field, pa.array(values, type=field.type)), path)


def rewrite_values(table: pa.Table, name: str, values: list) -> pa.Table:
    """``table`` with column ``name`` replaced by ``values`` (its type kept)."""
    index = table.schema.get_field_index(name)
    return table.set_column(
        index, table.schema.field(index), pa.array(values, type=table.schema.field(index).type)
    )


def recommit(out, path) -> None:
    """Give the manifest the rewritten shard's checksum and size: a change the checksums cannot see."""
    manifest = load_manifest(out)
    rec = next(r for r in manifest.shards.values() if r.file == path.name)
    rec.sha256, rec.bytes = sha256_file(path), path.stat().st_size
    save_manifest(manifest, out)


def test_a_fresh_cache_verifies(server, cached):
    proc = verify(server, cached, "--sample", "4", "--seed", "7", "--server", server.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "status:     OK" in proc.stdout
    assert "4 of 6 rows" in proc.stdout and "seed 7" in proc.stdout
    assert "4 rows checked" in proc.stdout and "0 disagree" in proc.stdout
    # The same seed draws the same rows.
    again = verify(server, cached, "--sample", "4", "--seed", "7")
    assert again.returncode == 0
    assert again.stdout.splitlines()[2] == proc.stdout.splitlines()[2]


def test_a_sample_larger_than_the_cache_checks_every_row(server, cached):
    proc = verify(server, cached, "--sample", "1000")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 of 6 rows (all) from 2 of 2 shards" in proc.stdout
    assert "6 rows checked" in proc.stdout and "2 re-hashed" in proc.stdout


def test_a_float16_cache_verifies_at_its_own_tolerance(server, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(read_lines(SAMPLE, 3)) + "\n", encoding="utf-8")
    proc = teacher_farm(
        "cache",
        "--server",
        server.url,
        "--api-key",
        API_KEY,
        "--input",
        str(inp),
        "--out",
        str(tmp_path / "o"),
        "--k",
        str(K),
        "--max-length",
        "64",
        "--logprob-dtype",
        "float16",
    )
    assert proc.returncode == 0, proc.stderr
    proc = verify(server, tmp_path / "o", "--sample", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "atol 0.01, float16 logprobs" in proc.stdout and "3 rows checked" in proc.stdout


def test_a_uint8_gap_cache_verifies_and_a_value_moved_beyond_its_step_is_caught(server, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(read_lines(SAMPLE, 3)) + "\n", encoding="utf-8")
    out = tmp_path / "o"
    proc = teacher_farm(
        "cache",
        "--server",
        server.url,
        "--api-key",
        API_KEY,
        "--input",
        str(inp),
        "--out",
        str(out),
        "--k",
        str(K),
        "--max-length",
        "64",
        "--logprob-dtype",
        "uint8-gap",
    )
    assert proc.returncode == 0, proc.stderr
    (path,) = out.glob("part-*.parquet")
    assert {"topk_top1", "coded"} <= set(pq.read_schema(path).names)
    proc = verify(server, out, "--sample", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "atol 0.01, uint8-gap logprobs" in proc.stdout and "3 rows checked" in proc.stdout
    # Two steps (1/8 nat) more between candidates 1 and 2 of line 1's position 4, behind a matching checksum:
    # the rows decoded, the values moved and coded again with the shard's own models.
    table = pq.read_table(path)
    plain = decode_rows(table)
    lp = plain.column("topk_logprobs").to_pylist()
    row = table.column("line").to_pylist().index(1)
    lp[row][4][1:] = [v - 2 * GAP_STEP for v in lp[row][4][1:]]
    moved = rewrite_values(plain, "topk_logprobs", lp)
    pq.write_table(encode_rows(cast_logprobs(moved, "float32"), table.schema), path)
    recommit(out, path)
    proc = verify(server, out, "--sample", "3")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "line 1 (id sample-0001): topk_logprobs differ at 3 of" in proc.stdout  # candidates 2, 3 and 4
    assert "position 4 candidate 2" in proc.stdout and "1 disagree" in proc.stdout


def test_a_corrupted_logprob_fails_the_checksum_and_the_rescoring(server, cache_copy):
    path = corrupt_logprob(cache_copy, line=4, position=2)
    proc = verify(server, cache_copy, "--sample", "100")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{path.name}: sha256 checksum differs" in proc.stdout
    mismatches = [x for x in proc.stdout.splitlines() if x.startswith("mismatch:") and " line " in x]
    assert len(mismatches) == 1, proc.stdout
    assert f"{path.name} line 4 (id sample-0004): topk_logprobs differ at 1 of" in mismatches[0]
    assert "position 2 candidate 1" in mismatches[0]
    assert "status:     FAILED" in proc.stdout


def test_a_corruption_behind_a_matching_checksum_is_caught_by_rescoring(server, cache_copy):
    path = corrupt_logprob(cache_copy, line=1, position=0, delta=-0.5)
    recommit(cache_copy, path)
    proc = verify(server, cache_copy, "--sample", "6")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "0 differ from the manifest" in proc.stdout and "checksum" not in proc.stdout
    assert f"{path.name} line 1 (id sample-0001): topk_logprobs differ" in proc.stdout
    assert "1 disagree" in proc.stdout


def test_a_different_teacher_is_refused(server, cache_copy):
    manifest = load_manifest(cache_copy)
    manifest.identity = RunIdentity.from_entries(
        {**manifest.identity.entries(), "model_fingerprint": "0" * 16}
    )
    save_manifest(manifest, cache_copy)
    proc = verify(server, cache_copy, "--sample", "3")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "different teacher" in proc.stdout and "0" * 16 in proc.stdout
    assert "rows checked" not in proc.stdout


def test_a_missing_shard_and_bad_flags(server, cache_copy):
    for path in cache_copy.glob("part-*.parquet"):
        path.unlink()
    proc = verify(server, cache_copy, "--sample", "2")
    assert proc.returncode == 1 and "missing" in proc.stdout
    assert verify(server, cache_copy, "--sample", "0").returncode == 2
    assert teacher_farm("verify", str(cache_copy), "--sample", "1").returncode == 2  # no --server


@pytest.mark.parametrize("targets", ["sampled", "both"])
def test_sampled_targets_are_drawn_again_and_a_moved_draw_is_caught(server, tmp_path, targets):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(read_lines(SAMPLE, 4)) + "\n", encoding="utf-8")
    out = tmp_path / "o"
    proc = teacher_farm(
        "cache",
        "--server",
        server.url,
        "--api-key",
        API_KEY,
        "--input",
        str(inp),
        "--out",
        str(out),
        "--k",
        str(K),
        "--max-length",
        "64",
        "--targets",
        targets,
        "--samples",
        "16",
        "--seed",
        "5",
        "--temperature",
        "1.5",
        "--rows-per-shard",
        "4",
    )
    assert proc.returncode == 0, proc.stderr
    proc = verify(server, out, "--sample", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "status:     OK" in proc.stdout and "draws:      " in proc.stdout and " of 4" in proc.stdout
    # One draw moved far from where the seed puts it, behind a matching checksum: caught.
    (path,) = out.glob("part-*.parquet")
    table = pq.read_table(path)
    ids = table.column("sample_ids").to_pylist()
    ids[2][3] = [(ids[2][3][0] + 500) % 2048, *ids[2][3][1:]]
    rewrite_column(path, table, "sample_ids", ids)
    recommit(out, path)
    proc = verify(server, out, "--sample", "4")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (
        "sampled targets differ beyond a neighbouring token at 1 of" in proc.stdout
        and "position 3" in proc.stdout
    )


# --- the comparison itself, on made-up rows ------------------------------------------------------


def made_up_row(n=5, k=K, extra=1, seed=0):
    """A cached row and its re-scoring (with ``extra`` more candidates), well-separated logprobs."""
    rng = np.random.default_rng(seed)
    width = k + extra
    lps = -np.sort(rng.uniform(0.5, 12.0, size=(n, width)), axis=1).astype(np.float32)
    lps[:, 1:] = np.minimum(lps[:, 1:], lps[:, :-1] - 0.05)  # no ties unless a test makes one
    ids = np.stack([rng.choice(2048, size=width, replace=False) for _ in range(n)]).astype(np.int32)
    input_ids = rng.integers(0, 2048, size=n).astype(np.int32)
    target_ranks = np.full(n - 1, 2, np.int32)
    fresh = {
        "input_ids": input_ids,
        "topk_ids": ids,
        "topk_logprobs": lps,
        "target_logprobs": lps[:-1, 1].copy(),
        "target_ranks": target_ranks,
    }
    cached = {key: (v[:, :k].copy() if v.ndim == 2 else v.copy()) for key, v in fresh.items()}
    return cached, fresh


def test_identical_rows_agree_and_noise_under_atol_is_tolerated():
    cached, fresh = made_up_row()
    assert compare_row(cached, fresh, k=K, atol=1e-3) == ([], 0.0)
    fresh["topk_logprobs"] = fresh["topk_logprobs"] + 4e-4
    problems, diff = compare_row(cached, fresh, k=K, atol=1e-3)
    assert problems == [] and diff == pytest.approx(4e-4, rel=1e-2)


def test_candidates_tied_within_atol_may_swap_but_no_others():
    cached, fresh = made_up_row()
    fresh["topk_logprobs"][2, 2] = fresh["topk_logprobs"][2, 1] - 2e-4
    cached["topk_logprobs"][2] = fresh["topk_logprobs"][2, :K]
    cached["topk_ids"][2, [1, 2]] = cached["topk_ids"][2, [2, 1]]
    assert compare_row(cached, fresh, k=K, atol=1e-3)[0] == []
    cached["topk_ids"][3, [0, 1]] = cached["topk_ids"][3, [1, 0]]
    (problem,) = compare_row(cached, fresh, k=K, atol=1e-3)[0]
    assert problem.startswith("topk_ids differ beyond ties at 2 of") and "position 3 candidate 1" in problem


def test_the_last_candidate_may_tie_with_the_first_unseen_one_only():
    cached, fresh = made_up_row()
    # Candidates k and k+1 of the re-scoring are tied: the cache may hold either.
    fresh["topk_logprobs"][1, K] = fresh["topk_logprobs"][1, K - 1] - 1e-4
    cached["topk_ids"][1, K - 1] = fresh["topk_ids"][1, K]
    assert compare_row(cached, fresh, k=K, atol=1e-3)[0] == []
    # Without a tie the last candidate is checked like any other.
    cached["topk_ids"][4, K - 1] = 2047 - cached["topk_ids"][4, K - 1]
    (problem,) = compare_row(cached, fresh, k=K, atol=1e-3)[0]
    assert f"position 4 candidate {K}" in problem


def test_target_ranks_may_differ_only_between_ties():
    cached, fresh = made_up_row()
    # The target ties with candidate 3: rank 2 (as cached) or 3 are both right.
    fresh["topk_logprobs"][0, 2] = fresh["topk_logprobs"][0, 1] - 1e-4
    cached["topk_logprobs"][0] = fresh["topk_logprobs"][0, :K]
    fresh["target_ranks"][0] = 3
    assert compare_row(cached, fresh, k=K, atol=1e-3)[0] == []
    cached["target_ranks"][1] = 1
    (problem,) = compare_row(cached, fresh, k=K, atol=1e-3)[0]
    assert (
        problem.startswith("target_ranks differ beyond ties at 1 of 4")
        and "position 1: cached 1, teacher 2" in problem
    )


def test_input_ids_and_shapes_must_match():
    cached, fresh = made_up_row()
    fresh["input_ids"] = fresh["input_ids"].copy()
    fresh["input_ids"][3] += 1
    assert compare_row(cached, fresh, k=K, atol=1e-3)[0] == ["input_ids differ from position 3"]
    cached, fresh = made_up_row()
    assert "not 5×3" in compare_row(cached, fresh, k=K - 1, atol=1e-3)[0][0]


def test_float16_caches_compare_at_their_own_precision():
    cached, fresh = made_up_row()
    fresh["target_logprobs"] = fresh["target_logprobs"] - 30.0  # fp16 holds these to ~0.016
    cached["target_logprobs"] = fresh["target_logprobs"].astype(np.float16)
    cached["topk_logprobs"] = cached["topk_logprobs"].astype(np.float16)
    fresh["target_logprobs"] = fresh["target_logprobs"] + 3e-3
    assert compare_row(cached, fresh, k=K, atol=1e-2, logprob_dtype="float16")[0] == []
    fresh["target_logprobs"][2] += 0.1
    (problem,) = compare_row(cached, fresh, k=K, atol=1e-2, logprob_dtype="float16")[0]
    assert problem.startswith("target_logprobs differ at 1 of 4 positions: position 2")


def test_a_corrupted_value_in_a_table_is_found_by_row():
    cached, fresh = made_up_row(n=3)
    rows = table_rows(
        pa.table(
            {
                "id": ["a"],
                "line": [9],
                "input_ids": [cached["input_ids"].tolist()],
                "topk_ids": [cached["topk_ids"].tolist()],
                "topk_logprobs": [cached["topk_logprobs"].tolist()],
                "target_logprobs": [cached["target_logprobs"].tolist()],
                "target_ranks": [cached["target_ranks"].tolist()],
            }
        )
    )
    assert rows[0]["line"] == 9 and rows[0]["topk_ids"].shape == (3, K)
    assert compare_row(rows[0], fresh, k=K, atol=1e-3)[0] == []
    rows[0]["topk_logprobs"] = rows[0]["topk_logprobs"] + np.eye(3, K, 2)  # +1 at (1, 3) and (0, 2)
    (problem,) = compare_row(rows[0], fresh, k=K, atol=1e-3)[0]
    assert problem.startswith("topk_logprobs differ at 2 of 12 entries: position 0 candidate 3")
    assert "position 1 candidate 4" in problem


def test_the_sample_is_uniform_over_shards_without_repeats():
    records = [
        ShardRecord(
            index=i,
            file=f"part-{i}",
            first_line=0,
            end_line=0,
            rows=rows,
            rejects=0,
            tokens=0,
            bytes=0,
            sha256="",
        )
        for i, rows in enumerate([5, 0, 7, 3])
    ]
    picks = sample_positions(records, 1000, seed=1)
    assert {i: v.tolist() for i, v in picks.items()} == {
        0: list(range(5)),
        2: list(range(7)),
        3: list(range(3)),
    }
    picks = sample_positions(records, 6, seed=3)
    assert sum(len(v) for v in picks.values()) == 6
    again = sample_positions(records, 6, seed=3)
    assert all(np.array_equal(picks[i], again[i]) for i in picks) and picks.keys() == again.keys()
    for i, v in picks.items():
        assert len(set(v.tolist())) == len(v) and (v < records[i].rows).all()


def test_only_the_row_groups_holding_sampled_rows_are_read(tmp_path, monkeypatch):
    n = 7
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(n)],
            "line": list(range(n)),
            "input_ids": [[i, i + 1] for i in range(n)],
            "topk_ids": [[[1], [2]]] * n,
            "topk_logprobs": [[[-0.5], [-0.7]]] * n,
            "target_logprobs": [[-1.0]] * n,
            "target_ranks": [[3]] * n,
            "extra": list(range(n)),
        }
    )
    path = tmp_path / "part.parquet"
    pq.write_table(table, path, row_group_size=2)
    read = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile, "read_row_group", lambda self, i, **kw: read.append(i) or original(self, i, **kw)
    )
    got, problems = read_rows(path, np.array([1, 4, 5, 9]))
    assert got.column("line").to_pylist() == [1, 4, 5] and got.column_names == CACHE_COLUMNS
    assert read == [0, 2]
    assert problems == ["7 rows in the file, fewer than the manifest says; rows [9] absent"]


def test_uint8_gap_caches_compare_within_one_step():
    from teacher_farm.schemas.formats import FORMATS, GAP_STEP

    cached, fresh = made_up_row(n=6)
    fresh["topk_logprobs"][5, 2:] = -np.inf  # ruled out: equal in both
    cached["topk_logprobs"] = FORMATS["uint8-gap"].round_trip(fresh["topk_logprobs"][:, :K])
    cached["target_logprobs"] = cached["target_logprobs"].astype(np.float16)
    fresh["topk_logprobs"] = fresh["topk_logprobs"] + np.float32(4e-3)  # noise within atol
    problems, diff = compare_row(cached, fresh, k=K, atol=1e-2, logprob_dtype="uint8-gap")
    assert problems == [] and diff <= GAP_STEP + 1e-2
    cached["topk_logprobs"][2, 3] -= 2 * GAP_STEP  # two steps: beyond atol plus one step
    (problem,) = compare_row(cached, fresh, k=K, atol=1e-2, logprob_dtype="uint8-gap")[0]
    assert problem.startswith("topk_logprobs differ at 1 of 24 entries: position 2 candidate 4")
    # Read as if it were float16, the rounding to whole steps alone is a mismatch:
    # the tolerance is the format's.
    cached["topk_logprobs"][2, 3] += 2 * GAP_STEP
    assert compare_row(cached, fresh, k=K, atol=1e-2, logprob_dtype="float16")[0]


def test_one_changed_count_of_the_draws_is_caught():
    from teacher_farm.client.verify import compare_draws

    # Two positions of N=8 draws: tokens 3, 40, 41 and 7, 300.
    fresh = {
        "sample_lengths": np.array([3, 2]),
        "sample_ids": np.array([3, 40, 41, 7, 300]),
        "sample_counts": np.array([5, 2, 1, 6, 2]),
    }
    assert compare_draws(fresh, fresh, 8) == ([], compare_draws(fresh, fresh, 8)[1])
    assert compare_draws(fresh, fresh, 8)[1].jumped == 0
    # One draw counted at token 3 instead of 40: the ids are the same, one count is not.
    cached = {**fresh, "sample_counts": np.array([6, 1, 1, 6, 2])}
    problems, cmp = compare_draws(cached, fresh, 8)
    assert cmp.jumped == 1 and "differ beyond a neighbouring token at 1 of 16 draws" in problems[0]
    # A count that no longer sums to N is refused outright.
    problems, _ = compare_draws({**fresh, "sample_counts": np.array([5, 2, 1, 6, 1])}, fresh, 8)
    assert problems and problems[0].startswith("sampled targets")
