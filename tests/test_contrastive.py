"""MoCo v2 / DenseCL pre-training (minimask/tools/contrastive.py): the loss functions against hand and brute-force
computations, the ring-buffer queue, the momentum update, the model's forward order (keys, losses against the old
queues, enqueue), its checkpoint contents, and a tiny run that lowers the loss."""
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from minimask import build_model, get_config
from minimask.interop.imagenet import load_imagenet_backbone
from minimask.model.resnet import ResNet
from minimask.tools.contrastive import (
    Contrastive, DenseProjectionHead, ProjectionHead, build_contrastive, concat_all_gather, default_queue_size,
    dense_correspondence, dense_info_nce, enqueue, info_nce, momentum_update,
)

# GN has 32 groups, so the narrowest GN ResNet-18 has width 32 (res5: 256 channels).
BACKBONE = dict(depth=18, width_per_group=32, norm="GN")
PIXELS = {1: dict(pixel_mean=(100.0,), pixel_std=(50.0,)),
          3: dict(pixel_mean=(103.53, 116.28, 123.675), pixel_std=(57.375, 57.12, 58.395)),
          4: dict(pixel_mean=(103.53, 116.28, 123.675, 100.0), pixel_std=(57.375, 57.12, 58.395, 50.0))}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These nets are tiny: intra-op threads only add synchronisation, which on a busy machine cost 100x (seen here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(method="moco", channels=3, queue_size=16, **kwargs):
    return Contrastive(queue_size=queue_size, method=method, in_channels=channels, dim=8, hidden=16, **BACKBONE,
                       **PIXELS[channels], **kwargs)


# ---- stateless functions --------------------------------------------------------------------------------------------

def test_info_nce_matches_a_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    t = 0.5
    # Row 0: q.k = 0.6, q.queue = (0, -1); row 1: q.k = 0, q.queue = (1, 0). Logits divided by T.
    rows = [[0.6 / t, 0.0 / t, -1.0 / t], [0.0 / t, 1.0 / t, 0.0 / t]]
    expected = sum(-row[0] + math.log(sum(math.exp(v) for v in row)) for row in rows) / 2
    assert info_nce(q, k, queue, t).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="queue"):
        info_nce(q, k, queue[:, :1], t)


def test_enqueue_fills_then_wraps_around():
    queue = torch.zeros(5, 1)
    ptr = enqueue(queue, 0, torch.tensor([[1.0], [2.0]]))
    assert ptr == 2 and queue.flatten().tolist() == [1, 2, 0, 0, 0]
    ptr = enqueue(queue, torch.tensor(ptr), torch.tensor([[3.0], [4.0]]))  # a 0-dim pointer tensor is accepted
    assert ptr == 4 and queue.flatten().tolist() == [1, 2, 3, 4, 0]
    ptr = enqueue(queue, ptr, torch.tensor([[5.0], [6.0]]))  # row 4, then wraps to row 0
    assert ptr == 1 and queue.flatten().tolist() == [6, 2, 3, 4, 5]
    ptr = enqueue(queue, ptr, torch.arange(7.0, 12.0)[:, None])  # B == K replaces everything
    assert ptr == 1 and queue.flatten().tolist() == [11, 7, 8, 9, 10]
    with pytest.raises(ValueError, match="at least one"):
        enqueue(queue, 0, torch.zeros(6, 1))
    with pytest.raises(ValueError, match="keys must be"):
        enqueue(queue, 0, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="pointer"):
        enqueue(queue, 5, torch.zeros(1, 1))


