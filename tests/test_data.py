"""Tests for chanprune.data: presets, image folders, CIFAR batches, digits, sampling, accuracy."""

from __future__ import annotations

import dataclasses
import errno
import operator
import os
import pickle
import struct
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from chanprune.data import (
    CIFAR10_CLASSES,
    DIGITS_MEAN,
    DIGITS_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CIFAR10Batches,
    ImageFolder,
    Preprocess,
    calibration_subset,
    collate_images,
    evaluate_accuracy,
    get_preset,
    iter_batches,
    list_presets,
    load_digits_dataset,
    make_loader,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR_JPEG = SHARED / "data" / "cifar10-jpeg"
needs_shared = pytest.mark.skipif(
    not CIFAR_JPEG.is_dir(), reason=f"shared CIFAR-10 JPEG data not found at {CIFAR_JPEG}"
)


# --------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------


def _expected_normalised(value: int, channel: int) -> torch.Tensor:
    """ToTensor + Normalize by hand, in float32 as torchvision computes it."""
    x = torch.tensor(float(value), dtype=torch.float32) / 255.0
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[channel]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[channel]
    return (x - mean) / std


def test_cifar_preset_constant_colour_matches_hand_computation():
    colour = (10, 128, 250)
    out = get_preset("cifar")(Image.new("RGB", (7, 5), colour))
    assert out.dtype == torch.float32
    assert out.shape == (3, 5, 7)
    for c, v in enumerate(colour):
        assert torch.equal(out[c], torch.full((5, 7), _expected_normalised(v, c).item()))
        want = (v / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]  # float64 reference
        assert abs(out[c, 0, 0].item() - want) < 1e-6


def test_preset_registry():
    assert list_presets() == ["cifar", "imagenet"]
    cifar, imagenet = get_preset("cifar"), get_preset("imagenet")
    assert (cifar.resize, cifar.crop) == (None, None)
    assert (imagenet.resize, imagenet.crop) == (256, 224)
    for preset in (cifar, imagenet):
        assert preset.mode == "RGB"
        assert preset.mean == IMAGENET_MEAN and preset.std == IMAGENET_STD
    with pytest.raises(ValueError, match=r"'cifar'.*'imagenet'"):
        get_preset("cifar100")


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((400, 300), (3, 224, 224)),  # landscape (width, height)
        ((300, 500), (3, 224, 224)),  # portrait
        ((256, 256), (3, 224, 224)),  # already the resize size
        ((100, 120), (3, 224, 224)),  # upsampled
    ],
)
def test_imagenet_preset_shapes(size, expected):
    assert get_preset("imagenet")(Image.new("RGB", size, (1, 2, 3))).shape == expected


@pytest.mark.parametrize(
    ("size", "resize", "expected_hw"),
    [
        ((40, 20), 16, (16, 32)),
        ((20, 30), 10, (15, 10)),
        ((33, 20), 16, (16, 26)),  # long side truncated: int(16 * 33 / 20) = 26
        ((20, 33), 16, (26, 16)),
    ],
)
def test_resize_shorter_side(size, resize, expected_hw):
    out = Preprocess(resize=resize)(Image.new("RGB", size))
    assert out.shape == (3, *expected_hw)


