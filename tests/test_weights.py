"""minimask.interop.imagenet and minimask.interop.weight_files: safe reading, ImageNet weights in torchvision / Caffe2 / minimask format,
conventions, checks.

Caffe2 files are built here from the naming facts (detectron2 `checkpoint/c2_model_loading.py`, Detectron.pytorch
mappings), independently of minimask.interop.imagenet' own mapping, with random values and small widths.
"""
import collections
import io
import os
import pickle
import re
import struct

import numpy as np
import pytest
import torch

import minimask
from minimask.config import get_config
from minimask.engine.initialization import check_init_config, describe_trainable, load_initial_weights
from minimask.interop.imagenet import apply_imagenet_conventions, imagenet_conventions, load_imagenet_backbone
from minimask.interop.weight_files import read_weights
from minimask.model.norm import FrozenBatchNorm2d
from minimask.model.resnet import ResNet

BLOCKS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 18: [2, 2, 2, 2]}


def _randomize(module, seed=0):
    """Random values in every parameter and float buffer (BN variances positive), so that no mapping mistake can
    hide behind an identity init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                r = torch.rand(t.shape, generator=g) + 0.5 if name.endswith("running_var") else \
                    torch.randn(t.shape, generator=g) * (0.05 if t.dim() == 4 else 0.5)
                t.copy_(r)
    return module


def _caffe2_state(depth, source: dict, norm: str, classifier: str) -> dict:
    """Caffe2 names -> numpy arrays, taking values from a minimask-named `source` (stage S = layer S-1)."""
    out = collections.OrderedDict()
    n = "bn" if norm == "bn" else "gn"
    out["conv1_w"] = source["conv1.weight"]
    stem = "res_conv1_bn" if norm == "bn" else "conv1_gn"
    out[f"{stem}_s"], out[f"{stem}_b"] = source["norm1.weight"], source["norm1.bias"]
    for s, count in enumerate(BLOCKS[depth], start=2):
        for i in range(count):
            m = f"layer{s - 1}.{i}."
            for branch, k in (("2a", 1), ("2b", 2), ("2c", 3)):
                out[f"res{s}_{i}_branch{branch}_w"] = source[f"{m}conv{k}.weight"]
                out[f"res{s}_{i}_branch{branch}_{n}_s"] = source[f"{m}norm{k}.weight"]
                out[f"res{s}_{i}_branch{branch}_{n}_b"] = source[f"{m}norm{k}.bias"]
            if i == 0:
                out[f"res{s}_{i}_branch1_w"] = source[f"{m}downsample.0.weight"]
                out[f"res{s}_{i}_branch1_{n}_s"] = source[f"{m}downsample.1.weight"]
                out[f"res{s}_{i}_branch1_{n}_b"] = source[f"{m}downsample.1.bias"]
    out[f"{classifier}_w"] = np.random.randn(10, 2048).astype(np.float32)
    out[f"{classifier}_b"] = np.zeros(10, np.float32)
    return collections.OrderedDict((k, np.asarray(v.numpy() if torch.is_tensor(v) else v)) for k, v in out.items())


def _write_pickle(path, obj, protocol=2):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return str(path)


# ---- safety -------------------------------------------------------------------------------------------------------

class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"echo pwned > {self.target}",)


def test_crafted_pickle_is_refused_before_it_runs(tmp_path):
    target = tmp_path / "pwned.txt"
    path = _write_pickle(tmp_path / "evil.pkl", {"blobs": {"conv1_w": _Evil(target)}})
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.pkl: it asks to run (posix|os|nt)\.system"):
        read_weights(path)
    torch.save({"conv1.weight": _Evil(target)}, tmp_path / "evil.pth")  # a zip .pth: torch's weights_only refuses
    with pytest.raises(ValueError, match="evil.pth"):
        read_weights(str(tmp_path / "evil.pth"))
    assert not target.exists()


def test_truncated_and_missing_files_name_the_file(tmp_path):
    state = {"conv1_w": np.ones((64, 3, 7, 7), np.float32)}
    data = pickle.dumps({"blobs": state}, protocol=2)
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.pkl.*truncated"):
        read_weights(str(tmp_path / "cut.pkl"))
    torch.save({"conv1.weight": torch.ones(64, 3, 7, 7)}, tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.pth"):
        read_weights(str(tmp_path / "cut.pth"))
    with pytest.raises(ValueError, match="no such file"):
        read_weights(str(tmp_path / "absent.pkl"))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_pickles_of_every_protocol_load(tmp_path, protocol):
    arrays = {"conv1_w": np.arange(6, dtype=np.float32).reshape(1, 6, 1, 1), "res_conv1_bn_s": np.ones(1, np.float64),
              "__author__": "MSRA", "res_conv1_bn_b_momentum": np.zeros(1, np.float32), "scalar": np.float32(2)}
    state, fmt = read_weights(_write_pickle(tmp_path / "w.pkl", {"blobs": collections.OrderedDict(arrays)}, protocol))
    assert fmt == "caffe2" and set(state) == {"conv1_w", "res_conv1_bn_s"}  # no strings, momenta or scalars
    assert torch.equal(state["conv1_w"], torch.arange(6.0).reshape(1, 6, 1, 1))


class _Python2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for Detectron's blobs: byte strings as BINSTRING (py2 `str`) and numpy
    1's module name numpy.core.multiarray (the pure-Python pickler, with two dispatch entries replaced)."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        if obj is np.zeros(1).__reduce__()[0]:  # numpy's _reconstruct
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def test_python2_detectron_pickle_loads(tmp_path):
    blobs = {b"conv1_w": np.random.randn(64, 3, 7, 7).astype(np.float32), b"res_conv1_bn_s": np.ones(64, np.float32)}
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump({b"blobs": blobs})
    assert b"numpy.core.multiarray" in buffer.getvalue() and b"_codecs" not in buffer.getvalue()
    (tmp_path / "R-50.pkl").write_bytes(buffer.getvalue())
    state, fmt = read_weights(str(tmp_path / "R-50.pkl"))
    assert fmt == "caffe2" and set(state) == {"conv1_w", "res_conv1_bn_s"}
    assert torch.equal(state["conv1_w"], torch.from_numpy(blobs[b"conv1_w"]))


# ---- torchvision --------------------------------------------------------------------------------------------------

def _torchvision_names(state):
    """minimask -> torchvision names (the inverse of torchvision_format.resnet_key)."""
    return {re.sub(r"(^|\.)norm(\d)", r"\1bn\2", k): v for k, v in state.items()}


def test_torchvision_format_loads_with_its_conventions(tmp_path):
    source = _randomize(ResNet(depth=18, norm="BN"))
    torch.save({**_torchvision_names(source.state_dict()), "fc.weight": torch.zeros(1000, 512),
                "fc.bias": torch.zeros(1000)}, tmp_path / "r18.pth")
    state, fmt = read_weights(str(tmp_path / "r18.pth"))
    assert fmt == "torchvision"
    conv = imagenet_conventions(fmt, state)
    assert conv["model.input_format"] == "RGB" and conv["model.pixel_scale"] == 1.0
    assert conv["model.pixel_mean"] == (0.485, 0.456, 0.406) and conv["model.pixel_std"] == (0.229, 0.224, 0.225)
    assert conv["model.backbone.stride_in_1x1"] is False and conv["model.backbone.norm"][0] == "FrozenBN"
    target = ResNet(depth=18, norm="FrozenBN")
    report = load_imagenet_backbone(target, state, fmt)
    assert "dropped the ImageNet classifier" in report
    for key, value in target.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_torchvision_key_sets_match_real_torchvision():
    tv = pytest.importorskip("torchvision")
    for make, kwargs in ((tv.models.resnet50, dict(depth=50)), (tv.models.resnet18, dict(depth=18)),
                         (tv.models.resnext50_32x4d, dict(depth=50, groups=32, width_per_group=4))):
        tv_state = make(weights=None).state_dict()
        target = ResNet(norm="BN", **kwargs)
        report = load_imagenet_backbone(target, tv_state, "torchvision")  # strict: zero missing / unexpected
        assert f"loaded {len(target.state_dict())} of {len(target.state_dict())}" in report


def test_torchvision_resnet50_features_equal_layer1_to_4(tmp_path):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference = _randomize(tv.models.resnet50(weights=None), seed=1).eval()
    torch.save(reference.state_dict(), tmp_path / "resnet50.pth")
    state, fmt = read_weights(str(tmp_path / "resnet50.pth"))
    conv = imagenet_conventions(fmt, state)
    ours = ResNet(depth=50, norm="FrozenBN", stride_in_1x1=conv["model.backbone.stride_in_1x1"]).eval()
    load_imagenet_backbone(ours, state, fmt)
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        features = ours(x)
        y = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        for i, name in enumerate(("res2", "res3", "res4", "res5"), start=1):
            y = getattr(reference, f"layer{i}")(y)
            scale = y.abs().max()
            assert torch.allclose(features[name], y, rtol=1e-4, atol=1e-4 * scale), name


# ---- Caffe2 (Detectron / detectron2 ImageNet pickles) -------------------------------------------------------------

def test_msra_r50_pickle_loads_as_frozen_bn_with_stride_in_1x1(tmp_path):
    source = _randomize(ResNet(depth=50, width_per_group=16, norm="BN"))  # only its weight / bias go to the file
    blobs = _caffe2_state(50, source.state_dict(), "bn", "fc1000")
    blobs["conv1_b"] = np.random.randn(64).astype(np.float32)  # MSRA's stem bias (Detectron.pytorch "orphan")
    blobs["res2_0_branch2a_w_momentum"] = np.zeros(1, np.float32)
    path = _write_pickle(tmp_path / "R-50.pkl", {"blobs": blobs, "__author__": "MSRA"})
    state, fmt = read_weights(path)
    assert fmt == "caffe2"
    conv = imagenet_conventions(fmt, state)
    assert conv == {"model.input_format": "BGR", "model.pixel_scale": 255.0,
                    "model.pixel_mean": (103.530, 116.280, 123.675), "model.pixel_std": (1.0, 1.0, 1.0),
                    "model.backbone.stride_in_1x1": True, "model.backbone.norm": ("FrozenBN",)}
    target = ResNet(depth=50, width_per_group=16, norm="FrozenBN", stride_in_1x1=True)
    report = load_imagenet_backbone(target, state, fmt)
    n = len(target.state_dict())
    assert f"loaded {n} of {n}" in report and "53 affine-only" in report and "fc1000_w" not in report
    loaded, src = target.state_dict(), source.state_dict()
    for key in loaded:
        if key.endswith("weight") or (key.endswith("bias") and key != "norm1.bias"):
            assert torch.equal(loaded[key], src[key]), key
    # Caffe2 AffineChannel semantics exactly: x * s + b, with conv1_b folded into the stem's shift.
    x = torch.randn(2, 64, 3, 3)
    stem_shift = torch.from_numpy(blobs["res_conv1_bn_b"] + blobs["res_conv1_bn_s"] * blobs["conv1_b"])
    expected = x * src["norm1.weight"].view(1, -1, 1, 1) + stem_shift.view(1, -1, 1, 1)
    assert torch.allclose(target.norm1(x), expected, atol=1e-6)
    assert isinstance(target.layer4[2].norm3, FrozenBatchNorm2d)


def test_fair_gn_pickle_loads_into_group_norm(tmp_path):
    source = _randomize(ResNet(depth=50, width_per_group=32, norm="GN"))
    path = _write_pickle(tmp_path / "R-50-GN.pkl", {"blobs": _caffe2_state(50, source.state_dict(), "gn", "pred")})
    state, fmt = read_weights(path)
    conv = imagenet_conventions(fmt, state)
    assert conv["model.backbone.norm"] == ("GN",) and conv["model.backbone.stride_in_1x1"] is False
    assert conv["model.input_format"] == "BGR" and conv["model.pixel_std"] == (1.0, 1.0, 1.0)
    target = ResNet(depth=50, width_per_group=32, norm="GN")
    load_imagenet_backbone(target, state, fmt)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    with pytest.raises(ValueError, match="norm"):  # GN weights for a FrozenBN backbone
        load_imagenet_backbone(ResNet(depth=50, width_per_group=32, norm="FrozenBN"), state, fmt)


def test_fair_resnext_conventions():
    source = ResNet(depth=101, groups=32, width_per_group=1, norm="GN", out_features=("res2",))
    full = {f"layer{s}.{i}.{m}": torch.zeros(1) for s, c in enumerate(BLOCKS[101], 1) for i in range(c)
            for m in ("conv1.weight", "conv2.weight", "conv3.weight", "norm1.weight", "norm1.bias", "norm2.weight",
                      "norm2.bias", "norm3.weight", "norm3.bias")}
    full.update({f"layer{s}.0.downsample.{j}.{p}": torch.zeros(1) for s in range(1, 5) for j, p in
                 ((0, "weight"), (1, "weight"), (1, "bias"))})
    full.update({k: v for k, v in source.state_dict().items() if k.startswith(("conv1", "norm1", "layer1.0.conv2"))})
    blobs = _caffe2_state(101, full, "bn", "pred")
    conv = imagenet_conventions("caffe2", {k: torch.from_numpy(v) for k, v in blobs.items()})
    assert conv["model.pixel_std"] == (57.375, 57.120, 58.395)  # D2 mask_rcnn_X_101_32x8d_FPN_3x.yaml
    assert conv["model.backbone.stride_in_1x1"] is False and conv["model.input_format"] == "BGR"


# ---- wrong files --------------------------------------------------------------------------------------------------

def test_resnet101_file_for_a_resnet50_config_names_the_extra_blocks(tmp_path):
    source = ResNet(depth=101, width_per_group=8, norm="BN")
    path = _write_pickle(tmp_path / "R-101.pkl", {"blobs": _caffe2_state(101, source.state_dict(), "bn", "pred")})
    state, fmt = read_weights(path)
    with pytest.raises(ValueError, match=r"ResNet-101.*ResNet-50.*extra blocks res4\.6, res4\.7"):
        load_imagenet_backbone(ResNet(depth=50, width_per_group=8, norm="FrozenBN", stride_in_1x1=True), state, fmt)
    report = load_imagenet_backbone(ResNet(depth=50, width_per_group=8, norm="FrozenBN", stride_in_1x1=True),
                                    state, fmt, strict=False)
    assert "strict=False, not loaded" in report and "extra blocks res4.6, " in report and "(17 in all)" in report


def test_detection_checkpoints_are_refused_as_imagenet_weights(tmp_path):
    cfg = get_config("tiny")
    detector = minimask.build_model(cfg)
    torch.save({"model": detector.state_dict(), "iteration": 10}, tmp_path / "model_final.pth")
    with pytest.raises(ValueError, match=r"model_final\.pth.*detector.*--init checkpoint"):
        load_initial_weights(minimask.build_model(cfg), "imagenet", str(tmp_path / "model_final.pth"))
    blobs = {"conv1_w": np.zeros((64, 3, 7, 7), np.float32), "fpn_inner_res5_2_sum_w": np.zeros(1, np.float32),
             "rpn_conv_fpn2_w": np.zeros(1, np.float32), "cls_score_w": np.zeros(1, np.float32)}
    state, fmt = read_weights(_write_pickle(tmp_path / "e2e_mask_rcnn.pkl", {"blobs": blobs}))
    with pytest.raises(ValueError, match="detector"):
        load_imagenet_backbone(detector.backbone, state, fmt)


def test_wrong_norm_for_affine_only_weights_is_refused():
    source = ResNet(depth=18, norm="GN")
    names = {"conv1_w": source.conv1.weight.detach().numpy(), "res_conv1_bn_s": np.ones(64, np.float32),
             "res_conv1_bn_b": np.zeros(64, np.float32)}
    with pytest.raises(ValueError, match="FrozenBN"):
        load_imagenet_backbone(ResNet(depth=18, norm="GN", out_features=("stem",)), names, "caffe2")


# ---- load_initial_weights -----------------------------------------------------------------------------------------

def test_load_initial_weights_imagenet_and_checkpoint(tmp_path, capsys):
    cfg = get_config("tiny")  # R18, GN
    source = _randomize(ResNet(depth=18, norm="GN"))
    torch.save(source.state_dict(), tmp_path / "backbone.pth")
    model = minimask.build_model(cfg)  # minimask format: no pixel convention to check
    load_initial_weights(model, "imagenet", str(tmp_path / "backbone.pth"))
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.backbone.state_dict().items())
    assert "ImageNet init from" in capsys.readouterr().out

    torch.save({"model": model.state_dict(), "iteration": 3}, tmp_path / "ckpt.pth")
    fresh = minimask.build_model(cfg)
    load_initial_weights(fresh, "checkpoint", str(tmp_path / "ckpt.pth"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())
    torch.save({"model": {"backbone.nonsense": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not fit"):
        load_initial_weights(fresh, "checkpoint", str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match="--init imagenet"):
        load_initial_weights(fresh, "checkpoint", str(tmp_path / "backbone.pth"))


@pytest.mark.parametrize("preset", ["tiny", "r50_fpn_gn_cascade"])
def test_fine_tuning_to_another_class_count_reinitialises_only_the_class_layers(tmp_path, capsys, preset):
    """A detector of 3 (or 80) classes fine-tuned on a 1-class set: classifier, box regression and mask predictor
    keep their fresh init, the label map is the new model's; everything else comes from the checkpoint."""
    overrides = ["model.backbone.depth=18", "model.fpn.out_channels=64"] if preset != "tiny" else []
    source = minimask.build_model(get_config(preset, overrides + ["model.roi_heads.num_classes=3"]))
    torch.save({"model": source.state_dict()}, tmp_path / "ckpt.pth")
    torch.manual_seed(5)
    model = minimask.build_model(get_config(preset, overrides + ["model.roi_heads.num_classes=1"]))
    model.category_ids.fill_(7)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_initial_weights(model, "checkpoint", str(tmp_path / "ckpt.pth"))
    fresh = [k for k, v in source.state_dict().items() if v.shape != own[k].shape]
    assert fresh and all(re.search(r"cls_score|bbox_pred|mask_head\.predictor|category_ids", k) for k in fresh)
    for k, v in model.state_dict().items():
        assert torch.equal(v, own[k] if k in fresh else source.state_dict()[k]), k
    assert model.category_ids.tolist() == [7] and "start from their initialisation for 1" in report
    # A layer that does not depend on the classes must still fit exactly.
    bad = dict(source.state_dict(), **{"rpn.head.conv.weight": torch.zeros(1, 1, 3, 3)})
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not fit"):
        load_initial_weights(model, "checkpoint", str(tmp_path / "bad.pth"))


