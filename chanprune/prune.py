"""Whole-model channel pruning, one layer at a time (the driver).

For each prunable conv ``L`` in network order:

1. **Sample**: the input patches ``X`` of ``L`` in the network being pruned, and the
   output ``Y`` of the *original* network's ``L`` (pre-activation, BatchNorm folded), at
   seeded random positions; accumulated as float64 statistics (:mod:`chanprune.stats`).
2. **Select** the input channels of ``L`` to keep (:mod:`chanprune.selection`) and
   **refit** its weights (:mod:`chanprune.refit`), through
   :func:`chanprune.prune_layer_from_stats`.
3. **Remove** the dropped channels for real: the filters of the previous conv and its
   BatchNorm, the input channels of ``L`` (:mod:`chanprune.surgery`). The first conv of a
   ResNet branch has no previous conv to cut, since it reads the residual stream: with
   ``channel_sampler=True`` it gets a channel sampler instead, so it alone reads fewer
   stream channels (:class:`chanprune.surgery.SampledConv2d`).

Because ``X`` comes from the pruned network and ``Y`` from the original one, each layer
corrects the error accumulated before it. The activations of both networks at the current
layer are kept for all calibration images and advanced one segment per layer, so a whole
sweep costs about one forward pass of each network, not a fresh pass per layer. Where the
maps at a layer would not fit the cache budget (``max_cache_mb``: the 224x224 maps of an
ImageNet VGG's first stage, for thousands of images), the caches stay at the last point
that fitted and each pass recomputes the few layers after it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ._validation import check_choice, check_int_in_range, check_real_in_range
from .distributed import Shard, check_agreement, model_fingerprint, shard_rows
from .exceptions import UnsupportedLayerError
from .flops import conv_output_sizes, count_macs, count_params
from .graph import (
    Plan,
    PlanWarning,
    explicit_widths,
    paper_multipliers,
    symbolic_trace,
    trace_plan,
    uniform_widths,
    widths_for_cost,
    with_channel_samplers,
)
from .layer import prune_layer_from_stats
from .recover import distill
from .report import LayerReport, PruneReport
from .sampling import (
    channel_spectra,
    covariance_spectrum,
    input_moments,
    record_activations,
)
from .schedule import (
    SCHEDULES,
    ConvCost,
    MacModel,
    energy_fractions,
    resolve_explicit,
    widths_for_energy,
    widths_for_speedup,
)
from .selection import SELECTORS
from .sensitivity import group_positions, measure_sensitivity
from .stats import LayerStats
from .surgery import (
    SampledConv2d,
    fold_batchnorm,
    insert_channel_sampler,
    prune_batchnorm,
    prune_conv_out_channels,
    set_batchnorm_identity,
    set_conv_params,
)
from .sweep import (
    ACTIVATION_METHODS,
    ACTIVATION_STATISTICS,
    ActivationScores,
    HeldOut,
    SweepOptions,
    accumulate_samples,
    bn_scales,
    channels_last,
    folded_params,
    sweep_graph,
)

__all__ = [
    "prune_model",
    "MODEL_METHODS",
    "load_calibration_images",
    "plan_widths",
    "prunable_layers",
]

logger = logging.getLogger(__name__)

#: ``planner=`` of :func:`prune_model`: ``names`` recognises VGG and ResNet layouts by
#: their attribute names, ``graph`` derives the channel groups of any network from its
#: traced graph, ``auto`` takes the graph wherever it offers what is asked.
PLANNERS = ("auto", "graph", "names")
#: Every ``method=`` accepted by :func:`prune_model`.
MODEL_METHODS = tuple(m for m in SELECTORS if m != "by_score") + ACTIVATION_METHODS

# Modules allowed in a VGG-style ``features`` chain: channel-wise or spatial only.
_CHAIN_MODULES = (
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.Dropout,
    nn.Identity,
)


# ---------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class _Consumer:
    """A conv whose input channels are selected, and the conv (+BN) that produces them.

    All modules are named by their ``named_modules()`` path. A ``"stream"`` consumer (the
    first conv of a ResNet branch, with a channel sampler) has no producer: it reads the
    residual stream, which keeps its width.
    """

    name: str  # the consuming conv, e.g. "features.3" or "layer1.0.conv2"
    bn: Optional[str]  # its BatchNorm, if any
    producer: Optional[str]  # the conv whose filters are removed; None for "stream"
    producer_bn: Optional[str]
    stage: int  # chain: 1 + pooling layers before it; residual: 1-based stage
    index: Optional[int] = None  # chain only: position in ``features``
    block: Optional[str] = None  # residual only: the block's path
    last_in_block: bool = False  # residual only: the branch's last conv
    sensitive: bool = False  # residual only: last stage, or the block changes the size
    # "chain"; ResNets: "stream" (conv1, channel sampler), "basic" (BasicBlock conv2),
    # "2b", "2c" (Bottleneck conv2, conv3)
    role: str = "chain"


def _chain_plan(model: nn.Module) -> list[_Consumer]:
    """The consumers of a VGG-style model (``features`` Sequential, then a head)."""
    features = model.features
    convs: list[int] = []
    bns: dict[int, int] = {}
    stages: dict[int, int] = {}
    stage = 1
    for i, module in enumerate(features):
        if not isinstance(module, _CHAIN_MODULES):
            raise UnsupportedLayerError(
                f"features.{i} ({type(module).__name__}) is not supported in a VGG-style chain; "
                f"supported: {', '.join(m.__name__ for m in _CHAIN_MODULES)}."
            )
        if isinstance(module, nn.Conv2d):
            _check_groups(module, f"features.{i}")
            convs.append(i)
            stages[i] = stage
        elif isinstance(module, nn.BatchNorm2d):
            if not convs or convs[-1] != i - 1:
                raise UnsupportedLayerError(
                    f"features.{i} (BatchNorm2d) does not directly follow a conv; "
                    "only conv -> BatchNorm pairs are supported."
                )
            bns[convs[-1]] = i
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            stage += 1
    if len(convs) < 2:
        raise UnsupportedLayerError("the model has fewer than two convs: nothing to prune.")

    def bn_name(i: int) -> Optional[str]:
        return f"features.{bns[i]}" if i in bns else None

    return [
        _Consumer(
            name=f"features.{j}",
            bn=bn_name(j),
            producer=f"features.{i}",
            producer_bn=bn_name(i),
            stage=stages[j],
            index=j,
        )
        for i, j in zip(convs[:-1], convs[1:])
    ]


def _check_groups(conv: nn.Conv2d, name: str) -> None:
    if conv.groups != 1:
        raise UnsupportedLayerError(
            f"{name} is a grouped convolution (groups={conv.groups}); only groups=1 is supported."
        )


_RESIDUAL_STAGES = ("layer1", "layer2", "layer3", "layer4")


def _shortcut(block: nn.Module) -> Optional[nn.Module]:
    """The block's shortcut module (CIFAR ``shortcut``, torchvision ``downsample``); None
    means the identity without a module."""
    for attr in ("shortcut", "downsample"):
        module = getattr(block, attr, None)
        if isinstance(module, nn.Module):
            return module
    return None


def _residual_plan(model: nn.Module, channel_sampler: bool = False) -> list[_Consumer]:
    """Branch-internal consumers of a ResNet: BasicBlock conv2; Bottleneck conv2 and conv3;
    with ``channel_sampler``, each block's conv1 first (role ``"stream"``)."""
    stages = [n for n in _RESIDUAL_STAGES if isinstance(getattr(model, n, None), nn.Sequential)]
    consumers: list[_Consumer] = []
    for s, stage_name in enumerate(stages, start=1):
        for b, block in enumerate(getattr(model, stage_name)):
            path = f"{stage_name}.{b}"

            def conv(attr: str, block=block) -> Optional[nn.Conv2d]:
                module = getattr(block, attr, None)
                return module if isinstance(module, nn.Conv2d) else None

            def bn(attr: str, block=block) -> bool:
                return isinstance(getattr(block, attr, None), nn.BatchNorm2d)

            if (
                conv("conv1")
                and conv("conv2")
                and conv("conv3")
                and bn("bn1")
                and bn("bn2")
                and bn("bn3")
            ):
                convs = ["conv1", "conv2", "conv3"]
                roles = ["2b", "2c"]
            elif (
                conv("conv1")
                and conv("conv2")
                and bn("bn1")
                and bn("bn2")
                and not hasattr(block, "conv3")
            ):
                convs = ["conv1", "conv2"]
                roles = ["basic"]
            else:
                raise UnsupportedLayerError(
                    f"block {path} ({type(block).__name__}) is not a branch pattern chanprune "
                    "knows: a BasicBlock (conv1-bn1-relu-conv2-bn2 + shortcut) or a Bottleneck "
                    "(conv1-bn1-relu-conv2-bn2-relu-conv3-bn3 + shortcut), each conv followed "
                    "by its BatchNorm2d."
                )
            for attr in convs:
                _check_groups(conv(attr), f"{path}.{attr}")
            sensitive = (
                s == len(stages)
                or any(conv(attr).stride != (1, 1) for attr in convs)
                or (_shortcut(block) is not None and not isinstance(_shortcut(block), nn.Identity))
            )
            if channel_sampler:
                consumers.append(
                    _Consumer(
                        name=f"{path}.conv1",
                        bn=f"{path}.bn1",
                        producer=None,
                        producer_bn=None,
                        stage=s,
                        block=path,
                        sensitive=sensitive,
                        role="stream",
                    )
                )
            for k, role in enumerate(roles):
                consumers.append(
                    _Consumer(
                        name=f"{path}.{convs[k + 1]}",
                        bn=f"{path}.bn{k + 2}",
                        producer=f"{path}.{convs[k]}",
                        producer_bn=f"{path}.bn{k + 1}",
                        stage=s,
                        block=path,
                        last_in_block=k == len(roles) - 1,
                        sensitive=sensitive,
                        role=role,
                    )
                )
    return consumers


