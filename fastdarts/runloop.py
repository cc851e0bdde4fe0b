"""The epoch loop shared by every long run (search, train): checkpoints, exact resume, signals,
divergence and logging, so each entry point only says what one step and one epoch's end do.

A run directory holds `config.json`, `metrics.jsonl` (one row per finished epoch) and
`checkpoint.pt`: every stateful object, every random stream and the run's position (epoch, the
next step, the epoch's batch order and running sums, the logged rows). Resuming from it continues
the run bit for bit as if it had never stopped (on the CPU).

Over several processes (fastdarts.distributed) every process runs the loop; process 0 alone writes and
prints, the epoch's sums are added up over the processes, and a signal to any of them stops them all after
the same step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import distributed, ops
from .bilevel import NonFiniteError, NonFiniteWeights
from .checkpoint import (
    RunInterrupted,
    StopSignals,
    atomic_write_text,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import parse_command_line
from .data import BatchJob, Images, fit_last_batch, to_device
from .distributed import SINGLE, World, mark_shared
from .errors import ConfigError, FastDartsError, TrainingDiverged, path_stat, summary
from .memory import keep_freed_memory, objects_so_far_frozen

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
# Settings a resumed run may change: they do not alter what the run computes (on another device, the same
# computation rounds differently: a run resumed there is no longer bit for bit the uninterrupted one).
RESUME_OVERRIDES = ("progress", "stop_after", "device")
# The signals that stop a run after its current step (checkpoint.StopSignals).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Task(Protocol):
    """What a run does; the loop calls these in order and handles everything else."""

    def batches(self, generator: torch.Generator) -> Sequence[torch.Tensor]:
        """One epoch's training batches (index tensors), drawn from the run's generator."""

    def begin_epoch(self, epoch: int) -> dict:
        """Set per-epoch state (learning rate, drop path, temperature); returns fields for the epoch's row.
        Called again for an epoch resumed midway, so it must depend on the epoch and the loaded state only."""

    def inputs(self, epoch: int, batches: Sequence[torch.Tensor], start: int) -> Iterator:
        """What `step` takes for each of `batches[start:]`, in order (the images, read and augmented,
        ahead of the steps for data read from disk): a generator, closed when the epoch ends or stops.
        Its randomness must depend on the run's seed, the epoch and the step alone (data.step_seed),
        so that a run resumed midway sees the same inputs."""

    def step(self, inputs) -> tuple[torch.Tensor, int]:
        """One training step on one of `inputs`'s items; returns the loss and the number of correct
        predictions. Raises NonFiniteError, before any parameter changes, when a loss or gradient is not finite."""

    def end_epoch(self, epoch: int) -> dict:
        """After the epoch's last step (schedulers, evaluation); returns fields for the epoch's row."""

    def announce(self, row: dict) -> str:
        """The console lines for one finished epoch."""


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Images, indices: torch.Tensor, batch_size: int,
             world: World = SINGLE) -> tuple[float, float]:  # fmt: skip
    """Loss and accuracy on `indices` without augmentation, in eval mode (running BN statistics), on the model's
    device.
    A model that returns `(logits, auxiliary logits)` is scored on its logits. Over several processes each
    scores its part of every batch, and the sums are added up."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    loss_sum, correct = 0.0, 0
    batches = indices.split(batch_size)
    if not world.alone:
        batches = fit_last_batch(list(batches), world.size)
    with contextlib.closing(data.iterate(BatchJob(b, part=world.part) for b in batches)) as batches:
        for batch in batches:
            x, y = to_device(batch, device)
            logits = model(x)
            if isinstance(logits, tuple):
                logits = logits[0]
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
    model.train(was_training)
    loss_sum, correct = world.sum([loss_sum, correct])
    return loss_sum / len(indices), correct / len(indices)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def kernels_in_use(device: str = "cpu") -> str:
    """ops.describe_kernels(device), with a FASTDARTS_CPU_ISA that cannot run here as a ConfigError."""
    try:
        return ops.describe_kernels(device)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def start_config(cls, kind: str, config=None, resume: str | Path | None = None, **overrides):
    """The resolved config of a new run, or of the run saved in `resume` (with its checkpoint).

    Returns `(config, checkpoint)`; `checkpoint` is None for a new run. A resumed run keeps its own
    settings: only RESUME_OVERRIDES may be given. The kernels are checked first, before anything is written.
    """
    kernels_in_use()
    if resume is None:
        return dataclasses.replace(config or cls(), **overrides).resolved(), None
    run_dir = Path(resume)
    found = path_stat(run_dir, "resume:", ConfigError)
    if found is None or not stat.S_ISDIR(found.st_mode):
        raise ConfigError(f"resume: {run_dir} is not a run directory")
    checkpoint = load_checkpoint(run_dir / CHECKPOINT)
    if checkpoint.get("kind") != kind:
        raise ConfigError(f"resume: {run_dir} holds a {checkpoint.get('kind')} run, not a {kind} run")
    changed = sorted(set(overrides) - set(RESUME_OVERRIDES))
    if config is not None or changed:
        raise ConfigError(
            f"resume continues a run with its own settings; only {', '.join(RESUME_OVERRIDES)} may be given"
            + (f" (got {', '.join(changed)})" if changed else "")
        )
    if checkpoint["complete"]:
        raise ConfigError(f"resume: the run in {run_dir} is already complete")
    saved = {**checkpoint["config"], "stop_after": None}
    unknown = sorted(map(str, saved.keys() - {f.name for f in dataclasses.fields(cls)}))
    if unknown:  # written by another version of fastdarts
        raise ConfigError(f"resume: the checkpoint in {run_dir} has settings this version lacks: {', '.join(unknown)}")
    return dataclasses.replace(cls(**saved), **overrides).resolved(), checkpoint


