"""PR-DARTS (METHOD.md section 2): hard-concrete gates, the sparse top-k forward, group-sparsity
and path-depth regularisers, and its genotype rule.

Op groups are defined by name (PRIMITIVES), never by column number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .. import ops
from ..ops.reference import check_explore_p, check_gate_settings, gate_p_nonzero
from ..space import PRIMITIVES, cell_steps, deepest_chain
from .base import AnnealedSamplingMethod, CellWeights, NetworkStyle

SKIP = ("skip_connect",)
CONV = ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
POOL = ("max_pool_3x3", "avg_pool_3x3")
NONSKIP = ("none", *CONV)
REST = tuple(name for name in PRIMITIVES if name not in SKIP)  # the paper form's second group
DIAGNOSTIC_GROUPS = {"skip": SKIP, "nonskip": NONSKIP, "pool": POOL}
FORMS = ("reference", "paper")
# The search network of the published code (METHOD 2.4), or DARTS's, to compare the methods on one network.
NETWORKS = {
    "reference": NetworkStyle(running_statistics=False, head_bn_relu=True, pool_bn=False),
    "darts": NetworkStyle(),
}

Groups = Sequence[tuple[Sequence[str], float]]  # (op names, weight in R)


def columns(names: Sequence[str]) -> list[int]:
    return [PRIMITIVES.index(name) for name in names]


def group_term(p: Tensor, mask: Tensor, names: Sequence[str]) -> Tensor:
    """The mean of `p` over the group's sampled gates (mask 1) in one cell type; 0 if none was sampled."""
    cols = columns(names)
    m = mask[:, cols]
    # With nothing sampled the numerator is 0, so clamping the count to 1 gives the 0 of the spec.
    return (p[:, cols] * m).sum() / m.sum().clamp_min(1.0)


def path_term(p: Tensor, mask: Tensor, chain: Sequence[int]) -> Tensor:
    """The product, over the chain edges with a sampled conv, of the mean `p` of their sampled convs.

    Edges without a sampled conv drop out of the product; with no such edge at all the term is 0.
    """
    rows, cols = list(chain), columns(CONV)
    m = mask[rows][:, cols]
    counts = m.sum(dim=1)
    means = (p[rows][:, cols] * m).sum(dim=1) / counts.clamp_min(1.0)
    sampled = counts > 0
    return torch.where(sampled, means, torch.ones_like(means)).prod() * sampled.any()


def regulariser(
    ps: Sequence[Tensor], masks: Sequence[Tensor], groups: Groups, l3: float, hinge: float | None
) -> Tensor:
    """METHOD 2.3: `sum_group weight * hinge(L_group) - l3 * L_path`.

    `ps` and `masks` hold one `[num_edges, len(PRIMITIVES)]` tensor per cell type (`P(g != 0)` and
    the 0/1 mask of sampled ops); every term is averaged over the cell types; `hinge` None means
    no hinge.
    """
    chain = deepest_chain(cell_steps(ps[0].shape[0]))
    total = -l3 * torch.stack([path_term(p, m, chain) for p, m in zip(ps, masks)]).mean()
    for names, weight in groups:
        term = torch.stack([group_term(p, m, names) for p, m in zip(ps, masks)]).mean()
        if hinge is not None:
            term = (term - hinge).clamp_min(0.0)
        total = total + weight * term
    return total


def _check_number(name: str, value: object, *, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (value > 0 if positive else value >= 0)):
        raise ValueError(f"PRDARTSMethod: {name} must be a finite number {'>' if positive else '>='} 0, got {value!r}")


