"""minimask.tools.experiments and experiments.py: the paper's grid (iterations and LR drops as train.py will use them),
the launchers' command text, the collector on hand-made runs (figures, table, equal-compute accounting), and a tiny
real grid end to end (slow)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import experiments as cli  # noqa: E402
import train  # noqa: E402
from minimask.config import PRESETS  # noqa: E402
from minimask.engine.checkpoint import save_checkpoint  # noqa: E402
from minimask.engine.solver import lr_steps  # noqa: E402
from minimask.tools import collect as co  # noqa: E402
from minimask.tools import experiments as ex  # noqa: E402

# The paper's schedules at batch 16 (spec Sec. 8.3): iterations and the LR drops at the last 60k and 20k.
EXPECTED = {"2x": (180_000, (120_000, 160_000)), "3x": (270_000, (210_000, 250_000)),
            "4x": (360_000, (300_000, 340_000)), "6x": (540_000, (480_000, 520_000)),
            "9x": (810_000, (750_000, 790_000)), "1x": (90_000, (60_000, 80_000))}


def test_paper_grids_have_the_papers_iterations_and_lr_drops():
    grids = ex.expand("paper")
    assert [g.name for g in grids] == ["gn", "syncbn", "r101", "scale_aug", "cascade", "x152", "keypoint",
                                       "subset_35k", "subset_10k", "subset_1k"]
    for g in grids:
        for run in g.runs:
            assert run.preset in PRESETS
            assert (run.iters, run.steps) == EXPECTED[run.schedule], (g.name, run.name)
    main = {r.name for r in ex.get_grid("gn").runs}
    assert main == {f"{i}_{s}" for i in ("random", "imagenet") for s in ("2x", "3x", "4x", "6x")}
    scale = {r.name: r for r in ex.get_grid("scale_aug").runs}
    assert set(scale) == {"random_9x", "imagenet_6x"} and ex.SCALE_AUG in scale["random_9x"].overrides
    x152 = ex.get_grid("x152").runs
    assert [r.init for r in x152] == ["random"] and "model.cascade.enabled=True" in x152[0].overrides
    assert {r.train_subset for r in ex.get_grid("subset_10k").runs} == {10_000}
    assert not ex.get_grid("subset_1k").verified and ex.get_grid("gn").verified


def test_every_printed_train_command_resolves_to_the_listed_schedule():
    """Parse each generated train.py command with train.py's own parser and config resolution."""
    for g in ex.expand("paper"):
        for run in g.runs:
            argv = ex.train_argv(g, run, root="runs", data="datasets/coco", weights_dir="w")
            assert argv[0] == "train.py"
            args = train.build_parser().parse_intermixed_args(argv[1:])
            cfg, _ = train.resolve_config(args)
            assert cfg.solver.max_iter == run.iters and cfg.solver.steps == run.steps == lr_steps(run.iters)
            assert cfg.data.train_subset == run.train_subset and args.init == run.init and args.resume
            assert (args.weights is not None) == (run.init == "imagenet")
            assert args.output == f"runs/{g.name}/{run.name}"
            if run.init == "imagenet":
                assert args.weights.startswith("w/") and args.weights.endswith(".pkl")
            if run.overrides == (ex.SCALE_AUG,):
                assert cfg.input.min_size_train == (640, 672, 704, 736, 768, 800)


def test_cli_list_and_print_launchers(capsys):
    assert cli.main(["print", "paper"]) == 0
    text = capsys.readouterr().out
    assert text.count("python train.py") == sum(len(g.runs) for g in ex.expand("paper"))
    assert "--iters 360000" in text and "--schedule 6x" in text and "LR x0.1 at 750000 and 790000" in text
    assert "WARNING: schedules not verified" in text
    assert cli.main(["print", "gn", "--launcher", "torchrun", "--gpus", "4"]) == 0
    assert capsys.readouterr().out.count("torchrun --nproc_per_node 4 train.py") == 8
    assert cli.main(["print", "cascade", "--launcher", "slurm", "--nodes", "2"]) == 0
    slurm = capsys.readouterr().out
    assert slurm.count("#SBATCH --requeue") == 2 and "#SBATCH --nodes=2" in slurm and "sbatch slurm_" in slurm
    assert cli.main(["print", "mini", "--root", "r"]) == 0
    mini = capsys.readouterr().out
    assert "python experiments.py prepare mini" in mini and "python pretrain.py --config tiny" in mini
    assert "--weights r/pretrain/model_final.pth" in mini
    assert cli.main(["run", "gn", "--dry-run", "--root", "r"]) == 0  # prints, runs nothing
    assert "python train.py --config r50_fpn_gn" in capsys.readouterr().out and not Path("r").exists()
    assert cli.main(["list"]) == 0
    assert "gn/random_4x: random init, 4x = 360000 iterations" in capsys.readouterr().out
    assert cli.main(["print", "nope"]) == 2
    assert "unknown grid" in capsys.readouterr().err


