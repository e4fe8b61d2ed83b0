"""Self-contained demo: train a small VGG on scikit-learn's digits, prune it every way, compare.

Nothing is downloaded: the 8x8 digits ship with scikit-learn. :func:`run_demo`

1. trains :func:`chanprune.models.vgg_digits` on the training split (seeded, a few seconds
   on one CPU core), or reuses the copy cached by an earlier run;
2. prunes it to the target MAC speed-up with each selection method of
   :func:`chanprune.prune.prune_model`, calibrating on the training images, without any
   fine-tuning;
3. evaluates every pruned network on the test split and reports accuracy, mean per-layer
   reconstruction error (calibration and held-out), MACs, achieved speed-up and wall time,
   as a printed table, ``demo.json`` and a bar chart ``demo.png``.

From the command line: ``chanprune demo`` (or ``python -m chanprune demo``).

Examples
--------
>>> from chanprune.demo import run_demo
>>> result = run_demo("chanprune-demo", methods=("lasso", "first_k"))  # doctest: +SKIP
>>> result["methods"]["lasso"]["accuracy"]  # doctest: +SKIP
0.98
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ._validation import check_int_in_range, check_real_in_range
from .data import evaluate_accuracy, load_digits_dataset
from .flops import count_macs, count_params
from .io import atomic_write, load, save
from .models import vgg_digits
from .prune import MODEL_METHODS, prune_model

__all__ = ["TRAIN_CONFIG", "default_cache_dir", "train_digits_model", "run_demo", "format_table"]

logger = logging.getLogger(__name__)

#: How the demo network is trained; part of the cache key (with the seed).
TRAIN_CONFIG: dict[str, Any] = {
    "model": "vgg_digits",
    "optimizer": "adam",
    "schedule": "one_cycle",
    "max_lr": 1e-2,
    "epochs": 12,
    "batch_size": 128,
    "test_fraction": 0.25,  # load_digits_dataset's split; its split seed stays 0
    "version": 1,  # bump when the training code changes
}

_INPUT_SHAPE = (1, 8, 8)

PathLike = Union[str, "os.PathLike[str]"]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/chanprune``, or ``~/.cache/chanprune`` when the variable is unset."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "chanprune"


@contextlib.contextmanager
def _limit_threads(n: Optional[int]) -> Iterator[None]:
    """Run with at most ``n`` torch and BLAS/OpenMP threads, restored afterwards.

    ``None``: change nothing. BLAS threads (numpy, scipy) are limited through threadpoolctl,
    a scikit-learn dependency, when it is importable.
    """
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with contextlib.ExitStack() as stack:
            try:
                from threadpoolctl import threadpool_limits
            except ImportError:  # pragma: no cover - scikit-learn depends on it
                logger.debug("threadpoolctl is missing; BLAS threads are not limited.")
            else:
                stack.enter_context(threadpool_limits(limits=n))
            yield
    finally:
        torch.set_num_threads(previous)


def _cache_key(config: dict[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _train(config: dict[str, Any], seed: int, progress: bool) -> nn.Module:
    """Train vgg_digits as ``config`` says; deterministic for a given seed (CPU)."""
    images, labels = load_digits_dataset("train", test_fraction=config["test_fraction"]).tensors
    with torch.random.fork_rng(devices=[]):  # do not disturb the caller's global RNG
        torch.manual_seed(seed)
        model = vgg_digits()
    generator = torch.Generator().manual_seed(seed)
    batch_size = config["batch_size"]
    steps_per_epoch = -(-images.shape[0] // batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["max_lr"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config["max_lr"], total_steps=config["epochs"] * steps_per_epoch
    )
    model.train()
    for _ in tqdm(range(config["epochs"]), desc="training", unit="epoch", disable=not progress):
        order = torch.randperm(images.shape[0], generator=generator)
        for lo in range(0, images.shape[0], batch_size):
            idx = order[lo : lo + batch_size]
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


def train_digits_model(
    *,
    seed: int = 0,
    cache_dir: Optional[PathLike] = None,
    epochs: Optional[int] = None,
    progress: bool = True,
    num_threads: Optional[int] = 1,
) -> tuple[nn.Module, dict[str, Any]]:
    """The demo's trained :func:`~chanprune.models.vgg_digits`, from the cache or trained now.

    The model is trained on ``load_digits_dataset("train")`` as :data:`TRAIN_CONFIG` says
    (Adam with a one-cycle learning rate, seeded initialisation and shuffling), then cached as
    ``<cache_dir>/vgg_digits-<hash>.pt`` (a :func:`chanprune.io.save` file, written
    atomically), the hash covering the training configuration and ``seed``. A later call with
    the same configuration loads that file instead of training; an unreadable cache file is
    trained over, with a warning.

    Parameters
    ----------
    seed : int >= 0, default=0
        Seeds the initial weights and the shuffling.
    cache_dir : str, os.PathLike or None, default=None
        Folder of the cache (created if needed). ``None``: :func:`default_cache_dir`.
    epochs : int >= 1 or None, default=None
        Overrides ``TRAIN_CONFIG["epochs"]`` (another cache entry); ``None`` keeps it.
    progress : bool, default=True
        Show a progress bar while training.
    num_threads : int >= 1 or None, default=1
        Torch and BLAS threads while training (restored afterwards); see :func:`run_demo`.

    Returns
    -------
    model : nn.Module
        In eval mode, on the CPU.
    info : dict
        ``{"cache_hit": bool, "cache_file": str, "train_time_s": float, "config": dict}``;
        ``train_time_s`` is 0 on a cache hit.
    """
    seed = check_int_in_range(seed, "seed", 0, 2**63 - 1)
    config = dict(TRAIN_CONFIG, seed=seed)
    if epochs is not None:
        config["epochs"] = check_int_in_range(epochs, "epochs", 1)
    if num_threads is not None:
        num_threads = check_int_in_range(num_threads, "num_threads", 1)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"vgg_digits-{_cache_key(config)}.pt"

    if path.is_file():
        try:
            model = load(path)
        except ValueError as exc:
            logger.warning("The cached demo model is unreadable (%s); training it again.", exc)
        else:
            logger.info("Reusing the trained demo model cached at '%s'.", path)
            info = {"cache_hit": True, "cache_file": str(path), "train_time_s": 0.0}
            return model, {**info, "config": config}

    start = time.perf_counter()
    with _limit_threads(num_threads):
        model = _train(config, seed, progress)
    train_time = time.perf_counter() - start
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save(model, path)
    except OSError as exc:  # a read-only cache must not stop the demo
        logger.warning("Could not cache the trained demo model at '%s': %s", path, exc)
    else:
        logger.info("Trained the demo model in %.1f s; cached at '%s'.", train_time, path)
    info = {"cache_hit": False, "cache_file": str(path), "train_time_s": train_time}
    return model, {**info, "config": config}


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else None


def _check_methods(methods: Any) -> tuple[str, ...]:
    if isinstance(methods, str):
        methods = (methods,)
    try:
        methods = tuple(methods)
    except TypeError as exc:
        raise TypeError(
            f"The 'methods' parameter must be a sequence of method names; got {methods!r}."
        ) from exc
    if not methods:
        raise ValueError(f"The 'methods' parameter must name at least one of {MODEL_METHODS}.")
    unknown = [m for m in methods if m not in MODEL_METHODS]
    if unknown:
        raise ValueError(
            f"The 'methods' parameter has unknown method(s) {unknown}; "
            f"valid: {list(MODEL_METHODS)}."
        )
    if len(set(methods)) != len(methods):
        raise ValueError(f"The 'methods' parameter lists a method twice: {list(methods)}.")
    return methods


def run_demo(
    out_dir: PathLike,
    *,
    cache_dir: Optional[PathLike] = None,
    methods: Sequence[str] = MODEL_METHODS,
    speedup: float = 2.0,
    seed: int = 0,
    progress: bool = True,
    num_threads: Optional[int] = 1,
) -> dict[str, Any]:
    """Train (or reuse) a digits VGG, prune it with each method, compare; write JSON and PNG.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Folder for ``demo.json`` and ``demo.png`` (created if needed; both written
        atomically).
    cache_dir : str, os.PathLike or None, default=None
        Cache of the trained model, see :func:`train_digits_model`.
    methods : sequence of str, default=all of :data:`chanprune.prune.MODEL_METHODS`
        Selection methods to compare, in table order.
    speedup : float > 1, default=2.0
        Target MAC speed-up (uniform schedule).
    seed : int >= 0, default=0
        Seeds the training and the pruning (image split, sampled positions, ``random``).
    progress : bool, default=True
        Show progress bars.
    num_threads : int >= 1 or None, default=1
        Torch intra-op and BLAS threads during the demo (restored afterwards). The network
        is so small that more threads only add overhead, and oversubscribe a busy machine
        badly; ``None`` leaves the settings alone.

    Returns
    -------
    result : dict
        JSON-serialisable, also written to ``out_dir/demo.json``: ``"unpruned"``
        (``accuracy``, ``macs``, ``params``), ``"methods"`` (per method: ``accuracy``,
        ``rel_error_mean``, ``rel_error_heldout_mean``, ``macs_before``, ``macs_after``,
        ``speedup``, ``params_after``, ``wall_time_s``, ``widths``), ``"cache_hit"``,
        ``"train"`` (cache file, training time and configuration), the settings, and
        ``"files"`` (paths of the JSON and of the PNG, ``None`` when matplotlib is missing).
        The table is printed to stdout.

    Raises
    ------
    ValueError
        Unknown or duplicate methods, ``speedup <= 1`` or out of reach.
    """
    start = time.perf_counter()
    methods = _check_methods(methods)
    speedup = check_real_in_range(speedup, "speedup", 1.0, low_inclusive=False)
    seed = check_int_in_range(seed, "seed", 0, 2**63 - 1)
    if num_threads is not None:
        num_threads = check_int_in_range(num_threads, "num_threads", 1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    with _limit_threads(num_threads):
        model, train_info = train_digits_model(
            seed=seed, cache_dir=cache_dir, progress=progress, num_threads=None
        )
        calib = load_digits_dataset("train", test_fraction=TRAIN_CONFIG["test_fraction"])
        test = load_digits_dataset("test", test_fraction=TRAIN_CONFIG["test_fraction"])
        base_accuracy = evaluate_accuracy(model, test, batch_size=512, progress=False)
        rows: dict[str, dict[str, Any]] = {}
        for method in methods:
            t0 = time.perf_counter()
            pruned, report = prune_model(
                model, calib, speedup=speedup, method=method, seed=seed, progress=progress
            )
            wall = time.perf_counter() - t0
            accuracy = evaluate_accuracy(pruned, test, batch_size=512, progress=False)
            rows[method] = {
                "accuracy": accuracy,
                "accuracy_drop": base_accuracy - accuracy,
                "rel_error_mean": _mean([r.rel_error for r in report.layers]),
                "rel_error_heldout_mean": _mean([r.rel_error_heldout for r in report.layers]),
                "macs_before": report.macs_before,
                "macs_after": report.macs_after,
                "speedup": report.speedup,
                "params_after": report.params_after,
                "wall_time_s": wall,
                "widths": dict(report.options.get("widths", {})),
            }
            logger.info("%s: accuracy %.4f at %.2fx", method, accuracy, report.speedup)

    result: dict[str, Any] = {
        "model": "vgg_digits",
        "speedup_target": speedup,
        "seed": seed,
        "methods_order": list(methods),
        "n_calib_images": len(calib),
        "n_test_images": len(test),
        "cache_hit": train_info["cache_hit"],
        "train": train_info,
        "unpruned": {
            "accuracy": base_accuracy,
            # As the planner counts them: every conv and linear.
            "macs": count_macs(model, _INPUT_SHAPE, include_linear=True),
            "params": count_params(model),
        },
        "methods": rows,
        "torch_version": torch.__version__,
    }
    json_path = out / "demo.json"
    png_path = out / "demo.png"
    result["files"] = {
        "json": str(json_path),
        "png": str(png_path) if _plot(result, png_path) else None,
    }
    result["wall_time_s"] = time.perf_counter() - start
    text = json.dumps(result, indent=2) + "\n"
    atomic_write(json_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    print(format_table(result))
    print(f"\nWrote {json_path}" + (f" and {png_path}" if result["files"]["png"] else ""))
    return result


def format_table(result: dict[str, Any]) -> str:
    """Render :func:`run_demo`'s result as an aligned plain-text table.

    Parameters
    ----------
    result : dict
        The dict returned by :func:`run_demo` (or read back from ``demo.json``).

    Returns
    -------
    table : str
        One header line, a rule, the unpruned row, then one row per method.
    """
    header = (
        "method",
        "accuracy",
        "drop",
        "rel.err",
        "held-out",
        "MACs (K)",
        "speed-up",
        "time (s)",
    )
    base = result["unpruned"]
    rows = [
        (
            "unpruned",
            f"{base['accuracy']:.4f}",
            "-",
            "-",
            "-",
            f"{base['macs'] / 1e3:.1f}",
            "1.00x",
            "cached" if result["cache_hit"] else f"{result['train']['train_time_s']:.1f}",
        )
    ]

    def fmt(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.4f}"

    for method in result.get("methods_order", list(result["methods"])):
        r = result["methods"][method]
        rows.append(
            (
                method,
                f"{r['accuracy']:.4f}",
                f"{r['accuracy_drop']:+.4f}",
                fmt(r["rel_error_mean"]),
                fmt(r["rel_error_heldout_mean"]),
                f"{r['macs_after'] / 1e3:.1f}",
                f"{r['speedup']:.2f}x",
                f"{r['wall_time_s']:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest])

    title = (
        f"{result['model']} on scikit-learn digits ({result['n_test_images']} test images), "
        f"pruned to {result['speedup_target']:g}x fewer MACs (convs, linears) without fine-tuning"
    )
    rule = "-" * len(line(header))
    return "\n".join([title, line(header), rule, *(line(row) for row in rows)])


def _plot(result: dict[str, Any], path: Path) -> bool:
    """Bar chart of accuracy per method, unpruned accuracy as a line; False if no matplotlib."""
    try:
        from matplotlib.figure import Figure  # Agg canvas, no pyplot state
    except ImportError:
        logger.warning("matplotlib is not installed: skipping the plot %s.", path)
        return False
    order = result.get("methods_order", list(result["methods"]))
    accuracies = [result["methods"][m]["accuracy"] for m in order]
    base = result["unpruned"]["accuracy"]
    fig = Figure(figsize=(max(4.0, 0.8 * len(order) + 2.0), 3.6), layout="constrained")
    ax = fig.subplots()
    bars = ax.bar(range(len(order)), accuracies, color="tab:blue")
    ax.axhline(base, color="tab:red", linestyle="--", label=f"unpruned ({base:.3f})")
    for bar, value in zip(bars, accuracies):
        ax.annotate(
            f"{value:.3f}",
            (bar.get_x() + bar.get_width() / 2, value),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
    low = min([*accuracies, base])
    ax.set_ylim(max(0.0, low - 0.1), 1.0 + 0.02)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{result['model']}, {result['speedup_target']:g}x fewer MACs, no fine-tuning")
    ax.legend(loc="lower right")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return True
