"""Cascade R-CNN RoI heads: three box heads in sequence, each refining the previous one's boxes at a higher IoU.

Cascade R-CNN (Cai & Vasconcelos 2018), Sec. 4 (Fig. 3(d)), the "enhanced" system of "Rethinking ImageNet
Pre-training" (Sec. 5, Table 2), with detectron2's conventions (`roi_heads/cascade_rcnn.py`,
`configs/Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml`):

- stage t has its own box head and class-agnostic box predictor, IoU threshold 0.5 / 0.6 / 0.7 and box-coder
  weights (10, 10, 5, 5) / (20, 20, 10, 10) / (30, 30, 15, 15) (the later stages' deltas are smaller, Sec. 4.2);
- training: stage 1 trains on the usual sampled RoIs (GT appended, 512 at 25% foreground). Stages 2 and 3 take
  the previous stage's predicted boxes (detached, clipped, empty ones dropped) and relabel them at their own IoU
  threshold, with no resampling and no GT re-appended. Every stage's loss has weight 1, and the gradient each stage
  sends into the shared FPN features is scaled by 1/3 (`_ScaleGradient`), so the backbone sees the average. The
  mask and keypoint heads train on the stage-1 foreground RoIs;
- inference: class scores are the mean of the 3 stages' softmax (Sec. 4.3, "ensemble"), boxes come from stage 3,
  then the usual threshold / per-class NMS / top-k; masks and keypoints are predicted on the final boxes.

Everything else (sampling, losses, post-processing, the mask and keypoint branches) is `RoIHeads`'.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from minimask.model.box_head import fast_rcnn_losses
from minimask.model.roi_heads import RoIHeads, RoISamples, box_regression_targets, boxes_per_class, label_boxes
from minimask.ops.box_coder import decode
from minimask.ops.boxes import clip_boxes_to_image


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by `scale` on the way back."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def next_stage_boxes(boxes: list[Tensor], image_sizes: list[tuple[int, int]], drop_empty: bool) -> list[Tensor]:
    """A stage's predicted boxes as the next stage's RoIs: detached (no gradient through the boxes, detectron2),
    clipped to the image, and in training without the boxes of zero width or height, which have no defined IoU."""
    next_boxes = []
    for b, size in zip(boxes, image_sizes):
        b = clip_boxes_to_image(b.detach(), size)  # (R_i, 4)
        if drop_empty:
            b = b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]
        next_boxes.append(b)
    return next_boxes


class CascadeRoIHeads(RoIHeads):
    """`RoIHeads` with a cascade of box stages; the forward contract is RoIHeads' except for the loss names.

    Args:
        box_heads: one box head per stage (e.g. three `ConvFCHead`s).
        box_predictors: one class-agnostic `BoxPredictor` per stage (4 regression outputs).
        stage_ious: the foreground IoU threshold of each stage.
        stage_reg_weights: the box-coder weights of each stage.
        **kwargs: every other `RoIHeads` keyword argument (num_classes, mask_head, sampling and test settings,
            ignore_iof_thr...); `fg_iou` and `box_reg_weights` come from stage 1. The ignore regions
            (`ignore_iof_thr`) act on stage 1's sampling only (`sample_proposals`).

    Training losses: `loss_classifier_stage{t}` and `loss_box_reg_stage{t}` for t = 1..3, plus `loss_mask` /
    `loss_keypoint` where those heads exist.
    """

    def __init__(self, *, box_heads: list[nn.Module], box_predictors: list[nn.Module],
                 stage_ious: tuple = (0.5, 0.6, 0.7),
                 stage_reg_weights: tuple = ((10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)), **kwargs):
        if not len(box_heads) == len(box_predictors) == len(stage_ious) == len(stage_reg_weights) > 0:
            raise ValueError(f"need the same positive number of box heads ({len(box_heads)}), predictors "
                             f"({len(box_predictors)}), IoUs ({len(stage_ious)}) and box weights "
                             f"({len(stage_reg_weights)})")
        if any(p.bbox_pred.out_features != 4 for p in box_predictors):
            raise ValueError("Cascade R-CNN needs class-agnostic box predictors (4 regression outputs)")
        # The stage lists take the names `box_head` / `box_predictor`, as in detectron2's checkpoints.
        super().__init__(box_head=nn.ModuleList(box_heads), box_predictor=nn.ModuleList(box_predictors),
                         fg_iou=stage_ious[0], box_reg_weights=tuple(stage_reg_weights[0]), **kwargs)
        self.stage_ious = tuple(stage_ious)
        self.stage_reg_weights = tuple(tuple(w) for w in stage_reg_weights)

    @property
    def num_stages(self) -> int:
        return len(self.stage_ious)

    def _run_stage(self, stage: int, features: list[Tensor], boxes: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Stage `stage` (0-based) on per-image boxes -> class logits (R, K+1), deltas (R, 4), decoded boxes (R, 4)."""
        x = self._pool(features, boxes, self.box_resolution)  # (R, C, 7, 7)
        if self.training:  # each of the stages contributes 1/num_stages of the features' gradient (detectron2)
            x = _ScaleGradient.apply(x, 1.0 / self.num_stages)
        class_logits, box_deltas = self.box_predictor[stage](self.box_head[stage](x))
        predicted = decode(box_deltas, torch.cat(boxes), self.stage_reg_weights[stage])  # (R, 4)
        return class_logits, box_deltas, predicted

    def _box_losses(self, features, samples: list[RoISamples], targets, image_sizes) -> dict[str, Tensor]:
        losses = {}
        for stage in range(self.num_stages):
            class_logits, box_deltas, predicted = self._run_stage(stage, features, [s.boxes for s in samples])
            labels, regression_targets = box_regression_targets(samples, self.stage_reg_weights[stage])
            stage_losses = fast_rcnn_losses(class_logits, box_deltas, labels, regression_targets, self.box_reg_loss,
                                            self.smooth_l1_beta)
            losses.update({f"{name}_stage{stage + 1}": value for name, value in stage_losses.items()})
            # The next stage relabels these boxes at its IoU: no resampling, no GT, and so no ignore regions either
            # (detectron2 `CascadeROIHeads._match_and_label_boxes` only relabels; the background RoIs that the ignore
            # regions could remove were drawn, or not, by stage 1's `sample_proposals`).
            if stage + 1 < self.num_stages:
                counts = [s.boxes.shape[0] for s in samples]
                rois = next_stage_boxes(list(predicted.split(counts)), image_sizes, drop_empty=True)
                samples = [label_boxes(b, t["boxes"], t["labels"], self.stage_ious[stage + 1])
                           for b, t in zip(rois, targets)]
        return losses

    def _box_predictions(self, features, proposals, image_sizes) -> tuple[Tensor, Tensor]:
        """Mean of the stages' class probabilities (R, K+1) and the last stage's boxes repeated per class (R, 4K)."""
        counts = [p.shape[0] for p in proposals]
        boxes, probs = proposals, []
        for stage in range(self.num_stages):
            class_logits, _, predicted = self._run_stage(stage, features, boxes)
            probs.append(class_logits.float().softmax(dim=1))  # (R, K+1)
            if stage + 1 < self.num_stages:
                boxes = next_stage_boxes(list(predicted.split(counts)), image_sizes, drop_empty=False)
        return torch.stack(probs).mean(dim=0), boxes_per_class(predicted, self.num_classes)
