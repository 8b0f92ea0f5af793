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
and 8/9 of the run (minimask.solver.lr_steps). Augmentation: random resized crop + flip; evaluation: centre crop,
top-1 / top-5. Distributed as train.py (torchrun, gradients averaged by minimask.distributed). Outputs in
--output: metrics.jsonl, model_<iter>.pth (resumable with --resume) and model_final.pth, whose "pretrain" entry
records what the equal-compute accounting needs (iterations, batch size, images seen, image size, backbone).
Exit codes: 0 done, 1 non-finite loss, 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import minimask
from minimask.checkpoint import (checkpoint_name, list_checkpoints, load_latest, prune_checkpoints, rng_state,
                                 save_checkpoint, set_rng_state)
from minimask.classification import BACKBONE_KEYS, PIXEL_KEYS, ImageFolder, build_classifier, evaluate, topk_correct
from minimask.config import PRESETS, apply_override
from minimask.data.samplers import build_train_loader, consumed_samples
from minimask.distributed import (GradientAllReduce, barrier, broadcast_parameters, init_distributed,
                                  reduce_dict_mean)
from minimask.run_log import append_metrics, read_metrics, write_metrics
from minimask.runtime import ArgumentParser, StopRequest, UsageError, code_version, ensure_writable_dir
from minimask.solver import build_optimizer, clip_grad_norm, lr_at, lr_steps, scaled_lr

