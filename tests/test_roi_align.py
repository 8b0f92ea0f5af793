"""Tests for minimask.ops.roi_align: hand-computed values, the fast form against the definition (forward and
gradients), edge cases, dtypes, resize consistency and (where installed) torchvision as an oracle."""
import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F

from minimask.ops.roi_align import roi_align, roi_align_reference

roi_align_module = importlib.import_module("minimask.ops.roi_align_sparse")  # the fast form, with its chunking

# 1x1x5x5 map with value v(y, x) = 5*y + x. Bilinear interpolation reproduces a linear function exactly, so a
# sample at (y, x) inside the map reads 5*y + x, and a bin is 5*mean(y) + mean(x) over its samples.
ARANGE = torch.arange(25, dtype=torch.float32).view(1, 1, 5, 5)


def _rois(*boxes):
    return torch.tensor([[0.0, *b] for b in boxes])


# ---------------------------------------------------------------------------------------------- hand-computed values
def test_box_inside_2x2_aligned_false():
    # Box (1,1,3,3): start 1, size 2, bin 1. sampling 2: samples at 1.25, 1.75 | 2.25, 2.75 -> means 1.5 | 2.5.
    # out = 5*cy + cx = [[5*1.5+1.5, 5*1.5+2.5], [5*2.5+1.5, 5*2.5+2.5]].
    expected = torch.tensor([[9.0, 10.0], [14.0, 15.0]])
    for sr in (2, 1, 0, -1):  # adaptive: ceil(2/2) = 1 sample at the bin centre, same means
        out = roi_align(ARANGE, _rois((1, 1, 3, 3)), 2, 1.0, sr, aligned=False)
        torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-6)


def test_box_inside_2x2_aligned_true():
    # aligned: start 1 - 0.5 = 0.5, size 2, bin 1 -> bin centres 1.0, 2.0 -> [[5+1, 5+2], [10+1, 10+2]].
    expected = torch.tensor([[6.0, 7.0], [11.0, 12.0]])
    for sr in (2, 0):
        out = roi_align(ARANGE, _rois((1, 1, 3, 3)), 2, 1.0, sr, aligned=True)
        torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-6)


def test_box_inside_4x4():
    # aligned=False: start 1, bin 0.5 -> centres 1.25, 1.75, 2.25, 2.75; out[i, j] = 5*c_i + c_j.
    expected_false = torch.tensor([[7.5, 8.0, 8.5, 9.0],
                                   [10.0, 10.5, 11.0, 11.5],
                                   [12.5, 13.0, 13.5, 14.0],
                                   [15.0, 15.5, 16.0, 16.5]])
    # aligned=True: start 0.5, bin 0.5 -> centres 0.75, 1.25, 1.75, 2.25.
    expected_true = torch.tensor([[4.5, 5.0, 5.5, 6.0],
                                  [7.0, 7.5, 8.0, 8.5],
                                  [9.5, 10.0, 10.5, 11.0],
                                  [12.0, 12.5, 13.0, 13.5]])
    for sr in (2, -1):
        out_f = roi_align(ARANGE, _rois((1, 1, 3, 3)), (4, 4), 1.0, sr, aligned=False)
        out_t = roi_align(ARANGE, _rois((1, 1, 3, 3)), (4, 4), 1.0, sr, aligned=True)
        torch.testing.assert_close(out_f[0, 0], expected_false, rtol=0, atol=1e-6)
        torch.testing.assert_close(out_t[0, 0], expected_true, rtol=0, atol=1e-6)


