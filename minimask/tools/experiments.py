"""The experiments of "Rethinking ImageNet Pre-training" (He, Girshick, Dollar 2019) as plain data, the commands
that run them, and the collector that draws the paper-style figures and tables from the runs' metrics.jsonl.

- A `Grid` is a named list of detector runs (`Run`: preset, init, iterations, batch, subset, overrides), optionally
  with `pretrain.py` jobs (`Pretrain`) and data-preparation steps. Iterations come from
  `minimask.engine.solver.SCHEDULES` (1x = 90k at batch 16) and the LR drops from `minimask.engine.solver.lr_steps`
  (the last 60k and 20k iterations for >= 2x, Sec. 4 of the paper), exactly what train.py uses.
- The paper grids (`PAPER_GRIDS`): R50-FPN GN and SyncBN, random init vs ImageNet, 2x-6x (Fig. 1); R101;
  train-time scale augmentation 640-800 with random init 9x / pre-trained 6x, Cascade, X152 (the enhanced
  baselines); keypoints; and the 35k / 10k / 1k COCO subsets (training with less data). Groups whose schedules
  have not been checked against the paper's PDF say so (`Grid.verified`); section and figure numbers other than
  Fig. 1 are not cited for the same reason.
- `commands(grid, ...)`: the train.py / pretrain.py command lines for a local shell, torchrun or SLURM.
- `prepare`, `run_grid`: build the data the CPU grids read, run the jobs one after another, and collect the
  figures and the table with `minimask.tools.collect` (AP against iterations, random init vs pre-trained, the LR drops,
  the equal-compute view when a backbone came from pretrain.py).

The miniature replication (`mini`) and the test grid (`tiny`) pre-train the tiny backbone on crops of the
synthetic set (`minimask.tools.classification.build_crop_folder`), then train the detector from random init and from it.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minimask.engine.solver import SCHEDULES, lr_steps
from minimask.tools.collect import EXPERIMENT_FILE, collect, find_runs

SCALE_AUG = "input.min_size_train=(640, 672, 704, 736, 768, 800)"  # D2 Base-RCNN-FPN.yaml
CASCADE = ["model.cascade.enabled=True", "model.box_head.class_agnostic=True", "model.rpn.post_nms_topk_train=2000"]


def schedule_iters(name: str) -> int:
    """Iterations of a schedule at batch 16: SCHEDULES (1x = 90k, ...), and any other "<k>x" as k x 1x (4x)."""
    if name in SCHEDULES:
        return SCHEDULES[name]
    if name.endswith("x") and name[:-1].isdigit() and int(name[:-1]) > 0:
        return int(name[:-1]) * SCHEDULES["1x"]
    raise ValueError(f"unknown schedule {name!r}: use 1x, 2x, ... (1x = {SCHEDULES['1x']} iterations)")


@dataclass(frozen=True)
class Run:
    """One train.py run; `weights` / `data` may hold "{root}", "{data}", "{weights_dir}" (filled by `commands`)."""

    name: str
    preset: str
    init: str  # "random" or "imagenet"
    iters: int
    schedule: str = ""  # the label shown ("2x"); "" for custom lengths
    weights: str = ""
    data: str = "{data}"
    batch_size: int = 0  # 0: the preset's
    train_subset: int = 0
    lr: float = 0.0  # 0: the preset's (linear scaling)
    eval_period: int = -1  # -1: the preset's
    overrides: tuple = ()
    seed: int = 0

    @property
    def steps(self) -> tuple[int, int]:
        return lr_steps(self.iters)


@dataclass(frozen=True)
class Pretrain:
    """One pretrain.py job; its weights land in {root}/<name>/model_final.pth."""

    name: str
    preset: str
    data: str
    iters: int
    batch_size: int
    image_size: int
    lr: float = 0.0
    workers: int = 0  # the CPU grids decode small JPEGs in the main process
    clip_grad_norm: float = 0.0
    overrides: tuple = ()
    method: str = "supervised"  # or "moco" / "densecl" (pretrain.py --method)
    extra_data: tuple = ()  # more --data values (unlabelled images)
    flags: tuple = ()  # more pretrain.py flags, e.g. ("--temperature", "0.07")


@dataclass(frozen=True)
class Grid:
    name: str
    description: str
    runs: tuple
    pretrain: tuple = ()
    prepare: dict = field(default_factory=dict)  # step -> arguments ("crops", "pennfudan")
    verified: bool = True
    note: str = ""


def _paper_group(name, description, preset, weights, schedules, *, subset=0, overrides=(), verified=True, note="",
                 inits=("random", "imagenet"), pretrained_schedules=None) -> Grid:
    runs = []
    for init in inits:
        for sched in (pretrained_schedules if init == "imagenet" and pretrained_schedules else schedules):
            runs.append(Run(name=f"{init}_{sched}", preset=preset, init=init, iters=schedule_iters(sched),
                            schedule=sched, weights=f"{{weights_dir}}/{weights}" if init == "imagenet" else "",
                            train_subset=subset, overrides=tuple(overrides)))
    return Grid(name, description, tuple(runs), verified=verified, note=note)


_MAIN = ("2x", "3x", "4x", "6x")
_UNVERIFIED = ("schedules not verified against the paper's PDF: check the less-data figures of "
               "arXiv 1811.08883 first")
PAPER_GRIDS = {
    "gn": _paper_group("gn", "R50-FPN GN, random init vs ImageNet, 2x-6x (the paper's Fig. 1)", "r50_fpn_gn",
                       "R-50-GN.pkl", _MAIN),
    "syncbn": _paper_group("syncbn", "R50-FPN SyncBN, random init vs ImageNet, 2x-6x", "r50_fpn_syncbn",
                           "R-50.pkl", _MAIN),
    "r101": _paper_group("r101", "R101-FPN GN, random init vs ImageNet, 2x-6x", "r101_fpn_gn",
                         "R-101-GN.pkl", _MAIN),
    "scale_aug": _paper_group("scale_aug", "R50-FPN GN + train scales 640-800: random 9x, ImageNet 6x (enhanced)",
                              "r50_fpn_gn", "R-50-GN.pkl", ("9x",), pretrained_schedules=("6x",),
                              overrides=(SCALE_AUG,)),
    "cascade": _paper_group("cascade", "Cascade R50-FPN GN + scales 640-800: random 9x, ImageNet 6x (enhanced)",
                            "r50_fpn_gn_cascade", "R-50-GN.pkl", ("9x",), pretrained_schedules=("6x",),
                            overrides=(SCALE_AUG,)),
    "x152": _paper_group("x152", "Cascade X152-32x8d-FPN GN + scales 640-800, random init 9x (the paper's 50.9 AP "
                         "was with test-time augmentation)", "x152_32x8d_fpn_gn", "", ("9x",), inits=("random",),
                         overrides=(SCALE_AUG, *CASCADE)),
    "keypoint": _paper_group("keypoint", "R50-FPN GN keypoints, random init vs ImageNet",
                             "r50_fpn_gn_keypoint", "R-50-GN.pkl", _MAIN, verified=False, note=_UNVERIFIED),
    "subset_35k": _paper_group("subset_35k", "35k COCO images (less data)", "r50_fpn_gn", "R-50-GN.pkl",
                               ("1x", "2x", "3x"), subset=35_000, verified=False, note=_UNVERIFIED),
    "subset_10k": _paper_group("subset_10k", "10k COCO images (less data)", "r50_fpn_gn", "R-50-GN.pkl",
                               ("1x", "2x"), subset=10_000, verified=False, note=_UNVERIFIED),
    "subset_1k": _paper_group("subset_1k", "1k COCO images: the breakdown (less data)", "r50_fpn_gn", "R-50-GN.pkl",
                              ("1x",), subset=1_000, verified=False, note=_UNVERIFIED),
}

# ---- the CPU-sized grids: pre-train on synthetic crops, detect ------------------------------------------------------

_PENN_FUDAN = ("input.min_size_train=(160, 176, 192)", "input.max_size_train=320", "input.min_size_test=192",
               "input.max_size_test=320", "solver.clip_grad_norm=10.0", "solver.warmup_iters=30",
               "solver.checkpoint_period=0")  # pedestrians are large: 160-192 px keeps them ~40-190 px tall


def mini_grid(short: int = 150, long: int = 300, pretrain_iters: int = 300, eval_period: int = 50) -> Grid:
    """The miniature replication: tiny R18-GN backbone pre-trained on crops of the synthetic set's six classes, then
    Mask R-CNN on Penn-Fudan (120 train / 50 val photos) from random init and from it, short and long schedule."""
    runs = tuple(Run(name=f"{init}_{label}", preset="tiny", init=init, iters=iters, schedule=label,
                     weights="{root}/pretrain/model_final.pth" if init == "imagenet" else "",
                     data="{root}/data/pennfudan", batch_size=4, lr=0.04, eval_period=eval_period,
                     overrides=_PENN_FUDAN)
                 for init in ("random", "imagenet") for label, iters in (("short", short), ("long", long)))
    pre = Pretrain(name="pretrain", preset="tiny", data="{root}/data/crops", iters=pretrain_iters, batch_size=64,
                   image_size=64, lr=0.02, clip_grad_norm=5.0)  # GN from scratch diverged at LR 0.05 and 0.1 here
    return Grid("mini", "miniature replication on a 2-core CPU: synthetic-crop pre-training vs random init on "
                "Penn-Fudan, short and long schedules", runs, (pre,),
                prepare={"crops": {"source": "synthetic", "size": 64, "train_images": 2000, "val_images": 300},
                         "pennfudan": {}})


def tiny_grid(iters=(8, 16)) -> Grid:
    """A few dozen iterations of the tiny preset, two inits x two schedules, on --data (tests, smoke runs)."""
    fast = ("solver.log_period=4", "model.rpn.post_nms_topk_test=20", "model.roi_heads.detections_per_image=10",
            "input.min_size_test=96", "input.max_size_test=96", "solver.warmup_iters=2",
            "solver.checkpoint_period=0")
    runs = tuple(Run(name=f"{init}_{n}", preset="tiny", init=init, iters=n, schedule=f"{n} it",
                     weights="{root}/pretrain/model_final.pth" if init == "imagenet" else "", batch_size=2,
                     eval_period=iters[0], overrides=fast)
                 for init in ("random", "imagenet") for n in iters)
    pre = Pretrain(name="pretrain", preset="tiny", data="{root}/data/crops", iters=3, batch_size=4, image_size=32)
    return Grid("tiny", "smoke grid: tiny preset, two inits x two schedules, a few dozen iterations", runs, (pre,),
                prepare={"crops": {"source": "{data}", "size": 32, "train_images": 8, "val_images": 4}})


# Per-channel pixel mean and std of the default KAIST-layout miniature's training frames, in the model's order (B,
# G, R, thermal), measured by `python -m minimask.data.pixel_stats --data synthetic_kaist --modalities visible
# thermal` (tests/test_modalities.py checks them against that command).
SYNTHETIC_KAIST_STATS = {"visible": ((80.767, 74.082, 70.396), (70.531, 61.129, 56.986)),
                         "thermal": ((97.235,), (27.469,))}


def modality_grid(iters: int = 600, eval_period: int = 100) -> Grid:
    """The pedestrian detector trained from random init on the visible frames, the thermal frames and both stacked
    (4 channels) of the generated KAIST-layout miniature (`--data synthetic_kaist`), scored by MR^-2."""
    runs = []
    for modalities in (("visible",), ("thermal",), ("visible", "thermal")):
        mean = sum((SYNTHETIC_KAIST_STATS[m][0] for m in modalities), ())
        std = sum((SYNTHETIC_KAIST_STATS[m][1] for m in modalities), ())
        overrides = (f"input.modalities={','.join(modalities)}", f"model.pixel_mean={mean}".replace(" ", ""),
                     f"model.pixel_std={std}".replace(" ", ""))
        runs.append(Run(name="_".join(modalities), preset="tiny_pedestrian", init="random", iters=iters,
                        data="synthetic_kaist", eval_period=eval_period, overrides=overrides))
    return Grid("modalities", "pedestrians on the KAIST-layout miniature from random init: visible, thermal and "
                "both (4 channels), MR^-2 Reasonable all / day / night", tuple(runs))


def ssl_grid(iters: int = 300, pretrain_iters: int = 300, seeds=(0, 1), eval_period: int = 50) -> Grid:
    """Do I need ImageNet? On the user's own images: the tiny R18-GN detector on Penn-Fudan from random init, from
    MoCo v2 and from DenseCL pre-training on the same unlabelled images (Penn-Fudan's training photos and the
    synthetic set's), and from the supervised pre-training on the synthetic set's labelled crops (as `mini`), each
    fine-tuned on one schedule with two seeds; box / mask AP and MR^-2 against iterations and images seen."""
    fine_tune = _PENN_FUDAN + ("data.miss_rate=True",)
    runs = tuple(Run(name=f"{init}_s{seed}", preset="tiny", init="random" if init == "random" else "imagenet",
                     iters=iters, schedule="long",
                     weights="" if init == "random" else f"{{root}}/{init}/model_final.pth",
                     data="{root}/data/pennfudan", batch_size=4, lr=0.04, eval_period=eval_period,
                     overrides=fine_tune, seed=seed)
                 for init in ("random", "supervised", "moco", "densecl") for seed in seeds)
    # MoCo v2's own LR (0.03 per 256 images, 0.0075 at batch 64) and temperature 0.2 leave a random-init GN
    # ResNet-18 at the uniform loss log(1 + K) through the first 60 of these 300 iterations on 64-px views (its pooled
    # features barely differ between images); LR 0.1 with MoCo v1's temperature 0.07 is the first setting measured
    # to learn here (top-1 of the positive 5-15 % among 1,025 candidates by iteration 60).
    own = dict(preset="tiny", data="{root}/data/pennfudan", extra_data=("synthetic",), iters=pretrain_iters,
               batch_size=64, image_size=64, lr=0.1, clip_grad_norm=5.0, flags=("--temperature", "0.07"))
    pre = (Pretrain(name="supervised", preset="tiny", data="{root}/data/crops", iters=pretrain_iters, batch_size=64,
                    image_size=64, lr=0.02, clip_grad_norm=5.0),
           Pretrain(name="moco", method="moco", **own), Pretrain(name="densecl", method="densecl", **own))
    return Grid("ssl", "do I need ImageNet? random init vs MoCo v2 / DenseCL on the same unlabelled images vs "
                "supervised crops, fine-tuned on Penn-Fudan (2 seeds)", runs, pre,
                prepare={"crops": {"source": "synthetic", "size": 64, "train_images": 2000, "val_images": 300},
                         "pennfudan": {}})


def get_grid(name: str) -> Grid:
    if name in PAPER_GRIDS:
        return PAPER_GRIDS[name]
    if name == "mini":
        return mini_grid()
    if name == "tiny":
        return tiny_grid()
    if name == "modalities":
        return modality_grid()
    if name == "ssl":
        return ssl_grid()
    raise ValueError(f"unknown grid {name!r}; choose one of: {', '.join(grid_names())}")


def grid_names() -> list[str]:
    return ["paper", *PAPER_GRIDS, "mini", "tiny", "modalities", "ssl"]


def expand(name: str) -> list[Grid]:
    """"paper" -> every paper grid; any other name -> [that grid]."""
    return list(PAPER_GRIDS.values()) if name == "paper" else [get_grid(name)]


# ---- commands -----------------------------------------------------------------------------------------------------

def _fill(text: str, values: dict) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", str(value))
    return text


def run_dir(grid: Grid, run, root) -> Path:
    """Where a run writes: <root>/<run> for one grid; the paper's grids share a root as <root>/<grid>/<run>."""
    return Path(root) / grid.name / run.name if grid.name in PAPER_GRIDS else Path(root) / run.name


def train_argv(grid: Grid, run: Run, *, root, data: str, weights_dir: str) -> list[str]:
    """train.py's arguments (without the interpreter) for `run`; always --resume, so a rerun continues."""
    values = {"root": root, "data": data, "weights_dir": weights_dir}
    argv = ["train.py", "--config", run.preset, "--data", _fill(run.data, values), "--init", run.init]
    if run.init != "random":
        argv += ["--weights", _fill(run.weights, values)]
    if run.schedule in SCHEDULES and SCHEDULES[run.schedule] == run.iters:
        argv += ["--schedule", run.schedule]
    else:
        argv += ["--iters", str(run.iters)]  # train.py then takes lr_steps(iters): the same drops as listed
    for flag, value in (("--batch-size", run.batch_size), ("--train-subset", run.train_subset), ("--lr", run.lr),
                        ("--seed", run.seed)):
        if value:
            argv += [flag, str(value)]
    if run.eval_period >= 0:
        argv += ["--eval-period", str(run.eval_period)]
    return argv + ["--output", str(run_dir(grid, run, root)), "--resume", *run.overrides]


def pretrain_argv(job: Pretrain, *, root, data: str) -> list[str]:
    values = {"root": root, "data": data}
    argv = ["pretrain.py", "--config", job.preset, "--method", job.method, "--data", _fill(job.data, values),
            *(_fill(d, values) for d in job.extra_data), "--iters", str(job.iters),
            "--batch-size", str(job.batch_size), "--image-size", str(job.image_size), "--workers", str(job.workers)]
    if job.lr:
        argv += ["--lr", str(job.lr)]
    if job.clip_grad_norm:
        argv += ["--clip-grad-norm", str(job.clip_grad_norm)]
    return argv + [*job.flags, "--output", str(Path(root) / job.name), "--resume", *job.overrides]


def describe(grid: Grid, run: Run) -> str:
    from minimask.config import get_config

    batch = run.batch_size or get_config(run.preset).solver.batch_size
    subset = f", {run.train_subset} training images" if run.train_subset else ""
    return (f"{grid.name}/{run.name}: {run.init} init, {run.schedule or 'custom'} = {run.iters} iterations, LR x0.1 "
            f"at {run.steps[0]} and {run.steps[1]} (batch {batch}){subset}")


def commands(grid: Grid, *, launcher: str = "local", root="runs", data: str = "datasets/coco",
             weights_dir: str = "weights", gpus: int = 8, nodes: int = 1) -> list[str]:
    """Shell text for every job of `grid`: one comment line + one command per job (local / torchrun), or one
    sbatch script per job (slurm, the README's template: one torchrun agent per node, requeue on preemption)."""
    if launcher not in ("local", "torchrun", "slurm"):
        raise ValueError(f"launcher must be local, torchrun or slurm, got {launcher!r}")
    out = [f"# grid {grid.name}: {grid.description}"]
    if not grid.verified:
        out.append(f"# WARNING: {grid.note}")
    if grid.prepare:
        out.append(f"python experiments.py prepare {grid.name} --root {shlex.quote(str(root))} "
                   f"--data {shlex.quote(data)}")
    jobs = [(f"{grid.name}/{p.name}: pretrain.py, {p.iters} iterations at batch {p.batch_size}",
             pretrain_argv(p, root=root, data=data)) for p in grid.pretrain]
    jobs += [(describe(grid, r), train_argv(grid, r, root=root, data=data, weights_dir=weights_dir))
             for r in grid.runs]
    for comment, argv in jobs:
        text = " ".join(shlex.quote(a) for a in argv)
        out.append(f"# {comment}")
        if launcher == "local":
            out.append(f"python {text}")
        elif launcher == "torchrun":
            out.append(f"torchrun --nproc_per_node {gpus} {text}")
        else:
            job = argv[argv.index("--output") + 1].replace("/", "_")
            out.append("\n".join([
                "cat > " + shlex.quote(f"slurm_{job}.sh") + " <<'EOF'", "#!/bin/bash", f"#SBATCH --job-name={job}",
                f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={gpus}",
                "#SBATCH --cpus-per-task=64", "#SBATCH --time=24:00:00", "#SBATCH --signal=TERM@300",
                "#SBATCH --requeue", 'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                f'srun torchrun --nnodes "$SLURM_NNODES" --nproc_per_node {gpus} --rdzv-backend c10d '
                f'--rdzv-endpoint "$HEAD:29500" --rdzv-id "$SLURM_JOB_ID" {text}', "EOF",
                f"sbatch {shlex.quote(f'slurm_{job}.sh')}"]))
    return out


def experiment_record(grid: Grid, run: Run, *, root, data: str, weights_dir: str) -> dict:
    """What the collector needs to know about a run that metrics.jsonl and config.json do not say."""
    values = {"root": root, "data": data, "weights_dir": weights_dir}
    return {"grid": grid.name, "run": run.name, "init": run.init, "schedule": run.schedule, "iters": run.iters,
            "steps": list(run.steps), "weights": _fill(run.weights, values) if run.weights else "",
            "train_subset": run.train_subset, "spec": asdict(run)}


# ---- data preparation for the CPU grids ---------------------------------------------------------------------------

def shared_data_dir() -> Path | None:
    """$MINIMASK_SHARED_DATA, else a shared/data folder beside the repository (None if absent)."""
    candidates = [os.environ.get("MINIMASK_SHARED_DATA"), Path(__file__).resolve().parents[3] / "shared" / "data"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None


def prepare(grid: Grid, *, root, data: str = "synthetic") -> None:
    """Build what the grid's jobs read: the crop image folder ({root}/data/crops/{train,val}/<class>) and Penn-Fudan
    in the COCO layout train.py --data takes ({root}/data/pennfudan/annotations/instances_{train,val}.json and
    train/, val/ links to PNGImages/; the shared copy where there is one, else downloaded into the cache). Finished
    steps are skipped."""
    from minimask.data.coco import dataset_splits
    from minimask.tools.classification import CROP_MARKER, build_crop_folder

    root = Path(root)
    if "crops" in grid.prepare:
        spec = grid.prepare["crops"]
        source = _fill(spec["source"], {"data": data})
        splits = None
        for split in ("train", "val"):
            out = root / "data" / "crops" / split
            if (out / CROP_MARKER).is_file():
                continue
            splits = splits or dataset_splits(source)
            print(f"prepare: crops of {splits[split][0]} -> {out}", flush=True)
            build_crop_folder(*splits[split], out, size=spec["size"], max_images=spec[f"{split}_images"])
    if "pennfudan" in grid.prepare:
        from minimask.data.pennfudan import PENNFUDAN_URL, pennfudan_dataset

        out = root / "data" / "pennfudan"
        if not (out / "annotations" / "instances_val.json").is_file():
            shared = shared_data_dir()
            local = shared / "PennFudanPed" if shared and (shared / "PennFudanPed" / "PNGImages").is_dir() else None
            print(f"prepare: Penn-Fudan {local or PENNFUDAN_URL} -> {out}", flush=True)
            paths = pennfudan_dataset(local)  # checked against its SHA-256 manifest; downloaded when not local
            (out / "annotations").mkdir(parents=True, exist_ok=True)
            for split, ann in (("train", paths.train_ann), ("val", paths.val_ann)):
                link = out / split
                if not link.exists():
                    link.symlink_to(paths.image_dir.resolve(), target_is_directory=True)
                shutil.copyfile(ann, out / "annotations" / f"instances_{split}.json")


# ---- running a grid -----------------------------------------------------------------------------------------------

def run_grid(grid: Grid, *, root, data: str = "synthetic", weights_dir: str = "weights", python: str | None = None,
             only: tuple = (), report: bool = True) -> int:
    """Prepare, then run the grid's pretrain.py and train.py jobs one after another in subprocesses (from the
    repository root, each with --resume so that a rerun continues), write <run>/experiment.json for the collector,
    and collect into <root>/report (<root>/<grid>/report for the paper's grids). Returns the first non-zero exit
    code, else 0."""
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[2]
    root = Path(root).resolve()
    if data not in ("synthetic", "{data}") and Path(data).exists():
        data = str(Path(data).resolve())
    weights_dir = str(Path(weights_dir).resolve())
    prepare(grid, root=root, data=data)
    jobs = [(p.name, pretrain_argv(p, root=root, data=data), None) for p in grid.pretrain]
    jobs += [(r.name, train_argv(grid, r, root=root, data=data, weights_dir=weights_dir), r) for r in grid.runs]
    for name, argv, run in jobs:
        if only and name not in only:
            continue
        record = None
        if run is not None:
            out = run_dir(grid, run, root)
            out.mkdir(parents=True, exist_ok=True)
            record = experiment_record(grid, run, root=root, data=data, weights_dir=weights_dir)
            (out / EXPERIMENT_FILE).write_text(json.dumps(record, indent=1) + "\n")
        print(f"[{grid.name}] {name}: {' '.join(argv)}", flush=True)
        start, cpu_start = time.perf_counter(), _children_cpu_seconds()
        rc = subprocess.call([python or sys.executable, *argv], cwd=repo)
        seconds, cpu = time.perf_counter() - start, _children_cpu_seconds() - cpu_start
        print(f"[{grid.name}] {name}: exit {rc} after {seconds:.0f} s ({cpu:.0f} s of CPU time)", flush=True)
        if record is not None:
            (out / EXPERIMENT_FILE).write_text(json.dumps({**record, "wall_seconds": round(seconds, 1),
                                                           "cpu_seconds": round(cpu, 1)}, indent=1))
        if rc != 0:
            return rc
    if report:  # the paper's grids share a root: each one's report goes beside its runs
        base = root / grid.name if grid.name in PAPER_GRIDS else root
        collect(find_runs([base]), base / "report")
        print(f"[{grid.name}] report in {base / 'report'}:\n{(base / 'report' / 'table.md').read_text()}", flush=True)
    return 0


def _children_cpu_seconds() -> float:
    """User + system CPU time of the finished child processes (on a shared machine, wall time overstates a job)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 0.0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
