"""Multiply-accumulate (MAC) and parameter accounting, and latency measurement.

chanprune counts MACs the way the original channel-pruning code (He, Zhang and Sun, ICCV
2017) counts "FLOPs": per convolution ``H_out * W_out * C_out * (C_in / groups) * kh * kw``
multiply-accumulates for one image, convolution layers only (bias, BatchNorm, ReLU and
pooling are not counted; fully connected layers only on request). By that formula the
13 convolutions of VGG-16 at 224 x 224 cost 15,346,630,656 MACs, the figure behind the
paper's 2x / 4x / 5x speed-ups.

Example
-------
>>> from torch import nn
>>> from chanprune.flops import count_macs
>>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
>>> count_macs(net, (3, 8, 8))  # 8*8*4*3*3*3 + 8*8*2*4*1*1
7424
>>> count_macs(net, (3, 8, 8), per_layer=True).per_layer
{'0': 6912, '2': 512}
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from chanprune._validation import check_int_in_range

__all__ = [
    "MacCount",
    "conv_macs",
    "count_macs",
    "count_params",
    "conv_output_sizes",
    "measure_latency",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MacCount:
    """MACs of one forward pass for one image, in total and per layer.

    Attributes
    ----------
    total : int
        Sum of ``per_layer``.
    per_layer : dict of str to int
        ``{module_name: macs}`` in order of first execution; names are
        ``named_modules()`` paths (a module called several times is summed over calls).
    """

    total: int
    per_layer: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain-Python view: ``{"total": int, "per_layer": {name: int}}``."""
        return {"total": int(self.total), "per_layer": dict(self.per_layer)}


# --------------------------------------------------------------------------------------
# formulas
# --------------------------------------------------------------------------------------
def conv_macs(
    h_out: int, w_out: int, c_out: int, c_in: int, kh: int, kw: int, *, groups: int = 1
) -> int:
    """Multiply-accumulates of one 2-D convolution for one image.

    Parameters
    ----------
    h_out, w_out : int
        Spatial size of the output map.
    c_out, c_in : int
        Output and input channels (both multiples of ``groups``).
    kh, kw : int
        Kernel size.
    groups : int, default=1
        Convolution groups; each filter sees ``c_in / groups`` input channels.

    Returns
    -------
    macs : int
        ``h_out * w_out * c_out * (c_in // groups) * kh * kw`` (bias not counted).
    """
    values = {"h_out": h_out, "w_out": w_out, "c_out": c_out, "c_in": c_in, "kh": kh, "kw": kw}
    for name, value in values.items():
        check_int_in_range(value, name, 0)
    groups = check_int_in_range(groups, "groups", 1)
    if c_in % groups or c_out % groups:
        raise ValueError(
            f"c_in ({c_in}) and c_out ({c_out}) must be multiples of groups ({groups})."
        )
    return int(h_out) * int(w_out) * int(c_out) * (int(c_in) // groups) * int(kh) * int(kw)


# --------------------------------------------------------------------------------------
# tracing machinery (private)
# --------------------------------------------------------------------------------------
def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}.")


def _check_input_shape(input_shape: Any) -> tuple[int, ...]:
    if isinstance(input_shape, torch.Size):
        input_shape = tuple(input_shape)
    if not isinstance(input_shape, (tuple, list)) or len(input_shape) == 0:
        raise TypeError(
            "input_shape must be a non-empty tuple of ints, the shape of one input without the "
            f"batch dimension, e.g. (3, 224, 224); got {input_shape!r}."
        )
    return tuple(check_int_in_range(v, "input_shape", 1) for v in input_shape)


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device of the model's first parameter or buffer (CPU if none) and the dtype of its
    first floating-point one (the default dtype if none)."""
    device = torch.device("cpu")
    dtype = torch.get_default_dtype()
    tensors = list(model.parameters()) + list(model.buffers())
    if tensors:
        device = tensors[0].device
    for t in tensors:
        if t.is_floating_point():
            dtype = t.dtype
            break
    return device, dtype


def _trace(
    model: nn.Module,
    input_shape: tuple[int, ...],
    wanted: Callable[[nn.Module], bool],
) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """Run one batch-1 zero input through ``model`` in eval mode under inference_mode and
    return ``(name, module, output_shape)`` for every call of a wanted module, in execution
    order. Hooks are removed and every module's train/eval flag restored in ``finally``."""
    device, dtype = _device_and_dtype(model)
    records: list = []
    handles = []
    modes = {m: m.training for m in model.modules()}

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            records.append((name, module, tuple(output.shape)))

        return hook

    try:
        for name, module in model.named_modules():
            if wanted(module):
                handles.append(module.register_forward_hook(make_hook(name)))
        model.eval()
        with torch.inference_mode():
            x = torch.zeros((1, *input_shape), device=device, dtype=dtype)
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return records


