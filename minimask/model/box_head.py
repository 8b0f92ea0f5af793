"""The Fast R-CNN box head: per-RoI features, class scores and box deltas, their losses and post-processing.

Fast R-CNN (Girshick 2015, Sec. 2) as used by Mask R-CNN's FPN variant (Mask R-CNN Sec. 3, Fig. 4; FPN Sec. 4.2):
every RoI is pooled to C x 7 x 7, turned into a feature vector by `ConvFCHead`, and `BoxPredictor` maps it to
K + 1 class logits (column 0 = background) and class-specific box deltas (4 per object class, none for background,
detectron2's convention).

- `ConvFCHead` is detectron2's `FastRCNNConvFCHead`: N x (3x3 conv + norm + ReLU) then M x (fc + ReLU). The paper's
  GN / SyncBN models ("Rethinking ImageNet Pre-training" Sec. 3 and 5, after Wu & He 2018 Sec. 6.1) use 4conv1fc:
  conv_dims=(256,) * 4, fc_dims=(1024,), norm="GN". conv_dims=() with fc_dims=(1024, 1024) is the usual 2fc head.
- `fast_rcnn_losses`: softmax cross-entropy over all sampled RoIs plus a box loss on the foreground RoIs divided by
  the number of sampled RoIs (Fast R-CNN Eqn. 1; detectron2 `FastRCNNOutputLayers.losses`).
- `fast_rcnn_inference`: clip, score threshold, per-class NMS, top-k (detectron2 `fast_rcnn_inference`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minimask.distributed import global_normalizer
from minimask.model.norm import get_norm
from minimask.model.weight_init import c2_msra_fill, c2_xavier_fill
from minimask.ops.box_coder import box_regression_loss
from minimask.ops.boxes import batched_nms, clip_boxes_to_image


class ConvFCHead(nn.Module):
    """NconvMfc box head: (R, C, S, S) pooled RoI features -> (R, D) vectors, D = `out_features`.

    Args:
        in_channels: C, the channels of the pooled features (256 for FPN).
        resolution: S, the side of the pooled features (7).
        conv_dims: output channels of each 3x3 conv (padding 1). Convs followed by a norm have no bias.
        fc_dims: output size of each fc; every fc is followed by ReLU and never by a norm (detectron2).
        norm: a `get_norm` name ("GN", "SyncBN", "BN", "FrozenBN") or ""/None, applied after each conv.
    With conv_dims == fc_dims == () the head only flattens, D = C * S * S. Works on R = 0 RoIs.
    """

    def __init__(self, *, in_channels: int, resolution: int, conv_dims: tuple = (), fc_dims: tuple = (1024, 1024),
                 norm: str | None = ""):
        super().__init__()
        self.in_channels, self.resolution = in_channels, resolution
        layers: list[nn.Module] = []
        channels = in_channels
        for dim in conv_dims:
            norm_layer = get_norm(norm, dim)
            conv = nn.Conv2d(channels, dim, kernel_size=3, padding=1, bias=norm_layer is None)
            c2_msra_fill(conv)
            layers += [conv] + ([norm_layer] if norm_layer is not None else []) + [nn.ReLU(inplace=True)]
            channels = dim
        layers.append(nn.Flatten(start_dim=1))
        features = channels * resolution * resolution
        for dim in fc_dims:
            fc = nn.Linear(features, dim)
            c2_xavier_fill(fc)
            layers += [fc, nn.ReLU(inplace=True)]
            features = dim
        self.layers = nn.Sequential(*layers)
        self.out_features = features

    def forward(self, x: Tensor) -> Tensor:
        expected = (self.in_channels, self.resolution, self.resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"ConvFCHead expects (R, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        return self.layers(x)  # (R, D)


class BoxPredictor(nn.Module):
    """(R, D) RoI vectors -> (class_logits (R, K+1), box_deltas (R, 4K), or (R, 4) when class_agnostic).

    Column 0 of class_logits is background; class c in 1..K regresses with box_deltas[:, 4(c-1):4c].
    Init as Detectron: normal std 0.01 for the classifier, 0.001 for the regressor, zero biases.
    """

    def __init__(self, *, in_features: int, num_classes: int, class_agnostic: bool = False):
        super().__init__()
        self.num_classes, self.class_agnostic = num_classes, class_agnostic
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, 4 if class_agnostic else 4 * num_classes)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)  # (R, D)
        return self.cls_score(x), self.bbox_pred(x)  # (R, K+1), (R, 4K or 4)


def fast_rcnn_losses(class_logits: Tensor, box_deltas: Tensor, labels: Tensor, regression_targets: Tensor,
                     loss_type: str = "l1", beta: float = 0.0) -> dict[str, Tensor]:
    """Classification and box-regression losses of the sampled RoIs (Fast R-CNN Eqn. 1, detectron2 normalisation).

    Args:
        class_logits: (R, K+1), column 0 = background.
        box_deltas: (R, 4K) class-specific or (R, 4) class-agnostic predicted deltas.
        labels: (R,) int64 in 0..K, 0 = background.
        regression_targets: (R, 4) encoded deltas of each RoI's matched GT box (ignored for background rows, so
            they may hold anything there, even non-finite values).
        loss_type, beta: passed to `box_regression_loss` ("l1", or "smooth_l1" with `beta`).

    Returns:
        {"loss_classifier": CE averaged over all R RoIs,
         "loss_box_reg": box loss summed over the foreground RoIs (only the GT class's 4 deltas) divided by R}.
        With R == 0 both are 0, still connected to the graph.

    Data parallel: R is the global number of sampled RoIs; each rank divides its local sums by
    `global_normalizer(R_local)` (= R_global / world_size, R in one process), so the gradient averaged over ranks is
    that of one process holding the whole batch. Every rank must call this (a collective), even with R_local == 0.
    """
    r = class_logits.shape[0]
    if class_logits.dim() != 2 or box_deltas.dim() != 2 or box_deltas.shape[0] != r:
        raise ValueError(f"class_logits must be (R, K+1) and box_deltas (R, 4K or 4); got "
                         f"{tuple(class_logits.shape)} and {tuple(box_deltas.shape)}")
    num_classes = class_logits.shape[1] - 1
    if box_deltas.shape[1] not in (4, 4 * num_classes):
        raise ValueError(f"box_deltas must have 4 or 4 * {num_classes} columns, got {box_deltas.shape[1]}")
    if labels.shape != (r,) or regression_targets.shape != (r, 4):
        raise ValueError(f"labels must be ({r},) and regression_targets ({r}, 4); got {tuple(labels.shape)} "
                         f"and {tuple(regression_targets.shape)}")
    # Before any early return: every rank takes part in the all-reduce.
    normalizer = global_normalizer(torch.full((), r, dtype=torch.float32, device=class_logits.device))
    if r == 0:
        zero = class_logits.sum() * 0.0 + box_deltas.sum() * 0.0
        return {"loss_classifier": zero, "loss_box_reg": zero.clone()}
    loss_dtype = torch.promote_types(class_logits.dtype, torch.float32)  # fp16/bf16 -> fp32, fp64 stays fp64
    loss_classifier = F.cross_entropy(class_logits.to(loss_dtype), labels, reduction="sum") / normalizer
    if box_deltas.shape[1] == 4:  # class-agnostic: one set of deltas for every class
        deltas = box_deltas  # (R, 4)
    else:
        column = (labels - 1).clamp(min=0)  # (R,) background rows pick class 1 and are masked below
        deltas = box_deltas.view(r, num_classes, 4)[torch.arange(r, device=labels.device), column]  # (R, 4)
    # Mask background rows with `where` rather than boolean indexing: no host sync, and non-finite background
    # targets cannot leak into the sum; |0 - 0| contributes exactly 0 for L1 and smooth-L1.
    foreground = (labels > 0)[:, None]  # (R, 1)
    deltas = torch.where(foreground, deltas.to(loss_dtype), 0.0)
    targets = torch.where(foreground, regression_targets.to(loss_dtype), 0.0)
    loss_box_reg = box_regression_loss(deltas, targets, loss_type, beta) / normalizer  # detectron2: / all RoIs
    return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}


def fast_rcnn_inference(class_probs: Tensor, boxes: Tensor, image_size: tuple[int, int], score_thresh: float = 0.05,
                        nms_thresh: float = 0.5, topk: int = 100,
                        min_size: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Final detections of one image from per-class scores and boxes (detectron2 `fast_rcnn_inference`).

    Every (RoI, class) pair is a candidate: boxes are clipped to the image, pairs with a score <= score_thresh or a
    non-finite score/box are dropped, NMS runs within each class, and the `topk` highest scores are kept. All
    classes are processed at once (batched NMS), with no Python loop over classes.

    Args:
        class_probs: (R, K+1) softmax probabilities, column 0 = background (ignored).
        boxes: (R, 4K) decoded boxes, class c in 1..K at columns 4(c-1):4c.
        image_size: (h, w) to clip to.
        min_size: also drop clipped boxes whose width or height is below min_size (torchvision's
            `postprocess_detections` uses 1e-2); 0 keeps every box (detectron2).

    Returns:
        boxes (N, 4), scores (N,), labels (N,) int64 in 1..K, kept_rows (N,) int64 index of each detection's RoI;
        sorted by decreasing score, N <= topk (N = 0 gives empty tensors of these shapes).
    """
    if class_probs.dim() != 2 or boxes.shape != (class_probs.shape[0], 4 * (class_probs.shape[1] - 1)):
        raise ValueError(f"class_probs must be (R, K+1) and boxes (R, 4K) with the same R and K; got "
                         f"{tuple(class_probs.shape)} and {tuple(boxes.shape)}")
    r, num_classes = class_probs.shape[0], class_probs.shape[1] - 1
    scores = class_probs[:, 1:]  # (R, K)
    boxes = clip_boxes_to_image(boxes.view(r, num_classes, 4), image_size)  # (R, K, 4)
    candidate = (scores > score_thresh) & torch.isfinite(scores) & torch.isfinite(boxes).all(dim=2)  # (R, K)
    if min_size > 0:
        sides = boxes[..., 2:] - boxes[..., :2]  # (R, K, 2)
        candidate &= (sides >= min_size).all(dim=2)
    rows, columns = torch.where(candidate)  # (N,), (N,)
    boxes, scores, labels = boxes[rows, columns], scores[rows, columns], columns + 1  # (N, 4), (N,), (N,)
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:topk]  # sorted by decreasing score
    return boxes[keep], scores[keep], labels[keep], rows[keep]
