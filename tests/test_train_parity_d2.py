"""Training parity with detectron2: one training step's losses and gradients of three d2_* presets against
detectron2's own models, on two real COCO images with their boxes, polygons and keypoints.

The pairs: `d2_scratch_mask_rcnn_R_50_FPN_9x_gn` and Misc/scratch_mask_rcnn_R_50_FPN_9x_gn.yaml (GN everywhere,
nothing frozen, 4conv1fc box head), `d2_keypoint_rcnn_R_50_FPN_3x` and COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml
(FrozenBN, stem and res2 frozen, keypoint head, smooth-L1 box loss), `d2_cascade_mask_rcnn_R_50_FPN_3x` and
Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml (three class-agnostic box stages at IoU 0.5 / 0.6 / 0.7). They run only where
detectron2 is importable and coco-mini is present (the `coco_mini` fixture), e.g. in a side environment with
detectron2 built from source, like tests/test_model_zoo_d2.py; each runs four training steps (both libraries in
float32 and in float64): 1 to 2.5 minutes on an idle 2-core CPU, two to three times that with another job on it.

Set-up
- detectron2 builds each model from its own config file, with random weights. Left at their init, its FrozenBN
  layers are the identity and the activations grow through the 50 layers until scores saturate into ties (the
  cascade's P2 reaches 7e3, its class logits have std 240 and every RoI's softmax is 1.0), so each FrozenBN takes
  its running mean and variance from its own input (one pass over the same two images, each layer calibrated just
  before it runs, after the layers before it; then P2 stays below 34, the logits' std is 0.65 and the 2000 RoIs'
  top scores are all distinct) and a random affine (gamma in [0.4, 1), beta ~ N(0, 0.1)), as GN layers do.
  detectron2's state dict goes into minimask through `convert_detectron2_detection` (the converter
  `from_checkpoint` uses); the preset's pixel mean, std, channel order and 0-255 scale, which are not in it, are
  checked equal to the yaml's, as are the RPN's proposal counts.
- Images: coco-mini val2017 ids 172648 and 349860 (4 and 8 instances, all polygons, no crowd; in the keypoint file
  2 and 3 persons, 1 and 2 of them without any labelled keypoint), loaded by minimask's `CocoDetection` (polygons as
  `target["polygons"]`, persons without keypoints kept with all-zero keypoints) and resized by
  `minimask.data.transforms.resize` to a shorter side of 512 px (512 x 683 and 512 x 769, padded to 512 x 800).
  detectron2 gets the same resized tensors as BGR 0-255 (minimask takes RGB in [0, 1] and normalises inside) and
  the same instances: gt_boxes, gt_classes = label - 1, gt_masks as PolygonMasks of the same polygons, gt_keypoints
  as Keypoints of the same (N, 17, 3) tensor (minimask's loader already adds detectron2's +0.5 to COCO's integer
  keypoints).
- Nothing random remains: both libraries' samplers take every candidate (RPN: 2^17 anchors per image at positive
  fraction 1, more than the batch's 102,312 anchors; RoI heads: 4096 per image, more than the proposals + GT boxes),
  and `torch.randperm`, which then only orders the sampled RoIs, is the identity in both (foreground, then
  background, in proposal order), so even the order of the sums is the same.

Deliberate differences. minimask normalises the RPN losses (images x batch_size_per_image), the mask loss (pixels of
the foreground RoIs) and the keypoint loss (visible keypoints) over the global batch, detectron2 over each GPU's;
in one process they are the same numbers (NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS is on in the keypoint yaml). Names
differ (loss_rpn_cls, loss_rpn_loc, loss_cls, stages 0..2 are loss_objectness, loss_rpn_box_reg,
loss_classifier, stages 1..3) and so does the classifier's row order (background last in detectron2): gradients
go through the converter like the weights. minimask's anchors are float32 whatever the feature dtype, and so are
the GT boxes matched to them and the RPN's regression targets; in the float64 runs below detectron2's anchors are
rounded to float32 as well (otherwise they differ by 1e-6 px and the RPN's low-quality matches, the anchors tied
at a GT box's best IoU, differ), and loss_rpn_box_reg agrees to 1e-7 there instead of 1e-14 (7e-15 with the
targets encoded in float64).

Checks, per pair
- float32: each loss term within 1e-4 relative of detectron2's; each gradient (every trained parameter, and the
  gradient reaching P2..P6) within max(1e-3, 3 x E) as max|minimask - detectron2| / max|detectron2| per tensor,
  where E is the larger of the two libraries' own float32 errors for that tensor (max|float32 - float64| /
  max|float64|, each library against itself on the same input).
- float64 against float64 (detectron2's float32 casts lifted, below): each loss term within 1e-12 relative
  (loss_rpn_box_reg 1e-6) and each gradient within 1e-9 relative.
- roi_heads.keypoint_head.deconv.bias has a gradient of exactly 0 in exact arithmetic (the keypoint loss is a
  softmax over each keypoint's heatmap, and the bias adds a constant to the whole map): both libraries' values must
  be rounding, below 1e-5 (float32) and 1e-12 (float64) of the deconv weight's largest gradient.

Why detectron2's own float32 error is in E. In float32 the two libraries round differently from the first layer on
(detectron2's frozen stages normalise with F.batch_norm, minimask multiplies by a precomputed scale: 7e-8 relative
after the stem; RoIAlign is torchvision's kernel in detectron2, minimask's own sums the same terms in another
order), 1e-5 relative at P2..P6, and that noise flips the ReLUs whose input is within it of zero: a few hundred
positions of the backward pass change by up to ~20 %, 1e-3..5e-2 of a tensor's largest element. Each library's
float32 result is that far from its own float64 result too, and on some tensors detectron2's is the farther one. A
first comparison of the cascade pair had flagged res5's middle block convolutions (about 1e-2 and 7e-2), an FPN
output bias (1.6e-3) and the gradients reaching P2-P5 (up to 2.5e-2) as beyond 3 x minimask's own float32 error;
here backbone.layer4.1.conv2.weight differs from detectron2 by 1.5e-2, minimask's own error is 2.9e-3 and
detectron2's 1.55e-2, and in the keypoint pair keypoint_head.convs.10.weight differs by 1.7e-2 with minimask's own
error 5e-5 and detectron2's 1.7e-2: minimask's float32 gradient is the one closer to the exact value. In float64
the two libraries agree on every gradient, P2..P6 included, to 3e-13, and on the cascade's stage-2 and stage-3
RoIs to 3e-12 px: stage 2-3 targets, the 1/3 scaling of the gradient each cascade stage sends into the features
and RoIAlign's backward compute the same thing in both.

detectron2 in float64, for that run only (monkeypatched): `Boxes` and `Keypoints` keep float64 tensors (they cast
to float32), `Tensor.float()` leaves float64 tensors as they are (`Box2BoxTransform.apply_deltas` and
`batched_nms` call it), and binary_cross_entropy_with_logits casts its target to the logits' dtype (the RPN and
mask losses pass float32 targets).
"""
from __future__ import annotations

