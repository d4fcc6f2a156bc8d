"""ASE calculator: predict the DM, write ``<label>.DM``, run SIESTA from it.

:class:`DMGuessSiesta` is ASE's :class:`ase.calculators.siesta.Siesta` (same
constructor arguments: species, basis_set, xc, kpts, fdf_arguments, ...) plus

* ``model``: a shipped model name, a model folder or a loaded model; ``"auto"`` (default) takes the
  shipped model with the fewest species that covers the atoms', unless the atoms lie outside its training
  data and another covering model knows them much better or would give a prediction that is used where its
  own would be refused (``predict.choose_model``), chosen at the first ML step and again when the elements
  change; a name or folder that is no model is an error when the calculator is made (whatever ``fallback``);
* ``guess``: how each SCF starts (see :mod:`siesta_dmguess.history`):
  ``"ml+residual"`` (default: the prediction; along MD and relaxations, SIESTA's
  DM extrapolation plus the model's prediction of the change, weighted by how
  well it predicted the previous step, or the plain prediction where that is
  already at SIESTA's grid noise), ``"ml"`` (the prediction for every
  geometry), ``"reuse"`` (SIESTA's previous-step DM; as ASE's Siesta, none at the
  first step or after the atomic numbers change), ``"extrapolation"`` (SIESTA's DM
  extrapolation, applied across ASE-driven steps) or ``"atomic"``; with k-points too. Where a step's
  prediction is not used (below), ``"ml+residual"`` starts from the extrapolation
  alone once there is a history, ``"ml"`` from the atomic guess;
* ``fallback``: ``"error"`` (default) or ``"atomic"``: what to do when the model
  does not cover the structure (species, basis, settings) — the atomic guess is
  used with a warning that says why;
* ``compare_baseline``: also run SIESTA from the atomic guess (in a sub-folder)
  and record the iterations saved and the difference in converged energy;
* ``novelty_limit``: with ``fallback="atomic"``, use the atomic guess when the
  structure's novelty score (see ``Prediction.novelty``) exceeds this value
  (``"model"``: the model card's threshold; ``None``: never). Whatever
  ``fallback`` says, a structure *far* outside the training data
  (``Prediction.far_out_of_distribution``, 100x the flag level) starts from the
  atomic guess with a warning, because such predictions measured worse than it;
  ``novelty_limit=None`` turns that off too. So does, always, a run whose k-sampling
  the model never trained on, and a prediction with no clear occupied space
  (``Prediction.mixed_reason``: a bond breaking);
* ``history_depth``: steps kept for extrapolation (SIESTA's ``DM.History.Depth``); the history starts again
  when the atomic numbers change (other elements, or the same atoms in another order);
* ``threads``: torch threads for the predictions (default: torch's, one per core); 1 where other
  programs keep the cores busy (``predict.torch_threads``).

Without ``command`` or ``profile``, SIESTA is found as everywhere in the package
(:func:`~siesta_dmguess.siesta.find_siesta`: ``$SIESTA_COMMAND``, ASE's configuration,
``siesta`` on PATH); where there is none, the first calculation raises
:class:`~siesta_dmguess.errors.SiestaNotFoundError`, saying where it looked, before it
loads the model or predicts anything.

One default differs from ASE's ``Siesta``: ``energy_shift`` is SIESTA's own default,
0.02 Ry, not ASE's 0.1 eV. The energy shift sets the orbitals' cutoff radii, so it is
part of the basis, and a model trained on fdf runs that leave it out (every shipped
model) knows only SIESTA's. The run's ``xc``, ``basis_set``, ``energy_shift``,
``spin`` and basis-related ``fdf_arguments`` are compared with the model card before
each prediction; a mismatch is a :class:`~siesta_dmguess.errors.ModelCompatibilityError`
that names the setting (or, with ``fallback="atomic"``, the atomic guess).

Where SIESTA fails from a guess (stops, or returns an unconverged SCF with
``SCF.MustConverge F``), the step is run again from SIESTA's atomic guess with a
warning, so a guess never costs the step or its answer (``docs/guesses.md``).

After each calculation ``calc.guess_record`` (a :class:`GuessRecord`) holds the
SCF iterations, whether SIESTA read the DM, prediction and SCF times, and the
prediction's uncertainty (electron-count error, novelty). The guess never
changes SIESTA's settings, so the converged answer is the same.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase.calculators.calculator import equal
from ase.calculators.siesta import Siesta

from .errors import DMGuessError
from .history import DEFAULT_DEPTH, GUESSES
from .structure import new_structure_reason, periodic_cell

log = logging.getLogger(__name__)


@dataclass
class GuessRecord:
    guess: str  # what was used: ml, ml+residual, reuse, extrapolation, atomic
    scf_iterations: int
    dm_read: bool
    prediction_s: float  # building and writing the starting DM: the prediction, or a history guess's extrapolation
    scf_s: float
    atomic_scf_iterations: int | None = None
    reason: str = ""  # why a fallback happened
    electron_count_error: float | None = None  # Tr(D S) - N of the raw prediction
    novelty: float | None = None  # the prediction's out-of-distribution score
    startup_s: float = 0.0  # paid once, at the first ML step: loading and warming up the model (not in prediction_s)
    # Where SIESTA failed from the guess and the step was rerun from its atomic guess: the failed run's SCF
    # iterations (its time is in scf_s; scf_iterations is the rerun's). The step cost both.
    failed_scf_iterations: int = 0
    novelty_threshold: float | None = None  # the model's flag level: above it the structure is flagged as novel
    # eV, SIESTA's converged total energy of this run and, with compare_baseline, of the atomic-guess run: a
    # guess must not change the answer (|difference| within the SCF tolerance's, ~1e-6 eV measured)
    total_energy: float | None = None
    atomic_total_energy: float | None = None

    @property
    def energy_difference(self) -> float | None:
        """eV: this run's converged total energy minus the atomic-guess run's (None without compare_baseline)."""
        if self.total_energy is None or self.atomic_total_energy is None:
            return None
        return self.total_energy - self.atomic_total_energy

    @property
    def flagged_as_novel(self) -> bool | None:
        """Whether the prediction's novelty is above its model's flag level (None without a prediction)."""
        if self.novelty is None or self.novelty_threshold is None:
            return None
        return self.novelty > self.novelty_threshold

    @property
    def iterations_saved(self) -> int | None:
        if self.atomic_scf_iterations is None:
            return None
        return self.atomic_scf_iterations - self.scf_iterations


def _siesta_command_line():
    """(ASE command line, None) for the SIESTA :func:`~siesta_dmguess.siesta.find_siesta` finds, or (None, the
    error saying where it looked). ASE's own default would look only at its configuration and PATH, and report a
    missing SIESTA as a failed shell command (exit code 127) after the prediction."""
    import shlex

    from .errors import SiestaNotFoundError
    from .siesta import find_siesta

    try:
        return shlex.join(find_siesta()) + " < PREFIX.fdf > PREFIX.out", None
    except SiestaNotFoundError as exc:
        return None, exc


def _warn(message: str) -> None:
    """Warn at the user's line: the first caller outside this package and ASE. A fixed ``stacklevel`` pointed
    into ASE, whose depth varies (``atoms.get_potential_energy()``, an optimizer's step, an MD step)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("siesta_dmguess", "ase"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def _warn_of_replaced_dm_keys(fdf_arguments: dict) -> None:
    """Say that the starting-guess keys among ``fdf_arguments`` (``DM.UseSaveDM F``, ``File.DM.Init``) are
    replaced at each step by the guess's template (integration/templates), rather than drop them silently."""
    from .fdf import normalized_fdf_key
    from .siesta.templates import DM_INIT_KEYS

    replaced = [k for k in fdf_arguments if normalized_fdf_key(k) in DM_INIT_KEYS]  # (keys in SIESTA's spelling)
    if replaced:
        _warn(f"siesta-dmguess: fdf_arguments {replaced} are replaced at each step by the starting guess's "
              f"settings; guess='atomic' starts every step from SIESTA's atomic guess")


def _checked_model(model):
    """The calculator's ``model`` argument, checked when the calculator is made: a misspelt name was found only at
    the first step, and with ``fallback="atomic"`` ran the whole job from SIESTA's atomic guess (the fallback is
    for structures a model does not fit, not for a model that is not there)."""
    from .card import LoadedModel, resolve_model
    from .predict import _is_auto

    if isinstance(model, LoadedModel) or _is_auto(model):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be 'auto', a shipped model's name, a model folder or a loaded model, "
                        f"not {model!r}")
    resolve_model(model)  # ModelCompatibilityError naming it and the shipped models
    return model


