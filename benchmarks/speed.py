"""Pruning speed and memory: how the cost of ``chanprune.prune_model`` grows.

Whole-model runs (VGG-16-BN CIFAR from ../shared at 2x by default), each in a fresh
process so its peak memory is its own:

- as the number of calibration images N grows (``--n-images``, 10 positions per image);
- as the positions per image grow (``--positions``, at the largest N);
- the yardstick: one forward pass of the unpruned network over the same N images
  (channels-last, as the driver runs it), so the cost reads in forward passes.

chanprune keeps second moments, not samples, so its memory does not grow with N and its
time grows with N only through the forward passes and the moment products. For
comparison, ``--raw-layer`` times the original code's way on the largest layer (conv4_2,
c = 512, 3x3): keep every sampled row in memory, a LASSO on 400 of them, least squares
on all of them, against chanprune's statistics on the same rows.

``--device cuda --model vgg16`` times an ImageNet-size VGG-16 (224x224, random weights
and random images: the cost does not depend on them).

``--end-to-end`` times the whole command a user runs, ``chanprune prune`` in a fresh
process (starting Python and torch, decoding the images, pruning, saving the model and
the report), with the forward-pass yardstick timed in its own process just before.

``--rates`` shows where the yardstick's time goes on this machine: each module of one
forward pass timed on its own (conv rates in GMAC/s), beside the float32 GEMM rate of
numpy's and torch's BLAS measured before and after the pass (the practical peak).

Examples
--------
python benchmarks/speed.py --n-images 500 1000 2000 5000 --positions 5 10 20 --raw-layer
python benchmarks/speed.py --n-images 5000 --repeat 3 --rerun   # median of 3, with the range
python benchmarks/speed.py --device cuda --model vgg16 --n-images 1000 5000
python benchmarks/speed.py --rates --n-images 5000                # the pass, module by module
python benchmarks/speed.py --end-to-end --n-images 5000 --repeat 5  # the CLI, start to finish
python benchmarks/speed.py --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _whole_model import (  # noqa: E402
    REPO,
    SHARED,
    forward_pass_s,
    git_commit,
    peak_rss_mb,
    replace_section,
    save_figure,
    sync_device,
    write_atomic,
)

OUT = REPO / "benchmarks" / "results" / "speed.json"
MARK = "speed"
RAW_LAYER = "features.27"  # conv4_2 of the CIFAR VGG-16-BN: 512 -> 512 channels, 4x4 maps
GEMM_SIZE = 4096  # square float32 matrices for the BLAS rate


# ---------------------------------------------------------------------------- one run
def _images(config: dict):
    """Calibration images as a tensor, and the seconds spent decoding them."""
    import torch

    from chanprune.prune import load_calibration_images

    start = time.perf_counter()
    if config["model"] == "vgg16_bn_cifar10":
        from chanprune.data import ImageFolder

        root = Path(config["shared"]) / "data" / "cifar10-jpeg" / "train5k"
        calib = ImageFolder(root, preprocess="cifar")
        images = load_calibration_images(calib, config["n_images"], seed=0, progress=False)
    else:  # timing only: random 224x224 images
        g = torch.Generator().manual_seed(0)
        images = torch.randn(config["n_images"], 3, 224, 224, generator=g)
    return images, time.perf_counter() - start


def _model(config: dict):
    import torch

    from chanprune.models import get_model

    torch.manual_seed(0)
    if config["model"] == "vgg16_bn_cifar10":
        weights = Path(config["shared"]) / "models" / "vgg16_bn_cifar10.pth"
        return get_model(config["model"], weights=weights).eval()
    return get_model(config["model"]).eval()  # random weights


def run_whole(config: dict) -> dict:
    """Prune once; time the forward-pass yardstick in the same process first."""
    import torch

    from chanprune.prune import prune_model

    device = config["device"]
    if not config.get("tf32", True):  # strict float32 convolutions and matmuls on CUDA
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    images, load_s = _images(config)
    model = _model(config)
    forward = forward_pass_s(model, images, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync_device(device)
    start = time.perf_counter()
    _, report = prune_model(
        model, images, speedup=config["speedup"], method=config["method"],
        positions_per_image=config["positions"], device=device, seed=0, progress=False,
    )  # fmt: skip
    sync_device(device)
    wall = time.perf_counter() - start
    out = {
        "config": {k: v for k, v in config.items() if k != "shared"},
        "commit": git_commit(),
        "wall_time_s": wall,
        "forward_pass_s": forward,
        "load_s": load_s,
        "peak_rss_mb": peak_rss_mb(),
        "speedup": report.speedup,
        "layer_time_s": {layer.name: layer.time_s for layer in report.layers},
        "n_samples": {layer.name: layer.n_samples for layer in report.layers},
    }
    if device.startswith("cuda"):
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    return out


def run_raw_layer(config: dict) -> dict:
    """The original code's per-layer solve against chanprune's, on the same sampled rows
    of conv4_2 (the input from the unpruned network: only the costs are compared)."""
    import numpy as np
    import torch

    from chanprune import LayerStats, prune_layer_from_stats
    from chanprune.sampling import extract_patches, gather_outputs, sample_positions
    from chanprune.sweep import folded_params as _folded

    images, _ = _images(config)
    model = _model(config)
    index = int(RAW_LAYER.split(".")[1])
    conv, bn = model.features[index], model.features[index + 1]
    weight, bias = _folded(conv, bn)
    keep = round(conv.in_channels * 0.7)
    g = torch.Generator().manual_seed(0)
    xs, ys = [], []
    with torch.inference_mode():
        for lo in range(0, images.shape[0], 100):
            x = model.features[:index](images[lo : lo + 100])
            y = torch.nn.functional.conv2d(x, weight, bias, padding=1)
            pos = sample_positions(x.shape[0], tuple(y.shape[2:]), config["positions"], g)
            xs.append(extract_patches(x, conv, pos).reshape(len(pos), -1))
            ys.append(gather_outputs(y, pos))
    rss_before = peak_rss_mb()

    # The original code: every row in memory, LASSO on 400 of them, lstsq on all of them.
    # The 400-row LASSO (a cost that does not grow with N) is solved through the exact
    # c x c reduction, the same minimiser as scikit-learn on the (400 n) x c design.
    start = time.perf_counter()
    X = torch.cat(xs)  # (rows, c k^2)
    Y = torch.cat(ys)
    rows = X.shape[0]
    c, k2 = conv.in_channels, conv.kernel_size[0] * conv.kernel_size[1]
    pick = torch.randperm(rows, generator=g)[:400]
    few = LayerStats.from_samples(X[pick].view(-1, c, *conv.kernel_size), Y[pick])
    kept = prune_layer_from_stats(few, weight, bias, keep=keep, method="lasso", refit=False).kept
    cols = torch.from_numpy((kept[:, None] * k2 + np.arange(k2)).ravel())
    design = torch.cat([X[:, cols], torch.ones(rows, 1)], dim=1)
    solution = torch.linalg.lstsq(design, Y).solution
    raw_error = float(((design @ solution - Y) ** 2).sum() / (Y**2).sum())
    raw_s = time.perf_counter() - start
    raw_peak = peak_rss_mb()

    # chanprune: moments of the same rows, then LASSO on the c x c reduction and refit.
    start = time.perf_counter()
    stats = LayerStats(c, weight.shape[0], conv.kernel_size, compute_dtype=torch.float32)
    for x, y in zip(xs, ys):
        stats.update(x.view(-1, c, *conv.kernel_size), y)
    result = prune_layer_from_stats(stats, weight, bias, keep=keep, method="lasso")
    stats_s = time.perf_counter() - start
    return {
        "config": {k: v for k, v in config.items() if k != "shared"},
        "rows": rows,
        "raw_s": raw_s,
        "raw_rel_error": raw_error,
        "stats_rel_error": float(result.rel_error),
        "raw_rows_mb": (X.numel() + Y.numel()) * 4 / 2**20,
        "raw_peak_rss_mb": raw_peak,
        "stats_s": stats_s,
        "stats_mb": (stats.xtx.numel() + stats.xty.numel()) * 8 / 2**20,
        "rss_before_mb": rss_before,
    }


def run_forward(config: dict) -> dict:
    """The yardstick alone: one forward pass over the decoded images, in this process."""
    images, load_s = _images(config)
    return {"forward_pass_s": forward_pass_s(_model(config), images, config["device"]),
            "load_s": load_s}  # fmt: skip


def run_cli(config: dict, workdir: Path) -> dict:
    """``chanprune prune`` on the shared CIFAR-10 calibration folder, in a fresh process:
    its wall time from start to exit, and the pruning time its own report gives."""
    shared = Path(config["shared"])
    out, report = workdir / "pruned.pt", workdir / "report.json"
    cmd = [
        sys.executable, "-m", "chanprune", "prune", "--model", config["model"],
        "--weights", str(shared / "models" / "vgg16_bn_cifar10.pth"),
        "--calib", str(shared / "data" / "cifar10-jpeg" / "train5k"),
        "--speedup", str(config["speedup"]), "--method", config["method"],
        "--n-images", str(config["n_images"]), "--device", config["device"],
        "--out", str(out), "--report", str(report), "--quiet",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"chanprune prune exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    pruned = json.loads(report.read_text())
    return {"wall_s": wall, "prune_s": pruned["wall_time_s"], "speedup": pruned["speedup"]}


def gemm_gmacs(library: str, size: int = GEMM_SIZE, repeat: int = 5) -> float:
    """The best float32 GEMM rate of ``library`` ("numpy" or "torch") on square ``size``
    matrices, in GMAC/s (best of ``repeat`` products after a warm-up)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    out = np.empty_like(a)
    if library == "numpy":
        product = lambda: np.matmul(a, b, out=out)  # noqa: E731
    else:
        ta, tb, tout = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out)
        product = lambda: torch.mm(ta, tb, out=tout)  # noqa: E731
    product()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - start)
    return size**3 / best / 1e9


