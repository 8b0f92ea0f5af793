"""minimask.interop.detectron2_format: detectron2 model-zoo checkpoints in the d2_* presets, and their inference parity.

Without detectron2: state dicts with detectron2's key names and shapes (`d2_state`, written from detectron2's module
layout; checked against real detectron2 models where it is installed) load into every d2_* preset with no missing
or unexpected key; the classifier's background row moves first; GN / SyncBN files ask for config=; .pkl files go
through the restricted unpickler. The shape-only checks run on the meta device, so full R50/R101 layouts cost
nothing.

Parity tests run only where detectron2 is importable (a side environment with detectron2 built from source,
e.g. `/work/d2env/bin/python -m pytest tests/test_model_zoo_d2.py`): detectron2 builds the model from its own
config file with random weights (random norm statistics, classifier biases raised so that detections exist), its
state dict goes through `from_checkpoint`, and both libraries run on the same image.
"""
import pickle

import pytest
import torch

from minimask import build_model, get_config
from minimask.config import PRESETS
from minimask.engine.initialization import load_initial_weights
from minimask.interop.detectron2_format import COCO_CATEGORY_IDS, candidate_presets, convert_detectron2_detection
from minimask.interop.imagenet import imagenet_conventions
from minimask.interop.model_zoo import from_checkpoint, read_checkpoint
from minimask.interop.weight_files import read_weights

# preset -> (depth, norm, box head, mask, keypoint, cascade), as in the detectron2 config file of the same name
LAYOUTS = {
    "d2_mask_rcnn_R_50_FPN_3x": (50, "FrozenBN", "2fc", True, False, False),
    "d2_mask_rcnn_R_101_FPN_3x": (101, "FrozenBN", "2fc", True, False, False),
    "d2_faster_rcnn_R_50_FPN_3x": (50, "FrozenBN", "2fc", False, False, False),
    "d2_faster_rcnn_R_101_FPN_3x": (101, "FrozenBN", "2fc", False, False, False),
    "d2_keypoint_rcnn_R_50_FPN_3x": (50, "FrozenBN", "2fc", False, True, False),
    "d2_keypoint_rcnn_R_101_FPN_3x": (101, "FrozenBN", "2fc", False, True, False),
    "d2_cascade_mask_rcnn_R_50_FPN_3x": (50, "FrozenBN", "2fc", True, False, True),
    "d2_mask_rcnn_R_50_FPN_3x_gn": (50, "GN", "4conv1fc", True, False, False),
    "d2_scratch_mask_rcnn_R_50_FPN_3x_gn": (50, "GN", "4conv1fc", True, False, False),
    "d2_scratch_mask_rcnn_R_50_FPN_9x_gn": (50, "GN", "4conv1fc", True, False, False),
    "d2_mask_rcnn_R_50_FPN_3x_syncbn": (50, "SyncBN", "4conv1fc", True, False, False),
    "d2_scratch_mask_rcnn_R_50_FPN_9x_syncbn": (50, "SyncBN", "4conv1fc", True, False, False),
}
GN_PRESETS = ["d2_mask_rcnn_R_50_FPN_3x_gn", "d2_scratch_mask_rcnn_R_50_FPN_3x_gn",
              "d2_scratch_mask_rcnn_R_50_FPN_9x_gn"]
SYNCBN_PRESETS = ["d2_mask_rcnn_R_50_FPN_3x_syncbn", "d2_scratch_mask_rcnn_R_50_FPN_9x_syncbn"]
CONFIG_DIRS = {"mask": "COCO-InstanceSegmentation", "faster": "COCO-Detection", "keypoint": "COCO-Keypoints"}


def d2_config_file(preset: str) -> str:
    """detectron2's config file for a d2_* preset, relative to its configs/ folder."""
    name = preset.removeprefix("d2_")
    folder = "Misc" if ("_gn" in name or "_syncbn" in name or "cascade" in name) else CONFIG_DIRS[name.split("_")[0]]
    return f"{folder}/{name}.yaml"


