"""Channel groups of any traceable network: the pruning plan, derived from the graph.

The model is traced with :mod:`torch.fx` (a symbolic trace: no weights are run) and one
example input is propagated through the trace for the shapes. Every tensor with a channel
dimension gets a *layout*: the sequence of *atoms* its channels are made of, an atom being
the channels written by one producer (a conv's filters) or a fixed source (the network's
input, a linear layer's features, zero padding). Ops move atoms around:

- one-to-one carriers keep the layout: BatchNorm, activations, dropout, pooling, resize,
  spatial slicing and padding, a depthwise conv (its filters are per channel);
- ``torch.cat`` along channels concatenates layouts, channel zero-padding adds fixed atoms;
- an elementwise op of two tensors ties their atoms together (a residual addition, a
  squeeze-excitation multiply), so those channels are one index space;
- a linear layer on ``(N, features)`` is a 1x1 conv on its features: it writes an atom
  and reads its input as a conv does (ResNet's classifier, VGG's hidden layers);
- flattening maps keeps their layout, counted in channels of ``H * W`` features each
  (channel-major), for linear layers to read as a conv over the whole map;
- anything else (a channel shuffle, a split, an unknown module) fixes the atoms it reads.

A *channel group* is a class of tied atoms: channels with one index space, written by
its producers and read by its consumers (the convs and linear layers whose input
contains it). A group is pruned when nothing fixes it; otherwise it is kept whole, and
:class:`Plan` says why. Groups tied to a residual addition are kept whole, as the paper
does; the network's input and its outputs are fixed too.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ._validation import check_int_in_range, check_real_in_range
from .exceptions import PlanWarning, UnsupportedLayerError
from .schedule import _achieved, resolve_explicit
from .surgery import SampledConv2d

__all__ = [
    "ChannelGroup",
    "Consumer",
    "Plan",
    "LayerCost",
    "trace_plan",
    "symbolic_trace",
    "with_channel_samplers",
    "group_of_key",
    "keep_whole",
    "INPUT_SUFFIX",
    "PlanWarning",
    "uniform_widths",
    "paper_multipliers",
    "widths_for_cost",
    "explicit_widths",
]


# Modules that carry channels one to one and have no per-channel parameters.
_PLAIN_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d,
)  # fmt: skip
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)

_PLAIN_FUNCTIONS = {
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.nn.functional.relu,
    torch.nn.functional.relu6, torch.nn.functional.leaky_relu, torch.nn.functional.elu,
    torch.nn.functional.gelu, torch.nn.functional.silu, torch.nn.functional.mish,
    torch.nn.functional.hardswish, torch.nn.functional.hardsigmoid,
    torch.nn.functional.hardtanh, torch.nn.functional.sigmoid, torch.nn.functional.tanh,
    torch.nn.functional.softplus, torch.nn.functional.dropout,
    torch.nn.functional.dropout2d, torch.nn.functional.max_pool2d,
    torch.nn.functional.avg_pool2d, torch.nn.functional.adaptive_avg_pool2d,
    torch.nn.functional.adaptive_max_pool2d, torch.nn.functional.interpolate,
    torch.clamp, torch.clip,
}  # fmt: skip
_PLAIN_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip",
    "contiguous", "clone", "detach", "float", "double", "to",
}  # fmt: skip
_BINARY_FUNCTIONS = {
    operator.add: "add", operator.iadd: "add", torch.add: "add", operator.sub: "add",
    operator.isub: "add", torch.sub: "add", operator.mul: "mul", operator.imul: "mul",
    torch.mul: "mul", operator.truediv: "mul", operator.itruediv: "mul", torch.div: "mul",
}  # fmt: skip
_BINARY_METHODS = {
    "add": "add", "add_": "add", "sub": "add", "sub_": "add", "mul": "mul", "mul_": "mul",
    "div": "mul", "div_": "mul",
}  # fmt: skip
#: The most input features of a linear layer that is a consumer: its statistics are a
#: (features x features) float64 Gram (8192: 512 MB), as large as a 3x3 conv's over 900
#: channels. A wider one (VGG's 25088-feature fc6) keeps the channels it reads.
MAX_LINEAR_FEATURES = 8192
_RESIDUAL = "residual addition"  # in the reasons of the groups a residual stream fixes
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}


# ---------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Consumer:
    """A conv or linear layer whose input channels are selected and which is then refit.

    Attributes
    ----------
    name : str
        ``named_modules()`` path of the layer.
    node : str
        Its node in the trace.
    layout : tuple of (group or None, int)
        Its input channels, in order: ``(group name, width)`` segments; None for channels
        of no prunable group.
    bn : str or None
        The BatchNorm right after it (folded for the targets, then the identity plus the
        refit bias), if any.
    addend : str or None
        When its output (after ``bn``) is added to another tensor: that tensor's node, so
        the target becomes ``Y + S - S'`` (residual correction).
    groups : int
        The conv's ``groups`` (1, or a grouped conv: the refit is block-diagonal).
    stream : bool
        Whether it reads only channels kept whole because they are tied to a residual
        addition (a residual stream): a channel sampler may select its input
        (:func:`with_channel_samplers`).
    linear : bool
        A linear layer on ``(N, features)``, sampled and refit as the conv it computes: a
        1x1 conv on features, or over the whole map where they are a flattened map.
    spread : int
        Input features per channel: ``H * W`` of the maps flattened into a linear layer
        (channel-major), 1 otherwise.
    """

    name: str
    node: str
    layout: tuple
    bn: Optional[str] = None
    addend: Optional[str] = None
    groups: int = 1
    stream: bool = False
    linear: bool = False
    spread: int = 1

    @property
    def in_groups(self) -> list[str]:
        return [g for g, _ in self.layout if g is not None]

    @property
    def samplable(self) -> bool:
        """Whether a channel sampler may select its input: an ordinary conv reading only a
        residual stream, whose output is not added back to it (not a projection)."""
        return self.stream and self.groups == 1 and self.addend is None and not self.linear


@dataclass(frozen=True)
class ChannelGroup:
    """Channels with one index space.

    Attributes
    ----------
    name : str
        The first producer's module path (the key of an explicit schedule).
    size : int
        Channels in the group.
    producers : tuple of str
        Modules whose filters write the group (they lose the dropped filters).
    carriers : tuple of (str, str)
        Modules with per-channel parameters the group passes through (BatchNorm,
        depthwise conv, PReLU), with their node: its layout (:attr:`Plan.layouts`) says
        where the group sits among the module's channels.
    consumers : tuple of str
        Consumers (convs and linear layers) reading the group.
    parts : int
        Grouped convs split the group into this many equal contiguous parts; a selection
        keeps the same number of channels in each.
    fixed : tuple of str
        Why the group is kept whole; empty when it is pruned.
    sampler : bool
        The input of one consumer that reads a residual stream, selected by a channel
        sampler (:func:`with_channel_samplers`): named ``"<consumer>:in"``, it has no
        producers or carriers, and the stream itself keeps every channel.
    """

    name: str
    size: int
    producers: tuple
    carriers: tuple
    consumers: tuple
    parts: int = 1
    fixed: tuple = ()
    sampler: bool = False

    @property
    def prunable(self) -> bool:
        return not self.fixed

    @property
    def step(self) -> int:
        """Widths are multiples of this (one channel per part)."""
        return self.parts


@dataclass(frozen=True)
class LayerCost:
    """MACs of one conv or linear layer: ``coef * c_in * c_out`` (per image).

    ``c_in`` is ``in_fixed`` plus the widths of ``in_groups``; likewise ``c_out``. A
    depthwise conv, whose cost is linear in its channels, has ``out_fixed = 1`` and its
    group on the input side; a grouped conv's ``coef`` is divided by its groups.
    """

    name: str
    coef: float
    in_groups: tuple
    in_fixed: int
    out_groups: tuple
    out_fixed: int

    def macs(self, widths: Mapping[str, int]) -> float:
        c_in = self.in_fixed + sum(widths[g] for g in self.in_groups)
        c_out = self.out_fixed + sum(widths[g] for g in self.out_groups)
        return self.coef * c_in * c_out


@dataclass
class Plan:
    """The channel groups of a traced network, its consumers in graph order, its costs.

    ``graph`` is the :class:`torch.fx.GraphModule` the plan was made from (it shares the
    model's modules); ``input_shape`` the example input's shape without the batch.
    """

    graph: fx.GraphModule
    input_shape: tuple
    model: Optional[nn.Module] = None  # the traced model (a channel sampler replaces a conv)
    groups: dict = field(default_factory=dict)  # name -> ChannelGroup, in graph order
    consumers: list = field(default_factory=list)  # Consumer, in graph order
    costs: list = field(default_factory=list)  # LayerCost
    unknown_ops: dict = field(default_factory=dict)  # group name -> [op descriptions]
    layouts: dict = field(default_factory=dict)  # node name -> tuple of (group|None, width)
    spread: dict = field(default_factory=dict)  # node name -> features per channel (flattened)

    @property
    def prunable(self) -> dict[str, int]:
        """Prunable groups and their sizes, in graph order."""
        return {g.name: g.size for g in self.groups.values() if g.prunable}

    def macs(self, widths: Optional[Mapping[str, int]] = None) -> float:
        """MACs per image of every conv and linear layer, for the given group widths
        (missing groups keep their size)."""
        full = {name: g.size for name, g in self.groups.items()}
        full.update(widths or {})
        return float(sum(cost.macs(full) for cost in self.costs))

    def describe(self) -> str:
        """A plain-text listing: each group, its size, producers, consumers, and why it is
        kept whole where it is."""
        lines = []
        for g in self.groups.values():
            state = "prunable" if g.prunable else "kept whole: " + "; ".join(g.fixed)
            parts = f", {g.parts} equal parts" if g.parts > 1 else ""
            lines.append(f"{g.name} ({g.size} channels{parts}): {state}")
            lines.append(f"    producers: {', '.join(g.producers) or '-'}")
            lines.append(f"    consumers: {', '.join(g.consumers) or '-'}")
            if g.carriers:
                lines.append(f"    through:   {', '.join(name for name, _ in g.carriers)}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- tracing
class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the earlier atom names the class


class _ShapeRecorder(fx.Interpreter):
    """Runs the trace once, recording each tensor node's shape in ``node.meta``."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["chanprune_shape"] = tuple(result.shape) if torch.is_tensor(result) else None
        return result


def _shape(node: Any) -> Optional[tuple]:
    """The traced tensor shape of ``node``; None for anything that is not one tensor."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("chanprune_shape")


def _describe(node: fx.Node, modules: Mapping[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', str(node.target))}() at node {node.name}"
    return f"{node.op} {node.target!r} at node {node.name}"


class _Analysis:
    """One pass over the trace, assigning atoms and recording what each node does."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.uf = _UnionFind()
        self.atom_size: list[int] = []
        self.atom_producer: list[Optional[str]] = []  # module path, None for fixed sources
        self.fixed: dict[int, list[str]] = {}  # atom -> reasons (resolved to classes later)
        self.unknown: dict[int, list[str]] = {}  # atom -> unknown op descriptions
        self.layout: dict[str, tuple] = {}  # node name -> atoms
        self.consumers: list[tuple[fx.Node, nn.Module]] = []  # convs and linears
        self.carriers: list[tuple[str, str]] = []  # (module path, node name)
        self.partition: dict[int, list[int]] = {}  # atom -> grouped-conv group counts
        self.calls: dict[str, int] = {}
        # Flattened maps: node -> features per channel (H * W); their layouts count channels.
        self.spread: dict[str, int] = {}

    # atoms ------------------------------------------------------------------------
    def new_atom(self, size: int, producer: Optional[str] = None, reason: str = "") -> int:
        atom = self.uf.new()
        self.atom_size.append(size)
        self.atom_producer.append(producer)
        if reason:
            self.fixed.setdefault(atom, []).append(reason)
        return atom

    def fix(self, atoms, reason: str, unknown: bool = False) -> None:
        for atom in atoms:
            self.fixed.setdefault(atom, []).append(reason)
            if unknown:
                self.unknown.setdefault(atom, []).append(reason)

    def atoms_of(self, node: Any) -> tuple:
        return self.layout.get(node.name, ()) if isinstance(node, fx.Node) else ()

    def fresh(self, node: fx.Node, reason: str) -> None:
        """A fixed source: the node's channels come from nothing prunable."""
        shape = _shape(node)
        if shape is not None and len(shape) >= 2:
            self.layout[node.name] = (self.new_atom(shape[1], reason=reason),)

    def unknown_op(self, node: fx.Node) -> None:
        what = _describe(node, self.modules)
        for arg in node.all_input_nodes:
            self.fix(self.atoms_of(arg), f"read by {what}, which the planner does not know",
                     unknown=True)  # fmt: skip
        self.fresh(node, f"written by {what}")

    def carry(self, node: fx.Node, source: Any) -> None:
        if isinstance(source, fx.Node) and source.name in self.layout:
            shape, src = _shape(node), _shape(source)
            if shape is not None and src is not None and len(shape) >= 2 and len(src) >= 2:
                if shape[1] == src[1]:
                    self.layout[node.name] = self.layout[source.name]
                    if source.name in self.spread:
                        self.spread[node.name] = self.spread[source.name]
                    return
        self.unknown_op(node)

    # nodes ------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.fresh(node, "the network's input")
            elif node.op == "get_attr":
                self.fresh(node, f"a stored tensor ({node.target}) used in the computation")
            elif node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1
                self.module(node, self.modules[node.target])
            elif node.op == "call_function":
                self.function(node)
            elif node.op == "call_method":
                self.method(node)
            elif node.op == "output":
                for arg in node.all_input_nodes:
                    self.fix(self.atoms_of(arg), "the network's output")
        self.check_spread()
        for name, count in self.calls.items():
            module = self.modules[name]
            if count > 1 and isinstance(module, (nn.Conv2d, nn.Linear, *_BATCHNORMS)):
                for node in self.gm.graph.nodes:
                    if node.op == "call_module" and node.target == name:
                        reason = f"{name} is called {count} times (shared weights)"
                        self.fix(self.atoms_of(node.args[0]), reason)
                        self.fix(self.atoms_of(node), reason)

    def check_spread(self) -> None:
        """Flattened maps may be read by linear layers (which then read them as convs over
        the whole map) and through ops without per-feature parameters; any other reader
        (a BatchNorm1d, an addition, a concatenation) would mix channels and positions, so
        the channels it reads are fixed."""
        readers = {node.name for node, _ in self.consumers}
        carriers = {node for _, node in self.carriers}
        by_name = {node.name: node for node in self.gm.graph.nodes}
        for name in self.spread:
            for user in by_name[name].users:
                if user.name in readers and user.args[0] is by_name[name]:
                    continue
                if user.name in self.spread and user.name not in carriers:
                    continue
                what = _describe(user, self.modules)
                self.fix(self.layout[name], f"flattened with the positions, then read by {what}")

    def module(self, node: fx.Node, module: nn.Module) -> None:
        source = node.args[0] if node.args else None
        if isinstance(module, nn.Conv2d):
            self.conv(node, module, source)
        elif isinstance(module, nn.Linear):
            self.linear(node, module, source)
        elif isinstance(module, _BATCHNORMS):
            self.carry(node, source)
            if node.name in self.layout:
                self.carriers.append((node.target, node.name))
        elif isinstance(module, nn.PReLU):
            self.carry(node, source)
            if module.num_parameters > 1 and node.name in self.layout:
                self.carriers.append((node.target, node.name))
        elif isinstance(module, nn.Flatten):
            self.reshape(node, source)
        elif isinstance(module, _PLAIN_MODULES):
            self.carry(node, source)
        else:
            self.unknown_op(node)

    def conv(self, node: fx.Node, conv: nn.Conv2d, source: Any) -> None:
        name = node.target
        if isinstance(conv, SampledConv2d):
            # It reads some channels of its input through an index: those stay whole.
            self.fix(self.atoms_of(source), f"read through the channel sampler of {name}")
            self.layout[node.name] = (self.new_atom(conv.out_channels, producer=name),)
            return
        c_in, c_out, g = conv.in_channels, conv.out_channels, conv.groups
        if g > 1 and g == c_in == c_out:  # depthwise: one filter per channel
            self.carry(node, source)
            if node.name in self.layout:
                self.carriers.append((name, node.name))
            return
        atoms = self.atoms_of(source)
        out = self.new_atom(c_out, producer=name)
        self.layout[node.name] = (out,)
        if g > 1:
            if len(atoms) != 1:
                self.fix(atoms, f"read by the grouped conv {name} with other channels")
            else:
                self.partition.setdefault(atoms[0], []).append(g)
            self.partition.setdefault(out, []).append(g)
        problem = None
        if isinstance(conv.padding, str):
            problem = f"{name} has padding={conv.padding!r} (only integer padding is sampled)"
        elif conv.padding_mode != "zeros" and any(conv.padding):
            problem = f"{name} pads with padding_mode={conv.padding_mode!r}"
        if problem:
            self.fix(atoms, problem)
            return
        self.consumers.append((node, conv))

    def linear(self, node: fx.Node, linear: nn.Linear, source: Any) -> None:
        """A linear layer on ``(N, features)`` is the 1x1 conv it computes on its features
        as channels: the producer of its outputs and, up to :data:`MAX_LINEAR_FEATURES`
        inputs, a consumer. On any other rank (tokens, ``(N, T, features)``) its features
        are not dimension 1: both sides are fixed."""
        name = node.target
        src, shape = _shape(source), _shape(node)
        if src is None or shape is None or len(src) != 2 or len(shape) != 2:
            rank = "an unknown" if src is None else f"a {len(src)}-d"
            self.fix(self.atoms_of(source), f"read by the linear layer {name} on {rank} input")
            self.fresh(node, f"written by the linear layer {name} on {rank} input")
            return
        self.layout[node.name] = (self.new_atom(linear.out_features, producer=name),)
        atoms = self.atoms_of(source)
        spread = self.spread.get(source.name, 1)
        if sum(self.atom_size[a] for a in atoms) * spread != linear.in_features:
            self.fix(atoms, f"read by the linear layer {name} in a layout not followed")
            return
        if linear.in_features > MAX_LINEAR_FEATURES:
            self.fix(
                atoms,
                f"read by the linear layer {name} over {linear.in_features} features (its "
                f"statistics are kept up to {MAX_LINEAR_FEATURES})",
            )  # fmt: skip
            return
        self.consumers.append((node, linear))

    def function(self, node: fx.Node) -> None:
        fn = node.target
        tensors = [a for a in node.all_input_nodes if _shape(a) is not None]
        if _shape(node) is None:  # sizes, tuples: handled where their items are used
            if fn is torch.chunk or fn is torch.split:
                self.unknown_op(node)
            return
        if fn in _PLAIN_FUNCTIONS or fn is torch.nn.functional.batch_norm:
            self.carry(node, node.args[0])
        elif fn in _BINARY_FUNCTIONS:
            self.binary(node, _BINARY_FUNCTIONS[fn], tensors)
        elif fn in (torch.cat, torch.concat):
            self.concat(node)
        elif fn is torch.nn.functional.pad:
            self.pad(node)
        elif fn in _RESHAPE_FUNCTIONS:
            self.reshape(node, node.args[0])
        elif fn is operator.getitem:
            self.getitem(node)
        elif fn in (torch.mean, torch.sum, torch.amax):
            self.reduce(node, node.args[0])
        else:
            self.unknown_op(node)

    def method(self, node: fx.Node) -> None:
        name = node.target
        if _shape(node) is None:
            if name in ("chunk", "split"):
                self.unknown_op(node)
            return
        tensors = [a for a in node.all_input_nodes if _shape(a) is not None]
        if name in _PLAIN_METHODS:
            self.carry(node, node.args[0])
        elif name in _BINARY_METHODS:
            self.binary(node, _BINARY_METHODS[name], tensors)
        elif name in _RESHAPE_METHODS:
            self.reshape(node, node.args[0])
        elif name in _REDUCE_METHODS:
            self.reduce(node, node.args[0])
        else:
            self.unknown_op(node)

    def binary(self, node: fx.Node, kind: str, tensors: list) -> None:
        shape = _shape(node)
        with_channels = [t for t in tensors if len(_shape(t)) >= 2 and _shape(t)[1] > 1]
        if not with_channels and len(shape) >= 2 and shape[1] == 1:
            # A group narrowed to one channel (e.g. h-swish's x * relu6(x + 3) on it):
            # the tensors that carry it are its channels, not a broadcast.
            with_channels = [t for t in tensors if len(_shape(t)) >= 2 and self.atoms_of(t)]
        if not with_channels:
            self.carry(node, tensors[0])
            return
        if len(tensors) == 1 or len(with_channels) == 1 and len(shape) >= 2:
            main = with_channels[0] if with_channels else tensors[0]
            for other in tensors:
                if other is not main:
                    reason = f"broadcast into {_describe(node, self.modules)}"
                    self.fix(self.atoms_of(other), reason)
            self.carry(node, main)
            return
        layouts = [self.atoms_of(t) for t in with_channels]
        sizes = [[self.atom_size[a] for a in layout] for layout in layouts]
        if len(shape) < 2 or any(not layout for layout in layouts) or any(
            s != sizes[0] for s in sizes
        ):
            reason = (
                f"a {_RESIDUAL} of differently composed tensors"
                if kind == "add"
                else f"{_describe(node, self.modules)} of differently composed tensors"
            )
            for layout in layouts:
                self.fix(layout, reason)
            self.fresh(node, reason)
            return
        for layout in layouts[1:]:
            for a, b in zip(layouts[0], layout):
                self.uf.union(a, b)
        if kind == "add":
            for layout in layouts:
                self.fix(layout, f"tied to a {_RESIDUAL}")
        self.layout[node.name] = layouts[0]

    def concat(self, node: fx.Node) -> None:
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        rank = len(_shape(node))
        if dim not in (1, 1 - rank) or not all(isinstance(p, fx.Node) for p in parts):
            self.unknown_op(node)
            return
        atoms: tuple = ()
        for part in parts:
            if part.name not in self.layout:
                self.unknown_op(node)
                return
            atoms += self.layout[part.name]
        self.layout[node.name] = atoms

    def pad(self, node: fx.Node) -> None:
        source = node.args[0]
        pads = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        rank = len(_shape(source) or ())
        if not isinstance(pads, (tuple, list)) or rank < 3:
            self.unknown_op(node)
            return
        spatial = 2 * (rank - 2)
        if len(pads) <= spatial:
            self.carry(node, source)
            return
        if len(pads) > spatial + 2 or mode != "constant" or source.name not in self.layout:
            self.unknown_op(node)
            return
        before, after = pads[spatial], pads[spatial + 1]
        atoms = self.layout[source.name]
        reason = "zero channels added by a pad"
        if before:
            atoms = (self.new_atom(before, reason=reason),) + atoms
        if after:
            atoms = atoms + (self.new_atom(after, reason=reason),)
        self.layout[node.name] = atoms

    def reshape(self, node: fx.Node, source: Any) -> None:
        shape, src = _shape(node), _shape(source)
        if src is None or shape is None:
            self.unknown_op(node)
            return
        same_channels = (
            len(shape) >= 2 and len(src) >= 2 and shape[0] == src[0] and shape[1] == src[1]
            and math.prod(shape[2:]) == math.prod(src[2:]) == 1
        )  # fmt: skip
        if same_channels:
            self.carry(node, source)
        elif len(src) >= 3 and len(shape) == 2 and shape[0] == src[0]:
            # Channel-major: each channel's H * W features stay together, so the layout
            # holds, counted in channels (checked where the value is read: check_spread).
            if source.name in self.layout and source.name not in self.spread:
                self.layout[node.name] = self.layout[source.name]
                self.spread[node.name] = math.prod(src[2:])
            else:
                self.fix(self.atoms_of(source), f"flattened at {_describe(node, self.modules)}")
                self.fresh(node, "flattened features")
        else:
            self.unknown_op(node)

    def reduce(self, node: fx.Node, source: Any) -> None:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        src = _shape(source)
        if src is not None and dims and all(d not in (0, 1, -len(src), 1 - len(src)) for d in dims):
            self.carry(node, source)
        else:
            self.unknown_op(node)

    def getitem(self, node: fx.Node) -> None:
        source, index = node.args
        if _shape(source) is None:  # an item of a tuple (chunk/split): fixed channels
            self.fresh(node, f"taken from {_describe(source, self.modules)}")
            return
        index = index if isinstance(index, tuple) else (index,)
        spatial_only = len(index) >= 2 and all(
            isinstance(i, slice) for i in index
        ) and index[1] == slice(None)  # fmt: skip
        if spatial_only or index == (slice(None),):
            self.carry(node, source)
        else:
            self.unknown_op(node)


def _bn_after(gm: fx.GraphModule, node: fx.Node, calls: Mapping[str, int]) -> Optional[fx.Node]:
    """The BatchNorm node that is the only user of conv or linear ``node``, if any."""
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    module = gm.get_submodule(users[0].target)
    if isinstance(module, _BATCHNORMS) and calls.get(users[0].target) == 1:
        return users[0]
    return None


def _addend(out: fx.Node) -> Optional[fx.Node]:
    """The other operand when ``out``'s only use is a residual addition."""
    users = list(out.users)
    if len(users) != 1:
        return None
    user = users[0]
    is_add = (user.op == "call_function" and _BINARY_FUNCTIONS.get(user.target) == "add"
              and user.target not in (operator.sub, operator.isub, torch.sub)) or (
        user.op == "call_method" and user.target in ("add", "add_"))  # fmt: skip
    if not is_add:
        return None
    others = [a for a in user.args if isinstance(a, fx.Node) and a is not out]
    if len(others) == 1 and _shape(others[0]) == _shape(out) and "alpha" not in user.kwargs:
        return others[0]
    return None


class _Tracer(fx.Tracer):
    """torch.fx's tracer with :class:`~chanprune.surgery.SampledConv2d` as a leaf: its
    forward checks the input's shape, which a symbolic trace cannot."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, SampledConv2d) or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(model: nn.Module, concrete_args: Optional[dict] = None) -> fx.GraphModule:
    """:func:`torch.fx.symbolic_trace`, with chanprune's channel samplers as leaves."""
    tracer = _Tracer()
    graph = tracer.trace(model, concrete_args=concrete_args)
    name = model.__class__.__name__ if isinstance(model, nn.Module) else model.__name__
    return fx.GraphModule(tracer.root, graph, name)


def trace_plan(
    model: nn.Module, input_shape: tuple[int, ...], *, concrete_args: Optional[dict] = None
) -> Plan:
    """Trace ``model`` and derive its channel groups.

    Parameters
    ----------
    model : nn.Module
        Any network that :func:`torch.fx.symbolic_trace` can trace (no data-dependent
        control flow). Not modified; the returned plan's graph shares its modules.
    input_shape : tuple of int
        One input without the batch dimension, e.g. ``(3, 32, 32)``.
    concrete_args : dict, optional
        Passed to :func:`torch.fx.symbolic_trace` (fixed values of optional arguments).

    Returns
    -------
    Plan

    Raises
    ------
    UnsupportedLayerError
        The model cannot be traced (the message names the reason, e.g. control flow that
        depends on the input's values), or it has no conv.
    ValueError
        The model does not accept an input of ``input_shape``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}.")
    input_shape = tuple(int(s) for s in input_shape)
    try:
        gm = symbolic_trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedLayerError(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(exc).__name__}: "
            f"{first}). chanprune plans from the traced graph: control flow that depends on "
            "the input's values, or Python calls on tensors, must be moved out of forward."
        ) from exc
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    example = torch.zeros((2,) + input_shape, dtype=dtype, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _ShapeRecorder(gm).run(example)
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"the model does not accept inputs of shape {input_shape}: {message}"
        ) from exc
    finally:
        model.train(was_training)

    analysis = _Analysis(gm)
    analysis.run()
    uf = analysis.uf
    n_atoms = len(analysis.atom_size)
    classes: dict[int, list[int]] = {}
    for atom in range(n_atoms):
        classes.setdefault(uf.find(atom), []).append(atom)

    # Consumers whose refit has no place for the intercept, or whose BN cannot be folded.
    consumers_raw = []
    for node, conv in analysis.consumers:
        bn = _bn_after(gm, node, analysis.calls)
        atoms = analysis.atoms_of(node.args[0])
        problem = None
        if analysis.calls.get(node.target, 0) > 1:
            problem = f"{node.target} is called more than once"
        elif bn is not None and not gm.get_submodule(bn.target).track_running_stats:
            problem = f"{bn.target} keeps no running statistics"
        if problem:
            analysis.fix(atoms, problem)
            continue
        consumers_raw.append((node, conv, bn, atoms))

    # Partitions from grouped convs: one count per class, else kept whole.
    parts_of: dict[int, int] = {}
    for atom, counts in analysis.partition.items():
        root = uf.find(atom)
        parts_of.setdefault(root, 1)
        for count in counts:
            parts_of[root] = math.lcm(parts_of[root], count)
    for root, parts in parts_of.items():
        size = analysis.atom_size[root]
        if size % parts:
            analysis.fix(classes[root], f"split by grouped convs into {parts} unequal parts")

    # Name each class after its first producer (or first atom).
    name_of: dict[int, str] = {}
    for root, atoms in classes.items():
        producers = [analysis.atom_producer[a] for a in atoms if analysis.atom_producer[a]]
        name_of[root] = producers[0] if producers else f"fixed:{root}"
    sizes = {root: analysis.atom_size[root] for root in classes}
    reasons: dict[int, list[str]] = {}
    for atom, why in analysis.fixed.items():
        reasons.setdefault(uf.find(atom), []).extend(why)
    unknown: dict[int, list[str]] = {}
    for atom, why in analysis.unknown.items():
        unknown.setdefault(uf.find(atom), []).extend(why)

    def group_layout(atoms) -> tuple:
        """Atoms as (group name or None, width) segments; fixed groups are None."""
        out: list = []
        for atom in atoms:
            root = uf.find(atom)
            name = None if reasons.get(root) else name_of[root]
            out.append((name, analysis.atom_size[atom]))
        return tuple(out)

    consumers = []
    consumer_of: dict[str, list[str]] = {}
    for node, conv, bn, atoms in consumers_raw:
        out = bn if bn is not None else node
        addend = _addend(out)
        layout = group_layout(atoms)
        stream = bool(atoms) and all(
            any(_RESIDUAL in why for why in reasons.get(uf.find(a), ())) for a in atoms
        )
        consumers.append(
            Consumer(
                name=node.target, node=node.name, layout=layout,
                bn=None if bn is None else bn.target,
                addend=None if addend is None else addend.name,
                groups=getattr(conv, "groups", 1), stream=stream,
                linear=isinstance(conv, nn.Linear),
                spread=analysis.spread.get(node.args[0].name, 1),
            )
        )  # fmt: skip
        for root in {uf.find(a) for a in atoms}:
            consumer_of.setdefault(root, []).append(node.target)

    carriers_of: dict[int, list] = {}
    for module_name, node_name in analysis.carriers:
        for root in dict.fromkeys(uf.find(atom) for atom in analysis.layout[node_name]):
            carriers_of.setdefault(root, []).append((module_name, node_name))

    groups: dict[str, ChannelGroup] = {}
    order = sorted(classes, key=lambda r: r)
    for root in order:
        producers = tuple(
            dict.fromkeys(analysis.atom_producer[a] for a in classes[root]
                          if analysis.atom_producer[a])
        )  # fmt: skip
        if not producers:
            continue  # inputs, linear outputs, pads: not a group anyone can prune
        why = tuple(dict.fromkeys(reasons.get(root, ())))
        if not why and not consumer_of.get(root):
            why = ("read by no layer that chanprune refits",)
        groups[name_of[root]] = ChannelGroup(
            name=name_of[root], size=sizes[root], producers=producers,
            carriers=tuple(carriers_of.get(root, ())),
            consumers=tuple(dict.fromkeys(consumer_of.get(root, ()))),
            parts=parts_of.get(root, 1), fixed=why,
        )  # fmt: skip

    costs = _costs(gm, analysis, uf, reasons, name_of)
    plan = Plan(
        graph=gm, input_shape=input_shape, model=model, groups=groups, consumers=consumers,
        costs=costs,
        unknown_ops={
            name_of[r]: sorted(set(v)) for r, v in unknown.items() if name_of[r] in groups
        },
        layouts={name: group_layout(atoms) for name, atoms in analysis.layout.items()},
        spread=dict(analysis.spread),
    )  # fmt: skip
    if plan.unknown_ops:
        listing = "; ".join(f"{g}: {', '.join(ops)}" for g, ops in plan.unknown_ops.items())
        warnings.warn(
            f"{len(plan.unknown_ops)} channel group(s) kept whole because ops the planner "
            f"does not know touch them: {listing}",
            PlanWarning,
            stacklevel=2,
        )
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        raise UnsupportedLayerError(f"{type(model).__name__} has no Conv2d: nothing to prune.")
    return plan


def _costs(gm, analysis: _Analysis, uf: _UnionFind, reasons, name_of) -> list[LayerCost]:
    """The MAC cost of every conv and linear layer of the trace, by group."""

    def split(atoms) -> tuple[tuple, int]:
        groups: list[str] = []
        fixed = 0
        for atom in atoms:
            root = uf.find(atom)
            if reasons.get(root):
                fixed += analysis.atom_size[atom]
            else:
                groups.append(name_of[root])
        return tuple(groups), fixed

    costs = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = analysis.modules[node.target]
        out_shape = _shape(node)
        if isinstance(module, nn.Conv2d) and out_shape is not None:
            kh, kw = module.kernel_size
            hw = math.prod(out_shape[2:])
            in_groups, in_fixed = split(analysis.atoms_of(node.args[0]))
            if isinstance(module, SampledConv2d):  # reads in_channels of its input
                in_groups, in_fixed = (), module.in_channels
            g = module.groups
            if g > 1 and g == module.in_channels == module.out_channels:  # depthwise
                costs.append(LayerCost(node.target, hw * kh * kw, in_groups, in_fixed, (), 1))
                continue
            out_groups, out_fixed = split(analysis.atoms_of(node))
            costs.append(
                LayerCost(node.target, hw * kh * kw / g, in_groups, in_fixed, out_groups,
                          out_fixed)
            )  # fmt: skip
        elif isinstance(module, nn.Linear) and out_shape is not None:
            if len(out_shape) == 2:  # a conv on its features (Analysis.linear)
                in_groups, in_fixed = split(analysis.atoms_of(node.args[0]))
                out_groups, out_fixed = split(analysis.atoms_of(node))
                spread = analysis.spread.get(node.args[0].name, 1)
                if not in_groups:  # fixed features, however laid out: counted as such
                    spread, in_fixed = 1, module.in_features
                costs.append(
                    LayerCost(node.target, spread, in_groups, in_fixed, out_groups, out_fixed)
                )
                continue
            rows = math.prod(out_shape[1:-1]) if len(out_shape) > 2 else 1
            costs.append(
                LayerCost(node.target, rows, (), module.in_features, (), module.out_features)
            )
    return costs


#: The suffix of a channel-sampler group's name, and of an explicit width keyed by the
#: input of a conv: ``"layer1.0.conv1:in"``.
INPUT_SUFFIX = ":in"


def with_channel_samplers(plan: Plan) -> Plan:
    """The plan with the input of every conv that reads a residual stream made a group.

    He et al. (2017, Sec. 4.2): the first conv of a residual branch reads the stream,
    which the shortcut needs whole, so its producers cannot lose channels; a channel
    sampler lets that conv alone read fewer of them. Every ordinary conv whose input is
    all stream (:attr:`Consumer.stream`) and whose output is not added back to it (not a
    projection shortcut) gets a group ``"<conv>:in"`` of its own (:attr:`ChannelGroup.sampler`),
    pruned like any other; the sweep then replaces the conv with a
    :class:`~chanprune.surgery.SampledConv2d`.

    Raises
    ------
    ValueError
        No conv of the network reads a residual stream.
    """
    readers = [c for c in plan.consumers if c.samplable]
    if not readers:
        raise ValueError(
            "channel_sampler=True selects the input channels of the convs that read a "
            "residual stream; no conv of this network reads one (it has no residual "
            "addition): use channel_sampler=False."
        )
    sampled: dict[str, ChannelGroup] = {}
    for c in readers:
        size = sum(width for _, width in c.layout)
        sampled[c.name] = ChannelGroup(
            name=c.name + INPUT_SUFFIX, size=size, producers=(), carriers=(),
            consumers=(c.name,), sampler=True,
        )  # fmt: skip
    layouts = {conv: ((g.name, g.size),) for conv, g in sampled.items()}
    groups: dict[str, ChannelGroup] = {}
    for name, group in plan.groups.items():
        for producer in group.producers:  # graph order: just before the reader's output
            if producer in sampled:
                extra = sampled.pop(producer)
                groups[extra.name] = extra
        groups[name] = group
    groups.update((g.name, g) for g in sampled.values())
    consumers = [
        dataclasses.replace(c, layout=layouts[c.name]) if c.name in layouts else c
        for c in plan.consumers
    ]
    costs = [
        dataclasses.replace(cost, in_groups=(cost.name + INPUT_SUFFIX,), in_fixed=0)
        if cost.name in layouts else cost
        for cost in plan.costs
    ]  # fmt: skip
    return dataclasses.replace(plan, groups=groups, consumers=consumers, costs=costs)


def keep_whole(plan: Plan, names, reason: str) -> Plan:
    """The plan with the groups ``names`` kept whole for ``reason``: they leave the
    consumers' layouts and the costs' groups as fixed channels, as if the trace had fixed
    them (unknown names are refused; groups already whole are left as they are)."""
    names = set(names)
    unknown = names - set(plan.groups)
    if unknown:
        raise ValueError(f"no channel groups {sorted(unknown)} in this plan.")
    names = {n for n in names if plan.groups[n].prunable}
    if not names:
        return plan

    def layout(segments: tuple) -> tuple:
        return tuple((None if g in names else g, width) for g, width in segments)

    def side(groups: tuple, fixed: int) -> tuple:
        whole = sum(plan.groups[g].size for g in groups if g in names)
        return tuple(g for g in groups if g not in names), fixed + whole

    groups = {
        name: dataclasses.replace(g, fixed=(reason,)) if name in names else g
        for name, g in plan.groups.items()
    }  # fmt: skip
    consumers = [dataclasses.replace(c, layout=layout(c.layout)) for c in plan.consumers]
    costs = []
    for cost in plan.costs:
        in_groups, in_fixed = side(cost.in_groups, cost.in_fixed)
        out_groups, out_fixed = side(cost.out_groups, cost.out_fixed)
        costs.append(dataclasses.replace(
            cost, in_groups=in_groups, in_fixed=in_fixed, out_groups=out_groups,
            out_fixed=out_fixed,
        ))  # fmt: skip
    layouts = {node: layout(segments) for node, segments in plan.layouts.items()}
    return dataclasses.replace(
        plan, groups=groups, consumers=consumers, costs=costs, layouts=layouts
    )


def group_of_key(plan: Plan, key: str) -> str:
    """The group an explicit width's key names: a group (its first producer's path), or
    ``"<conv>:in"``, the input of a conv that reads exactly one prunable group (or its
    channel-sampler group).

    Raises
    ------
    ValueError
        The key names neither (the message lists the groups), or a conv whose input is not
        one prunable group.
    """
    if key in plan.groups:
        return key
    if key.endswith(INPUT_SUFFIX):
        conv = key[: -len(INPUT_SUFFIX)]
        consumer = next((c for c in plan.consumers if c.name == conv), None)
        if consumer is not None:
            if consumer.stream and not consumer.in_groups:
                raise ValueError(
                    f"{key!r}: {conv} reads a residual stream, which the shortcut needs "
                    "whole, so its input channels can be pruned only through a channel "
                    "sampler: pass channel_sampler=True (CLI: --channel-sampler)."
                )
            names = set(consumer.in_groups)
            if len(names) == 1 and all(g is not None for g, _ in consumer.layout):
                return names.pop()
            raise ValueError(
                f"{key!r}: the input of {conv} is not one prunable channel group "
                f"({consumer.layout}); name the groups instead."
            )
    raise ValueError(
        f"{key!r} is not a channel group of this model, nor '<conv>:in' for a conv reading "
        f"one; groups: {', '.join(plan.prunable) or 'none prunable'}."
    )


# ---------------------------------------------------------------------------- widths
def _round_width(size: int, step: int, ratio: float) -> int:
    """``ratio * size`` rounded to a multiple of ``step``, within ``[step, size]``."""
    width = int(round(ratio * size / step)) * step
    return int(min(size, max(step, width)))


def _steps(plan: Plan, multiple: int) -> dict[str, int]:
    """The width step of each prunable group: one channel per part (grouped convs), or a
    multiple of ``multiple`` too where the group's size is one."""
    steps = {}
    for name, group in plan.groups.items():
        if group.prunable:
            step = math.lcm(group.step, multiple)
            steps[name] = step if group.size % step == 0 else group.step
    return steps


