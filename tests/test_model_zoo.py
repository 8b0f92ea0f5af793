"""minimask.interop.model_zoo: torchvision detection checkpoints in minimask, `from_checkpoint`, and the torchvision conventions
the torchvision_* presets switch on.

Parity tests run only where torchvision is installed (the /work/tvenv interpreter); they build torchvision's models
with random weights (weights=None, a fixed seed), set the classifier biases so that detections exist, and compare
detections, losses and gradients with minimask's on the same image.
"""

import pytest
import torch

from minimask import build_model, get_config
from minimask.config import to_dict
from minimask.engine.checkpoint import save_checkpoint
from minimask.interop.model_zoo import config_from_dict, from_checkpoint
from minimask.interop.torchvision_conventions import TorchvisionRoIHeads, TorchvisionRPN, paste_masks_legacy
from minimask.interop.torchvision_format import convert_torchvision_detection
from minimask.model.anchors import cell_anchors, grid_anchors
from minimask.model.box_head import fast_rcnn_inference
from minimask.model.keypoint_head import heatmaps_to_keypoints
from minimask.model.rpn import RPN, rpn_losses

PRESETS = {"v1": "torchvision_maskrcnn_r50_fpn", "v2": "torchvision_maskrcnn_r50_fpn_v2",
           "kp": "torchvision_keypointrcnn_r50_fpn"}


# ---- conventions, checked by hand (no torchvision needed) ------------------------------------------------------

def test_rounded_cell_anchors_and_per_axis_strides():
    # torchvision: w = 32 / sqrt(0.5) = 45.25, h = 22.63 -> halves 22.63, 11.31 rounded to 23, 11.
    cell = cell_anchors(32, (0.5, 1.0, 2.0), round_to_int=True)
    assert cell.tolist() == [[-23.0, -11.0, 23.0, 11.0], [-16.0, -16.0, 16.0, 16.0], [-11.0, -23.0, 11.0, 23.0]]
    anchors = grid_anchors(cell_anchors(8, (1.0,)), (2, 2), stride=(61, 64)).view(2, 2, 4)
    assert anchors[1, 0].tolist() == [-4.0, 57.0, 4.0, 65.0]  # row 1 shifted by stride_y
    assert anchors[0, 1].tolist() == [60.0, -4.0, 68.0, 4.0]  # column 1 by stride_x


def test_paste_masks_legacy_hand_computed():
    # A 2x2 mask of ones in box (1, 1, 3, 3): padded to 4x4, box scaled by 4/2 about (2, 2) -> (0, 0, 4, 4),
    # resized to 5x5 and written to rows/cols 0..4; the border falls off the 4x4 image.
    probs = torch.ones(1, 2, 2)
    out = paste_masks_legacy(probs, torch.tensor([[1.0, 1.0, 3.0, 3.0]]), (4, 4))
    padded = torch.nn.functional.pad(probs, (1, 1, 1, 1))[None]
    expected = torch.nn.functional.interpolate(padded, size=(5, 5), mode="bilinear", align_corners=False)[0, 0, :4, :4]
    assert out.shape == (1, 1, 4, 4)
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=0)
    assert paste_masks_legacy(torch.zeros(0, 28, 28), torch.zeros(0, 4), (5, 6)).shape == (0, 1, 5, 6)
    # A box entirely outside the image pastes nothing.
    assert paste_masks_legacy(torch.ones(1, 4, 4), torch.tensor([[20.0, 20.0, 30.0, 30.0]]), (8, 8)).sum() == 0


def test_keypoint_logit_score_is_the_upsampled_maximum():
    logits = torch.randn(2, 3, 8, 8)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [2.0, 3.0, 10.5, 7.2]])
    kp_soft, score_soft = heatmaps_to_keypoints(logits, boxes)
    kp_logit, score_logit = heatmaps_to_keypoints(logits, boxes, score="logit")
    assert torch.equal(kp_soft, kp_logit)
    # An 8x8 box resizes the 8x8 map to itself: the score is the map's own maximum.
    torch.testing.assert_close(score_logit[0], logits[0].flatten(1).max(1).values)
    assert not torch.allclose(score_soft, score_logit)
    with pytest.raises(ValueError, match="score"):
        heatmaps_to_keypoints(logits, boxes, score="prob")


