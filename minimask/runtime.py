"""Plumbing the command-line scripts share (train.py, evaluate.py, pretrain.py, visualize.py): one-line usage
errors, preemption signals, mixed precision, moving a batch to the device, the code version stamped into every
checkpoint, and the wording of fatal errors (a failed collective, a non-finite loss or gradient).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import threading
from pathlib import Path

import torch


class UsageError(Exception):
    """Bad command-line input: the scripts report it as one line on stderr and exit with code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with errors raised as UsageError (argparse would print the whole usage; one line is asked for)."""

    def error(self, message):
        raise UsageError(message)


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def require_file(path: str, flag: str) -> None:
    """UsageError naming `flag` unless `path` is an existing file."""
    if not Path(path).is_file():
        raise UsageError(f"{flag}: no such file: {path}")


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop checkpoints after the current iteration and exits cleanly."""

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers only install there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def autocast_context(device: torch.device, enabled: bool):
    """(context factory, GradScaler or None): bf16 autocast where the device supports it, else fp16 + scaling."""
    if not enabled:
        return contextlib.nullcontext, None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), None


def to_device(images: list, targets: list[dict], device: torch.device) -> tuple[list, list[dict]]:
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
               for t in targets]
    return images, targets


def ensure_writable_dir(path, flag: str = "--output") -> None:
    """Create the folder `path` and prove it writable, before any time is spent; ValueError naming `flag` if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{flag}: cannot write to {path} ({e.strerror or e})") from None


def code_version() -> str:
    """`git describe --always --dirty` of the repository minimask lives in, or "unknown"."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def in_collective(error: BaseException) -> bool:
    """Whether `error` was raised in torch.distributed or in minimask/distributed.py (collectives only)."""
    tb, files = error.__traceback__, []
    while tb is not None:
        files.append(Path(tb.tb_frame.f_code.co_filename).as_posix())
        tb = tb.tb_next
    return any("torch/distributed/" in f or f.endswith("minimask/distributed.py") for f in files)


def last_line(error: BaseException) -> str:
    """The last line of an error's message (a DataLoader worker's error carries the worker's traceback first)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def describe_divergence(model, loss_dict: dict, bad_loss: bool, iteration: int) -> str:
    """What is non-finite at `iteration`: the loss terms, else the parameters whose gradient is (a rare path:
    these checks sync freely)."""
    if bad_loss:
        bad = [k for k, v in loss_dict.items() if not torch.isfinite(v)]
        where = ", ".join(f"{k} = {loss_dict[k].item()}" for k in bad) if bad else "on another process"
        return f"non-finite loss at iteration {iteration}: {where}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if not bad:
        return f"non-finite gradient norm at iteration {iteration} (every gradient is finite; their norm overflows)"
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return f"non-finite gradient at iteration {iteration} in {len(bad)} parameter(s): {', '.join(bad[:5])}{more}"
