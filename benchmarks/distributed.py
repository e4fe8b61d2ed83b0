"""One process against K processes under torchrun: the same pruned network, and the time.

Runs ``chanprune prune`` on a shared CIFAR network once in one process and once under
``torchrun --nproc_per_node=K`` (gloo on CPU; calibration sharded over the ranks, every
statistic all-reduced), with the graph planner and otherwise default options, then
compares the two reports (kept channels, widths, per-layer errors) and the two saved
networks (weights, relative to each tensor's norm), and records the wall times.

On this 2-core machine K ranks share the same cores, so this measures the overhead of the
collectives and that the result does not change, not a speed-up; one rank per GPU or per
machine is what sharding is for.

Examples
--------
python benchmarks/distributed.py --model resnet20 --speedup 2 --ranks 2
python benchmarks/distributed.py --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _whole_model import REPO, SHARED, git_commit, replace_section, write_atomic  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "distributed.json"
MODELS = {
    "vgg16_bn": ("vgg16_bn_cifar10", "vgg16_bn_cifar10.pth"),
    "resnet56": ("resnet56_cifar10", "resnet56-4bfd9763.th"),
    "resnet20": ("resnet20_cifar10", "resnet20-12fca82f.th"),
}


def _command(args, out: Path, ranks: int) -> list[str]:
    name, checkpoint = MODELS[args.model]
    prune = [
        "prune", "--model", name, "--weights", str(args.shared / "models" / checkpoint),
        "--calib", str(args.shared / "data" / "cifar10-jpeg" / "train5k"),
        "--speedup", str(args.speedup), "--planner", "graph", "--n-images", str(args.n_images),
        "--quiet", "--out", str(out / "out.pt"), "--report", str(out / "report.json"),
    ]  # fmt: skip
    if ranks == 1:
        return [sys.executable, "-m", "chanprune", *prune]
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun), "--standalone", f"--nproc_per_node={ranks}", "-m", "chanprune", *prune]


def _run(args, ranks: int, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // ranks)))
    start = time.perf_counter()
    done = subprocess.run(_command(args, out, ranks), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{ranks} rank(s) failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {"wall_s": wall, "report": json.loads((out / "report.json").read_text())}


def _compare(one: Path, many: Path) -> dict:
    import chanprune

    a, b = chanprune.load(one / "out.pt"), chanprune.load(many / "out.pt")
    worst = 0.0
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        if x.is_floating_point():
            rel = float((x.double() - y.double()).norm() / x.double().norm().clamp(min=1e-30))
            worst = max(worst, rel)
    return {"max_weight_rel_diff": worst}


def markdown(results: dict) -> str:
    lines = [
        "<!-- distributed:start -->",
        "## One process vs torchrun ranks (`benchmarks/distributed.py`)",
        "",
        "`chanprune prune` with the graph planner and default options, in one process and "
        "under `torchrun --standalone --nproc_per_node=K` (gloo, calibration sharded, every "
        "statistic all-reduced in float64). *Same kept* compares the kept channel indices "
        "of every group; the weight difference is the largest over tensors of "
        "`||W_K - W_1|| / ||W_1||`. On this 2-core machine the ranks share the cores "
        "(`OMP_NUM_THREADS` = cores / K), so the time column shows the cost of sharding, "
        "not a speed-up. On a CPU each batch's products are computed in float32 by default "
        "(then summed in float64), and the ranks' batches are cut differently from one "
        "process's, so the sums differ at float32 rounding and a near-singular refit "
        "amplifies that in the weights; with float64 products (`stats_dtype=torch.float64`, "
        "tests/test_distributed.py) the weights agree within 1e-6 of each tensor's norm.",
        "",
        "```",
        *results.get("commands", []),
        "```",
        "",
        "| network | speed-up | images | ranks | wall time | same kept | max weight diff "
        "| max layer error diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, run in sorted(results.get("runs", {}).items()):
        lines.append(
            f"| {run['model']} | {run['speedup']:g}x | {run['n_images']} | 1 / {run['ranks']} "
            f"| {run['wall_1_s']:.1f} s / {run['wall_k_s']:.1f} s | "
            f"{'yes' if run['same_kept'] else 'NO'} | {run['max_weight_rel_diff']:.1e} | "
            f"{run['max_error_diff']:.1e} |"
        )
    lines += ["", f"Machine: {results.get('machine', '?')}.", "", "<!-- distributed:end -->"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=list(MODELS), default="resnet20")
    p.add_argument("--speedup", type=float, default=2.0)
    p.add_argument("--ranks", type=int, default=2, help="processes under torchrun (2)")
    p.add_argument("--n-images", type=int, default=5000, help="calibration images (5000)")
    p.add_argument("--shared", type=Path, default=SHARED)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--results-md", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = p.parse_args(argv)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
    if not args.report_only:
        with tempfile.TemporaryDirectory() as tmp:
            one = _run(args, 1, Path(tmp) / "one")
            many = _run(args, args.ranks, Path(tmp) / "many")
            diff = _compare(Path(tmp) / "one", Path(tmp) / "many")
        errors = [
            abs(x["rel_error"] - y["rel_error"])
            for x, y in zip(one["report"]["layers"], many["report"]["layers"])
        ]
        key = f"{args.model}/{args.speedup:g}/{args.ranks}"
        results["runs"][key] = {
            "model": args.model, "speedup": args.speedup, "ranks": args.ranks,
            "n_images": args.n_images, "wall_1_s": one["wall_s"], "wall_k_s": many["wall_s"],
            "same_kept": one["report"]["options"]["kept"] == many["report"]["options"]["kept"],
            "max_error_diff": max(errors, default=0.0), **diff, "commit": git_commit(),
        }  # fmt: skip
        results["machine"] = f"{os.cpu_count()}-core CPU, torch {torch.__version__}"
        cmd = f"python benchmarks/distributed.py --model {args.model} --speedup {args.speedup:g}"
        results["commands"] = sorted(set(results.get("commands", [])) | {cmd})
        write_atomic(RESULTS, json.dumps(results, indent=1))
        print(json.dumps(results["runs"][key], indent=1))
    replace_section(args.results_md, "distributed", markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
