"""ResNet / ResNeXt backbones (He et al. 2016, "Deep Residual Learning"; Xie et al. 2017, "Aggregated Residual
Transformations") as used by Mask R-CNN and by "Rethinking ImageNet Pre-training" (He/Girshick/Dollar 2019).

Depths 18/34 use BasicBlocks (two 3x3 convs); depths 50/101/152 use Bottlenecks (1x1, grouped 3x3, 1x1). ResNeXt
is a Bottleneck ResNet with `groups` > 1 on the 3x3 conv only (e.g. 32x4d: groups=32, width_per_group=4).
Layout, init and freezing follow detectron2 (`modeling/backbone/resnet.py`).

Stage names (Detectron) and module names (torchvision, with `bn` renamed `norm`):

    Detectron   module here        torchvision        output (bottleneck / basic)  stride
    stem        conv1, norm1       conv1, bn1         64                            4 (after the max-pool)
    res2        layer1             layer1             256 / 64                      4
    res3        layer2             layer2             512 / 128                     8
    res4        layer3             layer3             1024 / 256                    16
    res5        layer4             layer4             2048 / 512                    32
    logits      fc                 fc                 num_classes                   (global average pool + fc)

Inside a block: `conv1/norm1, conv2/norm2[, conv3/norm3]`, shortcut `downsample.0` (conv) and `downsample.1` (norm).
So a torchvision state dict loads after renaming every `bnK` module to `normK`
(`minimask.interop.torchvision_format.resnet_key`), with
norm="BN" and stride_in_1x1=False (torchvision "v1.5" strides the 3x3 conv).

Stages after the deepest requested output are not built at all (detectron2 does the same): they would never run,
and unused parameters break DistributedDataParallel.
"""

import torch
import torch.nn.functional as F
from torch import nn

from minimask.model.norm import FrozenBatchNorm2d, get_norm
from minimask.model.weight_init import c2_msra_fill

# Blocks per stage res2..res5, and whether the depth uses Bottleneck blocks.
_DEPTHS = {
    18: ([2, 2, 2, 2], False),
    34: ([3, 4, 6, 3], False),
    50: ([3, 4, 6, 3], True),
    101: ([3, 4, 23, 3], True),
    152: ([3, 8, 36, 3], True),
}
_STAGES = ("res2", "res3", "res4", "res5")
_FEATURES = ("stem",) + _STAGES + ("logits",)
_STEM_CHANNELS = 64


def _norm_or_identity(norm: str | None, channels: int) -> nn.Module:
    """The requested norm layer, or an nn.Identity (no parameters) so module names stay the same without a norm."""
    layer = get_norm(norm, channels)
    return nn.Identity() if layer is None else layer


def _conv(in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, groups: int = 1,
          norm: str | None) -> nn.Conv2d:
    # A conv followed by a norm gets no bias: the norm's shift makes it redundant (detectron2 convention).
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                     groups=groups, bias=not norm)


