"""Reading checkpoint files and loading state_dicts into models, with clear errors.

A checkpoint is read with ``torch.load(path, map_location="cpu", weights_only=True)``, so no
pickled code is ever executed. Three layouts are accepted: a plain state_dict, a dict with a
``"state_dict"`` entry (the akamaster CIFAR ResNets, chanprune's own pruned-model files), and
either of those with every key prefixed ``module.`` (``nn.DataParallel``).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

__all__ = ["load_state_dict_file", "normalize_state_dict", "load_weights", "read_checkpoint"]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: How many offending keys an error message lists per category.
_N_SHOWN = 5


def _check_path(path: Any, name: str = "path") -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"The {name!r} parameter must be a str or os.PathLike; got {type(path).__name__}."
        )
    return Path(path)


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """``text`` without terminal escape codes (torch's messages embolden some words)."""
    return _ANSI_ESCAPE.sub("", text)


def first_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s message, terminal escape codes removed."""
    lines = [line.strip() for line in strip_ansi(str(exc)).splitlines()]
    return next((line for line in lines if line), type(exc).__name__)


def _refused_global(exc: BaseException) -> str:
    """What torch's weights-only unpickler refused, from its multi-paragraph message: the
    sentence after "WeightsUnpickler error:", else the first line."""
    marker = "WeightsUnpickler error:"
    for line in strip_ansi(str(exc)).splitlines():
        line = line.strip()
        if line.startswith(marker):
            return line[len(marker) :].strip().split(". ")[0].rstrip(".")
    return first_line(exc)


def read_checkpoint(path: PathLike) -> Any:
    """Read a checkpoint file safely, on the CPU, without executing pickled code.

    Parameters
    ----------
    path : str or os.PathLike
        The file to read. It is opened read-only and never modified.

    Returns
    -------
    object
        Whatever ``torch.load(path, map_location="cpu", weights_only=True)`` returns.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If ``path`` is not a regular file, or cannot be parsed as a checkpoint (corrupt,
        truncated, not a torch file, or holds objects other than tensors and plain containers).
    """
    p = _check_path(path)
    if not p.exists():
        raise FileNotFoundError(f"Checkpoint file not found: '{p}'.")
    if not p.is_file():
        raise ValueError(f"Checkpoint path '{p}' is not a regular file.")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except OSError:
        # Permission and I/O errors are already explicit and name the file.
        raise
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"Could not read checkpoint '{p}': it holds pickled Python objects "
            f"({_refused_global(exc)}), which chanprune does not unpickle since that could "
            "run code. For a model saved whole with torch.save(model, path), from a source "
            "you trust: torch.load(path, weights_only=False), then save its state_dict() "
            "(or chanprune.save(model, new_path) for a chanprune model)."
        ) from exc
    except Exception as exc:  # torch.load raises many types on corrupt input
        raise ValueError(
            f"Could not read checkpoint '{p}': {type(exc).__name__}: {first_line(exc)}"
        ) from exc


def normalize_state_dict(
    state_dict: Mapping[str, Any], *, source: str = "state_dict"
) -> OrderedDict[str, torch.Tensor]:
    """Return a new state_dict with ``module.`` stripped and floating tensors as float32.

    Parameters
    ----------
    state_dict : Mapping of str to Tensor
        A state_dict, or a checkpoint dict holding one under the key ``"state_dict"``.
        It is not modified.
    source : str, default="state_dict"
        How to name the input in error messages (e.g. the file path).

    Returns
    -------
    OrderedDict of str to Tensor
        Same order as the input. Floating tensors of another dtype (float16, bfloat16,
        float64) are cast to float32 (new tensors); other tensors are passed through.

    Raises
    ------
    ValueError
        If the input holds no state_dict, a value is not a tensor, or stripping the prefix
        makes two keys collide.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"{source} does not hold a state_dict: expected a dict of tensors, "
            f"got {type(state_dict).__name__}."
        )
    inner = state_dict.get("state_dict") if "state_dict" in state_dict else state_dict
    if not isinstance(inner, Mapping):
        raise ValueError(
            f"{source}: the 'state_dict' entry is a {type(inner).__name__}, not a dict of tensors."
        )
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in inner.items():
        if not isinstance(key, str):
            raise ValueError(f"{source}: state_dict keys must be str; got {key!r}.")
        if not isinstance(value, torch.Tensor):
            top = list(state_dict.keys())[:_N_SHOWN]
            raise ValueError(
                f"{source} does not hold a state_dict: entry {key!r} is a "
                f"{type(value).__name__}, not a tensor (top-level keys: {top})."
            )
        new_key = key[len("module.") :] if key.startswith("module.") else key
        if new_key in out:
            raise ValueError(
                f"{source}: key {key!r} collides with {new_key!r} once 'module.' is stripped."
            )
        if value.is_floating_point() and value.dtype != torch.float32:
            value = value.to(torch.float32)
        out[new_key] = value
    if not out:
        raise ValueError(f"{source} holds an empty state_dict.")
    return out


