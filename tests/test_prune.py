"""Tests of chanprune.prune: the driver on small VGG-style networks."""

from __future__ import annotations

import pytest
import torch
from _planted import conv_macs_by_hooks, randomize_batchnorm
from torch import nn

from chanprune import UnsupportedLayerError
from chanprune.flops import count_macs
from chanprune.graph import trace_plan
from chanprune.models import VGG, build_model
from chanprune.prune import MODEL_METHODS, plan_widths, prunable_groups, prune_model


def _tiny_vgg(seed: int = 0, batch_norm: bool = True) -> VGG:
    torch.manual_seed(seed)
    model = VGG(
        [12, 12, "M", 16, 16, "M", 24], batch_norm=batch_norm, num_classes=5, pool_size=1,
        hidden_features=16,
    )  # fmt: skip
    return randomize_batchnorm(model)


def _images(n: int = 60, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


QUIET = dict(progress=False)
SHAPE = (3, 16, 16)


@pytest.mark.parametrize("schedule", ["uniform", "paper", "energy"])
def test_speedup_is_hit_and_model_is_physically_smaller(schedule):
    model = _tiny_vgg()
    pruned, report = prune_model(model, _images(), speedup=1.6, schedule=schedule, **QUIET)
    assert abs(report.speedup / 1.6 - 1) <= 0.02
    assert report.macs_after == count_macs(pruned, SHAPE, include_linear=True)
    assert report.params_after < report.params_before
    # An ordinary module of the same class, rebuilt from its widths + state_dict.
    rebuilt = build_model(pruned.arch_config())
    rebuilt.load_state_dict(pruned.state_dict())
    x = _images(4, seed=9)
    torch.testing.assert_close(rebuilt.eval()(x), pruned(x))
    assert not pruned.training


def test_energy_schedule_prunes_the_redundant_layer_hardest():
    """Planted: conv1's 12 outputs are 4 copies of 3 (rank 3), the other layers' are not.
    Uniform cuts every layer alike; the energy schedule takes the whole 1.6x out of the
    copies, which cost no energy, and keeps every other layer whole. With the 3 distinct
    channels kept (greedy_ls finds them), the first pruned layer is reconstructed exactly."""
    model = _tiny_vgg()
    with torch.no_grad():
        conv = model.features[0]
        conv.weight[3:] = conv.weight[:3].repeat(3, 1, 1, 1)
        conv.bias[3:] = conv.bias[:3].repeat(3)
        bn = model.features[1]
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            t[3:] = t[:3].repeat(3)
    sizes = prunable_groups(model, SHAPE)
    uniform, _ = plan_widths(model, SHAPE, speedup=1.6, schedule="uniform")
    assert all(uniform[name] < size for name, size in sizes.items())
    _, report = prune_model(
        model, _images(), speedup=1.6, schedule="energy", method="greedy_ls", **QUIET
    )  # fmt: skip
    widths = report.options["widths"]
    assert report.schedule == "energy" and abs(report.speedup / 1.6 - 1) <= 0.02
    assert 3 <= widths["features.0"] < uniform["features.0"]  # conv1's output
    # Every other conv output stays whole; the classifier's hidden layers may lose the
    # units its ReLUs leave dead on these images (no energy either).
    convs = [name for name in sizes if name.startswith("features.") and name != "features.0"]
    assert all(widths[name] == sizes[name] for name in convs)
    assert report.layers[0].name == "features.3" and report.layers[0].rel_error < 1e-6


def test_energy_schedule_needs_data_outside_prune_model():
    with pytest.raises(ValueError, match=r"schedule='energy' allocates the widths from"):
        plan_widths(_tiny_vgg(), SHAPE, speedup=2.0, schedule="energy")


def test_input_model_is_not_modified():
    model = _tiny_vgg()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune_model(model, _images(), speedup=1.5, **QUIET)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training  # its mode is untouched


def test_reported_error_is_the_measured_error_of_the_last_layer():
    """With every position and no hold-out, the reported in-sample error of the last
    pruned layer is exactly the error of the pruned network's output there."""
    model = _tiny_vgg()
    images = _images(40)
    pruned, report = prune_model(
        model, images, speedup=1.5, positions_per_image=None, holdout=0.0,
        stats_dtype=torch.float64, **QUIET,
    )  # fmt: skip
    last = report.layers[-1]  # the classifier's last layer: its outputs are the logits
    assert last.name == "classifier.6"
    with torch.no_grad():
        ref, out = model(images), pruned(images)
    measured = float(((ref - out) ** 2).sum() / (ref**2).sum())
    assert last.rel_error == pytest.approx(measured, rel=1e-4, abs=1e-9)


def test_explicit_schedule_by_group_and_by_layer_input():
    model = _tiny_vgg()
    groups = prunable_groups(model, SHAPE)
    # Each conv's output (the last one read by the classifier) and each hidden linear's.
    assert groups == {
        "features.0": 12, "features.3": 12, "features.7": 16, "features.10": 16,
        "features.14": 24, "classifier.0": 16, "classifier.3": 16,
    }  # fmt: skip
    # The group conv1 writes, named by the layer that reads it; the group conv3 writes.
    schedule = {"features.3:in": 6, "features.7": 0.5}
    pruned, report = prune_model(model, _images(), schedule=schedule, method="greedy_ls", **QUIET)
    assert report.options["widths"] == {"features.0": 6, "features.7": 8}
    assert pruned.features[3].in_channels == 6 and pruned.features[0].out_channels == 6
    assert pruned.features[10].in_channels == 8 and pruned.features[7].out_channels == 8
    assert pruned.features[14].in_channels == 16  # unscheduled layers keep their width
    assert report.schedule == "explicit"


@pytest.mark.parametrize("method", MODEL_METHODS)
def test_every_method_runs_and_refit_helps(method):
    model = _tiny_vgg()
    pruned, report = prune_model(model, _images(), speedup=1.5, method=method, seed=3, **QUIET)
    assert report.method == method and len(report.layers) == 7  # 4 convs, 3 linears
    for layer in report.layers:
        assert 0.0 <= layer.rel_error <= layer.rel_error_before_refit + 1e-9
        assert layer.rel_error_heldout is not None and layer.rel_error_heldout >= 0


@pytest.mark.parametrize("method", ["random", "lasso", "greedy_ls"])
def test_runs_are_reproducible_and_seed_matters(method):
    model = _tiny_vgg()
    a, ra = prune_model(model, _images(), speedup=1.5, method=method, seed=5, **QUIET)
    b, rb = prune_model(model, _images(), speedup=1.5, method=method, seed=5, **QUIET)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [layer.rel_error for layer in ra.layers] == [layer.rel_error for layer in rb.layers]
    c, _ = prune_model(model, _images(), speedup=1.5, method=method, seed=6, **QUIET)
    x = _images(3, seed=7)
    assert not torch.equal(a(x), c(x))


def test_reported_macs_match_an_independent_count():
    model = _tiny_vgg()
    pruned, report = prune_model(model, _images(), speedup=2.0, **QUIET)
    assert report.macs_before == conv_macs_by_hooks(model, SHAPE, include_linear=True)
    assert report.macs_after == conv_macs_by_hooks(pruned, SHAPE, include_linear=True)
    assert report.speedup == pytest.approx(report.macs_before / report.macs_after)


def test_without_batchnorm():
    model = _tiny_vgg(batch_norm=False)
    pruned, report = prune_model(model, _images(), speedup=1.5, **QUIET)
    assert abs(report.speedup / 1.5 - 1) <= 0.02
    with pytest.raises(UnsupportedLayerError, match=r"method='bn_scale' needs an affine"):
        prune_model(model, _images(), speedup=1.5, method="bn_scale", **QUIET)


def test_dataset_calibration_input():
    images = _images(30)
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(30, dtype=torch.long))
    _, r1 = prune_model(_tiny_vgg(), dataset, speedup=1.5, n_images=20, **QUIET)
    assert r1.n_images + r1.n_heldout == 20


