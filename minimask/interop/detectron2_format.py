"""detectron2 model-zoo detection checkpoints in minimask: key renaming, the class layout, and the preset a file needs.

A detectron2 checkpoint (`model_final_*.pkl` from its model zoo, or a `.pth` its trainer wrote) is a dict with
"model" (name -> numpy array or tensor) and "__author__"; `minimask.interop.weight_files.read_weights` reads both kinds (the
.pkl files through the restricted unpickler) and `minimask.interop.model_zoo.read_checkpoint` dispatches here. The d2_*
presets in minimask/config.py (named after detectron2's config files, `d2_<yaml name>`) reproduce its inference
conventions, which are minimask's defaults: ROIAlignV2 (aligned, adaptive
sampling), box coder (10, 10, 5, 5), unrounded anchors at the nominal strides, grid-sample mask pasting, spatial-
softmax keypoint scores, cascade scores averaged over the stages.

Class layout: detectron2's box classifier has K + 1 rows with background LAST (row K); minimask's has background
first. The rows are rotated so that detectron2 class c becomes label c + 1; box regression (4K rows, no background
box) and the mask predictor (K maps) already have minimask's layout. Labels stay 1..K with 0 = background. For
COCO (K = 80) the model carries COCO's 80 category ids (`COCO_CATEGORY_IDS`, detectron2's contiguous order), for
the person keypoint models id 1, otherwise 1..K.

Presets: the file tells depth (blocks in res4), the FPN norm (none, GN, or BN with running statistics), the box head
(2fc or 4conv1fc), cascade, mask and keypoint heads. It does not tell pixel mean/std (detectron2 keeps them out of
its state dicts), nor stride_in_1x1 or the frozen stages, so a GN file fits `d2_mask_rcnn_R_50_FPN_3x_gn` (std 1),
`d2_scratch_mask_rcnn_R_50_FPN_3x_gn` (std 1) and `d2_scratch_mask_rcnn_R_50_FPN_9x_gn` (ImageNet std) alike: such
files raise ValueError listing the candidates and asking for config=, never a guess.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

# COCO's 80 object category ids in detectron2's contiguous order (its builtin COCO metadata): class c <-> id [c].
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34,
    35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63,
    64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)

_RES4_BLOCKS_TO_DEPTH = {6: 50, 23: 101, 36: 152}
_DROPPED = ("pixel_mean", "pixel_std")  # old detectron2 files saved the (config-defined) normalisation buffers


def is_detectron2_detection(state: dict) -> bool:
    """True for a detectron2 GeneralizedRCNN state dict (ResNet under `backbone.bottom_up.`, RPN, RoI heads)."""
    return "backbone.bottom_up.stem.conv1.weight" in state and any(
        k.startswith("proposal_generator.rpn_head.") for k in state)


def layout(state: dict) -> dict:
    """What a detectron2 detection state dict tells about its model (the keys `preset_layout` also returns)."""
    res4 = {int(m[1]) for k in state if (m := re.match(r"backbone\.bottom_up\.res4\.(\d+)\.", k))}
    if "backbone.fpn_lateral2.norm.running_mean" in state:
        fpn_norm = "BN"
    elif "backbone.fpn_lateral2.norm.weight" in state:
        fpn_norm = "GN"
    else:
        fpn_norm = ""
    cascade = "roi_heads.box_predictor.0.cls_score.weight" in state
    head = "roi_heads.box_head.0." if cascade else "roi_heads.box_head."
    return {"depth": _RES4_BLOCKS_TO_DEPTH.get(len(res4), -len(res4)), "fpn_norm": fpn_norm, "cascade": cascade,
            "conv_box_head": head + "conv1.weight" in state,
            "mask": "roi_heads.mask_head.predictor.weight" in state,
            "keypoint": "roi_heads.keypoint_head.conv_fcn1.weight" in state}


def preset_layout(cfg) -> dict:
    """The same description for a Config, to match files against the d2_* presets."""
    m = cfg.model
    fpn_norm = {"": "", "GN": "GN", "BN": "BN", "SyncBN": "BN"}.get(m.fpn.norm, m.fpn.norm)
    return {"depth": m.backbone.depth, "fpn_norm": fpn_norm, "cascade": m.cascade.enabled,
            "conv_box_head": len(m.box_head.conv_dims) > 0, "mask": m.mask_head.enabled,
            "keypoint": m.keypoint_head.enabled}


def candidate_presets(state: dict) -> list[str]:
    """The d2_* presets whose model has the layout of this state dict (several when the file cannot tell)."""
    from minimask.config import PRESETS, get_config

    found = layout(state)
    return [name for name in PRESETS if name.startswith("d2_") and preset_layout(get_config(name)) == found]


def num_classes(state: dict) -> int:
    """K, from the classifier's K + 1 rows."""
    key = ("roi_heads.box_predictor.0.cls_score.weight" if "roi_heads.box_predictor.0.cls_score.weight" in state
           else "roi_heads.box_predictor.cls_score.weight")
    return state[key].shape[0] - 1


def category_ids(state: dict) -> Tensor:
    """The label map a detectron2 model carries: (K,) int64, label k -> category id [k - 1]."""
    k = num_classes(state)
    if k == len(COCO_CATEGORY_IDS):
        return torch.tensor(COCO_CATEGORY_IDS, dtype=torch.int64)
    if k == 1 and "roi_heads.keypoint_head.conv_fcn1.weight" in state:
        return torch.tensor([1], dtype=torch.int64)  # COCO person
    return torch.arange(1, k + 1, dtype=torch.int64)


