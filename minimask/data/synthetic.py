"""The built-in synthetic dataset: seeded shapes and stick-figure people, written to disk as a real COCO dataset.

It lets the whole pipeline (loading, training, COCO evaluation of boxes, masks and keypoints) run anywhere without
downloads. Layout (the standard COCO one, so `CocoDetection` and pycocotools read it unchanged):

    <root>/annotations/instances_{train,val}.json    COCO "instances" files; persons also carry keypoints
    <root>/{train,val}/NNNNNN.jpg                    RGB images (JPEG, quality 95, no chroma subsampling)

Generation spec (fixed difficulty; it is data, not a knob to tune against the model):
- images 192..320 px high and (independently) wide; background = linear colour gradient + low-frequency colour
  texture + 0..8 distractor lines + 0..5 translucent lumpy blobs; per-pixel Gaussian noise (sigma 4..16) on the
  final image, objects included;
- 1..10 objects per image, size log-uniform in 12..140 px, centres anywhere in the image (objects may leave it),
  random opaque colours (at least a little contrast to the background under the object's centre);
- classes: circle, square, triangle, star, ring and "person" (a thick-limbed frontal stick figure with the 17 COCO
  keypoints; the subject's left side is on the image's right, as for a person facing the camera);
- objects are painted in drawing order, so later ones occlude earlier ones. Following COCO, every annotation
  describes the *visible* object: mask = its painted pixels minus those covered later, bbox = tight box of that mask
  (xywh, continuous: x1 = min col, x2 = max col + 1), area = mask pixel count, iscrowd = 0. Instances with fewer
  than 20 visible pixels are dropped; an image is redrawn until it keeps at least one instance;
- keypoints are COCO integer pixel indices (x, y, v): v = 2 visible, v = 1 inside the image but covered by a later
  object, v = 0 with x = y = 0 outside the image; `num_keypoints` counts v > 0. Only person annotations carry
  keypoint fields, so pycocotools keypoint evaluation must set `params.catIds = [PERSON_CATEGORY_ID]`.

Every image is a pure function of (seed, split, index) through numpy's SeedSequence, so the dataset is byte-for-byte
reproducible and the val split (split code 1) never shares a random stream with train (split code 0).
"""
from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

VERSION = "synthetic-v1"
SHAPE_NAMES = ("circle", "square", "triangle", "star", "ring")
CATEGORY_NAMES = SHAPE_NAMES + ("person",)  # category id = position + 1
PERSON_CATEGORY_ID = len(CATEGORY_NAMES)
KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
)
# COCO's person skeleton (1-based keypoint indices), as in person_keypoints_*.json.
SKELETON = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9), (8, 10), (9, 11),
    (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)
IMAGE_SIDE_RANGE = (192, 320)  # inclusive, drawn independently for h and w
MAX_INSTANCES = 10
OBJECT_SIZE_RANGE = (12.0, 140.0)  # px, log-uniform
MIN_VISIBLE_AREA = 20  # px; smaller visible remnants are dropped
MARKER_NAME = "COMPLETE.json"


@dataclass(frozen=True)
class SyntheticPaths:
    """Where a built synthetic dataset lives; image dirs hold the files named by the JSON's `file_name`."""

    root: Path
    train_ann: Path
    train_images: Path
    val_ann: Path
    val_images: Path


def _paths(root: Path) -> SyntheticPaths:
    return SyntheticPaths(root, root / "annotations" / "instances_train.json", root / "train",
                          root / "annotations" / "instances_val.json", root / "val")


