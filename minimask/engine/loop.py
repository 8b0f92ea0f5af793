"""The training loop that every training script runs (train.py, pretrain.py).

A script describes its run in a `TrainingLoop` - the model, the optimizer, a loss function, an endless iterator of
batches, the LR schedule, and what to do at checkpoints, evaluations and the end - and calls `run`. One iteration
is `train_step`: forward and loss, backward, the gradients' all-reduce, one host sync that checks that the loss and
the gradients are finite and whether a stop was requested, then the optimizer step (detectron2's `SimpleTrainer`).

Around the step, `run` keeps the behaviour the fault suite checks: a batch that cannot be loaded ends the run in one
line (exit 2); a non-finite loss or gradient stops it before the step, naming the terms or parameters (exit 1, the
last checkpoint kept); SIGTERM / SIGINT checkpoint after the current iteration and exit 0; evaluations do not change
the training run's random stream. `resume` finds where a run continues, refusing to start over damaged checkpoints
and checking that every process continues from the same iteration.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from minimask.distributed import (DistInfo, GradientAllReduce, all_reduce_sum, barrier, broadcast_parameters,
                                  reduce_dict_mean)
from minimask.engine.checkpoint import checkpoint_name, list_checkpoints, load_latest, rng_state, set_rng_state
from minimask.engine.run_log import append_metrics, max_memory_mb, read_metrics, write_metrics
from minimask.engine.solver import clip_grad_norm, grad_norm

EXIT_DIVERGED = 1
EXIT_USAGE = 2


@dataclass
class StepResult:
    terms: dict[str, Tensor]  # what the loss function returned
    bad_loss: bool  # on any process
    bad_grad: bool
    stop: bool  # a stop was requested on some process


def train_step(model: nn.Module, batch, loss_fn: Callable, optimizer: torch.optim.Optimizer, *, params: list[Tensor],
               all_reduce=None, scaler=None, autocast=contextlib.nullcontext, max_grad_norm: float = 0.0,
               stop: StopRequest | None = None) -> StepResult:
    """One iteration: forward and loss, backward, gradient all-reduce, checks, optimizer step.

    loss_fn(model, batch) returns a dict of scalar tensors: the training loss is the sum of the entries whose name
    starts with "loss"; any others (an accuracy, say) are only logged. When the loss or the gradients are not finite
    on any process, no step is taken. `stop` (a StopRequest) is read after the backward, so a signal received
    during this iteration stops the run after it. Every process must call train_step as many times (collectives).
    """
    with autocast():
        terms = loss_fn(model, batch)
    loss = sum(value for name, value in terms.items() if name.startswith("loss"))
    optimizer.zero_grad(set_to_none=all_reduce is None)  # in place keeps the all-reduce's bucket views
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if all_reduce is not None:
        all_reduce.finish()  # waits for the bucketed all-reduces and averages over processes
    if scaler is not None:
        scaler.unscale_(optimizer)
    # One sync per iteration (detectron2 checks every iteration too), before the step: a non-finite loss, a
    # non-finite gradient (a NaN / Inf anywhere makes the global norm non-finite; fp16 GradScaler skips such steps
    # itself) and a stop request. Every process must take the same decision, or the others would wait forever in
    # the next all-reduce: the flags are summed over processes.
    norm = grad_norm(params) if scaler is None else loss.new_zeros(())  # () also used for clipping
    flags = torch.stack([~torch.isfinite(loss.detach()), ~torch.isfinite(norm).to(loss.device),
                         torch.tensor(bool(stop and stop.signal_name), device=loss.device)]).float()
    bad_loss, bad_grad, stop = (bool(f) for f in all_reduce_sum(flags).tolist())
    if bad_loss or bad_grad:
        return StepResult(terms, bad_loss, bad_grad, stop)
    if max_grad_norm > 0:
        clip_grad_norm(params, max_grad_norm, total=norm if scaler is None else None)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return StepResult(terms, False, False, stop)


@dataclass
class TrainingLoop:
    """A run as `run` needs it. The callbacks are collectives where they say so: every process calls them."""
    program: str  # names the script in error lines ("train.py")
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable  # (model, batch) -> dict of scalar tensors, see train_step
    batches: Callable[[int], Iterator]  # iteration to start at -> endless batches (OSError / ValueError: bad data)
    lr_at: Callable[[int], float]  # iteration -> learning rate
    max_iter: int
    output: Path
    dist_info: DistInfo
    checkpoint: Callable[[str, int], None]  # (file name, iteration): save one (a collective)
    finish: Callable[[int], None]  # after the last iteration: final checkpoint, evaluation, ...
    log: MetricsLog  # metrics.jsonl; the script makes it, and logs its evaluations there too
    resume: bool = False  # continue from the newest checkpoint in `output`
    restore: Callable[[dict], None] | None = None  # puts a checkpoint's model and optimizer back (for resume)
    evaluate: Callable[[int], None] | None = None  # at every eval_period (not the last iteration, see finish)
    eval_period: int = 0
    checkpoint_period: int = 0
    log_period: int = 20
    max_grad_norm: float = 0.0
    scaler: object = None  # torch.amp.GradScaler for fp16
    autocast: Callable = contextlib.nullcontext


def run(loop: TrainingLoop) -> int:
    """Resume where the run in loop.output stopped (with loop.resume), then train to loop.max_iter; returns the
    exit code (0, EXIT_DIVERGED or EXIT_USAGE). Every process of the job calls it."""
    world_size, rank = loop.dist_info.world_size, loop.dist_info.rank
    saved, iteration = None, 0
    if loop.resume:
        try:
            saved, iteration = resume(loop.output, loop.restore, world_size=world_size, device=loop.dist_info.device)
        except ResumeError as e:
            print(f"{loop.program}: error: {e}", file=sys.stderr)
            teardown(world_size)
            return EXIT_USAGE
    if iteration >= loop.max_iter:
        print(f"nothing to do: the run in {loop.output} already finished {iteration} iterations")
        teardown(world_size)
        return 0
    all_reduce = None
    if world_size > 1:
        broadcast_parameters(loop.model)
        all_reduce = GradientAllReduce([p for p in loop.model.parameters() if p.requires_grad])
    batches = loop.batches(iteration)
    if saved is not None:  # after making the batches, whose loader draws its base seed from the RNG
        set_rng_state(saved["rng"][rank % len(saved["rng"])])  # this process's own stream (`gather_rng_states`)
    loop.log.start(iteration)
    return iterate(loop, iteration, batches, all_reduce)


def iterate(loop: TrainingLoop, iteration: int, batches: Iterator, all_reduce=None) -> int:
    """The loop itself, from `iteration` to loop.max_iter (see the module docstring); returns the exit code."""
    params = [p for p in loop.model.parameters() if p.requires_grad]
    log, world_size = loop.log, loop.dist_info.world_size
    bar = progress_bar(iteration, loop.max_iter, enabled=log.enabled)
    loop.model.train()
    with StopRequest() as stop:
        while iteration < loop.max_iter:
            try:
                batch, data_sec = _timed_next(batches)
            except (OSError, ValueError) as e:  # a missing or corrupt image, a size that disagrees with the JSON
                # No teardown: the other processes wait in a collective; this one exiting ends their wait.
                bar.close()  # first: the message on a line of its own
                where = f" on rank {loop.dist_info.rank}" if world_size > 1 else ""
                print(f"{loop.program}: error: loading the data for iteration {iteration + 1}{where} failed: "
                      f"{last_line(e)}", file=sys.stderr)
                return EXIT_USAGE
            for group in loop.optimizer.param_groups:
                group["lr"] = loop.lr_at(iteration)
            step = train_step(loop.model, batch, loop.loss_fn, loop.optimizer, params=params, all_reduce=all_reduce,
                              scaler=loop.scaler, autocast=loop.autocast, max_grad_norm=loop.max_grad_norm, stop=stop)
            if step.bad_loss or step.bad_grad:
                bar.close()
                print(f"{loop.program}: error: {describe_divergence(loop.model, step.terms, step.bad_loss, iteration + 1)}"
                      f"; stopping (the last checkpoint in {loop.output} is kept)", file=sys.stderr)
                teardown(world_size)
                return EXIT_DIVERGED
            iteration += 1
            bar.update(1)
            log.add(step.terms, data_sec)
            last = iteration == loop.max_iter
            if iteration % loop.log_period == 0 or last:
                record = log.write_window(iteration, lr=loop.optimizer.param_groups[0]["lr"])
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2g}")
            if step.stop and not last:
                loop.checkpoint(checkpoint_name(iteration), iteration)
                bar.close()
                print(f"received {stop.signal_name or 'a stop request'}: saved a checkpoint at iteration {iteration} "
                      f"in {loop.output}; rerun with --resume to continue")
                teardown(world_size)
                return 0
            if not last and loop.checkpoint_period and iteration % loop.checkpoint_period == 0:
                loop.checkpoint(checkpoint_name(iteration), iteration)
            if not last and loop.evaluate and loop.eval_period and iteration % loop.eval_period == 0:
                with same_random_stream():  # evaluating must not change the training run
                    loop.evaluate(iteration)
                log.restart_clock()  # keep evaluation out of sec_per_iter
    bar.close()
    with same_random_stream():
        loop.finish(iteration)
    teardown(world_size)
    return 0


class ResumeError(Exception):
    """--resume cannot continue: the message says why (the scripts exit with code 2)."""


def resume(output: Path, restore: Callable[[dict], None], *, world_size: int, device) -> tuple[dict | None, int]:
    """(saved state, iteration) to continue a run in `output` from its newest loadable checkpoint ((None, 0) when
    there is none). `restore(saved)` puts the saved model and optimizer back. Raises ResumeError when checkpoints
    exist but none can be loaded (never silently start over them), or when the processes found different ones."""
    saved, path = load_latest(output)  # newest loadable; warns about each unreadable one it skips
    unreadable = int(saved is None and bool(list_checkpoints(output)))
    iteration = 0
    if saved is not None:
        restore(saved)
        iteration = int(saved["iteration"])
        print(f"resumed from {path} at iteration {iteration}")
    elif not unreadable:
        print(f"--resume: no checkpoint in {output}; starting from scratch")
    if world_size > 1:
        # Every process must resume from the same iteration, or they would wait on each other forever. Each one
        # reads `output` itself, so it must be on a filesystem that every node sees.
        bounds = torch.tensor([-iteration, iteration, unreadable], device=device)
        torch.distributed.all_reduce(bounds, op=torch.distributed.ReduceOp.MAX)  # (-min, max, any) over processes
        if -bounds[0].item() != bounds[1].item():
            raise ResumeError(f"the processes found different checkpoints to resume from in {output} (it must be on "
                              f"a filesystem that every node shares)")
        unreadable = int(bounds[2].item())
    if unreadable:
        raise ResumeError(f"--resume: none of the checkpoints in {output} can be loaded (damaged, or refused as "
                          f"possibly unsafe: see the warnings above); move them away to start afresh")
    return saved, iteration


def gather_rng_states(world_size: int) -> list[dict]:
    """Every process's random state, in rank order, so that each one resumes its own stream (a collective; `run`
    restores the one of its rank)."""
    if world_size == 1:
        return [rng_state()]
    states = [None] * world_size
    torch.distributed.all_gather_object(states, rng_state())
    return states


@contextlib.contextmanager
def same_random_stream():
    """Run the body without changing this process's random stream (the RNG state is put back afterwards)."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def teardown(world_size: int) -> None:
    """Wait for every process (rank 0 may still be writing) and leave the process group."""
    if world_size > 1:
        barrier()
        torch.distributed.destroy_process_group()


