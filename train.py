"""Train a minimask model from random init (the paper's setting), ImageNet weights or a checkpoint, with periodic
checkpoints, exact resumption and COCO evaluation ("Rethinking ImageNet Pre-training", He et al. 2019, Sec. 3-4:
fixed-iteration schedules 1x..9x with the LR x0.1 at the last 60k and 20k iterations, linear LR scaling, GN).

    python train.py --config demo                                   (synthetic data, a few minutes on a CPU)
    python train.py --config r50_fpn_gn --data datasets/coco --schedule 3x --output out/r50_scratch_3x
    python train.py --config tiny --data synthetic --iters 200 --batch-size 4 solver.clip_grad_norm=5
    python train.py ... --resume                                    (continue from the newest checkpoint in --output)
    torchrun --nproc_per_node 8 train.py --config r50_fpn_gn ...    (--batch-size is global, split over processes)

Config precedence: the preset, then the flags, then the trailing key=value overrides. num_classes (and the number
of keypoints) come from the training set unless an override pins them. The resolved config is printed and saved to
<output>/config.json; metrics go to <output>/metrics.jsonl (one JSON object per line, "kind" train or eval) and
plots to <output>/loss.png and <output>/ap.png. SIGTERM / SIGINT save a checkpoint after the current iteration and
exit with code 0. Bad input (also an unreadable image met during training) -> a one-line error and exit code 2; a
non-finite loss or gradient -> exit code 1 naming the iteration and the loss term or parameters; in a multi-process
run, a process whose collective fails because another one died -> a one-line error and exit code 3 (torchrun's
summary names the process that failed first).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import minimask
from minimask.cli import ArgumentParser, UsageError, data_spec, ensure_writable_dir
from minimask.config import PRESETS, apply_override, to_dict
from minimask.data import (
    CocoDetection,
    IndexSubset,
    build_test_loader,
    build_train_loader,
    build_transforms,
    subset_indices,
)
from minimask.data.coco import check_image_files, dataset_splits
from minimask.data.images import num_channels
from minimask.data.samplers import consumed_samples, derive_seed
from minimask.distributed import init_distributed
from minimask.engine import loop
from minimask.engine.checkpoint import (
    code_version,
    list_checkpoints,
    prune_checkpoints,
    save_checkpoint,
    stream_changes,
)
from minimask.engine.initialization import (check_init_config, check_pretrain_metadata, describe_trainable,
                                             load_initial_weights)
from minimask.engine.precise_bn import bn_statistics, recompute_bn_stats
from minimask.engine.run_log import plot_metrics
from minimask.engine.solver import SCHEDULES, build_optimizer, lr_at, lr_steps, training_lr
from minimask.evaluation import evaluate_coco, gather_results, inference
from minimask.interop.channels import conventions_for_channels
from minimask.interop.imagenet import apply_imagenet_conventions, imagenet_conventions
from minimask.interop.weight_files import read_weights
from minimask.miss_rate import as_metrics, coco_miss_rate, format_table, has_kaist_labels
from minimask.tools.classification import read_pretrain_info
from minimask.tools.visualize import save_visualizations

EXIT_DIVERGED, EXIT_USAGE = loop.EXIT_DIVERGED, loop.EXIT_USAGE
EXIT_PEER_LOST = 3
PRECISE_BN_STREAM = 7  # precise BN draws its batches from the sample stream of base seed derive_seed(seed, 7, iter)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="r50_fpn_gn", help=f"preset ({', '.join(PRESETS)})")
    p.add_argument("--data", help="COCO root (annotations/ + train2017/ + val2017/), a synthetic root "
                   "(annotations/instances_{train,val}.json + train/ + val/), 'synthetic', 'synthetic_kaist', "
                   "'pennfudan', or annotation-file / image-folder pairs: train=ANN.json:IMAGES [val=ANN.json:IMAGES] "
                   "(default: data.train)")
    p.add_argument("--init", choices=("random", "imagenet", "checkpoint"), default="random",
                   help="random (the paper's scratch setting), imagenet backbone weights, or a whole-model checkpoint")
    p.add_argument("--weights", help=".pth for --init imagenet (backbone state dict) or checkpoint (model)")
    p.add_argument("--iters", type=int, help="iterations to train (LR steps scaled as in the 1x schedule)")
    p.add_argument("--schedule", choices=tuple(SCHEDULES), help="the paper's schedules (1x = 90k iterations)")
    p.add_argument("--batch-size", type=int, help="global images per iteration (all processes together)")
    p.add_argument("--lr", type=float, help="learning rate (default: solver.base_lr at batch 16, scaled linearly)")
    p.add_argument("--eval-period", type=int, help="iterations between evaluations (0: only at the end)")
    p.add_argument("--output", help="output folder (default: output/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    p.add_argument("--amp", action="store_true", help="mixed precision (bf16 where supported, else fp16 + scaling)")
    p.add_argument("--seed", type=int, help="seed of the initialisation, sample order and augmentation")
    p.add_argument("--train-subset", type=int, help="train on N images chosen with the seed")
    p.add_argument("--workers", type=int, help="DataLoader worker processes per training process")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. solver.clip_grad_norm=5")
    return p


# ---- configuration -----------------------------------------------------------------------------------------------

def resolve_config(args):
    """The run's Config: preset, then flags, then overrides (ValueError / UsageError on bad values)."""
    if args.config not in PRESETS:
        raise UsageError(f"--config: unknown preset {args.config!r}; choose one of: {', '.join(PRESETS)}")
    if args.iters is not None and args.schedule:
        raise UsageError("give --iters or --schedule, not both")
    if args.init == "random" and args.weights:
        raise UsageError("--weights needs --init imagenet or --init checkpoint (--init random trains from scratch)")
    if args.init != "random" and not args.weights:
        raise UsageError(f"--init {args.init} needs --weights FILE")
    args.data, args.overrides = data_spec(args.data, args.overrides)
    cfg = minimask.get_config(args.config)
    s = cfg.solver
    if args.iters is not None or args.schedule:
        s.max_iter = args.iters if args.iters is not None else SCHEDULES[args.schedule]
        if s.max_iter >= 1:
            s.steps = tuple(lr_steps(s.max_iter))
    for value, set_field in ((args.data, lambda v: setattr(cfg.data, "train", v)),
                             (args.batch_size, lambda v: setattr(s, "batch_size", v)),
                             (args.lr, lambda v: setattr(s, "lr", v)),
                             (args.eval_period, lambda v: setattr(s, "eval_period", v)),
                             (args.seed, lambda v: setattr(cfg, "seed", v)),
                             (args.train_subset, lambda v: setattr(cfg.data, "train_subset", v)),
                             (args.workers, lambda v: setattr(cfg.data, "num_workers", v))):
        if value is not None:
            set_field(value)
    if args.amp:
        s.amp = True
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise UsageError(f"overrides must be key=value, got {bad[0]!r}")
    for item in args.overrides:
        apply_override(cfg, item)  # ValueError naming an unknown key or a wrong type
    keys = {o.split("=", 1)[0].strip() for o in args.overrides}
    if "solver.max_iter" in keys and "solver.steps" not in keys and s.max_iter >= 1:
        s.steps = tuple(lr_steps(s.max_iter))
    checks = [(s.max_iter >= 1, f"the number of iterations must be >= 1, got {s.max_iter}"),
              (s.batch_size >= 1, f"the batch size must be >= 1, got {s.batch_size}"),
              (cfg.data.train_subset >= 0, f"--train-subset must be >= 0 (0: all images), got {cfg.data.train_subset}"),
              (cfg.data.num_workers >= 0, f"--workers must be >= 0, got {cfg.data.num_workers}"),
              (cfg.input.mask_format in ("polygon", "bitmask"),
               f"input.mask_format must be polygon or bitmask, got {cfg.input.mask_format!r}"),
              (cfg.data.min_keypoints_per_image >= 0,
               f"data.min_keypoints_per_image must be >= 0, got {cfg.data.min_keypoints_per_image}"),
              (s.eval_period >= 0 and s.checkpoint_period >= 0, "eval and checkpoint periods must be >= 0"),
              (s.log_period >= 1 and s.keep_checkpoints >= 0, "need solver.log_period >= 1, keep_checkpoints >= 0"),
              (math.isfinite(s.lr) and s.lr >= 0, f"the learning rate must be finite and >= 0, got {s.lr}"),
              (math.isfinite(s.base_lr) and s.base_lr > 0, f"solver.base_lr must be finite and > 0, got {s.base_lr}"),
              (0 <= cfg.seed < 2**63, f"the seed must be in [0, 2^63), got {cfg.seed}"),
              (args.output is None or args.output.strip() != "", "--output: empty path")]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    return cfg, keys


