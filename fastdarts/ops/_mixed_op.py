"""The fused mixed ops: one autograd node for all the DARTS edges leaving one state (a group of one is `mixed_op`),
built from one backend's kernels and ATen GEMMs. An edge is written once (`_Edge`) over a set of building blocks
(`EdgeKernels`), and a group (`_EdgeGroup`) runs the passes its edges share; `define_mixed_ops` registers the group
op and its backward for one backend: fastdarts::mixed_ops on the C++ kernels (below, when fastdarts._C loaded) and
fastdarts_triton::mixed_ops on the Triton kernels (_triton.py). On the C++ backend the group itself runs in C++
(fastdarts::edge_group, csrc/cpu/edge_group.cpp: the same passes, bit for bit, without Python between the kernels);
the Python group here is its specification and what the Triton backend runs. One level up, `namespace::mixed_cell`
is a whole search cell as one node: its groups one after the other and the node sums (`edge_cell`, run in C++ by
fastdarts::edge_cell on the C++ backend, again bit for bit).

Forward: relu(x) is read once by the relu_dwconv_pointwise kernel for the first stage of every conv of every edge
of the group, each depthwise conv going straight into its 1x1 conv tile by tile (the depthwise outputs are never
written) with the BN statistics of the result in the same pass; a sep conv's second stage is the same kernel on its
first stage's output, which it normalises with the middle BN's statistics as it reads it; x is read once more by
the pool_bn_stats kernel for both pools and their BN statistics, which every edge of the group shares, and on a
stride-2 group once more by factorized_reduce_bn_stats for every edge's skip (FactorizedReduce); per edge, the
candidates' last BNs and the edge weights fold into one bn_weighted_sum. Only the edges' sums leave the op.

Backward: per edge, one bn_weighted_sum_backward_factors pass gives every candidate's dL/dw and BN backward: written
out for the pools, and as per-channel factors for the others: the convs' relu_dwconv_pointwise_backward and the
stride-2 skips' factorized_reduce_bn_stats_backward form dL/dt from the edge's gradient and t as they read them (a
sep conv's middle BN the same way, from the sums of its second stage's backward), and the stride-1 skip's, w[k]
times the edge's gradient, goes into the sum that makes dL/dx as that gradient with weight w[k].

Memory: autograd keeps x (which the cell holds anyway), the weights and the BN statistics ([E, B, C]). The
backward recomputes the group's intermediates, uses them, and drops them: they live for one forward or backward
call, not from the forward to the backward of the whole network. It computes only what is asked for: no
conv-weight gradients in a first-order architecture step, no `w` gradient in a weight step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._prims_common import suggest_memory_format

from . import reference
from ._autograd import below_autograd, check_supported_dtype, refuse_differentiation
from ._extension import EXTENSION_LOADED
from .reference import (
    MIXED_OP_CANDIDATES,
    CellGroup,
    candidates_valid,
    cell_groups,
    check_mixed_cell_arguments,
    check_mixed_op_arguments,
    check_mixed_ops_edges,
    check_partial_channels,
    edge_index,
    factorized_reduce_halves,
    factorized_reduce_halves_backward,
    formed_grads,
    joined_channels,
    mixed_op_layout,
    mixed_op_output_shape,
    normalised,
    raise_unless,
)


@dataclass(frozen=True)
class EdgeKernels:
    """The building blocks of an edge on one backend, each with the signature of the C++ op of its name."""

    backend: str  # the backend's name in the dispatch table, for messages
    # (x, weights, pointwise_weights, dilations, stride, relu[, input_mean, input_invstd])
    #   -> (outs, mean [K, C], var [K, C])
    relu_dwconv_pointwise: Callable[..., tuple]
    # (grads, x, weights, pointwise_weights, dilations, stride, relu, input_grad, weight_grad[, input_mean,
    #  input_invstd[, grad_inputs, grad_factors]]) -> (grad_x or None, grad_weights or [], grad_pointwise_weights or
    #  [], input_sums or None); with grad_inputs and grad_factors, the output gradients are reference.formed_grads
    relu_dwconv_pointwise_backward: Callable[..., tuple]
    pool_bn_stats: Callable[..., tuple]  # (x, stride) -> (max_out, avg_out, mean, var)
    pool_bn_stats_backward: Callable[..., Tensor]  # (grad_max or None, grad_avg or None, x, stride) -> grad_x
    weighted_sum: Callable[..., Tensor]  # (xs, w)
    # (xs, conv_1s, conv_2s, relu) -> (outs, mean [E, C], var [E, C]), x = torch.cat(xs, 1)
    factorized_reduce_bn_stats: Callable[..., tuple]
    # (grads, xs, conv_1s, conv_2s, relu, input_grad, weight_grad[, grad_inputs, grad_factors]) -> (grad_xs or [],
    #  grad_conv_1s or [], grad_conv_2s or []); formed gradients as relu_dwconv_pointwise_backward's
    factorized_reduce_bn_stats_backward: Callable[..., tuple]
    bn_weighted_sum: Callable[..., Tensor]  # (ts, w, mean, invstd)
    # (grad, ts, w, mean, invstd, batch_statistics, input_grad, w_grad) -> (grad_ts or [], grad_w or None)
    bn_weighted_sum_backward: Callable[..., tuple]
    # (grad, ts, w, mean, invstd, batch_statistics, written, w_grad) -> (grad_ts of the written rows, factors
    #  [K, 4, C], grad_w or None), as the C++ op bn_weighted_sum_backward_factors
    bn_weighted_sum_backward_factors: Callable[..., tuple]
    # (outs, x, partial_channels, stride, bypass_w) -> the edges' full-width outputs
    partial_channel_outputs: Callable[..., list]
    # (grads, x, partial_channels, stride, bypass_w, x_grad, bypass_w_grad) -> (the ops' gradients, one per given
    #  gradient; dL/dx of the bypass or None; dL/dbypass_w or None)
    partial_channel_outputs_backward: Callable[..., tuple]
    # (outs, xs, partial_channels, bypass_w) -> a node: its edges' full-width outputs summed in edge order
    partial_channel_node: Callable[..., Tensor]


_CHANNELS_LAST = torch.channels_last
_MAX_POOL, _AVG_POOL, _SKIP, _SEP3, _SEP5, _DIL3, _DIL5 = range(len(MIXED_OP_CANDIDATES))
_FIRST_STAGE_DILATION = {_SEP3: 1, _SEP5: 1, _DIL3: 2, _DIL5: 2}


def _pointwise(z: Tensor, weight: Tensor) -> Tensor:
    """A 1x1 conv. oneDNN's on channels_last ran faster here than torch.mm on the [N*H*W, C] matrix."""
    return F.conv2d(z, weight)


def _pointwise_backward(dt: Tensor, z: Tensor, weight: Tensor, weight_grad: bool) -> tuple[Tensor, Tensor | None]:
    """(dL/dz, dL/dweight if weight_grad) of _pointwise(z, weight) for dL/dt, in one ATen call."""
    dz, dweight, _ = torch.ops.aten.convolution_backward.default(
        dt, z, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, weight_grad, False]
    )
    return dz, dweight


