"""`python -m fastdarts.search`: a DARTS or PR-DARTS architecture search (METHOD.md 1.3, 2), or `run(config)`.

Each step updates the architecture on a fresh random validation batch, then the weights on the
next training batch (PR-DARTS: the weights first). The validation images are the second part of
the training split (`--train_portion`), or a folder's own `val/`. Every epoch is logged to the
console and to `metrics.jsonl` in the run directory, and a checkpoint lets an interrupted search
continue exactly (`--resume RUN_DIR`, see `fastdarts.runloop`); the end writes `genotype.json`,
`genotype.txt` (DARTS format) and the final checkpoint.
"""

from __future__ import annotations

import functools
import gc
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed
from .analyze import write_cell_diagrams
from .bilevel import Architect, weight_step
from .checkpoint import atomic_write_text
from .config import SearchConfig, run_cli
from .data import BatchJob, Images, load_dataset, random_batch, shuffled_batches, split_indices, step_seed, to_device
from .distributed import SINGLE, World
from .methods import make_method
from .plots import plot_run
from .runloop import (
    Run,
    check_network_fits,
    checkpoint_misfit,
    entry_point,
    evaluate,
    make_run_dir,
    seed_everything,
    start_config,
)
from .space import Genotype
from .supernet import SearchNetwork, Widening, widen_partial_channels, widened


@dataclass
class SearchResult:
    genotype: Genotype
    history: list[dict]
    run_dir: Path
    stopped_early: bool = False  # stopped by `stop_after`; resume it to finish


class SearchTask:
    """One search step: the architecture on a fresh random validation batch, then the weights.

    The weights train on the images `train_idx` of `train`, the architecture on `val_idx` of `val`
    (the same data set, split, unless it has a validation split of its own)."""

    def __init__(self, config: SearchConfig, train: Images, train_idx, val: Images, val_idx, model: SearchNetwork,
                 weight_optimizer, scheduler, architect: Architect, world: World = SINGLE,
                 forward=None):  # fmt: skip
        self.config, self.train, self.train_idx, self.val, self.val_idx = config, train, train_idx, val, val_idx
        self.model, self.weight_optimizer, self.scheduler = model, weight_optimizer, scheduler
        self.architect = architect
        self.world, self.forward = world, forward  # forward: the model's DDP wrapper over several processes
        self.device = next(model.parameters()).device

    def batches(self, generator):
        return shuffled_batches(self.train_idx, self.config.batch_size, generator, self.world.size)

    def inputs(self, epoch, batches, start):
        """Each step's training batch and a fresh random validation batch, both augmented (this process's
        part of each), and the parts' shares of the batches."""
        seed, part, train_jobs, val_jobs = self.config.seed, self.world.part, [], []
        for step, batch_idx in enumerate(batches[start:], start):
            pick = torch.Generator().manual_seed(step_seed(seed, epoch, step, 2))
            train_jobs.append(BatchJob(batch_idx, step_seed(seed, epoch, step, 0), part=part))
            val_jobs.append(BatchJob(random_batch(self.val_idx, self.config.batch_size, pick),
                                     step_seed(seed, epoch, step, 1), part=part))  # fmt: skip
        shares = ((self.world.share(len(t.indices)), self.world.share(len(v.indices)))
                  for t, v in zip(train_jobs, val_jobs))  # fmt: skip
        train, val = self.train.iterate(train_jobs), self.val.iterate(val_jobs)
        try:
            yield from zip(train, val, shares)
        finally:
            train.close()
            val.close()

    def begin_epoch(self, epoch: int) -> dict:
        method = self.model.method
        method.set_epoch(epoch, self.config.epochs)
        with torch.no_grad():
            method.prepare_architecture(self.model.arch_parameters_by_cell())
        k = method.network_style.partial_channels
        if k != self.model.partial_channels:  # DrNAS's second stage (a resumed one was built wide: nothing to do)
            restart_weight_optimizer(self.weight_optimizer, widen_partial_channels(self.model, k, method.generator))
            if not self.world.alone:
                # Every process widened alike (the method's generator is seeded alike). DDP's buckets and hooks
                # hold the old sizes: the old wrapper goes (collected now, its hooks with it) and a new one wraps
                # the widened parameters.
                self.forward = None
                gc.collect()
                self.forward = data_parallel(self.world, self.model)
        self.lr = self.weight_optimizer.param_groups[0]["lr"]  # the scheduler's, or the restart's
        self.model.train()
        return {"lr": self.lr, **self.model.method.epoch_settings()}

    def step(self, inputs):
        train_batch, val_batch, (train_share, val_share) = inputs
        train_batch, val_batch = to_device(train_batch, self.device), to_device(val_batch, self.device)

        def weights():
            return weight_step(self.model, self.weight_optimizer, train_batch, self.config.grad_clip,
                               forward=self.forward, world=self.world, share=train_share)  # fmt: skip

        def architecture():
            if self.model.method.trains_architecture():  # not during a method's warm-up
                self.architect.step(train_batch, val_batch, self.lr, train_share, val_share)

        if self.model.method.weight_step_first:  # PR-DARTS: the weights, then the gates
            loss, logits = weights()
            architecture()
        else:
            architecture()
            loss, logits = weights()
        return loss, int((logits.argmax(1) == train_batch[1]).sum())

    def end_epoch(self, epoch: int) -> dict:
        self.scheduler.step()
        val_loss, val_acc = evaluate(self.model, self.val, self.val_idx, self.config.batch_size, self.world)
        return {"val_loss": val_loss, "val_acc": val_acc, **architecture_record(self.model)}

    def announce(self, r: dict) -> str:
        return (
            f"epoch {r['epoch']}: lr {r['lr']:.4g} train loss {r['train_loss']:.4f} acc {r['train_acc']:.4f} | "
            f"val loss {r['val_loss']:.4f} acc {r['val_acc']:.4f} | normal skips {r['normal_skip_connects']} | "
            f"entropy {r['entropy_normal']:.4f}"
            + (f"/{r['entropy_reduce']:.4f}" if "entropy_reduce" in r else "")
            + (f" | tau {r['tau']:.3f}" if "tau" in r else "")
            + (f" P(skip gate on) {r['p_nonzero_skip_normal']:.3f}" if "p_nonzero_skip_normal" in r else "")
            + "".join(f" | {k} {r[k]:.4g}" for k in self.model.method.epoch_settings() if k != "tau")
            + f" | {r['seconds']:.1f}s ({r['data_seconds']:.1f}s waiting for data)"
            + (f" | {r['skipped_steps']} steps skipped (non-finite)" if r["skipped_steps"] else "")
            + f"\n  {r['genotype']}"
        )


