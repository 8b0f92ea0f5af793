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

Source: Wang, Shi, Song, Shen, "Object Detection Combining Recognition and Segmentation", ACCV 2007; the database
is published as one zip at `PENNFUDAN_URL`.

Fetching and caching (`pennfudan_dataset` is the entry point; `download_pennfudan` and `verify_manifest` its parts):
- the packaged manifest `pennfudan_sha256.txt` (sha256sum format: `<sha256>  <path>`, paths relative to the
  PennFudanPed folder, sorted) pins every file of the extracted dataset; a folder is accepted only when every listed
  file exists with that hash (extra files are allowed), whether it was downloaded or given as a local path;
- the download streams the zip to a temporary file in the cache, extracts it into a temporary folder (refusing
  members with absolute paths or `..`), verifies it and only then renames it to `<cache>/PennFudanPed`, so a failed
  download leaves no half-written folder; the zip is deleted afterwards. An existing folder that verifies is reused;
- the cache is `$MINIMASK_CACHE/pennfudan`, else `~/.cache/minimask/pennfudan` (the base the synthetic dataset
  uses); the COCO files are written once to `<cache>/converted/{train,val,all}.json`, with a marker that records
  which data they were converted from, and are reconverted when that changes.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from minimask.data.coco import write_json
from minimask.data.synthetic import default_cache_dir

NUM_VAL = 50
PENNFUDAN_URL = "https://www.cis.upenn.edu/~jshi/ped_html/PennFudanPed.zip"
MANIFEST_PATH = Path(__file__).with_name("pennfudan_sha256.txt")
CONVERTED_MARKER = "COMPLETE.json"
_CHUNK = 1 << 20
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
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
    write_json(paths.train_ann, subset(images[:cut], "train"))
    write_json(paths.val_ann, subset(images[cut:], "val"))
    write_json(paths.all_ann, subset(images, "all"))
    return paths


# ------------------------------------------------------------------------------------- fetching and caching
def load_manifest(path=MANIFEST_PATH) -> dict[str, str]:
    """{relative path: lowercase sha256 hex} read from a sha256sum-format file (`<sha256>  <path>` per line).

    Raises ValueError naming the file and line for a malformed line, a path that is absolute or contains `..`, or a
    path listed twice. Blank lines are skipped.
    """
    manifest: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        rel = rel.removeprefix("*")  # sha256sum's binary-mode marker
        if not sep or not _SHA256_RE.fullmatch(digest) or not _is_safe_relative(rel) or rel in manifest:
            raise ValueError(f"{path}:{number}: not a `<sha256>  <relative path>` line (or a repeated path): {line!r}")
        manifest[rel] = digest
    return manifest


def _is_safe_relative(name: str) -> bool:
    """True when `name` (a zip member or manifest path, "/" or "\\" separated) stays inside its folder."""
    p = PurePosixPath(name.replace("\\", "/"))
    return bool(name) and not p.is_absolute() and ".." not in p.parts and ":" not in (p.parts[0] if p.parts else "")


