"""The online teacher against a real ``teacher-farm serve``: the same batches a cache gives, bounded
prefetch, failover to a live server, and the throughput it sustains."""

from __future__ import annotations

import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from teacher_farm.training import OnlineTeacher, TopkDataset, TopkTailKLLoss, collate_topk  # noqa: E402
from tests.conftest import API_KEY, SAMPLE, teacher_farm  # noqa: E402
from tests.helpers import free_port  # noqa: E402

SCORING = {"k": 8, "temperature": 1.5, "targets": "both", "samples": 16, "seed": 3}


@pytest.fixture(scope="module")
def cached_batches(server, tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    """Batches of 4 from a cache of 24 sample lines written by ``teacher-farm cache`` with SCORING."""
    src = tmp_path_factory.mktemp("online") / "in.jsonl"
    src.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:24]))
    out = src.parent / "cache"
    proc = teacher_farm(
        "cache",
        "--server",
        server.url,
        "--api-key",
        API_KEY,
        "--input",
        str(src),
        "--out",
        str(out),
        "--max-length",
        "128",
        "--k",
        str(SCORING["k"]),
        "--temperature",
        str(SCORING["temperature"]),
        "--targets",
        SCORING["targets"],
        "--samples",
        str(SCORING["samples"]),
        "--seed",
        str(SCORING["seed"]),
        "--logprob-dtype",
        "float32",
        "--sample-logprobs",  # what the online teacher receives
    )
    assert proc.returncode == 0, proc.stderr
    items = list(TopkDataset(out))
    return [collate_topk(items[i : i + 4]) for i in range(0, len(items), 4)]


def test_online_batches_are_the_cached_batches(server, cached_batches):
    """Cached or online, a training loop gets the same keys, shapes, dtypes and values."""
    source = [
        {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "line": b["line"]}
        for b in cached_batches
    ]
    online = list(OnlineTeacher(source, server.url, api_key=API_KEY, **SCORING))
    assert len(online) == len(cached_batches)
    for got, want in zip(online, cached_batches):
        assert sorted(got) == sorted(want)
        for key, value in want.items():
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
            if value.is_floating_point():
                torch.testing.assert_close(got[key], value, atol=1e-4, rtol=1e-4, msg=key)
            else:
                assert torch.equal(got[key], value), key
    assert online[0]["temperature"][0].item() == 1.5
    # The losses see the temperature the targets were made at.
    logits = torch.randn(*online[0]["input_ids"].shape, 2048)
    assert torch.isfinite(TopkTailKLLoss(temperature=1.5)(logits, online[0]))
    with pytest.raises(ValueError, match="temperature"):
        TopkTailKLLoss(temperature=1.0)(logits, online[0])


def test_prefetch_is_bounded_and_plain_token_batches_work(server):
    rng = np.random.default_rng(0)
    pulled = []

    def source():
        for i in range(6):
            pulled.append(i)
            yield torch.from_numpy(rng.integers(3, 2000, (2, 16 + i)))  # (B, T), every token real

    seen = []
    for batch in OnlineTeacher(source(), [server.url], api_key=API_KEY, k=4, prefetch=2):
        seen.append(len(pulled))
        assert batch["topk_ids"].shape[-1] == 4 and "sample_ids" not in batch
    assert seen == [2, 3, 4, 5, 6, 6]  # never more than 2 batches requested ahead of the step
    # Sequences of different lengths as a list; lines are counted when the batches carry none.
    ragged = [[np.arange(5, 12), np.arange(20, 23)]]
    (batch,) = OnlineTeacher(ragged, server.url, api_key=API_KEY, k=4, targets="sampled", samples=8)
    assert (
        batch["lengths"].tolist() == [7, 3] and batch["line"].tolist() == [0, 1] and "topk_ids" not in batch
    )
    assert (batch["sample_counts"].sum(-1)[batch["attention_mask"].bool()] == 8).all()


def test_a_dead_server_in_the_pool_is_failed_over(server):
    dead = f"http://127.0.0.1:{free_port()}"
    batches = [torch.arange(3, 40).view(1, -1)] * 3
    got = list(OnlineTeacher(batches, [dead, server.url], api_key=API_KEY, k=4, retry_for_s=60))
    assert len(got) == 3 and all(torch.equal(g["topk_ids"], got[0]["topk_ids"]) for g in got)


def test_online_throughput(server, capsys):
    """Tokens per second the online teacher sustains, with and without prefetch (printed; see docs)."""
    rng = np.random.default_rng(1)
    batches = [torch.from_numpy(rng.integers(3, 2000, (8, 128))) for _ in range(16)]
    rates = {}
    for prefetch in (1, 4):
        t0 = time.perf_counter()
        n = sum(
            int(b["attention_mask"].sum())
            for b in OnlineTeacher(batches, server.url, api_key=API_KEY, k=16, prefetch=prefetch)
        )
        rates[prefetch] = n / (time.perf_counter() - t0)
    with capsys.disabled():
        print(
            "\nonline teacher, k=16, 16 batches of 8 x 128 tokens: "
            + ", ".join(f"prefetch {p}: {r:,.0f} tokens/s" for p, r in rates.items())
        )
    assert all(r > 0 for r in rates.values())
