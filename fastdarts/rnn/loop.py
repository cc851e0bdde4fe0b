"""What the recurrent search and training runs share: the config fields, the epoch's batches of a token
stream, the hidden states carried from step to step, the perplexity evaluation, the weight step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..bilevel import sgd_step
from ..config import RunOptions, option
from ..distributed import world
from ..errors import ConfigError, DataError
from .data import Corpus, get_batch, load_corpus


@dataclass
class LanguageModelConfig(RunOptions):
    """DARTS's flags common to rnn/train_search.py and rnn/train.py (RNN.md 2.6)."""

    space: str = option("rnn", "search space: rnn, DARTS's recurrent cell on word-level language modelling",
                        choices=("rnn",))  # fmt: skip
    data: str | None = option(None, "directory with train.txt, valid.txt, test.txt (DARTS's data/penn) or "
                              "ptb.train.txt, ptb.valid.txt, ptb.test.txt (default: the bundled pydoc "
                              "corpus)")  # fmt: skip
    lr: float | None = option(None, "SGD learning rate of the weights, scaled by seq_len / bptt each step "
                              "(default: DARTS's 20)", low=0, low_open=True)  # fmt: skip
    clip: float = option(0.25, "gradient-norm clip of the weights", low=0, low_open=True)
    bptt: int = option(35, "sequence length", low=2)
    dropout: float = option(0.75, "locked dropout on the cell's outputs", low=0, high=1, high_open=True)
    dropouth: float = option(0.25, "dropout on the hidden states fed to the cell's matrices", low=0, high=1,
                             high_open=True)  # fmt: skip
    dropoutx: float = option(0.75, "dropout on the cell's input in node 0", low=0, high=1, high_open=True)
    dropouti: float = option(0.2, "locked dropout on the embedding's outputs", low=0, high=1, high_open=True)
    beta: float = option(1e-3, "temporal activation regularisation (slowness) of the cell's outputs", low=0)
    eval_batch_size: int = option(10, "batch size of the validation perplexity", low=1)
    test_batch_size: int = option(1, "batch size of the test perplexity", low=1)
    device: str = option("cpu", "where the network computes: cpu (the recurrent runs have no GPU path yet)",
                         choices=("cpu",))  # fmt: skip

    BUNDLED_LR, PTB_LR = 20.0, 20.0

    def preset(self) -> dict:
        # The bundled corpus is 1/18 of PTB: at DARTS's batch 256 its validation stream would be shorter than bptt.
        if self.data is None:
            return {"batch_size": self.BUNDLED_BATCH, "lr": self.BUNDLED_LR}
        return {"batch_size": self.PTB_BATCH, "lr": self.PTB_LR}

    def check(self) -> None:
        if self.emsize != self.nhid:
            raise ConfigError(f"the decoder is tied to the embedding: emsize ({self.emsize}) must equal nhid "
                              f"({self.nhid})")  # fmt: skip
        if world().size > 1:
            raise ConfigError("the recurrent search and training run in one process (not under torchrun)")


def load(config, search: bool = False) -> Corpus:
    """The corpus of `config`, checked to make at least two rows of every stream the run batches (the search also
    batches the validation split at `batch_size`, for its alpha steps)."""
    corpus = load_corpus(config.data)
    streams = [("train", corpus.train, config.batch_size), ("valid", corpus.valid, config.eval_batch_size),
               ("test", corpus.test, config.test_batch_size)]  # fmt: skip
    if search:
        streams.append(("valid", corpus.valid, config.batch_size))
    for split, tokens, batch_size in streams:
        if len(tokens) // batch_size < 2:
            raise DataError(f"{corpus.source}: the {split} split ({len(tokens)} tokens) makes fewer than 2 rows at "
                            f"batch size {batch_size}")  # fmt: skip
    return corpus


def describe(corpus: Corpus) -> str:
    return (f"{corpus.source}: {len(corpus.dictionary)} words, {len(corpus.train)}/{len(corpus.valid)}/"
            f"{len(corpus.test)} tokens")  # fmt: skip


