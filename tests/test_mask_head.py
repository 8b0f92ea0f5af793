"""Tests for minimask.model.mask_head: the head, bitmap and polygon targets, the loss and the paste into the image."""
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from torch import nn

from minimask.model.mask_head import MaskHead, mask_loss, mask_targets, paste_masks, polygon_mask_targets

# ----------------------------------------------------------------------------------------------------------- head

def test_head_shapes_and_conv_bias():
    head = MaskHead(in_channels=16, conv_dims=(32, 32), norm="GN", num_classes=3)
    assert head(torch.randn(2, 16, 14, 14)).shape == (2, 3, 28, 28)
    assert head(torch.randn(0, 16, 14, 14)).shape == (0, 3, 28, 28)
    convs = [m for m in head.convs if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 and all(c.bias is None for c in convs)  # normed convs have no bias
    assert sum(isinstance(m, nn.GroupNorm) for m in head.convs) == 2
    assert head.deconv.bias is not None and head.predictor.bias is not None

    plain = MaskHead(in_channels=16, conv_dims=(8,), norm="", num_classes=2)
    assert plain.convs[0].bias is not None and len(plain.convs) == 2  # conv + ReLU, no norm layer
    with pytest.raises(ValueError, match="MaskHead expects"):
        head(torch.randn(2, 8, 14, 14))


def test_matmul_deconv_and_predictor_equal_the_modules():
    # On the CPU, forward computes the deconv and the 1x1 predictor as matmuls (deconv_relu_predict); the modules
    # themselves are the reference.
    torch.manual_seed(0)
    head = MaskHead(in_channels=8, conv_dims=(32,), norm="GN", num_classes=3)
    for p in (head.deconv.bias, head.predictor.weight, head.predictor.bias):
        nn.init.normal_(p)  # non-trivial values (the init zeroes the biases)
    x = torch.randn(5, 8, 7, 9, requires_grad=True)  # non-square, to catch a swapped axis
    grad_out = torch.randn(5, 3, 14, 18)
    got = head(x)
    (got * grad_out).sum().backward()
    got_grads = [t.grad.clone() for t in (x, head.deconv.weight, head.deconv.bias, head.predictor.weight)]
    for t in (x, *head.parameters()):
        t.grad = None
    ref = head.predictor(torch.relu(head.deconv(head.convs(x))))
    (ref * grad_out).sum().backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for g, t in zip(got_grads, (x, head.deconv.weight, head.deconv.bias, head.predictor.weight)):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-4)


def test_default_head_layout_and_init_statistics():
    head = MaskHead(num_classes=80)
    convs = [m for m in head.convs if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and sum(isinstance(m, nn.GroupNorm) for m in head.convs) == 4
    assert head.deconv.kernel_size == (2, 2) and head.deconv.stride == (2, 2) and head.deconv.out_channels == 256
    assert head.predictor.weight.shape == (80, 256, 1, 1)
    for conv in convs:  # kaiming_normal, fan_out = 256 * 3 * 3
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.05)
    # ConvTranspose2d weights are (in, out, kh, kw); torch's fan_out is then 256 * 2 * 2, as in detectron2.
    assert head.deconv.weight.std().item() == pytest.approx(math.sqrt(2 / (256 * 4)), rel=0.05)
    assert head.predictor.weight.std().item() == pytest.approx(0.001, rel=0.05)
    for bias in (head.deconv.bias, head.predictor.bias):
        assert torch.count_nonzero(bias) == 0


# -------------------------------------------------------------------------------------------------------- targets

