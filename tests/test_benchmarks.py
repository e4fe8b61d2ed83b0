"""Smoke tests of the benchmark scripts (``benchmarks/`` is not a package)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from _planted import load_script

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _load_script(name: str):
    return load_script(REPO / "benchmarks" / f"{name}.py")


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


def test_whole_model_report_from_json(tmp_path):
    """--report-only renders the table of a results JSON, marking missing cells."""
    vgg = _load_script("vgg_cifar")
    from _whole_model import key, write_report

    run = {
        "config": {"method": "lasso", "schedule": "uniform", "speedup": 2.0},
        "commit": "abc1234",
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
    assert "&dagger;" not in text
    # A run recorded without a commit (by the older code) is marked and explained.
    del run["commit"]
    write_report(vgg.BENCH, results, md)
    text = md.read_text()
    assert "| lasso | 0.8750 (-2.5) / 2.01x / 100 s / 2.0 GB &dagger; |" in text
    assert "&dagger; measured with the code before commit fc5012f" in text


@pytest.mark.parametrize("name", ["vgg_cifar", "resnet_cifar"])
def test_whole_model_scripts_help(name):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--speedups" in proc.stdout


# ---------------------------------------------------------------------------- peers.py
def _peers():
    return _load_script("peers")


@pytest.fixture(scope="module")
def peers():
    return _peers()


def _chain(widths):
    """conv(3->w0) -> BN -> ReLU -> conv(w0->w1) ... : a plain chain for MAC tests."""
    from torch import nn

    layers, c = [], 3
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)).eval()


@pytest.mark.parametrize("target", [1.5, 2.0, 4.0])
def test_peers_bisect_ratio_hits_mac_target(peers, target):
    """A stub pruner (uniform ratio, rounded channel counts) reaches the MAC target."""
    from chanprune.flops import count_macs

    full = (32, 64, 64, 128)
    macs0 = count_macs(_chain(full), (3, 16, 16))
    calls = []

    def speedup_at(ratio):
        calls.append(ratio)
        kept = [max(1, round(w * (1 - ratio))) for w in full]
        return macs0 / count_macs(_chain(kept), (3, 16, 16))

    found = peers.bisect_ratio(speedup_at, target, tol=0.02)
    assert abs(found["speedup"] / target - 1) <= 0.02
    assert found["speedup"] == pytest.approx(speedup_at(found["ratio"]))
    assert found["evals"] == len(calls) - 1 <= 30
    assert 0.0 < found["ratio"] < 0.95


def test_peers_bisect_ratio_refuses_unreachable_targets(peers):
    with pytest.raises(ValueError, match="only reaches"):
        peers.bisect_ratio(lambda r: 1.0 + r, 3.0)  # at most 1.95x
    with pytest.raises(ValueError, match="within"):  # a step from 1.5x straight to 3x
        peers.bisect_ratio(lambda r: 1.5 if r < 0.5 else 3.0, 2.0)
    with pytest.raises(ValueError, match="> 1"):
        peers.bisect_ratio(lambda r: 2.0, 1.0)
    found = peers.bisect_ratio(lambda r: 1.5 if r < 0.5 else 3.0, 2.0, strict=False)
    assert found["within_tol"] is False and found["speedup"] == 1.5  # closest, flagged


@pytest.mark.parametrize(("network", "name", "speedup"), [
    ("vgg", "vgg16_bn_cifar10", 2.0), ("resnet56", "resnet20_cifar10", 1.5),
])  # fmt: skip
def test_peers_planned_ratio_dict_gives_chanprune_widths(peers, network, name, speedup):
    """Where no single ratio fits, TP's per-layer ratios reproduce chanprune's plan exactly."""
    pytest.importorskip("torch_pruning")
    from chanprune.flops import count_macs
    from chanprune.models import get_model
    from chanprune.prune import plan_widths

    model = get_model(name).eval()
    widths, achieved = plan_widths(model, (3, 32, 32), speedup=speedup, schedule="uniform")
    macs0 = count_macs(model, (3, 32, 32), include_linear=True)
    ratios, planned = peers.planned_ratio_dict(network, model, speedup)
    assert planned == widths
    peers.tp_prune("l1", model, 0.0, peers.ignored_layers(network, model), ratios)
    assert macs0 / count_macs(model, (3, 32, 32), include_linear=True) == pytest.approx(achieved)
    for group, width in widths.items():  # each group is its producing layer's output
        layer = model.get_submodule(group)
        size = layer.out_channels if hasattr(layer, "out_channels") else layer.out_features
        assert size == width


def test_peers_reestimate_bn_matches_direct_batch_statistics(peers):
    """Running stats after one pass = mean / unbiased variance computed by hand."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.9),
        nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5),
    )  # fmt: skip
    bn1, bn2 = model[1], model[5]
    with torch.no_grad():
        for bn in (bn1, bn2):  # stale statistics and non-trivial affine parameters
            bn.running_mean.fill_(7.0), bn.running_var.fill_(9.0)
            bn.weight.uniform_(0.5, 2.0), bn.bias.uniform_(-1.0, 1.0)
    model.eval()
    x = torch.randn(8, 3, 9, 9) * 3 + 1

    # Two batches of 4: BN1's input does not depend on any BatchNorm.
    assert peers.reestimate_bn(model, x, batch_size=4) == 2
    with torch.no_grad():
        h1 = model[0](x)
    halves = (h1[:4], h1[4:])
    expected_mean = torch.stack([h.mean((0, 2, 3)) for h in halves]).mean(0)
    expected_var = torch.stack([h.var((0, 2, 3), unbiased=True) for h in halves]).mean(0)
    torch.testing.assert_close(bn1.running_mean, expected_mean)
    torch.testing.assert_close(h1.mean((0, 2, 3)), expected_mean)  # equal batches: exact mean
    torch.testing.assert_close(bn1.running_var, expected_var)
    assert not model.training and not any(m.training for m in model.modules())
    assert bn1.momentum == 0.1 and bn2.momentum == 0.1  # restored
    assert int(bn1.num_batches_tracked) == 2

    # One batch: BN2's input is the train-mode (batch-normalised) output of BN1, dropout off.
    peers.reestimate_bn(model, x, batch_size=8)
    with torch.no_grad():
        m, v = h1.mean((0, 2, 3)), h1.var((0, 2, 3), unbiased=False)
        z = (h1 - m[:, None, None]) / torch.sqrt(v[:, None, None] + bn1.eps)
        z = F.relu(z * bn1.weight[:, None, None] + bn1.bias[:, None, None])
        h2 = model[4](z)
    torch.testing.assert_close(bn1.running_var, h1.var((0, 2, 3), unbiased=True))
    torch.testing.assert_close(bn2.running_mean, h2.mean((0, 2, 3)))
    torch.testing.assert_close(bn2.running_var, h2.var((0, 2, 3), unbiased=True))


