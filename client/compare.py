"""Comparing a cached row with the teacher's fresh answer: pure functions of numpy arrays, no I/O.

A row is a dict of arrays (``input_ids``, ``topk_ids`` / ``topk_logprobs`` (n, k), ``target_logprobs`` /
``target_ranks`` (n - 1,), optionally ``kept`` (n,) and the flat sampled targets ``sample_lengths`` /
``sample_ids`` / ``sample_counts``), as :func:`split_rows` makes from the reader's arrays. The rules:

- ``input_ids`` equal, and the positions whose targets were kept (``--positions``) the same;
- ``topk_logprobs`` and ``target_logprobs`` within ``atol`` plus one unit in the last place of the
  cache's format (``schemas/formats.py``), the fresh values stored and read back in that format first;
- ``topk_ids`` equal except swaps between candidates tied within that tolerance (a fresh answer may
  hold more candidates than ``k``: the extra ones only settle ties at the k-th place);
- ``target_ranks`` equal except where ties make the rank ambiguous; a target ranked beyond the
  visible candidates, whose ties cannot be seen, may differ by ``max(2, rank // 100)``, as float
  noise between two runs can reorder a tail of near-equal logprobs;
- sampled targets under the draw contract (``schemas/draws.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from teacher_farm.schemas.draws import DrawComparison, expand, moved_draws
from teacher_farm.schemas.formats import LogprobFormat, logprob_format
from teacher_farm.schemas.reader import RowGroupArrays

#: Positions named per kind of difference in one row.
POSITIONS_SHOWN = 3

Row = dict[str, Any]


def split_rows(a: RowGroupArrays, ids: list[str | None]) -> list[Row]:
    """The rows of converted cache rows (``row_group_arrays(..., ranks=True)``) as dicts of array views."""
    rows = []
    ranks = a.target_ranks
    assert ranks is not None, "rows converted with ranks=True"
    samples = None
    if a.sample_ids is not None:
        assert a.sample_lengths is not None and a.sample_counts is not None  # held with the ids
        samples = np.arange(a.sample_ids.shape[1]), a.sample_lengths, a.sample_ids, a.sample_counts
    for r in range(a.rows):
        p0, p1 = int(a.offsets[r]), int(a.offsets[r + 1])
        t0, t1 = int(a.target_offsets[r]), int(a.target_offsets[r + 1])
        row: Row = {
            "id": ids[r],
            "line": int(a.line[r]),
            "input_ids": a.input_ids[p0:p1],
            "target_logprobs": a.target_logprobs[t0:t1],
            "target_ranks": ranks[t0:t1],
        }
        if a.kept is not None:
            row["kept"] = a.kept[p0:p1]
        if a.topk_ids is not None and a.topk_logprobs is not None:
            row["topk_ids"], row["topk_logprobs"] = a.topk_ids[p0:p1], a.topk_logprobs[p0:p1]
        if samples is not None:
            width, sample_lengths, sample_ids, sample_counts = samples
            lengths = sample_lengths[p0:p1]
            drawn = width < lengths[:, None]  # the padded block's filled slots, position by position
            row.update(
                sample_lengths=lengths,
                sample_ids=sample_ids[p0:p1][drawn],
                sample_counts=sample_counts[p0:p1][drawn],
            )
        rows.append(row)
    return rows


def without_topk(row: Row) -> Row:
    """A row of a sampled-only cache with an empty top-k, so that ``compare_row`` checks the rest."""
    empty = np.zeros((len(row["input_ids"]), 0), np.float32)
    return {**row, "topk_ids": empty.astype(np.int32), "topk_logprobs": empty}


def _near(a: np.ndarray, b: np.ndarray, tol: np.ndarray) -> np.ndarray:
    """``a`` within ``tol`` of ``b``, elementwise; equal values (two -inf) are near."""
    with np.errstate(invalid="ignore"):
        near: np.ndarray = (a == b) | (np.abs(a - b) <= tol)
    return near


def _where(positions: np.ndarray, describe: Callable[..., str]) -> str:
    shown = ", ".join(describe(*p) for p in positions[:POSITIONS_SHOWN])
    more = f" and {len(positions) - POSITIONS_SHOWN} more" if len(positions) > POSITIONS_SHOWN else ""
    return shown + more


def _sequence_problem(cached: Row, fresh: Row) -> str | None:
    """Why the two rows are not answers for the same tokens and positions, or None."""
    ci, fi = np.asarray(cached["input_ids"]), np.asarray(fresh["input_ids"])
    if len(ci) != len(fi):
        return f"input_ids: the teacher scored {len(fi)} tokens of the {len(ci)} sent"
    if not np.array_equal(ci, fi):
        return f"input_ids differ from position {int(np.flatnonzero(ci != fi)[0])}"
    n = len(ci)
    ck, fk = cached.get("kept"), fresh.get("kept")
    if ck is None and fk is None:
        return None
    ck = np.ones(n, bool) if ck is None else ck
    fk = np.ones(n, bool) if fk is None else fk
    if np.array_equal(ck, fk):
        return None
    where = np.flatnonzero(ck != fk)
    return (
        f"the positions whose targets were kept differ at {len(where)} of {n} (first: position "
        f"{int(where[0])}): the teacher keeps other positions under the cache's --positions rule"
    )


def _shape_problems(cached: Row, fresh: Row, n: int, k: int) -> list[str]:
    """What in either row has not the shape of n positions of k candidates (n - 1 targets)."""
    problems = []
    for name in ("topk_ids", "topk_logprobs"):
        arr = cached[name]
        if arr is None or arr.shape != (n, k):
            got = "ragged" if arr is None else "×".join(map(str, arr.shape))
            problems.append(f"cached {name} is {got}, not {n}×{k}")
    for name in ("target_logprobs", "target_ranks"):
        arr = np.asarray(cached[name])
        if arr.shape != (n - 1,):
            problems.append(f"cached {name} has {len(arr)} values, not {n - 1}")
    if problems:
        return problems
    f_ids, f_lp = fresh["topk_ids"], fresh["topk_logprobs"]
    if (
        f_ids is None
        or f_lp is None
        or f_ids.shape != f_lp.shape
        or f_ids.shape[0] != n
        or f_ids.shape[1] < k
        or len(fresh["target_logprobs"]) != n - 1
        or len(fresh["target_ranks"]) != n - 1
    ):
        return [f"the teacher's answer does not have {n} positions of at least {k} candidates"]
    return []


class _Values:
    """Both rows' logprobs as the cache's format reads them back, and each value's tolerance."""

    def __init__(self, cached: Row, fresh: Row, fmt: LogprobFormat, atol: float) -> None:
        self.fmt, self.atol = fmt, atol
        self.cl = cached["topk_logprobs"].astype(np.float32)
        f_lp = fresh["topk_logprobs"]
        self.fl = fmt.round_trip(f_lp) if f_lp.size else f_lp.astype(np.float32)
        self.ct = np.asarray(cached["target_logprobs"]).astype(np.float32)
        self.ft = np.asarray(fresh["target_logprobs"]).astype(fmt.value_dtype).astype(np.float32)
        self.tol_c = atol + fmt.ulp(self.cl)
        self.tol_f = atol + fmt.ulp(self.fl)
        # A compact cache (schema 5) reads a target whose token is among the top-k from its slot there: the
        # teacher's value as that slot reads back, within the top-k's tolerance, is as right as its own.
        self.ft_slot = self.tol_slot = None
        ids = fresh.get("topk_ids")
        if fmt.gaps and ids is not None and len(self.ft) and np.asarray(ids).shape[0] == len(self.ft) + 1:
            match = np.asarray(ids)[:-1] == np.asarray(fresh["input_ids"])[1:, None]
            slot = match.argmax(axis=1)
            rows = np.arange(len(slot))
            inside = match.any(axis=1)
            self.ft_slot = np.where(inside, self.fl[rows, slot], np.nan)
            self.tol_slot = np.where(inside, self.tol_f[rows, slot], 0.0)


