"""KAIST multispectral pedestrians -> COCO instance JSON (one category, "person"), so `CocoDetection` and COCOeval
read it and a miss-rate evaluation finds the fields it needs.

KAIST (Hwang, Park, Kim, Choi, Kweon, "Multispectral Pedestrian Detection: Benchmark Dataset and Baseline",
CVPR 2015) is a set of driving videos filmed with aligned colour and thermal (LWIR) cameras, 640 x 512 pixels,
in 12 sets: 00-02 and 06-08 by day, 03-05 and 09-11 by night. Its layout:

    images/setXX/VYYY/visible/IZZZZZ.jpg    colour frame
    images/setXX/VYYY/lwir/IZZZZZ.jpg       the aligned thermal frame
    annotations/setXX/VYYY/IZZZZZ.txt       one bbGt file per frame (a flat setXX_VYYY_IZZZZZ.txt is also read)
    train-all-02.txt, test-all-20.txt, ... image lists, one `setXX/VYYY/IZZZZZ` a line (blank lines ignored)

Re-annotations in the same format (e.g. sanitized training or improved test annotations) may live in another
folder: the annotation root is a parameter of its own, separate from the image root.

bbGt version 3 (the text format of Piotr Dollar's Computer Vision Matlab Toolbox, `detector/bbGt.m`): the first
line is `% bbGt version=3`, then one object per line, 12 whitespace-separated fields

    lbl l t w h occ vl vt vw vh ign ang

label; box left, top, width, height in 1-based pixels; occlusion (0 none, 1 partial, 2 heavy); the visible part's
box in the same form (all zero when none is given); the ignore flag; the angle. A file holding only the header is
a frame without objects.

Coordinates: bbGt boxes come from MATLAB, where the first pixel is 1, so pixel column l covers the continuous
interval [l - 1, l). The box is therefore x1 = l - 1, y1 = t - 1, x2 = x1 + w, y2 = y1 + h in COCO's continuous
coordinates (the origin at the top-left corner of the first pixel), and COCO's bbox is [l - 1, t - 1, w, h].

Conversion:
- category {"id": 1, "name": "person"}; objects labelled `person` are instances (iscrowd 0); `people`, `person?`,
  `cyclist` and `person?a` are crowd annotations (iscrowd 1), which `CocoDetection` never trains on and COCOeval
  lets match detections without counting them. A label in neither list is kept as a crowd annotation with its
  label, so an evaluation can still find it by `kaist_label` and remove it (`strict_labels=True` raises instead);
- every annotation keeps `kaist_label` (the bbGt label), `occlusion` (0/1/2) and `ignore` (the bbGt ign flag, as
  stored: what to ignore is the evaluation's choice; COCOeval overwrites its own copy of `ignore` with iscrowd);
  `area` = w * h of the box;
- segmentation: KAIST has boxes only, so every annotation gets the box itself as a polygon
  [x1, y1, x2, y1, x2, y2, x1, y2], and instance masks are box-shaped. With it `CocoDetection` loads the file
  whether or not the model has a mask head (a mask head needs `polygons` or `masks` in each target; a box-only
  model ignores them);
- training files (`--train`, `train_protocol=True`): persons shorter than 50 px or heavily occluded are crowd
  annotations too, ignore regions for training (TRAIN_MIN_HEIGHT states the source); test files keep them;
- images: every listed frame in list order, frames without objects included, id = position + 1, `file_name` the
  visible frame relative to the image root, `lwir_file_name` the thermal one, `set`, `video`, `frame` (the path
  parts, e.g. "set00", "V000", "I00000"), `daytime` ("day" or "night" by set), width x height 640 x 512 unless
  `read_sizes=True` reads each visible frame's size with PIL (by default only the first frame's existence is
  checked). Annotation ids run over all frames in list order.

    python -m minimask.data.kaist --images KAIST/images --annotations KAIST/annotations \\
        --list KAIST/imageSets/test-all-20.txt --output kaist_test.json
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

from minimask.data.coco import write_json

BBGT_HEADER = "% bbGt version=3"
CATEGORIES = [{"id": 1, "name": "person"}]
PERSON_LABELS = ("person",)
CROWD_LABELS = ("people", "person?", "cyclist", "person?a")
IMAGE_WIDTH, IMAGE_HEIGHT = 640, 512
DAY_SETS = frozenset({0, 1, 2, 6, 7, 8})
NIGHT_SETS = frozenset({3, 4, 5, 9, 10, 11})
# Training protocol (`--train`): which persons a detector learns from; the others become ignore regions (crowd),
# neither positive nor background. Dollar's toolbox trains its Caltech / KAIST ACF baselines on `person` boxes at
# least 50 px tall (`detector/acfDemoCal.m`, pLoad hRng [50 inf]) with `people` ignored; minimask keeps partly
# occluded persons (occlusion 1) as positives, as the Reasonable test setting counts them, and ignores heavy
# occlusion (2) and the crowd labels. Test files are converted without it: the miss rate applies its own filters.
TRAIN_MIN_HEIGHT = 50
TRAIN_MAX_OCCLUSION = 1
_FRAME_RE = re.compile(r"(set(\d+))/(V\d+)/(I\d+)")
_NUM_FIELDS = 12


def _number(text: str, where: str, name: str) -> int | float:
    """`text` as a finite number (an int when integral, so JSON keeps "12" rather than "12.0")."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: {name} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: {name} {text!r} is not a finite number")
    return int(value) if value.is_integer() else value


