"""A generated miniature KAIST: aligned visible + thermal frames of stick-figure pedestrians, in KAIST's layout.

It lets the KAIST converter (`minimask.data.kaist`), training on visible / thermal / both and the miss-rate
evaluation (`minimask.miss_rate`) run end to end on a CPU in minutes with nothing downloaded. Layout (KAIST's):

    <root>/images/setXX/V000/{visible,lwir}/IZZZZZ.jpg   RGB frame / thermal frame (8-bit greyscale, mode "L")
    <root>/annotations/setXX/V000/IZZZZZ.txt             bbGt version 3 (see kaist.py), every ign flag 0 as in KAIST
    <root>/imageSets/train-all-02.txt, test-all-20.txt   image lists, one setXX/V000/IZZZZZ a line

Training frames lie in set00-05, test frames in set06-11, the first half of each split in day sets (00-02, 06-08),
the second half in night sets (03-05, 09-11); frame numbers step by 2 and 20, as the lists' names say.

Generation spec (fixed; it is data, not a knob to tune against a model):
- scene: sky / road gradients split at a horizon, smooth texture, 3..8 buildings or trees, 0..2 cars (warm engine
  end), 0..2 street lamps (hot; lit in the visible frame at night);
- persons: none in ~12 % of frames, else 1..6 upright stick figures (synthetic.py's) squeezed to w/h ~0.41, nominal
  height log-uniform in 30..220 px (~30 % under the Reasonable setting's 55 px), feet below the horizon, some cut
  by the frame's sides. Figures never overlap, so the only occlusion is the annotated one: ~30 % of persons stand
  behind an occluder hiding the bottom 15..75 % of the box (occlusion 1 up to half hidden, else 2; visible box);
- ignore labels: a `people` box around 2..4 small overlapping figures (~15 % of frames), a faint `person?` (~12 %),
  a `cyclist` (a figure on two wheels, ~10 %);
- visible: random clothing colours; at night the frame is scaled to 10..20 % brightness plus sensor noise, so
  persons are barely visible. Thermal: persons at 180..240 on a ~50..130 background that is warmer (less contrast)
  by day, warm distractors, blur and noise. Both frames come from one drawing, so every box fits both;
- boxes: tight boxes of the figures' pixels inside the frame; pixel columns x0..x1-1 are bbGt l = x0 + 1, w = x1 - x0.

Every frame is a pure function of (seed, split, index) through numpy's SeedSequence and pillow's JPEG encoder is
deterministic at a fixed quality, so equal parameters give byte-identical files.

What it can stand for: a smoke test of the plumbing (both modalities, bbGt labels, occlusion and ignore handling,
day / night subsets, MR^-2) and a sanity check that a model picks up warm-person cues in thermal and suffers in dark
visible frames. What it cannot: any evidence about real thermal imagery, real pedestrians or KAIST numbers.
"""
from __future__ import annotations

import argparse
import io
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from minimask.data.kaist import BBGT_HEADER, convert_kaist, daytime, read_bbgt, read_image_list
from minimask.data.synthetic import _atomic_write_bytes, _draw_person, _person_keypoints, default_cache_dir

VERSION = "synthetic-kaist-v1"
SPLITS = {"train": (0, range(0, 6), 2, "train-all-02.txt"),  # split code, sets, frame step, list file
          "test": (1, range(6, 12), 20, "test-all-20.txt")}
HEIGHT_RANGE = (30.0, 220.0)  # nominal person height, px, log-uniform
ASPECT_RANGE = (0.36, 0.46)  # box w / h; Caltech and KAIST boxes are 0.41 h wide
JPEG_QUALITY = 90
# The defaults (480 + 120 frames, ~1750 persons, 62 MB on disk) build in 21-25 s (one process, 2-core CPU, measured).
DEFAULT_TRAIN_FRAMES, DEFAULT_TEST_FRAMES = 480, 120
LAMP_RGB = (255, 235, 170)
MARKER_NAME = "COMPLETE.json"