def make_run_dir(out: str | None, kind: str) -> Path:
    """The run directory: `out` if given (it must not hold a run already), else a new folder under runs/."""
    if out is not None:
        path = Path(out)
        found = path_stat(path, "out", ConfigError)
        if found is not None and not stat.S_ISDIR(found.st_mode):
            raise ConfigError(f"out {path} exists and is not a directory")
        if (path / METRICS).exists() or (path / CHECKPOINT).exists():
            raise ConfigError(f"out {path} already holds a run; choose another --out, or --resume it")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
            reason = getattr(e, "strerror", None) or e
            raise ConfigError(f"out {path}: cannot create the run directory ({reason})") from None
        return path
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        path = Path("runs") / (f"{kind}-{stamp}" + (f"-{n}" if n else ""))
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise ConfigError("could not create a new run directory under runs/")


def check_network_fits(build: Callable[[], torch.nn.Module], config, *sizes: str) -> None:
    """A ConfigError when the network `build()` makes could not train in this machine's memory: its weights, their
    gradients and SGD's momentum alone would fill it. Built on the meta device, which allocates nothing and draws
    no random numbers, so too large a width is refused in one line instead of by the kernel's out-of-memory kill.
    `sizes` names the fields of `config` that size the network ("init_channels", "layers"), for the message."""
    settings = " and ".join(f"{name} {getattr(config, name)}" for name in sizes)
    with torch.device("meta"):
        try:
            network = build()
        except (RuntimeError, TypeError) as e:  # a weight whose byte count (RuntimeError) or size (TypeError) does
            if "overflow" not in str(e).lower():  # not fit in 64 bits
                raise
            reason = str(e).strip().splitlines()[0]  # torch's TypeError goes on with a C++ stack trace
            raise ConfigError(f"{settings} make a weight too large to allocate on any machine ({reason})") from None
    tensors = [*network.parameters(), *network.buffers()]
    needed = 3 * sum(t.numel() * t.element_size() for t in tensors)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > memory:
        weights = sum(p.numel() for p in network.parameters())
        raise ConfigError(
            f"{settings} make a network of {weights:,} weights, "
            f"which with their gradients and momentum need {needed / 2**30:,.1f} GiB; this machine has "
            f"{memory / 2**30:.1f} GiB"
        )


