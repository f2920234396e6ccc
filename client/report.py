"""``teacher-farm inspect DIR --report FILE``: one self-contained HTML page of what a cache holds.

Per cache, from the stored columns alone:

- top-k mass: ``sum(exp(topk_logprobs))`` per position, the share of the teacher's probability the
  stored k tokens hold;
- a lower bound of the teacher's entropy: the entropy of the k stored probabilities plus the tail
  (``1 - mass``) as one more outcome. Merging the tail's tokens into one bucket can only lower the
  entropy, so the full distribution's entropy is at least this (equal when the tail is empty);
- the rank of the actual next token (``target_ranks``, 1 = the teacher's argmax), exactly;
- tokens per source file (the ``source`` column);
- with sampled targets, the distinct tokens among the N draws at each position.

The shards are streamed one row group at a time, reading only the columns needed, and positions
are taken in chunks: every statistic is a fixed-bin histogram or an exact count, so memory stays
bounded whatever the cache's size. The figures are drawn with matplotlib (the ``report`` extra),
imported only here, and inlined as base64 PNGs: the page loads nothing from anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from teacher_farm.client.fsutil import atomic_write
from teacher_farm.schemas import __version__
from teacher_farm.schemas.arrow import combined, list_lengths, topk_logprobs_of, uncoded
from teacher_farm.schemas.cache_dir import CacheDir, CacheIdentity, read_metadata
from teacher_farm.schemas.errors import InputError
from teacher_farm.schemas.positions import thicken
from teacher_farm.schemas.reader import row_groups

if TYPE_CHECKING:  # matplotlib is imported only when a report is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure as PlotFigure
    from matplotlib.ticker import FuncFormatter

#: Histogram bins of the top-k mass (over [0, 1]) and of the entropy bound (over [0, log(k + 1)]).
BINS = 50
#: Positions converted to float64 at a time: bounds the memory a large row group takes.
CHUNK_POSITIONS = 1 << 18
#: Source files drawn one bar each; the rest share one bar.
MAX_SOURCE_BARS = 24
#: Inches at 100 dpi. Each figure has a colour of its own (matplotlib's default cycle), marks in red.
FIGSIZE = (7.0, 3.6)
COLORS = {
    "topk-mass": "#1f77b4",
    "entropy": "#2ca02c",
    "rank": "#9467bd",
    "sources": "#ff7f0e",
    "distinct-draws": "#17becf",
}
MARK = "#d62728"

#: The columns read, when a shard has them (in any format: ``schemas.reader.stored_columns``).
_COLUMNS = ("source", "topk_logprobs", "target_ranks", "sample_counts")


@dataclass
class CacheStats:
    """What the report shows, accumulated row group by row group in fixed-size arrays."""

    k: int
    samples: int | None = None
    rows: int = 0
    tokens: int = 0
    has_topk: bool = False
    has_samples: bool = False
    topk_positions: int = 0
    mass_sum: float = 0.0
    mass_hist: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))
    entropy_sum: float = 0.0
    entropy_hist: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))
    #: ``rank_counts[r]``: positions whose actual next token has rank r (index 0 unused).
    rank_counts: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    #: ``distinct_counts[d]``: positions where the draws hold d distinct tokens.
    distinct_counts: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    #: source file (None: not recorded) -> [rows, tokens]
    sources: dict[str | None, list[int]] = field(default_factory=dict)
    shards: int = 0
    skipped: list[str] = field(default_factory=list)

    @property
    def entropy_max(self) -> float:
        """The largest value the entropy bound can take: ``log(k + 1)`` (k + 1 outcomes)."""
        return math.log(self.k + 1)

    def add(self, table: pa.Table) -> None:
        """Fold one row group's rows into the statistics (of a ``--positions`` cache: its kept positions)."""
        table, kept = thicken(uncoded(table))
        names = set(table.column_names)
        topk = "topk_top1" if "topk_top1" in names else "topk_logprobs" if "topk_logprobs" in names else None
        if topk is not None:
            n = list_lengths(combined(table, topk))
            lp = topk_logprobs_of(table)
            self._add_topk(lp if kept is None else lp[kept])
        elif "sample_counts" in names:
            n = list_lengths(combined(table, "sample_counts"))
        else:
            raise InputError(
                "cache rows with neither top-k (topk_logprobs) nor sampled (sample_counts) targets"
            )
        if "sample_counts" in names:
            self._add_samples(combined(table, "sample_counts"), n, kept)
        ranks = combined(table, "target_ranks").flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        if ranks.size:
            if ranks.min() < 1:
                raise InputError(f"malformed cache rows: a target rank of {ranks.min()} (ranks start at 1)")
            self.rank_counts = _add_counts(self.rank_counts, np.bincount(ranks))
        self.rows += table.num_rows
        self.tokens += int(n.sum())
        source = combined(table, "source") if "source" in names else pa.nulls(table.num_rows, pa.string())
        sums = (
            pa.table({"source": source, "n": pa.array(n)})
            .group_by("source")
            .aggregate([("n", "sum"), ("n", "count")])
        )
        for src, tokens, rows in zip(*(sums.column(c).to_pylist() for c in ("source", "n_sum", "n_count"))):
            entry = self.sources.setdefault(src, [0, 0])
            entry[0] += rows
            entry[1] += tokens

    def _add_topk(self, lp: np.ndarray) -> None:
        """Fold in the (positions, k) top-k logprobs of the kept positions, a chunk of positions at a time."""
        if lp.shape[0] and lp.shape[1] != self.k:
            raise InputError(
                f"malformed cache rows: top-k lists of [{lp.shape[1]}] entries, the cache's k is {self.k}"
            )
        self.has_topk = True
        positions = lp.shape[0]
        for lo in range(0, positions, CHUNK_POSITIONS):
            chunk = lp[lo : lo + CHUNK_POSITIONS].astype(np.float64)
            p = np.exp(chunk)
            mass = p.sum(axis=1)
            tail = np.clip(1.0 - mass, 0.0, 1.0)
            # p is 0 where the teacher ruled a token out (-inf): that term is 0, as is 0 log 0.
            entropy = -(p * np.where(np.isfinite(chunk), chunk, 0.0)).sum(axis=1)
            entropy -= tail * np.log(np.where(tail > 0, tail, 1.0))
            self.topk_positions += len(chunk)
            self.mass_sum += float(mass.sum())
            self.entropy_sum += float(entropy.sum())
            self.mass_hist += _bin(mass, 1.0)
            self.entropy_hist += _bin(entropy, self.entropy_max)

    def _add_samples(self, outer: pa.Array, n: np.ndarray, kept: np.ndarray | None = None) -> None:
        if not np.array_equal(list_lengths(outer), n):
            raise InputError("malformed cache rows: sample_counts has not one list per position")
        self.has_samples = True
        distinct = list_lengths(outer.flatten())
        if kept is not None:
            distinct = distinct[kept]
        if distinct.size:
            self.distinct_counts = _add_counts(self.distinct_counts, np.bincount(distinct))

    # ---------------------------------------------------------------------------- headline numbers

    @property
    def target_positions(self) -> int:
        return int(self.rank_counts.sum())

    def median_rank(self) -> float | None:
        """The median of the actual next token's rank, exact (as ``np.median`` of every rank)."""
        total = self.target_positions
        if not total:
            return None
        cum = np.cumsum(self.rank_counts)
        lo = int(np.searchsorted(cum, (total - 1) // 2, side="right"))
        hi = int(np.searchsorted(cum, total // 2, side="right"))
        return (lo + hi) / 2

    def share_rank_at_most(self, r: int) -> float | None:
        total = self.target_positions
        return float(self.rank_counts[: r + 1].sum()) / total if total else None

    def headline(self) -> list[tuple[str, str, float | int | None, str]]:
        """(key, label, value, shown text) rows of the numbers table."""
        rows: list[tuple[str, str, float | int | None, str]] = [
            ("rows", "rows (sequences)", self.rows, f"{self.rows:,}"),
            ("tokens", "tokens (positions scored)", self.tokens, f"{self.tokens:,}"),
            ("source_files", "source files", len(self.sources), f"{len(self.sources):,}"),
        ]
        if self.has_topk and self.topk_positions:
            mean_mass = self.mass_sum / self.topk_positions
            mean_entropy = self.entropy_sum / self.topk_positions
            rows += [
                ("mean_topk_mass", f"mean top-k mass (k = {self.k})", mean_mass, f"{mean_mass:.4f}"),
                (
                    "mean_entropy_lower_bound",
                    "mean entropy, lower bound (nats)",
                    mean_entropy,
                    f"{mean_entropy:.4f}",
                ),
            ]
        median = self.median_rank()
        if median is not None:
            rows.append(("median_rank", "median rank of the actual next token", median, f"{median:g}"))
            top1 = self.share_rank_at_most(1)
            rows.append(
                (
                    "share_rank_1",
                    "share of positions whose actual next token is the argmax",
                    top1,
                    f"{top1:.2%}",
                )
            )
            if self.has_topk:
                in_topk = self.share_rank_at_most(self.k)
                rows.append(
                    (
                        "share_in_topk",
                        f"share of positions whose actual next token is in the top-k (rank ≤ {self.k})",
                        in_topk,
                        f"{in_topk:.2%}",
                    )
                )
        if self.has_samples:
            positions = int(self.distinct_counts.sum())
            drawn = float((self.distinct_counts * np.arange(len(self.distinct_counts))).sum())
            mean = drawn / positions if positions else 0.0
            rows.append(
                (
                    "mean_distinct_draws",
                    f"mean distinct tokens among the {self.samples} draws per position",
                    mean,
                    f"{mean:.3f}",
                )
            )
        return rows


def _bin(values: np.ndarray, top: float) -> np.ndarray:
    """Counts of ``values`` in ``BINS`` equal bins over [0, top]; beyond either end (rounding): the end
    bins."""
    idx = np.floor(np.nan_to_num(values, nan=0.0) / top * BINS)
    return np.bincount(np.clip(idx, 0, BINS - 1).astype(np.int64), minlength=BINS)


def _add_counts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(b) > len(a):
        a, b = b, a
    a = a.copy()
    a[: len(b)] += b
    return a


# -------------------------------------------------------------------------------------------- scan


def scan(out_dir: Path, max_tokens: int | None = None) -> tuple[CacheStats, dict[str, str]]:
    """Stream every complete shard of ``out_dir`` (or its first row groups, until ``max_tokens`` positions
    are read); returns the statistics and the first shard's metadata."""
    records = CacheDir(out_dir).records()
    stats: CacheStats | None = None
    meta: dict[str, str] = {}
    skipped = []
    for rec in records:
        path = out_dir / rec.file
        if not path.is_file() or path.stat().st_size != rec.bytes:
            skipped.append(
                f"{rec.file}: {'missing' if not path.is_file() else 'size differs from the manifest'}"
            )
            continue
        if stats is None:
            schema = pq.read_schema(path)
            meta = read_metadata(schema)
            scoring = CacheIdentity.from_metadata(schema).scoring
            stats = CacheStats(k=scoring.k, samples=scoring.draws or None)
        for table in row_groups(path, _COLUMNS):
            stats.add(table)
            if max_tokens is not None and stats.tokens >= max_tokens:
                break
        stats.shards += 1
        if max_tokens is not None and stats.tokens >= max_tokens:
            break
    if stats is None:
        why = f" ({'; '.join(skipped)})" if skipped else ""
        raise InputError(f"{out_dir}: no complete shard to report on yet{why}")
    stats.skipped = skipped
    return stats, meta


# ----------------------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Figure:
    """One drawn figure: its id in the page, title (also its alt text), caption and PNG bytes."""

    id: str
    title: str
    caption: str
    png: bytes


def _pyplot() -> ModuleType:
    try:
        import matplotlib
    except ImportError as exc:
        raise InputError(
            "--report draws its figures with matplotlib, which is not installed: pip install "
            "'teacher-farm[report]'"
        ) from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: PlotFigure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _thousands() -> FuncFormatter:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, _: f"{x:,.0f}")


def _short_names(sources: list[str | None]) -> list[str]:
    """Source paths relative to their common folder (one file: its name); None as '(not recorded)'."""
    named = [s for s in sources if s is not None]
    try:
        base = os.path.commonpath(named) if len(named) > 1 else os.path.dirname(named[0]) if named else ""
    except ValueError:  # absolute and relative paths mixed: show them whole
        base = ""
    out = []
    for s in sources:
        if s is None:
            out.append("(not recorded)")
            continue
        name = os.path.relpath(s, base) if base else s
        out.append(name if len(name) <= 48 else "…" + name[-47:])
    return out


def _histogram(
    plt: ModuleType, edges: np.ndarray, share: np.ndarray, mean: float, color: str, legend: str
) -> tuple[PlotFigure, Axes]:
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.bar(
        edges[:-1], share, width=np.diff(edges), align="edge", color=color, edgecolor="white", linewidth=0.3
    )
    ax.axvline(mean, color=MARK, linestyle="--", linewidth=1.2, label=f"mean {mean:.3f}")
    ax.legend(loc=legend)
    return fig, ax


def _mass_figure(plt: ModuleType, stats: CacheStats) -> Figure:
    mean = stats.mass_sum / stats.topk_positions
    fig, ax = _histogram(
        plt,
        np.linspace(0.0, 1.0, BINS + 1),
        stats.mass_hist / stats.topk_positions,
        mean,
        COLORS["topk-mass"],
        "upper left",
    )
    title = f"Top-k mass: Σ exp(top-k logprobs) per position (k = {stats.k})"
    ax.set(
        title=title, xlabel="probability held by the stored top-k", ylabel="share of positions", xlim=(0, 1)
    )
    return Figure(
        "topk-mass",
        title,
        (
            "How much of the teacher's next-token probability the k stored tokens hold, per position: "
            f"{stats.topk_positions:,} positions in {BINS} bins of width {1 / BINS:g}. The rest (1 − mass) "
            "is the tail a top-k loss cannot see."
        ),
        _png(fig),
    )


def _entropy_figure(plt: ModuleType, stats: CacheStats) -> Figure:
    top = stats.entropy_max
    mean = stats.entropy_sum / stats.topk_positions
    fig, ax = _histogram(
        plt,
        np.linspace(0.0, top, BINS + 1),
        stats.entropy_hist / stats.topk_positions,
        mean,
        COLORS["entropy"],
        "upper right",
    )
    title = "Teacher entropy, lower bound: top-k + tail as one bucket (nats)"
    ax.set(
        title=title, xlabel="−Σ p log p − t log t,  t = 1 − Σ p", ylabel="share of positions", xlim=(0, top)
    )
    return Figure(
        "entropy",
        title,
        (
            "The entropy of the k stored probabilities p plus the tail mass t as one more outcome. Merging "
            "the tail's tokens into one bucket can only lower the entropy, so the teacher's full entropy is "
            f"at least this (equal when the tail is empty). At most log(k + 1) = {top:.3f} nats."
        ),
        _png(fig),
    )


def _rank_figure(plt: ModuleType, stats: CacheStats) -> Figure:
    ranks = np.flatnonzero(stats.rank_counts)
    cum = np.cumsum(stats.rank_counts)[ranks] / stats.target_positions
    fig, ax = plt.subplots(figsize=FIGSIZE)
    # From (1, 0): the jump at the smallest rank stays visible on the log axis.
    ax.step(np.r_[1, ranks], np.r_[0.0, cum], where="post", color=COLORS["rank"], linewidth=1.6)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(_thousands())
    if stats.has_topk:
        in_k = stats.share_rank_at_most(stats.k)
        ax.axvline(
            stats.k,
            color="#7f7f7f",
            linestyle=":",
            linewidth=1.2,
            label=f"k = {stats.k}: {in_k:.1%} ranked ≤ k",
        )
    median = stats.median_rank()
    ax.axvline(median, color=MARK, linestyle="--", linewidth=1.2, label=f"median {median:g}")
    ax.legend(loc="upper left")
    title = "Rank of the actual next token (1 = the teacher's argmax): cumulative share"
    ax.set(
        title=title,
        xlabel="rank (log scale)",
        ylabel="share of positions ranked ≤ x",
        ylim=(0, 1.02),
        xlim=(0.8, max(2.0, ranks[-1] * 1.2)),
    )
    return Figure(
        "rank",
        title,
        (
            f"Exact counts of target_ranks over {stats.target_positions:,} positions (every position but a "
            "row's last has an actual next token); ties rank together."
            + (
                " Left of the dotted line at k, the actual token is among the stored top-k."
                if stats.has_topk
                else ""
            )
        ),
        _png(fig),
    )


def _sources_figure(plt: ModuleType, stats: CacheStats) -> Figure:
    names = sorted(stats.sources, key=lambda s: (-stats.sources[s][1], s or ""))
    shown, rest = names[:MAX_SOURCE_BARS], names[MAX_SOURCE_BARS:]
    # A '$' in a file name would start matplotlib's mathtext (``a$\foo$`` fails to draw): show it as typed.
    labels = [name.replace("$", r"\$") for name in _short_names(shown)]
    tokens = [stats.sources[s][1] for s in shown]
    if rest:
        labels.append(f"{len(rest):,} more files")
        tokens.append(sum(stats.sources[s][1] for s in rest))
    fig, ax = plt.subplots(figsize=(FIGSIZE[0], max(1.6, 0.9 + 0.28 * len(labels))))
    ax.barh(np.arange(len(labels)), tokens, color=COLORS["sources"])
    ax.set_yticks(np.arange(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.xaxis.set_major_formatter(_thousands())
    title = f"Tokens per source file ({len(stats.sources):,} files)"
    ax.set(title=title, xlabel="tokens stored")
    return Figure(
        "sources",
        title,
        (
            "Tokens stored per input file (the source column), largest first; windows of a long line are "
            "counted whole, overlap included."
        ),
        _png(fig),
    )


def _draws_figure(plt: ModuleType, stats: CacheStats) -> Figure:
    positions = int(stats.distinct_counts.sum())
    d = np.arange(len(stats.distinct_counts))
    n_draws = stats.samples or int(d[-1])
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.bar(d[1:], stats.distinct_counts[1:] / max(positions, 1), width=0.9, color=COLORS["distinct-draws"])
    title = f"Distinct tokens among the N = {n_draws} draws per position"
    ax.set(
        title=title,
        xlabel="distinct tokens drawn",
        ylabel="share of positions",
        xlim=(0.4, max(n_draws, int(d[-1])) + 0.6),
    )
    return Figure(
        "distinct-draws",
        title,
        (
            "Length of sample_ids at each position: 1 where the teacher is near-certain, up to N where "
            f"every draw differs. {positions:,} positions."
        ),
        _png(fig),
    )


def draw(stats: CacheStats) -> list[Figure]:
    """The report's figures, as PNGs: those the cache's columns allow."""
    plt = _pyplot()
    figs = []
    if stats.has_topk and stats.topk_positions:
        figs += [_mass_figure(plt, stats), _entropy_figure(plt, stats)]
    if stats.target_positions:
        figs.append(_rank_figure(plt, stats))
    figs.append(_sources_figure(plt, stats))
    if stats.has_samples and stats.distinct_counts.sum():
        figs.append(_draws_figure(plt, stats))
    return figs


# -------------------------------------------------------------------------------------------- page

_STYLE = """
body { font-family: system-ui, sans-serif; color: #111; background: #fff; margin: 2em auto; max-width: 1500px;
       padding: 0 1em; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
p.meta, p.note { color: #444; margin: 0.2em 0; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.figures { display: flex; flex-wrap: wrap; gap: 1.5em; }
figure { margin: 0; max-width: 720px; }
figure img { max-width: 100%; height: auto; }
figcaption { color: #444; font-size: 0.9em; }
"""


def render_html(out_dir: Path, stats: CacheStats, meta: dict[str, str], figures: list[Figure]) -> str:
    """The report page: header, numbers table, figures as data: URIs; nothing loaded from elsewhere."""
    e = html.escape
    ident = CacheIdentity.from_entries(meta)
    facts = [
        f"model {ident.model or '?'}",
        f"k {stats.k}",
        f"targets {ident.scoring.targets}"
        + (f" (N = {stats.samples}, seed {ident.scoring.seed})" if stats.has_samples else ""),
        f"temperature {ident.scoring.temperature}",
        f"logprobs {ident.logprob_dtype}",
        f"{stats.shards} shards",
    ]
    # data-value holds the exact number (repr of a Python int or float), the cell the rounded one.
    rows = "\n".join(
        f'<tr><th scope="row">{e(label)}</th>'
        f'<td class="num" data-key="{e(key)}" data-value="{e(repr(value))}">{e(text)}</td></tr>'
        for key, label, value, text in stats.headline()
    )
    notes = "".join(f'<p class="note">skipped {e(s)}</p>' for s in stats.skipped)
    figs = "\n".join(
        f'<figure id="fig-{f.id}">'
        f'<img alt="{e(f.title)}" src="data:image/png;base64,{base64.b64encode(f.png).decode()}">'
        f"<figcaption>{e(f.caption)}</figcaption></figure>"
        for f in figures
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>teacher-farm cache report: {e(str(out_dir))}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>Cache report: {e(str(out_dir))}</h1>
<p class="meta">{e(" · ".join(facts))}</p>
{notes}
<table id="headline">
{rows}
</table>
<div class="figures">
{figs}
</div>
<p class="meta">teacher-farm {e(__version__)}</p>
</body>
</html>
"""


def write_report(out_dir: Path, report: Path) -> Path:
    """Scan the cache in ``out_dir`` and write its HTML report to ``report`` (replaced atomically)."""
    _pyplot()  # before the scan: a missing matplotlib fails at once
    stats, meta = scan(out_dir)
    page = render_html(out_dir, stats, meta, draw(stats))
    report.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(report, page.encode())
    return report
