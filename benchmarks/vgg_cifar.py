"""Whole-model pruning of the CIFAR-10 VGG-16-BN from ../shared, without fine-tuning.

For each (method, schedule, speed-up) the network is pruned with ``chanprune.prune_model``
on the calibration images of ``train5k`` and scored on the whole ``test`` split. Each
configuration runs in a fresh subprocess, so its wall time and peak memory (max RSS) are
its own. Results are merged into ``benchmarks/results/vgg_cifar.json`` (a configuration
already there is skipped unless ``--rerun``), and the table in ``benchmarks/RESULTS.md``
is regenerated from that file.

Examples
--------
python benchmarks/vgg_cifar.py --methods lasso greedy_ls --speedups 2 4 5
python benchmarks/vgg_cifar.py --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
START, END = "<!-- vgg_cifar:start -->", "<!-- vgg_cifar:end -->"
METHODS = ["lasso", "greedy_ls", "max_response", "first_k", "random"]


def _key(method: str, schedule: str, speedup: float) -> str:
    return f"{method}/{schedule}/{speedup:g}"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ---------------------------------------------------------------------------- child
def run_one(config: dict) -> dict:
    """Prune and evaluate one configuration (runs in a fresh process)."""
    import torch

    from chanprune.data import ImageFolder, evaluate_accuracy
    from chanprune.flops import measure_latency
    from chanprune.models import get_model
    from chanprune.prune import prune_model

    shared = Path(config["shared"])
    torch.manual_seed(0)
    model = get_model("vgg16_bn_cifar10", weights=shared / "models" / "vgg16_bn_cifar10.pth").eval()
    calib = ImageFolder(shared / "data" / "cifar10-jpeg" / "train5k", preprocess="cifar")
    start = time.perf_counter()
    pruned, report = prune_model(
        model, calib, speedup=config["speedup"], schedule=config["schedule"],
        method=config["method"], n_images=config["n_images"],
        positions_per_image=config["positions"], ridge=config["ridge"],
        seed=config["seed"], progress=False,
    )  # fmt: skip
    wall = time.perf_counter() - start
    test = ImageFolder(shared / "data" / "cifar10-jpeg" / "test", preprocess="cifar")
    accuracy = evaluate_accuracy(pruned, test, batch_size=500, progress=False)
    out = {
        "config": {k: v for k, v in config.items() if k != "shared"},
        "accuracy": accuracy,
        "wall_time_s": wall,
        "peak_rss_mb": _peak_rss_mb(),
        "report": report.to_dict(),
    }
    if config.get("latency"):
        out["latency_ms"] = {
            f"cpu_b{b}": measure_latency(pruned, (3, 32, 32), batch_size=b)["median_ms"]
            for b in (1, 64)
        }
    return out


def baseline(shared: Path, n_images: int, latency: bool) -> dict:
    """Unpruned accuracy and the cost of one forward pass over the calibration images."""
    import torch

    from chanprune.data import ImageFolder, evaluate_accuracy
    from chanprune.flops import count_macs, measure_latency
    from chanprune.models import get_model
    from chanprune.prune import load_calibration_images

    model = get_model("vgg16_bn_cifar10", weights=shared / "models" / "vgg16_bn_cifar10.pth").eval()
    test = ImageFolder(shared / "data" / "cifar10-jpeg" / "test", preprocess="cifar")
    calib = ImageFolder(shared / "data" / "cifar10-jpeg" / "train5k", preprocess="cifar")
    t0 = time.perf_counter()
    images = load_calibration_images(calib, n_images, progress=False)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, images.shape[0], 100):
            model(images[lo : lo + 100])
    forward_s = time.perf_counter() - t0
    out = {
        "accuracy": evaluate_accuracy(model, test, batch_size=500, progress=False),
        "macs": count_macs(model, (3, 32, 32)),
        "calib_load_s": load_s,
        "forward_pass_s": forward_s,
        "n_images": int(images.shape[0]),
    }
    if latency:
        out["latency_ms"] = {
            f"cpu_b{b}": measure_latency(model, (3, 32, 32), batch_size=b)["median_ms"]
            for b in (1, 64)
        }
    return out


# ---------------------------------------------------------------------------- report
def _markdown(results: dict) -> str:
    base = results.get("baseline", {})
    runs = results.get("runs", {})
    lines = [
        START,
        "## VGG-16-BN on CIFAR-10, whole model, no fine-tuning (`benchmarks/vgg_cifar.py`)",
        "",
        "Top-1 accuracy on the whole `test` split (10,000 JPEG images) after pruning with "
        "`chanprune.prune_model` on the `train5k` calibration images (90% fit, 10% held out "
        "for the held-out errors), 10 positions per image and layer, seed 0. Speed-up = conv "
        "MACs before / after (the original channel-pruning code's count).",
        "",
        "```",
        "python benchmarks/vgg_cifar.py --methods lasso greedy_ls max_response first_k random "
        "--speedups 2 4 5 --schedules uniform paper",
        "```",
        "",
    ]
    if base:
        lines += [
            f"Unpruned: accuracy **{base['accuracy']:.4f}**, {base['macs'] / 1e6:.1f}M MACs; "
            f"one forward pass over the {base['n_images']} calibration images takes "
            f"{base['forward_pass_s']:.1f} s here (loading them {base['calib_load_s']:.1f} s).",
            "",
        ]
    machine = results.get("machine", {})
    if machine:
        lines += [f"Machine: {machine.get('description', '')}.", ""]
    speedups = sorted({r["config"]["speedup"] for r in runs.values()})
    for schedule in ("uniform", "paper"):
        rows = [r for r in runs.values() if r["config"]["schedule"] == schedule]
        if not rows:
            continue
        lines += [
            f"### schedule `{schedule}`",
            "",
            "Cells: accuracy (change vs unpruned, points) / achieved speed-up / pruning wall "
            "time / peak RSS.",
            "",
            "| method | " + " | ".join(f"{s:g}x" for s in speedups) + " |",
            "|---|" + "---|" * len(speedups),
        ]
        for method in METHODS + sorted({r["config"]["method"] for r in rows} - set(METHODS)):
            cells = []
            for s in speedups:
                r = runs.get(_key(method, schedule, s))
                if r is None:
                    cells.append("not run")
                    continue
                drop = 100 * (r["accuracy"] - base.get("accuracy", float("nan")))
                cells.append(
                    f"{r['accuracy']:.4f} ({drop:+.1f}) / {r['report']['speedup']:.2f}x / "
                    f"{r['wall_time_s']:.0f} s / {r['peak_rss_mb'] / 1024:.1f} GB"
                )
            if any(c != "not run" for c in cells):
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lat = {k: r["latency_ms"] for k, r in runs.items() if "latency_ms" in r}
    if lat and "latency_ms" in base:
        lines += [
            "### Measured CPU latency (median ms per batch, 2 threads)",
            "",
            "| model | batch 1 | batch 64 |",
            "|---|---|---|",
            f"| unpruned | {base['latency_ms']['cpu_b1']:.2f} "
            f"| {base['latency_ms']['cpu_b64']:.1f} |",
        ]
        for k, v in sorted(lat.items()):
            lines.append(f"| {k} | {v['cpu_b1']:.2f} | {v['cpu_b64']:.1f} |")
        lines.append("")
    detail = runs.get(_key("lasso", "uniform", 2)) or next(iter(runs.values()), None)
    if detail:
        c = detail["config"]
        lines += [
            f"### Per-layer errors, {c['method']} / {c['schedule']} / {c['speedup']:g}x",
            "",
            "| layer | channels | rel. error (calib) | held-out | before refit | time (s) |",
            "|---|---|---|---|---|---|",
        ]
        for layer in detail["report"]["layers"]:
            held = layer["rel_error_heldout"]
            lines.append(
                f"| {layer['name']} | {layer['channels_before']} -> {layer['channels_after']} "
                f"| {layer['rel_error']:.4f} | {'-' if held is None else f'{held:.4f}'} "
                f"| {layer['rel_error_before_refit']:.4f} | {layer['time_s']:.1f} |"
            )
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write_report(results: dict, results_md: Path) -> None:
    section = _markdown(results)
    text = results_md.read_text() if results_md.exists() else "# chanprune benchmark results\n"
    if START in text and END in text:
        text = re.sub(
            re.escape(START) + ".*?" + re.escape(END), lambda _: section, text, flags=re.S
        )
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    _write_atomic(results_md, text)


# ---------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--methods", nargs="+", default=["lasso"], help="selectors to run (default: lasso)"
    )
    p.add_argument(
        "--speedups", nargs="+", type=float, default=[2.0], help="MAC speed-up targets (default: 2)"
    )
    p.add_argument(
        "--schedules",
        nargs="+",
        default=["uniform"],
        choices=["uniform", "paper"],
        help="width schedules (default: uniform)",
    )
    p.add_argument("--n-images", type=int, default=5000, help="calibration images (default: 5000)")
    p.add_argument(
        "--positions", type=int, default=10, help="positions per image and layer (default: 10)"
    )
    p.add_argument(
        "--ridge", type=float, default=1e-4, help="relative ridge of the refit (default: 1e-4)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument(
        "--latency", action="store_true", help="also measure CPU latency at batch 1 and 64"
    )
    p.add_argument(
        "--rerun", action="store_true", help="recompute configurations already in the JSON"
    )
    p.add_argument(
        "--report-only", action="store_true", help="only rebuild RESULTS.md from the JSON"
    )
    p.add_argument(
        "--shared", type=Path, default=SHARED, help=f"the shared folder (default: {SHARED})"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "results" / "vgg_cifar.json",
        help="results JSON",
    )
    p.add_argument(
        "--results-md",
        type=Path,
        default=REPO / "benchmarks" / "RESULTS.md",
        help="Markdown summary to update",
    )
    p.add_argument("--single", help=argparse.SUPPRESS)  # internal: one configuration as JSON
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.single:
        print("RESULT " + json.dumps(run_one(json.loads(args.single))), flush=True)
        return 0
    results = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
    if args.report_only:
        write_report(results, args.results_md)
        return 0
    if not (args.shared / "models" / "vgg16_bn_cifar10.pth").is_file():
        print(f"error: the shared checkpoints are not at {args.shared}", file=sys.stderr)
        return 2
    import torch

    results["machine"] = {
        "description": f"{os.cpu_count()}-core CPU ({platform.machine()}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
    }
    if (
        "baseline" not in results
        or args.rerun
        or (args.latency and "latency_ms" not in results["baseline"])
    ):
        results["baseline"] = baseline(args.shared, args.n_images, args.latency)
        print(
            f"unpruned: accuracy {results['baseline']['accuracy']:.4f}, forward pass "
            f"{results['baseline']['forward_pass_s']:.1f} s",
            flush=True,
        )
    for schedule in args.schedules:
        for speedup in args.speedups:
            for method in args.methods:
                key = _key(method, schedule, speedup)
                if key in results["runs"] and not args.rerun:
                    continue
                config = dict(
                    method=method,
                    schedule=schedule,
                    speedup=speedup,
                    n_images=args.n_images,
                    positions=args.positions,
                    ridge=args.ridge,
                    seed=args.seed,
                    latency=args.latency,
                    shared=str(args.shared),
                )
                proc = subprocess.run(
                    [sys.executable, __file__, "--single", json.dumps(config)],
                    capture_output=True,
                    text=True,
                )
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    print(f"{key}: FAILED\n{proc.stderr[-3000:]}", file=sys.stderr)
                    continue
                run = json.loads(line[len("RESULT ") :])
                run["command"] = " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:]))
                results["runs"][key] = run
                print(
                    f"{key}: accuracy {run['accuracy']:.4f}, "
                    f"speed-up {run['report']['speedup']:.2f}x, {run['wall_time_s']:.0f} s, "
                    f"peak {run['peak_rss_mb'] / 1024:.1f} GB",
                    flush=True,
                )
                _write_atomic(args.out, json.dumps(results, indent=1))
    _write_atomic(args.out, json.dumps(results, indent=1))
    write_report(results, args.results_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