def test_resize_is_pil_bilinear():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    out = Preprocess(resize=10, mean=None, std=None)(image)
    ref = np.asarray(image.resize((15, 10), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    np.testing.assert_array_equal(out.permute(1, 2, 0).numpy(), ref)


def test_center_crop_position_and_grayscale():
    array = np.arange(20, dtype=np.uint8).reshape(4, 5)  # height 4, width 5
    out = Preprocess(mode="L", crop=2, mean=None, std=None)(Image.fromarray(array))
    assert out.shape == (1, 2, 2)
    # top = round((4 - 2) / 2) = 1, left = round((5 - 2) / 2) = 2 (as torchvision).
    expected = torch.from_numpy(array[1:3, 2:4].astype(np.float32)) / 255.0
    assert torch.equal(out[0], expected)


def test_grayscale_normalisation_and_mode_conversion():
    pre = Preprocess(mode="L", mean=(0.5,), std=(0.25,))
    out = pre(Image.new("RGB", (3, 2), (200, 200, 200)))
    assert out.shape == (1, 2, 3)
    assert torch.allclose(out, torch.full((1, 2, 3), (200 / 255 - 0.5) / 0.25), atol=1e-6)
    rgb = Preprocess(mean=None, std=None)(Image.new("L", (3, 2), 51))
    assert rgb.shape == (3, 2, 3)
    assert torch.allclose(rgb, torch.full((3, 2, 3), 0.2))


def test_preprocess_validation():
    with pytest.raises(ValueError, match="'mode'"):
        Preprocess(mode="CMYK")
    with pytest.raises(ValueError, match="'mean'"):
        Preprocess(mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="'std'"):
        Preprocess(std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="both"):
        Preprocess(mean=None)
    with pytest.raises(ValueError, match="'crop'"):
        Preprocess(crop=0)
    with pytest.raises(TypeError, match="'resize'"):
        Preprocess(resize=2.5)
    with pytest.raises(ValueError, match="centre-crop 8x8"):
        Preprocess(crop=8)(Image.new("RGB", (10, 6)))
    with pytest.raises(TypeError, match="PIL"):
        get_preset("cifar")(np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_preset("cifar").crop = 3
    assert Preprocess(mean=[0.5, 0.5, 0.5], std=[1, 1, 1]).mean == (0.5, 0.5, 0.5)


# --------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------


@pytest.fixture
def image_tree(tmp_path):
    """root/{b_cls,a_cls}/... with PNG/JPEG files of known colours and some non-images."""
    root = tmp_path / "images"
    (root / "b_cls").mkdir(parents=True)
    (root / "a_cls" / "nested").mkdir(parents=True)
    Image.new("RGB", (6, 4), (255, 0, 0)).save(root / "a_cls" / "2.png")
    Image.new("RGB", (6, 4), (0, 255, 0)).save(root / "a_cls" / "10.PNG")
    Image.new("L", (6, 4), 128).save(root / "a_cls" / "nested" / "0.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(root / "b_cls" / "1.jpg", quality=95)
    Image.new("RGBA", (5, 5), (9, 9, 9, 255)).save(root / "b_cls" / "0.jpeg.png")
    (root / "b_cls" / "notes.txt").write_text("not an image")
    (root / "b_cls" / ".hidden.png").write_bytes(b"resource fork")
    (root / "stray.png").write_bytes(b"files directly under root are not samples")
    return root


def test_image_folder_labels_order_and_items(image_tree):
    ds = ImageFolder(image_tree, preprocess=Preprocess(mean=None, std=None))
    assert ds.classes == ["a_cls", "b_cls"]
    assert ds.class_to_idx == {"a_cls": 0, "b_cls": 1}
    names = [Path(p).relative_to(image_tree).as_posix() for p, _ in ds.samples]
    assert names == [
        "a_cls/10.PNG",
        "a_cls/2.png",
        "a_cls/nested/0.png",
        "b_cls/0.jpeg.png",
        "b_cls/1.jpg",
    ]
    assert ds.targets == [0, 0, 0, 1, 1] == [label for _, label in ds.samples]
    assert len(ds) == 5
    image, label = ds[0]
    assert label == 0 and isinstance(label, int)
    assert image.dtype == torch.float32 and image.shape == (3, 4, 6)
    assert torch.equal(image[:, 0, 0], torch.tensor([0.0, 1.0, 0.0]))
    gray, _ = ds[2]  # an 'L' file is converted to RGB
    assert gray.shape == (3, 4, 6) and torch.allclose(gray, torch.full_like(gray, 128 / 255))
    assert ds[3][0].shape == (3, 5, 5)  # RGBA -> RGB
    assert ds[4][0].shape == (3, 8, 8)
    assert "n_images=5" in repr(ds)


def test_image_folder_default_preset_extensions_and_classes(image_tree):
    ds = ImageFolder(image_tree)
    assert isinstance(ds.preprocess, Preprocess) and ds.preprocess == get_preset("cifar")
    expected = (1.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1]
    assert ds[0][0][1, 0, 0].item() == pytest.approx(expected, abs=1e-6)

    only_jpg = ImageFolder(image_tree, extensions=(".JPG",), classes=["b_cls"])
    assert only_jpg.classes == ["b_cls"]
    assert [Path(p).name for p, _ in only_jpg.samples] == ["1.jpg"]
    assert only_jpg.targets == [0]

    reordered = ImageFolder(image_tree, classes=("b_cls", "a_cls"))
    assert reordered.targets == [0, 0, 1, 1, 1]

    gray = ImageFolder(image_tree, preprocess=Preprocess(mode="L", mean=None, std=None))
    assert gray[0][0].shape == (1, 4, 6)


def test_image_folder_accepts_any_callable(image_tree):
    ds = ImageFolder(image_tree, preprocess=lambda im: torch.tensor(im.size))
    image, label = ds[0]
    assert label == 0 and image.tolist() == [6, 4]


def test_image_folder_errors(tmp_path, image_tree):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        ImageFolder(missing)

    empty = tmp_path / "empty_root"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"'\.jpg', '\.jpeg', '\.png'.*empty_root"):
        ImageFolder(empty)
    bare = tmp_path / "bare_root"  # no class folders at all
    bare.mkdir()
    with pytest.raises(ValueError, match="bare_root"):
        ImageFolder(bare)

    with pytest.raises(ValueError, match="duplicate"):
        ImageFolder(image_tree, classes=["a_cls", "b_cls", "a_cls"])
    with pytest.raises(FileNotFoundError, match="c_cls"):
        ImageFolder(image_tree, classes=["a_cls", "c_cls"])
    with pytest.raises(ValueError, match="'extensions'"):
        ImageFolder(image_tree, extensions=("jpg",))
    with pytest.raises(ValueError, match="valid names"):
        ImageFolder(image_tree, preprocess="nope")
    with pytest.raises(TypeError, match="'preprocess'"):
        ImageFolder(image_tree, preprocess=3)


def test_image_folder_root_that_is_a_file(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"file\.txt' is not a directory"):
        ImageFolder(tmp_path / "file.txt")


def test_image_folder_unreadable_class_folder_says_so(image_tree, monkeypatch):
    # chmod cannot lock out root, which runs some test machines: refuse the listing instead.
    real_scandir = os.scandir
    locked = str(image_tree / "b_cls")

    def scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(PermissionError, match=r"Cannot read folder '.*b_cls': Permission denied"):
        ImageFolder(image_tree)


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links")
def test_image_folder_follows_links_but_never_a_folder_twice(image_tree, tmp_path, caplog):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (4, 4)).save(elsewhere / "linked.png")
    before = ImageFolder(image_tree).samples
    (image_tree / "b_cls" / "up").symlink_to("..")  # a loop through the root
    (image_tree / "b_cls" / "a").symlink_to("../a_cls")  # another class's folder
    (image_tree / "a_cls" / "nested" / "loop").symlink_to("..")  # a loop inside a class
    (image_tree / "a_cls" / "data").symlink_to(elsewhere)  # a linked-in dataset: followed
    with caplog.at_level("WARNING", logger="chanprune.data"):
        ds = ImageFolder(image_tree)
    linked = (str(image_tree / "a_cls" / "data" / "linked.png"), 0)
    assert sorted(ds.samples) == sorted([*before, linked])
    assert sum("skipping" in r.getMessage() for r in caplog.records) == 3


def test_image_folder_same_size_names_the_odd_image(image_tree):
    loose = ImageFolder(image_tree, classes=["a_cls"])
    assert [tuple(loose[i][0].shape) for i in range(3)] == [(3, 4, 6)] * 3
    Image.new("RGB", (7, 7)).save(image_tree / "a_cls" / "nested" / "1.png")
    strict = ImageFolder(image_tree, classes=["a_cls"], same_size=True)
    strict[0], strict[1], strict[2]
    with pytest.raises(ValueError, match=r"different sizes.*nested/1\.png.*\(3, 7, 7\).*"
                       r"10\.PNG.*\(3, 4, 6\).*imagenet"):  # fmt: skip
        strict[3]
    with pytest.raises(TypeError, match="'same_size'"):
        ImageFolder(image_tree, same_size="yes")


def test_loader_of_images_of_different_sizes_lists_the_shapes(image_tree):
    ds = ImageFolder(image_tree)  # 6x4, 5x5 and 8x8 images
    with pytest.raises(ValueError, match=r"different sizes.*\(3, 4, 6\), \(3, 5, 5\).*imagenet"):
        list(make_loader(ds, 8))
    with pytest.raises(ValueError, match="different sizes"):
        evaluate_accuracy(nn.Flatten(), ds, progress=False)
    assert collate_images([(torch.zeros(2), 0), (torch.ones(2), 1)])[1].tolist() == [0, 1]


def test_image_folder_class_without_images(image_tree):
    (image_tree / "c_cls").mkdir()
    with pytest.raises(ValueError, match="c_cls"):
        ImageFolder(image_tree)


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_image_folder_corrupt_file_names_the_file(tmp_path, kind):
    root = tmp_path / "corrupt_root"
    (root / "cls").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "cls" / "0_good.png")
    bad = root / "cls" / "1_bad.jpg"
    if kind == "garbage":
        bad.write_bytes(b"\x00definitely not a jpeg" * 10)
    else:
        rng = np.random.default_rng(0)
        noise = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(bad, quality=90)
        bad.write_bytes(bad.read_bytes()[:600])
    ds = ImageFolder(root)  # listing does not read the files
    assert len(ds) == 2
    assert ds[0][0].shape == (3, 4, 4)
    with pytest.raises(ValueError, match="1_bad.jpg"):
        ds[1]


# --------------------------------------------------------------------------------------
# CIFAR-10 python batches
# --------------------------------------------------------------------------------------


def _py2_style_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """The pickle Python 2 / numpy 1.x wrote for ``{'data': data, 'labels': labels}``
    (protocol 2, byte strings, ``numpy.core.multiarray._reconstruct``): the format of the
    downloadable ``cifar-10-python.tar.gz``."""

    def short_str(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b

    def binint(i: int) -> bytes:
        return b"J" + struct.pack("<i", i)

    assert data.dtype == np.uint8 and data.ndim == 2
    raw = data.tobytes()
    dtype = (
        b"cnumpy\ndtype\n"
        + short_str(b"u1")
        + b"K\x00K\x01\x87R("
        + b"K\x03"
        + short_str(b"|")
        + b"NNN"
        + binint(-1)
        + binint(-1)
        + b"K\x00tb"
    )
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\n"
        + b"cnumpy\nndarray\n"
        + b"K\x00\x85"
        + short_str(b"b")
        + b"\x87R("
        + b"K\x01"
        + binint(data.shape[0])
        + binint(data.shape[1])
        + b"\x86"
        + dtype
        + b"\x89"
        + b"T"
        + struct.pack("<I", len(raw))
        + raw
        + b"tb"
    )
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return (
        b"\x80\x02}("
        + short_str(b"batch_label")
        + short_str(b"synthetic")
        + short_str(b"data")
        + array
        + short_str(b"labels")
        + label_list
        + b"u."
    )


def _synthetic_batch(n: int, offset: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(offset)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [(offset + i) % 10 for i in range(n)]
    return data, labels


def _write_cifar(root: Path, protocol: int | str = "py2", n: int = 3) -> dict[str, tuple]:
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        data, labels = _synthetic_batch(n + k % 2, offset=7 * k)
        if protocol == "py2":
            payload = _py2_style_pickle(data, labels)
        else:
            batch = {b"batch_label": b"synthetic", b"data": data, b"labels": labels}
            payload = pickle.dumps(batch, protocol=protocol)
        (root / name).write_bytes(payload)
        written[name] = (data, labels)
    return written


def _expected_cifar_image(row: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(row.reshape(3, 32, 32).astype(np.float32)) / 255.0
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def test_py2_style_pickle_helper_is_valid():
    data, labels = _synthetic_batch(2, 0)
    loaded = pickle.loads(_py2_style_pickle(data, labels), encoding="bytes")
    np.testing.assert_array_equal(loaded[b"data"], data)
    assert loaded[b"labels"] == labels


@pytest.mark.parametrize("protocol", ["py2", 2, 4, 5])
def test_cifar_batches_round_trip(tmp_path, protocol):
    written = _write_cifar(tmp_path / "cifar-10-batches-py", protocol)
    test = CIFAR10Batches(tmp_path / "cifar-10-batches-py", split="test")
    data, labels = written["test_batch"]
    assert len(test) == len(labels)
    assert test.targets == labels
    assert test.classes == list(CIFAR10_CLASSES)
    assert test.data.shape == (len(labels), 32, 32, 3) and test.data.dtype == np.uint8
    for i in range(len(test)):
        image, label = test[i]
        assert label == labels[i]
        assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
        assert torch.equal(image, _expected_cifar_image(data[i]))

    train = CIFAR10Batches(tmp_path, split="train")  # the parent folder works too
    assert train.root == tmp_path / "cifar-10-batches-py"
    expected = [written[f"data_batch_{i}"] for i in range(1, 6)]
    assert train.targets == [label for _, labels_k in expected for label in labels_k]
    all_rows = np.concatenate([d for d, _ in expected])
    assert len(train) == all_rows.shape[0]
    assert torch.equal(train[len(train) - 1][0], _expected_cifar_image(all_rows[-1]))


def test_cifar_batches_custom_preprocess(tmp_path):
    written = _write_cifar(tmp_path, 4)
    raw = CIFAR10Batches(tmp_path, preprocess=lambda im: torch.from_numpy(np.asarray(im).copy()))
    data, _ = written["test_batch"]
    np.testing.assert_array_equal(raw[1][0].numpy(), data[1].reshape(3, 32, 32).transpose(1, 2, 0))
    gray = CIFAR10Batches(tmp_path, preprocess=Preprocess(mode="L", mean=None, std=None))
    assert gray[0][0].shape == (1, 32, 32)


def test_cifar_batches_missing_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CIFAR10Batches(tmp_path / "nowhere")
    _write_cifar(tmp_path, 4)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        CIFAR10Batches(tmp_path, split="train")
    with pytest.raises(ValueError, match="'split'"):
        CIFAR10Batches(tmp_path, split="val")

    test_batch = tmp_path / "test_batch"
    payload = test_batch.read_bytes()
    test_batch.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(ValueError, match="test_batch"):
        CIFAR10Batches(tmp_path)

    test_batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"test_batch.*\(N, 3072\)"):
        CIFAR10Batches(tmp_path)
    test_batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}))
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        CIFAR10Batches(tmp_path)
    test_batch.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}))
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        CIFAR10Batches(tmp_path)
    for labels in ([0.5, 1.0], np.array([0.0, 2.5])):  # would truncate to a wrong class
        batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}
        test_batch.write_bytes(pickle.dumps(batch))
        with pytest.raises(ValueError, match="must be a list of ints; got non-integer"):
            CIFAR10Batches(tmp_path)
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1.0, 2.0]}  # whole floats
    test_batch.write_bytes(pickle.dumps(batch))
    assert [label for _, label in CIFAR10Batches(tmp_path, split="test")] == [1, 2]
    test_batch.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="dict"):
        CIFAR10Batches(tmp_path)


