"""Channel selection: which input channels of one layer to keep.

Every selector returns a :class:`Selection` whose ``kept`` holds exactly ``keep`` sorted
int64 channel indices. The selectors work on arrays only (statistics from
:mod:`chanprune.stats`, the layer's weight); they know nothing of ``nn.Module``.

- ``lasso``: the channel-selection LASSO of He, Zhang and Sun (ICCV 2017), solved with
  scikit-learn's :class:`~sklearn.linear_model.Lasso` on the exact c x c reduction of the
  problem, with the penalty found by bisection so that exactly ``keep`` channels survive.
- ``greedy_ls``: backward elimination on the least-squares refit objective itself, with
  exact block downdates of the inverse Gram (Optimal Brain Surgeon for a weight group).
- ``greedy_swap``: ``greedy_ls``, then exchanges of a kept and a dropped channel while
  the refit error falls, every pair scored exactly (a local search as in OSSCAR, Meng et
  al., ICML 2024).
- ``thinet``: ThiNet's greedy removal of the channels whose summed contribution is
  smallest (Luo et al., ICCV 2017).
- ``max_response`` (largest ``||W_i||_1``), ``first_k``, ``random`` and ``by_score``
  (an externally computed importance, e.g. APoZ, activation entropy or BatchNorm scale).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import scipy.linalg
import torch
from sklearn.exceptions import ConvergenceWarning as SklearnConvergenceWarning
from sklearn.linear_model import Lasso

from .exceptions import ConvergenceWarning, SingularGramWarning
from .refit import cholesky_factor, regularized_gram
from .stats import Moments

__all__ = [
    "Selection",
    "SELECTORS",
    "channel_gram",
    "select_lasso",
    "select_lasso_gram",
    "select_greedy_gram",
    "select_greedy_ls",
    "select_greedy_swap",
    "select_thinet",
    "select_thinet_gram",
    "select_max_response",
    "select_first_k",
    "select_random",
    "select_by_score",
]

logger = logging.getLogger(__name__)

#: Names accepted by ``method=`` in :func:`chanprune.prune_layer`.
SELECTORS = (
    "lasso",
    "greedy_ls",
    "greedy_swap",
    "thinet",
    "max_response",
    "first_k",
    "random",
    "by_score",
)


@dataclass(frozen=True)
class Selection:
    """Outcome of one channel selection.

    Attributes
    ----------
    kept : ndarray of shape (keep,)
        Sorted int64 indices of the kept input channels.
    coef : ndarray of shape (n_channels,) or None
        LASSO only: the multiplier ``beta_i`` of each channel's original weight
        (0 for dropped channels), in the units of the unnormalised weight.
    alpha : float or None
        LASSO only: the penalty used, in scikit-learn's convention for the raw problem with
        ``n_samples * n_outputs`` rows (objective ``1/(2 n_rows) ||T - Z beta||^2 +
        alpha ||beta||_1``).
    n_iter : int
        Iterations of the selector (bisection steps, elimination steps, ...).
    exact : bool
        LASSO only: whether a penalty with exactly ``keep`` nonzeros was found (else the
        ``keep`` largest contributions of the nearest denser solution were kept).
    error : float or None
        LASSO only: ``||T - sum_i coef_i Z_i||^2``, the squared reconstruction error of the
        kept channels with their original weights scaled by ``coef`` and the original
        bias (from the channel Gram it already has; None where not computed).
    """

    kept: np.ndarray
    coef: Optional[np.ndarray] = None
    alpha: Optional[float] = None
    n_iter: int = 0
    exact: bool = True
    error: Optional[float] = None
    info: dict = field(default_factory=dict)


def _top_k(scores: np.ndarray, keep: int) -> np.ndarray:
    """Sorted indices of the ``keep`` largest scores; ties go to the lower index."""
    order = np.lexsort((np.arange(scores.size), -scores))
    return np.sort(order[:keep]).astype(np.int64)


# ---------------------------------------------------------------------------- LASSO
def channel_gram(
    moments: Moments, weight: np.ndarray, bias: Optional[np.ndarray] = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Second moments of the per-channel contributions ``Z_i = X_i W_i^T``.

    Parameters
    ----------
    moments : Moments
    weight : ndarray of shape (n_outputs, n_channels, block_size)
    bias : ndarray of shape (n_outputs,) or None
        The target is ``T = Y - bias``.

    Returns
    -------
    gram : ndarray of shape (n_channels, n_channels)
        ``G_ij = <Z_i, Z_j>`` summed over samples and outputs.
    linear : ndarray of shape (n_channels,)
        ``g_i = <Z_i, T>``.
    t2 : float
        ``||T||^2``, so that ``||T - Z beta||^2 = t2 - 2 beta.g + beta^T G beta``.
    """
    n, c, k = weight.shape
    d = c * k
    w = weight.reshape(n, d)
    xtx = moments.xtx[:d, :d]
    x_sum = moments.xtx[:d, d]
    xtt = moments.xty[:d]
    y_sum = moments.xty[d]
    t2 = moments.yty
    if bias is not None:
        xtt = xtt - np.outer(x_sum, bias)
        t2 = t2 - 2.0 * float(bias @ y_sum) + moments.n_samples * float(bias @ bias)
    # G_ij = sum_o W_i[o] A_ij W_j[o]^T = sum over the (i, j) block of A * (W^T W); one
    # einsum, without the d x d elementwise product as a temporary (10x faster at d = 4608).
    wtw = (w.T @ w).reshape(c, k, c, k)
    gram = np.einsum("ikjl,ikjl->ij", xtx.reshape(c, k, c, k), wtw)
    linear = (w.T * xtt).sum(axis=1).reshape(c, k).sum(axis=1)
    return gram, linear, float(t2)


