"""GDAS (Dong & Yang, CVPR 2019; METHODS_MORE.md section 2): one op per edge, drawn by a hard Gumbel-softmax with a
straight-through gradient; the temperature falls linearly from tau_max to tau_min over the epochs.

Each forward pass draws, per cell type, `g = -log(E)` with `E ~ Exp(1)` for every (edge, op), and takes
`p = softmax((log_softmax(alpha) + g) / tau)`, `idx = argmax p`, `h = onehot(idx) - p.detach() + p`. The edge
computes only op idx, times `h[idx]` (1.0 in value): the architecture gradient flows through `p[idx]` alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .base import AnnealedSamplingMethod, CellWeights, NetworkStyle

# GDAS's own op order (its DARTS_SPACE), the column order of its architecture parameters: the Gumbel noise is drawn
# in this order, so the same generator state gives the same sample as the published code.
GDAS_ORDER = ("none", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5",
              "avg_pool_3x3", "max_pool_3x3")  # fmt: skip


def hard_gumbel_softmax(alpha: Tensor, gumbel: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """`(h, onehot)` for logits `alpha` and Gumbel noise of the same shape: `h = onehot - p.detach() + p` with
    `p = softmax((log_softmax(alpha) + gumbel) / tau)` and `onehot` the argmax of p along the last dimension."""
    p = ((alpha.log_softmax(dim=-1) + gumbel) / tau).softmax(dim=-1)
    onehot = torch.zeros_like(p).scatter_(-1, p.argmax(dim=-1, keepdim=True), 1.0)
    return onehot - p.detach() + p, onehot


def _check_positive(name: str, value: object) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and value > 0):
        raise ValueError(f"GDASMethod: {name} must be a finite number > 0, got {value!r}")


class GDASMethod(AnnealedSamplingMethod):
    """One Gumbel-sampled op per edge, shared by every cell of a type and every image of the batch.

    The weights train first in each step, then the architecture (each forward pass draws its own sample, from this
    object's generator, seeded with `seed`). The architecture columns are in GDAS's op order. The genotype keeps,
    for each node, the two (op, input) pairs of highest softmax(alpha) over all its inputs (`none` excluded); both
    may read the same input.

    `fixed_reduction`: GDAS's FRC variant: the reduction cells are the hand-designed GDAS reduction cell
    (evalnet.GDASReductionCell), in the search network and in the genotype (`reduce='gdas_reduction'`), and only the
    normal cell is searched.
    """

    name = "gdas"
    primitives = GDAS_ORDER

    def __init__(self, *, tau_max: float = 10.0, tau_min: float = 0.1, seed: int = 0, fixed_reduction: bool = False):
        _check_positive("tau_max", tau_max)
        _check_positive("tau_min", tau_min)
        if tau_min > tau_max:
            raise ValueError(f"GDASMethod: tau_min ({tau_min}) must not exceed tau_max ({tau_max})")
        if not isinstance(fixed_reduction, bool):
            raise ValueError(f"GDASMethod: fixed_reduction must be True or False, got {fixed_reduction!r}")
        self.start_sampling(tau_max, tau_min, seed)  # tau_max at the first epoch, tau_min at the last
        if fixed_reduction:
            self.network_style = NetworkStyle(fixed_reduction="gdas_reduction")

    def gumbel_noise(self, alpha: Tensor) -> Tensor:
        """`-log(E)`, `E ~ Exp(1)`, shaped like `alpha` (drawn on the CPU, where the generator is)."""
        exponential = torch.empty(alpha.shape, dtype=alpha.dtype).exponential_(generator=self.generator)
        return -exponential.log().to(alpha.device)

    def forward_weights(self, arch: Mapping[str, Tensor]) -> dict[str, CellWeights]:
        weights = {}
        for cell, alpha in arch.items():
            while True:  # as the published code, draw again on an infinite noise or a non-finite softmax
                gumbel = self.gumbel_noise(alpha)
                h, onehot = hard_gumbel_softmax(alpha, gumbel, self.tau)
                if bool(torch.isfinite(gumbel).all()) and bool(torch.isfinite(h.detach()).all()):
                    break
            weights[cell] = CellWeights(h, onehot)
        return weights
