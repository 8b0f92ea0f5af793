"""Tests for minimask.model.norm: FrozenBatchNorm2d, SyncBatchNorm (single process and two gloo processes), get_norm;
and precise BN (minimask.engine.precise_bn.recompute_bn_stats), which shares their BatchNorm and gloo helpers."""
import multiprocessing
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

from minimask.engine.precise_bn import recompute_bn_stats
from minimask.model.norm import FrozenBatchNorm2d, SyncBatchNorm, get_norm


def _random_bn(bn: nn.BatchNorm2d, dtype=torch.float32) -> nn.BatchNorm2d:
    """Give a BN layer random affine parameters and running statistics."""
    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, dtype=dtype) + 0.5)
        bn.bias.copy_(torch.randn(c, dtype=dtype))
        bn.running_mean.copy_(torch.randn(c, dtype=dtype))
        bn.running_var.copy_(torch.rand(c, dtype=dtype) + 0.5)
        bn.num_batches_tracked.fill_(3)
    return bn


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------- FrozenBatchNorm2d


def test_frozen_bn_matches_batchnorm_eval_and_has_no_parameters():
    bn = _random_bn(nn.BatchNorm2d(5, eps=1e-3)).eval()
    frozen = FrozenBatchNorm2d(5, eps=1e-3)
    frozen.load_state_dict(bn.state_dict())  # strict: num_batches_tracked must be dropped, nothing missing
    x = torch.randn(2, 5, 3, 4)
    torch.testing.assert_close(frozen(x), bn(x), atol=1e-6, rtol=1e-5)
    assert list(frozen.parameters()) == []
    assert set(dict(frozen.named_buffers())) == {"weight", "bias", "running_mean", "running_var"}
    for name in ("weight", "bias", "running_mean", "running_var"):
        torch.testing.assert_close(getattr(frozen, name), getattr(bn, name).detach())
    assert "num_features=5" in repr(frozen) and "eps=0.001" in repr(frozen)
    # Empty input and bad shapes.
    assert frozen(torch.zeros(0, 5, 3, 4)).shape == (0, 5, 3, 4)
    with pytest.raises(ValueError, match="FrozenBatchNorm2d"):
        frozen(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="FrozenBatchNorm2d"):
        frozen(torch.randn(5, 3))


def test_frozen_bn_hand_computed():
    frozen = FrozenBatchNorm2d(2, eps=0.0)
    frozen.weight.copy_(torch.tensor([2.0, 1.0]))
    frozen.bias.copy_(torch.tensor([1.0, -1.0]))
    frozen.running_mean.copy_(torch.tensor([3.0, 0.0]))
    frozen.running_var.copy_(torch.tensor([4.0, 0.25]))
    x = torch.tensor([5.0, 1.0]).view(1, 2, 1, 1)
    # channel 0: (5 - 3) / 2 * 2 + 1 = 3; channel 1: (1 - 0) / 0.5 * 1 - 1 = 1
    torch.testing.assert_close(frozen(x).flatten(), torch.tensor([3.0, 1.0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_frozen_bn_half_precision(dtype):
    frozen = FrozenBatchNorm2d.convert_frozen_batchnorm(_random_bn(nn.BatchNorm2d(4)))
    x = torch.randn(2, 4, 3, 3)
    out = frozen(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), frozen(x), atol=5e-2, rtol=2e-2)


def test_convert_frozen_batchnorm_nested():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        _random_bn(nn.BatchNorm2d(8)),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 1), _random_bn(SyncBatchNorm(8, eps=1e-3)), nn.ReLU()),
        nn.Sequential(nn.Sequential(nn.Conv2d(8, 4, 1), _random_bn(nn.SyncBatchNorm(4)))),
        nn.GroupNorm(2, 4),
    ).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    converted = FrozenBatchNorm2d.convert_frozen_batchnorm(model)
    assert converted is model
    assert isinstance(model[1], FrozenBatchNorm2d)
    assert isinstance(model[3][1], FrozenBatchNorm2d) and model[3][1].eps == 1e-3
    assert isinstance(model[4][0][1], FrozenBatchNorm2d)
    assert isinstance(model[5], nn.GroupNorm)  # other norms are left alone
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    # A bare BN layer is returned as a new module with the same statistics.
    bn = _random_bn(nn.BatchNorm2d(3)).eval()
    frozen = FrozenBatchNorm2d.convert_frozen_batchnorm(bn)
    assert type(frozen) is FrozenBatchNorm2d
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), bn(x))