def _logprob_problems(v: _Values, n: int, k: int) -> tuple[list[str], float]:
    """Top-k and target logprobs beyond the tolerance, and the largest difference."""
    cl, fl, ct, ft = v.cl, v.fl, v.ct, v.ft
    with np.errstate(invalid="ignore"):
        d_topk = np.where(cl == fl[:, :k], 0.0, np.abs(cl - fl[:, :k]))
        d_target = np.where(ct == ft, 0.0, np.abs(ct - ft))
    diffs = np.concatenate([d_topk.ravel(), d_target])
    max_diff = float("inf") if np.isnan(diffs).any() else float(diffs.max(initial=0.0))
    problems = []
    bad = np.argwhere(~(d_topk <= np.maximum(v.tol_c, v.tol_f[:, :k])))
    if len(bad):
        problems.append(
            f"topk_logprobs differ at {len(bad)} of {n * k} entries: "
            + _where(
                bad,
                lambda p, c: f"position {p} candidate {c + 1}: cached {cl[p, c]:.6g}, teacher {fl[p, c]:.6g}",
            )
        )
    ok = d_target <= v.atol + np.maximum(v.fmt.value_ulp(ct), v.fmt.value_ulp(ft))
    if v.ft_slot is not None and v.tol_slot is not None:
        with np.errstate(invalid="ignore"):
            ok |= np.abs(ct - v.ft_slot) <= v.tol_slot + v.fmt.value_ulp(ct)
    bad = np.flatnonzero(~ok)
    if len(bad):
        problems.append(
            f"target_logprobs differ at {len(bad)} of {n - 1} positions: "
            + _where(bad[:, None], lambda p: f"position {p}: cached {ct[p]:.6g}, teacher {ft[p]:.6g}")
        )
    return problems, max_diff