def _plan(model: nn.Module, channel_sampler: bool = False) -> list[_Consumer]:
    """The consumers of a supported architecture, in network order."""
    if not isinstance(channel_sampler, bool):
        raise TypeError(f"channel_sampler must be a bool; got {channel_sampler!r}.")
    if isinstance(getattr(model, "features", None), nn.Sequential):
        if channel_sampler:
            raise ValueError(
                "channel_sampler=True applies to ResNets (a sampler before the first conv of "
                "each residual branch); a VGG-style chain has no residual stream, so every "
                "conv's input is prunable without it: leave channel_sampler off."
            )
        return _chain_plan(model)
    if isinstance(getattr(model, "layer1", None), nn.Sequential):
        return _residual_plan(model, channel_sampler)
    raise UnsupportedLayerError(
        f"{type(model).__name__} is not a supported architecture: chanprune prunes VGG-style "
        "models (a `features` nn.Sequential of Conv2d/BatchNorm2d/ReLU/pooling followed by a "
        "classifier head, e.g. chanprune.models.vgg16_bn or torchvision's VGG) and ResNets "
        "(`layer1`... of BasicBlock/Bottleneck, e.g. chanprune.models.resnet56_cifar10 or "
        "torchvision's ResNet)."
    )


def _check_consumers(model: nn.Module, plan: list[_Consumer]) -> None:
    """Refuse, before any work, consumer layers whose patches or refit chanprune cannot
    model: the sampled patches assume explicit zero padding, and the refit's intercept
    goes into the layer's BatchNorm (or its conv's bias)."""
    for consumer in plan:
        conv = model.get_submodule(consumer.name)
        if isinstance(conv.padding, str):
            raise UnsupportedLayerError(
                f"{consumer.name} has padding={conv.padding!r}; only explicit integer padding "
                "is supported (padding=1 is 'same' for a 3x3 conv with stride 1)."
            )
        if conv.padding_mode != "zeros" and any(conv.padding):
            raise UnsupportedLayerError(
                f"{consumer.name} pads with padding_mode={conv.padding_mode!r}; the sampled "
                "input patches assume zero padding (padding_mode='zeros')."
            )
        if consumer.bn is None:
            continue
        bn = model.get_submodule(consumer.bn)
        if not bn.track_running_stats or bn.running_mean is None:
            raise UnsupportedLayerError(
                f"{consumer.bn} keeps no running statistics (track_running_stats=False), so "
                "it cannot be folded into its conv."
            )
        if not bn.affine and conv.bias is None:
            raise UnsupportedLayerError(
                f"{consumer.bn} has affine=False and {consumer.name} has no bias: the refit's "
                "intercept would have nowhere to go without changing the architecture."
            )


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of ``model``'s parameters: float32 or float64."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if not dtypes <= {torch.float32, torch.float64} or len(dtypes) > 1:
        found = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
        raise TypeError(
            f"prune_model needs a model whose parameters are all float32 or all float64; got "
            f"{found} (convert it with model.float())."
        )
    return dtypes.pop() if dtypes else torch.float32


def prunable_layers(model: nn.Module, *, channel_sampler: bool = False) -> dict[str, int]:
    """The layers whose input channels :func:`prune_model` can select, with their widths.

    Keys are ``named_modules()`` paths of the consuming convs (``"features.3"``,
    ``"layer1.0.conv2"``); these are the keys of an explicit ``schedule``. With
    ``channel_sampler=True`` (ResNets only), the first conv of every branch
    (``"layer1.0.conv1"``) is listed too, with the width of the stream it reads.
    """
    plan = _plan(model, channel_sampler)  # refuses unsupported architectures first
    return {c.name: model.get_submodule(c.name).in_channels for c in plan}


def _mac_model(model: nn.Module, plan: list[_Consumer], input_shape) -> MacModel:
    sizes = conv_output_sizes(model, input_shape)
    groups = {c.name: model.get_submodule(c.name).in_channels for c in plan}
    group_of_input = {c.name: c.name for c in plan}
    # A stream consumer's input group has no producing conv: the stream keeps its width.
    group_of_output = {c.producer: c.name for c in plan if c.producer is not None}
    convs = []
    for name, (h, w) in sizes.items():
        conv = model.get_submodule(name)
        kh, kw = conv.kernel_size
        convs.append(
            ConvCost(
                name=name,
                coef=h * w * kh * kw,
                in_group=group_of_input.get(name),
                out_group=group_of_output.get(name),
                in_fixed=conv.in_channels,
                out_fixed=conv.out_channels,
            )
        )
    return MacModel(groups=groups, convs=tuple(convs))


# Paper schedule for ResNets: sensitive blocks keep 70%, others 30% (ratio 7 : 3), and
# inside a Bottleneck the kept ratios of the 2a, 2b and 2c inputs are 2 : 4 : 3, as
# multiples of the mean of 2b and 2c (the block's base ratio before the sampler existed).
# The stream input of a BasicBlock's conv1 keeps the block's base ratio.
_RESIDUAL_ROLE = {"basic": 1.0, "2a": 2.0 / 3.5, "2b": 4.0 / 3.5, "2c": 3.0 / 3.5}


#: Images (the first fit ones) whose channel spectra drive ``schedule="energy"``: every
#: position of every map counts, so even the 2x2 maps of VGG-16's conv5 on CIFAR give
#: 2,000 vectors of 512 channels, enough to tell a fast-falling spectrum from a flat one,
#: for one forward pass over a tenth of 5,000 images. On a class-sorted folder the first
#: fit images are a few classes; spreading them over all classes measured no better
#: (RESULTS.md, "defaults" section), so the recorded behaviour stays.
ENERGY_IMAGES = 500

#: Images (spread evenly over the fit ones) on which ``schedule="sensitivity"`` measures
#: each group's output degradation: one forward pass of them per group and width.
SENSITIVITY_IMAGES = 64

#: What ``prune_model(recover=...)`` can do after pruning.
RECOVERIES = ("distill",)

#: Schedules only the graph planner offers.
_GRAPH_SCHEDULES = ("sensitivity",)


def _multipliers(plan: list[_Consumer], schedule: str) -> dict[str, float]:
    if schedule == "uniform":
        return {c.name: 1.0 for c in plan}
    bottlenecks = {c.block for c in plan if c.role in ("2b", "2c")}
    multipliers = {}
    for c in plan:
        if c.role == "chain":
            # The paper's VGG-16 schedule: conv1_x-conv3_x : conv4_x kept ratios 1 : 1.5,
            # conv5_x (stage 5 and beyond) untouched; conv1_1 sees the image, never pruned.
            multipliers[c.name] = 1.0 if c.stage <= 3 else 1.5 if c.stage == 4 else 0.0
            continue
        role = c.role
        if role == "stream":
            role = "2a" if c.block in bottlenecks else "basic"
        multipliers[c.name] = (0.7 if c.sensitive else 0.3) * _RESIDUAL_ROLE[role]
    return multipliers


#: What ``schedule="auto"`` picks, and why: the schedule measured best for each kind of
#: network without fine-tuning (benchmarks/RESULTS.md).
AUTO_SCHEDULES = {
    "chain": (
        "energy",
        "a VGG-style chain: 'energy' measured best on VGG-16-BN at 4x and 5x and within 0.3 "
        "points of the best at 2x",
    ),
    "residual": (
        "paper",
        "a ResNet of Basic or Bottleneck blocks: the paper's schedule measured best on "
        "ResNet-56 and ResNet-20 at 1.5x and 2x",
    ),
    "graph": (
        "sensitivity",
        "a network neither a VGG-style chain nor a ResNet: 'sensitivity' adapts the widths "
        "to any architecture and measured above 'uniform' and 'energy' on the ResNets",
    ),
}


def network_kind(plan: Union[Plan, list]) -> str:
    """The :data:`AUTO_SCHEDULES` key of a network: ``"chain"`` (VGG-style: no residual
    addition, the paper's schedule defined), ``"residual"`` (Basic or Bottleneck
    branches) or ``"graph"`` (anything else); from a traced :class:`~chanprune.graph.Plan`
    or a name-based plan."""
    if isinstance(plan, list):
        return "chain" if plan[0].role == "chain" else "residual"
    try:
        paper_multipliers(plan)
    except ValueError:
        return "graph"
    return "residual" if any(c.addend for c in plan.consumers) else "chain"


def resolve_auto_schedule(plan: Union[Plan, list]) -> tuple[str, str]:
    """``(schedule, reason)`` for ``schedule="auto"``, by :func:`network_kind`."""
    return AUTO_SCHEDULES[network_kind(plan)]


def _names_only(schedule, spectra=None) -> bool:
    """Whether a request needs the name-based planner under ``planner="auto"``: widths or
    spectra keyed by its layers (every criterion runs on the graph too). The channel
    sampler and the activation-cache budget, also its own, are checked by the caller."""
    return isinstance(schedule, Mapping) or spectra is not None


def _check_target(speedup, schedule) -> bool:
    """Validate the (speedup, schedule) pair; return whether the schedule is explicit."""
    explicit = isinstance(schedule, Mapping)
    if not explicit:
        check_choice(schedule, "schedule", SCHEDULES)
        if speedup is None:
            raise ValueError(f"schedule={schedule!r} needs a target: pass speedup (> 1).")
        check_real_in_range(speedup, "speedup", 1.0, low_inclusive=False)
    elif speedup is not None:
        raise ValueError("pass either speedup or an explicit schedule dict, not both.")
    return explicit


