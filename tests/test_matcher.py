"""Matcher thresholds, low-quality matches with ties, and the balanced sampler."""
import pytest
import torch

from minimask.ops.matcher import match_boxes, sample_balanced


def test_thresholds_and_ignore_band():
    iou = torch.tensor([[0.8, 0.5, 0.1, 0.3, 0.7], [0.2, 0.6, 0.0, 0.29, 0.1]])
    idx, labels = match_boxes(iou, high=0.7, low=0.3, allow_low_quality=False)
    assert labels.tolist() == [1, -1, 0, -1, 1]
    assert idx.tolist() == [0, 1, 0, 0, 0]
    assert labels.dtype == torch.int8 and idx.dtype == torch.int64


def test_low_quality_matches_include_ties():
    # GT 1's best IoU is 0.4, attained by predictions 1 and 3 (a tie): both become foreground even though 0.4 < 0.7.
    iou = torch.tensor([[0.9, 0.0, 0.1, 0.0], [0.0, 0.4, 0.2, 0.4]])
    _, labels = match_boxes(iou, high=0.7, low=0.3, allow_low_quality=False)
    assert labels.tolist() == [1, -1, 0, -1]
    idx, labels = match_boxes(iou, high=0.7, low=0.3, allow_low_quality=True)
    assert labels.tolist() == [1, 1, 0, 1]
    assert idx.tolist() == [0, 1, 1, 1]


def test_gt_overlapping_nothing_makes_no_positive():
    iou = torch.tensor([[0.0, 0.0, 0.0], [0.9, 0.1, 0.0]])
    _, labels = match_boxes(iou, high=0.7, low=0.3, allow_low_quality=True)
    assert labels.tolist() == [1, 0, 0]


def test_single_threshold_and_empty():
    iou = torch.tensor([[0.5, 0.49, 0.51]])
    _, labels = match_boxes(iou, high=0.5, low=0.5, allow_low_quality=False)
    assert labels.tolist() == [1, 0, 1]
    idx, labels = match_boxes(torch.zeros(0, 3), 0.7, 0.3, True)
    assert labels.tolist() == [0, 0, 0] and idx.tolist() == [0, 0, 0]
    idx, labels = match_boxes(torch.zeros(2, 0), 0.7, 0.3, True)
    assert idx.shape == (0,) and labels.shape == (0,)
    with pytest.raises(ValueError, match="low threshold"):
        match_boxes(iou, 0.3, 0.7, False)


def test_sampler_bounds_and_fill():
    labels = torch.tensor([1] * 10 + [0] * 100 + [-1] * 5)
    pos, neg = sample_balanced(labels == 1, labels == 0, num_samples=16, positive_fraction=0.25)
    assert len(pos) == 4 and len(neg) == 12
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all()
    assert len(set(pos.tolist())) == 4 and len(set(neg.tolist())) == 12
    # Too few positives: negatives fill the rest.
    pos, neg = sample_balanced(labels == 1, labels == 0, num_samples=64, positive_fraction=0.5)
    assert len(pos) == 10 and len(neg) == 54
    # Too few of both: take everything available.
    pos, neg = sample_balanced(labels == 1, labels == 0, num_samples=512, positive_fraction=0.25)
    assert len(pos) == 10 and len(neg) == 100
    empty = torch.zeros(0, dtype=torch.bool)
    pos, neg = sample_balanced(empty, empty, 256, 0.5)
    assert pos.numel() == 0 and neg.numel() == 0


def test_sampler_is_uniform():
    # Every positive is drawn about equally often (a biased sampler would favour low indices).
    positive = torch.ones(8, dtype=torch.bool)
    counts = torch.zeros(8)
    for _ in range(400):
        pos, _ = sample_balanced(positive, ~positive, num_samples=4, positive_fraction=0.5)
        counts[pos] += 1
    assert counts.sum() == 800
    assert counts.min() > 60 and counts.max() < 140  # expectation 100 each
