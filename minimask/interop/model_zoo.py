"""Whole detection checkpoints from other libraries, and `from_checkpoint`, which builds the model a file needs.

torchvision's detection checkpoints are renamed by `minimask.interop.torchvision_format`, detectron2's by
`minimask.interop.detectron2_format`; each goes into the preset that reproduces its library's conventions.

    model = from_checkpoint("maskrcnn_resnet50_fpn_coco.pth")        # format and preset detected from the keys
    model = from_checkpoint("model_final.pth")                          # minimask training checkpoint (has config)
    model = from_checkpoint("weights.pth", config="r50_fpn_gn")        # a bare minimask state dict needs config=
    model = from_checkpoint("model_final_f10217.pkl")                   # detectron2 mask_rcnn_R_50_FPN_3x
    model = from_checkpoint("model_final_gn.pkl", config="d2_mask_rcnn_R_50_FPN_3x_gn")  # GN: file cannot tell
"""
from __future__ import annotations

import dataclasses
import os
import zipfile

import torch
from torch import Tensor

from minimask.build import build_model
from minimask.config import Config, apply_override, get_config
from minimask.engine.checkpoint import load_checkpoint
from minimask.interop.detectron2_format import candidate_presets, convert_detectron2_detection, is_detectron2_detection
from minimask.interop.detectron2_format import num_classes as d2_num_classes
from minimask.interop.torchvision_format import (
    TORCHVISION_PRESETS,
    convert_torchvision_detection,
    is_torchvision_detection,
)
from minimask.interop.weight_files import read_weights
from minimask.model.mask_rcnn import MaskRCNN


def detector_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A detection state dict in minimask's module names: torchvision's and detectron2's renamed (their layouts,
    class rows and buffers as `convert_torchvision_detection` / `convert_detectron2_detection` say), minimask's
    as it is."""
    if is_torchvision_detection(state):
        return convert_torchvision_detection(state)[0]
    if is_detectron2_detection(state):
        return convert_detectron2_detection(state)
    return state


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
