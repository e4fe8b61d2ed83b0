"""Schedules: the names, and the pieces shared by the width plans of :mod:`chanprune.graph`.

A *channel group* is a set of channels pruned together (the output channels of one or more
convs, read by one or more others); a schedule gives each its width. The plans
themselves (uniform, the paper's, from a cost per width) are made on the traced graph
(:func:`chanprune.graph.uniform_widths`, :func:`chanprune.graph.widths_for_cost`).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping
from typing import Union

import numpy as np

__all__ = ["energy_fractions", "resolve_explicit", "SCHEDULES"]

#: Built-in schedule names; an explicit ``{group: keep}`` mapping is also accepted.
#: ``auto`` is the one measured best for the network's kind (see
#: :func:`chanprune.prune.resolve_auto_schedule`); ``energy`` needs the channel spectra of
#: calibration data (:func:`energy_fractions`), ``sensitivity`` the measured output
#: degradation of each group (:mod:`chanprune.sensitivity`).
SCHEDULES = ("auto", "uniform", "paper", "energy", "sensitivity")


def energy_fractions(eigenvalues: np.ndarray) -> np.ndarray:
    """Cumulative fraction of the energy kept by the top ``k`` principal components.

    Parameters
    ----------
    eigenvalues : ndarray of shape (n_channels,)
        Eigenvalues of a channel covariance, any order; negative round-off is clipped.

    Returns
    -------
    ndarray of shape (n_channels,)
        Entry ``k - 1``: the fraction kept with ``k`` components, non-decreasing, last 1.
        All ones when the total energy is zero (the channels carry nothing to lose).
    """
    ev = np.sort(np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None))[::-1]
    total = ev.sum()
    if not total > 0:
        return np.ones(ev.shape[0])
    fractions = np.minimum(np.cumsum(ev) / total, 1.0)
    fractions[-1] = 1.0
    return fractions


def _achieved(achieved: float, speedup: float, tolerance: float) -> float:
    """``achieved``, with a warning when it is farther than ``tolerance`` (relative) from
    the target: one channel is a coarse step on a narrow network."""
    if abs(achieved / speedup - 1.0) > tolerance:
        warnings.warn(
            f"the achieved speed-up {achieved:.3f} is {abs(achieved / speedup - 1):.1%} from "
            f"the target {speedup:g}: the layers are too narrow for a closer width plan.",
            UserWarning,
            stacklevel=3,
        )
    return achieved


def resolve_explicit(
    groups: Mapping[str, int], keep: Mapping[str, Union[int, float]]
) -> dict[str, int]:
    """Validate an explicit ``{group: keep}`` schedule (int counts or float ratios in (0, 1])
    against the prunable ``groups`` and their sizes; return the kept counts."""
    if not isinstance(keep, Mapping):
        raise TypeError(
            f"an explicit schedule must be a dict of group -> keep; got {type(keep).__name__}."
        )
    unknown = sorted(set(keep) - set(groups))
    if unknown:
        raise ValueError(
            f"the schedule names groups that cannot be pruned here: {unknown}; "
            f"prunable groups: {list(groups)}."
        )
    out = {}
    for name, value in keep.items():
        size = groups[name]
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise TypeError(f"schedule[{name!r}] must be an int or a float; got {value!r}.")
        if not isinstance(value, numbers.Integral):  # numpy scalars count as well
            if not 0.0 < value <= 1.0:
                raise ValueError(f"schedule[{name!r}] as a ratio must be in (0, 1]; got {value}.")
            value = max(1, round(value * size))
        if not 1 <= value <= size:
            raise ValueError(
                f"schedule[{name!r}] must keep between 1 and {size} channels; got {value}."
            )
        out[name] = int(value)
    return out