def _warn_uncounted(model: nn.Module) -> None:
    skipped = [
        name
        for name, m in model.named_modules()
        if isinstance(m, _ConvNd) and not isinstance(m, nn.Conv2d)
    ]
    if skipped:
        logger.warning(
            "count_macs counts nn.Conv2d (and nn.Linear on request) only; not counted: %s",
            ", ".join(skipped),
        )


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
def count_macs(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    include_linear: bool = False,
    per_layer: bool = False,
) -> Union[int, MacCount]:
    """Multiply-accumulates of one forward pass for one image.

    Counted with forward hooks on a dummy input (zeros of shape ``(1, *input_shape)``, on
    the model's device and in its floating dtype), the model in eval mode under
    ``torch.inference_mode()``. Hooks are removed and each module's train/eval mode is
    restored afterwards, also when the forward raises.

    Parameters
    ----------
    model : nn.Module
    input_shape : tuple of int
        Shape of one input **without** the batch dimension, e.g. ``(3, 224, 224)``.
    include_linear : bool, default=False
        Also count ``in_features * out_features`` per ``nn.Linear`` (per row of its input).
    per_layer : bool, default=False
        Return a :class:`MacCount` with the per-layer breakdown instead of an int.

    Returns
    -------
    macs : int or MacCount
        The total (``per_layer=False``) or ``MacCount(total, per_layer)``.

    Notes
    -----
    Per ``nn.Conv2d`` call: :func:`conv_macs` ``(H_out, W_out, C_out, C_in, kh, kw,
    groups=groups)``, i.e. ``H_out W_out C_out (C_in / groups) kh kw``: the formula of the
    original channel-pruning code. Bias, BatchNorm, activations and pooling are not
    counted. Other convolution types (Conv1d, Conv3d, transposed) are not counted either
    (a warning is logged). A module called several times is counted at every call.
    A model on the ``meta`` device is counted without any computation.
    """
    _check_model(model)
    shape = _check_input_shape(input_shape)
    kinds: tuple = (nn.Conv2d, nn.Linear) if include_linear else (nn.Conv2d,)
    _warn_uncounted(model)
    records = _trace(model, shape, lambda m: isinstance(m, kinds))

    layers: dict[str, int] = {}
    for name, module, out_shape in records:
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs = conv_macs(
                out_shape[-2],
                out_shape[-1],
                module.out_channels,
                module.in_channels,
                kh,
                kw,
                groups=module.groups,
            )
        else:  # nn.Linear: one in*out product per row of the (batch-1) input
            macs = math.prod(out_shape) * module.in_features
        layers[name] = layers.get(name, 0) + macs
    total = sum(layers.values())
    logger.debug("count_macs: %d MACs over %d layers", total, len(layers))
    if per_layer:
        return MacCount(total=total, per_layer=layers)
    return total


def count_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``model`` (shared parameters counted once).

    Parameters
    ----------
    model : nn.Module
    trainable_only : bool, default=False
        Count only parameters with ``requires_grad=True``.

    Returns
    -------
    n_params : int
        Buffers (BatchNorm running statistics) are not counted.
    """
    _check_model(model)
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only))


def conv_output_sizes(model: nn.Module, input_shape: Sequence[int]) -> dict[str, tuple[int, int]]:
    """Spatial size of each ``nn.Conv2d``'s output, from one dummy forward pass.

    Useful for analytic MAC formulas (:func:`conv_macs`) when channel widths change but the
    spatial sizes do not.

    Parameters
    ----------
    model : nn.Module
    input_shape : tuple of int
        Shape of one input without the batch dimension, e.g. ``(3, 224, 224)``.

    Returns
    -------
    sizes : dict of str to (int, int)
        ``{module_name: (H_out, W_out)}`` in order of first execution; a conv called
        several times reports the size of its first call. Convs that do not run are absent.
    """
    _check_model(model)
    shape = _check_input_shape(input_shape)
    sizes: dict[str, tuple[int, int]] = {}
    for name, _module, out_shape in _trace(model, shape, lambda m: isinstance(m, nn.Conv2d)):
        sizes.setdefault(name, (int(out_shape[-2]), int(out_shape[-1])))
    return sizes


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_size: int = 1,
    device: Union[str, torch.device] = "cpu",
    n_warmup: int = 5,
    n_repeat: int = 20,
    num_threads: Optional[int] = None,
) -> dict:
    """Wall-clock time of a forward pass, in milliseconds per batch.

    A model on another device than ``device`` is moved there for the measurement and moved
    back afterwards (models spread over several devices are not supported); it runs
    in eval mode under ``torch.inference_mode()`` on a fixed random input, and each
    module's train/eval mode is restored afterwards. On CUDA the device is synchronised
    around every timed forward.

    Parameters
    ----------
    model : nn.Module
    input_shape : tuple of int
        Shape of one input without the batch dimension, e.g. ``(3, 224, 224)``.
    batch_size : int, default=1
    device : str or torch.device, default="cpu"
    n_warmup : int, default=5
        Untimed forward passes first.
    n_repeat : int, default=20
        Timed forward passes.
    num_threads : int, optional
        ``torch.set_num_threads`` during the measurement (restored afterwards); ``None``
        keeps the current setting.

    Returns
    -------
    stats : dict
        ``median_ms``, ``mean_ms``, ``p90_ms``, ``min_ms``, ``std_ms`` (floats, per batch),
        and ``batch_size``, ``n_repeat``, ``device``, ``num_threads`` describing the run.
    """
    _check_model(model)
    shape = _check_input_shape(input_shape)
    batch_size = check_int_in_range(batch_size, "batch_size", 1)
    n_warmup = check_int_in_range(n_warmup, "n_warmup", 0)
    n_repeat = check_int_in_range(n_repeat, "n_repeat", 1)
    if num_threads is not None:
        num_threads = check_int_in_range(num_threads, "num_threads", 1)
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device; got {type(device).__name__}.")
    try:
        target = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"The 'device' parameter is not a valid device; got {device!r}.") from exc
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"The 'device' parameter is {device!r} but CUDA is not available.")
    is_cuda = target.type == "cuda"

    def sync() -> None:
        if is_cuda:
            torch.cuda.synchronize(target)

    original_device, dtype = _device_and_dtype(model)
    modes = {m: m.training for m in model.modules()}
    old_threads = torch.get_num_threads()
    times = np.empty(n_repeat, dtype=np.float64)
    try:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if original_device != target:
            model.to(target)
        model.eval()
        generator = torch.Generator().manual_seed(0)
        x = torch.randn((batch_size, *shape), generator=generator, dtype=dtype).to(target)
        with torch.inference_mode():
            for _ in range(n_warmup):
                model(x)
            sync()
            for i in range(n_repeat):
                sync()
                start = time.perf_counter()
                model(x)
                sync()
                times[i] = (time.perf_counter() - start) * 1e3
    finally:
        if original_device != target:
            model.to(original_device)
        for module, training in modes.items():
            module.training = training
        if num_threads is not None:
            torch.set_num_threads(old_threads)
    stats = {
        "median_ms": float(np.median(times)),
        "mean_ms": float(np.mean(times)),
        "p90_ms": float(np.percentile(times, 90)),
        "min_ms": float(np.min(times)),
        "std_ms": float(np.std(times)),
        "batch_size": batch_size,
        "n_repeat": n_repeat,
        "device": str(target),
        "num_threads": torch.get_num_threads() if num_threads is None else num_threads,
    }
    logger.debug("measure_latency: %s", stats)
    return stats
