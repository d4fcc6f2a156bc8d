"""Every shipped model: loads, matches its card's sha256, predicts a symmetric DM, and refuses what it does not cover."""

import json
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms

from siesta_dmguess.basis import Shell, SpeciesBasis
from siesta_dmguess.card import CARD, list_shipped_models, load_model, resolve_model, sha256_file
from siesta_dmguess.cli import main
from siesta_dmguess.errors import ModelCompatibilityError
from siesta_dmguess.guard import check_compatibility
from siesta_dmguess.predict import predict_density_matrix
from siesta_dmguess.structure import structure_from_atoms

SHIPPED = list_shipped_models()


def test_models_are_shipped():
    assert {"water", "chno-molecules", "silicon"} <= set(SHIPPED)


def example(species, cell=10.0):
    """A small cluster of the model's species, 1 Å apart along a zig-zag."""
    pos = [[1.1 * k, 0.3 * (k % 2), 0.2 * (k % 3)] for k in range(len(species))]
    atoms = Atoms(species, positions=np.array(pos) + 3.0, cell=[cell] * 3, pbc=True)
    return structure_from_atoms(atoms)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_loads_and_predicts(name):
    folder = resolve_model(name)
    card = json.loads((folder / CARD).read_text())
    assert sha256_file(folder / "weights.pt") == card["weights_sha256"]
    assert (folder / "weights.pt").stat().st_size < 8 * 2**20
    loaded = load_model(name)
    assert card["validation"]["mae"] < card["validation"]["atomic_mae"]
    pred = predict_density_matrix(example(loaded.config.species), loaded)
    dense = pred.density_matrix.tocsr(0).toarray()
    assert dense.shape[0] == sum(loaded.basis[s].norb for s in loaded.config.species)
    assert np.abs(dense - dense.T).max() < 1e-6
    # A projected DM reports the gap it was projected across (a pure state has 1; the guard needs >= 0.5).
    assert pred.refinement != "idempotent" or 0.5 <= pred.occupation_gap <= 1.0 + 1e-9
    # Each stage started from, and replaced, another model's weights: never its own (a card once said so).
    stage = card["training"]
    while isinstance(stage, dict):
        started_from = {stage.get("init_model_sha256"), (stage.get("replaces") or {}).get("weights_sha256")}
        assert card["weights_sha256"] not in started_from, name
        stage = stage.get("init_model_training")


def test_warm_up_leaves_the_first_prediction_only_its_own_work():
    """bench and the calculator warm a model up once, so that the first structure's prediction time holds no
    start-up: every species pair's overlap table is made, and a prediction adds none."""
    import sys

    loaded = load_model("chno-molecules")
    assert loaded.overlap is not None and not loaded.overlap._tables
    assert loaded.warm_up() > 0 and "sisl" in sys.modules
    pairs = {(a, b) for a in loaded.basis for b in loaded.basis}
    assert set(loaded.overlap._tables) == pairs
    tables = dict(loaded.overlap._tables)
    predict_density_matrix(example(loaded.config.species), loaded)
    assert loaded.overlap._tables == tables  # the same objects: nothing was tabulated again


@pytest.mark.parametrize("name", SHIPPED)
def test_guard_rejects_foreign_species_and_other_basis(name, tmp_path):
    loaded = load_model(name)
    with pytest.raises(ModelCompatibilityError, match="'Xe'"):
        check_compatibility(example(["Xe"]), loaded)
    # A run folder whose .ion.xml holds another basis for the model's species.
    label = loaded.config.species[0]
    other = SpeciesBasis(label, loaded.basis[label].Z, (Shell(1, 0, 1, False, 1.0, 3.0),))
    assert other.hash != loaded.basis[label].hash
    with pytest.raises(ModelCompatibilityError, match=f"basis of '{label}'"):
        from siesta_dmguess.data import check_basis_matches

        check_basis_matches({label: other}, loaded.basis, tmp_path)


