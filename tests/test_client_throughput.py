"""The client keeps up with a farm: >= 400k tokens per second of its own CPU, in bounded memory.

Wall-clock rates on a shared machine depend on the neighbours; the client's CPU time does not, so
the test bounds tokens per CPU-second (a client with one core to itself runs at least that fast).
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_one_client_process_caches_over_400k_tokens_per_cpu_second_against_an_instant_teacher(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/client_throughput.py", "--seconds", "4", "--json", "--work", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens"] >= 1_900_000
    assert result["tokens"] / result["client_cpu_s"] >= 400_000, result
    assert result["rss_mib_max"] < 1024, result


def test_the_cache_command_pins_mallocs_mmap_threshold(monkeypatch, tmp_path):
    """Without it glibc's rising mmap threshold lets a long run's resident memory creep up."""
    from teacher_farm import memory
    from teacher_farm.client import cli

    calls = []
    monkeypatch.setattr(memory, "pin_mmap_threshold", lambda: calls.append(True) or True)

    class Done:
        def render(self):
            return "done"

    async def no_run(opts, teacher):
        await teacher.aclose()
        return Done()

    monkeypatch.setattr("teacher_farm.client.cache.run_cache", no_run)
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    assert cli.cache_main(["--server", "http://127.0.0.1:9", "--input", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "o")]) == 0
    assert calls == [True]


def test_pinning_the_threshold_takes_effect_on_glibc(monkeypatch):
    import platform

    from teacher_farm.memory import pin_mmap_threshold

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    if platform.libc_ver()[0] == "glibc":
        assert pin_mmap_threshold() is True
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert pin_mmap_threshold() is False
