"""Nothing lost, nothing doubled: kill -9 of the client and the server, dead servers, overload,
refusals and graceful shutdown, all on loopback and bounded in time."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import orjson
import psutil
import pyarrow.parquet as pq
import pytest

from tests.conftest import (
    API_KEY,
    ROOT,
    SAMPLE,
    Server,
    alive,
    descendants,
    kill_all,
    read_lines,
    teacher_farm,
    wait_for,
)
from tests.helpers import free_port
from tests.reference_check import assert_same_rows

pytestmark = pytest.mark.engine

FAULT_KEY = "fault-key"


def rows(out):
    return pq.read_table(sorted(out.glob("part-*.parquet"))).to_pylist()


def rejects(out, name="rejects.jsonl"):
    return [json.loads(x) for x in (out / name).read_text().splitlines()]


def cache_args(url, inp, out, key=API_KEY, *extra):
    return [
        "cache",
        "--server",
        url,
        "--api-key",
        key,
        "--input",
        str(inp),
        "--out",
        str(out),
        "--k",
        "4",
        "--rows-per-shard",
        "6",
        "--batch-lines",
        "2",
        "--concurrency",
        "2",
        "--logprob-dtype",
        "float32",
        *extra,
    ]


def start_client(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "teacher_farm.cli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until(predicate, timeout=300.0, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def committed_shards(out) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "corpus.jsonl"
    lines = read_lines(SAMPLE, 48)
    lines[5], lines[30] = "{broken", json.dumps({"id": "x", "text": ""})
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def expected(server, corpus, tmp_path_factory):
    """An uninterrupted run: what every interrupted one must end up equal to."""
    out = tmp_path_factory.mktemp("expected") / "o"
    proc = teacher_farm(*cache_args(server.url, corpus, out))
    assert proc.returncode == 0, proc.stderr
    return rows(out), rejects(out)


def audit(out, expected):
    got_rows, want_rows = rows(out), expected[0]
    assert [r["line"] for r in got_rows] == [r["line"] for r in want_rows], "a line is missing or doubled"
    assert_same_rows(got_rows, want_rows)
    assert rejects(out) == expected[1]
    assert teacher_farm("inspect", str(out), "--checksums").returncode == 0


@pytest.mark.parametrize("moment", ["at start", "after a shard", "mid shard"])
def test_client_killed_at_any_moment_then_rerun_caches_everything_once(
    server, corpus, expected, tmp_path, moment
):
    out = tmp_path / "o"
    client = start_client(*cache_args(server.url, corpus, out))
    if moment == "at start":
        wait_until(lambda: (out / "manifest.json").exists(), proc=client)
    elif moment == "after a shard":
        wait_until(lambda: committed_shards(out) >= 1, proc=client)
    else:
        wait_until(lambda: committed_shards(out) >= 2 and any(out.glob(".part-*.tmp")), proc=client)
    client.send_signal(signal.SIGKILL)
    client.wait()
    again = teacher_farm(*cache_args(server.url, corpus, out))
    assert again.returncode == 0, again.stderr
    audit(out, expected)


def test_a_dead_server_in_the_pool_is_skipped(server, corpus, expected, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    proc = teacher_farm(*cache_args(dead, corpus, tmp_path / "o", API_KEY, "--server", server.url))
    assert proc.returncode == 0, proc.stderr
    audit(tmp_path / "o", expected)


@pytest.fixture(scope="module")
def fault_server(tiny_model, tmp_path_factory):
    """A server of its own, to kill and restart; small queue and request limits; key from the env.

    Small prefill chunks make it slow enough that requests are surely in flight when it is hit.
    """
    srv = Server(
        tiny_model,
        tmp_path_factory.mktemp("fault-logs") / "server.log",
        "--max-num-batched-tokens",
        "64",
        env={
            "TEACHER_FARM_API_KEY": FAULT_KEY,
            "TEACHER_FARM_MAX_QUEUED_TOKENS": "1500",
            "TEACHER_FARM_MAX_TOKENS_PER_REQUEST": "900",
        },
    )
    srv.start()
    srv.wait_ready()
    yield srv
    srv.stop()


def test_server_refusals_name_the_bad_lines_and_the_rest_lands(fault_server, tmp_path):
    inp = tmp_path / "in.jsonl"
    docs = [{"id": f"s{i}", "text": f"short line number {i}"} for i in range(6)]
    docs[2] = {"id": "huge", "text": "many words " * 600}  # 1023 tokens after truncation: over the limit
    inp.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    proc = teacher_farm(*cache_args(fault_server.url, inp, tmp_path / "o", FAULT_KEY, "--batch-lines", "6"))
    assert proc.returncode == 0, proc.stderr
    assert [r["id"] for r in rows(tmp_path / "o")] == ["s0", "s1", "s3", "s4", "s5"]
    (rej,) = rejects(tmp_path / "o")
    assert rej["line"] == 2 and rej["id"] == "huge"
    assert (
        "refused by the server" in rej["reason"]
        and "413" in rej["reason"]
        and "limit is 900" in rej["reason"]
    )


def test_overload_answers_429_and_every_client_still_finishes(fault_server, tmp_path):
    inp = tmp_path / "in.jsonl"
    # Enough lines that the six clients, started one after another, overlap on the server.
    inp.write_text("\n".join(json.dumps({"text": f"overload line {i} " * 40}) for i in range(240)) + "\n")
    server_proc = psutil.Process(fault_server.proc.pid)
    rss_before = sum(p.memory_info().rss for p in [server_proc, *server_proc.children(recursive=True)])
    busy_before = _metric(fault_server, 'teacher_farm_errors_total{kind="ServerBusy"}')
    clients = [
        start_client(
            *cache_args(
                fault_server.url,
                inp,
                tmp_path / f"o{i}",
                FAULT_KEY,
                "--concurrency",
                "8",
                "--batch-lines",
                "1",
                "--logprob-dtype",
                "float32",
            )
        )
        for i in range(6)
    ]
    for c in clients:
        _, err = c.communicate(timeout=600)
        assert c.returncode == 0, err[-2000:]
    assert _metric(fault_server, 'teacher_farm_errors_total{kind="ServerBusy"}') > busy_before
    assert _metric(fault_server, 'teacher_farm_errors_total{kind="internal"}') == 0
    first = rows(tmp_path / "o0")
    assert [r["line"] for r in first] == list(range(240))
    for i in range(1, 6):
        assert_same_rows(rows(tmp_path / f"o{i}"), first)
    rss_after = sum(p.memory_info().rss for p in [server_proc, *server_proc.children(recursive=True)])
    assert rss_after - rss_before < 1 << 30


def test_server_killed_and_restarted_mid_run(fault_server, corpus, expected, tmp_path):
    out = tmp_path / "o"
    client = start_client(*cache_args(fault_server.url, corpus, out, FAULT_KEY))
    wait_until(lambda: committed_shards(out) >= 1, proc=client)
    engine = descendants(fault_server.proc.pid)
    assert len(engine) >= 2  # EngineCore and a Worker at least
    # The server alone, as the OOM killer would: its children must notice by themselves.
    fault_server.proc.kill()
    fault_server.proc.wait()
    try:
        wait_for(lambda: alive(engine) == [], 30, "the engine's processes to end after SIGKILL of serve")
    finally:
        kill_all(engine)
    assert client.poll() is None, "the client must wait for the server, not give up"
    fault_server.start()
    # While the engine loads, the server already answers: 503 with Retry-After, not a hang.
    loading = None
    for _ in range(600):
        try:
            loading = httpx.get(fault_server.url + "/health", timeout=2)
            break
        except httpx.TransportError:
            time.sleep(0.1)
    assert loading is not None and loading.status_code == 503 and loading.json() == {"status": "loading"}
    assert loading.headers["retry-after"]
    busy = httpx.post(
        fault_server.url + "/v1/topk",
        json={"k": 1, "inputs": [{"text": "x"}]},
        headers={"Authorization": f"Bearer {FAULT_KEY}"},
    )
    assert busy.status_code == 503 and "loading" in busy.json()["error"] and busy.headers["retry-after"]
    fault_server.wait_ready()
    _, err = client.communicate(timeout=600)
    assert client.returncode == 0, err[-3000:]
    assert "retrying" in err
    audit(out, expected)


def test_sigterm_lets_requests_in_flight_finish_and_stops_tidily(fault_server):
    raw = orjson.dumps({"k": 4, "inputs": [{"token_ids": [(7 * i) % 2000 + 3 for i in range(300)]}]})
    started, results = threading.Event(), []

    def slow_body():
        # The request is surely in flight when the signal comes: its body is still arriving.
        yield raw[:20]
        started.set()
        time.sleep(1.5)
        yield raw[20:]

    def call():
        results.append(
            httpx.post(
                fault_server.url + "/v1/topk",
                content=slow_body(),
                timeout=120,
                headers={"Authorization": f"Bearer {FAULT_KEY}", "Content-Type": "application/json"},
            )
        )

    caller = threading.Thread(target=call)
    caller.start()
    assert started.wait(30)
    time.sleep(0.3)
    engine = descendants(fault_server.proc.pid)
    fault_server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.TransportError):  # new connections are refused at once
        httpx.get(fault_server.url + "/health", timeout=2)
    caller.join(120)
    assert results[0].status_code == 200, results[0].text
    assert len(results[0].json()["results"][0]["topk_ids"]) == 300
    # uvicorn re-raises the signal once its graceful shutdown is done.
    assert fault_server.proc.wait(120) in (0, -signal.SIGTERM)
    text = fault_server.output_of_this_start()
    assert "Application shutdown complete" in text
    assert not [word for word in ("Traceback", "leaked", "Exception ignored") if word in text], text[-3000:]
    assert ") INFO " not in text, "vLLM's INFO logs should be off without -v"
    wait_for(lambda: alive(engine) == [], 30, "the engine's processes to end after SIGTERM")


def _metric(server, series: str) -> float:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {FAULT_KEY}"}).text
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[1])
    return 0.0