def test_load_initial_weights_refuses_a_model_built_without_the_conventions(tmp_path):
    cfg = get_config("tiny", ["model.backbone.norm=FrozenBN"])  # pixel convention left at BGR 0-255
    source = ResNet(depth=18, norm="BN")
    torch.save(_torchvision_names(source.state_dict()), tmp_path / "resnet18.pth")
    with pytest.raises(ValueError, match="apply_imagenet_conventions"):
        load_initial_weights(minimask.build_model(cfg), "imagenet", str(tmp_path / "resnet18.pth"))
    state, fmt = read_weights(str(tmp_path / "resnet18.pth"))
    apply_imagenet_conventions(cfg, imagenet_conventions(fmt, state), pinned_keys=set())
    load_initial_weights(minimask.build_model(cfg), "imagenet", str(tmp_path / "resnet18.pth"), weights=(state, fmt))


# ---- conventions and config checks --------------------------------------------------------------------------------

TV = {"model.input_format": "RGB", "model.pixel_scale": 1.0, "model.pixel_mean": (0.485, 0.456, 0.406),
      "model.pixel_std": (0.229, 0.224, 0.225), "model.backbone.stride_in_1x1": False,
      "model.backbone.norm": ("FrozenBN", "BN", "SyncBN")}


def test_apply_imagenet_conventions_sets_unpinned_and_refuses_conflicts():
    cfg = get_config("r50_fpn_gn")
    changes = apply_imagenet_conventions(cfg, TV, pinned_keys=set())
    assert cfg.model.input_format == "RGB" and cfg.model.pixel_scale == 1.0 and cfg.model.backbone.norm == "FrozenBN"
    assert any(c.startswith("model.backbone.norm: 'GN' -> 'FrozenBN'") for c in changes)

    cfg = get_config("r50_fpn_syncbn")  # SyncBN can hold torchvision BN weights: kept
    apply_imagenet_conventions(cfg, TV, pinned_keys={"model.backbone.norm"})
    assert cfg.model.backbone.norm == "SyncBN"

    # The same transform written in 0-255 units is accepted.
    cfg = get_config("r50_fpn_gn", ["model.input_format=RGB", "model.pixel_scale=255.0",
                                    "model.pixel_mean=(123.675, 116.28, 103.53)",
                                    "model.pixel_std=(58.395, 57.12, 57.375)"])
    apply_imagenet_conventions(cfg, TV, pinned_keys={"model.input_format", "model.pixel_scale", "model.pixel_mean",
                                                     "model.pixel_std"})
    assert cfg.model.pixel_scale == 255.0

    for overrides, pinned, match in (
            (["model.pixel_std=(1.0, 1.0, 1.0)"], {"model.pixel_std"}, "model.pixel_std"),
            (["model.backbone.stride_in_1x1=True"], {"model.backbone.stride_in_1x1"}, "stride_in_1x1=True"),
            (["model.backbone.norm=GN"], {"model.backbone.norm"}, "norm='GN'")):
        with pytest.raises(ValueError, match=match):
            apply_imagenet_conventions(get_config("r50_fpn_gn", overrides), TV, pinned_keys=pinned)


