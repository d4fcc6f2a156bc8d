"""Analytic refinements of a predicted DM, applied before it is written.

A converged closed-shell DM of an insulator obeys two exact conditions that a
network's output only approximates:

* **electron count**: Tr(D S) = N (valence electrons minus ``NetCharge``);
* **idempotency**: with P = D/2, P S P = P, i.e. its natural occupations
  (eigenvalues of P S) are 1 for N/2 orbitals and 0 for all others.

``"charge"`` scales D to the right count. ``"idempotent"`` replaces D by the
idempotent DM built from its N/2 most occupied natural orbitals: the nearest
pure state. To first order it removes every error component inside the occupied
or inside the empty space, and keeps only occupied-empty rotations, so the DM
error drops (compare ``siesta-dmguess evaluate water ../shared/datasets/h2o
--refine charge`` with ``--refine idempotent``; numbers in the README). It also
fixes the count exactly.

A model with a ΔH head (``ModelConfig.correction_head``) steers the projection: the
occupied space is then that of the Hamiltonian-like -S P S + ΔH instead of -S P S
(see :func:`nearest_idempotent`; trained through its differentiable twin,
:func:`siesta_dmguess.correction.projected_density_torch`).

The projection needs the dense Γ-point D and S (O(n_orb³)), so it applies to
Γ-only and molecular DMs of up to :data:`MAX_DENSE_ORBITALS` orbitals with an
even electron count, and only when the prediction's natural occupations show a
clear gap (metals and smeared states keep fractional occupations). Otherwise the
DM is charge-normalized and :attr:`Refinement.applied` says why.
SIESTA itself only rescales the charge (``normalize_dm.F90``); this is the
analytic refinement that SIESTA does not do, hence written here with numpy/scipy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import scipy.sparse as sp

REFINEMENTS = ("idempotent", "charge", "none")
MAX_DENSE_ORBITALS = 6000
MIN_OCCUPATION_GAP = 0.5  # natural occupations of the last occupied and first empty orbital must differ by this
# Below this many orbitals the dense eigensolver runs on one BLAS thread: right after a model's forward pass,
# torch's OpenMP workers still spin and a multithreaded OpenBLAS eigh of a 184-orbital water box took 70-110 ms
# instead of 3 ms (``integration/benchmarks/predict_scaling.py --refine idempotent`` times it).
SINGLE_THREAD_ORBITALS = 800


@dataclass
class Refinement:
    """A refined flat DM and what was done to it."""

    values: np.ndarray  # flat SIESTA-basis values, same layout as the input
    electrons_raw: float  # Tr(D S) of the prediction before refinement
    applied: str  # "idempotent", "charge" or "none"
    reason: str = ""  # why a requested idempotent projection fell back to charge normalization
    occupation_gap: float | None = None  # n(HOMO) - n(LUMO) of the raw natural occupations (1 for a pure state)


def refine(layout, values: np.ndarray, overlap: np.ndarray, n_electrons: float, fold: bool,
           mode: str = "idempotent", correction: np.ndarray | None = None) -> Refinement:
    """Refine flat DM ``values`` (per image, see :class:`~siesta_dmguess.dm.BlockLayout`) with flat S ``overlap``.

    ``fold`` says whether the DM is Γ-only (images summed into the cell, as it is written).
    ``correction`` is a model's flat ΔH for the projection (see :func:`nearest_idempotent`).
    """
    from .dm import flat_to_csr
    from .overlap import electron_count

    _check_mode(mode)
    n_raw = electron_count(layout, values, overlap, fold)
    if mode == "none" or n_raw <= 0:
        return Refinement(values, n_raw, "none")
    projected, dense, reason, gap = _try_projection(
        mode, layout.no, is_kpoint(layout, fold), n_electrons,
        lambda: (flat_to_csr(layout, values, True).toarray(), flat_to_csr(layout, overlap, True).toarray()),
        None if correction is None else lambda: flat_to_csr(layout, correction, True).toarray())
    if projected is not None:
        return Refinement(_onto_flat(layout, values, dense, projected), n_raw, "idempotent", occupation_gap=gap)
    return Refinement(values * (n_electrons / n_raw), n_raw, "charge", reason, gap)


def refine_folded(density: "sp.spmatrix", overlap: "sp.spmatrix", n_electrons: float,
                  mode: str = "idempotent") -> tuple["sp.csr_matrix", str]:
    """:func:`refine` for a folded (Γ-only) DM given as a CSR matrix, e.g. a trajectory guess. With
    ``mode="charge"`` any layout works whose ``overlap`` has the same shape (e.g. image-keyed k-point DMs).

    Returns the refined matrix on ``density``'s pattern and what was applied.
    """
    import scipy.sparse as sp

    _check_mode(mode)
    d, s = sp.csr_matrix(density), sp.csr_matrix(overlap)
    n_raw = float(d.multiply(s).sum())
    if mode == "none" or n_raw <= 0:
        return d, "none"
    projected, *_ = _try_projection(mode, d.shape[0], False, n_electrons, lambda: (d.toarray(), s.toarray()))
    if projected is not None:
        coo = d.tocoo()
        return sp.csr_matrix((projected[coo.row, coo.col], (coo.row, coo.col)), shape=d.shape), "idempotent"
    return d * (n_electrons / n_raw), "charge"


def _check_mode(mode: str) -> None:
    if mode not in REFINEMENTS:
        raise ValueError(f"unknown refinement {mode!r}; choose one of {REFINEMENTS}")


def is_kpoint(layout, fold: bool) -> bool:
    """A DM that keeps its periodic images (a k-point run): the dense projection, done at Γ, does not apply."""
    return not fold and int(np.prod(layout.nsc)) > 1


def projection_skipped(mode: str, n_orbitals: int, kpoint: bool, n_electrons: float) -> str:
    """Why the idempotent projection will not be applied ("" if it will be tried; it can still fall back for
    want of an occupation gap). Lets callers skip work only the projection needs, such as a model's ΔH."""
    if mode != "idempotent":
        return f"refinement {mode!r} requested"
    if kpoint:
        return "a DM with its periodic images (a k-point run's), and the projection works on folded (Γ) DMs only"
    if n_orbitals > MAX_DENSE_ORBITALS:
        return f"{n_orbitals} orbitals > {MAX_DENSE_ORBITALS} (dense projection skipped to stay O(N))"
    if abs(n_electrons / 2 - round(n_electrons / 2)) > 1e-6:
        return f"odd or fractional electron count {n_electrons:g}"
    return ""


