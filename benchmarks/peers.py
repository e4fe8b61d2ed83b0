"""Torch-Pruning's magnitude and BN-scale pruners against chanprune, at matched MAC speed-ups.

On the CIFAR-10 VGG-16-BN and ResNet-56 from ``../shared``, without fine-tuning:

* **Torch-Pruning** (the ``bench`` extra pins its version): ``MagnitudePruner`` with
  ``MagnitudeImportance(p=1)`` (L1) and ``(p=2)`` (L2), and ``BNScalePruner`` with
  ``BNScaleImportance`` (network slimming's criterion, applied one-shot), each with a
  uniform per-layer pruning ratio (``global_pruning=False``, the library's defaults
  otherwise). The ratio is bisected on fresh copies of the network until chanprune's conv MAC
  counter gives the target speed-up within ``--tol``; where no single ratio does (all channel
  counts round at once), Torch-Pruning gets chanprune's uniform per-layer widths through
  ``pruning_ratio_dict`` instead (marked in the tables). Each pruned network is scored as it
  comes, and again after re-estimating every BatchNorm's running statistics on the same
  calibration images chanprune uses (``train5k``): statistics reset, ``momentum=None``
  (cumulative average), one pass in train mode under ``no_grad``.
* **chanprune**: its measured runs are read (not re-run) from ``results/vgg_cifar.json`` and
  ``results/resnet_cifar_resnet56.json`` every time the report is built, so later runs
  there show up with ``--report-only``.

MACs are counted with one counter for both libraries (``chanprune.flops.count_macs``: conv
layers only, as in the original channel-pruning code) and also with Torch-Pruning's own
``tp.utils.count_ops_and_params``; chanprune's pruned architectures are rebuilt from their
recorded widths for that second count.

Scope. VGG: every conv output and the hidden Linear layers' outputs may be pruned, as
chanprune plans them; the final Linear is in ``ignored_layers`` (runs recorded before
chanprune planned linear layers ignored the whole head, and kept its hidden widths).
ResNet-56: Torch-Pruning's dependency graph does not model the option-A shortcut (strided
slice + zero-padding of the channel dimension; it treats the pad as element-wise), so
pruning "as it comes" (only the final Linear ignored) prunes the residual stream and yields
a network that does not run; the script records that check. The runs therefore prune inside
the branches only (stem conv, every block's ``conv2`` and the Linear ignored), which is what
chanprune prunes too.

Examples
--------
nice -n 19 python benchmarks/peers.py                       # both networks, all pruners
nice -n 19 python benchmarks/peers.py --networks vgg --n-test 500 \\
    --out /tmp/peers.json --results-md /tmp/RESULTS.md      # a quick trial
python benchmarks/peers.py --report-only                    # rebuild the RESULTS.md section
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from chanprune.report import write_text_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _whole_model import REPO, SHARED, replace_section  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"
INPUT_SHAPE = (3, 32, 32)
START, END = "<!-- peers:start -->", "<!-- peers:end -->"
COMMAND = "nice -n 19 python benchmarks/peers.py --distill-epochs 1 3 5"


@dataclass(frozen=True)
class Network:
    label: str
    model: str  # chanprune.models registry name
    checkpoint: str  # file in shared/models
    speedups: tuple  # default targets
    chanprune_json: str  # file in benchmarks/results with chanprune's measured runs


NETWORKS = {
    "vgg": Network("VGG-16-BN", "vgg16_bn_cifar10", "vgg16_bn_cifar10.pth", (2.0, 4.0),
                   "vgg_cifar.json"),
    "resnet56": Network("ResNet-56", "resnet56_cifar10", "resnet56-4bfd9763.th", (1.5, 2.0),
                        "resnet_cifar_resnet56.json"),
}  # fmt: skip

#: Torch-Pruning configurations: label in the tables.
PRUNERS = {
    "l1": "TP magnitude L1",
    "l2": "TP magnitude L2",
    "bn_scale": "TP BN scale",
}
CHANPRUNE_METHODS = ("lasso", "greedy_ls", "max_response", "first_k")


# ---------------------------------------------------------------------------- pure logic
def bisect_ratio(
    speedup_at: Callable[[float], float],
    target: float,
    *,
    tol: float = 0.02,
    lo: float = 0.0,
    hi: float = 0.95,
    stop: float = 0.002,
    max_evals: int = 30,
    strict: bool = True,
) -> dict:
    """The pruning ratio whose speed-up is closest to ``target``, by bisection.

    ``speedup_at(ratio)`` must be non-decreasing in ``ratio`` (a step function when channel
    counts are rounded). Bisection stops when the best speed-up so far is within ``stop``
    (relative) of the target, the bracket is narrower than 1e-5 or ``max_evals`` evaluations
    are spent.

    Returns
    -------
    dict with ``ratio``, ``speedup`` (at that ratio), ``rel_error`` (speedup / target - 1),
    ``within_tol`` and ``evals``.

    Raises
    ------
    ValueError
        If ``speedup_at(hi)`` stays below the target beyond ``tol``, or (when ``strict``) no
        evaluated ratio is within ``tol`` of the target (the message gives the closest);
        with ``strict=False`` the closest is returned with ``within_tol=False``.
    """
    if not target > 1.0:
        raise ValueError(f"target must be > 1; got {target!r}")
    evals = 0
    best = None

    def consider(ratio: float) -> float:
        nonlocal evals, best
        s = float(speedup_at(ratio))
        evals += 1
        err = s / target - 1.0
        if best is None or abs(err) < abs(best["rel_error"]):
            best = {"ratio": ratio, "speedup": s, "rel_error": err}
        return s

    if consider(hi) < target * (1.0 - tol):
        raise ValueError(
            f"even ratio {hi} only reaches a {best['speedup']:.3f}x speed-up (target {target}x)"
        )
    while evals < max_evals and abs(best["rel_error"]) > stop and hi - lo > 1e-5:
        mid = 0.5 * (lo + hi)
        if consider(mid) < target:
            lo = mid
        else:
            hi = mid
    within = abs(best["rel_error"]) <= tol
    if strict and not within:
        raise ValueError(
            f"no ratio gives {target}x within {tol:.0%}: closest {best['speedup']:.4f}x at "
            f"ratio {best['ratio']:.5f}"
        )
    return {**best, "within_tol": within, "evals": evals}


def reestimate_bn(model: nn.Module, images: torch.Tensor, batch_size: int = 100) -> int:
    """Re-estimate the running statistics of every BatchNorm of ``model`` on ``images``.

    Statistics are reset and averaged cumulatively (``momentum=None``) over one pass in
    train mode under ``no_grad``: the running mean is the mean over all images (batches of
    equal size), the running variance the average of the per-batch unbiased variances.
    Only the BatchNorm layers are put in train mode (dropout, which follows every BatchNorm
    in these networks, stays off); momenta are restored and the model is left in eval
    mode. Returns the number of BatchNorm layers.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        with torch.no_grad():
            for lo in range(0, images.shape[0], batch_size):
                model(images[lo : lo + batch_size])
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.eval()
    return len(bns)


