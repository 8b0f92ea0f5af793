"""Data-parallel training helpers on plain `torch.distributed`: process group setup, collectives, gradient all-reduce.

The paper trains with a global batch of 16 images on 8 GPUs ("Rethinking ImageNet Pre-training" Sec. 4, Goyal et
al. 2017 for the linear LR scaling): every process holds a slice of the batch, and after each backward the
gradients are averaged over the processes. For that average to equal the gradient of ONE process holding the whole
global batch, every loss whose normaliser depends on the batch (number of sampled RoIs, foreground pixels, visible
keypoints, images) divides its local SUM by `global_normalizer(local_count)`:

    loss_r = sum_r / (N / W)    with N = sum of the counts over the W ranks,
    mean over ranks of grad(loss_r) = grad(sum over ranks of sum_r) / N = grad of the global-batch loss.

- `init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); without it
  nothing is initialised and every helper below is a no-op / identity (single process).
- `GradientAllReduce` averages gradients in ~bucket_mb buckets launched from `register_post_accumulate_grad_hook`
  while the backward pass is still running (what DDP does, in one screen), finished by `.finish()`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if _initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def init_distributed() -> DistInfo:
    """Join the process group described by torchrun's env vars (gloo on CPU, nccl on CUDA; one GPU per process).

    Without RANK / WORLD_SIZE in the environment: single process, no group, device cuda:0 if available else cpu.
    Calling it again after the group exists just returns the current DistInfo.
    """
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(get_rank(), get_world_size(), 0, torch.device("cuda:0" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not _initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def barrier() -> None:
    if _initialized():
        dist.barrier()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of `t` over all ranks, as a new tensor (`t` is left unchanged). Single process: `t` itself."""
    if get_world_size() == 1:
        return t
    total = t.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def global_normalizer(count: Tensor) -> Tensor:
    """max(sum of `count` over ranks, 1) / world_size, as a detached float scalar tensor on count's device.

    A loss `local_sum / global_normalizer(local_count)`, with gradients averaged over ranks, has the gradient of
    `global_sum / global_count` in one process. Single process: max(count, 1). It is a collective: EVERY rank must
    call it, in the same order, even a rank whose count is 0. No host sync.
    """
    total = all_reduce_sum(count.detach().to(torch.float32).reshape(()))  # counts < 2^24 are exact in float32
    return total.clamp(min=1.0) / get_world_size()


def reduce_dict_mean(d: dict[str, Tensor]) -> dict[str, Tensor]:
    """Mean over ranks of each scalar in `d` (for logging; no gradient), as detached float32 0-dim tensors (on the
    CPU, or on the current CUDA device with nccl): `float(v)`, `v.item()` and f"{v:.3f}" all work on them.

    Every rank must pass the same keys. One all_reduce for the whole dict (keys in sorted order).
    """
    keys = sorted(d)
    if not keys:
        return {}
    # nccl only reduces CUDA tensors; gloo (and a single process) take them on the CPU.
    nccl = _initialized() and dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    values = torch.stack([torch.as_tensor(d[k]).detach().to(device, torch.float32).reshape(()) for k in keys])  # (K,)
    values = all_reduce_sum(values) / get_world_size()
    return dict(zip(keys, values.unbind(0)))


