"""RPN: head layout, anchor labelling and sampling, hand-computed losses, proposal selection, and the full module."""
import math

import pytest
import torch

from minimask.model.anchors import multilevel_anchors
from minimask.model.rpn import RPN, RPNHead, find_top_proposals, label_anchors, rpn_losses
from minimask.ops.box_coder import decode
from minimask.ops.boxes import clip_boxes_to_image, nms

STRIDES = (4, 8, 16, 32, 64)


def _features(batch, channels, h, w):
    """Random P2..P6 for a (h, w) padded batch (h, w multiples of 64)."""
    return [torch.randn(batch, channels, h // s, w // s) for s in STRIDES]


# ----------------------------------------------------------------------------------------------------------- head
def test_head_init_and_hwa_layout():
    head = RPNHead(in_channels=8, num_anchors=3)
    for conv in (head.conv, head.objectness_logits, head.anchor_deltas):
        assert torch.count_nonzero(conv.bias) == 0
    assert abs(head.conv.weight.std().item() - 0.01) < 0.002
    feats = [torch.randn(2, 8, 3, 5), torch.randn(2, 8, 2, 1)]
    logits, deltas = head(feats)
    assert [x.shape for x in logits] == [(2, 45), (2, 6)]
    assert [x.shape for x in deltas] == [(2, 45, 4), (2, 6, 4)]
    t = torch.relu(head.conv(feats[0]))
    raw_logits, raw_deltas = head.objectness_logits(t), head.anchor_deltas(t)  # (B, A, H, W), (B, 4A, H, W)
    b, i, j, a = 1, 2, 3, 1
    row = (i * 5 + j) * 3 + a  # (H, W, A) order
    torch.testing.assert_close(logits[0][b, row], raw_logits[b, a, i, j])
    torch.testing.assert_close(deltas[0][b, row], raw_deltas[b, 4 * a:4 * a + 4, i, j])
    with pytest.raises(ValueError, match="RPNHead expects"):
        head([torch.randn(1, 4, 3, 3)])


# ------------------------------------------------------------------------------------------------------ labelling
def test_label_anchors_hand_made():
    anchors = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],  # IoU 1 with GT 0 -> positive
        [0.0, 0.0, 10.0, 8.0],  # IoU 0.8 with GT 0 -> positive
        [5.0, 0.0, 15.0, 10.0],  # IoU 50/150 = 0.33 with GT 0 -> ignored
        [100.0, 100.0, 110.0, 110.0],  # IoU 0 -> negative
        [200.0, 200.0, 210.0, 210.0],  # IoU 0.25 with GT 1, its best anchor -> positive (low-quality match)
        [210.0, 210.0, 222.0, 222.0],  # IoU 100/444 = 0.225 with GT 1 -> negative
    ])
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [200.0, 200.0, 220.0, 220.0]])
    labels, matched = label_anchors(anchors, [gt], 0.7, 0.3, 256, 0.5)
    labels, matched = labels[0], matched[0]
    assert labels.dtype == torch.float32
    assert labels.tolist() == [1.0, 1.0, -1.0, 0.0, 1.0, 0.0]
    torch.testing.assert_close(matched[[0, 1, 4]], gt[[0, 0, 1]])