@pytest.mark.parametrize(
    ("network", "speedup", "sampler"),
    [
        ("vgg", 2.0, False),
        ("vgg", 4.0, False),
        pytest.param("resnet56", 1.5, False, marks=pytest.mark.slow),
        pytest.param("resnet56", 1.5, True, marks=pytest.mark.slow),
    ],
)
def test_peers_chanprune_architecture_has_the_recorded_macs(peers, network, speedup, sampler):
    """Rebuilding from a report's widths gives the MACs chanprune planned for them."""
    from chanprune.flops import count_macs
    from chanprune.models import get_model
    from chanprune.prune import plan_widths

    reference = get_model(peers.NETWORKS[network].model)
    widths, achieved = plan_widths(
        reference, (3, 32, 32), speedup=speedup, channel_sampler=sampler, schedule="uniform"
    )
    by_layer = peers.consumer_widths({"widths": widths, "planner": "graph"}, reference)
    macs0 = count_macs(reference, (3, 32, 32), include_linear=True)
    rebuilt = peers.chanprune_architecture(network, by_layer)
    assert macs0 / count_macs(rebuilt, (3, 32, 32), include_linear=True) == pytest.approx(achieved)
    empty = peers.chanprune_architecture(network, {})
    assert count_macs(empty, (3, 32, 32), include_linear=True) == macs0


