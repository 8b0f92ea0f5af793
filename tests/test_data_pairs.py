"""`--data split=ANN.json:IMAGES` pairs: parsing (minimask.data.coco.data_pairs, minimask.cli.data_spec), the check
that an image folder holds its annotation file's images, and train.py / evaluate.py / visualize.py run on pairs,
with one-line errors naming the path for bad ones."""
import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402
import minimask  # noqa: E402
import train  # noqa: E402
import visualize  # noqa: E402
from minimask.cli import UsageError, data_spec  # noqa: E402
from minimask.config import to_dict  # noqa: E402
from minimask.data.coco import CocoDetection, check_image_files, dataset_splits  # noqa: E402
from minimask.data.synthetic import build_synthetic  # noqa: E402
from minimask.engine.checkpoint import save_checkpoint  # noqa: E402

FAST = ["--config", "tiny", "--iters", "2", "--workers", "0", "solver.log_period=1", "input.min_size_test=96",
        "input.max_size_test=96", "model.rpn.post_nms_topk_test=20", "model.roi_heads.detections_per_image=10"]


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    """A user's dataset: COCO files and image folders under names of their own (one with a space)."""
    built = tmp_path_factory.mktemp("built")
    build_synthetic(built, num_train=6, num_val=3)
    root = tmp_path_factory.mktemp("own data")
    for split, name in (("train", "fields"), ("val", "held out")):
        shutil.copytree(built / split, root / f"{name} images")
        shutil.copy(built / "annotations" / f"instances_{split}.json", root / f"{name}.json")
    (root / "other photos").mkdir()  # a folder of images, none of them the JSON's
    shutil.copy(built / "val" / "000000.jpg", root / "other photos" / "IMG_0001.jpg")
    return root


def pair(split, root, name):
    return f"{split}={root / (name + '.json')}:{root / (name + ' images')}"


def test_pairs_parse_with_shell_quoting_and_name_each_missing_path(own_data, tmp_path):
    spec = data_spec(pair("train", own_data, "fields"), [pair("val", own_data, "held out"), "solver.lr=0.1"])[0]
    splits = dataset_splits(spec)
    assert splits == {"train": (own_data / "fields.json", own_data / "fields images"),
                      "val": (own_data / "held out.json", own_data / "held out images")}
    assert list(dataset_splits(data_spec(pair("train", own_data, "fields"), [])[0])) == ["train"]
    for tokens, words in (([f"train={tmp_path}/nope.json:{own_data}"], ["no such annotation file", "nope.json"]),
                          ([f"val={own_data / 'fields.json'}:{tmp_path}/nope"], ["no such image folder", "nope"]),
                          ([f"train={own_data / 'fields.json'}"], ["expected train=ANN.json:IMAGES"]),
                          ([pair("train", own_data, "fields")] * 2, ["twice"])):
        with pytest.raises(ValueError) as info:
            dataset_splits(data_spec(tokens[0], tokens[1:])[0])
        assert all(w in str(info.value) for w in words), info.value


def test_data_spec_moves_pairs_out_of_the_overrides_in_order():
    spec, rest = data_spec("train=a.json:a", ["x.y=1", "val=b.json:b", "x.y=2"])
    assert spec == "train=a.json:a val=b.json:b" and rest == ["x.y=1", "x.y=2"]
    assert data_spec("synthetic", ["x.y=1"]) == ("synthetic", ["x.y=1"])
    with pytest.raises(UsageError, match="follow --data"):
        data_spec("synthetic", ["val=b.json:b"])


def test_a_folder_without_the_json_images_is_named(own_data):
    dataset = CocoDetection(own_data / "fields.json", own_data / "other photos")
    with pytest.raises(ValueError) as info:
        check_image_files(dataset)
    assert "other photos" in str(info.value) and "fields.json" in str(info.value)
    # Some images missing (6 in the JSON, 3 in the folder) is left to loading, which names each (or skips it).
    check_image_files(CocoDetection(own_data / "fields.json", own_data / "held out images"))
    check_image_files(CocoDetection(own_data / "fields.json", own_data / "fields images"))


