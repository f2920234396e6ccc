"""The reduction's kernels: every way of a step gives the same answer,
and the fastest where it runs is chosen."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from teacher_farm.server import kernels

V = 1000  # not a multiple of any block: the last block is padded


def rows_with_ties(seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 3, size=(33, V)).astype(np.float32)
    x[1] = 0.5  # a row of ties
    x[2, ::3] = -np.inf  # masked tokens
    x[3, :20] = x[3].max() + 1  # ties at the top
    x[4, -5:] = x[4].max() + 1 + np.arange(5)  # the largest in the padded last block
    return torch.from_numpy(x)


@pytest.mark.parametrize("way", sorted(kernels.topk_ways(torch.device("cpu"))))
@pytest.mark.parametrize("k", [1, 7, 16, 64, 256, V - 1])
def test_every_topk_way_gives_torch_topks_values_and_ids_holding_them(way, k):
    x = rows_with_ties(k)
    values, ids = kernels.topk_ways(torch.device("cpu"))[way](x, k)
    expected = x.topk(k, dim=-1)
    assert torch.equal(values, expected.values)
    assert torch.equal(x.gather(1, ids.to(torch.int64)), values)
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()  # no id twice
    untied = np.ones(len(x), bool)
    untied[1:4] = False
    assert torch.equal(ids[untied].to(torch.int64), expected.indices[untied])


def test_a_block_select_reads_a_strided_view():
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(8, 2 * V)).astype(np.float32))[:, ::2]
    values, ids = kernels.topk_blocks(16, kernels.topk_torch)(x, 5)
    assert torch.equal(values, x.topk(5, dim=-1).values) and torch.equal(ids, x.topk(5, dim=-1).indices)


def test_both_entropies_agree_and_are_zero_where_p_is_zero():
    lp = torch.log_softmax(rows_with_ties(1), dim=-1)
    assert torch.allclose(kernels.entropy_dot(lp), kernels.entropy_entr(lp), rtol=1e-5, atol=1e-6)
    one_hot = torch.full((1, 8), -torch.inf)
    one_hot[0, 3] = 0.0
    assert kernels.entropy_dot(one_hot).item() == 0.0 == kernels.entropy_entr(one_hot).item()


def test_the_choice_is_the_fastest_of_the_ways_timed_at_every_k_bucket():
    chosen = kernels.choose(vocab=2048, k_max=100, rows=16)
    assert sorted(chosen.topk) == [16, 64, 100]
    for bucket, name in chosen.topk.items():
        timed = chosen.timings[f"topk k<={bucket}"]
        assert set(timed) == set(kernels.topk_ways(torch.device("cpu")))
        assert timed[name] == min(timed.values())
    assert chosen.timings["entropy"][chosen.entropy] == min(chosen.timings["entropy"].values())


def test_a_way_that_gives_other_values_is_never_chosen(monkeypatch):
    ways = kernels.topk_ways(torch.device("cpu"))

    def wrong(x, k):  # instant, and wrong
        return torch.zeros(x.shape[0], k), torch.zeros(x.shape[0], k, dtype=torch.int64)

    monkeypatch.setattr(kernels, "topk_ways", lambda device: {**ways, "wrong": wrong})
    chosen = kernels.choose(vocab=512, k_max=16, rows=8)
    assert chosen.topk[16] != "wrong" and "wrong" not in chosen.timings["topk k<=16"]


def test_select_uses_the_choice_for_the_reduction_and_reports_it(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "_ACTIVE", kernels.Kernels())
    report = tmp_path / "kernels.json"
    chosen = kernels.select(1024, 64, "cpu", slice_rows=32, report=str(report))
    assert kernels.active() is chosen and kernels.select(1024, 16, "cpu") is chosen  # once per process
    summary = json.loads(report.read_text())
    assert summary["vocab"] == 1024 and summary["rows"] == 32 and set(summary["topk"]) == {"16", "64"}
    x = rows_with_ties(2)[:, :1024]
    assert torch.equal(chosen.top_k(x, 40)[0], x.topk(40, dim=-1).values)


@pytest.mark.parametrize("k", [0, 1, 16, 64])
@pytest.mark.parametrize("peak", [0.5, 4.0, 12.0])
def test_ranks_from_the_top_k_where_the_target_is_in_it_equal_the_full_count(k, peak):
    from teacher_farm.server.reduce import rank_of

    g = torch.Generator().manual_seed(k)
    lp = torch.log_softmax(torch.randn(300, 2000, generator=g) * peak, dim=-1)
    lp[5] = lp[5, 0]  # a row of ties
    lp[6, :40] = lp[6].max()  # ties at the top, beyond k
    argmax_or_any = torch.where(
        torch.rand(300, generator=g) < 0.8, lp.argmax(-1), torch.randint(0, 2000, (300,), generator=g)
    )
    target = lp.gather(1, argmax_or_any[:, None])
    top = lp.topk(k, dim=-1).values
    assert torch.equal(rank_of(lp, target, top), kernels.count_at_least(lp, target))
