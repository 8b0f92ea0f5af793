"""minimask against torchvision's own Mask R-CNN, side by side in one process: training step and inference time.

    /path/to/venv-with-torchvision/bin/python benchmarks/bench_torchvision.py --size 512 --runs 7
    ... --kind v2 --compare r50_fpn_gn        # also time another minimask preset at the same input

torchvision is needed here only, as the thing to compare against; minimask never imports it. Both models get the
same weights (torchvision's random init, with a few classes' classifier biases raised so that every image yields
the full 100 detections, and random frozen-BN statistics), converted with `minimask.interop.model_zoo`, and the same image
and targets. minimask's `torchvision_maskrcnn_r50_fpn` preset (or `..._v2`) reproduces torchvision's conventions,
so both compute the same thing (tests/test_model_zoo.py checks that). Timings alternate between the models run by
run, so that a slow phase of the machine hits both; the median of the timed runs is reported, and the ratio
minimask / torchvision (1.00 = as fast; below 1 = faster).

A training step is forward + backward + SGD step on one batch; inference is `model(images)` under no_grad,
including torchvision's internal resize (the identity here: its min/max size are set to the image's) and
post-processing with mask pasting for both.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_model import _cpu_name, peak_memory_mb, raise_class_scores, step_fns  # noqa: E402

import minimask  # noqa: E402
from minimask.interop.torchvision_format import convert_torchvision_detection  # noqa: E402


def torchvision_model(kind: str, num_classes: int = 91):
    """torchvision's model as its builder makes it with pretrained weights (FrozenBN backbone for v1, stem and
    layer1 frozen), but randomly initialised; biases set so that detections exist."""
    import torchvision as tv
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, _default_anchorgen
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    if kind == "v2":
        bn = torch.nn.BatchNorm2d
        backbone = _resnet_fpn_extractor(tv.models.resnet50(weights=None), 3, norm_layer=bn)
        model = MaskRCNN(backbone, num_classes=num_classes, rpn_anchor_generator=_default_anchorgen(),
                         rpn_head=RPNHead(256, 3, conv_depth=2),
                         box_head=FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024], norm_layer=bn),
                         mask_head=MaskRCNNHeads(256, [256] * 4, 1, norm_layer=bn))
    else:
        backbone = _resnet_fpn_extractor(tv.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3)
        model = MaskRCNN(backbone, num_classes=num_classes)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                c = module.running_var.shape[0]
                module.weight.copy_(torch.rand(c, generator=g) * 0.4 + 0.2)
                module.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
        bias = model.roi_heads.box_predictor.cls_score.bias
        bias.zero_()
        bias[1:] = -2.0
        bias[[1, 3, 18, 44]] = 3.0
    return model


def make_inputs(height: int, width: int, num_objects: int = 4):
    """A smooth random image and `num_objects` box-shaped objects with masks (labels 1..90)."""
    g = torch.Generator().manual_seed(1)
    blobs = torch.rand(1, 3, height // 16, width // 16, generator=g)
    image = torch.nn.functional.interpolate(blobs, size=(height, width), mode="bilinear")[0].clamp(0, 1)
    xy = torch.rand(num_objects, 2, generator=g) * torch.tensor([width * 0.6, height * 0.6])
    wh = (torch.rand(num_objects, 2, generator=g) * 0.3 + 0.1) * torch.tensor([width, height])
    boxes = torch.cat([xy, xy + wh], dim=1)
    masks = torch.zeros(num_objects, height, width, dtype=torch.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        masks[k, y1:y2, x1:x2] = 1
    target = {"boxes": boxes, "labels": torch.tensor([1, 3, 18, 44][:num_objects] * (num_objects // 4 + 1))[
        :num_objects], "masks": masks}
    return [image], [target]


def alternate(fns: dict, warmup: int, runs: int) -> dict:
    """Median seconds of each callable, their timed runs interleaved (order reversed every other run)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(runs):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=["v1", "v2"], default="v1", help="maskrcnn_resnet50_fpn or its _v2")
    parser.add_argument("--size", type=int, default=512, help="shorter side; the longer one is 4/3 of it")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compare", nargs="*", default=[], metavar="PRESET",
                        help="other minimask presets to time at the same input (their own random init, the same "
                        "classes' scores raised)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    height, width = args.size, args.size * 4 // 3
    images, targets = make_inputs(height, width)

    tv_model = torchvision_model(args.kind)
    tv_model.transform.min_size, tv_model.transform.max_size = (height,), width  # no resize
    state, preset = convert_torchvision_detection(tv_model.state_dict())
    model = minimask.build_model(minimask.get_config(preset))
    model.load_state_dict(state, strict=False)  # pixel mean/std and the label map stay the preset's
    with torch.no_grad():  # sanity: same detections (to float noise) before timing anything
        tv_out, mm_out = tv_model.eval()(images)[0], model.eval()(images)[0]
    if len(tv_out["boxes"]) != len(mm_out["boxes"]):
        raise SystemExit(f"the two models disagree: {len(tv_out['boxes'])} vs {len(mm_out['boxes'])} detections")

    models = {"torchvision": tv_model, "minimask": model}
    for name in args.compare:
        torch.manual_seed(0)
        models[name] = minimask.build_model(minimask.get_config(name, ["model.roi_heads.num_classes=90"]))
        raise_class_scores(models[name], classes=(1, 3, 18, 44))  # the same load on post-processing
    train_fns, infer_fns = {}, {}
    for name, m in models.items():
        train_fns[name], infer_fns[name] = step_fns(m, images, targets)
    train = alternate(train_fns, args.warmup, args.runs)
    infer = alternate(infer_fns, args.warmup, args.runs)
    result = {"machine": _cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "torchvision": __import__("torchvision").__version__, "kind": args.kind, "preset": preset,
              "size": [height, width], "detections": len(mm_out["boxes"]), "runs": args.runs,
              "train_s": train, "infer_s": infer,
              "train_ratio": train["minimask"] / train["torchvision"],
              "infer_ratio": infer["minimask"] / infer["torchvision"],
              "peak_memory_mb": peak_memory_mb(torch.device("cpu"))}
    for name in models:
        print(f"{name:>32}: train {train[name]:.3f} s  inference {infer[name]:.3f} s"
              f"  ({train[name] / train['torchvision']:.3f}x / {infer[name] / infer['torchvision']:.3f}x torchvision)")
    print(f"{'':>32}  {result['detections']} detections at {height} x {width}, {result['threads']} threads, "
          f"{result['machine']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