def test_models_cli_lists_and_shows(capsys):
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    for name in SHIPPED:
        assert name in listing
    # A model validated on several datasets lists each one's MAE from its card, not only their mean.
    per = load_model("water", verify=False).card["validation_per_dataset"]
    for dataset in ("h2o", "water8"):
        assert f"{dataset} {per[dataset]['mae']:.2e}" in listing
    # ... and the SCF iterations its card measured, per held-out set
    bench = load_model("water", verify=False).card["scf_benchmark"]["water8"]
    assert f"water8 {bench['scf_iterations_atomic']} -> {bench['scf_iterations_ml']}" in listing
    # ... and the settings the guard compares (the energy shift, which it checks, was missing; the mesh, which it
    # does not, was listed among them)
    from siesta_dmguess.guard import setting_problems

    line = next(row for row in listing.splitlines() if row.startswith("water:"))
    must, _, free = line.partition("; trained at ")
    assert "PAO.EnergyShift 0.02 Ry" in must and "MeshCutoff" not in must and "MeshCutoff 200 Ry (not checked)" in free
    card = load_model("water", verify=False).card
    assert setting_problems({"PAO.EnergyShift": "0.01 Ry"}, card) and not setting_problems({"MeshCutoff": "80 Ry"},
                                                                                           card)
    assert main(["models", "show", "water"]) == 0
    card = capsys.readouterr().out
    assert "Model card" in card
    assert main(["models", "water"]) == 0  # a name alone shows that card
    assert capsys.readouterr().out == card


def test_models_cli_errors_name_the_problem(capsys):
    assert main(["models", "show"]) == 2
    err = capsys.readouterr().err
    assert "models show needs a model name" in err and all(name in err for name in SHIPPED)
    assert main(["models", "water", "silicon"]) == 2
    assert "'list' or 'show NAME'" in capsys.readouterr().err
    assert main(["models", "nosuch"]) == 2
    assert "no model folder or shipped model named 'nosuch' (shipped: chno-molecules, silicon, water)" in \
        capsys.readouterr().err  # listed as words, not as a Python list
    assert main(["predict", "x.xyz", "--model", ""]) == 2  # an empty name was "." that is no model folder
    assert "siesta-dmguess: error: no model folder or shipped model named ''" in capsys.readouterr().err
    assert main(["models", "list", "water"]) == 2  # the name used to be ignored
    assert "models list takes no name; to print the card of water: models show water" in capsys.readouterr().err


