"""`python -m fastdarts.train --space rnn --genotype G`: DARTS's training of a found recurrent cell (RNN.md 2.5).

SGD at `lr` scaled by each batch's jittered length, switching to averaged SGD (ASGD with t0 = 0, lambda = 0: SGD
plus the uniform average of the iterates) once the validation loss is worse than the best of all but the last
`nonmono` epochs. Under ASGD each epoch is evaluated, and kept if best, with the averaged weights. The end scores
the best weights on the test stream (batch `test_batch_size`) and writes `result.json`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import atomic_write_text
from ..config import option
from ..runloop import Run, check_network_fits, entry_point, make_run_dir, seed_everything, start_config
from .data import batchify
from .genotype import RecurrentGenotype, load_recurrent_genotype
from .loop import (
    CarriedHidden,
    LanguageModelConfig,
    describe,
    epoch_batches,
    evaluate,
    lm_weight_step,
    load,
    perplexity,
    rows_of,
)
from .model import RecurrentEvalModel
from .plots import plot_recurrent_run


@dataclass
class RecurrentTrainConfig(LanguageModelConfig):
    """DARTS's rnn/train.py flags and defaults."""

    genotype: str = option("DARTS_V2", "the cell: DARTS_V1, DARTS_V2 (= DARTS), a Genotype(recurrent=..., "
                           "concat=...) string, a genotype.json/.txt or a search's run directory")  # fmt: skip
    emsize: int = option(850, "embedding size (equal to nhid: the decoder is tied)", low=1)
    nhid: int = option(850, "hidden units of the cell", low=1)
    batch_size: int | None = option(None, "batch size (default: 64)", low=1)
    epochs: int = option(8000, "number of epochs (DARTS trains until this limit; ASGD takes over on a plateau)",
                         low=1)  # fmt: skip
    dropoute: float = option(0.1, "word-type dropout of the embedding's rows", low=0, high=1, high_open=True)
    wdecay: float = option(8e-7, "weight decay of the weights", low=0)
    seed: int = option(1267, "random seed", low=0, high=2**32 - 1)
    nonmono: int = option(5, "switch to ASGD when the validation loss is worse than the best before the last "
                          "this many epochs", low=1)  # fmt: skip
    max_seq_len_delta: int = option(20, "the jittered sequence length is at most bptt + this", low=0)

    BUNDLED_BATCH, PTB_BATCH = 64, 64

    def check(self) -> None:
        super().check()
        self.cell()  # a genotype that cannot be read fails before anything is written

    def cell(self) -> RecurrentGenotype:
        return load_recurrent_genotype(self.genotype)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's state (state_dict() holds the live tensors, which the next load overwrites)."""
    return {k: v.clone() for k, v in model.state_dict().items()}


class AveragingOptimizer:
    """SGD, then ASGD from the epoch its switch rule fires; the validation history and the best weights (averaged
    ones under ASGD). One stateful object, so that a checkpoint holds which optimizer runs and its state."""

    def __init__(self, model: RecurrentEvalModel, config: RecurrentTrainConfig):
        self.model, self.config = model, config
        self.current = torch.optim.SGD(model.weight_parameters(), config.lr, weight_decay=config.wdecay)
        self.averaging, self.history, self.best_loss, self.best = False, [], float("inf"), None

    def switch(self) -> None:
        self.current = torch.optim.ASGD(self.model.weight_parameters(), self.config.lr, t0=0, lambd=0.0,
                                        weight_decay=self.config.wdecay)  # fmt: skip
        self.averaging = True

    def averaged_weights(self) -> dict[str, torch.Tensor]:
        """The model's state with every weight replaced by its ASGD average (`ax`)."""
        state = self.model.state_dict()
        for name, p in self.model.named_parameters():
            if "ax" in self.current.state.get(p, {}):
                state[name] = self.current.state[p]["ax"].clone()
        return state

    def end_epoch(self, evaluate_loss) -> float:
        """Score the epoch (with the averaged weights under ASGD), keep the best, apply the switch rule."""
        if self.averaging:
            raw = snapshot(self.model)
            self.model.load_state_dict(self.averaged_weights())
            loss = evaluate_loss()
            weights = snapshot(self.model)
            self.model.load_state_dict(raw)
        else:
            loss = evaluate_loss()
            weights = snapshot(self.model)
        if loss < self.best_loss:
            self.best_loss, self.best = loss, weights
        nonmono = self.config.nonmono
        if not self.averaging and len(self.history) > nonmono and loss > min(self.history[:-nonmono]):
            self.switch()
        self.history.append(loss)
        return loss

    def state_dict(self) -> dict:
        return {"averaging": self.averaging, "optimizer": self.current.state_dict(), "history": list(self.history),
                "best_loss": self.best_loss, "best": self.best}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if state["averaging"]:
            self.switch()
        self.current.load_state_dict(state["optimizer"])
        self.history, self.best_loss, self.best = list(state["history"]), state["best_loss"], state["best"]


