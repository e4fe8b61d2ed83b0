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
        float32 products are 2-4x faster on a CPU and err by ~1e-7 * sqrt(buffer rows)
        relative per entry, well under the refit's usual ridge.
    buffer_mb : float, default=192
        Rows passed to :meth:`update` are buffered (in ``compute_dtype``) up to about this
        many MiB and multiplied out in one large product: BLAS runs a few thousand rows at
        2-4x the speed per row of a 1,000-row batch. ``0`` multiplies every batch at once.
        Reading ``xtx``, ``xty``, ``yty``, :meth:`moments` or merging flushes the buffer.

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
        buffer_mb: float = 192.0,
    ) -> None:
        from ._validation import check_int_in_range, check_real_in_range

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
        self.buffer_mb = check_real_in_range(buffer_mb, "buffer_mb", 0.0)
        d = self.n_channels * kh * kw
        self._rows = _RowBuffer(d, self.n_outputs, self.buffer_mb, compute_dtype, self.device)
        self._maps: _RowBuffer | None = None  # whole maps, see update_maps
        self._geometry: _MapGeometry | None = None
        self._xtx = _new((d + 1, d + 1), torch.float64, self.device, zero=True)
        self._xty = _new((d + 1, self.n_outputs), torch.float64, self.device, zero=True)
        self._yty = torch.zeros((), dtype=torch.float64, device=self.device)
        self.n_samples = 0

    # The sums are read through properties that first multiply out the buffered rows.
    @property
    def xtx(self) -> torch.Tensor:
        """``sum x x^T`` with the ones column, float64, shape ``(d + 1, d + 1)``."""
        self.flush()
        return self._xtx

    @property
    def xty(self) -> torch.Tensor:
        """``sum x y^T`` with the ones row, float64, shape ``(d + 1, n_outputs)``."""
        self.flush()
        return self._xty

    @property
    def yty(self) -> torch.Tensor:
        """``sum ||y||^2``, a float64 scalar tensor."""
        self.flush()
        return self._yty

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
        # NaN or Inf are located now, while the caller's batch is at hand. A sum is one
        # cheap pass and propagates them (an Inf from overflow alone is let through here
        # and caught on the products).
        if not (bool(torch.isfinite(X.sum())) and bool(torch.isfinite(Y.sum()))):
            check_finite(X, "X")
            check_finite(Y, "Y")
        n_rows = int(X.shape[0])
        self.n_samples += n_rows
        buf = self._rows
        if buf.filled == 0 and n_rows >= buf.max_rows:
            # At least a buffer's worth: multiply it out as it is.
            x = X.reshape(n_rows, -1).to(self.device, self.compute_dtype)
            self._accumulate(x, Y.to(self.device, self.compute_dtype))
            return self
        start = 0
        while start < n_rows:
            take = buf.reserve(n_rows - start)
            bx, by = buf.free(take)
            # One strided copy from the caller's layout (e.g. permuted patches) into the
            # flat, channel-major buffer rows, converting the dtype on the way.
            bx[0].view(take, self.n_channels, kh, kw).copy_(X[start : start + take])
            by[0].copy_(Y[start : start + take])
            buf.filled += take
            start += take
            if buf.full:
                self._flush_rows()
        return self

    def update_maps(
        self,
        x: ArrayLike,
        y: ArrayLike,
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
    ) -> LayerStats:
        """Add every output position of whole maps of a conv layer.

        The result equals :meth:`update` with the patches at all ``H_out * W_out``
        positions, but ``X^T X`` comes from the Gram matrix of whole input maps
        (``n_images x c H W``) and a cheap re-indexing: ``n_images (c H W)^2 / 2``
        multiply-adds instead of ``n_images H_out W_out (c kh kw)^2 / 2``. That wins on
        small maps (the 4x4 and 2x2 deep maps of a CIFAR network), and needs
        ``(c H W)^2`` floats of memory.

        Parameters
        ----------
        x : array or tensor of shape (n_images, c, H, W)
            The layer's input maps (unpadded).
        y : array or tensor of shape (n_images, n_outputs, H_out, W_out)
            Its target output maps; ``H_out, W_out`` must be the conv's output size.
        stride, padding, dilation : int or pair of int
            The conv's geometry (zero padding).

        Returns
        -------
        self : LayerStats
        """
        x = self._as_tensor(x, "x")
        y = self._as_tensor(y, "y")
        if x.dim() != 4 or x.shape[1] != self.n_channels:
            raise ValueError(
                f"x must have shape (n_images, {self.n_channels}, H, W); got {tuple(x.shape)}."
            )
        geometry = _MapGeometry.of(tuple(x.shape[2:]), self.kernel_size, stride, padding, dilation)
        expected = (x.shape[0], self.n_outputs) + geometry.out_size
        if tuple(y.shape) != expected:
            raise ValueError(
                f"y must have shape {expected} (n_images, n_outputs, H_out, W_out for this "
                f"geometry); got {tuple(y.shape)}."
            )
        if x.shape[0] == 0:
            return self
        if not (bool(torch.isfinite(x.sum())) and bool(torch.isfinite(y.sum()))):
            check_finite(x, "x")
            check_finite(y, "y")
        if geometry != self._geometry:
            self._flush_maps()
            self._geometry = geometry
            hw, p = geometry.in_pixels, geometry.out_pixels
            self._maps = _RowBuffer(
                self.n_channels, self.n_outputs, self.buffer_mb, self.compute_dtype,
                self.device, lead=(hw, p),
            )  # fmt: skip
        n_images = int(x.shape[0])
        self.n_samples += n_images * geometry.out_pixels
        buf, start = self._maps, 0
        while start < n_images:
            take = buf.reserve(n_images - start)
            bx, by = buf.free(take)
            # Pixel-major blocks (pixel, image, channel): each pixel's (images, channels)
            # matrix is contiguous for the (pixel, position) products of _flush_maps, and
            # the copy from a channels-last cache moves whole channel vectors.
            bx.view(*x.shape[2:], take, x.shape[1]).copy_(
                x[start : start + take].permute(2, 3, 0, 1)
            )
            by.view(*y.shape[2:], take, y.shape[1]).copy_(
                y[start : start + take].permute(2, 3, 0, 1)
            )
            buf.filled += take
            start += take
            if buf.full:
                self._flush_maps()
        return self

    def flush(self) -> LayerStats:
        """Multiply out the buffered rows and maps into the float64 sums (idempotent)."""
        self._flush_rows()
        self._flush_maps()
        return self

    def _flush_rows(self) -> None:
        if self._rows.filled:
            x, y = self._rows.take()
            self._accumulate(x[0], y[0])

    def _flush_maps(self) -> None:
        if self._maps is None or not self._maps.filled:
            return
        x, y = self._maps.take()  # pixel-major: (H W, images, c) and (P, images, n)
        g, c, n = self._geometry, self.n_channels, self.n_outputs
        hw, p, k = g.in_pixels, g.out_pixels, g.index.shape[1]
        n_images = x.shape[1]
        # X^T X: the pixel Gram as (hw * hw, c * c) blocks, so that summing the (k x k)
        # pixel pairs of every patch is one product with the incidence matrix
        # (k * k, hw * hw) of the geometry. a5[k, l] is the (c x c) block of kernel
        # offsets (k, l).
        pairs = g.pair_counts
        gram = _pixel_gram(x, (pairs.sum(dim=0) > 0).view(hw, hw))
        a5 = _matmul(pairs.to(device=x.device, dtype=gram.dtype), gram).view(k, k, c, c)
        blocks = _no_tf32(lambda: _offset_products(x, y, g.index))  # (k, c, n)
        xty = blocks.double().permute(1, 0, 2).reshape(c * k, n)
        pixel_sum = x.sum(dim=1, dtype=torch.float64)  # (hw, c)
        pixel_sum = torch.cat([pixel_sum, pixel_sum.new_zeros(1, c)])  # padding sums to 0
        x_sum = pixel_sum[g.index.to(x.device)].sum(dim=0).T  # (c, k)
        d = self.n_features
        self._xtx[:d, :d].view(c, k, c, k).add_(a5.permute(2, 0, 3, 1))
        self._xtx[:d, d] += x_sum.reshape(d)
        self._xtx[d, :d] += x_sum.reshape(d)
        self._xtx[d, d] += n_images * p
        self._xty[:d] += xty
        self._xty[d] += y.sum(dim=(0, 1), dtype=torch.float64)
        self._yty += sum(_sum_squares(y_position) for y_position in y)
        if not (torch.isfinite(torch.diagonal(self._xtx)).all() and torch.isfinite(self._yty)):
            raise ValueError("x or y is too large: its second moments overflow to Inf.")

    def _accumulate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add the products of 2-D ``x`` (rows, d) and ``y`` (rows, n) to the sums."""
        if self.device.type == "cpu":
            xtx, x_sum, xty, y_sum, yty = _products_numpy(x, y)
        else:
            xtx, x_sum, xty, y_sum, yty = _products_torch(x, y)
        # Finite inputs (checked in update) can still overflow the products; the diagonal
        # of X^T X and y^T y show it.
        if not (torch.isfinite(torch.diagonal(xtx)).all() and torch.isfinite(yty)):
            raise ValueError(
                "X or Y is too large: its second moments overflow to Inf in "
                f"{str(self.compute_dtype).replace('torch.', '')}."
            )
        d = self.n_features
        self._xtx[:d, :d] += xtx
        self._xtx[:d, d] += x_sum
        self._xtx[d, :d] += x_sum
        self._xtx[d, d] += x.shape[0]
        self._xty[:d] += xty
        self._xty[d] += y_sum
        self._yty += yty

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
        self.flush()
        self._xtx += other.xtx.to(self.device)
        self._xty += other.xty.to(self.device)
        self._yty += other.yty.to(self.device)
        self.n_samples += other.n_samples
        return self

    def all_reduce(self, process_group=None) -> LayerStats:
        """Sum the statistics over the ranks of ``process_group`` (``torch.distributed``,
        float64), in place: every rank then holds the statistics of the union of their
        samples. A no-op without a group."""
        if process_group is None:
            return self
        from .distributed import all_reduce_sum

        self.flush()
        self._xtx = all_reduce_sum(self._xtx, process_group)
        self._xty = all_reduce_sum(self._xty, process_group)
        self._yty = all_reduce_sum(self._yty, process_group)
        count = torch.tensor(float(self.n_samples), dtype=torch.float64)
        self.n_samples = int(all_reduce_sum(count, process_group))
        return self

    def __add__(self, other: LayerStats) -> LayerStats:
        self._check_compatible(other)
        out = self.copy()
        out += other
        return out

    def copy(self) -> LayerStats:
        out = LayerStats(
            self.n_channels, self.n_outputs, self.kernel_size, device=self.device,
            compute_dtype=self.compute_dtype, buffer_mb=self.buffer_mb,
        )  # fmt: skip
        out._xtx.copy_(self.xtx)
        out._xty.copy_(self.xty)
        out._yty.copy_(self.yty)
        out.n_samples = self.n_samples
        return out

    def to(self, device: str | torch.device) -> LayerStats:
        """A copy of the statistics on ``device``."""
        out = LayerStats(
            self.n_channels, self.n_outputs, self.kernel_size, device=device,
            compute_dtype=self.compute_dtype, buffer_mb=self.buffer_mb,
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
            getattr(out, "_" + name).copy_(value)
        out.n_samples = int(state["n_samples"])
        return out

    def __repr__(self) -> str:
        return (
            f"LayerStats(n_channels={self.n_channels}, n_outputs={self.n_outputs}, "
            f"kernel_size={self.kernel_size}, n_samples={self.n_samples}, device='{self.device}')"
        )


class _RowBuffer:
    """Rows waiting to be multiplied out: ``x`` (lead_x, rows, width_x) and ``y``
    (lead_y, rows, width_y), with one leading axis: 1 for sampled rows, the pixels for
    whole maps.

    Whole maps use a leading pixel axis, so that each pixel's (rows, channels) block is
    contiguous: the per-offset products of ``X^T Y`` ran 1.1-1.3x faster on it than on
    strided views (512-channel 4x4 maps, 3,000-4,500 images). Allocated on first use and
    grown by doubling up to about ``mb`` MiB, so statistics fed few rows stay small;
    ``full`` says when to flush.
    """

    def __init__(
        self, width_x: int, width_y: int, mb: float, dtype, device, lead: tuple[int, int] = (1, 1)
    ) -> None:
        row_bytes = (lead[0] * width_x + lead[1] * width_y) * (4 if dtype == torch.float32 else 8)
        self.max_rows = int(mb * 2**20 // row_bytes)
        self.shapes = ((lead[0], width_x), (lead[1], width_y))
        self.options = dict(dtype=dtype, device=device)
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.filled = 0

    @property
    def capacity(self) -> int:
        return 0 if self.x is None else self.x.shape[1]

    @property
    def full(self) -> bool:
        return self.filled >= max(self.max_rows, 1)

    def reserve(self, wanted: int) -> int:
        """Make room for up to ``wanted`` more rows; return how many fit now (>= 1)."""
        capacity = self.capacity
        if self.filled + wanted > capacity and capacity < max(self.max_rows, 1):
            new = min(max(self.max_rows, 1), max(2 * capacity, self.filled + wanted))
            (lead_x, width_x), (lead_y, width_y) = self.shapes
            x = _new((lead_x, new, width_x), **self.options)
            y = _new((lead_y, new, width_y), **self.options)
            if self.filled:
                x[:, : self.filled] = self.x[:, : self.filled]
                y[:, : self.filled] = self.y[:, : self.filled]
            self.x, self.y, capacity = x, y, new
        return min(wanted, capacity - self.filled)

    def free(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``rows`` unused rows of both buffers (views to copy into), shaped
        (lead, rows, width)."""
        span = slice(self.filled, self.filled + rows)
        return self.x[:, span], self.y[:, span]

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled rows (views, valid until the next write), shaped (lead, rows, width);
        empties the buffer."""
        rows, self.filled = self.filled, 0
        return self.x[:, :rows], self.y[:, :rows]


@dataclass(frozen=True)
class _MapGeometry:
    """Input and output map sizes of a conv, and the input pixel under each patch entry."""

    in_size: tuple[int, int]
    out_size: tuple[int, int]
    index: torch.Tensor  # (out_pixels, kh * kw), long; in_pixels marks zero padding

    @property
    def pair_counts(self) -> torch.Tensor:
        """(K * K, hw * hw): how many output positions put input pixels (u, v) under
        kernel offsets (k, l); padding pixels count for nothing."""
        hw, (p, k) = self.in_pixels, self.index.shape
        u = self.index[:, :, None].expand(p, k, k)
        v = self.index[:, None, :].expand(p, k, k)
        kl = torch.arange(k * k).view(1, k, k).expand(p, k, k)
        valid = (u < hw) & (v < hw)
        counts = torch.zeros(k * k, hw * hw, dtype=torch.float64)
        counts.index_put_(
            (kl[valid], (u * hw + v)[valid]), torch.ones(int(valid.sum()), dtype=torch.float64),
            accumulate=True,
        )  # fmt: skip
        return counts

    @property
    def in_pixels(self) -> int:
        return self.in_size[0] * self.in_size[1]

    @property
    def out_pixels(self) -> int:
        return self.out_size[0] * self.out_size[1]

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, _MapGeometry)
            and (self.in_size, self.out_size) == (other.in_size, other.out_size)
            and torch.equal(self.index, other.index)
        )

    @classmethod
    def of(cls, in_size, kernel_size, stride, padding, dilation) -> _MapGeometry:
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        (h, w), (kh, kw) = in_size, kernel_size
        (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if ho < 1 or wo < 1:
            raise ValueError(f"a {kh}x{kw} kernel does not fit an input map of {h}x{w}.")
        rows = torch.arange(ho)[:, None] * sh - ph + torch.arange(kh)[None, :] * dh  # (ho, kh)
        cols = torch.arange(wo)[:, None] * sw - pw + torch.arange(kw)[None, :] * dw  # (wo, kw)
        r = rows[:, None, :, None]
        q = cols[None, :, None, :]
        inside = (r >= 0) & (r < h) & (q >= 0) & (q < w)  # (ho, wo, kh, kw)
        index = torch.where(inside, r * w + q, h * w).reshape(ho * wo, kh * kw)
        return cls((h, w), (ho, wo), index)


def _new(shape: tuple[int, ...], dtype: torch.dtype, device, *, zero: bool = False):
    """A new tensor. On the CPU its memory comes from numpy, whose allocator asks the
    kernel for transparent huge pages on large arrays (torch's does only with
    ``THP_MEM_ALLOC_ENABLE=1``): first touching a 192 MB buffer then costs ~100 page
    faults instead of ~50,000, a third of a second per GB on the machine measured."""
    device = torch.device(device)
    if device.type != "cpu":
        return (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=device)
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    return torch.from_numpy((np.zeros if zero else np.empty)(shape, dtype=np_dtype))


def _sum_squares(y: torch.Tensor) -> torch.Tensor:
    """``sum(y ** 2)`` accumulated in float64, as a 0-d float64 tensor (on the CPU without
    a float64 copy of ``y``)."""
    if y.device.type == "cpu":
        y = np.ascontiguousarray(y.numpy())
        total = float(np.einsum("ij,ij->", y, y, dtype=np.float64))
        return torch.tensor(total, dtype=torch.float64)
    return (y.double() ** 2).sum()


def _pixel_gram(x: torch.Tensor, needed: torch.Tensor) -> torch.Tensor:
    """The blocks ``x[u]^T x[v]`` of pixel-major maps ``x`` (hw, images, c), as shape
    (hw * hw, c * c) in ``x``'s dtype, for the pixel pairs that share a patch (``needed``
    (hw, hw), symmetric); the others are left zero.

    Pixels too far apart to share a patch (a quarter of the pairs of a 4x4 map under a
    3x3 kernel) are skipped, and each pair is computed once for both orders, straight
    into its block.
    """
    hw, n_images, c = x.shape
    out = _new((hw, hw, c, c), x.dtype, x.device, zero=True)
    needed = needed.cpu().numpy()
    cpu = x.device.type == "cpu"
    x_np, out_np = (x.numpy(), out.numpy()) if cpu else (None, None)
    for u in range(hw):
        for v in range(u, hw):
            if not needed[u, v]:
                continue
            if cpu:
                np.matmul(x_np[u].T, x_np[v], out=out_np[u, v])
            else:
                out[u, v] = _no_tf32(lambda: x[u].T @ x[v])  # noqa: B023
            if v != u:
                out[v, u] = out[u, v].T
    return out.view(hw * hw, c * c)


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as float64 (computed in the inputs' dtype; no copies of transposed views)."""
    if a.device.type == "cpu":
        return torch.from_numpy(np.asarray(a.numpy() @ b.numpy(), dtype=np.float64))
    return _no_tf32(lambda: a @ b).double()


