"""Keep the shipped model cards' SCF benchmarks equal to the committed tables in docs/results.

    python integration/benchmarks/card_benchmarks.py docs/results            # what differs, exit 1 if anything
    python integration/benchmarks/card_benchmarks.py docs/results --write    # write it into models/*/card.json

Each model card carries the SCF iterations measured with it (issue 4), and the README shows the same numbers
from the tables ``siesta-dmguess bench`` wrote (``docs/results/bench_*.md``). Copied by hand, the two drifted
apart; this script reads the tables (``siesta_dmguess.bench.read_markdown_totals``) and fills each card's
``scf_benchmark.unseen_structures`` (``bench_unseen_*.md``) and ``scf_benchmark.trajectories`` (MD, relaxations,
bond scans) from them, and each held-out set's wall times and start-up from its table (``bench_<set>.md``, the
README's held-out rows). A held-out set's SCF counts are only compared: a card's ``scf_iterations_atomic`` /
``scf_iterations_ml`` must equal the table's, and a new count is a new model, whose card its maker writes.
``tests/test_shipped_models.py`` runs the comparison, so a card and its tables cannot disagree on main.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from siesta_dmguess.bench import read_markdown_totals
from siesta_dmguess.card import read_card, shipped_models_dir, update_card

UNSEEN_COMMAND = ("python integration/benchmarks/unseen_structures.py ../shared/datasets unseen; siesta-dmguess "
                  "bench unseen/SET --model {model} --split all")
ROTATIONS = " (rotations: ../shared/datasets/rotations, --skip-incompatible where the model lacks a species)"
TRAJECTORY_COMMAND = ("python integration/benchmarks/md_trajectory.py FDF --steps 20 (relaxations: --relax 0.05 "
                      "--rattle 0.1; bond scans: bond_scan.py); siesta-dmguess bench TRAJ --fdf FDF --model {model}")
# Entries of earlier cards that the two generated sections replace.
REPLACED = ("md_trajectories", "relaxations", "unseen_molecules", "g2_stress")
# A held-out set's timings, copied from its table, and where they come from.
WALL_KEYS = ("wall_s_atomic", "wall_s_ml_including_prediction", "startup_s")
WALL_NOTE = ("wall times: docs/results/bench_{name}.md, from `bench --repeat 3` with nothing else running (each "
             "structure's median-time run of three, the median prediction; start-up once apart); docs/benchmarks.md, "
             "'When each number was measured', names the session")


def tables_by_model(results: Path) -> dict[str, dict]:
    """{model: {"held_out": {set: (atomic, ml)}, "unseen_structures": {...}, "trajectories": {...}}} from the
    tables in ``results``."""
    found: dict[str, dict] = {}
    for path in sorted(results.glob("bench_*.md")):
        table = read_markdown_totals(path.read_text())
        if table["model"] is None:
            raise SystemExit(f"{path}: the table does not name its model")
        entry = found.setdefault(table["model"], {"held_out": {}, "unseen_structures": {}, "trajectories": {}})
        if table["kind"] == "trajectory":
            entry["trajectories"][table["name"]] = table["totals"]
        elif path.stem.startswith("bench_unseen_"):
            entry["unseen_structures"][table["name"]] = {"atomic": table["atomic"], "ml": table["ml"]}
        else:
            entry["held_out"][table["name"]] = table
    return found


def card_sections(model: str, tables: dict) -> dict:
    """The two generated sections of a card's ``scf_benchmark``, with the commands that reproduce them."""
    rotations = ROTATIONS if "rotations" in tables["unseen_structures"] else ""
    return {"unseen_structures": {"command": UNSEEN_COMMAND.format(model=model) + rotations,
                                  "tables": "docs/results/bench_unseen_*.md", **tables["unseen_structures"]},
            "trajectories": {"command": TRAJECTORY_COMMAND.format(model=model),
                             "tables": "docs/results/bench_<trajectory>.md", **tables["trajectories"]}}


def differences(results: Path, models: Path) -> dict[str, list[str]]:
    """What each shipped card says differently from the tables (empty lists where they agree)."""
    out = {}
    for model, tables in tables_by_model(results).items():
        bench = read_card(models / model).get("scf_benchmark", {})
        problems = []
        for section, expected in card_sections(model, tables).items():
            card_section = bench.get(section) or {}
            problems += [f"{section}.{key}: card {card_section.get(key)} != tables {expected.get(key)}"
                         for key in sorted(set(expected) | set(card_section))
                         if card_section.get(key) != expected.get(key)]
        problems += [f"{key}: an entry the generated sections replace" for key in REPLACED if key in bench]
        for name, table in tables["held_out"].items():
            held = held_out_entry(bench, name)
            if (held.get("scf_iterations_atomic"), held.get("scf_iterations_ml")) != (table["atomic"], table["ml"]):
                problems.append(f"{name}: card {held.get('scf_iterations_atomic')} -> {held.get('scf_iterations_ml')}"
                                f" != table {table['atomic']} -> {table['ml']}")
            problems += [f"{name}.{key}: card {held.get(key)} != table {table[key]}" for key in WALL_KEYS
                         if key in table and held.get(key) != table[key]]
        out[model] = problems
    return out


def held_out_entry(bench: dict, name: str) -> dict:
    """A card's entry for held-out set ``name``: `water` keeps one entry per set, the other cards theirs at the top
    of ``scf_benchmark``."""
    return bench.get(name, bench)


def write(results: Path, models: Path) -> None:
    """Fill every card's generated sections, and its held-out sets' timings, from the tables (a held-out set's SCF
    counts are left to the person who trained the model: they are only compared)."""
    for model, tables in tables_by_model(results).items():
        bench = {k: v for k, v in read_card(models / model).get("scf_benchmark", {}).items() if k not in REPLACED}
        for name, table in tables["held_out"].items():
            timings = {key: table[key] for key in WALL_KEYS if key in table}
            if timings:
                held_out_entry(bench, name).update(timings, wall_note=WALL_NOTE.format(name=name))
        update_card(models / model, {"scf_benchmark": {**bench, **card_sections(model, tables)}})


def default_models_dir() -> Path:
    """The checkout's models/ where this script sits in one: a non-editable install has its own copy of the
    cards, and writing there would leave the repo's as they were."""
    checkout = Path(__file__).resolve().parents[2] / "models"
    return checkout if checkout.is_dir() else shipped_models_dir()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="folder with bench_*.md tables (docs/results)")
    p.add_argument("--models", type=Path, default=default_models_dir(),
                   help="folder of the model folders (default: this checkout's models/, else the installed ones)")
    p.add_argument("--write", action="store_true", help="write the tables' numbers into the cards")
    args = p.parse_args()
    if not args.results.is_dir() or not any(args.results.glob("bench_*.md")):
        p.error(f"{args.results}: no bench_*.md tables in it (the folder of `siesta-dmguess bench` tables, "
                "docs/results): nothing to check the cards against")
    if args.write:
        write(args.results, args.models)
    found = differences(args.results, args.models)
    for model, problems in found.items():
        print(f"{model}: " + ("agrees with the tables" if not problems else "\n  " + "\n  ".join(problems)))
    sys.exit(1 if any(found.values()) else 0)


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
