"""Tests of the command line, through chanprune.cli.main(argv)."""

from __future__ import annotations

import argparse
import errno
import json
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _planted import run_cli
from PIL import Image

import chanprune.cli as cli
import chanprune.io as cio
from chanprune.flops import count_macs
from chanprune.models import CifarResNet, list_models, vgg_digits
from chanprune.prune import MODEL_METHODS
from chanprune.surgery import SampledConv2d

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

#: Every option of every command, as the tests expect the help to list them.
OPTIONS = {
    None: ["--help", "--version"],
    "prune": [
        "--help", "--model", "--weights", "--preset", "--calib", "--speedup", "--widths",
        "--method", "--schedule", "--channel-sampler", "--planner", "--channel-multiple",
        "--n-images", "--positions", "--holdout", "--recover-epochs", "--recover-lr",
        "--dist-timeout",
        "--ridge", "--batch-size", "--device", "--max-cache-mb", "--seed", "--out", "--report",
        "--quiet", "--verbose",
    ],
    "eval": [
        "--help", "--model", "--weights", "--preset", "--data", "--n-images", "--seed",
        "--batch-size", "--device", "--json", "--quiet", "--verbose",
    ],
    "info": ["--help", "--model", "--weights", "--preset", "--input-size", "--verbose"],
    "demo": [
        "--help", "--out-dir", "--cache-dir", "--methods", "--speedup", "--seed", "--quiet",
        "--verbose",
    ],
}  # fmt: skip


# The networks here are tiny: extra threads only oversubscribe a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


run = run_cli  # main(argv) -> (exit code, stdout, stderr)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An untrained vgg_digits saved with chanprune.save and 40 8x8 grey PNGs in 10 classes."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cio.save(vgg_digits(), root / "saved.pt")
    digits = load_digits()
    calib = root / "calib"
    for label in range(10):
        folder = calib / str(label)
        folder.mkdir(parents=True)
        for i in np.flatnonzero(digits.target == label)[:4]:
            pixels = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
    return root


def _prune_argv(tiny, out_dir, *extra):
    return [
        "prune", "--model", tiny / "saved.pt", "--calib", tiny / "calib", "--preset", "digits",
        "--out", out_dir / "out.pt", *extra,
    ]  # fmt: skip


