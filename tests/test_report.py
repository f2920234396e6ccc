"""``teacher-farm inspect DIR --report FILE``: a hand-built cache, its report opened in headless Chromium."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "matplotlib", reason="the report extra is not installed: pip install 'teacher-farm[report]'"
)
from PIL import Image  # noqa: E402 - matplotlib's own dependency

from teacher_farm.client.report import BINS, COLORS, scan, write_report  # noqa: E402
from teacher_farm.schemas.arrow import (  # noqa: E402
    ScoredSequence,
    cache_schema,
    encode_rows,
    results_to_table,
    with_source_columns,
)
from teacher_farm.schemas.cache_dir import CacheIdentity  # noqa: E402
from teacher_farm.schemas.scoring import Scoring  # noqa: E402
from tests.helpers import write_shards  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB, K, N = 300, 8, 16
#: The figures of a cache with both kinds of target, in the order the page shows them.
FIGURES = ["topk-mass", "entropy", "rank", "sources", "distinct-draws"]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def draws(rng: np.random.Generator, full: np.ndarray) -> dict[str, np.ndarray]:
    """N draws per position from exp(full), stored as the server does: distinct ids ascending, counts."""
    cdf = np.exp(full).cumsum(axis=1)
    u = rng.random((len(full), N)) * cdf[:, -1:]
    drawn = np.sort((cdf[:, None, :] <= u[:, :, None]).sum(-1), axis=1)
    first = np.ones_like(drawn, dtype=bool)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    starts = np.flatnonzero(first)
    ids = drawn.reshape(-1)[starts]
    counts = np.diff(np.append(starts, drawn.size))
    return {
        "sample_lengths": first.sum(1).astype(np.int32),
        "sample_ids": ids.astype(np.int32),
        "sample_counts": counts.astype(np.int16),
        "sample_logprobs": np.take_along_axis(full, drawn, 1).reshape(-1)[starts].astype(np.float32),
    }


def scored(rng: np.random.Generator, n: int) -> ScoredSequence:
    # Some rows sharp, some flat: the masses and entropies spread over their ranges.
    full = log_softmax(rng.standard_normal((n, VOCAB)) * rng.uniform(0.5, 6.0)).astype(np.float32)
    top = np.argsort(-full, axis=1, kind="stable")[:, :K]
    input_ids = rng.integers(0, VOCAB, n)
    target = full[np.arange(n - 1), input_ids[1:]]
    ranks = 1 + (full[: n - 1] > target[:, None]).sum(-1)
    return ScoredSequence(
        id=None,
        input_ids=input_ids.astype(np.int32),
        topk_ids=top.astype(np.int32),
        topk_logprobs=np.take_along_axis(full, top, 1),
        target_logprobs=target,
        target_ranks=ranks.astype(np.int32),
        **draws(rng, full),
    )


def write_cache(
    out: Path,
    sources: dict[str, list[int]],
    targets: str = "both",
    fmt: str | None = None,
) -> list[tuple[str, ScoredSequence]]:
    """One shard per source file (rows of the given lengths), a row group per two rows, and the manifest:
    every column as the server sends it, float32, or with ``fmt`` as a cache run writes that format."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(7)
    identity = CacheIdentity(
        model="teacher",
        model_fingerprint="mf",
        tokenizer_fingerprint="tf",
        vocab_size=VOCAB,
        scoring=Scoring(k=K, targets=targets, samples=N, seed=0),
        logprob_dtype=fmt or "float32",
    )
    schema = identity.schema() if fmt else cache_schema("float32", targets).with_metadata(identity.metadata())
    rows, shards = [], {}
    for j, (source, lengths) in enumerate(sources.items()):
        seqs = [scored(rng, n) for n in lengths]
        rows += [(source, s) for s in seqs]
        tables = []
        shard_schema = schema  # a compact shard's rows share one id order and models: its first rows'
        for i in range(0, len(seqs), 2):
            table = with_source_columns(
                results_to_table(seqs[i : i + 2], K, targets),
                range(i, i + len(seqs[i : i + 2])),
                [source] * len(seqs[i : i + 2]),
            )
            if fmt:
                tables.append(encode_rows(table, shard_schema))
                # The next rows share the first rows' id order and models (a ShardWriter's schema).
                shard_schema = shard_schema.with_metadata(tables[-1].schema.metadata)
            else:
                tables.append(table.cast(schema))
        shards[j] = (range(100 * j, 100 * j + len(lengths)), tables)
    write_shards(out, schema, shards, identity.entries())
    return rows


