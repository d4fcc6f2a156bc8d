"""Integration with a real SIESTA (marked `siesta`; skipped with the reason when none is found).

The shipped `water` model predicts the DM of held-out structures; SIESTA must read it, converge in fewer
SCF iterations than from its atomic guess, and reach the same total energy.
"""

import json

import numpy as np
import pytest

from siesta_dmguess.errors import SiestaNotFoundError

from .conftest import dataset

pytestmark = pytest.mark.siesta


def first_val_record(root) -> dict:
    """The first held-out structure of a shared dataset (its index.json record)."""
    return next(r for r in json.loads((root / "index.json").read_text()) if r["split"] == "val")


@pytest.fixture(scope="module")
def siesta_command():
    from siesta_dmguess.siesta import find_siesta

    try:
        return " ".join(find_siesta())
    except SiestaNotFoundError as exc:
        pytest.skip(f"no real SIESTA: {exc}")


@pytest.fixture(scope="module")
def water_model():
    from siesta_dmguess.card import list_shipped_models, load_model

    if "water" not in list_shipped_models():
        pytest.skip("the shipped 'water' model is not installed")
    return load_model("water")


@pytest.mark.parametrize("name", ["h2o", "water8"])
def test_ml_guess_is_read_and_saves_iterations(name, siesta_command, water_model, tmp_path):
    from siesta_dmguess.bench import bench_structure

    root = dataset(name)
    rec = first_val_record(root)
    result = bench_structure(root / rec["id"] / "input.fdf", tmp_path, water_model, command=siesta_command)
    ml, atomic = result.results["ml"], result.results["atomic"]
    assert ml.dm_read and not atomic.dm_read
    assert atomic.scf_iterations == rec["scf_iterations_atomic_guess"]  # same SIESTA, same baseline
    assert ml.scf_iterations < atomic.scf_iterations
    assert abs(ml.total_energy_eV - atomic.total_energy_eV) < 1e-4


def test_ase_calculator_md_steps(siesta_command, water_model, tmp_path, monkeypatch):
    import os

    from ase import Atoms, units
    from ase.md.verlet import VelocityVerlet

    from siesta_dmguess import DMGuessSiesta

    atoms = Atoms("OH2", positions=[[0, 0, 0], [0.97, 0, 0], [-0.25, 0.92, 0]], cell=[12] * 3, pbc=True)
    atoms.center()
    atoms.set_velocities(np.random.default_rng(0).normal(0, 0.01, (3, 3)))
    monkeypatch.chdir(tmp_path)  # relative paths, as a user's script gives them (ASE alone mislinks pseudo_path)
    calc = DMGuessSiesta(model=water_model, label="siesta", directory="md", xc="CA", basis_set="DZP",
                         mesh_cutoff=200 * units.Ry, energy_shift=0.02 * units.Ry, pseudo_qualifier="",
                         pseudo_path=os.path.relpath(dataset("h2o") / "basis"), compare_baseline=True,
                         command=f"{siesta_command} < PREFIX.fdf > PREFIX.out",
                         fdf_arguments={"DM.Tolerance": "1.0d-5", "SCF.Mixer.Weight": 0.25,
                                        "SCF.Mixer.History": 6, "MaxSCFIterations": 200})
    atoms.calc = calc
    VelocityVerlet(atoms, 0.5 * units.fs).run(2)
    assert len(calc.history) == 3
    # The default guess: the plain prediction, later steps possibly corrected by the model's past errors.
    assert calc.history[0].guess == "ml" and all(r.dm_read and r.guess.startswith("ml") for r in calc.history)
    assert all(r.iterations_saved is not None and r.iterations_saved > 0 for r in calc.history)
    # the same answer from either start, and the record says so (it kept the baseline's iterations only)
    assert all(r.atomic_total_energy is not None and abs(r.energy_difference) < 1e-4 for r in calc.history)
    assert np.isfinite(atoms.get_forces()).all()


