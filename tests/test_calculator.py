"""The ASE calculator's guess logic (no SIESTA needed): ML DM written, or a fallback that says why."""

import contextlib
import warnings

import pytest
from ase import Atoms
from ase.calculators.siesta.parameters import Species

from siesta_dmguess import DMGuessSiesta
from siesta_dmguess.card import save_model
from siesta_dmguess.dm import read_dm_orbital_count
from siesta_dmguess.errors import InputFileError, ModelCompatibilityError
from siesta_dmguess.model import DensityMatrixModel

from .conftest import small_config, water_molecule


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("calc") / "tiny"
    save_model(DensityMatrixModel(small_config()), out, {"name": "tiny"})
    return out


def calc(model_dir, tmp_path, **kw):
    kw.setdefault("pseudo_qualifier", "")  # ASE then takes O.psf, not O.lda.psf
    return DMGuessSiesta(model=model_dir, label="siesta", directory=str(tmp_path), xc="CA", **kw)


def test_ml_guess_written_for_the_geometry(model_dir, tmp_path):
    c = calc(model_dir, tmp_path)
    c._write_guess(water_molecule())
    assert c._used == "ml" and c._prediction_s > 0
    assert read_dm_orbital_count(tmp_path / "siesta.DM") == 23


def test_loading_the_model_is_the_first_steps_start_up_not_its_prediction_time(model_dir, tmp_path, monkeypatch):
    import time

    from siesta_dmguess.card import LoadedModel

    warm_up = LoadedModel.warm_up
    monkeypatch.setattr(LoadedModel, "warm_up", lambda self: time.sleep(3.0) or 3.0 + warm_up(self))  # a slow one
    c = calc(model_dir, tmp_path)
    c._write_guess(water_molecule())
    assert c._startup_s >= 3.0 and 0 < c._prediction_s < 3.0
    c._write_guess(water_molecule())  # the model is loaded: no start-up at later steps
    assert c._startup_s == 0 and 0 < c._prediction_s < 3.0