# ---- detectron2-format state dicts (names and shapes of detectron2's modules, values random) ---------------------

def d2_state(depth=50, norm="FrozenBN", box_head="2fc", mask=True, keypoint=False, cascade=False, num_classes=80,
             device="meta", seed=0):
    """A GeneralizedRCNN state dict as detectron2 saves it: ResNet `backbone.bottom_up` (stem, res2..res5 of
    BottleneckBlocks, convs without bias, `.norm` children), FPN `fpn_lateral{2..5}` / `fpn_output{2..5}`,
    StandardRPNHead, FastRCNNConvFCHead (+ FastRCNNOutputLayers with background LAST), MaskRCNNConvUpsampleHead,
    KRCNNConvDeconvUpsampleHead; cascade: three box heads / class-agnostic predictors."""
    g = torch.Generator().manual_seed(seed)
    state = {}

    def add(name, *shape):
        state[name] = (torch.empty(shape, device="meta") if device == "meta"
                       else torch.randn(shape, generator=g) * 0.05)

    def add_norm(prefix, c, kind=norm):
        if not kind:
            return
        add(prefix + ".weight", c)
        add(prefix + ".bias", c)
        if kind != "GN":
            add(prefix + ".running_mean", c)
            state[prefix + ".running_var"] = torch.rand(c, generator=g) + 0.5 if device != "meta" else \
                torch.empty(c, device="meta")
        if kind in ("BN", "SyncBN"):
            state[prefix + ".num_batches_tracked"] = torch.tensor(0)

    def conv(prefix, cout, cin, k, kind=norm):  # detectron2 Conv2d: bias only without a norm
        add(prefix + ".weight", cout, cin, k, k)
        if kind:
            add_norm(prefix + ".norm", cout, kind)
        else:
            add(prefix + ".bias", cout)

    conv("backbone.bottom_up.stem.conv1", 64, 3, 7)
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    cin = 64
    for stage, n in zip(range(2, 6), blocks):
        width, cout = 64 * 2 ** (stage - 2), 256 * 2 ** (stage - 2)
        for b in range(n):
            p = f"backbone.bottom_up.res{stage}.{b}"
            if b == 0:
                conv(p + ".shortcut", cout, cin, 1)
            conv(p + ".conv1", width, cin if b == 0 else cout, 1)
            conv(p + ".conv2", width, width, 3)
            conv(p + ".conv3", cout, width, 1)
        cin = cout
    head_norm = "" if norm == "FrozenBN" else norm
    for level, c in zip(range(2, 6), (256, 512, 1024, 2048)):
        conv(f"backbone.fpn_lateral{level}", 256, c, 1, head_norm)
        conv(f"backbone.fpn_output{level}", 256, 256, 3, head_norm)
    for name, cout, k in (("conv", 256, 3), ("objectness_logits", 3, 1), ("anchor_deltas", 12, 1)):
        conv(f"proposal_generator.rpn_head.{name}", cout, 256, k, "")
    for s in range(3) if cascade else [None]:
        box, pred = ("roi_heads.box_head", "roi_heads.box_predictor") if s is None else \
            (f"roi_heads.box_head.{s}", f"roi_heads.box_predictor.{s}")
        if box_head == "2fc":
            add(box + ".fc1.weight", 1024, 256 * 49), add(box + ".fc1.bias", 1024)
            add(box + ".fc2.weight", 1024, 1024), add(box + ".fc2.bias", 1024)
        else:
            for i in range(1, 5):
                conv(f"{box}.conv{i}", 256, 256, 3, head_norm)
            add(box + ".fc1.weight", 1024, 256 * 49), add(box + ".fc1.bias", 1024)
        add(pred + ".cls_score.weight", num_classes + 1, 1024), add(pred + ".cls_score.bias", num_classes + 1)
        reg = 4 if cascade else 4 * num_classes
        add(pred + ".bbox_pred.weight", reg, 1024), add(pred + ".bbox_pred.bias", reg)
    if mask:
        for i in range(1, 5):
            conv(f"roi_heads.mask_head.mask_fcn{i}", 256, 256, 3, head_norm)
        add("roi_heads.mask_head.deconv.weight", 256, 256, 2, 2), add("roi_heads.mask_head.deconv.bias", 256)
        conv("roi_heads.mask_head.predictor", num_classes, 256, 1, "")
    if keypoint:
        for i in range(1, 9):
            conv(f"roi_heads.keypoint_head.conv_fcn{i}", 512, 256 if i == 1 else 512, 3, "")
        add("roi_heads.keypoint_head.score_lowres.weight", 512, 17, 4, 4)
        add("roi_heads.keypoint_head.score_lowres.bias", 17)
    return state


