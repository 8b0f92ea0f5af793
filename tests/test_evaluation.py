"""Tests for minimask/evaluation.py and the top-level evaluate.py (COCO export, TTA, shard merging, COCOeval, CLI)."""
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from torch import nn

import evaluate
import minimask
from minimask import evaluation as ev
from minimask.data.coco import CocoDetection
from minimask.data.pennfudan import convert_pennfudan
from minimask.data.samplers import build_test_loader
from minimask.data.synthetic import build_synthetic
from minimask.data.transforms import COCO_KEYPOINT_NAMES

# ---- helpers ---------------------------------------------------------------------------------------------------

def _gt_as_results(ann_file, kind):
    """The non-crowd ground truth of `ann_file` as COCO results of type `kind`, score 1."""
    coco = COCO(str(ann_file))
    results = []
    for a in coco.dataset["annotations"]:
        if a["iscrowd"] or (kind == "keypoints" and a.get("num_keypoints", 0) == 0):
            continue
        r = {"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0}
        if kind == "bbox":
            r["bbox"] = a["bbox"]
        elif kind == "segm":
            rle = coco.annToRLE(a)
            counts = rle["counts"]  # bytes when pycocotools encoded it from polygons, str when the file held RLE
            if isinstance(counts, bytes):
                counts = counts.decode("ascii")
            r["segmentation"] = {"size": rle["size"], "counts": counts}
        else:
            r["keypoints"] = a["keypoints"]
        results.append(r)
    return results


def _run_cli(argv, capsys):
    code = evaluate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _make_tiny_coco(root, *, keypoints=False):
    """3 images with coloured rectangles (one image without objects) and their COCO JSON; categories 3 and 7, or
    with `keypoints` one category, person (id 1), with 17 keypoints per object."""
    image_dir = root / "images"
    image_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    specs = [(80, 100, [(10, 12, 40, 30, 3), (50, 40, 30, 25, 7)]), (100, 72, [(5, 50, 30, 40, 7)]), (64, 64, [])]
    for image_id, (h, w, rects) in enumerate(specs, start=11):
        pixels = (rng.random((h, w, 3)) * 60).astype(np.uint8)
        for x, y, bw, bh, cat in rects:
            pixels[y:y + bh, x:x + bw] = (220, 40, 40) if cat == 3 else (40, 220, 40)
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                   "bbox": [x, y, bw, bh], "area": bw * bh,
                   "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]}
            if keypoints:
                kps = [[x + bw // 2, y + 2, 2]] + [[x + 1 + i, y + 1 + i, 2] for i in range(16)]
                ann["keypoints"], ann["num_keypoints"], ann["category_id"] = [v for p in kps for v in p], 17, 1
            annotations.append(ann)
        name = f"{image_id}.png"
        Image.fromarray(pixels).save(image_dir / name)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    categories = [{"id": 3, "name": "red"}, {"id": 7, "name": "green"}]
    if keypoints:
        categories = [{"id": 1, "name": "person", "keypoints": list(COCO_KEYPOINT_NAMES), "skeleton": []}]
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann_file, image_dir


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    """(ann_file, image_dir, checkpoint) of a 3-image dataset and a random tiny model's plain state dict."""
    root = tmp_path_factory.mktemp("tiny_coco")
    ann, images = _make_tiny_coco(root)
    torch.manual_seed(0)
    torch.save(_tiny_model().state_dict(), root / "sd.pth")
    return ann, images, root / "sd.pth"


def _tiny_model(num_classes=2, category_ids=(3, 7)):
    model = minimask.build_model(minimask.get_config("tiny", [f"model.roi_heads.num_classes={num_classes}"]))
    model.category_ids.copy_(torch.tensor(category_ids))
    # A random model scores every class at ~1/K; lower the bar a little so there are always detections to export.
    model.roi_heads.score_thresh = 0.0
    return model.eval()


def _sorted(results):
    return sorted(results, key=lambda r: (r["image_id"], -r["score"], r["category_id"], r["bbox"]))


# ---- GT fed back scores AP 1 through evaluate.py --results -------------------------------------------------------

@pytest.mark.parametrize("kind", ["bbox", "segm", "keypoints"])
def test_ground_truth_as_predictions_scores_ap_one(coco_mini, tmp_path, capsys, kind):
    name = "person_keypoints_val2017.json" if kind == "keypoints" else "instances_val2017.json"
    ann = coco_mini / "annotations" / name
    results_file = tmp_path / f"results_{kind}.json"
    results_file.write_text(json.dumps(_gt_as_results(ann, kind)))
    code, out, err = _run_cli(["--results", results_file, "--ann", ann, "--output", tmp_path / "out"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {k.split("/")[0] for k in metrics} == {kind}  # a segm file is scored as segm only, not bbox
    assert metrics[f"{kind}/AP"] == pytest.approx(100.0)
    assert metrics[f"{kind}/AP50"] == pytest.approx(100.0)
    assert f"Evaluation results for {kind}" in out
    assert out.count("Average Precision") == (5 if kind == "keypoints" else 6)  # pycocotools' own summary lines
    if kind != "keypoints":
        assert metrics[f"{kind}/AP-person"] == pytest.approx(100.0)
        assert f"Per-category {kind} AP" in out and "person" in out
        assert len([k for k in metrics if "/AP-" in k]) >= 10


@pytest.mark.parametrize("kind", ["bbox", "segm", "keypoints"])
def test_ground_truth_as_predictions_on_the_synthetic_set(tmp_path, capsys, kind):
    # The synthetic set mixes shapes (no keypoints) with persons (17 keypoints): keypoint AP covers the persons only.
    paths = build_synthetic(tmp_path / "synthetic", num_train=2, num_val=12, seed=5)
    results_file = tmp_path / f"results_{kind}.json"
    results_file.write_text(json.dumps(_gt_as_results(paths.val_ann, kind)))
    code, _, err = _run_cli(["--results", results_file, "--ann", paths.val_ann, "--output", tmp_path / "out"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {k.split("/")[0] for k in metrics} == {kind}
    assert metrics[f"{kind}/AP"] == pytest.approx(100.0)


@pytest.mark.parametrize("kind", ["bbox", "segm"])
def test_ground_truth_as_predictions_on_penn_fudan(penn_fudan, tmp_path, capsys, kind):
    paths = convert_pennfudan(penn_fudan, tmp_path / "pennfudan")
    results = _gt_as_results(paths.all_ann, kind)
    assert len(results) == 423  # every pedestrian of the database
    results_file = tmp_path / f"results_{kind}.json"
    results_file.write_text(json.dumps(results))
    code, _, err = _run_cli(["--results", results_file, "--ann", paths.all_ann, "--output", tmp_path / "out"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())[f"{kind}/AP"] == pytest.approx(100.0)


def test_result_type():
    assert ev.result_type([{"bbox": [0, 0, 1, 1], "segmentation": {}}]) == "segm"
    assert ev.result_type([{"bbox": [0, 0, 1, 1], "keypoints": [0] * 51}]) == "keypoints"
    assert ev.result_type([{"bbox": [0, 0, 1, 1]}]) == "bbox"
    assert ev.result_type([]) == "bbox"
    with pytest.raises(ValueError, match="mix"):
        ev.result_type([{"segmentation": {}}, {"bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError):
        ev.result_type({"bbox": [0, 0, 1, 1]})


# ---- predictions_to_coco on hand-made outputs --------------------------------------------------------------------

def test_predictions_to_coco_scales_per_axis_and_maps_categories():
    # Model input 50 x 100 (h, w), original 100 x 300: x scales by 3, y by 2.
    masks = torch.zeros(2, 1, 50, 100)
    masks[0, 0, 5:25, :] = 1.0  # a full-width band (a rectangle's corners would be cut by the bilinear resize)
    keypoints = torch.zeros(2, 17, 3)
    keypoints[0, 0] = torch.tensor([20.5, 10.5, 1.0])  # continuous coordinates
    outputs = [
        {"boxes": torch.tensor([[10.0, 5.0, 30.0, 25.0], [0.0, 0.0, 100.0, 50.0]]),
         "labels": torch.tensor([2, 1]), "scores": torch.tensor([0.9, 0.25]), "masks": masks,
         "keypoints": keypoints, "keypoints_scores": torch.full((2, 17), 0.75)},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
         "masks": torch.zeros(0, 1, 40, 40), "keypoints": torch.zeros(0, 17, 3), "keypoints_scores": torch.zeros(0, 17)},
    ]
    results = ev.predictions_to_coco(outputs, [5, 6], [(100, 300), (80, 80)], [(50, 100), (40, 40)],
                                     torch.tensor([7, 42]))
    assert len(results) == 2 and all(r["image_id"] == 5 for r in results)  # image 6 has no detections
    first, second = results
    assert first["category_id"] == 42 and second["category_id"] == 7  # label k -> category_ids[k - 1]
    assert first["bbox"] == pytest.approx([30.0, 10.0, 60.0, 40.0])
    assert second["bbox"] == pytest.approx([0.0, 0.0, 300.0, 100.0])
    assert first["score"] == pytest.approx(0.9)
    # The band, resized bilinearly x2 vertically (rows 4.75 -> 0.75 in, 4.25 -> 0.25 out) and cut at 0.5, is
    # rows 10..49 exactly, over the whole original width.
    rle = first["segmentation"]
    assert isinstance(rle["counts"], str) and rle["size"] == [100, 300]
    assert mask_util.area({"size": rle["size"], "counts": rle["counts"].encode()}) == 40 * 300
    decoded = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    expected = np.zeros((100, 300), dtype=np.uint8)
    expected[10:50, :] = 1
    np.testing.assert_array_equal(decoded, expected)
    assert mask_util.area({"size": [100, 300], "counts": second["segmentation"]["counts"].encode()}) == 0
    # Keypoints: scaled, then -0.5 (COCO integer pixel indices), flat [x, y, score] * 17.
    assert len(first["keypoints"]) == 51
    assert first["keypoints"][:3] == pytest.approx([20.5 * 3 - 0.5, 10.5 * 2 - 0.5, 0.75])
    assert first["keypoints"][3:5] == pytest.approx([-0.5, -0.5])
    assert "keypoints" not in second  # all v = 0: a detection of a class without keypoints
    json.dumps(results)  # JSON-serialisable


def test_predictions_to_coco_boxes_only_and_bad_input():
    out = {"boxes": torch.tensor([[1.0, 2.0, 3.0, 6.0]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.5])}
    (r,) = ev.predictions_to_coco([out], [1], [(10, 10)], [(10, 10)], [9])
    assert set(r) == {"image_id", "category_id", "bbox", "score"} and r["bbox"] == pytest.approx([1, 2, 2, 4])
    with pytest.raises(ValueError, match="labels"):
        ev.predictions_to_coco([{**out, "labels": torch.tensor([2])}], [1], [(10, 10)], [(10, 10)], [9])
    with pytest.raises(ValueError, match="length"):
        ev.predictions_to_coco([out], [1, 2], [(10, 10)], [(10, 10)], [9])
    with pytest.raises(ValueError, match="masks"):
        ev.predictions_to_coco([{**out, "masks": torch.zeros(1, 1, 5, 5)}], [1], [(10, 10)], [(10, 10)], [9])


def test_masks_to_rle_chunking_does_not_change_the_result(monkeypatch):
    probs = torch.rand(5, 13, 17)
    whole = ev.masks_to_rle(probs, (29, 31))
    monkeypatch.setattr(ev, "MASK_CHUNK_BYTES", 1)  # one mask per chunk
    assert ev.masks_to_rle(probs, (29, 31)) == whole
    # Brute force: bilinear resize of each mask, then >= 0.5.
    ref = torch.nn.functional.interpolate(probs[:, None], size=(29, 31), mode="bilinear", align_corners=False) >= 0.5
    for rle, m in zip(whole, ref[:, 0]):
        decoded = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        np.testing.assert_array_equal(decoded, m.numpy().astype(np.uint8))
    assert ev.masks_to_rle(torch.zeros(0, 4, 4), (8, 8)) == []


# ---- test-time augmentation --------------------------------------------------------------------------------------

class _BrightBoxModel(nn.Module):
    """Detects the bright pixels of an image as one object: box, mask, two corner keypoints. Its score grows with
    the object's x position, so in a mirrored image an object on the left scores higher."""

    def __init__(self):
        super().__init__()
        self.register_buffer("category_ids", torch.tensor([5]))

    def forward(self, images):
        outputs = []
        for img in images:
            h, w = img.shape[-2:]
            on = img[0] > 0.5  # (h, w)
            ys, xs = torch.where(on)
            box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()  # continuous xyxy
            kps = torch.zeros(1, 17, 3)
            kps[0, :, :2] = (box[:2] + box[2:]) / 2
            kps[0, 1, :2] = box[[0, 1]]  # "left eye" = top-left corner
            kps[0, 2, :2] = box[[2, 1]]  # "right eye" = top-right corner
            kps[..., 2] = 1
            score = 0.5 + 0.4 * float((box[0] + box[2]) / 2 / w)
            outputs.append({"boxes": box[None], "labels": torch.tensor([1]), "scores": torch.tensor([score]),
                            "masks": on[None, None].float(), "keypoints": kps,
                            "keypoints_scores": torch.arange(17.0)[None]})
        return outputs


def test_tta_maps_scales_and_flips_back_to_the_original_image():
    image = torch.zeros(3, 40, 60)
    image[:, 4:16, 8:20] = 1.0  # an object on the left: the mirrored runs score higher and win the NMS
    model = _BrightBoxModel()
    (merged,) = ev.tta_predict(model, [image], [(40, 60)], scales=(40, 80), flip=True, max_size=1000)
    assert merged["boxes"].tolist() == [[8.0, 4.0, 20.0, 16.0]]  # the 4 runs agree; NMS keeps one
    assert merged["scores"].item() == pytest.approx(0.5 + 0.4 * (60 - 14) / 60)  # a mirrored run's score
    assert merged["keypoints"][0, 1, :2].tolist() == [8.0, 4.0]  # un-mirrored and left/right swapped back
    assert merged["keypoints"][0, 2, :2].tolist() == [20.0, 4.0]
    assert merged["keypoints_scores"][0, :3].tolist() == [0.0, 2.0, 1.0]  # scores follow their swapped points
    expected_mask = torch.zeros(40, 60, dtype=torch.uint8)
    expected_mask[4:16, 8:20] = 1
    assert torch.equal(merged["masks"][0, 0], expected_mask)


def test_tta_merge_is_per_class_nms_with_top_k():
    runs = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]]), "scores": torch.tensor([0.9, 0.8]),
             "labels": torch.tensor([1, 2])},
            {"boxes": torch.tensor([[1.0, 0, 10, 10], [50, 50, 60, 60]]), "scores": torch.tensor([0.95, 0.1]),
             "labels": torch.tensor([1, 1])}]
    merged = ev._merge_runs(runs, (100, 100), 0.5, 100, 0.5)
    assert merged["scores"].tolist() == pytest.approx([0.95, 0.8, 0.1])  # 0.9 suppressed by 0.95 (same class)
    assert merged["labels"].tolist() == [1, 2, 1]
    assert ev._merge_runs(runs, (100, 100), 0.5, 2, 0.5)["scores"].shape == (2,)


# ---- the whole path on the tiny model ----------------------------------------------------------------------------

def test_tiny_model_inference_and_evaluation_end_to_end(tiny_coco):
    from minimask.data.transforms import build_transforms

    ann, images, _ = tiny_coco
    dataset = CocoDetection(ann, images, filter_empty=False,
                            transforms=build_transforms(min_sizes=128, max_size=128, flip=False, train=False))
    loader = build_test_loader(dataset, rank=0, world_size=1, num_workers=0, batch_size=2)
    model = _tiny_model().train()
    seen = []
    results = ev.inference(model, loader, device="cpu", seen_image_ids=seen)
    assert model.training  # mode restored
    assert sorted(seen) == [11, 12, 13] and results
    assert {r["category_id"] for r in results} <= {3, 7}
    for r in results:  # boxes in the original pixels
        x, y, w, h = r["bbox"]
        H, W = dataset.coco.imgs[r["image_id"]]["height"], dataset.coco.imgs[r["image_id"]]["width"]
        assert -1e-3 <= x and x + w <= W + 1e-3 and -1e-3 <= y and y + h <= H + 1e-3
        assert r["segmentation"]["size"] == [H, W]
    merged = ev.gather_results(results, seen, dataset.ids)
    metrics = ev.evaluate_coco(dataset.coco, merged, verbose=False)
    assert {"bbox/AP", "bbox/AP50", "segm/AP", "bbox/AP-red", "segm/AP-green"} <= set(metrics)
    assert not any(k.startswith("keypoints/") for k in metrics)
    assert all(v is None or 0.0 <= v <= 100.0 for v in metrics.values())
    json.dumps(metrics)


def test_tta_with_one_scale_and_no_flip_equals_plain_inference(tiny_coco):
    ann, images, _ = tiny_coco
    dataset = CocoDetection(ann, images, filter_empty=False)  # original sizes; shorter sides 80, 72, 64
    loader = build_test_loader(dataset, rank=0, world_size=1, num_workers=0, batch_size=1)
    model = _tiny_model()
    plain = ev.inference(model, loader, device="cpu")
    # The scale of every image is its own shorter side: pass them per image through a one-image loader.
    tta = []
    for i in range(len(dataset)):
        sub = build_test_loader(torch.utils.data.Subset(dataset, [i]), rank=0, world_size=1, num_workers=0)
        tta += ev.inference(model, sub, device="cpu", tta_scales=(min(dataset.image_hw(i)),), tta_max_size=10_000)
    assert plain and _sorted(tta) == _sorted(plain)


def test_evaluate_py_runs_a_checkpoint_end_to_end(tiny_coco, tmp_path, capsys):
    ann, images, _ = tiny_coco
    model = _tiny_model()
    torch.save({"model": model.state_dict(), "iteration": 3}, tmp_path / "ckpt.pth")
    out_dir = tmp_path / "out"
    code, out, err = _run_cli(["--config", "tiny", "--weights", tmp_path / "ckpt.pth", "--ann", ann,
                               "--images", images, "--output", out_dir, "model.roi_heads.score_thresh=0.0"], capsys)
    assert code == 0, err
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert {"bbox/AP", "segm/AP"} <= set(metrics)
    assert "Evaluation results for bbox" in out and "Evaluation results for segm" in out
    segm = json.loads((out_dir / "results_segm.json").read_text())
    bbox = json.loads((out_dir / "results_bbox.json").read_text())
    assert segm and len(segm) == len(bbox) and {r["category_id"] for r in bbox} <= {3, 7}
    assert ev.result_type(segm) == "segm" and ev.result_type(bbox) == "bbox"
    # The written segm file scores the same through --results.
    code, out, err = _run_cli(["--results", out_dir / "results_segm.json", "--ann", ann,
                               "--output", tmp_path / "again"], capsys)
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again == {k: v for k, v in metrics.items() if k.startswith("segm/")}


def test_evaluate_py_plain_state_dict_and_tta(tiny_coco, tmp_path, capsys):
    ann, images, ckpt = tiny_coco
    code, out, err = _run_cli(["--config", "tiny", "--weights", ckpt, "--ann", ann, "--images", images,
                               "--tta", "--tta-scales", "64", "--output", tmp_path / "out"], capsys)
    assert code == 0, err
    assert "TTA scales (64,) + flip" in out
    assert (tmp_path / "out" / "results_bbox.json").is_file()


def test_evaluate_py_keypoint_model_with_tta(tmp_path, capsys):
    ann, images = _make_tiny_coco(tmp_path, keypoints=True)
    model = minimask.build_model(minimask.get_config("tiny_keypoint"))
    torch.save(model.state_dict(), tmp_path / "kp.pth")
    out_dir = tmp_path / "out"
    code, out, err = _run_cli(["--config", "tiny_keypoint", "--weights", tmp_path / "kp.pth", "--ann", ann,
                               "--images", images, "--tta", "--tta-scales", "64", "--output", out_dir,
                               "model.roi_heads.score_thresh=0.0"], capsys)
    assert code == 0, err
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert {k.split("/")[0] for k in metrics} == {"bbox", "keypoints"} and "keypoints/AP" in metrics
    assert sorted(p.name for p in out_dir.iterdir()) == ["metrics.json", "results_bbox.json",
                                                          "results_keypoints.json"]
    kps = json.loads((out_dir / "results_keypoints.json").read_text())
    assert kps and all(len(r["keypoints"]) == 51 and r["category_id"] == 1 for r in kps)
    assert ev.result_type(kps) == "keypoints"


def test_evaluate_py_keypoints_only_for_the_classes_that_have_them(tmp_path, capsys):
    # The synthetic set mixes shapes with persons (category 6, the only one listing keypoint names): evaluate.py
    # gives keypoints to person detections only, and results_keypoints.json holds just those.
    build_synthetic(tmp_path / "data", num_train=1, num_val=3)
    model = minimask.build_model(minimask.get_config("tiny_keypoint", ["model.roi_heads.num_classes=6"]))
    with torch.no_grad():  # random weights: make classes 1 (circle) and 6 (person) the confident ones
        bias = model.roi_heads.box_predictor.cls_score.bias
        bias.fill_(-3.0)
        bias[[1, 6]] = 3.0
    torch.save(model.state_dict(), tmp_path / "kp.pth")
    out_dir = tmp_path / "out"
    code, _, err = _run_cli(["--config", "tiny_keypoint", "--weights", tmp_path / "kp.pth",
                             "--ann", tmp_path / "data" / "annotations" / "instances_val.json",
                             "--images", tmp_path / "data" / "val", "--output", out_dir,
                             "model.roi_heads.score_thresh=0.0", "model.roi_heads.detections_per_image=30"], capsys)
    assert code == 0, err
    boxes = json.loads((out_dir / "results_bbox.json").read_text())
    kps = json.loads((out_dir / "results_keypoints.json").read_text())
    assert {r["category_id"] for r in boxes} == {1, 6} and {r["category_id"] for r in kps} == {6}
    assert len(kps) == sum(r["category_id"] == 6 for r in boxes)


# ---- empty results, bad results ----------------------------------------------------------------------------------

def test_empty_results_score_zero_with_a_warning(tiny_coco):
    ann, _, _ = tiny_coco
    coco = COCO(str(ann))
    with pytest.warns(UserWarning, match="predictions: .* AP is 0") as record:
        metrics = ev.evaluate_coco(coco, [], iou_types=("bbox", "segm"), verbose=False)
    assert [str(w.message) for w in record] == ["no bbox predictions: bbox AP is 0", "no segm predictions: segm AP is 0"]
    assert metrics["bbox/AP"] == 0.0 and metrics["segm/AP"] == 0.0 and metrics["bbox/AP-red"] == 0.0
    json.dumps(metrics)


def test_evaluate_py_model_without_detections_scores_zero(tiny_coco, tmp_path, capsys):
    ann, images, ckpt = tiny_coco
    with pytest.warns(UserWarning, match="AP is 0"):
        code, out, err = _run_cli(["--config", "tiny", "--weights", ckpt, "--ann", ann, "--images", images,
                                   "--output", tmp_path, "model.roi_heads.score_thresh=1.5"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["bbox/AP"] == 0.0 and metrics["segm/AP"] == 0.0
    assert json.loads((tmp_path / "results_segm.json").read_text()) == []


def test_evaluate_coco_does_not_modify_results_and_checks_image_ids(tiny_coco):
    ann, _, _ = tiny_coco
    coco = COCO(str(ann))
    results = [{"image_id": 11, "category_id": 3, "bbox": [10, 12, 40, 30], "score": 0.9}]
    before = copy.deepcopy(results)
    metrics = ev.evaluate_coco(coco, results, verbose=False)
    assert results == before and set(k.split("/")[0] for k in metrics) == {"bbox"}
    assert metrics["bbox/AP-red"] == pytest.approx(100.0) and metrics["bbox/AP-green"] == 0.0
    assert metrics["bbox/AP"] == pytest.approx(50.0)  # the mean over the categories with ground truth
    with pytest.raises(ValueError, match="not in the annotation file"):
        ev.evaluate_coco(coco, [{**results[0], "image_id": 999}], verbose=False)
    with pytest.raises(ValueError, match="keypoint"):
        ev.evaluate_coco(coco, [{**results[0], "keypoints": [0.0] * 51}], iou_types=("keypoints",), verbose=False)


# ---- merging shards ----------------------------------------------------------------------------------------------

def _shard(ids):
    return list(ids), [{"image_id": i, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5} for i in ids]


def test_merge_shards_accepts_disjoint_shards_and_sorts():
    merged = ev.merge_shards([_shard([3, 4]), _shard([1, 2]), ([5], [])], expected_image_ids=[1, 2, 3, 4, 5])
    assert [r["image_id"] for r in merged] == [1, 2, 3, 4]
    ids, results = _shard([2, 1])
    assert ev.gather_results(results, ids, [1, 2]) == ev.merge_shards([_shard([1, 2])], [1, 2])  # no process group


@pytest.mark.parametrize("shards, match", [
    ([_shard([1, 2]), _shard([2, 3])], "more than once"),
    ([_shard([1, 2])], "never evaluated"),
    ([_shard([1, 2, 3, 9])], "not in the dataset"),
    ([([1, 2], _shard([1, 2])[1]), ([3], _shard([1])[1])], "did not process"),
])
def test_merge_shards_rejects_missing_and_duplicated_images(shards, match):
    with pytest.raises(RuntimeError, match=match):
        ev.merge_shards(shards, expected_image_ids=[1, 2, 3])


# ---- evaluate.py bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    ([], "give --results"),
    (["--results", "nope.json", "--ann", "{ann}"], "no such file"),
    (["--results", "{ann}"], "needs --ann"),
    (["--results", "{ann}", "--ann", "{ann}", "--config", "tiny"], "does not take --config"),
    (["--config", "nope", "--weights", "{ckpt}", "--ann", "{ann}", "--images", "{images}"], "unknown preset"),
    (["--config", "tiny", "--weights", "{ckpt}", "--data", "{root}", "--ann", "{ann}"], "not both"),
    (["--config", "tiny", "--weights", "{ckpt}", "--ann", "{ann}"], "--images"),
    (["--config", "tiny", "--weights", "missing.pth", "--ann", "{ann}", "--images", "{images}"], "no such file"),
    (["--config", "tiny", "--weights", "{ckpt}", "--ann", "{ann}", "--images", "{images}", "model.nope=1"],
     "unknown config key"),
    (["--config", "tiny", "--weights", "{ann}", "--ann", "{ann}", "--images", "{images}"], "cannot load checkpoint"),
    (["--config", "tiny", "--weights", "{ckpt}", "--ann", "{ann}", "--images", "{images}",
      "model.roi_heads.num_classes=5"], "does not fit"),
    (["--results", "{bad_results}", "--ann", "{ann}"], "not in the annotation file"),
    (["--results", "{ann}", "--ann", "{ann}"], "list of COCO result"),
    (["--bogus"], "unrecognized arguments"),
])
def test_evaluate_py_bad_input_exits_2_with_one_line(tiny_coco, tmp_path, capsys, argv, message):
    ann, images, ckpt = tiny_coco
    (tmp_path / "bad.json").write_text(json.dumps([{"image_id": 999, "category_id": 3, "bbox": [0, 0, 1, 1],
                                                    "score": 1.0}]))
    paths = dict(ann=ann, images=images, ckpt=ckpt, root=tmp_path, bad_results=tmp_path / "bad.json")
    code, out, err = _run_cli([a.format(**paths) for a in argv], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate.py: error:") and message in lines[0], err
    assert "Traceback" not in err


def test_load_weights_strips_ddp_prefix_and_fills_a_missing_label_map(tmp_path):
    source = _tiny_model(category_ids=(1, 2))
    state = {f"module.{k}": v for k, v in source.state_dict().items() if k != "category_ids"}
    target = _tiny_model(category_ids=(1, 2))
    with pytest.warns(UserWarning, match="no category_ids"):
        torch.save(state, tmp_path / "ddp.pth")
        path = str(tmp_path / "ddp.pth")
        evaluate.load_weights(target, evaluate.read_detector_state(path, minimask.get_config("tiny")), path, [3, 7])
    assert target.category_ids.tolist() == [3, 7]
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert name == "category_ids" or torch.equal(a, b)


def _gather_worker(rank, world_size, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    ids = [[1, 2, 3], [4, 5]][rank]
    results = [{"image_id": i, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5} for i in ids if i != 4]
    merged = ev.gather_results(results, ids, expected_image_ids=range(1, 6))
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(merged, f)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_gather_results_over_a_gloo_process_group(tmp_path):
    torch.multiprocessing.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    merged = json.loads((tmp_path / "rank0.json").read_text())
    assert [r["image_id"] for r in merged] == [1, 2, 3, 5]
    assert json.loads((tmp_path / "rank1.json").read_text()) is None