def test_fast_rcnn_inference_min_size_drops_thin_boxes():
    probs = torch.tensor([[0.1, 0.9], [0.2, 0.8]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.005, 20.0]])  # the second is 0.005 px wide
    assert fast_rcnn_inference(probs, boxes, (30, 30), min_size=0.0)[0].shape[0] == 2
    kept, scores, _, rows = fast_rcnn_inference(probs, boxes, (30, 30), min_size=0.01)
    assert rows.tolist() == [0]


def test_rpn_loss_normalised_by_sampled_anchors():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [0.0, 0.0, 20.0, 20.0]])
    logits = torch.tensor([[0.5, -1.0, 2.0]])
    deltas = torch.zeros(1, 3, 4)
    labels = torch.tensor([[1.0, 0.0, -1.0]])  # two sampled anchors
    gt = torch.tensor([[[1.0, 1.0, 11.0, 11.0]] * 3])
    d2 = rpn_losses(anchors, logits, deltas, labels, gt, RPN().loss_normalizer(labels))
    tv = rpn_losses(anchors, logits, deltas, labels, gt, TorchvisionRPN().loss_normalizer(labels),
                    box_reg_loss="smooth_l1", smooth_l1_beta=1 / 9)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[0, :2], labels[0, :2])  # mean over 2
    torch.testing.assert_close(tv["loss_objectness"], bce)
    torch.testing.assert_close(d2["loss_objectness"], bce * 2 / 256)
    # Box loss on the one positive: deltas (0.1, 0.1, 0, 0), smooth-L1 beta 1/9 -> 2 * 0.5 * 0.01 * 9, / 2 sampled.
    torch.testing.assert_close(tv["loss_rpn_box_reg"], torch.tensor(2 * 0.5 * 0.01 * 9 / 2))


def test_freeze_norms_false_keeps_batchnorm_but_stops_gradients():
    from minimask.model.norm import FrozenBatchNorm2d
    from minimask.model.resnet import ResNet

    net = ResNet(depth=18, norm="BN", freeze_at=2, freeze_norms=False)  # torchvision v2: BN in frozen stages
    assert type(net.norm1) is torch.nn.BatchNorm2d and not net.norm1.weight.requires_grad
    assert type(net.layer1[0].norm1) is torch.nn.BatchNorm2d
    assert not any(p.requires_grad for p in net.layer1.parameters())
    assert all(p.requires_grad for p in net.layer2.parameters())
    assert isinstance(ResNet(depth=18, norm="BN", freeze_at=2).layer1[0].norm1, FrozenBatchNorm2d)


