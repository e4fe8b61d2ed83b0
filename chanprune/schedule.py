"""Turn a target MAC speed-up into per-layer widths.

MACs are counted as in the original channel-pruning code: for each conv,
``H_out * W_out * c_out * c_in * kh * kw`` multiply-accumulates, conv layers only (see
:mod:`chanprune.flops`). A conv's cost is bilinear in its input and output widths, so
once the spatial sizes are known the MACs of any choice of widths follow without running
the network: :class:`MacModel` holds those coefficients.

A *channel group* is a set of channels pruned together: the output channels of one conv,
which are the input channels of the next (named after the consuming layer).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from ._validation import check_real_in_range

__all__ = [
    "ConvCost",
    "MacModel",
    "widths_for_speedup",
    "widths_for_energy",
    "energy_fractions",
    "SCHEDULES",
]

#: Built-in schedule names; an explicit ``{group: keep}`` mapping is also accepted.
#: ``auto`` is the one measured best for the network's kind (see
#: :func:`chanprune.prune.resolve_auto_schedule`).
#: ``energy`` needs the channel spectra of calibration data (see :func:`widths_for_energy`);
#: ``sensitivity`` the measured output degradation of each group (see
#: :mod:`chanprune.sensitivity`; graph planner only).
SCHEDULES = ("auto", "uniform", "paper", "energy", "sensitivity")


@dataclass(frozen=True)
class ConvCost:
    """One conv's MACs as a function of its widths: ``coef * c_in * c_out``.

    ``in_group`` / ``out_group`` name the channel group setting that width, or are None
    when the width is fixed at ``in_fixed`` / ``out_fixed``.
    """

    name: str
    coef: int
    in_group: Optional[str]
    out_group: Optional[str]
    in_fixed: int
    out_fixed: int


@dataclass(frozen=True)
class MacModel:
    """MACs of a network as a function of the widths of its channel groups.

    Attributes
    ----------
    groups : dict of name -> int
        Prunable channel groups and their original sizes, in network order.
    convs : tuple of ConvCost
    """

    groups: dict
    convs: tuple

    def macs(self, widths: Optional[Mapping[str, int]] = None) -> int:
        """Total conv MACs per image; groups missing from ``widths`` keep their size."""
        widths = dict(self.groups, **(widths or {}))
        total = 0
        for conv in self.convs:
            c_in = widths[conv.in_group] if conv.in_group else conv.in_fixed
            c_out = widths[conv.out_group] if conv.out_group else conv.out_fixed
            total += conv.coef * c_in * c_out
        return total

    def per_layer(self, widths: Optional[Mapping[str, int]] = None) -> dict[str, int]:
        widths = dict(self.groups, **(widths or {}))
        return {
            c.name: c.coef
            * (widths[c.in_group] if c.in_group else c.in_fixed)
            * (widths[c.out_group] if c.out_group else c.out_fixed)
            for c in self.convs
        }


def _widths_at(model: MacModel, multipliers: Mapping[str, float], r: float) -> dict[str, int]:
    out = {}
    for name, size in model.groups.items():
        mult = multipliers.get(name, 0.0)
        if mult <= 0:
            out[name] = size  # not pruned
        else:
            out[name] = int(min(size, max(1, round(min(1.0, mult * r) * size))))
    return out


def widths_for_speedup(
    model: MacModel,
    speedup: float,
    multipliers: Mapping[str, float],
    *,
    tolerance: float = 0.02,
) -> tuple[dict[str, int], float]:
    """Widths whose MAC speed-up is as close as possible to ``speedup``.

    Each group ``g`` keeps ``round(min(1, m_g r) * size_g)`` channels (at least 1), with
    the multiplier ``m_g`` from ``multipliers`` (0 or absent: not pruned) and one ratio
    ``r`` found by bisection. A final pass moves single channels between groups' rounding
    to close the remaining gap.

    Parameters
    ----------
    model : MacModel
    speedup : float
        Target ``macs(original) / macs(pruned)``, > 1.
    multipliers : dict of group -> float
        Relative kept ratios (1 everywhere: uniform; the paper's VGG schedule uses 1.5
        for conv4_x and 0 for conv5_x).
    tolerance : float, default=0.02
        Relative distance to the target speed-up considered good enough; a farther one
        (layers too narrow for finer steps) is returned with a ``UserWarning``.

    Returns
    -------
    widths : dict of group -> int
    achieved : float
        The achieved speed-up.

    Raises
    ------
    ValueError
        If ``speedup <= 1``, or larger than the schedule can reach (one channel left in
        every pruned group); the message says the largest reachable speed-up.
    """
    speedup = check_real_in_range(speedup, "speedup", 1.0, low_inclusive=False)
    tolerance = check_real_in_range(tolerance, "tolerance", 0.0)
    base = model.macs()
    target = base / speedup
    prunable = [g for g in model.groups if multipliers.get(g, 0.0) > 0]
    if not prunable:
        raise ValueError("the schedule prunes no layer, so no speed-up > 1 is reachable.")
    _check_reachable(model, prunable, speedup, " for this schedule")
    lo, hi = 0.0, 1.0 / min(multipliers[g] for g in prunable)
    for _ in range(100):  # macs(r) is non-decreasing in r: bisect for macs <= target
        mid = 0.5 * (lo + hi)
        if model.macs(_widths_at(model, multipliers, mid)) > target:
            hi = mid
        else:
            lo = mid
    candidates = [_widths_at(model, multipliers, lo), _widths_at(model, multipliers, hi)]
    widths = min(candidates, key=lambda w: abs(math.log(base / model.macs(w) / speedup)))
    widths = _refine(model, widths, prunable, target)
    return widths, _achieved(base / model.macs(widths), speedup, tolerance)


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


def widths_for_energy(
    model: MacModel,
    speedup: float,
    energy: Mapping[str, np.ndarray],
    *,
    tolerance: float = 0.02,
) -> tuple[dict[str, int], float]:
    """Widths for a target speed-up that keep the most channel energy per MAC.

    The rank selection of Zhang et al. (2015), "Accelerating Very Deep Convolutional
    Networks for Classification and Detection", applied to channel groups: maximise
    ``prod_g E_g(k_g)`` (``E_g(k)``: fraction of the energy of group ``g``'s channels kept
    by its top ``k`` principal components) under the MAC budget. Greedily, one channel at
    a time, the group whose next channel costs the least ``-log E`` per MAC saved gives
    it up, until the target is met; a final pass moves single channels to close the gap.
    A group whose spectrum falls off fast (redundant channels) is pruned hard; one whose
    energy is spread over all its channels keeps them.

    Parameters
    ----------
    model : MacModel
    speedup : float
        Target ``macs(original) / macs(pruned)``, > 1.
    energy : dict of group -> ndarray of shape (size_g,)
        :func:`energy_fractions` of each group's channels; every group of ``model`` is
        prunable and must be present.
    tolerance : float, default=0.02
        As in :func:`widths_for_speedup`.

    Returns
    -------
    widths : dict of group -> int
    achieved : float

    Raises
    ------
    ValueError
        A missing group, a spectrum of the wrong length, or an unreachable target.
    """
    speedup = check_real_in_range(speedup, "speedup", 1.0, low_inclusive=False)
    tolerance = check_real_in_range(tolerance, "tolerance", 0.0)
    missing = [g for g in model.groups if g not in energy]
    if missing:
        raise ValueError(f"energy has no spectrum for the groups {missing}.")
    cost = {}
    for g, size in model.groups.items():
        fractions = np.asarray(energy[g], dtype=np.float64)
        if fractions.shape != (size,):
            raise ValueError(
                f"energy[{g!r}] must have shape ({size},), one fraction per channel; "
                f"got {fractions.shape}."
            )
        if not np.all((fractions >= 0) & (fractions <= 1)):
            raise ValueError(f"energy[{g!r}] must hold fractions in [0, 1] (no NaN).")
        # -log E(k) for k = 1..size; a group with no energy at k keeps an infinite cost.
        with np.errstate(divide="ignore"):
            cost[g] = -np.log(fractions)
    base = model.macs()
    target = base / speedup
    groups = list(model.groups)
    _check_reachable(model, groups, speedup)
    # MACs are bilinear in the widths: the MACs one channel of a group carries are the
    # sum, over the convs it feeds or leaves, of coef times the width on the other side.
    terms: dict[str, list] = {g: [] for g in groups}
    for conv in model.convs:
        if conv.in_group:
            terms[conv.in_group].append((conv.coef, conv.out_group, conv.out_fixed))
        if conv.out_group:
            terms[conv.out_group].append((conv.coef, conv.in_group, conv.in_fixed))
    widths = dict(model.groups)
    macs = base
    while macs > target:
        best, best_rate = None, np.inf
        for g in groups:
            w = widths[g]
            if w <= 1:
                continue
            saved = sum(c * (widths[o] if o else fixed) for c, o, fixed in terms[g])
            loss = cost[g][w - 2] - cost[g][w - 1]  # >= 0; inf once no energy would be left
            rate = loss / saved if saved > 0 and np.isfinite(loss) else np.inf
            if best is None or rate < best_rate:
                best, best_rate = g, rate
        widths[best] -= 1
        macs = model.macs(widths)
    widths = _refine(model, widths, groups, target)
    return widths, _achieved(base / model.macs(widths), speedup, tolerance)


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


def _check_reachable(model: MacModel, prunable: list, speedup: float, scope: str = "") -> None:
    """Raise if ``speedup`` needs fewer MACs than one channel left in every pruned group."""
    base = model.macs()
    floor = model.macs({g: 1 for g in prunable})
    if floor > base / speedup:
        raise ValueError(
            f"speedup={speedup:g} is out of reach{scope}: at most {base / floor:.3g}x "
            "(one channel left in every pruned layer)."
        )


def _refine(model: MacModel, widths: dict, prunable: list, target: float) -> dict:
    """Move single channels while that brings the MACs closer to the target (bounded)."""
    widths = dict(widths)
    for _ in range(4 * len(prunable)):
        current = abs(model.macs(widths) - target)
        best, best_gap = None, current
        for g in prunable:
            for step in (-1, 1):
                w = widths[g] + step
                if 1 <= w <= model.groups[g]:
                    gap = abs(model.macs({**widths, g: w}) - target)
                    if gap < best_gap:
                        best, best_gap = (g, w), gap
        if best is None:
            break
        widths[best[0]] = best[1]
    return widths


def resolve_explicit(model: MacModel, keep: Mapping[str, Union[int, float]]) -> dict[str, int]:
    """Validate an explicit ``{group: keep}`` schedule (int counts or float ratios in (0, 1])."""
    if not isinstance(keep, Mapping):
        raise TypeError(
            f"an explicit schedule must be a dict of layer -> keep; got {type(keep).__name__}."
        )
    unknown = sorted(set(keep) - set(model.groups))
    if unknown:
        raise ValueError(
            f"the schedule names layers that cannot be pruned here: {unknown}; "
            f"prunable layers: {list(model.groups)}."
        )
    out = {}
    for name, value in keep.items():
        size = model.groups[name]
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
