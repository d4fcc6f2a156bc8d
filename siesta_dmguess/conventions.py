"""The one place that knows how SIESTA orders and signs its orbitals, relative to e3nn.

Two facts, both checked numerically in ``tests/test_conventions.py`` against sisl's
orbital functions and against SIESTA's own density matrices of rotated molecules:

1. **Frame.** e3nn's real spherical harmonics equal the textbook real Y_lm
   (m = -l..l) when e3nn is handed the Cartesian vector in the order (y, z, x).
   So all vectors enter the network through :func:`to_e3nn_frame`, and a Cartesian
   rotation R acts on irreps as ``D_from_matrix(P R P^T)`` (:func:`rotation_to_e3nn`).
2. **Phase.** SIESTA's real harmonics are (-1)^m times the textbook ones, and an
   l-shell's orbitals are stored m = -l..l (p: y, z, x; d: xy, yz, z², xz, x²-y²).

Hence one orbital block converts between the two bases by a sign per row and per
column: ``D_e3nn[a, b] = s_a D_siesta[a, b] s_b`` with ``s = (-1)^m``; the map is
its own inverse.
"""

from __future__ import annotations

import numpy as np

# v_e3nn = CARTESIAN_TO_E3NN @ v_cartesian: (x, y, z) -> (y, z, x)
CARTESIAN_TO_E3NN = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])


def to_e3nn_frame(vectors):
    """Reorder Cartesian vectors (..., 3) into e3nn's frame (y, z, x). Works for numpy and torch."""
    return vectors[..., [1, 2, 0]]


def rotation_to_e3nn(rotation: np.ndarray) -> np.ndarray:
    """The e3nn-frame matrix of a Cartesian rotation (feed it to ``Irrep.D_from_matrix``)."""
    return CARTESIAN_TO_E3NN @ np.asarray(rotation) @ CARTESIAN_TO_E3NN.T


def shell_signs(l: int) -> np.ndarray:
    """(-1)^m for m = -l..l: SIESTA's phase relative to e3nn for one shell."""
    m = np.arange(-l, l + 1)
    return np.where(m % 2 == 0, 1.0, -1.0)


def orbital_signs(orbital_m: np.ndarray) -> np.ndarray:
    """(-1)^m for every orbital of a species (``SpeciesBasis.orbital_m``)."""
    return np.where(np.asarray(orbital_m) % 2 == 0, 1.0, -1.0)


def convert_blocks(blocks, signs_row, signs_col):
    """Convert a stack of orbital blocks (..., n_row, n_col) SIESTA <-> e3nn (same map both ways)."""
    return blocks * signs_row[..., :, None] * signs_col[..., None, :]