def d2_state_for(preset, **kwargs):
    depth, norm, box_head, mask, keypoint, cascade = LAYOUTS[preset]
    return d2_state(depth, norm, box_head, mask, keypoint, cascade, num_classes=1 if keypoint else 80, **kwargs)


def test_every_d2_preset_has_a_layout_here():
    assert sorted(LAYOUTS) == sorted(name for name in PRESETS if name.startswith("d2_"))


@pytest.mark.parametrize("preset", sorted(LAYOUTS))
def test_d2_state_dict_loads_with_no_missing_or_unexpected_keys(preset):
    state = convert_detectron2_detection(d2_state_for(preset))
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        model = build_model(get_config(preset))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)  # RuntimeError on shape mismatch
    assert sorted(missing) == ["pixel_mean", "pixel_std"] and unexpected == []  # the preset defines those two
    candidates = candidate_presets(d2_state_for(preset))
    assert preset in candidates
    if LAYOUTS[preset][1] == "GN":
        assert candidates == GN_PRESETS  # the file cannot tell the pixel std: ask
    elif LAYOUTS[preset][1] == "SyncBN":
        assert candidates == SYNCBN_PRESETS  # nor stride_in_1x1
    else:
        assert candidates == [preset]


def test_class_rows_rotate_background_first_and_label_map_is_coco():
    state = d2_state_for("d2_cascade_mask_rcnn_R_50_FPN_3x", device="cpu")
    converted = convert_detectron2_detection(state)
    for s in range(3):
        w, b = (state[f"roi_heads.box_predictor.{s}.cls_score.{n}"] for n in ("weight", "bias"))
        new_w, new_b = (converted[f"roi_heads.box_predictor.{s}.cls_score.{n}"] for n in ("weight", "bias"))
        assert torch.equal(new_w[0], w[80]) and torch.equal(new_b[0], b[80])  # background: last -> first
        assert torch.equal(new_w[1:], w[:80]) and torch.equal(new_b[1:], b[:80])  # class c -> label c + 1
        assert torch.equal(converted[f"roi_heads.box_predictor.{s}.bbox_pred.weight"],
                           state[f"roi_heads.box_predictor.{s}.bbox_pred.weight"])
    assert torch.equal(converted["roi_heads.mask_head.predictor.weight"], state["roi_heads.mask_head.predictor.weight"])
    assert converted["category_ids"].tolist() == list(COCO_CATEGORY_IDS)
    assert len(set(COCO_CATEGORY_IDS)) == 80 and COCO_CATEGORY_IDS[-1] == 90 and 12 not in COCO_CATEGORY_IDS
    # backbone renames, spot-checked by value
    assert torch.equal(converted["backbone.layer3.5.norm2.running_var"],
                       state["backbone.bottom_up.res4.5.conv2.norm.running_var"])
    assert torch.equal(converted["backbone.layer1.0.downsample.1.bias"],
                       state["backbone.bottom_up.res2.0.shortcut.norm.bias"])
    assert torch.equal(converted["fpn.output_convs.3.bias"], state["backbone.fpn_output5.bias"])
    assert torch.equal(converted["roi_heads.box_head.2.layers.3.weight"], state["roi_heads.box_head.2.fc2.weight"])
    kp = convert_detectron2_detection(d2_state_for("d2_keypoint_rcnn_R_50_FPN_3x", device="cpu"))
    assert kp["category_ids"].tolist() == [1]  # person


