"""The graph planner (chanprune.graph) and the general sweep (chanprune.sweep) on small
networks written the way other people write them."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from _graph_models import (
    Chain,
    DataDependent,
    Dense,
    Grouped,
    Inverted,
    PooledHead,
    PreActResNet,
    Residual,
    Shuffle,
    ViewHead,
    conv_bn,
    masked_equivalent,
    randomize,
)
from _planted import conv_macs_by_hooks
from torch import nn

import chanprune
from chanprune.exceptions import UnsupportedLayerError
from chanprune.graph import (
    PlanWarning,
    explicit_widths,
    trace_plan,
    uniform_widths,
    with_channel_samplers,
)
from chanprune.surgery import SampledConv2d

SHAPE = (3, 16, 16)
MODELS = [Chain, Residual, Inverted, Dense, Grouped, PooledHead, ViewHead]


def _prune(model, speedup=2.0, **kwargs):
    images = torch.randn(24, *SHAPE, generator=torch.Generator().manual_seed(1))
    options = dict(
        speedup=speedup, progress=False, positions_per_image=None, planner="graph",
        schedule="uniform",
    )  # fmt: skip
    options.update(kwargs)
    return chanprune.prune_model(model, images, **options), images


# ---------------------------------------------------------------------------- the plan
def test_chain_groups_and_reasons():
    plan = trace_plan(randomize(Chain()), SHAPE)
    # The head reads the flattened 8x8 maps of body.c: a conv over the whole map.
    assert plan.prunable == {"body.a.0": 32, "body.b.0": 48, "body.c.0": 32}
    head = next(c for c in plan.consumers if c.name == "head")
    assert head.linear and head.spread == 64 and head.layout == (("body.c.0", 32),)
    assert plan.macs({"body.c.0": 16}) == plan.macs() - (32 - 16) * 64 * 10 - (
        48 * 9 * 64 * 16)  # fmt: skip
    group = plan.groups["body.a.0"]
    assert group.producers == ("body.a.0",)
    assert group.consumers == ("body.b.0",)
    assert [name for name, _ in group.carriers] == ["body.a.1"]  # its BatchNorm


def test_residual_groups_tied_and_kept():
    plan = trace_plan(randomize(Residual()), SHAPE)
    # Branch-internal groups are pruned; the stream (stem, each block's second conv, the
    # zero channels of the pad) is tied by the additions and kept whole.
    assert set(plan.prunable) == {f"stages.{i}.one.0" for i in range(3)}
    stream = plan.groups["stem.0"]
    assert not stream.prunable and any("residual" in r for r in stream.fixed)
    consumer = {c.name: c for c in plan.consumers}["stages.0.two.0"]
    assert consumer.bn == "stages.0.two.1" and consumer.addend is not None


def test_squeeze_excitation_and_depthwise_join_one_group():
    plan = trace_plan(randomize(Inverted()), SHAPE)
    group = plan.groups["expand.0"]
    assert group.prunable
    # The SE's expanding conv writes into the same channels through the multiply.
    assert set(group.producers) == {"expand.0", "se_expand"}
    assert set(group.consumers) == {"se_reduce", "project.0"}
    carriers = {name for name, _ in group.carriers}
    assert {"expand.1", "dw.0", "dw.1"} <= carriers


def test_concat_layouts_and_no_bias_consumers():
    plan = trace_plan(randomize(Dense()), SHAPE)
    consumers = {c.name: c for c in plan.consumers}
    assert consumers["conv2"].layout == (("stem", 24), ("conv1", 16))
    assert consumers["trans"].layout == (("stem", 24), ("conv1", 16), ("conv2", 16))
    assert plan.groups["stem"].consumers == ("conv1", "conv2", "trans")
    # The classifier on the pooled features is a consumer (a 1x1 conv on them), so the
    # transition conv's output is a group too; the logits are the network's output.
    assert consumers["fc"].linear and consumers["fc"].layout == (("trans", 16),)
    assert plan.prunable == {"stem": 24, "conv1": 16, "conv2": 16, "trans": 16}
    assert "the network's output" in plan.groups["fc"].fixed


def test_linear_layers_read_and_write_groups_as_1x1_convs():
    plan = trace_plan(randomize(PooledHead()), SHAPE)
    consumers = {c.name: c for c in plan.consumers}
    assert plan.prunable == {"body.0.0": 32, "body.2.0": 48, "fc1": 64}
    assert consumers["fc1"].linear and consumers["fc1"].layout == (("body.2.0", 48),)
    assert consumers["fc1"].bn == "bn"  # a BatchNorm1d after it folds like a conv's
    assert plan.groups["fc1"].consumers == ("fc2",)
    assert not consumers["body.2.0"].linear
    # A linear layer costs in x out per image, in its groups' widths.
    assert plan.macs({"fc1": 32}) == plan.macs() - 48 * 32 - 32 * 10
    # Maps flattened by x.view: 16 features per channel, read as a conv over the map.
    plan = trace_plan(randomize(ViewHead()), SHAPE)
    assert plan.prunable == {"a.0": 16, "b.0": 16, "fc1": 32}
    consumers = {c.name: c for c in plan.consumers}
    assert consumers["fc1"].spread == 16 and consumers["fc2"].spread == 1
    assert plan.macs() == conv_macs_by_hooks(ViewHead(), SHAPE, include_linear=True)
    assert plan.macs({"b.0": 8}) == plan.macs() - 8 * 16 * 9 * 64 - 8 * 16 * 32


class _Tokens(nn.Module):
    """A linear layer over (N, T, C) tokens: its features are not dimension 1."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(2).transpose(1, 2))


