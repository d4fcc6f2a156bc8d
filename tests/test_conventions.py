"""SIESTA <-> e3nn orbital conventions, checked against sisl's orbital functions and SIESTA's own DMs."""

import numpy as np
import pytest
import torch
from e3nn import o3
from scipy.spatial.transform import Rotation

from siesta_dmguess.conventions import convert_blocks, rotation_to_e3nn, shell_signs, to_e3nn_frame

from .conftest import dataset


def sisl_shell(l, points):
    """SIESTA-ordered real-space orbitals of one shell (sisl), evaluated at points: (N, 2l+1)."""
    import sisl

    r = np.linspace(0, 3, 300)
    radial = sisl.SphericalOrbital(l, (r, np.exp(-r**2)))
    return np.stack([sisl.AtomicOrbital(n=l + 1, l=l, m=m, spherical=radial).psi(points)
                     for m in range(-l, l + 1)], axis=1)


@pytest.mark.parametrize("l", [0, 1, 2, 3])
def test_siesta_orbitals_are_signed_e3nn_harmonics(l):
    rng = np.random.default_rng(l)
    pts = rng.normal(size=(64, 3))
    pts *= 0.7 / np.linalg.norm(pts, axis=1, keepdims=True)  # fixed radius: radial part is one constant
    siesta = sisl_shell(l, pts)
    e3nn = o3.spherical_harmonics(l, torch.tensor(to_e3nn_frame(pts)), normalize=True).numpy()
    scale = siesta / (e3nn * shell_signs(l))
    assert np.allclose(scale, scale.flat[0], rtol=1e-8, atol=0), "SIESTA orbital m != (-1)^m e3nn component m"


@pytest.mark.parametrize("l", [1, 2, 3])
def test_rotated_orbital_matches_wigner_d(l):
    """psi_m(R^T r) = sum_m' D_siesta[m', m] psi_m'(r), with D_siesta from e3nn's D and the sign rule."""
    rng = np.random.default_rng(10 + l)
    pts = rng.normal(size=(50, 3))
    rot = Rotation.random(random_state=l).as_matrix()
    d_e3nn = o3.Irrep(l, (-1) ** l).D_from_matrix(torch.tensor(rotation_to_e3nn(rot))).numpy()
    s = shell_signs(l)
    d_siesta = convert_blocks(d_e3nn, s, s)
    rotated = sisl_shell(l, pts @ rot)  # the orbital carried along by the rotation, psi(R^T r)
    # sisl evaluates angles through arccos: ~1e-7 noise; a wrong sign or order errs by ~0.1.
    assert np.allclose(rotated, sisl_shell(l, pts) @ d_siesta, atol=1e-6)


def _kabsch(a, b):
    """Rotation R with b ≈ a @ R.T (both centred)."""
    u, _, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    return (vt.T @ np.diag([1, 1, d]) @ u.T)


def rotate_dm_blocks(dm, labels, basis, rot):
    """Dense DM of an isolated molecule rotated by ``rot``: block_ij -> D_i block_ij D_j^T (SIESTA basis)."""
    from scipy.linalg import block_diag

    re3 = torch.tensor(rotation_to_e3nn(rot))
    mats = []
    for label in labels:
        shells = basis[label].shells
        d = [convert_blocks(o3.Irrep(s.l, (-1) ** s.l).D_from_matrix(re3).numpy(), shell_signs(s.l),
                            shell_signs(s.l)) for s in shells]
        mats.append(block_diag(*d))
    big = block_diag(*mats)
    dense = dm.tocsr(0).toarray()
    return big @ dense @ big.T


def test_rotations_dataset_maps_onto_siesta_within_grid_error():
    """Rotating the converged DM of *_rot0 reproduces SIESTA's DM of the other orientations."""
    from siesta_dmguess.data import load_run

    root = dataset("rotations")
    import json

    records = json.loads((root / "index.json").read_text())
    worst_mean, worst_max = 0.0, 0.0
    for ref in [r for r in records if r["name"].endswith("_rot0")]:
        st0, basis, dm0, _ = load_run(root / ref["id"])
        p0 = st0.atoms.get_positions() - st0.atoms.get_center_of_mass()
        for other in [r for r in records if r["name"].startswith(ref["name"][:-1]) and r is not ref]:
            st1, _, dm1, _ = load_run(root / other["id"])
            p1 = st1.atoms.get_positions() - st1.atoms.get_center_of_mass()
            rot = _kabsch(p0, p1)
            assert np.allclose(p0 @ rot.T, p1, atol=1e-4)
            predicted = rotate_dm_blocks(dm0, st0.labels, basis, rot)
            target = dm1.tocsr(0).toarray()
            stored = target != 0
            diff = np.abs(predicted - target)[stored]
            unrotated = np.abs(dm0.tocsr(0).toarray() - target)[stored].mean()
            worst_mean, worst_max = max(worst_mean, diff.mean()), max(worst_max, diff.max())
            assert diff.mean() < unrotated / 20  # the rule explains the change, not just noise
    print(f"rotations: mean |dD| <= {worst_mean:.1e}, max |dD| <= {worst_max:.1e}")
    assert worst_mean < 1e-4 and worst_max < 5e-3  # SIESTA's own grid error (shared/README.md)
