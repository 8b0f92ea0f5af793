"""Per-channel pixel mean and std of a dataset's images, for `model.pixel_mean` / `model.pixel_std`.

Multispectral input (`input.modalities`, stacked by `minimask.data.images.load_frames`): a camera rig such as
KAIST's (Hwang et al., CVPR 2015) films every scene twice, in colour and in thermal infrared (LWIR), with the two
frames pixel-aligned. An image record of a COCO-format file names the colour frame in `file_name` (COCO's own field)
and, where there is one, the thermal frame in `lwir_file_name` (the KAIST converter's field, `minimask.data.kaist`).
`input.modalities` picks the frames to stack, always in this order:

    modality   record field      channels   decoded as
    visible    file_name         3          RGB in [0, 1] (`load_image`)
    thermal    lwir_file_name    1          grey in [0, 1] (8-bit "L", or 16-bit radiometric / 65535)

so ("visible",) gives the usual 3-channel image, ("thermal",) 1 channel and ("visible", "thermal") 4 channels
R, G, B, T. Every transform (resize, scale jitter, flip) acts on all channels alike; the model reorders only the
visible channels to its input_format (BGR) and normalises each channel with its own pixel mean and std, one value
per channel (`model.pixel_mean` / `model.pixel_std`, C values in the model's channel order). Those can be
measured on the training images:

    python -m minimask.data.pixel_stats --data train=kaist_train.json:KAIST/images --modalities visible thermal

prints the per-channel mean and std in the model's convention (0-255 scale, BGR then thermal) as config
overrides to paste after train.py's other arguments.
"""
from __future__ import annotations

import argparse
import sys

from minimask.data.images import MODALITIES, check_modalities, load_frames, num_channels


def channel_order(modalities, input_format: str) -> list[int]:
    """Index of each model input channel in the stacked input: BGR reverses the visible channels only."""
    channels = num_channels(modalities)
    order = list(range(channels))
    if input_format == "BGR" and "visible" in modalities:
        order[:3] = [2, 1, 0]
    return order


def pixel_statistics(image_dir, records: list[dict], modalities, *, input_format: str = "BGR",
                     pixel_scale: float = 255.0, max_images: int = 500) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over an even sample of at most `max_images` image records, in the model's
    convention: x * pixel_scale, channels in `channel_order` (what `model.pixel_mean` / `pixel_std` hold)."""
    step = max(1, -(-len(records) // max_images))
    total, total_sq, count = 0.0, 0.0, 0
    for record in records[::step]:
        x = load_frames(image_dir, record, modalities).double().flatten(1) * pixel_scale  # (C, H*W)
        total, total_sq, count = total + x.sum(1), total_sq + (x * x).sum(1), count + x.shape[1]
    if not count:
        raise ValueError(f"{image_dir}: no image to measure")
    mean = total / count  # (C,)
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()  # (C,) population std over all pixels
    order = channel_order(modalities, input_format)
    return [round(float(mean[i]), 3) for i in order], [round(float(std[i]), 3) for i in order]


def main(argv=None) -> int:
    from minimask.data.coco import CocoDetection, split_files

    p = argparse.ArgumentParser(description="Per-channel pixel mean and std of a dataset's training images, as the "
                                            "model.pixel_mean / model.pixel_std overrides for train.py")
    p.add_argument("--data", required=True,
                   help="the training images, as train.py --data (its train split is measured)")
    p.add_argument("--modalities", nargs="+", default=["visible"], choices=list(MODALITIES))
    p.add_argument("--input-format", default="BGR", choices=("BGR", "RGB"))
    p.add_argument("--pixel-scale", type=float, default=255.0)
    p.add_argument("--max-images", type=int, default=500, help="an even sample of at most this many images")
    args = p.parse_args(argv)
    try:
        ann, images = split_files(args.data, "train")
        dataset = CocoDetection(ann, images, filter_empty=False)
        records = [dataset.image_record(i) for i in range(len(dataset))]
        mean, std = pixel_statistics(images, records, args.modalities, input_format=args.input_format,
                                     pixel_scale=args.pixel_scale, max_images=args.max_images)
    except (ValueError, OSError) as e:
        print(f"minimask.data.pixel_stats: error: {e}", file=sys.stderr)
        return 2
    modalities = ",".join(check_modalities(args.modalities))
    # No spaces, so that the line pastes into a shell command as three arguments
    print(f"input.modalities={modalities} model.pixel_mean=({','.join(map(str, mean))},) "
          f"model.pixel_std=({','.join(map(str, std))},)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