def _grid_boxes(n, size=10.0, step=20.0, origin=0.0):
    idx = torch.arange(n, dtype=torch.float32)
    x = origin + (idx % 50) * step
    y = origin + (idx // 50) * step
    return torch.stack([x, y, x + size, y + size], dim=1)  # (n, 4), pairwise disjoint


def test_sampling_caps_total_and_positive_share():
    pos_anchors = _grid_boxes(300)  # each matches its own GT exactly
    neg_anchors = _grid_boxes(1000, origin=5000.0)  # far from every GT
    anchors = torch.cat([pos_anchors, neg_anchors])
    labels, matched = (x[0] for x in label_anchors(anchors, [pos_anchors.clone()], 0.7, 0.3, 256, 0.5))
    assert (labels == 1).sum() == 128 and (labels == 0).sum() == 128
    assert (labels[:300] != 0).all() and (labels[300:] != 1).all()
    chosen = torch.where(labels == 1)[0]
    torch.testing.assert_close(matched[chosen], anchors[chosen])
    # Few positives: all are kept and negatives fill up to 256.
    labels = label_anchors(anchors, [pos_anchors[:10].clone()], 0.7, 0.3, 256, 0.5)[0][0]
    assert (labels == 1).sum() == 10 and (labels == 0).sum() == 246


def test_no_gt_image_all_sampled_negative():
    anchors = _grid_boxes(400)
    labels, matched = (x[0] for x in label_anchors(anchors, [torch.zeros(0, 4)], 0.7, 0.3, 256, 0.5))
    assert (labels == 0).sum() == 256 and (labels == -1).sum() == 144 and (labels != 1).all()
    assert matched.shape == (400, 4) and torch.count_nonzero(matched) == 0
    with pytest.raises(ValueError, match="gt_boxes"):
        label_anchors(anchors, torch.zeros(4), 0.7, 0.3, 256, 0.5)


# --------------------------------------------------------------------------------------------------------- losses
def _softplus(x):
    return math.log1p(math.exp(x))


@pytest.mark.parametrize("kind,beta", [("l1", 0.0), ("smooth_l1", 0.2)])
def test_rpn_losses_hand_computed(kind, beta):
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 30.0, 20.0], [0.0, 0.0, 5.0, 5.0]])
    gt = torch.tensor([[0.0, 0.0, 20.0, 10.0], [10.0, 10.0, 30.0, 20.0], [0.0, 0.0, 1.0, 1.0]])
    logits = torch.tensor([[2.0, -1.0, 5.0], [0.5, 3.0, -2.0]], requires_grad=True)  # (B=2, M=3)
    labels = torch.tensor([[1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]])
    pred = torch.tensor([[[0.25, 0.1, 0.5, -0.2], [9.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]],
                         [[9.0, 9.0, 9.0, 9.0], [0.1, 0.0, 0.0, 0.05], [9.0, 9.0, 9.0, 9.0]]], requires_grad=True)
    matched = gt.expand(2, 3, 4)
    norm = RPN(batch_size_per_image=256).loss_normalizer(labels)  # 256 * 2 images (detectron2)
    assert norm.item() == 512
    losses = rpn_losses(anchors, logits, pred, labels, matched, norm, box_reg_loss=kind, smooth_l1_beta=beta)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg"}
    # BCE: label 1 -> softplus(-x), label 0 -> softplus(x); ignored anchors (label -1) contribute nothing.
    obj = _softplus(-2.0) + _softplus(-1.0) + _softplus(-3.0) + _softplus(-2.0)
    # Targets: anchor 0 (centre (5, 5), 10 x 10) -> GT 0 (centre (10, 5), 20 x 10): (0.5, 0, log 2, 0);
    # anchor 1 -> GT 1 is the identity: (0, 0, 0, 0).
    diffs = [0.25 - 0.5, 0.1, 0.5 - math.log(2.0), -0.2, 0.1, 0.0, 0.0, 0.05]
    if kind == "l1":
        reg = sum(abs(d) for d in diffs)
    else:
        reg = sum(0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta for d in diffs)
    norm = 512
    torch.testing.assert_close(losses["loss_objectness"], torch.tensor(obj / norm))
    torch.testing.assert_close(losses["loss_rpn_box_reg"], torch.tensor(reg / norm))
    (losses["loss_objectness"] + losses["loss_rpn_box_reg"]).backward()
    assert pred.grad[0, 1].abs().sum() == 0 and pred.grad[0, 0].abs().sum() > 0  # only positives regress
    assert logits.grad[0, 2] == 0 and logits.grad[1, 0] == 0  # ignored anchors get no gradient


def test_rpn_losses_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        rpn_losses(torch.zeros(3, 4), torch.zeros(1, 3), torch.zeros(1, 2, 4), torch.zeros(1, 3),
                   torch.zeros(1, 3, 4), torch.tensor(256.0))


