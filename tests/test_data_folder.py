"""Tests of calibration lists (chanprune.data) and of data/make_calib_list.py."""

from __future__ import annotations

import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from _planted import load_script
from PIL import Image

from chanprune.data import (
    CALIBRATION_LIST_HEADER,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CalibrationList,
    ImageFolder,
    iter_batches,
    make_calibration_list,
    open_calibration,
    read_calibration_list,
)

REPO = Path(__file__).resolve().parents[1]

#: Images per class of the tiny image folder: unequal on purpose.
SIZES = {"cat": 5, "dog": 6, "emu": 7}


def _png(path: Path, value: int, size=(4, 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], 3), value, dtype=np.uint8)
    pixels[0, 0] = (value * 7) % 256, 3, 250  # not a constant image
    Image.fromarray(pixels).save(path)


@pytest.fixture
def tree(tmp_path) -> Path:
    """``tmp_path/src/<class>/<i>.png``, 5, 6 and 7 images; the list goes elsewhere."""
    root = tmp_path / "src"
    for c, (name, n) in enumerate(SIZES.items()):
        for i in range(n):
            _png(root / name / f"{i:02d}.png", 10 * c + i)
    return root


def _snapshot(root: Path) -> dict:
    """Every file (size, mtime, bytes) and folder under ``root``."""
    return {
        str(p.relative_to(root)): (
            (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes()) if p.is_file() else "dir"
        )
        for p in sorted(root.rglob("*"))
    }


def _entries_of(list_file: Path) -> list[tuple[str, int]]:
    """The list's entries, parsed here without chanprune: non-comment lines, last field
    the label, the path relative to the list's folder."""
    out = []
    for line in list_file.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            path, label = line.rsplit(" ", 1)
            out.append((os.path.normpath(list_file.parent / path), int(label)))
    return out


# ---------------------------------------------------------------------------- image folders
def test_list_is_balanced_and_labels_name_the_class_folders(tree, tmp_path):
    out = tmp_path / "lists" / "calib.txt"  # the folder is created
    before = _snapshot(tree)
    entries = make_calibration_list(tree, out, 9, seed=0)
    assert _snapshot(tree) == before  # the dataset is read, never modified

    parsed = _entries_of(out)
    assert len(parsed) == 9 and len({p for p, _ in parsed}) == 9
    classes = sorted(SIZES)
    for path, label in parsed:
        assert Path(path).is_file()
        assert Path(path).parent.name == classes[label]  # label = sorted folder index
        assert Path(path).parent.parent == tree
    assert Counter(label for _, label in parsed) == {0: 3, 1: 3, 2: 3}
    # What make_calibration_list returns is what read_calibration_list reads back.
    assert [(os.path.normpath(p), lab) for p, lab in entries] == parsed
    assert [(os.path.normpath(p), lab) for p, lab in read_calibration_list(out)] == parsed

    text = out.read_text(encoding="utf-8")
    assert text.startswith(CALIBRATION_LIST_HEADER + "\n")
    assert "# classes (label order): cat dog emu" in text
    assert "seed 0" in text
    assert not any(line.startswith("/") for line in text.splitlines())  # relative by default


def test_the_draw_is_the_documented_one(tree, tmp_path):
    """Class after class in label order, n // K each, rng.choice without replacement."""
    out = tmp_path / "calib.txt"
    make_calibration_list(tree, out, 6, seed=5)
    rng = np.random.default_rng(5)
    expected = []
    for c, name in enumerate(sorted(SIZES)):
        files = sorted((tree / name).iterdir())
        picked = np.sort(rng.choice(np.arange(len(files)), size=2, replace=False))
        expected += [(os.path.normpath(files[i]), c) for i in picked]
    assert _entries_of(out) == expected


def test_same_seed_same_list_other_seed_other_list(tree, tmp_path):
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    make_calibration_list(tree, a, 9, seed=3)
    make_calibration_list(tree, b, 9, seed=3)
    make_calibration_list(tree, c, 9, seed=4)
    assert a.read_text() == b.read_text()
    assert {p for p, _ in _entries_of(a)} != {p for p, _ in _entries_of(c)}
    assert Counter(lab for _, lab in _entries_of(c)) == {0: 3, 1: 3, 2: 3}


