"""Pre-train a minimask backbone (ResNet/ResNeXt, GN / BN / SyncBN) as an image classifier, the "ImageNet
pre-training" that "Rethinking ImageNet Pre-training" (He, Girshick, Dollar 2019) compares with random init, and
write a checkpoint that `train.py --init imagenet --weights` loads.

    python pretrain.py --config tiny --data crops/ --iters 300 --batch-size 64 --image-size 64 --output out/pre
    torchrun --nproc_per_node 8 pretrain.py --config r50_fpn_gn --data datasets/imagenet --iters 450000 \
        --batch-size 256 --output out/r50_gn_imagenet               (ImageNet: 90 epochs at batch 256)
    python train.py --config tiny --init imagenet --weights out/pre/model_final.pth ...

--data is an ImageNet-layout root: train/<class>/<image> and val/<class>/<image> (val is optional: without it
there is no evaluation). The backbone (depth, groups, width, norm, stride placement) and the pixel normalisation
come from the detector preset --config (plus model.* overrides), so that the detector built from the same preset
loads the weights strictly and sees its inputs normalised the same way. SGD with momentum 0.9, weight decay 1e-4
(none on norm parameters), LR 0.1 per 256 images scaled linearly (Goyal et al. 2017), linear warm-up, x0.1 at 2/3
and 8/9 of the run (minimask.engine.solver.lr_steps). Augmentation: random resized crop + flip; evaluation: centre crop,
top-1 / top-5. Distributed as train.py (torchrun, gradients averaged by minimask.distributed). Outputs in
--output: metrics.jsonl, model_<iter>.pth (resumable with --resume) and model_final.pth, whose "pretrain" entry
records what the equal-compute accounting needs (iterations, batch size, images seen, image size, backbone).
It runs the same training loop as train.py (minimask.engine.loop): exit codes 0 done or stopped by a signal,
1 a non-finite loss or gradient, 2 bad input (an unreadable image or checkpoints included).
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
from minimask.distributed import init_distributed
from minimask.engine import loop
from minimask.engine.checkpoint import code_version, list_checkpoints, prune_checkpoints, save_checkpoint
from minimask.engine.solver import build_optimizer, lr_at, lr_steps, scaled_lr
from minimask.tools.classification import (
    BACKBONE_KEYS,
    PIXEL_KEYS,
    ImageFolder,
    build_classifier,
    evaluate,
    topk_correct,
)

EXIT_USAGE = loop.EXIT_USAGE
REFERENCE_BATCH, REFERENCE_LR = 256, 0.1  # ImageNet ResNet recipe (He et al. 2016; Goyal et al. 2017)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="r50_fpn_gn", help="detector preset whose backbone is pre-trained")
    p.add_argument("--data", required=True, help="ImageNet-layout root: train/<class>/*, val/<class>/* (optional)")
    p.add_argument("--iters", type=int, default=1000, help="iterations")
    p.add_argument("--batch-size", type=int, default=256, help="global images per iteration")
    p.add_argument("--image-size", type=int, default=224, help="training / evaluation crop size in pixels")
    p.add_argument("--lr", type=float, help=f"learning rate (default {REFERENCE_LR} x batch / {REFERENCE_BATCH})")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-iters", type=int, default=500, help="linear warm-up (at most a tenth of the run)")
    p.add_argument("--clip-grad-norm", type=float, default=0.0, help="max global gradient norm (0: no clipping)")
    p.add_argument("--eval-period", type=int, default=0, help="iterations between evaluations (0: at the end)")
    p.add_argument("--checkpoint-period", type=int, default=1000)
    p.add_argument("--log-period", type=int, default=20)
    p.add_argument("--output", default="output/pretrain")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers per process")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="model.* overrides, e.g. model.backbone.norm=BN")
    return p


def prepare(args) -> dict:
    """Everything that depends on the user's input, checked before training starts."""
    if args.config not in PRESETS:
        raise UsageError(f"--config: unknown preset {args.config!r}; choose one of: {', '.join(PRESETS)}")
    for name, value, low in (("--iters", args.iters, 1), ("--batch-size", args.batch_size, 1),
                             ("--image-size", args.image_size, 32), ("--workers", args.workers, 0),
                             ("--warmup-iters", args.warmup_iters, 0), ("--eval-period", args.eval_period, 0),
                             ("--checkpoint-period", args.checkpoint_period, 0), ("--log-period", args.log_period, 1)):
        if value < low:
            raise UsageError(f"{name} must be >= {low}, got {value}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be finite and > 0, got {args.lr}")
    if not (math.isfinite(args.clip_grad_norm) and args.clip_grad_norm >= 0):
        raise UsageError(f"--clip-grad-norm must be finite and >= 0, got {args.clip_grad_norm}")
    cfg = minimask.get_config(args.config)
    for item in args.overrides:
        if "=" not in item or not item.strip().startswith("model."):
            raise UsageError(f"overrides must be model.key=value, got {item!r}")
        apply_override(cfg, item)  # ValueError naming an unknown key or a wrong type
    root = Path(args.data)
    if not (root / "train").is_dir():
        raise UsageError(f"--data: {root} has no train/ folder (expected train/<class>/<image>)")
    train_set = ImageFolder(root / "train", image_size=args.image_size, train=True)
    val_set = (ImageFolder(root / "val", image_size=args.image_size, train=False, classes=train_set.classes)
               if (root / "val").is_dir() else None)
    output = Path(args.output)
    ensure_writable_dir(output)
    if list_checkpoints(output) and not args.resume:
        raise UsageError(f"--output {output} already holds checkpoints; pass --resume to continue that run")
    dist_info = init_distributed()
    if args.batch_size % dist_info.world_size:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by the world size {dist_info.world_size}")
    torch.manual_seed(args.seed)
    model = build_classifier(cfg, num_classes=len(train_set.classes))
    return dict(args=args, cfg=cfg, model=model, train_set=train_set, val_set=val_set, output=output,
                dist_info=dist_info)


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
    lr = args.lr or scaled_lr(REFERENCE_LR, args.batch_size, REFERENCE_BATCH)
    steps = lr_steps(args.iters)
    model.to(device)
    optimizer = build_optimizer(model, lr=lr, weight_decay=args.weight_decay)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"pre-training the {args.config} backbone ({cfg.model.backbone.depth} layers, norm "
              f"{cfg.model.backbone.norm}, {params:,} parameters) on {len(train_set)} images of "
              f"{len(train_set.classes)} classes at {args.image_size} px: {args.iters} iterations, batch "
              f"{args.batch_size} ({world_size} process(es), {device}), lr {lr:g}, steps {steps}")
    log = loop.MetricsLog(output / "metrics.jsonl", enabled=rank == 0)
    run = PretrainRun(args=args, cfg=cfg, model=model, optimizer=optimizer, train_set=train_set, val_set=val_set,
                      output=output, dist_info=dist_info, log=log, lr=lr, steps=steps)
    return loop.run(loop.TrainingLoop(
        program="pretrain.py", model=model, optimizer=optimizer,
        loss_fn=functools.partial(classification_loss, device=device),
        batches=lambda iteration: iter(build_train_loader(
            train_set, batch_size_per_rank=per_rank, seed=args.seed, rank=rank, world_size=world_size,
            start=consumed_samples(iteration, per_rank, world_size), num_workers=args.workers, aspect_grouping=False)),
        lr_at=functools.partial(lr_at, base_lr=lr, max_iter=args.iters, steps=steps, warmup_iters=args.warmup_iters),
        max_iter=args.iters, output=output, dist_info=dist_info, checkpoint=run.checkpoint, finish=run.finish,
        log=log, resume=args.resume, restore=functools.partial(restore, model=model, optimizer=optimizer),
        evaluate=run.evaluate if val_set is not None else None, eval_period=args.eval_period,
        checkpoint_period=args.checkpoint_period, log_period=args.log_period, max_grad_norm=args.clip_grad_norm))


