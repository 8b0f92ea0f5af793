"""KAIST log-average miss rate: minimask.miss_rate against the reference `bbGt.m` run under GNU Octave.

The reference is Piotr Dollár's Computer Vision Matlab Toolbox, detector/bbGt.m (https://github.com/pdollar/toolbox;
checked with its commit e873326 of 2018-04-02 under Octave 7.3), called as `kaist_eval_full.m` calls it:

    [gt, dt] = bbGt('evalRes', gt, dt, .5, 0);                  % per image: gt [x y w h ignore], dt [x y w h score]
    [fp, tp, score, miss] = bbGt('compRoc', gt, dt, 1, 10.^(-2:.25:0));
    mr = exp(mean(log(max(1e-10, 1 - miss))));                   % compRoc's 4th output is the RECALL at each FPPI

For each fixture (hand-built images: regular persons, the ignored labels people / person? / cyclist, removed labels,
overlaps of exactly 0.5, equal overlaps, an ignored region absorbing several detections, images without people,
no detections, tied scores, day / night subsets; and seeded random datasets) and each of the 9 settings, the ground
truth goes to bbGt after minimask's own filtering (`filter_ground_truth`: bbGt's `bbLoad` step is not under test),
the detections as minimask's boxes converted by `xyxy_to_ltwh`, unfiltered (kaist_eval_full.m has no detection height
filter). The test then checks, to 1e-6 absolute, that `evaluate_miss_rate` gives bbGt's MR^-2, that
`evaluate_setting` gives compRoc's curve (fppi = fp, miss = 1 - tp) and `miss_rate_at_references` 1 - compRoc's
reference values, and that `match_image` gives evalRes's match flags (dt(:, 6)) for every detection. A setting
where minimask reports NaN (no regular box) must have no regular box in bbGt either (np = 0); its value is not
compared (bbGt divides by zero there).

Data go to Octave through text files written with 17 significant digits (exact round trip); one Octave process runs
every case (about 3 s in all). The test is skipped unless `octave` is on the PATH and MINIMASK_BBGT_DIR names a folder
holding bbGt.m (evalRes and compRoc need no other toolbox file). To run it (Debian / Ubuntu):

    apt-get install -y --no-install-recommends octave
    git clone https://github.com/pdollar/toolbox pdollar-toolbox    # outside this repository; never commit it
    MINIMASK_BBGT_DIR=pdollar-toolbox/detector python -m pytest -q tests/test_miss_rate_octave.py
"""
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minimask import miss_rate as mr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_miss_rate import A, B, C, EMPTY_DT, EMPTY_GT, REGION, _random_dataset, dt, gt  # noqa: E402

TOL = 1e-6

Q = (200, 100, 240, 200)


