"""Region Proposal Network with FPN (Sec. 3.1 of Faster R-CNN; Sec. 4.1 of FPN), following detectron2's `RPN`,
`StandardRPNHead` and `find_top_rpn_proposals` (`modeling/proposal_generator/rpn.py`, `proposal_utils.py`).

    P2..P6 --shared head--> per-anchor objectness logit + 4 deltas
      training: label anchors vs GT (IoU >= 0.7 fg, < 0.3 bg, best match fg), sample 256 (<= 50% fg) per image,
                loss_objectness = BCE over sampled, loss_rpn_box_reg = L1 over fg, both / (256 * #images)
      always:   per level top-k logits -> decode -> clip -> drop empty -> NMS 0.7 per level -> top-k per image

Ordering contract: each level's anchors, logits and deltas are flattened in (H, W, A) order (`minimask.model.anchors`),
and the levels are concatenated finest first, so index m means the same anchor in all three.
Proposals are detached: no gradient flows from the RoI heads into the RPN through them (detectron2 convention).
"""
import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minimask.distributed import global_normalizer
from minimask.model.anchors import multilevel_anchors
from minimask.ops.box_coder import box_regression_loss, decode, encode
from minimask.ops.boxes import _pairwise_iof, _pairwise_iou, batched_nms
from minimask.ops.matcher import inside_ignore_regions, match_boxes, sample_balanced

_RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)  # detectron2 RPN.BBOX_REG_WEIGHTS


