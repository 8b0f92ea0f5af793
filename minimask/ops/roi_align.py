"""RoIAlign (Mask R-CNN, He et al. 2017, Sec. 3 "RoIAlign", Fig. 3) in plain PyTorch tensor ops.

RoIAlign pools a fixed oh x ow grid of features from each box without rounding anything: the box is divided into
oh x ow bins, each bin is sampled at a regular grid of points, each point's value is read from the feature map by
bilinear interpolation of its four nearest cells, and a bin's output is the mean of its samples.
`roi_align_reference` is that definition, written sample by sample. Same signature and numbers as
`torchvision.ops.roi_align` (the detectron2 / Caffe2 kernel):

* The box is scaled by `spatial_scale`; with `aligned=True` it is also shifted by -0.5 (pixel-centre model,
  detectron2 "ROIAlignV2") and its size is not clamped; with `aligned=False` the RoI width/height is clamped to >= 1.
* Bin (ph, pw) averages grid_h x grid_w bilinear samples at y = y0 + ph*bin_h + (iy + .5)*bin_h/grid_h (x likewise);
  grid = sampling_ratio if > 0, else ceil(roi_h / oh) x ceil(roi_w / ow) per RoI ("adaptive"); count = max(gh*gw, 1).
* A sample with y < -1, y > H, x < -1 or x > W contributes 0; otherwise y <= 0 becomes 0 and a sample in the last
  row/column reads that row/column only (the kernel's y_low >= H-1 case).

`roi_align`, which the model calls, computes exactly this as sparse matrix products (`roi_align_sparse`, 8-30x faster
than torchvision's compiled CPU kernel, BENCHMARKS.md); tests/test_roi_align.py checks the two against each other.
"""
import itertools
import math

import torch
from torch import Tensor

from minimask.ops.roi_align_sparse import roi_align_sparse


def roi_align(input: Tensor, boxes, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
              aligned: bool = False) -> Tensor:
    """Pool a (oh, ow) feature grid from each box (torchvision.ops.roi_align semantics, see module docstring).

    Args:
        input: (N, C, H, W) float16/bfloat16/float32/float64 feature map, on any device.
        boxes: Tensor (K, 5) of (batch_index, x1, y1, x2, y2), or a list of N tensors (L_i, 4) of x1 y1 x2 y2
            (then K = sum L_i, in list order). Coordinates are in input-image pixels; `spatial_scale` maps them onto
            the map. Box gradients are not computed.
        output_size: int or (oh, ow).
        spatial_scale: feature-map size / image size, e.g. 1/4 for a stride-4 map.
        sampling_ratio: samples per bin along each axis if > 0; <= 0 means adaptive ceil(roi_size / output_size).
        aligned: detectron2 ROIAlignV2 half-pixel shift (True) or the original Mask R-CNN RoIAlign (False).

    Returns:
        (K, C, oh, ow) tensor of `input`'s dtype. Computation and accumulation are in float32 (float64 for float64
        input). Differentiable w.r.t. `input`. K == 0, N == 0 (with no boxes), H == 0 or W == 0 give zeros.

    Notes:
        A box with a NaN coordinate gives an all-zero output and no gradient (every sample of it counts as outside
        the map; torchvision's kernel has undefined behaviour there); in adaptive mode a box of infinite size does
        too. Samples outside the map read no feature at all (as in torchvision's CUDA kernel; its CPU kernel
        multiplies pixel (0, 0) by 0 for them, so a non-finite value there would leak). Batch indices are truncated
        to integers and clamped into [0, N-1] (no device sync to check them). With sampling_ratio > 0 there is no
        host-device synchronisation; adaptive mode reads the grid and window sizes of the RoIs to the host once per
        call, since it must size its temporaries from them. Double backward is not supported. As in the reference
        kernel, the work grows with the number of samples (huge boxes in adaptive mode are expensive); the gathered
        temporaries are bounded per chunk of RoIs (`minimask.ops.roi_align_sparse`).
    """
    if not isinstance(input, Tensor) or input.dim() != 4:
        raise ValueError(f"roi_align: input must be a 4-D (N, C, H, W) tensor, got "
                         f"{tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__}")
    if not input.is_floating_point():
        raise ValueError(f"roi_align: input must be floating point, got {input.dtype}")
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if not (isinstance(oh, int) and isinstance(ow, int) and oh > 0 and ow > 0):
        raise ValueError(f"roi_align: output_size must be a positive int or a pair of them, got {output_size}")
    return roi_align_sparse([input], as_rois(boxes, input), None, [spatial_scale], (oh, ow), sampling_ratio, aligned)