class _Wide(nn.Module):
    """A classifier over more features than a consumer's statistics hold."""

    def __init__(self, width):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.wide = nn.Conv2d(8, width, 1)
        self.fc = nn.Linear(width, 3)

    def forward(self, x):
        return self.fc(self.wide(self.conv(x)).mean((2, 3)))


class _FlatMix(nn.Module):
    """Flattened 4x4 maps read per feature: a BatchNorm1d on one, a sum with the other."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1, stride=4)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm1d(64)
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        x = self.a(x)
        return self.fc(self.bn(self.b(x).flatten(1)) + self.c(x).flatten(1))


def test_flattened_maps_read_per_feature_keep_their_channels():
    plan = trace_plan(_FlatMix(), SHAPE)
    assert plan.prunable == {"a": 4}
    group = plan.groups["b"]  # the sum ties c's channels to b's
    assert group.producers == ("b", "c")
    reasons = " ".join(group.fixed)
    assert "flattened with the positions, then read by bn (BatchNorm1d)" in reasons
    assert "then read by add()" in reasons
    assert not any(c.linear for c in plan.consumers if c.in_groups)


def test_linear_layers_the_planner_cannot_refit_keep_their_groups_whole():
    from chanprune.graph import MAX_LINEAR_FEATURES

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlanWarning)  # the transpose is unknown
        plan = trace_plan(_Tokens(), SHAPE)
    assert "conv" not in plan.prunable and not any(c.linear for c in plan.consumers)
    plan = trace_plan(_Wide(MAX_LINEAR_FEATURES + 8), (3, 2, 2))
    reasons = plan.groups["wide"].fixed
    assert any(f"over {MAX_LINEAR_FEATURES + 8} features" in why for why in reasons)
    assert "conv" in plan.prunable  # read by the wide conv, not the linear layer
    assert "wide" in trace_plan(_Wide(64), (3, 2, 2)).prunable


def test_grouped_conv_parts():
    plan = trace_plan(randomize(Grouped()), SHAPE)
    assert plan.groups["reduce.0"].parts == 4
    assert plan.groups["grouped.0"].parts == 4
    widths = uniform_widths(plan, 1.5)
    assert widths["reduce.0"] % 4 == 0 and widths["grouped.0"] % 4 == 0
    with pytest.raises(ValueError, match="multiple of 4"):
        explicit_widths(plan, {"reduce.0": 6})


def test_unknown_op_keeps_its_groups_whole_with_one_warning():
    with pytest.warns(PlanWarning, match="a.0: read by .*'view'") as caught:
        plan = trace_plan(randomize(Shuffle()), SHAPE)
    assert len([w for w in caught if issubclass(w.category, PlanWarning)]) == 1
    assert not plan.groups["a.0"].prunable
    assert plan.groups["b.0"].prunable  # after the shuffle: an ordinary group


def test_untraceable_model_refused_with_reason():
    with pytest.raises(UnsupportedLayerError, match="DataDependent cannot be traced"):
        trace_plan(DataDependent(), SHAPE)
    with pytest.raises(UnsupportedLayerError, match="cannot be traced"):
        chanprune.prune_model(DataDependent(), torch.randn(4, *SHAPE), speedup=2.0,
                              progress=False)  # fmt: skip


def test_wrong_input_shape_names_the_layer_error():
    with pytest.raises(ValueError, match="does not accept inputs of shape"):
        trace_plan(Chain(), (3, 8, 8))


@pytest.mark.parametrize("cls", MODELS + [PreActResNet, Shuffle])
def test_plan_macs_equal_hook_count(cls):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlanWarning)
        model = randomize(cls())
        plan = trace_plan(model, SHAPE)
    assert plan.macs() == conv_macs_by_hooks(model, SHAPE, include_linear=True)


# ---------------------------------------------------------------------------- the sweep
@pytest.mark.parametrize("cls", MODELS)
def test_prune_reaches_target_and_equals_masked_original(cls):
    model = randomize(cls())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (pruned, report), images = _prune(model, speedup=1.6)
    assert report.options["planner"] == "graph"
    assert abs(report.speedup / 1.6 - 1) <= 0.02
    # The reported MACs are the hook count of the pruned network.
    assert report.macs_after == conv_macs_by_hooks(pruned, SHAPE, include_linear=True)
    assert report.macs_before == conv_macs_by_hooks(model, SHAPE, include_linear=True)
    for key, value in model.state_dict().items():  # the input model is untouched
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    plan = trace_plan(model, SHAPE)
    masked = masked_equivalent(model, pruned, plan, report.options["kept"])
    with torch.no_grad():
        out, ref = pruned(images[:6]), masked(images[:6])
    assert out.shape == model(images[:6]).shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("method", ["lasso", "greedy_ls", "max_response", "first_k", "random"])
def test_every_graph_method_runs_on_shared_groups(method):
    (pruned, report), _ = _prune(randomize(Dense()), speedup=1.5, method=method)
    assert abs(report.speedup / 1.5 - 1) <= 0.02
    assert all(np.isfinite(r.rel_error) for r in report.layers)


def test_refit_lowers_the_error_against_the_original():
    """Independent reference: the output error of the pruned network with the refit
    against the same selection without it (kept channels' weights sliced)."""
    model = randomize(Inverted())
    images = torch.randn(48, *SHAPE, generator=torch.Generator().manual_seed(3))
    kwargs = dict(speedup=1.6, progress=False, positions_per_image=None, planner="graph",
                  holdout=0.0, method="first_k")  # fmt: skip
    refit, _ = chanprune.prune_model(model, images, **kwargs)
    plain, _ = chanprune.prune_model(model, images, refit=False, **kwargs)
    with torch.no_grad():
        ref = model(images)
        err_refit = float((refit(images) - ref).norm())
        err_plain = float((plain(images) - ref).norm())
    assert err_refit < 0.7 * err_plain


def test_a_refit_is_kept_only_where_it_lowers_the_held_out_error():
    """Only the first conv's group is narrowed: the head's layers are refit for the drift
    alone. With 4 fit images for 49 and 65 unknowns per output the refits interpolate
    them, and both layers keep their function (so on 12 of 12 seeds tried); with 300 the
    first one's refit stays."""
    torch.manual_seed(0)
    model = randomize(PooledHead()).eval()
    kwargs = dict(schedule={"body.0.0": 16}, progress=False, positions_per_image=None)
    features = torch.randn(32, 48, generator=torch.Generator().manual_seed(7))
    for n_images, holdout in ((8, 0.5), (400, 0.25)):
        images = torch.randn(n_images, *SHAPE, generator=torch.Generator().manual_seed(1))
        pruned, report = chanprune.prune_model(
            copy.deepcopy(model), images, holdout=holdout, **kwargs
        )  # fmt: skip
        layers = {layer.name: layer for layer in report.layers}
        with torch.no_grad():
            fc1_of = {m: m.bn(m.fc1(features)) for m in (model, pruned.eval())}
            fc2_of = {m: m.fc2(fc1_of[model]) for m in (model, pruned)}
        if n_images == 8:
            for name in ("fc1", "fc2"):
                assert layers[name].rel_error == pytest.approx(
                    layers[name].rel_error_before_refit, rel=1e-9)  # fmt: skip
            torch.testing.assert_close(fc1_of[pruned], fc1_of[model], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fc2_of[pruned], fc2_of[model], rtol=1e-5, atol=1e-5)
        else:
            assert layers["fc1"].rel_error < 0.5 * layers["fc1"].rel_error_before_refit
            assert not torch.allclose(fc1_of[pruned], fc1_of[model], rtol=1e-3, atol=1e-3)


def test_held_out_comparison_is_a_paired_z_score_of_the_row_errors():
    """Against the z-score written out with numpy on the same rows."""
    from chanprune.sweep import HeldOut

    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3, 1, 1))
    w_true = rng.normal(size=(2, 3, 1, 1))
    Y = np.einsum("rcij,ocij->ro", X, w_true) + 0.1 * rng.normal(size=(40, 2))
    held = HeldOut()
    for part in (slice(0, 25), slice(25, 40)):
        held.add(torch.from_numpy(X[part]), torch.from_numpy(Y[part]))
    kept = np.arange(3)
    noisy = (w_true + 0.05 * rng.normal(size=w_true.shape), np.zeros(2))
    exact = (w_true, np.zeros(2))

    def rows(weight, bias):
        return np.square(Y - np.einsum("rcij,ocij->ro", X, weight) - bias).sum(1)

    drop = rows(*noisy) - rows(*exact)
    expected = drop.mean() / (drop.std(ddof=1) / np.sqrt(len(drop)))
    rel_noisy, rel_exact, z = held.compare(kept, noisy, exact)
    assert z == pytest.approx(expected, rel=1e-9)
    y2 = np.square(Y).sum()
    assert rel_noisy == pytest.approx(rows(*noisy).sum() / y2, rel=1e-9)
    assert rel_exact == pytest.approx(rows(*exact).sum() / y2, rel=1e-9)
    assert rel_exact == pytest.approx(held.rel_error(kept, *exact), rel=1e-12)
    assert held.compare(kept, exact, noisy)[2] == pytest.approx(-expected, rel=1e-9)
    assert held.compare(kept, exact, exact)[2] == 0.0
    assert HeldOut().compare(kept, exact, noisy) is None


