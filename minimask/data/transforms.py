"""Joint image + target transforms: shortest-edge resize and horizontal flip (the paper's only augmentations).

"Rethinking ImageNet Pre-training" (He et al. 2019) trains with Detectron's data settings: the shorter side resized
to 800 px (longer side <= 1333) and a random horizontal flip, no other augmentation; its enhanced baselines draw the
training shorter side from [640, 800]. detectron2 (D2) implements this as
`ResizeShortestEdge` + `RandomFlip`; we follow its conventions:

- An image is a float tensor (C, H, W): 3 RGB channels, or the stacked frames of `minimask.data.images.load_frames`.
  A target is the dict of the data contract: `boxes` (N, 4) float xyxy in
  continuous pixel coordinates, `labels` (N,) int64, optionally `masks` (N, H, W) (uint8 {0, 1}, or float
  coverage in [0, 1] once resized) and `keypoints` (N, K, 3) float (x, y, visibility) in continuous pixel
  coordinates (the dataset adds +0.5 to COCO's integer pixel indices; `export_keypoints` undoes it for results
  files), plus `image_id` and `orig_size`, which pass through untouched.
- `polygons` (a list with one entry per instance: a list of flat float64 arrays [x0, y0, x1, y1, ...] in continuous
  pixel coordinates, COCO's polygons) may stand in for `masks`; they are scaled and flipped exactly like the boxes and
  rasterised only inside each RoI by the mask head, never at image size.
- Continuous coordinates make every geometric map exact: a resize scales x by W'/W and y by H'/H, and a flip maps
  x -> W - x. Keypoints that end up outside [0, W] x [0, H] get visibility 0 (D2 `transform_keypoint_annotations`).
- The image is resized with bilinear interpolation, `align_corners=False` (pixel centres at +0.5, consistent with
  the continuous coordinates) and `antialias=False`. D2 resizes uint8 images with PIL's BILINEAR, which antialiases
  when downscaling, so downscaled images are slightly sharper here than in D2; upscaling (the common case for COCO,
  ~640 -> 800) is the same filter up to uint8 rounding.
- Masks are resized as coverage: bilinear with antialiasing (same pixel-centre convention as the image), giving
  float16 values in [0, 1], the fraction of each output pixel the object covers. The mask targets (RoIAlign of these,
  then >= 0.5, `minimask.model.mask_head.mask_targets`) then stay close to the true masks when the image is shrunk: on the
  synthetic set at 0.55x, the 28 x 28 targets of persons overlap those of the original masks with IoU 0.89 against
  0.81 for a binary nearest-neighbour resize (ring 0.97 against 0.91). D2 resizes bitmask annotations with nearest
  neighbour (its polygon annotations are rasterised in the box and do not depend on the image scale at all).

Randomness (the scale draw, the flip coin) comes from torch's global CPU RNG, so seeding it per sample
(`minimask.data.samplers.SeededDataset`) makes augmentation reproducible regardless of DataLoader workers.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

COCO_KEYPOINT_NAMES = (
    "nose",
    "left_eye", "right_eye",
    "left_ear", "right_ear",
    "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow",
    "left_wrist", "right_wrist",
    "left_hip", "right_hip",
    "left_knee", "right_knee",
    "left_ankle", "right_ankle",
)  # COCO person keypoint order (person_keypoints_*.json "keypoints")

# Index pairs swapped by a horizontal flip: a mirrored left eye is where a right eye would be (D2 KEYPOINT_FLIP_MAP).
COCO_FLIP_MAP = tuple((i, i + 1) for i in range(1, len(COCO_KEYPOINT_NAMES), 2))


def _check_image(image):
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a float tensor (C, H, W), got "
                         f"{getattr(image, 'dtype', type(image))} of shape {tuple(getattr(image, 'shape', ()))}")


def _check_target(target, height: int, width: int):
    """Shape checks at the public boundary (no data-dependent checks: they would sync a GPU)."""
    if target is None:
        return
    if not isinstance(target, dict):
        raise ValueError(f"target must be a dict or None, got {type(target)}")
    boxes = target.get("boxes")
    if boxes is not None and (boxes.dim() != 2 or boxes.shape[-1] != 4):
        raise ValueError(f"target['boxes'] must be (N, 4), got {tuple(boxes.shape)}")
    masks = target.get("masks")
    if masks is not None and (masks.dim() != 3 or tuple(masks.shape[1:]) != (height, width)):
        raise ValueError(f"target['masks'] must be (N, {height}, {width}) to match the image, got {tuple(masks.shape)}")
    keypoints = target.get("keypoints")
    if keypoints is not None and (keypoints.dim() != 3 or keypoints.shape[-1] != 3):
        raise ValueError(f"target['keypoints'] must be (N, K, 3), got {tuple(keypoints.shape)}")
    n = {name: len(target[name]) for name in ("boxes", "labels", "masks", "keypoints", "polygons") if name in target}
    if len(set(n.values())) > 1:
        raise ValueError(f"target entries have different numbers of instances: {n}")


def _invisible_outside(keypoints, height: int, width: int):
    """Set v = 0 for points outside [0, W] x [0, H] (inclusive; D2 `transform_keypoint_annotations`)."""
    x, y = keypoints[..., 0], keypoints[..., 1]  # (N, K)
    inside = (x >= 0) & (x <= width) & (y >= 0) & (y <= height)  # (N, K)
    keypoints[..., 2] = torch.where(inside, keypoints[..., 2], torch.zeros_like(keypoints[..., 2]))
    return keypoints


def shortest_edge_size(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """Output (h, w) for scaling the shorter side to `short_edge` with the longer side capped at `max_size`.

    D2 `ResizeShortestEdge.get_output_shape`: one scale for both axes, the cap rescales both sides, and each side is
    rounded with int(x + 0.5) at the end (so the aspect ratio is kept up to rounding), and at least 1 px (an
    extreme aspect ratio could round a side to 0).
    """
    if height <= 0 or width <= 0 or short_edge <= 0 or max_size <= 0:
        raise ValueError(f"sizes must be positive, got height={height} width={width} short_edge={short_edge} "
                         f"max_size={max_size}")
    scale = short_edge / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > max_size:
        cap = max_size / max(new_h, new_w)
        new_h, new_w = new_h * cap, new_w * cap
    return max(int(new_h + 0.5), 1), max(int(new_w + 0.5), 1)


def resize(image, target, size_hw):
    """Resize an image (C, H, W) and its target to `size_hw` = (H', W').

    Image: bilinear, align_corners=False, antialias=False. Boxes (and `ignore_boxes`), polygons and keypoint x, y
    are scaled per axis
    (W'/W, H'/H); keypoints that land outside the image get v = 0. Masks (N, H, W) -> (N, H', W') float16 coverage in [0, 1]
    (bilinear, antialiased when shrinking; see the module docstring).
    Other target keys pass through. The input target is not modified; `target` may be None. Works with N = 0.
    """
    _check_image(image)
    height, width = image.shape[-2:]
    _check_target(target, height, width)
    new_h, new_w = int(size_hw[0]), int(size_hw[1])
    if new_h <= 0 or new_w <= 0:
        raise ValueError(f"size_hw must be positive, got {tuple(size_hw)}")
    if (new_h, new_w) == (height, width):
        return image, (None if target is None else dict(target))
    batch = image[None]  # (1, C, H, W)
    if image.device.type == "cpu":  # PyTorch's channels-last CPU kernel is vectorised: same values, ~2x faster
        batch = batch.contiguous(memory_format=torch.channels_last)
    image = F.interpolate(batch, size=(new_h, new_w), mode="bilinear", align_corners=False,
                          antialias=False)[0].contiguous()  # (C, H', W')
    if target is None:
        return image, None
    target = dict(target)
    sx, sy = new_w / width, new_h / height
    for key in ("boxes", "ignore_boxes"):
        if key in target:
            target[key] = target[key] * target[key].new_tensor([sx, sy, sx, sy])  # (N, 4)
    if "masks" in target:
        masks = target["masks"]
        if masks.shape[0] == 0:  # interpolate rejects empty batches
            target["masks"] = masks.new_zeros((0, new_h, new_w), dtype=torch.float16)
        else:
            shrink = new_h < height or new_w < width  # antialiasing changes nothing when enlarging, at 3x the cost
            coverage = F.interpolate(masks[None].float(), size=(new_h, new_w), mode="bilinear", align_corners=False,
                                     antialias=shrink)[0]  # (N, H', W')
            target["masks"] = coverage.clamp_(0, 1).to(torch.float16)  # half the memory; 1/2048 steps suffice
    if "polygons" in target:
        target["polygons"] = _map_polygons(target["polygons"], lambda xs: xs * sx, lambda ys: ys * sy)
    if "keypoints" in target:
        keypoints = target["keypoints"] * target["keypoints"].new_tensor([sx, sy, 1.0])  # (N, K, 3)
        target["keypoints"] = _invisible_outside(keypoints, new_h, new_w)
    return image, target


def _map_polygons(polygons: list, fx, fy) -> list:
    """New polygons with fx applied to every x coordinate and fy to every y (flat [x0, y0, x1, y1, ...] arrays)."""
    mapped = []
    for object_polygons in polygons:
        mapped.append([])
        for p in object_polygons:
            q = np.array(p, dtype=np.float64)  # a copy: the input target is not modified
            q[0::2], q[1::2] = fx(q[0::2]), fy(q[1::2])
            mapped[-1].append(q)
    return mapped


def flip_permutation(flip_map, num_keypoints: int) -> list[int]:
    """`flip_map` as a permutation: new keypoint j = old keypoint perm[j].

    Accepts index pairs ((1, 2), (3, 4), ...) or a permutation list of length K. None means no swap.
    """
    if flip_map is None:
        return list(range(num_keypoints))
    flip_map = list(flip_map)
    if all(isinstance(i, int) for i in flip_map):
        perm = flip_map
        if sorted(perm) != list(range(num_keypoints)):
            raise ValueError(f"flip_map as a list must be a permutation of range({num_keypoints}), got {perm}")
        return perm
    perm = list(range(num_keypoints))
    for pair in flip_map:
        if len(pair) != 2 or not all(0 <= int(i) < num_keypoints for i in pair):
            raise ValueError(f"flip_map pair {pair} is not two keypoint indices in [0, {num_keypoints})")
        a, b = int(pair[0]), int(pair[1])
        perm[a], perm[b] = b, a
    return perm


def hflip(image, target, flip_map=COCO_FLIP_MAP):
    """Flip an image (C, H, W) and its target horizontally.

    Boxes (and `ignore_boxes`): x -> W - x, so (x1, y1, x2, y2) -> (W - x2, y1, W - x1, y2). Masks are flipped
    along W, polygons'
    x -> W - x. Keypoints: x -> W - x
    and left/right labels swapped by `flip_map` (pairs or a permutation, see `flip_permutation`); each point keeps its
    visibility through the swap; points outside the image get v = 0. Flipping twice is the identity.
    The input target is not modified; `target` may be None. Works with N = 0.
    """
    _check_image(image)
    height, width = image.shape[-2:]
    _check_target(target, height, width)
    image = image.flip(-1)  # (C, H, W)
    if target is None:
        return image, None
    target = dict(target)
    for key in ("boxes", "ignore_boxes"):
        if key in target:
            x1, y1, x2, y2 = target[key].unbind(-1)
            target[key] = torch.stack([width - x2, y1, width - x1, y2], dim=-1)  # (N, 4)
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)  # (N, H, W)
    if "polygons" in target:
        target["polygons"] = _map_polygons(target["polygons"], lambda xs: width - xs, lambda ys: ys)
    if "keypoints" in target:
        keypoints = target["keypoints"]
        perm = flip_permutation(flip_map, keypoints.shape[1])
        keypoints = keypoints[:, perm]  # (N, K, 3) new point j <- old point perm[j], visibility included
        keypoints = torch.cat([width - keypoints[..., :1], keypoints[..., 1:]], dim=-1)  # (N, K, 3)
        target["keypoints"] = _invisible_outside(keypoints, height, width)
    return image, target


def export_keypoints(keypoints):
    """Keypoints (..., 3) in continuous coordinates -> COCO convention (x - 0.5, y - 0.5, v) for results files.

    The dataset adds +0.5 on load (COCO stores integer pixel indices; D2 `data/datasets/coco.py`); this undoes it.
    """
    if keypoints.shape[-1] != 3:
        raise ValueError(f"keypoints must be (..., 3), got {tuple(keypoints.shape)}")
    return keypoints - keypoints.new_tensor([0.5, 0.5, 0.0])


class Resize:
    """Shorter side to a size drawn uniformly from `min_sizes`, longer side capped at `max_size` (D2
    `ResizeShortestEdge`, sample_style "choice"). (800,) is the paper's baseline; its scale augmentation is
    (640, 672, ..., 800). The draw uses torch's global RNG (one draw per call, even for a single size)."""

    def __init__(self, min_sizes=(800,), max_size: int = 1333):
        min_sizes = (min_sizes,) if isinstance(min_sizes, int) else tuple(int(s) for s in min_sizes)
        if not min_sizes or min(min_sizes) <= 0 or max_size <= 0:
            raise ValueError(f"min_sizes must be a non-empty tuple of positive ints and max_size positive, got "
                             f"{min_sizes}, {max_size}")
        self.min_sizes, self.max_size = min_sizes, int(max_size)

    def __call__(self, image, target):
        _check_image(image)
        short_edge = self.min_sizes[int(torch.randint(len(self.min_sizes), ()))]
        size_hw = shortest_edge_size(image.shape[-2], image.shape[-1], short_edge, self.max_size)
        return resize(image, target, size_hw)

    def __repr__(self):
        return f"Resize(min_sizes={self.min_sizes}, max_size={self.max_size})"


