"""KAIST log-average miss rate (minimask.miss_rate): hand-worked fixtures, filters, and a brute-force cross-check.

Boxes in the fixtures are minimask x1 y1 x2 y2; bbGt's l t w h is (x1 + 1, y1 + 1, x2 - x1, y2 - y1). The 9 reference
FPPI points are r_k = 10 ** (-2 + 0.25 k), k = 0..8: 0.01, 0.0178, 0.0316, 0.0562, 0.1, 0.178, 0.316, 0.562, 1.
"""
import math
import warnings

import numpy as np
import pytest

from minimask import miss_rate as mr

REFS = [10 ** (-2 + 0.25 * k) for k in range(9)]


def gt(*objects, bounds=None):
    """objects: (box, label[, occlusion[, ignore]]) tuples -> ground-truth dict (with the image's bounds if given)."""
    objects = [tuple(o) + (0, 0)[len(o) - 2:] for o in objects]
    out = {"boxes": np.array([o[0] for o in objects], dtype=float).reshape(-1, 4),
           "labels": [o[1] for o in objects], "occlusion": np.array([o[2] for o in objects], dtype=int),
           "ignore": np.array([o[3] for o in objects], dtype=int)}
    return out if bounds is None else {**out, "bounds": bounds}


def dt(*pairs):
    """pairs: (box, score) -> detections dict."""
    return {"boxes": np.array([p[0] for p in pairs], dtype=float).reshape(-1, 4),
            "scores": np.array([p[1] for p in pairs], dtype=float)}


EMPTY_GT, EMPTY_DT = gt(), dt()
A, B, C = (100, 100, 140, 200), (200, 100, 240, 180), (550, 100, 590, 190)  # persons, heights 100, 80, 90
REGION = (300, 100, 500, 400)  # a "people" group: ignored by its label


def test_ignored_region_absorbs_several_detections_by_intersection_over_detection_area():
    # Image 0: persons A, B, C and the ignored region R (bbGt l t w h = 301 101 200 300).
    #   0.85 (310,150,340,230) and 0.80 (320,200,360,300) lie inside R: intersection / detection area = 1 (IoU < 0.5);
    #   0.75 (480,150,520,230) -> l t w h 481 151 40 80: overlap 20 of its 40 px width -> 1600 / 3200 = 0.5 exactly;
    #   all three are absorbed (dropped); 0.9 on A and 0.3 on B are TPs, C is missed.
    # Image 1: no person, one FP (0.5). Images 2 and 3: empty, but they count in FPPI's denominator (4 images).
    # Kept by score: 0.9 TP, 0.5 FP, 0.3 TP with 3 regular boxes -> fppi [0, .25, .25], miss [2/3, 2/3, 1/3].
    # r_0..r_5 <= 0.178 < 0.25 -> miss 2/3 (point at fppi 0); r_6..r_8 >= 0.316 -> miss 1/3.
    # MR^-2 = exp((6 ln(2/3) + 3 ln(1/3)) / 9) = (2/3)^(2/3) (1/3)^(1/3) ~ 0.5291.
    gts = [gt((A, "person"), (B, "person"), (REGION, "people"), (C, "person")), EMPTY_GT, EMPTY_GT, EMPTY_GT]
    dets = [dt((A, 0.9), ((310, 150, 340, 230), 0.85), ((320, 200, 360, 300), 0.8), ((480, 150, 520, 230), 0.75),
               (B, 0.3)),
            dt(((50, 50, 90, 150), 0.5)), EMPTY_DT, EMPTY_DT]
    result = mr.evaluate_image(gts[0], dets[0], "Reasonable-all")
    assert result.kept.tolist() == [True, False, False, False, True]
    assert result.is_tp.tolist() == [True, False, False, False, True] and result.num_gt == 3
    fppi, miss = mr.evaluate_setting(gts, dets, "Reasonable-all")
    np.testing.assert_allclose(fppi, [0, 0.25, 0.25])
    np.testing.assert_allclose(miss, [2 / 3, 2 / 3, 1 / 3])
    expected = (2 / 3) ** (2 / 3) * (1 / 3) ** (1 / 3)
    assert mr.evaluate_miss_rate(gts, dets, settings=["Reasonable-all"])["Reasonable-all"] == pytest.approx(expected)


