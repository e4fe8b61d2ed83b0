"""ResNets: checkpoint key layouts, shortcuts, pruned block widths, hook safety."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from chanprune.models import (
    BasicBlock,
    Bottleneck,
    CifarBasicBlock,
    CifarResNet,
    ResNet,
    ShortcutA,
    build_model,
    resnet18,
    resnet20_cifar10,
    resnet34,
    resnet50,
    resnet56_cifar10,
    resnet110_cifar10,
)

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def bn_keys(prefix: str) -> set[str]:
    return {f"{prefix}.{s}" for s in BN_SUFFIXES}


def expected_cifar_keys(n: int) -> set[str]:
    """akamaster CIFAR ResNet keys (``module.`` stripped), plus num_batches_tracked."""
    keys = {"conv1.weight", "linear.weight", "linear.bias"} | bn_keys("bn1")
    for stage in (1, 2, 3):
        for b in range(n):
            p = f"layer{stage}.{b}"
            keys |= {f"{p}.conv1.weight", f"{p}.conv2.weight"}
            keys |= bn_keys(f"{p}.bn1") | bn_keys(f"{p}.bn2")
    return keys


def expected_torchvision_resnet_keys(layers: list[int], bottleneck: bool) -> set[str]:
    """torchvision ResNet-18/34/50 keys, written out independently of the model code."""
    keys = {"conv1.weight", "fc.weight", "fc.bias"} | bn_keys("bn1")
    n_convs = 3 if bottleneck else 2
    for stage, n_blocks in enumerate(layers, start=1):
        for b in range(n_blocks):
            p = f"layer{stage}.{b}"
            for c in range(1, n_convs + 1):
                keys |= {f"{p}.conv{c}.weight"} | bn_keys(f"{p}.bn{c}")
            if b == 0 and (stage > 1 or bottleneck):
                keys |= {f"{p}.downsample.0.weight"} | bn_keys(f"{p}.downsample.1")
    return keys


# ---------------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("builder, n", [(resnet20_cifar10, 3), (resnet56_cifar10, 9)])
def test_cifar_resnet_keys(builder, n):
    model = builder()
    sd = model.state_dict()
    assert set(sd) == expected_cifar_keys(n)
    assert sd["conv1.weight"].shape == (16, 3, 3, 3)
    assert sd["layer2.0.conv1.weight"].shape == (32, 16, 3, 3)
    assert sd["layer3.0.conv2.weight"].shape == (64, 64, 3, 3)
    assert sd["linear.weight"].shape == (10, 64)
    assert not any("shortcut" in k for k in sd)


def test_cifar_resnet_param_counts():
    # akamaster/pytorch_resnet_cifar10 README: 0.27M, 0.85M, 1.7M parameters.
    assert sum(p.numel() for p in resnet20_cifar10().parameters()) == 269_722
    assert sum(p.numel() for p in resnet56_cifar10().parameters()) == 853_018
    assert sum(p.numel() for p in resnet110_cifar10().parameters()) == 1_727_962


@pytest.mark.parametrize("depth", [20, 32, 44])
def test_cifar_resnet_forward(depth):
    model = CifarResNet(depth).eval()
    assert len(model.layer1) == len(model.layer3) == (depth - 2) // 6
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_cifar_strides_and_shortcuts():
    model = resnet20_cifar10()
    assert model.layer1[0].conv1.stride == (1, 1)
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    for layer in (model.layer2, model.layer3):
        assert layer[0].conv1.stride == (2, 2)
        assert isinstance(layer[0].shortcut, ShortcutA)
        assert isinstance(layer[1].shortcut, nn.Identity)


def test_shortcut_a_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    out = ShortcutA(pad=8, stride=2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


def test_cifar_block_matches_reference_formula():
    block = CifarBasicBlock(16, 32, stride=2).eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        ref = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
        ref = torch.relu(ref + nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8)))
        torch.testing.assert_close(block(x), ref)


def test_cifar_pruned_block_widths():
    widths = [[4], [5], [6], [7], [8], [9], [10], [11], [12]]
    model = resnet20_cifar10(block_widths=widths).eval()
    for (_, block), (w,) in zip(model.blocks(), widths):
        assert block.conv1.out_channels == w == block.bn1.num_features
        assert block.conv2.in_channels == w
    # The residual stream is unchanged.
    assert [b.conv2.out_channels for _, b in model.blocks()] == [16] * 3 + [32] * 3 + [64] * 3
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_round_trip_pruned():
    widths = [[3 + i] for i in range(9)]
    widths[4] = 32  # a bare int is accepted for a BasicBlock
    model = resnet20_cifar10(block_widths=widths).eval()
    config = model.arch_config()
    assert config == {
        "arch": "cifar_resnet",
        "depth": 20,
        "num_classes": 10,
        "in_channels": 3,
        "block_widths": [[3], [4], [5], [6], [32], [8], [9], [10], [11]],
    }
    assert json.loads(json.dumps(config)) == config
    rebuilt = build_model(json.loads(json.dumps(config)))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    rebuilt.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_cifar_validation_errors():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(21)
    with pytest.raises(ValueError, match="one entry per block \\(9\\)"):
        CifarResNet(20, block_widths=[[8]] * 8)
    with pytest.raises(ValueError, match=r"block_widths\[2\]"):
        CifarResNet(20, block_widths=[[8], [8], [8, 8], [8], [8], [8], [8], [8], [8]])
    with pytest.raises(ValueError, match=r"block_widths\[0\]\[0\]"):
        CifarResNet(20, block_widths=[[0]] + [[8]] * 8)
    with pytest.raises(TypeError, match="block_widths"):
        CifarResNet(20, block_widths="wide")
    with pytest.raises(ValueError, match="in_planes"):
        CifarBasicBlock(16, 48, stride=2)


# ----------------------------------------------------------------------------- torchvision


@pytest.mark.parametrize(
    "builder, layers, bottleneck, n_keys, n_params",
    [
        (resnet18, [2, 2, 2, 2], False, 122, 11_689_512),
        (resnet34, [3, 4, 6, 3], False, 218, 21_797_672),
        (resnet50, [3, 4, 6, 3], True, 320, 25_557_032),
    ],
)
def test_torchvision_resnet_keys(builder, layers, bottleneck, n_keys, n_params):
    with torch.device("meta"):
        model = builder()
    sd = model.state_dict()
    assert len(sd) == n_keys
    assert set(sd) == expected_torchvision_resnet_keys(layers, bottleneck)
    assert sum(p.numel() for p in model.parameters()) == n_params  # torchvision's counts


def test_resnet50_shapes_and_names():
    with torch.device("meta"):
        model = resnet50()
    sd = model.state_dict()
    for key in ("layer1.0.downsample.0.weight", "layer4.2.bn3.running_var", "fc.weight"):
        assert key in sd
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sd["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert sd["fc.weight"].shape == (1000, 2048)
    # v1.5: the stride sits on the 3x3 conv.
    assert model.layer2[0].conv1.stride == (1, 1)
    assert model.layer2[0].conv2.stride == (2, 2)
    assert model.layer2[0].downsample[0].stride == (2, 2)


def test_resnet50_forward_224():
    model = resnet50().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)
    assert torch.isfinite(out).all()


def test_resnet18_forward():
    model = resnet18(num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_bottleneck_pruned_widths_round_trip():
    layers = [1, 2, 1, 1]
    widths = [[8, 4], [5, 6], None, [16, 12], [20, 30]]
    model = ResNet("bottleneck", layers, num_classes=5, block_widths=widths).eval()
    blocks = dict(model.blocks())
    assert isinstance(blocks["layer2.1"], Bottleneck)
    assert blocks["layer1.0"].widths == (8, 4)
    assert blocks["layer2.1"].widths == (128, 128)  # None: unpruned
    b = blocks["layer4.0"]
    assert (b.conv1.out_channels, b.conv2.in_channels, b.conv2.out_channels) == (20, 20, 30)
    assert (b.conv3.in_channels, b.conv3.out_channels) == (30, 2048)

    config = model.arch_config()
    assert config == {
        "arch": "resnet",
        "block": "bottleneck",
        "layers": layers,
        "num_classes": 5,
        "in_channels": 3,
        "block_widths": [[8, 4], [5, 6], [128, 128], [16, 12], [20, 30]],
    }
    rebuilt = build_model(json.loads(json.dumps(config)))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    rebuilt.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_bottleneck_narrowed_stem_round_trip():
    """A Bottleneck network's stem is read only by layer1.0 and its projection: narrowed,
    the config records it and rebuilds the same network; a BasicBlock's cannot be."""
    model = ResNet("bottleneck", [1, 1, 1, 1], num_classes=5, stem_width=24).eval()
    assert model.bn1.num_features == model.layer1[0].downsample[0].in_channels == 24
    config = model.arch_config()
    assert config["stem_width"] == 24
    assert "stem_width" not in ResNet("bottleneck", [1, 1, 1, 1]).arch_config()
    rebuilt = build_model(json.loads(json.dumps(config))).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="adds its stem to the residual stream"):
        ResNet("basic", [1, 1, 1, 1], stem_width=24)


