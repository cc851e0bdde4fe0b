"""The fused mixed op: one autograd node per DARTS edge, built from one backend's kernels and ATen GEMMs. The edge
is written once (`_Edge`) over a set of building blocks (`EdgeKernels`); `define_mixed_op` registers a mixed op
and its backward for one backend: fastdarts::mixed_op on the C++ kernels (below, when fastdarts._C loaded) and
fastdarts_triton::mixed_op on the Triton kernels (_triton.py).

Forward: relu(x) is read once by the relu_dwconv kernel for the first stage of all four convolutions, and x once
by the pool_bn_stats kernel for both pools and their BN statistics; every 1x1 pointwise conv is ATen's (a GEMM
on the channels_last matrix [N*H*W, C]); each other affine-free BN is ATen's channels_last batch norm; the
candidates meet in the weighted_sum kernel. Only the sum leaves the op.

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

from ._autograd import check_supported_dtype, needs_input_grad
from ._extension import EXTENSION_LOADED
from .reference import (
    MIXED_OP_CANDIDATES,
    check_mixed_op_arguments,
    factorized_reduce,
    mixed_op_layout,
    mixed_op_output_shape,
    raise_unless,
)


@dataclass(frozen=True)
class EdgeKernels:
    """The building blocks of an edge on one backend, each with the signature of the C++ op of its name."""

    backend: str  # the backend's name in the dispatch table, for messages
    relu_dwconv: Callable[..., list[Tensor]]  # (x, weights, dilations, stride, relu)
    # (grads, x, weights, dilations, stride, relu, input_grad, weight_grad) -> (grad_x or None, grad_weights or [])
    relu_dwconv_backward: Callable[..., tuple]
    pool_bn_stats: Callable[..., tuple]  # (x, stride) -> (max_out, avg_out, mean, var)
    pool_bn_stats_backward: Callable[..., Tensor]  # (grad_max or None, grad_avg or None, x, stride) -> grad_x
    weighted_sum: Callable[..., Tensor]  # (xs, w)


_CHANNELS_LAST = torch.channels_last
_MAX_POOL, _AVG_POOL, _SKIP, _SEP3, _SEP5, _DIL3, _DIL5 = range(len(MIXED_OP_CANDIDATES))
_FIRST_STAGE_DILATION = {_SEP3: 1, _SEP5: 1, _DIL3: 2, _DIL5: 2}


# The 1x1 convs and the BNs run ATen on every backend (oneDNN on the CPU, cuDNN and cuBLAS on a GPU): a 1x1 conv is a
# GEMM that those libraries run near peak, which a tl.dot kernel would not beat at these sizes.


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
    """(dL/drelu(x), [dL/dconv_1, dL/dconv_2]) of reference.factorized_reduce for its output gradient dt."""
    r = x.relu()
    H, W = x.shape[-2:]
    shifted = r[:, :, 1:, 1:]
    if H % 2 or W % 2:
        shifted = F.pad(shifted, (0, 1, 0, 1))
    half = conv_1.shape[0]
    grads, input_grads = [], []
    for conv, t, d in ((conv_1, r, dt[:, :half]), (conv_2, shifted, dt[:, half:])):
        d_input, d_conv, _ = torch.ops.aten.convolution_backward.default(
            d, t, conv, None, [2, 2], [0, 0], [1, 1], False, [0, 0], 1, [input_grad, weight_grad, False]
        )
        input_grads.append(d_input)
        grads.append(d_conv)
    if not input_grad:
        return None, grads
    grad_r = input_grads[0].clone()
    grad_r[:, :, 1:, 1:] += input_grads[1][:, :, : H - 1, : W - 1]
    return grad_r, grads


class _Edge:
    """The forward of one edge on `kernels`, keeping what the backward needs when asked to (`keep`)."""

    def __init__(self, kernels, x, w, weights, stride, candidates, bn_mean, bn_var, training, eps, pool_bn, keep):
        self.kernels = kernels
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
        if training:
            self.mean, self.var = x.new_zeros(B, C), x.new_ones(B, C)
        else:
            self.mean, self.var = bn_mean.clone(), bn_var.clone()
        self.kept: dict[str, Tensor] = {}  # the pre-BN tensors (and a few others) for the backward
        self.pools: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # pool_bn_stats's outputs, when computed
        self._first_stage()
        self.outputs = [self._candidate(k) for k in self.candidates]
        self.w = w

    def _first_stage(self) -> None:
        """relu(x) into the depthwise convs of every conv candidate computed, from one read of x."""
        convs = [k for k in self.candidates if k in _FIRST_STAGE_DILATION]
        self.first_stage: dict[int, Tensor] = {}
        if convs:
            self.first_stage_weights = [self.weights[k][0] for k in convs]
            self.first_stage_dilations = [_FIRST_STAGE_DILATION[k] for k in convs]
            zs = self.kernels.relu_dwconv(
                self.x, self.first_stage_weights, self.first_stage_dilations, self.stride, True
            )
            self.first_stage = dict(zip(convs, zs))

    def _bn(
        self, t: Tensor, row: int, name: str, batch_statistics: tuple[Tensor, Tensor] | None = None
    ) -> Tensor | None:
        """BN(t) with the statistics of BN row `row`; t kept under `name` for the backward. A candidate's last BN
        (every name without "_1") gives None when recomputing for the backward, which needs only t. In training,
        `batch_statistics` (mean, biased variance), when a kernel has computed them already, spare a pass over t."""
        if self.keep:
            self.kept[name] = t
            if not name.endswith("_1"):
                return None
        if self.training and batch_statistics is not None:
            self.mean[row], self.var[row] = batch_statistics
        if not self.training or batch_statistics is not None:
            return torch.native_batch_norm(t, None, None, self.mean[row], self.var[row], False, 0.0, self.eps)[0]
        y, mean, invstd = torch.native_batch_norm(t, None, None, None, None, True, 0.0, self.eps)
        self.mean[row] = mean
        self.var[row] = invstd.pow(-2) - self.eps
        return y

    def _candidate(self, k: int) -> Tensor:
        x, stride, row, ws = self.x, self.stride, self.rows[k], self.weights[k]
        if k in (_MAX_POOL, _AVG_POOL):
            if self.pools is None:  # both pools and their statistics from one read of x
                self.pools = self.kernels.pool_bn_stats(x, stride)
            pooled, mean, var = self.pools[k], self.pools[2][k], self.pools[3][k]
            if not self.pool_bn:
                if self.keep:
                    self.kept[f"t{k}"] = pooled
                return pooled
            return self._bn(pooled, row, f"t{k}", (mean, var))
        if k == _SKIP:
            return x if stride == 1 else self._bn(factorized_reduce(x, *ws), row, f"t{k}")
        z = self.first_stage[k]
        if k in (_DIL3, _DIL5):
            return self._bn(_pointwise(z, ws[1]), row, f"t{k}")
        u = self._bn(_pointwise(z, ws[1]), row, f"t{k}_1")
        z2 = self.kernels.relu_dwconv(u, [ws[2]], [1], 1, True)[0]
        if self.keep:
            self.kept[f"u{k}"], self.kept[f"z2_{k}"] = u, z2
        return self._bn(_pointwise(z2, ws[3]), row + 1, f"t{k}")

    def out(self) -> Tensor:
        if not self.outputs:
            return self.x.new_zeros(mixed_op_output_shape(self.x, self.stride)).contiguous(memory_format=_CHANNELS_LAST)
        return self.kernels.weighted_sum(self.outputs, self.w[self.candidates])

    # The backward ---------------------------------------------------------------------------------------------

    def _bn_backward(self, grad: Tensor, name: str, row: int, input_grad: bool, w_grad: bool):
        """(dL/dt, sum over channels of dL/dgamma) of y = BN(t) for dL/dy = grad; gamma = 1 is the BN's implicit
        scale, so sum(dL/dgamma) = sum(grad * y): the candidate's share of dL/dw when grad is dL/dout."""
        if not (input_grad or w_grad):
            return None, None
        t = self.kept[name]
        if self.training:
            mean, invstd = self.mean[row], (self.var[row] + self.eps).rsqrt()
            running_mean = running_var = None
        else:
            mean = invstd = None
            running_mean, running_var = self.mean[row], self.var[row]
        dt, dgamma, _ = torch.ops.aten.native_batch_norm_backward.default(
            grad, t, None, running_mean, running_var, mean, invstd, self.training, self.eps, [input_grad, w_grad, False]
        )
        return dt, (dgamma.sum() if w_grad else None)

    def backward(self, grad: Tensor, x_grad: bool, w_grad: bool, weights_grad: bool):
        """(dL/dx or None, dL/dw or None, dL/dweights per candidate {k: [...]} or None)."""
        x, w = self.x, self.w
        grad_w = w.new_zeros(w.shape) if w_grad else None
        grad_weights = None
        if weights_grad:
            grad_weights = {k: [torch.zeros_like(t) for t in ws] for k, ws in self.weights.items()}
        # dL/dx = sum of terms[i] * coefficients[i]: one weighted_sum at the end.
        terms, coefficients = [], []
        first_stage_grads, pool_grads = {}, {}
        need_dt = x_grad or weights_grad
        for k in self.candidates:
            wk, row = w[k], self.rows[k]
            if k == _SKIP and self.stride == 1:
                if w_grad:
                    grad_w[k] = (grad * x).sum()
                if x_grad:
                    terms.append(grad)
                    coefficients.append(wk)
                continue
            if k in (_MAX_POOL, _AVG_POOL):
                if self.pool_bn:
                    dt, share = self._bn_backward(grad, f"t{k}", row, x_grad, w_grad)
                else:
                    dt, share = grad, ((grad * self.kept[f"t{k}"]).sum() if w_grad else None)
                if x_grad:
                    pool_grads[k] = dt * wk
            elif k == _SKIP:  # FactorizedReduce (stride-2 edges only): ATen's conv backward for its two 1x1 convs
                dt, share = self._bn_backward(grad, f"t{k}", row, need_dt, w_grad)
                if need_dt:
                    dt = dt * wk
                    grad_r, grads = _factorized_reduce_backward(dt, x, *self.weights[k], x_grad, weights_grad)
                    if x_grad:
                        terms.append(torch.ops.aten.threshold_backward.default(grad_r, x, 0))  # ReLU's mask
                        coefficients.append(None)
                    if weights_grad:
                        grad_weights[k] = grads
            else:  # the convolutions: everything back to the first stage, which is one relu_dwconv backward
                ws = self.weights[k]
                last_row = row + 1 if k in (_SEP3, _SEP5) else row  # a sep conv's second BN is its last
                dt, share = self._bn_backward(grad, f"t{k}", last_row, need_dt, w_grad)
                if need_dt:
                    # dL/dt is wk times the BN backward of dL/dout: the factor goes on the (small) pointwise
                    # weight and its gradient instead of on the activation.
                    z = self.kept[f"z2_{k}"] if k in (_SEP3, _SEP5) else self.first_stage[k]
                    pointwise = ws[3] if k in (_SEP3, _SEP5) else ws[1]
                    dz, dpointwise = _pointwise_backward(dt, z, pointwise * wk, weights_grad)
                    if weights_grad:
                        grad_weights[k][3 if k in (_SEP3, _SEP5) else 1] = dpointwise * wk
                    if k in (_SEP3, _SEP5):
                        du, second = self.kernels.relu_dwconv_backward(
                            [dz], self.kept[f"u{k}"], [ws[2]], [1], 1, True, True, weights_grad
                        )
                        if weights_grad:
                            grad_weights[k][2] = second[0]
                        dt, _ = self._bn_backward(du, f"t{k}_1", row, True, False)
                        dz, dpointwise = _pointwise_backward(dt, self.first_stage[k], ws[1], weights_grad)
                        if weights_grad:
                            grad_weights[k][1] = dpointwise
                    first_stage_grads[k] = dz
            if w_grad:
                grad_w[k] = share
        if pool_grads:  # both pools' gradients in one pass over x, which recomputes the argmax
            terms.append(self.kernels.pool_bn_stats_backward(
                pool_grads.get(_MAX_POOL), pool_grads.get(_AVG_POOL), x, self.stride
            ))  # fmt: skip
            coefficients.append(None)
        if first_stage_grads:
            convs = list(first_stage_grads)
            dx, firsts = self.kernels.relu_dwconv_backward(
                [first_stage_grads[k] for k in convs], x, self.first_stage_weights, self.first_stage_dilations,
                self.stride, True, x_grad, weights_grad,
            )  # fmt: skip
            if weights_grad:
                for k, g in zip(convs, firsts):
                    grad_weights[k][0] = g
            if x_grad:
                terms.append(dx)
                coefficients.append(None)
        grad_x = None
        if x_grad:
            if terms:
                one = w.new_ones(())
                ws = torch.stack([one if c is None else c for c in coefficients])
                grad_x = self.kernels.weighted_sum([t.contiguous(memory_format=_CHANNELS_LAST) for t in terms], ws)
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
    ) -> tuple[Tensor, Tensor, Tensor]:
        """reference.mixed_op on the building blocks of `kernels` (float32/float64)."""
        check_mixed_op_arguments("mixed_op", x, w, weights, stride, candidates, bn_mean, bn_var, training, pool_bn)
        check_supported_dtype("mixed_op", x, raise_unless)
        edge = _Edge(kernels, _prepare(x), w, weights, stride, candidates, bn_mean, bn_var, training, eps, pool_bn,
                     keep=False)  # fmt: skip
        return edge.out(), edge.mean, edge.var

    @mixed_op.register_fake
    def _mixed_op_fake(x, w, weights, stride, candidates, bn_mean, bn_var, training, eps, pool_bn):
        B = sum(bns for _, bns in mixed_op_layout(stride, pool_bn))
        out = x.new_empty(mixed_op_output_shape(x, stride)).contiguous(memory_format=_CHANNELS_LAST)
        return out, x.new_empty(B, x.shape[1]), x.new_empty(B, x.shape[1])

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
        x_grad: bool,
        w_grad: bool,
        weights_grad: bool,
    ) -> list[Tensor]:
        """Recomputes the edge from x and its statistics, then returns, in this order, dL/dx if x_grad, dL/dw if
        w_grad, and every dL/dweights[i] if weights_grad (zeros for the convs of candidates not computed)."""
        x = _prepare(x)
        # mean and var are the statistics the forward normalised with: recomputing in "evaluation" with them as the
        # running statistics reproduces the forward exactly; the backward still treats them as batch statistics.
        edge = _Edge(kernels, x, w, weights, stride, candidates, mean, var, False, eps, pool_bn, keep=True)
        edge.training = training
        grad_x, grad_w, grad_weights = edge.backward(_prepare(grad), x_grad, w_grad, weights_grad)
        flat = [g for k in range(len(MIXED_OP_CANDIDATES)) for g in grad_weights[k]] if weights_grad else []
        return [g for g in (grad_x, grad_w) if g is not None] + flat

    @mixed_op_backward.register_fake
    def _mixed_op_backward_fake(grad, x, w, weights, stride, candidates, mean, var, training, eps, pool_bn, x_grad,
                                w_grad, weights_grad):  # fmt: skip
        grad_x = [torch.empty_like(x, memory_format=_CHANNELS_LAST)] if x_grad else []
        grad_w = [w.new_empty(w.shape)] if w_grad else []
        return grad_x + grad_w + ([t.new_empty(t.shape) for t in weights] if weights_grad else [])

    def _refuse_double_backward(ctx, *grads):
        raise RuntimeError(
            f"fastdarts.ops.mixed_op: the {backend!r} backend is differentiable once (DARTS's second-order step needs "
            "no more); for higher derivatives run the network under fastdarts.ops.use_backend('reference')"
        )

    mixed_op_backward.register_autograd(_refuse_double_backward)

    def _setup_context(ctx, inputs, output):
        x, w, weights, stride, candidates, bn_mean, bn_var, training, eps, pool_bn = inputs
        _, mean, var = output
        ctx.mark_non_differentiable(mean, var)
        ctx.stride, ctx.candidates, ctx.training, ctx.eps, ctx.pool_bn = stride, list(candidates), training, eps, pool_bn
        ctx.num_weights = len(weights)
        ctx.save_for_backward(x, w, mean, var, *weights)

    def _backward(ctx, grad, _grad_mean, _grad_var):
        x, w, mean, var, *weights = ctx.saved_tensors
        needs = needs_input_grad(ctx)  # x, w, then the conv weights
        x_grad, w_grad, weights_grad = needs[0], needs[1], any(needs[2 : 2 + ctx.num_weights])
        grads = iter(mixed_op_backward(
            grad, x, w, weights, ctx.stride, ctx.candidates, mean, var, ctx.training, ctx.eps, ctx.pool_bn,
            x_grad, w_grad, weights_grad,
        ))  # fmt: skip
        grad_x = next(grads) if x_grad else None
        grad_w = next(grads) if w_grad else None
        grad_weights = list(grads) if weights_grad else [None] * ctx.num_weights
        # torch.library takes an empty int list for an empty Tensor list, whose gradient must be [] (not None).
        grad_candidates = None if ctx.candidates else []
        return grad_x, grad_w, grad_weights, None, grad_candidates, None, None, None, None, None

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
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The dispatch table's entry: reference.mixed_op's signature."""
        return mixed_op(x, w, list(weights), stride, list(candidates), bn_mean, bn_var, training, eps, pool_bn)

    return fused_mixed_op


if EXTENSION_LOADED:  # the C++ kernels exist only then
    _cpp_ops = torch.ops.fastdarts
    cpp_mixed_op = define_mixed_op(
        "fastdarts",
        EdgeKernels(
            backend="cpp",
            relu_dwconv=_cpp_ops.relu_dwconv.default,
            relu_dwconv_backward=_cpp_ops.relu_dwconv_backward.default,
            pool_bn_stats=_cpp_ops.pool_bn_stats.default,
            pool_bn_stats_backward=_cpp_ops.pool_bn_stats_backward.default,
            weighted_sum=_cpp_ops.weighted_sum.default,
        ),
        device_types="cpu",
    )
