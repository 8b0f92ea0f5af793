"""Evaluate a minimask model, or an existing COCO results file, with pycocotools' COCOeval (box / mask / keypoint AP,
the metrics of "Rethinking ImageNet Pre-training", He et al. 2019, Sec. 4-5).

Score a results file (its type, bbox / segm / keypoints, is read from the file; only that type is evaluated):
    python evaluate.py --results results_segm.json --ann annotations/instances_val2017.json [--output DIR]
Run a model on a COCO split and score it (writes results_{bbox,segm,keypoints}.json and metrics.json to --output):
    python evaluate.py --config r50_fpn_gn --weights model_final.pth --data datasets/coco [--split val2017]
    python evaluate.py --config tiny --weights ckpt.pth --ann val.json --images val/ --output out/ [--tta]
    python evaluate.py ... model.roi_heads.score_thresh=0.01            (key=value config overrides)
    torchrun --nproc_per_node 8 evaluate.py --config ...                (disjoint shards; rank 0 reports)
Pedestrian benchmarks (KAIST, converted by `python -m minimask.data.kaist`): `--metric miss-rate` reports the
log-average miss rate of the person class instead of AP, and draws miss_rate.png into --output:
    python evaluate.py --config r50_fpn_gn --weights model_final.pth --data val=kaist_test.json:KAIST/images \
        --metric miss-rate --output out/
num_classes comes from the dataset unless an override pins it. The checkpoint is a `.pth` holding a state dict or
a dict with a "model" entry (loaded with weights_only=True). Bad input -> a one-line error and exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from pycocotools.coco import COCO

import minimask
from minimask.cli import ArgumentParser, UsageError, data_spec, ensure_writable_dir, positive_int, require_file
from minimask.distributed import init_distributed
from minimask.evaluation import RESULT_KEYS, evaluate_coco, gather_results, inference, result_type

TTA_SCALES = (400, 500, 600, 700, 800, 900, 1000, 1100, 1200)  # detectron2 TEST.AUG.MIN_SIZES
TTA_MAX_SIZE = 4000  # detectron2 TEST.AUG.MAX_SIZE
RESULT_FIELDS = {  # what each results_<type>.json keeps (the type's key decides how it is read back)
    "bbox": ("image_id", "category_id", "bbox", "score"),
    "segm": ("image_id", "category_id", "segmentation", "score"),
    "keypoints": ("image_id", "category_id", "bbox", "keypoints", "score"),
}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", help="score this COCO results file (JSON list) instead of running a model")
    p.add_argument("--ann", help="COCO annotation file (ground truth)")
    p.add_argument("--config", help=f"model preset ({', '.join(_presets())})")
    p.add_argument("--weights", help="checkpoint .pth: a state dict or a dict with a 'model' entry")
    p.add_argument("--data", help="COCO root holding annotations/ and the split's image folder, 'synthetic', "
                   "'synthetic_kaist', 'pennfudan', or annotation-file / image-folder pairs such as "
                   "val=ANN.json:IMAGES")
    p.add_argument("--split", help="split of --data (default: val2017, or val for the synthetic layout and pairs)")
    p.add_argument("--images", help="image folder for --ann")
    p.add_argument("--output", help="folder for results_*.json and metrics.json (and miss_rate.png)")
    p.add_argument("--metric", choices=("coco", "miss-rate"), default="coco",
                   help="COCO AP (pycocotools), or the log-average miss rate of the KAIST benchmark for the person "
                        "class (its Reasonable / Scale / Occlusion settings; day and night where the images say)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: several scales + horizontal flip")
    p.add_argument("--tta-scales", type=_int_tuple, default=TTA_SCALES, help="shorter sides for --tta, e.g. 600,800")
    p.add_argument("--tta-max-size", type=positive_int, default=TTA_MAX_SIZE, help="longer-side cap for --tta")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.backbone.depth=101")
    return p


def _presets() -> list[str]:
    from minimask.config import PRESETS
    return list(PRESETS)


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def check_args(args) -> None:
    """Reject argument combinations that do not make sense (UsageError)."""
    if args.output:
        ensure_writable_dir(args.output)  # before any time is spent on inference
    args.data, args.overrides = data_spec(args.data, args.overrides)
    model_only = {"--config": args.config, "--weights": args.weights, "--data": args.data, "--split": args.split,
                  "--images": args.images, "--tta": args.tta, "key=value overrides": args.overrides}
    if args.results:
        if not args.ann:
            raise UsageError("--results needs --ann (the ground truth to score it against)")
        extra = [name for name, value in model_only.items() if value]
        if extra:
            raise UsageError(f"--results scores an existing file; it does not take {', '.join(extra)}")
        require_file(args.results, "--results")
        require_file(args.ann, "--ann")
        return
    if not args.config or not args.weights:
        raise UsageError("give --results FILE --ann FILE, or --config PRESET --weights CKPT with a dataset")
    if args.data and (args.ann or args.images):
        raise UsageError("give either --data COCO_ROOT or --ann FILE --images DIR, not both")
    if not args.data and not (args.ann and args.images):
        raise UsageError("a model run needs --data COCO_ROOT, or both --ann FILE and --images DIR")
    if args.split and not args.data:
        raise UsageError("--split only applies with --data")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise UsageError(f"overrides must be key=value, got {bad[0]!r}")
    require_file(args.weights, "--weights")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0, or 2 for bad input)."""
    try:
        args = build_parser().parse_args(argv)
        check_args(args)
        if args.results:
            return score_results_file(args)
        run = prepare_model_run(args)
    except (UsageError, OSError, ValueError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"evaluate.py: error: {message}", file=sys.stderr)
        return 2
    return run_model(**run)


