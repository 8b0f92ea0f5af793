"""Drawing a model's detections on images: boxes, class labels and scores, alpha-blended instance masks, and
keypoint skeletons (the kind of figure in Mask R-CNN, He et al. 2017, Figs. 2, 5 and 7).

Pure pillow + numpy (no matplotlib). `draw_detections` draws one image's detections; `save_visualizations` runs a
model on items of a dataset and writes one PNG per item (the demo run and `visualize.py` use it).
"""
from __future__ import annotations

import colorsys
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from minimask.data.synthetic import SKELETON as _COCO_SKELETON_1_BASED

# COCO's person skeleton as pairs of 0-based keypoint indices (person_keypoints_*.json lists them 1-based).
COCO_SKELETON = tuple((a - 1, b - 1) for a, b in _COCO_SKELETON_1_BASED)
MASK_ALPHA = 0.5  # weight of the instance colour inside a mask
MASK_THRESHOLD = 0.5  # mask probabilities are binarised here (Mask R-CNN Sec. 3.1: "binarized at a threshold of 0.5")


def instance_colors(n: int) -> list[tuple[int, int, int]]:
    """`n` distinct, saturated RGB colours: hues stepped by the golden ratio, so that neighbours differ most."""
    colors = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((0.13 + i * 0.618034) % 1.0, 0.8, 0.95)
        colors.append((int(r * 255), int(g * 255), int(b * 255)))
    return colors


def to_uint8_hwc(image) -> np.ndarray:
    """A (C, H, W) tensor or array, float in [0, 1] or uint8, as a uint8 (H, W, 3) array; ValueError otherwise.
    C = 3 is RGB; of a multispectral input (`minimask.data.images.load_frames`) the visible frame is drawn (C = 4: the
    first three channels), or the thermal one in grey (C = 1)."""
    array = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    if array.ndim != 3 or array.shape[0] not in (1, 3, 4):
        raise ValueError(f"image must have shape (C, H, W) with C = 3 (RGB), 1 (thermal) or 4 (RGB + thermal), "
                         f"got {tuple(array.shape)}")
    array = array.repeat(3, axis=0) if array.shape[0] == 1 else array[:3]  # (3, H, W)
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array.transpose(1, 2, 0))
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"image must be float in [0, 1] or uint8, got {array.dtype}")
    return np.ascontiguousarray((np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0))


def _numpy(x, name: str) -> np.ndarray:
    if x is None:
        raise ValueError(f"detections[{name!r}] is missing")
    return x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float32)


def draw_detections(image, detections: dict, class_names=None, score_threshold: float = 0.5,
                    keypoint_skeleton=COCO_SKELETON, keypoint_threshold: float = 0.05) -> Image.Image:
    """Draw one image's detections and return a new RGB `PIL.Image` of the image's size.

    Args:
        image: (3, H, W) RGB, float in [0, 1] or uint8 (tensor or array); 1 or 4 channels as `to_uint8_hwc`.
        detections: `boxes` (N, 4) xyxy in the image's pixels, `labels` (N,) in 1..K, optionally `scores` (N,)
            (without them every instance is drawn), `masks` (N, H, W) or (N, 1, H, W) (float probabilities,
            binarised at 0.5; or integer / bool bitmaps, non-zero = inside), `keypoints` (N, P, 3) (x, y, v) and
            `keypoints_scores` (N, P). The model's eval output fits as it is.
        class_names: label k is drawn as class_names[k - 1]; None draws the label number.
        score_threshold: instances with a score below it are not drawn.
        keypoint_skeleton: pairs of 0-based keypoint indices joined by a line (COCO's by default); pairs that
            index past P are skipped.
        keypoint_threshold: a keypoint is drawn when v > 0 and its score (where given) is at least this.

    Instances are drawn in order of increasing score (the most confident on top): masks first, then boxes,
    skeletons and keypoints, then the label texts. No detection left after the threshold returns the image's
    pixels unchanged. ValueError names a field whose shape disagrees.
    """
    canvas = to_uint8_hwc(image)
    height, width = canvas.shape[:2]
    boxes, labels, scores, masks, keypoints, visible = _checked_fields(detections, height, width, keypoint_threshold)
    order = [i for i in np.argsort(scores, kind="stable") if scores[i] >= score_threshold]  # low scores first
    colors = instance_colors(len(order))
    if masks is not None:
        blended = canvas.astype(np.float32)
        for color, i in zip(colors, order):
            blended[masks[i]] = (1 - MASK_ALPHA) * blended[masks[i]] + MASK_ALPHA * np.array(color, np.float32)
        canvas = (blended + 0.5).astype(np.uint8)
    out = Image.fromarray(canvas, mode="RGB")
    if not order:
        return out

    draw = ImageDraw.Draw(out)
    line = max(1, round(min(height, width) / 200))  # thicker lines on bigger images
    radius = line + 1
    for color, i in zip(colors, order):
        x1, y1, x2, y2 = boxes[i].tolist()
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=color, width=line)  # x2 is exclusive
        if keypoints is None:
            continue
        points, seen = keypoints[i, :, :2], visible[i]
        for a, b in keypoint_skeleton:
            if a < len(seen) and b < len(seen) and seen[a] and seen[b]:
                draw.line([tuple(points[a]), tuple(points[b])], fill=color, width=line)
        for (x, y), shown in zip(points.tolist(), seen):
            if shown:
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color, outline=(255, 255, 255))
    font = ImageFont.load_default()
    for color, i in zip(colors, order):
        label = int(labels[i])
        name = class_names[label - 1] if class_names is not None and 1 <= label <= len(class_names) else str(label)
        text = f"{name} {scores[i]:.2f}" if "scores" in detections else name
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 2, bottom - top + 2
        x, y = float(boxes[i, 0]), float(boxes[i, 1]) - th  # above the box, or inside it at the top edge
        x, y = min(max(x, 0), max(width - tw, 0)), max(y, 0)
        draw.rectangle([x, y, x + tw, y + th], fill=color)
        draw.text((x + 1 - left, y + 1 - top), text, fill=(0, 0, 0), font=font)
    return out


