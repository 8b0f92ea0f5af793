"""Tests of the Penn-Fudan -> COCO converter (minimask/data/pennfudan.py): hand-made masks and a tiny fake dataset
always; the real dataset (counts, split, boxes against the PASCAL text boxes, GT-as-detections AP) when present.
The download path is tested offline: a fake PennFudanPed tree is zipped in tmp_path and fetched by a file:// URL."""
import contextlib
import hashlib
import io
import json
import re
import zipfile

import numpy as np
import pytest
from conftest import shared_data_dir
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from minimask.data import pennfudan
from minimask.data.pennfudan import (
    PENNFUDAN_URL,
    convert_pennfudan,
    default_pennfudan_cache,
    download_pennfudan,
    load_manifest,
    mask_instances,
    pennfudan_dataset,
    read_pascal_boxes,
    verify_manifest,
)


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


# ------------------------------------------------------------------------------------------ download and cache
def _tree_manifest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _zip_tree(root, zip_path, extra=()):
    """Zip `root` under the top-level folder name PennFudanPed/ (as the published zip is), plus `extra` members."""
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                zf.write(p, "PennFudanPed/" + p.relative_to(root).as_posix())
        for name, data in extra:
            zf.writestr(name, data)
    return zip_path


@pytest.fixture
def fake_zip(tmp_path):
    """(file:// URL of a zipped 3-image fake PennFudanPed, the fake tree's manifest, the tree)."""
    root = tmp_path / "src" / "PennFudanPed"
    _fake_dataset(root, [(8, 10), (9, 7), (12, 11)])
    (root / "readme.txt").write_text("fake Penn-Fudan\n")
    zip_path = _zip_tree(root, tmp_path / "PennFudanPed.zip")
    return zip_path.as_uri(), _tree_manifest(root), root


def test_download_extract_verify_convert_then_reuse_cache(tmp_path, fake_zip, monkeypatch):
    url, manifest, _ = fake_zip
    cache = tmp_path / "cache"
    paths = pennfudan_dataset(cache_dir=cache, url=url, manifest=manifest, num_val=1)
    assert paths.image_dir == cache / "PennFudanPed" / "PNGImages"
    assert paths.all_ann == cache / "converted" / "all.json"
    assert sorted(p.name for p in cache.iterdir()) == ["PennFudanPed", "converted"]  # no zip, no temp folder
    assert _tree_manifest(cache / "PennFudanPed") == manifest
    assert [im["file_name"] for im in _load(paths.val_ann)["images"]] == ["Ped00002.png"]
    assert len(_load(paths.all_ann)["annotations"]) == 4
    before = paths.all_ann.stat().st_mtime_ns

    # Second call: the zip is gone and neither download nor conversion may run; the cache answers.
    (tmp_path / "PennFudanPed.zip").unlink()

    def forbidden(*args, **kwargs):
        raise AssertionError("must not be called when cached")

    monkeypatch.setattr(pennfudan.urllib.request, "urlopen", forbidden)
    monkeypatch.setattr(pennfudan, "convert_pennfudan", forbidden)
    assert pennfudan_dataset(cache_dir=cache, url=url, manifest=manifest, num_val=1) == paths
    assert download_pennfudan(cache, url=url, manifest=manifest) == cache / "PennFudanPed"
    assert paths.all_ann.stat().st_mtime_ns == before
    monkeypatch.undo()
    # Other conversion parameters reconvert (from the cached folder, still without downloading).
    assert len(_load(pennfudan_dataset(cache_dir=cache, url=url, manifest=manifest, num_val=2).val_ann)["images"]) == 2


def test_local_source_is_verified_and_used_in_place(tmp_path, fake_zip):
    _, manifest, root = fake_zip
    paths = pennfudan_dataset(root, cache_dir=tmp_path / "cache", url="file:///nowhere.zip", manifest=manifest,
                              num_val=1)
    assert paths.image_dir == root / "PNGImages"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["converted"]  # nothing downloaded or copied
    (root / "PNGImages" / "Ped00001.png").write_bytes(b"changed")
    with pytest.raises(ValueError, match="PNGImages/Ped00001.png"):
        pennfudan_dataset(root, cache_dir=tmp_path / "cache", manifest=manifest, num_val=1)


def test_verify_manifest_names_first_bad_file_and_count(tmp_path, fake_zip):
    _, manifest, root = fake_zip
    verify_manifest(root, manifest)  # returns None
    verify_manifest(root, {k: v for k, v in manifest.items() if k != "readme.txt"})  # extra files are allowed
    (root / "PedMasks" / "Ped00002_mask.png").unlink()
    (root / "readme.txt").write_text("edited\n")
    with pytest.raises(ValueError, match=r"PedMasks/Ped00002_mask.png is missing \(2 of 7 files"):
        verify_manifest(root, manifest)


