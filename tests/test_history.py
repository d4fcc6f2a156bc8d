"""Starting DMs along a trajectory: SIESTA's extrapolation rule and the ML + residual guess."""

import numpy as np
import pytest
import scipy.sparse as sp

from siesta_dmguess.history import TrajectoryHistory, extrapolation_coefficients


def path(t):
    """Atom positions on a smooth (quadratic) path in time."""
    base = np.array([[0.0, 0.0, 0.0], [1.0, 0.2, 0.0], [0.1, 1.1, 0.3]])
    return base + t * np.array([0.1, -0.05, 0.02]) + t**2 * np.array([[0.01, 0.0, 0.0], [0.0, 0.02, 0.0],
                                                                      [0.0, 0.0, -0.01]])


def test_one_step_is_plain_reuse():
    assert np.allclose(extrapolation_coefficients([path(0)], path(1)), [1.0])


def test_linear_motion_gives_linear_extrapolation():
    line = lambda t: np.array([[0.0, 0, 0], [1, 0, 0]]) + t * np.array([0.1, 0.2, -0.1])  # noqa: E731
    assert np.allclose(extrapolation_coefficients([line(2), line(1)], line(3)), [2.0, -1.0])


def test_quadratic_path_uses_three_steps():
    c = extrapolation_coefficients([path(2), path(1), path(0)], path(3))
    assert np.isclose(c.sum(), 1.0)
    assert np.allclose(c, [3.0, -3.0, 1.0], atol=1e-8)


def matrix(values):
    return sp.csr_matrix(np.asarray(values, float))


def test_reuse_and_extrapolation_use_converged_dms():
    h = TrajectoryHistory(depth=3)
    assert h.guess("reuse", path(0)) is None  # nothing to reuse at the first step
    for t in range(3):
        h.push(path(t), matrix([[1.0 + t, 0.05 + 0.1 * t], [0.05 + 0.1 * t, 2.0]]))
    assert np.allclose(h.guess("reuse", path(3)).toarray(), [[3.0, 0.25], [0.25, 2.0]])
    # The DM changes linearly in t along a quadratic path: the extrapolation is exact for c = [3, -3, 1].
    assert np.allclose(h.guess("extrapolation", path(3)).toarray(), [[4.0, 0.35], [0.35, 2.0]])


def dm_with_coupling(t, coupled: bool):
    """A DM linear in t along a quadratic path; the off-diagonal element is stored only when ``coupled``."""
    return sp.csr_matrix(([1.0 + t, 0.4 - 0.1 * t, 0.4 - 0.1 * t, 2.0] if coupled else [1.0 + t, 2.0],
                          ([0, 0, 1, 1], [0, 1, 0, 1]) if coupled else ([0, 1], [0, 1])), shape=(2, 2))


def test_an_element_that_leaves_the_pattern_and_returns_is_extrapolated_from_the_steps_that_hold_it():
    """SIESTA drops a pair out of orbital range and takes it back a step later: read as zero in the step that
    lacked it, c = (3, -3, 1) would give three times its last value; from the two steps that hold it, it is exact."""
    h = TrajectoryHistory(depth=3)
    for t, coupled in zip(range(3), (True, False, True)):
        h.push(path(t), dm_with_coupling(t, coupled))
    guess = h.guess("extrapolation", path(3)).toarray()
    # Two steps on a curved path cannot reproduce it exactly: near the truth (0.1), far from 3 x 0.2 - 0 + 0.4.
    assert abs(guess[0, 1] - 0.1) < 0.02 and np.isclose(guess[0, 1], guess[1, 0])
    assert np.isclose(guess[0, 0], 4.0)  # held by every step: the three-step rule, exact


