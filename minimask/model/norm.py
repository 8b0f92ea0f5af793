"""Normalization layers and the one name -> layer switch (`get_norm`).

"Rethinking ImageNet Pre-training" (He, Girshick, Dollar 2019), Sec. 3 ("Normalization"): training from scratch
needs normalization that works with the small per-GPU batches of detection (2 images per GPU). The paper uses
Group Normalization (Wu & He 2018) or Synchronized Batch Normalization (Peng et al. 2018, "MegDet") in the
backbone, the FPN and the heads. Fine-tuning from ImageNet weights instead uses "frozen" BN, an affine transform
with fixed statistics (Sec. 3, "frozen BN"; detectron2 `layers/batch_norm.py`).

- `FrozenBatchNorm2d`: y = x * scale + shift with fixed buffers; no parameters.
- `SyncBatchNorm`: BatchNorm2d whose training statistics are computed over the batch of *all* processes, written
  on `torch.distributed.all_reduce` (it does not use `torch.nn.SyncBatchNorm`).
- GroupNorm: `nn.GroupNorm(32, C, eps=1e-5)` (Sec. 3 of the paper; detectron2 `get_norm("GN")`).
- `get_norm(name, num_channels)`: the only name -> class lookup in minimask.

"Precise BN", the statistics BatchNorm layers are evaluated with, is a training procedure:
`minimask/engine/precise_bn.py`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

# Sec. 3 of the paper / Wu & He 2018: 32 groups; detectron2 and Detectron use the same value (eps 1e-5).
GN_NUM_GROUPS = 32

VALID_NORMS = ("BN", "SyncBN", "GN", "FrozenBN", "")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters: y = x * scale + shift.

    scale = weight / sqrt(running_var + eps) and shift = bias - running_mean * scale, broadcast over (N, C, H, W).
    weight, bias, running_mean and running_var are buffers (saved in the state dict, never trained), so the layer
    has no parameters. In fp16/bf16, scale and shift are computed in the buffers' dtype and cast to the input dtype,
    so the output has the input's dtype. A state dict saved from an `nn.BatchNorm2d` loads directly (its
    `num_batches_tracked` entry is ignored). Works on empty inputs (N = 0).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(
                f"FrozenBatchNorm2d expects input (N, {self.num_features}, H, W), got shape {tuple(x.shape)}"
            )
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)  # (C,)
        shift = self.bias - self.running_mean * scale  # (C,)
        scale = scale.to(x.dtype).view(1, -1, 1, 1)  # (1, C, 1, 1)
        shift = shift.to(x.dtype).view(1, -1, 1, 1)  # (1, C, 1, 1)
        return x * scale + shift

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # BatchNorm2d checkpoints carry a step counter that a frozen layer has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def __repr__(self) -> str:
        return f"FrozenBatchNorm2d(num_features={self.num_features}, eps={self.eps})"

    @classmethod
    def convert_frozen_batchnorm(cls, module: nn.Module) -> nn.Module:
        """Return `module` with every BatchNorm2d / SyncBatchNorm (ours or torch's) replaced by FrozenBatchNorm2d.

        The replacement copies weight, bias, running_mean, running_var (same device and dtype) and eps, so in eval
        mode the converted model computes the same outputs. Children are replaced in place; if `module` itself is a
        BN layer a new module is returned. Used for the backbone's `freeze_at` (detectron2 convention).
        """
        if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):  # our SyncBatchNorm subclasses BatchNorm2d
            frozen = cls(module.num_features, eps=module.eps)
            if module.affine:
                frozen.weight = module.weight.detach().clone()
                frozen.bias = module.bias.detach().clone()
            if module.track_running_stats:
                frozen.running_mean = module.running_mean.detach().clone()
                frozen.running_var = module.running_var.detach().clone()
            return frozen
        for name, child in module.named_children():
            new_child = cls.convert_frozen_batchnorm(child)
            if new_child is not child:
                setattr(module, name, new_child)
        return module


class _AllReduceSum(torch.autograd.Function):
    """out = sum over ranks of `stats`, differentiable.

    Every rank's loss depends on the global sum, so d(total loss)/d(local stats) is the sum over ranks of the
    incoming gradients: the backward is an all-reduce (sum) too. `anchor` is only there to make the output require
    grad on every rank alike (see `SyncBatchNorm`); it receives no gradient.
    """

    @staticmethod
    def forward(ctx, stats: torch.Tensor, anchor: torch.Tensor | None) -> torch.Tensor:
        out = stats.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad = grad_out.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad, None


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d with batch statistics synchronized over all processes of the default process group.

    Why: detection trains with ~2 images per GPU, too few for good BN statistics, so the paper's SyncBN models
    (Sec. 3) normalize with the mean/variance of the whole global batch. Heads also see uneven and sometimes
    *empty* inputs (an image with no sampled RoIs), so each rank's contribution is weighted by its element count
    N*H*W rather than averaging per-rank means: ranks may hold different batch sizes, image sizes, or nothing.

    Training with an initialised process group of world size > 1: each rank computes per-channel sum and sum of
    squares (fp32, or fp64 for fp64 input) and its count N*H*W, and ONE all_reduce sums [sum, sumsq, count]. Then
    mean = sum / count and var = sumsq / count - mean^2 (biased, used to normalize), which equals BatchNorm2d on
    the concatenated global batch. running_mean/var are updated as BatchNorm2d does (momentum, or a cumulative
    average when momentum is None), running_var with the unbiased count / (count - 1) estimate. The backward
    all-reduces the gradient of the summed statistics, so input and parameter gradients equal those of BatchNorm2d
    on the global batch with the loss summed over ranks (weight/bias grads are per-rank parts; summing them over
    ranks, as DDP's all-reduce does up to its 1/world_size averaging, gives the global gradient).

    Empty input: a rank with N*H*W = 0 still takes part in the forward and backward all_reduce (nothing hangs) and
    returns an empty tensor. If the global count is 0, the output is the (empty) input's shape and running stats,
    including num_batches_tracked, are left unchanged. No `.item()` host sync is used.

    Contract for the backward not to hang: every rank must backpropagate through the output (e.g. include
    `0 * out.sum()` in the loss of an empty head), as with any collective inside autograd. The output requires grad
    on every rank alike whenever the layer's weight does, even where the local input does not.

    Eval mode, no process group, or world size 1: exactly `nn.BatchNorm2d` (in training: local batch statistics).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        # BatchNorm2d uses batch statistics in training, and in eval when it keeps no running statistics.
        use_batch_stats = self.training or self.running_mean is None
        if not use_batch_stats or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
            return super().forward(x)
        return self._forward_synced(x)

    def _forward_synced(self, x: torch.Tensor) -> torch.Tensor:
        """The synchronized path (any world size, including 1); see the class docstring."""
        if x.dim() != 4:
            raise ValueError(f"SyncBatchNorm expects input (N, C, H, W), got shape {tuple(x.shape)}")
        stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        xs = x.to(stat_dtype)
        count = torch.full((1,), x.numel() // max(x.shape[1], 1), dtype=stat_dtype, device=x.device)  # (1,)
        local = torch.cat([xs.sum(dim=(0, 2, 3)), (xs * xs).sum(dim=(0, 2, 3)), count])  # (2C + 1,)
        anchor = self.weight if self.weight is not None and self.weight.requires_grad else None
        total = _AllReduceSum.apply(local, anchor)  # (2C + 1,)
        C = self.num_features
        total_sum, total_sumsq, total_count = total[:C], total[C:2 * C], total[2 * C]  # (C,), (C,), ()
        # count 0 -> mean 0, var 0 instead of NaN; such an output is empty anyway.
        safe_count = total_count.clamp(min=1)
        mean = total_sum / safe_count  # (C,)
        var = (total_sumsq / safe_count - mean * mean).clamp(min=0)  # (C,) biased, as BatchNorm2d normalizes

        if self.training and self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), total_count.detach())

        scale = torch.rsqrt(var + self.eps)  # (C,)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale  # (C,)
        if self.bias is not None:
            shift = shift + self.bias
        return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        # torch.where instead of `if count > 0` keeps this free of host syncs.
        has_data = count > 0
        self.num_batches_tracked.copy_(torch.where(has_data, self.num_batches_tracked + 1, self.num_batches_tracked))
        if self.momentum is None:  # BatchNorm2d: cumulative moving average
            factor = 1.0 / self.num_batches_tracked.clamp(min=1).to(mean.dtype)
        else:
            factor = torch.tensor(self.momentum, dtype=mean.dtype, device=mean.device)
        unbiased_var = var * count / (count - 1).clamp(min=1)  # (C,) BatchNorm2d's running_var convention
        new_mean = (1 - factor) * self.running_mean + factor * mean.to(self.running_mean.dtype)
        new_var = (1 - factor) * self.running_var + factor * unbiased_var.to(self.running_var.dtype)
        self.running_mean.copy_(torch.where(has_data, new_mean, self.running_mean))
        self.running_var.copy_(torch.where(has_data, new_var, self.running_var))


def get_norm(name: str | None, num_channels: int) -> nn.Module | None:
    """Return a fresh norm layer for `num_channels` channels, or None for no norm.

    name: "BN" (nn.BatchNorm2d), "SyncBN" (SyncBatchNorm), "GN" (nn.GroupNorm with 32 groups, eps 1e-5),
    "FrozenBN" (FrozenBatchNorm2d), or "" / None (no norm: returns None). Anything else raises ValueError.
    """
    if name is None or name == "":
        return None
    if name == "BN":
        return nn.BatchNorm2d(num_channels)
    elif name == "SyncBN":
        return SyncBatchNorm(num_channels)
    elif name == "GN":
        return nn.GroupNorm(GN_NUM_GROUPS, num_channels, eps=1e-5)
    elif name == "FrozenBN":
        return FrozenBatchNorm2d(num_channels)
    raise ValueError(f"unknown norm {name!r}; valid names are {VALID_NORMS} or None")