def test_momentum_update_follows_the_formula_and_leaves_buffers():
    key, query = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        key[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        key[0].bias.copy_(torch.tensor([1.0, -1.0]))
        query[0].weight.copy_(torch.tensor([[11.0, 12.0], [13.0, 14.0]]))
        query[0].bias.copy_(torch.tensor([-9.0, 9.0]))
        query[1].running_mean.fill_(5.0)
    momentum_update(key, query, 0.9)
    torch.testing.assert_close(key[0].weight, torch.tensor([[2.0, 3.0], [4.0, 5.0]]))  # 0.9 * k + 0.1 * q
    torch.testing.assert_close(key[0].bias, torch.tensor([0.0, 0.0]))
    assert torch.equal(key[1].running_mean, torch.zeros(2))  # MoCo: buffers are not copied
    with pytest.raises(ValueError, match="different parameters"):
        momentum_update(key, nn.Linear(2, 2), 0.9)


def test_dense_correspondence_is_the_argmax_of_cosine_similarity():
    q, k = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    match = dense_correspondence(q, k)
    assert match.shape == (2, 12) and match.dtype == torch.int64
    qf, kf = q.flatten(2), k.flatten(2)
    for b in range(2):
        for s in range(12):
            cosines = [float(qf[b, :, s] @ kf[b, :, t] / (qf[b, :, s].norm() * kf[b, :, t].norm())) for t in range(12)]
            assert match[b, s].item() == max(range(12), key=cosines.__getitem__)


def test_dense_info_nce_is_the_mean_of_per_location_info_nce():
    q = F.normalize(torch.randn(2, 4, 6), dim=1)  # (B, D, S)
    k = F.normalize(torch.randn(2, 4, 6), dim=1)
    queue = F.normalize(torch.randn(7, 4), dim=1)
    match = torch.randint(0, 6, (2, 6))
    per_location = [info_nce(q[b, :, s][None], k[b, :, match[b, s]][None], queue, 0.2) for b in range(2)
                    for s in range(6)]
    torch.testing.assert_close(dense_info_nce(q, k, match, queue, 0.2), torch.stack(per_location).mean())


def test_concat_all_gather_without_a_process_group_is_a_detached_identity():
    x = torch.randn(3, 2, requires_grad=True)
    y = concat_all_gather(x)
    assert torch.equal(y, x) and not y.requires_grad


def _gather_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    x = torch.full((2, 3), float(rank), requires_grad=True)
    torch.save(concat_all_gather(x), os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_concat_all_gather_two_ranks_in_rank_order(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [mp.get_context("spawn").Process(target=_gather_worker, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    expected = torch.tensor([0.0, 0.0, 1.0, 1.0])[:, None].expand(4, 3)
    for r in range(2):
        gathered = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert torch.equal(gathered, expected) and not gathered.requires_grad


def test_default_queue_size():
    assert default_queue_size(1_281_167, 256) == 65536  # MoCo on ImageNet
    assert default_queue_size(100, 8) == 48  # half the images, a multiple of the batch
    assert default_queue_size(1000, 3) == 498
    assert default_queue_size(8, 8) == 8  # at least one batch
    with pytest.raises(ValueError, match="batch_size"):
        default_queue_size(10, 0)


def test_projection_heads_shapes():
    x = torch.randn(2, 12, 3, 4)
    assert ProjectionHead(12, 16, 8)(x).shape == (2, 8)
    assert DenseProjectionHead(12, 16, 8)(x).shape == (2, 8, 3, 4)


# ---- the model ------------------------------------------------------------------------------------------------------

def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@torch.no_grad()
def _keys(model, view_k):
    """The normalised global key and dense-queue entry of the model's current key encoder (recomputed)."""
    f_k = model.key_backbone(model.normalize(view_k))["res5"]
    k = F.normalize(model.key_projector(f_k), dim=1)
    dense = F.normalize(model.key_dense_projector(f_k).mean((2, 3)), dim=1) if model.method == "densecl" else None
    return f_k, k, dense


@pytest.mark.parametrize("method,channels", [("moco", 3), ("densecl", 3), ("moco", 1), ("densecl", 4)])
def test_forward_backward_key_encoder_and_queues(method, channels):
    model, b, m = _model(method, channels, momentum=0.9), 4, 0.9
    view_q, view_k = torch.rand(b, channels, 64, 64), torch.rand(b, channels, 64, 64)  # res5 2 x 2: S = 4
    query_names = ("backbone", "projector") + (("dense_projector",) if method == "densecl" else ())
    for name in query_names:  # the key encoder starts as a copy of the query encoder, without gradient
        key = getattr(model, f"key_{name}")
        assert all(not p.requires_grad for p in key.parameters())
        assert all(torch.equal(p, _params(getattr(model, name))[n]) for n, p in key.named_parameters())
    queue0 = model.queue.clone()
    torch.testing.assert_close(queue0.norm(dim=1), torch.ones(16))

    out = model(view_q, view_k)
    assert set(out) == {"loss_contrastive", "acc"} | ({"loss_dense"} if method == "densecl" else set())
    assert all(torch.isfinite(v) for v in out.values()) and 0.0 <= out["acc"].item() <= 100.0
    # The losses are taken against the queue as it was before this batch's keys were enqueued.
    _, k, dense = _keys(model, view_k)
    with torch.no_grad():
        f_q = model.backbone(model.normalize(view_q))["res5"]
        q = F.normalize(model.projector(f_q), dim=1)
    if method == "densecl":
        torch.testing.assert_close(model.dense_queue[:b], dense)
    lam = 0.5 if method == "densecl" else 0.0
    torch.testing.assert_close(out["loss_contrastive"], (1 - lam) * info_nce(q, k, queue0, 0.2))
    assert model.queue_ptr.item() == b and torch.allclose(model.queue[:b], k) and torch.equal(model.queue[b:],
                                                                                            queue0[b:])
    sum(v for n, v in out.items() if n.startswith("loss")).backward()
    assert all(p.grad is None for name in query_names for p in getattr(model, f"key_{name}").parameters())
    assert model.backbone.conv1.weight.grad is not None and model.projector.mlp[0].weight.grad is not None

    # One SGD step of the query encoder; the next forward moves the key encoder by the momentum rule only.
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    key_before = {name: _params(getattr(model, f"key_{name}")) for name in query_names}
    query_now = {name: _params(getattr(model, name)) for name in query_names}
    out = model(view_q, view_k)
    for name in query_names:
        for n, p in getattr(model, f"key_{name}").named_parameters():
            torch.testing.assert_close(p, m * key_before[name][n] + (1 - m) * query_now[name][n])
    _, k2, dense2 = _keys(model, view_k)
    assert model.queue_ptr.item() == 2 * b
    torch.testing.assert_close(model.queue[b:2 * b], k2)  # the newest rows: this step's normalised keys
    if method == "densecl":
        assert model.dense_queue_ptr.item() == 2 * b
        torch.testing.assert_close(model.dense_queue[b:2 * b], dense2)  # one pooled vector per image (DenseCL k2)

    state = model.state_dict()
    expected = {"queue", "queue_ptr", "key_backbone.conv1.weight", "key_projector.mlp.0.weight"}
    if method == "densecl":
        expected |= {"dense_queue", "dense_queue_ptr", "key_dense_projector.mlp.0.weight"}
    assert expected <= set(state)
    # backbone_state() loads strictly into a plain (detector-style) ResNet with the same arguments.
    ResNet(**BACKBONE, in_channels=channels).load_state_dict(model.backbone_state(), strict=True)
    heads = model.head_state()
    assert "projector.mlp.0.weight" in heads and ("dense_projector.mlp.2.weight" in heads) == (method == "densecl")


def test_dense_loss_matches_the_functions():
    model = _model("densecl", dense_weight=0.3)
    view_q, view_k = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    dense_queue0 = model.dense_queue.clone()
    out = model(view_q, view_k)
    f_k, _, _ = _keys(model, view_k)
    with torch.no_grad():
        f_q = model.backbone(model.normalize(view_q))["res5"]  # (2, 256, 2, 2)
        q_dense = F.normalize(model.dense_projector(f_q).flatten(2), dim=1)
        k_dense = F.normalize(model.key_dense_projector(f_k).flatten(2), dim=1)
    expected = dense_info_nce(q_dense, k_dense, dense_correspondence(f_q, f_k), dense_queue0, 0.2)
    torch.testing.assert_close(out["loss_dense"], 0.3 * expected)


def test_preset_model_normalises_like_the_detector_and_feeds_its_backbone():
    overrides = ["input.modalities=visible,thermal", "model.pixel_mean=(103.53, 116.28, 123.675, 100.0)",
                 "model.pixel_std=(57.375, 57.12, 58.395, 50.0)"]
    cfg = get_config("tiny", overrides)
    model = build_contrastive(cfg, method="moco", queue_size=8, dim=8, hidden=16)
    assert model.in_channels == 4 and model.backbone.conv1.in_channels == 4
    detector = build_model(cfg)
    image = torch.rand(4, 64, 64)
    torch.testing.assert_close(model.normalize(image[None])[0], detector.preprocess([image])[0][0])
    load_imagenet_backbone(detector.backbone, model.backbone_state(), "minimask", strict=True)
    assert torch.equal(detector.backbone.conv1.weight, model.backbone.conv1.weight)


def test_argument_errors():
    for bad in (0, -4, 2.5, True, "16"):
        with pytest.raises(ValueError, match="queue_size must be a positive int"):
            _model(queue_size=bad)
    with pytest.raises(ValueError, match="method"):
        _model("simclr")
    with pytest.raises(ValueError, match="pixel_mean"):
        Contrastive(queue_size=8, in_channels=4, **BACKBONE)
    model = _model(queue_size=4)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="at least one"):  # a batch larger than the queue
        model(torch.rand(5, 3, 32, 32), torch.rand(5, 3, 32, 32))


# ---- a tiny run ----------------------------------------------------------------------------------------------------

def _textures(n, size, generator):
    """n random textures (n, 3, size, size) in [0, 1]: a random base colour plus two sine gratings of random
    orientation, frequency (2-8 cycles per image), phase and colour."""
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    images = 0.2 + 0.6 * torch.rand(n, 3, 1, 1, generator=generator).expand(n, 3, size, size)
    for i in range(n):
        for _ in range(2):
            scale = torch.tensor([math.pi, 6.0, 2 * math.pi])
            theta, freq, phase = (torch.rand(3, generator=generator) * scale).tolist()
            wave = torch.sin(2 * math.pi * (2 + freq) / size * (x * math.cos(theta) + y * math.sin(theta)) + phase)
            images[i] += 0.2 * torch.rand(3, 1, 1, generator=generator) * wave
    return images.clamp(0, 1)


def _augment(images, out, generator):
    """A random crop (60-100 % of the side) resized to out x out and a random horizontal flip, per image."""
    views = []
    size = images.shape[-1]
    for image in images:
        side = int(torch.randint(int(0.6 * size), size + 1, (), generator=generator))
        y, x = (int(torch.randint(0, size - side + 1, (), generator=generator)) for _ in range(2))
        view = F.interpolate(image[None, :, y:y + side, x:x + side], size=(out, out), mode="bilinear")[0]
        views.append(view.flip(-1) if bool(torch.rand((), generator=generator) < 0.5) else view)
    return torch.stack(views)


@pytest.mark.parametrize("method,view", [("moco", 32), ("densecl", 64)])  # densecl: res5 2 x 2, S = 4
def test_a_tiny_run_lowers_the_loss(method, view):
    """30 SGD steps on 8 textures, 4 per step in a fresh random order each epoch, with a queue of one batch (half
    the set, `default_queue_size(8, 4)`): a batch of all 8 would put every query's own image among the negatives.
    The queue is filled with real keys before the first measured step: its random initial vectors are easy
    negatives, so the first losses would be low for no merit.

    No norm here: a GN (32 groups) ResNet-18 needs width_per_group >= 32, and at width 32 on 32 x 32 views (res5
    1 x 1, so GN standardises 8 values per group) MoCo slid to the collapsed solution, loss log(1 + K), in 3 of 4
    seeds of 300 steps; without a norm 10 of 10 seeds of this test lowered the loss."""
    g = torch.Generator().manual_seed(0)
    images = _textures(8, view * 3 // 2, g)
    model = Contrastive(queue_size=4, method=method, depth=18, width_per_group=8, norm=None, dim=8, hidden=32,
                        momentum=0.9, **PIXELS[3])
    assert default_queue_size(len(images), 4) == 4
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.003, momentum=0.9)
    order = torch.randperm(8, generator=g).tolist()
    with torch.no_grad():
        model(_augment(images[order[:4]], view, g), _augment(images[order[:4]], view, g))  # fills the queue
    order = order[4:]
    losses = []
    for _ in range(30):
        if not order:
            order = torch.randperm(8, generator=g).tolist()
        batch, order = images[order[:4]], order[4:]
        out = model(_augment(batch, view, g), _augment(batch, view, g))
        loss = sum(v for n, v in out.items() if n.startswith("loss"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
