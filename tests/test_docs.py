"""The documentation only names scripts, subcommands and options that exist, and the start-up it describes."""

import re
from pathlib import Path

from siesta_dmguess.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _text() -> str:
    return "\n".join(p.read_text() for p in DOCS)


def test_every_benchmark_script_named_in_the_docs_exists():
    named = set(re.findall(r"integration/benchmarks/([\w-]+\.py)", _text()))
    named |= {m for m in re.findall(r"`([\w-]+\.py)", _text()) if not m.startswith("test_")}
    # benchmark scripts, or the package's own modules (docs/architecture.md names them); not build/ copies
    missing = sorted(n for n in named if not (ROOT / "integration/benchmarks" / n).is_file()
                     and not list((ROOT / "siesta_dmguess").rglob(n)))
    assert named and not missing, f"scripts named in the docs but absent: {missing}"


def test_every_cli_option_named_in_the_docs_exists():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and "train" in a.choices).choices
    known = {opt for sub in subparsers.values() for a in sub._actions for opt in a.option_strings}
    used = set()
    for command in re.findall(r"siesta-dmguess (\w+)([^`\n]*)", _text()):
        sub, rest = command
        if sub in subparsers:
            used |= set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest))
    unknown = sorted(used - known)
    assert used and not unknown, f"options of `siesta-dmguess` commands in the docs that no subcommand has: {unknown}"


def test_building_the_cli_parser_does_not_import_torch():
    """`siesta-dmguess --help` answers in a fraction of a second: the parser must not pull in torch (2 s)."""
    import subprocess
    import sys

    code = "import sys; from siesta_dmguess.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", "building the CLI parser imported torch"


def test_loading_a_model_does_not_import_torch_dynamo():
    """e3nn marks a function with torch.compiler.disable, which imports torch._dynamo (1-2 s of every `predict`'s
    start-up); ``siesta_dmguess.e3nn_modules`` imports e3nn without it, and every module must take e3nn from there."""
    import subprocess
    import sys

    code = ("import sys; from siesta_dmguess.card import load_model; from siesta_dmguess import overlap; "
            "load_model('water'); print('e3nn' in sys.modules, 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True False", f"e3nn imported, torch._dynamo imported: {out.stdout}"


def test_the_readme_tables_of_structure_sets_show_the_committed_benchmark_totals():
    """Every held-out and unseen set benchmarked in docs/results has a README row with the same SCF iterations
    (atomic → ML), so a rerun that changes a table cannot leave the README behind."""
    from siesta_dmguess.bench import read_markdown_totals

    rows = re.findall(r"^\| `(?P<set>[\w-]+)`[^|]*\| `(?P<model>[\w-]+)` \| \d+ \|(?: \d+ \|)? (?P<a>\d+) → (?P<m>\d+)"
                      r"[^|]*\|", (ROOT / "README.md").read_text(), re.M)
    readme = {}
    for name, model, atomic, ml in rows:
        readme.setdefault((name, model), set()).add((int(atomic), int(ml)))
    tables = [read_markdown_totals(p.read_text()) for p in sorted((ROOT / "docs" / "results").glob("bench_*.md"))]
    sets = [t for t in tables if t["kind"] == "set"]
    assert len(sets) >= 4
    wrong = [(t["name"], t["model"], (t["atomic"], t["ml"]), readme.get((t["name"], t["model"]))) for t in sets
             if (t["atomic"], t["ml"]) not in readme.get((t["name"], t["model"]), set())]
    assert not wrong, f"README rows that differ from docs/results (set, model, table, README): {wrong}"