def test_an_element_new_to_the_pattern_takes_the_plain_prediction_in_ml_plus_residual():
    """No earlier step holds the returning element: its residual is unknown, so the guess there is the model's."""
    h = TrajectoryHistory(depth=3)
    error = matrix([[0.05, 0.0], [0.0, -0.05]])
    for t in range(3):
        scf = dm_with_coupling(t, coupled=False)
        h.push(path(t), scf, predicted=scf - error)
    predicted = dm_with_coupling(3, coupled=True) - error
    guess = h.guess("ml+residual", path(3), predicted=predicted).toarray()
    assert np.allclose(guess, dm_with_coupling(3, coupled=True).toarray())


def line(t):
    return np.array([[0.0, 0, 0], [1.0, 0, 0]]) + t * 0.05


def true_dm(t):
    return matrix([[1.0 + 0.3 * t + 0.02 * t**2, 0.2], [0.2, 1.5 - 0.1 * t]])


def test_ml_residual_cancels_the_model_error():
    """D_scf = D_ml + a fixed error: ML + residual is exact (and beats SIESTA's extrapolation of a curved DM)."""
    h = TrajectoryHistory(depth=2)
    error = matrix([[0.05, -0.02], [-0.02, 0.03]])
    for t in range(3):
        h.push(line(t), true_dm(t), true_dm(t) - error)
    assert h.weights == pytest.approx((0.0, 0.0, 1.0), abs=1e-9)
    guess = h.guess("ml+residual", line(3), true_dm(3) - error)
    assert np.allclose(guess.toarray(), true_dm(3).toarray())
    assert abs(h.guess("ml", line(3), true_dm(3) - error) - true_dm(3)).max() > 0.01  # plain ML keeps its error
    assert abs(h.guess("extrapolation", line(3)) - true_dm(3)).max() > 0.01


def test_a_useless_model_correction_is_weighted_down():
    """A model whose predicted changes are noise: the weight goes to the extrapolation and the guess stays there."""
    rng = np.random.default_rng(0)
    h = TrajectoryHistory(depth=2)
    for t in range(4):
        h.push(line(t), true_dm(t), matrix(rng.normal(size=(2, 2))))
    model_weight = h.weights[0] + h.weights[2]
    assert h.weights[1] > 0.8 and sum(h.weights) == pytest.approx(1.0)
    noisy = matrix(rng.normal(size=(2, 2)))
    gap = abs(h.guess("ml+residual", line(4), noisy) - h.guess("extrapolation", line(4))).max()
    assert gap <= model_weight * 10 + 1e-12


def test_a_model_at_its_noise_floor_keeps_its_own_prediction():
    """Small errors that change at random from step to step (SIESTA's grid): adding the previous steps' errors
    only adds noise, so the weight goes to the prediction itself, and the guess beats the full correction."""
    rng = np.random.default_rng(1)
    h = TrajectoryHistory(depth=2)
    noise = lambda: matrix(1e-3 * rng.normal(size=(2, 2)) * [[1, 1], [1, 1]])  # noqa: E731
    for t in range(5):
        h.push(line(t), true_dm(t), true_dm(t) + noise())
    assert h.weights[0] > 0.5
    predicted = true_dm(5) + noise()
    guess = h.guess("ml+residual", line(5), predicted)
    extrapolated, correction = h._parts(line(5), predicted)
    full = extrapolated + correction
    assert abs(guess - true_dm(5)).max() < abs(full - true_dm(5)).max()


def test_weights_that_fail_on_the_next_step_give_way_to_the_plain_prediction():
    """Held-out check: a model error that stays put for one step (the fit then trusts the full correction) and
    flips sign on the next: the full correction, tried on that step, is worse than the plain prediction, so the
    next guess is the plain prediction, not a fit to one noisy step."""
    h = TrajectoryHistory(depth=1)
    error = matrix([[0.05, -0.02], [-0.02, 0.03]])
    h.push(line(0), true_dm(0), true_dm(0) + error)
    h.push(line(1), true_dm(1), true_dm(1) + error)
    assert h.weights == pytest.approx((0.0, 0.0, 1.0), abs=1e-9)  # the first fit, nothing to check it on yet
    h.push(line(2), true_dm(2), true_dm(2) - error)
    assert h.weights == (1.0, 0.0, 0.0)
    predicted = true_dm(3) + 0.5 * error
    assert np.allclose(h.guess("ml+residual", line(3), predicted).toarray(), predicted.toarray())