# ----------------------------------------------------------------------------------------------- rendering
def _background(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """Gradient + low-frequency texture, then distractor lines and translucent blobs (no annotations)."""
    angle = rng.uniform(0.0, 2.0 * math.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xs * math.cos(angle) + ys * math.sin(angle)  # (h, w)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    c0, c1 = rng.uniform(0.0, 255.0, size=(2, 3)).astype(np.float32)
    img = c0 + t[..., None] * (c1 - c0)  # (h, w, 3)
    gh, gw = rng.integers(2, 9, size=2)
    grid = (128.0 + rng.uniform(-1.0, 1.0, size=(gh, gw, 3)) * rng.uniform(10.0, 50.0)).astype(np.uint8)
    texture = np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), dtype=np.float32) - 128.0
    canvas = Image.fromarray(np.clip(img + texture, 0.0, 255.0).astype(np.uint8))

    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(0, 9)):
        x0, x1 = rng.uniform(-0.2 * w, 1.2 * w, size=2)
        y0, y1 = rng.uniform(-0.2 * h, 1.2 * h, size=2)
        draw.line([(x0, y0), (x1, y1)], fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
                  width=int(rng.integers(1, 4)))
    num_blobs = int(rng.integers(0, 6))
    if num_blobs:
        overlay = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        odraw = ImageDraw.Draw(overlay)
        for _ in range(num_blobs):
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            k = int(rng.integers(8, 15))
            radii = rng.uniform(5.0, 40.0) * rng.uniform(0.5, 1.0, size=k)  # lumpy, not a class shape
            angles = np.sort(rng.uniform(0.0, 2.0 * math.pi, size=k))
            pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, angles)]
            colour = tuple(int(c) for c in rng.integers(0, 256, 3)) + (int(rng.integers(60, 160)),)
            odraw.polygon(pts, fill=colour)
        canvas = Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")
    return canvas


def _regular_polygon(cx, cy, radius, n, rotation, inner_ratio=None):
    """Vertices of a regular n-gon (or an n-pointed star when inner_ratio is given)."""
    pts = []
    steps = 2 * n if inner_ratio is not None else n
    for i in range(steps):
        r = radius * (inner_ratio if inner_ratio is not None and i % 2 else 1.0)
        a = rotation + 2.0 * math.pi * i / steps
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, rng, name: str, cx: float, cy: float, size: float) -> None:
    """Paint one shape of extent ~`size` px with value 255 into an "L" layer."""
    r = size / 2.0
    rot = rng.uniform(0.0, 2.0 * math.pi)
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif name == "square":
        draw.polygon(_regular_polygon(cx, cy, r, 4, rot), fill=255)
    elif name == "triangle":
        draw.polygon(_regular_polygon(cx, cy, r, 3, rot), fill=255)
    elif name == "star":
        draw.polygon(_regular_polygon(cx, cy, r, 5, rot, inner_ratio=rng.uniform(0.38, 0.5)), fill=255)
    elif name == "ring":
        inner = min(r * rng.uniform(0.45, 0.7), r - 2.0)  # keep the band at least 2 px wide
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if inner > 0.5:
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    else:
        raise ValueError(f"unknown shape {name!r}")


def _person_keypoints(rng, cx: float, cy: float, height: float) -> np.ndarray:
    """Joint positions (17, 2) in continuous pixels of a frontal, roughly upright figure `height` px tall.

    Built in body units (height 1, y down, origin mid-body, the subject's left at +x), then jittered in width,
    rotated by at most 20 degrees and scaled, so the nose is always above the ankles.
    """
    r = 0.09  # head radius
    head = np.array([0.0, -0.5 + r])
    sh_y, hip_y = -0.5 + 2 * r + 0.06, rng.uniform(0.02, 0.08)
    sw, hw = rng.uniform(0.10, 0.14), rng.uniform(0.06, 0.09)
    kp = np.zeros((17, 2))
    kp[0] = head + (0.0, 0.3 * r)
    kp[1], kp[2] = head + (0.4 * r, -0.15 * r), head + (-0.4 * r, -0.15 * r)
    kp[3], kp[4] = head + (0.85 * r, 0.0), head + (-0.85 * r, 0.0)
    for side, j in ((1.0, 0), (-1.0, 1)):  # j = 0 left (image right), 1 right
        shoulder, hip = np.array([side * sw, sh_y]), np.array([side * hw, hip_y])
        a1 = rng.uniform(-0.35, 2.2)  # upper-arm angle from straight down, positive = outwards
        a2 = a1 + rng.uniform(-0.3, 1.6)
        elbow = shoulder + 0.17 * np.array([side * math.sin(a1), math.cos(a1)])
        wrist = elbow + 0.15 * np.array([side * math.sin(a2), math.cos(a2)])
        t1 = rng.uniform(-0.05, 0.45)
        t2 = t1 + rng.uniform(-0.4, 0.3)
        knee = hip + 0.23 * np.array([side * math.sin(t1), math.cos(t1)])
        ankle = knee + 0.22 * np.array([side * math.sin(t2), math.cos(t2)])
        kp[5 + j], kp[7 + j], kp[9 + j] = shoulder, elbow, wrist
        kp[11 + j], kp[13 + j], kp[15 + j] = hip, knee, ankle
    kp[:, 0] *= rng.uniform(0.85, 1.15)
    theta = rng.uniform(-0.35, 0.35)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return kp @ rot.T * height + (cx, cy)