def composed_factorized_reduce_bn_stats_backward(
    grads: Sequence[Tensor], xs: Sequence[Tensor], conv_1s: Sequence[Tensor], conv_2s: Sequence[Tensor], relu: bool,
    input_grad: bool, weight_grad: bool, grad_inputs: Sequence[Tensor] | None = None,
    grad_factors: Tensor | None = None,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:  # fmt: skip
    """factorized_reduce_bn_stats_backward's results for a backend without its kernel: per output, the same
    subsampled halves and block-diagonal matrix as reference.factorized_reduce, in two matrix products on the BLAS
    (no strided 1x1 oneDNN conv, see there), then the ReLU's mask and the sum over the outputs, split into the
    gradients of x = torch.cat(xs, 1)'s parts; with grad_inputs and grad_factors, the output gradients formed first
    (reference.formed_grads)."""
    if grad_inputs is not None:
        grads = formed_grads(grads, grad_inputs, grad_factors)
    x = joined_channels(xs)
    N, C = x.shape[:2]
    half = conv_1s[0].shape[0]
    r = x.relu() if relu else x
    halves = factorized_reduce_halves(r).permute(0, 2, 3, 1).reshape(-1, 2 * C) if weight_grad else None
    grad_1s, grad_2s, grad_x = [], [], None
    for dt, conv_1, conv_2 in zip(grads, conv_1s, conv_2s):
        dt_rows = dt.permute(0, 2, 3, 1).reshape(-1, 2 * half)  # [N Ho Wo, C_out]
        if weight_grad:  # the diagonal blocks of the matrix's gradient dt_rows^T halves
            grad_1s.append((dt_rows[:, :half].t() @ halves[:, :C]).reshape(conv_1.shape))
            grad_2s.append((dt_rows[:, half:].t() @ halves[:, C:]).reshape(conv_2.shape))
        if input_grad:
            matrix = torch.block_diag(conv_1.flatten(1), conv_2.flatten(1))
            d_halves = (dt_rows @ matrix).reshape(N, dt.shape[2], dt.shape[3], 2 * C).permute(0, 3, 1, 2)
            grad_r = factorized_reduce_halves_backward(d_halves, x.shape, _CHANNELS_LAST)
            grad_x = grad_r if grad_x is None else grad_x + grad_r
    if grad_x is None:
        return [], grad_1s, grad_2s
    if relu:
        grad_x = torch.ops.aten.threshold_backward.default(grad_x, x, 0)
    if len(xs) == 1:
        return [grad_x], grad_1s, grad_2s
    parts = grad_x.split([part.shape[1] for part in xs], dim=1)
    return [g.contiguous(memory_format=suggest_memory_format(part)) for g, part in zip(parts, xs)], grad_1s, grad_2s


def composed_relu_dwconv_pointwise(
    relu_dwconv: Callable[..., list[Tensor]], relu_dwconv_backward: Callable[..., tuple]
):
    """relu_dwconv_pointwise and its backward composed of a backend's relu_dwconv kernels and ATen's 1x1 convs and BN
    statistics (for a backend without the fused kernel): the same results, with the depthwise outputs (and a
    normalised input) written and read back (and recomputed by the backward)."""

    def forward(x, weights, pointwise_weights, dilations, stride, relu, input_mean=None, input_invstd=None):
        if input_mean is not None:
            x = normalised(x, input_mean, input_invstd)
        zs = relu_dwconv(x, weights, dilations, stride, relu)
        ts = [_pointwise(z, p) for z, p in zip(zs, pointwise_weights)]
        # ATen's statistics pass: mean and biased variance (torch.var_mean over (0, 2, 3) is far slower on
        # channels_last, benchmarks/RESULTS.md), without gradient, as from the fused kernel.
        moments = [torch.ops.aten.batch_norm_update_stats.default(t.detach(), None, None, 0.0) for t in ts]
        return ts, torch.stack([m for m, _ in moments]), torch.stack([v for _, v in moments])

    def backward(grads, x, weights, pointwise_weights, dilations, stride, relu, input_grad, weight_grad,
                 input_mean=None, input_invstd=None, grad_inputs=None, grad_factors=None):  # fmt: skip
        """As the C++ op's: with input_mean and input_invstd, the gradient with respect to the normalised x u, and
        the sums of it and of it times u; with grad_inputs and grad_factors, the output gradients formed first."""
        if grad_inputs is not None:
            grads = formed_grads(grads, grad_inputs, grad_factors)
        if input_mean is not None:
            x = normalised(x, input_mean, input_invstd)
        zs = relu_dwconv(x, weights, dilations, stride, relu)
        dzs, grad_pointwise = [], []
        for dt, z, p in zip(grads, zs, pointwise_weights):
            dz, dp = _pointwise_backward(dt, z, p, weight_grad)
            dzs.append(dz)
            grad_pointwise.append(dp)
        grad_x, grad_weights = relu_dwconv_backward(dzs, x, weights, dilations, stride, relu, input_grad, weight_grad)
        input_sums = None
        if input_grad and input_mean is not None:
            input_sums = torch.stack([grad_x.sum((0, 2, 3)), (grad_x * x).sum((0, 2, 3))])
        return grad_x, grad_weights, (grad_pointwise if weight_grad else []), input_sums

    return forward, backward


def _saved_names(candidates: Sequence[int], stride: int) -> list[str]:
    """What an edge's backward reads besides x and the pools (which its group keeps once for all its edges), in a
    fixed order: each candidate's tensor before its last BN ("t"), and a sep conv's first pointwise output ("t_1"),
    which its second stage reads through the middle BN."""
    names = []
    for k in candidates:
        if k == _SKIP and stride == 1 or k in (_MAX_POOL, _AVG_POOL):
            continue  # the skip's tensor is x
        names.append(f"t{k}")
        if k in (_SEP3, _SEP5):
            names.append(f"t{k}_1")
    return names


def _weight_starts(stride: int) -> list[int]:
    """Per candidate, where its conv weights start in an edge's weights (mixed_op_layout order)."""
    starts, at = [], 0
    for num_weights, _ in mixed_op_layout(stride):
        starts.append(at)
        at += num_weights
    return starts


def candidate_weights(weights: Sequence[Tensor], stride: int) -> dict[int, list[Tensor]]:
    """An edge's conv weights per candidate."""
    starts, layout = _weight_starts(stride), mixed_op_layout(stride)
    return {k: list(weights[start : start + n]) for k, (start, (n, _)) in enumerate(zip(starts, layout))}


def uncomputed_weights(stride: int, candidates: Sequence[int], counts: Sequence[int],
                       in_loss: Sequence[bool]) -> set[int]:  # fmt: skip
    """Positions, in a group's flat weights, of the convs of the candidates its edges do not compute, and of every
    conv of an edge whose output is not in the loss (`in_loss`, per edge). Their gradient is None, as under the
    reference backend, whose graph never reaches them: a zero gradient would let an optimizer apply momentum and
    weight decay to weights the step did not use."""
    per_edge = sum(n for n, _ in mixed_op_layout(stride))
    computed = set()
    for e, edge_candidates in enumerate(_split(candidates, counts)):
        if in_loss[e]:
            computed.update(_weight_positions(stride, edge_candidates, e * per_edge))
    return set(range(per_edge * len(counts))) - computed


def _weight_positions(stride: int, candidates: Sequence[int], start: int) -> list[int]:
    """Positions of the conv weights of an edge's `candidates`, its weights starting at `start` in a flat list."""
    layout, starts = mixed_op_layout(stride), _weight_starts(stride)
    return [i for k in candidates for i in range(start + starts[k], start + starts[k] + layout[k][0])]


def _saved_count(stride: int, candidates: Sequence[Sequence[int]]) -> int:
    """How many tensors a group of edges with these candidates keeps for its backward (edge_group's saved with
    keep): each pool some edge computes once, then each edge's _saved_names."""
    pools = {k for ks in candidates for k in ks if k in (_MAX_POOL, _AVG_POOL)}
    return len(pools) + sum(len(_saved_names(ks, stride)) for ks in candidates)


def candidate_rows(stride: int, pool_bn: bool) -> dict[int, int]:
    """Per candidate, its first BN's row in the edge's statistics."""
    rows, at = {}, 0
    for k, (_, num_bns) in enumerate(mixed_op_layout(stride, pool_bn)):
        rows[k], at = at, at + num_bns
    return rows


class _Edge:
    """One edge on `kernels`: its forward, keeping what the backward needs when asked to (`keep`), and its backward.

    Every candidate ends in a tensor its last BN normalises (x itself for the stride-1 skip, and the pools' outputs
    when they have no BN); those BNs are not applied one by one: `bn_weighted_sum` folds them, with the edge weights,
    into the sum, and its backward gives every candidate's dL/dt (w[k] and the path through the batch statistics
    included; written out, or as factors that the backward kernels form it from) and dL/dw in one pass.
    """

    def __init__(self, kernels, x, w, weights, stride, candidates, mean, var, training, eps, pool_bn, keep,
                 first_stage=None, pools=None, saved=None, saved_pools=None):  # fmt: skip
        """`mean` and `var` ([B, C]) are the edge's rows of its group's BN statistics: a forward in training records
        its batch statistics in them, otherwise they are the statistics to normalise with (the running ones, or in a
        backward those the forward used). `first_stage` (per conv candidate: its first 1x1 conv's output, batch mean and
        variance; for the stride-2 skip, its FactorizedReduce's) and `pools` (pool_bn_stats's outputs, or None when
        no pool is computed) come from the group, which computes them for every edge leaving x at once. With
        `saved` (the tensors of _saved_names, from a forward with keep), nothing is computed: the edge is restored
        for its backward, with the pools' outputs from `saved_pools` ({k: output}). The group sets
        `final_statistics` once every row is recorded."""
        self.kernels, self.w = kernels, w
        self.x, self.stride, self.candidates = x, stride, list(candidates)
        self.candidate_index = index_tensor(tuple(self.candidates), x.device)
        self.training, self.eps, self.pool_bn, self.keep = training, eps, pool_bn, keep
        self.weights, self.rows = candidate_weights(weights, stride), candidate_rows(stride, pool_bn)
        self.mean, self.var = mean, var
        self.pools = pools
        # ([K, C] mean, [K, C] invstd) of the candidates' last BNs, zeros and ones for a tensor added as it is
        self.final_statistics: tuple[Tensor, Tensor] | None = None
        self.middle_statistics: dict[int, tuple[Tensor, Tensor]] = {}
        if saved is not None:
            self.kept = dict(zip(_saved_names(self.candidates, stride), saved))
            self.kept.update({f"t{k}": t for k, t in (saved_pools or {}).items()})
            finals = [x if k == _SKIP and stride == 1 else self.kept[f"t{k}"] for k in self.candidates]
        else:
            self.kept: dict[str, Tensor] = {}  # what the backward reads, when keep
            self.first_stage = first_stage
            finals = [self._candidate(k) for k in self.candidates]
        # Per candidate: the tensor its last BN normalises and that BN's row (None: added as it is).
        self.finals = [(t, self._final_row(k)) for t, k in zip(finals, self.candidates)]

    def _keep(self, **tensors: Tensor) -> None:
        if self.keep:
            self.kept.update(tensors)

    def _final_row(self, k: int) -> int | None:
        if k == _SKIP and self.stride == 1 or k in (_MAX_POOL, _AVG_POOL) and not self.pool_bn:
            return None
        return self.rows[k] + 1 if k in (_SEP3, _SEP5) else self.rows[k]  # a sep conv's second BN is its last

    def _final(self, t: Tensor, k: int, mean: Tensor | None = None, var: Tensor | None = None) -> Tensor:
        """t, the input of candidate k's last BN, whose batch statistics (in training) this records: `mean` and
        `var` when the kernel that made t gave them, else ATen's statistics pass over t."""
        self._keep(**{f"t{k}": t})
        if self.training:
            if mean is None:
                # ATen's BN statistics pass (mean and biased variance); torch.var_mean over (0, 2, 3) is 11.7x slower
                # on channels_last (benchmarks/RESULTS.md).
                mean, var = torch.ops.aten.batch_norm_update_stats.default(t, None, None, 0.0)
            row = self._final_row(k)
            self.mean[row], self.var[row] = mean, var
        return t

    def _middle_statistics(self, row: int) -> tuple[Tensor, Tensor]:
        """([1, C] mean, [1, C] invstd) of BN row `row` (recorded by then), made once for the BN and its backward."""
        if row not in self.middle_statistics:
            self.middle_statistics[row] = self.mean[row : row + 1], (self.var[row : row + 1] + self.eps).rsqrt()
        return self.middle_statistics[row]

    def _candidate(self, k: int) -> Tensor:
        x, stride, row, ws = self.x, self.stride, self.rows[k], self.weights[k]
        if k in (_MAX_POOL, _AVG_POOL):
            pooled = self.pools[k]
            if self.pool_bn and self.training:  # the kernel's statistics spare a pass over the output
                self.mean[row], self.var[row] = self.pools[2][k], self.pools[3][k]
            return pooled
        if k == _SKIP and stride == 1:
            return x
        t1, mean, var = self.first_stage[k]  # for the stride-2 skip, its FactorizedReduce
        if k in (_SKIP, _DIL3, _DIL5):
            return self._final(t1, k, mean, var)
        # A sep conv's middle BN (t1's batch statistics in training, the recorded ones otherwise) is applied by the
        # second stage's kernel as it reads t1: the normalised tensor is never written.
        if self.training:
            self.mean[row], self.var[row] = mean, var
        self._keep(**{f"t{k}_1": t1})
        (t2,), mean, var = self.kernels.relu_dwconv_pointwise(
            t1, [ws[2]], [ws[3]], [1], 1, True, *self._middle_statistics(row)
        )  # fmt: skip
        return self._final(t2, k, mean[0], var[0])

    def saved(self) -> list[Tensor]:
        """The tensors of _saved_names (after a forward with keep)."""
        return [self.kept[name] for name in _saved_names(self.candidates, self.stride)]

    def final_rows(self) -> tuple[int, ...]:
        """Per candidate, its last BN's row in the edge's statistics; B (one past the last) for a tensor added as it
        is."""
        B = self.mean.shape[0]
        return tuple(B if row is None else row for _, row in self.finals)

    def out(self) -> Tensor:
        if not self.finals:
            return self.x.new_zeros(mixed_op_output_shape(self.x, self.stride)).contiguous(memory_format=_CHANNELS_LAST)
        ts = [t.contiguous(memory_format=_CHANNELS_LAST) for t, _ in self.finals]
        return self.kernels.bn_weighted_sum(ts, self.w.index_select(0, self.candidate_index), *self.final_statistics)

    # The backward ---------------------------------------------------------------------------------------------

    def _middle_bn_factors(self, grad: Tensor, sums: Tensor, k: int) -> Tensor:
        """The factors [1, 4, C] (a, b, mean, e) of dL/dt_1 = a grad + b (t_1 - mean) + e for a sep conv's first BN,
        u = BN(t_1), given dL/du = grad's sums over (N, H, W) of grad and of grad u from the second stage's backward
        (`sums` [2, C]): with batch statistics, dL/dt_1 = invstd (grad - mean(grad) - u mean(grad u)), so a = invstd,
        b = -invstd^2 mean(grad u) and e = -invstd mean(grad); with fixed ones, invstd grad. The first stage's
        backward forms dL/dt_1 from them as it reads grad and t_1."""
        mean, invstd = self._middle_statistics(self.rows[k])
        if not self.training:
            zero = torch.zeros_like(invstd)
            return torch.stack([invstd, zero, mean, zero], 1)
        means = sums / (grad.numel() // grad.shape[1])  # [mean(grad), mean(grad u)]
        return torch.stack([invstd, -invstd.square() * means[1:], mean, -invstd * means[:1]], 1)

    def backward(self, grad: Tensor, x_grad: bool, w_grad: bool, weights_grad: bool, group: _GroupGradients) -> None:
        """Adds to `group` this edge's dL/dw row, its weight gradients and, for dL/dx, its terms: the skip's, what
        its pools and its first stage receive (the group runs those backwards once for all its edges)."""
        if not self.finals:
            return
        w, e = self.w, group.edge
        need_dt = x_grad or weights_grad
        ts = [t.contiguous(memory_format=_CHANNELS_LAST) for t, _ in self.finals]
        batch_statistics = [self.training and row is not None for _, row in self.finals]
        w_candidates = w.index_select(0, self.candidate_index)
        if not need_dt:
            if w_grad:
                _, dw = self.kernels.bn_weighted_sum_backward(
                    grad, ts, w_candidates, *self.final_statistics, batch_statistics, False, True
                )
                group.grad_w[e].index_copy_(0, self.candidate_index, dw)
            return
        # Every candidate's dL/dw[k], and dL/dt (w[k] included) in one pass over grad and the ts, written out for the
        # pools only: the convs' and the stride-2 skip's backward kernels form theirs from the factors as they read
        # grad and t; the stride-1 skip's is w[k] grad (a fixed row, invstd 1), which dL/dx's sum takes as grad with
        # weight w[k].
        written = [k in (_MAX_POOL, _AVG_POOL) for k in self.candidates]
        dts, factors, dw = self.kernels.bn_weighted_sum_backward_factors(
            grad, ts, w_candidates, *self.final_statistics, batch_statistics, written, w_grad
        )
        if w_grad:
            group.grad_w[e].index_copy_(0, self.candidate_index, dw)
        dts = iter(dts)
        for i, k in enumerate(self.candidates):
            if k == _SKIP and self.stride == 1:
                if x_grad:
                    group.add_term(grad, w_candidates[i : i + 1])
            elif k in (_MAX_POOL, _AVG_POOL):
                dt = next(dts)
                if x_grad:
                    group.add_pool_grad(k, dt)
            elif k == _SKIP:  # FactorizedReduce (stride-2 edges only): one kernel for the whole group
                group.reduces.append((grad, ts[i], factors[i : i + 1], group.edge))
            else:  # the convolutions: back to the first stage, whose backward is one kernel for the whole group
                first = (grad, ts[i], factors[i : i + 1])  # what forms its dL/dt_1
                if k in (_SEP3, _SEP5):  # the second stage (dL/du of the middle BN's output u), then the middle BN
                    ws = self.weights[k]
                    t_1 = self.kept[f"t{k}_1"]
                    du, second, second_pointwise, du_sums = self.kernels.relu_dwconv_pointwise_backward(
                        [grad], t_1, [ws[2]], [ws[3]], [1], 1, True, True, weights_grad,
                        *self._middle_statistics(self.rows[k]), [ts[i]], factors[i : i + 1],
                    )  # fmt: skip
                    if weights_grad:
                        group.set_weight_grads(k, (2, 3), (second[0], second_pointwise[0]))
                    first = (du, t_1, self._middle_bn_factors(du, du_sums, k))
                group.first_stage.append((*first, group.edge, k))


class _GroupGradients:
    """What the edges of a group hand back for their common backward: dL/dw [E, K], the weight gradients (zeros
    for the convs of candidates not computed), the terms of dL/dx, and what the pools and first stages receive."""

    def __init__(self, w: Tensor, weights: Sequence[Tensor], stride: int, w_grad: bool, weights_grad: bool):
        self.grad_w = w.new_zeros(w.shape) if w_grad else None
        # In the flat order of the group's weights, E edges of the same number each; None until set: zeros.
        self.grad_weights: list[Tensor | None] | None = [None] * len(weights) if weights_grad else None
        self.per_edge, self.starts = len(weights) // w.shape[0], _weight_starts(stride)
        self.terms: list[Tensor] = []
        self.term_weights: list[Tensor | None] = []  # [1] each, None for 1
        self.pool_grads: dict[int, list[Tensor]] = {}  # per pool, what each edge's output of it receives
        # per conv: (the gradient, input and factors that form its dL/dt_1, edge, candidate)
        self.first_stage: list[tuple[Tensor, Tensor, Tensor, int, int]] = []
        # per stride-2 skip (FactorizedReduce): (the gradient, input and factors that form its dL/dt, edge)
        self.reduces: list[tuple[Tensor, Tensor, Tensor, int]] = []
        self.edge = 0  # the edge handing back its gradients now

    def set_weight_grads(self, k: int, at: Sequence[int], grads: Sequence[Tensor], edge: int | None = None) -> None:
        """The gradients of the weights at positions `at` of candidate k's (of `edge`, default the current one)."""
        base = (self.edge if edge is None else edge) * self.per_edge + self.starts[k]
        for i, g in zip(at, grads):
            self.grad_weights[base + i] = g

    def add_term(self, term: Tensor, weight: Tensor | None = None) -> None:
        """A term of dL/dx, with its weight ([1]; None: 1) in their sum."""
        self.terms.append(term)
        self.term_weights.append(weight)

    def x_grad(self, weighted_sum: Callable[..., Tensor]) -> Tensor | None:
        """dL/dx, the weighted sum of the terms (None: no terms). One term of weight 1 (a kernel's dL/dx, made for
        this sum alone) is the sum: no pass to copy it."""
        if not self.terms:
            return None
        terms = [t.contiguous(memory_format=_CHANNELS_LAST) for t in self.terms]
        if len(terms) == 1 and self.term_weights[0] is None:
            return terms[0]
        weights = [terms[0].new_ones(1) if w is None else w for w in self.term_weights]
        return weighted_sum(terms, torch.cat(weights).detach())

    def add_pool_grad(self, k: int, dt: Tensor) -> None:
        self.pool_grads.setdefault(k, []).append(dt)

    def pool_grad(self, k: int, weighted_sum: Callable[..., Tensor]) -> Tensor | None:
        """dL/d(pool k's output): the pools of every edge of the group are the same tensor, so their gradients add
        up, in one pass of the fused sum."""
        grads = self.pool_grads.get(k)
        if grads is None or len(grads) == 1:
            return None if grads is None else grads[0]
        return weighted_sum(grads, grads[0].new_ones(len(grads)))


@functools.cache
def index_tensor(indices: Sequence[int], device: torch.device) -> Tensor:
    """`indices` (a tuple) as an index tensor on `device`, made once: indexing with a Python list builds one on
    every call. Made outside inference mode, so that any later use may keep it for a backward."""
    with torch.inference_mode(False):
        return torch.tensor(indices, dtype=torch.long, device=device)


def _split(flat: Sequence, counts: Sequence[int]) -> list[list]:
    """flat cut into consecutive pieces of the given lengths."""
    pieces, at = [], 0
    for n in counts:
        pieces.append(list(flat[at : at + n]))
        at += n
    return pieces


class _EdgeGroup:
    """The E edges leaving one state x (DARTS's cell: 4 from each cell input, then 3, 2, 1 from the nodes), on
    `kernels`: relu(x) is read once by one relu_dwconv_pointwise call for the first stage of all their convs, and the
    pools (the same tensors on every edge) are computed once; the backward likewise runs one first-stage kernel, one
    pool backward and one sum for dL/dx, whatever E."""

    def __init__(self, kernels, x, w, weights, stride, candidates, bn_mean, bn_var, training, eps, pool_bn, keep,
                 saved=None):  # fmt: skip
        """weights and candidates: per edge; bn_mean and bn_var: [E, B, C] or None; saved: what saved() gave, or
        None."""
        self.kernels, self.x, self.w, self.stride, self.eps = kernels, x, w, stride, eps
        self.weights = [t for ws in weights for t in ws]
        E, C = w.shape[0], x.shape[1]
        # The BN statistics [E, B, C] of all the edges, which each edge reads and records as its rows.
        if training and saved is None:
            B = sum(bns for _, bns in mixed_op_layout(stride, pool_bn))
            self.mean, self.var = x.new_zeros(E, B, C), x.new_ones(E, B, C)
        else:
            self.mean, self.var = bn_mean.clone(), bn_var.clone()

        def edge(e: int, **parts) -> _Edge:
            """Edge e, restored (saved parts) or built on the parts the group computed for all its edges."""
            return _Edge(kernels, x, w[e], weights[e], stride, candidates[e], self.mean[e], self.var[e], training, eps,
                         pool_bn, keep, **parts)  # fmt: skip

        # The pool candidates some edge computes: their outputs are kept once for the group (without recompute).
        self.pool_candidates = sorted({k for ks in candidates for k in ks if k in (_MAX_POOL, _AVG_POOL)})
        if saved is not None:
            saved_pools = dict(zip(self.pool_candidates, saved))
            sizes = [len(_saved_names(ks, stride)) for ks in candidates]
            per_edge_saved = _split(saved[len(saved_pools) :], sizes)
            self.edges = [edge(e, saved=per_edge_saved[e], saved_pools=saved_pools) for e in range(E)]
            self._set_final_statistics()
            return
        convs = [(e, k) for e in range(E) for k in candidates[e] if k in _FIRST_STAGE_DILATION]
        per_edge = [candidate_weights(ws, stride) for ws in weights]
        first_stage: list[dict[int, tuple[Tensor, Tensor, Tensor]]] = [{} for _ in range(E)]
        if convs:  # relu(x) into every conv's first stage, from one read of x
            ts, mean, var = kernels.relu_dwconv_pointwise(
                x, [per_edge[e][k][0] for e, k in convs], [per_edge[e][k][1] for e, k in convs],
                [_FIRST_STAGE_DILATION[k] for _, k in convs], stride, True,
            )  # fmt: skip
            for i, ((e, k), t) in enumerate(zip(convs, ts)):
                first_stage[e][k] = (t, mean[i], var[i])
        reduces = [e for e in range(E) if _SKIP in candidates[e]] if stride != 1 else []
        if reduces:  # the stride-2 skips' FactorizedReduce, from one read of x
            ts, mean, var = kernels.factorized_reduce_bn_stats(
                [x], [per_edge[e][_SKIP][0] for e in reduces], [per_edge[e][_SKIP][1] for e in reduces], True
            )
            for i, (e, t) in enumerate(zip(reduces, ts)):
                first_stage[e][_SKIP] = (t, mean[i], var[i])
        # Both pools and their statistics, once for the group.
        self.pools = pools = kernels.pool_bn_stats(x, stride) if self.pool_candidates else None
        self.edges = [edge(e, first_stage=first_stage[e], pools=pools) for e in range(E)]
        self._set_final_statistics()

    def _set_final_statistics(self) -> None:
        """Every edge's final_statistics, once the forward has recorded every row: the rows of the statistics, with
        row B appended (mean 0, invstd 1) for the tensors added as they are; a few ops for the whole group."""
        E, _, C = self.mean.shape
        mean = torch.cat([self.mean, self.x.new_zeros(E, 1, C)], dim=1)
        invstd = torch.cat([(self.var + self.eps).rsqrt(), self.x.new_ones(E, 1, C)], dim=1)
        for e, edge in enumerate(self.edges):
            rows = index_tensor(edge.final_rows(), self.x.device)
            edge.final_statistics = mean[e].index_select(0, rows), invstd[e].index_select(0, rows)

    def outs(self) -> list[Tensor]:
        return [edge.out() for edge in self.edges]

    def statistics(self) -> tuple[Tensor, Tensor]:
        return self.mean, self.var

    def saved(self) -> list[Tensor]:
        """What the backward reads instead of recomputing it (after a forward with keep): the pool outputs some edge
        uses, then each edge's _saved_names."""
        return [self.pools[k] for k in self.pool_candidates] + [t for edge in self.edges for t in edge.saved()]

    def backward(self, grads: Sequence[Tensor | None], x_grad: bool, w_grad: bool, weights_grad: bool):
        """(dL/dx or None, dL/dw [E, K] or None, dL/dweights in the flat order of the weights, or None)."""
        x = self.x
        group = _GroupGradients(self.w, self.weights, self.stride, w_grad, weights_grad)
        for e, (edge, grad) in enumerate(zip(self.edges, grads)):
            if grad is not None:  # None: the edge's output took no part in the loss
                group.edge = e
                edge.backward(_prepare(grad), x_grad, w_grad, weights_grad, group)
        if group.reduces:
            grads, inputs, factors, es = zip(*group.reduces)
            dxs, grad_1s, grad_2s = self.kernels.factorized_reduce_bn_stats_backward(
                list(grads), [x], [self.edges[e].weights[_SKIP][0] for e in es],
                [self.edges[e].weights[_SKIP][1] for e in es], True, x_grad, weights_grad, list(inputs),
                torch.cat(factors),
            )  # fmt: skip
            for e, g1, g2 in zip(es, grad_1s, grad_2s):
                group.set_weight_grads(_SKIP, (0, 1), (g1, g2), edge=e)
            if x_grad:
                group.add_term(dxs[0])
        if group.pool_grads:  # both pools' gradients in one pass over x, which recomputes the argmax
            group.add_term(self.kernels.pool_bn_stats_backward(
                group.pool_grad(_MAX_POOL, self.kernels.weighted_sum),
                group.pool_grad(_AVG_POOL, self.kernels.weighted_sum),
                x, self.stride,
            ))  # fmt: skip
        if group.first_stage:
            grads, inputs, factors, es, ks = zip(*group.first_stage)
            dx, firsts, first_pointwise, _ = self.kernels.relu_dwconv_pointwise_backward(
                list(grads), x, [self.edges[e].weights[k][0] for e, k in zip(es, ks)],
                [self.edges[e].weights[k][1] for e, k in zip(es, ks)], [_FIRST_STAGE_DILATION[k] for k in ks],
                self.stride, True, x_grad, weights_grad, None, None, list(inputs), torch.cat(factors),
            )  # fmt: skip
            if weights_grad:
                for e, k, g, p in zip(es, ks, firsts, first_pointwise):
                    group.set_weight_grads(k, (0, 1), (g, p), edge=e)
            if x_grad:
                group.add_term(dx)
        grad_x = None
        if x_grad:
            grad_x = group.x_grad(self.kernels.weighted_sum)
            if grad_x is None:
                grad_x = torch.zeros_like(x)
        grad_weights = None
        if weights_grad:
            grad_weights = [torch.zeros_like(t) if g is None else g for g, t in zip(group.grad_weights, self.weights)]
        return grad_x, group.grad_w, grad_weights


def _prepare(x: Tensor) -> Tensor:
    # Every kernel and GEMM here works on channels_last; a contiguous input costs one copy.
    return x.contiguous(memory_format=_CHANNELS_LAST)


# The signatures of the groups whose arguments passed _check_group: a search step checks about 80 groups a step, the
# same ones every step, and the per-edge checks cost about 125 us of Python a group.
_checked_groups: set[tuple] = set()


def _group_signature(x, w, weights, stride, bn_mean, bn_var, training, pool_bn) -> tuple:
    """Everything of a group's arguments that _check_group reads but the candidates: the tensors' shapes, dtypes and
    devices, and the rest as they are. A sampling method (GDAS, PR-DARTS) draws other candidates every step."""

    def meta(t: Tensor | None) -> tuple | None:
        return None if t is None else (t.shape, t.dtype, t.device)

    return (meta(x), meta(w), tuple(meta(t) for t in weights), stride, meta(bn_mean), meta(bn_var), training,
            pool_bn)  # fmt: skip


def _candidates_valid(E: int, candidates: Sequence[int], counts: Sequence[int]) -> bool:
    """Whether counts[e] of the flat candidates go to each of the E edges, each edge's valid."""
    if len(counts) != E or sum(counts) != len(candidates):
        return False
    return all(candidates_valid(ks) for ks in _split(candidates, counts))


def _check_group(op, x, w, weights, stride, candidates, counts, bn_mean, bn_var, training, pool_bn) -> None:
    """reference.check_mixed_op_arguments for every edge of a group (flat weights and candidates): in full once per
    signature of the tensors, else only the candidates (the full checks then name any fault)."""
    signature = _group_signature(x, w, weights, stride, bn_mean, bn_var, training, pool_bn)
    if signature in _checked_groups and _candidates_valid(w.shape[0], candidates, counts):
        return
    E = w.shape[0] if w.dim() == 2 else -1
    raise_unless(E >= 1, ValueError, lambda: f"{op}: w must have shape [E, K] with E >= 1, got {list(w.shape)}")
    raise_unless(
        len(counts) == E and sum(counts) == len(candidates) and len(weights) % E == 0,
        ValueError,
        lambda: (
            f"{op}: {E} edges need one candidate count each and the same number of weights each, got counts "
            f"{list(counts)} for {len(candidates)} candidates and {len(weights)} weights"
        ),
    )
    n = len(weights) // E
    for e, (ws, ks) in enumerate(zip(_split(weights, [n] * E), _split(candidates, counts))):
        stats = [None if t is None else t[e] for t in (bn_mean, bn_var)]
        check_mixed_op_arguments(f"{op} (edge {e})", x, w[e], ws, stride, ks, *stats, training, pool_bn)
    if len(_checked_groups) >= 4096:  # bounded: a long-running process may see many shapes
        _checked_groups.clear()
    _checked_groups.add(signature)


_checked_cells: set[tuple] = set()


def _check_cell(op, s0, s1, w, weights, steps, stride, candidates, counts, bn_mean, bn_var, training, pool_bn,
                partial_channels) -> None:  # fmt: skip
    """reference.check_mixed_cell_arguments, and check_mixed_op_arguments for every edge (the statistics' shape is
    the cell's check): in full once per signature of the tensors, else only the candidates (as _check_group)."""
    signature = (_group_signature(s0, w, weights, stride, bn_mean, bn_var, training, pool_bn), steps,
                 (s1.shape, s1.dtype, s1.device), partial_channels)  # fmt: skip
    E = len(counts)
    if signature in _checked_cells and E == w.shape[0] and _candidates_valid(E, candidates, counts):
        return
    plan = _CellPlan.of(steps, stride, len(weights), candidates, counts, pool_bn)
    check_mixed_cell_arguments(op, s0, s1, w, [weights[s] for s in plan.weights], steps, stride, plan.candidates,
                               bn_mean, bn_var, training, pool_bn, partial_channels)  # fmt: skip
    node = s0.new_empty(mixed_op_output_shape(s0, stride))
    for e, (node_index, state) in enumerate((i, j) for i in range(steps) for j in range(i + 2)):
        x, edge_stride = ((s0, s1)[state], stride) if state < 2 else (node, 1)
        x = _processed(x, partial_channels)
        check_mixed_op_arguments(f"{op} (edge {e}: node {node_index} <- state {state})", x, w[e],
                                 weights[plan.weights[e]], edge_stride, plan.candidates[e], None, None, True,
                                 pool_bn)  # fmt: skip
    if len(_checked_cells) >= 4096:
        _checked_cells.clear()
    _checked_cells.add(signature)


def _empty_like_shape(x: Tensor, shape: Sequence[int]) -> Tensor:
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_CHANNELS_LAST)


def _processed(x: Tensor, partial_channels: int) -> Tensor:
    """The channels the ops compute on: the first C/K (a view)."""
    return x if partial_channels == 1 else x[:, : x.shape[1] // partial_channels]


def _bypass(x: Tensor, partial_channels: int, stride: int) -> tuple[Tensor, Tensor | None]:
    """(the bypass, the pool's argmax or None): x's last C - C/K channels, through a 2x2 max pool (stride 2, rounding
    up) on a stride-2 edge, as reference.split_partial_channels. ATen's pool, inside the op: autograd keeps nothing."""
    bypass = x[:, x.shape[1] // partial_channels :]
    if stride == 1:
        return bypass, None
    return torch.ops.aten.max_pool2d_with_indices.default(bypass, [2, 2], [2, 2], [0, 0], [1, 1], True)


def _by_group(t: Tensor, partial_channels: int) -> tuple[Tensor, Tensor]:
    """(the ops' channels [N, C/K, H, W], the bypass channels [N, C/K, K - 1, H, W]) of a full-width edge output or
    its gradient, as strided views: channel c*K + g holds the ops' channel c for g = 0, else bypass channel
    (g - 1) * C/K + c (reference.partial_channel_edge)."""
    by_group = t.unflatten(1, (t.shape[1] // partial_channels, partial_channels))
    return by_group[:, :, 0], by_group[:, :, 1:]


def _bypass_by_group(bypass: Tensor, partial_channels: int) -> Tensor:
    """The bypass [N, C - C/K, H, W] as _by_group's bypass channels [N, C/K, K - 1, H, W] (a view)."""
    return bypass.unflatten(1, (partial_channels - 1, bypass.shape[1] // (partial_channels - 1))).transpose(1, 2)


def _shuffled_bypass(x: Tensor, partial_channels: int, stride: int) -> Tensor:
    """The bypass in its places of a full-width edge output (channels_last): zeros at the ops' channels. Every edge
    of the group shares it: its output is a multiple of it with the ops' output written over the zeros."""
    bypass, _ = _bypass(x, partial_channels, stride)
    n, _, h, w = bypass.shape
    shuffled = _empty_like_shape(x, (n, x.shape[1], h, w))
    ops_part, bypass_part = _by_group(shuffled, partial_channels)
    ops_part.zero_()
    bypass_part.copy_(_bypass_by_group(bypass, partial_channels))
    return shuffled


def composed_partial_channel_outputs(outs: Sequence[Tensor], x: Tensor, partial_channels: int, stride: int,
                                     bypass_w: Tensor | None) -> list[Tensor]:  # fmt: skip
    """partial_channel_outputs in ATen ops, for a backend without its kernel: each edge's full-width output, the
    shuffled bypass (times bypass_w[e]) in one contiguous pass, then its ops' output written into channels c*K."""
    shuffled_bypass = _shuffled_bypass(x, partial_channels, stride)
    results = []
    for e, out in enumerate(outs):
        result = shuffled_bypass.clone() if bypass_w is None else torch.mul(shuffled_bypass, bypass_w[e])
        _by_group(result, partial_channels)[0].copy_(out)
        results.append(result)
    return results


def composed_partial_channel_node(outs: Sequence[Tensor], xs: Sequence[Tensor], partial_channels: int,
                                  bypass_w: Tensor | None) -> Tensor:  # fmt: skip
    """partial_channel_node in ATen ops, for a backend without its kernel: each edge's full-width output
    (reference.partial_channel_edge), added in edge order, laid out channels_last as the kernel's."""
    node = reference.partial_channel_node(outs, xs, partial_channels, bypass_w)
    return node.contiguous(memory_format=_CHANNELS_LAST)


def _flat(t: Tensor) -> Tensor:
    """A channels_last tensor's elements in memory order (a view)."""
    return t.permute(0, 2, 3, 1).reshape(-1)


def composed_partial_channel_outputs_backward(
    grads: Sequence[Tensor | None], x: Tensor, partial_channels: int, stride: int, bypass_w: Tensor | None,
    x_grad: bool, bypass_w_grad: bool, grad_x_base: Tensor | None = None,
) -> tuple[list[Tensor], Tensor | None, Tensor | None]:  # fmt: skip
    """partial_channel_outputs_backward in ATen ops, for a backend without its kernel, from the edges' full-width
    output gradients (channels_last; None: not in the loss), dL/dx added to grad_x_base when given."""
    used = [e for e, g in enumerate(grads) if g is not None]
    ops_grads = [_by_group(grads[e], partial_channels)[0].contiguous(memory_format=_CHANNELS_LAST) for e in used]
    grad_bypass_w = None
    if bypass_w_grad:  # <grad_e, the shuffled bypass>: a dot product over whole tensors (zeros at the ops' channels)
        shuffled = _flat(_shuffled_bypass(x, partial_channels, stride))
        grad_bypass_w = x.new_zeros(len(grads))
        for e in used:
            grad_bypass_w[e] = torch.dot(_flat(grads[e]), shuffled)
    if not x_grad:
        return ops_grads, None, grad_bypass_w
    grad_x = torch.zeros_like(x, memory_format=_CHANNELS_LAST)
    if used:
        # sum_e bypass_w[e] dL/d(output e) over whole tensors; its bypass channels only used
        total = sum(grads[e] if bypass_w is None else grads[e] * bypass_w[e] for e in used)
        total = _by_group(total, partial_channels)[1]
        grad_x_bypass = grad_x[:, x.shape[1] // partial_channels :]
        if stride == 1:
            _bypass_by_group(grad_x_bypass, partial_channels).copy_(total)
        else:
            bypass, indices = _bypass(x, partial_channels, stride)
            pooled_grad = torch.empty_like(bypass, memory_format=_CHANNELS_LAST)
            _bypass_by_group(pooled_grad, partial_channels).copy_(total)
            grad_x_bypass.copy_(torch.ops.aten.max_pool2d_with_indices_backward.default(
                pooled_grad, x[:, x.shape[1] // partial_channels :], [2, 2], [2, 2], [0, 0], [1, 1], True, indices
            ))  # fmt: skip
    if grad_x_base is not None:  # the kernel's bits: the base's ops channels as they are, base + dL/dx elsewhere
        ops_channels = x.shape[1] // partial_channels
        grad_x = (grad_x_base + grad_x).contiguous(memory_format=_CHANNELS_LAST)
        grad_x[:, :ops_channels] = grad_x_base[:, :ops_channels]
    return ops_grads, grad_x, grad_bypass_w


def edge_group_fake(x, w, weights, stride, candidates, counts, bn_mean, bn_var, training, eps, pool_bn, keep):
    """The outputs' metadata of a group's forward (edge_group's signature): the E outputs, the statistics [E, B, C]
    and, with keep, the pools some edge uses and each edge's _saved_names."""
    E, B = w.shape[0], sum(bns for _, bns in mixed_op_layout(stride, pool_bn))
    shape = mixed_op_output_shape(x, stride)
    saved = []
    if keep:
        saved = [_empty_like_shape(x, shape) for _ in range(_saved_count(stride, _split(candidates, counts)))]
    C = x.shape[1]
    return [_empty_like_shape(x, shape) for _ in range(E)], x.new_empty(E, B, C), x.new_empty(E, B, C), saved


def edge_group_backward_fake(grads, x, w, weights, stride, candidates, counts, mean, var, training, eps, pool_bn,
                             saved, x_grad, w_grad, weights_grad):  # fmt: skip
    """The outputs' metadata of a group's backward (edge_group_backward's signature)."""
    grad_x = torch.empty_like(x, memory_format=_CHANNELS_LAST) if x_grad else None
    grad_w = w.new_empty(w.shape) if w_grad else None
    return grad_x, grad_w, ([t.new_empty(t.shape) for t in weights] if weights_grad else [])


def edge_cell_fake(s0, s1, w, weights, steps, stride, candidates, counts, bn_mean, bn_var, training, eps, pool_bn,
                   keep, partial_channels=1, bypass_w=None):  # fmt: skip
    """The outputs' metadata of a cell's forward (edge_cell's signature): its groups' (edge_group_fake)."""
    plan = _CellPlan.of(steps, stride, len(weights), candidates, counts, pool_bn)
    nodes = [_empty_like_shape(s0, mixed_op_output_shape(s0, stride)) for _ in range(steps)]
    states, saved = [s0, s1, *nodes], []
    for group in plan.groups if keep else ():
        group_w, group_weights, group_candidates, group_counts = plan.group_arguments(group, w, weights)
        saved += edge_group_fake(_processed(states[group.state], partial_channels), group_w, group_weights,
                                 group.stride, group_candidates, group_counts, None, None, training, eps, pool_bn,
                                 True)[3]  # fmt: skip
    R, C = sum(group.rows for group in plan.groups), s0.shape[1] // partial_channels
    return nodes, s0.new_empty(R, C), s0.new_empty(R, C), saved


def edge_cell_backward_fake(grads, s0, s1, nodes, w, weights, steps, stride, candidates, counts, mean, var, training,
                            eps, pool_bn, saved, s0_grad, s1_grad, w_grad, weights_grad, partial_channels=1,
                            bypass_w=None, bypass_w_grad=False):  # fmt: skip
    """The outputs' metadata of a cell's backward (edge_cell_backward's signature)."""
    grad_s0, grad_s1 = (torch.empty_like(s, memory_format=_CHANNELS_LAST) if asked else None
                        for s, asked in ((s0, s0_grad), (s1, s1_grad)))  # fmt: skip
    grad_w = w.new_empty(w.shape) if w_grad else None
    grad_bypass_w = w.new_empty(w.shape[0]) if bypass_w_grad else None
    return grad_s0, grad_s1, grad_w, grad_bypass_w, ([t.new_empty(t.shape) for t in weights] if weights_grad else [])


def edge_group(kernels: EdgeKernels) -> tuple[Callable, Callable]:
    """(forward, backward) of the group of edges on `kernels`, with the signatures of the C++ ops fastdarts::edge_group
    and edge_group_backward (which run the same passes with no Python between the kernels)."""

    def forward(x, w, weights, stride, candidates, counts, bn_mean, bn_var, training, eps, pool_bn, keep):
        E = w.shape[0]
        group = _EdgeGroup(kernels, x, w, _split(weights, [len(weights) // E] * E), stride, _split(candidates, counts),
                           bn_mean, bn_var, training, eps, pool_bn, keep=keep)  # fmt: skip
        mean, var = group.statistics()
        return group.outs(), mean, var, (group.saved() if keep else [])

    def backward(grads, x, w, weights, stride, candidates, counts, mean, var, training, eps, pool_bn, saved, x_grad,
                 w_grad, weights_grad):  # fmt: skip
        E = w.shape[0]
        weights_per_edge, candidates_per_edge = _split(weights, [len(weights) // E] * E), _split(candidates, counts)
        if saved:
            group = _EdgeGroup(kernels, x, w, weights_per_edge, stride, candidates_per_edge, mean, var, training, eps,
                               pool_bn, keep=True, saved=saved)  # fmt: skip
        else:
            # mean and var are the statistics the forward normalised with: recomputing in "evaluation" with them as
            # the running statistics reproduces the forward exactly; the backward still treats them as batch ones.
            group = _EdgeGroup(kernels, x, w, weights_per_edge, stride, candidates_per_edge, mean, var, False, eps,
                               pool_bn, keep=True)  # fmt: skip
            for edge in group.edges:
                edge.training = training
        grad_x, grad_w, grad_weights = group.backward(grads, x_grad, w_grad, weights_grad)
        return grad_x, grad_w, grad_weights or []

    return forward, backward


@dataclass(frozen=True)
class _CellPlan:
    """A cell's flat arguments (mixed_cell's weights, candidates and counts) cut into its groups (cell_groups)."""

    groups: list[CellGroup]
    strides: list[int]  # per edge
    weights: list[slice]  # per edge, its conv weights in the flat list
    candidates: list[list[int]]  # per edge

    @staticmethod
    def of(steps: int, stride: int, num_weights: int, candidates: Sequence[int], counts: Sequence[int],
           pool_bn: bool) -> _CellPlan:  # fmt: skip
        edge_strides = [stride if state < 2 else 1 for node in range(steps) for state in range(node + 2)]
        raise_unless(
            len(counts) == len(edge_strides) and sum(counts) == len(candidates), ValueError,
            lambda: f"mixed_cell: {len(edge_strides)} edges need one candidate count each, got counts {list(counts)} "
            f"for {len(candidates)} candidates",
        )  # fmt: skip
        slices, at = [], 0
        for s in edge_strides:
            per_edge = sum(n for n, _ in mixed_op_layout(s))
            slices.append(slice(at, at + per_edge))
            at += per_edge
        raise_unless(num_weights == at, ValueError, lambda: f"mixed_cell: the cell's edges take {at} conv weights, "
                     f"got {num_weights}")  # fmt: skip
        per_edge_candidates = _split(candidates, counts)
        return _CellPlan(cell_groups(steps, stride, per_edge_candidates, pool_bn), edge_strides, slices,
                         per_edge_candidates)  # fmt: skip

    def group_arguments(self, group: CellGroup, w: Tensor, weights: Sequence[Tensor]) -> tuple:
        """(w, weights, candidates, counts) of a group's edges, as edge_group takes them."""
        edges = list(group.edges)
        return (w[edges], [t for e in edges for t in weights[self.weights[e]]],
                [k for e in edges for k in self.candidates[e]], [len(self.candidates[e]) for e in edges])  # fmt: skip

    def computed_weights(self) -> set[int]:
        """Positions, in the flat weights, of the convs of the candidates the cell computes: the others' gradients
        are None (see uncomputed_weights)."""
        computed = set()
        for ks, stride, at in zip(self.candidates, self.strides, self.weights):
            computed.update(_weight_positions(stride, ks, at.start))
        return computed

    def saved_counts(self) -> list[int]:
        """Per group, the tensors its forward keeps (edge_group's saved with keep)."""
        return [_saved_count(group.stride, [self.candidates[e] for e in group.edges]) for group in self.groups]


def _node_sum(terms: Sequence[Tensor], weighted_sum: Callable[..., Tensor], zeros_like: Tensor,
              stride: int) -> Tensor:  # fmt: skip
    """A node: its incoming edges' outputs summed in turn (three or more in one weighted_sum pass with unit weights,
    the same bits as adding them in turn); zeros, laid out channels_last, when it has none."""
    if not terms:
        return _empty_like_shape(zeros_like, mixed_op_output_shape(zeros_like, stride)).zero_()
    if len(terms) > 2:
        return weighted_sum(list(terms), terms[0].new_ones(len(terms)))
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def edge_cell(group_forward: Callable, group_backward: Callable, kernels: EdgeKernels) -> tuple[Callable, Callable]:
    """(forward, backward) of a cell's edges on a group's (forward, backward) pair and the node sums and partial
    channels of `kernels`, with the signatures of the C++ ops fastdarts::edge_cell and edge_cell_backward (which run
    the same calls without Python between them): the groups of reference.mixed_cell, each node summed once
    complete; with partial channels each group computes on its state's first C/K channels and each node is its
    edges' full-width outputs (as mixed_ops writes them) summed as they are formed (partial_channel_node). The
    backward runs the groups in reverse, a node's gradient complete (what the cell's caller gives it plus what its
    own edges send back) before its group runs."""

    def forward(s0, s1, w, weights, steps, stride, candidates, counts, bn_mean, bn_var, training, eps, pool_bn, keep,
                partial_channels=1, bypass_w=None):  # fmt: skip
        plan = _CellPlan.of(steps, stride, len(weights), candidates, counts, pool_bn)
        C = s0.shape[1] // partial_channels
        # per node its incoming edges' (output, and with partial channels: bypass source, edge), in edge order
        states, incoming = [s0, s1], [[] for _ in range(steps)]
        means, variances, saved, at = [], [], [], 0

        def node(terms):
            if partial_channels == 1 or not terms:
                return _node_sum([t[0] for t in terms], kernels.weighted_sum, s0, stride)
            outs, xs, edges = zip(*terms)
            return kernels.partial_channel_node(list(outs), list(xs), partial_channels,
                                                None if bypass_w is None else bypass_w[list(edges)])  # fmt: skip

        for group in plan.groups + [None]:
            while len(states) < (steps + 2 if group is None else group.state + 1):
                states.append(node(incoming[len(states) - 2]))
            if group is None:
                break
            E = len(group.edges)
            stats = [None if t is None else t[at : at + group.rows].view(E, -1, C) for t in (bn_mean, bn_var)]
            at += group.rows
            group_w, group_weights, group_candidates, group_counts = plan.group_arguments(group, w, weights)
            x = states[group.state]
            outs, mean, var, kept = group_forward(
                _prepare(_processed(x, partial_channels)), group_w, group_weights, group.stride, group_candidates,
                group_counts, *stats, training, eps, pool_bn, keep,
            )  # fmt: skip
            means.append(mean.view(-1, C))
            variances.append(var.view(-1, C))
            saved += kept
            # with partial channels, what each edge's bypass is read from: the state, or at stride 2 the state
            # pooled once here for every node it feeds (split_partial_channels's pool, on all the channels: the
            # node reads the bypass's among them)
            bypass = x
            if partial_channels > 1 and group.stride == 2:
                bypass = F.max_pool2d(x, 2, 2, ceil_mode=True)
            for target, edge, out in zip(group.nodes, group.edges, outs):
                incoming[target].append((out, bypass, edge))
        empty = s0.new_zeros(0, C)
        return states[2:], torch.cat(means) if means else empty, torch.cat(variances) if variances else empty, saved

    def backward(grads, s0, s1, nodes, w, weights, steps, stride, candidates, counts, mean, var, training, eps,
                 pool_bn, saved, s0_grad, s1_grad, w_grad, weights_grad, partial_channels=1, bypass_w=None,
                 bypass_w_grad=False):  # fmt: skip
        plan = _CellPlan.of(steps, stride, len(weights), candidates, counts, pool_bn)
        C = s0.shape[1] // partial_channels
        states, grad_states = [s0, s1, *nodes], [None, None, *grads]
        grad_w = torch.zeros_like(w) if w_grad else None
        grad_bypass_w = torch.zeros_like(bypass_w) if bypass_w_grad else None
        grad_weights: list[Tensor | None] = [None] * len(weights)
        kept = _split(saved, plan.saved_counts()) if saved else [[] for _ in plan.groups]
        rows_end = sum(group.rows for group in plan.groups)
        for group, group_saved in zip(reversed(plan.groups), reversed(kept)):
            rows_end -= group.rows
            edge_grads = [grad_states[2 + node] for node in group.nodes]
            if all(g is None for g in edge_grads):
                continue  # no edge of the group reaches the loss
            E = len(group.edges)
            group_w, group_weights, group_candidates, group_counts = plan.group_arguments(group, w, weights)
            x_grad = group.state >= 2 or (s0_grad, s1_grad)[group.state]
            stats = [t[rows_end : rows_end + group.rows].view(E, -1, C) for t in (mean, var)]
            x = states[group.state]
            previous = grad_states[group.state]  # the state's gradient from its other readers
            if partial_channels > 1:  # the ops' part of each gradient; the bypass's, straight into dL/dx (+ previous)
                group_bypass_w = None if bypass_w is None else bypass_w[list(group.edges)]
                ops_grads, grad_full, group_grad_bypass_w = kernels.partial_channel_outputs_backward(
                    edge_grads, x, partial_channels, group.stride, group_bypass_w, x_grad, bypass_w_grad,
                    previous if x_grad else None,
                )  # fmt: skip
                ops_grads = iter(ops_grads)
                edge_grads = [None if g is None else next(ops_grads) for g in edge_grads]
                if bypass_w_grad:
                    grad_bypass_w[list(group.edges)] = group_grad_bypass_w
            grad_x, group_grad_w, group_grad_weights = group_backward(
                edge_grads, _prepare(_processed(x, partial_channels)), group_w, group_weights, group.stride,
                group_candidates, group_counts, *stats, training, eps, pool_bn, group_saved, x_grad, w_grad,
                weights_grad,
            )  # fmt: skip
            if x_grad and partial_channels > 1:  # the ops' gradient in their channels; previous is in grad_full
                if previous is None:
                    grad_full[:, :C] = grad_x
                else:
                    grad_full[:, :C] += grad_x
                grad_states[group.state] = grad_full
            elif x_grad:
                grad_states[group.state] = grad_x if previous is None else previous + grad_x
            if w_grad:
                grad_w[list(group.edges)] = group_grad_w
            if weights_grad:
                grads_of_edges = iter(group_grad_weights)
                for e in group.edges:
                    for i in range(plan.weights[e].start, plan.weights[e].stop):
                        grad_weights[i] = next(grads_of_edges)
        all_weight_grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grad_weights, weights)]

        def input_grad(state: int, asked: bool) -> Tensor | None:
            if not asked:
                return None
            grad = grad_states[state]
            return torch.zeros_like(states[state], memory_format=_CHANNELS_LAST) if grad is None else grad

        return (input_grad(0, s0_grad), input_grad(1, s1_grad), grad_w, grad_bypass_w,
                all_weight_grads if weights_grad else [])  # fmt: skip

    return forward, backward


def define_mixed_ops(
    namespace: str,
    kernels: EdgeKernels,
    device_types: str | None,
    group: tuple[Callable, Callable] | None = None,
    cell: tuple[Callable, Callable] | None = None,
) -> tuple[Callable, Callable, Callable]:
    """Registers `namespace::mixed_ops` (the mixed ops of E edges leaving one state: `group`, a (forward, backward)
    pair as edge_group's, by default edge_group(kernels)) and `namespace::mixed_cell` (a cell's edges and nodes:
    `cell`, a pair as edge_cell's, by default edge_cell over the group), each with its backward, fakes and autograd,
    and returns the dispatch table's entries for "mixed_ops", "mixed_op" (the group of one edge) and "mixed_cell"."""
    backend = kernels.backend
    group_forward, group_backward = group or edge_group(kernels)

    @torch.library.custom_op(f"{namespace}::mixed_ops", mutates_args=(), device_types=device_types)
    def mixed_ops(
        x: Tensor,
        w: Tensor,
        weights: list[Tensor],
        stride: int,
        candidates: list[int],
        counts: list[int],
        bn_mean: Tensor | None,
        bn_var: Tensor | None,
        training: bool,
        eps: float,
        pool_bn: bool,
        recompute: bool,
        partial_channels: int = 1,
        bypass_w: Tensor | None = None,
    ) -> tuple[list[Tensor], Tensor, Tensor, list[Tensor]]:
        """reference.mixed_ops on the building blocks of `kernels` (float32/float64) for the E = w.shape[0] edges
        leaving x: weights flat (each edge's in turn), candidates flat (counts[e] for edge e). Returns the E outputs,
        the statistics [E, B, C/K] and, with recompute False, the intermediates the backward then reads instead of
        recomputing them (_saved_names, edge after edge).

        With partial_channels K > 1 the ops run on x's first C/K channels (one copy of those, not kept) and each
        output is written full width, the bypass (times bypass_w[e], or 1 when None) in the other channels."""
        processed = _processed(x, partial_channels)
        _check_group("mixed_ops", processed, w, weights, stride, candidates, counts, bn_mean, bn_var, training,
                     pool_bn)  # fmt: skip
        check_supported_dtype("mixed_ops", x, raise_unless)
        outs, mean, var, saved = group_forward(_prepare(processed), w, weights, stride, candidates, counts, bn_mean,
                                               bn_var, training, eps, pool_bn, not recompute)  # fmt: skip
        if partial_channels > 1:
            outs = kernels.partial_channel_outputs(outs, x, partial_channels, stride, bypass_w)
        return outs, mean, var, saved

    @mixed_ops.register_fake
    def _mixed_ops_fake(x, w, weights, stride, candidates, counts, bn_mean, bn_var, training, eps, pool_bn,
                        recompute, partial_channels=1, bypass_w=None):  # fmt: skip
        _, mean, var, saved = edge_group_fake(_processed(x, partial_channels), w, weights, stride, candidates, counts,
                                              bn_mean, bn_var, training, eps, pool_bn, not recompute)  # fmt: skip
        outs = [_empty_like_shape(x, mixed_op_output_shape(x, stride)) for _ in range(w.shape[0])]
        return outs, mean, var, saved

    @torch.library.custom_op(f"{namespace}::mixed_ops_backward", mutates_args=(), device_types=device_types)
    def mixed_ops_backward(
        grads: list[Tensor | None],
        x: Tensor,
        w: Tensor,
        weights: list[Tensor],
        stride: int,
        candidates: list[int],
        counts: list[int],
        mean: Tensor,
        var: Tensor,
        training: bool,
        eps: float,
        pool_bn: bool,
        saved: list[Tensor],
        x_grad: bool,
        w_grad: bool,
        weights_grad: bool,
        partial_channels: int = 1,
        bypass_w: Tensor | None = None,
        bypass_w_grad: bool = False,
    ) -> list[Tensor]:
        """Recomputes the group from x and its statistics (or restores it from `saved`, the forward's intermediates
        when it did not recompute), then returns, in this order, dL/dx if x_grad, dL/dw [E, K] if w_grad,
        dL/dbypass_w [E] if bypass_w_grad, and every dL/dweights[i] if weights_grad (zeros for the convs of
        candidates not computed). With partial channels, partial_channel_outputs_backward splits each output gradient
        into the ops' part, which the group reads, and the bypass's, which goes straight into dL/dx."""
        x = _prepare(x)
        full, x = x, _prepare(_processed(x, partial_channels))
        grad_full = grad_bypass_w = None
        if partial_channels > 1:  # the ops' part of each gradient; the bypass's gradients, written into dL/dx
            ops_grads, grad_full, grad_bypass_w = kernels.partial_channel_outputs_backward(
                [None if g is None else _prepare(g) for g in grads], full, partial_channels, stride, bypass_w,
                x_grad, bypass_w_grad,
            )  # fmt: skip
            ops_grads = iter(ops_grads)
            grads = [None if g is None else next(ops_grads) for g in grads]
        grad_x, grad_w, grad_weights = group_backward(
            grads, x, w, weights, stride, candidates, counts, mean, var, training, eps, pool_bn, saved, x_grad, w_grad,
            weights_grad,
        )  # fmt: skip
        if grad_full is not None:  # the ops' gradient in their channels
            grad_full[:, : x.shape[1]] = grad_x
            grad_x = grad_full
        return [g for g in (grad_x, grad_w, grad_bypass_w) if g is not None] + grad_weights

    @mixed_ops_backward.register_fake
    def _mixed_ops_backward_fake(grads, x, w, weights, stride, candidates, counts, mean, var, training, eps, pool_bn,
                                 saved, x_grad, w_grad, weights_grad, partial_channels=1, bypass_w=None,
                                 bypass_w_grad=False):  # fmt: skip
        grad_x, grad_w, grad_weights = edge_group_backward_fake(
            grads, x, w, weights, stride, candidates, counts, mean, var, training, eps, pool_bn, saved, x_grad, w_grad,
            weights_grad,
        )  # fmt: skip
        grad_bypass_w = [w.new_empty(w.shape[0])] if bypass_w_grad else []
        return [g for g in (grad_x, grad_w) if g is not None] + grad_bypass_w + grad_weights

    refuse_differentiation(
        mixed_ops_backward,
        f"fastdarts.ops.mixed_op: the {backend!r} backend is differentiable once (DARTS's second-order step needs no "
        "more); for higher derivatives run the network under fastdarts.ops.use_backend('reference')",
    )

    def _save(ctx, x, w, weights, stride, candidates, counts, training, eps, pool_bn, partial_channels, bypass_w, mean,
              var, saved) -> None:  # fmt: skip
        """What the backward reads: the group's arguments and the forward's statistics and intermediates."""
        ctx.stride, ctx.candidates, ctx.counts = stride, list(candidates), list(counts)
        ctx.training, ctx.eps, ctx.pool_bn = training, eps, pool_bn
        ctx.partial_channels, ctx.has_bypass_w = partial_channels, bypass_w is not None
        ctx.num_weights = len(weights)
        ctx.save_for_backward(x, w, mean, var, *([bypass_w] if ctx.has_bypass_w else []), *weights, *saved)

    def _input_grads(ctx, grads, x_grad: bool, w_grad: bool, weights_grad: bool, bypass_w_grad: bool):
        """(dL/dx, dL/dw, dL/dbypass_w, [dL/dweights[i]]) from the outputs' gradients (None: not in the loss), each
        None unless asked for (the list then all None), by one call of mixed_ops_backward; None too for the weights
        of candidates not computed, and of edges not in the loss."""
        x, w, mean, var, *rest = ctx.saved_tensors
        bypass_w = rest.pop(0) if ctx.has_bypass_w else None
        weights, saved = rest[: ctx.num_weights], rest[ctx.num_weights :]
        with below_autograd():
            result = iter(mixed_ops_backward(
                grads, x, w, weights, ctx.stride, ctx.candidates, ctx.counts, mean, var, ctx.training, ctx.eps,
                ctx.pool_bn, saved, x_grad, w_grad, weights_grad, partial_channels=ctx.partial_channels,
                bypass_w=bypass_w, bypass_w_grad=bypass_w_grad,
            ))  # fmt: skip
        grad_x = next(result) if x_grad else None
        grad_w = next(result) if w_grad else None
        grad_bypass_w = next(result) if bypass_w_grad else None
        grad_weights = list(result) if weights_grad else [None] * ctx.num_weights
        if weights_grad:
            in_loss = [g is not None for g in grads]
            for i in uncomputed_weights(ctx.stride, ctx.candidates, ctx.counts, in_loss):
                grad_weights[i] = None
        return grad_x, grad_w, grad_bypass_w, grad_weights

    def _setup_context(ctx, inputs, output):
        (x, w, weights, stride, candidates, counts, bn_mean, bn_var, training, eps, pool_bn, recompute,
         partial_channels, bypass_w) = inputs  # fmt: skip
        _, mean, var, saved = output
        ctx.mark_non_differentiable(mean, var, *saved)
        _save(ctx, x, w, weights, stride, candidates, counts, training, eps, pool_bn, partial_channels, bypass_w, mean,
              var, saved)  # fmt: skip

    def _backward(ctx, grads, _grad_mean, _grad_var, _grad_saved):
        needs = ctx.needs_input_grad  # per argument, the conv weights' a list (no flattening: it costs a pytree walk)
        grad_x, grad_w, grad_bypass_w, grad_weights = _input_grads(
            ctx, grads, needs[0], needs[1], any(needs[2]), ctx.has_bypass_w and needs[13]
        )  # fmt: skip
        # torch.library takes an empty int list for an empty Tensor list, whose gradient must be [] (not None).
        grad_candidates = None if ctx.candidates else []
        grads = (grad_x, grad_w, grad_weights, None, grad_candidates, None, None, None, None, None, None, None, None,
                 grad_bypass_w)  # fmt: skip
        # The arguments as the caller passed them: partial_channels and bypass_w may be left to their defaults.
        return grads[: len(ctx.needs_input_grad)]

    mixed_ops.register_autograd(_backward, setup_context=_setup_context)

    class MixedOpsNode(torch.autograd.Function):
        """mixed_ops with the registered autograd's passes, its arguments flat: what the network calls. The
        registered autograd of an op with a list of weights walks pytrees of its ~100 arguments and results several
        times a call: 155 us of a tiny group's 1.1 ms forward and backward (benchmarks/RESULTS.md)."""

        @staticmethod
        def forward(ctx, x, w, bypass_w, stride, candidates, counts, bn_mean, bn_var, training, eps, pool_bn,
                    recompute, partial_channels, *weights):  # fmt: skip
            with below_autograd():
                outs, mean, var, saved = mixed_ops(
                    x, w, list(weights), stride, candidates, counts, bn_mean, bn_var, training, eps, pool_bn,
                    recompute, partial_channels, bypass_w,
                )  # fmt: skip
            ctx.mark_non_differentiable(mean, var)
            ctx.set_materialize_grads(False)  # an output not in the loss gets None, which the backward skips
            _save(ctx, x, w, weights, stride, candidates, counts, training, eps, pool_bn, partial_channels, bypass_w,
                  mean, var, saved)  # fmt: skip
            return (*outs, mean, var)

        @staticmethod
        def backward(ctx, *grads):
            needs = ctx.needs_input_grad
            grad_x, grad_w, grad_bypass_w, grad_weights = _input_grads(
                ctx, list(grads[:-2]), needs[0], needs[1], any(needs[13:]), needs[2]
            )  # fmt: skip
            return (grad_x, grad_w, grad_bypass_w) + (None,) * 10 + tuple(grad_weights)

    def fused_mixed_ops(
        x: Tensor,
        w: Tensor,
        weights: Sequence[Sequence[Tensor]],
        stride: int,
        candidates: Sequence[Sequence[int]],
        bn_mean: Tensor | None = None,
        bn_var: Tensor | None = None,
        training: bool = True,
        eps: float = 1e-5,
        pool_bn: bool = True,
        recompute: bool = True,
        partial_channels: int = 1,
        scale: Tensor | None = None,
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """The dispatch table's "mixed_ops" entry: reference.mixed_ops's signature. `scale` folds into w (the ops'
        part is linear in it) and the bypass's weight, so no output is multiplied (and kept by autograd for it)."""
        check_mixed_ops_edges("mixed_ops", w, weights, candidates)
        check_partial_channels("mixed_ops", x, w.shape[0], partial_channels, scale)
        if partial_channels == 1 and not any(candidates):
            # Nothing computed: the reference's zeros, which no input reaches (their gradients are None, where an
            # autograd node would hand back zeros for x and w), laid out as the fused ops lay out their outputs.
            outs, mean, var = reference.mixed_ops(x, w, weights, stride, candidates, bn_mean, bn_var, training, eps,
                                                  pool_bn, recompute, partial_channels, scale)  # fmt: skip
            return [out.contiguous(memory_format=_CHANNELS_LAST) for out in outs], mean, var
        bypass_w = None
        if scale is not None:
            w = w * scale[:, None]
            bypass_w = scale if partial_channels > 1 else None
        *outs, mean, var = MixedOpsNode.apply(
            x, w, bypass_w, stride, [k for ks in candidates for k in ks], [len(ks) for ks in candidates], bn_mean,
            bn_var, training, eps, pool_bn, recompute, partial_channels, *(t for ws in weights for t in ws),
        )  # fmt: skip
        return outs, mean, var

    def fused_mixed_op(
        x: Tensor,
        w: Tensor,
        weights: Sequence[Tensor],
        stride: int,
        candidates: Sequence[int] = tuple(range(len(MIXED_OP_CANDIDATES))),
        bn_mean: Tensor | None = None,
        bn_var: Tensor | None = None,
        training: bool = True,
        eps: float = 1e-5,
        pool_bn: bool = True,
        recompute: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The dispatch table's "mixed_op" entry (reference.mixed_op's signature): a group of one edge."""
        check_mixed_op_arguments("mixed_op", x, w, weights, stride, candidates, bn_mean, bn_var, training, pool_bn)
        check_supported_dtype("mixed_op", x, raise_unless)
        stats = [None if t is None else t.unsqueeze(0) for t in (bn_mean, bn_var)]
        (out,), mean, var = fused_mixed_ops(
            x, w.unsqueeze(0), [weights], stride, [candidates], *stats, training, eps, pool_bn, recompute
        )  # fmt: skip
        return out, mean[0], var[0]

    cell_forward, cell_backward = cell or edge_cell(group_forward, group_backward, kernels)

    @torch.library.custom_op(f"{namespace}::mixed_cell", mutates_args=(), device_types=device_types)
    def mixed_cell(
        s0: Tensor,
        s1: Tensor,
        w: Tensor,
        weights: list[Tensor],
        steps: int,
        stride: int,
        candidates: list[int],
        counts: list[int],
        bn_mean: Tensor | None,
        bn_var: Tensor | None,
        training: bool,
        eps: float,
        pool_bn: bool,
        recompute: bool,
        partial_channels: int = 1,
        bypass_w: Tensor | None = None,
    ) -> tuple[list[Tensor], Tensor, Tensor, list[Tensor]]:
        """reference.mixed_cell on the building blocks of `kernels` for a cell of `steps` nodes (E edges): w [E, K],
        weights flat (each edge's in turn, at its own stride), candidates flat (counts[e] for edge e, 0 for an edge
        left out), bypass_w [E] the partial channels' bypass weights (None: 1). Returns the nodes, the statistics
        [R, C/K] and, with recompute False, the groups' intermediates."""
        _check_cell("mixed_cell", s0, s1, w, weights, steps, stride, candidates, counts, bn_mean, bn_var, training,
                    pool_bn, partial_channels)  # fmt: skip
        check_supported_dtype("mixed_cell", s0, raise_unless)
        return cell_forward(_prepare(s0), _prepare(s1), w, weights, steps, stride, candidates, counts, bn_mean,
                            bn_var, training, eps, pool_bn, not recompute, partial_channels, bypass_w)  # fmt: skip

    @mixed_cell.register_fake
    def _mixed_cell_fake(s0, s1, w, weights, steps, stride, candidates, counts, bn_mean, bn_var, training, eps,
                         pool_bn, recompute, partial_channels=1, bypass_w=None):  # fmt: skip
        return edge_cell_fake(s0, s1, w, weights, steps, stride, candidates, counts, bn_mean, bn_var, training, eps,
                              pool_bn, not recompute, partial_channels, bypass_w)  # fmt: skip

    @torch.library.custom_op(f"{namespace}::mixed_cell_backward", mutates_args=(), device_types=device_types)
    def mixed_cell_backward(
        grads: list[Tensor | None],
        s0: Tensor,
        s1: Tensor,
        nodes: list[Tensor],
        w: Tensor,
        weights: list[Tensor],
        steps: int,
        stride: int,
        candidates: list[int],
        counts: list[int],
        mean: Tensor,
        var: Tensor,
        training: bool,
        eps: float,
        pool_bn: bool,
        saved: list[Tensor],
        s0_grad: bool,
        s1_grad: bool,
        w_grad: bool,
        weights_grad: bool,
        partial_channels: int = 1,
        bypass_w: Tensor | None = None,
        bypass_w_grad: bool = False,
    ) -> list[Tensor]:
        """From the nodes' gradients (None: not in the loss), in this order: dL/ds0 if s0_grad, dL/ds1 if s1_grad
        (zeros when no edge leaving it reached the loss), dL/dw [E, K] if w_grad, dL/dbypass_w [E] if bypass_w_grad,
        and every dL/dweights[i] if weights_grad (zeros for the convs of candidates not computed)."""
        *grads, grad_weights = cell_backward(
            [None if g is None else _prepare(g) for g in grads], _prepare(s0), _prepare(s1), nodes, w, weights, steps,
            stride, candidates, counts, mean, var, training, eps, pool_bn, saved, s0_grad, s1_grad, w_grad,
            weights_grad, partial_channels, bypass_w, bypass_w_grad,
        )  # fmt: skip
        return [g for g in grads if g is not None] + grad_weights

    @mixed_cell_backward.register_fake
    def _mixed_cell_backward_fake(grads, s0, s1, nodes, w, weights, steps, stride, candidates, counts, mean, var,
                                  training, eps, pool_bn, saved, s0_grad, s1_grad, w_grad, weights_grad,
                                  partial_channels=1, bypass_w=None, bypass_w_grad=False):  # fmt: skip
        *grads, grad_weights = edge_cell_backward_fake(
            grads, s0, s1, nodes, w, weights, steps, stride, candidates, counts, mean, var, training, eps, pool_bn,
            saved, s0_grad, s1_grad, w_grad, weights_grad, partial_channels, bypass_w, bypass_w_grad,
        )  # fmt: skip
        return [g for g in grads if g is not None] + grad_weights

    refuse_differentiation(
        mixed_cell_backward,
        f"fastdarts.ops.mixed_cell: the {backend!r} backend is differentiable once; for higher derivatives run the "
        "network under fastdarts.ops.use_backend('reference')",
    )

    def _save_cell(ctx, s0, s1, nodes, w, weights, steps, stride, candidates, counts, training, eps, pool_bn,
                   partial_channels, bypass_w, mean, var, saved) -> None:  # fmt: skip
        """What the cell's backward reads: its arguments, its nodes, and the forward's statistics and
        intermediates."""
        ctx.steps, ctx.stride, ctx.candidates, ctx.counts = steps, stride, list(candidates), list(counts)
        ctx.training, ctx.eps, ctx.pool_bn = training, eps, pool_bn
        ctx.partial_channels, ctx.has_bypass_w = partial_channels, bypass_w is not None
        ctx.num_weights, ctx.num_nodes = len(weights), len(nodes)
        ctx.save_for_backward(s0, s1, w, mean, var, *([bypass_w] if ctx.has_bypass_w else []), *nodes, *weights,
                              *saved)  # fmt: skip

    def _cell_input_grads(ctx, grads, s0_grad: bool, s1_grad: bool, w_grad: bool, weights_grad: bool,
                          bypass_w_grad: bool):  # fmt: skip
        """(dL/ds0, dL/ds1, dL/dw, dL/dbypass_w, [dL/dweights[i]]) from the nodes' gradients, each None unless asked
        for (the list then all None), by one call of mixed_cell_backward; None too for an input no computed edge
        leaves and for the convs of candidates not computed."""
        s0, s1, w, mean, var, *rest = ctx.saved_tensors
        bypass_w = rest.pop(0) if ctx.has_bypass_w else None
        nodes, weights = rest[: ctx.num_nodes], rest[ctx.num_nodes : ctx.num_nodes + ctx.num_weights]
        saved = rest[ctx.num_nodes + ctx.num_weights :]
        leaves = [any(ctx.counts[edge_index(node, state)] for node in range(ctx.steps)) for state in (0, 1)]
        s0_grad, s1_grad = s0_grad and leaves[0], s1_grad and leaves[1]
        with below_autograd():
            result = iter(mixed_cell_backward(
                grads, s0, s1, nodes, w, weights, ctx.steps, ctx.stride, ctx.candidates, ctx.counts, mean, var,
                ctx.training, ctx.eps, ctx.pool_bn, saved, s0_grad, s1_grad, w_grad, weights_grad,
                ctx.partial_channels, bypass_w, bypass_w_grad,
            ))  # fmt: skip
        grad_s0 = next(result) if s0_grad else None
        grad_s1 = next(result) if s1_grad else None
        grad_w = next(result) if w_grad else None
        grad_bypass_w = next(result) if bypass_w_grad else None
        grad_weights = list(result) if weights_grad else [None] * ctx.num_weights
        if weights_grad:
            computed = _CellPlan.of(ctx.steps, ctx.stride, ctx.num_weights, ctx.candidates, ctx.counts,
                                    ctx.pool_bn).computed_weights()  # fmt: skip
            grad_weights = [g if i in computed else None for i, g in enumerate(grad_weights)]
        return grad_s0, grad_s1, grad_w, grad_bypass_w, grad_weights

    def _cell_setup_context(ctx, inputs, output):
        (s0, s1, w, weights, steps, stride, candidates, counts, _, _, training, eps, pool_bn, _, partial_channels,
         bypass_w) = inputs  # fmt: skip
        nodes, mean, var, saved = output
        ctx.mark_non_differentiable(mean, var, *saved)
        _save_cell(ctx, s0, s1, nodes, w, weights, steps, stride, candidates, counts, training, eps, pool_bn,
                   partial_channels, bypass_w, mean, var, saved)  # fmt: skip

    def _cell_backward(ctx, grads, _grad_mean, _grad_var, _grad_saved):
        needs = ctx.needs_input_grad
        grad_s0, grad_s1, grad_w, grad_bypass_w, grad_weights = _cell_input_grads(
            ctx, grads, needs[0], needs[1], needs[2], any(needs[3]), ctx.has_bypass_w and needs[15]
        )  # fmt: skip
        grad_candidates = None if ctx.candidates else []  # an empty int list's gradient must be [] (see _backward)
        grads = (grad_s0, grad_s1, grad_w, grad_weights, None, None, grad_candidates, None, None, None, None, None,
                 None, None, None, grad_bypass_w)  # fmt: skip
        return grads[: len(ctx.needs_input_grad)]  # partial_channels and bypass_w may be left to their defaults

    mixed_cell.register_autograd(_cell_backward, setup_context=_cell_setup_context)

    class MixedCellNode(torch.autograd.Function):
        """mixed_cell with the registered autograd's passes, its arguments flat (as MixedOpsNode): what the network
        calls."""

        @staticmethod
        def forward(ctx, s0, s1, w, bypass_w, steps, stride, candidates, counts, bn_mean, bn_var, training, eps,
                    pool_bn, recompute, partial_channels, *weights):  # fmt: skip
            with below_autograd():
                nodes, mean, var, saved = mixed_cell(
                    s0, s1, w, list(weights), steps, stride, candidates, counts, bn_mean, bn_var, training, eps,
                    pool_bn, recompute, partial_channels, bypass_w,
                )  # fmt: skip
            ctx.mark_non_differentiable(mean, var)
            ctx.set_materialize_grads(False)
            _save_cell(ctx, s0, s1, nodes, w, weights, steps, stride, candidates, counts, training, eps, pool_bn,
                       partial_channels, bypass_w, mean, var, saved)  # fmt: skip
            return (*nodes, mean, var)

        @staticmethod
        def backward(ctx, *grads):
            needs = ctx.needs_input_grad
            grad_s0, grad_s1, grad_w, grad_bypass_w, grad_weights = _cell_input_grads(
                ctx, list(grads[:-2]), needs[0], needs[1], needs[2], any(needs[15:]), needs[3]
            )  # fmt: skip
            return (grad_s0, grad_s1, grad_w, grad_bypass_w) + (None,) * 11 + tuple(grad_weights)

    def fused_mixed_cell(
        s0: Tensor,
        s1: Tensor,
        w: Tensor,
        weights: Sequence[Sequence[Tensor]],
        steps: int,
        stride: int,
        candidates: Sequence[Sequence[int]],
        bn_mean: Tensor | None = None,
        bn_var: Tensor | None = None,
        training: bool = True,
        eps: float = 1e-5,
        pool_bn: bool = True,
        recompute: bool = True,
        partial_channels: int = 1,
        scale: Tensor | None = None,
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """The dispatch table's "mixed_cell" entry: reference.mixed_cell's signature. `scale` folds into w and the
        bypass's weight (as fused_mixed_ops does)."""
        check_mixed_cell_arguments("mixed_cell", s0, s1, w, weights, steps, stride, candidates, bn_mean, bn_var,
                                   training, pool_bn, partial_channels, scale)  # fmt: skip
        bypass_w = None
        if scale is not None:
            w = w * scale[:, None]
            bypass_w = scale if partial_channels > 1 else None
        *nodes, mean, var = MixedCellNode.apply(
            s0, s1, w, bypass_w, steps, stride, [k for ks in candidates for k in ks], [len(ks) for ks in candidates],
            bn_mean, bn_var, training, eps, pool_bn, recompute, partial_channels, *(t for ws in weights for t in ws),
        )  # fmt: skip
        return nodes, mean, var

    return fused_mixed_ops, fused_mixed_op, fused_mixed_cell


if EXTENSION_LOADED:  # the C++ kernels exist only then
    _cpp_ops = torch.ops.fastdarts
    torch.library.register_fake("fastdarts::edge_group")(edge_group_fake)
    torch.library.register_fake("fastdarts::edge_group_backward")(edge_group_backward_fake)
    torch.library.register_fake("fastdarts::edge_cell")(edge_cell_fake)
    torch.library.register_fake("fastdarts::edge_cell_backward")(edge_cell_backward_fake)
    for _name, _outer in (("edge_group", "mixed_ops"), ("edge_group_backward", "mixed_ops"),
                          ("edge_cell", "mixed_cell"), ("edge_cell_backward", "mixed_cell")):  # fmt: skip
        refuse_differentiation(
            f"fastdarts::{_name}",
            f"fastdarts::{_name} is the inside of fastdarts.ops.{_outer}, which is differentiable: call that",
        )
    # The C++ kernels as building blocks: what the C++ group ops call, and what tests run edge_group on to compare.
    cpp_kernels = EdgeKernels(
        backend="cpp",
        relu_dwconv_pointwise=_cpp_ops.relu_dwconv_pointwise.default,
        relu_dwconv_pointwise_backward=_cpp_ops.relu_dwconv_pointwise_backward.default,
        pool_bn_stats=_cpp_ops.pool_bn_stats.default,
        pool_bn_stats_backward=_cpp_ops.pool_bn_stats_backward.default,
        factorized_reduce_bn_stats=_cpp_ops.factorized_reduce_bn_stats.default,
        factorized_reduce_bn_stats_backward=_cpp_ops.factorized_reduce_bn_stats_backward.default,
        weighted_sum=_cpp_ops.weighted_sum.default,
        bn_weighted_sum=_cpp_ops.bn_weighted_sum.default,
        bn_weighted_sum_backward=_cpp_ops.bn_weighted_sum_backward.default,
        bn_weighted_sum_backward_factors=_cpp_ops.bn_weighted_sum_backward_factors.default,
        partial_channel_outputs=_cpp_ops.partial_channel_outputs.default,
        partial_channel_outputs_backward=_cpp_ops.partial_channel_outputs_backward.default,
        partial_channel_node=_cpp_ops.partial_channel_node.default,
    )
    # The group and the cell themselves in C++ (csrc/cpu/edge_group.cpp): the same passes as edge_group(cpp_kernels)
    # and edge_cell over it, bit for bit.
    cpp_mixed_ops, cpp_mixed_op, cpp_mixed_cell = define_mixed_ops(
        "fastdarts", cpp_kernels, device_types="cpu",
        group=(_cpp_ops.edge_group.default, _cpp_ops.edge_group_backward.default),
        cell=(_cpp_ops.edge_cell.default, _cpp_ops.edge_cell_backward.default),
    )  # fmt: skip
