"""Whole-model channel pruning: validate, plan, sweep, report (the driver).

:func:`prune_model` traces the network (:func:`chanprune.graph.trace_plan`: its channel
groups, their producers and consumers), turns the target speed-up into a width per group
(the schedule: :mod:`chanprune.graph`, :mod:`chanprune.sensitivity`), then prunes one
consumer at a time in graph order (:func:`chanprune.sweep.sweep_graph`):

1. **Sample**: the input patches ``X`` of a consumer conv in the network being pruned, and
   its output ``Y`` in the *original* network (pre-activation, BatchNorm folded), at
   seeded random positions; accumulated as float64 statistics (:mod:`chanprune.stats`).
2. **Select** the channels of each group it reads (:mod:`chanprune.selection`, summed over
   the group's consumers) and **refit** its weights by least squares (:mod:`chanprune.refit`).
3. **Remove** the dropped channels for real: the producers' filters, the BatchNorms and
   depthwise convs they pass through, every consumer's input channels
   (:mod:`chanprune.surgery`). A residual stream keeps its width; with
   ``channel_sampler=True`` the convs that read it get a channel sampler, so each alone
   reads fewer stream channels (:class:`chanprune.surgery.SampledConv2d`).

Because ``X`` comes from the pruned network and ``Y`` from the original one, each layer
corrects the error accumulated before it. The values of both networks at the current
consumer are kept for all calibration images and advanced consumer by consumer, so a whole
sweep costs about one forward pass of each network. Where they would not fit the cache
budget (``max_cache_mb``), the caches stay at the last point that fitted and each pass
recomputes the layers after it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
import warnings
from collections.abc import Mapping
from typing import Optional, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ._validation import check_choice, check_int_in_range, check_real_in_range
from .distributed import Shard, all_reduce_sum, check_agreement, model_fingerprint, shard_rows
from .flops import count_params
from .graph import (
    Plan,
    PlanWarning,
    explicit_widths,
    keep_whole,
    paper_multipliers,
    symbolic_trace,
    trace_plan,
    uniform_widths,
    widths_for_cost,
    with_channel_samplers,
)
from .recover import distill
from .report import PruneReport
from .sampling import (
    covariance_spectrum,
    input_moments,
)
from .schedule import (
    SCHEDULES,
    energy_fractions,
)
from .selection import SELECTORS
from .sensitivity import group_positions, measure_sensitivity
from .sweep import (
    ACTIVATION_METHODS,
    ACTIVATION_STATISTICS,
    SweepOptions,
    bn_scales,
    sweep_graph,
    unscaled_linear_groups,
)

__all__ = [
    "prune_model",
    "MODEL_METHODS",
    "load_calibration_images",
    "plan_widths",
    "prunable_groups",
]

logger = logging.getLogger(__name__)

#: ``planner=`` of :func:`prune_model`: the channel groups of any network, derived from
#: its traced graph (``auto`` and ``graph`` are the same; the name-based planner is gone).
PLANNERS = ("auto", "graph")
#: Every ``method=`` accepted by :func:`prune_model`.
MODEL_METHODS = tuple(m for m in SELECTORS if m != "by_score") + ACTIVATION_METHODS


#: Why ``planner="names"`` is refused, and what replaces it.
NAMES_PLANNER_GONE = (
    "planner='names' is gone: every network is planned from its traced graph. An explicit "
    "width keyed by a layer's input is written '<layer>:in' (e.g. {'features.3:in': 32}); "
    "see chanprune.prunable_groups for the keys."
)


def _check_planner(planner: str) -> str:
    if planner == "names":
        raise ValueError(NAMES_PLANNER_GONE)
    return check_choice(planner, "planner", PLANNERS)


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

#: Schedules that measure calibration data (not offered by :func:`plan_widths`).
_DATA_SCHEDULES = ("energy", "sensitivity")


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


def network_kind(plan: Plan) -> str:
    """The :data:`AUTO_SCHEDULES` key of a traced network: ``"chain"`` (VGG-style: no
    residual addition, the paper's schedule defined), ``"residual"`` (Basic or Bottleneck
    branches) or ``"graph"`` (anything else)."""
    try:
        paper_multipliers(plan)
    except ValueError:
        return "graph"
    return "residual" if any(c.addend for c in plan.consumers) else "chain"


def resolve_auto_schedule(plan: Plan) -> tuple[str, str]:
    """``(schedule, reason)`` for ``schedule="auto"``, by :func:`network_kind`."""
    return AUTO_SCHEDULES[network_kind(plan)]


def prunable_groups(
    model: nn.Module, input_shape: tuple[int, ...], *, channel_sampler: bool = False
) -> dict[str, int]:
    """The channel groups :func:`prune_model` can prune, with their sizes, in graph order:
    the keys of an explicit ``schedule``.

    A group is named after its first producing conv (``"features.0"``, whose filters
    ``features.3`` reads); with ``channel_sampler=True``, the stream input of a residual
    branch's first conv is a group ``"layer1.0.conv1:in"``. An explicit schedule may also
    name the input of any conv that reads one group, ``"<conv>:in"``
    (:func:`chanprune.graph.group_of_key`). :meth:`chanprune.graph.Plan.describe` says
    why the other groups are kept whole.
    """
    return _trace(model, input_shape, channel_sampler).prunable


def _trace(model: nn.Module, input_shape, channel_sampler: bool) -> Plan:
    """The traced plan, with the channel samplers' input groups when asked for."""
    plan = trace_plan(model, tuple(input_shape))
    return with_channel_samplers(plan) if channel_sampler else plan


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
    channel_multiple: int = 1,
) -> tuple[dict[str, int], float]:
    """Per-group widths for a target speed-up, without data and without pruning.

    Parameters
    ----------
    model : nn.Module
        Any network :func:`prune_model` takes.
    input_shape : tuple of int
        One input without the batch dimension, e.g. ``(3, 32, 32)``.
    speedup, schedule, channel_sampler, channel_multiple
        As in :func:`prune_model`; ``energy`` and ``sensitivity``, which measure
        calibration data, are refused (use :func:`prune_model`).

    Returns
    -------
    widths : dict of group -> int
        Channels kept by each prunable group (:func:`prunable_groups` keys).
    speedup : float
        The MAC speed-up those widths achieve (every conv and linear counted).

    Raises
    ------
    UnsupportedLayerError, ValueError
        A model that cannot be traced, an input shape the model does not accept, an
        unreachable or invalid target.
    """
    explicit = _check_target(speedup, schedule)
    channel_multiple = check_int_in_range(channel_multiple, "channel_multiple", 1)
    plan = _trace(model, input_shape, channel_sampler)
    if schedule == "auto":
        schedule = resolve_auto_schedule(plan)[0]
    if isinstance(schedule, str) and schedule in _DATA_SCHEDULES:
        raise ValueError(
            f"schedule={schedule!r} allocates the widths from measurements on calibration "
            "data; use prune_model, which makes them."
        )
    if explicit:
        widths = explicit_widths(plan, schedule)
    else:
        multipliers = paper_multipliers(plan) if schedule == "paper" else None
        widths = uniform_widths(plan, speedup, multiple=channel_multiple, multipliers=multipliers)
    return widths, plan.macs() / plan.macs(widths)


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
        Any CNN that :mod:`torch.fx` can trace, as its author wrote it (a VGG, a ResNet, a
        MobileNet, a DenseNet...): its channel groups come from the traced graph
        (:func:`chanprune.graph.trace_plan`; :meth:`~chanprune.graph.Plan.describe` lists
        them and why some are kept whole: residual streams, the network's input and
        output, the features a linear layer reads, ops the planner does not know). Its
        parameters are float32 or float64 (the calibration images are converted to that
        dtype). Not modified unless ``inplace=True``.
    calib : Dataset or tensor of shape (n_images, C, H, W)
        Preprocessed calibration images (a dataset may yield ``(image, label)``).
    speedup : float, optional
        Target MAC speed-up (> 1; every conv and linear counted), turned into per-group
        widths by ``schedule``. The achieved value is reported (within 2% of the target).
    schedule : {"auto", "uniform", "paper", "energy", "sensitivity"} or dict of group -> keep
        ``auto`` (default): the schedule measured best for the kind of network
        (:data:`AUTO_SCHEDULES`, :func:`network_kind`: ``energy`` for a VGG-style chain,
        ``paper`` for a ResNet of Basic or Bottleneck blocks, ``sensitivity`` for any
        other network); the report says which and why (``options["schedule_reason"]``).
        ``uniform``: one kept ratio everywhere; ``paper``: He et al.'s schedules (VGG-16:
        conv1_x-conv3_x : conv4_x kept ratios 1 : 1.5, conv5_x untouched; ResNet: blocks
        of the last stage and blocks that change the map size keep 7/3 the ratio of the
        others, Bottleneck 2b : 2c inputs 4 : 3; the stages, blocks and roles come from
        the traced shapes and residual additions,
        :func:`chanprune.graph.paper_multipliers`); ``energy``: from the data, the widths
        that keep the most principal-component energy of each group's channels (at its
        first consumer's input) per MAC saved (the spectra come from one forward pass of
        the original network over the first ``ENERGY_IMAGES`` = 500 fit images, so groups
        with redundant channels are pruned hardest); ``sensitivity``: the output
        degradation of the network as each channel group alone narrows is measured on
        ``SENSITIVITY_IMAGES`` = 64 fit images (:mod:`chanprune.sensitivity`), and the
        widths that meet the MAC target with the least predicted degradation chosen
        (:func:`chanprune.graph.widths_for_cost`); or explicit widths
        ``{"features.0": 32, "features.7:in": 0.5, ...}`` (int counts or float ratios),
        keyed by group (its first producing conv) or by the input of a conv that reads one
        group (``"<conv>:in"``), in which case ``speedup`` must be None
        (:func:`prunable_groups` lists the groups). With ``channel_sampler``, the paper
        schedule gives the stream input of a Bottleneck's conv1 (2a) 2/3.5 of the block's
        base ratio (2a : 2b : 2c = 2 : 4 : 3), that of a BasicBlock's conv1 the base
        ratio; ``uniform`` treats it like every other group.
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
        A conv whose output is added to another tensor ``S`` (the last conv of a residual
        branch) reconstructs ``Y + S - S'`` (its original output plus the original ``S``
        minus the pruned network's) instead of ``Y``, so each sum tracks the original one
        (He et al., Sec. 4.2).
    channel_sampler : bool, default=False
        Residual networks: also prune the input of every conv that reads a residual stream
        (a block's first conv; not a projection shortcut) through a channel sampler (He et
        al., Sec. 4.2): the conv becomes a :class:`chanprune.surgery.SampledConv2d` that
        reads only the kept stream channels, while the stream itself and the shortcut keep
        every channel. Its input is the pruned network's stream, its target its original
        output. Each such input is a channel group ``"<conv>:in"``
        (:func:`chanprune.graph.with_channel_samplers`), which every schedule and method
        prunes like any other. Refused for networks without a residual stream.
    planner : {"auto", "graph"}, default="auto"
        Kept for existing calls: both plan from the traced graph. The name-based planner
        (``"names"``) is gone; its widths keyed by a layer are written ``"<layer>:in"``.
    channel_multiple : int, default=1
        The kept widths of ``speedup`` are multiples of this in every group whose size is
        one (8: the channel-blocked kernels of ONNX Runtime and oneDNN stay usable, see
        RESULTS.md's latency tables).
    batch_size : int, default=100
        Images per forward chunk (memory).
    max_cache_mb : float, optional
        Memory, in MB, for the activations cached between layers (both networks' values
        at one point, for every calibration image; they live on ``device``). Where the
        values alive at a layer's input would not fit, the caches stay at the last point
        that did and each pass recomputes the layers from there: less memory for more
        compute, with the same result (0: every pass starts from the images). None: 3/4
        of the memory free on a CUDA device, half the RAM available on a CPU. The values'
        sizes are estimated from the traced shapes (the calibration images themselves are
        not counted).
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
        calibration set raise ``ValueError`` before any work. Not
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
    _check_target(speedup, schedule)
    if recover is not None:
        check_choice(recover, "recover", RECOVERIES)
    shard = Shard.of(process_group)
    _check_planner(planner)
    if shard is not None:
        if recover is not None:
            raise ValueError("recover='distill' runs in one process; distil after the prune.")
        if method in ACTIVATION_STATISTICS:
            raise ValueError(
                f"method={method!r} ranks channels by activation statistics that are not "
                "shared across ranks; use it in one process, or another method."
            )
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
    if not isinstance(channel_sampler, bool):
        raise TypeError(f"channel_sampler must be a bool; got {type(channel_sampler).__name__}.")
    dtype = _model_dtype(model)
    if stats_dtype is None:
        cpu32 = device.type == "cpu" and dtype == torch.float32
        stats_dtype = torch.float32 if cpu32 else torch.float64
    channel_multiple = check_int_in_range(channel_multiple, "channel_multiple", 1)
    if method == "bn_scale" and channel_sampler:
        raise ValueError(
            "method='bn_scale' ranks channels by the |gamma| of the BatchNorm that produces "
            "them; the residual stream that a channel sampler selects from is a sum of branch "
            "and shortcut, with no such BatchNorm: use another method or channel_sampler=False."
        )

    options = SweepOptions(
        method=method, refit=refit, ridge=ridge, normalize=normalize, alternate=alternate,
        correct_unpruned=correct_unpruned, residual_correction=residual_correction,
        positions_per_image=positions_per_image, stats_dtype=stats_dtype, device=device,
        seed=seed, max_iter=max_iter, tol=tol,
    )  # fmt: skip
    settings = dict(
        speedup=speedup, schedule=schedule, batch_size=batch_size, progress=progress,
        inplace=inplace, start=start, channel_multiple=channel_multiple,
        channel_sampler=channel_sampler, max_cache_mb=max_cache_mb,
    )  # fmt: skip
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
                channel_sampler=channel_sampler,
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
            model, images, len(fit_rows), options, image_ids=image_ids, shard=shard,
            counts=(len(fit_idx), len(held_idx)), **settings,
        )  # fmt: skip

    # A float64 model runs (and is refit) in float64, on images never rounded to float32.
    images = load_calibration_images(calib, n_images, seed=seed, progress=progress, dtype=dtype)
    if device.type == "cuda" and images.device != device:
        # Every pass that starts from the images then reads them without a host copy.
        if images.nbytes <= torch.cuda.mem_get_info(device)[0] // 4:
            images = images.to(device)
    n_total = images.shape[0]
    # Held-out images go last, so every chunk splits into fit and held-out rows by slicing.
    fit_idx, held_idx = _fit_heldout_split(n_total, holdout, seed)
    images = images[torch.from_numpy(np.concatenate([fit_idx, held_idx])).to(images.device)]
    return _prune_graph(
        model, images, len(fit_idx), options, recovery=recovery, **settings
    )  # fmt: skip


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
    channel_sampler: bool = False,
    max_cache_mb: Optional[float] = None,
) -> tuple[nn.Module, PruneReport]:
    """:func:`prune_model` through the plan traced from the graph (any network).

    ``images`` are this rank's under a ``shard`` (``n_fit`` of them fit images, with
    global ``image_ids``); ``counts`` the global numbers of fit and held-out images."""
    n_fit_all, n_held_all = counts or (n_fit, images.shape[0] - n_fit)
    if image_ids is None:
        image_ids = torch.arange(images.shape[0])
    group = shard.group if shard is not None else None
    device = options.device
    input_shape = tuple(images.shape[1:])
    pruned = (model if inplace else copy.deepcopy(model)).to(device).eval()
    plan = _trace(pruned, input_shape, channel_sampler)
    reference = symbolic_trace(copy.deepcopy(model).to(device).eval())
    auto_reason = None
    if schedule == "auto":
        schedule, auto_reason = resolve_auto_schedule(plan)
        logger.info("schedule='auto': %s, for %s", schedule, auto_reason)
    if options.method == "bn_scale":
        plan = keep_whole(
            plan, unscaled_linear_groups(plan),
            "written by a linear layer with no BatchNorm to rank its channels by "
            "(method='bn_scale')",
        )  # fmt: skip
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
        else:  # the first fit images (ENERGY_IMAGES)
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
            cache_bytes=_cache_bytes(max_cache_mb, device),
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
        return _keep_undersampled(
            plan, {name: curve.cost() for name, curve in curves.items()}, images.shape[0],
            process_group,
        )  # fmt: skip
    consumers = {c.name: c for c in plan.consumers}
    first = {name: consumers[g.consumers[0]] for name, g in groups.items() if g.consumers}
    modules = {c.name: plan.graph.get_submodule(c.name) for c in first.values()}
    moments = input_moments(
        plan.graph, images, modules, batch_size=batch_size, device=device,
        process_group=process_group, spread={c.name: c.spread for c in first.values()},
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
    return _keep_undersampled(plan, cost, images.shape[0], process_group)


def _keep_undersampled(plan, cost: dict, n_images: int, process_group=None) -> dict:
    """``cost`` with the groups a linear layer reads kept whole (infinite cost below their
    size) where its measured vectors are fewer than twice their channels: one per image
    (``spread`` per image for a flattened map) spans at most that many of them, so a
    spectrum or a fitted prediction there would call the rest free (a class-sorted prefix
    spans even fewer)."""
    if process_group is not None:
        n_images = int(all_reduce_sum(torch.tensor(float(n_images)), process_group))
    spread = {c.name: c.spread for c in plan.consumers if c.linear}
    out = dict(cost)
    for name in cost:
        group = plan.groups[name]
        readers = [spread[c] for c in group.consumers if c in spread]
        if readers and n_images * min(readers) < 2 * group.size:
            out[name] = np.full(group.size + 1, np.inf)
            out[name][-1] = 0.0
            logger.info(
                "%s: read by a linear layer and measured on %d images (< 2 x %d channels): "
                "kept whole by the schedule.", name, n_images, group.size,
            )  # fmt: skip
    return out