def select_lasso(
    moments: Moments,
    weight: np.ndarray,
    bias: Optional[np.ndarray],
    keep: int,
    *,
    normalize: bool = True,
    max_iter: int = 1000,
    tol: float = 1e-6,
    max_bisect: int = 60,
) -> Selection:
    """LASSO channel selection with exactly ``keep`` survivors.

    Solves ``min_beta 1/(2 N n) ||T - sum_i beta_i Z_i||^2 + alpha ||beta||_1`` with
    ``Z_i = X_i W_i^T``, ``T = Y - bias`` and ``N n`` the number of (sample, output) rows,
    bisecting ``alpha`` (in log space) until exactly ``keep`` coefficients are nonzero.

    Parameters
    ----------
    moments : Moments
    weight : ndarray of shape (n_outputs, n_channels, block_size)
    bias : ndarray of shape (n_outputs,) or None
    keep : int
        Channels to keep, in ``[1, n_channels]``.
    normalize : bool, default=True
        Scale each ``W_i`` to unit Frobenius norm, as in the paper (the original code does
        not); ``coef`` is reported for the unscaled weights either way.
    max_iter, tol : int, float
        Passed to :class:`sklearn.linear_model.Lasso`.
    max_bisect : int, default=60
        Bound on the bisection steps.

    Returns
    -------
    Selection

    Notes
    -----
    The objective depends on the samples only through ``G = Z^T Z`` (c x c) and
    ``g = Z^T T``: ``||T - Z beta||^2 = ||T||^2 - 2 beta.g + beta^T G beta``. With the
    Cholesky factor ``G = L L^T`` the same minimiser is obtained from a Lasso on the c x c
    design ``L^T`` and target ``L^{-1} g`` with ``alpha_cc = alpha (N n) / c``, because
    scikit-learn scales the loss by ``1 / (2 n_rows)``. If no penalty gives exactly
    ``keep`` nonzeros (channels entering together), the nearest denser solution is
    truncated to the ``keep`` channels of largest contribution ``|beta_i| ||Z_i||``, ties
    to the lower index, and ``exact`` is False.
    """
    n, c, _ = weight.shape
    if keep >= c:
        return Selection(kept=np.arange(c, dtype=np.int64), coef=np.ones(c), alpha=0.0)
    gram, linear, t2 = channel_gram(moments, weight, bias)
    w_norm = np.linalg.norm(weight, axis=(0, 2)) if normalize else None
    return select_lasso_gram(
        gram, linear, t2, keep, w_norm=w_norm, n_rows=moments.n_samples * n,
        max_iter=max_iter, tol=tol, max_bisect=max_bisect,
    )  # fmt: skip