def _head_indices(state: dict, prefix: str, conv: str) -> tuple[int, bool]:
    """(number of convs, whether they are normed) of the conv stack `prefix + conv{i}`."""
    n = len({m[1] for k in state if (m := re.fullmatch(re.escape(prefix + conv) + r"(\d+)\.weight", k))})
    return n, prefix + conv + "1.norm.weight" in state


def _rename(key: str, state: dict) -> str | None:
    """minimask's name for one detectron2 key; None for keys to drop; ValueError for a key of no known layout."""
    m = re.fullmatch(r"backbone\.bottom_up\.stem\.conv1\.(?:(norm)\.)?(\w+)", key)
    if m:
        return f"backbone.{'norm1' if m[1] else 'conv1'}.{m[2]}"
    m = re.fullmatch(r"backbone\.bottom_up\.res(\d)\.(\d+)\.(conv\d|shortcut)\.(?:(norm)\.)?(\w+)", key)
    if m:  # res{s} -> layer{s-1}; convK(.norm) -> convK / normK; shortcut(.norm) -> downsample.0 / .1
        block = f"backbone.layer{int(m[1]) - 1}.{m[2]}"
        if m[3] == "shortcut":
            return f"{block}.downsample.{1 if m[4] else 0}.{m[5]}"
        return f"{block}.{m[3].replace('conv', 'norm') if m[4] else m[3]}.{m[5]}"
    m = re.fullmatch(r"backbone\.fpn_(lateral|output)(\d)\.(?:(norm)\.)?(\w+)", key)
    if m:  # fpn_lateral2 is C2's (finest first)
        return f"fpn.{m[1]}_{'norms' if m[3] else 'convs'}.{int(m[2]) - 2}.{m[4]}"
    m = re.fullmatch(r"proposal_generator\.rpn_head\.(conv|objectness_logits|anchor_deltas)\.(weight|bias)", key)
    if m:
        return f"rpn.head.{m[1]}.{m[2]}"
    if key.startswith("proposal_generator.anchor_generator.") or key in _DROPPED:
        return None  # anchors are recomputed from the config
    m = re.fullmatch(r"roi_heads\.box_head\.(\d+\.)?(conv|fc)(\d)\.(?:(norm)\.)?(\w+)", key)
    if m:  # FastRCNNConvFCHead -> ConvFCHead.layers: [conv(, norm), ReLU] * n_conv, Flatten, [fc, ReLU] * n_fc
        prefix = f"roi_heads.box_head.{m[1] or ''}"
        n_conv, normed = _head_indices(state, prefix, "conv")
        per_conv = 3 if normed else 2
        i = int(m[3]) - 1
        index = per_conv * i + bool(m[4]) if m[2] == "conv" else per_conv * n_conv + 1 + 2 * i
        return f"{prefix}layers.{index}.{m[5]}"
    m = re.fullmatch(r"roi_heads\.box_predictor\.(\d+\.)?(cls_score|bbox_pred)\.(weight|bias)", key)
    if m:
        return key
    m = re.fullmatch(r"roi_heads\.mask_head\.mask_fcn(\d)\.(?:(norm)\.)?(\w+)", key)
    if m:  # MaskRCNNConvUpsampleHead -> MaskHead.convs: [conv(, norm), ReLU] * n
        _, normed = _head_indices(state, "roi_heads.mask_head.", "mask_fcn")
        return f"roi_heads.mask_head.convs.{(3 if normed else 2) * (int(m[1]) - 1) + bool(m[2])}.{m[3]}"
    m = re.fullmatch(r"roi_heads\.mask_head\.(deconv|predictor)\.(weight|bias)", key)
    if m:
        return key
    m = re.fullmatch(r"roi_heads\.keypoint_head\.conv_fcn(\d)\.(weight|bias)", key)
    if m:  # KRCNNConvDeconvUpsampleHead -> KeypointHead.convs: [conv, ReLU] * n
        return f"roi_heads.keypoint_head.convs.{2 * (int(m[1]) - 1)}.{m[2]}"
    m = re.fullmatch(r"roi_heads\.keypoint_head\.score_lowres\.(weight|bias)", key)
    if m:
        return f"roi_heads.keypoint_head.deconv.{m[1]}"
    raise ValueError(f"unrecognised detectron2 detection key {key!r}")


def convert_detectron2_detection(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a detectron2 detection state dict to minimask's modules (see the module docstring).

    Classifier rows are rotated to background-first. In SyncBN models every norm with running statistics gets a
    `num_batches_tracked` counter where the file has none (the FrozenBN of frozen stages ignores it). The model
    buffers pixel_mean / pixel_std are not part of the result (the preset defines them); `category_ids` is (the
    COCO ids for K = 80, see `category_ids`).
    """
    if not is_detectron2_detection(state):
        raise ValueError("not a detectron2 detection state dict (no backbone.bottom_up.stem.conv1.weight / "
                         "proposal_generator.rpn_head.*)")
    out = {}
    for key, value in state.items():
        new = _rename(key, state)
        if new is None:
            continue
        if re.fullmatch(r"roi_heads\.box_predictor\.(\d+\.)?cls_score\.(weight|bias)", new):
            value = torch.cat([value[-1:], value[:-1]])  # (K+1, ...): detectron2 background last -> first
        out[new] = value
    if layout(state)["fpn_norm"] == "BN":  # a (Sync)BN model: BatchNorm2d has a step counter the file may lack
        for key in [k for k in out if k.endswith(".running_mean")]:
            counter = key.removesuffix("running_mean") + "num_batches_tracked"
            out.setdefault(counter, torch.tensor(0, dtype=torch.int64))
    out["category_ids"] = category_ids(state)
    return out
