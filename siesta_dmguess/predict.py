"""Prediction: structure + model -> sisl DensityMatrix -> SIESTA ``.DM`` file.

Before predicting, :func:`~siesta_dmguess.guard.check_compatibility` compares what can be known about the run
with the model card (species, basis, settings, pseudopotentials); ``--model auto`` chooses the shipped model
(:func:`choose_model`). A :class:`Prediction` then says whether it should be used (novelty, the k-sampling the
model trained on, a clear occupied space).
"""

from __future__ import annotations

import contextvars
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from .card import LoadedModel, load_model
from .data import Sample, prepare_sample
from .dm import check_dm_output, density_matrix_from_flat, flat_to_csr, to_image_keyed, write_density_matrix
from .errors import DMGuessError, InputFileError, ModelCompatibilityError, UnreliablePredictionError
from .files import move_to_backup
from .evaluate import predict_flat
from .refine import MIN_OCCUPATION_GAP, is_kpoint, projection_skipped, refine_folded
from .guard import check_compatibility, model_species_of, shipped_models_covering
from .structure import Structure, check_geometry, read_structure

log = logging.getLogger(__name__)

# Set while choose_model tries a model's prediction: its messages are the trial's, and the chosen model's own
# prediction gives them afterwards. A context variable (not the logger's level) so that other threads still log.
_in_trial = contextvars.ContextVar("siesta_dmguess_trial_prediction", default=False)
log.addFilter(lambda record: not _in_trial.get())

# Novelty, in multiples of a model's flag level, beyond which its prediction is not used unless forced. Measured on
# the unseen sets (README): every structure where the ML guess saved iterations, or at worst cost one, scored at
# most 17x its model's flag level (a benzene-water complex, 37.7 against 2.24); silicon interstitials, which no
# training cell of the `silicon` models had and where the guess of the one with weights 41c0dfb1... cost 4-11
# iterations (raw Tr(D S) off by 7-21 electrons, elements off by up to 26), scored 1300-3600x (that model and the
# shipped one). The factor sits between the two.
FAR_NOVELTY_FACTOR = 100.0


