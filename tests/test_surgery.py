"""Tests for chanprune.surgery: BatchNorm folding and physical channel pruning."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from chanprune.exceptions import UnsupportedLayerError
from chanprune.flops import count_params
from chanprune.surgery import (
    SampledConv2d,
    fold_batchnorm,
    insert_channel_sampler,
    prune_batchnorm,
    prune_conv_bn_conv,
    prune_conv_bn_flatten_linear,
    prune_conv_in_channels,
    prune_conv_out_channels,
    prune_linear_in_features,
    prune_linear_out_features,
    set_conv_params,
    set_linear_params,
)


def _randomize_bn(bn: nn.modules.batchnorm._BatchNorm, gen: torch.Generator) -> None:
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=gen))
        bn.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
        if bn.affine:
            bn.weight.copy_(torch.randn(n, generator=gen))
            bn.bias.copy_(torch.randn(n, generator=gen))
    bn.num_batches_tracked.fill_(7)


def _state(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_state_equal(module: nn.Module, state: dict) -> None:
    now = module.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


def _net(c_in: int = 3, c1: int = 8, c2: int = 12, n_out: int = 10, spatial: int = 4):
    """conv-bn-relu-conv-bn-relu-pool-flatten-linear on a (c_in, 2*spatial, 2*spatial) input."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(c_in, c1, 3, padding=1),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1, bias=False),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * spatial * spatial, n_out),
    )
    gen = torch.Generator().manual_seed(1)
    _randomize_bn(net[1], gen)
    _randomize_bn(net[4], gen)
    return net.eval()


# --------------------------------------------------------------------------------------
# fold_batchnorm
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("conv_kwargs", [{}, {"stride": 2, "padding": 1, "dilation": 2}])
def test_fold_batchnorm_matches_bn_of_conv(bias, affine, conv_kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, bias=bias, **conv_kwargs)
    bn = nn.BatchNorm2d(7, affine=affine, eps=1e-3)
    _randomize_bn(bn, torch.Generator().manual_seed(2))
    bn.train()  # the fold uses running statistics whatever the mode
    conv_state, bn_state = _state(conv), _state(bn)
    x = torch.randn(4, 5, 11, 11)

    folded = fold_batchnorm(conv, bn)

    assert folded is not conv and isinstance(folded, nn.Conv2d)
    assert folded.bias is not None and folded.weight.dtype == torch.float32
    assert folded.stride == conv.stride and folded.padding == conv.padding
    assert folded.dilation == conv.dilation
    bn.eval()
    with torch.no_grad():
        expected = bn(conv(x))
        got = folded(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # inputs untouched (bn.eval() only flips the flag)
    _assert_state_equal(conv, conv_state)
    _assert_state_equal(bn, bn_state)


def test_fold_batchnorm_float64_is_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, dtype=torch.float64)
    bn = nn.BatchNorm2d(6, dtype=torch.float64).eval()
    _randomize_bn(bn, torch.Generator().manual_seed(3))
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    folded = fold_batchnorm(conv, bn)
    assert folded.weight.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn(conv(x)), rtol=1e-12, atol=1e-12)


def test_fold_batchnorm_keeps_requires_grad_and_mode():
    conv = nn.Conv2d(2, 3, 1).eval()
    conv.weight.requires_grad_(False)
    conv.bias.requires_grad_(False)
    folded = fold_batchnorm(conv, nn.BatchNorm2d(3))
    assert not folded.training
    assert not folded.weight.requires_grad and not folded.bias.requires_grad


