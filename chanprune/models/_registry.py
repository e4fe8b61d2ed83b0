"""Name registry, rebuilding from ``arch_config`` and saving/loading (pruned) models.

A pruned model is saved as ``{"arch_config": model.arch_config(), "state_dict": ...}``
(plain data and tensors only), so it loads with ``torch.load(weights_only=True)`` and is
rebuilt by :func:`build_model`; no pickled code is involved.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ._checkpoint import (
    _check_path,
    cpu_state_dict,
    load_weights,
    normalize_state_dict,
    read_checkpoint,
)
from .resnet import (
    CifarResNet,
    ResNet,
    resnet18,
    resnet20_cifar10,
    resnet32_cifar10,
    resnet34,
    resnet44_cifar10,
    resnet50,
    resnet56_cifar10,
    resnet110_cifar10,
)
from .vgg import VGG, vgg16, vgg16_bn, vgg16_bn_cifar10, vgg16_cifar10, vgg_digits

__all__ = [
    "BUILDERS",
    "ARCHITECTURES",
    "get_model",
    "get_model_builder",
    "list_models",
    "build_model",
    "save_model",
    "load_model",
]

logger = logging.getLogger(__name__)

#: Registry name -> builder ``f(*, weights=None, **kwargs) -> nn.Module``.
BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "vgg16": vgg16,
    "vgg16_bn": vgg16_bn,
    "vgg16_cifar10": vgg16_cifar10,
    "vgg16_bn_cifar10": vgg16_bn_cifar10,
    "vgg_digits": vgg_digits,
    "resnet20_cifar10": resnet20_cifar10,
    "resnet32_cifar10": resnet32_cifar10,
    "resnet44_cifar10": resnet44_cifar10,
    "resnet56_cifar10": resnet56_cifar10,
    "resnet110_cifar10": resnet110_cifar10,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
}

#: ``arch_config()["arch"]`` -> model class (each has ``from_config`` and ``arch_config``).
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "vgg": VGG,
    "cifar_resnet": CifarResNet,
    "resnet": ResNet,
}


def list_models() -> list[str]:
    """Return the registered model names, sorted."""
    return sorted(BUILDERS)


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    """Return the builder registered as ``name``.

    Raises
    ------
    TypeError
        If ``name`` is not a str.
    ValueError
        If ``name`` is unknown; the message lists the valid names.
    """
    if not isinstance(name, str):
        raise TypeError(f"The 'name' parameter must be a str; got {type(name).__name__}.")
    if name not in BUILDERS:
        raise ValueError(f"Unknown model name {name!r}; valid names: {list_models()}.")
    return BUILDERS[name]


def get_model(
    name: str, *, weights: str | os.PathLike[str] | Mapping[str, Any] | None = None, **kwargs: Any
) -> nn.Module:
    """Build a registered model, optionally loading a checkpoint strictly.

    Parameters
    ----------
    name : str
        One of :func:`list_models`.
    weights : str, os.PathLike or state_dict, optional
        A checkpoint file (plain state_dict or ``{"state_dict": ...}``, keys optionally
        prefixed ``module.``; floating tensors cast to float32) or a state_dict. Never modified.
    **kwargs
        Passed to the builder (e.g. ``num_classes``, ``widths`` for VGG, ``block_widths``
        for ResNets).

    Returns
    -------
    nn.Module
        In training mode, as built (call ``.eval()`` for inference).

    Raises
    ------
    ValueError
        Unknown name (the valid ones are listed), corrupt checkpoint, or a checkpoint that
        does not match the architecture (the first offending keys are listed).
    FileNotFoundError
        If ``weights`` is a path that does not exist.

    Examples
    --------
    >>> model = get_model("resnet20_cifar10")
    >>> model = get_model("resnet56_cifar10", weights="../shared/models/resnet56-4bfd9763.th")
    ... # doctest: +SKIP
    """
    return get_model_builder(name)(weights=weights, **kwargs)


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """Rebuild a model (fresh weights) from its ``arch_config()``.

    Parameters
    ----------
    config : dict
        Output of a model's ``arch_config()`` (possibly after a JSON round trip), with an
        ``"arch"`` entry among ``ARCHITECTURES``.

    Returns
    -------
    nn.Module
        Same architecture and parameter shapes, ready for ``load_state_dict``.

    Raises
    ------
    TypeError
        If ``config`` is not a dict.
    ValueError
        Unknown ``"arch"``, missing or unknown keys, or invalid values.
    """
    if not isinstance(config, Mapping):
        raise TypeError(
            f"The 'config' parameter must be a dict (from arch_config()); "
            f"got {type(config).__name__}."
        )
    arch = config.get("arch")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"The config's 'arch' must be one of {sorted(ARCHITECTURES)}; got {arch!r}."
        )
    return ARCHITECTURES[arch].from_config(config)


def save_model(
    model: nn.Module, path: str | os.PathLike[str], *, config: Mapping[str, Any] | None = None
) -> None:
    """Save ``{"arch_config": ..., "state_dict": ...}`` to ``path`` (CPU tensors).

    Parameters
    ----------
    model : nn.Module
        A chanprune model (has ``arch_config()``), pruned or not. Not modified.
    config : dict, optional
        The architecture, for a model without ``arch_config()`` (see
        :func:`chanprune.models.vgg.vgg_config_of`).
    path : str or os.PathLike
        Destination file; overwritten if present. The file is written atomically: to a
        temporary file in the same folder, then renamed over ``path``, so a reader never
        sees a half-written file and a failed save leaves no temporary file behind and any
        previous file at ``path`` intact.
    """
    if config is None and not callable(getattr(model, "arch_config", None)):
        raise TypeError(
            "The 'model' parameter must be a chanprune model with arch_config(); "
            f"got {type(model).__name__}."
        )
    p = _check_path(path)
    state = cpu_state_dict(model)
    config = dict(config) if config is not None else model.arch_config()
    payload = {"arch_config": config, "state_dict": state}
    from ..io import atomic_write  # chanprune.io imports this package: import on use

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(payload, f)

    atomic_write(p, write)
    logger.info("Saved %s (%d tensors) to '%s'.", type(model).__name__, len(state), p)


def load_model(path: str | os.PathLike[str]) -> nn.Module:
    """Load a model written by :func:`save_model`: rebuild from its config, load strictly.

    Parameters
    ----------
    path : str or os.PathLike
        The file; read with ``weights_only=True`` and never modified.

    Returns
    -------
    nn.Module
        In training mode (call ``.eval()`` for inference).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        Corrupt file, no ``arch_config`` entry (a bare state_dict: use
        ``get_model(name, weights=path)``), or weights that do not match the config.
    """
    p = Path(_check_path(path))
    return model_from_checkpoint(read_checkpoint(p), p)


def model_from_checkpoint(obj: Any, p: Path) -> nn.Module:
    """:func:`load_model` on the already read contents ``obj`` of file ``p``."""
    if not isinstance(obj, Mapping) or "arch_config" not in obj:
        raise ValueError(
            f"Checkpoint '{p}' has no 'arch_config' entry, so it was not written by "
            "save_model; for a bare state_dict use get_model(name, weights=path)."
        )
    model = build_model(obj["arch_config"])
    state_dict = normalize_state_dict(obj, source=f"Checkpoint '{p}'")
    try:
        return load_weights(model, state_dict, name=obj["arch_config"].get("arch"))
    except ValueError as exc:
        raise ValueError(f"Checkpoint '{p}': {exc}") from exc
