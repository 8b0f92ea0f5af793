"""train.py end to end on a tiny synthetic COCO set: outputs, exact resumption, the divergence guard, signals, bad
input. The runs call `train.main(argv)` in-process with the `tiny` preset for a handful of iterations."""
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from minimask.data.synthetic import build_synthetic  # noqa: E402
from minimask.engine.checkpoint import load_checkpoint  # noqa: E402

FAST = ["solver.log_period=1", "model.rpn.post_nms_topk_test=20", "model.roi_heads.detections_per_image=10",
        "input.min_size_test=96", "input.max_size_test=96"]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    build_synthetic(root, num_train=8, num_val=4)
    return root


def tiny_argv(data, output, *extra):
    return ["--config", "tiny", "--data", str(data), "--output", str(output), "--iters", "4", "--workers", "0",
            "--seed", "3", *extra, *FAST]


def read_metrics(output):
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(synthetic_root, tmp_path_factory):
    """4 iterations, checkpoints every 2, on a 6-image subset; evaluated at the end only."""
    out = tmp_path_factory.mktemp("run") / "out"
    rc = train.main(tiny_argv(synthetic_root, out, "--train-subset", "6", "--eval-period", "0",
                              "solver.checkpoint_period=2"))
    assert rc == 0
    return out


@pytest.mark.slow
def test_run_writes_metrics_config_checkpoints_and_eval(finished_run):
    out = finished_run
    assert {"config.json", "metrics.jsonl", "model_0000002.pth", "model_final.pth", "loss.png", "ap.png"} <= {
        p.name for p in out.iterdir()}
    assert not (out / "model_0000004.pth").exists()  # the end of the run is model_final.pth
    started = json.loads((out / "run.json").read_text())  # how the run started, for the experiment collector
    assert started == {"init": "random", "weights": "", "schedule": "", "iters": 4, "steps": started["steps"]}
    drawn = sorted((out / "vis").glob("*.png"))  # the final model's detections on the first val images
    assert len(drawn) == 4 and all(p.stat().st_size > 0 for p in drawn)
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["train_subset"] == 6 and config["seed"] == 3 and config["solver"]["max_iter"] == 4
    assert config["model"]["roi_heads"]["num_classes"] == 6  # from the dataset, not the preset's 3
    records = read_metrics(out)
    train_lines = [r for r in records if r["kind"] == "train"]
    assert [r["iter"] for r in train_lines] == [1, 2, 3, 4]
    for r in train_lines:
        for key in ("loss", "loss_classifier", "loss_mask", "loss_objectness", "lr", "sec_per_iter", "data_sec",
                    "max_mem_mb"):
            assert key in r
        assert r["loss"] == pytest.approx(sum(v for k, v in r.items() if k.startswith("loss_")))
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["iter"] == 4 and "bbox/AP" in evals[0] and "segm/AP" in evals[0]
    final = load_checkpoint(out / "model_final.pth")
    assert final["iteration"] == 4 and final["consumed_samples"] == 8
    assert final["label_map"]["category_ids"] == [1, 2, 3, 4, 5, 6]
    assert final["label_map"]["category_names"][-1] == "person"
    assert isinstance(final["code_version"], str) and final["code_version"]
    assert final["model"]["category_ids"].tolist() == [1, 2, 3, 4, 5, 6]
    assert load_checkpoint(out / "model_0000002.pth")["iteration"] == 2


