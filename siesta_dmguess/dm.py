"""Density matrices: orbital blocks <-> sisl ``DensityMatrix`` <-> SIESTA ``.DM`` files.

All blocks of one structure live in one flat array (see :class:`BlockLayout`):
first the on-site block of every atom, then one block per directed pattern edge,
each stored row-major. Every element knows its orbital row, its supercell column
(``orbital + image_index * no`` in sisl's ordering of the images) and its
SIESTA/e3nn sign, so conversions are single vectorized operations.

Units: the DM is dimensionless (electrons); SIESTA stores it per spin. Files are
read and written with sisl's ``dmSileSiesta``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .basis import SpeciesBasis, atom_radii
from .conventions import orbital_signs
from .errors import InputFileError
from .files import atomic_write, check_output_file, fortran_path, move_to_backup
from .graph import Edges, Neighbours, kb_member_pairs, kb_members, lookup_rows
from .structure import Structure

log = logging.getLogger(__name__)


def build_geometry(structure: Structure, basis: dict[str, SpeciesBasis], nsc=(1, 1, 1)):
    """A sisl Geometry whose atoms carry the basis' orbitals (needed for every sisl DM read)."""
    import sisl

    missing = sorted(set(structure.labels) - set(basis))
    if missing:
        raise InputFileError(f"no basis for species {missing}", structure.source or None)
    atoms = {label: basis[label].sisl_atom() for label in set(structure.labels)}
    cell = np.asarray(structure.atoms.cell)
    if np.linalg.matrix_rank(cell) < 3:  # isolated molecule without a box: any cell, no images
        span = np.ptp(structure.atoms.positions, axis=0) + 2 * max(b.max_radius for b in basis.values()) + 1
        cell = np.diag(span)
        nsc = (1, 1, 1)
    lattice = sisl.Lattice(cell, nsc=[int(n) for n in nsc])
    return sisl.Geometry(structure.atoms.positions, [atoms[l] for l in structure.labels], lattice=lattice)


@dataclass
class BlockLayout:
    """Where each element of the flat block array goes in the (supercell) DM."""

    no: int  # orbitals in the unit cell
    nsc: np.ndarray  # (3,) supercell needed by the pattern
    block_i: np.ndarray  # (B,) row atom of each block (on-site blocks first)
    block_j: np.ndarray  # (B,) column atom
    block_shift: np.ndarray  # (B, 3) image of the column atom
    block_offset: np.ndarray  # (B + 1,) start of each block in the flat array
    rows: np.ndarray  # (M,) orbital row of each flat element
    cols: np.ndarray  # (M,) supercell column, sisl image order for ``nsc``
    signs: np.ndarray  # (M,) (-1)^(m_row + m_col): e3nn <-> SIESTA
    atomic: np.ndarray  # (M,) SIESTA's atomic-guess DM (q0 on the on-site diagonals)
    transpose: np.ndarray  # (M,) flat index of the transposed element: (j, i, -S)[b, a] of (i, j, S)[a, b]

    @property
    def orbitals_per_atom(self) -> np.ndarray:
        """Orbitals of every atom (the on-site blocks are square and come first)."""
        nat = self.n_onsite
        return np.sqrt(np.diff(self.block_offset[: nat + 1])).round().astype(np.int64)

    @property
    def n_onsite(self) -> int:
        return int(np.sum((self.block_i == self.block_j) & np.all(self.block_shift == 0, axis=1)))

    @property
    def size(self) -> int:
        return int(self.rows.size)

    @property
    def element_block(self) -> np.ndarray:
        """(M,) the block of every flat element (on-site blocks are the first ``n_onsite``)."""
        return np.repeat(np.arange(self.block_i.size), np.diff(self.block_offset))

    def block_vectors(self, structure: Structure) -> np.ndarray:
        """(B, 3) vector in Å from each block's row atom to its column atom's image (zero on-site)."""
        pos, cell = structure.atoms.get_positions(), np.asarray(structure.atoms.cell)
        return pos[self.block_j] + self.block_shift @ cell - pos[self.block_i]