class _Exploit:
    def __reduce__(self):
        return (operator.add, (1, 2))  # harmless stand-in for os.system


def test_cifar_batches_refuse_arbitrary_globals(tmp_path):
    _write_cifar(tmp_path, 4)
    payload = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Exploit()}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match=r"test_batch.*refusing to load global .*add"):
        CIFAR10Batches(tmp_path)


# --------------------------------------------------------------------------------------
# Digits
# --------------------------------------------------------------------------------------


def test_digits_split_sizes_types_and_partition():
    from sklearn.datasets import load_digits

    train = load_digits_dataset("train")
    test = load_digits_dataset("test")
    assert isinstance(train, TensorDataset)
    assert (len(train), len(test)) == (1347, 450)  # sklearn rounds the test size up
    x, y = train.tensors
    assert x.dtype == torch.float32 and x.shape == (1347, 1, 8, 8)
    assert y.dtype == torch.int64 and y.shape == (1347,)
    low, high = (0 - DIGITS_MEAN) / DIGITS_STD, (1 - DIGITS_MEAN) / DIGITS_STD
    assert x.min().item() == pytest.approx(low, abs=1e-5)
    assert x.max().item() == pytest.approx(high, abs=1e-5)

    # The two splits partition the digits: undo the normalisation and compare multisets.
    def rows(ds):
        pixels = (ds.tensors[0].double() * DIGITS_STD + DIGITS_MEAN) * 16
        return sorted(map(tuple, np.rint(pixels.reshape(len(ds), -1).numpy()).astype(int).tolist()))

    digits = load_digits()
    everything = sorted(map(tuple, digits.data.astype(int).tolist()))
    assert sorted(rows(train) + rows(test)) == everything

    # Stratified: each class's share of the test split is within one image of 25 %.
    counts = Counter(test.tensors[1].tolist())
    for label, total in Counter(digits.target.tolist()).items():
        assert abs(counts[label] - 0.25 * total) <= 1