def test_fold_batchnorm_linear_bn1d():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    bn = nn.BatchNorm1d(5).eval()
    _randomize_bn(bn, torch.Generator().manual_seed(4))
    x = torch.randn(8, 6)
    folded = fold_batchnorm(lin, bn)
    assert isinstance(folded, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn(lin(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [2, 4])  # grouped, depthwise
def test_fold_batchnorm_grouped_matches_bn_of_conv(groups):
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=groups)
    bn = nn.BatchNorm2d(4).eval()
    _randomize_bn(bn, torch.Generator().manual_seed(5))
    x = torch.randn(3, 4, 6, 6)
    folded = fold_batchnorm(conv, bn)
    assert folded.groups == groups
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn(conv(x)), rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_errors():
    with pytest.raises(UnsupportedLayerError, match="Conv2d"):
        fold_batchnorm(nn.Conv1d(4, 4, 3), nn.BatchNorm1d(4))
    with pytest.raises(UnsupportedLayerError, match="BatchNorm2d"):
        fold_batchnorm(nn.Conv2d(4, 4, 3), nn.BatchNorm1d(4))
    with pytest.raises(TypeError):  # UnsupportedLayerError is a TypeError
        fold_batchnorm(nn.Conv2d(4, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"num_features \(5\).*\(4\)"):
        fold_batchnorm(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5))
    with pytest.raises(ValueError, match="running statistics"):
        fold_batchnorm(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))


# --------------------------------------------------------------------------------------
# the key test: masked model == physically pruned model
# --------------------------------------------------------------------------------------
def _masked(net: nn.Sequential, kept1, kept2, spatial: int) -> nn.Sequential:
    """Same widths, but the dropped channels have no effect on the output."""
    masked = copy.deepcopy(net)
    drop1 = sorted(set(range(net[0].out_channels)) - set(kept1))
    drop2 = sorted(set(range(net[3].out_channels)) - set(kept2))
    with torch.no_grad():
        masked[3].weight[:, drop1] = 0.0
        cols = [c * spatial + s for c in drop2 for s in range(spatial)]
        masked[8].weight[:, cols] = 0.0
    return masked


def test_masked_equals_pruned_network():
    net = _net()
    kept1, kept2 = [0, 2, 3, 5, 7], np.array([11, 1, 4, 5, 6, 9])  # unsorted on purpose
    spatial = 4 * 4
    masked = _masked(net, kept1, sorted(kept2), spatial)
    pruned = copy.deepcopy(net)
    n_before = count_params(pruned)

    prune_conv_bn_conv(pruned[0], pruned[1], pruned[3], kept1)
    prune_conv_bn_flatten_linear(pruned[3], pruned[4], pruned[8], kept2, spatial)

    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(net(x), masked(x))  # the masking did something

    # attributes, shapes, buffers
    assert (pruned[0].out_channels, pruned[1].num_features, pruned[3].in_channels) == (5, 5, 5)
    assert (pruned[3].out_channels, pruned[4].num_features) == (6, 6)
    assert pruned[8].in_features == 6 * spatial
    assert pruned[1].running_mean.shape == (5,) and pruned[4].running_var.shape == (6,)
    assert int(pruned[1].num_batches_tracked) == 7
    torch.testing.assert_close(pruned[1].running_mean, net[1].running_mean[kept1])

    # parameter count drops by the expected amount, and matches a freshly built narrow net
    dropped1, dropped2 = 8 - 5, 12 - 6
    expected_drop = (
        dropped1 * (3 * 9 + 1)  # conv0 filters + bias
        + dropped1 * 2  # bn1 weight + bias
        + dropped1 * 12 * 9  # conv3 input channels (before its own pruning)
        + dropped2 * 5 * 9  # conv3 filters (no bias), remaining 5 inputs
        + dropped2 * 2  # bn4
        + dropped2 * spatial * 10  # linear columns
    )
    assert n_before - count_params(pruned) == expected_drop
    assert count_params(pruned) == count_params(_net(c1=5, c2=6))

    # still trainable: leaf parameters, gradients flow, state_dict loads into a narrow net
    pruned.train()
    pruned(x).sum().backward()
    assert all(p.grad is not None and p.is_leaf for p in pruned.parameters())
    narrow = _net(c1=5, c2=6)
    narrow.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(narrow.eval()(x), pruned.eval()(x))


def test_prune_conv_bn_conv_installs_refit_weight_and_bias():
    net = _net()
    conv0, bn1, conv3 = net[0], net[1], net[3]
    kept = [1, 4, 6]
    w = np.random.default_rng(0).standard_normal((12, 3, 3, 3))  # float64 ndarray
    b = torch.arange(12, dtype=torch.float64)
    prune_conv_bn_conv(conv0, bn1, conv3, kept, next_weight=w, next_bias=b)
    assert conv3.weight.dtype == torch.float32 and conv3.bias is not None  # bias added
    torch.testing.assert_close(conv3.weight, torch.from_numpy(w).float())
    torch.testing.assert_close(conv3.bias, b.float())
    assert conv3.bias.requires_grad
    w[0, 0, 0, 0] = 123.0  # no shared memory with the caller's array
    assert conv3.weight[0, 0, 0, 0] != 123.0


