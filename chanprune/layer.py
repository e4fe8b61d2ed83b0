"""Prune one layer: select the input channels to keep, then refit their weights.

This is the public per-layer entry point for users who have nothing but arrays: sampled
input patches ``X``, the original outputs ``Y`` and the layer's weight. It knows nothing of
``nn.Module``; the model-level driver calls it (through :func:`prune_layer_from_stats`) for
each layer in turn.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch

from ._validation import (
    as_float64_array,
    check_choice,
    check_finite,
    check_int_in_range,
    check_real_in_range,
)
from .refit import reconstruction_error, refit_with_error
from .selection import (
    SELECTORS,
    Selection,
    select_by_score,
    select_first_k,
    select_greedy_ls,
    select_greedy_swap,
    select_lasso,
    select_max_response,
    select_random,
    select_thinet,
)
from .stats import LayerStats, Moments

__all__ = ["LayerPruneResult", "prune_layer", "prune_layer_from_stats"]

ArrayLike = Union[np.ndarray, torch.Tensor]


@dataclass(frozen=True)
class LayerPruneResult:
    """What :func:`prune_layer` returns.

    Attributes
    ----------
    kept : ndarray of shape (keep,)
        Sorted int64 indices of the kept input channels.
    weight : ndarray of shape (n_outputs, keep, kh, kw), or (n_outputs, keep) for 2-D input
        The new weight of the layer (float64).
    bias : ndarray of shape (n_outputs,)
        The new bias (float64). With ``refit=True`` it is the refit intercept, which
        replaces the original bias.
    rel_error : float
        ``||Y - Y'||^2 / ||Y||^2`` on the samples the statistics came from.
    rel_error_before_refit : float
        The same for the kept channels with the original weights (LASSO: scaled by their
        coefficients) and the original bias: what the refit buys.
    method : str
    alpha : float or None
        LASSO penalty used (scikit-learn convention on the raw ``n_samples * n_outputs``
        rows); None for other selectors.
    n_iter : int
        Selector iterations (summed over alternations).
    n_alternations : int
        Selection/refit rounds (1 unless ``alternate=True``).
    exact : bool
        False if the LASSO fell back to truncating a denser solution (see
        :func:`chanprune.selection.select_lasso`).
    time_s : float
        Wall time of selection plus refit.
    """

    kept: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    rel_error: float
    rel_error_before_refit: float
    method: str
    alpha: Optional[float] = None
    n_iter: int = 0
    n_alternations: int = 1
    exact: bool = True
    time_s: float = 0.0
    info: dict = field(default_factory=dict, repr=False)

    @property
    def keep(self) -> int:
        return int(self.kept.size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (without the weight arrays)."""
        return {
            "method": self.method,
            "keep": self.keep,
            "kept": self.kept.tolist(),
            "rel_error": float(self.rel_error),
            "rel_error_before_refit": float(self.rel_error_before_refit),
            "alpha": None if self.alpha is None else float(self.alpha),
            "n_iter": int(self.n_iter),
            "n_alternations": int(self.n_alternations),
            "exact": bool(self.exact),
            "time_s": float(self.time_s),
        }


def _check_weight(weight: Any, bias: Any, n_channels: int | None):
    """Validate ``weight`` (n, c, kh, kw) or (n, c) and ``bias`` (n,); return float64 copies."""
    if not isinstance(weight, (np.ndarray, torch.Tensor)):
        raise TypeError(
            f"weight must be a numpy array or a torch tensor; got {type(weight).__name__}."
        )
    w = as_float64_array(weight, "weight")
    if w.ndim not in (2, 4):
        raise ValueError(
            f"weight must have shape (n_outputs, c, kh, kw) or (n_outputs, c); got {w.shape}."
        )
    if n_channels is not None and w.shape[1] != n_channels:
        raise ValueError(
            f"weight has {w.shape[1]} input channels but the samples have {n_channels}: "
            f"weight shape {w.shape}."
        )
    check_finite(w, "weight")
    if bias is None:
        b = np.zeros(w.shape[0])
    else:
        if not isinstance(bias, (np.ndarray, torch.Tensor)):
            raise TypeError(
                f"bias must be a numpy array, a torch tensor or None; got {type(bias).__name__}."
            )
        b = as_float64_array(bias, "bias")
        if b.shape != (w.shape[0],):
            raise ValueError(
                f"bias must have shape ({w.shape[0]},) to match weight; got {b.shape}."
            )
        check_finite(b, "bias")
    return w, b