def _fake_run(path: Path, *, init, iters, steps, batch, aps, weights=""):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"solver": {"max_iter": iters, "steps": steps,
                                                             "batch_size": batch}}))
    lines = [{"iter": it, "kind": "train", "loss": 1.0} for it, _ in aps]
    lines += [{"iter": it, "kind": "eval", "bbox/AP": ap, "bbox/AP50": 2 * ap, "bbox/AP75": ap / 2,
               "segm/AP": ap - 1} for it, ap in aps]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (path / "experiment.json").write_text(json.dumps({"run": path.name, "init": init, "schedule": f"{iters} it",
                                                      "iters": iters, "steps": steps, "weights": weights}))


def test_collector_draws_figures_and_tables_with_equal_compute(tmp_path):
    weights = tmp_path / "pre" / "model_final.pth"
    save_checkpoint(weights, {"model": {}, "pretrain": {"iterations": 10, "batch_size": 8, "images_seen": 80,
                                                        "image_size": 32, "pixels_seen": 80 * 32 * 32,
                                                        "top1": 55.0}})
    _fake_run(tmp_path / "runs" / "random_20", init="random", iters=20, steps=[13, 18], batch=2,
              aps=[(10, 1.0), (20, 3.0)])
    _fake_run(tmp_path / "runs" / "random_60", init="random", iters=60, steps=[40, 53], batch=2,
              aps=[(30, 2.0), (60, 7.5)])
    _fake_run(tmp_path / "runs" / "imagenet_20", init="imagenet", iters=20, steps=[13, 18], batch=2,
              aps=[(10, 4.0), (20, 6.25)], weights=str(weights))
    _fake_run(tmp_path / "runs" / "partial", init="random", iters=100, steps=[67, 89], batch=2, aps=[(50, 5.0)])
    runs = co.find_runs([tmp_path / "runs"])
    assert [p.name for p in runs] == ["imagenet_20", "partial", "random_20", "random_60"]
    summary = co.collect(runs, tmp_path / "report")
    assert summary["files"] == ["ap.png", "ap_equal_compute.png", "table.md"]
    for name in ("ap.png", "ap_equal_compute.png"):
        assert (tmp_path / "report" / name).read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "report" / "table.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| imagenet_20 "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # run, init, schedule, iterations, LR drops, box AP/50/75, mask AP/50/75, images ft / pre / total
    assert cells == ["imagenet_20", "imagenet", "20 it", "20", "13, 18", "6.2", "12.5", "3.1", "5.2", "-", "-",
                     "40", "80", "120"]
    assert "| partial | random | 100 it | 50 of 100 |" in table  # unfinished runs say so
    # 80 pre-training + 40 fine-tuning = 120 images; the random-init run with as many images is random_60 (120)
    assert "+ fine-tuning 40 images = 120 images; the random-init run with about as many images, random_60 (120), " \
        "reached box AP 7.5 vs 6.2 pre-trained" in table
    assert summary["runs"][0]["pretrain"]["images_seen"] == 80
    with pytest.raises(ValueError, match="no run folder"):
        co.collect([], tmp_path / "empty")


