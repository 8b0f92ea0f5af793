"""COCO-format instance datasets (boxes, masks, keypoints) read with pycocotools; images decoded with pillow.

Implements the data side of "Rethinking ImageNet Pre-training" (He, Girshick, Dollar 2019), Sec. 4 (COCO
experiments: Mask R-CNN on train2017, evaluated on val2017; keypoints in Sec. 4.5), following detectron2's
loading conventions (`data/datasets/coco.py`, `data/detection_utils.py`):

- Images are decoded by `minimask.data.images` (`load_image`, and `load_frames` for the aligned visible and
  thermal frames of `input.modalities`); a bad file raises `ImageLoadError` naming it.
- `CocoDetection`: the annotation file is validated up front (ValueError naming the file and the record), then
  indexed with pycocotools. All filtering is decided at construction from the JSON alone (no image decoding):
  crowd annotations (`iscrowd=1`) never reach targets (COCOeval reads them from the JSON itself); boxes are
  converted xywh -> xyxy, clipped to the image, and dropped when empty; non-crowd instances without a usable
  segmentation (in files with segmentations) are dropped. In keypoint files, persons without any labelled keypoint
  stay box and mask targets (only the keypoint loss skips them, detectron2 `select_proposals_with_visible_keypoints`);
  for training, images with fewer than `min_keypoints_per_image` visible keypoints in all are left out (detectron2
  `filter_images_with_few_keypoints`, MIN_KEYPOINTS_PER_IMAGE = 1). The counts are in `dataset.stats` and logged
  once on logger "minimask.data".
- Masks: where every instance of an image is given as polygons (COCO's usual form) and `mask_format="polygon"`
  (detectron2's INPUT.MASK_FORMAT default), the target carries the `polygons` themselves and no bitmap is
  decoded: the mask head rasterises them inside each RoI (`minimask.model.mask_head.polygon_mask_targets`). RLE
  instances, an image that mixes RLE with polygons, and `mask_format="bitmask"` give full-image bitmaps (`masks`)
  for all its instances.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import shlex
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from minimask.data.images import MODALITIES, ImageLoadError, check_modalities, load_frames

logger = logging.getLogger("minimask.data")

def write_json(path, data) -> None:
    """Write `data` as compact JSON to `path` through a temporary file and os.replace, so that readers never see
    half a file (the converters' annotation files and markers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def split_paths(root, split: str, keypoints: bool = False) -> tuple[Path, Path]:
    """(annotation file, image folder) of `split` in a COCO-layout root: annotations/instances_<split>.json (or
    person_keypoints_<split>.json) and <split>/. Existence is not checked."""
    kind = "person_keypoints" if keypoints else "instances"
    return Path(root) / "annotations" / f"{kind}_{split}.json", Path(root) / split


DATA_PAIR = re.compile(r"^(train|val)=")  # a `--data` pair: split=ANN.json:IMAGES


def dataset_splits(spec: str, keypoints: bool = False) -> dict[str, tuple[Path, Path]]:
    """{"train": (ann, images), "val": (ann, images)} for a dataset given on the command line (`--data`).

    `spec` is "synthetic" (the built-in set, rendered into the cache on first use), "synthetic_kaist" (a generated
    miniature of KAIST's visible + thermal frames, `minimask.data.synthetic_kaist`), "pennfudan" (Penn-Fudan's 170
    pedestrian photos, downloaded into the cache on first use and split 120 / 50), a COCO 2017 root
    (annotations/ + train2017/ + val2017/), a root in the synthetic set's layout (annotations/ + train/ + val/), or
    annotation-file / image-folder pairs `train=ANN.json:IMAGES val=ANN.json:IMAGES` (shell-quoted where a path has
    a space; either split may be left out, and then has no entry). ValueError names what is missing. A root's
    val files are not checked here; pairs are checked whole (`data_pairs`).
    """
    if is_data_pairs(spec):
        return data_pairs(spec)
    if spec == "synthetic":
        from minimask.data.synthetic import synthetic_dataset  # renders ~30 s on first use

        paths = synthetic_dataset()
        return dict(train=(paths.train_ann, paths.train_images), val=(paths.val_ann, paths.val_images))
    if spec == "synthetic_kaist":
        from minimask.data.synthetic_kaist import synthetic_kaist_splits  # renders ~20 s on first use

        return synthetic_kaist_splits()
    if spec == "pennfudan":
        from minimask.data.pennfudan import pennfudan_dataset  # downloads ~50 MB on first use

        paths = pennfudan_dataset()
        return dict(train=(paths.train_ann, paths.image_dir), val=(paths.val_ann, paths.image_dir))
    root = Path(spec)
    if not root.is_dir():
        raise ValueError(f"--data: no such dataset folder: {spec}")
    for train, val in (("train2017", "val2017"), ("train", "val")):
        if split_paths(root, train, keypoints)[0].is_file() or split_paths(root, val, keypoints)[0].is_file():
            return dict(train=split_paths(root, train, keypoints), val=split_paths(root, val, keypoints))
    kind = "person_keypoints" if keypoints else "instances"
    raise ValueError(f"--data: {spec} holds neither annotations/{kind}_train2017.json nor {kind}_train.json "
                     f"(nor the val files)")


def split_files(spec: str, split: str | None = None, keypoints: bool = False) -> tuple[Path, Path]:
    """(annotation file, image folder) of one split of a `--data` spec, for the scripts that read one split: "val"
    (the default) and "train" through `dataset_splits` (a COCO root's val2017 / train2017), another name (a COCO
    root's "val2014", say) through `split_paths`. ValueError naming what is missing; existence of a root's files
    is not checked here."""
    if split in (None, "train", "val"):
        name, splits = split or "val", dataset_splits(spec, keypoints)
        if name not in splits:
            raise ValueError(f"--data: no {name} split among the pairs (give {name}=ANN.json:IMAGES)")
        return splits[name]
    if is_data_pairs(spec) or spec in ("synthetic", "synthetic_kaist", "pennfudan"):
        raise ValueError(f"--split: {spec} has the splits train and val, not {split!r}")
    return split_paths(spec, split, keypoints)


def is_data_pairs(spec: str) -> bool:
    """Whether a `--data` spec is split=ANN.json:IMAGES pairs (shell-quoted) rather than a name or a root."""
    try:
        tokens = shlex.split(spec)
    except ValueError:  # an unbalanced quote: not pairs that `cli.data_spec` joined
        return False
    return bool(tokens) and DATA_PAIR.match(tokens[0]) is not None


def data_pairs(spec: str) -> dict[str, tuple[Path, Path]]:
    """{split: (annotation file, image folder)} from `split=ANN.json:IMAGES` pairs (split train or val; the last
    colon separates the two paths), each checked to exist; ValueError naming the pair and the missing path."""
    splits = {}
    for token in shlex.split(spec):
        name, _, pair = token.partition("=")
        ann, colon, images = pair.rpartition(":")
        if not DATA_PAIR.match(token) or not colon or not ann or not images:
            raise ValueError(f"--data: expected train=ANN.json:IMAGES or val=ANN.json:IMAGES, got {token!r}")
        if name in splits:
            raise ValueError(f"--data: the {name} split is given twice")
        if not Path(ann).is_file():
            raise ValueError(f"--data {name}: no such annotation file: {ann}")
        if not Path(images).is_dir():
            raise ValueError(f"--data {name}: no such image folder: {images}")
        splits[name] = (Path(ann), Path(images))
    return splits


def check_image_files(dataset: CocoDetection, *, sample: int = 100) -> None:
    """ValueError when the image folder does not hold the annotation file's images: none of the first image and up
    to `sample` others spread over the set exists (a wrong folder misses them all; a stat per image of a 118k-image
    set would be slow on network file systems). A few missing images are left to loading, which names each one
    (or skips it with `skip_bad_images`)."""
    n = len(dataset)
    picks = sorted({0, *(i * n // sample for i in range(sample))}) if n else []
    missing = [dataset.image_path(i) for i in picks if not os.path.isfile(dataset.image_path(i))]
    if picks and len(missing) == len(picks):
        raise ValueError(f"{dataset.image_dir} does not hold the images of {dataset.ann_file}: none of the "
                         f"{len(picks)} checked is there, e.g. {missing[0]}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _segmentation_error(segm, h: int, w: int) -> str | None:
    """Why `segm` is not a polygon list / RLE dict for an h x w image, or None when it is well formed."""
    if isinstance(segm, list):
        if all(isinstance(p, list) and len(p) % 2 == 0 for p in segm):
            return None
        return "'segmentation' polygons must be lists of an even number of coordinates"
    if isinstance(segm, dict):
        counts, size = segm.get("counts"), segm.get("size")
        if not (isinstance(size, list) and size == [h, w]):
            return f"RLE 'size' {size!r} is not the image's [height, width] = [{h}, {w}]"
        if isinstance(counts, str):
            return None  # compressed RLE
        if isinstance(counts, list) and all(_is_int(c) and c >= 0 for c in counts) and sum(counts) == h * w:
            return None  # uncompressed RLE
        return "RLE 'counts' must be a string or a list of non-negative ints summing to height * width"
    return f"'segmentation' must be a list of polygons or an RLE dict, got {type(segm).__name__}"


def _validate(data, ann_file: str) -> None:
    """Raise ValueError naming `ann_file` and the offending record unless `data` is a well-formed COCO dict."""
    if not isinstance(data, dict):
        raise ValueError(f"{ann_file}: top level must be a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{ann_file}: top-level key {key!r} missing or not a list")

    def check(kind, i, rec, fields):  # fields: (key, predicate, description)
        if not isinstance(rec, dict):
            raise ValueError(f"{ann_file}: {kind} #{i}: record must be a JSON object, got {rec!r}")
        for key, ok, what in fields:
            if key not in rec:
                raise ValueError(f"{ann_file}: {kind} #{i} (id={rec.get('id')!r}): missing key {key!r}")
            if not ok(rec[key]):
                raise ValueError(f"{ann_file}: {kind} #{i} (id={rec.get('id')!r}): {key!r} must be {what}, "
                                 f"got {rec[key]!r}")

    def positive(v):
        return _is_int(v) and v > 0

    images, categories, ann_ids = {}, {}, set()
    for i, img in enumerate(data["images"]):
        check("image", i, img, [("id", _is_int, "an int"),
                                ("file_name", lambda v: isinstance(v, str) and v != "", "a non-empty string"),
                                ("height", positive, "a positive int"), ("width", positive, "a positive int")])
        if img["id"] in images:
            raise ValueError(f"{ann_file}: image #{i} (id={img['id']}): duplicate image id")
        images[img["id"]] = img
    for i, cat in enumerate(data["categories"]):
        check("category", i, cat, [("id", _is_int, "an int"), ("name", lambda v: isinstance(v, str), "a string")])
        names = cat.get("keypoints", [])
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ValueError(f"{ann_file}: category #{i} (id={cat['id']}): 'keypoints' must be a list of names")
        if cat["id"] in categories:
            raise ValueError(f"{ann_file}: category #{i} (id={cat['id']}): duplicate category id")
        categories[cat["id"]] = cat
    for i, ann in enumerate(data["annotations"]):
        check("annotation", i, ann, [
            ("id", _is_int, "an int"), ("image_id", _is_int, "an int"), ("category_id", _is_int, "an int"),
            ("bbox", lambda v: isinstance(v, list) and len(v) == 4 and all(map(_is_num, v)),
             "a list of 4 finite numbers [x, y, w, h]"),
            ("iscrowd", lambda v: _is_int(v) and v in (0, 1), "0 or 1")])
        where = f"{ann_file}: annotation #{i} (id={ann['id']})"
        if ann["id"] in ann_ids:
            raise ValueError(f"{where}: duplicate annotation id")
        ann_ids.add(ann["id"])
        if ann["image_id"] not in images:
            raise ValueError(f"{where}: image_id {ann['image_id']} is not in 'images'")
        if ann["category_id"] not in categories:
            raise ValueError(f"{where}: category_id {ann['category_id']} is not in 'categories'")
        img = images[ann["image_id"]]
        if "segmentation" in ann:
            error = _segmentation_error(ann["segmentation"], img["height"], img["width"])
            if error:
                raise ValueError(f"{where}: {error}")
        num_kp = len(categories[ann["category_id"]].get("keypoints", []))
        kp = ann.get("keypoints")
        if kp is not None and num_kp and not (isinstance(kp, list) and len(kp) == 3 * num_kp
                                               and all(map(_is_num, kp))):
            raise ValueError(f"{where}: 'keypoints' must be a list of {3 * num_kp} numbers (x, y, v) * {num_kp}")


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format instance dataset: `dataset[i] -> (image, target)`.

    image: float32 (3, H, W) RGB in [0, 1] (see `load_image`). target: `boxes` (N, 4) float32 xyxy in
    continuous pixels, `labels` (N,) int64 in 1..K, and when the file has segmentations either `polygons` (a list
    of N lists of flat float64 arrays [x0, y0, x1, y1, ...] in continuous pixels, one per polygon of the object) or
    `masks` (N, H, W) uint8 (see the module docstring for which); `keypoints` (N, K_kp, 3) float32
    (x + 0.5, y + 0.5, v) in keypoint mode, `image_id` int, `orig_size` (H0, W0) of the decoded image; then
    `image, target = transforms(image, target)` when given. N may be 0.

    Labels: category ids sorted ascending map to 1..K; `category_ids[k - 1]` is the id of label k.
    filter_empty: drop images with no usable (non-crowd, non-degenerate, ...) instance; False keeps them.
    keypoints: None = auto (True when a category lists keypoint names). In keypoint mode every instance carries
        (K_kp, 3) keypoints; those with none labelled (all v == 0, like other categories' instances) still train the
        box and mask heads, and the keypoint head skips them.
    min_keypoints_per_image: in keypoint mode, leave out images whose instances have fewer visible (v > 0)
        keypoints than this in all (detectron2 MIN_KEYPOINTS_PER_IMAGE: 1 for training; 0 keeps every image).
    mask_format: "polygon" passes polygons where an image's instances all have them; "bitmask" always decodes.
    skip_bad_images: False -> a missing/corrupt image raises ImageLoadError naming it. True -> `dataset[i]`
        returns the next loadable sample (i+1, i+2, ..., wrapping) with that sample's own target and adds 1 to
        `stats["skipped_images"]` per bad file met; inside DataLoader workers each worker holds its own copy, so
        the count is per worker (and lost with the worker).
    modalities: the aligned frames stacked into the image, visible (3 channels, `file_name`) and / or thermal (1,
        `lwir_file_name`): `load_frames`. The image is then (C, H, W).
    ignore_regions: crowd annotations (`iscrowd=1`) become `ignore_boxes` (I, 4) float32 xyxy in every target,
        regions whose anchors and proposals are neither positive nor negative (`model.ignore_iof_thr`); False
        (detectron2) drops them like other unusable annotations.
    A decoded image whose size differs from the JSON's height/width always raises ValueError (annotations would
    not line up; a swapped size usually means an EXIF rotation the JSON did not account for).
    """

    def __init__(self, ann_file, image_dir, *, transforms=None, filter_empty=True, skip_bad_images=False,
                 keypoints=None, min_keypoints_per_image=0, mask_format="polygon", modalities=("visible",),
                 ignore_regions=False):
        if mask_format not in ("polygon", "bitmask"):
            raise ValueError(f"mask_format must be 'polygon' or 'bitmask', got {mask_format!r}")
        if min_keypoints_per_image < 0:
            raise ValueError(f"min_keypoints_per_image must be >= 0, got {min_keypoints_per_image}")
        self.ann_file, self.image_dir = os.fspath(ann_file), os.fspath(image_dir)
        self.mask_format = mask_format
        self.modalities, self.ignore_regions = check_modalities(modalities), ignore_regions
        self.transforms, self.skip_bad_images = transforms, skip_bad_images
        with open(self.ann_file, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for binary files
                raise ValueError(f"{self.ann_file}: not valid JSON ({type(e).__name__}: {e})") from e
        _validate(data, self.ann_file)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()

        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in cats]
        self.category_names = [c["name"] for c in cats]
        self.num_classes = len(cats)

        kp_names = {tuple(c["keypoints"]) for c in cats if c.get("keypoints")}
        if keypoints is None:
            keypoints = bool(kp_names)
        if keypoints and len(kp_names) != 1:
            raise ValueError(f"{self.ann_file}: keypoints=True needs exactly one list of keypoint names in "
                             f"'categories', found {len(kp_names)}")
        self.keypoints = bool(keypoints)
        self.keypoint_names = list(next(iter(kp_names))) if self.keypoints else []
        self.num_keypoints = len(self.keypoint_names)
        keypoint_categories = {c["id"] for c in cats if c.get("keypoints")}  # COCO: person
        # Their contiguous labels (1..K), the classes whose detections get keypoints (model.keypoint_head.classes).
        self.keypoint_labels = tuple(i + 1 for i, c in enumerate(cats) if c["id"] in keypoint_categories
                                     ) if self.keypoints else ()
        self.has_masks = any("segmentation" in a for a in data["annotations"] if not a["iscrowd"])

        self._images = {img["id"]: img for img in data["images"]}
        self._instances, self.stats = self._index_instances(data, keypoint_categories)
        self.ids = sorted(i for i, inst in self._instances.items() if inst or not filter_empty)
        if self.keypoints and min_keypoints_per_image > 0:
            def visible(img_id):
                return sum(sum(v > 0 for v in kps[2::3]) for _, _, _, kps in self._instances[img_id])

            kept = [i for i in self.ids if visible(i) >= min_keypoints_per_image]
            self.stats["few_keypoints_images"] = len(self.ids) - len(kept)
            self.ids = kept
        self.stats["kept_images"] = len(self.ids)
        stats = self.stats
        dropped = stats["degenerate"] + stats["invalid_segmentation"]
        logger.log(logging.WARNING if dropped else logging.INFO,
                   "%s: kept %d of %d images (%d left out with fewer than %d visible keypoints), %d of %d "
                   "annotations (dropped: %d crowd, %d degenerate boxes, %d without a valid segmentation; kept: %d "
                   "without visible keypoints)", self.ann_file, stats["kept_images"], stats["images"],
                   stats["few_keypoints_images"], min_keypoints_per_image, stats["kept_annotations"],
                   stats["annotations"], stats["crowd"], stats["degenerate"], stats["invalid_segmentation"],
                   stats["no_visible_keypoints"])

    def _index_instances(self, data: dict, keypoint_categories: set) -> tuple[dict, dict]:
        """{image id: [(box xyxy, label, segmentation, keypoints)]} of the usable instances, and the counts."""
        label_of = {cid: k + 1 for k, cid in enumerate(self.category_ids)}  # 0 stays background
        instances = {img_id: [] for img_id in self._images}
        stats = dict(images=len(self._images), kept_images=0, annotations=len(data["annotations"]),
                     kept_annotations=0, crowd=0, degenerate=0, invalid_segmentation=0, no_visible_keypoints=0,
                     few_keypoints_images=0, skipped_images=0)
        self._ignore = {img_id: [] for img_id in self._images}
        for ann in data["annotations"]:
            img = self._images[ann["image_id"]]
            h, w = img["height"], img["width"]
            x, y, bw, bh = ann["bbox"]
            box = [min(max(x, 0), w), min(max(y, 0), h), min(max(x + bw, 0), w), min(max(y + bh, 0), h)]
            if ann["iscrowd"]:
                stats["crowd"] += 1
                if self.ignore_regions and box[2] > box[0] and box[3] > box[1]:
                    self._ignore[img["id"]].append(box)
                continue
            if box[2] <= box[0] or box[3] <= box[1]:  # empty after clipping: zero/negative size or outside
                stats["degenerate"] += 1
                continue
            segm = ann.get("segmentation")
            if isinstance(segm, list):  # detectron2: a polygon needs >= 3 points
                segm = [p for p in segm if len(p) >= 6]
            if self.has_masks and not segm:
                stats["invalid_segmentation"] += 1
                continue
            kps = ann.get("keypoints")
            if self.keypoints:
                if not (kps and len(kps) == 3 * self.num_keypoints):  # e.g. the synthetic set's shapes
                    kps = [0.0] * (3 * self.num_keypoints)  # all unlabelled (v = 0): no keypoint loss
                if ann["category_id"] in keypoint_categories and max(kps[2::3]) <= 0:
                    stats["no_visible_keypoints"] += 1  # kept: such persons still train the box and mask heads
            instances[img["id"]].append((box, label_of[ann["category_id"]], segm, kps))
            stats["kept_annotations"] += 1
        return instances, stats

    def __len__(self) -> int:
        return len(self.ids)

    def image_hw(self, i: int) -> tuple[int, int]:
        """(height, width) of kept image i from the JSON, without decoding it."""
        img = self._images[self.ids[i]]
        return img["height"], img["width"]

    def image_record(self, i: int) -> dict:
        """The JSON record of kept image i (`file_name`, `height`, `width`, ...)."""
        return self._images[self.ids[i]]

    def image_path(self, i: int) -> str:
        """The file of kept image i: its visible frame, or its thermal one in a thermal-only dataset."""
        field = MODALITIES[self.modalities[0]][0]
        return os.path.join(self.image_dir, self._images[self.ids[i]].get(field, ""))

    def __getitem__(self, idx: int):
        n = len(self.ids)
        if not -n <= idx < n:
            raise IndexError(f"index {idx} out of range for a dataset of {n} images")
        for attempt in range(n):
            j = (idx + attempt) % n
            try:
                image = load_frames(self.image_dir, self._images[self.ids[j]], self.modalities)  # (C, H, W)
            except ImageLoadError as e:
                if not self.skip_bad_images:
                    raise
                self.stats["skipped_images"] += 1
                logger.warning("skipping unreadable image: %s", e)
                continue
            return self._sample(j, image)
        raise ImageLoadError(f"{self.image_dir}: none of the {n} images of {self.ann_file} could be loaded")

    def _sample(self, j: int, image: torch.Tensor):
        img = self._images[self.ids[j]]
        h, w = image.shape[-2:]
        if (h, w) != (img["height"], img["width"]):
            hint = " (swapped: EXIF rotation?)" if (w, h) == (img["height"], img["width"]) else ""
            raise ValueError(f"{self.image_path(j)}: decoded image is {h}x{w} (HxW) but {self.ann_file} says "
                             f"{img['height']}x{img['width']} for image id {img['id']}{hint}")
        instances = self._instances[img["id"]]
        target = {
            "boxes": torch.tensor([b for b, _, _, _ in instances], dtype=torch.float32).reshape(-1, 4),  # (N, 4)
            "labels": torch.tensor([lab for _, lab, _, _ in instances], dtype=torch.int64),  # (N,)
            "image_id": img["id"],
            "orig_size": (h, w),
        }
        if self.ignore_regions:
            target["ignore_boxes"] = torch.tensor(self._ignore[img["id"]], dtype=torch.float32).reshape(-1, 4)
        if self.has_masks:
            segms = [s for _, _, s, _ in instances]
            if self.mask_format == "polygon" and all(isinstance(s, list) for s in segms):
                # Rasterised later inside each RoI; no full-image bitmap is ever made.
                target["polygons"] = [[np.asarray(p, dtype=np.float64) for p in s] for s in segms]
            else:
                target["masks"] = self._decode_masks(segms, h, w)  # (N, H, W)
        if self.keypoints:
            kps = np.asarray([k for _, _, _, k in instances], dtype=np.float32).reshape(-1, self.num_keypoints, 3)
            # detectron2 convention: COCO stores integer pixel indices; +0.5 moves labelled points to pixel centres
            kps[..., :2] += 0.5 * (kps[..., 2:] > 0)
            target["keypoints"] = torch.from_numpy(kps)  # (N, K, 3)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    @staticmethod
    def _decode_masks(segms: list, h: int, w: int) -> torch.Tensor:
        """Polygons / uncompressed RLE / compressed RLE -> (N, h, w) uint8 via pycocotools."""
        if not segms:
            return torch.zeros((0, h, w), dtype=torch.uint8)
        rles = []
        for segm in segms:
            if isinstance(segm, list):  # polygons of one object: rasterize each part, then union
                rles.append(mask_utils.merge(mask_utils.frPyObjects(segm, h, w)))
            elif isinstance(segm["counts"], list):  # uncompressed RLE
                rles.append(mask_utils.frPyObjects(segm, h, w))
            else:  # compressed RLE
                rles.append(segm)
        masks = mask_utils.decode(rles)  # (H, W, N) Fortran order
        return torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1)))
