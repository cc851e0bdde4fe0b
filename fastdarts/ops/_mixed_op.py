"""The fused mixed op: one autograd node per DARTS edge, built from one backend's kernels and ATen GEMMs. The edge
is written once (`_Edge`) over a set of building blocks (`EdgeKernels`); `define_mixed_op` registers a mixed op
and its backward for one backend: fastdarts::mixed_op on the C++ kernels (below, when fastdarts._C loaded) and
fastdarts_triton::mixed_op on the Triton kernels (_triton.py).

Forward: relu(x) is read once by the relu_dwconv_pointwise kernel for the first stage of all four convolutions,
each depthwise conv going straight into its 1x1 conv tile by tile (the depthwise outputs are never written) with
the BN statistics of the result in the same pass; a sep conv's second stage is the same kernel on its middle BN's
output (ATen's channels_last batch norm); x is read once more by the pool_bn_stats kernel for both pools and their
BN statistics; the candidates' last BNs and the edge weights fold into one bn_weighted_sum. Only the sum leaves
the op.

Memory: autograd keeps x (which the cell holds anyway), the weights and the BN statistics ([B, C] each). The
backward recomputes the edge's intermediates, uses them, and drops them: an edge's activations live for one
forward or backward call, not from the forward to the backward of the whole network. It computes only what
is asked for: no conv-weight gradients in a first-order architecture step, no `w` gradient in a weight step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._autograd import check_supported_dtype, needs_input_grad, refuse_differentiation
from ._extension import EXTENSION_LOADED
from .reference import (
    MIXED_OP_CANDIDATES,
    check_mixed_op_arguments,
    factorized_reduce,
    factorized_reduce_halves,
    mixed_op_layout,
    mixed_op_output_shape,
    raise_unless,
)


@dataclass(frozen=True)
class EdgeKernels:
    """The building blocks of an edge on one backend, each with the signature of the C++ op of its name."""

    backend: str  # the backend's name in the dispatch table, for messages
    # (x, weights, pointwise_weights, dilations, stride, relu) -> (outs, mean [K, C], var [K, C])
    relu_dwconv_pointwise: Callable[..., tuple]
    # (grads, x, weights, pointwise_weights, dilations, stride, relu, input_grad, weight_grad)
    #   -> (grad_x or None, grad_weights or [], grad_pointwise_weights or [])
    relu_dwconv_pointwise_backward: Callable[..., tuple]
    pool_bn_stats: Callable[..., tuple]  # (x, stride) -> (max_out, avg_out, mean, var)
    pool_bn_stats_backward: Callable[..., Tensor]  # (grad_max or None, grad_avg or None, x, stride) -> grad_x
    weighted_sum: Callable[..., Tensor]  # (xs, w)
    bn_weighted_sum: Callable[..., Tensor]  # (ts, w, mean, invstd)
    # (grad, ts, w, mean, invstd, batch_statistics, input_grad, w_grad) -> (grad_ts or [], grad_w or None)
    bn_weighted_sum_backward: Callable[..., tuple]


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


def _factorized_reduce_backward(
    dt: Tensor, x: Tensor, conv_1: Tensor, conv_2: Tensor, input_grad: bool, weight_grad: bool
) -> tuple[Tensor | None, list[Tensor]]:
    """(dL/drelu(x), [dL/dconv_1, dL/dconv_2]) of reference.factorized_reduce for its output gradient dt: the same
    subsampled halves and block-diagonal matrix, two matrix products on the BLAS (no strided 1x1 oneDNN conv, see
    reference.factorized_reduce)."""
    N, C, H, W = x.shape
    half = conv_1.shape[0]
    dt_rows = dt.permute(0, 2, 3, 1).reshape(-1, 2 * half)  # [N Ho Wo, C_out]
    grads = []
    if weight_grad:
        halves = factorized_reduce_halves(x.relu()).permute(0, 2, 3, 1).reshape(-1, 2 * C)  # [N Ho Wo, 2 C]
        # the diagonal blocks of the matrix's gradient dt_rows^T halves
        grads = [(dt_rows[:, :half].t() @ halves[:, :C]).reshape(conv_1.shape),
                 (dt_rows[:, half:].t() @ halves[:, C:]).reshape(conv_2.shape)]  # fmt: skip
    if not input_grad:
        return None, grads
    matrix = torch.block_diag(conv_1.flatten(1), conv_2.flatten(1))
    d_halves = (dt_rows @ matrix).reshape(N, dt.shape[2], dt.shape[3], 2 * C).permute(0, 3, 1, 2)
    grad_r = torch.zeros_like(x)
    grad_r[:, :, ::2, ::2] = d_halves[:, :C]
    grad_r[:, :, 1::2, 1::2] = d_halves[:, C:, : H // 2, : W // 2]
    return grad_r, grads


def composed_relu_dwconv_pointwise(
    relu_dwconv: Callable[..., list[Tensor]], relu_dwconv_backward: Callable[..., tuple]
):
    """relu_dwconv_pointwise and its backward composed of a backend's relu_dwconv kernels and ATen's 1x1 convs and BN
    statistics (for a backend without the fused kernel): the same results, with the depthwise outputs written and
    read back (and recomputed by the backward)."""

    def forward(x, weights, pointwise_weights, dilations, stride, relu):
        zs = relu_dwconv(x, weights, dilations, stride, relu)
        ts = [_pointwise(z, p) for z, p in zip(zs, pointwise_weights)]
        # ATen's statistics pass: mean and biased variance (torch.var_mean over (0, 2, 3) is far slower on
        # channels_last, benchmarks/RESULTS.md), without gradient, as from the fused kernel.
        moments = [torch.ops.aten.batch_norm_update_stats.default(t.detach(), None, None, 0.0) for t in ts]
        return ts, torch.stack([m for m, _ in moments]), torch.stack([v for _, v in moments])

    def backward(grads, x, weights, pointwise_weights, dilations, stride, relu, input_grad, weight_grad):
        zs = relu_dwconv(x, weights, dilations, stride, relu)
        dzs, grad_pointwise = [], []
        for dt, z, p in zip(grads, zs, pointwise_weights):
            dz, dp = _pointwise_backward(dt, z, p, weight_grad)
            dzs.append(dz)
            grad_pointwise.append(dp)
        grad_x, grad_weights = relu_dwconv_backward(dzs, x, weights, dilations, stride, relu, input_grad, weight_grad)
        return grad_x, grad_weights, (grad_pointwise if weight_grad else [])

    return forward, backward


def _saved_names(candidates: Sequence[int], stride: int) -> list[str]:
    """What the backward reads besides x, in a fixed order: each candidate's tensor before its last BN ("t"), and a
    sep conv's first pointwise output ("t_1") and its middle BN's output ("u"), the input of its second stage."""
    names = []
    for k in candidates:
        if k == _SKIP and stride == 1:
            continue  # the skip's tensor is x
        names.append(f"t{k}")
        if k in (_SEP3, _SEP5):
            names += [f"t{k}_1", f"u{k}"]
    return names


class _Edge:
    """One edge on `kernels`: its forward, keeping what the backward needs when asked to (`keep`), and its backward.

    Every candidate ends in a tensor its last BN normalises (x itself for the stride-1 skip, and the pools' outputs
    when they have no BN); those BNs are not applied one by one: `bn_weighted_sum` folds them, with the edge weights,
    into the sum, and its backward gives every candidate's dL/dt (w[k] and the path through the batch statistics
    included) and dL/dw in one pass.
    """

    def __init__(self, kernels, x, w, weights, stride, candidates, bn_mean, bn_var, training, eps, pool_bn, keep,
                 saved=None):  # fmt: skip
        """With `saved` (the tensors of _saved_names, from a forward with keep), nothing is computed: the edge is
        restored for its backward; bn_mean and bn_var are then the statistics the forward used."""
        self.kernels, self.w = kernels, w
        self.x, self.stride, self.candidates = x, stride, list(candidates)
        self.training, self.eps, self.pool_bn, self.keep = training, eps, pool_bn, keep
        C = x.shape[1]
        layout = mixed_op_layout(stride, pool_bn)
        B = sum(bns for _, bns in layout)
        # Where each candidate's weights and BN rows start.
        self.weights, self.rows, weight_at, row_at = {}, {}, 0, 0
        for k, (num_weights, num_bns) in enumerate(layout):
            self.weights[k], self.rows[k] = list(weights[weight_at : weight_at + num_weights]), row_at
            weight_at, row_at = weight_at + num_weights, row_at + num_bns
        if training and saved is None:
            self.mean, self.var = x.new_zeros(B, C), x.new_ones(B, C)
        else:
            self.mean, self.var = bn_mean.clone(), bn_var.clone()
        convs = [k for k in self.candidates if k in _FIRST_STAGE_DILATION]
        # The first stage of every conv candidate: its depthwise conv and the 1x1 conv after it.
        self.first_stage_weights = [self.weights[k][0] for k in convs]
        self.first_stage_pointwise = [self.weights[k][1] for k in convs]
        self.first_stage_dilations = [_FIRST_STAGE_DILATION[k] for k in convs]
        self.pools: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # pool_bn_stats's outputs, when computed
        if saved is not None:
            self.kept = dict(zip(_saved_names(self.candidates, stride), saved))
            finals = [x if k == _SKIP and stride == 1 else self.kept[f"t{k}"] for k in self.candidates]
        else:
            self.kept: dict[str, Tensor] = {}  # what the backward reads, when keep
            # Per conv candidate: its first 1x1 conv's output and that output's batch mean and variance.
            self.first_stage: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
            if convs:  # relu(x) into every conv candidate's first stage, from one read of x
                ts, mean, var = kernels.relu_dwconv_pointwise(
                    x, self.first_stage_weights, self.first_stage_pointwise, self.first_stage_dilations, stride, True
                )
                self.first_stage = {k: (t, mean[i], var[i]) for i, (k, t) in enumerate(zip(convs, ts))}
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

    def _middle_bn(self, t: Tensor, row: int, mean: Tensor, var: Tensor) -> Tensor:
        """A sep conv's first BN, applied (its ReLU and depthwise conv follow), with t's batch statistics `mean` and
        `var` in training and the recorded ones otherwise."""
        if self.training:
            self.mean[row], self.var[row] = mean, var
        return torch.native_batch_norm(t, None, None, self.mean[row], self.var[row], False, 0.0, self.eps)[0]

    def _candidate(self, k: int) -> Tensor:
        x, stride, row, ws = self.x, self.stride, self.rows[k], self.weights[k]
        if k in (_MAX_POOL, _AVG_POOL):
            if self.pools is None:  # both pools and their statistics from one read of x
                self.pools = self.kernels.pool_bn_stats(x, stride)
            pooled = self.pools[k]
            self._keep(**{f"t{k}": pooled})
            if self.pool_bn and self.training:  # the kernel's statistics spare a pass over the output
                self.mean[row], self.var[row] = self.pools[2][k], self.pools[3][k]
            return pooled
        if k == _SKIP:
            return x if stride == 1 else self._final(factorized_reduce(x, *ws), k)
        t1, mean, var = self.first_stage[k]
        if k in (_DIL3, _DIL5):
            return self._final(t1, k, mean, var)
        u = self._middle_bn(t1, row, mean, var)
        self._keep(**{f"t{k}_1": t1, f"u{k}": u})
        (t2,), mean, var = self.kernels.relu_dwconv_pointwise(u, [ws[2]], [ws[3]], [1], 1, True)
        return self._final(t2, k, mean[0], var[0])

    def saved(self) -> list[Tensor]:
        """The tensors of _saved_names (after a forward with keep)."""
        return [self.kept[name] for name in _saved_names(self.candidates, self.stride)]

    def _final_statistics(self) -> tuple[Tensor, Tensor]:
        """([K, C] mean, [K, C] invstd) of the candidates' last BNs; zeros and ones for a tensor added as it is."""
        C = self.x.shape[1]
        zeros, ones = self.x.new_zeros(C), self.x.new_ones(C)
        mean = torch.stack([zeros if row is None else self.mean[row] for _, row in self.finals])
        invstd = torch.stack([ones if row is None else (self.var[row] + self.eps).rsqrt() for _, row in self.finals])
        return mean, invstd

    def out(self) -> Tensor:
        if not self.finals:
            return self.x.new_zeros(mixed_op_output_shape(self.x, self.stride)).contiguous(memory_format=_CHANNELS_LAST)
        ts = [t.contiguous(memory_format=_CHANNELS_LAST) for t, _ in self.finals]
        return self.kernels.bn_weighted_sum(ts, self.w[self.candidates], *self._final_statistics())

    # The backward ---------------------------------------------------------------------------------------------

    def _middle_bn_backward(self, grad: Tensor, k: int) -> Tensor:
        """dL/dt_1 of a sep conv's first BN, u = BN(t_1), for dL/du = grad."""
        t, row = self.kept[f"t{k}_1"], self.rows[k]
        if self.training:
            mean, invstd = self.mean[row], (self.var[row] + self.eps).rsqrt()
            running_mean = running_var = None
        else:
            mean = invstd = None
            running_mean, running_var = self.mean[row], self.var[row]
        dt, _, _ = torch.ops.aten.native_batch_norm_backward.default(
            grad, t, None, running_mean, running_var, mean, invstd, self.training, self.eps, [True, False, False]
        )
        return dt

    def backward(self, grad: Tensor, x_grad: bool, w_grad: bool, weights_grad: bool):
        """(dL/dx or None, dL/dw or None, dL/dweights per candidate {k: [...]} or None)."""
        x, w = self.x, self.w
        grad_w = w.new_zeros(w.shape) if w_grad else None
        grad_weights = None
        if weights_grad:
            grad_weights = {k: [torch.zeros_like(t) for t in ws] for k, ws in self.weights.items()}
        if not self.finals:
            return (torch.zeros_like(x) if x_grad else None), grad_w, grad_weights
        need_dt = x_grad or weights_grad
        ts = [t.contiguous(memory_format=_CHANNELS_LAST) for t, _ in self.finals]
        batch_statistics = [self.training and row is not None for _, row in self.finals]
        # Every candidate's dL/dt (w[k] included) and dL/dw[k], in one pass over grad and the ts.
        dts, dw = self.kernels.bn_weighted_sum_backward(
            grad, ts, w[self.candidates], *self._final_statistics(), batch_statistics, need_dt, w_grad
        )
        if w_grad:
            grad_w[self.candidates] = dw
        terms = []  # dL/dx is their sum: one weighted_sum at the end
        first_stage_grads, pool_grads = {}, {}
        for k, dt in zip(self.candidates, dts):
            if k == _SKIP and self.stride == 1:
                if x_grad:
                    terms.append(dt)
            elif k in (_MAX_POOL, _AVG_POOL):
                if x_grad:
                    pool_grads[k] = dt
            elif k == _SKIP:  # FactorizedReduce (stride-2 edges only)
                grad_r, grads = _factorized_reduce_backward(dt, x, *self.weights[k], x_grad, weights_grad)
                if x_grad:
                    terms.append(torch.ops.aten.threshold_backward.default(grad_r, x, 0))  # ReLU's mask
                if weights_grad:
                    grad_weights[k] = grads
            else:  # the convolutions: back to the first stage, whose backward is one kernel for all of them
                if k in (_SEP3, _SEP5):  # the second stage, then the middle BN
                    ws = self.weights[k]
                    du, second, second_pointwise = self.kernels.relu_dwconv_pointwise_backward(
                        [dt], self.kept[f"u{k}"], [ws[2]], [ws[3]], [1], 1, True, True, weights_grad
                    )
                    if weights_grad:
                        grad_weights[k][2], grad_weights[k][3] = second[0], second_pointwise[0]
                    dt = self._middle_bn_backward(du, k)
                first_stage_grads[k] = dt
        if pool_grads:  # both pools' gradients in one pass over x, which recomputes the argmax
            terms.append(self.kernels.pool_bn_stats_backward(
                pool_grads.get(_MAX_POOL), pool_grads.get(_AVG_POOL), x, self.stride
            ))  # fmt: skip
        if first_stage_grads:
            convs = list(first_stage_grads)
            dx, firsts, first_pointwise = self.kernels.relu_dwconv_pointwise_backward(
                [first_stage_grads[k] for k in convs], x, self.first_stage_weights, self.first_stage_pointwise,
                self.first_stage_dilations, self.stride, True, x_grad, weights_grad,
            )  # fmt: skip
            if weights_grad:
                for k, g, p in zip(convs, firsts, first_pointwise):
                    grad_weights[k][0], grad_weights[k][1] = g, p
            if x_grad:
                terms.append(dx)
        grad_x = None
        if x_grad:
            if terms:
                terms = [t.contiguous(memory_format=_CHANNELS_LAST) for t in terms]
                grad_x = self.kernels.weighted_sum(terms, w.new_ones(len(terms)))
            else:
                grad_x = torch.zeros_like(x)
        return grad_x, grad_w, grad_weights


