"""Tests for minimask/model/roi_heads.py: proposal sampling and selection helpers, and RoIHeads in train and eval mode."""
import pytest
import torch

from minimask.model.box_head import BoxPredictor, ConvFCHead, fast_rcnn_inference, fast_rcnn_losses
from minimask.model.keypoint_head import KeypointHead
from minimask.model.mask_head import MaskHead, paste_masks
from minimask.model.roi_heads import (
    RoIHeads,
    RoISamples,
    box_regression_targets,
    has_visible_keypoint_inside,
    label_boxes,
    sample_proposals,
    select_foreground,
)
from minimask.ops.box_coder import decode, encode
from minimask.ops.boxes import box_iou
from minimask.ops.poolers import multiscale_roi_align

NUM_CLASSES, CHANNELS = 3, 64
IMAGE_SIZES = [(64, 96), (56, 80)]  # (h, w) of the unpadded images; features are for a 64 x 96 padded batch
SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)


def make_features(batch=2):
    return [torch.randn(batch, CHANNELS, int(64 * s), int(96 * s)) for s in SCALES]


def make_heads(mask=True, keypoint=True, **kwargs):
    box_head = ConvFCHead(in_channels=CHANNELS, resolution=7, conv_dims=(), fc_dims=(32,), norm="")
    return RoIHeads(
        box_head=box_head,
        box_predictor=BoxPredictor(in_features=32, num_classes=NUM_CLASSES),
        mask_head=MaskHead(in_channels=CHANNELS, conv_dims=(8,), norm="", num_classes=NUM_CLASSES)
        if mask else None,
        keypoint_head=KeypointHead(in_channels=CHANNELS, conv_dims=(8,), num_keypoints=17) if keypoint else None,
        num_classes=NUM_CLASSES, **kwargs,
    )


def random_boxes(n, h=64, w=96, min_side=4.0):
    xy = torch.rand(n, 2) * torch.tensor([w - min_side, h - min_side])
    wh = min_side + torch.rand(n, 2) * (torch.tensor([w, h]) - xy - min_side)
    return torch.cat([xy, xy + wh], dim=1)


def make_target(boxes, labels, h=64, w=96):
    """Target dict with box-filled masks and 17 keypoints per object: the first at the box centre, visible."""
    n = boxes.shape[0]
    masks = torch.zeros(n, h, w, dtype=torch.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
        masks[i, y0:y1, x0:x1] = 1
    keypoints = torch.zeros(n, 17, 3)
    keypoints[:, 0, :2] = (boxes[:, :2] + boxes[:, 2:]) / 2
    keypoints[:, 0, 2] = 2
    return {"boxes": boxes, "labels": torch.as_tensor(labels, dtype=torch.int64), "masks": masks,
            "keypoints": keypoints}


def empty_target(h=64, w=96):
    return make_target(torch.zeros(0, 4), [], h, w)


# Stateless helpers

def test_label_boxes_threshold_is_inclusive_and_no_gt_is_background():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 10.0, 20.5], [0.0, 0.0, 10.0, 10.0]])  # IoU .5, <.5, 1
    labelled = label_boxes(boxes, gt, torch.tensor([2]), 0.5)
    assert labelled.labels.tolist() == [2, 0, 2]
    assert torch.equal(labelled.matched_boxes, gt.expand(3, 4))
    empty = label_boxes(boxes, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 0.5)
    assert empty.labels.tolist() == [0, 0, 0] and torch.equal(empty.matched_boxes, boxes)


def test_sample_proposals_counts_and_labels():
    gt = torch.tensor([[10.0, 10.0, 40.0, 40.0], [50.0, 20.0, 90.0, 60.0]])
    gt_labels = torch.tensor([3, 1])
    near = gt.repeat(300, 1) + torch.randn(600, 4)  # IoU well above 0.5
    far = random_boxes(2000)
    proposals = torch.cat([near, far])
    s = sample_proposals(proposals, gt, gt_labels, iou_threshold=0.5, num_samples=512, positive_fraction=0.25)
    fg = s.labels > 0
    assert s.boxes.shape == (512, 4) and fg.sum() == 128 and fg[:128].all()  # foreground first
    iou = box_iou(gt, s.boxes)  # (G, 512)
    best, idx = iou.max(dim=0)
    assert (best[fg] >= 0.5).all() and (best[~fg] < 0.5).all()
    assert torch.equal(s.matched_idxs[fg], idx[fg]) and torch.equal(s.labels[fg], gt_labels[idx[fg]])
    assert torch.equal(s.matched_boxes[fg], gt[idx[fg]])


