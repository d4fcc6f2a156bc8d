"""The spin-polarized starts of ``integration/benchmarks/spin_start.py`` (why such runs are refused):
the two-spin DM it writes and the moment it reads back from SIESTA's output."""

import numpy as np
import pytest

from siesta_dmguess.dm import check_dm_file, write_density_matrix
from siesta_dmguess.predict import predict_density_matrix

from .conftest import ROOT, benchmark_script


@pytest.fixture(scope="module")
def spin_start():
    return benchmark_script("spin_start")


@pytest.fixture(scope="module")
def water_prediction():
    return predict_density_matrix(ROOT / "examples" / "water.xyz", "water")


def test_two_spin_dm_halves_the_prediction_and_adds_the_atomic_moments(spin_start, water_prediction, tmp_path):
    total = water_prediction.density_matrix.tocsr(0).toarray()
    unpolarized = spin_start.two_spin_dm(water_prediction, 0.0)
    up, down = (unpolarized.tocsr(s).toarray() for s in range(2))
    np.testing.assert_allclose(up, down)
    np.testing.assert_allclose(up + down, total)
    seeded = spin_start.two_spin_dm(water_prediction, 1.0)
    up, down = (seeded.tocsr(s).toarray() for s in range(2))
    np.testing.assert_allclose(up + down, total)  # the seed moves no charge
    magnetization = up - down
    assert np.count_nonzero(magnetization - np.diag(np.diag(magnetization))) == 0  # on-site diagonal only
    # SIESTA's atomic guess: every orbital takes min(q0, 1) up; O's 2s² 2p⁴ gives 2 unpaired, each H 1
    assert np.trace(magnetization) == pytest.approx(4.0)
    path = tmp_path / "guess.DM"
    write_density_matrix(seeded, path)
    assert check_dm_file(path) == (total.shape[0], 2)  # a .DM with two spins, as SIESTA reads it


def test_spin_moment_is_the_last_one_siesta_printed(spin_start, tmp_path):
    out = tmp_path / "siesta.out"
    out.write_text("     spin moment: S , {S} =    4.00000       0.0       0.0   4.00000\n"
                   "     spin moment: S , {S} =   -0.00012       0.0       0.0  -0.00012\n")
    assert spin_start.spin_moment(out) == pytest.approx(-0.00012)
    out.write_text("no spin here\n")
    assert spin_start.spin_moment(out) is None