def test_a_fit_that_failed_its_held_out_step_is_not_used_even_when_it_changed():
    """The held-out check, where the new fit is not the plain prediction anyway: a DM that barely changes (the
    extrapolation alone fits) and a model error that flips sign on the last step. The fit then says (0, 1, 0), but
    the full correction failed on that step, so the weights are the plain prediction's."""
    def slow(t):
        return matrix([[1.0 + 1e-4 * t, 0.2], [0.2, 1.5]])

    h = TrajectoryHistory(depth=1)
    error = matrix([[0.05, -0.02], [-0.02, 0.03]])
    h.push(line(0), slow(0), slow(0) + error)
    h.push(line(1), slow(1), slow(1) + error)
    h.push(line(2), slow(2), slow(2) - error)
    assert h.fitted == pytest.approx((0.0, 1.0, 0.0), abs=1e-6) and h.weights == (1.0, 0.0, 0.0)


def test_the_density_inner_product_is_the_trace_of_both_errors_times_s():
    """<A, B> = Tr[A S B S], not Tr[A B S S]: they differ unless the errors commute with S (the earlier test's
    errors were eigenvectors of S)."""
    from siesta_dmguess.history import error_gram

    overlap = np.array([[1.0, 0.3, 0.1], [0.3, 1.0, 0.2], [0.1, 0.2, 1.0]])
    e = np.random.default_rng(0).normal(size=(3, 3))
    e = e + e.T
    gram = error_gram([sp.csr_matrix(e)], sp.csr_matrix((3, 3)), sp.csr_matrix(overlap))
    assert gram[0, 0] == pytest.approx(np.trace(e @ overlap @ e @ overlap), rel=1e-12)
    assert abs(gram[0, 0] - np.trace(e @ e @ overlap @ overlap)) > 0.1


def test_a_prediction_of_another_pattern_than_the_history_is_used_plainly_once_weights_are_fitted():
    """A frame whose prediction has another shape than the history's DMs (an atom's orbitals changed): the guess
    is the prediction itself, not None (no start at all)."""
    h = TrajectoryHistory(depth=2)
    error = matrix([[0.05, -0.02], [-0.02, 0.03]])
    for t in range(3):
        h.push(line(t), true_dm(t), true_dm(t) + error)
    assert not h.uses_plain_prediction()
    other = matrix(np.eye(3))
    assert np.array_equal(h.guess("ml+residual", line(3), other).toarray(), np.eye(3))


def test_a_prediction_already_within_the_grid_noise_is_kept_even_when_a_correction_would_fit():
    """A model error that stays put (the full correction would cancel it) but is tiny: below PLAIN_BELOW
    (relative to the converged DM) the next guess is the plain prediction; the same error ten thousand times
    larger is corrected. SIESTA's grid noise, not the model, sets the error there (h2o MD in the README)."""
    from siesta_dmguess.history import PLAIN_BELOW

    shape = matrix([[0.05, -0.02], [-0.02, 0.03]])
    for scale, corrected in ((1e-4, False), (1.0, True)):
        h = TrajectoryHistory(depth=2)
        error = scale * shape
        assert h.uses_plain_prediction()  # no history: the first guess is the prediction
        h.push(line(0), true_dm(0), true_dm(0) + error)
        assert h.uses_plain_prediction() != corrected  # the gate applies from the first finished step on
        for t in range(1, 3):
            h.push(line(t), true_dm(t), true_dm(t) + error)
        relative = sp.linalg.norm(error) / sp.linalg.norm(true_dm(2))
        assert (relative < PLAIN_BELOW) != corrected
        predicted = true_dm(3) + error
        guess = h.guess("ml+residual", line(3), predicted)
        if corrected:
            assert h.weights == pytest.approx((0.0, 0.0, 1.0), abs=1e-9)
            assert np.allclose(guess.toarray(), true_dm(3).toarray())
        else:
            assert h.weights == (1.0, 0.0, 0.0)
            assert np.allclose(guess.toarray(), predicted.toarray())


