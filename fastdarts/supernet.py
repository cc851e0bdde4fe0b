"""The DARTS search network (METHOD.md 1.1-1.2): mixed ops, search cells, the supernet.

No math of its own: every weighted sum goes through `fastdarts.ops`, which picks the backend.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .space import OPS, PRIMITIVES, FactorizedReduce, Genotype, ReLUConvBN, derive_cell

# `none` contributes zeros, so it takes part in the softmax but is never computed.
_COMPUTED = tuple(name for name in PRIMITIVES if name != "none")
_COMPUTED_COLUMNS = tuple(PRIMITIVES.index(name) for name in _COMPUTED)


class MixedOp(nn.Module):
    """One edge: every candidate op of the search space on the same input."""

    def __init__(self, C: int, stride: int):
        super().__init__()
        self.stride = stride
        candidates = []
        for name in _COMPUTED:
            op = OPS[name](C, stride, False)
            if "pool" in name:  # the search network normalises pool outputs too
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            candidates.append(op)
        self.candidates = nn.ModuleList(candidates)

    def candidate_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [op(x) for op in self.candidates]

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`sum_k weights[k] * o_k(x)` with `weights` over all PRIMITIVES (`none` included)."""
        return ops.weighted_sum(self.candidate_outputs(x), weights[list(_COMPUTED_COLUMNS)])


class SearchCell(nn.Module):
    """A DAG of `steps` nodes over two inputs; each node sums the mixed ops from all its predecessors."""

    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        self.reduction = reduction
        self.steps = steps
        self.multiplier = multiplier
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        # Edges node-major, input-minor: node 0 <- (0, 1), node 1 <- (0, 1, 2), ...
        self.edges = nn.ModuleList(
            MixedOp(C, 2 if reduction and j < 2 else 1) for i in range(steps) for j in range(2 + i)
        )

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        columns = list(_COMPUTED_COLUMNS)
        offset = 0
        for _ in range(self.steps):
            # One weighted sum per node over every candidate of every incoming edge: the same
            # value as summing the edges' mixed ops, with no per-edge partial sums.
            outputs = []
            for j, h in enumerate(states):
                outputs += self.edges[offset + j].candidate_outputs(h)
            node_weights = weights[offset : offset + len(states), columns].reshape(-1)
            offset += len(states)
            states.append(ops.weighted_sum(outputs, node_weights))
        return torch.cat(states[-self.multiplier :], dim=1)


class SearchNetwork(nn.Module):
    """The DARTS supernet: stem, `layers` search cells (reductions at layers//3 and 2*layers//3), classifier.

    All normal cells share `alpha_normal`, all reduction cells `alpha_reduce`, each
    `[num_edges, len(PRIMITIVES)]` in PRIMITIVES column order and DARTS edge order.
    """

    def __init__(
        self,
        C: int = 16,
        num_classes: int = 10,
        layers: int = 8,
        in_channels: int = 3,
        steps: int = 4,
        multiplier: int = 4,
        stem_multiplier: int = 3,
    ):
        super().__init__()
        for name, value, low in (("C", C, 1), ("num_classes", num_classes, 2), ("layers", layers, 1),
                                 ("in_channels", in_channels, 1), ("steps", steps, 1),
                                 ("multiplier", multiplier, 1), ("stem_multiplier", stem_multiplier, 1)):  # fmt: skip
            if not isinstance(value, int) or value < low:
                raise ValueError(f"SearchNetwork: {name} must be an integer >= {low}, got {value!r}")
        if multiplier > steps:
            raise ValueError(f"SearchNetwork: multiplier ({multiplier}) cannot exceed steps ({steps})")
        self.steps = steps
        self.multiplier = multiplier
        self.layers = layers
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False),
            nn.BatchNorm2d(C_curr),
        )
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        reduction_prev = False
        cells = []
        for i in range(layers):
            reduction = i in self.reduction_indices
            if reduction:
                C_curr *= 2
            cells.append(SearchCell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev))
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.cells = nn.ModuleList(cells)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

        num_edges = sum(2 + i for i in range(steps))
        self.alpha_normal = nn.Parameter(1e-3 * torch.randn(num_edges, len(PRIMITIVES)))
        self.alpha_reduce = nn.Parameter(1e-3 * torch.randn(num_edges, len(PRIMITIVES)))

    @property
    def reduction_indices(self) -> tuple[int, int]:
        return self.layers // 3, 2 * self.layers // 3

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha_normal, self.alpha_reduce]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def named_weight_parameters(self) -> list[tuple[str, nn.Parameter]]:
        arch = {id(p) for p in self.arch_parameters()}
        return [(n, p) for n, p in self.named_parameters() if id(p) not in arch]

    def edge_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax over the ops of every edge: (normal, reduce), each `[num_edges, len(PRIMITIVES)]`."""
        return self.alpha_normal.softmax(dim=-1), self.alpha_reduce.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights_normal, weights_reduce = self.edge_weights()
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, weights_reduce if cell.reduction else weights_normal)
        return self.classifier(self.global_pooling(s1).flatten(1))

    def genotype(self) -> Genotype:
        weights_normal, weights_reduce = self.edge_weights()
        concat = list(range(2 + self.steps - self.multiplier, self.steps + 2))
        return Genotype(
            normal=derive_cell(weights_normal, self.steps),
            normal_concat=concat,
            reduce=derive_cell(weights_reduce, self.steps),
            reduce_concat=concat,
        )