def conv_widths(model: nn.Module) -> dict:
    """``{conv name: out_channels}`` of every Conv2d, in ``named_modules()`` order."""
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def ignored_layers(network: str, model: nn.Module, scope: str = "branch") -> list:
    """Modules whose output channels Torch-Pruning must keep.

    VGG and ``scope="default"``: the final Linear only (the logits; Torch-Pruning as it
    comes). ResNet with ``"branch"``: also the stem conv and every block's ``conv2``, so
    only the channels inside the residual branches are pruned.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if network == "vgg" or scope == "default":
        return linears[-1:]
    if scope != "branch":
        raise ValueError(f"scope must be 'default' or 'branch'; got {scope!r}")
    return [model.conv1] + [block.conv2 for _, block in model.blocks()] + linears


def tp_pruner(
    pruner: str, model: nn.Module, ratio: float, ignored: list, ratio_dict: dict | None = None
):
    """The Torch-Pruning pruner object for configuration ``pruner`` at a uniform ratio
    (per-layer ratios from ``ratio_dict`` where given)."""
    import torch_pruning as tp

    example = torch.zeros(1, *INPUT_SHAPE)
    common = dict(
        pruning_ratio=ratio, pruning_ratio_dict=ratio_dict, global_pruning=False,
        ignored_layers=ignored,
    )  # fmt: skip
    if pruner in ("l1", "l2"):
        imp = tp.importance.MagnitudeImportance(p=1 if pruner == "l1" else 2)
        return tp.pruner.MagnitudePruner(model, example, importance=imp, **common)
    if pruner == "bn_scale":
        imp = tp.importance.BNScaleImportance()
        return tp.pruner.BNScalePruner(model, example, importance=imp, **common)
    raise ValueError(f"unknown pruner {pruner!r}; choose from {sorted(PRUNERS)}")


def tp_prune(
    pruner: str, model: nn.Module, ratio: float, ignored: list, ratio_dict: dict | None = None
) -> nn.Module:
    """Prune ``model`` in place with Torch-Pruning (one step); return it in eval mode."""
    model.eval()
    tp_pruner(pruner, model, ratio, ignored, ratio_dict).step()
    return model.eval()


def planned_ratio_dict(network: str, model: nn.Module, speedup: float) -> tuple[dict, dict]:
    """A Torch-Pruning ``pruning_ratio_dict`` that gives ``model`` chanprune's uniform widths.

    chanprune's ``uniform`` schedule keeps the same fraction of every prunable layer, each
    rounded so that the MAC target is met (``chanprune.prune.plan_widths``). Used where no
    single Torch-Pruning ratio lands within the tolerance (its channel counts all round at
    the same ratio). Keys are the producing convs of ``model`` (whose outputs are pruned),
    chanprune's group names (a hidden Linear of VGG's head too); with ``pruning_ratio=0``
    every other group is kept. Returns
    ``(ratio_dict, widths)``.
    """
    from chanprune.prune import plan_widths

    widths, _ = plan_widths(model, INPUT_SHAPE, speedup=speedup, schedule="uniform")
    ratios = {}
    for group, width in widths.items():
        layer = model.get_submodule(group)  # a conv, or a hidden Linear of VGG's head
        size = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        # TP keeps int(C * (1 - ratio)) channels: aim half a channel above to beat rounding.
        ratios[layer] = max(0.0, (size - width - 0.5) / size)
    return ratios, widths


def tp_count(model: nn.Module) -> tuple[int, int]:
    """Torch-Pruning's own count: (MACs, parameters) for one image."""
    import torch_pruning as tp

    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, *INPUT_SHAPE))
    return int(macs), int(params)


