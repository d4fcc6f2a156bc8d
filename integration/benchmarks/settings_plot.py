"""SCF iterations from the atomic and the ML guess as one fdf setting varies (e.g. ``SCF.Mixer.Weight``).

    python integration/benchmarks/with_fdf_keys.py ../shared/datasets/h2o w0.50 --set "SCF.Mixer.Weight 0.50"
    siesta-dmguess bench w0.50/h2o --model water --out bw0.50          # ... for each value and set
    python integration/benchmarks/settings_plot.py 0.10=bw0.10 0.25=val 0.50=bw0.50 0.75=bw0.75 1.00=bw1.00 \\
        --key SCF.Mixer.Weight --reference 0.25 --out docs/results/mixing_weight.png

Each ``VALUE=FOLDER`` names a folder of ``bench_<set>.md`` tables that ``siesta-dmguess bench`` wrote for runs
with the setting at VALUE. One panel per set found in every folder: the iteration totals of both guesses
against the value, with the fraction saved at each point. Prints the same numbers as a table. Nothing is
rerun: the numbers are the tables'.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# summary_plot.py sits beside this script (run as python integration/benchmarks/settings_plot.py)
from summary_plot import read_bench_tables


def read_totals(folder: Path) -> dict[str, tuple[int, int]]:
    """{set name: (atomic, ml)} from the structure-set tables ``bench_*.md`` in ``folder``."""
    totals = {table["name"]: (table["atomic"], table["ml"]) for _, table in read_bench_tables(folder)
              if table["kind"] == "set"}
    if not totals:
        raise SystemExit(f"{folder}: no bench_*.md table of a structure set")
    return totals


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("points", nargs="+", metavar="VALUE=FOLDER",
                        help="a value of the setting and the folder of bench_*.md tables run with it")
    parser.add_argument("--key", default="SCF.Mixer.Weight", help="the setting's name, for the axis")
    parser.add_argument("--reference", type=float, help="the datasets' own value, marked in each panel")
    parser.add_argument("--out", type=Path, help="PNG to write (default: print only)")
    args = parser.parse_args(argv)
    points = []
    for item in args.points:
        value, sep, folder = item.partition("=")
        try:
            number = float(value) if sep else None
        except ValueError:
            number = None
        if number is None:
            parser.error(f"{item!r}: expected VALUE=FOLDER with a number for VALUE")
        points.append((number, read_totals(Path(folder))))
    points.sort(key=lambda p: p[0])
    sets = sorted(set.intersection(*(set(t) for _, t in points)))
    print("| set | " + " | ".join(f"{args.key} {v:g}" for v, _ in points) + " |")
    print("| --- " * (len(points) + 1) + "|")
    for name in sets:
        cells = [f"{t[name][0]} → {t[name][1]}, {100 * (1 - t[name][1] / t[name][0]):.0f} %" for _, t in points]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.out:
        plot(points, sets, args)


def plot(points, sets, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sets), figsize=(3.6 * len(sets), 3.4), squeeze=False)
    values = [v for v, _ in points]
    for ax, name in zip(axes[0], sets):
        atomic = [t[name][0] for _, t in points]
        ml = [t[name][1] for _, t in points]
        ax.plot(values, atomic, "o-", color="tab:gray", label="atomic guess")
        ax.plot(values, ml, "o-", color="tab:blue", label="ML guess")
        for v, a, m in zip(values, atomic, ml):
            ax.annotate(f"{100 * (1 - m / a):.0f} %", (v, m), textcoords="offset points", xytext=(0, -12),
                        ha="center", fontsize=7, color="tab:blue")
        if args.reference is not None:
            ax.axvline(args.reference, ls=":", color="k", lw=0.8)
        ax.set_ylim(0, max(atomic + ml) * 1.1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(args.key)
    axes[0][0].set_ylabel("SCF iterations, total over the set")
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.suptitle("SCF iterations vs " + args.key + " (dotted: the datasets' value; % = saved by the ML guess)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