# ---------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", list(OPTIONS))
def test_help_exits_0_and_explains_every_option(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    code, out, _ = run(argv, capsys)
    assert code == 0
    for option in OPTIONS[command]:
        assert option in out, f"{option} missing from the help of {command}"
    parser = cli.build_parser()
    sub = parser if command is None else _subparsers(parser)[command]
    options = [a for a in sub._actions if a.option_strings]
    assert all(a.help and a.help != argparse.SUPPRESS for a in options)
    long_names = {s for a in options for s in a.option_strings if s.startswith("--")}
    assert long_names == set(OPTIONS[command])  # the list above is complete


def test_help_lists_every_exit_code(capsys):
    _, out, _ = run(["--help"], capsys)
    flat = " ".join(out.split())
    for text in ("0 success", "2 bad usage", "1 an output could not be written", "130 interrupted"):
        assert text in flat


def test_help_states_defaults(capsys):
    _, out, _ = run(["prune", "--help"], capsys)
    flat = " ".join(out.split())
    for text in ("(default: 5000)", "(default: 10)", "(default: 0.1)", "(default: greedy_ls)"):
        assert text in flat
    for method in MODEL_METHODS:
        assert method in flat


def test_no_command_is_a_usage_error(capsys):
    code, _, err = run([], capsys)
    assert code == 2
    assert "COMMAND" in err or "command" in err


def test_python_dash_m_runs_the_cli(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["chanprune", "--version"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("chanprune", run_name="__main__", alter_sys=False)
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("chanprune ")


def test_console_main_exits_with_the_code_of_main_after_freezing_the_gc(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "main", lambda: calls.append("main") or 3)
    monkeypatch.setattr(cli.gc, "freeze", lambda: calls.append("freeze"))
    with pytest.raises(SystemExit) as exc:
        cli.console_main()
    assert exc.value.code == 3
    assert calls == ["main", "freeze"]  # frozen only once every output is written


def test_console_script_entry_point_is_console_main():
    from _planted import pyproject

    project = pyproject()
    assert project["project"]["scripts"]["chanprune"] == "chanprune.cli:console_main"


# ---------------------------------------------------------------------------- prune
def test_prune_end_to_end(tiny, tmp_path, capsys):
    argv = _prune_argv(tiny, tmp_path, "--speedup", 1.5, "--report", tmp_path / "r.json")
    code, out, err = run([*argv, "--quiet"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt", "r.json"]
    model = cio.load(tmp_path / "out.pt")
    report = json.loads((tmp_path / "r.json").read_text())
    assert abs(report["speedup"] / 1.5 - 1) < 0.02
    assert report["method"] == "greedy_ls" and report["schedule"] == "energy"  # auto: a chain
    assert "VGG-style chain" in report["options"]["schedule_reason"]
    assert report["n_images"] + report["n_heldout"] == 40
    # The default (graph) planner counts the linear layers' MACs too.
    assert report["options"]["planner"] == "graph"
    assert count_macs(model, (1, 8, 8), include_linear=True) == report["macs_after"]
    assert "|---|" not in out  # --quiet: no table
    assert "out.pt" in out


def test_prune_prints_table_and_honours_options(tiny, tmp_path, capsys):
    argv = _prune_argv(tiny, tmp_path, "--speedup", 2, "--method", "first_k", "--holdout", 0)
    code, out, err = run(
        [*argv, "--n-images", 30, "--positions", 4, "--seed", 3, "--max-cache-mb", 0], capsys
    )
    assert code == 0, err
    assert "| features.3 |" in out and "first_k" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]


def test_prune_energy_schedule(tiny, tmp_path, capsys):
    report = tmp_path / "report.json"
    argv = _prune_argv(tiny, tmp_path, "--speedup", 1.5, "--schedule", "energy")
    code, _, err = run([*argv, "--report", report, "--quiet"], capsys)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["schedule"] == "energy" and abs(data["speedup"] / 1.5 - 1) <= 0.02


def test_prune_sensitivity_schedule_with_recovery(tiny, tmp_path, capsys):
    report = tmp_path / "report.json"
    argv = _prune_argv(tiny, tmp_path, "--speedup", 1.5, "--schedule", "sensitivity")
    code, _, err = run([*argv, "--recover-epochs", 1, "--report", report, "--quiet"], capsys)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["schedule"] == "sensitivity" and abs(data["speedup"] / 1.5 - 1) <= 0.02
    assert [r["epoch"] for r in data["recovery"]] == [0, 1]
    code, _, err = run([*argv, "--recover-epochs", -1], capsys)
    assert code == 2 and "--recover-epochs must be an integer >= 0" in err
    code, _, err = run([*argv, "--planner", "names"], capsys)  # the name-based one is gone
    assert code == 2 and "--planner 'names' is gone" in err and "'<layer>:in'" in err


def test_prune_with_explicit_widths(tiny, tmp_path, capsys):
    widths = tmp_path / "widths.json"
    # By the layer that reads a group, or by the group (conv3's output, which conv4 reads).
    widths.write_text(json.dumps({"features.3:in": 8, "features.7": 0.5}))
    code, _, err = run(_prune_argv(tiny, tmp_path, "--widths", widths, "--quiet"), capsys)
    assert code == 0, err
    cfg = cio.load(tmp_path / "out.pt").arch_config()["cfg"]
    assert cfg == [8, 16, "M", 16, 32, "M", 64, 64]


def _make_corrupt(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"PK\x03\x04 definitely not a torch checkpoint" * 20)
    return path


def _bad_prune_cases():
    # (id, argv builder(tiny, tmp_path) -> argv, expected text in stderr)
    return [
        ("speedup-below-1", lambda t, d: _prune_argv(t, d, "--speedup", 0.9), "--speedup"),
        ("speedup-1", lambda t, d: _prune_argv(t, d, "--speedup", 1), "--speedup"),
        ("speedup-unreachable", lambda t, d: _prune_argv(t, d, "--speedup", 1000), "reach"),
        ("no-target", lambda t, d: _prune_argv(t, d), "--speedup"),
        (
            "calib-missing",
            lambda t, d: [
                "prune", "--model", t / "saved.pt", "--calib", d / "nope", "--preset", "digits",
                "--speedup", 1.5, "--out", d / "out.pt",
            ],
            "nope",
        ),
        (
            "calib-empty",
            lambda t, d: [
                "prune", "--model", t / "saved.pt", "--calib", (d / "empty").mkdir() or d / "empty",
                "--preset", "digits", "--speedup", 1.5, "--out", d / "out.pt",
            ],
            "No image files",
        ),
        (
            "unknown-model",
            lambda t, d: [
                "prune", "--model", "vgg17", "--calib", t / "calib", "--speedup", 1.5,
                "--out", d / "out.pt",
            ],
            "vgg_digits",
        ),
        (
            "corrupt-model-file",
            lambda t, d: [
                "prune", "--model", _make_corrupt(d), "--calib", t / "calib", "--preset",
                "digits", "--speedup", 1.5, "--out", d / "out.pt",
            ],
            "corrupt.pt",
        ),
        (
            "corrupt-weights",
            lambda t, d: [
                "prune", "--model", "vgg_digits", "--weights", _make_corrupt(d), "--calib",
                t / "calib", "--speedup", 1.5, "--out", d / "out.pt",
            ],
            "corrupt.pt",
        ),
        (
            "weights-not-matching",
            lambda t, d: [
                "prune", "--model", "vgg16_bn_cifar10", "--weights", t / "saved.pt",
                "--calib", t / "calib", "--speedup", 1.5, "--out", d / "out.pt",
            ],
            "does not match",
        ),
        ("weights-with-file", lambda t, d: _prune_argv(t, d, "--weights", t / "saved.pt",
                                                       "--speedup", 1.5), "--weights"),
        ("wrong-preset", lambda t, d: [
            "prune", "--model", t / "saved.pt", "--calib", t / "calib", "--preset", "cifar",
            "--speedup", 1.5, "--out", d / "out.pt",
        ], "shape"),
        # ResNets are supported; one fed the 1-channel digits preset is refused up front.
        ("resnet-wrong-preset", lambda t, d: [
            "prune", "--model", "resnet20_cifar10", "--calib", t / "calib", "--preset", "digits",
            "--speedup", 1.5, "--out", d / "out.pt",
        ], "does not accept inputs of shape (1, 8, 8)"),
        ("sampler-on-vgg", lambda t, d: _prune_argv(t, d, "--speedup", 1.5, "--channel-sampler"),
         "no conv of this network reads one"),
        ("speedup-and-widths", lambda t, d: _prune_argv(
            t, d, "--speedup", 1.5, "--widths", t / "saved.pt"), "exclusive"),
        ("widths-not-json", lambda t, d: _prune_argv(t, d, "--widths", t / "saved.pt"), "JSON"),
        ("holdout-too-big", lambda t, d: _prune_argv(t, d, "--speedup", 1.5, "--holdout", 0.9),
         "--holdout"),
        ("n-images-0", lambda t, d: _prune_argv(t, d, "--speedup", 1.5, "--n-images", 0),
         "--n-images"),
        ("negative-cache", lambda t, d: _prune_argv(t, d, "--speedup", 1.5, "--max-cache-mb",
                                                    -5), "--max-cache-mb"),
        ("bad-device", lambda t, d: _prune_argv(t, d, "--speedup", 1.5, "--device", "gpu0"),
         "--device"),
        ("out-is-a-directory", lambda t, d: [
            "prune", "--model", t / "saved.pt", "--calib", t / "calib", "--preset", "digits",
            "--speedup", 1.5, "--out", d,
        ], "directory"),
        ("out-equals-report", lambda t, d: _prune_argv(
            t, d, "--speedup", 1.5, "--report", d / "out.pt"), "same file"),
        ("widths-is-a-directory", lambda t, d: _prune_argv(
            t, d, "--widths", (d / "wj").mkdir() or d / "wj"), "wj' is a directory"),
        ("seed-too-big", lambda t, d: _prune_argv(t, d, "--speedup", 1.5, "--seed", 2**64),
         "--seed must be an integer >= 0 and < 2**63"),
    ]  # fmt: skip


@pytest.mark.parametrize("builder,expected", [c[1:] for c in _bad_prune_cases()],
                         ids=[c[0] for c in _bad_prune_cases()])  # fmt: skip
def test_prune_bad_input_exits_2_and_writes_nothing(tiny, tmp_path, capsys, builder, expected):
    argv = builder(tiny, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run([*argv, "--quiet"], capsys)
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith("chanprune: error:")
    assert expected in err
    assert "Traceback" not in err
    assert not (tmp_path / "out.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nor any temporary file


def _same_file_argv(tiny: Path, d: Path, case: str) -> list:
    model, weights, widths = d / "m.pt", d / "w.pt", d / "widths.json"
    by_name = ["prune", "--model", "vgg_digits", "--weights", weights, "--calib", tiny / "calib"]
    by_file = ["prune", "--model", model, "--calib", tiny / "calib", "--preset", "digits"]
    return {
        "out-is-weights": [*by_name, "--speedup", 1.5, "--out", weights],
        "out-is-weights-through-dotdot": [
            *by_name, "--speedup", 1.5, "--out", d / ".." / d.name / "w.pt",
        ],
        "out-is-weights-through-symlink": [*by_name, "--speedup", 1.5, "--out", d / "link.pt"],
        "out-is-weights-through-hard-link": [*by_name, "--speedup", 1.5, "--out", d / "hard.pt"],
        "report-is-model": [*by_file, "--speedup", 1.5, "--out", d / "o.pt", "--report", model],
        "out-is-widths": [*by_file, "--widths", widths, "--out", widths],
        "json-is-model": [
            "eval", "--model", model, "--data", tiny / "calib", "--preset", "digits",
            "--json", model,
        ],
        "json-is-weights": [
            "eval", "--model", "vgg_digits", "--weights", weights, "--data", tiny / "calib",
            "--json", d / "link.pt",
        ],
    }[case]  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [
        "out-is-weights",
        "out-is-weights-through-dotdot",
        "out-is-weights-through-symlink",
        "out-is-weights-through-hard-link",
        "report-is-model",
        "out-is-widths",
        "json-is-model",
        "json-is-weights",
    ],
)
def test_output_naming_an_input_is_refused_before_any_work(
    tiny, tmp_path, capsys, monkeypatch, case
):
    saved = (tiny / "saved.pt").read_bytes()  # a model file; its state_dict loads as weights
    (tmp_path / "m.pt").write_bytes(saved)
    (tmp_path / "w.pt").write_bytes(saved)
    (tmp_path / "widths.json").write_text(json.dumps({"features.3": 8}))
    (tmp_path / "link.pt").symlink_to(tmp_path / "w.pt")
    os.link(tmp_path / "w.pt", tmp_path / "hard.pt")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def too_late(*args, **kwargs):
        raise AssertionError("the model was loaded: the check came too late")

    monkeypatch.setattr(cli, "_resolve_model", too_late)
    code, _, err = run([*_same_file_argv(tiny, tmp_path, case), "--quiet"], capsys)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "names the same file as the input" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_images_of_different_sizes_exit_2_naming_the_file(tiny, tmp_path, capsys):
    calib = tmp_path / "calib"
    for folder in (tiny / "calib").iterdir():
        (calib / folder.name).mkdir(parents=True)
        for image in folder.iterdir():
            (calib / folder.name / image.name).write_bytes(image.read_bytes())
    Image.new("L", (12, 10)).save(calib / "3" / "odd.png")
    argv = ["prune", "--model", tiny / "saved.pt", "--calib", calib, "--preset", "digits"]
    for command in (
        [*argv, "--speedup", 1.5, "--out", tmp_path / "o.pt"],
        ["eval", "--model", tiny / "saved.pt", "--data", calib, "--preset", "digits"],
    ):
        code, _, err = run([*command, "--quiet"], capsys)
        assert code == 2, err
        assert "Traceback" not in err
        assert "different sizes" in err and "(1, 10, 12)" in err and "(1, 8, 8)" in err
        assert "odd.png" in err and "--preset imagenet" in err
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("classes", [["apple", "zebra"], ["3"], [*map(str, range(10)), "x"]])
def test_eval_class_folders_must_match_the_model_outputs(tiny, tmp_path, capsys, classes):
    image = next((tiny / "calib" / "0").iterdir()).read_bytes()
    for name in classes:
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "0.png").write_bytes(image)
    argv = ["eval", "--model", tiny / "saved.pt", "--data", tmp_path / "data", "--preset", "digits"]
    code, out, err = run([*argv, "--quiet"], capsys)
    assert code == 2, err
    assert "accuracy" not in out and "Traceback" not in err
    assert f"has {len(classes)} class folder(s)" in err and "has 10 outputs" in err
    assert "sorted folder names" in err


def test_eval_refuses_inputs_the_model_does_not_accept(tiny, capsys):
    argv = ["eval", "--model", "resnet20_cifar10", "--data", tiny / "calib", "--preset", "digits"]
    code, _, err = run([*argv, "--quiet"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "the model does not accept inputs of shape (1, 8, 8)" in err


@pytest.mark.parametrize("seed", [-1, 2**63, 18446744073709551616])
@pytest.mark.parametrize("command", ["prune", "eval", "demo"])
def test_seed_out_of_range_exits_2_naming_the_option(tiny, tmp_path, capsys, command, seed):
    argv = {
        "prune": _prune_argv(tiny, tmp_path, "--speedup", 1.5),
        "eval": ["eval", "--model", tiny / "saved.pt", "--data", tiny / "calib"],
        "demo": ["demo", "--out-dir", tmp_path / "demo", "--cache-dir", tmp_path / "cache"],
    }[command]
    code, _, err = run([*argv, "--seed", seed, "--quiet"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "--seed must be an integer >= 0 and < 2**63" in err
    assert list(tmp_path.iterdir()) == []


def test_largest_seed_is_accepted(tiny, capsys):
    argv = ["eval", "--model", tiny / "saved.pt", "--data", tiny / "calib", "--n-images", 20]
    code, out, err = run([*argv, "--seed", 2**63 - 1, "--quiet"], capsys)
    assert code == 0, err
    assert "/20 images" in out


@pytest.mark.parametrize("option", ["--out-dir", "--cache-dir"])
def test_demo_folder_that_is_a_file_exits_2(tmp_path, capsys, option):
    (tmp_path / "text.txt").write_text("not a folder")
    for folder in (tmp_path / "text.txt", tmp_path / "text.txt" / "sub"):
        argv = ["demo", "--out-dir", tmp_path / "demo", option, folder, "--quiet"]
        code, _, err = run(argv, capsys)
        assert code == 2 and "Traceback" not in err
        assert option in err and "not a directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt"]


def test_model_file_of_pickled_objects_is_refused_in_one_clean_line(tiny, tmp_path, capsys):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pt")
    code, _, err = run(["info", "--model", tmp_path / "whole.pt"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "holds pickled Python objects" in err and "Linear" in err
    assert "\x1b" not in err
    argv = ["prune", "--model", "vgg_digits", "--weights", tmp_path / "whole.pt"]
    argv += ["--calib", tiny / "calib", "--speedup", 1.5, "--out", tmp_path / "o.pt"]
    code, _, err = run(argv, capsys)
    assert code == 2 and "whole.pt" in err and "\x1b" not in err


def test_prune_resnet_with_channel_sampler(tmp_path, capsys):
    torch.manual_seed(0)
    cio.save(CifarResNet(8), tmp_path / "resnet8.pt")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "rgb" / label).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels, mode="RGB").save(tmp_path / "rgb" / label / f"{i}.png")
    argv = [
        "prune", "--model", tmp_path / "resnet8.pt", "--calib", tmp_path / "rgb", "--speedup",
        1.3, "--channel-sampler", "--out", tmp_path / "out.pt", "--report", tmp_path / "r.json",
    ]  # fmt: skip
    code, out, err = run([*argv, "--quiet"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["options"]["channel_sampler"] is True
    # Each block's first conv reads the stream through a sampler group of its own.
    sampled = [r for r in report["layers"] if r["channels_after"] < r["channels_before"]
               and r["name"].endswith(".conv1")]  # fmt: skip
    assert sampled and all(r["producer"] == r["name"] + ":in" for r in sampled)
    model = cio.load(tmp_path / "out.pt")
    assert any(isinstance(b.conv1, SampledConv2d) for _, b in model.blocks())
    assert count_macs(model, (3, 12, 12), include_linear=True) == report["macs_after"]


def test_unknown_model_lists_every_valid_name(tiny, tmp_path, capsys):
    argv = ["prune", "--model", "vgg17", "--calib", tiny / "calib", "--speedup", 1.5]
    code, _, err = run([*argv, "--out", tmp_path / "o.pt"], capsys)
    assert code == 2
    assert all(name in err for name in list_models())


def test_argparse_errors_exit_2(tiny, tmp_path, capsys):
    argv = _prune_argv(tiny, tmp_path, "--speedup", "fast")
    assert run(argv, capsys)[0] == 2
    assert run(_prune_argv(tiny, tmp_path, "--method", "magic", "--speedup", 2), capsys)[0] == 2
    assert run(["prune", "--calib", tiny / "calib"], capsys)[0] == 2  # --model, --out missing
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_gpu_exits_2(tiny, tmp_path, capsys):
    code, _, err = run(_prune_argv(tiny, tmp_path, "--speedup", 1.5, "--device", "cuda"), capsys)
    assert code == 2 and "CUDA is not available" in err


def test_failure_while_writing_outputs_leaves_nothing(tiny, tmp_path, capsys, monkeypatch):
    old = b"previous model"
    (tmp_path / "out.pt").write_bytes(old)

    def broken_save(model, path):
        Path(path).write_bytes(b"half")
        raise OSError("no space left on device")

    monkeypatch.setattr(cli, "save", broken_save)
    argv = _prune_argv(tiny, tmp_path, "--speedup", 1.5, "--report", tmp_path / "sub" / "r.json")
    code, _, err = run([*argv, "--quiet"], capsys)
    assert code == 1  # not a usage error: a failure of the run, in one line
    last = err.strip().splitlines()[-1]
    assert (
        last
        == f"chanprune: error: could not write '{tmp_path / 'out.pt'}': no space left on device"
    )
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]  # no report, no temp, no sub/
    assert (tmp_path / "out.pt").read_bytes() == old


def _full_disk(*args, **kwargs):
    """What torch.save does on a full disk: a RuntimeError raised while handling the OSError."""
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")  # noqa: B904


def test_full_disk_is_one_line_naming_the_output_exit_1(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch, "save", _full_disk)
    code, _, err = run(_prune_argv(tiny, tmp_path, "--speedup", 1.5, "--quiet"), capsys)
    assert code == 1 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert (
        last
        == f"chanprune: error: could not write '{tmp_path / 'out.pt'}': No space left on device"
    )
    assert list(tmp_path.iterdir()) == []  # the temporary files are gone

    monkeypatch.setattr(Path, "write_text", _full_disk)
    argv = ["eval", "--model", tiny / "saved.pt", "--data", tiny / "calib", "--preset", "digits"]
    code, _, err = run([*argv, "--json", tmp_path / "acc.json", "--quiet"], capsys)
    assert code == 1 and "Traceback" not in err
    assert f"could not write '{tmp_path / 'acc.json'}': No space left on device" in err
    assert list(tmp_path.iterdir()) == []


def test_unexpected_error_exits_1_with_traceback(tiny, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("solver exploded")

    monkeypatch.setattr(cli, "prune_model", broken)
    code, _, err = run(_prune_argv(tiny, tmp_path, "--speedup", 1.5), capsys)
    assert code == 1
    assert "Traceback" in err and "solver exploded" in err
    assert not (tmp_path / "out.pt").exists()


def test_value_error_outside_chanprune_is_unexpected(tiny, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        np.linalg.cholesky(-np.eye(2))  # raises LinAlgError (a ValueError) inside numpy

    monkeypatch.setattr(cli, "prune_model", broken)
    code, _, err = run(_prune_argv(tiny, tmp_path, "--speedup", 1.5), capsys)
    assert code == 1 and "Traceback" in err


# ---------------------------------------------------------------------------- eval, info
def test_eval_prints_accuracy_and_writes_json(tiny, tmp_path, capsys):
    argv = ["eval", "--model", tiny / "saved.pt", "--data", tiny / "calib", "--preset", "digits"]
    code, out, err = run([*argv, "--json", tmp_path / "acc.json", "--quiet"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "acc.json").read_text())
    assert result["n_images"] == 40
    assert result["accuracy"] == pytest.approx(result["correct"] / 40)
    assert f"accuracy {result['accuracy']:.4f} ({result['correct']}/40 images)" in out

    code, out, _ = run([*argv, "--n-images", 20, "--quiet"], capsys)
    assert code == 0 and "/20 images" in out


def test_eval_bad_inputs_exit_2(tiny, tmp_path, capsys):
    base = ["eval", "--model", tiny / "saved.pt", "--preset", "digits"]
    assert run([*base, "--data", tmp_path / "nope"], capsys)[0] == 2
    assert run([*base, "--data", tiny / "calib", "--n-images", 0], capsys)[0] == 2


def test_preset_of_a_model_file_is_inferred_from_its_architecture(tiny, tmp_path, capsys):
    code, out, err = run(["eval", "--model", tiny / "saved.pt", "--data", tiny / "calib"], capsys)
    assert code == 0, err
    assert "using --preset digits, inferred" in err
    argv = ["prune", "--model", tiny / "saved.pt", "--calib", tiny / "calib", "--speedup", 1.5]
    code, _, err = run([*argv, "--out", tmp_path / "o.pt", "--quiet"], capsys)
    assert code == 0, err
    assert "inferred" not in err  # --quiet
    for name, preset in [
        ("vgg_digits", "digits"),
        ("vgg16_bn_cifar10", "cifar"),
        ("resnet20_cifar10", "cifar"),
        ("vgg16", "imagenet"),
        ("resnet18", "imagenet"),
    ]:
        model = cli.get_model(name)
        assert cli._preset_from_architecture(model) == preset
        assert cli._resolve_preset(None, name, model) == preset
    assert cli._preset_from_architecture(torch.nn.Linear(2, 2)) is None


def test_info_reports_widths_macs_and_params(tiny, capsys):
    code, out, err = run(["info", "--model", "vgg_digits"], capsys)
    assert code == 0, err
    model = vgg_digits()
    macs = count_macs(model, (1, 8, 8))
    with_linear = count_macs(model, (1, 8, 8), include_linear=True)
    assert f"{macs:,}" in out and f"{with_linear:,}" in out
    assert f"{sum(p.numel() for p in model.parameters()):,}" in out
    assert "features.17" in out and "input 1x8x8" in out
    assert "WARNING" not in err  # info needs no weights

    code, out, _ = run(["info", "--model", tiny / "saved.pt", "--input-size", 16], capsys)
    assert code == 0 and "input 1x16x16" in out
    code, out, _ = run(["info", "--model", tiny / "saved.pt"], capsys)
    assert code == 0 and "input 1x8x8" in out  # size from the inferred digits preset
    code, _, err = run(["info", "--model", "vgg_digits", "--input-size", 0], capsys)
    assert code == 2 and "--input-size" in err
    assert "sampler" not in out  # a VGG has no residual stream

    code, out, _ = run(["info", "--model", "resnet20_cifar10"], capsys)
    table, groups = out.split("channel groups:")
    rows = {line.split()[0]: line.split()[-1] for line in table.splitlines() if "layer" in line}
    assert rows["layer1.0.conv1"] == "sampler" and rows["layer1.0.conv2"] == "layer1.0.conv1"
    assert "'<conv>:in' with --channel-sampler" in out
    # The graph planner's view: branch-internal groups prunable, the stream kept whole.
    assert "layer1.0.conv1 (16 channels): prunable" in groups
    assert "conv1 (16 channels): kept whole: tied to a residual addition" in groups


# ---------------------------------------------------------------------------- demo
@pytest.fixture
def demo_cache_dir(tmp_path_factory) -> Path:
    """One cache of the trained demo network for the whole session (test_demo.py uses it too)."""
    return tmp_path_factory.getbasetemp() / "demo-cache"


def test_demo_end_to_end(tmp_path, capsys, demo_cache_dir):
    out_dir = tmp_path / "demo"
    argv = ["demo", "--out-dir", out_dir, "--cache-dir", demo_cache_dir]
    code, out, err = run([*argv, "--methods", "first_k,random", "--quiet"], capsys)
    assert code == 0, err
    result = json.loads((out_dir / "demo.json").read_text())
    assert list(result["methods"]) == ["first_k", "random"]
    assert (out_dir / "demo.png").is_file()
    assert "first_k" in out and "unpruned" in out

    code, _, err = run([*argv, "--methods", "magic", "--quiet"], capsys)
    assert code == 2 and "magic" in err
    code, _, err = run([*argv, "--speedup", 1, "--quiet"], capsys)
    assert code == 2 and "speedup" in err


# ---------------------------------------------------------------------------- shared
@pytest.mark.shared
@pytest.mark.slow
def test_eval_shared_vgg16_bn_cifar10(capsys):
    if not (SHARED / "README.md").is_file():
        pytest.skip(f"needs the shared data and checkpoints at {SHARED} (absent on this machine)")
    argv = [
        "eval", "--model", "vgg16_bn_cifar10",
        "--weights", SHARED / "models" / "vgg16_bn_cifar10.pth",
        "--data", SHARED / "data" / "cifar10-jpeg" / "test", "--quiet",
    ]  # fmt: skip
    torch.set_num_threads(2)  # a real network: use both cores
    try:
        code, out, err = run(argv, capsys)
    finally:
        torch.set_num_threads(1)
    assert code == 0, err
    accuracy = float(out.split()[1])
    assert abs(accuracy - 0.8993) < 5e-4
    assert "(8993/10000 images)" in out or "/10000 images" in out


# ---------------------------------------------------------------------------- user models
USER_MODEL = """
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({
            "a": nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)),
            "b": nn.Sequential(nn.Conv2d(16, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24)),
            "c": nn.Sequential(nn.Conv2d(24, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)),
        })
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.blocks["a"](x))
        x = F.relu(self.blocks["b"](x))
        x = F.relu(self.blocks["c"](x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def build():
    torch.manual_seed(0)
    return Net()
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "user_net.py"
    path.write_text(USER_MODEL)
    return path


def test_prune_a_user_model_from_a_file_callable(tiny, user_file, tmp_path, capsys):
    weights = tmp_path / "weights.pt"
    net = runpy.run_path(str(user_file))["build"]()
    torch.save(net.state_dict(), weights)
    out = tmp_path / "pruned.pt"
    argv = [
        "prune", "--model", f"{user_file}:build", "--weights", weights, "--calib",
        tiny / "calib", "--preset", "digits", "--speedup", "1.5", "--out", out, "--quiet",
        "--schedule", "uniform",
    ]  # fmt: skip
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    assert "1.5" in stdout or "1.4" in stdout
    fresh = runpy.run_path(str(user_file))["Net"]()
    pruned = cio.load(out, model=fresh)
    assert pruned.blocks["b"][0].in_channels < 16
    x = torch.randn(2, 1, 8, 8)
    assert pruned(x).shape == (2, 10)
    # The pruned file as --weights of the callable: the network is shrunk, then filled.
    argv = ["eval", "--model", f"{user_file}:Net", "--weights", out, "--data", tiny / "calib",
            "--preset", "digits", "--json", tmp_path / "eval.json", "--quiet"]  # fmt: skip
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "eval.json").read_text())["n_images"] == 40


def test_info_lists_the_channel_groups_of_a_user_model(user_file, capsys):
    code, out, err = run(["info", "--model", f"{user_file}:Net", "--input-size", 8], capsys)
    assert code == 0, err
    assert "channel groups: 3 of 4 prunable" in out
    assert "blocks.c.0 (16 channels): prunable" in out  # the classifier reads it
    assert "fc (10 channels): kept whole: the network's output" in out
    assert "consumers: blocks.b.0" in out and "consumers: fc" in out
    assert "--schedule auto picks 'energy': a VGG-style chain" in out  # no residual add


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:build", "cannot import"),
        ("{file}:nothing", "has no callable 'nothing'"),
        ("{missing}:build", "does not exist"),
    ],
)
def test_bad_user_model_specs_exit_2(spec, message, user_file, tmp_path, capsys):
    spec = spec.format(file=user_file, missing=tmp_path / "missing.py")
    code, _, err = run(["info", "--model", spec, "--input-size", 8], capsys)
    assert code == 2
    assert message in err


def test_prune_reads_a_calibration_list(tiny, tmp_path, capsys):
    images = sorted((tiny / "calib").glob("*/*.png"))
    listing = tmp_path / "calib.txt"
    lines = [f"{p} {p.parent.name}" for p in images]
    listing.write_text("# calibration list\n" + "\n".join(lines) + "\n")
    argv = [
        "prune", "--model", tiny / "saved.pt", "--calib", listing, "--preset", "digits",
        "--speedup", "1.5", "--out", tmp_path / "out.pt", "--quiet",
        "--report", tmp_path / "report.json",
    ]  # fmt: skip
    code, _, err = run(argv, capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n_images"] + report["n_heldout"] == len(images)
    code, _, err = run([*argv[:4], tmp_path / "missing.txt", *argv[5:]], capsys)
    assert code == 2 and "missing.txt" in err
