"""Tests of the synthetic COCO dataset (minimask/data/synthetic.py): determinism, the generation spec, pycocotools
round trips (GT fed back as detections scores AP = 1), occlusion-aware masks and keypoints, and the on-disk cache."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from minimask.data import synthetic
from minimask.data.synthetic import (
    CATEGORY_NAMES,
    KEYPOINT_NAMES,
    PERSON_CATEGORY_ID,
    build_synthetic,
    synthetic_dataset,
)

COCO_KEYPOINT_NAMES = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A 60-image train / 8-image val build, shared by the statistics tests."""
    return build_synthetic(tmp_path_factory.mktemp("synthetic"), num_train=60, num_val=8, seed=0)


def _load(path):
    with open(path) as f:
        return json.load(f)


def _quiet_coco(path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _decode(ann):
    return mask_utils.decode(ann["segmentation"]).astype(bool)  # (H, W)


def _files(paths):
    out = {}
    for split_dir in (paths.train_images, paths.val_images):
        for name in sorted(os.listdir(split_dir)):
            out[f"{split_dir.name}/{name}"] = (split_dir / name).read_bytes()
    return out


def test_same_seed_is_byte_identical_in_any_number_of_processes_and_other_seed_differs(tmp_path):
    a = build_synthetic(tmp_path / "a", num_train=6, num_val=3, seed=0)
    b = build_synthetic(tmp_path / "b", num_train=6, num_val=3, seed=0, workers=2)  # rendered in two processes
    c = build_synthetic(tmp_path / "c", num_train=6, num_val=3, seed=1)
    for ann in ("train_ann", "val_ann"):
        assert getattr(a, ann).read_bytes() == getattr(b, ann).read_bytes()
        assert getattr(a, ann).read_bytes() != getattr(c, ann).read_bytes()
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len(fa) == 9 and fa == fb
    assert all(fa[k] != fc[k] for k in fa)
    # train and val come from different streams: no val image repeats a train image.
    train = {v for k, v in fa.items() if k.startswith("train/")}
    assert not any(v in train for k, v in fa.items() if k.startswith("val/"))


def test_layout_sizes_and_counts(sample):
    assert sample.train_ann == sample.root / "annotations" / "instances_train.json"
    assert sample.val_ann == sample.root / "annotations" / "instances_val.json"
    data = _load(sample.train_ann)
    assert len(data["images"]) == 60 and len(_load(sample.val_ann)["images"]) == 8
    per_image = {im["id"]: 0 for im in data["images"]}
    for ann in data["annotations"]:
        per_image[ann["image_id"]] += 1
    assert min(per_image.values()) >= 1 and max(per_image.values()) <= 10
    assert len(set(per_image.values())) >= 5  # the count really varies
    hs, ws = [], []
    for im in data["images"]:
        with Image.open(sample.train_images / im["file_name"]) as img:
            assert img.size == (im["width"], im["height"]) and img.mode == "RGB"
        hs.append(im["height"])
        ws.append(im["width"])
    assert 192 <= min(hs) and max(hs) <= 320 and 192 <= min(ws) and max(ws) <= 320
    assert hs != ws  # independent sides
    assert {a["category_id"] for a in data["annotations"]} == set(range(1, len(CATEGORY_NAMES) + 1))
    assert [c["name"] for c in data["categories"]] == list(CATEGORY_NAMES)
    assert len(CATEGORY_NAMES) >= 6 and CATEGORY_NAMES[PERSON_CATEGORY_ID - 1] == "person"


def test_masks_boxes_areas_and_occlusion(sample):
    data = _load(sample.train_ann)
    images = {im["id"]: im for im in data["images"]}
    by_image = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    overlapping_boxes, sides = 0, []
    for image_id, anns in by_image.items():
        im = images[image_id]
        cover = np.zeros((im["height"], im["width"]), dtype=np.int64)
        boxes = []
        for ann in anns:
            assert ann["iscrowd"] == 0 and ann["segmentation"]["size"] == [im["height"], im["width"]]
            m = _decode(ann)
            ys, xs = np.nonzero(m)
            assert m.sum() == ann["area"] >= 20
            # COCO: tight box of the visible mask, continuous xywh (x2 = max col + 1).
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            cover += m
            x, y, w, h = ann["bbox"]
            boxes.append((x, y, x + w, y + h))
            sides.append(max(w, h))
        assert cover.max() == 1  # visible masks are disjoint: occluded pixels belong to the later object only
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                overlapping_boxes += min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])
    assert overlapping_boxes >= 10  # overlaps are common, so disjointness above is a real check
    assert min(sides) < 16 and max(sides) > 96 and max(sides) <= 180  # small and large objects, 12..140 px spec