def uniform_widths(
    plan: Plan,
    speedup: float,
    *,
    multiple: int = 1,
    tolerance: float = 0.02,
    multipliers: Optional[Mapping[str, float]] = None,
) -> dict[str, int]:
    """One kept ratio for every prunable group, found by bisection so that the MACs of
    all convs and linears fall by ``speedup``; then single steps between groups close the
    rounding gap. A speed-up farther than ``tolerance`` from the target warns.

    ``multiple``: widths are multiples of it in every group whose size is one (8 lets
    ONNX Runtime and oneDNN use their channel-blocked convolution kernels); coarser
    steps make the target harder to hit exactly.

    ``multipliers``: relative kept ratios per group (group ``g`` keeps ``min(1, m_g r)``
    of its channels for the one ratio ``r``; 0 or absent: the group is not pruned), as
    :func:`paper_multipliers` gives them. None: 1 for every prunable group.

    Raises
    ------
    ValueError
        No prunable group, or a speed-up the prunable groups cannot reach (the message
        gives the largest reachable one).
    """
    speedup = check_real_in_range(speedup, "speedup", 1.0, low_inclusive=False)
    multiple = check_int_in_range(multiple, "multiple", 1)
    steps = _steps(plan, multiple)
    if multipliers is None:
        multipliers = dict.fromkeys(steps, 1.0)
    steps = {n: step for n, step in steps.items() if multipliers.get(n, 0.0) > 0}
    prunable = {n: plan.groups[n] for n in steps}
    _check_reachable(plan, speedup, steps)
    total = plan.macs()
    target = total / speedup

    def at(ratio: float) -> dict[str, int]:
        return {
            n: _round_width(g.size, steps[n], min(1.0, multipliers[n] * ratio))
            for n, g in prunable.items()
        }

    lo, hi = 0.0, 1.0 / min(multipliers[n] for n in steps)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if plan.macs(at(mid)) > target:
            hi = mid
        else:
            lo = mid
    widths = _close_gap(plan, at(lo), steps, target)
    _achieved(total / plan.macs(widths), speedup, tolerance)  # warns when too far
    return widths