def _small_state(norm, box_head="4conv1fc"):
    """A layout-only d2 state dict (every tensor tiny except the class rows): enough to pick or refuse a preset."""
    state = d2_state(50, norm, box_head)
    return {k: torch.zeros(81, 2) if "cls_score" in k else torch.zeros(1) for k in state}


@pytest.mark.parametrize("norm, candidates", [("GN", GN_PRESETS), ("SyncBN", SYNCBN_PRESETS)])
def test_ambiguous_file_asks_for_config(tmp_path, norm, candidates):
    path = tmp_path / "model_final.pth"
    torch.save({"model": _small_state(norm), "__author__": "Detectron2 Model Zoo"}, path)
    with pytest.raises(ValueError, match="pass config=") as info:
        read_checkpoint(path)
    assert all(name in str(info.value) for name in candidates)
    _, cfg = read_checkpoint(path, config=candidates[-1])  # the caller says which
    assert cfg.model.pixel_std == (57.375, 57.12, 58.395)
    assert read_checkpoint(path, config=candidates[0])[1].model.pixel_std == (1.0, 1.0, 1.0)


def test_unknown_d2_layout_asks_for_config(tmp_path):
    state = _small_state("FrozenBN", box_head="4conv1fc")  # 4conv1fc without FPN norm: no d2_* preset
    path = tmp_path / "odd.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match="fits no d2_\\* preset; pass config="):
        read_checkpoint(path)


def test_pkl_goes_through_the_restricted_unpickler(tmp_path):
    state = {k: v.numpy() for k, v in _small_state("GN").items()}
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}, f)
    got, fmt = read_weights(str(path))
    assert fmt == "detectron2" and set(got) == set(state)
    with pytest.raises(ValueError, match="d2_scratch_mask_rcnn_R_50_FPN_9x_gn"):
        read_checkpoint(path)
    with pytest.raises(ValueError, match="--init checkpoint"):  # not ImageNet weights
        imagenet_conventions(fmt, got)

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pkl"
    with open(evil, "wb") as f:
        pickle.dump({"model": {"backbone.bottom_up.stem.conv1.weight": Exploit()}}, f)
    with pytest.raises(ValueError, match="refusing to load"):
        read_checkpoint(evil)


def _real_d2_file(tmp_path, preset, suffix):
    """A full-size detectron2 file for `preset` with random values: .pkl (numpy, as the model zoo) or .pth."""
    state = d2_state_for(preset, device="cpu")
    path = tmp_path / f"model_final{suffix}"
    if suffix == ".pkl":
        with open(path, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "Detectron2 Model Zoo"},
                        f, protocol=2)
    else:
        torch.save({"model": state, "__author__": "Detectron2 Model Zoo", "iteration": 269999}, path)
    return path, state


@pytest.mark.slow
def test_from_checkpoint_pkl_and_init_checkpoint(tmp_path):
    path, state = _real_d2_file(tmp_path, "d2_mask_rcnn_R_50_FPN_3x", ".pkl")
    model = from_checkpoint(path)
    assert model.num_classes == 80 and model.pixel_std.flatten().tolist() == [1.0, 1.0, 1.0]
    assert model.category_ids.tolist() == list(COCO_CATEGORY_IDS)
    torch.testing.assert_close(model.roi_heads.box_predictor.cls_score.bias[1:],
                               state["roi_heads.box_predictor.cls_score.bias"][:80])
    # --init checkpoint: the model (built by the trainer from the preset) keeps its own buffers
    target = build_model(get_config("d2_mask_rcnn_R_50_FPN_3x"))
    target.category_ids.copy_(torch.arange(5, 85))
    load_initial_weights(target, "checkpoint", str(path))
    assert target.category_ids[0] == 5
    # evaluate.py --weights: the same conversion (its model keeps the checkpoint's label map)
    import evaluate

    converted = evaluate.read_detector_state(str(path), get_config("d2_mask_rcnn_R_50_FPN_3x"))
    reference = model.state_dict()
    assert set(converted) == set(reference)
    assert all(torch.equal(converted[k], reference[k]) for k in reference)
    torch.testing.assert_close(target.backbone.layer4[2].conv3.weight, state["backbone.bottom_up.res5.2.conv3.weight"])


