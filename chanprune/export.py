"""Export a (pruned) model to ONNX, checked against PyTorch with ONNX Runtime.

A pruned chanprune model is an ordinary PyTorch module with smaller layers, so it exports
like any other; the one layer of its own, :class:`~chanprune.surgery.SampledConv2d` (the
channel sampler of a ResNet pruned with ``channel_sampler=True``), selects its input
channels with ``index_select`` on a constant index, which becomes an ONNX ``Gather``.

Needs the optional packages of the ``export`` extra, ``onnx`` (the exporter writes the
file with it) and ``onnxruntime`` (for the check)::

    pip install "chanprune[export]"

Examples
--------
>>> from chanprune.export import export_onnx
>>> from chanprune.models import vgg_digits
>>> result = export_onnx(vgg_digits(), "digits.onnx", (1, 8, 8))  # doctest: +SKIP
>>> result.path, result.opset, result.input_shape  # doctest: +SKIP
(PosixPath('digits.onnx'), 17, (1, 8, 8))
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from ._validation import check_int_in_range, check_real_in_range
from .flops import _check_input_shape, _device_and_dtype
from .io import atomic_write

__all__ = ["export_onnx", "OnnxExport", "EXPORT_EXTRA_HINT"]

logger = logging.getLogger(__name__)

#: How to install what :func:`export_onnx` needs, quoted in its ``ImportError``.
EXPORT_EXTRA_HINT = 'pip install "chanprune[export]"'

#: The lowest opset the TorchScript-based exporter writes.
MIN_OPSET = 7
#: The highest opset the TorchScript-based exporter of torch 2.x writes (its own constant
#: where torch has one).
MAX_OPSET = 20

# The batch sizes of the export trace and of the check: different, so that a batch size
# traced into the graph as a constant fails the check instead of passing it.
_TRACE_BATCH = 2
_CHECK_BATCH = 3


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote, and how well ONNX Runtime reproduced PyTorch.

    Attributes
    ----------
    path : pathlib.Path
        The ONNX file.
    opset : int
        The ONNX opset of the file.
    dynamic_batch : bool
        Whether the batch axis of ``input`` and ``output`` is symbolic (``"batch"``);
        otherwise it is fixed to 1.
    input_shape : tuple of int
        The shape of one input without the batch dimension, e.g. ``(3, 32, 32)``.
    max_abs_diff : float or None
        ``max |ORT - PyTorch|`` over the check batch; None when not checked.
    scale : float or None
        ``max |PyTorch output|`` over the check batch (1.0 if it is 0), the unit of
        ``atol``; None when not checked.
    """

    path: Path
    opset: int
    dynamic_batch: bool
    input_shape: tuple[int, ...]
    max_abs_diff: Optional[float] = None
    scale: Optional[float] = None


def _import(name: str, purpose: str) -> Any:
    """Import an optional package, or raise an ``ImportError`` naming the extra."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(
            f"chanprune.export needs the optional package {name!r} {purpose}; install the "
            f"'export' extra: {EXPORT_EXTRA_HINT}."
        ) from exc


def _max_opset() -> int:
    try:
        from torch.onnx import _constants

        return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", MAX_OPSET))
    except (ImportError, TypeError, ValueError):  # pragma: no cover - other torch versions
        return MAX_OPSET


def _check_path(path: Any) -> Path:
    """A file that can be written: a str or PathLike, not a folder, in an existing folder."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"The 'path' parameter must be a str or os.PathLike; got {type(path).__name__}."
        )
    p = Path(path)
    if str(path) == "" or p.is_dir():
        raise ValueError(
            f"Cannot write the ONNX file to '{p}': it is a directory; give a file path."
        )
    if not p.parent.is_dir():
        raise ValueError(
            f"Cannot write the ONNX file to '{p}': the folder '{p.parent}' does not exist."
        )
    return p


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _single_output(output: Any) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise ValueError(
            "export_onnx exports models with one output tensor (named 'output'); the model "
            f"returned a {type(output).__name__}."
        )
    return output


