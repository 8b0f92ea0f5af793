"""Checkpoints: atomic saving, safe loading, discovery/pruning for resume, and RNG state capture.

Long schedules ("Rethinking ImageNet Pre-training", He, Girshick, Dollar 2019, Sec. 4 and 5: up to 6x-9x, i.e.
540k-810k iterations) are interrupted and resumed many times, so a checkpoint must never be left half-written and
resuming must survive a damaged file. Naming follows detectron2's `PeriodicCheckpointer` ("model_{:07d}.pth",
"model_final.pth"); the file format is plain `torch.save` of a dict.

- `save_checkpoint`: write to a temporary file in the same directory, flush + fsync, `os.replace` onto the final
  name (atomic on POSIX), then fsync the directory so the rename itself survives a power loss. A crash at any
  point leaves either the old file or the new one under the final name, never a partial one.
- `load_checkpoint`: first checks the CRC-32 of every member of the zip archive that `torch.save` writes
  (`torch.load` itself does not: a file damaged in place would load silently with wrong weights), then
  `torch.load(weights_only=True)` only, so a crafted pickle cannot run code; failures raise a `CheckpointError`
  naming the file. Consequently the state may only hold tensors, dicts, lists, tuples, strings,
  numbers, bools and None (what `state_dict()`s of modules and optimizers contain).
- `load_latest`: newest first; an unreadable checkpoint is skipped with a warning naming it.
- `rng_state` / `set_rng_state`: torch (CPU and, when available, CUDA), numpy's global RNG and python `random`,
  stored as tensors so that weights_only loading accepts them. Each process has its own streams; a trainer that
  saves only on rank 0 restores rank 0's streams on every rank unless it stores one state per rank.
"""
from __future__ import annotations

import os
import random
import re
import subprocess
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

FINAL_CHECKPOINT = "model_final.pth"
_NUMBERED = re.compile(r"^model_(\d{7,})\.pth$")  # detectron2 naming: model_0001234.pth
_TMP_SUFFIX = ".tmp"  # temporary files are ".<final name>.<random><_TMP_SUFFIX>": hidden, never match _NUMBERED


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be loaded (truncated, corrupt, or refused by weights_only loading)."""


def checkpoint_name(iteration: int | str) -> str:
    """File name for a checkpoint: 1234 -> "model_0001234.pth"; "final" -> "model_final.pth".

    Raises ValueError for negative or non-int iterations (other than "final").
    """
    if iteration == "final":
        return FINAL_CHECKPOINT
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"checkpoint_name: iteration must be an int >= 0 or 'final', got {iteration!r}")
    return f"model_{iteration:07d}.pth"


def _sort_key(name: str) -> float | None:
    """Iteration of a checkpoint file name (inf for the final one), None for other files."""
    if name == FINAL_CHECKPOINT:
        return float("inf")
    match = _NUMBERED.match(name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """Paths of the checkpoints in `output_dir`, sorted by iteration, "model_final.pth" last (it is the newest).

    Only "model_<digits>.pth" and "model_final.pth" count; temporary files of interrupted saves and anything else
    are ignored. A missing directory gives [].
    """
    if not os.path.isdir(output_dir):
        return []
    keyed = [(key, name) for name in os.listdir(output_dir) if (key := _sort_key(name)) is not None]
    return [os.path.join(output_dir, name) for _, name in sorted(keyed)]


def _fsync_dir(directory: str) -> None:
    """Persist a rename in `directory` (POSIX). Platforms that cannot open directories skip it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _set_default_mode(fd: int) -> None:
    """Give the temporary file the mode a plain open() would (mkstemp creates it 0600, private to the owner)."""
    if hasattr(os, "fchmod"):  # POSIX
        umask = os.umask(0)  # reading the umask means setting it; restored at once
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)


