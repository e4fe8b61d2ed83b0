"""ResNets: the CIFAR family (depth 6n+2) and torchvision's ImageNet ResNet-18/34/50.

Parameter names match the public checkpoints: the akamaster CIFAR ResNets once ``module.`` is
stripped, and torchvision's ``.pth`` files, so both load with ``strict=True``.

Pruned variants keep every residual-stream width and change only the widths inside each
block's branch, given per block by ``block_widths`` (blocks in ``named_modules()`` order,
``layer1.0`` first):

- :class:`CifarBasicBlock` and :class:`BasicBlock`: ``(w,)``, the width of ``conv1``'s
  output (``conv2``'s input).
- :class:`Bottleneck`: ``(w1, w2)``, the widths of ``conv1``'s and ``conv2``'s outputs.

A block pruned with a channel sampler (``prune_model(..., channel_sampler=True)``) has a
:class:`~chanprune.surgery.SampledConv2d` as ``conv1``, which reads only some channels of the
stream; ``sampled_inputs`` gives, per block, how many (None: all, a plain conv). Which
channels it reads is data, in the state_dict as ``<block>.conv1.in_index``.

Hook-friendly by construction: every ReLU is a separate, not-in-place module called once per
forward, and the residual sum is ``out = out + identity`` (no in-place op on a tensor that a
hook may hold). Parameter-free modules do not appear in the state_dict, so this does not
affect checkpoint compatibility.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_choice, check_int_in_range
from ..surgery import SampledConv2d
from ._checkpoint import load_weights
from ._config import _check_config_keys

__all__ = [
    "ShortcutA",
    "CifarBasicBlock",
    "CifarResNet",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet20_cifar10",
    "resnet32_cifar10",
    "resnet44_cifar10",
    "resnet56_cifar10",
    "resnet110_cifar10",
    "resnet18",
    "resnet34",
    "resnet50",
]

logger = logging.getLogger(__name__)

BlockWidths = Sequence[Union[int, Sequence[int]]]
SampledInputs = Sequence[Optional[int]]


def _check_widths(value: Any, name: str, n: int, default: tuple[int, ...]) -> tuple[int, ...]:
    """Return ``value`` (None, an int when ``n == 1``, or ``n`` ints) as a tuple of ints."""
    if value is None:
        return default
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and n == 1:
        value = (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"The {name!r} parameter must be a sequence of {n} int(s); got {value!r}.")
    if len(value) != n:
        raise ValueError(
            f"The {name!r} parameter must hold {n} width(s); got {len(value)}: {list(value)!r}."
        )
    return tuple(check_int_in_range(v, f"{name}[{i}]", 1) for i, v in enumerate(value))


def _per_block(value: Any, name: str, n_blocks: int, entry: str) -> list[Any] | None:
    """``value`` (None, or a list with one entry per block) as a list; ``entry`` says what
    an entry is, for the error message. The entries themselves are checked by the caller."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"The {name!r} parameter must be a list with {entry} per block; "
            f"got {type(value).__name__}."
        )
    if len(value) != n_blocks:
        raise ValueError(
            f"The {name!r} parameter must hold one entry per block ({n_blocks}); got {len(value)}."
        )
    return list(value)


def _check_sampled_inputs(value: Any, n_blocks: int) -> list[Optional[int]] | None:
    """``sampled_inputs``: None, or one entry per block, each None or an int >= 1 (its upper
    bound, the block's input width, is checked by the block)."""
    value = _per_block(value, "sampled_inputs", n_blocks, "one entry (int or None)")
    if value is None:
        return None
    return [
        None if v is None else check_int_in_range(v, f"sampled_inputs[{i}]", 1)
        for i, v in enumerate(value)
    ]


def _branch_conv1(
    in_planes: int, width: int, kernel_size: int, stride: int, sampled: Optional[int]
) -> nn.Conv2d:
    """A branch's first conv (no bias, padding ``kernel_size // 2``); with ``sampled``, a
    :class:`SampledConv2d` reading ``sampled`` of the ``in_planes`` stream channels (the
    first ones until a state_dict sets its ``in_index``)."""
    padding = kernel_size // 2
    if sampled is None:
        return nn.Conv2d(in_planes, width, kernel_size, stride=stride, padding=padding, bias=False)
    sampled = check_int_in_range(sampled, "sampled_inputs", 1, in_planes)
    return SampledConv2d(
        in_planes, width, kernel_size, in_index=range(sampled), stride=stride, padding=padding,
        bias=False,
    )  # fmt: skip


