"""Benchmark of the training input pipeline: images/second for ONE data-loading worker (one process, one thread)
to decode a COCO image, build its target (boxes, masks) and apply the train transform (shorter side 800, max 1333,
random flip), on the real coco-mini images.

    OMP_NUM_THREADS=1 python benchmarks/bench_data.py [--data DIR] [--passes 3] [--json out.json]

`--upscale 1920 1080` first writes a copy of the split with every image resized to that size (JPEG) and its boxes and
polygons scaled alike, the case of large photographs trained at a small scale (`--min-size 256 288 320
--max-size 569`); `--mask-format bitmask` decodes every instance's full-image bitmap, as the loader always did before
polygons reached the mask head (the default, "polygon", passes them on untouched).

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
import tempfile
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


def upscaled_copy(ann_file: Path, image_dir: Path, out: Path, width: int, height: int) -> tuple[Path, Path]:
    """The split with every image resized to width x height (JPEG, quality 90) and its boxes and polygons scaled
    alike (RLE and crowd annotations are dropped); returns (annotation file, image folder) of the copy."""
    from PIL import Image

    data = json.loads(ann_file.read_text())
    (out / "images").mkdir(parents=True)
    scale = {}
    for img in data["images"]:
        with Image.open(image_dir / img["file_name"]) as im:
            im.convert("RGB").resize((width, height), Image.BILINEAR).save(out / "images" / img["file_name"],
                                                                           quality=90)
        scale[img["id"]] = (width / img["width"], height / img["height"])
        img["width"], img["height"] = width, height
    kept = []
    for ann in data["annotations"]:
        if ann["iscrowd"] or not isinstance(ann.get("segmentation"), list):
            continue
        sx, sy = scale[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        ann["bbox"] = [x * sx, y * sy, w * sx, h * sy]
        ann["segmentation"] = [[v * (sx if k % 2 == 0 else sy) for k, v in enumerate(p)] for p in ann["segmentation"]]
        kept.append(ann)
    data["annotations"] = kept
    (out / "ann.json").write_text(json.dumps(data))
    return out / "ann.json", out / "images"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = os.environ.get("MINIMASK_SHARED_DATA", str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--data", default=default_data, help="folder holding coco-mini/")
    parser.add_argument("--split", default="train2017")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--min-size", type=int, nargs="+", default=[800])
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--mask-format", choices=("polygon", "bitmask"), default="polygon")
    parser.add_argument("--upscale", type=int, nargs=2, metavar=("W", "H"), help="resize every image to W x H first")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    root = Path(args.data) / "coco-mini"
    ann_file, image_dir = root / "annotations" / f"instances_{args.split}.json", root / args.split
    if not ann_file.is_file():
        print(f"skipped: {ann_file} not found (set --data or MINIMASK_SHARED_DATA)")
        return
    from minimask.data.coco import CocoDetection
    from minimask.data.images import load_image
    from minimask.data.transforms import build_transforms

    if args.upscale:
        workdir = tempfile.TemporaryDirectory(prefix="bench_data_")  # removed when the script ends
        ann_file, image_dir = upscaled_copy(ann_file, image_dir, Path(workdir.name), *args.upscale)
    torch.set_num_threads(1)  # one worker = one process with one thread
    torch.manual_seed(0)
    transform = build_transforms(min_sizes=tuple(args.min_size), max_size=args.max_size, flip=True, train=True)
    plain = CocoDetection(ann_file, image_dir, mask_format=args.mask_format)
    full = CocoDetection(ann_file, image_dir, transforms=transform, mask_format=args.mask_format)
    n = len(plain)
    rates = {"decode": images_per_second(lambda i: load_image(plain.image_path(i)), n, args.passes),
             "dataset": images_per_second(lambda i: plain[i], n, args.passes),
             "pipeline": images_per_second(lambda i: full[i], n, args.passes)}
    # The transform-only stage holds every decoded image in memory (2 GB at 1920 x 1080), so it runs last: the
    # stages before it would otherwise be timed under that memory pressure.
    samples = [plain[i] for i in range(n)]
    out_hw = [transform(*samples[i])[0].shape[-2:] for i in range(n)]
    rates["transform"] = images_per_second(lambda i: transform(*samples[i]), n, args.passes)

    results = {
        "machine": {"cpu": cpu_model(), "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "dataset": {"ann_file": str(ann_file), "upscaled_to": args.upscale, "mask_format": args.mask_format,
                    "images": n,
                    "instances": sum(len(t["boxes"]) for _, t in samples),
                    "mean_input_hw": [round(sum(s[0].shape[d] for s in samples) / n) for d in (1, 2)],
                    "mean_output_hw": [round(sum(hw[d] for hw in out_hw) / n) for d in (0, 1)]},
        "transform": repr(transform),
        "passes": args.passes,
        "images_per_s_per_worker": {stage: round(rates[stage], 2)
                                    for stage in ("decode", "dataset", "transform", "pipeline")},
    }
    for stage, rate in results["images_per_s_per_worker"].items():
        print(f"{stage:>10}: {rate:7.2f} images/s per worker ({1000 / rate:6.1f} ms/image)")
    print(f"machine: {results['machine']['cpu']}")
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