class RandomHorizontalFlip:
    """Flip with probability p (coin from torch's global RNG, drawn on every call)."""

    def __init__(self, p: float = 0.5, flip_map=COCO_FLIP_MAP):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p, self.flip_map = p, flip_map

    def __call__(self, image, target):
        if float(torch.rand(())) < self.p:
            return hflip(image, target, self.flip_map)
        return image, target

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """Apply transforms `(image, target) -> (image, target)` in order."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self):
        return "Compose([" + ", ".join(repr(t) for t in self.transforms) + "])"


def build_transforms(*, min_sizes, max_size: int, flip: bool, train: bool, flip_map=COCO_FLIP_MAP):
    """The train or test pipeline from the config's input fields.

    train=True:  Resize(min_sizes, max_size) then, if `flip`, RandomHorizontalFlip(0.5)
                 (cfg.input.min_size_train, max_size_train, horizontal_flip).
    train=False: Resize((min_size,), max_size) and never a flip (cfg.input.min_size_test, max_size_test); `min_sizes`
                 must be one size (an int or a 1-tuple) so testing is deterministic; `flip` is ignored.
    """
    min_sizes = (min_sizes,) if isinstance(min_sizes, int) else tuple(min_sizes)
    if not train:
        if len(min_sizes) != 1:
            raise ValueError(f"the test transform takes one min size, got {min_sizes}")
        return Compose([Resize(min_sizes, max_size)])
    transforms = [Resize(min_sizes, max_size)]
    if flip:
        transforms.append(RandomHorizontalFlip(0.5, flip_map=flip_map))
    return Compose(transforms)
