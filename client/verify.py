"""``teacher-farm verify DIR``: re-score a random sample of cached rows and compare.

Silent corruption of a shard, or a teacher that changed since the cache was made, shows up here:

1. the server's ``/v1/info`` must name the teacher of the manifests (model and tokenizer
   fingerprints, vocabulary size), else nothing is re-scored;
2. N rows are drawn uniformly (seeded) across all shards the manifests name, and only the row
   groups holding them are read;
3. every shard a sampled row lies in is re-hashed against the manifest's sha256 and size;
4. the rows' cached ``input_ids`` are sent back as ``token_ids`` (so tokenization cannot differ)
   with k+1 candidates where the server allows it, the extra one showing ties at the k-th place;
5. per row, with numpy: ``input_ids`` equal; ``topk_logprobs`` and ``target_logprobs`` within
   ``atol`` plus one unit in the last place of the cache's format (``schemas/formats.py``: a
   float16 step, or for ``uint8-gap`` a 1/16-nat step below the top-1), the fresh values being
   stored and read back in that format first; ``topk_ids`` equal except swaps between candidates
   tied within that tolerance; ``target_ranks`` equal except where ties make the rank ambiguous;
6. sampled targets are drawn again with the cache's seed and compared under the draw contract
   (``schemas/draws.py``): a draw may move to a neighbouring token where its uniform lay on a CDF
   boundary, and only a boundary's share of all draws may; any other difference is a mismatch.

A target ranked beyond the visible candidates cannot have its ties seen, so there a rank may
differ by ``max(2, rank // 100)``, as float noise between two runs can reorder a tail of near-equal
logprobs; anything more is a mismatch.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from teacher_farm.client.fsutil import sha256_file
from teacher_farm.client.transport import HttpTeacher, TeacherPool
from teacher_farm.exits import run_async
from teacher_farm.schemas.arrow import GAP_COLUMNS, decode_rows, offsets
from teacher_farm.schemas.cache_dir import CacheDir, ShardRecord
from teacher_farm.schemas.draws import DrawComparison, expand, moved_draws
from teacher_farm.schemas.errors import InputError
from teacher_farm.schemas.positions import thicken
from teacher_farm.schemas.formats import logprob_format
from teacher_farm.schemas.scoring import Scoring
from teacher_farm.schemas.wire import Info

#: Default tolerance of logprobs beyond the rounding of the cache's format, by format.
DEFAULT_ATOL = {"float32": 1e-3, "float16": 1e-2, "uint8-gap": 1e-2}

CACHE_COLUMNS = ["id", "line", "input_ids", "topk_ids", "topk_logprobs", "target_logprobs", "target_ranks"]
SAMPLE_COLUMNS = ["sample_ids", "sample_counts"]

#: Lines of mismatches printed in the report (all are counted).
REPORT_MISMATCHES = 50
#: Positions named per kind of difference in one row.
POSITIONS_SHOWN = 3


@dataclass
class VerifyOptions:
    """What ``teacher-farm verify`` is told; see ``teacher_farm.cli`` for the flags."""

    out_dir: Path
    servers: list[str]
    sample: int
    seed: int | None = None
    atol: float | None = None
    api_key: str | None = None
    concurrency: int = 4
    batch_rows: int = 16
    batch_tokens: int = 65_536
    retry_for_s: float = 600.0
    ca_bundle: str | None = None


@dataclass
class Mismatch:
    """One disagreement: a row's (``line`` set) or a whole shard's (``line`` None)."""

    file: str
    line: int | None
    id: str | None
    what: str

    def render(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.what}"
        return f"{self.file} line {self.line} (id {self.id}): {self.what}"


@dataclass
class VerifyReport:
    """What a verification found; ``ok`` only when every check agreed."""

    out_dir: Path
    teacher: str = ""
    teacher_problem: str | None = None
    total_rows: int = 0
    total_shards: int = 0
    sampled_rows: int = 0
    sampled_shards: int = 0
    seed: int = 0
    atol: float = 0.0
    logprob_dtype: str = "float32"
    k: int = 0
    rows_checked: int = 0
    positions_checked: int = 0
    max_abs_diff: float = 0.0
    #: Sampled targets drawn again (None: the cache has none).
    draws: DrawComparison | None = None
    shards_hashed: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    bad_rows: set[tuple[str, int]] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return self.teacher_problem is None and not self.mismatches

    def add(self, m: Mismatch) -> None:
        self.mismatches.append(m)
        if m.line is not None:
            self.bad_rows.add((m.file, m.line))

    def render(self) -> str:
        lines = [f"verify:     {self.out_dir}", f"teacher:    {self.teacher}"]
        if self.teacher_problem is not None:
            lines += [f"status:     FAILED: {self.teacher_problem}"]
            return "\n".join(lines)
        every = " (all)" if self.sampled_rows == self.total_rows else ""
        shard_problems = len({m.file for m in self.mismatches if m.line is None})
        lines += [
            f"sample:     {self.sampled_rows} of {self.total_rows} rows{every} from {self.sampled_shards} of "
            f"{self.total_shards} shards, seed {self.seed}",
            f"shards:     {self.shards_hashed} re-hashed, {shard_problems} differ from the manifest",
            f"rows:       {self.rows_checked} rows checked ({self.positions_checked} positions, k {self.k}), "
            f"{len(self.bad_rows)} disagree",
            f"max |diff|: {self.max_abs_diff:.3g} (atol {self.atol:g}, {self.logprob_dtype} logprobs)",
            *([f"draws:      {self.draws}, {self.draws.allowed} allowed"] if self.draws is not None else []),
            "status:     " + ("OK" if self.ok else "FAILED: " + _count(len(self.mismatches), "mismatch")),
        ]
        shown = sorted(self.mismatches, key=lambda m: (m.file, -1 if m.line is None else m.line))
        lines += [f"mismatch:   {m.render()}" for m in shown[:REPORT_MISMATCHES]]
        if len(shown) > REPORT_MISMATCHES:
            lines.append(f"            ... and {len(shown) - REPORT_MISMATCHES} more")
        return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("h") else "s")


# ---------------------------------------------------------------------------------------------
# Rows as numpy arrays


def _lengths_and_values(arr: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Per-row list lengths (a null list counts 0) and the flattened values of a list array."""
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return lengths, pc.list_flatten(arr)