def _checked_fields(detections: dict, height: int, width: int, keypoint_threshold: float) -> tuple:
    """(boxes, labels, scores, masks, keypoints, visible) of `detections` as numpy arrays (masks binarised, the
    last three None where absent); ValueError names a field whose shape disagrees."""
    boxes = _numpy(detections.get("boxes"), "boxes")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"detections['boxes'] must have shape (N, 4), got {boxes.shape}")
    n = boxes.shape[0]
    labels = _numpy(detections.get("labels"), "labels").astype(np.int64).reshape(-1)
    scores = detections.get("scores")
    scores = np.ones(n, np.float32) if scores is None else _numpy(scores, "scores").reshape(-1)
    if labels.shape[0] != n or scores.shape[0] != n:
        raise ValueError(f"detections have {n} boxes but {labels.shape[0]} labels and {scores.shape[0]} scores")
    masks = detections.get("masks")
    if masks is not None:
        masks = masks.detach().cpu().numpy() if torch.is_tensor(masks) else np.asarray(masks)
        if masks.ndim == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]  # the model's (N, 1, H, W)
        if masks.shape != (n, height, width):
            raise ValueError(f"detections['masks'] must have shape ({n}, {height}, {width}), got {masks.shape}")
        masks = masks > MASK_THRESHOLD if np.issubdtype(masks.dtype, np.floating) else masks != 0  # (N, H, W)
    keypoints = visible = detections.get("keypoints")
    if keypoints is not None:
        keypoints = _numpy(keypoints, "keypoints")
        if keypoints.ndim != 3 or keypoints.shape[0] != n or keypoints.shape[2] != 3:
            raise ValueError(f"detections['keypoints'] must have shape ({n}, P, 3), got {keypoints.shape}")
        visible = keypoints[:, :, 2] > 0  # (N, P)
        if detections.get("keypoints_scores") is not None:
            visible &= _numpy(detections["keypoints_scores"], "keypoints_scores").reshape(visible.shape) \
                >= keypoint_threshold
    return boxes, labels, scores, masks, keypoints, visible


def class_names_for(model, dataset=None) -> list[str] | None:
    """Names of the model's labels 1..K: through its `category_ids` label map to the dataset's category names
    (`dataset.category_ids` / `dataset.category_names`, as in `CocoDetection`); None without them."""
    names = getattr(dataset, "category_names", None)
    if names is None:
        return None
    ids = getattr(dataset, "category_ids", None)
    if ids is None or not hasattr(model, "category_ids"):
        return list(names)
    name_of = dict(zip(ids, names))
    return [name_of.get(int(c), str(int(c))) for c in model.category_ids.tolist()]


def _unwrap(dataset):
    """The dataset that holds the category names (IndexSubset wraps one in `.dataset`)."""
    while getattr(dataset, "category_names", None) is None and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset


@torch.no_grad()
def save_visualizations(model, dataset, indices, out_dir, *, device="cpu", score_threshold: float = 0.5,
                        class_names=None) -> list[str]:
    """Run `model` in eval mode on `dataset[i]` for i in `indices` and write one PNG per image to `out_dir`.

    `dataset[i]` returns (image (3, H, W) float in [0, 1], target dict); the file is named after the target's
    `image_id` where it has one (`<image_id>.png`), else `<i>.png`. Class names come from the dataset (see
    `class_names_for`) unless given. The model's train/eval mode is restored afterwards. Returns the paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if class_names is None:
        class_names = class_names_for(model, _unwrap(dataset))
    was_training = model.training
    model.eval()
    paths = []
    try:
        for i in indices:
            image, target = dataset[i]
            detections = model([image.to(device)])[0]
            name = target.get("image_id", i) if isinstance(target, dict) else i
            name = int(name) if torch.is_tensor(name) else name
            path = out_dir / f"{name}.png"
            draw_detections(image, detections, class_names, score_threshold).save(path)
            paths.append(os.fspath(path))
    finally:
        model.train(was_training)
    return paths