def test_torchvision_key_names_old_and_new_convert(tmp_path):
    # torchvision < 0.13 files name the bare convs (conv.weight, mask_fcn{i}, inner_blocks.{i}.weight).
    names = {
        "backbone.body.conv1.weight": "backbone.conv1.weight",
        "backbone.body.layer1.0.bn1.running_var": "backbone.layer1.0.norm1.running_var",
        "backbone.body.layer2.0.downsample.1.bias": "backbone.layer2.0.downsample.1.bias",
        "backbone.fpn.inner_blocks.0.weight": "fpn.lateral_convs.0.weight",
        "backbone.fpn.layer_blocks.3.0.bias": "fpn.output_convs.3.bias",
        "rpn.head.conv.weight": "rpn.head.conv.weight",
        "rpn.head.conv.1.0.bias": "rpn.head.extra_convs.0.bias",
        "rpn.head.cls_logits.weight": "rpn.head.objectness_logits.weight",
        "roi_heads.box_head.fc7.bias": "roi_heads.box_head.layers.3.bias",
        "roi_heads.mask_head.mask_fcn2.weight": "roi_heads.mask_head.convs.2.weight",
        "roi_heads.mask_predictor.conv5_mask.weight": "roi_heads.mask_head.deconv.weight",
        "roi_heads.keypoint_head.14.bias": "roi_heads.keypoint_head.convs.14.bias",
        "roi_heads.box_predictor.bbox_pred.bias": "roi_heads.box_predictor.bbox_pred.bias",
    }
    state = {k: torch.arange(8.0) for k in names}
    converted, preset = convert_torchvision_detection(state)
    assert preset is None  # no known full layout: from_checkpoint would ask for config=
    assert set(converted) == set(names.values())
    assert converted["roi_heads.box_predictor.bbox_pred.bias"].tolist() == [4.0, 5.0, 6.0, 7.0]  # background dropped
    with pytest.raises(ValueError, match="unrecognised"):
        convert_torchvision_detection({**state, "roi_heads.something.weight": torch.zeros(1)})
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="config="):
        from_checkpoint(tmp_path / "partial.pth")


# ---- from_checkpoint with minimask files ------------------------------------------------------------------------

def test_from_checkpoint_minimask_training_checkpoint(tmp_path):
    cfg = get_config("tiny", ["model.roi_heads.num_classes=4"])
    model = build_model(cfg).eval()
    model.category_ids.copy_(torch.tensor([3, 7, 9, 11]))
    path = save_checkpoint(tmp_path / "model_final.pth", {"model": model.state_dict(), "config": to_dict(cfg),
                                                          "iteration": 5})
    loaded = from_checkpoint(path)
    assert not loaded.training and loaded.num_classes == 4 and loaded.category_ids.tolist() == [3, 7, 9, 11]
    image = torch.rand(3, 64, 96)
    with torch.no_grad():
        a, b = model([image])[0], loaded([image])[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_from_checkpoint_bare_state_dict_needs_config(tmp_path):
    cfg = get_config("tiny")
    model = build_model(cfg)
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(ValueError, match="config="):
        from_checkpoint(path)
    loaded = from_checkpoint(path, config="tiny")
    assert torch.equal(loaded.state_dict()["rpn.head.conv.weight"], model.state_dict()["rpn.head.conv.weight"])
    with pytest.raises(ValueError, match="does not fit"):
        from_checkpoint(path, config="tiny_keypoint")
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="unrecognised"):
        from_checkpoint(tmp_path / "other.pth")


def test_config_from_dict_round_trip_and_unknown_keys():
    cfg = get_config("r50_fpn_gn_cascade", ["solver.steps=(5, 9)"])
    again = config_from_dict(to_dict(cfg))
    assert again == cfg and isinstance(again.model.cascade.reg_weights[0], tuple)
    with pytest.raises(ValueError, match="model.bogus"):
        config_from_dict({"model": {"bogus": 1}})


def test_torchvision_presets_exist_with_their_conventions():
    v1, v2, kp = (get_config(PRESETS[k]) for k in ("v1", "v2", "kp"))
    for cfg in (v1, v2, kp):
        assert cfg.model.backbone.freeze_at == 2 and not cfg.model.roi_heads.aligned
        assert cfg.model.roi_heads.sampling_ratio == 2 and cfg.model.torchvision_conventions
        model = build_model(cfg)
        assert type(model.rpn) is TorchvisionRPN and type(model.roi_heads) is TorchvisionRoIHeads
        assert cfg.model.rpn.smooth_l1_beta == 1 / 9 and cfg.model.box_head.smooth_l1_beta == 1 / 9
        assert cfg.model.input_format == "RGB" and cfg.model.pixel_scale == 1.0
    assert v1.model.roi_heads.num_classes == 90 and v1.model.backbone.norm == "FrozenBN"
    assert v2.model.rpn.head_conv_depth == 2 and v2.model.box_head.conv_dims == (256,) * 4
    assert kp.model.roi_heads.num_classes == 1 and kp.model.keypoint_head.enabled


