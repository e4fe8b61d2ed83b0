import itertools

import numpy as np
import pytest
import torch
from _graph_models import Dense, randomize, unit_activations
from torch import nn

import chanprune
from chanprune.graph import trace_plan, uniform_widths, widths_for_cost
from chanprune.models import CifarResNet
from chanprune.models.vgg import VGG
from chanprune.sensitivity import (
    SensitivityCurve,
    covariance_order,
    measure_sensitivity,
    output_divergence,
)

QUIET = dict(progress=False)


def _residual_variances(cov: np.ndarray, taken: list) -> np.ndarray:
    """Variance of each channel left after regressing out ``taken`` (dense Schur
    complement), the independent reference of the pivoted Cholesky."""
    if not taken:
        return np.diag(cov).copy()
    a = cov[np.ix_(taken, taken)]
    b = cov[:, taken]
    return np.diag(cov) - np.einsum("ij,ij->i", b @ np.linalg.inv(a), b)


def test_covariance_order_takes_the_largest_residual_variance_each_step():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 4)) @ rng.standard_normal((4, 7))  # rank 4 in 7 channels
    x[:, 6] *= 5.0
    cov = np.cov(x, rowvar=False, bias=True)
    order = covariance_order(cov)
    assert sorted(order.tolist()) == list(range(7))
    assert order[0] == 6  # the loudest channel first
    for step in range(4):
        residual = _residual_variances(cov, order[:step].tolist())
        residual[order[:step]] = -np.inf
        assert order[step] == int(np.argmax(residual))
    # Four channels span the rank-4 data: nothing is left to explain.
    assert np.all(_residual_variances(cov, order[:4].tolist()) < 1e-8 * np.trace(cov))


def test_output_divergence_is_kl_for_logits_and_relative_mse_otherwise():
    rng = np.random.default_rng(1)
    a = torch.from_numpy(rng.standard_normal((5, 10)))
    b = torch.from_numpy(rng.standard_normal((5, 10)))
    assert output_divergence(a, a) == pytest.approx(0.0, abs=1e-12)
    p = np.exp(a.numpy()) / np.exp(a.numpy()).sum(1, keepdims=True)
    q = np.exp(b.numpy()) / np.exp(b.numpy()).sum(1, keepdims=True)
    assert output_divergence(a, b) == pytest.approx(float((p * np.log(p / q)).sum()), rel=1e-10)
    maps = torch.from_numpy(rng.standard_normal((3, 2, 4, 4)))
    expected = ((2 * maps) - maps).pow(2).flatten(1).mean(1).sum() / maps.var(unbiased=False)
    assert output_divergence(maps, 2 * maps) == pytest.approx(float(expected), rel=1e-10)


class _LowRank(nn.Module):
    """conv1 -> conv2 -> maps, all linear: conv1's 8 outputs are combinations of 4."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.conv1(x))


def test_degradation_is_monotone_in_width_and_zero_at_the_planted_rank():
    torch.manual_seed(0)
    model = _LowRank().double().eval()
    mix = torch.randn(4, 4, dtype=torch.float64)
    with torch.no_grad():
        w, b = model.conv1.weight, model.conv1.bias
        w[4:] = torch.einsum("ij,jchw->ichw", mix, w[:4])
        b[4:] = mix @ b[:4]
    images = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    plan = trace_plan(model, (3, 8, 8))
    curves = measure_sensitivity(plan, images, ratios=(0.125, 0.25, 0.375, 0.5, 0.75))
    curve = curves["conv1"]
    assert curve.widths.tolist() == [1, 2, 3, 4, 6]
    # Nested kept sets and a linear network: each wider prediction is at least as good.
    assert np.all(np.diff(curve.degradation) <= 1e-12)
    assert curve.degradation[0] > 1e-3
    assert np.all(curve.degradation[3:] < 1e-9)  # 4 channels carry all 8
    cost = curve.cost()
    assert cost.shape == (9,) and cost[8] == 0.0 and np.isinf(cost[0])
    assert np.all(np.diff(cost) <= 0)
    for p in model.parameters():  # hooks gone: the model runs as before
        assert p.grad is None
    assert torch.equal(plan.graph(images), model(images))


class _LowRankHead(nn.Module):
    """conv -> pooled features -> fc1 -> fc2, all linear: fc1's 8 outputs are
    combinations of 4, and fc2 reads them as a 1x1 conv would."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc2(self.fc1(self.conv(x).mean((2, 3))))


