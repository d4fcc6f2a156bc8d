"""Accuracy of predicted density matrices against converged SIESTA references.

Errors are measured on the elements stored in the reference ``.DM`` (after
folding periodic images the way the reference is folded), in SIESTA's basis,
for the model and for SIESTA's atomic guess (the baseline an ML guess replaces).
Electron counts Tr(D S) use S from the run's ``.HSX`` where one exists; with S,
folded (Γ-only and molecular) DMs also get the error of the density-matrix
*operator*, sqrt(Tr[(ΔD S)²]) (see :func:`density_operator_error`). With the
converged H of the same file, each DM gets its band-structure energy error
Tr[(D − D_ref) H] (eV): the energy SIESTA's Hamiltonian assigns to the error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from .model import collate

log = logging.getLogger(__name__)


def predict_flat(model, samples, dtype=torch.float32, batch_atoms: int = 256, novelty: list | None = None,
                 corrections: list | None = None):
    """Flat SIESTA-basis predictions for each sample (batched, no gradients), zero on the elements SIESTA's
    pattern leaves out (``Sample.in_siesta_pattern``: untrained, and a refinement must not see them).

    If a list is passed as ``novelty``, each sample's largest per-atom novelty score is appended to it;
    if one is passed as ``corrections``, each sample's flat ΔH (None for a model without that head).
    """
    out = []
    with torch.no_grad():
        for batch_samples in atom_batches(samples, batch_atoms, shuffle=False):
            batch = collate(batch_samples, len(model.species), dtype, with_targets=False)
            h = model.node_features(batch)
            flat = model.density_from_features(h, batch).double().numpy()
            correction = model.correction_from_features(h, batch).double().numpy() \
                if corrections is not None and model.correction_node_head is not None else None
            start = 0
            for s in batch_samples:
                part = slice(start, start + s.layout.size)
                out.append(flat[part] if s.in_siesta_pattern is None else np.where(s.in_siesta_pattern, flat[part], 0))
                if corrections is not None:
                    corrections.append(None if correction is None else correction[part])
                start += s.layout.size
            if novelty is not None:
                scores = model.novelty(batch, h).double().numpy()
                first = 0
                for s in batch_samples:
                    novelty.append(float(scores[first:first + s.species.size].max()))
                    first += s.species.size
    return out


def atom_batches(samples, max_atoms: int, shuffle: bool, rng=None):
    """Group samples into batches of at most ``max_atoms`` atoms (a larger structure gets its own batch)."""
    order = np.arange(len(samples))
    if shuffle:
        (rng or np.random.default_rng()).shuffle(order)
    batch, n = [], 0
    for k in order:
        na = samples[k].species.size
        if batch and n + na > max_atoms:
            yield batch
            batch, n = [], 0
        batch.append(samples[k])
        n += na
    if batch:
        yield batch


def reference_for_run(loaded, run) -> tuple:
    """(structure, basis, sample, reference) for one SIESTA run folder: the run's converged DM on the model's flat
    layout, NaN where the reference stores no element (an element several images fold onto gets the folded value
    on each). For studies of where a model errs."""
    from .data import load_run, prepare_sample

    structure, basis, dm, _ = load_run(run)
    cfg = loaded.config
    sample = prepare_sample(structure, basis, cfg.species, cfg.message_cutoff, dm, fold_reach=cfg.fold_reach)
    covered = sample.target_index >= 0
    reference = np.full(sample.layout.size, np.nan)
    reference[covered] = sample.target_values[sample.target_index[covered]]
    return structure, basis, sample, reference


def raw_prediction_for_run(loaded, run) -> tuple:
    """(structure, basis, sample, prediction, reference): :func:`reference_for_run` and the model's raw flat
    prediction (no refinement) on the same layout."""
    structure, basis, sample, reference = reference_for_run(loaded, run)
    return structure, basis, sample, predict_flat(loaded.model, [sample])[0], reference


def own_image_blocks(sample, flat: np.ndarray, n_orb: int, shift=(0, 0, 0)) -> np.ndarray:
    """(atoms, n_orb, n_orb) blocks between each atom and its own image at lattice ``shift`` (on-site: zero), of a
    flat DM of one species with ``n_orb`` orbitals per atom (NaN where ``flat`` is NaN, e.g. a reference that
    stores nothing there, or where the pattern has no such pair). For studies of single blocks."""
    lay = sample.layout
    out = np.full((sample.species.size, n_orb, n_orb), np.nan)
    wanted = (lay.block_i == lay.block_j) & np.all(lay.block_shift == np.asarray(shift), axis=1)
    block = lay.element_block
    k = wanted[block]
    out[lay.block_i[block[k]], lay.rows[k] % n_orb, lay.cols[k] % lay.no % n_orb] = flat[k]
    return out


def folded_to_reference(sample, flat: np.ndarray) -> np.ndarray:
    """Sum flat values onto the reference's stored elements."""
    idx = sample.target_index
    out = np.zeros_like(sample.target_values)
    np.add.at(out, idx[idx >= 0], flat[idx >= 0])
    return out