@pytest.mark.slow
def test_resume_continues_exactly(finished_run, synthetic_root, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(finished_run, out)
    (out / "model_final.pth").unlink()
    rc = train.main(tiny_argv(synthetic_root, out, "--train-subset", "6", "--eval-period", "0",
                              "solver.checkpoint_period=2", "--resume"))
    assert rc == 0
    expected = load_checkpoint(finished_run / "model_final.pth")
    got = load_checkpoint(out / "model_final.pth")
    for name, tensor in expected["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    lines = lambda o: [r for r in read_metrics(o) if r["kind"] == "train"]  # noqa: E731
    assert [r["iter"] for r in lines(out)] == [1, 2, 3, 4]  # history continued, nothing logged twice
    for a, b in zip(lines(out), lines(finished_run)):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"]


def test_rerun_without_resume_refuses_to_overwrite(synthetic_root, tmp_path, capsys):
    (tmp_path / "model_0000002.pth").write_bytes(b"a previous run's checkpoint")
    assert train.main(tiny_argv(synthetic_root, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err


def _patch_forward(monkeypatch, on_call):
    """Wrap MaskRCNN.forward so that `on_call(n, losses)` sees (and may change) the n-th training call's losses."""
    from minimask.model.mask_rcnn import MaskRCNN

    original, calls = MaskRCNN.forward, []

    def forward(self, images, targets=None):
        out = original(self, images, targets)
        if self.training:
            calls.append(1)
            on_call(len(calls), out)
        return out

    monkeypatch.setattr(MaskRCNN, "forward", forward)


def test_non_finite_loss_stops_with_iteration_and_term(synthetic_root, tmp_path, monkeypatch, capsys):
    def poison(n, losses):
        if n == 3:
            losses["loss_mask"] = losses["loss_mask"] * float("nan")

    _patch_forward(monkeypatch, poison)
    out = tmp_path / "out"
    rc = train.main(tiny_argv(synthetic_root, out, "solver.checkpoint_period=2", "--eval-period", "0"))
    assert rc == 1
    err = capsys.readouterr().err
    assert "iteration 3" in err and "loss_mask" in err
    assert not (out / "model_final.pth").exists()
    assert load_checkpoint(out / "model_0000002.pth")["iteration"] == 2  # the last checkpoint is intact


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(synthetic_root, tmp_path, monkeypatch, capsys):
    def terminate(n, losses):
        if n == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    _patch_forward(monkeypatch, terminate)
    previous = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    rc = train.main(tiny_argv(synthetic_root, out, "solver.checkpoint_period=0"))
    assert rc == 0 and "SIGTERM" in capsys.readouterr().out
    assert load_checkpoint(out / "model_0000002.pth")["iteration"] == 2
    assert not (out / "model_final.pth").exists()
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is uninstalled again


@pytest.mark.parametrize("args, words", [
    (["--data", "{tmp}/missing"], ["--data", "missing"]),
    (["--config", "nope"], ["--config", "nope"]),
    (["--iters", "0"], ["iterations"]),
    (["--weights", "{tmp}/w.pth"], ["--weights", "--init"]),
    (["--init", "imagenet"], ["--weights"]),
    (["model.backbone.depht=18"], ["model.backbone.depht"]),
    (["solver.base_lr=fast"], ["solver.base_lr"]),
    (["--iters", "4", "--schedule", "1x"], ["--iters", "--schedule"]),
    (["--output", "{tmp}/file/out"], ["--output"]),
    (["--train-subset", "100"], ["subset"]),
    (["model.backbone.norm=FrozenBN"], ["--init random", "FrozenBN"]),
    (["--init", "imagenet", "--weights", "{tmp}/file"], ["{tmp}/file"]),
])
def test_bad_input_is_one_line_and_exit_code_2(synthetic_root, tmp_path, capsys, args, words):
    (tmp_path / "file").write_text("not a folder")
    argv = ["--config", "tiny", "--data", str(synthetic_root), "--output", str(tmp_path / "out"), "--iters", "2"]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("train.py: error:")
    for word in words:
        assert word.replace("{tmp}", str(tmp_path)) in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_precedence_preset_then_flags_then_overrides():
    from minimask.engine.solver import lr_steps

    def resolve(argv):
        return train.resolve_config(train.build_parser().parse_intermixed_args(argv))

    cfg, keys = resolve(["--config", "tiny", "--iters", "900", "--batch-size", "8", "--lr", "0.1",
                         "solver.batch_size=4", "model.roi_heads.num_classes=2"])
    assert cfg.solver.max_iter == 900 and cfg.solver.steps == tuple(lr_steps(900))
    assert cfg.solver.batch_size == 4 and cfg.solver.lr == 0.1  # the override wins over --batch-size
    assert "model.roi_heads.num_classes" in keys  # pinned: the dataset will not replace it
    cfg, _ = resolve(["--config", "tiny", "solver.max_iter=90"])
    assert cfg.solver.steps == tuple(lr_steps(90))  # steps follow an overridden max_iter
    cfg, _ = resolve(["--config", "tiny", "--schedule", "2x"])
    assert cfg.solver.max_iter == 180_000 and cfg.solver.steps == (120_000, 160_000)


def test_imagenet_init_takes_the_weights_conventions_and_reports_what_trains(synthetic_root, tmp_path, capsys):
    """A torchvision-format backbone: RGB / ImageNet mean-std and FrozenBN are put into the config (the preset's
    BGR and GN are not pinned), the backbone is loaded strictly, and the trainable parameters are reported."""
    import re

    from minimask.model.resnet import ResNet

    source = ResNet(depth=18, norm="BN").state_dict()
    torch.save({re.sub(r"(^|\.)norm(\d)", r"\1bn\2", k): v for k, v in source.items()}, tmp_path / "r18.pth")
    out = tmp_path / "out"
    assert train.main(tiny_argv(synthetic_root, out, "--iters", "1", "--init", "imagenet",
                                "--weights", str(tmp_path / "r18.pth"))) == 0
    printed = capsys.readouterr().out
    assert "--init imagenet: model.input_format: 'BGR' -> 'RGB'" in printed
    assert "trainable" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["backbone"]["norm"] == "FrozenBN" and config["model"]["pixel_mean"] == [0.485, 0.456,
                                                                                                   0.406]


def test_keypoint_classes_come_from_the_data_unless_pinned(synthetic_root, tmp_path):
    # The synthetic set's person (its 6th category) is the only class with keypoints; the circles get none.
    pairs = [f"{split}={synthetic_root}/annotations/instances_{split}.json:{synthetic_root}/{split}"
             for split in ("train", "val")]
    for extra, expected in (([], [6]), (["model.keypoint_head.classes=(1, 6)"], [1, 6])):
        out = tmp_path / f"out{len(extra)}"
        argv = tiny_argv(synthetic_root, out, "--iters", "1", "model.keypoint_head.enabled=True", *extra)
        argv[argv.index("--data") + 1:argv.index("--data") + 2] = pairs
        assert train.main(argv) == 0
        assert json.loads((out / "config.json").read_text())["model"]["keypoint_head"]["classes"] == expected


@pytest.mark.slow
def test_precise_bn_changes_the_evaluated_model_but_not_the_training_run(synthetic_root, tmp_path, capsys):
    bn = ["model.backbone.norm=BN", "model.fpn.norm=BN", "model.box_head.norm=BN", "model.mask_head.norm=BN"]
    runs = {}
    for iters in (0, 2):
        out = tmp_path / f"precise{iters}"
        argv = tiny_argv(synthetic_root, out, "--eval-period", "2", *bn, "solver.checkpoint_period=3",
                         f"solver.precise_bn_iters={iters}")  # 4 iterations: evaluations at 2 and 4
        assert train.main(argv) == 0
        runs[iters] = out
    assert capsys.readouterr().out.count("precise BN: recomputed the BatchNorm statistics over 2 batches") == 2
    losses = {i: [r["loss"] for r in read_metrics(out) if r["kind"] == "train"] for i, out in runs.items()}
    assert losses[0] == losses[2]
    # Training continues from the statistics it had before the evaluation at 2: the checkpoint at 3 is the same.
    plain, precise = (load_checkpoint(runs[i] / "model_0000003.pth")["model"] for i in (0, 2))
    assert all(torch.equal(plain[k], precise[k]) for k in plain)
    plain, precise = (load_checkpoint(runs[i] / "model_final.pth")["model"] for i in (0, 2))
    stats = [k for k in plain if k.rsplit(".", 1)[-1] in ("running_mean", "running_var")]
    assert stats and all(not torch.allclose(plain[k], precise[k]) for k in stats)  # the final model's: recomputed
    assert all(torch.equal(plain[k], precise[k]) for k in plain if k not in stats)  # the weights: the same


@pytest.mark.slow
def test_two_process_gloo_run(synthetic_root, tmp_path):
    """torchrun with 2 CPU processes: gradients all-reduced, rank 0 writes the outputs, both exit cleanly."""
    import subprocess

    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(Path(train.__file__)), *tiny_argv(synthetic_root, out, "--iters", "2", "--batch-size", "2")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 process(es), 1 per process" in done.stdout
    records = read_metrics(out)
    assert [r["iter"] for r in records if r["kind"] == "train"] == [1, 2]
    assert [r["kind"] for r in records].count("eval") == 1
    final = load_checkpoint(out / "model_final.pth")
    assert final["world_size"] == 2 and final["consumed_samples"] == 4


def test_demo_preset_is_a_small_synthetic_run():
    import minimask
    from minimask.engine.solver import lr_steps

    cfg = minimask.get_config("demo")
    assert cfg.data.train == "synthetic" and cfg.model.backbone.depth == 18 and cfg.model.fpn.out_channels == 64
    assert max(cfg.input.min_size_train) <= 256 and cfg.input.max_size_test <= 384
    assert cfg.solver.max_iter <= 2500 and lr_steps(cfg.solver.max_iter) < cfg.solver.steps  # later than 1x (measured)
    assert cfg.solver.steps[-1] < cfg.solver.max_iter
    model = minimask.build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) < 20e6


def test_batch_size_must_divide_over_processes(synthetic_root, tmp_path, monkeypatch, capsys):
    from minimask.distributed import DistInfo

    monkeypatch.setattr(train, "init_distributed", lambda: DistInfo(0, 3, 0, torch.device("cpu")))
    assert train.main(tiny_argv(synthetic_root, tmp_path / "out", "--batch-size", "4")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--batch-size 4" in err and "world size 3" in err
