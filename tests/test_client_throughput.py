"""The client keeps up with a farm: no Python line runs per token on the cache's path, and malloc is tamed.

Its throughput on this machine is measured by ``benchmarks/client_throughput.py`` (figures in the
README); a rate asserted here would fail on a slower CPU and say nothing on a faster one. What a
test can pin on any machine is the shape of the work: the Python lines the client runs must not
grow with the tokens it writes.
"""

from __future__ import annotations

import contextlib
import io
import sys
import threading
from collections import Counter

import orjson

from tests.conftest import ROOT, stand_in_teacher

OURS = tuple(str(ROOT / d) for d in ("client", "schemas", "server", "teacher_farm"))


def python_lines_of_a_cache_run(tmp_path, tokens_per_line: int, lines: int = 48) -> Counter:
    """Lines of our own code executed while caching ``lines`` documents of ``tokens_per_line`` tokens each."""
    with stand_in_teacher(tokens_per_line) as url:
        work = tmp_path / str(tokens_per_line)
        work.mkdir()
        corpus = work / "corpus.jsonl"
        corpus.write_bytes(
            b"".join(orjson.dumps({"id": f"d{i}", "text": "lorem ipsum"}) + b"\n" for i in range(lines))
        )
        counts: Counter = Counter()

        def local(frame, event, arg):
            if event == "line":
                counts[frame.f_code.co_filename] += 1
            return local

        def trace(frame, event, arg):
            return local if frame.f_code.co_filename.startswith(OURS) else None

        from teacher_farm.cli import cache_main

        threading.settrace(trace)
        sys.settrace(trace)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                code = cache_main(
                    [
                        "--server",
                        url,
                        "--input",
                        str(corpus),
                        "--out",
                        str(work / "cache"),
                        "--k",
                        "16",
                        "--max-length",
                        str(1 << 19),
                    ]
                )
        finally:
            sys.settrace(None)
            threading.settrace(None)
        assert code == 0
        return counts


def test_the_cache_pipeline_runs_no_python_line_per_token(tmp_path):
    short = python_lines_of_a_cache_run(tmp_path, 64)
    long = python_lines_of_a_cache_run(tmp_path, 64 * 32)
    # 32 times the tokens: the same requests, files and rows, so about the same lines (a few more
    # for larger buffers). One Python line per token would add ~100k.
    assert sum(long.values()) < 1.25 * sum(short.values()), (
        sum(short.values()),
        sum(long.values()),
        long.most_common(5),
    )


def test_the_cache_command_pins_mallocs_mmap_threshold(monkeypatch, tmp_path):
    """Without it glibc's rising mmap threshold lets a long run's resident memory creep up."""
    from teacher_farm import cli, memory

    calls = []
    monkeypatch.setattr(memory, "pin_mmap_threshold", lambda: calls.append(True) or True)

    class Done:
        def render(self):
            return "done"

    async def no_run(opts, teacher, files=None):
        await teacher.aclose()
        return Done()

    monkeypatch.setattr("teacher_farm.client.cache.run_cache", no_run)
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    assert (
        cli.cache_main(
            [
                "--server",
                "http://127.0.0.1:9",
                "--input",
                str(tmp_path / "a.jsonl"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    assert calls == [True]


def test_pinning_the_threshold_takes_effect_on_glibc(monkeypatch):
    import platform

    from teacher_farm.memory import pin_mmap_threshold

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    if platform.libc_ver()[0] == "glibc":
        assert pin_mmap_threshold() is True
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert pin_mmap_threshold() is False