def _shortcut(in_channels: int, out_channels: int, stride: int, norm: str | None) -> nn.Module | None:
    """Projection shortcut (1x1 conv with the block's stride + norm) when the shape changes, else None (identity)."""
    if in_channels == out_channels and stride == 1:
        return None
    return nn.Sequential(_conv(in_channels, out_channels, 1, stride=stride, norm=norm),
                         _norm_or_identity(norm, out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convs (the first one strided) + shortcut; ResNet-18/34. Input (B, in, H, W) -> (B, out, H/s, W/s)."""

    def __init__(self, *, in_channels: int, out_channels: int, stride: int, norm: str | None):
        super().__init__()
        self.conv1 = _conv(in_channels, out_channels, 3, stride=stride, norm=norm)
        self.norm1 = _norm_or_identity(norm, out_channels)
        self.conv2 = _conv(out_channels, out_channels, 3, norm=norm)
        self.norm2 = _norm_or_identity(norm, out_channels)
        self.downsample = _shortcut(in_channels, out_channels, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)), inplace=True)
        out = self.norm2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity, inplace=True)


class Bottleneck(nn.Module):
    """1x1 -> grouped 3x3 -> 1x1 + shortcut; ResNet-50+ and ResNeXt. (B, in, H, W) -> (B, out, H/s, W/s).

    `stride_in_1x1` puts the stride on conv1 (MSRA/Caffe weights) instead of on the 3x3 conv2 (torchvision, FAIR C2
    and every GN / scratch config, e.g. `mask_rcnn_R_50_FPN_3x_gn.yaml`).
    """

    def __init__(self, *, in_channels: int, width: int, out_channels: int, stride: int, groups: int,
                 stride_in_1x1: bool, norm: str | None):
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = _conv(in_channels, width, 1, stride=stride_1x1, norm=norm)
        self.norm1 = _norm_or_identity(norm, width)
        self.conv2 = _conv(width, width, 3, stride=stride_3x3, groups=groups, norm=norm)  # groups: 3x3 only
        self.norm2 = _norm_or_identity(norm, width)
        self.conv3 = _conv(width, out_channels, 1, norm=norm)
        self.norm3 = _norm_or_identity(norm, out_channels)
        self.downsample = _shortcut(in_channels, out_channels, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)), inplace=True)
        out = F.relu(self.norm2(self.conv2(out)), inplace=True)
        out = self.norm3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity, inplace=True)


class ResNet(nn.Module):
    """ResNet-{18,34,50,101,152} / ResNeXt backbone returning a dict of named feature maps.

    Args (keyword-only):
        depth: 18, 34, 50, 101 or 152.
        groups, width_per_group: bottleneck width at res2 is groups * width_per_group, doubling per stage;
            ResNet = (1, 64), ResNeXt 32x4d = (32, 4), 32x8d = (32, 8). Basic-block depths take groups=1, and
            width_per_group is then the width of the stem and res2 (64 in ResNet-18/34; the CPU demo's half-width
            ResNet-18 uses 32), doubling per stage as usual.
        norm: "BN", "SyncBN", "GN" (32 groups), "FrozenBN", or None / "" (no norm; convs then have a bias).
        stride_in_1x1: Bottleneck stride on the first 1x1 (MSRA weights) instead of the 3x3 (default False).
        freeze_at: 0 = train everything; k >= 1 freezes the stem, k >= 2 also res2, ..., k = 5 also res5.
            Frozen parameters get requires_grad=False and frozen BN/SyncBN layers become FrozenBatchNorm2d
            (detectron2 `ResNet.freeze`). Scratch training must use 0 (Detectron `projects/GN/README.md`: -3.3 AP).
        freeze_norms: frozen stages' norms become FrozenBatchNorm2d (detectron2, default). False only stops their
            gradients (torchvision `_resnet_fpn_extractor`: a BatchNorm there still uses batch statistics in
            training mode).
        out_features: which of "stem", "res2".."res5", "logits" `forward` returns.
        num_classes: builds `fc` (global average pool + linear) for "logits". Required by "logits", and only
            allowed together with it (an fc that never runs would be a dead parameter).
        in_channels: channels of the input image: 3 (RGB), or 1 / 4 for thermal / RGB + thermal input
            (`minimask.data.images.load_frames`); only the stem's conv1 depends on it.

    Attributes:
        out_channels, strides: dict[str, int] for the requested spatial features ("logits" is not spatial and
            appears in neither), in network order (stem, res2, ..., res5) whatever the order of out_features.

    forward(x (B, in_channels, H, W)) -> dict[str, Tensor] in network order: "stem" (B, C_stem, H/4, W/4)
    (C_stem = 64, or a basic-block net's width_per_group); "resK" (B, C_K, H/2^K, W/2^K) with ceil-rounded sizes;
    "logits" (B, num_classes). Works with B == 0 for norms that accept empty batches.
    """

    def __init__(self, *, depth: int = 50, groups: int = 1, width_per_group: int = 64, norm: str | None = "GN",
                 stride_in_1x1: bool = False, freeze_at: int = 0,
                 out_features: tuple[str, ...] | list[str] = ("res2", "res3", "res4", "res5"),
                 num_classes: int | None = None, freeze_norms: bool = True, in_channels: int = 3):
        super().__init__()
        out_features = self._check_args(depth, groups, width_per_group, stride_in_1x1, freeze_at, out_features,
                                         num_classes)
        blocks_per_stage, bottleneck = _DEPTHS[depth]
        self._out_features = out_features

        # Stem: 7x7/2 conv -> norm -> relu -> 3x3/2 max-pool (detectron2 `BasicStem`); output stride 4.
        stem_channels = _STEM_CHANNELS if bottleneck else width_per_group  # 64 unless a narrow basic-block net
        self.conv1 = nn.Conv2d(in_channels, stem_channels, 7, stride=2, padding=3, bias=not norm)
        self.norm1 = _norm_or_identity(norm, stem_channels)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        all_channels, all_strides = {"stem": stem_channels}, {"stem": 4}

        # Build res2 .. the deepest requested stage ("logits" needs all four).
        last = 4 if "logits" in out_features else max(
            (_STAGES.index(f) + 1 for f in out_features if f in _STAGES), default=0)
        in_channels = stem_channels
        width = groups * width_per_group  # bottleneck width at res2
        out_channels = 4 * _STEM_CHANNELS if bottleneck else stem_channels  # res2 output: 256, or 64 for R18/34
        self._stage_names: list[str] = []
        for idx in range(last):
            stride = 1 if idx == 0 else 2  # res2 keeps the stem's stride 4; res3..res5 halve the resolution
            blocks = []
            for b in range(blocks_per_stage[idx]):
                s = stride if b == 0 else 1  # only the first block of a stage is strided
                if bottleneck:
                    blocks.append(Bottleneck(in_channels=in_channels, width=width, out_channels=out_channels,
                                             stride=s, groups=groups, stride_in_1x1=stride_in_1x1, norm=norm))
                else:
                    blocks.append(BasicBlock(in_channels=in_channels, out_channels=out_channels, stride=s,
                                             norm=norm))
                in_channels = out_channels
            self.add_module(f"layer{idx + 1}", nn.Sequential(*blocks))  # torchvision name; Detectron res{idx+2}
            self._stage_names.append(_STAGES[idx])
            all_channels[_STAGES[idx]] = out_channels
            all_strides[_STAGES[idx]] = 4 * 2 ** idx
            width *= 2
            out_channels *= 2

        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(in_channels, num_classes)

        spatial = [f for f in _FEATURES if f in out_features and f != "logits"]  # network order, like forward
        self.out_channels: dict[str, int] = {f: all_channels[f] for f in spatial}
        self.strides: dict[str, int] = {f: all_strides[f] for f in spatial}

        self._init_weights()
        self._freeze(freeze_at, freeze_norms)

    @staticmethod
    def _check_args(depth, groups, width_per_group, stride_in_1x1, freeze_at, out_features, num_classes):
        if depth not in _DEPTHS:
            raise ValueError(f"depth must be one of {sorted(_DEPTHS)}, got {depth!r}")
        for name, value in (("groups", groups), ("width_per_group", width_per_group)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not _DEPTHS[depth][1]:
            # BasicBlocks have no grouped conv (torchvision rejects the same); width_per_group sets their width.
            if groups != 1:
                raise ValueError(f"depth {depth} uses BasicBlocks, which need groups=1, got groups={groups!r}")
            if stride_in_1x1:
                raise ValueError(f"stride_in_1x1=True only applies to Bottleneck depths (50+), got depth {depth}")
        if not isinstance(freeze_at, int) or isinstance(freeze_at, bool) or not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at must be an int in [0, 5], got {freeze_at!r}")
        if isinstance(out_features, str):
            raise ValueError(f"out_features must be a list/tuple of names, got the string {out_features!r}")
        out_features = tuple(out_features)
        if not out_features:
            raise ValueError("out_features must name at least one output")
        for f in out_features:
            if f not in _FEATURES:
                raise ValueError(f"unknown out_features name {f!r}; valid names are {list(_FEATURES)}")
        if len(set(out_features)) != len(out_features):
            raise ValueError(f"out_features has duplicates: {list(out_features)}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        if ("logits" in out_features) != (num_classes is not None):
            raise ValueError(f"'logits' in out_features and num_classes go together; got out_features="
                             f"{list(out_features)}, num_classes={num_classes!r}")
        return out_features

    def _init_weights(self) -> None:
        """Scratch init as in detectron2 (`modeling/backbone/resnet.py`)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                c2_msra_fill(m)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):  # SyncBatchNorm is a BatchNorm subclass
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            # No zero-init of the last norm's gamma in each block ("zero_init_residual"): detectron2 comments it
            # out because it "somehow hurts performance when training GN models from scratch" (resnet.py).
        if hasattr(self, "fc"):
            # detectron2's ResNet classifier init (resnet.py): weight normal(std=0.01), bias 0.
            nn.init.normal_(self.fc.weight, std=0.01)
            nn.init.zeros_(self.fc.bias)

    def _freeze(self, freeze_at: int, freeze_norms: bool = True) -> None:
        """Freeze the stem (freeze_at >= 1) and res2..res_{freeze_at}; detectron2 `ResNet.freeze` semantics."""
        convert = FrozenBatchNorm2d.convert_frozen_batchnorm if freeze_norms else (lambda module: module)
        if freeze_at >= 1:
            self.norm1 = convert(self.norm1)
            for p in (*self.conv1.parameters(), *self.norm1.parameters()):
                p.requires_grad_(False)
        for idx in range(1, min(freeze_at, len(self._stage_names) + 1)):
            name = f"layer{idx}"
            stage = convert(getattr(self, name))
            setattr(self, name, stage)
            for p in stage.parameters():
                p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.conv1.in_channels
        if x.dim() != 4 or x.shape[1] != c:
            raise ValueError(f"ResNet expects images of shape (B, {c}, H, W), got {tuple(x.shape)}")
        outputs = {}
        x = self.maxpool(F.relu(self.norm1(self.conv1(x)), inplace=True))  # (B, C_stem, H/4, W/4)
        if "stem" in self._out_features:
            outputs["stem"] = x
        for idx, name in enumerate(self._stage_names):
            x = getattr(self, f"layer{idx + 1}")(x)  # (B, C_k, H/2^k, W/2^k)
            if name in self._out_features:
                outputs[name] = x
        if "logits" in self._out_features:
            outputs["logits"] = self.fc(torch.flatten(self.avgpool(x), 1))  # (B, num_classes)
        return outputs