def _export_kwargs(opset: int, dynamic_batch: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        input_names=["input"],
        output_names=["output"],
        opset_version=opset,
        do_constant_folding=True,
    )
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    # torch >= 2.5 has the torch.export-based exporter (the default from 2.9), which needs
    # the onnxscript package; the TorchScript-based one needs only onnx.
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    return kwargs


def _compare(
    ort_out: np.ndarray, ref: np.ndarray, atol: float, rtol: float
) -> tuple[float, float, bool]:
    """(max |ort - ref|, scale, within tolerance) with the rule of :func:`export_onnx`."""
    ref64 = ref.astype(np.float64)
    diff = np.abs(ort_out.astype(np.float64) - ref64)
    top = float(np.max(np.abs(ref64))) if ref64.size else 0.0
    scale = top if top > 0 else 1.0
    finite = bool(np.all(np.isfinite(diff)))
    ok = finite and bool(np.all(diff <= atol * scale + rtol * np.abs(ref64)))
    return (float(np.max(diff)) if diff.size else 0.0), scale, ok


def export_onnx(
    model: nn.Module,
    path: Union[str, os.PathLike],
    input_shape: Sequence[int],
    *,
    opset: int = 17,
    dynamic_batch: bool = True,
    check: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> OnnxExport:
    """Write ``model`` as an ONNX file, atomically, and check it with ONNX Runtime.

    The model is traced in eval mode on a random input of shape ``(2, *input_shape)``
    (batch 1 when ``dynamic_batch`` is false) by PyTorch's TorchScript-based exporter
    (``torch.onnx.export(..., dynamo=False)``): it needs only the ``onnx`` package,
    whereas the ``torch.export``-based exporter, torch's default since 2.9, also needs
    ``onnxscript``. BatchNorm after a conv is folded into the conv by the exporter. The
    graph has one input named ``"input"``, of shape ``(batch, *input_shape)`` and the
    model's dtype, and one output named ``"output"``, ``batch`` symbolic when
    ``dynamic_batch`` is true. A :class:`~chanprune.surgery.SampledConv2d` exports as a
    ``Gather`` of its channels followed by the ``Conv``.

    The file is written to a temporary file in the folder of ``path`` and renamed over
    ``path`` only when the export and the check have succeeded (with
    :func:`chanprune.io.atomic_write`): on any failure no file, partial or temporary, is
    left and an existing ``path`` is untouched.

    **The check** (``check=True``): ``onnx.checker`` validates the file, then ONNX
    Runtime's CPU provider runs it on a random normal input of shape
    ``(3, *input_shape)`` (a batch other than the traced one when ``dynamic_batch``, so a
    batch size frozen into the graph fails; 1 otherwise) and its output ``y_ort`` is
    compared with PyTorch's ``y`` on the same input. It passes when, element-wise,

        ``|y_ort - y| <= atol * scale + rtol * |y|``,   ``scale = max |y|`` (1 if 0).

    The defaults (``atol = rtol = 1e-4``) suit float32: they leave room for the
    rounding differences of the two runtimes' convolution algorithms (a few float32
    ulps of the output scale, accumulated over the depth of the network), while a wrongly
    exported channel or a frozen batch size gives differences of the order of the scale
    (the largest difference measured is returned). ONNX Runtime's CPU provider has no
    float64 convolution, so check a float64 model after ``model.float()``, or pass
    ``check=False``.

    Parameters
    ----------
    model : nn.Module
        Maps ``(B, *input_shape)`` to one tensor ``(B, ...)`` (e.g. scores
        ``(B, n_classes)``), e.g. the output of :func:`chanprune.prune_model` or
        :func:`chanprune.load`. Not modified: its weights are untouched and the
        train/eval mode of every submodule is restored. Exported on its own device.
    path : str or os.PathLike
        Destination file (conventionally ``*.onnx``); overwritten if present. Its folder
        must exist.
    input_shape : sequence of int
        Shape of one input without the batch dimension, e.g. ``(3, 32, 32)``.
    opset : int, default=17
        ONNX opset version, in ``[7, 20]`` (the TorchScript exporter's range).
    dynamic_batch : bool, default=True
        Make the batch axis of input and output symbolic; false: fixed to 1.
    check : bool, default=True
        Validate the file and compare ONNX Runtime with PyTorch (needs ``onnxruntime``).
    atol : float >= 0, default=1e-4
        Absolute tolerance of the check, in units of the output scale ``max |y|``.
    rtol : float >= 0, default=1e-4
        Relative tolerance of the check, element-wise.

    Returns
    -------
    result : OnnxExport
        The path, opset and, when checked, the largest difference and the output scale.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module``, ``path`` is not a str or PathLike, or
        ``input_shape`` is not a sequence of ints.
    ValueError
        If ``path`` is a directory or its folder does not exist; if ``input_shape`` has a
        non-positive entry or the model does not accept inputs of that shape; if the model
        returns anything but one tensor; if ``opset``, ``atol`` or ``rtol`` is out of
        range; if ``torch.onnx`` cannot export the model (an unsupported operator, say:
        the message quotes the exporter); if ONNX Runtime cannot run the file; or if its
        output differs from PyTorch's beyond the tolerance (the message gives the
        largest difference and the allowed one). No file is written in any of these cases.
    ImportError
        If ``onnx`` (always) or ``onnxruntime`` (with ``check=True``) is not installed;
        the message names the ``export`` extra.
    OSError
        If writing fails (a full disk); the error names ``path``.

    Examples
    --------
    >>> import chanprune
    >>> from chanprune.export import export_onnx
    >>> model = chanprune.load("pruned.pt")  # doctest: +SKIP
    >>> result = export_onnx(model, "pruned.onnx", (3, 32, 32))  # doctest: +SKIP
    >>> result.max_abs_diff <= 1e-4 * result.scale  # doctest: +SKIP
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"The 'model' parameter must be an nn.Module; got {type(model).__name__}.")
    dest = _check_path(path)
    shape = _check_input_shape(input_shape)
    opset = check_int_in_range(opset, "opset", MIN_OPSET, _max_opset())
    if not isinstance(dynamic_batch, (bool, np.bool_)):
        raise TypeError(f"The 'dynamic_batch' parameter must be a bool; got {dynamic_batch!r}.")
    if not isinstance(check, (bool, np.bool_)):
        raise TypeError(f"The 'check' parameter must be a bool; got {check!r}.")
    atol = check_real_in_range(atol, "atol", 0.0)
    rtol = check_real_in_range(rtol, "rtol", 0.0)
    if not (math.isfinite(atol) and math.isfinite(rtol)):
        raise ValueError(f"The 'atol' and 'rtol' parameters must be finite; got {atol}, {rtol}.")
    dynamic_batch, check = bool(dynamic_batch), bool(check)
    _import("onnx", "(torch.onnx's exporter writes the file with it)")
    ort = (
        _import("onnxruntime", "to check the exported file (or pass check=False)")
        if check
        else None
    )

    device, dtype = _device_and_dtype(model)
    generator = torch.Generator().manual_seed(0)
    trace_batch = _TRACE_BATCH if dynamic_batch else 1
    check_batch = _CHECK_BATCH if dynamic_batch else 1
    x_trace = torch.randn((trace_batch, *shape), generator=generator, dtype=dtype).to(device)
    x_check = torch.randn((check_batch, *shape), generator=generator, dtype=dtype).to(device)

    modes = [(m, m.training) for m in model.modules()]
    result: dict[str, Any] = {}
    try:
        model.eval()
        with torch.inference_mode():
            try:
                reference = _single_output(model(x_check))
            except RuntimeError as exc:
                raise ValueError(
                    f"The model does not accept inputs of shape {(check_batch, *shape)} "
                    f"(input_shape={shape}): {_first_line(exc)}"
                ) from exc
            reference = reference.detach().to("cpu").numpy()

        def write(tmp: Path) -> None:
            _export(model, x_trace, tmp, opset, dynamic_batch)
            if check:
                result.update(_check_file(ort, tmp, x_check, reference, atol, rtol))

        atomic_write(dest, write)
    finally:
        for module, training in modes:
            module.training = training
    out = OnnxExport(dest, opset, dynamic_batch, shape, **result)
    if check:
        logger.info(
            "Exported %s to '%s' (opset %d); ONNX Runtime matches PyTorch: max |diff| %.3g "
            "(output scale %.3g).",
            type(model).__name__, dest, opset, out.max_abs_diff, out.scale,
        )  # fmt: skip
    else:
        logger.info("Exported %s to '%s' (opset %d), unchecked.", type(model).__name__, dest, opset)
    return out


def _export(model: nn.Module, x: torch.Tensor, tmp: Path, opset: int, dynamic_batch: bool) -> None:
    """``torch.onnx.export`` to ``tmp``; its failures (but I/O errors) as ``ValueError``."""
    with warnings.catch_warnings():
        # Expected here, and not the caller's to act on: the notices that the TorchScript
        # exporter is the legacy one (chosen on purpose, see export_onnx), the tracer's
        # note on SampledConv2d's shape check (constant for the traced channel count, which
        # is fixed), and the constant folder declining strided slices (ShortcutA).
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"chanprune\.")
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", module="torch")
        try:
            torch.onnx.export(model, (x,), str(tmp), **_export_kwargs(opset, dynamic_batch))
        except OSError:
            raise
        except Exception as exc:
            raise ValueError(
                f"torch.onnx could not export the {type(model).__name__} (opset {opset}): "
                f"{_first_line(exc)}"
            ) from exc


def _check_file(
    ort: Any,
    tmp: Path,
    x: torch.Tensor,
    reference: np.ndarray,
    atol: float,
    rtol: float,
) -> dict[str, float]:
    """Validate ``tmp`` with onnx.checker, run it with ONNX Runtime on ``x`` and compare
    with ``reference``; a ``ValueError`` if anything fails."""
    import onnx

    try:
        onnx.checker.check_model(str(tmp), full_check=True)
    except Exception as exc:  # onnx.checker.ValidationError and shape-inference errors
        raise ValueError(f"The exported ONNX graph is not valid: {_first_line(exc)}") from exc
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        session = ort.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])
        (out,) = session.run(["output"], {"input": x.detach().to("cpu").numpy()})
    except Exception as exc:  # onnxruntime's errors are its own classes
        hint = ""
        if x.dtype == torch.float64:
            hint = (
                " ONNX Runtime's CPU provider has no float64 convolution: check a float32 "
                "model (model.float()) or pass check=False."
            )
        raise ValueError(
            f"ONNX Runtime could not run the exported model: {_first_line(exc)}.{hint}"
        ) from exc
    if out.shape != reference.shape:
        raise ValueError(
            f"ONNX Runtime's output has shape {out.shape}, PyTorch's {reference.shape}, for "
            f"an input of shape {tuple(x.shape)}."
        )
    max_diff, scale, ok = _compare(out, reference, atol, rtol)
    if not ok:
        raise ValueError(
            f"ONNX Runtime's output differs from PyTorch's: max |diff| {max_diff:.3g} on an "
            f"input of shape {tuple(x.shape)}, allowed {atol:g} * {scale:.3g} (output scale) "
            f"+ {rtol:g} * |output|; the ONNX file was not written."
        )
    return {"max_abs_diff": max_diff, "scale": scale}