# ---------------------------------------------------------------------------- bad input
def test_bad_parameters():
    model = _tiny_vgg()
    x = _images(10)
    with pytest.raises(ValueError, match=r"'method' parameter must be one of"):
        prune_model(model, x, speedup=2, method="magic", **QUIET)
    with pytest.raises(ValueError, match=r"'speedup' parameter must be in \(1.0"):
        prune_model(model, x, speedup=1.0, **QUIET)
    with pytest.raises(ValueError, match=r"speedup=500 cannot be reached"):
        prune_model(model, x, speedup=500.0, **QUIET)
    with pytest.raises(ValueError, match=r"needs a target"):
        prune_model(model, x, **QUIET)
    with pytest.raises(ValueError, match=r"either speedup or an explicit schedule"):
        prune_model(model, x, speedup=2, schedule={"features.3": 4}, **QUIET)
    with pytest.raises(ValueError, match=r"'holdout'"):
        prune_model(model, x, speedup=2, holdout=0.9, **QUIET)
    with pytest.raises(TypeError, match=r"model must be an nn.Module"):
        prune_model("vgg16", x, speedup=2, **QUIET)
    with pytest.raises(ValueError, match=r"'max_cache_mb' parameter must be in \[0.0"):
        prune_model(model, x, speedup=2, max_cache_mb=-1, **QUIET)
    with pytest.raises(ValueError, match=r"'max_cache_mb' parameter must be in \[0.0, inf\)"):
        prune_model(model, x, speedup=2, max_cache_mb=float("inf"), **QUIET)
    with pytest.raises(ValueError, match=r"planner='names' is gone.*'<layer>:in'"):
        prune_model(model, x, speedup=2, planner="names", **QUIET)