@contextmanager
def torch_threads(n: int | None):
    """Run torch on ``n`` threads inside the block, then restore the setting (None or 0: leave it).

    torch uses one thread per core by default. Where other programs keep cores busy (several SIESTA runs at once),
    its threads wait on each other: on 2 cores with one kept busy, a prediction took 3.5-4.5x longer on two threads
    than on one (``integration/benchmarks/predict_threads.py``), while on the idle machine two threads were up to
    1.5x faster.
    """
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Prediction:
    """A predicted DM and what it took to make it."""

    structure: Structure
    sample: Sample
    values: np.ndarray  # flat SIESTA-basis values (see dm.BlockLayout)
    density_matrix: object  # sisl.DensityMatrix
    model_path: Path
    folded: bool
    seconds: float
    warnings: list = field(default_factory=list)
    sample_basis: dict = field(default_factory=dict, repr=False)
    novelty: float = 0.0  # largest per-atom out-of-distribution score (≈1 for training-like atoms)
    novelty_threshold: float = 0.0  # the model's flag level (99.5% of training atoms score below it)
    overlap: np.ndarray | None = None  # flat S (same layout as ``values``), computed from the basis
    electrons_expected: float = 0.0  # valence electrons minus the fdf's NetCharge: what Tr(D S) must be
    electrons_predicted: float | None = None  # Tr(D S) of the raw prediction, before refinement
    refinement: str = "none"  # what refine.refine did to the written DM: "idempotent", "charge" or "none"
    refinement_note: str = ""  # why an idempotent projection fell back to charge normalization
    occupation_gap: float | None = None  # the projection's HOMO-LUMO gap: of natural occupations, or ΔH-steered (Γ)
    sampling_reason: str = ""  # why the run's k-sampling lies outside the model's training runs ("" when it does not)
    pure_on_validation: bool = False  # every validation DM of the model (card) had a clear occupation gap

    @property
    def electron_count_error(self) -> float | None:
        """Tr(D S) - N of the raw prediction: a cheap, physics-based uncertainty (0 for a perfect DM)."""
        if self.electrons_predicted is None:
            return None
        return self.electrons_predicted - self.electrons_expected

    def mulliken_charges(self) -> np.ndarray:
        """Mulliken net charge per atom (e) of the written DM; needs the overlap."""
        from .overlap import mulliken_charges

        if self.overlap is None:
            raise ValueError("no overlap: the model carries no radial functions")
        valence = np.array([b.valence for b in (self.sample_basis[l] for l in self.structure.labels)])
        return mulliken_charges(self.sample.layout, self.values, self.overlap, self.folded, valence)

    def refined(self, density):
        """Refine another DM of this structure in the trajectory history's layout (folded, or image-keyed for
        k-points: :func:`~siesta_dmguess.dm.to_image_keyed`), e.g. a guess built on this prediction, the way the
        prediction itself was refined (a k-point DM is charge-scaled); unchanged without an overlap."""
        if self.overlap is None or self.refinement == "none":
            return density
        # k-points: no projection at Γ applies, only the charge scaling
        mode = self.refinement if self.folded else "charge"
        return refine_folded(density, self.keyed_overlap, self.electrons_expected, mode)[0]

    @cached_property
    def keyed_overlap(self):
        """S in the trajectory history's layout, the one of ``to_image_keyed(self.density_matrix)``: folded CSR for
        Γ-only and molecular runs, image-keyed for k-point runs; None without an overlap."""
        if self.overlap is None:
            return None
        if self.folded:
            return flat_to_csr(self.sample.layout, self.overlap, True)
        return to_image_keyed(density_matrix_from_flat(self.structure, self.sample_basis, self.sample.layout,
                                                       self.overlap, False, self.sample.in_siesta_pattern))

    @property
    def history_overlap(self):
        """S for the history's density-error weights (:attr:`keyed_overlap`) for Γ-only and molecular runs; None
        for k-point runs (their image-keyed layout has no product with S) or without an overlap."""
        return self.keyed_overlap if self.folded else None

    @property
    def out_of_distribution(self) -> bool:
        return self.novelty_threshold > 0 and self.novelty > self.novelty_threshold

    @property
    def far_out_of_distribution(self) -> bool:
        """Novelty above :data:`FAR_NOVELTY_FACTOR` times the flag level: the prediction is not used by default."""
        return self.novelty_threshold > 0 and self.novelty > FAR_NOVELTY_FACTOR * self.novelty_threshold

    @property
    def refusal_reason(self) -> str:
        """Why this prediction is not used by default ("" when it is): the one message that ``predict``, the ASE
        calculator and ``bench`` give for a structure far outside the training data, for a run whose k-sampling
        the model has not seen (:attr:`sampling_reason`), or for a DM with no clear occupied space
        (:attr:`mixed_reason`)."""
        return next(iter(self.refusals.values()), "")

    @property
    def refusal_kind(self) -> str:
        """:attr:`refusal_reason` in one word for tables: "far", "k-sampling", "mixed", or "" when the prediction
        is used."""
        return next(iter(self.refusals), "")

    @property
    def refusals(self) -> dict[str, str]:
        """Every reason not to use this prediction, by kind ("far", "k-sampling", "mixed"), most serious first."""
        reasons = {"far": self.far_reason, "k-sampling": self.sampling_reason, "mixed": self.mixed_reason}
        return {kind: reason for kind, reason in reasons.items() if reason}

    @property
    def mixed_reason(self) -> str:
        """Why a DM with no clear occupied space is not used ("" when it is). The idempotent projection looks for
        the N/2 most occupied natural orbitals; where the raw DM's HOMO and LUMO occupations differ by less than
        :data:`~siesta_dmguess.refine.MIN_OCCUPATION_GAP` (1 for a pure state), the model does not say which
        states hold the electrons, as where a bond breaks. Measured on the unseen sets (``docs/benchmarks.md``,
        "Bonds breaking"): all 14 such structures, stretched CHNO molecules and water, and S22 complexes, took
        as many SIESTA iterations from the ML guess in total as from the atomic guess (+1), three of them more,
        while every near-equilibrium structure measured had a gap of 0.55 or more. Only known where the
        projection was tried (Γ-only and molecular runs, even electron count, up to its size limit), and only
        for a model whose own validation DMs all had a clear gap (:attr:`pure_on_validation`): a model of k-point
        crystals (`silicon`) predicts DMs that are not pure states at Γ even where its guess helps (``si64-gamma``:
        gap 0.43-0.50, 27 → 22 iterations)."""
        if not self.pure_on_validation or self.occupation_gap is None or self.refinement == "idempotent" \
                or self.occupation_gap >= MIN_OCCUPATION_GAP:
            return ""
        net = -expected_electrons(self.structure, 0.0)  # the fdf's NetCharge
        if net:  # the model's DM holds the neutral structure's states: the gap falls between two occupied ones
            return (f"the fdf's NetCharge {net:g} leaves {self.electrons_expected:g} electrons, and the model's DM, "
                    f"like the neutral structures it learned, has no clear occupied space for them (HOMO-LUMO "
                    f"natural-occupation gap {self.occupation_gap:.3f} < {MIN_OCCUPATION_GAP}): charged structures "
                    "are not what the models learned")
        return (f"the model's DM has no clear occupied space (HOMO-LUMO natural-occupation gap "
                f"{self.occupation_gap:.3f} < {MIN_OCCUPATION_GAP}; a pure state has 1), as where a bond breaks: "
                "such guesses saved SIESTA no iterations in total and cost some")

    @property
    def far_reason(self) -> str:
        """Why a structure far outside the training data gets no predicted DM ("" when it is not)."""
        if not self.far_out_of_distribution:
            return ""
        return (f"far outside the training data of model {self.model_path.name} (novelty {self.novelty:.0f}, more "
                f"than {FAR_NOVELTY_FACTOR:.0f}x its flag level {self.novelty_threshold:.2f}), where predictions start "
                f"SIESTA further from the answer than its atomic guess")


