"""``cache --model``: the same job with an in-process engine and no HTTP."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from tests.conftest import API_KEY, SAMPLE, read_lines, teacher_farm
from tests.reference_check import assert_same_rows

pytestmark = pytest.mark.engine


def test_in_process_engine_writes_the_same_cache_as_the_server(server, tiny_model, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(read_lines(SAMPLE, 6) + ['{"id": "bad"}']) + "\n", encoding="utf-8")
    local = teacher_farm(
        "cache", "--model", str(tiny_model), "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
        "--gpu-memory-utilization", "0.2", "--input", str(inp), "--out", str(tmp_path / "local"), "--k", "6",
        "--logprob-dtype", "float32",
    )
    assert local.returncode == 0, local.stderr[-3000:]
    assert "6 rows" in local.stdout and "1 lines rejected" in local.stdout
    remote = teacher_farm(
        "cache", "--server", server.url, "--api-key", API_KEY, "--input", str(inp), "--out", str(tmp_path / "remote"), "--k", "6",
        "--logprob-dtype", "float32",
    )
    assert remote.returncode == 0, remote.stderr
    a = pq.read_table(sorted((tmp_path / "local").glob("part-*.parquet"))).to_pylist()
    b = pq.read_table(sorted((tmp_path / "remote").glob("part-*.parquet"))).to_pylist()
    assert_same_rows(a, b)
    assert (tmp_path / "local" / "manifest.json").exists()
