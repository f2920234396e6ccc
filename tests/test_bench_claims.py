"""The throughput benchmark's guard: the ratios the docs claim, checked against one run's table."""

from __future__ import annotations

import subprocess
import sys

from benchmarks.harness import check_claims, rates_of
from tests.conftest import ROOT

ROWS = [
    ("(c) engine prefill only, in process (ceiling)", {"tokens": 1000, "seconds": 1.0}),
    ("(e) vLLM in process, flat prompt logprobs, k=16", {"tokens": 1000, "seconds": 4.0}),
    ("(p) in process, pooled reduction, k=16", {"tokens": 1000, "seconds": 2.0}),
    (
        "(a) teacher-farm serve (pooled) + cache into Parquet, k=16",
        {"tokens": 1000, "seconds": 5.0, "steady": 300.0},
    ),
    ("(e) vLLM in process, flat prompt logprobs, k=64", {"tokens": 1000, "seconds": 5.0}),
]


def test_rates_are_read_from_the_table_rows():
    assert rates_of(ROWS) == {
        "c": 1000,
        "e@16": 250,
        "p@16": 500,
        "a@16": 200,
        "a.steady@16": 300,
        "e@64": 200,
    }


def test_a_claim_holds_or_says_how_far_below_it_is():
    lines, ok = check_claims(rates_of(ROWS), ["p/e@16>=2.0", "a.steady/p@16 >= 0.5", "p/c@16>=0.5"])
    assert ok and lines == [
        "claim p/e@16>=2.0: measured 2.00 ok",
        "claim a.steady/p@16 >= 0.5: measured 0.60 ok",
        "claim p/c@16>=0.5: measured 0.50 ok",
    ]
    lines, ok = check_claims(rates_of(ROWS), ["p/e@16>=1.2", "a/e@16>=0.95"])
    assert not ok and lines[1] == "claim a/e@16>=0.95: measured 0.80 BELOW THE CLAIM"
    lines, ok = check_claims(rates_of(ROWS), ["p/e@64>=1.5"])
    assert not ok and "NOT MEASURED" in lines[0]


def test_a_malformed_claim_stops_the_benchmark_before_it_runs():
    proc = subprocess.run(
        [sys.executable, "benchmarks/harness.py", "--claim", "p>e", "--work", "/nonexistent/never-made"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "write it as X/Y@K>=R" in proc.stderr