# The paper's schedules (He, Zhang and Sun 2017, section 4). VGG-16: conv1_x to conv3_x
# and conv4_x keep ratios 1 : 1.5, conv5_x is not pruned. ResNets: blocks in the last
# stage or changing the shape keep 70%, the others 30% (7 : 3); inside a Bottleneck the
# inputs of its second and third conv keep 4 : 3, as multiples of their mean.
_PAPER_CHAIN = {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.5}
_PAPER_ROLE = {"basic": 1.0, "2a": 2.0 / 3.5, "2b": 4.0 / 3.5, "2c": 3.0 / 3.5}


def paper_multipliers(plan: Plan) -> dict[str, float]:
    """The paper's relative kept ratios for the prunable groups of a traced VGG-style
    chain or ResNet, derived from the graph (shapes and residual additions), not names.

    A network without residual additions is a chain: a group's stage is one plus the
    halvings of the input's spatial size before the conv that reads it. Otherwise every
    prunable group must sit inside a residual branch of one or two such groups (a
    BasicBlock or a Bottleneck), each produced by one conv and read by one conv, or feed
    the stream (read by several convs: left whole, as the paper does). A branch is
    sensitive when it is in the last stage (the smallest output) or its output's shape
    differs from its input's (a strided or projection block).

    Returns
    -------
    dict of group -> float
        For :func:`uniform_widths` (``multipliers=``); 0 for groups the schedule leaves
        whole.

    Raises
    ------
    ValueError
        A residual network whose prunable groups do not form Basic or Bottleneck
        branches (the schedule is not defined for it: use ``uniform``, ``energy`` or
        ``sensitivity``).
    """
    nodes = {n.name: n for n in plan.graph.graph.nodes}
    module_nodes: dict[str, fx.Node] = {}
    for node in plan.graph.graph.nodes:
        if node.op == "call_module":
            module_nodes.setdefault(str(node.target), node)
    consumers = {c.name: c for c in plan.consumers}
    # Channel-sampler groups take their branch's ratio (below), as its role "2a" or "basic".
    prunable = [g for g in plan.groups.values() if g.prunable and not g.sampler]
    # The paper prunes convs: a group a linear layer writes or reads stays whole.
    linear = {c.name for c in plan.consumers if c.linear}
    kept_whole = [
        g for g in prunable
        if linear.intersection(g.consumers) or isinstance(
            plan.graph.get_submodule(g.producers[0]), nn.Linear)
    ]  # fmt: skip
    prunable = [g for g in prunable if g not in kept_whole]
    size_in = plan.input_shape[1:]

    def spatial(node: fx.Node) -> tuple:
        return tuple((_shape(node) or ())[2:])

    def refuse(group: ChannelGroup, why: str) -> ValueError:
        return ValueError(
            f"schedule='paper' is defined for VGG-style chains and ResNets of Basic or "
            f"Bottleneck blocks; group {group.name!r} {why}. Use schedule='uniform', "
            "'energy' or 'sensitivity' for this network."
        )

    def reader(group: ChannelGroup) -> Consumer:
        if len(group.producers) != 1 or len(group.consumers) != 1 or group.parts != 1:
            raise refuse(group, "is not one conv's output read by one conv")
        if any(not isinstance(plan.graph.get_submodule(m), _BATCHNORMS)
               for m, _ in group.carriers):  # fmt: skip
            raise refuse(group, "passes through a layer other than BatchNorm")
        return consumers[group.consumers[0]]

    if not any(c.addend for c in plan.consumers):
        out = dict.fromkeys((g.name for g in kept_whole), 0.0)
        for g in prunable:
            # The stage of the conv reading the group (after any pooling in between).
            shape = spatial(nodes[reader(g).node].args[0])
            halvings = max(
                (round(math.log2(a / b)) for a, b in zip(size_in, shape) if b > 0), default=0
            )
            out[g.name] = _PAPER_CHAIN.get(1 + halvings, 0.0)
        return out

    # A group read by several convs (e.g. a stem's output read by a block's first conv
    # and its projection shortcut) feeds the residual stream: the paper keeps it whole.
    stream = [g for g in prunable if len(g.consumers) > 1]
    prunable = [g for g in prunable if len(g.consumers) == 1]
    # A branch: groups each read by the conv producing the next, the last one's reader
    # adding its output to the stream.
    produced_by = {g.producers[0]: g for g in prunable}
    follows = {}
    for g in prunable:
        if reader(g).addend is None:
            if reader(g).name not in produced_by:
                raise refuse(g, "is read by a conv that adds to no residual stream")
            follows[g.name] = produced_by[reader(g).name]
    second = {g.name for g in follows.values()}
    branches = []
    for g in prunable:
        if g.name in second:
            continue
        branch = [g]
        while branch[-1].name in follows:
            branch.append(follows[branch[-1].name])
        if len(branch) > 2:
            raise refuse(g, f"starts a branch of {len(branch)} pruned groups (at most 2)")
        branches.append(branch)

    def ends(branch: list) -> tuple:
        first = module_nodes[branch[0].producers[0]]
        last = nodes[reader(branch[-1]).node]
        return _shape(first.args[0]), _shape(last)

    smallest = min(math.prod(ends(b)[1][2:]) for b in branches)
    out = dict.fromkeys((g.name for g in stream + kept_whole), 0.0)
    for branch in branches:
        shape_in, shape_out = ends(branch)
        sensitive = shape_in != shape_out or math.prod(shape_out[2:]) == smallest
        base = 0.7 if sensitive else 0.3
        roles = ("basic",) if len(branch) == 1 else ("2b", "2c")
        for g, role in zip(branch, roles):
            out[g.name] = base * _PAPER_ROLE[role]
        sampler = plan.groups.get(branch[0].producers[0] + INPUT_SUFFIX)
        if sampler is not None:  # the input of the branch's first conv
            out[sampler.name] = base * _PAPER_ROLE["basic" if len(branch) == 1 else "2a"]
    for g in plan.groups.values():
        if g.sampler:
            out.setdefault(g.name, 0.0)
    return out


