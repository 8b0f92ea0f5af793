"""The GPU check: minimask's torch-op kernels on CUDA against the CPU (and torchvision where installed), then the time
and memory of a training step and an inference on one GPU. Ready for the first GPU, kept from rotting by its dry run.

    python benchmarks/gpu_check.py --output gpu_check/            (one GPU: about 5 minutes)
    python benchmarks/gpu_check.py --dry-run --output /tmp/check   (the same code on the CPU: tiny preset, 128 px)

Checks (each a row of the report, "ok" or what differed):
- RoIAlign, forward and backward, aligned and not, adaptive and fixed sampling: CUDA against the CPU within 1e-4
  (fp32), and against torchvision's CUDA kernel where torchvision is installed;
- NMS and batched NMS: the same kept boxes on CUDA and the CPU (and torchvision), scores without ties;
- SyncBatchNorm in one process: CUDA against the CPU, forward and backward, within 1e-4.
Timing: a training step (forward, backward, SGD) of `r50_fpn_gn` on 2 images of 800 x 1333 in fp32 and with AMP,
and an inference, as medians of timed runs after warm-up, with peak memory; torchvision's
`maskrcnn_resnet50_fpn_v2` on the same batch in the same run where torchvision is installed. Writes
`gpu_check.json` and `gpu_check.md` to --output. Exit code 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minimask  # noqa: E402
from benchmarks.bench_model import make_batch  # noqa: E402
from minimask.model.norm import SyncBatchNorm  # noqa: E402
from minimask.ops import batched_nms, nms, roi_align  # noqa: E402


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item() if a.numel() else 0.0


def check_roi_align(device: torch.device, tv_ops) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 16, 40, 56, generator=g)
    xy = torch.rand(64, 2, generator=g) * torch.tensor([200.0, 150.0])
    boxes = torch.cat([xy, xy + torch.rand(64, 2, generator=g) * 120 + 1], dim=1)
    rois = torch.cat([torch.randint(0, 2, (64, 1), generator=g).float(), boxes], dim=1)
    grad = torch.randn(64, 16, 7, 7, generator=g)
    rows = []
    for aligned in (True, False):
        for sampling in (0, 2):
            outs, grads = {}, {}
            for where, dev in (("cpu", torch.device("cpu")), ("device", device)):
                x = features.to(dev).requires_grad_()
                out = roi_align(x, rois.to(dev), (7, 7), 0.25, sampling, aligned)
                (grads[where],) = torch.autograd.grad(out, x, grad.to(dev))
                outs[where] = out
            worst = max(_max_diff(outs["cpu"], outs["device"]), _max_diff(grads["cpu"], grads["device"]))
            row = {"check": f"roi_align aligned={aligned} sampling={sampling}", "max_abs_diff": worst,
                   "ok": worst <= 1e-4}
            if tv_ops is not None:
                x = features.to(device).requires_grad_()
                out = tv_ops.roi_align(x, rois.to(device), (7, 7), 0.25, sampling, aligned)
                (tv_grad,) = torch.autograd.grad(out, x, grad.to(device))
                row["torchvision_max_abs_diff"] = max(_max_diff(out, outs["device"]),
                                                      _max_diff(tv_grad, grads["device"]))
                row["ok"] = row["ok"] and row["torchvision_max_abs_diff"] <= 1e-4
            rows.append(row)
    return rows


def check_nms(device: torch.device, tv_ops) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(3000, 2, generator=g) * 500
    boxes = torch.cat([xy, xy + torch.rand(3000, 2, generator=g) * 80 + 5], dim=1)
    scores = torch.randperm(3000, generator=g).float() / 3000  # distinct scores: no ties
    groups = torch.randint(0, 20, (3000,), generator=g)
    rows = []
    for name, fn in (("nms", lambda b, s, i: nms(b, s, 0.5)),
                     ("batched_nms", lambda b, s, i: batched_nms(b, s, i, 0.5))):
        cpu = fn(boxes, scores, groups)
        dev = fn(boxes.to(device), scores.to(device), groups.to(device)).cpu()
        row = {"check": name, "kept": len(cpu), "ok": torch.equal(cpu, dev)}
        if tv_ops is not None:
            tv = (tv_ops.nms(boxes.to(device), scores.to(device), 0.5) if name == "nms"
                  else tv_ops.batched_nms(boxes.to(device), scores.to(device), groups.to(device), 0.5)).cpu()
            row["torchvision_same"] = torch.equal(tv, dev)
            row["ok"] = row["ok"] and row["torchvision_same"]
        rows.append(row)
    return rows


def check_sync_bn(device: torch.device) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 8, 10, 12, generator=g)
    grad = torch.randn(4, 8, 10, 12, generator=g)
    results = {}
    for where, dev in (("cpu", torch.device("cpu")), ("device", device)):
        torch.manual_seed(0)
        bn = SyncBatchNorm(8).to(dev).train()
        inp = x.to(dev).requires_grad_()
        out = bn(inp)
        (g_in,) = torch.autograd.grad(out, inp, grad.to(dev))
        results[where] = (out, g_in, bn.running_mean, bn.running_var)
    worst = max(_max_diff(a, b) for a, b in zip(results["cpu"], results["device"]))
    return [{"check": "SyncBatchNorm (one process)", "max_abs_diff": worst, "ok": worst <= 1e-4}]


def _timed(fn, device, warmup: int, runs: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_mb(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def time_model(name: str, model, images, targets, device, warmup: int, runs: int, amp: bool) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-5, momentum=0.9)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16,
                              enabled=amp)

    def train_step():
        model.train()
        with autocast:
            loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def infer():
        model.eval()
        with autocast:
            model(images)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_s = _timed(train_step, device, warmup, runs)
    train_mb = _peak_mb(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    infer_s = _timed(infer, device, warmup, runs)
    return {"model": name, "amp": amp, "train_s_per_iter": train_s, "train_peak_mb": train_mb,
            "infer_s_per_iter": infer_s, "infer_peak_mb": _peak_mb(device)}


def timing(config: str, size, batch: int, device, warmup: int, runs: int, tv_models) -> list[dict]:
    torch.manual_seed(0)
    cfg = minimask.get_config(config)
    images, targets = make_batch(cfg, batch, *size, device)
    rows = []
    for amp in (False, True):
        model = minimask.build_model(cfg).to(device)
        rows.append(time_model(f"minimask {config}", model, images, targets, device, warmup, runs, amp))
        del model
    if tv_models is not None:
        model = tv_models.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91,
                                                   min_size=min(size), max_size=max(size)).to(device)
        tv_targets = [{**t, "labels": t["labels"].clamp(max=90)} for t in targets]
        for amp in (False, True):
            rows.append(time_model("torchvision maskrcnn_resnet50_fpn_v2", model, images, tv_targets, device,
                                   warmup, runs, amp))
    return rows


def markdown(report: dict) -> str:
    versions = f"torch {report['torch']}" + (f", torchvision {report['torchvision']}" if report["torchvision"] else "")
    lines = [f"GPU check on {report['device']} ({versions})",
             "", "| check | result | detail |", "|---|---|---|"]
    for row in report["checks"]:
        detail = ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                           if k not in ("check", "ok"))
        lines.append(f"| {row['check']} | {'ok' if row['ok'] else 'FAILED'} | {detail} |")
    lines += ["", f"Timing: {report['timing_setup']}", "",
              "| model | AMP | train s/iter | train peak MB | inference s/iter | inference peak MB |",
              "|---|---|---|---|---|---|"]
    for row in report["timing"]:
        lines.append(f"| {row['model']} | {'yes' if row['amp'] else 'no'} | {row['train_s_per_iter']:.3f} | "
                     f"{row['train_peak_mb']:.0f} | {row['infer_s_per_iter']:.3f} | {row['infer_peak_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="on the CPU, the tiny preset at 128 px (for the test suite)")
    p.add_argument("--output", default="gpu_check", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args(argv)
    if args.dry_run:
        device, config, size, batch, warmup, runs = torch.device("cpu"), "tiny", (128, 128), 2, 1, 1
    elif torch.cuda.is_available():
        device, config, size, batch, warmup, runs = torch.device("cuda"), "r50_fpn_gn", (800, 1333), 2, 3, args.runs
    else:
        print("gpu_check.py: error: no CUDA device (use --dry-run to run the same code on the CPU)", file=sys.stderr)
        return 2
    try:
        import torchvision
        tv_ops, tv_models, tv_version = torchvision.ops, torchvision.models.detection, torchvision.__version__
    except ImportError:
        tv_ops = tv_models = tv_version = None
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)",
              "torch": torch.__version__, "torchvision": tv_version,
              "timing_setup": f"{config}, {batch} images of {size[0]} x {size[1]}, "
                              f"median of {runs} after {warmup} warm-up",
              "checks": check_roi_align(device, tv_ops) + check_nms(device, tv_ops) + check_sync_bn(device)}
    report["timing"] = timing(config, size, batch, device, warmup, runs, tv_models)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(row["ok"] for row in report["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
