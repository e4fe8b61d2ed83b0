"""Model zoo with torchvision-compatible state_dict keys.

Registered names (:func:`list_models`): ``vgg16``, ``vgg16_bn`` (ImageNet), ``vgg16_cifar10``,
``vgg16_bn_cifar10``, ``vgg_digits``, ``resnet{20,32,44,56,110}_cifar10``, ``resnet18``,
``resnet34``, ``resnet50``.

Every model has ``arch_config()``, a JSON-serialisable dict that :func:`build_model` turns
back into the same architecture (pruned widths included); a pruned model is stored as that
config plus its state_dict (:func:`save_model`, :func:`load_model`).
"""

from __future__ import annotations

from ._checkpoint import load_state_dict_file, load_weights, normalize_state_dict
from ._registry import (
    ARCHITECTURES,
    BUILDERS,
    build_model,
    get_model,
    get_model_builder,
    list_models,
    load_model,
    save_model,
)
from .resnet import (
    BasicBlock,
    Bottleneck,
    CifarBasicBlock,
    CifarResNet,
    ResNet,
    ShortcutA,
    resnet18,
    resnet20_cifar10,
    resnet32_cifar10,
    resnet34,
    resnet44_cifar10,
    resnet50,
    resnet56_cifar10,
    resnet110_cifar10,
)
from .vgg import (
    VGG,
    cfgs,
    make_layers,
    vgg16,
    vgg16_bn,
    vgg16_bn_cifar10,
    vgg16_cifar10,
    vgg_digits,
)

__all__ = [
    "ARCHITECTURES",
    "BUILDERS",
    "BasicBlock",
    "Bottleneck",
    "CifarBasicBlock",
    "CifarResNet",
    "ResNet",
    "ShortcutA",
    "VGG",
    "build_model",
    "cfgs",
    "get_model",
    "get_model_builder",
    "list_models",
    "load_model",
    "load_state_dict_file",
    "load_weights",
    "make_layers",
    "normalize_state_dict",
    "resnet18",
    "resnet20_cifar10",
    "resnet32_cifar10",
    "resnet34",
    "resnet44_cifar10",
    "resnet50",
    "resnet56_cifar10",
    "resnet110_cifar10",
    "save_model",
    "vgg16",
    "vgg16_bn",
    "vgg16_bn_cifar10",
    "vgg16_cifar10",
    "vgg_digits",
]
