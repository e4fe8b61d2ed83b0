"""Tests of chanprune.sampling: positions, patches, hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chanprune.sampling import (
    extract_patches,
    gather_outputs,
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
