"""DM sparsity pattern, .DM round trips, atomic writes with backups, and bad .DM files."""

import json
from pathlib import Path

import numpy as np
import pytest

from siesta_dmguess.data import load_run, prepare_sample
from siesta_dmguess.dm import (build_geometry, density_matrix_from_flat, read_density_matrix,
                               write_density_matrix)
from siesta_dmguess.errors import InputFileError

from .conftest import dataset

ALL = ["h2o", "water8", "rotations", "g2", "si8"]


def _runs(name, n):
    root = dataset(name)
    records = json.loads((root / "index.json").read_text())
    step = max(1, len(records) // n)
    return [root / r["id"] for r in records[::step][:n]]


def reference_flat(sample):
    """Flat values that reproduce the reference: each stored element on the first flat element mapped to it."""
    vals = np.zeros(sample.layout.size)
    idx = sample.target_index
    first = {}
    for k in np.nonzero(idx >= 0)[0]:
        first.setdefault(idx[k], k)
    keys = np.fromiter(first.keys(), int)
    vals[np.fromiter(first.values(), int)] = sample.target_values[keys]
    return vals


@pytest.mark.parametrize("name", ALL)
def test_pattern_covers_reference(name):
    """Pairs built from geometry + basis (orbital and KB-projector overlap) hold every stored DM element, and
    the file we write stores no element SIESTA does not."""
    worst = 0.0
    for folder in _runs(name, 4):
        structure, basis, dm, _ = load_run(folder)
        sample = prepare_sample(structure, basis, sorted(basis), 3.0, dm)
        covered = np.zeros(sample.target_values.size, bool)
        covered[sample.target_index[sample.target_index >= 0]] = True
        ref = sample.target_values
        frac = np.sqrt(np.sum(ref[~covered] ** 2) / np.sum(ref**2))
        worst = max(worst, frac)
        # Our supercell is the one SIESTA chose (k-point runs store images).
        if np.prod(dm.geometry.lattice.nsc) > 1:
            assert list(sample.layout.nsc) == list(dm.geometry.lattice.nsc)
        # The written file stores SIESTA's orbital pattern, not whole atom-pair blocks: no element beyond it.
        written = density_matrix_from_flat(structure, basis, sample.layout, np.ones(sample.layout.size), sample.fold)
        ours, theirs = written.tocsr(0).tocoo(), dm.tocsr(0).tocoo()
        extra = set(zip(ours.row, ours.col)) - set(zip(theirs.row, theirs.col))
        assert not extra, f"{folder}: {len(extra)} written elements SIESTA does not store"
        assert sample.in_siesta_pattern.sum() < sample.layout.size or name not in ("si8", "water8")
    print(f"{name}: fraction of the reference Frobenius norm outside the pattern <= {worst:.1e}")
    assert worst < 1e-4


@pytest.mark.parametrize("name", ["h2o", "water8", "si8"])
def test_read_write_read_is_identical(name, tmp_path):
    folder = _runs(name, 1)[0]
    structure, basis, dm, _ = load_run(folder)
    out = tmp_path / "copy.DM"
    write_density_matrix(dm, out)
    again = read_density_matrix(out, dm.geometry)
    a, b = dm.tocsr(0), again.tocsr(0)
    assert a.shape == b.shape and (a != b).nnz == 0


@pytest.mark.parametrize("name", ["water8", "si8"])
def test_blocks_to_dm_reproduces_reference(name, tmp_path):
    """Reference values placed into our blocks and written (folded for Γ runs, with images for k runs)."""
    folder = _runs(name, 1)[0]
    structure, basis, dm, _ = load_run(folder)
    sample = prepare_sample(structure, basis, sorted(basis), 3.0, dm)
    built = density_matrix_from_flat(structure, basis, sample.layout, reference_flat(sample), fold=sample.fold)
    write_density_matrix(built, tmp_path / "built.DM")
    again = read_density_matrix(tmp_path / "built.DM", build_geometry(structure, basis, built.geometry.lattice.nsc))
    a, b = dm.tocsr(0).toarray(), again.tocsr(0).toarray()
    assert a.shape == b.shape and np.abs(a - b).max() < 1e-12


def test_existing_dm_is_kept_as_backup(tmp_path):
    folder = _runs("h2o", 1)[0]
    _, _, dm, _ = load_run(folder)
    target = tmp_path / "siesta.DM"
    target.write_bytes(b"previous run's DM")
    backup = write_density_matrix(dm, target)
    assert backup is not None and backup.read_bytes() == b"previous run's DM"
    second = write_density_matrix(dm, target)
    assert second != backup and second.exists()  # a second backup never clobbers the first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["siesta.DM", "siesta.DM.bak", "siesta.DM.bak1"]
    third = write_density_matrix(dm, target)
    assert third not in (backup, second) and backup.read_bytes() == b"previous run's DM"  # nor the second
    write_density_matrix(dm, target, overwrite=True)
    assert len(list(tmp_path.iterdir())) == 4  # overwrite: no new backup, no temporary left behind


def test_a_dm_write_the_disk_cut_short_is_an_error_that_keeps_the_existing_dm(tmp_path, monkeypatch):
    """sisl's Fortran writer says nothing when a write fails (a full disk): predict reported success over a
    truncated .DM, with SIESTA's DM moved to .bak. The written file is now read back before it replaces any."""
    import sisl

    _, _, dm, _ = load_run(_runs("h2o", 1)[0])
    target = tmp_path / "siesta.DM"
    target.write_bytes(b"previous run's DM")
    plain = sisl.io.siesta.dmSileSiesta.write_density_matrix

    def cut_short(self, *args, **kwargs):  # what a full disk leaves: the first part of the file
        plain(self, *args, **kwargs)
        path = Path(str(self.file))
        path.write_bytes(path.read_bytes()[:4096])

    monkeypatch.setattr(sisl.io.siesta.dmSileSiesta, "write_density_matrix", cut_short)
    with pytest.raises(InputFileError, match=r"siesta.DM: the .DM could not be written whole \(the .DM file is "
                                             r"truncated.*is the disk full\?\)"):
        write_density_matrix(dm, target)
    assert [p.name for p in tmp_path.iterdir()] == ["siesta.DM"] and target.read_bytes() == b"previous run's DM"


def test_a_dm_is_written_and_read_at_a_path_that_is_not_ascii(tmp_path):
    """sisl's Fortran routines take ASCII file names: any other character was a bare TypeError on writing, and
    "truncated or corrupt" on reading a good file."""
    _, _, dm, _ = load_run(_runs("h2o", 1)[0])
    target = tmp_path / "wät er" / "eau·1.DM"
    target.parent.mkdir()
    write_density_matrix(dm, target)
    back = read_density_matrix(target, dm.geometry)
    assert np.array_equal(back.tocsr(0).toarray(), dm.tocsr(0).toarray())
    assert [p.name for p in target.parent.iterdir()] == ["eau·1.DM"]  # no temporary left
    long = tmp_path / ("a" * 248 + ".DM")  # a legal name; its temporary's was "File name too long"
    write_density_matrix(dm, long)
    assert long.is_file()


def test_a_written_dm_gets_the_permissions_of_a_plain_write(tmp_path):
    """Atomic writes go through a private temporary file; the .DM must still be readable as the umask allows."""
    import os
    import stat

    _, _, dm, _ = load_run(_runs("h2o", 1)[0])
    before = os.umask(0o022)
    try:
        write_density_matrix(dm, tmp_path / "siesta.DM")
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "siesta.DM").stat().st_mode) == 0o644