class RPNHead(nn.Module):
    """The head shared by all levels: 3x3 conv + ReLU, then sibling 1x1 convs for A logits and 4A deltas.

    No norm layer, even in GN/SyncBN models (detectron2 StandardRPNHead). Init normal(std=0.01), bias 0.
    `conv_depth` > 1 stacks more 3x3 conv + ReLU layers (`extra_convs`; torchvision's v2 models use 2).
    forward(list of (B, C, H_l, W_l)) -> (list of (B, H_l*W_l*A) logits, list of (B, H_l*W_l*A, 4) deltas).
    """

    def __init__(self, *, in_channels: int, num_anchors: int, conv_depth: int = 1):
        super().__init__()
        if in_channels <= 0 or num_anchors <= 0 or conv_depth < 1:
            raise ValueError(f"in_channels, num_anchors and conv_depth must be positive, got {in_channels}, "
                             f"{num_anchors}, {conv_depth}")
        self.in_channels = in_channels
        self.num_anchors = num_anchors
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)
        self.extra_convs = nn.ModuleList(
            nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1) for _ in range(conv_depth - 1))
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(in_channels, 4 * num_anchors, kernel_size=1)
        for layer in (self.conv, *self.extra_convs, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = [], []
        for x in features:
            if x.dim() != 4 or x.shape[1] != self.in_channels:
                raise ValueError(f"RPNHead expects (B, {self.in_channels}, H, W) maps, got {tuple(x.shape)}")
            t = F.relu(self.conv(x))
            for conv in self.extra_convs:
                t = F.relu(conv(t))
            b, _, h, w = t.shape
            # Channel a of the logits is anchor a; channels 4a..4a+3 of the deltas are anchor a's (dx, dy, dw, dh).
            logits.append(self.objectness_logits(t).permute(0, 2, 3, 1).reshape(b, -1))  # (B, H*W*A)
            d = self.anchor_deltas(t).view(b, self.num_anchors, 4, h, w)
            deltas.append(d.permute(0, 3, 4, 1, 2).reshape(b, -1, 4))  # (B, H*W*A, 4)
        return logits, deltas


def label_anchors(anchors: Tensor, gt_boxes: list[Tensor], fg_iou: float, bg_iou: float, batch_size_per_image: int,
                  positive_fraction: float, ignore_boxes: list[Tensor | None] | None = None,
                  ignore_iof_thr: float = -1.0) -> tuple[Tensor, Tensor]:
    """Training labels of the anchors of every image of a batch (Sec. 3.1.2 of Faster R-CNN), all images at once.

    Anchors with IoU >= fg_iou with some GT box, and for each GT box the anchors attaining its highest IoU (ties
    included), are positive; IoU < bg_iou negative; the rest ignored. With ignore_iof_thr >= 0, a negative anchor
    whose intersection over its own area with one of its image's ignore boxes is > ignore_iof_thr is ignored too
    (`inside_ignore_regions`; positives stay positive). Then at most batch_size_per_image anchors per image are
    sampled, at most positive_fraction of them positive; every unsampled anchor becomes ignored (-1).
    Anchors crossing the image border are kept (detectron2 BOUNDARY_THRESH = -1). No host sync.

    Args:
        anchors: (M, 4), the same for every image; gt_boxes: B tensors (G_i, 4), G_i may be 0 (then every sampled
            anchor of that image is negative).
        ignore_boxes: None, or B tensors (I_i, 4) or None (no region), I_i may be 0: the regions to ignore (crowds).
        ignore_iof_thr: < 0 turns the ignore regions off (the default): then the labels and the random draws are
            exactly those without ignore_boxes.
    Returns:
        labels: (B, M) float32 in {1, 0, -1}; matched_gt_boxes: (B, M, 4), the best-matching GT box of each anchor
        in the GT boxes' dtype (meaningful only where labels == 1; zeros for an image without GT).
    """
    for g in gt_boxes:
        if g.dim() != 2 or g.shape[1] != 4:
            raise ValueError(f"gt_boxes must have shape (G, 4), got {tuple(g.shape)}")
    padded, valid = _pad_boxes(gt_boxes, anchors.device)  # (B, G_max, 4), (B, G_max)
    iou = _pairwise_iou(padded, anchors)  # (B, G_max, M)
    matched_idx, match_labels = match_boxes(iou, fg_iou, bg_iou, allow_low_quality=True, gt_valid=valid)  # (B, M)
    negative = match_labels == 0  # (B, M)
    if ignore_iof_thr >= 0 and ignore_boxes is not None:
        negative &= ~_inside_ignore_boxes(anchors, ignore_boxes, len(gt_boxes), ignore_iof_thr)
    pos_idx, pos_taken, neg_idx, neg_taken = sample_balanced(match_labels == 1, negative, batch_size_per_image,
                                                             positive_fraction)
    labels = torch.full(match_labels.shape, -1.0, device=anchors.device)  # (B, M)
    labels.scatter_(1, neg_idx, torch.where(neg_taken, 0.0, labels.gather(1, neg_idx)))
    labels.scatter_(1, pos_idx, torch.where(pos_taken, 1.0, labels.gather(1, pos_idx)))
    if padded.shape[1] == 0:  # no image has a GT box
        return labels, padded.new_zeros(labels.shape + (4,))
    matched = torch.gather(padded, 1, matched_idx[:, :, None].expand(-1, -1, 4))  # (B, M, 4)
    return labels, matched


def _pad_boxes(boxes: list[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """B tensors (K_i, 4) -> (B, K_max, 4) with zero rows after K_i, and the (B, K_max) bool mask of the real rows."""
    padded = torch.nn.utils.rnn.pad_sequence(list(boxes), batch_first=True)  # (B, K_max, 4)
    counts = torch.tensor([b.shape[0] for b in boxes], device=device)  # (B,)
    return padded, torch.arange(padded.shape[1], device=device) < counts[:, None]


def _inside_ignore_boxes(anchors: Tensor, ignore_boxes: list[Tensor | None], num_images: int,
                         iof_thr: float) -> Tensor:
    """(B, M) bool: the anchors whose IoF with one of their image's ignore boxes is > iof_thr, all images at once."""
    if len(ignore_boxes) != num_images:
        raise ValueError(f"got {len(ignore_boxes)} ignore_boxes entries for a batch of {num_images} images")
    regions = [anchors.new_zeros(0, 4) if r is None else r.to(anchors.dtype) for r in ignore_boxes]
    for r in regions:
        if r.dim() != 2 or r.shape[1] != 4:
            raise ValueError(f"ignore_boxes must have shape (I, 4), got {tuple(r.shape)}")
    padded, valid = _pad_boxes(regions, anchors.device)  # (B, I_max, 4), (B, I_max)
    return inside_ignore_regions(_pairwise_iof(anchors, padded), iof_thr, valid)  # (B, M, I_max) -> (B, M)


def rpn_losses(
    anchors: Tensor,
    pred_logits: Tensor,
    pred_deltas: Tensor,
    labels: Tensor,
    matched_gt_boxes: Tensor,
    normalizer: Tensor,
    *,
    box_reg_loss: str = "l1",
    smooth_l1_beta: float = 0.0,
) -> dict[str, Tensor]:
    """The two RPN losses, each summed and divided by `normalizer` (detectron2: batch_size_per_image * images,
    `RPN.loss_normalizer`).

    Args:
        anchors: (M, 4) all levels concatenated; pred_logits: (B, M); pred_deltas: (B, M, 4);
        labels: (B, M) in {1, 0, -1} from `label_anchors`; matched_gt_boxes: (B, M, 4); normalizer: () tensor.
    Returns:
        {"loss_objectness": BCE-with-logits summed over anchors with label >= 0,
         "loss_rpn_box_reg": box_regression_loss summed over anchors with label 1, against encode(gt, anchor)}.
        With no positive anchor, loss_rpn_box_reg is exactly 0 and still connected to pred_deltas' graph.
    """
    b, m = pred_logits.shape
    if anchors.shape != (m, 4) or pred_deltas.shape != (b, m, 4):
        raise ValueError(
            f"shape mismatch: anchors {tuple(anchors.shape)}, pred_logits {tuple(pred_logits.shape)}, "
            f"pred_deltas {tuple(pred_deltas.shape)}; expected (M, 4), (B, M), (B, M, 4)"
        )
    if labels.shape != (b, m) or matched_gt_boxes.shape != (b, m, 4):
        raise ValueError(f"labels must be (B, M) and matched_gt_boxes (B, M, 4), got {tuple(labels.shape)}, "
                         f"{tuple(matched_gt_boxes.shape)}")
    pos = labels == 1  # (B, M)
    valid = labels >= 0  # (B, M)
    with torch.no_grad():
        target_deltas = encode(matched_gt_boxes[pos], anchors.expand(b, m, 4)[pos], _RPN_BOX_WEIGHTS)  # (P, 4)
    loss_box = box_regression_loss(pred_deltas[pos], target_deltas, box_reg_loss, smooth_l1_beta)
    loss_dtype = torch.promote_types(pred_logits.dtype, torch.float32)  # fp16/bf16 -> fp32, fp64 stays fp64
    loss_obj = F.binary_cross_entropy_with_logits(
        pred_logits[valid].to(loss_dtype), labels[valid].to(loss_dtype), reduction="sum"
    )
    return {"loss_objectness": loss_obj / normalizer, "loss_rpn_box_reg": loss_box / normalizer}


def find_top_proposals(
    anchors: Sequence[Tensor],
    pred_logits: Sequence[Tensor],
    pred_deltas: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    *,
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_thresh: float,
    min_size: float = 0.0,
    training: bool = False,
    rank_by_probability: bool = False,
) -> tuple[list[Tensor], list[Tensor]]:
    """Select each image's proposals (detectron2 `find_top_rpn_proposals`, `proposal_utils.py`).

    Per level keep the pre_nms_topk highest logits of each image, decode them, clip to the image, drop boxes with
    width or height <= min_size, run NMS at nms_thresh within each level, and keep the post_nms_topk best of the
    image over all levels. Runs without gradient.

    Args:
        anchors: per level (M_l, 4); pred_logits: per level (B, M_l); pred_deltas: per level (B, M_l, 4).
        image_sizes: B pairs (h, w) to clip to.
        training: if True, a non-finite box or logit raises FloatingPointError (detectron2 stops a diverged run);
            otherwise such proposals are dropped.
        rank_by_probability: NMS and the final top-k rank sigmoid(logit) instead of the logit (torchvision's
            checkpoints, `minimask.interop.torchvision_conventions`). The order is the same except that float32
            sigmoids of large logits tie at 1.0, and ties keep their order.
    Returns:
        (boxes, scores): per image a (P_i, 4) float tensor and its (P_i,) logits (probabilities with
        rank_by_probability), sorted by decreasing score,
        P_i <= post_nms_topk; P_i may be 0.
    """
    num_levels = len(anchors)
    if not (len(pred_logits) == len(pred_deltas) == num_levels) or num_levels == 0:
        raise ValueError(f"need matching non-empty per-level lists: {num_levels} anchors, {len(pred_logits)} "
                         f"logits, {len(pred_deltas)} deltas")
    num_images = pred_logits[0].shape[0]
    if len(image_sizes) != num_images:
        raise ValueError(f"got {len(image_sizes)} image sizes for a batch of {num_images}")
    with torch.no_grad():
        scores, sel_anchors, sel_deltas, level_ids = _top_anchors_per_level(anchors, pred_logits, pred_deltas,
                                                                            pre_nms_topk)
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        if rank_by_probability:
            scores = scores.sigmoid()
        boxes = decode(sel_deltas.reshape(-1, 4), sel_anchors.reshape(-1, 4), _RPN_BOX_WEIGHTS)  # (B*K, 4)
        boxes = boxes.view(num_images, -1, 4)  # (B, K, 4)

        # One host sync for the whole batch, in training only (detectron2 checks per image).
        if training and not (torch.isfinite(boxes).all() & torch.isfinite(scores).all()):
            raise FloatingPointError("Predicted boxes or scores contain Inf/NaN. Training has diverged.")

        # Every image at once: clip to its own size, drop the empty (in inference also the non-finite) boxes, NMS
        # within each image's levels (one group per image and level), then each image's best post_nms_topk.
        limits = torch.tensor([(w, h, w, h) for h, w in image_sizes], dtype=boxes.dtype, device=boxes.device)
        boxes = torch.min(boxes.clamp(min=0), limits[:, None, :])  # (B, K, 4) clipped
        keep = ((boxes[..., 2] - boxes[..., 0]) > min_size) & ((boxes[..., 3] - boxes[..., 1]) > min_size)  # (B, K)
        if not training:
            keep &= torch.isfinite(boxes).all(dim=2) & torch.isfinite(scores)
        image, index = keep.nonzero(as_tuple=True)  # (N,) each
        boxes, scores = boxes[image, index], scores[image, index]  # (N, 4), (N,)
        kept = batched_nms(boxes, scores, image * num_levels + level_ids[index], nms_thresh)  # by decreasing score
        kept = kept[torch.sort(image[kept], stable=True).indices]  # image-major, by decreasing score within each
        per_image = torch.zeros(num_images, dtype=torch.int64, device=kept.device).index_add_(
            0, image[kept], torch.ones_like(kept)).tolist()  # host sync: how many each image kept
        out_boxes, out_scores = [], []
        for start, count in zip(itertools.accumulate([0] + per_image[:-1]), per_image):
            take = kept[start:start + min(count, post_nms_topk)]
            out_boxes.append(boxes[take])
            out_scores.append(scores[take])
    return out_boxes, out_scores


def _top_anchors_per_level(anchors, pred_logits, pred_deltas, pre_nms_topk: int):
    """Each image's pre_nms_topk highest logits of every level, with their anchors and deltas, levels side by side:
    scores (B, K), anchors (B, K, 4), deltas (B, K, 4) and the level of each column (K,)."""
    num_images = pred_logits[0].shape[0]
    batch_idx = torch.arange(num_images, device=pred_logits[0].device)[:, None]  # (B, 1)
    scores, sel_anchors, sel_deltas, level_ids = [], [], [], []
    for level, (anc, logit, delta) in enumerate(zip(anchors, pred_logits, pred_deltas)):
        if logit.shape != (num_images, anc.shape[0]) or delta.shape != (num_images, anc.shape[0], 4):
            raise ValueError(f"level {level}: logits {tuple(logit.shape)} / deltas {tuple(delta.shape)} do not "
                             f"match {anc.shape[0]} anchors and {num_images} images")
        k = min(pre_nms_topk, anc.shape[0])
        top_scores, top_idx = logit.topk(k, dim=1)  # (B, k), sorted
        scores.append(top_scores)
        sel_anchors.append(anc[top_idx])  # (B, k, 4)
        sel_deltas.append(delta[batch_idx, top_idx])  # (B, k, 4)
        level_ids.append(torch.full((k,), level, dtype=torch.int64, device=logit.device))
    return torch.cat(scores, dim=1), torch.cat(sel_anchors, dim=1), torch.cat(sel_deltas, dim=1), torch.cat(level_ids)


class RPN(nn.Module):
    """Region Proposal Network over FPN levels P2..P6 (detectron2 `RPN` with its defaults).

    forward(features, image_sizes, targets=None) -> (proposals, losses):
        features: list of (B, in_channels, H_l, W_l), one per stride, finest first.
        image_sizes: B pairs (h, w) of the unpadded images (proposals are clipped to them).
        targets: per image a dict with "boxes" (G_i, 4), G_i may be 0, and optionally "ignore_boxes" (I_i, 4);
            required in training mode.
        proposals: per image a detached (P_i, 4) tensor sorted by decreasing objectness, P_i <= post_nms_topk.
        losses: {"loss_objectness", "loss_rpn_box_reg"} in training mode, {} in eval mode.
    Anchors are float32 on the features' device whatever the feature dtype (coordinates up to ~1e3 need it).
    `head_conv_depth` stacks more 3x3 convs in the head (torchvision's v2 models: 2).
    `ignore_iof_thr` >= 0 (commonly 0.5; < 0 = off, the default): in training, an anchor that would be negative but
    whose intersection over its own area with one of its image's "ignore_boxes" (crowds, uncertain people in
    pedestrian datasets) is > ignore_iof_thr is neither positive nor negative (`label_anchors`; mmdetection
    `MaxIoUAssigner(ignore_iof_thr=...)`, mmdet/core/bbox/assigners/max_iou_assigner.py). torchvision's checkpoints need
    a few other conventions: `minimask.interop.torchvision_conventions.TorchvisionRPN` overrides the methods below.
    """

    def __init__(
        self,
        *,
        in_channels: int = 256,
        strides: Sequence[int] = (4, 8, 16, 32, 64),
        anchor_sizes: Sequence[float] = (32, 64, 128, 256, 512),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        anchor_offset: float = 0.0,
        fg_iou: float = 0.7,
        bg_iou: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        box_reg_loss: str = "l1",
        smooth_l1_beta: float = 0.0,
        pre_nms_topk_train: int = 2000,
        pre_nms_topk_test: int = 1000,
        post_nms_topk_train: int = 1000,
        post_nms_topk_test: int = 1000,
        nms_thresh: float = 0.7,
        min_size: float = 0.0,
        head_conv_depth: int = 1,
        ignore_iof_thr: float = -1.0,
    ):
        super().__init__()
        if len(anchor_sizes) != len(strides) or len(strides) == 0:
            raise ValueError(f"need one anchor size per stride, got {len(anchor_sizes)} sizes, {len(strides)} strides")
        if len(aspect_ratios) == 0 or any(r <= 0 for r in aspect_ratios):
            raise ValueError(f"aspect_ratios must be non-empty and positive, got {aspect_ratios}")
        if not 0.0 <= bg_iou <= fg_iou <= 1.0:
            raise ValueError(f"need 0 <= bg_iou <= fg_iou <= 1, got bg_iou={bg_iou}, fg_iou={fg_iou}")
        if batch_size_per_image <= 0 or not 0.0 < positive_fraction <= 1.0:
            raise ValueError(f"need batch_size_per_image > 0 and 0 < positive_fraction <= 1, got "
                             f"{batch_size_per_image}, {positive_fraction}")
        if box_reg_loss not in ("l1", "smooth_l1"):
            raise ValueError(f"box_reg_loss must be 'l1' or 'smooth_l1', got {box_reg_loss!r}")
        if smooth_l1_beta < 0 or min_size < 0 or not 0.0 <= nms_thresh <= 1.0:
            raise ValueError(f"need smooth_l1_beta >= 0, min_size >= 0, 0 <= nms_thresh <= 1, got "
                             f"{smooth_l1_beta}, {min_size}, {nms_thresh}")
        if min(pre_nms_topk_train, pre_nms_topk_test, post_nms_topk_train, post_nms_topk_test) <= 0:
            raise ValueError("pre/post NMS top-k values must be positive")
        self.strides = tuple(strides)
        self.anchor_sizes = tuple(anchor_sizes)
        self.aspect_ratios = tuple(aspect_ratios)
        self.anchor_offset = anchor_offset
        self.fg_iou, self.bg_iou = fg_iou, bg_iou
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.box_reg_loss, self.smooth_l1_beta = box_reg_loss, smooth_l1_beta
        self.pre_nms_topk = {True: pre_nms_topk_train, False: pre_nms_topk_test}
        self.post_nms_topk = {True: post_nms_topk_train, False: post_nms_topk_test}
        self.nms_thresh, self.min_size = nms_thresh, min_size
        self.ignore_iof_thr = ignore_iof_thr
        self.head = RPNHead(in_channels=in_channels, num_anchors=len(aspect_ratios), conv_depth=head_conv_depth)

    def forward(
        self,
        features: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[dict] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        self._check_inputs(features, image_sizes, targets)
        anchors = self.anchors(features)  # per level (H_l*W_l*A, 4)
        logits, deltas = self.head(features)  # per level (B, M_l), (B, M_l, 4)
        losses = self.losses(anchors, logits, deltas, targets) if self.training else {}
        proposals, _ = self.select_proposals(anchors, [x.detach() for x in logits], [x.detach() for x in deltas],
                                             image_sizes)
        return proposals, losses

    def anchors(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Each level's anchors (H_l*W_l*A, 4), at the level's nominal stride (4, 8, ..., 64)."""
        return multilevel_anchors(self.anchor_sizes, self.aspect_ratios, [tuple(f.shape[-2:]) for f in features],
                                  self.strides, self.anchor_offset, device=features[0].device, dtype=torch.float32)

    def losses(self, anchors: list[Tensor], logits: list[Tensor], deltas: list[Tensor],
               targets: Sequence[dict]) -> dict[str, Tensor]:
        """Label and sample each image's anchors against its GT boxes, then the two losses (Faster R-CNN Eqn. 1)."""
        all_anchors = torch.cat(anchors)  # (M, 4)
        ignore_boxes = [t.get("ignore_boxes") for t in targets] if self.ignore_iof_thr >= 0 else None
        with torch.no_grad():
            labels, matched = label_anchors(all_anchors, [t["boxes"] for t in targets], self.fg_iou, self.bg_iou,
                                            self.batch_size_per_image, self.positive_fraction, ignore_boxes,
                                            self.ignore_iof_thr)  # (B, M), (B, M, 4)
        return rpn_losses(all_anchors, torch.cat(logits, dim=1), torch.cat(deltas, dim=1), labels, matched,
                          self.loss_normalizer(labels), box_reg_loss=self.box_reg_loss,
                          smooth_l1_beta=self.smooth_l1_beta)

    def loss_normalizer(self, labels: Tensor) -> Tensor:
        """batch_size_per_image x the number of images (detectron2). Data parallel: the global number of images
        (`global_normalizer`), so the gradient averaged over ranks equals one process holding the whole batch; every
        rank must call it."""
        images = global_normalizer(torch.full((), labels.shape[0], dtype=torch.float32, device=labels.device))
        return images * self.batch_size_per_image

    def select_proposals(self, anchors, logits, deltas, image_sizes) -> tuple[list[Tensor], list[Tensor]]:
        return find_top_proposals(anchors, logits, deltas, image_sizes, pre_nms_topk=self.pre_nms_topk[self.training],
                                  post_nms_topk=self.post_nms_topk[self.training], nms_thresh=self.nms_thresh,
                                  min_size=self.min_size, training=self.training)

    def _check_inputs(self, features, image_sizes, targets) -> None:
        if len(features) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature maps (one per stride), got {len(features)}")
        num_images = features[0].shape[0]
        if any(f.shape[0] != num_images for f in features) or len(image_sizes) != num_images:
            raise ValueError(f"features and image_sizes disagree on the batch size: "
                             f"{[f.shape[0] for f in features]} vs {len(image_sizes)} image sizes")
        if self.training:
            if targets is None:
                raise ValueError("RPN in training mode needs targets (a list of dicts with 'boxes')")
            if len(targets) != num_images:
                raise ValueError(f"got {len(targets)} targets for a batch of {num_images} images")
