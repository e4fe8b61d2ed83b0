"""Tests of chanprune.schedule: MAC models and speed-up targets."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from chanprune.flops import count_macs
from chanprune.models import VGG, vgg16_bn_cifar10
from chanprune.prune import _chain_plan, _mac_model, _multipliers
from chanprune.schedule import (
    ConvCost,
    MacModel,
    energy_fractions,
    resolve_explicit,
    widths_for_energy,
    widths_for_speedup,
)


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


# ------------------------------------------------------------------ the energy schedule
def test_energy_fractions_known_values():
    np.testing.assert_allclose(
        energy_fractions(np.array([1.0, 3.0, 0.0, 4.0])), [0.5, 0.875, 1.0, 1.0]
    )
    # Negative round-off is clipped; an all-zero spectrum loses nothing at any width.
    np.testing.assert_allclose(energy_fractions(np.array([2.0, -1e-12])), [1.0, 1.0])
    np.testing.assert_array_equal(energy_fractions(np.zeros(3)), np.ones(3))


def _two_groups(coef_a: int = 1, coef_b: int = 1) -> MacModel:
    """Two independent groups ``a`` and ``b`` of 4 channels, each between a producer with
    one input channel and a consumer with one output channel: every channel of a group
    carries ``2 * coef`` MACs, whatever the other widths."""
    convs = []
    for g, coef in (("a", coef_a), ("b", coef_b)):
        convs.append(ConvCost(f"{g}.producer", coef, None, g, 1, 0))
        convs.append(ConvCost(f"{g}.consumer", coef, g, None, 0, 1))
    return MacModel(groups={"a": 4, "b": 4}, convs=tuple(convs))


def test_energy_prunes_the_redundant_group_and_dead_channels_first():
    model = _two_groups()
    energy = {
        "a": energy_fractions(np.array([10.0, 0.1, 0.0, 0.0])),  # rank 2, two dead channels
        "b": energy_fractions(np.array([1.0, 1.0, 1.0, 1.0])),  # flat: every channel counts
    }
    widths, achieved = widths_for_energy(model, 4 / 3, energy)  # 8 -> 6 channels
    assert widths == {"a": 2, "b": 4}  # the dead channels cost nothing
    assert achieved == pytest.approx(4 / 3)
    widths, _ = widths_for_energy(model, 2.0, energy)  # 8 -> 4 channels
    assert widths["a"] == 1 and widths["b"] == 3  # a's second channel is worth 1% of a


def _exhaustive(model: MacModel, energy: dict, target: float) -> float:
    """Smallest total -log E over every choice of widths within the MAC budget."""
    best = math.inf
    names = list(model.groups)
    for ws in itertools.product(*(range(1, model.groups[g] + 1) for g in names)):
        widths = dict(zip(names, ws))
        if model.macs(widths) <= target:
            cost = -sum(math.log(energy[g][w - 1]) for g, w in widths.items())
            best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_energy_greedy_matches_exhaustive_search_on_independent_groups(seed):
    """With MACs linear in each width (no coupling) and equal MACs per channel, removing
    the cheapest channel first is optimal for concave cumulative energies: the greedy
    allocation must reach the exhaustive optimum."""
    rng = np.random.default_rng(seed)
    model = _two_groups()
    energy = {g: energy_fractions(rng.exponential(size=4) ** 3) for g in model.groups}
    for n_removed in range(1, 7):  # 16 MACs, 2 per channel: every budget is exact
        speedup = 16 / (16 - 2 * n_removed)
        widths, achieved = widths_for_energy(model, speedup, energy)
        assert achieved == pytest.approx(speedup, rel=1e-12)
        cost = -sum(math.log(energy[g][w - 1]) for g, w in widths.items())
        assert cost == pytest.approx(_exhaustive(model, energy, model.macs(widths)), abs=1e-12)


@pytest.mark.parametrize("target", [1.3, 2.0, 4.0, 5.0])
def test_energy_hits_the_vgg_target_within_two_percent(vgg_cifar, target):
    model, plan, mac_model = vgg_cifar
    rng = np.random.default_rng(0)
    energy = {
        g: energy_fractions(rng.exponential(size=n) ** 2) for g, n in mac_model.groups.items()
    }
    widths, achieved = widths_for_energy(mac_model, target, energy)
    assert abs(achieved / target - 1) <= 0.02
    assert mac_model.macs() / count_macs(_built(widths, plan), (3, 32, 32)) == pytest.approx(
        achieved, rel=1e-12
    )


def test_energy_input_errors(vgg_cifar):
    model = _two_groups()
    flat = energy_fractions(np.ones(4))
    with pytest.raises(ValueError, match=r"no spectrum for the groups \['b'\]"):
        widths_for_energy(model, 2.0, {"a": flat})
    with pytest.raises(ValueError, match=r"energy\['b'\] must have shape \(4,\)"):
        widths_for_energy(model, 2.0, {"a": flat, "b": flat[:3]})
    with pytest.raises(ValueError, match=r"fractions in \[0, 1\] \(no NaN\)"):
        widths_for_energy(model, 2.0, {"a": flat, "b": np.array([0.5, np.nan, 1.0, 1.0])})
    with pytest.raises(ValueError, match=r"out of reach: at most 4x"):
        widths_for_energy(model, 5.0, {"a": flat, "b": flat})
