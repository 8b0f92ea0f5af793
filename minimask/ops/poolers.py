"""Multi-level RoI pooling for FPN (Lin et al. 2017, "Feature Pyramid Networks", Sec. 4.2, Eqn. 1).

Each RoI is pooled from one pyramid level, chosen by its size: k = floor(k0 + log2(sqrt(w*h) / 224)) with k0 = 4,
clamped to the available levels (detectron2 `assign_boxes_to_levels`, which adds 1e-8 inside the log so that a box of
exactly 224 * 2^j lands on level k0 + j). Stateless functions; the pooling itself is RoIAlign (`roi_align`), run for
all levels at once because a call per level costs a hundred small operations and a few host syncs each.
"""
import math

import torch
from torch import Tensor

from minimask.ops.roi_align import roi_align
from minimask.ops.roi_align_sparse import roi_align_sparse


def assign_boxes_to_levels(boxes: Tensor, min_level: int, max_level: int, canonical_size: float = 224,
                           canonical_level: int = 4) -> Tensor:
    """FPN level of each box as an index into the level list (0 = min_level).

    Args:
        boxes: (R, 4) x1 y1 x2 y2 in input-image pixels.
        min_level, max_level: the pyramid levels available (e.g. 2 and 5 for P2-P5).
        canonical_size, canonical_level: a box of side `canonical_size` maps to `canonical_level` (Eqn. 1 of FPN).

    Returns:
        (R,) int64 in [0, max_level - min_level]. Boxes of zero or negative area and boxes with NaN coordinates
        go to min_level.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"assign_boxes_to_levels: boxes must be (R, 4), got {tuple(boxes.shape)}")
    if min_level > max_level:
        raise ValueError(f"assign_boxes_to_levels: min_level {min_level} > max_level {max_level}")
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0)  # (R,)
    levels = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_size + 1e-8))  # Eqn. 1 of FPN
    levels = torch.nan_to_num(levels, nan=float(min_level)).clamp(min=min_level, max=max_level)
    return levels.to(torch.int64) - min_level


def multiscale_roi_align(features: list, boxes: list, output_size, scales: list, sampling_ratio: int = 0,
                         aligned: bool = True) -> Tensor:
    """Pool every box from the FPN level that Eqn. 1 assigns to it.

    Args:
        features: L maps (B, C, H_l, W_l), finest first (e.g. P2..P5), all with the same B, C, dtype and device.
        boxes: B tensors (L_i, 4) x1 y1 x2 y2 in input-image pixels, one per image.
        output_size: int or (oh, ow).
        scales: L spatial scales (1 / stride) of the maps, e.g. [1/4, 1/8, 1/16, 1/32]; they must be powers of 2
            of consecutive levels: level = round(-log2(scale)).
        sampling_ratio, aligned: passed to `roi_align` (detectron2 defaults: 0 = adaptive, ROIAlignV2).

    Returns:
        (sum L_i, C, oh, ow) in the order of the concatenated boxes, dtype of the features; zero rows if there are
        no boxes. All levels are pooled by one `roi_align_sparse` call.
    """
    if not isinstance(features, (list, tuple)) or len(features) == 0:
        raise ValueError("multiscale_roi_align: features must be a non-empty list of (B, C, H, W) maps")
    if len(scales) != len(features):
        raise ValueError(f"multiscale_roi_align: {len(features)} feature maps but {len(scales)} scales")
    for i, f in enumerate(features):
        if f.dim() != 4 or f.shape[:2] != features[0].shape[:2]:
            raise ValueError(f"multiscale_roi_align: features[{i}] has shape {tuple(f.shape)}, expected "
                             f"(B, C, H, W) with (B, C) = {tuple(features[0].shape[:2])}")
    batch, channels = features[0].shape[:2]
    if not isinstance(boxes, (list, tuple)) or len(boxes) != batch:
        raise ValueError(f"multiscale_roi_align: boxes must be a list of {batch} (L_i, 4) tensors (one per image)")
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"multiscale_roi_align: boxes[{i}] must be (L, 4), got "
                             f"{tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__}")
    levels = [-math.log2(s) for s in scales]
    if any(abs(lv - round(lv)) > 1e-6 for lv in levels) or \
            [round(lv) for lv in levels] != list(range(round(levels[0]), round(levels[0]) + len(levels))):
        raise ValueError(f"multiscale_roi_align: scales must be 2^-k for consecutive k, finest first; got {scales}")
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)

    device = features[0].device
    all_boxes = torch.cat([b.to(device) for b in boxes]) if batch else torch.zeros((0, 4), device=device)  # (R, 4)
    image_ids = torch.cat([torch.full((len(b),), i, dtype=all_boxes.dtype, device=device)
                           for i, b in enumerate(boxes)]) if batch else all_boxes.new_zeros((0,))  # (R,)
    rois = torch.cat([image_ids[:, None], all_boxes], dim=1)  # (R, 5)
    level_of = assign_boxes_to_levels(all_boxes, round(levels[0]), round(levels[-1]))  # (R,)
    # RoIAlign of each box on its level's map: every level at once, as one sparse product over all the maps' pixels
    # (`multiscale_roi_align_reference` is the same, one level at a time).
    return roi_align_sparse(list(features), rois, level_of, scales, (oh, ow), sampling_ratio, aligned)


def multiscale_roi_align_reference(features: list, boxes: list, output_size, scales: list, sampling_ratio: int = 0,
                                   aligned: bool = True) -> Tensor:
    """`multiscale_roi_align` as its definition reads: each level's boxes pooled from that level with `roi_align`
    and put back in order (the test oracle of the one-call form)."""
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    levels = [round(-math.log2(s)) for s in scales]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(boxes)])
    level_of = assign_boxes_to_levels(rois[:, 1:], levels[0], levels[-1])  # (R,)
    output = features[0].new_zeros((len(rois), features[0].shape[1], oh, ow))  # (R, C, oh, ow)
    for level, (feature, scale) in enumerate(zip(features, scales)):
        ids = torch.nonzero(level_of == level).squeeze(1)  # (R_l,)
        if len(ids):
            output.index_copy_(0, ids, roi_align(feature, rois[ids], (oh, ow), scale, sampling_ratio, aligned))
    return output