def _try_projection(mode: str, n_orbitals: int, kpoint: bool, n_electrons: float, dense_d_and_s,
                    dense_correction=None):
    """(projected D or None, the dense D it was made from, why not, occupation gap) for the requested mode.

    ``dense_d_and_s()`` gives the folded dense D and S; it is only called when the projection applies.
    """
    reason = projection_skipped(mode, n_orbitals, kpoint, n_electrons)
    if reason:
        return None, None, "" if mode != "idempotent" else reason, None
    d, s = dense_d_and_s()
    n_occupied = int(round(n_electrons / 2))
    if dense_correction is not None:
        projected, gap = nearest_idempotent(d, s, n_occupied, dense_correction())
        if gap >= MIN_OCCUPATION_GAP:
            return projected, d, "", gap
        # ΔH would leave no clear occupied space (a structure unlike its training data): do without it.
    projected, gap = nearest_idempotent(d, s, n_occupied)
    if gap < MIN_OCCUPATION_GAP:
        return None, d, f"no clear gap in the natural occupations (HOMO-LUMO occupation gap {gap:.2f})", gap
    return projected, d, "", gap


def nearest_idempotent(d: np.ndarray, s: np.ndarray, n_occupied: int,
                       correction: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """2 C_occ C_occ†, C_occ the ``n_occupied`` most occupied natural orbitals of P = D/2, and the gap
    n(HOMO) - n(LUMO) of P's natural occupations. Real symmetric (Γ) or complex Hermitian (one k-point
    of a periodic DM, see ``integration/benchmarks/kpoint_projection.py``) matrices.

    Natural orbitals solve (S P S) c = n S c with cᵀ S c = 1, i.e. they are the eigenvectors of the
    "Hamiltonian" -S P S. A model's ``correction`` ΔH (dense, folded) is added to it: the occupied space
    is then the lowest ``n_occupied`` states of (-S P S + ΔH) c = ε S c and the gap is ε_LUMO - ε_HOMO.
    """
    import scipy.linalg
    from threadpoolctl import threadpool_limits

    d, s = 0.5 * (d + d.conj().T), 0.5 * (s + s.conj().T)
    h = -(s @ (0.5 * d) @ s)
    if correction is not None:
        h = h + 0.5 * (correction + correction.conj().T)
    # Only the occupied states and the lowest empty one (for the gap) are needed: LAPACK's subset solver (gvx)
    # took 10.0 s instead of 11.5 s on a 4968-orbital water box (the projector does not depend on how
    # degenerate occupied states are mixed).
    last = min(n_occupied, len(h) - 1)
    with threadpool_limits(1 if len(h) < SINGLE_THREAD_ORBITALS else None, user_api="blas"):
        energies, orbitals = scipy.linalg.eigh(h, s, subset_by_index=[0, last])
    occupied = orbitals[:, :n_occupied]
    gap = float(energies[n_occupied] - energies[n_occupied - 1]) if n_occupied < len(h) else 1.0
    return 2.0 * occupied @ occupied.conj().T, gap


def _onto_flat(layout, values, folded: np.ndarray, projected: np.ndarray) -> np.ndarray:
    """Flat per-image values that fold to ``projected``, given that ``values`` fold to ``folded``.

    Several images can fold onto one element, so the whole change of a folded element goes onto its first flat
    element.
    """
    rows, cols = layout.rows, layout.cols % layout.no
    _, first = np.unique(rows * layout.no + cols, return_index=True)
    out = np.array(values, dtype=float, copy=True)
    out[first] += projected[rows[first], cols[first]] - folded[rows[first], cols[first]]
    return out
