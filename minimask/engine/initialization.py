"""Initial weights for training ("Rethinking ImageNet Pre-training", Sec. 3-4, compares training from random init
with fine-tuning from ImageNet classification; both must be set up right):

- `--init random`: every layer keeps the init of detectron2 (each module's constructor; checked in
  tests/test_build.py); nothing may be frozen and no FrozenBN may be used (`check_init_config`).
- `--init imagenet`: a backbone in any format `minimask.interop.imagenet` reads, with the pixel convention, stride
  placement and norm it was trained with already in the config (`apply_imagenet_conventions`).
- `--init checkpoint`: a whole detector (minimask's, torchvision's or detectron2's), strict except for the
  class-dependent layers when the label set changes.

`describe_trainable` is the trainer's summary of what trains. Every error is a ValueError naming the file and the
problem (train.py turns it into a one-line error, exit 2).
"""
from __future__ import annotations

import collections
import re

from torch import nn

from minimask.data.images import num_channels
from minimask.interop.channels import adapt_detector_state, conventions_for_channels
from minimask.interop.imagenet import (
    PIXEL_KEYS,
    get_key,
    imagenet_conventions,
    load_imagenet_backbone,
    pixel_transform,
    same_transform,
)
from minimask.interop.model_zoo import detector_state
from minimask.interop.torchvision_format import is_torchvision_detection
from minimask.interop.weight_files import read_weights
from minimask.model.norm import FrozenBatchNorm2d

# The layers whose shape follows the number of classes (fine-tuning to another label set re-initialises them).
_CLASS_LAYER = re.compile(r"(^|\.)(cls_score|bbox_pred)\.|mask_head\.predictor\.|^category_ids$")

_NORM_FIELDS = ("model.backbone.norm", "model.fpn.norm", "model.box_head.norm", "model.mask_head.norm")


def check_init_config(cfg, init: str) -> None:
    """Refuse configs that cannot train with `init` (ValueError naming the offending field).

    random: FrozenBN anywhere keeps identity statistics and fixed affine parameters, i.e. no normalisation at all
    (detectron2 issue #914), and `freeze_at > 0` leaves random layers untrained (-3.3 AP in Detectron,
    `projects/GN/README.md`).
    """
    if init not in ("random", "imagenet", "checkpoint"):
        raise ValueError(f"--init must be random, imagenet or checkpoint, got {init!r}")
    if init != "random":
        return
    for key in _NORM_FIELDS:
        if get_key(cfg, key) == "FrozenBN":
            raise ValueError(f"--init random with {key}=FrozenBN: FrozenBN keeps ImageNet statistics and never "
                             f"updates them, so with random weights it normalises nothing; use GN or SyncBN "
                             f"(paper Sec. 3)")
    if cfg.model.backbone.freeze_at > 0:
        raise ValueError(f"--init random with model.backbone.freeze_at={cfg.model.backbone.freeze_at}: frozen "
                         f"layers would stay random; use 0 when training from scratch")


def check_pretrain_metadata(info: dict | None, cfg, path: str) -> None:
    """A pretrain.py file records the backbone and pixel settings it was trained with, and its input channels:
    refuse a config that disagrees (ValueError naming the key and both values), since the filters were learnt on
    inputs normalised that way. A file without that record (another format) passes. A 3-channel backbone for a 1-
    or 4-channel model is adapted by the rule of minimask.interop.channels, whose pixel values are checked there."""
    if not info:
        return
    channels, have = info.get("in_channels", 3), num_channels(cfg.input.modalities)
    if channels != have and not (channels == 3 and have in (1, 4)):
        raise ValueError(f"--weights {path} holds a {channels}-channel backbone, but input.modalities="
                         f"{tuple(cfg.input.modalities)} makes {have} channels")
    want = {f"model.backbone.{k}": v for k, v in (info.get("backbone") or {}).items()}
    if channels == have:
        want.update({f"model.{k}": v for k, v in (info.get("pixel") or {}).items()})
    for key, value in want.items():
        current = get_key(cfg, key)
        same = (list(current) == list(value)) if isinstance(current, (list, tuple)) else current == value
        if key == "model.backbone.norm" and current in ("FrozenBN", "BN", "SyncBN") and value in ("BN", "SyncBN"):
            same = True  # BN statistics load into any BatchNorm form (load_imagenet_backbone)
        if not same:
            raise ValueError(f"--weights {path} was pre-trained with {key}={value!r}, but the config has "
                             f"{key}={current!r}: set it to match (or pre-train with this config)")