@dataclass(frozen=True)
class SyntheticKaistPaths:
    """Where a built dataset lives: `build_kaist(images, annotations, train_list)` converts the training split."""
    root: Path
    images: Path
    annotations: Path
    train_list: Path
    test_list: Path


def _paths(root: Path) -> SyntheticKaistPaths:
    sets = root / "imageSets"
    return SyntheticKaistPaths(root, root / "images", root / "annotations", sets / SPLITS["train"][3],
                               sets / SPLITS["test"][3])


def frame_names(split: str, count: int) -> list[tuple[str, str, str]]:
    """(set, video, frame) of the `count` frames of a split, in list order: frame i goes to the split's
    (6 i // count)-th set, so the first half is in day sets and the second half in night sets."""
    _, sets, step, _ = SPLITS[split]
    set_of = [6 * i // count for i in range(count)]  # non-decreasing: a set's frames are consecutive
    return [(f"set{sets[k]:02d}", "V000", f"I{(i - set_of.index(k)) * step:05d}") for i, k in enumerate(set_of)]


# ----------------------------------------------------------------------------------------------- rendering
def _colour(rng, lo: int, hi: int) -> tuple:
    return tuple(int(c) for c in rng.integers(lo, hi, 3))


def _to_image(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def _scene(rng, day: bool, w: int, h: int):
    """Visible (RGB) and thermal (L) backgrounds, the horizon row and a lamp-glow mask (L, lamps at 255)."""
    horizon = rng.uniform(0.3, 0.5) * h
    warm = 20.0 if day else 0.0  # sun-warmed surroundings: lower person/background contrast by day
    rows = np.arange(h, dtype=np.float32)[:, None]  # (h, 1)
    sky_t, road_t = np.clip(rows / horizon, 0, 1), np.clip((rows - horizon) / (h - horizon), 0, 1)
    sky_top, sky_low = rng.uniform([120, 140, 170], [180, 200, 240], (2, 3))
    road_far, road_near = rng.uniform(70, 150, (2, 1)) + rng.uniform(-10, 10, (2, 3))
    vis_rows = np.where(rows < horizon, sky_top + sky_t * (sky_low - sky_top),
                        road_far + road_t * (road_near - road_far))  # (h, 3)
    t_sky, t_road = rng.uniform(50, 70) + warm, rng.uniform(80, 110) + warm
    thr_rows = np.where(rows < horizon, t_sky, t_road + 10.0 * road_t)  # (h, 1): the near road is a little warmer
    grid = rng.uniform(-1, 1, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)))).astype(np.float32)
    texture = np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC))  # (h, w) smooth, one per scene
    vis, thr = _to_image(vis_rows[:, None, :] + 25 * texture[..., None]), _to_image(thr_rows + 8 * texture)
    vdraw, tdraw = ImageDraw.Draw(vis), ImageDraw.Draw(thr)
    glow = Image.new("L", (w, h), 0)
    for _ in range(int(rng.integers(3, 9))):  # buildings and trees standing on the horizon
        bw, bh, x = rng.uniform(20, 150), rng.uniform(20, 150), rng.uniform(-50, w)
        box = [x, horizon - bh, x + bw, horizon + rng.uniform(0, 20)]
        shape = "rectangle" if rng.random() < 0.5 else "ellipse"
        getattr(vdraw, shape)(box, fill=_colour(rng, 40, 180))
        getattr(tdraw, shape)(box, fill=int(rng.uniform(60, 120) + warm))
    for _ in range(int(rng.integers(0, 3))):  # cars: a cool body with a warm engine end
        cw, x, y = rng.uniform(60, 200), rng.uniform(-30, w), rng.uniform(horizon + 20, h)
        body = [x, y - 0.4 * cw, x + cw, y]
        vdraw.rectangle(body, fill=_colour(rng, 20, 230))
        tdraw.rectangle(body, fill=int(rng.uniform(70, 110) + warm))
        ex = x if rng.random() < 0.5 else x + 0.65 * cw
        tdraw.rectangle([ex, y - 0.3 * cw, ex + 0.35 * cw, y - 0.05 * cw], fill=int(rng.uniform(150, 210)))
    for _ in range(int(rng.integers(0, 3))):  # street lamps: a pole and a hot lamp
        x, foot, r = rng.uniform(0, w), rng.uniform(horizon + 10, horizon + 60), rng.uniform(4, 9)
        top = foot - rng.uniform(60, 150)
        vdraw.line([(x, foot), (x, top)], fill=(90, 90, 90), width=3)
        tdraw.line([(x, foot), (x, top)], fill=int(90 + warm), width=3)
        for draw, fill in ((vdraw, LAMP_RGB), (tdraw, int(rng.uniform(200, 245))), (ImageDraw.Draw(glow), 255)):
            draw.ellipse([x - r, top - r, x + r, top + r], fill=fill)
    return vis, thr, horizon, glow