def test_image_without_objects_zero_box_loss_and_backward():
    rpn = RPN(in_channels=8).train()
    feats = _features(2, 8, 64, 128)
    targets = [{"boxes": torch.zeros(0, 4)}, {"boxes": torch.zeros(0, 4)}]
    _, losses = rpn(feats, [(64, 128), (60, 100)], targets)
    assert losses["loss_rpn_box_reg"].item() == 0.0
    assert torch.isfinite(losses["loss_objectness"]) and losses["loss_objectness"] > 0
    sum(losses.values()).backward()
    for name, p in rpn.named_parameters():
        assert p.grad is not None, name  # every parameter is in the graph (DDP)
    assert torch.count_nonzero(rpn.head.anchor_deltas.weight.grad) == 0


# ---------------------------------------------------------------------------------------------------- proposals
def _proposals(anchors, logits, deltas=None, sizes=((1000, 1000),), **kw):
    if deltas is None:
        deltas = [torch.zeros(*x.shape, 4) for x in logits]  # zero deltas: proposals are the anchors
    args = dict(pre_nms_topk=1000, post_nms_topk=1000, nms_thresh=0.7, min_size=0.0, training=False)
    args.update(kw)
    return find_top_proposals(anchors, logits, deltas, list(sizes), **args)


def test_per_level_topk_then_post_topk():
    level0, level1 = _grid_boxes(5), _grid_boxes(4, origin=300.0)
    logits = [torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2]]), torch.tensor([[0.5, 0.05, 0.7, 0.6]])]
    boxes, scores = _proposals([level0, level1], logits, pre_nms_topk=2)
    # level 0 keeps 0.9, 0.8; level 1 keeps 0.7, 0.6 (its 0.5 is cut although it beats level 0's 0.3)
    torch.testing.assert_close(scores[0], torch.tensor([0.9, 0.8, 0.7, 0.6]))
    torch.testing.assert_close(boxes[0], torch.stack([level0[1], level0[3], level1[2], level1[3]]))
    boxes, scores = _proposals([level0, level1], logits, pre_nms_topk=2, post_nms_topk=3)
    torch.testing.assert_close(scores[0], torch.tensor([0.9, 0.8, 0.7]))


def test_nms_within_levels_only():
    box = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    level0 = torch.cat([box, box + 1.0, _grid_boxes(1, origin=500.0)])  # two near-duplicates on level 0
    level1 = box.clone()  # the same box on level 1
    logits = [torch.tensor([[0.9, 0.8, 0.1]]), torch.tensor([[0.7]])]
    boxes, scores = _proposals([level0, level1], logits)
    torch.testing.assert_close(scores[0], torch.tensor([0.9, 0.7, 0.1]))  # level 0's 0.8 suppressed by its 0.9
    torch.testing.assert_close(boxes[0][:2], torch.cat([box, box]))  # identical boxes of two levels both survive


def test_clipping_min_size_and_all_empty():
    anchors = [torch.tensor([[-10.0, -5.0, 30.0, 200.0], [40.0, 10.0, 60.0, 12.0], [70.0, 70.0, 90.0, 90.0]])]
    logits = [torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])]
    boxes, _ = _proposals(anchors, logits, sizes=[(100, 50), (100, 50)], min_size=2.0)
    # box 0 clipped to (0, 0, 50, 100); box 1 has height 2, not > 2 -> dropped; box 2 lies outside -> empty.
    for b in boxes:
        torch.testing.assert_close(b, torch.tensor([[0.0, 0.0, 30.0, 100.0]]))
    boxes, scores = _proposals(anchors, logits, sizes=[(100, 50), (100, 50)], min_size=1000.0, training=True)
    assert [b.shape for b in boxes] == [(0, 4), (0, 4)] and [s.shape for s in scores] == [(0,), (0,)]


def test_non_finite_raises_in_training_and_is_dropped_in_eval():
    anchors = [_grid_boxes(3)]
    logits = [torch.tensor([[0.3, 0.2, 0.1]])]
    deltas = [torch.zeros(1, 3, 4)]
    deltas[0][0, 1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="Predicted boxes or scores contain Inf/NaN. Training has diverged."):
        _proposals(anchors, logits, deltas, training=True)
    boxes, scores = _proposals(anchors, logits, deltas, training=False)
    torch.testing.assert_close(scores[0], torch.tensor([0.3, 0.1]))
    inf_logits = [torch.tensor([[0.3, float("inf"), 0.1]])]
    with pytest.raises(FloatingPointError):
        _proposals(anchors, inf_logits, training=True)