class _LowRankFlat(nn.Module):
    """conv -> 2x2 maps flattened -> fc, all linear: the conv's 8 outputs are
    combinations of 4, and fc reads each channel's 4 positions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


@pytest.mark.parametrize("make, layer, spread", [(_LowRankHead, "fc1", 1),
                                                 (_LowRankFlat, "conv", 4)])
def test_degradation_through_a_linear_reader_is_zero_at_the_planted_rank(make, layer, spread):
    """The group is read by a linear layer: on pooled features (spread 1) or on a
    flattened 2x2 map (4 features per channel); 4 of its 8 channels carry all 8."""
    torch.manual_seed(0)
    model = make().double().eval()
    mix = torch.randn(4, 4, dtype=torch.float64)
    with torch.no_grad():
        w, b = model.get_submodule(layer).weight, model.get_submodule(layer).bias
        w[4:] = torch.einsum("ij,j...->i...", mix, w[:4])
        b[4:] = mix @ b[:4]
    images = torch.randn(40, 3, 8, 8, dtype=torch.float64)
    plan = trace_plan(model, (3, 8, 8))
    reader = next(c for c in plan.consumers if layer in c.in_groups)
    assert reader.linear and reader.spread == spread
    curve = measure_sensitivity(plan, images, ratios=(0.25, 0.5, 0.75))[layer]
    assert curve.widths.tolist() == [2, 4, 6]
    # Two channels cannot carry four (small logits: a small KL, still 10^4 x rounding).
    assert curve.degradation[0] > 1e-5 and np.all(curve.degradation[1:] < 1e-9)
    assert torch.equal(plan.graph(images), model(images))  # the hooks are gone


def test_cost_envelope_ignores_noise_that_rises_with_width():
    curve = SensitivityCurve(8, np.array([2, 4, 6]), np.array([0.5, 0.1, 0.2]))
    cost = curve.cost()
    assert cost[4] == pytest.approx(0.2) and cost[6] == pytest.approx(0.2)
    assert cost[2] == pytest.approx(0.5) and np.isinf(cost[1]) and np.isinf(cost[0])
    assert cost[7] == pytest.approx(0.1)  # halfway from 0.2 at 6 to 0 at 8


class _TwoBranches(nn.Module):
    """Two independent groups whose channels cost the same MACs: a separable knapsack."""

    def __init__(self) -> None:
        super().__init__()
        self.a1, self.a2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.a2(torch.relu(self.a1(x))), self.b2(torch.relu(self.b1(x)))], 1)


def test_widths_for_cost_matches_exhaustive_search_on_convex_costs():
    plan = trace_plan(_TwoBranches(), (3, 8, 8))
    assert set(plan.prunable) == {"a1", "b1"}
    sizes = np.arange(7, dtype=np.float64)
    costs = {  # convex, decreasing, 0 at full width
        "a1": np.where(sizes > 0, (6 - sizes) ** 2 * 1.0, np.inf),
        "b1": np.where(sizes > 0, (6 - sizes) ** 2 * 0.3, np.inf),
    }
    total = plan.macs()
    for speedup in (1.2, 1.5, 2.0):
        widths = widths_for_cost(plan, speedup, costs)
        macs = plan.macs(widths)
        assert abs(total / macs / speedup - 1) <= 0.02 or macs <= total / speedup
        best = min(
            costs["a1"][a] + costs["b1"][b]
            for a, b in itertools.product(range(1, 7), repeat=2)
            if plan.macs({"a1": a, "b1": b}) <= macs
        )
        assert costs["a1"][widths["a1"]] + costs["b1"][widths["b1"]] == pytest.approx(best)
        assert widths["b1"] <= widths["a1"]  # the cheaper group gives up more


def test_widths_for_cost_validates_its_costs():
    plan = trace_plan(_TwoBranches(), (3, 8, 8))
    with pytest.raises(ValueError, match="no entry for the prunable group 'b1'"):
        widths_for_cost(plan, 1.5, {"a1": np.zeros(7)})
    with pytest.raises(ValueError, match=r"cost\['a1'\] must have shape \(7,\)"):
        widths_for_cost(plan, 1.5, {"a1": np.zeros(6), "b1": np.zeros(7)})
    with pytest.raises(ValueError, match="cannot be reached"):
        widths_for_cost(plan, 50.0, {"a1": np.zeros(7), "b1": np.zeros(7)})


def _tiny_vgg() -> VGG:
    torch.manual_seed(0)
    model = VGG([12, 12, "M", 16, 16, "M", 24], num_classes=5, pool_size=1, hidden_features=16)
    return unit_activations(randomize(model), torch.randn(32, 3, 16, 16))


def _tiny_resnet() -> CifarResNet:
    torch.manual_seed(0)
    return unit_activations(
        randomize(CifarResNet(depth=14, num_classes=10)), torch.randn(32, 3, 16, 16)
    )


@pytest.mark.parametrize("make", [_tiny_vgg, _tiny_resnet, lambda: randomize(Dense())])
def test_sensitivity_schedule_meets_the_mac_target(make):
    model = make().eval()
    images = torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    pruned, report = chanprune.prune_model(
        model, images, speedup=1.7, schedule="sensitivity", **QUIET
    )
    assert report.schedule == "sensitivity" and report.options["planner"] == "graph"
    assert abs(report.speedup / 1.7 - 1) <= 0.02
    plan = trace_plan(model, (3, 16, 16))
    assert report.speedup == pytest.approx(plan.macs() / trace_plan(pruned, (3, 16, 16)).macs())
    assert pruned(images).shape == model(images).shape


def test_sensitivity_allocation_differs_from_uniform_and_costs_less():
    model = _tiny_vgg().eval()
    images = torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    plan = trace_plan(model, (3, 16, 16))
    curves = measure_sensitivity(plan, images)
    cost = {name: curve.cost() for name, curve in curves.items()}
    chosen = widths_for_cost(plan, 2.0, cost)
    uniform = uniform_widths(plan, 2.0)
    assert chosen != uniform
    predicted = {k: sum(cost[g][w[g]] for g in cost) for k, w in (("s", chosen), ("u", uniform))}
    assert predicted["s"] <= predicted["u"]


def test_sensitivity_needs_data():
    model = _tiny_vgg()
    with pytest.raises(ValueError, match="use prune_model, which makes them"):
        chanprune.plan_widths(model, (3, 16, 16), speedup=2.0, schedule="sensitivity")
    plan = trace_plan(model, (3, 16, 16))
    with pytest.raises(ValueError, match=r"ratios must be fractions in \(0, 1\)"):
        measure_sensitivity(plan, torch.randn(4, 3, 16, 16), ratios=(0.5, 1.0))