def _bbgt_box(l, t, w, h) -> list:
    """1-based bbGt (left, top, width, height) -> continuous xyxy (pixel column l covers [l - 1, l))."""
    return [l - 1, t - 1, l - 1 + w, t - 1 + h]


def _parse_object(fields: list[str], where: str) -> dict:
    """One bbGt object line, split into fields; ValueError prefixed with `where` (file and line) when malformed."""
    if len(fields) != _NUM_FIELDS:
        raise ValueError(f"{where}: expected {_NUM_FIELDS} fields 'lbl l t w h occ vl vt vw vh ign ang', "
                         f"got {len(fields)}")
    names = ("l", "t", "w", "h", "occ", "vl", "vt", "vw", "vh", "ign", "ang")
    v = dict(zip(names, (_number(text, where, name) for name, text in zip(names, fields[1:]))))
    if v["w"] < 0 or v["h"] < 0 or v["vw"] < 0 or v["vh"] < 0:
        raise ValueError(f"{where}: negative box width or height")
    if v["occ"] not in (0, 1, 2) or not isinstance(v["occ"], int):
        raise ValueError(f"{where}: occlusion must be 0, 1 or 2, got {fields[5]!r}")
    if not isinstance(v["ign"], int) or v["ign"] < 0:
        raise ValueError(f"{where}: ignore flag must be a non-negative integer, got {fields[10]!r}")
    visible = [v["vl"], v["vt"], v["vw"], v["vh"]]
    return {
        "label": fields[0],
        "box": _bbgt_box(v["l"], v["t"], v["w"], v["h"]),
        "occlusion": v["occ"],
        # bbGt writes 0 0 0 0 when no visible part is annotated; a box at (-1, -1) would be meaningless.
        "visible_box": _bbgt_box(*visible) if any(visible) else None,
        "ignore": v["ign"],
        "angle": v["ang"],
    }


def _numbered_objects(path: Path) -> list[tuple[int, dict]]:
    """(1-based line number, object) of each object line of a bbGt file; see `read_bbgt`."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines or lines[0].strip() != BBGT_HEADER:
        found = repr(lines[0]) if lines else "an empty file"
        raise ValueError(f"{path}, line 1: expected the header {BBGT_HEADER!r}, got {found}")
    return [(number, _parse_object(line.split(), f"{path}, line {number}"))
            for number, line in enumerate(lines[1:], start=2) if line.strip()]


def read_bbgt(path) -> list[dict]:
    """Objects of one bbGt version 3 file, in file order: dicts with `label` (str), `box` (continuous xyxy, see the
    module docstring), `occlusion` (0, 1 or 2), `visible_box` (continuous xyxy, or None when bbGt gives 0 0 0 0),
    `ignore` (int) and `angle`. A header-only file gives []; blank lines are skipped.

    Raises FileNotFoundError when `path` is missing, ValueError naming the file and the 1-based line number for a
    missing or wrong header, a wrong field count, a non-numeric value, a negative size or an occlusion outside 0..2.
    """
    return [obj for _, obj in _numbered_objects(Path(path))]


def read_image_list(list_file) -> list[tuple[str, str, str]]:
    """(set, video, frame) of each line `setXX/VYYY/IZZZZZ` of an image-list file, in order; blank lines skipped.

    Raises FileNotFoundError naming a missing file, ValueError naming the file and line of a malformed entry or of
    a set that is neither a day nor a night set.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"image list {list_file} does not exist")
    frames = []
    for number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        entry = line.strip()
        if not entry:
            continue
        match = _FRAME_RE.fullmatch(entry)
        if match is None:
            raise ValueError(f"{list_file}, line {number}: expected 'setXX/VYYY/IZZZZZ', got {entry!r}")
        set_name, set_number, video, frame = match.groups()
        if int(set_number) not in DAY_SETS | NIGHT_SETS:
            raise ValueError(f"{list_file}, line {number}: {set_name} is not a KAIST set (set00 .. set11)")
        frames.append((set_name, video, frame))
    return frames


