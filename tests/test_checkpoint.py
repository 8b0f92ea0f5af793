"""Tests for minimask.engine.checkpoint: atomic save, safe load, resume discovery, pruning, RNG state."""
import os
import pickle
import random
import shlex
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from minimask.engine.checkpoint import (
    FINAL_CHECKPOINT,
    CheckpointError,
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _training_state(iteration=1234):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.GroupNorm(1, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()  # creates momentum buffers in the optimizer state
    return model, opt, {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "iteration": iteration, "config": "tiny",
        "steps": [200, 270], "sizes": (640, 800), "loss": 1.25, "done": False, "extra": None, "rng": rng_state(),
    }


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert type(a) is type(b) and a == b


def test_checkpoint_name():
    assert checkpoint_name(1234) == "model_0001234.pth"
    assert checkpoint_name(0) == "model_0000000.pth"
    assert checkpoint_name(12_345_678) == "model_12345678.pth"
    assert checkpoint_name("final") == FINAL_CHECKPOINT == "model_final.pth"
    for bad in (-1, 1.0, "last", True):
        with pytest.raises(ValueError, match="iteration"):
            checkpoint_name(bad)


def test_save_load_round_trip(tmp_path):
    model, opt, state = _training_state()
    path = save_checkpoint(tmp_path / "sub" / checkpoint_name(1234), state)  # creates the directory
    assert path == str(tmp_path / "sub" / "model_0001234.pth")
    assert os.listdir(tmp_path / "sub") == ["model_0001234.pth"]  # no temporary file left
    loaded = load_checkpoint(path)
    _assert_same(state, loaded)
    _assert_same(state, torch.load(path, weights_only=True))  # plain safe torch.load reads it too
    # The loaded state dicts restore a model and an optimizer.
    model2 = nn.Sequential(nn.Linear(4, 3), nn.GroupNorm(1, 3))
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    for p, q in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(p["momentum_buffer"], q["momentum_buffer"])


def test_save_rejects_non_dict(tmp_path):
    with pytest.raises(ValueError, match="dict"):
        save_checkpoint(tmp_path / "x.pth", [1, 2])


def _partial_write_then(exc):
    def fake_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04" + b"\x00" * 100)  # the beginning of a zip archive, then the "crash"
        raise exc
    return fake_save


def test_crash_during_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / checkpoint_name(100)
    save_checkpoint(path, {"iteration": 100, "w": torch.arange(5)})
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _partial_write_then(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"iteration": 200, "w": torch.zeros(5)})
    assert path.read_bytes() == before  # previous checkpoint intact
    assert load_checkpoint(path)["iteration"] == 100
    assert os.listdir(tmp_path) == [path.name]  # temporary file cleaned up

    new_path = tmp_path / checkpoint_name(200)  # no previous file: nothing appears under the final name
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(torch, "save", _partial_write_then(KeyboardInterrupt()))
        save_checkpoint(new_path, {"iteration": 200})
    assert not new_path.exists()
    assert os.listdir(tmp_path) == [path.name]


def test_process_killed_mid_write(tmp_path):
    path = tmp_path / checkpoint_name(100)
    save_checkpoint(path, {"iteration": 100})
    before = path.read_bytes()
    # A child process overwrites the checkpoint and is SIGKILLed after writing part of the data: no cleanup runs.
    script = textwrap.dedent(f"""
        import os, signal, torch
        from minimask.engine.checkpoint import save_checkpoint
        def dying_save(obj, f, *a, **k):
            f.write(b"PK\\x03\\x04" + b"\\x00" * 4096)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        save_checkpoint({str(path)!r}, {{"iteration": 200, "w": torch.zeros(1000)}})
    """)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO_ROOT, capture_output=True)
    assert result.returncode == -9, result.stderr.decode()
    assert path.read_bytes() == before
    leftovers = [name for name in os.listdir(tmp_path) if name != path.name]
    assert len(leftovers) == 1 and leftovers[0].startswith(".")  # hidden temporary file, never a checkpoint
    assert list_checkpoints(tmp_path) == [str(path)]
    state, latest = load_latest(tmp_path)
    assert latest == str(path) and state["iteration"] == 100
    assert prune_checkpoints(tmp_path, keep=1) == []  # removes the stale temporary file, keeps the checkpoint
    assert os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "flipped"])
def test_corrupt_file_raises_naming_it(tmp_path, damage):
    path = tmp_path / checkpoint_name(7)
    save_checkpoint(path, {"w": torch.arange(1000), "name": "x" * 100})
    data = path.read_bytes()
    rng = np.random.default_rng(0)
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = b""
    elif damage == "garbage":
        data = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    else:  # damage the tensor bytes in place: the archive stays well-formed, only the CRC-32 catches it
        start = data.find(torch.arange(1000).numpy().tobytes()[:800])
        assert start > 0
        data = data[:start + 80] + bytes(8) * 25 + data[start + 280:]
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="model_0000007.pth"):
        load_checkpoint(path)


def test_missing_and_non_dict(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="list.pth"):
        load_checkpoint(tmp_path / "list.pth")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.mark.parametrize("fmt", ["torch_zip", "raw_pickle"])
