"""Whole detection checkpoints from other libraries, and `from_checkpoint`, which builds the model a file needs.

torchvision's `maskrcnn_resnet50_fpn`, `maskrcnn_resnet50_fpn_v2` and `keypointrcnn_resnet50_fpn` state dicts are
renamed to minimask's module names and loaded into the presets `torchvision_maskrcnn_r50_fpn`, `..._v2` and
`torchvision_keypointrcnn_r50_fpn` (minimask/config.py), which reproduce torchvision's inference and training
conventions (minimask/interop/torchvision_conventions.py). Nothing here imports torchvision: a checkpoint is a dict of
tensors.
detectron2 checkpoints are converted by `minimask.interop.detectron2_format` into the d2_* presets.

Class layout: torchvision predicts K + 1 classes with column 0 = background, like minimask, but also regresses a box
(and predicts a mask) for the background class; those rows are dropped, so label k (1..K) keeps its meaning. For
torchvision's COCO models K = 90 and label k is COCO category id k (the 91-slot layout; the ids COCO never uses,
e.g. 12 and 26, are predicted by no trained model), so `category_ids` = 1..90.

    model = from_checkpoint("maskrcnn_resnet50_fpn_coco.pth")        # format and preset detected from the keys
    model = from_checkpoint("model_final.pth")                          # minimask training checkpoint (has config)
    model = from_checkpoint("weights.pth", config="r50_fpn_gn")        # a bare minimask state dict needs config=
    model = from_checkpoint("model_final_f10217.pkl")                   # detectron2 mask_rcnn_R_50_FPN_3x
    model = from_checkpoint("model_final_gn.pkl", config="d2_mask_rcnn_R_50_FPN_3x_gn")  # GN: file cannot tell
"""
from __future__ import annotations

import dataclasses
import os
import re
import zipfile

import torch
from torch import Tensor

from minimask.build import build_model
from minimask.engine.checkpoint import load_checkpoint
from minimask.config import Config, apply_override, get_config
from minimask.interop.detectron2_format import candidate_presets, convert_detectron2_detection, is_detectron2_detection
from minimask.interop.detectron2_format import num_classes as d2_num_classes
from minimask.model.mask_rcnn import MaskRCNN
from minimask.interop.weight_files import read_weights

TORCHVISION_PRESETS = ("torchvision_maskrcnn_r50_fpn", "torchvision_maskrcnn_r50_fpn_v2",
                       "torchvision_keypointrcnn_r50_fpn")


def is_torchvision_detection(state: dict) -> bool:
    """True for a torchvision GeneralizedRCNN state dict (ResNet-FPN body under `backbone.body.`, RPN, RoI heads)."""
    return "backbone.body.conv1.weight" in state and any(k.startswith("rpn.head.") for k in state)


def torchvision_preset(state: dict) -> str | None:
    """The preset a torchvision detection state dict needs, or None when its layout is none of the three."""
    keypoint = "roi_heads.keypoint_predictor.kps_score_lowres.weight" in state
    mask = "roi_heads.mask_predictor.mask_fcn_logits.weight" in state
    two_fc = "roi_heads.box_head.fc6.weight" in state
    v2 = "rpn.head.conv.1.0.weight" in state and "backbone.fpn.inner_blocks.0.1.weight" in state
    if keypoint and two_fc and not mask and not v2:
        return "torchvision_keypointrcnn_r50_fpn"
    if mask and two_fc and not keypoint and not v2:
        return "torchvision_maskrcnn_r50_fpn"
    if mask and v2 and not keypoint and "roi_heads.box_head.5.weight" in state:
        return "torchvision_maskrcnn_r50_fpn_v2"
    return None


