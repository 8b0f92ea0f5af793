"""Tests for minimask/model/cascade.py: Cascade R-CNN heads in train and eval mode, score averaging, gradient scaling."""
import pytest
import torch
from test_roi_heads import make_target, random_boxes  # the same toy proposals and targets

import minimask.model.cascade as cascade_module
from minimask.model.box_head import BoxPredictor, ConvFCHead, fast_rcnn_inference
from minimask.model.cascade import CascadeRoIHeads, _ScaleGradient, next_stage_boxes
from minimask.model.mask_head import MaskHead
from minimask.ops.box_coder import decode
from minimask.ops.boxes import clip_boxes_to_image

NUM_CLASSES, CHANNELS = 3, 64
IMAGE_SIZES = [(64, 96), (56, 80)]
SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
WEIGHTS = ((10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15))


def make_features(requires_grad=False):
    return [torch.randn(2, CHANNELS, int(64 * s), int(96 * s), requires_grad=requires_grad) for s in SCALES]


def make_cascade(mask=True, **kwargs):
    heads = [ConvFCHead(in_channels=CHANNELS, resolution=7, conv_dims=(), fc_dims=(32,), norm="") for _ in range(3)]
    return CascadeRoIHeads(
        box_heads=heads,
        box_predictors=[BoxPredictor(in_features=32, num_classes=NUM_CLASSES, class_agnostic=True) for _ in heads],
        mask_head=MaskHead(in_channels=CHANNELS, conv_dims=(8,), norm="", num_classes=NUM_CLASSES) if mask else None,
        num_classes=NUM_CLASSES, **kwargs,
    )


STAGE_LOSSES = {f"loss_{name}_stage{t}" for name in ("classifier", "box_reg") for t in (1, 2, 3)}


def test_train_loss_keys_and_backward():
    heads = make_cascade().train()
    targets = [make_target(random_boxes(3), [1, 2, 3]), make_target(torch.zeros(0, 4), [], 56, 80)]
    _, losses = heads(make_features(), [random_boxes(60), random_boxes(40, 56, 80)], IMAGE_SIZES, targets)
    assert set(losses) == STAGE_LOSSES | {"loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_mask"] > 0
    sum(losses.values()).backward()
    for stage in range(3):
        assert heads.box_predictor[stage].cls_score.weight.grad.abs().sum() > 0
        assert heads.box_predictor[stage].bbox_pred.weight.grad.abs().sum() > 0


def test_train_without_objects_or_proposals():
    heads = make_cascade().train()
    empty = [make_target(torch.zeros(0, 4), []), make_target(torch.zeros(0, 4), [], 56, 80)]
    _, losses = heads(make_features(), [random_boxes(30), torch.zeros(0, 4)], IMAGE_SIZES, empty)
    assert all(losses[f"loss_box_reg_stage{t}"].item() == 0.0 for t in (1, 2, 3)) and losses["loss_mask"].item() == 0
    assert all(torch.isfinite(losses[f"loss_classifier_stage{t}"]) for t in (1, 2, 3))
    _, losses = heads(make_features(), [torch.zeros(0, 4)] * 2, IMAGE_SIZES, empty)
    assert all(v.item() == 0.0 for v in losses.values())


def test_later_stages_relabel_at_higher_iou_without_resampling(monkeypatch):
    heads = make_cascade(mask=False).train()
    for predictor in heads.box_predictor:  # zero deltas: every stage's boxes equal its RoIs
        torch.nn.init.zeros_(predictor.bbox_pred.weight)
    gt = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    # IoUs with the GT: 0.8 (fg at every stage), 0.65 (fg at 0.5 and 0.6), 0.55 (fg at 0.5 only), 0 (bg).
    # [10, 10, x1, 50] has IoU 40 / (x1 - 10) with the GT, and stays inside the 96-pixel-wide image.
    proposals = torch.tensor([[10.0, 10.0, 10 + 40 / iou, 50.0] for iou in (0.8, 0.65, 0.55)]
                             + [[60.0, 0.0, 90.0, 30.0]])
    labels_seen = []
    original = cascade_module.fast_rcnn_losses

    def recording(class_logits, box_deltas, labels, *args):
        labels_seen.append(labels.clone())
        return original(class_logits, box_deltas, labels, *args)

    monkeypatch.setattr(cascade_module, "fast_rcnn_losses", recording)
    targets = [make_target(gt, [2]), make_target(torch.zeros(0, 4), [], 56, 80)]
    heads(make_features(), [proposals, torch.zeros(0, 4)], IMAGE_SIZES, targets)
    assert len(labels_seen) == 3
    # Stage 1 samples the 4 proposals + the appended GT; stages 2 and 3 keep exactly those 5 RoIs.
    assert [int((s > 0).sum()) for s in labels_seen] == [4, 3, 2]
    assert all(s.shape == (5,) for s in labels_seen)


