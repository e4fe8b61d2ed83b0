"""Tests of chanprune.export.export_onnx and ``chanprune export``.

The reference everywhere is the PyTorch model itself, run eagerly; the ONNX file is run
here with ONNX Runtime independently of the check inside ``export_onnx``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _planted import randomize_batchnorm, run_cli
from torch import nn

import chanprune.cli as cli
import chanprune.io as cio
from chanprune import prune_model
from chanprune.export import OnnxExport, export_onnx
from chanprune.models import VGG, CifarResNet, vgg_digits
from chanprune.surgery import SampledConv2d

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# The networks here are tiny: extra threads only oversubscribe a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = dict(progress=False)


def _images(n: int, shape=(3, 16, 16), seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pruned_vgg() -> nn.Module:
    """A small BN-VGG (built by chanprune.models) pruned 2x by prune_model."""
    torch.manual_seed(0)
    model = randomize_batchnorm(
        VGG([16, 16, "M", 32, 32], batch_norm=True, num_classes=10, pool_size=1,
            hidden_features=32)
    )  # fmt: skip
    pruned, report = prune_model(model, _images(60), speedup=2.0, **QUIET)
    assert report.speedup > 1.5
    assert pruned.features[3].in_channels < 16  # really pruned
    return pruned.eval()


@pytest.fixture(scope="module")
def pruned_resnet() -> nn.Module:
    """A CIFAR ResNet-8 pruned with the channel sampler (SampledConv2d in every block)."""
    torch.manual_seed(0)
    model = randomize_batchnorm(CifarResNet(depth=8, num_classes=10))
    pruned, _ = prune_model(model, _images(60), speedup=1.5, channel_sampler=True, **QUIET)
    samplers = [m for m in pruned.modules() if isinstance(m, SampledConv2d)]
    assert samplers and any(m.in_channels < m.stream_channels for m in samplers)
    return pruned.eval()


def _run_ort(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["output"]
    return session.run(None, {"input": x.numpy()})[0]


def _eager(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


def _assert_close_to_scale(got: np.ndarray, want: np.ndarray, tol: float = 1e-4) -> None:
    scale = float(np.abs(want).max())
    assert got.shape == want.shape
    assert float(np.abs(got - want).max()) <= tol * scale, (np.abs(got - want).max(), scale)


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- exports
@pytest.mark.parametrize("network", ["vgg", "resnet"])
def test_pruned_model_exports_and_ort_matches_pytorch(network, pruned_vgg, pruned_resnet, tmp_path):
    model = pruned_vgg if network == "vgg" else pruned_resnet
    before = _state(model)
    path = tmp_path / "model.onnx"
    result = export_onnx(model, path, (3, 16, 16))
    assert isinstance(result, OnnxExport)
    assert result.path == path and result.opset == 17 and result.dynamic_batch
    assert result.input_shape == (3, 16, 16)
    assert 0 <= result.max_abs_diff <= 1e-4 * result.scale
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary left

    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert graph.opset_import[0].version == 17
    (inp,) = graph.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 16, 16]
    assert graph.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    # Dynamic batch: other batch sizes than the traced one run and match eager PyTorch.
    for batch in (1, 5):
        x = _images(batch, seed=10 + batch)
        _assert_close_to_scale(_run_ort(path, x), _eager(model, x))

    # The input model is untouched: same weights, still in eval mode.
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.training for m in model.modules())


def test_channel_sampler_becomes_a_gather_of_its_indices(pruned_resnet, tmp_path):
    path = tmp_path / "sampled.onnx"
    export_onnx(pruned_resnet, path, (3, 16, 16))
    graph = onnx.load(str(path))
    gathers = [n for n in graph.graph.node if n.op_type == "Gather"]
    samplers = [m for m in pruned_resnet.modules() if isinstance(m, SampledConv2d)]
    assert len(gathers) >= len(samplers)
    # Each sampler's index tensor is in the graph, as the Gather's constant indices on axis 1.
    constants = {
        **{i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer},
        **{
            n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t)
            for n in graph.graph.node
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
        },
    }
    gathered = [
        constants[n.input[1]].tolist()
        for n in gathers
        if n.input[1] in constants and next((a.i for a in n.attribute if a.name == "axis"), 0) == 1
    ]
    for sampler in samplers:
        assert sampler.in_index.tolist() in gathered


def test_training_mode_is_restored(tmp_path):
    torch.manual_seed(0)
    model = vgg_digits().train()
    model.classifier.eval()  # a mix of modes
    modes = {name: m.training for name, m in model.named_modules()}
    export_onnx(model, tmp_path / "d.onnx", (1, 8, 8))
    assert {name: m.training for name, m in model.named_modules()} == modes
    # Exported in eval mode: BatchNorm uses its running statistics, Dropout is off.
    x = _images(4, (1, 8, 8))
    _assert_close_to_scale(_run_ort(tmp_path / "d.onnx", x), _eager(copy.deepcopy(model).eval(), x))


def test_fixed_batch_and_other_opset(tmp_path):
    torch.manual_seed(0)
    model = vgg_digits().eval()
    path = tmp_path / "fixed.onnx"
    result = export_onnx(model, path, [1, 8, 8], opset=13, dynamic_batch=False)
    assert not result.dynamic_batch and result.opset == 13
    graph = onnx.load(str(path))
    assert graph.opset_import[0].version == 13
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 1, 8, 8]
    x = _images(1, (1, 8, 8))
    _assert_close_to_scale(_run_ort(path, x), _eager(model, x))


class _FrozenBatch(nn.Module):
    """Multiplies by the batch size read as a Python int: the trace freezes it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).flatten(1) * int(x.shape[0])