# ``--model auto`` (``model="auto"``): the shipped model is chosen from the structure (:func:`choose_model`).
AUTO_MODEL = "auto"


# How much less novel (in multiples of each model's flag level) a structure must be to a less specialized covering
# model for ``auto`` to pass over the more specialized one it lies outside of. Stretched water molecules score
# alike for `water` and `chno-molecules` (1.7x and 1.7x, 2.0x and 1.9x), and there `water`'s guesses took as many
# SIESTA iterations or one fewer (`h2o-stretched`: 56 in all, 57 with `chno-molecules` for the three most
# stretched); H2O2 and O3 score 2.9-21x for `water` and 0.2-1.1x for `chno-molecules`, whose guess starts SIESTA
# where `water`'s is refused (integration/benchmarks/auto_choice.py prints these scores).
CHOICE_NOVELTY_FACTOR = 2.0


def choose_model(structure: Structure, load=None) -> str:
    """The shipped model ``auto`` stands for. Of the shipped models that cover every species of the structure
    (:func:`shipped_models_covering`, most specialized first), the first, unless the structure lies outside its
    training data (novelty score above the model's flag level, :func:`structure_novelty`) and another covering
    model finds it at least :data:`CHOICE_NOVELTY_FACTOR` times less novel (novelty in multiples of each model's
    flag level); then the one it is least novel to. So water gets `water` rather than `chno-molecules`, which
    also covers it, while H2O2 or O3, which `water` never saw (novelty 2.9-21x its flag level against 0.2-1.1x for
    `chno-molecules` in `g2`), get `chno-molecules`. And where the structure is novel to the most specialized
    covering model, a model whose prediction would be refused (:attr:`Prediction.refusals`) gives way to the next
    covering model whose prediction would not (:func:`_first_usable`). Where one model covers the species, it is
    chosen without being run. ``load``: name → :class:`~siesta_dmguess.card.LoadedModel` (default: each shipped
    model loaded once per process).

    The chosen model's basis and settings are then checked as those of a model named by hand, so a run with
    another basis still gets the error that names the difference."""
    from .card import list_shipped_models, read_card

    covering = shipped_models_covering(structure)
    if not covering:
        shipped = ", ".join(f"{name} {read_card(name).get('species')}" for name in list_shipped_models())
        raise ModelCompatibilityError(f"no shipped model covers species {sorted(set(structure.labels))} "
                                      f"(shipped: {shipped}); train one with 'siesta-dmguess train'",
                                      structure.source or None)
    if len(covering) == 1:
        return covering[0]
    check_geometry(structure)  # before any model looks at it: its error beats a failed novelty score
    load = load or _shipped_model
    relative = {}
    for name in covering:
        novelty, threshold = structure_novelty(structure, load(name))
        relative[name] = novelty / threshold if threshold > 0 else 0.0  # a model with no flag level: taken as is
        if relative[name] <= 1.0:
            break
    least_novel = min(relative, key=relative.get)
    first = relative[covering[0]]
    chosen = least_novel if first > 1.0 and relative[least_novel] * CHOICE_NOVELTY_FACTOR < first else covering[0]
    by_novelty = chosen
    if first > 1.0:  # novel to the first model: a refused guess from it is worth another model's usable one
        chosen = _first_usable(structure, [chosen] + [name for name in covering if name != chosen], load)
    if chosen != covering[0]:
        log.info("%s: model %s chosen over %s (novelty %s of each model's flag level%s)", structure.source or
                 "structure", chosen, ", ".join(covering[:covering.index(chosen)]),
                 ", ".join(f"{n} {r:.2f}x" for n, r in relative.items()),
                 "" if chosen == by_novelty else f"; {by_novelty}'s prediction would be refused")
    return chosen


