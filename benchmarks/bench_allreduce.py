"""Gradient synchronisation: minimask's GradientAllReduce against torch's DistributedDataParallel.

    torchrun --nproc_per_node 2 benchmarks/bench_allreduce.py --config tiny --size 192 256     (CPU, gloo)
    torchrun --nproc_per_node 8 benchmarks/bench_allreduce.py --config r50_fpn_gn             (GPUs, NCCL)

Every process holds copies of the same model: one whose gradients are averaged by `GradientAllReduce` (bucketed
all-reduces launched from gradient hooks during the backward pass, gradients zeroed in place as train.py does),
two wrapped in DDP (same 25 MB buckets; its default, and with `gradient_as_bucket_view=True`), and one not
synchronised at all (the floor), plus the same batch of random images. Iterations rotate through the copies
(forward, backward, synchronisation; no optimizer step, so all stay at the same weights) and rank 0 prints the
median time per iteration of each. At the end ours and DDP's default must hold the same averaged gradients. Run with the OMP_NUM_THREADS torchrun sets (1), or give each process its own cores.
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_model import _cpu_name, make_batch  # noqa: E402

import minimask  # noqa: E402
from minimask.distributed import GradientAllReduce, init_distributed  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="r50_fpn_gn")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2, help="images per process")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args()

    info = init_distributed()
    if info.world_size < 2:
        sys.exit("run this under torchrun with at least 2 processes")
    device = info.device
    torch.manual_seed(0)  # the same weights on every process
    cfg = minimask.get_config(args.config, args.overrides)
    ours = minimask.build_model(cfg).to(device).train()
    theirs, theirs_view, plain = copy.deepcopy(ours), copy.deepcopy(ours), copy.deepcopy(ours)
    reducer = GradientAllReduce(ours.parameters(), bucket_mb=args.bucket_mb)
    ddp, ddp_view = (torch.nn.parallel.DistributedDataParallel(
        m, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=args.bucket_mb,
        find_unused_parameters=False, gradient_as_bucket_view=view) for m, view in ((theirs, False), (theirs_view, True)))
    images, targets = make_batch(cfg, args.batch, *args.size, device)

    def step(model, finish=None, set_to_none=True):
        torch.manual_seed(2 + info.rank)  # the same RoI sampling for every copy
        model.zero_grad(set_to_none=set_to_none)  # in place where the gradients are bucket views
        sum(model(images, targets).values()).backward()
        if finish is not None:
            finish()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    modes = {"GradientAllReduce": lambda: step(ours, reducer.finish, set_to_none=False), "DDP": lambda: step(ddp),
             "DDP, bucket views": lambda: step(ddp_view, set_to_none=False), "no synchronisation": lambda: step(plain)}
    times = {name: [] for name in modes}
    for i in range(args.warmup + args.runs):
        for name, fn in modes.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    step(ours, reducer.finish, set_to_none=False)
    step(ddp)
    worst = max((a.grad - b.grad).abs().max().item() / max(b.grad.abs().max().item(), 1e-12)
                for a, b in zip(ours.parameters(), theirs.parameters()) if b.grad is not None)
    if info.rank == 0:
        machine = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
        print(f"{args.config} at {args.size[0]}x{args.size[1]}, {args.batch} images x {info.world_size} processes, "
              f"{dist.get_backend()}, {machine}, torch {torch.__version__}, {torch.get_num_threads()} thread(s) each")
        for name, values in times.items():
            print(f"  {name:>20}: {statistics.median(values) * 1000:8.1f} ms / iteration (median of {len(values)})")
        print(f"  largest relative gradient difference, ours vs DDP: {worst:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