def test_prune_conv_bn_conv_without_bn_and_validation_is_atomic():
    torch.manual_seed(0)
    conv_a, conv_b = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 1)
    state_a, state_b = _state(conv_a), _state(conv_b)
    with pytest.raises(ValueError, match="next_weight must have shape"):
        prune_conv_bn_conv(conv_a, None, conv_b, [0, 1], next_weight=torch.zeros(4, 3, 1, 1))
    with pytest.raises(ValueError, match="kept"):
        prune_conv_bn_conv(conv_a, None, conv_b, [0, 6])
    with pytest.raises(ValueError, match="bn_prev.num_features"):
        prune_conv_bn_conv(conv_a, nn.BatchNorm2d(5), conv_b, [0])
    with pytest.raises(ValueError, match="conv_next.in_channels"):
        prune_conv_bn_conv(conv_a, None, nn.Conv2d(5, 4, 1), [0])
    _assert_state_equal(conv_a, state_a)
    _assert_state_equal(conv_b, state_b)
    assert conv_a.out_channels == 6 and conv_b.in_channels == 6

    prune_conv_bn_conv(conv_a, None, conv_b, [5, 0])
    torch.testing.assert_close(conv_a.weight, state_a["weight"][[0, 5]])
    torch.testing.assert_close(conv_b.weight, state_b["weight"][:, [0, 5]])


# --------------------------------------------------------------------------------------
# single-layer functions
# --------------------------------------------------------------------------------------
def test_prune_linear_in_features_spatial():
    torch.manual_seed(0)
    c, h, w = 5, 3, 2
    lin = nn.Linear(c * h * w, 4)
    ref = copy.deepcopy(lin)
    kept = torch.tensor([3, 0, 4])
    x = torch.randn(2, c, h, w)
    prune_linear_in_features(lin, kept, spatial_size=h * w)
    assert lin.in_features == 3 * h * w and lin.weight.shape == (4, 18)
    with torch.no_grad():
        dropped = ~torch.isin(torch.arange(c), kept)[None, :, None, None]
        expected = ref(x.masked_fill(dropped, 0.0).flatten(1))
        got = lin(x[:, kept.sort().values].flatten(1))
    torch.testing.assert_close(got, expected)


def test_prune_linear_in_features_errors():
    lin = nn.Linear(12, 2)
    with pytest.raises(ValueError, match="multiple of spatial_size"):
        prune_linear_in_features(lin, [0], spatial_size=5)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):  # 12 / 4 = 3 channels
        prune_linear_in_features(lin, [3], spatial_size=4)
    with pytest.raises(ValueError, match="spatial_size"):
        prune_linear_in_features(lin, [0], spatial_size=0)
    assert lin.in_features == 12


def test_prune_linear_out_features():
    torch.manual_seed(0)
    lin = nn.Linear(3, 6)
    ref = copy.deepcopy(lin)
    prune_linear_out_features(lin, [4, 1])
    x = torch.randn(2, 3)
    assert lin.out_features == 2
    with torch.no_grad():
        torch.testing.assert_close(lin(x), ref(x)[:, [1, 4]])


def test_prune_conv_out_and_in_channels_and_bn():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    ref = copy.deepcopy(conv)
    x = torch.randn(1, 4, 5, 5)
    assert prune_conv_out_channels(conv, [0, 5]) is conv
    with torch.no_grad():
        torch.testing.assert_close(conv(x), ref(x)[:, [0, 5]])
    assert prune_conv_in_channels(conv, (1, 2)) is conv
    assert conv.in_channels == 2 and conv.weight.shape == (2, 2, 3, 3)
    with torch.no_grad():
        masked_x = x * torch.tensor([0.0, 1.0, 1.0, 0.0])[:, None, None]
        torch.testing.assert_close(conv(x[:, [1, 2]]), ref(masked_x)[:, [0, 5]])

    bn = nn.BatchNorm2d(6, affine=False)
    prune_batchnorm(bn, [2, 3])
    assert bn.num_features == 2 and bn.weight is None and bn.running_var.shape == (2,)