def resolve_splits(cfg) -> dict:
    """{"train": (ann, images), "val": (ann, images)} from data.train / data.val, checked to exist; without a val
    split (pairs that give only train=), no "val" entry."""
    keypoints = cfg.model.keypoint_head.enabled
    splits = dataset_splits(cfg.data.train, keypoints)
    if "train" not in splits:
        raise UsageError(f"--data: no train split in {cfg.data.train!r} (give train=ANN.json:IMAGES)")
    if cfg.data.val:
        splits["val"] = dataset_splits(cfg.data.val, keypoints)["val"]
    for name, (ann, images) in splits.items():
        if not Path(ann).is_file() or not Path(images).is_dir():
            raise UsageError(f"--data: the {name} split needs {ann} and the folder {images}")
    return splits


def build_datasets(cfg, keys, splits):
    """Train and val CocoDetection (train possibly subset); fills num_classes / num_keypoints from the data."""
    keypoints = cfg.model.keypoint_head.enabled
    inp = cfg.input
    train = CocoDetection(*splits["train"], filter_empty=cfg.data.filter_empty, keypoints=keypoints,
                          min_keypoints_per_image=cfg.data.min_keypoints_per_image, mask_format=inp.mask_format,
                          modalities=inp.modalities, ignore_regions=cfg.model.ignore_iof_thr >= 0,
                          transforms=build_transforms(min_sizes=inp.min_size_train, max_size=inp.max_size_train,
                                                      flip=inp.horizontal_flip, train=True))
    val = None
    if "val" in splits:
        val = CocoDetection(*splits["val"], filter_empty=False, keypoints=keypoints, mask_format=inp.mask_format,
                            modalities=inp.modalities,
                            transforms=build_transforms(min_sizes=inp.min_size_test, max_size=inp.max_size_test,
                                                        flip=False, train=False))
    for dataset in (train, val):  # a wrong image folder fails now, not at the first batch
        if dataset is not None:
            check_image_files(dataset)
    if len(train) == 0:  # an InfiniteSampler over nothing would fail at the first batch, deep in the loop
        st = train.stats
        raise UsageError(f"--data: no training image left in {splits['train'][0]} after filtering: {st['images']} "
                         f"images, {st['annotations']} annotations, of which {st['crowd']} crowd, {st['degenerate']} "
                         f"with an empty box, {st['invalid_segmentation']} without a valid segmentation; "
                         f"{st['few_keypoints_images']} images with fewer than {cfg.data.min_keypoints_per_image} "
                         f"visible keypoints")
    if keypoints and train.num_keypoints == 0:
        raise UsageError(f"--config predicts keypoints but {splits['train'][0]} has no keypoint annotations")
    if "model.roi_heads.num_classes" not in keys:
        cfg.model.roi_heads.num_classes = train.num_classes
    if keypoints and "model.keypoint_head.num_keypoints" not in keys:
        cfg.model.keypoint_head.num_keypoints = train.num_keypoints
    if keypoints and "model.keypoint_head.classes" not in keys:
        cfg.model.keypoint_head.classes = train.keypoint_labels
    if cfg.data.train_subset:
        train_subset = IndexSubset(train, subset_indices(len(train), cfg.data.train_subset, cfg.seed))
        return train, train_subset, val
    return train, train, val


