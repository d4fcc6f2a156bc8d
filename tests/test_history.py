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
        h.push(path(t), matrix([[1.0 + t, 0.1 * t], [0.1 * t, 2.0]]))
    assert np.allclose(h.guess("reuse", path(3)).toarray(), [[3.0, 0.2], [0.2, 2.0]])
    # The DM changes linearly in t along a quadratic path: the extrapolation is exact for c = [3, -3, 1].
    assert np.allclose(h.guess("extrapolation", path(3)).toarray(), [[4.0, 0.3], [0.3, 2.0]])


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
    assert h.correction_weight == pytest.approx(1.0)
    guess = h.guess("ml+residual", line(3), true_dm(3) - error)
    assert np.allclose(guess.toarray(), true_dm(3).toarray())
    assert abs(h.guess("ml", line(3), true_dm(3) - error) - true_dm(3)).max() > 0.01  # plain ML keeps its error
    assert abs(h.guess("extrapolation", line(3)) - true_dm(3)).max() > 0.01


def test_a_useless_model_correction_is_weighted_down():
    """A model whose predicted changes are noise: the weight drops and the guess stays near the extrapolation."""
    rng = np.random.default_rng(0)
    h = TrajectoryHistory(depth=2)
    for t in range(4):
        h.push(line(t), true_dm(t), matrix(rng.normal(size=(2, 2))))
    assert h.correction_weight < 0.2
    noisy = matrix(rng.normal(size=(2, 2)))
    gap = abs(h.guess("ml+residual", line(4), noisy) - h.guess("extrapolation", line(4))).max()
    assert gap <= h.correction_weight * 10 + 1e-12


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