def select_lasso_gram(
    gram: np.ndarray,
    linear: np.ndarray,
    t2: float,
    keep: int,
    *,
    w_norm: Optional[np.ndarray] = None,
    n_rows: int = 1,
    max_iter: int = 1000,
    tol: float = 1e-6,
    max_bisect: int = 60,
) -> Selection:
    """:func:`select_lasso` on the reduced problem ``(G, g, ||T||^2)`` itself.

    The objective is ``||T - Z beta||^2 = t2 - 2 beta.g + beta^T G beta``: one layer's
    channel Gram (:func:`channel_gram`), or a sum of several layers' over a channel group
    that they all read (the group's channels then share one ``beta``).

    Parameters
    ----------
    gram : ndarray of shape (c, c)
        ``G``, symmetric positive semi-definite.
    linear : ndarray of shape (c,)
        ``g``.
    t2 : float
        ``||T||^2``.
    keep : int
        Channels to keep, in ``[1, c]``.
    w_norm : ndarray of shape (c,), optional
        Scale of each channel's weights: the LASSO runs on ``Z_i / w_norm_i`` (the paper's
        unit-norm weights); None runs on ``Z_i`` as they are.
    n_rows : int, default=1
        Rows of the raw problem (samples times outputs): only the units of the reported
        ``alpha``.
    max_iter, tol, max_bisect
        As in :func:`select_lasso`.

    Returns
    -------
    Selection
    """
    c = gram.shape[0]
    if keep >= c:
        return Selection(kept=np.arange(c, dtype=np.int64), coef=np.ones(c), alpha=0.0)
    gram_raw, linear_raw = gram, linear
    scale = np.sqrt(np.clip(np.diag(gram), 0.0, None))  # ||Z_i||; zero for dead channels
    if w_norm is not None:
        w_norm = np.where(w_norm > 0, w_norm, 1.0)
        gram = gram / np.outer(w_norm, w_norm)
        linear = linear / w_norm
    else:
        w_norm = np.ones(c)
    # A tiny jitter keeps the Cholesky factor defined for rank-deficient G (dead channels,
    # fewer samples than channels); it perturbs the objective by ~1e-12 relative, more
    # only where rounding left G slightly indefinite (a Gram summed over several layers).
    mean_diag = max(float(np.trace(gram)) / c, np.finfo(float).tiny)
    for relative in (1e-12, 1e-9, 1e-6):
        try:
            chol = np.linalg.cholesky(gram + relative * mean_diag * np.eye(c))
            break
        except np.linalg.LinAlgError:
            if relative == 1e-6:
                raise ValueError(
                    "the channel Gram is not positive semi-definite (NaN, Inf or a wrong "
                    "sign in the statistics?)."
                ) from None
    design = np.ascontiguousarray(chol.T)
    target = scipy.linalg.solve_triangular(chol, linear, lower=True)
    to_cc = n_rows / c

    model = Lasso(
        alpha=1.0,
        fit_intercept=False,
        precompute=True,
        max_iter=max_iter,
        tol=tol,
        warm_start=True,
        selection="cyclic",
    )
    not_converged: list[float] = []

    def fit(alpha: float) -> np.ndarray:
        model.alpha = alpha * to_cc
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SklearnConvergenceWarning)
            model.fit(design, target)
        if any(issubclass(w.category, SklearnConvergenceWarning) for w in caught):
            not_converged.append(float(model.dual_gap_))
        else:
            not_converged.clear()
        return model.coef_.copy()

    alpha_hi = float(np.max(np.abs(linear))) / n_rows  # at and above it, beta = 0
    if alpha_hi <= 0:
        # No channel correlates with the target (e.g. a zero target): fall back to scale.
        return Selection(kept=_top_k(scale, keep), coef=np.zeros(c), alpha=0.0, exact=False)

    n_iter = 0
    alpha_lo, coef_lo = alpha_hi, np.zeros(c)
    # Walk down one decade at a time (the warm-started path direction) to bracket keep.
    for _ in range(16):
        alpha_lo = alpha_lo / 10.0
        coef_lo = fit(alpha_lo)
        n_iter += 1
        if np.count_nonzero(coef_lo) >= keep:
            break
    nnz_lo = np.count_nonzero(coef_lo)
    best_alpha, best_coef = alpha_lo, coef_lo
    if nnz_lo > keep:
        lo, hi = math.log(alpha_lo), math.log(alpha_hi)
        for _ in range(max_bisect):
            mid = 0.5 * (lo + hi)
            coef = fit(math.exp(mid))
            n_iter += 1
            nnz = np.count_nonzero(coef)
            if nnz == keep:
                best_alpha, best_coef = math.exp(mid), coef
                break
            if nnz > keep:
                lo, best_alpha, best_coef = mid, math.exp(mid), coef
            else:
                hi = mid
            if hi - lo < 1e-12:
                break
    if not_converged:
        warnings.warn(
            f"Lasso did not converge at alpha={best_alpha:.3g}: duality gap "
            f"{not_converged[-1]:.3g} above tol={tol:g} x ||target||^2; raise max_iter.",
            ConvergenceWarning,
            stacklevel=2,
        )
    coef = best_coef / w_norm  # multiplier of the unnormalised W_i
    nnz = np.count_nonzero(best_coef)
    exact = bool(nnz == keep)
    if exact:
        kept = np.flatnonzero(best_coef).astype(np.int64)
    else:
        contribution = np.abs(coef) * scale
        kept = _top_k(contribution, keep)
        logger.debug("lasso: no alpha gives exactly %d nonzeros (got %d); truncated", keep, nnz)
    mask = np.zeros(c, dtype=bool)
    mask[kept] = True
    coef = np.where(mask, coef, 0.0)
    # ||T - Z coef||^2 from the c x c moments: the caller's error before the refit,
    # without a product over the (d x d) Gram of the kept blocks.
    error = t2 - 2.0 * float(coef @ linear_raw) + float(coef @ gram_raw @ coef)
    return Selection(
        kept=kept, coef=coef, alpha=best_alpha, n_iter=n_iter, exact=exact, error=max(error, 0.0)
    )