def consumer_widths(options: dict, reference: nn.Module) -> dict:
    """A report's recorded widths keyed by consuming layer, as the name-based planner of
    the older recorded runs kept them; the graph planner keys them by channel group (its
    producing conv, or ``"<conv>:in"`` for a channel sampler's input)."""
    widths = options.get("widths") or {}
    if not widths or options.get("planner") in (None, "names"):
        return widths
    from chanprune.graph import trace_plan

    plan = trace_plan(reference, INPUT_SHAPE)
    out = {}
    for group, width in widths.items():
        if group.endswith(":in"):
            out[group[: -len(":in")]] = width
        else:
            out.update((consumer, width) for consumer in plan.groups[group].consumers)
    return out


def chanprune_architecture(network: str, widths: dict) -> nn.Module:
    """Rebuild a chanprune-pruned architecture (untrained weights) from its recorded widths.

    ``widths`` maps each consuming layer (``features.3``, ``classifier.0``,
    ``layer1.0.conv2``) to the input channels it kept, as in
    ``report["options"]["widths"]``; a ResNet pruned with ``channel_sampler=True`` also
    records how many stream channels each ``conv1`` reads.
    """
    from chanprune.models import get_model

    name = NETWORKS[network].model
    reference = get_model(name)
    if network == "vgg":
        convs = list(conv_widths(reference.features).items())  # (index in features, width)
        # The last conv's width is read by classifier.0, the hidden ones by the next Linear.
        readers = [f"features.{index}" for index, _ in convs[1:]] + ["classifier.0"]
        kept = [widths.get(reader, w) for reader, (_, w) in zip(readers, convs)]
        hidden = tuple(
            widths.get(f"classifier.{i}", m.out_features)
            for i, m in ((3, reference.classifier[0]), (6, reference.classifier[3]))
        )  # fmt: skip
        return get_model(name, widths=kept, hidden_features=hidden).eval()
    blocks = [
        (widths.get(f"{path}.conv2", block.conv1.out_channels),)
        for path, block in reference.blocks()
    ]
    sampled = []
    for path, block in reference.blocks():
        k = widths.get(f"{path}.conv1")
        # A conv1 that reads its whole stream input has no sampler in the pruned model.
        sampled.append(k if k is not None and k < block.conv1.in_channels else None)
    return get_model(name, block_widths=blocks, sampled_inputs=sampled).eval()


