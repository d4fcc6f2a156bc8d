"""Trajectory frames are run with one fdf's settings: the geometry writer keeps everything else."""

import numpy as np
import pytest
from ase import Atoms

from siesta_dmguess.errors import InputFileError
from siesta_dmguess.siesta.templates import fdf_with_geometry
from siesta_dmguess.structure import FdfFrames, read_structure

FDF = """SystemLabel siesta
NumberOfSpecies 2
NumberOfAtoms 1
%block ChemicalSpeciesLabel
 1 8 O
 2 1 H
%endblock ChemicalSpeciesLabel
LatticeConstant 1.0 Ang
%block LatticeVectors
 9.0 0.0 0.0
 0.0 9.0 0.0
 0.0 0.0 9.0
%endblock LatticeVectors
AtomicCoordinatesFormat Ang
%block AtomicCoordinatesAndAtomicSpecies
 0.0 0.0 0.0 1
%endblock AtomicCoordinatesAndAtomicSpecies
MeshCutoff 200 Ry
DM.Tolerance 1.0d-5
"""


def test_geometry_is_replaced_and_settings_kept(tmp_path):
    atoms = Atoms("OH2", positions=[[1.0, 1.0, 1.0], [1.96, 1.0, 1.0], [0.76, 1.93, 1.0]], cell=np.eye(3) * 11.0,
                  pbc=True)
    text = fdf_with_geometry(FDF, atoms, ["O", "H", "H"])
    path = tmp_path / "frame.fdf"
    path.write_text(text)
    st = read_structure(path)
    assert np.allclose(st.atoms.positions, atoms.positions, atol=1e-9)
    assert np.allclose(st.atoms.cell.array, atoms.cell.array)
    assert st.labels == ["O", "H", "H"]
    assert "MeshCutoff 200 Ry" in text and "DM.Tolerance 1.0d-5" in text
    assert text.count("%block AtomicCoordinatesAndAtomicSpecies") == 1 and text.count("NumberOfAtoms") == 1


def test_trajectory_frames_take_the_fdf_labels_and_settings(tmp_path):
    """ASE frames know elements; the fdf's labels ("Ow") name the basis files, and its settings (k-points) the
    DM layout: the frame written for SIESTA and the structure predicted for it agree on both."""
    path = tmp_path / "template.fdf"
    path.write_text(FDF.replace(" 1 8 O\n", " 1 8 Ow\n") + "%block kgrid_Monkhorst_Pack\n 2 0 0 0.0\n 0 2 0 0.0\n"
                    " 0 0 1 0.0\n%endblock kgrid_Monkhorst_Pack\n")
    frames = FdfFrames(path)
    atoms = Atoms("HOH", positions=[[1.96, 1.0, 1.0], [1.0, 1.0, 1.0], [0.76, 1.93, 1.0]], cell=np.eye(3) * 11.0,
                  pbc=True)
    structure = frames.structure(atoms)
    assert frames.labels(atoms) == structure.labels == ["H", "Ow", "H"]
    assert structure.fdf_settings.get("kgrid") is True and structure.fdf_settings["MeshCutoff"] == "200 Ry"
    (tmp_path / "frame.fdf").write_text(fdf_with_geometry(frames.text, atoms, structure.labels))
    assert read_structure(tmp_path / "frame.fdf").labels == structure.labels


def test_unknown_species_is_a_clear_error():
    atoms = Atoms("N", positions=[[0, 0, 0]], cell=np.eye(3) * 5, pbc=True)
    with pytest.raises(InputFileError, match="'N'"):
        fdf_with_geometry(FDF, atoms, ["N"])


def test_a_trajectory_is_checked_before_any_frame_is_run(tmp_path):
    """Frames whose atoms change (another molecule appended to a trajectory) or an element the fdf has no species
    for are refused by ``bench`` before SIESTA runs a frame, naming the file and the frame; the history guesses
    could not extrapolate across them (a bare numpy broadcast error at the frame, before)."""
    from siesta_dmguess.bench import run_trajectory_benchmark

    path = tmp_path / "template.fdf"
    path.write_text(FDF)
    water = Atoms("OH2", positions=[[1.0, 1.0, 1.0], [1.96, 1.0, 1.0], [0.76, 1.93, 1.0]], cell=np.eye(3) * 11.0,
                  pbc=True)
    peroxide = Atoms("O2H2", positions=[[1, 1, 1], [2.4, 1, 1], [0.7, 1.9, 1], [2.7, 0.1, 1]], cell=water.cell,
                     pbc=True)
    frames = FdfFrames(path)
    frames.check_trajectory([water, water.copy()], "traj.xyz")  # a trajectory: passes
    with pytest.raises(InputFileError, match=r"traj.xyz: frame 2 holds H2O2 \(4 atoms\) where frame 0 holds H2O"):
        frames.check_trajectory([water, water.copy(), peroxide], "traj.xyz")
    nitrogen = Atoms("N", positions=[[0, 0, 0]], cell=np.eye(3) * 5, pbc=True)
    with pytest.raises(InputFileError, match=r"template.fdf: no species .* \['N'\]"):
        frames.check_trajectory([nitrogen], "traj.xyz")
    never_run = tmp_path / "siesta"
    never_run.write_text("#!/bin/sh\nexit 1\n")
    never_run.chmod(0o755)
    with pytest.raises(InputFileError, match="frame 1 holds"):  # by bench itself, before it runs any frame
        run_trajectory_benchmark([water, peroxide], path, model="water", out_dir=tmp_path / "out",
                                 guesses=("atomic",), command=str(never_run))
    assert not (tmp_path / "out").exists()


def test_monkhorst_pack_block_is_read_only_when_diagonal(tmp_path):
    from siesta_dmguess.fdf import read_monkhorst_pack

    fdf = tmp_path / "k.fdf"
    fdf.write_text("%block kgrid_Monkhorst_Pack\n 4 0 0 0.5\n 0 2 0 0.0\n 0 0 3\n%endblock kgrid_Monkhorst_Pack\n")
    assert read_monkhorst_pack(fdf) == ([4, 2, 3], [0.5, 0.0, 0.0])
    fdf.write_text("%block kgrid_Monkhorst_Pack\n 4 1 0 0.0\n 0 4 0 0.0\n 0 0 4 0.0\n%endblock kgrid_Monkhorst_Pack\n")
    assert read_monkhorst_pack(fdf) is None
    fdf.write_text("SystemLabel x\n")
    assert read_monkhorst_pack(fdf) is None


def test_energy_settings_are_read_in_rydberg_whatever_unit_the_fdf_uses(tmp_path):
    """Cards record MeshCutoff and PAO.EnergyShift as '<value> Ry' (sisl alone would give eV, unlabelled), so an
    fdf that writes the same energy in another unit matches the card."""
    from siesta_dmguess.fdf import read_fdf_settings

    a, b = tmp_path / "a.fdf", tmp_path / "b.fdf"
    a.write_text("MeshCutoff 200 Ry\nPAO.EnergyShift 0.02 Ry\nXC.functional LDA\n")
    b.write_text("MeshCutoff 2721.1386246 eV\nPAO.EnergyShift 272.11386 meV\nXC.functional LDA\n")
    settings_a, settings_b = read_fdf_settings(a), read_fdf_settings(b)
    assert settings_a["MeshCutoff"] == "200 Ry" and settings_a["PAO.EnergyShift"] == "0.02 Ry"
    assert {k: settings_b[k] for k in settings_a} == settings_a