def classification_loss(model, batch, *, device) -> dict:
    """The loss function of the training loop: cross-entropy of the class logits, and the batch's top-1 (logged)."""
    images, labels = batch
    images = torch.stack(images).to(device)  # (B, 3, S, S)
    labels = torch.as_tensor(labels, dtype=torch.int64, device=device)  # (B,)
    logits = model(images)  # (B, K)
    top1 = topk_correct(logits.detach(), labels, ks=(1,))[0].float() * 100.0 / len(labels)
    return {"loss_classifier": F.cross_entropy(logits, labels), "top1": top1}


def restore(saved: dict, *, model, optimizer) -> None:
    model.backbone.load_state_dict(saved["model"])
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
        state = {"model": self.model.backbone_state(), "iteration": iteration, "rng": states,
                 "pretrain": self.info(iteration, top)}
        if name != "model_final.pth":
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
            print(f"done: {iteration} iterations; backbone weights {self.output / 'model_final.pth'}")
            print(json.dumps({k: v for k, v in self.info(iteration, None).items()
                              if k in ("iterations", "batch_size", "images_seen", "image_size")}))

    def info(self, iteration: int, top: dict | None) -> dict:
        """What the equal-compute accounting needs (stored in the checkpoint's "pretrain" entry)."""
        args, cfg = self.args, self.cfg
        return {"preset": args.config, "data": str(args.data), "classes": list(self.train_set.classes),
                "num_classes": len(self.train_set.classes), "train_images": len(self.train_set),
                "iterations": iteration, "batch_size": args.batch_size, "images_seen": iteration * args.batch_size,
                "image_size": args.image_size, "pixels_seen": iteration * args.batch_size * args.image_size ** 2,
                "lr": self.lr, "steps": list(self.steps), "seed": args.seed, "world_size": self.dist_info.world_size,
                "backbone": {k: getattr(cfg.model.backbone, k) for k in BACKBONE_KEYS},
                "pixel": {k: (list(v) if isinstance(v, tuple) else v)
                          for k, v in ((k, getattr(cfg.model, k)) for k in PIXEL_KEYS)},
                "top1": None if top is None else top["top1"], "top5": None if top is None else top["top5"],
                "code_version": code_version()}


if __name__ == "__main__":
    sys.exit(main())
