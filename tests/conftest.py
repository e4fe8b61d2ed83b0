"""Shared fixtures: where ../shared is, and skipping what needs it or a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/_planted.py

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ``shared`` folder beside the repository, or skip when it is absent."""
    if not (SHARED / "README.md").is_file():
        pytest.skip(f"needs the shared data and checkpoints at {SHARED} (absent on this machine)")
    return SHARED


@pytest.fixture
def one_thread():
    """Tiny networks on a 2-core machine: a second thread only oversubscribes it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(previous)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
