"""Pre-train a minimask backbone (ResNet/ResNeXt, GN / BN / SyncBN) and write a checkpoint that `train.py --init
imagenet --weights` loads: as an image classifier (`--method supervised`, the "ImageNet pre-training" that
"Rethinking ImageNet Pre-training", He, Girshick, Dollar 2019, compares with random init), or without labels on
the target images themselves (`--method moco`: MoCo v2; `--method densecl`: DenseCL; minimask.tools.contrastive).

    python pretrain.py --config tiny --data crops/ --iters 300 --batch-size 64 --image-size 64 --output out/pre
    torchrun --nproc_per_node 8 pretrain.py --config r50_fpn_gn --data datasets/imagenet --iters 450000 \
        --batch-size 256 --output out/r50_gn_imagenet               (ImageNet: 90 epochs at batch 256)
    python pretrain.py --method densecl --config tiny --data pennfudan synthetic --iters 400 --batch-size 32 \
        --image-size 96 --output out/densecl                        (own images, no labels)
    python train.py --config tiny --init imagenet --weights out/pre/model_final.pth ...

Self-supervised (moco / densecl): --data takes one or more image folders or anything train.py --data takes (their
training images, all of them, labels unused: minimask.data.unlabelled); `input.modalities=visible,thermal` trains
a 4-channel backbone, and `--cross-modal` with a 1-channel model (`input.modalities=visible,thermal` plus
`--cross-modal`) uses the grey visible and the thermal frame of a scene as the two views. MoCo v2's recipe (Chen
et al. 2020, `main_moco.py --mlp --moco-t 0.2 --aug-plus --cos`): momentum encoder 0.999, a queue of negatives,
temperature 0.2, 2-layer MLP head 2048 -> 128, the augmentations of minimask.data.augment, SGD at LR 0.03 per 256
images scaled linearly, weight decay 1e-4, cosine schedule; DenseCL adds its dense head and queue, loss (1 -
lambda) * L_global + lambda * L_dense with lambda 0.5. The queue, its pointer and the key encoder are in the
periodic checkpoints (exact resumption); model_final.pth holds the backbone, which loads strictly, and the
projection heads, which the loader skips and says so.

Supervised: --data is an ImageNet-layout root: train/<class>/<image> and val/<class>/<image> (val is optional:
without it there is no evaluation). The backbone (depth, groups, width, norm, stride placement) and the pixel
normalisation come from the detector preset --config (plus model.* overrides), so that the detector built from the
same preset loads the weights strictly and sees its inputs normalised the same way. SGD with momentum 0.9, weight
decay 1e-4 (none on norm parameters), LR 0.1 per 256 images scaled linearly (Goyal et al. 2017), linear warm-up,
x0.1 at 2/3 and 8/9 of the run (minimask.engine.solver.lr_steps). Augmentation: random resized crop + flip;
evaluation: centre crop, top-1 / top-5. Distributed as train.py (torchrun, gradients averaged by
minimask.distributed). Outputs in --output: metrics.jsonl, model_<iter>.pth (resumable with --resume) and
model_final.pth, whose "pretrain" entry records what the equal-compute accounting needs (iterations, batch size,
images seen, image size, backbone). It runs the same training loop as train.py (minimask.engine.loop): exit codes 0
done or stopped by a signal, 1 a non-finite loss or gradient, 2 bad input (an unreadable image or checkpoints
included).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import minimask
from minimask.cli import ArgumentParser, UsageError, ensure_writable_dir
from minimask.config import PRESETS, apply_override
from minimask.data.samplers import build_train_loader, consumed_samples
from minimask.data.unlabelled import UnlabelledImages, unlabelled_sources
from minimask.distributed import init_distributed
from minimask.engine import loop
from minimask.engine.checkpoint import code_version, list_checkpoints, prune_checkpoints, save_checkpoint
from minimask.engine.run_log import plot_metrics
from minimask.engine.solver import build_optimizer, cosine_lr_at, lr_at, lr_steps, scaled_lr
from minimask.interop.imagenet import PROJECTION_HEADS
from minimask.tools.classification import (
    BACKBONE_KEYS,
    PIXEL_KEYS,
    ImageFolder,
    build_classifier,
    evaluate,
    topk_correct,
)
from minimask.tools.contrastive import Contrastive, build_contrastive, default_queue_size

EXIT_USAGE = loop.EXIT_USAGE
REFERENCE_BATCH, REFERENCE_LR = 256, 0.1  # ImageNet ResNet recipe (He et al. 2016; Goyal et al. 2017)
CONTRASTIVE_LR = 0.03  # MoCo v2 at batch 256 (its main_moco.py --lr 0.03)
METHODS = ("supervised", "moco", "densecl")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="r50_fpn_gn", help="detector preset whose backbone is pre-trained")
    p.add_argument("--method", choices=METHODS, default="supervised",
                   help="supervised (a classifier), moco (MoCo v2) or densecl (DenseCL)")
    p.add_argument("--data", required=True, nargs="+",
                   help="supervised: an ImageNet-layout root (train/<class>/*, val/<class>/* optional); moco / "
                        "densecl: image folders or train.py --data values, labels unused")
    p.add_argument("--iters", type=int, default=1000, help="iterations")
    p.add_argument("--batch-size", type=int, default=256, help="global images per iteration")
    p.add_argument("--image-size", type=int, default=224, help="training / evaluation crop size in pixels")
    p.add_argument("--lr", type=float, help=f"learning rate (default {REFERENCE_LR} (supervised) or "
                   f"{CONTRASTIVE_LR} (moco / densecl) x batch / {REFERENCE_BATCH})")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-iters", type=int, help="linear warm-up, at most a tenth of the run (default: 500 "
                   "supervised, 0 moco / densecl, as MoCo v2)")
    p.add_argument("--clip-grad-norm", type=float, default=0.0, help="max global gradient norm (0: no clipping)")
    p.add_argument("--eval-period", type=int, default=0, help="iterations between evaluations (0: at the end)")
    p.add_argument("--checkpoint-period", type=int, default=1000)
    p.add_argument("--log-period", type=int, default=20)
    p.add_argument("--output", default="output/pretrain")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers per process")
    p.add_argument("--queue-size", type=int, default=0, help="negatives in the queue (default: "
                   "minimask.tools.contrastive.default_queue_size, smaller than the dataset)")
    p.add_argument("--momentum", type=float, default=0.999, help="key encoder momentum (MoCo)")
    p.add_argument("--temperature", type=float, default=0.2, help="InfoNCE temperature (MoCo v2)")
    p.add_argument("--dense-weight", type=float, default=0.5, help="DenseCL's lambda")
    p.add_argument("--cross-modal", action="store_true",
                   help="1-channel model on visible + thermal data: the two frames of a scene are the two views")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="model.* and input.modalities overrides, e.g. model.backbone.norm=BN")
    return p


def prepare(args) -> dict:
    """Everything that depends on the user's input, checked before training starts."""
    if args.config not in PRESETS:
        raise UsageError(f"--config: unknown preset {args.config!r}; choose one of: {', '.join(PRESETS)}")
    for name, value, low in (("--iters", args.iters, 1), ("--batch-size", args.batch_size, 1),
                             ("--image-size", args.image_size, 32), ("--workers", args.workers, 0),
                             ("--warmup-iters", args.warmup_iters or 0, 0), ("--eval-period", args.eval_period, 0),
                             ("--checkpoint-period", args.checkpoint_period, 0), ("--log-period", args.log_period, 1),
                             ("--queue-size", args.queue_size, 0)):
        if value < low:
            raise UsageError(f"{name} must be >= {low}, got {value}")
    for name, value, zero_ok in (("--lr", args.lr, False), ("--temperature", args.temperature, False),
                                 ("--clip-grad-norm", args.clip_grad_norm, True)):
        if value is not None and not (math.isfinite(value) and (value >= 0 if zero_ok else value > 0)):
            raise UsageError(f"{name} must be finite and {'>=' if zero_ok else '>'} 0, got {value}")
    if not (0 <= args.momentum < 1 and 0 <= args.dense_weight <= 1):
        raise UsageError(f"--momentum must be in [0, 1) and --dense-weight in [0, 1], got {args.momentum}, "
                         f"{args.dense_weight}")
    cfg = minimask.get_config(args.config)
    for item in args.overrides:
        if "=" not in item or not item.strip().startswith(("model.", "input.modalities")):
            raise UsageError(f"overrides must be model.key=value or input.modalities=..., got {item!r}")
        apply_override(cfg, item)  # ValueError naming an unknown key or a wrong type
    if args.method == "supervised":
        train_set, val_set = _labelled_sets(args)
    else:
        if args.cross_modal:  # one channel: both views are single frames
            cfg.model.pixel_mean, cfg.model.pixel_std = cfg.model.pixel_mean[-1:], cfg.model.pixel_std[-1:]
        train_set = UnlabelledImages(unlabelled_sources(args.data), image_size=args.image_size,
                                     modalities=cfg.input.modalities, cross_modal=args.cross_modal)
        val_set = None
    output = Path(args.output)
    ensure_writable_dir(output)
    if list_checkpoints(output) and not args.resume:
        raise UsageError(f"--output {output} already holds checkpoints; pass --resume to continue that run")
    dist_info = init_distributed()
    if args.batch_size % dist_info.world_size:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by the world size {dist_info.world_size}")
    torch.manual_seed(args.seed)
    if args.method == "supervised":
        model = build_classifier(cfg, num_classes=len(train_set.classes))
    else:
        queue = args.queue_size or default_queue_size(len(train_set), args.batch_size)
        model = build_contrastive(cfg, method=args.method, queue_size=queue, momentum=args.momentum,
                                  temperature=args.temperature, dense_weight=args.dense_weight,
                                  in_channels=train_set.channels)
    return dict(args=args, cfg=cfg, model=model, train_set=train_set, val_set=val_set, output=output,
                dist_info=dist_info)