def test_models_show_prints_a_folders_card_without_its_markdown(tmp_path, capsys):
    """card.md is made from card.json: a folder without it was a FileNotFoundError, one with a broken card.json
    printed the stale Markdown."""
    import shutil

    from siesta_dmguess.card import resolve_model

    shutil.copytree(resolve_model("water"), tmp_path / "m")
    shown = (tmp_path / "m" / "card.md").read_text()
    (tmp_path / "m" / "card.md").unlink()
    assert main(["models", "show", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out.strip() == shown.strip()
    (tmp_path / "m" / "card.json").write_text("{")
    assert main(["models", "show", str(tmp_path / "m")]) == 2
    assert "card.json: model card is not valid JSON" in capsys.readouterr().err


def test_a_folder_that_is_no_model_is_named_as_such(tmp_path, capsys):
    (tmp_path / "weights.pt").write_text("")  # a folder with weights alone, say, but no config.json
    assert main(["predict", "x.xyz", "--model", str(tmp_path)]) == 2
    assert f"{tmp_path}: a folder without config.json, so not a model folder" in capsys.readouterr().err


def test_cli_output_piped_into_head_stops_without_a_traceback():
    """`siesta-dmguess models show water | head`: the reader closes the pipe early. Output longer than a pipe's
    buffer (here the listing, repeated) makes the write fail for real."""
    import subprocess
    import sys

    script = ("import siesta_dmguess.cli as cli\n"
              "listing = cli._cmd_models\n"
              "cli._cmd_models = lambda args: [listing(args) for _ in range(2000)][-1]\n"
              "raise SystemExit(cli.main(['models']))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # as `head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_every_model_folder_is_packaged():
    """A folder under models/ that pyproject.toml does not list would silently not install with `pip install .`."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
    root = Path(__file__).resolve().parents[1]
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {p.name for p in (root / "models").iterdir() if (p / "card.json").is_file()}
    listed = {name.rsplit(".", 1)[1] for name in setup["packages"] if name.startswith("siesta_dmguess.models.")}
    assert folders == listed
    for name in folders:
        assert {"*.json", "*.pt"} <= set(setup["package-data"][f"siesta_dmguess.models.{name}"])


NEEDS_SILICON = pytest.mark.skipif("silicon" not in SHIPPED, reason="the shipped 'silicon' model is not installed")


def _perfect_diamond_prediction():
    """The shipped silicon's raw prediction for a perfect cubic diamond cell (a = 5.43 Å): sample, flat DM, orbitals
    per atom. ASE lists the cell's two sublattices alternately, the atom at the origin first."""
    from ase.build import bulk

    from siesta_dmguess.data import prepare_sample
    from siesta_dmguess.evaluate import predict_flat
    from siesta_dmguess.structure import Structure

    loaded = load_model("silicon")
    label = loaded.config.species[0]
    crystal = bulk("Si", "diamond", a=5.43, cubic=True)
    sample = prepare_sample(Structure(crystal, [label] * len(crystal)), loaded.basis, loaded.config.species,
                            loaded.config.message_cutoff, None, fold=False)
    return sample, predict_flat(loaded.model, [sample])[0], loaded.basis[label].norb


@NEEDS_SILICON
def test_shipped_silicon_sees_the_octupole_of_a_diamond_site():
    """In perfect diamond every site is Td, and the only on-site p–d elements allowed are p_x–d_yz and its two
    cyclic partners, carried by the neighbours' l = 3 octupole. SIESTA's converged DMs give 0.022 there
    (``integration/benchmarks/tetrahedral_coupling.py``, docs/studies.md); a model whose message passing stops
    at l = 2 predicts exactly 0, as the one shipped before 2026-12-02 did."""
    from siesta_dmguess.evaluate import own_image_blocks

    sample, flat, n_orb = _perfect_diamond_prediction()
    blocks = own_image_blocks(sample, flat, n_orb)
    # SIESTA's DZP order: s, s, p(y z x), p(y z x), d(xy yz z2 xz x2-y2); first p shell against the d shell
    coupling = np.abs([blocks[:, 4, 9], blocks[:, 2, 11], blocks[:, 3, 8]])
    assert np.allclose(coupling, 0.022, atol=3e-3), coupling


@NEEDS_SILICON
def test_shipped_silicon_sees_the_octupole_across_a_cube_edge():
    """The same octupole carries a pair element: p_z (second shell) of an atom with d_xy of its own image one cube
    edge away along z, and its cyclic partners. SIESTA's converged DM of perfect diamond (a = 5.43 Å, the si8
    settings) gives -6.28e-3 on the sublattice of the atom at the origin and +6.28e-3 on the other. A pair readout
    whose features stop at l = 2 predicts exactly 0 there, as the silicon shipped before 2026-12-02 did
    (``integration/benchmarks/tetrahedral_coupling.py``, docs/studies.md)."""
    from siesta_dmguess.evaluate import own_image_blocks

    sample, flat, n_orb = _perfect_diamond_prediction()
    # (p_x, d_yz) with the image along x, and cyclic; second p shell (SIESTA's DZP order as above)
    coupling = np.array([own_image_blocks(sample, flat, n_orb, shift)[:, i, j]
                         for (i, j), shift in [((7, 9), (1, 0, 0)), ((5, 11), (0, 1, 0)), ((6, 8), (0, 0, 1))]])
    sublattice = np.where(np.arange(coupling.shape[1]) % 2 == 0, 1.0, -1.0)  # +1: the origin's
    assert np.allclose(coupling * sublattice, -6.28e-3, atol=1e-3), coupling


def test_model_cards_carry_the_scf_iterations_of_the_committed_benchmark_tables():
    """Each card's SCF benchmarks (held-out, unseen sets, trajectories) equal the tables in docs/results that the
    README shows (``integration/benchmarks/card_benchmarks.py`` writes them; it prints what differs)."""
    from .conftest import ROOT as root, benchmark_script

    module = benchmark_script("card_benchmarks")
    found = module.differences(root / "docs" / "results", root / "models")
    assert set(found) == {"water", "chno-molecules", "silicon"}
    assert not any(found.values()), found
    # --write's default is this checkout's cards, even where a non-editable install imports its own copy
    assert module.default_models_dir() == root / "models"


def siesta_mulliken_charges(run):
    """Mulliken net charges of SIESTA's own converged DM with SIESTA's own S (.HSX), through sisl only: an
    independent reference for the package's S from the basis, its folding and image pairing, and atom order."""
    import warnings

    import sisl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        geometry = sisl.get_sile(str(run / "input.fdf")).read_geometry()
        dm = sisl.get_sile(str(run / "siesta.DM")).read_density_matrix(geometry=geometry)
        overlap = sisl.get_sile(str(run / "siesta.HSX")).read_overlap(geometry=dm.geometry)
    populations = np.asarray(dm.tocsr(0).multiply(overlap.tocsr()).sum(axis=1)).ravel()
    valence = {"H": 1, "C": 4, "N": 5, "O": 6, "Si": 4}
    g = dm.geometry
    return np.array([valence[g.atoms[ia].symbol] - populations[g.a2o(ia, all=True)].sum() for ia in range(g.na)])


@pytest.mark.parametrize("run, model, tolerance", [("h2o/0004", "water", 1e-4), ("g2/0009", "chno-molecules", 0.05),
                                                   ("si8/0004", "silicon", 0.015)])
def test_mulliken_charges_of_a_prediction_are_siestas(run, model, tolerance):
    """Held-out runs: a molecule, a CHNO molecule of four species, a k-point silicon cell (images kept)."""
    from .conftest import dataset

    folder = dataset(run.split("/")[0]) / run.split("/")[1]
    reference = siesta_mulliken_charges(folder)
    charges = predict_density_matrix(folder / "input.fdf", model=model).mulliken_charges()
    assert np.abs(charges - reference).max() < tolerance
    assert charges.sum() == pytest.approx(0.0, abs=1e-8)  # neutral: the refined DM holds every valence electron


def test_predict_prints_mulliken_charges(tmp_path, capsys):
    from .conftest import dataset

    folder = dataset("h2o") / "0004"
    assert main(["predict", str(folder / "input.fdf"), "--model", "water", "-o", str(tmp_path / "w.DM"),
                 "--charges"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[lines.index(next(x for x in lines if x.startswith("Mulliken"))) + 1:]]
    printed = np.array([float(r[2]) for r in rows if r[0].isdigit()])
    assert [(r[0], r[1]) for r in rows if r[0].isdigit()] == [("1", "O"), ("2", "H"), ("3", "H")]  # as SIESTA counts
    assert np.allclose(printed, siesta_mulliken_charges(folder), atol=2e-4)  # printed to 4 decimals


def boxed_molecule(name, box=12.0):
    """ASE's G2 geometry of ``name``, centred in the datasets' 12 Å box."""
    from ase.build import molecule

    atoms = molecule(name)
    atoms.set_cell([box] * 3)
    atoms.center()
    atoms.pbc = True
    return structure_from_atoms(atoms)


def test_auto_model_is_the_most_specialized_shipped_model_that_covers_the_species():
    """``--model auto``: water goes to `water` (which `chno-molecules` covers too), other CHNO molecules to
    `chno-molecules`, silicon to `silicon`; a species label stands for its element (``Ow``); a species no shipped
    model covers is an error that lists what is shipped."""
    from dataclasses import replace

    from siesta_dmguess.predict import choose_model

    assert choose_model(boxed_molecule("H2O")) == "water"
    assert choose_model(example(["C", "O", "H", "H", "H", "H"])) == "chno-molecules"
    assert choose_model(example(["N", "H", "H", "H"])) == "chno-molecules"
    assert choose_model(example(["Si", "Si"])) == "silicon"
    water = boxed_molecule("H2O")
    assert choose_model(replace(water, labels=["Ow", "Hw", "Hw"])) == "water"
    with pytest.raises(ModelCompatibilityError, match=r"no shipped model covers species \['Si', 'O'\]|"
                                                      r"no shipped model covers species \['O', 'Si'\]") as err:
        choose_model(example(["Si", "O", "O"]))
    assert "silicon ['Si']" in str(err.value) and "water ['H', 'O']" in str(err.value)


@pytest.mark.parametrize("name", ["H2O2", "O3"])
def test_auto_model_passes_over_a_covering_model_that_never_saw_the_molecule(name):
    """H2O2 and O3 hold only H and O, which `water` covers, but `water` learned water alone: the structure lies
    far outside its training data (novelty above its flag level) and inside `chno-molecules`', so ``auto`` takes
    `chno-molecules`. Water itself stays with the more specialized `water`."""
    from siesta_dmguess.guard import shipped_models_covering
    from siesta_dmguess.predict import _shipped_model, choose_model, structure_novelty

    structure = boxed_molecule(name)
    assert shipped_models_covering(structure)[0] == "water"
    novelty, flag = structure_novelty(structure, _shipped_model("water"))
    assert novelty > flag
    novelty, flag = structure_novelty(structure, _shipped_model("chno-molecules"))
    assert novelty <= flag
    assert choose_model(structure) == "chno-molecules"


def test_auto_model_keeps_the_specialized_model_where_the_other_is_not_much_more_familiar():
    """A water molecule with one O-H bond stretched to 1.8 Å is outside `water`'s training data and a little less
    novel to `chno-molecules` (less than CHOICE_NOVELTY_FACTOR times): ``auto`` keeps `water`, whose guesses took
    as many SIESTA iterations or fewer on such molecules (`h2o-stretched`)."""
    from siesta_dmguess.predict import CHOICE_NOVELTY_FACTOR, _shipped_model, choose_model, structure_novelty

    atoms = boxed_molecule("H2O").atoms.copy()
    bond = atoms.positions[1] - atoms.positions[0]
    atoms.positions[1] = atoms.positions[0] + 1.8 * bond / np.linalg.norm(bond)
    structure = structure_from_atoms(atoms)
    relative = {name: np.divide(*structure_novelty(structure, _shipped_model(name)))
                for name in ("water", "chno-molecules")}
    assert relative["water"] > 1.0 and relative["chno-molecules"] < relative["water"]
    assert relative["chno-molecules"] * CHOICE_NOVELTY_FACTOR > relative["water"]
    assert choose_model(structure) == "water"


def test_auto_model_takes_the_next_covering_model_where_the_first_one_s_guess_would_be_refused(caplog):
    """An H2O2 rattled 0.08 Å (`g2-stress` 0020 of `integration/benchmarks/unseen_structures.py`) is about as novel
    to `water` as to `chno-molecules` (2.9x and 3.2x their flag levels), so novelty keeps `water`; but `water`'s DM
    has no clear occupied space there (refused: SIESTA from its atomic guess, 11 iterations) and
    `chno-molecules`' has one (8). ``auto`` takes the first covering model whose guess would be used. Its trial
    predictions are silent (the chosen model's own prediction warns afterwards), in this thread only."""
    import logging
    import threading

    from ase import Atoms

    from siesta_dmguess.predict import (CHOICE_NOVELTY_FACTOR, _shipped_model, choose_model, predict_density_matrix,
                                        structure_novelty)

    atoms = Atoms("OOHH", positions=[[6.3582994225, 5.2669022050, 6.3674988126],
                                     [5.8990903843, 6.4529638378, 5.4707641018],
                                     [5.6417005775, 4.8943482136, 6.5292358982],
                                     [6.1111648511, 7.1056517864, 6.1411963080]], cell=[12.0] * 3, pbc=True)
    structure = structure_from_atoms(atoms)
    relative = {name: np.divide(*structure_novelty(structure, _shipped_model(name)))
                for name in ("water", "chno-molecules")}
    assert relative["water"] > 1.0 and relative["chno-molecules"] * CHOICE_NOVELTY_FACTOR > relative["water"]
    assert predict_density_matrix(structure, _shipped_model("water")).refusal_kind == "mixed"
    assert not predict_density_matrix(structure, _shipped_model("chno-molecules")).refusals
    assert "looks unlike the training data of water" in caplog.text  # the predictions above warn
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="siesta_dmguess.predict"):
        assert choose_model(structure) == "chno-molecules"
    [message] = [r.getMessage() for r in caplog.records]  # the choice's own line, none of the trials' warnings
    assert "model chno-molecules chosen over water" in message and "water's prediction would be refused" in message
    # Another thread's messages are kept while a trial runs in this one.
    import siesta_dmguess.predict as predict

    token = predict._in_trial.set(True)
    try:
        caplog.clear()
        thread = threading.Thread(target=predict.log.warning, args=("from another thread",))
        thread.start(), thread.join()
        predict.log.warning("from the trial")
    finally:
        predict._in_trial.reset(token)
    assert [r.getMessage() for r in caplog.records] == ["from another thread"]


def test_the_calculator_s_auto_model_is_chosen_for_its_atoms_and_its_start_up_timed():
    """The ASE calculator and a trajectory ``bench`` ready their model with ``ready_chosen_model``: for ``"auto"``
    the model chosen for the atoms (H2O2: `chno-molecules`, water: `water`), loaded and warmed once, and the
    seconds that took, choosing included; a named model is readied as named."""
    from siesta_dmguess.predict import ready_chosen_model

    peroxide, water = (boxed_molecule(name).atoms for name in ("H2O2", "H2O"))
    loaded, seconds = ready_chosen_model("auto", peroxide)
    assert loaded.path.name == "chno-molecules" and seconds > 0
    assert ready_chosen_model("auto", water)[0].path.name == "water"
    assert ready_chosen_model("water", peroxide)[0].path.name == "water"


def test_novelty_for_the_choice_is_the_prediction_s():
    """:func:`structure_novelty` (used to choose a model, no DM assembled) gives the score a prediction reports."""
    from siesta_dmguess.predict import _shipped_model, structure_novelty

    structure = boxed_molecule("H2O2")
    loaded = _shipped_model("water")
    novelty, flag = structure_novelty(structure, loaded)
    pred = predict_density_matrix(structure, loaded, force=True)
    assert novelty == pytest.approx(pred.novelty, rel=1e-6) and flag == pred.novelty_threshold


def test_species_error_names_the_shipped_models_that_cover_the_structure():
    with pytest.raises(ModelCompatibilityError, match="shipped models that cover all its species: water, "
                                                      "chno-molecules"):
        check_compatibility(example(["O", "H", "H"]), load_model("silicon"))
    with pytest.raises(ModelCompatibilityError) as err:  # nothing shipped covers Xe: no hint
        check_compatibility(example(["Xe"]), load_model("water"))
    assert "shipped models that cover" not in str(err.value)


def test_predict_without_model_picks_one_per_structure_and_loads_each_once(tmp_path, capsys, monkeypatch):
    """A batch of a water molecule, a CHNO molecule and silicon, predicted without --model: each DM comes from its
    own shipped model (the orbital count says which basis was used), each model loaded once."""
    from siesta_dmguess import card

    from .conftest import dataset

    runs = {"h2o": "water", "g2": "chno-molecules", "si8": "silicon"}
    fdfs = []
    for name in runs:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "input.fdf").write_text((dataset(name) / "0004" / "input.fdf").read_text())
        fdfs.append(str(folder / "input.fdf"))
    loads = []
    real_load = card.load_model
    monkeypatch.setattr(card, "load_model", lambda name, **kw: loads.append(name) or real_load(name, **kw))
    second = tmp_path / "h2o-second"  # another water run: its model is not loaded again
    second.mkdir()
    (second / "input.fdf").write_text((dataset("h2o") / "0009" / "input.fdf").read_text())
    assert main(["predict", *fdfs, str(second / "input.fdf")]) == 0
    out = capsys.readouterr().out
    for name, model in runs.items():
        assert f"{tmp_path / name / 'siesta.DM'}:" in out
        assert any(line.startswith(str(tmp_path / name / "siesta.DM")) and line.rstrip().split("with ")[1]
                   .startswith(f"{model};") for line in out.splitlines())
    assert sorted(loads) == sorted(runs.values())


def test_a_folder_named_as_a_shipped_model_or_without_a_card_is_said(tmp_path, monkeypatch, caplog):
    """A model folder `water` in the working directory took the place of the shipped `water` without a word, and
    a folder without its card loaded without its checks (weights' sha256, XC, pseudopotentials) being possible."""
    import shutil

    shutil.copytree(resolve_model("water"), tmp_path / "water")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING", logger="siesta_dmguess"):
        assert resolve_model("water") == Path("water")
    assert "model 'water': using the folder " + str(tmp_path / "water") + ", not the shipped model" in caplog.text
    caplog.clear()
    shutil.copytree(tmp_path / "water", tmp_path / "mine")
    with caplog.at_level("WARNING", logger="siesta_dmguess"):
        load_model("mine")
    assert caplog.text == ""  # another name, with its card: nothing to say
    import json

    from siesta_dmguess.card import FORMAT_VERSION
    from siesta_dmguess.errors import ModelCompatibilityError

    card = json.loads((tmp_path / "mine" / CARD).read_text())
    (tmp_path / "mine" / CARD).write_text(json.dumps({**card, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ModelCompatibilityError, match=f"model format {FORMAT_VERSION + 1} is newer than this package"):
        load_model("mine")
    del card["weights_sha256"]  # a card without the sha256 loaded its weights unchecked without a word
    (tmp_path / "mine" / CARD).write_text(json.dumps(card))
    with caplog.at_level("WARNING", logger="siesta_dmguess"):
        load_model("mine")
    assert "card.json records no weights_sha256, so weights.pt is loaded unchecked" in caplog.text
    caplog.clear()
    (tmp_path / "mine" / CARD).unlink()
    with caplog.at_level("WARNING", logger="siesta_dmguess"):
        load_model("mine")
    assert "mine: the model folder has no card.json, so its weights' sha256" in caplog.text
    assert "records no weights_sha256" not in caplog.text  # said once, as what it is
