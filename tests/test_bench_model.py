"""benchmarks/bench_model.py's stage timer: every stage it names is timed, on detectron2's and torchvision's
post-processing paths alike, and the patched functions are put back."""
import sys
from pathlib import Path

import pytest
import torch

import minimask
from minimask.interop import torchvision_conventions
from minimask.model import roi_heads

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_model  # noqa: E402


@pytest.mark.parametrize("torchvision", [False, True])
def test_stage_timer_times_each_stage_and_restores_the_functions(torchvision):
    torch.manual_seed(0)
    cfg = minimask.get_config("tiny_keypoint", ["model.mask_head.enabled=True",
                                                  f"model.torchvision_conventions={torchvision}"])
    model = minimask.build_model(cfg)
    bench_model.raise_class_scores(model)
    images, targets = bench_model.make_batch(cfg, 2, 128, 160, torch.device("cpu"))
    train_step, infer = bench_model.step_fns(model, images, targets)
    before = {(m, n): getattr(m, n) for m in (roi_heads, torchvision_conventions)
              for n in bench_model.StageTimer.FUNCTIONS if hasattr(m, n)}
    timer = bench_model.StageTimer(model, torch.device("cpu"))
    train = timer.measure(train_step, runs=1)
    infer_stages = timer.measure(lambda t: infer(), runs=1)
    timer.remove()
    assert {"backbone+fpn", "rpn", "roi_align", "box_head", "mask_head", "keypoint_head",
            "backward+step"} <= set(train)
    assert {"postprocess_boxes", "postprocess_masks", "postprocess_keypoints"} <= set(infer_stages)
    for stages in (train, infer_stages):
        assert all(seconds >= 0 for seconds in stages.values())
        assert stages["total"] == pytest.approx(sum(v for k, v in stages.items() if k != "total"))
    assert all(getattr(m, n) is f for (m, n), f in before.items())