@pytest.mark.slow
def test_peers_torch_pruning_matches_a_target_on_vgg(peers):
    """The real peer, bisected to 2x on an untrained VGG: the head stays unpruned."""
    pytest.importorskip("torch_pruning")
    import copy

    from chanprune.flops import count_macs
    from chanprune.models import get_model

    model = get_model("vgg16_bn_cifar10").eval()
    macs0 = count_macs(model, (3, 32, 32))

    def speedup_at(ratio):
        trial = copy.deepcopy(model)
        peers.tp_prune("l2", trial, ratio, peers.ignored_layers("vgg", trial))
        return macs0 / count_macs(trial, (3, 32, 32))

    found = peers.bisect_ratio(speedup_at, 2.0)
    assert abs(found["speedup"] / 2.0 - 1) <= 0.02
    pruned = peers.tp_prune("bn_scale", copy.deepcopy(model), found["ratio"],
                            peers.ignored_layers("vgg", model))  # fmt: skip
    assert [m.out_features for m in pruned.classifier if hasattr(m, "out_features")] == [
        512, 512, 10,
    ]  # fmt: skip
    widths = list(peers.conv_widths(pruned).values())
    assert widths[0] < 64 and widths[-1] < 512  # every conv output is pruned
    tp_macs, _ = peers.tp_count(pruned)
    assert tp_macs > count_macs(pruned, (3, 32, 32))  # TP also counts BN, ReLU, Linear


def test_peers_torch_pruning_on_resnet_scopes(peers):
    """Branch scope keeps the residual stream; TP as it comes breaks the option-A net."""
    pytest.importorskip("torch_pruning")
    import torch

    from chanprune.models import get_model

    model = get_model("resnet20_cifar10").eval()
    pruned = peers.tp_prune("l1", model, 0.5, peers.ignored_layers("resnet56", model))
    widths = peers.conv_widths(pruned)
    assert widths["conv1"] == 16 and widths["layer3.2.conv2"] == 64
    assert widths["layer1.0.conv1"] == 8 and widths["layer3.2.conv1"] == 32
    assert pruned(torch.zeros(2, 3, 32, 32)).shape == (2, 10)

    check = peers._default_scope_check("resnet56", get_model("resnet20_cifar10").eval(),
                                       torch.zeros(2, 3, 32, 32))  # fmt: skip
    assert check["runs"] is False and "RuntimeError" in check["error"]  # the pinned version
    assert check["widths"]["conv1"] < 16  # it pruned the residual stream