def _draw_person(draw: ImageDraw.ImageDraw, kp: np.ndarray, height: float) -> None:
    """Paint the stick figure: head disc, torso quad, neck and limbs as thick lines with round joints."""
    lw = max(2.0, 0.06 * height)
    head_r = max(1.0, 0.09 * height)
    hc = (kp[3] + kp[4]) / 2.0  # ears sit on the head's horizontal diameter
    draw.ellipse([hc[0] - head_r, hc[1] - head_r, hc[0] + head_r, hc[1] + head_r], fill=255)
    draw.polygon([tuple(kp[i]) for i in (5, 6, 12, 11)], fill=255)
    neck = (kp[5] + kp[6]) / 2.0
    limbs = [(hc, neck)] + [(kp[a], kp[b]) for a, b in ((5, 7), (7, 9), (6, 8), (8, 10), (11, 13), (13, 15),
                                                        (12, 14), (14, 16), (5, 6), (11, 12))]
    for p, q in limbs:
        draw.line([tuple(p), tuple(q)], fill=255, width=int(round(lw)))
    for x, y in kp[5:]:
        draw.ellipse([x - lw / 2, y - lw / 2, x + lw / 2, y + lw / 2], fill=255)


def _random_colour(rng, under: tuple) -> tuple:
    """A random RGB colour with some contrast (L1 >= 90) to the background colour `under`, when one is found."""
    for _ in range(20):
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - np.asarray(under[:3])).sum() >= 90:
            break
    return tuple(int(c) for c in colour)