def _close_gap(
    plan: Plan, widths: dict, steps: Mapping[str, int], target: float,
    allowed: Optional[Mapping[str, np.ndarray]] = None,
) -> dict:  # fmt: skip
    """Move single steps while that brings the MACs closer to ``target``: add a step to
    the group that keeps the MACs under it, or take one from a group while above it.
    Each group moves once at most: repeated steps would walk the groups of the fewest
    MACs (a classifier's hidden layers) far from their planned width to trim a rounding
    gap. ``allowed``: per group, whether each width ``0..size`` may be taken (all by
    default)."""
    widths = dict(widths)
    total = plan.macs()
    moved: set = set()
    for _ in range(len(widths)):
        gap = plan.macs(widths) - target
        if abs(gap) <= 0.002 * total:
            break
        best = None
        for n, w in widths.items():
            if n in moved:
                continue
            w += steps[n] if gap < 0 else -steps[n]
            if not steps[n] <= w <= plan.groups[n].size:
                continue
            if allowed is not None and not allowed[n][w]:
                continue
            err = abs(plan.macs(dict(widths, **{n: w})) - target)
            if best is None or err < best[0]:
                best = (err, n, w)
        if best is None or best[0] >= abs(gap):
            break
        widths[best[1]] = best[2]
        moved.add(best[1])
    return widths