def test_bad_calibration_data():
    model = _tiny_vgg()
    with pytest.raises(ValueError, match=r"holds no images"):
        prune_model(model, torch.zeros(0, 3, 16, 16), speedup=1.5, **QUIET)
    bad = _images(10)
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf"):
        prune_model(model, bad, speedup=1.5, **QUIET)
    with pytest.raises(ValueError, match=r"does not accept inputs of shape \(4, 16, 16\)"):
        prune_model(model, torch.randn(5, 4, 16, 16), speedup=1.5, **QUIET)
    with pytest.raises(TypeError, match=r"calib must be a torch Dataset or a tensor"):
        prune_model(model, [1, 2, 3], speedup=1.5, **QUIET)


def test_models_without_a_prunable_group_are_refused():
    with pytest.raises(ValueError, match="no prunable channel group"):  # its only group is
        prune_model(nn.Sequential(nn.Conv2d(3, 4, 3)), _images(4), speedup=2, **QUIET)  # output


def test_pruned_model_can_be_fine_tuned():
    pruned, _ = prune_model(_tiny_vgg(), _images(), speedup=1.5, **QUIET)
    pruned.train()
    loss = pruned(_images(4)).sum()
    loss.backward()
    assert all(p.grad is not None for p in pruned.parameters() if p.requires_grad)


def test_whole_maps_used_only_where_cheaper():
    # CIFAR VGG-16: the 4x4 and 2x2 maps (conv4_x, conv5_x) gather every position from
    # whole maps; larger maps and ImageNet sizes sample patches.
    from torch import nn

    from chanprune.sweep import whole_maps_cheaper as _whole_maps_cheaper

    conv = lambda c, n: nn.Conv2d(c, n, 3, padding=1)  # noqa: E731
    assert _whole_maps_cheaper(conv(512, 512), (4, 4), (4, 4), 10)
    assert _whole_maps_cheaper(conv(256, 512), (4, 4), (4, 4), 10)
    assert _whole_maps_cheaper(conv(512, 512), (2, 2), (2, 2), 10)
    assert not _whole_maps_cheaper(conv(256, 256), (8, 8), (8, 8), 10)
    assert not _whole_maps_cheaper(conv(64, 64), (32, 32), (32, 32), 10)
    assert not _whole_maps_cheaper(conv(512, 512), (14, 14), (14, 14), 10)
    assert not _whole_maps_cheaper(conv(512, 512), (4, 4), (4, 4), 1)  # 1 sample is cheaper


