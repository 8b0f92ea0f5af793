"""Anchors: hand-worked positions, (H, W, A) order, counts per level, offset, and the cache."""
import math

import pytest
import torch

from minimask.model.anchors import cell_anchors, grid_anchors, level_anchors, multilevel_anchors

A = 16 * math.sqrt(2.0)  # half the long side of a size-32 anchor with ratio 0.5 or 2: sqrt(32^2 * 2) / 2
B = 8 * math.sqrt(2.0)  # half its short side: sqrt(32^2 / 2) / 2


def test_cell_anchors_hand_computed():
    cell = cell_anchors(32, (0.5, 1.0, 2.0))
    expected = torch.tensor([
        [-A, -B, A, B],  # r = h / w = 0.5: wide
        [-16.0, -16.0, 16.0, 16.0],
        [-B, -A, B, A],  # r = 2: tall
    ])
    assert cell.dtype == torch.float32
    torch.testing.assert_close(cell, expected)
    w, h = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]
    torch.testing.assert_close(w * h, torch.full((3,), 1024.0))  # area s^2 for every ratio, not rounded
    torch.testing.assert_close(h / w, torch.tensor([0.5, 1.0, 2.0]))


def test_grid_anchors_2x2_stride4_exact_and_hwa_order():
    anchors = grid_anchors(cell_anchors(32, (0.5, 1.0, 2.0)), (2, 2), stride=4)
    assert anchors.shape == (2 * 2 * 3, 4)
    rows = []
    for cy in (0.0, 4.0):  # H outermost
        for cx in (0.0, 4.0):  # then W
            rows += [[cx - A, cy - B, cx + A, cy + B], [cx - 16, cy - 16, cx + 16, cy + 16],
                     [cx - B, cy - A, cx + B, cy + A]]  # then A
    torch.testing.assert_close(anchors, torch.tensor(rows))


def test_hwa_order_non_square_map():
    h, w, stride = 3, 5, 8
    cell = cell_anchors(64, (0.5, 1.0, 2.0))
    anchors = grid_anchors(cell, (h, w), stride).view(h, w, 3, 4)
    centres = (anchors[..., :2] + anchors[..., 2:]) / 2  # (H, W, A, 2)
    for i in range(h):
        for j in range(w):
            for a in range(3):
                torch.testing.assert_close(centres[i, j, a], torch.tensor([j * stride, i * stride], dtype=torch.float32))
                shift = torch.tensor([j, i, j, i], dtype=torch.float32) * stride
                torch.testing.assert_close(anchors[i, j, a], cell[a] + shift)


def test_offset_half_shifts_centres_by_half_stride():
    cell = cell_anchors(32, (1.0,))
    a0 = grid_anchors(cell, (3, 4), stride=16, offset=0.0)
    a5 = grid_anchors(cell, (3, 4), stride=16, offset=0.5)
    torch.testing.assert_close(a5 - a0, torch.full_like(a0, 8.0))


def test_counts_per_level():
    hws = [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    levels = multilevel_anchors((32, 64, 128, 256, 512), (0.5, 1.0, 2.0), hws, (4, 8, 16, 32, 64))
    assert [x.shape for x in levels] == [(h * w * 3, 4) for h, w in hws]
    for size, x in zip((32, 64, 128, 256, 512), levels):  # each level has its own size
        torch.testing.assert_close(x[1, 2] - x[1, 0], torch.tensor(float(size)))
    assert grid_anchors(cell_anchors(32, (1.0,)), (0, 5), 4).shape == (0, 4)


def test_cached_level_anchors_equal_uncached_and_reused():
    args = (64, (0.5, 1.0, 2.0), (5, 7), 8, 0.5)
    first = level_anchors(*args)
    second = level_anchors(64.0, [0.5, 1, 2], (5, 7), 8.0, 0.5)  # same values spelled differently hit the cache
    assert second is first
    direct = grid_anchors(cell_anchors(64, (0.5, 1.0, 2.0)), (5, 7), 8, 0.5)
    torch.testing.assert_close(first, direct)
    other = level_anchors(64, (0.5, 1.0, 2.0), (5, 8), 8, 0.5)
    assert other.shape == (5 * 8 * 3, 4)
    assert level_anchors(*args, dtype=torch.float64).dtype == torch.float64


def test_bad_arguments():
    with pytest.raises(ValueError, match="aspect_ratios"):
        cell_anchors(32, ())
    with pytest.raises(ValueError, match="size"):
        cell_anchors(0, (1.0,))
    with pytest.raises(ValueError, match="one anchor size and stride per feature level"):
        multilevel_anchors((32, 64), (1.0,), [(2, 2)], (4, 8))
    with pytest.raises(ValueError, match=r"\(A, 4\)"):
        grid_anchors(torch.zeros(3), (2, 2), 4)
