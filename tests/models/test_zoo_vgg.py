"""VGG: torchvision key layout, heads, pruned widths, arch_config round trip."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from chanprune.models import (
    VGG,
    build_model,
    cfgs,
    make_layers,
    vgg16,
    vgg16_bn,
    vgg16_bn_cifar10,
    vgg16_cifar10,
    vgg_digits,
)

# Indices of the 13 convs in ``features`` (torchvision layout).
CONV_IDX_BN = [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]
CONV_IDX_PLAIN = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
VGG16_WIDTHS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
PRUNED_WIDTHS = [8, 12, 16, 10, 24, 20, 16, 32, 30, 28, 20, 18, 24]


def expected_vgg16_keys(batch_norm: bool) -> set[str]:
    """torchvision's vgg16 / vgg16_bn state_dict keys, written out independently."""
    keys = set()
    for i in CONV_IDX_BN if batch_norm else CONV_IDX_PLAIN:
        keys |= {f"features.{i}.weight", f"features.{i}.bias"}
        if batch_norm:
            keys |= {
                f"features.{i + 1}.{s}"
                for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
            }
    for i in (0, 3, 6):
        keys |= {f"classifier.{i}.weight", f"classifier.{i}.bias"}
    return keys


@pytest.fixture(scope="module")
def vgg16_bn_imagenet() -> VGG:
    torch.manual_seed(0)
    return vgg16_bn().eval()


def test_cfg_d_is_vgg16():
    assert [v for v in cfgs["D"] if v != "M"] == VGG16_WIDTHS
    assert cfgs["D"].count("M") == 5


@pytest.mark.parametrize("batch_norm", [False, True])
def test_make_layers_conv_indices(batch_norm):
    features = make_layers(cfgs["D"], batch_norm)
    idx = [i for i, m in enumerate(features) if isinstance(m, nn.Conv2d)]
    assert idx == (CONV_IDX_BN if batch_norm else CONV_IDX_PLAIN)
    assert all(features[i].kernel_size == (3, 3) and features[i].padding == (1, 1) for i in idx)
    assert all(features[i].bias is not None for i in idx)
    pools = [m for m in features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 5 and all(p.kernel_size == 2 and p.stride == 2 for p in pools)


def test_vgg16_bn_imagenet_keys_match_torchvision(vgg16_bn_imagenet):
    sd = vgg16_bn_imagenet.state_dict()
    assert len(sd) == 97
    assert set(sd) == expected_vgg16_keys(batch_norm=True)
    for key in ("features.0.weight", "features.1.running_mean", "classifier.6.bias"):
        assert key in sd
    assert sd["features.0.weight"].shape == (64, 3, 3, 3)
    assert sd["features.40.weight"].shape == (512, 512, 3, 3)
    assert sd["classifier.0.weight"].shape == (4096, 512 * 7 * 7)
    assert sd["classifier.3.weight"].shape == (4096, 4096)
    assert sd["classifier.6.weight"].shape == (1000, 4096)
    n_params = sum(p.numel() for p in vgg16_bn_imagenet.parameters())
    assert n_params == 138_365_992  # torchvision's vgg16_bn


def test_vgg16_imagenet_keys_match_torchvision():
    with torch.device("meta"):
        model = vgg16()
    sd = model.state_dict()
    assert len(sd) == 32
    assert set(sd) == expected_vgg16_keys(batch_norm=False)
    assert sum(p.numel() for p in model.parameters()) == 138_357_544  # torchvision's vgg16


def test_imagenet_head_layout(vgg16_bn_imagenet):
    head = vgg16_bn_imagenet.classifier
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert head[2].p == 0.5 and head[5].p == 0.5
    assert vgg16_bn_imagenet.avgpool.output_size == (7, 7)


def test_vgg16_bn_imagenet_forward_224(vgg16_bn_imagenet):
    with torch.no_grad():
        out = vgg16_bn_imagenet(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("builder", [vgg16_cifar10, vgg16_bn_cifar10])
def test_cifar_forward_and_head(builder):
    model = builder().eval()
    assert [type(m) for m in model.classifier] == [
        nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear,
    ]  # fmt: skip
    assert [(m.in_features, m.out_features) for m in model.classifier[::3]] == [
        (512, 512),
        (512, 512),
        (512, 10),
    ]
    assert model.avgpool.output_size == (1, 1)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_vgg16_bn_cifar10_keys():
    sd = vgg16_bn_cifar10().state_dict()
    assert set(sd) == expected_vgg16_keys(batch_norm=True)
    assert sd["classifier.0.weight"].shape == (512, 512)
    assert sd["classifier.6.weight"].shape == (10, 512)


def test_vgg_digits():
    model = vgg_digits().eval()
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert convs[0].in_channels == 1
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 64, 64]
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.features)
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 64), (64, 10)]
    with torch.no_grad():
        out = model(torch.randn(5, 1, 8, 8))
    assert out.shape == (5, 10)