# -------------------------------------------------------------------------------------------------------- get_norm


def test_get_norm_types():
    assert type(get_norm("BN", 64)) is nn.BatchNorm2d
    assert type(get_norm("SyncBN", 64)) is SyncBatchNorm
    assert type(get_norm("FrozenBN", 64)) is FrozenBatchNorm2d
    gn = get_norm("GN", 64)
    assert type(gn) is nn.GroupNorm and gn.num_groups == 32 and gn.num_channels == 64 and gn.eps == 1e-5
    for layer in (get_norm("BN", 16), get_norm("SyncBN", 16), get_norm("FrozenBN", 16)):
        assert layer.num_features == 16
    assert get_norm("", 64) is None
    assert get_norm(None, 64) is None
    assert get_norm("BN", 8) is not get_norm("BN", 8)  # fresh module every call


@pytest.mark.parametrize("name", ["bn", "LayerNorm", "Frozen BN"])
def test_get_norm_unknown_name(name):
    with pytest.raises(ValueError, match="SyncBN") as err:
        get_norm(name, 64)
    assert repr(name) in str(err.value)


# ----------------------------------------------------------------------------------- SyncBatchNorm, one process


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sync_bn_single_process_equals_batchnorm(momentum):
    assert not dist.is_initialized()
    ref = _random_bn(nn.BatchNorm2d(4, momentum=momentum))
    sync = SyncBatchNorm(4, momentum=momentum)
    sync.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 5, 2)
    for step in range(2):  # training: batch statistics, running stats updated
        xr, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn(3, 4, 5, 2)
        (ref(xr) * g).sum().backward()
        (sync(xs) * g).sum().backward()
        torch.testing.assert_close(xs.grad, xr.grad)
        x = x * 2 + 1
    torch.testing.assert_close(sync.weight.grad, ref.weight.grad)
    torch.testing.assert_close(sync.bias.grad, ref.bias.grad)
    for name, buf in ref.named_buffers():
        torch.testing.assert_close(getattr(sync, name), buf)
    ref.eval(), sync.eval()
    torch.testing.assert_close(sync(x), ref(x))