def _offset_products(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``X^T Y`` of whole maps, per kernel offset: shape (k, c, n).

    ``x`` (in_pixels, images, c) and ``y`` (out_pixels, images, n) are pixel-major maps;
    ``index`` (out_pixels, k) the input pixel under each kernel offset (``in_pixels``
    for padding). Each (position, offset) pair adds ``x[pixel]^T y[position]`` to its
    offset's block, and padding pairs are skipped (shifted copies of padded maps cost
    2-8x more here). On the CPU the products go through numpy, whose BLAS ran these
    shapes 10-40% faster than torch's here.
    """
    hw = x.shape[0]
    pairs = [
        (offset, pixel, position)
        for position, pixels in enumerate(index.tolist())
        for offset, pixel in enumerate(pixels)
        if pixel < hw
    ]
    blocks = x.new_zeros(index.shape[1], x.shape[2], y.shape[2])
    if x.device.type == "cpu":
        x_np, y_np, blocks_np = x.numpy(), y.numpy(), blocks.numpy()
        product = np.empty(blocks_np.shape[1:], dtype=blocks_np.dtype)
        for offset, pixel, position in pairs:
            np.matmul(x_np[pixel].T, y_np[position], out=product)
            blocks_np[offset] += product
    else:
        for offset, pixel, position in pairs:
            blocks[offset].addmm_(x[pixel].T, y[position])
    return blocks


def _no_tf32(fn):
    """Run ``fn`` with TF32 off for CUDA matmuls (statistics need full float32 products)."""
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return fn()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32


def _products_numpy(X: torch.Tensor, Y: torch.Tensor):
    """Moments of 2-D ``X`` and ``Y`` on the CPU through numpy, whose ``a.T @ a`` runs
    BLAS syrk (about twice torch's ``x.T @ x`` here)."""
    x = np.ascontiguousarray(X.numpy())
    y = np.ascontiguousarray(Y.numpy())
    xtx = torch.from_numpy(np.asarray(x.T @ x, dtype=np.float64))
    xty = torch.from_numpy(np.asarray(x.T @ y, dtype=np.float64))
    x_sum = torch.from_numpy(x.sum(axis=0, dtype=np.float64))
    y_sum = torch.from_numpy(y.sum(axis=0, dtype=np.float64))
    return xtx, x_sum, xty, y_sum, _sum_squares(Y)


def _products_torch(x: torch.Tensor, y: torch.Tensor):
    """Moments of 2-D ``x`` and ``y`` with torch (on CUDA); TF32 is not used."""
    xtx, xty = _no_tf32(lambda: ((x.T @ x).double(), (x.T @ y).double()))
    x_sum = x.sum(dim=0, dtype=torch.float64)
    y_sum = y.sum(dim=0, dtype=torch.float64)
    return xtx, x_sum, xty, y_sum, _sum_squares(y)
