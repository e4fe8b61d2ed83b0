"""Calibration sharded over the ranks of a ``torch.distributed`` process group.

Every statistic chanprune fits is a sum over calibration samples, so each rank runs the
forward passes of its own shard of images and the sums are all-reduced (float64) before
each selection; every rank then solves the same problems on the same numbers and applies
the same surgery. Sampled positions depend on an image's global id, not on its rank or
batch, so K ranks reproduce one process up to the order of float64 additions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Shard", "all_reduce_sum", "check_agreement", "model_fingerprint", "shard_rows"]


@dataclass(frozen=True)
class Shard:
    """This rank's part of a sharded run."""

    group: Any
    rank: int
    world_size: int

    @classmethod
    def of(cls, process_group) -> Optional[Shard]:
        """The shard of this process in ``process_group`` (None: a single-process run)."""
        if process_group is None:
            return None
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "process_group was given but torch.distributed is not initialised: call "
                "torch.distributed.init_process_group first (torchrun sets up its "
                "environment)."
            )
        return cls(
            group=process_group,
            rank=dist.get_rank(process_group),
            world_size=dist.get_world_size(process_group),
        )


def _backend_device(group) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    """The float64 sum of ``tensor`` over the ranks of ``group``, on ``tensor``'s device
    (a new tensor; moved to the backend's device for the collective where needed)."""
    device = _backend_device(group)
    value = tensor.detach().to(device=device, dtype=torch.float64).contiguous().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value.to(tensor.device)


def shard_rows(n: int, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s contiguous block of ``range(n)`` (the first ``n % world_size``
    ranks get one more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return np.arange(start, start + base + (rank < extra), dtype=np.int64)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's state (names, shapes, dtypes and bytes of every entry)."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(value.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def check_agreement(values: Mapping[str, Any], shard: Shard) -> None:
    """Raise ``ValueError`` on every rank unless all ranks passed equal ``values``.

    The message names each differing entry and what each rank had, so a rank given
    other options, another model or another calibration set is found at once, before
    any work.
    """
    gathered: list = [None] * shard.world_size
    dist.all_gather_object(gathered, dict(values), group=shard.group)
    differing = [key for key in values if len({repr(g.get(key)) for g in gathered}) > 1]
    if differing:
        detail = "; ".join(
            f"{key}: " + ", ".join(f"rank {r} {g.get(key)!r}" for r, g in enumerate(gathered))
            for key in differing
        )
        raise ValueError(f"the ranks disagree on what to prune: {detail}.")
