"""The keypoint head of Mask R-CNN: per-RoI keypoint heatmaps, their one-hot targets and loss, and the decoding of
heatmaps into image keypoints.

Mask R-CNN (He et al. 2017), Sec. 5 ("Mask R-CNN for Human Pose Estimation"): each of the P keypoints is a one-hot
mask in which a single pixel is foreground, trained with a softmax cross-entropy over the S^2 heatmap positions;
the head is 8 x [3x3 conv 512 + ReLU], a deconvolution and 2x bilinear upscaling to S = 56. Conventions follow
detectron2 (`roi_heads/keypoint_head.py` `KRCNNConvDeconvUpsampleHead`, `keypoint_rcnn_loss`;
`structures/keypoints.py` `_keypoints_to_heatmap`, `heatmaps_to_keypoints`); the head has no normalization layers
in detectron2, Detectron and "Rethinking ImageNet Pre-training" alike.

Keypoints are (x, y, visibility) rows in continuous pixel coordinates (COCO's integer keypoints + 0.5, done by the
data loader); visibility > 0 means labelled.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minimask.distributed import global_normalizer
from minimask.model.weight_init import c2_msra_fill
from minimask.ops.boxes import check_boxes


class KeypointHead(nn.Module):
    """Conv stack + deconv + 2x bilinear upsampling: (R, C, 14, 14) features -> (R, P, 56, 56) heatmap logits."""

    def __init__(self, *, in_channels: int = 256, conv_dims: tuple[int, ...] = (512,) * 8, num_keypoints: int = 17):
        super().__init__()
        self.in_channels = in_channels
        layers: list[nn.Module] = []
        channels = in_channels
        for dim in conv_dims:
            layers += [nn.Conv2d(channels, dim, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = dim
        self.convs = nn.Sequential(*layers)
        # 4x4 stride-2 deconv with padding 1 doubles the side exactly: 14 -> 28 (detectron2 `score_lowres`).
        self.deconv = nn.ConvTranspose2d(channels, num_keypoints, kernel_size=4, stride=2, padding=1)
        for module in [*self.convs, self.deconv]:  # every weight, the deconv included (detectron2, Detectron)
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                c2_msra_fill(module)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"KeypointHead expects features (R, {self.in_channels}, H, W), got {tuple(x.shape)}")
        x = self.convs(x)  # (R, C, 14, 14)
        x = self.deconv(x)  # (R, P, 28, 28)
        # Sec. 5 of Mask R-CNN: 2x bilinear upscaling to 56x56; a finer heatmap localizes keypoints better.
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)  # (R, P, 56, 56)


def keypoint_targets(keypoints: Tensor, boxes: Tensor, heatmap_size: int) -> tuple[Tensor, Tensor]:
    """The heatmap cell of each GT keypoint inside its RoI (detectron2 `_keypoints_to_heatmap`).

    With S = heatmap_size, u = floor((x - x0) * S / (x1 - x0)) and v = floor((y - y0) * S / (y1 - y0)); a point
    exactly on the right (bottom) edge gets u = S - 1 (v = S - 1), so the closed box maps onto the S x S cells.

    Args:
        keypoints: (R, P, 3) the matched GT object's keypoints (x, y, visibility) for each RoI.
        boxes: (R, 4) RoIs with positive width and height.
        heatmap_size: S.
    Returns:
        flat_idx: (R, P) int64, v * S + u, or 0 where not valid.
        valid: (R, P) bool, True where the keypoint is labelled (visibility > 0) and 0 <= u, v < S.
    """
    if keypoints.dim() != 3 or keypoints.shape[2] != 3:
        raise ValueError(f"keypoints must have shape (R, P, 3), got {tuple(keypoints.shape)}")
    check_boxes(boxes)
    if keypoints.shape[0] != boxes.shape[0]:
        raise ValueError(f"keypoints and boxes differ in length: {keypoints.shape[0]} and {boxes.shape[0]}")
    keypoints, boxes = keypoints.detach(), boxes.detach().to(keypoints.device, keypoints.dtype)
    x, y, visibility = keypoints.unbind(dim=2)  # each (R, P)
    x0, y0, x1, y1 = (c[:, None] for c in boxes.unbind(dim=1))  # each (R, 1)
    u = ((x - x0) * (heatmap_size / (x1 - x0))).floor().long()  # (R, P)
    v = ((y - y0) * (heatmap_size / (y1 - y0))).floor().long()  # (R, P)
    # detectron2 convention: the right/bottom edge belongs to the last cell rather than falling outside.
    u = torch.where(x == x1, heatmap_size - 1, u)
    v = torch.where(y == y1, heatmap_size - 1, v)
    valid = (u >= 0) & (u < heatmap_size) & (v >= 0) & (v < heatmap_size) & (visibility > 0)  # (R, P)
    flat_idx = torch.where(valid, v * heatmap_size + u, 0)  # (R, P)
    return flat_idx, valid


def keypoint_loss(logits: Tensor, flat_idx: Tensor, valid: Tensor) -> Tensor:
    """Softmax cross-entropy over the S^2 positions of each valid (RoI, keypoint), divided by the valid count.

    This is detectron2's default normalization (NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS): the sum over the valid
    keypoints of all RoIs passed in (the whole minibatch, if the caller concatenates its images) divided by their
    number. No host sync: invalid entries are masked out rather than indexed away.

    Args:
        logits: (R, P, S, S) heatmap logits.
        flat_idx, valid: (R, P) from `keypoint_targets`.
    Returns:
        Scalar. With no valid keypoint (or R == 0) it is 0 and still connected to the graph (gradient 0).

    Data parallel: the count is the global number of valid keypoints (`global_normalizer`), so the gradient averaged
    over ranks equals one process holding the whole batch. A collective: every rank must call it, even with R == 0.
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must have shape (R, P, S, S), got {tuple(logits.shape)}")
    num_rois, num_keypoints, h, w = logits.shape
    if flat_idx.shape != (num_rois, num_keypoints) or valid.shape != (num_rois, num_keypoints):
        raise ValueError(f"flat_idx and valid must have shape ({num_rois}, {num_keypoints}), got "
                         f"{tuple(flat_idx.shape)} and {tuple(valid.shape)}")
    normalizer = global_normalizer(valid.sum())  # before the early return: every rank takes part
    if logits.numel() == 0:
        return logits.sum() * 0
    ce = F.cross_entropy(logits.reshape(num_rois * num_keypoints, h * w), flat_idx.reshape(-1),
                         reduction="none")  # (R * P,)
    valid = valid.reshape(-1)
    total = torch.where(valid, ce, 0).sum()
    return total / normalizer


