"""Streaming second-moment statistics of one layer.

Everything the selection and refit solvers need is a handful of second moments of the
sampled (input patch, output) pairs, so memory does not grow with the number of samples
and statistics gathered on separate shards (processes, GPUs, data chunks) combine by
addition. With ``x`` a flattened input patch extended by a constant 1 (for the bias) and
``y`` the matching output vector:

- ``xtx = sum x x^T``, shape ``(d + 1, d + 1)`` with ``d = c * kh * kw``;
- ``xty = sum x y^T``, shape ``(d + 1, n)``;
- ``yty = sum ||y||^2`` and ``n_samples``.

Flattening is channel-major (``(c, kh, kw)`` in C order), so input channel ``i`` owns the
contiguous block of columns ``[i * kh * kw, (i + 1) * kh * kw)``; the constant column is
last. All sums are kept in float64: the refit solves normal equations whose conditioning
float32 sums would spoil.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from ._validation import check_finite

__all__ = ["LayerStats", "Moments"]

ArrayLike = Union[np.ndarray, torch.Tensor]


@dataclass(frozen=True)
class Moments:
    """The statistics of :class:`LayerStats` as float64 numpy arrays, for the solvers.

    Attributes
    ----------
    xtx : ndarray of shape (d + 1, d + 1)
        Gram matrix of the flattened patches with a trailing ones column.
    xty : ndarray of shape (d + 1, n_outputs)
        Cross moments of the patches (and the ones column) with the outputs.
    yty : float
        Sum of squared outputs, ``||Y||_F^2``.
    n_samples : int
        Number of sampled rows.
    n_channels : int
        Input channels ``c``.
    block_size : int
        Columns per input channel, ``kh * kw`` (1 for a linear layer).
    """

    xtx: np.ndarray
    xty: np.ndarray
    yty: float
    n_samples: int
    n_channels: int
    block_size: int

    @property
    def n_features(self) -> int:
        """``d = n_channels * block_size`` (without the ones column)."""
        return self.n_channels * self.block_size

    @property
    def n_outputs(self) -> int:
        return self.xty.shape[1]

    def block_columns(self, kept: np.ndarray) -> np.ndarray:
        """Column indices of the blocks of channels ``kept``, followed by the ones column."""
        kept = np.asarray(kept, dtype=np.int64)
        cols = (kept[:, None] * self.block_size + np.arange(self.block_size)).ravel()
        return np.append(cols, self.n_features)


class LayerStats:
    """Float64 second moments of one layer's input patches and outputs, filled in batches.

    Parameters
    ----------
    n_channels : int
        Input channels ``c`` of the layer.
    n_outputs : int
        Output channels (or features) ``n`` of the layer.
    kernel_size : int or tuple of int, default=1
        ``(kh, kw)`` of a conv layer; 1 for a linear layer.
    device : str or torch.device, default="cpu"
        Where the sums live; batches are moved there. CUDA works as well as CPU.
    compute_dtype : torch.float64 or torch.float32, default=torch.float64
        Precision of each batch's products. The running sums are float64 either way;
        float32 products are 2-4x faster on a CPU and err by ~1e-7 * sqrt(batch rows)
        relative per entry, well under the refit's usual ridge.

    Notes
    -----
    Two accumulators of the same layer merge with ``+`` (or ``+=``); the result is the same
    as one accumulator fed both sets of batches, up to float64 rounding.

    Examples
    --------
    >>> import torch
    >>> from chanprune import LayerStats
    >>> stats = LayerStats(n_channels=4, n_outputs=8, kernel_size=3)
    >>> _ = stats.update(torch.randn(100, 4, 3, 3), torch.randn(100, 8))
    >>> stats.n_samples
    100
    """

    def __init__(
        self,
        n_channels: int,
        n_outputs: int,
        kernel_size: int | tuple[int, int] = 1,
        *,
        device: str | torch.device = "cpu",
        compute_dtype: torch.dtype = torch.float64,
    ) -> None:
        from ._validation import check_int_in_range

        if compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"compute_dtype must be torch.float32 or torch.float64; got {compute_dtype!r}."
            )
        self.compute_dtype = compute_dtype
        self.n_channels = check_int_in_range(n_channels, "n_channels", 1)
        self.n_outputs = check_int_in_range(n_outputs, "n_outputs", 1)
        if isinstance(kernel_size, int):
            kernel_size = (kernel_size, kernel_size)
        if len(kernel_size) != 2:
            raise ValueError(f"kernel_size must be an int or a pair; got {kernel_size!r}.")
        kh = check_int_in_range(kernel_size[0], "kernel_size[0]", 1)
        kw = check_int_in_range(kernel_size[1], "kernel_size[1]", 1)
        self.kernel_size = (kh, kw)
        self.device = torch.device(device)
        d = self.n_channels * kh * kw
        self.xtx = torch.zeros(d + 1, d + 1, dtype=torch.float64, device=self.device)
        self.xty = torch.zeros(d + 1, self.n_outputs, dtype=torch.float64, device=self.device)
        self.yty = torch.zeros((), dtype=torch.float64, device=self.device)
        self.n_samples = 0

    # ------------------------------------------------------------------ accumulation
    @property
    def block_size(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    @property
    def n_features(self) -> int:
        return self.n_channels * self.block_size

    def _as_tensor(self, value: ArrayLike, name: str) -> torch.Tensor:
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{name} must be a numpy array or a torch tensor; got {type(value).__name__}."
            )
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must hold real numbers; got dtype {value.dtype}.")
        return value.detach()

    def update(self, X: ArrayLike, Y: ArrayLike) -> LayerStats:
        """Add a batch of samples.

        Parameters
        ----------
        X : array or tensor of shape (n_samples, c, kh, kw), or (n_samples, c) for kh = kw = 1
            Input patches (channel-major).
        Y : array or tensor of shape (n_samples, n_outputs)
            The layer's target outputs at the same positions.

        Returns
        -------
        self : LayerStats
        """
        X = self._as_tensor(X, "X")
        Y = self._as_tensor(Y, "Y")
        kh, kw = self.kernel_size
        if X.dim() == 2 and kh == kw == 1:
            X = X[:, :, None, None]  # a linear layer's inputs are 1x1 patches
        if X.dim() != 4 or tuple(X.shape[1:]) != (self.n_channels, kh, kw):
            also = f" or (n_samples, {self.n_channels})" if kh == kw == 1 else ""
            raise ValueError(
                f"X must have shape (n_samples, {self.n_channels}, {kh}, {kw}){also};"
                f" got {tuple(X.shape)}."
            )
        if Y.dim() != 2 or Y.shape[1] != self.n_outputs:
            raise ValueError(
                f"Y must have shape (n_samples, {self.n_outputs}); got {tuple(Y.shape)}."
            )
        if X.shape[0] != Y.shape[0]:
            raise ValueError(
                f"X and Y must have the same number of samples; got {X.shape[0]} and {Y.shape[0]}."
            )
        if X.shape[0] == 0:
            return self
        n_rows = int(X.shape[0])
        if self.device.type == "cpu":
            xtx, x_sum, xty, y_sum, yty = _products_numpy(X, Y, self.compute_dtype)
        else:
            xtx, x_sum, xty, y_sum, yty = _products_torch(X, Y, self.compute_dtype, self.device)
        # A NaN or Inf anywhere in X or Y shows on the diagonal of X^T X or in y^T y: a
        # cheap test, and the full scan (which locates the value) runs only on failure.
        if not (torch.isfinite(torch.diagonal(xtx)).all() and torch.isfinite(yty)):
            check_finite(X, "X")
            check_finite(Y, "Y")
            raise ValueError("X or Y is too large: its second moments overflow to Inf.")
        d = self.n_features
        self.xtx[:d, :d] += xtx
        self.xtx[:d, d] += x_sum
        self.xtx[d, :d] += x_sum
        self.xtx[d, d] += n_rows
        self.xty[:d] += xty
        self.xty[d] += y_sum
        self.yty += yty
        self.n_samples += n_rows
        return self

    @classmethod
    def from_samples(
        cls, X: ArrayLike, Y: ArrayLike, *, device: str | torch.device = "cpu"
    ) -> LayerStats:
        """Statistics of one set of samples; the shapes of ``X`` and ``Y`` fix the layer.

        ``X`` is ``(n_samples, c, kh, kw)`` or ``(n_samples, c)``; ``Y`` is ``(n_samples, n)``.
        """
        if X.ndim == 2:
            n_channels, kernel = X.shape[1], (1, 1)
        elif X.ndim == 4:
            n_channels, kernel = X.shape[1], (X.shape[2], X.shape[3])
        else:
            raise ValueError(
                f"X must have shape (n_samples, c, kh, kw) or (n_samples, c); got {tuple(X.shape)}."
            )
        if Y.ndim != 2:
            raise ValueError(f"Y must have shape (n_samples, n_outputs); got {tuple(Y.shape)}.")
        stats = cls(n_channels, Y.shape[1], kernel, device=device)
        return stats.update(X, Y)

    # ------------------------------------------------------------------ merging
    def _check_compatible(self, other: LayerStats) -> None:
        if not isinstance(other, LayerStats):
            raise TypeError(
                f"can only merge LayerStats with LayerStats; got {type(other).__name__}."
            )
        mine = (self.n_channels, self.n_outputs, self.kernel_size)
        theirs = (other.n_channels, other.n_outputs, other.kernel_size)
        if mine != theirs:
            raise ValueError(
                "cannot merge statistics of different layers: (n_channels, n_outputs, kernel_size)"
                f" {mine} vs {theirs}."
            )

    def __iadd__(self, other: LayerStats) -> LayerStats:
        self._check_compatible(other)
        self.xtx += other.xtx.to(self.device)
        self.xty += other.xty.to(self.device)
        self.yty += other.yty.to(self.device)
        self.n_samples += other.n_samples
        return self

    def __add__(self, other: LayerStats) -> LayerStats:
        self._check_compatible(other)
        out = self.copy()
        out += other
        return out

    def copy(self) -> LayerStats:
        out = LayerStats(
            self.n_channels, self.n_outputs, self.kernel_size, device=self.device,
            compute_dtype=self.compute_dtype,
        )  # fmt: skip
        out.xtx.copy_(self.xtx)
        out.xty.copy_(self.xty)
        out.yty.copy_(self.yty)
        out.n_samples = self.n_samples
        return out

    def to(self, device: str | torch.device) -> LayerStats:
        """A copy of the statistics on ``device``."""
        out = LayerStats(
            self.n_channels, self.n_outputs, self.kernel_size, device=device,
            compute_dtype=self.compute_dtype,
        )  # fmt: skip
        out += self
        return out

    # ------------------------------------------------------------------ export
    def moments(self) -> Moments:
        """The statistics as float64 numpy arrays (copied to the CPU)."""
        if self.n_samples == 0:
            raise ValueError(
                "the statistics are empty: call update() with at least one sample first."
            )
        return Moments(
            xtx=self.xtx.cpu().numpy().copy(),
            xty=self.xty.cpu().numpy().copy(),
            yty=float(self.yty),
            n_samples=self.n_samples,
            n_channels=self.n_channels,
            block_size=self.block_size,
        )

    def state_dict(self) -> dict:
        """Tensors and sizes, loadable with ``torch.load(weights_only=True)``."""
        return {
            "n_channels": self.n_channels,
            "n_outputs": self.n_outputs,
            "kernel_size": list(self.kernel_size),
            "n_samples": self.n_samples,
            "xtx": self.xtx.cpu(),
            "xty": self.xty.cpu(),
            "yty": self.yty.cpu(),
        }

    @classmethod
    def from_state_dict(cls, state: dict, *, device: str | torch.device = "cpu") -> LayerStats:
        out = cls(
            state["n_channels"], state["n_outputs"], tuple(state["kernel_size"]), device=device
        )
        for name in ("xtx", "xty", "yty"):
            value = state[name]
            if tuple(value.shape) != tuple(getattr(out, name).shape):
                raise ValueError(
                    f"statistics entry {name!r} has shape {tuple(value.shape)}; "
                    f"expected {tuple(getattr(out, name).shape)}."
                )
            getattr(out, name).copy_(value)
        out.n_samples = int(state["n_samples"])
        return out

    def __repr__(self) -> str:
        return (
            f"LayerStats(n_channels={self.n_channels}, n_outputs={self.n_outputs}, "
            f"kernel_size={self.kernel_size}, n_samples={self.n_samples}, device='{self.device}')"
        )


def _products_numpy(X: torch.Tensor, Y: torch.Tensor, dtype: torch.dtype):
    """Per-batch moments on the CPU through numpy, whose ``a.T @ a`` runs BLAS syrk."""
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    x = np.ascontiguousarray(X.reshape(X.shape[0], -1).cpu().numpy(), dtype=np_dtype)
    y = np.ascontiguousarray(Y.cpu().numpy(), dtype=np_dtype)
    xtx = torch.from_numpy(np.asarray(x.T @ x, dtype=np.float64))
    xty = torch.from_numpy(np.asarray(x.T @ y, dtype=np.float64))
    x_sum = torch.from_numpy(x.sum(axis=0, dtype=np.float64))
    y_sum = torch.from_numpy(y.sum(axis=0, dtype=np.float64))
    yty = torch.tensor(float(np.einsum("ij,ij->", y, y, dtype=np.float64)), dtype=torch.float64)
    return xtx, x_sum, xty, y_sum, yty


def _products_torch(X: torch.Tensor, Y: torch.Tensor, dtype: torch.dtype, device: torch.device):
    """Per-batch moments with torch on ``device`` (CUDA); TF32 is not used."""
    x = X.reshape(X.shape[0], -1).to(device, dtype)
    y = Y.to(device, dtype)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        xtx = (x.T @ x).double()
        xty = (x.T @ y).double()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    x_sum = x.sum(dim=0, dtype=torch.float64)
    y_sum = y.sum(dim=0, dtype=torch.float64)
    yty = (y.double() ** 2).sum()
    return xtx, x_sum, xty, y_sum, yty
