"""Multispectral input: stacked frames, transforms on every channel, the C-channel model, and the rule that fits
3-channel weights (ImageNet backbones and detectors) to 1 and 4 channels."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from minimask import build_model, get_config
from minimask.data.coco import CocoDetection
from minimask.data.images import ImageLoadError, load_frames, num_channels
from minimask.data.pixel_stats import channel_order, pixel_statistics
from minimask.data.pixel_stats import main as stats_main
from minimask.data.transforms import hflip, resize
from minimask.engine.initialization import load_initial_weights
from minimask.interop.channels import (
    adapt_first_conv,
    adapt_pixel_values,
    conventions_for_channels,
)
from minimask.interop.imagenet import (
    load_imagenet_backbone,
    pixel_transform,
    same_transform,
)
from minimask.model.resnet import ResNet
from minimask.tools.visualize import to_uint8_hwc

H, W = 24, 32


def _write_frames(root, name, rng, size=(H, W), thermal_size=None):
    visible = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    thermal = rng.integers(0, 256, size=thermal_size or size, dtype=np.uint8)
    Image.fromarray(visible).save(root / f"{name}_v.png")
    Image.fromarray(thermal, mode="L").save(root / f"{name}_t.png")
    return visible, thermal


def _dataset_json(tmp_path, records, annotations=()):
    data = {"images": records, "annotations": list(annotations),
            "categories": [{"id": 1, "name": "person"}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def _record(i, name, size=(H, W)):
    return {"id": i, "file_name": f"{name}_v.png", "lwir_file_name": f"{name}_t.png", "height": size[0],
            "width": size[1]}


def test_frames_stack_visible_then_thermal(tmp_path):
    visible, thermal = _write_frames(tmp_path, "a", np.random.default_rng(0))
    both = load_frames(tmp_path, _record(1, "a"), ("thermal", "visible"))  # any order: stacked canonically
    assert both.shape == (4, H, W)
    assert torch.equal(both[:3], torch.from_numpy(visible).permute(2, 0, 1).float() / 255)
    assert torch.allclose(both[3], torch.from_numpy(thermal).float() / 255)
    thermal_only = load_frames(tmp_path, _record(1, "a"), ("thermal",))
    assert thermal_only.shape == (1, H, W) and torch.equal(thermal_only, both[3:])
    assert [num_channels(m) for m in (("visible",), ("thermal",), ("visible", "thermal"))] == [3, 1, 4]


def test_frame_errors_name_the_file(tmp_path):
    _write_frames(tmp_path, "a", np.random.default_rng(0), thermal_size=(H, W + 2))
    with pytest.raises(ValueError, match=r"a_t\.png.*thermal frame is \(24, 34\)"):
        load_frames(tmp_path, _record(1, "a"), ("visible", "thermal"))
    with pytest.raises(ImageLoadError, match="missing_t.png"):
        load_frames(tmp_path, {**_record(2, "a"), "lwir_file_name": "missing_t.png"}, ("thermal",))
    with pytest.raises(ValueError, match="no 'lwir_file_name' field"):
        load_frames(tmp_path, {"id": 3, "file_name": "a_v.png"}, ("visible", "thermal"))
    for bad in ((), ("visible", "visible"), ("infrared",)):
        with pytest.raises(ValueError, match="input.modalities"):
            load_frames(tmp_path, _record(1, "a"), bad)


def test_config_takes_bare_modality_names():
    assert get_config("tiny", ["input.modalities=visible,thermal"]).input.modalities == ("visible", "thermal")
    assert get_config("tiny", ["input.modalities=(thermal,)"]).input.modalities == ("thermal",)


def test_transforms_act_on_every_channel_alike(tmp_path):
    _write_frames(tmp_path, "a", np.random.default_rng(1))
    image = load_frames(tmp_path, _record(1, "a"), ("visible", "thermal"))  # (4, H, W)
    target = {"boxes": torch.tensor([[2.0, 3.0, 12.0, 20.0]]), "labels": torch.tensor([1]),
              "ignore_boxes": torch.tensor([[20.0, 1.0, 30.0, 9.0]])}
    resized, t = resize(image, target, (36, 48))
    for part in (slice(0, 3), slice(3, 4)):  # each modality resized alone gives the same pixels
        assert torch.allclose(resized[part], resize(image[part].contiguous(), None, (36, 48))[0], atol=1e-6)
    assert torch.allclose(t["ignore_boxes"], torch.tensor([[30.0, 1.5, 45.0, 13.5]]))
    flipped, t = hflip(image, target)
    assert torch.equal(flipped, image.flip(-1))
    assert torch.equal(t["ignore_boxes"], torch.tensor([[2.0, 1.0, 12.0, 9.0]]))


def test_dataset_gives_stacked_images_and_ignore_regions(tmp_path):
    _write_frames(tmp_path, "a", np.random.default_rng(2))
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 17], "area": 170, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 1, 10, 8], "area": 80, "iscrowd": 1}]
    ann = _dataset_json(tmp_path, [_record(1, "a")], anns)
    image, target = CocoDetection(ann, tmp_path, modalities=("visible", "thermal"), ignore_regions=True)[0]
    assert image.shape == (4, H, W)
    assert torch.equal(target["boxes"], torch.tensor([[2.0, 3.0, 12.0, 20.0]]))
    assert torch.equal(target["ignore_boxes"], torch.tensor([[20.0, 1.0, 30.0, 9.0]]))
    image, target = CocoDetection(ann, tmp_path, modalities=("thermal",))[0]  # off: crowds dropped (detectron2)
    assert image.shape == (1, H, W) and "ignore_boxes" not in target


def test_pixel_statistics_per_channel_in_model_order(tmp_path, capsys):
    rng = np.random.default_rng(3)
    frames = [_write_frames(tmp_path, n, rng) for n in ("a", "b")]
    records = [_record(1, "a"), _record(2, "b")]
    mean, std = pixel_statistics(tmp_path, records, ("visible", "thermal"))  # BGR, then thermal, 0-255
    pixels = np.concatenate([np.concatenate([v.reshape(-1, 3), t.reshape(-1, 1)], 1) for v, t in frames])
    expected = pixels.astype(np.float64)[:, [2, 1, 0, 3]]
    assert np.allclose(mean, expected.mean(0), atol=1e-3) and np.allclose(std, expected.std(0), atol=1e-3)
    ann = _dataset_json(tmp_path, records)
    assert stats_main(["--data", f"train={ann}:{tmp_path}", "--modalities", "visible", "thermal"]) == 0
    line = capsys.readouterr().out.strip()
    cfg = get_config("tiny", line.split(" "))  # the printed overrides are valid config overrides
    assert cfg.input.modalities == ("visible", "thermal") and np.allclose(cfg.model.pixel_mean, mean)
    assert channel_order(("thermal",), "BGR") == [0]


def test_model_takes_c_channels_and_reorders_only_visible():
    cfg = get_config("tiny", ["input.modalities=visible,thermal"])
    with pytest.raises(ValueError, match="4 input channels.*pixel_mean has 3 values"):
        build_model(cfg)
    cfg.model.pixel_mean, cfg.model.pixel_std = (10.0, 20.0, 30.0, 40.0), (1.0, 2.0, 4.0, 8.0)
    model = build_model(cfg).eval()
    assert model.backbone.conv1.weight.shape[1] == 4
    image = torch.rand(4, 64, 64)
    batch, _ = model.preprocess([image])
    rgb_to_bgr = image[[2, 1, 0, 3]] * 255
    expected = (rgb_to_bgr - torch.tensor([10.0, 20.0, 30.0, 40.0])[:, None, None]) / torch.tensor(
        [1.0, 2.0, 4.0, 8.0])[:, None, None]
    assert torch.allclose(batch[0], expected, atol=1e-4)
    with pytest.raises(ValueError, match=r"images\[0\] must be a \(4, H, W\) tensor"):
        model([torch.rand(3, 64, 64)])
    thermal = build_model(get_config("tiny", ["input.modalities=thermal", "model.pixel_mean=(100.0,)",
                                              "model.pixel_std=(50.0,)"])).eval()
    batch, _ = thermal.preprocess([image[3:]])
    assert torch.allclose(batch[0], (image[3:] * 255 - 100) / 50, atol=1e-4)
    assert len(thermal([image[3:]])) == 1


def test_first_conv_rule_by_hand():
    weight = torch.arange(2 * 3 * 1 * 1, dtype=torch.float32).view(2, 3, 1, 1)  # filters (0, 1, 2), (3, 4, 5)
    four = adapt_first_conv(weight, 4)
    assert torch.equal(four[:, :, 0, 0], torch.tensor([[0.0, 0.75, 1.5, 0.75], [2.25, 3.0, 3.75, 3.0]]))
    one = adapt_first_conv(weight, 1)
    assert torch.equal(one[:, :, 0, 0], torch.tensor([[3.0], [12.0]]))  # the sum of the RGB filters
    assert adapt_pixel_values((103.5, 116.5, 123.5), 4) == (103.5, 116.5, 123.5, 114.5)
    assert adapt_pixel_values((103.5, 116.5, 123.5), 1) == (114.5,)


@pytest.mark.parametrize("channels", [1, 4])
def test_first_conv_rule_keeps_the_response_to_a_grey_scene(channels):
    weight = torch.randn(8, 3, 7, 7, dtype=torch.float64)
    grey = torch.randn(1, 1, 20, 20, dtype=torch.float64)
    rgb_response = F.conv2d(grey.expand(1, 3, 20, 20), weight)
    adapted = F.conv2d(grey.expand(1, channels, 20, 20), adapt_first_conv(weight, channels))
    assert torch.allclose(adapted, rgb_response, atol=1e-10)


@pytest.mark.parametrize("channels", [1, 4])
def test_imagenet_backbone_loads_into_c_channels(channels):
    rgb = ResNet(depth=18, norm="GN", width_per_group=32)
    target = ResNet(depth=18, norm="GN", width_per_group=32, in_channels=channels)
    report = load_imagenet_backbone(target, rgb.state_dict(), "minimask")
    assert f"conv1 adapted from 3 channels to a {channels}-channel input" in report
    assert torch.equal(target.conv1.weight, adapt_first_conv(rgb.conv1.weight.detach(), channels))
    assert torch.equal(target.layer4[1].conv2.weight, rgb.layer4[1].conv2.weight)


def test_imagenet_conventions_extend_to_the_thermal_channel():
    conv = conventions_for_channels({"model.pixel_mean": (0.485, 0.456, 0.406), "model.pixel_std": (0.2, 0.2, 0.2),
                                     "model.input_format": "RGB"}, 4)
    assert conv["model.pixel_mean"] == pytest.approx((0.485, 0.456, 0.406, 0.449))
    assert conv["model.pixel_std"] == pytest.approx((0.2, 0.2, 0.2, 0.2))
    assert conv["model.input_format"] == "RGB"
    four = pixel_transform("BGR", 255.0, (1.0, 2.0, 3.0, 4.0), (1.0, 1.0, 1.0, 2.0))
    assert [source for source, _, _ in four] == [2, 1, 0, 3]  # B, G, R, then thermal
    assert [source for source, _, _ in pixel_transform("BGR", 255.0, (4.0,), (2.0,))] == [3]
    assert not same_transform(four[:3], four)  # a 3-channel convention never passes for a 4-channel one


@pytest.mark.parametrize("channels", [1, 4])
def test_detector_checkpoint_loads_into_c_channels(tmp_path, channels):
    rgb = build_model(get_config("tiny"))
    path = tmp_path / "detector.pth"
    torch.save(rgb.state_dict(), path)
    modalities = "thermal" if channels == 1 else "visible,thermal"
    values = ",".join(["1.0"] * channels)
    model = build_model(get_config("tiny", [f"input.modalities={modalities}", f"model.pixel_mean=({values},)",
                                            f"model.pixel_std=({values},)"]))
    report = load_initial_weights(model, "checkpoint", str(path))
    assert f"adapted to a {channels}-channel input" in report
    assert torch.equal(model.backbone.conv1.weight, adapt_first_conv(rgb.backbone.conv1.weight.detach(), channels))
    expected_mean = adapt_pixel_values(rgb.pixel_mean.flatten().tolist(), channels)
    assert torch.allclose(model.pixel_mean.flatten(), torch.tensor(expected_mean))
    own, theirs = model.state_dict(), rgb.state_dict()
    changed = {"backbone.conv1.weight", "pixel_mean", "pixel_std"}
    assert all(torch.equal(own[k], theirs[k]) for k in theirs if k not in changed)


def test_drawing_shows_visible_or_grey_thermal():
    image = torch.rand(4, 5, 6)
    assert np.array_equal(to_uint8_hwc(image), to_uint8_hwc(image[:3]))
    grey = to_uint8_hwc(image[3:])
    assert grey.shape == (5, 6, 3) and np.array_equal(grey[..., 0], grey[..., 2])
    with pytest.raises(ValueError, match="C = 3"):
        to_uint8_hwc(torch.rand(2, 5, 6))


@pytest.mark.slow
def test_the_modality_grid_uses_the_miniature_s_measured_statistics():
    from minimask.data.coco import dataset_splits
    from minimask.tools.experiments import SYNTHETIC_KAIST_STATS

    ann, images = dataset_splits("synthetic_kaist")["train"]  # builds the default miniature on first use (~20 s)
    records = [r for r in json.loads(Path(ann).read_text())["images"]]
    mean, std = pixel_statistics(images, records, ("visible", "thermal"))
    assert mean == pytest.approx(SYNTHETIC_KAIST_STATS["visible"][0] + SYNTHETIC_KAIST_STATS["thermal"][0], abs=0.01)
    assert std == pytest.approx(SYNTHETIC_KAIST_STATS["visible"][1] + SYNTHETIC_KAIST_STATS["thermal"][1], abs=0.01)