def test_uncovered_species_is_an_error_by_default(model_dir, tmp_path):
    nh3 = Atoms("NH3", positions=[[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], cell=[10] * 3, pbc=True)
    with pytest.raises(ModelCompatibilityError, match="'N'"):
        calc(model_dir, tmp_path)._write_guess(nh3)


def test_fallback_to_atomic_guess_says_why(model_dir, tmp_path):
    nh3 = Atoms("NH3", positions=[[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], cell=[10] * 3, pbc=True)
    c = calc(model_dir, tmp_path, fallback="atomic")
    with pytest.warns(UserWarning, match="atomic guess because .*'N'") as caught:
        c._write_guess(nh3)
    assert [w.filename for w in caught] == [__file__]  # the caller's line (it pointed past it)
    assert c._used == "atomic" and "'N'" in c._reason
    assert not (tmp_path / "siesta.DM").exists()


def test_bad_options_are_rejected(model_dir, tmp_path):
    with pytest.raises(ValueError, match="guess"):
        calc(model_dir, tmp_path, guess="magic")
    with pytest.raises(ValueError, match="fallback"):
        calc(model_dir, tmp_path, fallback="ignore")


def test_novelty_above_limit_falls_back(model_dir, tmp_path):
    c = calc(model_dir, tmp_path, fallback="atomic", novelty_limit=1e-12)
    with pytest.warns(UserWarning, match="novelty"):
        c._write_guess(water_molecule())
    assert c._used == "atomic" and "novelty" in c._reason
    novelty = calc(model_dir, tmp_path)._predict(water_molecule()).novelty  # the limit is the novelty itself:
    c = calc(model_dir, tmp_path, fallback="atomic", novelty_limit=1.01 * novelty)  # just above it, ML
    with _no_warning():
        c._write_guess(water_molecule())
    assert c._used == "ml"
    c.set(novelty_limit=0.99 * novelty)  # just below it, the atomic guess
    with pytest.warns(UserWarning, match="novelty"):
        c._write_guess(water_molecule())
    assert c._used == "atomic"


def test_the_dm_siesta_converged_at_the_previous_step_is_kept_as_prev(model_dir, tmp_path):
    """Each ML step writes its guess over <label>.DM, SIESTA's DM of the step before: one copy of that is kept."""
    c = calc(model_dir, tmp_path, guess="ml")
    c._write_guess(water_molecule())
    (tmp_path / "siesta.DM").write_bytes(b"SIESTA's converged DM of step 1")
    c._write_guess(water_molecule())
    assert (tmp_path / "siesta.DM.prev").read_bytes() == b"SIESTA's converged DM of step 1"
    assert read_dm_orbital_count(tmp_path / "siesta.DM") == 23 and not list(tmp_path.glob("siesta.DM.bak*"))


def test_far_out_of_distribution_falls_back_whatever_the_fallback_setting(tmp_path):
    """A structure far outside the training data (novelty above 100x the flag level) starts from the atomic guess
    even with fallback="error", because such predictions measured worse than it; novelty_limit=None uses it."""
    far = tmp_path / "far-model"
    model = DensityMatrixModel(small_config())
    model.novelty_threshold.fill_(1e-12)
    save_model(model, far, {"name": "far"})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    c = calc(far, tmp_path / "a")
    with pytest.warns(UserWarning, match="atomic guess: far outside the training data of model far-model"):
        c._write_guess(water_molecule())
    assert c._used == "atomic" and "novelty" in c._reason and not (tmp_path / "a" / "siesta.DM").exists()
    c = calc(far, tmp_path / "b", novelty_limit=None)
    c._write_guess(water_molecule())
    assert c._used == "ml" and (tmp_path / "b" / "siesta.DM").is_file()


def test_spin_polarized_run_is_refused_or_falls_back(model_dir, tmp_path):
    with pytest.raises(ModelCompatibilityError, match="Spin collinear"):
        calc(model_dir, tmp_path, spin="collinear")._write_guess(water_molecule())
    c = calc(model_dir, tmp_path, spin="collinear", fallback="atomic")
    with pytest.warns(UserWarning, match="spin-unpolarized"):
        c._write_guess(water_molecule())
    assert c._used == "atomic" and not (tmp_path / "siesta.DM").exists()


def test_ml_plus_residual_guess_is_written_refined(tmp_path):
    """The second step's ML + residual DM holds N electrons and is idempotent, although the history it is built
    from (a 'converged' DM with a non-idempotent error) is not."""
    import numpy as np
    import sisl

    from siesta_dmguess.dm import flat_to_csr, read_density_matrix, write_density_matrix

    c = DMGuessSiesta(model="water", guess="ml+residual", label="siesta", directory=str(tmp_path), xc="CA")
    atoms = water_molecule()
    c.atoms = atoms.copy()
    c._write_guess(atoms)
    first = c._prediction
    geometry = first.density_matrix.geometry
    d1 = first.density_matrix.tocsr(0)
    noise = d1.copy()
    noise.data = np.random.default_rng(1).normal(scale=2e-3, size=noise.data.size)
    fake_converged = d1 + 0.5 * (noise + noise.T)  # stands in for SIESTA's converged DM of step 1
    write_density_matrix(sisl.DensityMatrix.fromsp(geometry, [fake_converged]), c._dm_path(), overwrite=True)
    c._record_converged()

    moved = atoms.copy()
    moved.positions[1] += [0.03, 0.0, 0.0]
    c.atoms = moved
    c._write_guess(moved)
    assert c._used == "ml+residual"
    pred = c._prediction
    s = flat_to_csr(pred.sample.layout, pred.overlap, True).toarray()
    d = read_density_matrix(c._dm_path(), pred.density_matrix.geometry).tocsr(0).toarray()
    raw = c.trajectory.guess("ml+residual", moved.positions, pred.density_matrix.tocsr(0)).toarray()

    def impurity(m):
        return np.abs((m / 2) @ s @ (m / 2) - m / 2).max()

    assert np.trace(d @ s) == pytest.approx(pred.electrons_expected, abs=1e-8)
    assert impurity(d) < 1e-8 < 1e-4 < impurity(raw)


def test_the_history_is_of_one_system_and_reuse_only_of_this_calculators_steps(model_dir, tmp_path):
    """The same atoms in another order (or other elements) started SIESTA from the previous step's DM of other
    atoms (29 SCF iterations where the atomic guess takes 12), and the first step of a calculator "reused" a .DM an
    earlier process had left in the folder. ASE's Siesta reads no DM after a change of atomic numbers either."""
    import numpy as np
    import scipy.sparse as sp

    (tmp_path / "siesta.DM").write_text("left by an earlier run")
    water = water_molecule()
    c = calc(model_dir, tmp_path, guess="reuse")
    c._write_guess(water)
    assert c._used == "atomic"  # the first step: nothing of this calculator to reuse
    c.atoms = water.copy()
    c._record_converged()  # as after a converged step
    c._write_guess(water)
    assert c._used == "reuse"
    swapped = water[[1, 0, 2]]
    c._write_guess(swapped)
    assert c._used == "atomic"
    c = calc(model_dir, tmp_path, guess="extrapolation")
    c.atoms = water.copy()
    c._record_converged()
    c.trajectory.push(water.positions, sp.identity(23, format="csr"))
    c._write_guess(water.copy())
    assert len(c.trajectory) == 1
    c._write_guess(swapped)
    assert len(c.trajectory) == 0 and c._used == "atomic" and np.array_equal(c._numbers, water.numbers)


def test_the_same_elements_given_in_another_order_start_without_the_history(model_dir, tmp_path):
    """Only the atomic numbers were compared: a water whose two H were given the other way round (the same
    structure) was started from the previous step's DM atom by atom, 14 SCF iterations on a water box where the
    plain ML guess takes 9 and the atomic guess 12, without a word. A periodic atom wrapped across the cell has not
    moved."""
    import scipy.sparse as sp

    water = water_molecule()
    for guess in ("reuse", "extrapolation"):
        c = calc(model_dir, tmp_path, guess=guess)
        c._write_guess(water)
        c.atoms = water.copy()
        c._record_converged()  # as after a converged step: SIESTA's DM is there to reuse or extrapolate from
        (tmp_path / "siesta.DM").write_text("SIESTA's")
        if guess == "extrapolation":
            c.trajectory.push(water.positions, sp.identity(23, format="csr"))
        nudged = water.copy()
        nudged.positions[1] += [0.05, 0.0, 0.0]
        wrapped = water.copy()
        wrapped.positions[2] += wrapped.cell[0]  # the same structure, an atom one lattice vector further
        for same in (nudged, wrapped):
            with _no_warning():
                c._write_guess(same)
            assert c._used == guess and len(c.trajectory) == (guess != "reuse")
        with pytest.warns(UserWarning, match=rf"atom 2 moved 1\.\d\d Å since the previous step, to where another "
                                             rf"atom of its element stood .*the {guess} guess starts without the "
                                             "earlier steps' DMs"):
            c._write_guess(water[[0, 2, 1]])
        assert c._used == "atomic" and len(c.trajectory) == 0
    c = calc(model_dir, tmp_path, guess="ml")  # a guess of no history: nothing to say
    c._write_guess(water)
    c.atoms = water.copy()
    c._record_converged()
    with _no_warning():
        c._write_guess(water[[0, 2, 1]])
    assert c._used == "ml"


def test_a_step_to_another_structure_is_told_from_a_step_along_a_trajectory():
    """The history was carried into another structure with the same atom list (ethanol to dimethyl ether: 14 SCF
    iterations from reuse or extrapolation, 12 from the atomic guess; two unrelated water8 frames: 15 and 12), and
    where it was dropped the warning called them reordered atoms. A bond pulled apart (one atom far), a cell scaled
    with its atoms, and atoms wrapped across the cell stay steps of one trajectory."""
    import numpy as np
    from ase import Atoms

    from siesta_dmguess.structure import new_structure_reason

    water = water_molecule()
    assert new_structure_reason(water.positions, None, water) == ""
    swapped = water[[0, 2, 1]]
    assert "to where another atom of its element stood" in new_structure_reason(water.positions, None, swapped)
    pulled = water.copy()
    pulled.positions[1] += [1.1, 0.0, 0.0]
    assert new_structure_reason(water.positions, None, pulled) == ""
    other = water.copy()
    other.positions[1:] += [[0.0, 1.3, 0.0], [0.0, -1.3, 0.0]]
    assert "2 atoms moved more than 1 Å since the previous step" in new_structure_reason(water.positions, None, other)
    box = Atoms("O8", scaled_positions=np.random.default_rng(0).random((8, 3)), cell=[30.0] * 3, pbc=True)
    scaled = box.copy()
    scaled.set_cell(box.cell * 1.05, scale_atoms=True)  # corner atoms move up to 2.6 Å, in the cell's fractions none
    assert new_structure_reason(box.positions, box.cell.array, scaled) == ""
    wrapped = box.copy()
    wrapped.positions[:4] += box.cell[0]
    assert new_structure_reason(box.positions, box.cell.array, wrapped) == ""
    shuffled = box.copy()
    shuffled.set_scaled_positions(np.random.default_rng(1).random((8, 3)))
    assert "another structure" in new_structure_reason(box.positions, box.cell.array, shuffled)


def test_changed_run_settings_start_without_the_history(model_dir, tmp_path):
    """calc.set(basis_set="SZ") between two steps: the extrapolation was written in the previous run's basis (read
    back from its .ion files), which SIESTA dropped, and the record still said guess=extrapolation."""
    import scipy.sparse as sp

    water = water_molecule()
    c = calc(model_dir, tmp_path, guess="extrapolation")
    c.atoms = water.copy()
    c._positions = water.positions.copy()
    c._record_converged()
    c.trajectory.push(water.positions, sp.identity(23, format="csr"))
    c.set(guess="extrapolation")  # this calculator's own settings change no run
    assert len(c.trajectory) == 1
    import numpy as np

    c.set(kpts=np.array([1, 1, 1]))  # an array among the settings: compared as ASE compares them (a bare
    assert len(c.trajectory) == 0  # ValueError from dict comparison, after ASE had set it)
    c.trajectory.push(water.positions, sp.identity(23, format="csr"))
    c.set(kpts=np.array([1, 1, 1]))  # the same again: nothing changed
    assert len(c.trajectory) == 1
    c.set(basis_set="SZ")
    assert len(c.trajectory) == 0 and c._numbers is None
    c._write_guess(water)
    assert c._used == "atomic"


def test_a_label_with_a_space_is_an_error_before_anything_runs(model_dir, tmp_path):
    """ASE writes the label as SystemLabel and as the output's name in the shell command: the shell failed to open
    "my", the failure was blamed on the ML guess and SIESTA run again (or SIESTA stopped, "SystemLabel must *NOT*
    contain any spaces!")."""
    c = DMGuessSiesta(model=model_dir, label="my label", directory=str(tmp_path / "with space"), xc="CA",
                      pseudo_qualifier="")
    with pytest.raises(InputFileError, match="label 'my label' contains spaces, which SIESTA refuses"):
        c.write_input(water_molecule())
    c = DMGuessSiesta(model=model_dir, label=None, directory=str(tmp_path), xc="CA", pseudo_qualifier="")
    with pytest.raises(InputFileError, match="label None is no name"):  # a bare TypeError from re.search
        c.write_input(water_molecule())
    assert not (tmp_path / "with space" / "my label.DM").exists()


def test_a_failed_comparison_run_does_not_cost_the_step(model_dir, tmp_path, monkeypatch):
    """compare_baseline's run from the atomic guess failing raised after the step had converged: the energy was
    kept (the same atoms then returned it without running), but the step's record was lost and guess_record was
    still the previous step's."""
    from pathlib import Path

    from ase.calculators.siesta import Siesta

    from siesta_dmguess.errors import SiestaError

    def write_input(self, atoms, properties=None, system_changes=None):
        Path(self.getpath(ext="fdf")).write_text("SystemLabel siesta\n")

    def execute(self):
        Path(self.getpath(ext="out")).write_text(CONVERGED_OUTPUT)

    def failing_baseline(self):
        raise SiestaError("SIESTA failed (exit status 1)", Path(self.directory) / "baseline" / "siesta.out")

    monkeypatch.setattr(Siesta, "write_input", write_input)
    monkeypatch.setattr(Siesta, "execute", execute, raising=False)
    monkeypatch.setattr(Siesta, "read_results", lambda self: self.results.update(energy=-465.67))
    monkeypatch.setattr(DMGuessSiesta, "_run_baseline", failing_baseline)
    monkeypatch.setenv("SIESTA_COMMAND", "/bin/true")
    atoms = water_molecule()
    atoms.calc = calc(model_dir, tmp_path, guess="ml", compare_baseline=True)
    with pytest.warns(UserWarning, match=r"the comparison run from SIESTA's atomic guess failed \(.*exit status 1"):
        assert atoms.get_potential_energy() == -465.67
    record = atoms.calc.guess_record
    assert record is not None and atoms.calc.history == [record] and record.guess == "ml"
    assert record.atomic_scf_iterations is None and record.iterations_saved is None and record.scf_iterations == 2


def test_the_model_is_checked_when_the_calculator_is_made(tmp_path):
    """A misspelt model with fallback="atomic" ran every step from the atomic guess, warning at each; a model that
    is no name or folder was a TypeError from pathlib at the first step."""
    with pytest.raises(ModelCompatibilityError, match="no model folder or shipped model named 'watr'"):
        DMGuessSiesta(model="watr", fallback="atomic", directory=str(tmp_path))
    with pytest.raises(TypeError, match="model must be 'auto', a shipped model's name, a model folder"):
        DMGuessSiesta(model=42, directory=str(tmp_path))


def test_auto_chooses_again_when_the_elements_change(tmp_path):
    """``model="auto"`` stayed on its first choice: a CH4 after a water molecule was refused by `water`."""
    from ase.build import molecule

    c = DMGuessSiesta(label="siesta", directory=str(tmp_path), xc="CA")
    c._write_guess(water_molecule())
    assert c._used == "ml" and c._loaded.path.name == "water"
    methane = molecule("CH4", cell=[10] * 3, pbc=True)
    methane.center()
    c._write_guess(methane)
    assert c._used == "ml" and c._loaded.path.name == "chno-molecules" and c._startup_s > 0
    c._write_guess(water_molecule())  # loaded already: no start-up
    assert c._loaded.path.name == "water" and c._startup_s == 0


def test_todict_makes_the_same_calculator_and_replaced_dm_keys_are_said(model_dir, tmp_path):
    with pytest.warns(UserWarning, match=r"fdf_arguments \['DM.UseSaveDM'\] are replaced at each step"):
        c = calc(model_dir, tmp_path, guess="extrapolation", history_depth=2, fallback="atomic",
                 fdf_arguments={"DM.UseSaveDM": "F", "DM.Tolerance": "1e-5"})
    d = c.todict()
    assert (d["model"], d["guess"], d["history_depth"], d["fallback"]) == (str(model_dir), "extrapolation", 2, "atomic")
    with pytest.warns(UserWarning):
        again = DMGuessSiesta(**d)
    assert (again.model_name, again.guess, again.trajectory.steps.maxlen) == (str(model_dir), "extrapolation", 2)


def test_set_takes_the_calculators_own_settings_and_checks_them(model_dir, tmp_path):
    """``calc.set(guess="atomic")`` was ASE's "'set' does not take the keywords: ['guess']" (a probe)."""
    c = calc(model_dir, tmp_path)
    c._write_guess(water_molecule())
    assert c._loaded is not None
    c.set(guess="reuse", fallback="atomic", threads=1, compare_baseline=True)
    assert (c.guess, c.fallback, c.threads, c.compare_baseline) == ("reuse", "atomic", 1, True)
    with pytest.raises(ValueError, match="guess must be one of"):
        c.set(guess="bogus")
    with pytest.raises(ValueError, match="fallback must be"):
        c.set(fallback="never")
    assert (c.guess, c.fallback) == ("reuse", "atomic")  # a refused value changes nothing
    c.set(model=str(model_dir))  # loaded again at the next ML step
    assert c._loaded is None and c.model_name == str(model_dir)


def test_threads_apply_to_the_prediction_only(model_dir, tmp_path, torch_thread_log):
    """``threads=1`` runs the calculator's prediction on one torch thread and restores torch's setting."""
    import torch

    import siesta_dmguess.predict as predict_module

    seen = torch_thread_log(predict_module, "predict_density_matrix")
    calc(model_dir, tmp_path, threads=1)._write_guess(water_molecule())
    assert seen == [1] and torch.get_num_threads() == 2


@pytest.mark.parametrize("kpts, fdf_arguments, folded", [
    (None, {}, True),
    ((1, 1, 1), {}, True),
    ((2, 2, 2), {}, False),
    (None, {"kgrid.Cutoff": "20.0 Ang"}, False),  # k-points given to SIESTA directly, not through ASE's kpts
    (None, {"kgrid.Cutoff": "2.0 Ang"}, True),  # shorter than half the 10 Å cell: SIESTA runs at Γ only
])
def test_the_dm_is_folded_exactly_when_siesta_runs_at_gamma_only(model_dir, tmp_path, kpts,
                                                                   fdf_arguments, folded):
    for name in ("O.psf", "H.psf"):  # ASE links the pseudopotentials into the run folder; SIESTA does not run
        (tmp_path / name).write_text("placeholder\n")
    c = calc(model_dir, tmp_path / "run", kpts=kpts, fdf_arguments=fdf_arguments, pseudo_path=str(tmp_path))
    c.write_input(water_molecule(), properties=["energy"])
    assert c._prediction.folded is folded


def test_a_pseudopotential_missing_from_pseudo_path_is_named_before_predicting(model_dir, tmp_path):
    """ASE links a species' file into the run folder even when pseudo_path lacks it; SIESTA would then abort."""
    for name in ("O.psf", "H.psf"):
        (tmp_path / name).write_text("placeholder\n")
    c = calc(model_dir, tmp_path / "run", pseudo_path=str(tmp_path), pseudo_qualifier=None)  # ASE's default
    with pytest.raises(InputFileError, match=r"species 'O.1' not found: O.1.psml links to .*O.psml, which does not"
                                             r" exist \(ASE takes O.lda.psf, else O.psml, from the calculator's "
                                             r"pseudo_path, else \$SIESTA_PP_PATH; pseudo_qualifier='' takes O.psf"):
        c.write_input(water_molecule(), properties=["energy"])
    assert not (tmp_path / "run" / "siesta.DM").exists()
    (tmp_path / "H.psf").unlink()  # and a file missing altogether
    with pytest.raises(InputFileError, match=r"species 'H.2' not found: .*\(ASE takes H.psf, else H.psml"):
        calc(model_dir, tmp_path / "run2", pseudo_path=str(tmp_path)).write_input(water_molecule(), ["energy"])


def test_a_relative_pseudo_path_is_taken_from_the_working_directory(model_dir, tmp_path, monkeypatch):
    """ASE alone would look for pp/pp/O.psf and link pp/O.psml relative to the run folder (a dangling link)."""
    (tmp_path / "pp").mkdir()
    for name in ("O.psf", "H.psf"):
        (tmp_path / "pp" / name).write_text(f"{name}\n")
    monkeypatch.chdir(tmp_path)
    calc(model_dir, "run", pseudo_path="pp").write_input(water_molecule(), ["energy"])
    assert (tmp_path / "run" / "O.1.psf").read_text() == "O.psf\n"
    later = calc(model_dir, "run2", pseudo_path=str(tmp_path / "elsewhere"))
    later.set(pseudo_path="pp")  # set after construction, as ASE allows
    later.write_input(water_molecule(), ["energy"])
    assert (tmp_path / "run2" / "O.1.psf").read_text() == "O.psf\n"


def test_a_reused_run_folder_does_not_keep_the_previous_pseudopotential(model_dir, tmp_path):
    """With pseudo_path changed to a folder that lacks O.psf, ASE links a dangling O.1.psml; the O.1.psf link of
    the previous write stayed beside it and SIESTA would have read the old pseudopotential without a word."""
    for folder in ("old", "new"):
        (tmp_path / folder).mkdir()
    for name in ("O.psf", "H.psf"):
        (tmp_path / "old" / name).write_text(f"old {name}\n")
    (tmp_path / "new" / "H.psf").write_text("new H.psf\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.psf").write_text("a user's file, not a link: kept")
    (tmp_path / "run" / "O.psf").symlink_to(tmp_path / "old" / "O.psf")  # a user's link, not named as ASE's
    c = calc(model_dir, tmp_path / "run", pseudo_path=str(tmp_path / "old"))
    c.write_input(water_molecule(), ["energy"])
    assert (tmp_path / "run" / "O.1.psf").read_text() == "old O.psf\n"
    c.set(pseudo_path=str(tmp_path / "new"))
    with pytest.raises(InputFileError, match=r"species 'O.1' not found"):
        c.write_input(water_molecule(), ["energy"])
    assert not (tmp_path / "run" / "O.1.psf").exists()
    assert (tmp_path / "run" / "notes.psf").read_text() == "a user's file, not a link: kept"
    assert (tmp_path / "run" / "O.psf").is_symlink()


def test_a_reused_run_folder_does_not_keep_a_copied_pseudopotential_of_the_other_format(model_dir, tmp_path):
    """With ``symlink_pseudos=False`` ASE copies the pseudopotentials; moved to a folder with O.psml instead of
    O.psf, the O.1.psf copy of the previous write stayed beside the new O.1.psml. A user's file is kept."""
    for folder in ("old", "new", "run"):
        (tmp_path / folder).mkdir()
    (tmp_path / "old" / "O.psf").write_text("old O.psf\n")
    (tmp_path / "new" / "O.psml").write_text("<psml/>\n")
    for folder in ("old", "new"):
        (tmp_path / folder / "H.psf").write_text("H.psf\n")
    (tmp_path / "run" / "notes.psf").write_text("a user's file: kept")
    (tmp_path / "run" / "C.3.psf").write_text("a user's file under an ASE-like name: kept")
    c = calc(model_dir, tmp_path / "run", pseudo_path=str(tmp_path / "old"), symlink_pseudos=False)
    c.write_input(water_molecule(), ["energy"])
    copied = tmp_path / "run" / "O.1.psf"
    assert copied.read_text() == "old O.psf\n" and not copied.is_symlink()
    c.set(pseudo_path=str(tmp_path / "new"))
    c.write_input(water_molecule(), ["energy"])
    assert not copied.exists()
    assert (tmp_path / "run" / "O.1.psml").read_text() == "<psml/>\n"
    assert (tmp_path / "run" / "H.2.psf").read_text() == "H.psf\n"
    assert (tmp_path / "run" / "notes.psf").read_text() == "a user's file: kept"
    c.write_input(water_molecule(), ["energy"])
    assert (tmp_path / "run" / "C.3.psf").read_text() == "a user's file under an ASE-like name: kept"


def test_a_relative_siesta_pp_path_is_taken_from_the_working_directory(model_dir, tmp_path, monkeypatch):
    """ASE's fallback $SIESTA_PP_PATH, relative, has the same fault as a relative pseudo_path; it is resolved at
    each write (the calculator keeps no path of its own) so a later chdir is followed."""
    for folder in ("a", "b"):
        (tmp_path / folder / "pp").mkdir(parents=True)
        for name in ("O.psf", "H.psf"):
            (tmp_path / folder / "pp" / name).write_text(f"{folder}/{name}\n")
    monkeypatch.setenv("SIESTA_PP_PATH", "pp")
    monkeypatch.chdir(tmp_path / "a")
    c = calc(model_dir, str(tmp_path / "run"))
    c.write_input(water_molecule(), ["energy"])
    assert (tmp_path / "run" / "O.1.psf").read_text() == "a/O.psf\n"
    assert c["pseudo_path"] is None
    monkeypatch.chdir(tmp_path / "b")
    c.write_input(water_molecule(), ["energy"])
    assert (tmp_path / "run" / "O.1.psf").read_text() == "b/O.psf\n"


def test_fdf_arguments_in_any_spelling_reach_the_compatibility_check(tmp_path, shipped):
    """fdf keys ignore case and '.', '_', '-': a basis size given as ``pao_basis-size`` is checked like
    ``PAO.BasisSize`` against the model card."""
    c = DMGuessSiesta(model=shipped("water"), label="siesta", directory=str(tmp_path), xc="CA",
                      fdf_arguments={"pao_basis-size": "SZ"})
    with pytest.raises(ModelCompatibilityError, match="PAO.BasisSize is 'SZ'"):
        c._write_guess(water_molecule())


@pytest.mark.parametrize("kwargs, problem", [
    ({}, None),  # ASE's xc default "LDA" (authors PZ), DZP, and SIESTA's energy shift: the shipped model's basis
    ({"energy_shift": 0.1}, "PAO.EnergyShift"),  # ASE's Siesta default (eV): longer orbitals, another basis
    ({"basis_set": "SZ"}, "PAO.BasisSize"),
    ({"xc": "PBE"}, "XC.functional"),
    ({"fdf_arguments": {"PAO.EnergyShift": "0.01 Ry"}}, "PAO.EnergyShift"),
    ({"species": [Species(symbol="H", basis_set="SZ")]}, "PAO.BasisSize is 'SZ'"),  # one element's own basis
])
def test_the_calculators_basis_and_xc_arguments_are_checked_against_the_card(tmp_path, shipped, kwargs, problem):
    c = DMGuessSiesta(model=shipped("water"), label="siesta", directory=str(tmp_path), **kwargs)
    if problem is None:
        c._write_guess(water_molecule())
        assert c._used == "ml"
    else:
        with pytest.raises(ModelCompatibilityError, match=problem):
            c._write_guess(water_molecule())


@pytest.mark.parametrize("kwargs, problem", [
    ({}, None),  # ASE writes a PAO.BasisSizes block (DZP for O.1 and H.2): the model's basis
    ({"fdf_arguments": {"PAO.SplitNorm": 0.3}}, r"fdf sets PAO.SplitNorm \(0.3\), which shapes the basis"),
    ({"basis_set": "SZ"}, r"^[^;]*PAO.BasisSize is 'SZ'[^;]*$"),  # said once, not again for each species' block row
])
def test_the_fdf_ase_writes_is_checked_for_every_basis_option(tmp_path, shipped, kwargs, problem):
    for element in ("O", "H"):
        (tmp_path / f"{element}.psf").write_text("placeholder\n")  # linked by ASE; SIESTA does not run
    c = DMGuessSiesta(model=shipped("water"), label="siesta", directory=str(tmp_path / "run"), xc="CA",
                      pseudo_path=str(tmp_path), pseudo_qualifier="", **kwargs)
    if problem is None:
        c.write_input(water_molecule(), properties=["energy"])
        assert c._used == "ml"
    else:
        with pytest.raises(ModelCompatibilityError, match=problem):
            c.write_input(water_molecule(), properties=["energy"])


@pytest.mark.parametrize("kpts, used", [((2, 2, 2), "ml"), ((1, 1, 2), "atomic"), (None, "atomic")])
def test_a_k_sampling_the_model_never_saw_starts_from_the_atomic_guess(tmp_path, shipped, kpts, used):
    """`silicon` learned from k-point runs: with 1x1x2 k-points (or at Γ) an 8-atom cell is sampled with a period of
    5.43 Å, shorter than its DM's range, and the calculator starts SIESTA from its atomic guess and says why."""
    from ase.build import bulk

    (tmp_path / "Si.psf").write_text("placeholder\n")  # linked by ASE; SIESTA does not run
    c = DMGuessSiesta(model=shipped("silicon"), label="siesta", directory=str(tmp_path / "run"), xc="CA", kpts=kpts,
                      pseudo_path=str(tmp_path), pseudo_qualifier="")
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    if used == "atomic":
        with pytest.warns(UserWarning, match="period of 5.43 .*more k-points, or a larger cell"):
            c.write_input(atoms, properties=["energy"])
    else:
        c.write_input(atoms, properties=["energy"])
    assert c._used == used and (tmp_path / "run" / "siesta.DM").is_file() is (used == "ml")


def test_the_prediction_is_for_the_cell_siesta_runs(model_dir, tmp_path):
    """ASE's Siesta writes the cell whenever one is set, even with pbc=False, and SIESTA runs it as periodic:
    the calculator predicts the periodic DM then too. Without a cell SIESTA builds its automatic cell, which no
    orbital crosses: an isolated molecule."""
    import numpy as np

    from .conftest import water_box

    predictions = []
    for k, (pbc, cell) in enumerate([(True, "box"), (False, "box"), (False, "none")]):
        box = water_box()
        box.pbc = pbc
        if cell == "none":
            box.set_cell(np.zeros((3, 3)))
        (tmp_path / str(k)).mkdir()
        c = calc(model_dir, tmp_path / str(k))
        c._write_guess(box)
        predictions.append(c._prediction)
    periodic, flagged_off, isolated = predictions
    assert periodic.structure.periodic and flagged_off.structure.periodic and not isolated.structure.periodic
    assert np.array_equal(periodic.values, flagged_off.values)
    assert periodic.values.shape != isolated.values.shape  # the 5 Å box's image pairs are what differ


def test_a_breaking_bond_starts_from_the_atomic_guess_whatever_the_fallback_setting(tmp_path, shipped):
    """A prediction with no clear occupied space (Prediction.mixed_reason) is not written, even with
    fallback="error" and novelty_limit=None (which only lets far structures through)."""
    from ase.build import molecule

    atoms = molecule("CH4")
    atoms.positions[1] = 2.0 * atoms.positions[1] - atoms.positions[0]  # one C-H bond twice as long
    c = DMGuessSiesta(model=shipped("chno-molecules"), label="siesta", directory=str(tmp_path), xc="CA",
                      novelty_limit=None)
    with pytest.warns(UserWarning, match="atomic guess: the model's DM has no clear occupied space"):
        c._write_guess(atoms)
    assert c._used == "atomic" and not (tmp_path / "siesta.DM").exists()


def test_ml_plus_residual_falls_back_to_the_extrapolation_where_a_prediction_is_refused(tmp_path, shipped):
    """Along a trajectory, a step whose prediction is not used (here: a C-H bond pulled to twice its length, no
    clear occupied space) starts from the history's extrapolation, not from scratch; the first step, with no
    history, from the atomic guess."""
    import numpy as np
    from ase.build import molecule

    from siesta_dmguess.dm import read_density_matrix, write_density_matrix

    c = DMGuessSiesta(model=shipped("chno-molecules"), guess="ml+residual", label="siesta",
                      directory=str(tmp_path), xc="CA")
    atoms = molecule("CH4")
    c.atoms = atoms.copy()
    c._write_guess(atoms)
    assert c._used == "ml"
    converged = c._prediction.density_matrix  # stands in for SIESTA's converged DM of step 1
    write_density_matrix(converged, c._dm_path(), overwrite=True)
    c._record_converged()

    broken = atoms.copy()
    broken.positions[1] = 2.0 * broken.positions[1] - broken.positions[0]
    c.atoms = broken
    with pytest.warns(UserWarning, match="no clear occupied space") as caught:
        c._write_guess(broken)
    assert c._used == "extrapolation" and c._prediction is None
    # CH4's empty d orbitals (exactly zero) keep their diagonal elements: sisl adds none, nor warns.
    assert not [w for w in caught if "diagonal elements" in str(w.message)]
    written = read_density_matrix(c._dm_path(), converged.geometry).tocsr(0).toarray()
    assert np.abs(written - converged.tocsr(0).toarray()).max() < 1e-6  # one step of history: its converged DM

    fresh = DMGuessSiesta(model=shipped("chno-molecules"), guess="ml+residual", label="siesta",
                          directory=str(tmp_path / "fresh"), xc="CA")
    with pytest.warns(UserWarning, match="no clear occupied space"):
        fresh._write_guess(broken)
    assert fresh._used == "atomic" and not fresh._dm_path().exists()


def test_siesta_is_found_as_everywhere_else_and_a_missing_one_is_said_before_predicting(tmp_path, monkeypatch):
    """Without command or profile the calculator runs the SIESTA that SIESTA_COMMAND names (ASE's own default would
    not look there); with none anywhere, calculating raises SiestaNotFoundError before the model is loaded (the
    model named here does not exist)."""
    from siesta_dmguess.errors import SiestaNotFoundError

    for var in ("SIESTA_COMMAND", "ASE_SIESTA_COMMAND"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("siesta_dmguess.siesta.runner._ase_config_command", lambda: None)
    atoms = water_molecule()
    atoms.calc = DMGuessSiesta(model="water", directory=str(tmp_path / "run"), xc="CA")
    with pytest.raises(SiestaNotFoundError, match="SIESTA_COMMAND: not set"):
        atoms.get_potential_energy()
    assert atoms.calc._loaded is None  # said before the model was loaded
    fake = tmp_path / "my-siesta"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("SIESTA_COMMAND", str(fake))
    found = DMGuessSiesta(model="water", directory=str(tmp_path / "run"), xc="CA")
    assert found._siesta_command().startswith(f"{fake} < ")
    given = DMGuessSiesta(model="water", command="other < PREFIX.fdf > PREFIX.out", xc="CA")
    assert given._siesta_command().startswith("other")


def test_the_default_model_is_chosen_from_the_atoms_and_an_uncovered_one_falls_back(tmp_path):
    """``model="auto"`` (the default): silicon gets `silicon` at the first ML step; atoms no shipped model covers
    are an error by default and, with ``fallback="atomic"``, the atomic guess with the reason."""
    from ase.build import bulk

    (tmp_path / "Si.psf").write_text("placeholder\n")  # linked by ASE; SIESTA does not run
    c = DMGuessSiesta(label="siesta", directory=str(tmp_path / "run"), xc="CA", kpts=(2, 2, 2),
                      pseudo_path=str(tmp_path), pseudo_qualifier="")
    c.write_input(bulk("Si", "diamond", a=5.43, cubic=True), properties=["energy"])
    assert c._used == "ml" and c._loaded.path.name == "silicon"
    assert read_dm_orbital_count(tmp_path / "run" / "siesta.DM") == 8 * 13  # Si's DZP: 13 orbitals per atom
    xe = Atoms("Xe2", positions=[[0, 0, 0], [3, 0, 0]], cell=[10] * 3, pbc=True)
    with pytest.raises(ModelCompatibilityError, match="no shipped model covers species"):
        DMGuessSiesta(label="siesta", directory=str(tmp_path / "xe"), xc="CA")._write_guess(xe)
    c = DMGuessSiesta(label="siesta", directory=str(tmp_path / "xe"), xc="CA", fallback="atomic")
    with pytest.warns(UserWarning, match="atomic guess because no shipped model covers species"):
        c._write_guess(xe)
    assert c._used == "atomic" and c._loaded is None


UNCONVERGED_OUTPUT = """\
Siesta Version  : fake-1.0
Attempting to read DM from file... Succeeded...
   scf:    1     -465.9     -464.7     -464.7  0.010000 -4.7  0.2
   scf:    2     -465.6     -465.6     -465.6  0.000900 -2.2  0.0001
siesta:         Total =    -465.674271
timer: Elapsed wall time (sec) =       0.10
Job completed
"""
CONVERGED_OUTPUT = UNCONVERGED_OUTPUT.replace("siesta:         Total", "SCF cycle converged after 2 iterations\n"
                                                                    "siesta:         Total")


@pytest.mark.parametrize("ml_run", ["converges", "does not converge", "crashes", "never starts", "no output"])
def test_a_failed_scf_from_the_guess_is_run_again_from_the_atomic_guess(model_dir, tmp_path, monkeypatch, ml_run):
    """Where SIESTA fails from the ML guess (crashes, or stops unconverged with SCF.MustConverge F), the step is
    run again from SIESTA's atomic guess, as SIESTA alone would have run it, and the record says why; a failure
    from the atomic guess itself is the user's, raised as ASE raises it."""
    from pathlib import Path

    from ase.calculators.calculator import CalculationFailed
    from ase.calculators.siesta import Siesta

    runs = []

    def write_input(self, atoms, properties=None, system_changes=None):  # ASE's fdf, without the pseudopotentials
        Path(self.getpath(ext="fdf")).write_text("SystemLabel siesta\n")

    def execute(self):
        guess = "ml" if "DM.UseSaveDM T" in Path(self.getpath(ext="fdf")).read_text() else "atomic"
        runs.append((guess, Path(self._dm_path()).is_file()))
        if guess == "ml" and ml_run == "crashes" or guess == "atomic" and ml_run == "atomic crashes":
            Path(self.getpath(ext="out")).write_text("Siesta Version  : fake-1.0\n")  # it started, then aborted
            raise CalculationFailed("siesta in . returned an error: 134")
        if ml_run == "never starts":  # the shell made the output, then found no program to run
            Path(self.getpath(ext="out")).write_text("")
            raise CalculationFailed("siesta in . returned an error: 127")
        if ml_run == "no output":  # the shell could not even make it ("cannot open my": a label with a space)
            raise CalculationFailed("siesta in . returned an error: 2")
        converged = guess == "atomic" or ml_run == "converges"
        Path(self.getpath(ext="out")).write_text(CONVERGED_OUTPUT if converged else UNCONVERGED_OUTPUT)

    monkeypatch.setattr(Siesta, "write_input", write_input)
    monkeypatch.setattr(Siesta, "execute", execute, raising=False)
    monkeypatch.setattr(Siesta, "read_results", lambda self: self.results.update(energy=-465.67))
    monkeypatch.setenv("SIESTA_COMMAND", "/bin/true")
    atoms = water_molecule()
    atoms.calc = calc(model_dir, tmp_path, guess="ml")
    if ml_run in ("never starts", "no output"):  # no guess to blame, no point in a second run: ASE's error, at once
        with _no_warning(), pytest.raises(CalculationFailed, match="127" if ml_run == "never starts" else "error: 2"):
            atoms.get_potential_energy()
        assert runs == [("ml", True)]
        return
    with pytest.warns(UserWarning) if ml_run != "converges" else _no_warning() as caught:
        assert atoms.get_potential_energy() == -465.67
    if caught is not None:  # said at the user's line, not inside ASE's calculator
        assert [w.filename for w in caught] == [__file__]
    record = atoms.calc.guess_record
    if ml_run == "converges":
        assert runs == [("ml", True)] and record.guess == "ml" and record.reason == ""
        assert record.failed_scf_iterations == 0
        # whether the structure was flagged, without the model card (a probe had only the novelty score)
        assert record.novelty_threshold == pytest.approx(float(atoms.calc._loaded.model.novelty_threshold))
        assert record.flagged_as_novel == (record.novelty > record.novelty_threshold)
    else:  # the second run starts from SIESTA's atomic guess: no DM to read
        assert runs == [("ml", True), ("atomic", False)] and record.guess == "atomic"
        assert record.reason.startswith("SIESTA failed from the ml guess")
        if ml_run == "does not converge":  # the failed run's output says how far it got
            assert "after 2 SCF iterations" in record.reason and record.failed_scf_iterations == 2
        else:  # a crash before any output: nothing counted
            assert record.failed_scf_iterations == 0
        assert {"does not converge": "the SCF did not converge", "crashes": "error: 134"}[ml_run] in record.reason
    ml_run = "atomic crashes"  # read by execute() above
    atoms.calc.guess = "atomic"
    atoms.rattle(0.01)
    with pytest.raises(CalculationFailed):
        atoms.get_potential_energy()


@contextlib.contextmanager
def _no_warning():
    """Any UserWarning inside is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        yield


def test_a_ghost_species_is_refused_or_falls_back(model_dir, tmp_path):
    """ASE writes ``Species(..., ghost=True)`` with a negative atomic number: orbitals without nucleus or electrons
    (counterpoise corrections). Predicted as the element, the DM would hold that atom's electrons too."""
    for name in ("O.psf", "H.psf"):
        (tmp_path / name).write_text("placeholder\n")
    ghost = [Species(symbol="H", tag=1, ghost=True)]
    atoms = water_molecule()
    atoms.set_tags([0, 0, 1])  # the second H is the ghost
    with pytest.raises(ModelCompatibilityError, match="are ghost atoms"):
        calc(model_dir, tmp_path / "run", species=ghost, pseudo_path=str(tmp_path)).write_input(atoms, ["energy"])
    c = calc(model_dir, tmp_path / "run2", species=ghost, pseudo_path=str(tmp_path), fallback="atomic")
    with pytest.warns(UserWarning, match="atomic guess because .*ghost atoms"):
        c.write_input(atoms, ["energy"])
    assert c._used == "atomic" and not (tmp_path / "run2" / "siesta.DM").exists()
    plain = calc(model_dir, tmp_path / "run3", pseudo_path=str(tmp_path))
    plain.write_input(atoms, ["energy"])  # the same atoms without the ghost species: predicted
    assert plain._used == "ml"


def test_the_history_is_kept_in_the_runs_own_basis_where_the_model_does_not_fit(model_dir, tmp_path):
    """With fallback="atomic" and a model that does not cover the run (here: N), the steps still start from the
    extrapolation of SIESTA's converged DMs, read in the basis SIESTA wrote for the run (<label>.ion.xml), not
    from scratch (the model's basis cannot even hold them)."""
    import shutil

    import numpy as np
    import sisl

    from siesta_dmguess.basis import read_basis_folder
    from siesta_dmguess.dm import build_geometry, read_density_matrix, write_density_matrix
    from siesta_dmguess.structure import structure_as_siesta_runs

    from .conftest import dataset

    basis_folder = dataset("g2") / "basis"
    nh3 = Atoms("NH3", positions=[[5, 5, 5], [6.0, 5, 5], [5, 6.0, 5], [5, 5, 6.0]], cell=[10] * 3, pbc=True)
    c = calc(model_dir, tmp_path, fallback="atomic")
    c.atoms = nh3.copy()
    with pytest.warns(UserWarning, match="atomic guess because .*'N'"):
        c._write_guess(nh3)
    assert c._used == "atomic"
    # What SIESTA leaves in the folder after the step: the fdf ASE wrote (labels N.1, H.2), the basis it used and
    # its converged DM (a stand-in: half an electron on every orbital).
    labels = ["N.1", "H.2", "H.2", "H.2"]
    for label in ("N.1", "H.2"):
        shutil.copy(basis_folder / f"{label.split('.')[0]}.ion.xml", tmp_path / f"{label}.ion.xml")
    rows = "\n".join(f"{x} {y} {z} {1 if lab == 'N.1' else 2}" for (x, y, z), lab in zip(nh3.positions, labels))
    (tmp_path / "siesta.fdf").write_text(
        "NumberOfAtoms 4\nNumberOfSpecies 2\n%block ChemicalSpeciesLabel\n1 7 N.1\n2 1 H.2\n%endblock "
        "ChemicalSpeciesLabel\nLatticeConstant 1.0 Ang\n%block LatticeVectors\n10 0 0\n0 10 0\n0 0 10\n%endblock "
        "LatticeVectors\nAtomicCoordinatesFormat Ang\n%block AtomicCoordinatesAndAtomicSpecies\n" + rows
        + "\n%endblock AtomicCoordinatesAndAtomicSpecies\n")
    geometry = build_geometry(structure_as_siesta_runs(nh3, labels), read_basis_folder(tmp_path, ["H.2", "N.1"]))
    converged = sisl.DensityMatrix(geometry)
    for orbital in range(geometry.no):
        converged[orbital, orbital] = 0.5
    write_density_matrix(converged, c._dm_path(), overwrite=True)
    c._record_converged()

    moved = nh3.copy()
    moved.positions[1, 0] += 0.02
    c.atoms = moved
    with pytest.warns(UserWarning, match="atomic guess because .*'N'"):
        c._write_guess(moved)
    assert c._used == "extrapolation" and "'N'" in c._reason
    written = read_density_matrix(c._dm_path(), geometry).tocsr(0).toarray()
    assert np.abs(written - converged.tocsr(0).toarray()).max() < 1e-12  # one step of history: its converged DM
