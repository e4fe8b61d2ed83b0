"""The graph planner on third-party model definitions (pytorchcv 0.0.74, random weights).

Each network, as its author wrote it, is pruned to 2x fewer MACs (all convs and linears,
counted by hooks here) and must keep its output shape and equal its masked equivalent: the
original with the dropped channels' weights zeroed and the refit weights installed.
pytorchcv is installed with ``pip install --no-deps pytorchcv==0.0.74`` (its metadata
asks for torchvision, which the models imported here do not use); without it these tests
skip.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import pytest
import torch
from _graph_models import masked_equivalent, randomize
from _planted import conv_macs_by_hooks, load_script

import chanprune
from chanprune.graph import PlanWarning, trace_plan

pytest.importorskip("pytorchcv")

# (module, builder, input size), the networks benchmarks/zoo.py measures: ImageNet
# definitions end in a 7x7 pooling, so 224.
ZOO = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "zoo.py").ZOO


def _build(module: str, name: str) -> torch.nn.Module:
    builder = getattr(importlib.import_module(f"pytorchcv.models.{module}"), name)
    torch.manual_seed(0)
    return randomize(builder())


@pytest.mark.slow
@pytest.mark.parametrize("module,name,size", ZOO, ids=[z[1] for z in ZOO])
def test_zoo_model_prunes_to_2x_and_equals_its_masked_original(module, name, size):
    model = _build(module, name)
    shape = (3, size, size)
    images = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlanWarning)  # ShuffleNet's channel shuffle
        plan = trace_plan(model, shape)
        pruned, report = chanprune.prune_model(
            model, images, speedup=2.0, progress=False, positions_per_image=10, holdout=0.0,
            schedule="uniform", method="lasso",  # coverage and exactness, as fast as it gets
        )  # fmt: skip
    assert report.options["planner"] == "graph"
    macs_before = conv_macs_by_hooks(model, shape, include_linear=True)
    macs_after = conv_macs_by_hooks(pruned, shape, include_linear=True)
    assert report.macs_before == macs_before and report.macs_after == macs_after
    assert abs(macs_before / macs_after / 2.0 - 1) <= 0.02
    masked = masked_equivalent(model, pruned, plan, report.options["kept"])
    with torch.no_grad():
        out, ref = pruned(images[:2]), masked(images[:2])
        assert out.shape == model(images[:2]).shape
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.slow
@pytest.mark.parametrize("module,name", [("mobilenetv3", "mobilenetv3_large_w1")])
def test_sensitivity_schedule_on_a_zoo_model(module, name):
    model = _build(module, name)
    images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlanWarning)
        pruned, report = chanprune.prune_model(
            model, images, speedup=2.0, progress=False, positions_per_image=10, holdout=0.0
        )
    assert report.schedule == "sensitivity"
    assert "neither a VGG-style chain nor a ResNet" in report.options["schedule_reason"]
    assert abs(report.speedup / 2.0 - 1) <= 0.02
    plan = trace_plan(model, (3, 224, 224))
    for group, width in report.options["widths"].items():  # never below the narrowest
        size, step = plan.groups[group].size, plan.groups[group].step  # width measured
        assert width >= min(size, max(step, round(0.125 * size / step) * step))


@pytest.mark.parametrize(
    "module,name,size,ours",
    [("resnet_cifar", "resnet56_cifar10", 32, "resnet56_cifar10"),
     ("vgg", "bn_vgg16", 224, "vgg16_bn"), ("resnet", "resnet18", 224, "resnet18")],
)  # fmt: skip
def test_paper_schedule_on_a_zoo_model_equals_ours(module, name, size, ours):
    """The same architecture written by someone else (nested blocks, other names) gets
    the multipliers of chanprune's own definition, in graph order."""
    from chanprune.graph import paper_multipliers

    shape = (3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlanWarning)
        theirs = paper_multipliers(trace_plan(_build(module, name), shape))
        mine = paper_multipliers(trace_plan(getattr(chanprune.models, ours)(), shape))
    assert list(theirs.values()) == pytest.approx(list(mine.values()))
    assert sum(v > 0 for v in mine.values()) >= 8