def test_box_filled_mask_gives_all_ones_and_batch_index_selects_gt():
    gt = torch.zeros(2, 50, 60, dtype=torch.uint8)
    gt[0, 5:47, 10:38] = 1  # GT 0 is exactly box (10, 5, 38, 47); GT 1 is empty
    boxes = torch.tensor([[10.0, 5.0, 38.0, 47.0], [10.0, 5.0, 38.0, 47.0], [0.0, 0.0, 60.0, 50.0]])
    targets = mask_targets([gt], [boxes], [torch.tensor([0, 1, 1])], 28)
    assert targets.shape == (3, 28, 28) and targets.dtype == torch.float32
    assert torch.equal(targets[0], torch.ones(28, 28))
    assert torch.equal(targets[1:], torch.zeros(2, 28, 28))


def test_half_filled_mask_gives_left_and_top_halves():
    gt = torch.zeros(2, 70, 80, dtype=torch.bool)
    gt[0, 4:60, 8:36] = True  # left half of box (8, 4, 64, 60)
    gt[1, 4:32, 8:64] = True  # top half of the same box
    boxes = torch.tensor([[8.0, 4.0, 64.0, 60.0]] * 2)
    targets = mask_targets([gt], [boxes], [torch.tensor([0, 1])], 28)
    expected_left = torch.zeros(28, 28)
    expected_left[:, :14] = 1
    assert torch.equal(targets[0], expected_left)
    assert torch.equal(targets[1], expected_left.T)


def test_images_of_different_sizes_in_one_call_equal_one_call_each():
    g = torch.Generator().manual_seed(3)
    gts = [torch.rand(3, 40, 60, generator=g) > 0.5, torch.rand(2, 70, 30, generator=g) > 0.5,
           torch.zeros(0, 20, 20, dtype=torch.bool)]
    boxes = [torch.tensor([[2.0, 3.0, 50.0, 30.0], [10.0, 0.0, 20.0, 40.0]]), torch.tensor([[0.0, 5.0, 29.0, 66.0]]),
             torch.zeros(0, 4)]
    matched = [torch.tensor([2, 0]), torch.tensor([1]), torch.zeros(0, dtype=torch.long)]
    together = mask_targets(gts, boxes, matched, 28)
    one_by_one = torch.cat([mask_targets([m], [b], [i], 28) for m, b, i in zip(gts, boxes, matched)])
    assert together.shape == (3, 28, 28) and torch.equal(together, one_by_one)
    soft = mask_targets(gts, boxes, matched, 28, aligned=False, binarize=False)
    assert torch.equal(soft, torch.cat([mask_targets([m], [b], [i], 28, aligned=False, binarize=False)
                                        for m, b, i in zip(gts, boxes, matched)]))


def test_targets_empty_inputs_and_errors():
    gt = torch.zeros(0, 20, 30, dtype=torch.uint8)
    assert mask_targets([gt], [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)], 28).shape == (0, 28, 28)
    assert polygon_mask_targets([], torch.zeros(0, 4), 28).shape == (0, 28, 28)
    with pytest.raises(ValueError, match="gt_masks is empty"):
        mask_targets([gt], [torch.zeros(1, 4)], [torch.zeros(1, dtype=torch.long)], 28)
    with pytest.raises(ValueError, match="matched_idxs"):
        mask_targets([torch.zeros(1, 20, 30)], [torch.zeros(2, 4)], [torch.zeros(3, dtype=torch.long)], 28)
    with pytest.raises(ValueError, match="polygons has 1 entries"):
        polygon_mask_targets([[]], torch.zeros(2, 4), 28)


def test_polygon_rectangle_equals_box_fill():
    rect = [8.0, 16.0, 40.0, 16.0, 40.0, 48.0, 8.0, 48.0]  # rectangle (8, 16, 40, 48)
    boxes = torch.tensor([[8.0, 16.0, 40.0, 48.0], [0.0, 0.0, 56.0, 56.0]])  # the rectangle itself; a 2x larger RoI
    targets = polygon_mask_targets([[rect], [np.array(rect)]], boxes, 28)
    assert torch.equal(targets[0], torch.ones(28, 28))
    expected = torch.zeros(28, 28)
    expected[8:24, 4:20] = 1  # the rectangle / 2
    assert torch.equal(targets[1], expected)
    # An object without usable polygons (a 2-point "polygon" has no area) gives an empty target.
    assert torch.equal(polygon_mask_targets([[[1.0, 2.0, 3.0, 4.0]]], boxes[:1], 28), torch.zeros(1, 28, 28))


