"""Autograd formulas shared by the backends whose ops have the same schemas (the C++ ops in namespace fastdarts,
the Triton ops in fastdarts_triton): registered once per namespace, so the two cannot drift apart."""

from __future__ import annotations

import torch
from torch.utils import _pytree as pytree


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