def epoch_batches(rows: int, batch_size: int, bptt: int, generator: torch.Generator, jitter: float = 0.0,
                  max_seq_len: int | None = None) -> list[torch.Tensor]:  # fmt: skip
    """One epoch's batches of a `(rows, batch_size)` stream, each the flat positions of its rows (`seq_len *
    batch_size` of them, so a batch's length counts its tokens). DARTS's sequence lengths: `bptt`, or half of it
    with probability 0.05; with `jitter`, a normal draw of that standard deviation around it, at least 5 and at
    most `max_seq_len` (rnn/train.py). The last batch stops at the stream's end."""
    batches, i = [], 0
    while i < rows - 2:
        base = bptt if torch.rand((), generator=generator) < 0.95 else bptt / 2
        seq_len = int(base)
        if jitter:
            seq_len = max(5, int(base + jitter * torch.randn((), generator=generator, dtype=torch.float64)))
            seq_len = min(seq_len, max_seq_len)
        length = min(seq_len, rows - 1 - i)
        batches.append(torch.arange(i * batch_size, (i + length) * batch_size))
        i += seq_len
    return batches


def rows_of(data: torch.Tensor, positions: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The first row of a batch of `epoch_batches`, its tokens `(L, B)` and the next word of each `(L*B,)`."""
    batch_size = data.shape[1]
    flat = data.view(-1)
    return int(positions[0]) // batch_size, flat[positions].view(-1, batch_size), flat[positions + batch_size]


class CarriedHidden:
    """The hidden states carried from one step to the next (detached), zero at each epoch's start; in the
    checkpoint, so that a run resumed midway continues with them."""

    def __init__(self, **states: torch.Tensor):
        self.initial = states
        self.reset()

    def reset(self) -> None:
        self.states = {name: s.clone() for name, s in self.initial.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.states[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.states[name] = value.detach()

    def state_dict(self) -> dict:
        return dict(self.states)

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.initial) or any(state[k].shape != v.shape for k, v in self.initial.items()):
            raise ValueError(f"hidden states must be {', '.join(self.initial)} of the run's shapes")
        self.states = dict(state)


@torch.no_grad()
def evaluate(model, data: torch.Tensor, bptt: int) -> float:
    """The mean loss (nats per token) over a `(rows, B)` stream in eval mode, hidden state carried over."""
    was_training = model.training
    model.eval()
    hidden = model.init_hidden(data.shape[1])
    total, count = 0.0, 0
    for i in range(0, len(data) - 1, bptt):
        x, y = get_batch(data, i, bptt)
        out = model(x, hidden, y)
        hidden = out.hidden
        total += out.loss.item() * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / count


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def temporal_activation_regularisation(raw: torch.Tensor, beta: float) -> torch.Tensor:
    """`beta * mean((h_{t+1} - h_t)^2)` over the raw (undropped) outputs `(T, B, H)` (TAR)."""
    if beta == 0 or len(raw) < 2:
        return raw.new_zeros(())
    return beta * (raw[1:] - raw[:-1]).pow(2).mean()


def lm_weight_step(model, optimizer, x, y, hidden, lr: float, config) -> tuple[torch.Tensor, int, torch.Tensor]:
    """One SGD step on the training batch at learning rate `lr` (the optimizer's own is restored): the loss plus
    TAR, the gradient clipped to `config.clip`, then the weight decay in the optimizer. Returns the loss, the
    correctly predicted tokens and the new hidden state."""
    group = optimizer.param_groups[0]
    base_lr, group["lr"] = group["lr"], lr
    try:
        optimizer.zero_grad(set_to_none=True)
        out = model(x, hidden, y)
        tar = temporal_activation_regularisation(out.raw, config.beta)
        sgd_step(optimizer, model.weight_parameters(), out.loss + tar, config.clip)
    finally:
        group["lr"] = base_lr
    return out.loss.detach(), int(out.correct), out.hidden.detach()
