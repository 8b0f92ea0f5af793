"""Tests for minimask.model.keypoint_head: the head, heatmap targets, the loss and heatmap decoding."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minimask.model.keypoint_head import KeypointHead, heatmaps_to_keypoints, keypoint_loss, keypoint_targets

# ----------------------------------------------------------------------------------------------------------- head

def test_head_shapes():
    head = KeypointHead(in_channels=8, conv_dims=(16, 16), num_keypoints=5)
    assert head(torch.randn(3, 8, 14, 14)).shape == (3, 5, 56, 56)
    assert head(torch.randn(0, 8, 14, 14)).shape == (0, 5, 56, 56)
    with pytest.raises(ValueError, match="KeypointHead expects"):
        head(torch.randn(3, 4, 14, 14))


def test_head_output_is_bilinear_x2_of_the_deconv():
    head = KeypointHead(in_channels=8, conv_dims=(16,), num_keypoints=3)
    x = torch.randn(2, 8, 14, 14)
    low = head.deconv(head.convs(x))
    assert low.shape == (2, 3, 28, 28)
    torch.testing.assert_close(head(x), F.interpolate(low, size=(56, 56), mode="bilinear", align_corners=False))


def test_default_head_layout_and_init_statistics():
    head = KeypointHead()
    convs = [m for m in head.convs if isinstance(m, nn.Conv2d)]
    assert len(convs) == 8 and all(c.out_channels == 512 and c.bias is not None for c in convs)
    assert not any(isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)) for m in head.modules())  # no norm
    assert head.deconv.weight.shape == (512, 17, 4, 4)
    assert head.deconv.stride == (2, 2) and head.deconv.padding == (1, 1)
    for conv in convs:  # kaiming_normal, fan_out = 512 * 3 * 3
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.05)
    # The deconv too; torch's fan_out of a (in, out, kh, kw) ConvTranspose2d weight is 512 * 4 * 4.
    assert head.deconv.weight.std().item() == pytest.approx(math.sqrt(2 / (512 * 16)), rel=0.05)
    for name, param in head.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(param) == 0, name


# -------------------------------------------------------------------------------------------------------- targets

def test_keypoint_targets_hand_computed():
    boxes = torch.tensor([[10.0, 20.0, 66.0, 76.0], [0.0, 0.0, 8.0, 4.0]])  # 56 x 56 and 8 x 4
    keypoints = torch.tensor([
        [[10.0, 20.0, 2], [40.7, 30.2, 1], [66.0, 76.0, 2], [66.0, 30.0, 2],  # corner, interior, edges -> S - 1
         [9.9, 30.0, 2], [66.01, 30.0, 2], [30.0, 76.5, 2], [30.0, 30.0, 0]],  # outside x2, below, invisible
        [[5.0, 1.5, 2], [7.99, 3.99, 1], [8.0, 0.0, 2], [0.0, 4.0, 2],
         [-0.01, 2.0, 2], [4.0, -1.0, 2], [4.0, 2.0, 0], [4.0, 2.0, 2]],
    ])  # (2, 8, 3)
    flat_idx, valid = keypoint_targets(keypoints, boxes, 56)
    assert flat_idx.dtype == torch.int64 and valid.dtype == torch.bool
    # Box 0: u = floor(x - 10), v = floor(y - 20).
    assert valid[0].tolist() == [True, True, True, True, False, False, False, False]
    assert flat_idx[0, :4].tolist() == [0, 10 * 56 + 30, 55 * 56 + 55, 10 * 56 + 55]
    # Box 1 (8 x 4 into 56 cells): u = floor(x * 7), v = floor(y * 14).
    assert valid[1].tolist() == [True, True, True, True, False, False, False, True]
    assert flat_idx[1, :4].tolist() == [21 * 56 + 35, 55 * 56 + 55, 0 * 56 + 55, 55 * 56 + 0]
    assert flat_idx[1, 7].tolist() == 28 * 56 + 28
    assert (flat_idx[~valid] == 0).all()  # invalid entries are safe to gather with


def test_keypoint_targets_empty_and_errors():
    flat_idx, valid = keypoint_targets(torch.zeros(0, 17, 3), torch.zeros(0, 4), 56)
    assert flat_idx.shape == valid.shape == (0, 17)
    with pytest.raises(ValueError, match="keypoints must"):
        keypoint_targets(torch.zeros(2, 17, 2), torch.zeros(2, 4), 56)
    with pytest.raises(ValueError, match="differ in length"):
        keypoint_targets(torch.zeros(2, 17, 3), torch.zeros(3, 4), 56)


# ----------------------------------------------------------------------------------------------------------- loss

def test_keypoint_loss_hand_computed():
    logits = torch.tensor([[[[0.0, 1.0], [2.0, -1.0]], [[3.0, 0.0], [0.0, 0.0]]],
                           [[[1.0, 1.0], [1.0, 1.0]], [[5.0, -5.0], [0.5, 7.0]]]], requires_grad=True)  # (2, 2, 2, 2)
    flat_idx = torch.tensor([[2, 0], [1, 0]])
    valid = torch.tensor([[True, False], [True, False]])

    def nll(values, target):
        return math.log(sum(math.exp(v) for v in values)) - values[target]

    expected = (nll([0.0, 1.0, 2.0, -1.0], 2) + nll([1.0, 1.0, 1.0, 1.0], 1)) / 2
    loss = keypoint_loss(logits, flat_idx, valid)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.count_nonzero(logits.grad[:, 1]) == 0  # invalid keypoints contribute nothing
    all_valid = keypoint_loss(logits, flat_idx, torch.ones(2, 2, dtype=torch.bool))
    expected_all = (2 * expected + nll([3.0, 0.0, 0.0, 0.0], 0) + nll([5.0, -5.0, 0.5, 7.0], 0)) / 4
    assert all_valid.item() == pytest.approx(expected_all, rel=1e-6)


def test_keypoint_loss_none_valid_is_zero_and_reaches_every_parameter():
    head = KeypointHead(in_channels=8, conv_dims=(16,), num_keypoints=3)
    logits = head(torch.randn(2, 8, 14, 14))
    loss = keypoint_loss(logits, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in head.parameters())
    empty = head(torch.randn(0, 8, 14, 14))
    loss = keypoint_loss(empty, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3, dtype=torch.bool))
    assert loss.item() == 0 and loss.requires_grad
    with pytest.raises(ValueError, match="flat_idx and valid"):
        keypoint_loss(torch.zeros(2, 3, 56, 56), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3).bool())


# -------------------------------------------------------------------------------------------------------- decoding

def test_decode_box_of_heatmap_size_is_exact():
    # A 56 x 56 box resizes the heatmap to itself, so each cell is one pixel: x = x0 + u + 0.5 and the score is the
    # softmax probability of the argmax cell.
    logits = torch.randn(2, 4, 56, 56)
    boxes = torch.tensor([[10.0, 20.0, 66.0, 76.0], [3.5, 0.0, 59.0, 56.0]])  # the second is 55.5 wide
    keypoints, scores = heatmaps_to_keypoints(logits, boxes)
    assert keypoints.shape == (2, 4, 3) and scores.shape == (2, 4)
    flat = logits.flatten(2)  # (2, 4, 3136)
    pos = flat.argmax(dim=2)
    u, v = (pos % 56).float(), (pos // 56).float()
    torch.testing.assert_close(keypoints[0, :, 0], 10 + u[0] + 0.5)
    torch.testing.assert_close(keypoints[0, :, 1], 20 + v[0] + 0.5)
    torch.testing.assert_close(keypoints[1, :, 0], 3.5 + (u[1] + 0.5) * 55.5 / 56)
    torch.testing.assert_close(scores, flat.softmax(dim=2).max(dim=2).values)
    assert (keypoints[..., 2] == 1).all()


def decode_reference(logits, boxes):
    """detectron2's recipe written out per box and per keypoint, in float64."""
    out = torch.zeros(logits.shape[0], logits.shape[1], 3, dtype=torch.float64)
    for i, (x0, y0, x1, y1) in enumerate(boxes.double().tolist()):
        w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
        size = (math.ceil(h), math.ceil(w))
        resized = F.interpolate(logits[i:i + 1], size=size, mode="bicubic", align_corners=False)[0].double()
        for k in range(logits.shape[1]):
            pos = int(resized[k].argmax())
            x_int, y_int = pos % size[1], pos // size[1]
            peak = resized[k, y_int, x_int]
            score = torch.exp(peak - peak) / torch.exp(logits[i, k].double() - peak).sum()
            out[i, k] = torch.tensor([x0 + (x_int + 0.5) * w / size[1], y0 + (y_int + 0.5) * h / size[0], score])
    return out


