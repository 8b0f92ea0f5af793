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


def drawn(positive, negative, num_samples, positive_fraction):
    pos, pos_taken, neg, neg_taken = sample_balanced(positive, negative, num_samples, positive_fraction)
    return pos[pos_taken], neg[neg_taken]


def test_sampler_bounds_and_fill():
    labels = torch.tensor([1] * 10 + [0] * 100 + [-1] * 5)
    pos, neg = drawn(labels == 1, labels == 0, num_samples=16, positive_fraction=0.25)
    assert len(pos) == 4 and len(neg) == 12
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all()
    assert len(set(pos.tolist())) == 4 and len(set(neg.tolist())) == 12
    # Too few positives: negatives fill the rest.
    pos, neg = drawn(labels == 1, labels == 0, num_samples=64, positive_fraction=0.5)
    assert len(pos) == 10 and len(neg) == 54
    # Too few of both: take everything available.
    pos, neg = drawn(labels == 1, labels == 0, num_samples=512, positive_fraction=0.25)
    assert len(pos) == 10 and len(neg) == 100
    empty = torch.zeros(0, dtype=torch.bool)
    pos, neg = drawn(empty, empty, 256, 0.5)
    assert pos.numel() == 0 and neg.numel() == 0


def test_sampler_taken_come_first_and_batches_draw_per_row():
    labels = torch.tensor([[1] * 3 + [0] * 5 + [-1] * 2, [0] * 9 + [1]])
    pos, pos_taken, neg, neg_taken = sample_balanced(labels == 1, labels == 0, num_samples=6, positive_fraction=0.5)
    assert pos.shape == (2, 3) and neg.shape == (2, 6)
    assert pos_taken.tolist() == [[True] * 3, [True, False, False]]
    assert neg_taken.sum(dim=1).tolist() == [3, 5]  # the rest of 6 after 3 and 1 positives
    for row in range(2):  # taken ones first, each from its own row's candidates
        assert (labels[row, pos[row][pos_taken[row]]] == 1).all() and (labels[row, neg[row][neg_taken[row]]] == 0).all()
        assert pos_taken[row].sort(descending=True, stable=True).values.tolist() == pos_taken[row].tolist()


def test_sampler_is_uniform():
    # Every positive is drawn about equally often (a biased sampler would favour low indices).
    positive = torch.ones(8, dtype=torch.bool)
    counts = torch.zeros(8)
    for _ in range(400):
        pos, _ = drawn(positive, ~positive, num_samples=4, positive_fraction=0.5)
        counts[pos] += 1
    assert counts.sum() == 800
    assert counts.min() > 60 and counts.max() < 140  # expectation 100 each


def test_batched_matching_equals_one_image_at_a_time_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    iou = torch.rand(3, 4, 20, generator=g)  # 3 images, up to 4 GT boxes each
    valid = torch.tensor([[True] * 4, [True, True, False, False], [False] * 4])
    idx, labels = match_boxes(iou, 0.7, 0.3, True, gt_valid=valid)
    for b, n in enumerate((4, 2, 0)):
        one_idx, one_labels = match_boxes(iou[b, :n], 0.7, 0.3, True)
        assert torch.equal(labels[b], one_labels)
        assert torch.equal(idx[b][one_labels == 1], one_idx[one_labels == 1])