def render_image(rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """One synthetic image and its visible instances.

    Returns `image` (H, W, 3) uint8 and a list (drawing order) of dicts with `category_id` (1..6), `mask` (H, W)
    bool (visible pixels, >= MIN_VISIBLE_AREA of them) and, for persons, `keypoints` (17, 3) int64 COCO (x, y, v).
    At least one instance is kept: the image is redrawn from the same stream otherwise.
    """
    while True:
        h, w = (int(v) for v in rng.integers(IMAGE_SIDE_RANGE[0], IMAGE_SIDE_RANGE[1] + 1, size=2))
        canvas = _background(rng, h, w)
        owner = np.full((h, w), -1, dtype=np.int16)  # index of the object painted last at each pixel
        objects = []
        for i in range(int(rng.integers(1, MAX_INSTANCES + 1))):
            cat = int(rng.integers(1, len(CATEGORY_NAMES) + 1))
            size = math.exp(rng.uniform(*np.log(OBJECT_SIZE_RANGE)))
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            layer = Image.new("L", (w, h), 0)
            draw = ImageDraw.Draw(layer)
            kp = None
            if cat == PERSON_CATEGORY_ID:
                kp = np.floor(_person_keypoints(rng, cx, cy, size)).astype(np.int64)  # pixel indices (17, 2)
                _draw_person(draw, kp + 0.5, size)
                inside = (kp[:, 0] >= 0) & (kp[:, 0] < w) & (kp[:, 1] >= 0) & (kp[:, 1] < h)
                for x, y in kp[inside]:  # a labelled keypoint always lies on its own figure
                    layer.putpixel((int(x), int(y)), 255)
            else:
                _draw_shape(draw, rng, CATEGORY_NAMES[cat - 1], cx, cy, size)
            under = canvas.getpixel((min(int(cx), w - 1), min(int(cy), h - 1)))
            canvas.paste(_random_colour(rng, under), (0, 0, w, h), layer)
            owner[np.asarray(layer) > 0] = i
            objects.append((cat, kp))

        noise = rng.standard_normal((h, w, 3), dtype=np.float32) * rng.uniform(4.0, 16.0)
        image = np.clip(np.asarray(canvas, dtype=np.float32) + noise, 0.0, 255.0).astype(np.uint8)
        instances = []
        for i, (cat, kp) in enumerate(objects):
            visible = owner == i  # (h, w); occlusion by later objects removed
            if int(visible.sum()) < MIN_VISIBLE_AREA:
                continue
            inst = {"category_id": cat, "mask": visible}
            if kp is not None:
                inside = (kp[:, 0] >= 0) & (kp[:, 0] < w) & (kp[:, 1] >= 0) & (kp[:, 1] < h)
                kps = np.zeros((17, 3), dtype=np.int64)
                for j in np.flatnonzero(inside):
                    x, y = kp[j]
                    kps[j] = (x, y, 2 if owner[y, x] == i else 1)
                inst["keypoints"] = kps
            instances.append(inst)
        if instances:
            return image, instances


def _coco_annotation(inst: dict, ann_id: int, image_id: int) -> dict:
    """COCO record for one instance: compressed RLE, tight xywh box of the mask, pixel-count area."""
    mask = inst["mask"]
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    x0, y0 = int(cols[0]), int(rows[0])
    ann = {
        "id": ann_id, "image_id": image_id, "category_id": inst["category_id"], "iscrowd": 0,
        "area": int(mask.sum()),
        "bbox": [x0, y0, int(cols[-1]) + 1 - x0, int(rows[-1]) + 1 - y0],
        "segmentation": {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode("ascii")},
    }
    if "keypoints" in inst:
        kps = inst["keypoints"]
        ann["keypoints"] = [int(v) for v in kps.reshape(-1)]
        ann["num_keypoints"] = int((kps[:, 2] > 0).sum())
    return ann


def categories() -> list[dict]:
    """COCO category records; the person one carries the 17 keypoint names and COCO's skeleton."""
    cats = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPE_NAMES)]
    cats.append({"id": PERSON_CATEGORY_ID, "name": "person", "supercategory": "person",
                 "keypoints": list(KEYPOINT_NAMES), "skeleton": [list(s) for s in SKELETON]})
    return cats