def test_download_manifest_mismatch_raises_and_leaves_nothing(tmp_path, fake_zip):
    url, manifest, _ = fake_zip
    cache = tmp_path / "cache"
    wrong = dict(manifest, **{"PedMasks/Ped00001_mask.png": "0" * 64})
    with pytest.raises(ValueError, match=r"PedMasks/Ped00001_mask.png has a different SHA-256 \(1 of 7"):
        download_pennfudan(cache, url=url, manifest=wrong)
    assert list(cache.iterdir()) == []
    # A cached folder that no longer verifies is reported (not silently replaced or deleted).
    download_pennfudan(cache, url=url, manifest=manifest)
    with pytest.raises(ValueError, match="Ped00001_mask.png.*remove"):
        download_pennfudan(cache, url=url, manifest=wrong)
    assert (cache / "PennFudanPed" / "PedMasks" / "Ped00001_mask.png").is_file()


@pytest.mark.parametrize("member", ["../evil", "PennFudanPed/../../evil", "/evil", "..\\evil"])
def test_zip_with_unsafe_member_is_refused(tmp_path, fake_zip, member):
    _, manifest, root = fake_zip
    url = _zip_tree(root, tmp_path / "evil.zip", extra=[(member, b"x")]).as_uri()
    cache = tmp_path / "a" / "cache"
    with pytest.raises(ValueError, match=re.escape(url) + ".*evil"):
        download_pennfudan(cache, url=url, manifest=manifest)
    assert list(cache.iterdir()) == []
    assert not any(p.name == "evil" for p in tmp_path.rglob("*"))


def test_missing_url_or_not_a_zip_raises_naming_url(tmp_path, fake_zip):
    _, manifest, _ = fake_zip
    cache = tmp_path / "cache"
    url = (tmp_path / "does-not-exist.zip").as_uri()
    with pytest.raises(OSError, match=re.escape(url)):
        pennfudan_dataset(cache_dir=cache, url=url, manifest=manifest)
    assert list(cache.iterdir()) == []  # no half-written folder, no partial zip
    (tmp_path / "page.html").write_text("<html>not a zip</html>")
    url = (tmp_path / "page.html").as_uri()
    with pytest.raises(ValueError, match=re.escape(url) + ".*zip"):
        download_pennfudan(cache, url=url, manifest=manifest)
    assert list(cache.iterdir()) == []
    no_folder = tmp_path / "x.zip"
    with zipfile.ZipFile(no_folder, "w") as zf:
        zf.writestr("Other/readme.txt", "x")  # a valid zip without the PennFudanPed/ folder
    with pytest.raises(ValueError, match="no top-level PennFudanPed"):
        download_pennfudan(cache, url=no_folder.as_uri(), manifest=manifest)
    assert list(cache.iterdir()) == []


def test_default_cache_follows_minimask_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMASK_CACHE", str(tmp_path))
    assert default_pennfudan_cache() == tmp_path / "pennfudan"
    assert PENNFUDAN_URL.startswith("https://") and PENNFUDAN_URL.endswith("/PennFudanPed.zip")


def test_load_manifest_rejects_malformed_lines(tmp_path):
    good = "a" * 64
    for bad in [f"{good} one-space.txt", f"{'g' * 64}  x.txt", f"{good}  ../x.txt", f"{good}  /x.txt",
                f"{good}  x.txt\n{good}  x.txt"]:
        (tmp_path / "m.txt").write_text(bad + "\n")
        with pytest.raises(ValueError, match="m.txt:"):
            load_manifest(tmp_path / "m.txt")
    (tmp_path / "m.txt").write_text(f"{good}  b.txt\n\n{good}  *a b.txt\n")
    assert load_manifest(tmp_path / "m.txt") == {"b.txt": good, "a b.txt": good}


def test_packaged_manifest_parses_and_is_sorted():
    manifest = load_manifest()
    lines = pennfudan.MANIFEST_PATH.read_text().splitlines()
    assert [line.split("  ", 1)[1] for line in lines] == sorted(manifest) and len(lines) == len(manifest)
    for folder, suffix in (("PNGImages", ".png"), ("PedMasks", "_mask.png"), ("Annotation", ".txt")):
        assert sum(k.startswith(folder + "/") and k.endswith(suffix) for k in manifest) == 170, folder


def test_packaged_manifest_verifies_real_copy(penn_fudan):
    verify_manifest(penn_fudan)  # the packaged manifest, every file hashed


def test_data_pennfudan_reads_the_cache(penn_fudan, tmp_path, monkeypatch):
    """`--data pennfudan` (dataset_splits): a verified copy in the cache is converted and split 120 / 50."""
    from minimask.data.coco import dataset_splits

    monkeypatch.setenv("MINIMASK_CACHE", str(tmp_path))
    (tmp_path / "pennfudan").mkdir()
    (tmp_path / "pennfudan" / "PennFudanPed").symlink_to(penn_fudan, target_is_directory=True)
    splits = dataset_splits("pennfudan")
    assert {name: len(json.loads(ann.read_text())["images"]) for name, (ann, _) in splits.items()} == {
        "train": 120, "val": 50}
    assert splits["train"][1] == tmp_path / "pennfudan" / "PennFudanPed" / "PNGImages"