def test_sample_proposals_appends_gt():
    gt = torch.tensor([[10.0, 10.0, 40.0, 40.0], [50.0, 20.0, 90.0, 60.0]])
    s = sample_proposals(torch.zeros(0, 4), gt, torch.tensor([3, 1]))
    order = s.matched_idxs.argsort()  # the sample comes in random order
    assert torch.equal(s.boxes[order], gt) and s.labels[order].tolist() == [3, 1] and sorted(s.matched_idxs.tolist()) == [0, 1]
    s = sample_proposals(torch.zeros(0, 4), gt, torch.tensor([3, 1]), append_gt=False)
    assert s.boxes.shape == (0, 4)
    # Few candidates: everything is taken, GT included (2 GT + 10 near + 20 far, all under the budget).
    proposals = torch.cat([gt[:1].repeat(10, 1) + 0.5, torch.tensor([[0.0, 50.0, 8.0, 64.0]]).repeat(20, 1)])
    s = sample_proposals(proposals, gt, torch.tensor([3, 1]))
    assert s.boxes.shape[0] == 32 and (s.labels > 0).sum() == 12


def test_select_foreground_and_visible_keypoints():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 4)
    s = RoISamples(boxes, torch.tensor([1, 0, 2, 1]), torch.tensor([0, 0, 1, 2]), boxes)
    fg = select_foreground([s])[0]
    assert fg.labels.tolist() == [1, 2, 1] and fg.matched_idxs.tolist() == [0, 1, 2]
    keypoints = torch.zeros(3, 17, 3)
    keypoints[0, 3] = torch.tensor([10.0, 5.0, 2.0])  # on the right edge, visible: kept (inclusive test)
    keypoints[1, 3] = torch.tensor([10.5, 5.0, 2.0])  # outside the box
    keypoints[2, 3] = torch.tensor([5.0, 5.0, 0.0])  # inside but not labelled
    assert has_visible_keypoint_inside(keypoints[fg.matched_idxs], fg.boxes).tolist() == [True, False, False]


def test_box_regression_targets_encode_matched_boxes():
    boxes = random_boxes(5)
    gt = random_boxes(5)
    s = RoISamples(boxes, torch.tensor([1, 0, 2, 3, 0]), torch.arange(5), gt)
    labels, targets = box_regression_targets([s, s], (10.0, 10.0, 5.0, 5.0))
    assert labels.tolist() == [1, 0, 2, 3, 0] * 2
    assert torch.allclose(targets, encode(gt, boxes, (10.0, 10.0, 5.0, 5.0)).repeat(2, 1))


# RoIHeads, training

def test_train_losses_match_the_pieces():
    heads = make_heads(mask=False, keypoint=False, batch_size_per_image=64)
    features = make_features()
    proposals = [random_boxes(100), random_boxes(80, 56, 80)]
    targets = [make_target(random_boxes(3), [1, 2, 3]), make_target(random_boxes(2, 56, 80), [2, 2], 56, 80)]
    torch.manual_seed(1)
    _, losses = heads.train()(features, proposals, IMAGE_SIZES, targets)
    torch.manual_seed(1)  # the same draws again, piece by piece
    samples = [sample_proposals(p, t["boxes"], t["labels"], num_samples=64) for p, t in zip(proposals, targets)]
    pooled = multiscale_roi_align(features, [s.boxes for s in samples], 7, list(SCALES), 0, True)
    logits, deltas = heads.box_predictor(heads.box_head(pooled))
    labels, regression_targets = box_regression_targets(samples, (10, 10, 5, 5))
    expected = fast_rcnn_losses(logits, deltas, labels, regression_targets)
    assert losses.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(losses[name], expected[name])


def test_train_with_all_heads_and_an_empty_image():
    heads = make_heads().train()
    targets = [make_target(random_boxes(3), [1, 2, 3]), empty_target(56, 80)]
    _, losses = heads(make_features(), [random_boxes(50), random_boxes(40, 56, 80)], IMAGE_SIZES, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_keypoint"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"] > 0 and losses["loss_keypoint"] > 0  # GT appended: every GT has a foreground RoI