def _sampled_inputs_of(conv: nn.Conv2d) -> Optional[int]:
    return int(conv.in_channels) if isinstance(conv, SampledConv2d) else None


def _check_block_widths(value: Any, n_blocks: int, n_widths: int) -> list[Any] | None:
    value = _per_block(value, "block_widths", n_blocks, "one tuple of widths")
    if value is None:
        return None
    # None entries stay None: that block keeps its default (unpruned) widths.
    return [
        None if v is None else _check_widths(v, f"block_widths[{i}]", n_widths, ())
        for i, v in enumerate(value)
    ]


def _sampled_config(blocks: list[tuple[str, nn.Module]]) -> dict[str, Any]:
    """The ``sampled_inputs`` entry of ``arch_config()``; none without a channel sampler, so
    the configs of models without one stay as they always were."""
    sampled = [b.sampled_inputs for _, b in blocks]
    return {"sampled_inputs": sampled} if any(k is not None for k in sampled) else {}


# --------------------------------------------------------------------------------------------
# CIFAR ResNet (He et al. 2016, option-A shortcuts; akamaster/pytorch_resnet_cifar10 layout)
# --------------------------------------------------------------------------------------------


class ShortcutA(nn.Module):
    """Parameter-free shortcut: ``x[:, :, ::stride, ::stride]``, then zero-pad the channels.

    Parameters
    ----------
    pad : int
        Zero channels added on each side: (B, C, H, W) -> (B, C + 2 pad, H', W').
    stride : int, default=2
    """

    def __init__(self, pad: int, stride: int = 2) -> None:
        super().__init__()
        self.pad = check_int_in_range(pad, "pad", 0)
        self.stride = check_int_in_range(stride, "stride", 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C + 2 pad, ceil(H / stride), ceil(W / stride))."""
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)

    def extra_repr(self) -> str:
        return f"pad={self.pad}, stride={self.stride}"


class CifarBasicBlock(nn.Module):
    """CIFAR BasicBlock: ``relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))``.

    Parameters
    ----------
    in_planes : int
        Channels of the input (residual stream).
    planes : int
        Channels of the output (residual stream).
    stride : int, default=1
        Stride of ``conv1``; where the shape changes, the shortcut is :class:`ShortcutA` with
        ``planes // 4`` zero channels on each side (so ``in_planes + 2 (planes // 4)`` must
        equal ``planes``), otherwise ``nn.Identity``.
    widths : int or (int,), optional
        Width of ``conv1``'s output (pruned block); default ``planes``.
    sampled_inputs : int, optional
        ``conv1`` reads only this many of the ``in_planes`` input channels through a
        :class:`~chanprune.surgery.SampledConv2d` (a channel sampler); default: all.
    """

    expansion = 1

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        *,
        widths: Any = None,
        sampled_inputs: Optional[int] = None,
    ) -> None:
        super().__init__()
        in_planes = check_int_in_range(in_planes, "in_planes", 1)
        planes = check_int_in_range(planes, "planes", 1)
        stride = check_int_in_range(stride, "stride", 1)
        (width,) = _check_widths(widths, "widths", 1, (planes,))
        self.conv1 = _branch_conv1(in_planes, width, 3, stride, sampled_inputs)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            if in_planes + 2 * (planes // 4) != planes:
                raise ValueError(
                    "Option-A shortcut pads planes // 4 channels on each side, so in_planes + "
                    f"2 * (planes // 4) must equal planes; got in_planes={in_planes}, "
                    f"planes={planes}."
                )
            self.shortcut: nn.Module = ShortcutA(planes // 4, stride)
        else:
            self.shortcut = nn.Identity()

    @property
    def widths(self) -> tuple[int]:
        """Internal width ``(conv1.out_channels,)`` of the live block."""
        return (int(self.conv1.out_channels),)

    @property
    def sampled_inputs(self) -> Optional[int]:
        """Input channels ``conv1`` reads through a channel sampler; None: all of them."""
        return _sampled_inputs_of(self.conv1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_planes, H, W) -> (B, planes, H / stride, W / stride)."""
        identity = self.shortcut(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


def _cifar_init(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.kaiming_normal_(m.weight)


class CifarResNet(nn.Module):
    """ResNet for 32x32 images, depth 6n + 2 (20, 32, 44, 56, 110, ...).

    ``conv1`` (3x3, 16) -> ``bn1`` -> ``relu`` -> ``layer1`` (n blocks, 16) -> ``layer2``
    (n, 32, first stride 2) -> ``layer3`` (n, 64, first stride 2) -> ``avgpool`` (global) ->
    ``flatten`` -> ``linear`` (64 -> num_classes).

    Parameters
    ----------
    depth : int, default=20
        6n + 2 with n >= 1.
    num_classes : int, default=10
    in_channels : int, default=3
    block_widths : list of (int,), optional
        One entry per block (3n, ``layer1.0`` first): width of its ``conv1`` output.
        Default: the stream width of the block (16, 32 or 64).
    sampled_inputs : list of (int or None), optional
        One entry per block: how many input channels its ``conv1`` reads through a channel
        sampler (None: all). Default: no sampler.

    Examples
    --------
    >>> m = CifarResNet(20)
    >>> m(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    stage_planes = (16, 32, 64)

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        *,
        in_channels: int = 3,
        block_widths: BlockWidths | None = None,
        sampled_inputs: SampledInputs | None = None,
    ) -> None:
        super().__init__()
        depth = check_int_in_range(depth, "depth", 8)
        if (depth - 2) % 6 != 0:
            raise ValueError(
                f"The 'depth' parameter must be 6n + 2 (20, 32, 44, 56, 110); got {depth}."
            )
        n = (depth - 2) // 6
        num_classes = check_int_in_range(num_classes, "num_classes", 1)
        in_channels = check_int_in_range(in_channels, "in_channels", 1)
        widths = _check_block_widths(block_widths, 3 * n, 1)
        sampled = _check_sampled_inputs(sampled_inputs, 3 * n)

        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        in_planes = 16
        layers = []
        for stage, planes in enumerate(self.stage_planes):
            blocks = []
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                k = stage * n + i
                w = None if widths is None else widths[k]
                ks = None if sampled is None else sampled[k]
                blocks.append(
                    CifarBasicBlock(in_planes, planes, stride, widths=w, sampled_inputs=ks)
                )
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        self.apply(_cifar_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images (B, in_channels, H, W) to logits (B, num_classes)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The residual blocks as ``(named_modules() path, block)``, in forward order."""
        return [(f"layer{i}.{j}", b) for i in (1, 2, 3) for j, b in enumerate(self._layer(i))]

    def _layer(self, i: int) -> nn.Sequential:
        return getattr(self, f"layer{i}")

    def arch_config(self) -> dict[str, Any]:
        """Return a JSON-serialisable description that :func:`build_model` rebuilds.

        Read from the live modules, so it reflects in-place surgery.

        Returns
        -------
        dict
            ``{"arch": "cifar_resnet", "depth": int, "num_classes": int,
            "in_channels": int, "block_widths": [[w], ...]}`` (one entry per block), plus
            ``"sampled_inputs": [k or None, ...]`` when a block has a channel sampler.
        """
        return {
            "arch": "cifar_resnet",
            "depth": 6 * len(self.layer1) + 2,
            "num_classes": int(self.linear.out_features),
            "in_channels": int(self.conv1.in_channels),
            "block_widths": [list(b.widths) for _, b in self.blocks()],
            **_sampled_config(self.blocks()),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CifarResNet:
        """Build from :meth:`arch_config` output (weights freshly initialised; a channel
        sampler reads the first channels until a state_dict sets its ``in_index``)."""
        kwargs = _check_config_keys(
            config,
            "cifar_resnet",
            required=("depth",),
            optional=("num_classes", "in_channels", "block_widths", "sampled_inputs"),
        )
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# torchvision ResNet (ImageNet)
# --------------------------------------------------------------------------------------------


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias."""
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias."""
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision BasicBlock: ``relu2(bn2(conv2(relu1(bn1(conv1(x))))) + identity)``.

    Parameters
    ----------
    inplanes : int
        Input (residual stream) channels.
    planes : int
        Output channels (``planes * expansion``, expansion 1).
    stride : int, default=1
    downsample : nn.Module, optional
        Applied to ``x`` for the identity (``Sequential(conv1x1, BatchNorm2d)``).
    widths : int or (int,), optional
        Width of ``conv1``'s output; default ``planes``.
    sampled_inputs : int, optional
        ``conv1`` reads only this many of the ``inplanes`` input channels through a
        :class:`~chanprune.surgery.SampledConv2d` (a channel sampler); default: all.
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        widths: Any = None,
        sampled_inputs: Optional[int] = None,
    ) -> None:
        super().__init__()
        (width,) = _check_widths(widths, "widths", 1, (planes,))
        self.conv1 = _branch_conv1(inplanes, width, 3, stride, sampled_inputs)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(width, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.downsample = downsample
        self.stride = stride

    @property
    def widths(self) -> tuple[int]:
        """Internal width ``(conv1.out_channels,)`` of the live block."""
        return (int(self.conv1.out_channels),)

    @property
    def sampled_inputs(self) -> Optional[int]:
        """Input channels ``conv1`` reads through a channel sampler; None: all of them."""
        return _sampled_inputs_of(self.conv1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, inplanes, H, W) -> (B, planes, H / stride, W / stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class Bottleneck(nn.Module):
    """torchvision Bottleneck (v1.5, stride on the 3x3): 1x1 -> 3x3 -> 1x1 (x4) + identity.

    Parameters
    ----------
    inplanes : int
        Input (residual stream) channels.
    planes : int
        Output channels are ``planes * 4``.
    stride : int, default=1
        Stride of ``conv2``.
    downsample : nn.Module, optional
        Applied to ``x`` for the identity (``Sequential(conv1x1, BatchNorm2d)``).
    widths : (int, int), optional
        Widths of ``conv1``'s and ``conv2``'s outputs; default ``(planes, planes)``.
    sampled_inputs : int, optional
        ``conv1`` reads only this many of the ``inplanes`` input channels through a
        :class:`~chanprune.surgery.SampledConv2d` (a channel sampler); default: all.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        widths: Any = None,
        sampled_inputs: Optional[int] = None,
    ) -> None:
        super().__init__()
        w1, w2 = _check_widths(widths, "widths", 2, (planes, planes))
        self.conv1 = _branch_conv1(inplanes, w1, 1, 1, sampled_inputs)
        self.bn1 = nn.BatchNorm2d(w1)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(w1, w2, stride)
        self.bn2 = nn.BatchNorm2d(w2)
        self.relu2 = nn.ReLU()
        self.conv3 = conv1x1(w2, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU()
        self.downsample = downsample
        self.stride = stride

    @property
    def widths(self) -> tuple[int, int]:
        """Internal widths ``(conv1.out_channels, conv2.out_channels)`` of the live block."""
        return (int(self.conv1.out_channels), int(self.conv2.out_channels))

    @property
    def sampled_inputs(self) -> Optional[int]:
        """Input channels ``conv1`` reads through a channel sampler; None: all of them."""
        return _sampled_inputs_of(self.conv1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, inplanes, H, W) -> (B, 4 planes, H / stride, W / stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + identity
        return self.relu3(out)


_BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """torchvision's ImageNet ResNet (``conv1``, ``bn1``, ``relu``, ``maxpool``,
    ``layer1..4``, ``avgpool``, ``fc``).

    Parameters
    ----------
    block : {"basic", "bottleneck"} or BasicBlock or Bottleneck
    layers : sequence of 4 ints
        Blocks per stage: ``[2, 2, 2, 2]`` ResNet-18, ``[3, 4, 6, 3]`` ResNet-34/50.
    num_classes : int, default=1000
    in_channels : int, default=3
    block_widths : list of tuples, optional
        One entry per block (``sum(layers)``, ``layer1.0`` first): ``(w,)`` for BasicBlock,
        ``(w1, w2)`` for Bottleneck. Default: unpruned (``planes`` of the stage).
    sampled_inputs : list of (int or None), optional
        One entry per block: how many input channels its ``conv1`` reads through a channel
        sampler (None: all). Default: no sampler.
    stem_width : int, default=64
        Output channels of ``conv1`` (and ``bn1``). Only a network whose first block has a
        projection shortcut (Bottleneck) can narrow it: that block and its projection are
        the stem's only readers; a BasicBlock network adds the stem to its stream.
    zero_init_residual : bool, default=False
        Zero the last BN of each block (as torchvision).

    Examples
    --------
    >>> m = ResNet("basic", [1, 1, 1, 1], num_classes=5)
    >>> m(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 5])
    """

    stage_planes = (64, 128, 256, 512)

    def __init__(
        self,
        block: str | type[nn.Module] = "bottleneck",
        layers: Sequence[int] = (3, 4, 6, 3),
        num_classes: int = 1000,
        *,
        in_channels: int = 3,
        block_widths: BlockWidths | None = None,
        sampled_inputs: SampledInputs | None = None,
        stem_width: int = 64,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(block, type) and block in _BLOCKS.values():
            block_name = next(k for k, v in _BLOCKS.items() if v is block)
        else:
            block_name = check_choice(block, "block", _BLOCKS)
        block_cls = _BLOCKS[block_name]
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
            raise TypeError(f"The 'layers' parameter must be a sequence of 4 ints; got {layers!r}.")
        if len(layers) != 4:
            raise ValueError(f"The 'layers' parameter must hold 4 ints; got {list(layers)!r}.")
        layers = [check_int_in_range(v, f"layers[{i}]", 1) for i, v in enumerate(layers)]
        num_classes = check_int_in_range(num_classes, "num_classes", 1)
        in_channels = check_int_in_range(in_channels, "in_channels", 1)
        n_widths = 2 if block_cls is Bottleneck else 1
        widths = _check_block_widths(block_widths, sum(layers), n_widths)
        sampled = _check_sampled_inputs(sampled_inputs, sum(layers))
        stem_width = check_int_in_range(stem_width, "stem_width", 1)
        if stem_width != 64 and block_cls.expansion == 1:
            raise ValueError(
                f"stem_width={stem_width}: a BasicBlock ResNet adds its stem to the residual "
                "stream of layer1, which keeps 64 channels."
            )

        self.block_type = block_name
        self.inplanes = stem_width
        self.conv1 = nn.Conv2d(
            in_channels, stem_width, kernel_size=7, stride=2, padding=3, bias=False
        )
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        k = 0
        for stage, (planes, n_blocks) in enumerate(zip(self.stage_planes, layers)):
            stage_widths = None if widths is None else widths[k : k + n_blocks]
            stage_sampled = None if sampled is None else sampled[k : k + n_blocks]
            k += n_blocks
            stride = 1 if stage == 0 else 2
            layer = self._make_layer(
                block_cls, planes, n_blocks, stride, stage_widths, stage_sampled
            )
            setattr(self, f"layer{stage + 1}", layer)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block_cls.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(
        self,
        block: type[nn.Module],
        planes: int,
        n_blocks: int,
        stride: int,
        widths: list[tuple[int, ...]] | None,
        sampled: list[Optional[int]] | None,
    ) -> nn.Sequential:
        downsample = None
        out_planes = planes * block.expansion
        if stride != 1 or self.inplanes != out_planes:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, out_planes, stride), nn.BatchNorm2d(out_planes)
            )
        blocks = []
        for i in range(n_blocks):
            w = None if widths is None else widths[i]
            ks = None if sampled is None else sampled[i]
            if i == 0:
                blocks.append(
                    block(self.inplanes, planes, stride, downsample, widths=w, sampled_inputs=ks)
                )
            else:
                blocks.append(block(self.inplanes, planes, widths=w, sampled_inputs=ks))
            self.inplanes = out_planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images (B, in_channels, H, W) to logits (B, num_classes)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)

    def _layer(self, i: int) -> nn.Sequential:
        return getattr(self, f"layer{i}")

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The residual blocks as ``(named_modules() path, block)``, in forward order."""
        return [(f"layer{i}.{j}", b) for i in (1, 2, 3, 4) for j, b in enumerate(self._layer(i))]

    def arch_config(self) -> dict[str, Any]:
        """Return a JSON-serialisable description that :func:`build_model` rebuilds.

        Read from the live modules, so it reflects in-place surgery.

        Returns
        -------
        dict
            ``{"arch": "resnet", "block": "basic" | "bottleneck", "layers": [4 ints],
            "num_classes": int, "in_channels": int, "block_widths": [[w, ...], ...]}``, plus
            ``"sampled_inputs": [k or None, ...]`` when a block has a channel sampler and
            ``"stem_width": int`` when the stem was narrowed.
        """
        stem = int(self.conv1.out_channels)
        return {
            "arch": "resnet",
            "block": self.block_type,
            "layers": [len(self._layer(i)) for i in (1, 2, 3, 4)],
            "num_classes": int(self.fc.out_features),
            "in_channels": int(self.conv1.in_channels),
            "block_widths": [list(b.widths) for _, b in self.blocks()],
            **_sampled_config(self.blocks()),
            **({"stem_width": stem} if stem != 64 else {}),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ResNet:
        """Build from :meth:`arch_config` output (weights freshly initialised; a channel
        sampler reads the first channels until a state_dict sets its ``in_index``)."""
        kwargs = _check_config_keys(
            config,
            "resnet",
            required=("block", "layers"),
            optional=(
                "num_classes", "in_channels", "block_widths", "sampled_inputs", "stem_width"
            ),
        )
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def _load(model: nn.Module, weights: Any, name: str) -> nn.Module:
    if weights is not None:
        load_weights(model, weights, name=name)
    return model


def _cifar_builder(depth: int):
    name = f"resnet{depth}_cifar10"

    def builder(*, weights: Any = None, **kwargs: Any) -> CifarResNet:
        kwargs.setdefault("num_classes", 10)
        return _load(CifarResNet(depth, **kwargs), weights, name)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"""ResNet-{depth} for CIFAR-10 (akamaster layout, option-A shortcuts).

    Parameters
    ----------
    weights : str, os.PathLike or state_dict, optional
        A checkpoint to load strictly (``module.`` prefixes and a ``state_dict`` entry are
        handled), e.g. akamaster's ``resnet{depth}-*.th``.
    **kwargs
        :class:`CifarResNet` keywords: ``num_classes``, ``in_channels``, ``block_widths``,
        ``sampled_inputs``.
    """
    return builder


resnet20_cifar10 = _cifar_builder(20)
resnet32_cifar10 = _cifar_builder(32)
resnet44_cifar10 = _cifar_builder(44)
resnet56_cifar10 = _cifar_builder(56)
resnet110_cifar10 = _cifar_builder(110)


def resnet18(*, weights: Any = None, **kwargs: Any) -> ResNet:
    """ResNet-18 (torchvision layout).

    Parameters
    ----------
    weights : str, os.PathLike or state_dict, optional
        A checkpoint to load strictly, e.g. torchvision's ``resnet18-f37072fd.pth``.
    **kwargs
        :class:`ResNet` keywords: ``num_classes``, ``in_channels``, ``block_widths``,
        ``sampled_inputs``, ...
    """
    return _load(ResNet("basic", [2, 2, 2, 2], **kwargs), weights, "resnet18")


def resnet34(*, weights: Any = None, **kwargs: Any) -> ResNet:
    """ResNet-34 (torchvision layout). See :func:`resnet18`."""
    return _load(ResNet("basic", [3, 4, 6, 3], **kwargs), weights, "resnet34")


def resnet50(*, weights: Any = None, **kwargs: Any) -> ResNet:
    """ResNet-50 (torchvision layout, v1.5). See :func:`resnet18`."""
    return _load(ResNet("bottleneck", [3, 4, 6, 3], **kwargs), weights, "resnet50")