import copy
import time

import pytest
import torch

from minimask import build_model, get_config
from minimask.data.coco import CocoDetection, split_paths
from minimask.data.transforms import resize, shortest_edge_size
from minimask.interop.detectron2_format import convert_detectron2_detection

PAIRS = {
    "d2_scratch_mask_rcnn_R_50_FPN_9x_gn": "Misc/scratch_mask_rcnn_R_50_FPN_9x_gn.yaml",
    "d2_keypoint_rcnn_R_50_FPN_3x": "COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml",
    "d2_cascade_mask_rcnn_R_50_FPN_3x": "Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml",
}
IMAGE_IDS = (172648, 349860)  # coco-mini val2017: polygons only, no crowd, persons with and without keypoints
SHORT_SIDE = 512
EVERY_ANCHOR = 2 ** 17  # > 3 x (128 x 200 + 64 x 100 + 32 x 50 + 16 x 25 + 8 x 13) anchors of the padded batch
EVERY_ROI = 4096  # > 2000 proposals (cascade) + GT boxes per image
LOSS_RTOL = 1e-4
# float64: minimask computes the RPN's regression targets in float32 (anchors, and the GT boxes matched to them, are
# float32 whatever the feature dtype), detectron2 in float64 from the same float32-valued anchors: 1e-7 apart
LOSS_RTOL_FP64 = {"loss_rpn_box_reg": 1e-6}
LOSS_RTOL_FP64_OTHERS = 1e-12
GRAD_FLOOR, GRAD_RTOL_FP64 = 1e-3, 1e-9
# Gradients that vanish in exact arithmetic, with the tensor they are measured against: the keypoint loss is a softmax
# over each keypoint's heatmap, which a constant added to the whole map (the deconv's bias, kept constant by the 2x
# bilinear upsampling) does not change; what either library computes there is rounding, compared in absolute terms.
VANISHING = {"roi_heads.keypoint_head.deconv.bias": "roi_heads.keypoint_head.deconv.weight"}
VANISHING_RTOL, VANISHING_RTOL_FP64 = 1e-5, 1e-12
D2_LOSS_NAMES = {"loss_rpn_cls": "loss_objectness", "loss_rpn_loc": "loss_rpn_box_reg", "loss_cls": "loss_classifier"}


