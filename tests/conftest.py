"""Shared pytest set-up: the `slow` marker and deterministic, single-threaded-friendly defaults."""
import os
import sys

import pytest
import torch

# Make the repository importable for plain `pytest` as well as `python -m pytest`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds; deselect with -m 'not slow'")
    # pycocotools' own mask.decode trips a numpy 2 DeprecationWarning inside the library; nothing of ours.
    config.addinivalue_line("filterwarnings", "ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(autouse=True)
def _seed():
    # Every test starts from the same RNG state, so results do not depend on test order.
    torch.manual_seed(0)


def shared_data_dir():
    """The real datasets beside the project (../shared/data), or $MINIMASK_SHARED_DATA; None where absent."""
    from pathlib import Path

    env = os.environ.get("MINIMASK_SHARED_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture
def coco_mini():
    """Path of ../shared/data/coco-mini; the test is skipped where it is absent."""
    root = shared_data_dir()
    if root is None or not (root / "coco-mini" / "annotations").is_dir():
        pytest.skip("../shared/data/coco-mini is not available")
    return root / "coco-mini"


@pytest.fixture
def penn_fudan():
    """Path of ../shared/data/PennFudanPed; the test is skipped where it is absent."""
    root = shared_data_dir()
    if root is None or not (root / "PennFudanPed" / "PNGImages").is_dir():
        pytest.skip("../shared/data/PennFudanPed is not available")
    return root / "PennFudanPed"
