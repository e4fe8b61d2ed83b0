"""Command-line interface: ``chanprune {prune,eval,info,demo}`` (also ``python -m chanprune``).

Exit codes: 0 on success; 2 on bad usage or bad input (argparse errors, and the
``ValueError``/``TypeError``/``FileNotFoundError``/``UnsupportedLayerError`` that chanprune
raises for bad arguments, files or models: one line ``chanprune: error: <message>`` on
stderr, no traceback); 1 when an output cannot be written (a full disk: one line
``chanprune: error: could not write <path>: <reason>``) and on any unexpected failure (the
traceback is shown); 130 when interrupted. Library messages go through :mod:`logging`
(warnings by default, ``-v`` for more); results are printed to stdout, progress bars to
stderr.

Outputs (``--out``, ``--report``, ``--json``) are written only once everything has
succeeded, each to a temporary file beside it and then renamed, so a failed run writes
nothing and never leaves a half-written file. An output naming the same file as an input
(``--model``, ``--weights``, ``--widths``) or as another output is refused before any work.

Examples
--------
::

    chanprune demo
    chanprune info --model vgg16_bn_cifar10
    chanprune prune --model vgg16_bn_cifar10 --weights vgg16_bn_cifar10.pth \\
        --calib cifar10-jpeg/train5k --speedup 2 --out pruned.pt --report report.json
    chanprune eval --model pruned.pt --preset cifar --data cifar10-jpeg/test
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import sys
import traceback
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from . import __version__
from .data import (
    DIGITS_MEAN,
    DIGITS_STD,
    ImageFolder,
    Preprocess,
    calibration_subset,
    evaluate_accuracy,
    get_preset,
    open_calibration,
)
from .exceptions import UnsupportedLayerError
from .flops import count_macs, count_params
from .graph import PlanWarning, trace_plan
from .io import load, save, write_all_creating_folders
from .models import get_model, list_models
from .models._checkpoint import load_weights, read_checkpoint, strip_ansi
from .prune import MODEL_METHODS, NAMES_PLANNER_GONE, PLANNERS, prune_model
from .schedule import SCHEDULES

__all__ = ["main", "build_parser", "PRESETS"]

logger = logging.getLogger(__name__)

PROG = "chanprune"

#: Preprocessing presets accepted by ``--preset`` and the input size each implies.
PRESETS: dict[str, int] = {"cifar": 32, "imagenet": 224, "digits": 8}

#: Registry models whose default preset is "imagenet".
_IMAGENET_MODELS = ("vgg16", "vgg16_bn", "resnet18", "resnet34", "resnet50")

_PACKAGE_DIR = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- parser
class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks; wraps option help as usual."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        metavar="NAME_OR_FILE",
        help=(
            "the network: a registered name (" + ", ".join(list_models()) + "), a file "
            "written by chanprune.save / 'chanprune prune --out' (architecture and weights), "
            "or your own network as package.module:callable or path/to/file.py:callable (a "
            "function or class called without arguments that returns the nn.Module)"
        ),
    )
    p.add_argument(
        "--weights",
        metavar="PATH",
        default=None,
        help=(
            "checkpoint for a registered --model name or a module:callable: a plain "
            "state_dict or {'state_dict': ...}, keys optionally prefixed 'module.', loaded "
            "strictly; for a callable also a pruned network written by 'chanprune prune "
            "--out', whose layer shapes the built network takes first (default: none, i.e. "
            "random weights or those the callable sets; not allowed with a model file)"
        ),
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help=(
            "image preprocessing: 'cifar' (RGB, ImageNet mean/std, no resize), 'imagenet' "
            "(the same after resize 256 + centre crop 224), 'digits' (grayscale, normalised "
            "with chanprune.data.DIGITS_MEAN/DIGITS_STD; PNG pixels are scaled x/255, so "
            "export scikit-learn digits (0..16) as round(v * 255 / 16)) (default: cifar for "
            "*_cifar10 names, imagenet for vgg16, vgg16_bn and resnet18/34/50, digits for "
            "vgg_digits; for a model file, inferred from its architecture: digits for a "
            "1-channel VGG, imagenet for a 7x7-pooled VGG or a torchvision-style ResNet, "
            "cifar for other VGGs and CIFAR ResNets)"
        ),
    )


def _add_run_options(p: argparse.ArgumentParser, *, batch_size: int) -> None:
    p.add_argument(
        "--batch-size",
        type=int,
        default=batch_size,
        metavar="N",
        help="images per forward pass (memory vs. speed) (default: %(default)s)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        metavar="DEVICE",
        help="where to run: cpu, cuda or cuda:N (default: %(default)s)",
    )


def _add_output_options(p: argparse.ArgumentParser, *, quiet_help: str) -> None:
    p.add_argument("--quiet", action="store_true", help=quiet_help)
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more library messages to stderr: -v info, -vv debug (default: warnings only)",
    )


def _planner(value: str) -> str:
    """``--planner``: the removed name-based planner is refused with its migration, not as
    an unknown choice."""
    if value == "names":
        raise argparse.ArgumentTypeError(NAMES_PLANNER_GONE.replace("planner=", "--planner "))
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``chanprune`` argument parser, with one sub-parser per command.

    Returns
    -------
    parser : argparse.ArgumentParser
        ``parse_args`` sets ``command`` and ``func`` (the handler, ``func(args) -> int``).
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Reconstruction-based channel pruning (He, Zhang and Sun, ICCV 2017) for PyTorch.\n"
            "Run 'chanprune COMMAND --help' for the options of each command."
        ),
        epilog=(
            "exit codes: 0 success; 2 bad usage or bad input (message on stderr); "
            "1 an output could not be written (message) or an unexpected failure "
            "(traceback); 130 interrupted (Ctrl-C)\n\n"
            "examples:\n"
            "  chanprune demo\n"
            "  chanprune info --model vgg16_bn_cifar10\n"
            "  chanprune prune --model vgg16_bn_cifar10 --weights vgg16_bn_cifar10.pth \\\n"
            "      --calib cifar10-jpeg/train5k --speedup 2 --out pruned.pt --report r.json\n"
            "  chanprune eval --model pruned.pt --preset cifar --data cifar10-jpeg/test"
        ),
        formatter_class=_Formatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}", help="show the version"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True

    # ---- prune
    p = sub.add_parser(
        "prune",
        help="prune a network's channels to a target speed-up, without retraining",
        description=(
            "Prune the input channels of every conv of a VGG-style network, layer by layer:\n"
            "select channels (LASSO or a baseline criterion) on calibration images, refit the\n"
            "kept weights by least squares, and remove the dropped channels. Writes the pruned\n"
            "model (loadable with chanprune.load or '--model OUT.pt') and optionally a JSON\n"
            "report; prints the per-layer table. Nothing is written if anything fails."
        ),
        formatter_class=_Formatter,
    )
    _add_model_options(p)
    p.add_argument(
        "--calib",
        required=True,
        metavar="DIR_OR_LIST",
        help=(
            "calibration images: a folder laid out as DIR/<class>/*.jpg|*.jpeg|*.png, or a "
            "calibration list file (one image path per line, optionally with its label; see "
            "data/README.md and data/make_calib_list.py)"
        ),
    )
    p.add_argument(
        "--speedup",
        type=float,
        default=None,
        metavar="FLOAT",
        help=(
            "target reduction of conv MACs (> 1, e.g. 2 for half the MACs); required unless "
            "--widths is given (default: none)"
        ),
    )
    p.add_argument(
        "--widths",
        default=None,
        metavar="JSON_FILE",
        help=(
            "explicit schedule instead of --speedup: a JSON object {group: keep}, keep an int "
            "(channels kept) or a float in (0, 1] (fraction kept); a group is named after its "
            'producing conv as \'chanprune info\' lists it (e.g. "features.0"), or by the conv '
            'that reads it, "<conv>:in" (e.g. "features.3:in"; a ResNet\'s '
            '"layer1.0.conv1:in" reads the stream and needs --channel-sampler); unnamed '
            "groups are kept whole (default: none)"
        ),
    )
    p.add_argument(
        "--method",
        choices=MODEL_METHODS,
        default="greedy_ls",
        metavar="METHOD",
        help=(
            "channel selection criterion, one of: "
            + ", ".join(MODEL_METHODS)
            + " (greedy_ls, the default, minimises the least-squares reconstruction error "
            "by greedy elimination and measured best; lasso is the paper's; see "
            "chanprune.prune.prune_model) (default: %(default)s)"
        ),
    )
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=None,
        help=(
            "how --speedup is spread over layers: 'auto' (the schedule measured best for the "
            "kind of network, named in the report: energy for a VGG-style chain, paper for a "
            "ResNet of Basic or Bottleneck blocks, sensitivity for any other network), "
            "'uniform' (one kept ratio everywhere), 'paper' (He et al.'s VGG-16 schedule: "
            "conv4_x keeps 1.5x the ratio of conv1_x-conv3_x, conv5_x untouched; ResNets: the last "
            "stage and blocks that change the map size keep 7/3 the ratio of the others, "
            "Bottleneck 2a : 2b : 2c inputs 2 : 4 : 3), 'energy' (from the data: layers "
            "whose input channels are redundant, by the principal-component spectrum of 500 "
            "calibration images, are pruned hardest) or 'sensitivity' (from the data: the "
            "output divergence of the network as each channel group alone narrows, on 64 "
            "calibration images; the widths with the least predicted divergence) "
            "(default: auto)"
        ),
    )
    p.add_argument(
        "--channel-sampler",
        action="store_true",
        help=(
            "residual networks only (refused for others): also prune the input of every conv "
            "that reads a residual stream (the first conv of each branch) through a channel "
            "sampler (He et al., Sec. 4.2): that conv reads only the kept stream channels "
            "while the stream and the shortcut keep all of them; its input is the group "
            "'<conv>:in' (default: off, only branch-internal channels are pruned)"
        ),
    )
    p.add_argument(
        "--planner",
        type=_planner,
        choices=PLANNERS,
        default="auto",
        help=(
            "kept for existing scripts: 'auto' and 'graph' both trace the network (torch.fx) "
            "and derive its channel groups (the name-based planner is gone) "
            "(default: %(default)s)"
        ),
    )
    p.add_argument(
        "--channel-multiple",
        type=int,
        default=1,
        metavar="N",
        help=(
            "keep widths that are multiples of N in every channel group whose size is one "
            "(8 keeps ONNX Runtime's and oneDNN's channel-blocked kernels usable) "
            "(default: %(default)s)"
        ),
    )
    p.add_argument(
        "--n-images",
        type=int,
        default=5000,
        metavar="N",
        help="calibration images drawn from --calib, stratified by class (default: %(default)s)",
    )
    p.add_argument(
        "--positions",
        type=int,
        default=10,
        metavar="N",
        help="output positions sampled per image and layer (default: %(default)s)",
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=0.1,
        metavar="F",
        help=(
            "fraction of the calibration images held out to report a held-out "
            "reconstruction error per layer, in [0, 0.5] (default: %(default)s)"
        ),
    )
    p.add_argument(
        "--ridge",
        type=float,
        default=1e-4,
        metavar="F",
        help=(
            "relative ridge of the least-squares refit, a fraction of the mean diagonal of "
            "the Gram matrix, >= 0 (default: %(default)s)"
        ),
    )
    p.add_argument(
        "--recover-epochs",
        type=int,
        default=0,
        metavar="N",
        help=(
            "after pruning, distil the pruned network for N epochs against the original's "
            "outputs on the calibration images (no labels; flips and crops), reporting the "
            "held-out divergence per epoch; 0 keeps the promise of no training at all "
            "(default: %(default)s)"
        ),
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help=(
            "under torchrun (WORLD_SIZE > 1: calibration sharded over the ranks, gloo on "
            "CPU, NCCL on CUDA, only rank 0 writes and shows progress): seconds a rank waits "
            "for the others in a collective before the job ends with an error "
            "(default: %(default)s)"
        ),
    )
    p.add_argument(
        "--recover-lr",
        type=float,
        default=1e-5,
        metavar="F",
        help="initial learning rate of --recover-epochs, cosine to 0 (default: %(default)s)",
    )
    _add_run_options(p, batch_size=100)
    p.add_argument(
        "--max-cache-mb",
        type=float,
        default=None,
        metavar="MB",
        help=(
            "memory for the activations cached between layers, in MB; where the values at a "
            "layer do not fit, the layers before it are recomputed in each pass instead, "
            "with the same result (default: "
            "3/4 of the free GPU memory, or half the available RAM on a CPU)"
        ),
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seeds the image draw, the held-out split and the positions (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="OUT.pt",
        help=(
            "where to write the pruned model (overwritten if present; missing folders are created)"
        ),
    )
    p.add_argument(
        "--report",
        default=None,
        metavar="REPORT.json",
        help=(
            "also write the pruning report as JSON here (missing folders are created; "
            "default: none)"
        ),
    )
    _add_output_options(p, quiet_help="no progress bars and no per-layer table")
    p.set_defaults(func=_cmd_prune)

    # ---- eval
    p = sub.add_parser(
        "eval",
        help="top-1 accuracy of a network on an image folder",
        description="Print the top-1 accuracy of a network on DIR/<class>/<image> files.",
        formatter_class=_Formatter,
    )
    _add_model_options(p)
    p.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="labelled images laid out as DIR/<class>/*.jpg|*.jpeg|*.png, classes sorted by name",
    )
    p.add_argument(
        "--n-images",
        type=int,
        default=None,
        metavar="N",
        help="evaluate on N images drawn with --seed, stratified by class (default: all)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seeds the draw of --n-images (default: %(default)s)",
    )
    _add_run_options(p, batch_size=256)
    p.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write the result as JSON here (missing folders are created; default: none)",
    )
    _add_output_options(p, quiet_help="no progress bar")
    p.set_defaults(func=_cmd_eval)

    # ---- info
    p = sub.add_parser(
        "info",
        help="conv widths, MACs and parameters of a network",
        description=(
            "Print each conv layer's widths and MACs, the total MACs (conv only, as counted by\n"
            "chanprune.flops.count_macs, and with the linear layers) and the parameters."
        ),
        formatter_class=_Formatter,
    )
    _add_model_options(p)
    p.add_argument(
        "--input-size",
        type=int,
        default=None,
        metavar="N",
        help=(
            "side of the square input the MACs are counted for, e.g. 32 or 224 "
            "(default: from the preset: cifar 32, imagenet 224, digits 8)"
        ),
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more library messages to stderr: -v info, -vv debug (default: warnings only)",
    )
    p.set_defaults(func=_cmd_info, quiet=True)

    # ---- demo
    p = sub.add_parser(
        "demo",
        help="train a small VGG on scikit-learn's digits, prune it with every method, compare",
        description=(
            "Offline demo (nothing is downloaded): train vgg_digits on scikit-learn's 8x8\n"
            "digits (a few seconds; cached), prune it to --speedup with each method, and\n"
            "compare test accuracy, reconstruction error and MACs. Prints a table and writes\n"
            "OUT_DIR/demo.json and OUT_DIR/demo.png."
        ),
        formatter_class=_Formatter,
    )
    p.add_argument(
        "--out-dir",
        default="chanprune-demo",
        metavar="DIR",
        help="folder for demo.json and demo.png, created if needed (default: ./%(default)s)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help=(
            "where the trained network is cached "
            "(default: $XDG_CACHE_HOME/chanprune or ~/.cache/chanprune)"
        ),
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="METHOD",
        help=(
            "methods to compare, space- or comma-separated, among: "
            + ", ".join(MODEL_METHODS)
            + " (default: all)"
        ),
    )
    p.add_argument(
        "--speedup",
        type=float,
        default=2.0,
        metavar="FLOAT",
        help="target reduction of conv MACs, > 1 (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seeds the training and the pruning (default: %(default)s)",
    )
    _add_output_options(p, quiet_help="no progress bars (the result table is still printed)")
    p.set_defaults(func=_cmd_demo)

    # ---- export
    p = sub.add_parser(
        "export",
        help="write a (pruned) network as an ONNX file, checked with ONNX Runtime",
        description=(
            "Export a network to ONNX (input 'input', output 'output', dynamic batch axis)\n"
            "with chanprune.export.export_onnx, then run the file with ONNX Runtime on a\n"
            "random input and compare with PyTorch; nothing is written if either fails.\n"
            "Needs the optional packages onnx and onnxruntime: "
            'pip install "chanprune[export]"\n'
            "(without them: exit code 1 and a message saying so)."
        ),
        formatter_class=_Formatter,
    )
    _add_model_options(p)
    p.add_argument(
        "--format",
        choices=("onnx",),
        default="onnx",
        help="output format (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="OUT.onnx",
        help="where to write the file (overwritten if present; missing folders are created)",
    )
    p.add_argument(
        "--input-shape",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help=(
            "shape of one input without the batch dimension, e.g. 3 32 32 (default: the "
            "first conv's input channels and the preset's size: cifar 32, imagenet 224, "
            "digits 8)"
        ),
    )
    p.add_argument(
        "--opset",
        type=int,
        default=17,
        metavar="N",
        help="ONNX opset version, 7 to 20 (default: %(default)s)",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip the comparison with ONNX Runtime (then onnxruntime is not needed)",
    )
    _add_output_options(p, quiet_help="no note on stderr when --preset is inferred")
    p.set_defaults(func=_cmd_export)
    return parser


# ----------------------------------------------------------------------------- checks
def _check_int(value: Optional[int], option: str, low: int) -> None:
    if value is not None and value < low:
        raise ValueError(f"{option} must be an integer >= {low}; got {value}.")


def _check_seed(value: int) -> None:
    # Checked up front: torch's generators take a signed 64-bit seed and would fail late.
    if not 0 <= value < 2**63:
        raise ValueError(f"--seed must be an integer >= 0 and < 2**63; got {value}.")


def _check_device(spec: str) -> torch.device:
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"--device {spec!r} is not a device (use cpu, cuda or cuda:N).") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec!r}: CUDA is not available on this machine.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {spec!r}: there are only {torch.cuda.device_count()} CUDA device(s)."
            )
    return device


def _check_output(spec: str, option: str) -> Path:
    """A destination file that can be written: not a folder, in a writable folder."""
    path = Path(spec)
    if path.is_dir():
        raise ValueError(f"{option} '{path}' is a directory; give a file path.")
    _check_creatable(path.parent, path, option)
    return path


def _check_output_folder(spec: str, option: str) -> Path:
    """A folder that exists or can be created, to write files into."""
    path = Path(spec)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} '{path}' exists and is not a directory; give a folder.")
    _check_creatable(path, path, option)
    return path


def _check_creatable(folder: Path, path: Path, option: str) -> None:
    """``folder`` exists, or its nearest existing ancestor is a writable directory."""
    ancestor = folder
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{option} '{path}': '{ancestor}' is not a directory.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{option} '{path}': the folder '{ancestor}' is not writable.")


def _same_file(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name one file: through symbolic links and '..', and
    hard links where both exist."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _check_distinct_files(
    outputs: Mapping[str, Optional[str]], inputs: Mapping[str, Optional[str]]
) -> None:
    """Refuse an output that names the same file as an input or as another output.

    Writing an output replaces its file, so it would destroy an input (inputs are never
    modified) or the other output. ``None`` entries (options not given) are skipped.
    """
    given_outputs = [(option, path) for option, path in outputs.items() if path is not None]
    given_inputs = [(option, path) for option, path in inputs.items() if path is not None]
    for i, (option, path) in enumerate(given_outputs):
        for other, other_path in given_outputs[:i]:
            if _same_file(path, other_path):
                raise ValueError(
                    f"{other} '{other_path}' and {option} '{path}' name the same file; "
                    "give different paths."
                )
        for other, other_path in given_inputs:
            if _same_file(path, other_path):
                raise ValueError(
                    f"{option} '{path}' names the same file as the input {other} "
                    f"'{other_path}', which it would overwrite; give another output path."
                )


def _model_file(spec: str) -> Optional[str]:
    """The file ``--model`` reads (a model file, or the .py file of FILE.py:CALLABLE), or
    None for a registered name or a module:callable."""
    if spec in list_models():
        return None
    target, sep, _ = spec.rpartition(":")
    if sep and not Path(spec).exists():
        return target if target.endswith(".py") else None
    return spec


def _holds_shapes(path: str) -> bool:
    """Whether ``path`` is a file chanprune.save wrote for a network of the user's class."""
    try:
        obj = read_checkpoint(path)
    except (OSError, ValueError):
        return False  # load_weights reports the problem with the file
    return isinstance(obj, Mapping) and "module_shapes" in obj


