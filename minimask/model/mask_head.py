"""The mask head of Mask R-CNN: the FCN that predicts a mask per RoI, its training targets and loss, and the paste of
predicted masks back into the image.

Mask R-CNN (He et al. 2017), Sec. 3 ("Mask Representation", "Loss function") and Fig. 4 (right, the FPN head):
4 x [3x3 conv 256 + ReLU] on the 14x14 RoIAlign features, a 2x2 stride-2 deconvolution to 28x28, and a 1x1 conv to K
class-specific mask logits. "Rethinking ImageNet Pre-training" (He, Girshick, Dollar 2019), Sec. 3, puts GN or
SyncBN after each of the 4 convs (detectron2 `MaskRCNNConvUpsampleHead` with NORM "GN", Detectron
`mask_rcnn_fcn_head_v1up4convs_gn`). Conventions follow detectron2 (`roi_heads/mask_head.py`,
`structures/masks.py`, `layers/mask_ops.py`):

- targets: each foreground RoI's matched GT mask cropped and resized to S x S (S = 28). Bitmap GT masks go through
  RoIAlign (aligned=True, scale 1, adaptive sampling) and a >= 0.5 threshold (`BitMasks.crop_and_resize`); COCO
  polygons are rasterised directly inside the box with pycocotools (`rasterize_polygons_within_box`);
- loss: per-pixel binary cross-entropy on the GT class's map only (Sec. 3: "L_mask is only defined on the k-th
  mask"), averaged over all pixels of all foreground RoIs;
- inference: the sigmoid of the predicted class's map is resampled into the image with `F.grid_sample`
  (`paste_masks_in_image`), which detectron2 reports is ~0.5 mask AP better than the legacy integer-box paste
  (`minimask.interop.torchvision_conventions.paste_masks_legacy`, kept to reproduce torchvision checkpoints, as are its soft
  targets: `mask_targets(aligned=False, binarize=False)`).

Class convention (minimask's): labels 1..K are objects, 0 is background; class c uses mask map c - 1.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_util
from torch import Tensor, nn

from minimask.distributed import global_normalizer
from minimask.model.norm import get_norm
from minimask.model.weight_init import c2_msra_fill
from minimask.ops.boxes import check_boxes
from minimask.ops.roi_align_sparse import roi_align_sparse

# Bytes allowed for the (n, h, w) float temporary of one paste chunk; detectron2 uses ~1 GB for its whole paste.
PASTE_CHUNK_BYTES = 256 * 1024 * 1024


class MaskHead(nn.Module):
    """Conv stack + 2x upsampling + per-class 1x1 predictor: (R, C, 14, 14) features -> (R, K, 28, 28) logits."""

    def __init__(self, *, in_channels: int = 256, conv_dims: tuple[int, ...] = (256, 256, 256, 256),
                 norm: str | None = "GN", num_classes: int):
        super().__init__()
        self.in_channels = in_channels
        layers: list[nn.Module] = []
        channels = in_channels
        for dim in conv_dims:
            norm_layer = get_norm(norm, dim)
            # A conv followed by a norm layer needs no bias: the norm's shift replaces it (detectron2 convention).
            layers.append(nn.Conv2d(channels, dim, kernel_size=3, padding=1, bias=norm_layer is None))
            if norm_layer is not None:
                layers.append(norm_layer)
            layers.append(nn.ReLU(inplace=True))
            channels = dim
        self.convs = nn.Sequential(*layers)
        # Fig. 4 of Mask R-CNN: "deconv" 2x2 stride 2, 14x14 -> 28x28, then ReLU; no norm (detectron2 and Detectron).
        self.deconv = nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)
        self.predictor = nn.Conv2d(channels, num_classes, kernel_size=1)

        for module in [*self.convs, self.deconv]:  # detectron2 `MaskRCNNConvUpsampleHead`
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                c2_msra_fill(module)
        # Small predictor init so that all masks start near p = 0.5 (detectron2 `MaskRCNNConvUpsampleHead`).
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"MaskHead expects features (R, {self.in_channels}, H, W), got {tuple(x.shape)}")
        x = self.convs(x)  # (R, C, 14, 14)
        if x.device.type == "cpu":  # the same numbers, faster where oneDNN's deconvolution is slow (see below)
            return deconv_relu_predict(x, self.deconv, self.predictor)  # (R, K, 28, 28)
        return self.predictor(F.relu(self.deconv(x)))  # (R, C', 28, 28) -> (R, K, 28, 28)


def deconv_relu_predict(x: Tensor, deconv: nn.ConvTranspose2d, predictor: nn.Conv2d) -> Tensor:
    """predictor(relu(deconv(x))) for a 2x2 stride-2 deconv and a 1x1 predictor, computed as two matmuls.

    A 2x2 stride-2 deconv maps each input pixel to its own 2x2 output block: a (C -> 2*2*C') linear map then a pixel
    shuffle. The 1x1 predictor acts on each output pixel alone, so it runs before the shuffle, which then moves K
    channels instead of C'. Same result with the same weights (tests/test_mask_head.py); forward + backward 1.5x
    faster on the 2-core CPU, where oneDNN's deconvolution and small 1x1 convolutions are slow (59 -> 38 ms at 128
    RoIs, BENCHMARKS.md). (R, C, H, W) -> (R, K, 2H, 2W).
    """
    r, c, h, w = x.shape
    c_out = deconv.out_channels
    weight = deconv.weight.permute(0, 2, 3, 1).reshape(c, 4 * c_out)  # (C, 2*2*C'), columns (dy, dx, c')
    y = torch.addmm(deconv.bias.repeat(4), x.permute(0, 2, 3, 1).reshape(r * h * w, c), weight).relu_()
    logits = F.linear(y.view(r * h * w * 4, c_out), predictor.weight.flatten(1), predictor.bias)
    k = logits.shape[1]  # logits: (R*H*W*2*2, K), rows (r, y, x, dy, dx)
    return logits.view(r, h, w, 2, 2, k).permute(0, 5, 1, 3, 2, 4).reshape(r, k, 2 * h, 2 * w)  # (R, K, 2H, 2W)


def _float_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float32


def mask_targets(gt_masks: list[Tensor], boxes: list[Tensor], matched_idxs: list[Tensor], size: int, *,
                 aligned: bool = True, binarize: bool = True) -> Tensor:
    """Binary S x S mask targets of the RoIs of a batch from full-image GT bitmaps (detectron2
    `BitMasks.crop_and_resize`), all images in one RoIAlign.

    aligned=False, binarize=False gives torchvision's soft targets instead (`project_masks_on_boxes`: RoIAlign
    without the half-pixel shift, values in [0, 1] used as BCE targets as they are).

    Args:
        gt_masks: per image (G_i, H_i, W_i) uint8/bool, or float coverage in [0, 1] (masks of a resized image),
            the image's GT masks at full image resolution.
        boxes: per image (R_i, 4) RoIs (the foreground proposals) in image pixels.
        matched_idxs: per image (R_i,) int64, the index into gt_masks[i] of each RoI's GT; must lie in [0, G_i)
            (not checked: a sync).
        size: S, the target side (28).
    Returns:
        (sum R_i, S, S) tensor in the boxes' float dtype, values in {0, 1}, on their device, no grad, the images'
        RoIs in order. No RoI at all gives (0, S, S).
    """
    if not len(gt_masks) == len(boxes) == len(matched_idxs):
        raise ValueError(f"need one mask stack, box tensor and matched-index tensor per image, got {len(gt_masks)}, "
                         f"{len(boxes)} and {len(matched_idxs)}")
    for masks, b, idx in zip(gt_masks, boxes, matched_idxs):
        if masks.dim() != 3:
            raise ValueError(f"gt_masks must have shape (G, H, W), got {tuple(masks.shape)}")
        check_boxes(b)
        if idx.shape != (b.shape[0],):
            raise ValueError(f"matched_idxs must have shape ({b.shape[0]},), got {tuple(idx.shape)}")
        if b.shape[0] and masks.shape[0] == 0:
            raise ValueError(f"{b.shape[0]} RoIs are matched to GT masks but gt_masks is empty")
    device = boxes[0].device if boxes else torch.device("cpu")
    dtype = _float_dtype(boxes[0]) if boxes else torch.float32
    if sum(b.shape[0] for b in boxes) == 0:
        return torch.zeros((0, size, size), dtype=dtype, device=device)
    # Each image's GT stack is one map of RoIAlign, (G_i, 1, H_i, W_i); a RoI samples its own GT mask through its
    # batch index, so no per-RoI copy of a full-size mask is ever made.
    maps = [m.to(device=device, dtype=dtype)[:, None] for m in gt_masks]
    rois = torch.cat([torch.cat([idx.to(device, dtype)[:, None], b.detach().to(dtype)], dim=1)
                      for b, idx in zip(boxes, matched_idxs)])  # (R, 5)
    image = torch.cat([torch.full((b.shape[0],), i, dtype=torch.int64, device=device) for i, b in enumerate(boxes)])
    with torch.no_grad():
        crops = roi_align_sparse(maps, rois, image, [1.0] * len(maps), (size, size), 0, aligned)  # (R, 1, S, S)
    return (crops[:, 0] >= 0.5).to(dtype) if binarize else crops[:, 0]  # (R, S, S)


def polygon_mask_targets(polygons: list, boxes: Tensor, size: int) -> Tensor:
    """Binary S x S mask targets of RoIs rasterised from COCO polygons (detectron2 `rasterize_polygons_within_box`).

    Each RoI's polygons are shifted by the box's (x0, y0), scaled by S / max(w, 0.1) and S / max(h, 0.1), and
    rasterised at S x S by pycocotools (frPyObjects -> merge -> decode). Polygons with fewer than 3 points have no
    area and are skipped (detectron2 drops them when loading COCO).

    Args:
        polygons: a list with one entry per RoI: that RoI's matched GT object, a list of flat [x0, y0, x1, y1, ...]
            sequences (lists, numpy arrays or tensors) in image pixels.
        boxes: (R, 4) RoIs in image pixels.
        size: S.
    Returns:
        (R, S, S) tensor in boxes' float dtype, values in {0, 1}, on boxes' device. R == 0 gives (0, S, S).
    """
    check_boxes(boxes)
    if len(polygons) != boxes.shape[0]:
        raise ValueError(f"polygons has {len(polygons)} entries for {boxes.shape[0]} boxes")
    dtype = _float_dtype(boxes)
    if boxes.shape[0] == 0:
        return torch.zeros((0, size, size), dtype=dtype, device=boxes.device)
    targets = np.zeros((boxes.shape[0], size, size), dtype=np.uint8)  # (R, S, S)
    for i, (object_polygons, box) in enumerate(zip(polygons, boxes.detach().cpu().double().tolist())):
        x0, y0, x1, y1 = box
        scale_x, scale_y = size / max(x1 - x0, 0.1), size / max(y1 - y0, 0.1)
        rings = []
        for polygon in object_polygons:
            p = np.array(polygon.detach().cpu().numpy() if isinstance(polygon, Tensor) else polygon, dtype=np.float64)
            if p.size < 6:
                continue
            p[0::2] = (p[0::2] - x0) * scale_x
            p[1::2] = (p[1::2] - y0) * scale_y
            rings.append(p)
        if rings:
            rle = mask_util.merge(mask_util.frPyObjects(rings, size, size))
            targets[i] = mask_util.decode(rle)
    return torch.from_numpy(targets).to(device=boxes.device, dtype=dtype)


def mask_loss(logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Mean per-pixel BCE-with-logits between the GT class's mask map and the target (Sec. 3 of Mask R-CNN).

    Args:
        logits: (R, K, S, S) mask logits of the foreground RoIs.
        labels: (R,) int64 GT classes in 1..K (map label - 1 is used).
        targets: (R, S, S) targets in [0, 1].
    Returns:
        Scalar: the mean over all R * S * S pixels. R == 0 gives `logits.sum() * 0` (0, still in the graph).

    Data parallel: the pixel sum is divided by `global_normalizer(R * S * S)` (the global pixel count / world size;
    the local count in one process), so the gradient averaged over ranks equals one process holding the whole
    batch. It is a collective: every rank must call mask_loss, even with R == 0.
    """
    if logits.dim() != 4 or logits.shape[2] != logits.shape[3]:
        raise ValueError(f"logits must have shape (R, K, S, S), got {tuple(logits.shape)}")
    num_rois, _, side, _ = logits.shape
    if labels.shape != (num_rois,):
        raise ValueError(f"labels must have shape ({num_rois},), got {tuple(labels.shape)}")
    if targets.shape != (num_rois, side, side):
        raise ValueError(f"targets must have shape ({num_rois}, {side}, {side}), got {tuple(targets.shape)}")
    # Before the early return: every rank takes part in the all-reduce.
    normalizer = global_normalizer(torch.full((), num_rois * side * side, dtype=torch.float32, device=logits.device))
    if num_rois == 0:
        return logits.sum() * 0
    rows = torch.arange(num_rois, device=logits.device)
    loss_dtype = torch.promote_types(logits.dtype, torch.float32)  # a pixel SUM would overflow fp16
    class_logits = logits[rows, labels - 1].to(loss_dtype)  # (R, S, S)
    total = F.binary_cross_entropy_with_logits(class_logits, targets.to(loss_dtype), reduction="sum")
    return total / normalizer