def _last_layer_rel_error(original: nn.Module, pruned: nn.Module, images, bn: str) -> float:
    """||Y - Y'||^2 / ||Y||^2 of the output of module ``bn`` (the last consumer's BN, whose
    channels are never pruned), measured by forward passes of both networks."""
    outputs = []
    for model in (original, pruned):
        seen = []
        handle = model.get_submodule(bn).register_forward_hook(
            lambda m, a, out: seen.append(out.detach().double().clone())  # noqa: B023
        )
        try:
            model.eval()(images)
        finally:
            handle.remove()
        outputs.append(seen[0])
    y, y_pruned = outputs
    return float(((y - y_pruned) ** 2).sum() / (y**2).sum())


EXACT = dict(holdout=0.0, positions_per_image=None, stats_dtype=torch.float64, **QUIET)


def test_float64_models_are_pruned_in_float64():
    model = _tiny_vgg().double()
    images = _images().double()
    pruned, report = prune_model(model, images, speedup=1.5, **EXACT)
    assert {p.dtype for p in pruned.parameters()} == {torch.float64}
    assert abs(report.speedup / 1.5 - 1) <= 0.02
    # The reported error of the last layer is the one its pruned output (the logits)
    # really has.
    with torch.no_grad():
        ref, out = model(images), pruned(images)
    measured = float(((ref - out) ** 2).sum() / (ref**2).sum())
    assert report.layers[-1].rel_error == pytest.approx(measured, rel=1e-6, abs=1e-12)
    # float64 images are never rounded through float32 on the way in.
    from chanprune.prune import load_calibration_images

    assert torch.equal(load_calibration_images(images, dtype=torch.float64, progress=False), images)
    # float32 images are converted to the model's dtype; the model itself is unchanged.
    pruned32, _ = prune_model(model, _images(), speedup=1.5, **EXACT)
    assert {p.dtype for p in pruned32.parameters()} == {torch.float64}
    assert {p.dtype for p in model.parameters()} == {torch.float64}


def test_models_of_other_dtypes_are_refused():
    with pytest.raises(TypeError, match=r"all float32 or all float64; got float16"):
        prune_model(_tiny_vgg().half(), _images(), speedup=1.5, **QUIET)
    mixed = _tiny_vgg()
    mixed.classifier.double()
    with pytest.raises(TypeError, match=r"got float32, float64"):
        prune_model(mixed, _images(), speedup=1.5, **QUIET)


def test_batchnorm_without_affine_terms_leaves_the_bias_in_the_conv():
    model = _tiny_vgg()
    for i, width in ((4, 12), (15, 24)):  # a producer's BN, and the last consumer's
        bn = nn.BatchNorm2d(width, affine=False).eval()
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        model.features[i] = bn
    images = _images()
    # The last conv's output stays whole, so its refit error is measured on all of it.
    schedule = {"features.0": 6, "features.3": 6, "features.7": 8, "features.10": 8}
    pruned, report = prune_model(model, images, schedule=schedule, method="first_k", **EXACT)
    assert pruned.features[15].weight is None and pruned.features[4].weight is None
    assert pruned.features[4].num_features == pruned.features[3].out_channels < 12
    measured = _last_layer_rel_error(model, pruned, images, "features.15")
    last_conv = next(layer for layer in report.layers if layer.name == "features.14")
    assert last_conv.rel_error == pytest.approx(measured, rel=1e-5, abs=1e-9)
    assert measured < last_conv.rel_error_before_refit


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: setattr(m.features[7], "padding_mode", "reflect"), "features.7 pads with"),
        (lambda m: setattr(m.features[10], "padding", "same"), "features.10 has padding='same'"),
        (
            lambda m: m.features.__setitem__(8, nn.BatchNorm2d(16, track_running_stats=False)),
            "features.8 keeps no running statistics",
        ),
    ],
)
def test_layers_the_sampler_cannot_model_keep_their_group_whole(change, message):
    """A conv whose input the sampler cannot model (non-zero padding modes, string
    padding), or whose BN cannot be folded, keeps the group it reads whole, saying why;
    the rest is pruned."""
    model = _tiny_vgg()
    change(model)
    fixed = {g.name: g.fixed for g in trace_plan(model.eval(), SHAPE).groups.values()}
    group = next(name for name, why in fixed.items() if any(message in w for w in why))
    pruned, report = prune_model(model, _images(), speedup=1.3, **QUIET)
    assert group not in report.options["widths"] and report.options["widths"]
    assert abs(report.speedup / 1.3 - 1) <= 0.02


