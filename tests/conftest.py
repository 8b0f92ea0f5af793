"""Shared pytest set-up: the `slow` marker and deterministic, single-threaded-friendly defaults."""
import os
import sys

import pytest
import torch

# Make the repository importable for plain `pytest` as well as `python -m pytest`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds; deselect with -m 'not slow'")


@pytest.fixture(autouse=True)
def _seed():
    # Every test starts from the same RNG state, so results do not depend on test order.
    torch.manual_seed(0)