def test_borders_clamp_and_drop_samples():
    # (2.5, 2.5, 5.5, 5.5), 2x2, sampling 1: bin 1.5, centres 3.25 and 4.75; 4.75 <= H = 5 is kept but reads the
    # last row/column (the kernel's y_low >= H-1 case): effective coordinates 3.25, 4.
    out = roi_align(ARANGE, _rois((2.5, 2.5, 5.5, 5.5)), 2, 1.0, 1, aligned=False)
    torch.testing.assert_close(out[0, 0], torch.tensor([[19.5, 20.25], [23.25, 24.0]]), rtol=0, atol=1e-6)
    # (4.5, 4.5, 6.5, 6.5): centres 5.0 (kept, clamped to 4) and 6.0 (> W = 5: contributes 0).
    out = roi_align(ARANGE, _rois((4.5, 4.5, 6.5, 6.5)), 2, 1.0, 1, aligned=False)
    torch.testing.assert_close(out[0, 0], torch.tensor([[24.0, 0.0], [0.0, 0.0]]), rtol=0, atol=1e-6)
    # x in (-1.75, 0.25): centres -1.25 (< -1: 0) and -0.25 (kept, y <= 0 -> 0); y in (1, 3): centres 1.5, 2.5.
    out = roi_align(ARANGE, _rois((-1.75, 1.0, 0.25, 3.0)), 2, 1.0, 1, aligned=False)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 7.5], [0.0, 12.5]]), rtol=0, atol=1e-6)


