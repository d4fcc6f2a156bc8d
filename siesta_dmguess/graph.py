"""Atom-pair graphs with periodic images, built in O(N) with ASE's neighbour list.

Two graphs are used:

* the **pattern** graph: every atom pair (i, j, image shift) whose DM block SIESTA
  stores. SIESTA keeps an orbital pair when the two orbitals overlap, or when both
  overlap a common Kleinman-Bylander projector (the non-local pseudopotential
  couples them). :func:`pattern_pairs` reproduces that rule at the atom level.
* the **message-passing** graph: pairs closer than a fixed model cutoff.

For a Γ-only run of a small periodic cell the pattern can be extended
(:func:`extend_for_folding`): SIESTA's Γ DM element (i, j) is the sum of the
DM over *every* image of j, not only those within orbital range, because it
comes from diagonalizing H at Γ. A model that is to reproduce it needs blocks for
the farther images too; they fold onto elements SIESTA already stores.

Edges are directed; every pair appears in both directions, and ``reverse[e]``
is the index of the opposite edge, which lets the model symmetrize blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.neighborlist import neighbor_list


@dataclass
class Edges:
    """Directed atom pairs: ``vectors[e] = r[dst] + shift @ cell - r[src]`` in Å."""

    src: np.ndarray  # (E,) int64
    dst: np.ndarray  # (E,) int64
    shift: np.ndarray  # (E, 3) int64 cell shift of dst
    vectors: np.ndarray  # (E, 3) float64
    reverse: np.ndarray  # (E,) int64
    added: np.ndarray | None = None  # (E,) bool: pairs beyond SIESTA's pattern, added for folding (None: none)

    def __len__(self) -> int:
        return int(self.src.size)

    @property
    def nsc(self) -> np.ndarray:
        """Supercell size (per lattice vector) needed to hold every image of this graph."""
        if len(self) == 0:
            return np.ones(3, dtype=np.int64)
        return 2 * np.abs(self.shift).max(axis=0) + 1


def _finish(atoms: Atoms, src, dst, shift) -> Edges:
    """Sort, deduplicate and attach vectors and reverse indices."""
    src, dst, shift = np.asarray(src, np.int64), np.asarray(dst, np.int64), np.asarray(shift, np.int64)
    keys = np.column_stack([src, dst, shift]) if src.size else np.zeros((0, 5), np.int64)
    keys = np.unique(keys, axis=0)  # sorted by (src, dst, shift): a canonical order
    src, dst, shift = keys[:, 0], keys[:, 1], keys[:, 2:5]
    pos, cell = atoms.get_positions(), np.asarray(atoms.cell)
    vectors = pos[dst] + shift @ cell - pos[src]
    # The reverse of (i, j, S) is (j, i, -S); it is present because the rules are symmetric.
    rev_keys = np.column_stack([dst, src, -shift])
    reverse = lookup_rows(keys, rev_keys)
    return Edges(src, dst, shift, vectors, reverse)


def lookup_rows(table: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Index of every row of ``rows`` in the lexicographically sorted ``table``."""
    if table.shape[0] == 0:
        return np.zeros(0, np.int64)
    base = table.max(axis=0) - table.min(axis=0) + 1
    lo = table.min(axis=0)

    def encode(a):
        code = np.zeros(a.shape[0], dtype=np.int64)
        for c in range(a.shape[1]):
            code = code * base[c] + (a[:, c] - lo[c])
        return code

    t, r = encode(table), encode(rows)
    order = np.argsort(t)
    idx = order[np.searchsorted(t, r, sorter=order)]
    if not np.array_equal(table[idx], rows):
        raise AssertionError("a row is not in the table (an edge set that is not symmetric?)")
    return idx


def radius_pairs(atoms: Atoms, cutoff: float) -> Edges:
    """All directed pairs (i != j or a non-zero image) closer than ``cutoff`` Å."""
    i, j, S = neighbor_list("ijS", atoms, float(cutoff), self_interaction=False)
    return _finish(atoms, i, j, S)


