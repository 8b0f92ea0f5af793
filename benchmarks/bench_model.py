"""Training and inference time per image, and peak memory, for a preset at a given image size.

    python benchmarks/bench_model.py --config r50_fpn_gn --size 800 1333 --batch 2
    python benchmarks/bench_model.py --config tiny --size 128 128 --batch 2 --json out.json

Random images with a few random boxes (and box-filled masks / keypoints where the preset has those heads); a few
warm-up iterations, then the median of the timed ones. Peak memory is CUDA max-allocated on a GPU and the process's
peak resident set size (ru_maxrss, which includes everything the process touched before) on the CPU.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minimask  # noqa: E402


def make_batch(cfg, batch, height, width, device, num_objects=4):
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, height, width, generator=g).to(device))
        xy = torch.rand(num_objects, 2, generator=g) * torch.tensor([width * 0.6, height * 0.6])
        wh = (torch.rand(num_objects, 2, generator=g) * 0.3 + 0.1) * torch.tensor([width, height])
        boxes = torch.cat([xy, xy + wh], dim=1)
        target = {"boxes": boxes.to(device),
                  "labels": torch.randint(1, cfg.model.roi_heads.num_classes + 1, (num_objects,), generator=g).to(device)}
        if cfg.model.mask_head.enabled:
            masks = torch.zeros(num_objects, height, width, dtype=torch.uint8)
            for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
                masks[k, y1:y2, x1:x2] = 1
            target["masks"] = masks.to(device)
        if cfg.model.keypoint_head.enabled:
            k = cfg.model.keypoint_head.num_keypoints
            pts = boxes[:, None, :2] + torch.rand(num_objects, k, 2, generator=g) * (boxes[:, None, 2:] - boxes[:, None, :2])
            target["keypoints"] = torch.cat([pts, torch.full((num_objects, k, 1), 2.0)], dim=2).to(device)
        targets.append(target)
    return images, targets


def timed(fn, device, warmup, runs):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="r50_fpn_gn")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = minimask.get_config(args.config, args.overrides)
    model = minimask.build_model(cfg).to(device)
    images, targets = make_batch(cfg, args.batch, *args.size, device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def train_step():
        losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    @torch.no_grad()
    def infer():
        model(images)

    model.train()
    train_s = timed(train_step, device, args.warmup, args.runs)
    model.eval()
    infer_s = timed(infer, device, args.warmup, args.runs)
    result = {
        "config": args.config, "size": list(args.size), "batch": args.batch, "device": str(device),
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_s_per_image": train_s / args.batch, "infer_s_per_image": infer_s / args.batch,
        "peak_memory_mb": peak_memory_mb(device),
    }
    for key, value in result.items():
        print(f"{key:>18}: {value:.4f}" if isinstance(value, float) else f"{key:>18}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
