"""Analytic refinement of a predicted DM: exact electron count and idempotency (float64, synthetic systems)."""

from types import SimpleNamespace

import numpy as np
import pytest

from siesta_dmguess.refine import SINGLE_THREAD_ORBITALS, nearest_idempotent, refine

from .conftest import dataset

NO, N_OCC = 12, 4


def dense_layout(no=NO, images=1):
    """Every (row, column) element of a dense no x no matrix, repeated once per image along x."""
    rows, cols = np.meshgrid(np.arange(no), np.arange(no), indexing="ij")
    rows = np.tile(rows.ravel(), images)
    cols = np.concatenate([cols.ravel() + k * no for k in range(images)])
    return SimpleNamespace(rows=rows, cols=cols, no=no, nsc=np.array([images, 1, 1]),
                           orbitals_per_atom=np.array([no]))


def pure_state(seed=0, no=NO, n_occ=N_OCC):
    """A positive-definite S and an idempotent closed-shell D = 2 C Cᵀ with Cᵀ S C = 1."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(no, no)) * 0.15
    s = np.eye(no) + 0.5 * (a + a.T)
    assert np.linalg.eigvalsh(s).min() > 0.2
    c = rng.normal(size=(no, n_occ))
    c = c @ np.linalg.inv(np.linalg.cholesky(c.T @ s @ c)).T  # S-orthonormal occupied orbitals
    return s, 2 * c @ c.T


def folded(layout, flat):
    out = np.zeros((layout.no, layout.no))
    np.add.at(out, (layout.rows, layout.cols % layout.no), flat)
    return out


def symmetric_noise(seed, scale, no=NO):
    e = np.random.default_rng(seed).normal(size=(no, no)) * scale
    return 0.5 * (e + e.T)


def test_projection_gives_a_pure_state_with_the_right_count_and_a_smaller_error():
    layout = dense_layout()
    s, d0 = pure_state()
    noisy = d0 + symmetric_noise(1, 0.01)
    done = refine(layout, noisy.ravel(), s.ravel(), 2.0 * N_OCC, fold=True)
    d = folded(layout, done.values)
    assert done.applied == "idempotent" and done.occupation_gap > 0.9
    assert np.trace(d @ s) == pytest.approx(2.0 * N_OCC, abs=1e-10)
    assert np.allclose((d / 2) @ s @ (d / 2), d / 2, atol=1e-10)  # idempotent
    assert np.allclose(d, d.T, atol=1e-12)
    # To first order only occupied-empty rotations survive: the error must shrink, not just the count be fixed.
    assert np.abs(d - d0).mean() < 0.8 * np.abs(noisy - d0).mean()
    assert done.electrons_raw == pytest.approx(np.trace(noisy @ s))


def test_a_pure_state_is_left_unchanged():
    layout = dense_layout()
    s, d0 = pure_state(seed=3)
    done = refine(layout, d0.ravel(), s.ravel(), 2.0 * N_OCC, fold=True)
    assert np.allclose(folded(layout, done.values), d0, atol=1e-10)


def test_periodic_images_fold_onto_the_projected_cell_matrix():
    """A Γ-only DM split over two images folds, after refinement, to the refinement of the folded matrix."""
    s, d0 = pure_state(seed=4)
    noisy = d0 + symmetric_noise(5, 0.01)
    one = refine(dense_layout(), noisy.ravel(), s.ravel(), 2.0 * N_OCC, fold=True)
    two_layout = dense_layout(images=2)
    halves = np.concatenate([0.3 * noisy.ravel(), 0.7 * noisy.ravel()])
    s_halves = np.concatenate([0.5 * s.ravel(), 0.5 * s.ravel()])
    two = refine(two_layout, halves, s_halves, 2.0 * N_OCC, fold=True)
    assert two.applied == "idempotent"
    assert np.allclose(folded(two_layout, two.values), folded(dense_layout(), one.values), atol=1e-10)


@pytest.mark.parametrize("case, reason", [
    ("odd", "odd or fractional electron count"),
    ("kpoint", "its periodic images (a k-point run's)"),
    ("nogap", "no clear gap"),
])
def test_falls_back_to_charge_normalization_and_says_why(case, reason):
    layout = dense_layout()
    s, d0 = pure_state(seed=6)
    values, n, fold = d0.ravel() * 1.01, 2.0 * N_OCC, True
    if case == "odd":
        n = 2.0 * N_OCC - 1
    elif case == "kpoint":
        layout, fold = dense_layout(images=3), False
        values, s = np.concatenate([values, 0 * values, 0 * values]), np.concatenate([s.ravel()] * 3)
    elif case == "nogap":  # a half-filled "metal": occupations 0.5 around the Fermi level
        values = 0.5 * (d0 + pure_state(seed=7)[1]).ravel()
    s = np.asarray(s).ravel()
    done = refine(layout, values, s, n, fold=fold)
    assert done.applied == "charge" and reason in done.reason
    from siesta_dmguess.overlap import electron_count

    assert electron_count(layout, done.values, s, fold) == pytest.approx(n, abs=1e-10)


def test_none_leaves_values_and_unknown_mode_is_an_error():
    layout = dense_layout()
    s, d0 = pure_state()
    values = d0.ravel() * 1.05
    assert np.array_equal(refine(layout, values, s.ravel(), 2.0 * N_OCC, True, "none").values, values)
    with pytest.raises(ValueError, match="unknown refinement"):
        refine(layout, values, s.ravel(), 2.0 * N_OCC, True, "mcweeny")


def test_a_correction_steers_the_projection_and_zero_changes_nothing():
    """ΔH = -λ S P_ref S pulls the occupied space towards the reference; ΔH = 0 is the plain projection."""
    from siesta_dmguess.refine import nearest_idempotent

    s, d0 = pure_state(seed=1)
    noisy = d0 + symmetric_noise(9, 0.05)
    plain, gap = nearest_idempotent(noisy, s, N_OCC)
    zero, gap0 = nearest_idempotent(noisy, s, N_OCC, np.zeros_like(s))
    assert np.allclose(plain, zero, atol=1e-12) and gap == pytest.approx(gap0)
    steered, _ = nearest_idempotent(noisy, s, N_OCC, -5.0 * s @ (d0 / 2) @ s)
    assert np.abs(steered - d0).max() < 0.2 * np.abs(plain - d0).max()
    assert np.allclose((steered / 2) @ s @ (steered / 2), steered / 2, atol=1e-10)


def test_a_correction_that_closes_the_gap_is_dropped_for_the_plain_projection():
    """A ΔH that leaves no clear occupied space (as on structures unlike the training data) is not used."""
    layout = dense_layout()
    s, d0 = pure_state(seed=2)
    noisy = d0 + symmetric_noise(12, 0.01)
    plain = refine(layout, noisy.ravel(), s.ravel(), 2.0 * N_OCC, fold=True)
    closing = 2.0 * s @ (d0 / 2) @ s  # lifts the occupied levels onto the empty ones
    done = refine(layout, noisy.ravel(), s.ravel(), 2.0 * N_OCC, fold=True, correction=closing.ravel())
    assert done.applied == "idempotent"
    assert np.allclose(done.values, plain.values, atol=1e-12)
    helpful = refine(layout, noisy.ravel(), s.ravel(), 2.0 * N_OCC, fold=True, correction=(-closing).ravel())
    assert not np.allclose(helpful.values, plain.values, atol=1e-6)  # a ΔH that keeps the gap is used


def test_differentiable_projection_matches_numpy_and_its_gradient_is_exact():
    """The training loss's projection (torch, hand-written backward) is the one predict applies, and its
    gradient agrees with finite differences, also with a degenerate occupied space (where eigh's own fails)."""
    import torch

    from siesta_dmguess.refine import nearest_idempotent
    from siesta_dmguess.correction import projected_density_torch

    s, d0 = pure_state(seed=10)  # d0's occupied natural occupations are exactly degenerate (all 2)
    dh = symmetric_noise(11, 0.02)
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    out = projected_density_torch(t(d0), t(s), t(dh), N_OCC).numpy()
    assert np.allclose(out, nearest_idempotent(d0, s, N_OCC, dh)[0], atol=1e-10)
    x = t(dh).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: projected_density_torch(t(d0), t(s), x, N_OCC), (x,), eps=1e-6,
                                    atol=1e-6)


