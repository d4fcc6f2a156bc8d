"""Command line: ``siesta-dmguess {train,predict,evaluate,models,bench}``.

Argument parsing only: every command calls one documented function of the
package. Errors derived from :class:`~siesta_dmguess.errors.DMGuessError` are
printed as one line (file and problem) with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from . import STACK
from .errors import DMGuessError, InputFileError
from .files import check_output_file


def counted(n: int, noun: str) -> str:
    """``n`` and the noun in its number: "1 structure", "3 structures"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _cmd_train(args) -> int:
    from .train import TrainOptions, train

    try:
        overrides = json.loads(args.config) if args.config else {}
    except json.JSONDecodeError as exc:
        raise DMGuessError(f"--config is not valid JSON ({exc}): {args.config}") from None
    options = TrainOptions(epochs=args.epochs, lr=args.lr, batch_atoms=args.batch_atoms, seed=args.seed,
                           threads=args.threads, progress=not args.quiet, max_train=args.max_train,
                           init=args.init, correction_epochs=args.correction_epochs, add_stage=args.add_stage,
                           correction_lr=args.correction_lr, density_loss=args.density_loss,
                           loss_power=args.loss_power)
    command = "siesta-dmguess " + " ".join(shlex.quote(a) for a in args.argv)
    result = train(args.data_dirs, args.out, options, overrides, resume=not args.restart, command=command)
    summary = result.validation.get("summary", {})
    resumed = "" if not result.resumed_at_epoch else (
        f" (its checkpoint had finished all {result.resumed_at_epoch} epochs: nothing more was trained; --epochs N "
        "trains on to N, --restart afresh)" if result.resumed_at_epoch >= options.epochs else
        f" (a stopped training continued from its checkpoint after {result.resumed_at_epoch} epochs; --restart "
        "trains afresh)")
    print(f"model written to {result.out_dir}{resumed}")
    if summary:
        print(f"validation ({counted(summary['structures'], 'structure')}): DM MAE {summary['mae']:.3e} "
              f"(atomic guess {summary['atomic_mae']:.3e}, {summary['mae_ratio_atomic_over_model']:.1f}x better), "
              f"max |error| {summary['max_abs']:.3e}")
    return 0


DESCRIPTION = "Learn, predict and benchmark SIESTA density matrices (units and conventions: docs/conventions.md)."


OPTIMIZE_FROM_STRUCTURES = 30  # integration/benchmarks/model_load.py: break-even at 18-49 structures


class ModelsByName:
    """``predict --model auto``: each structure gets its shipped model (:class:`~siesta_dmguess.predict.AutoModels`),
    each loaded once; with ``announce``, each model's one-off start-up is printed on its own line, as for a named
    model."""

    def __init__(self, optimize: bool, announce: bool):
        from .predict import AutoModels

        self.announce, self.models = announce, AutoModels(warm=announce, optimize=optimize)

    def for_structure(self, structure, write=print):
        """The model for ``structure`` (a :class:`~siesta_dmguess.structure.Structure`)."""
        from .card import STARTUP

        known = len(self.models.loaded)
        model = self.models.for_structure(structure)
        if self.announce and len(self.models.loaded) > known:
            write(f"model {model.path.name} ready in {self.models.startup_s[model.path.name]:.1f} s ({STARTUP})")
        return model


def _cmd_predict(args) -> int:
    from .card import STARTUP, load_model, ready_model
    from .parallel import mpi_world
    from .predict import AUTO_MODEL, torch_threads

    outputs = _check_outputs(args.structure, args.output)  # each structure once, with the DM file it gets
    args.structure = list(outputs)
    world = mpi_world()  # under mpirun: this process's share of the structures (siesta_dmguess.parallel)
    structures = world.share(args.structure)
    # Once for all structures; e3nn's einsum optimization pays for its load time from about 30 predictions on.
    optimize = len(structures) >= OPTIMIZE_FROM_STRUCTURES
    many = len(args.structure) > 1
    if args.model == AUTO_MODEL:  # chosen from each structure's species and loaded when first needed
        model = ModelsByName(optimize, announce=many and world.rank == 0)
    elif many:  # the one-off costs on their own line, so each structure's time is its own
        model, startup_s = ready_model(args.model, optimize=optimize)
        if world.rank == 0:
            print(f"model {model.path.name} ready in {startup_s:.1f} s ({STARTUP})")
    else:  # one structure: its time is the whole wait after torch's import
        model = load_model(args.model, optimize=optimize)
    # Ranks sharing a machine split its cores (unless --threads says otherwise); torch would give each all of them.
    with torch_threads(0 if args.threads else world.threads()):
        failed = _predict_each(structures, outputs, args, model, many=many, world=world)
    if failed and many:
        print(f"siesta-dmguess: {failed} of {counted(len(structures), 'structure')} got no DM (each is named above)",
              file=sys.stderr)
    return 2 if failed else 0  # as main() does for any other error