def _found_across(
    ids: np.ndarray,
    lps: np.ndarray,
    want: np.ndarray,
    want_lp: np.ndarray,
    want_tol: np.ndarray,
    last: int,
) -> np.ndarray:
    """Per moved candidate: it appears among ``ids`` with a logprob within tolerance, or (just past the
    last visible place) ties with the last candidate there."""
    eq = ids == want[:, None]
    found = (eq & _near(lps, want_lp[:, None], want_tol[:, None])).any(axis=1)
    hit: np.ndarray = found | (~eq.any(axis=1) & _near(lps[:, last], want_lp, want_tol))
    return hit


def _id_problems(cached: Row, fresh: Row, v: _Values, n: int, k: int) -> list[str]:
    """Candidate ids: equal, except a swap between candidates tied within the tolerance."""
    c_ids, f_ids = cached["topk_ids"], fresh["topk_ids"]
    rows, cols = np.nonzero(c_ids != f_ids[:, :k])
    if not len(rows):
        return []
    ok = _found_across(
        f_ids[rows], v.fl[rows], c_ids[rows, cols], v.cl[rows, cols], v.tol_c[rows, cols], f_ids.shape[1] - 1
    )
    ok &= _found_across(
        c_ids[rows], v.cl[rows], f_ids[rows, cols], v.fl[rows, cols], v.tol_f[rows, cols], k - 1
    )
    bad = np.flatnonzero(~ok)
    if not len(bad):
        return []
    return [
        f"topk_ids differ beyond ties at {len(bad)} of {n * k} entries: "
        + _where(
            bad[:, None],
            lambda j: (
                f"position {rows[j]} candidate {cols[j] + 1}: cached "
                f"{c_ids[rows[j], cols[j]]}, teacher {f_ids[rows[j], cols[j]]}"
            ),
        )
    ]