def test_a_batchnorm_without_affine_terms_carries_the_refit_bias():
    """Neither the conv nor its BN has a bias: the refit intercept goes into the BN's
    running mean (an identity BN subtracts it), and the reported error is the real one."""
    model = _tiny_vgg()
    model.features[4] = nn.BatchNorm2d(12, affine=False).eval()
    model.features[4].running_mean.uniform_(-0.5, 0.5)
    model.features[3].bias = None
    images = _images()
    # Only conv1's output is cut: features.3 reads fewer channels, its BN keeps them all.
    pruned, report = prune_model(model, images, schedule={"features.0": 6}, **EXACT)
    layer = next(r for r in report.layers if r.name == "features.3")
    index = report.layers.index(layer)
    measured = _last_layer_rel_error(model, pruned, images, "features.4")
    assert index == 0 and layer.rel_error == pytest.approx(measured, rel=1e-5, abs=1e-9)


def test_the_overfitting_warning_is_about_the_refit(caplog):
    images = _images(6)  # 6 images of 16x16: few samples for the deeper layers' unknowns
    with caplog.at_level("WARNING", logger="chanprune"):
        prune_model(_tiny_vgg(), images, speedup=1.5, refit=False, **QUIET)
    assert "may overfit" not in caplog.text
    with caplog.at_level("WARNING", logger="chanprune"):
        prune_model(_tiny_vgg(), images, speedup=1.5, **QUIET)
    assert "may overfit" in caplog.text


def test_explicit_widths_accept_numpy_scalars():
    import numpy as np

    widths, _ = plan_widths(
        _tiny_vgg(), SHAPE, schedule={"features.3:in": np.int64(6), "features.7": np.float32(0.5)}
    )
    assert widths == {"features.0": 6, "features.7": 8}
    assert all(type(w) is int for w in widths.values())
    with pytest.raises(TypeError, match=r"schedule\['features.3'\] must be an int or a float"):
        plan_widths(_tiny_vgg(), SHAPE, schedule={"features.3": np.bool_(True)})


@pytest.mark.parametrize("schedule", ["uniform", "energy"])
def test_a_speedup_too_fine_for_narrow_layers_warns(schedule):
    torch.manual_seed(0)
    narrow = randomize_batchnorm(
        VGG([4, "M", 6], batch_norm=True, num_classes=3, pool_size=1, hidden_features=())
    )
    with pytest.warns(
        UserWarning, match=r"achieved speed-up 1\.\d+ is \d+\.\d% from the target 1\.1"
    ):
        _, report = prune_model(narrow, _images(), speedup=1.1, schedule=schedule, **QUIET)
    assert abs(report.speedup / 1.1 - 1) > 0.02  # reported as achieved, not hidden


@pytest.mark.parametrize("batch_size", [256, 2])
def test_calibration_images_of_different_sizes_are_refused_clearly(tmp_path, batch_size):
    from PIL import Image

    from chanprune.data import ImageFolder
    from chanprune.prune import load_calibration_images

    for cls, sizes in (("a", [16, 16, 16, 16]), ("b", [12])):
        (tmp_path / cls).mkdir()
        for i, size in enumerate(sizes):
            Image.new("RGB", (size, size), (i * 40, 90, 200)).save(tmp_path / cls / f"{i}.png")
    folder = ImageFolder(tmp_path, preprocess="cifar")
    # With batch_size=2 the odd image is alone in the last batch: only the check across
    # batches sees it.
    with pytest.raises(ValueError, match=r"different sizes.*\(3, 16, 16\), \(3, 12, 12\)"):
        load_calibration_images(folder, batch_size=batch_size, progress=False)
    with pytest.raises(ValueError, match=r"different sizes"):
        prune_model(_tiny_vgg(), folder, speedup=1.5, **QUIET)
