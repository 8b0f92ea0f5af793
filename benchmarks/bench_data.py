"""Benchmark of the training input pipeline: images/second for ONE data-loading worker (one process, one thread)
to decode a COCO image, build its target (boxes, masks) and apply the train transform (shorter side 800, max 1333,
random flip), on the real coco-mini images.

    OMP_NUM_THREADS=1 python benchmarks/bench_data.py [--data DIR] [--passes 3] [--json out.json]

Stages, each timed over every image of the split and reported as the median over `--passes` passes:
  decode     `load_image` only (pillow decode, EXIF, RGB, to float32 (3, H, W));
  dataset    `CocoDetection[i]` without transforms (decode + boxes + mask rasterisation);
  transform  the train transform alone, on samples decoded beforehand;
  pipeline   `CocoDetection[i]` with the train transform: what one DataLoader worker does per image.
A trainer needs (images per iteration per GPU) / (iteration time) images/s; divide by `pipeline` for the number of
workers per GPU. Skips with a message (exit 0) when the dataset is absent.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def images_per_second(fn, n: int, passes: int) -> float:
    """Median over passes of n / (time of fn(0), ..., fn(n - 1))."""
    rates = []
    for _ in range(passes):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = os.environ.get("MINIMASK_SHARED_DATA", str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--data", default=default_data, help="folder holding coco-mini/")
    parser.add_argument("--split", default="train2017")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--min-size", type=int, nargs="+", default=[800])
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    root = Path(args.data) / "coco-mini"
    ann_file = root / "annotations" / f"instances_{args.split}.json"
    if not ann_file.is_file():
        print(f"skipped: {ann_file} not found (set --data or MINIMASK_SHARED_DATA)")
        return
    from minimask.data.coco import CocoDetection, load_image
    from minimask.data.transforms import build_transforms

    torch.set_num_threads(1)  # one worker = one process with one thread
    torch.manual_seed(0)
    transform = build_transforms(min_sizes=tuple(args.min_size), max_size=args.max_size, flip=True, train=True)
    plain = CocoDetection(ann_file, root / args.split)
    full = CocoDetection(ann_file, root / args.split, transforms=transform)
    n = len(plain)
    samples = [plain[i] for i in range(n)]  # warm-up (file cache) and inputs for the transform-only stage
    out_hw = [transform(*samples[i])[0].shape[-2:] for i in range(n)]

    results = {
        "machine": {"cpu": cpu_model(), "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "dataset": {"ann_file": str(ann_file.relative_to(root.parent)), "images": n,
                    "instances": sum(len(t["boxes"]) for _, t in samples),
                    "mean_input_hw": [round(sum(s[0].shape[d] for s in samples) / n) for d in (1, 2)],
                    "mean_output_hw": [round(sum(hw[d] for hw in out_hw) / n) for d in (0, 1)]},
        "transform": repr(transform),
        "passes": args.passes,
        "images_per_s_per_worker": {
            "decode": images_per_second(lambda i: load_image(plain.image_path(i)), n, args.passes),
            "dataset": images_per_second(lambda i: plain[i], n, args.passes),
            "transform": images_per_second(lambda i: transform(*samples[i]), n, args.passes),
            "pipeline": images_per_second(lambda i: full[i], n, args.passes),
        },
    }
    for stage, rate in results["images_per_s_per_worker"].items():
        results["images_per_s_per_worker"][stage] = round(rate, 2)
        print(f"{stage:>10}: {rate:7.2f} images/s per worker ({1000 / rate:6.1f} ms/image)")
    print(f"machine: {results['machine']['cpu']}")
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