def plan_widths(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    speedup: Optional[float] = None,
    schedule: Union[str, Mapping[str, Union[int, float]]] = "uniform",
    channel_sampler: bool = False,
    spectra: Optional[Mapping[str, np.ndarray]] = None,
    planner: str = "auto",
) -> tuple[dict[str, int], float]:
    """Per-layer widths for a target speed-up, without pruning (and, but for the
    ``energy`` schedule, without data).

    Parameters
    ----------
    model : nn.Module
        A VGG-style network or a ResNet (see :func:`prune_model`).
    input_shape : tuple of int
        One input without the batch dimension, e.g. ``(3, 32, 32)``.
    speedup, schedule, channel_sampler
        As in :func:`prune_model`.
    spectra : dict of layer -> ndarray, optional
        Needed by ``schedule="energy"`` only: the eigenvalues of the covariance of each
        prunable layer's input channels, as :func:`chanprune.sampling.channel_spectra`
        returns them (:func:`prune_model` computes them from its calibration images).
    planner : {"auto", "graph", "names"}, default="auto"
        As in :func:`prune_model`.

    Returns
    -------
    widths : dict of layer -> int
        Input channels kept by each prunable layer (:func:`prunable_layers` keys); with
        the graph planner, channels kept by each channel group (named after its first
        producer, :class:`chanprune.graph.Plan`).
    speedup : float
        The MAC speed-up those widths achieve.

    Raises
    ------
    UnsupportedLayerError, ValueError
        An unsupported model, an input shape the model does not accept, an unreachable or
        invalid target.
    """
    planner = check_choice(planner, "planner", PLANNERS)
    explicit = _check_target(speedup, schedule)
    if planner == "auto" and not _names_only(schedule, spectra):
        planner = "graph"
    if schedule == "auto":
        names = None if planner == "graph" else _names_plan(model, channel_sampler, planner)
        if names is not None and planner == "auto":
            names = names if _names_confirmed(model, names, tuple(input_shape)) else None
        if names is None:
            planner = "graph"
            names = trace_plan(model, tuple(input_shape))
        schedule = resolve_auto_schedule(names)[0]
    if isinstance(schedule, str) and schedule in _GRAPH_SCHEDULES:
        raise ValueError(
            f"schedule={schedule!r} allocates the widths from the output degradation "
            "measured on calibration data; use prune_model, which measures it."
        )
    plan = None if planner == "graph" else _names_plan(model, channel_sampler, planner)
    if plan is not None and planner == "auto":
        plan = plan if _names_confirmed(model, plan, tuple(input_shape)) else None
    if plan is None:
        if schedule == "energy":
            raise ValueError(
                "schedule='energy' on the graph planner allocates the widths from the "
                "channel spectra of calibration data; use prune_model, which computes them."
            )
        graph = trace_plan(model, tuple(input_shape))
        if channel_sampler:
            graph = with_channel_samplers(graph)
        if explicit:
            widths = explicit_widths(graph, schedule)
        else:
            multipliers = paper_multipliers(graph) if schedule == "paper" else None
            widths = uniform_widths(graph, speedup, multipliers=multipliers)
        return widths, graph.macs() / graph.macs(widths)
    if explicit and not channel_sampler:
        _check_no_stream_layers(model, plan, schedule)
    try:
        mac_model = _mac_model(model, plan, tuple(input_shape))
    except RuntimeError as exc:
        raise ValueError(
            f"the model does not accept inputs of shape {tuple(input_shape)}: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    if explicit:
        widths = {**mac_model.groups, **resolve_explicit(mac_model, schedule)}
        return widths, mac_model.macs() / mac_model.macs(widths)
    if schedule == "energy":
        if spectra is None:
            raise ValueError(
                "schedule='energy' allocates the widths from the channel spectra of "
                "calibration data: pass spectra=channel_spectra(...), or use prune_model, "
                "which computes them."
            )
        energy = {c.name: energy_fractions(spectra[c.name]) for c in plan if c.name in spectra}
        return widths_for_energy(mac_model, speedup, energy)
    return widths_for_speedup(mac_model, speedup, _multipliers(plan, schedule))


def _check_no_stream_layers(
    model: nn.Module, plan: list[_Consumer], schedule: Mapping[str, Union[int, float]]
) -> None:
    """Refuse an explicit schedule that names the first conv of a ResNet branch when the
    channel sampler that would prune it is off, saying so (not just "not prunable")."""
    if plan[0].role == "chain":
        return
    stream = [c.name for c in _residual_plan(model, True) if c.role == "stream"]
    named = [name for name in stream if name in schedule]
    if named:
        raise ValueError(
            f"the schedule names {named}: the first conv of a residual branch reads the "
            "residual stream, which the shortcut needs whole, so its input channels can be "
            "pruned only through a channel sampler: pass channel_sampler=True (CLI: "
            "--channel-sampler), or leave these layers out."
        )


# ---------------------------------------------------------------------------- calibration
def load_calibration_images(
    calib: Union[Dataset, torch.Tensor],
    n_images: Optional[int] = None,
    *,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    rows: Optional[np.ndarray] = None,
) -> torch.Tensor:
    """Calibration images as one ``dtype`` tensor (n_images, C, H, W).

    ``calib`` is a tensor of preprocessed images or a dataset yielding ``image`` or
    ``(image, label)``; ``n_images`` images are drawn with a seeded generator (all when
    None). ``dtype`` is the model's (float64 images stay exact for a float64 model).
    ``rows``: only these of the drawn images, in this order (a rank's shard; the others
    are never read).
    """
    from .data import calibration_subset, check_same_shapes, collate_images

    if isinstance(calib, torch.Tensor):
        if calib.dim() != 4:
            raise ValueError(
                f"calib as a tensor must have shape (n_images, C, H, W); got {tuple(calib.shape)}."
            )
        if calib.shape[0] == 0:
            raise ValueError("calib holds no images.")
        if n_images is not None and n_images < calib.shape[0]:
            rng = np.random.default_rng(seed)
            idx = np.sort(rng.choice(calib.shape[0], size=n_images, replace=False))
            calib = calib[torch.from_numpy(idx)]
        if rows is not None:
            calib = calib[torch.from_numpy(np.asarray(rows, dtype=np.int64))]
        images = calib.detach().to(dtype)
    elif isinstance(calib, Dataset):
        if len(calib) == 0:
            raise ValueError("the calibration dataset holds no images.")
        subset = calibration_subset(calib, n_images, seed=seed)
        if rows is not None:
            subset = torch.utils.data.Subset(calib, [subset.indices[int(r)] for r in rows])
        loader = torch.utils.data.DataLoader(
            subset, batch_size=batch_size, shuffle=False, collate_fn=collate_images
        )  # images of different sizes: a ValueError that says so, per batch...
        chunks = []
        for batch in tqdm(loader, desc="calibration images", disable=not progress, leave=False):
            chunks.append(batch[0] if isinstance(batch, (list, tuple)) else batch)
        check_same_shapes([chunk[0] for chunk in chunks])  # ...and across batches
        images = torch.cat(chunks).to(dtype)
    else:
        raise TypeError(
            f"calib must be a torch Dataset or a tensor of images; got {type(calib).__name__}."
        )
    if not torch.isfinite(images).all():
        raise ValueError("the calibration images contain NaN or Inf values.")
    return images


def _fit_heldout_split(n_total: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices of the fit and of the held-out calibration images (seeded)."""
    n_held = int(round(holdout * n_total)) if n_total > 1 else 0
    order = np.random.default_rng(seed).permutation(n_total)
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def _n_calibration(calib: Union[Dataset, torch.Tensor], n_images: Optional[int]) -> int:
    """How many images :func:`load_calibration_images` draws from ``calib``."""
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 4 or calib.shape[0] == 0:
            raise ValueError(
                "calib as a tensor must have shape (n_images, C, H, W) with n_images >= 1; "
                f"got {tuple(calib.shape)}."
            )
        n = calib.shape[0]
    elif isinstance(calib, Dataset):
        n = len(calib)
        if n == 0:
            raise ValueError("the calibration dataset holds no images.")
    else:
        raise TypeError(
            f"calib must be a torch Dataset or a tensor of images; got {type(calib).__name__}."
        )
    return n if n_images is None else min(n, n_images)


# ---------------------------------------------------------------------------- helpers
class _Maps:
    """The activations of every calibration image at one point of a network.

    Held as the per-batch chunks the forward passes produce, so storing them copies
    nothing. ``keep_channels`` is lazy: the selection is applied to each chunk when it is
    read, one small copy at a time, instead of one copy of the whole cache.
    """

    def __init__(self, chunks: list[torch.Tensor], kept: Optional[torch.Tensor] = None) -> None:
        self.chunks = chunks
        self.kept = kept

    @classmethod
    def split(cls, images: torch.Tensor, batch_size: int) -> _Maps:
        return cls(list(images.split(batch_size)))

    def __len__(self) -> int:
        return len(self.chunks)

    def batches(self, device) -> Iterator[tuple[int, torch.Tensor]]:
        """``(lo, maps)`` per chunk: the index of its first image and its maps on ``device``."""
        lo = 0
        for chunk in self.chunks:
            x = chunk.to(device)
            if self.kept is not None:
                x = _keep_channels(x, self.kept.to(device))
            yield lo, x
            lo += chunk.shape[0]

    def keep_channels(self, kept: torch.Tensor) -> _Maps:
        kept = kept if self.kept is None else self.kept[kept]
        return _Maps(self.chunks, kept)


def _keep_channels(maps: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``maps[:, kept]`` in channels-last layout, in one copy."""
    if maps.dim() != 4:
        return maps[:, kept]
    # Selecting columns of the (pixels, channels) matrix of the NHWC view writes an
    # NHWC-contiguous result (the fastest of the ways tried).
    n, c, h, w = maps.shape
    rows = channels_last(maps).permute(0, 2, 3, 1).reshape(n * h * w, c)
    return torch.index_select(rows, 1, kept).view(n, h, w, len(kept)).permute(0, 3, 1, 2)


def _default_cache_bytes(device: torch.device) -> Optional[int]:
    """The activation-cache budget when none is given: 3/4 of the memory free on a CUDA
    device, half the RAM available on a CPU (None where that cannot be read)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.75)
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024 // 2
    except (OSError, KeyError, ValueError):
        return None


def _cache_bytes(max_cache_mb: Optional[float], device: torch.device) -> Optional[int]:
    """The activation-cache budget in bytes: ``max_cache_mb`` MB, or the default of
    :func:`_default_cache_bytes` when it is None."""
    if max_cache_mb is None:
        return _default_cache_bytes(device)
    return int(max_cache_mb * 2**20)


def _chain_map_bytes(features: nn.Sequential, image: torch.Tensor) -> list[int]:
    """Bytes per image of the maps entering each index of ``features`` (the last entry:
    its output), from one forward pass of a single image (``image``: (1, C, H, W))."""
    sizes = []
    x = image
    for module in features:
        sizes.append(x.numel() * x.element_size())
        x = module(x)
    sizes.append(x.numel() * x.element_size())
    return sizes


def _run(modules: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    x = channels_last(x)
    for module in modules:
        x = module(x)
    return x


def _fused(modules: list[nn.Module]) -> list[nn.Module]:
    """``modules`` with each Conv2d that is followed by a BatchNorm2d replaced by the two
    folded into one conv (the same outputs to rounding, in eval mode): a pass then skips
    the BN's read and write of every map. The modules themselves are not changed."""
    out: list[nn.Module] = []
    for module in modules:
        previous = out[-1] if out else None
        if (
            isinstance(module, nn.BatchNorm2d)
            and not module.training
            and module.track_running_stats
            and isinstance(previous, nn.Conv2d)
            and previous.groups == 1
            and previous.out_channels == module.num_features
        ):
            out[-1] = fold_batchnorm(previous, module)
        else:
            out.append(module)
    return out


def _fold_reference(reference: nn.Module, plan: list[_Consumer]) -> None:
    """Fold the BatchNorms of the planned convs into them, in place, leaving an
    ``nn.Identity`` where each BN was: the reference network then yields the same targets
    (to rounding; hooks on a BN's path now see the folded conv's output) for one pass less
    over every map."""
    pairs = {(c.name, c.bn) for c in plan} | {(c.producer, c.producer_bn) for c in plan}
    for conv_name, bn_name in sorted(p for p in pairs if p[1] is not None):
        conv, bn = reference.get_submodule(conv_name), reference.get_submodule(bn_name)
        reference.set_submodule(conv_name, fold_batchnorm(conv, bn))
        reference.set_submodule(bn_name, nn.Identity())


# ---------------------------------------------------------------------------- the driver
def prune_model(
    model: nn.Module,
    calib: Union[Dataset, torch.Tensor],
    *,
    speedup: Optional[float] = None,
    schedule: Union[str, Mapping[str, Union[int, float]]] = "auto",
    method: str = "greedy_ls",
    n_images: Optional[int] = None,
    positions_per_image: Optional[int] = 10,
    holdout: float = 0.1,
    refit: bool = True,
    ridge: float = 1e-4,
    normalize: bool = True,
    alternate: bool = False,
    correct_unpruned: bool = True,
    residual_correction: bool = True,
    channel_sampler: bool = False,
    planner: str = "auto",
    channel_multiple: int = 1,
    batch_size: int = 100,
    max_cache_mb: Optional[float] = None,
    stats_dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
    progress: bool = True,
    inplace: bool = False,
    max_iter: int = 1000,
    tol: float = 1e-6,
    recover: Optional[str] = None,
    recover_epochs: int = 3,
    recover_lr: float = 1e-5,
    process_group=None,
) -> tuple[nn.Module, PruneReport]:
    """Prune the channels of a network, layer by layer, without retraining.

    Parameters
    ----------
    model : nn.Module
        Any CNN that :mod:`torch.fx` can trace (see ``planner``). Its layouts known by name:
        a VGG-style network (``features`` Sequential of conv/BN/ReLU/pool, then a head),
        e.g. :func:`chanprune.models.vgg16_bn_cifar10` or a torchvision VGG; or a ResNet
        (``layer1``... of BasicBlock/Bottleneck), e.g.
        :func:`chanprune.models.resnet56_cifar10` or a torchvision ResNet, of which the
        branch-internal channels are pruned (the residual stream keeps its width; see
        ``channel_sampler`` for the input of each branch). Its parameters are float32 or
        float64 (the calibration images are converted to that dtype). Not modified unless
        ``inplace=True``.
    calib : Dataset or tensor of shape (n_images, C, H, W)
        Preprocessed calibration images (a dataset may yield ``(image, label)``).
    speedup : float, optional
        Target MAC speed-up (> 1), turned into per-layer widths by ``schedule``. The
        achieved value is reported (within 2% of the target).
    schedule : {"auto", "uniform", "paper", "energy", "sensitivity"} or dict of layer -> keep
        ``auto`` (default): the schedule measured best for the kind of network
        (:data:`AUTO_SCHEDULES`, :func:`network_kind`: ``energy`` for a VGG-style chain,
        ``paper`` for a ResNet of Basic or Bottleneck blocks, ``sensitivity`` for any
        other network); the report says which and why (``options["schedule_reason"]``).
        ``uniform``: one kept ratio everywhere; ``paper``: He et al.'s schedules (VGG-16:
        conv1_x-conv3_x : conv4_x kept ratios 1 : 1.5, conv5_x untouched; ResNet: blocks
        of the last stage and blocks that change the map size keep 7/3 the ratio of the
        others, Bottleneck 2b : 2c inputs 4 : 3; on the graph planner the stages, blocks
        and roles come from the traced shapes and residual additions,
        :func:`chanprune.graph.paper_multipliers`); ``energy``: from the data, the widths
        that keep the most principal-component energy of each layer's input channels per
        MAC (:func:`chanprune.schedule.widths_for_energy`; the spectra come from one
        forward pass of the original network over the first ``ENERGY_IMAGES`` = 500 fit
        images, so layers with redundant channels are pruned hardest); or explicit
        widths ``{"features.3": 32, ...}`` (int counts or float ratios), in which case
        ``speedup`` must be None. ``sensitivity`` (graph planner, which it selects under
        ``planner="auto"``): the output degradation of the network as each channel group
        alone narrows is measured on ``SENSITIVITY_IMAGES`` = 64 fit images
        (:mod:`chanprune.sensitivity`), and the widths that meet the MAC target with the
        least predicted degradation chosen (:func:`chanprune.graph.widths_for_cost`).
        :func:`prunable_layers` lists the keys. With
        ``channel_sampler``, the paper schedule gives the stream input of a Bottleneck's
        conv1 (2a) 2/3.5 of the block's base ratio (2a : 2b : 2c = 2 : 4 : 3), that of a
        BasicBlock's conv1 the base ratio; ``uniform`` treats it like every other layer.
    method : str, default="greedy_ls"
        Channel selector: ``greedy_ls`` (the default: greedy least-squares elimination on
        the same reconstruction objective; at or above LASSO in 37 of the 38 shared
        configurations measured, see RESULTS.md), ``greedy_swap`` (``greedy_ls``, then
        exchanges of a kept and a dropped channel while the refit error falls: lower layer
        errors, no better accuracy measured), ``lasso`` (the paper's), ``thinet``,
        ``max_response``,
        ``first_k``, ``random`` (see :mod:`chanprune.selection`), or an activation/BN
        criterion: ``apoz`` (keep the channels least often zero), ``entropy`` (of the
        pooled activation), ``bn_scale`` (largest ``|gamma|``, Network Slimming; not with
        ``channel_sampler``: no single BatchNorm produces the residual stream).
    n_images : int, optional
        Calibration images to draw (seeded); all of ``calib`` when None.
    positions_per_image : int or None, default=10
        Output positions sampled per image and layer (the paper uses 10); None or a
        value >= H*W takes every position. On small maps, where the statistics of every
        position cost less from whole maps than those of the sampled patches
        (:meth:`LayerStats.update_maps`; the 4x4 and 2x2 maps of a CIFAR VGG), every
        position is used: more samples for less work.
    holdout : float, default=0.1
        Fraction of the calibration images kept out of the fit, to report a held-out
        reconstruction error per layer, measured directly on their sampled positions
        (0 disables it).
    refit : bool, default=True
        Least-squares refit of the kept weights (False: keep the original weights).
    ridge : float, default=1e-4
        Relative ridge of the refit (a fraction of the mean diagonal of the Gram); guards
        deep layers with few positions per image against overfitting.
    normalize, alternate, max_iter, tol
        LASSO options, see :func:`chanprune.prune_layer`.
    correct_unpruned : bool, default=True
        Also refit the layers the schedule keeps whole (when their input has changed), so
        they absorb the error accumulated before them.
    residual_correction : bool, default=True
        ResNets: the last conv of each branch reconstructs ``Y2 + Y1 - Y1'`` (original
        branch output plus original shortcut minus the pruned network's shortcut) instead
        of ``Y2``, so each block's sum tracks the original one (He et al., Sec. 4.2).
    channel_sampler : bool, default=False
        Residual networks: also prune the input of every conv that reads a residual stream
        (a block's first conv; not a projection shortcut) through a channel sampler (He et
        al., Sec. 4.2): the conv becomes a :class:`chanprune.surgery.SampledConv2d` that
        reads only the kept stream channels, while the stream itself and the shortcut keep
        every channel. Its input is the pruned network's stream, its target its original
        output. Each such input is a channel group ``"<conv>:in"``
        (:func:`chanprune.graph.with_channel_samplers`), which every schedule and method
        prunes like any other. Refused for networks without a residual stream.
    planner : {"auto", "graph", "names"}, default="auto"
        How the channels to prune are found. ``graph`` traces the model with
        :mod:`torch.fx` and derives its channel groups (:func:`chanprune.graph.trace_plan`):
        any CNN as its author wrote it, its residual streams kept whole (but see
        ``channel_sampler``); explicit schedule keys are then group names (the first
        producing conv's path) or ``"<conv>:in"`` for the input of a conv, the MAC target
        counts every conv and linear, and every method runs with every schedule. ``names``
        recognises the VGG and ResNet layouts above by their attribute names; it alone
        offers explicit widths keyed by its layers
        (:func:`prunable_layers`). ``auto`` takes the graph wherever it offers what is
        asked, else the names where the traced graph confirms them.
    channel_multiple : int, default=1
        Graph planner: the kept widths of ``speedup`` are multiples of this in every group
        whose size is one (8: the channel-blocked kernels of ONNX Runtime and oneDNN stay
        usable, see RESULTS.md's latency tables). Above 1 it selects the graph planner
        under ``planner="auto"``.
    batch_size : int, default=100
        Images per forward chunk (memory).
    max_cache_mb : float, optional
        Memory, in MB, for the activations cached between layers (both networks' values
        at one point, for every calibration image; they live on ``device``). Where the
        values alive at a layer's input would not fit, the caches stay at the last point
        that did and each pass recomputes the layers from there: less memory for more
        compute, with the same result (0: every pass starts from the images). None: 3/4
        of the memory free on a CUDA device, half the RAM available on a CPU. The graph
        planner estimates the values' sizes from the traced shapes (the calibration
        images themselves are not counted); the name-based one bounds VGG-style chains
        only (its ResNets cache the block inputs on the device of ``calib``, whatever
        this budget).
    stats_dtype : torch.float32, torch.float64 or None
        Precision of each chunk's products ``X^T X`` (the running sums are float64
        either way; see :class:`chanprune.LayerStats`). None: float32 for a float32 model
        on a CPU, where it is 2-4x faster; float64 on CUDA or for a float64 model.
    device : str or torch.device, default="cpu"
        Where the forward passes and statistics run (``"cuda"`` works).
    seed : int, default=0
        Seeds the image draw, the held-out split, the positions and ``random``.
    progress : bool, default=True
        Show tqdm progress bars.
    inplace : bool, default=False
        Prune ``model`` itself instead of a copy.
    recover : {None, "distill"}, default=None
        ``"distill"``: after pruning, train the pruned network for ``recover_epochs``
        epochs to reproduce the original's outputs on the fit images (no labels; flips and
        crops; :func:`chanprune.recover.distill`), reporting the divergence on the
        held-out ones per epoch in ``report.recovery``. None: no training at all.
    recover_epochs : int, default=3
    recover_lr : float, default=1e-5
        Initial learning rate of the distillation (cosine to 0). Small on purpose: a
        refit network sits in a sharp least-squares optimum without BatchNorm to
        normalise it, and larger steps (1e-4 and up on the CIFAR VGG-16-BN) diverge.
    process_group : torch.distributed process group, optional
        Shard the calibration over its ranks (e.g. ``torch.distributed.group.WORLD``
        under ``torchrun``): every rank calls ``prune_model`` with the same model,
        options and calibration set, reads only its own contiguous block of the fit and
        of the held-out images, and runs the forward passes for them; each layer's
        statistics are all-reduced (SUM, float64) before its selection, which every rank
        then computes identically. Every rank returns the same pruned network and report
        (up to the order of float64 additions; wall times are the rank's own); progress
        shows on rank 0 only. Ranks that disagree on the model, the options or the
        calibration set raise ``ValueError`` before any work. Graph planner only; not
        with ``recover``.

    Returns
    -------
    pruned : nn.Module
        The same class as ``model``, physically smaller, in eval mode, on ``device``.
    report : PruneReport
        Per-layer widths, errors and times; MACs, parameters and speed-up.

    Raises
    ------
    UnsupportedLayerError
        A model or layer chanprune cannot prune (e.g. a pruned conv with non-zero
        ``padding_mode`` or string padding); the message names it.
    TypeError
        A model whose parameters are not all float32 or all float64.
    ValueError
        Bad parameters, an unreachable speed-up, empty or non-finite calibration data.
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}.")
    method = check_choice(method, "method", MODEL_METHODS)
    explicit = _check_target(speedup, schedule)
    if recover is not None:
        check_choice(recover, "recover", RECOVERIES)
    shard = Shard.of(process_group)
    if shard is not None:
        if planner == "names":
            raise ValueError("process_group runs on the graph planner; use planner='auto'.")
        if recover is not None:
            raise ValueError("recover='distill' runs in one process; distil after the prune.")
        if method in ACTIVATION_STATISTICS:
            raise ValueError(
                f"method={method!r} ranks channels by activation statistics that are not "
                "shared across ranks; use it in one process, or another method."
            )
        planner = "graph"
        progress = progress and shard.rank == 0
    recovery = dict(
        recover=recover,
        epochs=check_int_in_range(recover_epochs, "recover_epochs", 1),
        lr=check_real_in_range(recover_lr, "recover_lr", 0.0, low_inclusive=False),
    )
    if n_images is not None:
        n_images = check_int_in_range(n_images, "n_images", 1)
    if positions_per_image is not None:
        positions_per_image = check_int_in_range(positions_per_image, "positions_per_image", 1)
    holdout = check_real_in_range(holdout, "holdout", 0.0, 0.5)
    ridge = check_real_in_range(ridge, "ridge", 0.0)
    batch_size = check_int_in_range(batch_size, "batch_size", 1)
    device = torch.device(device)
    if max_cache_mb is not None:
        max_cache_mb = check_real_in_range(
            max_cache_mb, "max_cache_mb", 0.0, np.inf, high_inclusive=False
        )
    dtype = _model_dtype(model)
    if stats_dtype is None:
        cpu32 = device.type == "cpu" and dtype == torch.float32
        stats_dtype = torch.float32 if cpu32 else torch.float64
    planner = check_choice(planner, "planner", PLANNERS)
    channel_multiple = check_int_in_range(channel_multiple, "channel_multiple", 1)
    if channel_multiple > 1:
        if planner == "names":
            raise ValueError(
                "channel_multiple applies to the graph planner; use planner='auto' or 'graph'."
            )
        planner = "graph"
    if isinstance(schedule, str) and schedule in _GRAPH_SCHEDULES:
        if planner == "names":
            raise ValueError(
                f"schedule={schedule!r} runs on the graph planner; use planner='auto' or "
                "'graph'."
            )
        planner = "graph"
    if planner == "auto" and not _names_only(schedule):
        # One driver: the graph planner, wherever it offers what is asked.
        planner = "graph"
    plan = None if planner == "graph" else _names_plan(model, channel_sampler, planner)
    if plan is not None:
        _check_consumers(model, plan)
    if method == "bn_scale" and channel_sampler:
        raise ValueError(
            "method='bn_scale' ranks channels by the |gamma| of the BatchNorm that produces "
            "them; the residual stream that a channel sampler selects from is a sum of branch "
            "and shortcut, with no such BatchNorm: use another method or channel_sampler=False."
        )
    if plan is not None and method == "bn_scale":
        missing = [
            c.name
            for c in plan
            if c.producer_bn is None or not model.get_submodule(c.producer_bn).affine
        ]
        if missing:
            raise UnsupportedLayerError(
                f"method='bn_scale' needs an affine BatchNorm after every pruned conv; the "
                f"producers of {missing} have none."
            )

    # What the graph sweep does; the name-based driver takes the same values one by one.
    options = SweepOptions(
        method=method, refit=refit, ridge=ridge, normalize=normalize, alternate=alternate,
        correct_unpruned=correct_unpruned, residual_correction=residual_correction,
        positions_per_image=positions_per_image, stats_dtype=stats_dtype, device=device,
        seed=seed, max_iter=max_iter, tol=tol,
    )  # fmt: skip
    auto_reason = None
    if shard is not None:
        # The split, made on every rank without loading anything; each loads its part.
        n_total = _n_calibration(calib, n_images)
        fit_idx, held_idx = _fit_heldout_split(n_total, holdout, seed)
        fit_rows = shard_rows(len(fit_idx), shard.rank, shard.world_size)
        held_rows = shard_rows(len(held_idx), shard.rank, shard.world_size)
        check_agreement(
            dict(
                # device may differ by rank (one GPU each): everything else must not
                {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
                 if f.name != "device"},
                model=type(model).__name__, state=model_fingerprint(model), n_total=n_total,
                speedup=speedup, schedule=repr(schedule), n_images=n_images, holdout=holdout,
                channel_multiple=channel_multiple, batch_size=batch_size,
            ),
            shard,
        )  # fmt: skip
        if len(fit_idx) < shard.world_size:
            raise ValueError(
                f"{len(fit_idx)} fit images cannot be shared by {shard.world_size} ranks; "
                "use more calibration images or fewer ranks."
            )
        rows = np.concatenate([fit_idx[fit_rows], held_idx[held_rows]])
        image_ids = torch.from_numpy(np.concatenate([fit_rows, len(fit_idx) + held_rows]))
        images = load_calibration_images(
            calib, n_images, seed=seed, progress=progress, dtype=dtype, rows=rows
        )
        return _prune_graph(
            model, images, len(fit_rows), options, speedup=speedup, schedule=schedule,
            batch_size=batch_size, progress=progress, inplace=inplace, start=start,
            channel_multiple=channel_multiple, image_ids=image_ids, shard=shard,
            counts=(len(fit_idx), len(held_idx)), auto_reason=auto_reason,
            channel_sampler=channel_sampler, max_cache_mb=max_cache_mb,
            cache_bytes=_cache_bytes(max_cache_mb, device),
        )  # fmt: skip

    # A float64 model runs (and is refit) in float64, on images never rounded to float32.
    images = load_calibration_images(calib, n_images, seed=seed, progress=progress, dtype=dtype)
    calib_device = images.device
    if device.type == "cuda" and images.device != device:
        # Every pass that starts from the images then reads them without a host copy.
        if images.nbytes <= torch.cuda.mem_get_info(device)[0] // 4:
            images = images.to(device)
    cache_bytes = _cache_bytes(max_cache_mb, device)
    n_total = images.shape[0]
    # Held-out images go last, so every chunk splits into fit and held-out rows by slicing.
    fit_idx, held_idx = _fit_heldout_split(n_total, holdout, seed)
    n_held = len(held_idx)
    images = images[torch.from_numpy(np.concatenate([fit_idx, held_idx])).to(images.device)]
    input_shape = tuple(images.shape[1:])
    if plan is not None and planner == "auto" and not _names_confirmed(model, plan, input_shape):
        # The attribute names look like a known architecture but the traced graph says
        # otherwise (e.g. a pre-activation ResNet): the graph planner is right.
        logger.info("the traced graph does not match the names; using the graph planner")
        plan = None
    if schedule == "auto" and plan is not None:
        schedule, auto_reason = resolve_auto_schedule(plan)
        logger.info("schedule='auto': %s, for %s", schedule, auto_reason)
    if plan is None:
        return _prune_graph(
            model, images, n_total - n_held, options, speedup=speedup, schedule=schedule,
            batch_size=batch_size, progress=progress, inplace=inplace, start=start,
            channel_multiple=channel_multiple, recovery=recovery, auto_reason=auto_reason,
            channel_sampler=channel_sampler, max_cache_mb=max_cache_mb, cache_bytes=cache_bytes,
        )  # fmt: skip

    reference = copy.deepcopy(model).to(device).eval()
    if inplace:
        pruned = model.to(device).eval()
    else:
        pruned = copy.deepcopy(model).to(device).eval()
    spectra = None
    if schedule == "energy":
        consumers = {c.name: reference.get_submodule(c.name) for c in plan}
        n_spectra = min(ENERGY_IMAGES, n_total - n_held)
        try:
            spectra = channel_spectra(
                reference, images[:n_spectra], consumers, batch_size=batch_size, device=device
            )  # fmt: skip
        except RuntimeError as exc:  # the same words as plan_widths' own check
            raise ValueError(
                f"the model does not accept inputs of shape {input_shape}: "
                f"{str(exc).splitlines()[0]}"
            ) from exc
    widths, _ = plan_widths(
        reference, input_shape, speedup=speedup, schedule=schedule,
        channel_sampler=channel_sampler, spectra=spectra, planner="names",
    )  # fmt: skip
    macs_before = count_macs(reference, input_shape)
    params_before = count_params(reference)
    bn_scale = {}
    if method == "bn_scale":  # read before the reference's BNs are folded away
        for c in plan:
            gamma = reference.get_submodule(c.producer_bn).weight.detach()
            bn_scale[c.name] = gamma.abs().cpu().double().numpy()
    _fold_reference(reference, plan)

    sweep = _Sweep(
        reference=reference, pruned=pruned, widths=widths, n_fit=n_total - n_held,
        method=method, refit=refit, ridge=ridge, normalize=normalize, alternate=alternate,
        correct_unpruned=correct_unpruned, residual_correction=residual_correction,
        positions_per_image=positions_per_image, batch_size=batch_size,
        stats_dtype=stats_dtype, device=device, bn_scale=bn_scale, seed=seed,
        max_iter=max_iter, tol=tol, cache_bytes=cache_bytes,
        # A chain's caches fit cache_bytes on the device; a ResNet's, which no budget
        # bounds, stay where the calibration images came from.
        store=device if plan[0].role == "chain" else calib_device,
    )  # fmt: skip
    # no_grad, not inference_mode: parameters created by the surgery must stay ordinary
    # tensors, so the pruned model can be fine-tuned afterwards.
    with torch.no_grad():
        maps = _Maps.split(images, batch_size)
        if plan[0].role == "chain":
            sweep.run_chain(plan, maps, progress)
        else:
            sweep.run_residual(plan, maps, progress)

    macs_after = count_macs(pruned, input_shape)
    report = PruneReport(
        model=type(model).__name__,
        method=method,
        schedule="explicit" if explicit else schedule,
        speedup_target=None if speedup is None else float(speedup),
        speedup=macs_before / macs_after,
        macs_before=int(macs_before),
        macs_after=int(macs_after),
        params_before=int(params_before),
        params_after=int(count_params(pruned)),
        n_images=int(n_total - n_held),
        n_heldout=int(n_held),
        wall_time_s=time.perf_counter() - start,
        device=str(device),
        layers=sweep.reports,
        options=dict(
            positions_per_image=positions_per_image, ridge=ridge, refit=refit,
            normalize=normalize, alternate=alternate, correct_unpruned=correct_unpruned,
            residual_correction=residual_correction, channel_sampler=channel_sampler,
            seed=seed, widths=widths, max_cache_mb=max_cache_mb, planner="names",
            **({"schedule_reason": auto_reason} if auto_reason else {}),
        ),
    )  # fmt: skip
    return _recover(pruned.eval(), report, reference, images, n_total - n_held, recovery,
                    batch_size=batch_size, device=device, seed=seed, progress=progress)  # fmt: skip


def _names_plan(model: nn.Module, channel_sampler: bool, planner: str) -> Optional[list]:
    """The name-based plan, or None where the names do not fit and the graph planner may
    take over (``planner="auto"``)."""
    try:
        return _plan(model, channel_sampler)
    except UnsupportedLayerError:
        if planner == "names":
            raise
        return None


def _names_confirmed(model: nn.Module, plan: list[_Consumer], input_shape) -> bool:
    """Whether the traced graph confirms the name-based plan: each consumer reads exactly
    its producer's channels, and the BatchNorms named after them really follow them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PlanWarning)
            graph = trace_plan(model, input_shape)
    except (UnsupportedLayerError, ValueError):
        return True  # nothing to check against: the names are all there is
    consumers = {c.name: c for c in graph.consumers}
    for c in plan:
        found = consumers.get(c.name)
        if found is None or found.bn != c.bn:
            return False
        if c.producer is None:
            continue
        group = graph.groups.get(c.producer)
        if group is None or found.layout != ((c.producer, group.size),):
            return False
        if c.producer_bn and c.producer_bn not in {m for m, _ in group.carriers}:
            return False
    return True


def _prune_graph(
    model: nn.Module,
    images: torch.Tensor,
    n_fit: int,
    options: SweepOptions,
    *,
    speedup: Optional[float],
    schedule,
    batch_size: int,
    progress: bool,
    inplace: bool,
    start: float,
    channel_multiple: int = 1,
    recovery: Optional[dict] = None,
    image_ids: Optional[torch.Tensor] = None,
    shard: Optional[Shard] = None,
    counts: Optional[tuple[int, int]] = None,
    auto_reason: Optional[str] = None,
    channel_sampler: bool = False,
    max_cache_mb: Optional[float] = None,
    cache_bytes: Optional[int] = None,
) -> tuple[nn.Module, PruneReport]:
    """:func:`prune_model` through the plan traced from the graph (any network).

    ``images`` are this rank's under a ``shard`` (``n_fit`` of them fit images, with
    global ``image_ids``); ``counts`` the global numbers of fit and held-out images;
    ``cache_bytes`` the sweep's cache budget (None: none), from ``max_cache_mb`` (which
    the report records)."""
    n_fit_all, n_held_all = counts or (n_fit, images.shape[0] - n_fit)
    if image_ids is None:
        image_ids = torch.arange(images.shape[0])
    group = shard.group if shard is not None else None
    device = options.device
    input_shape = tuple(images.shape[1:])
    pruned = (model if inplace else copy.deepcopy(model)).to(device).eval()
    plan = trace_plan(pruned, input_shape)
    if channel_sampler:
        plan = with_channel_samplers(plan)
    reference = symbolic_trace(copy.deepcopy(model).to(device).eval())
    if schedule == "auto":
        schedule, auto_reason = resolve_auto_schedule(plan)
        logger.info("schedule='auto': %s, for %s", schedule, auto_reason)
    explicit = isinstance(schedule, Mapping)
    tic = time.perf_counter()
    if explicit:
        widths = explicit_widths(plan, schedule)
    elif schedule in ("uniform", "paper"):
        multipliers = paper_multipliers(plan) if schedule == "paper" else None
        widths = uniform_widths(
            plan, speedup, multiple=channel_multiple, multipliers=multipliers
        )
    else:
        if schedule == "sensitivity":
            wanted = set(_spread(n_fit_all, SENSITIVITY_IMAGES).tolist())  # global ids
        else:  # the first fit images, as the name-based planner takes them
            wanted = set(range(min(n_fit_all, ENERGY_IMAGES)))
        local = [i for i, gid in enumerate(image_ids[:n_fit].tolist()) if gid in wanted]
        measure = images[torch.tensor(local, dtype=torch.int64, device=images.device)]
        cost = _graph_costs(schedule, plan, measure, batch_size, device, progress, group)
        widths = widths_for_cost(plan, speedup, cost, multiple=channel_multiple)
    schedule_s = time.perf_counter() - tic
    # The BatchNorm criterion reads the original scales: a refit turns a BN into the
    # identity before the group it scales is selected.
    bn_scale = bn_scales(plan) if options.method == "bn_scale" else None
    macs_before = plan.macs()
    params_before = count_params(pruned)
    # no_grad, not inference_mode: parameters created by the surgery must stay ordinary
    # tensors, so the pruned model can be fine-tuned afterwards.
    with torch.no_grad():
        reports, kept, timing = sweep_graph(
            reference, plan, widths, images, n_fit, options, batch_size=batch_size,
            progress=progress, image_ids=image_ids, shard=shard, bn_scale=bn_scale,
            cache_bytes=cache_bytes,
        )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlanWarning)  # said once, for the original
        macs_after = trace_plan(pruned, input_shape).macs()  # counted anew on the result
    report = PruneReport(
        model=type(model).__name__,
        method=options.method,
        schedule="explicit" if explicit else str(schedule),
        speedup_target=None if speedup is None else float(speedup),
        speedup=macs_before / macs_after,
        macs_before=int(macs_before),
        macs_after=int(macs_after),
        params_before=int(params_before),
        params_after=int(count_params(pruned)),
        n_images=int(n_fit_all),
        n_heldout=int(n_held_all),
        wall_time_s=time.perf_counter() - start,
        device=str(device),
        layers=reports,
        options=dict(
            positions_per_image=options.positions_per_image, ridge=options.ridge,
            refit=options.refit, normalize=options.normalize, alternate=options.alternate,
            correct_unpruned=options.correct_unpruned,
            residual_correction=options.residual_correction, seed=options.seed,
            widths=widths, max_cache_mb=max_cache_mb, planner="graph",
            channel_multiple=channel_multiple, channel_sampler=channel_sampler,
            kept={name: idx.tolist() for name, idx in kept.items()},
            world_size=shard.world_size if shard is not None else 1,
            time_split_s=dict(timing, schedule_s=schedule_s),
            **({"schedule_reason": auto_reason} if auto_reason else {}),
        ),
    )  # fmt: skip
    return _recover(pruned.eval(), report, reference, images, n_fit, recovery or {},
                    batch_size=batch_size, device=device, seed=options.seed,
                    progress=progress)  # fmt: skip


def _recover(
    pruned: nn.Module, report: PruneReport, teacher: nn.Module, images: torch.Tensor,
    n_fit: int, recovery: dict, *, batch_size: int, device, seed: int, progress: bool,
) -> tuple[nn.Module, PruneReport]:
    """The optional distillation after a prune (``recovery["recover"]``), in place on the
    pruned network; the teacher is the original network (BatchNorms folded: the same
    function in eval mode)."""
    if recovery.get("recover") is None:
        return pruned, report
    start = time.perf_counter()
    held = images[n_fit:] if images.shape[0] > n_fit else None
    pruned, records = distill(
        pruned, teacher, images[:n_fit], epochs=recovery["epochs"], lr=recovery["lr"],
        batch_size=min(batch_size, 64), heldout=held, device=device, seed=seed,
        progress=progress, inplace=True,
    )  # fmt: skip
    options = dict(report.options, recover=recovery["recover"], recover_epochs=recovery["epochs"],
                   recover_lr=recovery["lr"])  # fmt: skip
    return pruned, dataclasses.replace(
        report, recovery=[r.to_dict() for r in records], options=options,
        wall_time_s=report.wall_time_s + time.perf_counter() - start,
    )  # fmt: skip


def _spread(n: int, k: int) -> torch.Tensor:
    """``min(n, k)`` indices spread evenly over ``range(n)`` (calibration images may come
    sorted by class: a prefix would be a few classes)."""
    return torch.from_numpy(np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(np.int64)))


