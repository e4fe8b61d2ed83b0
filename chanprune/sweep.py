"""The layer-by-layer sweep over the channel groups of any traced network.

The consumers of a :class:`chanprune.graph.Plan` (the convs whose input channels are
selected) are visited in graph order. Both networks, the original (with each consumer's
BatchNorm folded into it, for the targets) and the one being pruned, are run node by node
over the calibration images, and the values alive at the current point of the graph (the
*frontier*) are cached for every image, so a whole sweep costs about one forward pass of
each network. Under a memory budget (``cache_bytes``) the caches stay at the last point
where they fitted (a consumer's input, or the images), and each pass recomputes the nodes
from there: the same result for more compute. At a consumer ``B``:

1. Each channel group that ``B`` reads and that is not decided yet is decided here, at its
   first consumer: the reduced selection problems (the c x c channel Grams of
   :func:`chanprune.selection.channel_gram`) of all the group's consumers are summed, each
   weighted by ``1 / ||Y_k||^2`` so that no consumer dominates by scale, with the channels
   of other groups held at their current weights; consumers after ``B`` are sampled by
   running the pruned network on from the frontier. Grouped convs split a group into
   equal parts, each of which keeps the same number of channels.
2. The dropped channels go: the producers' filters, the carriers' entries (BatchNorm,
   depthwise convs), every consumer's input channels, and the cached values.
3. ``B`` is refit by least squares on its kept input channels (a grouped conv group by
   group), with the target ``Y + S - S'`` when its output is added to another tensor
   ``S`` (original ``S``, pruned ``S'``).

``X`` always comes from the network being pruned and ``Y`` from the original one, so each
refit corrects the error accumulated before it.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from .distributed import Shard, all_reduce_sum
from .exceptions import UnsupportedLayerError
from .graph import Consumer, Plan, _shape
from .layer import prune_layer_from_stats
from .refit import reconstruction_error, refit_with_error
from .report import LayerReport
from .sampling import (
    Positions,
    extract_patches,
    gather_outputs,
    positions_of_images,
    sample_positions,
)
from .selection import (
    MAX_SWAPS,
    _top_k,
    channel_gram,
    select_by_score,
    select_first_k,
    select_greedy_gram,
    select_lasso_gram,
    select_random,
    select_thinet_gram,
)
from .stats import LayerStats
from .surgery import (
    fold_batchnorm,
    insert_channel_sampler,
    prune_batchnorm,
    prune_conv_in_channels,
    prune_conv_out_channels,
    prune_grouped_conv,
    prune_linear_in_features,
    prune_linear_out_features,
    set_batchnorm_identity,
    set_conv_params,
    set_linear_params,
)

__all__ = ["SweepOptions", "ACTIVATION_METHODS", "sweep_graph"]

logger = logging.getLogger(__name__)

#: Criteria that read the activations or the BatchNorm scales, not the reconstruction
#: (the other methods are :data:`chanprune.selection.SELECTORS`).
ACTIVATION_METHODS = ("apoz", "entropy", "bn_scale")
#: Those of them accumulated from the fit images' activations (:class:`ActivationScores`).
ACTIVATION_STATISTICS = ("apoz", "entropy")
#: A refit is kept where it lowers the held-out rows' errors by this many standard errors
#: of their mean drop (one-sided, about 98% sure), else the layer keeps its weights.
REFIT_Z = 2.0


@dataclass(frozen=True)
class SweepOptions:
    """The options of one sweep (see :func:`chanprune.prune_model` for each)."""

    method: str = "lasso"
    refit: bool = True
    ridge: float = 1e-4
    normalize: bool = True
    alternate: bool = False
    correct_unpruned: bool = True
    residual_correction: bool = True
    positions_per_image: Optional[int] = 10
    stats_dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    seed: int = 0
    max_iter: int = 1000
    tol: float = 1e-6


# ---------------------------------------------------------------------------- helpers
def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last layout, on which oneDNN runs convolutions faster on a CPU."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def as_conv(layer: nn.Module, spread: int = 1) -> nn.Conv2d:
    """``layer`` as a conv: a conv itself; a linear layer on ``(N, C * spread)`` the
    ``(1, spread)`` conv it computes on ``(N, C, 1, spread)`` (a 1x1 conv at ``spread =
    1``; over a whole flattened map otherwise), its parameters viewed, not copied."""
    if not isinstance(layer, nn.Linear):
        return layer
    c, n = layer.in_features // spread, layer.out_features
    conv = nn.Conv2d(c, n, (1, spread), bias=layer.bias is not None, device="meta")
    # (meta: no memory, no initialisation; the parameters are replaced next)
    conv.weight = nn.Parameter(layer.weight.detach().view(n, c, 1, spread), requires_grad=False)
    if layer.bias is not None:
        conv.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
    return conv


def folded_params(
    layer: nn.Module, bn: Optional[nn.Module], spread: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (n, c, kh, kw) and bias (n,) of ``bn(layer(x))`` (eval mode) as one conv (a
    linear layer as :func:`as_conv` makes it)."""
    if bn is not None:
        layer = fold_batchnorm(layer, bn)
    conv = as_conv(layer, spread)
    bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
    return conv.weight.detach(), bias.detach()


def whole_maps_cheaper(
    conv: nn.Conv2d, in_size: tuple[int, int], out_size: tuple[int, int], per_image
) -> bool:
    """Whether every position of whole maps (:meth:`LayerStats.update_maps`) costs fewer
    multiply-adds than ``per_image`` sampled patches: true on small deep maps (CIFAR's
    4x4 and 2x2), where it also uses more samples. Capped at c H W <= 8192 for memory."""
    if isinstance(conv.padding, str) or conv.groups != 1:
        return False
    kh, kw = conv.kernel_size
    c, n = conv.in_channels, conv.out_channels
    width, d = c * in_size[0] * in_size[1], c * kh * kw
    n_out = out_size[0] * out_size[1]
    sampled = min(per_image or n_out, n_out)
    cost_sampled = sampled * (d * d / 2 + d * n)
    cost_maps = width * width / 2 + n_out * d * n
    return width <= 8192 and cost_maps < cost_sampled


