"""CPU latency of pruned networks in PyTorch (eager) and ONNX Runtime, against MAC speed-up.

The CIFAR-10 VGG-16-BN of ../shared pruned 2x, 4x and 5x and the ResNet-56 pruned 2x
(``chanprune.prune_model``, LASSO, uniform schedule, on ``--n-images`` calibration images
of ``train5k``; few, to keep the run short: the architecture, hence the latency, depends
on the images only through which channels are kept), plus the unpruned originals. Each
network is exported with ``chanprune.export.export_onnx`` (which checks ONNX Runtime
against PyTorch), then timed at batch 1 and batch 64 on random 3x32x32 inputs:

- PyTorch: ``chanprune.flops.measure_latency`` (eval mode, ``torch.inference_mode``,
  NCHW, ``--warmup`` untimed then ``--repeat`` timed forwards, their median);
- ONNX Runtime: the CPU provider, all graph optimisations, the same warm-up, repeats
  and median.

Both use ``--threads`` threads. Every network is timed once per round, round after round
(``--rounds``), so a slow phase of the machine hits all networks alike; the table shows
the median of the round medians and their spread (min-max). Speed-up = the unpruned
network's latency / the pruned one's, in the same runtime and batch, next to the MAC
speed-up (conv MACs, as ``chanprune.flops.count_macs`` counts them).

Where ONNX Runtime's speed-up differs from the MAC speed-up by more than 20%, both the
pruned network and its original are profiled with ONNX Runtime's profiler at that batch
size (``--profile-runs`` runs): the share of the time of each operator type and the nodes
that take most of it are reported.

Writes ``benchmarks/results/latency.json`` (atomically) and prints the table; with
``--results-md`` also (re)writes the ``latency`` section of ``benchmarks/RESULTS.md``.

Examples
--------
python benchmarks/latency.py --rounds 3 --results-md benchmarks/RESULTS.md
python benchmarks/latency.py --report-only --results-md benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _whole_model import REPO, SHARED, git_commit, replace_section, write_atomic  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "latency.json"
MARK = "latency"
ZOO_MARK = "latency_zoo"
BATCHES = (1, 64)
#: Batches of a --zoo run (224x224 inputs: a batch of 64 would take minutes per round).
ZOO_BATCHES = (1, 8)
RUNTIMES = ("torch", "ort")
#: Flag a row when ORT's speed-up and the MAC speed-up differ by more than this fraction.
DEVIATION = 0.20
#: (label, network, speed-up): the pruned networks; speed-up None = the unpruned original.
NETWORKS = (
    ("VGG-16-BN", "vgg", None),
    ("VGG-16-BN 2x", "vgg", 2.0),
    ("VGG-16-BN 4x", "vgg", 4.0),
    ("VGG-16-BN 5x", "vgg", 5.0),
    ("ResNet-56", "resnet56", None),
    ("ResNet-56 2x", "resnet56", 2.0),
)


# ---------------------------------------------------------------------------- networks
def _bench(network: str):
    """The whole-model benchmark description of ``network`` (model name, checkpoint)."""
    if network == "vgg":
        from vgg_cifar import BENCH

        return BENCH
    from resnet_cifar import bench_for

    return bench_for(network)


def build_networks(shared: Path, n_images: int, seed: int, log: Callable = print) -> dict:
    """The unpruned networks of ../shared and their pruned versions, in NETWORKS order:
    ``{label: {"model", "base" (label of its original), "prune_s", "report_speedup"}}``."""
    from _whole_model import _load

    originals: dict[str, tuple] = {}
    out: dict[str, dict] = {}
    for label, network, speedup in NETWORKS:
        if network not in originals:
            model, calib, _ = _load(_bench(network), shared)
            originals[network] = (label, model.eval(), calib)
        base_label, model, calib = originals[network]
        if speedup is None:
            out[label] = {"model": model, "base": base_label}
            continue
        out[label] = _pruned(label, base_label, model, calib, log, speedup=speedup,
                             n_images=n_images, seed=seed)  # fmt: skip
    return out


def _pruned(label: str, base: str, model, calib, log: Callable, **options) -> dict:
    """``prune_model(model, calib, **options)``, timed: the entry of ``label``."""
    from chanprune.prune import prune_model

    start = time.perf_counter()
    pruned, report = prune_model(model, calib, progress=False, **options)
    seconds = time.perf_counter() - start
    log(f"pruned {label}: {report.speedup:.2f}x fewer MACs in {seconds:.0f} s")
    return {
        "model": pruned.eval(), "base": base, "prune_s": seconds,
        "report_speedup": report.speedup,
    }  # fmt: skip


def build_zoo_networks(
    names, n_images: int, seed: int, multiple: int = 1, log: Callable = print
) -> dict:
    """pytorchcv networks (random weights, see benchmarks/zoo.py) and their 2x versions
    from the graph planner, pruned on ``n_images`` random 224x224 images: the latency
    depends on the widths only. With ``multiple`` > 1, also a 2x version whose widths are
    multiples of it (``channel_multiple``)."""
    import torch
    from zoo import ZOO, build

    known = {z[1]: z for z in ZOO}
    out: dict[str, dict] = {}
    for name in names:
        module, _, size = known[name]
        model = build(module, name, seed)
        images = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(1))
        out[name] = {"model": model, "base": name}
        for m in (1, multiple) if multiple > 1 else (1,):
            label = f"{name} 2x" + (f", widths x{m}" if m > 1 else "")
            out[label] = _pruned(label, name, model, images, log, speedup=2.0, seed=seed,
                                 holdout=0.0, channel_multiple=m)  # fmt: skip
    return out


# ---------------------------------------------------------------------------- timing
def ort_session(path: Path, threads: int, profile_prefix: Optional[str] = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _inputs(input_shape, batch: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.standard_normal((batch, *input_shape), dtype=np.float32)


def ort_latency_ms(session, x, n_warmup: int, n_repeat: int) -> float:
    """Median milliseconds of ``session.run`` on ``x`` over ``n_repeat`` runs after
    ``n_warmup`` untimed ones (the counterpart of ``measure_latency``'s ``median_ms``)."""
    import numpy as np

    feed = {"input": x}
    for _ in range(n_warmup):
        session.run(None, feed)
    times = np.empty(n_repeat)
    for i in range(n_repeat):
        start = time.perf_counter()
        session.run(None, feed)
        times[i] = (time.perf_counter() - start) * 1e3
    return float(np.median(times))


def measure(
    networks: dict,
    input_shape: tuple,
    workdir: Path,
    *,
    rounds: int,
    n_warmup: int,
    n_repeat: int,
    threads: int,
    batches=BATCHES,
    log: Callable = print,
) -> dict:
    """Export every network, then time it in both runtimes, ``rounds`` interleaved rounds.

    ``networks``: ``{label: {"model": nn.Module, "base": label of the unpruned network,
    ...}}``. Returns ``{label: {"macs", "mac_speedup", "onnx_max_abs_diff", "onnx_scale",
    "times_ms": {runtime: {batch: [one median per round]}}, "onnx": path}}``.
    """
    import torch

    from chanprune.export import export_onnx
    from chanprune.flops import count_macs, measure_latency

    results: dict[str, dict] = {}
    for label, net in networks.items():
        path = workdir / f"{len(results):02d}.onnx"
        check = export_onnx(net["model"], path, input_shape)
        results[label] = {
            "base": net["base"],
            "macs": count_macs(net["model"], input_shape),
            "onnx_max_abs_diff": check.max_abs_diff,
            "onnx_scale": check.scale,
            "onnx": str(path),
            "conv_widths": [
                [m.in_channels, m.out_channels]
                for m in net["model"].modules()
                if isinstance(m, torch.nn.Conv2d)
            ],
            "times_ms": {rt: {str(b): [] for b in batches} for rt in RUNTIMES},
        }
        for key in ("prune_s", "report_speedup"):
            if key in net:
                results[label][key] = net[key]
    for r in results.values():
        r["mac_speedup"] = results[r["base"]]["macs"] / r["macs"]

    sessions = {label: ort_session(Path(r["onnx"]), threads) for label, r in results.items()}
    inputs = {b: _inputs(input_shape, b) for b in batches}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k in range(rounds):
            start = time.perf_counter()
            for label, net in networks.items():
                times = results[label]["times_ms"]
                for b in batches:
                    stats = measure_latency(
                        net["model"], input_shape, batch_size=b, n_warmup=n_warmup,
                        n_repeat=n_repeat,
                    )  # fmt: skip
                    times["torch"][str(b)].append(stats["median_ms"])
                    ms = ort_latency_ms(sessions[label], inputs[b], n_warmup, n_repeat)
                    times["ort"][str(b)].append(ms)
            log(f"round {k + 1}/{rounds}: {time.perf_counter() - start:.0f} s")
    finally:
        torch.set_num_threads(previous)
    return results


# ---------------------------------------------------------------------------- profiling
def ort_profile(path: Path, x, threads: int, runs: int, workdir: Path) -> dict:
    """ONNX Runtime's profile of ``runs`` runs on ``x`` (after one warm-up): total node
    time, the share of each operator type and the nodes taking the most time."""
    from collections import defaultdict

    session = ort_session(path, threads, profile_prefix=str(workdir / "ort_profile"))
    feed = {"input": x}
    session.run(None, feed)
    for _ in range(runs):
        session.run(None, feed)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    by_node: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        node = e["name"][: -len("_kernel_time")]
        by_node[node] += e["dur"]
        by_op[e.get("args", {}).get("op_name", "?")] += e["dur"]
    total = sum(by_node.values()) or 1.0
    top = sorted(by_node.items(), key=lambda kv: -kv[1])[:5]
    # ORT's NCHWc transformer rewrites a conv into its blocked-layout kernels only where
    # the channel counts allow; those nodes are named after their output + "_nchwc".
    nchwc = sum(t for n, t in by_node.items() if n.endswith("_nchwc"))
    return {
        "runs": runs,
        "node_ms_per_run": total / 1e3 / (runs + 1),
        "nchwc_share": nchwc / total,
        "op_share": {op: t / total for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])},
        "top_nodes": [{"node": n, "share": t / total} for n, t in top],
    }