def _reference_proposals(anchors, logits, deltas, sizes, pre, post, thresh):
    """Brute force: per image, per level top-k, decode, clip, drop empty, NMS per level; then merge and sort."""
    out = []
    for i, size in enumerate(sizes):
        all_boxes, all_scores = [], []
        for anc, lg, dl in zip(anchors, logits, deltas):
            s, idx = lg[i].topk(min(pre, lg.shape[1]))
            b = clip_boxes_to_image(decode(dl[i][idx], anc[idx]), size)
            ok = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
            b, s = b[ok], s[ok]
            keep = nms(b, s, thresh)
            all_boxes.append(b[keep])
            all_scores.append(s[keep])
        b, s = torch.cat(all_boxes), torch.cat(all_scores)
        order = s.argsort(descending=True)[:post]
        out.append(b[order])
    return out


def test_find_top_proposals_matches_brute_force():
    sizes = [(60, 100), (64, 128)]
    anchors = multilevel_anchors((32, 64, 128), (0.5, 1.0, 2.0), [(16, 32), (8, 16), (4, 8)], (4, 8, 16))
    logits = [torch.randn(2, a.shape[0]) for a in anchors]
    deltas = [torch.randn(2, a.shape[0], 4) * 0.3 for a in anchors]
    boxes, scores = find_top_proposals(anchors, logits, deltas, sizes, pre_nms_topk=300, post_nms_topk=200,
                                       nms_thresh=0.7, min_size=0.0, training=True)
    expected = _reference_proposals(anchors, logits, deltas, sizes, 300, 200, 0.7)
    for b, s, e in zip(boxes, scores, expected):
        assert b.shape[0] == 200
        torch.testing.assert_close(b, e)
        assert (s[:-1] >= s[1:]).all()


# ------------------------------------------------------------------------------------------------------ module
def test_rpn_forward_train_and_eval():
    rpn = RPN(in_channels=8, pre_nms_topk_train=200, post_nms_topk_train=100, pre_nms_topk_test=150,
              post_nms_topk_test=50)
    feats = _features(2, 8, 64, 128)
    sizes = [(64, 128), (50, 90)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 40.0], [70.0, 5.0, 120.0, 60.0]])},
               {"boxes": torch.zeros(0, 4)}]
    rpn.train()
    proposals, losses = rpn(feats, sizes, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg"}
    assert losses["loss_rpn_box_reg"] > 0 and all(v.requires_grad for v in losses.values())
    assert len(proposals) == 2
    for p, (h, w) in zip(proposals, sizes):
        assert p.dim() == 2 and p.shape[1] == 4 and 0 < p.shape[0] <= 100 and not p.requires_grad
        assert (p[:, 0::2] <= w).all() and (p[:, 1::2] <= h).all() and (p >= 0).all()
    sum(losses.values()).backward()
    assert rpn.head.conv.weight.grad.abs().sum() > 0
    rpn.eval()
    proposals, losses = rpn(feats, sizes)
    assert losses == {} and [p.shape[0] <= 50 for p in proposals] == [True, True]
    assert all(not p.requires_grad for p in proposals)


def test_rpn_argument_errors():
    rpn = RPN(in_channels=8).train()
    feats = _features(1, 8, 64, 64)
    with pytest.raises(ValueError, match="needs targets"):
        rpn(feats, [(64, 64)])
    with pytest.raises(ValueError, match="targets for a batch"):
        rpn(feats, [(64, 64)], [])
    with pytest.raises(ValueError, match="feature maps"):
        rpn(feats[:4], [(64, 64)], [{"boxes": torch.zeros(0, 4)}])
    with pytest.raises(ValueError, match="batch size"):
        rpn(feats, [(64, 64), (64, 64)], [{"boxes": torch.zeros(0, 4)}])
    with pytest.raises(ValueError, match="one anchor size per stride"):
        RPN(anchor_sizes=(32, 64))
    with pytest.raises(ValueError, match="box_reg_loss"):
        RPN(box_reg_loss="giou")
    with pytest.raises(ValueError, match="bg_iou"):
        RPN(fg_iou=0.3, bg_iou=0.7)
