"""What every architecture-search method provides to the supernet and the search loop.

A method declares its candidate ops by name (`primitives`, a subset of space.PRIMITIVES in any
order), and turns each cell type's architecture parameters (`[num_edges, len(primitives)]`, keyed
"normal" and "reduce", columns in `primitives` order) into the edge weights of one forward pass, and
may add a regulariser to the architecture loss. The supernet maps the columns onto its mixed ops by
name; the supernet and the bilevel optimizer use only this interface.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from ..space import PRIMITIVES, Edge


class NetworkStyle(NamedTuple):
    """How a method's search network differs from DARTS's (METHOD.md 2.4); the defaults are DARTS's.

    running_statistics: the cells' BNs keep running statistics for evaluation; False: they normalise with
        the batch's statistics in evaluation too (a network whose ops are sampled anew each forward pass
        has no single set of statistics to keep).
    head_bn_relu: a BN and a ReLU between the last cell and the global pooling.
    pool_bn: an affine-free BN after each pooling candidate of the mixed ops.
    auxiliary_skip: every edge carries an auxiliary skip connection besides its ops (DARTS-), weighted by
        `Method.auxiliary_skip()`: the identity on stride-1 edges, a FactorizedReduce of its own on stride-2
        edges.
    """

    running_statistics: bool = True
    head_bn_relu: bool = False
    pool_bn: bool = True
    auxiliary_skip: bool = False


class CellWeights(NamedTuple):
    """One cell type's edge weights for one forward pass.

    weights: `[num_edges, len(primitives)]`, the weight of every op of the method on every edge.
    mask: None to compute every op, or 0/1 of the same shape: only the ops marked 1 are computed
        (the others' weights are 0).
    """

    weights: Tensor
    mask: Tensor | None = None


def edge_entropy(weights: Tensor) -> float:
    """Mean over edges of the entropy (nats) of the op distribution on that edge."""
    p = weights.detach().clamp_min(1e-12)
    return float(-(p * p.log()).sum(-1).mean())


def check_epoch(epoch: int, epochs: int) -> None:
    if not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not (isinstance(epoch, int) and 0 <= epoch < epochs):
        raise ValueError(f"epoch must be an integer in 0..{epochs - 1}, got {epoch!r}")


class Method(ABC):
    """An architecture-search method: edge weights, an optional regulariser, the genotype rule."""

    name: ClassVar[str]
    # The order of one search step: DARTS updates the architecture first, PR-DARTS the weights.
    weight_step_first: ClassVar[bool] = False
    # True when every forward pass draws new random edge weights (then the finite-difference
    # second-order step, which compares several forward passes, does not apply).
    samples_each_forward: ClassVar[bool] = False
    # The search network the method's published code trains (an instance attribute may override it).
    network_style: NetworkStyle = NetworkStyle()
    # The candidate ops by name, in the column order of the architecture parameters (an instance attribute
    # may override it): a subset of space.PRIMITIVES in any order; the supernet never computes the others.
    primitives: tuple[str, ...] = PRIMITIVES

    def initial_arch(self, num_edges: int) -> Tensor:
        """One cell type's architecture parameters at the start, `[num_edges, len(primitives)]`
        (DARTS: 1e-3 N(0, 1), drawn from torch's global generator)."""
        return 1e-3 * torch.randn(num_edges, len(self.primitives))

    @abstractmethod
    def forward_weights(self, arch: Mapping[str, Tensor]) -> dict[str, CellWeights]:
        """The edge weights of one forward pass for each cell type of `arch` (name -> parameters)."""

    @abstractmethod
    def edge_weights(self, alpha: Tensor) -> Tensor:
        """A deterministic per-edge distribution over the ops, for the genotype and the diagnostics."""

    @abstractmethod
    def derive_cell(self, alpha: Tensor, steps: int) -> tuple[Edge, ...]:
        """The discrete cell of one cell type's parameters, as (op, input) pairs, two per node."""

    def weight_step(self, model, batch: tuple[Tensor, Tensor], loss_fn) -> AbstractContextManager:
        """A context around the forward pass of each weight step (the weights' SGD step on the training `batch`
        of `model`, the SearchNetwork, with `loss_fn`): what the method changes in that forward alone. DARTS:
        nothing; SDARTS: the edge weights, perturbed."""
        return contextlib.nullcontext()

    def auxiliary_skip(self) -> float | None:
        """The weight of every edge's auxiliary skip in the next forward passes (a constant: no gradient), for a
        method whose network_style has one (its forward weights then have no mask); None for none."""
        return None

    def cell_concat(self, cell: Sequence[Edge], steps: int, multiplier: int) -> list[int]:
        """The nodes whose outputs the derived `cell` concatenates: the last `multiplier` (DARTS)."""
        return list(range(2 + steps - multiplier, steps + 2))

    def regulariser(self) -> Tensor | None:
        """The term added to the architecture loss for the last forward pass; None when there is none."""
        return None

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Per-epoch settings (for example a temperature) for 0-based `epoch` of `epochs`."""
        check_epoch(epoch, epochs)

    def epoch_settings(self) -> dict[str, float]:
        """The per-epoch settings in force (after `set_epoch`), to log with the epoch."""
        return {}

    def diagnostics(self, arch: Mapping[str, Tensor]) -> dict[str, float]:
        """Per-epoch figures to log: `entropy_<cell type>` of the edge weights, plus the method's own."""
        return {f"entropy_{cell}": edge_entropy(self.edge_weights(alpha)) for cell, alpha in arch.items()}

    def state_dict(self) -> dict:
        """Every piece of mutable state, so a search can resume bit for bit."""
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        check_state_keys(self, state, set())


def check_state_keys(method: Method, state: Mapping, expected: set[str]) -> None:
    if not isinstance(state, Mapping) or set(state) != expected:
        got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"{method.name} state must have the keys {sorted(expected)}, got {got}")