def test_with_the_overlap_the_weights_follow_density_errors_not_element_errors():
    """An error along a near-null direction of S is large element by element but barely changes the density:
    with S the Gram matrix is Tr[(ΔD S)²] (checked against dense algebra) and prefers that candidate."""
    from siesta_dmguess.history import error_gram, simplex_least_squares

    eps = 0.01
    overlap = np.array([[1.0, 1.0 - eps], [1.0 - eps, 1.0]])  # near-null direction (1, -1), eigenvalue eps
    target = matrix([[1.0, 0.4], [0.4, 0.8]])
    near_null = 1.0 * np.outer([1, -1], [1, -1])  # element error 2, density error 2 eps
    dense = 0.3 * np.outer([1, 1], [1, 1])  # element error 0.6, density error 0.6 (2 - eps)
    candidates = [target + matrix(near_null), target + matrix(dense)]
    gram = error_gram(candidates, target, matrix(overlap))
    for k, e in enumerate((near_null, dense)):
        assert gram[k, k] == pytest.approx(np.trace(e @ overlap @ e @ overlap))
    assert simplex_least_squares(error_gram(candidates, target))[1] > 0.5  # element-wise: the dense error wins
    assert simplex_least_squares(gram)[0] > 0.99  # density-weighted: the near-null error wins


def test_simplex_least_squares_finds_the_best_affine_combination():
    from siesta_dmguess.history import error_gram, simplex_least_squares

    a, b, c = matrix([[1.0, 0.0]]), matrix([[0.0, 1.0]]), matrix([[5.0, 5.0]])
    # The target is inside the simplex: exact weights.
    inside = error_gram([a, b, c], 0.5 * a + 0.3 * b + 0.2 * c)
    assert simplex_least_squares(inside) == pytest.approx((0.5, 0.3, 0.2))
    # Outside it: the nearest point on its boundary (here the a-b edge), weights still >= 0 and summing to 1.
    x = simplex_least_squares(error_gram([a, b, c], matrix([[0.2, 0.2]])))
    assert x[2] == pytest.approx(0.0, abs=1e-12) and x[0] == pytest.approx(0.5) and sum(x) == pytest.approx(1.0)


def test_ml_guesses_need_the_prediction_and_unknown_kinds_fail():
    h = TrajectoryHistory()
    with pytest.raises(ValueError, match="prediction"):
        h.guess("ml+residual", path(0))
    with pytest.raises(ValueError, match="unknown guess"):
        h.guess("magic", path(0))
    with pytest.raises(ValueError, match="depth"):
        TrajectoryHistory(depth=0)


def test_a_different_system_restarts_the_history():
    h = TrajectoryHistory()
    h.push(path(0), matrix(np.eye(2)))
    h.push(path(1)[:2], matrix(np.eye(3)))
    assert len(h) == 1
    ml = matrix(np.eye(4))
    assert h.guess("ml+residual", path(2), ml) is ml or np.allclose(h.guess("ml+residual", path(2), ml).toarray(),
                                                                     np.eye(4))


def periodic_dm(nsc, elements):
    """A 2-atom, 1-orbital-per-atom sisl DM in a 3 Å cubic cell with supercell ``nsc``; ``elements`` maps
    (row, column orbital, image offset) to a value."""
    import sisl

    geometry = sisl.Geometry([[0, 0, 0], [1.5, 0, 0]], sisl.Atom(1, R=2.5), lattice=sisl.Lattice(3.0, nsc=nsc))
    dm = sisl.DensityMatrix(geometry)
    for (i, j, shift), value in elements.items():
        dm[i, j + geometry.lattice.sc_index(shift) * geometry.no] = value
    return dm


