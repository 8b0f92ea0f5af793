"""Tests of the KAIST -> COCO converter (minimask/data/kaist.py) on a tiny fake KAIST tree: bbGt parsing (1-based
boxes, labels, occlusion, ignore flag, empty frames, malformed lines), the JSON (pycocotools, CocoDetection), the
command line and the errors for missing files."""
import contextlib
import io
import json

import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from minimask.data.coco import CocoDetection
from minimask.data.kaist import convert_kaist, daytime, kaist_annotation, main, read_bbgt, read_image_list, summarize

HEADER = "% bbGt version=3\n"
# Frame 1 (day): person, people, person? with occlusion 0/1/2 and one ign=1. Frame 2 (day): cyclist, person?a, a
# blank line, then a person covering the whole 640 x 512 frame (ign=1). Frame 3 (night): header only.
ANNOTATIONS = {
    "set00/V000/I00000": HEADER + "person 11 21 30 60 0 0 0 0 0 0 0\n"
                                  "people 101 51 40 80 1 101 51 40 40 0 0\n"
                                  "person? 201 101 20 50 2 201 101 20 25 1 0\n",
    "set00/V000/I00001": HEADER + "cyclist 301 201 25 50 0 0 0 0 0 0 0\n"
                                  "person?a 401 301 15 35 1 401 301 15 20 0 0\n"
                                  "\n"
                                  "person 1 1 640 512 0 0 0 0 0 1 0\n",
    "set03/V001/I00002": HEADER,
}
LIST = "set00/V000/I00000\n\nset00/V000/I00001\nset03/V001/I00002\n"


def _make_tree(root, size=(640, 512), annotations=ANNOTATIONS, listing=LIST):
    """images/ (visible + lwir JPEGs of `size` = (w, h)), annotations/ and imageSets/train-all-02.txt under root."""
    for k, (frame, text) in enumerate(annotations.items()):
        set_name, video, name = frame.split("/")
        for modality in ("visible", "lwir"):
            folder = root / "images" / set_name / video / modality
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", size, (40 * k, 0, 0)).save(folder / f"{name}.jpg", quality=50)
        ann = root / "annotations" / set_name / video / f"{name}.txt"
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text(text)
    (root / "imageSets").mkdir(exist_ok=True)
    (root / "imageSets" / "train-all-02.txt").write_text(listing)
    return root / "images", root / "annotations", root / "imageSets" / "train-all-02.txt"


def _convert(tmp_path, **kwargs):
    images, anns, listing = _make_tree(tmp_path / "KAIST")
    out = convert_kaist(images, anns, listing, tmp_path / "out" / "kaist.json", **kwargs)
    return images, out, json.loads(out.read_text())


def test_read_bbgt_one_based_boxes_and_fields(tmp_path):
    path = tmp_path / "I00000.txt"
    path.write_text(ANNOTATIONS["set00/V000/I00000"])
    objs = read_bbgt(path)
    assert [o["label"] for o in objs] == ["person", "people", "person?"]
    assert objs[0]["box"] == [10, 20, 40, 80]  # x1 = l - 1, y1 = t - 1, x2 = x1 + w, y2 = y1 + h
    assert objs[1]["box"] == [100, 50, 140, 130]
    assert [o["occlusion"] for o in objs] == [0, 1, 2]
    assert [o["ignore"] for o in objs] == [0, 0, 1]
    assert objs[0]["visible_box"] is None  # bbGt's 0 0 0 0: no visible part given
    assert objs[1]["visible_box"] == [100, 50, 140, 90]
    assert objs[2]["angle"] == 0
    path.write_text(HEADER)
    assert read_bbgt(path) == []
    path.write_text("% bbGt version=3\nperson 1.5 2 3.25 4 0 0 0 0 0 0 0\n")
    assert read_bbgt(path)[0]["box"] == [0.5, 1, 3.75, 5]


@pytest.mark.parametrize("text, line, what", [
    (HEADER + "person 11 21 30 60 0 0 0 0 0 0 0\nperson 1 2 3 4 0\n", 3, "fields"),
    (HEADER + "person 11 21 30 sixty 0 0 0 0 0 0 0\n", 2, "not a number"),
    (HEADER + "\nperson 11 21 30 60 3 0 0 0 0 0 0\n", 3, "occlusion"),
    (HEADER + "person 11 21 30 60 0.5 0 0 0 0 0 0\n", 2, "occlusion"),
    (HEADER + "person 11 21 -30 60 0 0 0 0 0 0 0\n", 2, "negative"),
    ("% bbGt version=2\n", 1, "header"),
    ("", 1, "header"),
])
def test_read_bbgt_malformed_names_file_and_line(tmp_path, text, line, what):
    path = tmp_path / "I00042.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=what) as info:
        read_bbgt(path)
    assert f"{path}, line {line}:" in str(info.value)


