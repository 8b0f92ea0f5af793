"""The box coder: boxes <-> regression deltas (Sec. 3.1.2 of Faster R-CNN, Eqn. 2), and the regression loss on
those deltas that the RPN and the box head share (as detectron2's `modeling/box_regression.py`).

A reference box (an anchor or a proposal) with centre (px, py) and size (pw, ph) is moved onto a target box
(gx, gy, gw, gh) by the deltas

    dx = wx * (gx - px) / pw      dw = ww * log(gw / pw)
    dy = wy * (gy - py) / ph      dh = wh * log(gh / ph)

with per-coordinate weights (wx, wy, ww, wh): (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the box head, which
scales the deltas of well-overlapping proposals to roughly unit variance. Widths are x2 - x1 with no "+1".

Invariant: decode(encode(targets, boxes, w), boxes, w) == targets (up to rounding) for boxes of positive size,
as long as |dw|, |dh| stay below the decode clamp.

The loss (`box_regression_loss`): detectron2 uses plain L1 for both heads (SMOOTH_L1_BETA = 0.0 in
`config/defaults.py`); Detectron and torchvision used smooth-L1 with beta 1/9 (RPN) and 1 (box head; torchvision
`rpn.py`, `roi_heads.py`).
"""
import math

import torch
from torch import Tensor

# Largest dw/dh accepted when decoding: a box may grow at most 1000/16 times in one step. Without the clamp an
# early, untrained regressor can produce exp() overflow and Inf boxes (detectron2 / Detectron value).
SCALE_CLAMP = math.log(1000.0 / 16)


def _centers_and_sizes(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights, widths, heights


def encode(targets: Tensor, boxes: Tensor, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Deltas that take `boxes` onto `targets`; (N, 4), (N, 4) -> (N, 4), computed in fp32 (fp64 if either is).

    `boxes` must have positive width and height (anchors and proposals do); targets may be anything finite with
    positive size.
    """
    if targets.shape != boxes.shape or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"targets and boxes must both be (N, 4), got {tuple(targets.shape)} and {tuple(boxes.shape)}")
    dtype = torch.promote_types(torch.promote_types(boxes.dtype, targets.dtype), torch.float32)
    px, py, pw, ph = _centers_and_sizes(boxes.to(dtype))
    gx, gy, gw, gh = _centers_and_sizes(targets.to(dtype))
    wx, wy, ww, wh = weights
    return torch.stack(
        (wx * (gx - px) / pw, wy * (gy - py) / ph, ww * torch.log(gw / pw), wh * torch.log(gh / ph)), dim=1
    )  # (N, 4)


def decode(
    deltas: Tensor,
    boxes: Tensor,
    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
    scale_clamp: float = SCALE_CLAMP,
) -> Tensor:
    """Apply deltas to boxes; deltas (N, 4k) (k boxes per row, e.g. one per class), boxes (N, 4) -> (N, 4k).

    Decoding runs in fp32 even for fp16/bf16 deltas (exp() of half-precision deltas loses too much), and dw/dh are
    clamped to `scale_clamp` from above.
    """
    if deltas.dim() != 2 or deltas.shape[1] % 4 != 0:
        raise ValueError(f"deltas must have shape (N, 4k), got {tuple(deltas.shape)}")
    if boxes.dim() != 2 or boxes.shape[1] != 4 or boxes.shape[0] != deltas.shape[0]:
        raise ValueError(f"boxes must have shape ({deltas.shape[0]}, 4) to match deltas, got {tuple(boxes.shape)}")
    dtype = torch.promote_types(deltas.dtype, torch.float32)
    deltas = deltas.to(dtype)
    px, py, pw, ph = (t[:, None] for t in _centers_and_sizes(boxes.to(dtype)))  # each (N, 1)
    wx, wy, ww, wh = weights
    dx = deltas[:, 0::4] / wx  # (N, k)
    dy = deltas[:, 1::4] / wy
    dw = (deltas[:, 2::4] / ww).clamp(max=scale_clamp)
    dh = (deltas[:, 3::4] / wh).clamp(max=scale_clamp)
    cx, cy = dx * pw + px, dy * ph + py  # (N, k)
    w, h = torch.exp(dw) * pw, torch.exp(dh) * ph  # (N, k)
    decoded = torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=2)  # (N, k, 4)
    return decoded.reshape(deltas.shape)  # (N, 4k)


_LOSS_TYPES = ("l1", "smooth_l1")


def box_regression_loss(pred: Tensor, target: Tensor, loss_type: str = "l1", beta: float = 0.0) -> Tensor:
    """Summed (not averaged) regression loss between predicted and target deltas; callers normalise.

    Args:
        pred, target: deltas of the same shape, e.g. (P, 4); target carries no gradient.
        loss_type: "l1": sum |x|; "smooth_l1": sum of 0.5 x^2 / beta where |x| < beta, |x| - 0.5 beta elsewhere,
            with x = pred - target (Eqn. 3 of Fast R-CNN with a transition point beta).
        beta: smooth-L1 transition point (>= 0). Below 1e-5 smooth-L1 is computed as L1 (detectron2 convention: it
            avoids the 0/0 of beta = 0 and they coincide in the limit).

    Returns:
        A 0-dim tensor in pred's dtype (at least fp32). For empty inputs it is exactly 0 and still part of the
        autograd graph of `pred`, so every parameter that produced `pred` receives a (zero) gradient.
    """
    if loss_type not in _LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {_LOSS_TYPES}, got {loss_type!r}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    dtype = torch.promote_types(pred.dtype, torch.float32)
    diff = (pred.to(dtype) - target.to(dtype)).abs()
    if loss_type == "l1" or beta < 1e-5:
        return diff.sum()
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta).sum()
