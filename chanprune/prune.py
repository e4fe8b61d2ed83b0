"""Whole-model channel pruning, one layer at a time (the driver).

For each prunable conv ``L`` in network order:

1. **Sample**: the input patches ``X`` of ``L`` in the network being pruned, and the
   output ``Y`` of the *original* network's ``L`` (pre-activation, BatchNorm folded), at
   seeded random positions; accumulated as float64 statistics (:mod:`chanprune.stats`).
2. **Select** the input channels of ``L`` to keep (:mod:`chanprune.selection`) and
   **refit** its weights (:mod:`chanprune.refit`), through
   :func:`chanprune.prune_layer_from_stats`.
3. **Remove** the dropped channels for real: the filters of the previous conv and its
   BatchNorm, the input channels of ``L`` (:mod:`chanprune.surgery`).

Because ``X`` comes from the pruned network and ``Y`` from the original one, each layer
corrects the error accumulated before it. The activations of both networks at the current
layer are kept for all calibration images and advanced one segment per layer, so a whole
sweep costs about one forward pass of each network, not a fresh pass per layer.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ._validation import check_choice, check_int_in_range, check_real_in_range
from .exceptions import UnsupportedLayerError
from .flops import conv_output_sizes, count_macs, count_params
from .layer import prune_layer_from_stats
from .refit import reconstruction_error
from .report import LayerReport, PruneReport
from .sampling import extract_patches, gather_outputs, record_activations, sample_positions
from .schedule import SCHEDULES, ConvCost, MacModel, resolve_explicit, widths_for_speedup
from .selection import SELECTORS
from .stats import LayerStats
from .surgery import (
    fold_batchnorm,
    prune_batchnorm,
    prune_conv_out_channels,
    set_batchnorm_identity,
    set_conv_params,
)

__all__ = [
    "prune_model",
    "MODEL_METHODS",
    "load_calibration_images",
    "plan_widths",
    "prunable_layers",
]

logger = logging.getLogger(__name__)

#: Criteria that need the activations or BatchNorm of the model, on top of SELECTORS.
ACTIVATION_METHODS = ("apoz", "entropy", "bn_scale")
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
    """A conv whose input channels are selected, and the conv (+BN) that produces them."""

    name: str  # e.g. "features.3"
    index: int  # position in ``features``
    bn_index: Optional[int]
    producer_index: int
    producer_bn_index: Optional[int]
    stage: int  # 1 + number of pooling layers before it


def _chain_plan(model: nn.Module) -> list[_Consumer]:
    """The consumers of a VGG-style model (``features`` Sequential, then a head)."""
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        raise UnsupportedLayerError(
            f"{type(model).__name__} is not a supported architecture: chanprune prunes "
            "VGG-style models (a `features` nn.Sequential of Conv2d/BatchNorm2d/ReLU/pooling "
            "followed by a classifier head), e.g. chanprune.models.vgg16_bn or torchvision's VGG."
        )
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
            if module.groups != 1:
                raise UnsupportedLayerError(
                    f"features.{i} is a grouped convolution (groups={module.groups}); "
                    "only groups=1 is supported."
                )
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
    return [
        _Consumer(
            name=f"features.{j}",
            index=j,
            bn_index=bns.get(j),
            producer_index=i,
            producer_bn_index=bns.get(i),
            stage=stages[j],
        )
        for i, j in zip(convs[:-1], convs[1:])
    ]


def prunable_layers(model: nn.Module) -> dict[str, int]:
    """The layers whose input channels :func:`prune_model` can select, with their widths.

    Keys are ``named_modules()`` paths of the consuming convs (``"features.3"``); these
    are the keys of an explicit ``schedule``.
    """
    plan = _chain_plan(model)  # refuses unsupported architectures before touching them
    return {c.name: model.features[c.index].in_channels for c in plan}


def _mac_model(model: nn.Module, plan: list[_Consumer], input_shape) -> MacModel:
    sizes = conv_output_sizes(model, input_shape)
    features = model.features
    groups = {c.name: features[c.index].in_channels for c in plan}
    group_of_input = {c.index: c.name for c in plan}
    group_of_output = {c.producer_index: c.name for c in plan}
    convs = []
    for name, (h, w) in sizes.items():
        if not name.startswith("features."):
            continue
        i = int(name.split(".")[1])
        conv = features[i]
        kh, kw = conv.kernel_size
        convs.append(
            ConvCost(
                name=name,
                coef=h * w * kh * kw,
                in_group=group_of_input.get(i),
                out_group=group_of_output.get(i),
                in_fixed=conv.in_channels,
                out_fixed=conv.out_channels,
            )
        )
    return MacModel(groups=groups, convs=tuple(convs))


def _multipliers(plan: list[_Consumer], schedule: str) -> dict[str, float]:
    if schedule == "uniform":
        return {c.name: 1.0 for c in plan}
    # The paper's VGG-16 schedule: conv1_x-conv3_x : conv4_x kept ratios 1 : 1.5, conv5_x
    # (stage 5 and beyond) untouched; conv1_1 sees the image and is never a consumer.
    return {c.name: (1.0 if c.stage <= 3 else 1.5 if c.stage == 4 else 0.0) for c in plan}


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
) -> tuple[dict[str, int], float]:
    """Per-layer widths for a target speed-up, without any data or pruning.

    Parameters
    ----------
    model : nn.Module
        A VGG-style network (see :func:`prune_model`).
    input_shape : tuple of int
        One input without the batch dimension, e.g. ``(3, 32, 32)``.
    speedup, schedule
        As in :func:`prune_model`.

    Returns
    -------
    widths : dict of layer -> int
        Input channels kept by each prunable layer (:func:`prunable_layers` keys).
    speedup : float
        The MAC speed-up those widths achieve.

    Raises
    ------
    UnsupportedLayerError, ValueError
        An unsupported model, an input shape the model does not accept, an unreachable or
        invalid target.
    """
    plan = _chain_plan(model)
    explicit = _check_target(speedup, schedule)
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
    return widths_for_speedup(mac_model, speedup, _multipliers(plan, schedule))


# ---------------------------------------------------------------------------- calibration
def load_calibration_images(
    calib: Union[Dataset, torch.Tensor],
    n_images: Optional[int] = None,
    *,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """Calibration images as one float tensor (n_images, C, H, W).

    ``calib`` is a tensor of preprocessed images or a dataset yielding ``image`` or
    ``(image, label)``; ``n_images`` images are drawn with a seeded generator (all when
    None).
    """
    from .data import calibration_subset

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
        images = calib.detach().float()
    elif isinstance(calib, Dataset):
        if len(calib) == 0:
            raise ValueError("the calibration dataset holds no images.")
        subset = calibration_subset(calib, n_images, seed=seed)
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False)
        chunks = []
        for batch in tqdm(loader, desc="calibration images", disable=not progress, leave=False):
            chunks.append(batch[0] if isinstance(batch, (list, tuple)) else batch)
        images = torch.cat(chunks).float()
    else:
        raise TypeError(
            f"calib must be a torch Dataset or a tensor of images; got {type(calib).__name__}."
        )
    if not torch.isfinite(images).all():
        raise ValueError("the calibration images contain NaN or Inf values.")
    return images


# ---------------------------------------------------------------------------- helpers
def _run(modules: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for module in modules:
        x = module(x)
    return x


def _folded(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` (eval mode) as one conv."""
    if bn is not None:
        conv = fold_batchnorm(conv, bn)
    bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
    return conv.weight.detach(), bias.detach()


