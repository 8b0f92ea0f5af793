"""Feature Pyramid Network (Lin et al. 2017, "Feature Pyramid Networks for Object Detection"), as configured in
detectron2 (`modeling/backbone/fpn.py` `FPN`, `LastLevelMaxPool`; `configs/Base-RCNN-FPN.yaml`) for Mask R-CNN.

    C2..C5 (strides 4..32) --lateral 1x1--> top-down: nearest 2x upsample + sum --3x3 output conv--> P2..P5
    P6 = P5 subsampled by 2 (max-pool, kernel 1, stride 2; used only by the RPN, Sec. 4.1 of FPN)

Interface: lists, finest level first. `forward([C2, C3, C4, C5]) -> [P2, P3, P4, P5, P6]`, every P with
`out_channels` channels, at `strides` = [4, 8, 16, 32, 64]. There is no activation anywhere in the FPN.

Size contract: the top-down path upsamples with scale_factor=2 (detectron2), so each input level must be exactly
twice the next coarser one: C_k has size (2 * h_{k+1}, 2 * w_{k+1}). A ResNet gives this whenever the image is
a multiple of 32 (its largest stride), which is why the model zero-pads the batch to a multiple of 32
(detectron2 `preprocess_image`). Other sizes raise a ValueError rather than being silently resized.
"""
import torch
import torch.nn.functional as F
from torch import nn

from minimask.model.norm import get_norm
from minimask.model.weight_init import c2_xavier_fill

_STRIDES = [4, 8, 16, 32, 64]  # P2..P6


def _conv_norm(in_channels: int, out_channels: int, kernel_size: int, norm: str | None) -> tuple[nn.Conv2d, nn.Module]:
    # A normed conv has no bias: the norm's shift makes it redundant (detectron2 convention).
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not norm)
    c2_xavier_fill(conv)  # detectron2 FPN
    layer = get_norm(norm, out_channels)
    return conv, (nn.Identity() if layer is None else layer)  # Identity keeps the module lists aligned


class FPN(nn.Module):
    """Top-down feature pyramid over four backbone levels.

    Args (keyword-only):
        in_channels: channels of C2, C3, C4, C5 (finest first), e.g. ResNet-50's [256, 512, 1024, 2048].
        out_channels: channels of every output level (detectron2 FPN.OUT_CHANNELS = 256).
        norm: None / "" (convs with bias), or a `get_norm` name ("GN", "SyncBN", ...) applied after both the
            lateral and the output convs (GN / SyncBN models; detectron2 `mask_rcnn_R_50_FPN_3x_gn.yaml` FPN.NORM).

    Attributes:
        out_channels (int), strides (list[int] = [4, 8, 16, 32, 64] for P2..P6).
        lateral_convs / lateral_norms, output_convs / output_norms: nn.ModuleList, finest level first (norms are
            nn.Identity without a norm).

    forward(features: list of 4 tensors (B, in_channels[k], H_k, W_k), H_k = 2 * H_{k+1}, W_k = 2 * W_{k+1})
        -> list of 5 tensors (B, out_channels, H_k, W_k) for P2..P5, then P6 of size ceil(H_5 / 2), ceil(W_5 / 2).
    """

    def __init__(self, *, in_channels: list[int], out_channels: int = 256, norm: str | None = None):
        super().__init__()
        in_channels = list(in_channels)
        if len(in_channels) != 4:
            raise ValueError(f"FPN takes C2..C5, so in_channels needs 4 entries; got {in_channels}")
        for c in (*in_channels, out_channels):
            if not isinstance(c, int) or isinstance(c, bool) or c < 1:
                raise ValueError(f"channel counts must be positive ints; got in_channels={in_channels}, "
                                 f"out_channels={out_channels!r}")
        self.in_channels = in_channels
        self.out_channels: int = out_channels
        self.strides: list[int] = list(_STRIDES)
        self.lateral_convs, self.lateral_norms = nn.ModuleList(), nn.ModuleList()
        self.output_convs, self.output_norms = nn.ModuleList(), nn.ModuleList()
        for c in in_channels:
            conv, nrm = _conv_norm(c, out_channels, 1, norm)  # lateral 1x1 (Sec. 3 of FPN)
            self.lateral_convs.append(conv)
            self.lateral_norms.append(nrm)
            conv, nrm = _conv_norm(out_channels, out_channels, 3, norm)  # 3x3 output conv against aliasing
            self.output_convs.append(conv)
            self.output_norms.append(nrm)

    def _check(self, features: list[torch.Tensor]) -> None:
        if len(features) != len(self.in_channels):
            raise ValueError(f"FPN expects {len(self.in_channels)} feature maps (C2..C5), got {len(features)}")
        for k, (f, c) in enumerate(zip(features, self.in_channels)):
            if f.dim() != 4 or f.shape[1] != c:
                raise ValueError(f"feature {k} (C{k + 2}) must be (B, {c}, H, W), got {tuple(f.shape)}")
        for k in range(len(features) - 1):
            fine, coarse = features[k].shape, features[k + 1].shape
            if fine[0] != coarse[0] or fine[2] != 2 * coarse[2] or fine[3] != 2 * coarse[3]:
                raise ValueError(
                    f"C{k + 2} {tuple(fine)} must be exactly twice C{k + 3} {tuple(coarse)} in H and W with the "
                    "same batch size (pad the images to a multiple of 32)")

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        self._check(features)  # shape-only checks: no device sync
        results = []
        top_down = None
        # Coarsest first: C5 starts the top-down path (Fig. 3 of FPN).
        for k in range(len(features) - 1, -1, -1):
            lateral = self.lateral_norms[k](self.lateral_convs[k](features[k]))  # (B, out, H_k, W_k)
            if top_down is None:
                top_down = lateral
            else:
                # Nearest-neighbour 2x upsample + element-wise sum (Sec. 3 of FPN; detectron2 fuse_type "sum").
                top_down = lateral + F.interpolate(top_down, scale_factor=2.0, mode="nearest")
            results.append(self.output_norms[k](self.output_convs[k](top_down)))  # (B, out, H_k, W_k)
        results.reverse()  # P2..P5, finest first
        # P6: stride-2 subsampling of P5 (detectron2 LastLevelMaxPool; Sec. 4.1 of FPN: only for the RPN).
        results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return results
