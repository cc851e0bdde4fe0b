"""The search network (METHOD.md 1.1-1.2): mixed ops, search cells, the supernet.

No math of its own: every weighted sum goes through `fastdarts.ops`, which picks the backend, and
the method object (`fastdarts.methods`) turns the architecture parameters into edge weights. When
the method marks the selected ops of each edge (PR-DARTS), only those are computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import ops
from .evalnet import FIXED_REDUCTION_CELL_MODULES
from .methods import CellWeights, DARTSMethod, Method
from .ops.reference import cell_groups, check_flag
from .space import (
    OPS,
    PRIMITIVES,
    DilConv,
    FactorizedReduce,
    Genotype,
    Identity,
    ReLUConvBN,
    SepConv,
    Zero,
    cell_edge_count,
    drop_running_statistics,
    edge_index,
)

# `none` contributes zeros, so it takes part in the weights but is never computed; every other
# primitive is a candidate of the fused mixed op, in the same order.
_COMPUTED = tuple(name for name in PRIMITIVES if name != "none")
assert _COMPUTED == ops.MIXED_OP_CANDIDATES, "PRIMITIVES and the mixed op's candidates must agree"
_COMPUTED_COLUMNS = tuple(PRIMITIVES.index(name) for name in _COMPUTED)
_CANDIDATE_OF_COLUMN = {column: i for i, column in enumerate(_COMPUTED_COLUMNS)}
# The running-statistics plans a group or a cell keeps (running_statistics_plan), the oldest dropped first: a method
# that computes the same ops every step needs one, but GDAS draws new ones every step (up to 8^4 combinations for a
# group of 4 edges), which would otherwise keep adding plans for the whole search.
_PLANS_PER_GROUP = 64
_SKIP_ONE_HOT = torch.nn.functional.one_hot(torch.tensor(PRIMITIVES.index("skip_connect")), len(PRIMITIVES))

Columns = Sequence[int]  # PRIMITIVES columns of the ops to compute on one edge (`none` never listed)


class OpColumns:
    """Maps a method's op columns (its `primitives`, any subset of PRIMITIVES in any order) onto the supernet's
    PRIMITIVES columns by name. Ops the method leaves out get weight 0 and are never computed."""

    def __init__(self, primitives: Sequence[str]):
        primitives = tuple(primitives)
        unknown = [name for name in primitives if name not in PRIMITIVES]
        if unknown or len(set(primitives)) != len(primitives) or not set(primitives) & set(_COMPUTED):
            raise ValueError(f"a method's ops must be distinct names of {', '.join(PRIMITIVES)}, at least one of "
                             f"them not `none`; got {list(primitives)}")  # fmt: skip
        self.primitives = primitives
        self.identity = primitives == PRIMITIVES
        # The method column of each PRIMITIVES column; len(primitives) (a zero column appended) where it has none.
        self.index = [primitives.index(name) if name in primitives else len(primitives) for name in PRIMITIVES]
        self.complete = set(_COMPUTED) <= set(primitives)

    def __call__(self, weights: CellWeights) -> CellWeights:
        """`weights` over the method's columns as weights over PRIMITIVES; when the method leaves out a computed
        op, the mask marks only the method's ops."""
        if self.identity:
            return weights
        mask = weights.mask
        if mask is None and not self.complete:
            mask = torch.ones_like(weights.weights)
        return weights._replace(
            weights=self._spread(weights.weights), mask=None if mask is None else self._spread(mask)
        )

    def _spread(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(t.shape[0], 1)], dim=1)[:, self.index]


def selected_columns(mask: torch.Tensor | None) -> list[Columns] | None:
    """Per edge, the computed columns a 0/1 mask `[num_edges, len(PRIMITIVES)]` selects; None for every op."""
    if mask is None:
        return None
    return [tuple(c for c in _COMPUTED_COLUMNS if row[c]) for row in mask.tolist()]


