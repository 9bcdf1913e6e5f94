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


TEST_THREADS = int(os.environ.get("POLYDIFF_TEST_THREADS", "1"))


def pytest_configure(config):
    # Module- and session-scoped fixtures run outside the per-test fixture below.
    torch.set_num_threads(TEST_THREADS)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # One thread by default: the tests use small tensors, for which a second thread costs more in
    # synchronisation than it gains (about 10x slower on a loaded 2-core machine), and a fixed
    # count keeps reductions in the same order from run to run. The reference fixtures match
    # within their tolerances at 1 or 2 threads; POLYDIFF_TEST_THREADS overrides.
    prev = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(prev)
