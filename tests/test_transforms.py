"""Tests for minimask.data.transforms: hand-checked resize/flip geometry, size rounding, keypoint conventions."""
import pytest
import torch

from minimask.data.transforms import (
    COCO_FLIP_MAP,
    COCO_KEYPOINT_NAMES,
    Compose,
    RandomHorizontalFlip,
    Resize,
    build_transforms,
    export_keypoints,
    flip_permutation,
    hflip,
    resize,
    shortest_edge_size,
)


def _target(height, width, n=2, k=17):
    boxes = torch.tensor([[1.0, 1.0, 3.0, 2.0], [0.0, 0.5, 6.0, 4.0]])[:n]
    masks = torch.zeros(n, height, width, dtype=torch.uint8)
    keypoints = torch.rand(n, k, 3) * torch.tensor([width, height, 0.0])
    keypoints[..., 2] = 2.0
    return {"boxes": boxes, "labels": torch.arange(1, n + 1), "masks": masks, "keypoints": keypoints,
            "image_id": 7, "orig_size": (height, width)}


def test_shortest_edge_size_hand_checked():
    assert shortest_edge_size(480, 640, 800, 1333) == (800, 1067)  # 640 * 800/480 = 1066.67 -> 1067
    assert shortest_edge_size(640, 480, 800, 1333) == (1067, 800)  # portrait
    assert shortest_edge_size(300, 500, 100, 1000) == (100, 167)  # 166.67 rounds up (int(x + 0.5)), not down
    assert shortest_edge_size(400, 1000, 800, 1333) == (533, 1333)  # cap: 800x2000 -> x 1333/2000 -> 533.2 x 1333
    assert shortest_edge_size(800, 800, 800, 1333) == (800, 800)
    with pytest.raises(ValueError):
        shortest_edge_size(0, 10, 800, 1333)


def test_shrunk_masks_keep_thin_structures_as_coverage():
    # A one-pixel line shrunk 2x: a binary nearest-neighbour resize keeps or drops it whole; coverage keeps its area
    # (each output pixel holds the fraction the object covers) and stays in [0, 1].
    masks = torch.zeros(2, 40, 40, dtype=torch.uint8)
    masks[0, 10:30, 17] = 1  # vertical line, 20 x 1 px
    masks[1, 8:32, 8:32] = 1  # square, 24 x 24 px
    _, out = resize(torch.rand(3, 40, 40), {"masks": masks}, (20, 20))
    cover = out["masks"].float()
    assert out["masks"].dtype == torch.float16 and cover.min() >= 0 and cover.max() <= 1
    torch.testing.assert_close(cover.sum(dim=(1, 2)) * 4, masks.float().sum(dim=(1, 2)), rtol=2e-3, atol=0)
    assert 0 < cover[0].max() < 0.5  # the line survives as partial coverage
    assert (cover[1, 5:15, 5:15] == 1).all() and (cover[1, :3] == 0).all()  # the square's inside and outside exact


def test_resize_scales_boxes_masks_keypoints_consistently():
    height, width = 4, 6
    image = torch.rand(3, height, width)
    masks = torch.zeros(1, height, width, dtype=torch.uint8)
    masks[0, 1:3, 2:4] = 1  # covers x in [2, 4], y in [1, 3] in continuous coordinates
    target = {"boxes": torch.tensor([[2.0, 1.0, 4.0, 3.0]]), "labels": torch.tensor([1]), "masks": masks,
              "keypoints": torch.tensor([[[2.5, 1.5, 2.0], [6.0, 4.0, 1.0]]]), "image_id": 3, "orig_size": (4, 6)}
    out_image, out = resize(image, target, (8, 9))  # sx = 1.5, sy = 2
    assert out_image.shape == (3, 8, 9) and out_image.dtype == torch.float32
    assert torch.equal(out["boxes"], torch.tensor([[3.0, 2.0, 6.0, 6.0]]))
    assert torch.equal(out["keypoints"], torch.tensor([[[3.75, 3.0, 2.0], [9.0, 8.0, 1.0]]]))  # (W, H) stays inside
    # Masks become float16 coverage (bilinear): upscaled, a binary mask's 0.5 level lies on the scaled pixel edges,
    # so >= 0.5 keeps exactly the pixels whose centres lie in the scaled box [3, 6] x [2, 6]: columns 3..5, rows 2..5.
    expected = torch.zeros(1, 8, 9, dtype=torch.bool)
    expected[0, 2:6, 3:6] = True
    assert out["masks"].dtype == torch.float16 and torch.equal(out["masks"] >= 0.5, expected)
    assert out["masks"].min() >= 0 and out["masks"].max() <= 1
    # Width 6 -> 10: the scaled box is [3.33, 6.67] x [2, 6]. Along a row and a column through the middle, >= 0.5
    # keeps the centres inside it (columns 3..6, rows 2..5); the corners are rounded off (bilinear is a product:
    # 0.6 x 0.75 < 0.5 at row 2, column 3).
    wide = resize(image, target, (8, 10))[1]["masks"][0] >= 0.5  # (8, 10)
    assert wide[3].nonzero().flatten().tolist() == [3, 4, 5, 6]
    assert wide[:, 4].nonzero().flatten().tolist() == [2, 3, 4, 5]
    assert out["image_id"] == 3 and out["orig_size"] == (4, 6) and torch.equal(out["labels"], target["labels"])
    assert torch.equal(target["boxes"], torch.tensor([[2.0, 1.0, 4.0, 3.0]]))  # the input target is not modified