def _frozen_prefixes(module: nn.Module, prefix: str = "") -> list[str]:
    """Frozen parameter names, compressed: a module whose parameters are all frozen appears as `name.*`."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        return [f"{prefix}* ({sum(p.numel() for p in params):,})"]
    out = [f"{prefix}{n}" for n, p in module.named_parameters(recurse=False) if not p.requires_grad]
    for name, child in module.named_children():
        out += _frozen_prefixes(child, f"{prefix}{name}.")
    return out


def describe_trainable(model: nn.Module) -> str:
    """A short multi-line summary: trainable / total parameters, frozen parameters (by prefix) and the norm
    classes of the backbone, FPN, RPN and the box / mask / keypoint heads."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines = [f"parameters: {trainable:,} trainable of {total:,}"]
    frozen = _frozen_prefixes(model)
    lines.append(f"frozen: {', '.join(frozen) if frozen else 'nothing'}")
    roi = getattr(model, "roi_heads", None)
    parts = {"backbone": getattr(model, "backbone", None), "fpn": getattr(model, "fpn", None),
             "rpn": getattr(model, "rpn", None), "box head": getattr(roi, "box_head", None),
             "mask head": getattr(roi, "mask_head", None), "keypoint head": getattr(roi, "keypoint_head", None)}
    norms = []
    for name, part in parts.items():
        if part is None:
            norms.append(f"{name}: absent")
            continue
        counts = collections.Counter(type(m).__name__ for m in part.modules() if isinstance(
            m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, FrozenBatchNorm2d)))
        norms.append(f"{name}: " + (", ".join(f"{c} x{n}" for c, n in counts.items()) or "no norm"))
    lines.append("norms: " + "; ".join(norms))
    return "\n".join(lines)


# ---- the trainer's entry point -------------------------------------------------------------------------------------

def _model_stride_in_1x1(backbone: nn.Module) -> bool | None:
    block = getattr(getattr(backbone, "layer2", None), "0", None)
    if block is None or not hasattr(block, "conv3"):
        return None  # no bottleneck stage to tell
    return block.conv1.stride != (1, 1)


def load_initial_weights(model, init: str, path: str, *, strict: bool = True, weights=None) -> str:
    """Initialise `model` from `path` for --init imagenet (backbone) or checkpoint (whole model); print and return
    a report. `weights` may pass the (state, fmt) that `read_weights(path)` already returned.

    imagenet: the model must already follow the weights' conventions (`apply_imagenet_conventions` before
    `build_model`): a model whose pixel convention or stride placement differs is refused, then
    `load_imagenet_backbone(strict=strict)`. checkpoint: a minimask detector state dict, or a torchvision or
    detectron2 detection checkpoint (renamed by `minimask.interop.model_zoo.detector_state`; build the matching
    torchvision_* / d2_* preset), loaded strictly; the model keeps its own pixel_mean, pixel_std and category_ids.
    """
    if init not in ("imagenet", "checkpoint"):
        raise ValueError(f"load_initial_weights: --init {init!r} loads no weights")
    state, fmt = weights if weights is not None else read_weights(path)
    report = (_from_imagenet(model, path, state, fmt, strict) if init == "imagenet"
              else _from_detector(model, path, state, fmt))
    print(report)
    return report


def _from_imagenet(model, path: str, state: dict, fmt: str, strict: bool) -> str:
    conv = conventions_for_channels(imagenet_conventions(fmt, state), model.in_channels)
    if "model.pixel_mean" in conv:
        have = pixel_transform(model.input_format, model.pixel_scale, model.pixel_mean.flatten().tolist(),
                               model.pixel_std.flatten().tolist())
        if not same_transform(have, pixel_transform(*(conv[k] for k in PIXEL_KEYS))):
            raise ValueError(f"--weights {path}: the model's pixel convention ({model.input_format}, scale "
                             f"{model.pixel_scale}) is not the one these weights were trained with; call "
                             f"apply_imagenet_conventions before build_model")
    stride = _model_stride_in_1x1(model.backbone)
    if stride is not None and stride != conv.get("model.backbone.stride_in_1x1", stride):
        raise ValueError(f"--weights {path}: the backbone has stride_in_1x1={stride}, these weights were "
                         f"trained with stride_in_1x1={not stride}")
    try:
        report = load_imagenet_backbone(model.backbone, state, fmt, strict=strict)
    except ValueError as e:
        raise ValueError(f"--weights {path}: {e}") from None
    return f"ImageNet init from {path}: {report}"


def _from_detector(model, path: str, state: dict, fmt: str) -> str:
    if fmt in ("minimask", "detectron2") or is_torchvision_detection(state):
        own = model.state_dict()
        if fmt != "minimask" or is_torchvision_detection(state):  # renamed; the model keeps its own buffers
            state = {**detector_state(state), **{k: own[k] for k in ("pixel_mean", "pixel_std", "category_ids")}}
            fmt = "minimask"
    if fmt != "minimask" or not any(k.startswith("backbone.") for k in state):
        raise ValueError(f"--weights {path}: --init checkpoint needs a minimask detector checkpoint, this is "
                         f"a {fmt} {'backbone' if fmt == 'minimask' else 'file'} (use --init imagenet)")
    state, adapted = adapt_detector_state(state, model.in_channels)  # a 3-channel detector, a thermal model
    # Fine-tuning on another label set (a COCO detector on pedestrians, say): the class-dependent layers do not
    # fit, so they keep their fresh initialisation, as detectron2 does, and the label map is the model's (the
    # new dataset's). Every other layer must fit exactly.
    own = model.state_dict()
    fresh = [k for k, v in state.items() if _CLASS_LAYER.search(k) and k in own and tuple(v.shape) != tuple(own[k].shape)]
    state = {**state, **{k: own[k] for k in fresh}}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise ValueError(f"--weights {path} does not fit the model: {detail}") from None
    report = f"initialised the whole model from {path}" + (f"; {adapted}" if adapted else "")
    if fresh:
        report += (f"; the checkpoint predicts another number of classes, so these start from their "
                   f"initialisation for {model.num_classes}: {', '.join(k for k in fresh if k != 'category_ids')}")
    return report