def _labelled_sets(args):
    """The supervised method's ImageNet-layout train and val folders (val optional)."""
    if len(args.data) != 1:
        raise UsageError(f"--method supervised takes one ImageNet-layout root, got {len(args.data)} --data values")
    root = Path(args.data[0])
    if not (root / "train").is_dir():
        raise UsageError(f"--data: {root} has no train/ folder (expected train/<class>/<image>)")
    train_set = ImageFolder(root / "train", image_size=args.image_size, train=True)
    val_set = (ImageFolder(root / "val", image_size=args.image_size, train=False, classes=train_set.classes)
               if (root / "val").is_dir() else None)
    return train_set, val_set


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_intermixed_args(argv)
        run = prepare(args)
    except (UsageError, ValueError, OSError) as e:
        print(f"pretrain.py: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return EXIT_USAGE
    return pretrain(**run)


def pretrain(*, args, cfg, model, train_set, val_set, output: Path, dist_info) -> int:
    """Optimizer, data and the run's callbacks around the shared training loop (minimask.engine.loop.run); returns
    the exit code."""
    rank, world_size, device = dist_info.rank, dist_info.world_size, dist_info.device
    per_rank = args.batch_size // world_size
    supervised = args.method == "supervised"
    lr = args.lr or scaled_lr(REFERENCE_LR if supervised else CONTRASTIVE_LR, args.batch_size, REFERENCE_BATCH)
    warmup = args.warmup_iters if args.warmup_iters is not None else 500 if supervised else 0
    steps = lr_steps(args.iters) if supervised else ()
    schedule = (functools.partial(lr_at, base_lr=lr, max_iter=args.iters, steps=steps, warmup_iters=warmup)
                if supervised else functools.partial(cosine_lr_at, base_lr=lr, max_iter=args.iters,
                                                     warmup_iters=warmup))
    model.to(device)
    optimizer = build_optimizer(model, lr=lr, weight_decay=args.weight_decay)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        what = (f"{len(train_set.classes)} classes" if supervised else
                f"{args.method}, queue {model.queue.shape[0]}, {train_set.channels} channel(s)")
        print(f"pre-training the {args.config} backbone ({cfg.model.backbone.depth} layers, norm "
              f"{cfg.model.backbone.norm}, {params:,} trained parameters) on {len(train_set)} images ({what}) at "
              f"{args.image_size} px: {args.iters} iterations, batch {args.batch_size} ({world_size} process(es), "
              f"{device}), lr {lr:g}, {'steps ' + str(steps) if supervised else 'cosine schedule'}")
    log = loop.MetricsLog(output / "metrics.jsonl", enabled=rank == 0)
    run = PretrainRun(args=args, cfg=cfg, model=model, optimizer=optimizer, train_set=train_set, val_set=val_set,
                      output=output, dist_info=dist_info, log=log, lr=lr, steps=steps)
    return loop.run(loop.TrainingLoop(
        program="pretrain.py", model=model, optimizer=optimizer,
        loss_fn=functools.partial(classification_loss if supervised else contrastive_loss, device=device),
        batches=lambda iteration: iter(build_train_loader(
            train_set, batch_size_per_rank=per_rank, seed=args.seed, rank=rank, world_size=world_size,
            start=consumed_samples(iteration, per_rank, world_size), num_workers=args.workers, aspect_grouping=False)),
        lr_at=schedule, max_iter=args.iters, output=output, dist_info=dist_info, checkpoint=run.checkpoint,
        finish=run.finish, log=log, resume=args.resume, restore=functools.partial(restore, model=model,
                                                                                   optimizer=optimizer),
        evaluate=run.evaluate if val_set is not None else None, eval_period=args.eval_period,
        checkpoint_period=args.checkpoint_period, log_period=args.log_period, max_grad_norm=args.clip_grad_norm))


def contrastive_loss(model, batch, *, device) -> dict:
    """The loss function of the training loop for moco / densecl: the model computes its InfoNCE losses (and
    updates its key encoder and queues) from the two views of each image."""
    views_q, views_k = batch
    return model(torch.stack(views_q).to(device), torch.stack(views_k).to(device))  # (B, C, S, S) each


def classification_loss(model, batch, *, device) -> dict:
    """The loss function of the training loop: cross-entropy of the class logits, and the batch's top-1 (logged)."""
    images, labels = batch
    images = torch.stack(images).to(device)  # (B, 3, S, S)
    labels = torch.as_tensor(labels, dtype=torch.int64, device=device)  # (B,)
    logits = model(images)  # (B, K)
    top1 = topk_correct(logits.detach(), labels, ks=(1,))[0].float() * 100.0 / len(labels)
    return {"loss_classifier": F.cross_entropy(logits, labels), "top1": top1}


def restore(saved: dict, *, model, optimizer) -> None:
    """A checkpoint back into the model: a classifier's backbone, or a contrastive model's whole state (key
    encoder and queues included); model_final.pth of a contrastive run holds only the backbone and heads."""
    contrastive = isinstance(model, Contrastive)
    if "queue" in saved["model"] or not contrastive:
        (model if contrastive else model.backbone).load_state_dict(saved["model"])
    else:
        model.backbone.load_state_dict({k: v for k, v in saved["model"].items() if not k.startswith(PROJECTION_HEADS)})
    if "optimizer" in saved:  # not in model_final.pth
        optimizer.load_state_dict(saved["optimizer"])


class PretrainRun:
    """What pretrain.py does at the training loop's checkpoints, evaluations and end."""

    def __init__(self, *, args, cfg, model, optimizer, train_set, val_set, output: Path, dist_info, log, lr, steps):
        self.args, self.cfg, self.model, self.optimizer = args, cfg, model, optimizer
        self.train_set, self.val_set, self.output, self.dist_info = train_set, val_set, output, dist_info
        self.log, self.lr, self.steps = log, lr, steps

    def checkpoint(self, name: str, iteration: int, top: dict | None = None) -> None:
        """Save the backbone (a collective: every process's random state is gathered into it)."""
        states = loop.gather_rng_states(self.dist_info.world_size)
        if self.dist_info.rank != 0:
            return
        final = name == "model_final.pth"
        if isinstance(self.model, Contrastive):  # final: backbone + projection heads; else all, to resume exactly
            weights = {**self.model.backbone_state(), **self.model.head_state()} if final else self.model.state_dict()
        else:
            weights = self.model.backbone_state()
        state = {"model": weights, "iteration": iteration, "rng": states, "pretrain": self.info(iteration, top)}
        if not final:
            state["optimizer"] = self.optimizer.state_dict()
        save_checkpoint(self.output / name, state)
        prune_checkpoints(self.output, 2)

    def evaluate(self, iteration: int) -> dict:
        """Top-1 / top-5 on the val folder (a collective), logged by the main process."""
        world_size = self.dist_info.world_size
        top = evaluate(self.model, self.val_set, device=self.dist_info.device, rank=self.dist_info.rank,
                       world_size=world_size, batch_size=max(self.args.batch_size // world_size, 16),
                       num_workers=self.args.workers)
        self.log.append({"iter": iteration, "kind": "eval", **top})
        if self.dist_info.rank == 0:
            print(f"evaluation at iteration {iteration}: top-1 {top['top1']:.2f}%, top-5 {top['top5']:.2f}% on "
                  f"{top['images']} images", flush=True)
        return top

    def finish(self, iteration: int) -> None:
        top = self.evaluate(iteration) if self.val_set is not None else None
        self.checkpoint("model_final.pth", iteration, top)
        if self.dist_info.rank == 0:
            plot_metrics(self.log.history, self.output)  # loss.png
            print(f"done: {iteration} iterations; backbone weights {self.output / 'model_final.pth'}")
            print(json.dumps({k: v for k, v in self.info(iteration, None).items()
                              if k in ("iterations", "batch_size", "images_seen", "image_size")}))

    def info(self, iteration: int, top: dict | None) -> dict:
        """What the equal-compute accounting needs (stored in the checkpoint's "pretrain" entry)."""
        args, cfg = self.args, self.cfg
        classes = list(getattr(self.train_set, "classes", []))
        views = 1 if args.method == "supervised" else 2  # two crops of one image: one image, twice the pixels
        return {"preset": args.config, "method": args.method, "data": " ".join(map(str, args.data)),
                "classes": classes, "num_classes": len(classes), "train_images": len(self.train_set),
                "iterations": iteration, "batch_size": args.batch_size, "images_seen": iteration * args.batch_size,
                "image_size": args.image_size, "views": views,
                "pixels_seen": views * iteration * args.batch_size * args.image_size ** 2,
                "in_channels": getattr(self.train_set, "channels", 3),
                "modalities": list(cfg.input.modalities), "cross_modal": bool(args.cross_modal),
                "queue_size": int(self.model.queue.shape[0]) if isinstance(self.model, Contrastive) else None,
                "lr": self.lr, "steps": list(self.steps), "seed": args.seed, "world_size": self.dist_info.world_size,
                "backbone": {k: getattr(cfg.model.backbone, k) for k in BACKBONE_KEYS},
                "pixel": {k: (list(v) if isinstance(v, tuple) else v)
                          for k, v in ((k, getattr(cfg.model, k)) for k in PIXEL_KEYS)},
                "top1": None if top is None else top["top1"], "top5": None if top is None else top["top5"],
                "code_version": code_version()}


if __name__ == "__main__":
    sys.exit(main())
