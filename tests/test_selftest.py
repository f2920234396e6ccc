"""The pooled backend's start-up self-test, and what serve does when it fails (no engine started)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from teacher_farm.schemas.errors import SelfTestFailed
from teacher_farm.server import engine, scoring_model, selftest, vllm_seam
from teacher_farm.server.reduce import reduce_rows

VERSION = vllm_seam.version_string()


@pytest.fixture(autouse=True)
def fresh_self_test():
    """``pooler_self_test`` runs once per process: each test sees its own run."""
    engine.pooler_self_test.cache_clear()
    yield
    engine.pooler_self_test.cache_clear()


@pytest.fixture
def llama(tmp_path):
    """A checkpoint directory as far as choosing a backend reads it: its config."""
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    return tmp_path


def without_row_samples(*args, **kwargs):
    """reduce_rows as it was before rows masked their neighbours' extra draws."""
    kwargs.pop("row_samples", None)
    return reduce_rows(*args, **kwargs)


def with_swapped_columns(*args, **kwargs):
    """reduce_rows with its first two top-k columns swapped."""
    rows = reduce_rows(*args, **kwargs)
    return rows[:, [1, 0, *range(2, rows.shape[1])]] if args[2].k > 1 else rows


def test_the_pooler_passes_on_the_installed_vllm_in_seconds():
    start = time.perf_counter()
    selftest.check_pooler()
    assert time.perf_counter() - start < 10


def test_the_synthetic_logits_are_exact_whatever_the_batch():
    hidden, _, compute_logits = selftest.synthetic_logits()
    rows = torch.cat(hidden)
    together = compute_logits(rows)
    alone = torch.cat([compute_logits(rows[i : i + 1]) for i in range(len(rows))])
    assert torch.equal(together, alone)
    top = together.topk(2, dim=-1).values
    assert bool((top[:, 0] > top[:, 1]).all())


@pytest.mark.parametrize(
    "broken, case",
    [
        (without_row_samples, "a one-token prompt beside requests with more samples"),
        (with_swapped_columns, "a prompt split over three steps"),
    ],
)
def test_a_broken_pooler_fails_naming_the_case_and_the_vllm_release(monkeypatch, broken, case):
    monkeypatch.setattr(scoring_model, "reduce_rows", broken)
    with pytest.raises(SelfTestFailed, match=f"vLLM {VERSION}: {case}"):
        selftest.check_pooler()


def test_a_cursor_that_counts_other_tokens_fails(monkeypatch):
    real = vllm_seam.pooling_metadata

    def every_step_starts_the_prompt(prompts, params, states, scheduled, computed, pad_id):
        return real(prompts, params, states, scheduled, [0] * len(computed), pad_id)

    monkeypatch.setattr(vllm_seam, "pooling_metadata", every_step_starts_the_prompt)
    with pytest.raises(SelfTestFailed, match=f"vLLM {VERSION}: a (prompt|request) "):
        selftest.check_pooler()


def test_auto_chooses_pooled_when_the_self_test_passes(llama):
    backend = engine.choose_backend("auto", str(llama))
    assert backend.name == "pooled" and backend.arch == "LlamaForTeacherScoring"
    assert "self-test" in backend.reason


def test_auto_falls_back_to_prompt_logprobs_with_the_reason(monkeypatch, llama, caplog):
    monkeypatch.setattr(scoring_model, "reduce_rows", without_row_samples)
    backend = engine.choose_backend("auto", str(llama))
    assert backend.name == "prompt-logprobs"
    assert f"self-test on vLLM {VERSION}" in backend.reason
    assert backend.reason in caplog.text and "not pooled" in caplog.text


def test_pooled_stops_naming_the_vllm_release_and_the_reason(monkeypatch, llama):
    monkeypatch.setattr(scoring_model, "reduce_rows", without_row_samples)
    with pytest.raises(SelfTestFailed) as failed:
        engine.choose_backend("pooled", str(llama))
    message = str(failed.value)
    assert "\n" not in message and f"vLLM {VERSION}" in message and "--scoring prompt-logprobs" in message


def test_a_scoring_model_that_does_not_import_falls_back_or_stops(monkeypatch, llama):
    # None in sys.modules makes the import fail, as an internal that moved would.
    monkeypatch.setitem(sys.modules, "teacher_farm.server.scoring_model", None)
    backend = engine.choose_backend("auto", str(llama))
    assert backend.name == "prompt-logprobs" and f"does not load on vLLM {VERSION}" in backend.reason
    with pytest.raises(SelfTestFailed, match=f"--scoring pooled: .*vLLM {VERSION}"):
        engine.choose_backend("pooled", str(llama))


def test_serve_with_a_failing_self_test_stops_in_one_line(llama):
    script = textwrap.dedent(f"""
        import sys
        from teacher_farm.server import scoring_model
        from teacher_farm.server.reduce import reduce_rows

        def without_row_samples(*args, row_samples=None, **kwargs):
            return reduce_rows(*args, **kwargs)

        scoring_model.reduce_rows = without_row_samples
        from teacher_farm.cli import main
        sys.exit(main(["serve", "--model", {str(llama)!r}, "--scoring", "pooled", "--port", "1"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("teacher-farm serve: error:")]
    assert f"vLLM {VERSION}" in line and "self-test" in line and "Traceback" not in proc.stderr