def _timed_next(batches: Iterator) -> tuple[object, float]:
    start = time.perf_counter()
    batch = next(batches)
    return batch, time.perf_counter() - start


class MetricsLog:
    """metrics.jsonl of a run, continued on resume, and the window means of the logged terms.

    Terms are summed on the device between log lines (no host sync); `write_window` reduces them over processes (a
    collective) and, on the main process, appends one "train" record: the window means, "loss" (their sum over the
    "loss" terms), "lr", "sec_per_iter", "data_sec" and "max_mem_mb".
    """

    def __init__(self, path: Path, *, enabled: bool):
        self.path, self.enabled, self.history = path, enabled, []
        self._new_window()

    def start(self, iteration: int) -> None:
        """Continue the run's file at `iteration`: lines a crashed run logged after its last checkpoint go."""
        if self.enabled:
            self.history = read_metrics(self.path, before=iteration)
            write_metrics(self.path, self.history)

    def _new_window(self) -> None:
        self.sums, self.iters, self.data_sec, self.clock = {}, 0, 0.0, time.perf_counter()

    def add(self, terms: dict[str, Tensor], data_sec: float) -> None:
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()
        self.iters += 1
        self.data_sec += data_sec

    def write_window(self, iteration: int, *, lr: float) -> dict:
        means = {k: float(v) for k, v in reduce_dict_mean({k: v / self.iters for k, v in self.sums.items()}).items()}
        device = next(iter(self.sums.values())).device if self.sums else torch.device("cpu")
        record = {"iter": iteration, "kind": "train", "loss": sum(v for k, v in means.items() if k.startswith("loss")),
                  **means, "lr": lr, "sec_per_iter": (time.perf_counter() - self.clock) / self.iters,
                  "data_sec": self.data_sec / self.iters, "max_mem_mb": max_memory_mb(device)}
        self.append(record)
        self._new_window()
        return record

    def append(self, record: dict) -> None:
        if self.enabled:
            append_metrics(self.path, record, self.history)

    def restart_clock(self) -> None:
        self.clock = time.perf_counter()


def progress_bar(initial: int, total: int, *, enabled: bool):
    from tqdm import tqdm

    return tqdm(initial=initial, total=total, disable=not enabled, dynamic_ncols=True, desc="train",
                file=sys.stderr, mininterval=2.0)


# ---- the pieces around the step: preemption, mixed precision, device moves, the wording of fatal errors ----------

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