def module_times(model, images, batch_size: int = 100) -> list[dict]:
    """One forward pass over ``images`` (channels-last, batch ``batch_size``, no grad),
    each module of ``model.features`` and the head timed on its own, summed over the
    batches. Each entry: name, kind, seconds, and for a conv its shape and MACs."""
    import torch
    from torch import nn

    from chanprune.flops import conv_macs

    features = list(model.features.named_children())
    entries = [{"name": f"features.{name}", "kind": type(m).__name__, "seconds": 0.0}
               for name, m in features]  # fmt: skip
    entries.append({"name": "head", "kind": "head", "seconds": 0.0})
    with torch.inference_mode():
        model(images[:2].contiguous(memory_format=torch.channels_last))  # warm-up
        for lo in range(0, images.shape[0], batch_size):
            x = images[lo : lo + batch_size].contiguous(memory_format=torch.channels_last)
            for entry, (_, module) in zip(entries, features):
                start = time.perf_counter()
                y = module(x)
                entry["seconds"] += time.perf_counter() - start
                if isinstance(module, nn.Conv2d):
                    h, w = y.shape[2:]
                    macs = conv_macs(h, w, module.out_channels, module.in_channels,
                                     *module.kernel_size, groups=module.groups)  # fmt: skip
                    entry["macs"] = entry.get("macs", 0) + macs * x.shape[0]
                    entry["shape"] = [module.in_channels, module.out_channels, h, w]
                x = y
            start = time.perf_counter()
            model.classifier(torch.flatten(model.avgpool(x), 1))
            entries[-1]["seconds"] += time.perf_counter() - start
    return entries