class HeldOut:
    """The held-out images' samples of one layer, kept as rows (not statistics): the
    refit layer's relative error on them is measured directly."""

    def __init__(self) -> None:
        self.patches: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def add(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        """``X`` (rows, c, kh, kw) patches, ``Y`` (rows, n) targets."""
        self.patches.append(X.contiguous())
        self.targets.append(Y.contiguous())

    def rel_error(
        self, kept: np.ndarray, weight: np.ndarray, bias: np.ndarray, process_group=None
    ) -> Optional[float]:
        """``||Y - X_kept W^T - b||^2 / ||Y||^2`` (sums in float64); None without rows.
        With a process group, the sums (and the rows) of every rank's held-out images.

        ``weight`` has shape (n, len(kept), kh, kw), ``bias`` (n,)."""
        if process_group is not None:
            local = torch.tensor([*self._sums(kept, weight, bias), len(self.patches)])
            r2, y2, parts = all_reduce_sum(local.double(), process_group).tolist()
            if not parts:
                return None
            return r2 / y2 if y2 > 0 else 0.0
        if not self.patches:
            return None
        r2, y2 = self._sums(kept, weight, bias)
        return r2 / y2 if y2 > 0 else 0.0

    def _sums(self, kept: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> tuple:
        """``(||Y - X_kept W^T - b||^2, ||Y||^2)`` over the rows (0, 0 without rows)."""
        if not self.patches:
            return 0.0, 0.0
        y2 = sum(float(Y.double().square().sum()) for Y in self.targets)
        return float(self._row_errors(kept, weight, bias).sum()), y2

    def _row_errors(self, kept: np.ndarray, weight: np.ndarray, bias: np.ndarray):
        """Each row's ``||y - x_kept W^T - b||^2`` (float64)."""
        X = torch.cat(self.patches)
        Y = torch.cat(self.targets)
        X = X[:, torch.from_numpy(kept).to(X.device)].reshape(X.shape[0], -1)
        w = torch.as_tensor(weight, dtype=X.dtype, device=X.device).reshape(len(weight), -1)
        b = torch.as_tensor(bias, dtype=X.dtype, device=X.device)
        residual = torch.addmm(b, X, w.T, beta=1.0).sub_(Y)
        return residual.double().square().sum(dim=1)

    def compare(self, kept: np.ndarray, before: tuple, after: tuple, process_group=None):
        """The relative errors of ``before`` and ``after`` = (weight, bias) on the rows,
        and how surely ``after`` fits them better: the mean of the rows' error drops over
        its standard error (a paired z-score; None under 2 rows). None without rows. With
        a process group, over every rank's rows. Each weight's rows are computed once."""
        sums = [0.0] * 6  # ||Y||^2, errors before, after, drops, squared drops, rows
        if self.patches:
            e_before = self._row_errors(kept, *before)
            e_after = self._row_errors(kept, *after)
            drop = e_before - e_after
            y2 = sum(float(Y.double().square().sum()) for Y in self.targets)
            sums = [y2, float(e_before.sum()), float(e_after.sum()), float(drop.sum()),
                    float(drop.square().sum()), float(drop.numel())]  # fmt: skip
        local = torch.tensor(sums, dtype=torch.float64)
        if process_group is not None:
            local = all_reduce_sum(local, process_group)
        y2, r2_before, r2_after, total, squares, n = local.cpu().tolist()
        if not n:
            return None
        rel_before = r2_before / y2 if y2 > 0 else 0.0
        rel_after = r2_after / y2 if y2 > 0 else 0.0
        if n < 2:
            return rel_before, rel_after, None
        mean = total / n
        var = max(squares / n - mean * mean, 0.0) * n / (n - 1)
        if var > 0:
            z = mean / math.sqrt(var / n)
        else:
            z = math.copysign(math.inf, mean) if mean else 0.0
        return rel_before, rel_after, z


def accumulate_samples(
    conv: nn.Conv2d,
    fit: list[LayerStats],
    held: HeldOut,
    x: torch.Tensor,
    y: torch.Tensor,
    n_fit_here: int,
    positions_per_image: Optional[int],
    generator: Union[torch.Generator, Callable[[int, int, tuple], Positions]],
) -> None:
    """Sample one chunk of (input maps ``x``, target maps ``y``) of ``conv``: the first
    ``n_fit_here`` images feed the statistics ``fit`` (one per conv group: a grouped conv
    is ``groups`` independent problems), the others ``held``. Positions come from
    ``generator``, or from a callable ``(first image, n_images, out_size) -> Positions``
    for the chunk's images from ``first`` on (positions tied to global image ids)."""
    first = 0  # the chunk's image that the sampled rows start at
    if n_fit_here and len(fit) == 1 and whole_maps_cheaper(
        conv, tuple(x.shape[2:]), tuple(y.shape[2:]), positions_per_image
    ):  # fmt: skip
        fit[0].update_maps(
            x[:n_fit_here], y[:n_fit_here], stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation,
        )  # fmt: skip
        x, y = x[n_fit_here:], y[n_fit_here:]
        first, n_fit_here = n_fit_here, 0
    if not x.shape[0]:
        return
    out_size = tuple(y.shape[2:])
    if isinstance(generator, torch.Generator):
        pos = sample_positions(x.shape[0], out_size, positions_per_image, generator)
    else:
        pos = generator(first, x.shape[0], out_size)
    X = extract_patches(x, conv, pos)
    Y = gather_outputs(y, pos)
    rows = int((pos.image < n_fit_here).sum())  # positions are image-major
    if rows:
        g = len(fit)
        c_g, n_g = X.shape[1] // g, Y.shape[1] // g
        for j, stats in enumerate(fit):
            stats.update(X[:rows, j * c_g : (j + 1) * c_g], Y[:rows, j * n_g : (j + 1) * n_g])
    if rows < len(pos):
        held.add(X[rows:], Y[rows:])


_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _inplace(node: fx.Node, modules: dict) -> bool:
    """Whether ``node`` writes into its first argument."""
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    if node.op == "call_function":
        return node.target in _INPLACE_FUNCTIONS or bool(node.kwargs.get("inplace", False))
    return node.op == "call_method" and node.target.endswith("_")


def _copy_before_write(value, taken: tuple[dict, ...]) -> None:
    """Replace by copies the values in ``taken`` that share memory with ``value``, which
    is about to be written in place (they keep what they were when taken)."""
    if not torch.is_tensor(value):
        return
    ptr = value.untyped_storage().data_ptr()
    for out in taken:
        for key, held in out.items():
            if torch.is_tensor(held) and held.untyped_storage().data_ptr() == ptr:
                out[key] = held.clone()


class _Runner:
    """Runs a traced network node by node over per-batch caches of live values."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.by_name = {n.name: n for n in self.nodes}
        self.pos = {n.name: i for i, n in enumerate(self.nodes)}
        self.last_use: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for arg in node.all_input_nodes:
                self.last_use[arg.name] = i
        self.modules = dict(gm.named_modules())
        # The nodes that write their first argument, a value of the trace, in place.
        self.writers = {
            n for n in self.nodes
            if n.args and isinstance(n.args[0], fx.Node) and _inplace(n, self.modules)
        }  # fmt: skip
        self.interp = fx.Interpreter(gm, garbage_collect_values=False)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ValueError(
                f"the traced model takes {len(placeholders)} inputs; chanprune prunes models "
                "called with one tensor of images."
            )
        self.placeholder = placeholders[0]

    def run(self, node: fx.Node, env: dict) -> torch.Tensor:
        self.interp.env = env
        if node.op == "call_method" and node.target == "view":
            source = node.args[0]
            value = env.get(source)
            if torch.is_tensor(value) and not value.is_contiguous():
                # Maps run channels-last (faster convs on a CPU), which a model's
                # x.view(n, -1) cannot flatten: it views a default-layout copy instead.
                env[source] = value.contiguous()
                try:
                    return self.interp.run_node(node)
                finally:
                    env[source] = value
        return self.interp.run_node(node)

    def advance(self, env: dict, start: int, stop: int) -> None:
        """Run nodes ``[start, stop)`` into ``env`` (those it already holds are kept),
        then drop values not used from ``stop`` on."""
        for node in self.nodes[start:stop]:
            if node.op not in ("placeholder", "output") and node not in env:
                env[node] = self.run(node, env)
        for node in list(env):
            if self.last_use.get(node.name, -1) < stop:
                del env[node]

    def advanced(self, env: dict, start: int, stop: int) -> dict:
        """A copy of ``env`` run on as :meth:`advance` would, ``env`` unchanged: the values
        that in-place nodes write are copied first."""
        local = dict(env)
        for node in self.nodes[start:stop]:
            if node in self.writers and node.args[0] in env:
                local[node.args[0]] = env[node.args[0]].clone()  # never write the cache
        self.advance(local, start, stop)
        return local

    def evaluate(self, env: dict, targets: list[str], start: int) -> dict[str, torch.Tensor]:
        """The values of ``targets`` computed from ``env``, the values at position
        ``start`` (as :meth:`advance` leaves them), without changing it; see
        :meth:`evaluate_inputs`."""
        return self.evaluate_inputs(env, targets, (), start)[0]

    def evaluate_inputs(
        self, env: dict, targets: list[str], readers, start: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The values of ``targets`` (names of nodes), each as its node makes it (or as
        ``env`` holds it), and the first argument of each of ``readers`` (names of nodes,
        not run) as that node reads it, keyed by the reader: computed from ``env``, the
        values at position ``start`` (as :meth:`advance` leaves them), without changing it.

        The nodes run are those the values depend on, plus the in-place nodes that write
        one of the values used (held by ``env`` or computed here) before a node run, or a
        reader, reads it: a statement ``x.relu_()`` has no users in the trace, yet the
        nodes after it read the ``x`` it wrote. Those at or after ``start`` only, for a
        value ``env`` holds (the earlier ones wrote it already). A value ``env`` holds is
        copied before it is written (a view of it, made here, is not: avoid writing views
        in place), a value returned is copied before a write to its memory.

        Only the writes to a value used are found, not those to an alias of it (a view,
        an ``nn.Identity``'s output) that nothing reads after them."""
        readers = [self.by_name[r] for r in readers]
        needed: set[fx.Node] = set()

        def need(nodes) -> None:
            stack = list(nodes)
            while stack:
                node = stack.pop()
                if node not in env and node not in needed:
                    needed.add(node)
                    stack.extend(node.all_input_nodes)

        need(self.by_name[t] for t in targets)
        need(r.args[0] for r in readers)
        writers = [m for m in self.writers if m not in env]
        while True:  # to a fixed point: a writer run needs its inputs, which may be written
            last_read: dict[fx.Node, int] = {}
            for node in needed:
                for arg in node.all_input_nodes:
                    last_read[arg] = max(last_read.get(arg, -1), self.pos[node.name])
            for reader in readers:
                arg = reader.args[0]
                last_read[arg] = max(last_read.get(arg, -1), self.pos[reader.name])
            added = [
                m
                for m in writers
                if m not in needed and self.pos[m.name] < last_read.get(m.args[0], -1)
                and (m.args[0] in needed or (m.args[0] in env and self.pos[m.name] >= start))
            ]  # fmt: skip
            if not added:
                break
            need(added)
        local = dict(env)
        wanted = set(targets)
        values = {t: env[self.by_name[t]] for t in wanted if self.by_name[t] in env}
        inputs: dict[str, torch.Tensor] = {}
        reading: dict[int, list[fx.Node]] = {}
        for reader in readers:
            reading.setdefault(self.pos[reader.name], []).append(reader)
        for i, node in enumerate(self.nodes):
            for reader in reading.get(i, ()):
                inputs[reader.name] = local[reader.args[0]]
            if node not in needed:
                continue
            if node in self.writers:
                arg = node.args[0]
                if arg in env and local[arg] is env[arg]:
                    local[arg] = env[arg].clone()  # never write the cache
                _copy_before_write(local[arg], (values, inputs))
            local[node] = self.run(node, local)
            if node.name in wanted:
                values[node.name] = local[node]
        return values, inputs


# ---------------------------------------------------------------------------- criteria
def entropy_scores(gap: torch.Tensor, n_bins: int = 32) -> np.ndarray:
    """Entropy of each channel's global-average-pooled activation over images.

    ``gap`` has shape (n_images, c); each channel's values are binned over their own range
    (Luo and Wu, 2017). A constant channel has entropy 0.
    """
    values = gap.double().cpu().numpy()
    scores = np.zeros(values.shape[1])
    for i in range(values.shape[1]):
        hist, _ = np.histogram(values[:, i], bins=n_bins)
        p = hist[hist > 0] / hist.sum()
        scores[i] = float(-(p * np.log(p)).sum())
    return scores


class ActivationScores:
    """Activation and BatchNorm criteria for ``method`` in ACTIVATION_METHODS.

    ``apoz``: keep the channels whose input activation is least often zero (Hu et al.,
    2016); ``entropy``: of each channel's global-average-pooled activation over images
    (Luo and Wu, 2017); ``bn_scale``: ``|gamma|`` of the producer's original BatchNorm
    (Network Slimming).
    """

    def __init__(self, method: str, n_channels: int) -> None:
        self.method = method
        self.zeros = torch.zeros(n_channels, dtype=torch.float64)
        self.count = 0
        self.gaps: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        """Add the activations ``x`` (n, c, h, w) of fit images."""
        if self.method == "apoz":
            self.zeros += (x == 0).sum(dim=(0, 2, 3)).double().cpu()
            self.count += x.shape[0] * x.shape[2] * x.shape[3]
        elif self.method == "entropy":
            self.gaps.append(x.mean(dim=(2, 3)).cpu())

    def scores(self, bn_scale: Optional[np.ndarray]) -> np.ndarray:
        """The channels' scores (higher is kept); ``bn_scale`` is ``|gamma|`` of the
        producer's BatchNorm, used by ``bn_scale`` (never with a stream consumer, which
        has no producer: prune_model refuses that combination)."""
        if self.method == "apoz":
            return -(self.zeros.numpy() / max(self.count, 1))
        if self.method == "entropy":
            return entropy_scores(torch.cat(self.gaps))
        return bn_scale


def _gammas(plan: Plan) -> dict[str, np.ndarray]:
    """``|gamma|`` of each prunable group's channels, from the first affine BatchNorm the
    group passes through; groups that pass through none are absent."""
    out = {}
    for name, group in plan.groups.items():
        if not group.prunable:
            continue
        for module_name, node in group.carriers:
            bn = plan.graph.get_submodule(module_name)
            if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) or not bn.affine:
                continue
            offset = 0
            for g, width in plan.layouts[node]:
                if g == name:
                    gamma = bn.weight.detach()[offset : offset + width]
                    out[name] = gamma.abs().double().cpu().numpy()
                    break
                offset += width
            if name in out:
                break
    return out


def unscaled_linear_groups(plan: Plan) -> list[str]:
    """Prunable groups written by linear layers only and passing through no affine
    BatchNorm (a classifier's hidden layers): ``bn_scale`` has nothing to rank them by."""
    scaled = _gammas(plan)
    return [
        name for name, group in plan.groups.items()
        if group.prunable and group.producers and name not in scaled
        and all(isinstance(plan.graph.get_submodule(p), nn.Linear) for p in group.producers)
    ]  # fmt: skip


def bn_scales(plan: Plan) -> dict[str, np.ndarray]:
    """``|gamma|`` of each prunable group's channels, from the first affine BatchNorm the
    group passes through (read before any refit turns it into the identity).

    Raises
    ------
    UnsupportedLayerError
        A prunable group that passes through no affine BatchNorm (the criterion has no
        value for its channels); the message names the groups.
    """
    out = _gammas(plan)
    missing = [name for name, group in plan.groups.items() if group.prunable and name not in out]
    if missing:
        raise UnsupportedLayerError(
            f"method='bn_scale' needs an affine BatchNorm on every pruned channel group; "
            f"the groups {missing} pass through none."
        )
    return out


# ---------------------------------------------------------------------------- statistics
class _ConsumerStats:
    """One consumer's samples: float64 statistics per conv group, held-out rows."""

    def __init__(self, conv: nn.Conv2d, options: SweepOptions) -> None:
        g = conv.groups
        self.groups = g
        self.fit = [
            LayerStats(
                conv.in_channels // g, conv.out_channels // g, conv.kernel_size,
                device=options.device, compute_dtype=options.stats_dtype,
            )  # fmt: skip
            for _ in range(g)
        ]
        self.held = HeldOut()
        self.c, self.n = conv.in_channels, conv.out_channels
        # APoZ and entropy read the fit images' input activations of the consumer.
        wanted = options.method in ACTIVATION_STATISTICS
        self.activations = ActivationScores(options.method, self.c) if wanted else None

    @property
    def n_samples(self) -> int:
        return self.fit[0].n_samples

    @functools.cached_property
    def moments(self) -> list:
        """Each conv group's :class:`~chanprune.stats.Moments`, converted once: read only
        after the sampling is complete."""
        return [s.moments() for s in self.fit]

    def reduced(self, weight: np.ndarray, bias: np.ndarray):
        """The consumer's reduced selection problem over all its input channels:
        ``G`` (c, c), ``g`` (c,), ``t2``; plus each channel's squared weight norm and
        L1 norm."""
        g = self.groups
        c_g, n_g = self.c // g, self.n // g
        kh_kw = weight.shape[2] * weight.shape[3]
        gram = np.zeros((self.c, self.c))
        linear, wn2, l1 = np.zeros(self.c), np.zeros(self.c), np.zeros(self.c)
        t2 = 0.0
        for j, moments in enumerate(self.moments):
            w = weight[j * n_g : (j + 1) * n_g].reshape(n_g, c_g, kh_kw)
            gj, lj, tj = channel_gram(moments, w, bias[j * n_g : (j + 1) * n_g])
            sl = slice(j * c_g, (j + 1) * c_g)
            gram[sl, sl] = gj
            linear[sl] = lj
            wn2[sl] = np.square(w).sum(axis=(0, 2))
            l1[sl] = np.abs(w).sum(axis=(0, 2))
            t2 += tj
        return gram, linear, t2, wn2, l1

    def refit(self, kept: np.ndarray, ridge: float, fit_intercept: bool):
        """Block-diagonal least squares on the kept input positions ``kept`` (sorted, in
        the current input): weight (n, len(kept) / g, kh, kw), bias (n,), squared error."""
        g = self.groups
        c_g = self.c // g
        weights, biases, error = [], [], 0.0
        for j, moments in enumerate(self.moments):
            local = kept[(kept >= j * c_g) & (kept < (j + 1) * c_g)] - j * c_g
            w, b, err = refit_with_error(moments, local, ridge=ridge, fit_intercept=fit_intercept)
            weights.append(w.reshape(w.shape[0], len(local), -1))
            biases.append(b)
            error += err
        return np.concatenate(weights), np.concatenate(biases), error

    def error_of(self, kept: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> float:
        """Squared error of the weights (n, len(kept) / g, kh, kw) on the kept positions."""
        g = self.groups
        c_g, n_g = self.c // g, self.n // g
        total = 0.0
        for j, moments in enumerate(self.moments):
            local = kept[(kept >= j * c_g) & (kept < (j + 1) * c_g)] - j * c_g
            rows = slice(j * n_g, (j + 1) * n_g)
            w = weight[rows].reshape(n_g, -1)
            total += reconstruction_error(moments, local, w, bias[rows])
        return total

    @property
    def yty(self) -> float:
        return float(sum(float(s.yty) for s in self.fit))


def _dense(weight: np.ndarray, kept: np.ndarray, c: int, groups: int) -> np.ndarray:
    """A grouped conv's weight (n, k / g, kh, kw) on kept positions ``kept`` as the
    equivalent dense weight (n, k, kh, kw), zero between groups."""
    if groups == 1:
        return weight
    n = weight.shape[0]
    c_g, n_g = c // groups, n // groups
    out = np.zeros((n, len(kept)) + weight.shape[2:])
    start = 0
    for j in range(groups):
        count = int(((kept >= j * c_g) & (kept < (j + 1) * c_g)).sum())
        out[j * n_g : (j + 1) * n_g, start : start + count] = weight[j * n_g : (j + 1) * n_g]
        start += count
    return out


def _grouped_slice(weight: np.ndarray, kept: np.ndarray, c: int, groups: int) -> np.ndarray:
    """A conv's weight (n, c / g, kh, kw) on the kept input positions (sorted, of c)."""
    c_g, n_g = c // groups, weight.shape[0] // groups
    rows = []
    for j in range(groups):
        local = kept[(kept >= j * c_g) & (kept < (j + 1) * c_g)] - j * c_g
        rows.append(weight[j * n_g : (j + 1) * n_g][:, local])
    return np.concatenate(rows)


# ---------------------------------------------------------------------------- the sweep
class _GraphSweep:
    def __init__(
        self,
        reference: fx.GraphModule,
        plan: Plan,
        widths: dict[str, int],
        n_fit: int,
        options: SweepOptions,
        image_ids: list,
        shard: Optional[Shard] = None,
        bn_scale: Optional[dict] = None,
    ) -> None:
        self.plan = plan
        self.bn_scale = bn_scale or {}
        self.image_ids = image_ids  # per chunk: the global ids of its images
        self.shard = shard
        self.group = shard.group if shard is not None else None
        self.events = 0  # sampling events, the same count on every rank
        # Where the time goes: forward passes, statistics, collectives, selection + refit.
        self.timing = dict.fromkeys(("forward_s", "statistics_s", "all_reduce_s", "solve_s"), 0.0)
        self.gm = plan.graph
        self.options = options
        self.ref = _Runner(reference)
        self.pr = _Runner(plan.graph)
        if [n.name for n in self.ref.nodes] != [n.name for n in self.pr.nodes]:
            raise RuntimeError("the two traces of the model differ; it cannot be pruned.")
        self.widths = {name: g.size for name, g in plan.groups.items()}  # current widths
        self.target = dict(widths)
        self.decided = {
            name for name, g in plan.groups.items() if widths.get(name, g.size) >= g.size
        }
        self.cut: set[str] = set()  # consumers whose input lost channels since their refit
        self.kept: dict[str, np.ndarray] = {}
        self.n_fit = n_fit
        self.reports: list[LayerReport] = []
        self.diverged = False
        self.step = 0
        self.consumers = {c.name: c for c in plan.consumers}
        # (checkpoint, consumer): the positions of the values the caches hold and of the
        # consumer visited, while those are earlier (a cache budget); None when equal.
        self.behind: Optional[tuple[int, int]] = None
        # The position of the consumer visited: each pass computes on from the values
        # there (those the caches hold, or those recomputed from the checkpoint).
        self.at = self.pr.pos[self.pr.placeholder.name] + 1
        # Elements per image of each computed value, from the shapes recorded by the plan's
        # trace (whose example batch is the placeholder's first dimension); parameters
        # (get_attr) hold no per-image memory, values of no shape (tuples) are not counted.
        batch = (_shape(self.pr.placeholder) or (1,))[0]
        self.numel: dict[str, int] = {}
        for node in self.pr.nodes:
            shape = _shape(node)
            if shape is not None and node.op in ("call_module", "call_function", "call_method"):
                self.numel[node.name] = math.prod(shape) // batch

    # -- positions -------------------------------------------------------------------
    def positions(self, layout: tuple, group: str, kept: Optional[np.ndarray] = None):
        """Positions of ``group``'s channels in a value of ``layout`` at the current
        widths: all of them, or (``kept`` given) the kept positions of the whole value."""
        out, offset = [], 0
        for name, width in layout:
            now = self.widths[name] if name is not None else width
            if kept is None:
                if name == group:
                    out.append(offset + np.arange(now))
            else:
                out.append(offset + (kept if name == group else np.arange(now)))
            offset += now
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)

    # -- the cache budget ------------------------------------------------------------
    def alive(self, stop: int) -> set[str]:
        """The computed values that the caches hold at position ``stop`` of the trace
        (:meth:`_Runner.advance`): made before it and read at or after it. The images (the
        placeholder) are not among them."""
        last_use = self.pr.last_use
        return {
            n.name
            for n in self.pr.nodes[:stop]
            if n.name in self.numel and last_use.get(n.name, -1) >= stop
        }

    def shares_values(self, stop: int) -> bool:
        """Whether the pruned network's caches at ``stop`` may be the original's values
        themselves: nothing is pruned or refit yet (the two compute the same function, to
        the rounding of the folded BatchNorms), and no in-place node of either network
        writes a value alive there (which would change both)."""
        if self.diverged or self.kept:
            return False
        alive = self.alive(stop) | {self.pr.placeholder.name}
        return not any(
            runner.pos[w.name] >= stop and w.args[0].name in alive
            for runner in (self.ref, self.pr)
            for w in runner.writers
        )

    def bytes_moving_to(self, stop: int, held_ref, held_pr, n_images: int, itemsize: int) -> int:
        """Bytes of both caches for ``n_images`` images while they move from the values
        they hold (nodes ``held_ref`` and ``held_pr``, of one chunk) to those alive at
        ``stop``, a consumer's position in the trace: each value held at either point
        counted once.

        The original network's new values have their traced widths, plus the consumer's
        output (kept by :meth:`sample`'s ``keep_first``); the pruned network's have the
        current widths of their channel groups (groups decided later only shrink them).
        An upper bound where values share memory (views, in-place ops); ``itemsize``:
        bytes per element."""
        alive = self.alive(stop)
        ref = {n.name for n in held_ref} | alive | {self.pr.nodes[stop].name}
        pr = {n.name for n in held_pr} | alive
        elements = sum(self.numel.get(name, 0) for name in ref)
        elements += sum(self.numel.get(name, 0) * self._width_ratio(name) for name in pr)
        return int(math.ceil(elements * n_images * itemsize))

    def _width_ratio(self, name: str) -> float:
        """The current channels of value ``name`` over its traced ones (1 without a
        layout)."""
        layout = self.plan.layouts.get(name)
        traced = sum(width for _, width in layout) if layout else 0
        if not traced:
            return 1.0
        now = sum(self.widths[g] if g is not None else width for g, width in layout)
        return now / traced

    # -- sampling --------------------------------------------------------------------
    def sample(
        self, consumers: list[Consumer], envs_ref, envs_pr, *, keep_first: bool = False
    ) -> list[_ConsumerStats]:
        """Statistics of ``consumers`` at the current state of both networks: inputs from
        the pruned one, targets from the original, all in one run on from the frontier
        (from the checkpoint while :attr:`behind` is set). ``keep_first``: the first
        consumer sits at the frontier; its output in the original network (which never
        changes) stays in the cache, so the next advance reuses it."""
        correct = self.options.residual_correction
        convs, out_kept, stats = [], [], []
        ref_targets: list[str] = []
        pr_targets: list[str] = []
        for consumer in consumers:
            conv = as_conv(self.gm.get_submodule(consumer.name), consumer.spread)
            convs.append(conv)
            stats.append(_ConsumerStats(conv, self.options))
            # A conv's output is one group; decided before this visit (a squeeze-excitation
            # conv after the group's first consumer), its filters are already cut.
            out_group = self.plan.layouts.get(consumer.node, ((None, 0),))[0][0]
            out_kept.append(
                torch.from_numpy(self.kept[out_group]) if out_group in self.kept else None
            )
            ref_targets.append(consumer.node)  # (and its input in the pruned network)
            if correct and consumer.addend is not None:
                ref_targets.append(consumer.addend)
                pr_targets.append(consumer.addend)
        if not consumers:
            return stats
        events = []
        for _ in consumers:
            self.events += 1
            events.append(self.events)
        lo = 0
        for chunk, (env_r, env_p) in enumerate(zip(envs_ref, envs_pr)):
            tic = time.perf_counter()
            if self.behind is not None:
                # The values at the consumer, recomputed as the caches' advance would
                # compute them, into copies: the caches stay at the checkpoint.
                env_r = self.ref.advanced(env_r, *self.behind)
                env_p = self.pr.advanced(env_p, *self.behind)
            ref_values = self.ref.evaluate(env_r, list(dict.fromkeys(ref_targets)), self.at)
            pr_values, pr_inputs = self.pr.evaluate_inputs(
                env_p, list(dict.fromkeys(pr_targets)), [c.node for c in consumers], self.at
            )
            self.timing["forward_s"] += time.perf_counter() - tic
            if keep_first:
                first = self.ref.by_name[consumers[0].node]
                env_r[first] = ref_values[consumers[0].node]
                # Its inputs in the original network serve nothing else: freed now, not at
                # the next advance, so the cache never holds a layer's input and output.
                for arg in first.all_input_nodes:
                    if self.ref.last_use.get(arg.name, -1) <= self.ref.pos[first.name]:
                        env_r.pop(arg, None)
            ids = self.image_ids[chunk]
            for consumer, conv, kept_out, st, event in zip(
                consumers, convs, out_kept, stats, events
            ):
                x = pr_inputs[consumer.node]
                y = ref_values[consumer.node]
                if kept_out is not None:
                    y = y.index_select(1, kept_out.to(y.device))
                if correct and consumer.addend is not None:
                    y = y + (ref_values[consumer.addend] - pr_values[consumer.addend])
                if consumer.linear:  # as the conv: one sample per image
                    x = x.reshape(x.shape[0], -1, 1, consumer.spread)
                    y = y[:, :, None, None]
                n = x.shape[0]
                n_fit_here = int(min(max(self.n_fit - lo, 0), n))
                tic = time.perf_counter()
                accumulate_samples(
                    conv, st.fit, st.held, x, y, n_fit_here, self.options.positions_per_image,
                    self._positions(ids, event),
                )  # fmt: skip
                if st.activations is not None and n_fit_here:
                    st.activations.update(x[:n_fit_here])
                self.timing["statistics_s"] += time.perf_counter() - tic
            lo += x.shape[0]
        tic = time.perf_counter()
        for st in stats:
            for fit in st.fit:
                fit.flush()  # the buffered products belong to the statistics time
        self.timing["statistics_s"] += time.perf_counter() - tic
        tic = time.perf_counter()
        for st in stats:
            for fit in st.fit:
                fit.all_reduce(self.group)
        self.timing["all_reduce_s"] += time.perf_counter() - tic
        return stats

    def _positions(self, ids: torch.Tensor, event: int):
        """Positions drawn by global image id (see :func:`positions_of_images`)."""
        per_image, seed = self.options.positions_per_image, self.options.seed

        def draw(first: int, n: int, out_size: tuple) -> Positions:
            return positions_of_images(ids[first : first + n], out_size, per_image, seed, event)

        return draw

    # -- selection -------------------------------------------------------------------
    def select_group(self, name: str, first: Consumer, first_stats, envs_ref, envs_pr):
        """Kept channels of group ``name``, from the summed problems of its consumers."""
        group = self.plan.groups[name]
        keep = self.target[name]
        size = self.widths[name]
        options = self.options
        if options.method == "first_k":
            return select_first_k(size, keep).kept if group.parts == 1 else self._parts(
                name, keep, None)  # fmt: skip
        G = np.zeros((size, size))
        lin = np.zeros(size)
        t2 = 0.0
        wn2 = np.zeros(size)
        l1 = np.zeros(size)
        consumers = [self.consumers[name] for name in group.consumers]
        later = [c for c in consumers if c.name != first.name or first_stats is None]
        sampled = dict(zip([c.name for c in later], self.sample(later, envs_ref, envs_pr)))
        for consumer in consumers:
            stats = sampled.get(consumer.name, first_stats)
            conv = self.gm.get_submodule(consumer.name)
            bn = self.gm.get_submodule(consumer.bn) if consumer.bn else None
            weight, bias = folded_params(conv, bn, consumer.spread)
            gk, lk, tk, wk, l1k = stats.reduced(
                weight.double().cpu().numpy(), bias.double().cpu().numpy()
            )
            here = self.positions(consumer.layout, name)
            where = np.zeros((size, gk.shape[0]))  # channel -> its positions in the input
            where[np.tile(np.arange(size), len(here) // size), here] = 1.0
            others = np.ones(gk.shape[0])
            others[here] = 0.0
            scale = 1.0 / tk if tk > 0 else 1.0
            G += scale * where @ gk @ where.T
            lin += scale * where @ (lk - gk @ others)
            t2 += scale * (tk - 2.0 * lk @ others + others @ gk @ others)
            wn2 += scale * where @ wk
            l1 += where @ (l1k / max(l1k.sum(), np.finfo(float).tiny))
        first_here = self.positions(first.layout, name)[:size]
        scores = self.scores(name, sampled.get(first.name, first_stats), first_here)
        return self._parts(name, keep, (G, lin, t2, wn2, l1, scores))

    def scores(self, name: str, stats: _ConsumerStats, here: np.ndarray):
        """The activation or BatchNorm criterion of group ``name``'s channels (None for
        the other methods); ``here``: their positions in ``stats``' consumer input."""
        method = self.options.method
        if method == "bn_scale":
            return self.bn_scale[name]
        if method in ACTIVATION_STATISTICS:
            return stats.activations.scores(None)[here]
        return None

    def _parts(self, name: str, keep: int, problem) -> np.ndarray:
        """Select ``keep`` channels of group ``name``, the same number in each part."""
        group = self.plan.groups[name]
        size = self.widths[name]
        parts = group.parts
        per_part, part_size = keep // parts, size // parts
        kept = []
        for p in range(parts):
            subset = np.arange(p * part_size, (p + 1) * part_size)
            kept.append(subset[self._select(problem, subset, per_part)])
        return np.concatenate(kept).astype(np.int64)

    def _select(self, problem, subset: np.ndarray, keep: int) -> np.ndarray:
        options = self.options
        n = len(subset)
        if options.method == "first_k" or problem is None:
            return select_first_k(n, keep).kept
        if options.method == "random":
            return select_random(n, keep, options.seed + self.step).kept
        G, lin, t2, wn2, l1, scores = problem
        if options.method in ACTIVATION_METHODS:
            return select_by_score(scores[subset], keep).kept
        rest = np.ones(len(lin), dtype=bool)
        rest[subset] = False
        Gs = G[np.ix_(subset, subset)]
        gs = lin[subset] - G[np.ix_(subset, np.flatnonzero(rest))].sum(axis=1)
        if options.method == "max_response":
            return _top_k(l1[subset], keep)
        if options.method == "thinet":
            return select_thinet_gram(Gs, keep).kept
        if options.method in ("greedy_ls", "greedy_swap"):
            swaps = MAX_SWAPS if options.method == "greedy_swap" else 0
            return select_greedy_gram(Gs, gs, keep, t2=t2, max_swaps=swaps).kept
        w_norm = np.sqrt(wn2[subset]) if options.normalize else None
        return select_lasso_gram(
            Gs, gs, t2, keep, w_norm=w_norm, max_iter=options.max_iter, tol=options.tol
        ).kept

    # -- surgery ---------------------------------------------------------------------
    def remove(self, name: str, kept: np.ndarray, envs_pr) -> None:
        """Drop the channels of group ``name`` not in ``kept``, everywhere."""
        group = self.plan.groups[name]
        kept_t = torch.from_numpy(kept)
        for producer in group.producers:
            conv = self.gm.get_submodule(producer)
            if isinstance(conv, nn.Linear):
                prune_linear_out_features(conv, kept_t)
            elif conv.groups == 1:
                prune_conv_out_channels(conv, kept_t)
            else:
                prune_grouped_conv(conv, out_kept=kept_t)
        for module_name, node_name in group.carriers:
            module = self.gm.get_submodule(module_name)
            pos = torch.from_numpy(self.positions(self.plan.layouts[node_name], name, kept))
            if isinstance(module, nn.Conv2d):  # depthwise
                prune_grouped_conv(module, in_kept=pos, out_kept=pos)
            elif isinstance(module, nn.PReLU):
                module.weight = nn.Parameter(module.weight.detach()[pos].clone())
                module.num_parameters = len(pos)
            else:
                prune_batchnorm(module, pos)
        for consumer_name in group.consumers:
            consumer = self.consumers[consumer_name]
            conv = self.gm.get_submodule(consumer_name)
            pos = torch.from_numpy(self.positions(consumer.layout, name, kept))
            if group.sampler:
                # The stream keeps every channel: the conv reads the kept ones by index,
                # in the trace and in the model (the two hold their own parents).
                sampled = insert_channel_sampler(self.gm, consumer_name, pos)
                if self.plan.model is not None:
                    self.plan.model.set_submodule(consumer_name, sampled)
            elif consumer.linear:
                prune_linear_in_features(conv, pos, spatial_size=consumer.spread)
            elif conv.groups == 1:
                prune_conv_in_channels(conv, pos)
            else:
                prune_grouped_conv(conv, in_kept=pos)
            self.cut.add(consumer_name)
        for env in envs_pr:
            for node in list(env):
                layout = self.plan.layouts.get(node.name)
                if layout and any(g == name for g, _ in layout) and torch.is_tensor(env[node]):
                    pos = torch.from_numpy(self.positions(layout, name, kept))
                    spread = self.plan.spread.get(node.name, 1)
                    if spread > 1:  # a flattened map: each channel's features
                        pos = (pos[:, None] * spread + torch.arange(spread)).reshape(-1)
                    env[node] = env[node].index_select(1, pos.to(env[node].device))
        self.widths[name] = len(kept)
        self.kept[name] = kept
        self.decided.add(name)

    def install(self, consumer: Consumer, weight: np.ndarray, bias: np.ndarray) -> None:
        """Put the refit weights (BN folded) into the consumer: its BN becomes the
        identity plus the refit bias, or the conv takes the bias."""
        conv = self.gm.get_submodule(consumer.name)
        bn = self.gm.get_submodule(consumer.bn) if consumer.bn else None
        w = torch.as_tensor(weight, dtype=conv.weight.dtype)
        b = torch.as_tensor(bias, dtype=conv.weight.dtype)
        if bn is not None:
            set_batchnorm_identity(bn)
        if consumer.linear:
            set_linear_params(conv, w.reshape(w.shape[0], -1))
        elif conv.groups == 1:
            set_conv_params(conv, w)
        else:
            prune_grouped_conv(conv, weight=w)
        with torch.no_grad():
            if bn is not None and bn.affine:
                if conv.bias is not None:
                    conv.bias.zero_()
                bn.bias.copy_(b.to(bn.bias.device))
            elif conv.bias is not None:
                conv.bias.copy_(b.to(conv.bias.device))
            elif bn is not None:  # no affine terms: the identity BN adds -running_mean
                bn.running_mean.copy_(-b.to(bn.running_mean.device))

    # -- one consumer ----------------------------------------------------------------
    def visit(self, consumer: Consumer, envs_ref, envs_pr) -> None:
        tic = time.perf_counter()
        before = sum(self.timing.values())
        self._visit(consumer, envs_ref, envs_pr)
        sampled = sum(self.timing.values()) - before
        self.timing["solve_s"] += time.perf_counter() - tic - sampled

    def _visit(self, consumer: Consumer, envs_ref, envs_pr) -> None:
        options = self.options
        pending = [g for g in dict.fromkeys(consumer.in_groups) if g not in self.decided]
        drifted = options.refit and (
            consumer.name in self.cut or (options.correct_unpruned and self.diverged)
        )
        if not pending and not drifted:
            return
        start = time.perf_counter()
        layer = self.gm.get_submodule(consumer.name)
        conv = as_conv(layer, consumer.spread)
        bn = self.gm.get_submodule(consumer.bn) if consumer.bn else None
        c_before = conv.in_channels
        # Its output is kept only by caches that sit at it (within the budget).
        at_consumer = self.behind is None
        (stats,) = self.sample([consumer], envs_ref, envs_pr, keep_first=at_consumer)
        weight0, bias0 = folded_params(layer, bn, consumer.spread)
        weight0 = weight0.double().cpu().numpy()
        bias0 = bias0.double().cpu().numpy()
        fit_intercept = bn is not None or conv.bias is not None
        group0 = self.plan.groups[pending[0]] if len(pending) == 1 else None
        simple = (
            group0 is not None and consumer.layout == ((group0.name, c_before),)
            and group0.consumers == (consumer.name,) and group0.parts == 1
            and conv.groups == 1 and fit_intercept
        )  # fmt: skip
        kept_pos = np.arange(c_before)
        alpha = None
        if simple:
            # One consumer reading exactly the group: the layer-level solver as it is.
            name = pending[0]
            scores = self.scores(name, stats, np.arange(c_before))
            result = prune_layer_from_stats(
                stats.fit[0], weight0, bias0, keep=self.target[name],
                method="by_score" if scores is not None else options.method, scores=scores,
                refit=options.refit, ridge=options.ridge, normalize=options.normalize,
                alternate=options.alternate and options.method == "lasso",
                random_state=options.seed + self.step, max_iter=options.max_iter,
                tol=options.tol,
            )  # fmt: skip
            self.remove(name, result.kept, envs_pr)
            kept_pos = result.kept
            weight, bias = result.weight, result.bias
            err = result.rel_error * stats.yty
            err_before = result.rel_error_before_refit * stats.yty
            alpha = result.alpha
        else:
            for i, name in enumerate(pending):
                # After the first group is cut, this consumer's input has changed: the
                # next group's problem is sampled afresh.
                first_stats = stats if i == 0 else None
                kept = self.select_group(name, consumer, first_stats, envs_ref, envs_pr)
                kept_pos = kept_pos[self.positions(consumer.layout, name, kept)]
                self.remove(name, kept, envs_pr)
            w_sel = _grouped_slice(weight0, kept_pos, c_before, conv.groups)
            err_before = stats.error_of(kept_pos, w_sel, bias0)
            if options.refit:
                weight, bias, err = stats.refit(kept_pos, options.ridge, fit_intercept)
                weight = weight.reshape((weight.shape[0], -1) + tuple(conv.kernel_size))
            else:
                weight, bias, err = w_sel, bias0, err_before
        unknowns = len(kept_pos) // conv.groups * conv.kernel_size[0] * conv.kernel_size[1] + 1
        if options.refit and stats.n_samples < 2 * unknowns:
            logger.warning(
                "%s: %d samples for %d unknowns per output; the refit may overfit (use more "
                "images or positions per image, or a larger ridge).",
                consumer.name, stats.n_samples, unknowns,
            )  # fmt: skip
        y2 = stats.yty if stats.yty > 0 else 1.0
        dense = _dense(weight, kept_pos, c_before, conv.groups)
        if not options.refit:
            held = stats.held.rel_error(kept_pos, dense, bias, self.group)
        else:
            # A refit is kept where it surely lowers the held-out error: one that fits
            # only the fit images (a classifier over one sample per image) keeps the
            # weights it had.
            w_sel = _grouped_slice(weight0, kept_pos, c_before, conv.groups)
            dense_sel = _dense(w_sel, kept_pos, c_before, conv.groups)
            check = stats.held.compare(kept_pos, (dense_sel, bias0), (dense, bias), self.group)
            held_sel, held, z = check if check is not None else (None, None, None)
            if z is not None and z < REFIT_Z:
                logger.info(
                    "%s: the refit does not surely lower the held-out error (%.4f, %.4f "
                    "without, z = %.2f); the weights are kept.", consumer.name, held,
                    held_sel, z,
                )  # fmt: skip
                weight, bias, held = w_sel, bias0, held_sel
                err = err_before = stats.error_of(kept_pos, w_sel, bias0)
        self.install(consumer, weight, bias)
        self.cut.discard(consumer.name)
        self.diverged = True
        self.step += 1
        self.reports.append(
            LayerReport(
                name=consumer.name,
                producer=", ".join(pending) or None,
                channels_before=c_before,
                channels_after=len(kept_pos),
                rel_error=float(err / y2),
                rel_error_heldout=None if held is None else float(held),
                rel_error_before_refit=float(err_before / y2),
                n_samples=stats.n_samples,
                time_s=time.perf_counter() - start,
                alpha=alpha,
            )
        )
        logger.info(
            "%s: %d -> %d channels, rel. error %.4f", consumer.name, c_before, len(kept_pos),
            err / y2,
        )  # fmt: skip


def sweep_graph(
    reference: fx.GraphModule,
    plan: Plan,
    widths: dict[str, int],
    images: torch.Tensor,
    n_fit: int,
    options: SweepOptions,
    *,
    batch_size: int = 100,
    progress: bool = True,
    image_ids: Optional[torch.Tensor] = None,
    shard: Optional[Shard] = None,
    bn_scale: Optional[dict[str, np.ndarray]] = None,
    cache_bytes: Optional[int] = None,
) -> tuple[list[LayerReport], dict[str, np.ndarray], dict[str, float]]:
    """Prune the network of ``plan`` (its graph shares the modules of the model being
    pruned, which is changed in place) to ``widths``.

    Parameters
    ----------
    reference : fx.GraphModule
        A trace of an unchanged copy of the model; its consumers' BatchNorms are folded
        here (it is changed).
    plan : Plan
        From :func:`chanprune.graph.trace_plan` on the model being pruned.
    widths : dict of group -> int
        Channels each prunable group keeps (multiples of its step).
    images : tensor of shape (n_images, C, H, W)
        Calibration images, the ``n_fit`` fit images first, then the held-out ones.
    n_fit : int
    options : SweepOptions
    image_ids : int tensor of shape (n_images,), optional
        Global ids of ``images`` in the whole calibration set (default ``0..n_images-1``):
        the sampled positions of an image depend on its id only.
    shard : Shard, optional
        A sharded run: ``images`` are this rank's, every statistic is all-reduced over
        ``shard.group`` before it is used.
    bn_scale : dict of group -> ndarray, optional
        ``method="bn_scale"``: each prunable group's ``|gamma|`` (:func:`bn_scales` of
        the plan before any change).
    cache_bytes : int, optional
        Memory for the values both networks' caches hold for every image (on
        ``options.device``; the images themselves not counted). The caches move on to a
        consumer only where the values alive there, with those held where they leave
        (alive while the new ones are computed), fit (estimated from the traced shapes,
        :meth:`_GraphSweep.bytes_moving_to`); otherwise they stay where they are and each
        pass recomputes the nodes from there, with the same result. 0: every pass starts
        from the images; None: no budget.

    Returns
    -------
    reports : list of LayerReport
        One per refit consumer, in graph order.
    kept : dict of group -> ndarray
        The kept channel indices of each pruned group (a replayable plan).
    timing : dict of str -> float
        Seconds in the forward passes of both networks (``forward_s``), in the
        statistics' products (``statistics_s``), in the all-reduces (``all_reduce_s``) and
        in selection, refit and surgery (``solve_s``).
    """
    for consumer in plan.consumers:
        if consumer.bn is not None:
            conv = reference.get_submodule(consumer.name)
            bn = reference.get_submodule(consumer.bn)
            reference.set_submodule(consumer.name, fold_batchnorm(conv, bn))
            reference.set_submodule(consumer.bn, nn.Identity())
    if image_ids is None:
        image_ids = torch.arange(images.shape[0])
    sweep = _GraphSweep(
        reference, plan, widths, n_fit, options, list(image_ids.cpu().split(batch_size)), shard,
        bn_scale,
    )  # fmt: skip
    device = options.device
    chunks = [chunk.to(device) for chunk in images.split(batch_size)]
    envs_ref = [{sweep.ref.placeholder: channels_last(chunk)} for chunk in chunks]
    envs_pr = [{sweep.pr.placeholder: channels_last(chunk)} for chunk in chunks]
    n_images, itemsize = images.shape[0], images.element_size()
    checkpoint = sweep.pr.pos[sweep.pr.placeholder.name] + 1  # where the caches are
    held_at = "the images"
    bar = tqdm(plan.consumers, desc="pruning", disable=not progress)
    for consumer in bar:
        bar.set_postfix_str(consumer.name)
        stop = sweep.at = sweep.pr.pos[consumer.node]
        if cache_bytes is None or sweep.bytes_moving_to(
            stop, envs_ref[0], envs_pr[0], n_images, itemsize
        ) <= cache_bytes:  # fmt: skip
            tic = time.perf_counter()
            share = sweep.shares_values(stop)
            for env_r, env_p in zip(envs_ref, envs_pr):
                sweep.ref.advance(env_r, checkpoint, stop)
                if share:  # one copy of the first maps, the largest, instead of two
                    env_p.clear()
                    env_p.update((sweep.pr.by_name[n.name], v) for n, v in env_r.items())
                else:
                    sweep.pr.advance(env_p, checkpoint, stop)
            sweep.timing["forward_s"] += time.perf_counter() - tic
            checkpoint, sweep.behind = stop, None
            # (Where nothing but the images is alive, the caches hold just them.)
            held_at = f"the input of {consumer.name}" if sweep.alive(stop) else "the images"
        else:
            sweep.behind = (checkpoint, stop)
            logger.info(
                "%s: the values alive at its input exceed the cache budget; recomputing "
                "from %s in each pass.", consumer.name, held_at,
            )  # fmt: skip
        sweep.visit(consumer, envs_ref, envs_pr)
    return sweep.reports, sweep.kept, sweep.timing
