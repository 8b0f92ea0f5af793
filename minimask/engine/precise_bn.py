"""Precise BN (detectron2 TEST.PRECISE_BN, on in its SyncBN configs): before an evaluation, the running statistics of
every BatchNorm layer are replaced by the true statistics of its inputs over a few hundred training batches, since
the running averages BatchNorm keeps in training mix statistics of the models of many iterations ago.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable, run: Callable[[nn.Module, object], object],
                       num_iters: int) -> int:
    """Precise BN: set every BatchNorm layer's running mean and variance to the statistics of its inputs.

    The running averages that BatchNorm keeps during training mix statistics of models from many iterations ago,
    weighted by momentum; evaluation should use the current model's. For each of the first `num_iters` items of
    `batches`, `run(model, item)` does one training-mode forward (batch statistics normalise, as in training) while
    hooks sum each layer's input, its square and the element count per channel (in float64). Afterwards
    running_mean = E[x] and running_var = Var[x] (unbiased) over all those elements together, of all processes
    when a process group is initialised (the sums are all-reduced, so every process ends with the same buffers and
    a SyncBN model gets the statistics of the global batch). Layers without running statistics and FrozenBN are
    untouched; momentum and num_batches_tracked are left as they were. Every process must pass the same
    `num_iters` and have as many batches. Returns the number of batches used.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not layers or num_iters <= 0:
        return 0
    sums = [torch.zeros(3, m.num_features, dtype=torch.float64, device=m.running_mean.device) for m in layers]

    def hook(index):
        def accumulate(module, args):
            x = args[0].detach().to(torch.float64).transpose(0, 1).reshape(module.num_features, -1)  # (C, L)
            sums[index] += torch.stack([x.sum(1), (x * x).sum(1), x.new_full((x.shape[0],), x.shape[1])])
        return accumulate

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(layers)]
    tracked = [m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None for m in layers]
    was_training = model.training
    model.train()
    used = 0
    try:
        for item in batches:
            if used == num_iters:
                break
            run(model, item)
            used += 1
    finally:
        for h in handles:
            h.remove()
        for m, count in zip(layers, tracked):  # the training-mode forwards counted batches: not training ones
            if count is not None:
                m.num_batches_tracked.copy_(count)
        model.train(was_training)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flat = torch.cat(sums, dim=1)  # (3, sum of C): one all-reduce for every layer
        dist.all_reduce(flat)
        sums = list(flat.split([m.num_features for m in layers], dim=1))
    for m, (s, sq, count) in zip(layers, sums):  # sum x, sum x^2, count: each (C,)
        has_data = count > 1
        mean = s / count.clamp(min=1)
        var = (sq - count * mean * mean).clamp(min=0) / (count - 1).clamp(min=1)  # unbiased, as BatchNorm2d keeps
        m.running_mean.copy_(torch.where(has_data, mean, m.running_mean.double()))
        m.running_var.copy_(torch.where(has_data, var, m.running_var.double()))
    return used


def bn_statistics(model) -> dict:
    """Copies of the BatchNorm running statistics (what precise BN changes), to put back after an evaluation."""
    return {name: buf.clone() for name, buf in model.named_buffers() if name.rsplit(".", 1)[-1].startswith("running_")}
