"""Training and inference time per image, and peak memory, for a preset at a given image size.

    python benchmarks/bench_model.py --config r50_fpn_gn --size 800 1333 --batch 2
    python benchmarks/bench_model.py --config tiny --size 128 128 --batch 2 --json out.json

Random images with a few random boxes (and box-filled masks / keypoints where the preset has those heads); a few
warm-up iterations, then the median of the timed ones. Peak memory is CUDA max-allocated on a GPU and the process's
peak resident set size (ru_maxrss, which includes everything the process touched before) on the CPU.

`--stages` adds a split of the time by stage, measured in separate runs (each stage boundary synchronises the GPU,
which the headline figures avoid): backbone + FPN, RPN, RoIAlign, the box / mask / keypoint heads, and the
post-processing (box decoding + NMS, mask pasting, keypoint decoding); in training the backward pass + SGD step is
one more stage and the forward rows are the forward pass only. `--detections N` makes
inference return N detections per image: the classifier biases of up to four classes are raised above the others
(as in a trained model, a few thousand candidates pass the 0.05 score threshold), so that NMS, mask pasting and
keypoint decoding work at full load.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minimask  # noqa: E402


def make_batch(cfg, batch, height, width, device, num_objects=4):
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, height, width, generator=g).to(device))
        xy = torch.rand(num_objects, 2, generator=g) * torch.tensor([width * 0.6, height * 0.6])
        wh = (torch.rand(num_objects, 2, generator=g) * 0.3 + 0.1) * torch.tensor([width, height])
        boxes = torch.cat([xy, xy + wh], dim=1)
        target = {"boxes": boxes.to(device),
                  "labels": torch.randint(1, cfg.model.roi_heads.num_classes + 1, (num_objects,), generator=g).to(device)}
        if cfg.model.mask_head.enabled:
            masks = torch.zeros(num_objects, height, width, dtype=torch.uint8)
            for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
                masks[k, y1:y2, x1:x2] = 1
            target["masks"] = masks.to(device)
        if cfg.model.keypoint_head.enabled:
            k = cfg.model.keypoint_head.num_keypoints
            pts = boxes[:, None, :2] + torch.rand(num_objects, k, 2, generator=g) * (boxes[:, None, 2:] - boxes[:, None, :2])
            target["keypoints"] = torch.cat([pts, torch.full((num_objects, k, 1), 2.0)], dim=2).to(device)
        targets.append(target)
    return images, targets


@torch.no_grad()
def raise_class_scores(model, classes=(1, 2, 3, 4)):
    """Background and most classes at bias -2, a few at +3: with random weights, every proposal then scores above
    the threshold for those classes, as a trained model's confident proposals do."""
    for module in model.modules():
        if hasattr(module, "cls_score"):
            bias = module.cls_score.bias
            bias.fill_(-2.0)
            bias[[c for c in classes if c < bias.shape[0]]] = 3.0


