"""Iteration-based training data: an infinite, sharded, resumable sample stream, aspect-ratio grouped batches,
per-sample seeded augmentation, and the train/test DataLoaders.

The paper trains for a fixed number of iterations (Detectron's schedules; "Rethinking ImageNet Pre-training",
Sec. 4), so training data is an endless stream, as in detectron2 (D2) `TrainingSampler` +
`AspectRatioGroupedDataset`:

- The GLOBAL stream is a concatenation of epochs; epoch e is a permutation of range(size) drawn from a
  `torch.Generator` seeded with (seed, e). Global position p holds index perm_{p // size}[p % size], so the stream is
  a pure function of (seed, size) and any position can be reached without replaying the ones before it.
- Rank r of `world_size` takes the positions p with p % world_size == r: within an epoch the ranks see disjoint
  images, and together they see every image once.
- Resuming: `start` is the number of GLOBAL samples already consumed by the trainer,
  `consumed_samples(iteration, batch_size_per_rank, world_size)` = iteration * batch_size_per_rank * world_size.
  Do NOT save what the sampler has yielded: DataLoader workers prefetch batches (num_workers * prefetch_factor
  ahead), so the sampler always runs ahead of the trainer; saving its count would skip the prefetched images.
  Exact resumption needs the same seed, dataset size, batch size, world size and grouping.
- Aspect-ratio grouping (D2 buckets images into landscape, w >= h here, and portrait, and fills each batch from one
  bucket, so padding to the batch's largest image wastes little). D2 buckets after loading, behind the DataLoader;
  here `GroupedBatchSampler` buckets INDICES, using the (h, w) that the dataset reads from its annotation file
  (`dataset.image_hw(i)`; resize keeps the orientation and flip does not change it). The batches are then decided
  before any worker runs, so they do not depend on worker timing, and resuming is exact: the batch sampler replays
  the index stream (cheap: no image is loaded) up to the saved batch, restoring its half-filled buckets.
- Augmentation: the sampler yields `SampleKey(index, position)` and `SeededDataset` seeds torch's global RNG from
  (seed, position) around each `dataset[index]` call, so the random resize and flip of each sample are the same for
  any number of workers, for any rank layout and after resuming. The caller's RNG state is restored afterwards.
"""
from __future__ import annotations

import functools
import hashlib
import random
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

# Tags that keep the seeds of different consumers of one user seed independent.
_PERMUTATION, _AUGMENTATION, _WORKER, _SUBSET = 0, 1, 2, 3


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of ints; stable across processes and Python versions (unlike hash())."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class SampleKey(NamedTuple):
    index: int  # dataset index
    position: int  # position in the global stream (seeds this sample's augmentation)


def consumed_samples(iteration: int, batch_size_per_rank: int, world_size: int) -> int:
    """Global samples consumed by the trainer after `iteration` finished iterations: the `start` to resume from."""
    if iteration < 0 or batch_size_per_rank < 1 or world_size < 1:
        raise ValueError(f"need iteration >= 0, batch_size_per_rank >= 1, world_size >= 1, got {iteration}, "
                         f"{batch_size_per_rank}, {world_size}")
    return iteration * batch_size_per_rank * world_size


