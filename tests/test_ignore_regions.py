"""Ignore regions in training (mmdetection `MaxIoUAssigner(ignore_iof_thr=...)`): box_iof by hand, anchors and
proposals inside a region taken out of the negatives (positives kept), and "off" leaving everything bit-identical."""
import pytest
import torch
from test_cascade import make_cascade
from test_cascade import make_features as cascade_features
from test_mask_rcnn import two_scenes  # the same synthetic scenes as the model tests
from test_roi_heads import make_target, random_boxes

import minimask
from minimask.config import get_config
from minimask.model.roi_heads import sample_proposals
from minimask.model.rpn import RPN, label_anchors
from minimask.ops.boxes import box_iof, box_iou
from minimask.ops.matcher import inside_ignore_regions


# ----------------------------------------------------------------------------------------------------------- box_iof
def test_box_iof_hand_computed():
    boxes = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],  # right half inside region 0 -> 50 / 100
        [0.0, 0.0, 10.0, 10.0],  # (the same box, against region 1 below: contains it)
        [120.0, 20.0, 130.0, 30.0],  # disjoint from both regions
        [6.0, 2.0, 6.0, 8.0],  # zero width, inside region 0 -> 0, not 0/0
        [6.0, 6.0, 8.0, 8.0],  # inside both regions -> 1 for both
    ])
    regions = torch.tensor([[5.0, 0.0, 100.0, 100.0], [4.0, 4.0, 9.0, 9.0]])  # region 1 is 5 x 5 = 25
    iof = box_iof(boxes, regions)
    assert iof.shape == (5, 2) and iof.dtype == torch.float32
    expected = torch.tensor([
        [0.5, 0.25],  # region 1 inside the box: area(region) / area(box) = 25 / 100
        [0.5, 0.25],
        [0.0, 0.0],
        [0.0, 0.0],
        [1.0, 1.0],
    ])
    assert torch.equal(iof, expected)
    # Not symmetric, and not the IoU: the region seen from the box is a quarter of it, the box covers all of it.
    assert box_iof(regions[1:], boxes[:1]).item() == 1.0
    assert box_iou(boxes[:1], regions[1:]).item() == 0.25


def test_box_iof_edge_cases():
    assert box_iof(torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 1.0, 1.0]])).shape == (0, 1)
    assert box_iof(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.zeros(0, 4)).shape == (1, 0)
    degenerate = torch.tensor([[3.0, 3.0, 3.0, 3.0], [5.0, 5.0, 4.0, 9.0]])  # a point; negative width
    region = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    assert torch.equal(box_iof(degenerate, region), torch.zeros(2, 1))
    half = box_iof(torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float16), region + 5)
    assert half.dtype == torch.float32 and half.item() == 0.25
    with pytest.raises(ValueError, match="regions must have shape"):
        box_iof(region, torch.zeros(4))


def test_inside_ignore_regions_strict_threshold_and_padding():
    iof = torch.tensor([[[0.5, 0.2], [0.6, 0.0], [0.0, 0.9]]])  # (1, N=3, I=2)
    assert inside_ignore_regions(iof, 0.5).tolist() == [[False, True, True]]
    assert inside_ignore_regions(iof, 0.5, torch.tensor([[True, False]])).tolist() == [[False, True, False]]
    assert inside_ignore_regions(torch.zeros(2, 3, 0), 0.5).tolist() == [[False] * 3] * 2  # no region


# ----------------------------------------------------------------------------------------------------------- RPN
ANCHORS = torch.tensor([
    [0.0, 0.0, 10.0, 10.0],  # 0: IoU 1 with GT 0, outside the region -> positive
    [5.0, 0.0, 15.0, 10.0],  # 1: IoU 50/150 = 0.33 with GT 0 -> ignored by IoU (between 0.3 and 0.7)
    [50.0, 50.0, 60.0, 60.0],  # 2: IoU 0, IoF 0 -> negative
    [100.0, 0.0, 110.0, 10.0],  # 3: IoU 1 with GT 1, IoF 1 (inside the region) -> stays positive
    [120.0, 20.0, 130.0, 30.0],  # 4: IoU 0, IoF 1 -> negative, ignored by the region
    [135.0, 0.0, 145.0, 10.0],  # 5: IoU 0, IoF 50/100 = 0.5, not > 0.5 -> stays negative
    [136.0, 20.0, 146.0, 30.0],  # 6: IoU 0, IoF 0.4 -> stays negative
    [107.0, 0.0, 117.0, 10.0],  # 7: IoU 30/170 = 0.18 with GT 1 (negative by IoU), IoF 1 -> ignored by the region
    [134.0, 30.0, 144.0, 40.0],  # 8: IoU 0, IoF 60/100 = 0.6 -> ignored by the region
])
GT = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 0.0, 110.0, 10.0]])  # GT 1: a labelled person inside the crowd
REGION = torch.tensor([[100.0, 0.0, 140.0, 40.0]])  # 40 x 40 crowd
LABELS_OFF = [1.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
LABELS_ON = [1.0, -1.0, 0.0, 1.0, -1.0, 0.0, 0.0, -1.0, -1.0]


def test_hand_built_anchors_iof():
    """The comments of ANCHORS, checked: the IoF of each anchor with the region."""
    expected = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 0.5, 0.4, 1.0, 0.6])
    torch.testing.assert_close(box_iof(ANCHORS, REGION)[:, 0], expected)