def test_n_not_a_multiple_of_the_classes_warns_and_stays_within_one(tree, tmp_path):
    out = tmp_path / "calib.txt"
    with pytest.warns(UserWarning, match="not a multiple of the 3 classes"):
        make_calibration_list(tree, out, 11, seed=0)
    assert Counter(lab for _, lab in _entries_of(out)) == {0: 4, 1: 4, 2: 3}


def test_absolute_paths(tree, tmp_path):
    out = tmp_path / "abs.txt"
    make_calibration_list(tree, out, 3, absolute=True)
    lines = [ln for ln in out.read_text().splitlines() if not ln.startswith("#")]
    assert all(Path(ln.rsplit(" ", 1)[0]).is_absolute() for ln in lines)
    assert [p for p, _ in read_calibration_list(out)] == [Path(p) for p, _ in _entries_of(out)]


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("too_many", ValueError, "holds only 18"),
        ("unbalanceable", ValueError, r"class 0 \('cat'\) has 5 image.*at most 15"),
        ("missing_root", FileNotFoundError, "does not exist"),
        ("root_is_a_file", ValueError, "is not a folder"),
        ("empty_class", ValueError, "hold no image files"),
        ("no_classes", ValueError, "No image files"),
        ("out_is_a_folder", ValueError, "is a directory"),
        ("zero", ValueError, "'n_images'"),
        ("bad_seed", ValueError, "'seed'"),
    ],
)
def test_bad_input_raises_and_writes_nothing(tree, tmp_path, case, error, match):
    source, n, out = tree, 9, tmp_path / "out" / "calib.txt"
    kwargs = {}
    if case == "too_many":
        n = 19
    elif case == "unbalanceable":
        n = 18  # 6 per class, but "cat" has 5
    elif case == "missing_root":
        source = tmp_path / "absent"
    elif case == "root_is_a_file":
        source = tree / "cat" / "00.png"
    elif case == "empty_class":
        (tree / "fox").mkdir()
    elif case == "no_classes":
        source = tmp_path / "nothing"
        source.mkdir()
    elif case == "out_is_a_folder":
        out = tmp_path / "out"
        out.mkdir()
    elif case == "zero":
        n = 0
    elif case == "bad_seed":
        kwargs["seed"] = -1
    before = _snapshot(tmp_path)
    with pytest.raises(error, match=match):
        make_calibration_list(source, out, n, **kwargs)
    assert _snapshot(tmp_path) == before  # nothing written, no folder created


