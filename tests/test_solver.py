"""Tests for minimask.engine.solver: LR schedule (hand-computed values), optimizer groups, gradient clipping."""
import pytest
import torch
from torch import nn

from minimask.engine.solver import SCHEDULES, build_optimizer, clip_grad_norm, lr_at, lr_steps, scaled_lr
from minimask.model.norm import FrozenBatchNorm2d, SyncBatchNorm

BASE = 0.02


def lr(iteration, max_iter, steps, **kw):
    return lr_at(iteration, base_lr=BASE, max_iter=max_iter, steps=steps, **kw)


def test_lr_steps_match_spec_table():
    # spec Sec. 8.3: LR x0.1 in the last 60k and 20k for >= 2x; 1x scales 60/90, 80/90.
    assert SCHEDULES == {"1x": 90_000, "2x": 180_000, "3x": 270_000, "6x": 540_000, "9x": 810_000}
    expected = {"1x": (60_000, 80_000), "2x": (120_000, 160_000), "3x": (210_000, 250_000),
                "6x": (480_000, 520_000), "9x": (750_000, 790_000)}
    for name, max_iter in SCHEDULES.items():
        assert lr_steps(max_iter) == expected[name], name
    assert lr_steps(1000) == (667, 889)  # 666.67 and 888.89 rounded
    assert lr_steps(300) == (200, 267)
    assert lr_steps(9) == (6, 8)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_iter"):
            lr_steps(bad)


@pytest.mark.parametrize("iteration, expected", [
    (0, 0.02 * 0.001),  # warmup starts at warmup_factor
    (500, 0.02 * (0.001 * 0.5 + 0.5)),  # 0.01001
    (999, 0.02 * (0.001 * 0.001 + 0.999)),  # 0.01998002
    (1000, 0.02),  # warmup over
    (59_999, 0.02),
    (60_000, 0.002),  # detectron2: already reduced at the step
    (79_999, 0.002),
    (80_000, 0.0002),
    (89_999, 0.0002),  # last iteration
])
def test_lr_at_1x(iteration, expected):
    assert lr(iteration, 90_000, (60_000, 80_000)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("iteration, expected", [
    (0, 2e-5), (500, 0.01001), (1000, 0.02), (209_999, 0.02), (210_000, 0.002), (249_999, 0.002),
    (250_000, 0.0002), (269_999, 0.0002),
])
def test_lr_at_3x(iteration, expected):
    assert lr(iteration, SCHEDULES["3x"], lr_steps(SCHEDULES["3x"])) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("iteration, expected", [
    (0, 2e-5), (999, 0.01998002), (1000, 0.02), (479_999, 0.02), (480_000, 0.002), (519_999, 0.002),
    (520_000, 0.0002), (539_999, 0.0002),
])
def test_lr_at_6x(iteration, expected):
    assert lr(iteration, SCHEDULES["6x"], lr_steps(SCHEDULES["6x"])) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("iteration, expected", [
    (0, 2e-5),
    (50, 0.01001),  # warmup shortened to max_iter // 10 = 100 iterations
    (99, 0.02 * (0.001 * 0.01 + 0.99)),  # 0.0198002
    (100, 0.02),
    (666, 0.02), (667, 0.002), (888, 0.002), (889, 0.0002), (999, 0.0002),
    (1000, 0.0002), (5000, 0.0002),  # past max_iter keeps the final LR
])
def test_lr_at_short_schedule(iteration, expected):
    assert lr(iteration, 1000, lr_steps(1000)) == pytest.approx(expected, rel=1e-12)


def test_lr_at_options():
    # warmup_iters below max_iter // 10 is kept; other gamma / warmup_factor / no steps.
    assert lr(25, 1000, (), warmup_iters=50, warmup_factor=1 / 3) == pytest.approx(0.02 * (1 / 6 + 0.5))
    assert lr(50, 1000, (), warmup_iters=50) == pytest.approx(0.02)
    assert lr(10, 1000, (), warmup_iters=0) == pytest.approx(0.02)
    assert lr(0, 1000, (), warmup_factor=1.0) == pytest.approx(0.02)  # factor 1: no warmup
    assert lr(900, 1000, (100, 500), gamma=0.5) == pytest.approx(0.005)
    assert lr(5, 9, (6, 8)) == pytest.approx(0.02)  # max_iter // 10 == 0: no warmup at all
    assert isinstance(lr(0, 1000, (667, 889)), float)


def test_lr_at_is_pure():
    kwargs = dict(base_lr=BASE, max_iter=1000, steps=(667, 889))
    forward = [lr_at(i, **kwargs) for i in range(1000)]
    backward = [lr_at(i, **kwargs) for i in reversed(range(1000))][::-1]
    assert forward == backward
    assert lr_at(123, **kwargs) == lr_at(123, **kwargs)
    steps = [667, 889]
    lr_at(700, base_lr=BASE, max_iter=1000, steps=steps)
    assert steps == [667, 889]  # input untouched


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_iter=0), "max_iter"),
    (dict(max_iter=-10), "max_iter"),
    (dict(steps=(889, 667)), "non-decreasing"),
    (dict(steps=(667, 1001)), "max_iter"),
    (dict(steps=(0, 889)), "steps"),
    (dict(steps=(667.0, 889)), "steps"),
    (dict(warmup_factor=0.0), "warmup_factor"),
    (dict(warmup_factor=1.5), "warmup_factor"),
    (dict(warmup_factor=-0.1), "warmup_factor"),
    (dict(warmup_iters=-1), "warmup_iters"),
    (dict(gamma=0.0), "gamma"),
    (dict(base_lr=-0.1), "base_lr"),
    (dict(iteration=-1), "iteration"),
])
def test_lr_at_invalid(kwargs, match):
    args = dict(iteration=10, base_lr=BASE, max_iter=1000, steps=(667, 889))
    args.update(kwargs)
    iteration = args.pop("iteration")
    with pytest.raises(ValueError, match=match):
        lr_at(iteration, **args)