def _prepare(x: Tensor) -> Tensor:
    # Every kernel and GEMM here works on channels_last; a contiguous input costs one copy.
    return x.contiguous(memory_format=_CHANNELS_LAST)


def define_mixed_op(namespace: str, kernels: EdgeKernels, device_types: str | None) -> Callable[..., tuple]:
    """Registers `namespace::mixed_op` and `namespace::mixed_op_backward` on `kernels`, with their fakes and
    autograd, and returns the dispatch table's entry (reference.mixed_op's signature)."""
    backend = kernels.backend

    @torch.library.custom_op(f"{namespace}::mixed_op", mutates_args=(), device_types=device_types)
    def mixed_op(
        x: Tensor,
        w: Tensor,
        weights: list[Tensor],
        stride: int,
        candidates: list[int],
        bn_mean: Tensor | None,
        bn_var: Tensor | None,
        training: bool,
        eps: float,
        pool_bn: bool,
        recompute: bool,
    ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        """reference.mixed_op on the building blocks of `kernels` (float32/float64); with recompute False, also the
        intermediates the backward then reads instead of recomputing them (_saved_names)."""
        check_mixed_op_arguments("mixed_op", x, w, weights, stride, candidates, bn_mean, bn_var, training, pool_bn)
        check_supported_dtype("mixed_op", x, raise_unless)
        edge = _Edge(kernels, _prepare(x), w, weights, stride, candidates, bn_mean, bn_var, training, eps, pool_bn,
                     keep=not recompute)  # fmt: skip
        return edge.out(), edge.mean, edge.var, ([] if recompute else edge.saved())

    @mixed_op.register_fake
    def _mixed_op_fake(x, w, weights, stride, candidates, bn_mean, bn_var, training, eps, pool_bn, recompute):
        B = sum(bns for _, bns in mixed_op_layout(stride, pool_bn))
        out = x.new_empty(mixed_op_output_shape(x, stride)).contiguous(memory_format=_CHANNELS_LAST)
        saved = [] if recompute else [torch.empty_like(out) for _ in _saved_names(candidates, stride)]
        return out, x.new_empty(B, x.shape[1]), x.new_empty(B, x.shape[1]), saved

    @torch.library.custom_op(f"{namespace}::mixed_op_backward", mutates_args=(), device_types=device_types)
    def mixed_op_backward(
        grad: Tensor,
        x: Tensor,
        w: Tensor,
        weights: list[Tensor],
        stride: int,
        candidates: list[int],
        mean: Tensor,
        var: Tensor,
        training: bool,
        eps: float,
        pool_bn: bool,
        saved: list[Tensor],
        x_grad: bool,
        w_grad: bool,
        weights_grad: bool,
    ) -> list[Tensor]:
        """Recomputes the edge from x and its statistics (or restores it from `saved`, the forward's intermediates
        when it did not recompute), then returns, in this order, dL/dx if x_grad, dL/dw if w_grad, and every
        dL/dweights[i] if weights_grad (zeros for the convs of candidates not computed)."""
        x = _prepare(x)
        if saved:
            edge = _Edge(kernels, x, w, weights, stride, candidates, mean, var, training, eps, pool_bn, keep=True,
                         saved=saved)  # fmt: skip
        else:
            # mean and var are the statistics the forward normalised with: recomputing in "evaluation" with them as
            # the running statistics reproduces the forward exactly; the backward still treats them as batch ones.
            edge = _Edge(kernels, x, w, weights, stride, candidates, mean, var, False, eps, pool_bn, keep=True)
            edge.training = training
        grad_x, grad_w, grad_weights = edge.backward(_prepare(grad), x_grad, w_grad, weights_grad)
        flat = [g for k in range(len(MIXED_OP_CANDIDATES)) for g in grad_weights[k]] if weights_grad else []
        return [g for g in (grad_x, grad_w) if g is not None] + flat

    @mixed_op_backward.register_fake
    def _mixed_op_backward_fake(grad, x, w, weights, stride, candidates, mean, var, training, eps, pool_bn, saved,
                                x_grad, w_grad, weights_grad):  # fmt: skip
        grad_x = [torch.empty_like(x, memory_format=_CHANNELS_LAST)] if x_grad else []
        grad_w = [w.new_empty(w.shape)] if w_grad else []
        return grad_x + grad_w + ([t.new_empty(t.shape) for t in weights] if weights_grad else [])

    refuse_differentiation(
        mixed_op_backward,
        f"fastdarts.ops.mixed_op: the {backend!r} backend is differentiable once (DARTS's second-order step needs no "
        "more); for higher derivatives run the network under fastdarts.ops.use_backend('reference')",
    )

    def _setup_context(ctx, inputs, output):
        x, w, weights, stride, candidates, bn_mean, bn_var, training, eps, pool_bn, recompute = inputs
        _, mean, var, saved = output
        ctx.mark_non_differentiable(mean, var, *saved)
        ctx.stride, ctx.candidates, ctx.training, ctx.eps, ctx.pool_bn = (
            stride,
            list(candidates),
            training,
            eps,
            pool_bn,
        )
        ctx.num_weights = len(weights)
        ctx.save_for_backward(x, w, mean, var, *weights, *saved)

    def _backward(ctx, grad, _grad_mean, _grad_var, _grad_saved):
        x, w, mean, var, *rest = ctx.saved_tensors
        weights, saved = rest[: ctx.num_weights], rest[ctx.num_weights :]
        needs = needs_input_grad(ctx)  # x, w, then the conv weights
        x_grad, w_grad, weights_grad = needs[0], needs[1], any(needs[2 : 2 + ctx.num_weights])
        grads = iter(mixed_op_backward(
            grad, x, w, weights, ctx.stride, ctx.candidates, mean, var, ctx.training, ctx.eps, ctx.pool_bn, saved,
            x_grad, w_grad, weights_grad,
        ))  # fmt: skip
        grad_x = next(grads) if x_grad else None
        grad_w = next(grads) if w_grad else None
        grad_weights = list(grads) if weights_grad else [None] * ctx.num_weights
        # torch.library takes an empty int list for an empty Tensor list, whose gradient must be [] (not None).
        grad_candidates = None if ctx.candidates else []
        return grad_x, grad_w, grad_weights, None, grad_candidates, None, None, None, None, None, None

    mixed_op.register_autograd(_backward, setup_context=_setup_context)

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
        """The dispatch table's entry: reference.mixed_op's signature."""
        out, mean, var, _ = mixed_op(
            x, w, list(weights), stride, list(candidates), bn_mean, bn_var, training, eps, pool_bn, recompute
        )  # fmt: skip
        return out, mean, var

    return fused_mixed_op


if EXTENSION_LOADED:  # the C++ kernels exist only then
    _cpp_ops = torch.ops.fastdarts
    cpp_mixed_op = define_mixed_op(
        "fastdarts",
        EdgeKernels(
            backend="cpp",
            relu_dwconv_pointwise=_cpp_ops.relu_dwconv_pointwise.default,
            relu_dwconv_pointwise_backward=_cpp_ops.relu_dwconv_pointwise_backward.default,
            pool_bn_stats=_cpp_ops.pool_bn_stats.default,
            pool_bn_stats_backward=_cpp_ops.pool_bn_stats_backward.default,
            weighted_sum=_cpp_ops.weighted_sum.default,
            bn_weighted_sum=_cpp_ops.bn_weighted_sum.default,
            bn_weighted_sum_backward=_cpp_ops.bn_weighted_sum_backward.default,
        ),
        device_types="cpu",
    )