def test_overlap_of_exactly_one_half_matches():
    # GT (100,100,120,210): w 20, h 110, area 2200. A detection (100,100,120,155) has h 55: IoU = 1100 / 2200 = 0.5
    # -> TP, curve fppi [0], miss [0] -> clamped 1e-10 at every reference -> MR^-2 = 1e-10.
    # With h 54: IoU = 1080 / 2200 = 0.49 -> FP at fppi 1 with recall 0 -> miss 1 everywhere -> MR^-2 = 1.
    image = gt(((100, 100, 120, 210), "person"))
    boxes = mr.xyxy_to_ltwh([[100, 100, 120, 155], [100, 100, 120, 154], [100, 100, 120, 210]])
    gt_boxes = mr.xyxy_to_ltwh([[100, 100, 120, 210]])
    np.testing.assert_allclose(mr.overlaps(boxes, gt_boxes, np.array([False]))[:, 0], [0.5, 1080 / 2200, 1.0])
    assert mr.evaluate_image(image, dt(((100, 100, 120, 155), 0.9)), "Reasonable-all").is_tp.tolist() == [True]
    assert mr.evaluate_miss_rate([image], [dt(((100, 100, 120, 155), 0.9))])["Reasonable-all"] == pytest.approx(1e-10)
    assert mr.evaluate_miss_rate([image], [dt(((100, 100, 120, 154), 0.9))])["Reasonable-all"] == 1.0


def test_ids_starting_at_zero_are_matched_and_used_once():
    # Regression for ports that keep the matched GT id and read id 0 as "unmatched": detection 0 matches GT 0, the
    # duplicate detection 1 on GT 0 must then be a FP, detection 2 matches GT 1.
    # One image, 2 regular boxes: 0.9 TP, 0.8 FP, 0.7 TP -> fppi [0, 1, 1], miss [.5, .5, 0].
    # r_0..r_7 < 1 -> .5; r_8 = 1 -> last point with fppi <= 1 -> miss 0 -> 1e-10.
    # MR^-2 = exp((8 ln .5 + ln 1e-10) / 9) = 0.5^(8/9) * 10^(-10/9) ~ 0.0418.
    image = gt((A, "person"), (B, "person"))
    dets = dt((A, 0.9), (A, 0.8), (B, 0.7))
    result = mr.evaluate_image(image, dets, "Reasonable-all")
    assert result.is_tp.tolist() == [True, False, True] and result.kept.tolist() == [True, True, True]
    expected = 0.5 ** (8 / 9) * 10 ** (-10 / 9)
    assert mr.evaluate_miss_rate([image], [dets])["Reasonable-all"] == pytest.approx(expected)


def _never_reaches_low_fppi(num_empty):
    # Persons P and Q; the top detection is a FP, then P is found, Q is missed.
    image = gt((A, "person"), ((200, 100, 240, 200), "person"))
    dets = dt(((400, 100, 440, 200), 0.9), (A, 0.6))
    return [image] + [EMPTY_GT] * num_empty, [dets] + [EMPTY_DT] * num_empty


def test_images_without_people_count_in_the_fppi_denominator():
    # 1 image: fppi [1, 1], miss [1, .5]; only r_8 = 1 reaches a point -> MR^-2 = exp(ln .5 / 9) = 0.5^(1/9) ~ 0.9259.
    # 8 images (7 empty): fppi [.125, .125]; r_5..r_8 >= 0.178 reach it -> MR^-2 = 0.5^(4/9) ~ 0.7349.
    for num_empty, expected in ((0, 0.5 ** (1 / 9)), (7, 0.5 ** (4 / 9))):
        gts, dets = _never_reaches_low_fppi(num_empty)
        assert mr.evaluate_miss_rate(gts, dets)["Reasonable-all"] == pytest.approx(expected)