def _model_from_callable(spec: str) -> Optional[nn.Module]:
    """``package.module:callable`` or ``path/to/file.py:callable`` -> the network it
    builds; None when ``spec`` is not of that form."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr.isidentifier() or Path(spec).exists():
        return None
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(f"--model file '{path}' does not exist.")
        import importlib.util

        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        import importlib

        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ValueError(f"--model {spec!r}: cannot import {target!r} ({exc}).") from exc
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise ValueError(f"--model {spec!r}: {target!r} has no callable {attr!r}.")
    model = builder()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"--model {spec!r} must build an nn.Module; {attr}() returned {type(model).__name__}."
        )
    return model


def _check_folder(spec: str, option: str) -> Path:
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{option} folder '{path}' does not exist.")
    if not path.is_dir():
        raise ValueError(f"{option} '{path}' is not a folder (expected DIR/<class>/<image>).")
    return path


def _resolve_model(
    spec: str, weights: Optional[str], *, warn_untrained: bool = True
) -> tuple[nn.Module, Optional[str]]:
    """``--model``/``--weights`` -> (model in eval mode, registry name or None)."""
    names = list_models()
    if spec in names:
        if weights is None and warn_untrained:
            logger.warning("No --weights given: model %r has random weights.", spec)
        return get_model(spec, weights=weights).eval(), spec
    built = _model_from_callable(spec)
    if built is not None:
        if weights is not None and _holds_shapes(weights):  # pruned: shrink, then fill
            return load(weights, model=built), None
        if weights is not None:
            load_weights(built, weights, name=spec)
        elif warn_untrained:
            logger.warning("No --weights given: model %r keeps the weights it was built with.",
                           spec)  # fmt: skip
        return built.eval(), None
    path = Path(spec)
    if path.is_file():
        if weights is not None:
            raise ValueError(
                f"--weights applies to a registered model name; '{path}' is a model file that "
                "already holds its weights."
            )
        return load(path), None
    if path.is_dir():
        raise ValueError(f"--model '{path}' is a directory, not a model name or file.")
    raise ValueError(
        f"--model {spec!r} is neither a registered model name, an existing file, nor "
        f"package.module:callable or file.py:callable. Valid names: {', '.join(names)}."
    )


def _preset_from_architecture(model: nn.Module) -> Optional[str]:
    """The preset implied by a chanprune architecture, as the registry builds them.

    VGG with 1 input channel: digits; VGG with a 7x7 pooled head: ImageNet; other VGGs (the
    1x1 pooled CIFAR head): CIFAR; CIFAR ResNets: CIFAR; torchvision-style ResNets: ImageNet.
    """
    config_of = getattr(model, "arch_config", None)
    config = config_of() if callable(config_of) else None
    if not isinstance(config, Mapping):
        return None
    arch = config.get("arch")
    if arch == "vgg":
        if config.get("in_channels") == 1:
            return "digits"
        return "imagenet" if config.get("pool_size") == 7 else "cifar"
    return {"cifar_resnet": "cifar", "resnet": "imagenet"}.get(arch)


def _resolve_preset(
    preset: Optional[str], name: Optional[str], model: nn.Module, *, quiet: bool = False
) -> Optional[str]:
    """The preset to use: ``--preset``, else from the registry name, else from the
    architecture of a model file (saying so on stderr); None when none applies."""
    if preset is not None:
        return preset
    if name is not None:
        if name.endswith("_cifar10"):
            return "cifar"
        if name in _IMAGENET_MODELS:
            return "imagenet"
        if name == "vgg_digits":
            return "digits"
        return None
    inferred = _preset_from_architecture(model)
    if inferred is not None and not quiet:
        print(
            f"{PROG}: using --preset {inferred}, inferred from the model's architecture "
            "(pass --preset to override)",
            file=sys.stderr,
        )
    return inferred


def _require_preset(
    preset: Optional[str], name: Optional[str], model: nn.Module, model_spec: str, quiet: bool
) -> str:
    resolved = _resolve_preset(preset, name, model, quiet=quiet)
    if resolved is None:
        raise ValueError(
            f"--preset is required for --model {model_spec!r} (its preprocessing cannot be "
            f"inferred); choices: {', '.join(sorted(PRESETS))}."
        )
    return resolved


def _preprocess(preset: str) -> Preprocess:
    if preset == "digits":
        # scikit-learn's digits are v / 16 in [0, 1]; PNG pixels are read as x / 255.
        return Preprocess(mode="L", mean=(DIGITS_MEAN,), std=(DIGITS_STD,))
    return get_preset(preset)


def _read_widths(spec: str) -> dict[str, Union[int, float]]:
    path = Path(spec)
    if path.is_dir():
        raise ValueError(f"--widths '{path}' is a directory; give a JSON file.")
    if not path.is_file():
        raise FileNotFoundError(f"--widths file '{path}' does not exist.")
    try:
        widths = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--widths file '{path}' is not valid JSON: {exc}") from exc
    if not isinstance(widths, dict) or not widths:
        raise ValueError(
            f"--widths file '{path}' must hold a non-empty JSON object {{layer: keep}}; "
            f"got {type(widths).__name__}."
        )
    bad = {
        k: v for k, v in widths.items() if isinstance(v, bool) or not isinstance(v, (int, float))
    }
    if bad:
        raise ValueError(
            f"--widths file '{path}': each value must be a channel count (int) or a kept "
            f"fraction (float in (0, 1]); got {bad}."
        )
    return widths


def _check_plan(
    model: nn.Module,
    input_shape: tuple[int, ...],
    speedup: Optional[float],
    schedule: Union[str, Mapping[str, Union[int, float]]],
    channel_sampler: bool,
) -> None:
    """Check the architecture, the input shape and the schedule before any real work.

    Uses the driver's planning helpers; prune_model checks all of this again itself.
    """
    from .prune import plan_widths

    if schedule in ("auto", "energy", "sensitivity"):
        # Their widths need the data; they prune every group, as uniform does, so the
        # same targets are reachable and the same checks apply.
        schedule = "uniform"
    plan_widths(
        model, input_shape, speedup=speedup, schedule=schedule, channel_sampler=channel_sampler
    )


def _input_shape_error(shape: tuple[int, ...], exc: BaseException) -> ValueError:
    """The error of an input shape the model refuses, worded as prune's own check."""
    return ValueError(
        f"the model does not accept inputs of shape {tuple(shape)}: {str(exc).splitlines()[0]}"
    )