# ---- parity with torchvision ------------------------------------------------------------------------------------

def _randomize_norms(model, seed):
    """Random BN statistics and affine parameters (torchvision's random init leaves them at the identity)."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "running_var") and module.running_var is not None:
            c = module.running_var.shape[0]
            with torch.no_grad():
                module.weight.copy_(torch.rand(c, generator=g) * 0.4 + 0.2)
                module.bias.copy_(torch.randn(c, generator=g) * 0.1)
                module.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                module.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)


def torchvision_model(kind, seed=0):
    """torchvision's model `kind` ("v1", "v2", "kp") with random weights, built as its builder does with pretrained
    weights (FrozenBN backbone for v1 and keypoints; stem and layer1 frozen), with a few classes' biases raised so
    that detections exist."""
    tv = pytest.importorskip("torchvision")
    from torchvision.models.detection import KeypointRCNN, MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, _default_anchorgen
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(seed)
    if kind == "v2":  # maskrcnn_resnet50_fpn_v2's body (its builder unfreezes everything without weights)
        bn = torch.nn.BatchNorm2d
        backbone = _resnet_fpn_extractor(tv.models.resnet50(weights=None), 3, norm_layer=bn)
        model = MaskRCNN(backbone, num_classes=91, rpn_anchor_generator=_default_anchorgen(),
                         rpn_head=RPNHead(256, 3, conv_depth=2),
                         box_head=FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024], norm_layer=bn),
                         mask_head=MaskRCNNHeads(256, [256] * 4, 1, norm_layer=bn))
    else:
        backbone = _resnet_fpn_extractor(tv.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3)
        model = MaskRCNN(backbone, num_classes=91) if kind == "v1" else KeypointRCNN(backbone, num_classes=2)
    _randomize_norms(model, seed)
    with torch.no_grad():
        bias = model.roi_heads.box_predictor.cls_score.bias
        bias.zero_()
        bias[1:] = -2.0
        bias[[1] if kind == "kp" else [1, 3, 18, 44]] = 3.0
        # Spread the scores: with the init's tiny weights all RoIs score alike to 1e-4, and which near-tied
        # candidates survive NMS and the top-k cut would hang on float noise (the thread count changes it).
        model.roi_heads.box_predictor.cls_score.weight.mul_(30.0)
    return model.eval()


def blob_image(height, width, seed=1):
    """Smooth random blobs plus noise: varied enough that RoIs get distinct scores."""
    g = torch.Generator().manual_seed(seed)
    blobs = torch.rand(1, 3, height // 16, width // 16, generator=g)
    image = torch.nn.functional.interpolate(blobs, size=(height, width), mode="bilinear")[0]
    return (image + 0.1 * torch.rand(3, height, width, generator=g)).clamp(0, 1)


def set_torchvision_size(model, height, width):
    """Make torchvision's internal resize the identity for an image of this size."""
    model.transform.min_size = (min(height, width),)
    model.transform.max_size = max(height, width)


def match_detections(a, b, box_tol=0.01):
    """Max differences between two detection dicts, matched as sets: each detection of `a` is paired with one of `b`
    with the same label and a box within box_tol (scores may tie to float noise, so the order may differ there).
    Returns (unmatched count, box diff, score diff, mask diff, keypoint diff, keypoint score diff)."""
    used, diffs, unmatched = set(), [0.0] * 5, 0
    for i in range(len(a["boxes"])):
        close = ((a["boxes"][i] - b["boxes"]).abs().max(dim=1).values <= box_tol) & (b["labels"] == a["labels"][i])
        candidates = [j for j in torch.nonzero(close).flatten().tolist() if j not in used]
        if not candidates:
            unmatched += 1
            continue
        j = min(candidates, key=lambda j: abs(a["scores"][i] - b["scores"][j]))
        used.add(j)
        pairs = [("boxes", 0), ("scores", 1), ("masks", 2), ("keypoints", 3), ("keypoints_scores", 4)]
        for key, slot in pairs:
            if key in a:
                diffs[slot] = max(diffs[slot], (a[key][i] - b[key][j]).abs().max().item())
    return (unmatched + len(b["boxes"]) - len(used), *diffs)


