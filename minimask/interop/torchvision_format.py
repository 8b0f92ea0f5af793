"""torchvision's checkpoints in minimask's module names: its ResNet backbones (ImageNet init) and its detection
models.

torchvision's `maskrcnn_resnet50_fpn`, `maskrcnn_resnet50_fpn_v2` and `keypointrcnn_resnet50_fpn` state dicts are
renamed to minimask's module names and loaded into the presets `torchvision_maskrcnn_r50_fpn`, `..._v2` and
`torchvision_keypointrcnn_r50_fpn` (minimask/config.py), which reproduce torchvision's inference and training
conventions (minimask/interop/torchvision_conventions.py). Nothing here imports torchvision: a checkpoint is a dict of
tensors.

Class layout: torchvision predicts K + 1 classes with column 0 = background, like minimask, but also regresses a box
(and predicts a mask) for the background class; those rows are dropped, so label k (1..K) keeps its meaning. For
torchvision's COCO models K = 90 and label k is COCO category id k (the 91-slot layout; the ids COCO never uses,
e.g. 12 and 26, are predicted by no trained model), so `category_ids` = 1..90.

ResNet: torchvision names the norm layers `bnK` where minimask says `normK`; everything else (conv*, layer*,
downsample.0/1, fc) already matches (`resnet_key`).
"""
from __future__ import annotations

import re

from torch import Tensor


def resnet_key(key: str) -> str:
    """minimask's name for a key of a torchvision ResNet / ResNeXt: `bn1` -> `norm1`, `layer1.0.bn2` ->
    `layer1.0.norm2`. Load the result with norm="BN" (or "FrozenBN") and stride_in_1x1=False."""
    return re.sub(r"(^|\.)bn(\d)", r"\1norm\2", key)


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
        return "backbone." + resnet_key(key.removeprefix("backbone.body."))
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
