"""Shared fixtures: the reference datasets in ../shared (skipped when absent) and small in-code fixtures."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import e3nn
import numpy as np
import pytest
import torch

# The suite builds many networks and runs each briefly: e3nn's einsum optimization costs more time as they are
# built than it saves (it gives the same numbers: test_predict_errors.py builds both and compares). Tests that
# want it ask for it (load_model(optimize=True)).
e3nn.set_optimization_defaults(optimize_einsums=False)

# Under pytest-xdist (the README's `-n 2`) each worker runs torch on one thread: the workers, not torch's threads,
# share the cores, and the tests' small networks gain little from a second thread.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SIESTA_DMGUESS_SHARED", ROOT.parent / "shared"))
DATASETS = SHARED / "datasets"


def benchmark_script(name: str):
    """Import ``integration/benchmarks/<name>.py``, a study script outside the package. Its folder is on sys.path
    only while it is imported, which is when a script imports its siblings (``h_model`` imports
    ``h_noise_tolerance``)."""
    folder = str(ROOT / "integration" / "benchmarks")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(folder)


def dataset(name: str) -> Path:
    """Path of a shared dataset, or skip the test with the reason."""
    path = DATASETS / name
    if not (path / "index.json").is_file():
        pytest.skip(f"shared dataset {name!r} not found at {path} (set SIESTA_DMGUESS_SHARED)")
    return path


def water_basis():
    """DZP bases of H and O with SIESTA's shells, q0 and radii (Å), built in code: no files needed."""
    from siesta_dmguess.basis import Shell, SpeciesBasis

    h = SpeciesBasis("H", 1, (Shell(1, 0, 1, False, 1.0, 2.555), Shell(1, 0, 2, False, 0.0, 2.040),
                              Shell(2, 1, 1, True, 0.0, 2.555)), kb_radii=(0.722, 0.759, 0.778), valence=1.0,
                     mass=1.01)
    o = SpeciesBasis("O", 8, (Shell(2, 0, 1, False, 2.0, 1.749), Shell(2, 0, 2, False, 0.0, 1.328),
                              Shell(2, 1, 1, False, 4.0, 2.083), Shell(2, 1, 2, False, 0.0, 1.345),
                              Shell(3, 2, 1, True, 0.0, 2.083)), kb_radii=(0.685, 0.685, 0.766, 0.826),
                     valence=6.0, mass=16.0)
    return {"H": h, "O": o}


def small_config(basis=None, **kw):
    from siesta_dmguess.model import ModelConfig

    basis = basis or water_basis()
    species = sorted(basis, key=lambda l: basis[l].Z)
    opts = dict(hidden_irreps="8x0e + 4x1o + 2x1e + 2x2e + 2x2o", pair_irreps="4x0e + 2x1o + 2x1e + 2x2e + 2x2o",
                num_layers=2, radial_hidden=16, mp_cutoff=3.0)
    opts.update(kw)
    return ModelConfig(species=species, basis={k: b.to_dict() for k, b in basis.items()}, **opts)


@pytest.fixture
def float64():
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(prev)


def water_molecule(rng=None):
    from ase import Atoms

    rng = rng or np.random.default_rng(0)
    pos = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]]) + rng.normal(scale=0.03, size=(3, 3))
    return Atoms("OH2", positions=pos + 5.0, cell=np.eye(3) * 10.0, pbc=True)


def water_box(n=4, seed=0, box=5.0):
    """n randomly placed, randomly oriented water molecules in a small periodic box (images interact), no two
    atoms of different molecules closer than 1.4 Å, images included (``predict`` refuses atoms on one site)."""
    from ase import Atoms
    from ase.geometry import get_distances
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    cell = np.eye(3) * box + rng.normal(0, 0.1, (3, 3))
    mol = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    positions = np.zeros((0, 3))
    for k in range(n):
        for attempt in range(1000):  # draw again where the molecule would sit on another (or its image)
            rot = Rotation.random(random_state=seed * 100 + k + 1000 * attempt).as_matrix()
            placed = mol @ rot.T + rng.uniform(0, box, 3)
            if not len(positions) or get_distances(placed, positions, cell=cell, pbc=True)[1].min() > 1.4:
                break
        positions = np.concatenate([positions, placed])
    return Atoms("OHH" * n, positions=positions, cell=cell, pbc=True)


@pytest.fixture
def torch_thread_log(monkeypatch):
    """``log(module, name)`` wraps ``module.name`` so that each call appends torch's thread count to the returned
    list; torch runs on 2 threads during the test and gets its setting back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)

    def log(module, name: str) -> list[int]:
        real, seen = getattr(module, name), []

        def recording(*args, **kw):
            seen.append(torch.get_num_threads())
            return real(*args, **kw)

        monkeypatch.setattr(module, name, recording)
        return seen

    yield log
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shipped():
    """A shipped model by name, loaded once per test session (loading `water`, three networks, takes seconds)."""
    from siesta_dmguess.card import load_model

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_model(name)
        return cache[name]

    return get
