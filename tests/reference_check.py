"""Compare a cached row against the fp32 transformers reference, tolerant of exact ties only."""

from __future__ import annotations

import numpy as np

from teacher_farm.schemas.arrow import ScoredSequence

ATOL = 1e-4


def assert_matches_reference(row: ScoredSequence, reference, k: int, atol: float = ATOL) -> None:
    ids = row.input_ids.tolist()
    ref_ids, ref_lps, full = reference.topk(ids, k)
    n = len(ids)
    assert row.topk_ids.shape == (n, k) and row.topk_logprobs.shape == (n, k)
    # The logprobs, position by position, most likely first.
    np.testing.assert_allclose(row.topk_logprobs, ref_lps, atol=atol, rtol=0)
    # Each returned id really has the logprob returned for it in the reference.
    np.testing.assert_allclose(
        np.take_along_axis(full, row.topk_ids.astype(np.int64), axis=1), row.topk_logprobs, atol=atol, rtol=0
    )
    # The ids equal the reference's, except where two candidates are tied within atol (the k-th
    # may be tied with the (k+1)-th, which the reference's own top-k leaves out).
    differ = row.topk_ids != ref_ids
    if differ.any():
        rows, cols = np.nonzero(differ)
        tied = np.abs(full[rows, row.topk_ids[rows, cols].astype(np.int64)] - ref_lps[rows, cols]) < atol
        assert tied.all(), f"top-k ids differ at {list(zip(rows[~tied], cols[~tied]))[:5]}"
    sorted_ids = np.sort(row.topk_ids, axis=1)
    assert (sorted_ids[:, 1:] != sorted_ids[:, :-1]).all(), "a token appears twice in one position's top-k"
    # The actual next token's logprob and rank.
    assert row.target_logprobs.shape == (n - 1,) and row.target_ranks.shape == (n - 1,)
    target = full[np.arange(n - 1), np.asarray(ids[1:])]
    np.testing.assert_allclose(row.target_logprobs, target, atol=atol, rtol=0)
    lo = 1 + (full[: n - 1] > target[:, None] + atol).sum(axis=1)
    hi = (full[: n - 1] >= target[:, None] - atol).sum(axis=1)
    assert ((row.target_ranks >= lo) & (row.target_ranks <= hi)).all(), "target ranks differ"


def assert_same_rows(a: list[dict], b: list[dict], atol: float = ATOL) -> None:
    """Two scorings of the same lines agree: exact ids and tokens, logprobs within ``atol``.

    The engine batches differently from run to run, so float results may differ in the last bits,
    and the order of two candidates tied within ``atol`` may swap.
    """
    assert [(r["id"], r["line"], r["input_ids"]) for r in a] == [
        (r["id"], r["line"], r["input_ids"]) for r in b
    ]
    for x, y in zip(a, b):
        lx, ly = np.array(x["topk_logprobs"], np.float32), np.array(y["topk_logprobs"], np.float32)
        np.testing.assert_allclose(lx, ly, atol=atol, rtol=0)
        np.testing.assert_allclose(x["target_logprobs"], y["target_logprobs"], atol=atol, rtol=0)
        ix, iy = np.array(x["topk_ids"]), np.array(y["topk_ids"])
        rows, cols = np.nonzero(ix != iy)
        near = np.zeros(len(rows), bool)
        for shift in (-1, 1):
            other = np.clip(cols + shift, 0, lx.shape[1] - 1)
            near |= (other != cols) & (np.abs(lx[rows, cols] - lx[rows, other]) < atol)
        assert near.all(), f"top-k ids differ beyond ties at {list(zip(rows, cols))[:5]}"