def test_data_schedules_keep_groups_a_linear_layer_reads_from_too_few_images():
    """One vector per image spans at most that many channels: with 24 images (18 fit,
    fewer than twice 48 or 64) the energy schedule would see a free cut there."""
    from chanprune.prune import _keep_undersampled

    plan = trace_plan(randomize(PooledHead()), SHAPE)
    cost = {name: np.zeros(g.size + 1) for name, g in plan.groups.items() if g.prunable}
    kept = _keep_undersampled(plan, cost, n_images=100)
    assert np.isinf(kept["fc1"][:-1]).all() and kept["fc1"][-1] == 0  # 100 < 2 x 64
    assert not np.isinf(kept["body.2.0"]).any()  # 100 >= 2 x 48
    assert not np.isinf(kept["body.0.0"]).any()  # read by a conv
    assert not np.isinf(cost["fc1"]).any()  # the input is not changed
    # A flattened map gives each image 16 vectors of b.0's 16 channels.
    plan = trace_plan(randomize(ViewHead()), SHAPE)
    cost = {name: np.zeros(g.size + 1) for name, g in plan.groups.items() if g.prunable}
    assert np.isinf(_keep_undersampled(plan, cost, n_images=1)["b.0"][:-1]).all()
    assert not np.isinf(_keep_undersampled(plan, cost, n_images=2)["b.0"]).any()
    images = torch.randn(24, *SHAPE, generator=torch.Generator().manual_seed(2))
    _, report = chanprune.prune_model(
        randomize(PooledHead()), images, speedup=1.3, schedule="energy", progress=False
    )
    widths = report.options["widths"]
    assert widths["fc1"] == 64 and widths["body.2.0"] == 48 and widths["body.0.0"] < 32