# ---------------------------------------------------------------------------- measuring
def _load_images(dataset, n: int | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from chanprune.data import calibration_subset

    subset = calibration_subset(dataset, n, seed=seed)
    loader = torch.utils.data.DataLoader(subset, batch_size=500, shuffle=False)
    xs, ys = zip(*loader)
    return torch.cat(xs).float(), torch.cat(ys)


def _accuracy(model: nn.Module, test: tuple[torch.Tensor, torch.Tensor]) -> float:
    from chanprune.data import evaluate_accuracy

    dataset = torch.utils.data.TensorDataset(*test)
    return evaluate_accuracy(model, dataset, batch_size=500, progress=False)


def _default_scope_check(network: str, model: nn.Module, calib: torch.Tensor) -> dict:
    """Torch-Pruning as it comes (only the final Linear ignored) on a ResNet: does it run?"""
    ratio = 0.3
    pruned = copy.deepcopy(model)
    out = {"pruner": "l1", "ratio": ratio}
    try:
        tp_prune("l1", pruned, ratio, ignored_layers(network, pruned, "default"))
        out["widths"] = conv_widths(pruned)
        out["linear_in_features"] = [
            m.in_features for m in pruned.modules() if isinstance(m, nn.Linear)
        ]
        with torch.no_grad():
            pruned(calib[:2])
        out["runs"] = True
    except Exception as exc:  # noqa: BLE001 - recording the peer's failure is the point
        out["runs"] = False
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return out


def measure_network(network: str, args, results: dict, log: Callable = print) -> None:
    """Baseline, the default-scope check (ResNet) and every (pruner, speed-up) of a network."""
    from chanprune.data import ImageFolder
    from chanprune.flops import count_macs
    from chanprune.models import get_model

    net = NETWORKS[network]
    data = args.shared / "data" / "cifar10-jpeg"
    model = get_model(net.model, weights=args.shared / "models" / net.checkpoint).eval()
    t0 = time.perf_counter()
    calib, _ = _load_images(ImageFolder(data / "train5k", preprocess="cifar"), args.n_calib)
    calib_load_s = time.perf_counter() - t0
    test = _load_images(ImageFolder(data / "test", preprocess="cifar"), args.n_test or None)
    entry = results.setdefault("networks", {}).setdefault(network, {"runs": {}})
    n_test = int(test[0].shape[0])
    stale = entry.get("baseline", {}).get("n_test") != n_test
    macs0 = count_macs(model, INPUT_SHAPE)

    if "baseline" not in entry or args.rerun or stale:
        acc = _accuracy(model, test)
        tp_macs0, tp_params0 = tp_count(model)
        control = copy.deepcopy(model)
        t0 = time.perf_counter()
        reestimate_bn(control, calib)
        bn_s = time.perf_counter() - t0
        entry["baseline"] = {
            "accuracy": acc, "macs": macs0, "tp_macs": tp_macs0, "tp_params": tp_params0,
            "bn_accuracy": _accuracy(control, test), "bn_time_s": bn_s,
            "calib_load_s": calib_load_s, "n_calib": int(calib.shape[0]), "n_test": n_test,
        }  # fmt: skip
        bn_acc = entry["baseline"]["bn_accuracy"]
        log(f"{network}: unpruned {acc:.4f}, with BN statistics re-estimated {bn_acc:.4f}")
        if stale:
            entry["runs"] = {}  # scored on another test subset
        write_text_atomic(args.out, json.dumps(results, indent=1))
    base = entry["baseline"]
    if network != "vgg":
        entry["default_scope_check"] = _default_scope_check(network, model, calib)
        check = entry["default_scope_check"]
        log(f"{network}: Torch-Pruning as it comes runs: {check['runs']} {check.get('error', '')}")
    entry["ignored_layers"] = [
        n for n, m in model.named_modules() if any(m is x for x in ignored_layers(network, model))
    ]
    speedups = args.speedups.get(network, net.speedups)
    for pruner in args.pruners:
        for speedup in speedups:
            k = f"{pruner}/{speedup:g}"
            if k in entry["runs"] and not args.rerun:
                continue

            def speedup_at(ratio: float, pruner: str = pruner) -> float:
                trial = copy.deepcopy(model)
                tp_prune(pruner, trial, ratio, ignored_layers(network, trial))
                return macs0 / count_macs(trial, INPUT_SHAPE)

            t0 = time.perf_counter()
            found = bisect_ratio(speedup_at, speedup, tol=args.tol, strict=False)
            bisect_s = time.perf_counter() - t0

            pruned = copy.deepcopy(model)
            ignored = ignored_layers(network, pruned)
            ratio, ratio_dict, matching = found["ratio"], None, "uniform ratio"
            if not found["within_tol"]:  # no single ratio: chanprune's uniform widths
                ratio_dict, _ = planned_ratio_dict(network, pruned, speedup)
                ratio, matching = 0.0, "chanprune widths"
                log(f"{network} {k}: no single ratio within {args.tol:.0%} (closest "
                    f"{found['speedup']:.3f}x); pruning to chanprune's uniform widths")  # fmt: skip
            t0 = time.perf_counter()
            tp_prune(pruner, pruned, ratio, ignored, ratio_dict)
            prune_s = time.perf_counter() - t0
            macs = count_macs(pruned, INPUT_SHAPE)
            tp_macs, tp_params = tp_count(pruned)
            acc = _accuracy(pruned, test)
            t0 = time.perf_counter()
            reestimate_bn(pruned, calib)
            bn_s = time.perf_counter() - t0
            run = {
                "pruner": pruner, "target": speedup, "matching": matching,
                "ratio": found["ratio"] if ratio_dict is None else None,
                "nearest_uniform": {x: found[x] for x in ("ratio", "speedup", "rel_error")},
                "bisect_evals": found["evals"], "bisect_s": bisect_s, "prune_s": prune_s,
                "macs": macs, "speedup": macs0 / macs, "tp_macs": tp_macs,
                "tp_params": tp_params, "tp_speedup": base["tp_macs"] / tp_macs,
                "widths": conv_widths(pruned), "accuracy": acc,
                "bn": {"accuracy": _accuracy(pruned, test), "time_s": bn_s},
                "n_test": n_test, "load_avg": os.getloadavg()[0],
            }  # fmt: skip
            entry["runs"][k] = run
            log(
                f"{network} {k}: {matching}, {run['speedup']:.3f}x, "
                f"accuracy {acc:.4f}, with BN re-estimated {run['bn']['accuracy']:.4f}, "
                f"prune {prune_s:.2f} s, BN {bn_s:.1f} s"
            )
            write_text_atomic(args.out, json.dumps(results, indent=1))


def distill_runs(network: str, args, results: dict, log: Callable = print) -> None:
    """TP L1 pruning, BatchNorm re-estimated, then the distillation chanprune offers
    (``chanprune.recover.distill``, same epochs, learning rate, batch and augmentation):
    the same recovery budget for both libraries. The pruned network is rebuilt from the
    stored run (TP's pruning is deterministic)."""
    from chanprune.data import ImageFolder
    from chanprune.models import get_model
    from chanprune.recover import distill

    net = NETWORKS[network]
    data = args.shared / "data" / "cifar10-jpeg"
    model = get_model(net.model, weights=args.shared / "models" / net.checkpoint).eval()
    calib, _ = _load_images(ImageFolder(data / "train5k", preprocess="cifar"), args.n_calib)
    test = _load_images(ImageFolder(data / "test", preprocess="cifar"), args.n_test or None)
    entry = results["networks"][network]
    for key, run in entry["runs"].items():
        if run["pruner"] != "l1" or run["target"] not in args.distill_speedups.get(network, ()):
            continue
        for epochs in args.distill_epochs:
            done = run.setdefault("distill", {})
            if str(epochs) in done and not args.rerun:
                continue
            pruned = copy.deepcopy(model)
            ignored = ignored_layers(network, pruned)
            ratio_dict = None
            if run.get("matching") == "chanprune widths":
                ratio_dict, _ = planned_ratio_dict(network, pruned, run["target"])
            tp_prune("l1", pruned, run["ratio"] or 0.0, ignored, ratio_dict)
            reestimate_bn(pruned, calib)
            pruned.eval()
            t0 = time.perf_counter()
            student, records = distill(pruned, model, calib, epochs=epochs, progress=False)
            done[str(epochs)] = {
                "accuracy": _accuracy(student, test), "time_s": time.perf_counter() - t0,
                "train_loss": records[-1].train_loss,
            }  # fmt: skip
            log(f"{network} {key} + BN + distill {epochs}: {done[str(epochs)]['accuracy']:.4f}")
            write_text_atomic(args.out, json.dumps(results, indent=1))


# ---------------------------------------------------------------------------- report
def read_chanprune(network: str, results_dir: Path = RESULTS_DIR) -> dict:
    """chanprune's measured runs for ``network`` (re-read on every call)."""
    path = results_dir / NETWORKS[network].chanprune_json
    return json.loads(path.read_text()) if path.is_file() else {"runs": {}}


def _tp_available() -> bool:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return False
    return True


def _pct(acc: float, base: float | None) -> str:
    return f"{acc:.4f}" + ("" if base is None else f" ({100 * (acc - base):+.1f})")


def _chanprune_cell(network: str, run: dict, base: float | None, counts: bool) -> tuple:
    """(accuracy cell, MAC cell) of one chanprune run."""
    rep = run["report"]
    acc = f"{_pct(run['accuracy'], base)} / {rep['speedup']:.2f}x / {run['wall_time_s']:.0f} s"
    mac = f"{rep['macs_after'] / 1e6:.1f}M"
    if counts:
        from chanprune.flops import count_macs
        from chanprune.models import get_model

        reference = get_model(NETWORKS[network].model)
        arch = chanprune_architecture(network, consumer_widths(rep["options"], reference))
        rebuilt = count_macs(arch, INPUT_SHAPE)
        tp_macs, _ = tp_count(arch)
        tp_before, _ = tp_count(chanprune_architecture(network, {}))
        mac += f" / {tp_macs / 1e6:.1f}M ({tp_before / tp_macs:.2f}x)"
        if rebuilt != rep["macs_after"]:
            mac += f" (rebuilt architecture counts {rebuilt / 1e6:.1f}M!)"
    return acc, mac


def markdown(results: dict, chanprune: dict | None = None) -> str:
    """The RESULTS.md section; ``chanprune`` maps network -> its results (read if None)."""
    counts = _tp_available()
    lines = [START, "## Peers: Torch-Pruning vs chanprune, no fine-tuning (`benchmarks/peers.py`)"]
    lines += [
        "",
        "Torch-Pruning (TP) "
        f"{results.get('versions', {}).get('torch_pruning', '?')} one-shot, uniform per-layer "
        "ratio (`global_pruning=False`, otherwise the library's defaults): `MagnitudePruner` "
        "with `MagnitudeImportance(p=1)` / `(p=2)` (group-level magnitude of the conv filter, "
        "its BatchNorm and the next layer's input weights, mean-reduced and mean-normalised), "
        "and `BNScalePruner` with `BNScaleImportance` (|BN gamma|, network slimming's "
        "criterion without its sparsity training). The ratio is bisected until chanprune's conv "
        "MAC counter gives the target speed-up within 2% (where no single ratio does, see †); "
        "*+ BN re-est.* re-estimates every "
        "BatchNorm's running mean and variance on the 5,000 `train5k` calibration images "
        "(reset, `momentum=None`, one pass in train mode under `no_grad`), the images "
        "chanprune fits on. chanprune rows are its measured runs from `results/vgg_cifar.json` "
        "and `results/resnet_cifar_resnet56.json` (uniform schedule, default options; "
        "re-read whenever this section is rebuilt), not re-run here.",
        "",
        "```",
        COMMAND,
        "python benchmarks/peers.py --report-only   # rebuild this section from the JSONs",
        "```",
        "",
        "Cells: top-1 accuracy on the `test` split (change vs unpruned, points) / "
        "achieved speed-up (conv MACs, chanprune's counter) / wall time. TP wall time: the "
        "prune itself at the found ratio (dependency graph + importance + surgery; the "
        "bisection not included) and, for *+ BN re-est.*, plus the re-estimation pass "
        "(images already decoded). chanprune wall time: its whole `prune_model` call "
        "(decoding the 5,000 JPEGs, collecting statistics, selection and least-squares refit "
        "layer by layer), in its own process.",
        "",
    ]
    machine = results.get("machine")
    if machine:
        lines += [f"Machine: {machine}.", ""]
    for network, net in NETWORKS.items():
        entry = results.get("networks", {}).get(network)
        cp = (chanprune or {}).get(network) or read_chanprune(network)
        if entry is None and not cp.get("runs"):
            continue
        entry = entry or {"runs": {}}
        base = entry.get("baseline", {})
        base_acc = base.get("accuracy", cp.get("baseline", {}).get("accuracy"))
        speedups = sorted(
            {r["target"] for r in entry["runs"].values()}
            | {
                cp["runs"][f"{m}/uniform/{s:g}"]["report"]["speedup_target"]
                for m in CHANPRUNE_METHODS
                for s in net.speedups
                if f"{m}/uniform/{s:g}" in cp["runs"]
            }
            | set(net.speedups)
        )
        lines += [f"### {net.label}", ""]
        if base:
            n_test = base["n_test"]
            scored = (
                "the whole `test` split (10,000 images)"
                if n_test == 10000
                else f"a stratified subset of {n_test} `test` images (chanprune rows: the "
                "whole split, so not comparable)"
            )
            lines += [
                f"Unpruned: accuracy **{base['accuracy']:.4f}** on {scored}; "
                f"{base['macs'] / 1e6:.1f}M conv MACs by chanprune's counter, "
                f"{base['tp_macs'] / 1e6:.1f}M by TP's `count_ops_and_params` "
                f"({base['tp_macs'] - base['macs']:+,}; see the notes), "
                f"{base['tp_params'] / 1e6:.2f}M parameters. Control: the unpruned network with "
                f"its BatchNorm statistics re-estimated the same way on {base['n_calib']} "
                f"calibration images scores {_pct(base['bn_accuracy'], base['accuracy'])} "
                f"({base['bn_time_s']:.1f} s).",
                "",
            ]
        ignored = entry.get("ignored_layers")
        if ignored:
            conv2 = [n for n in ignored if re.fullmatch(r"layer\d+\.\d+\.conv2", n)]
            named = [f"`{n}`" for n in ignored if n not in conv2]
            if conv2:
                named.insert(1, f"every block's `conv2` ({len(conv2)})")
            lines += [f"TP `ignored_layers`: {', '.join(named)}.", ""]
        check = entry.get("default_scope_check")
        if check:
            if check.get("runs"):
                what = "runs"
            else:
                what = f"does not run (`{check.get('error', '?')}`)"
            widths = check.get("widths", {})
            stream = [n for n in ("conv1", "layer1.0.conv2", "layer3.8.conv2") if n in widths]
            pruned = ", ".join(f"`{n}` -> {widths[n]}" for n in stream)
            linear_in = check.get("linear_in_features")
            if linear_in:
                pruned += f", the Linear's inputs -> {linear_in[-1]}"
            lines += [
                "TP as it comes (only the final Linear ignored), "
                f"{PRUNERS.get(check['pruner'], check['pruner'])} at ratio {check['ratio']}: "
                f"it prunes the residual stream too ({pruned}; unpruned 16 / 16 / 64), but its "
                "dependency graph treats the option-A shortcut's channel zero-padding as an "
                "element-wise op, so the stream widths no longer match the fixed padding and "
                f"the pruned network {what}. The runs below therefore prune only inside the "
                "residual branches (each block's `conv1` output), the channels chanprune "
                "prunes.",
                "",
            ]
        header = "| method | " + " | ".join(f"{s:g}x" for s in speedups) + " |"
        rule = "|---|" + "---|" * len(speedups)
        acc_rows, mac_rows, daggers = [], [], set()
        for pruner, label in PRUNERS.items():
            runs = [entry["runs"].get(f"{pruner}/{s:g}") for s in speedups]
            if not any(runs):
                continue
            plain, bn, macs = [], [], []
            for r in runs:
                if r is None:
                    plain.append("not run"), bn.append("not run"), macs.append("not run")
                    continue
                uniform = r.get("matching", "uniform ratio") == "uniform ratio"
                sp = f"{r['speedup']:.2f}x" + ("" if uniform else "†")
                if not uniform:
                    nearest = r["nearest_uniform"]
                    daggers.add(
                        f"{r['target']:g}x: the nearest single ratio, {nearest['ratio']:.4f}, "
                        f"gives {nearest['speedup']:.3f}x"
                    )
                plain.append(f"{_pct(r['accuracy'], base_acc)} / {sp} / {r['prune_s']:.1f} s")
                bn.append(
                    f"{_pct(r['bn']['accuracy'], base_acc)} / {sp} / "
                    f"{r['prune_s']:.1f} + {r['bn']['time_s']:.0f} s"
                )
                how = f"ratio {r['ratio']:.4f}" if uniform else "chanprune's widths†"
                macs.append(
                    f"{r['macs'] / 1e6:.1f}M / {r['tp_macs'] / 1e6:.1f}M "
                    f"({r['tp_speedup']:.2f}x); {how}"
                )
            acc_rows.append(f"| {label} | " + " | ".join(plain) + " |")
            acc_rows.append(f"| {label} + BN re-est. | " + " | ".join(bn) + " |")
            mac_rows.append(f"| {label} | " + " | ".join(macs) + " |")
        for method in CHANPRUNE_METHODS:
            accs, macs = [], []
            for s in speedups:
                r = cp["runs"].get(f"{method}/uniform/{s:g}")
                if r is None:
                    accs.append("not run"), macs.append("not run")
                    continue
                a, m = _chanprune_cell(network, r, base_acc, counts)
                accs.append(a), macs.append(m)
            acc_rows.append(f"| chanprune {method} | " + " | ".join(accs) + " |")
            mac_rows.append(f"| chanprune {method} | " + " | ".join(macs) + " |")
        lines += [header, rule, *acc_rows, ""]
        if daggers:
            lines += [
                "† No single TP ratio lands within 2% of the target, because every layer's "
                "channel count rounds at the same ratio (" + "; ".join(sorted(daggers)) + "). "
                "TP was given chanprune's uniform per-layer widths for that target instead "
                "(`pruning_ratio_dict`, same kept fraction per layer, rounded per layer to meet "
                "the MAC target), so its architecture is the one of the chanprune rows.",
                "",
            ]
        lines += _distill_rows(entry, cp, base_acc)
        missing = "" if counts else " [TP not installed: its counts of chanprune's nets missing]"
        lines += [
            "MACs after pruning, chanprune's conv count / TP's own count (speed-up by TP's "
            f"count){missing}; TP rows also give the bisected ratio.",
            "",
            header,
            rule,
            *mac_rows,
            "",
        ]
    lines += [
        "Notes:",
        "",
        "- The two counters differ only in scope: TP's count is chanprune's conv MACs plus "
        "one op per element of every conv bias, ReLU output and pooling input, two per "
        "BatchNorm element, and the Linear layers (this accounts for the difference to the "
        "unit on every network measured here, pruned or not), so its speed-ups are slightly "
        "lower than the conv-MAC ones for both libraries.",
        "- BN re-estimation runs in batches of 100; with `momentum=None` each running variance "
        "is the mean of the per-batch unbiased variances (the running mean is exact). The "
        "control above each table shows what the re-estimation alone does to the unpruned "
        "network.",
        "- VGG: TP prunes every conv's output at the same ratio, the first conv's too and the "
        "last conv's together with the first Linear's inputs; chanprune's uniform schedule "
        "prunes the input of every conv but the first (the last conv keeps its 512 outputs), "
        "at the same kept fraction in every layer. ResNet-56: both prune each block's "
        "`conv1` output (the `conv2` input) only. chanprune also re-fits the next layer's "
        "weights by least squares on the calibration images; TP only removes channels.",
        "- TP's wall time excludes reading the calibration images (1-2 s for 5,000 JPEGs); "
        "chanprune's includes it. Runs were under `nice -n 19` beside other work on this "
        "2-core machine, so wall times are indicative only.",
        "",
        END,
    ]
    return "\n".join(lines)


def _distill_rows(entry: dict, cp: dict, base_acc) -> list:
    """Accuracy after the same distillation budget: TP L1 (+ BN re-estimation) and each
    chanprune run with a ``distillN`` variant, by target."""
    epochs = sorted(
        {int(n) for r in entry["runs"].values() for n in r.get("distill", {})}
        | {int(k.rsplit("distill", 1)[1]) for k in cp.get("runs", {}) if "/distill" in k}
    )
    if not epochs:
        return []
    rows = []
    for _, r in sorted(entry["runs"].items()):
        if r.get("distill"):
            cells = [
                f"{_pct(r['distill'][str(n)]['accuracy'], base_acc)} / "
                f"{r['distill'][str(n)]['time_s']:.0f} s" if str(n) in r["distill"] else "-"
                for n in epochs
            ]  # fmt: skip
            rows.append(f"| TP L1 + BN re-est., {r['target']:g}x | " + " | ".join(cells) + " |")
    chanprune_runs = {}
    for k, run in cp.get("runs", {}).items():
        if "/distill" in k:
            base_key, n = k.rsplit("/distill", 1)
            chanprune_runs.setdefault(base_key, {})[int(n)] = run
    for base_key, by_epochs in sorted(chanprune_runs.items()):
        cells = []
        for n in epochs:
            run = by_epochs.get(n)
            if run is None:
                cells.append("-")
                continue
            took = run["report"]["recovery"][-1]["time_s"]
            cells.append(f"{_pct(run['accuracy'], base_acc)} / {took:.0f} s")
        method, schedule, speedup = base_key.split("/")
        rows.append(f"| chanprune {method}, {schedule}, {speedup}x | " + " | ".join(cells) + " |")
    return [
        "With a short recovery: the pruned network distilled against the original's outputs "
        "on the calibration images for N epochs (`chanprune.recover.distill`: no labels, "
        "flips and crops, SGD lr 1e-5 cosine, batch 64; chanprune trains on its 4,500 fit "
        "images, TP on all 5,000 after its BN re-estimation). Cells: accuracy (change vs "
        "unpruned) / distillation time.",
        "",
        "| pruned network | " + " | ".join(f"{n} epoch{'s' * (n > 1)}" for n in epochs) + " |",
        "|---|" + "---|" * len(epochs),
        *rows,
        "",
    ]


def write_report(results: dict, results_md: Path, chanprune: dict | None = None) -> None:
    replace_section(results_md, "peers", markdown(results, chanprune))


# ---------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS),
        help="networks to measure (default: vgg resnet56)",
    )  # fmt: skip
    p.add_argument(
        "--pruners", nargs="+", default=list(PRUNERS), choices=list(PRUNERS),
        help="Torch-Pruning configurations (default: l1 l2 bn_scale)",
    )  # fmt: skip
    p.add_argument(
        "--vgg-speedups", nargs="+", type=float, default=list(NETWORKS["vgg"].speedups),
        help="MAC speed-up targets for the VGG (default: 2 4)",
    )  # fmt: skip
    p.add_argument(
        "--resnet56-speedups", nargs="+", type=float,
        default=list(NETWORKS["resnet56"].speedups),
        help="MAC speed-up targets for ResNet-56 (default: 1.5 2)",
    )  # fmt: skip
    p.add_argument(
        "--tol", type=float, default=0.02,
        help="largest relative gap between achieved and target speed-up (default: 0.02)",
    )  # fmt: skip
    p.add_argument(
        "--n-calib", type=int, default=5000,
        help="calibration images for the BN re-estimation (default: 5000, all of train5k)",
    )  # fmt: skip
    p.add_argument(
        "--n-test", type=int, default=0,
        help="score on a stratified subset of this many test images (default: 0 = all 10,000)",
    )  # fmt: skip
    p.add_argument(
        "--distill-epochs", nargs="+", type=int, default=[],
        help="also distil the L1 runs (BN re-estimated) for each of these epoch counts, the "
        "budget chanprune's distill variants get (default: none)",
    )  # fmt: skip
    p.add_argument(
        "--distill-vgg-speedups", nargs="+", type=float, default=[4.0],
        help="VGG targets whose L1 runs are distilled (default: 4)",
    )  # fmt: skip
    p.add_argument(
        "--distill-resnet56-speedups", nargs="+", type=float, default=[2.0],
        help="ResNet-56 targets whose L1 runs are distilled (default: 2)",
    )  # fmt: skip
    p.add_argument("--rerun", action="store_true", help="recompute configurations in the JSON")
    p.add_argument("--report-only", action="store_true", help="rebuild RESULTS.md from the JSONs")
    p.add_argument("--shared", type=Path, default=SHARED, help=f"shared folder ({SHARED})")
    p.add_argument(
        "--out", type=Path, default=RESULTS_DIR / "peers.json", help="results JSON",
    )  # fmt: skip
    p.add_argument(
        "--results-md", type=Path, default=REPO / "benchmarks" / "RESULTS.md",
        help="Markdown summary to update",
    )  # fmt: skip
    args = p.parse_args(argv)
    args.speedups = {"vgg": tuple(args.vgg_speedups), "resnet56": tuple(args.resnet56_speedups)}
    args.distill_speedups = {
        "vgg": tuple(args.distill_vgg_speedups),
        "resnet56": tuple(args.distill_resnet56_speedups),
    }
    return args


