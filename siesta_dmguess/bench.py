"""The SCF-speedup benchmark: SIESTA from its atomic guess vs from the ML guess, same settings otherwise.

For each structure two run folders are prepared from the structure's own fdf,
differing only by the DM-initialisation block (``integration/templates``), and
the user's SIESTA runs both. Reported per structure and in total: SCF
iterations, wall time (prediction + SIESTA), iterations saved, and the
difference of the converged total energies (a guess must never change the answer).
Results go to ``bench_<name>.json``, ``.md`` and ``.png``. Each finished structure, or frame of a trajectory,
keeps its result beside its runs (``<out>/<name>/<run or frame>/result.json``) with what it was measured with
(:func:`measurement_identity`), so that a benchmark that is stopped (a killed job, a session's time limit)
continues where it stopped when started again (:func:`read_kept`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shlex
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import DMGuessError, InputFileError, ModelCompatibilityError
from .files import atomic_write, make_output_folder
from .history import DEFAULT_DEPTH, GUESSES

log = logging.getLogger(__name__)


@dataclass
class GuessResult:
    guess: str
    scf_iterations: int
    converged: bool
    dm_read: bool
    total_energy_eV: float | None
    siesta_wall_s: float
    prediction_s: float = 0.0
    dDmax: list = field(default_factory=list)
    start_electron_error: float | None = None  # Tr[D S] - N of the starting DM, as SIESTA printed it
    dm_tolerance: float | None = None  # the run's DM.Tolerance, as SIESTA printed it (the plot's stopping line)
    # With bench's ``repeat`` > 1: every run's SIESTA wall time, SCF iterations and prediction time. The fields
    # above are then those of the run with the median wall time, and prediction_s is the median prediction.
    wall_samples: list = field(default_factory=list)
    iteration_samples: list = field(default_factory=list)
    prediction_samples: list = field(default_factory=list)


@dataclass
class StructureResult:
    name: str
    natoms: int
    results: dict  # guess -> GuessResult
    novelty: float | None = None  # the prediction's out-of-distribution score (see Prediction.novelty)
    flagged: bool = False  # novelty above the model's threshold
    fallback: str = ""  # why the "ml" run started from the atomic guess instead (as predict and the calculator do)
    fallback_kind: str = ""  # the same in one word (Prediction.refusal_kind)
    model: str = ""  # the model's name (with ``--model auto`` a folder's runs may each have their own)

    def saved(self, guess: str = "ml", base: str = "atomic") -> int:
        return self.results[base].scf_iterations - self.results[guess].scf_iterations


def bench_structure(fdf: Path, workdir: Path, model, guesses=("atomic", "ml"), command=None,
                    refine: str = "idempotent", force: bool = False, repeat: int = 1,
                    kept: dict | None = None) -> StructureResult:
    """Run SIESTA on one fdf with each guess; the ML guess is predicted from the fdf (refined with ``refine``).

    ``repeat`` > 1 runs every guess (prediction included) that many times, alternating the guesses so that a
    slow spell of the machine hits both, and keeps the run with the median wall time (:func:`median_run`): one
    run's wall time varies by up to 30 % on a busy or throttled machine, more than the ML guess saves on a
    small structure.

    A structure far outside the model's training data gets no predicted DM (``predict_to_file`` refuses it), so
    its "ml" run starts from the atomic guess, as the ``predict`` command and the ASE calculator would; the
    reason is kept in ``StructureResult.fallback`` (in one word: ``fallback_kind``). ``force`` uses every
    prediction, to measure what the refused ones would do.

    ``kept`` (guess -> :class:`GuessResult`) holds guesses measured before, which are not run again (the atomic
    guess of a benchmark rerun with another model or refinement: :func:`run_benchmark`).
    """
    from .errors import UnreliablePredictionError
    from .predict import predict_to_file
    from .siesta import prepare_run, run_siesta

    kept = kept or {}
    samples = {guess: [] for guess in guesses if guess not in kept}
    tolerance = _dm_tolerance(fdf)  # once: the same fdf for every run of the structure
    natoms, novelty, flagged, fallback, fallback_kind = 0, None, False, "", ""
    for guess in [g for _ in range(max(repeat, 1)) for g in samples]:
        run_dir = workdir / guess
        prediction_s, dm_file, template = 0.0, None, guess
        if guess == "ml":
            t0 = time.perf_counter()
            try:
                pred = predict_to_file(fdf, run_dir.parent / "predicted.DM", model=model, overwrite=True,
                                       refine=refine, force=force)
                dm_file = run_dir.parent / "predicted.DM"
            except UnreliablePredictionError as exc:
                pred, fallback, template = exc.prediction, str(exc), "atomic"
                fallback_kind = pred.refusal_kind
            prediction_s = time.perf_counter() - t0
            natoms = len(pred.structure.atoms)
            novelty, flagged = pred.novelty, pred.out_of_distribution
        new_fdf = prepare_run(fdf, run_dir, template, dm_file=dm_file, pseudo_dirs=[fdf.parent.parent / "basis"])
        run = run_siesta(new_fdf, command=command)
        out = run.output
        samples[guess].append(GuessResult(guess, out.scf_iterations, out.converged, out.dm_read_from_file,
                                          out.total_energy_eV, run.wall_s, prediction_s,
                                          [s.dDmax for s in out.scf_history],
                                          None if out.start_dm_electrons is None
                                          else out.start_dm_electrons - out.electrons,
                                          tolerance or out.dm_tolerance))
    results = {guess: kept[guess] if guess in kept else median_run(samples[guess]) for guess in guesses}
    return StructureResult(fdf.parent.name, natoms, results, novelty, flagged, fallback, fallback_kind,
                           Path(model.path).name if hasattr(model, "path") else str(model))


def _dm_tolerance(fdf: Path) -> float | None:
    """The fdf's DM.Tolerance (SIESTA echoes it with 6 decimals only), or None where it leaves SIESTA's default."""
    from .fdf import fdf_sile

    try:
        value = fdf_sile(fdf).get("DM.Tolerance")
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def median_run(runs: list[GuessResult]) -> GuessResult:
    """One guess's repeated runs as one result: the run with the median SIESTA wall time (the lower middle one
    for an even count, so that every field is a real run's), the median prediction time, and every run's wall
    time, SCF iterations and prediction time in the ``*_samples`` fields. A single run is returned as it is."""
    if len(runs) == 1:
        return runs[0]
    walls = [r.siesta_wall_s for r in runs]
    middle = runs[walls.index(statistics.median_low(walls))]
    iterations = [r.scf_iterations for r in runs]
    if len(set(iterations)) > 1:  # serial SIESTA is deterministic; threaded BLAS may not be
        log.warning("%s guess: SCF iterations differ between repeated runs: %s; the median-time run's %d is "
                    "reported", middle.guess, iterations, middle.scf_iterations)
    predictions = [r.prediction_s for r in runs]
    return replace(middle, prediction_s=statistics.median(predictions), wall_samples=walls,
                   iteration_samples=iterations, prediction_samples=predictions)


def models_of_runs(model, fdfs: dict[str, Path], force: bool = False) -> tuple[dict, dict[str, str], float]:
    """Each run's model, loaded and warmed up once: ``model`` for every run, or for ``"auto"`` the shipped model
    :func:`~siesta_dmguess.predict.choose_model` picks for the run (by its species and novelty), as ``predict``
    does for each structure of a batch (a folder may hold water, CHNO molecules and silicon).

    Returns run id → :class:`~siesta_dmguess.card.LoadedModel`, the runs left out (run id → why: no shipped model
    covers its species, or its model does not cover it, :func:`~siesta_dmguess.guard.check_compatibility`,
    which ``force`` skips) and the seconds the models' start-up took. Reading an fdf and its basis files takes
    milliseconds, so a benchmark checks every run before SIESTA runs any."""
    from .card import ready_model
    from .guard import check_compatibility
    from .predict import AUTO_MODEL, AutoModels
    from .structure import read_structure

    structures = {run_id: read_structure(fdf) for run_id, fdf in fdfs.items()}
    skipped, models = {}, {}
    if isinstance(model, str) and model == AUTO_MODEL:
        chosen = AutoModels()
        for run_id, structure in structures.items():
            try:
                models[run_id] = chosen.for_structure(structure)
            except ModelCompatibilityError as exc:
                skipped[run_id] = exc.message  # the run id names it; reports need no machine's paths
        startup_s = sum(chosen.startup_s.values())
    else:
        one, startup_s = ready_model(model)
        models = dict.fromkeys(structures, one)
    if not force:
        for run_id, loaded_model in models.items():
            try:
                check_compatibility(structures[run_id], loaded_model)
            except ModelCompatibilityError as exc:
                skipped[run_id] = exc.message
    return {run_id: m for run_id, m in models.items() if run_id not in skipped}, skipped, startup_s


def model_names(models) -> str:
    """The names of the models a benchmark used, joined by "+" (one word, as report titles need)."""
    return "+".join(sorted({Path(m.path).name for m in models}))


RESULT_FILE = "result.json"


def measurement_identity(fdf_text: str, pseudo_dirs, loaded, siesta: list[str], **settings) -> dict:
    """What a benchmark result depends on: the fdf text (with the files it includes) and the pseudopotentials in
    ``pseudo_dirs`` (which the runs copy; by sha256), the model (name, weights' and config's sha256 and novelty
    threshold; None for no model), the SIESTA command (as :func:`~siesta_dmguess.siesta.find_siesta` resolves it)
    and the benchmark's ``settings``. A kept result is reused only where every one of them is the same
    (:func:`read_kept`)."""
    from .card import sha256_file
    from .siesta.runner import PSEUDO_SUFFIXES

    pseudos = {p.name: sha256_file(p) for folder in map(Path, pseudo_dirs) for suffix in PSEUDO_SUFFIXES
               for p in sorted(folder.glob(f"*{suffix}"))}
    model = {} if loaded is None else {  # the network its config builds and the flag level of its refusals too
        "config_sha256": hashlib.sha256(json.dumps(loaded.config.to_dict(), sort_keys=True).encode()).hexdigest(),
        "novelty_threshold": float(loaded.model.novelty_threshold)}
    return {"fdf_sha256": hashlib.sha256(fdf_text.encode()).hexdigest(), "pseudopotentials": pseudos,
            "model": Path(loaded.path).name if loaded is not None else None,
            "weights_sha256": loaded.card.get("weights_sha256") if loaded is not None else None, **model,
            "siesta": siesta, **settings}


def _with_included(fdf_text: str, fdf: Path) -> str:
    """``fdf_text`` (the fdf's own text, or "" for only its includes) followed by the files ``fdf`` includes."""
    from .fdf import fdf_input_files

    return fdf_text + "".join(f"\n{p.name}\n{p.read_text(errors='replace')}" for p in fdf_input_files(fdf)[1:])


def run_identity(fdf: Path, loaded, refine: str, force: bool, repeat: int, siesta: list[str]) -> dict:
    """:func:`measurement_identity` of one structure of a dataset benchmark: its fdf and the files it includes, the
    pseudopotentials beside it and in the dataset's ``basis`` folder, the model, SIESTA, the refinement, ``force``
    and ``repeat``."""
    return measurement_identity(_with_included(fdf.read_text(), fdf), (fdf.parent, fdf.parent.parent / "basis"),
                                loaded, siesta, refine=refine, force=force, repeat=repeat)


def atomic_run_identity(fdf: Path, repeat: int, siesta: list[str]) -> dict:
    """:func:`run_identity` of a structure's atomic-guess run alone: no model, refinement or ``force`` (a benchmark
    rerun with another model or ``--refine`` reuses it)."""
    return run_identity(fdf, None, None, None, repeat, siesta) | {"guess": "atomic"}


def save_kept(workdir: Path, identity: dict, result: dict) -> None:
    """Keep a finished result beside its runs (written atomically: a killed job leaves none, not half of one)."""
    text = json.dumps({"identity": identity, "result": result}, indent=1)
    atomic_write(workdir / RESULT_FILE, lambda tmp: tmp.write_text(text))


def read_kept(workdir: Path, identity: dict, rebuild):
    """``rebuild`` of the result an earlier run kept in ``workdir`` (:func:`save_kept`), or None where there is
    none, where it was measured otherwise (another fdf, pseudopotential, model, SIESTA or setting:
    :func:`measurement_identity`), or where it or what ``rebuild`` reads with it (a frame's converged ``.DM``)
    cannot be read back (a warning names the file)."""
    path = workdir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        kept = json.loads(path.read_text())
        if kept["identity"] != identity:
            changed = sorted(k for k in identity if kept["identity"].get(k) != identity[k])
            log.info("%s: measured with another %s: running it again", path, ", ".join(changed))
            return None
        return rebuild(kept["result"])
    except (DMGuessError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("%s cannot be read back (%s: %s): running it again", path, type(exc).__name__, exc)
        return None


def forget_kept(workdir: Path) -> None:
    """Remove a result kept in ``workdir`` before its runs are done again: a rerun stopped midway would leave it
    beside runs it no longer describes, and a later resume would take it (a trajectory's history guesses then start
    from the stopped run's DMs)."""
    (workdir / RESULT_FILE).unlink(missing_ok=True)


def save_result(workdir: Path, identity: dict, result: StructureResult) -> None:
    """Keep a finished structure's result beside its runs (:func:`save_kept`)."""
    save_kept(workdir, identity, asdict(result))


def _structure_result(data: dict) -> StructureResult:
    results = {guess: GuessResult(**r) for guess, r in data.pop("results").items()}
    return StructureResult(results=results, **data)


def finished_result(workdir: Path, identity: dict) -> StructureResult | None:
    """The structure's result an earlier run of the same benchmark kept in ``workdir`` (:func:`save_result`), or
    None where there is none, it was measured otherwise (:func:`run_identity`) or it cannot be read back."""
    return read_kept(workdir, identity, _structure_result)


def run_benchmark(data_dir, model="auto", out_dir="bench", split: str | None = "auto", limit: int = 0,
                  command=None, progress: bool = True, refine: str = "idempotent", force: bool = False,
                  repeat: int = 1, skip_incompatible: bool = False, name: str | None = None,
                  resume: bool = True) -> dict:
    """Benchmark the ML guess against the atomic guess on a dataset folder's structures (default ``"auto"``: the
    val split, or every run where index.json records none; see :func:`~siesta_dmguess.data.resolve_split`).
    ``repeat`` runs each guess that many times and reports the median-time run (:func:`bench_structure`).

    With ``model="auto"`` each run gets the shipped model chosen for its species (:func:`models_of_runs`). Every
    run is checked against its model before SIESTA runs any: one the model does not cover is an error naming
    each such run, or, with ``skip_incompatible``, left out and listed in the report's ``skipped``. ``force``
    uses the model anyway, as ``predict --force`` does. ``name`` (default: the folder's name) titles the report
    and names its files, ``bench_<name>.json/.md/.png``.

    With ``resume`` (the default) a structure whose result an earlier run of this benchmark kept in ``out_dir``
    is not run again where nothing it depends on changed (:func:`finished_result`); the report lists those
    structures under ``reused``. A structure rerun because only the model, refinement or ``force`` changed keeps
    its atomic-guess run (listed under ``atomic_reused``; not with ``repeat`` > 1, whose runs alternate the
    guesses). ``resume=False`` runs every structure again."""
    from .siesta import find_siesta

    siesta = find_siesta(command)  # a missing SIESTA is said at once, not after importing torch and loading the model
    from tqdm.auto import tqdm

    from .data import empty_split_error, find_fdf, resolve_split, select_runs

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if data_dir.is_file():
        raise InputFileError("a file, where a dataset folder (of SIESTA run folders) is expected; to benchmark a "
                             "trajectory file, give the fdf its frames are run with: --fdf FDF", data_dir)
    name = benchmark_name(name, data_dir.name)
    make_output_folder(out_dir)
    split = resolve_split(data_dir, split)
    records = select_runs([data_dir], split)
    if not records:
        raise empty_split_error(data_dir, split)
    if limit:
        records = records[:limit]
    fdfs = {rec.id: find_fdf(rec.folder) for rec in records}
    models, skipped, startup_s = models_of_runs(model, fdfs, force)
    if skipped and not skip_incompatible:
        listed = "\n  ".join(f"{fdfs[run_id]}: {reason}" for run_id, reason in skipped.items())
        raise ModelCompatibilityError(f"{len(skipped)} of {len(fdfs)} runs do not fit "
                                      f"{_model_words(model, models)} (nothing was run; --skip-incompatible "
                                      f"benchmarks the others):\n  {listed}", data_dir)
    for run_id, reason in skipped.items():
        log.warning("skipping %s: %s", run_id, reason)
    if not models:
        raise ModelCompatibilityError(f"none of the {len(fdfs)} runs fits {_model_words(model, models)}", data_dir)
    identities = {run_id: run_identity(fdfs[run_id], loaded, refine, force, repeat, siesta)
                  for run_id, loaded in models.items()}
    kept = {run_id: finished_result(out_dir / name / run_id, identities[run_id]) if resume else None
            for run_id in models}
    reused = [run_id for run_id, result in kept.items() if result is not None]
    if reused:
        log.warning("bench %s: %d of %d structures were finished by an earlier run in %s with the same fdf, model, "
                    "settings and SIESTA; their results are reused (--restart runs them again)", name, len(reused),
                    len(models), out_dir)
    rows, atomic_reused = [], []
    for run_id, loaded in tqdm(models.items(), desc=f"bench {name}", disable=not progress):
        if kept[run_id] is None:
            workdir = out_dir / name / run_id
            forget_kept(workdir)
            # the atomic guess does not depend on the model or refinement: kept apart, reused where they changed
            atomic_identity = atomic_run_identity(fdfs[run_id], repeat, siesta)
            # (not with --repeat: its runs alternate the guesses, so that a slow spell of the machine hits both)
            atomic = read_kept(workdir / "atomic", atomic_identity, lambda r: GuessResult(**r)) \
                if resume and repeat <= 1 else None
            if atomic is None:
                forget_kept(workdir / "atomic")
            else:
                atomic_reused.append(run_id)
            kept[run_id] = bench_structure(fdfs[run_id], workdir, loaded, command=command, refine=refine,
                                           force=force, repeat=repeat, kept={"atomic": atomic} if atomic else None)
            if atomic is None:
                save_kept(workdir / "atomic", atomic_identity, asdict(kept[run_id].results["atomic"]))
            save_result(workdir, identities[run_id], kept[run_id])
        rows.append(kept[run_id])
    used = model_names(models.values())
    report = summarize(rows, used, str(data_dir), startup_s) | {
        "name": name, "refine": refine, "split": split or "all", "forced": force, "repeat": repeat, "skipped": skipped,
        "reused": reused, "atomic_reused": atomic_reused, "siesta": shlex.join(siesta)}
    if atomic_reused:
        log.warning("bench %s: the atomic-guess runs of %d structures were kept from an earlier run in %s with the "
                    "same fdf, SIESTA and --repeat (only their ML runs were redone)", name, len(atomic_reused), out_dir)
    (out_dir / f"bench_{name}.json").write_text(json.dumps(report, indent=1))
    (out_dir / f"bench_{name}.md").write_text(markdown(report))
    plot(rows, out_dir / f"bench_{name}.png", title=f"{name}: {used}")
    return report


def _model_words(model, models: dict) -> str:
    """How an error names the model(s) runs were checked against."""
    from .predict import AUTO_MODEL

    if isinstance(model, str) and model == AUTO_MODEL:
        return f"the shipped models ({model_names(models.values())})" if models else "any shipped model"
    return f"model {Path(getattr(model, 'path', model)).name!r}"


def summarize(rows: list[StructureResult], model: str, data: str, startup_s: float = 0.0) -> dict:
    it_a = sum(r.results["atomic"].scf_iterations for r in rows)
    it_m = sum(r.results["ml"].scf_iterations for r in rows)
    wall_a = sum(r.results["atomic"].siesta_wall_s for r in rows)
    wall_m = sum(r.results["ml"].siesta_wall_s + r.results["ml"].prediction_s for r in rows)
    de = [abs(r.results["ml"].total_energy_eV - r.results["atomic"].total_energy_eV) for r in rows]
    return {
        "model": model, "data": data, "structures": len(rows),
        "scf_iterations_atomic": it_a, "scf_iterations_ml": it_m,
        "iterations_saved_fraction": 1 - it_m / it_a if it_a else 0.0,
        "ml_never_worse": all(r.saved() >= 0 for r in rows),
        "all_dm_read": all(r.results["ml"].dm_read for r in rows if not r.fallback),
        "structures_fallback_atomic": sum(bool(r.fallback) for r in rows),
        "all_converged": all(g.converged for r in rows for g in r.results.values()),
        "wall_s_atomic": wall_a, "wall_s_ml_including_prediction": wall_m,
        "startup_s": startup_s,  # once per process: loading the model, importing sisl, the overlap tables
        "wall_spread_max": wall_spread(rows),
        "max_abs_energy_difference_eV": max(de) if de else 0.0,
        "structures_flagged_novel": sum(r.flagged for r in rows),
        "per_structure": [{"name": r.name, "model": r.model, "natoms": r.natoms, "novelty": r.novelty,
                           "flagged": r.flagged,
                           "fallback": r.fallback, "fallback_kind": r.fallback_kind,
                           **{g: asdict(v) for g, v in r.results.items()}}
                          for r in rows],
    }


def wall_spread(rows: list[StructureResult]) -> float | None:
    """The largest difference between one structure's repeated SIESTA runs with one guess, relative to the
    fastest of them (``bench --repeat``), or None for single runs: how far one run's wall time is to be trusted."""
    spreads = [(max(r.wall_samples) - min(r.wall_samples)) / min(r.wall_samples)
               for row in rows for r in row.results.values() if len(r.wall_samples) > 1 and min(r.wall_samples) > 0]
    return max(spreads) if spreads else None


def benchmark_name(name: str | None, default: str) -> str:
    """A benchmark's name, which titles its report and names its files (``bench_<name>.*``): one word, so that
    reports of the same set rerun from elsewhere (a copied folder, a renamed trajectory) keep their name."""
    name = default if name is None else name
    if not re.fullmatch(r"[\w.+-]+", name):
        raise DMGuessError(f"benchmark name {name!r}: use letters, digits and . _ + - only (it names files)")
    return name


def report_name(report: dict) -> str:
    """The name a report was written under (reports written before ``name`` existed: their data's file name,
    a trajectory's with its suffix)."""
    return report.get("name") or Path(report["data"]).name


def siesta_line(report: dict) -> list[str]:
    """The report's line naming the SIESTA that ran (reports written before it was recorded have none)."""
    return ["", f"SIESTA: `{report['siesta']}`."] if report.get("siesta") else []


def markdown(report: dict) -> str:
    from .card import STARTUP  # here, not at the top: card imports torch, which `--help` need not wait for
    lines = [f"# SCF benchmark: {report_name(report)} with {Path(report['model']).name}", ""]
    notes = ([f"Split `{report['split']}`: structures the model may have trained on."]
             if report.get("split") == "train" else []) + \
            ([f"Refinement `{report['refine']}` (the default is `idempotent`)."]
             if report.get("refine", "idempotent") != "idempotent" else []) + \
            (["`--force`: the predictions `predict` refuses are used too."] if report.get("forced") else [])
    lines += [" ".join(notes), ""] if notes else []
    lines += ["| structure | atoms | novelty | SCF it. atomic | SCF it. ML | saved | wall atomic (s) "
              "| wall ML incl. prediction (s) | abs(ΔE) (eV) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    several = len({r.get("model") for r in report["per_structure"]}) > 1  # auto gave runs their own models
    for r in report["per_structure"]:
        a, m = r["atomic"], r["ml"]
        novelty = "-" if r.get("novelty") is None else f"{r['novelty']:.2f}" + (" (flagged)" if r["flagged"] else "")
        if r.get("fallback"):
            novelty += f", {r['fallback_kind']}: atomic guess used"
        structure = f"{r['name']} ({r['model']})" if several else r["name"]
        unread = "" if r.get("fallback") or m["dm_read"] else " (DM not read)"
        lines.append(f"| {structure} | {r['natoms']} | {novelty} | {a['scf_iterations']} | {m['scf_iterations']}{unread} | "
                     f"{a['scf_iterations'] - m['scf_iterations']} | {a['siesta_wall_s']:.2f} | "
                     f"{m['siesta_wall_s'] + m['prediction_s']:.2f} | "
                     f"{abs(m['total_energy_eV'] - a['total_energy_eV']):.1e} |")
    lines += ["", f"Total: {report['scf_iterations_atomic']} → {report['scf_iterations_ml']} SCF iterations "
              f"({100 * report['iterations_saved_fraction']:.0f}% saved); wall {report['wall_s_atomic']:.1f} s → "
              f"{report['wall_s_ml_including_prediction']:.1f} s with the predictions"
              + (f" (each structure's median-time run of {report['repeat']}, with the median prediction; one "
                 f"structure's runs differed by up to {100 * report['wall_spread_max']:.0f} %)"
                 if report.get("wall_spread_max") is not None else "")
              + (f" (and {report['startup_s']:.1f} s of start-up once: {STARTUP})" if report.get("startup_s") else "")
              + f"; max |ΔE| "
              f"{report['max_abs_energy_difference_eV']:.1e} eV; ML never worse: {report['ml_never_worse']}; "
              f"flagged as novel: {report.get('structures_flagged_novel', 0)} of {report['structures']}"
              + (f"; started from the atomic guess: {report['structures_fallback_atomic']} (far outside the training "
                 f"data, a k-sampling the model lacks, or no clear occupied space)"
                 if report.get("structures_fallback_atomic") else "")
              + "."]
    unread = [r["name"] for r in report["per_structure"] if not r.get("fallback") and not r["ml"]["dm_read"]]
    lines += _unread_dm_note(unread, "predicted", "their ML column is its own atomic guess")
    if report.get("reused"):  # a resumed benchmark
        lines += ["", f"Reused from an earlier run of this benchmark, which finished them with the same fdf, model, "
                  f"settings and SIESTA ({len(report['reused'])}): {', '.join(report['reused'])}."]
    if report.get("atomic_reused"):  # rerun with another model, refinement or --force
        lines += ["", f"Atomic-guess runs kept from an earlier run with the same fdf, SIESTA and repeat count; only the "
                  f"ML runs were redone ({len(report['atomic_reused'])}): {', '.join(report['atomic_reused'])}."]
    if report.get("skipped"):  # bench --skip-incompatible
        lines += ["", f"Not run, the model does not cover them ({len(report['skipped'])}):", ""]
        lines += [f"- {run_id}: {reason}" for run_id, reason in report["skipped"].items()]
    return "\n".join(lines + siesta_line(report)) + "\n"


def _unread_dm_note(unread: list[str], which: str, meaning: str) -> list[str]:
    """The report's paragraph on runs whose output lacks SIESTA's "Succeeded" for reading the DM: SIESTA started
    them from its atomic guess, so their counts measure no guess (the first ten named)."""
    if not unread:
        return []
    return ["", f"**SIESTA did not read the {which} DM** in {len(unread)} run(s) (no \"Attempting to read DM from "
            f"file... Succeeded\" in its output), so {meaning}: {', '.join(unread[:10])}"
            + (" ..." if len(unread) > 10 else "") + "."]


def plot(rows: list[StructureResult], path: Path, title: str = "") -> None:
    """Left: SCF iterations per structure for each guess. Right: dDmax vs iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(rows))
    for k, guess in enumerate(("atomic", "ml")):
        ax1.bar(x + (k - 0.5) * 0.4, [r.results[guess].scf_iterations for r in rows], 0.4, label=guess)
        for r in rows:
            d = r.results[guess].dDmax
            ax2.semilogy(range(1, len(d) + 1), d, color=f"C{k}", alpha=0.5, label=guess if r is rows[0] else None)
    ax1.set_xticks(x, [r.name for r in rows], rotation=90, fontsize=7)
    ax1.set_ylabel("SCF iterations")
    ax1.legend()
    # The stopping line of the runs' own DM.Tolerance (SIESTA's echo of it), not a fixed 1e-5: a user's fdf may
    # set another; one line per value if the structures differ.
    tolerances = sorted({g.dm_tolerance for r in rows for g in r.results.values() if g.dm_tolerance})
    for tolerance in tolerances:
        ax2.axhline(tolerance, color="k", ls=":", lw=1, label=f"DM.Tolerance {tolerance:g}")
    ax2.set_xlabel("SCF iteration")
    ax2.set_ylabel("dDmax")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- trajectories


def _run_frame(fdf_text: str, workdir: Path, start_dm, geometry, pseudo_dirs, command) -> tuple:
    """Run SIESTA on one frame from ``start_dm`` (an image-keyed CSR, see :func:`~siesta_dmguess.dm.to_image_keyed`,
    or None: atomic guess); return (result, wall time, D_scf image-keyed, the converged .DM's path)."""
    from .fdf import siesta_dm_path
    from .dm import from_image_keyed, read_density_matrix, to_image_keyed, write_density_matrix
    from .siesta import prepare_run, run_siesta

    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / "frame.fdf"
    src.write_text(fdf_text)
    dm_file = None
    if start_dm is not None:
        dm_file = workdir / "start.DM"
        write_density_matrix(from_image_keyed(start_dm, geometry), dm_file, overwrite=True)
    fdf = prepare_run(src, workdir / "run", "atomic" if start_dm is None else "ml", dm_file=dm_file,
                      pseudo_dirs=pseudo_dirs)
    run = run_siesta(fdf, command=command)
    out = run.output
    dm_path = siesta_dm_path(fdf)
    return out, run.wall_s, to_image_keyed(read_density_matrix(dm_path, geometry)), dm_path


def _kept_run(run_dir: Path, identity: dict, geometry, with_dm: bool = True) -> tuple | None:
    """One guess's run of a frame that an earlier run of the same trajectory benchmark finished
    (:func:`read_kept`): (its result, its converged DM read back from the run, which the guess's next frames start
    from; None without ``with_dm``, for a guess built on no history); None where either is missing or it was
    measured otherwise."""
    from .dm import read_density_matrix, to_image_keyed

    return read_kept(run_dir, identity, lambda kept: (
        kept["result"], to_image_keyed(read_density_matrix(run_dir / kept["dm_file"], geometry)) if with_dm else None))


# The guesses that start from the same guess's converged DMs of the frames before (history.TrajectoryHistory).
HISTORY_GUESSES = ("reuse", "extrapolation", "ml+residual")


def _guess_identity(fdf_template: Path, pseudo_dirs, loaded, siesta: list[str], guess: str, depth: int,
                    refine: str, force: bool) -> dict:
    """:func:`measurement_identity` of one guess's runs along a trajectory, but for each frame's own fdf: the
    template's included files, the pseudopotentials, SIESTA, and only the settings that guess depends on (the
    model, refinement and ``force`` for the ML guesses, the depth for those built on a history), so that adding a
    guess or changing the model reruns only the runs it changes."""
    ml = guess.startswith("ml")
    return measurement_identity(_with_included("", fdf_template), pseudo_dirs, loaded if ml else None, siesta,
                                guess=guess, depth=depth if guess in ("extrapolation", "ml+residual") else None,
                                refine=refine if ml else None, force=force if ml else None)


def run_trajectory_benchmark(trajectory, fdf_template, model="auto", out_dir="bench", guesses=GUESSES,
                             depth: int = DEFAULT_DEPTH, frames: slice = slice(None), command=None,
                             progress: bool = True,
                             pseudo_dirs=(), refine: str = "idempotent", force: bool = False,
                             name: str | None = None, resume: bool = True) -> dict:
    """SCF iterations along a trajectory for each starting guess (see :mod:`siesta_dmguess.history`).

    Every frame of ``trajectory`` (any file ASE reads, or a list of Atoms) is run
    with the settings of ``fdf_template`` (its geometry replaced), once per guess;
    each guess keeps its own history of converged DMs (folded for Γ-only runs, with
    their periodic images for k-point runs). Results go to ``bench_<name>.json/.md/.png`` (``name``, default: the
    trajectory file's stem, also titles the report). A frame whose
    prediction is refused (:attr:`~siesta_dmguess.predict.Prediction.refusals`) runs ``ml`` from the atomic guess
    and ``ml+residual`` from the history's extrapolation, as the calculator does, unless ``force``.

    With ``resume`` (the default) the runs an earlier run of this benchmark finished in ``out_dir`` with nothing
    they depend on changed (:func:`_guess_identity`; for a guess built on a history, also every earlier frame of
    that guess) are not run again: their results and converged DMs are read back and the guesses' histories
    rebuilt from them. So a stopped benchmark continues where it stopped, and one run again with another guess
    added, or another model, runs only what that changes. The report lists under ``reused`` the frames from the
    first on whose every guess was reused, and the reused runs per guess under ``reused_runs``.
    """
    from .siesta import find_siesta

    siesta = find_siesta(command)  # a missing SIESTA is said at once, not after importing torch and loading the model
    from tqdm.auto import tqdm

    from .dm import build_geometry, to_image_keyed
    from .fdf import resolve_fdf
    from .history import TrajectoryHistory
    from .predict import predict_density_matrix, ready_chosen_model
    from .siesta.templates import fdf_with_geometry, species_pseudopotentials
    from .structure import FdfFrames, periodic_cell, read_frames

    unknown = [g for g in guesses if g not in GUESSES]
    if unknown or not guesses:  # before any SIESTA run, not midway through the trajectory
        raise DMGuessError(f"{f'unknown starting guesses {unknown}' if unknown else 'no starting guess given'}: "
                           f"choose from {', '.join(GUESSES)}")
    repeated = sorted({g for g in guesses if list(guesses).count(g) > 1})
    if repeated:  # a second run of a history guess would start from the DM the first just converged
        raise DMGuessError(f"starting guesses given more than once: {', '.join(repeated)}")
    name = benchmark_name(name, Path(str(trajectory)).stem if not isinstance(trajectory, list) else "trajectory")
    fdf_template, out_dir = resolve_fdf(fdf_template), Path(out_dir)
    if not fdf_template.is_file():
        raise InputFileError("fdf template not found", fdf_template)
    if not isinstance(trajectory, list) and Path(trajectory).is_dir():
        raise InputFileError("--fdf is for a trajectory file, and this is a folder: benchmark a dataset folder "
                             "without --fdf", trajectory)
    images = read_frames(trajectory)[frames] if not isinstance(trajectory, list) else trajectory[frames]
    if not images:
        raise InputFileError("the trajectory holds no frames", trajectory if not isinstance(trajectory, list) else None)
    frames_in_fdf = FdfFrames(fdf_template)
    images = frames_in_fdf.in_cell(images, trajectory if not isinstance(trajectory, list) else None)
    frames_in_fdf.check_trajectory(images, trajectory if not isinstance(trajectory, list) else None)
    pseudo_dirs = [fdf_template.parent, fdf_template.parent.parent / "basis", *map(Path, pseudo_dirs)]
    species_pseudopotentials(frames_in_fdf.text, fdf_template, pseudo_dirs[1:])  # each run copies them: said now
    make_output_folder(out_dir)  # after the input checks: a refused trajectory leaves no folder behind
    loaded, startup_s = None, 0.0
    if any(g.startswith("ml") for g in guesses):
        loaded, startup_s = ready_chosen_model(model, fdf_template)  # "auto": chosen for the template's structure
    histories = {g: TrajectoryHistory(depth) for g in guesses}
    frame_labels = [frames_in_fdf.labels(atoms) for atoms in images]
    if loaded is None:  # the frames' geometry from the basis SIESTA reads (with a model: each prediction's)
        from .data import run_basis

        basis = run_basis(fdf_template.parent, {label for labels in frame_labels for label in labels})
    # What each guess's kept runs depend on besides their frame's fdf (_guess_identity), read once.
    guess_identities = {g: _guess_identity(fdf_template, pseudo_dirs, loaded, siesta, g, depth, refine, force)
                        for g in guesses}
    rows, reused, reused_runs = [], [], {g: 0 for g in guesses}
    for t, (atoms, labels) in enumerate(tqdm(list(zip(images, frame_labels)), desc=f"bench {name}",
                                             disable=not progress)):
        text = fdf_with_geometry(frames_in_fdf.text, atoms, labels)
        structure = frames_in_fdf.structure(atoms)
        pred, predicted, prediction_s = None, None, 0.0
        if loaded is not None:
            t0 = time.perf_counter()
            # folded unless the fdf has k-points; force: as for a dataset, even what the guard refuses
            pred = predict_density_matrix(structure, loaded, refine=refine, force=force)
            prediction_s = time.perf_counter() - t0
            predicted = to_image_keyed(pred.density_matrix)
        overlap = pred.history_overlap if pred else None
        # The prediction's geometry has the model's basis under the fdf's labels (an `Ow` is the model's O);
        # without a model, the basis SIESTA reads beside the fdf is keyed by those labels already.
        geometry = pred.density_matrix.geometry if pred is not None else build_geometry(structure, basis)
        # Each frame's cell and orbitals' atoms: the histories follow atoms a wrapped trajectory moves across it.
        frame = {"cell": periodic_cell(atoms), "orbital_atom": geometry.o2a(np.arange(geometry.no))}
        frame_dir = out_dir / name / f"{t:04d}"
        frame_sha256 = hashlib.sha256(text.encode()).hexdigest()
        forget_kept(frame_dir)  # a whole frame's result, as earlier versions kept it: read no more (per guess now)
        row = {"frame": t, "natoms": len(atoms)}
        if pred is not None:  # the prediction's uncertainty, as a dataset's report gives it
            row["novelty"], row["flagged"] = pred.novelty, pred.out_of_distribution
        # A frame whose prediction is refused (Prediction.refusals) starts `ml` from the atomic guess, as the
        # calculator does.
        refusal = pred.refusal_reason if pred is not None and not force else ""
        if refusal:
            row["fallback"], row["fallback_kind"] = refusal, pred.refusal_kind
            predicted = None  # and the ml+residual history records no prediction for it
        kept_here = []
        for g in guesses:
            used = "extrapolation" if refusal and g == "ml+residual" else g  # as the calculator: the history alone
            identity = {**guess_identities[g], "frame_sha256": frame_sha256}
            # A history guess starts from its frames before: reuse only an unbroken run of it from the first.
            unbroken = g not in HISTORY_GUESSES or reused_runs[g] == t
            kept = _kept_run(frame_dir / g, identity, geometry, g in HISTORY_GUESSES) if resume and unbroken else None
            kept_here.append(kept is not None)
            if kept is not None:
                row[g], converged = kept
                reused_runs[g] += 1
            else:
                forget_kept(frame_dir / g)
                if refusal and g == "ml":
                    start = None
                else:
                    start = histories[g].guess(used, atoms.positions, predicted,
                                               refine=pred.refined if pred else None, cell=frame["cell"])
                out, wall, converged, dm_path = _run_frame(text, frame_dir / g, start, geometry, pseudo_dirs, command)
                row[g] = asdict(GuessResult(used if start is not None else "atomic", out.scf_iterations,
                                            out.converged, out.dm_read_from_file, out.total_energy_eV, wall,
                                            prediction_s if g.startswith("ml") else 0.0,
                                            [st.dDmax for st in out.scf_history]))
                save_kept(frame_dir / g, identity, {"result": row[g],
                                                    "dm_file": str(dm_path.relative_to(frame_dir / g))})
            if g == "ml+residual":  # the only guess built on past predictions; the others need converged DMs alone
                histories[g].push(atoms.positions, converged, predicted, overlap, **frame)
            elif g in HISTORY_GUESSES:  # (atomic and ml start from no history)
                histories[g].push(atoms.positions, converged, **frame)
        if len(reused) == t and all(kept_here):  # every guess of every frame up to here
            reused.append(t)
        rows.append(row)
    if any(reused_runs.values()):
        log.warning("bench %s: %d of %d runs (%s) were finished by an earlier run in %s with the same frames, "
                    "settings and SIESTA; their results are reused and the histories rebuilt from their DMs", name,
                    sum(reused_runs.values()), len(images) * len(guesses),
                    ", ".join(f"{g} {n}" for g, n in reused_runs.items() if n), out_dir)
    report = summarize_trajectory(rows, guesses, Path(loaded.path).name if loaded else "", str(trajectory)) | {
        "name": name, "refine": refine, "startup_s": startup_s, "reused": reused, "reused_runs": reused_runs,
        "siesta": shlex.join(siesta)}
    (out_dir / f"bench_{name}.json").write_text(json.dumps(report, indent=1))
    (out_dir / f"bench_{name}.md").write_text(trajectory_markdown(report))
    plot_trajectory(report, out_dir / f"bench_{name}.png")
    return report


def summarize_trajectory(rows: list[dict], guesses, model: str, data: str) -> dict:
    totals = {g: sum(r[g]["scf_iterations"] for r in rows) for g in guesses}
    walls = {g: sum(r[g]["siesta_wall_s"] + r[g]["prediction_s"] for r in rows) for g in guesses}
    base = totals.get("atomic")
    energies = {g: [r[g]["total_energy_eV"] for r in rows] for g in guesses}
    reference = "atomic" if "atomic" in guesses else guesses[0]  # the energies every other guess is checked against
    de = {g: None if g == reference else max(abs(a - b) for a, b in zip(energies[g], energies[reference]))
          for g in guesses}
    return {"model": model, "data": data, "frames": len(rows), "guesses": list(guesses),
            "scf_iterations": totals, "wall_s_including_prediction": walls,
            "iterations_saved_vs_atomic": {g: (1 - totals[g] / base) if base else None for g in guesses},
            "energy_reference": reference, "max_abs_energy_difference_eV": de,
            "all_converged": all(r[g]["converged"] for r in rows for g in guesses),
            "frames_fallback_atomic": sum(bool(r.get("fallback")) for r in rows),
            "frames_flagged_novel": sum(bool(r.get("flagged")) for r in rows), "per_frame": rows}


def trajectory_markdown(report: dict) -> str:
    from .card import STARTUP

    guesses = report["guesses"]
    model = f" with {Path(report['model']).name}" if report.get("model") else ""
    novelty = any("novelty" in r for r in report["per_frame"])  # (reports before the field, or without a model)
    lines = [f"# SCF iterations along {report_name(report)} ({report['frames']} frames){model}", "",
             "| frame | " + " | ".join(guesses) + (" | novelty |" if novelty else " |"),
             "| --- |" + " --- |" * (len(guesses) + novelty)]
    for r in report["per_frame"]:
        frame = str(r["frame"])
        if r.get("fallback"):
            frame += f" ({r['fallback_kind']}: no ML prediction)"
        flag = ("" if r.get("novelty") is None else f" {r['novelty']:.2f}" + (" (flagged)" if r["flagged"] else "")
                + " |") if novelty else ""
        lines.append(f"| {frame} | " + " | ".join(str(r[g]["scf_iterations"]) for g in guesses) + " |" + flag)
    lines.append("| **total** | " + " | ".join(f"**{report['scf_iterations'][g]}**" for g in guesses)
                 + (" | |" if novelty else " |"))
    saved = report["iterations_saved_vs_atomic"]
    reference = report.get("energy_reference", "atomic")
    lines += ["", f"| guess | SCF iterations | saved vs atomic | wall incl. prediction (s) | max abs(ΔE) vs {reference} "
              f"(eV) |", "| --- | --- | --- | --- | --- |"]
    for g in guesses:
        frac = f"{100 * saved[g]:.0f} %" if saved[g] is not None else "-"
        de = report["max_abs_energy_difference_eV"][g]
        lines.append(f"| {g} | {report['scf_iterations'][g]} | {frac} | "
                     f"{report['wall_s_including_prediction'][g]:.1f} | {'-' if de is None else f'{de:.1e}'} |")
    if report.get("startup_s"):
        lines += ["", f"The ML columns' wall times hold their predictions; the start-up, once per process "
                  f"({STARTUP}), took {report['startup_s']:.1f} s more."]
    if novelty:
        lines += ["", f"Flagged as novel (novelty above the model's flag level): {report.get('frames_flagged_novel', 0)} "
                  f"of {report['frames']} frames."]
    far = [r for r in report["per_frame"] if r.get("fallback")]
    if far:
        lines += ["", f"{len(far)} of {report['frames']} frames got no ML prediction (`ml` started from the atomic "
                  f"guess, `ml+residual` from the history's extrapolation once there was one): "
                  f"{far[0]['fallback']}" + (" (and alike)." if len(far) > 1 else ".")]
    unread = [f"{g} at frame {r['frame']}" for r in report["per_frame"] for g in guesses
              if r[g]["guess"] != "atomic" and not r[g].get("dm_read", True)]  # (reports before the field)
    lines += _unread_dm_note(unread, "starting", "their counts are its atomic guess's")
    if report.get("reused"):  # a resumed benchmark
        first, last = report["reused"][0], report["reused"][-1]
        which = f"Frame {first} was" if first == last else f"Frames {first}–{last} were"
        lines += ["", f"{which} reused from an earlier run of this benchmark, which finished them with the same "
                  f"frames, model, settings and SIESTA."]
    partly = {g: n for g, n in report.get("reused_runs", {}).items() if n > len(report.get("reused", []))}
    if partly:  # rerun with a guess added, or another model or refinement
        lines += ["", "Runs reused from an earlier run of this benchmark with the same frames and the settings they "
                  "depend on: " + ", ".join(f"{g} {n} of {report['frames']}" for g, n in partly.items()) + "."]
    return "\n".join(lines + siesta_line(report)) + "\n"


_SET_TOTAL = re.compile(r"^# SCF benchmark: (?P<name>\S+) with (?P<model>\S+).*?"
                        r"^Total: (?P<atomic>\d+) → (?P<ml>\d+) SCF(?P<rest>[^\n]*)", re.S | re.M)
_SET_WALL = re.compile(r"wall (?P<wall_s_atomic>[\d.]+) s → (?P<wall_s_ml_including_prediction>[\d.]+) s")
_SET_STARTUP = re.compile(r"\(and (?P<startup_s>[\d.]+) s of start-up")
_TRAJECTORY_TITLE = re.compile(r"^# SCF iterations along (?P<name>\S+?)(?:\.traj)? \(\d+ frames\)(?: with (?P<model>\S+))?",
                               re.M)
_GUESS_TOTAL = re.compile(r"^\| (?P<guess>[\w+]+) \| (?P<total>\d+) \| ", re.M)


def read_markdown_totals(text: str) -> dict:
    """The totals of a table written by :func:`markdown` or :func:`trajectory_markdown`, read back for the model
    cards and the summary plot (``docs/results``): ``{"kind": "set", "name", "model", "atomic", "ml"}`` (with
    ``wall_s_atomic``, ``wall_s_ml_including_prediction`` and ``startup_s`` where the total line has them) or
    ``{"kind": "trajectory", "name", "model", "totals": {guess: SCF iterations}}`` (``model`` None in a
    trajectory table written before it named one). A :class:`DMGuessError` for any other text."""
    if m := _SET_TOTAL.search(text):
        # the wall times (s) and start-up as the table rounds them; absent from a table written without them
        walls = {key: float(value) for pattern in (_SET_WALL, _SET_STARTUP) if (found := pattern.search(m["rest"]))
                 for key, value in found.groupdict().items()}
        return {"kind": "set", "name": m["name"], "model": m["model"], "atomic": int(m["atomic"]), "ml": int(m["ml"]),
                **walls}
    if m := _TRAJECTORY_TITLE.search(text):
        totals = {g["guess"]: int(g["total"]) for g in _GUESS_TOTAL.finditer(text) if g["guess"] in GUESSES}
        if totals:
            return {"kind": "trajectory", "name": m["name"], "model": m["model"], "totals": totals}
    raise DMGuessError("not a table written by `siesta-dmguess bench`")


def plot_trajectory(report: dict, path: Path) -> None:
    """SCF iterations per frame for every guess."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    frames = [r["frame"] for r in report["per_frame"]]
    for k, g in enumerate(report["guesses"]):  # marker and line style per guess: equal counts stay visible
        ax.plot(frames, [r[g]["scf_iterations"] for r in report["per_frame"]], marker="os^vD"[k % 5],
                ls=["-", "--", ":", "-.", (0, (5, 1))][k % 5], fillstyle="none", color=f"C{k}",
                label=f"{g} ({report['scf_iterations'][g]})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trajectory frame")
    ax.set_ylabel("SCF iterations")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title(report_name(report))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_bench_parser(sub) -> None:
    from .cli import add_model_argument, add_refine_argument, add_threads_argument, at_least

    b = sub.add_parser("bench", help="SCF iterations with the ML guess vs SIESTA's atomic guess (real SIESTA)")
    b.add_argument("data_dir", help="dataset folder of run folders (fdf + basis/*.psf), or a trajectory file "
                                    "(with --fdf)")
    b.add_argument("--fdf", help="for a trajectory: the fdf (or its run folder) whose settings every frame is run with")
    b.add_argument("--guesses", help="for a trajectory: comma-separated starting guesses to compare (default: all "
                                     f"of {','.join(GUESSES)})")
    b.add_argument("--depth", type=at_least(1),
                   help=f"for a trajectory: steps kept for extrapolation (default {DEFAULT_DEPTH})")
    add_model_argument(b)
    b.add_argument("--name", help="name of the report and its files bench_NAME.json/.md/.png (default: the "
                   "dataset folder's name, or the trajectory file's without its suffix)")
    b.add_argument("--out", default="bench", help="output folder for runs, JSON, Markdown and PNG (default: bench)")
    b.add_argument("--split", default="auto", help="val, train, all, or auto (default): val where the folder's "
                   "index.json (or the runs' run.json) records a val split, else all runs")
    b.add_argument("--limit", type=at_least(0), default=0, help="at most N structures")
    b.add_argument("--siesta", help="SIESTA command (default: SIESTA_COMMAND, ASE config, PATH)")
    b.add_argument("--force", action="store_true", help="use the ML guess even where predict would refuse it (far "
                   "outside the training data, a k-sampling the model lacks, no clear occupied space): measures "
                   "what those guesses would do")
    b.add_argument("--skip-incompatible", action="store_true", help="for a dataset folder: leave out the runs the "
                   "model does not cover (species, basis, settings) and list them in the report, instead of stopping "
                   "before any run")
    b.add_argument("--restart", action="store_true", help="run every structure or frame again, also those an "
                   "earlier run of this benchmark in --out finished (by default a stopped benchmark continues where "
                   "it stopped)")
    b.add_argument("--repeat", type=at_least(1), default=1, help="for a dataset folder: run every guess N times (alternating "
                   "them) and report each structure's median-time run: steadier wall times (default 1)")
    b.add_argument("--quiet", action="store_true", help="no progress bar (as for train and evaluate)")
    add_refine_argument(b)
    add_threads_argument(b)
    b.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    # Options of the other kind of benchmark are refused, not ignored: a user who set them expects them to act.
    if args.fdf:
        if args.repeat > 1:  # a trajectory's guesses depend on the steps before: a repeat is a whole second run
            raise DMGuessError("--repeat applies to a dataset folder, not to a trajectory (--fdf): run the "
                               "trajectory benchmark again with another --out instead")
        if args.skip_incompatible:
            raise DMGuessError("--skip-incompatible applies to a dataset folder, not to a trajectory (--fdf): all "
                               "frames share one fdf, which the model covers or not")
        if args.split != "auto":
            raise DMGuessError("--split applies to a dataset folder, not to a trajectory (--fdf): every frame is run "
                               "(--limit N runs the first N; TRAJ@START:STOP, as ASE names frames, others)")
        guesses = ",".join(GUESSES) if args.guesses is None else args.guesses  # "" is no guess, not all of them
        report = run_trajectory_benchmark(args.data_dir, args.fdf, args.model, args.out,
                                          tuple(g.strip() for g in guesses.split(",") if g.strip()),
                                          depth=args.depth or DEFAULT_DEPTH, command=args.siesta,
                                          frames=slice(0, args.limit or None), refine=args.refine, force=args.force,
                                          name=args.name, resume=not args.restart, progress=not args.quiet)
        print(trajectory_markdown(report))
        return 0
    given = [option for option, value in (("--guesses", args.guesses), ("--depth", args.depth)) if value is not None]
    if given:
        verb = "apply" if len(given) > 1 else "applies"
        raise DMGuessError(f"{' and '.join(given)} {verb} to a trajectory (a trajectory file with --fdf); a dataset "
                           "folder is run from the atomic and the ML guess")
    report = run_benchmark(args.data_dir, args.model, args.out, None if args.split == "all" else args.split,
                           args.limit, args.siesta, refine=args.refine, force=args.force, repeat=args.repeat,
                           skip_incompatible=args.skip_incompatible, name=args.name, resume=not args.restart,
                           progress=not args.quiet)
    print(markdown(report))
    return 0
