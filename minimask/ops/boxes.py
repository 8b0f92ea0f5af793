"""Box geometry and non-maximum suppression, in plain torch ops.

Convention (detectron2's, used everywhere in minimask): a box is a row (x1, y1, x2, y2) of floats in continuous
pixel coordinates, so a box covering pixels 0..9 horizontally spans x1 = 0, x2 = 10 and has width x2 - x1 = 10,
with no "+1". A batch of boxes is an (N, 4) tensor.

`box_iou`, `nms` and `batched_nms` have the signatures and semantics of the torchvision functions of the same
names, so either can stand in for the other. Greedy NMS is sequential by definition (`nms_reference`); `nms` computes
the same kept set as a fixed point of a few large tensor operations (`_greedy_nms`), because a scan over the boxes
launches a small operation and waits for the device per box or tile of boxes (one sync per call here against
~180 per training step of R50-FPN for the blocked scan it replaced; BENCHMARKS.md, "Operation counts").

NaN coordinates are not checked for (that would cost a GPU sync): a box with a NaN coordinate has NaN area and NaN
IoU with everything; NaN compares false, so such a box never suppresses another and is never suppressed in NMS.
NaN scores sort as larger than every number (torch.sort's rule).
"""
import torch
from torch import Tensor

# Box pairs whose IoU the NMS holds at once (a few float temporaries of this size): larger problems are split into
# chunks of whole groups.
_NMS_PAIRS = 2**25


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