# ---- mode 1: an existing results file ------------------------------------------------------------------------

def score_results_file(args) -> int:
    results = _load_json(args.results, "--results")
    kind = result_type(results)  # ValueError for a file that is not a list of result dicts
    coco_gt = load_coco(args.ann)
    print(f"{args.results}: {len(results)} {kind} results")
    if args.metric == "miss-rate":
        if kind != "bbox":
            raise ValueError(f"--metric miss-rate scores boxes; {args.results} holds {kind} results")
        report_miss_rate(coco_gt.dataset, results, args.output)
        return 0
    try:
        metrics = evaluate_coco(coco_gt, results, iou_types=(kind,))
    except (KeyError, TypeError) as e:  # pycocotools on malformed entries
        raise ValueError(f"{args.results}: malformed {kind} results ({type(e).__name__}: {e})") from None
    if args.output:
        write_json(Path(args.output) / "metrics.json", metrics)
    return 0


def report_miss_rate(dataset: dict, results: list[dict], output: str | None) -> dict:
    """Print the MR^-2 table of `results` (COCO box results) on `dataset` (a COCO dict); with `output`, also write
    metrics.json ("MR/<setting>" in percent) and miss_rate.png (the Reasonable curves, log-log)."""
    from minimask.miss_rate import as_metrics, coco_miss_rate, format_table, plot_miss_rate

    values, curves = coco_miss_rate(dataset, results)
    print(format_table(values))
    metrics = as_metrics(values)
    if output:
        write_json(Path(output) / "metrics.json", metrics)
        if curves:
            print(f"wrote {plot_miss_rate(curves, Path(output) / 'miss_rate.png', title='miss rate against FPPI')}")
    return metrics


def _load_json(path: str, flag: str):
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise ValueError(f"{flag}: {path} is not valid JSON ({e})") from None


def load_coco(ann_file: str) -> COCO:
    """A pycocotools COCO from an annotation file, quietly; ValueError if it is not a COCO annotation file."""
    data = _load_json(ann_file, "--ann")
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
        raise ValueError(f"--ann: {ann_file} is not a COCO annotation file (needs images, annotations, categories)")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    print(f"wrote {path}")


# ---- mode 2: a model on a dataset ----------------------------------------------------------------------------

def prepare_model_run(args) -> dict:
    """Everything that depends on the user's input (config, dataset, checkpoint), validated before inference."""
    from minimask.data.coco import CocoDetection, check_image_files, split_files
    from minimask.data.samplers import build_test_loader
    from minimask.data.transforms import build_transforms

    cfg = minimask.get_config(args.config, args.overrides)  # ValueError: unknown preset / key / value
    keypoints = cfg.model.keypoint_head.enabled
    if args.data:
        ann, images = split_files(args.data, args.split, keypoints)  # ValueError naming what is missing
    else:
        ann, images = Path(args.ann), Path(args.images)
    require_file(str(ann), "--ann" if args.ann else "--data")
    if not images.is_dir():
        raise UsageError(f"no such image folder: {images}")

    rank, world_size, device = select_device(args.device)
    # TTA resizes from the original image itself; plain inference uses the test pipeline (shorter side 800).
    transforms = None if args.tta else build_transforms(
        min_sizes=cfg.input.min_size_test, max_size=cfg.input.max_size_test, flip=False, train=False)
    dataset = CocoDetection(ann, images, transforms=transforms, filter_empty=False,  # COCO scores every image
                            modalities=cfg.input.modalities)
    check_image_files(dataset)
    if keypoints and dataset.num_keypoints == 0:
        raise UsageError(f"{args.config} predicts keypoints but {ann} has no keypoint annotations")
    state = read_detector_state(args.weights, cfg)
    pinned = {o.split("=", 1)[0].strip() for o in args.overrides}  # keys the data must not replace
    if "model.roi_heads.num_classes" not in pinned:  # the classifier's rows (K + 1) say how many classes it predicts
        classifier = [v for k, v in state.items() if k.endswith("cls_score.weight")]
        cfg.model.roi_heads.num_classes = classifier[0].shape[0] - 1 if classifier else dataset.num_classes
    if keypoints and "model.keypoint_head.classes" not in pinned:
        cfg.model.keypoint_head.classes = dataset.keypoint_labels if dataset.num_classes == \
            cfg.model.roi_heads.num_classes else ()  # the data's labels apply when the classes are the data's
    model = minimask.build_model(cfg)
    load_weights(model, state, args.weights, dataset.category_ids)
    model.to(device)

    loader = build_test_loader(dataset, rank=rank, world_size=world_size, num_workers=cfg.data.num_workers)
    iou_types = ["bbox"] + ["segm"] * cfg.model.mask_head.enabled + ["keypoints"] * keypoints
    tta = dict(tta_scales=args.tta_scales, tta_flip=True, tta_max_size=args.tta_max_size) if args.tta else {}
    return dict(model=model, loader=loader, dataset=dataset, device=device, rank=rank, world_size=world_size,
                iou_types=tuple(iou_types), output=args.output, tta=tta, metric=args.metric)


