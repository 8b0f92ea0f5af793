"""KAIST multispectral pedestrian benchmark: log-average miss rate (MR^-2), computed as the reference MATLAB does.

Primary sources:
- Hwang et al., "Multispectral Pedestrian Detection: Benchmark Dataset and Baseline", CVPR 2015 (the KAIST benchmark,
  its Reasonable / Scale / Occlusion settings and the day / night split);
- Dollar et al., "Pedestrian Detection: An Evaluation of the State of the Art", PAMI 2012, evaluation section
  (matching with ignore regions; miss rate against false positives per image; the log-average miss rate is the
  geometric mean of the miss rate at 9 FPPI points evenly spaced in log space in [1e-2, 1e0]).
The reference implementation is the MATLAB `kaist_eval_full.m` (settings, image bounds, label lists, MR^-2 formula)
on top of Piotr Dollar's toolbox `bbGt.m` (`bbLoad` filtering, `evalRes` greedy matching, `compOas` overlaps,
`compRoc` curve and reference points). This module follows them step by step:

1. Ground truth (per image). Boxes are compared in bbGt's 1-based pixel convention `l t w h`; minimask's continuous
   `x1 y1 x2 y2` converts as l = x1 + 1, t = y1 + 1, w = x2 - x1, h = y2 - y1 (`xyxy_to_ltwh`). A box whose label is
   in neither `positive_labels` nor `ignore_labels` is REMOVED; the others are IGNORED when the label is in
   `ignore_labels`, or the box's own ignore flag is set, or h is outside the setting's height range (inclusive), or
   its occlusion level (0 none / 1 partial / 2 heavy) is not allowed by the setting, or an edge leaves the bounds
   (l < x_min, t < y_min, l + w > x_max, t + h > y_max; KAIST: [5, 635] x [5, 507]).
2. Detections go to the matching unfiltered, as in `kaist_eval_full.m` and bbGt's `evalRes`. The Caltech
   evaluation code accompanying Dollar et al. (PAMI 2012) first drops detections whose height is outside
   [h_min / 1.25, h_max * 1.25); `det_height_margin=1.25` (DET_HEIGHT_MARGIN) does that.
3. Matching (`evalRes`): detections by descending score, ground truth with regular boxes first (stable sorts, as
   MATLAB's `sort`). A detection takes the regular box with the highest IoU >= 0.5 (equality matches; a later box
   with an equal overlap wins), a regular box is matched at most once, and ignored boxes (overlap = intersection over
   the DETECTION's area) absorb any number of detections. Areas are w * h, as `compOas` computes them.
4. Curve (`compRoc`): kept detections of all images are sorted by score (stable); after each one, recall = TP / number
   of regular boxes and FPPI = FP / number of images (images without people count). Detections absorbed by ignored
   boxes are dropped.
5. At each reference FPPI in 10 ** [-2, -1.75, ..., 0] the miss rate is 1 - recall at the LAST curve point whose FPPI
   is <= the reference, or 1 if there is none (the curve is prefixed with the point (-inf, recall 0)); MR^-2 =
   exp(mean(log(max(1e-10, miss)))).

All functions are stateless and work on numpy arrays (CPU torch tensors are accepted wherever an array is).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np

POSITIVE_LABELS = ("person",)
# kaist_eval_full.m's list; any other label ("person?a", say) is neither positive nor ignored, so it is removed.
IGNORE_LABELS = ("people", "person?", "cyclist")
KAIST_BOUNDS = (5.0, 5.0, 635.0, 507.0)  # (x_min, y_min, x_max, y_max) in bbGt's 1-based pixels: 640 x 512 images
FPPI_REFERENCES = 10.0 ** np.arange(-2.0, 0.01, 0.25)  # (9,) the 9 reference FPPI points of MR^-2
FPPI_REFERENCES.setflags(write=False)  # a shared module constant
MISS_RATE_FLOOR = 1e-10  # clamp before the log: a miss rate of 0 must not give -inf
IOU_THRESHOLD = 0.5
DET_HEIGHT_MARGIN = 1.25  # the Caltech evaluation's detection height margin (off by default, see step 2)
CONDITIONS = ("day", "night")


@dataclass(frozen=True)
class Setting:
    """One evaluation setting: the ground-truth height range [lo, hi] (pixels, inclusive), the allowed occlusion
    levels (0 none, 1 partial, 2 heavy) and the image subset ("all", "day" or "night")."""
    name: str
    height_range: tuple[float, float]
    occlusions: frozenset[int]
    subset: str = "all"


# The 9 settings of kaist_eval_full.m, in its order (Hwang et al. 2015).
SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("Reasonable-all", (55.0, math.inf), frozenset({0, 1}), "all"),
    Setting("Reasonable-day", (55.0, math.inf), frozenset({0, 1}), "day"),
    Setting("Reasonable-night", (55.0, math.inf), frozenset({0, 1}), "night"),
    Setting("Scale=near", (115.0, math.inf), frozenset({0}), "all"),
    Setting("Scale=medium", (45.0, 115.0), frozenset({0}), "all"),
    Setting("Scale=far", (1.0, 45.0), frozenset({0}), "all"),
    Setting("Occ=none", (1.0, math.inf), frozenset({0}), "all"),
    Setting("Occ=partial", (1.0, math.inf), frozenset({1}), "all"),
    Setting("Occ=heavy", (1.0, math.inf), frozenset({2}), "all"),
)}


class ImageResult(NamedTuple):
    """Per-image outcome of `evaluate_image`, indexed like the input detections.

    scores: (D,) float; is_tp: (D,) bool, True for a match with a regular box; kept: (D,) bool, False for detections
    dropped by the height filter or absorbed by an ignored box (kept and not is_tp = false positive);
    num_gt: number of regular (non-ignored) ground-truth boxes."""
    scores: np.ndarray
    is_tp: np.ndarray
    kept: np.ndarray
    num_gt: int


def get_setting(setting: Setting | str) -> Setting:
    """A `Setting` or the name of one of `SETTINGS`; ValueError for an unknown name or a bad subset."""
    if isinstance(setting, str):
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {setting!r}; known: {', '.join(SETTINGS)}")
        return SETTINGS[setting]
    if not isinstance(setting, Setting):
        raise ValueError(f"setting must be a Setting or a name, got {type(setting).__name__}")
    if setting.subset not in ("all", *CONDITIONS):
        raise ValueError(f"setting {setting.name!r} has subset {setting.subset!r}; expected 'all', 'day' or 'night'")
    return setting


def image_bounds(*, width: float, height: float) -> tuple[float, float, float, float]:
    """bbGt bounds for a width x height image: [5, W - 5] x [5, H - 5] (KAIST 640 x 512 gives `KAIST_BOUNDS`)."""
    return (5.0, 5.0, float(width) - 5.0, float(height) - 5.0)


def _as_boxes(boxes, what: str) -> np.ndarray:
    """(N, 4) float64 from an array-like; an empty input becomes (0, 4)."""
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return array.reshape(0, 4)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{what} must have shape (N, 4), got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} must be finite")
    return array


def xyxy_to_ltwh(boxes) -> np.ndarray:
    """(N, 4) continuous x1 y1 x2 y2 (minimask) -> (N, 4) bbGt 1-based l t w h: l = x1 + 1, t = y1 + 1,
    w = x2 - x1, h = y2 - y1. ValueError for a bad shape or x2 < x1 / y2 < y1."""
    xyxy = _as_boxes(boxes, "boxes")
    if (xyxy[:, 2] < xyxy[:, 0]).any() or (xyxy[:, 3] < xyxy[:, 1]).any():
        raise ValueError("boxes must satisfy x2 >= x1 and y2 >= y1 (x1 y1 x2 y2 format)")
    return np.stack([xyxy[:, 0] + 1.0, xyxy[:, 1] + 1.0, xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], axis=1)


def _ltwh(boxes, box_format: str, what: str) -> np.ndarray:
    if box_format == "xyxy":
        return xyxy_to_ltwh(boxes)
    if box_format == "ltwh":
        ltwh = _as_boxes(boxes, what)
        if (ltwh[:, 2:] < 0).any():
            raise ValueError(f"{what} must have w >= 0 and h >= 0 (l t w h format)")
        return ltwh
    raise ValueError(f"box_format must be 'xyxy' or 'ltwh', got {box_format!r}")


def _per_box(values, n: int, what: str, dtype) -> np.ndarray:
    array = np.asarray(values, dtype=dtype).reshape(-1)
    if array.shape[0] != n:
        raise ValueError(f"{what} has {array.shape[0]} entries for {n} boxes")
    return array


def filter_ground_truth(gt: Mapping, setting: Setting | str, *, bounds: Sequence[float] = KAIST_BOUNDS,
                        positive_labels: Sequence[str] = POSITIVE_LABELS,
                        ignore_labels: Sequence[str] = IGNORE_LABELS, box_format: str = "xyxy",
                        ) -> tuple[np.ndarray, np.ndarray]:
    """bbGt `bbLoad` filtering of one image's ground truth for a setting.

    gt: {"boxes": (G, 4) in `box_format`, "labels": G strings, "occlusion": (G,) int in {0, 1, 2},
    "ignore": optional (G,) 0/1, "bounds": optional, replaces `bounds` for this image (datasets whose images differ
    in size)}. Returns (boxes (G', 4) bbGt l t w h, ignore (G',) bool) where the G' boxes are those
    whose label is in `positive_labels` or `ignore_labels` (others are removed), in input order."""
    setting = get_setting(setting)
    for key in ("boxes", "labels", "occlusion"):
        if key not in gt:
            raise ValueError(f"ground truth is missing the key {key!r}")
    boxes = _ltwh(gt["boxes"], box_format, "ground-truth boxes")  # (G, 4)
    n = boxes.shape[0]
    labels = list(gt["labels"])
    if len(labels) != n:
        raise ValueError(f"ground-truth labels has {len(labels)} entries for {n} boxes")
    occlusion = _per_box(gt["occlusion"], n, "ground-truth occlusion", np.int64)  # (G,)
    own_ignore = _per_box(gt.get("ignore", np.zeros(n)), n, "ground-truth ignore", np.float64) != 0  # (G,)
    bounds = gt.get("bounds", bounds)
    if len(bounds) != 4:
        raise ValueError(f"bounds must be (x_min, y_min, x_max, y_max), got {bounds!r}")
    known = np.array([label in positive_labels or label in ignore_labels for label in labels], dtype=bool)
    ignore = own_ignore | np.array([label in ignore_labels for label in labels], dtype=bool)
    lo, hi = setting.height_range
    ignore |= (boxes[:, 3] < lo) | (boxes[:, 3] > hi)
    ignore |= ~np.isin(occlusion, sorted(setting.occlusions))
    x_min, y_min, x_max, y_max = bounds
    ignore |= (boxes[:, 0] < x_min) | (boxes[:, 0] + boxes[:, 2] > x_max)
    ignore |= (boxes[:, 1] < y_min) | (boxes[:, 1] + boxes[:, 3] > y_max)
    return boxes[known], ignore[known]


def detection_height_mask(det_boxes_ltwh: np.ndarray, setting: Setting | str, *,
                          margin: float | None = None) -> np.ndarray:
    """(D,) bool: detections kept by the height filter h_min / margin <= h < h_max * margin (the Caltech evaluation
    code's half-open interval); all True when margin is None (bbGt `evalRes` / `kaist_eval_full.m` as published)."""
    setting = get_setting(setting)
    heights = np.asarray(det_boxes_ltwh, dtype=np.float64).reshape(-1, 4)[:, 3]  # (D,)
    if margin is None:
        return np.ones(heights.shape[0], dtype=bool)
    if margin <= 0:
        raise ValueError(f"det_height_margin must be positive or None, got {margin}")
    lo, hi = setting.height_range
    return (heights >= lo / margin) & (heights < hi * margin)


def overlaps(det_boxes: np.ndarray, gt_boxes: np.ndarray, gt_ignore: np.ndarray) -> np.ndarray:
    """bbGt `compOas`: (D, 4) and (G, 4) l t w h boxes, (G,) bool -> (D, G) overlaps: IoU against regular boxes,
    intersection over the detection's area against ignored ones; areas are w * h (no +1)."""
    d_lt, d_rb = det_boxes[:, None, :2], det_boxes[:, None, :2] + det_boxes[:, None, 2:]  # (D, 1, 2)
    g_lt, g_rb = gt_boxes[None, :, :2], gt_boxes[None, :, :2] + gt_boxes[None, :, 2:]  # (1, G, 2)
    wh = np.minimum(d_rb, g_rb) - np.maximum(d_lt, g_lt)  # (D, G, 2)
    inter = np.where((wh > 0).all(axis=2), wh[..., 0] * wh[..., 1], 0.0)  # (D, G)
    det_area = (det_boxes[:, 2] * det_boxes[:, 3])[:, None]  # (D, 1)
    gt_area = (gt_boxes[:, 2] * gt_boxes[:, 3])[None, :]  # (1, G)
    union = np.where(gt_ignore[None, :], det_area, det_area + gt_area - inter)  # (D, G), same order as compOas
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(inter > 0, inter / union, 0.0)


def match_image(*, det_boxes: np.ndarray, det_scores: np.ndarray, gt_boxes: np.ndarray, gt_ignore: np.ndarray,
                iou_threshold: float = IOU_THRESHOLD) -> np.ndarray:
    """bbGt `evalRes` greedy matching of one image. Boxes are bbGt l t w h. Returns (D,) int8 in the input order of
    the detections: 1 matched a regular box (TP), 0 unmatched (FP), -1 absorbed by an ignored box.

    The match state lives in separate arrays (never in an id where 0 could read as "unmatched")."""
    det_order = np.argsort(-det_scores, kind="stable")  # (D,) highest score first, ties keep input order
    gt_order = np.argsort(gt_ignore.astype(np.int8), kind="stable")  # (G,) regular boxes first
    is_ignored = gt_ignore[gt_order]  # (G,)
    oa = overlaps(det_boxes[det_order], gt_boxes[gt_order], is_ignored)  # (D, G)
    gt_used = np.zeros(len(gt_order), dtype=bool)  # only regular boxes are ever marked
    status_sorted = np.zeros(len(det_order), dtype=np.int8)
    for d in range(len(det_order)):
        best_oa, best_g, best_kind = iou_threshold, -1, 0
        for g in range(len(gt_order)):
            if gt_used[g]:
                continue
            if best_kind != 0 and is_ignored[g]:  # matched already; ignored boxes cannot do better
                break
            if oa[d, g] < best_oa:
                continue
            best_oa, best_g, best_kind = oa[d, g], g, (-1 if is_ignored[g] else 1)
        if best_kind == 1:
            gt_used[best_g] = True
        status_sorted[d] = best_kind
    status = np.empty_like(status_sorted)
    status[det_order] = status_sorted
    return status


def evaluate_image(gt: Mapping, dets: Mapping, setting: Setting | str, *, iou_threshold: float = IOU_THRESHOLD,
                   bounds: Sequence[float] = KAIST_BOUNDS, positive_labels: Sequence[str] = POSITIVE_LABELS,
                   ignore_labels: Sequence[str] = IGNORE_LABELS, det_height_margin: float | None = None,
                   box_format: str = "xyxy") -> ImageResult:
    """Filter and match one image for a setting (steps 1-3 of the module docstring).

    gt: see `filter_ground_truth`; dets: {"boxes": (D, 4) in `box_format`, "scores": (D,) finite}."""
    for key in ("boxes", "scores"):
        if key not in dets:
            raise ValueError(f"detections are missing the key {key!r}")
    det_boxes = _ltwh(dets["boxes"], box_format, "detection boxes")  # (D, 4)
    scores = _per_box(dets["scores"], det_boxes.shape[0], "detection scores", np.float64)  # (D,)
    if not np.isfinite(scores).all():
        raise ValueError("detection scores must be finite")
    gt_boxes, gt_ignore = filter_ground_truth(gt, setting, bounds=bounds, positive_labels=positive_labels,
                                              ignore_labels=ignore_labels, box_format=box_format)
    in_range = detection_height_mask(det_boxes, setting, margin=det_height_margin)  # (D,)
    status = np.zeros(det_boxes.shape[0], dtype=np.int8)  # (D,)
    status[in_range] = match_image(det_boxes=det_boxes[in_range], det_scores=scores[in_range], gt_boxes=gt_boxes,
                                   gt_ignore=gt_ignore, iou_threshold=iou_threshold)
    kept = in_range & (status != -1)
    return ImageResult(scores=scores, is_tp=status == 1, kept=kept, num_gt=int((~gt_ignore).sum()))


def miss_rate_curve(results: Sequence[ImageResult]) -> tuple[np.ndarray, np.ndarray]:
    """bbGt `compRoc` over the images of one setting: returns (fppi (K,), miss (K,)), one point after each of the K
    kept detections in descending score order (stable sort, images in the given order).

    FPPI divides by len(results), images without people or detections included. ValueError when there are no
    images or no regular ground-truth box (recall would be undefined)."""
    if len(results) == 0:
        raise ValueError("miss_rate_curve needs at least one image")
    num_gt = sum(r.num_gt for r in results)
    if num_gt == 0:
        raise ValueError("no regular (non-ignored) ground-truth box: recall is undefined")
    scores = np.concatenate([np.asarray(r.scores, dtype=np.float64)[r.kept] for r in results])  # (K,)
    is_tp = np.concatenate([np.asarray(r.is_tp, dtype=bool)[r.kept] for r in results])  # (K,)
    is_tp = is_tp[np.argsort(-scores, kind="stable")]
    fppi = np.cumsum(~is_tp) / len(results)
    miss = 1.0 - np.cumsum(is_tp) / num_gt
    return fppi, miss


def miss_rate_at_references(fppi, miss, *, references=FPPI_REFERENCES) -> np.ndarray:
    """(R,) miss rate at each reference FPPI: the miss of the LAST point with fppi <= reference, or 1 where no point
    qualifies (compRoc's prefix point (-inf, recall 0)); never the last point of the curve by a -1 index."""
    fppi = np.asarray(fppi, dtype=np.float64).reshape(-1)
    miss = np.asarray(miss, dtype=np.float64).reshape(-1)
    if fppi.shape != miss.shape:
        raise ValueError(f"fppi and miss must have the same length, got {fppi.shape[0]} and {miss.shape[0]}")
    fppi = np.concatenate([[-np.inf], fppi])  # (K + 1,)
    miss = np.concatenate([[1.0], miss])  # (K + 1,)
    out = []
    for ref in np.asarray(references, dtype=np.float64).reshape(-1):
        below = np.flatnonzero(fppi <= ref)  # never empty: the prefix point is at -inf
        out.append(miss[below[-1]])
    return np.array(out, dtype=np.float64)


def log_average_miss_rate(fppi, miss, *, references=FPPI_REFERENCES) -> float:
    """MR^-2 = exp(mean(log(max(1e-10, miss at each reference FPPI)))); finite even for a miss rate of 0."""
    at_refs = miss_rate_at_references(fppi, miss, references=references)
    return float(np.exp(np.mean(np.log(np.maximum(MISS_RATE_FLOOR, at_refs)))))


def _check_images(gts: Sequence[Mapping], dets: Sequence[Mapping], image_conditions) -> None:
    if len(gts) != len(dets):
        raise ValueError(f"gts has {len(gts)} images but dets has {len(dets)}")
    if image_conditions is not None:
        if len(image_conditions) != len(gts):
            raise ValueError(f"image_conditions has {len(image_conditions)} entries for {len(gts)} images")
        bad = sorted({c for c in image_conditions if c not in CONDITIONS})
        if bad:
            raise ValueError(f"image_conditions must be 'day' or 'night', got {bad}")


def _setting_results(gts: Sequence[Mapping], dets: Sequence[Mapping], setting: Setting,
                     image_conditions: Sequence[str] | None, image_kwargs: dict) -> list[ImageResult]:
    """`evaluate_image` on the images of the setting's subset, in the given order."""
    if setting.subset != "all" and image_conditions is None:
        raise ValueError(f"setting {setting.name!r} needs image_conditions ('day' / 'night' per image)")
    indices = [i for i in range(len(gts)) if setting.subset == "all" or image_conditions[i] == setting.subset]
    return [evaluate_image(gts[i], dets[i], setting, **image_kwargs) for i in indices]


def evaluate_setting(gts: Sequence[Mapping], dets: Sequence[Mapping], setting: Setting | str, *,
                     image_conditions: Sequence[str] | None = None, **image_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(fppi, miss) of one setting over the images of its subset (image_conditions[i] is "day" or "night"; needed
    by day / night settings). image_kwargs go to `evaluate_image`. ValueError as `miss_rate_curve`."""
    setting = get_setting(setting)
    _check_images(gts, dets, image_conditions)
    return miss_rate_curve(_setting_results(gts, dets, setting, image_conditions, image_kwargs))


def evaluate_miss_rate(gts: Sequence[Mapping], dets: Sequence[Mapping], *,
                       settings: Sequence[Setting | str] | None = None, image_conditions: Sequence[str] | None = None,
                       **image_kwargs) -> dict[str, float]:
    """MR^-2 of each setting: name -> value in [1e-10, 1], NaN where the setting has no image or no regular box
    (recall is undefined there; the MATLAB would divide by zero).

    gts[i], dets[i]: one image each (see `evaluate_image`, which receives image_kwargs). settings defaults to all of
    `SETTINGS` when image_conditions is given, else to those over all images."""
    curves = setting_curves(gts, dets, settings=settings, image_conditions=image_conditions, **image_kwargs)
    return {name: float("nan") if curve is None else log_average_miss_rate(*curve) for name, curve in curves.items()}


def setting_curves(gts: Sequence[Mapping], dets: Sequence[Mapping], *,
                   settings: Sequence[Setting | str] | None = None, image_conditions: Sequence[str] | None = None,
                   **image_kwargs) -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
    """The (fppi, miss) curve of each setting (see `evaluate_miss_rate` for the arguments); None where the setting
    has no image or no regular box."""
    _check_images(gts, dets, image_conditions)
    if settings is None:
        settings = [s for s in SETTINGS.values() if image_conditions is not None or s.subset == "all"]
    out = {}
    for setting in map(get_setting, settings):
        results = _setting_results(gts, dets, setting, image_conditions, image_kwargs)
        out[setting.name] = miss_rate_curve(results) if results and sum(r.num_gt for r in results) else None
    return out


def plot_miss_rate(curves: Mapping[str, tuple], path: str | Path, *, title: str = "",
                   references=FPPI_REFERENCES) -> Path:
    """Draw miss rate against FPPI on log-log axes to a PNG. curves: legend name -> (fppi, miss); the legend shows
    each curve's MR^-2. Points at FPPI 0 cannot be drawn on a log axis and are left out; miss is floored at 1e-10."""
    from matplotlib.figure import Figure  # renders with Agg without pyplot (no GUI backend, faster import)

    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    for name, (fppi, miss) in curves.items():
        fppi = np.asarray(fppi, dtype=np.float64).reshape(-1)
        miss = np.asarray(miss, dtype=np.float64).reshape(-1)
        value = log_average_miss_rate(fppi, miss, references=references)
        shown = fppi > 0
        ax.plot(fppi[shown], np.maximum(MISS_RATE_FLOOR, miss[shown]), drawstyle="steps-post",
                label=f"{value * 100:.2f}% {name}")
    ax.set(xscale="log", yscale="log", xlabel="false positives per image", ylabel="miss rate", title=title,
           xlim=(float(np.min(references)), float(np.max(references))), ylim=(0.05, 1.0))
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.savefig(path, dpi=100)
    return Path(path)


# ---- COCO-format datasets and results ----------------------------------------------------------------------------

def coco_inputs(dataset: Mapping, results: Sequence[Mapping], *, category: str = "person"):
    """(gts, dets, image_conditions) for `evaluate_miss_rate` from a COCO dataset dict and COCO box results.

    Every image counts, in id order. Ground truth: the bbGt label is the annotation's `kaist_label` where the KAIST
    converter (`minimask.data.kaist`) wrote one, else `category` for its regular boxes and "people" (ignored) for
    its crowd boxes, else the category name (removed); `occlusion` and `ignore` as stored (0 when absent); bounds
    [5, W - 5] x [5, H - 5] of each image ([5, 635] x [5, 507] for KAIST's frames). Detections: the results of
    `category`. image_conditions: each image's `daytime` where every image has one, else None."""
    names = {c["id"]: c["name"] for c in dataset["categories"]}
    if category not in names.values():
        raise ValueError(f"the dataset has no {category!r} category (it has {sorted(names.values())})")
    images = sorted(dataset["images"], key=lambda im: im["id"])
    row = {im["id"]: i for i, im in enumerate(images)}
    gts = [dict(boxes=[], labels=[], occlusion=[], ignore=[], bounds=image_bounds(width=im["width"],
                                                                                 height=im["height"]))
           for im in images]
    for ann in dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        name = names[ann["category_id"]]
        label = ann.get("kaist_label") or (("people" if ann.get("iscrowd") else name) if name == category else name)
        gt = gts[row[ann["image_id"]]]
        gt["boxes"].append([x, y, x + w, y + h])
        gt["labels"].append(label)
        gt["occlusion"].append(int(ann.get("occlusion", 0)))
        gt["ignore"].append(int(ann.get("ignore", 0)))
    dets = [dict(boxes=[], scores=[]) for _ in images]
    for r in results:
        if names.get(r["category_id"]) == category:
            x, y, w, h = r["bbox"]
            dets[row[r["image_id"]]]["boxes"].append([x, y, x + w, y + h])
            dets[row[r["image_id"]]]["scores"].append(r["score"])
    for d in gts + dets:
        d["boxes"] = np.asarray(d["boxes"], dtype=np.float64).reshape(-1, 4)  # (N, 4)
    conditions = [im.get("daytime") for im in images]
    return gts, dets, (conditions if all(c in CONDITIONS for c in conditions) else None)


def has_kaist_labels(dataset: Mapping) -> bool:
    """Whether a COCO dataset dict came from the KAIST converter (its annotations carry `kaist_label`)."""
    return any("kaist_label" in ann for ann in dataset["annotations"])


def coco_miss_rate(dataset: Mapping, results: Sequence[Mapping], *, category: str = "person"):
    """MR^-2 in percent of every setting the dataset allows (day / night where its images say which), and the
    Reasonable settings' curves for `plot_miss_rate`: returns ({name: MR^-2 %}, {name: (fppi, miss)})."""
    gts, dets, conditions = coco_inputs(dataset, results, category=category)
    curves = setting_curves(gts, dets, image_conditions=conditions)
    values = {name: float("nan") if c is None else 100.0 * log_average_miss_rate(*c) for name, c in curves.items()}
    return values, {name: c for name, c in curves.items() if name.startswith("Reasonable") and c is not None}


def as_metrics(values: Mapping[str, float]) -> dict[str, float | None]:
    """MR^-2 per setting as metrics.json / metrics.jsonl entries: "MR/<setting>", None where undefined (JSON has
    no NaN)."""
    return {f"MR/{name}": None if math.isnan(value) else value for name, value in values.items()}


def format_table(values: Mapping[str, float]) -> str:
    """The MR^-2 of each setting as a two-column text table (percent; lower is better; "n/a" where undefined)."""
    lines = [f"{'setting':<16} MR^-2 (%)"]
    lines += [f"{name:<16} {'n/a' if math.isnan(value) else f'{value:.2f}':>9}" for name, value in values.items()]
    return "\n".join(lines)