def test_basic_pruned_widths_round_trip():
    model = ResNet(BasicBlock, [1, 1, 1, 1], block_widths=[3, [5], (7,), 9]).eval()
    config = model.arch_config()
    assert config["block"] == "basic"
    assert config["block_widths"] == [[3], [5], [7], [9]]
    assert model.layer3[0].conv2.in_channels == 7
    rebuilt = build_model(config).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_resnet_validation_errors():
    with pytest.raises(ValueError, match="'block'"):
        ResNet("wide", [1, 1, 1, 1])
    with pytest.raises(ValueError, match="'layers'"):
        ResNet("basic", [1, 1, 1])
    with pytest.raises(ValueError, match=r"block_widths\[0\]"):
        ResNet("bottleneck", [1, 1, 1, 1], block_widths=[[8], [8, 8], [8, 8], [8, 8]])
    with pytest.raises(ValueError, match="one entry per block \\(4\\)"):
        ResNet("basic", [1, 1, 1, 1], block_widths=[[8]])


@pytest.mark.parametrize("cifar", [True, False], ids=["cifar", "bottleneck"])
def test_channel_sampler_config_round_trip(cifar):
    """``sampled_inputs`` rebuilds each block's SampledConv2d; the indices come from the
    state_dict, and the rebuilt model gives the same outputs bit for bit."""
    if cifar:
        sampled = [None, 5, None, 7, None, None, 30, None, 64]
        model, size = resnet20_cifar10(sampled_inputs=sampled), 32
    else:
        sampled = [64, None, 100, 3]
        model, size = ResNet("bottleneck", [1, 1, 1, 1], sampled_inputs=sampled), 64
    blocks = [b for _, b in model.blocks()]
    assert [b.sampled_inputs for b in blocks] == sampled
    generator = torch.Generator().manual_seed(0)
    for block, k in zip(blocks, sampled):
        if k is not None:  # as a pruned model would have it: chosen, not the first k
            c = block.conv1.stream_channels
            block.conv1.in_index.copy_(torch.randperm(c, generator=generator)[:k].sort().values)
    config = model.arch_config()
    assert config["sampled_inputs"] == sampled
    state = model.eval().state_dict()
    for (path, _), k in zip(model.blocks(), sampled):
        key = f"{path}.conv1.in_index"  # the one key beyond the torchvision/akamaster layout
        assert (key in state) == (k is not None)
        if k is not None:
            assert state[key].dtype == torch.int64 and state[key].shape == (k,)
    rebuilt = build_model(json.loads(json.dumps(config)))
    rebuilt.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model(x), rtol=0, atol=0)


