"""Benchmark of minimask's hot ops: RoIAlign forward+backward and NMS, side by side with torchvision if importable.

    python benchmarks/bench_ops.py [--device cpu|cuda] [--json out.json] [--repeats 5] [--threads 2]

Run it from the repository root (minimask must be importable); run it with a Python that has torchvision to get the
comparison column. Every (case, implementation) pair runs in its own subprocess so that its peak memory is its own:
after a warm-up call, the median wall time of `--repeats` calls (3 if they take over 20 s) is reported, and the
peak memory is
* cuda: torch.cuda.max_memory_allocated() minus the memory allocated before the first call;
* cpu: the peak resident set size minus the RSS just before the first call, i.e. the extra memory the op needed
  at its worst moment, including its output and the input gradient. The peak counter (VmHWM) is reset to the
  current RSS before the first call via /proc/self/clear_refs; where that fails, ru_maxrss (lifetime peak) is used.
"""
import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name -> (kind, parameters). RoIAlign: 1,000 RoIs on one 256 x 200 x 336 map (stride 4 of an 800 x 1344 image),
# box sides uniform in [16, max_side] image pixels, aligned=True.
CASES = {
    "roi_align 7x7 sr=2": ("roi_align", dict(out=7, sr=2, max_side=400)),
    "roi_align 7x7 adaptive": ("roi_align", dict(out=7, sr=0, max_side=400)),
    "roi_align 14x14 sr=2": ("roi_align", dict(out=14, sr=2, max_side=400)),
    "roi_align 14x14 adaptive": ("roi_align", dict(out=14, sr=0, max_side=400)),
    "roi_align 7x7 adaptive, sides<=800": ("roi_align", dict(out=7, sr=0, max_side=800)),
    "roi_align 14x14 adaptive, sides<=800": ("roi_align", dict(out=14, sr=0, max_side=800)),
    "nms 2,000 boxes": ("nms", dict(n=2000)),
    "nms 20,000 boxes": ("nms", dict(n=20000)),
}


def random_boxes(n, max_side, generator, image_hw=(800, 1344)):
    """(n, 4) xyxy boxes with sides uniform in [16, max_side] and centres uniform over the image."""
    h, w = image_hw
    sides = torch.empty(n, 2).uniform_(16, max_side, generator=generator)  # (n, 2) as (w, h)
    centres = torch.rand(n, 2, generator=generator) * torch.tensor([w, h])  # (n, 2)
    return torch.cat([centres - sides / 2, centres + sides / 2], dim=1)  # (n, 4)


def setup_case(kind, params, impl, device):
    """Build the inputs and return a no-argument callable that runs the op once (and syncs)."""
    gen = torch.Generator().manual_seed(0)
    if impl == "torchvision":
        import torchvision.ops as ops
        roi_align, nms = ops.roi_align, ops.nms
    else:
        from minimask.ops.roi_align import roi_align
        nms = None
        if kind == "nms":
            from minimask.ops.boxes import nms
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    if kind == "roi_align":
        feats = torch.randn(1, 256, 200, 336, generator=gen).to(device).requires_grad_()
        boxes = random_boxes(1000, params["max_side"], gen)
        rois = torch.cat([torch.zeros(len(boxes), 1), boxes], dim=1).to(device)  # (K, 5)
        grad_out = torch.randn(1000, 256, params["out"], params["out"], generator=gen).to(device)

        def run():
            out = roi_align(feats, rois, params["out"], 0.25, params["sr"], True)
            torch.autograd.grad(out, feats, grad_out)
            sync()
        return run

    # NMS: boxes clustered around a few objects, so suppression actually happens.
    n = params["n"]
    centres = torch.rand(max(1, n // 40), 2, generator=gen) * torch.tensor([1344.0, 800.0])
    pick = torch.randint(0, len(centres), (n,), generator=gen)
    jitter = torch.randn(n, 2, generator=gen) * 12
    sides = torch.empty(n, 2).uniform_(32, 256, generator=gen)
    xy = centres[pick] + jitter
    boxes = torch.cat([xy - sides / 2, xy + sides / 2], dim=1).to(device)  # (n, 4)
    scores = torch.rand(n, generator=gen).to(device)

    def run():
        nms(boxes, scores, 0.7)
        sync()
    return run


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss():
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; returns False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(was_reset):
    if was_reset:
        return _status_kib("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # lifetime peak (KiB on Linux)


def worker(name, impl, device, repeats, threads):
    """Run one case in this process and print a JSON line with the median time and peak memory."""
    torch.set_num_threads(threads)
    kind, params = CASES[name]
    run = setup_case(kind, params, impl, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        was_reset = reset_peak_rss()
        base = _status_kib("VmRSS") * 1024
    run()  # warm-up (also the first touch of every buffer, so it sets the peak)
    times = []
    while len(times) < repeats and (len(times) < 3 or sum(times) < 20):  # slow cases: 3 runs are enough
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss_bytes(was_reset) - base
    print(json.dumps(dict(time_s=statistics.median(times), peak_mb=max(peak, 0) / 2**20)))


def run_in_subprocess(name, impl, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--impl", impl, "--device", args.device,
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return dict(error=(proc.stderr.strip().splitlines() or ["failed"])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker")
    parser.add_argument("--cases", nargs="*", help="substrings selecting cases (default: all)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="minimask", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.impl, args.device, args.repeats, args.threads)

    try:
        import torchvision
        impls = ["minimask", "torchvision"]
        tv_version = torchvision.__version__
    except ImportError:
        impls, tv_version = ["minimask"], None
    names = [n for n in CASES if not args.cases or any(s in n for s in args.cases)]
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu}, {args.threads} threads"
    print(f"device: {device}; torch {torch.__version__}; torchvision {tv_version}; median of {args.repeats} runs")
    print(f"{'case':40s} {'minimask':>17s} {'torchvision':>17s} {'ratio':>6s}")
    results = []
    for name in names:
        row = dict(case=name)
        for impl in impls:
            row[impl] = run_in_subprocess(name, impl, args)
        cells = []
        for impl in ["minimask", "torchvision"]:
            r = row.get(impl)
            if r is None:
                cells.append("-")
            elif "error" in r:
                cells.append("error")
            else:
                cells.append(f"{r['time_s'] * 1e3:7.1f}ms {r['peak_mb']:5.0f}MB")
        mm, tv = row.get("minimask", {}), row.get("torchvision", {})
        ratio = mm["time_s"] / tv["time_s"] if "time_s" in mm and "time_s" in tv else math.nan
        row["ratio"] = None if math.isnan(ratio) else ratio
        ratio_cell = "-" if math.isnan(ratio) else f"{ratio:.2f}"
        print(f"{name:40s} {cells[0]:>17s} {cells[1]:>17s} {ratio_cell:>6s}", flush=True)
        for impl in impls:
            if "error" in row[impl]:
                print(f"    {impl}: {row[impl]['error']}")
        results.append(row)
    print("time: forward+backward for roi_align, the call for nms; MB: peak extra memory; "
          "ratio: minimask / torchvision time")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, torch=torch.__version__, torchvision=tv_version, results=results), f,
                      indent=2)


if __name__ == "__main__":
    main()