def expected_numbers(rows: list[tuple[str, ScoredSequence]]) -> dict[str, float]:
    """The headline numbers, straight from the arrays written."""
    lp = np.concatenate([s.topk_logprobs for _, s in rows]).astype(np.float64)
    p = np.exp(lp)
    tail = np.clip(1 - p.sum(1), 0, 1)
    entropy = -(p * lp).sum(1) - np.where(tail > 0, tail * np.log(np.where(tail > 0, tail, 1)), 0)
    ranks = np.concatenate([s.target_ranks for _, s in rows])
    return {
        "rows": len(rows),
        "tokens": sum(len(s.input_ids) for _, s in rows),
        "source_files": len({src for src, _ in rows}),
        "mean_topk_mass": p.sum(1).mean(),
        "mean_entropy_lower_bound": entropy.mean(),
        "median_rank": float(np.median(ranks)),
        "share_rank_1": float((ranks == 1).mean()),
        "share_in_topk": float((ranks <= K).mean()),
        "mean_distinct_draws": float(np.concatenate([s.sample_lengths for _, s in rows]).mean()),
    }


class Page(HTMLParser):
    """The images and the numbers table of a rendered page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, dict[str, str]] = {}
        self.numbers: dict[str, str] = {}
        self.external: list[str] = []
        self._figure: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        for name in ("src", "href"):
            if a.get(name) and not a[name].startswith("data:"):
                self.external.append(a[name])
        if tag == "figure":
            self._figure = a["id"].removeprefix("fig-")
        elif tag == "img":
            self.images[self._figure] = a
        elif tag == "td" and "data-key" in a:
            self.numbers[a["data-key"]] = a["data-value"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium on this machine (.ci/run installs the system's chromium package)")


def browse(report: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--disable-extensions",
            f"--user-data-dir={tmp_path / 'profile'}",
            *args,
            report.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    corpus = tmp / "corpus"
    rows = write_cache(
        tmp / "cache",
        {str(corpus / "a.jsonl"): [40, 3, 25, 60, 12], str(corpus / "web" / "b.jsonl"): [90, 2, 31]},
    )
    report = tmp / "out" / "report.html"
    proc = subprocess.run(
        [sys.executable, "-m", "teacher_farm.cli", "inspect", str(tmp / "cache"), "--report", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"report:     {report}" in proc.stdout
    page = Page()
    page.feed(browse(report, tmp, "--dump-dom").stdout)
    shot = tmp / "screenshot.png"
    browse(report, tmp, "--window-size=1500,2000", f"--screenshot={shot}")
    return rows, report, page, shot


def test_the_report_is_one_file_whose_figures_are_real_pngs(rendered):
    _, report, page, _ = rendered
    assert list(page.images) == list(FIGURES)
    assert page.external == [] and "http" not in report.read_text()
    for name, img in page.images.items():
        assert img["src"].startswith("data:image/png;base64,"), name
        png = base64.b64decode(img["src"].split(",", 1)[1], validate=True)
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 8000, (name, len(png))
        with Image.open(io.BytesIO(png)) as im:
            im.verify()
        with Image.open(io.BytesIO(png)) as im:
            assert im.width > 500 and im.height > 150, (name, im.size)
    assert (
        "lower bound" in page.images["entropy"]["alt"]
        and "tail as one bucket" in page.images["entropy"]["alt"]
    )


def test_the_numbers_table_matches_the_arrays_written(rendered):
    rows, _, page, _ = rendered
    expected = expected_numbers(rows)
    assert set(page.numbers) == set(expected)
    for key, value in expected.items():
        assert float(page.numbers[key]) == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert (
        0 < expected["share_in_topk"] < 1 and expected["mean_distinct_draws"] > 1
    )  # the data exercises them


def test_chromium_paints_every_figure(rendered):
    """Each figure's own colour shows in the screenshot: the browser decoded and drew the images."""
    *_, shot = rendered
    with Image.open(shot) as im:
        px = np.asarray(im.convert("RGB")).astype(np.int16)
    assert px.shape[:2] == (2000, 1500)
    for name in FIGURES:
        rgb = np.array([int(COLORS[name][i : i + 2], 16) for i in (1, 3, 5)])
        near = (np.abs(px - rgb).max(-1) <= 12).sum()
        assert near > 300, f"{name}: {near} pixels of its colour in the screenshot"


