"""ASE calculator: predict the DM, write ``<label>.DM``, run SIESTA from it.

:class:`DMGuessSiesta` is ASE's :class:`ase.calculators.siesta.Siesta` (same
constructor arguments: species, basis_set, xc, kpts, fdf_arguments, ...) plus

* ``model``: a shipped model name or a model folder;
* ``guess``: ``"ml"`` (the prediction for every geometry), ``"ml+residual"``
  (for MD/relaxations: the prediction plus the previous step's correction
  D_scf(prev) - D_ml(prev), Γ-only), or ``"atomic"``;
* ``fallback``: ``"error"`` (default) or ``"atomic"``: what to do when the model
  does not cover the structure (species, basis, settings) — the atomic guess is
  used with a warning that says why;
* ``compare_baseline``: also run SIESTA from the atomic guess (in a sub-folder)
  and record the iterations saved;
* ``novelty_limit``: with ``fallback="atomic"``, use the atomic guess when the
  structure's novelty score (see ``Prediction.novelty``) exceeds this value
  (``"model"``: the model card's threshold; ``None``: never).

After each calculation ``calc.guess_record`` (a :class:`GuessRecord`) holds the
SCF iterations, whether SIESTA read the DM, prediction and SCF times. The guess
never changes SIESTA's settings, so the converged answer is the same.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ase.calculators.siesta import Siesta

from .errors import DMGuessError

log = logging.getLogger(__name__)


@dataclass
class GuessRecord:
    guess: str  # what was used: ml, ml+residual, atomic
    scf_iterations: int
    dm_read: bool
    prediction_s: float
    scf_s: float
    atomic_scf_iterations: int | None = None
    reason: str = ""  # why a fallback happened

    @property
    def iterations_saved(self) -> int | None:
        if self.atomic_scf_iterations is None:
            return None
        return self.atomic_scf_iterations - self.scf_iterations


class DMGuessSiesta(Siesta):
    """ASE's SIESTA calculator that starts every SCF from an ML-predicted density matrix."""

    def __init__(self, *args, model="water", guess: str = "ml", fallback: str = "error",
                 compare_baseline: bool = False, novelty_limit="model", **kwargs):
        super().__init__(*args, **kwargs)
        if guess not in ("ml", "ml+residual", "atomic"):
            raise ValueError(f"guess must be 'ml', 'ml+residual' or 'atomic', not {guess!r}")
        if fallback not in ("error", "atomic"):
            raise ValueError(f"fallback must be 'error' or 'atomic', not {fallback!r}")
        self.model_name = model
        self.guess = guess
        self.fallback = fallback
        self.compare_baseline = compare_baseline
        self.novelty_limit = novelty_limit
        self.guess_record: GuessRecord | None = None
        self.history: list[GuessRecord] = []
        self._loaded = None
        self._used = "atomic"
        self._prediction_s = 0.0
        self._reason = ""
        self._previous = None  # (ml prediction csr, structure labels) of the last step

    # -- helpers -------------------------------------------------------------
    def _model(self):
        if self._loaded is None:
            from .card import LoadedModel, load_model

            m = self.model_name
            self._loaded = m if isinstance(m, LoadedModel) else load_model(m)
        return self._loaded

    def _dm_path(self) -> Path:
        return Path(self.directory) / f"{self.prefix}.DM"

    def _write_guess(self, atoms) -> None:
        """Predict and write <prefix>.DM, or fall back to the atomic guess."""
        from .dm import write_density_matrix
        from .predict import predict_density_matrix
        from .structure import structure_from_atoms

        self._used, self._reason, self._prediction_s = "atomic", "", 0.0
        if self.guess == "atomic":
            return
        structure = structure_from_atoms(atoms)
        kpts = self["kpts"]
        gamma_only = kpts is None or all(int(k) == 1 for k in kpts)
        t0 = time.perf_counter()
        try:
            pred = predict_density_matrix(structure, self._model(), fold=gamma_only)
        except DMGuessError as exc:
            if self.fallback == "error":
                raise
            self._reason = str(exc)
            warnings.warn(f"siesta-dmguess: using SIESTA's atomic guess because {exc}", stacklevel=3)
            return
        limit = pred.novelty_threshold if self.novelty_limit == "model" else self.novelty_limit
        if self.fallback == "atomic" and limit and pred.novelty > limit:
            self._reason = f"the structure looks unlike the model's training data (novelty {pred.novelty:.1f} > {limit:.1f})"
            warnings.warn(f"siesta-dmguess: using SIESTA's atomic guess because {self._reason}", stacklevel=3)
            return
        dm = pred.density_matrix
        path = self._dm_path()
        if self.guess == "ml+residual" and gamma_only and path.is_file() and self._previous is not None:
            dm = self._add_residual(dm, path)
        if path.is_file():  # SIESTA's DM of the previous step: keep one copy, do not pile up backups
            shutil.copy(path, path.with_name(path.name + ".prev"))
        write_density_matrix(dm, path, overwrite=True)
        self._previous = pred.density_matrix.copy()
        self._used = self.guess
        self._prediction_s = time.perf_counter() - t0

    def _add_residual(self, dm, path: Path):
        """ML(now) + [SCF(prev) - ML(prev)] on the elements of ML(now) (folded, same orbital count)."""
        import sisl

        from .dm import read_density_matrix

        try:
            scf_prev = read_density_matrix(path, self._previous.geometry).tocsr(0)
        except DMGuessError as exc:
            log.warning("ml+residual: previous DM unusable (%s); using the plain ML guess", exc)
            return dm
        residual = scf_prev - self._previous.tocsr(0)
        new = dm.tocsr(0)
        mask = new.copy()
        mask.data[:] = 1.0
        combined = new + residual.multiply(mask)
        return sisl.DensityMatrix.fromsp(dm.geometry, [combined.tocsr()])

    def _apply_template(self, init: str) -> None:
        from .siesta.templates import apply_dm_init

        fdf = self.getpath(ext="fdf")
        fdf.write_text(apply_dm_init(fdf.read_text(), init))

    # -- FileIOCalculator contract ------------------------------------------
    def write_input(self, atoms, properties=None, system_changes=None):
        super().write_input(atoms, properties, system_changes)
        self._write_guess(atoms)
        if self._used == "atomic":
            self._dm_path().unlink(missing_ok=True)
        self._apply_template("atomic" if self._used == "atomic" else "ml")

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        t0 = time.perf_counter()
        super().calculate(atoms, properties, system_changes)
        scf_s = time.perf_counter() - t0 - self._prediction_s
        from .siesta.output import parse_output

        out = parse_output(self.getpath(ext="out"))
        baseline = self._run_baseline() if self.compare_baseline and self._used != "atomic" else None
        self.guess_record = GuessRecord(self._used, out.scf_iterations, out.dm_read_from_file, self._prediction_s,
                                        scf_s, baseline, self._reason)
        self.history.append(self.guess_record)
        self.results["guess"] = self.guess_record

    def _run_baseline(self) -> int:
        """SIESTA from the atomic guess on the same input, in ``<directory>/baseline``."""
        from .siesta import prepare_run, run_siesta

        src = self.getpath(ext="fdf")
        work = Path(self.directory) / "baseline"
        pseudo_dirs = [Path(self.directory)]
        fdf = prepare_run(src, work, "atomic", pseudo_dirs=pseudo_dirs)
        return run_siesta(fdf, command=self._siesta_command()).output.scf_iterations

    def _siesta_command(self):
        """The command this calculator runs SIESTA with (ASE profile), so the baseline uses the same binary."""
        profile = getattr(self, "profile", None)
        command = getattr(profile, "command", None) or getattr(self, "command", None)
        if isinstance(command, (list, tuple)):
            command = " ".join(command)
        return command