def heatmaps_to_keypoints(logits: Tensor, boxes: Tensor, score: str = "softmax") -> tuple[Tensor, Tensor]:
    """Decode heatmap logits into image keypoints and scores (detectron2 `heatmaps_to_keypoints`).

    For each box, with w = max(x1 - x0, 1) and h = max(y1 - y0, 1), the S x S logits are resized bicubically to
    ceil(h) x ceil(w) (one output pixel per image pixel, roughly); the argmax (x_int, y_int) of each keypoint's map
    gives x = x0 + (x_int + 0.5) * w / ceil(w) and y = y0 + (y_int + 0.5) * h / ceil(h).

    The score is detectron2's spatial softmax: exp(m) / sum over the S x S map of exp(logits), where m is the
    maximum of the *resized* map. Normalizing by the S x S map rather than the resized one makes scores of objects
    of different sizes comparable; bicubic overshoot can make m exceed the S x S maximum, so a score can slightly
    exceed the S x S softmax maximum (and, rarely, 1).

    With score="logit" the score is instead the resized map's maximum itself (torchvision `heatmaps_to_keypoints`).

    Args:
        logits: (R, P, S, S) heatmap logits.
        boxes: (R, 4) detection boxes in image pixels.
        score: "softmax" (detectron2) or "logit" (torchvision).
    Returns:
        keypoints: (R, P, 3) float32 (x, y, 1); the third column is torchvision's visibility flag.
        scores: (R, P) float32. R == 0 gives (0, P, 3) and (0, P).
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must have shape (R, P, S, S), got {tuple(logits.shape)}")
    check_boxes(boxes)
    if logits.shape[0] != boxes.shape[0]:
        raise ValueError(f"logits and boxes differ in length: {logits.shape[0]} and {boxes.shape[0]}")
    if score not in ("softmax", "logit"):
        raise ValueError(f"score must be 'softmax' or 'logit', got {score!r}")
    num_rois, num_keypoints = logits.shape[:2]
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.detach().to(dtype)
    boxes = boxes.detach().to(device=logits.device, dtype=dtype)
    keypoints = torch.ones((num_rois, num_keypoints, 3), dtype=dtype, device=logits.device)  # (R, P, 3)
    if num_rois == 0:
        return keypoints, keypoints[..., 0].clone()

    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=1)  # (R,)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=1)  # (R,)
    out_sizes = torch.stack((heights.ceil(), widths.ceil()), dim=1).long().tolist()  # one host sync for all boxes
    resized_max = logits.new_empty((num_rois, num_keypoints))  # (R, P)
    argmax_xy = logits.new_empty((num_rois, num_keypoints, 2))  # (R, P, 2) integer pixel (x_int, y_int)
    for i, (out_h, out_w) in enumerate(out_sizes):
        resized = F.interpolate(logits[i:i + 1], size=(out_h, out_w), mode="bicubic", align_corners=False)[0]
        best, pos = resized.flatten(1).max(dim=1)  # (P,), (P,) flat index into out_h x out_w
        resized_max[i] = best
        argmax_xy[i, :, 0] = pos % out_w
        argmax_xy[i, :, 1] = pos.div(out_w, rounding_mode="floor")

    ceil_wh = torch.stack((widths.ceil(), heights.ceil()), dim=1)  # (R, 2)
    scale = torch.stack((widths, heights), dim=1) / ceil_wh  # (R, 2) image pixels per resized pixel
    keypoints[..., :2] = boxes[:, None, :2] + (argmax_xy + 0.5) * scale[:, None, :]
    if score == "logit":
        return keypoints, resized_max
    # exp(m) / sum exp(logits) evaluated as 1 / sum exp(logits - m) so that nothing overflows.
    scores = 1.0 / (logits - resized_max[..., None, None]).exp().sum(dim=(2, 3))  # (R, P)
    return keypoints, scores