class InfiniteSampler(Sampler):
    """Endless stream of dataset indices for one rank (see the module docstring for the stream's definition).

    `start` = global samples already consumed; this rank begins at the first position p >= start with
    p % world_size == rank. `__iter__` yields ints; `keys()` yields `SampleKey(index, position)`.
    """

    def __init__(self, size: int, *, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.size, self.seed, self.rank, self.world_size, self.start = size, int(seed), rank, world_size, start
        self._cached_epoch, self._cached_perm = None, None

    def permutation(self, epoch: int) -> list[int]:
        """Epoch `epoch` of the global stream: a permutation of range(size) seeded with (seed, epoch)."""
        if self._cached_epoch != epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, _PERMUTATION, epoch))
            self._cached_epoch = epoch
            self._cached_perm = torch.randperm(self.size, generator=generator).tolist()
        return self._cached_perm

    def index_at(self, position: int) -> int:
        """Dataset index at a global stream position."""
        return self.permutation(position // self.size)[position % self.size]

    def keys(self):
        """Infinite iterator of SampleKey(index, position) for this rank, from `start`."""
        position = self.start + (self.rank - self.start) % self.world_size
        while True:
            yield SampleKey(self.index_at(position), position)
            position += self.world_size

    def __iter__(self):
        return (key.index for key in self.keys())

    def state_dict(self, consumed: int) -> dict:
        """What to checkpoint: `consumed` must be the trainer's count (`consumed_samples`), not the sampler's."""
        return {"seed": self.seed, "size": self.size, "consumed": int(consumed)}

    @staticmethod
    def resume_start(state: dict, *, seed: int, size: int) -> int:
        """The `start` to resume from a `state_dict`; ValueError if the seed or the dataset size changed."""
        if state["seed"] != seed or state["size"] != size:
            raise ValueError(f"cannot resume the sample stream exactly: saved seed/size {state['seed']}/{state['size']}"
                             f" != current {seed}/{size}")
        return int(state["consumed"])


def aspect_ratio_groups(sizes_hw) -> list[int]:
    """Group id per image from its (h, w): 0 = landscape or square (w >= h), 1 = portrait."""
    return [0 if w >= h else 1 for h, w in sizes_hw]


class GroupedBatchSampler:
    """Batches of `batch_size` SampleKeys from an InfiniteSampler, each batch from one group (D2
    `AspectRatioGroupedDataset`). `group_ids[i]` is the group of dataset index i; None puts everything in one group
    (plain batching in stream order). The first `skip_batches` batches are computed and dropped (exact resume; about
    1.5 us per replayed sample on CPU, e.g. ~0.8 s for 270k iterations of 2 images per rank)."""

    def __init__(self, sampler: InfiniteSampler, group_ids, batch_size: int, *, skip_batches: int = 0):
        if batch_size < 1 or skip_batches < 0:
            raise ValueError(f"need batch_size >= 1 and skip_batches >= 0, got {batch_size}, {skip_batches}")
        if group_ids is not None and len(group_ids) != sampler.size:
            raise ValueError(f"group_ids has {len(group_ids)} entries for a dataset of {sampler.size}")
        self.sampler, self.group_ids, self.batch_size, self.skip_batches = sampler, group_ids, batch_size, skip_batches

    def __iter__(self):
        buckets = {}
        emitted = 0
        for key in self.sampler.keys():
            group = 0 if self.group_ids is None else self.group_ids[key.index]
            bucket = buckets.setdefault(group, [])
            bucket.append(key)
            if len(bucket) == self.batch_size:
                buckets[group] = []
                if emitted >= self.skip_batches:
                    yield bucket
                emitted += 1


class SeededDataset(Dataset):
    """Wraps a dataset so `self[SampleKey(index, position)]` = `dataset[index]` computed with torch's global RNG
    seeded from (seed, position). The RNG state of the calling process is saved and restored around the call, so
    with num_workers=0 the trainer's own randomness is untouched. Attribute access falls through to `dataset`."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, position = key
        generator = torch.default_generator  # the CPU RNG that transforms draw from; CUDA RNGs are left alone
        saved = generator.get_state()
        generator.manual_seed(derive_seed(self.seed, _AUGMENTATION, position))
        try:
            return self.dataset[index]
        finally:
            generator.set_state(saved)

    def __getattr__(self, name):
        if name == "dataset":  # not set yet (unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def collate(batch):
    """List of (image, target) -> (list of images, list of targets); images differ in size, the model pads them."""
    return [item[0] for item in batch], [item[1] for item in batch]


def subset_indices(num_images: int, n: int, seed: int) -> list[int]:
    """`n` distinct indices of range(num_images), sorted, chosen by a fixed seed (for `--train-subset N`)."""
    if not 1 <= n <= num_images:
        raise ValueError(f"subset size must be in [1, {num_images}], got {n}")
    generator = torch.Generator().manual_seed(derive_seed(seed, _SUBSET))
    return sorted(torch.randperm(num_images, generator=generator)[:n].tolist())


class IndexSubset(Dataset):
    """`dataset` restricted to `indices` (keeps `image_hw`, which the aspect-ratio grouping reads)."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]

    def image_hw(self, i):
        return self.dataset.image_hw(self.indices[i])


def shard_indices(size: int, rank: int, world_size: int) -> range:
    """Contiguous shard of range(size) for `rank`: the first size % world_size ranks get one extra index (D2
    `InferenceSampler`). Every index appears exactly once over all ranks; no padding duplicates."""
    if size < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need size >= 0 and 0 <= rank < world_size, got {size}, {rank}, {world_size}")
    base, extra = divmod(size, world_size)
    begin = rank * base + min(rank, extra)
    return range(begin, begin + base + (rank < extra))


def _seed_worker(worker_id: int, *, seed: int, rank: int):
    """DataLoader worker_init_fn: torch, random and numpy seeded from (seed, rank, worker_id)."""
    worker_seed = derive_seed(seed, _WORKER, rank, worker_id)
    torch.manual_seed(worker_seed)
    random.seed(worker_seed)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(worker_seed % 2**32)


def build_train_loader(dataset, *, batch_size_per_rank: int, seed: int, rank: int, world_size: int, start: int = 0,
                       num_workers: int, aspect_grouping: bool = True) -> DataLoader:
    """Endless DataLoader of (images list, targets list) batches of `batch_size_per_rank` for this rank.

    `start` = global samples the trainer already consumed (`consumed_samples`). With aspect grouping it must be a
    multiple of batch_size_per_rank * world_size (a whole number of iterations) and the grouped batches are
    replayed up to it; without grouping any `start` works and the sampler jumps there directly. With grouping the
    dataset must provide `image_hw(i) -> (h, w)` (without decoding the image).
    """
    if len(dataset) < 1:
        raise ValueError("the training dataset is empty")
    if batch_size_per_rank < 1 or world_size < 1 or num_workers < 0 or start < 0:
        raise ValueError(f"need batch_size_per_rank >= 1, world_size >= 1, num_workers >= 0, start >= 0, got "
                         f"{batch_size_per_rank}, {world_size}, {num_workers}, {start}")
    if aspect_grouping:
        per_iteration = batch_size_per_rank * world_size
        if start % per_iteration != 0:
            raise ValueError(f"with aspect grouping, start ({start}) must be a multiple of batch_size_per_rank * "
                             f"world_size ({per_iteration})")
        if not hasattr(dataset, "image_hw"):
            raise ValueError("aspect_grouping needs dataset.image_hw(i) -> (h, w)")
        sampler = InfiniteSampler(len(dataset), seed=seed, rank=rank, world_size=world_size, start=0)
        group_ids = aspect_ratio_groups(dataset.image_hw(i) for i in range(len(dataset)))
        batch_sampler = GroupedBatchSampler(sampler, group_ids, batch_size_per_rank,
                                            skip_batches=start // per_iteration)
    else:
        sampler = InfiniteSampler(len(dataset), seed=seed, rank=rank, world_size=world_size, start=start)
        batch_sampler = GroupedBatchSampler(sampler, None, batch_size_per_rank)
    return DataLoader(
        SeededDataset(dataset, seed),
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=functools.partial(_seed_worker, seed=seed, rank=rank),
    )


def build_test_loader(dataset, *, rank: int, world_size: int, num_workers: int, batch_size: int = 1) -> DataLoader:
    """One pass over this rank's contiguous shard (`shard_indices`) in order, as (images list, targets list)."""
    if num_workers < 0 or batch_size < 1:
        raise ValueError(f"need num_workers >= 0 and batch_size >= 1, got {num_workers}, {batch_size}")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=shard_indices(len(dataset), rank, world_size),
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )
