"""The fault suite (issue 9): each fault is injected and its documented outcome checked. Faults other test files
already check are not repeated here; the README's "Reliability" section maps every promise to its test.

- data: bad image files met during training, annotation files train.py cannot use, an empty training set after
  filtering, images of 1 x 1 px and 10,000 px on a side, pillow's decompression-bomb limit;
- arguments: every train.py / evaluate.py flag with an invalid value that tests/test_train.py and
  tests/test_evaluation.py do not try;
- process faults: SIGKILL in the middle of a checkpoint write (subprocess, slow), a truncated newest checkpoint
  (train.py falls back to the previous one and continues exactly), every checkpoint unreadable, an unwritable
  output folder;
- hostile files: a checkpoint crafted to run code, given to --resume, --init checkpoint and evaluate.py --weights;
- numeric faults: a NaN / Inf in the gradients only, or an Inf loss;
- distributed faults (slow): in a two-process gloo torchrun job, rank 1 raising, failing to load an image, or
  being SIGKILLed ends the whole job non-zero within 60 s, naming rank 1, with no process left behind.

In-process runs call `train.main(argv)`; subprocesses (kill and torchrun cases) run with OMP_NUM_THREADS=1, a
timeout, and are killed by process group if a test fails.
"""
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import evaluate  # noqa: E402
import minimask  # noqa: E402
import train  # noqa: E402
from minimask.data.coco import CocoDetection  # noqa: E402
from minimask.data.images import ImageLoadError, load_image  # noqa: E402
from minimask.data.synthetic import build_synthetic  # noqa: E402
from minimask.data.transforms import build_transforms  # noqa: E402
from minimask.engine.checkpoint import load_checkpoint  # noqa: E402

FAST = ["--workers", "0", "--seed", "3", "--eval-period", "0", "solver.log_period=1",
        "model.rpn.post_nms_topk_test=20", "model.roi_heads.detections_per_image=10", "input.min_size_test=64",
        "input.max_size_test=64"]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    build_synthetic(root, num_train=8, num_val=4)
    return root


@pytest.fixture
def data_copy(synthetic_root, tmp_path):
    """A private copy of the synthetic set, to damage."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    return root


def tiny_argv(data, output, iters=2, *extra):
    return ["--config", "tiny", "--data", str(data), "--output", str(output), "--iters", str(iters), *FAST, *extra]


def one_line_error(capsys, program="train.py") -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith(f"{program}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- data --------------------------------------------------------------------------------------------------------

def test_bad_image_files_met_in_training_stop_with_one_line_naming_the_file(data_copy, tmp_path, capsys):
    """Every training image is damaged in one of four ways (truncated JPEG, zero bytes, text, missing): the first
    batch fails, train.py exits 2 with one line naming the file and why, and no checkpoint is written.
    (load_image on each kind: tests/test_coco.py::test_bad_images_raise_naming_the_file.)"""
    damaged = {}
    for k, path in enumerate(sorted((data_copy / "train").iterdir())):
        kind = ("truncated", "empty", "text", "missing")[k % 4]
        data = path.read_bytes()
        if kind == "missing":
            path.unlink()
        else:
            path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "text": b"not an image\n"}[kind])
        damaged[path.name] = kind
    out = tmp_path / "out"
    assert train.main(tiny_argv(data_copy, out)) == 2
    line = one_line_error(capsys)
    assert "iteration 1" in line
    name = re.search(r"(\d{6}\.jpg)", line).group(1)
    expected = {"truncated": "cannot decode", "empty": "cannot decode", "text": "cannot decode",
                "missing": "not found"}[damaged[name]]
    assert expected in line and str(data_copy / "train" / name) in line
    assert not list(out.glob("*.pth"))


def _rewrite_train_json(root, mutate):
    ann = root / "annotations" / "instances_train.json"
    data = json.loads(ann.read_text())
    result = mutate(data)
    ann.write_text(result if isinstance(result, str) else json.dumps(data))
    return ann


@pytest.mark.parametrize("mutate, words", [
    (lambda d: "{\"images\": [", ["not valid JSON"]),
    (lambda d: d["images"][0].pop("height"), ["image #0", "missing key 'height'"]),
    (lambda d: d["annotations"][0].update(bbox="0 0 5 5"), ["annotation #0", "'bbox' must be"]),
    (lambda d: d["annotations"][1].update(category_id=999), ["annotation #1", "category_id 999"]),
])
def test_bad_annotation_file_stops_train_py_before_training(data_copy, tmp_path, capsys, mutate, words):
    """The file's validation errors (all kinds: tests/test_coco.py::test_bad_annotation_files) reach the user as one
    line naming the file, exit code 2, before any model is built."""
    ann = _rewrite_train_json(data_copy, mutate)
    assert train.main(tiny_argv(data_copy, tmp_path / "out")) == 2
    line = one_line_error(capsys)
    assert str(ann) in line and all(w in line for w in words), line
    assert not (tmp_path / "out" / "config.json").exists()


def test_empty_training_set_after_filtering_is_a_usage_error(data_copy, tmp_path, capsys):
    """Every box outside its image or of negative size: each annotation is dropped (counted in the stats), no image
    is left, and train.py says so with the counts (exit 2) instead of failing at the first batch."""
    def mutate(d):
        for k, a in enumerate(d["annotations"]):
            a["bbox"] = [-50.0, -50.0, 10.0, 10.0] if k % 2 else [5.0, 5.0, -3.0, 4.0]
    ann = _rewrite_train_json(data_copy, mutate)
    ds = CocoDetection(ann, data_copy / "train")
    assert len(ds) == 0 and ds.stats["degenerate"] == ds.stats["annotations"] > 0
    assert train.main(tiny_argv(data_copy, tmp_path / "out")) == 2
    line = one_line_error(capsys)
    assert "no training image left" in line and f"{ds.stats['annotations']} with an empty box" in line


def _one_image_dataset(root, size_hw, bbox):
    """A COCO file with one image of `size_hw` (a grey PNG) and one box `bbox` (xywh) with its polygon."""
    h, w = size_hw
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (w, h), (90, 120, 150)).save(root / "img" / "x.png")
    x, y, bw, bh = bbox
    ann = {"images": [{"id": 1, "file_name": "x.png", "height": h, "width": w}],
           "categories": [{"id": 1, "name": "a"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": bbox, "area": bw * bh,
                            "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]}]}
    (root / "ann.json").write_text(json.dumps(ann))
    return root / "ann.json", root / "img"


@pytest.mark.parametrize("mask_format", ["polygon", "bitmask"])
@pytest.mark.parametrize("size_hw, bbox", [((1, 1), [0, 0, 1, 1]), ((100, 10_000), [100, 8, 5000, 80])])
def test_tiny_and_very_wide_images_train_with_finite_losses(tmp_path, size_hw, bbox, mask_format):
    """A 1 x 1 px image and one 10,000 px wide go through the tiny preset's training transforms (up-scaled, resp.
    down-scaled to its longest side) and one training step of the tiny model with finite losses and gradients, with
    the polygon as it is and as a bitmap."""
    cfg = minimask.get_config("tiny", ["model.roi_heads.num_classes=1"])
    transforms = build_transforms(min_sizes=cfg.input.min_size_train, max_size=cfg.input.max_size_train,
                                  flip=False, train=True)
    ds = CocoDetection(*_one_image_dataset(tmp_path, size_hw, bbox), transforms=transforms, mask_format=mask_format)
    image, target = ds[0]
    h, w = image.shape[-2:]
    assert target["orig_size"] == size_hw and min(h, w) >= 1 and max(h, w) <= cfg.input.max_size_train
    masks = target["polygons"] if mask_format == "polygon" else target["masks"]
    assert len(masks) == 1 and target["boxes"].shape == (1, 4)
    assert mask_format == "polygon" or target["masks"].shape == (1, h, w)
    model = minimask.build_model(cfg).train()
    losses = model([image], [target])
    total = sum(losses.values())
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in losses.values())
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_extreme_aspect_ratio_resizes_to_at_least_one_pixel(tmp_path):
    ds = CocoDetection(*_one_image_dataset(tmp_path, (8, 10_000), [0, 0, 5000, 8]),
                       transforms=build_transforms(min_sizes=(160,), max_size=320, flip=False, train=True))
    image, _ = ds[0]
    assert image.shape[-2] >= 1 and image.shape[-1] == 320


def test_decompression_bomb_limit_is_an_image_load_error(tmp_path, monkeypatch):
    """Pillow refuses images over 2 x Image.MAX_IMAGE_PIXELS (~179 Mpx by default) as decompression bombs:
    load_image turns that into an ImageLoadError naming the file (the limit is lowered here to keep it cheap)."""
    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    with pytest.raises(ImageLoadError, match=r"bomb\.png.*DecompressionBombError"):
        load_image(tmp_path / "bomb.png")


@pytest.mark.slow
def test_ten_thousand_pixel_square_image_loads_and_resizes(tmp_path):
    """A 10,000 x 10,000 px image (100 Mpx: over pillow's warning limit, under its error limit) decodes with
    pillow's DecompressionBombWarning and is resized to the test size with its box scaled."""
    ds = CocoDetection(*_one_image_dataset(tmp_path, (10_000, 10_000), [1000, 2000, 5000, 4000]),
                       transforms=build_transforms(min_sizes=(200,), max_size=320, flip=False, train=False))
    with pytest.warns(Image.DecompressionBombWarning):
        image, target = ds[0]
    assert image.shape == (3, 200, 200) and target["orig_size"] == (10_000, 10_000)
    torch.testing.assert_close(target["boxes"], torch.tensor([[20.0, 40.0, 120.0, 120.0]]))


# ---- arguments ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--init", "bogus"], ["--init", "invalid choice"]),
    (["--iters", "abc"], ["--iters", "invalid int"]),
    (["--iters", "-3"], ["iterations", "-3"]),
    (["--schedule", "7x"], ["--schedule", "invalid choice"]),
    (["--batch-size", "0"], ["batch size", "0"]),
    (["--batch-size", "two"], ["--batch-size", "invalid int"]),
    (["--lr", "-1"], ["learning rate"]),
    (["--lr", "inf"], ["learning rate", "inf"]),
    (["--lr", "nan"], ["learning rate", "nan"]),
    (["--eval-period", "-1"], ["periods"]),
    (["--seed", "-1"], ["seed", "-1"]),
    (["--seed", str(2**70)], ["seed"]),
    (["--train-subset", "-1"], ["--train-subset"]),
    (["--workers", "-1"], ["--workers"]),
    (["--resume=yes"], ["--resume", "yes"]),
    (["--amp=1"], ["--amp"]),
    (["--output", ""], ["--output", "empty"]),
    (["--data", ""], ["--data"]),
    (["--weights"], ["--weights", "expected one argument"]),
    (["--init", "checkpoint", "--weights", "{tmp}/missing.pth"], ["no such file", "missing.pth"]),
    (["solver.base_lr=-1"], ["solver.base_lr", "-1"]),
    (["solver.base_lr=1e999"], ["solver.base_lr", "inf"]),
    (["solver.batch_size=2.5"], ["solver.batch_size", "int"]),
    (["solver.checkpoint_period=-1"], ["periods"]),
    (["model.backbone.depth=19"], ["depth", "19"]),
    (["input.min_size_train=(0,)"], ["min_sizes"]),
    (["=3"], ["unknown config key"]),
    (["model"], ["key=value", "model"]),
])
def test_train_py_invalid_flag_values(synthetic_root, tmp_path, capsys, args, words):
    """Invalid values of every flag (the others: tests/test_train.py::test_bad_input_is_one_line_and_exit_code_2)
    and overrides: exit 2, one line, before anything is written."""
    argv = tiny_argv(synthetic_root, tmp_path / "out", 1, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert train.main(argv) == 2
    line = one_line_error(capsys)
    assert all(w in line for w in words), line
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.fixture(scope="module")
def eval_setup(synthetic_root, tmp_path_factory):
    """(base argv of a model run on the synthetic val split, checkpoint path): a random tiny model's state dict."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = minimask.build_model(minimask.get_config("tiny", ["model.roi_heads.num_classes=6"]))
    torch.save({"model": model.state_dict()}, root / "model.pth")
    base = ["--config", "tiny", "--weights", str(root / "model.pth"), "--ann",
            str(synthetic_root / "annotations" / "instances_val.json"), "--images", str(synthetic_root / "val"),
            "input.min_size_test=64", "input.max_size_test=64", "model.rpn.post_nms_topk_test=20"]
    return base, root / "model.pth"


@pytest.mark.parametrize("args, words", [
    (["--tta", "--tta-scales", "x"], ["--tta-scales"]),
    (["--tta", "--tta-scales", "0,5"], ["--tta-scales", "positive"]),
    (["--tta", "--tta-max-size", "x"], ["--tta-max-size", "positive integer"]),
    (["--images", "{tmp}/nowhere"], ["image folder", "nowhere"]),
    (["--ann", "{syn}/train/000000.jpg"], ["000000.jpg", "not valid JSON"]),
    (["--split", "bogus"], ["instances_bogus.json"]),
    (["--data", "{tmp}/nowhere"], ["no such dataset folder"]),
    (["--results"], ["--results", "expected one argument"]),
    (["solver.base_lr=x"], ["solver.base_lr", "float"]),
    pytest.param(["--device", "cuda"], ["CUDA is not available"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
    (["--device", "bogus"], ["--device", "bogus"]),
    (["--tta", "--tta-max-size", "0"], ["--tta-max-size"]),
    (["--output", "{tmp}/file/out"], ["--output"]),
])
def test_evaluate_py_invalid_flag_values(eval_setup, synthetic_root, tmp_path, capsys, args, words):
    """Invalid values of the flags tests/test_evaluation.py::test_evaluate_py_bad_input_exits_2_with_one_line does
    not try: exit 2 and one line."""
    (tmp_path / "file").write_text("a regular file")
    base, _ = eval_setup
    args = [a.replace("{tmp}", str(tmp_path)).replace("{syn}", str(synthetic_root)) for a in args]
    if args[0] in ("--data", "--split"):  # --data replaces --ann / --images
        base = [a for i, a in enumerate(base) if a not in ("--ann", "--images") and base[i - 1] not in ("--ann",
                                                                                                     "--images")]
        args = (["--data", str(synthetic_root)] if args[0] == "--split" else []) + args
    elif args[0] in ("--ann", "--images"):
        i = base.index(args[0])
        base = base[:i] + base[i + 2:]
    assert evaluate.main(base + args) == 2
    line = one_line_error(capsys, "evaluate.py")
    assert all(w in line for w in words), line


# ---- process faults ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_with_checkpoints(synthetic_root, tmp_path_factory):
    """A finished 2-iteration run with a checkpoint after iteration 1: model_0000001.pth and model_final.pth."""
    out = tmp_path_factory.mktemp("ckpt") / "out"
    assert train.main(tiny_argv(synthetic_root, out, 2, "solver.checkpoint_period=1")) == 0
    return out


def test_truncated_newest_checkpoint_falls_back_and_continues_exactly(run_with_checkpoints, synthetic_root,
                                                                      tmp_path, capsys):
    """model_final.pth truncated (a crash outside save_checkpoint, a full disk): --resume warns naming it, resumes
    from model_0000001.pth, and ends with exactly the parameters of the uninterrupted run.
    (load_latest itself: tests/test_checkpoint.py::test_load_latest_falls_back_past_corrupt.)"""
    out = tmp_path / "out"
    shutil.copytree(run_with_checkpoints, out)
    final = out / "model_final.pth"
    final.write_bytes(final.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="model_final.pth"):
        assert train.main(tiny_argv(synthetic_root, out, 2, "solver.checkpoint_period=1", "--resume")) == 0
    assert f"resumed from {out / 'model_0000001.pth'} at iteration 1" in capsys.readouterr().out
    expected = load_checkpoint(run_with_checkpoints / "model_final.pth")["model"]
    got = load_checkpoint(final)["model"]
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("damage", ["truncated", "hostile"])
def test_resume_with_no_loadable_checkpoint_refuses_to_restart(run_with_checkpoints, synthetic_root, tmp_path,
                                                                capsys, damage):
    """The only checkpoint is truncated, or a pickle crafted to run a command when loaded: --resume refuses it
    (without running anything), says that nothing can be loaded, exits 2, and leaves the file alone."""
    out, marker = tmp_path / "out", tmp_path / "pwned"
    out.mkdir()
    path = out / "model_0000001.pth"
    if damage == "truncated":
        path.write_bytes((run_with_checkpoints / "model_0000001.pth").read_bytes()[:5000])
    else:
        torch.save({"model": {}, "iteration": 1, "x": _Exploit(marker)}, path)
    before = path.read_bytes()
    with pytest.warns(UserWarning, match="model_0000001.pth"):
        assert train.main(tiny_argv(synthetic_root, out, 2, "--resume")) == 2
    line = one_line_error(capsys)
    assert "none of the checkpoints" in line and str(out) in line
    assert path.read_bytes() == before and not marker.exists() and not (out / "metrics.jsonl").exists()


def test_hostile_weights_for_init_and_evaluate_are_refused_without_running(eval_setup, synthetic_root, tmp_path,
                                                                            capsys):
    """A checkpoint crafted to run a command: `train.py --init checkpoint --weights` and `evaluate.py --weights`
    refuse it (exit 2, one line naming it) and the command never runs. (load_checkpoint / read_weights on raw
    pickles: tests/test_checkpoint.py::test_malicious_pickle_is_refused, tests/test_weights.py.)"""
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save({"model": {"backbone.stem.conv1.weight": _Exploit(marker)}}, evil)
    assert train.main(tiny_argv(synthetic_root, tmp_path / "out", 1, "--init", "checkpoint", "--weights",
                                str(evil))) == 2
    assert str(evil) in one_line_error(capsys)
    base, good = eval_setup
    assert evaluate.main([str(evil) if a == str(good) else a for a in base]) == 2
    assert str(evil) in one_line_error(capsys, "evaluate.py")
    assert not marker.exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes to read-only folders; tests/test_train.py checks a path under a regular file")
def test_read_only_output_folder_is_refused_before_training(synthetic_root, tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert train.main(tiny_argv(synthetic_root, out, 1)) == 2
    finally:
        out.chmod(0o755)
    assert "--output: cannot write to" in one_line_error(capsys)


# ---- numeric faults ----------------------------------------------------------------------------------------------

def _inject_at_call(monkeypatch, call, inject):
    """Wrap MaskRCNN.forward: on the `call`-th training forward, `inject(model, losses)`."""
    from minimask.model.mask_rcnn import MaskRCNN

    original, calls = MaskRCNN.forward, []

    def forward(self, images, targets=None):
        out = original(self, images, targets)
        if self.training:
            calls.append(1)
            if len(calls) == call:
                inject(self, out)
        return out

    monkeypatch.setattr(MaskRCNN, "forward", forward)


POISONED = "roi_heads.box_predictor.cls_score.weight"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_gradient_stops_naming_iteration_and_parameter(synthetic_root, tmp_path, monkeypatch, capsys,
                                                                   value):
    """A NaN / Inf in one parameter's gradient at iteration 2 while every loss term is finite: exit 1, the message
    names the iteration and the parameter, no step is taken, and the checkpoint of iteration 1 stays intact.
    (A non-finite loss term: tests/test_train.py::test_non_finite_loss_stops_with_iteration_and_term.)"""
    def poison(model, losses):
        param = dict(model.named_parameters())[POISONED]
        handle = param.register_hook(lambda g: (handle.remove(), g * value)[1])

    _inject_at_call(monkeypatch, 2, poison)
    out = tmp_path / "out"
    assert train.main(tiny_argv(synthetic_root, out, 3, "solver.checkpoint_period=1")) == 1
    line = one_line_error(capsys)
    assert "non-finite gradient at iteration 2" in line and POISONED in line and "1 parameter(s)" in line
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000001.pth"]
    state = load_checkpoint(out / "model_0000001.pth")
    assert state["iteration"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values()
                                           if t.is_floating_point())


def test_infinite_loss_stops_naming_iteration_and_term(synthetic_root, tmp_path, monkeypatch, capsys):
    _inject_at_call(monkeypatch, 1, lambda model, losses: losses.update(loss_box_reg=losses["loss_box_reg"] + 1e39))
    assert train.main(tiny_argv(synthetic_root, tmp_path / "out", 2)) == 1
    line = one_line_error(capsys)
    assert "non-finite loss at iteration 1: loss_box_reg = inf" in line
    assert not list((tmp_path / "out").glob("*.pth"))


# ---- subprocesses: SIGKILL during a checkpoint write, dead ranks ------------------------------------------------

def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def _popen(cmd, **env):
    return subprocess.Popen(cmd, cwd=REPO, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _finish(proc, timeout):
    """(stdout, stderr) of `proc` within `timeout` s; on timeout its whole process group is killed and the test
    fails."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"still running after {timeout} s:\n{err[-3000:]}")
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def _processes_mentioning(token: str) -> list[int]:
    """Pids of live processes whose command line contains `token` (zombies excluded)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if token in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    status = (entry / "status").read_text()
                    if "\nState:\tZ" not in status:
                        pids.append(int(entry.name))
    return pids


# Runs train.main() after patching what the FAULT environment variable asks for: on the process whose RANK is
# FAULT_RANK (0 without torchrun), at its FAULT_AT-th training forward / checkpoint write.
_FAULT_ENTRY = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import torch
    import train
    import minimask.data.images as images
    from minimask.model.mask_rcnn import MaskRCNN

    fault, at = os.environ["FAULT"], int(os.environ["FAULT_AT"])
    mine = os.environ.get("RANK", "0") == os.environ.get("FAULT_RANK", "0")
    calls = []
    if mine and fault in ("raise", "kill"):
        original = MaskRCNN.forward
        def forward(self, *args, **kwargs):
            if self.training:
                calls.append(1)
                if len(calls) == at and fault == "raise":
                    raise RuntimeError("injected fault")
                if len(calls) == at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return original(self, *args, **kwargs)
        MaskRCNN.forward = forward
    if mine and fault == "data":
        original_load = images.load_image
        def load_image(path):
            calls.append(1)
            if len(calls) >= at:
                raise images.ImageLoadError(f"{{path}}: cannot decode image (injected)")
            return original_load(path)
        images.load_image = load_image
    if mine and fault == "kill_in_save":
        original_save = torch.save
        def save(obj, f, *args, **kwargs):
            calls.append(1)
            if len(calls) == at:  # half of the data on disk, then no handler can run
                f.write(b"PK\\x03\\x04" + b"\\x00" * 4096)
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return original_save(obj, f, *args, **kwargs)
        torch.save = save
    sys.exit(train.main(sys.argv[1:]))
""")