def test_malicious_pickle_is_refused(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / checkpoint_name(1)
    payload = {"model": {"w": torch.ones(2)}, "x": _Exploit(marker)}
    if fmt == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match="model_0000001.pth"):
        load_checkpoint(path)
    assert not marker.exists()
    with pytest.warns(UserWarning, match="model_0000001.pth"):
        assert load_latest(tmp_path) == (None, None)
    assert not marker.exists()
    if fmt == "raw_pickle":  # control: the payload is live, an unsafe loader does run it
        pickle.loads(path.read_bytes())
        assert marker.exists()


def test_list_checkpoints_order_and_filtering(tmp_path):
    for name in ["model_0000100.pth", "model_10000000.pth", FINAL_CHECKPOINT, "model_9999999.pth", "notes.txt",
                 "model_abc.pth", ".model_0000200.pth.x1y2.tmp", "model_0000050.pth"]:
        (tmp_path / name).write_bytes(b"")
    names = [os.path.basename(p) for p in list_checkpoints(tmp_path)]
    assert names == ["model_0000050.pth", "model_0000100.pth", "model_9999999.pth", "model_10000000.pth",
                     FINAL_CHECKPOINT]
    assert list_checkpoints(tmp_path / "missing") == []


def test_load_latest_falls_back_past_corrupt(tmp_path):
    assert load_latest(tmp_path) == (None, None)
    assert load_latest(tmp_path / "missing") == (None, None)
    for it in (100, 200, 300):
        save_checkpoint(tmp_path / checkpoint_name(it), {"iteration": it})
    state, path = load_latest(tmp_path)
    assert state == {"iteration": 300} and path.endswith("model_0000300.pth")
    newest = tmp_path / checkpoint_name(300)
    newest.write_bytes(newest.read_bytes()[:50])  # truncated by a crash outside save_checkpoint
    with pytest.warns(UserWarning, match="model_0000300.pth"):
        state, path = load_latest(tmp_path)
    assert state == {"iteration": 200} and path == str(tmp_path / "model_0000200.pth")
    save_checkpoint(tmp_path / FINAL_CHECKPOINT, {"iteration": 400})
    assert load_latest(tmp_path)[0] == {"iteration": 400}  # model_final is the newest


def test_prune_keeps_newest_and_final(tmp_path):
    for it in (10, 20, 30, 40, 50):
        save_checkpoint(tmp_path / checkpoint_name(it), {"iteration": it})
    save_checkpoint(tmp_path / FINAL_CHECKPOINT, {"iteration": 60})
    (tmp_path / "metrics.json").write_text("{}")
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert [os.path.basename(p) for p in deleted] == ["model_0000010.pth", "model_0000020.pth", "model_0000030.pth"]
    assert sorted(os.listdir(tmp_path)) == ["metrics.json", "model_0000040.pth", "model_0000050.pth",
                                            FINAL_CHECKPOINT]
    assert prune_checkpoints(tmp_path, keep=2) == []
    prune_checkpoints(tmp_path, keep=1)
    assert sorted(os.listdir(tmp_path)) == ["metrics.json", "model_0000050.pth", FINAL_CHECKPOINT]
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="keep"):
            prune_checkpoints(tmp_path, keep=bad)
    assert prune_checkpoints(tmp_path / "missing", keep=1) == []


def _draw():
    return (torch.rand(5), torch.randint(0, 1000, (3,)), np.random.rand(4), np.random.standard_normal(3),
            [random.random() for _ in range(3)], random.gauss(0, 1), random.randrange(10**9))


def test_rng_state_round_trip_through_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in `random` ...
    np.random.standard_normal()  # ... and in numpy, so the cached values must be restored too
    state = rng_state()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    first = _draw()
    save_checkpoint(tmp_path / "rng.pth", {"rng": state})
    _draw()  # advance every stream
    set_rng_state(load_checkpoint(tmp_path / "rng.pth")["rng"])
    second = _draw()
    for a, b in zip(first, second):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        elif isinstance(a, np.ndarray):
            assert np.array_equal(a, b)
        else:
            assert a == b
    third = _draw()  # sanity: the streams really moved, so the equality above is not vacuous
    assert not torch.equal(first[0], third[0]) and first[4] != third[4]
    assert not np.array_equal(first[2], third[2])


def test_set_rng_state_missing_key():
    state = rng_state()
    del state["numpy_keys"]
    with pytest.raises(ValueError, match="numpy_keys"):
        set_rng_state(state)


def test_saved_file_has_default_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "a.pth", {"x": 1})
        assert os.stat(path).st_mode & 0o777 == 0o644  # as open(); not mkstemp's 0600
    finally:
        os.umask(umask)


def test_stream_changes_names_each_field_that_breaks_exact_resumption():
    from minimask.engine.checkpoint import stream_changes

    config = {"seed": 0, "data": {"train": "synthetic", "train_subset": 0}, "solver": {"batch_size": 16,
                                                                                         "max_iter": 90000}}
    saved = {"config": config, "world_size": 8}
    assert stream_changes(saved, config, world_size=8) == []
    resumed = {**config, "seed": 1, "solver": {"batch_size": 32, "max_iter": 90000}}
    assert stream_changes(saved, resumed, world_size=4) == ["seed 0 -> 1", "solver.batch_size 16 -> 32",
                                                            "world size 8 -> 4"]