def _check_inference_parity(kind, height, width, detections, tmp_path=None):
    tv_model = torchvision_model(kind)
    with torch.no_grad():  # spread the scores further: at x30 the v2 model's top-30 class scores lay 1e-7 apart and
        tv_model.roi_heads.box_predictor.cls_score.weight.mul_(10 / 3)  # failed at 2 threads on an AMD EPYC
    tv_model.roi_heads.detections_per_img = detections
    set_torchvision_size(tv_model, height, width)
    overrides = [f"model.roi_heads.detections_per_image={detections}"]
    if tmp_path is not None:  # through a file and from_checkpoint's format detection
        path = tmp_path / "tv.pth"
        torch.save(tv_model.state_dict(), path)
        model = from_checkpoint(path)
        model.roi_heads.detections_per_image = detections
    else:
        state, preset = convert_torchvision_detection(tv_model.state_dict())
        assert preset == PRESETS[kind]
        model = build_model(get_config(preset, overrides))
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert set(missing) == {"pixel_mean", "pixel_std", "category_ids"} and not unexpected
        model.eval()
    image = blob_image(height, width)
    with torch.no_grad():
        expected, got = tv_model([image])[0], model([image])[0]
    assert len(expected["boxes"]) >= min(detections, 10)  # the biases made detections
    unmatched, box, score, mask, keypoint, keypoint_score = match_detections(expected, got)
    assert unmatched == 0
    assert box <= 0.01 and score <= 1e-4
    if "masks" in expected:
        assert mask <= 1e-3
    if "keypoints" in expected:
        assert keypoint <= 0.01 and keypoint_score <= 1e-3
    return model


