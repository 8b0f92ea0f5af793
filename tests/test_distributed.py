"""Tests of minimask.distributed: single-process no-ops, bucketing, and a two-process gloo run whose averaged
gradients must equal those of one process holding both images (the global batch).

Sampling in the 2-process test: the model samples anchors (RPN) and RoIs from torch's global RNG, image after image,
so one process with images [A, B] draws RPN(A), RPN(B), RoI(A), RoI(B) while two ranks draw RPN(A), RoI(A) and
RPN(B), RoI(B): different random subsets, whatever the seeds. The test therefore sets both sampling batch sizes
above the number of candidates, so that every labelled anchor and every proposal (+ GT) is kept and the random draw
only permutes them (which changes nothing but summation order). The per-rank counts still differ (image A has one
object, image B three), so a rank-local normaliser gives a different gradient; the test checks that too.
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import minimask
from minimask import distributed as D
from minimask.model.box_head import fast_rcnn_losses

SAMPLE_ALL = ["model.rpn.batch_size_per_image=100000", "model.roi_heads.batch_size_per_image=100000"]
SYNCBN = ["model.backbone.norm=SyncBN", "model.fpn.norm=SyncBN", "model.box_head.norm=SyncBN",
          "model.mask_head.norm=SyncBN"]


# ---- single process ------------------------------------------------------------------------------------------

def test_global_normalizer_without_process_group():
    assert not D._initialized()
    out = D.global_normalizer(torch.tensor(7))
    assert out.dtype == torch.float32 and out.shape == () and out.item() == 7.0
    assert D.global_normalizer(torch.tensor(0)).item() == 1.0  # max(count, 1): an empty batch divides by 1
    assert D.global_normalizer(torch.tensor(3.0, requires_grad=True)).requires_grad is False


def test_single_process_helpers_are_identities():
    assert (D.get_rank(), D.get_world_size(), D.is_main()) == (0, 1, True)
    t = torch.tensor([1.0, 2.0])
    assert D.all_reduce_sum(t) is t
    means = D.reduce_dict_mean({"b": torch.tensor(2.0), "a": 3})
    assert set(means) == {"a", "b"} and means["a"].item() == 3.0 and means["b"].item() == 2.0
    D.barrier()
    info = D.init_distributed() if "RANK" not in os.environ else None
    if info is not None:
        assert (info.rank, info.world_size) == (0, 1) and not D._initialized()


def test_gradient_all_reduce_is_a_noop_in_one_process():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    reducer = D.GradientAllReduce(model.parameters(), bucket_mb=1e-5)
    assert reducer._hooks == []
    model(torch.randn(5, 4)).square().sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    reducer.finish()
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
    D.broadcast_parameters(model)  # no group: nothing happens


def test_bucket_assignment_covers_every_param_once_in_reverse_order():
    params = [torch.zeros(n) for n in (10, 300, 5, 5, 1000, 7)] + [torch.zeros(3, dtype=torch.float64)]
    buckets = D.assign_buckets(params, bucket_bytes=1200)  # 300 float32 = 1200 bytes
    flat = [i for b in buckets for i in b]
    assert sorted(flat) == list(range(len(params)))
    assert flat == list(reversed(range(len(params))))  # backward produces the last layer's grads first
    assert buckets[0] == [6]  # a dtype change closes a bucket
    for b in buckets:  # a bucket closes as soon as it reaches the size
        sizes = [params[i].numel() * params[i].element_size() for i in b]
        assert sum(sizes[:-1]) < 1200
    assert D.assign_buckets(params, bucket_bytes=10**9) == [[6], [5, 4, 3, 2, 1, 0]]
    model = minimask.build_model(minimask.get_config("tiny"))
    reducer = D.GradientAllReduce(list(model.parameters()) * 2, bucket_mb=0.5)  # duplicates are dropped
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(reducer.params) == len(trainable) and len(reducer.buckets) > 1
    assert sorted(i for b in reducer.buckets for i in b) == list(range(len(trainable)))


def test_fast_rcnn_losses_keep_float64_and_single_process_values():
    torch.manual_seed(0)
    logits, deltas = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 12, dtype=torch.float64)
    labels, targets = torch.tensor([1, 3, 0, 0, 2, 0]), torch.randn(6, 4, dtype=torch.float64)
    out = fast_rcnn_losses(logits, deltas, labels, targets)
    assert out["loss_classifier"].dtype == torch.float64
    torch.testing.assert_close(out["loss_classifier"], torch.nn.functional.cross_entropy(logits, labels))
    picked = deltas.view(6, 3, 4)[torch.arange(6), (labels - 1).clamp(min=0)]
    expected = ((picked - targets).abs().sum(dim=1) * (labels > 0)).sum() / 6
    torch.testing.assert_close(out["loss_box_reg"], expected)


# ---- two processes (gloo) ------------------------------------------------------------------------------------

def _batch(empty_b=False):
    """Two 128 x 128 images of coloured rectangles on noise: A with 1 object, B with 3 (labels 1..3), or with none
    (`empty_b`, an image without objects)."""
    g = torch.Generator().manual_seed(123)
    images, targets = [], []
    objects_b = [] if empty_b else [(10, 10, 60, 50, 2), (70, 20, 120, 110, 3), (30, 60, 80, 120, 1)]
    for objects in ([(20, 30, 90, 100, 1)], objects_b):
        img = torch.rand(3, 128, 128, generator=g) * 0.2
        boxes, labels, masks = [], [], []
        for x0, y0, x1, y1, label in objects:
            img[:, y0:y1, x0:x1] = torch.rand(3, 1, 1, generator=g)
            mask = torch.zeros(128, 128, dtype=torch.uint8)
            mask[y0:y1, x0:x1] = 1
            boxes.append([x0, y0, x1, y1])
            labels.append(label)
            masks.append(mask)
        images.append(img.double())
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
                        "labels": torch.tensor(labels, dtype=torch.int64),
                        "masks": torch.stack(masks) if masks else torch.zeros(0, 128, 128, dtype=torch.uint8)})
    return images, targets


def _build(overrides, seed):
    torch.manual_seed(seed)
    model = minimask.build_model(minimask.get_config("tiny", overrides)).double()
    model.train()
    return model


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank, world_size, port, out_dir, overrides, empty_b):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    info = D.init_distributed()
    assert (info.rank, info.world_size, info.device.type) == (rank, world_size, "cpu")
    model = _build(overrides, seed=rank)  # rank 1 starts from a different init: broadcast must fix it
    D.broadcast_parameters(model)
    reducer = D.GradientAllReduce(model.parameters(), bucket_mb=0.5)  # several buckets
    images, targets = _batch(empty_b)
    torch.manual_seed(1000)
    losses = model(images[rank:rank + 1], targets[rank:rank + 1])
    sum(losses.values()).backward()
    reducer.finish()
    logged = D.reduce_dict_mean(losses)
    first = _grads(model)
    repeats_equal = []
    for set_to_none in (True, False):  # the gradients live in bucket views; either way of zeroing must work
        model.zero_grad(set_to_none=set_to_none)
        torch.manual_seed(1000)
        sum(model(images[rank:rank + 1], targets[rank:rank + 1]).values()).backward()
        reducer.finish()
        repeats_equal.append(_grads(model).keys() == first.keys() and all(
            torch.equal(g, first[n]) for n, g in _grads(model).items()))
    torch.save({"grads": first, "params": {n: p.detach() for n, p in model.named_parameters()},
                "logged": logged, "buckets": len(reducer.buckets), "repeats_equal": repeats_equal},
               os.path.join(out_dir, f"rank{rank}.pt"))
    D.barrier()
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(tmp_path, overrides, empty_b=False):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path), overrides, empty_b)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.terminate()
        p.join(5)
    assert not hung, "a rank hung (did not finish in 120 s)"
    assert [p.exitcode for p in procs] == [0, 0], "a rank failed; see its traceback above"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _max_rel_diff(grads, ref):
    worst = 0.0
    for name, g in ref.items():
        scale = g.abs().max().item()
        if scale > 1e-12:  # parameters with non-negligible gradients
            worst = max(worst, (grads[name] - g).abs().max().item() / scale)
    return worst


def _check_against_global_batch(tmp_path, overrides, empty_b=False):
    """Run the two ranks, then one process on both images; return (reference grads, images, targets)."""
    results = _run_two_ranks(tmp_path, overrides, empty_b)
    images, targets = _batch(empty_b)
    model = _build(overrides, seed=0)
    torch.manual_seed(1000)
    losses = model(images, targets)  # one process, the whole global batch (SyncBN = BatchNorm2d on both images)
    sum(losses.values()).backward()
    ref = _grads(model)
    for name, p in model.named_parameters():  # broadcast made rank 1's init (seed 1) equal rank 0's (seed 0)
        assert torch.equal(results[1]["params"][name], p.detach()), name
    assert results[0]["buckets"] > 1
    assert results[0]["repeats_equal"] == results[1]["repeats_equal"] == [True, True]
    for r in range(2):
        assert set(results[r]["grads"]) == set(ref)
        assert _max_rel_diff(results[r]["grads"], ref) < 1e-5
    # Logged: the mean of the ranks' losses, the same on both ranks, and (global normalisers) the global-batch loss.
    for k, v in losses.items():
        assert torch.equal(results[0]["logged"][k], results[1]["logged"][k])
        torch.testing.assert_close(results[0]["logged"][k], v.detach().float(), rtol=1e-5, atol=1e-7)
    return ref, images, targets


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["GN", "SyncBN"])
def test_two_ranks_average_to_the_global_batch_gradient(tmp_path, norm):
    overrides = SAMPLE_ALL + (SYNCBN if norm == "SyncBN" else [])
    ref, images, targets = _check_against_global_batch(tmp_path, overrides)
    if norm == "GN":
        # The test can fail: averaging per-image losses that are normalised by their own (local) counts gives a
        # different gradient from the global-batch one, because the two images have different RoI / pixel counts.
        local = {}
        for i in range(2):
            m = _build(overrides, seed=0)
            torch.manual_seed(1000)
            sum(m(images[i:i + 1], targets[i:i + 1]).values()).backward()
            for n, g in _grads(m).items():
                local[n] = local.get(n, 0) + g / 2
        assert _max_rel_diff(local, ref) > 1e-3


@pytest.mark.slow
def test_a_rank_without_objects(tmp_path):
    # A rank with no foreground RoI must still join every loss normaliser's all-reduce, or the collectives mismatch.
    _check_against_global_batch(tmp_path, SAMPLE_ALL, empty_b=True)