# One element per kind: on-site, in-cell pair, and pairs through the +x and -x images.
ELEMENTS = {(0, 0, (0, 0, 0)): 1.0, (0, 1, (0, 0, 0)): 0.3, (1, 0, (0, 0, 0)): 0.3,
            (1, 0, (1, 0, 0)): 0.2, (0, 1, (-1, 0, 0)): 0.2}


def test_image_keyed_dms_do_not_depend_on_the_supercell_they_came_in():
    """k-point runs: SIESTA writes its own supercell and ours can differ or change between steps; the history
    compares elements by (row, column orbital, image offset), so the same DM in nsc 3x1x1 and 5x3x1 is one matrix."""
    from siesta_dmguess.dm import from_image_keyed, to_image_keyed

    small, large = periodic_dm([3, 1, 1], ELEMENTS), periodic_dm([5, 3, 1], ELEMENTS)
    assert (to_image_keyed(small) != to_image_keyed(large)).nnz == 0
    # Back onto a geometry without images: the supercell is widened to hold every image, elements kept.
    back = from_image_keyed(to_image_keyed(large), small.geometry.copy())
    assert list(back.geometry.lattice.nsc) == [3, 1, 1]
    for (i, j, shift), value in ELEMENTS.items():
        assert back[i, j + back.geometry.lattice.sc_index(shift) * 2] == pytest.approx(value)
    # A folded (Γ-only) DM stays the plain (no, no) matrix.
    assert to_image_keyed(periodic_dm([1, 1, 1], {(0, 0, (0, 0, 0)): 1.0})).shape == (2, 2)


def test_extrapolation_of_k_point_dms_whose_supercells_differ():
    from siesta_dmguess.dm import from_image_keyed, to_image_keyed

    line = lambda t: np.array([[0.0, 0, 0], [1.5, 0, 0]]) + t * np.array([0.05, 0.0, 0.0])  # noqa: E731
    h = TrajectoryHistory(depth=2)
    h.push(line(0), to_image_keyed(periodic_dm([3, 1, 1], ELEMENTS)))
    h.push(line(1), to_image_keyed(periodic_dm([5, 1, 1], {k: 2 * v for k, v in ELEMENTS.items()})))
    guess = from_image_keyed(h.guess("extrapolation", line(2)), periodic_dm([1, 1, 1], {}).geometry)
    for (i, j, shift), value in ELEMENTS.items():  # linear extrapolation 2 * D(1) - D(0) = 3 * D(0)
        assert guess[i, j + guess.geometry.lattice.sc_index(shift) * 2] == pytest.approx(3 * value)


@pytest.mark.parametrize("nsc", [[1, 1, 1], [3, 1, 1]])
def test_a_guess_keeps_every_diagonal_element_in_the_pattern_siesta_reads(tmp_path, nsc):
    """An orbital whose population is exactly zero (a d orbital symmetry leaves empty) has no element left after
    the history's arithmetic; the DM written for SIESTA still holds its diagonal element (0), so sisl has none to
    add (it would, with a warning) and the other elements are as they were."""
    import warnings

    import sisl

    from siesta_dmguess.dm import from_image_keyed, to_image_keyed, write_density_matrix

    elements = {k: v for k, v in ELEMENTS.items() if nsc[0] > 1 or k[2] == (0, 0, 0)}
    elements.pop((0, 0, (0, 0, 0)))  # orbital 0 empty: no diagonal element stored
    keyed = to_image_keyed(periodic_dm(nsc, elements))
    assert keyed[0, 0] == 0 and 0 not in keyed[0].indices
    dm = from_image_keyed(keyed, periodic_dm(nsc, {}).geometry)
    csr = dm.tocsr(0).tocsr()
    assert all(i in csr.indices[csr.indptr[i]:csr.indptr[i + 1]] for i in range(dm.no)) and csr[0, 0] == 0
    for (i, j, shift), value in elements.items():
        assert dm[i, j + dm.geometry.lattice.sc_index(shift) * 2] == pytest.approx(value)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sisl.SislWarning)
        write_density_matrix(dm, tmp_path / "siesta.DM")