@pytest.fixture
def gloo_world_of_one(tmp_path):
    """An initialised gloo process group with this process as its only member."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_sync_bn_world_size_one_uses_batchnorm(gloo_world_of_one):
    ref = _random_bn(nn.BatchNorm2d(3))
    sync = SyncBatchNorm(3)
    sync.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(sync(x), ref(x), rtol=0, atol=0)  # exactly BatchNorm2d's kernel


def test_sync_bn_synced_path_in_one_process(gloo_world_of_one):
    """Quick check of the all-reduce path (forward and backward through the autograd Function) with world size 1."""
    ref = _random_bn(nn.BatchNorm2d(3, momentum=0.3)).double()
    sync = SyncBatchNorm(3, momentum=0.3).double()
    sync.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 3, 5, dtype=torch.float64) * 3 + 2
    g = torch.randn(4, 3, 3, 5, dtype=torch.float64)
    xr, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ref(xr) * g).sum().backward()
    out = sync._forward_synced(xs)
    (out * g).sum().backward()
    with torch.no_grad():
        ref_out = nn.functional.batch_norm(x, None, None, ref.weight, ref.bias, True, 0.0, ref.eps)
    torch.testing.assert_close(out.detach(), ref_out)
    torch.testing.assert_close(xs.grad, xr.grad)
    torch.testing.assert_close(sync.weight.grad, ref.weight.grad)
    torch.testing.assert_close(sync.bias.grad, ref.bias.grad)
    for name, buf in ref.named_buffers():
        torch.testing.assert_close(getattr(sync, name), buf)

    # Empty input: empty output, running stats untouched, backward still runs (all-reduce of the gradient).
    before = {k: v.clone() for k, v in sync.named_buffers()}
    empty = torch.zeros(0, 3, 3, 5, dtype=torch.float64, requires_grad=True)
    out = sync._forward_synced(empty)
    assert out.shape == (0, 3, 3, 5)
    out.sum().backward()
    assert empty.grad.shape == (0, 3, 3, 5)
    for name, buf in sync.named_buffers():
        torch.testing.assert_close(buf, before[name], rtol=0, atol=0)

    # bf16 input: statistics in fp32, output in the input dtype.
    xb = torch.randn(2, 3, 4, 4)
    out = sync._forward_synced(xb.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        expected = nn.functional.batch_norm(xb.to(torch.bfloat16).float(), None, None, sync.weight.float(),
                                            sync.bias.float(), True, 0.0, sync.eps)
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=2e-2)


# ------------------------------------------------------------------------------------ SyncBatchNorm, two processes

C = 3
WORLD = 2


def _make_cases():
    """Per case: per-rank inputs (different batch sizes / image sizes / empty), upstream grads, initial state."""
    gen = torch.Generator().manual_seed(1234)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def state(momentum):
        return dict(weight=torch.rand(C, generator=gen, dtype=torch.float64) + 0.5, bias=rand(C),
                    running_mean=rand(C), running_var=torch.rand(C, generator=gen, dtype=torch.float64) + 0.5,
                    num_batches_tracked=torch.tensor(2), momentum=momentum)

    shapes = {
        "unequal": [(3, C, 4, 5), (1, C, 4, 5)],
        "image_sizes": [(2, C, 3, 4), (1, C, 5, 2)],
        "rank1_empty": [(2, C, 4, 4), (0, C, 4, 4)],
        "rank0_empty_no_grad": [(0, C, 4, 4), (2, C, 3, 3)],
        "all_empty": [(0, C, 4, 4), (0, C, 2, 2)],
    }
    cases = []
    for i, (name, per_rank) in enumerate(shapes.items()):
        cases.append(dict(
            name=name,
            xs=[rand(*s) * 2 + 1 for s in per_rank],
            grads=[rand(*s) for s in per_rank],
            requires_grad=[not (name == "rank0_empty_no_grad" and r == 0) for r in range(WORLD)],
            **state(None if i == 1 else 0.1),
        ))
    return cases


def _sync_bn_worker(rank, port, case_path, out_path):
    """One rank: run every case through SyncBatchNorm and save what it computed."""
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=30))
    try:
        results = []
        for case in torch.load(case_path):
            bn = SyncBatchNorm(C, momentum=case["momentum"]).double().train()
            bn.load_state_dict({k: case[k] for k in ("weight", "bias", "running_mean", "running_var",
                                                     "num_batches_tracked")})
            x = case["xs"][rank].clone().requires_grad_(case["requires_grad"][rank])
            y = bn(x)
            (y * case["grads"][rank]).sum().backward()
            results.append(dict(y=y.detach(), x_grad=x.grad, weight_grad=bn.weight.grad, bias_grad=bn.bias.grad,
                                **{k: v.clone() for k, v in bn.named_buffers()}))
        torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


def _reference(case):
    """BatchNorm2d over the global batch: every rank's (N, C, H, W) flattened to (C, N*H*W) and concatenated."""
    bn = nn.BatchNorm2d(C, momentum=case["momentum"]).double().train()
    bn.load_state_dict({k: case[k] for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")})
    xs = [x.clone().requires_grad_() for x in case["xs"]]
    flat = torch.cat([x.transpose(0, 1).reshape(C, -1) for x in xs], dim=1)  # (C, L)
    y_flat = bn(flat[None, :, :, None])[0, :, :, 0]  # (C, L)
    ys, start = [], 0
    for x in xs:
        n, _, h, w = x.shape
        ys.append(y_flat[:, start:start + n * h * w].reshape(C, n, h, w).transpose(0, 1))
        start += n * h * w
    loss = sum((y * g).sum() for y, g in zip(ys, case["grads"]))  # the loss summed over ranks
    loss.backward()
    return dict(ys=[y.detach() for y in ys], x_grads=[x.grad for x in xs], weight_grad=bn.weight.grad,
                bias_grad=bn.bias.grad, running_mean=bn.running_mean, running_var=bn.running_var,
                num_batches_tracked=bn.num_batches_tracked)


def _run_two_ranks(tmp_path, timeout=60.0):
    cases = _make_cases()
    case_path = tmp_path / "cases.pt"
    torch.save(cases, case_path)
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_sync_bn_worker, args=(r, port, str(case_path), str(tmp_path / f"rank{r}.pt")))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, f"SyncBatchNorm workers did not finish within {timeout} s (hang in a collective?)"
    assert [p.exitcode for p in procs] == [0] * WORLD, "a SyncBatchNorm worker failed"
    return cases, [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.slow  # ~5 s: two fresh Python processes import torch and form a gloo group
def test_sync_bn_two_processes_equals_global_batchnorm(tmp_path):
    cases, results = _run_two_ranks(tmp_path)
    tol = dict(atol=1e-5, rtol=1e-5)
    for i, case in enumerate(cases):
        per_rank = [results[r][i] for r in range(WORLD)]
        if case["name"] == "all_empty":
            for r, res in enumerate(per_rank):
                assert res["y"].shape == case["xs"][r].shape
                assert res["x_grad"].shape == case["xs"][r].shape
                torch.testing.assert_close(res["weight_grad"], torch.zeros(C, dtype=torch.float64))
                for k in ("running_mean", "running_var", "num_batches_tracked"):  # not updated
                    torch.testing.assert_close(res[k], case[k], rtol=0, atol=0)
            continue
        ref = _reference(case)
        for r, res in enumerate(per_rank):
            torch.testing.assert_close(res["y"], ref["ys"][r], **tol, msg=f"{case['name']} rank {r} output")
            if case["requires_grad"][r]:
                torch.testing.assert_close(res["x_grad"], ref["x_grads"][r], **tol,
                                           msg=f"{case['name']} rank {r} input grad")
            else:
                assert res["x_grad"] is None
            for k in ("running_mean", "running_var", "num_batches_tracked"):
                torch.testing.assert_close(res[k], ref[k], **tol, msg=f"{case['name']} rank {r} {k}")
        # Each rank holds its share of the parameter gradients; DDP sums them.
        for k in ("weight_grad", "bias_grad"):
            total = sum(res[k] for res in per_rank)
            torch.testing.assert_close(total, ref[k], **tol, msg=f"{case['name']} {k}")


# ----------------------------------------------------------------------------------------------- precise BN

def _pooled(xs):
    """(mean, unbiased var) per channel of (N, C, H, W) tensors taken together."""
    flat = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in xs], dim=1)  # (C, L)
    return flat.mean(1), flat.var(1, unbiased=True)