def test_digits_determinism_and_validation():
    a = load_digits_dataset("test", seed=3)
    b = load_digits_dataset("test", seed=3)
    c = load_digits_dataset("test", seed=4)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(a.tensors[0], c.tensors[0])
    assert len(load_digits_dataset("test", test_fraction=0.5)) == 899
    with pytest.raises(ValueError, match="'split'"):
        load_digits_dataset("val")
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="'test_fraction'"):
            load_digits_dataset("test", test_fraction=bad)
    with pytest.raises(ValueError, match="'seed'"):
        load_digits_dataset(seed=-1)


# --------------------------------------------------------------------------------------
# Calibration sampling and batching
# --------------------------------------------------------------------------------------


class _NoLabels(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((1, 2, 2), float(i)), i % 3


def test_calibration_subset_uniform_matches_default_rng():
    ds = _NoLabels(50)
    sub = calibration_subset(ds, 7, seed=11)
    assert isinstance(sub, Subset) and sub.dataset is ds
    expected = np.sort(np.random.default_rng(11).choice(50, size=7, replace=False)).tolist()
    assert sub.indices == expected
    assert all(isinstance(i, int) for i in sub.indices)
    assert calibration_subset(ds, 7, seed=11).indices == expected
    assert calibration_subset(ds, 7, seed=12).indices != expected
    assert sub[0][0][0, 0, 0].item() == expected[0]


def test_calibration_subset_stratified():
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    ds = TensorDataset(torch.randn(100, 1, 2, 2), labels)
    sub = calibration_subset(ds, 10, seed=0)
    assert sub.indices == sorted(set(sub.indices)) and len(sub.indices) == 10
    assert Counter(labels[sub.indices].tolist()) == {0: 6, 1: 3, 2: 1}
    assert calibration_subset(ds, 10, seed=0).indices == sub.indices
    # Largest remainders: 7 * (0.6, 0.3, 0.1) = (4.2, 2.1, 0.7) -> (4, 2, 1).
    assert Counter(labels[calibration_subset(ds, 7, seed=5).indices].tolist()) == {
        0: 4,
        1: 2,
        2: 1,
    }
    plain = calibration_subset(ds, 10, seed=0, stratify=False)
    expected = np.sort(np.random.default_rng(0).choice(100, size=10, replace=False)).tolist()
    assert plain.indices == expected
    # Labels are found through a Subset as well.
    nested = calibration_subset(Subset(ds, list(range(90, 100)) + list(range(10))), 4, seed=1)
    parent_labels = [int(labels[[*range(90, 100), *range(10)][i]]) for i in nested.indices]
    assert Counter(parent_labels) == {2: 2, 0: 2}


def test_calibration_subset_all_and_validation():
    ds = _NoLabels(5)
    assert calibration_subset(ds, None).indices == [0, 1, 2, 3, 4]
    assert calibration_subset(ds, 5).indices == [0, 1, 2, 3, 4]
    assert calibration_subset(ds, 99).indices == [0, 1, 2, 3, 4]
    assert calibration_subset(ds, 1, seed=0).indices == [
        int(np.random.default_rng(0).choice(5, size=1, replace=False)[0])
    ]
    for bad in (0, -3):
        with pytest.raises(ValueError, match="'n_images'"):
            calibration_subset(ds, bad)
    with pytest.raises(TypeError, match="'n_images'"):
        calibration_subset(ds, 2.0)
    with pytest.raises(ValueError, match="'seed'"):
        calibration_subset(ds, 2, seed=-1)
    with pytest.raises(ValueError, match="empty"):
        calibration_subset(_NoLabels(0), 2)


def test_make_loader_and_iter_batches_are_ordered():
    ds = TensorDataset(torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10))
    loader = make_loader(ds, 4)
    assert [labels.tolist() for _, labels in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [labels.tolist() for _, labels in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    batches = list(iter_batches(ds, 3, device="cpu"))
    assert [b[0].shape[0] for b in batches] == [3, 3, 3, 1]
    assert torch.equal(torch.cat([b[0] for b in batches]).flatten(), torch.arange(10.0))
    folder_like = [(torch.zeros(3, 2, 2), 1), (torch.ones(3, 2, 2), 0)]
    images, labels = next(iter(make_loader(folder_like, 2)))
    assert images.shape == (2, 3, 2, 2) and labels.dtype == torch.int64
    with pytest.raises(ValueError, match="'batch_size'"):
        make_loader(ds, 0)
    with pytest.raises(ValueError, match="'num_workers'"):
        list(iter_batches(ds, 2, num_workers=-1))


# --------------------------------------------------------------------------------------
# evaluate_accuracy
# --------------------------------------------------------------------------------------


class _ReadsAnswer(nn.Module):
    """Predicts the class written in pixel (0, 0, 0): one-hot scores over 3 classes."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.child = nn.Identity()
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.calls.append((self.training, torch.is_inference_mode_enabled()))
        return nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float() * self.scale


def _answer_dataset(n: int, n_wrong: int) -> TensorDataset:
    labels = torch.arange(n) % 3
    guesses = labels.clone()
    guesses[:n_wrong] = (guesses[:n_wrong] + 1) % 3
    return TensorDataset(guesses.float().view(n, 1, 1, 1).expand(n, 1, 2, 2).clone(), labels)


def test_evaluate_accuracy_known_answer_and_modes():
    model = _ReadsAnswer()
    model.train()
    model.child.eval()  # a mixed state must come back as it was
    acc = evaluate_accuracy(model, _answer_dataset(10, 3), batch_size=4, progress=False)
    assert acc == pytest.approx(0.7)
    assert isinstance(acc, float)
    assert model.calls == [(False, True)] * 3  # eval mode and inference mode, 3 batches
    assert model.training is True and model.child.training is False

    assert evaluate_accuracy(model, _answer_dataset(9, 0), device="cpu", progress=True) == 1.0
    model.eval()
    assert evaluate_accuracy(model, _answer_dataset(6, 6), progress=False) == 0.0
    assert model.training is False


def test_evaluate_accuracy_warns_about_non_finite_scores():
    model = _ReadsAnswer()
    with torch.no_grad():
        model.scale.fill_(float("nan"))  # broken weights: every score NaN
    with pytest.warns(RuntimeWarning, match=r"NaN or Inf scores for 10 of 10 images"):
        evaluate_accuracy(model, _answer_dataset(10, 0), batch_size=4, progress=False)


def test_evaluate_accuracy_on_image_folder(tmp_path):
    root = tmp_path / "acc"
    for name, colour in (("a", (0, 0, 0)), ("b", (255, 255, 255))):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (4, 4), colour).save(root / name / f"{i}.png")

    class Brightness(nn.Module):
        def forward(self, x):  # class 1 if bright
            bright = x.mean(dim=(1, 2, 3)) > 0
            return torch.stack([~bright, bright], dim=1).float()

    ds = ImageFolder(root)
    assert evaluate_accuracy(Brightness(), ds, batch_size=4, progress=False) == 1.0


def test_evaluate_accuracy_errors_restore_mode():
    class Flat(nn.Module):
        def forward(self, x):
            return x.flatten()

    model = Flat().train()
    with pytest.raises(ValueError, match="batch, n_classes"):
        evaluate_accuracy(model, _answer_dataset(4, 0), progress=False)
    assert model.training is True
    with pytest.raises(ValueError, match="empty"):
        evaluate_accuracy(model, _NoLabels(0), progress=False)
    with pytest.raises(ValueError, match="'batch_size'"):
        evaluate_accuracy(model, _answer_dataset(4, 0), batch_size=0)
    with pytest.raises(TypeError, match="'model'"):
        evaluate_accuracy(lambda x: x, _answer_dataset(4, 0))


# --------------------------------------------------------------------------------------
# Shared CIFAR-10 JPEG data
# --------------------------------------------------------------------------------------


@pytest.mark.shared
@needs_shared
def test_shared_cifar_train5k():
    ds = ImageFolder(CIFAR_JPEG / "train5k")
    assert len(ds) == 5000
    assert ds.classes == list(CIFAR10_CLASSES)
    assert Counter(ds.targets) == {label: 500 for label in range(10)}
    assert ds.targets == sorted(ds.targets)
    image, label = ds[0]
    assert label == 0
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    low = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    high = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    assert low - 1e-5 <= image.min().item() <= image.max().item() <= high + 1e-5
    last_image, last_label = ds[len(ds) - 1]
    assert last_label == 9 and last_image.shape == (3, 32, 32)
    sub = calibration_subset(ds, 50, seed=0)
    assert Counter(ds.targets[i] for i in sub.indices) == {label: 5 for label in range(10)}


@pytest.mark.shared
@needs_shared
def test_shared_cifar_test_split():
    ds = ImageFolder(CIFAR_JPEG / "test", classes=CIFAR10_CLASSES)
    assert len(ds) == 10000
    assert ds.classes == list(CIFAR10_CLASSES)
    assert Counter(ds.targets) == {label: 1000 for label in range(10)}
    assert ds[5000][0].shape == (3, 32, 32) and ds[5000][1] == 5
