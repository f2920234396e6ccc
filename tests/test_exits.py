"""Quiet, tidy runs and no orphaned engine: what a person sees around a run, and what it leaves behind.

Each test starts its own engine (a minute on a CPU) because each ends one differently: a normal
exit, Ctrl-C, SIGTERM, SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, SAMPLE, Server, read_lines

pytestmark = pytest.mark.engine

UNTIDY = ("Traceback", "leaked", "Exception ignored")


def descendants(pid: int) -> list[psutil.Process]:
    """Every live process started under ``pid`` (vLLM's EngineCore, its Workers, ...)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` still running (a zombie has ended; only its exit status is left)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def kill_all(procs: list[psutil.Process]) -> None:
    for p in alive(procs):
        p.kill()


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"not within {timeout} s: {what}")


def local_cache(inp, out, *extra) -> list[str]:
    return [sys.executable, "-m", "teacher_farm.client.cli", "cache", "--model", str(extra[0]), "--dtype", "float32",
            "--enforce-eager", "--max-model-len", "1024", "--gpu-memory-utilization", "0.2",
            "--input", str(inp), "--out", str(out), "--k", "4", *extra[1:]]


def start(args: list[str], log_path) -> tuple[subprocess.Popen, object]:
    log = open(log_path, "w+b")
    return subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log


def output(log) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(read_lines(SAMPLE, 8)) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def long_corpus(tmp_path):
    """Enough work that a run is still scoring when it is interrupted."""
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(read_lines(SAMPLE) * 40) + "\n", encoding="utf-8")
    return path


def test_a_demo_style_run_prints_progress_and_summary_and_nothing_untidy(tiny_model, corpus, tmp_path):
    proc, log = start(local_cache(corpus, tmp_path / "out", tiny_model), tmp_path / "log")
    try:
        assert proc.wait(600) == 0, output(log)[-3000:]
    finally:
        proc.kill()
    text = output(log)
    assert "8 rows" in text and "bytes/token" in text
    assert not [word for word in UNTIDY if word in text], text[-3000:]
    assert ") INFO " not in text, "vLLM's INFO logs should be off without -v"
    # float16 logprobs by default
    schema = pq.read_schema(next((tmp_path / "out").glob("part-*.parquet")))
    assert "halffloat" in str(schema.field("topk_logprobs").type), schema


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_an_interrupted_in_process_cache_says_it_is_resumable_and_exits_tidily(tiny_model, long_corpus, tmp_path, sig, code):
    proc, log = start(local_cache(long_corpus, tmp_path / "out", tiny_model, "--rows-per-shard", "64"), tmp_path / "log")
    engine = []
    try:
        wait_for(lambda: (tmp_path / "out" / "manifest.json").exists() or proc.poll() is not None, 600, "the run to start")
        time.sleep(2)
        engine = descendants(proc.pid)
        proc.send_signal(sig)
        assert proc.wait(120) == code, output(log)[-3000:]
        text = output(log)
        assert "resumable" in text
        assert not [word for word in UNTIDY if word in text], text[-3000:]
        wait_for(lambda: alive(engine) == [], 30, "the engine's processes to end")
    finally:
        proc.kill()
        kill_all(engine)


def test_sigkill_of_an_in_process_cache_takes_its_engine_with_it(tiny_model, long_corpus, tmp_path):
    proc, log = start(local_cache(long_corpus, tmp_path / "out", tiny_model), tmp_path / "log")
    engine = []
    try:
        wait_for(lambda: (tmp_path / "out" / "manifest.json").exists() or proc.poll() is not None, 600, "the run to start")
        assert proc.poll() is None, output(log)[-3000:]
        engine = descendants(proc.pid)
        assert len(engine) >= 2  # EngineCore and a Worker at least
        proc.kill()  # the process alone, as the OOM killer would: its children must notice by themselves
        proc.wait()
        wait_for(lambda: alive(engine) == [], 30, "the engine's processes to end after SIGKILL")
    finally:
        proc.kill()
        kill_all(engine)


def test_sigkill_of_serve_takes_its_engine_with_it(tiny_model, tmp_path):
    srv = Server(tiny_model, tmp_path / "server.log")
    srv.start()
    engine = []
    try:
        srv.wait_ready()
        engine = descendants(srv.proc.pid)
        assert len(engine) >= 2
        os.kill(srv.proc.pid, signal.SIGKILL)  # the server alone: its children must notice by themselves
        srv.proc.wait()
        wait_for(lambda: alive(engine) == [], 30, "the engine's processes to end after SIGKILL")
    finally:
        kill_all(engine)
        srv.stop(signal.SIGKILL)


def test_serve_stops_tidily_on_sigterm(tiny_model, tmp_path):
    srv = Server(tiny_model, tmp_path / "server.log")
    srv.start()
    engine = []
    try:
        srv.wait_ready()
        engine = descendants(srv.proc.pid)
        assert srv.stop(signal.SIGTERM) == 0
        text = srv.log_path.read_text(errors="replace")
        assert not [word for word in UNTIDY if word in text], text[-3000:]
        assert ") INFO " not in text
        wait_for(lambda: alive(engine) == [], 30, "the engine's processes to end")
    finally:
        kill_all(engine)
        srv.stop(signal.SIGKILL)
