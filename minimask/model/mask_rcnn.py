"""The assembled detector: preprocessing, backbone + FPN, RPN, and RoI heads (Mask R-CNN, He et al. 2017, Fig. 1).

Contract (torchvision's):
- `model(images, targets)` in train mode returns a dict of scalar losses: `loss_objectness`, `loss_rpn_box_reg`,
  `loss_classifier`, `loss_box_reg`, and `loss_mask` / `loss_keypoint` where the model has those heads (Cascade
  R-CNN: `loss_classifier_stage{1,2,3}` and `loss_box_reg_stage{1,2,3}` instead of the two box losses).
- `model(images)` in eval mode returns one dict per image: `boxes` (N, 4) xyxy in the input image's pixels,
  `labels` (N,) int64 in 1..num_classes, `scores` (N,), and where the heads exist `masks` (N, 1, H, W) probabilities,
  `keypoints` (N, K, 3) (x, y, 1) and `keypoints_scores` (N, K).

`images` is a list of float tensors (C, H, W) in [0, 1], possibly of different sizes: RGB (C = 3), or the stacked
frames of `minimask.data.images.load_frames` (thermal C = 1, RGB + thermal C = 4). `targets` is a list of
dicts with `boxes` (N, 4) float xyxy, `labels` (N,) int64 in 1..num_classes (0 is background), and optionally
`masks` (N, H, W) uint8 bitmaps or float coverage in [0, 1] (plus `polygons` if the data pipeline passes them) and
`keypoints` (N, K, 3) float (x, y, visibility) in continuous pixel coordinates. The model never resizes: that
belongs to the data pipeline.
"""
import torch
from torch import Tensor, nn


