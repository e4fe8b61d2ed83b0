"""Loss-aware layer budgets: how much the network's output degrades as each group narrows.

For each prunable channel group of a :class:`chanprune.graph.Plan` and a few widths, the
group alone is narrowed in the original network and the output compared with the
original's on the same calibration images (no labels). Narrowing is simulated the way the
pruner will do it, cheaply: keep ``k`` channels (greedily, the ones that explain most of
the group's covariance) and replace every consumer's view of the group by its best
linear prediction from the kept channels. A consumer is linear in its input, so its
least-squares refit on the same channels can only do better at that layer: the measured
degradation approximates, from the pessimistic side, what the pruner would leave, without
the cost of a refit.

The curves feed :func:`chanprune.graph.widths_for_cost`, which spends the MAC budget
where the predicted degradation per MAC saved is smallest (``schedule="sensitivity"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .distributed import all_reduce_sum
from .graph import Plan
from .sampling import input_moments

__all__ = [
    "RATIOS",
    "SensitivityCurve",
    "covariance_order",
    "output_divergence",
    "measure_sensitivity",
    "group_positions",
]

#: Kept fractions at which each group's degradation is measured (interpolated between).
RATIOS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)


@dataclass(frozen=True)
class SensitivityCurve:
    """Measured output degradation of one group at a few widths.

    Attributes
    ----------
    size : int
        The group's width in the original network (degradation 0 there).
    widths : ndarray of shape (n_points,)
        Increasing widths below ``size``.
    degradation : ndarray of shape (n_points,)
        :func:`output_divergence` of the network with the group alone at each width.
    """

    size: int
    widths: np.ndarray
    degradation: np.ndarray

    def cost(self) -> np.ndarray:
        """Predicted degradation at every width ``0..size`` (shape ``(size + 1,)``):
        the measured points made non-increasing in width (a wider group never predicts
        more loss: what it measured otherwise is noise), linear between them, 0 at
        ``size``, and ``inf`` below the narrowest point measured: nothing is known there,
        and a group cut below an eighth of its width is rarely what a user wants."""
        widths = np.append(self.widths, self.size).astype(np.float64)
        measured = np.append(self.degradation, 0.0)
        envelope = np.maximum.accumulate(measured[::-1])[::-1]
        k = np.arange(self.size + 1, dtype=np.float64)
        cost = np.interp(k, widths, envelope)
        cost[k < widths[0]] = np.inf
        return cost


def group_positions(layout: tuple, group: str) -> np.ndarray:
    """Positions of ``group``'s channels in a value of ``layout`` (full widths)."""
    out, offset = [], 0
    for name, width in layout:
        if name == group:
            out.append(offset + np.arange(width))
        offset += width
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def covariance_order(cov: np.ndarray) -> np.ndarray:
    """Channels in the order a greedy column-subset selection keeps them.

    Pivoted Cholesky: each step takes the channel with the largest variance left after
    regressing out the channels already taken, so the first ``k`` explain (greedily) the
    most of the others.

    Parameters
    ----------
    cov : ndarray of shape (c, c)
        A covariance (symmetric positive semi-definite).

    Returns
    -------
    ndarray of shape (c,)
        A permutation of ``range(c)``.
    """
    cov = np.asarray(cov, dtype=np.float64)
    c = cov.shape[0]
    residual = np.clip(np.diag(cov).copy(), 0.0, None)
    factor = np.zeros((c, c))
    order = []
    left = np.ones(c, dtype=bool)
    tiny = 1e-12 * max(float(residual.max(initial=0.0)), 1e-300)
    for step in range(c):
        scores = np.where(left, residual, -np.inf)
        pivot = int(np.argmax(scores))
        order.append(pivot)
        left[pivot] = False
        if residual[pivot] <= tiny:  # the rest is (numerically) explained: keep the order
            order.extend(np.flatnonzero(left)[np.argsort(-np.diag(cov)[left], kind="stable")])
            break
        column = cov[:, pivot] - factor[:, :step] @ factor[pivot, :step]
        column /= np.sqrt(residual[pivot])
        factor[:, step] = column
        residual = np.clip(residual - column**2, 0.0, None)
    return np.asarray(order, dtype=np.int64)