def _pairwise_intersection(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Intersection areas without input checks: (..., N, 4), (..., M, 4) -> intersections (..., N, M) and the areas
    (..., N, 1) and (..., 1, M) of the boxes (leading dimensions broadcast), computed in at least fp32."""
    dtype = torch.promote_types(torch.promote_types(boxes1.dtype, boxes2.dtype), torch.float32)
    a = boxes1.to(dtype)[..., :, None, :]  # (..., N, 1, 4)
    b = boxes2.to(dtype)[..., None, :, :]  # (..., 1, M, 4)
    area1 = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])  # (..., N, 1)
    area2 = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # (..., 1, M)
    width = (torch.min(a[..., 2], b[..., 2]) - torch.max(a[..., 0], b[..., 0])).clamp_(min=0)  # (..., N, M)
    height = (torch.min(a[..., 3], b[..., 3]) - torch.max(a[..., 1], b[..., 1])).clamp_(min=0)
    return width.mul_(height), area1, area2


def _pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU without input checks: (..., N, 4), (..., M, 4) -> (..., N, M) (leading dimensions broadcast), computed in
    at least fp32."""
    inter, area1, area2 = _pairwise_intersection(boxes1, boxes2)
    return inter / (area1 + area2 - inter)


def _pairwise_iof(boxes: Tensor, regions: Tensor) -> Tensor:
    """`box_iof` without input checks: (..., N, 4), (..., M, 4) -> (..., N, M) (leading dimensions broadcast)."""
    inter, area, _ = _pairwise_intersection(boxes, regions)
    # A box of zero (or negative) area intersects nothing (inter is exactly 0), so dividing by 1 instead gives 0
    # where 0/0 would give NaN, with no NaN in the backward pass either.
    return inter / torch.where(area > 0, area, 1.0)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Intersection over union of every pair; (N, 4), (M, 4) -> (N, M).

    Two boxes of zero area give 0/0 = NaN, as in torchvision. The result is fp32 for fp16/bf16 inputs.
    """
    check_boxes(boxes1, "boxes1")
    check_boxes(boxes2, "boxes2")
    return _pairwise_iou(boxes1, boxes2)


def box_iof(boxes: Tensor, regions: Tensor) -> Tensor:
    """Intersection over the box's own area ("intersection over foreground") of every pair; (N, 4) boxes, (M, 4)
    regions -> (N, M) area(box n & region m) / area(box n) (mmdetection `bbox_overlaps(..., mode='iof')`,
    mmdet/core/bbox/iou_calculators/iou2d_calculator.py).

    Not symmetric: a box inside a region gives 1 however large the region; a box containing the region gives
    area(region) / area(box). A box of zero area gives 0 (not NaN). The result is fp32 for fp16/bf16 inputs.
    """
    check_boxes(boxes, "boxes")
    check_boxes(regions, "regions")
    return _pairwise_iof(boxes, regions)


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


def nms_reference(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS by its definition, one box at a time (slow; the test oracle of `nms`): visit the boxes by
    decreasing score (ties in input order) and keep a box unless a kept box overlaps it with IoU > iou_threshold."""
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    kept = []
    for i in order:
        if not kept or not (_pairwise_iou(boxes[i:i + 1], boxes[kept]) > iou_threshold).any():
            kept.append(i)
    return torch.tensor(kept, dtype=torch.int64, device=boxes.device)


def _greedy_nms(boxes: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS of G independent groups at once, without a sequential scan: boxes (G, M, 4), each group sorted by
    decreasing score (padding: all-zero boxes, which never suppress anything) -> (G, M) bool, the kept boxes.

    Box i of a group is kept exactly when no kept box j < i of its group overlaps it with IoU > iou_threshold, so the
    kept set is the fixed point of keep = not any_j (suppresses[j, i] and keep[j]). Starting from all boxes, each
    round fixes at least the first box that was still undecided, and in practice a handful of rounds (the longest
    chain of boxes suppressing each other) settle everything: a few large tensor operations per round and one host
    sync every two rounds, instead of a scan over the boxes.
    """
    # suppresses[g, j, i] = 1 when box j of group g would remove box i (j < i); as float, so that a round is one
    # batched matrix product: the number of kept boxes that remove each box, exact in float32 for M < 2^24.
    suppresses = (_pairwise_iou(boxes, boxes) > iou_threshold).triu_(diagonal=1).float()  # (G, M, M)
    keep = torch.ones(boxes.shape[0], 1, boxes.shape[1], device=boxes.device)  # (G, 1, M)
    while True:
        once = (torch.bmm(keep, suppresses) == 0).float()  # (G, 1, M): removed by no kept box
        twice = (torch.bmm(once, suppresses) == 0).float()
        if torch.equal(once, twice):  # the fixed point
            return once[:, 0].bool()
        keep = twice


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
    """`batched_nms` (every box one group when `groups` is None): the groups are laid out side by side, each padded
    to the largest, and suppressed all at once by `_greedy_nms` (in chunks of whole groups for large problems)."""
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices  # (N,)
    if groups is not None:  # group-major, by decreasing score within each group
        order = order[torch.sort(groups[order], stable=True).indices]
        sorted_groups = groups[order]
        first = torch.cat([sorted_groups.new_ones(1, dtype=torch.bool), sorted_groups[1:] != sorted_groups[:-1]])
    else:
        first = torch.zeros(n, dtype=torch.bool, device=boxes.device)
        first[0] = True
    position = torch.arange(n, device=boxes.device)
    group = first.cumsum(0) - 1  # (N,) 0..G-1
    slot = position - torch.cummax(torch.where(first, position, 0), dim=0).values  # (N,) rank within the group
    num_groups, size = (int(v) for v in torch.stack([group[-1] + 1, slot.max() + 1]).tolist())  # the one sync
    padded = boxes.new_zeros(num_groups, size, 4)  # (G, M, 4); zero boxes never overlap anything
    padded[group, slot] = boxes[order]
    per_chunk = max(1, _NMS_PAIRS // (size * size))
    keep = torch.cat([_greedy_nms(chunk, iou_threshold) for chunk in padded.split(per_chunk)])  # (G, M)
    kept = order[keep[group, slot]]  # (K,)
    if groups is not None:  # back to decreasing score over all groups, ties in input order
        kept = kept.sort().values
        kept = kept[torch.sort(scores[kept], descending=True, stable=True).indices]
    return kept
