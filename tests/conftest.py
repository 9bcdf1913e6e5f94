"""Shared test helpers.

Reference fixtures from the official implementations live in ``../shared/fixtures``
beside the repository (CI lays ``shared/`` there too); ``POLYDIFF_FIXTURES`` overrides it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def fixtures_dir() -> Path:
    env = os.environ.get("POLYDIFF_FIXTURES")
    return Path(env) if env else REPO.parent / "shared" / "fixtures"


def load_fixture(name: str) -> dict:
    """Load ``name`` from the shared fixtures with ``weights_only=True``; skip when absent."""
    path = fixtures_dir() / name
    if not path.exists():
        pytest.skip(f"reference fixture {path} is not present")
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Two threads: the fixtures were produced with torch.set_num_threads(2).
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(prev)
