"""The distillation benchmark's held-out metrics, on models whose answers are known by hand."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("distill_bench", ROOT / "benchmarks" / "distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Fixed:
    """A 'model' answering the same next-token logits at every position."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def __call__(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1).clone())


def test_metrics_of_known_models(bench):
    V = 8
    held = [torch.tensor([1, 0, 0, 3, 0]), torch.tensor([2, 5, 0])]  # 6 next-token pairs, 4 of them token 0
    peaked = Fixed(torch.tensor([2.0, 0, 0, 0, 0, 0, 0, 0]))  # argmax 0, confidence e^2 / (e^2 + 7)
    uniform = Fixed(torch.zeros(V))
    conf = math.exp(2) / (math.exp(2) + 7)
    got = bench.evaluate(peaked, peaked, held)
    assert got["kl"] == pytest.approx(0.0, abs=1e-6)
    assert got["ece"] == pytest.approx(abs(conf - 4 / 6), rel=1e-5)  # one bin: confidence vs 4/6 correct
    lq = torch.log_softmax(torch.tensor([2.0, 0, 0, 0, 0, 0, 0, 0]), -1)
    assert got["ce"] == pytest.approx(-(4 * lq[0] + 2 * lq[1]).item() / 6, rel=1e-5)
    # KL(uniform teacher || peaked student) over the whole vocabulary, the same at every position.
    kl = (torch.full((V,), 1 / V) * (torch.log(torch.full((V,), 1 / V)) - lq)).sum().item()
    assert bench.evaluate(peaked, uniform, held)["kl"] == pytest.approx(kl, rel=1e-5)
    assert bench.evaluate(uniform, uniform, held)["ce"] == pytest.approx(math.log(V), rel=1e-6)


def test_cached_teacher_answers_as_the_model(bench, tiny_model, tmp_path):
    """The real mode's teacher, computed once and read back, is the model's own distribution."""
    from transformers import LlamaForCausalLM

    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 2048, (n,), generator=gen) for n in (7, 12, 5)]
    path = tmp_path / "teacher.f16"
    cached = bench.CachedTeacher(seqs, bench.full_logprobs(tiny_model, seqs, path, batch=2))
    model = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    got, want = bench.evaluate(model, cached, seqs, batch=2), bench.evaluate(model, model, seqs, batch=2)
    assert got["kl"] == pytest.approx(0.0, abs=2e-3)  # float16 storage of the teacher's logprobs
    assert want["kl"] == pytest.approx(0.0, abs=1e-6)
    assert bench.evaluate(cached, cached, seqs)["ce"] == pytest.approx(want["ce"], rel=1e-3)
    # Read back, not recomputed, for the same tokens; recomputed for others.
    stamp = path.stat().st_mtime_ns
    again = bench.full_logprobs(tiny_model, seqs, path)
    assert path.stat().st_mtime_ns == stamp and again.shape == (24, 2048)
    assert bench.full_logprobs(tiny_model, seqs[:2], path).shape == (19, 2048)


def test_same_draws(bench):
    item = {
        "input_ids": torch.tensor([1, 2]),
        "sample_ids": torch.tensor([[3, 4]]),
        "sample_counts": torch.tensor([[60, 4]]),
    }
    other = item | {"sample_counts": torch.tensor([[59, 5]])}
    assert bench.same_draws([item], [dict(item)])
    assert not bench.same_draws([item], [other])
    assert not bench.same_draws([item], [item, item])