def run_rates(config: dict) -> dict:
    """The yardstick's pass module by module, between two measurements of the GEMM rate."""
    images, _ = _images(config)
    model = _model(config)
    before = {lib: gemm_gmacs(lib) for lib in ("numpy", "torch")}
    start = time.perf_counter()
    modules = module_times(model, images)
    pass_s = time.perf_counter() - start
    after = {lib: gemm_gmacs(lib) for lib in ("numpy", "torch")}
    return {
        "config": {k: v for k, v in config.items() if k != "shared"},
        "commit": git_commit(),
        "gemm_gmacs_before": before,
        "gemm_gmacs_after": after,
        "gemm_size": GEMM_SIZE,
        "pass_s": pass_s,
        "modules": modules,
    }


# ---------------------------------------------------------------------------- report
def rates_markdown(rates: dict) -> list[str]:
    """The ``--rates`` table: convs one by one, the other modules by kind."""
    n = rates["config"]["n_images"]
    convs = [m for m in rates["modules"] if "macs" in m]
    conv_s = sum(m["seconds"] for m in convs)
    macs = sum(m["macs"] for m in convs)
    before, after = rates["gemm_gmacs_before"], rates["gemm_gmacs_after"]
    size = rates["gemm_size"]
    lines = [
        f"### Where one forward pass goes ({rates['config']['model']}, {n} images)",
        "",
        f"Each module of the yardstick's pass timed on its own (channels-last, batch 100, "
        f"no grad), code {rates.get('commit')}. Float32 GEMM of two {size}x{size} matrices, "
        f"best of 5, just before / after the pass: numpy (OpenBLAS) "
        f"{before['numpy']:.0f} / {after['numpy']:.0f} GMAC/s, torch "
        f"{before['torch']:.0f} / {after['torch']:.0f} GMAC/s. The whole pass took "
        f"{rates['pass_s']:.1f} s: its convolutions {conv_s:.1f} s for "
        f"{macs / 1e12:.2f} TMAC ({macs / conv_s / 1e9:.0f} GMAC/s), every other module "
        f"{rates['pass_s'] - conv_s:.1f} s.",
        "",
        "| conv | in -> out channels | output map | seconds | GMAC/s |",
        "|---|---|---|---|---|",
    ]
    for m in convs:
        c_in, c_out, h, w = m["shape"]
        lines.append(
            f"| {m['name']} | {c_in} -> {c_out} | {h}x{w} | {m['seconds']:.2f} "
            f"| {m['macs'] / m['seconds'] / 1e9:.0f} |"
        )
    for kind in sorted({m["kind"] for m in rates["modules"] if "macs" not in m}):
        total = sum(m["seconds"] for m in rates["modules"] if m["kind"] == kind)
        lines.append(f"| all {kind} | | | {total:.2f} | |")
    return lines + [""]


