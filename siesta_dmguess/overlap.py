"""The overlap matrix S of SIESTA's numerical atomic orbitals, computed from the basis.

SIESTA computes S itself but writes it only with ``SaveHS``; a prediction for a
new structure needs it for the electron count Tr(D S), Mulliken charges and the
charge normalization of a predicted DM (SIESTA only mixes the first SCF step of a
read DM whose charge is right to 1e-4 electrons). sisl reads the radial functions
but computes no two-centre integrals, so they are done here the way SIESTA does
them: Fourier-Bessel transforms of the radial parts and real Gaunt coefficients.

With phi_a(r) = R_a(r) Y_a(r^) (real, orthonormal spherical harmonics) the
overlap of phi_a at the origin with phi_b at R is

    S_ab(R) = 8 sum_{L,M} i^(l_b - l_a + L) G(a, b, LM) Y_LM(R^) int k^2 Rt_a(k) Rt_b(k) j_L(k R) dk,
    Rt(k) = int r^2 R(r) j_l(k r) dr,   G(a, b, LM) = int Y_a Y_b Y_LM dOmega.

Spherical harmonics are e3nn's (``normalization='integral'``) in e3nn's frame;
blocks are converted to SIESTA's orbital signs by :mod:`.conventions`. Lengths in Å.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.interpolate import CubicSpline
from scipy.special import spherical_jn

from .basis import SpeciesBasis
from .conventions import orbital_signs, to_e3nn_frame

K_MAX = 40.0  # Å^-1: the radial transforms are negligible beyond (checked against SIESTA's .HSX, tests)
# Grids (k: 0.1 Å^-1, R: 0.01 Å): halving both steps changes S by < 2e-9 (tests), far below its 6e-6 distance from
# SIESTA's own S (which SIESTA integrates on a grid too); finer ones cost the first prediction 0.4 s more.
N_K = 401  # odd: Simpson weights
N_R = 801
R_STEP = 0.01  # Å, spacing of the tabulated two-centre integrals (cubic splines in between)


def _simpson_weights(n: int, h: float) -> np.ndarray:
    w = np.ones(n)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return w * h / 3.0


@lru_cache(maxsize=None)
def gaunt(l1: int, l2: int, L: int) -> np.ndarray:
    """Real Gaunt coefficients int Y_l1 Y_l2 Y_L dOmega, shape (2l1+1, 2l2+1, 2L+1), e3nn basis.

    Integrated numerically on a Gauss-Legendre x uniform grid that is exact for
    these polynomial degrees (so the e3nn convention is used as is, never re-derived).
    """
    import torch

    from .e3nn_modules import o3

    n = l1 + l2 + L + 2
    x, w = np.polynomial.legendre.leggauss(n)
    phi = np.arange(2 * n) * (np.pi / n)
    ct, ph = np.meshgrid(x, phi, indexing="ij")
    st = np.sqrt(1 - ct**2)
    vec = np.stack([st * np.cos(ph), st * np.sin(ph), ct], axis=-1).reshape(-1, 3)
    weight = (w[:, None] * np.full(phi.size, np.pi / n)[None, :]).reshape(-1)
    v = torch.as_tensor(vec, dtype=torch.float64)

    def ylm(l):
        return o3.spherical_harmonics(l, v, normalize=True, normalization="integral").numpy()

    return np.einsum("p,pa,pb,pc->abc", weight, ylm(l1), ylm(l2), ylm(L))


def _shell_transforms(basis: SpeciesBasis, k: np.ndarray) -> list[np.ndarray]:
    """Rt(k) = int r^2 R(r) j_l(k r) dr of every shell (Simpson on a fine radial grid)."""
    if len(basis.radial_tables) != len(basis.shells):
        raise ValueError(f"the basis of {basis.symbol} carries no radial functions (needed for the overlap)")
    out = []
    for shell, table in zip(basis.shells, basis.radial_tables):
        r = np.linspace(0.0, shell.radius, N_R)
        radial = CubicSpline(np.linspace(0.0, shell.radius, len(table)), np.asarray(table, float))(r)
        weights = _simpson_weights(N_R, r[1]) * r**2 * radial
        out.append(spherical_jn(shell.l, np.outer(k, r)) @ weights)
    return out


class OverlapTable:
    """Two-centre overlap integrals of one ordered species pair (A at the origin, B at R)."""

    def __init__(self, basis_a: SpeciesBasis, basis_b: SpeciesBasis, transforms_a, transforms_b, bessel):
        self.basis_a, self.basis_b = basis_a, basis_b
        self.rmax = basis_a.max_radius + basis_b.max_radius
        k = np.linspace(0.0, K_MAX, N_K)
        kw = _simpson_weights(N_K, k[1]) * k**2
        self.grid = np.arange(0.0, self.rmax + 2 * R_STEP, R_STEP)
        n = self.grid.size
        # terms[(sa, sb)] = [(L, spline of the radial factor incl. 8 i^(lb-la+L)), ...]
        self.terms: dict[tuple[int, int], list] = {}
        for sa, sha in enumerate(basis_a.shells):
            for sb, shb in enumerate(basis_b.shells):
                terms = []
                for L in range(abs(sha.l - shb.l), sha.l + shb.l + 1, 2):  # parity: l_a + l_b + L even
                    phase = (-1) ** ((shb.l - sha.l + L) // 2)
                    values = 8.0 * phase * (bessel(L)[:n] @ (kw * transforms_a[sa] * transforms_b[sb]))
                    values[self.grid >= sha.radius + shb.radius] = 0.0
                    terms.append((L, CubicSpline(self.grid, values)))
                self.terms[(sa, sb)] = terms

    def blocks(self, vectors: np.ndarray) -> np.ndarray:
        """Overlap blocks (E, n_a, n_b) in SIESTA's orbital basis for pair vectors (E, 3) in Å."""
        import torch
        from .e3nn_modules import o3

        vectors = np.atleast_2d(vectors)
        dist = np.linalg.norm(vectors, axis=1)
        na, nb = self.basis_a.norb, self.basis_b.norb
        out = np.zeros((vectors.shape[0], na, nb))
        start_a = np.cumsum([0] + [s.size for s in self.basis_a.shells])
        start_b = np.cumsum([0] + [s.size for s in self.basis_b.shells])
        v = torch.as_tensor(to_e3nn_frame(vectors), dtype=torch.float64)
        ylm = {}
        for (sa, sb), terms in self.terms.items():
            la, lb = self.basis_a.shells[sa].l, self.basis_b.shells[sb].l
            block = out[:, start_a[sa]:start_a[sa + 1], start_b[sb]:start_b[sb + 1]]
            for L, spline in terms:
                if L not in ylm:
                    safe = torch.where(torch.as_tensor(dist)[:, None] > 1e-10, v, torch.tensor([0.0, 1.0, 0.0],
                                                                                              dtype=torch.float64))
                    ylm[L] = o3.spherical_harmonics(L, safe, normalize=True, normalization="integral").numpy()
                radial = np.where(dist < self.rmax, spline(np.minimum(dist, self.grid[-1])), 0.0)
                block += np.einsum("abm,em,e->eab", gaunt(la, lb, L), ylm[L], radial)
        sa_signs = orbital_signs(self.basis_a.orbital_m)
        sb_signs = orbital_signs(self.basis_b.orbital_m)
        return out * sa_signs[None, :, None] * sb_signs[None, None, :]


