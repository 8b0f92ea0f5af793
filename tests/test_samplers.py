"""Tests for minimask.data.samplers: the sharded infinite stream, exact resume, aspect grouping, test sharding,
subsets and per-sample seeded augmentation (with fake datasets; no files)."""
import itertools

import pytest
import torch

from minimask.data.samplers import (
    GroupedBatchSampler,
    InfiniteSampler,
    SampleKey,
    SeededDataset,
    _seed_worker,
    aspect_ratio_groups,
    build_test_loader,
    build_train_loader,
    collate,
    consumed_samples,
    shard_indices,
    subset_indices,
)


class FakeDataset:
    """Image i has size sizes[i]; its "augmentation" is a draw from torch's global RNG (as the transforms do)."""

    def __init__(self, sizes):
        self.sizes = sizes

    def __len__(self):
        return len(self.sizes)

    def image_hw(self, i):
        return self.sizes[i]

    def __getitem__(self, i):
        h, w = self.sizes[i]
        draw = torch.rand(4)  # (4,) stands in for the random resize/flip
        return torch.full((3, h, w), float(i)), {"image_id": i, "draw": draw}


def _sizes(n):
    return [(4, 6) if i % 3 else (6, 4) for i in range(n)]  # 2/3 landscape, 1/3 portrait


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def test_ranks_are_disjoint_within_an_epoch_and_cover_it():
    for size, world_size in [(10, 2), (7, 2), (11, 3)]:
        seen = []
        for rank in range(world_size):
            keys = _take(InfiniteSampler(size, seed=1, rank=rank, world_size=world_size).keys(), size)
            seen += [k.index for k in keys if k.position < size]  # this rank's share of epoch 0
            assert all(k.position % world_size == rank for k in keys)
        assert sorted(seen) == list(range(size))


def test_every_epoch_is_a_permutation_and_epochs_differ():
    stream = _take(iter(InfiniteSampler(9, seed=3)), 27)
    epochs = [stream[i:i + 9] for i in (0, 9, 18)]
    assert all(sorted(e) == list(range(9)) for e in epochs)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_same_seed_same_stream_different_seed_different():
    a = _take(iter(InfiniteSampler(50, seed=7, rank=1, world_size=2)), 40)
    b = _take(iter(InfiniteSampler(50, seed=7, rank=1, world_size=2)), 40)
    c = _take(iter(InfiniteSampler(50, seed=8, rank=1, world_size=2)), 40)
    assert a == b and a != c


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_continues_the_identical_stream(world_size):
    for rank in range(world_size):
        full = _take(InfiniteSampler(13, seed=5, rank=rank, world_size=world_size).keys(), 40)
        for iteration, batch in [(3, 2), (7, 3)]:  # crosses epoch boundaries (13 is not a multiple of anything)
            start = consumed_samples(iteration, batch, world_size)
            resumed = _take(InfiniteSampler(13, seed=5, rank=rank, world_size=world_size, start=start).keys(), 10)
            assert resumed == full[iteration * batch:iteration * batch + 10]
    # a start that is not a multiple of world_size: each rank resumes at its next position
    keys = _take(InfiniteSampler(13, seed=5, rank=1, world_size=2, start=4).keys(), 3)
    assert [k.position for k in keys] == [5, 7, 9]


def test_state_dict_round_trip():
    sampler = InfiniteSampler(20, seed=4, rank=0, world_size=2)
    state = sampler.state_dict(consumed_samples(5, 2, 2))
    assert InfiniteSampler.resume_start(state, seed=4, size=20) == 20
    with pytest.raises(ValueError, match="seed"):
        InfiniteSampler.resume_start(state, seed=5, size=20)
    with pytest.raises(ValueError):
        InfiniteSampler(0, seed=0)
    with pytest.raises(ValueError):
        InfiniteSampler(5, seed=0, rank=2, world_size=2)


def test_grouped_batches_are_homogeneous_and_keep_stream_order():
    sizes = _sizes(23)
    groups = aspect_ratio_groups(sizes)
    assert groups[:3] == [1, 0, 0]
    sampler = InfiniteSampler(23, seed=2, rank=1, world_size=2)
    batches = _take(iter(GroupedBatchSampler(sampler, groups, 3)), 30)
    assert all(len(b) == 3 and len({groups[k.index] for k in b}) == 1 for b in batches)
    # Reference: per group, the batches are the group's keys in stream order, cut into consecutive threes.
    stream = _take(sampler.keys(), 200)
    for group in (0, 1):
        emitted = [k for b in batches if groups[b[0].index] == group for k in b]
        expected = [k for k in stream if groups[k.index] == group][:len(emitted)]
        assert emitted == expected and len(emitted) > 0
    plain = _take(iter(GroupedBatchSampler(sampler, None, 3)), 5)
    assert [k for b in plain for k in b] == stream[:15]


