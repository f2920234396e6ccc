"""The house rules, checked: the import layers of pyproject.toml's import-linter contracts hold.

import-linter reads a package's folder; the editable install maps the sub-packages from the
repository's top-level folders, so the check runs on a built copy of the package.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("built") / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
        cwd=target.parent,
    )
    return target


def lint_imports(site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=site,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_import_contract_holds(built):
    proc = lint_imports(built)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "4 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize(
    "module, line, contract",
    [
        ("client/inspect.py", "import teacher_farm.server.engine", "the client runs on any node"),
        ("client/inspect.py", "import torch", "the client runs on any node"),
        (
            "training/reader.py",
            "import teacher_farm.server.packed",
            "the student's side never imports the server",
        ),
        ("schemas/wire.py", "import teacher_farm.client.inputs", "schemas at the bottom"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(built, tmp_path, module, line, contract):
    site = tmp_path / "site"
    shutil.copytree(built, site)
    path = site / "teacher_farm" / module
    path.write_text(path.read_text() + f"\n{line}  # added by the test\n")
    proc = lint_imports(site)
    assert proc.returncode != 0
    broken = proc.stdout.split("Broken contracts", 1)[-1]
    assert contract in " ".join(broken.split()), proc.stdout[-4000:]