def test_the_same_structure_in_other_fdf_units_and_layouts_reads_the_same(tmp_path):
    """Users' fdfs write geometry in many ways; each must give the same atoms (Å) and the same k-point setting."""
    cell = np.array([[5.47, 0.03, -0.05], [0.05, 5.45, -0.03], [0.08, 0.01, 5.47]])
    frac = np.array([[0.0, 0.0, 0.0], [0.26, 0.24, 0.25], [0.5, 0.52, 0.0], [0.74, 0.75, 0.51]])
    pos, bohr, a = frac @ cell, 0.529177210903, 5.43
    header = "SystemLabel si\nNumberOfSpecies 1\nNumberOfAtoms 4\n%block ChemicalSpeciesLabel\n 1 14 Si\n" \
             "%endblock ChemicalSpeciesLabel\n"

    def rows(m):
        return "\n".join(" ".join(f"{x:.12f}" for x in r) for r in m)

    def coords(m, suffix=" 1"):
        return "\n".join(" ".join(f"{x:.12f}" for x in r) + suffix for r in m)

    lattice_ang = f"LatticeConstant 1.0 Ang\n%block LatticeVectors\n{rows(cell)}\n%endblock LatticeVectors\n"
    lattice_a = f"LatticeConstant {a} Ang\n%block LatticeVectors\n{rows(cell / a)}\n%endblock LatticeVectors\n"
    block = "%block AtomicCoordinatesAndAtomicSpecies\n{}\n%endblock AtomicCoordinatesAndAtomicSpecies\n"
    kgrid = "%block {}\n 4 0 0 0.0\n 0 4 0 0.0\n 0 0 4 0.0\n%endblock {}\n"
    (tmp_path / "coords.fdf").write_text(block.format(coords(pos)))
    (tmp_path / "coords.dat").write_text(coords(pos) + "\n")
    variants = {
        "ang": lattice_ang + "AtomicCoordinatesFormat Ang\n" + block.format(coords(pos)),
        "fractional": lattice_a + "AtomicCoordinatesFormat Fractional\n" + block.format(coords(frac)),
        "scaled": lattice_a + "AtomicCoordinatesFormat ScaledCartesian\n" + block.format(coords(pos / a)),
        "bohr": f"LatticeConstant 1.0 Bohr\n%block LatticeVectors\n{rows(cell / bohr)}\n%endblock LatticeVectors\n"
                "AtomicCoordinatesFormat Bohr\n" + block.format(coords(pos / bohr)),
        "include": lattice_ang + "AtomicCoordinatesFormat Ang\n%include coords.fdf\n",
        "block-file": lattice_ang + "AtomicCoordinatesFormat Ang\n"
                      "%block AtomicCoordinatesAndAtomicSpecies < coords.dat\n",
        # SIESTA skips the %block/%endblock lines in a piped file (sisl 0.20 read them as data)
        "block-file-with-header": "LatticeConstant 1.0 Ang\n%block LatticeVectors < lattice.fdf\n"
                                  "AtomicCoordinatesFormat Ang\n%block AtomicCoordinatesAndAtomicSpecies < coords.fdf\n",
    }
    (tmp_path / "lattice.fdf").write_text(f"%block LatticeVectors\n{rows(cell)}\n%endblock LatticeVectors\n")
    spellings = ["kgrid_Monkhorst_Pack", "kgrid.MonkhorstPack", "KGRID-MONKHORST-PACK"]
    for k, (name, text) in enumerate(variants.items()):
        path = tmp_path / f"{name}.fdf"
        spelling = spellings[k % len(spellings)]
        path.write_text(header + text + kgrid.format(spelling, spelling))
        st = read_structure(path)
        assert np.allclose(st.atoms.positions, pos, atol=1e-8), name
        assert np.allclose(st.atoms.cell.array, cell, atol=1e-8), name
        assert st.labels == ["Si"] * 4 and st.fdf_settings["kgrid"], name


@pytest.mark.parametrize("kgrid, samples_k", [
    ("", False),
    ("kgrid.Cutoff 4.0 Ang\n", False),  # 2 x 4.0 < 9 Å along every vector: one k-point, Γ
    ("kgrid.Cutoff 4.6 Ang\n", True),  # 2 x 4.6 >= 9 Å: two k-points per direction
    ("kgrid.Cutoff 9.0 Bohr\n", True),  # 4.76 Å, in the fdf's own unit
    ("kgrid.Cutoff 0.0 Ang\n", False),  # SIESTA: a cutoff <= 0 is Γ only
    ("%block kgrid_Monkhorst_Pack\n 1 0 0 0.0\n 0 1 0 0.0\n 0 0 1 0.0\n%endblock kgrid_Monkhorst_Pack\n", False),
    ("%block kgrid_Monkhorst_Pack\n 1 0 0 0.5\n 0 1 0 0.0\n 0 0 1 0.0\n%endblock kgrid_Monkhorst_Pack\n", True),
    # a1 + a2, a2, a3: a supercell of the cell's own volume, so one k-point, at Γ
    ("%block kgrid_Monkhorst_Pack\n 1 1 0 0.0\n 0 1 0 0.0\n 0 0 1 0.0\n%endblock kgrid_Monkhorst_Pack\n", False),
    ("%block kgrid_Monkhorst_Pack\n 1 1 0 0.0\n 0 2 0 0.0\n 0 0 1 0.0\n%endblock kgrid_Monkhorst_Pack\n", True),
    ("%block kgrid_Monkhorst_Pack\n 2 0 0 0.0\n 0 1 0 0.0\n 0 0 1 0.0\n%endblock kgrid_Monkhorst_Pack\n", True),
])
def test_k_point_sampling_follows_siestas_grid_rule(tmp_path, kgrid, samples_k):
    """Whether the DM keeps its images (k-points) or is folded (Γ only) follows from the grid SIESTA builds: a
    cutoff shorter than half of every cell vector, or a 1x1x1 block without displacement, is Γ only."""
    path = tmp_path / "run.fdf"
    path.write_text(FDF + kgrid)
    assert read_structure(path).fdf_settings["kgrid"] is samples_k


@pytest.mark.parametrize("kgrid, length", [
    ("", 9.0),  # Γ only: the cell itself
    ("%block kgrid_Monkhorst_Pack\n 4 0 0 0.0\n 0 4 0 0.0\n 0 0 2 0.0\n%endblock kgrid_Monkhorst_Pack\n", 18.0),
    ("kgrid.Cutoff 10.0 Ang\n", 27.0),  # int(2 x 10 / 9) + 1 = 3 cells along each vector
])
def test_the_k_grid_supercell_is_the_period_siestas_sampling_repeats_the_crystal_with(tmp_path, kgrid, length):
    path = tmp_path / "run.fdf"
    path.write_text(FDF + kgrid)
    assert read_structure(path).fdf_settings["k_supercell_length"] == pytest.approx(length)


