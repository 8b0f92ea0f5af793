"""Classification pre-training of a minimask backbone: the "ImageNet pre-training" half of "Rethinking ImageNet
Pre-training" (He, Girshick, Dollar 2019: a ResNet/ResNeXt classifier, GN or BN, whose convolutional body
initialises the detector; its Fig. 2 compares the images and pixels seen in pre-training with those
seen in fine-tuning).

- `ImageFolder`: the ImageNet layout (`root/<class>/<image>`, classes sorted by folder name), images as float32
  (3, S, S) RGB in [0, 1]; training: random resized crop + horizontal flip (the usual ImageNet augmentation, Szegedy
  et al. 2015), evaluation: shorter side to S, centre crop. Randomness comes from torch's global RNG, which
  `minimask.data.samplers.SeededDataset` seeds per sample (so a resumed run repeats its augmentation).
- `Classifier`: minimask's `ResNet` with its global-pool + fc head ("logits"), normalising pixels exactly as the
  detector preset does (`MaskRCNN`: x * pixel_scale, RGB -> input_format, minus mean, over std), so the backbone
  sees the same inputs in pre-training and fine-tuning. `backbone_state()` is the state dict that
  `train.py --init imagenet --weights` reads (minimask format; the fc is dropped when loading into the detector).
- `topk_correct`, `evaluate`: top-1 / top-5 accuracy, sharded over processes and summed with `all_reduce_sum`.
- `build_crop_folder`: an image-folder set cut from a COCO-format detection set (one crop per instance, named by
  its category), e.g. the synthetic set's shapes and persons, for the CPU-sized replication.
- `read_pretrain_info`: the metadata a pre-training checkpoint carries (iterations, batch size, images seen, image
  size, backbone config), which the experiment collector uses for the equal-compute comparison.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minimask.data.images import load_image
from minimask.data.samplers import build_test_loader
from minimask.distributed import all_reduce_sum
from minimask.model.resnet import ResNet

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
BACKBONE_KEYS = ("depth", "groups", "width_per_group", "norm", "stride_in_1x1")
PIXEL_KEYS = ("input_format", "pixel_scale", "pixel_mean", "pixel_std")
CROP_MARKER = "COMPLETE.json"


# ---- data ----------------------------------------------------------------------------------------------------------

def random_resized_crop(image: torch.Tensor, size: int, *, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """A random crop of `scale` of the area and aspect ratio in `ratio` (log-uniform), resized to (3, size, size).

    Ten tries as torchvision's RandomResizedCrop, then the whole image. Uses torch's global RNG.
    """
    _, h, w = image.shape
    area = h * w
    for _ in range(10):
        target = area * float(torch.empty(()).uniform_(*scale))
        aspect = math.exp(float(torch.empty(()).uniform_(math.log(ratio[0]), math.log(ratio[1]))))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            y0 = int(torch.randint(0, h - ch + 1, ()))
            x0 = int(torch.randint(0, w - cw + 1, ()))
            return _resize(image[:, y0:y0 + ch, x0:x0 + cw], size, size)
    return _resize(image, size, size)


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side resized to `size`, then the central (3, size, size) (evaluation)."""
    _, h, w = image.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    resized = _resize(image, nh, nw)
    y0, x0 = (nh - size) // 2, (nw - size) // 2
    return resized[:, y0:y0 + size, x0:x0 + size]


def _resize(image: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if image.shape[1:] == (h, w):
        return image
    return F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]