def test_an_scf_cut_off_from_the_ml_guess_is_run_again_from_the_atomic_guess(siesta_command, water_model, tmp_path):
    """One SCF iteration allowed and ``SCF.MustConverge F``: SIESTA stops unconverged from the ML guess, so the
    calculator runs the step again from SIESTA's atomic guess (which reads no DM), says why, and returns that
    run's results, as SIESTA alone would have."""
    import warnings

    from ase import Atoms, units

    from siesta_dmguess import DMGuessSiesta
    from siesta_dmguess.siesta.output import parse_output

    atoms = Atoms("OH2", positions=[[0, 0, 0], [0.97, 0, 0], [-0.25, 0.92, 0]], cell=[12] * 3, pbc=True)
    atoms.center()
    atoms.calc = DMGuessSiesta(model=water_model, guess="ml", label="siesta", directory=str(tmp_path), xc="CA",
                               basis_set="DZP", mesh_cutoff=200 * units.Ry, pseudo_qualifier="",
                               pseudo_path=str(dataset("h2o") / "basis"),
                               command=f"{siesta_command} < PREFIX.fdf > PREFIX.out",
                               fdf_arguments={"DM.Tolerance": "1.0d-5", "SCF.Mixer.Weight": 0.25,
                                              "SCF.Mixer.History": 6, "MaxSCFIterations": 1,
                                              "SCF.MustConverge": False})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        energy = atoms.get_potential_energy()
    record = atoms.calc.guess_record
    assert record.guess == "atomic"
    assert "SIESTA failed from the ml guess after 1 SCF iteration (the SCF did not converge)" in record.reason
    assert record.failed_scf_iterations == 1 and record.scf_iterations == 1  # the failed run's, then the rerun's
    assert any("rerun from its atomic guess" in str(w.message) for w in caught)
    out = parse_output(tmp_path / "siesta.out")  # the rerun's output: SIESTA's own start, cut off as well
    assert not out.dm_read_from_file and not out.converged and out.scf_iterations == 1
    assert energy == pytest.approx(out.total_energy_eV, abs=1e-3)


def test_trajectory_benchmark_compares_guesses_on_the_same_frames(siesta_command, water_model, tmp_path):
    """Three displaced frames of one molecule: every guess converges to the same energies; the history-based
    guesses start from a DM SIESTA reads, and ML + residual never needs more iterations than the atomic guess.
    A stopped benchmark started again continues where it stopped."""
    from siesta_dmguess.bench import run_trajectory_benchmark
    from siesta_dmguess.structure import read_structure

    root = dataset("h2o")
    rec = first_val_record(root)
    fdf = root / rec["id"] / "input.fdf"
    atoms = read_structure(fdf).atoms
    direction = np.random.default_rng(1).normal(size=atoms.positions.shape)
    frames = []
    for t in range(3):
        frame = atoms.copy()
        frame.positions += 0.01 * t * direction / np.abs(direction).max()
        frames.append(frame)
    calls = tmp_path / "calls.log"
    counting = tmp_path / "counting_siesta"  # the real SIESTA, each run logged
    counting.write_text(f"#!/bin/sh\necho run >> {calls}\nexec {siesta_command}\n")
    counting.chmod(0o755)
    report = run_trajectory_benchmark(frames, fdf, water_model, tmp_path, ("atomic", "reuse", "ml+residual"),
                                      command=str(counting), progress=False)
    assert report["all_converged"]
    assert max(v for v in report["max_abs_energy_difference_eV"].values() if v is not None) < 1e-4
    rows = report["per_frame"]
    assert all(r["reuse"]["dm_read"] and r["ml+residual"]["dm_read"] for r in rows[1:])
    assert all(r["ml+residual"]["scf_iterations"] <= r["atomic"]["scf_iterations"] for r in rows)
    assert report["scf_iterations"]["ml+residual"] < report["scf_iterations"]["atomic"]
    # Stopped in its last frame and started again, it runs only that frame, from histories rebuilt from the
    # frames before (ml+residual extrapolates from two of them), and gives the same counts.
    assert len(calls.read_text().split()) == 9 and report["reused"] == []
    for kept in (tmp_path / "trajectory" / "0002").glob("*/result.json"):
        kept.unlink()
    resumed = run_trajectory_benchmark(frames, fdf, water_model, tmp_path, ("atomic", "reuse", "ml+residual"),
                                       command=str(counting), progress=False)
    assert len(calls.read_text().split()) == 12 and resumed["reused"] == [0, 1]
    assert [{g: r[g]["scf_iterations"] for g in ("atomic", "reuse", "ml+residual")} for r in resumed["per_frame"]] \
        == [{g: r[g]["scf_iterations"] for g in ("atomic", "reuse", "ml+residual")} for r in rows]