def test_a_malformed_k_grid_block_is_an_error_naming_the_file_and_the_block(tmp_path):
    path = tmp_path / "run.fdf"
    path.write_text(FDF + "%block kgrid_Monkhorst_Pack\n 4 0 0 0.0\n 0 four 0 0.0\n 0 0 4 0.0\n"
                          "%endblock kgrid_Monkhorst_Pack\n")
    with pytest.raises(InputFileError, match=r"run\.fdf: cannot read its kgrid_Monkhorst_Pack block"):
        read_structure(path)


MOLECULE = """SystemLabel water
NumberOfSpecies 2
NumberOfAtoms 3
%block ChemicalSpeciesLabel
 1 8 O
 2 1 H
%endblock ChemicalSpeciesLabel
{lattice}%block AtomicCoordinatesAndAtomicSpecies
 9.4486 9.4486 9.4486 1
 11.2571 9.4486 9.4486 2
 8.9951 11.2004 9.4486 2
%endblock AtomicCoordinatesAndAtomicSpecies
"""  # no AtomicCoordinatesFormat: SIESTA's default is Bohr (5 Å = 9.4486 Bohr)
VECTORS = "%block LatticeVectors\n 9.0 0.0 0.0\n 0.0 9.0 0.0\n 0.0 0.0 9.0\n%endblock LatticeVectors\n"


@pytest.mark.parametrize("lattice, cell", [
    ("", None),  # SIESTA builds its automatic cell: an isolated molecule
    (VECTORS, None),  # vectors without a LatticeConstant: SIESTA scales them by 0, the same automatic cell
    ("LatticeConstant 9.0 Ang\n", np.eye(3) * 9.0),  # SIESTA's default vectors: a cube of that side
    ("LatticeConstant 1.0 Ang\n" + VECTORS, np.eye(3) * 9.0),
    ("AtomicCoordinatesFormat NotScaledCartesianBohr\n", None),
])
def test_fdf_lattice_follows_siestas_rules(tmp_path, lattice, cell):
    """sisl 0.20 reads no geometry from an fdf without LatticeConstant and lattice vectors; SIESTA runs both
    (redcel.F, automatic_cell.f), so the structure is what SIESTA will run."""
    path = tmp_path / "water.fdf"
    path.write_text(MOLECULE.format(lattice=lattice))
    st = read_structure(path)
    assert np.allclose(st.atoms.positions[0], [5.0, 5.0, 5.0], atol=1e-4)
    assert st.labels == ["O", "H", "H"]
    if cell is None:
        assert not st.periodic and st.fdf_settings["kgrid"] is False
    else:
        assert st.periodic and np.allclose(st.atoms.cell.array, cell)


@pytest.mark.parametrize("lattice, message", [
    ("AtomicCoordinatesFormat Fractional\n", "needs a lattice"),
    ("AtomicCoordinatesFormat ScaledByLatticeVectors\n", "needs a lattice"),
    ("LatticeConstant 1.0 Ang\n%block LatticeVectors\n 9.0 0.0\n%endblock LatticeVectors\n", "sisl cannot read"),
    # SIESTA stops on these ("no unit specified"); a LatticeConstant of 9 was read as 9 Å (SIESTA's unit is Bohr)
    ("LatticeConstant 9.0\n", r"LatticeConstant 9.0 has no unit, and SIESTA stops on it .*LatticeConstant 9.0 Bohr \(or Ang\)"),
    ("LatticeConstant 9.0 Ang\nMeshCutoff 200\n", "MeshCutoff 200 has no unit"),
    ("PAO.EnergyShift 0.02\n", "PAO.EnergyShift 0.02 has no unit"),
])
def test_an_fdf_lattice_siesta_cannot_use_is_a_clear_error(tmp_path, lattice, message):
    path = tmp_path / "water.fdf"
    path.write_text(MOLECULE.format(lattice=lattice))
    with pytest.raises(InputFileError, match=message) as err:
        read_structure(path)
    assert "water.fdf" in str(err.value)


def test_nested_includes_resolve_from_the_run_folder_and_a_piped_block_keeps_one_header(tmp_path):
    """SIESTA's fdf library opens every included file relative to where SIESTA runs (the top fdf's folder), also
    from inside an included file; a block piped from a file that holds its own %block line is that block once.
    Neither was tested (mutants that resolved from the including file's folder, or kept both headers, passed)."""
    from siesta_dmguess.fdf import fdf_input_files, inlined_fdf_text

    (tmp_path / "sub").mkdir()
    (tmp_path / "nest.fdf").write_text("%include sub/a.fdf\n")
    (tmp_path / "sub" / "a.fdf").write_text("%include b.fdf\n")
    (tmp_path / "b.fdf").write_text("MeshCutoff 100 Ry\n")
    (tmp_path / "sub" / "b.fdf").write_text("MeshCutoff 300 Ry\n")  # a decoy beside the including file
    assert fdf_input_files(tmp_path / "nest.fdf") == [tmp_path / "nest.fdf", tmp_path / "sub" / "a.fdf",
                                                      tmp_path / "b.fdf"]
    assert inlined_fdf_text(tmp_path / "nest.fdf") == "MeshCutoff 100 Ry\n"
    (tmp_path / "cell.fdf").write_text("%block LatticeVectors\n 1 0 0\n 0 1 0\n 0 0 1\n%endblock LatticeVectors\n")
    (tmp_path / "in.fdf").write_text("LatticeConstant 5 Ang\n%block LatticeVectors < cell.fdf\n")
    text = inlined_fdf_text(tmp_path / "in.fdf")
    assert text.lower().count("%block latticevectors") == 1 and text.lower().count("%endblock") == 1
    assert " 0 0 1\n" in text


def test_a_value_without_unit_in_an_included_file_names_that_file(tmp_path):
    """The error named the top fdf, where the key is not written."""
    path = tmp_path / "water.fdf"
    path.write_text(MOLECULE.format(lattice="%include grid.fdf\n"))
    (tmp_path / "grid.fdf").write_text("# the grid\nmesh-cutoff   200\n")
    with pytest.raises(InputFileError, match="MeshCutoff 200 has no unit") as err:
        read_structure(path)
    assert "grid.fdf" in str(err.value) and "water.fdf" not in str(err.value)


def test_a_molecule_in_siestas_automatic_cell_is_predicted_as_isolated(tmp_path, shipped):
    """The automatic cell leaves a 10 % margin beyond every orbital, so SIESTA's DM has no image pairs: the
    prediction is that of the same molecule read from an .xyz (no cell), and the .DM is written Γ-only."""
    from siesta_dmguess.predict import predict_density_matrix

    path = tmp_path / "water.fdf"
    path.write_text(MOLECULE.format(lattice=""))
    xyz = tmp_path / "water.xyz"
    read_structure(path).atoms.write(xyz)
    a = predict_density_matrix(path, shipped("water"))
    b = predict_density_matrix(xyz, shipped("water"))
    assert np.array_equal(a.density_matrix.nsc, [1, 1, 1]) and a.values.shape == b.values.shape
    assert np.allclose(a.values, b.values, atol=1e-12) and np.abs(a.values).max() > 0.1


