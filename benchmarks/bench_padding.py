"""How much of a batch's canvas is padding, at 1, 2, 4 and 16 images per process.

The images of one process's batch are zero-padded to a common size (divisible by 32) before the backbone
(`MaskRCNN.batch_images`); the zeros enter GroupNorm's statistics and add easy negatives. detectron2 pads each GPU's
batch of 2. This script takes the image sizes of a COCO annotation file (or several), resizes them as training does
(shorter side 800, longer side at most 1333), forms batches the way `build_train_loader` does (the seeded infinite
sample stream, aspect-ratio grouping) and reports the mean padded fraction of the canvas.

    python benchmarks/bench_padding.py datasets/coco/annotations/instances_{train,val}2017.json
"""
import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minimask.data.samplers import GroupedBatchSampler, InfiniteSampler, aspect_ratio_groups
from minimask.data.transforms import shortest_edge_size


def padded_fraction(sizes_hw: list[tuple[int, int]], divisibility: int = 32) -> float:
    """1 - (image area) / (canvas area) for one batch padded to its largest h and w, rounded up to `divisibility`."""
    canvas_h = math.ceil(max(h for h, _ in sizes_hw) / divisibility) * divisibility
    canvas_w = math.ceil(max(w for _, w in sizes_hw) / divisibility) * divisibility
    return 1.0 - sum(h * w for h, w in sizes_hw) / (len(sizes_hw) * canvas_h * canvas_w)


def mean_padded_fraction(sizes_hw, per_process: int, *, batches: int, seed: int = 0, grouping: bool = True) -> float:
    sampler = InfiniteSampler(len(sizes_hw), seed=seed, rank=0, world_size=1)
    groups = aspect_ratio_groups(sizes_hw) if grouping else None
    fractions = []
    for batch in GroupedBatchSampler(sampler, groups, per_process):
        fractions.append(padded_fraction([sizes_hw[key.index] for key in batch]))
        if len(fractions) == batches:
            return statistics.fmean(fractions)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("annotations", nargs="+", help="COCO annotation files whose images' sizes are used")
    p.add_argument("--min-size", type=int, default=800)
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--per-process", type=int, nargs="+", default=[1, 2, 4, 16])
    p.add_argument("--batches", type=int, default=4000, help="batches averaged per setting")
    args = p.parse_args()
    sizes = []
    for path in args.annotations:
        with open(path) as f:
            sizes += [shortest_edge_size(im["height"], im["width"], args.min_size, args.max_size)
                      for im in json.load(f)["images"]]
    print(f"{len(sizes)} images, resized to shorter side {args.min_size} (longer <= {args.max_size})")
    print("| images per process | padded fraction, aspect grouping | without grouping |")
    print("|---|---|---|")
    for n in args.per_process:
        grouped = mean_padded_fraction(sizes, n, batches=args.batches)
        plain = mean_padded_fraction(sizes, n, batches=args.batches, grouping=False)
        print(f"| {n} | {100 * grouped:.1f} % | {100 * plain:.1f} % |")


if __name__ == "__main__":
    main()