def test_pruned_widths_set_first_linear_cifar():
    model = vgg16_bn_cifar10(widths=PRUNED_WIDTHS)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == PRUNED_WIDTHS
    assert [c.in_channels for c in convs] == [3, *PRUNED_WIDTHS[:-1]]
    assert model.classifier[0].in_features == PRUNED_WIDTHS[-1]
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_pruned_widths_set_first_linear_imagenet():
    widths = [*VGG16_WIDTHS[:-1], 256]
    with torch.device("meta"):
        model = vgg16(widths=widths)
    assert model.classifier[0].in_features == 256 * 7 * 7


def test_hidden_features_configurable():
    model = vgg16_bn_cifar10(hidden_features=(100, 50))
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 100), (100, 50), (50, 10)]
    assert vgg16_bn_cifar10(hidden_features=64).arch_config()["hidden_features"] == [64, 64]


@pytest.mark.parametrize("batch_norm", [False, True])
def test_arch_config_round_trip_pruned(batch_norm):
    builder = vgg16_bn_cifar10 if batch_norm else vgg16_cifar10
    model = builder(widths=PRUNED_WIDTHS, hidden_features=(40, 30)).eval()
    config = model.arch_config()
    assert json.loads(json.dumps(config)) == config
    assert config["arch"] == "vgg"
    assert [v for v in config["cfg"] if v != "M"] == PRUNED_WIDTHS
    assert config["batch_norm"] is batch_norm
    assert config["hidden_features"] == [40, 30]
    assert (config["num_classes"], config["in_channels"], config["pool_size"]) == (10, 3, 1)

    rebuilt = build_model(json.loads(json.dumps(config)))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    rebuilt.eval()
    assert rebuilt.arch_config() == config
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_arch_config_follows_in_place_surgery():
    """arch_config reads the live modules: physically pruning a conv updates the cfg."""
    model = VGG([8, "M", 6], batch_norm=True, num_classes=3, pool_size=1, hidden_features=[5])
    kept = torch.tensor([0, 2, 5])
    conv, nxt = model.features[0], model.features[4]
    new_conv = nn.Conv2d(3, 3, 3, padding=1)
    new_conv.weight.data = conv.weight.data[kept].clone()
    new_conv.bias.data = conv.bias.data[kept].clone()
    new_bn = nn.BatchNorm2d(3)
    new_next = nn.Conv2d(3, 6, 3, padding=1)
    new_next.weight.data = nxt.weight.data[:, kept].clone()
    new_next.bias.data = nxt.bias.data.clone()
    model.features[0], model.features[1], model.features[4] = new_conv, new_bn, new_next
    config = model.arch_config()
    assert config["cfg"] == [3, "M", 6]
    rebuilt = build_model(config)
    rebuilt.load_state_dict(model.state_dict(), strict=True)


def test_vgg_validation_errors():
    with pytest.raises(ValueError, match=r"cfg\[1\]"):
        VGG([8, 0, "M"])
    with pytest.raises(TypeError, match=r"cfg\[0\]"):
        VGG(["X"])
    with pytest.raises(TypeError, match="'cfg'"):
        VGG("D")
    with pytest.raises(ValueError, match="at least one conv"):
        VGG(["M"])
    with pytest.raises(ValueError, match="'widths'.*13"):
        vgg16_bn_cifar10(widths=[8, 8])
    with pytest.raises(TypeError, match="hidden_features"):
        VGG([8], hidden_features=True)
    with pytest.raises(ValueError, match="dropout"):
        VGG([8], dropout=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        VGG([8], num_classes=0)
    with pytest.raises(TypeError, match="batch_norm"):
        VGG([8], batch_norm="yes")
