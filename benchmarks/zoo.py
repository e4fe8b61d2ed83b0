"""The graph planner on third-party networks as their authors wrote them, beside
Torch-Pruning on the same networks.

For each pytorchcv 0.0.74 definition (random weights, BatchNorm statistics randomised,
seeded; ImageNet definitions at 224x224, which their 7x7 pooling needs): the channel
groups chanprune finds and keeps whole, the speed-up it reaches at ``--speedup`` (MACs of
all convs and linears, ``chanprune.flops.count_macs`` on the pruned network), the mean relative
reconstruction error of the refit layers on the calibration samples, and the pruning time.
Beside it, Torch-Pruning 1.6.1's L1 magnitude pruner (its ``DependencyGraph``) at one
uniform ratio found by bisection for the same MAC target: whether it runs, the speed-up it
reaches and whether the output shape is kept. Random weights and random images: this
measures coverage and cost, not accuracy (see RESULTS.md's CIFAR tables for accuracy).

Usage::

    pip install --no-deps pytorchcv==0.0.74 torch-pruning==1.6.1
    python benchmarks/zoo.py                         # all 14 networks, JSON + RESULTS.md
    python benchmarks/zoo.py --models resnet18 --no-torch-pruning --json /tmp/zoo.json
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import chanprune
from chanprune.flops import count_macs
from chanprune.graph import PlanWarning, trace_plan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _whole_model import REPO, git_commit, replace_section, write_atomic  # noqa: E402
from peers import bisect_ratio  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"

#: (pytorchcv module, builder, input size)
ZOO = [
    ("vgg", "vgg16", 224),
    ("vgg", "bn_vgg16", 224),
    ("resnet", "resnet18", 224),
    ("resnet_cifar", "resnet56_cifar10", 32),
    ("seresnet", "seresnet18", 224),
    ("resnext", "resnext50_32x4d", 224),
    ("mobilenet", "mobilenet_w1", 224),
    ("mobilenetv2", "mobilenetv2_w1", 224),
    ("mobilenetv3", "mobilenetv3_large_w1", 224),
    ("efficientnet", "efficientnet_b0", 224),
    ("densenet", "densenet121", 224),
    ("shufflenetv2", "shufflenetv2_w1", 224),
    ("regnet", "regnetx002", 224),
    ("squeezenet", "squeezenet_v1_1", 224),
]


def build(module: str, name: str, seed: int = 0) -> nn.Module:
    """A pytorchcv network with seeded random weights and BatchNorm statistics, eval mode."""
    builder = getattr(importlib.import_module(f"pytorchcv.models.{module}"), name)
    torch.manual_seed(seed)
    model = builder()
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def all_macs(model: nn.Module, shape: tuple) -> int:
    """MACs per image of every Conv2d and Linear."""
    return count_macs(model, shape, include_linear=True)


def measure_chanprune(model: nn.Module, shape: tuple, args) -> dict:
    images = torch.randn(args.n_images, *shape, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlanWarning)
        plan = trace_plan(model, shape)
        start = time.perf_counter()
        pruned, report = chanprune.prune_model(
            model, images, speedup=args.speedup, progress=False, holdout=0.25,
            positions_per_image=args.positions,
        )  # fmt: skip
        seconds = time.perf_counter() - start
    with torch.no_grad():
        kept_shape = pruned(images[:1]).shape == model(images[:1]).shape
    errors = [r.rel_error for r in report.layers]
    held = [r.rel_error_heldout for r in report.layers if r.rel_error_heldout is not None]
    return {
        "groups": len(plan.groups),
        "kept_whole": len(plan.groups) - len(plan.prunable),
        "consumers": len(plan.consumers),
        "speedup": all_macs(model, shape) / all_macs(pruned, shape),
        "mean_rel_error": sum(errors) / max(len(errors), 1),
        "mean_rel_error_heldout": sum(held) / max(len(held), 1),
        "time_s": seconds,
        "output_shape_kept": bool(kept_shape),
    }


def _classifier(model: nn.Module) -> list[nn.Module]:
    """The layer writing the class scores (the last Linear, else the last Conv2d)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    layers = layers or [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return layers[-1:]


def measure_torch_pruning(module: str, name: str, shape: tuple, args) -> dict:
    import torch_pruning as tp

    original = build(module, name, args.seed)
    base = all_macs(original, shape)
    example = torch.zeros(1, *shape)

    def pruned_at(ratio: float) -> nn.Module:
        model = copy.deepcopy(original)
        pruner = tp.pruner.MagnitudePruner(
            model, example, importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=ratio, ignored_layers=_classifier(model),
        )  # fmt: skip
        pruner.step()
        return model.eval()

    start = time.perf_counter()
    try:
        found = bisect_ratio(lambda r: base / all_macs(pruned_at(r), shape), args.speedup,
                             strict=False, max_evals=12)  # fmt: skip
        model = pruned_at(found["ratio"])
        with torch.no_grad():
            kept_shape = model(example).shape == original(example).shape
    except Exception as exc:  # a peer failing is a measurement, not an error here
        return {"runs": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"[:160]}
    return {
        "runs": True,
        "speedup": float(found["speedup"]),
        "output_shape_kept": bool(kept_shape),
        "time_s": time.perf_counter() - start,
    }


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "<!-- zoo:start -->",
        "## Any CNN: the graph planner on third-party definitions",
        "",
        f"Command: `{meta['command']}` (commit {meta['commit']}). pytorchcv 0.0.74 "
        f"definitions, random weights, {meta['n_images']} random calibration images, target "
        f"{meta['speedup']:g}x fewer MACs of all convs and linears (`count_macs`). Torch-Pruning "
        "1.6.1: L1 magnitude pruning at one uniform ratio (bisection, at most 12 tries), the "
        "classifier ignored. Random data: coverage and cost only, no accuracy. Errors: the "
        "mean over refit layers of the relative reconstruction error, on the fit samples "
        "(6 images: deep layers have more unknowns than samples and fit them exactly) and "
        "on 2 held-out images.",
        "",
        "| network | groups | kept whole | chanprune speed-up | mean rel. error fit / "
        "held-out | chanprune time (s) | Torch-Pruning runs | its speed-up | its output "
        "shape kept |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["models"].items():
        c, t = row["chanprune"], row.get("torch_pruning")
        if "error" in c:
            cells = ["-", "-", "fails: " + c["error"], "-", "-"]
        else:
            held = c.get("mean_rel_error_heldout")
            error = f"{c['mean_rel_error']:.4f}" + ("" if held is None else f" / {held:.4f}")
            cells = [str(c["groups"]), str(c["kept_whole"]), f"{c['speedup']:.3f}x", error,
                     f"{c['time_s']:.1f}"]  # fmt: skip
        if t is None:
            cells += ["not run", "-", "-"]
        elif not t["runs"]:
            cells += ["no: " + t["error"], "-", "-"]
        else:
            cells += ["yes", f"{t['speedup']:.3f}x", "yes" if t["output_shape_kept"] else "no"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("<!-- zoo:end -->")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=[z[1] for z in ZOO], metavar="NAME",
                   help="networks to run (default: all 14)")  # fmt: skip
    p.add_argument("--speedup", type=float, default=2.0, help="MAC target (default: 2)")
    p.add_argument("--n-images", type=int, default=8,
                   help="calibration images, a quarter held out (default: 8)")  # fmt: skip
    p.add_argument("--positions", type=int, default=10,
                   help="positions per image and layer (default: 10)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="weights seed (default: 0)")
    p.add_argument("--no-torch-pruning", action="store_true", help="skip the peer")
    p.add_argument("--json", type=Path, default=RESULTS_DIR / "zoo.json",
                   help="results JSON (default: benchmarks/results/zoo.json)")  # fmt: skip
    p.add_argument("--results-md", type=Path, default=REPO / "benchmarks" / "RESULTS.md",
                   help="where the table goes (default: benchmarks/RESULTS.md)")  # fmt: skip
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(2)
    known = {z[1]: z for z in ZOO}
    unknown = [m for m in args.models if m not in known]
    if unknown:
        print(f"zoo.py: unknown network(s) {unknown}; choose from {list(known)}", file=sys.stderr)
        return 2
    results = {
        "meta": {
            "command": "python benchmarks/zoo.py " + " ".join(sys.argv[1:] if argv is None
                                                              else argv),
            "commit": git_commit(), "n_images": args.n_images, "speedup": args.speedup,
        },
        "models": {},
    }  # fmt: skip
    for name in args.models:
        module, _, size = known[name]
        shape = (3, size, size)
        row: dict = {}
        try:
            row["chanprune"] = measure_chanprune(build(module, name, args.seed), shape, args)
        except Exception as exc:  # recorded in the table: the point is which networks work
            row["chanprune"] = {"error": f"{type(exc).__name__}: {exc}"[:160]}
        if not args.no_torch_pruning:
            row["torch_pruning"] = measure_torch_pruning(module, name, shape, args)
        results["models"][name] = row
        print(name, json.dumps(row), flush=True)
    write_atomic(args.json, json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    replace_section(args.results_md, "zoo", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