def checkpoint_misfit(run_dir: Path, error: Exception) -> FastDartsError:
    """The one-line error of a checkpoint in `run_dir` whose state does not load (`error`): another network's, or
    another version's."""
    return mark_shared(FastDartsError(f"{Path(run_dir) / CHECKPOINT} does not fit this run ({summary(error)})"))


class Run:
    """A run directory and the state that continues it.

    `stateful` maps names to objects with `state_dict()`/`load_state_dict()` (model, optimizers,
    schedulers, a method's gate state); `generator` is the run's own random stream (data order,
    augmentation). With `checkpoint`, everything is restored from it and `run_dir` must be its
    directory; rows logged after it are dropped from metrics.jsonl, since that work is redone.
    """

    def __init__(self, kind: str, config, run_dir: Path, stateful: dict[str, Any], generator: torch.Generator,
                 checkpoint: dict | None = None, world: World = SINGLE):  # fmt: skip
        self.kind = kind
        self.config = config
        self.dir = Path(run_dir)
        self.stateful = stateful
        self.generator = generator
        self.world = world
        # Where the run stands: the epoch, the next step in it, its batches, its running sums, the rows.
        self.position: dict[str, Any] = {"epoch": 0, "step": 0, "batches": None, "sums": None, "history": []}
        if checkpoint is None:
            if world.writes:
                atomic_write_text(self.dir / "config.json", json.dumps(dataclasses.asdict(config), indent=2) + "\n")
            return
        try:
            for name, obj in stateful.items():
                obj.load_state_dict(checkpoint[name])
            self.position = checkpoint["position"]
            set_rng_state(checkpoint["rng"], generator)
            metrics = "".join(json.dumps(r) + "\n" for r in self.history)
        except Exception as e:  # the checkpoint of another network or version: name it, in one line
            raise checkpoint_misfit(self.dir, e) from None
        if world.writes:
            atomic_write_text(self.dir / METRICS, metrics)

    @property
    def history(self) -> list[dict]:
        return self.position["history"]

    def save(self, complete: bool = False, **extra) -> None:
        """Write the checkpoint: process 0 does, the others (which hold the same state) wait until it is on disk,
        so that none of them ends the job, and torchrun process 0 with it, before it is."""
        if self.world.writes:
            state = {name: obj.state_dict() for name, obj in self.stateful.items()}
            state.update(kind=self.kind, config=dataclasses.asdict(self.config), position=self.position,
                         rng=rng_state(self.generator), complete=complete, **extra)  # fmt: skip
            save_checkpoint(self.dir / CHECKPOINT, state)
        self.world.barrier()

    def say(self, text: str) -> None:
        """A line on the console (from process 0), above the progress bar."""
        if self.world.writes:
            tqdm.write(text)

    def _end_step(self, sums: dict, loss_sum: float, correct: int, seen: int, signum: int | None) -> int | None:
        """Add a step's loss, correct predictions and images to the epoch's sums; returns the signal that stops
        the run after this step, if any. Over several processes one all-reduce shares all of it, and averages
        batch norm's running statistics: every process then holds the same sums, statistics and decision, as
        a run resumed from a checkpoint written now would."""
        if not self.world.alone:
            stops = [float(signum == s) for s in STOP_SIGNALS]
            loss_sum, correct, seen, *stops = self.world.share_step(self.stateful["model"],
                                                                    [loss_sum, correct, seen, *stops])  # fmt: skip
            signum = next((s for s, count in zip(STOP_SIGNALS, stops) if count), None)
        sums["loss"] += loss_sum
        sums["correct"] += int(correct)
        sums["seen"] += int(seen)
        return signum

    def resume_hint(self) -> str:
        if self.world.alone:
            return f"resume with: python -m fastdarts.{self.kind} --resume {self.dir}"
        return (f"resume with: torchrun --nproc_per_node=N -m fastdarts.{self.kind} --resume {self.dir} "
                f"(any number of processes; {self.world.size} here)")  # fmt: skip

    def loop(self, task: Task) -> list[dict]:
        """Run the remaining epochs of `task`; returns the rows of every epoch.

        A checkpoint is written every `save_every` epochs and when the run stops early: on SIGINT
        or SIGTERM (after the current step; RunInterrupted), on a non-finite loss or gradient with
        `on_nan == "stop"` (TrainingDiverged; the last checkpoint is the last good one and is left
        alone), and after `stop_after` epochs (a normal return; `stopped_early` is then True).
        """
        config, position, world = self.config, self.position, self.world
        device = next(self.stateful["model"].parameters()).device  # where the run placed its model
        self.say(f"{self.kind} in {self.dir} on {device}; {kernels_in_use(device.type)}; "
                 f"{world.describe_batch(config.batch_size)}")  # fmt: skip
        bar = None  # sized when the first epoch's batches are known
        self.stopped_early = False
        # The bar is closed before any exception's message is printed, so that message stays last.
        with StopSignals() as stop, contextlib.ExitStack() as closing, objects_so_far_frozen():
            while position["epoch"] < config.epochs:
                if config.stop_after is not None and position["epoch"] >= config.stop_after:
                    self.save()
                    self.stopped_early = True
                    self.say(f"stopped after epoch {position['epoch'] - 1} as asked; {self.resume_hint()}")
                    break
                epoch = position["epoch"]
                if position["batches"] is None:
                    sums = {"loss": 0.0, "correct": 0, "seen": 0, "skipped": 0, "seconds": 0.0, "data_seconds": 0.0}
                    position.update(step=0, batches=list(task.batches(self.generator)), sums=sums)
                elif position["step"] < len(position["batches"]) - 1:
                    # Resumed by another number of processes: its last batch must give each of them two images.
                    position["batches"] = fit_last_batch(position["batches"], world.size)
                batches, sums = position["batches"], position["sums"]
                if len(batches[-1]) < world.size and position["step"] < len(batches):
                    raise mark_shared(
                        ConfigError(
                            f"resume: the epoch's last batch ({len(batches[-1])} images) is too small for "
                            f"{world.size} processes; resume it with at most {len(batches[-1])}"
                        )
                    )
                sums.setdefault("data_seconds", 0.0)  # a checkpoint written before steps timed their wait for data
                if bar is None:
                    bar = tqdm(total=config.epochs * len(batches), initial=epoch * len(batches) + position["step"],
                               disable=not (config.progress and world.writes), unit="step",
                               dynamic_ncols=True)  # fmt: skip
                    closing.callback(bar.close)
                row = {"epoch": epoch, **task.begin_epoch(epoch)}
                started = time.perf_counter()
                inputs = closing.enter_context(contextlib.closing(task.inputs(epoch, batches, position["step"])))
                while position["step"] < len(batches):
                    step = position["step"]
                    asked = time.perf_counter()
                    step_inputs = next(inputs)
                    sums["data_seconds"] += time.perf_counter() - asked
                    done = self._step(task, step_inputs, world.part_size(len(batches[step])), sums, epoch, step)
                    signum = self._end_step(sums, *done, stop.signum)
                    position["step"] = step + 1
                    seen = max(sums["seen"], 1)
                    bar.set_postfix(epoch=epoch, loss=f"{sums['loss'] / seen:.3f}",
                                    acc=f"{sums['correct'] / seen:.3f}", refresh=False)  # fmt: skip
                    bar.update()
                    if signum is not None:
                        sums["seconds"] += time.perf_counter() - started
                        self.save()
                        raise mark_shared(
                            RunInterrupted(
                                f"stopped by {signal.Signals(signum).name} at epoch {epoch} step {step + 1} "
                                f"(checkpoint written); {self.resume_hint()}",
                                128 + signum,
                            )
                        )
                seen = sums["seen"] or float("nan")  # every step skipped: nothing to average
                row.update(train_loss=sums["loss"] / seen, train_acc=sums["correct"] / seen,
                           skipped_steps=sums["skipped"])  # fmt: skip
                inputs.close()
                row.update(task.end_epoch(epoch))
                row["seconds"] = round(sums["seconds"] + time.perf_counter() - started, 3)
                row["data_seconds"] = round(sums["data_seconds"], 3)
                self.history.append(row)
                position.update(epoch=epoch + 1, step=0, batches=None, sums=None)
                if position["epoch"] % config.save_every == 0 and position["epoch"] < config.epochs:
                    self.save()
                if world.writes:
                    with open(self.dir / METRICS, "a") as f:
                        f.write(json.dumps(row) + "\n")
                self.say(task.announce(row))
        return self.history

    def _step(self, task: Task, inputs, n: int, sums: dict, epoch: int, step: int) -> tuple[float, int, int]:
        """One step of `task` on `n` images; returns its loss summed over them, its correct predictions and `n`
        (zeros for a skipped step)."""
        # A skipped step's forward has already folded its batch into the BN running statistics.
        buffers = None
        if self.config.on_nan == "skip":
            buffers = [b.clone() for b in self.stateful["model"].buffers()]
        try:
            loss, correct = task.step(inputs)
        except NonFiniteError as e:
            if self.config.on_nan == "stop" or isinstance(e, NonFiniteWeights):
                kept = (
                    f"the last checkpoint ({self.dir / CHECKPOINT}) is intact"
                    if (self.dir / CHECKPOINT).exists()
                    else "no checkpoint had been written yet"
                )
                raise mark_shared(TrainingDiverged(f"{e} at epoch {epoch} step {step}; stopped, {kept}")) from None
            sums["skipped"] += 1
            with torch.no_grad():
                for b, saved in zip(self.stateful["model"].buffers(), buffers):
                    b.copy_(saved)
            return 0.0, 0, 0
        return loss.item() * n, correct, n