def _first_usable(structure: Structure, names: list[str], load) -> str:
    """The first of ``names`` whose prediction for the structure would be used (no :attr:`Prediction.refusals`),
    else the first. Run only for a structure novel to the most specialized covering model, so ordinary structures
    pay no prediction for it. Measured: a `g2-stress` H2O2 (rattled 0.08 Å) scores 2.9x `water`'s flag level and
    3.2x `chno-molecules'`; `water`'s DM has no clear occupied space there (SIESTA from its atomic guess, 11
    iterations), `chno-molecules'` does and starts SIESTA 3 iterations closer (8)."""
    token = _in_trial.set(True)
    try:
        for name in names:
            try:
                if not predict_density_matrix(structure, load(name)).refusals:
                    return name
            except DMGuessError:  # this model cannot take the structure (basis, settings): the next may
                continue
        return names[0]
    finally:
        _in_trial.reset(token)


@lru_cache(maxsize=None)
def _shipped_model(name: str) -> LoadedModel:
    return load_model(name)


def structure_novelty(structure: Structure, loaded: LoadedModel) -> tuple[float, float]:
    """The structure's novelty score for a model (largest per-atom score, as :attr:`Prediction.novelty`) and the
    model's flag level, from the network's atom features alone: no DM is assembled or refined."""
    import torch

    from .model import collate

    model = loaded.model
    _, sample = model_sample(structure, loaded, fold=not structure.fdf_settings.get("kgrid", False))
    batch = collate([sample], len(model.species), next(model.parameters()).dtype, with_targets=False)
    with torch.no_grad():
        return float(model.novelty(batch).max()), float(model.novelty_threshold)


def model_sample(structure: Structure, loaded: LoadedModel, fold: bool) -> tuple[Structure, Sample]:
    """The structure with its species labels as the model names them (``Ow`` → ``O``, :func:`model_species_of_labels`)
    and its graph and block layout for the model."""
    species_of = model_species_of(structure, loaded)
    if any(species not in (None, label) for label, species in species_of.items()):
        structure = replace(structure, labels=[species_of[label] or label for label in structure.labels])
    cfg = loaded.config
    return structure, prepare_sample(structure, loaded.basis, cfg.species, cfg.message_cutoff, name=structure.source,
                                     fold_reach=cfg.fold_reach, fold=fold)


class AutoModels:
    """``auto`` for a batch of structures: each gets the shipped model :func:`choose_model` picks for it, each model
    loaded once (a batch may mix water, CHNO molecules and silicon). With ``warm`` each is also warmed up
    (:func:`~siesta_dmguess.card.ready_model`) and its start-up seconds kept in ``startup_s``."""

    def __init__(self, warm: bool = True, **load_options):
        self.warm, self.load_options = warm, load_options
        self.loaded: dict[str, LoadedModel] = {}
        self.startup_s: dict[str, float] = {}

    def for_structure(self, structure: Structure) -> LoadedModel:
        return self.model(choose_model(structure, load=self.model))

    def model(self, name: str) -> LoadedModel:
        """The shipped model ``name``, loaded (and warmed up) on first use."""
        if name not in self.loaded:
            if self.warm:
                from .card import ready_model

                self.loaded[name], self.startup_s[name] = ready_model(name, **self.load_options)
            else:
                self.loaded[name] = load_model(name, **self.load_options)
        return self.loaded[name]