def test_scaled_lr():
    assert scaled_lr(0.02, 16) == pytest.approx(0.02)
    assert scaled_lr(0.02, 2) == pytest.approx(0.0025)
    assert scaled_lr(0.02, 64) == pytest.approx(0.08)  # D2 9x scratch: batch 64, LR 0.08 (spec Sec. 8.3)
    assert scaled_lr(0.1, 8, reference_batch=64) == pytest.approx(0.0125)
    for bad in (dict(batch_size=0), dict(reference_batch=0), dict(base_lr=-1.0)):
        args = dict(base_lr=0.02, batch_size=2)
        args.update(bad)
        with pytest.raises(ValueError):
            scaled_lr(**args)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)  # frozen below
        self.stem_norm = FrozenBatchNorm2d(4)
        self.conv = nn.Conv2d(4, 32, 3, bias=False)
        self.gn = nn.GroupNorm(8, 32)
        self.bn = nn.BatchNorm2d(32)
        self.sync_bn = SyncBatchNorm(32)
        self.ln = nn.LayerNorm(32)
        self.fc = nn.Linear(32, 32)
        self.fc_tied = nn.Linear(32, 32)
        self.fc_tied.weight = self.fc.weight  # shared parameter: must appear once
        for p in self.stem.parameters():
            p.requires_grad_(False)


def test_build_optimizer_groups():
    net = _Net()
    opt = build_optimizer(net, lr=0.01, momentum=0.9, weight_decay=1e-4, weight_decay_norm=0.0)
    assert isinstance(opt, torch.optim.SGD)
    assert len(opt.param_groups) == 2
    by_wd = {g["weight_decay"]: g for g in opt.param_groups}
    norm_ids = {id(p) for m in (net.gn, net.bn, net.sync_bn, net.ln) for p in m.parameters()}
    other_ids = {id(p) for p in (net.conv.weight, net.fc.weight, net.fc.bias, net.fc_tied.bias)}
    assert {id(p) for p in by_wd[0.0]["params"]} == norm_ids
    assert {id(p) for p in by_wd[1e-4]["params"]} == other_ids
    all_ids = [id(p) for g in opt.param_groups for p in g["params"]]
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert len(all_ids) == len(set(all_ids)) == len(trainable)  # each trainable param exactly once
    assert set(all_ids) == trainable
    assert not {id(p) for p in net.stem.parameters()} & set(all_ids)  # frozen excluded
    for g in opt.param_groups:
        assert g["lr"] == 0.01 and g["momentum"] == 0.9


def test_build_optimizer_weight_decay_applies_only_to_non_norm():
    net = _Net()
    opt = build_optimizer(net, lr=0.5, momentum=0.0, weight_decay=0.1, weight_decay_norm=0.0)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(net.gn.weight, torch.ones(32))  # zero grad, no decay: unchanged
    assert torch.equal(net.sync_bn.bias, torch.ones(32))
    assert torch.allclose(net.fc.weight, torch.full((32, 32), 1 - 0.5 * 0.1))  # w -= lr * wd * w
    assert torch.equal(net.stem.weight, torch.ones_like(net.stem.weight))  # frozen: not in the optimizer