def test_label_anchors_region_ignores_negatives_only():
    # batch_size_per_image 256 >> 9 anchors: every positive and negative is sampled, so the labels are exact.
    labels, matched = label_anchors(ANCHORS, [GT], 0.7, 0.3, 256, 0.5)
    assert labels[0].tolist() == LABELS_OFF
    labels, matched = label_anchors(ANCHORS, [GT], 0.7, 0.3, 256, 0.5, ignore_boxes=[REGION], ignore_iof_thr=0.5)
    assert labels[0].tolist() == LABELS_ON
    torch.testing.assert_close(matched[0, [0, 3]], GT)  # anchor 3 keeps its GT inside the region
    # A lower threshold also catches the IoF-0.5 and 0.4 anchors; positives still stay.
    labels, _ = label_anchors(ANCHORS, [GT], 0.7, 0.3, 256, 0.5, ignore_boxes=[REGION], ignore_iof_thr=0.3)
    assert labels[0].tolist() == [1.0, -1.0, 0.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0]


def test_label_anchors_batch_with_and_without_regions():
    """Image 0 has the region; image 1 (only GT 0) has none, given as an empty (0, 4) tensor or as None."""
    image1_labels = [1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # anchor 3 is negative without GT 1
    for none in (torch.zeros(0, 4), None):
        labels, matched = label_anchors(ANCHORS, [GT, GT[:1]], 0.7, 0.3, 256, 0.5, ignore_boxes=[REGION, none],
                                        ignore_iof_thr=0.5)
        assert labels.shape == (2, 9) and matched.shape == (2, 9, 4)
        assert labels[0].tolist() == LABELS_ON and labels[1].tolist() == image1_labels
    # The region of image 1 only: image 0 is labelled as without regions.
    labels, _ = label_anchors(ANCHORS, [GT, GT[:1]], 0.7, 0.3, 256, 0.5, ignore_boxes=[None, REGION],
                              ignore_iof_thr=0.5)
    assert labels[0].tolist() == LABELS_OFF
    assert labels[1].tolist() == [1.0, -1.0, 0.0, -1.0, -1.0, 0.0, 0.0, -1.0, -1.0]  # anchor 3: negative, in region
    with pytest.raises(ValueError, match="ignore_boxes entries"):
        label_anchors(ANCHORS, [GT, GT], 0.7, 0.3, 256, 0.5, ignore_boxes=[REGION], ignore_iof_thr=0.5)
    with pytest.raises(ValueError, match="ignore_boxes must have shape"):
        label_anchors(ANCHORS, [GT], 0.7, 0.3, 256, 0.5, ignore_boxes=[torch.zeros(4)], ignore_iof_thr=0.5)


def _many_anchors():
    """A 30 x 30 grid of 16 x 16 anchors (900) and a few GT boxes: more candidates than are sampled."""
    idx = torch.arange(900, dtype=torch.float32)
    xy = torch.stack([(idx % 30) * 8, (idx // 30) * 8], dim=1)
    anchors = torch.cat([xy, xy + 16], dim=1)
    gt = [torch.tensor([[10.0, 10.0, 40.0, 50.0], [100.0, 120.0, 130.0, 140.0]]), torch.tensor([[60.0, 0.0, 90, 30]])]
    regions = [torch.tensor([[150.0, 150.0, 240.0, 240.0], [0.0, 100.0, 60.0, 200.0]]), torch.zeros(0, 4)]
    return anchors, gt, regions


def test_label_anchors_off_is_the_old_call():
    anchors, gt, regions = _many_anchors()
    torch.manual_seed(3)
    old = label_anchors(anchors, gt, 0.7, 0.3, 32, 0.5)
    after_old = torch.rand(1)
    calls = [{"ignore_boxes": regions},  # threshold off (default -1)
             {"ignore_boxes": regions, "ignore_iof_thr": -1.0},
             {"ignore_boxes": None, "ignore_iof_thr": 0.5},  # on, but no ignore boxes
             {"ignore_boxes": [torch.zeros(0, 4), None], "ignore_iof_thr": 0.5}]  # on, no region in any image
    for kwargs in calls:
        torch.manual_seed(3)
        new = label_anchors(anchors, gt, 0.7, 0.3, 32, 0.5, **kwargs)
        assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1]), kwargs
        assert torch.equal(torch.rand(1), after_old), kwargs  # the same random draws


def test_label_anchors_on_samples_the_same_positives_and_no_negative_in_a_region():
    anchors, gt, regions = _many_anchors()
    torch.manual_seed(3)
    off, _ = label_anchors(anchors, gt, 0.7, 0.3, 32, 0.5)
    torch.manual_seed(3)
    on, _ = label_anchors(anchors, gt, 0.7, 0.3, 32, 0.5, ignore_boxes=regions, ignore_iof_thr=0.5)
    assert torch.equal(on == 1, off == 1)  # the same random keys, the same positive pool
    assert torch.equal((on >= 0).sum(dim=1), (off >= 0).sum(dim=1))  # the negatives still fill the sample
    in_region = box_iof(anchors, regions[0]).max(dim=1).values > 0.5  # (M,)
    assert (off[0, in_region] == 0).any()  # the test means something: off samples negatives there
    assert not (on[0, in_region] == 0).any()


def test_rpn_stores_the_threshold():
    assert RPN().ignore_iof_thr == -1.0
    assert RPN(ignore_iof_thr=0.5).ignore_iof_thr == 0.5


# ------------------------------------------------------------------------------------------------------- RoI heads
def test_sample_proposals_region_ignores_background_only():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [60.0, 10.0, 70.0, 20.0]])  # GT 1 inside the region
    gt_labels = torch.tensor([2, 1])
    region = torch.tensor([[50.0, 0.0, 90.0, 40.0]])
    proposals = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],  # 0: IoU 1 with GT 0 -> foreground (2)
        [50.0, 0.0, 60.0, 10.0],  # 1: background, IoF 1 -> ignored
        [85.0, 0.0, 95.0, 10.0],  # 2: background, IoF 0.5, not > 0.5 -> background
        [20.0, 20.0, 30.0, 30.0],  # 3: background, IoF 0 -> background
        [61.0, 10.0, 71.0, 20.0],  # 4: IoU 90/110 = 0.82 with GT 1, IoF 1 -> stays foreground (1)
        [62.0, 12.0, 67.0, 17.0],  # 5: IoU 25/100 = 0.25 with GT 1 -> background, IoF 1 -> ignored
    ])
    assert box_iof(proposals, region)[:, 0].tolist() == [0.0, 1.0, 0.5, 0.0, 1.0, 1.0]

    def sampled(**kwargs):
        s = sample_proposals(proposals, gt, gt_labels, num_samples=512, positive_fraction=0.25, **kwargs)
        return sorted(zip(map(tuple, s.boxes.tolist()), s.labels.tolist()))

    def rows(indices, labels):
        return [(tuple(proposals[i].tolist()), label) for i, label in zip(indices, labels)]

    appended = [(tuple(g), label) for g, label in zip(gt.tolist(), gt_labels.tolist())]  # GT appended, foreground
    assert sampled() == sorted(rows(range(6), [2, 0, 0, 0, 1, 0]) + appended)
    assert sampled(ignore_boxes=region, ignore_iof_thr=0.5) == sorted(rows([0, 2, 3, 4], [2, 0, 0, 1]) + appended)
    assert sampled(ignore_boxes=region, ignore_iof_thr=0.5, append_gt=False) == sorted(rows([0, 2, 3, 4],
                                                                                             [2, 0, 0, 1]))
    with pytest.raises(ValueError, match="ignore_boxes must have shape"):
        sample_proposals(proposals, gt, gt_labels, ignore_boxes=torch.zeros(4), ignore_iof_thr=0.5)