def sample_metrics(sample, flat: np.ndarray) -> dict:
    """DM errors of one prediction and of the atomic guess; electron counts where S is known."""
    ref = sample.target_values
    pred = folded_to_reference(sample, flat)
    atomic = folded_to_reference(sample, sample.layout.atomic)
    err, err0 = np.abs(pred - ref), np.abs(atomic - ref)
    m = {
        "name": sample.name, "natoms": int(sample.species.size), "elements": int(ref.size),
        "mae": float(err.mean()), "max_abs": float(err.max()),
        "atomic_mae": float(err0.mean()), "atomic_max_abs": float(err0.max()),
    }
    overlap = sample.meta.get("overlap")
    if overlap is not None:
        n_ref = float(np.dot(ref, overlap))
        m["electrons_ref"] = n_ref
        m["electron_count_error"] = float(np.dot(pred, overlap) - n_ref)
        m["atomic_electron_count_error"] = float(np.dot(atomic, overlap) - n_ref)
        if sample.fold:
            m["density_operator_error"] = density_operator_error(sample, pred - ref)
            m["atomic_density_operator_error"] = density_operator_error(sample, atomic - ref)
    hamiltonian = sample.meta.get("hamiltonian")
    if hamiltonian is not None:  # Tr(D H) over the stored elements: images pair with their own H, as with S
        m["band_energy_ref_eV"] = float(np.dot(ref, hamiltonian))
        m["band_energy_error_eV"] = float(np.dot(pred - ref, hamiltonian))
        m["atomic_band_energy_error_eV"] = float(np.dot(atomic - ref, hamiltonian))
    return m


def density_operator_error(sample, error: np.ndarray) -> float:
    """Hilbert-Schmidt norm sqrt(Tr[(ΔD S)²]) of a folded DM error given on the reference's stored elements.

    This is the L2 norm of the error of the one-particle density matrix
    ρ(r, r') = Σ D_ij φ_i(r) φ_j(r') (dimensionless; the exact DM has sqrt(2 N) for N electrons):
    unlike the element-wise MAE it does not depend on how the basis parametrizes ρ.
    In a DZP water box S has eigenvalues down to 2e-3, and DM components along those
    near-null directions are large, hard to learn and barely change ρ; this norm
    weighs them by what they change. S is the run's own (``sample.meta['overlap']``).
    """
    rows, cols = sample.stored_cell_positions()
    keep = rows >= 0
    shape = (sample.layout.no, sample.layout.no)
    e = sp.csr_matrix((error[keep], (rows[keep], cols[keep])), shape=shape)
    s = sp.csr_matrix((sample.meta["overlap"][keep], (rows[keep], cols[keep])), shape=shape)
    es = e @ s  # sparse: O(N) for a local DM
    return float(np.sqrt(max(es.multiply(es.T).sum(), 0.0)))