def test_resize_image_is_bilinear_half_pixel():
    image = torch.tensor([0.0, 1.0]).expand(3, 1, 2)
    out, _ = resize(image, None, (1, 4))
    # align_corners=False: output x = 0, 1, 2, 3 samples input x = -0.25 (clamped), 0.25, 0.75, 1.25 (clamped)
    assert torch.allclose(out[0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    image = torch.rand(3, 23, 31)
    for size in [(40, 57), (11, 16)]:  # the channels-last fast path gives the plain NCHW interpolate's values
        out = resize(image, None, size)[0]
        assert out.is_contiguous()
        reference = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(out, reference)
    constant = torch.full((3, 5, 7), 0.3)
    assert torch.allclose(resize(constant, None, (3, 11))[0], torch.full((3, 3, 11), 0.3))


def test_resize_marks_outside_keypoints_invisible():
    target = {"boxes": torch.zeros(1, 4), "keypoints": torch.tensor([[[-1.0, 2.0, 2.0], [3.0, 2.0, 2.0],
                                                                      [3.0, 4.5, 1.0]]])}
    _, out = resize(torch.rand(3, 4, 6), target, (8, 12))
    assert out["keypoints"][0, :, 2].tolist() == [0.0, 2.0, 0.0]
    assert out["keypoints"][0, 0, :2].tolist() == [-2.0, 4.0]  # coordinates are still transformed


def test_resize_matches_torchvision_oracle():
    tv = pytest.importorskip("torchvision")
    from torchvision.transforms.v2 import functional as TF

    image = torch.rand(3, 37, 53)
    boxes = torch.tensor([[1.0, 2.0, 30.5, 20.25], [0.0, 0.0, 53.0, 37.0]])
    out_image, out = resize(image, {"boxes": boxes}, (50, 72))
    ref_image = TF.resize(image, [50, 72], interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
    torch.testing.assert_close(out_image, ref_image)
    ref_boxes = TF.resize(tv.tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(37, 53)), [50, 72])
    torch.testing.assert_close(out["boxes"], ref_boxes.as_subclass(torch.Tensor))


def test_resize_empty_target_and_bad_input():
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, 4, 6, dtype=torch.uint8), "keypoints": torch.zeros(0, 17, 3)}
    image, out = resize(torch.rand(3, 4, 6), target, (8, 12))
    assert out["boxes"].shape == (0, 4) and out["masks"].shape == (0, 8, 12) and out["keypoints"].shape == (0, 17, 3)
    image, out = hflip(image, out)
    assert out["masks"].shape == (0, 8, 12) and out["boxes"].shape == (0, 4)
    with pytest.raises(ValueError, match="masks"):
        resize(torch.rand(3, 4, 6), {"masks": torch.zeros(1, 4, 5, dtype=torch.uint8)}, (8, 12))
    with pytest.raises(ValueError, match="boxes"):
        resize(torch.rand(3, 4, 6), {"boxes": torch.zeros(1, 3)}, (8, 12))
    with pytest.raises(ValueError, match="image"):
        resize(torch.zeros(3, 4, 6, dtype=torch.uint8), None, (8, 12))
    with pytest.raises(ValueError, match="different numbers"):
        hflip(torch.rand(3, 4, 6), {"boxes": torch.zeros(2, 4), "labels": torch.zeros(3, dtype=torch.int64)})


def test_resize_class_draws_from_list_and_caps():
    transform = Resize((100, 120, 140), 1000)
    image = torch.rand(3, 50, 80)
    shorts = [transform(image, None)[0].shape[-2] for _ in range(60)]
    assert set(shorts) == {100, 120, 140}
    torch.manual_seed(5)
    first = [transform(image, None)[0].shape[-2] for _ in range(10)]
    torch.manual_seed(5)
    assert first == [transform(image, None)[0].shape[-2] for _ in range(10)]  # global RNG: seeding reproduces it
    out, target = Resize((800,), 1333)(torch.rand(3, 100, 400), _target(100, 400))
    assert out.shape == (3, 333, 1333) and target["masks"].shape == (2, 333, 1333)  # 800x3200 capped, 333.25 -> 333