def _rank_problems(cached: Row, fresh: Row, v: _Values, n: int) -> list[str]:
    """Target ranks: equal, or within the range the fresh candidates' ties allow."""
    c_r, f_r = np.asarray(cached["target_ranks"]), np.asarray(fresh["target_ranks"])
    pos = np.flatnonzero(c_r != f_r)
    if not len(pos):
        return []
    kf = v.fl.shape[1]
    lps, t = v.fl[pos], v.ft[pos]
    tol = v.atol + np.maximum(v.fmt.value_ulp(t)[:, None], v.fmt.ulp(v.fl)[pos])
    lo = 1 + (lps > t[:, None] + tol).sum(axis=1)
    hi = (lps >= t[:, None] - tol).sum(axis=1)
    rc, rf = c_r[pos].astype(np.int64), f_r[pos].astype(np.int64)
    visible = lo <= kf
    ok = np.where(
        visible & (hi < kf),
        (rc >= lo) & (rc <= hi),
        np.where(visible, rc >= lo, (rc > kf) & (np.abs(rc - rf) <= np.maximum(2, rf // 100))),
    )
    bad = np.flatnonzero(~ok)
    if not len(bad):
        return []
    return [
        f"target_ranks differ beyond ties at {len(bad)} of {n - 1} positions: "
        + _where(bad[:, None], lambda j: f"position {pos[j]}: cached {rc[j]}, teacher {rf[j]}")
    ]


def compare_row(
    cached: Row,
    fresh: Row,
    *,
    k: int,
    atol: float,
    logprob_dtype: str = "float32",
) -> tuple[list[str], float]:
    """What differs between a cached row and its re-scoring (empty when they agree), and max |diff|.

    ``fresh`` may hold more candidates than ``k`` (the extra ones only settle ties at the k-th).
    """
    problem = _sequence_problem(cached, fresh)
    if problem is not None:
        return [problem], 0.0
    n = len(cached["input_ids"])
    problems = _shape_problems(cached, fresh, n, k)
    if problems:
        return problems, 0.0
    values = _Values(cached, fresh, logprob_format(logprob_dtype), atol)
    problems, max_diff = _logprob_problems(values, n, k)
    problems += _id_problems(cached, fresh, values, n, k)
    problems += _rank_problems(cached, fresh, values, n)
    return problems, max_diff


def compare_draws(cached: Row, fresh: Row, samples: int) -> tuple[list[str], DrawComparison | None]:
    """A row's cached draws against its fresh ones, under the draw contract (``schemas/draws.py``).

    Of a ``--positions`` cache, the kept positions only (``compare_row`` checks they are the same).
    """
    kept = cached.get("kept")
    if kept is not None and fresh.get("kept") is not None and np.array_equal(kept, fresh["kept"]):
        cached, fresh = _kept_draws(cached, kept), _kept_draws(fresh, kept)
    try:
        a = expand(cached["sample_lengths"], cached["sample_ids"], cached["sample_counts"], samples)
        b = expand(fresh["sample_lengths"], fresh["sample_ids"], fresh["sample_counts"], samples)
    except (KeyError, ValueError) as exc:
        return [f"sampled targets: {exc}"], None
    if a.shape != b.shape:
        return [f"sampled targets at {len(a)} positions, the teacher drew at {len(b)}"], None
    cmp = moved_draws(a, b)
    if cmp.jumped:
        bad = np.argwhere(np.abs(a - b) > 1)
        return [
            f"sampled targets differ beyond a neighbouring token at {cmp.jumped} of {cmp.draws} draws: "
            + _where(bad, lambda p, j: f"position {p}: cached {a[p, j]}, teacher {b[p, j]}")
        ], cmp
    return [], cmp


def _kept_draws(row: Row, kept: np.ndarray) -> Row:
    lengths = np.asarray(row["sample_lengths"])
    flat = np.repeat(kept, lengths)
    return {
        "sample_lengths": lengths[kept],
        "sample_ids": np.asarray(row["sample_ids"])[flat],
        "sample_counts": np.asarray(row["sample_counts"])[flat],
    }


def compare_answer(
    cached: Row, fresh: Row, *, k: int, samples: int | None, atol: float, logprob_dtype: str
) -> tuple[list[str], float, DrawComparison | None]:
    """Every check of one row: its top-k (a cache of sampled targets only: the rest) and its draws."""
    if k:
        problems, diff = compare_row(cached, fresh, k=k, atol=atol, logprob_dtype=logprob_dtype)
    else:
        problems, diff = compare_row(
            without_topk(cached), without_topk(fresh), k=0, atol=atol, logprob_dtype=logprob_dtype
        )
    draws = None
    if samples:
        drawn, draws = compare_draws(cached, fresh, samples)
        problems += drawn
    return problems, diff, draws
