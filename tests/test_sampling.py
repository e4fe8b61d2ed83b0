"""Tests of chanprune.sampling: positions, patches, hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chanprune.sampling import (
    channel_spectra,
    extract_patches,
    gather_outputs,
    input_moments,
    record_activations,
    sample_positions,
)


@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 1, 1), (1, 0, 1), (2, 2, 2)])
def test_patches_match_unfold_and_reproduce_the_conv(stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, 3, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(3, 4, 11, 9)
    y = conv(x)
    pos = sample_positions(3, tuple(y.shape[2:]), 7, torch.Generator().manual_seed(0))
    patches = extract_patches(x, conv, pos)
    # Reference: unfold lays out all patches (B, c*kh*kw, L), row-major positions.
    cols = F.unfold(x, 3, dilation=dilation, padding=padding, stride=stride)
    flat = pos.row * y.shape[3] + pos.col
    ref = cols[pos.image, :, flat].reshape(-1, 4, 3, 3)
    torch.testing.assert_close(patches, ref)
    out = gather_outputs(y, pos)
    pred = torch.einsum("scij,ocij->so", patches, conv.weight) + conv.bias
    torch.testing.assert_close(pred, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_patches_refuse_padding_other_than_zeros(mode):
    conv = nn.Conv2d(4, 5, 3, padding=1, padding_mode=mode)
    x = torch.randn(2, 4, 6, 6)
    pos = sample_positions(2, (6, 6), 3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=f"padding_mode='{mode}' is not supported"):
        extract_patches(x, conv, pos)
    # Without padding the mode is never used: nothing to refuse.
    unpadded = nn.Conv2d(4, 5, 3, padding=0, padding_mode=mode)
    pos = sample_positions(2, (4, 4), 3, torch.Generator().manual_seed(0))
    patches = extract_patches(x, unpadded, pos)
    ref = F.unfold(x, 3)[pos.image, :, pos.row * 4 + pos.col].reshape(-1, 4, 3, 3)
    torch.testing.assert_close(patches, ref)


def test_positions_are_distinct_in_range_and_reproducible():
    gen = torch.Generator().manual_seed(3)
    pos = sample_positions(4, (5, 6), 10, gen)
    assert len(pos) == 40
    for i in range(4):
        mask = pos.image == i
        flat = pos.row[mask] * 6 + pos.col[mask]
        assert flat.unique().numel() == 10
        assert flat.min() >= 0 and flat.max() < 30
    again = sample_positions(4, (5, 6), 10, torch.Generator().manual_seed(3))
    assert torch.equal(pos.row, again.row) and torch.equal(pos.col, again.col)


def test_small_maps_use_every_position():
    pos = sample_positions(2, (2, 2), 10, torch.Generator().manual_seed(0))
    assert len(pos) == 8
    assert sorted((pos.row * 2 + pos.col)[:4].tolist()) == [0, 1, 2, 3]


def test_recorded_outputs_survive_inplace_relu():
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3).eval(), nn.ReLU(inplace=True))
    x = torch.randn(4, 2, 5, 5)
    with record_activations(inputs={"conv": net[0]}, outputs={"bn": net[1]}) as rec:
        net(x)
    expected = net[1](net[0](x))
    assert (expected < 0).any()  # the in-place ReLU would have zeroed these
    torch.testing.assert_close(rec["bn"], expected)
    torch.testing.assert_close(rec["conv"], x)


def test_hooks_are_removed_after_an_exception():
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU())
    with pytest.raises(RuntimeError):
        with record_activations(inputs={"a": net[0]}, outputs={"b": net[1]}):
            net(torch.randn(1, 5, 4, 4))  # wrong channel count
    assert not net[0]._forward_pre_hooks and not net[1]._forward_hooks


def _spectrum_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 1),
    )  # fmt: skip


def test_channel_spectra_match_a_dense_covariance():
    """Every position of every image, centred, in float64: numpy's population covariance
    of the recorded inputs has the same eigenvalues, however the images are batched."""
    net = _spectrum_net().eval()
    x = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    consumers = {"mid": net[3], "last": net[5]}
    spectra = channel_spectra(net, x, consumers, batch_size=3)
    with record_activations(inputs=consumers) as rec:
        net(x)
    for name, module in consumers.items():
        rows = rec[name].permute(0, 2, 3, 1).reshape(-1, module.in_channels).double().numpy()
        expected = np.sort(np.linalg.eigvalsh(np.cov(rows, rowvar=False, bias=True)))[::-1]
        # rtol: the float32 activations of batches of 3 and of 10 differ in the last bits.
        np.testing.assert_allclose(spectra[name], np.clip(expected, 0, None), rtol=1e-6, atol=1e-9)
        assert spectra[name].shape == (module.in_channels,)


def test_channel_spectra_see_a_rank_deficient_input():
    """Channels that are copies of one another span a low-rank space: the spectrum has as
    many nonzero eigenvalues as independent channels."""
    conv = nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = conv.weight[1, 0] = conv.weight[2, 1] = 1.0  # channel 1 = 0
        conv.bias.zero_()
    net = nn.Sequential(conv, nn.Conv2d(3, 2, 1)).eval()
    x = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    ev = channel_spectra(net, x, {"c": net[1]})["c"]
    assert ev[0] >= ev[1] > 0.1 and ev[2] < 1e-10


def test_channel_spectra_remove_hooks_and_keep_the_model():
    net = _spectrum_net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(RuntimeError):
        channel_spectra(net, torch.randn(2, 5, 8, 8), {"mid": net[3]})  # wrong channel count
    assert not net[3]._forward_pre_hooks
    channel_spectra(net, torch.randn(2, 3, 8, 8), {"mid": net[3]})
    assert not net[3]._forward_pre_hooks and net.training
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match=r"never reached \['stray'\]"):
        channel_spectra(net, torch.randn(2, 3, 8, 8), {"stray": nn.Conv2d(6, 4, 1)})


def test_input_moments_of_a_linear_layer_are_those_of_its_rows():
    """A linear layer's (N, C) input: one vector per image, against numpy's mean and
    population covariance; a 3-d input is refused with its rank named."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    x = torch.randn(9, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    mean, cov = input_moments(net.eval(), x, {"fc": net[3]}, batch_size=4)["fc"]
    with torch.no_grad():
        rows = net[:3](x).double().numpy()
    np.testing.assert_allclose(mean.numpy(), rows.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(cov.numpy(), np.cov(rows, rowvar=False, bias=True), rtol=1e-5,
                               atol=1e-9)  # fmt: skip
    # Flattened 2x2 maps: 4 features per channel, each a position of that channel.
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Flatten(), nn.Linear(16, 2)).eval()
    x = torch.randn(9, 3, 5, 5, generator=torch.Generator().manual_seed(6))
    mean, cov = input_moments(net, x, {"fc": net[2]}, spread={"fc": 4})["fc"]
    with torch.no_grad():
        rows = net[0](x).permute(0, 2, 3, 1).reshape(-1, 4).double().numpy()
    np.testing.assert_allclose(mean.numpy(), rows.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(cov.numpy(), np.cov(rows, rowvar=False, bias=True), rtol=1e-5,
                               atol=1e-9)  # fmt: skip
    tokens = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="3-d"):
        input_moments(tokens, torch.randn(2, 5, 3), {"fc": tokens[0]})
