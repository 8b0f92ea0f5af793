"""Tests for minimask/model/box_head.py: head shapes and init, Fast R-CNN losses, and inference post-processing."""
import math

import pytest
import torch
from torch import nn

from minimask.model.box_head import BoxPredictor, ConvFCHead, fast_rcnn_inference, fast_rcnn_losses
from minimask.ops.boxes import clip_boxes_to_image, nms

# ConvFCHead / BoxPredictor

def test_4conv1fc_shapes_and_no_conv_bias_when_normed():
    head = ConvFCHead(in_channels=64, resolution=7, conv_dims=(64,) * 4, fc_dims=(128,), norm="GN")
    assert head(torch.randn(5, 64, 7, 7)).shape == (5, 128)
    assert head.out_features == 128
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in head.modules() if isinstance(m, nn.GroupNorm)]
    fcs = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 4 and len(norms) == 4 and len(fcs) == 1
    assert all(c.bias is None and c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert fcs[0].in_features == 64 * 7 * 7
    assert torch.equal(fcs[0].bias, torch.zeros(128))
    # No norm after the fc: the layer after the Linear is the final ReLU.
    layers = list(head.layers)
    assert isinstance(layers[-2], nn.Linear) and isinstance(layers[-1], nn.ReLU)


def test_2fc_shapes_and_init():
    head = ConvFCHead(in_channels=64, resolution=7, conv_dims=(), fc_dims=(256, 256), norm="GN")
    out = head(torch.randn(3, 64, 7, 7))
    assert out.shape == (3, 256) and (out >= 0).all()  # ReLU after the last fc
    fcs = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(64 * 49, 256), (256, 256)]
    # c2_xavier_fill = kaiming_uniform(a=1): U(-sqrt(3 / fan_in), +sqrt(3 / fan_in)).
    bound = math.sqrt(3 / (64 * 49))
    assert fcs[0].weight.abs().max() <= bound and fcs[0].weight.abs().max() > 0.9 * bound


def test_unnormed_conv_has_zero_bias_and_msra_init():
    head = ConvFCHead(in_channels=64, resolution=7, conv_dims=(128,), fc_dims=(), norm="")
    conv = head.layers[0]
    assert isinstance(conv, nn.Conv2d) and torch.equal(conv.bias, torch.zeros(128))
    expected_std = math.sqrt(2 / (128 * 9))  # kaiming normal, fan_out = out_channels * 3 * 3
    assert abs(conv.weight.std().item() - expected_std) < 0.1 * expected_std
    assert head.out_features == 128 * 49


def test_head_on_zero_rois_and_bad_input():
    head = ConvFCHead(in_channels=64, resolution=7, conv_dims=(64,), fc_dims=(32,), norm="GN")
    assert head(torch.zeros(0, 64, 7, 7)).shape == (0, 32)
    with pytest.raises(ValueError, match="ConvFCHead"):
        head(torch.zeros(2, 32, 7, 7))


def test_box_predictor_shapes_and_init():
    predictor = BoxPredictor(in_features=1024, num_classes=5)
    logits, deltas = predictor(torch.randn(7, 1024))
    assert logits.shape == (7, 6) and deltas.shape == (7, 20)
    assert abs(predictor.cls_score.weight.std().item() - 0.01) < 0.001
    assert abs(predictor.bbox_pred.weight.std().item() - 0.001) < 0.0001
    assert not predictor.cls_score.bias.any() and not predictor.bbox_pred.bias.any()
    agnostic = BoxPredictor(in_features=16, num_classes=5, class_agnostic=True)
    assert agnostic(torch.randn(7, 16))[1].shape == (7, 4)


# fast_rcnn_losses

