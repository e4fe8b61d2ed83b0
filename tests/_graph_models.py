"""Small networks written the way other people write them, and an independent check of a
graph-planned prune: the equivalent masked original."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chanprune.surgery import SampledConv2d


def conv_bn(c_in, c_out, k=3, stride=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    )


class Chain(nn.Module):
    """A VGG-like chain in a ModuleDict, functional ReLU, flatten into a linear head."""

    def __init__(self):
        super().__init__()
        self.body = nn.ModuleDict(
            {"a": conv_bn(3, 32), "b": conv_bn(32, 48), "c": conv_bn(48, 32)}
        )
        self.head = nn.Linear(32 * 8 * 8, 10)

    def forward(self, x):
        x = F.relu(self.body["a"](x))
        x = F.max_pool2d(F.relu(self.body["b"](x)), 2)
        x = F.relu(self.body["c"](x))
        return self.head(torch.flatten(x, 1))


class Block(nn.Module):
    """A basic residual block with an F.pad option-A shortcut when the shape changes."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.one = conv_bn(c_in, c_out, 3, stride)
        self.two = conv_bn(c_out, c_out)
        self.pad = (c_out - c_in) // 2
        self.stride = stride

    def forward(self, x):
        out = self.two(F.relu(self.one(x)))
        short = x
        if self.stride != 1 or self.pad:
            short = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + short)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.stages = nn.Sequential(Block(8, 8, 1), Block(8, 16, 2), Block(16, 16, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stages(F.relu(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Inverted(nn.Module):
    """MobileNetV2-like: expand, depthwise, squeeze-excitation, project, residual."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.expand = conv_bn(8, 32, 1)
        self.dw = conv_bn(32, 32, 3, groups=32)
        self.se_reduce = nn.Conv2d(32, 8, 1)
        self.se_expand = nn.Conv2d(8, 32, 1)
        self.project = conv_bn(32, 8, 1)
        self.head = nn.Conv2d(8, 10, 1)

    def forward(self, x):
        x = F.relu6(self.stem(x))
        y = F.relu6(self.dw(F.relu6(self.expand(x))))
        gate = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        y = self.project(y * gate)
        return self.head(x + y).mean((2, 3))


class Dense(nn.Module):
    """DenseNet-like: pre-activation convs without bias read concatenations."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.conv1 = nn.Conv2d(24, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(40)
        self.conv2 = nn.Conv2d(40, 16, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(56)
        self.trans = nn.Conv2d(56, 16, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x0 = self.stem(x)
        y1 = self.conv1(F.relu(self.bn1(x0)))
        x1 = torch.cat([x0, y1], 1)
        y2 = self.conv2(F.relu(self.bn2(x1)))
        x2 = torch.cat([x1, y2], 1)
        out = F.relu(self.bn4(self.trans(F.relu(self.bn3(x2)))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class Grouped(nn.Module):
    """A ResNeXt-like branch: 1x1, grouped 3x3 (4 groups), 1x1."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.reduce = conv_bn(16, 32, 1)
        self.grouped = conv_bn(32, 32, 3, groups=4)
        self.restore = conv_bn(32, 24, 1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.grouped(F.relu(self.reduce(x))))
        x = F.relu(self.restore(x))
        return self.fc(x.mean((2, 3)))


class Shuffle(nn.Module):
    """A channel shuffle (view-transpose-view): an op the planner does not know."""

    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 16)
        self.b = conv_bn(16, 16)
        self.c = conv_bn(16, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.a(x))
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        x = F.relu(self.c(F.relu(self.b(x))))
        return self.fc(x.mean((2, 3)))


class PooledHead(nn.Module):
    """A chain into a pooled two-layer classifier with a BatchNorm1d: the linear layers
    read and write channel groups as 1x1 convs do."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, 32), nn.ReLU(), conv_bn(32, 48), nn.ReLU())
        self.fc1 = nn.Linear(48, 64)
        self.bn = nn.BatchNorm1d(64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)
        return self.fc2(F.dropout(F.relu(self.bn(self.fc1(x))), training=self.training))


class ViewHead(nn.Module):
    """Maps flattened by ``x.view`` (16 positions per channel) into a hidden linear layer:
    the maps' channels and the hidden layer's outputs are both groups."""

    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 16)
        self.b = conv_bn(16, 16)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.a(x)), 2)
        x = F.max_pool2d(F.relu(self.b(x)), 2)
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # control flow on values: not traceable
            return self.a(x)
        return -self.a(x)


class PreActBlock(nn.Module):
    """Pre-activation: bn1 before conv1, so ``bn2`` is *not* conv2's BatchNorm."""

    def __init__(self, c):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + x


class PreActResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.layer1 = nn.Sequential(PreActBlock(16), PreActBlock(16))
        self.linear = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer1(self.conv1(x))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def unit_activations(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Rescale each conv and linear layer, in order, so its output on ``images`` has unit
    spread (a data-dependent init): a random VGG's logits are otherwise near-constant,
    on which every output divergence is ~0 and every gradient badly scaled."""
    model.eval()
    for layer in [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]:
        seen: list = []
        handle = layer.register_forward_hook(lambda m, a, out, seen=seen: seen.append(out))
        with torch.no_grad():
            model(images)
            handle.remove()
            spread = seen[0].std().clamp(min=1e-12)
            layer.weight.div_(spread)
            if layer.bias is not None:
                layer.bias.div_(spread)
    return model


# ---------------------------------------------------------------------------- checks
def _positions(layout, kept):
    """Kept positions of a value of ``layout`` (segments (group or None, width))."""
    out, offset = [], 0
    for group, width in layout:
        out.append(offset + (np.asarray(kept[group]) if group in kept else np.arange(width)))
        offset += width
    return torch.from_numpy(np.concatenate(out).astype(np.int64))


def masked_equivalent(original: nn.Module, pruned: nn.Module, plan, kept) -> nn.Module:
    """The original architecture with the pruned weights scattered back: dropped input
    channels of every conv get zero weights, the kept entries get the pruned values.

    ``plan`` is the :class:`chanprune.graph.Plan` of ``original``, ``kept`` the report's
    ``options["kept"]``. Built from the plan's layouts alone, not from the driver's
    surgery, so it checks that surgery."""
    masked = copy.deepcopy(original)
    gm = plan.graph
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = masked.get_submodule(node.target)
        src = pruned.get_submodule(node.target)
        out_layout = plan.layouts.get(node.name)
        if isinstance(mod, nn.Conv2d):
            in_layout = plan.layouts[node.args[0].name]
            in_pos, out_pos = _positions(in_layout, kept), _positions(out_layout, kept)
            if isinstance(src, SampledConv2d):  # reads only in_index of its input
                in_pos = in_pos[src.in_index]
            g = mod.groups
            w = torch.zeros_like(mod.weight)
            if g == 1:
                w[out_pos[:, None], in_pos[None, :]] = src.weight.detach()
            elif g == mod.in_channels == mod.out_channels:  # depthwise: kept channels
                w = mod.weight.detach().clone()
                w[out_pos] = src.weight.detach()
            else:
                c_g, n_g = mod.in_channels // g, mod.out_channels // g
                for row, o in enumerate(out_pos.tolist()):
                    j = o // n_g
                    local = in_pos[(in_pos >= j * c_g) & (in_pos < (j + 1) * c_g)] - j * c_g
                    w[o, local] = src.weight.detach()[row]
            mod.weight.data.copy_(w)
            if mod.bias is not None or src.bias is not None:
                bias = mod.bias.detach().clone() if mod.bias is not None else None
                if bias is None:
                    mod.bias = nn.Parameter(torch.zeros(mod.out_channels))
                    bias = mod.bias.detach().clone()
                bias[out_pos] = src.bias.detach()
                mod.bias.data.copy_(bias)
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            pos = _positions(out_layout, kept)
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(mod, name).data[pos] = getattr(src, name).detach()
        elif isinstance(mod, nn.Linear):  # on (N, features): a conv on them
            in_pos = _positions(plan.layouts[node.args[0].name], kept)
            spread = plan.spread.get(node.args[0].name, 1)  # features per channel
            in_pos = (in_pos[:, None] * spread + torch.arange(spread)).reshape(-1)
            out_pos = _positions(out_layout, kept)
            w = torch.zeros_like(mod.weight)
            w[out_pos[:, None], in_pos[None, :]] = src.weight.detach()
            mod.weight.data.copy_(w)
            if mod.bias is not None:
                bias = mod.bias.detach().clone()
                bias[out_pos] = src.bias.detach()
                mod.bias.data.copy_(bias)
    return masked.eval()