def test_check_catches_a_batch_size_frozen_in_the_graph(tmp_path):
    path = tmp_path / "frozen.onnx"
    path.write_bytes(b"previous content")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        with pytest.raises(ValueError, match="differs from PyTorch"):
            export_onnx(_FrozenBatch(), path, (3, 8, 8))
        assert path.read_bytes() == b"previous content"  # untouched
        assert sorted(p.name for p in tmp_path.iterdir()) == ["frozen.onnx"]
        # With a fixed batch of 1 the same graph is right, and the check passes.
        export_onnx(_FrozenBatch(), path, (3, 8, 8), dynamic_batch=False)
    assert path.read_bytes().startswith(b"\x08")  # an ONNX protobuf now


def test_check_tolerance_is_relative_to_the_output_scale(tmp_path, monkeypatch):
    """A wrong ORT output beyond atol * scale is refused; within it, accepted."""
    import chanprune.export as export

    torch.manual_seed(0)
    model = vgg_digits().eval()
    real_run = ort.InferenceSession.run

    def shifted(by):
        def run(self, names, feeds, *args, **kwargs):
            outs = real_run(self, names, feeds, *args, **kwargs)
            return [o + by * np.abs(o).max() for o in outs]

        return run

    monkeypatch.setattr(ort.InferenceSession, "run", shifted(1e-2))
    with pytest.raises(ValueError, match="max \\|diff\\|"):
        export.export_onnx(model, tmp_path / "a.onnx", (1, 8, 8))
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(ort.InferenceSession, "run", shifted(1e-6))
    result = export.export_onnx(model, tmp_path / "a.onnx", (1, 8, 8), rtol=0.0)
    assert 0.5e-6 * result.scale < result.max_abs_diff <= 1e-4 * result.scale


# ---------------------------------------------------------------------------- bad input
class _Svd(nn.Module):
    def forward(self, x):
        return torch.linalg.svd(x.flatten(2))[1]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(model="not a model"), TypeError, "nn.Module"),
        (dict(path=42), TypeError, "'path'"),
        (dict(path="DIR"), ValueError, "is a directory"),
        (dict(path="DIR/missing/m.onnx"), ValueError, "does not exist"),
        (dict(input_shape="3x8x8"), TypeError, "input_shape"),
        (dict(input_shape=(1, 0, 8)), ValueError, "input_shape"),
        (dict(input_shape=(3, 8, 8)), ValueError, "does not accept inputs of shape"),
        (dict(input_shape=(1, 8)), ValueError, "does not accept inputs of shape"),
        (dict(model=_Svd()), ValueError, "could not export.*linalg_svd"),
        (dict(opset=6), ValueError, "'opset'"),
        (dict(opset=99), ValueError, "'opset'"),
        (dict(atol=-1.0), ValueError, "'atol'"),
        (dict(rtol=float("nan")), ValueError, "'rtol'"),
        (dict(check="yes"), TypeError, "'check'"),
    ],
)
def test_bad_input_raises_and_writes_nothing(kwargs, error, match, tmp_path):
    torch.manual_seed(0)
    args = dict(model=vgg_digits(), path=tmp_path / "out.onnx", input_shape=(1, 8, 8))
    args.update(kwargs)
    if args["path"] == "DIR":  # the folder itself
        args["path"] = tmp_path
    elif args["path"] == "DIR/missing/m.onnx":  # a file in a folder that does not exist
        args["path"] = tmp_path / "missing" / "m.onnx"
    with pytest.raises(error, match=match):
        export_onnx(args.pop("model"), args.pop("path"), args.pop("input_shape"), **args)
    assert not list(tmp_path.iterdir())