def _is_auto(model) -> bool:
    return isinstance(model, str) and model == AUTO_MODEL


def _as_structure(structure) -> Structure:
    """A :class:`Structure` from a Structure, a file, or ASE Atoms as the calculator runs them."""
    if isinstance(structure, Structure):
        return structure
    from ase import Atoms

    from .structure import structure_as_siesta_runs

    return structure_as_siesta_runs(structure) if isinstance(structure, Atoms) else read_structure(structure)


def resolve_auto_model(model, structure):
    """``model`` as given, or for ``"auto"`` the shipped model's name :func:`choose_model` picks for ``structure``
    (a :class:`Structure`, a file, or ASE Atoms as the calculator runs them; read only for ``"auto"``)."""
    return choose_model(_as_structure(structure)) if _is_auto(model) else model


def ready_chosen_model(model, structure) -> tuple[LoadedModel, float]:
    """:func:`~siesta_dmguess.card.ready_model` for ``model``, where ``"auto"`` is the shipped model
    :func:`choose_model` picks for ``structure`` (as :func:`resolve_auto_model` takes it). The seconds include
    choosing, which loads and runs each covering model it tries: the start-up the calculator and a trajectory
    ``bench`` pay once."""
    from .card import ready_model

    if not _is_auto(model):
        return ready_model(model)
    t0 = time.perf_counter()
    loaded = AutoModels().for_structure(_as_structure(structure))
    return loaded, time.perf_counter() - t0


def predict_density_matrix(structure: Structure | str | Path, model: LoadedModel | str | Path = AUTO_MODEL,
                           fold: bool | None = None, force: bool = False, refine: str = "idempotent") -> Prediction:
    """Predict the DM of a structure (an fdf, any ASE-readable file, ASE Atoms as ASE's Siesta runs them, or a
    :class:`Structure`) with ``model`` (a
    loaded model, a model folder, a shipped model's name, or ``"auto"``: :func:`choose_model`).

    ``fold=None`` folds periodic images into the unit cell for Γ-only inputs (the
    form SIESTA itself writes) and keeps them for k-point runs (an fdf with a
    ``kgrid`` block) and for structures with no periodic images.

    ``refine`` (see :mod:`siesta_dmguess.refine`) makes the DM exact where physics
    allows, with S computed from the model's basis: ``"idempotent"`` (default) projects
    it onto the nearest pure state with the right electron count (Γ-only and molecular
    DMs with a clear gap), falling back to ``"charge"``, which scales it so that
    Tr(D S) equals the valence electron count minus the fdf's ``NetCharge``. SIESTA
    rescales a DM whose charge is off anyway, but then skips mixing in its first SCF
    step (``normalize_dm.F90``), which costs an iteration. The raw prediction's
    Tr(D S) - N is kept as ``Prediction.electron_count_error``.
    """
    t0 = time.perf_counter()
    structure = _as_structure(structure)
    check_geometry(structure)
    if _is_auto(model):  # choose_model loaded the shipped models it tried once per process: reuse the chosen one
        loaded = _shipped_model(choose_model(structure))
    else:
        loaded = model if isinstance(model, LoadedModel) else load_model(model)
    warnings = check_compatibility(structure, loaded, force=force)
    asked_fold = fold
    if fold is None:
        fold = not structure.fdf_settings.get("kgrid", False)
    structure, sample = model_sample(structure, loaded, fold)
    problem = _fold_problem(structure, sample.layout, asked_fold)
    if problem:
        if not force:
            raise InputFileError(f"{problem}; leave --fold at auto (or --force)", structure.source or None)
        warnings.append(problem)
        log.warning("--force: %s", problem)
    n_expected = expected_electrons(structure, sample.layout.atomic.sum())
    sampling_reason = _sampling_reason(sample, loaded)
    # The ΔH head only steers the dense projection: skip it where that will not run (keeps large systems O(N)).
    wants_correction = loaded.overlap is not None and not projection_skipped(
        refine, sample.layout.no, is_kpoint(sample.layout, fold), n_expected)
    novelty: list[float] = []
    corrections: list = []
    values = predict_flat(loaded.model, [sample], dtype=next(loaded.model.parameters()).dtype, novelty=novelty,
                          corrections=corrections if wants_correction else None)[0]
    overlap, n_predicted, done = None, None, None
    if loaded.overlap is not None:
        from .refine import refine as refine_dm

        overlap = loaded.overlap.flat(structure, sample.layout)
        done = refine_dm(sample.layout, values, overlap, n_expected, fold, refine,
                         corrections[0] if corrections else None)
        values, n_predicted = done.values, done.electrons_raw
        if done.reason:
            log.info("%s: idempotent projection skipped: %s; DM charge-normalized", structure.source or "structure",
                     done.reason)
    elif refine != "none":
        log.info("model %s carries no radial functions: the DM is not refined", loaded.path.name)
    dm = density_matrix_from_flat(structure, loaded.basis, sample.layout, values, fold, sample.in_siesta_pattern)
    pred = Prediction(structure, sample, values, dm, loaded.path, fold, time.perf_counter() - t0, warnings,
                      sample_basis=loaded.basis, novelty=novelty[0],
                      novelty_threshold=float(loaded.model.novelty_threshold), overlap=overlap,
                      electrons_expected=n_expected, electrons_predicted=n_predicted,
                      refinement=done.applied if done else "none", refinement_note=done.reason if done else "",
                      occupation_gap=done.occupation_gap if done else None, sampling_reason=sampling_reason,
                      pure_on_validation=_pure_on_validation(loaded.card))
    if pred.out_of_distribution:
        log.warning("%s looks unlike the training data of %s (novelty %.1f > %.1f): the guess may be poor",
                    structure.source or "structure", loaded.path.name, pred.novelty, pred.novelty_threshold)
    return pred