def test_boxes_pushed_out_of_the_image_are_dropped_in_training(monkeypatch):
    heads = make_cascade(mask=False).train()
    torch.nn.init.zeros_(heads.box_predictor[0].bbox_pred.weight)
    with torch.no_grad():
        heads.box_predictor[0].bbox_pred.bias[0] = 1000.0  # dx = 100 box widths: every stage-1 box leaves the image
    sizes_seen = []
    original = cascade_module.fast_rcnn_losses

    def recording(class_logits, box_deltas, labels, *args):
        sizes_seen.append(labels.shape[0])
        return original(class_logits, box_deltas, labels, *args)

    monkeypatch.setattr(cascade_module, "fast_rcnn_losses", recording)
    targets = [make_target(random_boxes(2), [1, 2]), make_target(torch.zeros(0, 4), [], 56, 80)]
    _, losses = heads(make_features(), [random_boxes(20), random_boxes(10, 56, 80)], IMAGE_SIZES, targets)
    assert sizes_seen == [32, 0, 0]  # 20 + 2 GT + 10 sampled at stage 1; clipped to zero width, then dropped
    assert losses["loss_classifier_stage2"].item() == 0.0 and losses["loss_box_reg_stage3"].item() == 0.0


def test_next_stage_boxes_clip_and_drop_empty():
    boxes = [torch.tensor([[-5.0, -5.0, 20.0, 20.0], [100.0, 10.0, 120.0, 20.0], [10.0, 10.0, 20.0, 20.0]])]
    kept = next_stage_boxes(boxes, [(64, 96)], drop_empty=True)[0]
    assert kept.tolist() == [[0.0, 0.0, 20.0, 20.0], [10.0, 10.0, 20.0, 20.0]]  # the second is outside: width 0
    assert next_stage_boxes(boxes, [(64, 96)], drop_empty=False)[0].shape == (3, 4)


def test_eval_scores_are_the_stage_average_and_boxes_from_stage_3():
    heads = make_cascade(detections_per_image=20).eval()
    outputs = []
    for predictor in heads.box_predictor:
        predictor.register_forward_hook(lambda module, inputs, out: outputs.append(out))
    proposals = [random_boxes(30), random_boxes(25, 56, 80)]
    with torch.no_grad():
        detections, _ = heads(make_features(), proposals, IMAGE_SIZES)
    assert len(outputs) == 3 + 0  # one call per stage (the mask head is not a box predictor)
    probs = sum(logits.softmax(dim=1) for logits, _ in outputs) / 3  # (R, K+1)
    counts = [30, 25]
    boxes = list(proposals)
    for stage, (_, deltas) in enumerate(outputs):
        if stage > 0:
            boxes = [clip_boxes_to_image(b, size) for b, size in zip(boxes, IMAGE_SIZES)]
        boxes = list(decode(deltas, torch.cat(boxes), WEIGHTS[stage]).split(counts))
    for d, probs_i, boxes_i, size in zip(detections, probs.split(counts), boxes, IMAGE_SIZES):
        expected_boxes, scores, labels, _ = fast_rcnn_inference(probs_i, boxes_i.repeat(1, NUM_CLASSES), size,
                                                                0.05, 0.5, 20)
        assert scores.shape[0] > 0
        assert torch.allclose(d["scores"], scores) and torch.equal(d["labels"], labels)
        assert torch.allclose(d["boxes"], expected_boxes)
        assert d["masks"].shape == (scores.shape[0], 1, *size)


def test_eval_zero_proposals():
    heads = make_cascade().eval()
    with torch.no_grad():
        detections, _ = heads(make_features(), [torch.zeros(0, 4)] * 2, IMAGE_SIZES)
    for d, size in zip(detections, IMAGE_SIZES):
        assert d["boxes"].shape == (0, 4) and d["scores"].shape == (0,) and d["masks"].shape == (0, 1, *size)


def test_scale_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    y = _ScaleGradient.apply(x, 1 / 3)
    assert torch.equal(y, x)
    (y * torch.arange(3.0)).sum().backward()
    assert torch.allclose(x.grad, torch.arange(3.0).expand(4, 3) / 3)


def test_stage_gradient_into_features_is_scaled_by_one_third():
    heads = make_cascade(mask=False)
    features = make_features(requires_grad=True)
    boxes = [random_boxes(10), random_boxes(8, 56, 80)]
    grads = {}
    for training in (True, False):
        heads.train(training)
        for f in features:
            f.grad = None
        logits, deltas, _ = heads._run_stage(1, features, boxes)
        (logits.sum() + deltas.sum()).backward()
        grads[training] = [torch.zeros_like(f) if f.grad is None else f.grad.clone() for f in features]
    assert sum(g.abs().sum() for g in grads[False]) > 0
    for train_grad, eval_grad in zip(grads[True], grads[False]):
        assert torch.allclose(train_grad, eval_grad / 3, atol=1e-7)


def test_rejects_class_specific_predictors_and_mismatched_stages():
    heads = [ConvFCHead(in_channels=CHANNELS, resolution=7, conv_dims=(), fc_dims=(32,)) for _ in range(3)]
    with pytest.raises(ValueError, match="class-agnostic"):
        CascadeRoIHeads(box_heads=heads, box_predictors=[BoxPredictor(in_features=32, num_classes=3)] * 3,
                        num_classes=3)
    with pytest.raises(ValueError, match="same positive number"):
        CascadeRoIHeads(box_heads=heads[:2], box_predictors=[BoxPredictor(in_features=32, num_classes=3,
                                                                          class_agnostic=True)] * 3, num_classes=3)