def _rename_torchvision_key(key: str, state: dict) -> str:
    """minimask's name for one torchvision key (ValueError for a key of no known layout)."""
    if key.startswith("backbone.body."):  # ResNet: drop the IntermediateLayerGetter, bnK -> normK
        return "backbone." + re.sub(r"(^|\.)bn(\d)", r"\1norm\2", key.removeprefix("backbone.body."))
    m = re.fullmatch(r"backbone\.fpn\.(inner|layer)_blocks\.(\d)\.(?:(\d)\.)?(\w+)", key)
    if m:  # Conv2dNormActivation: .0 is the conv, .1 the norm; torchvision < 0.13 had the bare conv
        kind = "lateral" if m[1] == "inner" else "output"
        part = "norms" if m[3] == "1" else "convs"
        return f"fpn.{kind}_{part}.{m[2]}.{m[4]}"
    m = re.fullmatch(r"rpn\.head\.conv\.(?:(\d+)\.0\.)?(weight|bias)", key)
    if m:  # conv.0.0 is the first conv (old files: conv.weight), conv.j.0 the (j+1)-th
        j = int(m[1] or 0)
        return f"rpn.head.conv.{m[2]}" if j == 0 else f"rpn.head.extra_convs.{j - 1}.{m[2]}"
    m = re.fullmatch(r"rpn\.head\.(cls_logits|bbox_pred)\.(weight|bias)", key)
    if m:
        return f"rpn.head.{'objectness_logits' if m[1] == 'cls_logits' else 'anchor_deltas'}.{m[2]}"
    m = re.fullmatch(r"roi_heads\.box_head\.fc([67])\.(weight|bias)", key)
    if m:  # TwoMLPHead -> ConvFCHead(conv_dims=()) layers [Flatten, fc, ReLU, fc, ReLU]
        return f"roi_heads.box_head.layers.{1 if m[1] == '6' else 3}.{m[2]}"
    m = re.fullmatch(r"roi_heads\.box_head\.(\d+)\.(?:(\d)\.)?(\w+)", key)
    if m:  # FastRCNNConvFCHead: blocks i < n_conv are [conv, norm] (+ReLU), then Flatten, then Linear(s)
        n_conv = len({k.split(".")[2] for k in state if re.match(r"roi_heads\.box_head\.\d+\.0\.weight$", k)})
        i = int(m[1])
        if i < n_conv:  # minimask layers: [conv, norm, ReLU] * n_conv, Flatten, [fc, ReLU] * n_fc
            return f"roi_heads.box_head.layers.{3 * i + int(m[2])}.{m[3]}"
        return f"roi_heads.box_head.layers.{3 * n_conv + 1 + 2 * (i - n_conv - 1)}.{m[3]}"
    m = re.fullmatch(r"roi_heads\.mask_head\.(?:mask_fcn(\d)|(\d)\.(\d))\.(\w+)", key)
    if m:  # MaskRCNNHeads block i: [conv(, norm)] (+ReLU); old files: mask_fcn{i+1}
        i = int(m[1]) - 1 if m[1] else int(m[2])
        sub = int(m[3] or 0)
        normed = "roi_heads.mask_head.0.1.weight" in state
        return f"roi_heads.mask_head.convs.{(3 if normed else 2) * i + sub}.{m[4]}"
    m = re.fullmatch(r"roi_heads\.mask_predictor\.(conv5_mask|mask_fcn_logits)\.(weight|bias)", key)
    if m:
        return f"roi_heads.mask_head.{'deconv' if m[1] == 'conv5_mask' else 'predictor'}.{m[2]}"
    m = re.fullmatch(r"roi_heads\.keypoint_head\.(\d+)\.(weight|bias)", key)
    if m:  # KeypointRCNNHeads: [conv, ReLU] * n, same indices as minimask's convs
        return f"roi_heads.keypoint_head.convs.{m[1]}.{m[2]}"
    if key.startswith("roi_heads.keypoint_predictor.kps_score_lowres."):
        return key.replace("roi_heads.keypoint_predictor.kps_score_lowres.", "roi_heads.keypoint_head.deconv.")
    if key.startswith("roi_heads.box_predictor."):
        return key
    raise ValueError(f"unrecognised torchvision detection key {key!r}")


def convert_torchvision_detection(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], str | None]:
    """Rename a torchvision detection state dict to minimask's modules -> (state, preset name or None).

    The background class's box-regression rows (bbox_pred rows 0..3) and mask map (mask_fcn_logits channel 0) are
    dropped. The preset is None when the layout is not one of the three torchvision models (e.g. Faster R-CNN);
    the returned state then still has minimask names, to be loaded into a model built from an explicit config.
    The model's own buffers (pixel_mean, pixel_std, category_ids) are not part of the result.
    """
    if not is_torchvision_detection(state):
        raise ValueError("not a torchvision detection state dict (no backbone.body.conv1.weight / rpn.head.*)")
    out = {}
    for key, value in state.items():
        new = _rename_torchvision_key(key, state)
        if new == "roi_heads.box_predictor.bbox_pred.weight" or new == "roi_heads.box_predictor.bbox_pred.bias":
            value = value[4:]  # torchvision regresses a box for the background class too
        elif new in ("roi_heads.mask_head.predictor.weight", "roi_heads.mask_head.predictor.bias"):
            value = value[1:]  # and predicts a background mask
        out[new] = value
    return out, torchvision_preset(state)


def config_from_dict(data: dict) -> Config:
    """A Config from the nested dict `minimask.config.to_dict` wrote (e.g. a training checkpoint's "config").

    Lists become tuples; keys the current Config lacks raise ValueError naming them; missing keys keep defaults.
    """
    def fill(node, values: dict, path: str):
        fields = {f.name for f in dataclasses.fields(node)}
        for name, value in values.items():
            if name not in fields:
                raise ValueError(f"checkpoint config has an unknown key {path + name!r}")
            current = getattr(node, name)
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    raise ValueError(f"checkpoint config key {path + name!r} should be a section")
                fill(current, value, f"{path}{name}.")
            else:
                setattr(node, name, _tuples(value))

    cfg = Config()
    fill(cfg, data, "")
    return cfg


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _resolve_config(config) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, str):
        return get_config(config)
    if isinstance(config, dict):
        return config_from_dict(config)
    raise ValueError(f"config must be a preset name, a Config or a config dict, got {type(config).__name__}")


