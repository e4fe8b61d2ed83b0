"""VGG networks with torchvision-compatible state_dict keys.

The architecture is data: a ``cfg`` list of conv widths and ``"M"`` (max pooling), turned into
``features`` by :func:`make_layers`. A pruned VGG is the same class built from a cfg whose
numbers are the pruned widths; the first Linear of the head follows the width of the last conv.

Three heads, all ``Linear, ReLU(inplace=True), Dropout`` per hidden layer then a final Linear
(so the Linear layers sit at ``classifier`` indices 0, 3, 6, ...):

- ImageNet (torchvision): ``AdaptiveAvgPool2d((7, 7))``, hidden ``(4096, 4096)``.
- CIFAR (``../shared/models/vgg16_bn_cifar10.pth``): ``AdaptiveAvgPool2d(1)``,
  hidden ``(512, 512)``.
- digits (8x8 grey images of sklearn's digits): ``AdaptiveAvgPool2d(1)``, hidden ``(64,)``.

Note that the ReLUs are in place, as in torchvision: a forward hook that keeps a conv's
output (VGG without BatchNorm) must store ``output.detach().clone()``.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn

from .._validation import check_int_in_range, check_real_in_range
from ._checkpoint import load_weights
from ._config import _check_config_keys

__all__ = [
    "cfgs",
    "make_layers",
    "VGG",
    "vgg16",
    "vgg16_bn",
    "vgg16_cifar10",
    "vgg16_bn_cifar10",
    "vgg_digits",
]

logger = logging.getLogger(__name__)

CfgItem = Union[int, str]

#: torchvision's VGG configurations ("A" = VGG-11, "B" = 13, "D" = 16, "E" = 19), plus the
#: small "digits" network for 8x8 single-channel images.
cfgs: dict[str, list[CfgItem]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        512,
        "M",
    ],  # fmt: skip
    "digits": [16, 16, "M", 32, 32, "M", 64, 64],
}

#: Head presets: adaptive pool output size and hidden Linear widths.
HEADS: dict[str, dict[str, Any]] = {
    "imagenet": {"pool_size": 7, "hidden_features": (4096, 4096)},
    "cifar": {"pool_size": 1, "hidden_features": (512, 512)},
    "digits": {"pool_size": 1, "hidden_features": (64,)},
}


def _check_cfg(cfg: Any) -> list[CfgItem]:
    if isinstance(cfg, (str, bytes)) or not isinstance(cfg, Sequence):
        raise TypeError(
            f"The 'cfg' parameter must be a list of ints and 'M'; got {type(cfg).__name__}."
        )
    out: list[CfgItem] = []
    for i, v in enumerate(cfg):
        if v == "M":
            out.append("M")
        else:
            out.append(check_int_in_range(v, f"cfg[{i}]", 1))
    if not any(v != "M" for v in out):
        raise ValueError(f"The 'cfg' parameter must hold at least one conv width; got {cfg!r}.")
    return out


def make_layers(cfg: Sequence[CfgItem], batch_norm: bool = False, in_channels: int = 3):
    """Build VGG's ``features`` from a configuration, exactly as torchvision does.

    Parameters
    ----------
    cfg : sequence of int or "M"
        Each int ``v`` adds ``Conv2d(c_in, v, 3, padding=1)`` (with bias), then
        ``BatchNorm2d(v)`` if ``batch_norm``, then ``ReLU(inplace=True)``. Each ``"M"`` adds
        ``MaxPool2d(2, 2)``.
    batch_norm : bool, default=False
        Whether each conv is followed by BatchNorm.
    in_channels : int, default=3
        Channels of the input images.

    Returns
    -------
    nn.Sequential
        Maps (B, in_channels, H, W) to (B, cfg[-1 conv], H / 2**n_pools, W / 2**n_pools).
    """
    cfg = _check_cfg(cfg)
    c_in = check_int_in_range(in_channels, "in_channels", 1)
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        conv = nn.Conv2d(c_in, v, kernel_size=3, padding=1)
        if batch_norm:
            layers += [conv, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        else:
            layers += [conv, nn.ReLU(inplace=True)]
        c_in = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG: ``features`` -> ``avgpool`` -> ``flatten(1)`` -> ``classifier``.

    Parameters
    ----------
    cfg : sequence of int or "M"
        Conv widths and max pools (see :func:`make_layers`). A pruned VGG uses its pruned
        widths here.
    batch_norm : bool, default=False
        Conv-BN-ReLU blocks instead of conv-ReLU.
    num_classes : int, default=1000
    in_channels : int, default=3
    pool_size : int, default=7
        Output size of ``avgpool = AdaptiveAvgPool2d(pool_size)``; 7 for the ImageNet head,
        1 for the CIFAR and digits heads. The first Linear has
        ``last_conv_width * pool_size**2`` inputs.
    hidden_features : int or sequence of int, default=(4096, 4096)
        Widths of the hidden Linear layers; an int means two hidden layers of that width.
    dropout : float, default=0.5
        Probability of each ``Dropout`` after a hidden Linear.
    init_weights : bool, default=True
        torchvision's initialisation (Kaiming-normal convs, N(0, 0.01) Linears).

    Attributes
    ----------
    features : nn.Sequential
    avgpool : nn.AdaptiveAvgPool2d
    classifier : nn.Sequential
        ``[Linear, ReLU, Dropout] * len(hidden_features) + [Linear]``.

    Examples
    --------
    >>> m = VGG([8, "M", 16], batch_norm=True, num_classes=10, pool_size=1, hidden_features=32)
    >>> m(torch.zeros(2, 3, 8, 8)).shape
    torch.Size([2, 10])
    >>> build_model(m.arch_config())  # doctest: +SKIP
    """

    def __init__(
        self,
        cfg: Sequence[CfgItem],
        *,
        batch_norm: bool = False,
        num_classes: int = 1000,
        in_channels: int = 3,
        pool_size: int = 7,
        hidden_features: int | Sequence[int] = (4096, 4096),
        dropout: float = 0.5,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        cfg = _check_cfg(cfg)
        if not isinstance(batch_norm, bool):
            raise TypeError(f"The 'batch_norm' parameter must be a bool; got {batch_norm!r}.")
        num_classes = check_int_in_range(num_classes, "num_classes", 1)
        pool_size = check_int_in_range(pool_size, "pool_size", 1)
        if isinstance(hidden_features, numbers.Integral) and not isinstance(hidden_features, bool):
            hidden_features = (hidden_features, hidden_features)
        elif isinstance(hidden_features, (str, bytes)) or not isinstance(hidden_features, Sequence):
            raise TypeError(
                "The 'hidden_features' parameter must be an int or a sequence of ints; "
                f"got {hidden_features!r}."
            )
        hidden = [
            check_int_in_range(h, f"hidden_features[{i}]", 1) for i, h in enumerate(hidden_features)
        ]
        dropout = check_real_in_range(dropout, "dropout", 0.0, 1.0)

        self.batch_norm = batch_norm
        self.features = make_layers(cfg, batch_norm, in_channels)
        self.avgpool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        last_width = [v for v in cfg if v != "M"][-1]
        layers: list[nn.Module] = []
        n_in = last_width * pool_size * pool_size
        for h in hidden:
            layers += [nn.Linear(n_in, h), nn.ReLU(True), nn.Dropout(p=dropout)]
            n_in = h
        layers.append(nn.Linear(n_in, num_classes))
        self.classifier = nn.Sequential(*layers)
        self._dropout = dropout
        if init_weights:
            self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images (B, in_channels, H, W) to logits (B, num_classes)."""
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)

    @property
    def cfg(self) -> list[CfgItem]:
        """The configuration read from the live ``features`` (reflects any surgery)."""
        out: list[CfgItem] = []
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                out.append(int(m.out_channels))
            elif isinstance(m, nn.MaxPool2d):
                out.append("M")
        return out

    def arch_config(self) -> dict[str, Any]:
        """Return a JSON-serialisable description that :func:`build_model` rebuilds.

        Read from the live modules, so it reflects in-place surgery.

        Returns
        -------
        dict
            ``{"arch": "vgg", "cfg": [...], "batch_norm": bool, "num_classes": int,
            "in_channels": int, "pool_size": int, "hidden_features": [int, ...],
            "dropout": float}``.
        """
        return vgg_config_of(self, check=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> VGG:
        """Build from :meth:`arch_config` output (weights freshly initialised)."""
        kwargs = _check_config_keys(config, "vgg", required=_REQUIRED, optional=_OPTIONAL)
        return cls(kwargs.pop("cfg"), **kwargs)


def vgg_config_of(model: nn.Module, *, check: bool = True) -> dict[str, Any]:
    """The :meth:`VGG.arch_config` of any VGG-structured module, e.g. a torchvision VGG.

    Reads ``features`` (Conv2d/BatchNorm2d/ReLU/MaxPool2d), ``avgpool`` and the Linear
    layers of ``classifier`` from the live modules.

    Parameters
    ----------
    model : nn.Module
        With ``features``, ``avgpool`` and ``classifier`` laid out as in torchvision.
    check : bool, default=True
        Rebuild the architecture from the config and check that every parameter and
        buffer of ``model`` has the same name and shape; raise ``TypeError`` otherwise.

    Returns
    -------
    dict
        ``{"arch": "vgg", "cfg": [...], "batch_norm": bool, "num_classes": int,
        "in_channels": int, "pool_size": int, "hidden_features": [int, ...],
        "dropout": float}``.
    """
    features = getattr(model, "features", None)
    classifier = getattr(model, "classifier", None)
    avgpool = getattr(model, "avgpool", None)
    if not all(isinstance(m, nn.Module) for m in (features, classifier, avgpool)):
        raise TypeError(
            f"{type(model).__name__} is not VGG-structured: it needs `features`, `avgpool` "
            "and `classifier` modules."
        )
    cfg: list[CfgItem] = []
    for m in features:
        if isinstance(m, nn.Conv2d):
            cfg.append(int(m.out_channels))
        elif isinstance(m, nn.MaxPool2d):
            cfg.append("M")
    convs = [m for m in features if isinstance(m, nn.Conv2d)]
    linears = [m for m in classifier if isinstance(m, nn.Linear)]
    dropouts = [m for m in classifier if isinstance(m, nn.Dropout)]
    if not convs or not linears:
        raise TypeError(f"{type(model).__name__} has no conv or no Linear layer: not a VGG.")
    pool = avgpool.output_size
    pool_size = pool[0] if isinstance(pool, tuple) else pool
    config = {
        "arch": "vgg",
        "cfg": cfg,
        "batch_norm": any(isinstance(m, nn.BatchNorm2d) for m in features),
        "num_classes": int(linears[-1].out_features),
        "in_channels": int(convs[0].in_channels),
        "pool_size": int(pool_size),
        "hidden_features": [int(m.out_features) for m in linears[:-1]],
        "dropout": float(dropouts[0].p) if dropouts else float(getattr(model, "_dropout", 0.5)),
    }
    if check:
        rebuilt = VGG.from_config(config).state_dict()
        mine = model.state_dict()
        shapes = {k: tuple(v.shape) for k, v in mine.items()}
        if shapes != {k: tuple(v.shape) for k, v in rebuilt.items()}:
            raise TypeError(
                f"{type(model).__name__} looks like a VGG but its layers differ from "
                "chanprune.models.VGG's (state_dict names or shapes), so it cannot be rebuilt "
                "from a config."
            )
    return config


_REQUIRED = ("cfg",)
_OPTIONAL = ("batch_norm", "num_classes", "in_channels", "pool_size", "hidden_features", "dropout")


def _apply_widths(cfg: Sequence[CfgItem], widths: Sequence[int] | None) -> list[CfgItem]:
    """Replace the conv widths of ``cfg`` (in order) by ``widths``."""
    cfg = list(cfg)
    if widths is None:
        return cfg
    n_convs = sum(v != "M" for v in cfg)
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
        raise TypeError(
            f"The 'widths' parameter must be a sequence of {n_convs} ints; "
            f"got {type(widths).__name__}."
        )
    if len(widths) != n_convs:
        raise ValueError(
            f"The 'widths' parameter must hold one width per conv ({n_convs}); "
            f"got {len(widths)}: {list(widths)!r}."
        )
    it = iter(widths)
    return ["M" if v == "M" else next(it) for v in cfg]


def _vgg(
    cfg_name: str,
    batch_norm: bool,
    head: str,
    weights: Any,
    name: str,
    *,
    widths: Sequence[int] | None = None,
    **kwargs: Any,
) -> VGG:
    params: dict[str, Any] = dict(HEADS[head])
    if head == "digits":
        params.update(in_channels=1, num_classes=10, dropout=0.0)
    elif head == "cifar":
        params.update(num_classes=10)
    params.update(kwargs)
    model = VGG(_apply_widths(cfgs[cfg_name], widths), batch_norm=batch_norm, **params)
    if weights is not None:
        load_weights(model, weights, name=name)
    return model


def vgg16(*, weights: Any = None, **kwargs: Any) -> VGG:
    """VGG-16 for ImageNet (torchvision layout; 1000 classes).

    Parameters
    ----------
    weights : str, os.PathLike or state_dict, optional
        A checkpoint to load strictly (e.g. torchvision's ``vgg16-397923af.pth``).
    **kwargs
        ``widths`` (13 conv widths, for a pruned model) or any :class:`VGG` keyword.
    """
    return _vgg("D", False, "imagenet", weights, "vgg16", **kwargs)


def vgg16_bn(*, weights: Any = None, **kwargs: Any) -> VGG:
    """VGG-16 with BatchNorm for ImageNet (torchvision layout). See :func:`vgg16`."""
    return _vgg("D", True, "imagenet", weights, "vgg16_bn", **kwargs)


def vgg16_cifar10(*, weights: Any = None, **kwargs: Any) -> VGG:
    """VGG-16 for CIFAR-10 (pool 1, hidden (512, 512), 10 classes). See :func:`vgg16`."""
    return _vgg("D", False, "cifar", weights, "vgg16_cifar10", **kwargs)


def vgg16_bn_cifar10(*, weights: Any = None, **kwargs: Any) -> VGG:
    """VGG-16-BN for CIFAR-10, the layout of ``../shared/models/vgg16_bn_cifar10.pth``.

    See :func:`vgg16`.
    """
    return _vgg("D", True, "cifar", weights, "vgg16_bn_cifar10", **kwargs)


def vgg_digits(*, weights: Any = None, **kwargs: Any) -> VGG:
    """Small VGG for sklearn's 8x8 grey digits: (B, 1, 8, 8) -> (B, 10).

    cfg ``[16, 16, "M", 32, 32, "M", 64, 64]`` with BatchNorm, ``AdaptiveAvgPool2d(1)``,
    classifier ``Linear(64, 64), ReLU, Dropout(0.0), Linear(64, 10)``. See :func:`vgg16`.
    """
    return _vgg("digits", True, "digits", weights, "vgg_digits", **kwargs)
