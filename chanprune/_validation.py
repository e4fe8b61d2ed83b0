"""Parameter validation at the public boundary.

Every public entry point validates its arguments once, with messages that name the
parameter, the allowed range and the value received; internal calls skip re-validation.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

__all__ = [
    "as_float64_array",
    "check_finite",
    "check_int_in_range",
    "check_real_in_range",
    "check_choice",
]


def as_float64_array(value: Any, name: str) -> np.ndarray:
    """Return ``value`` (ndarray, tensor or sequence) as a float64 ndarray, never a view
    that the caller could later mutate through (a copy is made when needed)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64).numpy()
    if isinstance(value, np.ndarray):
        if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
            raise TypeError(f"{name} must hold real numbers; got an array of dtype {value.dtype}.")
        return np.asarray(value, dtype=np.float64)
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{name} must be a numpy array or a torch tensor; got {type(value).__name__}."
        ) from exc


def check_finite(array: np.ndarray | torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``array`` holds NaN or Inf, saying how many and where."""
    if isinstance(array, torch.Tensor):
        bad = ~torch.isfinite(array)
        n_bad = int(bad.sum())
        if n_bad:
            first = tuple(int(i) for i in torch.nonzero(bad)[0])
            raise ValueError(
                f"{name} contains {n_bad} NaN or Inf value(s), the first at index {first}."
            )
        return
    bad = ~np.isfinite(array)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} contains {int(bad.sum())} NaN or Inf value(s), the first at index {first}."
        )


def check_int_in_range(value: Any, name: str, low: int, high: int | None = None) -> int:
    """Return ``value`` as int after checking ``low <= value <= high`` (``high=None``: no cap)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"The {name!r} parameter must be an int; got {value!r} ({type(value).__name__})."
        )
    value = int(value)
    if value < low or (high is not None and value > high):
        upper = "inf" if high is None else str(high)
        raise ValueError(f"The {name!r} parameter must be an int in [{low}, {upper}]; got {value}.")
    return value


def check_real_in_range(
    value: Any,
    name: str,
    low: float = -np.inf,
    high: float = np.inf,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Return ``value`` as float after checking it lies in the stated interval."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"The {name!r} parameter must be a real number; got {value!r}.")
    value = float(value)
    ok_low = value >= low if low_inclusive else value > low
    ok_high = value <= high if high_inclusive else value < high
    if np.isnan(value) or not (ok_low and ok_high):
        lb = "[" if low_inclusive else "("
        rb = "]" if high_inclusive else ")"
        raise ValueError(f"The {name!r} parameter must be in {lb}{low}, {high}{rb}; got {value}.")
    return value


def check_choice(value: Any, name: str, choices) -> str:
    """Check that ``value`` is one of ``choices`` and return it."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"The {name!r} parameter must be one of {list(choices)}; got {value!r}.")
    return value