def summarize(per_structure: list[dict]) -> dict:
    """Mean (MAE) and max over structures, weighting every stored element equally for the MAE."""
    if not per_structure:
        return {}
    n = np.array([m["elements"] for m in per_structure], float)
    out = {
        "structures": len(per_structure),
        "mae": float(np.sum(n * [m["mae"] for m in per_structure]) / n.sum()),
        "max_abs": float(max(m["max_abs"] for m in per_structure)),
        "atomic_mae": float(np.sum(n * [m["atomic_mae"] for m in per_structure]) / n.sum()),
        "atomic_max_abs": float(max(m["atomic_max_abs"] for m in per_structure)),
    }
    out["mae_ratio_atomic_over_model"] = out["atomic_mae"] / max(out["mae"], 1e-30)
    raw = [abs(m["raw_electron_count_error"]) for m in per_structure if "raw_electron_count_error" in m]
    if raw:
        out["raw_electron_count_abs_error_mean"] = float(np.mean(raw))
        out["raw_electron_count_abs_error_max"] = float(np.max(raw))
    op = [(m["density_operator_error"], m["atomic_density_operator_error"]) for m in per_structure
          if "density_operator_error" in m]
    if op:
        out["density_operator_error_mean"] = float(np.mean([a for a, _ in op]))
        out["atomic_density_operator_error_mean"] = float(np.mean([b for _, b in op]))
        out["density_operator_ratio_atomic_over_model"] = (out["atomic_density_operator_error_mean"]
                                                           / max(out["density_operator_error_mean"], 1e-30))
    eb = [(abs(m["band_energy_error_eV"]), abs(m["atomic_band_energy_error_eV"])) for m in per_structure
          if "band_energy_error_eV" in m]
    if eb:
        out["band_energy_abs_error_mean_eV"] = float(np.mean([a for a, _ in eb]))
        out["band_energy_abs_error_max_eV"] = float(np.max([a for a, _ in eb]))
        out["atomic_band_energy_abs_error_mean_eV"] = float(np.mean([b for _, b in eb]))
    ne = [abs(m["electron_count_error"]) for m in per_structure if "electron_count_error" in m]
    if ne:
        out["electron_count_abs_error_mean"] = float(np.mean(ne))
        out["electron_count_abs_error_max"] = float(np.max(ne))
        out["structures_with_overlap"] = len(ne)
    done = [m["refinement"] for m in per_structure if "refinement" in m]
    if done:
        out["refinements"] = {k: done.count(k) for k in sorted(set(done))}
    return out


def evaluate_samples(model, samples, dtype=torch.float32, overlap=None, refine: str = "idempotent") -> dict:
    """Per-structure and summary metrics of a model on samples with targets.

    With an :class:`~siesta_dmguess.overlap.OverlapCalculator` the predictions are
    refined (:mod:`siesta_dmguess.refine`) exactly as ``predict`` writes them, and the
    raw prediction's Tr(D S) - N is reported as ``raw_electron_count_error`` (an
    uncertainty that needs no reference).
    """
    novelty: list[float] = []
    corrections: list = []
    flats = predict_flat(model, samples, dtype, novelty=novelty, corrections=corrections)
    per = []
    for sample, flat, nov, dh in zip(samples, flats, novelty, corrections):
        extra = {"novelty": nov}
        if overlap is not None:
            flat, extra["raw_electron_count_error"], extra["refinement"] = refine_flat(sample, flat, overlap, refine,
                                                                                      dh)
        per.append(sample_metrics(sample, flat) | extra)
    return {"summary": summarize(per), "structures": per}


def refine_flat(sample, flat: np.ndarray, overlap, mode: str = "idempotent",
                correction: np.ndarray | None = None) -> tuple[np.ndarray, float, str]:
    """Refine a flat prediction for the run's electron count (:func:`~siesta_dmguess.predict.expected_electrons`, as
    predict does); returns (refined, raw Tr(D S) - N, what was done).

    ``correction``: the model's flat ΔH for the idempotent projection, if it has that head."""
    from .predict import expected_electrons
    from .refine import refine

    s = overlap.flat(sample.structure, sample.layout)
    n_expected = expected_electrons(sample.structure, sample.layout.atomic.sum())
    done = refine(sample.layout, flat, s, n_expected, sample.fold, mode, correction)
    return done.values, done.electrons_raw - n_expected, done.applied


# The split evaluate reports for runs that record none but that the model's training held out (its card lists them).
HELD_OUT = "held out in training"


