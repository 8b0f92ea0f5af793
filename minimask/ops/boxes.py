"""Box geometry and non-maximum suppression, in plain torch ops.

Convention (detectron2's, used everywhere in minimask): a box is a row (x1, y1, x2, y2) of floats in continuous
pixel coordinates, so a box covering pixels 0..9 horizontally spans x1 = 0, x2 = 10 and has width x2 - x1 = 10,
with no "+1". A batch of boxes is an (N, 4) tensor.

`box_iou`, `nms` and `batched_nms` have the signatures and semantics of the torchvision functions of the same
names, so either can stand in for the other.

NaN coordinates are not checked for (that would cost a GPU sync): a box with a NaN coordinate has NaN area and NaN
IoU with everything; NaN compares false, so such a box never suppresses another and is never suppressed in NMS.
NaN scores sort as larger than every number (torch.sort's rule).
"""
import torch
from torch import Tensor

# Boxes resolved per step of the blocked NMS: large enough to amortise the per-tile overhead, small enough that
# the sequential scan over a (T, T) matrix stays cheap.
_NMS_TILE = 256


def check_boxes(boxes: Tensor, name: str = "boxes") -> None:
    """ValueError naming `name` unless boxes is an (N, 4) tensor."""
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4), got {tuple(boxes.shape)}")


def box_area(boxes: Tensor) -> Tensor:
    """Area of each box; (N, 4) -> (N,). Boxes with x2 < x1 or y2 < y1 get a negative area; callers drop them."""
    check_boxes(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU without input checks: (N, 4), (M, 4) -> (N, M), computed in at least fp32."""
    dtype = torch.promote_types(boxes1.dtype, torch.float32)
    boxes1, boxes2 = boxes1.to(dtype), boxes2.to(dtype)
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])  # (N,)
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])  # (M,)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, M, 2)
    wh = (bottom_right - top_left).clamp(min=0)  # (N, M, 2)
    inter = wh[..., 0] * wh[..., 1]  # (N, M)
    return inter / (area1[:, None] + area2[None, :] - inter)  # (N, M)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Intersection over union of every pair; (N, 4), (M, 4) -> (N, M).

    Two boxes of zero area give 0/0 = NaN, as in torchvision. The result is fp32 for fp16/bf16 inputs.
    """
    check_boxes(boxes1, "boxes1")
    check_boxes(boxes2, "boxes2")
    return _pairwise_iou(boxes1, boxes2)


def clip_boxes_to_image(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clamp x to [0, w] and y to [0, h]; boxes (..., 4), size = (h, w). Returns a new tensor."""
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (..., 4), got {tuple(boxes.shape)}")
    h, w = size
    x = boxes[..., 0::2].clamp(min=0, max=w)
    y = boxes[..., 1::2].clamp(min=0, max=h)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of the boxes whose width and height are both >= min_size (torchvision semantics); (N,) int64."""
    check_boxes(boxes)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return torch.where((widths >= min_size) & (heights >= min_size))[0]


def _check_nms_args(boxes: Tensor, scores: Tensor) -> None:
    check_boxes(boxes)
    if scores.dim() != 1:
        raise ValueError(f"scores must have shape (N,), got {tuple(scores.shape)}")
    if scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"boxes and scores differ in length: {boxes.shape[0]} boxes, {scores.shape[0]} scores")


def _greedy_nms(boxes: Tensor, iou_threshold: float, groups: Tensor | None) -> Tensor:
    """Greedy NMS over boxes already sorted by decreasing score (and, with `groups`, grouped: each group's boxes
    contiguous, by decreasing score within it); returns a (N,) bool mask of the kept boxes.

    Box i is kept unless a kept box j < i of the same group overlaps it with IoU > iou_threshold. Blocked
    algorithm: boxes are visited a tile at a time; a tile is first tested against the boxes kept so far that can
    suppress it (one (T, K) IoU matrix on the boxes' device; with groups, only the kept boxes of the tile's first
    group, since every later group of the tile starts inside it), and only then resolved internally by the
    inherently sequential greedy scan, which runs on the CPU over a small (T, T) "suppresses" matrix. IoU is
    computed only against kept boxes, O(N * (K + T)) instead of O(N^2), and the device is synced once per tile.
    """
    n = boxes.shape[0]
    keep = torch.zeros(n, dtype=torch.bool)
    kept = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    if groups is not None:  # first index of each box's group (one transfer; groups are sorted)
        group_ids = groups.cpu()
        group_first = torch.searchsorted(group_ids, group_ids).tolist()
    for start in range(0, n, _NMS_TILE):
        stop = min(start + _NMS_TILE, n)
        tile = boxes[start:stop]  # (T, 4)
        window = 0 if groups is None else group_first[start]  # earlier boxes that may share a group with the tile
        earlier = boxes[window:start][kept[window:start]]  # (K, 4)
        # Removed by an earlier kept box?
        hits = _pairwise_iou(tile, earlier) > iou_threshold  # (T, K)
        if groups is not None:
            hits &= groups[start:stop, None] == groups[window:start][kept[window:start]][None, :]
        alive = (~hits.any(dim=1)).cpu().numpy()  # (T,)
        # suppresses[i, j]: tile box i removes tile box j if i is kept. Only j > i counts (a box never removes itself
        # or a higher-scoring box), hence the strict upper triangle.
        suppresses = _pairwise_iou(tile, tile) > iou_threshold  # (T, T)
        if groups is not None:
            suppresses &= groups[start:stop, None] == groups[None, start:stop]
        suppresses = suppresses.triu_(diagonal=1).cpu().numpy()
        for i in range(stop - start):
            if alive[i]:
                alive &= ~suppresses[i]
        keep[start:stop] = torch.from_numpy(alive)
        kept[start:stop] = keep[start:stop].to(kept.device)
    return keep


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Non-maximum suppression (torchvision.ops.nms semantics).

    Args:
        boxes: (N, 4) xyxy.
        scores: (N,).
        iou_threshold: a box is discarded when its IoU with a higher-scoring kept box is > iou_threshold.

    Returns:
        (K,) int64 indices of the kept boxes, sorted by decreasing score. Equal scores keep their input order
        (a stable sort, as torchvision's CPU kernel), so the kept set is well defined even with ties.
    """
    _check_nms_args(boxes, scores)
    return _nms(boxes, scores, iou_threshold, None)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS run independently within each group of `idxs` (e.g. per class or per FPN level).

    Same contract as `nms`, plus idxs (N,) int64 group ids; boxes of different groups never suppress each other.
    Returns the kept indices of all groups together, sorted by decreasing score.
    """
    _check_nms_args(boxes, scores)
    if idxs.dim() != 1 or idxs.shape[0] != boxes.shape[0]:
        raise ValueError(f"idxs must have shape ({boxes.shape[0]},) like scores, got {tuple(idxs.shape)}")
    return _nms(boxes, scores, iou_threshold, idxs)


def _nms(boxes: Tensor, scores: Tensor, iou_threshold: float, groups: Tensor | None) -> Tensor:
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices  # (N,)
    if groups is None:
        return order[_greedy_nms(boxes[order], iou_threshold, None).to(order.device)]
    # Group-major order (by decreasing score within a group), so that a box meets only its own group's kept boxes;
    # then back to decreasing score over all groups, ties in input order.
    order = order[torch.sort(groups[order], stable=True).indices]  # (N,)
    keep = order[_greedy_nms(boxes[order], iou_threshold, groups[order]).to(order.device)]  # (K,)
    keep = keep.sort().values
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]
