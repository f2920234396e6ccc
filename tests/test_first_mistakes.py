"""A user's first mistakes end in one line that says what to do, a non-zero exit and no traceback.

None of these needs an engine: the mistakes are caught before one would start.
"""

from __future__ import annotations

import time

import pytest

from teacher_farm.schemas import __version__
from teacher_farm.server.preflight import exposure_warning
from tests.conftest import SAMPLE, teacher_farm
from tests.helpers import free_port, one_line_error


def test_version():
    proc = teacher_farm("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"teacher-farm {__version__}"


def test_model_at_a_missing_path(tmp_path):
    proc = teacher_farm(
        "cache", "--model", str(tmp_path / "nope"), "--input", str(SAMPLE), "--out", str(tmp_path / "o")
    )
    line = one_line_error(proc)
    assert "--model" in line and "no such directory" in line
    assert not (tmp_path / "o").exists()


def test_model_that_is_not_a_model(tmp_path):
    proc = teacher_farm(
        "cache", "--model", str(tmp_path), "--input", str(SAMPLE), "--out", str(tmp_path / "o")
    )
    assert "not a model" in one_line_error(proc)
    proc = teacher_farm("cache", "--model", str(SAMPLE), "--input", str(SAMPLE), "--out", str(tmp_path / "o"))
    assert "not a model" in one_line_error(proc)


def test_serve_refuses_a_model_that_is_not_there_before_loading_anything(tmp_path):
    proc = teacher_farm("serve", "--model", str(tmp_path / "nope"), "--port", str(free_port()), timeout=120)
    assert "no such directory" in one_line_error(proc)


def test_serve_whose_engine_fails_to_start_exits_for_its_supervisor(tiny_model):
    """No engine is left answering 'failed' for ever: serve says why and exits with status 3."""
    proc = teacher_farm(
        "serve",
        "--model",
        str(tiny_model),
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
        "--max-model-len",
        "999999",
        "--enforce-eager",
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "the engine failed to start" in proc.stderr and "max_model_len" in proc.stderr


def test_input_that_does_not_exist(tmp_path):
    proc = teacher_farm(
        "cache",
        "--server",
        "http://127.0.0.1:9",
        "--input",
        str(tmp_path / "missing.jsonl"),
        "--out",
        str(tmp_path / "o"),
    )
    line = one_line_error(proc)
    assert "missing.jsonl" in line and "no such file" in line


def test_a_server_that_refuses_connections_is_named_with_advice(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    proc = teacher_farm(
        "cache", "--server", url, "--input", str(SAMPLE), "--out", str(tmp_path / "o"), "--retry-for", "3"
    )
    line = one_line_error(proc)
    assert url in line and "teacher-farm serve" in line and "starting" in line
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(
    "host, has_key, warns",
    [
        ("0.0.0.0", False, True),
        ("10.1.2.3", False, True),
        ("::", False, True),
        ("127.0.0.1", False, False),
        ("localhost", False, False),
        ("::1", False, False),
        ("0.0.0.0", True, False),
    ],
)
def test_serve_warns_when_anyone_on_the_network_can_use_the_teacher(host, has_key, warns):
    warning = exposure_warning(host, has_key)
    assert (warning is not None) == warns
    if warns:
        assert "\n" not in warning and "anyone on the network" in warning and "--api-key" in warning
