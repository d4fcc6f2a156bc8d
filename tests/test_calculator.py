"""The ASE calculator's guess logic (no SIESTA needed): ML DM written, or a fallback that says why."""

import warnings

import pytest
from ase import Atoms

from siesta_dmguess import DMGuessSiesta
from siesta_dmguess.card import save_model
from siesta_dmguess.dm import read_dm_orbital_count
from siesta_dmguess.errors import ModelCompatibilityError
from siesta_dmguess.model import DensityMatrixModel

from .conftest import small_config, water_molecule


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("calc") / "tiny"
    save_model(DensityMatrixModel(small_config()), out, {"name": "tiny"})
    return out


def calc(model_dir, tmp_path, **kw):
    return DMGuessSiesta(model=model_dir, label="siesta", directory=str(tmp_path), xc="CA", **kw)


def test_ml_guess_written_for_the_geometry(model_dir, tmp_path):
    c = calc(model_dir, tmp_path)
    c._write_guess(water_molecule())
    assert c._used == "ml" and c._prediction_s > 0
    assert read_dm_orbital_count(tmp_path / "siesta.DM") == 23


def test_uncovered_species_is_an_error_by_default(model_dir, tmp_path):
    nh3 = Atoms("NH3", positions=[[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], cell=[10] * 3, pbc=True)
    with pytest.raises(ModelCompatibilityError, match="'N'"):
        calc(model_dir, tmp_path)._write_guess(nh3)


def test_fallback_to_atomic_guess_says_why(model_dir, tmp_path):
    nh3 = Atoms("NH3", positions=[[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], cell=[10] * 3, pbc=True)
    c = calc(model_dir, tmp_path, fallback="atomic")
    with pytest.warns(UserWarning, match="atomic guess because .*'N'"):
        c._write_guess(nh3)
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


def test_spin_polarized_run_is_refused_or_falls_back(model_dir, tmp_path):
    with pytest.raises(ModelCompatibilityError, match="Spin collinear"):
        calc(model_dir, tmp_path, spin="collinear")._write_guess(water_molecule())
    c = calc(model_dir, tmp_path, spin="collinear", fallback="atomic")
    with pytest.warns(UserWarning, match="spin-unpolarized"):
        c._write_guess(water_molecule())
    assert c._used == "atomic" and not (tmp_path / "siesta.DM").exists()
