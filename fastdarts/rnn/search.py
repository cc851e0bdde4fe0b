"""`python -m fastdarts.search --space rnn`: DARTS's recurrent cell search (RNN.md 2.1-2.4), or `run(config)`.

Each step first updates alpha on a batch of the validation stream (always `bptt` long, at the training
position modulo the stream's rows, with its own carried hidden state), then the weights on the next training
batch (`bptt`, or half of it with probability 0.05, the learning rate scaled by its length). Every forward
pass is in training mode: dropout and the cell's batch statistics are on in the alpha step too. The epoch ends
with the validation perplexity (batch `eval_batch_size`). Logs, checkpoints, resume and signals are the CNN
search's (fastdarts.runloop); the end writes `genotype.json` and `genotype.txt` (DARTS's format).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.func import functional_call

from ..bilevel import check_finite, frozen
from ..checkpoint import atomic_write_text
from ..config import option
from ..methods import make_method
from ..runloop import Run, check_network_fits, entry_point, make_run_dir, seed_everything, start_config
from .data import batchify, get_batch
from .genotype import RecurrentGenotype
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
from .model import RecurrentSearchModel
from .plots import plot_recurrent_run


@dataclass
class RecurrentSearchConfig(LanguageModelConfig):
    """DARTS's rnn/train_search.py flags and defaults."""

    emsize: int = option(300, "embedding size (equal to nhid: the decoder is tied)", low=1)
    nhid: int = option(300, "hidden units of the cell", low=1)
    lr: float | None = option(None, "SGD learning rate of the weights, scaled by seq_len / bptt each step "
                              "(default: 5 on the bundled corpus, DARTS's 20 with --data)", low=0,
                              low_open=True)  # fmt: skip
    batch_size: int | None = option(None, "batch size (default: 32 on the bundled corpus, 256 with --data)", low=1)
    epochs: int = option(50, "number of epochs", low=1)
    dropoute: float = option(0.0, "word-type dropout of the embedding's rows", low=0, high=1, high_open=True)
    wdecay: float = option(5e-7, "weight decay of the weights", low=0)
    seed: int = option(3, "random seed", low=0, high=2**32 - 1)
    method: str = option("darts", "search method (darts: the softmax of each row of alpha)", choices=("darts",))
    arch_lr: float = option(3e-3, "Adam learning rate of alpha", low=0, low_open=True)
    arch_wdecay: float = option(1e-3, "weight decay (L2, in Adam) of alpha", low=0)
    unrolled: bool = option(False, "second-order (unrolled) alpha gradient")
    eager_node: bool = option(False, "compute each node as DARTS's code does (every op's update a tensor of its "
                              "own) instead of the fused node: the same values, 5x the memory kept for "
                              "backward")  # fmt: skip
    hessian_r: float = option(0.01, "second order: the finite-difference step of the Hessian-vector product",
                              low=0, low_open=True)  # fmt: skip

    hvp_masks: str = option("fresh", "second order: the dropout masks of the two Hessian-vector product passes: "
                            "fresh (DARTS: each pass draws its own, so the difference is mostly mask noise) or "
                            "shared (both passes draw the same)", choices=("fresh", "shared"))  # fmt: skip

    BUNDLED_BATCH, PTB_BATCH = 32, 256
    # At 20 on the bundled corpus the training-mode loss rises above a uniform prediction's (DARTS's own code does
    # the same; README, "The recurrent cell search"); at 5 it falls.
    BUNDLED_LR, PTB_LR = 5.0, 20.0


