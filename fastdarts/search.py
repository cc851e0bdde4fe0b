"""`python -m fastdarts.search`: a DARTS architecture search (METHOD.md 1.3), or `run(config)` from Python.

Each step updates the architecture on a fresh random validation batch, then the weights on the
next training batch. Every epoch is logged to the console and to `metrics.jsonl` in the run
directory; the end writes `genotype.json`, `genotype.txt` (DARTS format) and `checkpoint.pt`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .analyze import write_cell_diagrams
from .bilevel import Architect, NonFiniteError, weight_step
from .checkpoint import (
    RunInterrupted,
    StopSignals,
    atomic_write_text,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import SearchConfig, parse_config, run_cli
from .data import ImageData, load_dataset, random_batch, shuffled_batches, split_indices
from .errors import ConfigError, TrainingDiverged
from .plots import plot_run
from .space import Genotype
from .supernet import SearchNetwork


@dataclass
class SearchResult:
    genotype: Genotype
    history: list[dict]
    run_dir: Path


def run(config: SearchConfig | None = None, *, resume: str | Path | None = None, **overrides) -> SearchResult:
    """Run a search; `overrides` set config fields by name (`run(epochs=1, layers=3)`).

    `resume` continues the run saved in that directory, with its own configuration (only
    `progress` may be overridden), and ends exactly as the uninterrupted run would have.
    """
    checkpoint = None
    if resume is not None:
        run_dir = Path(resume)
        checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
        unknown = set(overrides) - {"progress"}
        if config is not None or unknown:
            raise ConfigError("resume continues a run with its own configuration; give no other settings")
        config = dataclasses.replace(SearchConfig(**checkpoint["config"]), **overrides).resolved()
        if checkpoint.get("complete"):
            raise ConfigError(f"resume: the run in {run_dir} is already complete")
    else:
        config = dataclasses.replace(config or SearchConfig(), **overrides).resolved()
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    data = load_dataset(config.dataset, config.data)
    train_idx, val_idx = split_indices(len(data), config.train_portion)
    if resume is None:
        run_dir = make_run_dir(config.out, "search")
        atomic_write_text(run_dir / "config.json", json.dumps(dataclasses.asdict(config), indent=2) + "\n")

    model = SearchNetwork(config.init_channels, data.num_classes, config.layers, data.in_channels)
    weight_optimizer = torch.optim.SGD(
        model.weight_parameters(), config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(weight_optimizer, config.epochs, config.learning_rate_min)
    architect = Architect(
        model,
        weight_optimizer,
        arch_learning_rate=config.arch_learning_rate,
        arch_weight_decay=config.arch_weight_decay,
        unrolled=config.unrolled,
        hessian_r=config.hessian_r,
    )
    generator = torch.Generator().manual_seed(config.seed)
    stateful = {"model": model, "weight_optimizer": weight_optimizer, "arch_optimizer": architect.optimizer,
                "scheduler": scheduler}  # fmt: skip
    # Where the run stands: the epoch, the next step in it, its batches, its running sums.
    position = {"epoch": 0, "step": 0, "batches": None, "sums": None, "history": []}
    if checkpoint is not None:
        for name, obj in stateful.items():
            obj.load_state_dict(checkpoint[name])
        position = checkpoint["position"]
        set_rng_state(checkpoint["rng"], generator)
        # Rows logged after the checkpoint belong to work that is about to be redone.
        rows = "".join(json.dumps(r) + "\n" for r in position["history"])
        atomic_write_text(run_dir / "metrics.jsonl", rows)
    history = position["history"]

    def save(complete: bool = False) -> None:
        state = {name: obj.state_dict() for name, obj in stateful.items()}
        state.update(config=dataclasses.asdict(config), position=position, rng=rng_state(generator),
                     genotype=str(model.genotype()), complete=complete)  # fmt: skip
        save_checkpoint(run_dir / "checkpoint.pt", state)

    steps_per_epoch = math.ceil(len(train_idx) / config.batch_size)
    done = position["epoch"] * steps_per_epoch + position["step"]
    bar = tqdm(total=config.epochs * steps_per_epoch, initial=done, disable=not config.progress, unit="step",
               dynamic_ncols=True)  # fmt: skip
    with StopSignals() as stop:
        while position["epoch"] < config.epochs:
            epoch = position["epoch"]
            if position["batches"] is None:
                position.update(step=0, batches=shuffled_batches(train_idx, config.batch_size, generator),
                                sums={"loss": 0.0, "correct": 0, "seen": 0, "skipped": 0, "seconds": 0.0})  # fmt: skip
            sums = position["sums"]
            lr = scheduler.get_last_lr()[0]
            started = time.perf_counter()
            model.train()
            while position["step"] < len(position["batches"]):
                step = position["step"]
                batch_idx = position["batches"][step]
                train_batch = data.batch(batch_idx, generator, augment=True)
                val_batch = data.batch(random_batch(val_idx, config.batch_size, generator), generator, augment=True)
                try:
                    architect.step(train_batch, val_batch, lr)
                    loss, logits = weight_step(model, weight_optimizer, train_batch, config.grad_clip)
                except NonFiniteError as e:
                    if config.on_nan == "stop":
                        raise TrainingDiverged(
                            f"{e} at epoch {epoch} step {step}; stopped, the last checkpoint in {run_dir} is intact"
                        ) from None
                    sums["skipped"] += 1
                else:
                    n = len(batch_idx)
                    sums["loss"] += loss.item() * n
                    sums["correct"] += (logits.argmax(1) == train_batch[1]).sum().item()
                    sums["seen"] += n
                position["step"] = step + 1
                seen = max(sums["seen"], 1)
                bar.set_postfix(epoch=epoch, loss=f"{sums['loss'] / seen:.3f}", acc=f"{sums['correct'] / seen:.3f}",
                                refresh=False)  # fmt: skip
                bar.update()
                if stop.signum is not None:
                    sums["seconds"] += time.perf_counter() - started
                    save()
                    bar.close()
                    raise RunInterrupted(
                        f"stopped by {signal.Signals(stop.signum).name} at epoch {epoch} step {step + 1}; "
                        f"resume with: python -m fastdarts.search --resume {run_dir}",
                        128 + stop.signum,
                    )
            scheduler.step()
            val_loss, val_acc = evaluate(model, data, val_idx, config.batch_size)
            seen = max(sums["seen"], 1)
            record = epoch_record(model, epoch, lr, sums["loss"] / seen, sums["correct"] / seen, val_loss, val_acc)
            record["skipped_steps"] = sums["skipped"]
            record["seconds"] = round(sums["seconds"] + time.perf_counter() - started, 3)
            history.append(record)
            position.update(epoch=epoch + 1, step=0, batches=None, sums=None)
            if position["epoch"] % config.save_every == 0 and position["epoch"] < config.epochs:
                save()
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            tqdm.write(
                f"epoch {epoch}: lr {lr:.4g} train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f} | "
                f"val loss {val_loss:.4f} acc {val_acc:.4f} | normal skips {record['normal_skip_connects']} | "
                f"entropy {record['entropy_normal']:.4f}/{record['entropy_reduce']:.4f} | {record['seconds']:.1f}s\n"
                f"  {record['genotype']}"
            )
    bar.close()

    genotype = model.genotype()
    atomic_write_text(run_dir / "genotype.json", json.dumps(genotype.to_dict(), indent=2) + "\n")
    atomic_write_text(run_dir / "genotype.txt", str(genotype) + "\n")
    save(complete=True)
    write_cell_diagrams(genotype, run_dir)
    plot_run(run_dir / "metrics.jsonl", run_dir)
    print(f"genotype: {genotype}\nrun directory: {run_dir}")
    return SearchResult(genotype, history, run_dir)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: ImageData, indices: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Loss and accuracy on `indices` without augmentation, in eval mode (running BN statistics)."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for batch_idx in indices.split(batch_size):
        x, y = data.batch(batch_idx)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    model.train(was_training)
    return loss_sum / len(indices), correct / len(indices)


def edge_entropy(weights: torch.Tensor) -> float:
    """Mean over edges of the entropy (nats) of the op distribution on that edge."""
    p = weights.detach().clamp_min(1e-12)
    return float(-(p * p.log()).sum(-1).mean())


def epoch_record(model: SearchNetwork, epoch, lr, train_loss, train_acc, val_loss, val_acc) -> dict:
    genotype = model.genotype()
    weights_normal, weights_reduce = model.edge_weights()
    return {
        "epoch": epoch,
        "lr": lr,
        "train_loss": train_loss,
        "train_acc": train_acc,
        "val_loss": val_loss,
        "val_acc": val_acc,
        "normal_skip_connects": sum(op == "skip_connect" for op, _ in genotype.normal),
        "reduce_skip_connects": sum(op == "skip_connect" for op, _ in genotype.reduce),
        "entropy_normal": edge_entropy(weights_normal),
        "entropy_reduce": edge_entropy(weights_reduce),
        "genotype": str(genotype),
        "weights_normal": weights_normal.detach().tolist(),
        "weights_reduce": weights_reduce.detach().tolist(),
    }


def make_run_dir(out: str | None, kind: str) -> Path:
    """The run directory: `out` if given (it must not hold a run already), else a new folder under runs/."""
    if out is not None:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"out {path} exists and is not a directory")
        if (path / "metrics.jsonl").exists():
            raise ConfigError(f"out {path} already holds a run; choose another --out")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"out {path}: cannot create the run directory ({e.strerror})") from None
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


def main(argv=None) -> int:
    config, resume = parse_config(SearchConfig, argv, "python -m fastdarts.search", "DARTS architecture search.")
    if resume is not None:
        run(resume=resume, progress=config.progress)
    else:
        run(config)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