def test_model_with_several_outputs_is_refused(tmp_path):
    class Two(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(ValueError, match="one output tensor"):
        export_onnx(Two(), tmp_path / "two.onnx", (3, 4, 4))
    assert not list(tmp_path.iterdir())


def test_float64_model_is_checked_only_after_float(tmp_path):
    torch.manual_seed(0)
    model = vgg_digits().double().eval()
    with pytest.raises(ValueError, match="float64"):
        export_onnx(model, tmp_path / "d.onnx", (1, 8, 8))
    assert not list(tmp_path.iterdir())
    export_onnx(model, tmp_path / "d.onnx", (1, 8, 8), check=False)  # unchecked: written
    assert onnx.load(str(tmp_path / "d.onnx")).graph.input[0].type.tensor_type.elem_type == (
        onnx.TensorProto.DOUBLE
    )
    assert next(model.parameters()).dtype == torch.float64  # not converted in place


def test_missing_optional_packages_name_the_extra(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = vgg_digits().eval()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(ImportError, match=r'pip install "chanprune\[export\]"'):
        export_onnx(model, tmp_path / "a.onnx", (1, 8, 8))
    assert not list(tmp_path.iterdir())
    result = export_onnx(model, tmp_path / "a.onnx", (1, 8, 8), check=False)  # ORT not needed
    assert result.max_abs_diff is None and (tmp_path / "a.onnx").is_file()
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match="'onnx'.*export"):
        export_onnx(model, tmp_path / "b.onnx", (1, 8, 8), check=False)


def test_failed_write_leaves_nothing_and_names_the_file(tmp_path, monkeypatch):
    import errno

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.onnx, "export", full_disk)
    with pytest.raises(OSError, match="out.onnx") as exc:
        export_onnx(vgg_digits(), tmp_path / "out.onnx", (1, 8, 8))
    assert exc.value.errno == errno.ENOSPC
    assert not list(tmp_path.iterdir())


def test_extras_are_optional_and_pinned():
    from _planted import pyproject

    project = pyproject()
    project = project["project"]
    assert not any(d.startswith(("onnx", "onnxruntime")) for d in project["dependencies"])
    extras = project["optional-dependencies"]
    for extra in ("export", "test"):
        pins = [d for d in extras[extra] if d.startswith("onnx")]
        assert {d.split("==")[0] for d in pins} == {"onnx", "onnxruntime"}
        assert all("==" in d for d in pins)


# ---------------------------------------------------------------------------- CLI
_cli = run_cli  # main(argv) -> (exit code, stdout, stderr)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, pruned_resnet) -> dict:
    root = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    cio.save(vgg_digits().eval(), root / "digits.pt")
    cio.save(pruned_resnet, root / "resnet.pt")
    return {"digits": root / "digits.pt", "resnet": root / "resnet.pt"}


def test_cli_help_explains_every_option(capsys):
    code, out, _ = _cli(["export", "--help"], capsys)
    assert code == 0
    expected = {
        "--help", "--model", "--weights", "--preset", "--format", "--out", "--input-shape",
        "--opset", "--no-check", "--quiet", "--verbose",
    }  # fmt: skip
    for option in expected:
        assert option in out
    sub = next(
        a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ).choices["export"]
    options = [a for a in sub._actions if a.option_strings]
    assert all(a.help and a.help != argparse.SUPPRESS for a in options)
    assert {s for a in options for s in a.option_strings if s.startswith("--")} == expected
    assert "chanprune[export]" in out


def test_cli_exports_a_saved_pruned_resnet(saved, tmp_path, capsys):
    out_file = tmp_path / "new" / "folder" / "resnet.onnx"  # missing folders are created
    argv = ["export", "--model", saved["resnet"], "--format", "onnx", "--out", out_file,
            "--input-shape", 3, 16, 16, "--opset", 17]  # fmt: skip
    code, out, err = _cli(argv, capsys)
    assert code == 0, err
    assert "ONNX Runtime matches PyTorch" in out and str(out_file) in out
    assert sorted(p.name for p in out_file.parent.iterdir()) == ["resnet.onnx"]
    model = cio.load(saved["resnet"])
    x = _images(4, seed=7)
    _assert_close_to_scale(_run_ort(out_file, x), _eager(model, x))