def select_greedy_gram(
    gram: np.ndarray,
    linear: np.ndarray,
    keep: int,
    *,
    t2: float = 0.0,
    max_swaps: int = 0,
    tol: float = 1e-4,
) -> Selection:
    """Backward elimination on the reduced problem ``min_beta t2 - 2 beta.g + beta^T G beta``.

    The channel-level analogue of :func:`select_greedy_ls`: each channel's original
    weights are scaled by one ``beta_i``, refit by least squares over the kept channels;
    the channel whose removal raises that optimum least goes, ``beta_i^2 / [G_KK^-1]_ii``,
    with a rank-one downdate of the inverse. It works on any ``(G, g)``, so on a channel
    group read by several layers (their reduced problems summed).

    Parameters
    ----------
    gram : ndarray of shape (c, c)
    linear : ndarray of shape (c,)
    keep : int
    t2 : float, default=0.0
        ``||T||^2``; only shifts the objective, used by the swap search's relative stop.
    max_swaps, tol : int, float
        Swap search after the elimination, as in :func:`select_greedy_swap` (off by
        default).

    Returns
    -------
    Selection
        ``info["removed"]`` lists the channels in removal order; with swaps,
        ``info["errors"]`` and ``info["swaps"]`` as in :func:`select_greedy_swap`.
    """
    c = gram.shape[0]
    if keep >= c:
        return Selection(kept=np.arange(c, dtype=np.int64))
    scale = float(np.trace(gram)) / c
    if not scale > 1e-250:  # every channel is dead: any choice reconstructs equally (nothing)
        return Selection(kept=np.arange(keep, dtype=np.int64), info={"removed": []})
    # A relative jitter keeps the inverse defined for dead or duplicate channels.
    jitter = 1e-10 * scale
    H = np.linalg.inv(gram + jitter * np.eye(c))
    beta = H @ linear
    alive = np.ones(c, dtype=bool)
    removed = []
    for _ in range(c - keep):
        live = np.flatnonzero(alive)
        cost = beta[live] ** 2 / np.diag(H)[live]
        i = int(live[np.argmin(cost)])
        h = H[:, i].copy()
        beta -= h * (beta[i] / h[i])
        H -= np.outer(h, h) / h[i]
        alive[i] = False
        H[i, :] = H[:, i] = 0.0
        beta[i] = 0.0
        removed.append(i)
    kept = np.flatnonzero(alive).astype(np.int64)
    info = {"removed": removed}
    if max_swaps > 0:
        kept, errors, swaps = _swap_search(
            gram, linear[:, None], t2, 1, kept, n_channels=gram.shape[0],
            max_swaps=max_swaps, tol=tol,
        )  # fmt: skip
        info.update(errors=errors, swaps=swaps)
    return Selection(kept=kept, n_iter=c - keep, info=info)


# ---------------------------------------------------------------------------- greedy LS
# greedy_ls compacts its arrays to the live rows when they fall under this share of the
# rows held: each compaction copies them once, each step then reads fewer.
_COMPACT = 0.75


def _held_rows(factor: np.ndarray, rows: np.ndarray, filled: int) -> np.ndarray:
    """``factor[rows]`` with only its first ``filled`` columns copied (the rest are zero,
    to be written by later steps)."""
    out = np.zeros((rows.size, factor.shape[1]))
    out[:, :filled] = factor[rows, :filled]
    return out