def output_divergence(reference: torch.Tensor, output: torch.Tensor) -> float:
    """How far ``output`` is from ``reference``, summed over a batch.

    2-d outputs are logits: the KL divergence ``KL(softmax(reference) || softmax(output))``
    per row. Other shapes: the squared error divided by the reference's total variance
    per element times the rows (a relative mean squared error).
    """
    reference = reference.double()
    output = output.double()
    if reference.dim() == 2:
        log_p = F.log_softmax(reference, dim=1)
        log_q = F.log_softmax(output, dim=1)
        return float((log_p.exp() * (log_p - log_q)).sum())
    scale = reference.var(unbiased=False).clamp(min=1e-30)
    per_row = (output - reference).pow(2).flatten(1).mean(1) / scale
    return float(per_row.sum())


def measure_sensitivity(
    plan: Plan,
    images: torch.Tensor,
    *,
    ratios: Sequence[float] = RATIOS,
    batch_size: int = 64,
    device: Optional[torch.device | str] = None,
    progress: bool = False,
    process_group=None,
) -> dict[str, SensitivityCurve]:
    """Output degradation of the network of ``plan`` as each prunable group narrows alone.

    The network is ``plan.graph`` (the traced model; it shares the model's modules, which
    are hooked and unhooked, never changed). Groups are measured in graph order, each
    run starting from values cached at its first consumer, so a group costs one pass of
    the rest of the network per width.

    Parameters
    ----------
    plan : Plan
        From :func:`chanprune.graph.trace_plan` on the original network, in eval mode.
    images : tensor of shape (n_images, C, H, W)
        Calibration images; a few dozen suffice.
    ratios : sequence of float in (0, 1), default=RATIOS
        Kept fractions to measure; rounded to each group's width step.
    batch_size : int, default=64
    device : torch.device or str, optional
        Where the network runs. Default: the images' device.
    progress : bool, default=False
        A tqdm bar over the groups.
    process_group : torch.distributed process group, optional
        Each rank passes its own images; moments and divergences are summed over the
        ranks, so every rank gets the curves of the union.

    Returns
    -------
    dict of group -> SensitivityCurve
        Every prunable group of ``plan``; the degradation is the mean over the images of
        :func:`output_divergence`.

    Raises
    ------
    ValueError
        A ratio outside (0, 1), or no images.
    """
    from .sweep import _Runner  # the sweep's node-by-node runner over cached values

    ratios = sorted({float(r) for r in ratios})
    if not ratios or not all(0.0 < r < 1.0 for r in ratios):
        raise ValueError(f"ratios must be fractions in (0, 1); got {ratios}.")
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(
            "images must have shape (n_images, C, H, W) with n_images >= 1; got "
            f"{tuple(images.shape)}."
        )
    device = torch.device(device) if device is not None else images.device
    network = plan.graph
    consumers = {c.name: c for c in plan.consumers}
    prunable = [g for g in plan.groups.values() if g.prunable]
    readers = sorted({c for g in prunable for c in g.consumers})
    modules = {name: network.get_submodule(name) for name in readers}
    moments = input_moments(
        network, images, modules, batch_size=batch_size, device=device,
        process_group=process_group, spread={name: consumers[name].spread for name in readers},
    )  # fmt: skip
    n_images = float(images.shape[0])
    if process_group is not None:
        n_images = float(all_reduce_sum(torch.tensor(n_images), process_group))

    runner = _Runner(network)
    output = first_output(next(n for n in runner.nodes if n.op == "output").args[0])
    envs = [{runner.placeholder: b.to(device)} for b in images.split(batch_size)]
    position = runner.pos[runner.placeholder.name] + 1  # where the cached values are
    with torch.no_grad():
        references = [runner.evaluate(env, [output.name], position)[output.name] for env in envs]
    # Measured in the order of their first consumers, so the cached frontier only advances.
    order = sorted(
        prunable,
        key=lambda g: runner.pos[consumers[g.consumers[0]].node] if g.consumers else -1,
    )
    curves = {}
    for group in tqdm(order, desc="sensitivity", disable=not progress):
        widths = _widths(group.size, group.step, ratios)
        if not group.consumers:  # nothing reads it: narrowing it changes nothing downstream
            curves[group.name] = SensitivityCurve(group.size, widths, np.zeros(len(widths)))
            continue
        first = consumers[group.consumers[0]]
        stop = runner.pos[first.node]
        with torch.no_grad():
            for env in envs:
                runner.advance(env, position, stop)
        position = stop
        at = group_positions(first.layout, group.name)
        ranked = covariance_order(moments[first.name][1][at][:, at].numpy())
        degradation = []
        for width in widths:
            kept = np.sort(ranked[:width])
            hooks = []
            try:
                for reader in group.consumers:
                    mean, cov = moments[reader]
                    positions = group_positions(consumers[reader].layout, group.name)
                    spread = consumers[reader].spread
                    predict = _predictor(positions, kept, mean, cov, device, spread)
                    hooks.append(modules[reader].register_forward_pre_hook(predict))
                total = 0.0
                with torch.no_grad():
                    for env, ref in zip(envs, references):
                        out = runner.evaluate(env, [output.name], position)[output.name]
                        total += output_divergence(ref, out)
            finally:
                for hook in hooks:
                    hook.remove()
            if process_group is not None:
                total = float(all_reduce_sum(torch.tensor(total), process_group))
            degradation.append(total / n_images)
        curves[group.name] = SensitivityCurve(group.size, widths, np.asarray(degradation))
    return {g.name: curves[g.name] for g in prunable}


