"""Name registry and build_model."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from chanprune.models import ARCHITECTURES, BUILDERS, build_model, get_model, list_models

NAMES = [
    "vgg16",
    "vgg16_bn",
    "vgg16_cifar10",
    "vgg16_bn_cifar10",
    "vgg_digits",
    "resnet20_cifar10",
    "resnet32_cifar10",
    "resnet44_cifar10",
    "resnet56_cifar10",
    "resnet110_cifar10",
    "resnet18",
    "resnet34",
    "resnet50",
]


def test_list_models():
    assert list_models() == sorted(NAMES)
    assert set(BUILDERS) == set(NAMES)
    assert set(ARCHITECTURES) == {"vgg", "cifar_resnet", "resnet"}


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown model name 'resnet99'") as info:
        get_model("resnet99")
    for name in NAMES:
        assert repr(name) in str(info.value)
    with pytest.raises(TypeError, match="'name'"):
        get_model(50)


@pytest.mark.parametrize("name", NAMES)
def test_every_model_round_trips_its_config(name):
    with torch.device("meta"):  # shapes only: fast even for the ImageNet networks
        model = get_model(name)
        config = model.arch_config()
        assert json.loads(json.dumps(config)) == config
        rebuilt = build_model(json.loads(json.dumps(config)))
    assert type(rebuilt) is type(model)
    assert rebuilt.arch_config() == config
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


def test_default_num_classes():
    with torch.device("meta"):
        assert get_model("vgg16_bn").arch_config()["num_classes"] == 1000
        assert get_model("resnet50").arch_config()["num_classes"] == 1000
    assert get_model("resnet20_cifar10").arch_config()["num_classes"] == 10
    assert get_model("vgg16_bn_cifar10").arch_config()["num_classes"] == 10
    assert get_model("vgg_digits").arch_config()["in_channels"] == 1


def test_kwargs_are_passed_through():
    model = get_model("resnet20_cifar10", num_classes=100)
    assert model.linear.out_features == 100
    model = get_model("vgg16_bn_cifar10", num_classes=100, hidden_features=[64, 32])
    assert [m.out_features for m in model.classifier if isinstance(m, nn.Linear)] == [64, 32, 100]


def test_build_model_errors():
    with pytest.raises(TypeError, match="'config'"):
        build_model([("arch", "vgg")])
    with pytest.raises(ValueError, match="one of \\['cifar_resnet', 'resnet', 'vgg'\\]"):
        build_model({"arch": "mobilenet"})
    with pytest.raises(ValueError, match="lacks required key"):
        build_model({"arch": "resnet", "block": "basic"})
    with pytest.raises(ValueError, match="unknown key\\(s\\) \\['width'\\]"):
        build_model({"arch": "cifar_resnet", "depth": 20, "width": 2})
    with pytest.raises(ValueError, match="'depth'"):
        build_model({"arch": "cifar_resnet", "depth": 21})