def test_trajectory_frames_are_written_and_predicted_for_the_cell_siesta_runs(tmp_path):
    """A frame without a cell is written with no lattice at all (SIESTA's automatic cell: a LatticeConstant alone
    would make a 1 Å cube) and read back as an isolated molecule; a frame with a cell but pbc=False is written
    with it and SIESTA runs it periodic, so its structure is periodic too."""
    path = tmp_path / "template.fdf"
    path.write_text(FDF)
    frames = FdfFrames(path)
    molecule = Atoms("OH2", positions=[[1.0, 1.0, 1.0], [1.96, 1.0, 1.0], [0.76, 1.93, 1.0]])
    text = fdf_with_geometry(frames.text, molecule, frames.labels(molecule))
    assert "LatticeConstant" not in text and "LatticeVectors" not in text
    (tmp_path / "frame.fdf").write_text(text)
    read_back = read_structure(tmp_path / "frame.fdf")
    assert not read_back.periodic and not frames.structure(molecule).periodic
    assert np.allclose(read_back.atoms.positions, molecule.positions, atol=1e-9)
    boxed = molecule.copy()
    boxed.set_cell(np.eye(3) * 6.0)
    boxed.pbc = False
    (tmp_path / "boxed.fdf").write_text(fdf_with_geometry(frames.text, boxed, frames.labels(boxed)))
    assert read_structure(tmp_path / "boxed.fdf").periodic and frames.structure(boxed).periodic