def select_device(device_arg: str | None) -> tuple[int, int, torch.device]:
    """Rank, world size and device: the process group from torchrun's environment (minimask.distributed), and
    --device where given instead of the process's default device."""
    info = init_distributed()
    if not device_arg:
        return info.rank, info.world_size, info.device
    try:
        device = torch.device(device_arg)
    except RuntimeError:
        raise UsageError(f"--device: {device_arg!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device_arg}: CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return info.rank, info.world_size, device


def read_detector_state(path: str, cfg) -> dict:
    """The minimask state dict in `path`: a minimask checkpoint (a state dict, or {"model": state dict}) or a
    torchvision detection checkpoint, converted (minimask.interop.model_zoo); ValueError naming the file otherwise."""
    from minimask.engine.checkpoint import CheckpointError
    from minimask.interop.model_zoo import read_checkpoint

    try:
        state, _ = read_checkpoint(path, config=cfg)
    except CheckpointError as e:  # unreadable, or refused by weights-only loading
        raise ValueError(f"--weights: {e}") from None
    return state


def load_weights(model: torch.nn.Module, state: dict, path: str, dataset_category_ids: list[int]) -> None:
    """Load `state` strictly, except that a missing `category_ids` label map is taken from the dataset with a
    warning."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "size mismatch" in line), lines[-1] if lines else "")
        raise ValueError(f"--weights: {path} does not fit the {type(model).__name__}: {detail} (num_classes comes "
                         f"from the dataset unless model.roi_heads.num_classes=... pins it)") from None
    missing = [k for k in missing if k != "category_ids"]
    if missing or unexpected:
        raise ValueError(f"--weights: {path} does not fit the model: {len(missing)} missing keys "
                         f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}")
    if "category_ids" not in state:
        warnings.warn(f"{path} has no category_ids label map; using the dataset's category order")
        model.category_ids.copy_(torch.tensor(dataset_category_ids, dtype=torch.int64))
    elif set(model.category_ids.tolist()) != set(dataset_category_ids):
        warnings.warn(f"{path} was trained on other categories than the dataset's; AP counts matching ids only")


def run_model(*, model, loader, dataset, device, rank, world_size, iou_types, output, tta, metric="coco") -> int:
    start = time.perf_counter()
    if rank == 0:
        mode = f"TTA scales {tta['tta_scales']} + flip" if tta else "single scale"
        print(f"Inference on {len(dataset)} images ({world_size} process(es), {device}, {mode})")
    seen: list[int] = []
    local = inference(model, loader, device=device, seen_image_ids=seen, **tta)
    results = gather_results(local, seen, dataset.ids)
    if rank == 0:
        print(f"Inference done in {time.perf_counter() - start:.1f} s: {len(results)} detections")
        if metric == "miss-rate":
            iou_types = ("bbox",)
            metrics = report_miss_rate(dataset.coco.dataset, results, output)
        else:
            metrics = evaluate_coco(dataset.coco, results, iou_types=iou_types)
        if output:
            for kind in iou_types:
                fields = RESULT_FIELDS[kind]
                write_json(Path(output) / f"results_{kind}.json",
                           [{k: r[k] for k in fields} for r in results if RESULT_KEYS[kind] in r])
            write_json(Path(output) / "metrics.json", metrics)
    if world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
