"""Data for minimask: COCO-format datasets (pycocotools + pillow), transforms, samplers, and the datasets the
project builds itself (the synthetic set, Penn-Fudan converted to COCO).

    from minimask.data import CocoDetection, build_transforms
    dataset = CocoDetection("annotations/instances_val2017.json", "val2017",
                            transforms=build_transforms(min_sizes=(800,), max_size=1333, flip=False, train=False))
    image, target = dataset[0]  # (3, H, W) float32 in [0, 1]; dict of boxes/labels/masks/...
"""
from minimask.data.coco import CocoDetection
from minimask.data.images import ImageLoadError, load_image
from minimask.data.pennfudan import convert_pennfudan
from minimask.data.samplers import (
                                    IndexSubset,
                                    InfiniteSampler,
                                    build_test_loader,
                                    build_train_loader,
                                    collate,
                                    subset_indices,
)
from minimask.data.synthetic import build_synthetic, synthetic_dataset
from minimask.data.transforms import build_transforms

__all__ = [
    "CocoDetection", "ImageLoadError", "IndexSubset", "InfiniteSampler", "build_synthetic", "build_test_loader", "build_train_loader",
    "build_transforms", "collate", "convert_pennfudan", "load_image", "subset_indices", "synthetic_dataset",
]