def test_ml_guess_far_outside_the_training_data_is_no_worse(siesta_command, water_model, tmp_path):
    """Molecules rattled by 0.15 Å per coordinate, beyond even the widened training data's 0.12 Å (one of
    them, with an O-H bond squeezed to 0.57 Å, is flagged as novel): the guess must still not cost more
    iterations than the atomic guess, at the same energy."""
    from siesta_dmguess.bench import run_trajectory_benchmark
    from siesta_dmguess.predict import predict_density_matrix
    from siesta_dmguess.structure import Structure, read_structure

    root = dataset("h2o")
    rec = first_val_record(root)
    fdf = root / rec["id"] / "input.fdf"
    base = read_structure(fdf)
    rng = np.random.default_rng(7)
    frames = []
    for _ in range(3):
        frame = base.atoms.copy()
        frame.positions += rng.normal(0, 0.15, frame.positions.shape)
        frames.append(frame)
    novelty = [predict_density_matrix(Structure(f, base.labels), water_model).novelty for f in frames]
    assert max(novelty) > float(water_model.model.novelty_threshold)  # really outside the training data
    report = run_trajectory_benchmark(frames, fdf, water_model, tmp_path, ("atomic", "ml"),
                                      command=siesta_command, progress=False)
    assert report["all_converged"]
    assert max(v for v in report["max_abs_energy_difference_eV"].values() if v is not None) < 1e-4
    assert all(r["ml"]["dm_read"] for r in report["per_frame"])
    assert all(r["ml"]["scf_iterations"] <= r["atomic"]["scf_iterations"] for r in report["per_frame"])


def test_frames_far_outside_the_training_data_start_from_the_atomic_guess(siesta_command, water_model, tmp_path):
    """With a copy of the `water` model whose flag level is near zero, every frame is 'far' outside its training
    data: the trajectory benchmark (like the calculator) then runs `ml` from SIESTA's atomic guess, which gives
    the atomic guess's iterations and energy, and `ml+residual` from its history alone once there is one."""
    from siesta_dmguess.bench import run_trajectory_benchmark
    from siesta_dmguess.card import load_model, save_model
    from siesta_dmguess.structure import read_structure

    far = load_model("water")  # a fresh copy: the module's shipped model stays untouched
    far.model.novelty_threshold.fill_(1e-9)
    save_model(far.model, tmp_path / "far-water", {"name": "far-water"})
    root = dataset("h2o")
    fdf = root / first_val_record(root)["id"] / "input.fdf"
    first = read_structure(fdf).atoms
    second = first.copy()
    second.positions[1] += [0.02, 0.0, 0.0]
    report = run_trajectory_benchmark([first, second], fdf, load_model(tmp_path / "far-water"),
                                      tmp_path / "bench", ("atomic", "ml", "ml+residual", "extrapolation"),
                                      command=siesta_command, progress=False)
    row, then = report["per_frame"]
    assert "far outside the training data" in row["fallback"] and "far outside" in then["fallback"]
    for g in ("ml", "ml+residual"):
        assert row[g]["guess"] == "atomic" and not row[g]["dm_read"]
        assert row[g]["scf_iterations"] == row["atomic"]["scf_iterations"]
    # the next frame: `ml` again from the atomic guess, `ml+residual` from its history, as SIESTA's extrapolation
    assert then["ml"]["guess"] == "atomic" and then["ml"]["scf_iterations"] == then["atomic"]["scf_iterations"]
    assert then["ml+residual"]["guess"] == "extrapolation" and then["ml+residual"]["dm_read"]
    assert then["ml+residual"]["scf_iterations"] == then["extrapolation"]["scf_iterations"]
    assert then["ml+residual"]["scf_iterations"] < then["atomic"]["scf_iterations"]
    assert "| 0 (far: no ML prediction) |" in (tmp_path / "bench" / "bench_trajectory.md").read_text()
    # --force uses the refused prediction: SIESTA reads it
    forced = run_trajectory_benchmark([first], fdf, load_model(tmp_path / "far-water"), tmp_path / "forced",
                                      ("ml",), command=siesta_command, progress=False, force=True)
    assert forced["per_frame"][0]["ml"]["guess"] == "ml" and forced["per_frame"][0]["ml"]["dm_read"]
    assert "fallback" not in forced["per_frame"][0]