def test_curve_that_never_reaches_the_lowest_fppi_misses_everything_there():
    # Regression for an index of -1 returning the LAST recall: with 8 images the first point is at fppi 0.125, so
    # r_0..r_4 (<= 0.1) have no point -> recall 0 -> miss 1 (not 0.5); r_5..r_8 -> 0.5.
    gts, dets = _never_reaches_low_fppi(7)
    fppi, miss = mr.evaluate_setting(gts, dets, "Reasonable-all")
    np.testing.assert_allclose(fppi, [0.125, 0.125])
    np.testing.assert_allclose(mr.miss_rate_at_references(fppi, miss), [1] * 5 + [0.5] * 4)
    np.testing.assert_allclose(mr.miss_rate_at_references([0.5, 0.5], [1.0, 0.5], references=[0.4, 0.5]), [1, 0.5])


def test_no_detections_at_all_gives_one():
    # No kept detection: recall 0 at every reference -> miss 1 -> MR^-2 = exp(0) = 1.
    gts = [gt((A, "person"), (C, "person", 2)), EMPTY_GT]
    out = mr.evaluate_miss_rate(gts, [EMPTY_DT, EMPTY_DT])
    assert out["Reasonable-all"] == 1.0 and out["Occ=heavy"] == 1.0
    assert mr.log_average_miss_rate(np.zeros(0), np.zeros(0)) == 1.0