def daytime(set_name: str) -> str:
    """The time of day of a set ("set00" .. "set11"): "day" for set00-02 and set06-08, "night" for set03-05 and
    set09-11 (Hwang et al. 2015). ValueError for any other set."""
    number = int(set_name.removeprefix("set"))
    if number in DAY_SETS:
        return "day"
    if number in NIGHT_SETS:
        return "night"
    raise ValueError(f"{set_name} is not a KAIST set (set00 .. set11)")


def annotation_path(annotation_root, set_name: str, video: str, frame: str) -> Path:
    """The bbGt file of a frame: `<root>/setXX/VYYY/IZZZZZ.txt`, or the flat `<root>/setXX_VYYY_IZZZZZ.txt` when
    only that exists. FileNotFoundError names the nested path (and the flat one) when neither exists."""
    root = Path(annotation_root)
    nested, flat = root / set_name / video / f"{frame}.txt", root / f"{set_name}_{video}_{frame}.txt"
    if nested.is_file():
        return nested
    if flat.is_file():
        return flat
    raise FileNotFoundError(f"annotation file {nested} (or {flat}) for frame {set_name}/{video}/{frame} is missing")


def kaist_annotation(obj: dict, *, ann_id: int, image_id: int, where: str = "", strict_labels: bool = False,
                     train_protocol: bool = False) -> dict:
    """The COCO annotation of one `read_bbgt` object (see the module docstring for label -> iscrowd).

    strict_labels: a label outside PERSON_LABELS and CROWD_LABELS raises ValueError (prefixed with `where`, the
    file and line) instead of becoming a crowd annotation.
    train_protocol: a person shorter than TRAIN_MIN_HEIGHT or occluded more than TRAIN_MAX_OCCLUSION is a crowd
        annotation too (an ignore region for training, see TRAIN_MIN_HEIGHT).
    """
    label = obj["label"]
    if label not in PERSON_LABELS and label not in CROWD_LABELS and strict_labels:
        known = ", ".join(PERSON_LABELS + CROWD_LABELS)
        raise ValueError(f"{where}: unknown label {label!r} (known: {known})")
    x1, y1, x2, y2 = obj["box"]
    w, h = x2 - x1, y2 - y1
    person = label in PERSON_LABELS and (not train_protocol or (h >= TRAIN_MIN_HEIGHT
                                                                 and obj["occlusion"] <= TRAIN_MAX_OCCLUSION))
    return {
        "id": ann_id, "image_id": image_id, "category_id": 1,
        "iscrowd": 0 if person else 1,
        "bbox": [x1, y1, w, h], "area": w * h,
        "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],  # KAIST has boxes only: a box-shaped mask
        "kaist_label": label, "occlusion": obj["occlusion"], "ignore": obj["ignore"],
    }


def _frame_annotations(path: Path, *, image_id: int, first_id: int, strict_labels: bool,
                       train_protocol: bool) -> list[dict]:
    """COCO annotations of one bbGt file, ids from `first_id` on."""
    return [kaist_annotation(obj, ann_id=first_id + k, image_id=image_id, where=f"{path}, line {number}",
                             strict_labels=strict_labels, train_protocol=train_protocol)
            for k, (number, obj) in enumerate(_numbered_objects(path))]


def _image_record(image_root: Path, image_id: int, set_name: str, video: str, frame: str, *, read_size: bool):
    """The COCO image record of one frame; `read_size` opens the visible frame (header only) for its size."""
    visible, lwir = f"{set_name}/{video}/visible/{frame}.jpg", f"{set_name}/{video}/lwir/{frame}.jpg"
    width, height = IMAGE_WIDTH, IMAGE_HEIGHT
    if read_size:
        if not (image_root / visible).is_file():
            raise FileNotFoundError(f"visible frame {image_root / visible} is missing")
        with Image.open(image_root / visible) as img:
            width, height = img.size
    return {"id": image_id, "file_name": visible, "width": width, "height": height, "lwir_file_name": lwir,
            "set": set_name, "video": video, "frame": frame, "daytime": daytime(set_name)}


