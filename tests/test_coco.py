"""Tests for minimask.data.coco: image decoding, annotation validation, targets against pycocotools itself."""
import json
import logging
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from minimask.data import CocoDetection, ImageLoadError, load_image

H, W = 10, 12  # crafted image size (rows, columns)


def _write_dataset(tmp_path, images, annotations, categories=None, colors=None):
    """Write a COCO JSON and solid-colour PNGs (image k filled with colors[k]); return (ann_file, image_dir)."""
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    for k, img in enumerate(images):
        color = colors[k] if colors else (10 * k, 20, 30)
        Image.new("RGB", (img["width"], img["height"]), color).save(image_dir / img["file_name"])
    categories = categories or [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann_file, image_dir


def _img(i, h=H, w=W):
    return {"id": i, "file_name": f"{i}.png", "height": h, "width": w}


def _ann(i, image_id, bbox, category_id=3, iscrowd=0, **extra):
    return {"id": i, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd, **extra}


def _rle_counts(mask):
    """Uncompressed COCO RLE written by hand: column-major run lengths, starting with a run of zeros."""
    counts, current, run = [], 0, 0
    for v in mask.flatten(order="F").tolist():
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    return counts + [run]


def _rect_poly(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


# ----------------------------------------------------------------------------------------------- real data


def test_coco_mini_val_matches_pycocotools(coco_mini):
    ds = CocoDetection(coco_mini / "annotations" / "instances_val2017.json", coco_mini / "val2017",
                       mask_format="bitmask")
    coco = ds.coco
    crowd = [a for a in coco.dataset["annotations"] if a["iscrowd"]]
    assert len(crowd) == 5 and ds.stats["crowd"] == 5
    assert ds.stats["annotations"] == 624 and ds.stats["kept_annotations"] == 619 and ds.stats["degenerate"] == 0
    assert len(ds) == 79 and ds.num_classes == 80 and ds.num_keypoints == 0
    seen = 0
    for i in range(len(ds)):
        image, target = ds[i]
        img_id = target["image_id"]
        info = coco.imgs[img_id]
        assert image.shape == (3, info["height"], info["width"]) and image.dtype == torch.float32
        assert target["orig_size"] == (info["height"], info["width"]) == ds.image_hw(i)
        anns = [a for a in coco.imgToAnns[img_id] if not a["iscrowd"]]  # JSON order, as in the targets
        assert len(anns) == len(target["boxes"]) == len(target["labels"]) == len(target["masks"])
        for ann, box, label, mask in zip(anns, target["boxes"], target["labels"], target["masks"]):
            x, y, w, h = ann["bbox"]
            expected = [max(x, 0), max(y, 0), min(x + w, info["width"]), min(y + h, info["height"])]
            torch.testing.assert_close(box, torch.tensor(expected, dtype=torch.float32))
            assert ds.category_ids[label - 1] == ann["category_id"]
            assert mask.dtype == torch.uint8 and int(mask.sum()) == int(coco.annToMask(ann).sum())
            seen += 1
    assert seen == 619


def test_coco_mini_polygons_reach_the_target_undecoded(coco_mini, monkeypatch):
    """mask_format="polygon" (the default): images whose instances are all polygons carry the JSON's polygons and no
    bitmap is decoded for them; images with an RLE instance carry bitmaps for all."""
    ann_file = coco_mini / "annotations" / "instances_train2017.json"
    ds = CocoDetection(ann_file, coco_mini / "train2017")
    decoded = []
    original = CocoDetection._decode_masks
    monkeypatch.setattr(CocoDetection, "_decode_masks",
                        staticmethod(lambda segms, h, w: decoded.append(len(segms)) or original(segms, h, w)))
    polygon_images = bitmap_images = 0
    for i in range(len(ds)):
        _, target = ds[i]
        anns = [a for a in ds.coco.imgToAnns[target["image_id"]] if not a["iscrowd"]]
        if all(isinstance(a["segmentation"], list) for a in anns):
            assert "masks" not in target and len(target["polygons"]) == len(anns) == len(target["boxes"])
            for ann, polygons in zip(anns, target["polygons"]):
                assert [p.tolist() for p in polygons] == [p for p in ann["segmentation"] if len(p) >= 6]
                assert all(p.dtype == np.float64 for p in polygons)
            polygon_images += 1
        else:
            assert "polygons" not in target and target["masks"].shape[0] == len(anns)
            bitmap_images += 1
    assert polygon_images == len(ds) - bitmap_images > 0 and len(decoded) == bitmap_images


def test_polygons_flow_through_the_transforms_to_the_mask_head(coco_mini, monkeypatch):
    """Loader -> resize and flip -> the mask head: the targets of a polygon image come from the polygons (rasterised
    in each RoI), with mask_format="bitmask" from bitmaps, and both train."""
    import minimask
    import minimask.model.roi_heads as roi_heads
    from minimask.data import build_transforms

    calls = []
    for name in ("polygon_mask_targets", "mask_targets"):
        original = getattr(roi_heads, name)
        monkeypatch.setattr(roi_heads, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    transforms = build_transforms(min_sizes=(128,), max_size=192, flip=True, train=True)
    model = minimask.build_model(minimask.get_config("tiny", ["model.roi_heads.num_classes=80"])).train()
    for mask_format, key, expected in (("polygon", "polygons", "polygon_mask_targets"),
                                       ("bitmask", "masks", "mask_targets")):
        ds = CocoDetection(coco_mini / "annotations" / "instances_train2017.json", coco_mini / "train2017",
                           transforms=transforms, mask_format=mask_format)
        torch.manual_seed(3)
        image, target = ds[0]
        assert key in target and max(image.shape[-2:]) <= 192 and len(target[key]) == len(target["boxes"]) > 0
        calls.clear()
        losses = model([image], [target])
        assert calls == [expected] and torch.isfinite(losses["loss_mask"]) and losses["loss_mask"] > 0


def test_label_map_round_trip(coco_mini):
    ds = CocoDetection(coco_mini / "annotations" / "instances_val2017.json", coco_mini / "val2017")
    assert ds.category_ids == sorted(ds.coco.cats) and ds.category_ids[0] == 1 and ds.category_ids[-1] == 90
    label_of = {cid: k + 1 for k, cid in enumerate(ds.category_ids)}
    assert sorted(label_of.values()) == list(range(1, 81))
    assert all(ds.category_ids[label_of[c] - 1] == c for c in ds.coco.cats)
    assert ds.category_names == [ds.coco.cats[c]["name"] for c in ds.category_ids]


def test_coco_mini_keypoints(coco_mini):
    ann_file = coco_mini / "annotations" / "person_keypoints_val2017.json"
    ds = CocoDetection(ann_file, coco_mini / "val2017")
    assert ds.keypoints and ds.num_keypoints == 17 and ds.num_classes == 1
    assert ds.keypoint_names[0] == "nose" and len(ds.keypoint_names) == 17
    anns = ds.coco.dataset["annotations"]
    visible = [a for a in anns if not a["iscrowd"] and max(a["keypoints"][2::3]) > 0]
    persons = [a for a in anns if not a["iscrowd"]]
    # Persons without a labelled keypoint stay box and mask targets (detectron2); only the keypoint loss skips them.
    assert len(visible) == 68 and ds.stats["kept_annotations"] == len(persons) == 118 - ds.stats["crowd"]
    assert ds.stats["no_visible_keypoints"] == len(persons) - 68 > 0
    for i in range(len(ds)):
        _, target = ds[i]
        ref = [a for a in ds.coco.imgToAnns[target["image_id"]] if a in persons]
        kps = target["keypoints"]
        masks = target["polygons"] if "polygons" in target else target["masks"]
        assert kps.shape == (len(ref), 17, 3) and kps.dtype == torch.float32 and len(masks) == len(ref)
        for a, k in zip(ref, kps):
            raw = torch.tensor(a["keypoints"], dtype=torch.float32).reshape(17, 3)
            labelled = raw[:, 2] > 0
            torch.testing.assert_close(k[labelled, :2], raw[labelled, :2] + 0.5)  # detectron2 +0.5
            assert (k[~labelled, :2] == 0).all() and torch.equal(k[:, 2], raw[:, 2])
    # For training, detectron2's MIN_KEYPOINTS_PER_IMAGE = 1 leaves out the images none of whose persons has a
    # visible keypoint; their persons without keypoints elsewhere stay.
    train = CocoDetection(ann_file, coco_mini / "val2017", min_keypoints_per_image=1)
    with_keypoints = {a["image_id"] for a in visible}
    assert set(train.ids) == with_keypoints and train.stats["few_keypoints_images"] == len(ds) - len(train) > 0
    assert train.stats["kept_images"] == len(train)
    many = CocoDetection(ann_file, coco_mini / "val2017", min_keypoints_per_image=40)
    counts = {i: sum(sum(v > 0 for v in a["keypoints"][2::3]) for a in persons if a["image_id"] == i) for i in ds.ids}
    assert set(many.ids) == {i for i, n in counts.items() if n >= 40} != set(ds.ids)
    # filter_empty=False keeps images without persons as negatives, with empty but well-shaped targets.
    ds_all = CocoDetection(ann_file, coco_mini / "val2017", filter_empty=False)
    assert len(ds_all) == 79 > len(ds)
    empty = next(i for i in range(len(ds_all)) if ds_all.ids[i] not in set(ds.ids))
    image, target = ds_all[empty]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["keypoints"].shape == (0, 17, 3) and target["polygons"] == []
    _, target = CocoDetection(ann_file, coco_mini / "val2017", filter_empty=False, mask_format="bitmask")[empty]
    assert target["masks"].shape == (0, *image.shape[-2:])


def test_coco_mini_grayscale_jpeg(coco_mini):
    image = load_image(coco_mini / "val2017" / "000000431848.jpg")  # the one mode-"L" image of coco-mini
    assert image.shape[0] == 3 and torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


# ------------------------------------------------------------------------------------------------- masks


def test_polygon_and_rle_masks(tmp_path):
    expected = np.zeros((H, W), dtype=np.uint8)
    expected[2:5, 2:6] = 1  # pixels inside the polygon rectangle x in [2, 6), y in [2, 5)
    second = np.zeros((H, W), dtype=np.uint8)
    second[6:9, 1:4] = 1
    second[0, 11] = 1
    counts = _rle_counts(second)
    assert sum(counts) == H * W and counts[:2] == [16, 3]  # column 0 and rows 0-5 of column 1 are empty
    compressed = mask_utils.encode(np.asfortranarray(second))
    anns = [
        _ann(1, 1, [2, 2, 4, 3], segmentation=[[0, 0, 1, 1], _rect_poly(2, 2, 6, 5)]),  # < 3 points: ignored
        _ann(2, 1, [1, 0, 11, 9], segmentation={"size": [H, W], "counts": counts}),
        _ann(3, 1, [1, 0, 11, 9], segmentation={"size": [H, W], "counts": compressed["counts"].decode()}),
        _ann(4, 1, [0, 0, 12, 10], segmentation=[_rect_poly(0, 0, 3, 3), _rect_poly(8, 6, 10, 8)]),  # union
        _ann(5, 1, [0, 0, 2, 2], segmentation=[[0, 0, 2, 2]]),  # no usable polygon: dropped and counted
        _ann(6, 1, [0, 0, 2, 2]),  # no segmentation in a file with masks: dropped and counted
    ]
    ds = CocoDetection(*_write_dataset(tmp_path, [_img(1)], anns))
    assert ds.stats["invalid_segmentation"] == 2 and ds.stats["kept_annotations"] == 4
    _, target = ds[0]
    assert "polygons" not in target  # polygons and RLE mixed in one image: bitmaps for every instance
    masks = target["masks"]
    union = np.zeros((H, W), dtype=np.uint8)
    union[0:3, 0:3] = 1
    union[6:8, 8:10] = 1
    assert masks.shape == (4, H, W) and masks.dtype == torch.uint8 and masks.is_contiguous()
    for got, want in zip(masks, [expected, second, second, union]):
        assert torch.equal(got, torch.from_numpy(want))


def test_polygon_only_image_passes_polygons_and_bitmask_format_decodes_them(tmp_path):
    anns = [_ann(1, 1, [2, 2, 4, 3], segmentation=[[0, 0, 1, 1], _rect_poly(2, 2, 6, 5)]),  # < 3 points: ignored
            _ann(2, 1, [0, 0, 12, 10], segmentation=[_rect_poly(0, 0, 3, 3), _rect_poly(8, 6, 10, 8)])]
    files = _write_dataset(tmp_path, [_img(1)], anns)
    _, target = CocoDetection(*files)[0]
    assert "masks" not in target
    assert [[p.tolist() for p in obj] for obj in target["polygons"]] == [
        [_rect_poly(2, 2, 6, 5)], [_rect_poly(0, 0, 3, 3), _rect_poly(8, 6, 10, 8)]]
    _, target = CocoDetection(*files, mask_format="bitmask")[0]
    assert "polygons" not in target and target["masks"].shape == (2, H, W)
    assert int(target["masks"][0].sum()) == 12 and int(target["masks"][1].sum()) == 9 + 4
    with pytest.raises(ValueError, match="mask_format"):
        CocoDetection(*files, mask_format="rle")


def test_min_keypoints_per_image_crafted(tmp_path):
    cats = [{"id": 1, "name": "person", "keypoints": ["a", "b"]}]
    anns = [_ann(1, 1, [1, 1, 5, 5], category_id=1, keypoints=[2, 3, 2, 4, 4, 1]),  # image 1: 2 visible
            _ann(2, 1, [1, 1, 5, 5], category_id=1, keypoints=[0, 0, 0, 0, 0, 0]),
            _ann(3, 2, [1, 1, 5, 5], category_id=1, keypoints=[0, 0, 0, 0, 0, 0]),  # image 2: none
            _ann(4, 3, [1, 1, 5, 5], category_id=1, keypoints=[3, 3, 1, 0, 0, 0])]  # image 3: 1 (v = 1 counts)
    files = _write_dataset(tmp_path, [_img(1), _img(2), _img(3)], anns, categories=cats)
    assert CocoDetection(*files).ids == [1, 2, 3]  # 0 (the default) keeps every image
    ds = CocoDetection(*files, min_keypoints_per_image=1)
    assert ds.ids == [1, 3] and ds.stats["few_keypoints_images"] == 1 and ds.stats["kept_images"] == 2
    assert CocoDetection(*files, min_keypoints_per_image=2).ids == [1]
    assert CocoDetection(*files, min_keypoints_per_image=5, keypoints=False).ids == [1, 2, 3]  # keypoint mode only
    with pytest.raises(ValueError, match="min_keypoints_per_image"):
        CocoDetection(*files, min_keypoints_per_image=-1)


def test_mask_free_file_has_no_masks(tmp_path):
    ds = CocoDetection(*_write_dataset(tmp_path, [_img(1)], [_ann(1, 1, [1, 1, 3, 3])]))
    _, target = ds[0]
    assert "masks" not in target and "keypoints" not in target and ds.num_keypoints == 0


# ----------------------------------------------------------------------------------- filtering and labels


def test_degenerate_boxes_dropped_counted_and_logged(tmp_path, caplog):
    anns = [
        _ann(1, 1, [1, 2, 3, 4]),  # kept as is
        _ann(2, 1, [-2, 8, 20, 5], category_id=7),  # kept, clipped to the image
        _ann(3, 1, [4, 4, 0, 3]),  # zero width
        _ann(4, 1, [4, 4, 3, -1]),  # negative height
        _ann(5, 1, [W + 1, 2, 3, 3]),  # entirely outside (right)
        _ann(6, 1, [2, -5, 3, 5]),  # touches the top edge from outside: empty after clipping
        _ann(7, 1, [0, 0, 5, 5], iscrowd=1),  # crowd: never a target
    ]
    with caplog.at_level(logging.INFO, logger="minimask.data"):
        ds = CocoDetection(*_write_dataset(tmp_path, [_img(1)], anns))
    records = [r for r in caplog.records if r.name == "minimask.data"]
    assert len(records) == 1 and "4 degenerate" in records[0].getMessage() and records[0].levelno == logging.WARNING
    assert ds.stats["degenerate"] == 4 and ds.stats["crowd"] == 1 and ds.stats["kept_annotations"] == 2
    _, target = ds[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[1.0, 2, 4, 6], [0, 8, W, H]]))
    assert target["labels"].tolist() == [1, 2]  # category 3 -> label 1, category 7 -> label 2 (sorted ids)
    assert ds.category_ids == [3, 7] and ds.category_names == ["a", "b"] and ds.num_classes == 2


def test_filter_empty(tmp_path):
    images = [_img(1), _img(2), _img(3), _img(4)]
    anns = [_ann(1, 1, [1, 1, 3, 3]), _ann(2, 2, [1, 1, 0, 3]), _ann(3, 3, [1, 1, 3, 3], iscrowd=1)]
    files = _write_dataset(tmp_path, images, anns)  # image 4 has no annotation at all
    ds = CocoDetection(*files)
    assert ds.ids == [1] and len(ds) == 1 and ds.stats["kept_images"] == 1 and ds.stats["images"] == 4
    ds = CocoDetection(*files, filter_empty=False)
    assert ds.ids == [1, 2, 3, 4] and ds.stats["kept_images"] == 4
    for i in (1, 2, 3):
        _, target = ds[i]
        assert target["boxes"].shape == (0, 4) and target["labels"].dtype == torch.int64


def test_keypoint_mode_crafted(tmp_path):
    names = ["a", "b"]
    cats = [{"id": 1, "name": "person", "keypoints": names}]
    anns = [_ann(1, 1, [1, 1, 5, 5], category_id=1, keypoints=[2, 3, 2, 0, 0, 0]),
            _ann(2, 1, [1, 1, 5, 5], category_id=1, keypoints=[0, 0, 0, 0, 0, 0])]  # nothing labelled
    files = _write_dataset(tmp_path, [_img(1)], anns, categories=cats)
    ds = CocoDetection(*files)
    _, target = ds[0]
    assert ds.num_keypoints == 2 and ds.keypoint_names == names and ds.stats["no_visible_keypoints"] == 1
    # the person without keypoints stays a box target, with every keypoint unlabelled
    assert len(target["boxes"]) == 2 and ds.stats["kept_annotations"] == 2
    torch.testing.assert_close(target["keypoints"], torch.tensor([[[2.5, 3.5, 2.0], [0.0, 0.0, 0.0]],
                                                                  [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]))
    ds = CocoDetection(*files, keypoints=False)  # plain detection: both persons kept, no keypoints
    _, target = ds[0]
    assert "keypoints" not in target and len(target["boxes"]) == 2 and ds.num_keypoints == 0


def test_keypoint_labels_name_the_classes_with_keypoints(tmp_path):
    # The person among shapes (the synthetic set's layout): only its contiguous label gets keypoints.
    cats = [{"id": 3, "name": "circle"}, {"id": 7, "name": "person", "keypoints": ["a"]}, {"id": 9, "name": "ring"}]
    anns = [_ann(1, 1, [1, 1, 5, 5], category_id=3), _ann(2, 1, [1, 1, 5, 5], category_id=7, keypoints=[2, 3, 2])]
    files = _write_dataset(tmp_path, [_img(1)], anns, categories=cats)
    assert CocoDetection(*files).keypoint_labels == (2,)
    assert CocoDetection(*files, keypoints=False).keypoint_labels == ()


def test_transforms_applied_last_and_indexing(tmp_path):
    files = _write_dataset(tmp_path, [_img(1), _img(2)], [_ann(1, 1, [1, 1, 3, 3]), _ann(2, 2, [0, 0, 4, 4])])
    seen = []
    ds = CocoDetection(*files, transforms=lambda im, t: (seen.append(t["image_id"]) or im[:, :4], {**t, "x": 1}))
    image, target = ds[-1]
    assert seen == [2] and image.shape == (3, 4, W) and target["x"] == 1 and target["orig_size"] == (H, W)
    with pytest.raises(IndexError):
        ds[2]
    assert [t["image_id"] for _, t in ds] == [1, 2]  # the sequence protocol stops at IndexError


# ------------------------------------------------------------------------------------------- image decoding


def test_exif_orientation_applied(tmp_path):
    # Stored 20 wide x 10 high, red block top-left; orientation 6 = "rotate 90 degrees clockwise to display".
    stored = Image.new("RGB", (20, 10), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 6, 6))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)
    image = load_image(path)
    assert image.shape == (3, 20, 10)  # upright: 20 rows, 10 columns
    assert image[0, :5, -5:].mean() > 0.8 and image[2, :5, -5:].mean() < 0.2  # red block now top-right
    assert image[0, :5, :4].mean() < 0.2
    # The dataset checks the decoded (upright) size against the JSON and hints at EXIF when it is swapped.
    for hw, ok in [((20, 10), True), ((10, 20), False)]:
        img = {"id": 1, "file_name": "rot.jpg", "height": hw[0], "width": hw[1]}
        ann_file = tmp_path / "rot.json"
        ann_file.write_text(json.dumps({"images": [img], "annotations": [_ann(1, 1, [1, 1, 2, 2])],
                                        "categories": [{"id": 3, "name": "a"}]}))
        ds = CocoDetection(ann_file, tmp_path)
        if ok:
            assert ds[0][1]["orig_size"] == (20, 10)
        else:
            with pytest.raises(ValueError, match=r"rot\.jpg.*EXIF"):
                ds[0]


