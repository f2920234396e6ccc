"""Tidy exits and no orphaned engine: what a person sees when a run ends early, and what it leaves behind.

Each engine test starts its own engine (a minute on a CPU) because each ends one differently:
Ctrl-C, SIGKILL. A normal run's output is checked in test_local_mode; serve's SIGKILL and SIGTERM
in test_faults, on the server it already kills and stops; SIGTERM of a cache run needs no engine.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import (
    ROOT,
    SAMPLE,
    alive,
    descendants,
    engine_timeout,
    kill_all,
    read_lines,
    stand_in_teacher,
    wait_exit,
    wait_for,
)

UNTIDY = ("Traceback", "leaked", "Exception ignored")


def local_cache(inp, out, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "teacher_farm.cli",
        "cache",
        "--model",
        str(extra[0]),
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
        str(out),
        "--k",
        "4",
        *extra[1:],
    ]


def default_sigint() -> None:
    # A suite started in the background (``make test &``) runs with SIGINT ignored, and children
    # inherit that: the run under test must get Ctrl-C as a person's shell would deliver it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args: list[str], log_path) -> tuple[subprocess.Popen, object]:
    log = open(log_path, "w+b")
    proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, preexec_fn=default_sigint)
    return proc, log


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


@pytest.mark.engine
def test_an_interrupted_in_process_cache_says_it_is_resumable_and_exits_tidily(
    tiny_model, long_corpus, tmp_path
):
    proc, log = start(
        local_cache(long_corpus, tmp_path / "out", tiny_model, "--rows-per-shard", "64"), tmp_path / "log"
    )
    engine = []
    try:
        wait_for(
            lambda: (tmp_path / "out" / "manifest.json").exists() or proc.poll() is not None,
            engine_timeout(),
            "the run to start scoring",
        )
        time.sleep(2)
        engine = descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        assert wait_exit(proc, "the run to stop after Ctrl-C") == 130, output(log)[-3000:]
        text = output(log)
        assert "resumable" in text
        assert not [word for word in UNTIDY if word in text], text[-3000:]
        wait_for(lambda: alive(engine) == [], 30, "the engine's processes to end")
    finally:
        proc.kill()
        kill_all(engine)


def test_sigterm_stops_a_cache_run_as_ctrl_c_does_with_its_own_status(tmp_path):
    """Against an instant stand-in teacher: what SIGTERM does to the run does not depend on the engine."""
    corpus = tmp_path / "in.jsonl"
    corpus.write_text("".join(f'{{"text": "line {i}"}}\n' for i in range(200_000)), encoding="utf-8")
    out = tmp_path / "out"
    with stand_in_teacher(512) as url:
        proc, log = start(
            [
                sys.executable,
                "-m",
                "teacher_farm.cli",
                "cache",
                "--server",
                url,
                "--input",
                str(corpus),
                "--out",
                str(out),
                "--k",
                "16",
                "--rows-per-shard",
                "256",
            ],
            tmp_path / "log",
        )
        try:
            wait_for(
                lambda: len(list(out.glob("part-*.parquet"))) >= 2 or proc.poll() is not None,
                300,
                "the run to commit two shards",
            )
            assert proc.poll() is None, output(log)[-3000:]
            proc.send_signal(signal.SIGTERM)
            assert wait_exit(proc, "the run to stop after SIGTERM", 120) == 128 + signal.SIGTERM, output(log)[
                -3000:
            ]
            text = output(log)
            assert "resumable" in text
            assert not [word for word in UNTIDY if word in text], text[-3000:]
        finally:
            proc.kill()


@pytest.mark.engine
def test_sigkill_of_an_in_process_cache_takes_its_engine_with_it(tiny_model, long_corpus, tmp_path):
    proc, log = start(local_cache(long_corpus, tmp_path / "out", tiny_model), tmp_path / "log")
    engine = []
    try:
        wait_for(
            lambda: (tmp_path / "out" / "manifest.json").exists() or proc.poll() is not None,
            engine_timeout(),
            "the run to start scoring",
        )
        assert proc.poll() is None, output(log)[-3000:]
        engine = descendants(proc.pid)
        assert len(engine) >= 2  # EngineCore and a Worker at least
        proc.kill()  # the process alone, as the OOM killer would: its children must notice by themselves
        proc.wait()
        wait_for(lambda: alive(engine) == [], 30, "the engine's processes to end after SIGKILL")
    finally:
        proc.kill()
        kill_all(engine)
