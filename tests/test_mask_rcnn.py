"""The assembled model: the forward contract, input checks, empty images, and a learning check."""
import pytest
import torch

import minimask
from minimask.config import get_config

KEYPOINTS = 17


def scene(height, width, objects, seed=0):
    """An image with filled rectangles (label 1, red), ellipses (label 2, green) and rectangles (label 3, blue).

    objects: list of (label, x1, y1, x2, y2) in pixels. Returns the image and a target dict with boxes, labels,
    masks and keypoints (17 points spread over the object's mask, all visible).
    """
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, height, width, generator=g) * 0.2
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    masks, boxes, keypoints = [], [], []
    for label, x1, y1, x2, y2 in objects:
        if label == 2:
            cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            mask = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
        else:
            mask = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
        image[:, mask] = torch.tensor([0.0, 0.0, 0.0]).index_fill_(0, torch.tensor([label - 1]), 0.9)[:, None]
        masks.append(mask.to(torch.uint8))
        boxes.append([x1, y1, x2, y2])
        t = torch.linspace(0.2, 0.8, KEYPOINTS)
        keypoints.append(torch.stack([x1 + t * (x2 - x1), y1 + t.flip(0) * (y2 - y1), torch.full_like(t, 2.0)], 1))
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor([o[0] for o in objects], dtype=torch.int64),
        "masks": torch.stack(masks) if masks else torch.zeros(0, height, width, dtype=torch.uint8),
        "keypoints": torch.stack(keypoints) if keypoints else torch.zeros(0, KEYPOINTS, 3),
    }
    return image, target


def two_scenes(keypoints=False):
    a = scene(128, 128, [(1, 10, 12, 60, 70), (2, 70, 60, 120, 118)], seed=1)
    b = scene(96, 128, [(3, 20, 20, 100, 80)], seed=2)
    images, targets = [a[0], b[0]], [a[1], b[1]]
    for t in targets:
        if keypoints:
            t["labels"] = torch.ones_like(t["labels"])
            del t["masks"]
        else:
            del t["keypoints"]
    return images, targets


def test_train_losses_and_eval_outputs():
    model = minimask.build_model(get_config("tiny"))
    images, targets = two_scenes()
    losses = model(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for out, img in zip(outputs, images):
        assert set(out) == {"boxes", "labels", "scores", "masks"}
        n = out["boxes"].shape[0]
        assert out["boxes"].shape == (n, 4) and out["labels"].shape == (n,) and out["scores"].shape == (n,)
        assert out["labels"].dtype == torch.int64
        assert out["masks"].shape == (n, 1, *img.shape[1:])  # input pixels, not the padded batch
        h, w = img.shape[1:]
        assert (out["boxes"][:, 0::2] <= w).all() and (out["boxes"][:, 1::2] <= h).all()
        assert (out["boxes"] >= 0).all()


def test_channels_last_computes_the_same_losses_gradients_and_detections():
    """model.channels_last only changes the memory layout: the same weights give the same results."""
    torch.manual_seed(0)
    plain = minimask.build_model(get_config("tiny")).double()
    nhwc = minimask.build_model(get_config("tiny", ["model.channels_last=True"])).double()
    nhwc.load_state_dict(plain.state_dict())
    assert nhwc.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images, targets = two_scenes()
    images = [img.double() for img in images]
    results = []
    for model in (plain, nhwc):
        torch.manual_seed(1)  # the same RoI sampling
        losses = model(images, targets)
        sum(losses.values()).backward()
        model.eval()
        with torch.no_grad():
            detections = model(images)
        results.append((losses, {n: p.grad for n, p in model.named_parameters()}, detections))
    (loss_a, grad_a, det_a), (loss_b, grad_b, det_b) = results
    for name in loss_a:
        torch.testing.assert_close(loss_a[name], loss_b[name], rtol=1e-9, atol=1e-12)
    for name in grad_a:
        torch.testing.assert_close(grad_a[name], grad_b[name], rtol=1e-7, atol=1e-10, msg=name)
    for a, b in zip(det_a, det_b):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-7, atol=1e-7, msg=key)