class MaskRCNN(nn.Module):
    def __init__(
        self,
        *,
        backbone: nn.Module,
        fpn: nn.Module,
        rpn: nn.Module,
        roi_heads: nn.Module,
        num_classes: int,
        num_keypoints: int = 0,
        input_format: str = "BGR",
        pixel_scale: float = 255.0,
        pixel_mean: tuple = (103.530, 116.280, 123.675),
        pixel_std: tuple = (57.375, 57.120, 58.395),
        in_channels: int = 3,
        size_divisibility: int = 32,
        channels_last: bool = False,
        images_per_canvas: int = 0,
    ):
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
        if len(pixel_mean) != in_channels or len(pixel_std) != in_channels or min(pixel_std) <= 0:
            raise ValueError(f"an input of {in_channels} channels needs {in_channels} pixel_mean and pixel_std values "
                             f"(std > 0), one per channel; got pixel_mean={tuple(pixel_mean)}, "
                             f"pixel_std={tuple(pixel_std)}")
        self.backbone, self.fpn, self.rpn, self.roi_heads = backbone, fpn, rpn, roi_heads
        self.num_classes, self.num_keypoints = num_classes, num_keypoints
        self.input_format, self.pixel_scale, self.size_divisibility = input_format, pixel_scale, size_divisibility
        self.channels_last, self.in_channels = channels_last, in_channels
        # BGR reorders the visible channels only: the first three of a 3- or 4-channel input (RGB [+ thermal]).
        self.bgr = input_format == "BGR" and in_channels in (3, 4)
        if images_per_canvas < 0:
            raise ValueError(f"images_per_canvas must be >= 0 (0: the whole batch on one canvas), got {images_per_canvas}")
        self.images_per_canvas = images_per_canvas
        # Buffers so that they follow .to(device) and are saved with the model (they define its pixel convention).
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=True)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=True)
        # The label map the model carries: label k (1..num_classes) is dataset category category_ids[k - 1]. The
        # trainer sets it from the training set; evaluation maps predictions back through it.
        self.register_buffer("category_ids", torch.arange(1, num_classes + 1), persistent=True)

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        self._check_images(images)
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            self._check_targets(images, targets)
        n = self.images_per_canvas or len(images)
        if len(images) <= n:
            return self._forward_canvas(images, targets)
        # detectron2 pads each GPU's 2 images on a canvas of their own; a process holding more images does the same
        # for each group of n, so that padding (zeros in GroupNorm's statistics, easy negative anchors) stays what it
        # is at n images per canvas. The losses are the mean over the groups, weighted by their images, as
        # detectron2's gradient is the mean over its GPUs.
        starts = range(0, len(images), n)
        outputs = [self._forward_canvas(images[i:i + n], targets[i:i + n] if self.training else None) for i in starts]
        if not self.training:
            return [detection for output in outputs for detection in output]
        weights = [len(images[i:i + n]) / len(images) for i in starts]
        return {name: sum(w * output[name] for w, output in zip(weights, outputs)) for name in outputs[0]}

    def _forward_canvas(self, images: list[Tensor], targets: list[dict] | None):
        """The detector on images padded to one canvas: losses (training) or one detection dict per image."""
        batch, image_sizes = self.preprocess(images)
        if self.channels_last:  # NHWC activations: the layout oneDNN and tensor-core convolutions prefer
            batch = batch.contiguous(memory_format=torch.channels_last)
        c2_to_c5 = list(self.backbone(batch).values())  # res2..res5, strides 4..32
        features = self.fpn(c2_to_c5)  # P2..P6, strides 4..64
        proposals, rpn_losses = self.rpn(features, image_sizes, targets if self.training else None)
        # P6 only feeds the RPN (FPN Sec. 4.2): the RoI heads pool from P2..P5.
        detections, roi_losses = self.roi_heads(features[:4], proposals, image_sizes, targets if self.training else None)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return detections

    def preprocess(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Normalise each image and zero-pad the batch to a common size divisible by `size_divisibility`.

        Returns the (B, C, H, W) batch and the unpadded (h, w) of each image. Padding happens after normalisation
        (detectron2), so the pad value is 0 in normalised units.
        """
        image_sizes = [(img.shape[-2], img.shape[-1]) for img in images]
        d = self.size_divisibility
        height = -(-max(h for h, _ in image_sizes) // d) * d  # round up to a multiple of d
        width = -(-max(w for _, w in image_sizes) // d) * d
        batch = images[0].new_zeros(len(images), self.in_channels, height, width)
        for i, img in enumerate(images):
            if self.bgr:  # inputs are RGB
                img = img.flip(0) if self.in_channels == 3 else torch.cat((img[:3].flip(0), img[3:]))
            img = (img * self.pixel_scale - self.pixel_mean) / self.pixel_std
            batch[i, :, : img.shape[1], : img.shape[2]] = img
        return batch, image_sizes

    # ---- input validation: clear errors before any compute ------------------------------------------------------

    def _check_images(self, images) -> None:
        c = self.in_channels
        if isinstance(images, Tensor) or not isinstance(images, (list, tuple)) or len(images) == 0:
            raise ValueError(f"images must be a non-empty list of ({c}, H, W) float tensors")
        for i, img in enumerate(images):
            if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != c:
                shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
                raise ValueError(f"images[{i}] must be a ({c}, H, W) tensor (the model has {c} input channels), "
                                 f"got {shape}")
            if not img.is_floating_point():
                raise ValueError(f"images[{i}] must be a float tensor (RGB in [0, 1]), got {img.dtype}")
            if img.shape[1] == 0 or img.shape[2] == 0:
                raise ValueError(f"images[{i}] is empty: {tuple(img.shape)}")

    def _check_targets(self, images: list[Tensor], targets: list[dict]) -> None:
        if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
            raise ValueError(f"targets must be a list of {len(images)} dicts, one per image")
        for i, (img, t) in enumerate(zip(images, targets)):
            where = f"targets[{i}]"
            if not isinstance(t, dict) or "boxes" not in t or "labels" not in t:
                raise ValueError(f"{where} must be a dict with 'boxes' and 'labels'")
            boxes, labels = t["boxes"], t["labels"]
            if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
                raise ValueError(f"{where}['boxes'] must be a float (N, 4) tensor, got {_describe(boxes)}")
            n = boxes.shape[0]
            if not isinstance(labels, Tensor) or labels.shape != (n,) or labels.dtype != torch.int64:
                raise ValueError(f"{where}['labels'] must be an int64 ({n},) tensor, got {_describe(labels)}")
            if "masks" in t:
                masks = t["masks"]
                expected = (n, img.shape[1], img.shape[2])
                if not isinstance(masks, Tensor) or tuple(masks.shape) != expected:
                    raise ValueError(f"{where}['masks'] must have shape {expected} (N, H, W), got {_describe(masks)}")
            if "polygons" in t and len(t["polygons"]) != n:
                raise ValueError(f"{where}['polygons'] must hold one list of polygons per box ({n}), "
                                 f"got {len(t['polygons'])}")
            if "ignore_boxes" in t:
                regions = t["ignore_boxes"]
                if not isinstance(regions, Tensor) or regions.dim() != 2 or regions.shape[1] != 4:
                    raise ValueError(f"{where}['ignore_boxes'] must be an (I, 4) tensor, got {_describe(regions)}")
            if "keypoints" in t:
                kps = t["keypoints"]
                expected = (n, self.num_keypoints, 3)
                if not isinstance(kps, Tensor) or tuple(kps.shape) != expected or not kps.is_floating_point():
                    raise ValueError(f"{where}['keypoints'] must be a float {expected} tensor, got {_describe(kps)}")
        self._check_target_values(targets)

    def _check_target_values(self, targets: list[dict]) -> None:
        """Finite boxes of positive size and labels in 1..K: one host sync for the whole batch, and the details
        only when something is wrong."""
        boxes = torch.cat([t["boxes"] for t in targets])  # (G, 4)
        labels = torch.cat([t["labels"] for t in targets])  # (G,)
        bad = ~torch.isfinite(boxes).all(dim=1) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if not bool((bad | (labels < 1) | (labels > self.num_classes)).any()):
            return
        for i, t in enumerate(targets):
            boxes, labels, where = t["boxes"], t["labels"], f"targets[{i}]"
            if not torch.isfinite(boxes).all():
                raise ValueError(f"{where}['boxes'] contains NaN or Inf")
            if ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
                bad = torch.where((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))[0][0].item()
                raise ValueError(f"{where}['boxes'][{bad}] has zero or negative size: {boxes[bad].tolist()}")
            if ((labels < 1) | (labels > self.num_classes)).any():
                raise ValueError(
                    f"{where}['labels'] must lie in 1..{self.num_classes} (0 is background), got {labels.tolist()}"
                )


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
