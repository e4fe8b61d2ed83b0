"""Checkpoint reading, normalisation, strict loading and save/load of pruned models."""

from __future__ import annotations

import re
from collections import OrderedDict

import pytest
import torch

from chanprune.models import (
    get_model,
    load_model,
    load_state_dict_file,
    load_weights,
    normalize_state_dict,
    resnet20_cifar10,
    save_model,
    vgg_digits,
)


@pytest.fixture
def digits_state():
    return vgg_digits().state_dict()


def test_plain_state_dict_round_trip(tmp_path, file_hash):
    model = vgg_digits().eval()
    path = tmp_path / "digits.pth"
    torch.save(model.state_dict(), path)
    before = file_hash(path)
    other = get_model("vgg_digits", weights=path).eval()
    assert file_hash(path) == before
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


def test_wrapped_prefixed_half_precision(tmp_path, file_hash, digits_state):
    """akamaster layout ({'state_dict', 'best_prec1'}, 'module.' keys) and float16 tensors."""
    wrapped = {
        "state_dict": OrderedDict(
            (f"module.{k}", v.half() if v.is_floating_point() else v)
            for k, v in digits_state.items()
        ),
        "best_prec1": 91.0,
    }
    path = tmp_path / "wrapped.th"
    torch.save(wrapped, path)
    before = file_hash(path)
    sd = load_state_dict_file(path)
    assert file_hash(path) == before
    assert list(sd) == list(digits_state)
    for k, v in sd.items():
        if v.is_floating_point():
            assert v.dtype == torch.float32, k
            torch.testing.assert_close(v, digits_state[k].half().float())
        else:
            assert v.dtype == digits_state[k].dtype, k
    model = get_model("vgg_digits", weights=path)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_float64_cast_to_float32(tmp_path, digits_state):
    path = tmp_path / "double.pth"
    torch.save(
        {k: v.double() if v.is_floating_point() else v for k, v in digits_state.items()}, path
    )
    sd = load_state_dict_file(path)
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())


def test_missing_num_batches_tracked_is_accepted(digits_state):
    """Checkpoints from old PyTorch (akamaster, torchvision's VGG) lack these buffers."""
    sd = {k: v for k, v in digits_state.items() if not k.endswith("num_batches_tracked")}
    n_keys = len(sd)
    load_weights(vgg_digits(), sd)
    assert len(sd) == n_keys  # the caller's dict is not modified


def test_load_weights_does_not_modify_input(digits_state):
    sd = OrderedDict((f"module.{k}", v.clone()) for k, v in digits_state.items())
    snapshot = {k: v.clone() for k, v in sd.items()}
    model = load_weights(vgg_digits(), sd)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert list(sd) == list(snapshot)
    for k, v in sd.items():
        assert torch.equal(v, snapshot[k]), k


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_state_dict_file(path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        get_model("resnet20_cifar10", weights=str(path))


def test_directory_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="not a regular file"):
        load_state_dict_file(tmp_path)


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated"])
def test_corrupt_file(tmp_path, file_hash, kind, digits_state):
    path = tmp_path / f"{kind}.pth"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"this is not a checkpoint at all" * 10)
    else:
        torch.save(digits_state, path)
        path.write_bytes(path.read_bytes()[:2000])
    before = file_hash(path)
    with pytest.raises(ValueError, match=f"Could not read checkpoint '{re.escape(str(path))}'"):
        load_state_dict_file(path)
    assert file_hash(path) == before


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), path)  # a whole pickled module, not a state_dict
    with pytest.raises(ValueError, match="Could not read checkpoint") as info:
        load_state_dict_file(path)
    # One clean sentence: what was refused and what to do, without terminal escape codes.
    message = str(info.value)
    assert "holds pickled Python objects" in message and "torch.nn.modules.linear.Linear" in message
    assert "weights_only=False" in message and "\x1b" not in message


@pytest.mark.parametrize(
    "obj, match",
    [
        ([1, 2, 3], "does not hold a state_dict"),
        ({"conv.weight": 1.0}, "is a float, not a tensor"),
        ({"state_dict": [1]}, "'state_dict' entry is a list"),
        ({}, "empty state_dict"),
        ({"a.w": torch.zeros(1), "module.a.w": torch.zeros(1)}, "collides"),
    ],
)
def test_not_a_state_dict(tmp_path, obj, match):
    path = tmp_path / "odd.pth"
    torch.save(obj, path)
    with pytest.raises(ValueError, match=match):
        load_state_dict_file(path)


def test_mismatched_depth_names_model_and_keys(tmp_path):
    path = tmp_path / "r20.th"
    torch.save(resnet20_cifar10().state_dict(), path)
    with pytest.raises(ValueError) as info:
        get_model("resnet32_cifar10", weights=path)
    msg = str(info.value)
    assert "'resnet32_cifar10'" in msg and str(path) in msg
    assert "missing key(s)" in msg and "layer1.3.conv1.weight" in msg
    assert "more)" in msg  # long lists are truncated


def test_mismatched_shapes_are_listed():
    pruned = resnet20_cifar10(block_widths=[[8]] * 9).state_dict()
    with pytest.raises(ValueError) as info:
        get_model("resnet20_cifar10", weights=pruned)
    msg = str(info.value)
    assert "mis-shaped" in msg
    assert "layer1.0.conv1.weight (checkpoint (8, 16, 3, 3), model (16, 16, 3, 3))" in msg


def test_unexpected_keys_are_listed(digits_state):
    sd = dict(digits_state, **{"extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"1 unexpected key\(s\) \['extra.weight'\]"):
        load_weights(vgg_digits(), sd, name="vgg_digits")


def test_type_errors():
    with pytest.raises(TypeError, match="'path'"):
        load_state_dict_file(3)
    with pytest.raises(TypeError, match="'model'"):
        load_weights("model", {})
    with pytest.raises(TypeError, match="'weights'"):
        load_weights(vgg_digits(), 3)
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        normalize_state_dict([torch.zeros(1)])


def test_save_and_load_pruned_model(tmp_path, file_hash):
    model = resnet20_cifar10(block_widths=[[4 + i] for i in range(9)]).eval()
    path = tmp_path / "pruned.pt"
    save_model(model, path)
    before = file_hash(path)
    # Plain data and tensors only: readable with weights_only=True.
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["arch_config"] == model.arch_config()
    loaded = load_model(path).eval()
    assert file_hash(path) == before
    assert loaded.arch_config() == model.arch_config()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_load_model_needs_arch_config(tmp_path, digits_state):
    path = tmp_path / "bare.pth"
    torch.save(digits_state, path)
    with pytest.raises(ValueError, match="no 'arch_config'"):
        load_model(path)
    with pytest.raises(TypeError, match="arch_config"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "x.pt")


def test_load_model_mismatch_names_file(tmp_path):
    path = tmp_path / "bad.pt"
    model = resnet20_cifar10()
    state = model.state_dict()
    state["linear.weight"] = torch.zeros(3, 64)
    torch.save({"arch_config": model.arch_config(), "state_dict": state}, path)
    with pytest.raises(ValueError, match=f"'{re.escape(str(path))}'.*linear.weight"):
        load_model(path)