@torch.no_grad()
def broadcast_parameters(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (run once after building the model)."""
    if get_world_size() == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def assign_buckets(params: list[Tensor], bucket_bytes: int) -> list[list[int]]:
    """Group parameter indices into buckets of about `bucket_bytes`, in REVERSE order of `params`.

    The backward pass produces gradients roughly from the last registered layer to the first, so reversed
    registration order lets the first buckets fill (and start communicating) early. A bucket is closed once it
    reaches `bucket_bytes` or when dtype/device change (a bucket is flattened into one tensor). Every index appears
    in exactly one bucket.
    """
    buckets: list[list[int]] = []
    size, key = 0, None
    for i in reversed(range(len(params))):
        p = params[i]
        p_key = (p.dtype, p.device)
        if not buckets or size >= bucket_bytes or p_key != key:
            buckets.append([])
            size, key = 0, p_key
        buckets[-1].append(i)
        size += p.numel() * p.element_size()
    return buckets


class GradientAllReduce:
    """Average gradients over ranks, overlapping the all-reduce with the backward pass (like DDP's reducer).

    Usage per iteration: `optimizer.zero_grad(set_to_none=False); loss.backward(); reducer.finish();
    optimizer.step()`.

    Each bucket owns one flat buffer, and every parameter's `.grad` is a view into it (DDP's
    `gradient_as_bucket_view`): the backward pass accumulates straight into the buffers and the all-reduce runs on
    them in place, so gradients are never copied into or out of a bucket. Zeroing the gradients in place keeps the
    views; a gradient that arrives as a new tensor (after `zero_grad(set_to_none=True)`) is copied into its view
    once and the view put back, so either way of zeroing gives the same result.

    A post-accumulate-grad hook on every trainable parameter marks it ready; a bucket whose parameters are all ready
    launches `dist.all_reduce(async_op=True)`. Buckets are launched strictly in bucket order (bucket i only after
    buckets < i), so every rank issues the same sequence of collectives even if autograd produces gradients in a
    slightly different order on different ranks. `finish()` treats each parameter whose gradient never arrived
    (unused on this rank in this iteration) as contributing what its `.grad` holds (zero after a zero_grad),
    launches the remaining buckets in order, waits, and divides by the world size.

    Contract: all ranks hold the same parameters in the same order, call backward once per `finish()`, and either
    use every parameter or rely on the zero-fill above. Single process (no group or world size 1): no hooks, no
    buffers, `finish()` does nothing.
    """

    def __init__(self, params, bucket_mb: float = 25):
        self.params: list[Tensor] = []
        for p in params:  # trainable ones, each once (a shared parameter may be listed twice)
            if p.requires_grad and all(p is not q for q in self.params):
                self.params.append(p)
        self.buckets = assign_buckets(self.params, int(bucket_mb * 2**20))
        self.world_size = get_world_size()
        self._bucket_of = {i: b for b, bucket in enumerate(self.buckets) for i in bucket}
        self._hooks, self._flats, self._views = [], [], [None] * len(self.params)
        if self.world_size > 1:
            for bucket in self.buckets:
                first = self.params[bucket[0]]
                flat = torch.zeros(sum(self.params[i].numel() for i in bucket), dtype=first.dtype, device=first.device)
                for i, view in zip(bucket, flat.split([self.params[i].numel() for i in bucket])):
                    self._views[i] = view.view_as(self.params[i])
                self._flats.append(flat)
            for i, p in enumerate(self.params):
                self._attach(i)
                self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(i)))
        self._reset()

    def _attach(self, index: int) -> None:
        """Make the parameter's .grad its bucket view again, keeping the gradient it holds (None counts as 0)."""
        p, view = self.params[index], self._views[index]
        if p.grad is None:
            view.zero_()
        elif p.grad.data_ptr() != view.data_ptr():
            view.copy_(p.grad)
        p.grad = view

    def _reset(self) -> None:
        self._arrived = [False] * len(self.params)
        self._missing = [len(bucket) for bucket in self.buckets]  # params of each bucket still without a grad
        self._next = 0  # the next bucket to launch
        self._pending: list[tuple[int, object]] = []  # (bucket, work handle)

    def _make_hook(self, index: int):
        def hook(param: Tensor) -> None:
            if self._arrived[index]:
                raise RuntimeError("GradientAllReduce: a second backward ran before finish()")
            self._attach(index)
            self._arrived[index] = True
            self._missing[self._bucket_of[index]] -= 1
            self._launch_ready()
        return hook

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets) and self._missing[self._next] == 0:
            self._pending.append((self._next, dist.all_reduce(self._flats[self._next], async_op=True)))
            self._next += 1

    def finish(self) -> None:
        """Wait for every bucket and average the gradients in place; then reset for the next iteration."""
        if self.world_size == 1:
            return
        for i in range(len(self.params)):
            if not self._arrived[i]:  # unused here: contribute its .grad (zeros) so all ranks run the same collectives
                self._attach(i)
                self._arrived[i] = True
                self._missing[self._bucket_of[i]] -= 1
        self._launch_ready()
        for b, work in self._pending:
            work.wait()
            self._flats[b].div_(self.world_size)
        self._reset()

    def remove(self) -> None:
        """Remove the hooks (the module then trains without gradient averaging; .grad stays in the buffers)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