class RecurrentArchitect:
    """Adam on alpha (betas 0.9, 0.999; coupled weight decay) with DARTS's recurrent first- and second-order
    gradients (RNN.md 2.2, 2.3). The losses are the plain NLL (no TAR) plus the method's regulariser."""

    def __init__(self, model: RecurrentSearchModel, config: RecurrentSearchConfig):
        self.model, self.config = model, config
        self.optimizer = torch.optim.Adam(model.arch_parameters(), lr=config.arch_lr, weight_decay=config.arch_wdecay)

    def loss(self, x, y, hidden, params=None) -> tuple[torch.Tensor, torch.Tensor]:
        args = (x, hidden, y)
        out = self.model(*args) if params is None else functional_call(self.model, params, args)
        return out.loss, out.hidden

    def objective(self, x, y, hidden, params=None) -> tuple[torch.Tensor, torch.Tensor]:
        loss, hidden = self.loss(x, y, hidden, params)
        regulariser = self.model.regulariser()
        return (loss if regulariser is None else loss + regulariser), hidden

    def step(self, train, val, hidden_train, hidden_valid, lr: float) -> torch.Tensor:
        """One Adam step of alpha; `train` and `val` are (tokens, targets), `lr` the step's weight learning rate.
        Returns the validation hidden state to carry."""
        if self.config.unrolled:
            grads, hidden_valid = self.second_order_grads(train, val, hidden_train, hidden_valid, lr)
        else:
            with frozen(self.model.weight_parameters()):
                loss, hidden_valid = self.objective(*val, hidden_valid)
                check_finite(loss, "the validation loss")
                grads = torch.autograd.grad(loss, self.model.arch_parameters())
        check_finite(torch.stack([g.norm() for g in grads]), "the architecture gradient")
        for p, g in zip(self.model.arch_parameters(), grads):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return hidden_valid.detach()

    def second_order_grads(self, train, val, hidden_train, hidden_valid, lr: float):
        """`grad_alpha L_val(w') - lr * kappa * H v` as DARTS's rnn/architect.py computes it: w' is one clipped SGD
        step with weight decay; kappa = clip / (||g|| + 1e-6) is not capped at 1; v is clipped to `clip`."""
        arch, clip = self.model.arch_parameters(), self.config.clip
        names, weights = zip(*self.model.named_weight_parameters())
        with frozen(arch):
            train_loss, _ = self.loss(*train, hidden_train)
            grads = torch.autograd.grad(train_loss, weights, materialize_grads=True)
        check_finite(train_loss, "the training loss")
        kappa = clip / (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) + 1e-6)
        with torch.no_grad():
            scale = torch.clamp(kappa, max=1.0)
            virtual = [(w - lr * (scale * g + self.config.wdecay * w)).requires_grad_() for w, g in zip(weights, grads)]
        # The virtual model's BN running statistics are a copy that is thrown away, as DARTS's unrolled model's.
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        val_loss, hidden_valid = self.objective(*val, hidden_valid, {**dict(zip(names, virtual)), **buffers})
        check_finite(val_loss, "the validation loss")
        grads = torch.autograd.grad(val_loss, [*arch, *virtual], materialize_grads=True)
        arch_grads, v = grads[: len(arch)], grads[len(arch) :]
        # clip_grad_norm_'s scaling, on the gradient tensors themselves (clip_grads_with_norm_ reads .grad, which
        # they lack: it would leave v as it is)
        v_scale = torch.clamp(clip / (torch.nn.utils.get_total_norm(v) + 1e-6), max=1.0)
        v = [g * v_scale for g in v]
        implicit = self.hessian_vector_product(train, hidden_train, names, weights, v)
        return [g - lr * kappa * h for g, h in zip(arch_grads, implicit)], hidden_valid

    def hessian_vector_product(self, train, hidden, names, weights, v) -> list[torch.Tensor]:
        """`(grad_alpha L_train(w + eps v) - grad_alpha L_train(w - eps v)) / (2 eps)`, `eps = r / ||v||`; both
        passes update the BN running statistics, as DARTS's do, and draw their own dropout masks (`hvp_masks`
        fresh, DARTS's) or the same ones (shared: the random state restored before the second pass)."""
        arch = self.model.arch_parameters()
        eps = self.config.hessian_r / torch.nn.utils.get_total_norm(v)
        grads = []
        masks = torch.get_rng_state()
        for sign in (1.0, -1.0):
            if sign < 0 and self.config.hvp_masks == "shared":
                torch.set_rng_state(masks)
            with torch.no_grad():
                perturbed = {n: w + sign * eps * t for n, w, t in zip(names, weights, v)}
            loss, _ = self.loss(*train, hidden, perturbed)
            grads.append(torch.autograd.grad(loss, arch, materialize_grads=True))
        return [(gp - gm) / (2 * eps) for gp, gm in zip(*grads)]