# ---- data --------------------------------------------------------------------------------------------------------

def coco_batch(root, keypoints: bool):
    """The two images and their targets from minimask's loader, resized to a shorter side of 512 px."""
    ann_file, image_dir = split_paths(root, "val2017", keypoints)
    dataset = CocoDetection(ann_file, image_dir, keypoints=keypoints)
    images, targets = [], []
    for image_id in IMAGE_IDS:
        image, target = dataset[dataset.ids.index(image_id)]
        image, target = resize(image, target, shortest_edge_size(*image.shape[-2:], SHORT_SIDE, 1333))
        assert "polygons" in target and "masks" not in target  # COCO polygons reach the mask head as they are
        images.append(image)
        targets.append(target)
    return images, targets


def d2_inputs(images, targets, dtype, masks: bool):
    """detectron2's batched inputs for the same images and instances (images BGR 0-255, classes label - 1)."""
    from detectron2.structures import Boxes, Instances, Keypoints, PolygonMasks

    batch = []
    for image, target in zip(images, targets):
        height, width = image.shape[-2:]
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(target["boxes"].to(dtype).clone())
        instances.gt_classes = target["labels"] - 1
        if masks:
            instances.gt_masks = PolygonMasks([[p.copy() for p in obj] for obj in target["polygons"]])
        if "keypoints" in target:
            instances.gt_keypoints = Keypoints(target["keypoints"].to(dtype).clone())
        batch.append({"image": (image.to(dtype) * 255).flip(0), "instances": instances, "height": height,
                      "width": width})
    return batch


def as_dtype(images, targets, dtype):
    def convert(target):
        return {k: v.to(dtype) if k in ("boxes", "keypoints") else v for k, v in target.items()}

    return [image.to(dtype) for image in images], [convert(t) for t in targets]


# ---- models ------------------------------------------------------------------------------------------------------

