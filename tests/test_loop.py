"""The shared training loop (minimask.engine.loop) on a toy objective: any loss function runs in it unchanged."""
import json
import math

import pytest
import torch
from torch import nn

from minimask.distributed import DistInfo
from minimask.engine import loop

ONE_PROCESS = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def toy():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def regression_loss(model, batch):
    x, y = batch
    error = model(x).squeeze(1) - y
    return {"loss_l2": (error ** 2).mean(), "abs_error": error.abs().mean().detach()}  # the second is only logged


def batches(seed=1):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(4, 3, generator=g)
        yield x, x.sum(1)


def test_train_step_is_one_sgd_step_on_the_loss_terms_only():
    model, optimizer = toy()
    x, y = next(batches())
    expected = [p.detach().clone() for p in model.parameters()]
    grads = torch.autograd.grad(((model(x).squeeze(1) - y) ** 2).mean(), list(model.parameters()))
    expected = [p - 0.1 * g for p, g in zip(expected, grads)]
    step = loop.train_step(model, (x, y), regression_loss, optimizer, params=list(model.parameters()))
    assert not (step.bad_loss or step.bad_grad or step.stop) and set(step.terms) == {"loss_l2", "abs_error"}
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)


def test_train_step_takes_no_step_on_a_non_finite_loss_and_reads_the_stop_request():
    model, optimizer = toy()
    before = [p.detach().clone() for p in model.parameters()]
    step = loop.train_step(model, None, lambda m, b: {"loss_bad": m.weight.sum() * math.inf}, optimizer,
                           params=list(model.parameters()))
    assert step.bad_loss and all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    stop = loop.StopRequest()
    stop.signal_name = "SIGTERM"
    assert loop.train_step(model, next(batches()), regression_loss, optimizer, params=list(model.parameters()),
                           stop=stop).stop


def run_toy(tmp_path, *, evaluate_draws=False, max_iter=6):
    model, optimizer = toy()
    tmp_path.mkdir(exist_ok=True)
    events = []

    def evaluate(iteration):
        events.append(("eval", iteration))
        if evaluate_draws:
            torch.rand(100)  # evaluation that draws random numbers must not change training

    def noisy_loss(model, batch):  # draws from the RNG, so the run depends on the random stream
        terms = regression_loss(model, batch)
        terms["loss_l2"] = terms["loss_l2"] * (1 + 0.1 * torch.rand(()))
        return terms

    log = loop.MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    code = loop.run(loop.TrainingLoop(
        program="toy.py", model=model, optimizer=optimizer, loss_fn=noisy_loss, batches=lambda start: batches(),
        lr_at=lambda i: 0.1 * (i + 1) / max_iter, max_iter=max_iter, output=tmp_path, dist_info=ONE_PROCESS,
        checkpoint=lambda name, i: events.append((name, i)), finish=lambda i: events.append(("finish", i)), log=log,
        evaluate=evaluate, eval_period=2, checkpoint_period=3, log_period=2))
    return code, model, events


def test_run_calls_checkpoints_evaluations_and_finish_and_logs_windows(tmp_path):
    code, _, events = run_toy(tmp_path)
    assert code == 0
    assert events == [("eval", 2), ("model_0000003.pth", 3), ("eval", 4), ("finish", 6)]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [2, 4, 6]
    assert all(r["loss"] == r["loss_l2"] and "abs_error" in r and r["lr"] > 0 for r in records)


def test_evaluations_leave_the_training_run_unchanged(tmp_path):
    _, quiet, _ = run_toy(tmp_path / "a")
    _, drawing, _ = run_toy(tmp_path / "b", evaluate_draws=True)
    for p, q in zip(quiet.parameters(), drawing.parameters()):
        assert torch.equal(p, q)


def test_run_stops_on_unreadable_data_with_one_line(tmp_path, capsys):
    model, optimizer = toy()

    def broken():
        yield next(batches())
        raise OSError("x.jpg: cannot decode image")

    log = loop.MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    code = loop.run(loop.TrainingLoop(
        program="toy.py", model=model, optimizer=optimizer, loss_fn=regression_loss, batches=lambda start: broken(),
        lr_at=lambda i: 0.1, max_iter=5, output=tmp_path, dist_info=ONE_PROCESS, checkpoint=lambda name, i: None,
        finish=lambda i: pytest.fail("a failed run does not finish"), log=log))
    assert code == loop.EXIT_USAGE
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar's lines
    assert last == "toy.py: error: loading the data for iteration 2 failed: x.jpg: cannot decode image"