def _fixtures():
    """name -> (gts, dets, image_conditions)."""
    f = {}
    # Persons A, B, C and the ignored region R; three detections inside R (the last at intersection / detection
    # area = 0.5 exactly) are absorbed; images 1-3 hold no person (image 1 one FP) and count in FPPI.
    f["ignored_region_absorbs"] = (
        [gt((A, "person"), (B, "person"), (REGION, "people"), (C, "person")), EMPTY_GT, EMPTY_GT, EMPTY_GT],
        [dt((A, 0.9), ((310, 150, 340, 230), 0.85), ((320, 200, 360, 300), 0.8), ((480, 150, 520, 230), 0.75),
            (B, 0.3)), dt(((50, 50, 90, 150), 0.5)), EMPTY_DT, EMPTY_DT],
        ["day", "night", "day", "night"])
    # IoU exactly 0.5 (h 55 on a 20 x 110 box) matches, 0.49 (h 54) does not; ignored boxes by each ignored label
    # with intersection / detection area exactly 0.5 and just below.
    tall = (100, 100, 120, 210)
    f["overlap_exactly_half"] = (
        [gt((tall, "person")), gt((tall, "person")), gt((tall, "person"), ((300, 100, 340, 300), "person?")),
         gt(((300, 100, 340, 300), "cyclist"), ((400, 100, 440, 300), "people"))],
        [dt(((100, 100, 120, 155), 0.9)), dt(((100, 100, 120, 154), 0.8)),
         dt(((320, 150, 360, 250), 0.7), (tall, 0.6)),
         dt(((320, 150, 360, 250), 0.65), ((420.5, 150, 460.5, 250), 0.4))],
        ["day", "day", "night", "night"])
    # Equal overlaps (0.6) with two regular boxes: the LATER box wins, so the exact detection of that box that follows
    # is a false positive. Image 1 holds the same boxes in the other order.
    g1, g2, between = (100, 100, 140, 200), (120, 100, 160, 200), (110, 100, 150, 200)
    f["equal_overlap_later_box_wins"] = (
        [gt((g1, "person"), (g2, "person")), gt((g2, "person"), (g1, "person"))],
        [dt((between, 0.9), (g2, 0.8)), dt((between, 0.9), (g2, 0.8))],
        ["day", "night"])
    # A detection on an already matched box is a FP; ids starting at zero.
    f["duplicate_on_one_box"] = ([gt((A, "person"), (B, "person"))], [dt((A, 0.9), (A, 0.8), (B, 0.7))], ["day"])
    # Regular boxes are preferred to ignored ones even at a lower overlap; an ignored box listed first in the input;
    # the duplicate on A falls to the region; an own-ignore-flag person absorbs a detection too.
    big = (90, 90, 300, 300)
    f["regular_preferred_over_ignored"] = (
        [gt((big, "people"), (A, "person"), ((400, 100, 440, 200), "person", 0, 1)), EMPTY_GT],
        [dt(((104, 100, 144, 200), 0.9), (A, 0.8), ((118, 100, 158, 200), 0.7), ((400, 100, 440, 200), 0.6),
            ((600, 10, 630, 80), 0.5)), dt(((10, 10, 50, 110), 0.95))],
        ["night", "night"])
    # The first point is at FPPI 0.125 (8 images, 7 without people): low references see no point (miss 1).
    f["never_reaches_low_fppi"] = (
        [gt((A, "person"), (Q, "person"))] + [EMPTY_GT] * 7,
        [dt(((400, 100, 440, 200), 0.9), (A, 0.6))] + [EMPTY_DT] * 7,
        ["day"] * 4 + ["night"] * 4)
    f["no_detections"] = ([gt((A, "person"), (C, "person", 2)), EMPTY_GT], [EMPTY_DT, EMPTY_DT], ["day", "night"])
    f["perfect_detector"] = (
        [gt((A, "person"), (B, "person")), EMPTY_GT],
        [dt((A, 0.9), (B, 0.8)), dt(((300, 100, 340, 200), 0.1))], ["day", "day"])
    # Only ignored or removed labels: no regular box anywhere (minimask NaN, bbGt np = 0).
    f["no_regular_box"] = (
        [gt((A, "people"), (B, "dog")), gt((C, "cyclist"))], [dt((A, 0.9), (B, 0.5)), dt(((10, 10, 50, 110), 0.3))],
        ["day", "night"])
    f["day_night_split"] = (
        [gt((A, "person"), (Q, "person")), EMPTY_GT, gt((A, "person"), (Q, "person")), EMPTY_GT],
        [dt((A, 0.9)), dt(((300, 100, 340, 200), 0.8)), dt(((400, 100, 440, 200), 0.95), (A, 0.4)), EMPTY_DT],
        ["day", "day", "night", "night"])
    # Every label rule, bound edge, height border and occlusion level, each box detected (plus two FPs).
    objects = [(A, "person", 0), (B, "person", 1), (C, "person", 2), ((300, 100, 340, 200), "people"),
               ((350, 100, 390, 200), "person?"), ((400, 100, 440, 200), "person?a"), ((450, 100, 490, 200), "cyclist"),
               ((500, 300, 540, 400), "dog"), ((100, 300, 140, 400), "person", 0, 1),
               ((4, 300, 44, 400), "person"), ((3.5, 300, 43.5, 400), "person", 1), ((594, 300, 634, 400), "person"),
               ((594.5, 200, 634.5, 300), "person"), ((200, 4, 240, 104), "person"), ((250, 3, 290, 103), "person"),
               ((300, 406, 340, 506), "person"), ((350, 407, 390, 507), "person")]
    heights = [55, 54.5, 45, 44.9, 115, 115.5, 114.5, 1, 45.5]
    objects += [((20 + 30 * k, 420 - h, 40 + 30 * k, 420), "person", k % 2) for k, h in enumerate(heights)]
    rng = np.random.default_rng(7)
    found = [(o[0], float(s)) for o, s in zip(objects, rng.random(len(objects)))]
    f["labels_bounds_heights_occlusion"] = (
        [gt(*objects), EMPTY_GT],
        [dt(*found, ((560, 20, 600, 120), 0.55), ((150, 220, 190, 320), 0.45)), dt(((60, 60, 100, 160), 0.5))],
        ["day", "night"])
    # Tied scores within and across images: the order (images in order, then input order) decides the curve.
    f["tied_scores"] = (
        [gt((A, "person"), (B, "person")), gt((A, "person")), EMPTY_GT],
        [dt(((400, 100, 440, 200), 0.5), (A, 0.5), (B, 0.5)), dt((A, 0.5), ((300, 100, 340, 200), 0.5)),
         dt(((300, 100, 340, 200), 0.5))],
        ["day", "night", "day"])
    # Per-image bounds (a 100 x 80 image: [5, 95] x [5, 75]) next to a KAIST frame.
    f["per_image_bounds"] = (
        [gt(((4, 4, 44, 74), "person"), ((50, 10, 90, 75), "person"), bounds=mr.image_bounds(width=100, height=80)),
         gt((A, "person"))],
        [dt(((4, 4, 44, 74), 0.8), ((50, 10, 90, 75), 0.7)), dt((A, 0.6))],
        ["day", "night"])
    for seed in range(6):
        f[f"random_seed{seed}"] = _random_dataset(seed)
    for seed in (10, 11, 12):
        f[f"random_grid_seed{seed}"] = _random_dataset(seed, num_images=60, grid=True)
    return f


