"""COCO evaluation: model outputs -> COCO result dicts, inference over a test loader (optionally with test-time
augmentation), merging of distributed shards, and pycocotools' COCOeval with per-category AP tables.

The paper ("Rethinking ImageNet Pre-training", He et al. 2019) reports COCO box AP, mask AP (Sec. 4) and keypoint AP
(Sec. 5.3) on val2017, and its enhanced results (Sec. 4.4 / Table 2) add multi-scale + flip test-time augmentation.
Conventions follow detectron2 (`evaluation/coco_evaluation.py`, `modeling/test_time_augmentation.py`):
- predictions are made in the model-input pixels and scaled per axis to the original image (orig / input);
- masks are compared at the original resolution as compressed RLE, binarised at >= 0.5 (Mask R-CNN Sec. 3);
- keypoints are continuous coordinates inside minimask (COCO integer index + 0.5) and get -0.5 on export;
- mask AP uses the mask area, not the box area, for the small / medium / large split (the "bbox" key is dropped
  before `loadRes`, as detectron2 does).
All functions are stateless; `evaluate.py` at the top of the repository is the command-line front end.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from minimask.data.transforms import COCO_FLIP_MAP, export_keypoints, flip_permutation, resize, shortest_edge_size
from minimask.ops.boxes import batched_nms

IOU_TYPES = ("bbox", "segm", "keypoints")  # evaluation order
RESULT_KEYS = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}  # key that marks a result's type
# The order of COCOeval.stats (pycocotools `summarize`): 12 numbers for boxes and masks, 10 for keypoints.
METRIC_NAMES = {
    "bbox": ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"),
    "segm": ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"),
    "keypoints": ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"),
}
# Masks are resized to the original image this many bytes of float32 at a time (bounds memory on large images).
MASK_CHUNK_BYTES = 1 << 27


# ---- model outputs -> COCO results -------------------------------------------------------------------------------

def predictions_to_coco(outputs: list[dict], image_ids, orig_sizes, input_sizes, category_ids, *,
                        mask_threshold: float = 0.5) -> list[dict]:
    """Turn per-image model outputs into COCO result dicts in the ORIGINAL image's pixels.

    Args:
        outputs: one dict per image (the model's eval output): `boxes` (N, 4) xyxy in the model-input pixels,
            `labels` (N,) int64 in 1..K, `scores` (N,), optionally `masks` (N, 1, h, w) probabilities (binary
            uint8 / bool masks are taken as probabilities 0 / 1), `keypoints` (N, P, 3) (x, y, v) continuous
            pixels and `keypoints_scores` (N, P) (if absent, the keypoints' third column is used as the score).
        image_ids: one COCO image id per image.
        orig_sizes: (H0, W0) of each original image; input_sizes: (h, w) of each image as the model saw it.
        category_ids: (K,) list or tensor; label k is dataset category category_ids[k - 1].
        mask_threshold: masks are resized bilinearly (on the probabilities) to (H0, W0), then binarised at >= this.
    Returns:
        One dict per detection: `image_id`, `category_id`, `bbox` [x, y, w, h], `score`, plus `segmentation`
        (compressed RLE, `counts` a str) when masks are given and `keypoints` (flat [x, y, score] * P, with the
        -0.5 export convention) when keypoints are given, except for detections whose keypoints all have v = 0 (a
        class without keypoints, `model.keypoint_head.classes`). Images with no detections contribute nothing.
    """
    if not (len(outputs) == len(image_ids) == len(orig_sizes) == len(input_sizes)):
        raise ValueError(f"outputs, image_ids, orig_sizes and input_sizes differ in length: {len(outputs)}, "
                         f"{len(image_ids)}, {len(orig_sizes)}, {len(input_sizes)}")
    cat_ids = [int(c) for c in (category_ids.tolist() if isinstance(category_ids, Tensor) else category_ids)]
    results = []
    for out, image_id, orig, size in zip(outputs, image_ids, orig_sizes, input_sizes):
        results.extend(_image_to_coco(out, int(image_id), _hw(orig), _hw(size), cat_ids, mask_threshold))
    return results


def _hw(size) -> tuple[int, int]:
    h, w = (int(v) for v in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"image sizes must be positive (h, w), got {tuple(size)}")
    return h, w


def _image_to_coco(out: dict, image_id: int, orig: tuple[int, int], size: tuple[int, int], cat_ids: list[int],
                   mask_threshold: float) -> list[dict]:
    boxes, scores, labels = out["boxes"], out["scores"], out["labels"]
    n = boxes.shape[0]
    if boxes.dim() != 2 or boxes.shape[1] != 4 or scores.shape != (n,) or labels.shape != (n,):
        raise ValueError(f"image {image_id}: expected boxes (N, 4), scores (N,), labels (N,); got "
                         f"{tuple(boxes.shape)}, {tuple(scores.shape)}, {tuple(labels.shape)}")
    if n == 0:
        return []
    (h0, w0), (h, w) = orig, size
    sx, sy = w0 / w, h0 / h  # per-axis scale from the model input back to the original image
    xyxy = boxes.detach().cpu().double() * torch.tensor([sx, sy, sx, sy], dtype=torch.float64)  # (N, 4)
    xywh = torch.cat((xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]), dim=1).tolist()
    label_list = labels.tolist()
    bad = [k for k in label_list if not 1 <= k <= len(cat_ids)]
    if bad:
        raise ValueError(f"image {image_id}: labels must lie in 1..{len(cat_ids)} (the category map), got {bad[0]}")
    results = [{"image_id": image_id, "category_id": cat_ids[k - 1], "bbox": b, "score": s}
               for k, b, s in zip(label_list, xywh, scores.tolist())]

    if "masks" in out:
        masks = out["masks"]
        if masks.shape != (n, 1, h, w):
            raise ValueError(f"image {image_id}: masks must be (N, 1, h, w) = {(n, 1, h, w)}, got {tuple(masks.shape)}")
        for r, rle in zip(results, masks_to_rle(masks[:, 0], orig, mask_threshold)):
            r["segmentation"] = rle
    if "keypoints" in out:
        kps = out["keypoints"].detach().cpu().double()  # (N, P, 3)
        if kps.dim() != 3 or kps.shape[0] != n or kps.shape[2] != 3:
            raise ValueError(f"image {image_id}: keypoints must be (N, P, 3), got {tuple(kps.shape)}")
        kp_scores = out["keypoints_scores"].detach().cpu().double() if "keypoints_scores" in out else kps[..., 2]
        # Scale the continuous coordinates, then -0.5: COCO keypoints are integer pixel indices (detectron2).
        xy = export_keypoints(kps * torch.tensor([sx, sy, 1.0], dtype=torch.float64))[..., :2]  # (N, P, 2)
        flat = torch.cat((xy, kp_scores[..., None]), dim=2).flatten(1).tolist()  # (N, 3P)
        predicted = (kps[..., 2] > 0).any(dim=1).tolist()  # (N,) all v = 0: a class without keypoints
        for r, k, p in zip(results, flat, predicted):
            if p:
                r["keypoints"] = k
    return results


def masks_to_rle(masks: Tensor, size: tuple[int, int], threshold: float = 0.5) -> list[dict]:
    """(N, h, w) mask probabilities -> N compressed RLEs of the masks resized to size = (H, W) and binarised.

    Resizing is bilinear on the probabilities (align_corners=False), then >= threshold; it runs on the masks'
    device, a chunk of masks at a time so the float32 temporary stays under MASK_CHUNK_BYTES. RLE `counts` are
    decoded to str so the result is JSON-serialisable. N == 0 gives [].
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be (N, h, w), got {tuple(masks.shape)}")
    height, width = size
    chunk = max(1, MASK_CHUNK_BYTES // (4 * height * width))
    rles = []
    for part in masks.detach().split(chunk):
        part = part[:, None].float()  # (n, 1, h, w)
        if part.shape[-2:] != (height, width):
            part = F.interpolate(part, size=(height, width), mode="bilinear", align_corners=False)
        binary = (part[:, 0] >= threshold).to(torch.uint8)  # (n, H, W)
        # pycocotools wants (H, W, n) in Fortran order: that is a C-ordered (n, W, H) array, transposed.
        fortran = binary.transpose(1, 2).contiguous().cpu().numpy().transpose(2, 1, 0)  # (H, W, n)
        for rle in mask_util.encode(np.asfortranarray(fortran)):
            rle["counts"] = rle["counts"].decode("ascii")
            rles.append(rle)
    return rles


# ---- inference ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def inference(model: torch.nn.Module, loader, *, device, category_ids=None, mask_threshold: float = 0.5,
              tta_scales: tuple[int, ...] | None = None, tta_flip: bool = False, tta_max_size: int = 4000,
              tta_nms_thresh: float = 0.5, tta_detections_per_image: int = 100,
              seen_image_ids: list | None = None) -> list[dict]:
    """Run `model` (in eval mode, without gradients) over `loader` and return this process's COCO results.

    Each batch is (images, targets) as from the test loader: images a list of (3, h, w) float tensors, targets
    dicts carrying `image_id` and `orig_size` (H0, W0). Outputs are mapped to the original pixels with
    `predictions_to_coco`, the model input size being each image's (h, w). `category_ids` defaults to the model's
    `category_ids` buffer. If `seen_image_ids` is a list, the id of every image processed is appended to it (for
    `gather_results`). The model's train/eval mode is restored afterwards.

    Test-time augmentation (the paper's enhanced results) runs when `tta_scales` is given or `tta_flip` is True:
    see `tta_predict`.
    """
    if category_ids is None:
        category_ids = model.category_ids
    use_tta = tta_scales is not None or tta_flip
    was_training = model.training
    model.eval()
    results = []
    try:
        for images, targets in loader:
            images = [img.to(device) for img in images]
            image_ids = [int(t["image_id"]) for t in targets]
            orig_sizes = [_hw(t["orig_size"]) for t in targets]
            if use_tta:
                outputs = tta_predict(model, images, orig_sizes, scales=tta_scales, flip=tta_flip,
                                      max_size=tta_max_size, nms_thresh=tta_nms_thresh,
                                      detections_per_image=tta_detections_per_image, mask_threshold=mask_threshold)
                input_sizes = orig_sizes  # TTA outputs are already in the original pixels
            else:
                outputs = model(images)
                input_sizes = [tuple(img.shape[-2:]) for img in images]
            results.extend(predictions_to_coco(outputs, image_ids, orig_sizes, input_sizes, category_ids,
                                               mask_threshold=mask_threshold))
            if seen_image_ids is not None:
                seen_image_ids.extend(image_ids)
    finally:
        model.train(was_training)
    return results


def tta_predict(model, images: list[Tensor], orig_sizes: list[tuple[int, int]], *, scales=None, flip=False,
                max_size=4000, nms_thresh=0.5, detections_per_image=100, mask_threshold=0.5) -> list[dict]:
    """Multi-scale (+ horizontal flip) test-time augmentation; returns per-image outputs in ORIGINAL pixels.

    Each image is run at every shorter-side scale in `scales` (None: the image as given) and, with `flip`, also
    mirrored. Every run's boxes (and keypoints) are mapped back to the original image; per image, all runs'
    detections are concatenated and merged by per-class NMS at `nms_thresh`, keeping the `detections_per_image`
    best (detectron2 `GeneralizedRCNNWithTTA` merges boxes the same way).
    Masks: re-predicting masks on the merged boxes would need the model's internals, so each kept detection keeps
    the mask it was predicted with at its own scale, resized (bilinear) to the original size and binarised at
    `mask_threshold` (returned as uint8 0/1 masks (N, 1, H0, W0)). Keypoints are flipped back with the COCO
    left/right swap (`COCO_FLIP_MAP`).
    """
    runs = [(s, f) for s in (scales if scales is not None else (None,)) for f in ((False, True) if flip else (False,))]
    per_image: list[list[dict]] = [[] for _ in images]
    for scale, flipped in runs:
        batch = [img if scale is None else resize(img, None, shortest_edge_size(*img.shape[-2:], scale, max_size))[0]
                 for img in images]  # the test pipeline's resize (detectron2 ResizeShortestEdge)
        if flipped:
            batch = [img.flip(-1) for img in batch]
        for i, (out, img) in enumerate(zip(model(batch), batch)):
            per_image[i].append(_to_original(out, tuple(img.shape[-2:]), orig_sizes[i], flipped))
    return [_merge_runs(runs_i, orig, nms_thresh, detections_per_image, mask_threshold)
            for runs_i, orig in zip(per_image, orig_sizes)]


def _to_original(out: dict, size: tuple[int, int], orig: tuple[int, int], flipped: bool) -> dict:
    """One run's outputs with boxes / keypoints in original pixels and masks un-flipped (still at run size)."""
    (h, w), (h0, w0) = size, orig
    boxes, result = out["boxes"], dict(out)
    if flipped:  # continuous coordinates: x in the mirrored image is w - x in the image
        boxes = torch.stack((w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]), dim=1)  # (N, 4)
    result["boxes"] = boxes * boxes.new_tensor([w0 / w, h0 / h, w0 / w, h0 / h])
    if "masks" in out and flipped:
        result["masks"] = out["masks"].flip(-1)
    if "keypoints" in out:
        kps = out["keypoints"].clone()  # (N, P, 3)
        if flipped:
            perm = flip_permutation(COCO_FLIP_MAP, kps.shape[1])  # new point j <- mirrored point perm[j]
            kps = kps[:, perm]
            kps[..., 0] = w - kps[..., 0]
            if "keypoints_scores" in out:
                result["keypoints_scores"] = out["keypoints_scores"][:, perm]
        kps[..., 0] *= w0 / w
        kps[..., 1] *= h0 / h
        result["keypoints"] = kps
    return result


def _merge_runs(runs: list[dict], orig: tuple[int, int], nms_thresh: float, detections_per_image: int,
                mask_threshold: float) -> dict:
    """Concatenate the runs' detections of one image, per-class NMS, top-k; masks pasted at the original size."""
    boxes = torch.cat([r["boxes"] for r in runs])  # (M, 4)
    scores = torch.cat([r["scores"] for r in runs])  # (M,)
    labels = torch.cat([r["labels"] for r in runs])  # (M,)
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_image]  # (N,)
    merged = {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
    for key in ("keypoints", "keypoints_scores"):
        if key in runs[0]:
            merged[key] = torch.cat([r[key] for r in runs])[keep]
    if "masks" in runs[0]:
        origin = [(i, j) for i, r in enumerate(runs) for j in range(r["boxes"].shape[0])]  # (run, row) of each
        masks = torch.zeros((keep.shape[0], 1, *orig), dtype=torch.uint8, device=boxes.device)  # (N, 1, H0, W0)
        for n, k in enumerate(keep.tolist()):  # one mask at a time: memory stays at one original-size image
            run, row = origin[k]
            prob = F.interpolate(runs[run]["masks"][row:row + 1].float(), size=orig, mode="bilinear",
                                 align_corners=False)  # (1, 1, H0, W0)
            masks[n] = (prob[0] >= mask_threshold).to(torch.uint8)
        merged["masks"] = masks
    return merged


# ---- distributed merge -------------------------------------------------------------------------------------------

def gather_results(local_results: list[dict], local_image_ids: list[int], expected_image_ids) -> list[dict] | None:
    """Collect every process's results on rank 0 and check that each expected image was evaluated exactly once.

    Uses `torch.distributed.gather_object` when a process group with several processes is initialised (the
    result dicts are pickled); returns the merged list on rank 0 and None on the other ranks. Without a process
    group this is `merge_shards` of the single local shard.
    """
    shard = (list(local_image_ids), local_results)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rank = dist.get_rank()
        shards = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(shard, shards, dst=0)
        if rank != 0:
            return None
    else:
        shards = [shard]
    return merge_shards(shards, expected_image_ids)


def merge_shards(shards: list[tuple[list[int], list[dict]]], expected_image_ids) -> list[dict]:
    """Merge per-process (image_ids, results) shards into one results list sorted by image id (stable).

    Raises RuntimeError if an image was processed by more than one shard (or twice), if an expected image was
    not processed, if an unexpected one was, or if a shard holds results of an image it did not process: any of
    these would silently bias the AP.
    """
    counts = Counter(i for ids, _ in shards for i in ids)
    expected = {int(i) for i in expected_image_ids}
    problems = []
    duplicated = sorted(i for i, c in counts.items() if c > 1)
    missing = sorted(expected - counts.keys())
    unexpected = sorted(counts.keys() - expected)
    for what, ids in (("evaluated more than once", duplicated), ("never evaluated", missing),
                      ("not in the dataset", unexpected)):
        if ids:
            problems.append(f"{len(ids)} image(s) {what} (e.g. {ids[:5]})")
    for rank, (ids, results) in enumerate(shards):
        stray = sorted({r["image_id"] for r in results} - set(ids))
        if stray:
            problems.append(f"shard {rank} has results for images it did not process (e.g. {stray[:5]})")
    if problems:
        raise RuntimeError("inconsistent evaluation shards: " + "; ".join(problems))
    merged = [r for _, results in shards for r in results]
    merged.sort(key=lambda r: r["image_id"])
    return merged


# ---- COCOeval ----------------------------------------------------------------------------------------------------

def result_type(results: list[dict]) -> str:
    """The evaluation type of a results list: "segm" if it has `segmentation`, else "keypoints" if it has
    `keypoints`, else "bbox" (also for an empty list). Every entry must agree with the first."""
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise ValueError("results must be a list of COCO result objects (dicts)")
    if not results:
        return "bbox"
    kind = next((t for t in ("segm", "keypoints") if RESULT_KEYS[t] in results[0]), "bbox")
    missing = sum(RESULT_KEYS[kind] not in r for r in results)
    if missing:
        raise ValueError(f"results mix types: the first is {kind} but {missing} lack {RESULT_KEYS[kind]!r}")
    return kind


def evaluate_coco(coco_gt: COCO | str, results: list[dict], iou_types=IOU_TYPES, *, verbose: bool = True) -> dict:
    """COCOeval of `results` against `coco_gt` for the requested types the results contain, in the order bbox,
    segm, keypoints.

    Prints pycocotools' summary (12 numbers; 10 for keypoints) and, for bbox and segm, a per-category AP table.
    Returns a flat JSON-serialisable dict in percent: "bbox/AP", "bbox/AP50", ... (METRIC_NAMES) and per-category
    "bbox/AP-<name>" / "segm/AP-<name>" for every category with ground truth. A metric pycocotools cannot define
    (-1: no ground truth in that area range) is None. Empty `results`: every requested type scores 0, with a
    warning. Raises ValueError for unknown types, results of images not in `coco_gt`, non-empty results that hold
    none of the requested types, and keypoint evaluation without keypoint ground truth.
    """
    if isinstance(coco_gt, str):
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO(coco_gt)
    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown:
        raise ValueError(f"unknown iou type(s) {unknown}; choose from {IOU_TYPES}")
    types = [t for t in IOU_TYPES if t in iou_types and (not results or any(RESULT_KEYS[t] in r for r in results))]
    if results and not types:
        raise ValueError(f"the results hold none of the requested types {tuple(iou_types)}")
    metrics = {}
    for iou_type in types:
        metrics.update(_evaluate_one(coco_gt, results, iou_type, verbose))
    return metrics


def _evaluate_one(coco_gt: COCO, results: list[dict], iou_type: str, verbose: bool) -> dict:
    if iou_type == "keypoints" and not any("keypoints" in a for a in coco_gt.dataset.get("annotations", [])):
        raise ValueError("keypoint evaluation needs an annotation file with keypoints (person_keypoints_*.json)")
    detections = [dict(r) for r in results if RESULT_KEYS[iou_type] in r]  # copies: loadRes writes into them
    # Keypoint AP is defined only for the categories that have keypoints (COCO: person). Datasets that mix them with
    # other classes (the synthetic set) must restrict both the results and COCOeval's categories to those.
    keypoint_categories = [c["id"] for c in coco_gt.dataset["categories"] if c.get("keypoints")]
    if iou_type == "keypoints":
        detections = [d for d in detections if d["category_id"] in keypoint_categories]
    if iou_type == "segm":
        for d in detections:
            d.pop("bbox", None)  # detectron2: else loadRes takes the box area as the mask's area (APs/APm/APl)
    if not detections:
        warnings.warn(f"no {iou_type} predictions: {iou_type} AP is 0", stacklevel=3)
        metrics = {f"{iou_type}/{name}": 0.0 for name in METRIC_NAMES[iou_type]}
        if iou_type != "keypoints":
            with_gt = {a["category_id"] for a in coco_gt.dataset["annotations"] if not a.get("iscrowd", 0)}
            metrics.update({f"{iou_type}/AP-{c['name']}": 0.0 for c in coco_gt.loadCats(sorted(with_gt))})
        return metrics
    stray = {d["image_id"] for d in detections} - set(coco_gt.getImgIds())
    if stray:
        raise ValueError(f"results refer to {len(stray)} image id(s) not in the annotation file, "
                         f"e.g. {sorted(stray)[:5]}")

    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:  # loadRes / evaluate / accumulate print progress chatter; only the summary is wanted
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(detections), iou_type)
        if iou_type == "keypoints":
            coco_eval.params.catIds = keypoint_categories
        coco_eval.evaluate()
        coco_eval.accumulate()
    if verbose:
        print(f"Evaluation results for {iou_type}:")
        coco_eval.summarize()
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval.summarize()
    metrics = {f"{iou_type}/{name}": (float(v) * 100 if v >= 0 else None)
               for name, v in zip(METRIC_NAMES[iou_type], coco_eval.stats)}
    if iou_type != "keypoints":
        per_category = per_category_ap(coco_eval)
        if verbose:
            print(f"Per-category {iou_type} AP:\n{format_table(per_category)}")
        metrics.update({f"{iou_type}/AP-{name}": ap for name, ap in per_category.items()})
    return metrics


def per_category_ap(coco_eval: COCOeval) -> dict[str, float]:
    """AP (percent, IoU .50:.95, area all, maxDets 100) of each category with ground truth, by category name.

    Categories without ground truth have no defined precision (-1 in COCOeval) and are left out, so the mean of
    this dict is the summary AP."""
    precision = coco_eval.eval["precision"]  # (T, R, K, A, M): IoU thresholds, recall, category, area, maxDets
    names = {c["id"]: c["name"] for c in coco_eval.cocoGt.loadCats(coco_eval.params.catIds)}
    out = {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        if p.size:
            out[names[cat_id]] = float(p.mean()) * 100
    return out


def format_table(per_category: dict[str, float], columns: int = 3) -> str:
    """A plain-text table of `name AP` pairs, `columns` pairs per row."""
    if not per_category:
        return "(no category has ground truth)"
    width = max(len("category"), *(len(n) for n in per_category))
    cells = [f"{name:<{width}} {ap:7.3f}" for name, ap in per_category.items()]
    header = " | ".join([f"{'category':<{width}} {'AP':>7}"] * min(columns, len(cells)))
    rows = [" | ".join(cells[i:i + columns]) for i in range(0, len(cells), columns)]
    return "\n".join([header, "-" * len(header), *rows])