def test_perfect_detector_is_clamped_and_finite():
    # Regression for the missing 1e-10 clamp: every box found before any FP -> miss 0 at every reference
    # -> log(max(1e-10, 0)) = log(1e-10) -> MR^-2 = 1e-10, finite, and no divide-by-zero warning.
    gts = [gt((A, "person"), (B, "person")), EMPTY_GT]
    dets = [dt((A, 0.9), (B, 0.8)), dt(((300, 100, 340, 200), 0.1))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = mr.evaluate_miss_rate(gts, dets)["Reasonable-all"]
        assert mr.log_average_miss_rate([0.0], [0.0]) == pytest.approx(1e-10)
    assert math.isfinite(value) and value == pytest.approx(1e-10)


def test_day_night_split_uses_each_subset_image_count():
    # Day (images 0, 1): 2 persons, 0.9 TP, 0.8 FP -> fppi [0, .5], miss [.5, .5] -> MR^-2 = 0.5.
    # Night (images 2, 3): 2 persons, 0.95 FP, 0.4 TP -> fppi [.5, .5], miss [1, .5]; r_0..r_6 <= 0.316 -> 1,
    #   r_7, r_8 -> .5 -> MR^-2 = 0.5^(2/9) ~ 0.8572.
    # All (4 images, 4 persons): 0.95 FP, 0.9 TP, 0.8 FP, 0.4 TP -> fppi [.25, .25, .5, .5], miss [1, .75, .75, .5];
    #   r_0..r_5 -> 1, r_6 -> .75, r_7, r_8 -> .5 -> MR^-2 = (0.75 * 0.25)^(1/9) ~ 0.8301.
    q = (200, 100, 240, 200)
    gts = [gt((A, "person"), (q, "person")), EMPTY_GT, gt((A, "person"), (q, "person")), EMPTY_GT]
    dets = [dt((A, 0.9)), dt(((300, 100, 340, 200), 0.8)), dt(((400, 100, 440, 200), 0.95), (A, 0.4)), EMPTY_DT]
    out = mr.evaluate_miss_rate(gts, dets, image_conditions=["day", "day", "night", "night"])
    assert list(out) == list(mr.SETTINGS)
    assert out["Reasonable-day"] == pytest.approx(0.5)
    assert out["Reasonable-night"] == pytest.approx(0.5 ** (2 / 9))
    assert out["Reasonable-all"] == pytest.approx(0.1875 ** (1 / 9))
    assert "Reasonable-day" not in mr.evaluate_miss_rate(gts, dets)  # no conditions: only settings over all images
    with pytest.raises(ValueError, match="image_conditions"):
        mr.evaluate_miss_rate(gts, dets, settings=["Reasonable-night"])
    # A subset without images has no defined recall.
    assert math.isnan(mr.evaluate_miss_rate(gts[:2], dets[:2], image_conditions=["day"] * 2)["Reasonable-night"])


def test_label_rules_ignore_or_remove():
    labels = ["person", "people", "person?", "person?a", "cyclist", "dog"]
    image = gt(*[(A, label) for label in labels])
    boxes, ignore = mr.filter_ground_truth(image, "Reasonable-all")
    assert boxes.shape == (4, 4) and ignore.tolist() == [False, True, True, True]  # "person?a", "dog" removed
    np.testing.assert_allclose(boxes[0], [101, 101, 40, 100])
    _, ignore = mr.filter_ground_truth(image, "Reasonable-all", positive_labels=("person", "cyclist"),
                                       ignore_labels=("people",))
    assert ignore.tolist() == [False, True, False]  # person, people, cyclist; the rest removed
    _, ignore = mr.filter_ground_truth(gt((A, "person", 0, 1), (B, "person", 0, 0)), "Reasonable-all")
    assert ignore.tolist() == [True, False]  # the box's own ignore flag


def test_bound_check_in_bbgt_coordinates():
    # KAIST bounds: l >= 5, t >= 5, l + w <= 635, t + h <= 507 with l = x1 + 1, t = y1 + 1.
    boxes = [(4, 100, 44, 200), (3.5, 100, 43.5, 200),  # l = 5 kept, l = 4.5 out
             (594, 100, 634, 200), (594.5, 100, 634.5, 200),  # l + w = 635 kept, 635.5 out
             (100, 4, 140, 104), (100, 3, 140, 103),  # t = 5 kept, t = 4 out
             (100, 406, 140, 506), (100, 407, 140, 507)]  # t + h = 507 kept, 508 out
    _, ignore = mr.filter_ground_truth(gt(*[(b, "person") for b in boxes]), "Reasonable-all")
    assert ignore.tolist() == [False, True] * 4
    assert mr.image_bounds(width=640, height=512) == mr.KAIST_BOUNDS
    _, ignore = mr.filter_ground_truth(gt(((4, 4, 94, 94), "person")), "Occ=none",
                                       bounds=mr.image_bounds(width=100, height=100))
    assert ignore.tolist() == [False]


def test_height_range_is_inclusive_and_occlusion_filtered():
    def heights_ignored(heights, setting, occlusion=0):
        image = gt(*[((100, 100, 120, 100 + h), "person", occlusion) for h in heights])
        return mr.filter_ground_truth(image, setting)[1].tolist()

    assert heights_ignored([55, 54.5, 400], "Reasonable-all") == [False, True, False]
    assert heights_ignored([45, 115, 44.9, 115.5], "Scale=medium") == [False, False, True, True]
    assert heights_ignored([115, 114.5], "Scale=near") == [False, True]
    assert heights_ignored([1, 45, 45.5], "Scale=far") == [False, False, True]
    image = gt((A, "person", 0), (B, "person", 1), (C, "person", 2))
    expected = {"Reasonable-all": [False, False, True], "Scale=far": [True, True, True],
                "Occ=none": [False, True, True], "Occ=partial": [True, False, True], "Occ=heavy": [True, True, False]}
    for name, ignore in expected.items():
        assert mr.filter_ground_truth(image, name)[1].tolist() == ignore, name


def test_detection_height_filter_with_margin():
    # Reasonable [55, inf] -> detections kept for 55 / 1.25 = 44 <= h; Scale=medium [45, 115] -> 36 <= h < 143.75.
    def kept(heights, setting, **kwargs):
        dets = dt(*[((100, 100, 120, 100 + h), 0.5) for h in heights])
        return mr.evaluate_image(EMPTY_GT, dets, setting, **kwargs).kept.tolist()

    assert kept([44, 43.5, 1000], "Reasonable-all", det_height_margin=1.25) == [True, False, True]
    assert kept([36, 35.5, 143.5, 143.75], "Scale=medium", det_height_margin=1.25) == [True, False, True, False]
    assert kept([1, 1000], "Scale=medium") == [True, True]  # kaist_eval_full.m: no detection filter
    # A small FP (h 40) ahead of the only TP: filtered -> perfect (1e-10); unfiltered -> fppi 1 before the TP, so
    # only r_8 = 1 sees miss 0 -> MR^-2 = exp(ln(1e-10) / 9) = 10^(-10/9) ~ 0.0774.
    gts, dets = [gt((A, "person"))], [dt(((300, 100, 320, 140), 0.9), (A, 0.5))]
    assert mr.evaluate_miss_rate(gts, dets, det_height_margin=1.25)["Reasonable-all"] == pytest.approx(1e-10)
    unfiltered = mr.evaluate_miss_rate(gts, dets)["Reasonable-all"]
    assert unfiltered == pytest.approx(10 ** (-10 / 9))


def test_ltwh_input_and_conversion():
    np.testing.assert_allclose(mr.xyxy_to_ltwh([[10, 20, 30, 60]]), [[11, 21, 20, 40]])
    image = {"boxes": [[101, 101, 40, 100]], "labels": ["person"], "occlusion": [0]}
    dets = {"boxes": [[101, 101, 40, 100]], "scores": [0.5]}
    assert mr.evaluate_image(image, dets, "Reasonable-all", box_format="ltwh").is_tp.tolist() == [True]


def test_bad_input_raises_clear_errors():
    image, dets = gt((A, "person")), dt((A, 0.5))
    cases = [
        (lambda: mr.evaluate_image({**image, "boxes": [1, 2, 3]}, dets, "Reasonable-all"), r"shape \(N, 4\)"),
        (lambda: mr.evaluate_image({**image, "labels": []}, dets, "Reasonable-all"), "labels"),
        (lambda: mr.evaluate_image({**image, "occlusion": [0, 1]}, dets, "Reasonable-all"), "occlusion"),
        (lambda: mr.evaluate_image({"boxes": image["boxes"]}, dets, "Reasonable-all"), "labels"),
        (lambda: mr.evaluate_image(image, {**dets, "scores": [0.1, 0.2]}, "Reasonable-all"), "scores"),
        (lambda: mr.evaluate_image(image, {**dets, "scores": [np.nan]}, "Reasonable-all"), "finite"),
        (lambda: mr.evaluate_image(image, {"scores": [0.5]}, "Reasonable-all"), "boxes"),
        (lambda: mr.evaluate_image(image, dets, "Reasonable"), "unknown setting"),
        (lambda: mr.evaluate_image(image, dets, "Reasonable-all", box_format="xywh"), "box_format"),
        (lambda: mr.xyxy_to_ltwh([[10, 10, 5, 20]]), "x2 >= x1"),
        (lambda: mr.evaluate_miss_rate([image], [dets, dets]), "gts has 1 images"),
        (lambda: mr.evaluate_miss_rate([image], [dets], image_conditions=["dusk"]), "day"),
        (lambda: mr.miss_rate_at_references([0.1], [0.5, 0.2]), "same length"),
        (lambda: mr.miss_rate_curve([]), "at least one image"),
        (lambda: mr.evaluate_setting([EMPTY_GT], [dets], "Reasonable-all"), "recall is undefined"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_plot_writes_a_png(tmp_path):
    from PIL import Image

    gts, dets = _never_reaches_low_fppi(7)
    path = mr.plot_miss_rate({"toy": mr.evaluate_setting(gts, dets, "Reasonable-all")}, tmp_path / "mr.png",
                             title="Reasonable-all")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100


# ---- brute force, written from the protocol text without the module's code --------------------------------------

PROTOCOL = {  # name: (height lo, height hi, allowed occlusion, subset)
    "Reasonable-all": (55, math.inf, {0, 1}, "all"), "Reasonable-day": (55, math.inf, {0, 1}, "day"),
    "Reasonable-night": (55, math.inf, {0, 1}, "night"), "Scale=near": (115, math.inf, {0}, "all"),
    "Scale=medium": (45, 115, {0}, "all"), "Scale=far": (1, 45, {0}, "all"), "Occ=none": (1, math.inf, {0}, "all"),
    "Occ=partial": (1, math.inf, {1}, "all"), "Occ=heavy": (1, math.inf, {2}, "all"),
}


def _intersection(a, b):  # a, b: (l, t, w, h)
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _brute_force(gts, dets, name, conditions, margin=None):
    lo, hi, occlusions, subset = PROTOCOL[name]
    images = [i for i in range(len(gts)) if subset == "all" or conditions[i] == subset]
    outcomes, positives = [], 0  # (score, is true positive) of every counted detection
    for i in images:
        regular, ignored = [], []
        for (x1, y1, x2, y2), label, occ, own in zip(gts[i]["boxes"], gts[i]["labels"], gts[i]["occlusion"],
                                                     gts[i]["ignore"]):
            if label not in ("person", "people", "person?", "cyclist"):
                continue
            box = (x1 + 1, y1 + 1, x2 - x1, y2 - y1)
            inside = box[0] >= 5 and box[1] >= 5 and box[0] + box[2] <= 635 and box[1] + box[3] <= 507
            good = label == "person" and not own and lo <= box[3] <= hi and occ in occlusions and inside
            (regular if good else ignored).append(box)
        positives += len(regular)
        taken = set()
        for score, (x1, y1, x2, y2) in sorted(zip(dets[i]["scores"], dets[i]["boxes"]), key=lambda p: -p[0]):
            box = (x1 + 1, y1 + 1, x2 - x1, y2 - y1)
            if margin is not None and not lo / margin <= box[3] < hi * margin:
                continue
            ious = [(_intersection(box, g) / (box[2] * box[3] + g[2] * g[3] - _intersection(box, g)), j)
                    for j, g in enumerate(regular) if j not in taken]
            ious = [p for p in ious if p[0] >= 0.5]
            if ious:
                taken.add(max(ious)[1])
                outcomes.append((score, True))
            elif not any(_intersection(box, g) / (box[2] * box[3]) >= 0.5 for g in ignored):
                outcomes.append((score, False))
    if not images or positives == 0:
        return math.nan
    points = []  # (fppi, recall) at every score threshold, +inf first (no detection yet)
    for threshold in [math.inf] + sorted({s for s, _ in outcomes}, reverse=True):
        tp = sum(1 for s, ok in outcomes if s >= threshold and ok)
        fp = sum(1 for s, ok in outcomes if s >= threshold and not ok)
        points.append((fp / len(images), tp / positives))
    logs = [math.log(max(1e-10, 1 - max(r for f, r in points if f <= ref))) for ref in REFS]
    return math.exp(sum(logs) / len(logs))


def _random_dataset(seed, num_images=30, grid=False):
    """Random persons (some ignored, removed, occluded, out of bounds), noisy detections of 70 % of them and a few
    false positives; grid=True snaps boxes to whole pixels and scores to tenths, so exact overlaps and ties occur."""
    rng = np.random.default_rng(seed)
    labels = ["person"] * 6 + ["people", "person?", "person?a", "cyclist", "dog"]
    gts, dets = [], []
    for _ in range(num_images):
        n = int(rng.integers(0, 6))
        h = rng.uniform(20, 200, n)
        x1, y1 = rng.uniform(-5, 620, n), rng.uniform(-5, 420, n)
        boxes = np.stack([x1, y1, x1 + 0.41 * h * rng.uniform(0.8, 1.2, n), y1 + h], axis=1)
        if grid:
            boxes = np.round(boxes)
        gts.append({"boxes": boxes, "labels": [labels[k] for k in rng.integers(0, len(labels), n)],
                    "occlusion": rng.integers(0, 3, n), "ignore": (rng.random(n) < 0.1).astype(int)})
        found = boxes[rng.random(n) < 0.7]
        found = found + rng.normal(0, 4, found.shape)
        m = int(rng.integers(0, 4))
        fh = rng.uniform(15, 220, m)
        fx, fy = rng.uniform(0, 600, m), rng.uniform(0, 400, m)
        false = np.stack([fx, fy, fx + 0.41 * fh, fy + fh], axis=1)
        all_boxes = np.concatenate([found, false]).reshape(-1, 4)
        if grid:
            all_boxes = np.round(all_boxes)
        all_boxes[:, 2:] = np.maximum(all_boxes[:, 2:], all_boxes[:, :2] + 1)
        scores = rng.random(len(all_boxes))
        dets.append({"boxes": all_boxes, "scores": np.round(scores, 1) if grid else scores})
    conditions = list(rng.choice(["day", "night"], num_images))
    return gts, dets, conditions


@pytest.mark.parametrize("seed, margin", [(0, None), (1, None), (2, 1.25), (3, 1.25)])
def test_matches_an_independent_brute_force(seed, margin):
    gts, dets, conditions = _random_dataset(seed)
    out = mr.evaluate_miss_rate(gts, dets, image_conditions=conditions, det_height_margin=margin)
    expected = {name: _brute_force(gts, dets, name, conditions, margin) for name in PROTOCOL}
    assert list(out) == list(expected)
    np.testing.assert_allclose([out[k] for k in out], [expected[k] for k in out], rtol=1e-12)
    assert sum(0 < v < 1 for v in out.values()) >= 5  # the fixtures exercise the interesting range


def _coco(images, annotations):
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}]}