def _figure(rng, height: float, cyclist: bool = False) -> Image.Image:
    """An "L" layer (255 on the figure) cropped to the figure's tight box: a stick figure squeezed to a Caltech-like
    aspect ratio, with two wheels at its feet for a cyclist."""
    kp = _person_keypoints(rng, 0.0, 0.0, height)  # (17, 2), centred on the origin
    lw = max(2.0, 0.06 * height)  # _draw_person's limb width
    span = max(float(np.ptp(kp[:, 0])), 1.0)
    kp[:, 0] *= max(rng.uniform(*ASPECT_RANGE) * height - lw, 1.0) / span  # stick figures are arm-wide otherwise
    side = int(2 * height) + 8
    layer = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(layer)
    _draw_person(draw, kp + side / 2, height)
    if cyclist:
        r, y = 0.17 * height, side / 2 + kp[15:, 1].max()
        for x in (side / 2 - 0.3 * height, side / 2 + 0.3 * height):
            draw.ellipse([x - r, y - r, x + r, y + r], outline=255, width=int(round(lw)))
    return layer.crop(layer.getbbox())


def _group(rng) -> Image.Image:
    """2..4 small overlapping figures side by side, one layer (a `people` box)."""
    figures = [_figure(rng, rng.uniform(30, 60)) for _ in range(int(rng.integers(2, 5)))]
    step = [f.width * rng.uniform(0.6, 1.1) for f in figures]
    xs = np.concatenate([[0], np.cumsum(step[:-1])]).astype(int)
    group = Image.new("L", (int(xs[-1]) + figures[-1].width, max(f.height for f in figures) + 8), 0)
    for x, f in zip(xs, figures):
        group.paste(255, (int(x), group.height - f.height - int(rng.integers(0, 8))), f)
    return group.crop(group.getbbox())


def _tight_box(layer: Image.Image, x0: int, y0: int, w: int, h: int, bottom: int | None = None):
    """Frame-coordinate (x0, y0, x1, y1) (exclusive ends) of the layer's pixels inside the frame (and above row
    `bottom`) when the layer's top-left corner sits at (x0, y0); None when none is left."""
    bottom = h if bottom is None else bottom
    crop = (max(0, -x0), max(0, -y0), min(layer.width, w - x0), min(layer.height, bottom - y0))
    box = layer.crop(crop).getbbox() if crop[2] > crop[0] and crop[3] > crop[1] else None
    return None if box is None else tuple(int(v) + o for v, o in zip(box, (crop[0] + x0, crop[1] + y0) * 2))