def evaluate(model_name_or_path, data_dirs, split: str | None = "auto", out_json: str | Path | None = None,
             progress: bool = True, refine: str = "idempotent") -> dict:
    """Evaluate a model on the runs of one or more dataset folders (default ``"auto"``: their ``val`` split, or
    all their runs where index.json records none; see :func:`~siesta_dmguess.data.resolve_split`). Where the
    runs record no split and the model's training held some of them out at random (its card's
    ``training.held_out_runs``), ``"auto"`` takes those: the others were trained on.

    Each dataset folder is checked against the model's species, basis and settings (XC, spin) first.
    Returns ``{"summary": ..., "structures": [...], "datasets": {dir: summary}}``.
    """
    from .card import load_model
    from .data import list_runs, load_samples, resolve_split
    from .guard import check_runs_made_as, model_species_of

    loaded = load_model(model_name_or_path)
    cfg = loaded.config
    held_out = set(loaded.card.get("training", {}).get("held_out_runs", []))
    result = {"model": str(loaded.path), "split": split, "refine": refine, "datasets": {}, "structures": [],
              "novelty_threshold": float(loaded.model.novelty_threshold)}
    seen, datasets = set(), []
    for d in data_dirs:  # every folder read and checked first: one the model does not cover is said before any work
        if Path(d).resolve() in seen:  # counted once in the means, as train reads a run once
            log.warning("%s: given more than once; evaluated once", d)
            continue
        seen.add(Path(d).resolve())
        used = resolve_split(d, split)
        samples = load_samples([d], cfg.species, loaded.basis, cfg.message_cutoff, split=used, progress=progress,
                               with_overlap=True, fold_reach=cfg.fold_reach,
                               species_of=lambda structure: model_species_of(structure, loaded))
        held = [s for s in samples if str(Path(s.name).resolve()) in held_out]
        if split == "auto" and used is None and held:  # runs recording no split: those training held out
            samples, used = held, HELD_OUT
        elif split == "auto" and used is None and Path(d).resolve().name in {Path(p).parent.name for p in held_out}:
            log.warning("%s: the model's card lists runs held out from a folder of this name elsewhere (%s), none "
                        "of them here: if this is that folder moved, every run is scored, the trained-on ones too",
                        d, Path(sorted(held_out)[0]).parent)
        if not samples:
            from .data import empty_split_error

            raise empty_split_error(d, used)
        check_runs_made_as(samples, loaded.card)  # an LDA model scored against GGA references would mean nothing
        datasets.append((d, used, samples))
    for d, used, samples in datasets:
        r = evaluate_samples(loaded.model, samples, overlap=loaded.overlap, refine=refine)
        result["datasets"][str(d)] = r["summary"] | {"split": used or "all", "runs_in_folder": len(list_runs(d))}
        result["structures"].extend(r["structures"])
    result["summary"] = summarize(result["structures"])
    if out_json:
        Path(out_json).write_text(json.dumps(result, indent=1))
    return result


def plot_evaluation(result: dict, path: str | Path):
    """Left: DM MAE per structure, model vs atomic guess. Right: the model's MAE against its novelty score, with
    the model's flag level, i.e. whether the uncertainty points at the worst predictions. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = result["structures"]
    x = np.arange(len(per))
    mae = [m["mae"] for m in per]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.semilogy(x, [m["atomic_mae"] for m in per], "s", color="C0", label="atomic guess")
    ax1.semilogy(x, mae, "o", color="C1", label=f"model (refine: {result.get('refine', '?')})")
    ax1.set_xticks(x, [Path(m["name"]).name for m in per], rotation=90, fontsize=6)
    ax1.set_ylabel("DM MAE (stored elements)")
    ax1.legend()
    ax2.semilogy([m.get("novelty", np.nan) for m in per], mae, "o", color="C1")
    if result.get("novelty_threshold"):
        ax2.axvline(result["novelty_threshold"], color="k", ls=":", lw=1, label="flag level")
        ax2.legend()
    ax2.set_xlabel("novelty score (no reference needed)")
    ax2.set_ylabel("DM MAE")
    fig.suptitle(f"{Path(result['model']).name}: {len(per)} structure{'' if len(per) == 1 else 's'}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig
