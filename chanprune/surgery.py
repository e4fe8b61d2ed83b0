"""Physical surgery on layers: fold BatchNorm, drop channels, install refit weights.

Plain functions in the style of Torch-Pruning's ``prune_conv_out_channels`` and friends,
each named for what it does, plus two helpers named for the pattern they handle
(``conv -> [bn] -> conv`` and ``conv -> [bn] -> flatten -> linear``), and the channel
sampler of He et al. (2017, Sec. 4.2): :class:`SampledConv2d`, a conv that reads only some
channels of an input that other layers need whole (the residual stream of a ResNet), put in
place by :func:`insert_channel_sampler`.

Conventions
-----------
- A selection is always the channels **kept** (``kept``): a 1-D sequence, ndarray or tensor
  of distinct integer indices within range, not empty. Unsorted input is sorted; the layer
  keeps its channels in increasing index order.
- Every ``prune_*`` function and :func:`set_conv_params` works **in place**: it replaces the
  module's Parameters (and BatchNorm buffers) with smaller ones and updates the size
  attributes (``in_channels``, ``out_channels``, ``num_features``, ``in_features``,
  ``out_features``). dtype, device and ``requires_grad`` are kept. The module is returned
  for convenience. Parameters are *replaced*, so an optimizer built before the surgery
  still refers to the old tensors: build the optimizer afterwards.
- Arguments are validated before anything is modified, so a call that raises leaves its
  modules untouched (the pattern helpers validate all their modules first).
- Only ordinary convolutions (``groups=1``) are supported; grouped and depthwise
  convolutions raise :class:`~chanprune.exceptions.UnsupportedLayerError`.
- A :class:`SampledConv2d` is an ``nn.Conv2d`` whose ``in_channels`` are the sampled ones:
  pruning its input channels prunes its sampler too (the indices compose), and its weight
  can be replaced (:func:`set_conv_params`) but not widened or narrowed that way.

Example
-------
>>> import torch
>>> from torch import nn
>>> from chanprune.surgery import prune_conv_bn_conv
>>> conv1, bn1, conv2 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3)
>>> _ = prune_conv_bn_conv(conv1, bn1, conv2, [0, 2, 5])
>>> conv1.out_channels, bn1.num_features, conv2.in_channels
(3, 3, 3)
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from chanprune._validation import check_finite, check_int_in_range
from chanprune.exceptions import UnsupportedLayerError

__all__ = [
    "SampledConv2d",
    "insert_channel_sampler",
    "fold_batchnorm",
    "set_conv_params",
    "set_linear_params",
    "prune_conv_in_channels",
    "prune_conv_out_channels",
    "prune_batchnorm",
    "set_batchnorm_identity",
    "prune_grouped_conv",
    "module_shapes",
    "apply_shapes",
    "prune_linear_in_features",
    "prune_linear_out_features",
    "prune_conv_bn_conv",
    "prune_conv_bn_flatten_linear",
]

logger = logging.getLogger(__name__)

IndexLike = Union[Sequence[int], np.ndarray, torch.Tensor]
ArrayLike = Union[np.ndarray, torch.Tensor]

_SUPPORTED_CONV = "nn.Conv2d with groups=1 (grouped and depthwise convolutions are not supported)"


# --------------------------------------------------------------------------------------
# validation helpers (private)
# --------------------------------------------------------------------------------------
def _check_kept(kept: Any, name: str, n: int) -> torch.Tensor:
    """Validate a selection of kept indices in ``[0, n)`` and return it as a sorted int64
    CPU tensor (a new tensor, never a view of the caller's data)."""
    if isinstance(kept, torch.Tensor):
        if kept.dtype == torch.bool or kept.is_floating_point() or kept.is_complex():
            raise TypeError(
                f"{name} must hold integer indices of the kept channels; got a tensor of "
                f"dtype {kept.dtype}."
            )
        arr = kept.detach().to("cpu", torch.int64).numpy().copy()
    elif isinstance(kept, np.ndarray):
        if not np.issubdtype(kept.dtype, np.integer):
            raise TypeError(
                f"{name} must hold integer indices of the kept channels; got an array of "
                f"dtype {kept.dtype}."
            )
        arr = kept.astype(np.int64, copy=True)
    elif isinstance(kept, (list, tuple, range)):
        for value in kept:
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
                raise TypeError(
                    f"{name} must hold integer indices of the kept channels; got {value!r} "
                    f"({type(value).__name__})."
                )
        arr = np.asarray([int(v) for v in kept], dtype=np.int64)
    else:
        raise TypeError(
            f"{name} must be a sequence, numpy array or torch tensor of integer indices; "
            f"got {type(kept).__name__}."
        )
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(arr.shape)}.")
    if arr.size == 0:
        raise ValueError(f"{name} must keep at least one channel; got an empty selection.")
    bad = arr[(arr < 0) | (arr >= n)]
    if bad.size:
        raise ValueError(
            f"{name} must hold indices in [0, {n - 1}] (the layer has {n} channels); "
            f"got {int(bad[0])}."
        )
    arr = np.sort(arr)
    dup = arr[1:][arr[1:] == arr[:-1]]
    if dup.size:
        raise ValueError(f"{name} must hold distinct indices; got {int(dup[0])} more than once.")
    return torch.from_numpy(arr)


def _check_initialized(module: nn.Module, name: str) -> None:
    for pname, p in module.named_parameters(recurse=False):
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"{name} has an uninitialized (lazy) parameter {pname!r}; run one forward pass "
                "before surgery."
            )
    if parametrize.is_parametrized(module):
        raise UnsupportedLayerError(
            f"{name} is parametrized (e.g. weight norm or spectral norm); remove the "
            "parametrization before surgery. Supported: plain nn.Conv2d, nn.Linear, "
            "nn.BatchNorm1d/2d/3d."
        )


def _check_conv(conv: Any, name: str) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise UnsupportedLayerError(
            f"{name} must be an nn.Conv2d; got {type(conv).__name__}. Supported: {_SUPPORTED_CONV}."
        )
    if conv.groups != 1:
        raise UnsupportedLayerError(
            f"{name} is a grouped convolution (groups={conv.groups}); chanprune supports "
            f"only {_SUPPORTED_CONV}."
        )
    _check_initialized(conv, name)


def _check_bn(bn: Any, name: str) -> None:
    if not isinstance(bn, _BatchNorm):
        raise UnsupportedLayerError(
            f"{name} must be an nn.BatchNorm1d/2d/3d; got {type(bn).__name__}."
        )
    _check_initialized(bn, name)


def _check_linear(linear: Any, name: str) -> None:
    if not isinstance(linear, nn.Linear):
        raise UnsupportedLayerError(f"{name} must be an nn.Linear; got {type(linear).__name__}.")
    _check_initialized(linear, name)


def _as_tensor_like(value: Any, name: str, like: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Convert a user-given weight or bias to ``like``'s dtype and device, checking shape."""
    if isinstance(value, np.ndarray):
        if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
            raise TypeError(f"{name} must hold real numbers; got an array of dtype {value.dtype}.")
        tensor = torch.from_numpy(np.ascontiguousarray(value))
    elif isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers; got a tensor of dtype {value.dtype}.")
        tensor = value.detach()
    else:
        raise TypeError(
            f"{name} must be a numpy array or a torch tensor; got {type(value).__name__}."
        )
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(tensor.shape)}.")
    if tensor.device.type != "meta":
        check_finite(tensor, name)
    # clone: the module must never share storage with the caller's array.
    return tensor.to(device=like.device, dtype=like.dtype).clone()


def _replace_param(module: nn.Module, pname: str, data: torch.Tensor) -> None:
    old = getattr(module, pname)
    # A bias added to a bias-free layer follows the weight's requires_grad.
    requires_grad = (old if old is not None else module.weight).requires_grad
    setattr(module, pname, nn.Parameter(data.contiguous(), requires_grad=requires_grad))


def _index(t: torch.Tensor, dim: int, kept: torch.Tensor) -> torch.Tensor:
    return t.detach().index_select(dim, kept.to(t.device)).clone()


# --------------------------------------------------------------------------------------
# BatchNorm folding
# --------------------------------------------------------------------------------------
def fold_batchnorm(
    conv: Union[nn.Conv2d, nn.Linear], bn: _BatchNorm
) -> Union[nn.Conv2d, nn.Linear]:
    """Return a new layer (with bias) equal to ``bn(conv(x))`` with ``bn`` in eval mode.

    Parameters
    ----------
    conv : nn.Conv2d or nn.Linear
        Weight of shape (n, c / groups, kh, kw) or (n, c); bias of shape (n,) or None. Any
        ``groups`` (grouped and depthwise convs fold filter by filter too).
    bn : nn.BatchNorm2d (after a Conv2d) or nn.BatchNorm1d (after a Linear)
        With ``num_features == n`` and running statistics (``track_running_stats=True``).
        Its running statistics are used whatever its train/eval mode.

    Returns
    -------
    folded : nn.Conv2d or nn.Linear
        A new module of the same type (a :class:`SampledConv2d` stays one, with the same
        ``in_index``) and hyper-parameters with ``bias=True``, on the same device and dtype,
        in ``conv``'s train/eval mode. Inputs are not modified.

    Raises
    ------
    UnsupportedLayerError
        Wrong module types.
    ValueError
        ``conv``'s output width differs from ``bn.num_features``, or ``bn`` keeps no
        running statistics.

    Notes
    -----
    With ``s = gamma / sqrt(running_var + eps)`` (``gamma = 1, beta = 0`` when
    ``affine=False``)::

        W' = s[:, None, ...] * W,    b' = s * (b - running_mean) + beta

    computed in float64, then cast to the layer's dtype.
    """
    if isinstance(conv, nn.Conv2d):
        _check_initialized(conv, "conv")  # grouped convs fold the same way, per filter
        expected_bn: tuple = (nn.BatchNorm2d,)
        n_out = conv.out_channels
    elif isinstance(conv, nn.Linear):
        _check_linear(conv, "conv")
        expected_bn = (nn.BatchNorm1d,)
        n_out = conv.out_features
    else:
        raise UnsupportedLayerError(
            f"conv must be an nn.Conv2d (followed by nn.BatchNorm2d) or an nn.Linear (followed "
            f"by nn.BatchNorm1d); got {type(conv).__name__}."
        )
    if not isinstance(bn, expected_bn):
        raise UnsupportedLayerError(
            f"bn must be an {expected_bn[0].__name__} after an {type(conv).__name__}; got "
            f"{type(bn).__name__}."
        )
    _check_initialized(bn, "bn")
    if bn.num_features != n_out:
        raise ValueError(
            f"bn.num_features ({bn.num_features}) must equal the layer's output width ({n_out})."
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            "bn has no running statistics (track_running_stats=False); it cannot be folded."
        )

    weight = conv.weight.detach()
    dtype, device = weight.dtype, weight.device
    w64 = weight.to(torch.float64)
    b64 = (
        conv.bias.detach().to(torch.float64)
        if conv.bias is not None
        else torch.zeros(n_out, dtype=torch.float64, device=device)
    )
    mean = bn.running_mean.detach().to(torch.float64)
    var = bn.running_var.detach().to(torch.float64)
    if bn.affine:
        gamma = bn.weight.detach().to(torch.float64)
        beta = bn.bias.detach().to(torch.float64)
    else:
        gamma = torch.ones_like(mean)
        beta = torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    new_w = w64 * scale.reshape((-1,) + (1,) * (w64.dim() - 1))
    new_b = (b64 - mean) * scale + beta

    if isinstance(conv, nn.Conv2d):
        geometry = dict(
            stride=conv.stride, padding=conv.padding, dilation=conv.dilation, bias=True,
            padding_mode=conv.padding_mode, device=device, dtype=dtype,
        )  # fmt: skip
        if isinstance(conv, SampledConv2d):  # keeps reading the same channels of its input
            folded: nn.Module = SampledConv2d(
                conv.stream_channels, conv.out_channels, conv.kernel_size,
                in_index=conv.in_index, **geometry,
            )  # fmt: skip
        else:
            folded = nn.Conv2d(
                conv.in_channels, conv.out_channels, conv.kernel_size, groups=conv.groups,
                **geometry,
            )  # fmt: skip
    else:
        folded = nn.Linear(
            conv.in_features, conv.out_features, bias=True, device=device, dtype=dtype
        )
    requires_grad = conv.weight.requires_grad
    folded.weight = nn.Parameter(new_w.to(dtype).contiguous(), requires_grad=requires_grad)
    folded.bias = nn.Parameter(new_b.to(dtype).contiguous(), requires_grad=requires_grad)
    folded.train(conv.training)
    return folded