def render_frame(rng: np.random.Generator, *, day: bool, size=(640, 512)):
    """One aligned frame pair and its objects: `visible` (RGB image), `thermal` ("L" image) and a list of dicts with
    `label`, `box` (x0, y0, x1, y1) integer pixel edges, `occlusion` (0/1/2) and `visible_box` (same form, or None)."""
    w, h = size
    vis, thr, horizon, glow = _scene(rng, day, w, h)
    n_persons = 0 if rng.random() < 0.12 else int(rng.integers(1, 7))
    kinds = ["person"] * n_persons + [k for k, p in (("people", 0.15), ("person?", 0.12), ("cyclist", 0.1))
                                      if rng.random() < p]
    taken, objects = [], []  # taken: reserved x-intervals, so figures (and occluders) never overlap
    for label in kinds:
        if label == "people":
            layer = _group(rng)
        else:
            height = rng.uniform(50, 160) if label == "cyclist" else math.exp(rng.uniform(*np.log(HEIGHT_RANGE)))
            layer = _figure(rng, height, cyclist=label == "cyclist")
        margin = 0.2 * layer.width + 4
        for _ in range(20):
            x0 = int(rng.uniform(0, w) - layer.width / 2)
            y0 = int(horizon + layer.height * rng.uniform(0.75, 1.2)) - layer.height  # feet below the horizon
            if all(x0 + layer.width + margin < a or x0 - margin > b for a, b in taken):
                break
        else:
            continue
        box = _tight_box(layer, x0, y0, w, h)
        if box is None:
            continue
        taken.append((x0 - margin, x0 + layer.width + margin))
        # A faint person? is a low-alpha figure: its colour and warmth barely rise above the background.
        mask = layer.point(lambda v: v * 0.3) if label == "person?" else layer
        corners = (x0, y0, x0 + layer.width, y0 + layer.height)
        vis.paste(_colour(rng, 0, 256), corners, mask)
        thr.paste(int(rng.uniform(180, 240)), corners, mask)
        glow.paste(0, corners, layer)  # a lamp behind a figure stays hidden when lamps are lit at night
        occlusion, visible_box = 0, None
        if label == "person" and rng.random() < 0.3:  # an occluder (hedge, bin, car) in front of the lower body
            covered = rng.uniform(0.15, 0.75)
            top = box[3] - max(1, round(covered * (box[3] - box[1])))
            visible_box = _tight_box(layer, x0, y0, w, h, bottom=top)
            pad = 0.15 * (box[2] - box[0])
            rect = [box[0] - pad, top, box[2] + pad, box[3] + 2]
            ImageDraw.Draw(vis).rectangle(rect, fill=_colour(rng, 30, 160))
            ImageDraw.Draw(thr).rectangle(rect, fill=int(rng.uniform(70, 120) + (20 if day else 0)))
            ImageDraw.Draw(glow).rectangle(rect, fill=0)
            hidden = 1.0 - (visible_box[3] - visible_box[1]) / (box[3] - box[1]) if visible_box else 1.0
            occlusion = 1 if hidden <= 0.5 else 2
        objects.append({"label": label, "box": box, "occlusion": occlusion, "visible_box": visible_box})

    image = np.asarray(vis, dtype=np.float32)
    if not day:  # a dark colour camera: 10..20 % of the light, with the noise of a high gain
        image = image * rng.uniform(0.10, 0.20)
        image = np.where(np.asarray(glow)[..., None] > 0, np.float32(LAMP_RGB), image)  # lit lamps
    image += rng.standard_normal(image.shape, dtype=np.float32) * rng.uniform(*((2, 4) if day else (3, 6)))
    thermal = np.asarray(thr.filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 1.4))), dtype=np.float32)
    thermal += rng.standard_normal(thermal.shape, dtype=np.float32) * rng.uniform(2, 4)
    return _to_image(image), _to_image(thermal), objects


def bbgt_text(objects: list[dict]) -> str:
    """A bbGt version 3 file for `render_frame` objects: 1-based `l t`, integer sizes, ign 0, angle 0."""
    lines = [BBGT_HEADER]
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        vx0, vy0, vx1, vy1 = obj["visible_box"] or (-1, -1, -1, -1)  # bbGt's "no visible box" is 0 0 0 0
        lines.append(f"{obj['label']} {x0 + 1} {y0 + 1} {x1 - x0} {y1 - y0} {obj['occlusion']} "
                     f"{vx0 + 1} {vy0 + 1} {vx1 - vx0} {vy1 - vy0} 0 0")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- writing
