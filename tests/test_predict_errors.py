"""predict / CLI on a saved model: output file, and every bad-input path gives a clear error."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from siesta_dmguess.card import load_model, save_model
from siesta_dmguess.cli import main
from siesta_dmguess.dm import read_density_matrix, read_dm_orbital_count
from siesta_dmguess.errors import InputFileError, ModelCompatibilityError
from siesta_dmguess.model import DensityMatrixModel
from siesta_dmguess.predict import predict_density_matrix, predict_to_file

from .conftest import DATASETS, dataset, small_config, water_molecule


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "tiny-water"
    model = DensityMatrixModel(small_config())
    save_model(model, out, {"name": "tiny-water", "xc": {"XC.functional": "LDA", "XC.authors": "CA"},
                            "siesta_settings": {"PAO.BasisSize": "DZP"}})
    return out


@pytest.fixture
def xyz(tmp_path):
    path = tmp_path / "water.xyz"
    water_molecule().write(path)
    return path


def test_predict_writes_symmetric_dm_with_right_orbitals(model_dir, xyz, tmp_path):
    out = tmp_path / "water.DM"
    pred = predict_to_file(xyz, out, model=model_dir)
    assert read_dm_orbital_count(out) == 13 + 2 * 5
    dense = read_density_matrix(out, pred.density_matrix.geometry).tocsr(0).toarray()
    assert np.abs(dense - dense.T).max() < 1e-6
    # diagonal starts from SIESTA's atomic guess: O 2s has q0 = 2
    assert dense.shape == (23, 23) and np.trace(dense) > 1.0


def test_unoptimized_tensor_products_give_the_same_dm(model_dir, xyz):
    """``load_model(optimize=False)`` (quicker to load, used by a one-structure ``predict``) is the same network."""
    fast, quick = (load_model(model_dir, dtype=torch.float64, optimize=opt) for opt in (True, False))
    a, b = (predict_density_matrix(xyz, m, refine="none").values for m in (fast, quick))
    assert np.abs(a).max() > 0.1 and np.abs(a - b).max() < 1e-12


def test_card_sha256_guards_weights(model_dir, tmp_path):
    bad = tmp_path / "bad-model"
    shutil.copytree(model_dir, bad)
    state = torch.load(bad / "weights.pt", weights_only=True)
    next(iter(state.values())).add_(1.0)
    torch.save(state, bad / "weights.pt")
    with pytest.raises(ModelCompatibilityError, match="sha256"):
        load_model(bad)


def test_missing_or_unloadable_weights_are_named(model_dir, tmp_path):
    """A model folder copied without weights.pt, or with a file that is not this network's weights and no sha256
    to catch it, was a bare FileNotFoundError or a torch traceback."""
    bad = tmp_path / "bad-model"
    shutil.copytree(model_dir, bad)
    (bad / "weights.pt").unlink()
    with pytest.raises(ModelCompatibilityError, match="has no weights.pt") as err:
        load_model(bad)
    assert "bad-model" in str(err.value)
    (bad / "weights.pt").write_bytes(b"not a torch file")
    with pytest.raises(ModelCompatibilityError, match="weights.pt cannot be loaded into the network"):
        load_model(bad, verify=False)
    torch.save({"foreign.weight": torch.zeros(2)}, bad / "weights.pt")
    with pytest.raises(ModelCompatibilityError, match="weights.pt cannot be loaded into the network"):
        load_model(bad, verify=False)



@pytest.mark.parametrize("broken", ["card.json", "config.json"])
def test_corrupt_card_or_config_is_named(model_dir, tmp_path, broken):
    bad = tmp_path / "bad-model"
    shutil.copytree(model_dir, bad)
    (bad / broken).write_text('{"species": ["H", ')  # cut off mid-write
    with pytest.raises(InputFileError, match="not valid") as err:
        load_model(bad)
    assert broken in str(err.value)

@pytest.mark.parametrize("key, value", [("mp_cutoff", "abc"), ("basis", {}), ("hidden_irreps", "8x0q")])
def test_a_config_whose_network_cannot_be_built_is_named(model_dir, tmp_path, key, value):
    """Values of the wrong kind were a bare ValueError or KeyError from deep inside the network's layers."""
    import json

    bad = tmp_path / "bad-model"
    shutil.copytree(model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config[key] = value
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputFileError, match="config.json: model config is not valid: the network it describes"):
        load_model(bad)