# --------------------------------------------------------------------------------------
# shapes of a pruned network, to shrink a fresh instance of its class
# --------------------------------------------------------------------------------------
def module_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    """The channel counts of every Conv2d, BatchNorm, Linear and per-channel PReLU of
    ``model``, by ``named_modules()`` path: what :func:`apply_shapes` needs to give a fresh
    instance of the same class the shapes of a pruned one."""
    shapes: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            shapes[name] = {
                "in_channels": module.in_channels, "out_channels": module.out_channels,
                "groups": module.groups,
            }  # fmt: skip
            if isinstance(module, SampledConv2d):  # a channel sampler replaced the conv
                shapes[name]["stream_channels"] = module.stream_channels
        elif isinstance(module, _BatchNorm):
            shapes[name] = {"num_features": module.num_features}
        elif isinstance(module, nn.Linear):
            shapes[name] = {"in_features": module.in_features, "out_features": module.out_features}
        elif isinstance(module, nn.PReLU):
            shapes[name] = {"num_parameters": module.num_parameters}
    return shapes


def apply_shapes(model: nn.Module, shapes: Mapping[str, Mapping[str, int]]) -> nn.Module:
    """Resize the layers of ``model``, in place, to ``shapes`` (from :func:`module_shapes`).

    Parameters and buffers of a resized layer get the new shapes with unspecified values:
    load the pruned ``state_dict`` afterwards.

    Raises
    ------
    ValueError
        ``shapes`` names a layer ``model`` lacks, or one of another kind: the file was not
        saved from this class.
    """
    modules = dict(model.named_modules())
    for name, shape in shapes.items():
        module = modules.get(name)
        keys = set(module_shapes(module)[""]) if module is not None and isinstance(
            module, (nn.Conv2d, _BatchNorm, nn.Linear, nn.PReLU)
        ) else None  # fmt: skip
        if keys is not None and "stream_channels" in shape and type(module) is nn.Conv2d:
            if shape["stream_channels"] != module.in_channels or shape["groups"] != 1:
                keys = None  # not the conv the sampler was inserted at
            else:  # a placeholder index: the saved state_dict holds the real one
                module = insert_channel_sampler(model, name, range(shape["in_channels"]))
                keys = set(module_shapes(module)[""])
        if keys is None or keys != set(shape):
            found = "missing" if module is None else type(module).__name__
            raise ValueError(
                f"the saved shapes name layer {name!r} ({', '.join(sorted(shape))}), which "
                f"this model does not have as such ({found}): it was saved from another class."
            )

        def resize(attr: str, size: tuple, module: nn.Module = module) -> None:
            old = getattr(module, attr)
            if old is None or tuple(old.shape) == size:
                return
            new = torch.empty(size, dtype=old.dtype, device=old.device)
            if isinstance(old, nn.Parameter):
                setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                setattr(module, attr, new)

        if isinstance(module, nn.Conv2d):
            c, n, g = shape["in_channels"], shape["out_channels"], shape["groups"]
            resize("weight", (n, c // g, *module.kernel_size))
            resize("bias", (n,))
            module.in_channels, module.out_channels, module.groups = c, n, g
        elif isinstance(module, _BatchNorm):
            k = shape["num_features"]
            for attr in ("weight", "bias", "running_mean", "running_var"):
                resize(attr, (k,))
            module.num_features = k
        elif isinstance(module, nn.Linear):
            resize("weight", (shape["out_features"], shape["in_features"]))
            resize("bias", (shape["out_features"],))
            module.in_features, module.out_features = shape["in_features"], shape["out_features"]
        else:
            resize("weight", (shape["num_parameters"],))
            module.num_parameters = shape["num_parameters"]
    return model


# --------------------------------------------------------------------------------------
# single-layer surgery (in place)
# --------------------------------------------------------------------------------------
def _set_conv_params_unchecked(
    conv: nn.Conv2d, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> None:
    _replace_param(conv, "weight", weight)
    if bias is not None:
        _replace_param(conv, "bias", bias)
    conv.out_channels, conv.in_channels = int(weight.shape[0]), int(weight.shape[1])


def set_conv_params(
    conv: nn.Conv2d, weight: ArrayLike, bias: Optional[ArrayLike] = None
) -> nn.Conv2d:
    """Install a new weight (and optionally bias) in ``conv``, in place, resizing it.

    Parameters
    ----------
    conv : nn.Conv2d
        With ``groups=1``.
    weight : ndarray or Tensor of shape (n', c', kh, kw)
        ``(kh, kw)`` must equal ``conv.kernel_size``; ``n'`` and ``c'`` become
        ``conv.out_channels`` and ``conv.in_channels``. Converted to the conv's dtype and
        device (copied: the module never shares memory with ``weight``).
    bias : ndarray or Tensor of shape (n',), optional
        The new bias. ``None`` keeps the current bias (which must then have ``n'`` entries,
        or be absent). A conv built with ``bias=False`` gains a bias when one is given.

    Returns
    -------
    conv : nn.Conv2d
        The same module, modified in place.
    """
    _check_conv(conv, "conv")
    _check_array(weight, "weight")
    shape = tuple(weight.shape)
    if len(shape) != 4 or shape[2:] != tuple(conv.kernel_size) or shape[0] < 1 or shape[1] < 1:
        raise ValueError(
            f"weight must have shape (out_channels, in_channels, {conv.kernel_size[0]}, "
            f"{conv.kernel_size[1]}) with non-zero channel counts; got {shape}."
        )
    if isinstance(conv, SampledConv2d) and shape[1] != conv.in_channels:
        raise ValueError(
            f"conv is a SampledConv2d reading {conv.in_channels} channels; a new weight must "
            f"have {conv.in_channels} input channels, got {shape[1]} (use "
            "prune_conv_in_channels or insert_channel_sampler to read fewer)."
        )
    new_w = _as_tensor_like(weight, "weight", conv.weight, shape)
    new_b = _new_bias(conv, bias, shape[0], "conv", "filters")
    _set_conv_params_unchecked(conv, new_w, new_b)
    return conv


def _check_array(value: Any, name: str) -> None:
    if not isinstance(value, (np.ndarray, torch.Tensor)):
        raise TypeError(
            f"{name} must be a numpy array or a torch tensor; got {type(value).__name__}."
        )


def _new_bias(
    module: nn.Module, bias: Optional[ArrayLike], n_out: int, name: str, rows: str
) -> Optional[torch.Tensor]:
    """The bias to install with a new weight of ``n_out`` rows: ``bias`` converted, or
    None to keep the module's own, which must then fit (or be absent)."""
    if bias is not None:
        return _as_tensor_like(bias, "bias", module.weight, (n_out,))
    if module.bias is not None and module.bias.shape[0] != n_out:
        raise ValueError(
            f"{name} has a bias of {module.bias.shape[0]} entries but the new weight has "
            f"{n_out} {rows}; pass a bias of shape ({n_out},)."
        )
    return None


def _prune_conv_in_unchecked(
    conv: nn.Conv2d, kept: torch.Tensor, weight: Optional[torch.Tensor]
) -> None:
    new_w = _index(conv.weight, 1, kept) if weight is None else weight
    _replace_param(conv, "weight", new_w)
    conv.in_channels = int(new_w.shape[1])
    if isinstance(conv, SampledConv2d):  # the sampler reads fewer channels of its input
        conv.in_index = conv.in_index.index_select(0, kept.to(conv.in_index.device))


def _check_conv_weight(weight: Any, name: str, conv: nn.Conv2d, n_in: int) -> torch.Tensor:
    shape = (conv.out_channels, n_in, *conv.kernel_size)
    return _as_tensor_like(weight, name, conv.weight, shape)


def prune_conv_in_channels(
    conv: nn.Conv2d, kept: IndexLike, weight: Optional[ArrayLike] = None
) -> nn.Conv2d:
    """Keep only the input channels ``kept`` of ``conv``, in place.

    Parameters
    ----------
    conv : nn.Conv2d
        Weight of shape (n, c, kh, kw), ``groups=1``.
    kept : sequence, ndarray or Tensor of int, shape (c',)
        Distinct indices in ``[0, c)`` of the input channels to keep.
    weight : ndarray or Tensor of shape (n, c', kh, kw), optional
        A new weight to install instead of ``conv.weight[:, kept]`` (e.g. a least-squares
        refit). The bias is left unchanged.

    Returns
    -------
    conv : nn.Conv2d
        The same module, now with ``in_channels == c'``. A :class:`SampledConv2d` reads
        fewer channels of its (unchanged) input: its ``in_index`` becomes
        ``in_index[kept]``.
    """
    _check_conv(conv, "conv")
    kept_t = _check_kept(kept, "kept", conv.in_channels)
    new_w = None if weight is None else _check_conv_weight(weight, "weight", conv, len(kept_t))
    _prune_conv_in_unchecked(conv, kept_t, new_w)
    return conv


def _prune_conv_out_unchecked(conv: nn.Conv2d, kept: torch.Tensor) -> None:
    _replace_param(conv, "weight", _index(conv.weight, 0, kept))
    if conv.bias is not None:
        _replace_param(conv, "bias", _index(conv.bias, 0, kept))
    conv.out_channels = int(kept.numel())


def prune_conv_out_channels(conv: nn.Conv2d, kept: IndexLike) -> nn.Conv2d:
    """Keep only the filters (output channels) ``kept`` of ``conv``, in place.

    Parameters
    ----------
    conv : nn.Conv2d
        Weight of shape (n, c, kh, kw), bias of shape (n,) or None, ``groups=1``.
    kept : sequence, ndarray or Tensor of int, shape (n',)
        Distinct indices in ``[0, n)`` of the filters to keep.

    Returns
    -------
    conv : nn.Conv2d
        The same module, with weight (n', c, kh, kw) and bias (n',).
    """
    _check_conv(conv, "conv")
    kept_t = _check_kept(kept, "kept", conv.out_channels)
    _prune_conv_out_unchecked(conv, kept_t)
    return conv


def prune_grouped_conv(
    conv: nn.Conv2d,
    *,
    in_kept: Optional[IndexLike] = None,
    out_kept: Optional[IndexLike] = None,
    weight: Optional[ArrayLike] = None,
) -> nn.Conv2d:
    """Keep input channels ``in_kept`` and filters ``out_kept`` of a conv with any
    ``groups``, in place, so that it stays a valid grouped conv.

    Parameters
    ----------
    conv : nn.Conv2d
        Weight of shape (n, c / g, kh, kw) with ``g = conv.groups`` (1, grouped or
        depthwise).
    in_kept, out_kept : sequence, ndarray or Tensor of int, optional
        Distinct indices of the input channels and filters to keep (None: all). A conv
        group that keeps neither input channels nor filters is removed (a depthwise conv
        loses its dropped channels so); every remaining group must keep the same number
        of input channels, and the same number of filters.
    weight : ndarray or Tensor of shape (n', c' / g', kh, kw), optional
        Installed instead of the sliced weight (e.g. a block-diagonal refit). The bias is
        sliced to ``out_kept``.

    Returns
    -------
    conv : nn.Conv2d
        The same module with ``in_channels``, ``out_channels`` and ``groups`` updated.

    Raises
    ------
    ValueError
        Unequal counts per group, or a group that keeps input channels but no filters
        (or the reverse).
    """
    if not isinstance(conv, nn.Conv2d):
        raise UnsupportedLayerError(f"conv must be an nn.Conv2d; got {type(conv).__name__}.")
    _check_initialized(conv, "conv")
    g, c, n = conv.groups, conv.in_channels, conv.out_channels
    in_t = torch.arange(c) if in_kept is None else _check_kept(in_kept, "in_kept", c)
    out_t = torch.arange(n) if out_kept is None else _check_kept(out_kept, "out_kept", n)
    c_g, n_g = c // g, n // g
    in_count = torch.bincount(in_t // c_g, minlength=g)
    out_count = torch.bincount(out_t // n_g, minlength=g)
    live = (in_count > 0) | (out_count > 0)
    if bool(((in_count > 0) != (out_count > 0)).any()):
        raise ValueError(
            "each conv group must keep both input channels and filters, or neither; got "
            f"input counts {in_count.tolist()} and filter counts {out_count.tolist()}."
        )
    if len(set(in_count[live].tolist())) != 1 or len(set(out_count[live].tolist())) != 1:
        raise ValueError(
            "every kept conv group must keep the same number of input channels and of "
            f"filters; got input counts {in_count[live].tolist()} and filter counts "
            f"{out_count[live].tolist()}."
        )
    new_groups = int(live.sum())
    if weight is None:
        local_in = in_t % c_g
        rows = []
        for j in torch.nonzero(live).flatten().tolist():
            cols = local_in[(in_t // c_g) == j]
            filters = out_t[(out_t // n_g) == j]
            rows.append(conv.weight.detach()[filters][:, cols])
        new_w = torch.cat(rows).clone()
    else:
        shape = (len(out_t), len(in_t) // new_groups, *conv.kernel_size)
        new_w = _as_tensor_like(weight, "weight", conv.weight, shape)
    _replace_param(conv, "weight", new_w)
    if conv.bias is not None:
        _replace_param(conv, "bias", _index(conv.bias, 0, out_t))
    conv.in_channels, conv.out_channels, conv.groups = len(in_t), len(out_t), new_groups
    return conv


def _prune_bn_unchecked(bn: _BatchNorm, kept: torch.Tensor) -> None:
    if bn.affine:
        _replace_param(bn, "weight", _index(bn.weight, 0, kept))
        _replace_param(bn, "bias", _index(bn.bias, 0, kept))
    if bn.running_mean is not None:
        bn.running_mean = _index(bn.running_mean, 0, kept)
    if bn.running_var is not None:
        bn.running_var = _index(bn.running_var, 0, kept)
    bn.num_features = int(kept.numel())


def prune_batchnorm(bn: _BatchNorm, kept: IndexLike) -> _BatchNorm:
    """Keep only the channels ``kept`` of a BatchNorm layer, in place.

    Parameters
    ----------
    bn : nn.BatchNorm1d, nn.BatchNorm2d or nn.BatchNorm3d
        ``weight``, ``bias`` (when affine), ``running_mean`` and ``running_var`` (when
        tracked) of shape (c,). ``num_batches_tracked`` is left unchanged.
    kept : sequence, ndarray or Tensor of int, shape (c',)
        Distinct indices in ``[0, c)``.

    Returns
    -------
    bn : BatchNorm
        The same module, with ``num_features == c'``.
    """
    _check_bn(bn, "bn")
    kept_t = _check_kept(kept, "kept", bn.num_features)
    _prune_bn_unchecked(bn, kept_t)
    return bn


def set_batchnorm_identity(bn: _BatchNorm) -> _BatchNorm:
    """Make an eval-mode BatchNorm the identity, in place.

    Used after a BN has been folded into the conv before it (the refit weights are in
    folded form): ``running_mean = 0``, ``running_var = 1 - eps``, ``weight = 1``,
    ``bias = 0``, so ``(x - 0) / sqrt(1 - eps + eps) * 1 + 0 == x``. The module stays, so
    the architecture (and its state_dict keys) is unchanged.
    """
    _check_bn(bn, "bn")
    with torch.no_grad():
        if bn.track_running_stats and bn.running_mean is not None:
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
        else:
            raise UnsupportedLayerError(
                "set_batchnorm_identity needs a BatchNorm that tracks running statistics."
            )
        if bn.affine:
            bn.weight.fill_(1.0)
            bn.bias.zero_()
    return bn


def _feature_index(kept_channels: torch.Tensor, spatial_size: int) -> torch.Tensor:
    offsets = torch.arange(spatial_size, dtype=torch.int64)
    return (kept_channels[:, None] * spatial_size + offsets[None, :]).reshape(-1)


def _check_spatial_size(linear: nn.Linear, spatial_size: Any, name: str) -> tuple[int, int]:
    spatial_size = check_int_in_range(spatial_size, "spatial_size", 1)
    if linear.in_features % spatial_size:
        raise ValueError(
            f"{name}.in_features ({linear.in_features}) must be a multiple of spatial_size "
            f"({spatial_size}); got remainder {linear.in_features % spatial_size}."
        )
    return spatial_size, linear.in_features // spatial_size


def _prune_linear_in_unchecked(
    linear: nn.Linear, kept_channels: torch.Tensor, spatial_size: int
) -> None:
    features = _feature_index(kept_channels, spatial_size)
    _replace_param(linear, "weight", _index(linear.weight, 1, features))
    linear.in_features = int(features.numel())


def prune_linear_in_features(
    linear: nn.Linear, kept_channels: IndexLike, spatial_size: int = 1
) -> nn.Linear:
    """Keep the input features of ``linear`` that belong to channels ``kept_channels``.

    For the linear layer after ``flatten`` of a (C, H, W) map: flatten is channel-major,
    so channel ``c`` owns the ``spatial_size = H * W`` consecutive features
    ``[c * spatial_size, (c + 1) * spatial_size)``. In place.

    Parameters
    ----------
    linear : nn.Linear
        Weight of shape (out, C * spatial_size).
    kept_channels : sequence, ndarray or Tensor of int, shape (C',)
        Distinct indices in ``[0, C)`` of the channels to keep.
    spatial_size : int, default=1
        ``H * W`` of the flattened map; ``in_features`` must be a multiple of it.

    Returns
    -------
    linear : nn.Linear
        The same module, with weight (out, C' * spatial_size); the bias is unchanged.
    """
    _check_linear(linear, "linear")
    spatial_size, n_channels = _check_spatial_size(linear, spatial_size, "linear")
    kept_t = _check_kept(kept_channels, "kept_channels", n_channels)
    _prune_linear_in_unchecked(linear, kept_t, spatial_size)
    return linear


def prune_linear_out_features(linear: nn.Linear, kept: IndexLike) -> nn.Linear:
    """Keep only the output features ``kept`` of ``linear`` (weight rows and bias), in place.

    Parameters
    ----------
    linear : nn.Linear
        Weight of shape (out, in), bias of shape (out,) or None.
    kept : sequence, ndarray or Tensor of int, shape (out',)
        Distinct indices in ``[0, out)``.

    Returns
    -------
    linear : nn.Linear
        The same module, with weight (out', in) and bias (out',).
    """
    _check_linear(linear, "linear")
    kept_t = _check_kept(kept, "kept", linear.out_features)
    _replace_param(linear, "weight", _index(linear.weight, 0, kept_t))
    if linear.bias is not None:
        _replace_param(linear, "bias", _index(linear.bias, 0, kept_t))
    linear.out_features = int(kept_t.numel())
    return linear


def set_linear_params(
    linear: nn.Linear, weight: ArrayLike, bias: Optional[ArrayLike] = None
) -> nn.Linear:
    """Install a new weight (and optionally bias) in ``linear``, in place, resizing it.

    Parameters
    ----------
    linear : nn.Linear
    weight : ndarray or Tensor of shape (out', in')
        ``out'`` and ``in'`` become ``linear.out_features`` and ``linear.in_features``.
        Converted to the layer's dtype and device (copied).
    bias : ndarray or Tensor of shape (out',), optional
        The new bias. ``None`` keeps the current bias (which must then have ``out'``
        entries, or be absent). A layer built with ``bias=False`` gains a bias when one is
        given.

    Returns
    -------
    linear : nn.Linear
        The same module, modified in place.
    """
    _check_linear(linear, "linear")
    _check_array(weight, "weight")
    shape = tuple(weight.shape)
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(
            f"weight must have shape (out_features, in_features), both non-zero; got {shape}."
        )
    new_w = _as_tensor_like(weight, "weight", linear.weight, shape)
    new_b = _new_bias(linear, bias, shape[0], "linear", "rows")
    if new_b is not None:
        _replace_param(linear, "bias", new_b)
    _replace_param(linear, "weight", new_w)
    linear.out_features, linear.in_features = shape
    return linear


# --------------------------------------------------------------------------------------
# channel sampler
# --------------------------------------------------------------------------------------
def _check_in_index_state(value: Any, key: str, n: int, k: int) -> None:
    """Validate an ``in_index`` read from a state_dict: it must already be exactly what
    the module keeps (k sorted distinct indices in ``[0, n)``), since the weight's input
    channels follow its order."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{key} must be a tensor; got {type(value).__name__}.")
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise TypeError(f"{key} must hold integer channel indices; got dtype {value.dtype}.")
    if value.dim() != 1 or value.numel() != k:
        raise ValueError(
            f"{key} must have shape ({k},) (the conv's in_channels); got {tuple(value.shape)}."
        )
    idx = value.detach().to("cpu", torch.int64)
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.numel():
        raise ValueError(
            f"{key} must hold indices in [0, {n - 1}] (the input has {n} channels); "
            f"got {int(bad[0])}."
        )
    if k > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError(
            f"{key} must be strictly increasing (sorted, distinct); got {idx.tolist()}."
        )


class SampledConv2d(nn.Conv2d):
    """A conv that reads only some channels of its input: ``conv(x[:, in_index])``.

    The channel sampler of He et al. (2017, Sec. 4.2). The first conv of a residual branch
    reads the residual stream, which the shortcut carries on whole, so the stream cannot
    lose channels; the sampler lets that conv alone read fewer of them. To everything that
    inspects convs (MAC counting, the planners, the surgery functions) it is an ordinary
    ``nn.Conv2d`` with ``in_channels = len(in_index)``; only its forward selects first.

    Parameters
    ----------
    stream_channels : int
        Channels ``C`` of the input ``x`` (the stream), >= 1.
    out_channels : int
    kernel_size : int or (int, int)
    in_index : sequence, ndarray or Tensor of int, shape (k,)
        Distinct indices in ``[0, C)`` of the channels read (sorted if not already);
        ``in_channels`` becomes ``k``. Keyword-only.
    stride, padding, dilation, bias, padding_mode, device, dtype
        As in ``nn.Conv2d`` (``groups`` is always 1).

    Attributes
    ----------
    in_index : Tensor of int64, shape (k,)
        Persistent buffer: in the state_dict as ``<name>.in_index`` (next to the usual
        ``weight`` and ``bias``), moved by ``.to(device)``. A state_dict loaded into the
        module must hold k sorted, distinct indices in ``[0, C)``.
    stream_channels : int

    Examples
    --------
    >>> conv = SampledConv2d(8, 4, 3, in_index=[1, 5, 6], padding=1)
    >>> conv
    SampledConv2d(3, 4, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), sampled=3 of 8)
    >>> conv(torch.zeros(2, 8, 5, 5)).shape
    torch.Size([2, 4, 5, 5])
    """

    def __init__(
        self,
        stream_channels: int,
        out_channels: int,
        kernel_size: Union[int, tuple[int, int]],
        *,
        in_index: IndexLike,
        stride: Union[int, tuple[int, int]] = 1,
        padding: Union[int, tuple[int, int], str] = 0,
        dilation: Union[int, tuple[int, int]] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        stream_channels = check_int_in_range(stream_channels, "stream_channels", 1)
        index = _check_kept(in_index, "in_index", stream_channels)
        super().__init__(
            len(index), out_channels, kernel_size, stride=stride, padding=padding,
            dilation=dilation, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype,
        )  # fmt: skip
        self.stream_channels = stream_channels
        self.register_buffer("in_index", index.to(device=self.weight.device))

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        """The channels the conv reads: (B, C, H, W) -> (B, k, H, W)."""
        if x.dim() != 4 or x.shape[1] != self.stream_channels:
            raise ValueError(
                f"SampledConv2d expects inputs of shape (B, {self.stream_channels}, H, W); "
                f"got {tuple(x.shape)}."
            )
        return x.index_select(1, self.in_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, out_channels, H', W')."""
        return super().forward(self.sample(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sampled={self.in_channels} of {self.stream_channels}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "in_index"
        if key in state_dict:  # a missing key is reported by load_state_dict itself
            _check_in_index_state(state_dict[key], key, self.stream_channels, self.in_channels)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _resolve_child(module: Any, name: Any) -> tuple[nn.Module, str, nn.Module]:
    """``(parent, attribute, child)`` for the dotted path ``name`` under ``module``."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module; got {type(module).__name__}.")
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str (a named_modules() path); got {name!r}.")
    parent_path, _, attr = name.rpartition(".")
    try:
        parent = module.get_submodule(parent_path) if parent_path else module
        child = parent.get_submodule(attr)
    except AttributeError as exc:
        raise ValueError(f"{type(module).__name__} has no submodule {name!r}.") from exc
    return parent, attr, child


def insert_channel_sampler(
    module: nn.Module, name: str, kept: IndexLike, weight: Optional[ArrayLike] = None
) -> SampledConv2d:
    """Make the conv at ``module.<name>`` read only its input channels ``kept``, in place.

    Unlike :func:`prune_conv_in_channels`, the conv's input itself stays whole (nothing
    upstream is cut): a plain ``nn.Conv2d`` is replaced by a :class:`SampledConv2d` that
    selects ``kept`` from its input, with the same hyper-parameters, dtype, device,
    ``requires_grad`` and train/eval mode, its bias, and ``weight[:, kept]``. A conv that is
    already a :class:`SampledConv2d` keeps its class: ``kept`` indexes its current (sampled)
    inputs, so its ``in_index`` becomes ``in_index[kept]``.

    Parameters
    ----------
    module : nn.Module
        The model or block that holds the conv.
    name : str
        ``named_modules()`` path of the conv under ``module``, e.g. ``"conv1"`` of a block or
        ``"layer1.0.conv1"`` of a ResNet.
    kept : sequence, ndarray or Tensor of int, shape (c',)
        Distinct indices in ``[0, c)`` of the input channels to read, ``c`` the conv's
        ``in_channels``.
    weight : ndarray or Tensor of shape (n, c', kh, kw), optional
        A weight to install instead of ``weight[:, kept]`` (e.g. a least-squares refit).

    Returns
    -------
    conv : SampledConv2d
        The conv now at ``module.<name>``. Hooks registered on a replaced conv are not
        carried over, and an optimizer must be built afterwards (new Parameters).

    Raises
    ------
    TypeError, ValueError
        ``module`` is not a module, ``name`` names no submodule, bad ``kept`` or ``weight``.
    UnsupportedLayerError
        The submodule is not a plain ``nn.Conv2d`` with ``groups=1``.

    Examples
    --------
    >>> block = nn.Sequential(nn.Conv2d(8, 4, 1))
    >>> insert_channel_sampler(block, "0", [0, 3, 5])
    SampledConv2d(3, 4, kernel_size=(1, 1), stride=(1, 1), sampled=3 of 8)
    >>> block(torch.zeros(1, 8, 2, 2)).shape
    torch.Size([1, 4, 2, 2])
    """
    parent, attr, conv = _resolve_child(module, name)
    _check_conv(conv, name)
    kept_t = _check_kept(kept, "kept", conv.in_channels)
    new_w = None if weight is None else _check_conv_weight(weight, "weight", conv, len(kept_t))
    if isinstance(conv, SampledConv2d):
        _prune_conv_in_unchecked(conv, kept_t, new_w)
        return conv
    # Built on the meta device: its parameters are replaced below, so nothing is allocated
    # or initialised for nothing.
    sampled = SampledConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, in_index=kept_t,
        stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
        bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta",
        dtype=conv.weight.dtype,
    )  # fmt: skip
    w = _index(conv.weight, 1, kept_t) if new_w is None else new_w
    sampled.weight = nn.Parameter(w.contiguous(), requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        b = conv.bias.detach().clone()
        sampled.bias = nn.Parameter(b, requires_grad=conv.bias.requires_grad)
    sampled.in_index = kept_t.to(conv.weight.device)
    sampled.train(conv.training)
    setattr(parent, attr, sampled)
    logger.debug("%s reads %d of its %d input channels", name, len(kept_t), conv.in_channels)
    return sampled


# --------------------------------------------------------------------------------------
# pattern helpers (in place)
# --------------------------------------------------------------------------------------
def _check_prev_and_bn(
    conv: Any, conv_name: str, bn: Any, bn_name: str, n_next: int, next_desc: str
) -> int:
    """Check ``conv -> [bn]`` and that the next layer consumes ``conv``'s output width."""
    _check_conv(conv, conv_name)
    n = conv.out_channels
    if bn is not None:
        _check_bn(bn, bn_name)
        if bn.num_features != n:
            raise ValueError(
                f"{bn_name}.num_features ({bn.num_features}) must equal "
                f"{conv_name}.out_channels ({n})."
            )
    if n_next != n:
        raise ValueError(f"{next_desc} is {n_next} but {conv_name}.out_channels is {n}.")
    return n


def prune_conv_bn_conv(
    conv_prev: nn.Conv2d,
    bn_prev: Optional[_BatchNorm],
    conv_next: nn.Conv2d,
    kept: IndexLike,
    next_weight: Optional[ArrayLike] = None,
    next_bias: Optional[ArrayLike] = None,
) -> None:
    """Prune the channels between ``conv_prev -> [bn_prev] -> (act/pool) -> conv_next``.

    Keeps filters ``kept`` of ``conv_prev`` (and the same channels of ``bn_prev``) and input
    channels ``kept`` of ``conv_next``; optionally installs a refit weight and bias in
    ``conv_next``. Everything is validated before anything is modified. In place.

    Parameters
    ----------
    conv_prev : nn.Conv2d
        Weight (c, c_prev, kh, kw), ``groups=1``.
    bn_prev : BatchNorm or None
        ``num_features == c``; ``None`` when there is no BatchNorm.
    conv_next : nn.Conv2d
        Weight (n, c, kh2, kw2), ``groups=1``.
    kept : sequence, ndarray or Tensor of int, shape (c',)
        Distinct indices in ``[0, c)`` of the channels to keep.
    next_weight : ndarray or Tensor of shape (n, c', kh2, kw2), optional
        Weight to install in ``conv_next`` instead of ``conv_next.weight[:, kept]``.
    next_bias : ndarray or Tensor of shape (n,), optional
        Bias to install in ``conv_next`` (the full new bias, not an increment); added when
        ``conv_next`` had none.
    """
    _check_conv(conv_next, "conv_next")
    n_channels = _check_prev_and_bn(
        conv_prev, "conv_prev", bn_prev, "bn_prev", conv_next.in_channels, "conv_next.in_channels"
    )
    kept_t = _check_kept(kept, "kept", n_channels)
    new_w = None
    if next_weight is not None:
        new_w = _check_conv_weight(next_weight, "next_weight", conv_next, len(kept_t))
    new_b = None
    if next_bias is not None:
        new_b = _as_tensor_like(next_bias, "next_bias", conv_next.weight, (conv_next.out_channels,))

    _prune_conv_out_unchecked(conv_prev, kept_t)
    if bn_prev is not None:
        _prune_bn_unchecked(bn_prev, kept_t)
    _prune_conv_in_unchecked(conv_next, kept_t, new_w)
    if new_b is not None:
        _replace_param(conv_next, "bias", new_b)
    logger.debug("pruned conv-bn-conv to %d of %d channels", len(kept_t), n_channels)


def prune_conv_bn_flatten_linear(
    conv: nn.Conv2d,
    bn: Optional[_BatchNorm],
    linear: nn.Linear,
    kept: IndexLike,
    spatial_size: int,
) -> None:
    """Prune the channels between ``conv -> [bn] -> (act/pool) -> flatten -> linear``.

    Keeps filters ``kept`` of ``conv`` (and of ``bn``) and the ``kept`` channels' input
    features of ``linear`` (see :func:`prune_linear_in_features`). Everything is
    validated before anything is modified. In place.

    Parameters
    ----------
    conv : nn.Conv2d
        Weight (c, c_prev, kh, kw), ``groups=1``.
    bn : BatchNorm or None
        ``num_features == c``.
    linear : nn.Linear
        Weight (out, c * spatial_size).
    kept : sequence, ndarray or Tensor of int, shape (c',)
        Distinct indices in ``[0, c)`` of the channels to keep.
    spatial_size : int
        ``H * W`` of the map that is flattened (after any pooling).
    """
    _check_linear(linear, "linear")
    spatial_size, n_lin_channels = _check_spatial_size(linear, spatial_size, "linear")
    n_channels = _check_prev_and_bn(
        conv, "conv", bn, "bn", n_lin_channels, "linear.in_features / spatial_size"
    )
    kept_t = _check_kept(kept, "kept", n_channels)

    _prune_conv_out_unchecked(conv, kept_t)
    if bn is not None:
        _prune_bn_unchecked(bn, kept_t)
    _prune_linear_in_unchecked(linear, kept_t, spatial_size)
    logger.debug("pruned conv-bn-flatten-linear to %d of %d channels", len(kept_t), n_channels)
