"""A dataset's runs with some fdf keys set otherwise, ready for ``siesta-dmguess bench``: how much the ML guess
saves under a user's own SCF settings (e.g. SIESTA's default ``DM.Tolerance`` of 1e-4 instead of the datasets'
1e-5). Keys that change the basis or the physics would make the model's guess refer to another run; the
compatibility guard of ``bench`` refuses those.

    python integration/benchmarks/with_fdf_keys.py ../shared/datasets/h2o OUT --set "DM.Tolerance 1.0d-4"
    SIESTA_COMMAND=... siesta-dmguess bench OUT/h2o --model water

Writes OUT/<dataset>/<run>/input.fdf for the runs of one split (default ``val``), the keys set on its first lines
and its own lines for them removed, the dataset's ``basis`` folder beside them, and an ``index.json`` with the
runs and their split (no SCF counts: those of the dataset no longer apply).
"""
import argparse
import json
import shutil
from pathlib import Path


def with_keys(text: str, settings: dict[str, str]) -> str:
    """``text`` with each ``key value`` of ``settings`` on its first lines and the fdf's own lines for those keys
    removed (``lines_without_keys``, as ``apply_dm_init`` does for its block)."""
    from siesta_dmguess.siesta.templates import lines_without_keys

    return "\n".join([f"{key} {value}" for key, value in settings.items()] + lines_without_keys(text, settings)) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path, help="a dataset folder (index.json, run folders, basis/)")
    parser.add_argument("out", type=Path, help="folder to write OUT/<dataset>/ into")
    parser.add_argument("--set", action="append", required=True, metavar='"KEY VALUE"',
                        help="an fdf line to set, e.g. 'DM.Tolerance 1.0d-4' (repeat for more)")
    parser.add_argument("--split", default="val", help="the runs to copy: val (default), train or all")
    args = parser.parse_args(argv)
    bad = [item for item in args.set if len(item.split(None, 1)) != 2]
    if bad:
        parser.error(f"--set takes 'KEY VALUE', not {bad[0]!r}")
    settings = dict(item.split(None, 1) for item in args.set)
    if not (args.dataset / "index.json").is_file():
        parser.error(f"{args.dataset}: no index.json, so not a dataset folder")
    records = json.loads((args.dataset / "index.json").read_text())
    chosen = [r for r in records if args.split == "all" or r.get("split") == args.split]
    if not chosen:
        parser.error(f"{args.dataset}: no runs in split {args.split!r} (val, train or all)")
    target = args.out / args.dataset.name
    # Never into the dataset it reads (OUT its parent folder rewrote the dataset's own fdfs), nor over an earlier
    # copy, whose runs would mix with these
    if target.resolve() == args.dataset.resolve() or args.dataset.resolve() in target.resolve().parents:
        parser.error(f"{target} is the dataset {args.dataset} itself or inside it: give another OUT")
    if target.exists():
        parser.error(f"{target} exists already: give another OUT, or remove it")
    for rec in chosen:
        run = target / rec["id"]
        run.mkdir(parents=True, exist_ok=True)
        (run / "input.fdf").write_text(with_keys((args.dataset / rec["id"] / "input.fdf").read_text(), settings))
    shutil.copytree(args.dataset / "basis", target / "basis", dirs_exist_ok=True)
    (target / "index.json").write_text(json.dumps([{"id": r["id"], "split": r.get("split")} for r in chosen],
                                                  indent=1))
    print(f"{len(chosen)} runs of {args.dataset.name} with {settings} in {target}")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
