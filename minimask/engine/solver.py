"""Optimizer, learning-rate schedule and gradient clipping for training.

"Rethinking ImageNet Pre-training" (He, Girshick, Dollar 2019), Sec. 4 ("Experimental Settings"): SGD following
Detectron, batch 16, base LR 0.02, momentum 0.9, weight decay 1e-4, linear warm-up, and the LR reduced by 10x in
the last 60k and the last 20k iterations *whatever the schedule length* (2x = 180k, 3x = 270k, 6x = 540k,
9x = 810k iterations). Shorter schedules (1x = 90k: 60k, 80k) scale the 60/90 and 80/90 points proportionally
(detectron2 `configs/common/coco_schedule.py`, `default_X_scheduler`).

- `lr_at`: detectron2's `WarmupMultiStepLR` as a pure function of the iteration (no scheduler object, so resuming
  from a checkpoint needs only the iteration number): linear warm-up factor
  `warmup_factor * (1 - t / W) + t / W` for t < W (detectron2 `solver/lr_scheduler.py`), times
  `gamma ** (number of steps <= iteration)`.
- `build_optimizer`: SGD with no weight decay on normalization parameters (detectron2 `WEIGHT_DECAY_NORM = 0.0`,
  Detectron `WEIGHT_DECAY_GN = 0.0`); biases keep the normal weight decay (detectron2 `WEIGHT_DECAY_BIAS`
  defaults to `WEIGHT_DECAY`).
- `scaled_lr`: the linear scaling rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD"), e.g. batch 2 on one
  GPU -> 0.02 * 2 / 16 = 0.0025.
- `clip_grad_norm`: global L2-norm clipping; off in the paper's recipe (detectron2 `CLIP_GRADIENTS.ENABLED False`),
  available for debugging unstable runs.
"""
from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Iterable

import torch
from torch import nn

from minimask.model.norm import SyncBatchNorm

# Schedule name -> max_iter at batch 16 (1x = 90k: detectron2 `configs/common/coco_schedule.py`).
SCHEDULES = {"1x": 90_000, "2x": 180_000, "3x": 270_000, "6x": 540_000, "9x": 810_000}

# Modules whose parameters (the affine gamma/beta) get `weight_decay_norm`. FrozenBatchNorm2d has no parameters.
# SyncBatchNorm subclasses nn.BatchNorm2d; it is listed to make the contract explicit.
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, SyncBatchNorm)


