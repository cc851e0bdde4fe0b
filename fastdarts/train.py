"""`python -m fastdarts.train --genotype G`: train a found cell from scratch (METHOD.md 1.5), or `run(config)`.

The evaluation network (NetworkCIFAR, or NetworkImageNet for 224-pixel images: affine BN, the
genotype's ops only) is trained with SGD and a per-epoch cosine or step schedule, the auxiliary
head's loss weighted in, and (as the data set's preset says) cutout, label smoothing and a drop-path
probability that ramps up linearly over the epochs; every epoch is scored on the test split.
Checkpoints, `--resume`, signals and divergence work as for the search (`fastdarts.runloop`).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import distributed
from .bilevel import sgd_step
from .checkpoint import atomic_write_text
from .config import TrainConfig, run_cli
from .data import BatchJob, Images, load_dataset, part_slice, shuffled_batches, step_seed, to_device
from .distributed import SINGLE, World
from .evalnet import NETWORKS, EvalNetwork, count_multiply_adds, count_parameters
from .plots import plot_run
from .runloop import Run, check_network_fits, entry_point, evaluate, make_run_dir, seed_everything, start_config
from .space import Genotype


@dataclass
class TrainResult:
    genotype: Genotype
    parameters: int  # auxiliary head excluded, as DARTS reports it
    test_acc: float
    history: list[dict]
    run_dir: Path
    stopped_early: bool = False  # stopped by `stop_after`; resume it to finish


# Measures the model after `epochs_done` epochs and returns fields for that epoch's row of metrics.jsonl. It must
# leave the model and every random stream as they were, so that the run trains exactly as without it.
Observer = Callable[[EvalNetwork, int], dict]


def build_network(config: TrainConfig, genotype: Genotype, data: Images) -> EvalNetwork:
    """The evaluation network of `config` for images like `data`'s, drawn from the global torch stream."""
    return NETWORKS[config.network](genotype, config.init_channels, data.num_classes, config.layers, config.auxiliary,
                                    data.in_channels)  # fmt: skip