def _check_outputs(structures: list[str], output: str | None) -> dict[str, Path | None]:
    """Before any prediction: ``-o`` fits the structures (one file for one structure, else an existing folder),
    and no two structures of the batch would be written to one file (each would overwrite the other's DM, the first
    kept only as a backup): two with the same name into one ``-o`` folder, or two inputs of one run folder (its
    ``.XV`` and ``.STRUCT_OUT``) beside them. Returns each structure once (one given twice is predicted once, as
    ``evaluate`` counts a folder given twice once) with the DM file it is written to, so that it is worked out
    once; None where that fails, which the structure's own prediction then says."""
    from .predict import default_dm_path

    first_of: dict[Path, str] = {}
    for structure in structures:
        first_of.setdefault(Path(structure).resolve(), structure)
    structures = list(first_of.values())
    into = Path(output) if output and Path(output).is_dir() else None
    if output and not into:
        if str(output).endswith(("/", os.sep)):
            raise InputFileError("no such folder to write the DMs into", output)
        if len(structures) > 1:
            raise DMGuessError("-o names one output file; with several structures, give an existing folder, or none "
                               "to write each DM next to its input")
        return {structure: Path(output) for structure in structures}
    outputs: dict[str, Path | None] = {}
    written: dict[Path, str] = {}
    for structure in structures:
        try:
            outputs[structure] = default_dm_path(structure)
        except DMGuessError:  # this structure's own error, said when its turn comes; the others go on
            outputs[structure] = None
            continue
        if into:
            outputs[structure] = into / outputs[structure].name
        if outputs[structure].is_dir():  # a folder where the DM is to go: not one to write into (the structure's
            outputs[structure] = None    # own prediction says so; the DM went inside it, where SIESTA never looks)
            continue
        path = outputs[structure].resolve()
        if path in written:
            where = f"{path.name} in {into}" if into else str(path)
            advice = ("predict them into separate folders (-o FOLDER)" if into else
                      "the same DM file (the files of one run, or of one name): predict one of them, or the other "
                      "with -o FILE.DM")
            raise InputFileError(f"{written[path]} and {structure} would both be written to {where}: {advice}",
                                 into or structure)
        written[path] = structure
    return outputs


