"""Tests of the Penn-Fudan -> COCO converter (minimask/data/pennfudan.py): hand-made masks and a tiny fake dataset
always; the real dataset (counts, split, boxes against the PASCAL text boxes, GT-as-detections AP) when present."""
import contextlib
import io
import json

import numpy as np
import pytest
from conftest import shared_data_dir
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from minimask.data.pennfudan import convert_pennfudan, mask_instances, read_pascal_boxes


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_mask_instances_hand_computed():
    mask = np.zeros((5, 6), dtype=np.uint8)
    mask[1:3, 2:5] = 1  # rows 1-2, cols 2-4
    mask[4, 0] = 3  # a single pixel; label 2 absent
    anns = mask_instances(mask)
    assert [a["bbox"] for a in anns] == [[2, 1, 3, 2], [0, 4, 1, 1]]  # x2 = max col + 1 (continuous)
    assert [a["area"] for a in anns] == [6, 1]
    assert all(a["category_id"] == 1 and a["iscrowd"] == 0 for a in anns)
    assert np.array_equal(mask_utils.decode(anns[0]["segmentation"]), (mask == 1).astype(np.uint8))
    assert isinstance(anns[0]["segmentation"]["counts"], str)  # compressed RLE, JSON-serialisable
    assert mask_instances(np.zeros((3, 3), dtype=np.uint8)) == []
    with pytest.raises(ValueError, match="mask"):
        mask_instances(np.zeros((3, 3, 3), dtype=np.uint8))


def test_read_pascal_boxes_converts_one_based_inclusive(tmp_path):
    txt = tmp_path / "x.txt"
    txt.write_text('Bounding box for object 1 "PASpersonWalking" (Xmin, Ymin) - (Xmax, Ymax) : (1, 1) - (10, 20)\n'
                   'Bounding box for object 2 "PASpersonWalking" (Xmin, Ymin) - (Xmax, Ymax) : (5, 6) - (5, 6)\n')
    assert read_pascal_boxes(txt).tolist() == [[0, 0, 10, 20], [4, 5, 5, 6]]


def _fake_dataset(root, sizes):
    (root / "PNGImages").mkdir(parents=True)
    (root / "PedMasks").mkdir()
    for i, (h, w) in enumerate(sizes):
        name = f"Ped{i:05d}"
        Image.new("RGB", (w, h), (i, 0, 0)).save(root / "PNGImages" / f"{name}.png")
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[: i + 2, : i + 3] = 1
        if i % 2:
            mask[h - 2:, w - 4:] = 2
        Image.fromarray(mask).save(root / "PedMasks" / f"{name}_mask.png")


def test_convert_fake_dataset_split_ids_and_errors(tmp_path):
    root = tmp_path / "PennFudanPed"
    _fake_dataset(root, [(8, 10), (9, 7), (12, 11), (10, 10)])
    paths = convert_pennfudan(root, tmp_path / "out", num_val=1)
    assert paths.image_dir == root / "PNGImages"
    train, val, full = _load(paths.train_ann), _load(paths.val_ann), _load(paths.all_ann)
    assert [im["file_name"] for im in train["images"]] == ["Ped00000.png", "Ped00001.png", "Ped00002.png"]
    assert [im["file_name"] for im in val["images"]] == ["Ped00003.png"]  # the last image(s) by name
    assert [(im["height"], im["width"]) for im in full["images"]] == [(8, 10), (9, 7), (12, 11), (10, 10)]
    assert [a["bbox"] for a in full["annotations"]] == [[0, 0, 3, 2], [0, 0, 4, 3], [3, 7, 4, 2], [0, 0, 5, 4],
                                                        [0, 0, 6, 5], [6, 8, 4, 2]]
    assert [a["id"] for a in full["annotations"]] == list(range(1, 7))
    assert train["annotations"] + val["annotations"] == full["annotations"]  # ids agree across the files
    assert full["categories"] == [{"id": 1, "name": "person", "supercategory": "person"}]

    with pytest.raises(ValueError, match="num_val"):
        convert_pennfudan(root, tmp_path / "o2", num_val=4)
    with pytest.raises(FileNotFoundError, match="PNGImages"):
        convert_pennfudan(tmp_path / "nowhere", tmp_path / "o3")
    Image.fromarray(np.zeros((3, 3), dtype=np.uint8)).save(root / "PedMasks" / "Ped00002_mask.png")
    with pytest.raises(ValueError, match="Ped00002"):
        convert_pennfudan(root, tmp_path / "o4", num_val=1)
    (root / "PedMasks" / "Ped00002_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match="Ped00002_mask"):
        convert_pennfudan(root, tmp_path / "o5", num_val=1)


# ------------------------------------------------------------------------------------------ the real data
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    data = shared_data_dir()
    if data is None or not (data / "PennFudanPed" / "PNGImages").is_dir():
        pytest.skip("../shared/data/PennFudanPed is not available")
    root = data / "PennFudanPed"
    return root, convert_pennfudan(root, tmp_path_factory.mktemp("pennfudan"))


def test_real_counts_and_split(converted):
    root, paths = converted
    full, train, val = _load(paths.all_ann), _load(paths.train_ann), _load(paths.val_ann)
    assert len(full["images"]) == 170 and len(full["annotations"]) == 423
    assert len(train["images"]) == 120 and len(val["images"]) == 50
    assert len(train["annotations"]) + len(val["annotations"]) == 423
    names = sorted(p.name for p in (root / "PNGImages").glob("*.png"))
    assert [im["file_name"] for im in val["images"]] == names[-50:]
    assert all((paths.image_dir / im["file_name"]).is_file() for im in full["images"])


def test_real_masks_and_boxes(converted):
    root, paths = converted
    full = _load(paths.all_ann)
    by_image = {}
    for ann in full["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    disagree = []
    for im in full["images"]:
        stem = im["file_name"][:-4]
        label = np.asarray(Image.open(root / "PedMasks" / f"{stem}_mask.png"))
        anns = by_image[im["id"]]
        for k, ann in enumerate(anns, start=1):
            m = mask_utils.decode(ann["segmentation"]).astype(bool)
            assert np.array_equal(m, label == k) and ann["area"] == m.sum()
            ys, xs = np.nonzero(m)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        ours = np.asarray([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        theirs = read_pascal_boxes(root / "Annotation" / f"{stem}.txt")
        if theirs.shape != ours.shape or np.abs(theirs - ours).max() > 2:
            disagree.append(im["file_name"])
    # The dataset README: mask boxes agree with the text boxes within 2 px on 168 of 170 images.
    assert disagree == ["PennPed00019.png", "PennPed00027.png"]


def test_real_ground_truth_as_detections_scores_ap_one(converted):
    _, paths = converted
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(paths.val_ann))
    anns = gt.loadAnns(gt.getAnnIds())
    for iou_type in ("bbox", "segm"):
        key = "bbox" if iou_type == "bbox" else "segmentation"
        results = [{"image_id": a["image_id"], "category_id": 1, key: a[key], "score": 1.0} for a in anns]
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes(results), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0), iou_type