FIXTURES = _fixtures()

# ---- Octave driver ------------------------------------------------------------------------------------------------

OCTAVE_SCRIPT = r"""
addpath('{bbgt_dir}');
fid = fopen('cases.txt'); K = fscanf(fid, '%f', [2 Inf])'; fclose(fid);
fid = fopen('gt.txt'); G = fscanf(fid, '%f', [7 Inf])'; fclose(fid); if isempty(G), G = zeros(0, 7); end
fid = fopen('dt.txt'); D = fscanf(fid, '%f', [7 Inf])'; fclose(fid); if isempty(D), D = zeros(0, 7); end
ref = 10.^(-2:.25:0);
fo = fopen('mr.txt', 'w'); ff = fopen('flags.txt', 'w'); fc = fopen('curve.txt', 'w');
for r = 1:size(K, 1)
  c = K(r, 1); n = K(r, 2);
  Gc = G(G(:, 1) == c, :); Dc = D(D(:, 1) == c, :);
  gt0 = cell(1, n); dt0 = cell(1, n);
  for i = 1:n
    gt0{{i}} = Gc(Gc(:, 2) == i, 3:7); dt0{{i}} = Dc(Dc(:, 2) == i, 3:7);
  end
  [gt, dt] = bbGt('evalRes', gt0, dt0, 0.5, 0);
  [fp, tp, score, miss] = bbGt('compRoc', gt, dt, 1, ref);
  m = exp(mean(log(max(1e-10, 1 - miss))));
  allg = cat(1, gt{{:}}); alld = cat(1, dt{{:}});
  np = sum(allg(:, 5) ~= -1); nkept = sum(alld(:, 6) ~= -1);
  fprintf(fo, '%d %d %d %d %.17g', c, n, np, nkept, m); fprintf(fo, ' %.17g', miss); fprintf(fo, '\n');
  fprintf(fc, '%d %.17g %.17g\n', [repmat(c, 1, numel(fp)); fp(:)'; tp(:)']);
  for i = 1:n
    % evalRes returns the detections sorted by its own sort; undo that sort to get the input order back.
    [~, ord] = sort(dt0{{i}}(:, 5), 'descend');
    assert(isequal(dt{{i}}(:, 1:5), dt0{{i}}(ord, :)));
    flags = zeros(numel(ord), 1); flags(ord) = dt{{i}}(:, 6);
    fprintf(ff, '%d %d %d %d\n', [repmat([c; i], 1, numel(ord)); 1:numel(ord); flags']);
  end
end
fclose(fo); fclose(ff); fclose(fc);
fid = fopen('done.txt', 'w'); fprintf(fid, 'ok\n'); fclose(fid);
"""


