"""Box geometry and NMS against brute-force loops and hand-computed values."""
import pytest
import torch

from minimask.ops import batched_nms, box_area, box_iou, clip_boxes_to_image, nms, remove_small_boxes


def random_boxes(n, size=100.0, max_side=40.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * max_side + 0.5
    return torch.cat([xy, xy + wh], dim=1)


def brute_iou(a, b):
    out = torch.zeros(len(a), len(b), dtype=torch.float64)
    for i, (ax1, ay1, ax2, ay2) in enumerate(a.double().tolist()):
        for j, (bx1, by1, bx2, by2) in enumerate(b.double().tolist()):
            iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
            ih = max(0.0, min(ay2, by2) - max(ay1, by1))
            inter = iw * ih
            union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
            out[i, j] = inter / union
    return out


def brute_nms(boxes, scores, thr, groups=None):
    """Greedy NMS from the definition: visit by decreasing score (ties: lower index first)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i].item(), i))
    iou = brute_iou(boxes, boxes)
    keep = []
    for i in order:
        if all(iou[i, j] <= thr or (groups is not None and groups[i] != groups[j]) for j in keep):
            keep.append(i)
    return keep


def test_area_and_iou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0]])
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 20.0, 20.0], [0.0, 0.0, 5.0, 10.0]])
    assert box_area(a).tolist() == [100.0, 100.0]
    expected = torch.tensor([[1.0, 0.0, 0.5], [25 / 175, 25 / 175, 0.0]])
    torch.testing.assert_close(box_iou(a, b), expected)


def test_iou_matches_brute_force_and_empty():
    a, b = random_boxes(13, seed=1), random_boxes(7, seed=2)
    torch.testing.assert_close(box_iou(a, b).double(), brute_iou(a, b), rtol=1e-5, atol=1e-6)
    assert box_iou(a, b[:0]).shape == (13, 0)
    assert box_iou(a[:0], b).shape == (0, 7)
    assert box_iou(a.half(), b.half()).dtype == torch.float32


def test_clip_and_remove_small():
    boxes = torch.tensor([[-5.0, -5.0, 30.0, 8.0], [2.0, 3.0, 2.5, 9.0], [1.0, 1.0, 4.0, 4.0]])
    torch.testing.assert_close(
        clip_boxes_to_image(boxes, (10, 20)),
        torch.tensor([[0.0, 0.0, 20.0, 8.0], [2.0, 3.0, 2.5, 9.0], [1.0, 1.0, 4.0, 4.0]]),
    )
    assert remove_small_boxes(boxes, 1.0).tolist() == [0, 2]
    assert remove_small_boxes(boxes, 0.5).tolist() == [0, 1, 2]


@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_nms_matches_brute_force(thr):
    boxes = random_boxes(60, seed=3)
    scores = torch.rand(60, generator=torch.Generator().manual_seed(4))
    assert nms(boxes, scores, thr).tolist() == brute_nms(boxes, scores, thr)


def test_nms_ties_keep_lower_index_first():
    # Identical boxes with identical scores: the lowest index survives. Distinct boxes with tied scores come out in
    # index order.
    boxes = torch.tensor([[0.0, 0, 10, 10]] * 3 + [[50.0, 50, 60, 60], [20.0, 20, 30, 30]])
    scores = torch.tensor([0.5, 0.5, 0.5, 0.9, 0.5])
    assert nms(boxes, scores, 0.5).tolist() == [3, 0, 4]
    # Many ties, random boxes on a coarse grid so that some IoUs land exactly on the threshold.
    g = torch.Generator().manual_seed(5)
    xy = torch.randint(0, 8, (40, 2), generator=g).float()
    boxes = torch.cat([xy, xy + 4], dim=1)
    scores = torch.randint(0, 3, (40,), generator=g).float()
    for thr in (0.0, 1 / 7, 1 / 3, 0.6):
        assert nms(boxes, scores, thr).tolist() == brute_nms(boxes, scores, thr)


def test_nms_equals_its_readable_definition():
    from minimask.ops.boxes import nms_reference

    for seed in range(5):
        boxes = random_boxes(120, size=70, seed=20 + seed)
        scores = (torch.rand(120, generator=torch.Generator().manual_seed(seed)) * 10).round()  # ties
        for thr in (0.2, 0.5, 0.7):
            assert nms(boxes, scores, thr).tolist() == nms_reference(boxes, scores, thr).tolist()


def test_long_suppression_chain():
    """Boxes each overlapping the next (a chain of 40): the kept set alternates, and it takes the fixed-point
    iteration as many rounds as the chain is long."""
    x = torch.arange(40, dtype=torch.float32) * 4  # boxes 10 wide, 4 apart: IoU of neighbours 6/14, next 2/18
    boxes = torch.stack([x, torch.zeros(40), x + 10, torch.full((40,), 10.0)], dim=1)
    scores = torch.linspace(1, 0.1, 40)
    assert nms(boxes, scores, 0.4).tolist() == brute_nms(boxes, scores, 0.4) == list(range(0, 40, 2))


@pytest.mark.parametrize("num_groups", [1, 3, 40])
def test_batched_nms_in_chunks_of_groups(monkeypatch, num_groups):
    """Groups of every size, processed a few at a time (a tiny pair budget forces one group per chunk); tied
    scores across groups."""
    import minimask.ops.boxes as boxes_mod

    monkeypatch.setattr(boxes_mod, "_NMS_PAIRS", 30)
    boxes = random_boxes(90, size=40, seed=11)
    scores = (torch.rand(90, generator=torch.Generator().manual_seed(12)) * 8).round() / 8  # many ties
    idxs = torch.randint(0, num_groups, (90,), generator=torch.Generator().manual_seed(13)) * 7 - 20
    assert batched_nms(boxes, scores, idxs, 0.3).tolist() == brute_nms(boxes, scores, 0.3, idxs.tolist())


def test_nms_empty_and_degenerate():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).dtype == torch.int64
    # Zero-area boxes have NaN IoU with each other: NaN > thr is false, so nothing is suppressed.
    boxes = torch.tensor([[1.0, 1, 1, 1], [1.0, 1, 1, 1]])
    assert nms(boxes, torch.tensor([0.2, 0.1]), 0.5).tolist() == [0, 1]


def test_batched_nms_equals_per_group_nms():
    boxes = random_boxes(80, size=50, seed=8)
    scores = torch.rand(80, generator=torch.Generator().manual_seed(9))
    idxs = torch.randint(0, 4, (80,), generator=torch.Generator().manual_seed(10))
    keep = batched_nms(boxes, scores, idxs, 0.5)
    assert keep.tolist() == brute_nms(boxes, scores, 0.5, idxs.tolist())
    # Per-group NMS, then merged and sorted by score, gives the same set.
    per_group = torch.cat([torch.where(idxs == k)[0][nms(boxes[idxs == k], scores[idxs == k], 0.5)] for k in range(4)])
    assert sorted(per_group.tolist()) == sorted(keep.tolist())
    assert torch.all(scores[keep][:-1] >= scores[keep][1:])
    assert batched_nms(boxes[:0], scores[:0], idxs[:0], 0.5).tolist() == []


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="boxes must have shape"):
        nms(torch.zeros(3, 5), torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="differ in length"):
        nms(torch.zeros(3, 4), torch.zeros(2), 0.5)
    with pytest.raises(ValueError, match="scores must have shape"):
        nms(torch.zeros(3, 4), torch.zeros(3, 1), 0.5)
    with pytest.raises(ValueError, match="idxs"):
        batched_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(2, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="boxes1"):
        box_iou(torch.zeros(4), torch.zeros(1, 4))


def test_matches_torchvision_when_available():
    tv = pytest.importorskip("torchvision")
    boxes = random_boxes(300, size=200, seed=11)
    scores = torch.randint(0, 20, (300,), generator=torch.Generator().manual_seed(12)).float()  # many ties
    idxs = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(13))
    for thr in (0.3, 0.5, 0.7):
        assert nms(boxes, scores, thr).tolist() == tv.ops.nms(boxes, scores, thr).tolist()
        assert sorted(batched_nms(boxes, scores, idxs, thr).tolist()) == sorted(
            tv.ops.batched_nms(boxes, scores, idxs, thr).tolist()
        )
    torch.testing.assert_close(box_iou(boxes, boxes), tv.ops.box_iou(boxes, boxes))