def image_index(lattice, shifts: np.ndarray) -> np.ndarray:
    """sisl's supercell index of each integer image shift (rows of ``shifts``)."""
    shifts = np.atleast_2d(shifts)
    if shifts.shape[0] == 0:
        return np.zeros(0, np.int64)
    return np.asarray(lattice.sc_index(shifts), dtype=np.int64).reshape(-1)


def build_layout(structure: Structure, basis: dict[str, SpeciesBasis], pattern: Edges, lattice) -> BlockLayout:
    """Flat layout for on-site blocks + one block per pattern edge, in the image order of ``lattice``."""
    labels = structure.labels
    norb = np.array([basis[l].norb for l in labels])
    first = np.concatenate([[0], np.cumsum(norb)[:-1]])
    no = int(norb.sum())
    nat = len(labels)
    block_i = np.concatenate([np.arange(nat), pattern.src])
    block_j = np.concatenate([np.arange(nat), pattern.dst])
    block_shift = np.concatenate([np.zeros((nat, 3), np.int64), pattern.shift])
    sizes = norb[block_i] * norb[block_j]
    offset = np.concatenate([[0], np.cumsum(sizes)])
    # Element coordinates inside each block, vectorized over blocks.
    total = int(offset[-1])
    blk = np.repeat(np.arange(block_i.size), sizes)
    local = np.arange(total) - offset[blk]
    ncol = norb[block_j][blk]
    a, b = local // ncol, local % ncol
    isc = image_index(lattice, block_shift)
    rows = first[block_i][blk] + a
    cols = first[block_j][blk] + b + isc[blk] * no
    m_per_orbital = np.concatenate([basis[l].orbital_m for l in labels])
    sign_per_orbital = orbital_signs(m_per_orbital)
    signs = sign_per_orbital[rows] * sign_per_orbital[cols % no]
    q0 = np.concatenate([basis[l].orbital_q0 for l in labels])
    atomic = np.where((blk < nat) & (a == b), q0[rows], 0.0)
    # D_ji(-S) = D_ij(S)^T: the partner of element (a, b) of block k is (b, a) of its reverse block.
    reverse_block = np.concatenate([np.arange(nat), nat + pattern.reverse])
    partner = reverse_block[blk]
    transpose = offset[partner] + b * norb[block_j[partner]] + a
    return BlockLayout(no, pattern.nsc, block_i, block_j, block_shift, offset, rows, cols, signs, atomic, transpose)


def siesta_orbital_mask(structure: Structure, basis: dict[str, SpeciesBasis], layout: BlockLayout,
                        fold: bool, neighbours: Neighbours | None = None) -> np.ndarray:
    """Which flat elements SIESTA's own sparsity pattern holds: (M,) bool.

    The layout keeps whole atom-pair blocks, but SIESTA stores an *orbital* pair only
    when the two orbitals overlap, or both reach the KB projector of a common atom
    (its ``hsparse``). The other elements of a block (e.g. two short second-ζ
    orbitals of atoms 5 Å apart; 30 % of a silicon cell's elements) carry no training
    signal and no physics (S and H vanish there), so the written file leaves them out.
    sisl has no such rule (it knows orbital ranges, not projectors), hence this function.
    With ``fold``, every image of a folded element that SIESTA stores is kept (their sum is that element).
    ``neighbours`` (:class:`~siesta_dmguess.graph.Neighbours`, reaching the pattern's range) saves a search.
    """
    labels = structure.labels
    radius = np.concatenate([basis[l].orbital_radius for l in labels])
    atom_radius, kb = atom_radii(labels, basis)
    blk = layout.element_block
    r_row, r_col = radius[layout.rows], radius[layout.cols % layout.no]
    mask = np.linalg.norm(layout.block_vectors(structure), axis=1)[blk] < r_row + r_col
    # Shared projector k: element (o1, o2) of block (a, b) is kept when some k has
    # d_ak - Rkb_k < r_o1 and d_bk - Rkb_k < r_o2. Per block and per orbital radius level
    # r, keep the smallest d_bk - Rkb_k over the k's with d_ak - Rkb_k < r.
    k, a, Sa, d = kb_members(structure.atoms, atom_radius, kb, neighbours)
    if k.size:
        p, q = kb_member_pairs(k)
        keys = np.column_stack([layout.block_i, layout.block_j, layout.block_shift])
        block = lookup_rows(keys, np.column_stack([a[p], a[q], Sa[q] - Sa[p]]))
        slack = d - kb[k]
        levels = np.unique(radius)
        best = np.full((layout.block_i.size, levels.size), np.inf)
        for n, r in enumerate(levels):
            near = slack[p] < r
            np.minimum.at(best[:, n], block[near], slack[q][near])
        mask |= r_col > best[blk, np.searchsorted(levels, r_row)]
    if fold:  # only atom pairs present with several images have elements that fold together
        pair = layout.block_i * len(labels) + layout.block_j
        _, first, count = np.unique(pair, return_inverse=True, return_counts=True)
        several = (count[first] > 1)[blk]
        code = layout.rows[several] * layout.no + layout.cols[several] % layout.no
        mask[several] = np.isin(code, code[mask[several]])
    return mask


