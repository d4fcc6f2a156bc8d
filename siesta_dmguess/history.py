"""Starting density matrices along a trajectory (MD, relaxation): reuse, extrapolation, ML, ML + residual.

When ASE (or any driver) moves the atoms and starts a new SIESTA run per step,
SIESTA's own DM extrapolation never applies: every run starts from a file. This
module builds that file from the trajectory's history, in four ways:

``reuse``          the previous step's converged DM (what SIESTA does with ``DM.UseSaveDM T``);
``extrapolation``  sum_k c_k D_scf(t-k) with SIESTA's rule for the coefficients
                   (``m_new_dm.F90``, ``extrapolate_dm_with_coords``: least squares
                   x(t) ~ sum_k c_k x(t-k) with sum_k c_k = 1, solved by SVD), per group of elements
                   held by the same steps (:func:`extrapolate`; SIESTA reads a missing one as zero);
``ml``             the model's prediction for the current geometry;
``ml+residual``    D_ml(t) + sum_k c_k [D_scf(t-k) - D_ml(t-k)]: the prediction corrected by the
                   model's own error on the previous steps, extrapolated like SIESTA's DMs. The
                   model's error changes slowly along a trajectory, the DM itself much faster.
                   Equivalently: SIESTA's extrapolation E(t) plus the model's correction for the
                   geometry change, C(t) = D_ml(t) - sum_k c_k D_ml(t-k). What is written is the
                   affine combination a D_ml + b E + g (E + C) (a + b + g = 1, all >= 0) whose
                   weights would have made the previous step's guess closest to its converged DM
                   (least squares on the simplex; starting at the full correction, g = 1). A model
                   whose errors change slowly keeps g ~ 1; one that predicts the change poorly falls
                   back towards SIESTA's extrapolation (b); one whose errors are already as small
                   as their step-to-step noise (SIESTA's grid) falls back towards its own prediction
                   (a), instead of adding the previous steps' noise. Fitted on one step, the weights
                   can chase that noise, so they must also pass a held-out check: the weights fitted
                   one step earlier are tried on the step just finished, and unless they beat the plain
                   prediction there, the next guess is the plain prediction (a = 1). And where the plain
                   prediction of the step just finished was already within :data:`PLAIN_BELOW` of its
                   converged DM (relative, same metric), the next guess is the plain prediction too: its
                   error is then as small as SIESTA's grid noise, which no history can predict.

All matrices are sisl-free CSR matrices of one spin in a layout that does not change
between steps: folded (``nsc = 1``) for Γ-only runs, and for k-point runs, whose
images and sisl supercell change as atoms move, keyed by image offset on a fixed grid
(:func:`~siesta_dmguess.dm.to_image_keyed`). A change of shape (another system) starts a
new history.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

GUESSES = ("atomic", "reuse", "extrapolation", "ml", "ml+residual")


def extrapolation_coefficients(previous_positions: list[np.ndarray], positions: np.ndarray) -> np.ndarray:
    """SIESTA's DM-extrapolation coefficients: min |sum_k c_k x_k - x|^2 subject to sum_k c_k = 1.

    ``previous_positions[0]`` is the most recent step. With one step the answer is c = [1]
    (plain reuse); with two steps on a straight line it is [2, -1] (linear extrapolation).
    """
    n = len(previous_positions)
    if n == 0:
        return np.zeros(0)
    if n == 1:
        return np.ones(1)
    # Write x_k = x_0 + d_k: the constraint removes one unknown, c_0 = 1 - sum_{k>0} c_k.
    x0 = np.asarray(previous_positions[0], float).ravel()
    d = np.stack([np.asarray(p, float).ravel() - x0 for p in previous_positions[1:]], axis=1)
    rhs = np.asarray(positions, float).ravel() - x0
    c_rest, *_ = np.linalg.lstsq(d, rhs, rcond=1e-8)  # SVD, as SIESTA's UseSVD path
    return np.concatenate([[1.0 - c_rest.sum()], c_rest])


@dataclass
class _Step:
    positions: np.ndarray
    converged: sp.csr_matrix  # D_scf of the step
    predicted: sp.csr_matrix | None  # D_ml of the step (for the residual)
    cell: np.ndarray | None = None  # lattice vectors (rows), where the step is periodic


DEFAULT_DEPTH = 3  # steps kept, as the extrapolation template's DM.History.Depth (SIESTA's own default is 1)


class TrajectoryHistory:
    """The last ``depth`` steps of a trajectory: positions, converged DMs and (optionally) ML predictions."""

    def __init__(self, depth: int = DEFAULT_DEPTH):
        if depth < 1:
            raise ValueError("the history needs a depth of at least 1")
        self.steps: deque[_Step] = deque(maxlen=depth)
        self.orbital_atom: np.ndarray | None = None  # each orbital's atom, to re-key images (_aligned)
        self.weights = FULL_CORRECTION  # of (D_ml, E, E + C) in the ml+residual guess (module docstring)
        self.fitted = FULL_CORRECTION  # the last step's least-squares weights, before the held-out check

    def __len__(self) -> int:
        return len(self.steps)

    def push(self, positions, converged: sp.spmatrix, predicted: sp.spmatrix | None = None,
             overlap: sp.spmatrix | None = None, cell=None, orbital_atom=None) -> None:
        """Record a finished step (most recent first in the history). With the step's ``overlap`` S (same
        layout), the ml+residual weights compare density errors, Tr[(ΔD S)²], instead of element errors. With its
        ``cell`` (and, for DMs that keep their images, each orbital's atom ``orbital_atom``), atoms that a
        trajectory wraps into the cell are followed across it (:meth:`_aligned`)."""
        converged = sp.csr_matrix(converged)
        if self.steps and self.steps[0].converged.shape != converged.shape:
            self.clear()  # a different system: start a new history
        if orbital_atom is not None:
            self.orbital_atom = np.asarray(orbital_atom, dtype=np.int64)
        cell = None if cell is None else np.asarray(cell, float).copy()
        if predicted is not None:
            self._update_weight(positions, converged, sp.csr_matrix(predicted), overlap, cell)
        self.steps.appendleft(_Step(np.asarray(positions, float).copy(), converged,
                                    None if predicted is None else sp.csr_matrix(predicted), cell))

    def clear(self) -> None:
        self.steps.clear()
        self.weights = self.fitted = FULL_CORRECTION

    def _aligned(self, positions, cell) -> list[_Step]:
        """The steps as seen from a frame at ``positions`` in ``cell``: an atom that sat a whole number of cells
        away (a trajectory wrapped into the cell, whose atom jumps across it) is put back next to where it is now,
        and its DM elements re-keyed to the images they are now (:func:`~siesta_dmguess.dm.shift_image_keys`), so
        that the extrapolation follows the atoms, not the wrapping (docs/guesses.md, "Atoms wrapped into the
        cell": a wrapped `water8` MD took 174 and 161 SCF iterations from the extrapolation and ML + residual
        without this, 155 and 149 with it, as unwrapped)."""
        from .dm import shift_image_keys

        if cell is None:
            return list(self.steps)
        cell = np.asarray(cell, float)
        now = np.asarray(positions, float) @ np.linalg.inv(cell)
        aligned = []
        for step in self.steps:
            if step.cell is None or step.positions.shape != now.shape:
                aligned.append(step)
                continue
            jump = np.rint(step.positions @ np.linalg.inv(step.cell) - now).astype(np.int64)
            if not jump.any():
                aligned.append(step)
                continue
            moved = step.positions - jump @ step.cell
            if self.orbital_atom is None or self.orbital_atom.size != step.converged.shape[0]:
                orbital_shift = np.zeros((step.converged.shape[0], 3), np.int64)  # folded DMs need none
            else:
                orbital_shift = jump[self.orbital_atom]
            aligned.append(_Step(moved, shift_image_keys(step.converged, orbital_shift),
                                 None if step.predicted is None else shift_image_keys(step.predicted, orbital_shift),
                                 step.cell))
        return aligned

    def _parts(self, positions, predicted: sp.csr_matrix, steps: list[_Step] | None = None):
        """(E, C): SIESTA's extrapolation of the converged DMs and the model's correction, on ``predicted``'s
        pattern; None when there is no usable history. ``steps``: the history aligned to this frame."""
        steps = [s for s in (self.steps if steps is None else steps) if s.predicted is not None]
        if not steps or steps[0].converged.shape != predicted.shape:
            return None
        # Elements no step holds (new to SIESTA's pattern) take the prediction in both: E = D_ml, C = 0 there.
        previous = [s.positions for s in steps]
        extrapolated = extrapolate(previous, positions, [s.converged for s in steps], predicted, fallback=predicted)
        correction = predicted - extrapolate(previous, positions, [s.predicted for s in steps], predicted,
                                             fallback=predicted)
        return extrapolated, correction.tocsr()

    def _update_weight(self, positions, converged: sp.csr_matrix, predicted: sp.csr_matrix, overlap=None,
                       cell=None) -> None:
        """Weights of (D_ml, E, E + C) that would have made this step's ml+residual guess best."""
        # The last step alone: summing the fits of the last three steps (measured with the element-wise fit) helped
        # a molecule near SIESTA's grid floor (h2o MD 73 -> 67 iterations) and hurt silicon, whose model error
        # drifts (si8 MD 83 -> 91).
        parts = self._parts(positions, predicted, self._aligned(positions, cell))
        candidates = [predicted] if parts is None else [predicted, parts[0], parts[0] + parts[1]]  # D_ml, E, E + C
        gram = error_gram(candidates, converged, overlap)
        # Gate: the plain prediction already at SIESTA's grid noise (PLAIN_BELOW relative to |D_scf|) is kept.
        near_floor = gram[0, 0] < PLAIN_BELOW**2 * squared_norm(converged, overlap)
        if parts is None:  # the first step: nothing to fit yet, but the gate already applies
            self.weights = PLAIN_PREDICTION if near_floor else self.weights
            return
        # Held-out check: the weights fitted on the step before, tried on this one, against the plain prediction.
        previous = np.asarray(self.fitted)
        beats_prediction = float(previous @ gram @ previous) < gram[0, 0]
        self.fitted = simplex_least_squares(gram)
        self.weights = self.fitted if beats_prediction and not near_floor else PLAIN_PREDICTION

    def uses_plain_prediction(self) -> bool:
        """Whether the next ml+residual guess is the plain prediction (no history yet, or weights (1, 0, 0))."""
        return not any(s.predicted is not None for s in self.steps) or tuple(self.weights) == PLAIN_PREDICTION

    def guess(self, kind: str, positions, predicted: sp.spmatrix | None = None,
              refine=None, cell=None) -> sp.csr_matrix | None:
        """The starting DM of the given kind for a step at ``positions``; None where there is no history.

        ``predicted`` (the ML prediction of this step, in the history's layout) is needed for ``ml`` and
        ``ml+residual``.
        ``refine`` (e.g. :meth:`~siesta_dmguess.predict.Prediction.refined`) is applied to the ``ml+residual``
        combination, so that it is refined like the prediction it is built on. ``cell``: this frame's lattice
        vectors, where it is periodic (:meth:`_aligned`).
        Elements outside the pattern of the newest matrix involved are dropped (SIESTA would drop them too).
        """
        if kind not in GUESSES:
            raise ValueError(f"unknown guess {kind!r}; choose from {GUESSES}")
        if kind == "atomic":
            return None
        if kind in ("ml", "ml+residual") and predicted is None:
            raise ValueError(f"the {kind!r} guess needs the ML prediction of the step")
        predicted = None if predicted is None else sp.csr_matrix(predicted)
        if kind == "ml" or (kind == "ml+residual" and self.uses_plain_prediction()):
            return predicted  # already refined: combining it with zero weights and refining again changes nothing
        steps = self._aligned(positions, cell)
        if kind == "ml+residual":
            steps = [s for s in steps if s.predicted is not None]
        if not steps:
            return None
        if predicted is not None and steps[0].converged.shape != predicted.shape:
            return predicted if kind == "ml+residual" else None
        if kind == "reuse":
            return steps[0].converged.copy()
        if kind == "extrapolation":
            return extrapolate([s.positions for s in steps], positions, [s.converged for s in steps],
                               pattern=steps[0].converged)
        extrapolated, correction = self._parts(positions, predicted, steps)
        a, b, g = self.weights
        combined = (a * predicted + b * extrapolated + g * (extrapolated + correction)).tocsr()
        return refine(combined) if refine is not None else combined


FULL_CORRECTION = (0.0, 0.0, 1.0)
PLAIN_PREDICTION = (1.0, 0.0, 0.0)
# Relative error (|D_ml - D_scf| / |D_scf|, the fit's metric) below which the plain prediction is kept. Measured
# on validation structures (density metric for molecules and Γ boxes, element-wise for k-points): the `water`
# model on `h2o` 4e-5 to 1.5e-4, where SIESTA converges from it at its grid floor and adding past errors costs
# iterations (h2o MD); every set whose ML + residual guess beats the plain one lies above 9e-3 (`water8` 5e-2,
# `g2` 1-2e-2, `si8` 0.3; integration/benchmarks/relative_error.py). The threshold sits a decade from both.
PLAIN_BELOW = 1e-3


def error_gram(candidates: list, target, overlap=None) -> np.ndarray:
    """G_kl = <M_k - target, M_l - target> for a few (sparse, symmetric) matrices: |sum_k x_k M_k - target|^2 =
    x^T G x for weights that sum to 1. The inner product is element-wise, or with an ``overlap`` S the one of
    the density operators, <A, B> = Tr[A S B S]: what SIESTA's Hamiltonian sees (near-null directions of S,
    which barely change the density, then barely count)."""
    diffs = [sp.csr_matrix(m - target) for m in candidates]
    if overlap is not None:
        overlap = sp.csr_matrix(overlap)
        diffs = [(d @ overlap).tocsr() for d in diffs]
        # Tr[(A S)(B S)] = sum_ij (A S)_ij (B S)_ji
        return np.array([[float(a.multiply(b.T).sum()) for b in diffs] for a in diffs])
    return np.array([[float(a.multiply(b).sum()) for b in diffs] for a in diffs])


def squared_norm(matrix, overlap=None) -> float:
    """|A|² in the inner product of :func:`error_gram` (what :data:`PLAIN_BELOW` is relative to)."""
    return float(error_gram([0 * matrix], matrix, overlap)[0, 0])


def simplex_least_squares(gram: np.ndarray) -> tuple[float, ...]:
    """Weights x >= 0, sum x = 1, minimizing x^T G x (G from :func:`error_gram`).

    Small enough to solve exactly: every face of the simplex (each subset of the candidates) gets its
    equality-constrained least-squares optimum, and the best feasible one wins. Affine weights keep the
    electron count of DMs that all have it.
    """
    from itertools import combinations

    n = gram.shape[0]
    best, best_value = None, np.inf
    for size in range(1, n + 1):
        for face in combinations(range(n), size):
            # min x^T G x on the face with sum x = 1: [G 1; 1^T 0] [x; l] = [0; 1]
            g = gram[np.ix_(face, face)]
            kkt = np.block([[g, np.ones((size, 1))], [np.ones((1, size)), np.zeros((1, 1))]])
            sol = np.linalg.lstsq(kkt, np.r_[np.zeros(size), 1.0], rcond=1e-12)[0][:size]
            if np.any(sol < -1e-12):
                continue
            x = np.zeros(n)
            x[list(face)] = np.clip(sol, 0.0, None) / np.clip(sol, 0.0, None).sum()
            value = float(x @ gram @ x)
            if best is None or value < best_value - 1e-15 * max(1.0, abs(best_value)):
                best, best_value = x, value
    return tuple(float(v) for v in best)


def extrapolate(previous_positions: list, positions, matrices: list, pattern: sp.csr_matrix,
                fallback: sp.spmatrix | None = None) -> sp.csr_matrix:
    """SIESTA's extrapolation sum_k c_k M_k (:func:`extrapolation_coefficients`; newest first) on the pattern of
    ``pattern``, each element extrapolated from the steps whose matrices hold it.

    SIESTA's sparsity pattern changes as atoms cross orbital range (``si8`` MD: 720 elements leave, 1440 come
    back a step later). Read as zero where a step lacks it, a returning element is extrapolated with coefficients
    such as (3, -3, 1) to three times its last value (errors up to 1.9e-2). Here each group of elements held by
    the same steps gets the coefficients fitted on those steps' positions alone (one step: its value carried
    unchanged). An element no step holds takes its value in ``fallback`` (the current prediction, where there is
    one), else zero.
    """
    mask = pattern_of(pattern)
    held = [pattern_of(m).multiply(mask).tocsr() for m in matrices]
    # Which steps hold each element, as a bit code (at most 2**depth groups).
    code = sum(((1 << k) * h for k, h in enumerate(held)), sp.csr_matrix(pattern.shape)).tocsr()
    total = sp.csr_matrix(pattern.shape)
    for group in np.unique(code.data[code.data > 0]).astype(int):
        steps = [k for k in range(len(matrices)) if group >> k & 1]
        in_group = code.copy()
        in_group.data = (in_group.data == group).astype(float)
        c = extrapolation_coefficients([previous_positions[k] for k in steps], positions)
        for ck, k in zip(c, steps):
            total = total + ck * sp.csr_matrix(matrices[k]).multiply(in_group)
    if fallback is not None:
        total = total + sp.csr_matrix(fallback).multiply(mask - pattern_of(code))  # code holds only masked elements
    return sp.csr_matrix(total.multiply(mask))


def pattern_of(matrix) -> sp.csr_matrix:
    """1 on every stored element of a sparse matrix (its sparsity pattern, explicit zeros included)."""
    presence = sp.csr_matrix(matrix, copy=True)
    presence.data = np.ones_like(presence.data)
    return presence