def test_reading_an_fdf_leaves_no_file_open(tmp_path):
    """sisl 0.20's fdf reader kept its file open after every key it looked up (fixed in ``fdf_sile``); a user
    predicting thousands of frames would run out of file handles, and each fdf gave a ResourceWarning."""
    import gc
    import warnings

    (tmp_path / "coords.fdf").write_text("%block AtomicCoordinatesAndAtomicSpecies\n 0.0 0.0 0.0 1\n"
                                         "%endblock AtomicCoordinatesAndAtomicSpecies\n")
    path = tmp_path / "in.fdf"
    path.write_text(FDF.replace("%block AtomicCoordinatesAndAtomicSpecies\n 0.0 0.0 0.0 1\n"
                                "%endblock AtomicCoordinatesAndAtomicSpecies\n", "%include coords.fdf\n"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        structure = read_structure(path)
        gc.collect()
    assert structure.atoms.get_chemical_symbols() == ["O"]
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_a_run_folder_stands_for_its_fdf(tmp_path):
    """``predict RUN``, ``bench TRAJ --fdf RUN`` and the scripts take a SIESTA run folder as its fdf: input.fdf,
    else the folder's only fdf; any other count is an error that names the folder."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "water.fdf").write_text(FDF)
    assert np.allclose(read_structure(run).atoms.cell, read_structure(run / "water.fdf").atoms.cell)
    assert FdfFrames(run).path == run / "water.fdf"
    (run / "input.fdf").write_text(FDF.replace("9.0 0.0 0.0", "8.0 0.0 0.0"))
    assert read_structure(run).atoms.cell[0, 0] == pytest.approx(8.0)  # input.fdf first, as for datasets
    (run / "input.fdf").unlink()
    (run / "other.fdf").write_text(FDF)
    with pytest.raises(InputFileError, match=r"run: expected one \.fdf in the run folder, found 2"):
        read_structure(run)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="found 0"):
        read_structure(tmp_path / "empty")


def test_coordinates_left_in_bohr_by_default_are_pointed_out(tmp_path, caplog):
    """Without AtomicCoordinatesFormat SIESTA reads Bohr: Å coordinates then put an O–H at 0.51 Å. The structure
    is still read as SIESTA reads it (the DM must be for what SIESTA runs), with a warning naming the fix."""
    water = " 0.0 0.0 0.0 1\n 0.96 0.0 0.0 2\n -0.24 0.93 0.0 2\n"
    text = FDF.replace("NumberOfAtoms 1", "NumberOfAtoms 3").replace(" 0.0 0.0 0.0 1\n", water)
    written = {"angstrom": text, "bohr-by-default": text.replace("AtomicCoordinatesFormat Ang\n", ""),
               "bohr-meant": text.replace("AtomicCoordinatesFormat Ang\n", "").replace(
                   water, "".join(f" {float(x) / 0.529177:.6f} {float(y) / 0.529177:.6f} 0.0 {s}\n"
                                  for x, y, _, s in (line.split() for line in water.splitlines())))}
    shortest = {}
    for name, fdf_text in written.items():
        caplog.clear()
        (tmp_path / f"{name}.fdf").write_text(fdf_text)
        atoms = read_structure(tmp_path / f"{name}.fdf").atoms
        shortest[name] = atoms.get_distance(0, 1)
        assert ("add 'AtomicCoordinatesFormat Ang'" in caplog.text) == (name == "bohr-by-default"), name
    assert shortest["bohr-by-default"] == pytest.approx(0.96 * 0.529177, rel=1e-5)
    assert shortest["bohr-meant"] == pytest.approx(shortest["angstrom"], rel=1e-5) == pytest.approx(0.96)


def test_fdf_input_files_follows_includes_and_piped_blocks(tmp_path):
    """The files an fdf reads in: %include (also nested), a block or key piped from a file, none twice; a named
    file that is missing is left out."""
    from siesta_dmguess.fdf import fdf_input_files

    (tmp_path / "input.fdf").write_text("SystemLabel w\n%include common.fdf  # settings\n"
                                        "%block AtomicCoordinatesAndAtomicSpecies < coords.fdf\n"
                                        "MeshCutoff < mesh.fdf\n# %include commented.fdf\n%include gone.fdf\n")
    (tmp_path / "common.fdf").write_text("%include basis.fdf\n%include input.fdf\n")
    for name in ("coords.fdf", "mesh.fdf", "basis.fdf", "commented.fdf"):
        (tmp_path / name).write_text("x\n")
    names = [p.name for p in fdf_input_files(tmp_path / "input.fdf")]
    assert names == ["input.fdf", "common.fdf", "coords.fdf", "mesh.fdf", "basis.fdf"]


def test_an_fdf_without_species_block_or_with_a_missing_include_is_named(tmp_path, recwarn):
    """sisl reads on in both cases (every atom 'unknown'; the include disregarded with a warning), SIESTA stops:
    the error says which, instead of 'species ['unknown'] are not covered' or a prediction for another input."""
    start, end = FDF.index("%block ChemicalSpeciesLabel"), FDF.index("%endblock ChemicalSpeciesLabel\n")
    (tmp_path / "nospecies.fdf").write_text(FDF[:start] + FDF[end + len("%endblock ChemicalSpeciesLabel\n"):])
    with pytest.raises(InputFileError, match=r"nospecies.fdf: the fdf has no ChemicalSpeciesLabel block"):
        read_structure(tmp_path / "nospecies.fdf")
    (tmp_path / "inc.fdf").write_text(FDF + "%include settings.fdf\n")
    with pytest.raises(InputFileError, match=r"inc.fdf: reads in .*settings.fdf, which does not exist"):
        read_structure(tmp_path / "inc.fdf")
    from siesta_dmguess.cli import main

    assert main(["predict", str(tmp_path / "inc.fdf"), "--model", "water"]) == 2
    # said once, clearly: sisl's warning (its reader's repr) came before it, once per read of the file
    assert not [w for w in recwarn if "include" in str(w.message)]
    (tmp_path / "settings.fdf").write_text("XC.functional LDA\n")
    assert read_structure(tmp_path / "inc.fdf").labels == ["O"]


def _h2o_run_copy(tmp_path, name="run"):
    """A copy of the h2o/0004 run (and the dataset's basis beside it, as the guard looks for it): its fdf."""
    import shutil

    from .conftest import dataset

    h2o = dataset("h2o")
    if not (tmp_path / "basis").exists():
        shutil.copytree(h2o / "basis", tmp_path / "basis")
    shutil.copytree(h2o / "0004", tmp_path / name, ignore=shutil.ignore_patterns("*.DM", "*.HSX"))
    return tmp_path / name / "input.fdf"


def _edited(fdf, edit):
    fdf.write_text(edit(fdf.read_text()))
    return fdf


def test_an_fdf_is_read_as_siestas_fdf_library_reads_it(tmp_path, shipped):
    """'!' and ';' start a comment after a value as '#' does (sisl knew only '#': a `MeshCutoff 200 Ry ! grid` was
    a bare ValueError, a `PAO.BasisSize DZP ! c` a refusal, a `SystemLabel foo ! c` a DM named 'foo ! c.DM'); a
    byte-order mark before the first key is skipped; Fortran exponents (1.5d0) are numbers. Each reads the same
    structure, settings and DM as the plain fdf (checked against SIESTA 4.1's own reading of these lines)."""
    import re

    from siesta_dmguess.predict import default_dm_path
    from siesta_dmguess.predict import predict_density_matrix

    plain = _h2o_run_copy(tmp_path, "plain")
    reference = predict_density_matrix(plain, shipped("water"))
    comments = _edited(_h2o_run_copy(tmp_path, "comments"), lambda t: re.sub(
        r"^(SystemLabel|MeshCutoff|PAO.BasisSize|XC.functional|LatticeConstant|AtomicCoordinatesFormat|DM.UseSaveDM)"
        r"(.*)$", r"\1\2   ! a comment; with words", t, flags=re.M).replace(" 1\n %endblock", " 1 ; O\n %endblock"))
    bom = _edited(_h2o_run_copy(tmp_path, "bom"), lambda t: "\ufeff" + t.replace("SystemLabel siesta", "SystemLabel bom"))
    fortran = _edited(_h2o_run_copy(tmp_path, "fortran"), lambda t: re.sub(r"(?<![\d.])(\d+\.\d{10})(?=[ \n])",
                                                                           lambda m: f"{float(m[1]) / 10:.11f}d1", t))
    assert "d1 " in fortran.read_text()
    for fdf, label in ((comments, "siesta"), (bom, "bom"), (fortran, "siesta")):
        assert read_structure(fdf).fdf_settings == reference.structure.fdf_settings, fdf.parent.name
        pred = predict_density_matrix(fdf, shipped("water"))
        assert np.allclose(pred.values, reference.values, atol=1e-10), fdf.parent.name
        assert default_dm_path(fdf) == fdf.parent / f"{label}.DM"


@pytest.mark.parametrize("line, dm_name", [
    ("SystemLabel " + "x" * 80, "x" * 64 + ".DM"),  # SIESTA names its files by the first 64 characters
    ("SystemLabel y", "y.DM"),  # sisl's get took it for a boolean: True.DM
    ("SystemLabel 1d3", "1d3.DM"),  # a text value, not a Fortran number
    ("SystemLabel it's ! a note", "it's.DM")])  # a quote inside a word starts no string (parse.F90)
def test_the_dm_is_written_where_siesta_reads_it(tmp_path, line, dm_name):
    from siesta_dmguess.predict import default_dm_path
    from siesta_dmguess.siesta.templates import dm_read_note

    fdf = _edited(_h2o_run_copy(tmp_path), lambda t: "DM.UseSaveDM T\n" + line + "\n" +
                  t.replace("SystemLabel siesta\n", ""))
    assert default_dm_path(fdf) == fdf.parent / dm_name
    assert dm_read_note(fdf, fdf.parent / dm_name) is None


def test_a_dm_file_siesta_reads_instead_is_pointed_out_not_written(tmp_path):
    """File.DM.Init makes SIESTA 4.1 read another file (m_new_dm.F90), often another run's converged DM: predict
    writes <SystemLabel>.DM and its note names the file SIESTA reads."""
    from siesta_dmguess.predict import default_dm_path
    from siesta_dmguess.siesta.templates import dm_read_note

    fdf = _edited(_h2o_run_copy(tmp_path), lambda t: "DM.UseSaveDM T\nFile.DM.Init ../prev/siesta.DM\n" + t)
    assert default_dm_path(fdf) == fdf.parent / "siesta.DM"
    assert "reads " + str(fdf.parent / "../prev/siesta.DM") in dm_read_note(fdf, fdf.parent / "siesta.DM")


@pytest.mark.parametrize("lines, refused", [
    ("Spin NP", None), ("Spin non-polarised", None), ("Spin none\nSpinPolarized T", None),
    ("NonCollinearSpin T", "NonCollinearSpin T"), ("SpinOrbit .true.", "SpinOrbit T"),
    ("SpinPolarized", "SpinPolarized T"), ("Spin P", "Spin P")])
def test_spin_is_read_as_siesta_decides_it(tmp_path, shipped, lines, refused):
    """SIESTA 4.1 (m_spin.F90): Spin decides where given (NP and non-polarised are unpolarized, which was refused);
    without it the legacy NonCollinearSpin and SpinOrbit polarize the run too (they were let through), and a
    logical key on its own is true."""
    from siesta_dmguess.errors import ModelCompatibilityError
    from siesta_dmguess.predict import predict_density_matrix

    fdf = _edited(_h2o_run_copy(tmp_path), lambda t: t + lines + "\n")
    if refused is None:
        assert predict_density_matrix(fdf, shipped("water")).density_matrix.spin.is_unpolarized
    else:
        with pytest.raises(ModelCompatibilityError, match=f"asks for a {refused} calculation"):
            predict_density_matrix(fdf, shipped("water"))


def test_a_bare_dm_usesavedm_reads_the_dm_and_an_unused_ghost_species_is_no_ghost_atom(tmp_path, shipped):
    from siesta_dmguess.predict import predict_density_matrix
    from siesta_dmguess.siesta.templates import dm_read_note

    fdf = _edited(_h2o_run_copy(tmp_path), lambda t: "DM.UseSaveDM\n" + t.replace(
        "NumberOfSpecies 2", "NumberOfSpecies 3").replace(" 2 1 H\n", " 2 1 H\n 3 -1 H_ghost\n"))
    assert dm_read_note(fdf, fdf.parent / "siesta.DM") is None
    assert "ghost_species" not in read_structure(fdf).fdf_settings
    predict_density_matrix(fdf, shipped("water"))  # not refused: no atom is a ghost


def test_predict_takes_ase_atoms(shipped):
    from siesta_dmguess.predict import predict_density_matrix

    from .conftest import water_molecule

    assert predict_density_matrix(water_molecule(), shipped("water")).density_matrix.geometry.na == 3


def test_an_fdf_that_reads_in_files_gives_frames_and_runs_with_all_its_settings(tmp_path):
    """`%block LatticeVectors < cell.dat` made fdf_with_geometry drop every line up to the next %endblock (basis,
    XC, mesh and SCF settings: frames ran with SIESTA's defaults); an `%include` was not copied into the run
    folder (SIESTA stopped), and a geometry inside it would have stood beside the frame's. Runs are written with
    what the fdf reads in inlined, and the same settings and structure as the fdf's own."""
    import re

    from siesta_dmguess.fdf import inlined_fdf_text, read_fdf_settings
    from siesta_dmguess.siesta.templates import fdf_with_geometry, prepare_run

    fdf = _h2o_run_copy(tmp_path)
    original = fdf.read_text()
    lattice = re.search(r"%block LatticeVectors\n(.*?)%endblock LatticeVectors\n", original, re.S)
    coordinates = re.search(r"%block AtomicCoordinatesAndAtomicSpecies\n.*?%endblock AtomicCoordinatesAndAtomicSpecies\n",
                            original, re.S)
    (fdf.parent / "cell.dat").write_text(lattice[1])
    (fdf.parent / "geometry.fdf").write_text("AtomicCoordinatesFormat Ang\n" + coordinates[0])
    (fdf.parent / "mesh.fdf").write_text("MeshCutoff 200 Ry\n")
    text = (original.replace(lattice[0], "%block LatticeVectors < cell.dat\n").replace(coordinates[0], "")
            .replace("AtomicCoordinatesFormat Ang\n", "").replace("MeshCutoff 200 Ry\n", "MeshCutoff < mesh.fdf\n"))
    fdf.write_text(text + "%include geometry.fdf\n")
    plain = _h2o_run_copy(tmp_path, "plain")
    assert read_structure(fdf).fdf_settings == read_structure(plain).fdf_settings
    inlined = inlined_fdf_text(fdf)
    assert "<" not in inlined and "%include" not in inlined
    moved = read_structure(plain).atoms.copy()
    moved.positions += 0.1
    frame = tmp_path / "frame" / "input.fdf"
    frame.parent.mkdir()
    frame.write_text(fdf_with_geometry(inlined, moved, ["O", "H", "H"]))
    assert read_fdf_settings(frame) == read_fdf_settings(plain)
    assert np.allclose(read_structure(frame).atoms.positions, moved.positions)
    assert frame.read_text().count("%block AtomicCoordinatesAndAtomicSpecies") == 1
    piped = original.replace(lattice[0], "%block LatticeVectors < cell.dat\n").replace(coordinates[0], "")
    kept = fdf_with_geometry(piped + coordinates[0], moved, ["O", "H", "H"])  # settings between the two blocks
    assert all(line in kept for line in ("PAO.BasisSize DZP", "XC.functional LDA", "MeshCutoff 200 Ry"))
    run = prepare_run(fdf, tmp_path / "work", "atomic", pseudo_dirs=[tmp_path / "basis"])
    assert read_structure(run).fdf_settings == read_structure(plain).fdf_settings
    assert np.allclose(read_structure(run).atoms.positions, read_structure(plain).atoms.positions)


def test_a_trajectory_whose_atoms_jump_is_said_before_it_runs(tmp_path, caplog):
    """Two H swapped in one frame passed the check (same elements in the same order), and reuse and extrapolation
    took 11 iterations where the atomic guess took 10, without a word. A wrapped atom's jump by a lattice vector
    is no move."""
    from siesta_dmguess.structure import FdfFrames

    fdf = _h2o_run_copy(tmp_path)
    first = read_structure(fdf).atoms
    frames = [first.copy() for _ in range(3)]
    frames[1].positions[0] += [12.0, 0.0, 0.0]  # O wrapped across the 12 Å box
    with caplog.at_level("WARNING"):
        FdfFrames(fdf).check_trajectory(frames, "md.traj")
    assert "moves" not in caplog.text
    frames[2].positions[[1, 2]] = frames[2].positions[[2, 1]]
    with caplog.at_level("WARNING"):
        FdfFrames(fdf).check_trajectory(frames, "md.traj")
    assert "md.traj: atom 2 moves 1.5" in caplog.text and "from frame 1 to 2" in caplog.text


def test_frames_without_a_cell_run_in_the_fdfs_lattice(tmp_path, caplog):
    """SIESTA's own .ANI frames (and its WriteCoorXmol .xyz) carry no cell: each ran in SIESTA's automatic cell,
    10.7 meV off the 12 Å box's energy for a water molecule, and a silicon crystal as an isolated cluster."""
    from siesta_dmguess.structure import FdfFrames

    fdf = _h2o_run_copy(tmp_path)
    bare = read_structure(fdf).atoms.copy()
    bare.set_cell(np.zeros((3, 3)))
    bare.pbc = False
    boxed = read_structure(fdf).atoms.copy()
    boxed.set_cell(np.diag([10.0, 10.0, 10.0]))
    with caplog.at_level("WARNING"):
        framed = FdfFrames(fdf).in_cell([bare, boxed], "md.ANI")
    assert np.allclose(framed[0].cell.array, np.diag([12.0, 12.0, 12.0])) and framed[0].pbc.all()
    assert np.allclose(framed[1].cell.array, np.diag([10.0, 10.0, 10.0]))  # a frame's own cell is kept
    assert "md.ANI: frames without a cell run in the lattice of" in caplog.text
    assert bare.cell.rank == 0  # the caller's frames are not changed


def test_predict_says_where_siesta_takes_its_atoms_from_a_saved_file(tmp_path, capsys):
    """A relaxation continued with MD.UseSaveXV T runs from <SystemLabel>.XV: the DM predicted from the fdf's
    coordinates took 8 SCF iterations there, the one predicted from the .XV 3; predict said nothing."""
    import sisl

    from siesta_dmguess.cli import main

    fdf = _edited(_h2o_run_copy(tmp_path), lambda t: "MD.UseSaveXV T\n" + t)
    assert main(["predict", str(fdf.parent), "--model", "water"]) == 0
    assert "UseSaveXV" not in capsys.readouterr().out  # no .XV yet: SIESTA takes the fdf's atoms
    from siesta_dmguess.fdf import fdf_sile

    geometry = fdf_sile(fdf).read_geometry()
    stretched = geometry.copy()
    stretched.xyz[1] += [0.05, 0.0, 0.0]  # one O-H bond longer
    sisl.get_sile(str(fdf.parent / "siesta.XV"), "w").write_geometry(stretched)
    assert main(["predict", str(fdf.parent), "--model", "water"]) == 0
    out = capsys.readouterr().out
    assert "input.fdf sets MD.UseSaveXV T, so SIESTA takes its atoms from siesta.XV: the DM is predicted for them" in out
    from siesta_dmguess.dm import read_density_matrix
    from siesta_dmguess.predict import predict_density_matrix

    written = read_density_matrix(fdf.parent / "siesta.DM", predict_density_matrix(fdf, "water").density_matrix.geometry)
    moved = predict_density_matrix(fdf.parent / "siesta.XV", "water").density_matrix
    plain = predict_density_matrix(fdf, "water").density_matrix
    assert abs(written.tocsr(0) - moved.tocsr(0)).max() < 1e-6 < abs(written.tocsr(0) - plain.tocsr(0)).max()
    sisl.get_sile(str(fdf.parent / "siesta.XV"), "w").write_geometry(geometry.sub([0, 1]))  # another structure's
    assert main(["predict", str(fdf.parent), "--model", "water"]) == 2
    assert "siesta.XV: holds other atoms than the fdf (2 atoms, the fdf 3), which SIESTA takes with MD.UseSaveXV T" in \
        capsys.readouterr().err


def test_a_trajectory_template_needs_no_coordinates_and_paths_keep_their_digits(tmp_path):
    """The frames give the atoms: a template with species, lattice and settings only was refused when its cell
    was read from its structure. An include path like ../0d1/x.fdf is no Fortran number."""
    import re

    from siesta_dmguess.fdf import fdf_line
    from siesta_dmguess.structure import FdfFrames

    fdf = _edited(_h2o_run_copy(tmp_path), lambda t: re.sub(
        r"%block AtomicCoordinatesAndAtomicSpecies.*%endblock AtomicCoordinatesAndAtomicSpecies\n", "", t, flags=re.S))
    assert np.allclose(FdfFrames(fdf).cell, np.diag([12.0, 12.0, 12.0]))
    assert fdf_line("%include ../0d1/x.fdf\n") == "%include ../0d1/x.fdf\n"
    assert fdf_line(" 1.5d0 -2.D-1 3\n") == " 1.5e0 -2.e-1 3\n"


def test_siestas_own_structure_files_are_read_by_their_names(tmp_path, caplog):
    """A .STRUCT_IN / .STRUCT_NEXT_ITER (ASE knows the layout only as .STRUCT_OUT) keeps its cell; an .ANI (an xyz
    trajectory without a cell) is read frame by frame and its prediction is said to be of an isolated structure."""
    import ase.io
    import sisl
    from ase.build import bulk

    from siesta_dmguess.structure import read_frames

    crystal = bulk("Si", "diamond", 5.43, cubic=True)
    crystal.positions[0] += [0.05, -0.02, 0.01]
    for suffix in (".STRUCT_IN", ".STRUCT_NEXT_ITER", ".STRUCT_OUT"):
        path = tmp_path / f"si{suffix}"
        sisl.Geometry.new(crystal).write(tmp_path / "x.STRUCT_OUT")  # sisl writes the layout by this name only
        (tmp_path / "x.STRUCT_OUT").rename(path)
        st = read_structure(path)
        assert st.atoms.pbc.all() and np.allclose(st.atoms.cell, crystal.cell), suffix
        assert np.allclose(st.atoms.positions, crystal.positions, atol=1e-6), suffix
    water = Atoms("OH2", positions=[[1.0, 1.0, 1.0], [1.96, 1.0, 1.0], [0.76, 1.93, 1.0]])
    moved = water.copy()
    moved.positions[1, 0] += 0.1
    ase.io.write(tmp_path / "x.xyz", [water, moved], format="xyz")
    (tmp_path / "x.xyz").rename(tmp_path / "siesta.ANI")
    frames = read_frames(tmp_path / "siesta.ANI")
    assert [np.allclose(f.positions, a.positions) for f, a in zip(frames, (water, moved))] == [True, True]
    caplog.clear()
    st = read_structure(tmp_path / "siesta.ANI")
    assert np.allclose(st.atoms.positions, moved.positions) and not st.atoms.pbc.any()
    assert "holds no cell" in caplog.text and "siesta.ANI" in caplog.text


def test_siestas_structure_file_in_its_run_folder_is_predicted_with_the_runs_settings(tmp_path, caplog):
    """A `siesta.XV` beside the k-point fdf that wrote it was taken as a Γ-only structure file: refused, and the
    run's converged siesta.DM moved aside. It is the run's atoms: predicted with the fdf's k-points and labels."""
    import shutil

    import sisl

    from siesta_dmguess.fdf import fdf_sile
    from siesta_dmguess.predict import predict_density_matrix

    from .conftest import dataset

    si8 = dataset("si8")
    shutil.copytree(si8 / "basis", tmp_path / "basis")
    shutil.copytree(si8 / "0004", tmp_path / "run", ignore=shutil.ignore_patterns("*.HSX"))
    fdf = tmp_path / "run" / "input.fdf"
    geometry = fdf_sile(fdf).read_geometry()
    geometry.xyz[0] += [0.03, -0.02, 0.01]
    for name in ("siesta.XV", "siesta.STRUCT_OUT"):
        sisl.get_sile(str(tmp_path / "run" / name), "w").write_geometry(geometry)
        structure = read_structure(tmp_path / "run" / name)
        assert structure.fdf_settings.get("kgrid") == read_structure(fdf).fdf_settings["kgrid"], name
        assert np.allclose(structure.atoms.positions, geometry.xyz, atol=1e-6), name
        pred = predict_density_matrix(tmp_path / "run" / name, "silicon")
        assert pred.refusal_reason == "" and pred.density_matrix.geometry.nsc.prod() > 1  # images kept: k-points
    # A file of another label, or of other atoms, is a structure file on its own (with a warning for the latter)
    sisl.get_sile(str(tmp_path / "run" / "other.XV"), "w").write_geometry(geometry)
    assert "kgrid" not in read_structure(tmp_path / "run" / "other.XV").fdf_settings
    sisl.get_sile(str(tmp_path / "run" / "siesta.XV"), "w").write_geometry(geometry.sub(range(7)))
    caplog.clear()
    assert "kgrid" not in read_structure(tmp_path / "run" / "siesta.XV").fdf_settings
    assert "holds other atoms than the fdf (7 atoms, the fdf 8) (input.fdf, beside it)" in caplog.text
    from siesta_dmguess.predict import predict_for_run

    done = predict_for_run(tmp_path / "run" / "siesta.XV", tmp_path / "x.DM", model="silicon", fold=False,
                           edit_fdf=True)
    assert done.fdf is None and done.fdf_backup is None  # not that run's atoms: its fdf is left alone


def test_a_frame_of_a_trajectory_is_chosen_as_ase_does_with_file_at_index(tmp_path, caplog):
    """`predict md.traj@0` was "file not found": only the last frame of a trajectory could be predicted, and the
    warning about it was said twice with --model auto."""
    import ase.io

    from siesta_dmguess.structure import read_frames

    frames = []
    for k in range(3):
        atoms = Atoms("OH2", positions=[[1.0, 1.0, 1.0], [1.96 + 0.01 * k, 1.0, 1.0], [0.76, 1.93, 1.0]])
        frames.append(atoms)
    ase.io.write(tmp_path / "md.traj", frames)
    traj = tmp_path / "md.traj"
    for index, expected in (("0", [0]), ("-1", [2]), ("1:", [1, 2]), ("::2", [0, 2])):
        got = read_frames(f"{traj}@{index}")
        assert [round((f.positions[1, 0] - 1.96) / 0.01) for f in got] == expected, index
    assert np.allclose(read_structure(f"{traj}@1").atoms.positions, frames[1].positions)
    for index in ("7", "x", "5:9"):
        with pytest.raises(InputFileError, match=rf"md.traj: @{index} is no frame of its 3"):
            read_frames(f"{traj}@{index}")
    caplog.clear()
    from siesta_dmguess.cli import main

    assert main(["predict", str(traj), "-o", str(tmp_path / "x.DM")]) == 0  # --model auto
    assert caplog.text.count("holds 3 structures; predicting the last one") == 1


def test_a_batch_of_frames_writes_one_dm_each_and_says_errors_on_their_own_lines(tmp_path, capsys):
    """`predict md.traj@0 md.traj@-1` wrote both to md.DM (the second backing up the first); an error of a batch
    was printed into the progress bar's line; --quiet turns the bar off, as for train, evaluate and bench."""
    import ase.io

    from siesta_dmguess.cli import main

    water = Atoms("OH2", positions=[[1.0, 1.0, 1.0], [1.96, 1.0, 1.0], [0.76, 1.93, 1.0]])
    moved = water.copy()
    moved.positions[1, 0] += 0.02
    ase.io.write(tmp_path / "md.traj", [water, moved])
    traj = tmp_path / "md.traj"
    assert main(["predict", f"{traj}@0", str(tmp_path / "none.xyz"), f"{traj}@-1"]) == 2
    err = capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.glob("*.DM*")) == ["md@-1.DM", "md@0.DM"]
    assert any(line.startswith("siesta-dmguess: error: ") and "none.xyz" in line for line in err.splitlines())
    assert "predict:" in err  # the bar
    assert main(["predict", f"{traj}@0", f"{traj}@1", "--quiet", "--overwrite"]) == 0
    assert "predict:" not in capsys.readouterr().err


@pytest.mark.parametrize("case", ["fractional-without-lattice", "includes-itself", "no-atoms"])
def test_fdf_inputs_siesta_cannot_run_are_named(tmp_path, case):
    """Error paths no test reached: each names the file and what is wrong (an fdf including itself was a bare
    OSError: sisl followed it until it ran out of open files)."""
    fdf = tmp_path / "run.fdf"
    molecule = FDF.replace("LatticeConstant 1.0 Ang\n", "").replace(
        FDF[FDF.index("%block LatticeVectors"):FDF.index("AtomicCoordinatesFormat")], "")
    text, problem = {
        "fractional-without-lattice": (molecule.replace("AtomicCoordinatesFormat Ang", "AtomicCoordinatesFormat "
                                                        "Fractional"), "AtomicCoordinatesFormat Fractional needs a "
                                                                       "lattice, and this fdf has no LatticeConstant"),
        "includes-itself": ("%include run.fdf\n" + FDF, r"includes nest deeper than 20 files \(a file that includes "
                                                        r"itself\?\)"),
        "no-atoms": (FDF.replace(" 0.0 0.0 0.0 1\n", "").replace("NumberOfAtoms 1", "NumberOfAtoms 0"),
                     "no atoms"),
    }[case]
    fdf.write_text(text)
    with pytest.raises(InputFileError, match=problem) as err:
        read_structure(fdf)
    assert "run.fdf" in str(err.value)


def test_predict_for_run_on_siestas_files_and_outputs_of_every_kind(tmp_path, capsys):
    """A frame of the run's own .ANI keeps the run's settings (siesta.ANI@0 lost them: its suffix was .ANI@0); a
    run's .XV is told how *that run* reads the DM; a folder at the default output name is in the way unless -o names
    it; -o into a folder that does not exist is refused; one bad structure does not stop a batch with -o FOLDER."""
    import shutil

    import ase.io

    from siesta_dmguess.cli import main
    from siesta_dmguess.predict import predict_for_run

    fdf = _h2o_run_copy(tmp_path)
    run = fdf.parent
    atoms = read_structure(fdf).atoms
    moved = atoms.copy()
    moved.positions[1] += [0.02, 0.0, 0.0]
    ase.io.write(tmp_path / "x.xyz", [atoms, moved], format="xyz")
    shutil.move(tmp_path / "x.xyz", run / "siesta.ANI")
    frame = read_structure(f"{run / 'siesta.ANI'}@0")
    assert frame.atoms.pbc.all() and np.allclose(frame.atoms.cell, read_structure(fdf).atoms.cell)
    assert np.allclose(frame.atoms.positions, atoms.positions)
    # the .ANI's frame is the run's: the note is the run's (it reads siesta.DM), not the structure file's
    done = predict_for_run(f"{run / 'siesta.ANI'}@1", model="water")
    assert done.out == run / "siesta@1.DM" and done.fdf == fdf
    assert any(f"reads {run / 'siesta.DM'}, not {run / 'siesta@1.DM'}" in note for note in done.notes), done.notes
    # a folder where the default DM would go is in the way; -o FOLDER writes into it; a missing folder is said
    (run / "siesta.DM").mkdir()
    with pytest.raises(InputFileError, match="a folder is in the way"):
        predict_for_run(fdf, model="water")
    assert predict_for_run(fdf, run / "siesta.DM", model="water").out == run / "siesta.DM" / "siesta.DM"
    with pytest.raises(InputFileError, match="no such folder to write the DM into"):
        predict_for_run(fdf, f"{tmp_path / 'nowhere'}/", model="water")
    (tmp_path / "empty").mkdir()
    (tmp_path / "out").mkdir()
    assert main(["predict", str(tmp_path / "empty"), str(fdf), "-o", str(tmp_path / "out")]) == 2
    assert (tmp_path / "out" / "siesta.DM").is_file()  # the good one was written
    assert "empty: expected one .fdf in the run folder" in capsys.readouterr().err


def test_each_run_of_a_batch_gets_its_own_note_and_an_empty_output_is_none(tmp_path, capsys, monkeypatch):
    """Notes name only the fdf's file name, so a batch of runs repeats them: each run's must still be said (only the
    structure files' note, the same for all, is said once). `-o ''` wrote into the current folder."""
    from siesta_dmguess.cli import main

    fdfs = [_h2o_run_copy(tmp_path, name) for name in ("a", "b")]
    assert main(["predict", *map(str, fdfs), "--model", "water", "--quiet"]) == 0
    assert capsys.readouterr().out.count("so SIESTA will not read this DM") == 2
    monkeypatch.chdir(tmp_path)
    assert main(["predict", *map(str, fdfs), "--model", "water", "--quiet", "-o", "", "--overwrite"]) == 0
    assert not (tmp_path / "siesta.DM").exists() and all((f.parent / "siesta.DM").is_file() for f in fdfs)


def test_fewer_atoms_than_coordinate_rows_are_read_as_siesta_reads_them_and_said(tmp_path, caplog):
    """SIESTA reads NumberOfAtoms rows of the coordinates block; a miscount dropped an H and predicted an OH
    radical without a word."""
    path = tmp_path / "water.fdf"
    path.write_text(MOLECULE.format(lattice="").replace("NumberOfAtoms 3", "NumberOfAtoms 2"))
    with caplog.at_level("WARNING", logger="siesta_dmguess"):
        st = read_structure(path)
    assert st.labels == ["O", "H"]
    assert "water.fdf: NumberOfAtoms is 2 but AtomicCoordinatesAndAtomicSpecies has 3 rows" in caplog.text
    caplog.clear()
    path.write_text(MOLECULE.format(lattice=""))
    with caplog.at_level("WARNING", logger="siesta_dmguess"):
        assert len(read_structure(path).atoms) == 3
    assert "NumberOfAtoms" not in caplog.text
