"""Fair DARTS (METHODS_MORE.md section 3): independent sigmoid weights over 7 ops, the zero-one loss, and the
threshold rule for the genotype.

No `none` among the ops; the alphas start at 0 (every weight 0.5) and each op's weight is sigmoid(alpha),
unnormalised. The architecture loss gains `w01 * L01`, `L01 = -mean((sigmoid(A) - 0.5)^2)` over every weight of
both cell types (`-mean|sigmoid(A) - 0.5|` with the l1 form), which pushes each weight towards 0 or 1. (The
published code adds L01 to the weight step's loss too, where it has no gradient: it is left out there.)

Genotype: for each node, its two input edges of highest max weight, and on each the op of highest weight, kept
only when that weight reaches the threshold (0.85). fastdarts's genotypes have two edges per node: an edge
below the threshold becomes `("none", input)`, which contributes nothing, and a node left with no op is
dropped from the concat, as the published evaluation cell does (when no node has an op, early in a search,
every node stays, all zeros).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..space import PRIMITIVES, Edge, cell_edge_count, edge_index
from .base import CellWeights, Method
from .betadarts import check_number

ZERO_ONE_LOSSES = ("l2", "l1")


def zero_one_loss(alphas: Sequence[Tensor], form: str = "l2") -> Tensor:
    """`-mean((sigmoid(a) - 0.5)^2)` (l2) or `-mean|sigmoid(a) - 0.5|` (l1) over every alpha of every cell type."""
    distance = torch.cat([alpha.reshape(-1) for alpha in alphas]).sigmoid() - 0.5
    return -(distance.square() if form == "l2" else distance.abs()).mean()


def derive_cell_threshold(weights: Tensor, steps: int, primitives: Sequence[str], threshold: float
                          ) -> tuple[Edge, ...]:  # fmt: skip
    """The threshold rule on one cell's weights `[num_edges, len(primitives)]` (no `none` among them): per node,
    the top-2 input edges by their max weight (stable: ties to the lower input), on each its argmax op (ties to
    the lower column), `("none", input)` where that weight is below `threshold`."""
    weights = weights.detach().double().cpu()
    if weights.shape != (cell_edge_count(steps), len(primitives)):
        raise ValueError(f"expected weights of shape {(cell_edge_count(steps), len(primitives))}, "
                         f"got {tuple(weights.shape)}")  # fmt: skip
    gene: list[Edge] = []
    for i in range(steps):
        rows = weights[edge_index(i, 0) : edge_index(i, 0) + 2 + i]
        best, ops = rows.max(dim=1)  # max returns the first of equal values: the lower column
        for inp in sorted(range(2 + i), key=lambda e: -best[e].item())[:2]:
            gene.append((primitives[int(ops[inp])] if best[inp] >= threshold else "none", inp))
    return tuple(gene)


class FairDARTSMethod(Method):
    """Sigmoid weights over the 7 ops without `none`, the zero-one loss, the threshold genotype rule."""

    name = "fair-darts"
    primitives = tuple(name for name in PRIMITIVES if name != "none")

    def __init__(self, *, zero_one_weight: float = 10.0, zero_one_form: str = "l2", threshold: float = 0.85):
        check_number("FairDARTSMethod", "zero_one_weight", zero_one_weight)
        if zero_one_form not in ZERO_ONE_LOSSES:
            raise ValueError(f"FairDARTSMethod: zero_one_form must be one of {', '.join(ZERO_ONE_LOSSES)}, "
                             f"got {zero_one_form!r}")  # fmt: skip
        if not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and 0 < threshold < 1):
            raise ValueError(f"FairDARTSMethod: threshold must be a number in (0, 1), got {threshold!r}")
        self.zero_one_weight, self.zero_one_form, self.threshold = zero_one_weight, zero_one_form, threshold
        self._arch: tuple[Tensor, ...] = ()  # the parameters of the last forward pass

    def initial_arch(self, num_edges: int) -> Tensor:
        return torch.zeros(num_edges, len(self.primitives))  # every weight 0.5

    def forward_weights(self, arch: Mapping[str, Tensor]) -> dict[str, CellWeights]:
        self._arch = tuple(arch.values())
        return {cell: CellWeights(self.edge_weights(alpha)) for cell, alpha in arch.items()}

    def edge_weights(self, alpha: Tensor) -> Tensor:
        return alpha.sigmoid()

    def regulariser(self) -> Tensor:
        if not self._arch:
            raise RuntimeError("FairDARTSMethod.regulariser: run a forward pass first")
        return self.zero_one_weight * zero_one_loss(self._arch, self.zero_one_form)

    def derive_cell(self, alpha: Tensor, steps: int) -> tuple[Edge, ...]:
        return derive_cell_threshold(self.edge_weights(alpha), steps, self.primitives, self.threshold)

    def undecided_hint(self) -> str:
        return f", or lower --threshold (now {self.threshold:g}): no op weight has reached it"

    def cell_concat(self, cell: Sequence[Edge], steps: int, multiplier: int) -> list[int]:
        """The last `multiplier` nodes that have an op (all of them when none has)."""
        concat = super().cell_concat(cell, steps, multiplier)
        kept = [node for node in concat if any(op != "none" for op, _ in cell[2 * (node - 2) : 2 * (node - 1)])]
        return kept or concat

    def diagnostics(self, arch: Mapping[str, Tensor]) -> dict[str, float]:
        """`entropy_<cell>`: the mean binary entropy (nats) of the weights, each an independent sigmoid (0 when
        every weight is 0 or 1, the zero-one loss's aim); `above_threshold_<cell>`: the fraction of weights at
        or above the threshold."""
        figures = {}
        for cell, alpha in arch.items():
            p = alpha.detach().sigmoid().double()
            entropy = -(p * p.clamp_min(1e-12).log() + (1 - p) * (1 - p).clamp_min(1e-12).log())
            figures[f"entropy_{cell}"] = float(entropy.mean())
            figures[f"above_threshold_{cell}"] = float((p >= self.threshold).double().mean())
        return figures
