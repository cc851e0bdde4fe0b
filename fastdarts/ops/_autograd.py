"""What the registrations of the backends whose ops have the same schemas (the C++ ops in namespace fastdarts, the
Triton ops in fastdarts_triton) share: the checks only those backends make, and the autograd formulas, registered
once per namespace, so the two cannot drift apart. Imports nothing of either backend: the Triton ops (and the mixed
op built on them) must load without the C++ extension."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import _pytree as pytree

from .reference import check_dtype_and_device, pool_bn_stats_output_shape


def torch_check(condition, error, message) -> None:
    """The reference checks' `require` for the fakes: a plain raise on concrete values, a runtime assertion
    (instead of a specialisation of the graph) on symbolic ones."""
    (torch._check_type if error is TypeError else torch._check_value)(condition, message)


def check_supported_dtype(op: str, t: Tensor, require=torch_check) -> None:
    """The kernels' dtypes: float32 and float64 (the reference runs any floating dtype)."""
    supported = t.dtype in (torch.float32, torch.float64)
    require(supported, TypeError, lambda: f"{op}: only float32 and float64 are supported, got {t.dtype}")


def check_pool_grad(op: str, name: str, grad: Tensor | None, x: Tensor, stride: int, require=torch_check) -> None:
    """An output gradient of pool_bn_stats, when given: the pools' shape, with the dtype and device of x."""
    if grad is None:
        return
    shape = pool_bn_stats_output_shape(x, stride)
    require(
        list(grad.shape) == shape,
        ValueError,
        lambda: f"{op}: {name} must have shape {shape}, got {list(grad.shape)}",
    )
    check_dtype_and_device(op, name, grad, "x", x, require)