def test_read_image_list_and_daytime(tmp_path):
    listing = tmp_path / "test-all-20.txt"
    listing.write_text("set06/V000/I00019\r\n\n  set09/V001/I01219  \n")
    assert read_image_list(listing) == [("set06", "V000", "I00019"), ("set09", "V001", "I01219")]
    assert [daytime(f"set{k:02d}") for k in range(12)] == ["day"] * 3 + ["night"] * 3 + ["day"] * 3 + ["night"] * 3
    with pytest.raises(ValueError, match="set12"):
        daytime("set12")
    listing.write_text("set06/V000/I00019\nset06/V000\n")
    with pytest.raises(ValueError, match=r"test-all-20.txt, line 2"):
        read_image_list(listing)
    listing.write_text("set12/V000/I00019\n")
    with pytest.raises(ValueError, match=r"line 1: set12"):
        read_image_list(listing)


def test_convert_images_and_annotations(tmp_path):
    images_dir, out, data = _convert(tmp_path)
    assert out == tmp_path / "out" / "kaist.json"
    assert data["categories"] == [{"id": 1, "name": "person"}]
    images = data["images"]
    assert [im["id"] for im in images] == [1, 2, 3]  # list order, the empty frame kept
    assert images[0] == {"id": 1, "file_name": "set00/V000/visible/I00000.jpg", "width": 640, "height": 512,
                         "lwir_file_name": "set00/V000/lwir/I00000.jpg", "set": "set00", "video": "V000",
                         "frame": "I00000", "daytime": "day"}
    assert [im["daytime"] for im in images] == ["day", "day", "night"]
    assert all((images_dir / im["lwir_file_name"]).is_file() for im in images)
    anns = data["annotations"]
    assert [a["id"] for a in anns] == [1, 2, 3, 4, 5, 6]
    assert [a["image_id"] for a in anns] == [1, 1, 1, 2, 2, 2]
    assert [a["kaist_label"] for a in anns] == ["person", "people", "person?", "cyclist", "person?a", "person"]
    assert [a["iscrowd"] for a in anns] == [0, 1, 1, 1, 1, 0]
    assert [a["occlusion"] for a in anns] == [0, 1, 2, 0, 1, 0]
    assert [a["ignore"] for a in anns] == [0, 0, 1, 0, 0, 1]
    assert anns[0]["bbox"] == [10, 20, 30, 60] and anns[0]["area"] == 1800
    assert anns[0]["segmentation"] == [[10, 20, 40, 20, 40, 80, 10, 80]]  # the box as a polygon
    assert anns[5]["bbox"] == [0, 0, 640, 512]
    assert all(a["category_id"] == 1 for a in anns)
    assert summarize(data) == ("3 images (1 without objects), 6 annotations "
                               "(person=2, people=1, person?=1, cyclist=1, person?a=1)")
    assert [p.name for p in out.parent.iterdir()] == ["kaist.json"]  # no temporary file left behind


def test_json_loads_in_pycocotools_and_coco_detection(tmp_path):
    images_dir, out, data = _convert(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(out))
    assert sorted(coco.getImgIds()) == [1, 2, 3] and coco.getAnnIds(imgIds=[3]) == []
    assert len(coco.getAnnIds(iscrowd=False)) == 2
    persons = [a for a in data["annotations"] if not a["iscrowd"]]
    dets = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 1.0} for a in persons]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)  # the ground truth as detections; crowds neither help nor hurt

    expected = {1: [[10, 20, 40, 80]], 2: [[0, 0, 640, 512]], 3: []}
    for mask_format in ("polygon", "bitmask"):
        dataset = CocoDetection(out, images_dir, filter_empty=False, mask_format=mask_format)
        assert len(dataset) == 3 and dataset.stats["crowd"] == 4 and dataset.has_masks
        for i in range(3):
            image, target = dataset[i]
            assert image.shape == (3, 512, 640)
            assert target["boxes"].tolist() == expected[target["image_id"]]
            assert target["labels"].tolist() == [1] * len(expected[target["image_id"]])
            if mask_format == "bitmask":
                masks = target["masks"].numpy()
                for mask, (x1, y1, x2, y2) in zip(masks, expected[target["image_id"]]):
                    assert mask[y1 + 1:y2 - 1, x1 + 1:x2 - 1].all()  # box-shaped mask (edges: rasteriser's call)
                    assert mask.sum() == pytest.approx((x2 - x1) * (y2 - y1), rel=0.1)
            else:
                assert len(target["polygons"]) == len(expected[target["image_id"]])
    assert len(CocoDetection(out, images_dir)) == 2  # the default drops the empty frame


