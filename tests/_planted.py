"""Planted layer problems with known answers, and other helpers shared by the tests."""

from __future__ import annotations

import numpy as np


def planted_conv(
    seed: int = 0,
    *,
    n_samples: int = 600,
    c: int = 10,
    n: int = 6,
    k: int = 3,
    support=(1, 4, 5, 8),
    noise: float = 0.0,
    bias: float = 0.0,
):
    """``Y = sum_{i in support} X_i W_i^T + bias + noise``: only ``support`` matters.

    Returns ``X (n_samples, c, k, k)``, ``Y (n_samples, n)``, ``W (n, c, k, k)``,
    ``b (n,)`` and the support as a sorted int64 array.
    """
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_samples, c, k, k))
    W = rng.normal(size=(n, c, k, k))
    b = np.full(n, bias)
    support = np.asarray(sorted(support), dtype=np.int64)
    Y = np.einsum("scij,ocij->so", X[:, support], W[:, support]) + b
    Y = Y + noise * rng.normal(size=Y.shape)
    return X, Y, W, b, support


def dense_design(X: np.ndarray, kept) -> np.ndarray:
    """Flattened patches of channels ``kept`` plus a ones column: the raw LS design."""
    Xk = X[:, np.asarray(kept)].reshape(X.shape[0], -1)
    return np.hstack([Xk, np.ones((X.shape[0], 1))])


def randomize_batchnorm(model):
    """Give every BatchNorm2d non-trivial statistics and affine terms (so that folding
    matters), and put the model in eval mode. Uses the global torch RNG."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.3)
    return model.eval()


def conv_macs_by_hooks(model, input_shape, *, include_linear: bool = False) -> int:
    """Conv MACs counted from the shapes seen in a forward pass (independent of
    chanprune.flops): H_out * W_out * c_out * c_in / groups * kh * kw per conv; with
    ``include_linear``, also in_features per output feature of every Linear."""
    import torch
    from torch import nn

    total = []

    def hook(layer, args, out):
        if isinstance(layer, nn.Linear):
            total.append(out[0].numel() * args[0].shape[-1])
            return
        kh, kw = layer.kernel_size
        c_in = layer.weight.shape[1]  # per group; a channel sampler's input is wider
        total.append(out.shape[2] * out.shape[3] * out.shape[1] * c_in * kh * kw)

    kinds = (nn.Conv2d, nn.Linear) if include_linear else nn.Conv2d
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
    return sum(total)


def pyproject() -> dict:
    """The repository's pyproject.toml, parsed (tomllib on 3.11+, tomli before)."""
    from pathlib import Path

    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11: the test extra installs tomli
        import tomli as tomllib
    return tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def run_cli(argv, capsys) -> tuple:
    """``chanprune.cli.main(argv)`` -> (exit code, stdout, stderr), SystemExit included."""
    import chanprune.cli as cli

    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def load_script(path):
    """A script (``benchmarks/*.py``, ``data/*.py``) imported as a module, by path."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module
