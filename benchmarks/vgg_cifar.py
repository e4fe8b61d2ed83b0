"""Whole-model pruning of the CIFAR-10 VGG-16-BN from ../shared, without fine-tuning.

For each (method, schedule, speed-up) the network is pruned with ``chanprune.prune_model``
on the calibration images of ``train5k`` and scored on the whole ``test`` split; see
``_whole_model.py`` for how runs are isolated and recorded.

Examples
--------
python benchmarks/vgg_cifar.py --methods lasso greedy_ls --speedups 2 4 5
python benchmarks/vgg_cifar.py --report-only
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _whole_model import Benchmark, main  # noqa: E402

BENCH = Benchmark(
    name="vgg_cifar",
    title="VGG-16-BN on CIFAR-10, whole model",
    model="vgg16_bn_cifar10",
    checkpoint="vgg16_bn_cifar10.pth",
    command=(
        "python benchmarks/vgg_cifar.py --methods lasso greedy_ls max_response first_k random "
        "--speedups 2 4 5 --schedules uniform paper energy --latency; "
        "python benchmarks/vgg_cifar.py --methods lasso --speedups 2 4 5 --schedules energy "
        "--variants alternate --latency; "
        "python benchmarks/vgg_cifar.py --methods lasso greedy_ls --speedups 2 4 "
        "--schedules uniform --variants graph; "
        "python benchmarks/vgg_cifar.py --methods lasso greedy_ls --speedups 2 4 5 "
        "--schedules sensitivity; "
        "python benchmarks/vgg_cifar.py --methods greedy_ls --speedups 4 --schedules energy "
        "--variants distill1 distill3 distill5"
        "; python benchmarks/vgg_cifar.py --methods greedy_swap --speedups 4 --schedules energy "
        "--variants '' names; "
        "python benchmarks/vgg_cifar.py --methods greedy_ls --speedups 2 4 5 --schedules energy "
        "--variants graph"
    ),
    methods=("lasso", "greedy_ls", "greedy_swap", "max_response", "first_k", "random"),
    # LASSO alternating with the least-squares refit, as in the paper's sparse-coding view.
    variants={
        "alternate": {"alternate": True},
        # The same network through the plan traced from the graph (planner="graph").
        "graph": {"planner": "graph"},
        # Then a short distillation against the original network (recover="distill").
        **{f"distill{n}": {"recover": "distill", "recover_epochs": n} for n in (1, 3, 5)},
    },
    script=str(Path(__file__).resolve()),
)

if __name__ == "__main__":
    sys.exit(main(BENCH, sys.argv[1:], __doc__))