def _check_reachable(plan: Plan, speedup: float, steps: Mapping[str, int]) -> None:
    if not steps:
        raise ValueError(
            "the plan has no prunable channel group (every group is kept whole; see "
            "`chanprune info` or Plan.describe() for why)."
        )
    total = plan.macs()
    if plan.macs(dict(steps)) > total / speedup:
        raise ValueError(
            f"speedup={speedup:g} cannot be reached: with every prunable group at its "
            f"narrowest the speed-up is {total / plan.macs(dict(steps)):.3g}x (the groups kept "
            "whole carry the rest of the MACs)."
        )


def widths_for_cost(
    plan: Plan,
    speedup: float,
    cost: Mapping[str, np.ndarray],
    *,
    multiple: int = 1,
    tolerance: float = 0.02,
) -> dict[str, int]:
    """Widths that meet a MAC speed-up at the least predicted cost.

    Starting from the full network, the group whose next step down costs the least per
    MAC it saves gives it up, until the MACs fall by ``speedup``; single steps then close
    the rounding gap. Costs are added over groups (each measured with the group alone
    narrowed), so this is the greedy solution of a knapsack on separable costs.

    Parameters
    ----------
    plan : Plan
    speedup : float
        Target MAC speed-up (> 1), all convs and linears counted.
    cost : dict of group -> ndarray of shape (size + 1,)
        For every prunable group, the predicted cost of keeping ``k`` of its channels at
        index ``k``: non-increasing, 0 at ``size``, ``inf`` where unaffordable (e.g.
        :meth:`chanprune.sensitivity.SensitivityCurve.cost`, or ``-log`` of the kept
        energy).
    multiple, tolerance
        As in :func:`uniform_widths`.

    Returns
    -------
    dict of group -> int

    Raises
    ------
    ValueError
        A missing group or a cost of the wrong shape; an unreachable speed-up.
    """
    speedup = check_real_in_range(speedup, "speedup", 1.0, low_inclusive=False)
    multiple = check_int_in_range(multiple, "multiple", 1)
    steps = _steps(plan, multiple)
    _check_reachable(plan, speedup, steps)
    costs = {}
    for name in steps:
        size = plan.groups[name].size
        if name not in cost:
            raise ValueError(f"cost has no entry for the prunable group {name!r}.")
        values = np.asarray(cost[name], dtype=np.float64)
        if values.shape != (size + 1,) or np.isnan(values).any():
            raise ValueError(
                f"cost[{name!r}] must have shape ({size + 1},) (one value per width 0..size, "
                f"no NaN); got shape {values.shape}."
            )
        costs[name] = values
    full = {name: g.size for name, g in plan.groups.items()}
    touching = {name: [c for c in plan.costs if name in c.in_groups + c.out_groups]
                for name in steps}  # fmt: skip

    def saving(widths: dict, name: str, width: int) -> float:
        trial = dict(widths, **{name: width})
        return sum(c.macs(widths) - c.macs(trial) for c in touching[name])

    total = plan.macs()
    target = total / speedup
    widths = dict(full)
    macs = total
    while macs > target:  # stops early if every further step is ruled out (warned below)
        best = None
        for name, down in steps.items():
            width = widths[name]
            if width - down < down:
                continue
            saved = saving(widths, name, width - down)
            if saved <= 0:
                continue
            rate = (costs[name][width - down] - costs[name][width]) / saved
            if not np.isfinite(rate):  # a width its cost rules out
                continue
            if best is None or rate < best[0]:
                best = (rate, name, width - down, saved)
        if best is None:
            break
        widths[best[1]] = best[2]
        macs -= best[3]
    affordable = {name: np.isfinite(values) for name, values in costs.items()}
    widths = _close_gap(plan, {n: widths[n] for n in steps}, steps, target, affordable)
    _achieved(total / plan.macs(widths), speedup, tolerance)
    return widths


