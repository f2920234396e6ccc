"""The distillation benchmark's quality for bytes: one table and one PNG from its results of several seeds.

    python benchmarks/distill_plot.py /tmp/distill0 /tmp/distill1 --png docs/img/distill-quality-for-bytes.png

For every cached row: its cache bytes per token against the share of the KL gap it closes between
no KD (0) and full-distribution KD (1), per seed: ``(KL_no_kd - KL) / (KL_no_kd - KL_full_kd)``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def gap_closed(results: dict, key: str) -> float:
    none, full = results["no_kd"]["kl"], results["full_kd"]["kl"]
    return (none - results[key]["kl"]) / (none - full)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "runs", nargs="+", type=Path, help="--out directories of benchmarks/distill.py (one per seed)"
    )
    p.add_argument("--png", type=Path, required=True)
    p.add_argument("--title", default="the distillation benchmark", help="what the picture's title names")
    a = p.parse_args(argv)
    runs = [json.loads((d / "results.json").read_text()) for d in a.runs]
    seeds = [r["args"]["seed"] for r in runs]
    names = runs[0]["names"]
    rows = [key for key, r in runs[0]["results"].items() if r.get("bytes_per_token") is not None]

    head = " | ".join(f"CE, KL, gap closed (seed {s})" for s in seeds)
    print(f"| targets | {head} | bytes/token ({', '.join(f'seed {s}' for s in seeds)}) |")
    print("|---|" + "---|" * len(seeds) + "---|")
    for key in ["no_kd", "full_kd", *rows]:
        cells = []
        for r in runs:
            if key not in r["results"]:  # a seed run with fewer rows (--methods)
                cells.append("-")
                continue
            res = r["results"][key]
            closed = "" if key == "no_kd" or key == "full_kd" else f", {gap_closed(r['results'], key):.0%}"
            cells.append(f"{res['ce']:.3f}, {res['kl']:.3f}{closed}")
        b = (
            " / ".join(f"{r['results'][key]['bytes_per_token']:.1f}" for r in runs if key in r["results"])
            if key in rows
            else "-"
        )
        print(f"| {names[key]} | {' | '.join(cells)} | {b} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    markers = "os^D"
    floor = -0.6  # rows far worse than no KD are drawn at the floor, their value written beside
    for i, key in enumerate(rows):
        there = [r for r in runs if key in r["results"]]
        xs = [r["results"][key]["bytes_per_token"] for r in there]
        ys = [gap_closed(r["results"], key) for r in there]
        color = f"C{i}"
        for j, (x, y) in enumerate(zip(xs, ys)):
            shown = max(y, floor)
            ax.scatter(
                x,
                shown,
                color=color,
                marker="v" if y < floor else markers[j % len(markers)],
                s=50,
                label=names[key] if j == 0 else None,
            )
            if y < floor:
                ax.annotate(
                    f"{y:.1f}",
                    (x, shown),
                    textcoords="offset points",
                    xytext=(6, 4 + 10 * j),
                    fontsize=7,
                    color=color,
                )
        ax.plot(xs, [max(y, floor) for y in ys], color=color, alpha=0.3)
    ax.set_ylim(floor - 0.1, 1.15)
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.axhline(0.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("cache bytes per token (log scale)")
    ax.set_ylabel("share of the KL gap closed (no KD = 0, full KD = 1)")
    shapes = ", ".join(
        f"{'circle square triangle diamond'.split()[j % 4]}: seed {seed}" for j, seed in enumerate(seeds)
    )
    ax.set_title(
        f"Quality for bytes: {a.title} ({shapes}; a ▼ is below the axis, its value beside)",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    a.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.png)
    print(f"\n{a.png}")


if __name__ == "__main__":
    main()
