"""Tests of the residual driver: CIFAR ResNets and torchvision-style ResNets."""

from __future__ import annotations

import copy

import pytest
import torch
from _planted import randomize_batchnorm
from torch import nn

from chanprune import UnsupportedLayerError, prunable_layers, prune_model
from chanprune.flops import count_macs
from chanprune.models import CifarResNet, build_model, resnet18, resnet50

QUIET = dict(progress=False)


def _cifar_resnet(depth: int = 14, seed: int = 0) -> CifarResNet:
    torch.manual_seed(seed)
    return randomize_batchnorm(CifarResNet(depth=depth, num_classes=10))


def _images(n: int = 40, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_branch_internal_channels_only():
    model = _cifar_resnet()
    layers = prunable_layers(model)
    assert list(layers)[:2] == ["layer1.0.conv2", "layer1.1.conv2"] and len(layers) == 6
    pruned, report = prune_model(model, _images(), speedup=1.5, **QUIET)
    assert abs(report.speedup / 1.5 - 1) <= 0.02
    assert report.macs_after == count_macs(pruned, (3, 16, 16))
    for (_, block), (_, orig) in zip(pruned.blocks(), model.blocks()):
        # The residual stream keeps its width; only conv1's outputs / conv2's inputs shrink.
        assert block.conv2.out_channels == orig.conv2.out_channels
        assert block.conv1.in_channels == orig.conv1.in_channels
        assert block.conv1.out_channels == block.conv2.in_channels <= orig.conv1.out_channels
        assert block.conv2.bias is None  # the refit bias lives in bn2: same architecture
    rebuilt = build_model(pruned.arch_config())
    rebuilt.load_state_dict(pruned.state_dict())  # strict: same keys and shapes
    x = _images(3, seed=5)
    torch.testing.assert_close(rebuilt.eval()(x), pruned(x))


def test_residual_correction_target_is_the_block_sum():
    """With the correction, every position and no hold-out, the reported error of the last
    branch is the error of the block's pre-ReLU sum against the original block's."""
    model = _cifar_resnet()
    images = _images(30)
    pruned, report = prune_model(
        model, images, speedup=1.5, positions_per_image=None, holdout=0.0,
        stats_dtype=torch.float64, **QUIET,
    )  # fmt: skip
    last = report.layers[-1]
    assert last.name == "layer3.1.conv2"

    def block_sum(net):
        rec = {}
        block = net.layer3[1]
        h = block.register_forward_pre_hook(lambda m, a: rec.__setitem__("x", a[0].clone()))
        try:
            net(images)
        finally:
            h.remove()
        x = rec["x"]
        branch = block.bn2(block.conv2(block.relu1(block.bn1(block.conv1(x)))))
        return branch + block.shortcut(x), branch, block.shortcut(x)

    with torch.no_grad():
        ref_sum, ref_branch, ref_short = block_sum(model)
        pr_sum, _, pr_short = block_sum(pruned)
    target = ref_branch + ref_short - pr_short
    measured = float(((pr_sum - ref_sum) ** 2).sum() / (target**2).sum())
    assert last.rel_error == pytest.approx(measured, rel=1e-4, abs=1e-9)


def test_correction_on_and_off_both_run_and_differ():
    model = _cifar_resnet()
    _, on = prune_model(model, _images(), speedup=1.5, residual_correction=True, **QUIET)
    _, off = prune_model(model, _images(), speedup=1.5, residual_correction=False, **QUIET)
    assert on.options["residual_correction"] and not off.options["residual_correction"]
    assert [r.channels_after for r in on.layers] == [r.channels_after for r in off.layers]
    assert on.layers[-1].rel_error != off.layers[-1].rel_error


@pytest.mark.parametrize("schedule", ["uniform", "paper"])
@pytest.mark.parametrize("method", ["lasso", "greedy_ls", "max_response", "apoz", "bn_scale"])
def test_methods_and_schedules(method, schedule):
    pruned, report = prune_model(
        _cifar_resnet(), _images(), speedup=1.4, method=method, schedule=schedule, **QUIET
    )
    assert abs(report.speedup / 1.4 - 1) <= 0.02
    assert all(r.rel_error <= r.rel_error_before_refit + 1e-9 for r in report.layers)


def test_paper_schedule_keeps_more_in_sensitive_blocks():
    model = _cifar_resnet(depth=20)
    _, report = prune_model(model, _images(), speedup=1.3, schedule="paper", **QUIET)
    kept = {r.name: r.channels_after / r.channels_before for r in report.layers}
    # layer2.0 changes the map size and layer3 is the last stage: sensitive blocks.
    assert kept["layer2.0.conv2"] > kept["layer2.1.conv2"]
    assert kept["layer3.1.conv2"] > kept["layer1.1.conv2"]


def test_torchvision_resnet18_basic_blocks_with_downsample():
    torch.manual_seed(0)
    model = randomize_batchnorm(resnet18(num_classes=10))
    images = _images(8, size=32)
    pruned, report = prune_model(model, images, speedup=1.5, positions_per_image=4, **QUIET)
    assert abs(report.speedup / 1.5 - 1) <= 0.02
    assert pruned.layer2[0].downsample[0].out_channels == 128
    rebuilt = build_model(pruned.arch_config())
    rebuilt.load_state_dict(pruned.state_dict())


@pytest.mark.slow
def test_resnet50_bottlenecks_end_to_end_at_224():
    torch.manual_seed(0)
    model = randomize_batchnorm(resnet50())
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    pruned, report = prune_model(
        model, images, speedup=1.5, positions_per_image=2, holdout=0.0, ridge=1e-2, **QUIET
    )
    assert abs(report.speedup / 1.5 - 1) <= 0.02
    assert report.macs_after == count_macs(pruned, (3, 224, 224))
    assert [r.name for r in report.layers][:2] == ["layer1.0.conv2", "layer1.0.conv3"]
    block = pruned.layer1[0]
    assert block.conv1.out_channels == block.conv2.in_channels
    assert block.conv2.out_channels == block.conv3.in_channels
    assert block.conv3.out_channels == 256  # the stream keeps its width
    rebuilt = build_model(pruned.arch_config())
    rebuilt.load_state_dict(pruned.state_dict())


def test_unknown_branch_pattern_is_refused_with_the_block_name():
    model = _cifar_resnet()

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    model.layer2[1] = Odd()
    with pytest.raises(UnsupportedLayerError, match=r"block layer2.1 \(Odd\) is not a branch"):
        prune_model(model, _images(), speedup=1.5, **QUIET)


@pytest.mark.parametrize("bottleneck", [False, True])
def test_masked_and_physically_pruned_resnet_agree(bottleneck):
    """Zeroing branch channels (bn gamma = beta = 0, so the ReLU outputs 0) gives the same
    network output as removing them with the surgery functions."""
    from chanprune.surgery import prune_batchnorm, prune_conv_in_channels, prune_conv_out_channels

    torch.manual_seed(0)
    if bottleneck:
        model = randomize_batchnorm(resnet50(num_classes=10))
        size, pairs = 64, [("conv1", "bn1", "conv2"), ("conv2", "bn2", "conv3")]
    else:
        model = _cifar_resnet()
        size, pairs = 16, [("conv1", "bn1", "conv2")]
    x = _images(2, size=size, seed=3)
    masked, cut = model, copy.deepcopy(model)
    with torch.no_grad():
        for (_, block), (_, block_cut) in zip(masked.named_modules(), cut.named_modules()):
            if not hasattr(block, "conv2") or isinstance(block, nn.Conv2d):
                continue
            for producer, bn, consumer in pairs:
                n = getattr(block, producer).out_channels
                kept = torch.arange(0, n, 2)  # keep every other channel
                dropped = torch.arange(1, n, 2)
                getattr(block, bn).weight[dropped] = 0.0
                getattr(block, bn).bias[dropped] = 0.0
                prune_conv_out_channels(getattr(block_cut, producer), kept)
                prune_batchnorm(getattr(block_cut, bn), kept)
                prune_conv_in_channels(getattr(block_cut, consumer), kept)
        torch.testing.assert_close(cut(x), masked(x), rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in cut.parameters()) < sum(p.numel() for p in model.parameters())
