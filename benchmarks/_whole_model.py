"""Shared harness of the whole-model benchmarks (``vgg_cifar.py``, ``resnet_cifar.py``).

Each configuration (method, schedule, speed-up, extra ``prune_model`` options) is pruned
and scored on the whole CIFAR-10 ``test`` split in a fresh subprocess, so its wall time and
peak memory are its own; results merge into one JSON file keyed by configuration, and a
Markdown section of ``benchmarks/RESULTS.md`` is regenerated from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from chanprune.io import atomic_write
from chanprune.report import write_text_atomic
from chanprune.schedule import SCHEDULES

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@dataclass(frozen=True)
class Benchmark:
    """What differs between the whole-model benchmarks."""

    name: str  # section marker and JSON file stem
    title: str
    model: str  # registry name
    checkpoint: str  # file in shared/models
    command: str  # the command shown in RESULTS.md
    methods: tuple  # row order of the tables
    variants: dict = field(default_factory=dict)  # label -> extra prune_model options
    script: str = ""  # path of the calling script (re-invoked for each configuration)
    script_args: tuple = ()  # arguments the re-invoked script needs (e.g. the model)


def key(method: str, schedule: str, speedup: float, variant: str = "") -> str:
    return f"{method}/{schedule}/{speedup:g}" + (f"/{variant}" if variant else "")


def write_atomic(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def save_figure(fig, path: Path) -> str:
    """Write a matplotlib figure to ``path`` as PNG, atomically; close it; return the
    file name (what RESULTS.md links)."""
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path.name


def git_commit() -> str | None:
    """The short hash of the checked-out commit ("+" if the tree has changes), or None."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "chanprune"], cwd=REPO,
            capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
    except OSError:
        return None
    return (head + ("+" if dirty else "")) or None


# Runs recorded before the statistics changed (whole maps on small maps, buffered
# products, channels-last passes) carry no commit; their cells are marked.
OLD_CODE_NOTE = (
    "&dagger; measured with the code before commit fc5012f, which added whole-map statistics "
    "on small maps (VGG's 4x4 and 2x2 conv4_x/conv5_x layers then use every position instead "
    "of 10 sampled ones; the CIFAR ResNets are unaffected) and a faster statistics path "
    "(wall time)."
)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _load(bench: Benchmark, shared: Path):
    from chanprune.data import ImageFolder
    from chanprune.models import get_model

    model = get_model(bench.model, weights=shared / "models" / bench.checkpoint).eval()
    calib = ImageFolder(shared / "data" / "cifar10-jpeg" / "train5k", preprocess="cifar")
    test = ImageFolder(shared / "data" / "cifar10-jpeg" / "test", preprocess="cifar")
    return model, calib, test


def run_one(bench: Benchmark, config: dict) -> dict:
    """Prune and evaluate one configuration (in a fresh process)."""
    import torch

    from chanprune.data import evaluate_accuracy
    from chanprune.flops import measure_latency
    from chanprune.prune import prune_model

    torch.manual_seed(0)
    model, calib, test = _load(bench, Path(config["shared"]))
    start = time.perf_counter()
    pruned, report = prune_model(
        model, calib, speedup=config["speedup"], schedule=config["schedule"],
        method=config["method"], n_images=config["n_images"],
        positions_per_image=config["positions"], ridge=config["ridge"],
        seed=config["seed"], progress=False, **bench.variants.get(config.get("variant", ""), {}),
    )  # fmt: skip
    wall = time.perf_counter() - start
    out = {
        "config": {k: v for k, v in config.items() if k != "shared"},
        "commit": git_commit(),
        "accuracy": evaluate_accuracy(pruned, test, batch_size=500, progress=False),
        "wall_time_s": wall,
        "peak_rss_mb": peak_rss_mb(),
        "report": report.to_dict(),
    }
    if config.get("latency"):
        out["latency_ms"] = {
            f"cpu_b{b}": measure_latency(pruned, (3, 32, 32), batch_size=b)["median_ms"]
            for b in (1, 64)
        }
    return out