def test_peers_report_from_json(peers, tmp_path):
    """The section renders TP and chanprune cells, marks missing ones and is replaced in place."""
    base = {
        "accuracy": 0.9, "macs": 313196544, "tp_macs": 314959370, "tp_params": 15253578,
        "bn_accuracy": 0.89, "bn_time_s": 20.0, "calib_load_s": 2.0, "n_calib": 5000,
        "n_test": 10000,
    }  # fmt: skip
    run = {
        "pruner": "l1", "target": 2.0, "ratio": 0.2895, "bisect_evals": 12, "bisect_s": 9.0,
        "prune_s": 0.4, "macs": 156700000, "speedup": 1.9987, "tp_macs": 158000000,
        "tp_params": 7600000, "tp_speedup": 1.9934, "widths": {}, "accuracy": 0.35,
        "bn": {"accuracy": 0.8, "time_s": 15.0}, "n_test": 10000,
    }  # fmt: skip
    fallback = {
        **run, "target": 4.0, "matching": "chanprune widths", "ratio": None, "speedup": 4.0,
        "nearest_uniform": {"ratio": 0.4991, "speedup": 3.91, "rel_error": -0.0225},
    }  # fmt: skip
    results = {
        "machine": "test machine",
        "versions": {"torch_pruning": "9.9.9"},
        "networks": {
            "vgg": {
                "baseline": base,
                "runs": {"l1/2": run, "l1/4": fallback},
                "ignored_layers": ["classifier.0", "classifier.3", "classifier.6"],
            },
        },  # fmt: skip
    }
    chanprune = {
        "vgg": {
            "runs": {
                "lasso/uniform/2": {
                    "accuracy": 0.877,
                    "wall_time_s": 289.0,
                    "report": {
                        "speedup": 2.0,
                        "speedup_target": 2.0,
                        "macs_after": 313196544,
                        "options": {"widths": {}},
                    },
                },  # fmt: skip
            }
        },
        "resnet56": {"runs": {}},
    }
    md = tmp_path / "RESULTS.md"
    md.write_text("# title\n\nkept text\n")
    peers.write_report(results, md, chanprune)
    peers.write_report(results, md, chanprune)
    text = md.read_text()
    assert text.count("<!-- peers:start -->") == 1 and text.count("<!-- peers:end -->") == 1
    assert "kept text" in text and "Torch-Pruning (TP) 9.9.9" in text
    assert (
        "| TP magnitude L1 | 0.3500 (-55.0) / 2.00x / 0.4 s | 0.3500 (-55.0) / 4.00x† / 0.4 s |"
        in text
    )
    assert "| TP magnitude L1 + BN re-est. | 0.8000 (-10.0) / 2.00x / 0.4 + 15 s |" in text
    assert "4x: the nearest single ratio, 0.4991, gives 3.910x" in text
    assert "156.7M / 158.0M (1.99x); ratio 0.2895 | 156.7M / 158.0M (1.99x); chanprune's" in text
    assert "| TP magnitude L2 |" not in text
    assert "| chanprune lasso | 0.8770 (-2.3) / 2.00x / 289 s | not run |" in text
    assert "| chanprune greedy_ls | not run | not run |" in text
    assert "### ResNet-56" not in text  # neither library has a run there
    assert "+1,762,826" in text


def test_peers_read_chanprune_rereads_the_file(peers, tmp_path):
    assert peers.read_chanprune("vgg", tmp_path) == {"runs": {}}
    path = tmp_path / "vgg_cifar.json"
    path.write_text(json.dumps({"runs": {"lasso/uniform/2": {"accuracy": 0.5}}}))
    assert peers.read_chanprune("vgg", tmp_path)["runs"]["lasso/uniform/2"]["accuracy"] == 0.5
    path.write_text(json.dumps({"runs": {}}))
    assert peers.read_chanprune("vgg", tmp_path) == {"runs": {}}


def test_peers_help_and_missing_shared(peers, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        peers.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--networks", "--pruners", "--vgg-speedups", "--resnet56-speedups", "--tol",
                   "--n-calib", "--n-test", "--report-only", "--shared", "--out"):  # fmt: skip
        assert option in out
    code = peers.main(["--shared", str(tmp_path / "absent"), "--out", str(tmp_path / "p.json")])
    assert code == 2 and "absent" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_whole_model_accuracy_plot(tmp_path):
    """The accuracy-vs-speed-up plot is written and linked from the section."""
    vgg = _load_script("vgg_cifar")
    from _whole_model import key, markdown, plot_accuracy

    runs = {}
    for method, accs in (("lasso", (0.87, 0.81)), ("greedy_ls", (0.88, 0.84))):
        for speedup, acc in zip((2.0, 4.0), accs):
            runs[key(method, "uniform", speedup)] = {
                "config": {"method": method, "schedule": "uniform", "speedup": speedup},
                "accuracy": acc, "wall_time_s": 60.0, "peak_rss_mb": 1024.0,
                "report": {"speedup": speedup, "layers": []},
            }  # fmt: skip
    results = {"runs": runs}
    name = plot_accuracy(vgg.BENCH, results, tmp_path / "acc.png")
    assert name == "acc.png" and (tmp_path / "acc.png").read_bytes()[:4] == b"\x89PNG"
    with_base = dict(results, baseline={"accuracy": 0.9})  # drawn as a dashed line
    assert plot_accuracy(vgg.BENCH, with_base, tmp_path / "base.png") == "base.png"
    assert not list(tmp_path.glob("*.tmp.png"))  # written atomically
    results["plot"] = name
    assert "![accuracy vs speed-up](results/acc.png)" in markdown(vgg.BENCH, results)
    assert plot_accuracy(vgg.BENCH, {"runs": {}}, tmp_path / "none.png") is None