def test_write_refuses_wrong_suffix_and_missing_folder(tmp_path):
    folder = _runs("h2o", 1)[0]
    _, _, dm, _ = load_run(folder)
    with pytest.raises(InputFileError, match="must end in .DM"):
        write_density_matrix(dm, tmp_path / "out.txt")
    with pytest.raises(InputFileError, match="does not exist"):
        write_density_matrix(dm, tmp_path / "nope" / "x.DM")


def test_dm_with_wrong_orbital_count_is_rejected(tmp_path):
    h2o = _runs("h2o", 1)[0]
    w8 = _runs("water8", 1)[0]
    structure, basis, _, _ = load_run(w8)
    with pytest.raises(InputFileError) as err:
        read_density_matrix(h2o / "siesta.DM", build_geometry(structure, basis))
    assert "siesta.DM" in str(err.value) and "orbitals" in str(err.value)


@pytest.mark.parametrize("cut", [0, 10, 200])
def test_truncated_dm_is_rejected(tmp_path, cut):
    folder = _runs("h2o", 1)[0]
    structure, basis, _, _ = load_run(folder)
    data = (folder / "siesta.DM").read_bytes()
    bad = tmp_path / "bad.DM"
    bad.write_bytes(data[:cut])
    with pytest.raises(InputFileError) as err:
        read_density_matrix(bad, build_geometry(structure, basis))
    assert "bad.DM" in str(err.value) and ("truncated" in str(err.value) or "corrupt" in str(err.value))


def test_a_dm_with_data_after_its_last_record_is_rejected(tmp_path):
    """Two DMs joined, or a file written over a longer one: the records read whole, then more bytes follow."""
    folder = _runs("h2o", 1)[0]
    structure, basis, _, _ = load_run(folder)
    bad = tmp_path / "long.DM"
    bad.write_bytes((folder / "siesta.DM").read_bytes() + b"\0" * 8)
    with pytest.raises(InputFileError, match="long.DM: the .DM file has trailing data after the last record"):
        read_density_matrix(bad, build_geometry(structure, basis))