def end_to_end_markdown(e2e: dict) -> list[str]:
    """The ``--end-to-end`` line: the CLI's wall time, its pruning time, the yardstick."""
    c, run = e2e["config"], _median_run(e2e["repeats"])
    walls = [r["wall_time_s"] for r in e2e["repeats"]]

    return [
        f"### End to end: `chanprune prune`, {c['model']} at {c['speedup']:g}x, {c['method']}, "
        f"{c['n_images']} images",
        "",
        f"The command in a fresh process, from start to exit (Python and torch start-up, "
        f"decoding the JPEGs, pruning, writing the model and the report), {len(walls)} runs, "
        f"code {e2e.get('commit')}; the median run (range of all runs) and the other figures "
        f"of that run:",
        "",
        "| end to end | of which prune_model | forward pass (own process, just before) "
        "| end to end / forward |",
        "|---|---|---|---|",
        f"| {run['wall_time_s']:.1f} s ({min(walls):.1f}-{max(walls):.1f}) "
        f"| {run['prune_time_s']:.1f} s | {run['forward_pass_s']:.1f} s "
        f"| {run['wall_time_s'] / run['forward_pass_s']:.1f} |",
        "",
    ]


def markdown(results: dict) -> str:
    lines = [f"<!-- {MARK}:start -->", "## Pruning speed and memory (`benchmarks/speed.py`)", ""]
    lines += [
        "Wall time of `prune_model` alone (the images are decoded beforehand; decoding is "
        "listed apart), VGG-16-BN CIFAR at 2x with LASSO unless stated, each configuration "
        "in a fresh process; peak = max RSS of that process. The yardstick is one forward "
        "pass of the unpruned network over the same images, channels-last, batch 100, "
        "timed in the same process just before. With several runs of a configuration the "
        "median one is shown, with the range of all. `vgg16` rows: an ImageNet-size VGG-16 "
        "(224x224) with random weights and random images (the cost does not depend on "
        "them), on CUDA; its peak is the most GPU memory allocated, mostly the activation "
        "caches (`max_cache_mb`, by default 3/4 of the free GPU memory). On CUDA the "
        "convolutions use PyTorch's defaults (TF32 allowed in cuDNN), in the yardstick as "
        "in the sweep; the statistics products never use TF32.",
        "",
        "```",
        "python benchmarks/speed.py --n-images 500 1000 2000 5000 --positions 5 10 20 --raw-layer",
        "python benchmarks/speed.py --n-images 5000 --repeat 3 --rerun",
        "python benchmarks/speed.py --device cuda --model vgg16 --n-images 1000 5000",
        "python benchmarks/speed.py --device cuda --model vgg16 --n-images 5000 --repeat 3 --rerun",
        "python benchmarks/speed.py --rates --n-images 5000",
        "python benchmarks/speed.py --end-to-end --n-images 5000 --repeat 5",
        "```",
        "",
    ]
    for device, machine in sorted(results.get("machines", {}).items()):
        lines += [f"Machine ({device}): {machine}.", ""]
    runs = results.get("runs", {})
    if runs:
        lines += [
            "| device | model | N | positions | prune (s) | forward pass (s) | prune / forward "
            "| decode (s) | peak (GB) | speed-up | code |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(
            runs.values(),
            key=lambda r: (r["config"]["device"], r["config"]["model"],
                           r["config"]["positions"], r["config"]["n_images"]),
        ):  # fmt: skip
            c = r["config"]
            peak = r.get("peak_cuda_mb", r["peak_rss_mb"]) / 1024
            where = r.get("gpu", c["device"])
            if "gpu" in r:
                where += ", TF32 convs" if c.get("tf32", True) else ", strict fp32"

            wall = f"{r['wall_time_s']:.1f}"
            if "wall_times_s" in r:
                walls = r["wall_times_s"]
                wall += f" ({min(walls):.1f}-{max(walls):.1f}, {len(walls)} runs)"
            lines.append(
                f"| {where} | {c['model']} | {c['n_images']} | {c['positions']} "
                f"| {wall} | {r['forward_pass_s']:.1f} "
                f"| {r['wall_time_s'] / r['forward_pass_s']:.1f} | {r['load_s']:.1f} "
                f"| {peak:.2f}{' (CUDA)' if 'peak_cuda_mb' in r else ''} | {r['speedup']:.2f}x "
                f"| {r.get('commit') or 'before 94f6180'} |"
            )
        lines.append("")
    raw = results.get("raw_layer", {})
    if raw:
        lines += [
            f"### One layer ({RAW_LAYER}, conv4_2), the original code's way vs statistics",
            "",
            "Same sampled rows (10 positions per image); *raw*: all rows kept in memory, "
            "LASSO on 400 of them (through the exact c x c reduction), `lstsq` on all rows; "
            "*statistics*: `LayerStats` (float32 products, float64 sums) then "
            "`prune_layer_from_stats` (LASSO on the exact c x c reduction of all rows, "
            "Cholesky refit).",
            "",
            "| N | rows | raw (s) | raw rows in memory (MB) | raw rel. error | statistics (s) "
            "| statistics in memory (MB) | statistics rel. error |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(raw.values(), key=lambda r: r["config"]["n_images"]):
            lines.append(
                f"| {r['config']['n_images']} | {r['rows']} | {r['raw_s']:.1f} "
                f"| {r['raw_rows_mb']:.0f} | {r['raw_rel_error']:.4f} | {r['stats_s']:.1f} "
                f"| {r['stats_mb']:.0f} | {r['stats_rel_error']:.4f} |"
            )
        lines.append("")
    if results.get("end_to_end"):
        lines += end_to_end_markdown(results["end_to_end"])
    if results.get("rates"):
        lines += rates_markdown(results["rates"])
    if results.get("plot"):
        lines += [f"![wall time vs N](results/{results['plot']})", ""]
    lines.append(f"<!-- {MARK}:end -->")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> str | None:
    """Wall time and forward-pass time vs N (PNG); returns the file name."""
    runs = [r for r in results.get("runs", {}).values() if r["config"]["positions"] == 10]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for device, model in sorted({(r["config"]["device"], r["config"]["model"]) for r in runs}):
        rs = sorted((r for r in runs if (r["config"]["device"], r["config"]["model"])
                     == (device, model)), key=lambda r: r["config"]["n_images"])  # fmt: skip
        n = [r["config"]["n_images"] for r in rs]
        where = f"{model}, {device}"
        ax.plot(n, [r["wall_time_s"] for r in rs], "o-", label=f"prune_model ({where})")
        ax.plot(n, [r["forward_pass_s"] for r in rs], "s--", label=f"one forward pass ({where})")
    ax.set_xlabel("calibration images N")
    ax.set_ylabel("seconds")
    ax.set_yscale("log")
    ax.set_title("Pruning at 2x: time vs N")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(results: dict, results_md: Path) -> None:
    replace_section(results_md, MARK, markdown(results))


# ---------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="vgg16_bn_cifar10",
                   choices=["vgg16_bn_cifar10", "vgg16"],
                   help="network (vgg16: ImageNet size, random weights; default: the CIFAR "
                        "VGG-16-BN of ../shared)")  # fmt: skip
    p.add_argument("--n-images", nargs="+", type=int, default=[500, 1000, 2000, 5000],
                   help="calibration images N to sweep, 10 positions each "
                        "(default: 500 1000 2000 5000)")  # fmt: skip
    p.add_argument(
        "--positions",
        nargs="+",
        type=int,
        default=[10],
        help="positions per image to sweep at the largest N (default: 10)",
    )
    p.add_argument("--speedup", type=float, default=2.0, help="MAC speed-up (default: 2)")
    p.add_argument("--method", default="lasso", help="selector (default: lasso)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument(
        "--no-tf32", action="store_true",
        help="CUDA: turn off TF32 for convolutions (PyTorch's default allows it in cuDNN on "
             "Ampere and later), so every pass runs in strict float32",
    )  # fmt: skip
    p.add_argument(
        "--raw-layer",
        action="store_true",
        help="also time the original code's per-layer solve on conv4_2 for each N",
    )
    p.add_argument(
        "--repeat", type=int, default=1,
        help="runs per whole-model configuration; the run with the median wall time is "
             "kept, with every wall time and forward-pass time beside it (this machine's "
             "speed drifts by tens of percent between minutes; default: 1)",
    )  # fmt: skip
    p.add_argument(
        "--end-to-end", action="store_true",
        help="instead of prune_model in-process: time 'chanprune prune' in a fresh process "
             "at the largest N, --repeat times, each after the yardstick in its own process "
             "(the shared CIFAR VGG-16-BN only)",
    )  # fmt: skip
    p.add_argument(
        "--rates", action="store_true",
        help="instead of pruning: time each module of one forward pass over the largest N "
             "images, and the float32 GEMM rate before and after it (CPU)",
    )  # fmt: skip
    p.add_argument("--rerun", action="store_true", help="recompute configurations in the JSON")
    p.add_argument("--report-only", action="store_true", help="rebuild RESULTS.md and the plot")
    p.add_argument("--shared", type=Path, default=SHARED, help=f"shared folder ({SHARED})")
    p.add_argument("--out", type=Path, default=OUT, help=f"results JSON ({OUT})")
    p.add_argument("--results-md", type=Path, default=REPO / "benchmarks" / "RESULTS.md",
                   help="Markdown summary to update")  # fmt: skip
    p.add_argument("--single", help=argparse.SUPPRESS)  # internal: one configuration
    return p.parse_args(argv)


