"""A training run's record: metrics.jsonl (one JSON object per line) and the plots drawn from it.

Each line is `{"iter": N, "kind": "train", "loss": ..., "loss_<name>": ..., "lr": ..., "sec_per_iter": ...,
"data_sec": ..., "max_mem_mb": ...}` or `{"iter": N, "kind": "eval", "bbox/AP": ..., "segm/AP": ..., ...}` with AP in
percent. `plot_metrics` draws loss.png and ap.png, the latter in the form of the paper's figures (AP against
iteration, "Rethinking ImageNet Pre-training", Figs. 1, 4-6).
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch


def read_metrics(path: Path, before: int) -> list[dict]:
    """The records of metrics.jsonl with iter <= `before` (a resumed run continues the same history)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("iter", 0) <= before:
                records.append(record)
    return records


def write_metrics(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def append_metrics(path: Path, record: dict, history: list[dict]) -> None:
    history.append(record)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def plot_metrics(history: list[dict], output: Path) -> None:
    """loss.png (total and per-term training losses) and ap.png (AP of each evaluated type vs iteration)."""
    from matplotlib.figure import Figure  # renders with Agg without pyplot (no GUI backend, faster import)

    train = [r for r in history if r["kind"] == "train"]
    if train:
        fig = Figure(figsize=(7, 4))
        ax = fig.add_subplot()
        for key in ["loss"] + sorted({k for r in train for k in r if k.startswith("loss_")}):
            ax.plot([r["iter"] for r in train if key in r], [r[key] for r in train if key in r], label=key,
                    linewidth=2 if key == "loss" else 1)
        ax.set(xlabel="iteration", ylabel="loss", yscale="log", title="training losses")
        ax.legend(fontsize=7)
        fig.savefig(output / "loss.png", dpi=100)
    evals = [r for r in history if r["kind"] == "eval" and any(f"{k}/AP" in r for k in ("bbox", "segm", "keypoints"))]
    if evals:  # (pretrain.py's evaluations are top-1 / top-5, no AP)
        fig = Figure(figsize=(7, 4))
        ax = fig.add_subplot()
        for kind in ("bbox", "segm", "keypoints"):
            points = [(r["iter"], r[f"{kind}/AP"]) for r in evals if r.get(f"{kind}/AP") is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{kind} AP")
        ax.set(xlabel="iteration", ylabel="AP (%)", title="COCO AP on the val split")
        ax.legend()
        fig.savefig(output / "ap.png", dpi=100)


def max_memory_mb(device: torch.device) -> float:
    """Peak memory: the CUDA allocator's on GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:
        return math.nan
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

