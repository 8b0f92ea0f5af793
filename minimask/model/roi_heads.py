"""The RoI heads of Mask R-CNN: proposal sampling, then the box, mask and keypoint heads on the pooled RoIs.

Mask R-CNN (He et al. 2017) Sec. 3 ("Training", "Inference") on top of Fast R-CNN (Girshick 2015) Sec. 2.3, with
detectron2's conventions (`roi_heads/roi_heads.py` `StandardROIHeads`):

- training: the GT boxes are appended to each image's proposals, every candidate is matched to its best GT at IoU
  0.5 (foreground) or background otherwise, and 512 RoIs are sampled per image with at most 25% foreground. The box
  head sees all sampled RoIs; the mask head only the foreground ones (Sec. 3: "L_mask is defined only on positive
  RoIs"); the keypoint head the foreground ones that contain a visible keypoint of their GT (Sec. 5), all images
  at once.
- inference: the box head runs on every proposal, `fast_rcnn_inference` keeps at most 100 detections per image, and
  the mask and keypoint heads run on those final boxes only (Sec. 3, "Inference").

The sampling and selection steps are stateless functions on `RoISamples` (per-image tuples of tensors);
`RoIHeads` owns the heads and chains the steps. Cascade R-CNN (`cascade.py`) reuses all of them.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from minimask.model.box_head import fast_rcnn_inference, fast_rcnn_losses
from minimask.model.keypoint_head import heatmaps_to_keypoints, keypoint_loss, keypoint_targets
from minimask.model.mask_head import mask_loss, mask_targets, paste_masks, polygon_mask_targets
from minimask.ops.box_coder import decode, encode
from minimask.ops.boxes import box_iof, box_iou
from minimask.ops.matcher import inside_ignore_regions, match_boxes, sample_balanced
from minimask.ops.poolers import multiscale_roi_align


class RoISamples(NamedTuple):
    """The training RoIs of one image with their labels; all fields have the same length S."""
    boxes: Tensor  # (S, 4) RoI boxes (no gradient)
    labels: Tensor  # (S,) int64 class in 1..K, 0 = background
    matched_idxs: Tensor  # (S,) int64 index of the matched GT box (0 where the image has no GT)
    matched_boxes: Tensor  # (S, 4) that GT box (the RoI itself where the image has no GT)


def _select(samples: RoISamples, keep: Tensor) -> RoISamples:
    return RoISamples(*(field[keep] for field in samples))


def label_boxes(boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, iou_threshold: float) -> RoISamples:
    """Label each box with the class of its best-overlapping GT if their IoU >= iou_threshold, else background (0).

    No ignore zone and no low-quality matches (Fast R-CNN Sec. 2.3, detectron2 ROI_HEADS matcher). An image without
    GT gives all-background labels.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4 or gt_boxes.dim() != 2 or gt_boxes.shape[1] != 4:
        raise ValueError(f"boxes and gt_boxes must be (N, 4), got {tuple(boxes.shape)} and {tuple(gt_boxes.shape)}")
    if gt_labels.shape != (gt_boxes.shape[0],):
        raise ValueError(f"gt_labels must have shape ({gt_boxes.shape[0]},), got {tuple(gt_labels.shape)}")
    if gt_boxes.shape[0] == 0:
        zeros = torch.zeros(boxes.shape[0], dtype=torch.int64, device=boxes.device)
        return RoISamples(boxes, zeros, zeros, boxes)
    matched_idxs, matched = match_boxes(box_iou(gt_boxes, boxes), iou_threshold, iou_threshold, False)  # (S,), (S,)
    labels = torch.where(matched == 1, gt_labels[matched_idxs], 0)  # (S,)
    return RoISamples(boxes, labels, matched_idxs, gt_boxes[matched_idxs].to(boxes.dtype))