@pytest.mark.slow
def test_from_checkpoint_pth_cascade_and_keypoint(tmp_path):
    for preset in ("d2_cascade_mask_rcnn_R_50_FPN_3x", "d2_keypoint_rcnn_R_50_FPN_3x"):
        path, _ = _real_d2_file(tmp_path, preset, ".pth")
        model = from_checkpoint(path)
        assert model.num_classes == (1 if "keypoint" in preset else 80)


# ---- parity with detectron2 (skipped where detectron2 is not installed) ------------------------------------------

def _randomize_norms(model, seed):
    """Random BN statistics / GN affine parameters (detectron2's init leaves them at the identity)."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        has_stats = getattr(module, "running_var", None) is not None
        if has_stats or isinstance(module, torch.nn.GroupNorm):
            c = module.weight.shape[0]
            with torch.no_grad():
                module.weight.copy_(torch.rand(c, generator=g) * 0.4 + 0.2)
                module.bias.copy_(torch.randn(c, generator=g) * 0.1)
                if has_stats:
                    module.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                    module.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)


def d2_model(preset, detections=100, proposals=1000, seed=0):
    """detectron2's model for `preset` from its own config file, random weights, a few classes' biases raised."""
    pytest.importorskip("detectron2")
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model as d2_build_model

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(d2_config_file(preset)))
    cfg.MODEL.DEVICE = "cpu"
    cfg.TEST.DETECTIONS_PER_IMAGE = detections
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = proposals
    torch.manual_seed(seed)
    model = d2_build_model(cfg)
    _randomize_norms(model, seed)
    with torch.no_grad():
        predictors = model.roi_heads.box_predictor
        for predictor in predictors if isinstance(predictors, torch.nn.ModuleList) else [predictors]:
            bias = predictor.cls_score.bias  # (K + 1,), background last
            bias.fill_(-2.0)
            bias[-1] = 0.0
            bias[[0] if bias.shape[0] == 2 else [0, 2, 17, 43]] = 3.0
    return model.eval()


def blob_image(height, width, seed=1):
    """Smooth random blobs plus noise, quantised to 8 bits (detectron2 reads uint8 images)."""
    g = torch.Generator().manual_seed(seed)
    blobs = torch.rand(1, 3, height // 16, width // 16, generator=g)
    image = torch.nn.functional.interpolate(blobs, size=(height, width), mode="bilinear")[0]
    return ((image + 0.1 * torch.rand(3, height, width, generator=g)).clamp(0, 1) * 255).round() / 255


def d2_detections(model, image):
    """detectron2's detections on an RGB [0, 1] image, as minimask's dict (labels c + 1); `mask_probs` are the
    pasted probabilities before detectron2's 0.5 threshold (its `_do_paste_mask`)."""
    from detectron2.layers.mask_ops import _do_paste_mask
    from detectron2.modeling.postprocessing import detector_postprocess

    h, w = image.shape[1:]
    inputs = [{"image": (image * 255).round().flip(0), "height": h, "width": w}]  # BGR 0-255, as cv2 reads
    with torch.no_grad():  # = model(inputs) in eval mode, keeping the 28 x 28 mask probabilities
        raw = model.inference(inputs, do_postprocess=False)[0]
        final = detector_postprocess(raw, h, w)  # pastes masks, thresholds at 0.5, drops empty boxes
        raw = raw[raw.pred_boxes.nonempty()]  # the same rows as `final`
    out = {"boxes": final.pred_boxes.tensor, "scores": final.scores, "labels": final.pred_classes + 1}
    if final.has("pred_masks"):
        out["masks"] = final.pred_masks[:, None].float()  # (N, 1, H, W) binary
        out["mask_probs"] = _do_paste_mask(raw.pred_masks, raw.pred_boxes.tensor, h, w, skip_empty=False)[0][:, None]
    if final.has("pred_keypoints"):
        out["keypoints"] = final.pred_keypoints[..., :2]
        out["keypoints_scores"] = final.pred_keypoints[..., 2]
    return out


