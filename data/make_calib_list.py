"""Make a deterministic, class-balanced calibration list for ``chanprune prune --calib``.

Reads a dataset on disk, either an image folder ``ROOT/<class>/<file>`` (ImageNet's train
tree, the CIFAR-10 JPEG export ``cifar10-jpeg/train5k``, ...) or the CIFAR-10 python batches
(``data_batch_1``..``5``, ``test_batch``; the images drawn from them are written as PNG
files beside the list), draws N images balanced over the classes with a seed, and writes a
list file, one ``PATH LABEL`` line per image (format: data/README.md). All the work is
:func:`chanprune.data.make_calibration_list`; this script only parses the arguments.

Exit codes: 0 success; 2 bad input (a missing or unusable dataset, N too large, ...:
one line on stderr); 1 when a file cannot be written.

Examples
--------
python data/make_calib_list.py ../shared/data/cifar10-jpeg/train5k --n-images 500 \\
    --out data/cache/cifar10_500.txt
python data/make_calib_list.py ~/datasets/imagenet/train --n-images 5000 --seed 1 \\
    --out data/cache/imagenet_5000.txt
python data/make_calib_list.py ~/datasets/cifar-10-batches-py --n-images 1000 \\
    --out data/cache/cifar10_1000.txt      # PNGs go to data/cache/cifar10_1000_images/
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import Counter
from typing import Optional, Sequence

PROG = "make_calib_list.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "source",
        metavar="DATASET",
        help="an image folder DATASET/<class>/<image> or a folder of CIFAR-10 python batches",
    )
    p.add_argument(
        "--out", required=True, metavar="LIST.txt",
        help="the list file to write (overwritten; missing folders are created)",
    )  # fmt: skip
    p.add_argument(
        "--n-images", type=int, required=True, metavar="N",
        help="images in the list, N // K from each of the K classes (the first N %% K "
        "classes one more, with a warning)",
    )  # fmt: skip
    p.add_argument(
        "--seed", type=int, default=0, metavar="S",
        help="seed of the draw: the same seed gives the same list (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--split", choices=("train", "test"), default="train",
        help="CIFAR-10 python batches only: the split to draw from (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--images-dir", default=None, metavar="DIR",
        help="CIFAR-10 python batches only: where the PNG files go "
        "(default: beside the list, <list stem>_images)",
    )  # fmt: skip
    p.add_argument(
        "--absolute", action="store_true",
        help="write absolute paths (default: relative to the list's folder)",
    )  # fmt: skip
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the script; returns the exit code (``--help`` and usage errors raise
    ``SystemExit`` as argparse does)."""
    args = build_parser().parse_args(argv)
    from chanprune.data import make_calibration_list

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            entries = make_calibration_list(
                args.source, args.out, args.n_images, seed=args.seed, split=args.split,
                images_dir=args.images_dir, absolute=args.absolute,
            )  # fmt: skip
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{PROG}: error: could not write: {exc}", file=sys.stderr)
        return 1
    for warning in caught:
        print(f"{PROG}: warning: {warning.message}", file=sys.stderr)
    counts = Counter(label for _, label in entries)
    print(
        f"Wrote {args.out}: {len(entries)} images from {args.source}, "
        f"{min(counts.values())}-{max(counts.values())} per class over {len(counts)} classes, "
        f"seed {args.seed}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
