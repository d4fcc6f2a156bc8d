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
    rec = next(r for r in json.loads((root / "index.json").read_text()) if r["split"] == "val")
    result = bench_structure(root / rec["id"] / "input.fdf", tmp_path, water_model, command=siesta_command)
    ml, atomic = result.results["ml"], result.results["atomic"]
    assert ml.dm_read and not atomic.dm_read
    assert atomic.scf_iterations == rec["scf_iterations_atomic_guess"]  # same SIESTA, same baseline
    assert ml.scf_iterations < atomic.scf_iterations
    assert abs(ml.total_energy_eV - atomic.total_energy_eV) < 1e-4


def test_ase_calculator_md_steps(siesta_command, water_model, tmp_path):
    from ase import Atoms, units
    from ase.md.verlet import VelocityVerlet

    from siesta_dmguess import DMGuessSiesta

    atoms = Atoms("OH2", positions=[[0, 0, 0], [0.97, 0, 0], [-0.25, 0.92, 0]], cell=[12] * 3, pbc=True)
    atoms.center()
    atoms.set_velocities(np.random.default_rng(0).normal(0, 0.01, (3, 3)))
    calc = DMGuessSiesta(model=water_model, label="siesta", directory=str(tmp_path), xc="CA", basis_set="DZP",
                         mesh_cutoff=200 * units.Ry, energy_shift=0.02 * units.Ry, pseudo_qualifier="",
                         pseudo_path=str(dataset("h2o") / "basis"), compare_baseline=True,
                         command=f"{siesta_command} < PREFIX.fdf > PREFIX.out",
                         fdf_arguments={"DM.Tolerance": "1.0d-5", "SCF.Mixer.Weight": 0.25,
                                        "SCF.Mixer.History": 6, "MaxSCFIterations": 200})
    atoms.calc = calc
    VelocityVerlet(atoms, 0.5 * units.fs).run(2)
    assert len(calc.history) == 3
    assert all(r.dm_read and r.guess == "ml" for r in calc.history)
    assert all(r.iterations_saved is not None and r.iterations_saved > 0 for r in calc.history)
    assert np.isfinite(atoms.get_forces()).all()


def test_trajectory_benchmark_compares_guesses_on_the_same_frames(siesta_command, water_model, tmp_path):
    """Three displaced frames of one molecule: every guess converges to the same energies; the history-based
    guesses start from a DM SIESTA reads, and ML + residual never needs more iterations than the atomic guess."""
    from siesta_dmguess.bench import run_trajectory_benchmark
    from siesta_dmguess.structure import read_structure

    root = dataset("h2o")
    rec = next(r for r in json.loads((root / "index.json").read_text()) if r["split"] == "val")
    fdf = root / rec["id"] / "input.fdf"
    atoms = read_structure(fdf).atoms
    direction = np.random.default_rng(1).normal(size=atoms.positions.shape)
    frames = []
    for t in range(3):
        frame = atoms.copy()
        frame.positions += 0.01 * t * direction / np.abs(direction).max()
        frames.append(frame)
    report = run_trajectory_benchmark(frames, fdf, water_model, tmp_path, ("atomic", "reuse", "ml+residual"),
                                      command=siesta_command, progress=False)
    assert report["all_converged"]
    assert max(report["max_abs_energy_difference_eV"].values()) < 1e-4
    rows = report["per_frame"]
    assert all(r["reuse"]["dm_read"] and r["ml+residual"]["dm_read"] for r in rows[1:])
    assert all(r["ml+residual"]["scf_iterations"] <= r["atomic"]["scf_iterations"] for r in rows)
    assert report["scf_iterations"]["ml+residual"] < report["scf_iterations"]["atomic"]