def test_surgery_keeps_dtype_device_requires_grad():
    conv = nn.Conv2d(4, 6, 3, dtype=torch.float64)
    conv.weight.requires_grad_(False)
    prune_conv_out_channels(conv, [1, 2])
    prune_conv_in_channels(conv, [0])
    assert conv.weight.dtype == torch.float64 and conv.bias.dtype == torch.float64
    assert not conv.weight.requires_grad and conv.bias.requires_grad
    assert isinstance(conv.weight, nn.Parameter)

    meta = nn.Conv2d(4, 6, 3, device="meta")
    prune_conv_out_channels(meta, [0])
    assert meta.weight.device.type == "meta" and meta.weight.shape == (1, 4, 3, 3)


def test_set_conv_params():
    conv = nn.Conv2d(4, 6, 3, bias=False)
    set_conv_params(conv, torch.ones(2, 3, 3, 3))
    assert (conv.out_channels, conv.in_channels, conv.bias) == (2, 3, None)
    set_conv_params(conv, torch.ones(5, 3, 3, 3), torch.zeros(5))
    assert conv.bias.shape == (5,)
    with pytest.raises(ValueError, match="pass a bias"):
        set_conv_params(conv, torch.ones(4, 3, 3, 3))
    with pytest.raises(ValueError, match="shape"):
        set_conv_params(conv, torch.ones(5, 3, 1, 1))
    with pytest.raises(ValueError, match="NaN"):
        set_conv_params(conv, torch.full((5, 3, 3, 3), float("nan")))
    with pytest.raises(TypeError, match="weight"):
        set_conv_params(conv, [[1.0]])


def test_set_linear_params():
    lin = nn.Linear(4, 6, bias=False)
    weight = np.arange(6.0).reshape(2, 3)
    assert set_linear_params(lin, weight) is lin
    assert (lin.out_features, lin.in_features, lin.bias) == (2, 3, None)
    weight[0, 0] = 100.0  # the layer holds a copy
    x = torch.randn(5, 3)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), x @ torch.arange(6.0).reshape(2, 3).T)
    set_linear_params(lin, torch.ones(5, 3), torch.arange(5.0))
    assert lin.bias.shape == (5,) and lin.bias.requires_grad == lin.weight.requires_grad
    with pytest.raises(ValueError, match="pass a bias"):
        set_linear_params(lin, torch.ones(4, 3))
    with pytest.raises(ValueError, match="shape"):
        set_linear_params(lin, torch.ones(5, 3, 1, 1))
    with pytest.raises(ValueError, match="NaN"):
        set_linear_params(lin, torch.full((5, 3), float("nan")))
    with pytest.raises(UnsupportedLayerError, match="nn.Linear"):
        set_linear_params(nn.Conv2d(3, 5, 1), torch.ones(5, 3))
    assert lin.weight.shape == (5, 3)  # a refused call changes nothing


def test_refit_weight_via_prune_conv_in_channels():
    conv = nn.Conv2d(4, 2, 1)
    bias = conv.bias.detach().clone()
    prune_conv_in_channels(conv, [0, 3], weight=torch.full((2, 2, 1, 1), 0.5))
    assert torch.equal(conv.weight, torch.full((2, 2, 1, 1), 0.5))
    assert torch.equal(conv.bias, bias)
    with pytest.raises(ValueError, match=r"weight must have shape \(2, 1, 1, 1\)"):
        prune_conv_in_channels(conv, [0], weight=torch.zeros(2, 2, 1, 1))