def test_cli_infers_the_input_shape_from_the_preset(saved, tmp_path, capsys):
    out_file = tmp_path / "digits.onnx"
    code, out, err = _cli(["export", "--model", saved["digits"], "--out", out_file], capsys)
    assert code == 0, err
    assert "--preset digits" in err  # inferred from the architecture, and said so
    dims = onnx.load(str(out_file)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [1, 8, 8]
    assert "(batch, 1, 8, 8)" in out


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--opset", "3"], "--opset must be"),
        (["--input-shape", "3", "0", "8"], "--input-shape must be"),
        (["--input-shape", "3", "8", "8"], "does not accept inputs of shape"),
        (["--format", "tflite"], "invalid choice"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(saved, tmp_path, capsys, extra, match):
    out_file = tmp_path / "sub" / "x.onnx"
    code, _, err = _cli(["export", "--model", saved["digits"], "--out", out_file, *extra], capsys)
    assert code == 2
    assert match in err
    assert "Traceback" not in err
    assert not list(tmp_path.iterdir())  # not even the folder it would have created


def test_cli_bad_paths_exit_2(saved, tmp_path, capsys):
    code, _, err = _cli(["export", "--model", tmp_path / "absent.pt", "--out",
                         tmp_path / "x.onnx"], capsys)  # fmt: skip
    assert code == 2 and "absent.pt" in err
    code, _, err = _cli(["export", "--model", saved["digits"], "--out", tmp_path], capsys)
    assert code == 2 and "is a directory" in err
    code, _, err = _cli(["export", "--model", saved["digits"], "--out", saved["digits"]], capsys)
    assert code == 2 and "same file" in err
    assert saved["digits"].stat().st_size > 0 and cio.load(saved["digits"]) is not None


def test_cli_without_onnxruntime_exits_1_naming_the_extra(saved, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    out_file = tmp_path / "x.onnx"
    code, _, err = _cli(["export", "--model", saved["digits"], "--out", out_file], capsys)
    assert code == 1
    assert 'pip install "chanprune[export]"' in err and "Traceback" not in err
    assert not out_file.exists()
    code, out, err = _cli(
        ["export", "--model", saved["digits"], "--out", out_file, "--no-check"], capsys
    )
    assert code == 0, err
    assert "not checked" in out and out_file.is_file()


@pytest.mark.parametrize("name", ["Inverted", "Dense", "Grouped"])
def test_graph_planned_model_exports_and_ort_matches_pytorch(name, tmp_path):
    """Networks the graph planner prunes (depthwise + squeeze-excitation, concatenations,
    grouped convs) export as well; ONNX Runtime matches eager PyTorch at other batches."""
    import _graph_models

    model = _graph_models.randomize(getattr(_graph_models, name)())
    pruned, report = prune_model(model, _images(24), speedup=1.5, progress=False)
    assert report.options["planner"] == "graph"
    path = tmp_path / "graph.onnx"
    export_onnx(pruned, path, (3, 16, 16))
    for batch in (1, 4):
        x = _images(batch, seed=20 + batch)
        _assert_close_to_scale(_run_ort(path, x), _eager(pruned, x))


def test_resnet_pruned_without_sampler_exports(tmp_path):
    torch.manual_seed(3)
    model = randomize_batchnorm(CifarResNet(depth=8, num_classes=10))
    pruned, _ = prune_model(model, _images(40), speedup=1.3, progress=False)
    assert not any(isinstance(m, SampledConv2d) for m in pruned.modules())
    path = tmp_path / "resnet.onnx"
    export_onnx(pruned, path, (3, 16, 16))
    x = _images(3, seed=7)
    _assert_close_to_scale(_run_ort(path, x), _eager(pruned, x))


@pytest.mark.slow
@pytest.mark.shared
def test_shared_vgg_pruned_exports_and_matches_on_real_images(shared_dir, tmp_path):
    """The shared VGG-16-BN pruned 2x, exported; ONNX Runtime against eager PyTorch on 64
    real CIFAR-10 test images, and the same predicted classes."""
    from chanprune.data import ImageFolder
    from chanprune.models import get_model

    model = get_model("vgg16_bn_cifar10", weights=shared_dir / "models" / "vgg16_bn_cifar10.pth")
    calib = ImageFolder(shared_dir / "data" / "cifar10-jpeg" / "train5k", preprocess="cifar")
    pruned, _ = prune_model(model, calib, speedup=2.0, n_images=200, progress=False)
    path = tmp_path / "vgg.onnx"
    export_onnx(pruned, path, (3, 32, 32))
    test = ImageFolder(shared_dir / "data" / "cifar10-jpeg" / "test", preprocess="cifar")
    x = torch.stack([test[i][0] for i in range(0, 6400, 100)])
    got, want = _run_ort(path, x), _eager(pruned, x)
    _assert_close_to_scale(got, want)
    assert (got.argmax(1) == want.argmax(1)).all()
