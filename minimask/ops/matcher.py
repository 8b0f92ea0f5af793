"""Matching predictions to ground truth, and balanced sampling of what was matched.

Both the RPN (anchors vs GT, Sec. 3.1.2 of Faster R-CNN) and the RoI heads (proposals vs GT, Sec. 3 of Mask R-CNN)
label each prediction foreground, background or ignored by its best IoU with any ground-truth box, then train on a
random subset with a bounded share of foreground.
"""
import torch
from torch import Tensor


def match_boxes(iou: Tensor, high: float, low: float, allow_low_quality: bool) -> tuple[Tensor, Tensor]:
    """Label each prediction by its best IoU with the ground truth.

    Args:
        iou: (G, N) IoU between G ground-truth boxes and N predictions.
        high, low: thresholds with low <= high. A prediction whose best IoU is >= high is foreground (1), < low is
            background (0), in [low, high) is ignored (-1). For example with the RPN's (0.7, 0.3): IoU 0.8 -> 1,
            0.5 -> -1, 0.1 -> 0. With low == high (the RoI heads' 0.5) nothing is ignored.
        allow_low_quality: also make foreground every prediction that attains some ground-truth box's highest IoU
            (all of them when several tie), so that every GT box gets at least one positive even when no anchor
            reaches `high` (Sec. 3.1.2 of Faster R-CNN). A GT box that overlaps nothing (best IoU 0) gets none: unlike
            a literal reading, IoU 0 never makes a prediction foreground.

    Returns:
        matched_idx: (N,) int64, the index of the ground-truth box with the highest IoU (the first on ties); only
            meaningful where labels == 1.
        labels: (N,) int8 in {1, 0, -1}.
        With G == 0, every prediction is background and matched_idx is all zeros.
    """
    if iou.dim() != 2:
        raise ValueError(f"iou must have shape (G, N), got {tuple(iou.shape)}")
    if low > high:
        raise ValueError(f"low threshold {low} is above high threshold {high}")
    num_gt, n = iou.shape
    if num_gt == 0:
        zeros = torch.zeros(n, dtype=torch.int64, device=iou.device)
        return zeros, zeros.to(torch.int8)
    best_iou, matched_idx = iou.max(dim=0)  # (N,), (N,)
    labels = torch.full((n,), -1, dtype=torch.int8, device=iou.device)
    labels[best_iou < low] = 0
    labels[best_iou >= high] = 1
    if allow_low_quality and n > 0:
        best_per_gt = iou.max(dim=1, keepdim=True).values  # (G, 1)
        attains_best = (iou == best_per_gt) & (best_per_gt > 0)  # (G, N)
        labels[attains_best.any(dim=0)] = 1
    return matched_idx, labels


def sample_balanced(
    positive: Tensor, negative: Tensor, num_samples: int, positive_fraction: float
) -> tuple[Tensor, Tensor]:
    """Draw at most `num_samples` predictions, at most `positive_fraction` of them positive.

    Positives are drawn first (up to num_samples * positive_fraction); negatives fill the rest. Each subset is a
    uniformly random choice without replacement, drawn from torch's global RNG on the masks' device.

    Args:
        positive, negative: (N,) bool masks (disjoint; predictions in neither are ignored).

    Returns:
        (pos_idx, neg_idx): int64 indices into the N predictions.
    """
    if positive.shape != negative.shape or positive.dim() != 1:
        raise ValueError(f"positive and negative must be (N,) masks, got {tuple(positive.shape)}, {tuple(negative.shape)}")
    pos = torch.where(positive)[0]
    neg = torch.where(negative)[0]
    num_pos = min(pos.numel(), int(num_samples * positive_fraction))
    num_neg = min(neg.numel(), num_samples - num_pos)
    pos = pos[torch.randperm(pos.numel(), device=pos.device)[:num_pos]]
    neg = neg[torch.randperm(neg.numel(), device=neg.device)[:num_neg]]
    return pos, neg
