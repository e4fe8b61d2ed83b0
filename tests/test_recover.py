import copy

import pytest
import torch
import torch.nn.functional as F
from _graph_models import randomize, unit_activations

import chanprune
from chanprune.models.vgg import VGG
from chanprune.recover import augment, distill, distillation_loss

QUIET = dict(progress=False)


def _tiny_vgg(seed: int = 0) -> VGG:
    torch.manual_seed(seed)
    model = VGG([12, 12, "M", 16, 16, "M", 24], num_classes=5, pool_size=1, hidden_features=16)
    return unit_activations(randomize(model), _images(32, seed=9))


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _mean_loss(student, teacher, images) -> float:
    with torch.no_grad():
        return float(distillation_loss(student.eval()(images), teacher.eval()(images)))


def test_distillation_lowers_the_loss_and_never_touches_the_teacher():
    teacher = _tiny_vgg()
    # A student with much to learn: the first channels kept, no refit.
    student, _ = chanprune.prune_model(
        teacher, _images(64), speedup=2.0, method="first_k", refit=False, **QUIET
    )
    before_teacher = copy.deepcopy(teacher.state_dict())
    before_student = copy.deepcopy(student.state_dict())
    train, held = _images(96, seed=2), _images(32, seed=3)
    out, records = distill(
        student, teacher, train, epochs=4, lr=0.01, batch_size=16, heldout=held, **QUIET
    )
    assert [r.epoch for r in records] == [0, 1, 2, 3, 4]
    assert records[-1].heldout_divergence < records[0].heldout_divergence
    assert _mean_loss(out, teacher, train) < _mean_loss(student, teacher, train)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before_teacher[key]), key
    for key, value in student.state_dict().items():  # a copy was trained
        assert torch.equal(value, before_student[key]), key
    assert not teacher.training and not out.training


def test_distillation_is_reproducible_and_stops_on_time():
    teacher = _tiny_vgg()
    student = _tiny_vgg(seed=5)
    a, _ = distill(student, teacher, _images(40), epochs=1, batch_size=8, seed=3, **QUIET)
    b, _ = distill(student, teacher, _images(40), epochs=1, batch_size=8, seed=3, **QUIET)
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), key
    _, records = distill(student, teacher, _images(40), epochs=50, max_time_s=1e-9, **QUIET)
    assert len(records) == 2  # stopped after the first batch of the first epoch


def test_augment_flips_and_shifts_each_image():
    images = torch.randn(6, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    out = augment(images, torch.Generator().manual_seed(1))
    again = augment(images, torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and out.shape == images.shape
    padded = F.pad(images, (2, 2, 2, 2))
    for i in range(images.shape[0]):
        candidates = [
            source[i, :, dy : dy + 16, dx : dx + 16]
            for source in (padded, padded.flip(3))
            for dy in range(5)
            for dx in range(5)
        ]
        assert any(torch.equal(out[i], c) for c in candidates)


def test_prune_model_with_recovery_reports_each_epoch():
    model = _tiny_vgg()
    state = copy.deepcopy(model.state_dict())
    _, plain = chanprune.prune_model(model, _images(80), speedup=2.0, **QUIET)
    pruned, report = chanprune.prune_model(
        model, _images(80), speedup=2.0, recover="distill", recover_epochs=2, **QUIET
    )
    assert plain.recovery == [] and [r["epoch"] for r in report.recovery] == [0, 1, 2]
    assert report.options["recover"] == "distill" and report.speedup == plain.speedup
    assert report.recovery[0]["heldout_divergence"] > 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert "distillation epoch" in report.to_markdown()


def test_bad_recovery_parameters():
    model, images = _tiny_vgg(), _images(16)
    with pytest.raises(ValueError, match="recover"):
        chanprune.prune_model(model, images, speedup=2.0, recover="finetune", **QUIET)
    with pytest.raises(ValueError, match="recover_epochs"):
        chanprune.prune_model(model, images, speedup=2.0, recover="distill", recover_epochs=0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        distill(model, model, torch.full((4, 3, 16, 16), float("nan")), **QUIET)
    with pytest.raises(ValueError, match="lr"):
        distill(model, model, images, lr=0.0, **QUIET)
