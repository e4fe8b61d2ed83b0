"""Fixtures for the model-zoo tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

#: ``../shared`` beside the repository root (real checkpoints); absent on a fresh clone.
SHARED_DIR = Path(__file__).resolve().parents[2].parent / "shared"


@pytest.fixture
def shared_models_dir() -> Path:
    """``../shared/models``; skips the test when the folder is absent."""
    path = SHARED_DIR / "models"
    if not path.is_dir():
        pytest.skip(f"needs the shared checkpoints folder {path}, which is absent")
    return path


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def file_hash():
    """A function ``path -> hex SHA-256`` of the file's bytes (to check files stay unchanged)."""

    def _hash(path: Path) -> str:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    return _hash
