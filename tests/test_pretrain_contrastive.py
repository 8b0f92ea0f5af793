"""pretrain.py --method moco / densecl end to end: unlabelled images in, a backbone out that the detector loads
(heads skipped, metadata checked), exact resumption (also after SIGKILL), and two gloo processes training like one."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minimask  # noqa: E402
import pretrain  # noqa: E402
from minimask.data.unlabelled import UnlabelledImages, unlabelled_sources  # noqa: E402
from minimask.engine.checkpoint import load_checkpoint  # noqa: E402
from minimask.engine.initialization import check_pretrain_metadata, load_initial_weights  # noqa: E402
from minimask.tools.classification import read_pretrain_info  # noqa: E402
from test_train_faults import _free_port, _killed_between_checkpoints  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """12 unlabelled images of smooth random textures in nested folders (any image file counts)."""
    root = tmp_path_factory.mktemp("unlabelled")
    rng = np.random.default_rng(0)
    for i in range(12):
        folder = root / f"part{i % 2}"
        folder.mkdir(exist_ok=True)
        base = rng.integers(0, 255, size=(6, 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((56, 48), Image.BICUBIC).save(folder / f"{i}.png")
    return root


def _argv(method, data, output, *extra):
    return ["--method", method, "--config", "tiny", "--data", str(data), "--iters", "6", "--batch-size", "4",
            "--image-size", "32", "--workers", "0", "--log-period", "1", "--checkpoint-period", "2",
            "--output", str(output), *extra]


@pytest.fixture(scope="module")
def runs(images, tmp_path_factory):
    out = {}
    for method in ("moco", "densecl"):
        out[method] = tmp_path_factory.mktemp(method) / "out"
        assert pretrain.main(_argv(method, images, out[method])) == 0
    return out


def test_cross_modal_views_are_the_grey_visible_and_the_thermal_frame(tmp_path):
    from minimask.data.kaist import convert_kaist
    from minimask.data.synthetic_kaist import build_synthetic_kaist

    paths = build_synthetic_kaist(tmp_path, num_train_frames=2, num_test_frames=2)
    ann = convert_kaist(paths.images, paths.annotations, paths.train_list, tmp_path / "train.json")
    (folder, records), = unlabelled_sources([f"train={ann}:{paths.images}"])
    assert len(records) == 2  # every listed frame, labels unused
    both = UnlabelledImages([(folder, records)], image_size=32, modalities=("visible", "thermal"))
    assert [tuple(v.shape) for v in both[0]] == [(4, 32, 32), (4, 32, 32)]
    cross = UnlabelledImages([(folder, records)], image_size=32, modalities=("visible", "thermal"), cross_modal=True)
    assert cross.channels == 1 and [tuple(v.shape) for v in cross[1]] == [(1, 32, 32), (1, 32, 32)]
    with pytest.raises(ValueError, match="cross-modal views need visible and thermal"):
        UnlabelledImages([(folder, records)], image_size=32, cross_modal=True)


def test_unlabelled_sources_take_folders_and_datasets(images, tmp_path):
    (folder, records), = unlabelled_sources([str(images)])
    assert folder == images and len(records) == 12 and records[0]["file_name"] == "part0/0.png"
    with pytest.raises(ValueError, match="neither a dataset"):
        unlabelled_sources([str(tmp_path / "missing")])
    views = UnlabelledImages([(folder, records)], image_size=32)[0]
    assert [tuple(v.shape) for v in views] == [(3, 32, 32), (3, 32, 32)] and not torch.equal(*views)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["moco", "densecl"])
def test_output_loads_into_the_detector_and_records_what_was_seen(runs, method, capsys):
    info = read_pretrain_info(runs[method] / "model_final.pth")
    assert info["method"] == method and info["views"] == 2 and info["images_seen"] == 6 * 4
    assert info["pixels_seen"] == 2 * 6 * 4 * 32 * 32  # two crops of one image: one image, twice the pixels
    assert info["queue_size"] == 4 and info["in_channels"] == 3  # default_queue_size(12 images, batch 4)
    lines = [json.loads(line) for line in (runs[method] / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines] == [1, 2, 3, 4, 5, 6] and all("loss_contrastive" in r for r in lines)
    assert ("loss_dense" in lines[0]) == (method == "densecl")
    assert (runs[method] / "loss.png").stat().st_size > 0  # the loss curve
    model = minimask.build_model(minimask.get_config("tiny"))
    report = load_initial_weights(model, "imagenet", str(runs[method] / "model_final.pth"))
    assert "loaded 60 of 60 backbone tensors" in report and "skipped the self-supervised projection heads" in report
    assert ("dense_projector.*" in report) == (method == "densecl")


def test_a_config_that_disagrees_with_the_file_is_refused():
    info = {"backbone": {"depth": 18, "width_per_group": 64, "norm": "GN"}, "in_channels": 3,
            "pixel": {"input_format": "BGR", "pixel_scale": 255.0, "pixel_mean": [103.53, 116.28, 123.675],
                      "pixel_std": [57.375, 57.12, 58.395]}}
    cfg = minimask.get_config("tiny")
    check_pretrain_metadata(info, cfg, "pre.pth")  # the preset it was trained with
    with pytest.raises(ValueError, match=r"pre-trained with model.backbone.width_per_group=64, but the config has "
                                         r"model.backbone.width_per_group=32"):
        check_pretrain_metadata(info, minimask.get_config("tiny", ["model.backbone.width_per_group=32"]), "pre.pth")
    with pytest.raises(ValueError, match=r"model.pixel_std=\[57.375, 57.12, 58.395\], but the config has "
                                         r"model.pixel_std=\(1.0, 1.0, 1.0\)"):
        check_pretrain_metadata(info, minimask.get_config("tiny", ["model.pixel_std=(1.0,1.0,1.0)"]), "pre.pth")
    with pytest.raises(ValueError, match="holds a 4-channel backbone, but input.modalities"):
        check_pretrain_metadata({**info, "in_channels": 4}, cfg, "pre.pth")
    thermal = minimask.get_config("tiny", ["input.modalities=thermal", "model.pixel_mean=(100.0,)",
                                           "model.pixel_std=(50.0,)"])
    check_pretrain_metadata(info, thermal, "pre.pth")  # 3 -> 1 channel: adapted by the stated rule


@pytest.mark.slow
def test_resume_continues_exactly_with_queue_and_key_encoder(runs, images, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(runs["densecl"], out)
    (out / "model_final.pth").unlink()
    (out / "model_0000006.pth").unlink(missing_ok=True)
    saved = load_checkpoint(out / "model_0000004.pth")["model"]
    assert {"queue", "queue_ptr", "dense_queue", "key_backbone.conv1.weight"} <= set(saved)
    assert pretrain.main(_argv("densecl", images, out, "--resume")) == 0
    expected = load_checkpoint(runs["densecl"] / "model_final.pth")["model"]
    got = load_checkpoint(out / "model_final.pth")["model"]
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.slow
def test_sigkill_then_resume_is_exact(images, tmp_path):
    cmd = lambda out, *extra: [sys.executable, str(REPO / "pretrain.py"),  # noqa: E731
                               *_argv("moco", images, out, "--iters", "8", *extra)]
    assert subprocess.run(cmd(tmp_path / "whole"), cwd=REPO, capture_output=True, timeout=120).returncode == 0
    killed = tmp_path / "killed"
    if not _killed_between_checkpoints(cmd(killed), killed):
        pytest.skip("the run finished before the kill landed")
    done = subprocess.run(cmd(killed, "--resume"), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout
    expected = load_checkpoint(tmp_path / "whole" / "model_final.pth")["model"]
    got = load_checkpoint(killed / "model_final.pth")["model"]
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("method", ["moco", "densecl"])
def test_two_processes_train_like_one_with_the_same_global_batch(images, tmp_path, method):
    """2 gloo processes x 2 images = 1 process x 4: the same samples (the global stream split by position), GN has
    no batch statistics, the keys enter the queue all-gathered in rank order, and the gradients are averaged."""
    common = _argv(method, images, tmp_path / "one", "--iters", "3", "--lr", "0.05")
    assert pretrain.main(common) == 0
    two = [a if a != str(tmp_path / "one") else str(tmp_path / "two") for a in common]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(REPO / "pretrain.py"), *two]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    one = load_checkpoint(tmp_path / "one" / "model_final.pth")["model"]
    both = load_checkpoint(tmp_path / "two" / "model_final.pth")["model"]
    for key in one:
        assert torch.allclose(one[key], both[key], atol=1e-5, rtol=1e-4), key
    assert read_pretrain_info(tmp_path / "two" / "model_final.pth")["world_size"] == 2