def test_count_includes_dropped_samples():
    # (2, 2, 6, 6), 1x1, adaptive: grid ceil(4/1) = 4 per axis at 2.5, 3.5, 4.5, 5.5. Effective coordinates
    # 2.5, 3.5, 4 (clamped) and 5.5 dropped (> 5). Sum over the 3x3 kept pairs of 5*y + x = 5*3*10 + 3*10 = 180,
    # divided by count = 16 samples (dropped ones included): 11.25.
    out = roi_align(ARANGE, _rois((2, 2, 6, 6)), 1, 1.0, 0, aligned=False)
    assert out.item() == pytest.approx(11.25, abs=1e-6)
    # sampling 2: bin 4, samples at 3 and 5 (kept, clamped to 4): (5*(3+3+4+4) + (3+4+3+4)) / 4 = 84 / 4 = 21.
    out = roi_align(ARANGE, _rois((2, 2, 6, 6)), 1, 1.0, 2, aligned=False)
    assert out.item() == pytest.approx(21.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------- the definition
def _random_rois(k, n, h, w, scale, generator):
    """Boxes of all sizes (including tiny and inverted) around and partly outside an (h, w) map at `scale`."""
    xy = torch.rand(k, 2, generator=generator) * torch.tensor([w + 4.0, h + 4.0]) / scale - 2 / scale
    wh = torch.rand(k, 2, generator=generator) * torch.tensor([w, h]) / scale
    wh[:2] = torch.tensor([[0.3, 0.2], [-1.0, 2.0]])  # sub-pixel and inverted boxes
    ids = torch.randint(0, n, (k, 1), generator=generator).double()
    return torch.cat([ids, xy, xy + wh], dim=1).double()  # (K, 5)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3, 0, -1])
def test_fast_form_equals_the_definition(sampling_ratio, aligned):
    """roi_align (sparse matrix products) against roi_align_reference (the definition, sample by sample)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, 7, generator=gen, dtype=torch.float64)
    rois = _random_rois(10, 2, 6, 7, 0.5, gen)
    for output_size in [(2, 3), (3, 3)]:
        expected = roi_align_reference(x, rois, output_size, 0.5, sampling_ratio, aligned)
        got = roi_align(x, rois, output_size, 0.5, sampling_ratio, aligned)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        # The list-of-boxes format gives the same rows, in list order.
        per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
        got_list = roi_align(x, per_image, output_size, 0.5, sampling_ratio, aligned)
        order = torch.cat([torch.nonzero(rois[:, 0] == i).squeeze(1) for i in range(2)])
        torch.testing.assert_close(got_list, expected[order], rtol=0, atol=1e-12)


@pytest.mark.parametrize("sampling_ratio, aligned", [(2, False), (0, True)])
def test_fast_gradient_equals_the_definitions(sampling_ratio, aligned):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = _random_rois(8, 2, 6, 7, 0.5, gen)
    grad = torch.randn(8, 3, 2, 3, generator=gen, dtype=torch.float64)
    (expected,) = torch.autograd.grad(roi_align_reference(x, rois, (2, 3), 0.5, sampling_ratio, aligned), x, grad)
    (got,) = torch.autograd.grad(roi_align(x, rois, (2, 3), 0.5, sampling_ratio, aligned), x, grad)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sampling_ratio, aligned", [(2, False), (0, True), (-1, False), (3, True)])
def test_gradcheck(sampling_ratio, aligned):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = _random_rois(6, 2, 5, 6, 1.0, gen)
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, (2, 3), 1.0, sampling_ratio, aligned), (x,))


def test_small_chunks_give_the_same_result(monkeypatch):
    # Force many chunks (forward) and many sorted slices (backward); results must not change.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 12, 10, generator=gen, requires_grad=True)
    rois = _random_rois(30, 2, 12, 10, 0.5, gen).float()
    grad = torch.randn(30, 4, 3, 3, generator=gen)
    for sr in (2, 0):
        expected = roi_align(x, rois, 3, 0.5, sr, True)
        (expected_grad,) = torch.autograd.grad(expected, x, grad)
        monkeypatch.setattr(roi_align_module, "_CHUNK_BYTES", 4096)
        got = roi_align(x, rois, 3, 0.5, sr, True)
        (got_grad,) = torch.autograd.grad(got, x, grad)
        monkeypatch.undo()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_grad, expected_grad, rtol=0, atol=1e-5)


def test_chunks_respect_the_memory_budget(monkeypatch):
    # Every chunk's (bins x entries) table fits the budget (~32 bytes per entry), unless it holds a single RoI, and
    # every RoI with a sample in the map is in exactly one chunk.
    monkeypatch.setattr(roi_align_module, "_CHUNK_BYTES", 32 * 5000)
    gen = torch.Generator().manual_seed(7)
    rois = _random_rois(60, 1, 40, 50, 0.25, gen).float()
    for sr in (2, 0):
        seen = []
        maps = roi_align_module._maps_of(rois, torch.zeros(len(rois), dtype=torch.int64), [0.25], [(1, 40, 50)], True)
        for ids, idx, wts in roi_align_module._sampling_chunks(maps, (7, 7), sr, 40 * 50, torch.int32):
            assert idx.shape == wts.shape and idx.shape[0] == len(ids) * 49
            assert idx.numel() <= 5000 or len(ids) == 1
            seen += ids.tolist()
        assert len(seen) == len(set(seen)) and len(seen) >= 55  # a few boxes may lie entirely outside


# ---------------------------------------------------------------------------------------------- edge cases
def test_no_boxes():
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    for boxes in (torch.zeros(0, 5), [torch.zeros(0, 4), torch.zeros(0, 4)]):
        for sr in (2, 0):
            out = roi_align(x, boxes, (2, 4), 0.5, sr, True)
            assert out.shape == (0, 3, 2, 4) and out.dtype == x.dtype
            (grad,) = torch.autograd.grad(out.sum(), x)
            assert torch.equal(grad, torch.zeros_like(x))


def test_empty_batch():
    x = torch.zeros(0, 3, 5, 5)
    assert roi_align(x, [], 2).shape == (0, 3, 2, 2)
    assert roi_align(x, torch.zeros(0, 5), 2, sampling_ratio=2).shape == (0, 3, 2, 2)
    with pytest.raises(ValueError, match="empty batch"):
        roi_align(x, _rois((0, 0, 1, 1)), 2)


def test_zero_size_boxes():
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    rois = _rois((2, 3, 2, 3), (1, 1, 4, 1)).double()  # a point and a horizontal line
    for sr, aligned in itertools.product([2, 0], [False, True]):
        got = roi_align(x, rois, 2, 1.0, sr, aligned)
        torch.testing.assert_close(got, roi_align_reference(x, rois, (2, 2), 1.0, sr, aligned), rtol=0, atol=1e-12)
    # aligned adaptive: a zero height means a zero grid, i.e. no samples: all zeros.
    assert torch.equal(roi_align(x, rois, 2, 1.0, 0, True), torch.zeros(2, 2, 2, 2, dtype=torch.float64))
    # aligned=False clamps the size to 1x1, so the point box still averages real pixels.
    assert roi_align(x, rois, 2, 1.0, 0, False)[0].abs().sum() > 0


def test_nan_boxes_give_zeros():
    # Documented: a NaN coordinate makes every sample of that box invalid -> zeros, and no gradient.
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    rois = _rois((float("nan"), 1, 3, 3), (1, 1, 3, 3))
    for sr, aligned in itertools.product([2, 0], [False, True]):
        out = roi_align(x, rois, 2, 1.0, sr, aligned)
        assert torch.equal(out[0], torch.zeros(2, 2, 2)) and out[1].abs().sum() > 0
        (grad,) = torch.autograd.grad(out[0].sum(), x)
        assert torch.equal(grad, torch.zeros_like(x))


def test_features_outside_the_footprint_are_never_read():
    # Samples outside the map (and padding entries) read nothing, so non-finite features that no sample touches
    # cannot turn a result into NaN (0 * inf would). This is what torchvision's CUDA kernel does; its CPU kernel
    # multiplies pixel (0, 0) by a zero weight for such samples, so there the inf below would leak.
    x = torch.randn(1, 2, 6, 6)
    x[0, :, 0, 0] = float("inf")
    x[0, :, 5, 0] = float("nan")
    rois = _rois((4.0, 3.0, 9.0, 8.0), (3.0, -4.0, 9.0, 2.0))  # right / top border, partly outside
    for sr, aligned in itertools.product([2, 0], [False, True]):
        assert torch.isfinite(roi_align(x, rois, 3, 1.0, sr, aligned)).all()


def test_bad_input_raises():
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match="4-D"):
        roi_align(torch.randn(2, 5, 5), _rois((0, 0, 1, 1)), 2)
    with pytest.raises(ValueError, match=r"\(K, 5\)"):
        roi_align(x, torch.zeros(3, 4), 2)
    with pytest.raises(ValueError, match=r"\(K, 5\)"):
        roi_align(x, torch.zeros(5), 2)
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        roi_align(x, [torch.zeros(3, 5)], 2)
    with pytest.raises(ValueError, match="batch of 1"):
        roi_align(x, [torch.zeros(1, 4), torch.zeros(1, 4)], 2)
    with pytest.raises(ValueError, match="output_size"):
        roi_align(x, _rois((0, 0, 1, 1)), (0, 2))


# ---------------------------------------------------------------------------------------------- dtypes and scale
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input(dtype):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 8, 10, 12, generator=gen).to(dtype).requires_grad_()
    rois = _random_rois(12, 1, 10, 12, 1.0, gen).float()
    for sr in (2, 0):
        out = roi_align(x, rois, 3, 1.0, sr, True)
        assert out.dtype == dtype
        # The same values in float32: accumulation is float32 either way, only the final rounding differs.
        ref = roi_align(x.detach().float(), rois, 3, 1.0, sr, True)
        tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
        (grad,) = torch.autograd.grad(out.float().sum(), x)
        assert grad.dtype == dtype


def test_memory_format_does_not_matter():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 4, 9, 11, generator=gen)
    rois = _random_rois(10, 2, 9, 11, 1.0, gen).float()
    expected = roi_align(x, rois, 3, 1.0, 0, True)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    got = roi_align(x_cl, rois, 3, 1.0, 0, True)
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    grad = torch.randn(3, 3, 10, 4, generator=gen).permute(2, 3, 0, 1)  # non-contiguous incoming gradient
    (g_cl,) = torch.autograd.grad(got, x_cl, grad)
    x.requires_grad_()
    (g,) = torch.autograd.grad(roi_align(x, rois, 3, 1.0, 0, True), x, grad.contiguous())
    torch.testing.assert_close(g_cl, g, rtol=0, atol=0)


def test_downsampled_map_with_half_scale_matches():
    # detectron2's resize test: with aligned=True, a box whose bins are exactly 2 px wide samples the pixels
    # (2i, 2i+1) at full resolution (adaptive grid 2) and pixel i of the 2x-downsampled map (grid 1), which is the
    # average of (2i, 2i+1). So pooling the bilinear 2x downsample at spatial_scale/2 gives the same numbers.
    gen = torch.Generator().manual_seed(5)
    image = torch.rand(1, 3, 32, 40, generator=gen) * 100
    half = F.interpolate(image, scale_factor=0.5, mode="bilinear", align_corners=False)  # averages 2x2 blocks
    boxes = torch.tensor([[0.0, 4, 6, 14, 16], [0.0, 10, 2, 30, 22], [0.0, 0, 0, 10, 10]])  # bins 2 px for 5x5
    full = roi_align(image, boxes, 5, 1.0, 0, aligned=True)
    halved = roi_align(half, boxes, 5, 0.5, 0, aligned=True)
    torch.testing.assert_close(halved, full, rtol=0, atol=1e-4)


def test_linear_image_at_any_resolution():
    # A map that samples f(u, v) = 3u - 2v + 1 at pixel centres ((i + 0.5) * stride) gives, with aligned=True and a
    # fixed sampling grid, the same pooled values at every stride (sample points are the same image points); the
    # half-pixel misalignment of aligned=False shows up as a shift.
    def linear_map(stride, size):
        centres = (torch.arange(size, dtype=torch.float64) + 0.5) * stride
        return (3 * centres[None, :] - 2 * centres[:, None] + 1)[None, None]  # (1, 1, size, size)

    boxes = torch.tensor([[0.0, 8, 12, 40, 30], [0.0, 20, 5, 28, 50]], dtype=torch.float64)
    outs = [roi_align(linear_map(s, 64 // s), boxes, (3, 4), 1 / s, 2, aligned=True) for s in (1, 2, 4)]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-9)
    torch.testing.assert_close(outs[2], outs[0], rtol=0, atol=1e-9)
    misaligned = [roi_align(linear_map(s, 64 // s), boxes, (3, 4), 1 / s, 2, aligned=False) for s in (1, 2)]
    assert (misaligned[1] - misaligned[0]).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------- torchvision oracle
def test_matches_torchvision():
    tv = pytest.importorskip("torchvision")
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 24, 30, generator=gen, requires_grad=True)
    rois = _random_rois(40, 2, 24, 30, 0.25, gen).float()
    huge = torch.tensor([[0.0, -400, -300, 600, 500], [1.0, 50, 60, 2000, 90]])  # many times the map
    rois = torch.cat([rois, huge])
    for sr, aligned, output_size in itertools.product([1, 2, 3, 0, -1], [False, True], [7, (3, 5)]):
        expected = tv.ops.roi_align(x, rois, output_size, 0.25, sr, aligned)
        got = roi_align(x, rois, output_size, 0.25, sr, aligned)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        grad = torch.randn(expected.shape, generator=gen)
        (g_expected,) = torch.autograd.grad(expected, x, grad)
        (g_got,) = torch.autograd.grad(got, x, grad)
        torch.testing.assert_close(g_got, g_expected, rtol=0, atol=1e-5)
        per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
        torch.testing.assert_close(roi_align(x, per_image, output_size, 0.25, sr, aligned),
                                   tv.ops.roi_align(x, per_image, output_size, 0.25, sr, aligned), rtol=0, atol=1e-5)