@pytest.mark.parametrize("name", ["h2o", "water8"])
def test_written_prediction_is_pure_and_closer_to_siesta_than_charge_scaling(name):
    """On held-out SIESTA runs, the shipped water model's written DM is idempotent with S from SIESTA's .HSX,
    holds the right electron count, and is closer to the converged DM than the charge-scaled prediction."""
    import json
    import warnings

    import sisl


    from siesta_dmguess.card import load_model
    from siesta_dmguess.data import find_fdf, load_run
    from siesta_dmguess.predict import predict_density_matrix

    root = dataset(name)
    rec = next(r for r in json.loads((root / "index.json").read_text()) if r.get("has_hsx") and r["split"] == "val")
    folder = root / rec["id"]
    loaded = load_model("water")
    _, _, ref, hsx = load_run(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = sisl.get_sile(str(hsx)).read_overlap(geometry=ref.geometry).tocsr(0).toarray()
    ref = ref.tocsr(0).toarray()
    def impurity(d):  # max |P S P - P|, P = D/2; a converged DM truncated to SIESTA's pattern is not exactly 0
        return np.abs((d / 2) @ s @ (d / 2) - d / 2).max()

    errors, impurities = {}, {}
    for mode in ("idempotent", "charge"):
        pred = predict_density_matrix(find_fdf(folder), loaded, refine=mode)
        assert pred.refinement == mode
        d = pred.density_matrix.tocsr(0).toarray()
        assert np.trace(d @ s) == pytest.approx(pred.electrons_expected, abs=1e-3)  # our S vs SIESTA's: ~1e-5
        errors[mode], impurities[mode] = np.abs(d - ref)[ref != 0].mean(), impurity(d)
    print(f"{name}: DM MAE idempotent {errors['idempotent']:.2e}, charge-scaled {errors['charge']:.2e}; "
          f"max |PSP - P| idempotent {impurities['idempotent']:.1e}, charge-scaled {impurities['charge']:.1e}, "
          f"SIESTA's converged DM {impurity(ref):.1e}")
    assert errors["idempotent"] < errors["charge"]
    assert impurities["idempotent"] < min(0.2 * impurities["charge"], 2 * impurity(ref) + 1e-5)


def test_the_projection_at_one_k_point_takes_a_complex_hermitian_dm():
    """At a k-point D(k) and S(k) are complex Hermitian: the projection must use the conjugate transpose
    (``integration/benchmarks/kpoint_projection.py``), else it returns a non-Hermitian, non-idempotent matrix."""
    from siesta_dmguess.refine import nearest_idempotent

    rng = np.random.default_rng(5)
    a = (rng.normal(size=(NO, NO)) + 1j * rng.normal(size=(NO, NO))) * 0.1
    s = np.eye(NO) + 0.5 * (a + a.conj().T)
    c = rng.normal(size=(NO, N_OCC)) + 1j * rng.normal(size=(NO, N_OCC))
    c = c @ np.linalg.inv(np.linalg.cholesky(c.conj().T @ s @ c)).conj().T
    d0 = 2 * c @ c.conj().T
    noise = 0.03 * (rng.normal(size=(NO, NO)) + 1j * rng.normal(size=(NO, NO)))
    projected, gap = nearest_idempotent(d0 + noise + noise.conj().T, s, N_OCC)
    assert np.allclose(projected, projected.conj().T, atol=1e-12)
    assert np.allclose((projected / 2) @ s @ (projected / 2), projected / 2, atol=1e-10)
    assert np.trace(projected @ s).real == pytest.approx(2 * N_OCC, abs=1e-10) and gap > 0.5
    assert np.abs(projected - d0).max() < np.abs(noise + noise.conj().T).max()


def test_a_k_point_trajectory_guess_is_charge_scaled_like_its_prediction():
    """ML + residual with k-points: the combined DM (image-keyed history layout) is scaled to N electrons, as the
    prediction it is built on was, instead of leaving SIESTA to renormalize it (which skips its first mixing)."""
    from ase.build import bulk

    from siesta_dmguess.dm import density_matrix_from_flat, to_image_keyed
    from siesta_dmguess.predict import predict_density_matrix
    from siesta_dmguess.structure import structure_from_atoms

    structure = structure_from_atoms(bulk("Si", "diamond", a=5.43, cubic=True))
    structure.fdf_settings = {"kgrid": True}
    pred = predict_density_matrix(structure, "silicon")
    assert not pred.folded and pred.refinement == "charge"
    keyed = to_image_keyed(pred.density_matrix)
    overlap = to_image_keyed(density_matrix_from_flat(structure, pred.sample_basis, pred.sample.layout, pred.overlap,
                                                      fold=False))
    assert keyed.multiply(overlap).sum() == pytest.approx(32.0, abs=1e-8)  # 8 Si, 4 valence electrons each
    off = pred.refined(1.07 * keyed)
    assert abs(off - keyed).max() < 1e-12


@pytest.mark.parametrize("no, expected_threads", [(NO, 1), (SINGLE_THREAD_ORBITALS, None)])
def test_small_projections_run_on_one_blas_thread(monkeypatch, no, expected_threads):
    """Below SINGLE_THREAD_ORBITALS the eigensolver must not compete with torch's spinning OpenMP workers."""
    import scipy.linalg
    from threadpoolctl import threadpool_info

    seen = []
    real_eigh = scipy.linalg.eigh

    def recording_eigh(*args, **kwargs):
        seen.append({pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"})
        return real_eigh(*args, **kwargs)

    monkeypatch.setattr(scipy.linalg, "eigh", recording_eigh)
    c = np.linalg.qr(np.random.default_rng(5).normal(size=(no, N_OCC)))[0]  # orthonormal occupied orbitals, S = 1
    nearest_idempotent(2 * c @ c.T, np.eye(no), N_OCC)
    outside = {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}
    assert len(seen) == 1
    assert seen[0] == ({1} if expected_threads == 1 else outside)  # large matrices keep every thread


def test_the_projection_takes_the_symmetric_part_of_d_and_s():
    """The natural orbitals are those of (D + Dᵀ)/2 and (S + Sᵀ)/2: an antisymmetric part (float noise of a
    model's DM, or of S from a file) changes nothing (a mutant that dropped the symmetrization passed the suite)."""
    rng = np.random.default_rng(7)
    a = rng.normal(size=(8, 8))
    s = np.eye(8) + 0.1 * (a + a.T)  # a well-conditioned overlap
    c = rng.normal(size=(8, 8))
    d = c @ c.T / 8
    antisymmetric = rng.normal(size=(8, 8))
    antisymmetric -= antisymmetric.T
    plain, gap = nearest_idempotent(d, s, 3)
    noisy, noisy_gap = nearest_idempotent(d + 1e-2 * antisymmetric, s + 1e-3 * antisymmetric, 3)
    assert np.abs(noisy - plain).max() < 1e-12 and noisy_gap == pytest.approx(gap, abs=1e-12)
    assert np.trace(plain @ s) == pytest.approx(6.0)  # and it is the projector of 3 doubly occupied states
    # the ΔH head's correction too (a mutant adding it unsymmetrized passed the suite)
    b = rng.normal(size=(8, 8))
    correction = 0.05 * (b + b.T)
    steered, _ = nearest_idempotent(d, s, 3, correction)
    noisy, _ = nearest_idempotent(d, s, 3, correction + 0.05 * antisymmetric)
    assert np.abs(noisy - steered).max() < 1e-10 and np.abs(steered - plain).max() > 1e-3
