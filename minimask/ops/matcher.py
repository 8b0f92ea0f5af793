"""Matching predictions to ground truth, and balanced sampling of what was matched.

Both the RPN (anchors vs GT, Sec. 3.1.2 of Faster R-CNN) and the RoI heads (proposals vs GT, Sec. 3 of Mask R-CNN)
label each prediction foreground, background or ignored by its best IoU with any ground-truth box, then train on a
random subset with a bounded share of foreground. Optionally, predictions inside regions marked to be ignored
(crowds in pedestrian datasets) are kept out of the background (`inside_ignore_regions`).
"""
import torch
from torch import Tensor


def match_boxes(iou: Tensor, high: float, low: float, allow_low_quality: bool,
                gt_valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Label each prediction by its best IoU with the ground truth (for one image, or a batch of them at once).

    Args:
        iou: (..., G, N) IoU between G ground-truth boxes and N predictions.
        high, low: thresholds with low <= high. A prediction whose best IoU is >= high is foreground (1), < low is
            background (0), in [low, high) is ignored (-1). For example with the RPN's (0.7, 0.3): IoU 0.8 -> 1,
            0.5 -> -1, 0.1 -> 0. With low == high (the RoI heads' 0.5) nothing is ignored.
        allow_low_quality: also make foreground every prediction that attains some ground-truth box's highest IoU
            (all of them when several tie), so that every GT box gets at least one positive even when no anchor
            reaches `high` (Sec. 3.1.2 of Faster R-CNN). A GT box that overlaps nothing (best IoU 0) gets none: unlike
            a literal reading, IoU 0 never makes a prediction foreground.
        gt_valid: (..., G) bool, False for padding rows (images of a batch with fewer GT boxes): they match nothing.

    Returns:
        matched_idx: (..., N) int64, the index of the ground-truth box with the highest IoU (the first on ties);
            only meaningful where labels == 1.
        labels: (..., N) int8 in {1, 0, -1}.
        With no (valid) ground truth, every prediction is background and matched_idx is all zeros. No host sync.
    """
    if iou.dim() < 2:
        raise ValueError(f"iou must have shape (..., G, N), got {tuple(iou.shape)}")
    if low > high:
        raise ValueError(f"low threshold {low} is above high threshold {high}")
    if gt_valid is not None:
        iou = torch.where(gt_valid[..., None], iou, -1.0)  # padding: below every threshold, and never a best match
    if iou.shape[-2] == 0:
        zeros = torch.zeros(iou.shape[:-2] + iou.shape[-1:], dtype=torch.int64, device=iou.device)
        return zeros, zeros.to(torch.int8)
    best_iou, matched_idx = iou.max(dim=-2)  # (..., N), (..., N)
    labels = torch.where(best_iou >= high, 1, torch.where(best_iou < low, 0, -1)).to(torch.int8)  # (..., N)
    if allow_low_quality and iou.shape[-1] > 0:
        best_per_gt = iou.max(dim=-1, keepdim=True).values  # (..., G, 1)
        attains_best = (iou == best_per_gt) & (best_per_gt > 0)  # (..., G, N)
        labels = torch.where(attains_best.any(dim=-2), 1, labels).to(torch.int8)
    return matched_idx, labels


def inside_ignore_regions(iof: Tensor, iof_thr: float, region_valid: Tensor | None = None) -> Tensor:
    """Which predictions lie in an ignore region (a crowd, an uncertain person): their intersection over their own
    area (IoF, `minimask.ops.boxes.box_iof`) with some region exceeds iof_thr (for one image, or a batch at once).

    mmdetection's rule (`MaxIoUAssigner(ignore_iof_thr=..., ignore_wrt_candidates=True)`,
    mmdet/core/bbox/assigners/max_iou_assigner.py): strictly greater, so with iof_thr = 0.5 a box exactly half
    inside a region is not in it. mmdetection also keeps such predictions out of the positives (it sets their IoU
    with every GT box to -1 before matching); minimask's callers (`label_anchors`, `sample_proposals`) only take
    them out of the negatives, so that a box matching a labelled person next to a crowd keeps its positive label.

    Args:
        iof: (..., N, I) IoF of N predictions with I ignore regions; I may be 0 (then nothing is inside).
        iof_thr: the threshold, usually in [0, 1).
        region_valid: (..., I) bool, False for padding rows (images of a batch with fewer regions).

    Returns:
        (..., N) bool. No host sync.
    """
    if iof.dim() < 2:
        raise ValueError(f"iof must have shape (..., N, I), got {tuple(iof.shape)}")
    inside = iof > iof_thr  # (..., N, I)
    if region_valid is not None:
        inside &= region_valid[..., None, :]
    return inside.any(dim=-1)


def sample_balanced(positive: Tensor, negative: Tensor, num_samples: int,
                    positive_fraction: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Draw at most `num_samples` predictions, at most `positive_fraction` of them positive (for one image, or for
    each image of a batch at once, without a host sync).

    Positives are drawn first (up to num_samples * positive_fraction); negatives fill the rest. Each subset is a
    uniformly random choice without replacement: every prediction gets a random key from torch's global RNG (on
    the masks' device), and the positives (negatives) with the highest keys are drawn.

    Args:
        positive, negative: (..., N) bool masks (disjoint; predictions in neither are ignored).

    Returns:
        positive_idx (..., P), positive_taken (..., P), negative_idx (..., Q), negative_taken (..., Q): the candidates
        in decreasing key order (a random order), P = min(N, num_samples * positive_fraction) and
        Q = min(N, num_samples) of them; the drawn ones are those marked taken, which come first.
    """
    if positive.shape != negative.shape or positive.dim() < 1:
        raise ValueError(f"positive and negative must be (..., N) masks, got {tuple(positive.shape)}, "
                         f"{tuple(negative.shape)}")
    n = positive.shape[-1]
    keys = torch.rand(positive.shape, device=positive.device)  # (..., N) in [0, 1)
    pos_keys, pos_idx = torch.where(positive, keys, -1.0).topk(min(n, int(num_samples * positive_fraction)), dim=-1)
    pos_taken = pos_keys >= 0  # (..., P)
    room = num_samples - pos_taken.sum(dim=-1, keepdim=True)  # (..., 1) negatives fill the rest
    neg_keys, neg_idx = torch.where(negative, keys, -1.0).topk(min(n, num_samples), dim=-1)
    neg_taken = (neg_keys >= 0) & (torch.arange(neg_keys.shape[-1], device=keys.device) < room)  # (..., Q)
    return pos_idx, pos_taken, neg_idx, neg_taken