def prune_layer(
    X: ArrayLike,
    Y: ArrayLike,
    weight: ArrayLike,
    bias: Optional[ArrayLike] = None,
    *,
    keep: int,
    method: str = "lasso",
    refit: bool = True,
    ridge: float = 0.0,
    normalize: bool = True,
    alternate: bool = False,
    max_alternations: int = 10,
    scores: Optional[ArrayLike] = None,
    random_state=None,
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> LayerPruneResult:
    """Select ``keep`` input channels of one layer and refit its weights.

    Parameters
    ----------
    X : array or tensor of shape (n_samples, c, kh, kw), or (n_samples, c)
        Sampled input patches of the layer (from the network being pruned).
    Y : array or tensor of shape (n_samples, n_outputs)
        The original layer's outputs at the same positions (pre-activation, BatchNorm
        folded in), including its bias.
    weight : array or tensor of shape (n_outputs, c, kh, kw), or (n_outputs, c)
        The layer's current weight (the one ``Y`` was computed with, BN folded).
    bias : array or tensor of shape (n_outputs,), optional
        The layer's current bias (BN folded); None means zero.
    keep : int
        Number of input channels to keep, in ``[1, c]``.
    method : str, default="lasso"
        The selector, one of :data:`chanprune.selection.SELECTORS`: "lasso",
        "greedy_ls", "greedy_swap", "thinet", "max_response", "first_k", "random",
        "by_score"; see :mod:`chanprune.selection`.
    refit : bool, default=True
        Refit the kept weights and bias by least squares. With False the kept channels
        keep their original weights (LASSO: scaled by ``beta``) and the original bias.
    ridge : float, default=0.0
        Relative ridge of the refit (and of ``greedy_ls``), a fraction of the mean
        diagonal of the Gram; 0 is plain least squares.
    normalize : bool, default=True
        LASSO: normalise ``||W_i||_F = 1`` as in the paper.
    alternate : bool, default=False
        LASSO: alternate selection with the refit weights and refit, until the kept set
        is stable (at most ``max_alternations`` rounds); the best round is returned.
    scores : array of shape (c,), optional
        Importance of each channel for ``method="by_score"`` (higher is kept).
    random_state : int, numpy Generator or None
        Seed for ``method="random"``.
    max_iter, tol : int, float
        LASSO solver options (scikit-learn). The tight default tolerance keeps the count
        of nonzero coefficients monotone in alpha, so the bisection lands on the budget.

    Returns
    -------
    LayerPruneResult

    Raises
    ------
    ValueError
        Mismatched shapes, ``keep`` outside ``[1, c]``, NaN or Inf in the inputs, no
        samples, an unknown method.
    TypeError
        Inputs that are not arrays or tensors.

    Examples
    --------
    >>> import numpy as np
    >>> from chanprune import prune_layer
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(500, 8, 3, 3))
    >>> W = rng.normal(size=(16, 8, 3, 3))
    >>> Y = np.einsum("scij,ocij->so", X[:, :4], W[:, :4])  # only channels 0-3 matter
    >>> result = prune_layer(X, Y, W, keep=4)
    >>> result.kept
    array([0, 1, 2, 3])
    >>> result.rel_error < 1e-12
    True
    """
    for name, value in (("X", X), ("Y", Y)):
        if not isinstance(value, (np.ndarray, torch.Tensor)):
            raise TypeError(
                f"{name} must be a numpy array or a torch tensor; got {type(value).__name__}."
            )
    if X.ndim not in (2, 4):
        raise ValueError(
            f"X must have shape (n_samples, c, kh, kw) or (n_samples, c); got {tuple(X.shape)}."
        )
    if Y.ndim != 2:
        raise ValueError(f"Y must have shape (n_samples, n_outputs); got {tuple(Y.shape)}.")
    if X.shape[0] == 0:
        raise ValueError("X and Y hold no samples (n_samples = 0).")
    w, b = _check_weight(weight, bias, X.shape[1])
    kernel = w.shape[2:] if w.ndim == 4 else (1, 1)
    if tuple(X.shape[2:]) != tuple(w.shape[2:]):
        raise ValueError(
            f"X patches of shape {tuple(X.shape[1:])} do not match weight of shape {w.shape}."
        )
    if Y.shape[1] != w.shape[0]:
        raise ValueError(
            f"Y has {Y.shape[1]} outputs but weight has {w.shape[0]}: Y shape {tuple(Y.shape)}."
        )
    stats = LayerStats(X.shape[1], Y.shape[1], tuple(kernel))
    stats.update(X, Y)
    return _prune_from_moments(
        stats.moments(), w, b, keep=keep, method=method, refit=refit, ridge=ridge,
        normalize=normalize, alternate=alternate, max_alternations=max_alternations,
        scores=scores, random_state=random_state, max_iter=max_iter, tol=tol,
    )  # fmt: skip


def prune_layer_from_stats(
    stats: LayerStats | Moments,
    weight: ArrayLike,
    bias: Optional[ArrayLike] = None,
    *,
    keep: int,
    method: str = "lasso",
    refit: bool = True,
    ridge: float = 0.0,
    normalize: bool = True,
    alternate: bool = False,
    max_alternations: int = 10,
    scores: Optional[ArrayLike] = None,
    random_state=None,
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> LayerPruneResult:
    """:func:`prune_layer` from accumulated statistics instead of raw samples.

    ``stats`` is a :class:`~chanprune.stats.LayerStats` (or its :class:`Moments`) of the
    layer's input patches and original outputs; every other argument is as in
    :func:`prune_layer`. The result is the same as from the raw samples.
    """
    if isinstance(stats, LayerStats):
        moments = stats.moments()
    elif isinstance(stats, Moments):
        moments = stats
    else:
        raise TypeError(f"stats must be a LayerStats or Moments; got {type(stats).__name__}.")
    w, b = _check_weight(weight, bias, moments.n_channels)
    block = int(np.prod(w.shape[2:])) if w.ndim == 4 else 1
    if block != moments.block_size or w.shape[0] != moments.n_outputs:
        raise ValueError(
            f"weight of shape {w.shape} does not match the statistics "
            f"(n_outputs={moments.n_outputs}, block_size={moments.block_size})."
        )
    return _prune_from_moments(
        moments, w, b, keep=keep, method=method, refit=refit, ridge=ridge,
        normalize=normalize, alternate=alternate, max_alternations=max_alternations,
        scores=scores, random_state=random_state, max_iter=max_iter, tol=tol,
    )  # fmt: skip


def _select(
    method: str,
    moments: Moments,
    w3: np.ndarray,
    b: np.ndarray,
    keep: int,
    *,
    ridge: float,
    normalize: bool,
    scores: Optional[np.ndarray],
    random_state,
    max_iter: int,
    tol: float,
) -> Selection:
    c = w3.shape[1]
    if method == "lasso":
        return select_lasso(moments, w3, b, keep, normalize=normalize, max_iter=max_iter, tol=tol)
    if method == "greedy_ls":
        return select_greedy_ls(moments, keep, ridge=ridge)
    if method == "greedy_swap":
        return select_greedy_swap(moments, keep, ridge=ridge)
    if method == "thinet":
        return select_thinet(moments, w3, b, keep)
    if method == "max_response":
        return select_max_response(w3, keep)
    if method == "first_k":
        return select_first_k(c, keep)
    if method == "random":
        return select_random(c, keep, random_state)
    return select_by_score(scores, keep)


def _prune_from_moments(
    moments: Moments,
    w: np.ndarray,
    b: np.ndarray,
    *,
    keep: int,
    method: str,
    refit: bool,
    ridge: float,
    normalize: bool,
    alternate: bool,
    max_alternations: int,
    scores: Optional[ArrayLike],
    random_state,
    max_iter: int,
    tol: float,
) -> LayerPruneResult:
    start = time.perf_counter()
    c = moments.n_channels
    keep = check_int_in_range(keep, "keep", 1, c)
    check_choice(method, "method", SELECTORS)
    ridge = check_real_in_range(ridge, "ridge", 0.0)
    max_alternations = check_int_in_range(max_alternations, "max_alternations", 1)
    max_iter = check_int_in_range(max_iter, "max_iter", 1)
    tol = check_real_in_range(tol, "tol", 0.0, low_inclusive=False)
    if alternate and method != "lasso":
        raise ValueError(f"alternate=True applies to method='lasso' only; got method={method!r}.")
    if method == "by_score":
        if scores is None:
            raise ValueError("method='by_score' needs scores: an array of shape (c,).")
        scores = as_float64_array(scores, "scores")
        if scores.shape != (c,):
            raise ValueError(f"scores must have shape ({c},); got {scores.shape}.")
        check_finite(scores, "scores")
    elif scores is not None:
        raise ValueError(f"scores are only used by method='by_score'; got method={method!r}.")
    n = w.shape[0]
    w3 = w.reshape(n, c, moments.block_size)
    options = dict(
        ridge=ridge, normalize=normalize, scores=scores, random_state=random_state,
        max_iter=max_iter, tol=tol,
    )  # fmt: skip

    def finish(sel: Selection, w_used: np.ndarray, b_used: np.ndarray):
        """Weights, bias, error after and before the refit, for a selection made on
        weights ``w_used`` and bias ``b_used``."""
        coef = sel.coef[sel.kept] if sel.coef is not None else np.ones(sel.kept.size)
        w_sel = (w_used[:, sel.kept] * coef[None, :, None]).reshape(n, -1)
        if sel.error is not None:  # the selector knows it (LASSO, from the c x c moments)
            before = sel.error
        else:
            before = reconstruction_error(moments, sel.kept, w_sel, b_used)
        if refit:
            w_new, b_new, after = refit_with_error(moments, sel.kept, ridge=ridge)
        else:
            w_new, b_new, after = w_sel, b_used.copy(), before
        return w_new, b_new, after, before

    sel = _select(method, moments, w3, b, keep, **options)
    w_new, b_new, err, err_before = finish(sel, w3, b)
    n_iter, rounds = sel.n_iter, 1
    if alternate:
        # Selection with the refit weights, refit, until the kept set is stable; the refit
        # weights replace the kept channels' originals, the dropped ones may come back.
        w_cur, b_cur, prev = w3.copy(), b.copy(), sel.kept
        best = (err, sel, w_new, b_new, err_before)
        for _ in range(max_alternations - 1):
            if not refit:
                break
            w_cur[:, prev] = w_new.reshape(n, prev.size, -1)
            b_cur = b_new
            cand = _select(method, moments, w_cur, b_cur, keep, **options)
            rounds += 1
            n_iter += cand.n_iter
            if np.array_equal(cand.kept, prev):
                break
            w_new, b_new, err, err_before = finish(cand, w_cur, b_cur)
            if err < best[0]:
                best = (err, cand, w_new, b_new, err_before)
            prev = cand.kept
        err, sel, w_new, b_new, err_before = best
    y2 = moments.yty if moments.yty > 0 else 1.0
    shape = (n, keep) + tuple(w.shape[2:]) if w.ndim == 4 else (n, keep)
    return LayerPruneResult(
        kept=sel.kept,
        weight=w_new.reshape(shape),
        bias=b_new,
        rel_error=err / y2,
        rel_error_before_refit=err_before / y2,
        method=method,
        alpha=sel.alpha,
        n_iter=n_iter,
        n_alternations=rounds,
        exact=sel.exact,
        time_s=time.perf_counter() - start,
        info=sel.info,
    )