def test_pycocotools_reads_it_and_keypoints_are_coco(sample):
    coco = _quiet_coco(sample.train_ann)
    person = coco.loadCats(PERSON_CATEGORY_ID)[0]
    assert person["name"] == "person" and person["keypoints"] == COCO_KEYPOINT_NAMES == list(KEYPOINT_NAMES)
    assert len(person["skeleton"]) == 19 and all(1 <= i <= 17 for pair in person["skeleton"] for i in pair)
    anns = coco.loadAnns(coco.getAnnIds(catIds=[PERSON_CATEGORY_ID]))
    assert len(anns) >= 20
    assert all("keypoints" not in a for a in coco.loadAnns(coco.getAnnIds(catIds=[1, 2, 3, 4, 5])))
    seen_v, upright, joints_inside, joints = set(), 0, 0, 0
    for ann in anns:
        img = coco.loadImgs(ann["image_id"])[0]
        kp = np.asarray(ann["keypoints"]).reshape(17, 3)
        assert kp.dtype.kind == "i" and ann["num_keypoints"] == int((kp[:, 2] > 0).sum())
        assert np.array_equal(coco.annToMask(ann).astype(bool), _decode(ann))
        m = _decode(ann)
        for x, y, v in kp:
            seen_v.add(int(v))
            if v == 0:
                assert x == 0 and y == 0
            else:
                assert 0 <= x < img["width"] and 0 <= y < img["height"]
                assert m[y, x] == (v == 2)  # visible keypoints lie on the visible mask, occluded ones do not
        if ann["bbox"][3] >= 40:  # limbs >= 2.4 px thick: a visible joint sits inside its figure, not on an edge
            for x, y, v in kp[5:]:
                if v == 2 and 1 <= x < img["width"] - 1 and 1 <= y < img["height"] - 1:
                    joints += 1
                    joints_inside += bool(m[y, x - 1:x + 2].all() and m[y - 1:y + 2, x].all())  # 4-neighbours
        if kp[0, 2] and kp[15, 2] and kp[16, 2]:
            assert kp[0, 1] < kp[15, 1] and kp[0, 1] < kp[16, 1]  # nose above the ankles: upright figure
            upright += 1
        if kp[5, 2] and kp[6, 2]:
            assert kp[5, 0] >= kp[6, 0]  # frontal figure: the subject's left shoulder is on the image's right
    assert seen_v == {0, 1, 2} and upright >= 5
    assert joints >= 50 and joints_inside >= 0.95 * joints, (joints_inside, joints)  # occluders clip a few


def _ap(gt_path, results, iou_type, cat_ids=None):
    gt = _quiet_coco(gt_path)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iou_type)
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_ground_truth_as_detections_scores_ap_one(sample):
    data = _load(sample.val_ann)
    anns = data["annotations"]
    boxes = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
             for a in anns]
    segms = [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"],
              "score": 1.0} for a in anns]
    # persons with no labelled keypoint are ignored by COCOeval, so they are not submitted.
    kps = [{"image_id": a["image_id"], "category_id": a["category_id"], "keypoints": a["keypoints"], "score": 1.0}
           for a in anns if a.get("num_keypoints", 0) > 0]
    assert len(kps) >= 2
    assert _ap(sample.val_ann, boxes, "bbox")[0] == pytest.approx(1.0)
    assert _ap(sample.val_ann, segms, "segm")[0] == pytest.approx(1.0)
    # keypoints live only on persons: COCOeval must be restricted to that category.
    assert _ap(sample.val_ann, kps, "keypoints", cat_ids=[PERSON_CATEGORY_ID])[0] == pytest.approx(1.0)
    # and the check can fail: dropping half of the boxes lowers AP.
    assert _ap(sample.val_ann, boxes[::2], "bbox")[0] < 0.9