class TrainTask:
    """One SGD step of the evaluation network on an augmented training batch."""

    def __init__(self, config: TrainConfig, train: Images, test: Images, model: EvalNetwork, optimizer, scheduler,
                 world: World = SINGLE, forward=None, observe: Observer | None = None):  # fmt: skip
        self.config, self.train, self.test, self.model = config, train, test, model
        self.optimizer, self.scheduler, self.observe = optimizer, scheduler, observe
        self.world, self.forward = world, forward or model  # forward: the model's DDP wrapper over several processes
        self.device = next(model.parameters()).device

    def batches(self, generator):
        return shuffled_batches(torch.arange(len(self.train)), self.config.batch_size, generator, self.world.size)

    def inputs(self, epoch, batches, start):
        """Each step's augmented training batch (this process's part of it) and its size."""
        cutout = self.config.cutout_length if self.config.cutout else 0
        seed, part = self.config.seed, self.world.part
        jobs = [BatchJob(b, step_seed(seed, epoch, step, 0), cutout, part)
                for step, b in enumerate(batches[start:], start)]  # fmt: skip
        batches = self.train.iterate(jobs)
        try:
            for batch, job in zip(batches, jobs):
                yield batch, len(job.indices)
        finally:
            batches.close()

    def begin_epoch(self, epoch: int) -> dict:
        self.model.drop_path_prob = self.config.drop_path_prob * epoch / self.config.epochs
        self.model.train()
        return {"lr": self.scheduler.get_last_lr()[0], "drop_path_prob": self.model.drop_path_prob}

    def step(self, inputs):
        batch, n = inputs
        x, y = to_device(batch, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        if not self.world.alone:  # drop-path masks drawn for the global batch, as one process would
            self.model.drop_path_part = (n, part_slice(n, self.world.part))
        logits, logits_aux = self.forward(x)
        # DARTS's ImageNet criterion (CrossEntropyLabelSmooth) is cross-entropy with smoothed targets.
        loss = F.cross_entropy(logits, y, label_smoothing=self.config.label_smooth)
        if logits_aux is not None:
            loss = loss + self.config.auxiliary_weight * F.cross_entropy(
                logits_aux, y, label_smoothing=self.config.label_smooth
            )
        sgd_step(self.optimizer, self.model.parameters(), loss, self.config.grad_clip, world=self.world,
                 share=self.world.share(n))  # fmt: skip
        return loss.detach(), int((logits.argmax(1) == y).sum())

    def end_epoch(self, epoch: int) -> dict:
        self.scheduler.step()
        test_loss, test_acc = evaluate(self.model, self.test, torch.arange(len(self.test)), self.config.batch_size,
                                       self.world)  # fmt: skip
        row = {"test_loss": test_loss, "test_acc": test_acc}
        if self.observe is not None:
            row.update(self.observe(self.model, epoch + 1))
        return row

    def announce(self, r: dict) -> str:
        skipped = f" | {r['skipped_steps']} steps skipped (non-finite)" if r["skipped_steps"] else ""
        return (
            f"epoch {r['epoch']}: lr {r['lr']:.4g} drop path {r['drop_path_prob']:.3f} | train loss "
            f"{r['train_loss']:.4f} acc {r['train_acc']:.4f} | test loss {r['test_loss']:.4f} acc {r['test_acc']:.4f}"
            f" | {r['seconds']:.1f}s ({r['data_seconds']:.1f}s waiting for data){skipped}"
        )


def run(config: TrainConfig | None = None, *, resume: str | Path | None = None, observe: Observer | None = None,
        **overrides) -> TrainResult:  # fmt: skip
    """Train a genotype; `overrides` set config fields by name (`run(genotype="DARTS_V1", epochs=5)`).
    `observe(model, epochs_done)` adds measurements to every epoch's row (fastdarts.convergence).

    `resume` continues the run saved in that directory with its own configuration (only `progress`,
    `stop_after` and `device` may be given) and ends exactly as the uninterrupted run would have (on the same device).
    """
    world = distributed.world()
    config, checkpoint = world.from_writer(start_config, TrainConfig, "train", config, resume, **overrides)
    world.check_batch_size(config.batch_size)
    genotype = config.cell()
    device = distributed.run_device(config.device)
    seed_everything(config.seed)
    train = load_dataset(config.dataset, config.data, "train", **config.data_options())
    test = load_dataset(config.dataset, config.data, "test", **config.data_options())
    check_network_fits(functools.partial(build_network, config, genotype, train), config, "init_channels", "layers")
    run_dir = Path(resume) if resume is not None else world.from_writer(make_run_dir, config.out, "train")

    model = build_network(config, genotype, train)
    parameters = count_parameters(model)
    image = (train.in_channels, train.image_size, train.image_size)
    multiply_adds = count_multiply_adds(model, image)
    model.to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay,
        foreach=True,
    )  # fmt: skip
    if config.schedule == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, config.decay_period, config.gamma)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs, config.learning_rate_min)
    generator = torch.Generator().manual_seed(config.seed)
    train_run = Run("train", config, run_dir, {"model": model, "optimizer": optimizer, "scheduler": scheduler},
                    generator, checkpoint, world)  # fmt: skip
    forward = world.data_parallel(model)
    if world.writes:
        if checkpoint is None:
            atomic_write_text(run_dir / "genotype.txt", str(genotype) + "\n")
        print(f"{genotype}\nevaluation network ({config.network}): {parameters / 1e6:.3f} M parameters (auxiliary "
              f"head excluded), {multiply_adds / 1e6:.1f} M multiply-adds per {image[1]}x{image[2]} image")  # fmt: skip
    history = train_run.loop(TrainTask(config, train, test, model, optimizer, scheduler, world, forward, observe))
    test_acc = history[-1]["test_acc"] if history else float("nan")
    if train_run.stopped_early:
        return TrainResult(genotype, parameters, test_acc, history, run_dir, stopped_early=True)

    summary = {"parameters": parameters, "multiply_adds": multiply_adds, "test_acc": test_acc,
               "test_loss": history[-1]["test_loss"]}  # fmt: skip
    if world.writes:
        atomic_write_text(run_dir / "result.json", json.dumps(summary, indent=2) + "\n")
    train_run.save(complete=True)
    if not world.writes:  # process 0 writes the rest
        return TrainResult(genotype, parameters, test_acc, history, run_dir)
    plot_run(run_dir / "metrics.jsonl", run_dir)
    print(f"test accuracy: {test_acc:.4f} ({parameters / 1e6:.3f} M parameters)\nrun directory: {run_dir}")
    return TrainResult(genotype, parameters, test_acc, history, run_dir)


# The final metrics that --seeds summarises.
SUMMARY_KEYS = ("test_acc", "test_loss", "train_acc", "train_loss")


def main(argv=None) -> int:
    from .config import requested_space

    space, argv = requested_space(sys.argv[1:] if argv is None else list(argv))
    if space == "rnn":
        from .rnn.train import main as recurrent_main

        return recurrent_main(argv)
    return entry_point(TrainConfig, run, argv, "python -m fastdarts.train", "Train a found cell from scratch.",
                       SUMMARY_KEYS)  # fmt: skip


if __name__ == "__main__":
    sys.exit(run_cli(main))
