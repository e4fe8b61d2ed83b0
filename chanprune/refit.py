"""Least-squares refit of the kept channels' weights, and exact reconstruction errors.

Both work from :class:`~chanprune.stats.Moments` alone. With ``A`` the Gram matrix of the
kept blocks plus the ones column and ``B`` their cross moments with the targets, the refit
solves ``(A + ridge) W'^T = B`` and the squared error of any solution ``W'`` is

    ||Y - X' W'^T||^2 = y2 - 2 tr(W' B) + tr(W' A W'^T),

exact, without the samples.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import scipy.linalg
import torch

from .exceptions import SingularGramWarning
from .stats import Moments

__all__ = [
    "least_squares_refit",
    "reconstruction_error",
    "refit_with_error",
    "regularized_gram",
]

logger = logging.getLogger(__name__)

# Cholesky pivots below this fraction of the largest one mean the system is numerically
# singular: the solution would be dominated by rounding, so the min-norm solve is used.
_PIVOT_RATIO = 1e-12


def regularized_gram(moments: Moments, cols: np.ndarray, ridge: float) -> np.ndarray:
    """``xtx[cols][:, cols]`` with ``ridge * mean(diag)`` added to the patch columns.

    The ridge is relative (scale-free) and never applied to the ones column (last of
    ``cols``), so the intercept is not shrunk. ``mean(diag)`` is that of the whole layer's
    patch Gram, all channels, whichever ``cols`` are taken: the regularised objective is
    then the same function for every kept set, so ``greedy_ls`` ranks removals by the
    objective the refit minimises.
    """
    gram = moments.xtx[np.ix_(cols, cols)]
    if ridge > 0:
        d = moments.n_features
        scale = float(np.einsum("ii->", moments.xtx[:d, :d])) / d
        diag = np.einsum("ii->i", gram)
        diag[:-1] += ridge * (scale if scale > 0 else 1.0)
    return gram


def cholesky_factor(gram: np.ndarray) -> torch.Tensor | None:
    """The lower Cholesky factor of symmetric ``gram`` (float64), or None if it is not
    numerically positive definite (a failed factorisation, or a pivot under
    ``_PIVOT_RATIO`` of the largest in squared terms).

    Through torch, whose LAPACK (MKL on x86 wheels) is 2x faster here than SciPy's
    bundled one.
    """
    factor, info = torch.linalg.cholesky_ex(torch.from_numpy(gram))
    if int(info) != 0:
        return None
    pivots = torch.diagonal(factor).abs()
    if float(pivots.min()) ** 2 <= _PIVOT_RATIO * float(pivots.max()) ** 2:
        return None
    return factor


def _solve_psd(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve ``gram @ sol = rhs`` for symmetric PSD ``gram``: Cholesky, min-norm fallback."""
    factor = cholesky_factor(gram)
    if factor is not None:
        return torch.cholesky_solve(torch.from_numpy(rhs), factor).numpy()
    # Singular values under the pivot threshold are rounding noise of a singular Gram
    # (LAPACK's default cut-off, eps * size, keeps them and returns a wild solution).
    sol, _, rank, _ = scipy.linalg.lstsq(
        gram, rhs, cond=_PIVOT_RATIO, check_finite=False, lapack_driver="gelsd"
    )
    warnings.warn(
        f"the Gram matrix of the kept channels is singular (numerical rank {rank} of "
        f"{gram.shape[0]}); using the minimum-norm least-squares solution. Sample more "
        "positions or pass ridge > 0.",
        SingularGramWarning,
        stacklevel=3,
    )
    return sol


def least_squares_refit(
    moments: Moments, kept: np.ndarray, *, ridge: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Weights and bias of the kept channels minimising the squared reconstruction error.

    Solves ``min ||Y - X_kept W'^T - 1 b'^T||^2 + ridge * mean(diag) * ||W'||^2``, with
    ``mean(diag)`` the mean diagonal of the whole layer's ``X^T X`` (all channels, so the
    penalty does not depend on which are kept).

    Parameters
    ----------
    moments : Moments
        Statistics of the layer (targets ``Y`` are whatever was accumulated).
    kept : ndarray of shape (n_kept,)
        Sorted indices of the input channels kept.
    ridge : float, default=0.0
        Relative ridge; 0 is plain least squares.

    Returns
    -------
    weight : ndarray of shape (n_outputs, n_kept * block_size)
        The refit weights, channel-major (reshape to ``(n, n_kept, kh, kw)``).
    bias : ndarray of shape (n_outputs,)
        The refit intercept: the layer's new bias (it replaces the original one).

    Notes
    -----
    Singular systems (fewer independent samples than unknowns, dead channels) fall back to
    the minimum-norm solution with a :class:`~chanprune.exceptions.SingularGramWarning`.
    """
    weight, bias, _ = refit_with_error(moments, kept, ridge=ridge)
    return weight, bias


def refit_with_error(
    moments: Moments, kept: np.ndarray, *, ridge: float = 0.0, fit_intercept: bool = True
) -> tuple[np.ndarray, np.ndarray, float]:
    """:func:`least_squares_refit` plus its squared error, without a ``d^2 n`` product.

    The solution satisfies ``(A + R) sol = B`` (``R`` the ridge), so
    ``||Y - X sol||^2 = y2 - 2 tr(sol^T B) + tr(sol^T A sol) = y2 - tr(sol^T B) -
    tr(sol^T R sol)``; exact up to the accuracy of the solve. (The min-norm fallback for a
    singular system also satisfies it.) With ``fit_intercept=False`` the bias is zero and
    not fitted: for a layer with neither a bias nor a BatchNorm to hold one.
    """
    cols = moments.block_columns(kept)
    gram = regularized_gram(moments, cols, ridge)
    if not fit_intercept:  # drop the ones column (the ridge never touched it)
        cols, gram = cols[:-1], gram[:-1, :-1]
    rhs = moments.xty[cols]
    sol = _solve_psd(gram, rhs)
    error = moments.yty - float(np.sum(sol * rhs))
    n_w = len(cols) - 1 if fit_intercept else len(cols)
    if ridge > 0:
        added = np.diag(gram)[:n_w] - np.diag(moments.xtx)[cols[:n_w]]
        error -= float(np.sum(added[:, None] * sol[:n_w] ** 2))
    bias = sol[-1].copy() if fit_intercept else np.zeros(sol.shape[1])
    return sol[:n_w].T.copy(), bias, max(error, 0.0)


def reconstruction_error(
    moments: Moments, kept: np.ndarray, weight: np.ndarray, bias: np.ndarray
) -> float:
    """Exact ``||Y - X_kept W^T - 1 b^T||^2`` from the statistics.

    Parameters
    ----------
    moments : Moments
    kept : ndarray of shape (n_kept,)
    weight : ndarray of shape (n_outputs, n_kept * block_size)
    bias : ndarray of shape (n_outputs,)

    Returns
    -------
    error : float
        The squared error, clipped at 0 against rounding. Divide by ``moments.yty`` for
        the relative error.
    """
    cols = moments.block_columns(kept)
    sol = np.vstack([np.asarray(weight).T, np.asarray(bias)[None, :]])  # (d_kept + 1, n)
    gram = moments.xtx[np.ix_(cols, cols)]
    error = moments.yty - 2.0 * np.sum(sol * moments.xty[cols]) + np.sum(sol * (gram @ sol))
    return max(float(error), 0.0)
