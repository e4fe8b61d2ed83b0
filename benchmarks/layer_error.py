"""Single-layer reconstruction error versus kept ratio, for every selector (issue 2).

Reproduces the single-layer figure of He, Zhang and Sun (ICCV 2017) on the CIFAR-10
VGG-16-BN checkpoint of ``../shared``: for each requested conv layer, each kept ratio and
each selector, the relative reconstruction error ``||Y - Y'||^2 / ||Y||^2`` of the layer's
BN-folded pre-ReLU output with and without the least-squares refit, plus the held-out error
of the refit solution on separate images and the solver's wall time.

Single-layer setting: X (input patches) and Y (outputs) both come from the original
network, so no error accumulates from earlier layers. Everything the solvers need is kept
as float64 second moments (:class:`chanprune.LayerStats`), filled from one forward pass per
batch of images for all layers at once.

Outputs (all written atomically): ``<out-dir>/layer_error.json`` (raw numbers and config),
``<out-dir>/layer_error.png`` (the figure) and a marked section of ``--results-md``.
``--report-only`` rebuilds the figure and the Markdown section from an existing JSON.

Run from the repository root::

    python benchmarks/layer_error.py            # defaults: a few minutes on 2 CPU cores
    python benchmarks/layer_error.py --report-only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import sklearn
import torch
from torch.utils.data import Subset
from tqdm.auto import tqdm

import chanprune
from chanprune import LayerStats, prune_layer_from_stats, reconstruction_error
from chanprune.data import ImageFolder, calibration_subset, make_loader
from chanprune.io import atomic_write
from chanprune.models import get_model
from chanprune.sampling import (
    extract_patches,
    gather_outputs,
    record_activations,
    sample_positions,
)
from chanprune.surgery import fold_batchnorm

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO_ROOT.parent / "shared"
DEFAULT_OUT_DIR = REPO_ROOT / "benchmarks" / "results"
DEFAULT_RESULTS_MD = REPO_ROOT / "benchmarks" / "RESULTS.md"

#: VGG-16 conv names -> indices in ``features``.
VGG16_CONVS = {
    name: index
    for name, index in zip(
        [
            "conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
            "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3",
        ],
        [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40],
    )
}  # fmt: skip

DEFAULT_LAYERS = ("conv2_1", "conv3_2", "conv4_2")
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ALL_METHODS = ("lasso", "greedy_ls", "thinet", "max_response", "first_k", "random")
BASELINES = ("first_k", "random")

MARK_START = "<!-- layer_error:start -->"
MARK_END = "<!-- layer_error:end -->"
MD_TITLE = "# chanprune benchmark results\n"
JSON_NAME = "layer_error.json"
PNG_NAME = "layer_error.png"


# ------------------------------------------------------------------------------- CLI
def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"kept ratio must be a number; got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"kept ratio must lie in (0, 1]; got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {value}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0; got {value}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not (value >= 0.0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0; got {value}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the uninformative None and False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layer_error.py",
        description=(
            "Single-layer relative reconstruction error versus kept ratio for every channel "
            "selector, with and without the least-squares refit, on real feature maps of the "
            "CIFAR-10 VGG-16-BN checkpoint (He, Zhang and Sun, ICCV 2017, single-layer "
            "figure). X and Y both come from the original network (no accumulated error); "
            "BatchNorm is folded into the conv, so Y is the BN output (pre-ReLU)."
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--shared-dir", type=Path, default=DEFAULT_SHARED,
        help="folder with the shared data and checkpoints (the 'shared' folder beside the "
        "repository root); exit code 2 if it is missing",
    )  # fmt: skip
    parser.add_argument(
        "--checkpoint", type=Path, default=None,
        help="VGG-16-BN CIFAR-10 state_dict; default <shared-dir>/models/vgg16_bn_cifar10.pth",
    )  # fmt: skip
    parser.add_argument(
        "--data-dir", type=Path, default=None,
        help="calibration image folder (<class>/<file>.jpg); "
        "default <shared-dir>/data/cifar10-jpeg/train5k",
    )  # fmt: skip
    parser.add_argument(
        "--layers", nargs="+", default=list(DEFAULT_LAYERS), metavar="NAME",
        help=f"VGG-16 conv layers to measure, by name; choices: {', '.join(VGG16_CONVS)}",
    )  # fmt: skip
    parser.add_argument(
        "--ratios", nargs="+", type=_ratio, default=list(DEFAULT_RATIOS), metavar="R",
        help="kept ratios in (0, 1]; a layer with c input channels keeps max(1, round(R * c))",
    )  # fmt: skip
    parser.add_argument(
        "--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS, metavar="M",
        help=f"channel selectors to compare; choices: {', '.join(ALL_METHODS)}",
    )  # fmt: skip
    parser.add_argument(
        "--n-images", type=_positive_int, default=1000,
        help="calibration images the statistics are fitted on (drawn class-stratified from "
        "the data folder with --seed)",
    )  # fmt: skip
    parser.add_argument(
        "--n-heldout", type=_positive_int, default=500,
        help="further images, disjoint from the calibration ones, for the held-out error of "
        "the refit solution",
    )  # fmt: skip
    parser.add_argument(
        "--positions", type=_positive_int, default=10,
        help="output positions sampled per image and layer (all positions when the map "
        "has fewer)",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=_nonneg_int, default=0,
        help="seed of the image subsets, the sampled positions and the 'random' selector",
    )  # fmt: skip
    parser.add_argument(
        "--ridge", type=_nonneg_float, default=0.0,
        help="relative ridge of the least-squares refit and of greedy_ls (0: plain least "
        "squares)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=_positive_int, default=100,
        help="images per forward pass while collecting statistics",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=_positive_int, default=None,
        help="torch intra-op threads (default: torch's own choice)",
    )  # fmt: skip
    parser.add_argument(
        "--out-dir", type=Path, default=DEFAULT_OUT_DIR,
        help=f"where {JSON_NAME} and {PNG_NAME} are written",
    )  # fmt: skip
    parser.add_argument(
        "--results-md", type=Path, default=DEFAULT_RESULTS_MD,
        help=f"Markdown file whose section between '{MARK_START}' and '{MARK_END}' is "
        "replaced (or appended; the file is created if absent)",
    )  # fmt: skip
    parser.add_argument(
        "--report-only", action="store_true",
        help=f"do not measure: rebuild the figure and the Markdown section from the existing "
        f"<out-dir>/{JSON_NAME}",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bars and no table")
    return parser


# ------------------------------------------------------------------------------- I/O
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


# ------------------------------------------------------------------------------- measuring
def _command_line(argv: list[str]) -> str:
    return shlex.join(["python", "benchmarks/layer_error.py", *argv])


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "sklearn": sklearn.__version__,
        "chanprune": chanprune.__version__,
    }


def _machine() -> dict[str, Any]:
    return {
        "processor": platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "system": platform.system(),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
    }


def _load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not available on Windows
        return None


def _image_subsets(data_dir: Path, n_images: int, n_heldout: int, seed: int):
    """Disjoint, class-stratified calibration and held-out subsets of the image folder."""
    dataset = ImageFolder(data_dir, preprocess="cifar")
    if n_images + n_heldout > len(dataset):
        raise ValueError(
            f"--n-images ({n_images}) + --n-heldout ({n_heldout}) exceed the "
            f"{len(dataset)} images of {data_dir}."
        )
    fit = calibration_subset(dataset, n_images, seed=seed)
    taken = set(fit.indices)
    rest = Subset(dataset, [i for i in range(len(dataset)) if i not in taken])
    held = calibration_subset(rest, n_heldout, seed=seed + 1)
    held_indices = [rest.indices[i] for i in held.indices]
    return Subset(dataset, fit.indices), Subset(dataset, held_indices)


def _collect_stats(model, layers, subset, *, positions, seed, batch_size, quiet, desc):
    """One forward pass per batch; sampled (patch, BN output) rows -> LayerStats per layer."""
    generator = torch.Generator().manual_seed(seed)
    stats = {
        name: LayerStats(conv.in_channels, conv.out_channels, conv.kernel_size)
        for name, (conv, _bn) in layers.items()
    }
    map_sizes: dict[str, list[int]] = {}
    # Distinct keys: inputs and outputs share the recording dict.
    inputs = {f"{name}:x": conv for name, (conv, _bn) in layers.items()}
    outputs = {f"{name}:y": bn for name, (_conv, bn) in layers.items()}
    loader = make_loader(subset, batch_size)
    with torch.no_grad(), record_activations(inputs=inputs, outputs=outputs) as rec:
        for images, _labels in tqdm(loader, desc=desc, disable=quiet, leave=False):
            rec.clear()
            model(images)
            for name, (conv, _bn) in layers.items():
                x, y = rec[f"{name}:x"], rec[f"{name}:y"]
                out_size = (int(y.shape[2]), int(y.shape[3]))
                map_sizes[name] = list(out_size)
                pos = sample_positions(x.shape[0], out_size, positions, generator)
                stats[name].update(extract_patches(x, conv, pos), gather_outputs(y, pos))
            rec.clear()  # free the full maps before the next batch
    return stats, map_sizes


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    checkpoint = args.checkpoint or args.shared_dir / "models" / "vgg16_bn_cifar10.pth"
    data_dir = args.data_dir or args.shared_dir / "data" / "cifar10-jpeg" / "train5k"
    needed = [checkpoint, data_dir]
    if args.checkpoint is None or args.data_dir is None:
        needed.insert(0, args.shared_dir)
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        print(
            "layer_error.py: needs the shared checkpoints and CIFAR-10 images; missing: "
            + ", ".join(missing)
            + ". Pass --shared-dir (or --checkpoint and --data-dir).",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    load_start = _load_average()
    t_start = time.perf_counter()
    model = get_model("vgg16_bn_cifar10", weights=checkpoint).eval()
    layers = {}
    for name in args.layers:
        idx = VGG16_CONVS[name]
        conv, bn = model.features[idx], model.features[idx + 1]
        if not isinstance(conv, torch.nn.Conv2d) or not isinstance(bn, torch.nn.BatchNorm2d):
            raise RuntimeError(f"features[{idx}] of the model is not a conv followed by BN.")
        layers[name] = (conv, bn)

    fit_set, held_set = _image_subsets(data_dir, args.n_images, args.n_heldout, args.seed)
    common = dict(positions=args.positions, batch_size=args.batch_size, quiet=args.quiet)
    fit_stats, map_sizes = _collect_stats(
        model, layers, fit_set, seed=args.seed, desc="calibration", **common
    )
    held_stats, _ = _collect_stats(
        model, layers, held_set, seed=args.seed + 1, desc="held-out", **common
    )
    t_collect = time.perf_counter() - t_start

    layer_info: dict[str, Any] = {}
    folded = {}
    for name, (conv, bn) in layers.items():
        fconv = fold_batchnorm(conv, bn)
        weight = fconv.weight.detach().double().numpy()
        bias = fconv.bias.detach().double().numpy()
        folded[name] = (weight, bias)
        fit_m, held_m = fit_stats[name].moments(), held_stats[name].moments()
        n, c = weight.shape[:2]
        all_ch = np.arange(c)
        w2 = weight.reshape(n, -1)
        layer_info[name] = {
            "features_index": VGG16_CONVS[name],
            "in_channels": int(c),
            "out_channels": int(n),
            "kernel_size": list(conv.kernel_size),
            "map_size": map_sizes[name],
            "n_samples": fit_m.n_samples,
            "n_samples_heldout": held_m.n_samples,
            "unknowns_per_output_full": int(fit_m.n_features + 1),
            # Sanity: all channels with the folded weights reproduce Y (float32 forward).
            "rel_error_all_channels": reconstruction_error(fit_m, all_ch, w2, bias) / fit_m.yty,
            "rel_error_all_channels_heldout": reconstruction_error(held_m, all_ch, w2, bias)
            / held_m.yty,
        }

    results: list[dict[str, Any]] = []
    jobs = [(name, r, m) for name in layers for r in args.ratios for m in args.methods]
    t_solve = time.perf_counter()
    moments_cache: dict[str, tuple] = {}
    for name, ratio, method in tqdm(jobs, desc="solve", disable=args.quiet, leave=False):
        if name not in moments_cache:
            moments_cache.clear()  # one layer's moments in memory at a time
            moments_cache[name] = (fit_stats[name].moments(), held_stats[name].moments())
        fit_m, held_m = moments_cache[name]
        weight, bias = folded[name]
        c = weight.shape[1]
        keep = min(c, max(1, round(ratio * c)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = prune_layer_from_stats(
                fit_m, weight, bias, keep=keep, method=method, refit=True,
                ridge=args.ridge, random_state=args.seed,
            )  # fmt: skip
            held = reconstruction_error(
                held_m, res.kept, res.weight.reshape(weight.shape[0], -1), res.bias
            )
        results.append(
            {
                "layer": name,
                "ratio": ratio,
                "keep": keep,
                "method": method,
                "rel_error_no_refit": float(res.rel_error_before_refit),
                "rel_error_refit": float(res.rel_error),
                "rel_error_heldout": float(held / held_m.yty),
                "time_s": float(res.time_s),
                "alpha": None if res.alpha is None else float(res.alpha),
                "exact": bool(res.exact),
                "n_iter": int(res.n_iter),
                "kept": [int(i) for i in res.kept],
                "warnings": sorted({f"{w.category.__name__}: {w.message}" for w in caught}),
            }
        )
    t_end = time.perf_counter()

    data = {
        "benchmark": "layer_error",
        "description": (
            "single-layer relative reconstruction error ||Y - Y'||^2 / ||Y||^2 of VGG-16-BN "
            "(CIFAR-10) convs, X and Y from the original network, BN folded; no_refit = kept "
            "channels with original weights (lasso: scaled by beta) and original bias; refit "
            "= least-squares weights and intercept; heldout = refit solution on other images"
        ),
        "config": {
            "command": _command_line(argv),
            "model": "vgg16_bn_cifar10",
            "checkpoint": checkpoint.name,
            "data": "/".join(data_dir.parts[-2:]),
            "layers": list(args.layers),
            "ratios": list(args.ratios),
            "methods": list(args.methods),
            "n_images": args.n_images,
            "n_heldout": args.n_heldout,
            "positions": args.positions,
            "seed": args.seed,
            "ridge": args.ridge,
            "batch_size": args.batch_size,
            "versions": _versions(),
            # The 1-minute load average shows whether other work shared the CPU (timings).
            "machine": {
                **_machine(),
                "load_avg_start": load_start,
                "load_avg_end": _load_average(),
            },
        },
        "timing_s": {
            "collect": t_collect,
            "solve": t_end - t_solve,
            "total": t_end - t_start,
        },
        "layers": layer_info,
        "results": results,
    }
    json_path = args.out_dir / JSON_NAME
    _atomic_write_text(json_path, dumps_results(data))
    if not args.quiet:
        print(format_table(data))
        print(f"wrote {json_path}")
    _report(data, args)
    return 0


# ------------------------------------------------------------------------------- reporting
def dumps_results(data: dict) -> str:
    """JSON text: indented, except one compact line per entry of ``results``."""
    parts = []
    for key, value in data.items():
        if key == "results":
            rows = ",\n  ".join(json.dumps(r, separators=(",", ":")) for r in value)
            text = f"[\n  {rows}\n ]" if value else "[]"
        else:
            text = json.dumps(value, indent=1).replace("\n", "\n ")
        parts.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _factor(value: float) -> str:
    """A ratio of errors for prose; huge ones (a near-zero denominator) are capped."""
    return ">1000x" if value > 1000 else f"{value:.2f}x"


def _grid(data: dict, layer: str, key: str) -> dict[tuple[str, float], float]:
    return {(r["method"], r["ratio"]): r[key] for r in data["results"] if r["layer"] == layer}


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if value >= 0.01:
        return f"{value:.3f}"
    return f"{value:.1e}"


def format_table(data: dict) -> str:
    """The compact text table: one row per (layer, ratio, method)."""
    head = (
        f"{'layer':<8} {'ratio':>5} {'keep':>4} {'method':<12} "
        f"{'no-refit':>9} {'refit':>9} {'held-out':>9} {'time_s':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in data["results"]:
        lines.append(
            f"{r['layer']:<8} {r['ratio']:>5.2f} {r['keep']:>4d} {r['method']:<12} "
            f"{r['rel_error_no_refit']:>9.4f} {r['rel_error_refit']:>9.4f} "
            f"{r['rel_error_heldout']:>9.4f} {r['time_s']:>7.2f}"
        )
    return "\n".join(lines)


def make_figure(data: dict, path: Path) -> None:
    """One subplot per layer: error vs kept ratio; solid = refit, dashed = no refit."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = data["config"]
    layers, methods, ratios = cfg["layers"], cfg["methods"], cfg["ratios"]
    colours = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(ALL_METHODS)}
    fig, axes = plt.subplots(
        1, len(layers), figsize=(4.6 * len(layers), 4.2), squeeze=False, constrained_layout=True
    )
    for ax, layer in zip(axes[0], layers):
        refit = _grid(data, layer, "rel_error_refit")
        plain = _grid(data, layer, "rel_error_no_refit")
        for m in methods:
            xs = [r for r in ratios if (m, r) in refit]
            # Log scale: clip exact zeros (e.g. keep = c) to a tiny positive value.
            ax.plot(
                xs, [max(refit[m, r], 1e-12) for r in xs], "-o", ms=3,
                color=colours[m], label=f"{m} (refit)",
            )  # fmt: skip
            ax.plot(
                xs, [max(plain[m, r], 1e-12) for r in xs], "--", color=colours[m], alpha=0.8,
                label=f"{m} (no refit)",
            )  # fmt: skip
        info = data["layers"][layer]
        ax.set_title(
            f"{layer}: {info['in_channels']}->{info['out_channels']}, "
            f"{info['map_size'][0]}x{info['map_size'][1]} map, N={info['n_samples']}",
            fontsize=9,
        )
        ax.set_xlabel("kept ratio c'/c")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("relative reconstruction error")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle(
        f"VGG-16-BN CIFAR-10, single layer: solid = LS refit, dashed = no refit "
        f"({cfg['n_images']} images x {cfg['positions']} positions)",
        fontsize=10,
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    _atomic_write_bytes(path, buf.getvalue())


def _count(n: int, total: int) -> str:
    return f"{n} of {total}"


def observations(data: dict) -> list[str]:
    """Sentences computed from the numbers (no hand-written claims)."""
    cfg = data["config"]
    methods, layers, ratios = cfg["methods"], cfg["layers"], cfg["ratios"]
    results = data["results"]
    by_key = {(r["layer"], r["ratio"], r["method"]): r for r in results}
    points = [(lay, rat) for lay in layers for rat in ratios]
    total = len(points)
    out: list[str] = []

    # 1. Which selector wins, with refit, held-out and without refit.
    parts = []
    for key, what in (
        ("rel_error_refit", "with refit"),
        ("rel_error_heldout", "held-out"),
        ("rel_error_no_refit", "without refit"),
    ):
        wins = dict.fromkeys(methods, 0)
        for lay, rat in points:
            best = min(methods, key=lambda m, lay=lay, rat=rat: by_key[lay, rat, m][key])
            wins[best] += 1
        ranked = sorted((m for m in methods if wins[m]), key=lambda m: -wins[m])
        parts.append(f"{what}: " + ", ".join(f"{m} at {wins[m]}" for m in ranked))
    out.append(f"Lowest error at each of the {total} (layer, ratio) points, " + "; ".join(parts))
    out[-1] += "."

    # 2. Mean rank with refit, and the informed selectors against the naive baselines.
    ranks = {m: [] for m in methods}
    for lay, rat in points:
        order = sorted(
            methods, key=lambda m, lay=lay, rat=rat: by_key[lay, rat, m]["rel_error_refit"]
        )
        for i, m in enumerate(order):
            ranks[m].append(i + 1)
    mean_rank = {m: statistics.mean(v) for m, v in ranks.items()}
    sentence = "Mean rank by refit error (1 = best): " + ", ".join(
        f"{m} {mean_rank[m]:.2f}" for m in sorted(methods, key=mean_rank.get)
    )
    informed = [m for m in ("lasso", "greedy_ls") if m in methods]
    baselines = [m for m in BASELINES if m in methods]
    if informed and baselines:
        parts = []
        for m in informed:
            n_beat = sum(
                all(
                    by_key[lay, rat, m]["rel_error_refit"] <= by_key[lay, rat, b]["rel_error_refit"]
                    for b in baselines
                )
                for lay, rat in points
            )
            ratio_err = [
                min(by_key[lay, rat, b]["rel_error_refit"] for b in baselines)
                / max(by_key[lay, rat, m]["rel_error_refit"], 1e-300)
                for lay, rat in points
            ]
            parts.append(
                f"{m} at {_count(n_beat, total)} points (median best-baseline/{m} error "
                f"{_factor(statistics.median(ratio_err))})"
            )
        sentence += (
            f"; with refit the error is at or below both {' and '.join(baselines)} for "
            + " and ".join(parts)
        )
    out.append(sentence + ".")

    # 3. What the refit buys, and whether it ever hurts.
    worse = [
        r for r in results if r["rel_error_refit"] > r["rel_error_no_refit"] * (1 + 1e-9) + 1e-12
    ]
    per_method = []
    for m in methods:
        g = [
            r["rel_error_no_refit"] / r["rel_error_refit"]
            for r in results
            if r["method"] == m and r["rel_error_refit"] > 0
        ]
        if g:
            per_method.append(f"{m} {_factor(statistics.median(g))}")
    if per_method:
        out.append(
            "The least-squares refit lowers the in-sample error by a median factor of "
            + ", ".join(per_method)
            + f"; it is above the no-refit error in {_count(len(worse), len(results))} runs."
        )

    # 4. Monotonicity in the ratio, the held-out gap, and LASSO's exact budget.
    curves = [(lay, m) for lay in layers for m in methods]
    steps = list(zip(sorted(ratios), sorted(ratios)[1:]))
    mono = sum(
        all(
            by_key[lay, a, m]["rel_error_refit"] >= by_key[lay, b, m]["rel_error_refit"] - 1e-12
            for a, b in steps
        )
        for lay, m in curves
    )
    sentence = (
        f"The refit error falls monotonically with the kept ratio on "
        f"{_count(mono, len(curves))} (layer, method) curves."
    )
    # Relative gap, ignoring in-sample errors at rounding level (an exact fit).
    gaps = [
        (r["rel_error_heldout"] / r["rel_error_refit"], r)
        for r in results
        if r["rel_error_refit"] > 1e-9
    ]
    if gaps:
        worst, w = max(gaps, key=lambda t: t[0])
        info = data["layers"][w["layer"]]
        unknowns = w["keep"] * info["kernel_size"][0] * info["kernel_size"][1] + 1
        sentence += (
            f" Held-out error exceeds the in-sample refit error by a median factor of "
            f"{_factor(statistics.median(g for g, _ in gaps))}, at most {_factor(worst)} "
            f"({w['layer']}, ratio {w['ratio']:g}, {w['method']}: {_fmt(w['rel_error_refit'])} "
            f"in-sample vs {_fmt(w['rel_error_heldout'])} held-out; {unknowns} unknowns per "
            f"output fitted on {info['n_samples']} samples)."
        )
    lasso_runs = [r for r in results if r["method"] == "lasso"]
    if lasso_runs:
        n_exact = sum(r["exact"] for r in lasso_runs)
        sentence += (
            f" The LASSO bisection hit the channel budget exactly in "
            f"{_count(n_exact, len(lasso_runs))} runs (the others truncated a denser solution)."
        )
    out.append(sentence)
    return out


def _load_note(machine: dict) -> str:
    start, end = machine.get("load_avg_start"), machine.get("load_avg_end")
    if start is None or end is None:
        return ""
    return f"; 1-minute load average {start:g} at the start and {end:g} at the end"


def markdown_section(data: dict, md_path: Path, png_path: Path) -> str:
    cfg = data["config"]
    methods, layers, ratios = cfg["methods"], cfg["layers"], cfg["ratios"]
    machine = cfg["machine"]
    versions = cfg["versions"]
    try:
        link = os.path.relpath(png_path, md_path.parent)
    except ValueError:  # different drives on Windows
        link = str(png_path)
    link = link.replace(os.sep, "/")
    lines = [
        MARK_START,
        "## Single-layer reconstruction error vs kept ratio (`benchmarks/layer_error.py`)",
        "",
        "Relative error ||Y - Y'||^2 / ||Y||^2 of one conv layer of the CIFAR-10 VGG-16-BN "
        "checkpoint, X and Y both from the original network (no accumulated error), BN folded "
        "into the conv. *refit*: least-squares weights and intercept on the kept channels; "
        "*no refit*: original weights (lasso: scaled by beta) and bias. *Held-out*: the refit "
        f"solution on {cfg['n_heldout']} other images. Fitted on {cfg['n_images']} images x "
        f"{cfg['positions']} positions (all positions of smaller maps), seed {cfg['seed']}, "
        f"ridge {cfg['ridge']:g}.",
        "",
        "```",
        cfg["command"],
        "```",
        "",
        f"Machine: {machine['nproc']}-core CPU ({machine['processor']}, {machine['system']}), "
        f"torch {versions['torch']} ({machine['torch_threads']} threads), numpy "
        f"{versions['numpy']}, scikit-learn {versions['sklearn']}. Wall time "
        f"{data['timing_s']['total']:.0f} s ({data['timing_s']['collect']:.0f} s collecting "
        f"statistics, {data['timing_s']['solve']:.0f} s solving)" + _load_note(machine) + ".",
        "",
        f"![single-layer error vs kept ratio]({link})",
        "",
        "Observations (computed from the JSON):",
        "",
    ]
    lines += [f"- {s}" for s in observations(data)]
    header = "| method | " + " | ".join(f"{r:g}" for r in ratios) + " |"
    rule = "|---|" + "---:|" * len(ratios)
    for layer in layers:
        info = data["layers"][layer]
        refit = _grid(data, layer, "rel_error_refit")
        plain = _grid(data, layer, "rel_error_no_refit")
        held = _grid(data, layer, "rel_error_heldout")
        lines += [
            "",
            f"### {layer} ({info['in_channels']} -> {info['out_channels']} channels, "
            f"{info['map_size'][0]}x{info['map_size'][1]} map, {info['n_samples']} samples, "
            f"{info['n_samples_heldout']} held-out)",
            "",
            "Cells: refit / no refit (in-sample).",
            "",
            header,
            rule,
        ]
        for m in methods:
            cells = [f"{_fmt(refit[m, r])} / {_fmt(plain[m, r])}" for r in ratios]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += ["", "Held-out error of the refit solution.", "", header, rule]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(_fmt(held[m, r]) for r in ratios) + " |")
    # Solver times: mean per run, per layer.
    lines += [
        "",
        "### Solver wall time (selection + refit), seconds per run, mean over the ratios",
        "",
        "| method | " + " | ".join(layers) + " |",
        "|---|" + "---:|" * len(layers),
    ]
    for m in methods:
        cells = []
        for layer in layers:
            times = [
                r["time_s"] for r in data["results"] if r["layer"] == layer and r["method"] == m
            ]
            cells.append(f"{statistics.mean(times):.2f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append(MARK_END)
    return "\n".join(lines) + "\n"


def update_results_md(md_path: Path, section: str) -> None:
    """Replace the marked section of ``md_path`` (or append it), atomically."""
    text = md_path.read_text(encoding="utf-8") if md_path.exists() else MD_TITLE
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start != -1 and end != -1 and end > start:
        text = text[:start] + section.rstrip("\n") + text[end + len(MARK_END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    if not text.endswith("\n"):
        text += "\n"
    _atomic_write_text(md_path, text)


def _report(data: dict, args: argparse.Namespace) -> None:
    png_path = args.out_dir / PNG_NAME
    make_figure(data, png_path)
    update_results_md(args.results_md, markdown_section(data, args.results_md, png_path))
    if not args.quiet:
        print(f"wrote {png_path}")
        print(f"updated {args.results_md}")


# ------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> int:
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [name for name in args.layers if name not in VGG16_CONVS]
    if unknown:
        parser.error(f"unknown layer(s) {unknown}; choose from {', '.join(VGG16_CONVS)}")
    args.layers = list(dict.fromkeys(args.layers))
    args.ratios = sorted(set(args.ratios))
    args.methods = list(dict.fromkeys(args.methods))
    if args.report_only:
        json_path = args.out_dir / JSON_NAME
        if not json_path.is_file():
            print(f"layer_error.py: --report-only needs {json_path}; run without it first.",
                  file=sys.stderr)  # fmt: skip
            return 2
        data = json.loads(json_path.read_text(encoding="utf-8"))
        if not args.quiet:
            print(format_table(data))
        _report(data, args)
        return 0
    return _run(args, argv)


if __name__ == "__main__":
    sys.exit(main())