def d2_model(yaml: str, images, targets, seed=0):
    """detectron2's model from its config file, samplers taking every candidate, realistic norm statistics."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.layers import FrozenBatchNorm2d
    from detectron2.modeling import build_model as d2_build_model

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(yaml))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = EVERY_ANCHOR
    cfg.MODEL.RPN.POSITIVE_FRACTION = 1.0
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = EVERY_ROI
    cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION = 1.0
    torch.manual_seed(seed)
    model = d2_build_model(cfg)
    g = torch.Generator().manual_seed(seed)

    def random_affine(module):
        c = module.weight.shape[0]
        with torch.no_grad():
            module.weight.copy_(torch.rand(c, generator=g) * 0.6 + 0.4)
            module.bias.copy_(torch.randn(c, generator=g) * 0.1)

    def from_own_input(module, args):  # runs just before the layer, after every earlier layer is calibrated
        x = args[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))
        random_affine(module)

    hooks = []
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            hooks.append(module.register_forward_pre_hook(from_own_input))
        elif isinstance(module, torch.nn.GroupNorm):
            random_affine(module)
    with torch.no_grad():
        model.backbone(model.preprocess_image(d2_inputs(images, targets, torch.float32, masks=False)).tensor)
    for hook in hooks:
        hook.remove()
    return cfg, model


def minimask_model(preset: str, d2_cfg, d2):
    cfg = get_config(preset, [f"model.rpn.batch_size_per_image={EVERY_ANCHOR}", "model.rpn.positive_fraction=1.0",
                              f"model.roi_heads.batch_size_per_image={EVERY_ROI}",
                              "model.roi_heads.positive_fraction=1.0"])
    m = cfg.model
    rpn = d2_cfg.MODEL.RPN  # proposals per level before NMS and per image after it (1000 / 1500 / 2000)
    assert (m.rpn.pre_nms_topk_train, m.rpn.post_nms_topk_train) == (rpn.PRE_NMS_TOPK_TRAIN, rpn.POST_NMS_TOPK_TRAIN)
    # The pixel convention is the preset's, not the file's: it must be the yaml's.
    assert m.pixel_mean == tuple(d2_cfg.MODEL.PIXEL_MEAN) and m.pixel_std == tuple(d2_cfg.MODEL.PIXEL_STD)
    assert m.input_format == d2_cfg.INPUT.FORMAT == "BGR" and m.pixel_scale == 255.0
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(convert_detectron2_detection(d2.state_dict()), strict=False)
    assert sorted(missing) == ["pixel_mean", "pixel_std"] and unexpected == []
    return model


# ---- one training step in each library ---------------------------------------------------------------------------

def _identity_perm(n, *args, device=None, **kwargs):
    return torch.arange(n, device=device)


def d2_loss_name(name: str) -> str:
    for stage in range(3):
        suffix = f"_stage{stage}"
        if name.endswith(suffix):
            return D2_LOSS_NAMES.get(name[: -len(suffix)], name[: -len(suffix)]) + f"_stage{stage + 1}"
    return D2_LOSS_NAMES.get(name, name)


def d2_step(model, images, targets, dtype, masks: bool, monkeypatch):
    """detectron2's losses (minimask's names) and gradients (minimask's parameter names and layout)."""
    from detectron2.utils.events import EventStorage

    model.train()
    model.zero_grad(set_to_none=True)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "randperm", _identity_perm)
        if dtype == torch.float64:
            _keep_d2_in_float64(patch, model)
        batch = d2_inputs(images, targets, dtype, masks)  # inside the patch: the GT boxes stay float64 there
        features = []
        hook = model.backbone.register_forward_hook(lambda module, args, out: features.extend(
            out[f"p{level}"] for level in range(2, 7)))
        with EventStorage():
            losses = model(batch)
        hook.remove()
    for f in features:
        f.retain_grad()  # the gradient reaching P2..P6 (the backbone's output)
    sum(losses.values()).backward()
    grads = {name: p.grad if p.grad is not None else torch.zeros_like(p) for name, p in model.named_parameters()}
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    grads.update(dict(model.named_buffers()))  # for the converter's layout detection; never compared
    converted = convert_detectron2_detection(grads)
    converted.update({f"P{level} (input gradient)": f.grad for level, f in zip(range(2, 7), features)})
    return {d2_loss_name(k): v.detach() for k, v in losses.items()}, converted, len(trained)


def mm_step(model, images, targets, monkeypatch):
    model.train()
    model.zero_grad(set_to_none=True)
    features = []
    hook = model.fpn.register_forward_hook(lambda module, args, out: features.extend(out))  # P2..P6
    with monkeypatch.context() as patch:
        patch.setattr(torch, "randperm", _identity_perm)
        losses = model(images, targets)
    hook.remove()
    for f in features:
        f.retain_grad()
    sum(losses.values()).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    num_trained = len(grads)
    grads.update({f"P{level} (input gradient)": f.grad for level, f in zip(range(2, 7), features)})
    return {k: v.detach() for k, v in losses.items()}, grads, num_trained


