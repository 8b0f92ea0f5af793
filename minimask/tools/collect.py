"""The collector of minimask's experiments: reads the runs' metrics.jsonl and draws the figures of "Rethinking
ImageNet Pre-training" (He, Girshick, Dollar 2019): AP against iterations for several runs overlaid, random init and
pre-trained in two colours, the LR drops marked (as in its Fig. 1), the same against images seen with pre-training
counted (its Fig. 2 counts the images seen in pre-training and fine-tuning), and a Markdown table of the final
box / mask / keypoint AP, and of the log-average miss rate where the runs logged it (KAIST's Reasonable setting).

A run folder is train.py's --output: metrics.jsonl (`minimask.engine.run_log`), config.json, and experiment.json,
written by `minimask.tools.experiments.run_grid` (init, schedule, LR drops, --weights). A run without
experiment.json is shown with init "unknown" from its config.json. When a run's --weights is a pretrain.py
checkpoint, its "pretrain" metadata (`minimask.tools.classification.read_pretrain_info`) gives the pre-training
iterations, batch size and images seen.

    from minimask.tools.collect import collect, find_runs
    collect(find_runs(["runs/mini"]), "runs/mini/report")   # ap.png, ap_equal_compute.png, table.md, summary.json
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

RANDOM_COLOUR, PRETRAINED_COLOUR, OTHER_COLOUR = "#5e3c99", "#e66101", "#777777"  # the paper's two-colour figures
EXPERIMENT_FILE = "experiment.json"


@dataclass
class RunResult:
    """One finished (or partial) run as the collector sees it."""

    path: Path
    label: str
    init: str  # random / imagenet / checkpoint / unknown
    schedule: str
    max_iter: int
    steps: tuple
    batch_size: int
    evals: list
    last_iter: int
    pretrain: dict | None = None
    min_sizes: tuple = ()  # training shorter sides (config input.min_size_train)
    wall_seconds: float | None = None
    cpu_seconds: float | None = None

    def final(self, kind: str, metric: str = "AP"):
        values = [e[f"{kind}/{metric}"] for e in self.evals if e.get(f"{kind}/{metric}") is not None]
        return values[-1] if values else None

    @property
    def images(self) -> int:
        return self.last_iter * self.batch_size

    @property
    def pretrain_images(self) -> int:
        return int(self.pretrain["images_seen"]) if self.pretrain else 0


def find_runs(paths) -> list[Path]:
    """The run folders (holding metrics.jsonl) given directly or up to two levels below the given folders."""
    found = []
    for p in map(Path, paths):
        if (p / "metrics.jsonl").is_file():
            found.append(p)
            continue
        found += sorted(q.parent for q in [*p.glob("*/metrics.jsonl"), *p.glob("*/*/metrics.jsonl")]
                        if (q.parent / "config.json").is_file())
    return found


def load_run(path) -> RunResult:
    """Read metrics.jsonl, config.json and experiment.json (written by `run_grid`; else init is "unknown") of a run,
    and the pretrain.py metadata of its --weights file when there is one."""
    from minimask.engine.run_log import read_metrics
    from minimask.tools.classification import read_pretrain_info

    path = Path(path)
    if not (path / "metrics.jsonl").is_file():
        raise ValueError(f"{path} is not a run folder: it has no metrics.jsonl")
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    solver = config.get("solver", {})
    record = {}
    for name in (EXPERIMENT_FILE, "run.json"):  # run.json: the init record train.py may write itself
        if (path / name).is_file():
            record = json.loads((path / name).read_text())
            break
    metrics = read_metrics(path / "metrics.jsonl", before=2**62)
    weights = record.get("weights") or ""
    pretrain = read_pretrain_info(weights) if weights and Path(weights).is_file() else None
    max_iter = int(record.get("iters") or solver.get("max_iter") or 0)
    return RunResult(path=path, label=record.get("run") or path.name, init=record.get("init", "unknown"),
                     schedule=record.get("schedule", ""), max_iter=max_iter,
                     steps=tuple(record.get("steps") or solver.get("steps") or ()),
                     batch_size=int(solver.get("batch_size") or 0), evals=[m for m in metrics if m["kind"] == "eval"],
                     last_iter=max((m["iter"] for m in metrics), default=0), pretrain=pretrain,
                     min_sizes=tuple(config.get("input", {}).get("min_size_train") or ()),
                     wall_seconds=record.get("wall_seconds"), cpu_seconds=record.get("cpu_seconds"))


# What each panel plots: kind -> (metric, axis label, title). The miss rate (KAIST's MR^-2, minimask.miss_rate)
# falls as a detector improves; AP rises.
PANELS = {"bbox": ("AP", "bbox AP (%)", "bbox AP"), "segm": ("AP", "segm AP (%)", "segm AP"),
          "keypoints": ("AP", "keypoints AP (%)", "keypoints AP"),
          "MR": ("Reasonable-all", "MR^-2, Reasonable (%; lower is better)", "MR^-2")}
# The table's columns per kind: (metric, header).
COLUMNS = {kind: tuple((m, f"{short} {m}") for m in ("AP", "AP50", "AP75"))
           for kind, short in (("bbox", "box"), ("segm", "mask"), ("keypoints", "kp"))}
COLUMNS["MR"] = tuple((f"Reasonable-{s}", f"MR^-2 {s}") for s in ("all", "day", "night"))  # KAIST's Reasonable


def _kinds(results) -> list[str]:
    return [k for k, (metric, _, _) in PANELS.items() if any(r.final(k, metric) is not None for r in results)]


# Self-supervised backbones (pretrain.py --method moco / densecl) get colours of their own beside the paper's two
SELF_SUPERVISED_COLOURS = {"moco": "#1b9e77", "densecl": "#377eb8"}


def _colour(r: RunResult) -> str:
    method = (r.pretrain or {}).get("method")
    if r.init == "imagenet" and method in SELF_SUPERVISED_COLOURS:
        return SELF_SUPERVISED_COLOURS[method]
    return {"random": RANDOM_COLOUR, "imagenet": PRETRAINED_COLOUR}.get(r.init, OTHER_COLOUR)


def plot_runs(results: list[RunResult], out_png, *, equal_compute: bool = False) -> None:
    """AP (and the miss rate where logged) against iterations (or images seen, pre-training included) per type;
    random init and pre-trained in two colours, one line style per schedule, dotted verticals at each run's LR
    drops (the paper's Fig. 1)."""
    from matplotlib.figure import Figure

    kinds = _kinds(results)
    if not kinds:
        return
    fig = Figure(figsize=(6.2 * len(kinds), 4.6))
    styles = ["-", "--", "-.", ":"]
    for i, kind in enumerate(kinds):
        metric, ylabel, title = PANELS[kind]
        ax = fig.add_subplot(1, len(kinds), i + 1)
        order, shaded = {}, set()
        shared = Counter((r.init, r.schedule) for r in results)  # several runs of one kind: name each line by its run
        for r in results:
            points = [(e["iter"], e[f"{kind}/{metric}"]) for e in r.evals if e.get(f"{kind}/{metric}") is not None]
            if not points:
                continue
            style = styles[order.setdefault(r.init, {}).setdefault(r.label, len(order[r.init])) % len(styles)]
            offset = r.pretrain_images if equal_compute else 0
            scale = r.batch_size if equal_compute else 1
            xs = [offset + it * scale for it, _ in points]
            colour = _colour(r)
            name = {"random": "random init", "imagenet": "pre-trained"}.get(r.init, r.init)
            if r.pretrain and r.pretrain.get("method") in SELF_SUPERVISED_COLOURS:
                name = f"pre-trained ({r.pretrain['method']})"
            ax.plot(xs, [ap for _, ap in points], style, marker="o", markersize=3, color=colour,
                    label=f"{name}, {r.label if shared[(r.init, r.schedule)] > 1 else r.schedule or r.label} "
                          f"({r.max_iter} it)")
            for step in r.steps:
                if step <= r.last_iter:
                    ax.axvline(offset + step * scale, color=colour, linestyle=":", linewidth=0.8, alpha=0.5)
            if equal_compute and offset and offset not in shaded:
                shaded.add(offset)
                ax.axvspan(0, offset, color=colour, alpha=0.05)
        xlabel = "images seen (pre-training included; shaded)" if equal_compute else "iterations"
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{title} on the val split")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(results: list[RunResult]) -> str:
    """Final AP / AP50 / AP75 per type, with iterations, LR drops, images seen and pre-training images."""
    kinds = _kinds(results)
    head = ["run", "init", "schedule", "iterations", "LR drops"]
    head += [header for k in kinds for _, header in COLUMNS[k]]
    head += ["images (fine-tune)", "images (pre-train)", "images (total)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        done = f"{r.last_iter}" if r.last_iter >= r.max_iter else f"{r.last_iter} of {r.max_iter}"
        row = [r.label, r.init, r.schedule or "-", done, ", ".join(map(str, r.steps)) or "-"]
        row += [_fmt(r.final(k, m)) for k in kinds for m, _ in COLUMNS[k]]
        row += [f"{r.images:,}", f"{r.pretrain_images:,}" if r.pretrain else "-", f"{r.images + r.pretrain_images:,}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def equal_compute_lines(results: list[RunResult]) -> list[str]:
    """For each pre-trained run with pretrain.py metadata: pre-training + fine-tuning images, and the random-init run
    that saw about as many images in all (within 25%; the paper counts pre-training with fine-tuning,
    Fig. 2), else the longest random-init run. Pixels per image differ between the two stages: both sizes are given."""
    lines = []
    randoms = [r for r in results if r.init == "random" and r.images]
    for r in results:
        if not r.pretrain:
            continue
        p = r.pretrain
        total = r.images + r.pretrain_images
        sizes = f" at shorter side {'/'.join(map(str, r.min_sizes))} px" if r.min_sizes else ""
        text = (f"- {r.label}: pre-training {p['iterations']:,} iterations x batch {p['batch_size']} = "
                f"{p['images_seen']:,} images at {p['image_size']}x{p['image_size']} px (top-1 "
                f"{_fmt(p.get('top1'))}%) + fine-tuning {r.images:,} images{sizes} = {total:,} images")
        if randoms:
            near = min(randoms, key=lambda q: abs(q.images - total))
            if abs(near.images - total) <= 0.25 * total:
                text += (f"; the random-init run with about as many images, {near.label} ({near.images:,}), reached "
                         f"box AP {_fmt(near.final('bbox'))} vs {_fmt(r.final('bbox'))} pre-trained")
            else:
                longest = max(randoms, key=lambda q: q.images)
                text += (f"; no random-init run saw as many images (the longest, {longest.label}, saw "
                         f"{longest.images:,} and reached box AP {_fmt(longest.final('bbox'))}; pre-trained "
                         f"{_fmt(r.final('bbox'))})")
        lines.append(text)
    return lines


def collect(run_dirs, out_dir) -> dict:
    """Read the runs, write out_dir/ap.png (AP vs iterations), ap_equal_compute.png (when a run has pretrain.py
    metadata), table.md and summary.json; return the summary. ValueError when no run folder is given."""
    results = [load_run(p) for p in run_dirs]
    if not results:
        raise ValueError("collect: no run folder (a folder with metrics.jsonl) given")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_runs(results, out_dir / "ap.png")
    text = ["# Results", "", markdown_table(results)]
    equal = equal_compute_lines(results)
    if equal:
        plot_runs(results, out_dir / "ap_equal_compute.png", equal_compute=True)
        text += ["## Equal compute (pre-training images counted with fine-tuning images)", "", *equal, ""]
    timed = [r for r in results if r.wall_seconds]
    if timed:
        text += ["## Time", "", *[f"- {r.label}: {r.wall_seconds:.0f} s wall, {r.cpu_seconds or 0:.0f} s CPU"
                                   for r in timed], ""]
    (out_dir / "table.md").write_text("\n".join(text))
    summary = {"runs": [{"path": str(r.path), "label": r.label, "init": r.init, "schedule": r.schedule,
                         "max_iter": r.max_iter, "last_iter": r.last_iter, "steps": list(r.steps),
                         "batch_size": r.batch_size, "images": r.images, "pretrain": r.pretrain,
                         "final": {k: r.final(k) for k in ("bbox", "segm", "keypoints")},
                         "wall_seconds": r.wall_seconds, "cpu_seconds": r.cpu_seconds} for r in results],
               "files": sorted(p.name for p in out_dir.iterdir() if p.suffix in (".png", ".md"))}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
