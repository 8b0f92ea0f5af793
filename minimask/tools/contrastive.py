"""Self-supervised pre-training of a minimask backbone: MoCo v2 and DenseCL (the contrastive counterpart of the
classification pre-training in `minimask.tools.classification`).

- MoCo (He, Fan, Wu, Xie, Girshick, "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020,
  Sec. 3 and Algorithm 1; code `moco/builder.py`): a query encoder trained by back-propagation, a key encoder that
  follows it by a momentum (exponential moving average) update, and a queue of K keys of earlier batches as the
  negatives of the InfoNCE loss (MoCo Eqn. 1).
- MoCo v2 (Chen, Fan, Girshick, He, "Improved Baselines with Momentum Contrastive Learning", arXiv 2003.04297): an
  MLP projection head (fc-relu-fc, 2048 hidden, 128 out), temperature 0.2, stronger augmentation (the caller's).
- DenseCL (Wang, Zhang, Shen, Kong, Li, "Dense Contrastive Learning for Self-Supervised Visual Pre-Training",
  CVPR 2021, Sec. 3.2-3.3, Eqn. 2-4; code `openselfsup/models/densecl.py` and `necks.py` `DenseCLNeck`): a second,
  dense head (1x1 conv-relu-1x1 conv on res5) whose per-location queries are contrasted with the key view's
  projection at the location matched by the cosine similarity of the two views' BACKBONE features (Sec. 3.3);
  the loss is (1 - lambda) * L_global + lambda * L_dense (Eqn. 4).

`Contrastive.backbone_state()` is the ResNet state dict (conv1.*, norm1.*, layer1..4.*) that `train.py --init
imagenet` loads, as `Classifier.backbone_state()`; pixels are normalised exactly like the detector preset's.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from minimask.data.images import num_channels
from minimask.distributed import get_world_size
from minimask.model.resnet import ResNet
from minimask.tools.classification import BACKBONE_KEYS, PIXEL_KEYS

METHODS = ("moco", "densecl")
MOCO_QUEUE_SIZE = 65536  # MoCo's K on ImageNet (Sec. 4.1); its Fig. 3 gains up to this size


# ---- losses and queue helpers (stateless) ---------------------------------------------------------------------------

def contrastive_logits(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """(N, 1 + K) logits [q.k, q @ queue^T] / T of N queries (MoCo Algorithm 1: l_pos, l_neg); column 0 is the
    positive. q, k (N, D) and queue (K, D) are L2-normalised by the caller; the queue gets no gradient."""
    if q.dim() != 2 or k.shape != q.shape or queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"need q, k (N, D) and queue (K, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(queue.shape)}")
    l_pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
    l_neg = q @ queue.detach().t()  # (N, K)
    return torch.cat([l_pos, l_neg], dim=1) / temperature  # (N, 1 + K)


def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """InfoNCE (MoCo Eqn. 1): mean over the N queries of -log softmax(logits)[0], the positive key k[i] against the
    K queue entries. q, k (N, D), queue (K, D), all L2-normalised -> 0-dim loss. Pass a clone of a queue buffer
    that is updated in place before backward (MoCo's `self.queue.clone().detach()`)."""
    logits = contrastive_logits(q, k, queue, temperature)  # (N, 1 + K)
    return F.cross_entropy(logits, logits.new_zeros(len(logits), dtype=torch.long))


@torch.no_grad()
def enqueue(queue: Tensor, ptr, keys: Tensor) -> int:
    """Write keys (B, D) into the ring buffer queue (K, D) in place at rows ptr, ptr+1, ... modulo K and return the
    new pointer (ptr + B) % K as a Python int (store it with `ptr_buffer.fill_(...)`).

    The oldest B rows are the ones replaced, so the queue always holds the K most recent keys (MoCo Sec. 3.2).
    MoCo's code asserts K % B == 0; here any 1 <= B <= K works by wrapping around the end. B > K is an error (the
    batch would overwrite its own keys)."""
    size, ptr = queue.shape[0], int(ptr)
    if keys.dim() != 2 or keys.shape[1] != queue.shape[1]:
        raise ValueError(f"keys must be (B, {queue.shape[1]}), got {tuple(keys.shape)}")
    if not 0 <= ptr < size:
        raise ValueError(f"queue pointer {ptr} is outside [0, {size})")
    if len(keys) > size:
        raise ValueError(f"cannot enqueue {len(keys)} keys into a queue of {size}: the queue must hold at least one "
                         f"(global) batch of keys")
    rows = (ptr + torch.arange(len(keys), device=queue.device)) % size  # (B,)
    queue[rows] = keys.to(queue.dtype)
    return (ptr + len(keys)) % size


@torch.no_grad()
def momentum_update(key_module: nn.Module, query_module: nn.Module, m: float) -> None:
    """theta_k <- m * theta_k + (1 - m) * theta_q for every parameter, in place (MoCo Eqn. 2).

    Only parameters, as MoCo's `_momentum_update_key_encoder`: buffers (BatchNorm running statistics) are not copied,
    the key encoder's BN keeps the statistics of its own forward passes (GroupNorm has none). The two modules must
    have the same architecture (parameters in the same order and shapes)."""
    key_params, query_params = list(key_module.parameters()), list(query_module.parameters())
    if len(key_params) != len(query_params) or any(a.shape != b.shape for a, b in zip(key_params, query_params)):
        raise ValueError("momentum_update: the key and query modules have different parameters")
    for p_k, p_q in zip(key_params, query_params):
        p_k.mul_(m).add_(p_q.detach(), alpha=1.0 - m)


@torch.no_grad()
def dense_correspondence(q_feats: Tensor, k_feats: Tensor) -> Tensor:
    """For every location of the query view's backbone map, the key view location of highest cosine similarity.

    q_feats, k_feats (B, C, H, W) (or (B, C, S)) -> (B, S) int64 indices into the key's S = H * W locations
    (row-major). DenseCL Sec. 3.3 and code: the match uses the BACKBONE features (`backbone_sim_matrix`), not the
    dense projections, and argmax over the key locations (ties: the first index)."""
    if q_feats.dim() not in (3, 4) or q_feats.shape[:2] != k_feats.shape[:2]:
        raise ValueError(f"need two (B, C, H, W) feature maps, got {tuple(q_feats.shape)} and {tuple(k_feats.shape)}")
    q = F.normalize(q_feats.flatten(2), dim=1)  # (B, C, S)
    k = F.normalize(k_feats.flatten(2), dim=1)  # (B, C, S')
    similarity = q.transpose(1, 2) @ k  # (B, S, S'): cosine of query location s and key location s'
    return similarity.argmax(dim=2)  # (B, S)


def dense_info_nce(q_dense: Tensor, k_dense: Tensor, match: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """DenseCL's dense loss (Eqn. 3): InfoNCE of every query location r against the key location match[:, r] as
    positive and the dense queue as negatives, mean over the B * S locations.

    q_dense (B, D, S), k_dense (B, D, S) normalised along D; match (B, S) int64 from `dense_correspondence`;
    queue (K, D) normalised -> 0-dim loss."""
    if q_dense.dim() != 3 or k_dense.shape != q_dense.shape or match.shape != (q_dense.shape[0], q_dense.shape[2]):
        raise ValueError(f"need q_dense, k_dense (B, D, S) and match (B, S), got {tuple(q_dense.shape)}, "
                         f"{tuple(k_dense.shape)}, {tuple(match.shape)}")
    d = q_dense.shape[1]
    positives = k_dense.gather(2, match[:, None, :].expand(-1, d, -1))  # (B, D, S): k at the matched location
    q = q_dense.transpose(1, 2).reshape(-1, d)  # (B * S, D)
    k = positives.transpose(1, 2).reshape(-1, d)  # (B * S, D)
    return info_nce(q, k, queue, temperature)


@torch.no_grad()
def concat_all_gather(x: Tensor) -> Tensor:
    """x (B, ...) of every process concatenated in rank order -> (W * B, ...), without gradient (MoCo's
    `concat_all_gather`; every process must call it with the same shape). One process: x itself (detached)."""
    world_size = get_world_size()
    if world_size == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


# ---- projection heads -----------------------------------------------------------------------------------------------

class ProjectionHead(nn.Module):
    """MoCo v2's MLP head: global average pool of res5, fc - relu - fc. (B, C, H, W) -> (B, out), not normalised.
    PyTorch's default Linear init, as MoCo v2's `builder.py`."""

    def __init__(self, in_channels: int, hidden: int = 2048, out: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x.mean(dim=(2, 3)))  # (B, C) -> (B, out)


class DenseProjectionHead(nn.Module):
    """DenseCL's dense head (`DenseCLNeck.mlp2`): 1x1 conv - relu - 1x1 conv on res5. (B, C, H, W) -> (B, out, H, W),
    not normalised. PyTorch's default Conv2d init, as DenseCL's (its init only touches Linear layers)."""

    def __init__(self, in_channels: int, hidden: int = 2048, out: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, out, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


# ---- the model -------------------------------------------------------------------------------------------------------

class Contrastive(nn.Module):
    """MoCo v2 (method="moco") or DenseCL (method="densecl") pre-training of a minimask `ResNet`.

    Query encoder: `backbone` (ResNet, res5 only), `projector` (+ `dense_projector`). Key encoder: deep copies
    `key_backbone`, `key_projector` (+ `key_dense_projector`) with requires_grad False, changed only by
    `momentum_update`. Buffers `queue` (K, D) and `queue_ptr` (0-dim int64), + `dense_queue`, `dense_queue_ptr`
    for densecl, random unit vectors at first (MoCo); with the key encoder they are in `state_dict()`, so a
    checkpoint resumes exactly.

    forward(view_q, view_k), each (B, C, S, S) float in [0, 1] with the dataset's channels (RGB [+ thermal], or
    thermal) -> {"loss_contrastive", ["loss_dense",] "acc"}: the global InfoNCE (x (1 - dense_weight) for densecl),
    the dense InfoNCE x dense_weight (DenseCL Eqn. 4), and the top-1 accuracy (percent) of the global logits, for
    logging only. Order of MoCo Algorithm 1 / DenseCL's `forward_train`: queries; under no_grad the momentum update,
    then the keys; the losses against the queues as they were; then the gathered keys are enqueued. The dense queue
    holds one vector per image, as DenseCL's code (`queue2` <- `k2`): the key view's dense projection average-pooled
    over the locations (`DenseCLNeck.avgpool2`), then L2-normalised; its queries are locations, its negatives images.

    No shuffling BN (MoCo Sec. 3.3): with GN there are no batch statistics to leak through; with SyncBN the
    statistics are already those of the global batch. (Per-process BN would leak them, as MoCo found: prefer GN or
    SyncBN.) The key encoder runs in the module's mode (train in training). dense_weight is ignored for moco.
    """

    def __init__(self, *, queue_size: int, depth: int = 50, groups: int = 1, width_per_group: int = 64,
                 norm: str = "GN", stride_in_1x1: bool = False, in_channels: int = 3, input_format: str = "BGR",
                 pixel_scale: float = 255.0, pixel_mean=(103.530, 116.280, 123.675), pixel_std=(57.375, 57.120, 58.395),
                 method: str = "moco", dim: int = 128, hidden: int = 2048, momentum: float = 0.999,
                 temperature: float = 0.2, dense_weight: float = 0.5):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        for name, value in (("queue_size", queue_size), ("dim", dim), ("hidden", hidden)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= momentum <= 1.0 or temperature <= 0 or not 0.0 <= dense_weight <= 1.0:
            raise ValueError(f"need momentum and dense_weight in [0, 1] and temperature > 0, got momentum={momentum}, "
                             f"dense_weight={dense_weight}, temperature={temperature}")
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
        if len(pixel_mean) != in_channels or len(pixel_std) != in_channels or min(pixel_std) <= 0:
            raise ValueError(f"an input of {in_channels} channels needs {in_channels} pixel_mean and pixel_std values "
                             f"(std > 0), got pixel_mean={tuple(pixel_mean)}, pixel_std={tuple(pixel_std)}")
        if norm == "FrozenBN":
            raise ValueError("pre-training needs a norm that learns (GN, BN or SyncBN), not FrozenBN")
        self.method, self.momentum, self.temperature = method, float(momentum), float(temperature)
        self.dense_weight = float(dense_weight) if method == "densecl" else 0.0
        self.in_channels, self.pixel_scale = in_channels, float(pixel_scale)
        self.bgr = input_format == "BGR" and in_channels in (3, 4)  # BGR reorders the visible channels only
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, -1, 1, 1))

        # Query encoder.
        self.backbone = ResNet(depth=depth, groups=groups, width_per_group=width_per_group, norm=norm,
                               stride_in_1x1=stride_in_1x1, out_features=("res5",), in_channels=in_channels)
        c5 = self.backbone.out_channels["res5"]
        self.projector = ProjectionHead(c5, hidden, dim)
        if method == "densecl":
            self.dense_projector = DenseProjectionHead(c5, hidden, dim)
        # Key encoder: starts equal to the query encoder (MoCo `param_k.data.copy_(param_q.data)`), no gradient.
        for name in self._query_names():
            key = copy.deepcopy(getattr(self, name))
            key.requires_grad_(False)
            self.add_module(f"key_{name}", key)
        # Queues of negatives: random unit vectors at first (MoCo `F.normalize(torch.randn(dim, K), dim=0)`).
        for prefix in ("", "dense_") if method == "densecl" else ("",):
            self.register_buffer(f"{prefix}queue", F.normalize(torch.randn(queue_size, dim), dim=1))  # (K, D)
            self.register_buffer(f"{prefix}queue_ptr", torch.zeros((), dtype=torch.long))

    def _query_names(self) -> tuple[str, ...]:
        return ("backbone", "projector") + (("dense_projector",) if self.method == "densecl" else ())

    def normalize(self, images: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1], RGB [+ thermal] -> the backbone's input, as `MaskRCNN.preprocess`."""
        if images.dim() != 4 or images.shape[1] != self.in_channels or not images.is_floating_point():
            raise ValueError(f"views must be float (B, {self.in_channels}, H, W) tensors in [0, 1], got "
                             f"{images.dtype} {tuple(images.shape)}")
        if self.bgr:
            images = torch.cat([images[:, :3].flip(1), images[:, 3:]], dim=1)
        return (images * self.pixel_scale - self.pixel_mean) / self.pixel_std  # (B, C, H, W)

    def forward(self, view_q: Tensor, view_k: Tensor) -> dict[str, Tensor]:
        if view_q.shape != view_k.shape:
            raise ValueError(f"the two views differ in shape: {tuple(view_q.shape)} vs {tuple(view_k.shape)}")
        densecl = self.method == "densecl"
        f_q = self.backbone(self.normalize(view_q))["res5"]  # (B, C5, h, w)
        q = F.normalize(self.projector(f_q), dim=1)  # (B, D)
        with torch.no_grad():  # MoCo Algorithm 1: no gradient to the keys
            for name in self._query_names():
                momentum_update(getattr(self, f"key_{name}"), getattr(self, name), self.momentum)
            f_k = self.key_backbone(self.normalize(view_k))["res5"]  # (B, C5, h, w)
            k = F.normalize(self.key_projector(f_k), dim=1)  # (B, D)

        logits = contrastive_logits(q, k, self.queue.clone(), self.temperature)  # (B, 1 + K)
        loss = F.cross_entropy(logits, logits.new_zeros(len(logits), dtype=torch.long))
        acc = 100.0 * (logits.detach().argmax(dim=1) == 0).float().mean()
        out = {"loss_contrastive": loss * (1.0 - self.dense_weight) if densecl else loss}
        if densecl:
            q_dense = F.normalize(self.dense_projector(f_q).flatten(2), dim=1)  # (B, D, S)
            with torch.no_grad():
                k_map = self.key_dense_projector(f_k)  # (B, D, h, w)
                k_dense = F.normalize(k_map.flatten(2), dim=1)  # (B, D, S)
                k_image = F.normalize(k_map.mean(dim=(2, 3)), dim=1)  # (B, D): DenseCL's k2, the dense queue's entry
                match = dense_correspondence(f_q, f_k)  # (B, S) from the backbone features (Sec. 3.3)
            loss_dense = dense_info_nce(q_dense, k_dense, match, self.dense_queue.clone(), self.temperature)
            out["loss_dense"] = loss_dense * self.dense_weight
            self.dense_queue_ptr.fill_(enqueue(self.dense_queue, self.dense_queue_ptr, concat_all_gather(k_image)))
        self.queue_ptr.fill_(enqueue(self.queue, self.queue_ptr, concat_all_gather(k)))
        out["acc"] = acc
        return out

    def backbone_state(self) -> dict[str, Tensor]:
        """The query backbone's state dict on CPU (conv1.*, norm1.*, layer1..4.*): `train.py --init imagenet`."""
        return {k: v.detach().cpu() for k, v in self.backbone.state_dict().items()}

    def head_state(self) -> dict[str, Tensor]:
        """The query projection heads on CPU, keys "projector.*" (and "dense_projector.*")."""
        names = ("projector", "dense_projector") if self.method == "densecl" else ("projector",)
        return {f"{n}.{k}": v.detach().cpu() for n in names for k, v in getattr(self, n).state_dict().items()}


def build_contrastive(cfg, *, method: str, queue_size: int, **kwargs) -> Contrastive:
    """The contrastive model for a detector preset: its backbone fields (BACKBONE_KEYS), pixel convention
    (PIXEL_KEYS) and input channels (cfg.input.modalities, unless kwargs give in_channels). kwargs: dim, hidden,
    momentum, temperature, dense_weight, in_channels."""
    m = cfg.model
    kwargs.setdefault("in_channels", num_channels(cfg.input.modalities))  # 1 for cross-modal views
    return Contrastive(method=method, queue_size=queue_size, **{k: getattr(m.backbone, k) for k in BACKBONE_KEYS},
                       **{k: getattr(m, k) for k in PIXEL_KEYS}, **kwargs)


def default_queue_size(num_images: int, batch_size: int) -> int:
    """The queue length K for `num_images` training images and `batch_size` keys enqueued per step (global batch):
    the largest multiple of batch_size not above min(65536, num_images // 2), and at least one batch.

    The queue holds the keys of the last K / B iterations, K / N of an epoch. MoCo's 65536 keys are 5 % of
    ImageNet's 1.28M images; a queue as long as a small dataset would hold keys of the same images, stale and
    repeated, the query's own image among them (a false negative): with a sampler that shuffles every epoch, an
    image's previous key is still queued with probability (K / N)^2 / 2, 0.1 % for MoCo on ImageNet, 50 % at
    K = N, 12.5 % at K = N / 2. Capped at MoCo's 65536; a multiple of the batch so that the ring buffer wraps at
    batch boundaries (as MoCo's code requires, though `enqueue` does not)."""
    for name, value in (("num_images", num_images), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    cap = min(MOCO_QUEUE_SIZE, num_images // 2)
    return max(batch_size, cap // batch_size * batch_size)