# ---------------------------------------------------------------------------------------------- writing
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _render_to_file(image_dir: Path, split_code: int, seed: int, index: int) -> tuple[dict, list[dict]]:
    """Render image `index` of a split into image_dir (atomically); its image record and annotations (ids 0)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, split_code, index]))
    image, instances = render_image(rng)
    file_name = f"{index:06d}.jpg"
    tmp = image_dir / f".{file_name}.tmp{os.getpid()}"
    # JPEG like COCO: 7x faster to write and 4x smaller than PNG on noisy images; 4:4:4 keeps small objects'
    # colours crisp. The annotations come from the rendered masks, never from the decoded pixels.
    Image.fromarray(image).save(tmp, format="JPEG", quality=95, subsampling=0)
    os.replace(tmp, image_dir / file_name)
    image_id = index + 1
    record = {"id": image_id, "file_name": file_name, "height": image.shape[0], "width": image.shape[1]}
    return record, [_coco_annotation(inst, 0, image_id) for inst in instances]


def _write_split(root: Path, split: str, split_code: int, num_images: int, seed: int, workers: int = 1) -> Path:
    """Render `num_images` images of one split into <root>/<split>/ and write its JSON (atomically, last).

    With workers > 1 the images are rendered by that many processes; every image is a pure function of (seed,
    split, index) and the annotation ids are given here in index order, so the files are the same either way.
    """
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    render = functools.partial(_render_to_file, image_dir, split_code, seed)
    if workers > 1:
        # spawn, not fork: the parent may hold torch's thread pools, which a forked child must not inherit.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            rendered = list(pool.map(render, range(num_images), chunksize=32))
    else:
        rendered = [render(index) for index in range(num_images)]
    images, annotations = [], []
    for record, anns in rendered:
        images.append(record)
        for ann in anns:
            annotations.append({**ann, "id": len(annotations) + 1})
    dataset = {
        "info": {"description": f"minimask synthetic shapes + stick-figure persons ({split})", "version": VERSION,
                 "seed": seed, "split": split},
        "licenses": [], "images": images, "annotations": annotations, "categories": categories(),
    }
    ann_file = _paths(root).train_ann if split == "train" else _paths(root).val_ann
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(ann_file, json.dumps(dataset, separators=(",", ":")).encode("utf-8"))
    return ann_file


def _params(num_train: int, num_val: int, seed: int) -> dict:
    return {"version": VERSION, "num_train": int(num_train), "num_val": int(num_val), "seed": int(seed)}


def build_synthetic(root, *, num_train: int = 2000, num_val: int = 300, seed: int = 0,
                    workers: int = 1) -> SyntheticPaths:
    """Render the dataset into `root` unconditionally (see `synthetic_dataset` for the cached entry point), with
    `workers` processes (the files do not depend on it).

    Order of writes: the marker is removed first, then images (each atomically), then each split's JSON, and the
    completion marker `COMPLETE.json` (recording the parameters) last, so a crash never leaves a marked partial set.
    Images of an older, larger build are removed; nothing else in `root` is touched.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
    paths = _paths(Path(root))
    paths.root.mkdir(parents=True, exist_ok=True)
    (paths.root / MARKER_NAME).unlink(missing_ok=True)
    for d, count in ((paths.train_images, num_train), (paths.val_images, num_val)):
        # Remove only our own stale images (NNNNNN.jpg beyond the new count); never anything else in `root`.
        for p in d.glob("[0-9][0-9][0-9][0-9][0-9][0-9].jpg") if d.is_dir() else ():
            if int(p.stem) >= count:
                p.unlink()
    _write_split(paths.root, "train", 0, num_train, seed, workers)
    _write_split(paths.root, "val", 1, num_val, seed, workers)
    _atomic_write_bytes(paths.root / MARKER_NAME, json.dumps(_params(num_train, num_val, seed)).encode("utf-8"))
    return paths


def default_cache_dir() -> Path:
    """$MINIMASK_CACHE/synthetic-v1, else ~/.cache/minimask/synthetic-v1."""
    base = os.environ.get("MINIMASK_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "minimask") / VERSION


def is_built(root, *, num_train: int = 2000, num_val: int = 300, seed: int = 0) -> bool:
    """True when `root` holds a completed build with exactly these parameters."""
    marker = Path(root) / MARKER_NAME
    try:
        return json.loads(marker.read_text()) == _params(num_train, num_val, seed)
    except (OSError, ValueError):
        return False


def synthetic_dataset(root=None, *, num_train: int = 2000, num_val: int = 300, seed: int = 0) -> SyntheticPaths:
    """The synthetic dataset's paths, building it once into `root` (default: `default_cache_dir()`).

    Reuses the files when the completion marker exists and records the same parameters; otherwise (no marker: a
    partial or absent build; other parameters) rebuilds. Under torch.distributed, rank 0 builds while the other
    ranks wait at a barrier; a rank that still finds no marker afterwards (no shared file system) builds its own
    copy, which is byte-identical because generation is deterministic. (If rank 0 fails, the others wait at the
    barrier until the process group times out.)
    """
    root = Path(root) if root is not None else default_cache_dir()
    kwargs = dict(num_train=num_train, num_val=num_val, seed=seed)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    distributed = False
    try:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
    except ImportError:
        pass
    if distributed and dist.get_world_size() > 1:
        if dist.get_rank() == 0 and not is_built(root, **kwargs):
            build_synthetic(root, **kwargs, workers=cpus)
        dist.barrier()
    if not is_built(root, **kwargs):
        build_synthetic(root, **kwargs, workers=cpus)
    return _paths(root)