def _is_int(x) -> bool:
    """True for python/numpy integers, False for bools and floats (1.0 is not an iteration count)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def lr_steps(max_iter: int) -> tuple[int, int]:
    """The two LR-drop iterations for a schedule of `max_iter` iterations (batch 16).

    max_iter >= 180k (2x and longer): the last 60k and the last 20k (Sec. 4 of the paper), e.g. 270k -> (210k, 250k).
    Shorter: scaled as the 1x schedule, round(max_iter * 60/90) and round(max_iter * 80/90), e.g. 90k -> (60k, 80k),
    1000 -> (667, 889). Both formulas agree at 180k. Raises ValueError for max_iter < 1.
    """
    if not _is_int(max_iter) or max_iter < 1:
        raise ValueError(f"lr_steps: max_iter must be a positive int, got {max_iter!r}")
    max_iter = int(max_iter)
    if max_iter >= 180_000:
        return (max_iter - 60_000, max_iter - 20_000)
    # Integer rounding (half up) so that the result is exact, not subject to float error.
    return ((max_iter * 60 + 45) // 90, (max_iter * 80 + 45) // 90)


def _check_schedule(base_lr, max_iter, steps, gamma, warmup_iters, warmup_factor) -> None:
    if not base_lr >= 0:
        raise ValueError(f"lr_at: base_lr must be >= 0, got {base_lr!r}")
    if not _is_int(max_iter) or max_iter < 1:
        raise ValueError(f"lr_at: max_iter must be a positive int, got {max_iter!r}")
    steps = tuple(steps)
    if not all(_is_int(s) for s in steps):
        raise ValueError(f"lr_at: steps must be ints, got {steps!r}")
    if any(b < a for a, b in zip(steps, steps[1:])):  # equal steps drop twice there (a run of 1 to 2 iterations)
        raise ValueError(f"lr_at: steps must be non-decreasing, got {steps!r}")
    if steps and (steps[0] < 1 or steps[-1] > max_iter):
        raise ValueError(f"lr_at: steps must lie in [1, max_iter={max_iter}], got {steps!r}")
    if not 0 < gamma <= 1:
        raise ValueError(f"lr_at: gamma must be in (0, 1], got {gamma!r}")
    if not _is_int(warmup_iters) or warmup_iters < 0:
        raise ValueError(f"lr_at: warmup_iters must be an int >= 0, got {warmup_iters!r}")
    if not 0 < warmup_factor <= 1:
        raise ValueError(f"lr_at: warmup_factor must be in (0, 1], got {warmup_factor!r}")


def lr_at(
    iteration: int,
    *,
    base_lr: float,
    max_iter: int,
    steps: Iterable[int],
    gamma: float = 0.1,
    warmup_iters: int = 1000,
    warmup_factor: float = 0.001,
) -> float:
    """Learning rate for (0-based) `iteration`: a pure function of its arguments.

    lr = base_lr * gamma ** k * w, where k = number of steps s with s <= iteration (so the LR is already reduced AT
    iteration s; detectron2's `bisect_right`), and the warm-up factor is
    w = warmup_factor * (1 - t / W) + t / W for t = iteration < W, else 1 (detectron2 "linear" warm-up, so
    w(0) = warmup_factor and w -> 1 at t = W). W = min(warmup_iters, max_iter // 10): warm-up never takes more than
    a tenth of a short debugging schedule. Iterations past max_iter keep the final LR.

    Raises ValueError for iteration < 0, max_iter < 1, steps decreasing or outside [1, max_iter],
    gamma outside (0, 1], warmup_iters < 0, warmup_factor outside (0, 1], base_lr < 0.
    """
    _check_schedule(base_lr, max_iter, steps, gamma, warmup_iters, warmup_factor)
    if not _is_int(iteration) or iteration < 0:
        raise ValueError(f"lr_at: iteration must be an int >= 0, got {iteration!r}")
    num_drops = bisect.bisect_right(tuple(steps), iteration)  # detectron2 convention: steps s <= iteration count
    return float(base_lr * gamma**num_drops * _warmup(iteration, max_iter, warmup_iters, warmup_factor))


def _warmup(iteration: int, max_iter: int, warmup_iters: int, warmup_factor: float) -> float:
    """The linear warm-up factor w of `lr_at`'s docstring (detectron2 `_get_warmup_factor_at_iter`, "linear")."""
    warmup = min(warmup_iters, max_iter // 10)
    if iteration >= warmup:
        return 1.0
    alpha = iteration / warmup
    return warmup_factor * (1 - alpha) + alpha


def cosine_lr_at(iteration: int, *, base_lr: float, max_iter: int, warmup_iters: int = 0,
                 warmup_factor: float = 0.001) -> float:
    """Cosine schedule without restarts (Loshchilov & Hutter, "SGDR", ICLR 2017, Eqn. 5 with one cycle), as MoCo
    v2 pre-trains (its `main_moco.py --cos`): lr = base_lr * (1 + cos(pi * t / max_iter)) / 2, after the linear
    warm-up of `lr_at` (at most a tenth of the run). Iterations past max_iter keep the final LR (0)."""
    _check_schedule(base_lr, max_iter, (), 0.1, warmup_iters, warmup_factor)
    if not _is_int(iteration) or iteration < 0:
        raise ValueError(f"cosine_lr_at: iteration must be an int >= 0, got {iteration!r}")
    lr = base_lr * 0.5 * (1.0 + math.cos(math.pi * min(iteration, max_iter) / max_iter))
    return float(lr * _warmup(iteration, max_iter, warmup_iters, warmup_factor))


def scaled_lr(base_lr: float, batch_size: int, reference_batch: int = 16) -> float:
    """Linear scaling rule (Goyal et al. 2017): base_lr is the LR at `reference_batch` images per iteration.

    Returns base_lr * batch_size / reference_batch. Raises ValueError for base_lr < 0 or non-positive batch sizes.
    """
    if not base_lr >= 0:
        raise ValueError(f"scaled_lr: base_lr must be >= 0, got {base_lr!r}")
    if batch_size < 1 or reference_batch < 1:
        raise ValueError(f"scaled_lr: batch sizes must be >= 1, got batch_size={batch_size!r}, "
                         f"reference_batch={reference_batch!r}")
    return float(base_lr) * batch_size / reference_batch


def training_lr(lr: float, base_lr: float, batch_size: int) -> float:
    """The learning rate a run trains at: `lr` when it is set (> 0), else `base_lr`, which is given at batch 16,
    scaled linearly to `batch_size` (`scaled_lr`). train.py uses it for solver.lr / solver.base_lr; the preset tests
    check its result against each preset's source (detectron2's BASE_LR at its IMS_PER_BATCH)."""
    return float(lr) if lr > 0 else scaled_lr(base_lr, batch_size)


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    weight_decay_norm: float = 0.0,
) -> torch.optim.SGD:
    """SGD over the trainable parameters of `model`, without weight decay on normalization parameters.

    Two parameter groups, in this order, each omitted when empty: the parameters of `NORM_TYPES` modules
    (BatchNorm*, SyncBatchNorm, GroupNorm, LayerNorm) with `weight_decay_norm`, then every other parameter with
    `weight_decay`. Every parameter with requires_grad=True appears exactly once (shared parameters are
    deduplicated); frozen parameters (requires_grad=False, e.g. a frozen stem) are left out. The order within a
    group follows `model.named_modules()`, so it is deterministic and optimizer state dicts can be resumed.
    The trainer sets `group["lr"] = lr_at(...)` for every group each iteration. Build it after moving the model to
    its device: it uses torch's fused SGD kernel where the parameters' device has one (the same update, several
    times faster than the per-parameter loop on a CPU), else the default implementation.
    Raises ValueError when the model has no trainable parameter or for negative hyper-parameters.
    """
    if not lr >= 0 or not momentum >= 0 or not weight_decay >= 0 or not weight_decay_norm >= 0:
        raise ValueError(f"build_optimizer: lr, momentum and weight decays must be >= 0, got lr={lr!r}, "
                         f"momentum={momentum!r}, weight_decay={weight_decay!r}, "
                         f"weight_decay_norm={weight_decay_norm!r}")
    norm_params: list[nn.Parameter] = []
    other_params: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, NORM_TYPES)
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (norm_params if is_norm else other_params).append(param)
    groups = []
    if norm_params:
        groups.append({"params": norm_params, "weight_decay": weight_decay_norm})
    if other_params:
        groups.append({"params": other_params, "weight_decay": weight_decay})
    if not groups:
        raise ValueError("build_optimizer: the model has no parameter with requires_grad=True")
    try:
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=True)
    except RuntimeError:  # no fused kernel for this device or dtype
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the `.grad` of `params` together (those without a gradient are skipped), in fp32 (at
    least), as a 0-dim tensor on the gradients' device (0. when there is none); non-finite when any gradient is.
    No host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    # One multi-tensor kernel for the per-tensor norms (as torch.nn.utils.clip_grad_norm_), not one per parameter.
    per_tensor = torch.stack(torch._foreach_norm([g.detach() for g in grads], 2.0)).float()  # (P,)
    return per_tensor.norm(2)  # () the global norm is the norm of the per-tensor norms


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, total: torch.Tensor | None = None) -> torch.Tensor:
    """Scale gradients in place so that their global L2 norm is at most `max_norm`; returns the norm before clipping.

    The norm is `grad_norm(params)`, or `total` when the caller already computed it. No host sync: the scale
    min(1, max_norm / (norm + 1e-6)) is applied as a tensor. Raises ValueError for max_norm <= 0.
    """
    if not max_norm > 0:
        raise ValueError(f"clip_grad_norm: max_norm must be > 0, got {max_norm!r}")
    params = [p for p in params if p.grad is not None]
    total = grad_norm(params) if total is None else total
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # () 1e-6 as torch.nn.utils.clip_grad_norm_
    if params:
        torch._foreach_mul_([p.grad.detach() for p in params], scale.to(device=params[0].grad.device))
    return total