def sample_proposals(proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, *, iou_threshold: float = 0.5,
                     num_samples: int = 512, positive_fraction: float = 0.25, append_gt: bool = True,
                     ignore_boxes: Tensor | None = None, ignore_iof_thr: float = -1.0) -> RoISamples:
    """The training RoIs of one image: (optionally) proposals + GT boxes, labelled and balanced-sampled.

    Args:
        proposals: (P, 4) boxes from the RPN (detached here: proposals carry no gradient).
        gt_boxes: (G, 4), gt_labels: (G,) int64 in 1..K.
        append_gt: append the GT boxes to the candidates (detectron2 PROPOSAL_APPEND_GT), which guarantees every GT
            at least one foreground RoI early in training, when the RPN's proposals are still poor.
        ignore_boxes: (I, 4) regions to ignore (crowds), I may be 0; None = none.
        ignore_iof_thr: >= 0: a background candidate whose intersection over its own area with an ignore box is
            > ignore_iof_thr is not sampled (`inside_ignore_regions`; foreground candidates stay foreground).
            < 0 (the default) turns this off: then the sample, random draws included, is the one without
            ignore_boxes.
    Returns:
        At most num_samples RoIs, at most num_samples * positive_fraction of them foreground; foreground rows first.
        Drawn with torch's global RNG.
    """
    if proposals.dim() != 2 or proposals.shape[1] != 4:
        raise ValueError(f"proposals must have shape (P, 4), got {tuple(proposals.shape)}")
    candidates = proposals.detach()
    if append_gt:
        candidates = torch.cat([candidates, gt_boxes.to(candidates.dtype)])  # (P + G, 4)
    labelled = label_boxes(candidates, gt_boxes, gt_labels, iou_threshold)
    negative = labelled.labels == 0  # (P + G,)
    if ignore_iof_thr >= 0 and ignore_boxes is not None:
        if ignore_boxes.dim() != 2 or ignore_boxes.shape[1] != 4:
            raise ValueError(f"ignore_boxes must have shape (I, 4), got {tuple(ignore_boxes.shape)}")
        negative &= ~inside_ignore_regions(box_iof(candidates, ignore_boxes), ignore_iof_thr)
    pos, pos_taken, neg, neg_taken = sample_balanced(labelled.labels > 0, negative, num_samples, positive_fraction)
    return _select(labelled, torch.cat([pos[pos_taken], neg[neg_taken]]))


def select_foreground(samples: list[RoISamples]) -> list[RoISamples]:
    """Keep the foreground RoIs of each image (the RoIs the mask and keypoint heads train on, Mask R-CNN Sec. 3)."""
    return [_select(s, s.labels > 0) for s in samples]


def random_subset(foreground: list[RoISamples], per_image: int) -> list[RoISamples]:
    """At most `per_image` foreground RoIs of each image, a uniform random subset: the first ones, since
    `sample_balanced` drew them in random order (no other draw from the RNG). 0 keeps them all."""
    return [_select(s, slice(per_image or None)) for s in foreground]


def has_visible_keypoint_inside(keypoints: Tensor, boxes: Tensor) -> Tensor:
    """(R,) bool: whether RoI r's GT has at least one visible keypoint (v >= 1) inside the RoI box, the RoIs the
    keypoint head trains on (detectron2 `select_proposals_with_visible_keypoints`; the box test is inclusive,
    x0 <= x <= x1 and y0 <= y <= y1). keypoints: (R, P, 3) (x, y, v) of each RoI's matched GT; boxes: (R, 4)."""
    x, y, v = keypoints.unbind(dim=2)  # each (R, P)
    x0, y0, x1, y1 = (c[:, None] for c in boxes.unbind(dim=1))  # each (R, 1)
    inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)  # (R, P)
    return (inside & (v >= 1)).any(dim=1)


def box_regression_targets(samples: list[RoISamples], weights: tuple) -> tuple[Tensor, Tensor]:
    """Concatenated labels (R,) and encoded deltas (R, 4) taking each RoI to its matched GT (Fast R-CNN Eqn. 1)."""
    labels = torch.cat([s.labels for s in samples])  # (R,)
    targets = encode(torch.cat([s.matched_boxes for s in samples]), torch.cat([s.boxes for s in samples]),
                     weights)  # (R, 4)
    return labels, targets


def boxes_per_class(boxes: Tensor, num_classes: int) -> Tensor:
    """(R, 4K) boxes unchanged; (R, 4) class-agnostic boxes repeated for each of the K classes -> (R, 4K)."""
    return boxes if boxes.shape[1] == 4 * num_classes else boxes.repeat(1, num_classes)