def sync_device(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forward_pass_s(model, images, device: str, batch_size: int = 100) -> float:
    """Seconds of one forward pass over ``images`` (channels-last, no grad), the yardstick
    of the pruning times."""
    import torch

    model = model.to(device)
    with torch.inference_mode():
        model(images[:2].to(device).contiguous(memory_format=torch.channels_last))  # warm-up
        sync_device(device)
        start = time.perf_counter()
        for lo in range(0, images.shape[0], batch_size):
            batch = images[lo : lo + batch_size].to(device)
            model(batch.contiguous(memory_format=torch.channels_last))
        sync_device(device)
    return time.perf_counter() - start


def baseline(bench: Benchmark, shared: Path, n_images: int, latency: bool) -> dict:
    """Unpruned accuracy and the cost of one forward pass over the calibration images."""
    from chanprune.data import evaluate_accuracy
    from chanprune.flops import count_macs, measure_latency
    from chanprune.prune import load_calibration_images

    model, calib, test = _load(bench, shared)
    t0 = time.perf_counter()
    images = load_calibration_images(calib, n_images, progress=False)
    load_s = time.perf_counter() - t0
    # Timed on its own: the accuracy below decodes and scores the whole test split.
    forward_s = forward_pass_s(model, images, "cpu")
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


#: Rounds of ``--latency-only``: every network is timed once per round, round after round.
LATENCY_ROUNDS = 3


def remeasure_latency(bench: Benchmark, results: dict, rounds: int = LATENCY_ROUNDS) -> None:
    """CPU latency (batch 1 and 64) of the unpruned network and of each run's pruned
    architecture, rebuilt from its recorded widths (latency does not depend on weights).

    Runs with the same widths (e.g. every selector under one uniform schedule) share one
    network. The networks are timed in ``rounds`` interleaved rounds and each keeps the
    median over the rounds, so a slow phase of the machine, which lasts minutes here,
    hits every network alike instead of a few of them.
    """
    import numpy as np
    from peers import chanprune_architecture, consumer_widths

    from chanprune.flops import measure_latency
    from chanprune.models import get_model

    network = {"vgg16_bn_cifar10": "vgg", "resnet56_cifar10": "resnet56"}.get(bench.model)
    if network is None:
        raise ValueError(f"--latency-only knows no architecture rebuild for {bench.model}")
    models = {"unpruned": get_model(bench.model).eval()}
    arch_of = {}
    for k, run in results.get("runs", {}).items():
        widths = consumer_widths(run["report"].get("options", {}), models["unpruned"])
        if widths:
            arch_of[k] = json.dumps(widths, sort_keys=True)
            if arch_of[k] not in models:
                models[arch_of[k]] = chanprune_architecture(network, widths)
    times: dict[str, dict[int, list]] = {name: {1: [], 64: []} for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            for b in (1, 64):
                ms = measure_latency(model, (3, 32, 32), batch_size=b)["median_ms"]
                times[name][b].append(ms)

    def median(name: str) -> dict:
        return {f"cpu_b{b}": float(np.median(v)) for b, v in times[name].items()}

    base = results.setdefault("baseline", {})
    base["latency_ms"] = median("unpruned")
    base["latency_rounds"] = rounds
    for k, arch in arch_of.items():
        results["runs"][k]["latency_ms"] = median(arch)
        results["runs"][k]["latency_from"] = (
            f"architecture rebuilt from the recorded widths, median of {rounds} rounds"
        )


# ---------------------------------------------------------------------------- report
def markdown(bench: Benchmark, results: dict) -> str:
    start, end = f"<!-- {bench.name}:start -->", f"<!-- {bench.name}:end -->"
    base = results.get("baseline", {})
    runs = results.get("runs", {})
    lines = [start, f"## {bench.title} (`benchmarks/{bench.name}.py`)", ""]
    lines += [
        "Top-1 accuracy on the whole `test` split (10,000 JPEG images) after pruning with "
        "`chanprune.prune_model` on the `train5k` calibration images (90% fit, 10% held out "
        "for the held-out errors), 10 positions per image and layer, ridge 1e-4, seed 0, **no "
        "fine-tuning**. Speed-up = MACs before / after as the run's planner counts them: "
        "convs only for the name-based planner (the original channel-pruning code's count), "
        "convs and linears for the graph planner (rows labelled `graph`). Rows without a "
        "label ran with `planner=\"auto\"`, which chose the name-based planner for these "
        "networks until the graph planner became the default (each run records its "
        "`options.planner`); rows labelled `names` ran that planner on purpose, before it "
        "was removed. Each configuration "
        "runs in its own process: wall time is the whole `prune_model` call (loading the "
        "5,000 JPEGs included), peak = max RSS.",
        "",
        "```",
        bench.command,
        "```",
        "",
    ]
    if results.get("plot"):
        lines += [f"![accuracy vs speed-up](results/{results['plot']})", ""]
    if base:
        lines += [
            f"Unpruned: accuracy **{base['accuracy']:.4f}**, {base['macs'] / 1e6:.1f}M MACs; "
            f"one forward pass over the {base['n_images']} calibration images (channels-last, "
            "as the driver runs them) takes "
            f"{base['forward_pass_s']:.1f} s here (decoding them {base['calib_load_s']:.1f} s).",
            "",
        ]
    machine = results.get("machine")
    if isinstance(machine, dict):  # files written before the harness existed
        machine = machine.get("description")
    if machine:
        lines += [f"Machine: {machine}.", ""]
    speedups = sorted({r["config"]["speedup"] for r in runs.values()})
    variants = [""] + list(bench.variants)
    # Labels of recorded runs whose options no longer exist (the name-based planner's).
    variants += sorted({r["config"].get("variant", "") for r in runs.values()} - set(variants))
    for schedule in SCHEDULES:
        rows = [r for r in runs.values() if r["config"]["schedule"] == schedule]
        if not rows:
            continue
        lines += [
            f"### schedule `{schedule}`",
            "",
            "Cells: accuracy (change vs unpruned, points) / achieved speed-up / wall time / "
            "peak RSS.",
            "",
            "| method | " + " | ".join(f"{s:g}x" for s in speedups) + " |",
            "|---|" + "---|" * len(speedups),
        ]
        for method in bench.methods:
            for variant in variants:
                cells = []
                for s in speedups:
                    r = runs.get(key(method, schedule, s, variant))
                    if r is None:
                        cells.append("not run")
                        continue
                    drop = 100 * (r["accuracy"] - base.get("accuracy", float("nan")))
                    old = "" if r.get("commit") else " &dagger;"
                    cells.append(
                        f"{r['accuracy']:.4f} ({drop:+.1f}) / {r['report']['speedup']:.2f}x / "
                        f"{r['wall_time_s']:.0f} s / {r['peak_rss_mb'] / 1024:.1f} GB{old}"
                    )
                if any(c != "not run" for c in cells):
                    label = f"{method} ({variant})" if variant else method
                    lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    if any(not r.get("commit") for r in runs.values()):
        lines += [OLD_CODE_NOTE, ""]
    lat = {k: r["latency_ms"] for k, r in runs.items() if "latency_ms" in r}
    if lat and "latency_ms" in base:
        lines += [
            "### Measured CPU latency of the pruned networks (median ms per batch)",
            "",
        ]
        if base.get("latency_rounds"):
            lines += [
                "Measured by `--latency-only` on networks rebuilt from the recorded widths "
                "(runs with the same widths share one network), all in one process: "
                f"{base['latency_rounds']} interleaved rounds over every network, each "
                "the median of 20 timed batches after 5 warm-up ones; the median round is "
                "shown. A single round on this machine timed networks of identical widths "
                "up to 1.7x apart at batch 64, hence the rounds; still read differences "
                "of tens of percent as noise.",
                "",
            ]
        lines += [
            "| model | batch 1 | batch 64 |",
            "|---|---|---|",
            f"| unpruned | {base['latency_ms']['cpu_b1']:.2f} "
            f"| {base['latency_ms']['cpu_b64']:.1f} |",
        ]
        for k, v in sorted(lat.items()):
            lines.append(f"| {k} | {v['cpu_b1']:.2f} | {v['cpu_b64']:.1f} |")
        lines.append("")
    detail = runs.get(key("lasso", "uniform", 2)) or next(iter(runs.values()), None)
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
    lines.append(end)
    return "\n".join(lines)


def plot_accuracy(bench: Benchmark, results: dict, path: Path) -> str | None:
    """Accuracy vs achieved speed-up, one line per method (and variant) and schedule,
    the unpruned accuracy as a dashed line; written atomically. Returns the file name."""
    runs = results.get("runs", {})
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list] = {}
    for r in runs.values():
        c = r["config"]
        label = c["method"] + (f" ({c['variant']})" if c.get("variant") else "")
        if c["schedule"] != "uniform":
            label += f", {c['schedule']}"
        lines.setdefault(label, []).append((r["report"]["speedup"], r["accuracy"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in sorted(lines):
        pts = sorted(lines[label])
        style = "--" if ", paper" in label else "-." if ", energy" in label else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
    base = results.get("baseline", {}).get("accuracy")
    if base is not None:
        ax.axhline(base, color="k", ls=":", lw=1, label=f"unpruned {base:.4f}")
    ax.set_xlabel("MAC speed-up (achieved)")
    ax.set_ylabel("test accuracy, no fine-tuning")
    ax.set_title(bench.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def replace_section(results_md: Path, name: str, section: str) -> None:
    """Put ``section`` between the ``<!-- name:start/end -->`` markers of ``results_md``
    (appended when absent), keeping the rest of the file; written atomically."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = results_md.read_text() if results_md.exists() else "# chanprune benchmark results\n"
    if start in text and end in text:
        pattern = re.escape(start) + ".*?" + re.escape(end)
        text = re.sub(pattern, lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    write_atomic(results_md, text)


def write_report(bench: Benchmark, results: dict, results_md: Path) -> None:
    replace_section(results_md, bench.name, markdown(bench, results))


# ---------------------------------------------------------------------------- main
def parse_args(bench: Benchmark, argv, doc: str):
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--methods", nargs="+", default=["lasso"], help="selectors (default: lasso)")
    p.add_argument(
        "--speedups", nargs="+", type=float, default=[2.0], help="MAC speed-ups (default: 2)"
    )
    p.add_argument(
        "--schedules", nargs="+", default=["uniform"], choices=list(SCHEDULES),
        help="width schedules (default: uniform)",
    )  # fmt: skip
    p.add_argument(
        "--variants", nargs="+", default=[""], choices=[""] + list(bench.variants),
        help="option variants to run ('' = defaults; default: '')",
    )  # fmt: skip
    p.add_argument("--n-images", type=int, default=5000, help="calibration images (5000)")
    p.add_argument("--positions", type=int, default=10, help="positions per image (10)")
    p.add_argument("--ridge", type=float, default=1e-4, help="relative refit ridge (1e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed (0)")
    p.add_argument("--latency", action="store_true", help="measure CPU latency, batch 1 and 64")
    p.add_argument(
        "--latency-only", action="store_true",
        help="(re)measure CPU latency of the unpruned network and of every recorded run, "
        "from its architecture rebuilt from the recorded widths, in "
        f"{LATENCY_ROUNDS} interleaved rounds (the median is kept); no pruning",
    )  # fmt: skip
    p.add_argument("--rerun", action="store_true", help="recompute configurations in the JSON")
    p.add_argument("--report-only", action="store_true", help="rebuild RESULTS.md from the JSON")
    p.add_argument("--shared", type=Path, default=SHARED, help=f"shared folder ({SHARED})")
    p.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / f"{bench.name}.json",
        help="results JSON",
    )  # fmt: skip
    p.add_argument(
        "--results-md", type=Path, default=REPO / "benchmarks" / "RESULTS.md",
        help="Markdown summary to update",
    )  # fmt: skip
    p.add_argument("--single", help=argparse.SUPPRESS)  # internal: one configuration as JSON
    return p.parse_args(argv)


def main(bench: Benchmark, argv=None, doc: str = "", log: Callable = print) -> int:
    args = parse_args(bench, argv, doc)
    if args.single:
        print("RESULT " + json.dumps(run_one(bench, json.loads(args.single))), flush=True)
        return 0
    results = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
    if args.report_only:
        results["plot"] = plot_accuracy(bench, results, args.out.with_suffix(".png"))
        write_report(bench, results, args.results_md)
        return 0
    if args.latency_only:
        remeasure_latency(bench, results)
        write_atomic(args.out, json.dumps(results, indent=1))
        write_report(bench, results, args.results_md)
        return 0
    if not (args.shared / "models" / bench.checkpoint).is_file():
        print(f"error: the shared checkpoints are not at {args.shared}", file=sys.stderr)
        return 2
    import torch

    results["machine"] = (
        f"{os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    base = results.get("baseline")
    if base is None or args.rerun or (args.latency and "latency_ms" not in base):
        results["baseline"] = baseline(bench, args.shared, args.n_images, args.latency)
        log(f"unpruned: accuracy {results['baseline']['accuracy']:.4f}")
    for schedule in args.schedules:
        for speedup in args.speedups:
            for method in args.methods:
                for variant in args.variants:
                    k = key(method, schedule, speedup, variant)
                    if k in results["runs"] and not args.rerun:
                        continue
                    config = dict(
                        method=method, schedule=schedule, speedup=speedup, variant=variant,
                        n_images=args.n_images, positions=args.positions, ridge=args.ridge,
                        seed=args.seed, latency=args.latency, shared=str(args.shared),
                    )  # fmt: skip
                    command = [sys.executable, bench.script, *bench.script_args]
                    proc = subprocess.run(
                        command + ["--single", json.dumps(config)], capture_output=True, text=True
                    )
                    line = next(
                        (x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None
                    )
                    if proc.returncode != 0 or line is None:
                        print(f"{k}: FAILED\n{proc.stderr[-3000:]}", file=sys.stderr)
                        continue
                    run = json.loads(line[len("RESULT ") :])
                    results["runs"][k] = run
                    log(
                        f"{k}: accuracy {run['accuracy']:.4f}, "
                        f"speed-up {run['report']['speedup']:.2f}x, {run['wall_time_s']:.0f} s, "
                        f"peak {run['peak_rss_mb'] / 1024:.1f} GB"
                    )
                    write_atomic(args.out, json.dumps(results, indent=1))
    results["plot"] = plot_accuracy(bench, results, args.out.with_suffix(".png"))
    write_atomic(args.out, json.dumps(results, indent=1))
    write_report(bench, results, args.results_md)
    return 0
