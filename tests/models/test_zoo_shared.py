"""The real checkpoints in ``../shared/models`` load strictly and run (skipped when absent)."""

from __future__ import annotations

import pytest
import torch

from chanprune.models import get_model, load_state_dict_file

pytestmark = pytest.mark.shared

CHECKPOINTS = [
    ("vgg16_bn_cifar10", "vgg16_bn_cifar10.pth"),
    ("resnet20_cifar10", "resnet20-12fca82f.th"),
    ("resnet56_cifar10", "resnet56-4bfd9763.th"),
]


@pytest.mark.parametrize("name, filename", CHECKPOINTS)
def test_shared_checkpoint_loads_and_runs(shared_models_dir, file_hash, name, filename):
    path = shared_models_dir / filename
    before = file_hash(path)
    model = get_model(name, weights=path).eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10)
    assert torch.isfinite(out).all()
    assert file_hash(path) == before


@pytest.mark.parametrize("name, filename", CHECKPOINTS)
def test_shared_state_dict_is_strict_and_float32(shared_models_dir, name, filename):
    sd = load_state_dict_file(shared_models_dir / filename)
    assert not any(k.startswith("module.") for k in sd)
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    model = get_model(name)
    # Exactly the model's keys, up to BatchNorm's num_batches_tracked (absent in akamaster's).
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert {k for k in sd if not k.endswith("num_batches_tracked")} == expected
    model.load_state_dict(sd, strict=True)


def test_shared_vgg_stores_half_precision(shared_models_dir):
    """The shared VGG stores large tensors as float16: the loader must have cast them."""
    raw = torch.load(
        shared_models_dir / "vgg16_bn_cifar10.pth", map_location="cpu", weights_only=True
    )
    assert raw["features.3.weight"].dtype == torch.float16
    sd = load_state_dict_file(shared_models_dir / "vgg16_bn_cifar10.pth")
    torch.testing.assert_close(sd["features.3.weight"], raw["features.3.weight"].float())
