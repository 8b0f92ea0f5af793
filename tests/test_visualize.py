"""Tests for minimask/tools/visualize.py (drawing detections) and the visualize.py command line."""
import numpy as np
import pytest
import torch
from PIL import Image

import minimask
import visualize
from minimask.config import to_dict
from minimask.engine.checkpoint import save_checkpoint
from minimask.tools.visualize import COCO_SKELETON, draw_detections, save_visualizations


def _gray(h=64, w=96):
    return torch.full((3, h, w), 0.5)


def _changed(before: torch.Tensor, after: Image.Image) -> np.ndarray:
    """(H, W) bool: pixels that differ between a float (3, H, W) image in [0, 1] and the drawn one."""
    ref = (before.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    return (np.asarray(after) != ref).any(axis=2)


def test_box_and_label_drawn_inside_and_nothing_far_away():
    image = _gray()
    det = {"boxes": torch.tensor([[20.0, 30.0, 60.0, 50.0]]), "labels": torch.tensor([2]),
           "scores": torch.tensor([0.9])}
    out = draw_detections(image, det, class_names=["a", "b"])
    assert out.size == (96, 64) and out.mode == "RGB"
    changed = _changed(image, out)
    assert changed[30, 20:60].all() and changed[49, 20:60].all()  # top and bottom edges of the box
    assert changed[30:50, 20].all() and changed[30:50, 59].all()  # left and right edges
    assert not changed[40, 30:50].any()  # the inside of the box, below the label, is not painted (no mask)
    assert not changed[55:, :].any() and not changed[:, 70:].any()  # far from the box and its label
    assert changed[18:30, 20:30].any()  # the label sits just above the box


def test_mask_blended_inside_the_mask_only():
    image = _gray(48, 48)
    masks = torch.zeros(1, 1, 48, 48)
    masks[0, 0, 10:30, 10:30] = 0.8  # probabilities, as the model returns them; 0.3 stays outside
    masks[0, 0, 40:45, 40:45] = 0.3
    det = {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]), "labels": torch.tensor([1]),
           "scores": torch.tensor([0.99]), "masks": masks}
    out = draw_detections(image, det)
    changed = _changed(image, out)
    assert changed[15:25, 15:25].all()  # inside the mask: blended with the instance colour
    assert not changed[40:45, 40:45].any()  # below the 0.5 mask threshold
    assert not changed[32:, :].any() and not changed[12:, 32:].any()  # (the label row at the top may run wider)
    inside = np.asarray(out)[20, 20].astype(int)
    assert np.abs(inside - 128).max() > 20  # a visible tint, not a rounding difference


def test_score_threshold_filters_and_empty_detections_leave_the_image_unchanged():
    image = _gray()
    det = {"boxes": torch.tensor([[5.0, 5.0, 20.0, 20.0], [50.0, 30.0, 80.0, 60.0]]),
           "labels": torch.tensor([1, 1]), "scores": torch.tensor([0.3, 0.8])}
    changed = _changed(image, draw_detections(image, det, score_threshold=0.5))
    assert not changed[5:21, 5:21].any() and changed[30:60, 50].all()
    changed = _changed(image, draw_detections(image, det, score_threshold=0.2))
    assert changed[5:20, 5].all()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
             "masks": torch.zeros(0, 1, 64, 96)}
    assert not _changed(image, draw_detections(image, empty)).any()
    assert not _changed(image, draw_detections(image, det, score_threshold=0.9)).any()


def test_uint8_input_and_bad_shapes():
    image = (torch.rand(3, 20, 30) * 255).to(torch.uint8)
    out = draw_detections(image, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)})
    assert np.array_equal(np.asarray(out), image.permute(1, 2, 0).numpy())
    with pytest.raises(ValueError, match="image"):
        draw_detections(torch.rand(20, 30), {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)})
    with pytest.raises(ValueError, match="labels"):
        draw_detections(image, {"boxes": torch.zeros(2, 4), "labels": torch.zeros(1)})
    with pytest.raises(ValueError, match="masks"):
        draw_detections(image, {"boxes": torch.zeros(1, 4), "labels": torch.ones(1), "masks": torch.zeros(1, 5, 5)})


def test_keypoint_skeleton_drawn_between_visible_confident_keypoints():
    image = _gray(100, 100)
    kps = torch.zeros(1, 17, 3)
    # left_shoulder (5) - left_elbow (7) is a COCO limb; nose (0) is visible but not confident.
    kps[0, 5] = torch.tensor([30.0, 30.0, 1.0])
    kps[0, 7] = torch.tensor([70.0, 30.0, 1.0])
    kps[0, 0] = torch.tensor([50.0, 80.0, 1.0])
    scores = torch.full((1, 17), 0.5)
    scores[0, 0] = 0.01
    det = {"boxes": torch.tensor([[20.0, 20.0, 90.0, 95.0]]), "labels": torch.tensor([1]),
           "scores": torch.tensor([0.9]), "keypoints": kps, "keypoints_scores": scores}
    assert (5, 7) in COCO_SKELETON
    changed = _changed(image, draw_detections(image, det))
    assert changed[30, 40:60].all()  # the limb between the two keypoints
    assert changed[29:32, 29:32].all()  # the keypoint dot
    assert not changed[75:85, 45:55].any()  # the unconfident nose is not drawn
    kps[0, 7, 2] = 0  # elbow not visible: no limb
    changed = _changed(image, draw_detections(image, det))
    assert not changed[30, 40:60].any()