def test_rpn_proposals_equal_torchvision_on_a_coco_sized_image():
    """The RPN alone on an 800 x 1200 image (padded 800 x 1216): rounded anchors, per-axis strides from the padded
    size (P6 has 13 rows: stride 61), min size 1e-3, ranking by sigmoid. Compared as sets: proposals of exactly
    equal float32 probability (from different levels) may come out in either order (torchvision's final sort is
    not stable)."""
    pytest.importorskip("torchvision")
    from collections import OrderedDict

    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

    channels, (height, width), padded = 8, (800, 1200), (800, 1216)
    torch.manual_seed(0)
    head = RPNHead(channels, 3)
    with torch.no_grad():
        head.bbox_pred.weight.normal_(std=0.05)
    anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    tv_rpn = RegionProposalNetwork(anchors, head, 0.7, 0.3, 256, 0.5, {"training": 2000, "testing": 1000},
                                   {"training": 2000, "testing": 1000}, 0.7).eval()
    rpn_cfg = get_config(PRESETS["v1"]).model.rpn
    rpn = TorchvisionRPN(in_channels=channels, min_size=rpn_cfg.min_size).eval()
    rpn.head.conv.load_state_dict(head.conv[0][0].state_dict())
    rpn.head.objectness_logits.load_state_dict(head.cls_logits.state_dict())
    rpn.head.anchor_deltas.load_state_dict(head.bbox_pred.state_dict())
    sizes = [(padded[0] // s, padded[1] // s) for s in (4, 8, 16, 32)] + [(13, 19)]
    features = [torch.randn(1, channels, h, w) for h, w in sizes]
    with torch.no_grad():
        expected = tv_rpn(ImageList(torch.zeros(1, 3, *padded), [(height, width)]),
                          OrderedDict((str(i), f) for i, f in enumerate(features)))[0][0]
        got = rpn(features, [(height, width)])[0][0]
    assert expected.shape == got.shape and expected.shape[0] == 1000
    in_order = (got - expected).abs().max(dim=1).values <= 1e-3  # (1000,)
    assert in_order.float().mean() > 0.9
    torch.testing.assert_close(sorted(got.tolist()), sorted(expected.tolist()), rtol=0, atol=1e-3)
    # Without the torchvision conventions the proposals differ.
    plain = RPN(in_channels=channels).eval()
    plain.load_state_dict(rpn.state_dict())
    with torch.no_grad():
        assert not torch.allclose(plain(features, [(height, width)])[0][0], expected, atol=1)


def test_maskrcnn_v1_inference_parity_through_from_checkpoint(tmp_path):
    # 160 x 224 pads to 160 x 224: P6 is 3 x 4, so torchvision's anchor strides there are 53 x 56, not 64.
    model = _check_inference_parity("v1", 160, 224, detections=20, tmp_path=tmp_path)
    assert model.num_classes == 90 and model.category_ids.tolist() == list(range(1, 91))


@pytest.mark.slow
def test_maskrcnn_v1_inference_parity_100_detections():
    _check_inference_parity("v1", 192, 256, detections=100)


@pytest.mark.slow
def test_keypointrcnn_inference_parity():
    _check_inference_parity("kp", 160, 224, detections=30)


@pytest.mark.slow
def test_maskrcnn_v2_inference_parity():
    _check_inference_parity("v2", 160, 224, detections=30)


def _training_batch():
    """Two images with rectangle / ellipse objects, their boxes, labels (COCO ids) and uint8 masks."""
    images, targets = [], []
    for seed, (height, width), objects in [(3, (128, 160), [(1, 10, 20, 70, 90), (18, 80, 30, 150, 120)]),
                                           (4, (128, 128), [(44, 30, 10, 100, 60), (1, 5, 60, 60, 125),
                                                            (3, 64, 64, 120, 110)])]:
        image = blob_image(height, width, seed)
        ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
        masks = []
        for k, (_, x1, y1, x2, y2) in enumerate(objects):
            if k % 2:  # an ellipse inscribed in the box
                cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
                mask = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
            else:
                mask = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
            image[:, mask] = image[:, mask] * 0.3 + 0.7 * torch.rand(3, 1, generator=torch.Generator().manual_seed(k))
            masks.append(mask.to(torch.uint8))
        images.append(image)
        targets.append({"boxes": torch.tensor([o[1:] for o in objects], dtype=torch.float32),
                        "labels": torch.tensor([o[0] for o in objects]), "masks": torch.stack(masks)})
    return images, targets


def _keypoint_training_batch():
    """The same two images with every object a person (label 1) carrying 17 keypoints: most inside their box and
    visible, some outside it, some unlabelled (v = 0), in the same numbers for both libraries."""
    images, targets = _training_batch()
    g = torch.Generator().manual_seed(11)
    for t in targets:
        boxes = t.pop("boxes")
        t.pop("masks")
        n = boxes.shape[0]
        xy = boxes[:, None, :2] + torch.rand(n, 17, 2, generator=g) * 1.2 * (boxes[:, None, 2:] - boxes[:, None, :2])
        v = torch.where(torch.rand(n, 17, generator=g) < 0.2, 0.0, 2.0)
        t.update(boxes=boxes, labels=torch.ones(n, dtype=torch.int64), keypoints=torch.cat([xy, v[..., None]], 2))
    return images, targets


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["v1", "v2", "kp"])
def test_maskrcnn_training_parity_losses_and_gradients(kind):
    """With the samplers taking every candidate (nothing random), one training step's losses and gradients equal
    torchvision's (1e-4 relative). v2 trains its BatchNorms (batch statistics), frozen stages included; it runs in
    float64 because in float32 the BatchNorm backward (which subtracts per-channel means of the gradient) turns
    the 1e-7 float noise between the two RoIAlign implementations into ~1e-3 relative gradient differences in the
    box and mask head convs (8.7e-4 measured); in float64 they agree to 1e-7. The keypoint model ("kp": every
    RoI of a person, keypoint targets and loss) runs in float64 too: through its eight unnormalised 512-channel
    convs the same float32 noise reaches 1.6e-4 relative in the first conv's gradient."""
    tv_model = torchvision_model(kind)
    everything = 10 ** 7
    for sampler in (tv_model.rpn.fg_bg_sampler, tv_model.roi_heads.fg_bg_sampler):
        sampler.batch_size_per_image, sampler.positive_fraction = everything, 1.0
    set_torchvision_size(tv_model, 128, 160)  # scale 1 for both images (min side 128, max side <= 160)
    state, preset = convert_torchvision_detection(tv_model.state_dict())
    model = build_model(get_config(preset, [
        f"model.rpn.batch_size_per_image={everything}", "model.rpn.positive_fraction=1.0",
        f"model.roi_heads.batch_size_per_image={everything}", "model.roi_heads.positive_fraction=1.0"]))
    model.load_state_dict(state, strict=False)
    images, targets = _keypoint_training_batch() if kind == "kp" else _training_batch()
    if kind in ("v2", "kp"):
        tv_model.double()
        model.double()
        # Exact float64 constants, as torchvision's transform uses (the buffers were made in float32).
        model.pixel_mean.copy_(torch.tensor((0.485, 0.456, 0.406), dtype=torch.float64).view(3, 1, 1))
        model.pixel_std.copy_(torch.tensor((0.229, 0.224, 0.225), dtype=torch.float64).view(3, 1, 1))
        images = [image.double() for image in images]
        for t in targets:  # keypoints stay float32: torchvision refuses any other dtype (both promote them)
            t["boxes"] = t["boxes"].double()
    tv_model.train()
    model.train()
    expected = tv_model([i.clone() for i in images], [{k: v.clone() for k, v in t.items()} for t in targets])
    got = model(images, targets)
    assert set(expected) == set(got)
    for name in expected:
        torch.testing.assert_close(got[name].double(), expected[name].double(), rtol=1e-4, atol=1e-6)
    sum(expected.values()).backward()
    sum(got.values()).backward()
    # torchvision's gradients, renamed (and the background rows dropped) by the checkpoint converter.
    tv_grads = {name: (p.grad if p.grad is not None else torch.zeros_like(p))
                for name, p in tv_model.named_parameters()}
    tv_grads.update({name: b for name, b in tv_model.named_buffers()})
    tv_grads, _ = convert_torchvision_detection(tv_grads)
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert len(trained) == sum(p.requires_grad for p in tv_model.parameters())
    for name, p in trained:
        scale = tv_grads[name].abs().max().item()
        assert (p.grad - tv_grads[name]).abs().max().item() <= 1e-4 * scale + 1e-9, name


def test_torchvision_checkpoint_for_init_checkpoint_and_evaluate_py(tmp_path):
    """A torchvision maskrcnn_resnet50_fpn file fine-tunes (`--init checkpoint`) and evaluates (`evaluate.py
    --weights`) through the same conversion as from_checkpoint."""
    tv = pytest.importorskip("torchvision")
    import evaluate
    from minimask.engine.initialization import load_initial_weights

    torch.manual_seed(0)
    source = tv.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    torch.save(source.state_dict(), tmp_path / "tv.pth")
    reference = from_checkpoint(tmp_path / "tv.pth").state_dict()
    cfg = get_config(PRESETS["v1"])
    model = build_model(cfg)
    load_initial_weights(model, "checkpoint", str(tmp_path / "tv.pth"))
    state = evaluate.read_detector_state(str(tmp_path / "tv.pth"), cfg)
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference[name]), name
        assert torch.equal(state[name], reference[name]), name