def _keep_d2_in_float64(patch, model):
    """Lift detectron2's float32 casts for a float64 run (see the module docstring); undone with `patch`."""
    from detectron2.structures import Boxes, Keypoints

    def keep_float64(cls):
        init = cls.__init__

        def __init__(self, tensor):
            init(self, tensor)
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float64:
                self.tensor = tensor.reshape(self.tensor.shape)

        patch.setattr(cls, "__init__", __init__)

    keep_float64(Boxes)
    keep_float64(Keypoints)
    to_float = torch.Tensor.float
    patch.setattr(torch.Tensor, "float", lambda self, *a, **k: self if self.dtype == torch.float64
                  else to_float(self, *a, **k))
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    patch.setattr(torch.nn.functional, "binary_cross_entropy_with_logits",
                  lambda input, target, *a, **k: bce(input, target.to(input.dtype), *a, **k))
    anchors = model.proposal_generator.anchor_generator
    grid_anchors = anchors.forward  # minimask's anchors are float32 whatever the feature dtype
    patch.setattr(anchors, "forward", lambda features: [Boxes(b.tensor.to(torch.float32).double())
                                                        for b in grid_anchors(features)])


def relative(a, b) -> float:
    """max|a - b| / max|b| (0 where both are zero)."""
    a, b = a.double(), b.double()
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


# ---- the check ---------------------------------------------------------------------------------------------------