# ---- entry point -------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0; 1 on divergence; 2 for bad input)."""
    try:
        args = build_parser().parse_intermixed_args(argv)
        run = prepare(args)
    except (UsageError, ValueError, OSError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"train.py: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return train(**run)
    except RuntimeError as e:  # gloo: "Connection closed by peer"; nccl: DistBackendError (a RuntimeError)
        info = run["dist_info"]
        if info.world_size == 1 or not loop.in_collective(e):
            raise
        print(f"train.py: error: rank {info.rank}: a collective operation failed, most likely because another "
              f"process died (its own error names the cause): {loop.last_line(e)}", file=sys.stderr)
        return EXIT_PEER_LOST


def prepare(args) -> dict:
    """Everything that depends on the user's input, validated before training starts."""
    cfg, keys = resolve_config(args)
    weights = None
    if args.init == "imagenet":  # the weights fix the pixel convention and stride placement
        state, fmt = weights = read_weights(args.weights)
        check_pretrain_metadata(read_pretrain_info(args.weights) if fmt == "minimask" else None, cfg, args.weights)
        conventions = conventions_for_channels(imagenet_conventions(fmt, state), num_channels(cfg.input.modalities))
        for change in apply_imagenet_conventions(cfg, conventions, keys):
            print(f"--init imagenet: {change}")
    check_init_config(cfg, args.init)  # e.g. FrozenBN or frozen stages under random init
    splits = resolve_splits(cfg)
    output = Path(args.output or f"output/{args.config}")
    ensure_writable_dir(output)
    dist_info = init_distributed()
    if cfg.solver.batch_size % dist_info.world_size:
        raise UsageError(f"--batch-size {cfg.solver.batch_size} is not divisible by the world size "
                         f"{dist_info.world_size}")
    if list_checkpoints(output) and not args.resume:
        raise UsageError(f"--output {output} already holds checkpoints; pass --resume to continue that run, or "
                         f"choose another folder")
    if dist_info.rank == 0:  # how the run started (not in config.json); the experiment collector reads it
        (output / "run.json").write_text(json.dumps({
            "init": args.init, "weights": str(Path(args.weights).resolve()) if args.weights else "",
            "schedule": args.schedule or "", "iters": cfg.solver.max_iter, "steps": list(cfg.solver.steps)}) + "\n")
    torch.manual_seed(cfg.seed)  # the initialisation is a function of the seed
    full_train, train_set, val_set = build_datasets(cfg, keys, splits)
    model = minimask.build_model(cfg)
    model.category_ids.copy_(torch.tensor(full_train.category_ids, dtype=torch.int64))
    if args.init != "random":
        load_initial_weights(model, args.init, args.weights, weights=weights)
    if dist_info.rank == 0:
        print(describe_trainable(model))
    return dict(cfg=cfg, model=model, train_set=train_set, val_set=val_set, output=output, dist_info=dist_info,
                resume=args.resume, label_map={"category_ids": list(full_train.category_ids),
                                               "category_names": list(full_train.category_names)})


def train(*, cfg, model, train_set, val_set, output: Path, dist_info, resume: bool, label_map: dict) -> int:
    """Optimizer, data and the run's callbacks around the shared training loop (minimask.engine.loop.run); returns
    the exit code."""
    rank, world_size, device = dist_info.rank, dist_info.world_size, dist_info.device
    s = cfg.solver
    lr = training_lr(s.lr, s.base_lr, s.batch_size)
    per_rank = s.batch_size // world_size
    model.to(device)
    optimizer = build_optimizer(model, lr=lr, momentum=s.momentum, weight_decay=s.weight_decay,
                                weight_decay_norm=s.weight_decay_norm)
    autocast, scaler = loop.autocast_context(device, s.amp)
    config_dict = to_dict(cfg)
    if rank == 0:
        print(json.dumps(config_dict, indent=1))
        (output / "config.json").write_text(json.dumps(config_dict, indent=1) + "\n")
        print(f"training {s.max_iter} iterations, global batch {s.batch_size} ({world_size} process(es), "
              f"{per_rank} per process, {device}), lr {lr:g} (steps {s.steps}), {len(train_set)} training images")
        if val_set is None:
            print("note: the dataset has no val split, so the run is not evaluated (give val=ANN.json:IMAGES)")
    log = loop.MetricsLog(output / "metrics.jsonl", enabled=rank == 0)
    run = DetectionRun(cfg=cfg, model=model, optimizer=optimizer, scaler=scaler, train_set=train_set,
                       val_set=val_set, output=output, dist_info=dist_info, label_map=label_map, log=log)
    return loop.run(loop.TrainingLoop(
        program="train.py", model=model, optimizer=optimizer,
        loss_fn=functools.partial(detection_losses, device=device),
        batches=lambda iteration: iter(build_train_loader(
            train_set, batch_size_per_rank=per_rank, seed=cfg.seed, rank=rank, world_size=world_size,
            start=consumed_samples(iteration, per_rank, world_size), num_workers=cfg.data.num_workers)),
        lr_at=functools.partial(lr_at, base_lr=lr, max_iter=s.max_iter, steps=s.steps, gamma=s.gamma,
                                warmup_iters=s.warmup_iters, warmup_factor=s.warmup_factor),
        max_iter=s.max_iter, output=output, dist_info=dist_info, checkpoint=run.checkpoint, finish=run.finish, log=log,
        resume=resume, restore=functools.partial(restore, model=model, optimizer=optimizer, scaler=scaler,
                                                 config_dict=config_dict, world_size=world_size),
        evaluate=run.evaluate if val_set is not None else None, eval_period=s.eval_period,
        checkpoint_period=s.checkpoint_period, log_period=s.log_period, max_grad_norm=s.clip_grad_norm,
        scaler=scaler, autocast=autocast))


def detection_losses(model, batch, *, device) -> dict:
    """The loss function of the training loop: the detector's losses on one batch (images, targets)."""
    images, targets = loop.to_device(*batch, device)
    return model(images, targets)


def restore(saved: dict, *, model, optimizer, scaler, config_dict: dict, world_size: int) -> None:
    """Put a checkpoint's model, optimizer and loss scaler back; warn when the run's setup changed."""
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    changed = stream_changes(saved, config_dict, world_size)
    if changed:
        print(f"warning: resuming with a changed setup ({'; '.join(changed)}): the run will not repeat an "
              f"uninterrupted one exactly")


class DetectionRun:
    """What train.py does at the training loop's checkpoints, evaluations and end."""

    def __init__(self, *, cfg, model, optimizer, scaler, train_set, val_set, output: Path, dist_info, label_map: dict,
                 log):
        self.cfg, self.model, self.optimizer, self.scaler = cfg, model, optimizer, scaler
        self.train_set, self.val_set, self.output, self.dist_info = train_set, val_set, output, dist_info
        self.label_map, self.log, self.config = label_map, log, to_dict(cfg)
        self.version = code_version()

    def checkpoint(self, name: str, iteration: int) -> None:
        """Save the run (a collective: every process's random state is gathered into it)."""
        world_size, s = self.dist_info.world_size, self.cfg.solver
        rng_states = loop.gather_rng_states(world_size)
        if self.dist_info.rank != 0:
            return
        per_rank = s.batch_size // world_size
        save_checkpoint(self.output / name, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "iteration": iteration,
            "consumed_samples": consumed_samples(iteration, per_rank, world_size), "world_size": world_size,
            "scaler": self.scaler.state_dict() if self.scaler is not None else {}, "rng": rng_states,
            "config": self.config, "label_map": self.label_map, "code_version": self.version})
        if s.keep_checkpoints:
            prune_checkpoints(self.output, s.keep_checkpoints)

    def evaluate(self, iteration: int) -> None:
        """COCO AP now; precise BN statistics are computed for it, then the run's own are put back."""
        saved_bn = bn_statistics(self.model)
        if self.cfg.solver.precise_bn_iters:
            precise_bn(self.model, self.train_set, cfg=self.cfg, iteration=iteration, dist_info=self.dist_info)
        self._coco_ap(iteration)
        self.model.load_state_dict(saved_bn, strict=False)

    def finish(self, iteration: int) -> None:
        """The final model (with precise BN statistics where enabled), its COCO AP and four drawn val images."""
        if self.cfg.solver.precise_bn_iters:
            with loop.same_random_stream():  # the final checkpoint keeps the training run's random state
                precise_bn(self.model, self.train_set, cfg=self.cfg, iteration=iteration, dist_info=self.dist_info)
        self.checkpoint("model_final.pth", iteration)
        if self.val_set is not None:
            self._coco_ap(iteration)
        if self.dist_info.rank == 0:
            print(f"done: {iteration} iterations; final model {self.output / 'model_final.pth'}")
            if self.val_set is not None and len(self.val_set):  # no collectives: rank 0 only
                drawn = save_visualizations(self.model, self.val_set, range(min(4, len(self.val_set))),
                                            self.output / "vis", device=self.dist_info.device, score_threshold=0.5)
                print(f"wrote {len(drawn)} images of the final model's detections to {self.output / 'vis'}")

    def _coco_ap(self, iteration: int) -> None:
        run_evaluation(self.model, self.val_set, device=self.dist_info.device, rank=self.dist_info.rank,
                       world_size=self.dist_info.world_size, iteration=iteration, cfg=self.cfg, log=self.log,
                       output=self.output)