class PRDARTSMethod(AnnealedSamplingMethod):
    """Independent hard-concrete gates over the betas, top-k ops per edge, regularised groups and paths.

    form "reference": the published code's behaviour (METHOD 2.2-2.3): exploration, top-k
    straight-through gates, hinged skip / non-skip / pool groups over the sampled gates.
    form "paper": no top-k (every op computed, weighted by its gate g), no hinge, two groups
    (skip and the rest) over every gate, the path term over every chain edge.
    Every forward pass draws its gates from this object's own generator (seeded with `seed`).
    network "reference": the published code's search network (no BN after the pools, batch statistics in
    evaluation too, a BN and ReLU before the global pooling); "darts": DARTS's.
    """

    name = "pr-darts"

    def __init__(
        self,
        *,
        tau_start: float = 1.0,
        tau_end: float = 0.1,
        l1: float = 0.01,
        l2: float = 0.005,
        l3: float = 0.005,
        hinge: float = 0.2,
        k: int = 2,
        explore_p: float = 0.4,
        a: float = -0.1,
        b: float = 1.1,
        form: str = "reference",
        network: str = "reference",
        seed: int = 0,
    ):
        for name, value in (("tau_start", tau_start), ("tau_end", tau_end)):
            _check_number(name, value, positive=True)
        for name, value in (("l1", l1), ("l2", l2), ("l3", l3), ("hinge", hinge)):
            _check_number(name, value, positive=False)
        if k is None:
            raise ValueError("PRDARTSMethod: k must be an integer; form='paper' is the variant without top-k")
        check_gate_settings("PRDARTSMethod", tau_start, a, b, k, len(PRIMITIVES))
        check_explore_p("PRDARTSMethod", explore_p)
        if form not in FORMS:
            raise ValueError(f"PRDARTSMethod: form must be one of {', '.join(FORMS)}, got {form!r}")
        if network not in NETWORKS:
            raise ValueError(f"PRDARTSMethod: network must be one of {', '.join(NETWORKS)}, got {network!r}")
        self.start_sampling(tau_start, tau_end, seed)  # tau_start at the first epoch, tau_end at the last
        self.l1, self.l2, self.l3, self.hinge = l1, l2, l3, hinge
        self.k, self.explore_p, self.a, self.b, self.form = k, explore_p, a, b, form
        self.network_style = NETWORKS[network]
        # Per cell type, P(g != 0) and the mask of the last forward pass: what R is computed from.
        self._last: dict[str, tuple[Tensor, Tensor]] = {}

    # One forward pass ---------------------------------------------------------------------------
    def forward_weights(self, arch: Mapping[str, Tensor]) -> dict[str, CellWeights]:
        top_k = self.form == "reference"
        weights, last = {}, {}
        for cell, beta in arch.items():
            gates, mask, p_nonzero = ops.sample_gates(
                beta, self.tau, self.a, self.b, self.k if top_k else None, self.explore_p, self.generator
            )
            last[cell] = (p_nonzero, mask)
            weights[cell] = CellWeights(gates, mask if top_k else None)
        self._last = last
        return weights

    def regulariser(self) -> Tensor:
        """R (METHOD 2.3) of the gates sampled by the last forward pass, differentiable in the betas."""
        if not self._last:
            raise RuntimeError("PRDARTSMethod.regulariser: no gates have been sampled yet; run a forward pass first")
        ps, masks = zip(*self._last.values())
        return self.regulariser_of(ps, masks)

    def regulariser_of(self, ps: Sequence[Tensor], masks: Sequence[Tensor]) -> Tensor:
        """R for given `P(g != 0)` and 0/1 masks of sampled ops, one of each per cell type (the
        paper form ignores the masks: every gate counts)."""
        if self.form == "paper":
            all_gates = [torch.ones_like(p) for p in ps]
            return regulariser(ps, all_gates, ((SKIP, self.l1), (REST, self.l2)), self.l3, hinge=None)
        return regulariser(ps, masks, ((SKIP, self.l1), (NONSKIP, self.l2), (POOL, self.l2)), self.l3, self.hinge)

    # Diagnostics ----------------------------------------------------------------------------------
    def diagnostics(self, arch: Mapping[str, Tensor]) -> dict[str, float]:
        """The entropies, and `p_nonzero_<group>_<cell type>`: the mean P(g != 0) over every gate of a group."""
        figures = super().diagnostics(arch)
        for cell, beta in arch.items():
            p = gate_p_nonzero(beta.detach(), self.tau, self.a, self.b)
            for group, names in DIAGNOSTIC_GROUPS.items():
                figures[f"p_nonzero_{group}_{cell}"] = float(p[:, columns(names)].mean())
        return figures
