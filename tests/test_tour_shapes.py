"""docs/TOUR.md's shapes are the model's: every shape the tour writes with numbers is checked against a run of its
running example (`r50_fpn_gn`, two images of 800 x 1333 px, a training forward and backward, then an inference).

Shapes in the tour's code blocks are labelled (`res2 (2, 256, 200, 336)`) and checked label by label; every other
numeric shape must be the shape of a tensor that the run produced (every aten operation's output is recorded with a
dispatch mode, forward and backward). Symbolic shapes (F, N, G, K) are not checked.
"""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import minimask

TOUR = Path(__file__).resolve().parents[1] / "docs" / "TOUR.md"
SHAPE = re.compile(r"\((\d+(?:, \d+)*),?\)")
NOT_SHAPES = {(10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)}  # the box coders' weights, written as tuples
LABELLED = re.compile(r"(?<![\w.])([A-Za-z][\w]*)\s+(\(\d+(?:, \d+)*,?\))")


class ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def _example():
    """Two 800 x 1333 images with three objects each (polygon masks), as the tour's data section produces them."""
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(2):
        boxes = torch.tensor([[100.0, 120.0, 400.0, 500.0], [600.0, 300.0, 900.0, 700.0], [1000.0, 50.0, 1300.0, 350.0]])
        polygons = [[np.array([b[0], b[1], b[2], b[1], b[2], b[3], b[0], b[3]], dtype=np.float64)] for b in boxes.tolist()]
        images.append(torch.rand(3, 800, 1333, generator=g))
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 5, 17]), "polygons": polygons})
    return images, targets


@pytest.mark.slow  # the full-size R50-FPN on the CPU: about a minute on two cores
def test_every_shape_the_tour_states_is_the_models():
    torch.manual_seed(0)
    model = minimask.build_model(minimask.get_config("r50_fpn_gn"))
    labelled = {}

    def record(name):
        return lambda module, args, out: labelled.update({name: tuple(out.shape)})

    model.backbone.maxpool.register_forward_hook(record("stem"))
    for i in range(1, 5):
        getattr(model.backbone, f"layer{i}").register_forward_hook(record(f"res{i + 1}"))
    model.fpn.register_forward_hook(lambda m, a, out: labelled.update({f"P{k + 2}": tuple(p.shape)
                                                                       for k, p in enumerate(out)}))
    model.backbone.register_forward_pre_hook(lambda m, args: labelled.update({"batch": tuple(args[0].shape)}))
    images, targets = _example()
    recorder = ShapeRecorder()
    anchors = model.rpn.anchors
    model.rpn.anchors = lambda features: [recorder.shapes.add(tuple(a.shape)) or a for a in anchors(features)]
    with recorder:
        losses = model(images, targets)
        sum(losses.values()).backward()
        model.eval()
        with torch.no_grad():
            model(images)
    seen = recorder.shapes | {tuple(img.shape) for img in images} | {tuple(img.shape[-2:]) for img in images}

    text = TOUR.read_text(encoding="utf-8")
    stated = {tuple(int(d) for d in m.group(1).split(", ")) for m in SHAPE.finditer(text)} - NOT_SHAPES
    assert len(stated) > 30, "the tour should state its shapes"
    missing = sorted(s for s in stated if s not in seen)
    assert not missing, f"shapes in docs/TOUR.md that the running example never produced: {missing}"
    blocks = "\n".join(re.findall(r"```\n(.*?)```", text, flags=re.S))
    wrong = [(label, shape, labelled[label]) for label, shape in LABELLED.findall(blocks)
             if label in labelled and tuple(int(d) for d in SHAPE.fullmatch(shape).group(1).split(", ")) != labelled[label]]
    assert not wrong, f"labelled shapes in docs/TOUR.md differ from the model's (label, tour, model): {wrong}"
    assert {"stem", "res2", "res5", "P2", "P6", "batch"} <= {label for label, _ in LABELLED.findall(blocks)}
