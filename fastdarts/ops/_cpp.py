"""Fake (meta) kernels and autograd formulas of the C++ ops, so they work under torch.compile."""

from __future__ import annotations

import torch


@torch.library.register_fake("fastdarts::weighted_sum")
def _weighted_sum_fake(xs, w):
    torch._check(len(xs) > 0, lambda: "weighted_sum: xs must not be empty")
    torch._check(w.dim() == 1 and w.shape[0] == len(xs), lambda: "weighted_sum: w must have one weight per tensor")
    for x in xs[1:]:
        torch._check(x.shape == xs[0].shape, lambda: "weighted_sum: every tensor of xs must have the same shape")
    return torch.empty_like(xs[0])


@torch.library.register_fake("fastdarts::weighted_sum_backward")
def _weighted_sum_backward_fake(grad, xs, w):
    torch._check(grad.shape == xs[0].shape, lambda: "weighted_sum_backward: grad must match the inputs")
    return [torch.empty_like(x) for x in xs], torch.empty_like(w)


def _weighted_sum_setup_context(ctx, inputs, output):
    xs, w = inputs
    # Both gradients need the other operand: grad_xs needs w, grad_w needs xs.
    ctx.num_xs = len(xs)
    ctx.save_for_backward(*xs, w)


def _weighted_sum_backward(ctx, grad):
    *xs, w = ctx.saved_tensors
    grad_xs, grad_w = torch.ops.fastdarts.weighted_sum_backward(grad, xs, w)
    return list(grad_xs), grad_w


torch.library.register_autograd(
    "fastdarts::weighted_sum", _weighted_sum_backward, setup_context=_weighted_sum_setup_context
)


def weighted_sum(xs, w):
    return torch.ops.fastdarts.weighted_sum(list(xs), w)