def _predict_each(structures: list[str], outputs: dict, args, model, many: bool, world) -> int:
    """Predict and write each structure's DM (:func:`~siesta_dmguess.predict.predict_for_run`, on this MPI rank's
    share); returns how many got none. A structure that cannot be predicted (unreadable, not covered by the model,
    refused by the guard) is named with its reason, and the others of a batch still get their DMs: one bad file
    among a screening's thousand should not cost the rest."""
    from tqdm.auto import tqdm

    from .predict import STRUCTURE_FILE_NOTE, predict_for_run

    fold = {"auto": None, "yes": True, "no": False}[args.fold]
    write = tqdm.write if many else print  # beside the progress bar of a batch
    failed, said = 0, set()
    choose = (lambda structure: model.for_structure(structure, write)) if isinstance(model, ModelsByName) else model
    # One bar, for a single process: under MPI the ranks' lines would cut it.
    for structure in tqdm(structures, desc="predict", disable=not many or world.size > 1 or args.quiet):
        try:
            done = predict_for_run(structure, outputs[structure] or args.output or None, choose, overwrite=args.overwrite, fold=fold,
                                   force=args.force, refine=args.refine, edit_fdf=args.edit_fdf)
        except DMGuessError as exc:  # the other structures of a batch still get their DMs
            # on a line of its own: the progress bar shares stderr
            (tqdm.write if many else print)(f"siesta-dmguess: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        _report_prediction(done.out, done.prediction, write=write)
        if args.charges:
            _report_charges(done.prediction, write=write)
        for note in done.notes:
            if note != STRUCTURE_FILE_NOTE or note not in said:  # the same for every structure file: said once
                write(f"note: {note}")
                said.add(note)
        if done.fdf_backup:
            write(f"{done.fdf}: put 'DM.UseSaveDM T' on its first line (original kept as {done.fdf_backup.name})")
    return failed


def _report_prediction(out: Path, pred, write=print) -> None:
    geom = pred.density_matrix.geometry
    write(f"{out}: {geom.na} atoms, {geom.no} orbitals, nsc {[int(n) for n in geom.lattice.nsc]}, "
          f"{pred.density_matrix.nnz} elements, predicted in {pred.seconds:.2f} s with {pred.model_path.name}; "
          f"novelty {pred.novelty:.2f} (flag above {pred.novelty_threshold:.2f})"
          + (" -> OUT OF DISTRIBUTION" if pred.out_of_distribution else ""))
    if pred.electron_count_error is not None:
        write(f"electrons Tr(D S): {pred.electrons_predicted:.4f} predicted, {pred.electrons_expected:.4f} expected "
              f"(error {pred.electron_count_error:+.2e}); written DM refined: {pred.refinement}"
              + (f" ({pred.refinement_note})" if pred.refinement_note else "")
              + (f"; HOMO-LUMO natural-occupation gap {pred.occupation_gap:.2f} (1 for a pure state)"
                 if pred.occupation_gap is not None and not pred.refinement_note else ""))


def _report_charges(pred, write=print) -> None:
    """One line per atom: its number (from 1), species label and Mulliken net charge of the written DM (S from the
    basis)."""
    try:
        charges = pred.mulliken_charges()
    except ValueError as exc:  # a model without radial functions has no S to weigh D with
        write(f"no Mulliken charges: {exc}")
        return
    write("Mulliken net charges (e, positive = electron-poor; S from the basis; atoms counted from 1 as SIESTA does):")
    for k, (label, q) in enumerate(zip(pred.structure.labels, charges), start=1):
        write(f"{k:>6} {label:<6} {q:+.4f}")
    write(f"{'sum':>6} {'':<6} {charges.sum():+.4f}")


def _display_names(names: list[str], width: int = 44) -> list[str]:
    """Run folders relative to the folder above their common parent (so the dataset's name stays), shortened
    from the left with an ellipsis only if still wider than the column."""
    paths = [Path(n) for n in names]
    try:
        base = Path(os.path.commonpath([p.parent for p in paths])).parent
        shown = [str(p.relative_to(base)) for p in paths]
    except ValueError:  # no common parent (mixed relative and absolute paths, or none at all)
        shown = list(names)
    return [s if len(s) <= width else "…" + s[-(width - 1):] for s in shown]


def _cmd_evaluate(args) -> int:
    from .evaluate import HELD_OUT, evaluate, plot_evaluation

    split = None if args.split == "all" else args.split
    for output, image in ((args.json, False), (args.plot, True)):  # before the evaluation, not after it
        if output:
            check_output_file(output, image=image)
    result = evaluate(args.model, args.data_dirs, split=split, out_json=args.json, progress=not args.quiet,
                      refine=args.refine)
    for folder, d in result["datasets"].items():  # which runs were scored: auto takes the val split where recorded
        left_out = d["runs_in_folder"] - d["structures"]
        which = {"all": "", HELD_OUT: f" {HELD_OUT}"}.get(d["split"], f" of split {d['split']}")
        print(f"{folder}: {d['structures']} run(s){which}"
              + (f"; {left_out} other run(s) left out (--split all takes them)" if left_out > 0 else ""))
    threshold = result["novelty_threshold"]
    print(f"{'structure':<44} {'atoms':>5} {'MAE':>10} {'max|err|':>10} {'atomic MAE':>10} {'rho err':>9} "
          f"{'raw dN':>10} {'novelty':>9}")
    for m, name in zip(result["structures"], _display_names([m["name"] for m in result["structures"]])):
        dn = f"{m['raw_electron_count_error']:+.2e}" if "raw_electron_count_error" in m else "-"
        rho = f"{m['density_operator_error']:.2e}" if "density_operator_error" in m else "-"
        flag = "*" if threshold > 0 and m.get("novelty", 0) > threshold else " "  # 0: a model with no flag level
        print(f"{name:<44} {m['natoms']:>5} {m['mae']:>10.3e} {m['max_abs']:>10.3e} "
              f"{m['atomic_mae']:>10.3e} {rho:>9} {dn:>10} {m.get('novelty', 0):>8.2f}{flag}")
    print(f"(* novelty above the model's flag level {threshold:.2f}: predict calls the structure out of distribution; "
          "rho err is the density-operator error, '-' where there is no .HSX or the run has k-points)")
    s = result["summary"]
    print(f"mean over {counted(s['structures'], 'structure')}: MAE {s['mae']:.3e}, max |error| {s['max_abs']:.3e}; "
          f"atomic guess MAE {s['atomic_mae']:.3e} ({s['mae_ratio_atomic_over_model']:.1f}x the model's)")
    if "density_operator_error_mean" in s:
        print(f"density-operator error sqrt(Tr[(ΔD S)²]): mean {s['density_operator_error_mean']:.3e}; atomic guess "
              f"{s['atomic_density_operator_error_mean']:.3e} ({s['density_operator_ratio_atomic_over_model']:.1f}x "
              f"the model's)")
    if "band_energy_abs_error_mean_eV" in s:
        print(f"band-structure energy error |Tr[(D - D_ref) H]| with SIESTA's H (.HSX): mean "
              f"{s['band_energy_abs_error_mean_eV']:.2e} eV, max {s['band_energy_abs_error_max_eV']:.2e} eV; atomic "
              f"guess mean {s['atomic_band_energy_abs_error_mean_eV']:.2e} eV")
    if "raw_electron_count_abs_error_mean" in s:
        print(f"raw prediction's electron count |Tr(D S) - N| (before refinement): mean "
              f"{s['raw_electron_count_abs_error_mean']:.2e}, max {s['raw_electron_count_abs_error_max']:.2e}")
    if "refinements" in s:
        print("DMs refined as predict writes them: " + ", ".join(f"{n} {kind}" for kind, n in s["refinements"].items()))
    if "electron_count_abs_error_mean" in s:
        print(f"written DM's electron count with SIESTA's S (.HSX) |Tr(D S) - N|: mean "
              f"{s['electron_count_abs_error_mean']:.2e}, max {s['electron_count_abs_error_max']:.2e}")
    if args.plot:  # after the table: it is the result, whatever becomes of the picture
        plot_evaluation(result, args.plot)
    return 0


def validation_mae_summary(card: dict) -> str:
    """Validation MAE of a card, per dataset where the card has them (a mean over molecules and periodic boxes
    would hide that their errors differ 20x)."""
    per = {k: v["mae"] for k, v in card.get("validation_per_dataset", {}).items() if isinstance(v, dict) and "mae" in v}
    if per:
        return ", ".join(f"{k} {v:.2e}" for k, v in per.items())
    val = card.get("validation", {})
    return f"{val['mae']:.2e}" if "mae" in val else "-"


def _cmd_models(args) -> int:
    from .card import CARD, card_markdown, list_shipped_models, read_card, resolve_model

    action, model_name = args.action, args.name
    if action not in ("list", "show"):  # `models water` reads as `models show water`
        if model_name:
            raise DMGuessError(f"models takes 'list' or 'show NAME', not {action!r} {model_name!r}")
        action, model_name = "show", action
    if action == "list" and model_name:
        raise DMGuessError(f"models list takes no name; to print the card of {model_name}: models show {model_name}")
    if action == "show":
        if not model_name:
            raise DMGuessError(f"models show needs a model name (shipped: {', '.join(list_shipped_models())})")
        card = read_card(model_name)  # a card.json that is not JSON is named, as predict names it
        if not card:
            raise InputFileError(f"the model folder has no {CARD}", resolve_model(model_name))
        print(card_markdown(card))  # what train writes as card.md, made from the card itself (card.md may be gone)
        return 0
    names = list_shipped_models()
    if not names:
        print("no shipped models found")
    for name in names:
        card = read_card(name)
        print(f"{name}: {', '.join(card.get('species', []))}; {model_settings_summary(card)}")
        print(f"  validation DM MAE: {validation_mae_summary(card)}")
        print(f"  SCF iterations, atomic -> ML guess: {scf_saving_summary(card)}")
        for entry in card.get("basis", {}).values():
            print(f"  basis {entry['shells']} [{entry['hash']}]")
    if names:
        print("--model auto (the default) takes the model with the fewest species that covers a structure's, "
              "unless the structure is far more novel to it than to another covering model, or its prediction "
              "from it would be refused where another's would not")
    return 0


def model_settings_summary(card: dict) -> str:
    """The settings a run must share with the model (those the guard compares: XC, basis size, energy shift, any
    other basis option; SIESTA's default where the card records none), and the mesh it was trained at, which the
    guard leaves free."""
    from .guard import SIESTA_DEFAULTS

    xc = card.get("xc", {})
    recorded = card.get("siesta_settings", {})
    shared = [f"XC {xc.get('XC.functional', '?')} ({xc.get('XC.authors', '?')})"]
    for key in ("PAO.BasisSize", "PAO.EnergyShift"):
        shared.append(f"{key} {recorded[key]}" if key in recorded else f"{key} {SIESTA_DEFAULTS[key]} (default)")
    shared += [f"{key} {value}" for key, value in card.get("basis_options", {}).items()]
    meshes = recorded.get("MeshCutoff", [])  # one value, or a list where the training runs differed
    meshes = ", ".join(meshes) if isinstance(meshes, list) else meshes
    mesh = f"; trained at MeshCutoff {meshes} (not checked)" if meshes else ""
    return f"runs must use {', '.join(shared)}{mesh}"


def scf_saving_summary(card: dict) -> str:
    """The card's measured SCF benchmark: one held-out set (``scf_benchmark`` holds its counts) or several (one
    entry per dataset)."""
    bench = card.get("scf_benchmark", {})
    if "scf_iterations_atomic" in bench:  # the held-out set is the one its command benchmarked
        words = str(bench.get("command", "")).split()
        sets = {Path(words[2]).name if len(words) > 2 else "val": bench}
    else:
        sets = {k: v for k, v in bench.items() if isinstance(v, dict) and "scf_iterations_atomic" in v}
    if not sets:
        return "not measured"
    return ", ".join(f"{k} {v['scf_iterations_atomic']} -> {v['scf_iterations_ml']} "
                     f"({v['iterations_saved_fraction']:.0%} saved)" for k, v in sets.items())


def at_least(minimum: int):
    """An argparse type: an integer no smaller than ``minimum`` (a negative --limit would slice from the end)."""
    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value
    return count


def positive_number(text: str) -> float:
    """An argparse type: a number above zero (a learning rate or a loss power; torch's own error for a negative
    one is a bare ValueError)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):  # NaN fails the first test
        raise argparse.ArgumentTypeError(f"must be a number above 0, not {text}")
    return value


def add_refine_argument(parser) -> None:
    from .refine import REFINEMENTS

    parser.add_argument("--refine", choices=REFINEMENTS, default=REFINEMENTS[0],
                        help="analytic refinement of the predicted DM (docs/guesses.md): nearest idempotent DM "
                             "with the right electron count, charge scaling only, or none")


def add_model_argument(parser) -> None:
    parser.add_argument("--model", default="auto",
                        help="shipped model name (`siesta-dmguess models` lists them) or model folder; default auto: "
                             "the shipped model with the fewest species that covers the structure's (water for "
                             "water, chno-molecules for other CHNO molecules such as H2O2, silicon for Si)")


def add_threads_argument(parser) -> None:
    parser.add_argument("--threads", type=at_least(0), default=0,
                        help="torch threads for the predictions (default: torch's, one per core); use 1 where other "
                             "programs, e.g. SIESTA runs, keep cores busy: predictions then run 3-5x faster")


def version_text() -> str:
    """This package's version and those of the stack it runs on, on one line, for bug reports."""
    from . import software_versions

    versions = software_versions()
    stack = ", ".join(f"{name} {versions[name]}" for name in STACK)
    return f"siesta-dmguess {versions['siesta_dmguess']} (Python {versions['python']}; {stack})"


class PrintVersion(argparse.Action):
    """`--version`, printed on one line (argparse's own version action wraps it at the terminal's width)."""

    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="siesta-dmguess", description=DESCRIPTION)
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    p.add_argument("--version", action=PrintVersion,
                   help=f"print the version of siesta-dmguess and of {', '.join(STACK)}, and exit")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model on folders of converged SIESTA runs")
    t.add_argument("data_dirs", nargs="+", help="dataset folders (run folders with fdf + .DM)")
    t.add_argument("--out", required=True, help="model folder to write (resumes from its checkpoint)")
    t.add_argument("--epochs", type=at_least(0), default=300, help="passes over the training structures (default 300)")
    t.add_argument("--lr", type=positive_number, default=5e-3,
                   help="initial Adam learning rate, decayed each epoch (default 5e-3)")
    t.add_argument("--batch-atoms", type=at_least(1), default=24, help="atoms per optimizer step (default 24)")
    t.add_argument("--seed", type=int, default=0,
                   help="seed of the weights, the batch order and a random validation split (default 0)")
    t.add_argument("--threads", type=at_least(0), default=0, help="torch threads (default: torch's, one per core)")
    t.add_argument("--max-train", type=at_least(0), default=0, help="use at most N training structures")
    t.add_argument("--config", help='JSON of model settings, e.g. \'{"mp_cutoff": 4.0, "num_layers": 2}\'')
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    t.add_argument("--init", default="", help="start from this model's weights (model folder or shipped name)")
    t.add_argument("--correction-epochs", type=at_least(0), default=0,
                   help="then train a ΔH head through the idempotent projection for N epochs (Γ-only data)")
    t.add_argument("--correction-lr", type=positive_number, default=1e-3,
                   help="learning rate of the ΔH head (lower it when the projection is already close: near-exact "
                        "molecules make its relative loss steep)")
    t.add_argument("--add-stage", action="store_true",
                   help="with --init: add a residual stage that learns what the init model leaves over (init frozen); "
                        "--config then sets the stage's own form, e.g. '{\"mp_cutoff\": 4.6}', or "
                        "'{\"pair_set\": \"onsite\"}' for the on-site blocks alone")
    t.add_argument("--density-loss", action="store_true",
                   help="fit folded (Γ-only, molecular) DMs by the density-operator error Tr[(ΔD S)²] (S from the "
                        "basis) instead of the element error; with --add-stage, each structure's relative to the "
                        "frozen model's")
    t.add_argument("--loss-power", type=positive_number, default=2.0,
                   help="fit by mean |element error|^P (default 2: squared); P > 2 weighs the largest errors, "
                        "which set SIESTA's first SCF step, and keeps the epoch whose validation structures have the lowest mean "
                        "max error")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train)

    r = sub.add_parser("predict", help="predict the DM of a structure and write a SIESTA .DM")
    r.add_argument("structure", nargs="+", help="one or more fdf files, SIESTA run folders (their fdf) or files ASE reads (the model is loaded once)")
    add_model_argument(r)
    r.add_argument("-o", "--output", help="the .DM to write, or an existing folder to write each DM into under its "
                                          "default name (default: <SystemLabel>.DM next to an fdf, where SIESTA "
                                          "reads it with DM.UseSaveDM T; else STRUCTURE with suffix .DM)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing .DM without a backup")
    r.add_argument("--edit-fdf", action="store_true",
                   help="for an fdf that would not make SIESTA read the DM: put 'DM.UseSaveDM T' on its first line "
                        "(the original kept as .bak)")
    r.add_argument("--fold", choices=["auto", "yes", "no"], default="auto",
                   help="fold periodic images into the unit cell (auto: for Γ-only runs)")
    r.add_argument("--force", action="store_true",
                   help="use the model despite a basis/settings mismatch, and write a prediction the guard refuses "
                        "(a structure far outside its training data, a k-sampling it never trained on, a DM with no "
                        "clear occupied space)")
    r.add_argument("--charges", action="store_true",
                   help="also print each atom's Mulliken net charge (e, positive = electron-poor) in the written DM")
    r.add_argument("--quiet", action="store_true", help="no progress bar over several structures")
    add_refine_argument(r)
    add_threads_argument(r)
    r.set_defaults(func=_cmd_predict)

    e = sub.add_parser("evaluate", help="DM errors of a model on held-out SIESTA runs")
    e.add_argument("model", help="shipped model name or model folder")
    e.add_argument("data_dirs", nargs="+", help="dataset folders of converged runs (fdf + .DM; .HSX for the "
                                                 "density-operator and band-energy errors)")
    e.add_argument("--split", default="auto", help="split to evaluate: val, train, all, or auto (default): val "
                   "where the folder's index.json (or the runs' run.json) records a val split, else the runs the model's "
                   "training held out where its card lists them, else all runs")
    e.add_argument("--json", help="write all metrics to this JSON file")
    e.add_argument("--plot", help="write a PNG: MAE per structure vs the atomic guess, and MAE vs novelty score")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    add_refine_argument(e)
    add_threads_argument(e)
    e.set_defaults(func=_cmd_evaluate)

    m = sub.add_parser("models", help="list shipped models, or show one's card")
    m.add_argument("action", nargs="?", default="list", help="list (default) or show; a model name alone shows it")
    m.add_argument("name", nargs="?", help="with show: the model whose card to print")
    m.set_defaults(func=_cmd_models)

    from .bench import add_bench_parser

    add_bench_parser(sub)
    for command in {id(parser): parser for parser in sub.choices.values()}.values():  # also after the command
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return p


