"""Penn-Fudan pedestrians -> COCO instance JSON (one category, "person"), so `CocoDetection` and COCOeval read it.

The Penn-Fudan database (170 street photos, 423 pedestrians with pixel masks) is the small-target-set case that
motivates "Rethinking ImageNet Pre-training" (He, Girshick, Dollar 2019; Sec. 5 studies training from scratch with
little data). Its layout:

    PNGImages/<name>.png             RGB photos
    PedMasks/<name>_mask.png         one uint8 channel: 0 background, k = pedestrian k (1, 2, ...)
    Annotation/<name>.txt            PASCAL v1.00 boxes, 1-based inclusive; used only for cross-checking

Conversion (boxes and areas come from the masks, the text boxes are not used):
- segmentation = compressed RLE of `mask == k`, area = its pixel count, bbox = tight xywh box of the mask in COCO's
  continuous coordinates (x1 = min col, x2 = max col + 1), iscrowd = 0, category_id = 1;
- images are ordered by file name, image id = position + 1, annotation ids run over all images in that order, so
  ids agree between `all.json`, `train.json` and `val.json`;
- split (there is no official one; this is the common one): the LAST 50 images by name -> val, the rest -> train;
- `file_name` is relative to the original PNGImages/ folder, which is the image dir (nothing is copied).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

NUM_VAL = 50
CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"}]
_BOX_RE = re.compile(r"\(Xmin, Ymin\) - \(Xmax, Ymax\)\s*:\s*\((\d+),\s*(\d+)\)\s*-\s*\((\d+),\s*(\d+)\)")


@dataclass(frozen=True)
class PennFudanPaths:
    """Converted annotation files; `image_dir` (the original PNGImages/) resolves every JSON `file_name`."""

    image_dir: Path
    train_ann: Path
    val_ann: Path
    all_ann: Path


def read_pascal_boxes(txt_path) -> np.ndarray:
    """Boxes (N, 4) float64 xyxy of one Annotation/*.txt, converted from 1-based inclusive pixels to continuous ones.

    PASCAL's (Xmin, Ymin) - (Xmax, Ymax) covers pixels Xmin..Xmax counted from 1, i.e. [Xmin - 1, Xmax) in
    0-based continuous coordinates. Objects are in file order (object k <-> mask value k).
    """
    text = Path(txt_path).read_text(encoding="latin-1")
    boxes = [[int(a) - 1, int(b) - 1, int(c), int(d)] for a, b, c, d in _BOX_RE.findall(text)]
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)  # (N, 4)


def mask_instances(mask: np.ndarray) -> list[dict]:
    """COCO annotation bodies (no ids) for each non-zero value of an instance-label mask (H, W), in value order."""
    if mask.ndim != 2:
        raise ValueError(f"instance mask must be (H, W), got shape {mask.shape}")
    anns = []
    for k in np.unique(mask):
        if k == 0:
            continue
        m = mask == k  # (H, W)
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        x0, y0 = int(cols[0]), int(rows[0])
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        anns.append({
            "category_id": 1, "iscrowd": 0, "area": int(m.sum()),
            "bbox": [x0, y0, int(cols[-1]) + 1 - x0, int(rows[-1]) + 1 - y0],
            "segmentation": {"size": [int(m.shape[0]), int(m.shape[1])], "counts": rle["counts"].decode("ascii")},
        })
    return anns


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, path)


def convert_pennfudan(root, out_dir, *, num_val: int = NUM_VAL) -> PennFudanPaths:
    """Convert `root` (the PennFudanPed folder) into `out_dir`/{train,val,all}.json and return their paths.

    Raises FileNotFoundError when PNGImages/ or a mask is missing, ValueError when a mask's size differs from its
    image's or `num_val` does not leave at least one training image. Files are written atomically.
    """
    root, out_dir = Path(root), Path(out_dir)
    image_dir, mask_dir = root / "PNGImages", root / "PedMasks"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir} does not exist: is {root} the PennFudanPed folder?")
    names = sorted(p.name for p in image_dir.glob("*.png"))
    if not 0 <= num_val < len(names):
        raise ValueError(f"num_val={num_val} must be in [0, {len(names)}) for {len(names)} images in {image_dir}")

    images, annotations = [], []
    for index, name in enumerate(names):
        mask_path = mask_dir / f"{Path(name).stem}_mask.png"
        if not mask_path.is_file():
            raise FileNotFoundError(f"mask {mask_path} for image {name} is missing")
        with Image.open(image_dir / name) as img:  # header only: the size
            width, height = img.size
        with Image.open(mask_path) as m:
            mask = np.asarray(m)  # (H, W) uint8 instance labels ("L" or palette indices)
        if mask.shape != (height, width):
            raise ValueError(f"{mask_path} is {mask.shape[1]}x{mask.shape[0]} but {name} is {width}x{height}")
        image_id = index + 1
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        for ann in mask_instances(mask):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})

    def subset(image_list: list[dict], split: str) -> dict:
        ids = {im["id"] for im in image_list}
        return {"info": {"description": f"Penn-Fudan pedestrians ({split}), converted by minimask"},
                "licenses": [], "images": image_list,
                "annotations": [a for a in annotations if a["image_id"] in ids], "categories": CATEGORIES}

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = PennFudanPaths(image_dir, out_dir / "train.json", out_dir / "val.json", out_dir / "all.json")
    cut = len(images) - num_val
    _write_json(paths.train_ann, subset(images[:cut], "train"))
    _write_json(paths.val_ann, subset(images[cut:], "val"))
    _write_json(paths.all_ann, subset(images, "all"))
    return paths