def roi_align_reference(input: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float = 1.0,
                        sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """RoIAlign by its definition, one bin and one sample at a time (slow: the test oracle of `roi_align`).

    input (N, C, H, W); rois (K, 5) of (batch_index, x1, y1, x2, y2) with finite coordinates. Returns
    (K, C, oh, ow) in input's dtype, differentiable w.r.t. input through autograd.
    """
    oh, ow = output_size
    out = input.new_zeros(len(rois), input.shape[1], oh, ow)
    offset = 0.5 if aligned else 0.0  # ROIAlignV2: pixel (i, j) has its centre at (i + 0.5, j + 0.5)
    for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        x1, y1, x2, y2 = (v * spatial_scale - offset for v in (x1, y1, x2, y2))
        roi_h, roi_w = y2 - y1, x2 - x1
        if not aligned:  # the original RoIAlign makes every RoI at least 1 x 1
            roi_h, roi_w = max(roi_h, 1.0), max(roi_w, 1.0)
        bin_h, bin_w = roi_h / oh, roi_w / ow
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / oh)  # samples per bin and axis
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / ow)
        for ph, pw in itertools.product(range(oh), range(ow)):
            samples = [bilinear(input[int(b)], y1 + ph * bin_h + (iy + 0.5) * bin_h / grid_h,
                                x1 + pw * bin_w + (ix + 0.5) * bin_w / grid_w)
                       for iy, ix in itertools.product(range(grid_h), range(grid_w))]
            out[k, :, ph, pw] = sum(samples, input.new_zeros(input.shape[1])) / max(grid_h * grid_w, 1)
    return out


def bilinear(feature: Tensor, y: float, x: float) -> Tensor:
    """The (C,) value of `feature` (C, H, W) at the continuous point (y, x), from its four nearest cells, with the
    reference kernel's edge rules: 0 beyond one cell outside the map, clamped to the border row/column inside it."""
    _, h, w = feature.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return feature.new_zeros(feature.shape[0])
    y, x = min(max(y, 0.0), h - 1), min(max(x, 0.0), w - 1)
    y0, x0 = int(y), int(x)
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    dy, dx = y - y0, x - x0
    return ((1 - dy) * (1 - dx) * feature[:, y0, x0] + (1 - dy) * dx * feature[:, y0, x1]
            + dy * (1 - dx) * feature[:, y1, x0] + dy * dx * feature[:, y1, x1])


def as_rois(boxes, input: Tensor) -> Tensor:
    """Validate `boxes` and return them as a (K, 5) tensor (batch_index, x1, y1, x2, y2) on input's device."""
    n = input.shape[0]
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"roi_align: a boxes tensor must be (K, 5) = (batch_index, x1, y1, x2, y2), "
                             f"got {tuple(boxes.shape)}")
        rois = boxes
    elif isinstance(boxes, (list, tuple)):
        if len(boxes) != n:
            raise ValueError(f"roi_align: got {len(boxes)} box tensors for a batch of {n} images")
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
                raise ValueError(f"roi_align: boxes[{i}] must be an (L, 4) tensor, got "
                                 f"{tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__}")
        if n == 0:
            return torch.zeros((0, 5), dtype=input.dtype, device=input.device)
        dtype = boxes[0].dtype if boxes[0].is_floating_point() else torch.float32
        ids = [torch.full((len(b), 1), i, dtype=dtype, device=input.device) for i, b in enumerate(boxes)]
        rois = torch.cat([torch.cat(ids), torch.cat([b.to(input.device, dtype) for b in boxes])], dim=1)  # (K, 5)
    else:
        raise ValueError(f"roi_align: boxes must be a (K, 5) tensor or a list of (L, 4) tensors, "
                         f"got {type(boxes).__name__}")
    if rois.device != input.device:
        raise ValueError(f"roi_align: boxes are on {rois.device} but input is on {input.device}")
    if n == 0 and rois.shape[0] > 0:
        raise ValueError(f"roi_align: {rois.shape[0]} boxes given for an empty batch (N == 0)")
    return rois