def main(argv=None, log: Callable = print) -> int:
    args = parse_args(argv)
    results = json.loads(args.out.read_text()) if args.out.exists() else {"networks": {}}
    if args.report_only:
        write_report(results, args.results_md)
        return 0
    if not all((args.shared / "models" / NETWORKS[n].checkpoint).is_file() for n in NETWORKS):
        print(f"error: the shared checkpoints are not at {args.shared}", file=sys.stderr)
        return 2
    try:
        import importlib.metadata

        import torch_pruning  # noqa: F401

        tp_version = importlib.metadata.version("torch-pruning")
    except ImportError:
        print(
            "error: Torch-Pruning is not installed: pip install --no-deps torch-pruning==1.6.1 "
            "(the version the 'bench' extra of pyproject.toml pins)",
            file=sys.stderr,
        )
        return 2
    results["machine"] = (
        f"{os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    results["versions"] = {"torch": torch.__version__, "torch_pruning": tp_version}
    torch.manual_seed(0)
    for network in args.networks:
        measure_network(network, args, results, log)
        if args.distill_epochs:
            distill_runs(network, args, results, log)
        write_text_atomic(args.out, json.dumps(results, indent=1))
    write_text_atomic(args.out, json.dumps(results, indent=1))
    write_report(results, args.results_md)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