def precise_bn(model, train_set, *, cfg, iteration: int, dist_info) -> None:
    """Recompute BN statistics over solver.precise_bn_iters training batches (a sample stream of their own, seeded
    by the iteration, so that a resumed run repeats it); a no-op without BatchNorm layers."""
    world_size, device = dist_info.world_size, dist_info.device
    loader = build_train_loader(train_set, batch_size_per_rank=cfg.solver.batch_size // world_size,
                                seed=derive_seed(cfg.seed, PRECISE_BN_STREAM, iteration), rank=dist_info.rank,
                                world_size=world_size, num_workers=cfg.data.num_workers)
    used = recompute_bn_stats(model, loader, lambda m, batch: m(*loop.to_device(*batch, device)),
                              cfg.solver.precise_bn_iters)
    if used and dist_info.rank == 0:
        print(f"precise BN: recomputed the BatchNorm statistics over {used} batches")


# ---- evaluation, metrics, plots ----------------------------------------------------------------------------------

def run_evaluation(model, val_set, *, device, rank, world_size, iteration, cfg, log, output):
    """COCO AP of the current model on the val split; rank 0 prints pycocotools' summary, logs and plots."""
    loader = build_test_loader(val_set, rank=rank, world_size=world_size, num_workers=cfg.data.num_workers)
    start = time.perf_counter()
    seen: list[int] = []
    local = inference(model, loader, device=device, seen_image_ids=seen)
    results = gather_results(local, seen, val_set.ids)
    if rank != 0:
        return
    iou_types = ("bbox",) + ("segm",) * cfg.model.mask_head.enabled + ("keypoints",) * cfg.model.keypoint_head.enabled
    print(f"\nevaluation at iteration {iteration}: {len(val_set)} images, {len(results)} detections "
          f"({time.perf_counter() - start:.1f} s)")
    metrics = evaluate_coco(val_set.coco, results, iou_types=iou_types)
    if cfg.data.miss_rate or has_kaist_labels(val_set.coco.dataset):
        values, _ = coco_miss_rate(val_set.coco.dataset, results)
        print(format_table(values))
        metrics.update(as_metrics(values))
    log.append({"iter": iteration, "kind": "eval", **metrics})
    plot_metrics(log.history, output)


if __name__ == "__main__":
    code = main()
    if code == EXIT_PEER_LOST:
        # The process group is broken: leave without running its destructors, which can abort (SIGABRT) on the
        # connection the lost peer closed; torchrun would then report this process as the first to fail.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
