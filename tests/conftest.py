"""Shared pytest set-up: the `slow` marker and deterministic, single-threaded-friendly defaults."""
import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds; deselect with -m 'not slow'")


@pytest.fixture(autouse=True)
def _seed():
    # Every test starts from the same RNG state, so results do not depend on test order.
    torch.manual_seed(0)