def _params(num_train_frames: int, num_test_frames: int, seed: int, size) -> dict:
    return {"version": VERSION, "num_train_frames": int(num_train_frames), "num_test_frames": int(num_test_frames),
            "seed": int(seed), "size": [int(s) for s in size]}


def build_synthetic_kaist(root, *, num_train_frames: int = DEFAULT_TRAIN_FRAMES,
                          num_test_frames: int = DEFAULT_TEST_FRAMES, seed: int = 0,
                          size=(640, 512)) -> SyntheticKaistPaths:
    """Render the dataset into `root` unconditionally (see `synthetic_kaist_dataset` for the cached entry point).

    As `build_synthetic`: the marker goes first, then every file atomically (frames, annotations, the two lists),
    the completion marker `COMPLETE.json` (the parameters) last, so a crash never leaves a marked partial set and
    two processes building the same parameters write the same bytes. When `root` held a completed build of ours,
    its frames and annotations that the new lists do not name are removed (never files of a folder we did not
    mark, say a real KAIST); nothing else in `root` is touched.
    """
    if num_train_frames < 2 or num_test_frames < 2:
        raise ValueError(f"need >= 2 frames per split (a day and a night one), got {num_train_frames} and "
                         f"{num_test_frames}")
    paths = _paths(Path(root))
    paths.root.mkdir(parents=True, exist_ok=True)
    ours = (paths.root / MARKER_NAME).is_file()  # a completed build of ours (any parameters) is there
    (paths.root / MARKER_NAME).unlink(missing_ok=True)
    names = {split: frame_names(split, n) for split, n in (("train", num_train_frames), ("test", num_test_frames))}
    keep = {f"{s}/{v}/{f}" for frames in names.values() for s, v, f in frames}
    for folder, pattern in ((paths.images, "set??/V000/*/I?????.jpg"), (paths.annotations, "set??/V000/I?????.txt")):
        for p in folder.glob(pattern) if ours else ():
            if f"{p.relative_to(folder).parts[0]}/V000/{p.stem}" not in keep:
                p.unlink()
    for split, frames in names.items():
        split_code = SPLITS[split][0]
        for index, (set_name, video, frame) in enumerate(frames):
            rng = np.random.default_rng(np.random.SeedSequence([seed, split_code, index]))
            visible, thermal, objects = render_frame(rng, day=daytime(set_name) == "day", size=size)
            for modality, image in (("visible", visible), ("lwir", thermal)):
                folder = paths.images / set_name / video / modality
                folder.mkdir(parents=True, exist_ok=True)
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=JPEG_QUALITY)  # fixed quality: deterministic bytes
                _atomic_write_bytes(folder / f"{frame}.jpg", buf.getvalue())
            ann = paths.annotations / set_name / video / f"{frame}.txt"
            ann.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write_bytes(ann, bbgt_text(objects).encode("utf-8"))
        list_file = paths.train_list if split == "train" else paths.test_list
        list_file.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(list_file, "".join(f"{s}/{v}/{f}\n" for s, v, f in frames).encode("utf-8"))
    marker = _params(num_train_frames, num_test_frames, seed, size)
    _atomic_write_bytes(paths.root / MARKER_NAME, json.dumps(marker).encode("utf-8"))
    return paths


def default_kaist_cache_dir() -> Path:
    """Beside the shapes set: $MINIMASK_CACHE/synthetic-kaist-v1, else ~/.cache/minimask/synthetic-kaist-v1."""
    return default_cache_dir().parent / VERSION