def _child(config: dict) -> dict | None:
    cmd = [sys.executable, __file__, "--single", json.dumps(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        print(f"{config}: FAILED\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(line[len("RESULT ") :])


def _median_run(repeats: list[dict]) -> dict:
    """The run with the median wall time, carrying every repeat's wall and forward times."""
    order = sorted(repeats, key=lambda r: r["wall_time_s"])
    run = dict(order[(len(order) - 1) // 2])
    if len(repeats) > 1:
        run["wall_times_s"] = [r["wall_time_s"] for r in repeats]
        run["forward_times_s"] = [r["forward_pass_s"] for r in repeats]
    return run


def _end_to_end(args, base: dict) -> dict | None:
    """``--end-to-end``: alternate the yardstick and the CLI, ``--repeat`` times; the
    record of all runs (None if one failed)."""
    import tempfile

    config = dict(base, n_images=max(args.n_images))
    repeats = []
    for _ in range(max(args.repeat, 1)):
        forward = _child(dict(config, positions=10, kind="forward"))
        if forward is None:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            try:
                cli = run_cli(config, Path(tmp))
            except RuntimeError as err:
                print(err, file=sys.stderr)
                return None
        repeats.append({"wall_time_s": cli["wall_s"], "prune_time_s": cli["prune_s"],
                        "forward_pass_s": forward["forward_pass_s"]})  # fmt: skip
        print(f"end to end {cli['wall_s']:.1f} s (prune_model {cli['prune_s']:.1f} s), "
              f"forward {forward['forward_pass_s']:.1f} s")  # fmt: skip
    return {"config": {k: v for k, v in config.items() if k != "shared"},
            "commit": git_commit(), "repeats": repeats}  # fmt: skip


def _sweep(args, base: dict, results: dict) -> int:
    """The prune runs (and ``--raw-layer``) not yet in ``results``, each saved as it ends;
    the number of configurations that failed."""
    configs = [dict(base, n_images=n, positions=10) for n in args.n_images]
    configs += [dict(base, n_images=max(args.n_images), positions=p)
                for p in args.positions if p != 10]  # fmt: skip
    failed = 0
    for config in configs:
        k = f"{args.device}/{args.model}/{config['n_images']}/{config['positions']}"
        k += "/no-tf32" if args.no_tf32 else ""
        if k in results["runs"] and not args.rerun:
            continue
        repeats = [_child(config) for _ in range(max(args.repeat, 1))]
        if any(run is None for run in repeats):
            failed += 1
            continue
        run = _median_run(repeats)
        results["runs"][k] = run
        print(f"{k}: prune {run['wall_time_s']:.1f} s, forward {run['forward_pass_s']:.1f} s, "
              f"peak {run['peak_rss_mb'] / 1024:.2f} GB")  # fmt: skip
        write_atomic(args.out, json.dumps(results, indent=1))
    if args.raw_layer and args.model == "vgg16_bn_cifar10":
        for n in args.n_images:
            k = str(n)
            if k in results["raw_layer"] and not args.rerun:
                continue
            run = _child(dict(base, n_images=n, positions=10, kind="raw"))
            if run is None:
                failed += 1
                continue
            results["raw_layer"][k] = run
            print(f"raw layer N={n}: raw {run['raw_s']:.1f} s / {run['raw_rows_mb']:.0f} MB, "
                  f"statistics {run['stats_s']:.1f} s")  # fmt: skip
            write_atomic(args.out, json.dumps(results, indent=1))
    return failed


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.single:
        config = json.loads(args.single)
        runs = {"raw": run_raw_layer, "rates": run_rates, "forward": run_forward}
        run = runs.get(config.get("kind"), run_whole)
        print("RESULT " + json.dumps(run(config)), flush=True)
        return 0
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if "machine" in results:  # files written before runs on several devices
        results.setdefault("machines", {})["cpu"] = results.pop("machine")
    results.setdefault("runs", {})
    results.setdefault("raw_layer", {})
    if not args.report_only:
        if args.model == "vgg16_bn_cifar10" and not (args.shared / "models").is_dir():
            print(f"error: the shared checkpoints are not at {args.shared}", file=sys.stderr)
            return 2
        if args.end_to_end and args.model != "vgg16_bn_cifar10":
            print("error: --end-to-end runs on the shared CIFAR VGG-16-BN only", file=sys.stderr)
            return 2
        import torch

        machine = (
            f"{os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads"
        )
        if args.device.startswith("cuda"):
            machine = f"{torch.cuda.get_device_name()}, {machine}"
        results.setdefault("machines", {})[args.device] = machine
        base = dict(model=args.model, speedup=args.speedup, method=args.method,
                    device=args.device, shared=str(args.shared))  # fmt: skip
        if args.no_tf32:
            base["tf32"] = False
        if args.rates:
            rates = _child(dict(base, n_images=max(args.n_images), positions=10, kind="rates"))
            if rates is None:
                return 1
            results["rates"] = rates
        elif args.end_to_end:
            e2e = _end_to_end(args, base)
            if e2e is None:
                return 1
            results["end_to_end"] = e2e
        else:
            failed = _sweep(args, base, results)
            if failed:
                print(f"{failed} configuration(s) failed", file=sys.stderr)
    results["plot"] = plot(results, args.out.with_suffix(".png"))
    write_atomic(args.out, json.dumps(results, indent=1))
    write_report(results, args.results_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
