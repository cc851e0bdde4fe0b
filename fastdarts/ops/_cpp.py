"""torch.library registrations of the C++ ops (schemas in csrc/fastdarts.cpp), imported only when
fastdarts._C loaded.

Each op gets a fake, which tells torch.compile the outputs' metadata without running the kernel,
and an autograd formula built from registered ops, so the backward traces as well.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .reference import check_like, check_same_tensors, check_weights


def weighted_sum(xs: Sequence[Tensor], w: Tensor) -> Tensor:
    """`out = sum_k w[k] * xs[k]` by the C++ kernel (CPU, float32/float64)."""
    return torch.ops.fastdarts.weighted_sum.default(list(xs), w)


def _torch_check(condition, error, message) -> None:
    """The reference checks' `require` for the fakes: with symbolic shapes, torch._check_* records a
    runtime assertion instead of specialising the graph on the condition."""
    (torch._check_type if error is TypeError else torch._check_value)(condition, message)


def _check_supported_dtype(op: str, t: Tensor) -> None:
    supported = t.dtype in (torch.float32, torch.float64)
    torch._check_type(supported, lambda: f"{op}: only float32 and float64 are supported, got {t.dtype}")


def _needs_input_grad(ctx) -> list[bool]:
    """One flag per tensor argument, Tensor[] arguments flattened in place.

    PyTorch hands setup_context these flags flat (with one extra flag at the end) and backward
    nested per argument; flattening both lets the two index them the same way.
    """
    return pytree.tree_leaves(ctx.needs_input_grad)


# The fakes check what the kernels check, and lay every output out like the kernels do:
# at::empty_like(xs[0]), which keeps a dense layout such as channels_last.


@torch.library.register_fake("fastdarts::weighted_sum")
def _weighted_sum_fake(xs, w):
    check_same_tensors("weighted_sum", "xs", xs, _torch_check)
    _check_supported_dtype("weighted_sum", xs[0])
    check_weights("weighted_sum", "w", w, len(xs), xs[0], _torch_check)
    return torch.empty_like(xs[0])


@torch.library.register_fake("fastdarts::weighted_sum_backward")
def _weighted_sum_backward_fake(grad, xs, w):
    check_same_tensors("weighted_sum_backward", "xs", xs, _torch_check)
    _check_supported_dtype("weighted_sum_backward", xs[0])
    check_like("weighted_sum_backward", "grad", grad, "xs[0]", xs[0], _torch_check)
    check_weights("weighted_sum_backward", "w", w, len(xs), xs[0], _torch_check)
    return [torch.empty_like(xs[0]) for _ in xs], w.new_empty(len(xs))


def _weighted_sum_setup_context(ctx, inputs, output):
    xs, w = inputs
    ctx.num_xs = len(xs)
    w_needs_grad = _needs_input_grad(ctx)[len(xs)]
    # grad_xs needs only w; the xs (K activations) are kept alive only when grad_w needs them.
    ctx.save_for_backward(w, *(xs if w_needs_grad else ()))


def _weighted_sum_backward(ctx, grad):
    num_xs = ctx.num_xs
    needs = _needs_input_grad(ctx)
    xs_need, w_needs_grad = needs[:num_xs], needs[num_xs]
    w, *xs = ctx.saved_tensors
    if w_needs_grad:
        grad_xs, grad_w = torch.ops.fastdarts.weighted_sum_backward.default(grad, xs, w)
        return [g if need else None for g, need in zip(grad_xs, xs_need)], grad_w
    # No grad_w means no reduction to fuse: each grad_xs[k] = w[k] * grad is a single multiply.
    return [grad * wk if need else None for wk, need in zip(w.unbind(0), xs_need)], None


torch.library.register_autograd(
    "fastdarts::weighted_sum", _weighted_sum_backward, setup_context=_weighted_sum_setup_context
)


# The backward is bilinear in (grad, (xs, w)), so its own backward (double backward, e.g. for
# exact Hessian-vector products) is again a weighted sum and a weighted_sum_backward:
#   d/dgrad  = sum_k w[k] gg_xs[k] + sum_k gg_w[k] xs[k]
#   d/dxs[k] = gg_w[k] grad,  d/dw[k] = <grad, gg_xs[k]>   (= weighted_sum_backward(grad, gg_xs, gg_w))


def _weighted_sum_backward_setup_context(ctx, inputs, output):
    grad, xs, w = inputs
    num_xs = len(xs)
    needs = _needs_input_grad(ctx)
    ctx.num_xs = num_xs
    ctx.grad_needs_grad = needs[0]
    ctx.xs_or_w_need_grad = any(needs[1 : num_xs + 2])
    saved_grad = grad if ctx.xs_or_w_need_grad else None
    ctx.save_for_backward(saved_grad, *((w, *xs) if ctx.grad_needs_grad else ()))


def _weighted_sum_backward_backward(ctx, grad_grad_xs, grad_grad_w):
    num_xs = ctx.num_xs
    needs = _needs_input_grad(ctx)
    grad, *w_and_xs = ctx.saved_tensors
    d_grad, d_xs, d_w = None, [None] * num_xs, None
    if ctx.grad_needs_grad:
        w, *xs = w_and_xs
        d_grad = weighted_sum(grad_grad_xs, w) + weighted_sum(xs, grad_grad_w)
    if ctx.xs_or_w_need_grad:
        all_d_xs, all_d_w = torch.ops.fastdarts.weighted_sum_backward.default(grad, grad_grad_xs, grad_grad_w)
        d_xs = [d if need else None for d, need in zip(all_d_xs, needs[1 : num_xs + 1])]
        d_w = all_d_w if needs[num_xs + 1] else None
    return d_grad, d_xs, d_w


torch.library.register_autograd(
    "fastdarts::weighted_sum_backward",
    _weighted_sum_backward_backward,
    setup_context=_weighted_sum_backward_setup_context,
)