def test_losses_hand_computed():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0], [3.0, -1.0, 1.0]])  # R = 3, K = 2
    labels = torch.tensor([1, 0, 2])
    deltas = torch.tensor([[0.5, -0.5, 1.0, 0.0, 9.0, 9.0, 9.0, 9.0],
                           [7.0, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0],
                           [9.0, 9.0, 9.0, 9.0, 1.0, 2.0, 3.0, 4.0]])
    targets = torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    losses = fast_rcnn_losses(logits, deltas, labels, targets, "l1", 0.0)

    def nll(row, label):
        return -(row[label] - math.log(sum(math.exp(v) for v in row)))

    expected_ce = (nll([1.0, 2.0, 0.5], 1) + nll([0.0, 0.0, 0.0], 0) + nll([3.0, -1.0, 1.0], 2)) / 3
    # Row 0 uses columns 0:4 (class 1): |0.5| + |-0.5| + |1| + |0 - 1| = 3; row 2 columns 4:8 (class 2): 0+1+2+3 = 6.
    assert losses["loss_classifier"].item() == pytest.approx(expected_ce, rel=1e-6)
    assert losses["loss_box_reg"].item() == pytest.approx((3 + 6) / 3, rel=1e-6)

    smooth = fast_rcnn_losses(logits, deltas, labels, targets, "smooth_l1", 1.0)["loss_box_reg"]
    # Row 0 diffs 0.5, 0.5, 1, 1 -> 0.125 + 0.125 + 0.5 + 0.5; row 2 diffs 0, 1, 2, 3 -> 0 + 0.5 + 1.5 + 2.5.
    assert smooth.item() == pytest.approx((1.25 + 4.5) / 3, rel=1e-6)


def test_losses_use_only_the_gt_class_columns_and_ignore_background_targets():
    r, k = 6, 3
    labels = torch.tensor([1, 2, 3, 0, 2, 0])
    targets = torch.randn(r, 4)
    targets[3] = float("nan")  # background targets are never read
    deltas = torch.full((r, k, 4), 100.0)
    deltas[torch.arange(r), (labels - 1).clamp(min=0)] = targets
    deltas = deltas.view(r, 4 * k).clone().requires_grad_()
    loss = fast_rcnn_losses(torch.randn(r, k + 1), deltas, labels, targets)["loss_box_reg"]
    assert loss.item() == 0.0
    loss_shifted = fast_rcnn_losses(torch.randn(r, k + 1), deltas + 1.0, labels, targets)["loss_box_reg"]
    assert loss_shifted.item() == pytest.approx(4 * 4 / r)  # 4 foreground rows x 4 coordinates x |1|, over R
    loss_shifted.backward()
    touched = deltas.grad.view(r, k, 4).abs().sum(dim=2) > 0  # (R, K)
    expected = torch.zeros(r, k, dtype=torch.bool)
    expected[[0, 1, 2, 4], [0, 1, 2, 1]] = True
    assert torch.equal(touched, expected)


def test_class_agnostic_losses():
    labels = torch.tensor([2, 0])
    deltas = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    loss = fast_rcnn_losses(torch.zeros(2, 4), deltas, labels, torch.zeros(2, 4))["loss_box_reg"]
    assert loss.item() == pytest.approx(4 / 2)


def test_zero_rois_give_zero_losses_with_grad():
    predictor = BoxPredictor(in_features=8, num_classes=3)
    logits, deltas = predictor(torch.zeros(0, 8))
    losses = fast_rcnn_losses(logits, deltas, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4))
    assert losses["loss_classifier"].item() == 0.0 and losses["loss_box_reg"].item() == 0.0
    sum(losses.values()).backward()
    assert all(p.grad is not None and not p.grad.any() for p in predictor.parameters())


def test_losses_reject_bad_shapes():
    with pytest.raises(ValueError, match="columns"):
        fast_rcnn_losses(torch.zeros(2, 4), torch.zeros(2, 8), torch.zeros(2, dtype=torch.int64), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="labels"):
        fast_rcnn_losses(torch.zeros(2, 4), torch.zeros(2, 12), torch.zeros(3, dtype=torch.int64), torch.zeros(2, 4))


# fast_rcnn_inference

def _probs(rows):
    """(R, K+1) probabilities from rows of object-class scores (background takes the rest)."""
    scores = torch.tensor(rows, dtype=torch.float32)
    return torch.cat([1 - scores.sum(dim=1, keepdim=True), scores], dim=1)


