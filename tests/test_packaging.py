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
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (path,) = out.glob("teacher_farm-*.whl")
    return path


def test_wheel_holds_only_the_teacher_farm_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"teacher_farm"}
    for sub in ("client/cli.py", "server/engine.py", "schemas/arrow.py", "training.py", "__init__.py"):
        assert f"teacher_farm/{sub}" in names


def test_fresh_environment_imports_teacher_farm_and_no_generic_names(wheel, tmp_path):
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, timeout=300)
    # Run outside the repository, so its folders are not on the path.
    probe = (
        "import importlib.util as u, teacher_farm, teacher_farm.schemas.errors;"
        "print(teacher_farm.__version__);"
        "print([m for m in ('client', 'server', 'schemas') if u.find_spec(m) is not None])"
    )
    proc = subprocess.run([python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    version, generic = proc.stdout.split("\n")[:2]
    assert version == teacher_farm_version()
    assert generic == "[]"
    for name in ("client", "server", "schemas"):
        failed = subprocess.run([python, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True)
        assert failed.returncode != 0 and "ModuleNotFoundError" in failed.stderr


def teacher_farm_version() -> str:
    from teacher_farm import __version__

    return __version__


def test_training_short_path_is_the_client_module():
    import teacher_farm.client.training as impl
    import teacher_farm.training as short

    assert short.kd_loss is impl.kd_loss and short.shard_paths is impl.shard_paths
    assert set(short.__all__) == set(impl.__all__)
