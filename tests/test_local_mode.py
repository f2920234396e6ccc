"""``cache --model``: the same job with an in-process engine and no HTTP, as a person sees it."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from tests.conftest import API_KEY, SAMPLE, read_lines, teacher_farm
from tests.reference_check import assert_same_rows

pytestmark = pytest.mark.engine

UNTIDY = ("Traceback", "leaked", "Exception ignored")


def test_in_process_engine_writes_the_same_cache_as_the_server_and_prints_nothing_untidy(
    server, tiny_model, tmp_path
):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(read_lines(SAMPLE, 6) + ['{"id": "bad"}']) + "\n", encoding="utf-8")
    # The demo's command: the default logprob dtype, vLLM's own logs off.
    local = teacher_farm(
        "cache",
        "--model",
        str(tiny_model),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "1024",
        "--gpu-memory-utilization",
        "0.2",
        "--input",
        str(inp),
        "--out",
        str(tmp_path / "local"),
        "--k",
        "6",
    )
    assert local.returncode == 0, local.stderr[-3000:]
    assert "6 rows" in local.stdout and "1 lines rejected" in local.stdout and "bytes/token" in local.stdout
    text = local.stdout + local.stderr
    assert not [word for word in UNTIDY if word in text], text[-3000:]
    assert ") INFO " not in text, "vLLM's INFO logs should be off without -v"
    remote = teacher_farm(
        "cache",
        "--server",
        server.url,
        "--api-key",
        API_KEY,
        "--input",
        str(inp),
        "--out",
        str(tmp_path / "remote"),
        "--k",
        "6",
    )
    assert remote.returncode == 0, remote.stderr
    a = pq.read_table(sorted((tmp_path / "local").glob("part-*.parquet")))
    b = pq.read_table(sorted((tmp_path / "remote").glob("part-*.parquet"))).to_pylist()
    assert "halffloat" in str(a.schema.field("topk_logprobs").type), a.schema  # float16 logprobs by default
    # float16 rounds both the same way, but for values a last bit apart: up to one float16 step.
    assert_same_rows(a.to_pylist(), b, atol=2e-2)
    assert (tmp_path / "local" / "manifest.json").exists()