def test_channel_sampler_is_absent_from_old_configs():
    config = resnet20_cifar10().arch_config()
    assert "sampled_inputs" not in config  # files written before the option load unchanged
    config["sampled_inputs"] = [None] * 9
    assert build_model(config).arch_config() == resnet20_cifar10().arch_config()
    with pytest.raises(ValueError, match=r"'sampled_inputs' parameter must be an int in \[1, 16\]"):
        resnet20_cifar10(sampled_inputs=[17] + [None] * 8)
    with pytest.raises(ValueError, match=r"sampled_inputs.*one entry per block \(4\)"):
        ResNet("basic", [1, 1, 1, 1], sampled_inputs=[3])
    with pytest.raises(ValueError, match=r"sampled_inputs\[1\]"):
        ResNet("basic", [1, 1, 1, 1], sampled_inputs=[3, 0, None, None])


def test_zero_init_residual():
    model = ResNet("basic", [1, 1, 1, 1], zero_init_residual=True)
    assert not model.layer1[0].bn2.weight.any()


# ------------------------------------------------------------------------------ hook safety


def _small_models():
    return [
        resnet20_cifar10().eval(),
        ResNet("basic", [1, 1, 1, 1]).eval(),
        ResNet("bottleneck", [1, 1, 1, 1]).eval(),
    ]


@pytest.mark.parametrize("model", _small_models(), ids=["cifar20", "basic", "bottleneck"])
def test_each_relu_module_fires_once(model):
    calls: dict[str, int] = {}
    relus = {n: m for n, m in model.named_modules() if isinstance(m, nn.ReLU)}
    handles = [
        m.register_forward_hook(lambda mod, i, o, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
        for n, m in relus.items()
    ]
    try:
        size = 32 if isinstance(model, CifarResNet) else 64
        with torch.no_grad():
            model(torch.randn(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    assert calls == {n: 1 for n in relus}
    assert not any(m.inplace for m in relus.values())


@pytest.mark.parametrize("model", _small_models(), ids=["cifar20", "basic", "bottleneck"])
def test_no_module_output_overwritten_in_place(model):
    """A hook may keep a reference to any module's output: nothing later overwrites it."""
    kept: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def hook(mod, inputs, output, name):
        kept.append((name, output, output.detach().clone()))

    handles = [
        m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n))
        for n, m in model.named_modules()
        if n
    ]
    try:
        size = 32 if isinstance(model, CifarResNet) else 64
        with torch.no_grad():
            model(torch.randn(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    assert kept
    for name, ref, copy in kept:
        assert torch.equal(ref, copy), f"output of {name} was modified in place"