def flat_to_csr(layout: BlockLayout, values: np.ndarray, fold: bool, keep: np.ndarray | None = None) -> sp.csr_matrix:
    """Assemble flat SIESTA-basis values into a (no, no*n_images) or folded (no, no) CSR matrix, storing only the
    elements ``keep`` selects (:func:`siesta_orbital_mask`; default: all)."""
    n_images = 1 if fold else int(np.prod(layout.nsc))
    rows, cols = layout.rows, layout.cols % layout.no if fold else layout.cols
    if keep is not None:
        values, rows, cols = values[keep], rows[keep], cols[keep]
    mat = sp.coo_matrix((values, (rows, cols)), shape=(layout.no, layout.no * n_images))
    return mat.tocsr()  # duplicates (several images on one folded element) are summed


def density_matrix_from_flat(structure: Structure, basis, layout: BlockLayout, values: np.ndarray, fold: bool,
                             keep: np.ndarray | None = None):
    """A sisl DensityMatrix (1 spin) from flat SIESTA-basis values, on SIESTA's own sparsity pattern.

    ``fold=True`` sums periodic images into the unit cell (``nsc = 1``), the form a
    Γ-only SIESTA run writes; ``fold=False`` keeps one column block per image.
    ``keep``: :func:`siesta_orbital_mask` if already computed.
    """
    import sisl

    geometry = build_geometry(structure, basis, nsc=(1, 1, 1) if fold else layout.nsc)
    if keep is None:
        keep = siesta_orbital_mask(structure, basis, layout, fold)
    return sisl.DensityMatrix.fromsp(geometry, [flat_to_csr(layout, values, fold, keep)])


def reference_lookup(layout: BlockLayout, dm_ref) -> tuple[np.ndarray, np.ndarray]:
    """Map every flat element onto the stored elements of a reference DM.

    Returns ``(target_index, ref_values)``: ``ref_values`` are the reference's stored
    elements (spin 0) and ``target_index[k]`` the stored element that flat element
    k contributes to (-1 if the reference does not store it). A folded reference
    receives several images per element; summing over ``target_index`` folds.
    """
    csr = dm_ref.tocsr(0).tocsr()
    csr.sort_indices()
    no = dm_ref.no
    ref_nsc = np.asarray(dm_ref.geometry.lattice.nsc)
    # Translate our (row, image, column) into the reference's supercell columns.
    if np.prod(ref_nsc) == 1:
        cols = layout.cols % no
        valid = np.ones(layout.size, bool)
    else:
        our_isc = layout.cols // no
        offsets = _lattice_offsets(layout.nsc)[our_isc]
        valid = np.all(np.abs(offsets) <= (ref_nsc // 2), axis=1)
        ref_isc = np.full(layout.size, -1, np.int64)
        ref_isc[valid] = image_index(dm_ref.geometry.lattice, offsets[valid])
        cols = layout.cols % no + ref_isc * no
    ncols = csr.shape[1]
    ref_keys = csr_keys(csr)
    our_keys = layout.rows.astype(np.int64) * ncols + cols
    pos = np.searchsorted(ref_keys, our_keys)
    pos = np.minimum(pos, max(ref_keys.size - 1, 0))
    found = valid & (ref_keys.size > 0) & (ref_keys[pos] == our_keys)
    return np.where(found, pos, -1), np.asarray(csr.data, dtype=np.float64)


def csr_keys(csr) -> np.ndarray:
    """Row-major key (row * ncols + col) of every stored element of a CSR matrix with sorted indices."""
    rows = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr)).astype(np.int64)
    return rows * csr.shape[1] + csr.indices