def test_build_optimizer_edge_cases():
    opt = build_optimizer(nn.Linear(2, 2), lr=0.1)  # no norm layers: one group with the default decay
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 1e-4
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        build_optimizer(frozen, lr=0.1)
    with pytest.raises(ValueError):
        build_optimizer(nn.Linear(2, 2), lr=-0.1)


def test_clip_grad_norm_matches_torch():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7)), nn.Parameter(torch.randn(2))]
    grads = [torch.randn_like(p) * 3 for p in params]
    params[2].grad = None
    reference = [g.clone() for g in grads[:2]]
    for p, g in zip(params[:2], grads[:2]):
        p.grad = g.clone()
    expected_norm = torch.cat([g.flatten() for g in reference]).norm()
    ref_params = [nn.Parameter(torch.zeros_like(p)) for p in params[:2]]
    for p, g in zip(ref_params, reference):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(ref_params, 1.0)

    total = clip_grad_norm(params, 1.0)
    assert total.shape == ()
    assert total.item() == pytest.approx(expected_norm.item(), rel=1e-6)
    for p, rp in zip(params[:2], ref_params):
        assert torch.allclose(p.grad, rp.grad, rtol=1e-6, atol=1e-7)
    clipped = torch.cat([p.grad.flatten() for p in params[:2]]).norm()
    assert clipped.item() == pytest.approx(1.0, rel=1e-5)


def test_clip_grad_norm_below_threshold_and_errors():
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([0.3, 0.0, 0.4])
    total = clip_grad_norm([p], 10.0)
    assert total.item() == pytest.approx(0.5)
    assert torch.allclose(p.grad, torch.tensor([0.3, 0.0, 0.4]))  # unchanged (scale 1)
    assert clip_grad_norm([nn.Parameter(torch.zeros(2))], 1.0).item() == 0.0  # no grads
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm([p], 0.0)


def test_lr_at_accepts_numpy_ints():
    import numpy as np
    assert lr_at(np.int64(60_000), base_lr=BASE, max_iter=np.int64(90_000),
                 steps=(np.int64(60_000), 80_000)) == pytest.approx(0.002)
    assert lr_steps(np.int64(1000)) == (667, 889) and type(lr_steps(np.int64(1000))[0]) is int


def test_build_optimizer_on_tiny_model():
    import minimask
    model = minimask.build_model(minimask.get_config("tiny"))
    opt = build_optimizer(model, lr=0.0025, momentum=0.9, weight_decay=1e-4, weight_decay_norm=0.0)
    params = [p for g in opt.param_groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == len({id(p) for p in params}) == len(trainable)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    norm_params = {id(p) for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))
                   for p in m.parameters() if p.requires_grad}
    assert norm_params and no_decay == norm_params


def test_build_optimizer_steps_like_hand_written_sgd():
    """Three steps of the (fused, where available) optimizer against SGD with momentum and decay written out:
    g = grad + wd * w;  buf = g (first step), then buf = momentum * buf + g;  w -= lr * buf."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.GroupNorm(1, 3))
    opt = build_optimizer(net, lr=0.1, momentum=0.9, weight_decay=0.01, weight_decay_norm=0.0)
    decay = {id(p): 0.0 for p in net[1].parameters()}
    reference = {id(p): p.detach().clone() for p in net.parameters()}
    buffers = {}
    for step in range(3):
        grads = {id(p): torch.randn_like(p) for p in net.parameters()}
        for p in net.parameters():
            p.grad = grads[id(p)].clone()
            g = grads[id(p)] + decay.get(id(p), 0.01) * reference[id(p)]
            buffers[id(p)] = g if step == 0 else 0.9 * buffers[id(p)] + g
            reference[id(p)] = reference[id(p)] - 0.1 * buffers[id(p)]
        opt.step()
    for p in net.parameters():
        torch.testing.assert_close(p.detach(), reference[id(p)], rtol=1e-6, atol=1e-7)


def test_lr_at_one_iteration_run():
    """`--iters 1`: lr_steps gives (1, 1), both drops after the only iteration, which runs at the base LR."""
    steps = lr_steps(1)
    assert steps == (1, 1)
    assert lr_at(0, base_lr=BASE, max_iter=1, steps=steps) == BASE  # warmup shortened to max_iter // 10 = 0
    assert lr_at(1, base_lr=BASE, max_iter=1, steps=steps) == pytest.approx(BASE * 0.01)