def file_sha256(path) -> str:
    """Lowercase hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_manifest(folder, manifest: dict[str, str] | None = None) -> None:
    """Check that every file of `manifest` (default: the packaged one) exists under `folder` with its SHA-256.

    Returns None when all match; files not in the manifest are ignored. Otherwise raises ValueError naming the first
    missing or differing file (in path order) and how many of the manifest's files are missing or differ.
    """
    folder = Path(folder)
    manifest = load_manifest() if manifest is None else manifest
    bad = []
    for rel, digest in sorted(manifest.items()):
        path = folder / rel
        if not path.is_file():
            bad.append(f"{rel} is missing")
        elif file_sha256(path) != digest.lower():
            bad.append(f"{rel} has a different SHA-256")
    if bad:
        raise ValueError(f"{folder} is not the expected Penn-Fudan data: {bad[0]} "
                         f"({len(bad)} of {len(manifest)} files missing or different)")


def _download(url: str, dest: Path) -> None:
    """Stream `url` into `dest` atomically (temporary file beside it, then os.replace); OSError names the URL."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, f, _CHUNK)
        os.replace(tmp, dest)
    except (OSError, http.client.HTTPException) as e:  # urllib.error.URLError is an OSError
        raise OSError(f"could not download {url}: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _safe_extract(zip_path: Path, dest: Path, url: str) -> None:
    """Extract `zip_path` into `dest` after checking every member stays inside it; ValueError names the URL."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            unsafe = [info.filename for info in zf.infolist() if not _is_safe_relative(info.filename)]
            if unsafe:
                raise ValueError(f"{url}: refusing a zip with a member outside its folder: {unsafe[0]!r}")
            zf.extractall(dest)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{url} did not give a valid zip file: {e}") from e


def download_pennfudan(cache_dir, *, url: str = PENNFUDAN_URL, manifest: dict[str, str] | None = None) -> Path:
    """`<cache_dir>/PennFudanPed`, downloading, extracting and verifying it first when it does not exist yet.

    An existing folder is verified against `manifest` (default: the packaged one) and returned without any network
    access; when it does not verify, ValueError says so (remove it to download again: nothing is deleted here).
    Otherwise the zip at `url` is streamed into a private temporary folder in `cache_dir`, extracted there, verified
    and the PennFudanPed folder renamed into place; the temporary folder (zip included) is removed whether or not
    that succeeds. Raises OSError naming the URL when the download fails; ValueError naming the URL for a file that
    is not a zip, holds an unsafe member or has no PennFudanPed/ folder; ValueError naming the URL and the first
    bad file for a manifest mismatch.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / "PennFudanPed"
    if target.is_dir():
        try:
            verify_manifest(target, manifest)
        except ValueError as e:
            raise ValueError(f"{e}; remove {target} to download it again") from e
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".PennFudanPed.", dir=cache_dir))  # private: no clash between processes
    try:
        zip_path = work / "PennFudanPed.zip"
        _download(url, zip_path)
        _safe_extract(zip_path, work / "unzipped", url)
        extracted = work / "unzipped" / "PennFudanPed"
        if not extracted.is_dir():
            raise ValueError(f"{url}: the zip has no top-level PennFudanPed/ folder")
        try:
            verify_manifest(extracted, manifest)
        except ValueError as e:
            raise ValueError(f"data downloaded from {url}: {e}") from e
        try:
            os.replace(extracted, target)
        except OSError:
            if not target.is_dir():  # else another process finished first: keep its verified copy
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def default_pennfudan_cache() -> Path:
    """$MINIMASK_CACHE/pennfudan, else ~/.cache/minimask/pennfudan (the base of `synthetic.default_cache_dir`)."""
    return default_cache_dir().parent / "pennfudan"


def pennfudan_dataset(source=None, *, cache_dir=None, url: str = PENNFUDAN_URL,
                      manifest: dict[str, str] | None = None, num_val: int = NUM_VAL) -> PennFudanPaths:
    """Penn-Fudan converted to COCO JSON, fetching and converting it only when needed; returns the files' paths.

    `source` is a local PennFudanPed folder (used in place after `verify_manifest`) or None: then
    `download_pennfudan(cache_dir, url=url)` provides `<cache_dir>/PennFudanPed`. `cache_dir` defaults to
    `default_pennfudan_cache()`. The JSON files go to `<cache_dir>/converted/`; they are reused when its marker
    records the same manifest, image names and `num_val`, otherwise rewritten by `convert_pennfudan` (the marker
    last).
    `image_dir` is always the PNGImages/ folder of the data just verified. Errors as in `download_pennfudan`.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_pennfudan_cache()
    manifest = load_manifest() if manifest is None else manifest
    if source is None:
        root = download_pennfudan(cache_dir, url=url, manifest=manifest)
    else:
        root = Path(source)
        verify_manifest(root, manifest)
    out_dir = cache_dir / "converted"
    names = sorted(p.name for p in (root / "PNGImages").glob("*.png"))
    key = {"manifest": hashlib.sha256(json.dumps(sorted(manifest.items())).encode()).hexdigest(),
           "images": names, "num_val": num_val}
    paths = PennFudanPaths(root / "PNGImages", out_dir / "train.json", out_dir / "val.json", out_dir / "all.json")
    marker = out_dir / CONVERTED_MARKER
    try:
        done = json.loads(marker.read_text()) == key
    except (OSError, ValueError):
        done = False
    if not (done and all(p.is_file() for p in (paths.train_ann, paths.val_ann, paths.all_ann))):
        marker.unlink(missing_ok=True)  # a conversion interrupted from here on is never taken as complete
        paths = convert_pennfudan(root, out_dir, num_val=num_val)
        write_json(marker, key)
    return paths