def first_output(value):
    """The first entry of a (possibly nested) output structure, tensors or traced nodes:
    the logits of a model that also returns auxiliary outputs."""
    while isinstance(value, (tuple, list)):
        value = value[0]
    if isinstance(value, dict):
        value = next(iter(value.values()))
    return value


def _widths(size: int, step: int, ratios: Sequence[float]) -> np.ndarray:
    widths = {int(min(size - step, max(step, round(r * size / step) * step))) for r in ratios}
    return np.asarray(sorted(w for w in widths if 0 < w < size), dtype=np.int64)


def _predictor(positions, kept, mean, cov, device, spread: int = 1):
    """A pre-hook replacing a consumer's view of the group by its linear prediction from
    the ``kept`` channels (of the group), fitted on the consumer's own input moments; a
    linear layer's input ``(N, C * spread)`` is viewed as ``(N, C, 1, spread)``."""
    mean_g = mean[positions]
    cov_g = cov[positions][:, positions]
    a = cov_g[kept][:, kept]
    ridge = 1e-8 * float(a.diagonal().mean().clamp(min=1e-30))
    coef = torch.linalg.solve(
        a + ridge * torch.eye(len(kept), dtype=a.dtype), cov_g[kept]
    )  # (k, s): x_g - mean_g ~ (x_kept - mean_kept) @ coef
    index = torch.from_numpy(positions).to(device)
    kept_index = torch.from_numpy(positions[kept]).to(device)
    mean_k = mean_g[kept]

    def hook(module, args):
        x = args[0]
        flat = x.dim() == 2  # a linear layer's (N, C * spread)
        x = x.reshape(x.shape[0], -1, 1, spread) if flat else x
        xk = x.index_select(1, kept_index) - mean_k.to(x).view(1, -1, 1, 1)
        pred = torch.einsum("nkhw,ks->nshw", xk, coef.to(x)) + mean_g.to(x).view(1, -1, 1, 1)
        x = x.clone()
        x[:, index] = pred
        return (x.reshape(x.shape[0], -1) if flat else x,) + tuple(args[1:])

    return hook