def run_seeds(run_one, config, seeds: Sequence[int], keys: Sequence[str]) -> dict[str, dict]:
    """One new run per seed (in `<out>/seed-<s>` when `out` is set), then the mean and the sample
    standard deviation of each of `keys` in the final metrics, printed and returned (and written to
    `<out>/seeds.json`). `run_one(config)` runs one seed and returns its final metrics."""
    if config.stop_after is not None:
        raise ConfigError("--seeds runs each seed to the end; it does not go with stop_after")
    finals = []
    for seed in seeds:
        out = str(Path(config.out) / f"seed-{seed}") if config.out is not None else None
        finals.append(run_one(dataclasses.replace(config, seed=seed, out=out)))
    summary = {}
    if not distributed.world().writes:  # every process ran every seed; process 0 reports them
        return summary
    for key in keys:
        values = np.array([float(final[key]) for final in finals])
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        summary[key] = {"mean": float(values.mean()), "std": std, "values": values.tolist()}
    print(f"over {len(seeds)} seeds ({', '.join(map(str, seeds))}), mean ± sample standard deviation:")
    for key, s in summary.items():
        print(f"  {key}: {s['mean']:.4f} ± {s['std']:.4f}   ({', '.join(f'{v:.4f}' for v in s['values'])})")
    if config.out is not None:
        atomic_write_text(Path(config.out) / "seeds.json", json.dumps({"seeds": list(seeds), **summary}, indent=2))
    return summary


def entry_point(cls, run, argv, prog: str, description: str, summary_keys: Sequence[str]) -> int:
    """The command line of a run kind: a new run, `--resume RUN_DIR`, or `--seeds` (one run per seed).
    Launched by torchrun, every process runs it (fastdarts.distributed)."""
    cli = parse_command_line(cls, argv, prog, description)
    keep_freed_memory()  # this process is the run's own: its steps reuse each other's freed memory
    try:
        if cli.seeds is not None:
            run_seeds(lambda config: run(config).history[-1], cli.config, cli.seeds, summary_keys)
        elif cli.resume is not None:
            run(resume=cli.resume, **cli.given)
        else:
            run(cli.config)
    finally:
        distributed.finish()
    return 0
