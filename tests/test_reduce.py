"""The worker's reduction (torch) and the server's reading of its packed rows (numpy), against dense math."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from teacher_farm.schemas.scoring import PackedLayout
from teacher_farm.server.packed import compact_samples, unpack
from teacher_farm.server.reduce import reduce_rows, top_k, uniforms

V = 512


def dense_logprobs(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def reduce(
    logits: np.ndarray, targets: np.ndarray, temperature: float, k: int, samples: int = 0, seed: int = 0
):
    rows = logits.shape[0]
    packed = reduce_rows(
        torch.from_numpy(logits),
        torch.from_numpy(targets),
        PackedLayout(k, samples),
        torch.full((rows,), 1.0 / temperature),
        torch.full((rows,), seed, dtype=torch.int64),
        torch.arange(rows),
    ).numpy()
    assert packed.shape == (rows, PackedLayout(k, samples).width) and packed.dtype == np.int32
    # Every row has a target here: pretend one more position follows, so unpack keeps them all.
    return unpack(np.concatenate([packed, packed[-1:]]), PackedLayout(k, samples))


@pytest.fixture
def logits() -> np.ndarray:
    return np.random.default_rng(0).normal(0, 3, size=(64, V)).astype(np.float32)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("k", [1, 16, 256])
def test_topk_target_and_rank_equal_dense_math(logits, temperature, k):
    targets = np.random.default_rng(1).integers(0, V, size=len(logits))
    u = reduce(logits, targets, temperature, k)
    ref = dense_logprobs(logits, temperature)
    order = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(u.topk_ids[:-1], order)
    np.testing.assert_allclose(u.topk_logprobs[:-1], np.take_along_axis(ref, order, 1), atol=1e-5)
    target_lp = ref[np.arange(len(ref)), targets]
    np.testing.assert_allclose(u.target_logprobs, target_lp, atol=1e-5)
    np.testing.assert_array_equal(u.target_ranks, (ref >= target_lp[:, None] - 1e-6).sum(axis=1))


@pytest.mark.parametrize("k", [0, 1, 7, 64, 256, V - 1, V])
def test_top_k_equals_torch_topk_including_ties_and_infinities(k):
    rng = np.random.default_rng(k)
    x = rng.normal(0, 3, size=(33, V)).astype(np.float32)
    x[1] = 0.5  # a row of ties
    x[2, ::3] = -np.inf  # masked tokens
    x[3, :20] = x[3].max() + 1  # ties at the top
    t = torch.from_numpy(x)
    values, ids = top_k(t, k)
    ref_values, _ = t.topk(k, dim=-1)
    assert ids.dtype == torch.int64 and ids.shape == (33, k)
    # The values are the k largest, largest first; each id holds its value and no id repeats.
    assert torch.equal(values, ref_values)
    assert torch.equal(t.gather(1, ids), values)
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()
    # Ties aside (rows 1 to 3), the same ids as torch.topk.
    untied = np.ones(len(x), bool)
    untied[1:4] = False
    assert torch.equal(ids[untied], t.topk(k, dim=-1).indices[untied])


def test_top_k_of_a_slice_view_reads_the_slice():
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(8, 2 * V)).astype(np.float32))
    view = x[:, ::2]  # not contiguous
    values, ids = top_k(view, 5)
    assert torch.equal(values, view.topk(5, dim=-1).values) and torch.equal(ids, view.topk(5, dim=-1).indices)


def test_bfloat16_logits_are_reduced_in_float32(logits):
    bf16 = torch.from_numpy(logits).to(torch.bfloat16)
    packed = reduce_rows(bf16, torch.zeros(64, dtype=torch.int64), PackedLayout(4, 0), torch.ones(64)).numpy()
    lps = unpack(packed, PackedLayout(4, 0)).topk_logprobs
    ref = dense_logprobs(bf16.float().numpy(), 1.0)
    np.testing.assert_allclose(lps, np.sort(ref, axis=1)[:, ::-1][:, :4], atol=1e-5)


def test_uniforms_are_a_pure_function_of_seed_position_and_draw():
    a = uniforms(torch.tensor([7, 7, 8]), torch.tensor([0, 1, 0]), 1000)
    assert ((a > 0) & (a < 1)).all()
    again = uniforms(torch.tensor([8, 7]), torch.tensor([0, 1]), 1000)
    assert torch.equal(a[2], again[0]) and torch.equal(a[1], again[1])
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    # Uniform on (0, 1): mean 1/2, variance 1/12, no bucket far off.
    flat = uniforms(torch.arange(200), torch.arange(200), 500).numpy().reshape(-1)
    assert abs(flat.mean() - 0.5) < 0.005 and abs(flat.var() - 1 / 12) < 0.002
    assert np.abs(np.histogram(flat, bins=20, range=(0, 1))[0] / flat.size - 0.05).max() < 0.003


def z_score_of_draws(ids: np.ndarray, probs: np.ndarray) -> float:
    """How far the draws' counts of each row's 8 likeliest tokens are from their expectation, in sigmas."""
    draws = ids.shape[1]
    top = np.argsort(-probs, axis=1)[:, :8]
    mass = np.take_along_axis(probs, top, 1).sum(axis=1)
    hits = (ids[:, :, None] == top[:, None, :]).any(axis=2).sum(axis=1)
    return float((hits.sum() - draws * mass.sum()) / np.sqrt((draws * mass * (1 - mass)).sum()))


def test_draws_are_unbiased_and_the_check_catches_a_biased_sampler(logits):
    temperature, draws = 1.5, 256
    u = reduce(logits, np.zeros(len(logits), np.int64), temperature, 4, samples=draws, seed=3)
    ids, lps = u.sample_ids[:-1], u.sample_logprobs[:-1]
    probs = np.exp(dense_logprobs(logits, temperature))
    assert abs(z_score_of_draws(ids, probs)) < 4
    # Each draw's logprob is its token's, at the temperature.
    np.testing.assert_allclose(lps, np.log(np.take_along_axis(probs, ids.astype(np.int64), 1)), atol=1e-5)
    # Ascending within a row, as the compaction needs.
    assert (np.diff(ids, axis=1) >= 0).all()
    # The same statistic rejects draws from the top-32 renormalized (what a top-k cache implies).
    rng = np.random.default_rng(0)
    top = np.argsort(-probs, axis=1)[:, :32]
    p_top = np.take_along_axis(probs, top, 1)
    p_top /= p_top.sum(axis=1, keepdims=True)
    biased = np.stack([rng.choice(top[i], size=draws, p=p_top[i]) for i in range(len(probs))])
    assert abs(z_score_of_draws(biased, probs)) > 8


def test_same_seed_same_draws_other_seed_other_draws(logits):
    targets = np.zeros(len(logits), np.int64)
    a = reduce(logits, targets, 1.0, 2, samples=64, seed=11)
    b = reduce(logits, targets, 1.0, 2, samples=64, seed=11)
    c = reduce(logits, targets, 1.0, 2, samples=64, seed=12)
    np.testing.assert_array_equal(a.sample_ids, b.sample_ids)
    assert (a.sample_ids != c.sample_ids).any()


def test_a_rows_draws_do_not_depend_on_what_its_batch_neighbours_ask_for(logits):
    """Rows asking for 8 draws, reduced beside rows asking for 64, get exactly their draws alone."""
    rows = len(logits)
    t = torch.from_numpy(logits)
    targets, seeds, positions = (
        torch.zeros(rows, dtype=torch.int64),
        torch.full((rows,), 3),
        torch.arange(rows),
    )
    own = torch.where(positions % 2 == 0, 8, 64)
    mixed = reduce_rows(t, targets, PackedLayout(2, 64), None, seeds, positions, row_samples=own).numpy()
    alone = reduce_rows(t, targets, PackedLayout(2, 8), None, seeds, positions).numpy()
    base = PackedLayout(2, 0).width
    ids, lps = mixed[:, base : base + 64], mixed[:, base + 64 :]
    np.testing.assert_array_equal(ids[::2, :8], alone[::2, base : base + 8])
    np.testing.assert_array_equal(lps[::2, :8], alone[::2, base + 8 :])
    # Rows that asked for all 64 are untouched by the mask.
    full = reduce_rows(t, targets, PackedLayout(2, 64), None, seeds, positions).numpy()
    np.testing.assert_array_equal(mixed[1::2], full[1::2])


def test_rows_that_draw_nothing_skip_the_draw_and_the_others_draw_as_alone(logits):
    """A completion draws its one token at its last position only: rows of count 0 hold the last id
    (and its logprob); the rows that draw get exactly what they would get alone."""
    rows = len(logits)
    t = torch.from_numpy(logits)
    targets, seeds, positions = (
        torch.zeros(rows, dtype=torch.int64),
        torch.full((rows,), 5),
        torch.arange(rows),
    )
    own = torch.zeros(rows, dtype=torch.int64)
    own[-1] = 1
    some = reduce_rows(t, targets, PackedLayout(2, 1), None, seeds, positions, row_samples=own).numpy()
    alone = reduce_rows(t, targets, PackedLayout(2, 1), None, seeds, positions).numpy()
    base = PackedLayout(2, 0).width
    np.testing.assert_array_equal(some[-1], alone[-1])
    np.testing.assert_array_equal(some[:-1, :base], alone[:-1, :base])
    assert (some[:-1, base] == logits.shape[1] - 1).all()
    lp = torch.log_softmax(t.float(), dim=-1)[:-1, -1].numpy()
    np.testing.assert_array_equal(some[:-1, base + 1].view(np.float32), lp)
    nothing = reduce_rows(t, targets, PackedLayout(2, 1), None, seeds, positions, row_samples=own * 0).numpy()
    assert (nothing[:, base] == logits.shape[1] - 1).all()


def test_compact_samples_counts_distinct_tokens_per_position():
    ids = np.array([[3, 3, 5, 9], [1, 1, 1, 1], [0, 2, 4, 6]], np.int32)
    lps = -ids.astype(np.float32)
    per_row, flat_ids, counts, flat_lps = compact_samples(ids, lps)
    assert per_row.tolist() == [3, 1, 4]
    assert flat_ids.tolist() == [3, 5, 9, 1, 0, 2, 4, 6]
    assert counts.tolist() == [2, 1, 1, 4, 1, 1, 1, 1] and counts.dtype == np.int16
    assert flat_lps.tolist() == [-3, -5, -9, -1, 0, -2, -4, -6]
    # A new row starts a new run even when its first id equals the previous row's last.
    per_row, flat_ids, counts, _ = compact_samples(
        np.array([[1, 2], [2, 2]], np.int32), np.zeros((2, 2), np.float32)
    )
    assert per_row.tolist() == [2, 1] and flat_ids.tolist() == [1, 2, 2] and counts.tolist() == [1, 1, 2]


def test_unpack_refuses_rows_of_another_shape():
    with pytest.raises(ValueError, match="columns"):
        unpack(np.zeros((3, 10), np.int32), PackedLayout(4, 1))
