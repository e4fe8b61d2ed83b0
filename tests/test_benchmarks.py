"""Smoke tests of the benchmark scripts (``benchmarks/`` is not a package)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _load_script(name: str):
    path = REPO / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


@pytest.fixture(scope="module")
def layer_error():
    return _load_script("layer_error")


def test_layer_error_help_exits_zero(layer_error, capsys):
    with pytest.raises(SystemExit) as exc:
        layer_error.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--n-images", "--n-heldout", "--layers", "--out-dir", "--report-only"):
        assert option in out


def test_layer_error_missing_shared_exits_2(layer_error, tmp_path, capsys):
    code = layer_error.main(
        ["--shared-dir", str(tmp_path / "absent"), "--out-dir", str(tmp_path), "--quiet"]
    )
    assert code == 2
    assert "absent" in capsys.readouterr().err
    assert not (tmp_path / "layer_error.json").exists()


@pytest.mark.shared
def test_layer_error_smoke(layer_error, shared_dir, tmp_path):
    md = tmp_path / "RESULTS.md"
    argv = [
        "--shared-dir", str(shared_dir), "--n-images", "20", "--n-heldout", "10",
        "--layers", "conv2_1", "--ratios", "0.5", "--methods", "lasso", "first_k",
        "--out-dir", str(tmp_path), "--results-md", str(md), "--quiet",
    ]  # fmt: skip
    assert layer_error.main(argv) == 0

    data = json.loads((tmp_path / "layer_error.json").read_text())
    assert {"config", "layers", "results", "timing_s"} <= set(data)
    cfg = data["config"]
    for key in ("command", "n_images", "n_heldout", "positions", "seed", "versions", "machine"):
        assert key in cfg
    assert cfg["n_images"] == 20 and cfg["positions"] == 10
    assert {"torch", "numpy", "sklearn"} <= set(cfg["versions"])
    assert data["layers"]["conv2_1"]["in_channels"] == 64
    assert data["layers"]["conv2_1"]["rel_error_all_channels"] < 1e-6  # BN folded right
    results = data["results"]
    assert {(r["method"], r["ratio"], r["keep"]) for r in results} == {
        ("lasso", 0.5, 32),
        ("first_k", 0.5, 32),
    }
    for r in results:
        for key in ("rel_error_no_refit", "rel_error_refit", "rel_error_heldout", "time_s"):
            assert 0.0 <= r[key] < math.inf, (key, r[key])
        assert r["rel_error_refit"] <= r["rel_error_no_refit"] + 1e-9

    assert (tmp_path / "layer_error.png").stat().st_size > 0
    text = md.read_text()
    assert text.startswith("# chanprune benchmark results")
    assert text.count("<!-- layer_error:start -->") == 1

    # --report-only rebuilds the section in place (no duplicate) from the JSON.
    md.write_text(text + "\n## other section\n")
    argv_report = ["--report-only", "--out-dir", str(tmp_path), "--results-md", str(md)]
    assert layer_error.main([*argv_report, "--quiet"]) == 0
    text = md.read_text()
    assert text.count("<!-- layer_error:start -->") == 1
    assert text.count("<!-- layer_error:end -->") == 1
    assert "## other section" in text


def _load_script(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_whole_model_report_from_json(tmp_path):
    """--report-only renders the table of a results JSON, marking missing cells."""
    vgg = _load_script("vgg_cifar")
    from _whole_model import key, write_report

    run = {
        "config": {"method": "lasso", "schedule": "uniform", "speedup": 2.0},
        "accuracy": 0.875,
        "wall_time_s": 100.0,
        "peak_rss_mb": 2048.0,
        "report": {"speedup": 2.01, "layers": []},
    }
    results = {
        "baseline": {
            "accuracy": 0.9, "macs": 313e6, "forward_pass_s": 27.0, "calib_load_s": 5.0,
            "n_images": 5000,
        },
        "runs": {key("lasso", "uniform", 2.0): run},
    }  # fmt: skip
    md = tmp_path / "RESULTS.md"
    md.write_text("# title\n\nkept text\n")
    write_report(vgg.BENCH, results, md)
    write_report(vgg.BENCH, results, md)  # replaces its section, does not duplicate it
    text = md.read_text()
    assert text.count("<!-- vgg_cifar:start -->") == 1 and "kept text" in text
    assert "| lasso | 0.8750 (-2.5) / 2.01x / 100 s / 2.0 GB |" in text


@pytest.mark.parametrize("name", ["vgg_cifar", "resnet_cifar"])
def test_whole_model_scripts_help(name):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--speedups" in proc.stdout