def below_autograd() -> contextlib.AbstractContextManager:
    """For the registered ops an autograd.Function calls (it is their autograd): with grad mode off (its forward, a
    backward without create_graph) and eagerly, a guard that runs them below the Autograd key, as torch.library's own
    autograd layer runs them, without that layer's Python (about 50 us a call); nothing with grad mode on (a graph
    to record, or a second derivative to refuse) or under torch.compile, whose Dynamo cannot trace the guard."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


def needs_input_grad(ctx) -> list[bool]:
    """One flag per tensor argument, Tensor[] arguments flattened in place.

    PyTorch hands setup_context these flags flat (with one extra flag at the end) and backward
    nested per argument; flattening both lets the two index them the same way.
    """
    return pytree.tree_leaves(ctx.needs_input_grad)


def register_weighted_sum_autograd(namespace: str) -> None:
    """Autograd of `namespace::weighted_sum` and of its backward op (so double backward too)."""
    ops = getattr(torch.ops, namespace)
    forward_op, backward_op = ops.weighted_sum.default, ops.weighted_sum_backward.default

    def _weighted_sum_setup_context(ctx, inputs, output):
        xs, w = inputs
        ctx.num_xs = len(xs)
        w_needs_grad = needs_input_grad(ctx)[len(xs)]
        # grad_xs needs only w; the xs (K activations) are kept alive only when grad_w needs them.
        ctx.save_for_backward(w, *(xs if w_needs_grad else ()))

    def _weighted_sum_backward(ctx, grad):
        num_xs = ctx.num_xs
        needs = needs_input_grad(ctx)
        xs_need, w_needs_grad = needs[:num_xs], needs[num_xs]
        w, *xs = ctx.saved_tensors
        if w_needs_grad:
            grad_xs, grad_w = backward_op(grad, xs, w)
            return [g if need else None for g, need in zip(grad_xs, xs_need)], grad_w
        # No grad_w means no reduction to fuse: each grad_xs[k] = w[k] * grad is a single multiply.
        return [grad * wk if need else None for wk, need in zip(w.unbind(0), xs_need)], None

    torch.library.register_autograd(
        f"{namespace}::weighted_sum", _weighted_sum_backward, setup_context=_weighted_sum_setup_context
    )

    # The backward is bilinear in (grad, (xs, w)), so its own backward (double backward, e.g. for
    # exact Hessian-vector products) is again a weighted sum and a weighted_sum_backward:
    #   d/dgrad  = sum_k w[k] gg_xs[k] + sum_k gg_w[k] xs[k]
    #   d/dxs[k] = gg_w[k] grad,  d/dw[k] = <grad, gg_xs[k]>   (= weighted_sum_backward(grad, gg_xs, gg_w))

    def _weighted_sum_backward_setup_context(ctx, inputs, output):
        grad, xs, w = inputs
        num_xs = len(xs)
        needs = needs_input_grad(ctx)
        ctx.num_xs = num_xs
        ctx.grad_needs_grad = needs[0]
        ctx.xs_or_w_need_grad = any(needs[1 : num_xs + 2])
        saved_grad = grad if ctx.xs_or_w_need_grad else None
        ctx.save_for_backward(saved_grad, *((w, *xs) if ctx.grad_needs_grad else ()))

    def _weighted_sum_backward_backward(ctx, grad_grad_xs, grad_grad_w):
        num_xs = ctx.num_xs
        needs = needs_input_grad(ctx)
        grad, *w_and_xs = ctx.saved_tensors
        d_grad, d_xs, d_w = None, [None] * num_xs, None
        if ctx.grad_needs_grad:
            w, *xs = w_and_xs
            d_grad = forward_op(list(grad_grad_xs), w) + forward_op(list(xs), grad_grad_w)
        if ctx.xs_or_w_need_grad:
            all_d_xs, all_d_w = backward_op(grad, grad_grad_xs, grad_grad_w)
            d_xs = [d if need else None for d, need in zip(all_d_xs, needs[1 : num_xs + 1])]
            d_w = all_d_w if needs[num_xs + 1] else None
        return d_grad, d_xs, d_w

    torch.library.register_autograd(
        f"{namespace}::weighted_sum_backward",
        _weighted_sum_backward_backward,
        setup_context=_weighted_sum_backward_setup_context,
    )


def register_sample_gates_autograd(op: str) -> None:
    """Autograd of a gate sampler `op` whose inputs are (beta, tau, a, b, k, u, explore, perm) and whose outputs are
    (gates, mask, p_nonzero, s_kept): `namespace::sample_gates`, and fastdarts_triton::sample_gates_seeded, which
    takes an integer seed tensor where u goes (never differentiable, so u's gradient is simply never asked for).

    s_kept (s on the kept, unclamped gates, 0 elsewhere) is all the backward needs besides p_nonzero: with
    x = beta + log u - log1p(-u),
      d gates / d x = (b - a) / tau * s_kept (1 - s_kept),   d s_kept / d x = s_kept (1 - s_kept) / tau,
      d p_nonzero / d beta = p_nonzero (1 - p_nonzero),      d x / d beta = 1,   d x / d u = 1 / u + 1 / (1 - u).
    The backward is written in torch ops on these saved outputs (and u), so it traces, and differentiating it again
    goes back through the op's own derivatives: higher orders are exact too. The formulas are evaluated in the
    order the reference's autograd evaluates them (clamp, mul, sigmoid, div backward), which keeps float32 results
    within a rounding or two of the reference's.
    """

    def _setup_context(ctx, inputs, output):
        beta, tau, a, b, k, u, explore, perm = inputs
        _, mask, p_nonzero, s_kept = output
        ctx.mark_non_differentiable(mask)
        ctx.tau, ctx.scale = tau, b - a
        needs = needs_input_grad(ctx)  # beta, tau, a, b, k, u, explore, perm
        ctx.beta_needs_grad, ctx.u_needs_grad = needs[0], needs[5]
        ctx.save_for_backward(p_nonzero, s_kept, u if ctx.u_needs_grad else None)

    def _backward(ctx, grad_gates, _grad_mask, grad_p_nonzero, grad_s_kept):
        p_nonzero, s_kept, u = ctx.saved_tensors
        # dL/dx: the reference's chain (grad * (b - a)) * (1 - s) * s / tau, with s_kept's own gradient joining
        # before the sigmoid; s_kept = 0 zeroes it off the mask and where the clamp is active.
        grad_x = (grad_gates * ctx.scale + grad_s_kept) * (1 - s_kept) * s_kept / ctx.tau
        grad_beta = grad_x + grad_p_nonzero * (1 - p_nonzero) * p_nonzero if ctx.beta_needs_grad else None
        grad_u = grad_x / u + grad_x / (1 - u) if ctx.u_needs_grad else None
        return grad_beta, None, None, None, None, grad_u, None, None

    torch.library.register_autograd(op, _backward, setup_context=_setup_context)


def register_pool_bn_stats_autograd(namespace: str) -> None:
    """Autograd of `namespace::pool_bn_stats` and of its backward op (so double backward too).

    Autograd saves x alone: the backward kernel recomputes each window's argmax from it. mean and var carry no
    gradient. Gradients are not materialised, so a pool that the loss does not use hands the backward None, and
    the kernel skips that pool's part.
    """
    backward_op = getattr(torch.ops, namespace).pool_bn_stats_backward.default

    def _setup_context(ctx, inputs, output):
        x, stride = inputs
        _, _, mean, var = output
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)
        ctx.stride = stride
        ctx.save_for_backward(x)

    def _backward(ctx, grad_max, grad_avg, _grad_mean, _grad_var):
        (x,) = ctx.saved_tensors
        if grad_max is None and grad_avg is None:
            return None, None
        return backward_op(grad_max, grad_avg, x, ctx.stride), None

    torch.library.register_autograd(f"{namespace}::pool_bn_stats", _backward, setup_context=_setup_context)

    # The backward is linear in (grad_max, grad_avg), and depends on x only through the argmax, which is piecewise
    # constant. So its own backward, for an incoming gradient gg of grad_x, is
    #   d/dgrad_max = gg at each window's argmax: a gather with max_pool2d's indices, which follow the kernels' rule;
    #   d/dgrad_avg = avg_pool2d(gg, 3, stride, 1, count_include_pad=False), the adjoint of spreading grad / count;
    #   d/dx        = 0,
    # made of differentiable ATen ops, so higher orders follow.

    def _backward_setup_context(ctx, inputs, output):
        grad_max, grad_avg, x, stride = inputs
        ctx.set_materialize_grads(False)
        ctx.stride = stride
        ctx.max_needs_grad, ctx.avg_needs_grad = needs_input_grad(ctx)[:2]
        ctx.save_for_backward(x if ctx.max_needs_grad else None)

    def _backward_backward(ctx, grad_grad_x):
        (x,) = ctx.saved_tensors
        d_max = d_avg = None
        if grad_grad_x is not None and ctx.max_needs_grad:
            _, indices = F.max_pool2d(x.detach(), 3, ctx.stride, 1, return_indices=True)
            d_max = grad_grad_x.flatten(2).gather(2, indices.flatten(2)).view_as(indices)
        if grad_grad_x is not None and ctx.avg_needs_grad:
            d_avg = F.avg_pool2d(grad_grad_x, 3, ctx.stride, 1, count_include_pad=False)
        return d_max, d_avg, None, None

    torch.library.register_autograd(
        f"{namespace}::pool_bn_stats_backward", _backward_backward, setup_context=_backward_setup_context
    )


def refuse_differentiation(op: object, message: str) -> None:
    """Registers an autograd for `op` (a qualified name or a custom op: a fused backward that runs once) that raises
    RuntimeError(message) when something differentiates through it, instead of a silently wrong gradient."""

    def _refuse(ctx, *grads):
        raise RuntimeError(message)

    torch.library.register_autograd(op, _refuse, setup_context=lambda ctx, inputs, output: None)


def register_bn_weighted_sum_autograd(namespace: str, gradients: Callable[..., tuple] | None = None) -> None:
    """Autograd of `namespace::bn_weighted_sum`, and the registration that makes its backward op raise when
    differentiated. `gradients` is the backward op with the C++ op's outputs, (grad_ts or [], grad_w or None): by
    default `namespace::bn_weighted_sum_backward` itself.

    The autograd takes mean and invstd as inputs in their own right (reference.bn_weighted_sum has the formulas):
    that is the op's derivative, what opcheck and gradcheck verify, and what a graph that computes the statistics
    itself (torch.var_mean) chains through them. The fused mixed op does not go through it: it calls the backward op
    with batch_statistics set, which folds the path through the statistics into one kernel. With every row fixed,
    that op gives exactly grad_ts and grad_w of this autograd.
    """
    backward_op = getattr(torch.ops, namespace).bn_weighted_sum_backward.default
    gradients = gradients or backward_op

    def _setup_context(ctx, inputs, output):
        ts, w, mean, invstd = inputs
        ctx.num_ts = K = len(ts)
        needs = needs_input_grad(ctx)  # the K ts, w, mean, invstd
        # The ts (K activations) are kept alive only for the reductions that read them: grad_w and grad_invstd.
        keep_ts = needs[K] or needs[K + 2]
        ctx.save_for_backward(w, mean, invstd, *(ts if keep_ts else ()))

    def _backward(ctx, grad):
        K = ctx.num_ts
        needs = needs_input_grad(ctx)
        ts_need, w_needs, mean_needs, invstd_needs = needs[:K], needs[K], needs[K + 1], needs[K + 2]
        w, mean, invstd, *ts = ctx.saved_tensors
        C = invstd.shape[1]
        grad_ts, grad_w = [None] * K, None
        if w_needs:  # every row fixed: grad_ts[k] = w[k] invstd[k] grad, grad_w[k] = sum(grad xhat_k), one kernel
            all_grad_ts, grad_w = gradients(grad, ts, w, mean, invstd, [False] * K, any(ts_need), True)
            if any(ts_need):
                grad_ts = [g if need else None for g, need in zip(all_grad_ts, ts_need)]
        elif any(ts_need):  # no reduction to fuse: each grad_ts[k] = w[k] invstd[k] grad is a single multiply
            coef = w[:, None] * invstd
            grad_ts = [grad * coef[k].view(1, C, 1, 1) if need else None for k, need in enumerate(ts_need)]
        grad_mean = grad_invstd = None
        if mean_needs:
            grad_mean = -(w[:, None] * invstd) * grad.sum((0, 2, 3))
        if invstd_needs:
            centred_sums = [(grad * (t - m.view(1, C, 1, 1))).sum((0, 2, 3)) for t, m in zip(ts, mean)]
            grad_invstd = w[:, None] * torch.stack(centred_sums)
        return grad_ts, grad_w, grad_mean, grad_invstd

    torch.library.register_autograd(f"{namespace}::bn_weighted_sum", _backward, setup_context=_setup_context)

    refuse_differentiation(
        f"{namespace}::bn_weighted_sum_backward",
        f"{namespace}::bn_weighted_sum_backward is not differentiable: for second derivatives of bn_weighted_sum "
        "use backend='reference'",
    )


def register_rnn_mixed_node_autograd(namespace: str) -> None:
    """Autograd of `namespace::rnn_mixed_node`: autograd saves the inputs alone (states, ch, p), the backward kernel
    recomputes every activation from ch. First order only: the recurrent search's second order is a finite
    difference of first-order gradients (RNN.md 2.3)."""
    backward_op = getattr(torch.ops, namespace).rnn_mixed_node_backward.default

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad):
        states, ch, p = ctx.saved_tensors
        if not any(ctx.needs_input_grad):
            return None, None, None
        grads = backward_op(grad, states, ch, p)
        return tuple(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad))

    torch.library.register_autograd(f"{namespace}::rnn_mixed_node", _backward, setup_context=_setup_context)
    refuse_differentiation(
        f"{namespace}::rnn_mixed_node_backward",
        f"{namespace}::rnn_mixed_node_backward is not differentiable: for second derivatives of rnn_mixed_node use "
        "backend='reference'",
    )
