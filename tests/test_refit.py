"""Tests of chanprune.refit: least squares from statistics vs dense references."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from _planted import dense_design, planted_conv

from chanprune.exceptions import SingularGramWarning
from chanprune.refit import least_squares_refit, reconstruction_error
from chanprune.stats import LayerStats


@pytest.mark.parametrize("seed", range(4))
def test_refit_equals_lstsq_on_raw_samples(seed):
    X, Y, *_ = planted_conv(seed, noise=0.3, bias=1.5)
    kept = np.array([0, 2, 3, 7, 9])
    m = LayerStats.from_samples(X, Y).moments()
    weight, bias = least_squares_refit(m, kept)
    D = dense_design(X, kept)
    ref, *_ = np.linalg.lstsq(D, Y, rcond=None)  # (d_kept + 1, n)
    np.testing.assert_allclose(weight, ref[:-1].T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(bias, ref[-1], rtol=1e-8, atol=1e-10)
    # The error formula from statistics equals the error on the samples.
    direct = float(((Y - D @ ref) ** 2).sum())
    assert reconstruction_error(m, kept, weight, bias) == pytest.approx(direct, rel=1e-8)


def test_error_formula_for_arbitrary_weights():
    X, Y, W, b, _ = planted_conv(7, noise=0.1)
    kept = np.array([1, 2, 8])
    m = LayerStats.from_samples(X, Y).moments()
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 27))
    bias = rng.normal(size=6)
    pred = X[:, kept].reshape(len(X), -1) @ w.T + bias
    assert reconstruction_error(m, kept, w, bias) == pytest.approx(
        float(((Y - pred) ** 2).sum()), rel=1e-10
    )


def test_planted_support_is_reconstructed_exactly():
    X, Y, _, _, support = planted_conv(8, bias=0.7)
    m = LayerStats.from_samples(X, Y).moments()
    weight, bias = least_squares_refit(m, support)
    # The formula cancels terms of size ||Y||^2: exact to ~eps relative, not absolutely.
    assert reconstruction_error(m, support, weight, bias) / m.yty < 1e-12
    np.testing.assert_allclose(bias, 0.7, atol=1e-10)


def test_ridge_equals_dense_ridge_with_free_intercept():
    X, Y, *_ = planted_conv(9, noise=0.5)
    kept = np.array([0, 1, 5])
    m = LayerStats.from_samples(X, Y).moments()
    ridge = 0.05
    weight, bias = least_squares_refit(m, kept, ridge=ridge)
    D = dense_design(X, kept)
    gram = D.T @ D
    # The ridge's scale is the whole layer's, every channel, not the kept ones'.
    full = X.reshape(X.shape[0], -1)
    penalty = ridge * np.mean((full**2).sum(axis=0))
    reg = np.diag(np.r_[np.full(D.shape[1] - 1, penalty), 0.0])  # intercept not shrunk
    ref = np.linalg.solve(gram + reg, D.T @ Y)
    np.testing.assert_allclose(weight, ref[:-1].T, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bias, ref[-1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rounding", [0.0, 1e-15])
def test_singular_system_warns_and_returns_min_norm_solution(rounding):
    X, Y, *_ = planted_conv(10, noise=0.2)
    X = X.copy()
    X[:, 3] = X[:, 2]  # channel 3 duplicates channel 2: the Gram is singular
    kept = np.array([2, 3, 6])
    m = LayerStats.from_samples(X, Y).moments()
    if rounding:
        # Another BLAS sums the Gram in another order: its null direction then holds
        # rounding noise instead of zero (seen on a GPU machine's numpy), which must not
        # leak into the solution.
        noise = np.random.default_rng(0).standard_normal(m.xtx.shape)
        xtx = m.xtx + rounding * np.abs(m.xtx).max() * (noise + noise.T)
        m = dataclasses.replace(m, xtx=xtx)
    with pytest.warns(SingularGramWarning, match="singular"):
        weight, bias = least_squares_refit(m, kept)
    D = dense_design(X, kept)
    ref, *_ = np.linalg.lstsq(D, Y, rcond=None)  # minimum-norm solution
    np.testing.assert_allclose(np.vstack([weight.T, bias]), ref, rtol=1e-6, atol=1e-8)
    direct = float(((Y - D @ ref) ** 2).sum())
    assert reconstruction_error(m, kept, weight, bias) == pytest.approx(direct, rel=1e-8)