def _speed_results():
    run = lambda n, positions, wall, fwd: {  # noqa: E731
        "config": {"model": "vgg16_bn_cifar10", "device": "cpu", "n_images": n,
                   "positions": positions, "speedup": 2.0, "method": "lasso"},
        "wall_time_s": wall, "forward_pass_s": fwd, "load_s": 1.0, "peak_rss_mb": 2048.0,
        "speedup": 2.0,
    }  # fmt: skip
    raw = {
        "config": {"n_images": 500}, "rows": 5000, "raw_s": 2.5, "raw_rows_mb": 98.0,
        "raw_rel_error": 0.05, "stats_s": 2.0, "stats_mb": 180.0, "stats_rel_error": 0.04,
    }  # fmt: skip
    return {
        "runs": {"a": run(500, 10, 26.0, 2.0), "b": run(5000, 10, 77.0, 17.5),
                 "c": run(5000, 5, 65.0, 18.0)},
        "raw_layer": {"500": raw},
    }  # fmt: skip


def test_speed_report_and_plot(tmp_path):
    speed = _load_script("speed")
    results = _speed_results()
    results["plot"] = speed.plot(results, tmp_path / "speed.png")
    assert (tmp_path / "speed.png").read_bytes()[:4] == b"\x89PNG"
    text = speed.markdown(results)
    # prune / forward is computed from the two times, not stored
    assert "| cpu | vgg16_bn_cifar10 | 5000 | 10 | 77.0 | 17.5 | 4.4 | 1.0 | 2.00 | 2.00x |" in text
    assert "| 500 | 5000 | 2.5 | 98 | 0.0500 | 2.0 | 180 | 0.0400 |" in text
    assert "![wall time vs N](results/speed.png)" in text


def test_speed_rates_table_is_computed_from_the_module_times():
    speed = _load_script("speed")
    results = _speed_results()
    results["rates"] = {
        "config": {"model": "vgg16_bn_cifar10", "n_images": 100}, "commit": "abc1234",
        "gemm_gmacs_before": {"numpy": 88.6, "torch": 66.2},
        "gemm_gmacs_after": {"numpy": 87.4, "torch": 67.0}, "gemm_size": 4096,
        "pass_s": 3.0,
        "modules": [
            {"name": "features.0", "kind": "Conv2d", "seconds": 1.0, "macs": 2e9,
             "shape": [3, 64, 32, 32]},
            {"name": "features.1", "kind": "ReLU", "seconds": 0.25},
            {"name": "features.2", "kind": "Conv2d", "seconds": 1.5, "macs": 1.5e11,
             "shape": [64, 64, 16, 16]},
            {"name": "features.3", "kind": "ReLU", "seconds": 0.15},
            {"name": "head", "kind": "head", "seconds": 0.1},
        ],
    }  # fmt: skip
    text = speed.markdown(results)
    assert "| features.0 | 3 -> 64 | 32x32 | 1.00 | 2 |" in text
    assert "| features.2 | 64 -> 64 | 16x16 | 1.50 | 100 |" in text
    assert "| all ReLU | | | 0.40 | |" in text and "| all head | | | 0.10 | |" in text
    # convs: 2.5 s for 152 GMAC; the rest of the 3.0 s pass is 0.5 s
    assert "its convolutions 2.5 s for 0.15 TMAC (61 GMAC/s), every other module 0.5 s" in text
    assert "numpy (OpenBLAS) 89 / 87 GMAC/s, torch 66 / 67 GMAC/s" in text


def test_speed_end_to_end_row_is_the_median_run():
    speed = _load_script("speed")
    results = _speed_results()
    results["end_to_end"] = {
        "config": {"model": "vgg16_bn_cifar10", "speedup": 2.0, "method": "lasso",
                   "n_images": 5000},
        "commit": "abc1234",
        "repeats": [
            {"wall_time_s": w, "prune_time_s": p, "forward_pass_s": f}
            for w, p, f in [(70.0, 64.0, 25.0), (62.0, 57.0, 20.0), (66.0, 60.5, 22.0)]
        ],
    }  # fmt: skip
    text = speed.markdown(results)
    assert "`chanprune prune`, vgg16_bn_cifar10 at 2x, lasso, 5000 images" in text
    # the median run is the third (66 s); its own prune and forward times, 66 / 22 = 3.0
    assert "| 66.0 s (62.0-70.0) | 60.5 s | 22.0 s | 3.0 |" in text