def test_polygon_targets_agree_with_bitmap_targets():
    gen = torch.Generator().manual_seed(1)
    h, w = 90, 100
    angles = torch.linspace(0, 2 * math.pi, 15)[:-1]
    radii = 15 + 20 * torch.rand(14, generator=gen)
    xs, ys = 50 + radii * torch.cos(angles), 45 + 0.8 * radii * torch.sin(angles)
    polygon = torch.stack((xs, ys), dim=1).flatten()  # (28,) a star-shaped 14-gon
    bitmap = torch.from_numpy(mask_util.decode(mask_util.frPyObjects([polygon.double().numpy()], h, w)))[..., 0]
    tight = torch.tensor([[xs.min(), ys.min(), xs.max(), ys.max()]])
    boxes = torch.cat([tight, tight + torch.tensor([[-4.0, 3.0, 2.5, 6.0]]), tight + torch.tensor([[5.0, -2, -3, 1]])])
    from_polygons = polygon_mask_targets([[polygon]] * 3, boxes, 28)
    from_bitmap = mask_targets([bitmap[None]], [boxes], [torch.zeros(3, dtype=torch.long)], 28)
    inter = (from_polygons * from_bitmap).sum(dim=(1, 2))
    union = ((from_polygons + from_bitmap) > 0).sum(dim=(1, 2))
    assert (from_bitmap.sum(dim=(1, 2)) > 200).all()
    assert (inter / union > 0.9).all(), inter / union


# ----------------------------------------------------------------------------------------------------------- loss

def test_mask_loss_hand_computed_uses_gt_class_map():
    logits = torch.tensor([[[[0.0, 1.0], [-2.0, 3.0]], [[0.5, -0.5], [1.5, -1.0]]],
                           [[[2.0, -1.0], [0.0, 0.0]], [[9.0, 9.0], [9.0, 9.0]]]], requires_grad=True)  # (2, 2, 2, 2)
    labels = torch.tensor([2, 1])  # RoI 0 uses map 1, RoI 1 uses map 0
    targets = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])

    def bce(x, t):
        p = 1 / (1 + math.exp(-x))
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))

    pairs = [(0.5, 1), (-0.5, 0), (1.5, 1), (-1.0, 1), (2.0, 0), (-1.0, 1), (0.0, 1), (0.0, 0)]
    expected = sum(bce(x, t) for x, t in pairs) / 8
    loss = mask_loss(logits, labels, targets)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.count_nonzero(logits.grad[0, 0]) == 0 and torch.count_nonzero(logits.grad[1, 1]) == 0
    assert torch.count_nonzero(logits.grad[0, 1]) == 4


def test_mask_loss_no_rois_is_zero_and_reaches_every_parameter():
    head = MaskHead(in_channels=8, conv_dims=(32,), num_classes=3)
    logits = head(torch.randn(0, 8, 14, 14))
    loss = mask_loss(logits, torch.zeros(0, dtype=torch.long), torch.zeros(0, 28, 28))
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in head.parameters())
    with pytest.raises(ValueError, match="labels"):
        mask_loss(torch.zeros(2, 3, 28, 28), torch.ones(3, dtype=torch.long), torch.zeros(2, 28, 28))
    with pytest.raises(ValueError, match="targets"):
        mask_loss(torch.zeros(2, 3, 28, 28), torch.ones(2, dtype=torch.long), torch.zeros(2, 14, 14))


# ---------------------------------------------------------------------------------------------------------- paste