def _keyed_dm(positions, cell, cutoff=6.0):
    """An image-keyed DM (dm.to_image_keyed's layout, one orbital per atom) whose element between atom i and the
    image R of atom j is exp(-distance): a smooth function of where the atoms are, keyed as SIESTA keys it."""
    import itertools

    from siesta_dmguess.dm import HISTORY_REACH

    no, width = len(positions), 2 * HISTORY_REACH + 1
    rows, cols, vals = [], [], []
    for i, j in itertools.product(range(no), repeat=2):
        for shift in itertools.product((-1, 0, 1), repeat=3):
            d = np.linalg.norm(positions[j] + np.array(shift) @ cell - positions[i])
            if d < cutoff:
                key = np.ravel_multi_index(tuple(np.array(shift) + HISTORY_REACH), (width,) * 3)
                rows.append(i), cols.append(key * no + j), vals.append(np.exp(-d))
    return sp.csr_matrix((vals, (rows, cols)), shape=(no, no * width**3))


def test_a_trajectory_wrapped_into_its_cell_is_extrapolated_as_the_unwrapped_one():
    """An MD code that wraps atoms into the cell makes one jump by a lattice vector between frames. The history
    follows the atom (cell and each orbital's atom given): the extrapolated DM is the unwrapped trajectory's, its
    images re-keyed to where the atom now is; without them it extrapolated a 5 Å jump."""
    from siesta_dmguess.dm import shift_image_keys

    cell = np.diag([5.0, 5.0, 5.0])
    frames = [np.array([[1.0, 1.0, 1.0], [4.4 + 0.3 * t, 1.2, 0.9 + 0.05 * t]]) for t in range(4)]  # crosses x = 5
    wrapped = [f.copy() for f in frames]
    for f in wrapped:
        f[:, 0] %= 5.0
    assert wrapped[3][1, 0] < 1.0 < wrapped[1][1, 0]
    plain, followed, blind = (TrajectoryHistory(3) for _ in range(3))
    for t in range(3):
        plain.push(frames[t], _keyed_dm(frames[t], cell))
        followed.push(wrapped[t], _keyed_dm(wrapped[t], cell), cell=cell, orbital_atom=[0, 1])
        blind.push(wrapped[t], _keyed_dm(wrapped[t], cell))
    expected = shift_image_keys(plain.guess("extrapolation", frames[3]), np.array([[0, 0, 0], [1, 0, 0]]))
    got = followed.guess("extrapolation", wrapped[3], cell=cell)
    assert abs(got - expected).max() < 1e-12 and expected.nnz == got.nnz
    truth = _keyed_dm(wrapped[3], cell)  # the frame's own DM: far closer than the extrapolated jump
    assert 3 * abs(got - truth).max() < abs(blind.guess("extrapolation", wrapped[3]) - truth).max()
    # A folded (Γ-only) DM needs no re-keying, only the positions: the same coefficients as unwrapped.
    fold = [sp.csr_matrix(np.array([[1.0, 0.1 * t], [0.1 * t, 1.0]])) for t in range(3)]
    plain, followed = TrajectoryHistory(3), TrajectoryHistory(3)
    for t in range(3):
        plain.push(frames[t], fold[t])
        followed.push(wrapped[t], fold[t], cell=cell)
    assert abs(followed.guess("extrapolation", wrapped[3], cell=cell)
               - plain.guess("extrapolation", frames[3])).max() < 1e-12