def test_corrupt_dm_is_rejected(tmp_path):
    folder = _runs("h2o", 1)[0]
    structure, basis, _, _ = load_run(folder)
    bad = tmp_path / "noise.DM"
    bad.write_bytes(np.random.default_rng(0).integers(0, 255, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(InputFileError, match="noise.DM"):
        read_density_matrix(bad, build_geometry(structure, basis))


def _dm_records(path):
    """The Fortran records of a .DM: (header, numd, column records, value records), as bytes."""
    import struct

    data, records, at = path.read_bytes(), [], 0
    while at < len(data):
        n = struct.unpack("<i", data[at:at + 4])[0]
        records.append(data[at + 4:at + 4 + n])
        at += n + 8
    no = struct.unpack("<i", records[0][:4])[0]
    return records[0], records[1], records[2:2 + no], records[2 + no:]


def _write_records(path, header, numd, columns, values):
    import struct

    path.write_bytes(b"".join(struct.pack("<i", len(r)) + r + struct.pack("<i", len(r))
                              for r in [header, numd, *columns, *values]))


def _edited_dm(tmp_path, edit):
    """h2o/0000's .DM with its records edited by ``edit(header, numd, columns, values)``, and its geometry."""
    folder = _runs("h2o", 1)[0]
    structure, basis, _, _ = load_run(folder)
    records = [list(r) if isinstance(r, list) else r for r in _dm_records(folder / "siesta.DM")]
    bad = tmp_path / "edited.DM"
    _write_records(bad, *edit(*records))
    return bad, build_geometry(structure, basis)


def _with_column(columns, row, k, value):
    cols = np.frombuffer(columns[row], dtype="<i4").copy()
    cols[k] = value
    return [*columns[:row], cols.tobytes(), *columns[row + 1:]]


@pytest.mark.parametrize("edit, problem", [
    # column 0 (Fortran counts from 1) or one twice: sisl added the element's value onto another one
    (lambda h, n, c, v: (h, n, _with_column(c, 2, 1, 0), v), "row 3 has a column outside"),
    (lambda h, n, c, v: (h, n, _with_column(c, 2, 1, 23 + 1), v), r"row 3 has a column outside 1\.\.23 "),  # nsc 1
    (lambda h, n, c, v: (h, n, _with_column(c, 2, 1, int(np.frombuffer(c[2], "<i4")[0])), v), "the same column twice"),
    # two spin components: the first was taken without a word
    (lambda h, n, c, v: (h[:4] + np.int32(2).tobytes() + h[8:], n, c, v + v), "holds 2 spin components"),
    # a NaN: evaluate printed MAE nan, train wrote a model with validation mae nan
    (lambda h, n, c, v: (h, n, c, [np.full(len(v[0]) // 8, np.nan).tobytes(), *v[1:]]), "not finite numbers"),
    (lambda h, n, c, v: (h[:8] + np.array([0, 1, 1], "<i4").tobytes(), n, c, v), r"supercell \[0, 1, 1\]")])
def test_a_dm_sisl_would_read_wrong_is_refused(tmp_path, edit, problem):
    bad, geometry = _edited_dm(tmp_path, edit)
    with pytest.raises(InputFileError, match=f"edited.DM: .*{problem}"):
        read_density_matrix(bad, geometry)


def test_a_dm_of_many_orbitals_is_checked_not_skipped(tmp_path):
    """Past 262144 orbitals the row-length record (4 bytes each) exceeded the 1 MB read, was skipped, and the
    check ended in a bare TypeError."""
    from siesta_dmguess.dm import check_dm_file

    no = 300_000
    header = np.array([no, 1, 1, 1, 1], "<i4").tobytes()
    _write_records(tmp_path / "big.DM", header, np.ones(no, "<i4").tobytes(),
                   [np.int32(k + 1).tobytes() for k in range(no)], [np.float64(1.0).tobytes()] * no)
    assert check_dm_file(tmp_path / "big.DM") == (no, 1)


def test_orbital_pattern_follows_the_atoms_not_the_frame():
    """The cut to SIESTA's orbital pairs depends on distances only: a rotated, translated and permuted copy of a
    box keeps the same elements of every block (float64 geometry, unfolded so each block is its own)."""
    from scipy.spatial.transform import Rotation

    from siesta_dmguess.structure import Structure

    from .conftest import water_basis, water_box

    basis = water_basis()

    def kept_blocks(atoms):
        st = Structure(atoms, list(atoms.get_chemical_symbols()))
        sample = prepare_sample(st, basis, ["H", "O"], 3.0, fold=False)
        lay, keep = sample.layout, sample.in_siesta_pattern
        return {(int(i), int(j), tuple(S)): keep[lay.block_offset[k]:lay.block_offset[k + 1]]
                for k, (i, j, S) in enumerate(zip(lay.block_i, lay.block_j, lay.block_shift))}, keep

    atoms = water_box(3, seed=4)
    ref, keep = kept_blocks(atoms)
    assert 0 < keep.sum() < keep.size  # the box has blocks that SIESTA stores only in part
    rot = Rotation.random(random_state=3).as_matrix()
    perm = np.random.default_rng(5).permutation(len(atoms))
    moved = atoms[perm]
    moved.set_cell(atoms.cell.array @ rot.T, scale_atoms=False)
    moved.positions = atoms.positions[perm] @ rot.T + np.array([0.3, -1.2, 2.0])
    got, _ = kept_blocks(moved)
    inv = np.argsort(perm)
    assert len(got) == len(ref)
    for (i, j, S), k in ref.items():
        assert np.array_equal(got[(int(inv[i]), int(inv[j]), S)], k)
