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