def load_state_dict_file(path: PathLike) -> OrderedDict[str, torch.Tensor]:
    """Load a state_dict from a checkpoint file, normalised for chanprune's models.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by ``torch.save`` holding a plain state_dict or a dict with a
        ``"state_dict"`` entry. Keys may carry a ``module.`` prefix. The file is never modified.

    Returns
    -------
    OrderedDict of str to Tensor
        CPU tensors; ``module.`` stripped; floating tensors cast to float32.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is corrupt or unreadable, or does not hold a state_dict.

    Examples
    --------
    >>> sd = load_state_dict_file("../shared/models/resnet20-12fca82f.th")  # doctest: +SKIP
    >>> sd["conv1.weight"].shape  # doctest: +SKIP
    torch.Size([16, 3, 3, 3])
    """
    p = _check_path(path)
    obj = read_checkpoint(p)
    return normalize_state_dict(obj, source=f"Checkpoint '{p}'")


def _fmt(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_N_SHOWN])
    more = f", ... ({len(keys) - _N_SHOWN} more)" if len(keys) > _N_SHOWN else ""
    return f"[{shown}{more}]"


def load_weights(
    model: nn.Module,
    weights: PathLike | Mapping[str, Any],
    *,
    name: str | None = None,
) -> nn.Module:
    """Load weights into ``model`` strictly, after checking keys and shapes.

    Parameters
    ----------
    model : nn.Module
        The model to fill, in place.
    weights : str, os.PathLike or Mapping of str to Tensor
        A checkpoint path (read with :func:`load_state_dict_file`) or a state_dict (normalised
        with :func:`normalize_state_dict`; not modified).
    name : str, optional
        How to name the model in error messages (e.g. its registry name); defaults to the
        class name.

    Returns
    -------
    nn.Module
        ``model`` itself.

    Raises
    ------
    ValueError
        If the state_dict does not match the architecture: the message names the model and
        lists the first few missing, unexpected and mis-shaped keys. A missing BatchNorm
        ``num_batches_tracked`` buffer (checkpoints from old PyTorch versions) is not an error.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"The 'model' parameter must be an nn.Module; got {type(model).__name__}.")
    if isinstance(weights, Mapping):
        state_dict = normalize_state_dict(weights)
        source = "state_dict"
    else:
        path = _check_path(weights, "weights")
        state_dict = load_state_dict_file(path)
        source = f"checkpoint '{path}'"
    label = repr(name) if name is not None else type(model).__name__
    expected = model.state_dict()
    missing = [
        k for k in expected if k not in state_dict and not k.endswith(".num_batches_tracked")
    ]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) {_fmt(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) {_fmt(unexpected)}")
        if misshaped:
            parts.append(f"{len(misshaped)} mis-shaped key(s) {_fmt(misshaped)}")
        raise ValueError(
            f"The {source} does not match the architecture of model {label}: "
            + "; ".join(parts)
            + "."
        )
    # strict=True still guards against anything the checks above do not cover; BatchNorm
    # fills a missing num_batches_tracked itself (our dict carries no version metadata).
    model.load_state_dict(state_dict, strict=True)
    logger.debug("Loaded %d tensors from %s into model %s.", len(state_dict), source, label)
    return model


def cpu_state_dict(model: nn.Module) -> dict:
    """A copy of ``model``'s ``state_dict`` on the CPU, detached: what a file holds."""
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