def test_sample_proposals_off_is_the_old_call():
    gt = torch.tensor([[10.0, 10.0, 40.0, 40.0], [50.0, 20.0, 90.0, 60.0]])
    gt_labels = torch.tensor([3, 1])
    proposals = torch.cat([gt.repeat(100, 1) + torch.randn(200, 4), random_boxes(1000)])
    region = torch.tensor([[0.0, 0.0, 48.0, 64.0]])
    torch.manual_seed(5)
    old = sample_proposals(proposals, gt, gt_labels, num_samples=64)
    after_old = torch.rand(1)
    calls = [{"ignore_boxes": region}, {"ignore_boxes": region, "ignore_iof_thr": -0.5},
             {"ignore_boxes": None, "ignore_iof_thr": 0.5}, {"ignore_boxes": torch.zeros(0, 4), "ignore_iof_thr": 0.5}]
    for kwargs in calls:
        torch.manual_seed(5)
        new = sample_proposals(proposals, gt, gt_labels, num_samples=64, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(new, old)), kwargs
        assert torch.equal(torch.rand(1), after_old), kwargs
    # On: the same foreground sample (the same random keys), and no background inside the region.
    torch.manual_seed(5)
    on = sample_proposals(proposals, gt, gt_labels, num_samples=64, ignore_boxes=region, ignore_iof_thr=0.5)
    assert torch.equal(on.boxes[on.labels > 0], old.boxes[old.labels > 0]) and on.boxes.shape == old.boxes.shape
    in_region = box_iof(on.boxes, region)[:, 0] > 0.5
    assert not (in_region & (on.labels == 0)).any()
    assert ((box_iof(old.boxes, region)[:, 0] > 0.5) & (old.labels == 0)).any()  # off samples some there