def overlap_calculator(basis: dict[str, SpeciesBasis]) -> "OverlapCalculator | None":
    """An :class:`OverlapCalculator` for ``basis``, or None where a species' basis carries no radial functions
    (an ``.ion.nc`` read without them): S cannot be computed then."""
    return OverlapCalculator(basis) if all(b.radial_tables for b in basis.values()) else None


class OverlapCalculator:
    """Overlap blocks for any structure with species from ``basis`` (tables built once per species pair)."""

    def __init__(self, basis: dict[str, SpeciesBasis]):
        self.basis = basis
        self._k = np.linspace(0.0, K_MAX, N_K)
        self._grid = np.arange(0.0, 2 * max(b.max_radius for b in basis.values()) + 2 * R_STEP, R_STEP)
        self._bessel: dict[int, np.ndarray] = {}
        self._transforms: dict[str, list] = {}
        self._tables: dict[tuple[str, str], OverlapTable] = {}

    def _bessel_matrix(self, L: int) -> np.ndarray:
        if L not in self._bessel:
            self._bessel[L] = spherical_jn(L, np.outer(self._grid, self._k))
        return self._bessel[L]

    def _transform(self, label: str):
        if label not in self._transforms:
            self._transforms[label] = _shell_transforms(self.basis[label], self._k)
        return self._transforms[label]

    def table(self, a: str, b: str) -> OverlapTable:
        if (a, b) not in self._tables:
            self._tables[(a, b)] = OverlapTable(self.basis[a], self.basis[b], self._transform(a),
                                                self._transform(b), self._bessel_matrix)
        return self._tables[(a, b)]

    def flat(self, structure, layout) -> np.ndarray:
        """S at every element of ``structure``'s :class:`~siesta_dmguess.dm.BlockLayout` (SIESTA basis, per image)."""
        labels = structure.labels
        vectors_of_blocks = layout.block_vectors(structure)
        out = np.zeros(layout.size)
        bi, bj = layout.block_i, layout.block_j
        lab = np.asarray(labels)
        for a in sorted(set(labels)):
            for b in sorted(set(labels)):
                sel = np.nonzero((lab[bi] == a) & (lab[bj] == b))[0]
                if not sel.size:
                    continue
                blocks = self.table(a, b).blocks(vectors_of_blocks[sel])
                idx = layout.block_offset[sel][:, None] + np.arange(blocks[0].size)[None, :]
                out[idx.reshape(-1)] = blocks.reshape(-1)
        return out


def orbital_populations(layout, density: np.ndarray, overlap: np.ndarray, fold: bool) -> np.ndarray:
    """Mulliken orbital populations (D S)_mu,mu, from flat per-image D and S.

    A Γ-only (folded) DM applies to every image pair, so D and S are folded
    before they are multiplied; with images kept, each image pairs with its own S.
    """
    if fold:
        from .dm import flat_to_csr

        d, s = flat_to_csr(layout, density, True), flat_to_csr(layout, overlap, True)
        return np.asarray(d.multiply(s).sum(axis=1)).ravel()
    return np.bincount(layout.rows, weights=density * overlap, minlength=layout.no)


def electron_count(layout, density: np.ndarray, overlap: np.ndarray, fold: bool) -> float:
    """Tr(D S): the number of electrons a DM holds."""
    return float(orbital_populations(layout, density, overlap, fold).sum())


def mulliken_charges(layout, density, overlap, fold: bool, valence_per_atom: np.ndarray) -> np.ndarray:
    """Mulliken net charge of every atom (valence electrons minus population; positive = electron-poor)."""
    pop = orbital_populations(layout, density, overlap, fold)
    atom_of_orbital = np.repeat(np.arange(len(valence_per_atom)), layout.orbitals_per_atom)
    return np.asarray(valence_per_atom, float) - np.bincount(atom_of_orbital, weights=pop,
                                                             minlength=len(valence_per_atom))