def paste_masks(probs: Tensor, boxes: Tensor, image_size: tuple[int, int], *, chunk_size: int | None = None) -> Tensor:
    """Resample S x S mask probabilities into their boxes in an h x w image (detectron2 `paste_masks_in_image`).

    Pixel (y, x) has centre (x + 0.5, y + 0.5); it is mapped to the box-normalised coordinates
    2 * (x + 0.5 - x0) / (x1 - x0) - 1 (and likewise y) and the mask is sampled there with `F.grid_sample`
    (bilinear, align_corners=False, zero padding), so the S x S cells tile the box exactly. Pixels whose centre lies
    outside the box are 0. (detectron2's grid_sample leaves a faint halo, below 0.5, up to half a mask cell outside
    the box; cutting it makes the result independent of how masks are chunked and leaves every mask thresholded at
    0.5, the evaluation's binarisation, unchanged.)

    Each mask is sampled only on its own window of whole pixels, [floor(x0), ceil(x1)) x [floor(y0), ceil(y1)), which
    holds every pixel centre inside its box; all windows share the largest window's size (clipped to the image) so
    that masks are sampled n at a time in one `grid_sample`, with n chosen so that the (n, window) float temporary
    stays under PASTE_CHUNK_BYTES (or n = `chunk_size` if given). Finding the window size is the only host sync.
    Boxes must be finite; boxes of zero width or height, or outside the image, paste nothing.

    Args:
        probs: (N, S, S) probabilities (the sigmoid of each detection's predicted-class map).
        boxes: (N, 4) boxes in image pixels.
        image_size: (h, w).
    Returns:
        (N, 1, h, w) probabilities, float32 (or float64 for float64 input), on probs' device. N == 0 gives
        (0, 1, h, w).
    """
    img_h, img_w = check_paste_inputs(probs, boxes, image_size)
    num_masks = probs.shape[0]
    dtype = torch.promote_types(probs.dtype, torch.float32)
    device = probs.device
    out = torch.zeros((num_masks, 1, img_h, img_w), dtype=dtype, device=device)  # (N, 1, h, w)
    if num_masks == 0 or img_h == 0 or img_w == 0:
        return out
    probs = probs.detach().to(dtype)
    boxes = boxes.detach().to(device=device, dtype=dtype)

    # Window corners in whole pixels; windows are then slid inside the image (a window clipped by the border still
    # covers the box's pixels that are in the image), so that every window pixel is a distinct image pixel.
    corners = torch.cat([boxes[:, :2].floor(), boxes[:, 2:].ceil()], dim=1)  # (N, 4)
    win_w, win_h = (corners[:, 2:] - corners[:, :2]).amax(dim=0).clamp(min=1).tolist()  # the host sync
    win_w, win_h = min(int(win_w), img_w), min(int(win_h), img_h)
    left = corners[:, 0].clamp(min=0, max=img_w - win_w).long()  # (N,)
    top = corners[:, 1].clamp(min=0, max=img_h - win_h).long()  # (N,)
    if chunk_size is None:
        chunk_size = max(1, PASTE_CHUNK_BYTES // (win_h * win_w * torch.finfo(dtype).bits // 8))

    for start in range(0, num_masks, chunk_size):
        chunk = slice(start, start + chunk_size)
        cols = left[chunk, None] + torch.arange(win_w, device=device)  # (n, w') image columns of each window
        rows = top[chunk, None] + torch.arange(win_h, device=device)  # (n, h')
        x0, y0, x1, y1 = (c[:, None] for c in boxes[chunk].unbind(dim=1))  # each (n, 1)
        # Pixel centres in box-normalised coordinates, [-1, 1] inside the box; zero-size boxes give +-inf or nan.
        gx = ((cols.to(dtype) + 0.5) - x0) / (x1 - x0) * 2 - 1  # (n, w')
        gy = ((rows.to(dtype) + 0.5) - y0) / (y1 - y0) * 2 - 1  # (n, h')
        n = gx.shape[0]
        grid = torch.stack((gx[:, None, :].expand(n, win_h, win_w), gy[:, :, None].expand(n, win_h, win_w)), dim=3)
        pasted = F.grid_sample(probs[chunk, None], grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False)[:, 0]  # (n, h', w')
        inside = (gy.abs() <= 1)[:, :, None] & (gx.abs() <= 1)[:, None, :]  # (n, h', w')
        index = torch.arange(start, start + n, device=device)[:, None, None]  # (n, 1, 1)
        out[index, 0, rows[:, :, None], cols[:, None, :]] = torch.where(inside, pasted, 0)
    return out


def check_paste_inputs(probs: Tensor, boxes: Tensor, image_size) -> tuple[int, int]:
    """ValueError unless probs is (N, S, S) and boxes (N, 4); returns the image's (h, w) as ints."""
    if probs.dim() != 3:
        raise ValueError(f"probs must have shape (N, S, S), got {tuple(probs.shape)}")
    check_boxes(boxes)
    if boxes.shape[0] != probs.shape[0]:
        raise ValueError(f"probs and boxes differ in length: {probs.shape[0]} masks, {boxes.shape[0]} boxes")
    return int(image_size[0]), int(image_size[1])