@pytest.mark.parametrize("aspect_grouping", [True, False])
@pytest.mark.parametrize("world_size", [1, 2])
def test_train_loader_resume_is_exact(aspect_grouping, world_size):
    dataset = FakeDataset(_sizes(11))
    for rank in range(world_size):
        kwargs = dict(batch_size_per_rank=2, seed=9, rank=rank, world_size=world_size, num_workers=0,
                      aspect_grouping=aspect_grouping)
        full = _take(iter(build_train_loader(dataset, **kwargs)), 12)
        resumed = _take(iter(build_train_loader(dataset, start=consumed_samples(5, 2, world_size), **kwargs)), 7)
        for (images_a, targets_a), (images_b, targets_b) in zip(full[5:], resumed):
            assert [t["image_id"] for t in targets_a] == [t["image_id"] for t in targets_b]
            assert all(torch.equal(a["draw"], b["draw"]) for a, b in zip(targets_a, targets_b))
            assert all(torch.equal(a, b) for a, b in zip(images_a, images_b))
        if aspect_grouping:
            for images, _ in full:
                assert len({img.shape for img in images}) == 1  # one orientation per batch


def test_train_loader_rejects_bad_start_and_missing_sizes():
    with pytest.raises(ValueError, match="multiple"):
        build_train_loader(FakeDataset(_sizes(5)), batch_size_per_rank=2, seed=0, rank=0, world_size=2, start=3,
                           num_workers=0)
    with pytest.raises(ValueError, match="image_hw"):
        build_train_loader([(torch.zeros(3, 2, 2), {})], batch_size_per_rank=1, seed=0, rank=0, world_size=1,
                           num_workers=0)


def test_seeded_dataset_is_per_position_and_restores_the_rng():
    dataset = SeededDataset(FakeDataset(_sizes(4)), seed=3)
    a = dataset[SampleKey(1, 10)][1]["draw"]
    assert torch.equal(a, dataset[(1, 10)][1]["draw"])  # same position -> same augmentation
    assert not torch.equal(a, dataset[(1, 11)][1]["draw"])  # the same image later in the stream -> a new one
    assert not torch.equal(a, SeededDataset(FakeDataset(_sizes(4)), seed=4)[(1, 10)][1]["draw"])
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    dataset[(2, 5)]
    assert torch.equal(torch.rand(3), expected)  # the caller's RNG stream is untouched
    assert dataset.image_hw(0) == (6, 4) and len(dataset) == 4


def test_seeded_augmentation_is_identical_with_0_and_2_workers():
    dataset = FakeDataset(_sizes(9))
    kwargs = dict(batch_size_per_rank=2, seed=11, rank=1, world_size=2)
    serial = _take(iter(build_train_loader(dataset, num_workers=0, **kwargs)), 6)
    parallel = _take(iter(build_train_loader(dataset, num_workers=2, **kwargs)), 6)
    draws = [t["draw"] for _, targets in serial for t in targets]
    assert len({tuple(d.tolist()) for d in draws}) == len(draws)  # every sample got its own seed
    for (_, targets_a), (_, targets_b) in zip(serial, parallel):
        assert [t["image_id"] for t in targets_a] == [t["image_id"] for t in targets_b]
        assert all(torch.equal(a["draw"], b["draw"]) for a, b in zip(targets_a, targets_b))


def test_worker_init_is_deterministic():
    _seed_worker(1, seed=3, rank=0)
    a = torch.rand(2)
    _seed_worker(1, seed=3, rank=0)
    assert torch.equal(torch.rand(2), a)
    _seed_worker(1, seed=3, rank=1)
    assert not torch.equal(torch.rand(2), a)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_test_loader_shards_cover_every_index_once(world_size):
    for size in [0, 1, 5, 7, 10]:
        dataset = FakeDataset(_sizes(size))
        seen, lengths = [], []
        for rank in range(world_size):
            shard = [t["image_id"] for _, targets in build_test_loader(dataset, rank=rank, world_size=world_size,
                                                                        num_workers=0) for t in targets]
            assert shard == list(shard_indices(size, rank, world_size))  # contiguous, in order
            seen += shard
            lengths.append(len(shard))
        assert seen == list(range(size))
        assert max(lengths) - min(lengths) <= 1
    assert list(shard_indices(10, 3, 4)) == [8, 9] and list(shard_indices(10, 0, 4)) == [0, 1, 2]


def test_subset_indices():
    a = subset_indices(100, 10, seed=0)
    assert a == subset_indices(100, 10, seed=0)
    assert len(a) == len(set(a)) == 10 and a == sorted(a) and all(0 <= i < 100 for i in a)
    assert a != subset_indices(100, 10, seed=1)
    assert subset_indices(5, 5, seed=3) == [0, 1, 2, 3, 4]
    for bad in (0, 101):
        with pytest.raises(ValueError):
            subset_indices(100, bad, seed=0)


def test_collate():
    images, targets = collate([(torch.zeros(3, 2, 3), {"a": 1}), (torch.zeros(3, 4, 5), {"a": 2})])
    assert isinstance(images, list) and [i.shape for i in images] == [(3, 2, 3), (3, 4, 5)]
    assert targets == [{"a": 1}, {"a": 2}]
    assert collate([]) == ([], [])
