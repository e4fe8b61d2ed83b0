"""Tests of chanprune.stats: streaming second moments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _planted import dense_design, planted_conv

from chanprune.stats import LayerStats


def test_moments_equal_dense_products():
    X, Y, *_ = planted_conv(0, noise=0.1, bias=0.5)
    m = LayerStats.from_samples(X, Y).moments()
    D = dense_design(X, np.arange(X.shape[1]))
    np.testing.assert_allclose(m.xtx, D.T @ D, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(m.xty, D.T @ Y, rtol=1e-12, atol=1e-9)
    assert m.yty == pytest.approx(float((Y**2).sum()), rel=1e-12)
    assert m.n_samples == X.shape[0]
    assert (m.n_channels, m.block_size, m.n_outputs) == (10, 9, 6)


def test_batches_and_merge_equal_one_shot():
    X, Y, *_ = planted_conv(1, noise=0.1)
    whole = LayerStats.from_samples(X, Y).moments()
    batched = LayerStats(10, 6, 3)
    for start in range(0, X.shape[0], 128):
        batched.update(X[start : start + 128], Y[start : start + 128])
    half_a = LayerStats.from_samples(X[:250], Y[:250])
    half_b = LayerStats.from_samples(X[250:], Y[250:])
    merged = half_a + half_b
    assert half_a.n_samples == 250  # + returns a new object
    half_a += half_b
    for stats in (batched, merged, half_a):
        m = stats.moments()
        np.testing.assert_allclose(m.xtx, whole.xtx, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(m.xty, whole.xty, rtol=1e-12, atol=1e-9)
        assert m.n_samples == whole.n_samples


@pytest.mark.parametrize("buffer_mb", [0.0, 0.05, 100.0])
def test_buffered_rows_equal_one_product_per_batch(buffer_mb):
    # 0.05 MiB holds ~570 rows of 91 + 6 float64 columns: flushes mid-stream and at the end.
    X, Y, *_ = planted_conv(5, noise=0.1, bias=0.3)
    D = dense_design(X, np.arange(X.shape[1]))
    stats = LayerStats(10, 6, 3, buffer_mb=buffer_mb)
    for start in range(0, X.shape[0], 97):
        stats.update(X[start : start + 97], Y[start : start + 97])
    assert stats.n_samples == X.shape[0]  # counted before any flush
    np.testing.assert_allclose(stats.xtx.numpy(), D.T @ D, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(stats.xty.numpy(), D.T @ Y, rtol=1e-12, atol=1e-9)
    first = stats.moments()
    second = stats.flush().moments()  # flushing twice adds nothing
    np.testing.assert_array_equal(first.xtx, second.xtx)


def test_buffer_does_not_keep_the_callers_memory():
    X, Y, *_ = planted_conv(6)
    expected = LayerStats.from_samples(X, Y).moments()
    Xt, Yt = torch.from_numpy(X.copy()), torch.from_numpy(Y.copy())
    stats = LayerStats(10, 6, 3).update(Xt, Yt)  # float64 in, float64 buffer: no cast
    Xt.zero_()
    Yt.zero_()
    np.testing.assert_allclose(stats.moments().xtx, expected.xtx, rtol=1e-12)


def test_torch_float32_and_numpy_agree():
    X, Y, *_ = planted_conv(2)
    a = LayerStats.from_samples(X, Y).moments()
    b = LayerStats.from_samples(torch.from_numpy(X).float(), torch.from_numpy(Y).float()).moments()
    np.testing.assert_allclose(b.xtx, a.xtx, rtol=1e-5, atol=1e-3)


def test_linear_layer_accepts_2d_inputs():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(50, 7)), rng.normal(size=(50, 3))
    m = LayerStats.from_samples(X, Y).moments()
    assert m.block_size == 1 and m.n_channels == 7
    np.testing.assert_allclose(m.xtx[:7, :7], X.T @ X, rtol=1e-12)


def test_inputs_not_modified():
    X, Y, *_ = planted_conv(3)
    X0, Y0 = X.copy(), Y.copy()
    Xt = torch.from_numpy(X.copy())
    LayerStats.from_samples(X, Y)
    LayerStats.from_samples(Xt, torch.from_numpy(Y))
    np.testing.assert_array_equal(X, X0)
    np.testing.assert_array_equal(Y, Y0)
    np.testing.assert_array_equal(Xt.numpy(), X0)


@pytest.mark.parametrize(
    "X_shape, Y_shape, match",
    [
        ((5, 4, 3, 3), (5, 2), r"X must have shape \(n_samples, 3, 3, 3\)"),
        ((5, 3, 2, 2), (5, 2), r"X must have shape"),
        ((5, 3, 3, 3), (5, 7), r"Y must have shape \(n_samples, 2\)"),
        ((5, 3, 3, 3), (4, 2), r"same number of samples; got 5 and 4"),
    ],
)
def test_shape_errors_name_the_argument(X_shape, Y_shape, match):
    stats = LayerStats(3, 2, 3)
    with pytest.raises(ValueError, match=match):
        stats.update(np.zeros(X_shape), np.zeros(Y_shape))


def test_nan_and_inf_are_refused_with_location():
    stats = LayerStats(2, 2, 1)
    X = np.ones((4, 2))
    X[2, 1] = np.nan
    with pytest.raises(
        ValueError, match=r"X contains 1 NaN or Inf value\(s\), the first at index \(2, 1"
    ):
        stats.update(X, np.ones((4, 2)))
    Y = np.ones((4, 2))
    Y[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"Y contains 1 NaN or Inf"):
        stats.update(np.ones((4, 2)), Y)
    assert stats.n_samples == 0  # nothing was accumulated


def test_empty_stats_and_bad_merge():
    with pytest.raises(ValueError, match="empty"):
        LayerStats(3, 2).moments()
    with pytest.raises(ValueError, match="different layers"):
        LayerStats(3, 2) + LayerStats(3, 4)
    with pytest.raises(TypeError, match="LayerStats"):
        LayerStats(3, 2) + 1
    with pytest.raises(ValueError, match="'n_channels'"):
        LayerStats(0, 2)
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        LayerStats(2, 2).update([[1.0, 2.0]], np.zeros((1, 2)))


def test_state_dict_round_trip(tmp_path):
    X, Y, *_ = planted_conv(4)
    stats = LayerStats.from_samples(X, Y)
    path = tmp_path / "stats.pt"
    torch.save(stats.state_dict(), path)
    loaded = LayerStats.from_state_dict(torch.load(path, weights_only=True))
    np.testing.assert_array_equal(loaded.moments().xtx, stats.moments().xtx)
    assert loaded.n_samples == stats.n_samples


@pytest.mark.gpu
def test_cuda_matches_cpu():
    X, Y, *_ = planted_conv(5)
    cpu = LayerStats.from_samples(X, Y).moments()
    gpu = LayerStats.from_samples(
        torch.from_numpy(X).cuda(), torch.from_numpy(Y).cuda(), device="cuda"
    )
    np.testing.assert_allclose(gpu.moments().xtx, cpu.xtx, rtol=1e-10, atol=1e-8)
    # Whole maps on CUDA (pixel Gram and shifted products in torch).
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    y = torch.randn(6, 5, 4, 4, dtype=torch.float64)
    on_cpu = LayerStats(3, 5, 3).update_maps(x, y, padding=1).moments()
    on_gpu = LayerStats(3, 5, 3, device="cuda").update_maps(x.cuda(), y.cuda(), padding=1)
    np.testing.assert_allclose(on_gpu.moments().xtx, on_cpu.xtx, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(on_gpu.moments().xty, on_cpu.xty, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "size, kernel, stride, padding, dilation",
    [
        ((4, 4), 3, 1, 1, 1),  # CIFAR VGG conv4
        ((2, 2), 3, 1, 1, 1),  # CIFAR VGG conv5: most patch entries are padding
        ((7, 5), 3, 2, 1, 1),  # strided, odd sizes
        ((6, 6), 1, 1, 0, 1),  # 1x1
        ((8, 8), 3, 1, 2, 2),  # dilated
        ((5, 6), (3, 1), (2, 1), (1, 0), 1),  # rectangular everything
    ],
)
def test_whole_maps_equal_every_patch(size, kernel, stride, padding, dilation):
    from torch import nn

    from chanprune.sampling import extract_patches, gather_outputs, sample_positions

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, dilation=dilation).double()
    x = torch.randn(7, 3, *size, dtype=torch.float64)
    y = conv(x).detach() + 0.1 * torch.randn_like(conv(x))  # any target, not only conv(x)
    maps = LayerStats(3, 4, conv.kernel_size, buffer_mb=0.01)  # several flushes
    for lo in range(0, 7, 3):
        maps.update_maps(
            x[lo : lo + 3], y[lo : lo + 3], stride=stride, padding=padding, dilation=dilation
        )
    pos = sample_positions(7, tuple(y.shape[2:]), None, torch.Generator())
    X, Y = extract_patches(x, conv, pos), gather_outputs(y, pos)
    expected = LayerStats(3, 4, conv.kernel_size).update(X, Y).moments()
    got = maps.moments()
    assert got.n_samples == expected.n_samples == X.shape[0]
    np.testing.assert_allclose(got.xtx, expected.xtx, rtol=1e-12, atol=1e-11)
    np.testing.assert_allclose(got.xty, expected.xty, rtol=1e-12, atol=1e-11)
    assert got.yty == pytest.approx(expected.yty, rel=1e-12)


def test_whole_maps_mix_with_patches_and_check_shapes():
    rng = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 3, 3, generator=rng, dtype=torch.float64)
    y = torch.randn(4, 5, 3, 3, generator=rng, dtype=torch.float64)
    X = torch.randn(10, 2, 3, 3, generator=rng, dtype=torch.float64)
    Y = torch.randn(10, 5, generator=rng, dtype=torch.float64)
    mixed = LayerStats(2, 5, 3).update(X, Y).update_maps(x, y, padding=1)
    apart = LayerStats(2, 5, 3).update_maps(x, y, padding=1) + LayerStats.from_samples(X, Y)
    np.testing.assert_allclose(mixed.moments().xtx, apart.moments().xtx, rtol=1e-12)
    assert mixed.n_samples == 10 + 4 * 9
    with pytest.raises(ValueError, match=r"y must have shape \(4, 5, 3, 3\)"):
        LayerStats(2, 5, 3).update_maps(x, y[:, :, :2], padding=1)
    with pytest.raises(ValueError, match="x must have shape"):
        LayerStats(3, 5, 3).update_maps(x, y, padding=1)
    with pytest.raises(ValueError, match="does not fit"):
        LayerStats(2, 5, 3).update_maps(x[:, :, :1, :1], y, padding=0)
    bad = x.clone()
    bad[1, 0, 2, 2] = float("nan")
    with pytest.raises(
        ValueError, match=r"x contains 1 NaN or Inf value\(s\), the first at index \(1, 0, 2, 2\)"
    ):
        LayerStats(2, 5, 3).update_maps(bad, y, padding=1)