def match_detections(a, b, box_tol=0.01):
    """Pair each detection of `a` with one of `b` (same label, box within box_tol, closest score): the order of
    float-noise score ties may differ. Returns (unmatched count, pairs)."""
    used, pairs = set(), []
    for i in range(len(a["boxes"])):
        close = ((a["boxes"][i] - b["boxes"]).abs().max(dim=1).values <= box_tol) & (b["labels"] == a["labels"][i])
        candidates = [j for j in torch.nonzero(close).flatten().tolist() if j not in used]
        if candidates:
            j = min(candidates, key=lambda j: abs(a["scores"][i] - b["scores"][j]))
            used.add(j)
            pairs.append((i, j))
    return len(a["boxes"]) + len(b["boxes"]) - 2 * len(pairs), pairs


def check_parity(preset, tmp_path, height=320, width=416, detections=100, proposals=1000, config=None):
    """Run detectron2 and minimask (loaded through a file and from_checkpoint) on one image; return max diffs.
    `detections` and `proposals` (RPN post-NMS top-k) are set alike in both."""
    d2 = d2_model(preset, detections, proposals)
    path = tmp_path / "d2.pth"
    torch.save({"model": d2.state_dict(), "__author__": "test"}, path)
    model = from_checkpoint(path, config=config)
    model.roi_heads.detections_per_image = detections
    model.rpn.post_nms_topk[False] = proposals
    image = blob_image(height, width)
    expected = d2_detections(d2, image)
    with torch.no_grad():
        got = model([image])[0]
    assert len(expected["boxes"]) >= min(detections, 10)  # the biases made detections
    unmatched, pairs = match_detections(expected, got)
    assert unmatched == 0, f"{unmatched} unmatched of {len(expected['boxes'])} / {len(got['boxes'])}"
    i, j = (torch.tensor(x) for x in zip(*pairs))
    diffs = {"boxes": (expected["boxes"][i] - got["boxes"][j]).abs().max().item(),
             "scores": (expected["scores"][i] - got["scores"][j]).abs().max().item()}
    assert diffs["boxes"] <= 0.01 and diffs["scores"] <= 1e-4
    if "masks" in expected:
        # detectron2 thresholds at 0.5: the binary masks must be identical (up to pixels that float noise puts on
        # either side of 0.5). Probabilities agree inside the boxes; outside, detectron2's grid_sample leaves a
        # halo below 0.5 that minimask cuts (mask_head.paste_masks), so the thresholded masks are the same.
        probs = got["masks"][j]  # (N, 1, H, W)
        differ = expected["masks"][i] != (probs >= 0.5).float()
        near_half = (probs - 0.5).abs() < 1e-3
        boxes = got["boxes"][j]
        ys = torch.arange(height, dtype=torch.float32)[:, None] + 0.5
        xs = torch.arange(width, dtype=torch.float32)[None, :] + 0.5
        inside = ((xs >= boxes[:, 0, None, None]) & (xs < boxes[:, 2, None, None]) &
                  (ys >= boxes[:, 1, None, None]) & (ys < boxes[:, 3, None, None]))[:, None]  # (N, 1, H, W)
        prob_diff = (expected["mask_probs"][i] - probs).abs()
        diffs["mask_probs_inside"] = prob_diff[inside].max().item()
        diffs["mask_probs_outside"] = prob_diff[~inside].max().item()
        diffs["mask_pixels_differ"] = int(differ.sum())
        assert diffs["mask_probs_inside"] <= 1e-3 and diffs["mask_probs_outside"] < 0.5
        assert not (differ & ~near_half).any()
    if "keypoints" in expected:
        diffs["keypoints"] = (expected["keypoints"][i] - got["keypoints"][j][..., :2]).abs().max().item()
        diffs["keypoints_scores"] = (expected["keypoints_scores"][i] - got["keypoints_scores"][j]).abs().max().item()
        assert diffs["keypoints"] <= 0.01 and diffs["keypoints_scores"] <= 1e-3
    print(preset, len(pairs), "detections", diffs)
    return diffs