def test_decode_matches_per_keypoint_reference():
    gen = torch.Generator().manual_seed(5)
    logits = F.avg_pool2d(torch.randn(4, 3, 60, 60, generator=gen) * 4, 5, stride=1)  # (4, 3, 56, 56), smooth
    boxes = torch.tensor([[3.2, 4.1, 120.7, 61.3], [0.0, 0.0, 20.5, 33.0],  # wide; smaller than the heatmap
                          [7.0, 9.0, 7.4, 9.3], [5.0, 1.0, 61.0, 57.0]])  # under 1 pixel; exactly 56 x 56
    keypoints, scores = heatmaps_to_keypoints(logits, boxes)
    expected = decode_reference(logits, boxes)
    torch.testing.assert_close(keypoints[..., :2].double(), expected[..., :2], atol=1e-4, rtol=0)
    torch.testing.assert_close(scores.double(), expected[..., 2], atol=1e-6, rtol=1e-4)


def test_decode_constant_map_score_and_small_box():
    keypoints, scores = heatmaps_to_keypoints(torch.full((1, 2, 56, 56), 3.0), torch.tensor([[5.0, 5.0, 5.5, 5.2]]))
    torch.testing.assert_close(scores, torch.full((1, 2), 1 / 56**2))
    # w, h clamp to 1: a 1 x 1 map whose only pixel has centre (x0 + 0.5, y0 + 0.5).
    torch.testing.assert_close(keypoints[0, :, :2], torch.tensor([[5.5, 5.5], [5.5, 5.5]]))