def paste_reference(probs, boxes, h, w):
    """Per-pixel paste: bilinear sample (zero outside the S x S grid) at each pixel centre inside the box."""
    n, s, _ = probs.shape
    out = torch.zeros(n, 1, h, w, dtype=torch.float64)
    p = probs.double()
    for k in range(n):
        x0, y0, x1, y1 = boxes[k].double().tolist()
        for yy in range(h):
            for xx in range(w):
                cx, cy = xx + 0.5, yy + 0.5
                if not (x0 <= cx <= x1 and y0 <= cy <= y1):
                    continue
                mx, my = (cx - x0) / (x1 - x0) * s - 0.5, (cy - y0) / (y1 - y0) * s - 0.5  # mask cell coords
                j0, i0 = math.floor(mx), math.floor(my)
                value = 0.0
                for i, wy in ((i0, 1 - (my - i0)), (i0 + 1, my - i0)):
                    for j, wx in ((j0, 1 - (mx - j0)), (j0 + 1, mx - j0)):
                        if 0 <= i < s and 0 <= j < s:
                            value += wy * wx * p[k, i, j].item()
                out[k, 0, yy, xx] = value
    return out


def test_paste_all_ones_covers_exactly_the_box():
    box = torch.tensor([[10.0, 6.0, 66.0, 34.0]])  # cells are 2 x 1 pixels
    pasted = paste_masks(torch.ones(1, 28, 28), box, (50, 80))
    assert pasted.shape == (1, 1, 50, 80) and pasted.dtype == torch.float32
    in_box = torch.zeros(50, 80, dtype=torch.bool)
    in_box[6:34, 10:66] = True
    assert torch.equal(pasted[0, 0] >= 0.5, in_box)
    assert torch.count_nonzero(pasted[0, 0][~in_box]) == 0  # zeros outside the box
    assert torch.all(pasted[0, 0, 7:33, 11:65] == 1)  # interior, away from the half-cell edge ramp


def test_paste_left_half_mask_fills_left_half_of_box():
    probs = torch.zeros(1, 28, 28)
    probs[:, :, :14] = 1
    pasted = paste_masks(probs, torch.tensor([[10.0, 6.0, 66.0, 34.0]]), (50, 80))
    expected = torch.zeros(50, 80, dtype=torch.bool)
    expected[6:34, 10:38] = True
    assert torch.equal(pasted[0, 0] >= 0.5, expected)


def test_paste_matches_per_pixel_reference_and_chunking():
    gen = torch.Generator().manual_seed(3)
    probs = torch.rand(5, 5, 5, generator=gen)
    boxes = torch.tensor([[2.3, 1.7, 15.7, 11.6],  # fractional box inside the image
                          [-4.5, 3.2, 6.1, 20.0],  # crosses the left border
                          [12.0, 14.0, 23.0, 31.0],  # crosses the bottom border, touches the right one
                          [30.0, 30.0, 35.0, 40.0],  # outside the image: pastes nothing
                          [-3.0, -2.0, 30.0, 29.0]])  # larger than the image
    h, w = 26, 23
    for num in (1, 4, 5):  # without the big box the per-mask windows are smaller than the image and slide
        pasted = paste_masks(probs[:num], boxes[:num], (h, w))
        expected = paste_reference(probs[:num], boxes[:num], h, w)
        torch.testing.assert_close(pasted.double(), expected, atol=1e-5, rtol=0)
        for chunk_size in (1, 3):
            assert torch.equal(paste_masks(probs[:num], boxes[:num], (h, w), chunk_size=chunk_size), pasted)
    assert torch.count_nonzero(pasted[3]) == 0 and torch.count_nonzero(pasted[4]) == h * w


def test_paste_empty_and_errors():
    assert paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), (30, 40)).shape == (0, 1, 30, 40)
    with pytest.raises(ValueError, match="differ in length"):
        paste_masks(torch.zeros(2, 28, 28), torch.zeros(3, 4), (30, 40))
    with pytest.raises(ValueError, match="probs"):
        paste_masks(torch.zeros(2, 1, 28, 28), torch.zeros(2, 4), (30, 40))
