"""pretrain.py and minimask.tools.classification: the image-folder set, top-k accuracy, a few iterations of pre-training
the `tiny` backbone on a generated image-folder set, and the detector loading the result with zero missing keys."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minimask  # noqa: E402
import pretrain  # noqa: E402
from minimask.engine.initialization import load_initial_weights  # noqa: E402
from minimask.interop.imagenet import apply_imagenet_conventions, imagenet_conventions  # noqa: E402
from minimask.interop.weight_files import read_weights  # noqa: E402
from minimask.tools.classification import (  # noqa: E402
    Classifier,
    ImageFolder,
    build_crop_folder,
    center_crop,
    random_resized_crop,
    read_pretrain_info,
    topk_correct,
)


def make_folder(root: Path, classes=("bar", "dot", "ring"), per_class=4, size=40, seed=0):
    """root/train/<class>/*.png and root/val/<class>/*.png with class-dependent colours."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", 2)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 60, size=(size, size + 8, 3), dtype=np.uint8)
                pixels[..., c] += 150
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def pretrained(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "out"
    rc = pretrain.main(["--config", "tiny", "--data", str(folder), "--iters", "3", "--batch-size", "4",
                        "--image-size", "32", "--workers", "0", "--log-period", "1", "--output", str(out)])
    assert rc == 0
    return out


def test_image_folder_layout_labels_and_augmentation(folder):
    train = ImageFolder(folder / "train", image_size=32, train=True)
    assert train.classes == ["bar", "dot", "ring"] and len(train) == 12
    assert [label for _, label in train.samples] == [0] * 4 + [1] * 4 + [2] * 4
    image, label = train[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 1
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    val = ImageFolder(folder / "val", image_size=32, train=False, classes=train.classes)
    a, _ = val[0]
    b, _ = val[0]
    assert torch.equal(a, b)  # evaluation is deterministic
    with pytest.raises(ValueError, match="training split lacks"):
        ImageFolder(folder / "val", image_size=32, train=False, classes=["bar"])
    with pytest.raises(ValueError, match="no class folder"):
        ImageFolder(folder / "train" / "bar", image_size=32, train=True)


def test_crops_and_center_crop_shapes():
    image = torch.rand(3, 20, 50)
    assert center_crop(image, 16).shape == (3, 16, 16)
    torch.manual_seed(0)
    assert random_resized_crop(image, 24).shape == (3, 24, 24)
    # centre crop of a constant-per-column image keeps the central columns
    ramp = torch.arange(40.0).repeat(3, 10, 1) / 40  # (3, 10, 40)
    assert center_crop(ramp, 10)[0, 0].mean().item() == pytest.approx(ramp[0, 0, 15:25].mean().item(), abs=0.02)


def test_topk_correct_against_hand_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    # row 0: top1 hit; row 1: label 2 is 2nd; row 2: label 0 is 3rd
    assert topk_correct(logits, labels, ks=(1, 2, 5)).tolist() == [1, 2, 3]
    assert topk_correct(logits[:0], labels[:0]).tolist() == [0, 0]
    with pytest.raises(ValueError):
        topk_correct(logits, labels[:2])


def test_classifier_normalises_like_the_detector():
    """The classifier feeds its ResNet exactly what MaskRCNN feeds the backbone for the same preset."""
    cfg = minimask.get_config("tiny")
    detector = minimask.build_model(cfg).eval()
    clf = pretrain.build_classifier(cfg, num_classes=3).eval()
    image = torch.rand(3, 32, 32)
    normalised = (image.flip(0) * 255 - detector.pixel_mean) / detector.pixel_std  # MaskRCNN, BGR preset
    with torch.no_grad():
        assert torch.allclose(clf(image[None]), clf.backbone(normalised[None])["logits"], atol=1e-5)
    with pytest.raises(ValueError, match="FrozenBN"):
        Classifier(num_classes=2, depth=18, norm="FrozenBN")


def test_pretrain_writes_metrics_and_equal_compute_metadata(pretrained):
    records = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["images"] == 6 and 0 <= evals[0]["top1"] <= evals[0]["top5"] <= 100
    info = read_pretrain_info(pretrained / "model_final.pth")
    assert info["iterations"] == 3 and info["batch_size"] == 4 and info["images_seen"] == 12
    assert info["image_size"] == 32 and info["pixels_seen"] == 12 * 32 * 32
    assert info["backbone"]["depth"] == 18 and info["backbone"]["norm"] == "GN"
    assert info["classes"] == ["bar", "dot", "ring"] and info["top5"] == evals[0]["top5"]
    assert read_pretrain_info(pretrained / "metrics.jsonl") is None


def test_detector_loads_the_pretrained_backbone_with_zero_missing_keys(pretrained):
    path = str(pretrained / "model_final.pth")
    state, fmt = read_weights(path)
    assert fmt == "minimask"
    cfg = minimask.get_config("tiny")
    apply_imagenet_conventions(cfg, imagenet_conventions(fmt, state), set())
    model = minimask.build_model(cfg)
    report = load_initial_weights(model, "imagenet", path)  # strict: raises on any missing key
    target = model.backbone.state_dict()
    assert f"loaded {len(target)} of {len(target)} backbone tensors" in report
    for key, value in target.items():
        assert torch.equal(value, state[key]), key


def test_resume_after_the_end_does_nothing_and_bad_input_is_one_line(pretrained, folder, tmp_path, capsys):
    argv = ["--config", "tiny", "--data", str(folder), "--iters", "3", "--batch-size", "4", "--image-size", "32",
            "--workers", "0", "--output", str(pretrained)]
    assert pretrain.main(argv + ["--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert pretrain.main(argv) == 2  # checkpoints there and no --resume
    assert pretrain.main(["--data", str(tmp_path)]) == 2
    assert pretrain.main(argv[:-1] + [str(tmp_path / "o"), "solver.lr=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("pretrain.py: error:") for line in err)


def test_resume_over_damaged_checkpoints_refuses_to_start_over(pretrained, folder, tmp_path, capsys):
    """pretrain.py runs train.py's loop: with only unreadable checkpoints, --resume stops (exit 2) instead of
    silently training again from scratch over them."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(pretrained, out)
    for path in out.glob("model_*.pth"):
        path.write_bytes(path.read_bytes()[:100])  # truncated
    argv = ["--config", "tiny", "--data", str(folder), "--iters", "5", "--batch-size", "4", "--image-size", "32",
            "--workers", "0", "--output", str(out), "--resume"]
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        assert pretrain.main(argv) == 2
    err = capsys.readouterr().err
    assert "pretrain.py: error: --resume: none of the checkpoints" in err
    assert all(len(p.read_bytes()) == 100 for p in out.glob("model_*.pth"))  # nothing overwritten


def test_build_crop_folder_from_a_coco_set(tmp_path):
    from minimask.data.synthetic import build_synthetic

    paths = build_synthetic(tmp_path / "syn", num_train=3, num_val=1)
    counts = build_crop_folder(paths.train_ann, paths.train_images, tmp_path / "crops", size=24)
    assert sum(counts.values()) > 0 and (tmp_path / "crops" / "COMPLETE.json").is_file()
    folder = ImageFolder(tmp_path / "crops", image_size=24, train=False)
    assert len(folder) == sum(counts.values())
    assert set(folder.classes) == {name for name, n in counts.items() if n}
    image, _ = folder[0]
    assert image.shape == (3, 24, 24)


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(folder, tmp_path):
    """torchrun with 2 gloo processes x 2 images = 1 process x 4 images: same samples (the global stream is split by
    position), GN has no batch statistics, and the gradients are averaged, so the weights agree."""
    import os
    import subprocess

    common = ["--config", "tiny", "--data", str(folder), "--iters", "2", "--batch-size", "4", "--image-size", "32",
              "--workers", "0", "--lr", "0.05", "--warmup-iters", "0"]
    assert pretrain.main(common + ["--output", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29617",
           str(Path(pretrain.__file__)), *common, "--output", str(tmp_path / "two")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    one, _ = read_weights(str(tmp_path / "one" / "model_final.pth"))
    two, _ = read_weights(str(tmp_path / "two" / "model_final.pth"))
    assert one.keys() == two.keys()
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5, rtol=1e-4), key
    assert read_pretrain_info(tmp_path / "two" / "model_final.pth")["world_size"] == 2