VERBOSE_HELP = "log this package's detailed messages too (not those of sisl, torch and the like)"


def _refuse_duplicate_processes(command: str) -> None:
    """Only ``predict`` shares its work over MPI processes (:mod:`siesta_dmguess.parallel`). Under ``mpirun``,
    every process of ``train``, ``evaluate`` or ``bench`` would do the whole job and write the same files."""
    from .parallel import launcher_size

    size = launcher_size()
    if size > 1 and command in ("train", "evaluate", "bench"):
        hint = (" To run SIESTA itself in parallel, start one bench and set SIESTA_COMMAND (e.g. 'mpirun -np 4 "
                "siesta')." if command == "bench" else "")
        raise DMGuessError(f"an MPI launcher started {size} processes, but '{command}' does not share its work "
                           f"over them: each would do all of it and write the same files; run one process.{hint}")


# What an interrupted command keeps, and how to go on from it.
INTERRUPTED_HINTS = {
    "train": "; the checkpoint of the last finished epoch is kept in the --out folder: run the same command again to "
             "resume from it",
    "bench": "; the structures (or trajectory frames) already run are kept in the --out folder: run the same command "
             "again to reuse them and go on",
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command as given, which train records in the model card
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    package_log = logging.getLogger(__package__)
    level = package_log.level
    if args.verbose:  # ours only: sisl's DEBUG lines buried them (630 lines for one molecule)
        package_log.setLevel(logging.DEBUG)
    try:
        _refuse_duplicate_processes(args.command)
        from .predict import torch_threads

        with torch_threads(getattr(args, "threads", 0)):  # predict, evaluate, bench and train take --threads
            return args.func(args)
    except DMGuessError as exc:
        print(f"siesta-dmguess: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a line saying what is kept, not a traceback through torch or SIESTA
        hint = INTERRUPTED_HINTS.get(args.command, "")
        if args.command == "train" and not (Path(args.out) / "checkpoint.pt").is_file():
            hint = " before the first epoch finished: nothing was kept"
        elif args.command in ("train", "bench") and getattr(args, "restart", False):  # which would start afresh
            hint = hint.replace("run the same command again", "run the same command without --restart")
        print(f"siesta-dmguess: interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as other command-line tools do
        # Python flushes stdout again at exit; point it at /dev/null so that flush cannot fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        package_log.setLevel(level)  # -v for this command only: a script calling main() keeps its own level


if __name__ == "__main__":
    sys.exit(main())