def test_coco_inputs_labels_bounds_and_conditions():
    images = [{"id": 2, "width": 100, "height": 80, "daytime": "night"},
              {"id": 1, "width": 640, "height": 512, "daytime": "day"}]
    annotations = [{"image_id": 1, "category_id": 1, "bbox": [10, 20, 30, 60], "iscrowd": 0, "occlusion": 1},
                   {"image_id": 1, "category_id": 1, "bbox": [200, 20, 30, 60], "iscrowd": 1},
                   {"image_id": 1, "category_id": 1, "bbox": [300, 20, 30, 60], "iscrowd": 1, "kaist_label": "cyclist",
                    "ignore": 1},
                   {"image_id": 2, "category_id": 2, "bbox": [1, 2, 3, 4], "iscrowd": 0}]
    results = [{"image_id": 2, "category_id": 1, "bbox": [5, 5, 10, 20], "score": 0.5},
               {"image_id": 1, "category_id": 2, "bbox": [5, 5, 10, 20], "score": 0.9}]
    gts, dets, conditions = mr.coco_inputs(_coco(images, annotations), results)
    assert conditions == ["day", "night"]  # images in id order
    assert gts[0]["labels"] == ["person", "people", "cyclist"] and gts[1]["labels"] == ["car"]
    np.testing.assert_allclose(gts[0]["boxes"][0], [10, 20, 40, 80])
    assert gts[0]["occlusion"] == [1, 0, 0] and gts[0]["ignore"] == [0, 0, 1]
    assert gts[0]["bounds"] == mr.KAIST_BOUNDS and gts[1]["bounds"] == (5, 5, 95, 75)
    assert dets[0]["boxes"].shape == (0, 4)  # the car detection is not a person's
    np.testing.assert_allclose(dets[1]["boxes"], [[5, 5, 15, 25]])
    with pytest.raises(ValueError, match="no 'dog' category"):
        mr.coco_inputs(_coco(images, annotations), results, category="dog")


def test_coco_miss_rate_of_the_ground_truth_itself_is_the_floor():
    # Tall persons (h 100 >= 55, inside the bounds) found exactly, at any score: miss 0 everywhere -> 1e-10 = 1e-8 %.
    images = [{"id": i, "width": 640, "height": 512, "daytime": d} for i, d in ((1, "day"), (2, "night"), (3, "day"))]
    annotations = [{"image_id": i, "category_id": 1, "bbox": [50.0 * i, 100, 40, 100], "iscrowd": 0}
                   for i in (1, 2, 3)]
    results = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9} for a in annotations]
    values, curves = mr.coco_miss_rate(_coco(images, annotations), results)
    assert values["Reasonable-all"] == pytest.approx(1e-8) and values["Reasonable-night"] == pytest.approx(1e-8)
    assert math.isnan(values["Scale=far"])  # no person 1-45 px tall: undefined, not 0
    assert set(curves) == {"Reasonable-all", "Reasonable-day", "Reasonable-night"}
    # No detections: miss 1 at every reference -> 100 %.
    assert mr.coco_miss_rate(_coco(images, annotations), [])[0]["Reasonable-all"] == pytest.approx(100.0)
    assert "Reasonable-all" in mr.format_table(values)