def check_training_parity(preset, coco_mini, monkeypatch):
    pytest.importorskip("detectron2")
    start = time.time()
    keypoints = "keypoint" in preset
    images, targets = coco_batch(coco_mini, keypoints)
    if keypoints:  # a person without any labelled keypoint: a box target with all-zero keypoints
        assert any(((t["keypoints"][..., 2] == 0).all(dim=1)).any() for t in targets)
        assert all((t["keypoints"][..., 2] > 0).any() for t in targets)
    cfg, d2 = d2_model(PAIRS[preset], images, targets)
    masks = cfg.MODEL.MASK_ON
    model = minimask_model(preset, cfg, d2)
    d2_64, model_64 = copy.deepcopy(d2).double(), copy.deepcopy(model).double()
    images_64, targets_64 = as_dtype(images, targets, torch.float64)

    steps = time.time()
    expected, expected_grads, num_trained = d2_step(d2, images, targets, torch.float32, masks, monkeypatch)
    got, grads, num_trained_here = mm_step(model, images, targets, monkeypatch)
    got_64, grads_64, _ = mm_step(model_64, images_64, targets_64, monkeypatch)
    expected_64, expected_grads_64, _ = d2_step(d2_64, images, targets, torch.float64, masks, monkeypatch)
    print(f"\n{preset}: set-up {steps - start:.0f} s, four steps {time.time() - steps:.0f} s")

    assert set(got) == set(expected) == set(got_64) == set(expected_64)
    assert num_trained_here == num_trained  # the same parameters train (frozen stages excluded)
    loss_diff = {name: relative(got[name], expected[name]) for name in expected}
    loss_diff_64 = {name: relative(got_64[name], expected_64[name]) for name in expected}
    rows = []  # (name, fp32 diff, minimask's own error, detectron2's own error, fp64 diff)
    vanishing = {}  # name -> largest |gradient| of minimask / detectron2 in float32 / float64, relative to its scale
    for name in grads:
        if name in VANISHING:
            scale = expected_grads_64[VANISHING[name]].abs().max().item()
            vanishing[name] = [g[name].abs().max().item() / scale
                               for g in (grads, expected_grads, grads_64, expected_grads_64)]
            continue
        rows.append((name, relative(grads[name], expected_grads[name]), relative(grads[name], grads_64[name]),
                     relative(expected_grads[name], expected_grads_64[name]),
                     relative(grads_64[name], expected_grads_64[name])))
    worst = max(rows, key=lambda r: r[1])
    worst_64 = max(rows, key=lambda r: r[4])
    beyond_own = [r for r in rows if r[1] > max(GRAD_FLOOR, 3 * r[2])]
    print(f"  {len(expected)} losses, {len(rows)} gradient tensors")
    print("  losses fp32 rel:", {k: f"{v:.1e}" for k, v in loss_diff.items()})
    print("  losses fp64 rel:", {k: f"{v:.1e}" for k, v in loss_diff_64.items()})
    print(f"  worst fp32 gradient: {worst[0]} {worst[1]:.2e} (own float32 error: minimask {worst[2]:.2e}, "
          f"detectron2 {worst[3]:.2e})")
    worst_parameter = max((r for r in rows if not r[0].startswith("P")), key=lambda r: r[1])
    print(f"  worst fp32 parameter gradient: {worst_parameter[0]} {worst_parameter[1]:.2e} (own: minimask "
          f"{worst_parameter[2]:.2e}, detectron2 {worst_parameter[3]:.2e})")
    print(f"  worst fp64 gradient: {worst_64[0]} {worst_64[4]:.2e}")
    noisier = max(rows, key=lambda r: r[2] / max(GRAD_FLOOR, r[3]))
    print(f"  own float32 errors: minimask's larger than detectron2's on {sum(r[2] > r[3] for r in rows)} of "
          f"{len(rows)} tensors; largest ratio {noisier[2] / max(GRAD_FLOOR, noisier[3]):.2f} (over max(1e-3, "
          f"detectron2's)) at {noisier[0]}")
    for name, values in vanishing.items():
        print(f"  vanishing: {name}, largest element / that of {VANISHING[name]}: minimask {values[0]:.1e}, "
              f"detectron2 {values[1]:.1e} (float32), {values[2]:.1e}, {values[3]:.1e} (float64)")
    for r in rows:
        if r[0].startswith("P"):
            print(f"  {r[0]}: fp32 {r[1]:.2e} (own: minimask {r[2]:.2e}, detectron2 {r[3]:.2e}), fp64 {r[4]:.1e}")
    for r in beyond_own:
        print(f"  beyond max(1e-3, 3 x minimask's own): {r[0]} {r[1]:.2e} (own {r[2]:.2e}, detectron2's own "
              f"{r[3]:.2e}, fp64 {r[4]:.1e})")

    for name in expected:
        assert loss_diff[name] <= LOSS_RTOL, (name, got[name].item(), expected[name].item())
        assert loss_diff_64[name] <= LOSS_RTOL_FP64.get(name, LOSS_RTOL_FP64_OTHERS), (
            name, got_64[name].item(), expected_64[name].item())
    for name, diff, own, d2_own, diff_64 in rows:
        assert diff <= max(GRAD_FLOOR, 3 * max(own, d2_own)), (name, diff, own, d2_own)
        assert diff_64 <= GRAD_RTOL_FP64, (name, diff_64)
    for name, (mm_32, d2_32, mm_64, d2_64) in vanishing.items():
        assert max(mm_32, d2_32) <= VANISHING_RTOL and max(mm_64, d2_64) <= VANISHING_RTOL_FP64, name
    return rows


@pytest.mark.slow
def test_scratch_mask_rcnn_R_50_FPN_9x_gn_training_parity(coco_mini, monkeypatch):
    check_training_parity("d2_scratch_mask_rcnn_R_50_FPN_9x_gn", coco_mini, monkeypatch)


@pytest.mark.slow
def test_keypoint_rcnn_R_50_FPN_3x_training_parity(coco_mini, monkeypatch):
    check_training_parity("d2_keypoint_rcnn_R_50_FPN_3x", coco_mini, monkeypatch)


@pytest.mark.slow
def test_cascade_mask_rcnn_R_50_FPN_3x_training_parity(coco_mini, monkeypatch):
    check_training_parity("d2_cascade_mask_rcnn_R_50_FPN_3x", coco_mini, monkeypatch)