@pytest.mark.parametrize("min_size, peak", [(60.0, "one-hot"), (1.0, "bowl")])
def test_encode_decode_round_trip_within_one_cell(min_size, peak):
    gen = torch.Generator().manual_seed(7)
    num_rois, num_keypoints, side = 40, 5, 56
    x0y0 = torch.rand(num_rois, 2, generator=gen) * 100
    wh = min_size + torch.rand(num_rois, 2, generator=gen) * 100
    boxes = torch.cat([x0y0, x0y0 + wh], dim=1)  # (R, 4)
    frac = torch.rand(num_rois, num_keypoints, 2, generator=gen)
    xy = boxes[:, None, :2] + frac * wh[:, None, :]  # (R, P, 2) inside the boxes
    gt = torch.cat([xy, torch.full((num_rois, num_keypoints, 1), 2.0)], dim=2)
    flat_idx, valid = keypoint_targets(gt, boxes, side)
    assert valid.all()
    if peak == "one-hot":
        logits = torch.zeros(num_rois, num_keypoints, side * side).scatter_(2, flat_idx[..., None], 30.0)
        logits = logits.view(num_rois, num_keypoints, side, side)
        slack = torch.zeros(num_rois, 1, 2)
    else:
        # Boxes smaller than the heatmap downsample it, and a one-hot spike can fall between the samples; a smooth
        # peak cannot. The argmax is then the output pixel nearest the cell: allow half an output pixel more.
        u, v = (flat_idx % side).float(), (flat_idx // side).float()  # (R, P)
        grid = torch.arange(side, dtype=torch.float32)
        logits = -((grid - u[..., None, None]) ** 2 + (grid[:, None] - v[..., None, None]) ** 2)  # (R, P, S, S)
        slack = (0.5 * wh / wh.ceil())[:, None, :]
    keypoints, scores = heatmaps_to_keypoints(logits, boxes)
    err = (keypoints[..., :2] - xy).abs()  # (R, P, 2)
    assert (err <= wh[:, None, :] / side + slack).all(), err.max()
    assert torch.isfinite(scores).all() and (scores > 0).all()


def test_decode_empty_and_errors():
    keypoints, scores = heatmaps_to_keypoints(torch.zeros(0, 17, 56, 56), torch.zeros(0, 4))
    assert keypoints.shape == (0, 17, 3) and scores.shape == (0, 17)
    with pytest.raises(ValueError, match="differ in length"):
        heatmaps_to_keypoints(torch.zeros(2, 17, 56, 56), torch.zeros(1, 4))
