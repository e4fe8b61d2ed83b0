"""Tests of chanprune.schedule and of the width plans a speed-up target gives on VGG-16."""

from __future__ import annotations

import numpy as np
import pytest

from chanprune.flops import count_macs
from chanprune.models import VGG, vgg16_bn_cifar10
from chanprune.prune import plan_widths
from chanprune.schedule import energy_fractions, resolve_explicit

SHAPE = (3, 32, 32)
CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


@pytest.fixture(scope="module")
def vgg_cifar():
    return vgg16_bn_cifar10().eval()


def _built(widths: dict[str, int]) -> VGG:
    """A VGG-16-BN CIFAR whose conv and hidden linear outputs have the planned widths
    (group ``features.i`` is the output of the conv at ``features[i]``, ``classifier.i``
    of the linear layer there), built independently of the planner."""
    cfg, index = [], 0
    for v in CFG:
        if v == "M":
            cfg.append(v)
            index += 1
            continue
        cfg.append(widths.get(f"features.{index}", v))
        index += 3  # conv, BN, ReLU
    hidden = (widths.get("classifier.0", 512), widths.get("classifier.3", 512))
    return VGG(cfg, batch_norm=True, num_classes=10, pool_size=1, hidden_features=hidden)


@pytest.mark.parametrize("schedule", ["uniform", "paper"])
@pytest.mark.parametrize("target", [1.3, 2.0, 3.0, 4.0, 5.0])
def test_speedup_target_hit_within_two_percent(vgg_cifar, schedule, target):
    widths, achieved = plan_widths(vgg_cifar, SHAPE, speedup=target, schedule=schedule)
    assert abs(achieved / target - 1) <= 0.02
    # The achieved speed-up is the hook count of a network built with those widths.
    before = count_macs(vgg_cifar, SHAPE, include_linear=True)
    after = count_macs(_built(widths), SHAPE, include_linear=True)
    assert before / after == pytest.approx(achieved, rel=1e-12)
    if schedule == "paper":  # conv5_x (the groups its convs read: conv4_3 on) untouched
        conv5 = ["features.34", "features.37", "features.40"]
        assert all(widths.get(name, 512) == 512 for name in conv5)


def test_paper_ratio_conv4_is_one_and_a_half_of_conv1_to_3(vgg_cifar):
    widths, _ = plan_widths(vgg_cifar, SHAPE, speedup=2.0, schedule="paper")
    r3 = widths["features.17"] / 256  # conv3_1's output, conv3_2's input
    r4 = widths["features.27"] / 512  # conv4_1's output, conv4_2's input
    assert r4 / r3 == pytest.approx(1.5, rel=0.03)


def test_unreachable_and_invalid_targets(vgg_cifar):
    with pytest.raises(ValueError, match=r"speedup=1000 cannot be reached"):
        plan_widths(vgg_cifar, SHAPE, speedup=1000.0, schedule="paper")
    with pytest.raises(ValueError, match=r"'speedup' parameter must be in \(1.0"):
        plan_widths(vgg_cifar, SHAPE, speedup=1.0, schedule="uniform")
    with pytest.raises(ValueError, match="use prune_model, which makes them"):
        plan_widths(vgg_cifar, SHAPE, speedup=2.0, schedule="energy")


def test_explicit_schedule_validation():
    groups = {"a": 64, "b": 128}
    assert resolve_explicit(groups, {"a": 10, "b": 0.5}) == {"a": 10, "b": 64}
    with pytest.raises(ValueError, match=r"cannot be pruned here: \['c'\]"):
        resolve_explicit(groups, {"c": 3})
    with pytest.raises(ValueError, match=r"between 1 and 64 channels; got 65"):
        resolve_explicit(groups, {"a": 65})
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        resolve_explicit(groups, {"a": 1.5})
    with pytest.raises(TypeError, match="must be an int or a float"):
        resolve_explicit(groups, {"a": np.bool_(True)})
    with pytest.raises(TypeError, match="dict of group -> keep"):
        resolve_explicit(groups, [("a", 3)])


def test_energy_fractions_known_values():
    np.testing.assert_allclose(
        energy_fractions(np.array([1.0, 3.0, 0.0, 4.0])), [0.5, 0.875, 1.0, 1.0]
    )
    # Negative round-off is clipped; an all-zero spectrum loses nothing at any width.
    np.testing.assert_allclose(energy_fractions(np.array([2.0, -1e-12])), [1.0, 1.0])
    np.testing.assert_array_equal(energy_fractions(np.zeros(3)), np.ones(3))
