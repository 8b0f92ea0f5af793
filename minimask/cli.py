"""What the command-line scripts share (train.py, evaluate.py, pretrain.py, visualize.py): bad input is one line
on stderr and exit code 2 (`UsageError`, raised by the argument parser too), argument types, and checks on paths made
before any time is spent."""
from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from minimask.data.coco import DATA_PAIR


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


def data_spec(data: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """`--data` as one spec, and the config overrides without the data pairs. In `--data train=A.json:IMAGES
    val=B.json:IMAGES key=value ...` argparse gives `--data` its first pair and the positional key=value list the
    rest; the pairs are moved back (no config key starts with train= or val=), the overrides keep their order."""
    pairs = [o for o in overrides if DATA_PAIR.match(o)]
    if pairs and not (data and DATA_PAIR.match(data)):
        raise UsageError(f"{pairs[0]!r}: split=ANN.json:IMAGES pairs follow --data (e.g. --data {pairs[0]})")
    rest = [o for o in overrides if not DATA_PAIR.match(o)]
    return (shlex.join([data, *pairs]) if data and DATA_PAIR.match(data) else data), rest
