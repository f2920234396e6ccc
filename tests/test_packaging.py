"""The installed package is one namespace, ``teacher_farm``: no generic top-level modules."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("teacher_farm-*.whl")
    return path


def test_wheel_holds_only_the_teacher_farm_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"teacher_farm"}
    for sub in (
        "cli.py",
        "exits.py",
        "client/cache.py",
        "server/engine.py",
        "schemas/scoring.py",
        "training/dataset.py",
        "__init__.py",
    ):
        assert f"teacher_farm/{sub}" in names


def test_fresh_environment_imports_teacher_farm_and_no_generic_names(wheel, tmp_path):
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, timeout=300
    )
    # Run outside the repository, so its folders are not on the path.
    probe = (
        "import importlib.util as u, teacher_farm, teacher_farm.schemas.errors;"
        "print(teacher_farm.__version__);"
        "print([m for m in ('client', 'server', 'schemas', 'training') if u.find_spec(m) is not None])"
    )
    proc = subprocess.run([python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    version, generic = proc.stdout.split("\n")[:2]
    assert version == teacher_farm_version()
    assert generic == "[]"
    for name in ("client", "server", "schemas", "training"):
        failed = subprocess.run(
            [python, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True
        )
        assert failed.returncode != 0 and "ModuleNotFoundError" in failed.stderr


def teacher_farm_version() -> str:
    from teacher_farm import __version__

    return __version__


def test_a_client_only_install_caches_and_inspects_without_torch_vllm_or_fastapi(wheel, tmp_path):
    """``pip install teacher-farm`` (no extras) on a node without a GPU: the client's whole job works."""
    from tests.conftest import stand_in_teacher

    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python, command = env / "bin" / "python", env / "bin" / "teacher-farm"
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True, timeout=600
    )
    assert install.returncode == 0, install.stderr[-2000:]
    absent = subprocess.run(
        [
            python,
            "-c",
            "import importlib.util as u; print([m for m in ('torch', 'vllm', 'fastapi', 'transformers') "
            "if u.find_spec(m)])",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert absent.stdout.strip() == "[]", absent.stdout + absent.stderr
    help_text = subprocess.run(
        [command, "cache", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert help_text.returncode == 0 and "--server" in help_text.stdout, help_text.stderr
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(f'{{"id": "d{i}", "text": "line {i}"}}\n' for i in range(40)))
    with stand_in_teacher(tokens_per_line=24) as url:
        run = subprocess.run(
            [
                command,
                "cache",
                "--server",
                url,
                "--input",
                str(corpus),
                "--out",
                str(tmp_path / "out"),
                "--k",
                "8",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert run.returncode == 0, run.stderr[-2000:]
    inspect = subprocess.run(
        [command, "inspect", str(tmp_path / "out"), "--checksums"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert inspect.returncode == 0 and "rows:       40" in inspect.stdout, inspect.stdout + inspect.stderr