def test_residual_correction_lowers_block_output_error():
    """With the correction, the pruned network's block outputs track the original's
    better than without (measured on the images, not on the refit's own statistics)."""
    model = randomize(Residual())
    images = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(4))
    kwargs = dict(speedup=1.5, progress=False, positions_per_image=None, planner="graph",
                  holdout=0.0, correct_unpruned=False)  # fmt: skip
    errors = {}
    for correct in (True, False):
        pruned, _ = chanprune.prune_model(model, images, residual_correction=correct, **kwargs)
        with torch.no_grad():  # the last block's output: the model without its head
            ref = model.stages(torch.relu(model.stem(images)))
            out = pruned.stages(torch.relu(pruned.stem(images)))
        errors[correct] = float((out - ref).norm() / ref.norm())
    assert errors[True] < errors[False]


def test_preactivation_resnet_goes_to_the_graph_planner():
    """Its names look like a ResNet (layer1, conv1/bn1/conv2/bn2) but bn2 precedes conv2:
    the name planner would mistake it; auto checks the names against the graph."""
    model = randomize(PreActResNet())
    images = torch.randn(16, *SHAPE)
    pruned, report = chanprune.prune_model(model, images, speedup=1.3, progress=False)
    assert report.options["planner"] == "graph"
    with torch.no_grad():
        assert pruned(images).shape == (16, 10)


def test_graph_planner_refuses_what_it_does_not_offer():
    images = torch.randn(4, *SHAPE)
    with pytest.raises(ValueError, match="no conv of this network reads one"):
        chanprune.prune_model(
            Dense(), images, speedup=2.0, channel_sampler=True, progress=False
        )
    # The paper's schedule runs on the graph, for the chains and ResNets it defines.
    with pytest.raises(ValueError, match="schedule='paper' is defined for VGG-style"):
        chanprune.prune_model(Dense(), images, speedup=2.0, schedule="paper", progress=False)


@pytest.mark.parametrize("schedule", ["energy", "sensitivity"])
def test_data_driven_schedules_on_the_graph(schedule):
    torch.manual_seed(0)
    model = randomize(Dense())
    images = torch.randn(32, *SHAPE, generator=torch.Generator().manual_seed(0))
    pruned, report = chanprune.prune_model(
        model, images, speedup=1.6, schedule=schedule, progress=False
    )
    assert report.schedule == schedule and report.options["planner"] == "graph"
    assert abs(report.speedup / 1.6 - 1) <= 0.02
    with pytest.raises(ValueError, match="use prune_model"):
        chanprune.plan_widths(model, SHAPE, speedup=1.6, schedule=schedule)


def test_explicit_widths_by_group_name():
    model = randomize(Dense())
    images = torch.randn(16, *SHAPE)
    pruned, report = chanprune.prune_model(
        model, images, schedule={"stem": 12, "conv1": 0.5}, progress=False, planner="graph"
    )
    assert report.options["widths"] == {"stem": 12, "conv1": 8}
    assert pruned.conv1.in_channels == 12 and pruned.conv2.in_channels == 20
    with pytest.raises(ValueError, match="not a channel group"):
        chanprune.prune_model(model, images, schedule={"nope": 3}, progress=False,
                              planner="graph")  # fmt: skip


def test_graph_sweep_is_reproducible():
    model = randomize(Inverted())
    (a, ra), _ = _prune(model, method="lasso", speedup=1.5)
    (b, rb), _ = _prune(model, method="lasso", speedup=1.5)
    assert ra.options["kept"] == rb.options["kept"]
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=0, atol=0)


def _assert_same_prune(a, b):
    """The same kept channels, and the same weights to float rounding."""
    (model_a, report_a), (model_b, report_b) = a, b
    assert report_a.options["kept"] == report_b.options["kept"]
    state_b = model_b.state_dict()
    for key, value in model_a.state_dict().items():
        assert torch.allclose(value, state_b[key], rtol=1e-5), key


class _InPlaceStatements(torch.nn.Module):
    """In-place ReLUs written as statements: their nodes have no users, and the trace's
    later nodes read the tensors they wrote (a recomputation must run them too)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = conv_bn(3, 16), conv_bn(16, 16), conv_bn(16, 8)

    def forward(self, x):
        x = self.a(x)
        torch.nn.functional.relu(x, inplace=True)
        x = self.b(x)
        x.relu_()
        return self.c(x).mean((2, 3))


class _WritesAfter(torch.nn.Module):
    """An in-place statement after the first consumer on the value it reads."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = conv_bn(3, 16), conv_bn(16, 16), conv_bn(32, 8)

    def forward(self, x):
        x = self.a(x)
        y = self.b(x)
        x.mul_(2.0)  # both networks would write a shared x (not idempotent)
        return self.c(torch.cat([x, y], 1)).mean((2, 3))


