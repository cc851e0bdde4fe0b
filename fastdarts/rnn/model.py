"""The recurrent search and evaluation models (RNN.md 1): DARTS's cell unrolled over a sequence between a
tied embedding and decoder.

Node 0 is a highway of x_t and h_{t-1}; node n (1..8) mixes every earlier node j through one matrix
W_n: `[c_j | h_j] = (s_j * m_h) @ W_n` (one matmul for all j) and `x_n = sum_j sum_{k != none} p_jk (s_j +
sigmoid(c_j) (f_k(h_j) - s_j))` (fused: fastdarts.rnn.node; or DARTS's eager computation, `fused=False`).
In search one BatchNorm (no affine, one set of running statistics) normalises node 0 and every x_n; the
cell's output is the mean of nodes 1..8. Every dropout mask is drawn once per forward call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..methods import Method, make_method
from .decoder import linear_cross_entropy
from .genotype import PRIMITIVES, STEPS, RecurrentGenotype, derive_recurrent, row
from .node import FusedNode

INIT_RANGE = 0.04  # U(-0.04, 0.04) for every matrix and the embedding (model.py:11,123)
ACTIVATION_FUNCTIONS = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "identity": lambda h: h}


def bernoulli_mask(like: Tensor, shape: tuple[int, ...], drop: float) -> Tensor:
    """An inverted dropout mask: 0 with probability `drop`, else 1 / (1 - drop)."""
    keep = 1.0 - drop
    return like.new_empty(shape).bernoulli_(keep) / keep


def locked_dropout(x: Tensor, drop: float, training: bool) -> Tensor:
    """One mask `(1, B, D)` for every time step of `x` `(T, B, D)`."""
    if not training or drop == 0:
        return x
    return x * bernoulli_mask(x, (1, *x.shape[1:]), drop)


def uniform_matrix(rows: int, cols: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(rows, cols).uniform_(-INIT_RANGE, INIT_RANGE))


class RecurrentCell(nn.Module):
    """What the search and evaluation cells share: node 0, the masks, the loop over time."""

    def __init__(self, ninp: int, nhid: int, dropouth: float, dropoutx: float, steps: int):
        super().__init__()
        self.nhid, self.dropouth, self.dropoutx = nhid, dropouth, dropoutx
        self.W0 = uniform_matrix(ninp + nhid, 2 * nhid)
        self.Ws = nn.ParameterList([uniform_matrix(nhid, 2 * nhid) for _ in range(steps)])

    def forward(self, inputs: Tensor, hidden: Tensor, probabilities: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """inputs `(T, B, ninp)`, hidden `(1, B, H)` -> the outputs `(T, B, H)` and the last one `(1, B, H)`."""
        batch = inputs.shape[1]
        x_mask = h_mask = None
        if self.training:  # one mask per forward call, shared by every time step (and every node for m_h)
            x_mask = bernoulli_mask(inputs, (batch, inputs.shape[2]), self.dropoutx)
            h_mask = bernoulli_mask(inputs, (batch, self.nhid), self.dropouth)
        h = hidden[0]
        outputs = []
        for x in inputs:
            h = self.step(x, h, x_mask, h_mask, probabilities)
            outputs.append(h)
        return torch.stack(outputs), h.unsqueeze(0)

    def node0(self, x: Tensor, h_prev: Tensor, x_mask: Tensor | None, h_mask: Tensor | None) -> Tensor:
        xh = torch.cat([x, h_prev] if x_mask is None else [x * x_mask, h_prev * h_mask], dim=-1)
        c0, h0 = (xh @ self.W0).chunk(2, dim=-1)
        return h_prev + torch.sigmoid(c0) * (torch.tanh(h0) - h_prev)  # the residual uses the unmasked h_{t-1}


class SearchCell(RecurrentCell):
    """Every node mixes every earlier node with the op weights of its rows of alpha (RNN.md 1.4)."""

    def __init__(self, ninp: int, nhid: int, dropouth: float, dropoutx: float, steps: int = STEPS,
                 fused: bool = True):  # fmt: skip
        super().__init__(ninp, nhid, dropouth, dropoutx, steps)
        self.steps, self.fused = steps, fused
        self.bn = nn.BatchNorm1d(nhid, affine=False)  # one module: all nodes share its running statistics

    def step(self, x, h_prev, x_mask, h_mask, probabilities):
        states = [self.bn(self.node0(x, h_prev, x_mask, h_mask))]
        for n, W in enumerate(self.Ws, start=1):
            p = probabilities[row(n, 0) : row(n, n)]
            node = FusedNode.apply(p, W, h_mask, *states) if self.fused else eager_node(states, W, h_mask, p)
            states.append(self.bn(node))
        return torch.stack(states[1:]).mean(dim=0)


def eager_node(states: list[Tensor], W: Tensor, h_mask: Tensor | None, p: Tensor) -> Tensor:
    """DARTS's own computation of a node (rnn/model_search.py:23-38): every op's highway update as a tensor of its
    own, then their weighted sum. The eager baseline of the fused node."""
    s = torch.stack(states)
    c, h = ((s if h_mask is None else s * h_mask) @ W).chunk(2, dim=-1)
    c = torch.sigmoid(c)
    x = torch.zeros_like(states[0])
    for k, name in enumerate(PRIMITIVES):
        if name != "none":
            x = x + torch.sum(p[:, k, None, None] * (s + c * (ACTIVATION_FUNCTIONS[name](h) - s)), dim=0)
    return x


class GenotypeCell(RecurrentCell):
    """A fixed cell: node n applies its op to its one predecessor; no BN (RNN.md 1.7)."""

    def __init__(self, ninp: int, nhid: int, dropouth: float, dropoutx: float, genotype: RecurrentGenotype):
        super().__init__(ninp, nhid, dropouth, dropoutx, len(genotype.recurrent))
        self.genotype = genotype

    def step(self, x, h_prev, x_mask, h_mask, probabilities=None):
        states = [self.node0(x, h_prev, x_mask, h_mask)]
        for (op, pred), W in zip(self.genotype.recurrent, self.Ws):
            s = states[pred]
            c, h = ((s if h_mask is None else s * h_mask) @ W).chunk(2, dim=-1)
            states.append(s + torch.sigmoid(c) * (ACTIVATION_FUNCTIONS[op](h) - s))
        return torch.stack([states[i] for i in self.genotype.concat]).mean(dim=0)


class LMOutput(NamedTuple):
    logits: Tensor | None
    loss: Tensor | None
    correct: Tensor | None
    hidden: Tensor
    raw: Tensor


class RecurrentLM(nn.Module):
    """Embedding, one recurrent cell, decoder tied to the embedding (RNN.md 1.5)."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, cell: RecurrentCell, *, dropout: float = 0.75,
                 dropouti: float = 0.2, dropoute: float = 0.0):  # fmt: skip
        super().__init__()
        if ninp != nhid:
            raise ValueError(f"the tied decoder needs emsize == nhid, got {ninp} and {nhid}")
        self.ntoken, self.nhid = ntoken, nhid
        self.dropout, self.dropouti, self.dropoute = dropout, dropouti, dropoute
        self.encoder = nn.Embedding(ntoken, ninp)
        self.cell = cell
        self.decoder = nn.Linear(ninp, ntoken)
        self.decoder.weight = self.encoder.weight
        with torch.no_grad():
            self.encoder.weight.uniform_(-INIT_RANGE, INIT_RANGE)
            self.decoder.bias.zero_()

    def init_hidden(self, batch_size: int) -> Tensor:
        return self.encoder.weight.new_zeros(1, batch_size, self.nhid)

    def forward(self, tokens: Tensor, hidden: Tensor, targets: Tensor | None = None) -> LMOutput:
        """tokens `(T, B)`: the logits `(T*B, V)`, or with `targets` `(T*B,)` the mean loss and the correct
        predictions instead (fastdarts.rnn.decoder: no logits kept for backward); the new hidden state; the cell's
        raw outputs `(T, B, H)`."""
        weight = self.encoder.weight
        if self.training and self.dropoute:  # word-type dropout: whole rows of the embedding
            weight = weight * bernoulli_mask(weight, (weight.shape[0], 1), self.dropoute)
        embedded = locked_dropout(F.embedding(tokens, weight), self.dropouti, self.training)
        raw, hidden = self.cell(embedded, hidden, self.cell_probabilities())
        features = locked_dropout(raw, self.dropout, self.training).view(-1, raw.shape[-1])
        if targets is None:
            return LMOutput(self.decoder(features), None, None, hidden, raw)
        loss, correct = linear_cross_entropy(features, self.decoder.weight, self.decoder.bias, targets)
        return LMOutput(None, loss, correct, hidden, raw)

    def cell_probabilities(self) -> Tensor | None:
        return None

    def weight_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def parameter_count(self) -> int:
        """As DARTS counts it: every weight once (the tied matrix once), no architecture parameter."""
        return sum(p.numel() for p in self.weight_parameters())


