"""The pooled backend against the fp32 reference: temperature, every k, long chunked prompts,
sampled targets."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from teacher_farm.schemas import ARROW_STREAM
from teacher_farm.schemas.cache_dir import read_metadata
from teacher_farm.schemas.draws import draw_seed, expand, moved_draws, uniforms
from tests.conftest import API_KEY, MAX_BATCHED_TOKENS, SAMPLE, read_lines, table_to_results, teacher_farm
from tests.reference_check import assert_matches_reference, assert_same_rows

pytestmark = pytest.mark.engine

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def score(url: str, body: dict) -> list:
    """``POST /v1/topk`` with an Arrow answer, as numpy rows."""
    r = httpx.post(url + "/v1/topk", json=body, headers={**AUTH, "Accept": ARROW_STREAM}, timeout=300)
    assert r.status_code == 200, r.text
    return table_to_results(pa.ipc.open_stream(r.content).read_all())


@pytest.fixture(scope="module")
def prompts(reference) -> list[list[int]]:
    texts = read_lines(SAMPLE)
    return [reference.tokenize(json.loads(t)["text"]) for t in texts[:6]]


@pytest.mark.parametrize("temperature, k", [(2.0, 8), (0.5, 3), (1.0, 256)])
def test_temperature_and_k_match_the_reference(server, reference, prompts, temperature, k):
    rows = score(
        server.url, {"k": k, "temperature": temperature, "inputs": [{"token_ids": p} for p in prompts]}
    )
    for row in rows:
        assert_matches_reference(row, _AtTemperature(reference, temperature), k)


def test_long_prompt_is_scored_in_chunks_and_matches_at_every_position(server, reference):
    ids = (np.random.default_rng(5).integers(3, 2048, size=4 * MAX_BATCHED_TOKENS - 30)).tolist()
    (row,) = score(server.url, {"k": 6, "temperature": 1.0, "inputs": [{"token_ids": ids}]})
    assert len(row.input_ids) > MAX_BATCHED_TOKENS
    assert_matches_reference(row, reference, 6)  # the last position included


def test_both_backends_make_the_same_cache(server, logprobs_server, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(read_lines(SAMPLE, 24)) + "\n", encoding="utf-8")
    tables = []
    for name, srv in (("pooled", server), ("logprobs", logprobs_server)):
        out = tmp_path / name
        proc = teacher_farm(
            "cache",
            "--server",
            srv.url,
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
        )
        assert proc.returncode == 0, proc.stderr
        tables.append(pq.read_table(sorted(out.glob("part-*.parquet"))))
        manifest = json.loads((out / "manifest.json").read_text())
        tables[-1] = (tables[-1], manifest["identity"])
    (a, ident_a), (b, ident_b) = tables
    assert ident_a == ident_b  # same teacher fingerprint, same cache identity
    assert_same_rows(a.to_pylist(), b.to_pylist())


def test_prompt_logprobs_backend_refuses_what_it_cannot_compute(logprobs_server, tmp_path):
    for extra in ({"temperature": 2.0}, {"targets": "sampled"}):
        r = httpx.post(
            logprobs_server.url + "/v1/topk", json={"k": 2, "inputs": [{"text": "hi"}], **extra}, headers=AUTH
        )
        assert r.status_code == 422 and "pooled scoring backend" in r.json()["error"]
    assert httpx.get(logprobs_server.url + "/v1/info", headers=AUTH).json()["scoring"] == "prompt-logprobs"
    # The client refuses before it starts, naming the flag that would allow it.
    proc = teacher_farm(
        "cache",
        "--server",
        logprobs_server.url,
        "--api-key",
        API_KEY,
        "--input",
        str(SAMPLE),
        "--out",
        str(tmp_path / "o"),
        "--temperature",
        "2",
    )
    assert proc.returncode == 1 and "start it with --scoring pooled" in proc.stderr
    assert not (tmp_path / "o" / "manifest.json").exists()


def sampled(server, prompts, seed: int, temperature: float = 0.7, samples: int = 256) -> list:
    body = {
        "k": 4,
        "targets": "both",
        "samples": samples,
        "seed": seed,
        "temperature": temperature,
        "inputs": [{"token_ids": p} for p in prompts],
    }
    return score(server.url, body)


def test_sampled_targets_are_unbiased_draws_with_the_reference_logprobs(server, reference, prompts):
    temperature, draws = 0.7, 256
    rows = sampled(server, prompts, seed=1, temperature=temperature, samples=draws)
    hits, expected, variance = 0.0, 0.0, 0.0
    for row in rows:
        n = len(row.input_ids)
        _, _, full = reference.topk(row.input_ids.tolist(), 1, temperature)
        assert row.sample_lengths.shape == (n,)
        which = np.repeat(np.arange(n), row.sample_lengths)
        # Counts sum to N at every position; tokens are distinct and ascending within a position.
        assert (np.bincount(which, weights=row.sample_counts, minlength=n) == draws).all()
        assert (np.diff(row.sample_ids)[np.diff(which) == 0] > 0).all()
        np.testing.assert_allclose(row.sample_logprobs, full[which, row.sample_ids], atol=1e-4)
        # Unbiased: draws landing in each position's 8 likeliest tokens match their probability mass.
        probs = np.exp(full)
        top = np.argsort(-probs, axis=1)[:, :8]
        mass = np.take_along_axis(probs, top, 1).sum(axis=1)
        in_top = (row.sample_ids[:, None] == top[which]).any(axis=1)
        hits += row.sample_counts[in_top].sum()
        expected += draws * mass.sum()
        variance += (draws * mass * (1 - mass)).sum()
    assert abs(hits - expected) / np.sqrt(variance) < 4, (hits, expected)


def draws_of(rows: list, samples: int) -> np.ndarray:
    """Every position's sorted draws of ``rows``, stacked: (positions, samples)."""
    return np.concatenate([expand(r.sample_lengths, r.sample_ids, r.sample_counts, samples) for r in rows])