def explicit_widths(plan: Plan, keep: Mapping[str, Union[int, float]]) -> dict[str, int]:
    """Widths from ``{group: count or ratio}``: unknown or fixed groups are refused by
    name, values checked as :func:`chanprune.schedule.resolve_explicit` checks them, and
    in a group split by grouped convs a count must be a multiple of its step (a ratio is
    rounded to one)."""
    if isinstance(keep, Mapping):
        resolved: dict = {}
        for key, value in keep.items():
            name = group_of_key(plan, key)
            if name in resolved:
                raise ValueError(f"{key!r} names group {name!r}, which another key names too.")
            resolved[name] = value
        keep = resolved
        for name in keep:
            group = plan.groups[name]
            if not group.prunable:
                raise ValueError(f"group {name!r} is kept whole: {'; '.join(group.fixed)}.")
    counts = resolve_explicit(plan.prunable, keep)
    widths = {}
    for name, count in counts.items():
        group = plan.groups[name]
        if not isinstance(keep[name], numbers.Integral):
            count = _round_width(group.size, group.step, float(keep[name]))
        elif count % group.step:
            raise ValueError(
                f"keep[{name!r}] must be a multiple of {group.step} in "
                f"[{group.step}, {group.size}]; got {count}."
            )
        widths[name] = count
    return widths