def test_keypoint_model_outputs():
    model = minimask.build_model(get_config("tiny_keypoint"))
    images, targets = two_scenes(keypoints=True)
    losses = model(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_keypoint"}
    model.eval()
    with torch.no_grad():
        out = model(images)[0]
    n = out["boxes"].shape[0]
    assert set(out) == {"boxes", "labels", "scores", "keypoints", "keypoints_scores"}
    assert out["keypoints"].shape == (n, KEYPOINTS, 3) and out["keypoints_scores"].shape == (n, KEYPOINTS)


def test_cascade_model_losses():
    cfg = get_config("tiny", ["model.cascade.enabled=True", "model.box_head.class_agnostic=True"])
    model = minimask.build_model(cfg)
    images, targets = two_scenes()
    losses = model(images, targets)
    expected = {"loss_objectness", "loss_rpn_box_reg", "loss_mask"}
    expected |= {f"loss_{k}_stage{s}" for k in ("classifier", "box_reg") for s in (1, 2, 3)}
    assert set(losses) == expected
    model.eval()
    with torch.no_grad():
        assert set(model(images)[0]) == {"boxes", "labels", "scores", "masks"}


@pytest.mark.parametrize("preset", ["tiny", "tiny_keypoint"])
def test_image_without_objects(preset):
    model = minimask.build_model(get_config(preset))
    image, target = scene(128, 128, [])
    if preset == "tiny":
        del target["keypoints"]
    else:
        del target["masks"]
    losses = model([image], [target])
    for name in ("loss_rpn_box_reg", "loss_box_reg", "loss_mask", "loss_keypoint"):
        if name in losses:
            assert losses[name].item() == 0.0, name
    assert torch.isfinite(losses["loss_classifier"]) and losses["loss_classifier"] > 0
    assert torch.isfinite(losses["loss_objectness"]) and losses["loss_objectness"] > 0
    sum(losses.values()).backward()


def test_preprocess_normalises_and_pads_to_32():
    model = minimask.build_model(get_config("tiny"))
    images = [torch.rand(3, 100, 70), torch.rand(3, 64, 129)]
    batch, sizes = model.preprocess(images)
    assert batch.shape == (2, 3, 128, 160) and sizes == [(100, 70), (64, 129)]
    # BGR order, 0-255 scale, mean/std of the config; padding is 0 after normalisation.
    expected = (images[0].flip(0) * 255 - model.pixel_mean) / model.pixel_std
    torch.testing.assert_close(batch[0, :, :100, :70], expected)
    assert batch[0, :, 100:].abs().sum() == 0 and batch[1, :, :, 129:].abs().sum() == 0
    rgb = minimask.build_model(get_config("tiny", ["model.input_format=RGB"]))
    torch.testing.assert_close(rgb.preprocess(images)[0][0, :, :100, :70],
                               (images[0] * 255 - rgb.pixel_mean) / rgb.pixel_std)


def _bad(field_fn):
    images, targets = two_scenes()
    field_fn(images, targets)
    return images, targets


@pytest.mark.parametrize("mutate, message", [
    (lambda i, t: t[0]["boxes"].__setitem__((0, 2), 5.0), r"targets\[0\]\['boxes'\]\[0\] has zero or negative size"),
    (lambda i, t: t[1]["boxes"].__setitem__((0, 3), 20.0), r"targets\[1\]\['boxes'\]\[0\] has zero or negative size"),
    (lambda i, t: t[0]["labels"].__setitem__(0, 4), r"targets\[0\]\['labels'\] must lie in 1..3"),
    (lambda i, t: t[0]["labels"].__setitem__(0, 0), r"targets\[0\]\['labels'\] must lie in 1..3"),
    (lambda i, t: t[0].__setitem__("masks", t[0]["masks"][:, :64]), r"targets\[0\]\['masks'\] must have shape"),
    (lambda i, t: t[0].__setitem__("labels", t[0]["labels"].int()), r"targets\[0\]\['labels'\] must be an int64"),
    (lambda i, t: t[0].__setitem__("boxes", t[0]["boxes"][:, :3]), r"targets\[0\]\['boxes'\] must be a float \(N, 4\)"),
    (lambda i, t: i.__setitem__(0, i[0][0]), r"images\[0\] must be a \(3, H, W\) tensor"),
    (lambda i, t: i.__setitem__(1, i[1][None]), r"images\[1\] must be a \(3, H, W\) tensor"),
    (lambda i, t: i.__setitem__(0, (i[0] * 255).to(torch.uint8)), r"images\[0\] must be a float tensor"),
    (lambda i, t: t.pop(), r"targets must be a list of 2 dicts"),
])
def test_bad_input_is_refused_before_compute(mutate, message):
    model = minimask.build_model(get_config("tiny"))
    images, targets = _bad(mutate)
    with pytest.raises(ValueError, match=message):
        model(images, targets)


def test_polygon_targets_train_like_bitmaps():
    # Rectangles with integer corners: the polygon and the bitmap describe the same region, so with the same RoI
    # sampling (same seed) the mask losses agree closely; they differ only in how the edges are rasterised.
    model = minimask.build_model(get_config("tiny", ["model.mask_head.enabled=True"]))
    image, target = scene(128, 128, [(1, 10, 12, 60, 70), (3, 70, 60, 120, 118)])
    del target["keypoints"]
    torch.manual_seed(3)
    from_bitmaps = model([image], [target])["loss_mask"]
    polygons = [[[x1, y1, x2, y1, x2, y2, x1, y2]] for x1, y1, x2, y2 in target["boxes"].tolist()]
    with_polygons = {**{k: v for k, v in target.items() if k != "masks"}, "polygons": polygons}
    torch.manual_seed(3)
    from_polygons = model([image], [with_polygons])["loss_mask"]
    assert torch.isfinite(from_polygons)
    torch.testing.assert_close(from_polygons, from_bitmaps, rtol=0.05, atol=0.0)
    with pytest.raises(ValueError, match="polygons"):
        model([image], [{**with_polygons, "polygons": polygons[:1]}])


def test_images_per_canvas_pads_each_group_alone_and_averages_its_losses():
    """images_per_canvas = 2: every pair of the batch is padded on a canvas of its own (as each of detectron2's GPUs
    pads its 2 images), and the losses equal those of the pairs run as separate batches, weighted by their images."""
    scenes = [scene(96, 128, [(1, 10, 12, 60, 70)], seed=1), scene(128, 96, [(2, 20, 20, 80, 100)], seed=2),
              scene(64, 64, [(3, 8, 8, 40, 50)], seed=3), scene(100, 80, [(1, 30, 10, 70, 90)], seed=4),
              scene(70, 70, [(2, 5, 5, 60, 60)], seed=5)]
    images, targets = [s[0] for s in scenes], [s[1] for s in scenes]
    for t in targets:
        del t["keypoints"]
    model = minimask.build_model(get_config("tiny", ["model.images_per_canvas=2"]))
    canvases = []
    model.backbone.register_forward_pre_hook(lambda module, args: canvases.append(tuple(args[0].shape)))
    torch.manual_seed(1)
    losses = model(images, targets)
    assert canvases == [(2, 3, 128, 128), (2, 3, 128, 96), (1, 3, 96, 96)]
    torch.manual_seed(1)  # the same random draws, in the same order
    parts = [model(images[i:i + 2], targets[i:i + 2]) for i in (0, 2, 4)]
    for name, value in losses.items():
        expected = (2 * parts[0][name] + 2 * parts[1][name] + parts[2][name]) / 5
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    model.eval()
    with torch.no_grad():
        detections = model(images)
        alone = [d for i in (0, 2, 4) for d in model(images[i:i + 2])]
    assert len(detections) == 5
    for d, a in zip(detections, alone):
        assert all(torch.equal(d[k], a[k]) for k in ("boxes", "scores", "labels"))
    canvases.clear()
    model.images_per_canvas = 0  # the whole batch on one canvas
    with torch.no_grad():
        model(images)
    assert canvases == [(5, 3, 128, 128)]


def test_training_requires_targets():
    model = minimask.build_model(get_config("tiny"))
    with pytest.raises(ValueError, match="targets are required"):
        model([torch.rand(3, 64, 64)])


def test_frozenbn_parameter_count_vs_torchvision_layout():
    # torchvision's maskrcnn_resnet50_fpn(num_classes=91) has 44,454,513 parameters when built without pretrained
    # weights: its backbone then uses BatchNorm2d, whose 53,120 affine weights are parameters. minimask's
    # r50_fpn_frozenbn uses FrozenBatchNorm2d, which holds them as buffers (torchvision's pretrained model does the
    # same, and lists 44,401,393). The rest of the difference is the head design: minimask follows detectron2's
    # predictors, with no box regression and no mask map for background. With the same 91 classifier outputs
    # (90 object classes + background) that is bbox_pred's 4 x (1024 + 1) = 4,100 and the mask predictor's
    # 256 + 1 = 257. Backbone convs, FPN, RPN and the 2fc box head match torchvision's layer for layer.
    with torch.device("meta"):
        model = minimask.build_model(get_config("r50_fpn_frozenbn", ["model.roi_heads.num_classes=90"]))
    count = sum(p.numel() for p in model.parameters())
    assert count == 44_454_513 - 53_120 - 4_100 - 257 == 44_397_036


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "tiny_keypoint"])
def test_overfits_two_images(preset):
    """Learning check: the tiny presets overfit two images until every object is found at IoU > 0.8."""
    torch.manual_seed(0)
    keypoints = preset == "tiny_keypoint"
    model = minimask.build_model(get_config(preset))
    images, targets = two_scenes(keypoints=keypoints)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=1e-4)
    for it in range(300):
        lr = 0.02 * min(1.0, (it + 1) / 50)
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    for out, target in zip(outputs, targets):
        confident = out["scores"] > 0.5
        iou = minimask.ops.box_iou(target["boxes"], out["boxes"][confident])
        for g in range(len(target["boxes"])):
            same_label = out["labels"][confident] == target["labels"][g]
            assert (iou[g][same_label] > 0.8).any(), f"object {g} not found: {losses}"
