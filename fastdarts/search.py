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
from .bilevel import Architect, weight_step
from .checkpoint import atomic_write_text, save_checkpoint
from .config import SearchConfig, parse_config, run_cli
from .data import ImageData, load_dataset, random_batch, shuffled_batches, split_indices
from .errors import ConfigError
from .plots import plot_run
from .space import Genotype
from .supernet import SearchNetwork


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class SearchResult:
    genotype: Genotype
    history: list[dict]
    run_dir: Path


def run(config: SearchConfig | None = None, **overrides) -> SearchResult:
    """Run a search; `overrides` set config fields by name (`run(epochs=1, layers=3)`)."""
    config = dataclasses.replace(config or SearchConfig(), **overrides).resolved()
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    data = load_dataset(config.dataset, config.data)
    train_idx, val_idx = split_indices(len(data), config.train_portion)
    run_dir = make_run_dir(config.out, "search")
    atomic_write_text(run_dir / "config.json", json.dumps(dataclasses.asdict(config), indent=2) + "\n")

    model = SearchNetwork(config.init_channels, data.num_classes, config.layers, data.in_channels)
    weights = model.weight_parameters()
    weight_optimizer = torch.optim.SGD(
        weights, config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay
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
    steps_per_epoch = math.ceil(len(train_idx) / config.batch_size)
    bar = tqdm(total=config.epochs * steps_per_epoch, disable=not config.progress, unit="step", dynamic_ncols=True)
    history: list[dict] = []
    for epoch in range(config.epochs):
        lr = scheduler.get_last_lr()[0]
        started = time.perf_counter()
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for step, batch_idx in enumerate(shuffled_batches(train_idx, config.batch_size, generator)):
            train_batch = data.batch(batch_idx, generator, augment=True)
            val_batch = data.batch(random_batch(val_idx, config.batch_size, generator), generator, augment=True)
            architect.step(train_batch, val_batch, lr)

            loss, logits = weight_step(model, weight_optimizer, train_batch, config.grad_clip)

            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise TrainingDiverged(f"training loss is {loss_value} at epoch {epoch} step {step}")
            n = len(batch_idx)
            loss_sum += loss_value * n
            correct += (logits.argmax(1) == train_batch[1]).sum().item()
            seen += n
            bar.set_postfix(epoch=epoch, loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
            bar.update()
        scheduler.step()
        val_loss, val_acc = evaluate(model, data, val_idx, config.batch_size)
        record = epoch_record(model, epoch, lr, loss_sum / seen, correct / seen, val_loss, val_acc)
        record["seconds"] = round(time.perf_counter() - started, 3)
        history.append(record)
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
    save_checkpoint(
        run_dir / "checkpoint.pt",
        {
            "epoch": config.epochs,
            "config": dataclasses.asdict(config),
            "model": model.state_dict(),
            "weight_optimizer": weight_optimizer.state_dict(),
            "arch_optimizer": architect.optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "genotype": str(genotype),
        },
    )
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
    config = parse_config(SearchConfig, argv, "python -m fastdarts.search", "DARTS architecture search.")
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
