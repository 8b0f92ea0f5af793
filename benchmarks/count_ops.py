"""Operations, kernel launches and host syncs per training step and per inference, counted on the CPU.

On a GPU a pure-torch detector loses time mostly through the number of small operations it launches and the times it
waits for the device, and both can be counted without a GPU. Every aten operation that PyTorch dispatches is seen by
a dispatch mode (`OpCounter`), in the forward, the backward and the optimizer step of one training iteration, and in
one inference. The rules (BENCHMARKS.md, "Operation counts"):

- ops: every aten operation dispatched;
- kernels: the ops that launch a kernel on a GPU, i.e. all but views (`OpOverload.is_view`, `_unsafe_view`),
  `empty*` / `new_empty*`, `detach` and `lift_fresh`;
- syncs: the ops after which the host waits for the device: `_local_scalar_dense` (`.item()`, `bool(t)`, ...),
  `equal` (a Python bool), `nonzero`, `masked_select`, `unique*`, `bincount` (its length is the data's maximum),
  `repeat_interleave` with a tensor of repeats and no `output_size`, `index` / `index_put_` with a boolean index;
  and copies of results to the host (`.tolist()`, `.numpy()`, `.cpu()`, seen by a function mode).

    python benchmarks/count_ops.py --config r50_fpn_gn --size 512 683 --batch 1
    python benchmarks/count_ops.py --config demo --size 144 192 --batch 4
    python benchmarks/count_ops.py --library torchvision --size 512 683     (torchvision's maskrcnn_resnet50_fpn)
    python benchmarks/count_ops.py --library detectron2 --size 512 683      (its scratch_mask_rcnn_R_50_FPN_9x_gn)

minimask's iteration is `minimask.engine.loop.train_step`'s: forward and loss; backward; the gradient norm and the
one flag check, then the fused SGD step (phase "step"). The other libraries' models run with their own SGD.
Weights are random (same seed); images are random with four boxes each (and box-filled masks / polygons). One
iteration and one inference warm up first (caches such as the anchors'); the second is counted. Counts that depend
on data (NMS, sampling) vary a little with the seed.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NO_KERNEL = {"_unsafe_view", "detach", "lift_fresh", "_record_function_enter_new", "_record_function_exit"}
SYNC_OPS = {"_local_scalar_dense", "equal", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
            "unique_consecutive", "unique_dim_consecutive", "bincount"}
HOST_COPIES = {"tolist", "numpy", "cpu"}


def launches_kernel(func) -> bool:
    name = func._overloadpacket.__name__
    return not (func.is_view or name in NO_KERNEL or name.startswith(("empty", "new_empty")))


def synchronizes(func, args, kwargs) -> bool:
    name = func._overloadpacket.__name__
    if name in SYNC_OPS:
        return True
    if name == "repeat_interleave":  # an int of repeats (overload self_int) needs no sync
        return func._overloadname in ("Tensor", "self_Tensor") and kwargs.get("output_size") is None
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())
    return False


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten ops per phase: {"ops", "kernels", "syncs"} and the ops by name."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.counts = collections.defaultdict(collections.Counter)
        self.by_name = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counts = self.counts[self.phase]
        counts["ops"] += 1
        if launches_kernel(func):
            counts["kernels"] += 1
            self.by_name[self.phase][func._overloadpacket.__name__] += 1
        if synchronizes(func, args, kwargs):
            counts["syncs"] += 1
            self.by_name[self.phase]["sync:" + func._overloadpacket.__name__] += 1
        return func(*args, **kwargs)


class HostCopyCounter(TorchFunctionMode):
    """Counts `.tolist()`, `.numpy()` and `.cpu()` (on a GPU, copies of results to the host: syncs)."""

    def __init__(self, ops: OpCounter):
        super().__init__()
        self.ops = ops

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_COPIES:
            self.ops.counts[self.ops.phase]["syncs"] += 1
            self.ops.by_name[self.ops.phase]["sync:" + name] += 1
        return func(*args, **(kwargs or {}))


def count(train_phases, infer) -> tuple[dict, dict]:
    """Run train_phases (a list of (phase, fn)) and infer once to warm up (caches, first-call work), then once more
    under the counters; (counts, counts by op name)."""
    for _, fn in train_phases:
        fn()
    infer()
    ops = OpCounter()
    with ops, HostCopyCounter(ops):
        for phase, fn in train_phases:
            ops.phase = phase
            fn()
        ops.phase = "inference"
        infer()
    counts = {phase: dict(c) for phase, c in ops.counts.items()}
    train = collections.Counter()
    for phase, _ in train_phases:
        train.update(ops.counts[phase])
    counts["training step"] = dict(train)
    return counts, {phase: dict(c.most_common()) for phase, c in ops.by_name.items()}


# ---- the three libraries' models ----------------------------------------------------------------------------------

def minimask_phases(config: str, height: int, width: int, batch: int, overrides: list[str]):
    import minimask
    from benchmarks.bench_model import make_batch
    from minimask.distributed import all_reduce_sum
    try:
        from minimask.engine.solver import build_optimizer, grad_norm
    except ImportError:  # the layout before minimask/engine/ (to count an older checkout the same way)
        from minimask.solver import build_optimizer, grad_norm

    torch.manual_seed(0)
    cfg = minimask.get_config(config, overrides)
    model = minimask.build_model(cfg)
    images, targets = make_batch(cfg, batch, height, width, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, lr=1e-5)
    state = {}

    def forward():
        model.train()
        state["loss"] = sum(model(images, targets).values())

    def step():  # minimask.engine.loop.train_step after the backward
        norm = grad_norm(params)
        flags = torch.stack([~torch.isfinite(state["loss"].detach()), ~torch.isfinite(norm),
                             torch.tensor(False)]).float()
        [bool(f) for f in all_reduce_sum(flags).tolist()]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer():
        model.eval()
        with torch.no_grad():
            model(images)

    return [("forward", forward), ("backward", lambda: state["loss"].backward()), ("step", step)], infer


def torchvision_phases(height: int, width: int, batch: int):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from benchmarks.bench_model import make_batch
    import minimask

    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    cfg = minimask.get_config("torchvision_maskrcnn_r50_fpn")
    images, targets = make_batch(cfg, batch, height, width, torch.device("cpu"))
    model.transform.min_size, model.transform.max_size = (min(height, width),), max(height, width)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
    return _generic_phases(model, optimizer, lambda: model(images, targets), lambda: model(images))


def detectron2_phases(height: int, width: int, batch: int, config_file: str):
    import numpy as np
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances, PolygonMasks

    torch.manual_seed(0)
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(config_file))
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = min(height, width), max(height, width)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(batch):
        xy = torch.rand(4, 2, generator=g) * torch.tensor([width * 0.6, height * 0.6])
        wh = (torch.rand(4, 2, generator=g) * 0.3 + 0.1) * torch.tensor([width, height])
        boxes = torch.cat([xy, xy + wh], dim=1)
        instances = Instances((height, width), gt_boxes=Boxes(boxes),
                              gt_classes=torch.randint(0, 80, (4,), generator=g),
                              gt_masks=PolygonMasks([[np.array([x1, y1, x2, y1, x2, y2, x1, y2], dtype=np.float64)]
                                                     for x1, y1, x2, y2 in boxes.tolist()]))
        inputs.append({"image": torch.rand(3, height, width, generator=g) * 255, "height": height, "width": width,
                       "instances": instances})
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)

    def train_forward():
        from detectron2.utils.events import EventStorage
        with EventStorage(0):
            return model(inputs)

    return _generic_phases(model, optimizer, train_forward, lambda: model(inputs))


def _generic_phases(model, optimizer, train_forward, eval_forward):
    state = {}

    def forward():
        model.train()
        state["loss"] = sum(train_forward().values())

    def step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer():
        model.eval()
        with torch.no_grad():
            eval_forward()

    return [("forward", forward), ("backward", lambda: state["loss"].backward()), ("step", step)], infer


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--library", choices=("minimask", "torchvision", "detectron2"), default="minimask")
    p.add_argument("--config", default="r50_fpn_gn", help="minimask preset")
    p.add_argument("--d2-config", default="Misc/scratch_mask_rcnn_R_50_FPN_9x_gn.yaml")
    p.add_argument("--size", type=int, nargs=2, default=(512, 683), metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--top", type=int, default=0, help="also print the N most frequent kernels per phase")
    p.add_argument("--json", help="write the counts here")
    p.add_argument("overrides", nargs="*", help="minimask config key=value overrides")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.library == "minimask":
        phases, infer = minimask_phases(args.config, *args.size, args.batch, args.overrides)
        name = f"minimask {args.config}"
    elif args.library == "torchvision":
        phases, infer = torchvision_phases(*args.size, args.batch)
        name = "torchvision maskrcnn_resnet50_fpn"
    else:
        phases, infer = detectron2_phases(*args.size, args.batch, args.d2_config)
        name = f"detectron2 {args.d2_config}"
    counts, by_name = count(phases, infer)
    print(f"{name}, {args.batch} x {args.size[0]} x {args.size[1]}, torch {torch.__version__}")
    print("| phase | ops | kernels | syncs |")
    print("|---|---|---|---|")
    for phase in ("forward", "backward", "step", "training step", "inference"):
        c = counts.get(phase, {})
        print(f"| {phase} | {c.get('ops', 0):,} | {c.get('kernels', 0):,} | {c.get('syncs', 0):,} |")
    if args.top:
        for phase, names in by_name.items():
            print(f"{phase}: " + ", ".join(f"{k} {v}" for k, v in list(names.items())[:args.top]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": name, "size": args.size, "batch": args.batch, "counts": counts, "by_name": by_name},
                      f, indent=1)


if __name__ == "__main__":
    main()