class RecurrentSearchTask:
    def __init__(self, config: RecurrentSearchConfig, corpus, model: RecurrentSearchModel, optimizer,
                 architect: RecurrentArchitect, hidden: CarriedHidden):  # fmt: skip
        self.config, self.model, self.optimizer, self.architect, self.hidden = (
            config,
            model,
            optimizer,
            architect,
            hidden,
        )
        self.train_data = batchify(corpus.train, config.batch_size)
        self.search_data = batchify(corpus.valid, config.batch_size)  # the alpha steps' stream
        self.val_data = batchify(corpus.valid, config.eval_batch_size)

    def batches(self, generator):
        return epoch_batches(len(self.train_data), self.config.batch_size, self.config.bptt, generator)

    def inputs(self, epoch, batches, start):
        if start == 0:  # a new epoch starts from zero hidden states; one resumed midway from the saved ones
            self.hidden.reset()
        for positions in batches[start:]:
            i, x, y = rows_of(self.train_data, positions)
            yield (x, y), get_batch(self.search_data, i % (len(self.search_data) - 1), self.config.bptt)

    def begin_epoch(self, epoch: int) -> dict:
        self.model.method.set_epoch(epoch, self.config.epochs)
        self.model.train()
        return {"lr": self.config.lr, **self.model.method.epoch_settings()}

    def step(self, inputs):
        train, val = inputs
        lr = self.config.lr * len(train[0]) / self.config.bptt
        self.hidden["valid"] = self.architect.step(train, val, self.hidden["train"], self.hidden["valid"], lr)
        loss, correct, self.hidden["train"] = lm_weight_step(self.model, self.optimizer, *train, self.hidden["train"],
                                                             lr, self.config)  # fmt: skip
        return loss, correct

    def end_epoch(self, epoch: int) -> dict:
        val_loss = evaluate(self.model, self.val_data, self.config.bptt)
        genotype = self.model.genotype()
        weights = self.model.edge_weights().detach().tolist()
        diagnostics = self.model.method.diagnostics(self.model.arch())
        return {"val_loss": val_loss, "val_ppl": perplexity(val_loss), **diagnostics, "genotype": str(genotype),
                "weights_recurrent": weights}  # fmt: skip

    def announce(self, r: dict) -> str:
        return (f"epoch {r['epoch']}: train loss {r['train_loss']:.4f} ppl {perplexity(r['train_loss']):.2f} | "
                f"val loss {r['val_loss']:.4f} ppl {r['val_ppl']:.2f} | entropy {r['entropy_recurrent']:.4f} | "
                f"{r['seconds']:.1f}s" + (f" | {r['skipped_steps']} steps skipped (non-finite)"
                                          if r["skipped_steps"] else "") + f"\n  {r['genotype']}")  # fmt: skip


@dataclass
class RecurrentSearchResult:
    genotype: RecurrentGenotype
    history: list[dict]
    run_dir: Path
    stopped_early: bool = False


def build(config: RecurrentSearchConfig, ntoken: int) -> RecurrentSearchModel:
    return RecurrentSearchModel(ntoken, config.emsize, config.nhid, dropout=config.dropout, dropouth=config.dropouth,
                                dropoutx=config.dropoutx, dropouti=config.dropouti, dropoute=config.dropoute,
                                method=make_method(config.method), fused=not config.eager_node)  # fmt: skip


def run(config: RecurrentSearchConfig | None = None, *, resume: str | Path | None = None,
        **overrides) -> RecurrentSearchResult:  # fmt: skip
    """Run a recurrent search; `overrides` set config fields by name; `resume` continues a saved run exactly."""
    config, checkpoint = start_config(RecurrentSearchConfig, "search", config, resume, **overrides)
    seed_everything(config.seed)
    corpus = load(config, search=True)
    check_network_fits(functools.partial(build, config, len(corpus.dictionary)), config, "nhid", "emsize")
    run_dir = Path(resume) if resume is not None else make_run_dir(config.out, "search")
    model = build(config, len(corpus.dictionary))
    optimizer = torch.optim.SGD(model.weight_parameters(), config.lr, weight_decay=config.wdecay)
    architect = RecurrentArchitect(model, config)
    hidden = CarriedHidden(train=model.init_hidden(config.batch_size), valid=model.init_hidden(config.batch_size))
    generator = torch.Generator().manual_seed(config.seed)
    stateful = {"model": model, "weight_optimizer": optimizer, "arch_optimizer": architect.optimizer,
                "method": model.method, "hidden": hidden}  # fmt: skip
    search_run = Run("search", config, run_dir, stateful, generator, checkpoint)
    if checkpoint is None:
        search_run.say(f"{describe(corpus)}; search model {model.parameter_count() / 1e6:.3f} M parameters")
    history = search_run.loop(RecurrentSearchTask(config, corpus, model, optimizer, architect, hidden))
    genotype = model.genotype()
    if search_run.stopped_early:
        return RecurrentSearchResult(genotype, history, run_dir, stopped_early=True)
    atomic_write_text(run_dir / "genotype.json", json.dumps(genotype.to_dict(), indent=2) + "\n")
    atomic_write_text(run_dir / "genotype.txt", str(genotype) + "\n")
    search_run.save(complete=True, genotype=str(genotype))
    plot_recurrent_run(run_dir / "metrics.jsonl", run_dir)
    print(f"genotype: {genotype}\nrun directory: {run_dir}")
    return RecurrentSearchResult(genotype, history, run_dir)


SUMMARY_KEYS = ("val_loss", "val_ppl", "train_loss")


def main(argv=None) -> int:
    return entry_point(RecurrentSearchConfig, run, argv, "python -m fastdarts.search --space rnn",
                       "DARTS recurrent cell search.", SUMMARY_KEYS)  # fmt: skip