def _inverse_psd(gram: np.ndarray, ridge: float, moments: Moments) -> np.ndarray:
    """Inverse of the (ridge-regularised) Gram; grows the ridge if it is numerically
    singular (dead channels, fewer samples than unknowns), with a warning.

    Through a Cholesky factor (torch's LAPACK, float64): a 4609 x 4609 Gram (a 512-channel
    3x3 layer) takes about 3.0 s on this project's 2-core CPU against 4.5 s for a general
    LU inverse, and a failed factorisation flags a Gram that is not positive definite.
    """
    cols = np.arange(gram.shape[0])
    for attempt in range(6):
        # Diagonally scaled, so that features of very different scales (the ones column
        # beside activations of 1e4) are not taken for a singular matrix: the pivots and
        # diag(inverse) * diag(gram) are then those of the correlations.
        d = np.sqrt(np.clip(np.diag(gram), np.finfo(float).tiny, None))
        factor = cholesky_factor(gram / np.outer(d, d))  # None: numerically singular
        if factor is not None:
            inverse = torch.cholesky_inverse(factor).numpy() / np.outer(d, d)
            diag = np.diag(inverse) * np.diag(gram)
            if np.all(np.isfinite(diag)) and diag.min() > 0 and diag.max() < 1e13:
                if attempt:
                    warnings.warn(
                        f"the Gram matrix is singular; greedy_ls used ridge={ridge:.1e} "
                        "instead. Sample more positions or pass ridge > 0.",
                        SingularGramWarning,
                        stacklevel=3,
                    )
                return inverse
        ridge = max(ridge * 100.0, 1e-10)
        gram = regularized_gram(moments, cols, ridge)
    raise np.linalg.LinAlgError("the Gram matrix of the layer's inputs is singular.")


def select_greedy_ls(moments: Moments, keep: int, *, ridge: float = 0.0) -> Selection:
    """Backward elimination of channels on the least-squares refit objective.

    Starting from all channels, repeatedly remove the channel block ``g`` whose removal
    raises the refit error least. With ``H`` the inverse Gram of the kept blocks (plus the
    ones column, which is never removed) and ``W = H B`` the current least-squares
    solution, that increase is exactly ``tr(W_g^T [H_gg]^{-1} W_g)``; after removing ``g``,
    ``H <- H - H_:g H_gg^{-1} H_g:`` and ``W <- W - H_:g H_gg^{-1} W_g``.

    Parameters
    ----------
    moments : Moments
    keep : int
    ridge : float, default=0.0
        Relative ridge of the refit objective (see
        :func:`chanprune.refit.least_squares_refit`); use the same value for the refit.

    Returns
    -------
    Selection
        ``info["cost"]`` lists the error increase of each removal, in removal order, and
        ``info["removed"]`` the channels in that order.

    Notes
    -----
    ``H`` is never updated in full: with ``T`` removals so far, ``H = H0 - C R^T`` where
    the ``T k`` columns of ``C`` and ``R`` are the couplings ``H_:g H_gg^{-1}`` and columns
    ``H_:g`` of the removed blocks. Each step reads one column block of ``H`` through that
    low-rank form (``O(d T k^2)``) and updates the ``k x k`` diagonal blocks and ``W``, so
    the whole elimination costs ``O(d^3)`` for the first inverse plus ``O(d k^2 T^2)``,
    against ``O(d^2 k T)`` of memory-bound full updates. Only the rows of the live blocks
    are read: the arrays are compacted to them as blocks are removed, which halves the
    low-rank reads when three quarters of the channels go.
    """
    c, k = moments.n_channels, moments.block_size
    if keep >= c:
        return Selection(kept=np.arange(c, dtype=np.int64))
    d = moments.n_features
    gram = regularized_gram(moments, np.arange(d + 1), ridge)
    H0 = _inverse_psd(gram, ridge, moments)
    W = H0 @ moments.xty  # (d + 1, n): the current least-squares solution
    idx = np.arange(c)[:, None] * k + np.arange(k)  # (c, k) rows of each block
    diag = H0[idx[:, :, None], idx[:, None, :]]  # (c, k, k) diagonal blocks of H
    n_steps = c - keep
    # A removed block's rows of H, W, C and R are never read again: the arrays hold only
    # the rows of the live blocks and the ones row, and are compacted to them whenever
    # the removed rows exceed a quarter of those held (``where``: the held position of
    # each original row).
    where = np.arange(d + 1)
    H = H0  # (held rows, d + 1): rows of H0
    coupling = np.zeros((d + 1, n_steps * k))  # C
    columns = np.zeros((d + 1, n_steps * k))  # R
    alive = np.ones(c, dtype=bool)
    removed, costs = [], []
    for t in range(n_steps):
        live = np.flatnonzero(alive)
        w_blocks = W[where[idx[live]]]  # (g, k, n)
        if k == 1:
            cost = np.einsum("gn,gn->g", w_blocks[:, 0], w_blocks[:, 0]) / diag[live, 0, 0]
        else:
            # tr(W_g^T H_gg^-1 W_g) = <H_gg^-1, W_g W_g^T>: small k x k products only
            # (a batched matmul: about twice as fast as the same einsum here).
            outer = w_blocks @ w_blocks.transpose(0, 2, 1)
            cost = np.einsum("gpq,gpq->g", np.linalg.inv(diag[live]), outer)
        j = int(np.argmin(cost))
        g = int(live[j])
        removed.append(g)
        costs.append(float(cost[j]))
        rows = where[idx[g]]
        used = slice(0, t * k)
        h_cols = H[:, idx[g]] - coupling[:, used] @ columns[rows, used].T  # H_:g, (held, k)
        step = h_cols @ np.linalg.inv(h_cols[rows])  # H_:g H_gg^-1
        W -= step @ W[rows]
        new = slice(t * k, (t + 1) * k)
        coupling[:, new] = step
        columns[:, new] = h_cols
        alive[g] = False
        # Diagonal blocks of the downdated H: H_hh -= step_h h_cols_h^T.
        live = np.flatnonzero(alive)
        live_rows = where[idx[live]]
        diag[live] -= step[live_rows] @ h_cols[live_rows].transpose(0, 2, 1)
        if t + 1 < n_steps and live.size * k + 1 < _COMPACT * W.shape[0]:
            held = np.append(idx[live].ravel(), d)
            at = where[held]
            H, W = H[at], W[at]
            coupling, columns = (_held_rows(a, at, (t + 1) * k) for a in (coupling, columns))
            where = np.full(d + 1, -1)
            where[held] = np.arange(held.size)
    kept = np.flatnonzero(alive).astype(np.int64)
    return Selection(kept=kept, n_iter=n_steps, info={"removed": removed, "cost": costs})


