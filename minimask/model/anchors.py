"""Anchor generation for the Region Proposal Network (Sec. 3.1 of Faster R-CNN; one anchor size per pyramid level,
Sec. 4.1 of FPN), following detectron2's `DefaultAnchorGenerator` (`modeling/anchor_generator.py`).

An anchor of size s and aspect ratio r = h / w has area s^2: w = sqrt(s^2 / r), h = r * w. The A = len(ratios)
"cell" anchors of a level are centred at (0, 0) and are NOT rounded to integers (detectron2 convention; torchvision
and Detectron rounded them: `round_to_int=True`). They are then replicated over the feature map: the anchors of cell
(i, j) (row i, column j) are centred at ((j + offset) * stride, (i + offset) * stride), with offset 0.0 in
detectron2.

Ordering contract (shared with the RPN head's flattened outputs): a level's anchors are listed in (H, W, A) order,
i.e. anchor a of cell (i, j) is row (i * W + j) * A + a.

All functions are stateless. `level_anchors` memoises its result in a small bounded cache because the same feature
map sizes recur every iteration; the cache is purely an optimisation (same values with or without it), and the
tensors it returns are shared between callers, so they must not be modified in place.
"""
import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

# Distinct (level, feature size, device, dtype) combinations kept: 5 levels x a few dozen padded image shapes.
_CACHE_SIZE = 256


def cell_anchors(size: float, aspect_ratios: Sequence[float], round_to_int: bool = False) -> Tensor:
    """The A anchors of one feature-map cell, centred at (0, 0); -> (A, 4) float32 xyxy, one row per ratio in order.

    Args:
        size: sqrt of the anchor area in pixels (> 0).
        aspect_ratios: A ratios h / w (each > 0).
        round_to_int: round each corner to the nearest integer (torchvision `AnchorGenerator.generate_anchors`;
            detectron2 does not round). Needed to reproduce torchvision checkpoints' proposals.
    """
    if size <= 0:
        raise ValueError(f"anchor size must be positive, got {size}")
    if len(aspect_ratios) == 0 or any(r <= 0 for r in aspect_ratios):
        raise ValueError(f"aspect_ratios must be a non-empty list of positive numbers, got {aspect_ratios}")
    rows = []
    for ratio in aspect_ratios:
        w = math.sqrt(size * size / ratio)  # area s^2 is kept for every ratio
        h = ratio * w
        rows.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    cell = torch.tensor(rows, dtype=torch.float32)  # (A, 4)
    return cell.round() if round_to_int else cell


def grid_anchors(cell: Tensor, feature_hw: tuple[int, int], stride, offset: float = 0.0) -> Tensor:
    """Replicate the cell anchors over an H x W feature map; cell (A, 4) -> (H * W * A, 4) in (H, W, A) order.

    `stride` is one number, or a pair (stride_y, stride_x) (torchvision derives a stride per axis from the padded
    image size, see `minimask.interop.torchvision_conventions.TorchvisionRPN`). Computed in float64 and returned in cell's
    dtype on cell's device. H or W = 0 gives a (0, 4) tensor.
    """
    if cell.dim() != 2 or cell.shape[1] != 4:
        raise ValueError(f"cell anchors must have shape (A, 4), got {tuple(cell.shape)}")
    h, w = feature_hw
    if h < 0 or w < 0:
        raise ValueError(f"feature_hw must be non-negative, got {feature_hw}")
    stride_y, stride_x = stride if isinstance(stride, (tuple, list)) else (stride, stride)
    shifts_x = (torch.arange(w, dtype=torch.float64, device=cell.device) + offset) * stride_x  # (W,)
    shifts_y = (torch.arange(h, dtype=torch.float64, device=cell.device) + offset) * stride_y  # (H,)
    ys, xs = torch.meshgrid(shifts_y, shifts_x, indexing="ij")  # each (H, W): row-major, so cells in (H, W) order
    shifts = torch.stack((xs, ys, xs, ys), dim=-1).reshape(-1, 1, 4)  # (H * W, 1, 4)
    anchors = shifts + cell.to(torch.float64)[None]  # (H * W, A, 4)
    return anchors.reshape(-1, 4).to(cell.dtype)  # (H * W * A, 4)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _cached_level_anchors(
    size: float,
    aspect_ratios: tuple[float, ...],
    feature_hw: tuple[int, int],
    stride,
    offset: float,
    device: torch.device,
    dtype: torch.dtype,
    round_to_int: bool = False,
) -> Tensor:
    cell = cell_anchors(size, aspect_ratios, round_to_int).to(device=device, dtype=torch.float64)
    return grid_anchors(cell, feature_hw, stride, offset).to(dtype)


def level_anchors(
    size: float,
    aspect_ratios: Sequence[float],
    feature_hw: tuple[int, int],
    stride,
    offset: float = 0.0,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    round_to_int: bool = False,
) -> Tensor:
    """All anchors of one pyramid level, (H * W * A, 4) in (H, W, A) order, from a bounded cache.

    Equal to grid_anchors(cell_anchors(size, aspect_ratios, round_to_int), feature_hw, stride, offset) (up to float
    rounding, as the cached version works in float64 throughout). `stride` is a number or a (stride_y, stride_x)
    pair. The returned tensor is shared: do not modify it in place.
    """
    key_hw = (int(feature_hw[0]), int(feature_hw[1]))
    key_stride = tuple(float(x) for x in stride) if isinstance(stride, (tuple, list)) else float(stride)
    return _cached_level_anchors(
        float(size), tuple(float(r) for r in aspect_ratios), key_hw, key_stride, float(offset),
        torch.device(device), dtype, bool(round_to_int),
    )


def multilevel_anchors(
    sizes: Sequence[float],
    aspect_ratios: Sequence[float],
    feature_hws: Sequence[tuple[int, int]],
    strides: Sequence,
    offset: float = 0.0,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    round_to_int: bool = False,
) -> list[Tensor]:
    """Anchors of every level (one size and stride per level, finest first): a list of (H_l * W_l * A, 4).

    Each stride is a number or a (stride_y, stride_x) pair; round_to_int as in `cell_anchors`.
    """
    if not (len(sizes) == len(feature_hws) == len(strides)):
        raise ValueError(
            f"need one anchor size and stride per feature level: {len(sizes)} sizes, {len(strides)} strides, "
            f"{len(feature_hws)} levels"
        )
    return [
        level_anchors(s, aspect_ratios, hw, st, offset, device=device, dtype=dtype, round_to_int=round_to_int)
        for s, hw, st in zip(sizes, feature_hws, strides)
    ]
