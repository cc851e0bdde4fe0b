"""What every architecture-search method provides to the supernet and the search loop.

A method declares its candidate ops by name (`primitives`, a subset of space.PRIMITIVES in any
order), and turns each cell type's architecture parameters (`[num_edges, len(primitives)]`, keyed
"normal" and "reduce", columns in `primitives` order) into the edge weights of one forward pass, and
may add a regulariser to the architecture loss. The supernet maps the columns onto its mixed ops by
name; the supernet and the bilevel optimizer use only this interface.

Hooks whose defaults are DARTS's (no-ops), for methods that need more: `extra_arch_columns` (per-edge
parameters after the op columns), `CellWeights.mask` (ops not computed) and `.edge_scale` (a factor on an
edge's whole output), `NetworkStyle.partial_channels` (ops on a channel slice), `trains_architecture`
(a warm-up), `prepare_architecture` (changes to the parameters at an epoch's start, such as pruning),
`cell_edge_weights`/`derive_cell_of` (a cell type's own state, such as its pruned ops),
`arch_weight_decay` (the architecture optimiser's weight decay as the method's regulariser), `widens_network`
(a network whose partial channels widen during the search, with the weights' SGD restarted), `weight_step`
(a change to the weight step's forward pass), `auxiliary_skip` and `cell_concat`.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from ..space import PRIMITIVES, Edge, derive_cell_top_ops


class NetworkStyle(NamedTuple):
    """How a method's search network differs from DARTS's (METHOD.md 2.4); the defaults are DARTS's.

    running_statistics: the cells' BNs keep running statistics for evaluation; False: they normalise with
        the batch's statistics in evaluation too (a network whose ops are sampled anew each forward pass
        has no single set of statistics to keep).
    head_bn_relu: a BN and a ReLU between the last cell and the global pooling.
    pool_bn: an affine-free BN after each pooling candidate of the mixed ops.
    partial_channels: K; above 1, each edge's ops compute on the first C/K channels of its input, the others
        bypass them and the two parts are shuffled together (PC-DARTS; `ops.mixed_ops`).
    auxiliary_skip: every edge carries an auxiliary skip connection besides its ops (DARTS-), weighted by
        `Method.auxiliary_skip()`: the identity on stride-1 edges, a FactorizedReduce of its own on stride-2
        edges.
    fixed_reduction: None, or a name of space.FIXED_REDUCTION_CELLS: the reduction cells are that hand-designed
        cell, in the search network and in the genotype, and only the normal cell is searched (no `alpha_reduce`;
        GDAS's FRC).
    """

    running_statistics: bool = True
    head_bn_relu: bool = False
    pool_bn: bool = True
    partial_channels: int = 1
    auxiliary_skip: bool = False
    fixed_reduction: str | None = None


class CellWeights(NamedTuple):
    """One cell type's edge weights for one forward pass.

    weights: `[num_edges, len(primitives)]`, the weight of every op of the method on every edge.
    mask: None to compute every op, or 0/1 of the same shape: only the ops marked 1 are computed
        (the others' weights are 0).
    edge_scale: None, or `[num_edges]`: a factor on each edge's whole output (PC-DARTS's edge normalisation,
        which also scales the channels that bypass the ops).
    """

    weights: Tensor
    mask: Tensor | None = None
    edge_scale: Tensor | None = None


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
    # The search network the method's published code trains (an instance attribute or a property may override it).
    network_style: NetworkStyle = NetworkStyle()
    # True when network_style.partial_channels falls during the search (DrNAS's second stage, after the pruning of
    # `prepare_architecture`): at each epoch's start the search widens the network's mixed ops to it
    # (supernet.widen_partial_channels, drawing from the method's `generator`) and restarts the weights' SGD and its
    # cosine schedule at the initial learning rate. Its state must then say which width it has reached, so a resumed
    # search builds the network as wide.
    widens_network: bool = False
    # The candidate ops by name, in the column order of the architecture parameters (an instance attribute
    # may override it): a subset of space.PRIMITIVES in any order; the supernet never computes the others.
    primitives: tuple[str, ...] = PRIMITIVES
    # Columns of each architecture tensor after the `len(primitives)` op columns, for per-edge parameters of the
    # method's own (PC-DARTS: 1, the edge's logit beta).
    extra_arch_columns: ClassVar[int] = 0
    # The architecture optimiser's weight decay when the method sets it (DrNAS: its regulariser); None: the run's.
    arch_weight_decay: float | None = None

    def initial_arch(self, num_edges: int) -> Tensor:
        """One cell type's architecture parameters at the start, `[num_edges, len(primitives) + extra_arch_columns]`
        (DARTS: 1e-3 N(0, 1), drawn from torch's global generator)."""
        return 1e-3 * torch.randn(num_edges, len(self.primitives) + self.extra_arch_columns)

    @abstractmethod
    def forward_weights(self, arch: Mapping[str, Tensor]) -> dict[str, CellWeights]:
        """The edge weights of one forward pass for each cell type of `arch` (name -> parameters)."""

    @abstractmethod
    def edge_weights(self, alpha: Tensor) -> Tensor:
        """A deterministic per-edge distribution over the ops, for the genotype and the diagnostics."""

    @abstractmethod
    def derive_cell(self, alpha: Tensor, steps: int) -> tuple[Edge, ...]:
        """The discrete cell of one cell type's parameters, as (op, input) pairs, two per node."""

    def cell_edge_weights(self, cell: str, alpha: Tensor) -> Tensor:
        """`edge_weights` of cell type `cell` ("normal" or "reduce"): what the supernet logs and derives the
        genotype from. A method whose cell types differ by more than their parameters overrides it (DrNAS: the ops
        each type's edges keep after pruning)."""
        return self.edge_weights(alpha)

    def derive_cell_of(self, cell: str, alpha: Tensor, steps: int) -> tuple[Edge, ...]:
        """`derive_cell` of cell type `cell` (see `cell_edge_weights`)."""
        return self.derive_cell(alpha, steps)

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

    def trains_architecture(self) -> bool:
        """Whether the steps of the epoch in force (after `set_epoch`) update the architecture; False during a
        warm-up that trains the weights alone."""
        return True

    def prepare_architecture(self, arch: Mapping[str, Tensor]) -> None:
        """Changes the method makes to the architecture parameters themselves before the first step of the epoch
        in force (after `set_epoch`; DrNAS prunes each edge to its best ops at its second stage). Called again for
        an epoch resumed midway, so a change already made (and checkpointed) must not be made twice."""
        return None

    def undecided_hint(self) -> str:
        """What else, beside searching longer, lets a cell whose every edge came out `none` get an op (appended to
        the search's warning)."""
        return ""

    def epoch_settings(self) -> dict[str, float]:
        """The per-epoch settings in force (after `set_epoch`), to log with the epoch."""
        return {}

    def diagnostics(self, arch: Mapping[str, Tensor]) -> dict[str, float]:
        """Per-epoch figures to log: `entropy_<cell type>` of the edge weights, plus the method's own."""
        return {f"entropy_{cell}": edge_entropy(self.cell_edge_weights(cell, alpha)) for cell, alpha in arch.items()}

    def state_dict(self) -> dict:
        """Every piece of mutable state, so a search can resume bit for bit."""
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        check_state_keys(self, state, set())


class AnnealedSamplingMethod(Method):
    """A method that samples the edge weights of every forward pass from its own generator at a temperature tau,
    which falls linearly over the epochs (GDAS, PR-DARTS): the weights train first in each step; softmax(alpha)
    ranks the ops, and the genotype keeps each node's top (op, input) pairs. A subclass calls `start_sampling`."""

    weight_step_first = True
    samples_each_forward = True

    def start_sampling(self, tau_first: float, tau_last: float, seed: int) -> None:
        """tau_first at the first epoch, tau_last at the last (both checked > 0 by the subclass); the generator
        seeded with `seed`."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{type(self).__name__}: seed must be an integer, got {seed!r}")
        self.tau_first, self.tau_last, self.tau = tau_first, tau_last, tau_first
        self.generator = torch.Generator().manual_seed(seed)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        check_epoch(epoch, epochs)
        fraction = epoch / (epochs - 1) if epochs > 1 else 0.0
        self.tau = self.tau_first + (self.tau_last - self.tau_first) * fraction

    def epoch_settings(self) -> dict[str, float]:
        return {"tau": self.tau}

    def edge_weights(self, alpha: Tensor) -> Tensor:
        return alpha.softmax(dim=-1)

    def derive_cell(self, alpha: Tensor, steps: int) -> tuple[Edge, ...]:
        return derive_cell_top_ops(self.edge_weights(alpha), steps, self.primitives)

    def state_dict(self) -> dict:
        return {"tau": self.tau, "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping) -> None:
        check_state_keys(self, state, {"tau", "generator"})
        tau = state["tau"]
        if not (isinstance(tau, (int, float)) and not isinstance(tau, bool) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"{self.name}: the saved tau must be a finite number > 0, got {tau!r}")
        load_generator_state(self, state["generator"])
        self.tau = tau


def check_state_keys(method: Method, state: Mapping, expected: set[str]) -> None:
    if not isinstance(state, Mapping) or set(state) != expected:
        got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"{method.name} state must have the keys {sorted(expected)}, got {got}")


def load_generator_state(method: Method, state: object) -> None:
    """Restore `method.generator` from a checkpoint's `Generator.get_state()`, or a ValueError naming the problem."""
    if not (isinstance(state, Tensor) and state.dtype == torch.uint8):
        raise ValueError(f"{method.name}: the generator state must be a uint8 tensor from Generator.get_state()")
    try:
        method.generator.set_state(state)
    except RuntimeError as e:
        raise ValueError(f"{method.name}: the generator state does not fit a CPU generator ({e})") from None