class MixedOp(nn.Module):
    """One edge: every candidate op of the search space on the same input, computed by `ops.mixed_op`.

    With `partial_channels` K > 1 (PC-DARTS) the ops compute on the first C/K channels of the input only; the other
    channels bypass them (through a 2x2 max pool on a stride-2 edge), and the two parts, concatenated, are shuffled
    into K groups (`partial_channel_edge`), all inside the fused op.

    The candidate modules hold the parameters and BN buffers (so checkpoints keep DARTS's layout); the forward
    hands them to the fused op as one node and updates the BNs' running statistics from the batch statistics it
    returns, as nn.BatchNorm2d would.
    """

    def __init__(self, C: int, stride: int, pool_bn: bool = True, recompute: bool = True,
                 auxiliary_skip: bool = False, partial_channels: int = 1):  # fmt: skip
        super().__init__()
        self.stride, self.pool_bn, self.recompute = stride, pool_bn, recompute
        # NetworkStyle.auxiliary_skip: on a stride-2 edge a FactorizedReduce of its own, outside the fused op (on a
        # stride-1 edge the identity is skip_connect's own op: the cell adds its weight to that op's).
        self.auxiliary = FactorizedReduce(C, C, affine=False) if auxiliary_skip and stride == 2 else None
        if C % partial_channels:
            raise ValueError(f"MixedOp: {C} channels do not split into {partial_channels} partial-channel groups")
        self.partial_channels = partial_channels
        C = self.width = C // partial_channels  # the channels the ops compute on
        candidates = []
        for name in _COMPUTED:
            op = OPS[name](C, stride, False)
            if "pool" in name and pool_bn:  # DARTS's search network normalises pool outputs too
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            candidates.append(op)
        self.candidates = nn.ModuleList(candidates)
        # In op.parameters() order: modules in preorder, each one's own parameters in registration order.
        self._weight_slots = [(m._parameters, name) for op in candidates for m in op.modules() for name, _ in
                              m.named_parameters(recurse=False)]  # fmt: skip
        self.bns = [m for op in candidates for m in op.modules() if isinstance(m, nn.BatchNorm2d)]
        # Per candidate, its BNs (the rows of the op's statistics), in ops.mixed_op_layout order.
        self.bn_rows, row = [], 0
        for op in candidates:
            count = sum(isinstance(m, nn.BatchNorm2d) for m in op.modules())
            self.bn_rows.append(range(row, row + count))
            row += count
        self._running_statistics_plans: dict[tuple, tuple] = {}  # for the groups it leads (running_statistics_plan)

    def conv_weights(self) -> list[torch.Tensor]:
        """The convs' weights in the order ops.mixed_op takes them (each candidate's in registration order).

        Read through (the module's parameters, name) pairs found once: walking the modules for each forward cost more
        than some kernels at small sizes. The dict is where a getattr finds a parameter (through the slower
        Module.__getattr__), and where torch.func.functional_call puts its tensors."""
        return [parameters[name] for parameters, name in self._weight_slots]

    def zeros(self, x: torch.Tensor) -> torch.Tensor:
        """What the edge gives when only `none` is selected."""
        return Zero(self.stride)(x)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, columns: Columns | None = None) -> torch.Tensor:
        """`sum_k weights[k] * o_k(x)` with `weights` over all PRIMITIVES (`none` included).

        `columns`: compute only these ops (the others' weights count as 0); None computes every op.
        """
        columns = _COMPUTED_COLUMNS if columns is None else columns
        if not columns:
            return self.zeros(x)
        return edges_leaving(x, [self], weights.unsqueeze(0), [columns])[0]

    def batch_statistics(self) -> bool:
        """Whether the BNs normalise with the batch's statistics (else with their running ones)."""
        return self.training or not self.bns[0].track_running_stats

    def running_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, C] running means and variances of the edge's BNs, in ops.mixed_op_layout order."""
        return torch.stack([b.running_mean for b in self.bns]), torch.stack([b.running_var for b in self.bns])


def running_statistics_plan(
    plans: dict[tuple, tuple],
    groups: Sequence[tuple[Sequence[MixedOp], Sequence[Sequence[int]]]],
    device: torch.device,
) -> tuple[list[nn.BatchNorm2d], torch.Tensor]:
    """For update_running_statistics of `groups` of edges run together (a group leaving one state, or a cell's
    groups), each (edges, their candidates): the BNs the candidates compute, and their rows in the statistics [R, C]
    the groups' [E, B, C] make one after the other. Kept in `plans` (the caller's, its last _PLANS_PER_GROUP sets of
    candidates): rebuilding them walked about 3,600 Python objects a DARTS step."""
    key = (tuple((tuple(map(id, edges)), tuple(map(tuple, candidates))) for edges, candidates in groups), device)
    if key not in plans:
        bns, rows, at = [], [], 0
        for edges, candidates in groups:
            B = len(edges[0].bns)
            for e, (edge, ks) in enumerate(zip(edges, candidates)):
                for k in ks:
                    bns += [edge.bns[row] for row in edge.bn_rows[k]]
                    rows += [at + e * B + row for row in edge.bn_rows[k]]
            at += len(edges) * B
        if len(plans) >= _PLANS_PER_GROUP:
            del plans[next(iter(plans))]
        plans[key] = bns, torch.tensor(rows, dtype=torch.long, device=device)
    return plans[key]


@torch.no_grad()
def update_running_statistics(
    bns: Sequence[nn.BatchNorm2d], rows: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, n: int
) -> None:
    """nn.BatchNorm2d's update of `bns` from rows `rows` of the statistics [R, C] of `ops.mixed_ops` or
    `ops.mixed_cell` over n values per channel (running_statistics_plan): an exponential average with the BN's
    momentum, of the unbiased variance. One foreach call per buffer kind for all of them (a DARTS cell has about 150
    such BNs)."""
    if not bns:
        return
    # Where a getattr finds the buffers (without Module.__getattr__'s cost), and where `.to()` or a widening puts
    # new ones: read at each call.
    buffers = [bn._buffers for bn in bns]
    unbiased = var * (n / max(n - 1, 1))
    means = mean.index_select(0, rows).unbind(0)
    variances = unbiased.index_select(0, rows).unbind(0)
    torch._foreach_add_([b["num_batches_tracked"] for b in buffers], 1)
    momenta = {bn.momentum for bn in bns}
    if len(momenta) == 1 and None not in momenta:
        (momentum,) = momenta
        torch._foreach_lerp_([b["running_mean"] for b in buffers], means, momentum)
        torch._foreach_lerp_([b["running_var"] for b in buffers], variances, momentum)
        return
    for bn, b, m, v in zip(bns, buffers, means, variances):
        # momentum None: a cumulative average, as nn.BatchNorm2d keeps it
        momentum = bn.momentum if bn.momentum is not None else 1.0 / float(b["num_batches_tracked"])
        b["running_mean"].lerp_(m, momentum)
        b["running_var"].lerp_(v, momentum)