# ---------------------------------------------------------------------------- reading
def test_read_list_paths_relative_to_the_list_not_the_cwd(tree, tmp_path, monkeypatch):
    lists = tmp_path / "lists"
    lists.mkdir()
    spaced = tree / "dog" / "with space 7.png"
    _png(spaced, 99)
    (lists / "l.txt").write_text(
        "# a comment\n"
        "\n"
        "   # an indented comment\n"
        "../src/cat/00.png 0\n"
        f"  {tree / 'emu' / '03.png'}\t2  \n"  # absolute, tab, surrounding blanks
        "../src/dog/with space 7.png 1\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tree / "cat")  # relative paths must not depend on it
    entries = read_calibration_list(lists / "l.txt")
    assert [(p.resolve(), lab) for p, lab in entries] == [
        ((tree / "cat" / "00.png").resolve(), 0),
        ((tree / "emu" / "03.png").resolve(), 2),
        (spaced.resolve(), 1),
    ]


def test_read_list_without_labels(tree, tmp_path):
    (tmp_path / "l.txt").write_text("src/cat/00.png\nsrc/dog/01.png\n")
    entries = read_calibration_list(tmp_path / "l.txt")
    assert [lab for _, lab in entries] == [None, None]
    ds = CalibrationList(tmp_path / "l.txt")
    assert ds.targets == [-1, -1] and not ds.labelled


@pytest.mark.parametrize(
    "content, error, match",
    [
        ("src/cat/00.png 0\nsrc/cat/01.png\n", ValueError, r"line 1\).*line 2\)"),
        ("# only a comment\n\n", ValueError, "names no image"),
        ("src/cat/00.png 0\nsrc/cat/99.png 0\n", FileNotFoundError, r"1 image.*line 2.*99.png"),
        (b"\xff\xfe bad", ValueError, "not UTF-8"),
    ],
)
def test_read_list_bad_content(tree, tmp_path, content, error, match):
    path = tmp_path / "l.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(error, match=match):
        read_calibration_list(path)


def test_read_list_missing_or_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        read_calibration_list(tmp_path / "absent.txt")
    with pytest.raises(ValueError, match="is a folder"):
        read_calibration_list(tmp_path)


def _expected_image(path: Path) -> torch.Tensor:
    """The 'cifar' preset by hand: RGB, /255, ImageNet mean and std."""
    x = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
    x = (x - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    return torch.from_numpy(x.transpose(2, 0, 1)).float()


def test_open_calibration_reads_folders_and_lists_as_the_cli_does(tree, tmp_path):
    """The loading of ``chanprune prune --calib``: a folder or a list, same images."""
    out = tmp_path / "calib.txt"
    make_calibration_list(tree, out, 6, seed=1)
    listed = open_calibration(out, "cifar")
    folder = open_calibration(tree, "cifar")
    assert isinstance(listed, CalibrationList) and isinstance(folder, ImageFolder)
    assert len(listed) == 6 and listed.same_size
    index = {path: i for i, (path, _) in enumerate(folder.samples)}
    for i, (path, label) in enumerate(listed.samples):
        image, got_label = listed[i]
        assert got_label == label == folder.targets[index[os.path.normpath(path)]]
        torch.testing.assert_close(image, _expected_image(Path(path)), rtol=0, atol=1e-6)
        torch.testing.assert_close(image, folder[index[os.path.normpath(path)]][0])
    batches = list(iter_batches(listed, 4))
    assert [tuple(b[0].shape) for b in batches] == [(4, 3, 4, 4), (2, 3, 4, 4)]
    with pytest.raises(FileNotFoundError, match="absent"):
        open_calibration(tmp_path / "absent")


def test_list_images_of_different_sizes_are_named(tree, tmp_path):
    _png(tree / "cat" / "big.png", 1, size=(6, 6))
    (tmp_path / "l.txt").write_text("src/cat/00.png 0\nsrc/cat/big.png 0\n")
    ds = open_calibration(tmp_path / "l.txt")
    ds[0]
    with pytest.raises(ValueError, match="big.png"):
        ds[1]


# ---------------------------------------------------------------------------- CIFAR batches
def _write_cifar(root: Path, n: int = 12) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Synthetic CIFAR-10 python batches, each n images with labels i % 10."""
    root.mkdir(parents=True)
    written = {}
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        rng = np.random.default_rng(k)
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [(i + k) % 10 for i in range(n)]
        (root / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels}, protocol=2))
        written[name] = (data, labels)
    return written


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar_batches_become_lossless_pngs(tmp_path, split):
    written = _write_cifar(tmp_path / "cifar" / "cifar-10-batches-py")  # nested folder
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    data = np.concatenate([written[n][0] for n in names])
    labels = sum((written[n][1] for n in names), [])
    before = _snapshot(tmp_path / "cifar")
    out = tmp_path / "lists" / "c.txt"
    n = 10
    entries = make_calibration_list(tmp_path / "cifar", out, n, seed=0, split=split)
    assert _snapshot(tmp_path / "cifar") == before
    assert Counter(lab for _, lab in entries) == dict.fromkeys(range(10), 1)
    images_dir = tmp_path / "lists" / "c_images"
    assert sorted(p.name for p in images_dir.rglob("*.png")) == sorted(
        Path(p).name for p, _ in entries
    )
    for path, label in _entries_of(out):
        assert Path(path).parent.parent == images_dir
        index = int(Path(path).stem.split("_")[1])
        assert Path(path).stem.startswith(split)
        assert labels[index] == label
        want = data[index].reshape(3, 32, 32).transpose(1, 2, 0)  # the batch row, HWC
        np.testing.assert_array_equal(np.asarray(Image.open(path)), want)
    ds = open_calibration(out)
    assert len(ds) == n and ds[0][0].shape == (3, 32, 32)


def test_cifar_images_dir_and_failed_write_leaves_nothing(tmp_path, monkeypatch):
    _write_cifar(tmp_path / "cifar")
    before = _snapshot(tmp_path)
    calls = []
    real_save = Image.Image.save

    def failing_save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        make_calibration_list(
            tmp_path / "cifar", tmp_path / "new" / "c.txt", 20, images_dir=tmp_path / "new" / "png"
        )
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / "new").exists()  # the folders it created are removed too
    monkeypatch.undo()
    make_calibration_list(
        tmp_path / "cifar", tmp_path / "new" / "c.txt", 20, images_dir=tmp_path / "png"
    )
    assert len(list((tmp_path / "png").rglob("*.png"))) == 20
    assert all(Path(p).is_file() for p, _ in read_calibration_list(tmp_path / "new" / "c.txt"))


def test_cifar_too_many_images(tmp_path):
    _write_cifar(tmp_path / "cifar", n=3)
    with pytest.raises(ValueError, match="holds only 3"):
        make_calibration_list(tmp_path / "cifar", tmp_path / "c.txt", 4, split="test")
    assert not (tmp_path / "c.txt").exists()


# ---------------------------------------------------------------------------- shared CIFAR
@pytest.mark.shared
def test_shared_cifar_jpeg_folder(shared_dir, tmp_path):
    root = shared_dir / "data" / "cifar10-jpeg" / "train5k"
    out = tmp_path / "cifar_50.txt"
    make_calibration_list(root, out, 50, seed=0)
    parsed = _entries_of(out)
    assert Counter(lab for _, lab in parsed) == dict.fromkeys(range(10), 5)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    for path, label in parsed:
        assert Path(path).parent == root / classes[label]
    again = tmp_path / "again.txt"
    make_calibration_list(root, again, 50, seed=0)
    assert again.read_text() == out.read_text()
    other = tmp_path / "other.txt"
    make_calibration_list(root, other, 50, seed=1)
    assert {p for p, _ in _entries_of(other)} != {p for p, _ in parsed}

    ds = open_calibration(out, "cifar")
    image, label = ds[7]
    assert image.shape == (3, 32, 32) and label == parsed[7][1]
    torch.testing.assert_close(image, _expected_image(Path(parsed[7][0])), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- the script
def _script():
    return load_script(REPO / "data" / "make_calib_list.py")


def test_script_help(capsys):
    with pytest.raises(SystemExit) as exc:
        _script().main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--out", "--n-images", "--seed", "--split", "--images-dir", "--absolute"):
        assert option in out


def test_script_writes_the_list_and_reports_bad_input(tree, tmp_path, capsys):
    script = _script()
    out = tmp_path / "l.txt"
    assert script.main([str(tree), "--out", str(out), "--n-images", "7", "--seed", "2"]) == 0
    captured = capsys.readouterr()
    assert "7 images" in captured.out and "2-3 per class" in captured.out
    assert "warning: 7 images are not a multiple" in captured.err
    assert read_calibration_list(out) == read_calibration_list(out)  # readable
    with pytest.warns(UserWarning, match="the first class gets 3 images, the others 2"):
        make_calibration_list(tree, tmp_path / "same.txt", 7, seed=2)
    assert (tmp_path / "same.txt").read_text() == out.read_text()

    bad = tmp_path / "bad.txt"
    assert script.main([str(tree), "--out", str(bad), "--n-images", "100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("make_calib_list.py: error:") and "holds only 18" in err
    assert not bad.exists()
    assert script.main([str(tmp_path / "absent"), "--out", str(bad), "--n-images", "3"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_data_folder_is_tracked_not_ignored():
    import subprocess

    for name in ("data/README.md", "data/make_calib_list.py"):
        assert (REPO / name).is_file()
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", name], cwd=REPO, capture_output=True
        ).returncode
        assert ignored == 1, f"{name} is ignored by .gitignore"