def test_hflip_boxes_hand_checked():
    _, out = hflip(torch.rand(3, 6, 10), {"boxes": torch.tensor([[1.0, 2.0, 4.0, 5.0]])})
    assert torch.equal(out["boxes"], torch.tensor([[6.0, 2.0, 9.0, 5.0]]))


def test_hflip_twice_is_identity():
    height, width = 9, 13
    image = torch.rand(3, height, width)
    target = _target(height, width)
    target["masks"] = (torch.rand(2, height, width) > 0.5).to(torch.uint8)
    target["keypoints"][0, 3, 2] = 1.0
    once_image, once = hflip(image, target, COCO_FLIP_MAP)
    assert not torch.equal(once_image, image) and not torch.equal(once["masks"], target["masks"])
    twice_image, twice = hflip(once_image, once, COCO_FLIP_MAP)
    assert torch.equal(twice_image, image) and torch.equal(twice["masks"], target["masks"])
    torch.testing.assert_close(twice["boxes"], target["boxes"])
    torch.testing.assert_close(twice["keypoints"], target["keypoints"])
    assert torch.equal(twice["labels"], target["labels"])


def test_hflip_swaps_left_and_right_keypoints():
    width = 50
    keypoints = torch.zeros(1, 17, 3)
    left_eye, right_eye = COCO_KEYPOINT_NAMES.index("left_eye"), COCO_KEYPOINT_NAMES.index("right_eye")
    keypoints[0, left_eye] = torch.tensor([10.0, 7.0, 2.0])
    keypoints[0, right_eye] = torch.tensor([20.0, 8.0, 1.0])
    keypoints[0, 0] = torch.tensor([15.0, 9.0, 2.0])  # the nose has no partner
    _, out = hflip(torch.rand(3, 30, width), {"keypoints": keypoints})
    assert out["keypoints"][0, right_eye].tolist() == [40.0, 7.0, 2.0]  # left eye at x=10 -> x=W-10, right_eye
    assert out["keypoints"][0, left_eye].tolist() == [30.0, 8.0, 1.0]  # visibility travels with the point
    assert out["keypoints"][0, 0].tolist() == [35.0, 9.0, 2.0]


def test_hflip_marks_outside_keypoints_invisible():
    keypoints = torch.tensor([[[12.0, 3.0, 2.0], [10.0, 3.0, 2.0], [0.0, 3.0, 1.0]]])
    _, out = hflip(torch.rand(3, 6, 10), {"keypoints": keypoints}, None)
    assert out["keypoints"][0].tolist() == [[-2.0, 3.0, 0.0], [0.0, 3.0, 2.0], [10.0, 3.0, 1.0]]  # edges inclusive


def test_coco_flip_map_and_permutation_forms():
    for a, b in COCO_FLIP_MAP:
        assert COCO_KEYPOINT_NAMES[a].replace("left_", "right_") == COCO_KEYPOINT_NAMES[b]
    assert len(COCO_KEYPOINT_NAMES) == 17 and len(COCO_FLIP_MAP) == 8
    perm = flip_permutation(COCO_FLIP_MAP, 17)
    assert perm[:5] == [0, 2, 1, 4, 3] and sorted(perm) == list(range(17))
    assert flip_permutation(perm, 17) == perm
    keypoints = torch.rand(2, 17, 3) * 5
    torch.testing.assert_close(hflip(torch.rand(3, 5, 5), {"keypoints": keypoints}, perm)[1]["keypoints"],
                               hflip(torch.rand(3, 5, 5), {"keypoints": keypoints}, COCO_FLIP_MAP)[1]["keypoints"])
    with pytest.raises(ValueError):
        flip_permutation([0, 0, 1], 3)
    with pytest.raises(ValueError):
        flip_permutation(((1, 17),), 17)


def test_random_flip_and_compose():
    image = torch.rand(3, 4, 6)
    assert torch.equal(RandomHorizontalFlip(p=0.0)(image, None)[0], image)
    assert torch.equal(RandomHorizontalFlip(p=1.0)(image, None)[0], image.flip(-1))
    flips = [torch.equal(RandomHorizontalFlip()(image, None)[0], image) for _ in range(100)]
    assert 25 < sum(flips) < 75
    out, target = Compose([Resize((8,), 100), RandomHorizontalFlip(p=1.0)])(image, _target(4, 6))
    assert out.shape == (3, 8, 12) and torch.equal(target["boxes"][0], torch.tensor([6.0, 2.0, 10.0, 4.0]))


