"""Draw a minimask model's detections (boxes, labels, scores, masks, keypoint skeletons) on images and write PNGs
(minimask/tools/visualize.py does the drawing).

    python visualize.py --weights model_final.pth --images a.jpg b.png --output vis/
    python visualize.py --weights model_final.pth --data synthetic --split val --num 8 --output vis/
    python visualize.py --weights maskrcnn_resnet50_fpn.pth --config torchvision_maskrcnn_r50_fpn --images a.jpg \
        --output vis/ --score-threshold 0.7 --device cuda

The model comes from `minimask.interop.model_zoo.read_checkpoint` (a minimask training checkpoint carries its
config; --config overrides it, and a bare state dict needs it). Images are resized as the model's test pipeline does
(shorter side input.min_size_test, longer side at most input.max_size_test) and drawn at that size. --data takes
"synthetic", a COCO-layout root or split=ANN.json:IMAGES pairs, as evaluate.py does; its first --num images are
drawn. Bad input: one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import minimask
from evaluate import select_device
from minimask.cli import ArgumentParser, UsageError, data_spec, ensure_writable_dir, positive_int, require_file


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="checkpoint .pth (minimask or torchvision detection)")
    p.add_argument("--config", help="model preset, overriding the checkpoint's own config")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", metavar="IMAGE", help="image files to draw detections on")
    source.add_argument("--data", nargs="+", help="'synthetic', 'pennfudan', a COCO-layout root (annotations/ + "
                        "split folders), or annotation-file / image-folder pairs such as val=ANN.json:IMAGES")
    p.add_argument("--split", help="split of --data (default: val)")
    p.add_argument("--num", type=positive_int, help="how many --data images to draw (default: 8)")
    p.add_argument("--output", required=True, help="folder for the PNGs")
    p.add_argument("--score-threshold", type=_probability, default=0.5, help="draw detections scoring at least this")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    return p


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def prepare(args) -> dict:
    """Model, dataset and device, validated before any inference (UsageError / ValueError / OSError)."""
    from minimask.data.transforms import build_transforms
    from minimask.engine.checkpoint import CheckpointError
    from minimask.interop.model_zoo import read_checkpoint

    ensure_writable_dir(args.output)
    require_file(args.weights, "--weights")
    for path in args.images or ():
        require_file(path, "--images")
    if args.images and (args.split or args.num):
        raise UsageError("--split and --num apply to --data only")
    try:  # any format from_checkpoint reads; cfg: --config, else the file's own, else the preset its layout needs
        state, cfg = read_checkpoint(args.weights, config=args.config)
        model = minimask.build_model(cfg)
        model.load_state_dict(state, strict=True)
        model.eval()
    except (CheckpointError, RuntimeError) as e:
        raise ValueError(f"--weights: {' '.join(str(e).split())[:500]}") from None
    transforms = build_transforms(min_sizes=cfg.input.min_size_test, max_size=cfg.input.max_size_test,
                                  flip=False, train=False)
    _, _, device = select_device(args.device)
    if args.images:
        if model.in_channels != 3:
            raise UsageError(f"--images reads RGB files, but the model takes {model.in_channels} input channels "
                             f"(input.modalities={tuple(cfg.input.modalities)}): give its frames through --data")
        names = _category_names(args.weights)
        dataset = ImageFiles(args.images, transforms, names)
        indices = range(len(dataset))
    else:
        data, rest = data_spec(args.data[0], args.data[1:])
        if rest:
            raise UsageError(f"--data takes one root or split=ANN.json:IMAGES pairs, not also {rest[0]!r}")
        dataset = load_split(data, args.split or "val", transforms, keypoints=model.num_keypoints > 0,
                             modalities=cfg.input.modalities)
        indices = range(min(args.num or 8, len(dataset)))
    return dict(model=model.to(device), dataset=dataset, indices=indices, out_dir=args.output, device=device,
                score_threshold=args.score_threshold)


def _category_names(path: str) -> list[str] | None:
    """The class names a minimask training checkpoint carries in its label map (other files have none)."""
    from minimask.engine.checkpoint import CheckpointError, load_checkpoint

    try:
        raw = load_checkpoint(path)
    except (CheckpointError, ValueError, OSError):  # e.g. a detectron2 .pkl, which only the restricted reader opens
        return None
    return ((raw.get("label_map") if isinstance(raw, dict) else None) or {}).get("category_names")


class ImageFiles:
    """Image files as a dataset for `save_visualizations`: item i is (image, {"image_id": its file name stem})."""

    def __init__(self, paths: list[str], transforms, category_names=None):
        from minimask.data.images import load_image

        self.paths, self.transforms, self._load = [Path(p) for p in paths], transforms, load_image
        self.category_names = category_names  # with no category_ids: label k is category_names[k - 1]
        stems = [p.stem for p in self.paths]
        self.stems = [s if stems.count(s) == 1 else f"{i}_{s}" for i, s in enumerate(stems)]  # unique file names
        for path in self.paths:  # decode each once now: an unreadable image is an error before any inference
            load_image(path)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        image = self._load(self.paths[i])
        target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
        image, _ = self.transforms(image, target)
        return image, {"image_id": self.stems[i]}


def load_split(data: str, split: str, transforms, keypoints: bool, modalities=("visible",)):
    """A CocoDetection of `split` in `data` ("synthetic", a COCO-layout root or split=ANN.json:IMAGES pairs; "val" /
    "train" name the root's val2017 / train2017 where it has those)."""
    from minimask.data.coco import CocoDetection, check_image_files, split_files

    ann, images = split_files(data, split, keypoints)  # ValueError naming what is missing
    require_file(str(ann), "--data")
    if not Path(images).is_dir():
        raise UsageError(f"--data: no such image folder: {images}")
    dataset = CocoDetection(ann, images, transforms=transforms, filter_empty=False, modalities=modalities)
    check_image_files(dataset)
    return dataset


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0, or 2 for bad input)."""
    from minimask.tools.visualize import save_visualizations

    try:
        args = build_parser().parse_args(argv)
        paths = save_visualizations(**prepare(args))
    except (UsageError, OSError, ValueError) as e:  # OSError: ImageLoadError (names the file), unwritable PNGs
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"visualize.py: error: {message}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} image(s) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
