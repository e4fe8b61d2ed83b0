"""Tests for chanprune.flops: MAC and parameter accounting, latency."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from chanprune.flops import (
    MacCount,
    conv_macs,
    conv_output_sizes,
    count_macs,
    count_params,
    measure_latency,
)

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _vgg16_features(device: str = "meta") -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, v, 3, padding=1, device=device), nn.ReLU(inplace=True)]
            c_in = v
    return nn.Sequential(*layers)


def _tiny(device: str = "cpu") -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, device=device),  # 8x8 -> 8x8
        nn.BatchNorm2d(4, device=device),
        nn.ReLU(),
        nn.MaxPool2d(2),  # -> 4x4
        nn.Conv2d(4, 6, 3, device=device),  # -> 2x2
        nn.Conv2d(6, 6, 1, groups=2, bias=False, device=device),  # -> 2x2
        nn.Flatten(),
        nn.Linear(24, 5, device=device),
    )


TINY_PER_LAYER = {
    "0": 8 * 8 * 4 * 3 * 3 * 3,  # 6912
    "4": 2 * 2 * 6 * 4 * 3 * 3,  # 864
    "5": 2 * 2 * 6 * 3 * 1 * 1,  # 72
}
TINY_LINEAR = 24 * 5


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_vgg16_224_macs_match_original_code():
    model = _vgg16_features("meta")
    assert count_macs(model, (3, 224, 224)) == 15_346_630_656
    result = count_macs(model, (3, 224, 224), per_layer=True)
    assert len(result.per_layer) == 13
    assert result.per_layer["0"] == 224 * 224 * 64 * 3 * 9
    assert _no_hooks(model)


def test_tiny_net_by_hand():
    model = _tiny()
    conv_total = sum(TINY_PER_LAYER.values())
    assert conv_total == 7848
    assert count_macs(model, (3, 8, 8)) == conv_total
    assert count_macs(model, [3, 8, 8], include_linear=True) == conv_total + TINY_LINEAR

    result = count_macs(model, (3, 8, 8), include_linear=True, per_layer=True)
    assert isinstance(result, MacCount)
    assert result.per_layer == {**TINY_PER_LAYER, "7": TINY_LINEAR}
    assert list(result.per_layer) == ["0", "4", "5", "7"]
    assert result.total == conv_total + TINY_LINEAR
    assert result.to_dict() == {"total": result.total, "per_layer": result.per_layer}
    with pytest.raises(AttributeError):
        result.total = 0  # frozen

    # a meta copy gives the same numbers, without computing anything
    assert count_macs(_tiny("meta"), (3, 8, 8), per_layer=True) == count_macs(
        model, (3, 8, 8), per_layer=True
    )


def test_count_macs_matches_conv_macs_over_output_sizes():
    model = _vgg16_features("meta")
    sizes = conv_output_sizes(model, (3, 32, 32))
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert list(sizes) == list(convs)
    analytic = sum(
        conv_macs(h, w, convs[n].out_channels, convs[n].in_channels, 3, 3)
        for n, (h, w) in sizes.items()
    )
    assert count_macs(model, (3, 32, 32)) == analytic
    assert sizes["0"] == (32, 32) and sizes["28"] == (2, 2)  # conv5_3 at 32x32 input


class _Reordered(nn.Module):
    """Defined a, b, c; runs b, then a twice, then the inner Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(2, 4, 1)
        self.c = nn.Sequential(nn.Conv2d(4, 1, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(self.a(self.b(x))))


def test_per_layer_is_in_execution_order_and_sums_repeated_calls():
    model = _Reordered()
    result = count_macs(model, (2, 5, 5), per_layer=True)
    assert list(result.per_layer) == ["b", "a", "c.0"]
    assert result.per_layer["b"] == conv_macs(5, 5, 4, 2, 1, 1)
    assert result.per_layer["a"] == 2 * conv_macs(5, 5, 4, 4, 3, 3)
    assert result.total == sum(result.per_layer.values())
    assert conv_output_sizes(model, (2, 5, 5)) == {"b": (5, 5), "a": (5, 5), "c.0": (5, 5)}


def test_hooks_removed_and_modes_restored_even_when_forward_raises():
    model = _tiny()
    model.train()
    model[1].eval()  # mixed modes must come back exactly
    modes = [m.training for m in model.modules()]

    count_macs(model, (3, 8, 8), include_linear=True, per_layer=True)
    assert _no_hooks(model)
    assert [m.training for m in model.modules()] == modes

    with pytest.raises(RuntimeError):
        count_macs(model, (5, 8, 8))  # wrong input channel count
    assert _no_hooks(model)
    assert [m.training for m in model.modules()] == modes
    with pytest.raises(RuntimeError):
        conv_output_sizes(model, (5, 8, 8))
    assert _no_hooks(model)
    assert [m.training for m in model.modules()] == modes


def test_count_macs_does_not_touch_bn_statistics():
    model = _tiny().train()
    before = model[1].running_mean.clone(), int(model[1].num_batches_tracked)
    count_macs(model, (3, 8, 8))
    assert torch.equal(model[1].running_mean, before[0])
    assert int(model[1].num_batches_tracked) == before[1]


def test_count_macs_float64_model():
    model = _tiny().double()
    assert count_macs(model, (3, 8, 8)) == 7848


def test_count_macs_validation():
    with pytest.raises(TypeError, match="nn.Module"):
        count_macs(lambda x: x, (3, 8, 8))
    with pytest.raises(TypeError, match="input_shape"):
        count_macs(_tiny(), 8)
    with pytest.raises(ValueError, match="input_shape"):
        count_macs(_tiny(), (3, 0, 8))


def test_conv_macs():
    assert conv_macs(7, 5, 8, 6, 3, 1) == 7 * 5 * 8 * 6 * 3
    assert conv_macs(7, 5, 8, 6, 3, 1, groups=2) == 7 * 5 * 8 * 3 * 3
    assert conv_macs(0, 5, 8, 6, 3, 1) == 0
    with pytest.raises(ValueError, match="multiples of groups"):
        conv_macs(7, 5, 8, 6, 3, 1, groups=4)
    with pytest.raises(ValueError, match="'c_in'"):
        conv_macs(7, 5, 8, -1, 3, 1)
    with pytest.raises(TypeError, match="'kh'"):
        conv_macs(7, 5, 8, 6, 3.0, 1)


def test_count_params():
    model = _tiny()
    expected = (4 * 27 + 4) + 8 + (6 * 36 + 6) + 6 * 3 + (24 * 5 + 5)
    assert count_params(model) == expected
    model[7].requires_grad_(False)
    assert count_params(model, trainable_only=True) == expected - 125
    shared = nn.Sequential(model[4], model[4])
    assert count_params(shared) == 6 * 36 + 6
    with pytest.raises(TypeError):
        count_params("model")


def test_measure_latency_returns_positive_finite_numbers():
    model = _tiny().train()
    threads = torch.get_num_threads()
    stats = measure_latency(model, (3, 8, 8), batch_size=2, n_warmup=1, n_repeat=3, num_threads=1)
    for key in ("median_ms", "mean_ms", "p90_ms", "min_ms"):
        assert math.isfinite(stats[key]) and stats[key] > 0, key
    assert stats["std_ms"] >= 0
    assert (stats["batch_size"], stats["n_repeat"], stats["device"]) == (2, 3, "cpu")
    assert stats["num_threads"] == 1
    assert torch.get_num_threads() == threads
    assert all(m.training for m in model.modules())
    assert _no_hooks(model)


def test_measure_latency_validation():
    model = _tiny()
    with pytest.raises(ValueError, match="n_repeat"):
        measure_latency(model, (3, 8, 8), n_repeat=0)
    with pytest.raises(TypeError, match="batch_size"):
        measure_latency(model, (3, 8, 8), batch_size=1.5)
    with pytest.raises(ValueError, match="device"):
        measure_latency(model, (3, 8, 8), device="not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            measure_latency(model, (3, 8, 8), device="cuda")


@pytest.mark.gpu  # skipped by conftest.py when no CUDA device is present
def test_measure_latency_cuda_moves_model_back():
    model = _tiny()
    stats = measure_latency(model, (3, 8, 8), device="cuda", n_warmup=1, n_repeat=3)
    assert stats["median_ms"] > 0 and stats["device"].startswith("cuda")
    assert next(model.parameters()).device.type == "cpu"
    assert count_macs(model.cuda(), (3, 8, 8)) == 7848
