"""Tests of the generated KAIST-layout dataset (minimask/data/synthetic_kaist.py): the layout and lists, frame sizes
and modes, conversion by the KAIST converter, determinism, thermal / night statistics, the bbGt -> COCO round trip,
the cached entry point and the command line. Offline and small (8 + 6 frames)."""
import json

import numpy as np
import pytest
from PIL import Image

from minimask.data.kaist import CROWD_LABELS, build_kaist, convert_kaist, read_bbgt, read_image_list
from minimask.data.synthetic_kaist import (MARKER_NAME, build_synthetic_kaist, default_kaist_cache_dir, is_built, main,
                                           synthetic_kaist_dataset)
from minimask.miss_rate import IGNORE_LABELS

N_TRAIN, N_TEST = 8, 6


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_synthetic_kaist(tmp_path_factory.mktemp("skaist") / "KAIST", num_train_frames=N_TRAIN,
                                 num_test_frames=N_TEST)


def _frames(paths):
    """(list file, [(set, video, frame)]) of both splits."""
    return [(lst, read_image_list(lst)) for lst in (paths.train_list, paths.test_list)]


def _files(root):
    """{relative path: bytes} of every file under root."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_lists_and_sets(built):
    assert built.train_list.name == "train-all-02.txt" and built.test_list.name == "test-all-20.txt"
    (_, train), (_, test) = _frames(built)
    assert len(train) == N_TRAIN and len(test) == N_TEST
    assert {int(s[3:]) for s, _, _ in train} <= set(range(6)) and {int(s[3:]) for s, _, _ in test} <= set(range(6, 12))
    for s, v, f in train + test:
        assert (built.images / s / v / "visible" / f"{f}.jpg").is_file()
        assert (built.images / s / v / "lwir" / f"{f}.jpg").is_file()
        assert (built.annotations / s / v / f"{f}.txt").read_text().startswith("% bbGt version=3\n")


def test_frames_are_640x512_rgb_and_greyscale(built):
    for _, frames in _frames(built):
        for s, v, f in frames:
            with Image.open(built.images / s / v / "visible" / f"{f}.jpg") as vis:
                assert vis.size == (640, 512) and vis.mode == "RGB"
            with Image.open(built.images / s / v / "lwir" / f"{f}.jpg") as lwir:
                assert lwir.size == (640, 512) and lwir.mode == "L"


def test_converter_reads_it_with_the_expected_mix(built):
    labels, occlusions, heights = set(), set(), []
    for lst, frames in _frames(built):
        data = build_kaist(built.images, built.annotations, lst, read_sizes=True, strict_labels=True)
        assert len(data["images"]) == len(frames)
        assert {im["daytime"] for im in data["images"]} == {"day", "night"}
        assert sum(im["daytime"] == "day" for im in data["images"]) == len(frames) // 2
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 640 and y + h <= 512 and w > 0 and h > 0  # clipped to the frame
            assert ann["ignore"] == 0 and ann["iscrowd"] == (ann["kaist_label"] != "person")
            labels.add(ann["kaist_label"])
            if ann["kaist_label"] == "person":
                occlusions.add(ann["occlusion"])
                heights.append(h)
    assert "person" in labels and labels - {"person"} and labels <= {"person", *IGNORE_LABELS}
    assert set(IGNORE_LABELS) <= set(CROWD_LABELS)  # the converter marks every ignore label crowd
    assert occlusions >= {0, 1} and min(heights) < 55 <= max(heights)  # the Reasonable setting has work to do


def test_same_seed_same_bytes_other_seed_differs(built, tmp_path):
    again = build_synthetic_kaist(tmp_path / "again", num_train_frames=N_TRAIN, num_test_frames=N_TEST)
    assert _files(again.root) == _files(built.root)
    other = _files(build_synthetic_kaist(tmp_path / "other", num_train_frames=N_TRAIN, num_test_frames=N_TEST,
                                         seed=1).root)
    first = built.images / "set00/V000/visible/I00000.jpg"
    assert other["images/set00/V000/visible/I00000.jpg"] != first.read_bytes()
    assert other["annotations/set00/V000/I00000.txt"] != (built.annotations / "set00/V000/I00000.txt").read_bytes()


def test_thermal_people_warm_night_dark_visible_boxes_fit(built):
    inside, outside, brightness = [], [], {"day": [], "night": []}
    for _, frames in _frames(built):
        for s, v, f in frames:
            lwir = np.asarray(Image.open(built.images / s / v / "lwir" / f"{f}.jpg"), dtype=np.float64)
            objs = read_bbgt(built.annotations / s / v / f"{f}.txt")
            for o in objs:  # an occluded person's visible part: the top of its box
                assert (o["visible_box"] is not None) == (o["occlusion"] > 0)
                if o["visible_box"]:
                    (x1, y1, x2, y2), (vx1, vy1, vx2, vy2) = o["box"], o["visible_box"]
                    assert x1 <= vx1 < vx2 <= x2 and vy1 == y1 and vy2 < y2
            person, anything = np.zeros(lwir.shape, bool), np.zeros(lwir.shape, bool)
            for o in objs:
                x1, y1, x2, y2 = o["box"]
                anything[y1:y2, x1:x2] = True
                person[y1:y2, x1:x2] |= o["label"] == "person" and o["occlusion"] == 0
            inside.append(lwir[person])
            outside.append(lwir[~anything])
            vis = np.asarray(Image.open(built.images / s / v / "visible" / f"{f}.jpg"), dtype=np.float64)
            brightness["day" if int(s[3:]) in (0, 1, 2, 6, 7, 8) else "night"].append(vis.mean())
    assert np.concatenate(inside).mean() > np.concatenate(outside).mean() + 15
    assert max(brightness["night"]) < 0.5 * min(brightness["day"])


def test_bbgt_box_round_trips_to_coco(built, tmp_path):
    frames = read_image_list(built.train_list)
    for index, (s, v, f) in enumerate(frames):
        lines = (built.annotations / s / v / f"{f}.txt").read_text().splitlines()[1:]
        if lines:
            break
    label, l, t, w, h = lines[0].split()[:5]
    assert all(value.isdigit() for value in (l, t, w, h))  # integers, as bbGt files from MATLAB
    data = json.loads(convert_kaist(built.images, built.annotations, built.train_list, tmp_path / "k.json")
                      .read_text())
    first = next(a for a in data["annotations"] if a["image_id"] == index + 1)
    assert first["kaist_label"] == label
    assert first["bbox"] == [int(l) - 1, int(t) - 1, int(w), int(h)]


def test_cached_dataset_reused_and_rebuilt_on_new_params(tmp_path):
    root = tmp_path / "cache"
    paths = synthetic_kaist_dataset(root, num_train_frames=4, num_test_frames=2)
    assert is_built(root, num_train_frames=4, num_test_frames=2)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert synthetic_kaist_dataset(root, num_train_frames=4, num_test_frames=2) == paths
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == mtimes  # nothing rewritten

    synthetic_kaist_dataset(root, num_train_frames=2, num_test_frames=2, seed=3)
    assert json.loads((root / MARKER_NAME).read_text())["seed"] == 3
    assert not is_built(root, num_train_frames=4, num_test_frames=2)
    assert len(list((root / "images").rglob("*.jpg"))) == 2 * (2 + 2)  # frames of the larger build removed
    assert (root / "annotations/set00/V000/I00000.txt").stat().st_mtime_ns != mtimes[
        root / "annotations/set00/V000/I00000.txt"]


def test_unmarked_folder_keeps_foreign_files(tmp_path):
    foreign = tmp_path / "images/set00/V000/visible/I09998.jpg"  # e.g. a real KAIST frame
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"not ours")
    build_synthetic_kaist(tmp_path, num_train_frames=2, num_test_frames=2)
    assert foreign.read_bytes() == b"not ours"


def test_cache_dir_follows_env_and_cli_prints_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINIMASK_CACHE", str(tmp_path / "c"))
    assert default_kaist_cache_dir() == tmp_path / "c" / "synthetic-kaist-v1"
    assert main(["--root", str(tmp_path / "cli"), "--train", "2", "--test", "2", "--seed", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"images: {tmp_path / 'cli' / 'images'}"
    assert out[-1].startswith("4 frames (2 day, 2 night), ")
