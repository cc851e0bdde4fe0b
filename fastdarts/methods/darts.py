"""DARTS (METHOD.md 1.2, 1.4): every edge is the softmax-weighted sum of all its ops."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from ..space import Edge, derive_cell
from .base import CellWeights, Method


class DARTSMethod(Method):
    """Softmax over the alphas of each edge; no regulariser, no state."""

    name = "darts"

    def forward_weights(self, arch: Mapping[str, Tensor]) -> dict[str, CellWeights]:
        return {cell: CellWeights(self.edge_weights(alpha)) for cell, alpha in arch.items()}

    def edge_weights(self, alpha: Tensor) -> Tensor:
        return alpha.softmax(dim=-1)

    def derive_cell(self, alpha: Tensor, steps: int) -> tuple[Edge, ...]:
        return derive_cell(self.edge_weights(alpha), steps, self.primitives)