def test_cascade_forwards_the_threshold_to_stage_one():
    assert make_cascade(mask=False).ignore_iof_thr == -1.0
    heads = make_cascade(mask=False, ignore_iof_thr=0.5).train()
    assert heads.ignore_iof_thr == 0.5
    targets = [make_target(random_boxes(3), [1, 2, 3]), make_target(torch.zeros(0, 4), [], 56, 80)]
    targets[0]["ignore_boxes"] = torch.tensor([[0.0, 0.0, 48.0, 64.0]])
    targets[1]["ignore_boxes"] = torch.zeros(0, 4)
    proposals = [random_boxes(60), random_boxes(40, 56, 80)]
    features = cascade_features()
    results = []
    for thr in (-1.0, 0.5):
        heads.ignore_iof_thr = thr
        torch.manual_seed(7)
        _, losses = heads(features, proposals, [(64, 96), (56, 80)], targets)
        results.append(losses)
    assert all(torch.isfinite(v) for v in results[1].values())
    assert results[0]["loss_classifier_stage1"] != results[1]["loss_classifier_stage1"]


# ------------------------------------------------------------------------------------------------------- the model
def test_model_losses_bit_identical_when_off_and_changed_when_on():
    torch.manual_seed(0)
    model = minimask.build_model(get_config("tiny"))
    assert model.rpn.ignore_iof_thr < 0 and model.roi_heads.ignore_iof_thr < 0  # off by default
    images, targets = two_scenes()
    # A crowd in an empty corner of image 0 (objects at x 10..60, y 12..70 and x 70..120, y 60..118); none in image 1.
    with_regions = [dict(targets[0], ignore_boxes=torch.tensor([[0.0, 80.0, 60.0, 128.0]])),
                    dict(targets[1], ignore_boxes=torch.zeros(0, 4))]

    def losses(tgts):
        torch.manual_seed(1)  # the same anchor and RoI sampling
        return model(images, tgts)

    plain = losses(targets)
    off = losses(with_regions)
    assert off.keys() == plain.keys()
    assert all(torch.equal(off[k], plain[k]) for k in plain)

    model.rpn.ignore_iof_thr = model.roi_heads.ignore_iof_thr = 0.5
    on_without_regions = losses(targets)  # on, but no target carries ignore_boxes
    assert all(torch.equal(on_without_regions[k], plain[k]) for k in plain)
    on = losses(with_regions)
    assert on["loss_objectness"] != plain["loss_objectness"]
    assert on["loss_classifier"] != plain["loss_classifier"]
    assert all(v.dim() == 0 and torch.isfinite(v) for v in on.values())
    model.zero_grad()
    sum(on.values()).backward()
    assert model.rpn.head.objectness_logits.weight.grad.abs().sum() > 0
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