def _bbgt_dir():
    """The folder holding bbGt.m, or skip the test with the reason."""
    if shutil.which("octave") is None:
        pytest.skip("GNU Octave is not installed (apt-get install octave)")
    folder = os.environ.get("MINIMASK_BBGT_DIR")
    if not folder:
        pytest.skip("MINIMASK_BBGT_DIR is not set (a folder holding Dollar's toolbox detector/bbGt.m)")
    if not (Path(folder) / "bbGt.m").is_file():
        pytest.skip(f"MINIMASK_BBGT_DIR={folder!r} holds no bbGt.m")
    return Path(folder).resolve()


def _rows(lines, values):
    lines.append(" ".join(v if isinstance(v, str) else format(float(v), ".17g") for v in values))


def _build_cases():
    """Cases (fixture x setting with at least one image), each with minimask's own answers, and the text inputs."""
    cases, case_lines, gt_lines, dt_lines = [], [], [], []
    for name, (gts, dets, conditions) in FIXTURES.items():
        values = mr.evaluate_miss_rate(gts, dets, image_conditions=conditions)
        for setting in mr.SETTINGS.values():
            images = [i for i in range(len(gts)) if setting.subset in ("all", conditions[i])]
            case = {"id": len(cases) + 1, "fixture": name, "setting": setting.name, "images": images,
                    "mr": values[setting.name], "flags": []}
            cases.append(case)
            if not images:
                continue
            _rows(case_lines, [str(case["id"]), str(len(images))])
            for k, i in enumerate(images, start=1):
                boxes, ignore = mr.filter_ground_truth(gts[i], setting)
                for box, ign in zip(boxes, ignore):
                    _rows(gt_lines, [str(case["id"]), str(k), *box, str(int(ign))])
                det_boxes = mr.xyxy_to_ltwh(dets[i]["boxes"])
                scores = np.asarray(dets[i]["scores"], dtype=np.float64)
                for box, score in zip(det_boxes, scores):
                    _rows(dt_lines, [str(case["id"]), str(k), *box, score])
                case["flags"].append(mr.match_image(det_boxes=det_boxes, det_scores=scores, gt_boxes=boxes,
                                                    gt_ignore=ignore))
            if not math.isnan(case["mr"]):
                fppi, miss = mr.evaluate_setting(gts, dets, setting, image_conditions=conditions)
                case["curve"] = (fppi, miss)
                case["at_refs"] = mr.miss_rate_at_references(fppi, miss)
    return cases, {"cases.txt": case_lines, "gt.txt": gt_lines, "dt.txt": dt_lines}


