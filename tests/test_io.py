"""Tests of chanprune.io: atomic save, strict load, clear errors."""

from __future__ import annotations

import errno
import json
import os
import sys

import pytest
import torch
from _graph_models import Dense, randomize
from threadpoolctl import threadpool_limits
from torch import nn

import chanprune.io as cio
from chanprune.data import load_digits_dataset
from chanprune.models import vgg_digits
from chanprune.prune import prune_model


@pytest.fixture(scope="module")
def pruned():
    """A vgg_digits pruned 1.5x on 60 digit images (untrained weights, seeded)."""
    torch.manual_seed(0)
    model = vgg_digits()
    images = load_digits_dataset("train").tensors[0][:60]
    with threadpool_limits(limits=1):  # tiny problem: extra BLAS threads only oversubscribe
        out, report = prune_model(model, images, speedup=1.5, progress=False)
    assert abs(report.speedup / 1.5 - 1) < 0.02
    return out


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    return load_digits_dataset("test").tensors[0][:16]


def _listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_round_trip_of_pruned_model_gives_identical_outputs(pruned, probe, tmp_path):
    path = tmp_path / "pruned.pt"
    cio.save(pruned, path)
    loaded = cio.load(path)
    assert type(loaded) is type(pruned)
    assert not loaded.training
    assert loaded.arch_config() == pruned.arch_config()
    assert loaded.arch_config()["cfg"] != vgg_digits().arch_config()["cfg"]  # really pruned
    with torch.no_grad():
        assert torch.equal(loaded(probe), pruned.eval()(probe))
    assert _listing(tmp_path) == ["pruned.pt"]  # no temporary file left