def edges_leaving(
    x: torch.Tensor,
    edges: Sequence[MixedOp],
    weights: torch.Tensor,
    columns: Sequence[Columns],
    edge_scale: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """The outputs of `edges`, mixed ops that all read x, from one `ops.mixed_ops` call (which shares its passes
    over x between them); `weights` [E, len(PRIMITIVES)], `columns` per edge (each non-empty), `edge_scale` [E] a
    factor on each edge's whole output (None: 1). Updates the edges' running statistics in training, as
    nn.BatchNorm2d would. Edges with partial channels compute on the first C/K channels of x, the rest bypassing
    them (`ops.mixed_ops`'s partial_channels, inside the fused op)."""
    first = edges[0]
    candidates = [[_CANDIDATE_OF_COLUMN[c] for c in cols] for cols in columns]
    batch_statistics = first.batch_statistics()
    running = None
    if not batch_statistics:
        means, variances = zip(*(edge.running_statistics() for edge in edges))
        running = torch.stack(means), torch.stack(variances)
    bn = first.bns[0]
    outs, mean, var = ops.mixed_ops(
        x, weights[:, list(_COMPUTED_COLUMNS)], [edge.conv_weights() for edge in edges], first.stride, candidates,
        *(running or (None, None)), batch_statistics, bn.eps, first.pool_bn, first.recompute, first.partial_channels,
        edge_scale,
    )  # fmt: skip
    if first.training and bn.track_running_stats:
        bns, rows = running_statistics_plan(first._running_statistics_plans, [(edges, candidates)], mean.device)
        update_running_statistics(bns, rows, mean.flatten(0, 1), var.flatten(0, 1),
                                  outs[0].numel() // outs[0].shape[1])  # fmt: skip
    return outs


class _ConcatChannels(torch.autograd.Function):
    """torch.cat(states, dim=1), whose backward hands each state its gradient in the state's own layout. torch.cat's
    gives channel slices of the output's gradient, which no layout makes contiguous: every kernel that read one
    copied it, once per edge group (five times for a cell's last node)."""

    @staticmethod
    def forward(ctx, *states: torch.Tensor) -> torch.Tensor:
        # sizes and strides, not meta tensors: a CPU tensor made like a meta one goes through Python (about 280 us)
        ctx.layouts = [(s.shape, s.stride()) for s in states]
        return torch.cat(states, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = grad.split([shape[1] for shape, _ in ctx.layouts], dim=1)
        return tuple(grad.new_empty_strided(shape, stride).copy_(part) for part, (shape, stride) in
                     zip(parts, ctx.layouts))  # fmt: skip


class _NodeSum(torch.autograd.Function):
    """The sum of a node's incoming edge outputs by one weighted_sum pass with unit weights (the same bits as adding
    them in turn: each term is added to the running sum once), whose backward hands every term the node's gradient
    as it is (weighted_sum's own backward would write a scaled copy for each)."""

    @staticmethod
    def forward(ctx, *outs: torch.Tensor) -> torch.Tensor:
        ctx.terms = len(outs)
        return ops.weighted_sum(outs, outs[0].new_ones(len(outs)))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (grad,) * ctx.terms


def _node_sum(outs: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum(outs) in order, as DARTS's cell sums a node's inputs. On the kernels, three or more terms take one pass
    (a chain of adds reads each partial sum back and writes it again); the reference adds them in turn."""
    if len(outs) > 2 and ops.select("weighted_sum", outs[0].device) != "reference":
        return _NodeSum.apply(*outs)
    node = outs[0]
    for out in outs[1:]:
        node = node + out
    return node


# A state of the network: a tensor, or a cell's output as its nodes, whose concatenation along the channels it is.
State = torch.Tensor | list[torch.Tensor]


def _joined(state: State) -> torch.Tensor:
    """A state as one tensor: a cell's output nodes concatenated."""
    return state if isinstance(state, torch.Tensor) else _ConcatChannels.apply(*state)


def _batch_norm_arguments(bn: nn.BatchNorm2d) -> tuple:
    """(running_mean, running_var, training, momentum, eps) as nn.BatchNorm2d.forward passes them to F.batch_norm,
    after counting the batch as it does."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # a cumulative average
            momentum = 1.0 / float(bn.num_batches_tracked)
    training = bn.training or bn.running_mean is None
    keep_running = not bn.training or bn.track_running_stats
    return bn.running_mean if keep_running else None, bn.running_var if keep_running else None, training, momentum, \
        bn.eps  # fmt: skip


def _preprocess(modules: Sequence[ReLUConvBN | FactorizedReduce], s: State,
                relu_applied: bool) -> list[torch.Tensor]:  # fmt: skip
    """The preprocessing of input s by each of `modules` (several ReLUConvBN, or one FactorizedReduce), or of
    s = relu(input) when relu_applied (the modules' ReLU skipped). ReLUConvBNs run as one fused op
    (ops.relu_conv_bns, one pass over s, or over its nodes where they are, for all of them), a FactorizedReduce as
    ops.factorized_reduce_bn (its nodes read where they are too), on the modules' parameters and buffers: a search
    cell's BNs are affine-free."""
    if any((m.bn if isinstance(m, FactorizedReduce) else m[2]).affine for m in modules):
        raise ValueError(f"a search cell's preprocessing must be affine-free ({type(modules[0]).__name__}(..., "
                         "affine=False))")  # fmt: skip
    if isinstance(modules[0], FactorizedReduce):
        (module,) = modules
        return [ops.factorized_reduce_bn(s, module.conv_1.weight, module.conv_2.weight,
                                         *_batch_norm_arguments(module.bn), relu=not relu_applied)]  # fmt: skip
    weights = [conv.weight for _, conv, _ in modules]
    batch_norms = [_batch_norm_arguments(bn) for _, _, bn in modules]
    return ops.relu_conv_bns(s, weights, batch_norms, relu=not relu_applied)


class SearchCell(nn.Module):
    """A DAG of `steps` nodes over two inputs; each node sums the mixed ops from all its predecessors."""

    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev, pool_bn=True,
                 recompute=True, auxiliary_skip=False, partial_channels=1):  # fmt: skip
        super().__init__()
        self.reduction = reduction
        self.steps = steps
        self.multiplier = multiplier
        self.auxiliary_skip = auxiliary_skip
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        # Edges node-major, input-minor: node 0 <- (0, 1), node 1 <- (0, 1, 2), ...
        self.edges = nn.ModuleList(
            MixedOp(C, 2 if reduction and j < 2 else 1, pool_bn, recompute, auxiliary_skip, partial_channels)
            for i in range(steps)
            for j in range(2 + i)
        )
        self._running_statistics_plans: dict[tuple, tuple] = {}  # for its whole-cell calls (running_statistics_plan)

    def forward(
        self,
        s0: torch.Tensor,
        s1: torch.Tensor,
        weights: torch.Tensor,
        columns: Sequence[Columns] | None = None,
        auxiliary_skip: float | None = None,
        edge_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The cell's output for inputs s0 and s1: its preprocessing, then `nodes`, concatenated along the channels.
        The arguments are those of `nodes`."""
        s0 = _preprocess([self.preprocess0], s0, relu_applied=False)[0]
        s1 = _preprocess([self.preprocess1], s1, relu_applied=False)[0]
        return _ConcatChannels.apply(*self.nodes(s0, s1, weights, columns, auxiliary_skip, edge_scale))

    def nodes(
        self,
        s0: torch.Tensor,
        s1: torch.Tensor,
        weights: torch.Tensor,
        columns: Sequence[Columns] | None = None,
        auxiliary_skip: float | None = None,
        edge_scale: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The cell's last `multiplier` nodes, whose concatenation is its output, for inputs s0 and s1 already
        preprocessed (SearchNetwork preprocesses each state once for the cells that read it, and reads the nodes
        where they are). `weights` `[num_edges, len(PRIMITIVES)]`; `columns`, per edge, the ops to compute (None:
        all); `auxiliary_skip`, the weight of every edge's auxiliary skip (a cell built with them; columns None);
        `edge_scale` `[num_edges]`, a factor on each edge's whole output (None: 1).

        The whole cell is one `ops.mixed_cell` call (`_mixed_cell`), except with a stride-2 auxiliary skip (a
        FactorizedReduce of the edge's own, outside the fused op), where the edges leaving a state run as one group
        (`_nodes_by_group`). Either way the edges leaving s0 and s1 run first, then each node's as soon as it is
        complete, and each node sums its inputs' outputs in input order, as DARTS's cell does.
        """
        if auxiliary_skip is not None and (columns is not None or not self.auxiliary_skip):
            raise ValueError("SearchCell: an auxiliary skip needs a cell built with one, and every op computed")
        if not (auxiliary_skip is not None and self.reduction):
            return self._mixed_cell(s0, s1, weights, columns, auxiliary_skip, edge_scale)[-self.multiplier :]
        return self._nodes_by_group(s0, s1, weights, columns, auxiliary_skip, edge_scale)[-self.multiplier :]

    def _nodes_by_group(self, s0, s1, weights, columns, auxiliary_skip, edge_scale) -> list[torch.Tensor]:
        """Every node of the cell, the edges leaving each state as one `edges_leaving` call (the arguments are those
        of `nodes`)."""
        incoming: list[list[torch.Tensor]] = [[] for _ in range(self.steps)]  # per node, its edges' outputs so far
        states = [s0, s1]
        self._leave(0, states[0], weights, columns, incoming, auxiliary_skip, edge_scale)
        self._leave(1, states[1], weights, columns, incoming, auxiliary_skip, edge_scale)
        for i in range(self.steps):
            if incoming[i]:
                node = _node_sum(incoming[i])
            else:  # every incoming edge selected only `none`
                node = self.edges[edge_index(i, 0)].zeros(states[0])
            states.append(node)
            if i + 1 < self.steps:
                self._leave(2 + i, node, weights, columns, incoming, auxiliary_skip, edge_scale)
        return states[2:]

    def _mixed_cell(self, s0, s1, weights, columns, auxiliary_skip, edge_scale) -> list[torch.Tensor]:
        """Every node of the cell from one `ops.mixed_cell` call (the whole cell one autograd node on the fused
        backends), and the running statistics of every BN it computed updated in one call: the arguments are those
        of `nodes`, for a cell whose auxiliary skip, if any, is skip_connect's weight."""
        first, bn = self.edges[0], self.edges[0].bns[0]
        edge_columns = [_COMPUTED_COLUMNS] * len(self.edges) if columns is None else columns
        candidates = [[_CANDIDATE_OF_COLUMN[c] for c in cols] for cols in edge_columns]
        if auxiliary_skip is not None:  # a normal cell: every edge is stride 1
            weights = weights + auxiliary_skip * _SKIP_ONE_HOT.to(weights)
        stride = 2 if self.reduction else 1
        # The cell's groups as running_statistics_plan takes them: (edges, their candidates)
        groups = [([self.edges[e] for e in group.edges], [candidates[e] for e in group.edges])
                  for group in cell_groups(self.steps, stride, candidates, first.pool_bn)]  # fmt: skip
        running = (None, None)
        if not first.batch_statistics():
            means, variances = zip(*(edge.running_statistics() for edges, _ in groups for edge in edges))
            running = torch.cat(means), torch.cat(variances)
        nodes, mean, var = ops.mixed_cell(
            s0, s1, weights[:, list(_COMPUTED_COLUMNS)], [edge.conv_weights() for edge in self.edges], self.steps,
            stride, candidates, *running, first.batch_statistics(), bn.eps, first.pool_bn, first.recompute,
            first.partial_channels, edge_scale,
        )  # fmt: skip
        if first.training and bn.track_running_stats and groups:
            bns, rows = running_statistics_plan(self._running_statistics_plans, groups, mean.device)
            update_running_statistics(bns, rows, mean, var, nodes[0].numel() // nodes[0].shape[1])
        return nodes

    def _leave(self, state: int, h: torch.Tensor, weights: torch.Tensor, columns, incoming,
               auxiliary_skip: float | None = None, edge_scale: torch.Tensor | None = None) -> None:  # fmt: skip
        """Runs the edges from state `state` (value h) to every later node, appending their outputs to `incoming`.

        An auxiliary skip of weight b adds b * h on stride-1 edges, as b more weight on skip_connect (the same op,
        computed once in the fused op), and b * FactorizedReduce(h) on stride-2 edges (the edge's own module).
        `edge_scale` multiplies each edge's whole output."""
        nodes, indices = [], []
        for node in range(max(0, state - 1), self.steps):
            index = edge_index(node, state)
            if columns is None or columns[index]:  # an edge of only `none` adds zeros: skipped
                nodes.append(node)
                indices.append(index)
        if not indices:
            return
        edge_columns = [_COMPUTED_COLUMNS if columns is None else columns[i] for i in indices]
        edges, rows = [self.edges[i] for i in indices], weights[indices]
        stride = edges[0].stride  # the same for every edge leaving a state
        if auxiliary_skip is not None and stride == 1:
            rows = rows + auxiliary_skip * _SKIP_ONE_HOT.to(rows)
        # The scale goes into the fused op (folded into its weights) unless a stride-2 auxiliary skip, added after
        # the op, must be scaled with the edge.
        scale_inside = edge_scale is not None and not (auxiliary_skip is not None and stride == 2)
        outs = edges_leaving(h, edges, rows, edge_columns, edge_scale[indices] if scale_inside else None)
        if auxiliary_skip is not None and stride == 2:
            outs = [out + auxiliary_skip * edge.auxiliary(h) for out, edge in zip(outs, edges)]
        for node, index, out in zip(nodes, indices, outs):
            incoming[node].append(out if edge_scale is None or scale_inside else out * edge_scale[index])


def _cell_kind(cell: nn.Module) -> str:
    """The key of a cell's edge weights: "normal" or "reduce" (absent from them for a fixed reduction cell)."""
    return "reduce" if cell.reduction else "normal"


class SearchNetwork(nn.Module):
    """The supernet: stem, `layers` search cells (reductions at layers//3 and 2*layers//3), classifier.

    All normal cells share `alpha_normal`, all reduction cells `alpha_reduce`, each
    `[num_edges, len(method.primitives)]` in the method's column order and DARTS edge order (for PR-DARTS
    they hold the gate logits beta); `OpColumns` maps the columns onto the mixed ops by name. A method whose
    network_style names a fixed reduction cell (GDAS's FRC) has that cell, affine-free, at the reduction layers
    and no `alpha_reduce` (None). `method`
    (default `DARTSMethod`) turns them into the edge weights of each forward pass, and gives the
    regulariser and the genotype rule. Each edge is one
    `ops.mixed_op` call; `memory_format` (default channels_last, the kernels' layout) is the layout
    of the activations. `recompute` (default True) makes each fused mixed op keep only its input for
    backward and recompute the edge there; False keeps the edge's intermediates instead (faster, several
    times the memory: benchmarks/RESULTS.md). The method's `network_style` says whether the pools have BNs, whether the
    cells' BNs keep running statistics and whether a BN + ReLU precedes the global pooling.
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
        method: Method | None = None,
        memory_format: torch.memory_format = torch.channels_last,
        recompute: bool = True,
    ):
        super().__init__()
        self.memory_format = memory_format
        for name, value, low in (("C", C, 1), ("num_classes", num_classes, 2), ("layers", layers, 1),
                                 ("in_channels", in_channels, 1), ("steps", steps, 1),
                                 ("multiplier", multiplier, 1), ("stem_multiplier", stem_multiplier, 1)):  # fmt: skip
            if not isinstance(value, int) or value < low:
                raise ValueError(f"SearchNetwork: {name} must be an integer >= {low}, got {value!r}")
        if multiplier > steps:
            raise ValueError(f"SearchNetwork: multiplier ({multiplier}) cannot exceed steps ({steps})")
        check_flag("SearchNetwork", "recompute", recompute)
        if method is not None and not isinstance(method, Method):
            raise ValueError(f"SearchNetwork: method must be a fastdarts.methods.Method, got {type(method).__name__}")
        self.method = method if method is not None else DARTSMethod()
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
        style = self.method.network_style
        self.partial_channels = style.partial_channels  # K of every mixed op (widen_partial_channels changes it)
        cells = []
        for i in range(layers):
            reduction = i in self.reduction_indices
            if reduction:
                C_curr *= 2
            if reduction and style.fixed_reduction:
                cell = FIXED_REDUCTION_CELL_MODULES[style.fixed_reduction](C_prev_prev, C_prev, C_curr, reduction_prev,
                                                                           affine=False)  # fmt: skip
            else:
                cell = SearchCell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev,
                                  style.pool_bn, recompute, style.auxiliary_skip, style.partial_channels)  # fmt: skip
            if not style.running_statistics:
                drop_running_statistics(cell)
            cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
        self.cells = nn.ModuleList(cells)
        # A BN and ReLU before the pooling when the method's network has them (PR-DARTS's); else nothing.
        self.head = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU()) if style.head_bn_relu else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

        self.op_columns = OpColumns(self.method.primitives)
        num_edges = cell_edge_count(steps)
        self.alpha_normal = nn.Parameter(self.method.initial_arch(num_edges))
        if style.fixed_reduction:
            self.register_parameter("alpha_reduce", None)
        else:
            self.alpha_reduce = nn.Parameter(self.method.initial_arch(num_edges))
        columns = len(self.method.primitives) + self.method.extra_arch_columns
        if self.alpha_normal.shape != (num_edges, columns):
            raise ValueError(f"SearchNetwork: {self.method.name}'s initial_arch must be [{num_edges}, {columns}], "
                             f"got {list(self.alpha_normal.shape)}")  # fmt: skip

    @property
    def reduction_indices(self) -> tuple[int, int]:
        return self.layers // 3, 2 * self.layers // 3

    def arch_parameters(self) -> list[nn.Parameter]:
        return list(self.arch_parameters_by_cell().values())

    def arch_parameters_by_cell(self) -> dict[str, nn.Parameter]:
        """The architecture parameters of each searched cell type (not of a fixed reduction cell)."""
        if self.alpha_reduce is None:
            return {"normal": self.alpha_normal}
        return {"normal": self.alpha_normal, "reduce": self.alpha_reduce}

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def named_weight_parameters(self) -> list[tuple[str, nn.Parameter]]:
        arch = {id(p) for p in self.arch_parameters()}
        return [(n, p) for n, p in self.named_parameters() if id(p) not in arch]

    @property
    def samples_each_forward(self) -> bool:
        """Whether every forward pass draws new random edge weights (the method's gates)."""
        return self.method.samples_each_forward

    def edge_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The method's deterministic per-edge op distribution (a softmax for DARTS and PR-DARTS):
        (normal, reduce), each `[num_edges, len(method.primitives)]`; reduce None for a fixed reduction cell."""
        arch = self.arch_parameters_by_cell()
        weights = {cell: self.method.cell_edge_weights(cell, alpha) for cell, alpha in arch.items()}
        return weights["normal"], weights.get("reduce")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.method.forward_weights(self.arch_parameters_by_cell())
        weights = {kind: self.op_columns(w) for kind, w in weights.items()}
        auxiliary_skip = self.method.auxiliary_skip()
        columns = {kind: selected_columns(w.mask) for kind, w in weights.items()}
        # channels_last by default: the layout the fused kernels compute in, and the faster one for eager PyTorch on
        # the CPU too (the fused op returns channels_last whatever it is given). The stem runs in it as well: its BN
        # backward would otherwise mix the layouts of its input and of the gradient coming back.
        s0 = s1 = self.stem(x.contiguous(memory_format=self.memory_format)).contiguous(memory_format=self.memory_format)
        # Each state feeds the preprocessing of the next two cells, which both start with a ReLU. The C++ kernels
        # apply it as they read the state, and mask the gradient in the same pass; elsewhere it runs once, and its
        # backward once on the sum of both cells' gradients. The C++ kernels also read a cell's output as its nodes
        # where they are (a list): only a fixed reduction cell and a head (BN and ReLU before the classifier)
        # concatenate them; the global pooling pools each node.
        shared_relu = ops.select("relu_conv_bn", s0.device) != "cpp"
        r0 = r1 = None  # relu(s0), relu(s1), once a searched cell has needed them
        ready: dict[tuple[int, int], torch.Tensor] = {}  # (cell, input): preprocessed with an earlier one
        for j, cell in enumerate(self.cells):
            kind = _cell_kind(cell)
            if kind not in weights:  # a fixed reduction cell, which reads its inputs whole
                s0, s1 = _joined(s0), _joined(s1)  # s1 joined once, for the next cell as well
                s0, s1, r0, r1 = s1, cell(s0, s1), r1, None
                continue
            inputs = s0, s1
            if shared_relu:
                if r1 is None:
                    r1 = s1.relu()
                if r0 is None:
                    r0 = r1 if s0 is s1 else s0.relu()
                inputs = r0, r1
            for slot in (0, 1):
                if (j, slot) not in ready:
                    self._preprocess_state(j, slot, inputs, shared_relu, weights, ready)
            nodes = cell.nodes(ready.pop((j, 0)), ready.pop((j, 1)), weights[kind].weights, columns[kind],
                               auxiliary_skip, weights[kind].edge_scale)  # fmt: skip
            s0, s1, r0, r1 = s1, _ConcatChannels.apply(*nodes) if shared_relu else nodes, r1, None
        if self.head is not None:
            s1 = self.head(_joined(s1))
        nodes = [s1] if isinstance(s1, torch.Tensor) else s1
        return self.classifier(torch.cat([self.global_pooling(node).flatten(1) for node in nodes], 1))

    def _preprocess_state(self, j: int, slot: int, inputs: tuple[State, State], relu_applied: bool,
                          weights: dict, ready: dict[tuple[int, int], torch.Tensor]) -> None:  # fmt: skip
        """Preprocesses input `slot` of searched cell j (inputs[slot]) into ready[(j, slot)], and in the same call the
        other inputs of cells j and j + 1 that read the same state through a ReLUConvBN: cell j + 1's input 0 is
        cell j's input 1, and the stem is both inputs of cell 0."""

        def module(c: int, s: int) -> ReLUConvBN | FactorizedReduce:
            return self.cells[c].preprocess0 if s == 0 else self.cells[c].preprocess1

        readers, first = [(j, slot)], module(j, slot)
        for other in ((j, 1), (j + 1, 0)) if isinstance(first, ReLUConvBN) else ():
            c, other_slot = other
            if other == (j, slot) or other in ready or c >= len(self.cells) or inputs[1] is not inputs[slot]:
                continue
            searched = _cell_kind(self.cells[c]) in weights
            if searched and isinstance(module(c, other_slot), ReLUConvBN):
                readers.append(other)
        outs = _preprocess([module(c, s) for c, s in readers], inputs[slot], relu_applied)
        for reader, out in zip(readers, outs):
            ready[reader] = out

    def regulariser(self) -> torch.Tensor | None:
        """The method's term for the architecture loss, for the last forward pass (None for DARTS)."""
        return self.method.regulariser()

    def diagnostics(self) -> dict[str, float]:
        """The method's per-epoch figures (entropies of the edge weights; PR-DARTS: mean P(g != 0) per group)."""
        return self.method.diagnostics(self.arch_parameters_by_cell())

    def genotype(self) -> Genotype:
        normal = self.method.derive_cell_of("normal", self.alpha_normal, self.steps)
        normal_concat = self.method.cell_concat(normal, self.steps, self.multiplier)
        fixed = self.method.network_style.fixed_reduction
        if fixed:
            return Genotype(normal=normal, normal_concat=normal_concat, reduce=fixed, reduce_concat=[])
        reduce = self.method.derive_cell_of("reduce", self.alpha_reduce, self.steps)
        return Genotype(
            normal=normal,
            normal_concat=normal_concat,
            reduce=reduce,
            reduce_concat=self.method.cell_concat(reduce, self.steps, self.multiplier),
        )


# How a tensor grows along its channel dimensions: steps (dim, source), each `t = t.index_select(dim, source)`, where
# source[j] is the old channel that new channel j holds (the old channels first, in order, then the copies).
Widening = tuple[tuple[int, torch.Tensor], ...]


def widened(t: torch.Tensor, steps: Widening) -> torch.Tensor:
    """`t` grown by `steps` (a parameter's, to grow its momentum buffer the same way)."""
    for dim, source in steps:
        t = t.index_select(dim, source.to(t.device))
    return t


@torch.no_grad()
def widen_partial_channels(model: SearchNetwork, k: int, generator: torch.Generator) -> dict[nn.Parameter, Widening]:
    """Widen the partial-channel mixed ops of `model` from C/K to C/k of their channels (K `model.partial_channels`,
    k < K), as DrNAS's `model.wider(k)` does at its second stage, by its Net2Wider rule; returns how each widened
    parameter grew (the same Parameter objects, given new data), for the weights' optimizer (`widened`).

    Every op on an edge's processed channels takes more input channels (those the bypass no longer gets) and gives
    as many more outputs. Each new channel of a depthwise conv, a pointwise conv's output, a FactorizedReduce conv's
    input or output and a pool's BN is a copy of an old one drawn uniformly from `generator`, one draw per tensor in
    the published order (per edge the ops in PRIMITIVES order; a SepConv's blocks in turn); the pointwise conv after
    a depthwise one copies its input columns by the depthwise conv's draw, not divided by how often a channel is
    copied (the published code does not), and each BN (its running statistics, and its weight and bias if affine)
    follows the draw of the conv before it. The new input channels carry other data than the channels they copy, so
    the network's function changes, as in the published search. One deliberate difference: a FactorizedReduce's BN
    follows the copies of each of its two convs (the published code appends them after both halves, which mixes up
    its running statistics). Pruned ops are widened too: the published code widens every op.
    """
    K = model.partial_channels
    if not (isinstance(k, int) and 1 <= k < K):
        raise ValueError(f"widen_partial_channels: k must be an integer in 1..{K - 1} (the network's K is {K}), "
                         f"got {k!r}")  # fmt: skip
    steps: dict[nn.Parameter, Widening] = {}

    def copies(old: int, new: int) -> torch.Tensor:
        return torch.cat([torch.arange(old), torch.randint(old, (new - old,), generator=generator)])

    def grow(module: nn.Module, name: str, grown: Widening) -> None:
        tensor = getattr(module, name)
        if tensor is None:  # an affine-free BN's weight, a BN without running statistics
            return
        if isinstance(tensor, nn.Parameter):
            tensor.data = widened(tensor.data, grown)
            tensor.grad = None
            steps[tensor] = grown
        else:
            setattr(module, name, widened(tensor, grown))

    def grow_bn(bn: nn.BatchNorm2d, source: torch.Tensor) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            grow(bn, name, ((0, source),))
        bn.num_features = len(source)

    def grow_conv(conv: nn.Conv2d, in_source: torch.Tensor | None, out_source: torch.Tensor) -> None:
        grown = ((0, out_source),) if in_source is None else ((1, in_source), (0, out_source))
        grow(conv, "weight", grown)
        conv.out_channels = len(out_source)
        if in_source is None:  # depthwise: a group per channel
            conv.in_channels = conv.groups = len(out_source)
        else:
            conv.in_channels = len(in_source)

    def widen_op(op: nn.Module, old: int, new: int) -> None:
        if isinstance(op, SepConv):
            for block in op:
                widen_op(block, old, new)
        elif isinstance(op, DilConv):
            _, depthwise, pointwise, bn = op
            source = copies(old, new)
            grow_conv(depthwise, None, source)
            out = copies(old, new)
            grow_conv(pointwise, source, out)
            grow_bn(bn, out)
        elif isinstance(op, FactorizedReduce):
            if new % 2:
                raise ValueError(f"widen_partial_channels: a FactorizedReduce needs an even number of channels, "
                                 f"got {new}")  # fmt: skip
            halves = []
            for conv in (op.conv_1, op.conv_2):
                inputs = copies(old, new)
                halves.append(copies(old // 2, new // 2))
                grow_conv(conv, inputs, halves[-1])
            grow_bn(op.bn, torch.cat([halves[0], old // 2 + halves[1]]))
        elif isinstance(op, nn.Sequential):  # a pool and its BN
            for m in op:
                if isinstance(m, nn.BatchNorm2d):
                    grow_bn(m, copies(old, new))
        elif not isinstance(op, (nn.MaxPool2d, nn.AvgPool2d, Identity)):
            raise TypeError(f"widen_partial_channels: no widening rule for a {type(op).__name__}")

    for edge in (m for m in model.modules() if isinstance(m, MixedOp)):
        channels = edge.width * K
        if channels % k:
            raise ValueError(f"widen_partial_channels: {channels} channels do not split into {k} partial-channel "
                             f"groups")  # fmt: skip
        for op in edge.candidates:
            widen_op(op, edge.width, channels // k)
        edge.width, edge.partial_channels = channels // k, k
    model.partial_channels = k
    return steps