def pattern_pairs(atoms: Atoms, orbital_radius: np.ndarray, kb_radius: np.ndarray) -> Edges:
    """SIESTA's DM sparsity pattern at the atom level (on-site pairs excluded).

    ``orbital_radius[a]`` is atom a's largest orbital cutoff, ``kb_radius[a]`` its
    largest KB projector cutoff (both Å). A pair is kept when the orbital spheres
    overlap, or when both overlap the KB sphere of a third atom k.
    """
    orbital_radius = np.asarray(orbital_radius, float)
    # Orbital overlap: |r_ij| < R_i + R_j (ASE applies per-atom cutoffs that way).
    i, j, S = neighbor_list("ijS", atoms, orbital_radius, self_interaction=False)
    src, dst, shift = [i], [j], [S]
    k, a, Sa, _ = kb_members(atoms, orbital_radius, kb_radius)
    first, second = kb_member_pairs(k)
    src.append(a[first]), dst.append(a[second]), shift.append(Sa[second] - Sa[first])
    return _finish(atoms, np.concatenate(src), np.concatenate(dst), np.concatenate(shift))


def kb_members(atoms: Atoms, orbital_radius: np.ndarray, kb_radius: np.ndarray):
    """Atoms whose largest orbital reaches a KB projector: (k, a, Sa, d) sorted by k, where atom a in image Sa
    lies at distance d < orbital_radius[a] + kb_radius[k] from projector atom k (Å)."""
    orbital_radius, kb_radius = np.asarray(orbital_radius, float), np.asarray(kb_radius, float)
    if kb_radius.max(initial=0.0) <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3), np.int64), np.zeros(0)
    reach = np.maximum(orbital_radius, kb_radius)
    k, a, Sa, d = neighbor_list("ijSd", atoms, reach, self_interaction=True)
    keep = d < orbital_radius[a] + kb_radius[k]
    order = np.argsort(k[keep], kind="stable")
    return k[keep][order], a[keep][order], Sa[keep][order], d[keep][order]


def kb_member_pairs(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every ordered pair (p, q), p != q, of members sharing a projector atom (``k`` sorted): the index arrays."""
    counts = np.bincount(k, minlength=int(k.max(initial=-1)) + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    sizes = counts[k]
    # For member p of a group, pair it with every member q of the same group.
    first = np.repeat(np.arange(k.size), sizes)
    offset = np.arange(first.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    second = starts[k[first]] + offset
    not_self = first != second
    return first[not_self], second[not_self]


def extend_for_folding(atoms: Atoms, pattern: Edges, reach: float) -> Edges:
    """``pattern`` plus every farther image pair (i, j, S) within ``reach`` Å whose folded element (i, j) the
    pattern already has (through another image, or i = j): what a folded Γ-only DM sums beyond orbital range.

    In a cell larger than ``reach`` plus the orbital range no such pair exists, so large systems keep SIESTA's
    pattern; the neighbour search out to ``reach`` is the only extra cost (O(N)).
    """
    if reach <= 0 or not np.any(atoms.pbc) or len(pattern) == 0:
        return pattern
    far = radius_pairs(atoms, reach)
    n = len(atoms)
    folded = np.unique(pattern.src * n + pattern.dst)
    key = far.src * n + far.dst
    keep = (far.src == far.dst) | np.isin(key, folded)
    edges = _finish(atoms, np.concatenate([pattern.src, far.src[keep]]), np.concatenate([pattern.dst, far.dst[keep]]),
                    np.concatenate([pattern.shift, far.shift[keep]]))
    # _finish sorts by (src, dst, shift), as the pattern is sorted: mark the edges that are not the pattern's.
    own = np.column_stack([pattern.src, pattern.dst, pattern.shift])
    edges.added = np.ones(len(edges), bool)
    edges.added[lookup_rows(np.column_stack([edges.src, edges.dst, edges.shift]), own)] = False
    return edges
