"""Tests for minimask.ops.poolers: FPN level assignment (Eqn. 1 of FPN) and multi-level RoIAlign."""
import pytest
import torch

from minimask.ops.poolers import assign_boxes_to_levels, multiscale_roi_align
from minimask.ops.roi_align import roi_align

SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]  # P2..P5


def _square(side, x=10.0, y=20.0):
    return [x, y, x + side, y + side]


def test_level_assignment_hand_picked_sizes():
    # k = floor(4 + log2(sqrt(w*h) / 224 + 1e-8)) clamped to [2, 5], returned as k - 2.
    boxes = torch.tensor([_square(224), _square(112), _square(56), _square(2), _square(448), _square(5000),
                          _square(223.9), _square(300), [0.0, 0.0, 448.0, 112.0]])  # last: sqrt(448*112) = 224
    expected = torch.tensor([4, 3, 2, 2, 5, 5, 3, 4, 4]) - 2
    got = assign_boxes_to_levels(boxes, 2, 5)
    assert got.dtype == torch.int64
    assert torch.equal(got, expected)


def test_level_assignment_canonical_and_degenerate():
    boxes = torch.tensor([_square(224), _square(0), [5.0, 5.0, 1.0, 9.0], [float("nan"), 0.0, 1.0, 1.0]])
    # With canonical size 112 at level 3, a 224 box is one level up: 4 -> index 4 - 3 = 1 of levels 3..6.
    assert assign_boxes_to_levels(boxes[:1], 3, 6, canonical_size=112, canonical_level=3).tolist() == [1]
    # Empty, inverted and NaN boxes go to the finest level.
    assert assign_boxes_to_levels(boxes[1:], 2, 5).tolist() == [0, 0, 0]
    assert assign_boxes_to_levels(torch.zeros(0, 4), 2, 5).shape == (0,)
    with pytest.raises(ValueError, match=r"\(R, 4\)"):
        assign_boxes_to_levels(torch.zeros(3, 5), 2, 5)


def _features(batch=2, channels=3, generator=None, requires_grad=False):
    sizes = [(32, 48), (16, 24), (8, 12), (4, 6)]  # a 128 x 192 image at strides 4..32
    return [torch.randn(batch, channels, h, w, generator=generator).requires_grad_(requires_grad) for h, w in sizes]


def test_multiscale_equals_per_level_roi_align_in_order():
    gen = torch.Generator().manual_seed(0)
    feats = _features(generator=gen)
    # Boxes of all four levels, interleaved across levels and images.
    boxes = [torch.tensor([_square(30, 5, 5), _square(250, 0, 0), _square(120, 40, 3), _square(60, 70, 50)]),
             torch.tensor([_square(500, 0, 0), _square(16, 100, 60), _square(130, 10, 10)])]
    for sampling_ratio, aligned in [(0, True), (2, False)]:
        out = multiscale_roi_align(feats, boxes, (7, 5), SCALES, sampling_ratio, aligned)
        assert out.shape == (7, 3, 7, 5)
        all_boxes = torch.cat(boxes)
        levels = assign_boxes_to_levels(all_boxes, 2, 5)
        assert sorted(set(levels.tolist())) == [0, 1, 2, 3]
        image_of = [0, 0, 0, 0, 1, 1, 1]
        for row, (box, level, image) in enumerate(zip(all_boxes, levels.tolist(), image_of)):
            rois = torch.cat([torch.tensor([float(image)]), box])[None]  # (1, 5)
            expected = roi_align(feats[level], rois, (7, 5), SCALES[level], sampling_ratio, aligned)
            torch.testing.assert_close(out[row], expected[0], rtol=0, atol=0)


def test_gradients_reach_every_level():
    gen = torch.Generator().manual_seed(1)
    feats = _features(generator=gen, requires_grad=True)
    boxes = [torch.tensor([_square(30), _square(120), _square(250, 0, 0), _square(480, 0, 0)]), torch.zeros(0, 4)]
    assert assign_boxes_to_levels(boxes[0], 2, 5).tolist() == [0, 1, 2, 3]  # one box per level
    out = multiscale_roi_align(feats, boxes, 7, SCALES, 0, True)
    grads = torch.autograd.grad(out.square().sum(), feats)
    assert all(g.abs().sum() > 0 for g in grads)
    assert all(g[1].abs().sum() == 0 for g in grads)  # image 1 has no boxes


@pytest.mark.parametrize("sampling_ratio, aligned", [(0, True), (2, False)])
def test_one_call_for_all_levels_equals_the_definition_forward_and_backward(sampling_ratio, aligned):
    """All levels in one sparse product against `multiscale_roi_align_reference` (a roi_align call per level)."""
    from minimask.ops.poolers import multiscale_roi_align_reference

    gen = torch.Generator().manual_seed(2)
    feats = [f.double().requires_grad_() for f in _features(generator=gen)]
    boxes = [torch.tensor([_square(30, 5, 5), _square(250, 0, 0), _square(120, 40, 3), _square(60, 70, 50)]),
             torch.tensor([_square(500, 0, 0), _square(16, 100, 60), _square(130, 10, 10)])]
    boxes = [b.double() for b in boxes]
    grad = torch.randn(7, 3, 7, 5, generator=gen, dtype=torch.float64)
    got = multiscale_roi_align(feats, boxes, (7, 5), SCALES, sampling_ratio, aligned)
    want = multiscale_roi_align_reference(feats, boxes, (7, 5), SCALES, sampling_ratio, aligned)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got, feats, grad), torch.autograd.grad(want, feats, grad)):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_empty_boxes_and_single_level():
    feats = _features()
    out = multiscale_roi_align(feats, [torch.zeros(0, 4), torch.zeros(0, 4)], 7, SCALES, 0, True)
    assert out.shape == (0, 3, 7, 7) and out.dtype == feats[0].dtype
    boxes = [torch.tensor([_square(500, 0, 0)]), torch.tensor([_square(8)])]
    single = multiscale_roi_align(feats[:1], boxes, 7, SCALES[:1], 2, True)  # no level assignment with one level
    expected = roi_align(feats[0], boxes, 7, SCALES[0], 2, True)
    torch.testing.assert_close(single, expected, rtol=0, atol=0)


def test_bad_input_raises():
    feats = _features()
    boxes = [torch.zeros(1, 4), torch.zeros(1, 4)]
    with pytest.raises(ValueError, match="scales"):
        multiscale_roi_align(feats, boxes, 7, SCALES[:3], 0, True)
    with pytest.raises(ValueError, match="consecutive"):
        multiscale_roi_align(feats, boxes, 7, [1 / 4, 1 / 8, 1 / 32, 1 / 64], 0, True)
    with pytest.raises(ValueError, match="consecutive"):
        multiscale_roi_align(feats, boxes, 7, [1 / 3, 1 / 6, 1 / 12, 1 / 24], 0, True)
    with pytest.raises(ValueError, match="list of 2"):
        multiscale_roi_align(feats, boxes[:1], 7, SCALES, 0, True)
    with pytest.raises(ValueError, match=r"boxes\[1\]"):
        multiscale_roi_align(feats, [torch.zeros(1, 4), torch.zeros(1, 5)], 7, SCALES, 0, True)
    with pytest.raises(ValueError, match=r"features\[1\]"):
        multiscale_roi_align([feats[0], feats[1][:, :2]], boxes, 7, SCALES[:2], 0, True)