# --------------------------------------------------------------------------------------
# validation of `kept` and module types
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kept", "exc", "match"),
    [
        ([0, 6], ValueError, r"kept must hold indices in \[0, 5\].*got 6"),
        ([-1, 2], ValueError, "got -1"),
        ([1, 3, 1], ValueError, "distinct.*got 1"),
        ([], ValueError, "at least one"),
        (np.array([], dtype=np.int64), ValueError, "at least one"),
        (torch.tensor([[0, 1]]), ValueError, "1-D"),
        ([0.0, 1.0], TypeError, "integer"),
        ([True, False], TypeError, "integer"),
        (torch.tensor([True, False, True, False, True, False]), TypeError, "dtype torch.bool"),
        (np.array([0.5]), TypeError, "dtype float64"),
        ("01", TypeError, "str"),
        (3, TypeError, "int"),
    ],
)
def test_kept_validation(kept, exc, match):
    conv = nn.Conv2d(3, 6, 3)
    state = _state(conv)
    with pytest.raises(exc, match=match):
        prune_conv_out_channels(conv, kept)
    _assert_state_equal(conv, state)


@pytest.mark.parametrize(
    "kept", [[2, 0], (0, 2), range(0, 3, 2), np.array([2, 0], dtype=np.int32), torch.tensor([0, 2])]
)
def test_kept_accepts_index_likes(kept):
    conv = nn.Conv2d(3, 6, 3)
    ref = conv.weight.detach().clone()
    prune_conv_out_channels(conv, kept)
    torch.testing.assert_close(conv.weight, ref[[0, 2]])


def test_unsupported_layers():
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(UnsupportedLayerError, match="groups=1"):
        prune_conv_out_channels(grouped, [0])
    with pytest.raises(UnsupportedLayerError, match="groups=1"):
        prune_conv_in_channels(nn.Conv2d(4, 4, 3, groups=4), [0])
    with pytest.raises(UnsupportedLayerError, match="Conv2d"):
        prune_conv_out_channels(nn.Linear(3, 3), [0])
    with pytest.raises(UnsupportedLayerError, match="BatchNorm"):
        prune_batchnorm(nn.LayerNorm(3), [0])
    with pytest.raises(UnsupportedLayerError, match="Linear"):
        prune_linear_in_features(nn.Conv2d(3, 3, 1), [0])
    with pytest.raises(UnsupportedLayerError, match="conv_next"):
        prune_conv_bn_conv(nn.Conv2d(3, 4, 1), None, nn.Conv2d(4, 4, 1, groups=2), [0])
    wn = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 1))
    with pytest.raises(UnsupportedLayerError, match="parametrized"):
        prune_conv_out_channels(wn, [0])
    with pytest.raises(ValueError, match="lazy"):
        prune_conv_out_channels(nn.LazyConv2d(4, 1), [0])


# --------------------------------------------------------------------------------------
# channel sampler
# --------------------------------------------------------------------------------------
def test_sampled_conv_is_a_conv_on_the_sliced_input():
    torch.manual_seed(0)
    conv = SampledConv2d(8, 5, 3, in_index=[6, 1, 3], stride=2, padding=1)
    assert conv.in_index.tolist() == [1, 3, 6]  # sorted
    assert (conv.in_channels, conv.stream_channels, conv.weight.shape) == (3, 8, (5, 3, 3, 3))
    assert "sampled=3 of 8" in repr(conv)
    plain = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    plain.load_state_dict({"weight": conv.weight, "bias": conv.bias})
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), plain(x[:, [1, 3, 6]]), rtol=1e-6, atol=1e-6)
    assert count_params(conv) == count_params(plain)  # the index is a buffer, not a parameter
    with pytest.raises(ValueError, match=r"inputs of shape \(B, 8, H, W\); got \(2, 3, 7, 7\)"):
        conv(x[:, :3])