def test_species_missing_from_model(model_dir, tmp_path):
    from ase import Atoms

    path = tmp_path / "nh3.xyz"
    Atoms("NH3", positions=[[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]).write(path)
    with pytest.raises(ModelCompatibilityError) as err:
        predict_density_matrix(path, model_dir)
    assert "nh3.xyz" in str(err.value) and "'N'" in str(err.value)


def test_structure_ase_cannot_read(model_dir, tmp_path):
    path = tmp_path / "garbage.xyz"
    path.write_text("this is not\na structure file\n")
    with pytest.raises(InputFileError, match="garbage.xyz.*ASE cannot read"):
        predict_density_matrix(path, model_dir)
    assert main(["predict", str(path), "--model", str(model_dir)]) == 2


def test_a_periodic_direction_without_its_cell_vectors_is_a_clear_error(tmp_path):
    """A chain (pbc along a, a cell of one vector) was predicted as an isolated molecule without a word; SIESTA runs
    three vectors. The same chain with its vacuum vectors, or the molecule without pbc, is read."""
    from ase.io import write

    from siesta_dmguess.structure import read_structure

    chain = water_molecule()
    chain.set_cell([[3.2, 0, 0], [0, 0, 0], [0, 0, 0]])
    chain.pbc = [True, False, False]
    write(tmp_path / "chain.traj", chain)
    with pytest.raises(InputFileError, match=r"chain.traj: periodic along a \(pbc \[True, False, False\]\) but "
                                             r"its cell has 1 independent vector\(s\)"):
        read_structure(tmp_path / "chain.traj")
    chain.set_cell([3.2, 12, 12])
    write(tmp_path / "full.traj", chain)
    assert read_structure(tmp_path / "full.traj").periodic
    chain.set_cell([[3.2, 0, 0], [0, 0, 0], [0, 0, 0]])
    chain.pbc = False
    write(tmp_path / "molecule.traj", chain)
    assert not read_structure(tmp_path / "molecule.traj").periodic


def test_multi_frame_file_predicts_its_last_frame_and_says_so(tmp_path, caplog):
    from ase.io import write

    from siesta_dmguess.structure import read_structure

    first, last = water_molecule(), water_molecule(np.random.default_rng(5))
    path = tmp_path / "md.xyz"
    write(path, [first, last])
    with caplog.at_level("WARNING"):
        st = read_structure(path)
    assert np.allclose(st.atoms.positions, last.positions) and not np.allclose(st.atoms.positions, first.positions)
    assert "md.xyz holds 2 structures; predicting the last one" in caplog.text
    caplog.clear()
    write(tmp_path / "one.xyz", first)
    read_structure(tmp_path / "one.xyz")
    assert "holds" not in caplog.text


def test_missing_structure_and_unknown_model(model_dir, tmp_path, capsys):
    assert main(["predict", str(tmp_path / "none.fdf"), "--model", str(model_dir)]) == 2
    assert "none.fdf: structure file not found" in capsys.readouterr().err
    with pytest.raises(ModelCompatibilityError, match="no-such-model"):
        load_model("no-such-model")


def test_basis_hash_mismatch_is_rejected_unless_forced(model_dir, tmp_path):
    """An fdf whose folder holds an .ion.xml with another basis than the model's is refused."""
    run = dataset("h2o") / "0000"
    work = tmp_path / "run"
    work.mkdir()
    shutil.copy(run / "input.fdf", work / "input.fdf")
    # The shared O basis differs from the in-code fixture basis (radial shapes, exact radii).
    shutil.copy(run.parent / "basis" / "O.ion.xml", work / "O.ion.xml")
    with pytest.raises(ModelCompatibilityError) as err:
        predict_density_matrix(work / "input.fdf", model_dir)
    assert "basis of 'O'" in str(err.value) and "input.fdf" in str(err.value)
    pred = predict_density_matrix(work / "input.fdf", model_dir, force=True)
    assert any("basis of 'O'" in w for w in pred.warnings)


def test_fdf_setting_mismatch_names_the_setting(model_dir, tmp_path):
    run = dataset("h2o") / "0000"
    fdf = tmp_path / "input.fdf"
    fdf.write_text((run / "input.fdf").read_text().replace("XC.functional LDA", "XC.functional GGA")
                   .replace("XC.authors CA", "XC.authors PBE"))
    with pytest.raises(ModelCompatibilityError, match="XC.functional is 'GGA'"):
        predict_density_matrix(fdf, model_dir)


WATER_FDF = """SystemLabel water
NumberOfAtoms 3
NumberOfSpecies 2
%block ChemicalSpeciesLabel
1 1 H
2 8 O
%endblock ChemicalSpeciesLabel
LatticeConstant 1.0 Ang
%block LatticeVectors
10.0 0.0 0.0
0.0 10.0 0.0
0.0 0.0 10.0
%endblock LatticeVectors
AtomicCoordinatesFormat Ang
%block AtomicCoordinatesAndAtomicSpecies
5.000 5.000 5.000 2
5.957 5.000 5.000 1
4.760 5.927 5.000 1
%endblock AtomicCoordinatesAndAtomicSpecies
PAO.BasisSize DZP
XC.functional LDA
XC.authors CA
"""


@pytest.mark.parametrize("edit, problem", [
    (lambda t: t + "PAO.EnergyShift 0.1 eV\n", "PAO.EnergyShift"),  # larger orbitals: another basis
    (lambda t: t.replace("PAO.BasisSize DZP\n", "PAO.BasisSize SZ\n"), "PAO.BasisSize"),
    (lambda t: t.replace("PAO.BasisSize DZP\n", ""), None),  # SIESTA's default basis size is DZP
    (lambda t: t + "PAO.EnergyShift 20 mRy\n", None),  # SIESTA's default energy shift, in other units
    (lambda t: t + "PAO.EnergyShift 0.2721 eV\n", None),  # the same, rounded in eV (0.019999 Ry)
    (lambda t: t + "PAO.EnergyShift 0.27 eV\n", "PAO.EnergyShift"),  # 0.8 % smaller: another basis
    (lambda t: t.replace("XC.authors CA", "XC.authors PZ"), None),  # SIESTA reads CA and PZ as the same LDA
    (lambda t: t.replace("XC.functional LDA\nXC.authors CA\n", ""), None),  # SIESTA's default XC is that LDA
    # Other basis options, which the card's training fdfs did not set (a bare DZP prediction, before):
    (lambda t: t + "PAO.SplitNorm 0.30\n", r"fdf sets PAO.SplitNorm \(0.30\), which shapes the basis"),
    (lambda t: t + "pao-soft-default T\n", "pao-soft-default"),  # fdf keys ignore case, '.', '-' and '_'
    # ... stated at SIESTA 4.1's defaults they are the run that leaves them out:
    (lambda t: t + "PAO.SplitNorm 0.150\nPAO.SoftDefault .false.\nPAO.BasisType split\n", None),
    (lambda t: t + "PAO.EnergyPolCutoff 272.11 eV\nPAO.OldStylePolorbs T\n", None),
    # SIESTA reads PAO.SoftPotential as a bare number (fdf_double): a unit after it changes nothing
    (lambda t: t + "PAO.SoftPotential 40 Ry\nPAO.SoftInnerRadius 0.9d0\n", None),
    (lambda t: t + "PAO.SoftPotential 30 Ry\n", r"fdf sets PAO.SoftPotential \(30\)"),
    (lambda t: t + "PAO.SoftPotential\t40\tRy\n", None),  # tabs are blanks too
    (lambda t: t + "PAO.EnergyPolCutoff 10 Ry\n", r"PAO.EnergyPolCutoff .* SIESTA's default \(20 Ry\)"),
    (lambda t: t + "PAO.EnergyCutoff 20000 mRy\n", None),  # the default in another unit
    (lambda t: t + "PAO.EnergyCutoff 1500 mRy\n", r"PAO.EnergyCutoff .* SIESTA's default \(20 Ry\)"),
    (lambda t: t + "%block PAO.Basis\nH 1\n n=1 0 1\n 0.0\n%endblock PAO.Basis\n", "fdf sets PAO.Basis"),
    (lambda t: t + "User.Basis T\n", "User.Basis"),
    # ASE's Siesta writes a PAO.BasisSizes block, one size per species, which overrides PAO.BasisSize:
    (lambda t: t + "%block PAO.BasisSizes\n O DZP\n H DZP\n%endblock PAO.BasisSizes\n", None),
    (lambda t: t + "%block PAO.BasisSizes\n O DZP\n H SZ\n%endblock PAO.BasisSizes\n",
     "PAO.BasisSizes gives species 'H' a SZ basis, the model was trained with DZP"),
])
def test_a_setting_the_fdf_leaves_out_is_compared_as_siestas_default(tmp_path, shipped, edit, problem):
    """The shipped `water` card records only the settings its fdf runs wrote; what a run leaves out is SIESTA's
    default, so a run that states another value is refused, and one that states the default is not."""
    fdf = tmp_path / "water.fdf"
    fdf.write_text(edit(WATER_FDF))
    if problem is None:
        assert predict_density_matrix(fdf, shipped("water")).warnings == []
    else:
        with pytest.raises(ModelCompatibilityError, match=problem) as err:
            predict_density_matrix(fdf, shipped("water"))
        assert "water.fdf" in str(err.value)


def test_a_run_folder_written_by_ases_siesta_passes_the_basis_check(tmp_path, shipped):
    """ASE's Siesta labels species O.1, H.2 and SIESTA names its .ion.xml files so: the same basis under another
    label is the model's basis (the label is part of the basis hash; such a folder was refused, before)."""
    basis = dataset("h2o") / "basis"
    labelled = WATER_FDF.replace("1 1 H\n", "1 1 H.2\n").replace("2 8 O\n", "2 8 O.1\n")
    (tmp_path / "siesta.fdf").write_text(labelled)
    for element, label in (("O", "O.1"), ("H", "H.2")):  # as SIESTA writes them for such a run
        text = (basis / f"{element}.ion.xml").read_text()
        text = text.replace(f"<label> {element} </label>", f"<label> {label} </label>")
        (tmp_path / f"{label}.ion.xml").write_text(text)
    assert "<label> H.2 </label>" in (tmp_path / "H.2.ion.xml").read_text()
    assert predict_density_matrix(tmp_path / "siesta.fdf", shipped("water")).warnings == []
    shutil.copy(basis / "O.ion.xml", tmp_path / "H.2.ion.xml")  # another basis under that label is still refused
    with pytest.raises(ModelCompatibilityError, match="basis of 'H.2' in H.2.ion.xml has 13 orbitals"):
        predict_density_matrix(tmp_path / "siesta.fdf", shipped("water"))


def test_a_model_whose_species_carry_ases_labels_predicts_plain_labels_by_element(tmp_path):
    """A model trained on runs of ASE's Siesta has species O.1 and H.2: an fdf labelled O and H (or the ASE
    calculator, whose structures are labelled by element) maps to them by atomic number (it was refused as not
    covered)."""
    from dataclasses import replace

    from siesta_dmguess.guard import model_species_of_labels
    from siesta_dmguess.structure import read_structure

    from .conftest import water_basis

    plain = water_basis()
    basis = {"O.1": replace(plain["O"], symbol="O.1"), "H.2": replace(plain["H"], symbol="H.2")}
    save_model(DensityMatrixModel(small_config(basis)), tmp_path / "ase-labels", {"name": "ase-labels"})
    (tmp_path / "plain.fdf").write_text(WATER_FDF)
    (tmp_path / "ase.fdf").write_text(WATER_FDF.replace("1 1 H\n", "1 1 H.2\n").replace("2 8 O\n", "2 8 O.1\n"))
    a = predict_density_matrix(tmp_path / "plain.fdf", tmp_path / "ase-labels")
    b = predict_density_matrix(tmp_path / "ase.fdf", tmp_path / "ase-labels")
    assert np.abs(a.values).max() > 0.1 and np.array_equal(a.values, b.values)
    structure = read_structure(tmp_path / "plain.fdf")
    assert model_species_of_labels(structure, ["O.1", "O.3", "H.2"], {"O.1": 8, "O.3": 8, "H.2": 1}) == \
        {"O": None, "H": "H.2"}  # two oxygen species: which one the run means is not for predict to guess


def test_species_labels_that_are_not_element_symbols_map_to_the_model_species(model_dir, tmp_path):
    """SIESTA labels only name files ("Ow", "H_pbe"): the prediction follows the element, and the basis
    check compares each label's .ion file with the model's basis of that element, naming both."""
    plain, labelled = tmp_path / "plain", tmp_path / "labelled"
    plain.mkdir(), labelled.mkdir()
    (plain / "input.fdf").write_text(WATER_FDF)
    (labelled / "input.fdf").write_text(WATER_FDF.replace("1 1 H\n", "1 1 H_pbe\n").replace("2 8 O\n", "2 8 Ow\n"))
    a = predict_density_matrix(plain / "input.fdf", model_dir)
    b = predict_density_matrix(labelled / "input.fdf", model_dir)
    assert np.abs(a.values).max() > 0.1 and np.array_equal(a.values, b.values)
    # A label whose element the model lacks is still refused, by its label.
    (labelled / "input.fdf").write_text(WATER_FDF.replace("1 1 H\n", "1 7 Nx\n"))
    with pytest.raises(ModelCompatibilityError, match=r"species \['Nx'\] are not covered"):
        predict_density_matrix(labelled / "input.fdf", model_dir)
    # The basis of "Ow" (here the shared datasets' O, unlike the fixture's) is checked against the model's O.
    shared_oxygen = DATASETS / "h2o" / "basis" / "O.ion.xml"
    if shared_oxygen.is_file():
        (labelled / "input.fdf").write_text(WATER_FDF.replace("2 8 O\n", "2 8 Ow\n"))
        shutil.copy(shared_oxygen, labelled / "Ow.ion.xml")
        with pytest.raises(ModelCompatibilityError, match="basis of 'Ow' in Ow.ion.xml differs from the model's 'O'"):
            predict_density_matrix(labelled / "input.fdf", model_dir)


@pytest.mark.parametrize("spin_line, named", [("Spin polarized", "Spin polarized"),
                                              ("SpinPolarized T", "SpinPolarized T"), ("Spin non-polarized", None)])
def test_spin_polarized_fdf_is_rejected(model_dir, tmp_path, spin_line, named):
    fdf = tmp_path / "input.fdf"
    fdf.write_text(WATER_FDF + spin_line + "\n")
    if named is None:  # an explicitly unpolarized run is fine
        assert predict_density_matrix(fdf, model_dir).density_matrix.spin.is_unpolarized
        return
    with pytest.raises(ModelCompatibilityError, match=f"{named}.*spin-unpolarized DMs only") as info:
        predict_density_matrix(fdf, model_dir)
    assert "input.fdf" in str(info.value)


def test_existing_output_is_backed_up_by_cli(model_dir, xyz, tmp_path, capsys):
    out = tmp_path / "w.DM"
    assert main(["predict", str(xyz), "--model", str(model_dir), "-o", str(out)]) == 0
    first = out.read_bytes()
    assert main(["predict", str(xyz), "--model", str(model_dir), "-o", str(out)]) == 0
    assert (tmp_path / "w.DM.bak").read_bytes() == first
    assert "23 orbitals" in capsys.readouterr().out


def test_predict_cli_writes_systemlabel_dm_next_to_an_fdf_and_keeps_the_old_one(model_dir, tmp_path, capsys):
    """Without -o, an fdf's prediction goes where SIESTA looks for it (DM.UseSaveDM T): <SystemLabel>.DM."""
    fdf = tmp_path / "input.fdf"
    fdf.write_text(WATER_FDF)
    assert main(["predict", str(fdf), "--model", str(model_dir)]) == 0
    target = tmp_path / "water.DM"  # SystemLabel water
    assert read_dm_orbital_count(target) == 23 and not (tmp_path / "input.DM").exists()
    before = target.read_bytes()
    assert main(["predict", str(fdf), "--model", str(model_dir)]) == 0
    assert (tmp_path / "water.DM.bak").read_bytes() == before  # the previous file is kept, not overwritten


def test_a_systemlabel_with_spaces_is_refused_as_siesta_refuses_it(model_dir, tmp_path, capsys):
    """A probe's ``SystemLabel my dimer run`` got ``my dimer run.DM`` and an edited fdf, and SIESTA 4.1 then stopped
    at start-up ("SystemLabel must *NOT* contain any spaces!", reinit.F)."""
    fdf = tmp_path / "input.fdf"
    fdf.write_text(WATER_FDF.replace("SystemLabel water", "SystemLabel my dimer run"))
    assert main(["predict", str(tmp_path), "--model", str(model_dir), "--edit-fdf"]) == 2
    err = capsys.readouterr().err
    assert "input.fdf" in err and "SystemLabel 'my dimer run' contains spaces" in err and "my_dimer_run" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.fdf"]  # no DM, no edit
    fdf.write_text(WATER_FDF.replace("SystemLabel water", "SystemLabel my_dimer_run  # a comment"))
    assert main(["predict", str(tmp_path), "--model", str(model_dir)]) == 0
    assert (tmp_path / "my_dimer_run.DM").is_file()
    # fdf separates a key from its value by anything that is not a token character: SIESTA names its files water.*
    fdf.write_text(WATER_FDF.replace("SystemLabel water", "SystemLabel = water"))
    assert main(["predict", str(tmp_path), "--model", str(model_dir)]) == 0
    assert (tmp_path / "water.DM").is_file()


def water_files(folder, n: int) -> list[str]:
    """``n`` slightly different water molecules written as xyz files."""
    paths = []
    for k in range(n):
        path = folder / f"w{k}.xyz"
        water_molecule(np.random.default_rng(k)).write(path)
        paths.append(str(path))
    return paths


def test_predict_cli_handles_several_structures_and_refuses_one_output_for_them(model_dir, tmp_path, capsys):
    paths = water_files(tmp_path, 3)
    assert main(["predict", *paths, "--model", str(model_dir)]) == 0
    for path in paths:
        assert read_dm_orbital_count(path.replace(".xyz", ".DM")) == 23
    # a structure file's DM is not where SIESTA looks: said once per batch
    assert capsys.readouterr().out.count("note: SIESTA reads <SystemLabel>.DM from the folder it runs in") == 1
    assert main(["predict", *paths, "--model", str(model_dir), "-o", str(tmp_path / "one.DM")]) == 2
    assert "-o names one output file" in capsys.readouterr().err


def test_predict_of_several_structures_reports_the_start_up_apart(model_dir, tmp_path, capsys, monkeypatch):
    """With several structures the one-off start-up (card.ready_model) is printed once, and each structure's
    printed time is its own; a single structure's time is the whole wait, start-up included."""
    import re
    import time

    from siesta_dmguess.card import LoadedModel

    def slow_warm_up(self):  # a start-up that stands out against a tiny model's prediction, even on a busy machine
        time.sleep(3.0)
        return 3.0

    monkeypatch.setattr(LoadedModel, "warm_up", slow_warm_up)
    paths = water_files(tmp_path, 2)
    assert main(["predict", *paths, "--model", str(model_dir)]) == 0
    out = capsys.readouterr().out
    startup = re.findall(r"ready in ([0-9.]+) s \(loading the model", out)
    assert len(startup) == 1 and float(startup[0]) >= 3.0
    times = [float(t) for t in re.findall(r"predicted in ([0-9.]+) s", out)]
    assert len(times) == 2 and max(times) < 3.0
    assert main(["predict", paths[0], "--model", str(model_dir), "-o", str(tmp_path / "one.DM")]) == 0
    out = capsys.readouterr().out
    assert "ready in" not in out


@pytest.fixture(scope="module")
def far_model_dir(tmp_path_factory):
    """A model whose novelty flag level is so low that every structure lies 'far' outside its training data."""
    out = tmp_path_factory.mktemp("far") / "tiny-far"
    model = DensityMatrixModel(small_config())
    model.novelty_threshold.fill_(1e-12)
    save_model(model, out, {"name": "tiny-far"})
    return out


def test_far_out_of_distribution_structure_gets_no_dm_unless_forced(model_dir, far_model_dir, xyz, tmp_path):
    from siesta_dmguess.errors import UnreliablePredictionError
    from siesta_dmguess.predict import FAR_NOVELTY_FACTOR

    out = tmp_path / "water.DM"
    with pytest.raises(UnreliablePredictionError, match=r"water.xyz: far outside the training data of model tiny-far "
                                                        r"\(novelty .*--force writes it") as info:
        predict_to_file(xyz, out, model=far_model_dir)
    assert not out.exists()
    pred = info.value.prediction  # the prediction is kept for the caller (the benchmark records its novelty)
    assert pred.far_out_of_distribution and pred.novelty > FAR_NOVELTY_FACTOR * pred.novelty_threshold
    assert predict_to_file(xyz, out, model=far_model_dir, force=True).far_out_of_distribution and out.is_file()
    # the same structure with a model whose flag level is not that low (here: not fitted) is predicted as usual
    assert not predict_density_matrix(xyz, model_dir).far_out_of_distribution


def test_cli_predict_skips_far_structures_and_says_so(far_model_dir, model_dir, xyz, tmp_path, capsys):
    out = tmp_path / "water.DM"
    assert main(["predict", str(xyz), "--model", str(far_model_dir), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "far outside the training data" in err and str(xyz) in err and not out.exists()
    assert main(["predict", str(xyz), "--model", str(far_model_dir), "-o", str(out), "--force"]) == 0
    assert out.is_file()


def test_a_refused_prediction_moves_a_stale_dm_aside_so_siesta_starts_from_its_atomic_guess(far_model_dir, xyz,
                                                                                             tmp_path):
    """With ``DM.UseSaveDM T`` SIESTA reads whatever ``<SystemLabel>.DM`` it finds: a refusal that left an earlier
    run's DM there would start SIESTA from it, not from its atomic guess. The file is kept, under a backup name."""
    from siesta_dmguess.errors import UnreliablePredictionError

    out = tmp_path / "water.DM"
    out.write_bytes(b"an earlier run's DM")
    with pytest.raises(UnreliablePredictionError, match=r"the existing water.DM was moved to water.DM.bak"):
        predict_to_file(xyz, out, model=far_model_dir)
    assert not out.exists() and (tmp_path / "water.DM.bak").read_bytes() == b"an earlier run's DM"


def test_cli_predict_batch_goes_on_past_a_far_structure(model_dir, xyz, tmp_path, monkeypatch, capsys):
    """In a batch, a structure far outside the training data gets no DM, the others do, and the exit code says
    that one was skipped."""
    import siesta_dmguess.predict as predict_module
    from siesta_dmguess.errors import UnreliablePredictionError

    real = predict_module.predict_to_file

    def far_for_the_first(structure, out, **kw):
        if Path(structure.source) == xyz:  # the CLI reads each structure once and predicts that
            raise UnreliablePredictionError("far outside the training data", structure.source)
        return real(structure, out, **kw)

    monkeypatch.setattr(predict_module, "predict_to_file", far_for_the_first)
    other = tmp_path / "other.xyz"
    water_molecule().write(other)
    assert main(["predict", str(xyz), str(other), "--model", str(model_dir)]) == 2
    assert not xyz.with_suffix(".DM").exists() and other.with_suffix(".DM").is_file()
    assert f"{xyz}: far outside the training data" in capsys.readouterr().err


def test_cli_predict_batch_goes_on_past_a_bad_file_and_counts_the_failures(model_dir, xyz, tmp_path, capsys):
    """One unreadable structure and one the model does not cover: each is named with its reason, the good one
    still gets its DM, and a last line counts the failures (exit code 2)."""
    from ase import Atoms

    broken = tmp_path / "broken.xyz"
    broken.write_text("3\nnot a structure\nO 0 0\n")
    ammonia = tmp_path / "nh3.xyz"
    Atoms("NH3", positions=[[0, 0, 0], [0.94, 0, 0.3], [-0.47, 0.81, 0.3], [-0.47, -0.81, 0.3]]).write(ammonia)
    assert main(["predict", str(broken), str(xyz), str(ammonia), "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert f"error: {broken}" in err and f"error: {ammonia}" in err and "['N']" in err
    assert "2 of 3 structures got no DM" in err
    assert xyz.with_suffix(".DM").is_file() and not ammonia.with_suffix(".DM").exists()
    assert main(["predict", str(broken), "--model", str(model_dir)]) == 2  # alone: the error, no count
    assert "got no DM" not in capsys.readouterr().err
    # A run folder whose fdf cannot be read (its SystemLabel names the default output) or with two fdfs: the same,
    # where it stopped the batch before.
    (tmp_path / "badfdf").mkdir()
    (tmp_path / "badfdf" / "input.fdf").write_text("%block ChemicalSpeciesLabel\n 1 8 O\n")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a.fdf").write_text("SystemLabel a\n")
    (tmp_path / "two" / "b.fdf").write_text("SystemLabel b\n")
    xyz.with_suffix(".DM").unlink()
    assert main(["predict", str(tmp_path / "badfdf"), str(tmp_path / "two"), str(xyz), "--model",
                 str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert "has no %endblock" in err and "found 2" in err and "2 of 3 structures got no DM" in err
    assert xyz.with_suffix(".DM").is_file()


def test_an_output_that_cannot_be_written_is_named_before_predicting(model_dir, xyz, tmp_path, capsys,
                                                                    monkeypatch):
    """-o onto a folder said "must end in .DM", after the prediction; a read-only folder was a bare
    PermissionError (which also stopped a batch)."""
    import tempfile

    (tmp_path / "folder.DM").mkdir()  # -o onto a folder writes into it, under the default name
    assert main(["predict", str(xyz), "--model", str(model_dir), "-o", str(tmp_path / "folder.DM")]) == 0
    assert read_dm_orbital_count(tmp_path / "folder.DM" / xyz.with_suffix(".DM").name) == 23
    (tmp_path / "more").mkdir()
    paths = water_files(tmp_path / "more", 2)
    assert main(["predict", *paths, "--model", str(model_dir), "-o", str(tmp_path / "folder.DM")]) == 0
    assert sorted(p.name for p in (tmp_path / "folder.DM").iterdir()) == sorted(
        [xyz.with_suffix(".DM").name] + [Path(p).with_suffix(".DM").name for p in paths])
    # ... but not two structures under one name
    (tmp_path / "other").mkdir()
    twin = tmp_path / "other" / Path(paths[0]).name
    twin.write_text(Path(paths[0]).read_text())
    assert main(["predict", paths[0], str(twin), "--model", str(model_dir), "-o", str(tmp_path / "folder.DM")]) == 2
    assert f"would both be written to {Path(paths[0]).with_suffix('.DM').name} in" in capsys.readouterr().err
    # nor two beside their inputs (a probe's siesta.XV and siesta.STRUCT_OUT of one run: one siesta.DM, predicted
    # twice; here an .xyz and the same atoms as .extxyz), while one input given twice is predicted once (no .bak);
    # a folder -o that does not exist is said as such with several structures too
    twin = Path(paths[0]).with_suffix(".extxyz")
    twin.write_text(Path(paths[0]).read_text())
    assert main(["predict", paths[0], str(twin), "--model", str(model_dir)]) == 2
    assert "would both be written to" in capsys.readouterr().err  # (not "the same run's DM": they are two files)
    assert not Path(paths[0]).with_suffix(".DM").exists()
    assert main(["predict", paths[0], paths[0], "--model", str(model_dir)]) == 0
    assert Path(paths[0]).with_suffix(".DM").exists() and not Path(paths[0]).with_suffix(".DM.bak").exists()
    assert main(["predict", *paths, "--model", str(model_dir), "-o", str(tmp_path / "nowhere") + "/"]) == 2
    assert "no such folder to write the DMs into" in capsys.readouterr().err

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert main(["predict", str(xyz), "--model", str(model_dir), "-o", str(tmp_path / "x.DM")]) == 2
    assert "x.DM: cannot write this file (Permission denied)" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["extxyz", "fdf"])
def test_a_cell_that_spans_no_volume_is_named(tmp_path, kind):
    """Two parallel lattice vectors were a numpy LinAlgError (a structure file) or a NaN conversion error (an
    fdf)."""
    if kind == "extxyz":
        path = tmp_path / "flat.extxyz"
        path.write_text('3\nLattice="5 0 0 5 0 0 0 0 5" pbc="T T T"\nO 0 0 0\nH 0.96 0 0\nH -0.24 0.93 0\n')
    else:
        run = tmp_path / "run"
        shutil.copytree(dataset("h2o") / "0004", run)
        fdf = next(run.glob("*.fdf"))
        text = fdf.read_text()
        start = text.index("%block LatticeVectors")
        rows = text[start:].splitlines()
        rows[2] = rows[1]  # the second vector repeats the first
        fdf.write_text(text[:start] + "\n".join(rows) + "\n")
        path = fdf
    with pytest.raises(InputFileError, match="the lattice vectors span no volume"):
        predict_density_matrix(path, "water")


def test_threads_option_sets_torch_threads_for_the_command_only(model_dir, xyz, tmp_path, torch_thread_log):
    """`predict --threads 1` predicts on one torch thread (the remedy for busy cores) and leaves torch's setting
    as it was afterwards; without it, torch's own setting is used."""
    import siesta_dmguess.predict as predict_module

    seen = torch_thread_log(predict_module, "predict_to_file")
    assert main(["predict", str(xyz), "--model", str(model_dir), "-o", str(tmp_path / "a.DM"), "--threads", "1"]) == 0
    assert torch.get_num_threads() == 2
    assert main(["predict", str(xyz), "--model", str(model_dir), "-o", str(tmp_path / "b.DM")]) == 0
    assert seen == [1, 2]


def _diamond_fdf(kgrid: str) -> str:
    """An 8-atom cubic diamond-silicon cell (5.43 Å) as an fdf with the given k-point lines."""
    from ase.build import bulk

    from siesta_dmguess.siesta.templates import fdf_with_geometry

    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.03, seed=1)
    template = ("SystemLabel siesta\nNumberOfSpecies 1\n%block ChemicalSpeciesLabel\n 1 14 Si\n"
                "%endblock ChemicalSpeciesLabel\nPAO.BasisSize DZP\nXC.functional LDA\nXC.authors CA\n" + kgrid)
    return fdf_with_geometry(template, atoms, ["Si"] * 8)


def test_a_run_sampled_more_coarsely_than_the_models_training_runs_gets_no_dm(tmp_path, shipped):
    """`silicon` learned from k-point runs; a Γ-only 8-atom cell repeats the crystal every 5.43 Å, less than its
    DM's range, and gets no DM unless forced (the error says why and what helps); 2x2x2 k-points (10.9 Å) do.
    The card decides: the same model with a card saying it saw such runs predicts the Γ-only cell."""
    from siesta_dmguess.card import update_card
    from siesta_dmguess.errors import UnreliablePredictionError

    gamma, k2 = tmp_path / "gamma.fdf", tmp_path / "k2.fdf"
    gamma.write_text(_diamond_fdf(""))
    k2.write_text(_diamond_fdf("%block kgrid_Monkhorst_Pack\n 2 0 0 0.0\n 0 2 0 0.0\n 0 0 2 0.0\n"
                               "%endblock kgrid_Monkhorst_Pack\n"))
    with pytest.raises(UnreliablePredictionError, match=r"gamma.fdf: the run's k-grid gives the crystal a sampling "
                                                        r"period of 5\.4\d .*more k-points, or a larger cell") as err:
        predict_to_file(gamma, tmp_path / "gamma.DM", model=shipped("silicon"))
    assert err.value.prediction.sampling_reason and not (tmp_path / "gamma.DM").exists()
    # A structure file has no k-points: the error leads with that, and with what helps (--fold no)
    import ase.io

    from siesta_dmguess.structure import read_structure

    ase.io.write(tmp_path / "si.cif", read_structure(gamma).atoms)
    with pytest.raises(UnreliablePredictionError, match=r"si.cif: without an fdf \(a structure file has no "
                                                        r"k-points\) the run is taken as Γ-only .*; for a k-point run, "
                                                        r"predict with --fold no"):
        predict_to_file(tmp_path / "si.cif", tmp_path / "si.DM", model=shipped("silicon"))
    assert predict_to_file(tmp_path / "si.cif", tmp_path / "si.DM", model=shipped("silicon"), fold=False)
    assert predict_to_file(gamma, tmp_path / "gamma.DM", model=shipped("silicon"), force=True).folded
    assert not predict_to_file(k2, tmp_path / "k2.DM", model=shipped("silicon")).sampling_reason

    import shutil

    from siesta_dmguess.card import resolve_model

    other = tmp_path / "silicon-seen"
    shutil.copytree(resolve_model("silicon"), other)
    update_card(other, {"training": {"aliased_sampling": True}})
    assert not predict_density_matrix(gamma, other).sampling_reason


def _methane(c_h_factor: float = 1.0):
    """CH4 with one C-H bond pulled out to ``c_h_factor`` times its length."""
    from ase.build import molecule

    atoms = molecule("CH4")
    atoms.positions[1] = atoms.positions[0] + c_h_factor * (atoms.positions[1] - atoms.positions[0])
    return atoms


def test_a_breaking_bond_gets_no_dm_unless_forced(tmp_path, shipped):
    """Where a bond breaks the model does not say which states hold the electrons: its DM's natural occupations
    have no gap, and such guesses saved SIESTA nothing (docs/benchmarks.md, "Bonds breaking"). The same molecule
    at equilibrium is predicted as usual."""
    from siesta_dmguess.errors import UnreliablePredictionError
    from siesta_dmguess.refine import MIN_OCCUPATION_GAP

    model = shipped("chno-molecules")
    for name, factor in (("equilibrium", 1.0), ("stretched", 2.0)):
        _methane(factor).write(tmp_path / f"{name}.xyz")
    ok = predict_to_file(tmp_path / "equilibrium.xyz", tmp_path / "equilibrium.DM", model=model)
    assert ok.refinement == "idempotent" and not ok.refusals and (tmp_path / "equilibrium.DM").is_file()
    out = tmp_path / "stretched.DM"
    with pytest.raises(UnreliablePredictionError, match=r"stretched.xyz: the model's DM has no clear occupied space "
                                                        r"\(HOMO-LUMO natural-occupation gap 0\.\d\d\d < 0.5.*--force"):
        predict_to_file(tmp_path / "stretched.xyz", out, model=model)
    assert not out.exists()
    forced = predict_to_file(tmp_path / "stretched.xyz", out, model=model, force=True)
    assert out.is_file() and forced.refusal_kind == "mixed" and forced.occupation_gap < MIN_OCCUPATION_GAP
    assert forced.refinement == "charge"  # the written DM: charge-scaled, as no projection applies


def test_a_charged_water_without_clear_occupied_space_is_not_blamed_on_a_breaking_bond(tmp_path):
    """NetCharge 2 on a water molecule: the model's DM holds the neutral molecule's four occupied states, so the gap
    for three falls between two occupied ones, and the refusal said "as where a bond breaks"."""
    from siesta_dmguess.errors import UnreliablePredictionError

    from .conftest import dataset

    src = dataset("h2o") / "0004"
    (tmp_path / "input.fdf").write_text("NetCharge 2.0\n" + (src / "input.fdf").read_text())
    for species in ("O", "H"):
        (tmp_path / f"{species}.ion.xml").write_bytes((src.parent / "basis" / f"{species}.ion.xml").read_bytes())
    with pytest.raises(UnreliablePredictionError, match=r"NetCharge 2 leaves 6 electrons, .*charged structures are "
                                                        r"not what the models learned") as err:
        predict_to_file(tmp_path / "input.fdf", tmp_path / "out.DM", model="water")
    assert "bond" not in str(err.value)


def test_only_a_failed_projection_is_a_mixed_state(model_dir, xyz, shipped):
    """The gap decides only where the projection was tried and found none; a pure prediction, or one that was
    never projected (k-points, odd electron counts, --refine charge), is used. So is any prediction of a model
    whose own validation DMs were not all projected (`silicon`, a model of k-point crystals; the tiny test model,
    never validated)."""
    from dataclasses import replace

    pred = replace(predict_density_matrix(xyz, model_dir), pure_on_validation=True)
    assert replace(pred, refinement="charge", occupation_gap=0.3).refusal_kind == "mixed"
    assert replace(pred, refinement="charge", occupation_gap=0.6).refusal_kind == ""
    assert replace(pred, refinement="idempotent", occupation_gap=0.6).refusal_kind == ""
    assert replace(pred, refinement="charge", occupation_gap=None).refusal_kind == ""
    assert replace(pred, refinement="charge", occupation_gap=0.3, pure_on_validation=False).refusal_kind == ""
    assert not predict_density_matrix(xyz, model_dir).pure_on_validation
    assert [predict_density_matrix(xyz, shipped(name)).pure_on_validation
            for name in ("water", "chno-molecules")] == [True, True]
    from siesta_dmguess.predict import _pure_on_validation

    assert not _pure_on_validation(shipped("silicon").card)


def test_cli_predict_reports_the_projections_gap(tmp_path, capsys):
    """The report of a projected DM gives the HOMO-LUMO gap the guard looks at (1 for a pure state)."""
    from ase.build import molecule

    molecule("H2O").write(tmp_path / "water.xyz")
    assert main(["predict", str(tmp_path / "water.xyz"), "--model", "water", "-o", str(tmp_path / "w.DM")]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("electrons Tr(D S)")][0]
    assert "refined: idempotent; HOMO-LUMO natural-occupation gap 1.00 (1 for a pure state)" in line


def test_predict_on_a_run_folder_writes_the_dm_siesta_reads_there(model_dir, tmp_path, capsys):
    """A run folder stands for its fdf; the DM goes to ``<SystemLabel>.DM`` in it, where ``DM.UseSaveDM T``
    finds it."""
    from siesta_dmguess.siesta.templates import fdf_with_geometry

    from .test_fdf_geometry import FDF

    run = tmp_path / "run"
    run.mkdir()
    atoms = water_molecule()
    (run / "job.fdf").write_text(fdf_with_geometry(FDF.replace("SystemLabel siesta", "SystemLabel mol"), atoms,
                                                   atoms.get_chemical_symbols()))
    assert main(["predict", str(run), "--model", str(model_dir)]) == 0
    assert read_dm_orbital_count(run / "mol.DM") == 23 and not (tmp_path / "run.DM").exists()
    # the fdf does not ask SIESTA to read it: predict says so (siesta.templates.dm_read_note); nor would SIESTA find
    # its pseudopotentials (a probe's run without H.psf got its DM and no word of it; bench refused it)
    out = capsys.readouterr().out
    assert "note: job.fdf does not set DM.UseSaveDM (default F)" in out
    assert f"note: SIESTA run from {run} would stop before its first SCF step: pseudopotentials " in out
    (run / "H.psf").write_text("")  # found: nothing to say (only their presence is checked here)
    (run / "O.vps").write_text("")  # SIESTA 4.1 reads a .vps before a .psf (pseudopotential.f)
    # --edit-fdf switches it on, but not when the DM goes elsewhere (SIESTA would then read a stale one)
    assert main(["predict", str(run), "--model", str(model_dir), "--edit-fdf", "-o", str(tmp_path / "x.DM")]) == 0
    assert not (run / "job.fdf.bak").exists() and "reads" in capsys.readouterr().out  # the note says where instead
    assert main(["predict", str(run), "--model", str(model_dir), "--edit-fdf"]) == 0
    out = capsys.readouterr().out
    assert "put 'DM.UseSaveDM T' on its first line" in out and "note:" not in out
    assert (run / "job.fdf").read_text().startswith("DM.UseSaveDM T") and (run / "job.fdf.bak").is_file()


def test_atoms_on_one_site_are_a_clear_error_not_a_dm(model_dir, tmp_path, capsys):
    """An atom listed twice (or coordinates in Bohr read as Å) would make S nearly singular: the shipped `water`
    model's DM of such a water molecule held 14423 electrons before its refinement. Refused, naming the atoms."""
    from ase import Atoms

    doubled = tmp_path / "doubled.xyz"
    atoms = water_molecule()
    (atoms + atoms[1:2]).write(doubled)  # the first H twice
    out = tmp_path / "doubled.DM"
    assert main(["predict", str(doubled), "--model", str(model_dir), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "doubled.xyz" in err and "atoms 2 (H) and 4 (H)" in err and "0.000 Å apart" in err
    assert not out.exists()
    # Through a periodic boundary: an H 0.2 Å from the O's image in the next cell.
    crossing = Atoms("OHH", positions=[[0, 0, 0], [0.96, 0, 0], [2.8, 0, 0]], cell=[3.0, 8.0, 8.0], pbc=True)
    from siesta_dmguess.structure import structure_from_atoms

    with pytest.raises(InputFileError, match=r"atoms 1 \(O\) and 3 \(H\) \(its image in cell \(-1, 0, 0\)\) are 0.200 Å"):
        predict_density_matrix(structure_from_atoms(crossing), model=model_dir)
    # 0.6 Å is short but not on one site: predicted.
    close = Atoms("OHH", positions=[[0, 0, 0], [0.6, 0, 0], [-0.3, 0.9, 0]])
    assert predict_density_matrix(structure_from_atoms(close), model=model_dir).values.size > 0


def test_coordinates_that_are_not_numbers_are_a_clear_error(model_dir, tmp_path, capsys):
    """A NaN or inf coordinate (a blown-up MD step, a failed unit conversion) passes every distance test and used to
    end as a bare LinAlgError inside the refinement. Refused, naming the file and the atom, also under --model auto
    (whose choice of model looks at the structure first) and for an in-memory cell."""
    from ase import Atoms
    from siesta_dmguess.structure import structure_from_atoms

    bad = tmp_path / "nan.xyz"
    bad.write_text("3\n\nO 0 0 0\nH 0 0 nan\nH 0 0.96 0\n")
    for model in (str(model_dir), "auto"):
        assert main(["predict", str(bad), "--model", model, "-o", str(tmp_path / "nan.DM")]) == 2
        err = capsys.readouterr().err
        assert "nan.xyz" in err and "atom 2 (H) has coordinates that are not finite" in err and "Traceback" not in err
    assert not (tmp_path / "nan.DM").exists()
    box = Atoms("OHH", positions=[[0, 0, 0], [0.96, 0, 0], [0, 0.96, 0]], cell=[[8, 0, 0], [0, 8, 0], [0, 0, np.inf]],
                pbc=True)
    with pytest.raises(InputFileError, match="lattice vectors that are not finite"):
        predict_density_matrix(structure_from_atoms(box), model=model_dir)


@pytest.mark.parametrize("edit, problem", [
    (lambda t: t.replace("%endblock AtomicCoordinatesAndAtomicSpecies\n", ""),  # sisl read on forever
     r"%block AtomicCoordinatesAndAtomicSpecies \(line 15\) has no %endblock"),
    (lambda t: t.replace("4.760 5.927 5.000 1", "4.760 5.927 5.000 3"),
     "row 3 of AtomicCoordinatesAndAtomicSpecies has species index 3, but ChemicalSpeciesLabel defines species 1 to 2"),
    (lambda t: t.replace("4.760 5.927 5.000 1", "4.760 5.927 1"),
     "row 3 of AtomicCoordinatesAndAtomicSpecies has 3 columns"),
    (lambda t: t.replace("0.0 0.0 10.0\n", ""), "LatticeVectors needs 3 rows of 3 numbers; it has 2 rows"),
    (lambda t: t.replace("%block AtomicCoordinatesAndAtomicSpecies", "%block Zmatrix\nmolecule cartesian")
     .replace("%endblock AtomicCoordinatesAndAtomicSpecies", "%endblock Zmatrix"),
     "its atoms are given as a Zmatrix block, which sisl does not read"),
])
def test_a_malformed_fdf_block_is_named(model_dir, tmp_path, edit, problem):
    """sisl's own errors for these were "list index out of range", and an unclosed block hung it."""
    fdf = tmp_path / "input.fdf"
    fdf.write_text(edit(WATER_FDF))
    with pytest.raises(InputFileError, match=problem) as info:
        predict_density_matrix(fdf, model_dir)
    assert "input.fdf" in str(info.value)


def test_an_fdf_that_is_not_text_is_named_also_where_only_its_label_is_read(model_dir, tmp_path, capsys):
    """A binary file named .fdf (or a comment in Latin-1) was a bare UnicodeDecodeError; `predict` reads the fdf's
    SystemLabel first, for the output's name, so that read must say it too. An %include'd file is named itself."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "input.fdf").write_bytes(WATER_FDF.encode() + "# 2 Å apart\n".encode("latin-1"))
    assert main(["predict", str(run), "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert "input.fdf: is not a text fdf: byte 0xc5" in err and "Traceback" not in err
    (run / "geometry.fdf").write_bytes(b"\x00\x01\x02")
    (run / "input.fdf").write_text(WATER_FDF + "%include geometry.fdf\n")
    with pytest.raises(InputFileError, match="geometry.fdf: is not a text fdf"):
        predict_density_matrix(run / "input.fdf", model_dir)


def test_an_atomic_number_that_is_not_the_model_species_is_refused(model_dir, tmp_path):
    """Labels name the basis files; the atomic number decides the atom. A label the model knows with another
    atomic number, or a ghost atom (negative: orbitals without nucleus or electrons), is another atom: refused,
    named, not predicted as the label's element."""
    fdf = tmp_path / "input.fdf"
    fdf.write_text(WATER_FDF.replace("1 1 H\n", "1 9 H\n"))
    with pytest.raises(ModelCompatibilityError, match="species 'H' has atomic number 9 in the structure, but the "
                                                      "model's 'H' has 1"):
        predict_density_matrix(fdf, model_dir)
    fdf.write_text(WATER_FDF.replace("1 1 H\n", "1 -1 H\n"))
    with pytest.raises(ModelCompatibilityError, match=r"species \['H'\] are ghost atoms"):
        predict_density_matrix(fdf, model_dir)


@pytest.mark.parametrize("name, model, fold, problem", [
    ("water8", "water", False, "runs at Γ only, where SIESTA folds"),
    ("si8", "silicon", True, "runs k-points, where SIESTA keeps the DM's periodic images"),
    ("h2o", "water", False, None),  # a molecule in its box: no image in the DM, nothing to fold
    ("water8", "water", True, None),  # what auto does
])
def test_a_fold_that_does_not_fit_the_runs_sampling_is_refused_unless_forced(shipped, name, model, fold, problem):
    """SIESTA reads a folded DM into a k-point run, or an unfolded one into a Γ-only run ("Succeeded"), and starts
    worse than from the right one: si8/0004 folded 9 SCF iterations (7 as predicted), water8/0004 unfolded 13 (9;
    atomic guess 12)."""
    fdf = dataset(name) / "0004" / "input.fdf"
    if problem is None:
        assert predict_density_matrix(fdf, shipped(model), fold=fold).warnings == []
        return
    with pytest.raises(InputFileError, match=f"input.fdf: the fdf {problem}.*leave --fold at auto"):
        predict_density_matrix(fdf, shipped(model), fold=fold)
    pred = predict_density_matrix(fdf, shipped(model), fold=fold, force=True)
    assert pred.folded is fold and any(problem in w for w in pred.warnings)


def test_a_fold_against_the_runs_sampling_leaves_its_folder_as_it_was(tmp_path):
    """The --fold refusal is an error before any prediction: the run's converged DM stays, and no backup is made
    (the README had said that it was moved to .bak, as for refused predictions)."""
    src = dataset("water8") / "0004"
    for f in ("input.fdf", "siesta.DM"):
        shutil.copy(src / f, tmp_path / f)
    for f in (src.parent / "basis").glob("*"):
        shutil.copy(f, tmp_path / f.name)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["predict", str(tmp_path), "--model", "water", "--fold", "no", "--threads", "1"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "siesta.DM").read_bytes() == (src / "siesta.DM").read_bytes()


def test_a_refused_prediction_of_ase_atoms_is_the_refusal_not_a_type_error(tmp_path, shipped):
    """Atoms have no file to name: the refusal named ``Path(atoms)`` and ended in a TypeError."""
    from ase import Atoms

    from siesta_dmguess.errors import UnreliablePredictionError
    from siesta_dmguess.predict import predict_to_file

    broken = Atoms("OH2", positions=[[0, 0, 0], [2.4, 0, 0], [-0.24, 0.93, 0]])  # an O-H bond pulled to 2.4 Å
    with pytest.raises(UnreliablePredictionError, match="no clear occupied space") as err:
        predict_to_file(broken, tmp_path / "x.DM", model=shipped("water"))
    assert err.value.path is None and not (tmp_path / "x.DM").exists()


def test_auto_loads_the_chosen_shipped_model_once_per_process(monkeypatch):
    """``model="auto"`` chose through the cached shipped models, then loaded the chosen one from disk again, on
    every call."""
    import siesta_dmguess.predict as predict

    loads = []
    real = predict.load_model
    monkeypatch.setattr(predict, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    for _ in range(2):
        predict.predict_density_matrix(dataset("h2o") / "0004" / "input.fdf")
    assert len(loads) <= 1  # none where an earlier test of this process loaded it


def test_a_net_charge_that_is_no_number_is_an_error_naming_the_fdf(tmp_path, shipped):
    """`NetCharge one` was read as a neutral run, without a word: the DM's electron count would be a guess."""
    fdf = tmp_path / "water.fdf"
    for value, electrons in (("1.0", 7.0), ("-1.d0", 9.0), ("1 e", 7.0), ("1\t! comment", 7.0)):
        fdf.write_text(f"NetCharge {value}\n" + WATER_FDF)
        pred = predict_density_matrix(fdf, shipped("water"), refine="charge")
        written = float(np.dot(pred.values, pred.overlap))  # Tr(D S) of the DM written: a molecule, no images
        assert pred.electrons_expected == pytest.approx(electrons) and written == pytest.approx(electrons, abs=1e-6), value
    for value in ("one", "nan"):
        fdf.write_text(f"NetCharge {value}\n" + WATER_FDF)
        with pytest.raises(InputFileError, match=rf"water.fdf: NetCharge '{value}' is not a number"):
            predict_density_matrix(fdf, shipped("water"))


@pytest.mark.parametrize("where", ["beside", "Pseudo.Directory"])
def test_a_pseudopotential_other_than_the_models_is_refused(tmp_path, shipped, where):
    """The card's pseudopotential checksums guard the run's .psf where SIESTA reads it (beside the fdf, or in
    Pseudo.Directory); no test exercised the check, which looked beside the fdf only."""
    import shutil

    fdf = tmp_path / "water.fdf"
    folder = tmp_path if where == "beside" else tmp_path / "pseudos"
    folder.mkdir(exist_ok=True)
    fdf.write_text(WATER_FDF if where == "beside" else "Pseudo.Directory pseudos\n" + WATER_FDF)
    for label in ("O", "H"):
        shutil.copy(dataset("h2o") / "basis" / f"{label}.psf", folder / f"{label}.psf")
    assert predict_density_matrix(fdf, shipped("water")).warnings == []  # the model's own pseudopotentials
    (folder / "O.psf").write_text((folder / "O.psf").read_text().replace("\n", "\n ", 1))  # another file
    with pytest.raises(ModelCompatibilityError, match="water.fdf: pseudopotential O.psf differs from the one the "
                                                      "model was trained with"):
        predict_density_matrix(fdf, shipped("water"))


def test_a_card_written_before_bare_number_options_holds_their_ev_value():
    """Cards written before PAO.SoftPotential & co. were read as SIESTA's bare number hold sisl's eV for "40 Ry":
    such a model still takes the runs it was trained on."""
    from siesta_dmguess.guard import setting_problems

    old_card = {"basis_options": {"PAO.SoftPotential": "544.2277249197482"}}
    assert setting_problems({"basis_options": {"PAO.SoftPotential": "40"}}, old_card) == []
    assert setting_problems({"basis_options": {"PAO.SoftPotential": "30"}}, old_card)


def test_a_run_basis_of_another_orbital_count_is_refused_even_with_force(model_dir, tmp_path, monkeypatch):
    """--force wrote a DM of the model's 23 orbitals for a run whose basis has fewer: SIESTA cannot read it."""
    import siesta_dmguess.guard as guard
    from siesta_dmguess.basis import Shell, SpeciesBasis

    (tmp_path / "input.fdf").write_text(WATER_FDF)
    (tmp_path / "O.ion.xml").write_text("<ion></ion>")  # found by name; its reading is replaced below
    single_zeta = SpeciesBasis("O", 8, (Shell(2, 0, 1, False, 1.0, 3.0), Shell(2, 1, 1, False, 1.0, 3.0)))
    monkeypatch.setattr(guard, "read_species_basis", lambda path: single_zeta)
    for force in (False, True):
        with pytest.raises(ModelCompatibilityError, match=r"input.fdf: basis of 'O' in O.ion.xml has 4 orbitals, "
                                                          r"the model's 'O' 13 .*even with --force"):
            predict_density_matrix(tmp_path / "input.fdf", model_dir, force=force)


@pytest.mark.parametrize("edit", ["radial shape", "cutoff"])
def test_a_basis_that_differs_in_one_orbital_alone_is_refused(tmp_path, edit):
    """The basis hash holds every orbital's radius and radial shape: an O basis whose first orbital alone has
    another shape (values 2 % larger, same cutoff) or a cutoff 0.01 Bohr longer is another basis. (Earlier tests
    changed several things at once, so a hash that dropped either part passed them.)"""
    import re

    from siesta_dmguess.basis import read_species_basis
    from siesta_dmguess.data import check_basis_matches

    original = dataset("h2o") / "basis" / "O.ion.xml"
    text = original.read_text()
    if edit == "cutoff":
        changed = text.replace("<cutoff>      3.30509334105 </cutoff>", "<cutoff>      3.31509334105 </cutoff>", 1)
    else:
        start, end = text.index("<data>"), text.index("</data>")
        rows = re.sub(r"(?m)^(\s*\S+\s+)(\S+)", lambda m: f"{m[1]}{1.02 * float(m[2]):.11f}", text[start + 6:end])
        changed = text[:start + 6] + rows + text[end:]
    assert changed != text
    (tmp_path / "O.ion.xml").write_text(changed)
    ours, theirs = read_species_basis(tmp_path / "O.ion.xml"), read_species_basis(original)
    assert [s.l for s in ours.shells] == [s.l for s in theirs.shells]  # the same shells: only the edit differs
    assert ours.hash != theirs.hash
    with pytest.raises(ModelCompatibilityError, match="basis of 'O' differs from the model's"):
        check_basis_matches({"O": ours}, {"O": theirs}, tmp_path / "run")


def test_a_folder_where_siesta_reads_the_dm_is_an_error_not_a_place_to_write(tmp_path, capsys):
    """A folder named siesta.DM beside the fdf: the DM went inside it (siesta.DM/siesta.DM), with a note and exit
    code 0, where SIESTA never looks."""
    src = dataset("h2o") / "0004"
    shutil.copy(src / "input.fdf", tmp_path / "input.fdf")
    for f in (src.parent / "basis").glob("*.ion.xml"):
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "siesta.DM").mkdir()
    assert main(["predict", str(tmp_path), "--model", "water", "--threads", "1"]) == 2
    assert "siesta.DM: a folder is in the way" in capsys.readouterr().err
    assert not list((tmp_path / "siesta.DM").iterdir())
    (tmp_path / "out" / "siesta.DM").mkdir(parents=True)  # the same into an -o folder
    assert main(["predict", str(tmp_path), "--model", "water", "--threads", "1", "-o", str(tmp_path / "out")]) == 2
    assert "out/siesta.DM: a folder is in the way" in capsys.readouterr().err
    assert not list((tmp_path / "out" / "siesta.DM").iterdir())


def test_a_structure_files_dm_written_where_a_run_reads_it_is_of_that_run(tmp_path, caplog):
    """`predict box.POSCAR -o RUN/siesta.DM`: a POSCAR groups the atoms by element, the run's fdf does not, and
    SIESTA read the DM of atoms in another order without a word (21 SCF iterations on a water8 box; its atomic
    guess 12, the DM in the fdf's order 9). The file's DM is now refused there; in the fdf's order it is predicted
    with the run's settings and, for a file without a cell (an .xyz of a periodic box), the fdf's cell: the DM
    predicted from the fdf itself."""
    import ase.io

    from siesta_dmguess.predict import predict_for_run
    from siesta_dmguess.structure import read_structure

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(dataset("water8") / "0004" / "input.fdf", run / "input.fdf")
    atoms = read_structure(run / "input.fdf").atoms
    by_element = sorted(range(len(atoms)), key=lambda i: atoms.numbers[i])
    ase.io.write(tmp_path / "sorted.extxyz", atoms[by_element])
    with pytest.raises(InputFileError, match=r"sorted.extxyz: the run .*input.fdf reads the DM written here, and this "
                                             r"file holds other atoms than its fdf, or the same in another order"):
        predict_for_run(tmp_path / "sorted.extxyz", run / "siesta.DM", model="water")
    assert not (run / "siesta.DM").exists()
    predict_for_run(tmp_path / "sorted.extxyz", tmp_path / "elsewhere.DM", model="water")  # no run reads it there
    ase.io.write(tmp_path / "box.xyz", atoms, format="xyz")  # no cell
    done = predict_for_run(tmp_path / "box.xyz", run / "siesta.DM", model="water")
    assert done.fdf == run / "input.fdf"
    own = predict_for_run(run / "input.fdf", tmp_path / "own.DM", model="water")
    assert np.array_equal(done.prediction.values, own.prediction.values)
    moved = atoms.copy()
    moved.positions[0] += [0.3, 0, 0]
    ase.io.write(tmp_path / "moved.extxyz", moved)
    with caplog.at_level("WARNING"):
        predict_for_run(tmp_path / "moved.extxyz", run / "siesta.DM", model="water", overwrite=True)
    assert "its atoms stand up to 0.30 Å from those of" in caplog.text


def test_a_structure_file_with_magnetic_moments_is_refused_as_a_spin_polarized_fdf_is(tmp_path):
    """An extxyz (or .traj, .json) that gives its atoms initial magnetic moments is meant for a spin-polarized run;
    its DM was written without a word and started SIESTA in the non-magnetic state (CH2: the singlet, 0.33 eV
    above the triplet SIESTA reached from its atomic guess). Without moments it is predicted as before."""
    import ase.io

    atoms = water_molecule()
    ase.io.write(tmp_path / "plain.extxyz", atoms)
    atoms.set_initial_magnetic_moments([1.0, 0.0, 0.0])
    ase.io.write(tmp_path / "magnetic.extxyz", atoms)
    with pytest.raises(ModelCompatibilityError, match=r"magnetic.extxyz: the structure file gives its atoms magnetic "
                                                      r"moments \(largest 1\), for a spin-polarized run"):
        predict_to_file(tmp_path / "magnetic.extxyz", tmp_path / "magnetic.DM", model="water")
    assert not (tmp_path / "magnetic.DM").exists()
    predict_to_file(tmp_path / "plain.extxyz", tmp_path / "plain.DM", model="water")
