"""DrNAS (Chen et al., ICLR 2021; METHODS_MORE.md section 4): Dirichlet edge weights, partial channels, and a
two-stage progressive search that prunes each edge to its best ops halfway.

Each forward pass draws, for every edge, `w ~ Dirichlet(elu(alpha) + 1)` (reparameterised: the architecture
gradient flows through the sample), one draw per edge shared by every cell of a type and the whole batch. The
7 ops exclude `none`. At the start of the second stage each edge keeps its `prune_to` largest alphas (the others
are set to 0) and computes only those, its sample renormalised over them; with a first-stage partial-channel factor
`k_first` above `k` (the published 6 and 4), the search then widens the ops from C/k_first to C/k channels and
restarts the weights' SGD and cosine schedule (`network_style`, `supernet.widen_partial_channels`). The
architecture is frozen for the first epochs of each stage (10 of 25 in the published run). Regulariser: "l2", a
weight decay `reg_scale` on alpha in the architecture's Adam (pulling the concentration towards 1, the uniform
Dirichlet), or "kl", `reg_scale * sum_edges KL(Dir(elu(alpha) + 1) || Dir(1))` added to the architecture loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Dirichlet, kl_divergence
from torch.distributions.dirichlet import _Dirichlet_backward

from ..space import PRIMITIVES, Edge, derive_cell
from .base import CellWeights, Method, NetworkStyle, check_epoch, check_state_keys, load_generator_state

REGULARISERS = ("l2", "kl")
# The published run freezes the architecture for the first 10 epochs of each 25-epoch stage.
WARMUP_SHARE = (10, 25)


class _DirichletSample(torch.autograd.Function):
    """`Dirichlet(concentration).rsample()` drawn from a given generator (torch's own rsample draws from the
    global one), with torch's implicit reparameterisation gradient."""

    @staticmethod
    def forward(ctx, concentration: Tensor, generator: torch.Generator) -> Tensor:
        x = torch._sample_dirichlet(concentration, generator=generator)
        ctx.save_for_backward(x, concentration)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, concentration = ctx.saved_tensors
        return _Dirichlet_backward(x, concentration, grad), None


def concentration(alpha: Tensor) -> Tensor:
    """The Dirichlet concentration of architecture parameters: `elu(alpha) + 1 > 0`."""
    return F.elu(alpha) + 1


def masked_renormalised(weights: Tensor, mask: Tensor | None) -> Tensor:
    """Each row's weights with the pruned ops (mask 0) set to 0 and the rest rescaled to sum to 1."""
    if mask is None:
        return weights
    weights = weights * mask
    return weights / weights.sum(dim=-1, keepdim=True)


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"DrNASMethod: {name} must be an integer >= {low}, got {value!r}")