def is_built(root, *, num_train_frames: int = DEFAULT_TRAIN_FRAMES, num_test_frames: int = DEFAULT_TEST_FRAMES,
             seed: int = 0, size=(640, 512)) -> bool:
    """True when `root` holds a completed build with exactly these parameters."""
    try:
        return json.loads((Path(root) / MARKER_NAME).read_text()) == _params(num_train_frames, num_test_frames,
                                                                              seed, size)
    except (OSError, ValueError):
        return False


def synthetic_kaist_dataset(root=None, *, num_train_frames: int = DEFAULT_TRAIN_FRAMES,
                            num_test_frames: int = DEFAULT_TEST_FRAMES, seed: int = 0,
                            size=(640, 512)) -> SyntheticKaistPaths:
    """The dataset's paths, building it once into `root` (default: `default_kaist_cache_dir()`): reused when the
    completion marker records the same parameters, rebuilt otherwise (no marker: a partial or absent build)."""
    root = Path(root) if root is not None else default_kaist_cache_dir()
    kwargs = dict(num_train_frames=num_train_frames, num_test_frames=num_test_frames, seed=seed, size=size)
    return _paths(root) if is_built(root, **kwargs) else build_synthetic_kaist(root, **kwargs)


def synthetic_kaist_splits(root=None) -> dict[str, tuple[Path, Path]]:
    """`--data synthetic_kaist`: the default miniature (built on first use) converted by the KAIST converter,
    {"train": (kaist_train.json, images), "val": (kaist_test.json, images)}. The training list is converted with
    the training protocol (`convert_kaist(train_protocol=True)`: small and heavily occluded persons become ignore
    regions), the test list without it (the miss rate filters by itself). Converting ~600 bbGt files takes well
    under a second, so the JSON files are rewritten (atomically, the same bytes) on every call."""
    paths = synthetic_kaist_dataset(root)
    coco = paths.root / "coco"
    train = convert_kaist(paths.images, paths.annotations, paths.train_list, coco / "kaist_train.json",
                          train_protocol=True)
    test = convert_kaist(paths.images, paths.annotations, paths.test_list, coco / "kaist_test.json")
    return {"train": (train, paths.images), "val": (test, paths.images)}


def summarize(paths: SyntheticKaistPaths) -> str:
    """One line read back from the files: frames (day / night), persons (occluded, < 55 px tall), ignore boxes."""
    frames = [f for lst in (paths.train_list, paths.test_list) for f in read_image_list(lst)]
    objects = [o for s, v, f in frames for o in read_bbgt(paths.annotations / s / v / f"{f}.txt")]
    persons = [o for o in objects if o["label"] == "person"]
    ignore = Counter(o["label"] for o in objects if o["label"] != "person")
    days = sum(daytime(s) == "day" for s, _, _ in frames)
    occluded, small = sum(o["occlusion"] > 0 for o in persons), sum(o["box"][3] - o["box"][1] < 55 for o in persons)
    per_label = ", ".join(f"{k}={ignore[k]}" for k in ("people", "person?", "cyclist"))
    return (f"{len(frames)} frames ({days} day, {len(frames) - days} night), {len(persons)} persons ({occluded} "
            f"occluded, {small} under 55 px), {sum(ignore.values())} ignore boxes ({per_label})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minimask.data.synthetic_kaist",
                                     description="Build the synthetic KAIST-layout dataset.")
    parser.add_argument("--root", default=None, help=f"output folder (default: {default_kaist_cache_dir()})")
    parser.add_argument("--train", type=int, default=DEFAULT_TRAIN_FRAMES, help="training frames (sets 00-05)")
    parser.add_argument("--test", type=int, default=DEFAULT_TEST_FRAMES, help="test frames (sets 06-11)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = synthetic_kaist_dataset(args.root, num_train_frames=args.train, num_test_frames=args.test,
                                    seed=args.seed)
    for name in ("images", "annotations", "train_list", "test_list"):
        print(f"{name}: {getattr(paths, name)}")
    print(summarize(paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
