"""Decoding images: one photograph (`load_image`), or the aligned frames of one scene stacked into one input
(`load_frames`, multispectral input).

- `load_image(path)`: pillow decode with `Image.load()` forced (truncated files fail here, not later), EXIF
  orientation applied (`ImageOps.exif_transpose`), any mode -> RGB float32 (3, H, W) in [0, 1].
  Alpha (RGBA, LA, PA, palette transparency via RGBA) is DROPPED, not composited: the colour channels are used
  as stored, like detectron2's `convert("RGB")`. 16-bit grayscale ("I;16*", and "I", which older pillow used for
  16-bit PNGs) is scaled by 1/65535 instead of pillow's clipping to 255. Every failure (missing, zero-byte,
  non-image, truncated or corrupt file) raises `ImageLoadError`, a subclass of `OSError`, naming the file.
- `load_frames(image_dir, record, modalities)`: the frames an image record names (`file_name` visible,
  `lwir_file_name` thermal) stacked in canonical order; the module docstring of minimask.data.pixel_stats
  explains multispectral input.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageLoadError(OSError):
    """An image file is missing, empty, not an image, truncated or corrupt; the message names the file."""


def load_image(path) -> torch.Tensor:
    """Decode `path` to a float32 (3, H, W) RGB tensor in [0, 1], H x W after EXIF orientation. 8-bit images come
    with channels-last strides (a permuted view); call `.contiguous()` where planar memory is needed.

    Raises `ImageLoadError` (an `OSError`) naming the file on any failure to open or fully decode it.
    """
    path = os.fspath(path)
    try:
        with Image.open(path) as img:
            img.load()  # force the full decode so truncated/corrupt data fails here
            img = ImageOps.exif_transpose(img)  # EXIF Orientation tag -> upright pixels (a loaded copy)
        if img.mode in _SIXTEEN_BIT_MODES:
            gray = np.clip(np.asarray(img, dtype=np.float32) / 65535.0, 0.0, 1.0)  # (H, W)
            return torch.from_numpy(gray).unsqueeze(0).repeat(3, 1, 1)  # (3, H, W)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")  # pillow's route for palette transparency; alpha dropped below
        if img.mode != "RGB":
            img = img.convert("RGB")
        pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (H, W, 3)
    except FileNotFoundError as e:
        raise ImageLoadError(f"{path}: image file not found") from e
    except Exception as e:  # pillow raises OSError, SyntaxError, ValueError, struct.error, ... for bad data
        raise ImageLoadError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
    # A (3, H, W) view of the (H, W, 3) buffer: the training resize runs in that (channels-last) layout, so a copy
    # to planar layout here would be undone there (2 of the 14 ms of a 1920 x 1080 JPEG; benchmarks/bench_data.py).
    return pixels.to(torch.float32).div_(255.0).permute(2, 0, 1)


# Aligned frames of one scene that an image record may name, name -> (record field, channels); the module docstring
# of minimask.data.pixel_stats explains multispectral input
MODALITIES = {"visible": ("file_name", 3), "thermal": ("lwir_file_name", 1)}


def check_modalities(modalities) -> tuple[str, ...]:
    """The modalities as a tuple in canonical order (visible before thermal); ValueError for an unknown, repeated
    or empty choice."""
    modalities = tuple(modalities)
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown or not modalities or len(set(modalities)) != len(modalities):
        raise ValueError(f"input.modalities must be a non-empty selection of {tuple(MODALITIES)} without repeats, "
                         f"got {modalities}")
    return tuple(m for m in MODALITIES if m in modalities)


def num_channels(modalities) -> int:
    """Channels of the stacked input: 3 for visible, 1 for thermal, 4 for both."""
    return sum(MODALITIES[m][1] for m in check_modalities(modalities))


def modalities_of(channels: int) -> tuple[str, ...]:
    """The modalities that stack to `channels` channels (1 thermal, 3 visible, 4 both)."""
    layouts = {num_channels(m): m for m in (("visible",), ("thermal",), ("visible", "thermal"))}
    if channels not in layouts:
        raise ValueError(f"no input of {channels} channels: visible has 3, thermal 1, both 4")
    return layouts[channels]


def load_thermal(path) -> torch.Tensor:
    """Decode a thermal frame to a float32 (1, H, W) tensor in [0, 1]; ImageLoadError naming the file on failure.

    `load_image` decodes every mode to 3 channels: 8-bit grey ("L", or KAIST's LWIR JPEGs stored as three equal
    channels) and 16-bit radiometric frames (scaled by 1/65535) come out as three equal channels, whose mean is
    the frame itself; a colour-mapped file becomes the mean of its channels.
    """
    return load_image(path).mean(dim=0, keepdim=True)  # (1, H, W)


def load_frames(image_dir, record: dict, modalities=("visible",)) -> torch.Tensor:
    """The (C, H, W) float32 input of one image record: its frames of `modalities` stacked in canonical order
    (visible RGB, then thermal). A record without the field of a requested modality, a missing or unreadable frame
    (ImageLoadError), or frames of different sizes (ValueError) are errors naming the record or file."""
    frames = []
    for modality in check_modalities(modalities):
        field = MODALITIES[modality][0]
        if field not in record:
            raise ValueError(f"image id {record.get('id')}: input.modalities asks for {modality} frames, but the "
                             f"record has no '{field}' field")
        path = os.path.join(os.fspath(image_dir), record[field])
        frame = load_image(path) if modality == "visible" else load_thermal(path)
        if frames and frame.shape[-2:] != frames[0][1].shape[-2:]:
            raise ValueError(f"{path}: the {modality} frame is {tuple(frame.shape[-2:])} (H, W) but the "
                             f"{frames[0][0]} frame {frames[0][2]} is {tuple(frames[0][1].shape[-2:])}")
        frames.append((modality, frame, path))
    if len(frames) == 1:
        return frames[0][1]  # load_image's channels-last view stays as it is (the resize runs in that layout)
    return torch.cat([frame for _, frame, _ in frames])  # (C, H, W)