def _fold_problem(structure: Structure, layout, asked_fold: bool | None) -> str:
    """Why a fold asked for explicitly (``--fold yes/no``) does not fit the sampling the fdf runs ("" if it does,
    or nothing says: a structure file without an fdf). SIESTA reads either DM ("Succeeded") and takes a folded one
    as the crystal's or an unfolded one as a Γ DM, a start worse than the right one's: `si8/0004` (k-points)
    folded 9 SCF iterations, as predicted 7, atomic guess 10; `water8/0004` (Γ only) unfolded 13, as predicted 9,
    atomic guess 12 (2026-12-07)."""
    if asked_fold is None or "kgrid" not in structure.fdf_settings or int(np.prod(layout.nsc)) == 1:
        return ""  # auto, no fdf, or no periodic image in the DM: folding changes nothing
    kgrid = bool(structure.fdf_settings["kgrid"])
    if asked_fold and kgrid:
        return ("the fdf runs k-points, where SIESTA keeps the DM's periodic images, and --fold yes folds them "
                "into the cell: a start worse than the unfolded one's")
    if not asked_fold and not kgrid:
        return ("the fdf runs at Γ only, where SIESTA folds the DM's periodic images into the cell, and --fold no "
                "keeps them: a start worse than the folded one's, and than SIESTA's atomic guess on a water box")
    return ""


def _pure_on_validation(card: dict) -> bool:
    """Whether every validation DM in the model card was refined by the idempotent projection, i.e. had a clear
    occupation gap (``validation.refinements``, written by ``train`` and ``evaluate``)."""
    refinements = card.get("validation", {}).get("refinements") or {}
    return set(refinements) == {"idempotent"}


def _sampling_reason(sample, loaded: LoadedModel) -> str:
    """Why the run's k-sampling lies outside the model's training runs, or "".

    A run that samples the crystal with a period shorter than its DM's range (a Γ-only run of a small cell) has a
    DM that sums each orbital pair over images at different distances. A model trained only on finely sampled
    runs (its card's ``training.aliased_sampling`` is false, e.g. `silicon`, trained on k-point runs) knows the
    crystal's DM, and there that is no better start than SIESTA's atomic guess: on four `si8` val cells run at Γ
    only (period 5.4 Å, DM range 7.8 Å), SIESTA took 52 iterations from the atomic guess, 52 from the k-converged
    DM folded onto the cell and 53 from the `silicon` model; on the same cells with 2x2x2 k-points (period 10.9 Å)
    the model saved 31 % (``docs/benchmarks.md``). Cards without the field (models trained before it) are not
    checked.
    """
    from .data import dm_range, is_aliased, sampling_period

    if loaded.card.get("training", {}).get("aliased_sampling", True) or not is_aliased(sample):
        return ""
    sampling = (f"a sampling period of {sampling_period(sample):.2f} Å, shorter than the {dm_range(sample):.2f} Å its DM "
                f"reaches, which model {loaded.path.name} never trained on: there even the crystal's converged DM "
                f"starts SIESTA no closer than its atomic guess")
    if "k_supercell_length" not in sample.structure.fdf_settings:  # a structure file: its k-points are unknown
        return (f"without an fdf (a structure file has no k-points) the run is taken as Γ-only ({sampling}); for a "
                f"k-point run, predict with --fold no (or from the run's fdf)")
    return f"the run's k-grid gives the crystal {sampling} (more k-points, or a larger cell, fix it)"