def test_speed_module_times_counts_every_conv_mac():
    import torch

    from chanprune.flops import count_macs
    from chanprune.models import get_model

    speed = _load_script("speed")
    model = get_model("vgg16_bn_cifar10").eval()
    entries = speed.module_times(model, torch.randn(6, 3, 32, 32), batch_size=4)
    assert len(entries) == len(model.features) + 1 and entries[-1]["name"] == "head"
    assert sum(e.get("macs", 0) for e in entries) == 6 * count_macs(model, (3, 32, 32))
    assert all(e["seconds"] > 0 for e in entries)


def test_speed_report_only_and_help(tmp_path):
    out, md = tmp_path / "speed.json", tmp_path / "RESULTS.md"
    out.write_text(json.dumps(_speed_results()))
    md.write_text("# results\n\nother section\n")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
    args = [sys.executable, str(script), "--report-only", "--out", str(out),
            "--results-md", str(md)]  # fmt: skip
    assert subprocess.run(args, capture_output=True).returncode == 0
    text = md.read_text()
    assert "other section" in text and text.count("<!-- speed:start -->") == 1
    assert out.with_suffix(".png").exists()
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--n-images" in proc.stdout and "--raw-layer" in proc.stdout
    missing = subprocess.run(
        [sys.executable, str(script), "--shared", str(tmp_path / "nowhere"), "--out",
         str(tmp_path / "x.json"), "--results-md", str(md)], capture_output=True, text=True,
    )  # fmt: skip
    assert missing.returncode == 2 and "shared checkpoints" in missing.stderr


def test_latency_only_shares_networks_and_keeps_the_median_round(monkeypatch):
    """Runs with the same widths share one network; each network keeps the median of its
    rounds, and the rounds are interleaved (every network once, then again)."""
    vgg = _load_script("vgg_cifar")
    import _whole_model

    import chanprune.flops

    widths_a = {"features.3": 32}
    widths_b = {"features.3": 16}
    runs = {
        name: {"report": {"options": {"widths": w}}}
        for name, w in (("lasso/a", widths_a), ("first_k/a", widths_a), ("lasso/b", widths_b))
    }
    results = {"runs": runs}
    calls = []

    def fake_latency(model, input_shape, batch_size):
        calls.append((model.features[0].out_channels, batch_size))
        # The second round is slow for everyone: the median must ignore it.
        round_ = sum(1 for c in calls if c == calls[-1]) - 1
        return {"median_ms": float(model.features[0].out_channels + (100 if round_ == 1 else 0))}

    monkeypatch.setattr(chanprune.flops, "measure_latency", fake_latency)
    _whole_model.remeasure_latency(vgg.BENCH, results, rounds=3)
    # 3 networks (unpruned, a, b) x 2 batch sizes x 3 rounds, one network after another.
    assert len(calls) == 18
    assert [c[0] for c in calls[:6]] == [64, 64, 32, 32, 16, 16]
    assert calls[6:12] == calls[:6]
    assert results["baseline"]["latency_ms"] == {"cpu_b1": 64.0, "cpu_b64": 64.0}
    assert results["baseline"]["latency_rounds"] == 3
    assert runs["lasso/a"]["latency_ms"] == runs["first_k/a"]["latency_ms"] == {
        "cpu_b1": 32.0, "cpu_b64": 32.0,
    }  # fmt: skip
    assert runs["lasso/b"]["latency_ms"]["cpu_b64"] == 16.0


# ---------------------------------------------------------------------------- latency.py
def _latency_results(times: dict, macs: dict, base: str) -> dict:
    """A latency.py results dict from fixed per-round times, without timing anything."""
    return {
        label: {
            "base": base,
            "macs": macs[label],
            "mac_speedup": macs[base] / macs[label],
            "times_ms": {rt: {str(b): list(v) for b, v in by_b.items()} for rt, by_b in t.items()},
        }
        for label, t in times.items()
    }