def _graph_costs(
    schedule: str, plan, images: torch.Tensor, batch_size: int, device, progress: bool,
    process_group=None,
) -> dict[str, np.ndarray]:
    """Each prunable group's predicted cost of keeping ``k`` channels, ``k = 0..size``:
    ``-log`` of the principal-component energy kept (``energy``, from its first
    consumer's input) or the measured output degradation (``sensitivity``)."""
    groups = {name: g for name, g in plan.groups.items() if g.prunable}
    if schedule == "sensitivity":
        curves = measure_sensitivity(
            plan, images, batch_size=batch_size, device=device, progress=progress,
            process_group=process_group,
        )  # fmt: skip
        return {name: curve.cost() for name, curve in curves.items()}
    consumers = {c.name: c for c in plan.consumers}
    first = {name: consumers[g.consumers[0]] for name, g in groups.items() if g.consumers}
    modules = {c.name: plan.graph.get_submodule(c.name) for c in first.values()}
    moments = input_moments(
        plan.graph, images, modules, batch_size=batch_size, device=device,
        process_group=process_group,
    )  # fmt: skip
    cost = {}
    for name, group in groups.items():
        if name not in first:  # read by no consumer: free to narrow
            cost[name] = np.zeros(group.size + 1)
            continue
        at = group_positions(first[name].layout, name)
        cov = moments[first[name].name][1][at][:, at]
        spectrum = covariance_spectrum(cov)
        with np.errstate(divide="ignore"):
            cost[name] = -np.log(np.concatenate([[0.0], energy_fractions(spectrum)]))
    return cost