def _is_plain_pickle(path) -> bool:
    """A pickle (protocol >= 2 starts with 0x80) that is not a torch zip archive."""
    if not os.path.isfile(path) or zipfile.is_zipfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def read_checkpoint(path: str | os.PathLike, config=None) -> tuple[dict[str, Tensor], Config]:
    """The minimask state dict in `path` and the Config of the model it fits (see `from_checkpoint`)."""
    config_in_file = None
    if _is_plain_pickle(path):  # a detectron2 model-zoo .pkl: only through the restricted unpickler
        state, _ = read_weights(path)
    else:
        raw = load_checkpoint(path)
        state = raw
        if isinstance(raw.get("model"), dict):  # minimask: {"model", "config", ...}; detectron2: {"model", ...}
            state, config_in_file = raw["model"], raw.get("config")
    if not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict (a dict of tensors, or one under 'model')")
    state = {k.removeprefix("module."): v for k, v in state.items()}

    if is_torchvision_detection(state):
        state, preset = convert_torchvision_detection(state)
        if config is None:
            if preset is None:
                raise ValueError(f"{path} is a torchvision detection checkpoint but not one of {TORCHVISION_PRESETS}; "
                                 "pass config= (a preset name or Config) for the model it fits")
            cfg = get_config(preset)
            num_classes = state["roi_heads.box_predictor.cls_score.weight"].shape[0] - 1
            if num_classes != cfg.model.roi_heads.num_classes:  # a fine-tuned torchvision model: the file tells K
                apply_override(cfg, f"model.roi_heads.num_classes={num_classes}")
        else:
            cfg = _resolve_config(config)
        # torchvision files lack minimask's model buffers: the config defines them (labels 1..K = category ids).
        model_buffers = {"pixel_mean": torch.tensor(cfg.model.pixel_mean).view(3, 1, 1),
                         "pixel_std": torch.tensor(cfg.model.pixel_std).view(3, 1, 1),
                         "category_ids": torch.arange(1, cfg.model.roi_heads.num_classes + 1)}
        state.update({k: v for k, v in model_buffers.items() if k not in state})
        return state, cfg
    if is_detectron2_detection(state):
        return _read_detectron2(path, state, config)
    if "backbone.conv1.weight" in state and "rpn.head.objectness_logits.weight" in state:  # minimask's own names
        if config is not None:
            return state, _resolve_config(config)
        if config_in_file is not None:
            return state, config_from_dict(config_in_file)
        raise ValueError(f"{path} is a minimask state dict without its config: the file cannot tell which preset "
                         "it needs; pass config= (a preset name or Config)")
    raise ValueError(f"{path}: unrecognised checkpoint format (not minimask, torchvision or detectron2 detection "
                     "keys)")


def _read_detectron2(path, state: dict, config) -> tuple[dict[str, Tensor], Config]:
    """A detectron2 state dict converted, with the d2_* preset its layout determines (see detectron2_format)."""
    converted = convert_detectron2_detection(state)
    candidates = candidate_presets(state)
    if config is not None:
        cfg = _resolve_config(config)
    elif len(candidates) == 1:
        cfg = get_config(candidates[0])
        k = d2_num_classes(state)
        if k != cfg.model.roi_heads.num_classes:  # a fine-tuned detectron2 model: the file tells K
            apply_override(cfg, f"model.roi_heads.num_classes={k}")
    else:
        what = (f"fits {len(candidates)} presets ({', '.join(candidates)}) that differ in what the file does not "
                "store (pixel mean/std, stride_in_1x1, frozen stages)") if candidates else "fits no d2_* preset"
        raise ValueError(f"{path} is a detectron2 checkpoint that {what}; pass config= (a preset name or Config) "
                         "for the model it was trained as")
    # detectron2 files lack the normalisation buffers (persistent=False there): the config defines them.
    converted.update({"pixel_mean": torch.tensor(cfg.model.pixel_mean).view(3, 1, 1),
                      "pixel_std": torch.tensor(cfg.model.pixel_std).view(3, 1, 1)})
    return converted, cfg


def from_checkpoint(path: str | os.PathLike, config=None) -> MaskRCNN:
    """Build the model a checkpoint needs and load its weights (strictly); returned in eval mode on the CPU.

    Formats: a minimask training checkpoint ({"model", "config", ...}: its own config), a bare minimask state dict
    (needs `config`), a torchvision detection state dict (the matching torchvision_* preset, with the class
    count read from the file), or a detectron2 checkpoint (.pkl or .pth; the d2_* preset its layout determines,
    see `minimask.interop.detectron2_format`; GN and SyncBN files fit several presets and need `config`). `config` (a
    preset name, a Config, or a config dict) overrides the detected one.
    Raises ValueError when the file cannot tell which preset it needs and no config is given, and when the
    weights do not fit the model.
    """
    state, cfg = read_checkpoint(path, config)
    model = build_model(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit the model of its config: {' '.join(str(e).split())[:500]}") from None
    return model.eval()