class RecurrentTrainTask:
    def __init__(self, config: RecurrentTrainConfig, corpus, model: RecurrentEvalModel, optimizer: AveragingOptimizer,
                 hidden: CarriedHidden):  # fmt: skip
        self.config, self.model, self.optimizer, self.hidden = config, model, optimizer, hidden
        self.train_data = batchify(corpus.train, config.batch_size)
        self.val_data = batchify(corpus.valid, config.eval_batch_size)

    def batches(self, generator):
        c = self.config
        return epoch_batches(len(self.train_data), c.batch_size, c.bptt, generator, jitter=5.0,
                             max_seq_len=c.bptt + c.max_seq_len_delta)  # fmt: skip

    def inputs(self, epoch, batches, start):
        if start == 0:
            self.hidden.reset()
        for positions in batches[start:]:
            yield rows_of(self.train_data, positions)[1:]

    def begin_epoch(self, epoch: int) -> dict:
        self.model.train()
        return {"lr": self.config.lr, "optimizer": "asgd" if self.optimizer.averaging else "sgd"}

    def step(self, inputs):
        x, y = inputs
        lr = self.config.lr * len(x) / self.config.bptt
        loss, correct, self.hidden["train"] = lm_weight_step(self.model, self.optimizer.current, x, y,
                                                             self.hidden["train"], lr, self.config)  # fmt: skip
        return loss, correct

    def end_epoch(self, epoch: int) -> dict:
        val_loss = self.optimizer.end_epoch(lambda: evaluate(self.model, self.val_data, self.config.bptt))
        best = perplexity(self.optimizer.best_loss)
        return {"val_loss": val_loss, "val_ppl": perplexity(val_loss), "best_val_ppl": best}

    def announce(self, r: dict) -> str:
        return (f"epoch {r['epoch']} ({r['optimizer']}): train loss {r['train_loss']:.4f} ppl "
                f"{perplexity(r['train_loss']):.2f} | val ppl {r['val_ppl']:.2f} (best {r['best_val_ppl']:.2f}) | "
                f"{r['seconds']:.1f}s" + (f" | {r['skipped_steps']} steps skipped (non-finite)"
                                          if r["skipped_steps"] else ""))  # fmt: skip


@dataclass
class RecurrentTrainResult:
    genotype: RecurrentGenotype
    parameters: int
    test_ppl: float
    history: list[dict]
    run_dir: Path
    stopped_early: bool = False


def build(config: RecurrentTrainConfig, ntoken: int) -> RecurrentEvalModel:
    return RecurrentEvalModel(ntoken, config.cell(), config.emsize, config.nhid, dropout=config.dropout,
                              dropouth=config.dropouth, dropoutx=config.dropoutx, dropouti=config.dropouti,
                              dropoute=config.dropoute)  # fmt: skip


def run(config: RecurrentTrainConfig | None = None, *, resume: str | Path | None = None,
        **overrides) -> RecurrentTrainResult:  # fmt: skip
    """Train a recurrent cell; `overrides` set config fields by name; `resume` continues a saved run exactly."""
    config, checkpoint = start_config(RecurrentTrainConfig, "train", config, resume, **overrides)
    seed_everything(config.seed)
    corpus = load(config)
    check_network_fits(functools.partial(build, config, len(corpus.dictionary)), config, "nhid", "emsize")
    run_dir = Path(resume) if resume is not None else make_run_dir(config.out, "train")
    genotype = config.cell()
    model = build(config, len(corpus.dictionary))
    parameters = model.parameter_count()
    optimizer = AveragingOptimizer(model, config)
    hidden = CarriedHidden(train=model.init_hidden(config.batch_size))
    generator = torch.Generator().manual_seed(config.seed)
    stateful = {"model": model, "averaging_optimizer": optimizer, "hidden": hidden}
    train_run = Run("train", config, run_dir, stateful, generator, checkpoint)
    if checkpoint is None:
        atomic_write_text(run_dir / "genotype.txt", str(genotype) + "\n")
        train_run.say(f"{genotype}\n{describe(corpus)}; evaluation model {parameters / 1e6:.3f} M parameters")
    history = train_run.loop(RecurrentTrainTask(config, corpus, model, optimizer, hidden))
    if train_run.stopped_early:
        return RecurrentTrainResult(genotype, parameters, float("nan"), history, run_dir, stopped_early=True)
    last = snapshot(model)
    model.load_state_dict(optimizer.best)
    test_loss = evaluate(model, batchify(corpus.test, config.test_batch_size), config.bptt)
    model.load_state_dict(last)
    summary = {"parameters": parameters, "best_val_ppl": perplexity(optimizer.best_loss), "test_loss": test_loss,
               "test_ppl": perplexity(test_loss), "averaged": optimizer.averaging}  # fmt: skip
    atomic_write_text(run_dir / "result.json", json.dumps(summary, indent=2) + "\n")
    train_run.save(complete=True)
    plot_recurrent_run(run_dir / "metrics.jsonl", run_dir)
    print(f"test perplexity: {summary['test_ppl']:.2f} (best validation {summary['best_val_ppl']:.2f}; "
          f"{parameters / 1e6:.3f} M parameters)\nrun directory: {run_dir}")  # fmt: skip
    return RecurrentTrainResult(genotype, parameters, summary["test_ppl"], history, run_dir)


SUMMARY_KEYS = ("val_loss", "val_ppl", "train_loss")


def main(argv=None) -> int:
    return entry_point(RecurrentTrainConfig, run, argv, "python -m fastdarts.train --space rnn",
                       "Train a found recurrent cell from scratch.", SUMMARY_KEYS)  # fmt: skip