def _advance(
    module: nn.Module | list[nn.Module], maps: _Maps, device: torch.device, store
) -> _Maps:
    """Run ``module`` (or a list of modules in turn) over every cached activation; the
    outputs are kept on ``store``."""
    modules = module if isinstance(module, list) else [module]
    return _Maps([_run(modules, x).to(store) for _, x in maps.batches(device)])


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted activation is recorded."""


def _block_inputs(model: nn.Module, block: nn.Module, images: _Maps, device, store) -> _Maps:
    """The input of ``block`` for every image: the model's own forward, stopped there."""
    chunks: list[torch.Tensor] = []

    def hook(module, args):
        chunks.append(args[0].detach().clone().to(store))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook)
    try:
        for _, x in images.batches(device):
            try:
                model(channels_last(x))
            except _StopForward:
                pass
    finally:
        handle.remove()
    return _Maps(chunks)


class _Sweep:
    """State of one pruning sweep: the two networks, the options, the per-layer reports.

    ``fit_layer`` is the per-layer step shared by both architectures: gather statistics
    from chunks of (input map, target map) pairs, select and refit through
    :func:`prune_layer_from_stats`, then cut the producer and install the new weights.
    """

    def __init__(self, **options: Any) -> None:
        self.__dict__.update(options)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.reports: list[LayerReport] = []
        self.step = 0

    # ------------------------------------------------------------------ per layer
    def keep_of(self, consumer: _Consumer) -> tuple[int, int]:
        c = self.pruned.get_submodule(consumer.name).in_channels
        return self.widths[consumer.name], c

    def skip(self, consumer: _Consumer, diverged: bool) -> bool:
        keep, c = self.keep_of(consumer)
        # Nothing to select; a whole layer is still refit (when its input has drifted) so
        # it absorbs the error accumulated before it.
        return keep == c and (not diverged or not self.correct_unpruned or not self.refit)

    def new_stats(self, consumer: _Consumer) -> tuple[LayerStats, HeldOut]:
        conv = self.pruned.get_submodule(consumer.name)
        fit = LayerStats(
            conv.in_channels, conv.out_channels, conv.kernel_size, device=self.device,
            compute_dtype=self.stats_dtype,
        )  # fmt: skip
        return fit, HeldOut()

    def accumulate(
        self,
        consumer: _Consumer,
        stats: tuple[LayerStats, HeldOut],
        scores: ActivationScores,
        x: torch.Tensor,
        y: torch.Tensor,
        lo: int,
    ) -> None:
        """Sample one chunk: ``x`` the consumer's input maps, ``y`` its target output maps,
        for images ``lo .. lo + len(x)`` (fit images first, then held-out ones)."""
        conv = self.pruned.get_submodule(consumer.name)
        n_fit_here = int(min(max(self.n_fit - lo, 0), x.shape[0]))  # fit images here
        fit, held = stats
        if n_fit_here:
            scores.update(x[:n_fit_here])
        accumulate_samples(
            conv, [fit], held, x, y, n_fit_here, self.positions_per_image, self.generator
        )

    def fit_layer(
        self,
        consumer: _Consumer,
        stats: tuple[LayerStats, HeldOut],
        scores: ActivationScores,
        start: float,
    ) -> torch.Tensor:
        """Select, refit and cut one layer; return the kept channel indices."""
        keep, c = self.keep_of(consumer)
        conv = self.pruned.get_submodule(consumer.name)
        bn = self.pruned.get_submodule(consumer.bn) if consumer.bn else None
        weight, bias = folded_params(conv, bn)
        options: dict[str, Any] = {}
        selector = self.method
        if keep == c:
            selector = "first_k"  # keep everything: a pure least-squares correction
        elif self.method in ACTIVATION_METHODS:
            selector = "by_score"
            options["scores"] = scores.scores(self.bn_scale.get(consumer.name))
        fit, held = stats
        result = prune_layer_from_stats(
            fit, weight, bias, keep=keep, method=selector, refit=self.refit, ridge=self.ridge,
            normalize=self.normalize, alternate=self.alternate and selector == "lasso",
            random_state=self.seed + self.step, max_iter=self.max_iter, tol=self.tol, **options,
        )  # fmt: skip
        self.step += 1
        held_error = held.rel_error(result.kept, result.weight, result.bias)
        unknowns = keep * fit.block_size + 1
        if self.refit and fit.n_samples < 2 * unknowns:
            logger.warning(
                "%s: %d samples for %d unknowns per output; the refit may overfit (use more "
                "images or positions per image, or a larger ridge).",
                consumer.name, fit.n_samples, unknowns,
            )  # fmt: skip

        # Surgery: drop the producer's filters (and BN channels), or for a stream consumer,
        # which has no producer, put a channel sampler before the conv; then install the
        # refit weights in folded form: this layer's BN becomes the identity plus the refit
        # bias (so a conv without bias, as in ResNets, keeps its architecture).
        kept = torch.from_numpy(result.kept)
        if keep < c and consumer.producer is None:
            conv = insert_channel_sampler(self.pruned, consumer.name, kept)
        elif keep < c:
            prune_conv_out_channels(self.pruned.get_submodule(consumer.producer), kept)
            if consumer.producer_bn:
                prune_batchnorm(self.pruned.get_submodule(consumer.producer_bn), kept)
        if bn is not None:
            set_batchnorm_identity(bn)
        if bn is not None and bn.affine:
            set_conv_params(conv, result.weight)
            if conv.bias is not None:
                conv.bias.zero_()
            bn.bias.copy_(torch.as_tensor(result.bias, dtype=bn.bias.dtype))
        else:  # no BN, or one without parameters: the conv has a bias (_check_consumers)
            set_conv_params(conv, result.weight, result.bias)
        self.reports.append(
            LayerReport(
                name=consumer.name,
                producer=consumer.producer,
                channels_before=c,
                channels_after=keep,
                rel_error=float(result.rel_error),
                rel_error_heldout=None if held_error is None else float(held_error),
                rel_error_before_refit=float(result.rel_error_before_refit),
                n_samples=fit.n_samples,
                time_s=time.perf_counter() - start,
                alpha=result.alpha,
            )
        )
        logger.info(
            "%s: %d -> %d channels, rel. error %.4f (held-out %s)",
            consumer.name, c, keep, result.rel_error,
            "-" if held_error is None else f"{held_error:.4f}",
        )  # fmt: skip
        return kept

    # ------------------------------------------------------------------ VGG-style chains
    def run_chain(self, plan: list[_Consumer], images: _Maps, progress: bool) -> None:
        """Layer by layer through ``features``.

        Both caches (reference and pruned network) hold every image's maps at one index of
        ``features``, the checkpoint: the current consumer's input when those maps fit
        ``cache_bytes``, else the last index that did, from which each pass recomputes
        the layers up to the consumer."""
        ref_features, features = self.reference.features, self.pruned.features
        with torch.no_grad():
            map_bytes = _chain_map_bytes(ref_features, images.chunks[0][:1].to(self.device))
        n_images = sum(chunk.shape[0] for chunk in images.chunks)

        def fits(start: int, end: int) -> bool:
            """Whether both caches at ``end`` fit beside those at ``start`` (which are
            alive while the new ones are built; index 0 holds the caller's images)."""
            held = map_bytes[start] if start > 0 else 0
            return self.cache_bytes is None or 2 * n_images * (held + map_bytes[end]) <= (
                self.cache_bytes
            )

        cache_ref = cache_pruned = images  # the same maps until the first layer is pruned
        diverged = False
        checkpoint = 0  # the index in features whose input the caches hold
        bar = tqdm(plan, desc="pruning", disable=not progress)
        for step, consumer in enumerate(bar):
            bar.set_postfix_str(consumer.name)
            index = consumer.index
            if self.skip(consumer, diverged):
                continue
            if checkpoint < index and fits(checkpoint, index):  # first layer, or after a skip
                # (No other name may hold the old caches: each is freed when replaced.)
                segment_ref = list(ref_features[checkpoint:index])
                cache_ref = _advance(segment_ref, cache_ref, self.device, self.store)
                if diverged:
                    segment = _fused(list(features[checkpoint:index]))
                    cache_pruned = _advance(segment, cache_pruned, self.device, self.store)
                else:
                    cache_pruned = cache_ref
                checkpoint = index
            elif checkpoint < index:
                logger.info(
                    "%s: its input maps exceed the cache budget; recomputing features[%d:%d] "
                    "in each pass.", consumer.name, checkpoint, index,
                )  # fmt: skip
            start = time.perf_counter()
            # The reference network runs on to the next consumer in the same pass that
            # yields this layer's target (its conv output, BN folded in), when the caches
            # move there: one forward pass per sweep. Otherwise it stops at the target.
            nxt = plan[step + 1].index if step + 1 < len(plan) else None
            move = nxt is not None and fits(checkpoint, nxt)
            target_end = (int(consumer.bn.split(".")[1]) if consumer.bn else index) + 1
            prefix_ref = list(ref_features[checkpoint:index])
            prefix = _fused(list(features[checkpoint:index]))
            to_target = list(ref_features[index:target_end])
            after_target = list(ref_features[target_end:nxt]) if move else []
            stats = self.new_stats(consumer)
            scores = ActivationScores(self.method, features[index].in_channels)
            next_ref = []
            pairs = zip(cache_ref.batches(self.device), cache_pruned.batches(self.device))
            for (lo, x_ref), (_, x) in pairs:
                x_ref = _run(prefix_ref, x_ref)
                x = _run(prefix, x) if diverged else x_ref
                y = _run(to_target, x_ref)
                # accumulate copies what it keeps of y, so the in-place ReLU after the
                # target may then overwrite it (no copy of the whole map, as a hook needs).
                self.accumulate(consumer, stats, scores, x, y, lo)
                if move:
                    next_ref.append(_run(after_target, y).to(self.store))
                del y
            kept = self.fit_layer(consumer, stats, scores, start)
            if checkpoint == index:  # the cache holds the producer's output, cut just now
                cache_pruned = cache_pruned.keep_channels(kept)
            diverged = True
            if move:
                segment = _fused(list(features[checkpoint:nxt]))
                cache_pruned = _advance(segment, cache_pruned, self.device, self.store)
                cache_ref, checkpoint = _Maps(next_ref), nxt

    # ------------------------------------------------------------------ ResNets
    def run_residual(self, plan: list[_Consumer], images: _Maps, progress: bool) -> None:
        """Block by block, both caches at the current block's input (the residual stream).

        For the last conv of a branch with ``residual_correction``, the target is
        ``Y2 + Y1 - Y1'`` (original branch output plus original shortcut minus the pruned
        network's shortcut), so the block's sum tracks the original one. A stream consumer
        (conv1 with a channel sampler) reads the pruned network's block input (what its
        sampler, if it has one already, selects from it); its target is the original
        ``bn1`` output, uncorrected.
        """
        blocks: dict[str, list[_Consumer]] = {}
        for consumer in plan:
            blocks.setdefault(consumer.block, []).append(consumer)
        first = next(iter(blocks))
        cache_ref = _block_inputs(
            self.reference, self.reference.get_submodule(first), images, self.device, self.store
        )
        cache_pruned = cache_ref  # the stem is never pruned
        diverged = False
        bar = tqdm(blocks.items(), desc="pruning", disable=not progress)
        for path, consumers in bar:
            bar.set_postfix_str(path)
            ref_block = self.reference.get_submodule(path)
            block = self.pruned.get_submodule(path)
            ref_shortcut, shortcut = _shortcut(ref_block), _shortcut(block)
            next_ref = None
            for consumer in consumers:
                if self.skip(consumer, diverged):
                    continue
                start = time.perf_counter()
                correct = self.residual_correction and consumer.last_in_block
                conv = block.get_submodule(consumer.name[len(path) + 1 :])
                ref_target = self.reference.get_submodule(consumer.bn)
                stats = self.new_stats(consumer)
                scores = ActivationScores(self.method, conv.in_channels)
                outputs = [] if next_ref is None else None  # the block's outputs, once
                pairs = zip(cache_ref.batches(self.device), cache_pruned.batches(self.device))
                for (lo, x_ref), (_, x_pruned) in pairs:
                    ref_out = {"y": ref_target}
                    if correct and ref_shortcut is not None:
                        ref_out["s"] = ref_shortcut
                    with record_activations(outputs=ref_out) as rec_ref:
                        out = ref_block(channels_last(x_ref))
                    if outputs is not None:
                        outputs.append(out.to(self.store))
                    y = rec_ref["y"]
                    if consumer.role == "stream":  # conv1 reads the block input itself
                        x = conv.sample(x_pruned) if isinstance(conv, SampledConv2d) else x_pruned
                        self.accumulate(consumer, stats, scores, x, y, lo)
                        continue
                    pr_out = {"s": shortcut} if correct and shortcut is not None else {}
                    with record_activations(inputs={"x": conv}, outputs=pr_out) as rec:
                        block(channels_last(x_pruned))
                    if correct:
                        y1 = rec_ref["s"] if ref_shortcut is not None else x_ref
                        y1_pruned = rec["s"] if shortcut is not None else x_pruned
                        y = y + (y1 - y1_pruned)
                    self.accumulate(consumer, stats, scores, rec["x"], y, lo)
                if outputs is not None:
                    next_ref = _Maps(outputs)
                self.fit_layer(consumer, stats, scores, start)
                diverged = True
            if next_ref is None:
                next_ref = _advance(ref_block, cache_ref, self.device, self.store)
            if diverged:
                cache_pruned = _advance(block, cache_pruned, self.device, self.store)
            else:
                cache_pruned = next_ref
            cache_ref = next_ref