def test_precise_bn_equals_the_statistics_of_all_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _random_bn(nn.BatchNorm2d(4)), nn.ReLU(), nn.Conv2d(4, 5, 1),
                          _random_bn(nn.BatchNorm2d(5)), nn.GroupNorm(1, 5)).double().eval()
    batches = [torch.randn(n, 3, h, w, dtype=torch.float64) * 3 + 2 for n, h, w in ((2, 6, 7), (1, 9, 5), (3, 4, 4))]
    conv1, bn1, conv2 = model[0], model[1], model[3]
    # Brute force: layer 1 sees conv1(x); layer 2 sees conv2(relu(bn1 with *batch* statistics)), as in training.
    first = [conv1(x) for x in batches]
    second = [conv2(torch.relu(nn.functional.batch_norm(y, None, None, bn1.weight, bn1.bias, training=True)))
              for y in first]
    momentum, tracked = bn1.momentum, bn1.num_batches_tracked.clone()

    used = recompute_bn_stats(model, batches + batches, run=lambda m, x: m(x), num_iters=3)  # only 3 are used
    assert used == 3
    for bn, inputs in ((model[1], first), (model[4], second)):
        mean, var = _pooled(inputs)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-10, atol=1e-10)
    assert not model.training and bn1.momentum == momentum and torch.equal(bn1.num_batches_tracked, tracked)


def test_precise_bn_leaves_models_without_batchnorm_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4), FrozenBatchNorm2d(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    assert recompute_bn_stats(model, [torch.ones(1, 3, 2, 2)], run=lambda m, x: calls.append(x), num_iters=5) == 0
    assert calls == [] and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _precise_bn_worker(rank, port, data_path, out_path):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=30))
    try:
        bn = _random_bn(SyncBatchNorm(C, momentum=0.1), torch.float64).double()
        recompute_bn_stats(bn, torch.load(data_path)[rank], run=lambda m, x: m(x), num_iters=10)
        torch.save({k: v.clone() for k, v in bn.named_buffers()}, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~5 s: two processes
def test_precise_bn_two_processes_get_the_global_statistics(tmp_path):
    gen = torch.Generator().manual_seed(7)
    data = [[torch.randn(2, C, 3, 4, generator=gen, dtype=torch.float64) * (r + 1) + r for _ in range(2)]
            for r in range(WORLD)]  # unequal statistics per rank
    torch.save(data, tmp_path / "data.pt")
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_precise_bn_worker, args=(r, port, str(tmp_path / "data.pt"), str(tmp_path / f"{r}.pt")))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * WORLD
    mean, var = _pooled([x for rank_data in data for x in rank_data])
    for r in range(WORLD):
        out = torch.load(tmp_path / f"{r}.pt")
        torch.testing.assert_close(out["running_mean"], mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out["running_var"], var, rtol=1e-10, atol=1e-10)
