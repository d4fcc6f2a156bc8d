"""One picture of every SCF benchmark in docs/results: iterations saved against SIESTA's atomic guess.

    python integration/benchmarks/summary_plot.py docs/results --out docs/results/summary.png

Reads the Markdown tables that ``siesta-dmguess bench`` writes (``bench_*.md``): for a
set of structures its "Total: A → B SCF iterations" line, for a trajectory the
per-guess totals. Draws the percentage saved per set (held-out validation sets,
unseen structures) and per guess along each trajectory, with a dashed line at
the 65 % target. Nothing is rerun: the numbers are the committed tables'.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from siesta_dmguess.bench import read_markdown_totals
from siesta_dmguess.errors import DMGuessError

GUESSES = ("reuse", "extrapolation", "ml", "ml+residual")


def read_bench_tables(folder: Path) -> list[tuple[Path, dict]]:
    """[(path, totals)] of every ``bench_*.md`` in ``folder`` (``read_markdown_totals``); a table that cannot be
    read stops the script with its path."""
    tables = []
    for path in sorted(folder.glob("bench_*.md")):
        try:
            tables.append((path, read_markdown_totals(path.read_text())))
        except DMGuessError as exc:
            raise SystemExit(f"{path}: {exc}") from exc
    return tables


def read_tables(folder: Path) -> tuple[list[tuple[str, int, int]], dict[str, dict[str, int]]]:
    """([(label, atomic, ml)] for structure sets, {trajectory: {guess: total}}) from ``bench_*.md``."""
    sets, trajectories = [], {}
    for path, table in read_bench_tables(folder):
        if table["kind"] == "set":
            unseen = path.stem.startswith("bench_unseen_")
            sets.append((f"{table['name']}{' (unseen)' if unseen else ' val'} · {table['model']}",
                         table["atomic"], table["ml"]))
        elif "atomic" in table["totals"]:  # the bar is the saving against the atomic guess
            trajectories[table["name"]] = table["totals"]
    sets.sort(key=lambda s: ("unseen" in s[0], s[0]))  # held-out validation sets first
    return sets, trajectories


def plot(sets, trajectories, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.42 * max(len(sets), 4 * len(trajectories) // 2) + 1.8))
    labels = [label for label, _, _ in sets]
    saved = [100 * (a - m) / a for _, a, m in sets]
    y = np.arange(len(sets))
    ax1.barh(y, saved, color=["tab:orange" if "unseen" in lab else "tab:blue" for lab in labels])
    for k, (_, a, m) in enumerate(sets):
        ax1.text(max(saved[k], 0) + 1, k, f"{a} → {m}", va="center", fontsize=8)
    ax1.set_yticks(y, labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.axvline(65, ls="--", color="k", lw=0.8)
    ax1.set_xlim(min(0, min(saved, default=0)) - 2, 100)
    ax1.set_xlabel("SCF iterations saved vs atomic guess (%)")
    ax1.set_title("single structures (blue: held-out val, orange: unseen)", fontsize=10)

    names = sorted(trajectories)
    width = 0.8 / len(GUESSES)
    lowest = 0.0
    for g, guess in enumerate(GUESSES):
        values = [100 * (trajectories[t]["atomic"] - trajectories[t].get(guess, trajectories[t]["atomic"]))
                  / trajectories[t]["atomic"] for t in names]
        lowest = min([lowest, *values])  # (no trajectory tables: no values)
        ax2.barh(np.arange(len(names)) + (g - 1.5) * width, values, height=width, label=guess)
    ax2.set_yticks(np.arange(len(names)), names, fontsize=8)
    ax2.invert_yaxis()
    ax2.axvline(65, ls="--", color="k", lw=0.8)
    ax2.set_xlim(lowest - 2, 100)  # a guess can cost iterations (reuse on a bond scan)
    ax2.set_xlabel("SCF iterations saved vs atomic guess (%)")
    ax2.set_title("trajectories (ASE-driven MD, relaxations, bond scans)", fontsize=10)
    ax2.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="folder with bench_*.md tables (docs/results)")
    p.add_argument("--out", type=Path, default=Path("summary.png"))
    args = p.parse_args()
    if not args.results.is_dir():
        p.error(f"{args.results}: not a folder (the folder of bench_*.md tables, docs/results)")
    sets, trajectories = read_tables(args.results)
    if not sets and not trajectories:
        p.error(f"{args.results}: no bench_*.md tables of `siesta-dmguess bench` in it")
    for label, a, m in sets:
        print(f"{label:45s} {a:4d} → {m:4d}  {100 * (a - m) / a:5.1f} % saved")
    for name, totals in sorted(trajectories.items()):
        print(f"{name:45s} " + "  ".join(f"{g} {totals[g]}" for g in ("atomic", *GUESSES) if g in totals))
    plot(sets, trajectories, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
