"""Unlabelled images for self-supervised pre-training (`pretrain.py --method moco / densecl`).

Pre-training on the target images themselves needs no labels, so any image source will do; `unlabelled_sources`
turns each `--data` value into image records:

- a folder of images (searched recursively; every file with an image extension, sorted by path);
- anything `train.py --data` takes (a COCO-format root, `train=ANN.json:IMAGES` pairs, "synthetic",
  "synthetic_kaist", "pennfudan"): the images of its training split, ALL of them (the annotations are not read,
  so frames without objects count too);
- several of them together (`--data pennfudan synthetic`): the images of each.

`UnlabelledImages[i]` decodes image i with the frames of `input.modalities` (`minimask.data.images.load_frames`) and
returns two independently augmented views (MoCo's two crops, `minimask.data.augment.two_views`). With
`cross_modal=True` (a 1-channel model on visible + thermal data) the two views are the grey visible frame and the
thermal frame of one scene, in random order, each augmented as thermal: what a camera rig films twice is a natural
positive pair for contrastive learning.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from minimask.data.augment import moco_v2_view, two_views
from minimask.data.coco import dataset_splits, is_data_pairs
from minimask.data.images import load_frames, num_channels

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
_NAMED = ("synthetic", "synthetic_kaist", "pennfudan")


def unlabelled_sources(specs) -> list[tuple[Path, list[dict]]]:
    """[(image folder, image records)] for each `--data` value (see the module docstring); ValueError naming a
    value that is neither a dataset nor a folder holding images."""
    sources = []
    for spec in specs:
        root = Path(spec)
        if spec in _NAMED or is_data_pairs(spec) or (root / "annotations").is_dir():
            ann, images = dataset_splits(spec)["train"]
            records = json.loads(Path(ann).read_text())["images"]
            sources.append((Path(images), sorted(records, key=lambda r: r["id"])))
        elif root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not files:
                raise ValueError(f"--data: {root} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
            sources.append((root, [{"id": i, "file_name": str(p.relative_to(root))} for i, p in enumerate(files)]))
        else:
            raise ValueError(f"--data: {spec} is neither a dataset (a COCO root, split=ANN.json:IMAGES, "
                             f"{', '.join(_NAMED)}) nor a folder of images")
    return sources


class UnlabelledImages(torch.utils.data.Dataset):
    """`dataset[i] -> (view_q, view_k)`, two augmented (C, S, S) float32 views of image i in [0, 1].

    C = num_channels(modalities), or 1 with cross_modal. Randomness comes from torch's global RNG, which
    `minimask.data.samplers.SeededDataset` seeds per sample (a resumed run repeats its augmentation).
    """

    def __init__(self, sources: list[tuple[Path, list[dict]]], *, image_size: int, modalities=("visible",),
                 cross_modal: bool = False):
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        if cross_modal and tuple(modalities) != ("visible", "thermal"):
            raise ValueError(f"cross-modal views need visible and thermal frames, got input.modalities="
                             f"{tuple(modalities)}")
        self.items = [(folder, record) for folder, records in sources for record in records]
        if not self.items:
            raise ValueError("no image to pre-train on")
        self.image_size, self.modalities, self.cross_modal = image_size, tuple(modalities), cross_modal
        self.channels = 1 if cross_modal else num_channels(modalities)
        self.visible_channels = 0 if cross_modal or "visible" not in self.modalities else 3

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        folder, record = self.items[i]
        image = load_frames(folder, record, self.modalities)  # (C, H, W); ImageLoadError names a bad file
        if not self.cross_modal:
            return two_views(image, self.image_size, visible_channels=self.visible_channels)
        grey, thermal = image[:3].mean(0, keepdim=True), image[3:]  # (1, H, W) each
        a, b = (grey, thermal) if bool(torch.rand(()) < 0.5) else (thermal, grey)
        return moco_v2_view(a, self.image_size, visible_channels=0), moco_v2_view(b, self.image_size,
                                                                                  visible_channels=0)
