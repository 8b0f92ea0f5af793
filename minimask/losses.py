"""Box regression losses shared by the RPN (Sec. 3.1.2 of Faster R-CNN) and the box head (Sec. 2 of Fast R-CNN).

detectron2 uses plain L1 for both (SMOOTH_L1_BETA = 0.0); Detectron and torchvision used smooth-L1 with beta 1/9
(RPN) and 1 (box head). See the reference spec, sections 3.4 and 4.4.
"""
import torch
from torch import Tensor

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
