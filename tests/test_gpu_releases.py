"""The oldest and newest supported GPU releases of vLLM, checked here without a GPU.

Each release's wheel comes from the package registry once (tests/gpu_releases.py caches its Python
sources); the check runs in a process of its own with those sources first on ``PYTHONPATH``, so this
process keeps the installed CPU build. Without the registry the tests skip, naming what failed.

On a release whose Model Runner V2 calls the pooler (0.33), the self-test's cases also run through
its ``PoolingRunner.pool``. Its start-up profile run (``dummy_pooler_run``) is not driven: it builds
the cursor in pinned memory, which needs CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from teacher_farm.server import vllm_seam
from tests import gpu_releases

OLDEST, NEWEST = vllm_seam.VERIFIED
ROOT = Path(__file__).resolve().parent.parent


def sources(version: str) -> Path:
    try:
        return gpu_releases.release_sources(version)
    except gpu_releases.RegistryUnreachable as exc:
        pytest.skip(f"vLLM {version}'s wheel cannot be had here: {exc}")


def test_the_verified_releases_are_the_ends_of_the_supported_range():
    assert vllm_seam.release(OLDEST)[:2] == vllm_seam.OLDEST
    assert vllm_seam.release(OLDEST) < vllm_seam.release(NEWEST) and vllm_seam.check_release(NEWEST) is None


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_the_pooled_backend_passes_on_the_release(version):
    sources(version)
    proc = gpu_releases.check_release(version)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"vLLM {version} from {sources(version)}" in proc.stdout
    assert "LlamaForTeacherScoring registered; V1 runner path passed" in proc.stdout
    v2 = "V2 PoolingRunner path passed" if version == NEWEST else "no V2 PoolingRunner that calls a pooler"
    assert f"vLLM {version}: {v2}" in proc.stdout


def test_a_broken_pooler_fails_through_the_v2_runner():
    script = textwrap.dedent("""
        from teacher_farm.server import scoring_model, selftest
        from teacher_farm.server.reduce import reduce_rows
        from tests import gpu_releases

        def with_swapped_columns(*args, **kwargs):
            rows = reduce_rows(*args, **kwargs)
            return rows[:, [1, 0, *range(2, rows.shape[1])]] if args[2].k > 1 else rows

        scoring_model.reduce_rows = with_swapped_columns
        selftest.check_pooler(gpu_releases.v2_steps)
    """)
    env = {**os.environ, "PYTHONPATH": str(sources(NEWEST))}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    assert (
        f"SelfTestFailed: pooled scoring self-test on vLLM {NEWEST}: a prompt split over three steps"
        in proc.stderr
    )


def test_an_unreachable_registry_skips_and_a_missing_release_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHER_FARM_WHEEL_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    with pytest.raises(gpu_releases.RegistryUnreachable, match="vllm==0.33.0"):
        gpu_releases.release_sources("0.33.0")
    monkeypatch.setenv("PIP_INDEX_URL", "https://pypi.org/simple")
    with pytest.raises(RuntimeError) as failed:
        gpu_releases.release_sources("0.0.0")
    if isinstance(failed.value, gpu_releases.RegistryUnreachable):
        pytest.skip(str(failed.value))
    assert "pip download vllm==0.0.0 failed" in str(failed.value)
    assert [p.name for p in tmp_path.iterdir()] == []
