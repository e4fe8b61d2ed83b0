"""Feature sampling: output positions, input patches, and forward hooks that record them.

For a conv layer, a sample is one spatial position of its output map: the input patch
``X`` (shape ``(c, kh, kw)``, read from the zero-padded input, stride and dilation aware)
and the output vector ``Y`` (shape ``(n,)``) at that position. Positions are drawn per
image with a seeded generator, so runs are reproducible.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

__all__ = [
    "Positions",
    "sample_positions",
    "extract_patches",
    "gather_outputs",
    "record_activations",
    "channel_spectra",
    "input_moments",
    "covariance_spectrum",
    "positions_of_images",
]


@dataclass(frozen=True)
class Positions:
    """Sampled output positions: image index, row and column, each of shape (n_samples,)."""

    image: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor

    def __len__(self) -> int:
        return int(self.image.numel())

    def to(self, device) -> Positions:
        return Positions(self.image.to(device), self.row.to(device), self.col.to(device))


def sample_positions(
    n_images: int,
    out_size: tuple[int, int],
    per_image: Optional[int],
    generator: torch.Generator,
) -> Positions:
    """Draw ``per_image`` distinct output positions in each of ``n_images`` maps.

    Parameters
    ----------
    n_images : int
    out_size : (int, int)
        Height and width of the output map.
    per_image : int or None
        Positions per image; None, or at least ``H * W``, takes every position (small deep
        maps such as the 2x2 conv5 of a CIFAR VGG are then used in full).
    generator : torch.Generator
        Seeded CPU generator; the draw depends only on it and the arguments.

    Returns
    -------
    Positions
        Image-major: all positions of image 0 first.
    """
    h, w = out_size
    hw = h * w
    if per_image is None or per_image >= hw:
        flat = torch.arange(hw).repeat(n_images)
        image = torch.arange(n_images).repeat_interleave(hw)
    else:
        # Distinct positions per image: the first ``per_image`` of a random permutation.
        keys = torch.rand(n_images, hw, generator=generator)
        flat = keys.argsort(dim=1)[:, :per_image].sort(dim=1).values.reshape(-1)
        image = torch.arange(n_images).repeat_interleave(per_image)
    return Positions(image=image, row=flat // w, col=flat % w)


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply), exact in int64: values stay below 2**32
    and the odd multipliers below 2**31, so no product overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


def positions_of_images(
    image_ids: torch.Tensor,
    out_size: tuple[int, int],
    per_image: Optional[int],
    seed: int,
    event: int,
) -> Positions:
    """``per_image`` distinct positions in each map, drawn by a hash of ``(seed, event,
    image id, position)``: an image gets the same positions whichever process or batch
    it is in, so sharded runs sample exactly what one process samples.

    Parameters
    ----------
    image_ids : int tensor of shape (n_images,)
        Global ids of the images (their index in the whole calibration set).
    out_size : (int, int)
    per_image : int or None
        As in :func:`sample_positions`.
    seed, event : int
        The run's seed and a counter of sampling events (one per layer visit).

    Returns
    -------
    Positions
        Image-major, ``image`` indexing the rows of ``image_ids`` (0..n_images-1).
    """
    h, w = out_size
    hw = h * w
    n = int(image_ids.numel())
    if per_image is None or per_image >= hw:
        return sample_positions(n, out_size, None, torch.Generator())
    base = _mix32(torch.tensor(seed & _MASK32) ^ _mix32(torch.tensor(event & _MASK32)))
    per = _mix32(base ^ _mix32(image_ids.to(torch.int64).cpu() & _MASK32)).view(-1, 1)
    keys = _mix32(per ^ _mix32(torch.arange(hw, dtype=torch.int64) + 0x9E3779B9 & _MASK32))
    flat = keys.argsort(dim=1, stable=True)[:, :per_image].sort(dim=1).values.reshape(-1)
    image = torch.arange(n).repeat_interleave(per_image)
    return Positions(image=image, row=flat // w, col=flat % w)


def extract_patches(x: torch.Tensor, conv: nn.Conv2d, positions: Positions) -> torch.Tensor:
    """Input patches of ``conv`` at the given output positions.

    Parameters
    ----------
    x : tensor of shape (n_images, c, H, W)
        The conv's input.
    conv : nn.Conv2d
        Supplies kernel size, stride, padding and dilation (``groups=1``, zero padding).
    positions : Positions

    Returns
    -------
    tensor of shape (n_samples, c, kh, kw)
    """
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    if isinstance(conv.padding, str):
        raise ValueError(
            f"conv with padding={conv.padding!r} is not supported; use explicit integer padding."
        )
    ph, pw = conv.padding
    if conv.padding_mode != "zeros" and (ph or pw):
        raise ValueError(
            f"conv with padding_mode={conv.padding_mode!r} is not supported; the patches are "
            "zero-padded (padding_mode='zeros')."
        )
    h, w = x.shape[2], x.shape[3]
    device = x.device
    pos = positions.to(device)
    # Input coordinates under each kernel tap; those in the zero padding are read from a
    # clamped pixel and zeroed after the gather (padding the whole map would copy it).
    rows = pos.row[:, None] * sh - ph + torch.arange(kh, device=device) * dh  # (n, kh)
    cols = pos.col[:, None] * sw - pw + torch.arange(kw, device=device) * dw  # (n, kw)
    # Advanced indices separated by a slice put their broadcast dims first: (n, kh, kw, c).
    patches = x[
        pos.image[:, None, None], :, rows.clamp(0, h - 1)[:, :, None],
        cols.clamp(0, w - 1)[:, None, :],
    ]  # fmt: skip
    if ph or pw:
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        patches.masked_fill_(~inside[..., None], 0.0)
    return patches.permute(0, 3, 1, 2)


def gather_outputs(y: torch.Tensor, positions: Positions) -> torch.Tensor:
    """Output vectors at the positions: ``y[image, :, row, col]``, shape (n_samples, n)."""
    pos = positions.to(y.device)
    return y[pos.image, :, pos.row, pos.col]


@contextlib.contextmanager
def record_activations(
    inputs: dict[str, nn.Module] | None = None,
    outputs: dict[str, nn.Module] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Record module inputs and outputs during the forward passes run inside the block.

    Parameters
    ----------
    inputs : dict of name -> module
        Record the (first positional) input of each module, under ``name``.
    outputs : dict of name -> module
        Record the output of each module, under ``name``.

    Yields
    ------
    dict of name -> tensor
        Filled by the hooks; each entry is ``detach().clone()``-d, so an in-place ReLU or
        ``+=`` run later cannot overwrite it. A module called several times per forward
        (e.g. a shared ReLU) keeps the last call; record the conv or BN around it instead.

    Notes
    -----
    Hooks are removed in ``finally``: an exception inside the block leaves the model as
    it was.
    """
    recorded: dict[str, torch.Tensor] = {}
    handles = []

    def pre_hook(name):
        def hook(module, args):
            recorded[name] = args[0].detach().clone()

        return hook

    def post_hook(name):
        def hook(module, args, output):
            recorded[name] = output.detach().clone()

        return hook

    try:
        for name, module in (inputs or {}).items():
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
        for name, module in (outputs or {}).items():
            handles.append(module.register_forward_hook(post_hook(name)))
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def input_moments(
    model: nn.Module,
    images: torch.Tensor,
    consumers: dict[str, nn.Module],
    *,
    batch_size: int = 100,
    device: Optional[torch.device | str] = None,
    process_group=None,
    spread: Optional[Mapping[str, int]] = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean and covariance of each consumer's input channels, over every spatial position.

    Runs ``model`` over ``images`` with a forward pre-hook on every consumer that adds
    its input's channel vectors, at every spatial position, to a float64 sum and Gram
    matrix (shards add up: the sums of disjoint image sets are the sums of their union).

    Parameters
    ----------
    model : nn.Module
        Run in its current mode under ``torch.no_grad``; not modified.
    images : tensor of shape (n_images, C, H, W)
        Preprocessed images.
    consumers : dict of name -> module
        Modules whose input (``(N, c, h, w)``, or ``(N, c)`` for a linear layer) is
        measured, each called once per forward.
    batch_size : int, default=100
    device : torch.device or str, optional
        Where the model runs; each batch is moved there. Default: the images' device.
    process_group : torch.distributed process group, optional
        Each rank passes its own images; the sums are all-reduced (float64) before the
        moments are formed, so every rank gets the moments of the union.
    spread : dict of name -> int, optional
        For a linear layer reading flattened maps: the features of each channel (``H *
        W``), each a position of that channel (default 1).

    Returns
    -------
    dict of name -> (mean, cov)
        float64 CPU tensors of shapes ``(c,)`` and ``(c, c)``; the covariance is the
        biased (population) one.

    Raises
    ------
    ValueError
        A consumer whose input is neither 4-d nor 2-d, or that the forward pass never
        reaches.

    Notes
    -----
    Hooks are removed in ``finally``, as in :func:`record_activations`.
    """
    gram: dict[str, torch.Tensor] = {}
    total: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}

    def pre_hook(name):
        def hook(module, args):
            x = args[0].detach()
            if x.dim() == 2:  # a linear layer's (N, C * spread): spread positions per image
                x = x.reshape(x.shape[0], -1, 1, (spread or {}).get(name, 1))
            if x.dim() != 4:
                raise ValueError(
                    f"{name}: expected an input (N, C, H, W) or (N, C); got {x.dim()}-d."
                )
            rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).to(torch.float64)
            gram[name] = gram.get(name, 0.0) + rows.T @ rows
            total[name] = total.get(name, 0.0) + rows.sum(0)
            count[name] = count.get(name, 0) + rows.shape[0]

        return hook

    handles = []
    try:
        for name, module in consumers.items():
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                # As given, not channels-last: a model may .view() its maps.
                model(images[start : start + batch_size].to(device or images.device))
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in consumers if name not in gram]
    if missing:
        raise ValueError(f"the forward pass never reached {missing}.")
    if process_group is not None:
        from .distributed import all_reduce_sum

        for name in consumers:
            gram[name] = all_reduce_sum(gram[name], process_group)
            total[name] = all_reduce_sum(total[name], process_group)
            count[name] = int(all_reduce_sum(torch.tensor(float(count[name])), process_group))
    moments = {}
    for name in consumers:
        mean = (total[name] / count[name]).cpu()
        moments[name] = (mean, (gram[name] / count[name]).cpu() - torch.outer(mean, mean))
    return moments


def channel_spectra(
    model: nn.Module,
    images: torch.Tensor,
    consumers: dict[str, nn.Module],
    *,
    batch_size: int = 100,
    device: Optional[torch.device | str] = None,
) -> dict[str, np.ndarray]:
    """Eigenvalues of the covariance of each consumer's input channels.

    The covariance is that of :func:`input_moments`, centred: the intercept of a refit
    absorbs a channel's mean, so only the variation around it is information the kept
    channels must carry. Parameters as there.

    Returns
    -------
    dict of name -> ndarray of shape (c,)
        Eigenvalues of each covariance, largest first, clipped at 0.
    """
    moments = input_moments(model, images, consumers, batch_size=batch_size, device=device)
    return {name: covariance_spectrum(cov) for name, (_, cov) in moments.items()}


def covariance_spectrum(cov: torch.Tensor) -> np.ndarray:
    """Eigenvalues of a covariance, largest first, round-off below 0 clipped to 0."""
    return torch.linalg.eigvalsh(cov).flip(0).clamp(min=0.0).numpy()