def test_cache_reuses_rebuilds_partial_and_changed_builds(tmp_path, monkeypatch):
    calls = []
    real_build = synthetic.build_synthetic

    def counting_build(root, **kw):
        calls.append(kw)
        return real_build(root, **kw)

    monkeypatch.setattr(synthetic, "build_synthetic", counting_build)
    monkeypatch.setenv("MINIMASK_CACHE", str(tmp_path / "cache"))
    paths = synthetic_dataset(num_train=3, num_val=2)
    assert paths.root == tmp_path / "cache" / "synthetic-v1" and len(calls) == 1
    assert paths.train_ann.is_file() and paths.val_ann.is_file() and (paths.val_images / "000001.jpg").is_file()
    marker = paths.root / synthetic.MARKER_NAME
    stamps = [p.stat().st_mtime_ns for p in (paths.train_ann, marker, paths.train_images / "000000.jpg")]

    again = synthetic_dataset(num_train=3, num_val=2)
    assert again == paths and len(calls) == 1
    assert stamps == [p.stat().st_mtime_ns for p in (paths.train_ann, marker, paths.train_images / "000000.jpg")]

    marker.unlink()  # a build interrupted before its marker is rebuilt
    synthetic_dataset(num_train=3, num_val=2)
    assert len(calls) == 2 and marker.is_file()

    synthetic_dataset(num_train=4, num_val=2)  # other parameters: rebuilt, old files replaced
    assert len(calls) == 3 and len(os.listdir(paths.train_images)) == 4
    assert json.loads(marker.read_text())["num_train"] == 4
    assert len(_load(paths.train_ann)["images"]) == 4

    (paths.train_images / "notes.txt").write_text("not ours")
    synthetic_dataset(num_train=2, num_val=2)  # shrinking removes our stale images and nothing else
    assert len(calls) == 4
    assert sorted(os.listdir(paths.train_images)) == ["000000.jpg", "000001.jpg", "notes.txt"]


def test_bad_counts_raise(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        build_synthetic(tmp_path, num_train=0, num_val=1)


def test_coco_loader_reads_it(sample):
    coco_mod = pytest.importorskip("minimask.data.coco")
    ds = coco_mod.CocoDetection(str(sample.val_ann), str(sample.val_images), keypoints=False)
    data = _load(sample.val_ann)
    image, target = ds[0]
    anns = [a for a in data["annotations"] if a["image_id"] == int(target["image_id"])]
    im = next(i for i in data["images"] if i["id"] == int(target["image_id"]))
    assert tuple(image.shape) == (3, im["height"], im["width"])
    expected = np.asarray([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=np.float32)
    assert np.allclose(target["boxes"].numpy(), expected)
    assert np.array_equal(target["masks"].numpy().astype(bool), np.stack([_decode(a) for a in anns]))


def test_keypoint_mode_keeps_the_shapes(sample):
    # The person category defines keypoints, so the loader goes into keypoint mode by itself; the shapes must stay
    # as box/mask targets with unlabelled (v = 0) keypoints rather than be dropped as "persons without keypoints".
    from minimask.data.coco import CocoDetection

    ds = CocoDetection(str(sample.val_ann), str(sample.val_images))
    data = _load(sample.val_ann)
    assert ds.keypoints and ds.num_keypoints == 17
    assert ds.stats["kept_annotations"] == len(data["annotations"]) and len(ds) == len(data["images"])
    person = ds.category_ids.index(PERSON_CATEGORY_ID) + 1
    for i in range(len(ds)):
        _, target = ds[i]
        shapes = target["labels"] != person
        assert (target["keypoints"][shapes] == 0).all()
        assert (target["keypoints"][~shapes][..., 2] > 0).any(dim=1).all()


def _distributed_worker(rank, world_size, init_file, root, log_dir):
    import torch.distributed as dist

    from minimask.data import synthetic as syn

    real_build = syn.build_synthetic

    def logged_build(r, **kw):
        open(os.path.join(log_dir, f"built_by_{rank}"), "w").close()
        return real_build(r, **kw)

    syn.build_synthetic = logged_build
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        paths = syn.synthetic_dataset(root, num_train=3, num_val=2)
        assert paths.train_ann.is_file()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_rank0_builds_others_wait(tmp_path):
    mp = pytest.importorskip("torch.multiprocessing")
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "data"), str(log_dir)),
             nprocs=2, join=True)
    assert sorted(os.listdir(log_dir)) == ["built_by_0"]
    assert (tmp_path / "data" / synthetic.MARKER_NAME).is_file()
