"""Branch-internal pruning of the CIFAR-10 ResNet-56 (and ResNet-20) from ../shared.

Accuracy on the whole ``test`` split without fine-tuning, at matched MAC speed-ups, for
each selector with and without the residual correction (variant ``nocorr``), and with the
paper's channel sampler before the first conv of every branch (variant ``sampler``).

Examples
--------
python benchmarks/resnet_cifar.py --methods lasso greedy_ls --speedups 1.5 2 \
    --variants "" nocorr
python benchmarks/resnet_cifar.py --model resnet20 --methods lasso --speedups 1.5 2
python benchmarks/resnet_cifar.py --methods lasso greedy_ls --speedups 1.5 2 \
    --schedules uniform paper --variants "" sampler
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _whole_model import Benchmark, main  # noqa: E402

MODELS = {
    "resnet56": ("resnet56_cifar10", "resnet56-4bfd9763.th"),
    "resnet20": ("resnet20_cifar10", "resnet20-12fca82f.th"),
}


def bench_for(model: str) -> Benchmark:
    name, checkpoint = MODELS[model]
    return Benchmark(
        name=f"resnet_cifar_{model}",
        title=f"{model.replace('resnet', 'ResNet-')} on CIFAR-10, branch-internal pruning",
        model=name,
        checkpoint=checkpoint,
        command=(
            f"python benchmarks/resnet_cifar.py --model {model} --methods lasso greedy_ls "
            "max_response first_k random --speedups 1.5 2 --variants '' nocorr; "
            f"python benchmarks/resnet_cifar.py --model {model} --methods lasso greedy_ls "
            "--speedups 1.5 2 --schedules uniform paper --variants '' sampler; "
            f"python benchmarks/resnet_cifar.py --model {model} --methods lasso greedy_ls "
            "--speedups 1.5 2 --schedules energy; "
            f"python benchmarks/resnet_cifar.py --model {model} --methods lasso greedy_ls "
            "--speedups 2 --variants graph; "
            f"python benchmarks/resnet_cifar.py --model {model} --methods greedy_ls lasso "
            "--speedups 1.5 2 --schedules sensitivity"
            + (
                "; python benchmarks/resnet_cifar.py --model resnet56 --methods greedy_ls "
                "--speedups 2 --schedules paper --variants distill1 distill3 distill5"
                "; python benchmarks/resnet_cifar.py --model resnet56 --methods greedy_swap "
                "--speedups 2 --schedules paper; python benchmarks/resnet_cifar.py --model "
                "resnet56 --methods greedy_ls --speedups 2 --schedules paper --variants graph"
                if model == "resnet56"
                else ""
            )
        ),
        methods=("lasso", "greedy_ls", "greedy_swap", "max_response", "first_k", "random"),
        variants={
            "nocorr": {"residual_correction": False},
            "sampler": {"channel_sampler": True},
            # The same network through the plan traced from the graph (planner="graph").
            "graph": {"planner": "graph"},
            # Then a short distillation against the original network (recover="distill").
            **{f"distill{n}": {"recover": "distill", "recover_epochs": n} for n in (1, 3, 5)},
        },
        script=str(Path(__file__).resolve()),
        script_args=("--model", model),
    )


if __name__ == "__main__":
    argv = sys.argv[1:]
    model = "resnet56"
    if "--model" in argv:
        i = argv.index("--model")
        model = argv[i + 1]
        del argv[i : i + 2]
    if model not in MODELS:
        print(f"error: --model must be one of {sorted(MODELS)}; got {model!r}", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(bench_for(model), argv, __doc__))