def table_rows(table: pa.Table) -> list[dict[str, Any]]:
    """Each row of a cache or result table as numpy arrays; a ragged top-k row gets None."""
    rows: list[dict[str, Any]] = [{} for _ in range(table.num_rows)]
    if not rows:
        return rows
    table, kept = thicken(table)  # a --positions cache: its dropped positions read as zeros, ``kept`` says which
    for name in ("id", "line"):
        if name in table.column_names:
            for row, value in zip(rows, table.column(name).to_pylist()):
                row[name] = value
    for name in ("input_ids", "target_logprobs", "target_ranks"):
        lengths, flat = _lengths_and_values(table.column(name).combine_chunks())
        values, off = flat.to_numpy(zero_copy_only=False), offsets(lengths)
        for i, row in enumerate(rows):
            row[name] = values[off[i]:off[i + 1]]
            if name == "input_ids" and kept is not None:
                row["kept"] = kept[off[i]:off[i + 1]]
    if "sample_ids" in table.column_names:
        for name in SAMPLE_COLUMNS:
            outer, inner = _lengths_and_values(table.column(name).combine_chunks())
            per_position, flat = _lengths_and_values(inner)
            values, off, flat_off = flat.to_numpy(zero_copy_only=False), offsets(outer), offsets(per_position)
            for i, row in enumerate(rows):
                row["sample_lengths"] = per_position[off[i]:off[i + 1]]
                row[name] = values[flat_off[off[i]]:flat_off[off[i + 1]]]
    for name in ("topk_ids", "topk_logprobs"):
        if name not in table.column_names:
            continue
        outer, inner = _lengths_and_values(table.column(name).combine_chunks())
        widths, flat = _lengths_and_values(inner)
        values, off, inner_off = flat.to_numpy(zero_copy_only=False), offsets(outer), offsets(widths)
        for i, row in enumerate(rows):
            a, b = off[i], off[i + 1]
            w = widths[a:b]
            if b == a:
                row[name] = values[:0].reshape(0, 0)
            elif (w == w[0]).all():
                row[name] = values[inner_off[a]:inner_off[b]].reshape(b - a, int(w[0]))
            else:
                row[name] = None
    return rows


