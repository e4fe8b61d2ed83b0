"""Optional recovery after pruning: a short distillation against the original network.

The pruned network (student) is trained to reproduce the original network's (teacher's)
outputs on the calibration images, with flip-and-crop augmentation and no labels:
``KL(softmax(teacher) || softmax(student))`` for logits (2-d outputs), the mean squared
error otherwise. The teacher is only run, never trained. Pruning without retraining stays
the default; this is the add-on for users who can spend a few minutes more.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._validation import check_int_in_range, check_real_in_range
from .sensitivity import first_output, output_divergence

__all__ = ["EpochRecord", "augment", "distill", "distillation_loss"]


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of :func:`distill` (epoch 0: the network before any step).

    ``train_loss`` is the mean distillation loss over the epoch's batches (None at epoch
    0), ``heldout_divergence`` the mean :func:`chanprune.sensitivity.output_divergence`
    on the held-out images after the epoch (None without held-out images), ``time_s``
    the seconds since the distillation started.
    """

    epoch: int
    train_loss: Optional[float]
    heldout_divergence: Optional[float]
    time_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def distillation_loss(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """Mean per-image KL divergence from the teacher's softmax to the student's (2-d
    logits), or the mean squared error (other shapes)."""
    if teacher_out.dim() == 2:
        return F.kl_div(
            F.log_softmax(student_out, dim=1),
            F.log_softmax(teacher_out, dim=1),
            log_target=True,
            reduction="batchmean",
        )
    return F.mse_loss(student_out, teacher_out)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and random crops after zero-padding by an eighth of the
    side (4 pixels on 32x32), the standard augmentation of CIFAR and ImageNet training.

    Parameters
    ----------
    images : tensor of shape (n, C, H, W)
    generator : torch.Generator
        CPU generator; the draw is reproducible.

    Returns
    -------
    tensor of shape (n, C, H, W)
        A new tensor; ``images`` is not modified.
    """
    n, _, h, w = images.shape
    pad_h, pad_w = max(1, h // 8), max(1, w // 8)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.where(flip.to(images.device).view(-1, 1, 1, 1), images.flip(3), images)
    padded = F.pad(out, (pad_w, pad_w, pad_h, pad_h))
    dy = torch.randint(0, 2 * pad_h + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad_w + 1, (n,), generator=generator)
    rows = (dy.view(-1, 1) + torch.arange(h)).to(images.device)  # (n, h)
    cols = (dx.view(-1, 1) + torch.arange(w)).to(images.device)  # (n, w)
    index = torch.arange(n, device=images.device).view(-1, 1, 1)
    return padded.permute(0, 2, 3, 1)[index, rows.unsqueeze(2), cols.unsqueeze(1)].permute(
        0, 3, 1, 2
    )


def _output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return first_output(model(x))


def _heldout(student: nn.Module, teacher_outs, heldout, batch_size: int) -> Optional[float]:
    if heldout is None:
        return None
    total = 0.0
    with torch.no_grad():
        for batch, ref in zip(heldout.split(batch_size), teacher_outs):
            total += output_divergence(ref, _output(student, batch))
    return total / heldout.shape[0]


def distill(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    *,
    epochs: int = 3,
    lr: float = 1e-5,
    batch_size: int = 64,
    heldout: Optional[torch.Tensor] = None,
    max_time_s: Optional[float] = None,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
    progress: bool = True,
    inplace: bool = False,
) -> tuple[nn.Module, list[EpochRecord]]:
    """Train ``student`` to reproduce ``teacher``'s outputs on ``images``.

    SGD with Nesterov momentum 0.9 and a cosine learning rate from ``lr`` to 0 over all
    steps; each batch is augmented (:func:`augment`) and the teacher is run on the same
    augmented batch. The student is trained in eval mode: BatchNorm statistics stay
    frozen and dropout off, so training starts from the pruned network's own function
    (batch statistics of a few dozen images, or dropout on narrowed layers, would first
    move it away from the teacher).

    Parameters
    ----------
    student : nn.Module
        The pruned network. Copied unless ``inplace``; returned in eval mode.
    teacher : nn.Module
        The original network: run in eval mode under ``no_grad``, never changed.
    images : tensor of shape (n_images, C, H, W)
        Preprocessed training images (the calibration images).
    epochs : int, default=3
        Passes over ``images`` (>= 1).
    lr : float, default=1e-5
        Initial learning rate (> 0). The refit layers' BatchNorms are identities, so
        nothing normalises the steps: on the CIFAR VGG-16-BN pruned 4x, 1e-4 and more
        diverged within an epoch.
    batch_size : int, default=64
    heldout : tensor of shape (n_heldout, C, H, W), optional
        Images never trained on, on which each epoch's divergence is reported.
    max_time_s : float, optional
        Stop after the first batch that ends past this many seconds (the records say
        where it stopped).
    device : str or torch.device, default="cpu"
    seed : int, default=0
        Seeds the shuffling and the augmentation.
    progress : bool, default=True
        A tqdm bar over the batches.
    inplace : bool, default=False

    Returns
    -------
    student : nn.Module
    records : list of EpochRecord
        Epoch 0 (before training) and one per epoch run.

    Raises
    ------
    ValueError
        Bad parameters, images of the wrong shape or with NaN/Inf.
    """
    epochs = check_int_in_range(epochs, "epochs", 1)
    lr = check_real_in_range(lr, "lr", 0.0, low_inclusive=False)
    batch_size = check_int_in_range(batch_size, "batch_size", 1)
    if max_time_s is not None:
        max_time_s = check_real_in_range(max_time_s, "max_time_s", 0.0, low_inclusive=False)
    for name, value in (("images", images), ("heldout", heldout)):
        if value is None:
            continue
        if value.dim() != 4 or value.shape[0] == 0:
            raise ValueError(
                f"{name} must have shape (n_images, C, H, W) with n_images >= 1; got "
                f"{tuple(value.shape)}."
            )
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} contain NaN or Inf values.")
    device = torch.device(device)
    start = time.perf_counter()
    student = (student if inplace else copy.deepcopy(student)).to(device).eval()
    teacher_was_training = teacher.training
    teacher.eval()
    dtype = next(student.parameters()).dtype
    images = images.to(dtype)
    if heldout is not None:
        heldout = heldout.to(device=device, dtype=dtype)
        with torch.no_grad():
            teacher_outs = [_output(teacher, b) for b in heldout.split(batch_size)]
    else:
        teacher_outs = None
    records = [EpochRecord(0, None, _heldout(student, teacher_outs, heldout, batch_size), 0.0)]
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    n_batches = math.ceil(images.shape[0] / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * n_batches)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=epochs * n_batches, desc="distilling", disable=not progress)
    out_of_time = False
    try:
        for epoch in range(1, epochs + 1):
            order = torch.randperm(images.shape[0], generator=generator)
            total, seen = 0.0, 0
            for i in range(n_batches):
                index = order[i * batch_size : (i + 1) * batch_size]
                batch = augment(images[index].to(device), generator)
                with torch.no_grad():
                    target = _output(teacher, batch)
                loss = distillation_loss(_output(student, batch), target)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"the distillation loss became {loss.item()} at epoch {epoch}; lower lr."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item() * batch.shape[0]
                seen += batch.shape[0]
                bar.update(1)
                if max_time_s is not None and time.perf_counter() - start > max_time_s:
                    out_of_time = True
                    break
            held = _heldout(student, teacher_outs, heldout, batch_size)
            records.append(EpochRecord(epoch, total / seen, held, time.perf_counter() - start))
            bar.set_postfix_str(f"loss {total / seen:.4f}")
            if out_of_time:
                break
    finally:
        bar.close()
        teacher.train(teacher_was_training)
    student.eval()
    for p in student.parameters():
        p.grad = None
    return student, records