def test_file_is_plain_data_for_weights_only_load(pruned, tmp_path):
    path = tmp_path / "pruned.pt"
    cio.save(pruned, path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    assert set(obj) == {"arch_config", "state_dict"}
    json.dumps(obj["arch_config"])  # JSON-serialisable description, no code
    state = pruned.state_dict()
    assert obj["state_dict"].keys() == state.keys()
    for key, value in obj["state_dict"].items():
        assert value.device.type == "cpu"
        assert torch.equal(value, state[key].cpu())


def test_save_does_not_modify_model(pruned, tmp_path):
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    cio.save(pruned, tmp_path / "m.pt")
    after = pruned.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_saved_file_has_ordinary_permissions(pruned, tmp_path):
    path = tmp_path / "m.pt"
    cio.save(pruned, path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_without_arch_config_stores_shapes(tmp_path):
    foreign = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    cio.save(foreign, tmp_path / "x.pt")
    assert _listing(tmp_path) == ["x.pt"]
    assert "module_shapes" in torch.load(tmp_path / "x.pt", weights_only=True)
    with pytest.raises(TypeError, match="nn.Module"):
        cio.save("not a model", tmp_path / "y.pt")
    assert _listing(tmp_path) == ["x.pt"]


def test_a_zoo_model_narrowed_beyond_its_config_saves_its_shapes_too(tmp_path):
    """A chanprune architecture whose config misses a narrowed layer (simulated: the stem
    width left out of its config) is saved with its layers' shapes, and loads the same."""
    from chanprune.models import ResNet

    torch.manual_seed(0)
    model = ResNet("bottleneck", [1, 1, 1, 1], num_classes=5, stem_width=24).eval()
    config = {k: v for k, v in model.arch_config().items() if k != "stem_width"}
    model.arch_config = lambda: config  # as if the architecture had no stem width
    cio.save(model, tmp_path / "m.pt")
    saved = torch.load(tmp_path / "m.pt", weights_only=True)
    assert saved["module_shapes"]["conv1"]["out_channels"] == 24
    loaded = cio.load(tmp_path / "m.pt")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_save_to_a_directory_fails_cleanly(pruned, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(IsADirectoryError, match="directory"):
        cio.save(pruned, target)
    assert _listing(tmp_path) == ["out"]
    assert _listing(target) == []


def test_save_into_missing_folder_fails_cleanly(pruned, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cio.save(pruned, tmp_path / "missing" / "m.pt")
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("partial", [False, True], ids=["fails-at-once", "fails-midway"])
def test_failing_save_leaves_no_trace_and_keeps_old_file(pruned, tmp_path, monkeypatch, partial):
    path = tmp_path / "m.pt"
    cio.save(vgg_digits(), path)
    old = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        if partial:
            f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        cio.save(pruned, path)
    assert _listing(tmp_path) == ["m.pt"]
    assert path.read_bytes() == old
    monkeypatch.undo()
    assert cio.load(path).arch_config() == vgg_digits().arch_config()


def test_failing_save_of_new_file_creates_nothing(pruned, tmp_path, monkeypatch):
    def broken_save(obj, f, *args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="no space"):
        cio.save(pruned, tmp_path / "m.pt")
    assert _listing(tmp_path) == []


def test_load_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        cio.load(path)


def test_load_corrupt_file_names_path(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"\x80\x02 this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match="corrupt.pt"):
        cio.load(path)


def test_load_truncated_file_names_path(pruned, tmp_path):
    path = tmp_path / "trunc.pt"
    cio.save(pruned, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="trunc.pt"):
        cio.load(path)


def test_load_bare_state_dict_says_what_to_do(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save(vgg_digits().state_dict(), path)
    with pytest.raises(ValueError, match=r"bare.pt.*get_model"):
        cio.load(path)


@pytest.mark.parametrize(
    "arch_config",
    [{"arch": "alexnet"}, "vgg", {"arch": "vgg", "cfg": [8, "M", 16], "colour": "blue"}],
    ids=["unknown-arch", "not-a-dict", "unknown-key"],
)
def test_load_invalid_arch_config_names_path(tmp_path, arch_config):
    path = tmp_path / "bad.pt"
    torch.save({"arch_config": arch_config, "state_dict": vgg_digits().state_dict()}, path)
    with pytest.raises(ValueError, match="bad.pt"):
        cio.load(path)


def test_load_weights_not_matching_config_names_path(tmp_path):
    path = tmp_path / "mismatch.pt"
    config = vgg_digits(widths=[8, 16, 32, 32, 64, 64]).arch_config()
    torch.save({"arch_config": config, "state_dict": vgg_digits().state_dict()}, path)
    with pytest.raises(ValueError, match="mismatch.pt"):
        cio.load(path)


def test_load_rejects_non_path():
    with pytest.raises(TypeError, match="path"):
        cio.load(123)


def test_atomic_write_all_writes_nothing_when_one_output_fails(tmp_path):
    first = tmp_path / "a.txt"
    first.write_text("old")

    def fail(tmp):
        tmp.write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cio.atomic_write_all([(first, lambda tmp: tmp.write_text("new")), (tmp_path / "b", fail)])
    assert _listing(tmp_path) == ["a.txt"]
    assert first.read_text() == "old"

    cio.atomic_write_all([(first, lambda tmp: tmp.write_text("new"))])
    assert first.read_text() == "new"
    with pytest.raises(ValueError, match="same file"):
        cio.atomic_write_all([(first, str), (tmp_path / "." / "a.txt", str)])


def _enospc(*args, **kwargs):
    """What torch.save does on a full disk: a RuntimeError raised while handling the OSError."""
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")  # noqa: B904


def test_full_disk_during_save_is_an_os_error_naming_the_destination(pruned, tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    path.write_bytes(b"previous")
    monkeypatch.setattr(torch, "save", _enospc)
    with pytest.raises(OSError) as info:
        cio.save(pruned, path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert str(info.value) == f"[Errno {errno.ENOSPC}] No space left on device: '{path}'"
    assert _listing(tmp_path) == ["m.pt"] and path.read_bytes() == b"previous"


@pytest.mark.parametrize(
    "error,kind",
    [
        (OSError(errno.ENOSPC, "No space left on device"), OSError),
        (PermissionError(errno.EACCES, "Permission denied"), PermissionError),
    ],
)
def test_write_errors_name_the_destination_not_the_temporary_file(tmp_path, error, kind):
    def fail(tmp):
        tmp.write_text("partial")
        error.filename = str(tmp)
        raise error

    path = tmp_path / "out.json"
    with pytest.raises(kind) as info:
        cio.atomic_write(path, fail)
    assert info.value.errno == error.errno and info.value.filename == str(path)
    assert ".tmp" not in str(info.value)
    assert _listing(tmp_path) == []
    with pytest.raises(OSError, match=r"could not write '.*out.json': quota exceeded"):
        cio.atomic_write(path, lambda tmp: (_ for _ in ()).throw(OSError("quota exceeded")))


def test_load_pickled_objects_says_so_without_terminal_escapes(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(nn.Linear(2, 2), path)  # a whole model, pickled: refused by weights_only
    with pytest.raises(ValueError) as info:
        cio.load(path)
    message = str(info.value)
    assert "whole.pt" in message and "holds pickled Python objects" in message
    assert "torch.nn.modules.linear.Linear" in message
    assert "\x1b" not in message and "\n" not in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch without CUDA")
def test_load_to_cuda_without_cuda_is_a_value_error(pruned, tmp_path):
    cio.save(pruned, tmp_path / "m.pt")
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=rf"map_location.*'{device}'.*not available"):
            cio.load(tmp_path / "m.pt", map_location=device)
    assert cio.load(tmp_path / "m.pt", map_location="meta").features[0].weight.is_meta


class _ForeignVGG(nn.Module):
    """A VGG built outside chanprune (as torchvision does): same layout, no arch_config."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2), nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12),
            nn.ReLU(inplace=True),
        )  # fmt: skip
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(
            nn.Linear(12, 16), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(16, 4)
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def test_foreign_vgg_is_pruned_saved_and_loaded(tmp_path):
    from chanprune import prune_model

    torch.manual_seed(0)
    model = _ForeignVGG().eval()
    images = torch.randn(30, 3, 16, 16)
    pruned, report = prune_model(model, images, speedup=1.33, progress=False)
    assert isinstance(pruned, _ForeignVGG) and abs(report.speedup / 1.33 - 1) <= 0.02
    path = tmp_path / "foreign.pt"
    cio.save(pruned, path)
    loaded = cio.load(path)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), pruned(x))


def test_any_pruned_model_saves_as_shapes_and_loads_into_a_fresh_instance(tmp_path):
    model = randomize(Dense())
    images = torch.randn(16, 3, 16, 16)
    pruned, _ = prune_model(model, images, speedup=1.5, progress=False)
    path = tmp_path / "dense.pt"
    cio.save(pruned, path)
    assert set(torch.load(path, weights_only=True)) == {
        "module_shapes", "model_class", "state_dict"
    }  # fmt: skip
    with pytest.raises(ValueError, match="pass it, load"):
        cio.load(path)
    loaded = cio.load(path, model=Dense())
    assert not loaded.training
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), pruned(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="saved from another class"):
        cio.load(path, model=nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="without model="):
        other = tmp_path / "digits.pt"
        cio.save(vgg_digits(), other)
        cio.load(other, model=Dense())