def _entropy_scores(gap: torch.Tensor, n_bins: int = 32) -> np.ndarray:
    """Entropy of each channel's global-average-pooled activation over images.

    ``gap`` has shape (n_images, c); each channel's values are binned over their own range
    (Luo and Wu, 2017). A constant channel has entropy 0.
    """
    values = gap.double().cpu().numpy()
    scores = np.zeros(values.shape[1])
    for i in range(values.shape[1]):
        hist, _ = np.histogram(values[:, i], bins=n_bins)
        p = hist[hist > 0] / hist.sum()
        scores[i] = float(-(p * np.log(p)).sum())
    return scores


# ---------------------------------------------------------------------------- the driver
def prune_model(
    model: nn.Module,
    calib: Union[Dataset, torch.Tensor],
    *,
    speedup: Optional[float] = None,
    schedule: Union[str, Mapping[str, Union[int, float]]] = "uniform",
    method: str = "lasso",
    n_images: Optional[int] = None,
    positions_per_image: Optional[int] = 10,
    holdout: float = 0.1,
    refit: bool = True,
    ridge: float = 1e-4,
    normalize: bool = True,
    alternate: bool = False,
    correct_unpruned: bool = True,
    batch_size: int = 100,
    stats_dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
    progress: bool = True,
    inplace: bool = False,
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> tuple[nn.Module, PruneReport]:
    """Prune the channels of a VGG-style network, layer by layer, without retraining.

    Parameters
    ----------
    model : nn.Module
        A VGG-style network (``features`` Sequential of conv/BN/ReLU/pool, then a head),
        e.g. :func:`chanprune.models.vgg16_bn_cifar10` or a torchvision VGG. Not modified
        unless ``inplace=True``.
    calib : Dataset or tensor of shape (n_images, C, H, W)
        Preprocessed calibration images (a dataset may yield ``(image, label)``).
    speedup : float, optional
        Target MAC speed-up (> 1), turned into per-layer widths by ``schedule``. The
        achieved value is reported (within 2% of the target).
    schedule : {"uniform", "paper"} or dict of layer -> keep
        ``uniform``: one kept ratio everywhere; ``paper``: He et al.'s VGG-16 schedule
        (conv1_x-conv3_x : conv4_x kept ratios 1 : 1.5, conv5_x untouched); or explicit
        widths ``{"features.3": 32, ...}`` (int counts or float ratios), in which case
        ``speedup`` must be None. :func:`prunable_layers` lists the keys.
    method : str, default="lasso"
        Channel selector: ``lasso``, ``greedy_ls``, ``thinet``, ``max_response``,
        ``first_k``, ``random`` (see :mod:`chanprune.selection`), or an activation/BN
        criterion: ``apoz`` (keep the channels least often zero), ``entropy`` (of the
        pooled activation), ``bn_scale`` (largest ``|gamma|``, Network Slimming).
    n_images : int, optional
        Calibration images to draw (seeded); all of ``calib`` when None.
    positions_per_image : int or None, default=10
        Output positions sampled per image and layer (the paper uses 10); None or a
        value >= H*W takes every position.
    holdout : float, default=0.1
        Fraction of the calibration images kept out of the fit, to report a held-out
        reconstruction error per layer (0 disables it).
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
    batch_size : int, default=100
        Images per forward chunk (memory).
    stats_dtype : torch.float32, torch.float64 or None
        Precision of each chunk's products ``X^T X`` (the running sums are float64
        either way; see :class:`chanprune.LayerStats`). None: float32 on a CPU, where it
        is 2-4x faster, float64 on CUDA.
    device : str or torch.device, default="cpu"
        Where the forward passes and statistics run (``"cuda"`` works).
    seed : int, default=0
        Seeds the image draw, the held-out split, the positions and ``random``.
    progress : bool, default=True
        Show tqdm progress bars.
    inplace : bool, default=False
        Prune ``model`` itself instead of a copy.

    Returns
    -------
    pruned : nn.Module
        The same class as ``model``, physically smaller, in eval mode, on ``device``.
    report : PruneReport
        Per-layer widths, errors and times; MACs, parameters and speed-up.

    Raises
    ------
    UnsupportedLayerError
        A model or layer chanprune cannot prune; the message names it.
    ValueError
        Bad parameters, an unreachable speed-up, empty or non-finite calibration data.
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}.")
    method = check_choice(method, "method", MODEL_METHODS)
    explicit = _check_target(speedup, schedule)
    if n_images is not None:
        n_images = check_int_in_range(n_images, "n_images", 1)
    if positions_per_image is not None:
        positions_per_image = check_int_in_range(positions_per_image, "positions_per_image", 1)
    holdout = check_real_in_range(holdout, "holdout", 0.0, 0.5)
    ridge = check_real_in_range(ridge, "ridge", 0.0)
    batch_size = check_int_in_range(batch_size, "batch_size", 1)
    device = torch.device(device)
    if stats_dtype is None:
        stats_dtype = torch.float32 if device.type == "cpu" else torch.float64
    plan = _chain_plan(model)
    if method == "bn_scale":
        missing = [c.name for c in plan if c.producer_bn_index is None]
        if missing:
            raise UnsupportedLayerError(
                f"method='bn_scale' needs a BatchNorm after every pruned conv; the producers of "
                f"{missing} have none."
            )

    images = load_calibration_images(calib, n_images, seed=seed, progress=progress)
    n_total = images.shape[0]
    n_held = int(round(holdout * n_total)) if n_total > 1 else 0
    rng = np.random.default_rng(seed)
    is_held = np.zeros(n_total, dtype=bool)
    is_held[rng.choice(n_total, size=n_held, replace=False)] = True
    input_shape = tuple(images.shape[1:])

    reference = copy.deepcopy(model).to(device).eval()
    if inplace:
        pruned = model.to(device).eval()
    else:
        pruned = copy.deepcopy(model).to(device).eval()
    widths, _ = plan_widths(reference, input_shape, speedup=speedup, schedule=schedule)
    schedule_name = "explicit" if explicit else schedule
    macs_before = count_macs(reference, input_shape)
    params_before = count_params(reference)

    generator = torch.Generator().manual_seed(seed)
    ref_features, features = reference.features, pruned.features
    layer_reports: list[LayerReport] = []
    cache_ref = images
    cache_pruned = images  # the same tensor until the first layer is pruned
    diverged = False
    position = 0  # index in features that the caches are the input of
    held_t = torch.from_numpy(is_held)

    # no_grad, not inference_mode: parameters created by the surgery must stay ordinary
    # tensors, so the pruned model can be fine-tuned afterwards.
    with torch.no_grad():
        bar = tqdm(plan, desc="pruning", disable=not progress)
        for step, consumer in enumerate(bar):
            bar.set_postfix_str(consumer.name)
            # Bring both caches to the input of this consumer (only the first time, or
            # after an untouched layer: otherwise the previous step left them there).
            if position < consumer.index:
                segment_ref = list(ref_features[position : consumer.index])
                cache_ref = _advance(segment_ref, cache_ref, batch_size, device)
                if diverged:
                    segment = list(features[position : consumer.index])
                    cache_pruned = _advance(segment, cache_pruned, batch_size, device)
                else:
                    cache_pruned = cache_ref
                position = consumer.index
            keep = widths[consumer.name]
            c = features[consumer.index].in_channels
            if keep == c and (not diverged or not correct_unpruned or not refit):
                continue  # nothing to select, nothing to correct

            layer_start = time.perf_counter()
            conv = features[consumer.index]
            ref_target = ref_features[
                consumer.bn_index if consumer.bn_index is not None else consumer.index
            ]
            # The reference network runs up to the next consumer in the same pass that
            # yields this layer's target (a hook on its BN output), so it costs one
            # forward pass per sweep; the last layer stops at its own output.
            nxt = plan[step + 1].index if step + 1 < len(plan) else None
            end = nxt if nxt is not None else (consumer.bn_index or consumer.index) + 1
            segment_ref = list(ref_features[consumer.index : end])
            stats = LayerStats(
                c, conv.out_channels, conv.kernel_size, device=device, compute_dtype=stats_dtype
            )
            held_stats = LayerStats(
                c, conv.out_channels, conv.kernel_size, device=device, compute_dtype=stats_dtype
            )
            zeros = torch.zeros(c, dtype=torch.float64)
            gaps = []
            next_ref = None
            for lo in range(0, n_total, batch_size):
                hi = min(lo + batch_size, n_total)
                x = cache_pruned[lo:hi].to(device)
                with record_activations(outputs={"y": ref_target}) as rec:
                    out = _run(segment_ref, cache_ref[lo:hi].to(device))
                if nxt is not None:
                    if next_ref is None:
                        shape = (n_total,) + tuple(out.shape[1:])
                        next_ref = torch.empty(shape, dtype=out.dtype, device=cache_ref.device)
                    next_ref[lo:hi] = out.to(next_ref.device)
                y = rec["y"]
                pos = sample_positions(hi - lo, tuple(y.shape[2:]), positions_per_image, generator)
                X = extract_patches(x, conv, pos)
                Y = gather_outputs(y, pos)
                held_rows = held_t[lo:hi][pos.image].to(device)
                stats.update(X[~held_rows], Y[~held_rows])
                if held_rows.any():
                    held_stats.update(X[held_rows], Y[held_rows])
                fit_images = x[~held_t[lo:hi].to(device)]
                if method == "apoz":
                    zeros += (fit_images == 0).sum(dim=(0, 2, 3)).double().cpu()
                elif method == "entropy":
                    gaps.append(fit_images.mean(dim=(2, 3)).cpu())

            bn = features[consumer.bn_index] if consumer.bn_index is not None else None
            weight, bias = _folded(conv, bn)
            options: dict[str, Any] = {}
            selector = method
            if keep == c:
                selector = "first_k"  # keep everything: a pure least-squares correction
            elif method in ACTIVATION_METHODS:
                selector = "by_score"
                if method == "apoz":
                    per_channel = max(1, int((~held_t).sum()) * cache_pruned[0, 0].numel())
                    options["scores"] = -(zeros.numpy() / per_channel)
                elif method == "entropy":
                    options["scores"] = _entropy_scores(torch.cat(gaps))
                else:
                    producer_bn = ref_features[consumer.producer_bn_index]
                    options["scores"] = producer_bn.weight.detach().abs().cpu().double().numpy()
            result = prune_layer_from_stats(
                stats, weight, bias, keep=keep, method=selector, refit=refit, ridge=ridge,
                normalize=normalize, alternate=alternate and selector == "lasso",
                random_state=seed + step, max_iter=max_iter, tol=tol, **options,
            )  # fmt: skip
            held_error = None
            if held_stats.n_samples:
                held = held_stats.moments()
                err = reconstruction_error(
                    held,
                    result.kept,
                    result.weight.reshape(result.weight.shape[0], -1),
                    result.bias,
                )
                held_error = err / held.yty if held.yty > 0 else 0.0

            # Surgery: drop the producer's filters (and BN channels), install the refit
            # weights in folded form and make this layer's BN the identity.
            kept = torch.from_numpy(result.kept)
            if keep < c:
                prune_conv_out_channels(features[consumer.producer_index], kept)
                if consumer.producer_bn_index is not None:
                    prune_batchnorm(features[consumer.producer_bn_index], kept)
                cache_pruned = cache_pruned[:, kept.to(cache_pruned.device)]
            set_conv_params(conv, result.weight, result.bias)
            if bn is not None:
                set_batchnorm_identity(bn)
            diverged = True
            layer_reports.append(
                LayerReport(
                    name=consumer.name,
                    producer=f"features.{consumer.producer_index}",
                    channels_before=c,
                    channels_after=keep,
                    rel_error=float(result.rel_error),
                    rel_error_heldout=None if held_error is None else float(held_error),
                    rel_error_before_refit=float(result.rel_error_before_refit),
                    n_samples=stats.n_samples,
                    time_s=time.perf_counter() - layer_start,
                    alpha=result.alpha,
                )
            )
            if nxt is not None:
                segment = list(features[consumer.index : nxt])
                cache_pruned = _advance(segment, cache_pruned, batch_size, device)
                cache_ref = next_ref
                position = nxt
            logger.info(
                "%s: %d -> %d channels, rel. error %.4f (held-out %s)",
                consumer.name, c, keep, result.rel_error,
                "-" if held_error is None else f"{held_error:.4f}",
            )  # fmt: skip

    macs_after = count_macs(pruned, input_shape)
    report = PruneReport(
        model=type(model).__name__,
        method=method,
        schedule=schedule_name,
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
        layers=layer_reports,
        options=dict(
            positions_per_image=positions_per_image, ridge=ridge, refit=refit,
            normalize=normalize, alternate=alternate, correct_unpruned=correct_unpruned,
            seed=seed, widths=widths,
        ),
    )  # fmt: skip
    return pruned.eval(), report


def _advance(
    modules: list[nn.Module], cache: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Run ``modules`` over every cached activation, chunk by chunk."""
    out = None
    for lo in range(0, cache.shape[0], batch_size):
        hi = min(lo + batch_size, cache.shape[0])
        y = _run(modules, cache[lo:hi].to(device))
        if out is None:
            out = torch.empty(
                (cache.shape[0],) + tuple(y.shape[1:]), dtype=y.dtype, device=cache.device
            )
        out[lo:hi] = y.to(cache.device)
    return out