class ImageFolder(torch.utils.data.Dataset):
    """Images in `root/<class>/*` (ImageNet layout); label = index of the class folder in sorted order.

    `__getitem__(i) -> (image (3, S, S) float32 RGB in [0, 1], label int)`. `classes` may fix the class list (the
    val split must use the train split's); a class folder missing under `root` then holds no image. ValueError when
    `root` has no class folder or no image at all.
    """

    def __init__(self, root, *, image_size: int, train: bool, classes: list[str] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"image folder {root} does not exist")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.classes = list(classes) if classes is not None else found
        if not self.classes:
            raise ValueError(f"{root} holds no class folder (expected root/<class>/<image>)")
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise ValueError(f"{root} has class folders that the training split lacks: {unknown[:5]}")
        self.samples = [(str(p), label) for label, name in enumerate(self.classes) if (root / name).is_dir()
                        for p in sorted((root / name).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.samples:
            raise ValueError(f"{root} holds no image ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
        self.root, self.image_size, self.train = root, image_size, train

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        image = load_image(path)  # (3, H, W); ImageLoadError (an OSError) names a bad file
        if self.train:
            image = random_resized_crop(image, self.image_size)
            if bool(torch.rand(()) < 0.5):
                image = image.flip(-1)
        else:
            image = center_crop(image, self.image_size)
        return image, label


def build_crop_folder(ann_file, image_dir, out_dir, *, size: int = 64, context: float = 1.25,
                      min_side: float = 12.0, max_images: int = 0) -> dict:
    """Cut one square crop per instance of a COCO-format set into `out_dir/<category name>/<ann id>.jpg`.

    The crop is centred on the box, `context` x its longer side (some background, as ImageNet objects have), padded
    with zeros where it leaves the image, resized to `size`; crowd and boxes with a side < `min_side` px are skipped.
    Writes `CROP_MARKER` (the counts) last, so an interrupted build is never taken for a finished one. Returns the
    counts per class. `max_images` > 0 reads only the first images (tests).
    """
    from PIL import Image
    from pycocotools.coco import COCO

    out_dir = Path(out_dir)
    (out_dir / CROP_MARKER).unlink(missing_ok=True)
    coco = COCO(str(ann_file))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    counts = {name: 0 for name in names.values()}
    image_ids = sorted(coco.getImgIds())[: max_images or None]
    for image_id in image_ids:
        info = coco.loadImgs(image_id)[0]
        image = load_image(Path(image_dir) / info["file_name"])  # (3, H, W)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False)):
            x, y, w, h = ann["bbox"]
            if min(w, h) < min_side:
                continue
            side = context * max(w, h)
            x0, y0 = round(x + w / 2 - side / 2), round(y + h / 2 - side / 2)
            s = max(1, round(side))
            crop = image.new_zeros(3, s, s)
            ix0, iy0 = max(x0, 0), max(y0, 0)
            ix1, iy1 = min(x0 + s, image.shape[2]), min(y0 + s, image.shape[1])
            crop[:, iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = image[:, iy0:iy1, ix0:ix1]
            pixels = (_resize(crop, size, size).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            name = names[ann["category_id"]]
            (out_dir / name).mkdir(parents=True, exist_ok=True)
            tmp = out_dir / name / f".{ann['id']}.jpg.tmp{os.getpid()}"
            Image.fromarray(pixels).save(tmp, format="JPEG", quality=95, subsampling=0)  # as the synthetic set
            os.replace(tmp, out_dir / name / f"{ann['id']:07d}.jpg")
            counts[name] += 1
    (out_dir / CROP_MARKER).write_text(json.dumps({"size": size, "context": context, "counts": counts}))
    return counts


# ---- model ---------------------------------------------------------------------------------------------------------

class Classifier(nn.Module):
    """minimask `ResNet` + global average pool + fc, with the detector's pixel normalisation in front.

    forward(images (B, 3, H, W) float RGB in [0, 1]) -> logits (B, num_classes). `backbone_state()` returns the
    ResNet's state dict (keys conv1.*, norm1.*, layer1..4.*, fc.*), the format `train.py --init imagenet` loads.
    """

    def __init__(self, *, num_classes: int, depth: int = 50, groups: int = 1, width_per_group: int = 64,
                 norm: str = "GN", stride_in_1x1: bool = False, input_format: str = "BGR", pixel_scale: float = 255.0,
                 pixel_mean=(103.530, 116.280, 123.675), pixel_std=(57.375, 57.120, 58.395)):
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
        if norm == "FrozenBN":
            raise ValueError("pre-training needs a norm that learns (GN, BN or SyncBN), not FrozenBN")
        self.backbone = ResNet(depth=depth, groups=groups, width_per_group=width_per_group, norm=norm,
                               stride_in_1x1=stride_in_1x1, out_features=("logits",), num_classes=num_classes)
        self.input_format, self.pixel_scale = input_format, float(pixel_scale)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Classifier expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if self.input_format == "BGR":
            images = images.flip(1)  # inputs are RGB; the MaskRCNN convention (mask_rcnn.py)
        x = (images * self.pixel_scale - self.pixel_mean) / self.pixel_std  # (B, 3, H, W)
        return self.backbone(x)["logits"]  # (B, K)

    def backbone_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.backbone.state_dict().items()}


def build_classifier(cfg, num_classes: int) -> Classifier:
    """The classifier for a detector preset: its backbone fields and its pixel convention (cfg.model)."""
    m = cfg.model
    return Classifier(num_classes=num_classes, **{k: getattr(m.backbone, k) for k in BACKBONE_KEYS},
                      **{k: getattr(m, k) for k in PIXEL_KEYS})


# ---- accuracy ------------------------------------------------------------------------------------------------------

def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """Number of rows whose label is among the top-k logits, for each k (k capped at the number of classes).

    logits (B, K), labels (B,) int64 -> (len(ks),) int64 on logits' device. B == 0 gives zeros.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"topk_correct: need logits (B, K) and labels (B,), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices  # (B, k_max)
    hits = top == labels[:, None]  # (B, k_max)
    return torch.stack([hits[:, :min(k, k_max)].any(1).sum() for k in ks])  # (len(ks),)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, *, device, rank: int = 0, world_size: int = 1, batch_size: int = 32,
             num_workers: int = 0) -> dict:
    """Top-1 / top-5 accuracy (percent) of `model` on `dataset`, each process on its shard, summed over processes
    (a collective: every process calls it). Returns {"top1", "top5", "images"}. The model's mode is restored."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # (top1, top5, images)
    loader = build_test_loader(dataset, rank=rank, world_size=world_size, num_workers=num_workers,
                               batch_size=batch_size)
    for images, labels in loader:
        images = torch.stack(images).to(device)  # (B, 3, S, S)
        labels = torch.as_tensor(labels, dtype=torch.int64, device=device)  # (B,)
        counts[:2] += topk_correct(model(images), labels).to(counts)
        counts[2] += len(labels)
    counts = all_reduce_sum(counts)
    model.train(was_training)
    n = float(counts[2])
    return {"top1": 100.0 * float(counts[0]) / max(n, 1.0), "top5": 100.0 * float(counts[1]) / max(n, 1.0),
            "images": int(n)}


def read_pretrain_info(path) -> dict | None:
    """The "pretrain" metadata of a `pretrain.py` checkpoint (None for any other weights file or a missing one)."""
    from minimask.engine.checkpoint import CheckpointError, load_checkpoint

    try:
        state = load_checkpoint(str(path))
    except (CheckpointError, OSError, ValueError):
        return None
    info = state.get("pretrain") if isinstance(state, dict) else None
    return dict(info) if isinstance(info, dict) else None
