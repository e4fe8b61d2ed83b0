"""Validation of ``arch_config`` dicts (shared by the model families)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__: list[str] = []


def _check_config_keys(
    config: Any, arch: str, *, required: tuple[str, ...], optional: tuple[str, ...]
) -> dict[str, Any]:
    """Return ``config`` without its ``"arch"`` entry, after checking its keys.

    Raises ``TypeError`` if ``config`` is not a mapping, ``ValueError`` if its ``"arch"``
    differs from ``arch``, a required key is missing or a key is unknown.
    """
    if not isinstance(config, Mapping):
        raise TypeError(
            f"The 'config' parameter must be a dict (from arch_config()); "
            f"got {type(config).__name__}."
        )
    kwargs = dict(config)
    got_arch = kwargs.pop("arch", arch)
    if got_arch != arch:
        raise ValueError(f"The config describes arch {got_arch!r}, not {arch!r}.")
    missing = [k for k in required if k not in kwargs]
    if missing:
        raise ValueError(f"The {arch!r} config lacks required key(s) {missing}; got {config!r}.")
    unknown = sorted(k for k in kwargs if k not in required and k not in optional)
    if unknown:
        raise ValueError(
            f"The {arch!r} config has unknown key(s) {unknown}; "
            f"valid keys: {['arch', *required, *optional]}."
        )
    return kwargs