def test_the_histograms_count_every_position_once_in_its_bin(tmp_path):
    """Streamed over several shards and row groups, the counts are those of all the values at once."""
    rows = write_cache(tmp_path / "cache", {"a.jsonl": [40, 3, 25], "b.jsonl": [60, 12], "c.jsonl": [7]})
    stats, meta = scan(tmp_path / "cache")
    assert meta["k"] == str(K) and stats.k == K and stats.samples == N
    lp = np.concatenate([s.topk_logprobs for _, s in rows]).astype(np.float64)
    mass = np.exp(lp).sum(1)
    np.testing.assert_array_equal(stats.mass_hist, np.histogram(np.minimum(mass, 1 - 1e-12), BINS, (0, 1))[0])
    assert stats.entropy_hist.sum() == len(lp)
    ranks = np.concatenate([s.target_ranks for _, s in rows])
    np.testing.assert_array_equal(np.trim_zeros(stats.rank_counts, "b"), np.bincount(ranks))
    distinct = np.concatenate([s.sample_lengths for _, s in rows])
    np.testing.assert_array_equal(np.trim_zeros(stats.distinct_counts, "b"), np.bincount(distinct))
    assert stats.sources == {
        src: [sum(1 for f, _ in rows if f == src), sum(len(s.input_ids) for f, s in rows if f == src)]
        for src in ("a.jsonl", "b.jsonl", "c.jsonl")
    }


@pytest.mark.parametrize("fmt", ["float16", "uint8-gap"])
def test_a_compact_cache_reports_the_values_it_reads_back(tmp_path, fmt):
    from teacher_farm.schemas.formats import FORMATS

    rows = write_cache(tmp_path / "cache", {"a.jsonl": [40, 3, 25], "b.jsonl": [60]}, fmt=fmt)
    stats, meta = scan(tmp_path / "cache")
    assert meta["logprob_dtype"] == fmt and stats.has_samples
    read_back = [
        (src, ScoredSequence(**{**s.__dict__, "topk_logprobs": FORMATS[fmt].round_trip(s.topk_logprobs)}))
        for src, s in rows
    ]
    expected = expected_numbers(read_back)
    for key, _label, value, _ in stats.headline():
        assert value == pytest.approx(expected[key], rel=1e-6), key
    assert expected["mean_topk_mass"] == pytest.approx(expected_numbers(rows)["mean_topk_mass"], rel=0.05)


@pytest.mark.parametrize(
    ("targets", "figures"),
    [
        ("topk", ["topk-mass", "entropy", "rank", "sources"]),
        ("sampled", ["rank", "sources", "distinct-draws"]),
    ],
)
def test_a_cache_gets_the_figures_its_columns_allow(tmp_path, targets, figures):
    write_cache(tmp_path / "cache", {"a.jsonl": [30, 4]}, targets)
    page = Page()
    page.feed(write_report(tmp_path / "cache", tmp_path / "r.html").read_text())
    assert list(page.images) == figures
    assert ("mean_topk_mass" in page.numbers) == (targets == "topk")
    assert ("mean_distinct_draws" in page.numbers) == (targets == "sampled")


def test_without_matplotlib_only_the_report_needs_it(tmp_path):
    # A module of that name that fails to import stands for a missing package.
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ImportError('not installed')\n")
    write_cache(tmp_path / "cache", {"a.jsonl": [5]})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "teacher_farm.cli", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )

    assert cli("cache", "--help").returncode == 0
    assert cli("inspect", str(tmp_path / "cache")).returncode == 0
    proc = cli("inspect", str(tmp_path / "cache"), "--report", str(tmp_path / "r.html"))
    assert proc.returncode == 1
    assert "pip install 'teacher-farm[report]'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r.html").exists()


def test_inspect_says_how_peaked_the_teacher_is_from_the_arrays_written(tmp_path):
    from teacher_farm.client.inspect import inspect_cache, teacher_line

    rows = write_cache(tmp_path / "cache", {"a.jsonl": [40, 3, 25, 60], "b.jsonl": [90, 31]})
    want = expected_numbers(rows)
    summary, problems = inspect_cache(tmp_path / "cache")
    assert problems == []
    line = next(x for x in summary.splitlines() if x.startswith("teacher:"))
    assert line == (
        f"teacher:    top-{K} mass {want['mean_topk_mass']:.4f} on average; next token the argmax at "
        f"{want['share_rank_1']:.2%}; in the top-{K} at {want['share_in_topk']:.2%}; "
        f"{want['mean_distinct_draws']:.3f} distinct tokens in {N} draws"
    )
    # Over the first row group only (two rows: 40 + 3 positions), and it says so.
    first = expected_numbers(rows[:2])
    short = teacher_line(tmp_path / "cache", sum(len(s.input_ids) for _, s in rows), max_tokens=1)
    assert f"mass {first['mean_topk_mass']:.4f} on" in short and short.endswith("(first 43 positions)")