def test_labels_outside_the_known_ones(tmp_path):
    frames = {"set01/V000/I00000": HEADER + "person 1 1 5 5 0 0 0 0 0 0 0\ndog 3 4 5 6 0 0 0 0 0 0 0\n"}
    images, anns, listing = _make_tree(tmp_path, size=(32, 24), annotations=frames, listing="set01/V000/I00000\n")
    out = convert_kaist(images, anns, listing, tmp_path / "a.json", read_sizes=True)
    data = json.loads(out.read_text())
    assert data["images"][0]["width"] == 32 and data["images"][0]["height"] == 24  # read_sizes: the real size
    dog = data["annotations"][1]
    assert dog["kaist_label"] == "dog" and dog["iscrowd"] == 1 and dog["bbox"] == [2, 3, 5, 6]
    assert "dog=1" in summarize(data)
    with pytest.raises(ValueError, match=r"I00000.txt, line 3: unknown label 'dog'"):
        convert_kaist(images, anns, listing, tmp_path / "b.json", strict_labels=True)
    assert not (tmp_path / "b.json").exists()


def test_missing_and_malformed_inputs_name_the_path(tmp_path):
    images, anns, listing = _make_tree(tmp_path / "KAIST")
    out = tmp_path / "out.json"
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        convert_kaist(images, anns, tmp_path / "nowhere.txt", out)
    with pytest.raises(FileNotFoundError, match="no_images"):
        convert_kaist(tmp_path / "no_images", anns, listing, out)
    with pytest.raises(FileNotFoundError, match="no_annotations"):
        convert_kaist(images, tmp_path / "no_annotations", listing, out)
    with pytest.raises(FileNotFoundError, match="is .* the KAIST images/ folder"):
        convert_kaist(images / "set00", anns, listing, out)  # a root one level too deep
    (anns / "set00" / "V000" / "I00001.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"set00/V000/I00001\.txt"):
        convert_kaist(images, anns, listing, out)
    (anns / "set00" / "V000" / "I00001.txt").write_text(HEADER + "person 1 2 3\n")
    with pytest.raises(ValueError, match=r"I00001\.txt, line 2: expected 12 fields"):
        convert_kaist(images, anns, listing, out)
    assert not out.exists()


def test_flat_annotation_names(tmp_path):
    images, anns, listing = _make_tree(tmp_path / "KAIST")
    flat = tmp_path / "sanitized"  # another annotation root, files named setXX_VYYY_IZZZZZ.txt
    flat.mkdir()
    for frame, text in ANNOTATIONS.items():
        (flat / (frame.replace("/", "_") + ".txt")).write_text(text.replace("person 11 21", "person 12 21"))
    data = json.loads(convert_kaist(images, flat, listing, tmp_path / "s.json").read_text())
    assert data["annotations"][0]["bbox"] == [11, 20, 30, 60]


def test_command_line(tmp_path, capsys):
    images, anns, listing = _make_tree(tmp_path / "KAIST")
    out = tmp_path / "cli.json"
    args = ["--images", str(images), "--annotations", str(anns), "--list", str(listing), "--output", str(out)]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert stdout.count("\n") == 1 and "3 images (1 without objects), 6 annotations (person=2," in stdout
    with contextlib.redirect_stdout(io.StringIO()):
        assert len(COCO(str(out)).getImgIds()) == 3

    args[args.index("--list") + 1] = str(tmp_path / "missing-list.txt")
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "missing-list.txt" in captured.err and "Traceback" not in captured.err
    with pytest.raises(SystemExit) as info:
        main(["--images", str(images)])  # argparse: required options missing
    assert info.value.code == 2


def test_training_protocol_turns_small_and_heavily_occluded_persons_into_ignore_regions():
    def person(h, occ):
        return {"label": "person", "box": [10.0, 20.0, 30.0, 20.0 + h], "occlusion": occ, "ignore": 0}

    objects = [person(49, 0), person(50, 0), person(80, 1), person(80, 2), {**person(80, 0), "label": "people"}]
    crowd = [kaist_annotation(o, ann_id=i, image_id=1, train_protocol=True)["iscrowd"]
             for i, o in enumerate(objects)]
    assert crowd == [1, 0, 0, 1, 1]  # under 50 px, heavy occlusion and crowd labels are ignored in training
    test = [kaist_annotation(o, ann_id=i, image_id=1)["iscrowd"] for i, o in enumerate(objects)]
    assert test == [0, 0, 0, 0, 1]  # a test file keeps every person: the miss rate filters by itself