def run(config: SearchConfig | None = None, *, resume: str | Path | None = None, **overrides) -> SearchResult:
    """Run a search; `overrides` set config fields by name (`run(epochs=1, layers=3)`).

    `resume` continues the run saved in that directory with its own configuration (only `progress`,
    `stop_after` and `device` may be given) and ends exactly as the uninterrupted run would have (on the same device).
    """
    world = distributed.world()
    config, checkpoint = world.from_writer(start_config, SearchConfig, "search", config, resume, **overrides)
    world.check_batch_size(config.batch_size)
    method = make_method(config.method, **config.method_settings())
    device = distributed.run_device(config.device)
    seed_everything(config.seed)
    train = load_dataset(config.dataset, config.data, "train", **config.data_options())
    val = load_dataset(config.dataset, config.data, "valid", **config.data_options())
    if val is None:
        train_idx, val_idx = split_indices(len(train), config.train_portion)
        val = train
    else:
        train_idx, val_idx = torch.arange(len(train)), torch.arange(len(val))
    network = functools.partial(SearchNetwork, config.init_channels, train.num_classes, config.layers,
                                train.in_channels, method=method, recompute=config.recompute)  # fmt: skip
    check_network_fits(network, config, "init_channels", "layers")
    run_dir = Path(resume) if resume is not None else world.from_writer(make_run_dir, config.out, "search")

    if checkpoint is not None and method.widens_network:
        # The network is built as wide as the method's state says it had become; Run then loads that state again.
        try:
            method.load_state_dict(checkpoint["method"])
        except Exception as e:
            raise checkpoint_misfit(run_dir, e) from None
    model = network().to(device)
    # foreach: one call per update for the supernet's ~1,400 tensors (torch takes CPU tensors one at a time otherwise)
    weight_optimizer = torch.optim.SGD(
        model.weight_parameters(), config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay,
        foreach=True,
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(weight_optimizer, config.epochs, config.learning_rate_min)
    architect = Architect(
        model,
        weight_optimizer,
        arch_learning_rate=config.arch_learning_rate,
        arch_betas=(config.arch_beta1, 0.999),
        arch_weight_decay=config.arch_weight_decay if method.arch_weight_decay is None else method.arch_weight_decay,
        unrolled=config.unrolled,
        hessian_r=config.hessian_r,
        world=world,
    )
    generator = torch.Generator().manual_seed(config.seed)
    stateful = {"model": model, "weight_optimizer": weight_optimizer, "arch_optimizer": architect.optimizer,
                "scheduler": scheduler, "method": method}  # fmt: skip
    search_run = Run("search", config, run_dir, stateful, generator, checkpoint, world)
    task = SearchTask(config, train, train_idx, val, val_idx, model, weight_optimizer, scheduler, architect, world,
                      data_parallel(world, model))  # fmt: skip
    history = search_run.loop(task)
    genotype = model.genotype()
    if search_run.stopped_early:
        return SearchResult(genotype, history, run_dir, stopped_early=True)

    if world.writes:
        atomic_write_text(run_dir / "genotype.json", json.dumps(genotype.to_dict(), indent=2) + "\n")
        atomic_write_text(run_dir / "genotype.txt", str(genotype) + "\n")
    search_run.save(complete=True, genotype=str(genotype))
    if not world.writes:  # process 0 writes the rest
        return SearchResult(genotype, history, run_dir)
    write_cell_diagrams(genotype, run_dir)
    plot_run(run_dir / "metrics.jsonl", run_dir)
    print(f"genotype: {genotype}\nrun directory: {run_dir}")
    for cell in genotype.cells_without_ops():
        print(f"warning: the {cell} cell has no op but 'none' (it outputs zeros): its architecture has not decided "
              f"yet; search longer{method.undecided_hint()}", file=sys.stderr)  # fmt: skip
    return SearchResult(genotype, history, run_dir)


def data_parallel(world: World, model: SearchNetwork) -> torch.nn.Module:
    """The model's weights in DistributedDataParallel over the processes of `world` (the model itself alone)."""
    # PR-DARTS computes only the sampled ops of each edge: the others' weights get no gradient in a step.
    return world.data_parallel(model, ignore=model.arch_parameters(), find_unused_parameters=model.samples_each_forward)


def restart_weight_optimizer(optimizer: torch.optim.SGD, widenings: dict[torch.nn.Parameter, Widening]) -> None:
    """The weights' SGD after `widen_partial_channels` (`widenings`: how each parameter grew), as DrNAS restarts it:
    its momentum buffers widened as their parameters were, and every group's learning rate back at its initial one.

    The published code builds a new SGD with the same settings, copies the momentum buffers into it and loads the
    cosine scheduler's state into a new scheduler; carrying on with the same SGD and scheduler computes the same (SGD
    keeps no state but the momentum buffers). The chainable cosine step then goes on from the initial rate lr_0: at
    the epochs e >= s of the second stage, lr_e = eta_min + (lr_0 - eta_min)(1 + cos(pi e/T)) / (1 + cos(pi s/T))
    (the published 50 epochs, s = 25, eta_min 0: 0.1 (1 + cos(pi e/50)), twice the cosine; METHODS_MORE.md 4c)."""
    for p, steps in widenings.items():
        buffer = optimizer.state.get(p, {}).get("momentum_buffer")
        if buffer is not None:
            optimizer.state[p]["momentum_buffer"] = widened(buffer, steps)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"]


def architecture_record(model: SearchNetwork) -> dict:
    """What the architecture looks like now: the derived genotype, its skip connections, the edge weights."""
    genotype = model.genotype()
    weights_normal, weights_reduce = model.edge_weights()
    return {
        "normal_skip_connects": sum(op == "skip_connect" for op, _ in genotype.normal),
        "reduce_skip_connects": sum(op == "skip_connect" for op, _ in genotype.cell_edges("reduce")),
        **model.diagnostics(),
        "genotype": str(genotype),
        "ops": list(model.method.primitives),  # the columns of the weights below
        "weights_normal": weights_normal.detach().tolist(),
        **({} if weights_reduce is None else {"weights_reduce": weights_reduce.detach().tolist()}),
    }


# The final metrics that --seeds summarises.
SUMMARY_KEYS = ("val_acc", "val_loss", "train_acc", "train_loss", "normal_skip_connects", "reduce_skip_connects")


def main(argv=None) -> int:
    from .config import requested_space

    space, argv = requested_space(sys.argv[1:] if argv is None else list(argv))
    if space == "rnn":
        from .rnn.search import main as recurrent_main

        return recurrent_main(argv)
    return entry_point(SearchConfig, run, argv, "python -m fastdarts.search", "DARTS architecture search.",
                       SUMMARY_KEYS)  # fmt: skip


if __name__ == "__main__":
    sys.exit(run_cli(main))
