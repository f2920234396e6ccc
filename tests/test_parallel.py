"""Tensor- and pipeline-parallel engines on the CPU make the pooled cache of a single worker, row for row."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from teacher_farm.schemas.draws import expand, moved_draws
from tests.conftest import API_KEY, SAMPLE, Server, descendants, read_lines, running, teacher_farm
from tests.reference_check import assert_same_rows

pytestmark = pytest.mark.engine

SAMPLES = 32
#: A small KV cache: this engine runs beside the session's shared server.
KV_CACHE_BYTES = 256 << 20


def cache(url: str, corpus, out) -> list[dict]:
    proc = teacher_farm(
        "cache",
        "--server",
        url,
        "--api-key",
        API_KEY,
        "--input",
        str(corpus),
        "--out",
        str(out),
        "--k",
        "8",
        "--logprob-dtype",
        "float32",
        "--targets",
        "both",
        "--samples",
        str(SAMPLES),
        "--seed",
        "3",
    )
    assert proc.returncode == 0, proc.stderr
    return pq.read_table(sorted(out.glob("part-*.parquet"))).to_pylist()


def draws(rows: list[dict]) -> np.ndarray:
    """Every position's draws of ``rows`` as (positions, samples) sorted ids."""
    return np.concatenate(
        [
            expand(
                np.array([len(p) for p in r["sample_ids"]]),
                np.concatenate(r["sample_ids"]).astype(np.int64),
                np.concatenate(r["sample_counts"]).astype(np.int64),
                SAMPLES,
            )
            for r in rows
        ]
    )


@pytest.mark.parametrize(
    "flag, worker",
    [
        ("--tensor-parallel-size", "Worker_TP1"),
        ("--pipeline-parallel-size", "Worker_PP1"),
    ],
)
def test_two_workers_make_the_cache_of_one(flag, worker, server, tiny_model, tmp_path):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("two workers need two cores")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(read_lines(SAMPLE, 12)) + "\n", encoding="utf-8")
    want = cache(server.url, corpus, tmp_path / "one")

    # vLLM's CPU backend pins each worker's OpenMP threads; its automatic pinning wants one NUMA node
    # per worker, so on a single node the cores are named, one per worker.
    parallel = Server(
        tiny_model,
        tmp_path / "parallel.log",
        "--api-key",
        API_KEY,
        "--scoring",
        "pooled",
        flag,
        "2",
        "--kv-cache-memory-bytes",
        str(KV_CACHE_BYTES),
        env={"VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[1]}"},
    )
    if flag == "--pipeline-parallel-size":
        # Eager mode on the CPU skips the warm-up step in which vLLM allocates the buffers that carry
        # hidden states between stages: the second stage would fail its first step.
        parallel.args.remove("--enforce-eager")
    for srv in running(parallel):
        names = [" ".join(p.cmdline()) for p in descendants(srv.proc.pid)]
        assert any(worker in name for name in names), f"no {worker} among {names}"
        got = cache(srv.url, corpus, tmp_path / "two")

    assert_same_rows(got, want)
    cmp = moved_draws(draws(got), draws(want))
    assert cmp.holds, cmp
