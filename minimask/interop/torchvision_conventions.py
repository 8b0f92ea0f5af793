"""What differs when minimask runs torchvision's detection models with their weights (`maskrcnn_resnet50_fpn`,
`maskrcnn_resnet50_fpn_v2`, `keypointrcnn_resnet50_fpn`): every place where torchvision's arithmetic departs from
detectron2's, which `RPN` and `RoIHeads` follow, gathered here. `build_model` uses these subclasses when the config
sets `model.torchvision_conventions` (the torchvision_* presets); tests/test_model_zoo.py checks that they give
torchvision's detections, losses and gradients.

RPN (torchvision `models/detection/anchor_utils.py`, `rpn.py`):
- cell anchors are rounded to integers (`AnchorGenerator.generate_anchors`);
- each level's stride, per axis, is the padded image size // the feature size (61, not 64, on P6 of an 800-px
  side; `AnchorGenerator.forward`);
- both losses are divided by the number of sampled anchors (`RegionProposalNetwork.compute_loss`), not by
  256 x images;
- NMS and the final top-k rank sigmoid(logit) (`filter_proposals`), where float32 probabilities tie at 1.0.
RoI heads (`roi_heads.py`):
- detections with a side below 1e-2 are dropped before NMS (`postprocess_detections`);
- mask targets are RoIAlign of the bitmaps without the half-pixel shift, not thresholded (`project_masks_on_boxes`);
- masks are pasted with integer boxes and one pixel of padding (`paste_masks_in_image`, Detectron's too);
- a keypoint's score is the upsampled heatmap's maximum logit (`heatmaps_to_keypoints`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from minimask.distributed import global_normalizer
from minimask.model.anchors import multilevel_anchors
from minimask.model.box_head import fast_rcnn_inference
from minimask.model.keypoint_head import heatmaps_to_keypoints
from minimask.model.mask_head import check_paste_inputs, mask_targets
from minimask.model.roi_heads import RoIHeads, RoISamples
from minimask.model.rpn import RPN, find_top_proposals

MIN_BOX_SIZE = 1e-2  # torchvision `RoIHeads.postprocess_detections`: `box_ops.remove_small_boxes(boxes, 1e-2)`


class TorchvisionRPN(RPN):
    """`RPN` with torchvision's anchors, loss normaliser and proposal ranking (see the module docstring)."""

    def anchors(self, features: list[Tensor]) -> list[Tensor]:
        hws = [tuple(f.shape[-2:]) for f in features]
        padded_h, padded_w = hws[0][0] * self.strides[0], hws[0][1] * self.strides[0]
        strides = [(padded_h // max(h, 1), padded_w // max(w, 1)) for h, w in hws]  # integer division, per axis
        return multilevel_anchors(self.anchor_sizes, self.aspect_ratios, hws, strides, self.anchor_offset,
                                  device=features[0].device, dtype=torch.float32, round_to_int=True)

    def loss_normalizer(self, labels: Tensor) -> Tensor:
        """The number of sampled anchors (labels >= 0) in the batch (all processes')."""
        return global_normalizer((labels >= 0).sum().to(torch.float32))

    def select_proposals(self, anchors, logits, deltas, image_sizes) -> tuple[list[Tensor], list[Tensor]]:
        return find_top_proposals(anchors, logits, deltas, image_sizes, pre_nms_topk=self.pre_nms_topk[self.training],
                                  post_nms_topk=self.post_nms_topk[self.training], nms_thresh=self.nms_thresh,
                                  min_size=self.min_size, training=self.training, rank_by_probability=True)


class TorchvisionRoIHeads(RoIHeads):
    """`RoIHeads` with torchvision's small-box filter, soft mask targets, mask paste and keypoint scores."""

    def _detections(self, probs: Tensor, boxes: Tensor, image_size) -> tuple[Tensor, Tensor, Tensor]:
        boxes, scores, labels, _ = fast_rcnn_inference(probs, boxes, image_size, self.score_thresh, self.nms_thresh,
                                                       self.detections_per_image, min_size=MIN_BOX_SIZE)
        return boxes, scores, labels

    def _mask_targets(self, foreground: list[RoISamples], targets) -> Tensor:
        if any("masks" not in t for t in targets):
            raise ValueError("torchvision's soft mask targets are computed from bitmaps, but a target carries only "
                             "polygons: load the data with input.mask_format=bitmask")
        return mask_targets([t["masks"] for t in targets], [s.boxes for s in foreground],
                            [s.matched_idxs for s in foreground], self.mask_size, aligned=False, binarize=False)

    def _paste_masks(self, probs: Tensor, boxes: Tensor, image_size) -> Tensor:
        return paste_masks_legacy(probs, boxes, image_size)

    def _decode_keypoints(self, logits: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        return heatmaps_to_keypoints(logits, boxes, score="logit")


def paste_masks_legacy(probs: Tensor, boxes: Tensor, image_size: tuple[int, int], padding: int = 1) -> Tensor:
    """The legacy paste of Detectron and torchvision (`paste_masks_in_image`), kept to reproduce their checkpoints.

    Each S x S mask is zero-padded to (S + 2p) x (S + 2p), its box is scaled about its centre by (S + 2p) / S and
    truncated to integers (x0, y0, x1, y1), the padded mask is resized bilinearly (align_corners=False) to
    (y1 - y0 + 1) x (x1 - x0 + 1) pixels and written into the image at [y0, y1] x [x0, x1], clipped to the image.
    One mask at a time (a Python loop): slow, but this is what the source library computes.

    Args:
        probs: (N, S, S) probabilities; boxes: (N, 4) finite boxes in image pixels; image_size: (h, w).
    Returns:
        (N, 1, h, w) probabilities in probs' float dtype (at least float32). N == 0 gives (0, 1, h, w).
    """
    img_h, img_w = check_paste_inputs(probs, boxes, image_size)
    dtype = torch.promote_types(probs.dtype, torch.float32)
    out = torch.zeros((probs.shape[0], 1, img_h, img_w), dtype=dtype, device=probs.device)  # (N, 1, h, w)
    if probs.shape[0] == 0:
        return out
    side = probs.shape[-1]
    padded = F.pad(probs.detach().to(dtype), (padding,) * 4)  # (N, S + 2p, S + 2p)
    scale = float(side + 2 * padding) / side
    boxes = boxes.detach().to(device=probs.device, dtype=dtype)
    # The same float operations as torchvision's `expand_boxes`, then truncation toward zero (`.to(int64)`).
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale  # (N,)
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    centre_x = (boxes[:, 2] + boxes[:, 0]) * 0.5
    centre_y = (boxes[:, 3] + boxes[:, 1]) * 0.5
    corners = torch.stack((centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h), dim=1)
    for i, (x0, y0, x1, y1) in enumerate(corners.to(torch.int64).tolist()):  # one host sync for all boxes
        w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        resized = F.interpolate(padded[i][None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        left, right = max(x0, 0), min(x1 + 1, img_w)
        top, bottom = max(y0, 0), min(y1 + 1, img_h)
        if right > left and bottom > top:
            out[i, 0, top:bottom, left:right] = resized[top - y0:bottom - y0, left - x0:right - x0]
    return out