def _output_shape(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of ``model``'s output for one input (without the batch dimension), from a
    forward pass of zeros; a ``ValueError`` if the model does not accept such inputs."""
    tensor = next(model.parameters(), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    dtype = tensor.dtype if tensor is not None else torch.get_default_dtype()
    try:
        with torch.inference_mode():
            scores = model(torch.zeros((1, *input_shape), device=device, dtype=dtype))
    except RuntimeError as exc:
        raise _input_shape_error(input_shape, exc) from exc
    return tuple(scores.shape[1:])


def _check_classes(model: nn.Module, dataset: ImageFolder, input_shape: tuple[int, ...]) -> None:
    """The model accepts the images, and scores as many classes as there are class folders.

    Labels are the indices of the sorted folder names, so any other number of folders
    gives a meaningless accuracy.
    """
    out_shape = _output_shape(model, input_shape)
    n_classes = len(dataset.classes)
    if len(out_shape) == 1 and out_shape[0] != n_classes:
        shown = ", ".join(dataset.classes[:5]) + (", ..." if n_classes > 5 else "")
        raise ValueError(
            f"--data '{dataset.root}' has {n_classes} class folder(s) ({shown}) but the model "
            f"has {out_shape[0]} outputs; labels are the indices of the sorted folder names, "
            "so give one folder per output, named so that they sort in the model's class order."
        )


def _split_methods(values: Optional[Sequence[str]]) -> tuple[str, ...]:
    if values is None:
        return MODEL_METHODS
    return tuple(m for value in values for m in value.split(",") if m)


# ----------------------------------------------------------------------------- commands
def _cmd_prune(args: argparse.Namespace) -> int:
    # 1. Everything that needs no model or data.
    if args.speedup is None and args.widths is None:
        raise ValueError(
            "give --speedup (target MAC reduction > 1) or --widths (a JSON {layer: keep} file)."
        )
    if args.speedup is not None and args.widths is not None:
        raise ValueError("--speedup and --widths are exclusive; give one of them.")
    if args.speedup is not None and not (math.isfinite(args.speedup) and args.speedup > 1):
        raise ValueError(
            f"--speedup must be a number > 1 (the factor by which conv MACs shrink); "
            f"got {args.speedup:g}."
        )
    if args.widths is not None and args.schedule is not None:
        raise ValueError("--schedule applies to --speedup; --widths already fixes every layer.")
    _check_int(args.n_images, "--n-images", 1)
    _check_int(args.channel_multiple, "--channel-multiple", 1)
    _check_int(args.positions, "--positions", 1)
    _check_int(args.recover_epochs, "--recover-epochs", 0)
    if not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        raise ValueError(f"--dist-timeout must be a number > 0; got {args.dist_timeout:g}.")
    if not (math.isfinite(args.recover_lr) and args.recover_lr > 0):
        raise ValueError(f"--recover-lr must be a finite number > 0; got {args.recover_lr:g}.")
    _check_int(args.batch_size, "--batch-size", 1)
    _check_seed(args.seed)
    if not 0.0 <= args.holdout <= 0.5:
        raise ValueError(f"--holdout must be in [0, 0.5]; got {args.holdout:g}.")
    if not (math.isfinite(args.ridge) and args.ridge >= 0):
        raise ValueError(f"--ridge must be a finite number >= 0; got {args.ridge:g}.")
    if args.max_cache_mb is not None and not (
        math.isfinite(args.max_cache_mb) and args.max_cache_mb >= 0
    ):
        raise ValueError(f"--max-cache-mb must be a finite number >= 0; got {args.max_cache_mb:g}.")
    device = _check_device(args.device)
    out = _check_output(args.out, "--out")
    report_path = _check_output(args.report, "--report") if args.report else None
    _check_distinct_files(
        {"--out": args.out, "--report": args.report},
        {"--model": _model_file(args.model), "--weights": args.weights, "--widths": args.widths},
    )
    if not Path(args.calib).exists():
        raise FileNotFoundError(f"--calib '{args.calib}' does not exist.")
    schedule = _read_widths(args.widths) if args.widths else (args.schedule or "auto")

    # 2. The model, the data, and the plan they imply.
    model, name = _resolve_model(args.model, args.weights)
    preset = _require_preset(args.preset, name, model, args.model, args.quiet)
    # same_size: the calibration images are stacked into batches; name any odd one out.
    dataset = open_calibration(args.calib, _preprocess(preset), same_size=True)
    input_shape = tuple(dataset[0][0].shape)
    _check_plan(model, input_shape, args.speedup, schedule, args.channel_sampler)

    # 3. The work, sharded over the ranks under torchrun.
    group, rank, device = _init_distributed(device, args.dist_timeout)
    try:
        return _prune_and_write(args, model, dataset, schedule, device, out, report_path,
                                group, rank)  # fmt: skip
    finally:
        if group is not None:
            torch.distributed.destroy_process_group()


def _init_distributed(device: torch.device, timeout_s: float):
    """``(process group, rank, device)``: the WORLD group under torchrun (``WORLD_SIZE`` >
    1 in the environment; NCCL with one GPU per local rank on CUDA, else gloo), or
    ``(None, 0, device)`` for one process."""
    import datetime

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, 0, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return dist.group.WORLD, dist.get_rank(), device


def _prune_and_write(args, model, dataset, schedule, device, out, report_path, group, rank):
    pruned, report = prune_model(
        model,
        dataset,
        speedup=args.speedup,
        schedule=schedule,
        method=args.method,
        n_images=args.n_images,
        positions_per_image=args.positions,
        holdout=args.holdout,
        ridge=args.ridge,
        channel_sampler=args.channel_sampler,
        planner=args.planner,
        channel_multiple=args.channel_multiple,
        batch_size=args.batch_size,
        max_cache_mb=args.max_cache_mb,
        device=device,
        seed=args.seed,
        progress=not args.quiet,
        inplace=True,
        recover="distill" if args.recover_epochs else None,
        recover_epochs=max(1, args.recover_epochs),
        recover_lr=args.recover_lr,
        process_group=group,
    )
    if rank != 0:  # every rank holds the same result; one writes it
        return 0

    # 4. The outputs, all or nothing.
    outputs: list[tuple[Path, Callable[[Path], None]]] = [(out, lambda tmp: save(pruned, tmp))]
    if report_path is not None:
        text = report.to_json() + "\n"
        outputs.append((report_path, lambda tmp: tmp.write_text(text, encoding="utf-8")))
    _write_outputs(outputs)

    if not args.quiet:
        print(report.to_markdown())
        print()
    print(
        f"Pruned {args.model} with {report.method}: {report.speedup:.2f}x fewer MACs "
        f"({report.macs_before / 1e6:.2f}M -> {report.macs_after / 1e6:.2f}M), "
        f"{report.params_before / 1e6:.3f}M -> {report.params_after / 1e6:.3f}M parameters. "
        f"Wrote {out}" + (f" and {report_path}." if report_path is not None else ".")
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    _check_int(args.n_images, "--n-images", 1)
    _check_int(args.batch_size, "--batch-size", 1)
    _check_seed(args.seed)
    device = _check_device(args.device)
    json_path = _check_output(args.json, "--json") if args.json else None
    _check_distinct_files(
        {"--json": args.json}, {"--model": _model_file(args.model), "--weights": args.weights}
    )
    data_dir = _check_folder(args.data, "--data")

    model, name = _resolve_model(args.model, args.weights)
    preset = _require_preset(args.preset, name, model, args.model, args.quiet)
    dataset = ImageFolder(data_dir, preprocess=_preprocess(preset), same_size=True)
    _check_classes(model, dataset, tuple(dataset[0][0].shape))
    if args.n_images is not None:
        dataset = calibration_subset(dataset, args.n_images, seed=args.seed)
    accuracy = evaluate_accuracy(
        model, dataset, batch_size=args.batch_size, device=device, progress=not args.quiet
    )
    n = len(dataset)
    correct = int(round(accuracy * n))
    if json_path is not None:
        result = {
            "model": args.model,
            "weights": args.weights,
            "data": str(data_dir),
            "preset": preset,
            "n_images": n,
            "correct": correct,
            "accuracy": accuracy,
        }
        text = json.dumps(result, indent=2) + "\n"
        _write_outputs([(json_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))])
    print(f"accuracy {accuracy:.4f} ({correct}/{n} images)")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    _check_int(args.input_size, "--input-size", 1)
    model, name = _resolve_model(args.model, args.weights, warn_untrained=False)
    size = args.input_size
    if size is None:
        preset = _resolve_preset(args.preset, name, model)
        if preset is None:
            raise ValueError(
                f"give --input-size or --preset for --model {args.model!r} (its input size "
                "cannot be inferred)."
            )
        size = PRESETS[preset]
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"--model {args.model!r} has no Conv2d layer.")
    shape = (convs[0][1].in_channels, size, size)
    try:
        per_layer = count_macs(model, shape, per_layer=True).per_layer
        with_linear = count_macs(model, shape, include_linear=True)
    except RuntimeError as exc:
        raise _input_shape_error(shape, exc) from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlanWarning)  # its groups are listed below
        try:
            graph = trace_plan(model, shape)
        except UnsupportedLayerError as exc:
            graph, refusal = None, exc
    # Each conv's prunable input: the groups it reads, or its stream through a sampler.
    prunable: dict[str, str] = {}
    for c in graph.consumers if graph is not None else ():
        if c.in_groups:
            prunable[c.name] = ", ".join(dict.fromkeys(c.in_groups))
        elif c.samplable:
            prunable[c.name] = "sampler"

    header = ("layer", "in", "out", "kernel", "MACs", "prunable input (group)")
    rows = [
        (
            n,
            str(m.in_channels),
            str(m.out_channels),
            "x".join(str(k) for k in m.kernel_size),
            f"{per_layer.get(n, 0):,}",
            prunable.get(n, "-"),
        )
        for n, m in convs
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join([f"{{:<{widths[0]}}}"] + [f"{{:>{w}}}" for w in widths[1:]])
    conv_total = sum(per_layer.values())
    print(f"{type(model).__name__} ({args.model}), input {shape[0]}x{size}x{size}")
    print(fmt.format(*header))
    print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    for row in rows:
        print(fmt.format(*row))
    if "sampler" in prunable.values():
        print("(sampler: its stream input is the group '<conv>:in' with --channel-sampler)")
    print()
    print(f"conv MACs:          {conv_total:,} ({conv_total / 1e6:.2f}M)")
    print(f"MACs incl. linear:  {with_linear:,} ({with_linear / 1e6:.2f}M)")
    params = count_params(model)
    print(f"parameters:         {params:,} ({params / 1e6:.3f}M)")
    print()
    if graph is None:
        print(f"channel groups: none, chanprune refuses this model: {refusal}")
        return 0
    print(
        f"channel groups: {len(graph.prunable)} of {len(graph.groups)} "
        f"prunable, {graph.macs() / 1e6:.2f}M MACs of convs and linears"
    )
    print(graph.describe())
    from .prune import resolve_auto_schedule

    auto, reason = resolve_auto_schedule(graph)
    print(f"--schedule auto picks {auto!r}: {reason}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _check_seed(args.seed)
    _check_output_folder(args.out_dir, "--out-dir")
    if args.cache_dir is not None:
        _check_output_folder(args.cache_dir, "--cache-dir")
    run_demo(
        args.out_dir,
        cache_dir=args.cache_dir,
        methods=_split_methods(args.methods),
        speedup=args.speedup,
        seed=args.seed,
        progress=not args.quiet,
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import MIN_OPSET, _max_opset, export_onnx

    max_opset = _max_opset()
    if not MIN_OPSET <= args.opset <= max_opset:
        raise ValueError(
            f"--opset must be an integer in [{MIN_OPSET}, {max_opset}]; got {args.opset}."
        )
    if args.input_shape is not None and min(args.input_shape) < 1:
        given = " ".join(map(str, args.input_shape))
        raise ValueError(f"--input-shape must be integers >= 1; got {given}.")
    out = _check_output(args.out, "--out")
    _check_distinct_files(
        {"--out": args.out}, {"--model": _model_file(args.model), "--weights": args.weights}
    )

    model, name = _resolve_model(args.model, args.weights)
    if args.input_shape is not None:
        shape = tuple(args.input_shape)
    else:  # as 'info' does: the first conv's input channels, the preset's size
        preset = _resolve_preset(args.preset, name, model, quiet=args.quiet)
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if preset is None or conv is None:
            raise ValueError(
                f"give --input-shape for --model {args.model!r} (its input shape cannot be "
                "inferred" + (")." if conv is None else "; or give --preset).")
            )
        shape = (conv.in_channels, PRESETS[preset], PRESETS[preset])

    results = []

    def write(tmp: Path) -> None:
        results.append(export_onnx(model, tmp, shape, opset=args.opset, check=not args.no_check))

    try:
        _write_outputs([(out, write)])
    except ImportError as exc:  # the optional packages of the 'export' extra
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    result = results[0]
    if result.max_abs_diff is None:
        checked = "not checked (--no-check)"
    else:
        checked = (
            f"ONNX Runtime matches PyTorch: max |diff| {result.max_abs_diff:.2g} "
            f"(output scale {result.scale:.3g})"
        )
    print(
        f"Exported {args.model} to {out} (ONNX opset {result.opset}, input "
        f"(batch, {', '.join(map(str, shape))})); {checked}."
    )
    return 0


# ----------------------------------------------------------------------------- plumbing
class _WriteError(Exception):
    """An output could not be written (a full disk, an I/O error): a failure of the run,
    not of its input, reported in one line with exit code 1."""


def _write_outputs(outputs: list[tuple[Path, Callable[[Path], None]]]) -> None:
    """Create missing output folders, then write all outputs at once (removing any folder
    created here if the writing fails).

    Raises
    ------
    _WriteError
        If creating a folder or writing fails with an ``OSError``: "could not write
        '<path>': <reason>", ``<path>`` the destination (chanprune.io names it, not its
        temporary file).
    """
    try:
        write_all_creating_folders(outputs)
    except OSError as exc:
        if exc.filename is not None and exc.strerror:
            raise _WriteError(f"could not write '{exc.filename}': {exc.strerror}") from exc
        raise _WriteError(str(exc)) from exc


def _raised_in_chanprune(exc: BaseException) -> bool:
    """True if the innermost frame of ``exc``'s traceback is chanprune code."""
    tb = exc.__traceback__
    if tb is None:
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    try:
        Path(tb.tb_frame.f_code.co_filename).resolve().relative_to(_PACKAGE_DIR)
    except ValueError:
        return False
    return True


