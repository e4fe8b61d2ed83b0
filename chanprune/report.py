"""Model-level pruning reports: per-layer rows and totals, rendered to JSON and Markdown."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

__all__ = ["LayerReport", "PruneReport", "write_text_atomic"]


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename,
    so a reader never sees a half-written file and a failure leaves the old one intact.
    Creates the folder if needed."""
    from .io import atomic_write  # io imports the model zoo; keep report light to import

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@dataclass(frozen=True)
class LayerReport:
    """One pruned (or refit) layer.

    ``name`` is the consuming conv whose input channels were selected; ``producer`` the
    conv whose filters were removed, or None (``null`` in JSON) for the first conv of a
    ResNet branch pruned through a channel sampler, which reads the residual stream: no
    conv loses filters there. Errors are ``||Y - Y'||^2 / ||Y||^2`` of the layer's
    pre-activation output against the original network, on the calibration samples
    (``rel_error``) and on held-out calibration images (``rel_error_heldout``).
    """

    name: str
    producer: Optional[str]
    channels_before: int
    channels_after: int
    rel_error: float
    rel_error_heldout: Optional[float]
    rel_error_before_refit: float
    n_samples: int
    time_s: float
    alpha: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PruneReport:
    """Summary of one :func:`chanprune.prune_model` run."""

    model: str
    method: str
    schedule: str
    speedup_target: Optional[float]
    speedup: float
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    n_images: int
    n_heldout: int
    wall_time_s: float
    device: str
    layers: list = field(default_factory=list)
    options: dict = field(default_factory=dict)
    #: Distillation after the prune (``recover="distill"``): one dict per epoch, epoch 0
    #: first (see :class:`chanprune.recover.EpochRecord`); empty without recovery.
    recovery: list = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = [layer.to_dict() for layer in self.layers]
        return out

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The report as JSON; written atomically to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            write_text_atomic(path, text + "\n")
        return text

    def to_markdown(self) -> str:
        """A human-readable table of the per-layer results and the totals."""
        lines = [
            f"**{self.model}**, method `{self.method}`, schedule `{self.schedule}`: "
            f"{self.speedup:.2f}x fewer MACs"
            + (f" (target {self.speedup_target:g}x)" if self.speedup_target else "")
            + f", {self.macs_before / 1e6:.1f}M -> {self.macs_after / 1e6:.1f}M MACs, "
            f"{self.params_before / 1e6:.2f}M -> {self.params_after / 1e6:.2f}M parameters, "
            f"{self.n_images} calibration images ({self.n_heldout} held out), "
            f"{self.wall_time_s:.1f} s on {self.device}.",
            "",
            "| layer | channels | rel. error (calib) | rel. error (held-out) | before refit "
            "| time (s) |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.layers:
            held = "-" if r.rel_error_heldout is None else f"{r.rel_error_heldout:.4f}"
            lines.append(
                f"| {r.name} | {r.channels_before} -> {r.channels_after} | {r.rel_error:.4f} "
                f"| {held} | {r.rel_error_before_refit:.4f} | {r.time_s:.2f} |"
            )
        if self.recovery:
            lines += ["", "| distillation epoch | train loss | held-out divergence | time (s) |",
                      "|---|---|---|---|"]  # fmt: skip
            for r in self.recovery:
                loss = "-" if r["train_loss"] is None else f"{r['train_loss']:.4f}"
                held = "-" if r["heldout_divergence"] is None else f"{r['heldout_divergence']:.4f}"
                lines.append(f"| {r['epoch']} | {loss} | {held} | {r['time_s']:.1f} |")
        return "\n".join(lines)