def test_latency_speedups_flags_and_table_from_fixed_times():
    lat = _load_script("latency")
    times = {
        "net": {"torch": {1: [10, 12, 11], 64: [400]}, "ort": {1: [8, 8, 9], 64: [300]}},
        # ORT b1: 8 / 4 = 2.0x against 2.0x in MACs (not flagged); b64: 300 / 200 = 1.5x
        # against 2.0x (25% off: flagged). PyTorch b1: 11 / 5.5 = 2.0x.
        "net 2x": {"torch": {1: [5, 6, 5.5], 64: [190]}, "ort": {1: [4, 4, 5], 64: [200]}},
    }
    results = _latency_results(times, {"net": 2e6, "net 2x": 1e6}, "net")
    assert lat.speedup(results, "net 2x", "torch", 1) == pytest.approx(2.0)
    assert lat.speedup(results, "net 2x", "ort", 64) == pytest.approx(1.5)
    assert lat.flagged(results) == [("net 2x", 64)]
    rows = lat.table(results)
    assert rows[0].startswith("| network | conv MMACs | MAC speed-up | PyTorch b1 ms")
    assert rows[2].split(" | ")[:4] == ["| net", "2.0", "1.00x", "11.00 (10.00-12.00)"]
    assert rows[3] == (
        "| net 2x | 1.0 | 2.00x | 5.50 (5.00-6.00) | 2.00x | 4.00 (4.00-5.00) | 2.00x "
        "| 190.00 (190.00-190.00) | 2.11x | 200.00 (200.00-200.00) | 1.50x |"
    )
    (line,) = lat.profile_lines(results, {})
    assert "net 2x, batch 64" in line and "1.50x vs 2.00x" in line and "not yet profiled" in line


def test_latency_run_and_report_on_a_tiny_model(tmp_path):
    """The whole measuring and reporting code on two tiny VGGs, without ../shared."""
    pytest.importorskip("onnxruntime")
    import argparse

    import numpy as np
    import torch
    from _planted import conv_macs_by_hooks

    from chanprune.models import vgg_digits

    lat = _load_script("latency")
    torch.manual_seed(0)
    nets = {
        "tiny": {"model": vgg_digits().eval(), "base": "tiny"},
        "tiny narrow": {"model": vgg_digits(widths=[8, 8, 16, 16, 32, 32]).eval(), "base": "tiny"},
    }
    args = argparse.Namespace(
        rounds=2, warmup=1, repeat=2, threads=1, profile_runs=1, n_images=10, seed=0
    )
    data = lat.run(nets, args, "python benchmarks/latency.py --test", input_shape=(1, 8, 8))
    out, md = tmp_path / "results" / "latency.json", tmp_path / "RESULTS.md"
    md.write_text("# title\n\nkept text\n")
    lines = []
    lat.report(data, out, md, log=lines.append)
    lat.report(data, out, md, log=lambda _: None)  # replaces its section, no duplicate

    saved = json.loads(out.read_text())
    assert saved["command"] == "python benchmarks/latency.py --test"
    results = saved["results"]
    assert list(results) == ["tiny", "tiny narrow"]
    expected = conv_macs_by_hooks(nets["tiny"]["model"], (1, 8, 8)) / conv_macs_by_hooks(
        nets["tiny narrow"]["model"], (1, 8, 8)
    )
    assert results["tiny narrow"]["mac_speedup"] == pytest.approx(expected)
    assert results["tiny"]["mac_speedup"] == 1.0
    for r in results.values():
        assert 0 <= r["onnx_max_abs_diff"] <= 1e-4 * r["onnx_scale"]
        for runtime in ("torch", "ort"):
            for b in ("1", "64"):
                assert len(r["times_ms"][runtime][b]) == 2
                assert all(t > 0 for t in r["times_ms"][runtime][b])
    ort_b64 = [np.median(results[k]["times_ms"]["ort"]["64"]) for k in ("tiny", "tiny narrow")]
    assert lat.speedup(results, "tiny narrow", "ort", 64) == pytest.approx(ort_b64[0] / ort_b64[1])
    for label, b in lat.flagged(results):  # each flagged row is profiled, with its original
        for key in (f"{label}@b{b}", f"tiny@b{b}"):
            profile = saved["profiles"][key]
            assert profile["node_ms_per_run"] > 0
            assert sum(profile["op_share"].values()) == pytest.approx(1.0)
            assert "Conv" in profile["op_share"]

    printed = "\n".join(lines)
    assert "| tiny narrow |" in printed
    text = md.read_text()
    assert text.startswith("# title") and "kept text" in text
    assert text.count("<!-- latency:start -->") == text.count("<!-- latency:end -->") == 1
    assert "\n".join(lat.table(results)) in text