def test_d2_state_matches_real_detectron2_models():
    """The layouts built by `d2_state` are detectron2's: same names, same shapes."""
    pytest.importorskip("detectron2")
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model as d2_build_model

    for preset in sorted(LAYOUTS):
        cfg = get_cfg()
        cfg.merge_from_file(model_zoo.get_config_file(d2_config_file(preset)))
        cfg.MODEL.DEVICE = "meta"
        with torch.device("meta"):
            real = d2_build_model(cfg).state_dict()
        ours = d2_state_for(preset)
        assert {k: tuple(v.shape) for k, v in real.items()} == {k: tuple(v.shape) for k, v in ours.items()}, preset
        assert candidate_presets(real) == candidate_presets(ours), preset


@pytest.mark.slow
def test_mask_rcnn_R_50_FPN_3x_parity(tmp_path):
    check_parity("d2_mask_rcnn_R_50_FPN_3x", tmp_path, height=256, width=320, detections=30, proposals=300)


@pytest.mark.slow
def test_mask_rcnn_R_50_FPN_3x_parity_100_detections(tmp_path):
    check_parity("d2_mask_rcnn_R_50_FPN_3x", tmp_path, height=480, width=640)


@pytest.mark.slow
def test_mask_rcnn_R_50_FPN_3x_gn_parity(tmp_path):
    check_parity("d2_scratch_mask_rcnn_R_50_FPN_9x_gn", tmp_path, config="d2_scratch_mask_rcnn_R_50_FPN_9x_gn")


@pytest.mark.slow
def test_syncbn_parity(tmp_path):
    check_parity("d2_mask_rcnn_R_50_FPN_3x_syncbn", tmp_path, config="d2_mask_rcnn_R_50_FPN_3x_syncbn")


@pytest.mark.slow
def test_keypoint_rcnn_R_50_FPN_3x_parity(tmp_path):
    check_parity("d2_keypoint_rcnn_R_50_FPN_3x", tmp_path, detections=20)


@pytest.mark.slow
def test_cascade_mask_rcnn_R_50_FPN_3x_parity(tmp_path):
    check_parity("d2_cascade_mask_rcnn_R_50_FPN_3x", tmp_path)


def test_boxes_clipped_to_zero_size_are_dropped():
    """detectron2's detector_postprocess drops final boxes that clipping left with zero width or height."""
    model = build_model(get_config("tiny", ["model.mask_head.enabled=False"])).eval()
    predictor = model.roi_heads.box_predictor
    with torch.no_grad():
        for p in predictor.parameters():
            p.zero_()
        predictor.cls_score.bias[1] = 5.0  # every RoI is class 1
        predictor.bbox_pred.bias[0] = 50.0  # dx = 50 / 10: each box moves 5 of its widths to the right
    features = [torch.randn(1, 64, 128 // s, 128 // s) for s in (4, 8, 16, 32)]
    proposals = [torch.tensor([[90.0, 10.0, 120.0, 40.0], [10.0, 10.0, 20.0, 20.0]])]
    with torch.no_grad():
        detections, _ = model.roi_heads(features, proposals, [(128, 128)])
    # the first box lands at x 240..270, clipped to 128..128 (empty); the second at 60..70
    torch.testing.assert_close(detections[0]["boxes"], torch.tensor([[60.0, 10.0, 70.0, 20.0]]))
    assert detections[0]["labels"].tolist() == [1]