class RecurrentSearchModel(RecurrentLM):
    """The search model: the searched cell, and alpha `[36, 5]` (1e-3 N(0, 1)), turned into op weights by a
    method (fastdarts.methods; DARTS: the softmax of each row). `fused`: the nodes run fastdarts.rnn.node (else
    DARTS's eager computation)."""

    def __init__(self, ntoken: int, ninp: int = 300, nhid: int = 300, *, dropout: float = 0.75,
                 dropouth: float = 0.25, dropoutx: float = 0.75, dropouti: float = 0.2, dropoute: float = 0.0,
                 method: Method | None = None, steps: int = STEPS, fused: bool = True):  # fmt: skip
        cell = SearchCell(ninp, nhid, dropouth, dropoutx, steps, fused)
        super().__init__(ntoken, ninp, nhid, cell, dropout=dropout,
                         dropouti=dropouti, dropoute=dropoute)  # fmt: skip
        self.method = method if method is not None else make_method("darts")
        self.steps = steps
        self.alpha = nn.Parameter(1e-3 * torch.randn(steps * (steps + 1) // 2, len(PRIMITIVES)))

    def arch(self) -> Mapping[str, Tensor]:
        return {"recurrent": self.alpha}

    def cell_probabilities(self) -> Tensor:
        weights = self.method.forward_weights(self.arch())["recurrent"]
        if weights.mask is not None:
            raise ValueError(f"the recurrent cell computes every op; method {self.method.name} samples a subset")
        return weights.weights

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha]

    def named_weight_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p is not self.alpha]

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_weight_parameters()]

    def regulariser(self) -> Tensor | None:
        return self.method.regulariser()

    def edge_weights(self) -> Tensor:
        return self.method.edge_weights(self.alpha)

    def genotype(self) -> RecurrentGenotype:
        return derive_recurrent(self.edge_weights(), self.steps)


class RecurrentEvalModel(RecurrentLM):
    """The evaluation model of a found cell (DARTS's train.py defaults: 850 units, dropoute 0.1)."""

    def __init__(self, ntoken: int, genotype: RecurrentGenotype, ninp: int = 850, nhid: int = 850, *,
                 dropout: float = 0.75, dropouth: float = 0.25, dropoutx: float = 0.75, dropouti: float = 0.2,
                 dropoute: float = 0.1):  # fmt: skip
        super().__init__(ntoken, ninp, nhid, GenotypeCell(ninp, nhid, dropouth, dropoutx, genotype), dropout=dropout,
                         dropouti=dropouti, dropoute=dropoute)  # fmt: skip
        self.genotype = genotype