def flagged(results: dict) -> list[tuple[str, int]]:
    """(label, batch) of the pruned rows whose ORT speed-up is off the MAC speed-up by
    more than DEVIATION (relative)."""
    out = []
    for label, r in results.items():
        if r["base"] == label:
            continue
        for b in r["times_ms"]["ort"]:
            ratio = speedup(results, label, "ort", b) / r["mac_speedup"]
            if abs(ratio - 1) > DEVIATION:
                out.append((label, int(b)))
    return out


def profile_flagged(results: dict, input_shape, threads: int, runs: int, workdir: Path) -> dict:
    """Profiles of every flagged row and of its unpruned network, keyed "label@bN"."""
    profiles: dict[str, dict] = {}
    for label, b in flagged(results):
        for name in (label, results[label]["base"]):
            key = f"{name}@b{b}"
            if key not in profiles:
                x = _inputs(input_shape, b)
                path = Path(results[name]["onnx"])
                profiles[key] = ort_profile(path, x, threads, runs, workdir)
    return profiles


# ---------------------------------------------------------------------------- report
def _median(values) -> float:
    import numpy as np

    return float(np.median(values))


def latency(results: dict, label: str, runtime: str, batch) -> float:
    return _median(results[label]["times_ms"][runtime][str(batch)])


