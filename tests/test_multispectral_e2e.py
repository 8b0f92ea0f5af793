"""The KAIST-layout miniature end to end: generate, convert (training protocol for the training list), train on
visible / thermal / both, resume exactly, evaluate MR^-2 and draw, all in-process with a handful of iterations."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402
import train  # noqa: E402
import visualize  # noqa: E402
from minimask.data.kaist import convert_kaist  # noqa: E402
from minimask.data.synthetic_kaist import build_synthetic_kaist  # noqa: E402
from minimask.engine.checkpoint import load_checkpoint  # noqa: E402
from minimask.tools.experiments import SYNTHETIC_KAIST_STATS  # noqa: E402

FAST = ["solver.log_period=1", "model.rpn.post_nms_topk_test=20", "model.roi_heads.detections_per_image=20",
        "input.min_size_train=(96,)", "input.max_size_train=120", "input.min_size_test=96", "input.max_size_test=120",
        "solver.checkpoint_period=2"]
MODALITIES = {"visible": ("visible",), "thermal": ("thermal",), "both": ("visible", "thermal")}


def modality_overrides(name: str) -> list[str]:
    modalities = MODALITIES[name]
    mean = sum((SYNTHETIC_KAIST_STATS[m][0] for m in modalities), ())
    std = sum((SYNTHETIC_KAIST_STATS[m][1] for m in modalities), ())
    return [f"input.modalities={','.join(modalities)}", f"model.pixel_mean={mean}", f"model.pixel_std={std}"]


@pytest.fixture(scope="module")
def kaist_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("kaist")
    paths = build_synthetic_kaist(root, num_train_frames=6, num_test_frames=4)
    train_json = convert_kaist(paths.images, paths.annotations, paths.train_list, root / "train.json",
                               train_protocol=True)
    test_json = convert_kaist(paths.images, paths.annotations, paths.test_list, root / "test.json")
    return {"train": f"train={train_json}:{paths.images}", "val": f"val={test_json}:{paths.images}",
            "test_json": test_json, "images": paths.images}


def _argv(data, output, name, *extra):
    return ["--config", "tiny_pedestrian", "--data", data["train"], data["val"], "--output", str(output),
            "--iters", "4", "--workers", "0", "--seed", "5", "--eval-period", "0", *extra, *FAST,
            *modality_overrides(name)]


@pytest.fixture(scope="module")
def runs(kaist_data, tmp_path_factory):
    out = {}
    for name in MODALITIES:
        out[name] = tmp_path_factory.mktemp(name) / "run"
        assert train.main(_argv(kaist_data, out[name], name)) == 0
    return out


@pytest.mark.slow
def test_each_modality_trains_with_its_channels_and_logs_the_miss_rate(runs):
    for name, channels in (("visible", 3), ("thermal", 1), ("both", 4)):
        final = load_checkpoint(runs[name] / "model_final.pth")
        assert final["model"]["backbone.conv1.weight"].shape[1] == channels
        assert final["model"]["pixel_mean"].numel() == channels
        evals = [json.loads(line) for line in (runs[name] / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "eval"]
        assert {"MR/Reasonable-all", "MR/Reasonable-day", "MR/Reasonable-night"} <= set(evals[-1])
        assert 0 <= evals[-1]["MR/Reasonable-all"] <= 100


@pytest.mark.slow
@pytest.mark.parametrize("name", ["thermal", "both"])
def test_resume_continues_exactly(runs, kaist_data, tmp_path, name):
    out = tmp_path / "resumed"
    shutil.copytree(runs[name], out)
    (out / "model_final.pth").unlink()  # resume from model_0000002.pth
    assert train.main(_argv(kaist_data, out, name, "--resume")) == 0
    expected, got = load_checkpoint(runs[name] / "model_final.pth"), load_checkpoint(out / "model_final.pth")
    for key, tensor in expected["model"].items():
        assert torch.equal(got["model"][key], tensor), key


@pytest.mark.slow
@pytest.mark.parametrize("name", ["thermal", "both"])
def test_evaluate_and_draw(runs, kaist_data, tmp_path, capsys, name):
    weights = runs[name] / "model_final.pth"
    rc = evaluate.main(["--config", "tiny_pedestrian", "--weights", str(weights), "--metric", "miss-rate",
                        "--data", kaist_data["val"], "--output", str(tmp_path / "eval"), *FAST,
                        *modality_overrides(name)])
    assert rc == 0
    assert "Reasonable-night" in capsys.readouterr().out
    assert "MR/Reasonable-all" in json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert visualize.main(["--weights", str(weights), "--data", kaist_data["val"], "--num", "2",
                           "--output", str(tmp_path / "drawn")]) == 0
    drawn = sorted((tmp_path / "drawn").glob("*.png"))
    assert len(drawn) == 2
    with Image.open(drawn[0]) as image:
        pixels = np.asarray(image.convert("RGB"))  # (H, W, 3)
    if name == "thermal":  # grey apart from the drawn boxes: most pixels have R == G == B
        assert (pixels[..., 0] == pixels[..., 2]).mean() > 0.9