def test_check_init_config():
    for preset in ("r50_fpn_gn", "r50_fpn_syncbn", "tiny", "r50_fpn_gn_cascade", "r50_fpn_gn_keypoint"):
        check_init_config(get_config(preset), "random")
    with pytest.raises(ValueError, match="--init random with model.backbone.norm=FrozenBN"):
        check_init_config(get_config("r50_fpn_frozenbn"), "random")
    with pytest.raises(ValueError, match="model.fpn.norm=FrozenBN"):
        check_init_config(get_config("tiny", ["model.fpn.norm=FrozenBN"]), "random")
    with pytest.raises(ValueError, match="freeze_at=2"):
        check_init_config(get_config("tiny", ["model.backbone.freeze_at=2"]), "random")
    check_init_config(get_config("r50_fpn_frozenbn"), "imagenet")
    with pytest.raises(ValueError, match="--init"):
        check_init_config(get_config("tiny"), "scratch")


def test_describe_trainable():
    text = describe_trainable(minimask.build_model(get_config("tiny")))
    total = sum(p.numel() for p in minimask.build_model(get_config("tiny")).parameters())
    assert f"{total:,} trainable of {total:,}" in text and "frozen: nothing" in text
    assert "backbone: GroupNorm x" in text and "rpn: no norm" in text and "keypoint head: absent" in text
    cfg = get_config("tiny", ["model.backbone.norm=FrozenBN", "model.backbone.freeze_at=2"])
    model = minimask.build_model(cfg)
    text = describe_trainable(model)
    assert "frozen: backbone.conv1.* (9,408), backbone.layer1.* (" in text
    assert "backbone: FrozenBatchNorm2d x" in text
