"""Tests of chanprune.demo: the offline digits demo, its cache, its outputs."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch

from chanprune import demo
from chanprune.flops import count_macs
from chanprune.models import vgg_digits

METHODS = ("lasso", "greedy_ls", "first_k")
SPEEDUP = 2.0


@pytest.fixture(scope="module")
def demo_cache_dir(tmp_path_factory) -> Path:
    """One cache of the trained demo network for the whole session (test_cli.py uses it too)."""
    return tmp_path_factory.getbasetemp() / "demo-cache"


@pytest.fixture(scope="module")
def first(tmp_path_factory, demo_cache_dir):
    """run_demo with three methods: (result, out_dir)."""
    out_dir = tmp_path_factory.mktemp("demo-out")
    result = demo.run_demo(
        out_dir, cache_dir=demo_cache_dir, methods=METHODS, speedup=SPEEDUP, progress=False
    )
    return result, out_dir


def test_unpruned_network_is_accurate(first):
    result, _ = first
    assert result["unpruned"]["accuracy"] > 0.95  # observed 0.989
    assert result["unpruned"]["macs"] == count_macs(vgg_digits(), (1, 8, 8), include_linear=True)
    assert result["n_calib_images"] + result["n_test_images"] == 1797


def test_json_matches_returned_result(first):
    result, out_dir = first
    saved = json.loads((out_dir / "demo.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert list(saved["methods"]) == list(METHODS) == saved["methods_order"]
    assert saved["speedup_target"] == SPEEDUP
    assert saved["files"]["json"] == str(out_dir / "demo.json")
    for row in saved["methods"].values():
        assert set(row) >= {
            "accuracy",
            "rel_error_mean",
            "rel_error_heldout_mean",
            "macs_before",
            "macs_after",
            "speedup",
            "wall_time_s",
        }
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["rel_error_mean"] > 0 and row["rel_error_heldout_mean"] > 0
        assert row["wall_time_s"] > 0


def test_speedup_is_reached(first):
    result, _ = first
    for row in result["methods"].values():
        assert row["macs_before"] == result["unpruned"]["macs"]
        assert row["speedup"] == pytest.approx(row["macs_before"] / row["macs_after"])
        assert abs(row["speedup"] / SPEEDUP - 1) < 0.02


def test_reconstruction_methods_are_not_worse_than_first_k(first):
    rows = first[0]["methods"]
    # Observed at 2x: lasso 0.9644, greedy_ls 0.9711, first_k 0.9711 (450 test images).
    for method in ("lasso", "greedy_ls"):
        assert rows[method]["accuracy"] >= rows["first_k"]["accuracy"] - 0.02
        # What the selection optimises: observed 0.026 and 0.022 against 0.035 for first_k.
        assert rows[method]["rel_error_mean"] < rows["first_k"]["rel_error_mean"]


def test_plot_is_written(first):
    result, out_dir = first
    png = out_dir / "demo.png"
    assert result["files"]["png"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out_dir.iterdir()) == ["demo.json", "demo.png"]


def test_table_is_printed_and_aligned(first):
    table = demo.format_table(first[0])
    lines = table.splitlines()
    assert any(line.startswith("unpruned") for line in lines)
    rows = [line for line in lines if line.split()[0] in (*METHODS, "unpruned")]
    assert len(rows) == len(METHODS) + 1
    assert len({len(line) for line in rows}) == 1  # right-aligned columns


def test_second_run_reuses_the_cache(first, demo_cache_dir, tmp_path):
    result, _ = first
    assert Path(result["train"]["cache_file"]).parent == demo_cache_dir
    again = demo.run_demo(
        tmp_path, cache_dir=demo_cache_dir, methods=("first_k",), speedup=SPEEDUP, progress=False
    )
    assert again["cache_hit"] is True
    assert again["train"]["train_time_s"] == 0.0
    assert again["unpruned"]["accuracy"] == result["unpruned"]["accuracy"]
    # Pruning is deterministic for a given seed.
    assert again["methods"]["first_k"] == {
        **result["methods"]["first_k"],
        "wall_time_s": again["methods"]["first_k"]["wall_time_s"],
    }


def test_thread_settings_are_restored(tmp_path, demo_cache_dir):
    before = torch.get_num_threads()
    demo.run_demo(
        tmp_path, cache_dir=demo_cache_dir, methods=("random",), speedup=1.5, progress=False
    )
    assert torch.get_num_threads() == before


def test_missing_matplotlib_skips_plot_with_warning(tmp_path, demo_cache_dir, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import raises ImportError
    with caplog.at_level(logging.WARNING, logger="chanprune.demo"):
        result = demo.run_demo(
            tmp_path, cache_dir=demo_cache_dir, methods=("first_k",), progress=False
        )
    assert result["files"]["png"] is None
    assert not (tmp_path / "demo.png").exists()
    assert (tmp_path / "demo.json").is_file()
    assert "matplotlib" in caplog.text


def test_training_cache_miss_hit_and_corrupt_file(tmp_path, caplog):
    """With one epoch, to keep it fast: miss, then hit, then a corrupt file is trained over."""
    model, info = demo.train_digits_model(epochs=1, cache_dir=tmp_path, progress=False)
    assert info["cache_hit"] is False and info["train_time_s"] > 0
    path = Path(info["cache_file"])
    assert path.parent == tmp_path and path.name.startswith("vgg_digits-")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file

    cached, info2 = demo.train_digits_model(epochs=1, cache_dir=tmp_path, progress=False)
    assert info2["cache_hit"] is True and info2["cache_file"] == str(path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, cached.state_dict()[key])

    path.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="chanprune.demo"):
        retrained, info3 = demo.train_digits_model(epochs=1, cache_dir=tmp_path, progress=False)
    assert info3["cache_hit"] is False
    assert "training it again" in caplog.text
    for key, value in model.state_dict().items():  # training is deterministic
        assert torch.equal(value, retrained.state_dict()[key])
    assert demo.train_digits_model(epochs=1, cache_dir=tmp_path, progress=False)[1]["cache_hit"]


def test_cache_key_depends_on_config(tmp_path):
    _, a = demo.train_digits_model(epochs=1, cache_dir=tmp_path, progress=False)
    _, b = demo.train_digits_model(epochs=1, seed=1, cache_dir=tmp_path, progress=False)
    assert a["cache_file"] != b["cache_file"]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert demo.default_cache_dir() == tmp_path / "chanprune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert demo.default_cache_dir() == tmp_path / ".cache" / "chanprune"


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"methods": ("magic",)}, ValueError, "magic"),
        ({"methods": ()}, ValueError, "at least one"),
        ({"methods": ("lasso", "lasso")}, ValueError, "twice"),
        ({"speedup": 1.0}, ValueError, "speedup"),
        ({"seed": -1}, ValueError, "seed"),
        ({"methods": 3}, TypeError, "methods"),
    ],
)
def test_run_demo_validates_before_working(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        demo.run_demo(tmp_path / "out", cache_dir=tmp_path / "cache", progress=False, **kwargs)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