class DrNASMethod(Method):
    """Dirichlet-sampled op weights over 7 ops (no `none`), partial channels, two stages with pruning.

    k: the ops compute on 1/k of each edge's channels in the second stage, which starts at epoch `epochs // 2`.
    k_first: the factor of the first stage (None: k). Above k (the published run: 6, then 4), the second stage
    widens the network: at its first epoch, after the pruning, the search widens the ops to C/k channels
    (`supernet.widen_partial_channels`, drawing from this method's generator) and restarts the weights' SGD at the
    initial learning rate, its momentum buffers widened alike. prune_to: ops each edge keeps in the second stage.
    warmup_epochs: first epochs of each stage that train the weights alone (None: 10 of every 25 epochs of the
    stage, rounded down). The genotype is DARTS's rule on softmax(alpha), renormalised over the kept ops.
    """

    name = "drnas"
    samples_each_forward = True
    primitives = tuple(name for name in PRIMITIVES if name != "none")

    def __init__(self, *, k: int = 4, k_first: int | None = None, prune_to: int = 4, warmup_epochs: int | None = None,
                 reg: str = "l2", reg_scale: float = 1e-3, seed: int = 0):  # fmt: skip
        _check_int("k", k, 1)
        if k_first is not None:
            _check_int("k_first", k_first, k)  # the second stage widens the ops, never narrows them
        _check_int("prune_to", prune_to, 1)
        if prune_to > len(self.primitives):
            raise ValueError(f"DrNASMethod: prune_to ({prune_to}) cannot exceed the {len(self.primitives)} ops")
        if warmup_epochs is not None:
            _check_int("warmup_epochs", warmup_epochs, 0)
        if reg not in REGULARISERS:
            raise ValueError(f"DrNASMethod: reg must be one of {', '.join(REGULARISERS)}, got {reg!r}")
        ok = isinstance(reg_scale, (int, float)) and not isinstance(reg_scale, bool) and math.isfinite(reg_scale)
        if not (ok and reg_scale >= 0):
            raise ValueError(f"DrNASMethod: reg_scale must be a finite number >= 0, got {reg_scale!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"DrNASMethod: seed must be an integer, got {seed!r}")
        self.k, self.prune_to, self.warmup_epochs, self.reg, self.reg_scale = k, prune_to, warmup_epochs, reg, reg_scale
        self.k_first = k if k_first is None else k_first
        self.widens_network = self.k_first != k
        # "l2" is the architecture optimiser's weight decay; "kl" a term of the loss, with no weight decay.
        self.arch_weight_decay = reg_scale if reg == "l2" else 0.0
        self.generator = torch.Generator().manual_seed(seed)
        self.stage, self.frozen = 1, False
        self.masks: dict[str, Tensor] = {}  # per cell type, the 0/1 ops each edge keeps (second stage)
        self._last: list[Tensor] = []  # the concentrations of the last forward pass, for the KL term

    def sample(self, alpha: Tensor) -> Tensor:
        """One Dirichlet draw per row of `alpha`, from this method's generator."""
        b = concentration(alpha)
        return _DirichletSample.apply(b.cpu(), self.generator).to(alpha.device)

    def forward_weights(self, arch: Mapping[str, Tensor]) -> dict[str, CellWeights]:
        weights, self._last = {}, []
        for cell, alpha in arch.items():
            mask = self.masks.get(cell)
            weights[cell] = CellWeights(masked_renormalised(self.sample(alpha), mask), mask)
            self._last.append(concentration(alpha))
        return weights

    def regulariser(self) -> Tensor | None:
        """ "kl": `reg_scale` times the sum over both cell types and every edge of KL(Dir(b_e) || Dir(1)) for the
        parameters of the last forward pass; None for "l2" (a weight decay)."""
        if self.reg == "l2":
            return None
        if not self._last:
            raise RuntimeError("DrNASMethod.regulariser: no forward pass has run yet")
        kl = [kl_divergence(Dirichlet(b), Dirichlet(torch.ones_like(b))).sum() for b in self._last]
        return self.reg_scale * sum(kl)

    # Schedule --------------------------------------------------------------------------------------------------
    @property
    def network_style(self) -> NetworkStyle:
        """Partial channels 1/k_first in the first stage, 1/k from the pruning on: the masks (in the checkpoint) say
        which, so a search resumed in its second stage builds its network as wide as it had become."""
        return NetworkStyle(partial_channels=self.k if self.masks else self.k_first)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        check_epoch(epoch, epochs)
        first_stage = epochs // 2
        if self.widens_network and first_stage == 0:
            raise ValueError(f"DrNASMethod: k_first ({self.k_first}) above k ({self.k}) widens the network after a "
                             f"first stage of epochs // 2 epochs: it needs epochs >= 2, got {epochs}")  # fmt: skip
        self.stage = 1 if epoch < first_stage else 2
        start, length = (0, first_stage) if self.stage == 1 else (first_stage, epochs - first_stage)
        warmup = length * WARMUP_SHARE[0] // WARMUP_SHARE[1] if self.warmup_epochs is None else self.warmup_epochs
        self.frozen = epoch - start < warmup

    def prepare_architecture(self, arch: Mapping[str, Tensor]) -> None:
        """At the first epoch of the second stage: keep each edge's `prune_to` largest alphas, set the others to 0."""
        if self.stage == 1 or self.masks:
            return
        for cell, alpha in arch.items():
            top = alpha.detach().topk(self.prune_to, dim=-1).indices
            mask = torch.zeros_like(alpha).scatter_(-1, top, 1.0)
            alpha.detach().mul_(mask)
            self.masks[cell] = mask

    def trains_architecture(self) -> bool:
        return not self.frozen

    def epoch_settings(self) -> dict[str, float]:
        return {"stage": float(self.stage), "architecture_frozen": float(self.frozen)}

    # Genotype, diagnostics, state ------------------------------------------------------------------------------
    def edge_weights(self, alpha: Tensor) -> Tensor:
        """softmax(alpha) over all 7 ops (`cell_edge_weights` renormalises it over the ops an edge kept)."""
        return alpha.softmax(dim=-1)

    def cell_edge_weights(self, cell: str, alpha: Tensor) -> Tensor:
        return masked_renormalised(self.edge_weights(alpha), self.masks.get(cell))

    def derive_cell(self, alpha: Tensor, steps: int) -> tuple[Edge, ...]:
        return derive_cell(self.edge_weights(alpha), steps, self.primitives)

    def derive_cell_of(self, cell: str, alpha: Tensor, steps: int) -> tuple[Edge, ...]:
        return derive_cell(self.cell_edge_weights(cell, alpha), steps, self.primitives)

    def diagnostics(self, arch: Mapping[str, Tensor]) -> dict[str, float]:
        """The entropies, and `concentration_<cell type>`: the mean over edges of the Dirichlet's total
        concentration sum_k b_k (low: a spread-out, uncertain distribution)."""
        figures = super().diagnostics(arch)
        for cell, alpha in arch.items():
            figures[f"concentration_{cell}"] = float(concentration(alpha.detach()).sum(-1).mean())
        return figures

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "masks": dict(self.masks)}

    def load_state_dict(self, state: Mapping) -> None:
        check_state_keys(self, state, {"generator", "masks"})
        masks = state["masks"]
        if not isinstance(masks, Mapping) or not all(isinstance(m, Tensor) for m in masks.values()):
            raise ValueError("drnas: the masks must map cell types to 0/1 tensors")
        load_generator_state(self, state["generator"])
        self.masks = dict(masks)