def _configure_logging(verbose: int) -> Callable[[], None]:
    """Send chanprune's log records to stderr; returns a function undoing it."""
    log = logging.getLogger("chanprune")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("chanprune: %(levelname)s: %(message)s"))
    previous = log.level
    log.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING)
    log.addHandler(handler)

    def restore() -> None:
        log.removeHandler(handler)
        log.setLevel(previous)

    return restore


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``chanprune`` command line.

    Parameters
    ----------
    argv : sequence of str or None, default=None
        The arguments without the program name; ``None``: ``sys.argv[1:]``.

    Returns
    -------
    code : int
        0 on success, 2 on bad usage or input, 1 when an output cannot be written or on an
        unexpected failure, 130 when interrupted. ``--help``, ``--version`` and argparse
        usage errors raise ``SystemExit`` (codes 0 and 2) as argparse does.
    """
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    restore = _configure_logging(args.verbose)
    try:
        return int(args.func(args))
    except _WriteError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        print(f"{PROG}: error: {strip_ansi(str(exc))}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:  # UnsupportedLayerError is a TypeError
        if not _raised_in_chanprune(exc):
            traceback.print_exc()
            return 1
        print(f"{PROG}: error: {strip_ansi(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        restore()


def console_main() -> None:
    """The ``chanprune`` console script and ``python -m chanprune``: :func:`main`, then exit
    with its code.

    Before the interpreter exits, every object is moved out of the cyclic garbage
    collector's reach (:func:`gc.freeze`): its final collections would otherwise walk the
    ~230,000 objects of torch, SciPy and scikit-learn, about 0.45 s of every command
    here. Objects are still freed by reference counting; only reference cycles are left
    to the operating system, after every output has been written and closed.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    console_main()