def test_collector_plots_and_tabulates_the_miss_rate_where_logged(tmp_path):
    _fake_run(tmp_path / "runs" / "kaist", init="random", iters=20, steps=[13, 18], batch=2, aps=[(10, 1.0)])
    with open(tmp_path / "runs" / "kaist" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iter": 20, "kind": "eval", "bbox/AP": 2.0, "MR/Reasonable-all": 41.5}) + "\n")
    runs = co.find_runs([tmp_path / "runs"])
    assert co._kinds([co.load_run(p) for p in runs]) == ["bbox", "segm", "MR"]  # a panel each (MR: lower is better)
    assert co.collect(runs, tmp_path / "report")["files"] == ["ap.png", "table.md"]
    table = (tmp_path / "report" / "table.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| run "))
    assert "MR^-2 all | MR^-2 day | MR^-2 night" in header and "| 41.5 | - | - |" in table


def test_collect_cli_and_runs_without_an_experiment_record(tmp_path, capsys):
    _fake_run(tmp_path / "a", init="random", iters=4, steps=[3, 4], batch=2, aps=[(4, 1.5)])
    (tmp_path / "a" / "experiment.json").unlink()  # a run not started by the runner: init unknown, config used
    assert cli.main(["collect", str(tmp_path / "a"), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "| a | unknown | - | 4 | 3, 4 | 1.5 |" in out
    assert not (tmp_path / "rep" / "ap_equal_compute.png").exists()


def test_prepare_builds_the_crop_folder_and_penn_fudan_layout(tmp_path, penn_fudan, monkeypatch):
    from minimask.data.coco import dataset_splits
    from minimask.data.synthetic import build_synthetic

    build_synthetic(tmp_path / "syn", num_train=2, num_val=1)
    monkeypatch.setenv("MINIMASK_SHARED_DATA", str(penn_fudan.parent))
    monkeypatch.setenv("MINIMASK_CACHE", str(tmp_path / "cache"))  # the converted JSON files go there
    grid = ex.Grid("g", "", (), prepare={"crops": {"source": "{data}", "size": 16, "train_images": 2,
                                                   "val_images": 1}, "pennfudan": {}})
    ex.prepare(grid, root=tmp_path / "root", data=str(tmp_path / "syn"))
    assert (tmp_path / "root" / "data" / "crops" / "train" / "COMPLETE.json").is_file()
    splits = dataset_splits(str(tmp_path / "root" / "data" / "pennfudan"))
    train_json = json.loads(Path(splits["train"][0]).read_text())
    assert len(train_json["images"]) == 120 and (splits["val"][1] / train_json["images"][0]["file_name"]).is_file()
    ex.prepare(grid, root=tmp_path / "root", data=str(tmp_path / "syn"))  # finished steps are skipped


@pytest.mark.slow
def test_tiny_grid_runs_end_to_end_and_draws_the_figure_and_table(tmp_path):
    from minimask.data.synthetic import build_synthetic

    build_synthetic(tmp_path / "syn", num_train=8, num_val=4)
    grid = ex.tiny_grid()
    assert len(grid.runs) == 4 and {r.init for r in grid.runs} == {"random", "imagenet"}
    rc = ex.run_grid(grid, root=tmp_path / "runs", data=str(tmp_path / "syn"))
    assert rc == 0
    report = tmp_path / "runs" / "report"
    assert {"ap.png", "ap_equal_compute.png", "table.md", "summary.json"} <= {p.name for p in report.iterdir()}
    summary = json.loads((report / "summary.json").read_text())
    runs = {r["label"]: r for r in summary["runs"]}
    assert set(runs) == {"random_8", "random_16", "imagenet_8", "imagenet_16"}
    for r in runs.values():
        assert r["last_iter"] == r["max_iter"] and r["final"]["bbox"] is not None and r["final"]["segm"] is not None
        assert (r["pretrain"] is not None) == (r["init"] == "imagenet")
    assert runs["imagenet_16"]["pretrain"]["images_seen"] == 12
    assert [len(r["steps"]) for r in runs.values()] == [2] * 4
    # a rerun continues (--resume): a finished job does nothing and its metrics stay as they were
    metrics = (tmp_path / "runs" / "random_8" / "metrics.jsonl").read_text()
    assert ex.run_grid(grid, root=tmp_path / "runs", data=str(tmp_path / "syn"), only=("random_8",)) == 0
    assert (tmp_path / "runs" / "random_8" / "metrics.jsonl").read_text() == metrics