def expected_electrons(structure: Structure, neutral: float) -> float:
    """What Tr(D S) of the run's DM is: the neutral structure's valence electrons (``neutral``, the sum of its
    atoms' q0, e.g. ``layout.atomic.sum()``) minus the fdf's NetCharge. predict, evaluate and train's ΔH head all
    refine to this count."""
    net = structure.fdf_settings.get("NetCharge")
    if net is None:
        return float(neutral)
    try:
        charge = float(str(net).split()[0].lower().replace("d", "e"))
    except (ValueError, IndexError):  # SIESTA stops on it too: the DM's electron count would be a guess
        charge = float("nan")
    if not np.isfinite(charge):
        raise InputFileError(f"NetCharge {net!r} is not a number", structure.source or None)
    return float(neutral) - charge


def default_dm_path(structure: str | Path) -> Path:
    """Where ``predict`` writes without ``-o``: for an fdf, the ``<SystemLabel>.DM`` next to it (the file SIESTA
    reads with ``DM.UseSaveDM T``; where the fdf names another in ``File.DM.Init``, a note says so rather than write
    into another run's folder); for any other structure file, the same name with suffix ``.DM`` (a frame
    ``md.traj@3``: ``md@3.DM``)."""
    from .fdf import resolve_fdf, siesta_dm_path
    from .structure import frame_selection

    structure = resolve_fdf(structure)
    if structure.suffix.lower() == ".fdf" and structure.is_file():
        return siesta_dm_path(structure)
    file, index = frame_selection(structure)
    if index != ":":  # one frame of a trajectory (md.traj@3): its own file, md@3.DM
        return file.with_name(f"{file.stem}@{index}.DM")
    return structure.with_suffix(".DM")


# Said of a DM predicted from a structure file (not an fdf): the same for every such file.
STRUCTURE_FILE_NOTE = ("SIESTA reads <SystemLabel>.DM from the folder it runs in, with DM.UseSaveDM T, for atoms in "
                       "this file's order: copy the DM there under that name (predicting from the run's fdf does "
                       "this)")


@dataclass
class RunPrediction:
    """What :func:`predict_for_run` did: the prediction, the file written, and what the user should know (where
    SIESTA takes the atoms from, whether and where it reads the DM, an fdf edited)."""

    prediction: Prediction
    out: Path
    notes: list[str]
    fdf: Path | None = None  # the run's fdf, where the structure is one
    fdf_backup: Path | None = None  # with edit_fdf: the fdf was given DM.UseSaveDM T, its original kept here


def _run_reading(out: Path) -> Path | None:
    """The fdf of the run folder ``out`` is in where SIESTA would read ``out`` as its starting DM, or None."""
    from .fdf import find_fdf, siesta_dm_init_path

    try:
        fdf = find_fdf(out.parent)
        return fdf if siesta_dm_init_path(fdf).resolve() == out.resolve() else None
    except InputFileError:  # no fdf there (or several): no run to compare with
        return None