def speedup(results: dict, label: str, runtime: str, batch) -> float:
    base = results[label]["base"]
    return latency(results, base, runtime, batch) / latency(results, label, runtime, batch)


def table(results: dict, batches=BATCHES) -> list[str]:
    """The Markdown table: per network, MAC speed-up and, per runtime and batch, the
    median latency (spread of the rounds) and the measured speed-up."""
    names = {"torch": "PyTorch", "ort": "ORT"}
    header = ["network", "conv MMACs", "MAC speed-up"]
    for b in batches:
        for rt in RUNTIMES:
            header += [f"{names[rt]} b{b} ms", "speed-up"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, r in results.items():
        cells = [label, f"{r['macs'] / 1e6:.1f}", f"{r['mac_speedup']:.2f}x"]
        for b in batches:
            for rt in RUNTIMES:
                values = r["times_ms"][rt][str(b)]
                cells.append(f"{_median(values):.2f} ({min(values):.2f}-{max(values):.2f})")
                cells.append(
                    "-" if r["base"] == label else f"{speedup(results, label, rt, b):.2f}x"
                )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def profile_lines(results: dict, profiles: dict) -> list[str]:
    lines = []
    for label, b in flagged(results):
        mine, base = profiles.get(f"{label}@b{b}"), profiles.get(f"{results[label]['base']}@b{b}")
        measured, macs = speedup(results, label, "ort", b), results[label]["mac_speedup"]
        head = f"- **{label}, batch {b}**: ORT {measured:.2f}x vs {macs:.2f}x in MACs"
        if mine is None or base is None:
            lines.append(head + "; not yet profiled.")
            continue

        def shares(p):
            return ", ".join(f"{op} {s:.0%}" for op, s in list(p["op_share"].items())[:4])

        top = ", ".join(f"`{n['node']}` {n['share']:.0%}" for n in mine["top_nodes"][:3])
        widths = results[label].get("conv_widths", [])
        # The first conv reads the image (3 channels): only the other widths count.
        odd = sum(1 for i, w in enumerate(widths) if (i and w[0] % 8) or w[1] % 8)
        lines.append(
            f"{head}. ORT profile ({mine['runs']} runs), node time per run "
            f"{base['node_ms_per_run']:.2f} ms unpruned -> {mine['node_ms_per_run']:.2f} ms "
            f"pruned (ratio {base['node_ms_per_run'] / mine['node_ms_per_run']:.2f}x); time by "
            f"operator, unpruned: {shares(base)}; pruned: {shares(mine)}; in NCHWc-blocked "
            f"kernels: {base.get('nchwc_share', 0):.0%} unpruned, "
            f"{mine.get('nchwc_share', 0):.0%} pruned ({odd} of {len(widths)} convs of the "
            f"pruned network have a width that is not a multiple of 8); largest nodes of "
            f"the pruned network: {top}."
        )
    return lines


def markdown(data: dict) -> str:
    results = data["results"]
    batches = tuple(data["config"].get("batches", BATCHES))
    if data["config"].get("zoo"):
        return _zoo_markdown(data, batches)
    lines = [
        f"<!-- {MARK}:start -->",
        "## CPU latency in PyTorch and ONNX Runtime (`benchmarks/latency.py`)",
        "",
        f"The shared VGG-16-BN and ResNet-56 pruned with `prune_model` (LASSO, uniform "
        f"schedule, seed {data['config']['seed']}) on **{data['config']['n_images']}** "
        "calibration images of `train5k` (not 5,000: the latency depends on the widths "
        "only; accuracy is not measured here), exported with `chanprune.export.export_onnx` "
        "(opset 17, dynamic batch; ONNX Runtime matched PyTorch to within "
        f"{data['max_rel_diff']:.1e} of the output scale on every network), timed on random "
        "3x32x32 inputs. Latency: median ms per batch over "
        f"{data['config']['rounds']} interleaved rounds (range of the round medians), each "
        f"round the median of {data['config']['repeat']} timed runs after "
        f"{data['config']['warmup']} warm-up runs; {data['config']['threads']} threads in "
        "both runtimes. Speed-up: unpruned latency / pruned latency in the same runtime "
        "and batch; MAC speed-up: conv MACs before / after.",
        "",
        *_provenance(data),
        *table(results),
        "",
        *_flagged_section(data),
        f"<!-- {MARK}:end -->",
    ]
    return "\n".join(lines)


def _provenance(data: dict) -> list[str]:
    """The command that made ``data`` and where it ran."""
    return [
        "```", data["command"], "```", "",
        f"Machine: {data['machine']}; code {data.get('commit')}.", "",
    ]  # fmt: skip


def _flagged_section(data: dict) -> list[str]:
    """The rows off the MAC speed-up by more than DEVIATION, with their profiles."""
    if not flagged(data["results"]):
        return []
    return [
        f"Rows where ONNX Runtime's speed-up is more than {DEVIATION:.0%} off the MAC "
        "speed-up, with ONNX Runtime's profile of the pruned network and of its original "
        "at that batch size (share of the summed node time):",
        "",
        *profile_lines(data["results"], data.get("profiles", {})),
        "",
    ]


def _zoo_markdown(data: dict, batches: tuple) -> str:
    """The section of a ``--zoo`` run: graph-planned third-party networks at 224x224."""
    config = data["config"]
    lines = [
        f"<!-- {ZOO_MARK}:start -->",
        "## CPU latency of graph-planned networks (`benchmarks/latency.py --zoo`)",
        "",
        "pytorchcv 0.0.74 definitions (random weights, as in `benchmarks/zoo.py`) pruned 2x "
        f"by the graph planner on {config['n_images']} random images (rows 'widths xN': "
        "with `channel_multiple=N`), exported and timed "
        f"on random 3x224x224 inputs, batches {', '.join(map(str, batches))}; "
        f"{config['rounds']} interleaved rounds of {config['repeat']} timed runs after "
        f"{config['warmup']} warm-up runs, {config['threads']} threads. MAC speed-up: conv "
        "MACs before / after (`chanprune.flops.count_macs`). ONNX Runtime matched PyTorch "
        f"to within {data['max_rel_diff']:.1e} of the output scale.",
        "",
        *_provenance(data),
        *table(data["results"], batches),
        "",
        *_flagged_section(data),
        f"<!-- {ZOO_MARK}:end -->",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main
def parse_args(argv):
    import torch

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n-images", type=int, default=500, help="calibration images (500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pruning (0)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per measurement (3)")
    p.add_argument("--repeat", type=int, default=10, help="timed runs per measurement (10)")
    p.add_argument(
        "--threads", type=int, default=torch.get_num_threads(),
        help=f"threads of both runtimes (default: torch's, {torch.get_num_threads()} here)",
    )  # fmt: skip
    p.add_argument(
        "--profile-runs", type=int, default=10,
        help="runs profiled for each flagged row, 0 for none (10)",
    )  # fmt: skip
    p.add_argument("--shared", type=Path, default=SHARED, help=f"shared folder ({SHARED})")
    p.add_argument("--out", type=Path, default=OUT, help=f"results JSON ({OUT})")
    p.add_argument(
        "--results-md", type=Path, default=None,
        help="also (re)write the latency section of this Markdown file (default: none)",
    )  # fmt: skip
    p.add_argument(
        "--report-only",
        action="store_true",
        help="print the table (and --results-md) from the JSON",
    )
    p.add_argument(
        "--zoo", nargs="+", default=None, metavar="NAME",
        help="instead of the shared networks: these pytorchcv networks (benchmarks/zoo.py "
        "names) and their 2x versions from the graph planner, at 224x224, batches 1 and 8; "
        "--n-images random images, results in results/latency_zoo.json (default: off)",
    )  # fmt: skip
    p.add_argument(
        "--channel-multiple", type=int, default=1, metavar="N",
        help="with --zoo: also a 2x version of each network with widths rounded to "
        "multiples of N (default: 1, none)",
    )  # fmt: skip
    return p.parse_args(argv)


def run(
    networks: dict, args, command: str, input_shape=(3, 32, 32), batches=BATCHES,
    log: Callable = print,
) -> dict:
    """Measure (and profile) ``networks``; the JSON-ready record, ``command`` the one that
    made it."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        results = measure(
            networks, input_shape, Path(tmp), rounds=args.rounds, n_warmup=args.warmup,
            n_repeat=args.repeat, threads=args.threads, batches=batches, log=log,
        )  # fmt: skip
        profiles = {}
        if args.profile_runs > 0:
            profiles = profile_flagged(results, input_shape, args.threads, args.profile_runs,
                                       Path(tmp))  # fmt: skip
    for r in results.values():
        r.pop("onnx")
    return {
        "command": command,
        "config": {
            "n_images": args.n_images,
            "seed": args.seed,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "repeat": args.repeat,
            "threads": args.threads,
            "input_shape": list(input_shape),
            "batches": list(batches),
            "zoo": bool(getattr(args, "zoo", None)),
        },  # fmt: skip
        "machine": (
            f"{os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}, "
            f"onnxruntime {_ort_version()}"
        ),
        "commit": git_commit(),
        "max_rel_diff": max(r["onnx_max_abs_diff"] / r["onnx_scale"] for r in results.values()),
        "results": results,
        "profiles": profiles,
    }


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def report(data: dict, out: Path, results_md: Optional[Path], log: Callable = print) -> None:
    """Write the JSON (atomically), print the table and the flagged rows, and update the
    Markdown section when asked."""
    write_atomic(out, json.dumps(data, indent=1) + "\n")
    log("\n".join(table(data["results"], tuple(data["config"].get("batches", BATCHES)))))
    for line in profile_lines(data["results"], data.get("profiles", {})):
        log(line)
    if results_md is not None:
        mark = ZOO_MARK if data["config"].get("zoo") else MARK
        replace_section(results_md, mark, markdown(data))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    for option in ("n_images", "rounds", "repeat", "threads"):
        if getattr(args, option) < 1:
            print(f"error: --{option.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.zoo and args.out == OUT:
        args.out = OUT.with_name("latency_zoo.json")
    if args.report_only:
        if not args.out.is_file():
            print(f"error: no results at {args.out}", file=sys.stderr)
            return 2
        report(json.loads(args.out.read_text()), args.out, args.results_md)
        return 0
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print('error: needs onnx and onnxruntime: pip install -e ".[export]"', file=sys.stderr)
        return 2
    command = " ".join(["python benchmarks/latency.py", *map(shlex.quote, argv)])
    if args.zoo:
        from zoo import ZOO

        unknown = sorted(set(args.zoo) - {z[1] for z in ZOO})
        if unknown:
            print(f"error: unknown --zoo network(s) {unknown}", file=sys.stderr)
            return 2
        networks = build_zoo_networks(args.zoo, args.n_images, args.seed,
                                      args.channel_multiple)  # fmt: skip
        data = run(networks, args, command, input_shape=(3, 224, 224), batches=ZOO_BATCHES)
        report(data, args.out, args.results_md)
        return 0
    if not (args.shared / "models").is_dir():
        print(f"error: the shared checkpoints are not at {args.shared}", file=sys.stderr)
        return 2
    networks = build_networks(args.shared, args.n_images, args.seed)
    data = run(networks, args, command)
    report(data, args.out, args.results_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
