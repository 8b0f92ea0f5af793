"""ImageNet backbones in every common format, and the conventions they were trained with (for `--init imagenet`;
"Rethinking ImageNet Pre-training" compares fine-tuning from them with training from random init, Sec. 3-4).

A backbone comes from a torchvision .pth, a Detectron / detectron2 Caffe2 pickle (MSRA `R-50.pkl`, FAIR
`R-50-GN.pkl`, `X-101-32x8d.pkl`, ...) or minimask's own ResNet state dict; `minimask.interop.weight_files
.read_weights` reads it and tells the format (weights-only loading, a restricted unpickler for pickles).
`imagenet_conventions` says which pixel convention, stride placement and norm the weights were trained with,
`apply_imagenet_conventions` puts those into the config before `build_model` (refusing where the user pinned
something else), and `load_imagenet_backbone` renames and loads strictly. Every error is a ValueError naming the
problem.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from minimask.interop.channels import RULE, adapt_first_conv
from minimask.interop.torchvision_format import resnet_key
from minimask.interop.weight_files import FORMATS
from minimask.model.norm import FrozenBatchNorm2d

_BN_NORMS = ("FrozenBN", "BN", "SyncBN")  # norms that can hold BatchNorm weights with running statistics
PIXEL_KEYS = ("model.input_format", "model.pixel_scale", "model.pixel_mean", "model.pixel_std")
_D2_MEAN = (103.530, 116.280, 123.675)  # BGR 0-255; D2 config/defaults.py PIXEL_MEAN
# The projection heads that `pretrain.py --method moco / densecl` saves beside the backbone (minimask.tools
# .contrastive): part of the pre-training objective, not of the detector, so loading skips them.
PROJECTION_HEADS = ("projector.", "dense_projector.")


# ---- Caffe2 (Detectron / detectron2 ImageNet pickles) -> minimask names --------------------------------------------
# Facts from detectron2 `checkpoint/c2_model_loading.py` (convert_basic_c2_names) and Detectron.pytorch's weight
# mappings: stem `conv1_w` + `res_conv1_bn_{s,b}` (BN files) or `conv1_gn_{s,b}` (GN files); blocks
# `res{S}_{i}_branch2{a,b,c}_w` + `_bn_{s,b}` / `_gn_{s,b}` (and `_bn_rm` / `_bn_riv` where statistics are kept),
# shortcut `res{S}_{i}_branch1_*`; classifier `pred_{w,b}` (GN files) or `fc1000_{w,b}` (MSRA); MSRA files also
# carry a stem `conv1_b` that Detectron and detectron2 leave unused.

_C2_LEAF = {"w": "weight", "b": "bias", "s": "weight", "rm": "running_mean", "riv": "running_var"}


def _caffe2_to_minimask(name: str) -> str:
    m = re.fullmatch(r"res(\d+)_(\d+)_branch(2[abc]|1)_(?:(bn|gn)_)?(w|b|s|rm|riv)", name)
    if m:
        stage, block, branch, norm, leaf = m.groups()
        prefix = f"layer{int(stage) - 1}.{block}."
        if branch == "1":
            module = "downsample.1" if norm else "downsample.0"
        else:
            module = ("norm" if norm else "conv") + "123"["abc".index(branch[1])]
        return prefix + module + "." + _C2_LEAF[leaf]
    m = re.fullmatch(r"(?:res_conv1_bn|conv1_gn)_(s|b|rm|riv)", name)
    if m:
        return "norm1." + _C2_LEAF[m.group(1)]
    m = re.fullmatch(r"(conv1|pred|fc1000)_(w|b)", name)
    if m:
        return ("conv1." if m.group(1) == "conv1" else "fc.") + _C2_LEAF[m.group(2)]
    return name  # not a backbone name: reported as unexpected


def _caffe2_norm(state: dict) -> str:
    """"GN" (FAIR GN models), "FrozenBN" (affine-only BN) or "BN" (BN with statistics) for a Caffe2 state."""
    if any("_gn_" in k for k in state):
        return "GN"
    return "BN" if any(k.endswith("_bn_rm") for k in state) else "FrozenBN"


# ---- conventions --------------------------------------------------------------------------------------------------

def _architecture(state: dict) -> tuple[str, int, int, bool]:
    """(description, groups, depth, bottleneck) of a minimask-named ResNet state, for messages and conventions."""
    blocks = [0, 0, 0, 0]
    for k in state:
        m = re.match(r"layer([1-4])\.(\d+)\.", k)
        if m:
            blocks[int(m.group(1)) - 1] = max(blocks[int(m.group(1)) - 1], int(m.group(2)) + 1)
    bottleneck = any(re.search(r"\.conv3\.weight$", k) for k in state)
    depth = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 50 if bottleneck else 34, (3, 4, 23, 3): 101,
             (3, 8, 36, 3): 152}.get(tuple(blocks), 0)
    groups, name = 1, f"ResNet-{depth}" if depth else f"ResNet with blocks per stage {blocks}"
    w = state.get("layer1.0.conv2.weight")
    if bottleneck and w is not None and len(w.shape) == 4 and w.shape[1] > 0 and w.shape[0] != w.shape[1]:
        groups = w.shape[0] // w.shape[1]
        name = f"ResNeXt-{depth} {groups}x{w.shape[0] // groups}d"
    return name, groups, depth, bottleneck


def imagenet_conventions(fmt: str, state: dict) -> dict:
    """The config values the weights were trained with, as {"dotted.key": value} (detectron2 `config/defaults.py`).

    Keys: "model.input_format", "model.pixel_scale", "model.pixel_mean", "model.pixel_std" (absent for "minimask":
    a bare state dict does not say), "model.backbone.stride_in_1x1", and "model.backbone.norm", whose value is a
    TUPLE of the norms that can hold these weights, the first being the one to use when the config's is not
    among them. `state` is the file's state as `read_weights` returns it.
    """
    if fmt == "detectron2":
        raise ValueError("this is a detectron2 detection checkpoint, not ImageNet weights: use --init checkpoint "
                         "with the d2_* preset it was trained as")
    if fmt not in FORMATS:
        raise ValueError(f"unknown weights format {fmt!r}; expected one of {FORMATS}")
    renamed = _rename(state, fmt)
    _, groups, depth, bottleneck = _architecture(renamed)
    if fmt == "torchvision":
        # TV models/detection/faster_rcnn.py: RGB in [0, 1], ImageNet mean/std; TV ResNet "v1.5" strides the 3x3.
        return {"model.input_format": "RGB", "model.pixel_scale": 1.0, "model.pixel_mean": (0.485, 0.456, 0.406),
                "model.pixel_std": (0.229, 0.224, 0.225), "model.backbone.stride_in_1x1": False,
                "model.backbone.norm": _BN_NORMS}
    if fmt == "minimask":
        if any(re.search(r"norm1\.running_mean$", k) for k in renamed):
            norms = _BN_NORMS
        else:
            norms = ("GN",) if "norm1.weight" in renamed else ("",)
        return {"model.backbone.norm": norms}
    norm = _caffe2_norm(state)
    out = {"model.input_format": "BGR", "model.pixel_scale": 255.0, "model.pixel_mean": _D2_MEAN,
           "model.pixel_std": (1.0, 1.0, 1.0), "model.backbone.stride_in_1x1": False,
           "model.backbone.norm": ("GN",) if norm == "GN" else ("FrozenBN",) if norm == "FrozenBN" else _BN_NORMS}
    if norm == "GN":
        # FAIR R-50-GN / R-101-GN: D2 configs/Misc/mask_rcnn_R_50_FPN_3x_gn.yaml sets STRIDE_IN_1X1: False and
        # leaves PIXEL_STD at the default [1, 1, 1] (BGR, D2 mean).
        return out
    if groups > 1:
        # FAIR ResNeXt: D2 COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml sets PIXEL_STD
        # [57.375, 57.120, 58.395] and STRIDE_IN_1X1: False ("this is a C2 model"). The X-152-32x8d-IN5k config
        # (D2 configs/Misc/cascade_mask_rcnn_X_152_32x8d_FPN_IN5k_gn_dconv.yaml) keeps the default std 1.
        if depth != 152:
            out["model.pixel_std"] = (57.375, 57.120, 58.395)
        return out
    # MSRA ResNets (R-50.pkl, R-101.pkl): D2 defaults STRIDE_IN_1X1 True, std 1 (D2 `config/defaults.py`).
    out["model.backbone.stride_in_1x1"] = bottleneck  # BasicBlocks have no 1x1 conv
    return out


def pixel_transform(fmt: str, scale: float, mean, std) -> list[tuple[int, float, float]]:
    """For each model input channel: (source channel, gain, offset) of x in [0, 1] -> normalised value. Sources
    0-2 are R, G, B (the first three channels of a 3- or 4-channel input), 3 is thermal."""
    visible = len(mean) in (3, 4)
    source = ([2, 1, 0] if fmt == "BGR" else [0, 1, 2]) * visible + [3] * (len(mean) - 3 * visible)
    return [(source[j], scale / std[j], mean[j] / std[j]) for j in range(len(mean))]


def same_transform(a, b) -> bool:
    return len(a) == len(b) and all(
        sa == sb and abs(ga - gb) <= 1e-3 * abs(gb) and abs(oa - ob) <= 1e-3 * max(abs(ob), 1.0)
        for (sa, ga, oa), (sb, gb, ob) in zip(a, b))


def get_key(cfg, key: str):
    """The value of a dotted config key ("model.backbone.norm")."""
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _set(cfg, key: str, value) -> None:
    *path, leaf = key.split(".")
    node = cfg
    for part in path:
        node = getattr(node, part)
    setattr(node, leaf, value)


def apply_imagenet_conventions(cfg, overrides: dict, pinned_keys: set[str]) -> list[str]:
    """Put the weights' conventions (`imagenet_conventions`) into `cfg` in place, before `build_model`.

    Keys the user did not pin are set. A pinned key that disagrees is refused with a ValueError naming it; pinned
    pixel keys are judged by the transform they produce together (RGB in [0, 1] x 255 - 123.675 over 58.395 is the
    same as x - 0.485 over 0.229). A pinned norm is accepted when it is one of the norms that can hold the weights.
    Returns one "key: old -> new" line per changed value.
    """
    changes = []
    for key, value in overrides.items():
        if key == "model.backbone.norm":
            current = get_key(cfg, key)
            if current in value:
                continue
            if key in pinned_keys:
                raise ValueError(f"--init imagenet with {key}={current!r}: these weights hold "
                                 f"{'GroupNorm' if value[0] == 'GN' else 'BatchNorm'} layers and need "
                                 f"{' or '.join(v or repr(v) for v in value)} there")
            _set(cfg, key, value[0])
            changes.append(f"{key}: {current!r} -> {value[0]!r}")
        elif key not in PIXEL_KEYS and get_key(cfg, key) != value:
            if key in pinned_keys:
                raise ValueError(f"--init imagenet with {key}={get_key(cfg, key)!r}: these weights were trained "
                                 f"with {key}={value!r}")
            changes.append(f"{key}: {get_key(cfg, key)!r} -> {value!r}")
            _set(cfg, key, value)
    if not any(k in overrides for k in PIXEL_KEYS):
        return changes
    wanted = pixel_transform(*(overrides[k] for k in PIXEL_KEYS))
    for key in PIXEL_KEYS:
        if key not in pinned_keys and get_key(cfg, key) != overrides[key]:
            changes.append(f"{key}: {get_key(cfg, key)!r} -> {overrides[key]!r}")
            _set(cfg, key, overrides[key])
    if not same_transform(pixel_transform(*(get_key(cfg, k) for k in PIXEL_KEYS)), wanted):
        pinned = [f"{k}={get_key(cfg, k)!r}" for k in PIXEL_KEYS if k in pinned_keys]
        raise ValueError(f"--init imagenet with {', '.join(pinned)}: these weights expect input_format="
                         f"{overrides['model.input_format']}, pixel_scale={overrides['model.pixel_scale']}, "
                         f"pixel_mean={overrides['model.pixel_mean']}, pixel_std={overrides['model.pixel_std']}")
    return changes


# ---- loading into the backbone --------------------------------------------------------------------------------------

def _rename(state: dict, fmt: str) -> dict:
    if fmt == "torchvision":
        return {resnet_key(k): v for k, v in state.items()}
    if fmt == "caffe2":
        return {_caffe2_to_minimask(k): v for k, v in state.items()}
    return dict(state)


def _is_detection(keys) -> bool:
    return any(re.search(r"(^|[._])(fpn|rpn|roi_heads|proposal_generator|cls_score|bbox_pred|mask_fcn|fc6|"
                         r"kps_score)([._]|$)", k) for k in keys)


def _short(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def load_imagenet_backbone(backbone: nn.Module, state: dict, fmt: str, *, strict: bool = True) -> str:
    """Load ImageNet weights (`read_weights` output) into a minimask `ResNet`; return a multi-line report.

    Names are converted to minimask's (torchvision `bnK` -> `normK`; Caffe2 names per the table above). Caffe2
    affine-only BN (`_bn_s`, `_bn_b`) becomes FrozenBN weight/bias with running_mean 0 and running_var 1 - eps, so
    that the layer computes exactly x * s + b; MSRA's stem `conv1_b` is folded into that shift. The ImageNet
    classifier (fc / pred / fc1000) is dropped unless the backbone has an `fc`. Every shape is checked. With
    strict=True, any missing, unexpected or mismatched key raises ValueError listing them (and naming the likely
    cause: another depth, a detection checkpoint, the wrong norm); with strict=False the matching tensors load and
    the rest is reported.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown weights format {fmt!r}; expected one of {FORMATS}")
    notes = []
    if _is_detection(state):
        raise ValueError("these are the weights of a detector (they have FPN / RPN / RoI-head layers), not of an "
                         "ImageNet classifier: use --init checkpoint for a minimask detector")
    renamed = _rename(state, fmt)
    if fmt == "minimask" and all(k.startswith("backbone.") for k in renamed):
        renamed = {k.removeprefix("backbone."): v for k, v in renamed.items()}
    heads = [k for k in renamed if fmt == "minimask" and k.startswith(PROJECTION_HEADS)]
    if heads:
        for key in heads:
            del renamed[key]
        notes.append(f"skipped the self-supervised projection heads ({len(heads)} tensors: "
                     f"{', '.join(sorted({k.split('.')[0] + '.*' for k in heads}))})")
    target = backbone.state_dict()
    modules = dict(backbone.named_modules())
    affine_only = fmt == "caffe2" and _caffe2_norm(state) == "FrozenBN"
    if affine_only:
        filled = 0
        for key in [k for k in renamed if k.endswith(".bias") and k.removesuffix(".bias") in modules]:
            layer = modules[key.removesuffix(".bias")]
            if isinstance(layer, FrozenBatchNorm2d):  # Caffe2 AffineChannel: y = x * s + b
                renamed[key[:-4] + "running_mean"] = torch.zeros_like(renamed[key])
                renamed[key[:-4] + "running_var"] = torch.full_like(renamed[key], 1.0 - layer.eps)
                filled += 1
            elif isinstance(layer, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
                raise ValueError(f"these Caffe2 weights hold affine-only BatchNorm (no statistics); they need "
                                 f"model.backbone.norm=FrozenBN, but {key.removesuffix('.bias')} is "
                                 f"{type(layer).__name__}")
        notes.append(f"{filled} affine-only Caffe2 BN layers -> FrozenBN (running_mean 0, running_var 1 - eps)")
        if "conv1.bias" in renamed and "conv1.bias" not in target and "norm1.bias" in renamed:
            renamed["norm1.bias"] = renamed["norm1.bias"] + renamed["norm1.weight"] * renamed.pop("conv1.bias")
            notes.append("stem conv1_b folded into the stem FrozenBN shift (Detectron/detectron2 drop it)")
    channels = target["conv1.weight"].shape[1]
    if channels != 3 and "conv1.weight" in renamed and renamed["conv1.weight"].shape[1] == 3:
        renamed["conv1.weight"] = adapt_first_conv(renamed["conv1.weight"], channels)
        notes.append(f"conv1 adapted from 3 channels to a {channels}-channel input ({RULE})")
    if "fc.weight" in renamed and "fc.weight" not in target:
        dropped = [k for k in ("fc.weight", "fc.bias") if renamed.pop(k, None) is not None]
        notes.append(f"dropped the ImageNet classifier ({', '.join(dropped)})")
    for key in [k for k in renamed if k.endswith("num_batches_tracked") and k not in target]:
        del renamed[key]  # BatchNorm's step counter: FrozenBN has no use for it
    missing = [k for k in target if k not in renamed and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in renamed if k not in target]
    mismatched = [f"{k} {tuple(renamed[k].shape)} vs {tuple(target[k].shape)}" for k in renamed
                  if k in target and renamed[k].shape != target[k].shape]
    if missing or unexpected or mismatched:
        message = _mismatch_message(renamed, target, missing, unexpected, mismatched)
        if strict:
            raise ValueError(f"the {fmt} weights do not fit the backbone: {message}")
        notes.append(f"strict=False, not loaded: {message}")
    loadable = {k: v for k, v in renamed.items() if k in target and v.shape == target[k].shape}
    merged = {**target, **{k: v.to(target[k].dtype) for k, v in loadable.items()}}
    backbone.load_state_dict(merged, strict=True)
    return "\n".join([f"loaded {len(loadable)} of {len(target)} backbone tensors from {fmt} ImageNet weights "
                      f"({_architecture(renamed)[0]})"] + [f"  {n}" for n in notes])


def _blocks(state: dict) -> set[tuple[int, int]]:
    return {(int(m[1]), int(m[2])) for m in (re.match(r"layer(\d)\.(\d+)\.", k) for k in state) if m}


def _mismatch_message(renamed, target, missing, unexpected, mismatched) -> str:
    parts = []
    have, want = _architecture(renamed)[0], _architecture(target)[0]
    if have != want:
        parts.append(f"the file holds a {have}, the config builds a {want} (set model.backbone.depth / groups / "
                     f"width_per_group to match)")
    norm_keys = [k for k in missing + unexpected if re.search(r"(norm\d|downsample\.1)\.", k)]
    if norm_keys and len(norm_keys) == len(missing + unexpected):
        parts.append("only norm-layer entries differ: model.backbone.norm does not match the norm the weights "
                     "were trained with")
    have_blocks, want_blocks = _blocks(renamed), _blocks(target)
    for title, blocks in (("missing", want_blocks - have_blocks), ("extra", have_blocks - want_blocks)):
        if blocks:  # in Detectron's stage names: layer3.6 = res4.6
            parts.append(f"{title} blocks {_short([f'res{s + 1}.{i}' for s, i in sorted(blocks)], 6)}")
    for title, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if names:
            parts.append(f"{len(names)} {title}: {_short(names)}")
    return "; ".join(parts)