def test_keypoint_loss_weight_scales_only_the_keypoint_loss():
    targets = [make_target(random_boxes(3), [1, 2, 3]), empty_target(56, 80)]
    proposals = [random_boxes(50), random_boxes(40, 56, 80)]
    features = make_features()
    results = []
    for weight in (1.0, 0.25):
        torch.manual_seed(0)  # same heads, same RoI sampling
        heads = make_heads(keypoint_loss_weight=weight).train()
        torch.manual_seed(1)
        results.append(heads(features, proposals, IMAGE_SIZES, targets)[1])
    full, weighted = results
    torch.testing.assert_close(weighted["loss_keypoint"], 0.25 * full["loss_keypoint"])
    for name in ("loss_classifier", "loss_box_reg", "loss_mask"):
        torch.testing.assert_close(weighted[name], full[name], rtol=0, atol=0)


def test_mask_rois_per_image_trains_the_mask_head_on_the_first_foreground_rois():
    targets = [make_target(random_boxes(4), [1, 2, 3, 1]), make_target(random_boxes(3, 56, 80), [2, 2, 1], 56, 80)]
    proposals = [random_boxes(60), random_boxes(50, 56, 80)]
    features = make_features()
    results, seen = [], []
    for cap in (0, 3):
        torch.manual_seed(0)  # same heads, same RoI sampling
        heads = make_heads(mask_rois_per_image=cap, batch_size_per_image=64).train()
        hook = heads.mask_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
        torch.manual_seed(1)
        results.append(heads(features, proposals, IMAGE_SIZES, targets)[1])
        hook.remove()
    full, capped = results
    torch.manual_seed(1)  # the same draws again, piece by piece
    samples = [sample_proposals(p, t["boxes"], t["labels"], num_samples=64) for p, t in zip(proposals, targets)]
    foreground = select_foreground(samples)
    assert all(s.boxes.shape[0] > 3 for s in foreground)  # the cap bites in both images
    assert seen == [sum(s.boxes.shape[0] for s in foreground), 6]
    first = [RoISamples(*(field[:3] for field in s)) for s in foreground]
    torch.testing.assert_close(capped["loss_mask"], heads._mask_loss(features, first, targets))
    assert not torch.allclose(capped["loss_mask"], full["loss_mask"])
    for name in ("loss_classifier", "loss_box_reg", "loss_keypoint"):  # the other heads see the same RoIs
        torch.testing.assert_close(capped[name], full[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="mask_rois_per_image"):
        make_heads(mask_rois_per_image=-1)


def test_no_objects_gives_zero_regression_mask_and_keypoint_losses():
    heads = make_heads().train()
    features = make_features()
    _, losses = heads(features, [random_boxes(50), torch.zeros(0, 4)], IMAGE_SIZES, [empty_target(), empty_target()])
    assert losses["loss_box_reg"].item() == 0.0
    assert losses["loss_mask"].item() == 0.0 and losses["loss_keypoint"].item() == 0.0
    assert torch.isfinite(losses["loss_classifier"]) and losses["loss_classifier"] > 0
    sum(losses.values()).backward()
    # Every parameter takes part in the graph (DDP requirement), with zero gradient in the idle heads.
    assert all(p.grad is not None for p in heads.parameters())
    assert all(not p.grad.any() for p in heads.mask_head.parameters())


def test_zero_proposals_and_no_gt_in_training():
    heads = make_heads().train()
    _, losses = heads(make_features(), [torch.zeros(0, 4)] * 2, IMAGE_SIZES, [empty_target(), empty_target()])
    assert all(v.item() == 0.0 for v in losses.values())


def test_training_input_errors():
    heads = make_heads().train()
    with pytest.raises(ValueError, match="target"):
        heads(make_features(), [random_boxes(5)] * 2, IMAGE_SIZES, None)
    target = make_target(random_boxes(2), [1, 2])
    del target["masks"]
    with pytest.raises(ValueError, match="masks"):
        heads(make_features(), [random_boxes(5)] * 2, IMAGE_SIZES, [target, empty_target()])
    with pytest.raises(ValueError, match="proposal"):
        heads(make_features(), [random_boxes(5)], IMAGE_SIZES, [empty_target()] * 2)


# RoIHeads, inference

def test_eval_zero_proposals_gives_empty_detections():
    heads = make_heads().eval()
    with torch.no_grad():
        detections, losses = heads(make_features(), [torch.zeros(0, 4)] * 2, IMAGE_SIZES)
    assert losses == {} and len(detections) == 2
    for d, (h, w) in zip(detections, IMAGE_SIZES):
        assert set(d) == {"boxes", "labels", "scores", "masks", "keypoints", "keypoints_scores"}
        assert d["boxes"].shape == (0, 4) and d["labels"].shape == (0,) and d["scores"].shape == (0,)
        assert d["masks"].shape == (0, 1, h, w)
        assert d["keypoints"].shape == (0, 17, 3) and d["keypoints_scores"].shape == (0, 17)


def test_eval_outputs_match_the_pieces():
    heads = make_heads(detections_per_image=10).eval()
    features = make_features()
    proposals = [random_boxes(40), random_boxes(30, 56, 80)]
    with torch.no_grad():
        detections, _ = heads(features, proposals, IMAGE_SIZES)
        logits, deltas = heads.box_predictor(heads.box_head(multiscale_roi_align(features, proposals, 7, list(SCALES),
                                                                                 0, True)))
        probs = logits.softmax(dim=1).split([40, 30])
        boxes = decode(deltas, torch.cat(proposals), (10, 10, 5, 5)).split([40, 30])
        for i, (d, (h, w)) in enumerate(zip(detections, IMAGE_SIZES)):
            expected_boxes, scores, labels, _ = fast_rcnn_inference(probs[i], boxes[i], (h, w), 0.05, 0.5, 10)
            n = expected_boxes.shape[0]
            assert n > 0  # random init: every class scores about 1 / (K + 1) > 0.05
            assert torch.allclose(d["boxes"], expected_boxes) and torch.equal(d["labels"], labels)
            assert torch.allclose(d["scores"], scores)
            assert d["labels"].dtype == torch.int64 and d["labels"].min() >= 1 and d["labels"].max() <= NUM_CLASSES
            # Masks: sigmoid of the predicted class's map on the final boxes, pasted into this image's size.
            per_image = [expected_boxes if j == i else torch.zeros(0, 4) for j in range(2)]
            mask_logits = heads.mask_head(multiscale_roi_align(features, per_image, 14, list(SCALES), 0, True))
            mask_probs = mask_logits[torch.arange(n), labels - 1].sigmoid()
            assert d["masks"].shape == (n, 1, h, w) and d["masks"].dtype == torch.float32
            assert torch.allclose(d["masks"], paste_masks(mask_probs, expected_boxes, (h, w)), atol=1e-6)
            assert d["keypoints"].shape == (n, 17, 3) and d["keypoints_scores"].shape == (n, 17)
            assert (d["keypoints"][:, :, 2] == 1).all()


def test_eval_keypoints_only_for_keypoint_classes():
    # The same weights with and without keypoint_classes: detections of those classes get the same keypoints,
    # the others all zeros (v = 0, score 0), and nothing else changes.
    torch.manual_seed(0)
    every = make_heads(detections_per_image=30).eval()
    some = make_heads(detections_per_image=30, keypoint_classes=(2,)).eval()
    some.load_state_dict(every.state_dict())
    features, proposals = make_features(), [random_boxes(40), random_boxes(30, 56, 80)]
    with torch.no_grad():
        expected, _ = every(features, proposals, IMAGE_SIZES)
        detections, _ = some(features, proposals, IMAGE_SIZES)
    for d, e in zip(detections, expected):
        for key in ("boxes", "labels", "scores", "masks"):
            assert torch.equal(d[key], e[key])
        person = d["labels"] == 2
        assert 0 < person.sum() < person.numel()
        torch.testing.assert_close(d["keypoints"][person], e["keypoints"][person])
        torch.testing.assert_close(d["keypoints_scores"][person], e["keypoints_scores"][person])
        assert (d["keypoints"][~person] == 0).all() and (d["keypoints_scores"][~person] == 0).all()
    for bad in ((0,), (NUM_CLASSES + 1,), (1.0,)):
        with pytest.raises(ValueError, match="keypoint_classes"):
            make_heads(keypoint_classes=bad)


def test_eval_without_mask_and_keypoint_heads():
    heads = make_heads(mask=False, keypoint=False).eval()
    with torch.no_grad():
        detections, _ = heads(make_features(), [random_boxes(20), random_boxes(20, 56, 80)], IMAGE_SIZES)
    assert all(set(d) == {"boxes", "labels", "scores"} for d in detections)
