"""The MoCo v2 augmentations (minimask/data/augment.py): hand values for the colour ops, the blur against a brute-force
convolution, the crop box against a coordinate ramp, and the multispectral rule (thermal channels get only geometric
and brightness/contrast changes). The torchvision comparisons run only where torchvision is installed."""
import math

import pytest
import torch

from minimask.data import augment as A

RED, GREEN, BLUE, WHITE = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 1.0)


def pixels(*colours, h=2, w=2):
    """A (3, h, w) image of the given RGB colours in row-major order."""
    return torch.tensor(colours, dtype=torch.float32).T.reshape(3, h, w)


def ramp(h, w):
    """(2, h, w): x (column) and y (row) pixel coordinates."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.stack([xx, yy])


# ---- colour ops by hand --------------------------------------------------------------------------------------------

def test_brightness_scales_and_clamps():
    image = pixels((0.2, 0.4, 0.6), (0.8, 1.0, 0.0), (0.5, 0.5, 0.5), (0.1, 0.3, 0.9))
    assert torch.allclose(A.adjust_brightness(image, 0.5), image * 0.5)
    assert torch.equal(A.adjust_brightness(image, 1.0), image)
    assert torch.equal(A.adjust_brightness(image, 0.0), torch.zeros_like(image))
    bright = A.adjust_brightness(image, 2.0)
    assert torch.allclose(bright[:, 0, 0], torch.tensor([0.4, 0.8, 1.0]))  # 1.2 clamped to 1
    assert bright.max() == 1.0


def test_contrast_blends_with_the_grey_mean():
    # Lumas 0.299, 0.587, 0.114 and 1: their mean is exactly 0.5.
    image = pixels(RED, GREEN, BLUE, WHITE)
    assert torch.allclose(A.adjust_contrast(image, 0.0), torch.full_like(image, 0.5))
    assert torch.allclose(A.adjust_contrast(image, 0.5), 0.5 * image + 0.25)
    assert torch.allclose(A.adjust_contrast(image, 1.0), image)
    # A grey image: its luma is the channel itself, mean 0.5.
    grey = torch.tensor([[0.2, 0.4], [0.6, 0.8]]).expand(3, 2, 2)
    assert torch.allclose(A.adjust_contrast(grey, 0.5), torch.tensor([[0.35, 0.45], [0.55, 0.65]]).expand(3, 2, 2))
    # Thermal (C = 1): the mean of the channel.
    thermal = torch.tensor([[[0.0, 0.2], [0.4, 0.6]]])
    assert torch.allclose(A.adjust_contrast(thermal, 2.0), torch.tensor([[[0.0, 0.1], [0.5, 0.9]]]))


def test_saturation_zero_is_grey_and_one_is_identity():
    image = pixels(RED, GREEN, BLUE, (0.2, 0.4, 0.6))
    luma = torch.tensor([[0.299, 0.587], [0.114, 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6]])
    assert torch.allclose(A.adjust_saturation(image, 0.0), luma.expand(3, 2, 2))
    assert torch.allclose(A.adjust_saturation(image, 1.0), image)
    assert torch.allclose(A.adjust_saturation(image, 2.0)[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))  # clamped
    with pytest.raises(ValueError):
        A.adjust_saturation(torch.rand(1, 2, 2), 0.5)


def test_grayscale_weights():
    grey = A.to_grayscale(pixels(RED, GREEN, BLUE, WHITE))
    assert grey.shape == (3, 2, 2)
    assert torch.allclose(grey, torch.tensor([[0.299, 0.587], [0.114, 1.0]]).expand(3, 2, 2))
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_hue_shifts():
    image = torch.rand(3, 9, 11)
    assert torch.allclose(A.adjust_hue(image, 0.0), image, atol=1e-6)
    assert torch.allclose(A.adjust_hue(A.adjust_hue(image, 0.5), 0.5), image, atol=1e-5)
    assert torch.allclose(A.adjust_hue(A.adjust_hue(image, 0.2), -0.2), image, atol=1e-5)
    primaries = pixels(RED, GREEN, BLUE, WHITE)
    assert torch.allclose(A.adjust_hue(primaries, 1 / 3), pixels(GREEN, BLUE, RED, WHITE), atol=1e-6)
    assert torch.allclose(A.adjust_hue(primaries, -1 / 3), pixels(BLUE, RED, GREEN, WHITE), atol=1e-6)
    # Half a turn gives the complementary colour; grey pixels have no hue to turn.
    assert torch.allclose(A.adjust_hue(pixels(RED, GREEN, BLUE, (0.3, 0.3, 0.3)), 0.5),
                          pixels((0.0, 1.0, 1.0), (1.0, 0.0, 1.0), (1.0, 1.0, 0.0), (0.3, 0.3, 0.3)), atol=1e-6)
    with pytest.raises(ValueError):
        A.adjust_hue(image, 0.6)


def test_color_jitter_draws_ranges_and_a_random_order(monkeypatch):
    calls = []
    for name in ("adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue"):
        monkeypatch.setattr(A, name, lambda image, f, name=name: calls.append((name, f)) or image)
    orders = set()
    for seed in range(20):
        torch.manual_seed(seed)
        calls.clear()
        A.color_jitter(torch.rand(3, 4, 4), 0.4, 0.4, 0.4, 0.1)
        orders.add(tuple(name for name, _ in calls))
        factors = dict(calls)
        assert len(factors) == 4
        for name in ("adjust_brightness", "adjust_contrast", "adjust_saturation"):
            assert 0.6 <= factors[name] <= 1.4
        assert -0.1 <= factors["adjust_hue"] <= 0.1
    assert len(orders) > 3
    calls.clear()
    A.color_jitter(torch.rand(1, 4, 4), 0.4, 0.4, saturation=0.0, hue=0.0)  # brightness/contrast only
    assert sorted(name for name, _ in calls) == ["adjust_brightness", "adjust_contrast"]


# ---- blur ----------------------------------------------------------------------------------------------------------

def test_blur_keeps_a_constant_image():
    image = torch.full((4, 13, 10), 0.37)
    for sigma in (0.1, 0.8, 2.0):
        assert torch.allclose(A.gaussian_blur(image, sigma), image, atol=1e-6)


def test_blur_keeps_the_mass_of_an_impulse():
    image = torch.zeros(1, 25, 25)
    image[0, 12, 12] = 1.0
    blurred = A.gaussian_blur(image, 1.5)  # radius 5: the spread stays 7 px from every border
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert blurred[0, 12, 12] < 0.1
    assert torch.allclose(blurred, blurred.flip(-1)) and torch.allclose(blurred, blurred.mT)
    kernel = A.gaussian_kernel1d(1.5, 5)
    assert torch.allclose(blurred[0, 7:18, 7:18], torch.outer(kernel, kernel), atol=1e-7)


def test_blur_matches_a_brute_force_2d_convolution():
    image = torch.rand(2, 12, 15)
    sigma, radius = 1.0, 3
    kernel = torch.outer(A.gaussian_kernel1d(sigma, radius), A.gaussian_kernel1d(sigma, radius))  # (7, 7)
    padded = torch.nn.functional.pad(image[None], (radius,) * 4, mode="reflect")[0]  # (2, 18, 21)
    expected = torch.zeros_like(image)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            expected += kernel[dy, dx] * padded[:, dy:dy + 12, dx:dx + 15]
    assert torch.allclose(A.gaussian_blur(image, sigma), expected, atol=1e-6)
    # The kernel is capped below the side: a 3 x 3 image still blurs (radius 2) with sigma 2.
    assert A.gaussian_blur(torch.rand(3, 3, 3), 2.0).shape == (3, 3, 3)


# ---- random resized crop -------------------------------------------------------------------------------------------

def test_crop_shape_and_identical_channels():
    out = A.random_resized_crop(torch.rand(4, 40, 60), 24)
    assert out.shape == (4, 24, 24)
    same = torch.rand(1, 40, 60).repeat(4, 1, 1)
    for _ in range(10):
        out = A.random_resized_crop(same, 24)
        assert all(torch.equal(out[0], out[c]) for c in range(1, 4))


def test_crop_box_area_and_ramp_bounds():
    h, w, size = 48, 64, 16
    image = ramp(h, w).repeat(2, 1, 1)  # (4, H, W): x, y, x, y
    for seed in range(100):
        torch.manual_seed(seed)
        top, left, ch, cw = A.random_resized_crop_box(h, w)
        torch.manual_seed(seed)
        out = A.random_resized_crop(image, size)
        # The box itself: area fraction in scale (up to rounding of the sides), aspect ratio in ratio.
        assert 0.2 * 0.95 <= ch * cw / (h * w) <= 1.0
        assert 3 / 4 - 0.1 <= cw / ch <= 4 / 3 + 0.1
        # The ramp: the output's coordinates lie in the box and reach within one output pixel of its edges.
        x_min, x_max, y_min, y_max = out[0].min(), out[0].max(), out[1].min(), out[1].max()
        assert left - 1e-4 <= x_min <= left + cw / size and left + cw - 1 - cw / size <= x_max <= left + cw - 1 + 1e-4
        assert top - 1e-4 <= y_min <= top + ch / size and top + ch - 1 - ch / size <= y_max <= top + ch - 1 + 1e-4
        # So the ramp alone bounds the area fraction: (span + 1) <= side <= (span + 1) / (1 - 2 / size).
        seen = (x_max - x_min + 1) * (y_max - y_min + 1) / (h * w)
        assert seen <= 1.0 and seen / (1 - 2 / size) ** 2 >= 0.2 * 0.95
        assert torch.equal(out[0], out[2]) and torch.equal(out[1], out[3])


def test_crop_falls_back_to_a_ratio_clamped_centre_crop():
    # No box of >= 90 % of a 10 x 100 image has an aspect ratio in [3/4, 4/3]: the fallback is the central 10 x 13
    # (width 10 * 4/3 rounded); for the 100 x 10 image, the central 13 x 10 (height 10 / (3/4) rounded).
    assert A.random_resized_crop_box(10, 100, scale=(0.9, 1.0)) == (0, 43, 10, 13)
    assert A.random_resized_crop_box(100, 10, scale=(0.9, 1.0)) == (43, 0, 13, 10)
    image = ramp(10, 100)
    out = A.random_resized_crop(image, 10, scale=(0.9, 1.0))
    assert 43 <= out[0].min() and out[0].max() <= 55


# ---- the MoCo v2 view ----------------------------------------------------------------------------------------------

def _geometric_only(monkeypatch):
    """Make the colour ops identities (the RNG draws stay the same: the factors are drawn in color_jitter)."""
    for name in ("adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue"):
        monkeypatch.setattr(A, name, lambda image, f: image)
    monkeypatch.setattr(A, "to_grayscale", lambda image: image)


def _affine_residual(y, x):
    """Max residual and slope of the least-squares fit y ~ a x + b."""
    design = torch.stack([x.flatten(), torch.ones(x.numel())], 1).double()
    solution = torch.linalg.lstsq(design, y.flatten().double()[:, None]).solution
    return (design @ solution - y.flatten().double()[:, None]).abs().max().item(), solution[0].item()


def test_thermal_channel_gets_only_geometric_and_brightness_contrast_changes(monkeypatch):
    h, w, size = 40, 48, 20
    xy = ramp(h, w)
    thermal = 0.3 + 0.3 * (xy[0] / (w - 1) + xy[1] / (h - 1)) / 2  # in [0.3, 0.6]: no jitter reaches a clamp
    image = torch.cat([torch.rand(3, h, w), thermal[None]])  # (4, H, W): colourful RGB, ramp thermal
    seeds = range(12)
    views = []
    for seed in seeds:
        torch.manual_seed(seed)
        views.append(A.moco_v2_view(image, size, visible_channels=3))
    _geometric_only(monkeypatch)
    rgb_changed = 0
    for seed, view in zip(seeds, views):
        torch.manual_seed(seed)
        reference = A.moco_v2_view(image, size, visible_channels=3)  # crop, blur, flip only
        residual, slope = _affine_residual(view[3], reference[3])
        assert residual < 1e-5 and slope > 0, (seed, residual, slope)
        rgb_changed += not torch.allclose(view[:3], reference[:3], atol=1e-4)
    assert rgb_changed >= len(seeds) // 2  # the colour jitter fires with p = 0.8


def test_view_shapes_range_and_single_channel(monkeypatch):
    for channels, visible in ((3, 3), (4, 3), (1, 0)):
        for _ in range(4):
            view = A.moco_v2_view(torch.rand(channels, 30, 36), 16, visible_channels=visible)
            assert view.shape == (channels, 16, 16) and view.dtype == torch.float32
            assert 0.0 <= view.min() and view.max() <= 1.0
    with pytest.raises(ValueError):
        A.moco_v2_view(torch.rand(1, 30, 36), 16, visible_channels=3)
    # C = 1 (thermal only): again an affine function of its geometric-only view.
    image = ramp(30, 36)[:1] / 35 * 0.3 + 0.3
    torch.manual_seed(3)
    view = A.moco_v2_view(image, 16, visible_channels=0)
    _geometric_only(monkeypatch)
    torch.manual_seed(3)
    assert _affine_residual(view, A.moco_v2_view(image, 16, visible_channels=0))[0] < 1e-5


def test_two_views_differ():
    q, k = A.two_views(torch.rand(4, 32, 32), 16, visible_channels=3)
    assert q.shape == k.shape == (4, 16, 16)
    assert not torch.allclose(q, k)


# ---- optional: torchvision as the behavioural reference ------------------------------------------------------------

def test_colour_ops_match_torchvision():
    TF = pytest.importorskip("torchvision.transforms.functional")
    image = torch.rand(3, 17, 23)
    image[:, 0, 0] = 0.5  # a grey pixel
    image[:, 1, 1] = 0.0
    for shift in (0.0, 0.1, -0.1, 1 / 3, 0.5, -0.5):
        assert torch.allclose(A.adjust_hue(image, shift), TF.adjust_hue(image, shift), atol=1e-5)
    for factor in (0.0, 0.6, 1.4):
        assert torch.allclose(A.adjust_brightness(image, factor), TF.adjust_brightness(image, factor), atol=1e-6)
    # torchvision's tensor luma weighs red 0.2989 (ITU-R 601-2: 0.299): equal to 1e-5 where red is 0, 1e-4 apart else.
    no_red = image.clone()
    no_red[0] = 0.0
    for img, atol in ((no_red, 1e-5), (image, 1.1e-4)):
        assert torch.allclose(A.to_grayscale(img), TF.rgb_to_grayscale(img, 3), atol=atol)
        for factor in (0.0, 0.6, 1.4):
            assert torch.allclose(A.adjust_saturation(img, factor), TF.adjust_saturation(img, factor), atol=atol)
            assert torch.allclose(A.adjust_contrast(img, factor), TF.adjust_contrast(img, factor), atol=atol)


def test_blur_and_crop_box_match_torchvision():
    pytest.importorskip("torchvision")
    import torchvision.transforms.functional as TF
    from torchvision.transforms import RandomResizedCrop

    image = torch.rand(4, 17, 23)
    for sigma in (0.1, 0.7, 2.0):
        size = 2 * math.ceil(3 * sigma) + 1
        assert torch.allclose(A.gaussian_blur(image, sigma), TF.gaussian_blur(image, size, sigma), atol=1e-6)
    for seed in range(50):
        for h, w, scale in ((40, 70, (0.2, 1.0)), (100, 10, (0.9, 1.0))):  # the second one falls back
            torch.manual_seed(seed)
            ours = A.random_resized_crop_box(h, w, scale)
            torch.manual_seed(seed)
            assert ours == tuple(RandomResizedCrop.get_params(torch.zeros(1, h, w), list(scale), [3 / 4, 4 / 3]))
