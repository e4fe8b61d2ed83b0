"""Tests of chanprune.layer: the public per-layer call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _planted import dense_design, planted_conv

from chanprune import LayerStats, prune_layer, prune_layer_from_stats
from chanprune.selection import SELECTORS

ALL_METHODS = [m for m in SELECTORS if m != "by_score"]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_raw_and_statistics_entry_points_agree(method):
    X, Y, W, b, _ = planted_conv(0, noise=0.2, bias=0.5)
    raw = prune_layer(X, Y, W, b, keep=5, method=method, random_state=0)
    stats = LayerStats.from_samples(X, Y)
    via_stats = prune_layer_from_stats(stats, W, b, keep=5, method=method, random_state=0)
    np.testing.assert_array_equal(raw.kept, via_stats.kept)
    np.testing.assert_allclose(raw.weight, via_stats.weight, rtol=1e-10, atol=1e-12)
    assert raw.weight.shape == (6, 5, 3, 3) and raw.bias.shape == (6,)
    assert raw.rel_error == pytest.approx(via_stats.rel_error, rel=1e-10)


def test_rel_error_is_the_error_on_the_given_samples():
    X, Y, W, b, _ = planted_conv(1, noise=0.5, bias=0.2, support=range(10))
    result = prune_layer(X, Y, W, b, keep=6)
    pred = dense_design(X, result.kept) @ np.vstack(
        [result.weight.reshape(6, -1).T, result.bias[None]]
    )
    direct = ((Y - pred) ** 2).sum() / (Y**2).sum()
    assert result.rel_error == pytest.approx(direct, rel=1e-8)
    assert result.rel_error <= result.rel_error_before_refit  # the refit cannot hurt


def test_planted_problem_is_solved_exactly():
    X, Y, W, b, support = planted_conv(2, bias=1.0)
    for method in ("lasso", "greedy_ls"):
        result = prune_layer(X, Y, W, b, keep=4, method=method)
        np.testing.assert_array_equal(result.kept, support)
        assert result.rel_error < 1e-12
        np.testing.assert_allclose(result.weight, W[:, support], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(result.bias, b, atol=1e-8)


def test_refit_off_keeps_original_weights_and_bias():
    X, Y, W, b, _ = planted_conv(3, noise=0.1, bias=0.3)
    result = prune_layer(X, Y, W, b, keep=4, method="max_response", refit=False)
    np.testing.assert_array_equal(result.weight, W[:, result.kept])
    np.testing.assert_array_equal(result.bias, b)
    assert result.rel_error == result.rel_error_before_refit
    lasso = prune_layer(X, Y, W, b, keep=4, method="lasso", refit=False)
    # LASSO without refit: the kept weights scaled by their coefficients.
    ratio = lasso.weight / W[:, lasso.kept]
    assert np.allclose(ratio, ratio[:, :, :1, :1])


def test_alternating_lasso_never_worse_than_one_pass():
    X, Y, W, b, _ = planted_conv(4, noise=1.0, support=range(10), n_samples=300)
    one = prune_layer(X, Y, W, b, keep=3)
    alt = prune_layer(X, Y, W, b, keep=3, alternate=True, max_alternations=6)
    assert alt.rel_error <= one.rel_error + 1e-12
    assert 1 <= alt.n_alternations <= 6 and alt.kept.size == 3


def test_linear_layer_and_by_score():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(200, 8))
    W = rng.normal(size=(4, 8))
    Y = X[:, [0, 2, 6]] @ W[:, [0, 2, 6]].T
    result = prune_layer(X, Y, W, keep=3, method="greedy_ls")
    np.testing.assert_array_equal(result.kept, [0, 2, 6])
    assert result.weight.shape == (4, 3)
    scores = np.arange(8.0)
    by_score = prune_layer(X, Y, W, keep=2, method="by_score", scores=scores)
    np.testing.assert_array_equal(by_score.kept, [6, 7])


def test_torch_inputs_float32_match_numpy():
    X, Y, W, b, _ = planted_conv(6, noise=0.1)
    ref = prune_layer(X, Y, W, b, keep=4, method="greedy_ls")
    res = prune_layer(
        torch.from_numpy(X).float(), torch.from_numpy(Y).float(),
        torch.from_numpy(W).float(), torch.from_numpy(b).float(), keep=4, method="greedy_ls",
    )  # fmt: skip
    np.testing.assert_array_equal(ref.kept, res.kept)
    np.testing.assert_allclose(res.weight, ref.weight, rtol=1e-3, atol=1e-4)


def test_inputs_are_not_modified():
    X, Y, W, b, _ = planted_conv(7, noise=0.1)
    copies = [a.copy() for a in (X, Y, W, b)]
    Wt = torch.from_numpy(W.copy())
    for method in ALL_METHODS:
        prune_layer(X, Y, W, b, keep=3, method=method, random_state=1)
    prune_layer(X, Y, W, b, keep=3, alternate=True)
    prune_layer(X, Y, Wt, b, keep=3)
    for before, after in zip(copies, (X, Y, W, b)):
        np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(Wt.numpy(), W)


def test_random_is_reproducible():
    X, Y, W, b, _ = planted_conv(8)
    a = prune_layer(X, Y, W, b, keep=4, method="random", random_state=3)
    b2 = prune_layer(X, Y, W, b, keep=4, method="random", random_state=3)
    np.testing.assert_array_equal(a.kept, b2.kept)


def test_to_dict_is_json_serialisable():
    import json

    X, Y, W, b, _ = planted_conv(9)
    d = prune_layer(X, Y, W, b, keep=4).to_dict()
    assert json.loads(json.dumps(d))["keep"] == 4


# ---------------------------------------------------------------------------- bad input
def _problem():
    X, Y, W, b, _ = planted_conv(10, n_samples=50)
    return X, Y, W, b


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(keep=0), ValueError, r"'keep' parameter must be an int in \[1, 10\]; got 0"),
        (dict(keep=11), ValueError, r"'keep' .* got 11"),
        (dict(keep=2.5), TypeError, r"'keep' parameter must be an int"),
        (dict(method="l1"), ValueError, r"'method' parameter must be one of .*got 'l1'"),
        (dict(ridge=-1.0), ValueError, r"'ridge'"),
        (dict(method="by_score"), ValueError, r"needs scores"),
        (dict(method="by_score", scores=np.ones(3)), ValueError, r"scores must have shape \(10,\)"),
        (dict(method="first_k", alternate=True), ValueError, r"alternate=True applies to"),
        (dict(tol=0.0), ValueError, r"'tol'"),
    ],
)
def test_bad_parameters(change, exc, match):
    X, Y, W, b = _problem()
    kwargs = dict(keep=3)
    kwargs.update(change)
    with pytest.raises(exc, match=match):
        prune_layer(X, Y, W, b, **kwargs)


def test_bad_shapes_and_values():
    X, Y, W, b = _problem()
    with pytest.raises(ValueError, match=r"weight has 10 input channels but the samples have 9"):
        prune_layer(X[:, :9], Y, W, b, keep=3)
    with pytest.raises(ValueError, match=r"X patches of shape \(10, 2, 2\) do not match weight"):
        prune_layer(X[:, :, :2, :2], Y, W, b, keep=3)
    with pytest.raises(ValueError, match=r"Y has 5 outputs but weight has 6"):
        prune_layer(X, Y[:, :5], W, b, keep=3)
    with pytest.raises(ValueError, match=r"same number of samples"):
        prune_layer(X, Y[:10], W, b, keep=3)
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        prune_layer(X, Y, W, b[:3], keep=3)
    with pytest.raises(ValueError, match=r"no samples"):
        prune_layer(X[:0], Y[:0], W, b, keep=3)
    with pytest.raises(ValueError, match=r"X must have shape"):
        prune_layer(X[0], Y, W, b, keep=3)
    with pytest.raises(TypeError, match=r"X must be a numpy array or a torch tensor; got list"):
        prune_layer(X.tolist(), Y, W, b, keep=3)
    for name, index in (("X", 0), ("Y", 1), ("weight", 2)):
        args = list(_problem())
        args[index] = args[index].copy()
        args[index].flat[5] = np.nan
        with pytest.raises(ValueError, match=rf"{name} contains 1 NaN or Inf"):
            prune_layer(*args, keep=3)


def test_stats_entry_point_checks_weight_against_statistics():
    X, Y, W, b = _problem()
    stats = LayerStats.from_samples(X, Y)
    with pytest.raises(ValueError, match=r"does not match the statistics"):
        prune_layer_from_stats(stats, W[:, :, :2, :2], b, keep=3)
    with pytest.raises(TypeError, match=r"stats must be a LayerStats"):
        prune_layer_from_stats({"xtx": 1}, W, b, keep=3)