def test_train_evaluate_visualize_on_pairs(own_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--data", pair("train", own_data, "fields"), "--output", str(out), *FAST]) == 0
    assert "no val split" in capsys.readouterr().out
    assert all(r["kind"] == "train" for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()))
    out2 = tmp_path / "run2"
    assert train.main(["--data", pair("train", own_data, "fields"), pair("val", own_data, "held out"),
                       "--output", str(out2), *FAST]) == 0
    assert any(r["kind"] == "eval" for r in map(json.loads, (out2 / "metrics.jsonl").read_text().splitlines()))
    weights = str(out2 / "model_final.pth")
    assert evaluate.main(["--config", "tiny", "--weights", weights, "--data", pair("val", own_data, "held out"),
                          "--output", str(tmp_path / "ev"), "model.roi_heads.num_classes=6"]) == 0
    assert (tmp_path / "ev" / "metrics.json").is_file()
    assert evaluate.main(["--config", "tiny", "--weights", weights, "--data", pair("val", own_data, "held out"),
                          "--metric", "miss-rate", "--output", str(tmp_path / "mr"),
                          "model.roi_heads.num_classes=6"]) == 0
    assert set(json.loads((tmp_path / "mr" / "metrics.json").read_text())) >= {"MR/Reasonable-all", "MR/Occ=heavy"}
    assert visualize.main(["--weights", weights, "--data", pair("val", own_data, "held out"), "--num", "2",
                           "--output", str(tmp_path / "vis")]) == 0
    assert len(list((tmp_path / "vis").glob("*.png"))) == 2


@pytest.mark.parametrize("script", ["train", "evaluate", "visualize"])
@pytest.mark.parametrize("case", ["missing file", "wrong folder", "not coco"])
def test_bad_pairs_are_one_line_naming_the_path(own_data, tmp_path, capsys, script, case):
    (tmp_path / "list.json").write_text("[1, 2]")
    ann, images, named = {"missing file": (tmp_path / "none.json", own_data / "fields images", "none.json"),
                          "wrong folder": (own_data / "fields.json", own_data / "other photos", "other photos"),
                          "not coco": (tmp_path / "list.json", own_data / "fields images", "list.json")}[case]
    split = "train" if script == "train" else "val"
    data = ["--data", f"{split}={ann}:{images}"]
    weights = tmp_path / "w.pth"  # a real checkpoint, so that only the data is wrong
    cfg = minimask.get_config("tiny")
    save_checkpoint(weights, {"model": minimask.build_model(cfg).state_dict(), "config": to_dict(cfg)})
    code = {"train": lambda: train.main([*data, "--output", str(tmp_path / "out"), *FAST]),
            "evaluate": lambda: evaluate.main(["--config", "tiny", "--weights", str(weights), *data]),
            "visualize": lambda: visualize.main(["--weights", str(weights), *data, "--output", str(tmp_path / "v")]),
            }[script]()
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and named in err, err


def test_miss_rate_in_training_and_in_evaluate(own_data, tmp_path, capsys):
    """data.miss_rate=True logs KAIST's MR^-2 of the person class at each evaluation; evaluate.py --metric
    miss-rate scores a results file: the ground truth fed back scores the floor (1e-10 = 1e-8 %)."""
    out = tmp_path / "run"
    assert train.main(["--data", pair("train", own_data, "fields"), pair("val", own_data, "held out"),
                       "--output", str(out), *FAST, "data.miss_rate=True"]) == 0
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert "MR/Reasonable-all" in evals[-1] and "bbox/AP" in evals[-1]
    assert "Reasonable-all" in capsys.readouterr().out
    ann = tmp_path / "people.json"  # two 320 x 240 images, a person 100 px tall inside the bounds of each
    ann.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 320, "height": 240} for i in (1, 2)],
        "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [40.0 * i, 50, 40, 100], "area": 4000,
                         "iscrowd": 0} for i in (1, 2)],
        "categories": [{"id": 1, "name": "person"}]}))
    results = [{"image_id": i, "category_id": 1, "bbox": [40.0 * i, 50, 40, 100], "score": 0.9} for i in (1, 2)]
    (tmp_path / "gt.json").write_text(json.dumps(results))
    assert evaluate.main(["--results", str(tmp_path / "gt.json"), "--ann", str(ann), "--metric", "miss-rate",
                          "--output", str(tmp_path / "mr")]) == 0
    metrics = json.loads((tmp_path / "mr" / "metrics.json").read_text())
    assert metrics["MR/Reasonable-all"] == pytest.approx(1e-8) and metrics["MR/Scale=far"] is None
    assert (tmp_path / "mr" / "miss_rate.png").read_bytes()[:4] == b"\x89PNG"
    assert "Reasonable-all" in capsys.readouterr().out
