"""Tests of chanprune.schedule: MAC models and speed-up targets."""

from __future__ import annotations

import pytest

from chanprune.flops import count_macs
from chanprune.models import VGG, vgg16_bn_cifar10
from chanprune.prune import _chain_plan, _mac_model, _multipliers
from chanprune.schedule import resolve_explicit, widths_for_speedup


@pytest.fixture(scope="module")
def vgg_cifar():
    model = vgg16_bn_cifar10().eval()
    plan = _chain_plan(model)
    return model, plan, _mac_model(model, plan, (3, 32, 32))


def _built(widths: dict[str, int], plan) -> VGG:
    """A VGG-16-BN CIFAR whose conv outputs have the scheduled widths."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    conv_positions = [i for i, v in enumerate(cfg) if v != "M"]
    for n, consumer in enumerate(plan):  # consumer n+1 sets the width of conv n
        cfg[conv_positions[n]] = widths[consumer.name]
    return VGG(cfg, batch_norm=True, num_classes=10, pool_size=1, hidden_features=512)


def test_mac_model_matches_counted_macs(vgg_cifar):
    model, plan, mac_model = vgg_cifar
    assert mac_model.macs() == count_macs(model, (3, 32, 32))
    widths = {
        name: max(1, size // (i + 2)) for i, (name, size) in enumerate(mac_model.groups.items())
    }
    assert mac_model.macs(widths) == count_macs(_built(widths, plan), (3, 32, 32))


@pytest.mark.parametrize("schedule", ["uniform", "paper"])
@pytest.mark.parametrize("target", [1.3, 2.0, 3.0, 4.0, 5.0])
def test_speedup_target_hit_within_two_percent(vgg_cifar, schedule, target):
    model, plan, mac_model = vgg_cifar
    widths, achieved = widths_for_speedup(mac_model, target, _multipliers(plan, schedule))
    assert abs(achieved / target - 1) <= 0.02
    counted = count_macs(_built(widths, plan), (3, 32, 32))
    assert mac_model.macs() / counted == pytest.approx(achieved, rel=1e-12)
    if schedule == "paper":
        conv5 = [c.name for c in plan if c.stage >= 5]
        assert all(widths[name] == mac_model.groups[name] for name in conv5)


def test_paper_ratio_conv4_is_one_and_a_half_of_conv1_to_3(vgg_cifar):
    _, plan, mac_model = vgg_cifar
    widths, _ = widths_for_speedup(mac_model, 2.0, _multipliers(plan, "paper"))
    r3 = widths["features.20"] / mac_model.groups["features.20"]  # conv3_2's input
    r4 = widths["features.30"] / mac_model.groups["features.30"]  # conv4_2's input
    assert r4 / r3 == pytest.approx(1.5, rel=0.03)


def test_unreachable_and_invalid_targets(vgg_cifar):
    _, plan, mac_model = vgg_cifar
    with pytest.raises(ValueError, match=r"out of reach for this schedule: at most"):
        widths_for_speedup(mac_model, 1000.0, _multipliers(plan, "paper"))
    with pytest.raises(ValueError, match=r"'speedup' parameter must be in \(1.0"):
        widths_for_speedup(mac_model, 1.0, _multipliers(plan, "uniform"))


def test_explicit_schedule_validation(vgg_cifar):
    _, _, mac_model = vgg_cifar
    assert resolve_explicit(mac_model, {"features.3": 10, "features.7": 0.5}) == {
        "features.3": 10,
        "features.7": 32,
    }
    with pytest.raises(ValueError, match=r"cannot be pruned here: \['features.0'\]"):
        resolve_explicit(mac_model, {"features.0": 3})
    with pytest.raises(ValueError, match=r"between 1 and 64 channels; got 65"):
        resolve_explicit(mac_model, {"features.3": 65})
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        resolve_explicit(mac_model, {"features.3": 1.5})
