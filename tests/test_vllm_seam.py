"""vLLM's internals are reached through server/vllm_seam.py alone,
and its supported range is the package's."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import tomllib

from teacher_farm.server import vllm_seam

ROOT = Path(__file__).resolve().parent.parent
SEAM = ROOT / "server" / "vllm_seam.py"
INTERNAL = ("vllm.model_executor", "vllm.v1.pool", "vllm.v1.sample", "vllm.v1.worker", "vllm.config")
SOURCES = ("server", "client", "schemas", "teacher_farm", "benchmarks", "tests")


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """Every module an ``import``, ``from ... import`` or ``importlib.import_module("...")`` names."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def _is_internal(module: str) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in INTERNAL)


def internal_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    where = path.relative_to(ROOT)
    return [f"{where}:{line}: {module}" for line, module in _imported_modules(tree) if _is_internal(module)]


def test_only_the_seam_imports_vllm_internals():
    files = [p for d in SOURCES for p in sorted((ROOT / d).rglob("*.py")) if p != SEAM]
    assert len(files) > 40
    assert [hit for path in files for hit in internal_imports(path)] == []


def test_the_check_sees_every_kind_of_import(tmp_path):
    (tmp_path / "m.py").write_text(
        "import vllm.config\nfrom vllm.v1.pool.metadata import PoolingMetadata\nfrom vllm.v1 import worker\n"
        "import importlib\nimportlib.import_module('vllm.model_executor.layers')\n"
        "from vllm import PoolingParams\n"
    )
    tree = ast.parse((tmp_path / "m.py").read_text())
    hits = [line for line, module in _imported_modules(tree) if _is_internal(module)]
    assert sorted(set(hits)) == [1, 2, 3, 5]


@pytest.mark.parametrize("version", ["0.24.0", "0.24.1+cu128", "0.32.0", "0.33.9", "0.33.0rc1"])
def test_releases_inside_the_range_raise_no_warning(version):
    assert vllm_seam.check_release(version) is None


@pytest.mark.parametrize("version", ["0.23.9", "0.34.0", "0.34.0rc1.dev12", "1.0.0", "0.11.1", "unknown"])
def test_releases_outside_the_range_warn_in_one_line(version):
    warning = vllm_seam.check_release(version)
    assert warning is not None and "\n" not in warning
    assert f"vLLM {version}" in warning and "0.24 up to 0.33" in warning


def test_release_reads_the_installed_vllm():
    import vllm

    assert vllm_seam.release() == vllm_seam.release(vllm.__version__)
    assert vllm_seam.release("0.32.0+cpu") == (0, 32, 0) and vllm_seam.release("0.24") == (0, 24)


def test_the_gpu_extra_pins_the_seams_range():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    [pin] = [req for req in extras["gpu"] if re.match(r"vllm\b", req)]
    bounds = dict(re.findall(r"(>=|<)\s*([\d.]+)", pin))
    assert tuple(map(int, bounds[">="].split("."))) == vllm_seam.OLDEST
    assert tuple(map(int, bounds["<"].split("."))) == vllm_seam.BEYOND


def test_the_seam_names_every_internal_it_promises():
    for name in (
        "Pooler",
        "PoolingParamsUpdate",
        "VllmModelForPooling",
        "batched_count_greater_than",
        "PoolingMetadata",
        "PoolingStates",
        "PoolingRunner",
        "InputBatch",
        "InputBuffers",
        "ModelConfig",
        "PoolerConfig",
    ):
        assert getattr(vllm_seam, name) is not None
    assert "LlamaForCausalLM" in vllm_seam.supported_archs()
    assert (vllm_seam.RUNNER, vllm_seam.TASK, vllm_seam.TOKEN_POOLING) == ("pooling", "token_classify", "ALL")