def test_build_transforms():
    train = build_transforms(min_sizes=(640, 672), max_size=1333, flip=True, train=True)
    assert [type(t) for t in train.transforms] == [Resize, RandomHorizontalFlip]
    assert train.transforms[0].min_sizes == (640, 672)
    assert [type(t) for t in build_transforms(min_sizes=(800,), max_size=1333, flip=False, train=True).transforms] \
        == [Resize]
    test = build_transforms(min_sizes=16, max_size=20, flip=True, train=False)
    assert [type(t) for t in test.transforms] == [Resize]
    image = torch.rand(3, 8, 12)
    out1, out2 = test(image, None)[0], test(image, None)[0]
    assert out1.shape == (3, 13, 20) and torch.equal(out1, out2)  # 16 x 24 capped to 20 -> 13.3 x 20
    with pytest.raises(ValueError):
        build_transforms(min_sizes=(640, 800), max_size=1333, flip=False, train=False)


def test_export_keypoints():
    keypoints = torch.tensor([[[10.5, 3.5, 2.0], [0.5, 0.5, 0.0]]])
    assert export_keypoints(keypoints).tolist() == [[[10.0, 3.0, 2.0], [0.0, 0.0, 0.0]]]
    with pytest.raises(ValueError):
        export_keypoints(torch.zeros(2, 2))


def test_polygons_resize_and_flip_hand_checked():
    import numpy as np

    polygons = [[np.array([0.0, 0.0, 10.0, 0.0, 10.0, 5.0])], [np.array([2.0, 1.0, 4.0, 1.0, 3.0, 3.0]),
                                                               np.array([6.0, 6.0, 8.0, 6.0, 7.0, 9.0])]]
    target = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 5.0], [2.0, 1.0, 8.0, 9.0]]), "labels": torch.tensor([1, 2]),
              "polygons": polygons}
    image = torch.rand(3, 10, 20)
    _, resized = resize(image, target, (20, 30))  # x * 1.5, y * 2
    assert resized["polygons"][0][0].tolist() == [0.0, 0.0, 15.0, 0.0, 15.0, 10.0]
    assert resized["polygons"][1][1].tolist() == [9.0, 12.0, 12.0, 12.0, 10.5, 18.0]
    _, flipped = hflip(image, target)  # x -> 20 - x
    assert flipped["polygons"][0][0].tolist() == [20.0, 0.0, 10.0, 0.0, 10.0, 5.0]
    assert flipped["polygons"][1][0].tolist() == [18.0, 1.0, 16.0, 1.0, 17.0, 3.0]
    assert polygons[0][0].tolist() == [0.0, 0.0, 10.0, 0.0, 10.0, 5.0]  # the input target is untouched
    _, back = hflip(*hflip(image, target))
    assert all(np.array_equal(a, b) for obj_a, obj_b in zip(back["polygons"], polygons) for a, b in zip(obj_a, obj_b))
    with pytest.raises(ValueError, match="different numbers of instances"):
        resize(image, {**target, "polygons": polygons[:1]}, (20, 30))


def test_polygon_targets_after_transforms_agree_with_bitmap_targets():
    """The same objects as polygons and as bitmaps, resized and flipped: the mask head's 28 x 28 targets from the
    moved polygons (rasterised in the box) and from the moved bitmaps (RoIAlign + 0.5 threshold) agree."""
    import numpy as np
    from pycocotools import mask as mask_utils

    from minimask.model.mask_head import mask_targets, polygon_mask_targets

    h, w = 60, 80
    polygons = [[[10.0, 8.0, 50.0, 12.0, 30.0, 50.0]], [[40.0, 20.0, 75.0, 20.0, 75.0, 55.0, 40.0, 55.0],
                                                      [5.0, 40.0, 20.0, 40.0, 12.0, 58.0]]]
    masks = torch.from_numpy(np.stack([mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(p, h, w)))
                                       for p in polygons]))  # (2, H, W)
    boxes = torch.tensor([[10.0, 8.0, 50.0, 50.0], [5.0, 20.0, 75.0, 58.0]])
    target = {"boxes": boxes, "labels": torch.tensor([1, 1]), "masks": masks,
              "polygons": [[np.array(p) for p in obj] for obj in polygons]}
    image = torch.rand(3, h, w)
    _, moved = hflip(*resize(image, target, (90, 120)))
    from_polygons = polygon_mask_targets(moved["polygons"], moved["boxes"], 28)
    from_bitmaps = mask_targets([moved["masks"]], [moved["boxes"]], [torch.tensor([0, 1])], 28)
    for a, b in zip(from_polygons, from_bitmaps):
        iou = (a * b).sum() / ((a + b) > 0).sum()
        assert iou > 0.9, iou