@pytest.mark.parametrize("mode,fmt,value,expected", [
    ("L", "png", 128, (128, 128, 128)),
    ("RGBA", "png", (10, 20, 30, 40), (10, 20, 30)),  # alpha dropped, not composited
    ("LA", "png", (90, 7), (90, 90, 90)),
    ("CMYK", "tiff", (0, 0, 0, 0), (255, 255, 255)),
    ("CMYK", "tiff", (0, 255, 255, 0), (255, 0, 0)),
    ("1", "png", 1, (255, 255, 255)),
    ("RGB", "png", (1, 2, 3), (1, 2, 3)),
])
def test_modes_to_rgb(tmp_path, mode, fmt, value, expected):
    path = tmp_path / f"x.{fmt}"
    Image.new(mode, (5, 4), value).save(path)
    image = load_image(path)
    assert image.shape == (3, 4, 5) and image.dtype == torch.float32
    assert image.permute(1, 2, 0).is_contiguous()  # channels-last strides, the layout the resize runs in
    torch.testing.assert_close(image, (torch.tensor(expected, dtype=torch.float32) / 255).view(3, 1, 1).expand(3, 4, 5))


def test_cmyk_jpeg_and_palette_modes(tmp_path):
    Image.new("CMYK", (6, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    image = load_image(tmp_path / "c.jpg")
    assert image.shape == (3, 4, 6) and image[0].min() > 0.9 and image[1:].max() < 0.1
    pal = Image.new("P", (6, 4), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.save(tmp_path / "p.png")
    pal.save(tmp_path / "pt.png", transparency=0)
    pal.save(tmp_path / "pb.png", transparency=bytes([0, 128]))  # per-entry alpha: pillow warns unless via RGBA
    for name in ("p.png", "pt.png", "pb.png"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            image = load_image(tmp_path / name)
        torch.testing.assert_close(image[:, 0, 0], torch.tensor([200, 100, 50]) / 255.0)
        assert image.shape == (3, 4, 6)


def test_sixteen_bit_grayscale_scaled(tmp_path):
    data = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(data).save(tmp_path / "g16.png")
    image = load_image(tmp_path / "g16.png")
    torch.testing.assert_close(image, torch.tensor([0.0, 32768 / 65535, 1.0]).view(1, 1, 3).expand(3, 1, 3))


def _bad_files(tmp_path):
    """name -> path of a bad image: truncated JPEG, zero-byte, non-image, missing."""
    good = tmp_path / "good.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(good, quality=95)
    data = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image\n")
    return {n: tmp_path / f"{n}.jpg" for n in ("truncated", "empty", "text", "missing")}


def test_bad_images_raise_naming_the_file(tmp_path):
    for name, path in _bad_files(tmp_path).items():
        with pytest.raises(ImageLoadError, match=f"{name}\\.jpg") as info:
            load_image(path)
        assert isinstance(info.value, OSError)


def test_skip_bad_images(tmp_path):
    bad = _bad_files(tmp_path)
    images = [_img(0), _img(1), _img(2), _img(3), _img(4), _img(5)]
    colors = [(0, 0, 0), (50, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (250, 0, 0)]
    anns = [_ann(k + 1, k, [0, 0, k + 1, 1]) for k in range(6)]  # box width k + 1 identifies image k
    ann_file, image_dir = _write_dataset(tmp_path, images, anns, colors=colors)
    for k, name in zip((0, 2, 3, 4), ("truncated", "empty", "text", "missing")):
        (image_dir / f"{k}.png").unlink()
        if name != "missing":
            (image_dir / f"{k}.png").write_bytes(bad[name].read_bytes())
    strict = CocoDetection(ann_file, image_dir)
    with pytest.raises(ImageLoadError, match=r"2\.png"):
        strict[2]
    ds = CocoDetection(ann_file, image_dir, skip_bad_images=True)
    image, target = ds[2]  # 2, 3, 4 are bad -> 5
    assert target["image_id"] == 5 and target["boxes"][0, 2] == 6 and ds.stats["skipped_images"] == 3
    assert abs(image[0].mean().item() - 250 / 255) < 1e-6
    image, target = ds[0]  # 0 is bad -> 1
    assert target["image_id"] == 1 and target["boxes"][0, 2] == 2 and ds.stats["skipped_images"] == 4
    assert abs(image[0].mean().item() - 50 / 255) < 1e-6
    (image_dir / "5.png").unlink()
    image, target = ds[5]  # 5 is bad -> wraps to 0 (bad) -> 1
    assert target["image_id"] == 1 and ds.stats["skipped_images"] == 6
    (image_dir / "1.png").unlink()
    with pytest.raises(ImageLoadError, match="none of the 6 images"):
        ds[0]


# -------------------------------------------------------------------------------------- bad annotation files


def _base():
    return {"images": [_img(1), _img(2)], "categories": [{"id": 3, "name": "a"}],
            "annotations": [_ann(10, 1, [1, 1, 2, 2]), _ann(11, 2, [1, 1, 2, 2])]}


def _set(path, value):
    def mutate(d):
        obj = d
        for key in path[:-1]:
            obj = obj[key]
        if value is KeyError:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value
        return d
    return mutate


@pytest.mark.parametrize("mutate,pattern", [
    (lambda d: "{not json", r"not valid JSON"),
    (lambda d: [d], r"top level must be a JSON object"),
    (_set(["annotations"], KeyError), r"'annotations' missing"),
    (_set(["images"], {}), r"'images' missing or not a list"),
    (_set(["images", 1, "file_name"], KeyError), r"image #1 \(id=2\): missing key 'file_name'"),
    (_set(["images", 0, "height"], "10"), r"image #0 \(id=1\): 'height' must be a positive int"),
    (_set(["images", 1, "id"], 1), r"image #1 \(id=1\): duplicate image id"),
    (_set(["categories", 0, "id"], "3"), r"category #0 \(id='3'\): 'id' must be an int"),
    (_set(["annotations", 1, "bbox"], [1, 1, 2]), r"annotation #1 \(id=11\): 'bbox' must be a list of 4"),
    (_set(["annotations", 1, "bbox"], [1, "1", 2, 2]), r"annotation #1 \(id=11\): 'bbox' must be"),
    (_set(["annotations", 0, "iscrowd"], KeyError), r"annotation #0 \(id=10\): missing key 'iscrowd'"),
    (_set(["annotations", 0, "iscrowd"], 2), r"annotation #0 \(id=10\): 'iscrowd' must be 0 or 1"),
    (_set(["annotations", 1, "image_id"], 99), r"annotation #1 \(id=11\): image_id 99 is not in 'images'"),
    (_set(["annotations", 1, "category_id"], 4), r"annotation #1 \(id=11\): category_id 4 is not in"),
    (_set(["annotations", 1, "id"], 10), r"annotation #1 \(id=10\): duplicate annotation id"),
    (_set(["annotations", 1, "segmentation"], {"size": [5, 5], "counts": "a"}), r"#1 \(id=11\): RLE 'size'"),
    (_set(["annotations", 1, "segmentation"], [[1, 2, 3]]), r"#1 \(id=11\): 'segmentation' polygons"),
    (_set(["annotations", 1], "ann"), r"annotation #1: record must be a JSON object"),
])
def test_bad_annotation_files(tmp_path, mutate, pattern):
    data = mutate(_base())
    ann_file = tmp_path / "bad.json"
    ann_file.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(ValueError, match=pattern) as info:
        CocoDetection(ann_file, tmp_path)
    assert str(info.value).startswith(f"{ann_file}: ")


def test_binary_annotation_file_is_not_json(tmp_path):
    ann_file = tmp_path / "bad.json"
    ann_file.write_bytes(b"\xff\xd8\xff\x00\x01")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        CocoDetection(ann_file, tmp_path)


def test_dataset_splits_finds_both_layouts_and_names_what_is_missing(tmp_path):
    from minimask.data.coco import dataset_splits

    coco, synth, empty = tmp_path / "coco", tmp_path / "synth", tmp_path / "empty"
    for root, name in ((coco, "person_keypoints_train2017.json"), (synth, "instances_val.json")):
        (root / "annotations").mkdir(parents=True)
        (root / "annotations" / name).write_text("{}")
    empty.mkdir()
    splits = dataset_splits(str(coco), keypoints=True)
    assert splits["train"] == (coco / "annotations" / "person_keypoints_train2017.json", coco / "train2017")
    assert splits["val"] == (coco / "annotations" / "person_keypoints_val2017.json", coco / "val2017")
    assert dataset_splits(str(synth))["val"] == (synth / "annotations" / "instances_val.json", synth / "val")
    with pytest.raises(ValueError, match="instances_train2017.json"):
        dataset_splits(str(coco), keypoints=False)  # only keypoint files there
    with pytest.raises(ValueError, match="no such dataset folder"):
        dataset_splits(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="holds neither"):
        dataset_splits(str(empty))
