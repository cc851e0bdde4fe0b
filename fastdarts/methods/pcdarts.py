"""PC-DARTS (Xu et al., ICLR 2020; METHODS_MORE.md section 1): partial channel connections and edge normalisation.

Each edge's ops compute on the first C/K channels of its input; the rest bypass them (2x2 max pool on stride-2
edges) and the two parts are shuffled into K groups (`NetworkStyle.partial_channels`). A node sums its inputs'
edges weighted by `w2`, the softmax over the node's inputs of a per-edge logit beta; the edge's ops by softmax(alpha).
beta is the last column of each architecture tensor, trained with alpha by the same Adam. The architecture is
frozen for the first epochs (15 of 50 in the published run) while the weights train.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..space import Edge, cell_steps, derive_cell, edge_index
from .base import CellWeights, Method, NetworkStyle, check_epoch, edge_entropy

# The published run freezes the architecture for 15 of its 50 epochs.
WARMUP_SHARE = (15, 50)


def edge_normalisation(beta: Tensor) -> Tensor:
    """`w2`: per node, the softmax of beta over the node's input edges (rows node-major, input-minor)."""
    steps = cell_steps(beta.shape[0])
    return torch.cat([beta[edge_index(i, 0) : edge_index(i + 1, 0)].softmax(dim=0) for i in range(steps)])


class PCDARTSMethod(Method):
    """Softmax over each edge's ops times the edge's normalised weight; ops on C/K channels; no regulariser.

    warmup_epochs: epochs at the start whose steps train the weights alone; None: 15 of every 50 epochs of the run
    (rounded down), the published share. The genotype keeps, for each node, the two inputs whose best non-`none`
    op has the highest `w * w2`, each with that op.
    """

    name = "pc-darts"
    extra_arch_columns = 1

    def __init__(self, *, k: int = 4, warmup_epochs: int | None = None):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"PCDARTSMethod: k must be an integer >= 1, got {k!r}")
        if warmup_epochs is not None and (isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int)
                                          or warmup_epochs < 0):  # fmt: skip
            raise ValueError(f"PCDARTSMethod: warmup_epochs must be None or an integer >= 0, got {warmup_epochs!r}")
        self.k, self.warmup_epochs = k, warmup_epochs
        self.network_style = NetworkStyle(partial_channels=k)
        self.frozen = False

    def split(self, alpha: Tensor) -> tuple[Tensor, Tensor]:
        """(w, w2) of one cell type's parameters `[num_edges, len(primitives) + 1]`."""
        return alpha[:, : len(self.primitives)].softmax(dim=-1), edge_normalisation(alpha[:, len(self.primitives)])

    def forward_weights(self, arch: Mapping[str, Tensor]) -> dict[str, CellWeights]:
        weights = {}
        for cell, alpha in arch.items():
            w, w2 = self.split(alpha)
            weights[cell] = CellWeights(w, edge_scale=w2)
        return weights

    def edge_weights(self, alpha: Tensor) -> Tensor:
        return self.split(alpha)[0]

    def derive_cell(self, alpha: Tensor, steps: int) -> tuple[Edge, ...]:
        w, w2 = self.split(alpha)
        return derive_cell(w * w2[:, None], steps, self.primitives)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        check_epoch(epoch, epochs)
        warmup = epochs * WARMUP_SHARE[0] // WARMUP_SHARE[1] if self.warmup_epochs is None else self.warmup_epochs
        self.frozen = epoch < warmup

    def trains_architecture(self) -> bool:
        return not self.frozen

    def epoch_settings(self) -> dict[str, float]:
        return {"architecture_frozen": float(self.frozen)}

    def diagnostics(self, arch: Mapping[str, Tensor]) -> dict[str, float]:
        """The entropies of the op weights, and `input_entropy_<cell type>`: the mean over nodes of the entropy
        of `w2` over the node's inputs."""
        figures = super().diagnostics(arch)
        for cell, alpha in arch.items():
            w2 = self.split(alpha.detach())[1]
            steps = cell_steps(w2.shape[0])
            entropies = [edge_entropy(w2[edge_index(i, 0) : edge_index(i + 1, 0)][None]) for i in range(steps)]
            figures[f"input_entropy_{cell}"] = sum(entropies) / steps
        return figures
