"""The shared checkpoints score their documented accuracy through chanprune's own loaders."""

from __future__ import annotations

import pytest

from chanprune.data import ImageFolder, evaluate_accuracy
from chanprune.models import get_model

# ../shared/README.md: accuracy on data/cifar10-jpeg/test with the documented preprocessing.
DOCUMENTED = [
    ("resnet20_cifar10", "resnet20-12fca82f.th", 0.8103),
    ("resnet56_cifar10", "resnet56-4bfd9763.th", 0.8320),
]


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("name, checkpoint, accuracy", DOCUMENTED)
def test_resnet_checkpoints_score_documented_accuracy(shared_dir, name, checkpoint, accuracy):
    model = get_model(name, weights=shared_dir / "models" / checkpoint)
    test = ImageFolder(shared_dir / "data" / "cifar10-jpeg" / "test", preprocess="cifar")
    assert len(test) == 10_000
    measured = evaluate_accuracy(model, test, batch_size=500, progress=False)
    # Documented to 4 decimals: one image is 1e-4.
    assert measured == pytest.approx(accuracy, abs=1.5e-4)