# ---------------------------------------------------------------------------- swaps
#: Pairs (kept block, dropped block) evaluated at once by the swap search: bounds its
#: temporaries to a few tens of MB (each pair holds a few k x k float64 matrices).
_SWAP_CHUNK = 8192


def _psd_inverse(gram: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite ``gram``; a relative jitter for a
    numerically singular one (dead or duplicate channels: the swap search only compares
    errors, which the jitter moves by rounding)."""
    scale = float(np.mean(np.diag(gram))) or 1.0
    jitter = 0.0
    for _ in range(8):
        factor = cholesky_factor(gram + jitter * np.eye(gram.shape[0]) if jitter else gram)
        if factor is not None:
            return torch.cholesky_inverse(factor).numpy()
        jitter = max(jitter * 100.0, 1e-12 * scale)
    raise np.linalg.LinAlgError("the Gram matrix of the kept channels is singular.")


def _swap_search(
    gram: np.ndarray,
    cross: np.ndarray,
    t2: float,
    block_size: int,
    kept: np.ndarray,
    *,
    n_channels: int,
    max_swaps: int,
    tol: float,
) -> tuple[np.ndarray, list[float], list[tuple[int, int]]]:
    """Exchange a kept and a dropped channel block while the least-squares error falls.

    The problem is ``E(S) = t2 - tr(B_S^T G_SS^-1 B_S)``: the error of the best linear
    fit of the targets from the kept blocks ``S`` plus any trailing columns of ``gram``
    past ``n_channels * block_size`` (the ones column), which are always kept. Every pair is
    scored exactly, from the kept set's inverse ``H`` and solution ``W = H B_S``:
    removing block ``i`` raises ``E`` by ``tr(W_i^T H_ii^-1 W_i)``; adding block ``j`` to
    ``S \\ i`` then lowers it by ``tr(R_j'^T Sc_j'^-1 R_j')``, where, with ``C = G_jS
    H_:i`` and ``Q = H_ii^-1``, the residual and Schur complement of ``j`` given ``S \\
    i`` are those given ``S`` plus a rank-``k`` correction: ``R_j' = R_j + C Q W_i``,
    ``Sc_j' = Sc_j + C Q C^T``. The best pair is applied if it lowers ``E`` by more
    than ``tol * E``; at most ``max_swaps`` times.

    Returns the kept blocks (sorted), the error of ``kept`` as given and after each
    accepted swap, and the swaps as (removed, added) pairs.
    """
    k, c = block_size, n_channels  # (c * k + 1) // k would count the ones column at k = 1
    fixed = np.arange(c * k, gram.shape[0])
    kept = previous = np.sort(np.asarray(kept, dtype=np.int64))
    errors: list[float] = []
    swaps: list[tuple[int, int]] = []
    scale = float(np.mean(np.diag(gram)[: c * k])) or 1.0
    jitter = 1e-12 * scale * np.eye(k)
    for _ in range(max_swaps + 1):
        dropped = np.setdiff1d(np.arange(c), kept)
        cols = np.append((kept[:, None] * k + np.arange(k)).ravel(), fixed)
        H = _psd_inverse(gram[np.ix_(cols, cols)])
        W = H @ cross[cols]  # (m, n)
        errors.append(t2 - float(np.sum(W * cross[cols])))
        if len(errors) > 1 and errors[-1] >= errors[-2]:
            # Rounding made the predicted gain of the last swap vanish: undo it, stop.
            errors.pop()
            swaps.pop()
            kept = previous
            break
        if len(errors) > max_swaps or not dropped.size or not kept.size:
            break
        n_kept = kept.size
        blocks = np.arange(n_kept * k).reshape(n_kept, k)  # rows of each kept block in cols
        Q = np.linalg.inv(H[blocks[:, :, None], blocks[:, None, :]])  # (kept, k, k)
        W_i = W[blocks]  # (kept, k, n)
        V = Q @ W_i
        removal = np.einsum("ikn,ikn->i", W_i, V)
        VV = V @ V.transpose(0, 2, 1)
        best = (0.0, -1, -1)
        per_chunk = max(1, _SWAP_CHUNK // n_kept)
        for start in range(0, dropped.size, per_chunk):
            drop = dropped[start : start + per_chunk]
            n_drop = drop.size
            rows = (drop[:, None] * k + np.arange(k)).ravel()
            G_jS = gram[np.ix_(rows, cols)]  # (drop k, m)
            A = (G_jS @ H).reshape(n_drop, k, -1)
            R = (cross[rows] - G_jS @ W).reshape(n_drop, k, -1)  # (drop, k, n)
            blocks_j = rows.reshape(n_drop, k)
            G_jj = gram[blocks_j[:, :, None], blocks_j[:, None, :]]  # (drop, k, k)
            schur = G_jj - np.einsum("jpm,jqm->jpq", A, G_jS.reshape(n_drop, k, -1))
            RR = R @ R.transpose(0, 2, 1)
            C = A[:, :, blocks].transpose(0, 2, 1, 3)  # (drop, kept, k, k): G_jS H_:i
            P = (V.reshape(n_kept * k, -1) @ R.reshape(n_drop * k, -1).T).reshape(
                n_kept, k, n_drop, k
            ).transpose(2, 0, 1, 3)  # V_i R_j^T
            CP = C @ P
            Ct = C.transpose(0, 1, 3, 2)
            N = RR[:, None] + CP + CP.transpose(0, 1, 3, 2) + C @ VV[None] @ Ct
            S = schur[:, None] + C @ Q[None] @ Ct + jitter
            gain = np.einsum("jipp->ji", np.linalg.solve(S, N))
            delta = removal[None, :] - gain  # (drop, kept)
            j, i = np.unravel_index(int(np.argmin(delta)), delta.shape)
            if delta[j, i] < best[0]:
                best = (float(delta[j, i]), int(kept[i]), int(drop[j]))
        if not best[0] < -tol * abs(errors[-1]):
            break
        previous = kept
        kept = np.sort(np.append(kept[kept != best[1]], best[2]))
        swaps.append((best[1], best[2]))
    return kept, errors, swaps


#: Default cap on the exchanges of :func:`select_greedy_swap`; each costs about one
#: inverse of the kept Gram plus ``O(c^2 k^3)`` pair scores.
MAX_SWAPS = 16


def select_greedy_swap(
    moments: Moments,
    keep: int,
    *,
    ridge: float = 0.0,
    max_swaps: int = MAX_SWAPS,
    tol: float = 1e-4,
) -> Selection:
    """:func:`select_greedy_ls`, then swap search on the same refit objective.

    Backward elimination never revisits a removal: a channel dropped early, while a
    correlated one was still kept, stays dropped after that one goes too. The swap search
    scores every (kept, dropped) pair exactly and applies the exchange that lowers the
    least-squares error most, until none lowers it by more than ``tol`` times the error,
    or ``max_swaps`` exchanges were made.

    Parameters
    ----------
    moments : Moments
    keep : int
    ridge : float, default=0.0
        Relative ridge of the refit objective, as in :func:`select_greedy_ls`.
    max_swaps : int, default=MAX_SWAPS
        At most this many exchanges (0: ``greedy_ls`` alone).
    tol : float, default=1e-4
        Stop when the best exchange lowers the error by less than ``tol`` times it.

    Returns
    -------
    Selection
        ``info["errors"]`` is the (ridge-regularised) squared error of the greedy set and
        after each exchange; ``info["swaps"]`` the exchanges made, as (out, in) pairs.
    """
    greedy = select_greedy_ls(moments, keep, ridge=ridge)
    if keep >= moments.n_channels or max_swaps <= 0:
        return greedy
    d = moments.n_features
    gram = regularized_gram(moments, np.arange(d + 1), ridge)
    kept, errors, swaps = _swap_search(
        gram, moments.xty, moments.yty, moments.block_size, greedy.kept,
        n_channels=moments.n_channels, max_swaps=max_swaps, tol=tol,
    )  # fmt: skip
    info = {**greedy.info, "errors": errors, "swaps": swaps}
    return Selection(kept=kept.astype(np.int64), n_iter=greedy.n_iter + len(swaps), info=info)


# ---------------------------------------------------------------------------- ThiNet
def select_thinet(
    moments: Moments, weight: np.ndarray, bias: Optional[np.ndarray], keep: int
) -> Selection:
    """ThiNet's greedy selection (Luo, Wu and Lin, ICCV 2017).

    Grows the set ``T`` of removed channels one at a time, each time adding the channel
    that keeps ``||sum_{i in T} Z_i||^2`` (the summed contribution of the removed channels
    to the outputs) smallest; computed exactly from the contribution Gram ``G``.

    Parameters
    ----------
    moments : Moments
    weight : ndarray of shape (n_outputs, n_channels, block_size)
    bias : ndarray of shape (n_outputs,) or None
    keep : int

    Returns
    -------
    Selection
    """
    gram, _, _ = channel_gram(moments, weight, bias)
    return select_thinet_gram(gram, keep)


def select_thinet_gram(gram: np.ndarray, keep: int) -> Selection:
    """:func:`select_thinet` on the contribution Gram ``G`` (c, c) itself, e.g. the sum of
    the Grams of all the layers reading a channel group."""
    c = gram.shape[0]
    diag = np.diag(gram).copy()
    removed_mask = np.zeros(c, dtype=bool)
    g_sum = np.zeros(c)  # G @ 1_T
    current = 0.0
    for _ in range(c - keep):
        cost = current + 2.0 * g_sum + diag
        cost[removed_mask] = np.inf
        i = int(np.argmin(cost))
        current = float(cost[i])
        removed_mask[i] = True
        g_sum += gram[:, i]
    kept = np.flatnonzero(~removed_mask).astype(np.int64)
    return Selection(kept=kept, n_iter=c - keep)


# ---------------------------------------------------------------------------- baselines
def select_max_response(weight: np.ndarray, keep: int) -> Selection:
    """Keep the channels whose consumer weights are largest: ``||W[:, i]||_1``.

    ``weight`` has shape ``(n_outputs, n_channels, block_size)``.
    """
    return Selection(kept=_top_k(np.abs(weight).sum(axis=(0, 2)), keep))


def select_first_k(n_channels: int, keep: int) -> Selection:
    """Keep channels ``0 .. keep - 1`` (a naive baseline)."""
    return Selection(kept=np.arange(min(keep, n_channels), dtype=np.int64))


def select_random(n_channels: int, keep: int, random_state=None) -> Selection:
    """Keep ``keep`` channels drawn uniformly without replacement.

    ``random_state`` is an int seed, a :class:`numpy.random.Generator` or None.
    """
    rng = np.random.default_rng(random_state)
    return Selection(
        kept=np.sort(rng.choice(n_channels, size=keep, replace=False)).astype(np.int64)
    )


def select_by_score(scores: np.ndarray, keep: int) -> Selection:
    """Keep the ``keep`` channels of highest importance ``scores`` (ties: lower index).

    This is how criteria computed outside the solver plug in: APoZ (pass ``-apoz``),
    activation entropy, or the BatchNorm scale ``|gamma|`` of Network Slimming.
    """
    return Selection(kept=_top_k(np.asarray(scores, dtype=np.float64), keep))
