"""The overlap matrix computed from the basis: analytic Gaussians, rotations, and SIESTA's own S (.HSX)."""

import json

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from siesta_dmguess.basis import RADIAL_POINTS, Shell, SpeciesBasis
from siesta_dmguess.overlap import OverlapCalculator

from .conftest import dataset

RC = 7.0  # Å: the Gaussians below are < 1e-12 there, so the cutoff does not matter


def gaussian_basis(symbol, z, exponents_s, exponent_p=None):
    """A species whose shells are normalized Gaussians r^l exp(-a r^2) tabulated like an .ion.xml basis."""
    r = np.linspace(0.0, RC, RADIAL_POINTS)
    shells, tables = [], []
    for k, a in enumerate(exponents_s):
        shells.append(Shell(1, 0, k + 1, False, 0.0, RC))
        f = np.exp(-a * r**2)
        tables.append(tuple(f / np.sqrt(np.trapezoid(f**2 * r**2, r))))
    if exponent_p is not None:
        shells.append(Shell(2, 1, 1, False, 0.0, RC))
        f = r * np.exp(-exponent_p * r**2)
        tables.append(tuple(f / np.sqrt(np.trapezoid(f**2 * r**2, r))))
    return SpeciesBasis(symbol, z, tuple(shells), valence=1.0, radial_tables=tuple(tables))


def s_overlap(a, b, d):
    """<s_a(0)|s_b(d)> of normalized 3D Gaussians exp(-a r^2), exp(-b r^2)."""
    return (2 * np.sqrt(a * b) / (a + b)) ** 1.5 * np.exp(-a * b * d**2 / (a + b))


@pytest.fixture(scope="module")
def calc():
    return OverlapCalculator({"A": gaussian_basis("A", 1, [1.2, 3.0], 1.5), "B": gaussian_basis("B", 2, [0.8])})


def test_gaussian_s_overlaps_match_the_analytic_formula(calc):
    vectors = np.array([[0.0, 0.0, 0.0], [0.7, 0.0, 0.0], [0.3, -1.1, 0.8], [0.0, 2.5, 0.0]])
    blocks = calc.table("A", "B").blocks(vectors)
    for v, block in zip(vectors, blocks):
        d = np.linalg.norm(v)
        assert block[0, 0] == pytest.approx(s_overlap(1.2, 0.8, d), abs=2e-7)
        assert block[1, 0] == pytest.approx(s_overlap(3.0, 0.8, d), abs=2e-7)


def test_onsite_block_is_the_orbital_overlap(calc):
    block = calc.table("A", "A").blocks(np.zeros((1, 3)))[0]
    assert np.allclose(np.diag(block), 1.0, atol=1e-7)  # normalized orbitals
    assert block[0, 1] == pytest.approx(s_overlap(1.2, 3.0, 0.0), abs=2e-7)
    assert np.allclose(block[2:, :2], 0.0, atol=1e-12)  # s and p on one centre are orthogonal


def test_overlap_blocks_rotate_with_the_pair(calc):
    """S(R v) = D(R) S(v) D(R)^T with SIESTA's p order (y, z, x) and (-1)^m signs."""
    v = np.array([[0.4, 0.9, -0.5]])
    rot = Rotation.random(random_state=3).as_matrix()
    s0 = calc.table("A", "A").blocks(v)[0]
    s1 = calc.table("A", "A").blocks(v @ rot.T)[0]
    # SIESTA's p orbitals (m=-1,0,1) are -y, z, -x (real harmonics times (-1)^m): rotate them as vectors.
    p = np.array([[0, -1, 0], [0, 0, 1], [-1, 0, 0]], dtype=float)
    d = np.eye(5)
    d[2:, 2:] = p @ rot @ p.T
    assert np.allclose(s1, d @ s0 @ d.T, atol=1e-7)


def test_transposed_pair_is_the_transposed_block(calc):
    v = np.array([[0.3, -0.6, 1.2]])
    assert np.allclose(calc.table("A", "B").blocks(v)[0], calc.table("B", "A").blocks(-v)[0].T, atol=1e-9)