def test_ml_guess_for_a_compressed_water_box_is_no_worse(siesta_command, water_model, tmp_path):
    """A held-out water8 box with its molecules moved 4 % closer, each kept rigid (the training boxes have
    either the dataset's density or were scaled whole, bonds included): the guess is flagged as novel and must
    still not cost more than the atomic guess."""
    from siesta_dmguess.bench import run_trajectory_benchmark
    from siesta_dmguess.predict import predict_density_matrix
    from siesta_dmguess.structure import Structure, read_structure

    root = dataset("water8")
    rec = first_val_record(root)
    fdf = root / rec["id"] / "input.fdf"
    base = read_structure(fdf)
    box = base.atoms.copy()
    box.set_cell(box.cell * 0.96, scale_atoms=False)
    positions = box.get_positions()
    for o in np.flatnonzero(np.array(base.labels) == "O"):
        assert base.labels[o + 1:o + 3] == ["H", "H"]  # each O is followed by its two H (water8's layout)
        positions[o:o + 3] -= 0.04 * positions[o]
    box.set_positions(positions)
    assert predict_density_matrix(Structure(box, base.labels), water_model).out_of_distribution
    report = run_trajectory_benchmark([box], fdf, water_model, tmp_path, ("atomic", "ml"), command=siesta_command,
                                      progress=False)
    row = report["per_frame"][0]
    assert report["all_converged"] and row["ml"]["dm_read"]
    assert report["siesta"].split()[0] == siesta_command.split()[0]  # the report names the SIESTA that ran
    assert max(v for v in report["max_abs_energy_difference_eV"].values() if v is not None) < 1e-4
    assert row["ml"]["scf_iterations"] <= row["atomic"]["scf_iterations"]


def test_ml_guess_for_a_molecule_not_in_the_training_set_saves_iterations(siesta_command, tmp_path):
    """Acetaldehyde (CH3CHO, in ASE's G2 collection but not in the `g2` dataset) with `chno-molecules`: a new
    molecule, not a new conformer, must be read and save iterations at the same energy."""
    from ase.collections import g2

    from siesta_dmguess.bench import run_trajectory_benchmark
    from siesta_dmguess.card import list_shipped_models, load_model

    if "chno-molecules" not in list_shipped_models():
        pytest.skip("the shipped 'chno-molecules' model is not installed")
    root = dataset("g2")
    records = json.loads((root / "index.json").read_text())
    assert not any(r["name"] == "CH3CHO" for r in records)
    # Any held-out run with C, H and O serves as the settings template (its species block covers CH3CHO).
    fdf = next(root / r["id"] / "input.fdf" for r in records
               if r["split"] == "val" and {"C", "H", "O"} <= set(read_fdf_species(root / r["id"] / "input.fdf")))
    molecule = g2["CH3CHO"].copy()
    molecule.set_cell([12.0, 12.0, 12.0])
    molecule.center()
    report = run_trajectory_benchmark([molecule], fdf, load_model("chno-molecules"), tmp_path, ("atomic", "ml"),
                                      command=siesta_command, progress=False)
    row = report["per_frame"][0]
    assert report["all_converged"] and row["ml"]["dm_read"]
    assert max(v for v in report["max_abs_energy_difference_eV"].values() if v is not None) < 1e-4
    assert row["ml"]["scf_iterations"] < row["atomic"]["scf_iterations"]