@pytest.fixture(scope="module")
def octave_results(tmp_path_factory):
    """Run bbGt over every case in one Octave process; returns (cases, {case id: bbGt's outputs})."""
    bbgt_dir = _bbgt_dir()
    work = tmp_path_factory.mktemp("bbgt")
    cases, inputs = _build_cases()
    for file_name, lines in inputs.items():
        (work / file_name).write_text("".join(line + "\n" for line in lines))
    script = work / "run_bbgt.m"
    script.write_text(OCTAVE_SCRIPT.format(bbgt_dir=str(bbgt_dir).replace("'", "''")))
    proc = subprocess.run(["octave", "--no-gui", "--no-window-system", "--norc", "--quiet", str(script)], cwd=work,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and (work / "done.txt").is_file(), f"Octave failed:\n{proc.stdout}\n{proc.stderr}"
    out = {}
    for line in (work / "mr.txt").read_text().splitlines():
        v = [float(x) for x in line.split()]
        out[int(v[0])] = {"n": int(v[1]), "np": int(v[2]), "nkept": int(v[3]), "mr": v[4],
                          "recall_at_refs": np.array(v[5:]), "fp": [], "tp": [], "flags": {}}
    for line in (work / "curve.txt").read_text().splitlines():
        c, fp, tp = line.split()
        out[int(c)]["fp"].append(float(fp))
        out[int(c)]["tp"].append(float(tp))
    for line in (work / "flags.txt").read_text().splitlines():
        c, i, j, flag = map(int, line.split())
        out[c]["flags"].setdefault(i, []).append((j, flag))
    return cases, out


def _compare(case, res):
    """Assertion messages for one case ([] when minimask agrees with bbGt); also the largest value difference."""
    errors, largest = [], 0.0
    label = f"{case['fixture']} / {case['setting']}"
    assert res["n"] == len(case["images"])
    for k, flags in enumerate(case["flags"], start=1):
        got = [f for _, f in sorted(res["flags"].get(k, []))]
        if got != flags.tolist():
            errors.append(f"{label} image {case['images'][k - 1]}: match flags bbGt {got} minimask {flags.tolist()}")
    if math.isnan(case["mr"]):
        if res["np"] != 0:
            errors.append(f"{label}: minimask NaN but bbGt has {res['np']} regular boxes (MR^-2 {res['mr']})")
        return errors, largest
    fppi, miss = case["curve"]
    if len(fppi) != res["nkept"]:
        errors.append(f"{label}: {len(fppi)} kept detections in minimask, {res['nkept']} in bbGt")
    elif len(fppi):  # compRoc returns the single point (0, 0) when no detection is kept
        diff = max(np.abs(fppi - res["fp"]).max(), np.abs(miss - (1 - np.array(res["tp"]))).max())
        largest = max(largest, diff)
        if diff > TOL:
            errors.append(f"{label}: curves differ by {diff:.3g}")
    diff = float(np.abs(case["at_refs"] - (1 - res["recall_at_refs"])).max())
    largest = max(largest, diff)
    if diff > TOL:
        errors.append(f"{label}: miss at the references minimask {case['at_refs']} bbGt {1 - res['recall_at_refs']}")
    diff = abs(case["mr"] - res["mr"])
    largest = max(largest, diff)
    if diff > TOL:
        errors.append(f"{label}: MR^-2 minimask {case['mr']!r} bbGt {res['mr']!r}")
    return errors, largest


@pytest.mark.parametrize("fixture", list(FIXTURES))
def test_minimask_agrees_with_bbgt(octave_results, fixture):
    cases, results = octave_results
    errors, checked = [], 0
    for case in cases:
        if case["fixture"] != fixture:
            continue
        if not case["images"]:  # a subset without images: nothing for bbGt to evaluate
            assert math.isnan(case["mr"])
            continue
        errors += _compare(case, results[case["id"]])[0]
        checked += 1
    assert checked >= 7 and not errors, "\n".join(errors)


def test_the_fixtures_exercise_the_interesting_range(octave_results):
    cases, results = octave_results
    compared = [c for c in cases if c["images"] and not math.isnan(c["mr"])]
    assert sum(0 < c["mr"] < 1 for c in compared) >= 50  # neither all perfect nor all missed
    flags = np.concatenate([f for c in cases for f in c["flags"]])
    assert {-1, 0, 1} <= set(flags.tolist())  # absorbed, false and true positives all occur
    largest = max(_compare(c, results[c["id"]])[1] for c in compared)
    assert largest <= TOL