@pytest.mark.parametrize("name", ["h2o", "water8"])
def test_overlap_matches_siesta_hsx(name):
    """S from the basis reproduces SIESTA's S (.HSX) and the converged DM's electron count."""
    import warnings

    import sisl

    from siesta_dmguess.data import load_run, prepare_sample
    from siesta_dmguess.dm import flat_to_csr
    from siesta_dmguess.overlap import electron_count

    root = dataset(name)
    rec = next(r for r in json.loads((root / "index.json").read_text()) if r.get("has_hsx"))
    structure, basis, dm, hsx = load_run(root / rec["id"])
    sample = prepare_sample(structure, basis, sorted(basis), 3.0, dm)
    ours = OverlapCalculator(basis).flat(structure, sample.layout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sisl.get_sile(str(hsx)).read_overlap(geometry=dm.geometry).tocsr(0)
    diff = abs(flat_to_csr(sample.layout, ours, fold=True) - ref).max()
    print(f"{name}: max |S_ours - S_siesta| = {diff:.1e}")
    assert diff < 2e-5
    n_ref = dm.tocsr(0).multiply(ref).sum()
    values = np.zeros(sample.layout.size)  # the reference DM spread over our layout: one image per element
    seen = np.zeros(sample.target_values.size, bool)
    for k, t in enumerate(sample.target_index):
        if t >= 0 and not seen[t]:
            values[k], seen[t] = sample.target_values[t], True
    assert electron_count(sample.layout, values, ours, fold=True) == pytest.approx(n_ref, abs=1e-4)


def test_tabulation_grids_are_converged(monkeypatch):
    """Overlap blocks of every species pair of the shipped `water` basis (DZP O and H: l up to 2, integrals up to
    L = 4), at 40 random pair vectors within range, change by far less than S's distance from SIESTA's own S (6e-6)
    when both grid steps are halved."""
    import siesta_dmguess.overlap as overlap
    from siesta_dmguess.card import resolve_model
    from siesta_dmguess.model import ModelConfig

    config = json.loads((resolve_model("water") / "config.json").read_text())
    basis = ModelConfig.from_dict(config).species_basis()  # the shipped basis, without building the network
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(40, 3))
    vectors *= rng.uniform(0.0, 2 * max(b.max_radius for b in basis.values()), 40)[:, None] / np.linalg.norm(
        vectors, axis=1, keepdims=True)

    def blocks():
        calc = overlap.OverlapCalculator(basis)
        return np.concatenate([calc.table(a, b).blocks(vectors).ravel() for a in basis for b in basis])

    default = blocks()
    monkeypatch.setattr(overlap, "R_STEP", overlap.R_STEP / 2)
    monkeypatch.setattr(overlap, "N_K", 2 * overlap.N_K - 1)  # half the k step, Simpson needs an odd count
    finer = blocks()
    print(f"max |S - S(grids halved)| = {abs(default - finer).max():.1e} (max |S| {abs(default).max():.2f})")
    assert abs(default).max() > 0.1 and abs(default - finer).max() < 1e-8
    # and the radial transforms' range: twice K_MAX at the same k step (K_MAX 25 moved S by 5e-6)
    monkeypatch.setattr(overlap, "K_MAX", 2 * overlap.K_MAX)
    monkeypatch.setattr(overlap, "N_K", 2 * overlap.N_K - 1)
    wider = blocks()
    print(f"max |S - S(K_MAX doubled)| = {abs(finer - wider).max():.1e}")
    assert abs(finer - wider).max() < 1e-7


def test_overlap_blocks_end_where_the_orbitals_stop_overlapping():
    """Beyond r_a + r_b no orbital pair overlaps: the blocks are exactly zero there (the spline of the tabulated
    integral would leave a tail), and not zero just inside (a mutant without the cut passed the suite)."""
    from siesta_dmguess.card import resolve_model
    from siesta_dmguess.model import ModelConfig
    from siesta_dmguess.overlap import OverlapCalculator

    config = json.loads((resolve_model("water") / "config.json").read_text())
    basis = ModelConfig.from_dict(config).species_basis()
    calc = OverlapCalculator(basis)
    reach = basis["O"].max_radius + basis["H"].max_radius
    direction = np.array([0.36, 0.48, 0.8])
    outside = calc.table("O", "H").blocks(direction * (reach + 0.003))
    inside = calc.table("O", "H").blocks(direction * (reach - 0.05))
    assert np.all(outside == 0.0) and np.abs(inside).max() > 1e-8