def values_at_stored(dm_ref, matrix) -> np.ndarray | None:
    """A sisl sparse matrix of the same run (S, or H's first spin component) at every stored element of a
    reference DM (same supercell), for Tr(D S) and Tr(D H); zero where it stores nothing, None if the layouts
    differ."""
    d, s = dm_ref.tocsr(0).tocsr(), matrix.tocsr(0).tocsr()
    if d.shape != s.shape:
        return None
    d.sort_indices(), s.sort_indices()
    dk, sk = csr_keys(d), csr_keys(s)
    pos = np.clip(np.searchsorted(sk, dk), 0, max(sk.size - 1, 0))
    return np.where(sk[pos] == dk, s.data[pos], 0.0)


def _lattice_offsets(nsc) -> np.ndarray:
    """sisl's integer offsets of every image for a supercell ``nsc`` (index = image index)."""
    import sisl

    return np.asarray(sisl.Lattice(np.eye(3), nsc=[int(n) for n in nsc]).sc_off, dtype=np.int64)


# Image offsets of up to ±HISTORY_REACH cells per axis are kept when DMs of different steps are combined.
HISTORY_REACH = 4


def to_image_keyed(dm) -> sp.csr_matrix:
    """One spin of a sisl DM as a CSR matrix whose columns are keyed by (image offset, orbital) on a fixed grid
    of offsets (-R..R per axis, R = :data:`HISTORY_REACH`), so that DMs whose sisl supercells differ (``nsc``
    changes as atoms move, SIESTA writes its own) can be added and extrapolated along a trajectory.

    A folded DM (``nsc = 1``, Γ-only runs) is returned as its (no, no) CSR. sisl's image order depends on
    ``nsc``; this fixed key does not, hence written here.
    """
    csr = dm.tocsr(0)
    nsc = np.asarray(dm.geometry.lattice.nsc)
    if np.all(nsc == 1):
        return sp.csr_matrix(csr)
    no = dm.no
    coo = csr.tocoo()
    shifts = _lattice_offsets(nsc)[coo.col // no]
    keep = np.all(np.abs(shifts) <= HISTORY_REACH, axis=1)
    width = 2 * HISTORY_REACH + 1
    key = np.ravel_multi_index((shifts[keep] + HISTORY_REACH).T, (width,) * 3)
    return sp.csr_matrix((coo.data[keep], (coo.row[keep], key * no + coo.col[keep] % no)),
                         shape=(no, no * width**3))


def shift_image_keys(matrix: sp.spmatrix, orbital_shift: np.ndarray) -> sp.csr_matrix:
    """An image-keyed matrix (:func:`to_image_keyed`) of a step whose atoms sat a whole number of cells away from
    where they sit now (a trajectory wrapped into the cell, an atom jumping across it): element (i, j, R) is the
    pair that is now (i, j, R + n_j - n_i), ``orbital_shift`` (no, 3) holding each orbital's atom's n (its old
    position minus its current one, in lattice vectors). Keys beyond :data:`HISTORY_REACH` are dropped; a folded
    (no, no) matrix, whose images are summed, is returned as it is."""
    matrix = sp.csr_matrix(matrix)
    no = matrix.shape[0]
    if matrix.shape[1] == no or not np.any(orbital_shift):
        return matrix
    width = 2 * HISTORY_REACH + 1
    coo = matrix.tocoo()
    shifts = np.stack(np.unravel_index(coo.col // no, (width,) * 3), axis=1) - HISTORY_REACH
    j = coo.col % no
    shifts = shifts + orbital_shift[j] - orbital_shift[coo.row]
    keep = np.all(np.abs(shifts) <= HISTORY_REACH, axis=1)
    key = np.ravel_multi_index((shifts[keep] + HISTORY_REACH).T, (width,) * 3)
    return sp.csr_matrix((coo.data[keep], (coo.row[keep], key * no + j[keep])), shape=matrix.shape)


def from_image_keyed(matrix: sp.spmatrix, geometry):
    """The sisl DensityMatrix of an image-keyed matrix (:func:`to_image_keyed`) on ``geometry``, whose supercell
    is widened to hold every image present (a folded (no, no) matrix keeps ``geometry`` as it is).

    Every diagonal element is kept in the pattern, as SIESTA's ``.DM`` needs: scipy's arithmetic on the history
    drops an element that is exactly zero (a d orbital that symmetry leaves empty), and sisl would add it back on
    writing, with a warning."""
    import sisl

    no = geometry.no
    coo = sp.coo_matrix(matrix)
    if matrix.shape[1] == no:
        shape, columns = (no, no), coo.col
    else:
        width = 2 * HISTORY_REACH + 1
        shifts = np.stack(np.unravel_index(coo.col // no, (width,) * 3), axis=1) - HISTORY_REACH
        reach = np.abs(shifts).max(axis=0) if shifts.size else np.zeros(3, int)
        nsc = [int(max(2 * r + 1, n)) for r, n in zip(reach, geometry.lattice.nsc)]
        geometry = geometry.copy()
        geometry.set_nsc(nsc)
        shape, columns = (no, no * int(np.prod(nsc))), image_index(geometry.lattice, shifts) * no + coo.col % no
    diagonal = np.arange(no)  # the unit cell's own image is image 0 (sisl's ordering)
    csr = sp.csr_matrix((np.concatenate([coo.data, np.zeros(no)]), (np.concatenate([coo.row, diagonal]),
                                                                     np.concatenate([columns, diagonal]))), shape=shape)
    return sisl.DensityMatrix.fromsp(geometry, [csr])


def check_dm_file(path: str | Path) -> tuple[int, int]:
    """Validate a SIESTA ``.DM``'s record structure; return (orbitals, spins).

    SIESTA writes it as Fortran sequential records: (no_u, nspin[, nsc(3)]),
    numd(no_u), one listd record per row, then nspin * no_u value records. sisl
    hands the file to compiled Fortran that can crash the interpreter (or try a
    huge allocation) on a truncated or corrupt file, so the markers are checked
    here first, in Python, and each row's columns (sisl reads a column 0 or a
    repeated one without a word, adding its value onto another element); the
    values themselves are checked once read (:func:`read_density_matrix`).
    """
    import struct

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:

        def record(expect: int | None, what: str, read: bool = True) -> bytes | None:
            head = f.read(4)
            if len(head) < 4:
                raise InputFileError(f"the .DM file is truncated (missing {what})", path)
            n = struct.unpack("<i", head)[0]
            if n < 0 or f.tell() + n + 4 > size or (expect is not None and n != expect):
                raise InputFileError(f"the .DM file is truncated or corrupt (bad record for {what})", path)
            body = f.read(n) if read else None
            if not read:
                f.seek(n, 1)
            if f.read(4) != head:
                raise InputFileError(f"the .DM file is corrupt (record markers of {what} disagree)", path)
            return body

        header = record(None, "the header")
        if len(header) not in (8, 20):
            raise InputFileError("the .DM file is corrupt (unexpected header)", path)
        no, nspin = struct.unpack("<2i", header[:8])
        if not (0 < no < 10**8 and 0 < nspin <= 8):
            raise InputFileError(f"the .DM file is corrupt (header says {no} orbitals, {nspin} spins)", path)
        nsc = struct.unpack("<3i", header[8:]) if len(header) == 20 else None
        if nsc is not None and not all(0 < n < 10**3 and n % 2 == 1 for n in nsc):
            raise InputFileError(f"the .DM file is corrupt (header says supercell {list(nsc)})", path)
        columns = no * int(np.prod(nsc)) if nsc is not None else None  # (an old header without nsc: unknown)
        numd = np.frombuffer(record(4 * no, "numd"), dtype="<i4")
        if np.any(numd < 0):
            raise InputFileError("the .DM file is corrupt (negative row lengths)", path)
        for row in range(no):
            cols = np.frombuffer(record(4 * int(numd[row]), f"the columns of row {row + 1}"), dtype="<i4")
            if cols.size and (cols.min() < 1 or (columns is not None and cols.max() > columns)
                              or np.unique(cols).size != cols.size):
                raise InputFileError(f"the .DM file is corrupt (row {row + 1} has a column outside 1..{columns or 'no'} "
                                     f"or the same column twice)", path)
        for _ in range(nspin):
            for row in range(no):
                record(8 * int(numd[row]), f"the values of row {row + 1}", read=False)
        if f.tell() != size:
            raise InputFileError("the .DM file has trailing data after the last record", path)
    return int(no), int(nspin)


def read_density_matrix(path: str | Path, geometry):
    """Read a SIESTA ``.DM`` for a geometry whose atoms carry the basis; clear errors if it does not fit."""
    import sisl

    path = Path(path)
    if not path.is_file():
        raise InputFileError("density matrix file not found", path)
    if path.stat().st_size < 16:
        raise InputFileError("the .DM file is empty or truncated", path)
    no, nspin = check_dm_file(path)
    if nspin != 1:  # taking one component of these (as sisl's tocsr(0) would) misleads without a word
        raise InputFileError(f"the .DM holds {nspin} spin components (a spin-polarized, non-collinear or spin-orbit "
                             "run); siesta_dmguess reads spin-unpolarized DMs only (docs/conventions.md, \"Spin\")",
                             path)
    if no != geometry.no:
        raise InputFileError(f"the .DM has {no} orbitals but the structure has {geometry.no}", path)
    try:
        with fortran_path(path) as readable:
            dm = sisl.get_sile(str(readable)).read_density_matrix(geometry=geometry)
    except InputFileError:
        raise
    except Exception as exc:
        text = str(exc)
        if "orbitals" in text or "no_u" in text or "shape" in text:
            raise InputFileError(f"the .DM does not match the structure ({text})", path) from exc
        raise InputFileError(f"the .DM file is truncated or corrupt ({type(exc).__name__}: {text})", path) from exc
    if dm.no != geometry.no:
        raise InputFileError(f"the .DM has {dm.no} orbitals but the structure has {geometry.no}", path)
    values = dm._csr.data[..., 0]  # (sisl's sparse storage: its public tocsr builds a copy per spin)
    if not np.isfinite(values).all():
        raise InputFileError(f"the .DM holds {int((~np.isfinite(values)).sum())} values that are not finite numbers "
                             "(NaN or inf)", path)
    return dm


def read_dm_orbital_count(path: str | Path) -> int:
    """Number of orbitals in a ``.DM`` file's header (without a geometry)."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError("density matrix file not found", path)
    return check_dm_file(path)[0]


def check_dm_output(path: str | Path) -> Path:
    """``path`` if a ``.DM`` can be written there: error naming it if a folder is in the way, its folder does not
    exist, or it does not end in ``.DM`` (SIESTA reads ``<SystemLabel>.DM``). ``predict`` checks this before the
    prediction, not after it."""
    path = Path(path)
    check_output_file(path)
    if path.suffix != ".DM":
        raise InputFileError("a SIESTA density matrix file must end in .DM", path)
    return path


def write_density_matrix(dm, path: str | Path, overwrite: bool = False) -> Path | None:
    """Write a DM as a SIESTA ``.DM`` atomically.

    The file is written to a temporary name in the same folder and renamed into
    place, so a crash never leaves a half-written ``.DM``. An existing file is
    kept as ``<name>.bak`` (numbered if needed) unless ``overwrite`` is True.
    Returns the backup path, if one was made.
    """
    import sisl

    path = check_dm_output(path)
    backup = None

    def keep_existing():
        nonlocal backup
        if path.exists() and not overwrite:
            backup = move_to_backup(path)
            log.warning("kept the existing %s as %s", path, backup)

    def write(tmp: Path):
        with fortran_path(tmp, write=True) as writable:
            sisl.get_sile(str(writable), mode="w").write_density_matrix(dm)
        try:  # sisl's Fortran writer does not report a failed write (a full disk): the file must read back whole
            check_dm_file(tmp)
        except InputFileError as exc:
            raise InputFileError(f"the .DM could not be written whole ({exc.message}; is the disk full?); the "
                                 "existing file, if any, is left as it was", path) from None

    atomic_write(path, write, suffix=".DM", before_replace=keep_existing)
    return backup