class RoIHeads(nn.Module):
    """Box, mask and keypoint heads on FPN features; see the module docstring for the procedure.

    forward(features, proposals, image_sizes, targets=None) -> (detections, losses):
        features: P2..P5, each (B, C, H_l, W_l), finest first, at `feature_scales`.
        proposals: B tensors (P_i, 4) in image pixels. image_sizes: B (h, w) of the unpadded images.
        targets (training only): B dicts with `boxes` (G, 4), `labels` (G,) in 1..K, and `masks` (G, H, W) uint8 or
            float coverage / `keypoints` (G, 17, 3) where the model has a mask / keypoint head; optionally
            `ignore_boxes` (I, 4), used when ignore_iof_thr >= 0.
    Training returns ([], {"loss_classifier", "loss_box_reg"} + "loss_mask" / "loss_keypoint" where those heads
    exist). Eval returns (B dicts with `boxes` (N, 4), `labels` (N,) int64 in 1..K, `scores` (N,), and `masks`
    (N, 1, h, w) float probabilities / `keypoints` (N, 17, 3) and `keypoints_scores` (N, 17) where those heads
    exist, 0 for detections outside `keypoint_classes`, {}). Zero proposals, zero GT and zero foreground RoIs are
    all allowed: losses stay finite and the regression / mask / keypoint losses are exactly 0 but still connected to
    every head's parameters.
    """

    def __init__(self, *, box_head: nn.Module, box_predictor: nn.Module, mask_head: nn.Module | None = None,
                 keypoint_head: nn.Module | None = None, num_classes: int,
                 feature_scales: tuple = (1 / 4, 1 / 8, 1 / 16, 1 / 32), box_resolution: int = 7,
                 mask_resolution: int = 14, keypoint_resolution: int = 14, sampling_ratio: int = 0,
                 aligned: bool = True, fg_iou: float = 0.5, batch_size_per_image: int = 512,
                 positive_fraction: float = 0.25, append_gt: bool = True, box_reg_weights: tuple = (10, 10, 5, 5),
                 box_reg_loss: str = "l1", smooth_l1_beta: float = 0.0, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_image: int = 100, mask_size: int = 28,
                 keypoint_heatmap_size: int = 56, keypoint_loss_weight: float = 1.0, keypoint_classes: tuple = (),
                 mask_rois_per_image: int = 0, ignore_iof_thr: float = -1.0):
        """keypoint_loss_weight scales `loss_keypoint` (detectron2 ROI_KEYPOINT_HEAD.LOSS_WEIGHT, 1.0).
        keypoint_classes: the labels (1..K) whose detections get keypoints, e.g. the person among other objects;
            () = all of them (a person-only keypoint model). The other detections' keypoints are 0 (v = 0: none).
        mask_rois_per_image > 0: at most that many foreground RoIs per image train the mask head (`random_subset`);
            0 = all (the paper, detectron2, torchvision).
        ignore_iof_thr >= 0 (commonly 0.5; < 0 = off, the default): in training, a background candidate whose
            intersection over its own area with one of its image's `ignore_boxes` (crowds, uncertain people in
            pedestrian datasets) is > ignore_iof_thr is not sampled (`sample_proposals`; mmdetection
            `MaxIoUAssigner(ignore_iof_thr=...)`, mmdet/core/bbox/assigners/max_iou_assigner.py).
        torchvision's checkpoints need a few other conventions: `minimask.interop.torchvision_conventions.TorchvisionRoIHeads`
        overrides the methods that differ.
        """
        super().__init__()
        self.box_head, self.box_predictor = box_head, box_predictor
        self.mask_head, self.keypoint_head = mask_head, keypoint_head
        self.num_classes = num_classes
        self.feature_scales = tuple(feature_scales)
        self.box_resolution, self.mask_resolution = box_resolution, mask_resolution
        self.keypoint_resolution = keypoint_resolution
        self.sampling_ratio, self.aligned = sampling_ratio, aligned
        self.fg_iou, self.batch_size_per_image, self.positive_fraction = fg_iou, batch_size_per_image, positive_fraction
        self.append_gt = append_gt
        self.box_reg_weights = tuple(box_reg_weights)
        self.box_reg_loss, self.smooth_l1_beta = box_reg_loss, smooth_l1_beta
        self.score_thresh, self.nms_thresh, self.detections_per_image = score_thresh, nms_thresh, detections_per_image
        self.mask_size, self.keypoint_heatmap_size = mask_size, keypoint_heatmap_size
        self.keypoint_loss_weight = keypoint_loss_weight
        bad = [c for c in keypoint_classes if not (isinstance(c, int) and 1 <= c <= num_classes)]
        if bad:
            raise ValueError(f"keypoint_classes must be labels in 1..{num_classes}, got {bad[0]!r}")
        self.keypoint_classes = tuple(keypoint_classes)
        if mask_rois_per_image < 0:
            raise ValueError(f"mask_rois_per_image must be >= 0 (0 = all), got {mask_rois_per_image}")
        self.mask_rois_per_image = mask_rois_per_image
        self.ignore_iof_thr = ignore_iof_thr

    def forward(self, features: list[Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        self._check_inputs(features, proposals, image_sizes, targets)
        if self.training:
            return [], self._forward_train(features, proposals, image_sizes, targets)
        return self._forward_eval(features, proposals, image_sizes), {}

    def _forward_train(self, features, proposals, image_sizes, targets) -> dict[str, Tensor]:
        samples = [
            sample_proposals(p, t["boxes"], t["labels"], iou_threshold=self.fg_iou,
                             num_samples=self.batch_size_per_image, positive_fraction=self.positive_fraction,
                             append_gt=self.append_gt,
                             ignore_boxes=t.get("ignore_boxes") if self.ignore_iof_thr >= 0 else None,
                             ignore_iof_thr=self.ignore_iof_thr)
            for p, t in zip(proposals, targets)
        ]
        losses = self._box_losses(features, samples, targets, image_sizes)
        foreground = select_foreground(samples)  # the mask and keypoint heads train on these (Sec. 3)
        if self.mask_head is not None:
            losses["loss_mask"] = self._mask_loss(features, random_subset(foreground, self.mask_rois_per_image),
                                                  targets)
        if self.keypoint_head is not None:
            losses["loss_keypoint"] = self.keypoint_loss_weight * self._keypoint_loss(features, foreground, targets)
        return losses

    def _forward_eval(self, features, proposals, image_sizes) -> list[dict[str, Tensor]]:
        class_probs, boxes = self._box_predictions(features, proposals, image_sizes)  # (R, K+1), (R, 4K)
        counts = [p.shape[0] for p in proposals]
        detections = []
        for probs_i, boxes_i, size in zip(class_probs.split(counts), boxes.split(counts), image_sizes):
            boxes_i, scores_i, labels_i = self._detections(probs_i, boxes_i, size)
            # detectron2 `detector_postprocess`: a box clipped to zero width or height is dropped, after the top-k.
            nonempty = (boxes_i[:, 2] > boxes_i[:, 0]) & (boxes_i[:, 3] > boxes_i[:, 1])  # (N,)
            boxes_i, scores_i, labels_i = boxes_i[nonempty], scores_i[nonempty], labels_i[nonempty]
            detections.append({"boxes": boxes_i, "labels": labels_i, "scores": scores_i})
        if self.mask_head is not None:
            self._add_masks(features, detections, image_sizes)  # on the final boxes only (Sec. 3, "Inference")
        if self.keypoint_head is not None:
            self._add_keypoints(features, detections)
        return detections

    def _detections(self, probs: Tensor, boxes: Tensor, image_size) -> tuple[Tensor, Tensor, Tensor]:
        """One image's boxes, scores and labels: score threshold, per-class NMS, top-k (`fast_rcnn_inference`)."""
        boxes, scores, labels, _ = fast_rcnn_inference(probs, boxes, image_size, self.score_thresh, self.nms_thresh,
                                                       self.detections_per_image)
        return boxes, scores, labels

    # Box branch. Cascade R-CNN overrides `_box_losses` and `_box_predictions`.

    def _pool(self, features: list[Tensor], boxes: list[Tensor], resolution: int) -> Tensor:
        """RoIAlign each image's boxes from its FPN level (FPN Eqn. 1) -> (sum of boxes, C, res, res)."""
        return multiscale_roi_align(features, boxes, resolution, list(self.feature_scales), self.sampling_ratio,
                                    self.aligned)

    def _predict_boxes(self, features: list[Tensor], boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
        x = self.box_head(self._pool(features, boxes, self.box_resolution))  # (R, D)
        return self.box_predictor(x)  # (R, K+1), (R, 4K or 4)

    def _box_losses(self, features, samples: list[RoISamples], targets, image_sizes) -> dict[str, Tensor]:
        class_logits, box_deltas = self._predict_boxes(features, [s.boxes for s in samples])
        labels, regression_targets = box_regression_targets(samples, self.box_reg_weights)
        return fast_rcnn_losses(class_logits, box_deltas, labels, regression_targets, self.box_reg_loss,
                                self.smooth_l1_beta)

    def _box_predictions(self, features, proposals, image_sizes) -> tuple[Tensor, Tensor]:
        """Class probabilities (R, K+1) and per-class decoded boxes (R, 4K) of all images' proposals."""
        class_logits, box_deltas = self._predict_boxes(features, proposals)
        boxes = decode(box_deltas, torch.cat(proposals), self.box_reg_weights)  # (R, 4K or 4)
        return class_logits.float().softmax(dim=1), boxes_per_class(boxes, self.num_classes)

    # Mask and keypoint branches.

    def _mask_loss(self, features, foreground: list[RoISamples], targets) -> Tensor:
        logits = self.mask_head(self._pool(features, [s.boxes for s in foreground], self.mask_resolution))
        if logits.shape[0] == 0:
            # No foreground RoI here: the loss is 0 but still goes through mask_loss, which keeps every mask parameter
            # in the graph and joins the loss normaliser's all-reduce that the other ranks make.
            side = logits.shape[-1]
            no_labels = torch.zeros(0, dtype=torch.int64, device=logits.device)
            return mask_loss(logits, no_labels, logits.new_zeros(0, side, side))
        return mask_loss(logits, torch.cat([s.labels for s in foreground]), self._mask_targets(foreground, targets))

    def _mask_targets(self, foreground: list[RoISamples], targets) -> Tensor:
        """(F, M, M) binary targets of all images' foreground RoIs, in order: from the GT polygons where a target
        carries them (rasterised inside each RoI, detectron2's default for COCO), else by RoIAlign-ing the
        full-size bitmaps and cutting at 0.5 (every such image in one call)."""
        parts = [None] * len(foreground)
        bitmaps = [i for i, t in enumerate(targets) if "polygons" not in t]
        for i, (s, t) in enumerate(zip(foreground, targets)):
            if "polygons" in t:
                parts[i] = polygon_mask_targets([t["polygons"][j] for j in s.matched_idxs.tolist()], s.boxes,
                                                self.mask_size)
        if bitmaps:
            crops = mask_targets([targets[i]["masks"] for i in bitmaps], [foreground[i].boxes for i in bitmaps],
                                 [foreground[i].matched_idxs for i in bitmaps], self.mask_size)
            for i, part in zip(bitmaps, crops.split([foreground[i].boxes.shape[0] for i in bitmaps])):
                parts[i] = part
        return torch.cat(parts)  # (F, M, M)

    def _keypoint_loss(self, features, foreground: list[RoISamples], targets) -> Tensor:
        # Every image's foreground RoIs together: boxes (F, 4) and their GT's keypoints (F, P, 3); the keypoint head
        # trains on those with a visible keypoint inside (Sec. 5).
        boxes = torch.cat([s.boxes for s in foreground])
        keypoints = torch.cat([t["keypoints"][s.matched_idxs] for s, t in zip(foreground, targets)])
        keep = has_visible_keypoint_inside(keypoints, boxes)  # (F,)
        counts = torch.stack([k.sum() for k in keep.split([s.boxes.shape[0] for s in foreground])]).tolist()
        boxes, keypoints = boxes[keep], keypoints[keep]  # (F', 4), (F', P, 3)
        logits = self.keypoint_head(self._pool(features, list(boxes.split(counts)), self.keypoint_resolution))
        # With F' = 0 the loss is 0 through keypoint_loss, so that the normaliser's all-reduce still runs.
        return keypoint_loss(logits, *keypoint_targets(keypoints, boxes, self.keypoint_heatmap_size))

    def _add_masks(self, features, detections: list[dict[str, Tensor]], image_sizes) -> None:
        boxes = [d["boxes"] for d in detections]
        logits = self.mask_head(self._pool(features, boxes, self.mask_resolution))  # (N, K, M, M)
        labels = torch.cat([d["labels"] for d in detections])  # (N,)
        # Sec. 3, "Inference": the mask of the predicted class k, the k-th of the K maps.
        probs = logits[torch.arange(labels.shape[0], device=labels.device), labels - 1].sigmoid()  # (N, M, M)
        for d, probs_i, size in zip(detections, probs.split([b.shape[0] for b in boxes]), image_sizes):
            d["masks"] = self._paste_masks(probs_i, d["boxes"], size)  # (N_i, 1, h, w)

    def _paste_masks(self, probs: Tensor, boxes: Tensor, image_size) -> Tensor:
        return paste_masks(probs, boxes, image_size)

    def _add_keypoints(self, features, detections: list[dict[str, Tensor]]) -> None:
        # Only detections of the keypoint classes get keypoints (a circle has no elbows); the others get 0 (v = 0).
        chosen = [self._keypoint_rows(d["labels"]) for d in detections]  # each (N_i,) bool, or None = all rows
        boxes = [d["boxes"] if c is None else d["boxes"][c] for d, c in zip(detections, chosen)]  # each (N'_i, 4)
        logits = self.keypoint_head(self._pool(features, boxes, self.keypoint_resolution))  # (N', P, S, S)
        keypoints, scores = self._decode_keypoints(logits, torch.cat(boxes))  # (N', P, 3), (N', P)
        counts = [b.shape[0] for b in boxes]
        for d, c, keypoints_i, scores_i in zip(detections, chosen, keypoints.split(counts), scores.split(counts)):
            if c is not None:  # back into all N_i rows, zeros elsewhere
                keypoints_i = keypoints_i.new_zeros((c.shape[0],) + keypoints_i.shape[1:]).index_put_((c,), keypoints_i)
                scores_i = scores_i.new_zeros((c.shape[0], scores_i.shape[1])).index_put_((c,), scores_i)
            d["keypoints"], d["keypoints_scores"] = keypoints_i, scores_i  # (N_i, P, 3), (N_i, P)

    def _keypoint_rows(self, labels: Tensor) -> Tensor | None:
        """(N,) bool: the detections of `keypoint_classes`; None when every class has keypoints (the default)."""
        if not self.keypoint_classes:
            return None
        return torch.isin(labels, torch.tensor(self.keypoint_classes, device=labels.device))

    def _decode_keypoints(self, logits: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        return heatmaps_to_keypoints(logits, boxes)

    def _check_inputs(self, features, proposals, image_sizes, targets) -> None:
        if len(features) != len(self.feature_scales):
            raise ValueError(f"expected {len(self.feature_scales)} feature maps (P2..P5), got {len(features)}")
        batch = features[0].shape[0]
        if len(proposals) != batch or len(image_sizes) != batch:
            raise ValueError(f"features have {batch} images but there are {len(proposals)} proposal tensors and "
                             f"{len(image_sizes)} image sizes")
        for p in proposals:
            if p.dim() != 2 or p.shape[1] != 4:
                raise ValueError(f"each proposals tensor must be (P, 4), got {tuple(p.shape)}")
        if not self.training:
            return
        if targets is None or len(targets) != batch:
            raise ValueError(f"training needs one target dict per image ({batch}), got "
                             f"{'None' if targets is None else len(targets)}")
        needed = ["boxes", "labels"] + ["keypoints"] * (self.keypoint_head is not None)
        for t in targets:
            missing = [key for key in needed if key not in t]
            if self.mask_head is not None and "masks" not in t and "polygons" not in t:
                missing.append("masks (or polygons)")
            if missing:
                raise ValueError(f"a target dict lacks {missing}; the RoI heads need {needed} and, with a mask "
                                 "head, 'masks' or 'polygons'")
