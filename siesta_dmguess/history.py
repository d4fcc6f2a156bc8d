"""Starting density matrices along a trajectory (MD, relaxation): reuse, extrapolation, ML, ML + residual.

When ASE (or any driver) moves the atoms and starts a new SIESTA run per step,
SIESTA's own DM extrapolation never applies: every run starts from a file. This
module builds that file from the trajectory's history, in four ways:

``reuse``          the previous step's converged DM (what SIESTA does with ``DM.UseSaveDM T``);
``extrapolation``  sum_k c_k D_scf(t-k) with SIESTA's rule for the coefficients
                   (``m_new_dm.F90``, ``extrapolate_dm_with_coords``: least squares
                   x(t) ~ sum_k c_k x(t-k) with sum_k c_k = 1, solved by SVD);
``ml``             the model's prediction for the current geometry;
``ml+residual``    D_ml(t) + sum_k c_k [D_scf(t-k) - D_ml(t-k)]: the prediction corrected by the
                   model's own error on the previous steps, extrapolated like SIESTA's DMs. The
                   model's error changes slowly along a trajectory, the DM itself much faster.
                   Equivalently: SIESTA's extrapolation E(t) plus the model's correction for the
                   geometry change, C(t) = D_ml(t) - sum_k c_k D_ml(t-k). The correction is
                   weighted by w in [0, 1], the least-squares weight that would have made the
                   previous step's guess best (w = <D_scf - E, C> / <C, C>, starting at 1): a
                   model that predicts the change well keeps w ~ 1, a poor one falls back
                   towards SIESTA's extrapolation instead of making it worse.

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


class TrajectoryHistory:
    """The last ``depth`` steps of a trajectory: positions, converged DMs and (optionally) ML predictions."""

    def __init__(self, depth: int = 3):
        if depth < 1:
            raise ValueError("the history needs a depth of at least 1")
        self.steps: deque[_Step] = deque(maxlen=depth)
        self.correction_weight = 1.0  # w of the ML correction (see the module docstring)

    def __len__(self) -> int:
        return len(self.steps)

    def push(self, positions, converged: sp.spmatrix, predicted: sp.spmatrix | None = None) -> None:
        """Record a finished step (most recent first in the history)."""
        converged = sp.csr_matrix(converged)
        if self.steps and self.steps[0].converged.shape != converged.shape:
            self.steps.clear()  # a different system: start a new history
            self.correction_weight = 1.0
        if predicted is not None:
            self._update_weight(positions, converged, sp.csr_matrix(predicted))
        self.steps.appendleft(_Step(np.asarray(positions, float).copy(), converged,
                                    None if predicted is None else sp.csr_matrix(predicted)))

    def clear(self) -> None:
        self.steps.clear()
        self.correction_weight = 1.0

    def _parts(self, positions, predicted: sp.csr_matrix):
        """(E, C): SIESTA's extrapolation of the converged DMs and the model's correction, on ``predicted``'s
        pattern; None when there is no usable history."""
        steps = [s for s in self.steps if s.predicted is not None]
        if not steps or steps[0].converged.shape != predicted.shape:
            return None
        c = extrapolation_coefficients([s.positions for s in steps], positions)
        extrapolated = _combine(c, [s.converged for s in steps], pattern=predicted)
        correction = predicted - _combine(c, [s.predicted for s in steps], pattern=predicted)
        return extrapolated, correction.tocsr()

    def _update_weight(self, positions, converged: sp.csr_matrix, predicted: sp.csr_matrix) -> None:
        """Least-squares weight of the ML correction that would have made this step's guess best."""
        parts = self._parts(positions, predicted)
        if parts is None:
            return
        extrapolated, correction = parts
        norm = float(correction.multiply(correction).sum())
        if norm > 0:
            miss = (converged - extrapolated).multiply(correction).sum()
            self.correction_weight = float(np.clip(miss / norm, 0.0, 1.0))

    def guess(self, kind: str, positions, predicted: sp.spmatrix | None = None,
              refine=None) -> sp.csr_matrix | None:
        """The starting DM of the given kind for a step at ``positions``; None where there is no history.

        ``predicted`` (the ML prediction of this step, in the history's layout) is needed for ``ml`` and
        ``ml+residual``.
        ``refine`` (e.g. :meth:`~siesta_dmguess.predict.Prediction.refined`) is applied to the ``ml+residual``
        combination, so that it is refined like the prediction it is built on.
        Elements outside the pattern of the newest matrix involved are dropped (SIESTA would drop them too).
        """
        if kind not in GUESSES:
            raise ValueError(f"unknown guess {kind!r}; choose from {GUESSES}")
        if kind == "atomic":
            return None
        if kind in ("ml", "ml+residual") and predicted is None:
            raise ValueError(f"the {kind!r} guess needs the ML prediction of the step")
        predicted = None if predicted is None else sp.csr_matrix(predicted)
        if kind == "ml":
            return predicted
        steps = list(self.steps)
        if kind == "ml+residual":
            steps = [s for s in steps if s.predicted is not None]
        if not steps:
            return predicted if kind == "ml+residual" else None
        if predicted is not None and steps[0].converged.shape != predicted.shape:
            return predicted if kind == "ml+residual" else None
        if kind == "reuse":
            return steps[0].converged.copy()
        if kind == "extrapolation":
            c = extrapolation_coefficients([s.positions for s in steps], positions)
            return _combine(c, [s.converged for s in steps], pattern=steps[0].converged)
        extrapolated, correction = self._parts(positions, predicted)
        combined = (extrapolated + self.correction_weight * correction).tocsr()
        return refine(combined) if refine is not None else combined


def _combine(coefficients, matrices, pattern: sp.csr_matrix) -> sp.csr_matrix:
    """sum_k c_k M_k restricted to the non-zero pattern of ``pattern``."""
    total = sum(c * m for c, m in zip(coefficients, matrices))
    mask = pattern.copy().tocsr()
    mask.data = np.ones_like(mask.data)
    return sp.csr_matrix(total.multiply(mask))