@pytest.mark.parametrize("cls", [Chain, Residual, _InPlaceStatements, _WritesAfter])
def test_the_first_maps_shared_by_both_networks_give_the_same_result(cls, monkeypatch):
    """Until the first change, the pruned network's caches are the original's values (one
    copy of the largest maps); not where an in-place statement would write them later."""
    from chanprune.sweep import _GraphSweep

    model = randomize(cls()).double()
    images = torch.randn(24, *SHAPE, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(3))  # fmt: skip
    options = dict(speedup=1.6, schedule="uniform", positions_per_image=None, progress=False)
    decisions = []
    real = _GraphSweep.shares_values
    monkeypatch.setattr(_GraphSweep, "shares_values",
                        lambda self, stop: decisions.append(real(self, stop)) or decisions[-1])
    shared, report = chanprune.prune_model(model, images, **options)
    monkeypatch.setattr(_GraphSweep, "shares_values", lambda self, stop: False)
    separate, reference = chanprune.prune_model(model, images, **options)
    if cls is _WritesAfter:  # the images at a's input; not a's output at b's
        assert decisions[:2] == [True, False]
    else:
        assert any(decisions[1:])  # past the stem, where the maps are large
    assert report.options["kept"] == reference.options["kept"]
    with torch.no_grad():
        torch.testing.assert_close(shared(images), separate(images), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cls", [Chain, Residual, _InPlaceStatements])
def test_cache_budget_zero_recomputes_from_the_images_with_the_same_result(cls, caplog):
    # float64 (here and below): recomputed values differ from the cached ones by float
    # rounding only, which the refits amplify to ~1e-5 in float32.
    torch.manual_seed(0)
    model = randomize(cls()).double()
    images = torch.randn(24, *SHAPE, generator=torch.Generator().manual_seed(1)).double()
    options = dict(speedup=1.8, progress=False, positions_per_image=None, schedule="uniform")
    unbounded = chanprune.prune_model(model, images, planner="graph", **options)
    with caplog.at_level("INFO", logger="chanprune.sweep"):
        # planner="auto" takes the graph with a budget too
        bounded = chanprune.prune_model(model, images, max_cache_mb=0, **options)
    assert bounded[1].options["planner"] == "graph"
    assert bounded[1].options["max_cache_mb"] == 0.0
    assert unbounded[1].options["max_cache_mb"] is None
    assert "recomputing from the images" in caplog.text
    _assert_same_prune(unbounded, bounded)


def test_cache_budget_bounds_the_values_held_between_consumers(monkeypatch):
    import chanprune.sweep as sweep

    # Bytes in both networks' caches (the images aside) before and after each visit: what
    # they hold between consumers, not a chunk's passing values.
    held = []

    def cached_bytes(envs):
        storages = {}
        for env in envs:
            for node, value in env.items():
                if node.op != "placeholder" and torch.is_tensor(value):
                    storages[value.untyped_storage().data_ptr()] = value.untyped_storage()
        return sum(storage.nbytes() for storage in storages.values())

    visit = sweep._GraphSweep.visit

    def counted(self, consumer, envs_ref, envs_pr, *args, **kwargs):
        held.append(cached_bytes(envs_ref) + cached_bytes(envs_pr))
        visit(self, consumer, envs_ref, envs_pr, *args, **kwargs)
        held.append(cached_bytes(envs_ref) + cached_bytes(envs_pr))

    monkeypatch.setattr(sweep._GraphSweep, "visit", counted)
    torch.manual_seed(0)
    model = randomize(Residual()).double()
    images = torch.randn(24, *SHAPE, generator=torch.Generator().manual_seed(1)).double()
    options = dict(speedup=2.0, progress=False, schedule="uniform", batch_size=8)
    unbounded = chanprune.prune_model(model, images, **options)
    frontiers = [b for b in held if b > 0]
    budget = (min(frontiers) + max(frontiers)) / 2
    held.clear()
    bounded = chanprune.prune_model(model, images, max_cache_mb=budget / 2**20, **options)
    # Some consumers' values fit and are cached, the others are recomputed.
    assert 0 < max(held) <= budget < max(frontiers)
    _assert_same_prune(unbounded, bounded)


class _StatementBetweenReaders(torch.nn.Module):
    """Group ``a`` read by ``b``, then by ``c`` after an in-place ReLU written as a
    statement (``inplace``) or out of place (the same function): the statement sits
    between the group's first consumer and a later one, whose statistics are sampled from
    the frontier at ``b``. ``through_bn``: the statement writes a BatchNorm's output
    (made after the frontier) instead of the cached ``x`` itself."""

    def __init__(self, inplace: bool, through_bn: bool = False) -> None:
        super().__init__()
        self.inplace, self.through_bn = inplace, through_bn
        self.a, self.b, self.c = conv_bn(3, 16), conv_bn(16, 8), conv_bn(16, 8)
        self.n = torch.nn.BatchNorm2d(16)

    def forward(self, x):
        x = self.a(x)
        y = self.b(x)
        if self.through_bn:
            x = self.n(x)
        if self.inplace:
            x.relu_()
        else:
            x = torch.nn.functional.relu(x)
        return (y + self.c(x)).mean((2, 3))


@pytest.mark.parametrize("through_bn", [False, True])
def test_inplace_statement_before_a_later_consumer_is_run_when_it_is_sampled(through_bn):
    images = torch.randn(24, *SHAPE, generator=torch.Generator().manual_seed(1)).double()
    options = dict(speedup=2.0, progress=False, positions_per_image=None, planner="graph",
                   schedule="uniform", method="lasso")  # fmt: skip
    results = []
    for inplace in (True, False):
        torch.manual_seed(0)
        model = randomize(_StatementBetweenReaders(inplace, through_bn)).double()
        results.append(chanprune.prune_model(model, images, **options))
    (_, report), _ = results
    assert report.options["widths"]["a.0"] < 16  # the group read by b and c is pruned
    _assert_same_prune(*results)


class _Writes(torch.nn.Module):
    """In-place statements between two readers of one value, not all idempotent."""

    def __init__(self) -> None:
        super().__init__()
        self.a = conv_bn(3, 4)
        self.b, self.c = torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.a(x)
        y = self.b(x)
        x.mul_(2.0)
        torch.nn.functional.relu(x, inplace=True)
        z = self.c(x)
        x.add_(1.0)
        return y + z + x


def test_runner_evaluate_runs_the_inplace_statements_it_depends_on():
    import torch.fx as fx

    from chanprune.sweep import _Runner

    model = randomize(_Writes())
    gm = fx.symbolic_trace(model)
    runner = _Runner(gm)
    images = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    # What the module computes, and what b and c read (hooks on the traced module).
    seen = {}
    hooks = [
        getattr(gm, name).register_forward_pre_hook(
            lambda _m, args, name=name: seen.__setitem__(name, args[0].clone())
        )
        for name in ("b", "c")
    ]
    with torch.no_grad():
        expected = model(images.clone())
        for hook in hooks:
            hook.remove()
        gm(images.clone())
        names = {n.target: n.name for n in runner.nodes if n.op == "call_module"}
        start = runner.pos[names["b"]]
        for stop in (runner.pos[runner.placeholder.name] + 1, start, runner.pos[names["c"]]):
            env = {runner.placeholder: images.clone()}
            runner.advance(env, runner.pos[runner.placeholder.name] + 1, stop)
            cached = {node: value.clone() for node, value in env.items()}
            output = next(n for n in runner.nodes if n.op == "output").args[0]
            values = runner.evaluate(env, [output.name], stop)
            torch.testing.assert_close(values[output.name], expected)
            if stop <= start:
                # b reads x before the statements, c after two of them (not the third).
                readers = [names["b"], names["c"]]
                values, inputs = runner.evaluate_inputs(env, [names["b"]], readers, stop)
                torch.testing.assert_close(inputs[names["b"]], seen["b"])
                torch.testing.assert_close(inputs[names["c"]], seen["c"])
                torch.testing.assert_close(values[names["b"]], gm.b(seen["b"]))
            # The cache is never written.
            assert env.keys() == cached.keys()
            assert all(torch.equal(env[node], cached[node]) for node in env)


def test_channel_multiple_keeps_widths_multiples_where_sizes_allow():
    model = randomize(Dense())  # groups of 24, 16, 16 channels
    plan = trace_plan(model, SHAPE)
    widths = uniform_widths(plan, 1.4, multiple=8, tolerance=0.2)
    assert all(w % 8 == 0 for w in widths.values())
    assert abs(plan.macs() / plan.macs(widths) / 1.4 - 1) <= 0.2
    images = torch.randn(16, *SHAPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 8-channel steps may miss by > 2%
        pruned, report = chanprune.prune_model(
            model, images, speedup=1.4, channel_multiple=8, progress=False
        )
    assert abs(report.speedup / 1.4 - 1) <= 0.2
    assert all(w % 8 == 0 for w in report.options["widths"].values())
    assert pruned.conv2.in_channels % 8 == 0


class _HardSwish(torch.nn.Module):
    """conv -> x * relu6(x + 3) / 6 -> conv, as MobileNetV3 writes h-swish."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        x = self.conv1(x)
        return self.conv2(x * torch.nn.functional.relu6(x + 3.0) / 6.0)


def test_a_group_cut_to_one_channel_is_still_traced_through_elementwise_ops():
    torch.manual_seed(0)
    model = _HardSwish().eval()
    images = torch.randn(12, *SHAPE, generator=torch.Generator().manual_seed(0))
    pruned, report = chanprune.prune_model(model, images, schedule={"conv1": 1}, progress=False)
    assert pruned.conv1.out_channels == 1 == pruned.conv2.in_channels
    plan = trace_plan(pruned, SHAPE)  # the one-channel x * relu6(x + 3) is no broadcast
    assert plan.groups["conv1"].size == 1
    assert report.macs_after == plan.macs()


def test_report_splits_the_time_between_passes_statistics_and_solves():
    (_, report), _ = _prune(randomize(Dense()), speedup=1.5)
    split = report.options["time_split_s"]
    assert set(split) == {"forward_s", "statistics_s", "all_reduce_s", "solve_s", "schedule_s"}
    assert all(v >= 0 for v in split.values()) and split["all_reduce_s"] < 0.05
    assert split["forward_s"] > 0 and split["solve_s"] > 0
    assert sum(split.values()) <= report.wall_time_s


# ---------------------------------------------------------------------------- paper schedule
_STAGE_BLOCKS = {"resnet56_cifar10": [9, 9, 9], "resnet18": [2, 2, 2, 2],
                 "resnet50": [3, 4, 6, 3]}  # fmt: skip


def _paper_by_name(builder: str, sampler: bool = False) -> dict:
    """The paper's multipliers written out from the zoo's module names (an independent
    derivation): VGG-16 conv stages 1-3 : 4 : 5 keep 1 : 1.5 : 0; in a ResNet the blocks of
    the last stage and those that change the shape (stride, projection) keep 0.7, the
    others 0.3, times 4/3.5 and 3/3.5 for a Bottleneck's 2b and 2c inputs, 2/3.5 for its
    sampled 2a input (a BasicBlock's: 1)."""
    if builder == "vgg16_bn_cifar10":
        cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
        out, index, stage = {}, 0, 1
        for v in cfg:
            if v == "M":
                index, stage = index + 1, stage + 1
                continue
            out[f"features.{index}"] = stage
            index += 3
        # A group's stage is its reader's; the last conv's output feeds the classifier.
        names = list(out)
        return {n: {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.5}.get(out[r], 0.0)
                for n, r in zip(names[:-1], names[1:])}  # fmt: skip
    blocks = _STAGE_BLOCKS[builder]
    bottleneck = builder == "resnet50"
    out = {}
    for s_index, n_blocks in enumerate(blocks, start=1):
        for b in range(n_blocks):
            changes = b == 0 and (s_index > 1 or bottleneck)  # stride or projection
            base = 0.7 if s_index == len(blocks) or changes else 0.3
            path = f"layer{s_index}.{b}"
            if bottleneck:
                out[f"{path}.conv1"], out[f"{path}.conv2"] = base * 4 / 3.5, base * 3 / 3.5
            else:
                out[f"{path}.conv1"] = base
            if sampler and not (bottleneck and path == "layer1.0"):
                out[f"{path}.conv1:in"] = base * (2 / 3.5 if bottleneck else 1.0)
    return out


@pytest.mark.parametrize(
    "builder,shape",
    [("vgg16_bn_cifar10", (3, 32, 32)), ("resnet56_cifar10", (3, 32, 32)),
     ("resnet18", (3, 64, 64)), ("resnet50", (3, 64, 64))],
)  # fmt: skip
def test_paper_multipliers_from_the_graph_equal_the_ones_by_name(builder, shape):
    """Stages from the traced shapes, branches and roles from the residual additions: the
    multipliers the zoo's names give (0 where the schedule leaves a group whole)."""
    from chanprune.graph import paper_multipliers

    model = getattr(chanprune.models, builder)()
    graph = paper_multipliers(trace_plan(model, shape))
    expected = _paper_by_name(builder)
    assert {k: v for k, v in graph.items() if v > 0} == pytest.approx(
        {k: v for k, v in expected.items() if v > 0}
    )
    # Other groups (ResNet-50's stem output, read by a block and its projection, which
    # feeds the residual stream) are left whole.
    assert all(graph[k] == 0 for k in set(graph) - set(expected))


def test_paper_schedule_refuses_a_network_it_does_not_define():
    from chanprune.graph import paper_multipliers

    for model in (Inverted(), Dense()):
        with pytest.raises(ValueError, match="schedule='paper' is defined for VGG-style"):
            paper_multipliers(trace_plan(model, SHAPE))


def test_paper_schedule_prunes_a_residual_model_through_the_graph():
    model = randomize(Residual())
    (pruned, report), images = _prune(model, schedule="paper")
    assert report.schedule == "paper" and report.options["planner"] == "graph"
    assert report.speedup == pytest.approx(2.0, rel=0.02)
    assert pruned(images).shape == model(images).shape


# ---------------------------------------------------------------------------- one driver
def test_the_default_planner_is_the_graph_with_the_schedule_of_the_network_kind():
    """VGG-style chains get `energy`, ResNets `paper`, anything else `sensitivity`, all
    through the traced graph; what only the names offer still goes to them."""
    from chanprune.models import CifarResNet, vgg_digits
    from chanprune.prune import network_kind

    torch.manual_seed(0)
    images = torch.randn(24, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    vgg = randomize(vgg_digits())
    _, report = chanprune.prune_model(vgg, images, speedup=1.5, progress=False)
    assert report.options["planner"] == "graph" and report.schedule == "energy"
    assert "VGG-style chain" in report.options["schedule_reason"]
    resnet = randomize(CifarResNet(depth=8, num_classes=10))
    rgb = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    _, report = chanprune.prune_model(resnet, rgb, speedup=1.3, progress=False)
    assert report.options["planner"] == "graph" and report.schedule == "paper"
    assert "Basic or Bottleneck" in report.options["schedule_reason"]
    assert network_kind(trace_plan(Inverted(), SHAPE)) == "graph"
    # Every criterion, explicit widths and the channel sampler run on the graph.
    _, report = chanprune.prune_model(vgg, images, speedup=1.5, method="apoz", progress=False)
    assert report.options["planner"] == "graph"
    _, report = chanprune.prune_model(
        vgg, images, schedule={"features.3:in": 6}, progress=False
    )
    assert report.options["planner"] == "graph"
    _, report = chanprune.prune_model(
        resnet, rgb, speedup=1.3, channel_sampler=True, progress=False
    )
    assert report.options["planner"] == "graph"


# ---------------------------------------------------------------------------- criteria
def _first_group_input(model, images):
    """The input of body.b (which reads group body.a.0) in the original network."""
    seen = []
    handle = model.body["b"][0].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        model(images)
    handle.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("method", ["apoz", "entropy", "bn_scale"])
def test_activation_and_bn_criteria_on_the_graph_keep_the_best_scored_channels(method):
    """Against scores computed here from the original network: the first group's kept
    channels are the top-scored ones (APoZ: least often zero; entropy of the pooled
    activation; |gamma| of its BatchNorm)."""
    from chanprune.sweep import entropy_scores

    model = randomize(Chain())
    images = torch.randn(40, *SHAPE, generator=torch.Generator().manual_seed(2))
    _, report = chanprune.prune_model(
        copy.deepcopy(model), images, schedule={"body.a.0": 12}, method=method, holdout=0.0,
        progress=False, planner="graph",
    )
    x = _first_group_input(model, images)
    if method == "apoz":
        scores = -(x == 0).double().mean(dim=(0, 2, 3)).numpy()
    elif method == "entropy":
        scores = entropy_scores(x.mean(dim=(2, 3)))
    else:
        scores = model.body["a"][1].weight.detach().abs().double().numpy()
    expected = np.sort(np.lexsort((np.arange(32), -scores))[:12])
    assert report.options["kept"]["body.a.0"] == expected.tolist()
    assert report.options["planner"] == "graph" and report.method == method


def test_thinet_and_the_criteria_run_on_groups_read_by_several_layers():
    model = randomize(Dense())
    for method in ("thinet", "apoz", "entropy", "bn_scale"):
        (pruned, report), images = _prune(copy.deepcopy(model), speedup=1.5, method=method)
        assert abs(report.speedup / 1.5 - 1) <= 0.02
        assert pruned(images).shape == model(images).shape


def test_bn_scale_on_the_graph_refuses_groups_without_a_batchnorm():
    with pytest.raises(UnsupportedLayerError, match="pass through none"):
        _prune(randomize(Inverted()), method="bn_scale")


@pytest.mark.parametrize("method", chanprune.prune.MODEL_METHODS)
def test_every_method_runs_on_the_graph_planner(method):
    model = randomize(Residual())
    (pruned, report), images = _prune(copy.deepcopy(model), speedup=1.5, method=method)
    assert report.method == method and report.options["planner"] == "graph"
    assert abs(report.speedup / 1.5 - 1) <= 0.02
    assert pruned(images).shape == model(images).shape


# ---------------------------------------------------------------------------- channel sampler
def test_channel_sampler_groups_are_the_inputs_of_the_convs_reading_the_stream():
    plan = with_channel_samplers(trace_plan(randomize(Residual()), SHAPE))
    samplers = {name for name, g in plan.groups.items() if g.sampler}
    # Each block's first conv reads the stream (the stem's output, then the sums); the
    # stem reads the image and the second convs read their branch.
    assert samplers == {f"stages.{i}.one.0:in" for i in range(3)}
    assert plan.groups["stages.1.one.0:in"].size == 8 and not plan.groups[
        "stages.1.one.0:in"].producers  # fmt: skip
    consumer = next(c for c in plan.consumers if c.name == "stages.1.one.0")
    assert consumer.layout == (("stages.1.one.0:in", 8),)
    # Its MACs now scale with the sampled width.
    full = plan.macs()
    assert plan.macs({"stages.1.one.0:in": 4}) < full
    with pytest.raises(ValueError, match="no conv of this network reads one"):
        with_channel_samplers(trace_plan(Chain(), SHAPE))


@pytest.mark.parametrize("builder,shape", [("resnet56_cifar10", (3, 32, 32)),
                                           ("resnet50", (3, 64, 64))])  # fmt: skip
def test_channel_sampler_paper_multipliers_equal_the_ones_by_name(builder, shape):
    """The stream input of a block's first conv gets its branch's ratio (BasicBlock) or
    2/3.5 of it (Bottleneck 2a); a projection shortcut is not sampled. ResNet-50's stem
    output is no stream (read by layer1.0 and its projection, added to nothing): a group of
    its own, which the paper's schedule leaves whole, so layer1.0.conv1 has no sampler."""
    from chanprune.graph import paper_multipliers

    model = getattr(chanprune.models, builder)()
    graph = paper_multipliers(with_channel_samplers(trace_plan(model, shape)))
    expected = _paper_by_name(builder, sampler=True)
    assert {k: v for k, v in graph.items() if k.endswith(":in")} == pytest.approx(
        {k: v for k, v in expected.items() if k.endswith(":in")}
    )
    if builder == "resnet50":
        assert graph["conv1"] == 0.0


def test_prune_with_channel_sampler_on_the_graph_equals_the_masked_original(tmp_path):
    model = randomize(Residual())
    (pruned, report), images = _prune(model, speedup=1.6, channel_sampler=True)
    assert report.options["planner"] == "graph" and report.options["channel_sampler"]
    assert abs(report.speedup / 1.6 - 1) <= 0.02
    assert report.macs_after == conv_macs_by_hooks(pruned, SHAPE, include_linear=True)
    kept = report.options["kept"]
    for i in range(3):
        conv = pruned.stages[i].one[0]
        assert isinstance(conv, SampledConv2d)
        assert conv.in_index.tolist() == kept[f"stages.{i}.one.0:in"]
    # The stream keeps every channel: the stem and the second convs keep their filters.
    assert pruned.stem[0].out_channels == 8 and pruned.stages[1].two[0].out_channels == 16
    masked = masked_equivalent(model, pruned, trace_plan(model, SHAPE), kept)
    with torch.no_grad():
        out, ref = pruned(images[:6]), masked(images[:6])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    # A user's class with samplers saves as shapes and loads into a fresh instance.
    path = tmp_path / "sampled.pt"
    chanprune.save(pruned, path)
    loaded = chanprune.load(path, model=Residual())
    assert isinstance(loaded.stages[0].one[0], SampledConv2d)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images[:6]), out)
    # The pruned network traces again (the sampler is a leaf), with the same MACs.
    assert trace_plan(pruned, SHAPE).macs() == report.macs_after


def test_explicit_widths_by_the_input_of_a_conv():
    model = randomize(Residual())
    images = torch.randn(16, *SHAPE)
    # "<conv>:in" names the group a conv reads ...
    _, by_input = chanprune.prune_model(
        model, images, schedule={"stages.0.two.0:in": 4}, progress=False, planner="graph"
    )
    _, by_group = chanprune.prune_model(
        model, images, schedule={"stages.0.one.0": 4}, progress=False, planner="graph"
    )
    assert by_input.options["widths"] == by_group.options["widths"] == {"stages.0.one.0": 4}
    # ... or, with the sampler, the stream channels it reads.
    pruned, report = chanprune.prune_model(
        model, images, schedule={"stages.1.one.0:in": 3}, channel_sampler=True,
        progress=False, planner="graph",
    )  # fmt: skip
    assert pruned.stages[1].one[0].in_channels == 3
    assert report.options["widths"] == {"stages.1.one.0:in": 3}
    with pytest.raises(ValueError, match="only through a channel sampler"):
        chanprune.prune_model(model, images, schedule={"stages.1.one.0:in": 3},
                              progress=False, planner="graph")  # fmt: skip
    with pytest.raises(ValueError, match="another key names too"):
        chanprune.prune_model(
            model, images, schedule={"stages.0.two.0:in": 4, "stages.0.one.0": 4},
            progress=False, planner="graph",
        )  # fmt: skip