class DMGuessSiesta(Siesta):
    """ASE's SIESTA calculator that starts every SCF from an ML-predicted density matrix."""

    GUESSES = GUESSES  # the starting guesses a trajectory history can give (siesta_dmguess.history)

    def __init__(self, *args, model="auto", guess: str = "ml+residual", fallback: str = "error",
                 compare_baseline: bool = False, novelty_limit="model", history_depth: int = DEFAULT_DEPTH,
                 threads: int | None = None, **kwargs):
        from ase.units import Ry

        kwargs.setdefault("energy_shift", 0.02 * Ry)  # SIESTA's default (eV, ASE's unit); see the module doc
        self._siesta_missing = None
        if not args and kwargs.get("command") is None and kwargs.get("profile") is None:
            kwargs["command"], self._siesta_missing = _siesta_command_line()
        super().__init__(*args, **kwargs)
        # checked as set() checks them; also sets _loaded, _loaded_for (the elements "auto" chose _loaded for) and
        # _auto_models ("auto": the model chosen for each set of elements)
        self._set_own(guess=guess, fallback=fallback, model=model, compare_baseline=compare_baseline,
                      novelty_limit=novelty_limit, threads=threads)
        _warn_of_replaced_dm_keys(self["fdf_arguments"] or {})
        from .history import TrajectoryHistory

        self.guess_record: GuessRecord | None = None
        self.history: list[GuessRecord] = []
        self.trajectory = TrajectoryHistory(history_depth)
        self._numbers = None  # atomic numbers of the last converged step: the system the history is of
        self._converged_positions = self._converged_cell = None  # and its positions and cell (a step far from
        # them starts without history)
        self._used = "atomic"
        self._prediction_s = self._startup_s = 0.0
        self._reason = ""
        self._rerun_reason = ""  # set while SIESTA is run again from its atomic guess (calculate)
        self._copied_pseudopotentials: set[str] = set()  # ASE's copies (symlink_pseudos=False) of the last write
        self._prediction = None  # the current step's Prediction (ML guesses)
        self._predicted = None  # its DM in the trajectory history's layout (dm.to_image_keyed)
        self._positions = None

    # -- helpers -------------------------------------------------------------
    def _written_fdf_settings(self) -> dict:
        """The run's k-sampling as SIESTA will build it: ``kgrid`` (more than Γ; else the DM is folded) and
        ``k_supercell_length``, by SIESTA's own rule applied to the fdf ASE has just written, so that k-points
        given as ``kpts`` or as fdf arguments (``kgrid.Cutoff``, a Monkhorst-Pack block) count alike; with them
        ``ghost_species``, which ASE writes for a ``Species(..., ghost=True)``, and the basis options and
        per-species sizes (``PAO.*`` fdf arguments, ASE's ``PAO.BasisSizes`` block). Before that fdf exists (a guess
        built by hand), from ``kpts`` alone (ASE writes no displacement)."""
        from .fdf import read_fdf_settings

        fdf = self.getpath(ext="fdf")
        if Path(fdf).is_file():
            settings = read_fdf_settings(fdf)
            return {k: settings[k] for k in ("kgrid", "k_supercell_length", "ghost_species", "basis_options",
                                             "basis_sizes") if k in settings}
        kpts = self["kpts"]
        return {"kgrid": not (kpts is None or all(int(k) == 1 for k in kpts))}

    def _run_settings(self) -> dict:
        """The settings this calculator gives SIESTA, as fdf settings, so the model's compatibility check sees them:
        ASE's own arguments (``xc``, ``basis_set``, ``energy_shift``, ``spin``), then ``fdf_arguments`` in any
        spelling of their keys (fdf keys ignore case and '.', '_', '-')."""
        from ase.units import Ry

        from .fdf import FDF_SETTING_KEYS, normalized_fdf_key

        settings = {}
        xc = self["xc"]
        if isinstance(xc, (tuple, list)) and len(xc) == 2:  # ASE stores (functional, authors)
            settings["XC.functional"], settings["XC.authors"] = map(str, xc)
        if isinstance(self["basis_set"], str):
            settings["PAO.BasisSize"] = self["basis_set"]
        for species in self["species"] or ():  # ASE Species: a per-element basis size overrides the global one
            if isinstance(species.get("basis_set"), str) and species["basis_set"] != settings.get("PAO.BasisSize"):
                settings["PAO.BasisSize"] = species["basis_set"]
        if self["energy_shift"] is not None:  # ASE's unit is eV; cards keep SIESTA's Ry
            settings["PAO.EnergyShift"] = f"{float(self['energy_shift']) / Ry:.6g} Ry"
        if self["spin"]:
            settings["Spin"] = str(self["spin"])
        canonical = {normalized_fdf_key(k): k for k in FDF_SETTING_KEYS}
        settings.update({canonical[normalized_fdf_key(k)]: str(v) for k, v in (self["fdf_arguments"] or {}).items()
                         if normalized_fdf_key(k) in canonical})
        return settings

    def _model(self, atoms):
        """The model of this step: loaded once (its time is this step's start-up, not part of its
        prediction_s); with "auto", chosen again when the elements change (water, then a CHNO molecule)."""
        from .predict import _is_auto, ready_chosen_model

        elements = frozenset(atoms.get_chemical_symbols())
        if self._loaded is None or (_is_auto(self.model_name) and elements != self._loaded_for):
            if elements in self._auto_models:
                self._loaded = self._auto_models[elements]
            else:
                self._loaded, self._startup_s = ready_chosen_model(self.model_name, atoms)
                self._auto_models[elements] = self._loaded
            self._loaded_for = elements
        return self._loaded

    def _dm_path(self) -> Path:
        return Path(self.directory) / f"{self.prefix}.DM"

    def _geometry(self, atoms):
        """The sisl geometry of this step's DM: the prediction's, else the one in the basis SIESTA wrote for the
        run (``<species label>.ion.xml`` beside the fdf; the model's basis where the guard let a prediction
        through), so that the history also works where no model fits the run (``fallback="atomic"``) or none is
        asked for (``guess="extrapolation"``)."""
        if self._prediction is not None:
            return self._prediction.density_matrix.geometry
        from .basis import read_basis_folder
        from .dm import build_geometry
        from .structure import read_structure, structure_as_siesta_runs

        try:
            labels = read_structure(self.getpath(ext="fdf")).labels  # ASE's species labels, e.g. O.1
            basis = read_basis_folder(self.directory, sorted(set(labels)))
        except DMGuessError:  # no run yet in this folder: the model's basis (the guard compared it with the run's)
            return build_geometry(structure_as_siesta_runs(atoms), self._model(atoms).basis)
        return build_geometry(structure_as_siesta_runs(atoms, labels), basis)

    def _predict(self, atoms):
        """The ML prediction for ``atoms``, or None (with ``self._reason``) when falling back."""
        from .predict import predict_density_matrix, torch_threads
        from .structure import structure_as_siesta_runs

        try:
            structure = structure_as_siesta_runs(atoms)
            sampling = self._written_fdf_settings()
            structure.fdf_settings = {**self._run_settings(), **sampling}
            with torch_threads(self.threads):
                pred = predict_density_matrix(structure, self._model(atoms), fold=not sampling["kgrid"])
        except DMGuessError as exc:
            if self.fallback == "error":
                raise
            self._reason = str(exc)
            _warn(f"siesta-dmguess: using SIESTA's atomic guess because {exc}")
            return None
        refusals = [reason for kind, reason in pred.refusals.items() if kind != "far" or self.novelty_limit is not None]
        if refusals:
            self._reason = refusals[0]
            _warn(f"siesta-dmguess: using SIESTA's atomic guess: {self._reason}")
            return None
        limit = pred.novelty_threshold if self.novelty_limit == "model" else self.novelty_limit
        if self.fallback == "atomic" and limit and pred.novelty > limit:
            self._reason = f"the structure looks unlike the model's training data (novelty {pred.novelty:.1f} > {limit:.1f})"
            _warn(f"siesta-dmguess: using SIESTA's atomic guess because {self._reason}")
            return None
        return pred

    def _write_guess(self, atoms) -> None:
        """Write <prefix>.DM for this step's guess, or leave none (atomic guess)."""
        from .dm import from_image_keyed, to_image_keyed, write_density_matrix

        self._used, self._reason, self._prediction_s, self._startup_s = "atomic", "", 0.0, 0.0
        self._prediction, self._predicted = None, None
        self._positions = atoms.positions.copy()
        same_system = self._numbers is not None and np.array_equal(self._numbers, atoms.numbers)
        if same_system and self._converged_positions is not None:
            # The history follows each atom by its index: atoms given in another order, or another structure,
            # would start SIESTA far off (14 SCF iterations from ml+residual on a water box whose two H were
            # swapped, 9 from the plain ML guess).
            reason = new_structure_reason(self._converged_positions, self._converged_cell, atoms)
            if reason:
                same_system = False
                if self.guess in ("reuse", "extrapolation", "ml+residual"):
                    _warn(f"siesta-dmguess: {reason}: the {self.guess} guess starts without the earlier steps' DMs")
        if not same_system:  # other elements, or the same in another order: no earlier step is this system's
            self.trajectory.clear()
        if self.guess == "atomic":
            return
        if self.guess == "reuse":  # SIESTA reads the DM it wrote at this calculator's previous step, if any (as
            # ASE's Siesta, never a .DM left in the folder by another run, nor one of other atoms)
            self._used = "reuse" if same_system and self._dm_path().is_file() else "atomic"
            return
        if self.guess.startswith("ml"):
            try:  # before the prediction's clock starts (loads the model at the first step)
                self._model(atoms)
            except DMGuessError:
                pass  # no shipped model covers the atoms: _predict meets it again and applies the fallback
        t0 = time.perf_counter()
        kind = self.guess
        if self.guess.startswith("ml"):
            self._prediction = self._predict(atoms)
            if self._prediction is not None:
                self._predicted = to_image_keyed(self._prediction.density_matrix)
            elif self.guess == "ml+residual":
                kind = "extrapolation"  # no usable prediction: the history alone still starts SIESTA closer
            else:
                self._prediction_s = time.perf_counter() - t0  # spent, though SIESTA starts from its own guess
                return
        start = self.trajectory.guess(kind, atoms.positions, self._predicted,
                                      refine=self._prediction.refined if self._prediction else None,
                                      cell=periodic_cell(atoms))
        if start is None:  # no history yet (extrapolation at the first step)
            return
        geometry = self._geometry(atoms)
        path = self._dm_path()
        if path.is_file():  # SIESTA's DM of the previous step: keep one copy, do not pile up backups
            shutil.copy(path, path.with_name(path.name + ".prev"))
        write_density_matrix(from_image_keyed(start, geometry), path, overwrite=True)
        plain = kind == "ml+residual" and self.trajectory.uses_plain_prediction()
        self._used = "ml" if plain else kind
        self._prediction_s = time.perf_counter() - t0

    def _record_converged(self) -> None:
        """Keep this step's converged DM (and prediction) for the next step's guess."""
        self._numbers = self.atoms.numbers.copy()  # the system SIESTA's .DM is now of (reuse)
        self._converged_positions = self.atoms.positions.copy()
        self._converged_cell = None if (cell := periodic_cell(self.atoms)) is None else cell.copy()
        if self.guess not in ("ml+residual", "extrapolation"):
            return
        from .dm import read_density_matrix, to_image_keyed

        try:
            geometry = self._geometry(self.atoms)
            converged = to_image_keyed(read_density_matrix(self._dm_path(), geometry))
        except (DMGuessError, OSError) as exc:
            log.warning("could not read SIESTA's converged DM (%s); the next step starts without history", exc)
            self.trajectory.clear()
            return
        self.trajectory.push(self._positions, converged, self._predicted,
                             self._prediction.history_overlap if self._prediction else None,
                             cell=periodic_cell(self.atoms), orbital_atom=geometry.o2a(np.arange(geometry.no)))

    def _apply_template(self, init: str) -> None:
        from .siesta.templates import apply_dm_init

        fdf = self.getpath(ext="fdf")
        fdf.write_text(apply_dm_init(fdf.read_text(), init))

    # -- FileIOCalculator contract ------------------------------------------
    OWN_SETTINGS = ("model", "guess", "fallback", "compare_baseline", "novelty_limit", "threads")

    def set(self, **kwargs):
        """ASE's ``set`` (which the constructor calls too), with ``pseudo_path`` made absolute: ASE 3.29 joins a
        relative one to itself and links the pseudopotentials into the run folder by that relative path. It also
        takes this calculator's own settings (:attr:`OWN_SETTINGS`, e.g. ``calc.set(guess="reuse")``), checked as
        the constructor checks them; none of them changes the converged results, so none resets them."""
        own = {key: kwargs.pop(key) for key in self.OWN_SETTINGS if key in kwargs}
        if own:
            self._set_own(**own)
        if kwargs.get("pseudo_path"):
            kwargs["pseudo_path"] = os.path.abspath(kwargs["pseudo_path"])
        before = dict(self.parameters) if hasattr(self, "trajectory") else None  # (the constructor's set: none)
        result = super().set(**kwargs)
        if before is not None and not equal(dict(self.parameters), before):  # (ASE's equal: arrays too)
            # Another basis, XC or other run settings: the earlier steps' DMs are of another calculation (their
            # orbitals, read back from the last run's .ion files, would not be the next run's: SIESTA drops them).
            self.trajectory.clear()
            self._numbers = self._converged_positions = self._converged_cell = None
        return result

    def _set_own(self, **own) -> None:
        """This calculator's own settings (:attr:`OWN_SETTINGS`), each checked before any is set."""
        if "guess" in own and own["guess"] not in self.GUESSES:
            raise ValueError(f"guess must be one of {self.GUESSES}, not {own['guess']!r}")
        if "fallback" in own and own["fallback"] not in ("error", "atomic"):
            raise ValueError(f"fallback must be 'error' or 'atomic', not {own['fallback']!r}")
        if "model" in own:  # loaded (and, under "auto", chosen) again at the next ML step
            self.model_name = _checked_model(own.pop("model"))
            self._loaded, self._loaded_for, self._auto_models = None, None, {}
        for key, value in own.items():
            setattr(self, key, value)

    def _remove_previous_pseudopotentials(self):
        """ASE links each species' pseudopotential into the run folder at every write, as ``O.1.psf`` or, where it
        found none, as a dangling ``O.1.psml``; a link from an earlier write under the other name would stay, and
        SIESTA would read that old pseudopotential. Removing ASE's links (never a file, nor a link named otherwise,
        e.g. a user's O.psf when the run folder is the working directory) lets each write start clean. With
        ``symlink_pseudos=False`` ASE copies instead: the copies this calculator's last write made go too."""
        for path in self._ase_pseudopotential_files():
            if path.is_symlink() or path.name in self._copied_pseudopotentials:
                path.unlink()
        self._copied_pseudopotentials = set()

    def _ase_pseudopotential_files(self):
        ase_name = re.compile(r"\.\d+(\.ghost)?\.(psf|psml)$")  # ASE inserts the species number: O.1.psf, O.lda.1.psf
        return [path for path in Path(self.directory).glob("*.ps*") if ase_name.search(path.name)]

    @contextmanager
    def _absolute_fallback_pseudo_path(self):
        """Without ``pseudo_path`` ASE takes its configuration's, then ``$SIESTA_PP_PATH``, and mishandles a
        relative one as in :meth:`set`: lend it, made absolute against the current directory, for one write."""
        fallback = None if self["pseudo_path"] else (self.profile.configvars.get("pseudo_path")
                                                      or self.cfg.get("SIESTA_PP_PATH"))
        if not fallback or os.path.isabs(fallback):
            yield
            return
        self.parameters["pseudo_path"] = os.path.abspath(fallback)
        try:
            yield
        finally:
            self.parameters["pseudo_path"] = None

    def write_input(self, atoms, properties=None, system_changes=None):
        from .errors import InputFileError
        from .siesta.runner import check_pseudopotentials

        # ASE writes the label as SystemLabel, and the shell command names the output by it
        if self.prefix is None or re.search(r"\s", self.prefix):
            raise InputFileError(f"the calculator's label {self.prefix!r} " + (
                "is no name: give the run one (label='siesta')" if self.prefix is None else
                "contains spaces, which SIESTA refuses (\"SystemLabel must *NOT* contain any spaces!\"): name the "
                "run without them (a directory with spaces is fine)"), Path(self.directory))
        self._remove_previous_pseudopotentials()
        before = {path.name: path.lstat().st_mtime_ns for path in self._ase_pseudopotential_files()}
        with self._absolute_fallback_pseudo_path():
            super().write_input(atoms, properties, system_changes)
        # Only files this write made (new or rewritten): a user's file under an ASE-like name is never removed.
        self._copied_pseudopotentials = {path.name for path in self._ase_pseudopotential_files()
                                         if not path.is_symlink() and before.get(path.name) != path.lstat().st_mtime_ns}
        try:  # before the prediction, and instead of SIESTA aborting on a missing file
            check_pseudopotentials(self.getpath(ext="fdf"))
        except InputFileError as exc:
            symbol, qualifier = exc.path.name.split(".")[0], self.pseudo_qualifier()
            wanted = f"{symbol}.{qualifier}.psf" if qualifier else f"{symbol}.psf"
            hint = f"; pseudo_qualifier='' takes {symbol}.psf" if qualifier else ""
            raise InputFileError(f"{exc.message} (ASE takes {wanted}, else {symbol}.psml, from the calculator's "
                                 f"pseudo_path, else $SIESTA_PP_PATH{hint})", exc.path) from None
        if self._rerun_reason:  # the SCF failed from this step's guess: run it as plain SIESTA would
            self._used, self._reason = "atomic", self._rerun_reason
        else:
            self._write_guess(atoms)
        if self._used == "atomic":
            self._dm_path().unlink(missing_ok=True)
        self._apply_template("atomic" if self._used == "atomic" else "ml")

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        if self._siesta_missing is not None:  # before the model is loaded and the guess predicted
            raise self._siesta_missing
        from ase.calculators.calculator import CalculationFailed

        from .siesta.output import parse_output

        output = Path(self.getpath(ext="out"))
        t0 = time.perf_counter()
        failed_iterations = 0
        try:
            super().calculate(atoms, properties, system_changes)
            out = parse_output(output)
            failure = "" if out.converged else "the SCF did not converge"
        except CalculationFailed as exc:
            out = parse_output(output) if output.is_file() else None
            if self._used == "atomic" or out is None or out.version is None:
                raise  # from its own guess, or SIESTA never started (no output, or an empty one: no program there)
            failure = str(exc)
        if failure and self._used != "atomic":
            # A guess must never cost the answer: SIESTA's own start decides, as it would without this package.
            n = failed_iterations = out.scf_iterations if out else 0
            after = f" after {n} SCF iteration{'s' if n > 1 else ''}" if n else ""
            self._rerun_reason = (f"SIESTA failed from the {self._used} guess{after} ({failure}); rerun from its "
                                  f"atomic guess")
            _warn(f"siesta-dmguess: {self._rerun_reason}")
            try:
                super().calculate(atoms, properties, system_changes)
            finally:
                self._rerun_reason = ""
            out = parse_output(output)
        scf_s = time.perf_counter() - t0 - self._prediction_s - self._startup_s
        self._record_converged()
        baseline = None
        if self.compare_baseline and self._used != "atomic":
            try:
                baseline = self._run_baseline()
            except (DMGuessError, OSError) as exc:  # a run for comparison only: the step itself converged
                _warn(f"siesta-dmguess: the comparison run from SIESTA's atomic guess failed ({exc}); this step's "
                      f"record has no atomic-guess count")
        pred = self._prediction
        self.guess_record = GuessRecord(self._used, out.scf_iterations, out.dm_read_from_file, self._prediction_s,
                                        scf_s, None if baseline is None else baseline.scf_iterations, self._reason,
                                        None if pred is None else pred.electron_count_error,
                                        None if pred is None else pred.novelty, startup_s=self._startup_s,
                                        failed_scf_iterations=failed_iterations,
                                        novelty_threshold=None if pred is None else pred.novelty_threshold,
                                        total_energy=out.total_energy_eV,
                                        atomic_total_energy=None if baseline is None else baseline.total_energy_eV)
        self.history.append(self.guess_record)
        self.results["guess"] = self.guess_record

    def todict(self, skip_default=True) -> dict:
        """ASE's parameters, with this calculator's own arguments, so that ``DMGuessSiesta(**calc.todict())``
        makes a calculator with the same settings. As with ASE's own ``todict``, the run folder and label
        (``directory``, ``label``) are not among them: pass them again, or the copy runs in the working directory."""
        own = {"model": self.model_name, "guess": self.guess, "fallback": self.fallback,
               "compare_baseline": self.compare_baseline, "novelty_limit": self.novelty_limit,
               "history_depth": self.trajectory.steps.maxlen, "threads": self.threads}
        own["model"] = str(own["model"]) if isinstance(own["model"], os.PathLike) else own["model"]
        return {**super().todict(skip_default), **{k: v for k, v in own.items()  # a loaded model is no parameter
                                                   if isinstance(v, (str, int, float, bool, type(None)))}}

    def _run_baseline(self):
        """SIESTA from the atomic guess on the same input, in ``<directory>/baseline``: its parsed output."""
        from .siesta import prepare_run, run_siesta

        src = self.getpath(ext="fdf")
        work = Path(self.directory) / "baseline"
        pseudo_dirs = [Path(self.directory)]
        fdf = prepare_run(src, work, "atomic", pseudo_dirs=pseudo_dirs)
        return run_siesta(fdf, command=self._siesta_command()).output

    def _siesta_command(self):
        """The command this calculator runs SIESTA with (ASE profile), so the baseline uses the same binary."""
        profile = getattr(self, "profile", None)
        command = getattr(profile, "command", None) or getattr(self, "command", None)
        if isinstance(command, (list, tuple)):
            command = " ".join(command)
        return command