def predict_for_run(structure: str | Path, out: str | Path | None = None, model=AUTO_MODEL, overwrite: bool = False,
                    fold: bool | None = None, force: bool = False, refine: str = "idempotent",
                    edit_fdf: bool = False) -> RunPrediction:
    """Predict the DM of a structure file or SIESTA run (an fdf or its folder) and write it for SIESTA: what
    ``siesta-dmguess predict`` does for each structure it is given.

    ``out``: the ``.DM`` to write, an existing folder to write it into under :func:`default_dm_path`'s name, or
    None for that default (beside an fdf: the file SIESTA reads). An fdf whose run takes its atoms from a saved
    file (``MD.UseSaveXV T`` and its ``.XV``) is predicted for those atoms. ``model``: a loaded model, a name or
    folder, ``"auto"``, or a function of the :class:`Structure` that returns a loaded model (a batch choosing
    each structure's). ``edit_fdf``: where the DM is where SIESTA looks but the fdf does not read it, put
    ``DM.UseSaveDM T`` on the fdf's first line (the original kept as a backup). Errors as
    :func:`predict_to_file`.
    """
    from .fdf import resolve_fdf, siesta_dm_init_path
    from .siesta.runner import check_pseudopotentials
    from .siesta.templates import dm_read_note, enable_dm_read, saved_geometry_note
    from .structure import as_atoms_of_run, read_run_structure, run_fdf_of

    if out is None:
        out = default_dm_path(structure)
    elif Path(out).is_dir() or str(out).endswith(("/", os.sep)):  # a folder: the DM under its default name in it
        if not Path(out).is_dir():
            raise InputFileError("no such folder to write the DM into", out)
        out = Path(out) / default_dm_path(structure).name
    out = Path(out)
    source = resolve_fdf(structure)
    is_fdf = source.suffix.lower() == ".fdf" and source.is_file()  # (a missing one: read_structure names it)
    geometry_note = saved_geometry_note(source) if is_fdf else None  # SIESTA takes a .XV's atoms
    # read once: choosing the model and predicting both use it (its warnings said once)
    read = read_run_structure(source) if geometry_note else read_structure(source)
    # SIESTA's .XV in its run folder, read with that run's settings (not where its atoms are another's): that run
    # reads the DM
    run_fdf = source if is_fdf else run_fdf_of(source) if read.fdf_settings else None
    if run_fdf is None and (reader := _run_reading(out)) is not None:  # a file's DM written where a run reads it
        read, run_fdf = as_atoms_of_run(read, reader), reader
    use = model(read) if callable(model) else model
    pred = predict_to_file(read, out, model=use, overwrite=overwrite, fold=fold, force=force, refine=refine)
    done = RunPrediction(pred, out, [geometry_note] if geometry_note else [], run_fdf)
    if run_fdf:  # what SIESTA needs besides the DM, said now rather than when SIESTA stops (bench checks it too)
        try:
            check_pseudopotentials(run_fdf)
        except InputFileError as exc:
            done.notes.append(f"SIESTA run from {run_fdf.parent} would stop before its first SCF step: {exc.message}")
    note = dm_read_note(run_fdf, out) if run_fdf else STRUCTURE_FILE_NOTE
    # the switch only where SIESTA looks for the DM: on with the DM elsewhere, it would read a stale one
    if note and edit_fdf and run_fdf and out.resolve() == siesta_dm_init_path(run_fdf).resolve():
        done.fdf_backup = enable_dm_read(run_fdf)  # the note said the switch is off
    elif note:
        done.notes.append(note)
    return done


def predict_to_file(structure, out: str | Path, model=AUTO_MODEL, overwrite: bool = False, fold: bool | None = None,
                    force: bool = False, refine: str = "idempotent") -> Prediction:
    """Predict and write ``out`` (a ``.DM``) atomically; an existing file is kept as a backup.

    A prediction the guard refuses (:attr:`Prediction.refusals`: a structure far outside the model's training
    data, a k-sampling the model has not seen, a DM with no clear occupied space) raises
    :class:`~siesta_dmguess.errors.UnreliablePredictionError` and writes nothing, so that SIESTA starts from its
    atomic guess; an existing ``out`` (an earlier step's or run's DM, which SIESTA would read instead) is moved
    to its backup name. ``force=True`` writes the prediction anyway.
    """
    check_dm_output(out)  # before the prediction: a wrong -o is said at once
    pred = predict_density_matrix(structure, model, fold=fold, force=force, refine=refine)
    if pred.refusal_reason and not force:
        out = Path(out)
        moved = ""
        if out.exists():  # DM.UseSaveDM T would start SIESTA from this stale file, not from its atomic guess
            backup = move_to_backup(out)
            moved = f"; the existing {out.name} was moved to {backup.name} so that SIESTA does not read it"
        raise UnreliablePredictionError(f"{pred.refusal_reason}; no DM was written to {out}{moved} (--force writes "
                                        "it)", pred.structure.source or None, prediction=pred)
    write_density_matrix(pred.density_matrix, out, overwrite=overwrite)
    return pred