def save_checkpoint(path: str | os.PathLike, state: dict) -> str:
    """Atomically write `state` (a dict) to `path` with torch.save; returns the path as a string.

    The data go to a temporary file in the same directory (same filesystem, so the rename is atomic), which is
    flushed and fsynced, then `os.replace`d onto `path`, and the directory is fsynced. If anything fails the
    temporary file is removed and the exception propagates; the previous file at `path` (if any) is untouched.
    A process killed mid-write can leave a hidden temporary file behind (`prune_checkpoints` removes those) but
    never a partial file under `path`. Creates the directory if needed. Raises ValueError if state is not a dict.
    """
    if not isinstance(state, dict):
        raise ValueError(f"save_checkpoint: state must be a dict, got {type(state).__name__}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=_TMP_SUFFIX, dir=directory)
    try:
        _set_default_mode(fd)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # data on disk before the rename makes them visible under the final name
        os.replace(tmp_path, path)
    except BaseException:
        try:
            os.remove(tmp_path)
        except OSError:
            pass
        raise
    _fsync_dir(directory)
    return path


def _short_reason(error: BaseException) -> str:
    """The informative part of a torch.load error (its weights_only message has generic boilerplate)."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [line.strip() for line in str(error).splitlines()]
    detail = " ".join(line for line in lines if line and not line.startswith(boilerplate)) or str(error)
    return f"{type(error).__name__}: {detail[:300]}"


def _verify_archive(path: str) -> None:
    """Raise CheckpointError if `path` is a zip archive (torch.save's format) with a member failing its CRC-32.

    Files that are not zip archives (truncated ones, torch's legacy format) are left to torch.load to judge.
    Assumes torch.save computed the CRCs (its default; see `torch.serialization.set_crc32_options`).
    """
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()  # reads every member and compares its CRC-32
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"cannot load checkpoint {path}: damaged zip archive [{_short_reason(e)}]") from e
    if bad_member is not None:
        raise CheckpointError(f"cannot load checkpoint {path}: corrupt data (CRC-32 mismatch in {bad_member})")


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint` with `torch.load(weights_only=True)`.

    Raises FileNotFoundError (naming the file) when it does not exist, and CheckpointError (naming the file) when
    it is truncated, corrupt (CRC-32 mismatch), not a dict, or holds objects that weights_only loading refuses,
    such as a pickle crafted to call arbitrary functions: those are refused before anything runs.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    _verify_archive(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, UnicodeDecodeError, ...
        raise CheckpointError(
            f"cannot load checkpoint {path}: it is truncated or corrupt, or holds objects that weights_only "
            f"loading refuses (possibly code; do not load it with weights_only=False unless you trust it) "
            f"[{_short_reason(e)}]") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def load_latest(output_dir: str | os.PathLike, map_location="cpu") -> tuple[dict | None, str | None]:
    """(state, path) of the newest loadable checkpoint in `output_dir`, or (None, None) when there is none.

    Tries the checkpoints newest first ("model_final.pth", then the highest iteration); an unreadable one is
    skipped with a `UserWarning` naming it, so a file damaged by a crash falls back to the previous checkpoint.
    """
    for path in reversed(list_checkpoints(output_dir)):
        try:
            return load_checkpoint(path, map_location=map_location), path
        except (CheckpointError, FileNotFoundError) as e:  # FileNotFoundError: deleted since listing
            warnings.warn(f"load_latest: skipping unreadable checkpoint {path}: {e}", stacklevel=2)
    return None, None


def prune_checkpoints(output_dir: str | os.PathLike, keep: int) -> list[str]:
    """Delete all but the newest `keep` numbered checkpoints; returns the deleted paths.

    "model_final.pth" is never deleted and does not count towards `keep`. Leftover temporary files of interrupted
    saves are deleted too (they are not in the returned list), so call this from the single process that saves.
    Raises ValueError for keep < 1 (resuming needs at least one checkpoint).
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"prune_checkpoints: keep must be an int >= 1, got {keep!r}")
    numbered = [p for p in list_checkpoints(output_dir) if os.path.basename(p) != FINAL_CHECKPOINT]
    deleted = numbered[:-keep]
    for path in deleted:
        os.remove(path)
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        if name.startswith(".model_") and name.endswith(_TMP_SUFFIX):
            os.remove(os.path.join(output_dir, name))
    return deleted


def rng_state() -> dict[str, torch.Tensor]:
    """Snapshot of this process's random streams as a dict of CPU tensors (loadable with weights_only=True).

    Keys: "torch" (CPU generator), "torch_cuda" (one row per visible GPU; only when CUDA is available),
    "numpy_keys", "numpy_pos_gauss", "numpy_cached_gaussian" (numpy's global legacy RNG, `np.random.*`),
    "python_version", "python_internal", "python_gauss_next" (module `random`: has-value flag, value).
    """
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.stack(torch.cuda.get_rng_state_all())  # (G, S) uint8
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    if kind != "MT19937":
        raise ValueError(f"rng_state: unsupported numpy bit generator {kind!r}")
    state["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))  # (624,) uint32 values in int64
    state["numpy_pos_gauss"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    state["numpy_cached_gaussian"] = torch.tensor(cached_gaussian, dtype=torch.float64)
    version, internal, gauss_next = random.getstate()
    state["python_version"] = torch.tensor(version, dtype=torch.int64)
    state["python_internal"] = torch.tensor(internal, dtype=torch.int64)  # (625,) Mersenne Twister state + index
    state["python_gauss_next"] = torch.tensor(
        [gauss_next is not None, 0.0 if gauss_next is None else gauss_next], dtype=torch.float64)
    return state


_REQUIRED_RNG_KEYS = ("torch", "numpy_keys", "numpy_pos_gauss", "numpy_cached_gaussian", "python_version",
                      "python_internal", "python_gauss_next")


def set_rng_state(state: dict) -> None:
    """Restore the streams captured by `rng_state` exactly (tensors may live on any device).

    "torch_cuda" is restored when present and CUDA is available, for the first min(saved, visible) GPUs (a
    warning says when the counts differ). Raises ValueError naming any missing key.
    """
    missing = [key for key in _REQUIRED_RNG_KEYS if key not in state]
    if missing:
        raise ValueError(f"set_rng_state: missing keys {missing}")
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    if "torch_cuda" in state and torch.cuda.is_available():
        saved, visible = len(state["torch_cuda"]), torch.cuda.device_count()
        if saved != visible:
            warnings.warn(f"set_rng_state: {saved} saved CUDA RNG states, {visible} visible GPUs", stacklevel=2)
        for i in range(min(saved, visible)):
            torch.cuda.set_rng_state(state["torch_cuda"][i].cpu().to(torch.uint8), i)
    pos, has_gauss = (int(v) for v in state["numpy_pos_gauss"].tolist())
    keys = state["numpy_keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(state["numpy_cached_gaussian"])))
    has_next, next_value = state["python_gauss_next"].tolist()
    internal = tuple(int(v) for v in state["python_internal"].tolist())
    random.setstate((int(state["python_version"]), internal, next_value if has_next else None))


def stream_changes(saved: dict, config: dict, world_size: int) -> list[str]:
    """What differs between a checkpoint's run and the resuming one in what fixes the sample stream (seed, data,
    batch size, schedule length, world size): exact resumption needs none, so the trainer warns about each."""
    old = saved.get("config", {})
    fields = [("seed",), ("data", "train"), ("data", "train_subset"), ("solver", "batch_size"), ("solver", "max_iter")]
    changed = []
    for keys in fields:
        a, b = old, config
        for k in keys:
            a, b = a.get(k) if isinstance(a, dict) else None, b.get(k)
        if a != b:
            changed.append(f"{'.'.join(keys)} {a!r} -> {b!r}")
    if saved.get("world_size", world_size) != world_size:
        changed.append(f"world size {saved['world_size']} -> {world_size}")
    return changed


def code_version() -> str:
    """`git describe --always --dirty` of the repository minimask lives in, or "unknown"."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