# ---------------------------------------------------------------------------------------------
# Comparing one row


def _near(a: np.ndarray, b: np.ndarray, tol: np.ndarray) -> np.ndarray:
    """``a`` within ``tol`` of ``b``, elementwise; equal values (two -inf) are near."""
    with np.errstate(invalid="ignore"):
        return (a == b) | (np.abs(a - b) <= tol)


def _where(positions: np.ndarray, describe) -> str:
    shown = ", ".join(describe(*p) for p in positions[:POSITIONS_SHOWN])
    more = f" and {len(positions) - POSITIONS_SHOWN} more" if len(positions) > POSITIONS_SHOWN else ""
    return shown + more


def compare_row(
    cached: dict[str, Any], fresh: dict[str, Any], *, k: int, atol: float, logprob_dtype: str = "float32",
) -> tuple[list[str], float]:
    """What differs between a cached row and its re-scoring (empty when they agree), and max |diff|.

    ``fresh`` may hold more candidates than ``k`` (the extra ones only settle ties at the k-th).
    """
    fmt = logprob_format(logprob_dtype)
    ci = np.asarray(cached["input_ids"])
    fi = np.asarray(fresh["input_ids"])
    if len(ci) != len(fi):
        return [f"input_ids: the teacher scored {len(fi)} tokens of the {len(ci)} sent"], 0.0
    if not np.array_equal(ci, fi):
        return [f"input_ids differ from position {int(np.flatnonzero(ci != fi)[0])}"], 0.0
    n = len(ci)
    ck, fk = cached.get("kept"), fresh.get("kept")
    if ck is not None or fk is not None:
        ck = np.ones(n, bool) if ck is None else ck
        fk = np.ones(n, bool) if fk is None else fk
        if not np.array_equal(ck, fk):
            where = np.flatnonzero(ck != fk)
            return [f"the positions whose targets were kept differ at {len(where)} of {n} (first: position "
                    f"{int(where[0])}): the teacher keeps other positions under the cache's --positions rule"], 0.0
    c_ids, c_lp = cached["topk_ids"], cached["topk_logprobs"]
    c_t, c_r = np.asarray(cached["target_logprobs"]), np.asarray(cached["target_ranks"])
    shape_problems = []
    for name, arr in (("topk_ids", c_ids), ("topk_logprobs", c_lp)):
        if arr is None or arr.shape != (n, k):
            got = "ragged" if arr is None else "×".join(map(str, arr.shape))
            shape_problems.append(f"cached {name} is {got}, not {n}×{k}")
    for name, arr in (("target_logprobs", c_t), ("target_ranks", c_r)):
        if arr.shape != (n - 1,):
            shape_problems.append(f"cached {name} has {len(arr)} values, not {n - 1}")
    if shape_problems:
        return shape_problems, 0.0
    f_ids, f_lp = fresh["topk_ids"], fresh["topk_logprobs"]
    if (
        f_ids is None or f_lp is None or f_ids.shape != f_lp.shape or f_ids.shape[0] != n or f_ids.shape[1] < k
        or len(fresh["target_logprobs"]) != n - 1 or len(fresh["target_ranks"]) != n - 1
    ):
        return [f"the teacher's answer does not have {n} positions of at least {k} candidates"], 0.0
    kf = f_ids.shape[1]
    problems: list[str] = []

    # Logprobs: fresh values stored and read back in the cache's format; tolerance atol + one unit
    # in the last place of that format (equal values, -inf included, differ by 0).
    cl = c_lp.astype(np.float32)
    fl = fmt.round_trip(f_lp) if f_lp.size else f_lp.astype(np.float32)
    ct = c_t.astype(np.float32)
    ft = np.asarray(fresh["target_logprobs"]).astype(fmt.value_dtype).astype(np.float32)
    tol_c = atol + fmt.ulp(cl)
    tol_f = atol + fmt.ulp(fl)
    with np.errstate(invalid="ignore"):
        d_topk = np.where(cl == fl[:, :k], 0.0, np.abs(cl - fl[:, :k]))
        d_target = np.where(ct == ft, 0.0, np.abs(ct - ft))
    diffs = np.concatenate([d_topk.ravel(), d_target])
    max_diff = float("inf") if np.isnan(diffs).any() else float(diffs.max(initial=0.0))
    bad = np.argwhere(~(d_topk <= np.maximum(tol_c, tol_f[:, :k])))
    if len(bad):
        problems.append(
            f"topk_logprobs differ at {len(bad)} of {n * k} entries: "
            + _where(bad, lambda p, c: f"position {p} candidate {c + 1}: cached {cl[p, c]:.6g}, teacher {fl[p, c]:.6g}")
        )
    bad = np.flatnonzero(~(d_target <= atol + np.maximum(fmt.value_ulp(ct), fmt.value_ulp(ft))))
    if len(bad):
        problems.append(
            f"target_logprobs differ at {len(bad)} of {n - 1} positions: "
            + _where(bad[:, None], lambda p: f"position {p}: cached {ct[p]:.6g}, teacher {ft[p]:.6g}")
        )

    # Candidate ids: equal, except a swap between candidates tied within the tolerance. A candidate
    # that moved must appear on the other side with the same logprob, or (just past the last
    # visible place) tie with the other side's last candidate.
    rows, cols = np.nonzero(c_ids != f_ids[:, :k])
    if len(rows):
        want, want_lp, want_tol = c_ids[rows, cols], cl[rows, cols], tol_c[rows, cols]
        eq = f_ids[rows] == want[:, None]
        found = (eq & _near(fl[rows], want_lp[:, None], want_tol[:, None])).any(axis=1)
        edge = ~eq.any(axis=1) & _near(fl[rows, kf - 1], want_lp, want_tol)
        ok = found | edge
        got, got_lp, got_tol = f_ids[rows, cols], fl[rows, cols], tol_f[rows, cols]
        eq = c_ids[rows] == got[:, None]
        found = (eq & _near(cl[rows], got_lp[:, None], got_tol[:, None])).any(axis=1)
        edge = ~eq.any(axis=1) & _near(cl[rows, k - 1], got_lp, got_tol)
        ok &= found | edge
        bad = np.flatnonzero(~ok)
        if len(bad):
            problems.append(
                f"topk_ids differ beyond ties at {len(bad)} of {n * k} entries: "
                + _where(bad[:, None], lambda j: f"position {rows[j]} candidate {cols[j] + 1}: cached "
                         f"{c_ids[rows[j], cols[j]]}, teacher {f_ids[rows[j], cols[j]]}")
            )

    # Target ranks: equal, or within the range the fresh candidates' ties allow.
    f_r = np.asarray(fresh["target_ranks"])
    pos = np.flatnonzero(c_r != f_r)
    if len(pos):
        lps, t = fl[pos], ft[pos]
        tol = atol + np.maximum(fmt.value_ulp(t)[:, None], fmt.ulp(fl)[pos])
        lo = 1 + (lps > t[:, None] + tol).sum(axis=1)
        hi = (lps >= t[:, None] - tol).sum(axis=1)
        rc, rf = c_r[pos].astype(np.int64), f_r[pos].astype(np.int64)
        visible = lo <= kf
        ok = np.where(
            visible & (hi < kf), (rc >= lo) & (rc <= hi),
            np.where(visible, rc >= lo, (rc > kf) & (np.abs(rc - rf) <= np.maximum(2, rf // 100))),
        )
        bad = np.flatnonzero(~ok)
        if len(bad):
            problems.append(
                f"target_ranks differ beyond ties at {len(bad)} of {n - 1} positions: "
                + _where(bad[:, None], lambda j: f"position {pos[j]}: cached {rc[j]}, teacher {rf[j]}")
            )
    return problems, max_diff


def compare_draws(cached: dict[str, Any], fresh: dict[str, Any], samples: int) -> tuple[list[str], DrawComparison | None]:
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
        return [f"sampled targets differ beyond a neighbouring token at {cmp.jumped} of {cmp.draws} draws: "
                + _where(bad, lambda p, j: f"position {p}: cached {a[p, j]}, teacher {b[p, j]}")], cmp
    return [], cmp


def _kept_draws(row: dict[str, Any], kept: np.ndarray) -> dict[str, Any]:
    lengths = np.asarray(row["sample_lengths"])
    flat = np.repeat(kept, lengths)
    return {"sample_lengths": lengths[kept], "sample_ids": np.asarray(row["sample_ids"])[flat],
            "sample_counts": np.asarray(row["sample_counts"])[flat]}


# ---------------------------------------------------------------------------------------------
# Sampling and reading


def sample_positions(records: Sequence[ShardRecord], n: int, seed: int) -> dict[int, np.ndarray]:
    """``n`` rows drawn uniformly without replacement: shard index -> sorted rows in that shard."""
    counts = np.array([r.rows for r in records], dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return {}
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    starts = offsets(counts)
    which = np.searchsorted(starts, picks, side="right") - 1
    return {
        records[s].index: picks[which == s] - starts[s]
        for s in np.unique(which)
    }


def stored_columns(columns: Sequence[str], names: Sequence[str]) -> list[str]:
    """The shard columns (``names``) that hold ``columns``: ``topk_top1`` / ``topk_gaps`` for ``topk_logprobs``
    and ``sample_id_gaps`` for ``sample_ids`` in a ``uint8-gap`` cache."""
    out = []
    for c in columns:
        if c == "topk_logprobs" and c not in names and GAP_COLUMNS[0] in names:
            out += [g for g in GAP_COLUMNS if g in names]
        elif c == "sample_ids" and c not in names and "sample_id_gaps" in names:
            out.append("sample_id_gaps")
        else:
            out.append(c)
    return out


def read_rows(path: Path, rows: np.ndarray, columns: Sequence[str] = CACHE_COLUMNS) -> tuple[pa.Table, list[str]]:
    """The given rows of a shard, reading only the row groups that hold them, decoded to plain columns
    (``decode_rows``); and any problems."""
    pf = pq.ParquetFile(path)
    columns = stored_columns(columns, pf.schema_arrow.names)
    meta = pf.metadata
    problems = []
    if (missing := rows[rows >= meta.num_rows]).size:
        problems.append(f"{meta.num_rows} rows in the file, fewer than the manifest says; rows {missing[:5].tolist()} absent")
        rows = rows[rows < meta.num_rows]
    group_starts = offsets(np.array([meta.row_group(g).num_rows for g in range(meta.num_row_groups)], dtype=np.int64))
    groups = np.searchsorted(group_starts, rows, side="right") - 1
    parts = []
    for g in np.unique(groups):
        table = pf.read_row_group(int(g), columns=list(columns))
        parts.append(table.take(pa.array(rows[groups == g] - group_starts[g])))
    if not parts:
        return pa.Table.from_pylist([]), problems
    return decode_rows(pa.concat_tables(parts)), problems


def batches(rows: list[dict[str, Any]], max_rows: int, max_tokens: int) -> Iterator[list[dict[str, Any]]]:
    """Group rows into requests of at most ``max_rows`` rows and about ``max_tokens`` tokens."""
    cur: list[dict[str, Any]] = []
    tokens = 0
    for row in rows:
        n = len(row["input_ids"])
        if cur and (len(cur) >= max_rows or tokens + n > max_tokens):
            yield cur
            cur, tokens = [], 0
        cur.append(row)
        tokens += n
    if cur:
        yield cur


# ---------------------------------------------------------------------------------------------
# The run


def teacher_problem(info: Info, identity: dict[str, Any]) -> str | None:
    """Why ``info`` is not the teacher that made a cache of ``identity``, or None."""
    diffs = [
        f"{key} {identity.get(key)!r} in the cache, {getattr(info, key)!r} served"
        for key in ("model_fingerprint", "tokenizer_fingerprint", "vocab_size")
        if identity.get(key) != getattr(info, key)
    ]
    if not diffs:
        return None
    return "the server runs a different teacher than the one that made this cache: " + "; ".join(diffs)


async def _score(teacher: Any, batch: list[dict[str, Any]], scoring: Scoring) -> pa.Table:
    items = [(row["id"], np.ascontiguousarray(row["input_ids"], dtype=np.int64)) for row in batch]
    return await teacher.score_ids(items, scoring)


async def verify_cache(opts: VerifyOptions, teacher: Any) -> VerifyReport:
    """Check a sample of ``opts.out_dir`` against ``teacher`` (a ``TeacherPool`` or ``HttpTeacher``)."""
    out = Path(opts.out_dir)
    cache = CacheDir(out)
    manifests, manifest, identity = cache.manifests, cache.merged(), cache.identity
    dtype = identity.logprob_dtype
    # The top-k at the cache's temperature, and the draws again with the cache's seed.
    scoring = identity.scoring
    k, samples = scoring.topk, scoring.draws  # k 0: no top-k to compare
    columns = [c for c in CACHE_COLUMNS if k or not c.startswith("topk_")]
    columns += SAMPLE_COLUMNS if samples else []
    report = VerifyReport(
        out_dir=out, seed=opts.seed if opts.seed is not None else secrets.randbits(32),
        atol=opts.atol if opts.atol is not None else DEFAULT_ATOL.get(dtype, 1e-2), logprob_dtype=dtype, k=k,
    )

    info = await teacher.info()
    report.teacher = f"{teacher.name} (model {info.model}, fingerprint {info.fingerprint})"
    for name, m in manifests.items():
        if (problem := teacher_problem(info, m.identity)) is not None:
            report.teacher_problem = problem + (f" ({name})" if len(manifests) > 1 else "")
            return report
    if (refusal := scoring.refusal(info)) is not None:
        report.teacher_problem = f"the cache asks what the server cannot answer: {refusal[0]}"
        return report
    # One entry more than cached where the server allows it: a tie at the k-th place then shows.
    asked = scoring.model_copy(update={"k": min(k + 1, info.k_max) if k else 1})
    if samples:
        report.draws = DrawComparison(0, 0, 0)

    records = sorted(manifest.shards.values(), key=lambda r: r.index)
    report.total_rows, report.total_shards = sum(r.rows for r in records), len(records)
    picks = sample_positions(records, opts.sample, report.seed)
    report.sampled_rows = int(sum(len(v) for v in picks.values()))
    report.sampled_shards = len(picks)

    sem = asyncio.Semaphore(opts.concurrency)
    tasks: list[asyncio.Task] = []

    async def check(batch: list[dict[str, Any]], file: str) -> None:
        try:
            fresh = table_rows(await _score(teacher, batch, asked))
        finally:
            sem.release()
        if len(fresh) != len(batch):
            for row in batch:
                report.add(Mismatch(file, row["line"], row["id"], f"the teacher answered {len(fresh)} rows for {len(batch)}"))
            return
        for row, answer in zip(batch, fresh):
            if k:
                problems, diff = compare_row(row, answer, k=k, atol=report.atol, logprob_dtype=dtype)
            else:
                problems, diff = compare_row(_without_topk(row), _without_topk(answer), k=0, atol=report.atol,
                                             logprob_dtype=dtype)
            if samples:
                drawn, cmp = compare_draws(row, answer, samples)
                problems += drawn
                if cmp is not None:
                    report.draws = DrawComparison(report.draws.draws + cmp.draws, report.draws.moved + cmp.moved,
                                                  report.draws.jumped + cmp.jumped)
            report.rows_checked += 1
            report.positions_checked += len(row["input_ids"])
            report.max_abs_diff = max(report.max_abs_diff, diff)
            for what in problems:
                report.add(Mismatch(file, row["line"], row["id"], what))

    by_index = {r.index: r for r in records}
    try:
        for index, local in sorted(picks.items()):
            rec = by_index[index]
            path = out / rec.file
            if not path.exists():
                report.add(Mismatch(rec.file, None, None, f"missing; {len(local)} sampled rows not checked"))
                continue
            size = path.stat().st_size
            digest = await asyncio.to_thread(sha256_file, path)
            report.shards_hashed += 1
            if size != rec.bytes:
                report.add(Mismatch(rec.file, None, None, f"{size} bytes, the manifest says {rec.bytes}"))
            if digest != rec.sha256:
                report.add(Mismatch(rec.file, None, None, "sha256 checksum differs from the manifest's"))
            try:
                table, problems = await asyncio.to_thread(read_rows, path, local, columns)
            except (OSError, pa.ArrowException) as exc:
                report.add(Mismatch(rec.file, None, None, f"unreadable: {exc}"))
                continue
            for what in problems:
                report.add(Mismatch(rec.file, None, None, what))
            rows = []
            for row in table_rows(table):
                n = len(row["input_ids"])
                if n == 0:
                    report.add(Mismatch(rec.file, row["line"], row["id"], "empty input_ids"))
                elif n > info.max_input_tokens:
                    report.add(Mismatch(rec.file, row["line"], row["id"],
                                        f"{n} tokens, more than the server holds ({info.max_input_tokens}); not re-scored"))
                else:
                    rows.append(row)
            for batch in batches(rows, min(opts.batch_rows, info.max_inputs_per_request), opts.batch_tokens):
                await sem.acquire()
                tasks.append(asyncio.create_task(check(batch, rec.file)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    if report.draws is not None and report.draws.jumped == 0 and not report.draws.holds:
        report.add(Mismatch(out.name, None, None, f"sampled targets: {report.draws}, more than the "
                            f"{report.draws.allowed} a CDF boundary explains"))
    return report


def _without_topk(row: dict[str, Any]) -> dict[str, Any]:
    """A row of a cache with sampled targets only, with empty top-k, so that ``compare_row`` checks the rest."""
    empty = np.zeros((len(row["input_ids"]), 0), np.float32)
    return {**row, "topk_ids": empty.astype(np.int32), "topk_logprobs": empty}


def run_verify(opts: VerifyOptions) -> VerifyReport:
    """Verify with a pool of ``opts.servers``, closing it afterwards."""
    if opts.sample < 1:
        raise InputError("--sample must be at least 1")

    async def go() -> VerifyReport:
        pool = TeacherPool([HttpTeacher(u, api_key=opts.api_key, ca_bundle=opts.ca_bundle) for u in opts.servers], retry_for_s=opts.retry_for_s)
        try:
            return await verify_cache(opts, pool)
        finally:
            await pool.aclose()

    return run_async(go())