def test_same_seed_same_draws_whatever_the_batch_as_the_contract_states(server, reference, prompts):
    """The draws are the contract's (schemas/draws.py): hashed uniforms on the fp32 CDF, whatever the batch.

    A draw may land on the neighbouring token where its uniform lies within rounding of a CDF
    boundary; nothing else may move.
    """
    temperature, n = 0.7, 256
    a = sampled(server, prompts, seed=9, temperature=temperature, samples=n)
    b = sampled(server, list(reversed(prompts)), seed=9, temperature=temperature, samples=n)[::-1]
    c = sampled(server, prompts, seed=10, temperature=temperature, samples=n)
    batched = moved_draws(draws_of(a, n), draws_of(b, n))
    assert batched.holds, batched
    assert not moved_draws(draws_of(a, n), draws_of(c, n)).holds  # another seed: other draws
    # The draws are the ones the contract defines, recomputed here from the reference's logprobs.
    expected = []
    for row in a:
        ids = row.input_ids.tolist()
        _, _, full = reference.topk(ids, 1, temperature)
        cdf = np.cumsum(np.exp(full.astype(np.float64)), axis=1)
        u = uniforms(np.full(len(ids), draw_seed(9, ids)), np.arange(len(ids)), n) * cdf[:, -1:]
        drawn = np.stack([np.searchsorted(cdf[p], u[p], side="right") for p in range(len(ids))])
        expected.append(np.sort(np.minimum(drawn, cdf.shape[1] - 1), axis=1))
    defined = moved_draws(draws_of(a, n), np.concatenate(expected))
    assert defined.holds, defined


def test_batch_neighbours_of_other_k_n_temperature_and_seed_change_nothing(server, prompts):
    """Concurrent requests of different settings share engine steps; each gets what it gets alone."""
    settings = [
        {"k": 4, "targets": "both", "samples": 8, "temperature": 1.0, "seed": 1},
        {"k": 16, "targets": "both", "samples": 64, "temperature": 0.7, "seed": 2},
        {"k": 2, "targets": "topk", "temperature": 1.0},
        {"k": 1, "targets": "sampled", "samples": 32, "temperature": 1.5, "seed": 3},
    ]
    bodies = [
        {**settings[i % len(settings)], "inputs": [{"token_ids": prompts[i % len(prompts)]}]}
        for i in range(24)
    ]
    alone = [score(server.url, body)[0] for body in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = [rows[0] for rows in pool.map(lambda body: score(server.url, body), bodies)]
    for body, x, y in zip(bodies, alone, together):
        if body["targets"] != "sampled":
            np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, atol=1e-4, rtol=0)
            assert (x.topk_ids == y.topk_ids).mean() > 0.99
        if body["targets"] != "topk":
            n = body["samples"]
            cmp = moved_draws(draws_of([x], n), draws_of([y], n))
            assert cmp.holds, (body["k"], n, cmp)


def test_cache_with_sampled_targets_and_temperature(server, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(read_lines(SAMPLE, 12)) + "\n", encoding="utf-8")
    out = tmp_path / "o"
    args = (
        "cache",
        "--server",
        server.url,
        "--api-key",
        API_KEY,
        "--input",
        str(corpus),
        "--out",
        str(out),
        "--targets",
        "sampled",
        "--samples",
        "32",
        "--seed",
        "4",
        "--temperature",
        "2",
    )
    proc = teacher_farm(*args)
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    assert "topk_ids" not in table.column_names and "sample_logprobs" not in table.column_names
    assert table.schema.field("sample_counts").type == pa.list_(pa.list_(pa.uint8()))  # N = 32 fits a byte
    meta = read_metadata(table.schema)
    assert (meta["targets"], meta["samples"], meta["seed"], meta["temperature"]) == (
        "sampled",
        "32",
        "4",
        "2.0",
    )
    first = table.slice(0, 1).to_pylist()[0]
    assert [sum(c) for c in first["sample_counts"]] == [32] * len(first["input_ids"])
    # The same command resumes (nothing to do); another temperature is refused.
    assert teacher_farm(*args).returncode == 0
    other = teacher_farm(*args[:-1], "1.5")
    assert other.returncode != 0 and "temperature" in other.stderr


class _AtTemperature:
    """The reference at a temperature, with the interface ``assert_matches_reference`` expects."""

    def __init__(self, reference, temperature: float) -> None:
        self.reference, self.temperature = reference, temperature

    def topk(self, input_ids, k):
        return self.reference.topk(input_ids, k, self.temperature)


def test_the_cpu_worker_keeps_freed_memory_instead_of_faulting_it_in_again(server, prompts):
    """Each slice's blocks of megabytes are reused from the heap: no page faults once warm."""
    import psutil

    workers = [
        p
        for p in psutil.Process(server.proc.pid).children(recursive=True)
        if "Worker" in " ".join(p.cmdline())
    ]
    assert len(workers) == 1, workers
    body = {"inputs": [{"token_ids": ids} for ids in prompts * 8], "k": 64}
    score(server.url, body)  # warm: the heap grows to the working set
    before = _minor_faults(workers[0].pid)
    rows = score(server.url, body)
    faults = _minor_faults(workers[0].pid) - before
    tokens = sum(len(r.input_ids) for r in rows)
    # glibc's defaults fault every slice's blocks in anew: several faults per token scored.
    assert faults < 0.2 * tokens, f"{faults} page faults for {tokens} tokens"


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])
