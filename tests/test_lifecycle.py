"""The parent watch of ``server/lifecycle.py`` on its own, without an engine (seconds, not minutes);
tests/test_exits.py kills real ``serve`` and ``cache --model`` processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from importlib.metadata import entry_points

import psutil
import tomllib

from teacher_farm.server import lifecycle
from tests.conftest import ROOT

# A stand-in for the engine's owner: starts a child as vLLM would (the mark in its environment), with
# the plugin loaded in it, prints the child's pid and then waits to be killed.
OWNER = textwrap.dedent("""
    import os, subprocess, sys, time
    from teacher_farm.server.lifecycle import mark_engine_owner
    mark_engine_owner()
    child = subprocess.Popen([sys.executable, "-c",
        "import time; from teacher_farm.server.lifecycle import register; register(); time.sleep(600)"])
    print(child.pid, flush=True)
    time.sleep(600)
""")


def test_a_child_ends_when_its_owner_is_killed():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(owner.stdout.readline()))
    try:
        time.sleep(2)  # the child is up and watching
        assert child.is_running()
        assert child.pid == os.getpgid(child.pid), "the child left its owner's process group"
        owner.kill()
        owner.wait()
        child.wait(timeout=lifecycle.POLL_S + lifecycle.GRACE_S + 5)
    finally:
        owner.kill()
        if child.is_running():
            child.kill()


def test_the_owner_and_unmarked_processes_are_left_alone(monkeypatch):
    monkeypatch.setattr(lifecycle, "_watching", False)
    monkeypatch.delenv(lifecycle.OWNER_ENV, raising=False)
    lifecycle.register()
    monkeypatch.setenv(lifecycle.OWNER_ENV, str(os.getpid()))
    lifecycle.register()
    assert lifecycle._watching is False


def test_the_plugin_is_registered_with_vllm():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][
        "vllm.general_plugins"
    ]
    assert "teacher_farm.server.lifecycle:register" in declared.values()
    installed = {e.value for e in entry_points(group="vllm.general_plugins")}
    assert "teacher_farm.server.lifecycle:register" in installed, "reinstall: pip install -e ."


def test_the_scoring_model_keeps_freed_memory_on_a_cpu_whoever_starts_its_engine(monkeypatch):
    """An engine started outside teacher-farm (no owner mark) still hosts the reduction: without the
    setting its worker faults every slice's blocks in anew, and halves the k=64 rate about every other run."""
    from teacher_farm.schemas.scoring import Scoring
    from teacher_farm.server import scoring_model, vllm_seam

    monkeypatch.delenv(lifecycle.OWNER_ENV, raising=False)
    calls: list[bool] = []
    monkeypatch.setattr(scoring_model, "keep_freed_memory", lambda: calls.append(True) or True)
    monkeypatch.setattr(vllm_seam, "on_cpu", lambda: True)
    scoring_model.ReductionPooler(lambda h: h, 256, Scoring(k=16))
    assert calls == [True]
    # A rank whose rows are discarded reduces nothing; and off a CPU the setting does not apply.
    scoring_model.ReductionPooler(lambda h: h, 256, Scoring(k=16), reduces=False)
    monkeypatch.setattr(vllm_seam, "on_cpu", lambda: False)
    scoring_model.ReductionPooler(lambda h: h, 256, Scoring(k=16))
    assert calls == [True]