def test_sampled_conv_state_dict_round_trip_and_to():
    torch.manual_seed(0)
    conv = SampledConv2d(8, 4, 1, in_index=[0, 2, 7], bias=False)
    state = conv.state_dict()
    assert list(state) == ["weight", "in_index"] and state["in_index"].dtype == torch.int64
    other = SampledConv2d(8, 4, 1, in_index=[0, 1, 2], bias=False)
    other.load_state_dict(state)
    assert other.in_index.tolist() == [0, 2, 7]
    x = torch.randn(1, 8, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(other(x), conv(x), rtol=0, atol=0)
    moved = copy.deepcopy(conv).to("meta")  # a buffer: moves with the module
    assert moved.in_index.device.type == "meta" and moved.weight.device.type == "meta"
    assert conv.to(torch.float64).in_index.dtype == torch.int64  # and keeps its dtype


@pytest.mark.parametrize(
    ("in_index", "exc", "match"),
    [
        (torch.tensor([0, 8, 9]), ValueError, r"indices in \[0, 7\].*got 8"),
        (torch.tensor([2, 1, 3]), ValueError, "strictly increasing"),
        (torch.tensor([1, 1, 3]), ValueError, "strictly increasing"),
        (torch.tensor([0.0, 1.0, 2.0]), TypeError, "integer"),
        (torch.tensor([0, 1]), ValueError, r"shape \(3,\)"),
    ],
)
def test_sampled_conv_rejects_a_bad_loaded_index(in_index, exc, match):
    conv = SampledConv2d(8, 4, 1, in_index=[0, 2, 7])
    state = dict(conv.state_dict(), in_index=in_index)
    before = _state(conv)
    with pytest.raises(exc, match=f"^in_index must .*{match}"):
        conv.load_state_dict(state)
    _assert_state_equal(conv, before)


@pytest.mark.parametrize(
    ("in_index", "exc", "match"),
    [
        ([0, 8], ValueError, r"in_index must hold indices in \[0, 7\]"),
        ([1, 1], ValueError, "distinct"),
        ([], ValueError, "at least one"),
        ([0.5], TypeError, "integer"),
    ],
)
def test_sampled_conv_rejects_bad_indices(in_index, exc, match):
    with pytest.raises(exc, match=match):
        SampledConv2d(8, 4, 1, in_index=in_index)


def test_insert_channel_sampler_equals_masked_input_and_composes():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(6, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    _randomize_bn(block[1], torch.Generator().manual_seed(3))
    block.eval()
    block[0].weight.requires_grad_(False)
    masked = copy.deepcopy(block)
    with torch.no_grad():
        masked[0].weight[:, [0, 2, 3]] = 0.0
    conv = insert_channel_sampler(block, "0", [5, 1, 4])  # unsorted on purpose
    assert block[0] is conv and isinstance(conv, SampledConv2d)
    assert conv.in_index.tolist() == [1, 4, 5] and conv.bias is None
    assert not conv.weight.requires_grad and not conv.training
    x = torch.randn(3, 6, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(block(x), masked(x), rtol=1e-6, atol=1e-6)
        folded = fold_batchnorm(block[0], block[1])  # a sampler stays a sampler when folded
        torch.testing.assert_close(folded(x), block(x), rtol=1e-5, atol=1e-5)
    # Pruning the inputs of a sampled conv again: the kept indices index its sampled inputs.
    assert insert_channel_sampler(block, "0", [0, 2]) is conv
    assert conv.in_index.tolist() == [1, 5] and conv.weight.shape == (4, 2, 3, 3)
    prune_conv_in_channels(conv, [1])
    assert conv.in_index.tolist() == [5] and conv.in_channels == 1


def test_insert_channel_sampler_installs_a_weight_and_validates_first():
    net = nn.Sequential(nn.Sequential(nn.Conv2d(6, 4, 1)))
    weight = torch.full((4, 2, 1, 1), 0.5)
    conv = insert_channel_sampler(net, "0.0", [1, 2], weight=weight)
    assert torch.equal(conv.weight, weight) and conv.bias is not None
    before = _state(net)
    with pytest.raises(ValueError, match=r"weight must have shape \(4, 1, 1, 1\)"):
        insert_channel_sampler(net, "0.0", [0], weight=weight)
    with pytest.raises(ValueError, match="kept must hold indices"):
        insert_channel_sampler(net, "0.0", [2])
    with pytest.raises(ValueError, match=r"no submodule '0.1'"):
        insert_channel_sampler(net, "0.1", [0])
    with pytest.raises(UnsupportedLayerError, match="groups=1"):
        insert_channel_sampler(nn.Sequential(nn.Conv2d(4, 4, 1, groups=2)), "0", [0])
    with pytest.raises(ValueError, match="SampledConv2d reading 2 channels"):
        set_conv_params(conv, torch.ones(4, 1, 1, 1))
    _assert_state_equal(net, before)