def test_latency_help_and_missing_shared(tmp_path, capsys):
    lat = _load_script("latency")
    with pytest.raises(SystemExit) as exc:
        lat.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--n-images", "--rounds", "--repeat", "--threads", "--results-md"):
        assert option in out
    pytest.importorskip("onnxruntime")
    assert lat.main(["--shared", str(tmp_path / "absent"), "--out", str(tmp_path / "l.json")]) == 2
    assert "absent" in capsys.readouterr().err
    assert not (tmp_path / "l.json").exists()
    assert lat.main(["--report-only", "--out", str(tmp_path / "l.json")]) == 2


def test_zoo_table_from_results():
    zoo = _load_script("zoo")
    results = {
        "meta": {"command": "python benchmarks/zoo.py", "commit": "abc", "n_images": 8,
                 "speedup": 2.0},
        "models": {
            "net_a": {
                "chanprune": {"groups": 14, "kept_whole": 1, "consumers": 14, "speedup": 2.0004,
                              "mean_rel_error": 0.0015, "mean_rel_error_heldout": 0.03,
                              "time_s": 8.8, "output_shape_kept": True},
                "torch_pruning": {"runs": True, "speedup": 1.9971, "output_shape_kept": True,
                                  "time_s": 3.0},
            },
            "net_b": {
                "chanprune": {"error": "ValueError: no prunable channel group"},
                "torch_pruning": {"runs": False, "error": "RuntimeError: shapes"},
            },
        },
    }  # fmt: skip
    table = zoo.markdown(results)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if "| net_" in line}
    assert "| 14 | 1 | 2.000x | 0.0015 / 0.0300 | 8.8 | yes | 1.997x | yes |" in rows["net_a"]
    assert "fails: ValueError: no prunable channel group" in rows["net_b"]
    assert "no: RuntimeError: shapes" in rows["net_b"]
    assert table.startswith("<!-- zoo:start -->") and table.endswith("<!-- zoo:end -->")


def test_latency_zoo_section_is_its_own(tmp_path):
    """A --zoo run (other batches, its own marker) leaves the shared networks' section."""
    pytest.importorskip("onnxruntime")
    import argparse

    import torch

    from chanprune.models import vgg_digits

    lat = _load_script("latency")
    torch.manual_seed(0)
    nets = {
        "tiny": {"model": vgg_digits().eval(), "base": "tiny"},
        "tiny 2x": {"model": vgg_digits(widths=[8, 8, 16, 16, 32, 32]).eval(), "base": "tiny"},
    }
    args = argparse.Namespace(rounds=1, warmup=1, repeat=1, threads=1, profile_runs=0,
                              n_images=4, seed=0, zoo=["tiny"])  # fmt: skip
    data = lat.run(nets, args, "python benchmarks/latency.py --zoo tiny", input_shape=(1, 8, 8),
                   batches=(1, 2))  # fmt: skip
    md = tmp_path / "RESULTS.md"
    md.write_text("<!-- latency:start -->\nshared rows\n<!-- latency:end -->\n")
    lat.report(data, tmp_path / "z.json", md, log=lambda _: None)
    text = md.read_text()
    assert "shared rows" in text
    assert text.count("<!-- latency_zoo:start -->") == 1
    assert "| tiny 2x |" in text and "ORT b2 ms" in text and "b64" not in text