@pytest.fixture
def fault_entry(tmp_path):
    entry = tmp_path / "fault_entry.py"
    entry.write_text(_FAULT_ENTRY.format(repo=str(REPO)))
    return entry


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_keeps_previous_and_resume_uses_it(synthetic_root, tmp_path, fault_entry):
    """Checkpoints every 2 of 6 iterations; the process is SIGKILLed halfway through writing the second one
    (iteration 4). model_0000002.pth survives, only a hidden temporary file is left, no model_0000004.pth exists;
    --resume continues from iteration 2 and ends with exactly the parameters of an uninterrupted run.
    (save_checkpoint alone: tests/test_checkpoint.py::test_process_killed_mid_write.)"""
    a, b = tmp_path / "A", tmp_path / "B"
    argv = lambda out, *extra: [sys.executable, str(fault_entry), *tiny_argv(  # noqa: E731
        synthetic_root, out, 6, "solver.checkpoint_period=2", *extra)]
    proc = _popen(argv(b), FAULT="kill_in_save", FAULT_AT="2")
    _, err = _finish(proc, 120)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    names = sorted(p.name for p in b.iterdir())
    assert "model_0000004.pth" not in names and "model_0000002.pth" in names
    assert [n for n in names if n.endswith(".tmp")] and all(n.startswith(".model_0000004.pth.") for n in names
                                                            if n.endswith(".tmp"))
    assert load_checkpoint(b / "model_0000002.pth")["iteration"] == 2
    reference = _popen(argv(a), FAULT="none", FAULT_AT="0")
    resumed = _popen(argv(b, "--resume"), FAULT="none", FAULT_AT="0")
    (_, ref_err), (res_out, res_err) = _finish(reference, 180), _finish(resumed, 180)
    assert reference.returncode == 0, ref_err[-3000:]
    assert resumed.returncode == 0, res_err[-3000:]
    assert f"resumed from {b / 'model_0000002.pth'} at iteration 2" in res_out
    expected, got = (load_checkpoint(o / "model_final.pth")["model"] for o in (a, b))
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not [p for p in b.iterdir() if p.name.endswith(".tmp")]  # pruned by the next save


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["raise", "data", "kill"])
def test_a_failing_rank_ends_the_whole_job(synthetic_root, tmp_path, fault_entry, fault):
    """torchrun, 2 gloo processes, tiny preset, 5 iterations: at iteration 2 rank 1 raises a RuntimeError in the
    forward (raise), fails to load its image (data: an ImageLoadError), or is SIGKILLed (kill). The job must exit
    non-zero within 60 s, torchrun's failure summary must name rank 1 with the fault's exit code (1, 2 or -9),
    and no worker may be left running. The fault is reported by rank 1 itself (the exception, or train.py's one
    line naming rank 1 and the iteration); rank 0, whose collective loses its peer, says so in one line."""
    out = tmp_path / f"out_{fault}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "--max_restarts", "0", "--monitor_interval", "0.5", str(fault_entry),
           *tiny_argv(synthetic_root, out, 5, "--batch-size", "2")]
    start = time.monotonic()
    proc = _popen(cmd, FAULT=fault, FAULT_AT="2", FAULT_RANK="1")
    _, err = _finish(proc, 90)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0 and elapsed < 60, (proc.returncode, elapsed, err[-3000:])
    summary = err[err.index("Failures:"):]
    codes = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*exitcode\s*:\s*(-?\d+)", summary)
    assert ("1", {"raise": "1", "data": "2", "kill": "-9"}[fault]) in codes, summary
    # Rank 0 loses its peer inside a collective: one line and exit code 3, not a traceback from inside gloo.
    assert "train.py: error: rank 0: a collective operation failed" in err and "[rank0]: Traceback" not in err, err
    if fault == "raise":
        assert "[rank1]: RuntimeError: injected fault" in err, err[-3000:]
    elif fault == "data":
        line = "train.py: error: loading the data for iteration 2 on rank 1 failed: "
        assert line in err and "(injected)" in err, err[-3000:]
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(out)) == []
    assert not (out / "model_final.pth").exists()