def build_kaist(image_root, annotation_root, list_file, *, read_sizes: bool = False,
                strict_labels: bool = False, train_protocol: bool = False) -> dict:
    """The COCO dict of the frames of `list_file` (see `convert_kaist`, which writes it)."""
    image_root, annotation_root = Path(image_root), Path(annotation_root)
    for name, root in (("image root", image_root), ("annotation root", annotation_root)):
        if not root.is_dir():
            raise FileNotFoundError(f"{name} {root} does not exist")
    frames = read_image_list(list_file)
    if not frames:
        raise ValueError(f"image list {list_file} lists no frames")
    images, annotations = [], []
    for index, (set_name, video, frame) in enumerate(frames):
        record = _image_record(image_root, index + 1, set_name, video, frame, read_size=read_sizes)
        if index == 0:  # a cheap check that image_root is the folder holding setXX/ (the JSON is useless otherwise)
            for key in ("file_name", "lwir_file_name"):
                if not (image_root / record[key]).is_file():
                    raise FileNotFoundError(f"frame {image_root / record[key]} (first in {list_file}) is missing: "
                                            f"is {image_root} the KAIST images/ folder?")
        images.append(record)
        path = annotation_path(annotation_root, set_name, video, frame)
        annotations += _frame_annotations(path, image_id=index + 1, first_id=len(annotations) + 1,
                                          strict_labels=strict_labels, train_protocol=train_protocol)
    return {"info": {"description": f"KAIST multispectral pedestrians ({Path(list_file).name}), converted by "
                                    "minimask"},
            "licenses": [], "images": images, "annotations": annotations, "categories": CATEGORIES}


def convert_kaist(image_root, annotation_root, list_file, out_json, *, read_sizes: bool = False,
                  strict_labels: bool = False, train_protocol: bool = False) -> Path:
    """Convert the frames listed in `list_file` to COCO JSON at `out_json` (written atomically) and return its path.

    image_root: the folder holding setXX/VYYY/{visible,lwir}/ (JSON file names are relative to it; nothing is
    copied). annotation_root: the folder holding the bbGt files (the original, sanitized or improved ones).
    read_sizes: read each visible frame's size with PIL instead of trusting 640 x 512.
    strict_labels: raise on labels outside PERSON_LABELS and CROWD_LABELS instead of keeping them as crowd.
    train_protocol: also mark the persons a training run should ignore as crowd (see TRAIN_MIN_HEIGHT).
    Raises FileNotFoundError naming a missing root, list file, annotation file or first frame; ValueError naming
    the file and line of a malformed list or bbGt entry. Nothing is written when it raises.
    """
    data = build_kaist(image_root, annotation_root, list_file, read_sizes=read_sizes, strict_labels=strict_labels,
                       train_protocol=train_protocol)
    out_json = Path(out_json)
    write_json(out_json, data)
    return out_json


def summarize(data: dict) -> str:
    """One line: images, frames without objects, annotations per KAIST label (known labels first)."""
    labels = Counter(a["kaist_label"] for a in data["annotations"])
    order = [lab for lab in PERSON_LABELS + CROWD_LABELS if lab in labels] + sorted(
        lab for lab in labels if lab not in PERSON_LABELS + CROWD_LABELS)
    annotated = {a["image_id"] for a in data["annotations"]}
    empty = sum(im["id"] not in annotated for im in data["images"])
    per_label = ", ".join(f"{lab}={labels[lab]}" for lab in order) or "none"
    return (f"{len(data['images'])} images ({empty} without objects), {len(data['annotations'])} annotations "
            f"({per_label})")


def main(argv=None) -> int:
    """Command line: convert one image list; prints a one-line summary. Bad input: one line on stderr, exit 2."""
    parser = argparse.ArgumentParser(prog="python -m minimask.data.kaist",
                                     description="Convert a KAIST image list and its bbGt annotations to COCO JSON.")
    parser.add_argument("--images", required=True, help="the folder holding setXX/VYYY/{visible,lwir}/")
    parser.add_argument("--annotations", required=True, help="the folder holding the bbGt .txt files")
    parser.add_argument("--list", required=True, help="image-list file, one setXX/VYYY/IZZZZZ a line")
    parser.add_argument("--output", required=True, help="the COCO JSON file to write")
    parser.add_argument("--read-sizes", action="store_true", help="read each frame's size instead of 640 x 512")
    parser.add_argument("--strict-labels", action="store_true", help="fail on labels outside the known ones")
    parser.add_argument("--train", action="store_true", help="a training file: persons under 50 px tall or "
                        "heavily occluded become ignore regions too (TRAIN_MIN_HEIGHT, TRAIN_MAX_OCCLUSION)")
    args = parser.parse_args(argv)
    try:
        data = build_kaist(args.images, args.annotations, args.list, read_sizes=args.read_sizes,
                           strict_labels=args.strict_labels, train_protocol=args.train)
        write_json(Path(args.output), data)
    except (OSError, ValueError) as e:  # missing files and malformed entries: the message names the culprit
        print(f"kaist: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.output}: {summarize(data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