def _tiny_checkpoint(path, cfg=None):
    cfg = cfg or minimask.get_config("tiny")
    model = minimask.build_model(cfg)
    names = [f"class{k}" for k in range(1, cfg.model.roi_heads.num_classes + 1)]
    # The layout train.py writes (minimask/engine/checkpoint.py: save_checkpoint); only these keys matter here.
    save_checkpoint(path, {"model": model.state_dict(), "config": to_dict(cfg), "iteration": 0,
                           "label_map": {"category_ids": list(range(1, len(names) + 1)), "category_names": names}})
    return model


def _run_cli(argv, capsys):
    code = visualize.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def checkpoint_and_images(tmp_path_factory):
    """A tiny model's checkpoint and two generated images (shared by the CLI tests; none of them writes here)."""
    folder = tmp_path_factory.mktemp("inputs")
    ckpt = folder / "model_final.pth"
    _tiny_checkpoint(ckpt)
    rng = np.random.default_rng(0)
    images = []
    for name, (h, w) in (("a.png", (70, 90)), ("b.jpg", (64, 48))):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
        images.append(folder / name)
    return ckpt, images


def test_cli_writes_one_png_per_image(checkpoint_and_images, tmp_path, capsys):
    ckpt, images = checkpoint_and_images
    code, out, err = _run_cli(["--weights", ckpt, "--images", *images, "--output", tmp_path / "vis",
                               "--score-threshold", "0", "--device", "cpu"], capsys)
    assert code == 0, err
    written = sorted(p.name for p in (tmp_path / "vis").iterdir())
    assert written == ["a.png", "b.png"]
    with Image.open(tmp_path / "vis" / "a.png") as im:
        assert im.mode == "RGB" and im.size == (128, 100)  # the tiny preset resizes to at most 128 px
    assert "wrote 2 image(s)" in out


@pytest.mark.parametrize("case", ["missing_image", "unreadable_image", "output_under_a_file", "missing_weights",
                                  "corrupt_weights", "no_source", "bad_threshold", "num_with_images"])
def test_cli_bad_input_is_one_line_and_exit_code_2(case, checkpoint_and_images, tmp_path, capsys):
    ckpt, images = checkpoint_and_images
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "file").write_text("x")
    out_dir = tmp_path / "o"
    argv = {"missing_image": ["--weights", ckpt, "--images", tmp_path / "nope.png", "--output", out_dir],
            "unreadable_image": ["--weights", ckpt, "--images", tmp_path / "broken.png", "--output", out_dir],
            "output_under_a_file": ["--weights", ckpt, "--images", images[0], "--output", tmp_path / "file" / "o"],
            "missing_weights": ["--weights", tmp_path / "none.pth", "--images", images[0], "--output", out_dir],
            "corrupt_weights": ["--weights", tmp_path / "broken.png", "--images", images[0], "--output", out_dir],
            "no_source": ["--weights", ckpt, "--output", out_dir],
            "bad_threshold": ["--weights", ckpt, "--images", images[0], "--output", out_dir, "--score-threshold", "1.5"],
            "num_with_images": ["--weights", ckpt, "--images", images[0], "--output", out_dir, "--num", "2"],
            }[case]
    code, out, err = _run_cli(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("visualize.py: error: "), err
    expected = {"missing_image": "nope.png", "unreadable_image": "broken.png", "output_under_a_file": "--output",
                "missing_weights": "none.pth", "corrupt_weights": "broken.png", "no_source": "--images",
                "bad_threshold": "1.5", "num_with_images": "--num"}[case]
    assert expected in lines[0]
    assert not list(tmp_path.rglob("o/*.png"))  # nothing drawn


class _TinyDataset:
    """CocoDetection's interface, as save_visualizations uses it."""
    category_ids = [11, 12]
    category_names = ["eleven", "twelve"]

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return torch.rand(3, 48 + 8 * i, 64), {"image_id": 100 + i}


def test_save_visualizations_writes_named_pngs_and_restores_train_mode(tmp_path):
    cfg = minimask.get_config("tiny", ["model.roi_heads.num_classes=2"])
    model = minimask.build_model(cfg)
    model.category_ids.copy_(torch.tensor([12, 11]))
    model.train()
    paths = save_visualizations(model, _TinyDataset(), [0, 2], tmp_path / "vis", device="cpu", score_threshold=0.0)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["100.png", "102.png"]
    assert model.training
    with Image.open(paths[1]) as im:
        assert im.size == (64, 64)
    from minimask.tools.visualize import class_names_for
    assert class_names_for(model, _TinyDataset()) == ["twelve", "eleven"]  # through the model's label map