EXIT_DIVERGED, EXIT_USAGE = 1, 2
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
    rank, world_size, device = dist_info.rank, dist_info.world_size, dist_info.device
    main_process = rank == 0
    per_rank = args.batch_size // world_size
    lr = args.lr or scaled_lr(REFERENCE_LR, args.batch_size, REFERENCE_BATCH)
    steps = lr_steps(args.iters)
    model.to(device)
    optimizer = build_optimizer(model, lr=lr, weight_decay=args.weight_decay)
    iteration, saved = 0, None
    if args.resume:
        saved, path = load_latest(output)
        if saved is not None:
            model.backbone.load_state_dict(saved["model"])
            if "optimizer" in saved:
                optimizer.load_state_dict(saved["optimizer"])
            iteration = int(saved["iteration"])
            if main_process:
                print(f"resumed from {path} at iteration {iteration}")
    if iteration >= args.iters:
        print(f"nothing to do: the run in {output} already finished {iteration} iterations")
        return 0
    if world_size > 1:
        broadcast_parameters(model)
    all_reduce = GradientAllReduce([p for p in model.parameters() if p.requires_grad]) if world_size > 1 else None
    loader = build_train_loader(train_set, batch_size_per_rank=per_rank, seed=args.seed, rank=rank,
                                world_size=world_size, start=consumed_samples(iteration, per_rank, world_size),
                                num_workers=args.workers, aspect_grouping=False)
    batches = iter(loader)
    if saved is not None:
        set_rng_state(saved["rng"][rank % len(saved["rng"])])
    if main_process:
        params = sum(p.numel() for p in model.parameters())
        print(f"pre-training the {args.config} backbone ({cfg.model.backbone.depth} layers, norm "
              f"{cfg.model.backbone.norm}, {params:,} parameters) on {len(train_set)} images of "
              f"{len(train_set.classes)} classes at {args.image_size} px: {args.iters} iterations, batch "
              f"{args.batch_size} ({world_size} process(es), {device}), lr {lr:g}, steps {steps}")

    def info(top: dict | None) -> dict:
        return {"preset": args.config, "data": str(args.data), "classes": list(train_set.classes),
                "num_classes": len(train_set.classes), "train_images": len(train_set), "iterations": iteration,
                "batch_size": args.batch_size, "images_seen": iteration * args.batch_size,
                "image_size": args.image_size, "pixels_seen": iteration * args.batch_size * args.image_size ** 2,
                "lr": lr, "steps": list(steps), "seed": args.seed, "world_size": world_size,
                "backbone": {k: getattr(cfg.model.backbone, k) for k in BACKBONE_KEYS},
                "pixel": {k: (list(v) if isinstance(v, tuple) else v)
                          for k, v in ((k, getattr(cfg.model, k)) for k in PIXEL_KEYS)},
                "top1": None if top is None else top["top1"], "top5": None if top is None else top["top5"],
                "code_version": code_version()}

    def checkpoint(name: str, final_metrics: dict | None = None) -> None:
        states = [rng_state()]
        if world_size > 1:
            states = [None] * world_size
            torch.distributed.all_gather_object(states, rng_state())
        if not main_process:
            return
        state = {"model": model.backbone_state(), "iteration": iteration, "rng": states,
                 "pretrain": info(final_metrics)}
        if name != "model_final.pth":
            state["optimizer"] = optimizer.state_dict()
        save_checkpoint(output / name, state)
        prune_checkpoints(output, 2)

    metrics_file = output / "metrics.jsonl"
    history = read_metrics(metrics_file, before=iteration) if main_process else []
    if main_process:
        write_metrics(metrics_file, history)
    model.train()
    window, start = {}, time.perf_counter()
    with StopRequest() as stop:
        while iteration < args.iters:
            images, labels = next(batches)
            images = torch.stack(images).to(device)  # (B, 3, S, S)
            labels = torch.as_tensor(labels, dtype=torch.int64, device=device)  # (B,)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(iteration, base_lr=lr, max_iter=args.iters, steps=steps,
                                    warmup_iters=args.warmup_iters)
            logits = model(images)  # (B, K)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if all_reduce is not None:
                all_reduce.finish()
            logged = reduce_dict_mean({"loss": loss.detach(),
                                       "top1": topk_correct(logits.detach(), labels, ks=(1,))[0] * 100.0 / len(labels),
                                       "stop": torch.tensor(float(bool(stop.signal_name)))})
            if not math.isfinite(float(logged["loss"])):  # one sync per iteration, as train.py
                print(f"pretrain.py: error: non-finite loss at iteration {iteration + 1}; stopping", file=sys.stderr)
                return EXIT_DIVERGED
            if args.clip_grad_norm:
                clip_grad_norm([p for p in model.parameters() if p.grad is not None], args.clip_grad_norm)
            optimizer.step()
            iteration += 1
            for k in ("loss", "top1"):
                window[k] = window.get(k, 0.0) + float(logged[k])
            window["n"] = window.get("n", 0) + 1
            last = iteration == args.iters
            if main_process and (iteration % args.log_period == 0 or last):
                record = {"iter": iteration, "kind": "train", "loss": window["loss"] / window["n"],
                          "top1": window["top1"] / window["n"], "lr": optimizer.param_groups[0]["lr"],
                          "sec_per_iter": (time.perf_counter() - start) / window["n"]}
                append_metrics(metrics_file, record, history)
                print(f"iter {iteration}/{args.iters}  loss {record['loss']:.3f}  top1 {record['top1']:.1f}  "
                      f"lr {record['lr']:.3g}  {record['sec_per_iter']:.2f} s/iter", flush=True)
            if iteration % args.log_period == 0 or last:
                window, start = {}, time.perf_counter()
            if float(logged["stop"]) and not last:
                checkpoint(checkpoint_name(iteration))
                print(f"stop requested: saved a checkpoint at iteration {iteration}; rerun with --resume")
                return 0
            if not last and args.checkpoint_period and iteration % args.checkpoint_period == 0:
                checkpoint(checkpoint_name(iteration))
            if val_set is not None and (last or (args.eval_period and iteration % args.eval_period == 0)):
                top = evaluate(model, val_set, device=device, rank=rank, world_size=world_size,
                               batch_size=max(per_rank, 16), num_workers=args.workers)
                if main_process:
                    append_metrics(metrics_file, {"iter": iteration, "kind": "eval", **top}, history)
                    print(f"evaluation at iteration {iteration}: top-1 {top['top1']:.2f}%, top-5 {top['top5']:.2f}% "
                          f"on {top['images']} images", flush=True)
                if last:
                    checkpoint("model_final.pth", top)
                start = time.perf_counter()
            elif last:
                checkpoint("model_final.pth")
    if main_process:
        print(f"done: {args.iters} iterations; backbone weights {output / 'model_final.pth'}")
        print(json.dumps({k: v for k, v in info(None).items() if k in ("iterations", "batch_size", "images_seen",
                                                                        "image_size")}))
    if world_size > 1:
        barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
