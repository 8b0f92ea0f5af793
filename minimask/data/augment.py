"""The MoCo v2 data augmentations ("aug_plus"), written in torch ops for float images (C, H, W) in [0, 1].

The recipe is MoCo v2 (Chen, Fan, Girshick, He, "Improved Baselines with Momentum Contrastive Learning",
arXiv 2003.04297, 2020, Sec. 3; `main_moco.py --aug-plus`, `moco/loader.py`), which takes the Gaussian blur and the
stronger colour distortion from SimCLR (Chen, Kornblith, Norouzi, Hinton 2020, Appendix A):

    RandomResizedCrop(size, scale=(0.2, 1.0)) -> ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8
    -> RandomGrayscale(p = 0.2) -> GaussianBlur(sigma ~ U[0.1, 2.0]) with p = 0.5 -> RandomHorizontalFlip

Each step is a small stateless function; torchvision's transforms (`RandomResizedCrop.get_params`,
`transforms.functional.adjust_*`, `rgb_to_grayscale`, `gaussian_blur`, `ColorJitter.get_params`) are the behavioural
reference, re-implemented here because the package does not import torchvision. Two stated differences: the grey
level is ITU-R 601-2 luma (0.299, 0.587, 0.114, as PIL's convert("L")), where torchvision's tensor path uses
0.2989 for red; the blur kernel size follows sigma (2 * ceil(3 sigma) + 1) as PIL's GaussianBlur(radius=sigma) in
`moco/loader.py` does, where torchvision's GaussianBlur takes a fixed size.

Randomness comes from torch's global (CPU) RNG only (torch.rand, torch.randint, torch.randperm,
torch.empty(()).uniform_), so `torch.manual_seed` or a per-sample seeding sampler makes a view reproducible. The
pixel work runs on whatever device (and in whatever float dtype) the image is on.

Multispectral inputs (`moco_v2_view`): visible RGB first, then thermal channels; see its docstring.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2 weights of R, G, B


# ---- geometry ------------------------------------------------------------------------------------------------------

def random_resized_crop_box(height: int, width: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """The box (top, left, crop_height, crop_width) of a random resized crop, as torchvision's
    `RandomResizedCrop.get_params`: up to 10 tries of an area fraction uniform in `scale` and an aspect ratio
    (width / height) log-uniform in `ratio`; a try counts when the rounded box fits in the image. Failing all ten,
    the central crop of the whole image, its aspect ratio clamped into `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * float(torch.empty(()).uniform_(scale[0], scale[1]))
        aspect = math.exp(float(torch.empty(()).uniform_(*log_ratio)))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, ()))
            left = int(torch.randint(0, width - w + 1, ()))
            return top, left, h, w
    # Fallback: the whole image, cut down on its long side only as far as the ratio range demands.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: torch.Tensor, size: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """(C, H, W) -> (C, size, size): the box of `random_resized_crop_box`, the same for every channel, resized
    bilinearly with antialiasing (torchvision's default for tensors)."""
    _, height, width = image.shape
    top, left, h, w = random_resized_crop_box(height, width, scale, ratio)
    return _resize(image[:, top:top + h, left:left + w], size, size)


def _resize(image: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if image.shape[1:] == (h, w):
        return image
    return F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]


# ---- colour (torchvision.transforms.functional semantics; every result clamped to [0, 1]) -------------------------

def _blend(image: torch.Tensor, other, factor: float) -> torch.Tensor:
    return (factor * image + (1.0 - factor) * other).clamp(0.0, 1.0)


def _check_rgb(image: torch.Tensor, name: str) -> None:
    if image.shape[-3] != 3:
        raise ValueError(f"{name} needs an RGB image (3, H, W), got {tuple(image.shape)}")


def _luma(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB -> (1, H, W) grey level."""
    r, g, b = image.unbind(-3)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(-3)


def adjust_brightness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Any C: image * factor (a blend with black); 0 gives black, 1 the identity."""
    return _blend(image, 0.0, factor)


def adjust_contrast(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with one grey level per image: the mean luma for RGB (C = 3), the mean of all channels otherwise
    (thermal); 0 gives that flat grey, 1 the identity."""
    mean = _luma(image).mean() if image.shape[-3] == 3 else image.mean()
    return _blend(image, mean, factor)


def adjust_saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    """RGB only: blend with the greyscale image; 0 gives the grey image, 1 the identity."""
    _check_rgb(image, "adjust_saturation")
    return _blend(image, _luma(image), factor)


def to_grayscale(image: torch.Tensor) -> torch.Tensor:
    """RGB only: (3, H, W) -> (3, H, W), three equal channels of ITU-R 601-2 luma."""
    _check_rgb(image, "to_grayscale")
    return _luma(image).clamp(0.0, 1.0).repeat(3, 1, 1)


def _rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB -> (3, H, W) hue in [0, 1) of a turn, saturation, value; hue 0 where the pixel is grey."""
    r, g, b = image.unbind(-3)
    value = image.amax(-3)
    chroma = value - image.amin(-3)
    grey = chroma == 0
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, 1.0), 0.0)
    safe = torch.where(grey, 1.0, chroma)  # no division by zero; those pixels get hue 0 below
    # The hexcone sector is decided by which channel is the maximum (red first, then green, as torchvision).
    hue = torch.where(value == r, ((g - b) / safe) % 6.0,
                      torch.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = torch.where(grey, 0.0, hue / 6.0) % 1.0
    return torch.stack((hue, saturation, value), -3)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """(3, H, W) HSV -> (3, H, W) RGB, all three channels at once: channel n in (R, G, B) = (5, 3, 1) is
    v - v s clamp(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6 (the piecewise-linear hexcone)."""
    hue, saturation, value = hsv.unbind(-3)
    n = torch.tensor([5.0, 3.0, 1.0], dtype=hsv.dtype, device=hsv.device).view(3, 1, 1)
    k = (n + 6.0 * hue.unsqueeze(-3)) % 6.0  # (3, H, W)
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return value.unsqueeze(-3) * (1.0 - saturation.unsqueeze(-3) * ramp)


def adjust_hue(image: torch.Tensor, shift: float) -> torch.Tensor:
    """RGB only: rotate the hue by `shift` in [-0.5, 0.5] of a turn (1/3: red -> green -> blue), keeping saturation
    and value; 0 is the identity (up to float rounding)."""
    _check_rgb(image, "adjust_hue")
    if not -0.5 <= shift <= 0.5:
        raise ValueError(f"hue shift must be in [-0.5, 0.5], got {shift}")
    hue, saturation, value = _rgb_to_hsv(image).unbind(-3)
    hsv = torch.stack(((hue + shift) % 1.0, saturation, value), -3)
    return _hsv_to_rgb(hsv).clamp(0.0, 1.0)


def color_jitter(image: torch.Tensor, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 hue: float = 0.1) -> torch.Tensor:
    """torchvision's ColorJitter: factors uniform in [max(0, 1 - b), 1 + b] for brightness, contrast and saturation,
    a hue shift uniform in [-hue, hue], applied in a fresh random order. A strength of 0 leaves that op out (and
    draws nothing for it), so brightness/contrast alone (saturation = hue = 0) works on any C."""
    order = torch.randperm(4).tolist()  # drawn first, as ColorJitter.get_params

    def factor(strength: float):
        return float(torch.empty(()).uniform_(max(0.0, 1.0 - strength), 1.0 + strength)) if strength > 0 else None

    factors = [factor(brightness), factor(contrast), factor(saturation),
               float(torch.empty(()).uniform_(-hue, hue)) if hue > 0 else None]
    ops = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]
    for i in order:
        if factors[i] is not None:
            image = ops[i](image, factors[i])
    return image


# ---- blur ----------------------------------------------------------------------------------------------------------

def gaussian_kernel1d(sigma: float, radius: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """(2 radius + 1,) samples of exp(-x^2 / (2 sigma^2)) at x = -radius..radius, normalised to sum 1."""
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """(C, H, W) -> (C, H, W): separable Gaussian blur of every channel, kernel radius ceil(3 sigma) (size
    2 ceil(3 sigma) + 1, so the cut tails hold < 0.3 % of the mass), capped at min(H, W) - 1 because reflect padding
    needs a pad smaller than the side; borders reflected (torchvision's gaussian_blur pads the same way)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    c, h, w = image.shape
    radius = min(math.ceil(3.0 * sigma), h - 1, w - 1)
    if radius == 0:
        return image.clone()
    kernel = gaussian_kernel1d(sigma, radius, dtype=image.dtype, device=image.device)
    x = image[None]  # (1, C, H, W)
    # One conv per axis, grouped so that each channel is blurred on its own.
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1),
                 groups=c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1),
                 groups=c)
    return x[0].clamp(0.0, 1.0)


# ---- the MoCo v2 view ----------------------------------------------------------------------------------------------

def moco_v2_view(image: torch.Tensor, size: int, *, visible_channels: int) -> torch.Tensor:
    """One MoCo v2 ("aug_plus") view: (C, H, W) in [0, 1] -> (C, size, size) in [0, 1].

    Steps, in the order of `main_moco.py`: random resized crop (scale 0.2 - 1) -> colour jitter (0.4, 0.4, 0.4, 0.1)
    with p = 0.8 -> grayscale with p = 0.2 -> Gaussian blur, sigma ~ U[0.1, 2.0], with p = 0.5 -> horizontal flip
    with p = 0.5.

    Multispectral images: the first `visible_channels` (3, RGB, or 0) channels are visible, the rest thermal (C = 3:
    RGB, 1: thermal, 4: RGB + thermal). The crop box, the blur and the flip are the same for all channels. The
    colour ops (saturation, hue, grayscale) touch only the RGB channels: thermal channels get only geometric and
    brightness/contrast changes. Under the same p = 0.8 gate as the RGB jitter (one draw per view), the thermal
    channels get their own brightness and contrast factors from the same ranges, in random order, contrast
    blending with the thermal mean.
    """
    c = image.shape[0]
    if visible_channels not in (0, 3) or c < max(visible_channels, 1):
        raise ValueError(f"visible_channels must be 0 or 3 and at most C; got {visible_channels} for C = {c}")
    view = random_resized_crop(image, size, scale=(0.2, 1.0))  # (C, size, size)
    rgb, thermal = view[:visible_channels], view[visible_channels:]
    if bool(torch.rand(()) < 0.8):
        if visible_channels:
            rgb = color_jitter(rgb, 0.4, 0.4, 0.4, 0.1)
        if thermal.shape[0]:
            thermal = color_jitter(thermal, 0.4, 0.4, saturation=0.0, hue=0.0)
    # The gate is drawn whether or not there is RGB, so the later draws do not depend on the modality.
    if bool(torch.rand(()) < 0.2) and visible_channels:
        rgb = to_grayscale(rgb)
    view = torch.cat([rgb, thermal])  # (C, size, size)
    if bool(torch.rand(()) < 0.5):
        view = gaussian_blur(view, float(torch.empty(()).uniform_(0.1, 2.0)))
    if bool(torch.rand(()) < 0.5):
        view = view.flip(-1)
    return view


def two_views(image: torch.Tensor, size: int, *, visible_channels: int):
    """(query, key): two independent `moco_v2_view` draws of one image (MoCo's TwoCropsTransform)."""
    return (moco_v2_view(image, size, visible_channels=visible_channels),
            moco_v2_view(image, size, visible_channels=visible_channels))