def test_ml_plus_residual_with_k_points_keeps_its_history_across_supercells(siesta_command, tmp_path):
    """Bulk silicon with 4x4x4 k-points: the second frame's ML + residual guess combines SIESTA's converged DM
    (SIESTA's own supercell) with the predictions (the model's supercell); it must be read, converge to the same
    energy and beat the atomic guess."""
    from siesta_dmguess.bench import run_trajectory_benchmark
    from siesta_dmguess.card import list_shipped_models, load_model
    from siesta_dmguess.structure import read_structure

    if "silicon" not in list_shipped_models():
        pytest.skip("the shipped 'silicon' model is not installed")
    root = dataset("si8")
    fdf = root / first_val_record(root)["id"] / "input.fdf"
    start = read_structure(fdf).atoms
    moved = start.copy()
    moved.positions += np.random.default_rng(3).normal(0, 0.02, moved.positions.shape)
    report = run_trajectory_benchmark([start, moved], fdf, load_model("silicon"), tmp_path, ("atomic", "ml+residual"),
                                      command=siesta_command, progress=False)
    second = report["per_frame"][1]
    assert report["all_converged"] and second["ml+residual"]["dm_read"]
    assert max(v for v in report["max_abs_energy_difference_eV"].values() if v is not None) < 1e-4
    assert second["ml+residual"]["scf_iterations"] < second["atomic"]["scf_iterations"]


def read_fdf_species(fdf) -> list[str]:
    from siesta_dmguess.siesta.runner import species_labels

    return species_labels(fdf)


def run_example(name: str, pseudo_dir, siesta_command: str, cwd) -> tuple[str, list[tuple[str, int, int]]]:
    """Run ``examples/<name>`` as the README does; its output and each step's (guess, SCF iterations, atomic
    guess's iterations)."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / name
    done = subprocess.run([sys.executable, str(example), str(pseudo_dir)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "SIESTA_COMMAND": siesta_command}, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = re.findall(r"step \d+: guess (\S+), (\d+) SCF iterations \(atomic guess (\d+)\)", done.stdout)
    return done.stdout, [(guess, int(ml), int(atomic)) for guess, ml, atomic in steps]


def test_the_ase_md_example_runs_and_every_step_beats_the_atomic_guess(siesta_command, tmp_path):
    """examples/ase_md.py, as the README runs it: each MD step's SCF starts from the ML guess and needs fewer
    iterations than SIESTA's atomic guess."""
    _, steps = run_example("ase_md.py", dataset("h2o") / "basis", siesta_command, tmp_path)
    assert len(steps) == 4
    assert all(guess.startswith("ml") and ml < atomic for guess, ml, atomic in steps)


def test_the_ase_relaxation_example_changes_the_cell_and_every_step_beats_the_atomic_guess(siesta_command, tmp_path):
    """examples/ase_relax.py: a variable-cell relaxation of silicon with k-points; the cell shrinks towards the
    LDA lattice constant and each step's SCF from the ML guess (or ML + residual) needs fewer iterations."""
    import re

    output, steps = run_example("ase_relax.py", dataset("si8") / "basis", siesta_command, tmp_path)
    assert len(steps) >= 2 and any(guess == "ml+residual" for guess, _, _ in steps)
    assert all(guess.startswith("ml") and ml < atomic for guess, ml, atomic in steps)
    lengths = [float(x) for x in re.search(r"cell lengths \(Å\): (.*)", output).group(1).split()]
    assert all(x < 5.43 * 1.02 for x in lengths)


def test_a_molecule_in_siestas_automatic_cell_reads_the_ml_guess(siesta_command, water_model, tmp_path):
    """An fdf without a lattice runs in SIESTA's automatic cell: the DM predicted for the isolated molecule is
    read, saves iterations, and SIESTA converges to the same energy (a smaller box than the dataset's 12 Å)."""
    import re
    import shutil

    from siesta_dmguess.bench import bench_structure

    root = dataset("h2o")
    rec = first_val_record(root)
    text = (root / rec["id"] / "input.fdf").read_text()
    text = re.sub(r"LatticeConstant.*?\n%block LatticeVectors.*?%endblock LatticeVectors\n", "", text, flags=re.S)
    assert "Lattice" not in text
    (tmp_path / "data" / "0000").mkdir(parents=True)
    (tmp_path / "data" / "0000" / "input.fdf").write_text(text)
    shutil.copytree(root / "basis", tmp_path / "data" / "basis")
    result = bench_structure(tmp_path / "data" / "0000" / "input.fdf", tmp_path / "out", water_model,
                             command=siesta_command)
    ml, atomic = result.results["ml"], result.results["atomic"]
    assert "Automatic unit cell" in (tmp_path / "out" / "ml" / "siesta.out").read_text()
    assert ml.dm_read and ml.scf_iterations < atomic.scf_iterations
    assert abs(ml.total_energy_eV - atomic.total_energy_eV) < 1e-4