def test_inference_threshold_and_cross_class_overlap():
    box = [10.0, 10.0, 30.0, 30.0]
    probs = _probs([[0.6, 0.3], [0.05, 0.04]])  # K = 2; row 1 is at / below the threshold (strict >)
    boxes = torch.tensor([box * 2, box * 2])  # (2, 8): both classes predict the same box
    out_boxes, scores, labels, rows = fast_rcnn_inference(probs, boxes, (50, 50), score_thresh=0.05)
    # Two identical boxes of different classes do not suppress each other.
    assert labels.tolist() == [1, 2] and rows.tolist() == [0, 0]
    assert scores.tolist() == pytest.approx([0.6, 0.3])
    assert out_boxes.tolist() == [box, box]


def test_inference_nms_within_class_and_clipping():
    probs = _probs([[0.9], [0.8], [0.7]])  # K = 1
    boxes = torch.tensor([[-5.0, 0.0, 20.0, 20.0], [0.0, 0.0, 19.0, 20.0], [30.0, 30.0, 70.0, 45.0]])
    out_boxes, scores, labels, rows = fast_rcnn_inference(probs, boxes, (40, 60), nms_thresh=0.5)
    assert rows.tolist() == [0, 2]  # row 1 overlaps row 0 (IoU 0.95) in the same class
    assert out_boxes.tolist() == [[0.0, 0.0, 20.0, 20.0], [30.0, 30.0, 60.0, 40.0]]  # clipped to w = 60, h = 40
    assert labels.tolist() == [1, 1]


def test_inference_topk_and_non_finite():
    n = 30
    x = torch.arange(n, dtype=torch.float32) * 20  # disjoint boxes
    boxes = torch.stack([x, torch.zeros(n), x + 10, torch.full((n,), 10.0)], dim=1)
    scores = torch.linspace(0.1, 0.9, n)
    scores[5] = float("nan")
    probs = torch.stack([1 - scores, scores], dim=1)
    out_boxes, out_scores, _, rows = fast_rcnn_inference(probs, boxes, (1000, 1000), topk=7)
    assert rows.tolist() == list(range(n - 1, n - 8, -1))
    assert torch.equal(out_scores, scores[rows])
    _, _, _, rows = fast_rcnn_inference(probs, boxes, (1000, 1000), topk=100)
    assert 5 not in rows.tolist() and len(rows) == n - 1


def test_inference_empty():
    boxes, scores, labels, rows = fast_rcnn_inference(torch.zeros(0, 4), torch.zeros(0, 12), (32, 32))
    assert boxes.shape == (0, 4) and scores.shape == (0,) and labels.shape == (0,) and rows.shape == (0,)
    assert labels.dtype == torch.int64 and rows.dtype == torch.int64
    with pytest.raises(ValueError, match="class_probs"):
        fast_rcnn_inference(torch.zeros(5, 4), torch.zeros(5, 8), (32, 32))


def _per_class_loop(probs, boxes, size, score_thresh, nms_thresh, topk):
    """Reference: the obvious loop over classes, then a global top-k by score."""
    k = probs.shape[1] - 1
    results = []
    for c in range(1, k + 1):
        b = clip_boxes_to_image(boxes[:, 4 * (c - 1):4 * c], size)
        rows = torch.where(probs[:, c] > score_thresh)[0]
        keep = rows[nms(b[rows], probs[rows, c], nms_thresh)]
        results += [(probs[r, c].item(), c, r.item(), b[r]) for r in keep]
    results.sort(key=lambda t: -t[0])
    return results[:topk]


def test_inference_matches_per_class_loop_on_random_input():
    r, k, size = 200, 5, (80, 120)
    probs = torch.randn(r, k + 1).mul(2).softmax(dim=1)
    centres = torch.rand(r, k, 2) * torch.tensor([130.0, 90.0]) - 5
    half = torch.rand(r, k, 2) * 20 + 2
    boxes = torch.cat([centres - half, centres + half], dim=2).view(r, 4 * k)
    out_boxes, scores, labels, rows = fast_rcnn_inference(probs, boxes, size, 0.05, 0.5, 50)
    reference = _per_class_loop(probs, boxes, size, 0.05, 0.5, 50)
    assert len(reference) == 50
    assert scores.tolist() == [t[0] for t in reference]
    assert labels.tolist() == [t[1] for t in reference]
    assert rows.tolist() == [t[2] for t in reference]
    assert torch.equal(out_boxes, torch.stack([t[3] for t in reference]))