def step_fns(model, images, targets):
    """(train_step, infer): forward + backward + SGD step in train mode (given a StageTimer, the backward and the
    step are timed as the stage "backward+step"); model(images) in eval mode, no grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-5, momentum=0.9, weight_decay=1e-4)

    def train_step(timer=None):
        model.train()
        losses = model(images, targets)
        if timer is not None:
            timer._enter("backward+step")
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        if timer is not None:
            timer._exit("backward+step")

    @torch.no_grad()
    def infer():
        model.eval()
        return model(images)

    return train_step, infer


def timed(fn, device, warmup, runs):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class StageTimer:
    """Seconds spent per stage, by forward hooks on the model's parts and by wrapping the post-processing functions
    where `minimask.model.roi_heads` and `minimask.interop.torchvision_conventions` call them. Stages do not
    overlap; time outside all of them is "other" (input normalisation and padding, proposal sampling, target
    building, loss functions)."""

    MODULES = {"backbone": "backbone+fpn", "fpn": "backbone+fpn", "rpn": "rpn", "box_head": "box_head",
               "box_predictor": "box_head", "box_heads": "box_head", "box_predictors": "box_head",
               "mask_head": "mask_head", "keypoint_head": "keypoint_head"}
    FUNCTIONS = {"multiscale_roi_align": "roi_align", "fast_rcnn_inference": "postprocess_boxes",
                 "paste_masks": "postprocess_masks", "paste_masks_legacy": "postprocess_masks",
                 "heatmaps_to_keypoints": "postprocess_keypoints"}

    def __init__(self, model, device):
        from minimask.interop import torchvision_conventions
        from minimask.model import roi_heads
        self.device, self.seconds, self._start = device, {}, None
        self._patched = []
        for name, stage in self.MODULES.items():
            for module in self._find(model, name):
                module.register_forward_pre_hook(lambda *_, s=stage: self._enter(s))
                module.register_forward_hook(lambda *_, s=stage: self._exit(s))
        for module in (roi_heads, torchvision_conventions):
            for name, stage in self.FUNCTIONS.items():
                if hasattr(module, name):  # each module calls the functions it imported by name
                    original = getattr(module, name)
                    self._patched.append((module, name, original))
                    setattr(module, name, self._wrap(original, stage))

    @staticmethod
    def _find(model, name):
        for attr in (name, f"roi_heads.{name}"):
            obj = model
            for part in attr.split("."):
                obj = getattr(obj, part, None)
            if obj is not None:
                return list(obj) if isinstance(obj, torch.nn.ModuleList) else [obj]
        return []

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _enter(self, stage):
        self._sync()
        self._start = time.perf_counter()

    def _exit(self, stage):
        self._sync()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - self._start

    def _wrap(self, fn, stage):
        def timed_fn(*args, **kwargs):
            self._enter(stage)
            out = fn(*args, **kwargs)
            self._exit(stage)
            return out
        return timed_fn

    def measure(self, fn, runs):
        """Median over `runs` calls of each stage's seconds, plus "other" and "total"."""
        per_run = []
        for _ in range(runs):
            self.seconds = {}
            self._sync()
            start = time.perf_counter()
            fn(self)
            self._sync()
            total = time.perf_counter() - start
            row = dict(self.seconds)
            row["other"] = total - sum(row.values())
            row["total"] = total
            per_run.append(row)
        return {k: statistics.median(r.get(k, 0.0) for r in per_run) for k in per_run[0]}

    def remove(self):
        for owner, name, original in self._patched:
            setattr(owner, name, original)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="r50_fpn_gn")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--stages", action="store_true", help="also split the time by stage (separate runs)")
    parser.add_argument("--detections", type=int, help="raise a few classes' scores so that inference returns this "
                        "many detections per image")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.detections:
        args.overrides += [f"model.roi_heads.detections_per_image={args.detections}"]
    cfg = minimask.get_config(args.config, args.overrides)
    model = minimask.build_model(cfg).to(device)
    if args.detections:
        raise_class_scores(model)
    images, targets = make_batch(cfg, args.batch, *args.size, device)
    train_step, infer = step_fns(model, images, targets)

    model.train()
    train_s = timed(train_step, device, args.warmup, args.runs)
    model.eval()
    infer_s = timed(infer, device, args.warmup, args.runs)
    detections = sum(len(d["boxes"]) for d in infer()) / args.batch
    result = {
        "config": args.config, "size": list(args.size), "batch": args.batch, "device": str(device),
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_s_per_image": train_s / args.batch, "infer_s_per_image": infer_s / args.batch,
        "detections_per_image": detections, "peak_memory_mb": peak_memory_mb(device),
    }
    if args.stages:
        timer = StageTimer(model, device)

        result["train_stages_s"] = timer.measure(train_step, args.runs)
        result["infer_stages_s"] = timer.measure(lambda t: infer(), args.runs)
        timer.remove()
    for key, value in result.items():
        if isinstance(value, dict):
            total = value["total"]
            print(f"{key:>18}: " + ", ".join(f"{k} {v:.3f} ({100 * v / total:.0f}%)" for k, v in value.items()))
        else:
            print(f"{key:>18}: {value:.4f}" if isinstance(value, float) else f"{key:>18}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
