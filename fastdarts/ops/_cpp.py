"""torch.library registrations of the C++ ops (schemas in csrc/fastdarts.cpp), imported only when
fastdarts._C loaded.

Each op gets a fake, which tells torch.compile the outputs' metadata without running the kernel,
and an autograd formula built from registered ops, so the backward traces as well.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from ._autograd import (
    below_autograd,
    check_pool_grad,
    check_supported_dtype,
    needs_input_grad,
    refuse_differentiation,
    register_bn_weighted_sum_autograd,
    register_pool_bn_stats_autograd,
    register_rnn_mixed_node_autograd,
    register_sample_gates_autograd,
    register_weighted_sum_autograd,
    torch_check,
)
from .reference import (
    channel_parts,
    check_beta,
    check_bn_weighted_sum_arguments,
    check_dtype_and_device,
    check_explore_p,
    check_factorized_reduce_arguments,
    check_factorized_reduce_bn_arguments,
    check_factorized_reduce_bn_stats_arguments,
    check_formed_grads,
    check_gate_noise,
    check_gate_settings,
    check_images,
    check_like,
    check_one_per_item,
    check_pool_bn_stats_arguments,
    check_relu_conv_bn_arguments,
    check_relu_conv_bns_arguments,
    check_relu_dwconv_arguments,
    check_relu_dwconv_pointwise_arguments,
    check_relu_pointwise_bn_stats_arguments,
    check_rnn_mixed_node_arguments,
    check_same_tensors,
    check_sized_list,
    check_weights,
    draw_gate_noise,
    factorized_reduce_output_shape,
    pool_bn_stats_output_shape,
    raise_unless,
    relu_dwconv_output_shape,
)


def weighted_sum(xs: Sequence[Tensor], w: Tensor) -> Tensor:
    """`out = sum_k w[k] * xs[k]` by the C++ kernel (CPU, float32/float64)."""
    return torch.ops.fastdarts.weighted_sum.default(list(xs), w)


def relu_dwconv(
    x: Tensor, weights: Sequence[Tensor], dilations: Sequence[int], stride: int, relu: bool = True
) -> list[Tensor]:
    """ReLU, then one depthwise convolution of the result per weight, by the C++ kernel (CPU, float32/float64)."""
    return torch.ops.fastdarts.relu_dwconv.default(x, list(weights), list(dilations), stride, relu)


def sample_gates(
    beta: Tensor, tau: float, a: float = -0.1, b: float = 1.1, k: int | None = 2, explore_p: float = 0.4,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """One sample of PR-DARTS's gates: the noise drawn exactly as the reference draws it, the rest by the C++ kernel.

    The checks come first, as in reference.sample_gates, so that a bad call raises the reference's error before
    it consumes any random numbers.
    """
    check_beta("sample_gates", beta)
    # A plain raise, not torch._check, which torch.compile cannot trace with a message about a tensor.
    check_supported_dtype("sample_gates", beta, raise_unless)
    check_gate_settings("sample_gates", tau, a, b, k, beta.shape[1])
    check_explore_p("sample_gates", explore_p)
    u, explore, perm = draw_gate_noise(beta, k, explore_p, generator)
    gates, mask, p_nonzero, _ = torch.ops.fastdarts.sample_gates.default(beta, tau, a, b, k, u, explore, perm)
    return gates, mask, p_nonzero


# The fakes check what the kernels check, and lay every output out like the kernels do:
# at::empty_like(xs[0]), which keeps a dense layout such as channels_last.


@torch.library.register_fake("fastdarts::weighted_sum")
def _weighted_sum_fake(xs, w):
    check_same_tensors("weighted_sum", "xs", xs, torch_check)
    check_supported_dtype("weighted_sum", xs[0])
    check_weights("weighted_sum", "w", w, len(xs), xs[0], torch_check)
    return torch.empty_like(xs[0])


@torch.library.register_fake("fastdarts::weighted_sum_backward")
def _weighted_sum_backward_fake(grad, xs, w):
    check_same_tensors("weighted_sum_backward", "xs", xs, torch_check)
    check_supported_dtype("weighted_sum_backward", xs[0])
    check_like("weighted_sum_backward", "grad", grad, "xs[0]", xs[0], torch_check)
    check_weights("weighted_sum_backward", "w", w, len(xs), xs[0], torch_check)
    return [torch.empty_like(xs[0]) for _ in xs], w.new_empty(len(xs))


register_weighted_sum_autograd("fastdarts")


# relu_dwconv. Autograd saves x and the weights, never relu(x) or the outputs: the backward kernel recomputes
# relu(x) from x. Both are needed whatever gradients are asked for: grad_w reads x, grad_x reads the weights and
# takes its mask (and its layout) from x, and the kernel reads the kernel sizes off the weights.


@torch.library.register_fake("fastdarts::relu_dwconv")
def _relu_dwconv_fake(x, weights, dilations, stride, relu):
    check_relu_dwconv_arguments("relu_dwconv", x, weights, dilations, stride, torch_check)
    check_supported_dtype("relu_dwconv", x)
    # The kernel's x.suggest_memory_format(): channels_last in, channels_last out.
    memory_format = suggest_memory_format(x)
    shape = relu_dwconv_output_shape(x, stride)
    return [torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format) for _ in weights]


@torch.library.register_fake("fastdarts::relu_dwconv_backward")
def _relu_dwconv_backward_fake(grads, x, weights, dilations, stride, relu, input_grad, weight_grad):
    op = "relu_dwconv_backward"
    check_relu_dwconv_arguments(op, x, weights, dilations, stride, torch_check)
    check_supported_dtype(op, x)
    output_shape = relu_dwconv_output_shape(x, stride)
    check_sized_list(op, "grads", grads, len(weights), "weight", output_shape, "x", x, torch_check)
    grad_x = torch.empty_like(x) if input_grad else None
    grad_weights = [w.new_empty(w.shape) for w in weights] if weight_grad else []
    return grad_x, grad_weights


def _relu_dwconv_setup_context(ctx, inputs, output):
    x, weights, dilations, stride, relu = inputs
    ctx.num_weights = len(weights)
    ctx.dilations, ctx.stride, ctx.relu = list(dilations), stride, relu
    ctx.save_for_backward(x, *weights)


def _relu_dwconv_backward(ctx, grads):
    K = ctx.num_weights
    needs = needs_input_grad(ctx)  # x, then the K weights (the int and bool arguments follow)
    x_needs_grad, weights_need_grad = needs[0], needs[1 : K + 1]
    x, *weights = ctx.saved_tensors
    grad_x, grad_weights = torch.ops.fastdarts.relu_dwconv_backward.default(
        list(grads), x, weights, ctx.dilations, ctx.stride, ctx.relu, x_needs_grad, any(weights_need_grad)
    )
    grad_weights = [g if need else None for g, need in zip(grad_weights, weights_need_grad)] or [None] * K
    return grad_x, grad_weights, None, None, None


torch.library.register_autograd(
    "fastdarts::relu_dwconv", _relu_dwconv_backward, setup_context=_relu_dwconv_setup_context
)


# The backward is linear in the output gradients g and bilinear in (g, weights) and (g, r), with r = relu(x) and
# m = [x > 0] (r = x and m = 1 without the ReLU):
#   grad_x = m * sum_i convT(g_i, w_i),  grad_w_i = corr(g_i, r).
# So its own backward, for incoming gradients gg_x and gg_w, is again made of relu_dwconv and its backward:
#   d/dg_i = conv(m gg_x, w_i) + conv(r, gg_w_i)   = relu_dwconv(m gg_x, w, relu=False)[i] + relu_dwconv(x, gg_w)[i]
#   d/dw_i = corr(g_i, m gg_x)                     = the weight gradient of relu_dwconv_backward(g, m gg_x, relu=False)
#   d/dx   = m * sum_i convT(g_i, gg_w_i)          = the input gradient of relu_dwconv_backward(g, x, gg_w)
# (ReLU's mask has derivative 0 almost everywhere), which makes the op differentiable any number of times.


def _relu_dwconv_backward_setup_context(ctx, inputs, output):
    grads, x, weights, dilations, stride, relu, input_grad, weight_grad = inputs
    ctx.num_weights = len(weights)
    ctx.dilations, ctx.stride, ctx.relu = list(dilations), stride, relu
    ctx.input_grad, ctx.weight_grad = input_grad, weight_grad
    ctx.save_for_backward(x, *grads, *weights)


def _relu_dwconv_backward_backward(ctx, grad_grad_x, grad_grad_weights):
    K = ctx.num_weights
    needs = needs_input_grad(ctx)  # the K grads, x, the K weights
    grads_need, x_needs, weights_need = needs[:K], needs[K], needs[K + 1 : 2 * K + 1]
    x, *rest = ctx.saved_tensors
    grads, weights = rest[:K], rest[K:]
    dilations, stride, relu = ctx.dilations, ctx.stride, ctx.relu
    # The incoming gradients that can be non-zero: only those of outputs that were computed.
    gg_x = grad_grad_x if ctx.input_grad else None
    gg_w = list(grad_grad_weights) if ctx.weight_grad and grad_grad_weights else None
    masked_gg_x = None if gg_x is None else (torch.where(x > 0, gg_x, 0) if relu else gg_x)

    d_grads = [None] * K
    if any(grads_need):
        terms = []
        if masked_gg_x is not None:
            terms.append(relu_dwconv(masked_gg_x, weights, dilations, stride, False))
        if gg_w is not None:
            terms.append(relu_dwconv(x, gg_w, dilations, stride, relu))
        if terms:
            summed = [sum(parts[1:], parts[0]) for parts in zip(*terms)]
            d_grads = [d if need else None for d, need in zip(summed, grads_need)]
    d_x = None
    if x_needs and gg_w is not None:
        d_x, _ = torch.ops.fastdarts.relu_dwconv_backward.default(
            list(grads), x, gg_w, dilations, stride, relu, True, False
        )
    d_weights = [None] * K
    if any(weights_need) and masked_gg_x is not None:
        _, all_d_weights = torch.ops.fastdarts.relu_dwconv_backward.default(
            list(grads), masked_gg_x, weights, dilations, stride, False, False, True
        )
        d_weights = [d if need else None for d, need in zip(all_d_weights, weights_need)]
    return d_grads, d_x, d_weights, None, None, None, None, None


torch.library.register_autograd(
    "fastdarts::relu_dwconv_backward",
    _relu_dwconv_backward_backward,
    setup_context=_relu_dwconv_backward_setup_context,
)


def relu_dwconv_pointwise(
    x: Tensor,
    weights: Sequence[Tensor],
    pointwise_weights: Sequence[Tensor],
    dilations: Sequence[int],
    stride: int,
    relu: bool = True,
    input_mean: Tensor | None = None,
    input_invstd: Tensor | None = None,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """relu_dwconv, each output straight through its 1x1 conv, and the results' batch statistics, by the C++ kernel
    (CPU, float32/float64), on x normalised by input_mean and input_invstd when given."""
    outs, mean, var = torch.ops.fastdarts.relu_dwconv_pointwise.default(
        x, list(weights), list(pointwise_weights), list(dilations), stride, relu, input_mean, input_invstd
    )
    return list(outs), mean, var


# relu_dwconv_pointwise. As for relu_dwconv, autograd saves x and the weights, never relu(x), the depthwise outputs
# or the outputs: the backward kernel recomputes the depthwise outputs tile by tile.


@torch.library.register_fake("fastdarts::relu_dwconv_pointwise")
def _relu_dwconv_pointwise_fake(x, weights, pointwise_weights, dilations, stride, relu, input_mean=None,
                                input_invstd=None):  # fmt: skip
    op = "relu_dwconv_pointwise"
    check_relu_dwconv_pointwise_arguments(op, x, weights, pointwise_weights, dilations, stride, torch_check,
                                          input_mean, input_invstd)  # fmt: skip
    check_supported_dtype(op, x)
    memory_format = suggest_memory_format(x)
    shape = relu_dwconv_output_shape(x, stride)
    outs = [torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format) for _ in weights]
    return outs, x.new_empty(len(weights), x.shape[1]), x.new_empty(len(weights), x.shape[1])


@torch.library.register_fake("fastdarts::relu_dwconv_pointwise_backward")
def _relu_dwconv_pointwise_backward_fake(grads, x, weights, pointwise_weights, dilations, stride, relu, input_grad,
                                         weight_grad, input_mean=None, input_invstd=None, grad_inputs=None,
                                         grad_factors=None):  # fmt: skip
    op = "relu_dwconv_pointwise_backward"
    check_relu_dwconv_pointwise_arguments(op, x, weights, pointwise_weights, dilations, stride, torch_check,
                                          input_mean, input_invstd)  # fmt: skip
    check_supported_dtype(op, x)
    check_sized_list(op, "grads", grads, len(weights), "weight", relu_dwconv_output_shape(x, stride), "x", x,
                     torch_check)  # fmt: skip
    check_formed_grads(op, len(weights), "weight", relu_dwconv_output_shape(x, stride), x, grad_inputs, grad_factors,
                       torch_check)  # fmt: skip
    grad_x = torch.empty_like(x) if input_grad else None
    grad_weights = [w.new_empty(w.shape) for w in weights] if weight_grad else []
    grad_pointwise = [p.new_empty(p.shape) for p in pointwise_weights] if weight_grad else []
    input_sums = x.new_empty(2, x.shape[1]) if input_grad and input_mean is not None else None
    return grad_x, grad_weights, grad_pointwise, input_sums


def _relu_dwconv_pointwise_setup_context(ctx, inputs, output):
    x, weights, pointwise_weights, dilations, stride, relu, *normalisation = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.num_weights = len(weights)
    ctx.dilations, ctx.stride, ctx.relu = list(dilations), stride, relu
    input_mean, input_invstd = (normalisation + [None, None])[:2]
    ctx.normalised = input_mean is not None
    ctx.save_for_backward(x, *weights, *pointwise_weights, *([input_mean, input_invstd] if ctx.normalised else []))


def _relu_dwconv_pointwise_backward(ctx, grads, _grad_mean, _grad_var):
    K = ctx.num_weights
    needs = needs_input_grad(ctx)  # x, the K depthwise weights, the K 1x1 weights (, input_mean, input_invstd)
    x_needs_grad, weights_need_grad = needs[0], needs[1 : 2 * K + 1]
    normalisation_needs_grad = ctx.normalised and any(ctx.needs_input_grad[6:8])
    x, *rest = ctx.saved_tensors
    input_mean, input_invstd = rest[2 * K :] if ctx.normalised else (None, None)
    # The kernel's input gradient is that of the normalised x, u = (x - mean) invstd: dL/dx = invstd dL/du, and
    # mean and invstd get theirs from dL/du by the same chain rule (dL/dmean = -invstd sum dL/du, from the kernel's
    # sums; dL/dinvstd = sum dL/du (x - mean), not sum(dL/du u) / invstd, which an invstd of 0 would break).
    grad_u, grad_weights, grad_pointwise, sums = torch.ops.fastdarts.relu_dwconv_pointwise_backward.default(
        list(grads), x, rest[:K], rest[K : 2 * K], ctx.dilations, ctx.stride, ctx.relu,
        x_needs_grad or normalisation_needs_grad, any(weights_need_grad), input_mean, input_invstd,
    )  # fmt: skip
    both = [*grad_weights, *grad_pointwise] or [None] * (2 * K)
    both = [g if need else None for g, need in zip(both, weights_need_grad)]
    grad_x = grad_mean = grad_invstd = None
    if not ctx.normalised:
        grad_x = grad_u
    elif grad_u is not None:
        C = x.shape[1]
        invstd = input_invstd.reshape(1, C, 1, 1)
        grad_x = grad_u * invstd if x_needs_grad else None
        if ctx.needs_input_grad[6]:
            grad_mean = -input_invstd * sums[:1]
        if ctx.needs_input_grad[7]:
            grad_invstd = (grad_u * (x - input_mean.reshape(1, C, 1, 1))).sum((0, 2, 3)).reshape(1, C)
    # The arguments as the caller passed them: input_mean and input_invstd may be left to their defaults.
    return (grad_x, both[:K], both[K:], None, None, None, grad_mean, grad_invstd)[: len(ctx.needs_input_grad)]


torch.library.register_autograd(
    "fastdarts::relu_dwconv_pointwise",
    _relu_dwconv_pointwise_backward,
    setup_context=_relu_dwconv_pointwise_setup_context,
)


refuse_differentiation(
    "fastdarts::relu_dwconv_pointwise_backward",
    "fastdarts.ops.relu_dwconv_pointwise: the 'cpp' backend is differentiable once; for higher derivatives use the "
    "'reference' backend",
)


# factorized_reduce_bn_stats and relu_pointwise_bn_stats: building blocks of the mixed ops (the stride-2 skips of a
# group's edges) and of relu_conv_bn (a cell's preprocessing), called as torch.ops.fastdarts.<op>.


@torch.library.register_fake("fastdarts::factorized_reduce_bn_stats")
def _factorized_reduce_bn_stats_fake(xs, conv_1s, conv_2s, relu):
    op = "factorized_reduce_bn_stats"
    check_factorized_reduce_bn_stats_arguments(op, xs, conv_1s, conv_2s, torch_check)
    x = xs[0]
    check_supported_dtype(op, x)
    memory_format = suggest_memory_format(x)
    shape = factorized_reduce_output_shape(x, conv_1s[0])
    outs = [torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format) for _ in conv_1s]
    return outs, x.new_empty(len(conv_1s), shape[1]), x.new_empty(len(conv_1s), shape[1])


@torch.library.register_fake("fastdarts::factorized_reduce_bn_stats_backward")
def _factorized_reduce_bn_stats_backward_fake(grads, xs, conv_1s, conv_2s, relu, input_grad, weight_grad,
                                              grad_inputs=None, grad_factors=None):  # fmt: skip
    op = "factorized_reduce_bn_stats_backward"
    check_factorized_reduce_bn_stats_arguments(op, xs, conv_1s, conv_2s, torch_check)
    x = xs[0]
    check_supported_dtype(op, x)
    shape = factorized_reduce_output_shape(x, conv_1s[0])
    check_sized_list(op, "grads", grads, len(conv_1s), "output", shape, "x", x, torch_check)
    check_formed_grads(op, len(conv_1s), "output", shape, x, grad_inputs, grad_factors, torch_check)
    grad_xs = [torch.empty_like(part) for part in xs] if input_grad else []
    grad_1s = [w.new_empty(w.shape) for w in conv_1s] if weight_grad else []
    grad_2s = [w.new_empty(w.shape) for w in conv_2s] if weight_grad else []
    return grad_xs, grad_1s, grad_2s


@torch.library.register_fake("fastdarts::relu_pointwise_bn_stats")
def _relu_pointwise_bn_stats_fake(xs, weights, relu):
    op = "relu_pointwise_bn_stats"
    check_relu_pointwise_bn_stats_arguments(op, xs, weights, torch_check)
    x = xs[0]
    check_supported_dtype(op, x)
    shape = [x.shape[0], weights[0].shape[0], *x.shape[2:]]
    memory_format = suggest_memory_format(x)
    outs = [torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format) for _ in weights]
    return outs, x.new_empty(len(weights), shape[1]), x.new_empty(len(weights), shape[1])


@torch.library.register_fake("fastdarts::relu_pointwise_bn_stats_backward")
def _relu_pointwise_bn_stats_backward_fake(grads, xs, weights, relu, input_grad, weight_grad, grad_inputs=None,
                                           grad_factors=None):  # fmt: skip
    op = "relu_pointwise_bn_stats_backward"
    check_relu_pointwise_bn_stats_arguments(op, xs, weights, torch_check)
    x = xs[0]
    check_supported_dtype(op, x)
    shape = [x.shape[0], weights[0].shape[0], *x.shape[2:]]
    check_sized_list(op, "grads", grads, len(weights), "output", shape, "x", x, torch_check)
    check_formed_grads(op, len(weights), "output", shape, x, grad_inputs, grad_factors, torch_check)
    grad_xs = [torch.empty_like(part) for part in xs] if input_grad else []
    return grad_xs, [w.new_empty(w.shape) for w in weights] if weight_grad else []


# partial_channel_outputs and its backward: building blocks of the mixed ops with partial channels (PC-DARTS, DrNAS),
# inside fastdarts::mixed_ops, which is differentiable.


def _check_partial_channel_outputs(op, x, partial_channels, stride, bypass_w, E) -> list[int]:
    """The arguments the kernel checks first, and the edges' output shape [N, C, H_out, W_out]."""
    check_images(op, "x", x, torch_check)
    check_supported_dtype(op, x)
    torch_check(stride in (1, 2), ValueError, lambda: f"{op}: stride must be 1 or 2, got {stride}")
    torch_check(
        partial_channels >= 2 and x.shape[1] % partial_channels == 0,
        ValueError,
        lambda: (
            f"{op}: partial_channels must be an integer >= 2 dividing the {x.shape[1]} channels, got {partial_channels}"
        ),
    )
    if bypass_w is not None:
        check_weights(op, "bypass_w", bypass_w, E, x, torch_check)
    return relu_dwconv_output_shape(x, stride)  # the mixed ops' output shape, which the bypass's pool rounds up to


@torch.library.register_fake("fastdarts::partial_channel_outputs")
def _partial_channel_outputs_fake(outs, x, partial_channels, stride, bypass_w):
    op = "partial_channel_outputs"
    shape = _check_partial_channel_outputs(op, x, partial_channels, stride, bypass_w, len(outs))
    check_sized_list(op, "outs", outs, len(outs), "edge", [shape[0], shape[1] // partial_channels, *shape[2:]], "x",
                     x, torch_check)  # fmt: skip
    return [torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last) for _ in outs]


@torch.library.register_fake("fastdarts::partial_channel_outputs_backward")
def _partial_channel_outputs_backward_fake(grads, x, partial_channels, stride, bypass_w, x_grad, bypass_w_grad,
                                           grad_x_base=None):  # fmt: skip
    op = "partial_channel_outputs_backward"
    shape = _check_partial_channel_outputs(op, x, partial_channels, stride, bypass_w, len(grads))
    if grad_x_base is not None:
        torch_check(x_grad, ValueError, lambda: f"{op}: grad_x_base needs x_grad")
        torch_check(grad_x_base.shape == x.shape, ValueError,
                    lambda: f"{op}: grad_x_base must have the shape of x {list(x.shape)}, "
                            f"got {list(grad_x_base.shape)}")  # fmt: skip
        check_dtype_and_device(op, "grad_x_base", grad_x_base, "x", x, torch_check)
    ops_shape = [shape[0], shape[1] // partial_channels, *shape[2:]]
    ops_grads = [
        torch.empty(ops_shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        for g in grads
        if g is not None
    ]
    grad_x = torch.empty_like(x, memory_format=torch.channels_last) if x_grad else None
    return ops_grads, grad_x, x.new_empty(len(grads)) if bypass_w_grad else None


@torch.library.register_fake("fastdarts::partial_channel_node")
def _partial_channel_node_fake(outs, xs, partial_channels, bypass_w):
    op = "partial_channel_node"
    E = len(outs)
    torch_check(E >= 1, ValueError, lambda: f"{op}: outs must be a non-empty list of tensors")
    torch_check(len(xs) == E, ValueError, lambda: f"{op}: xs must have one tensor per edge (E = {E}), got {len(xs)}")
    torch_check(partial_channels >= 2, ValueError,
                lambda: f"{op}: partial_channels must be an integer >= 2, got {partial_channels}")  # fmt: skip
    check_images(op, "outs[0]", outs[0], torch_check)
    check_supported_dtype(op, outs[0])
    N, m, H, W = outs[0].shape
    C = partial_channels * m
    check_sized_list(op, "outs", outs, E, "edge", [N, m, H, W], "outs[0]", outs[0], torch_check)
    for e, x in enumerate(xs):
        torch_check(x.dim() == 4 and x.shape[0] == N and x.shape[1] in (C, C - m) and x.shape[2:] == (H, W),
                    ValueError,
                    lambda e=e, x=x: f"{op}: xs[{e}] must be a state {[N, C, H, W]} or its bypass alone "
                                     f"{[N, C - m, H, W]} (outs[0] {list(outs[0].shape)}, partial_channels "
                                     f"{partial_channels}), got {list(x.shape)}")  # fmt: skip
        check_dtype_and_device(op, f"xs[{e}]", x, "outs[0]", outs[0], torch_check)
    if bypass_w is not None:
        check_weights(op, "bypass_w", bypass_w, E, outs[0], torch_check)
    return torch.empty([N, C, H, W], dtype=outs[0].dtype, device=outs[0].device, memory_format=torch.channels_last)


for _name in ("partial_channel_outputs", "partial_channel_outputs_backward", "partial_channel_node"):
    refuse_differentiation(
        f"fastdarts::{_name}",
        f"fastdarts::{_name} is a part of fastdarts.ops.mixed_ops, which is differentiable: call that",
    )


def _register_pointwise_bn_stats_autograd(name: str, parts: int) -> None:
    """Autograd of fastdarts::`name` (xs, `parts` lists of E weights, relu) -> (outs, mean, var) through its backward
    op (grads, xs, the weight lists, relu, input_grad, weight_grad) -> (grad_xs, one gradient list per part), xs the
    channel parts of x. Saves xs and the weights; the backward kernel recomputes relu(x)."""
    backward_op = getattr(torch.ops.fastdarts, f"{name}_backward").default

    def setup_context(ctx, inputs, output):
        xs, *weights, relu = inputs
        _, mean, var = output
        ctx.mark_non_differentiable(mean, var)
        ctx.x_parts, ctx.num_outputs, ctx.relu = len(xs), len(weights[0]), relu
        ctx.save_for_backward(*xs, *(w for ws in weights for w in ws))

    def backward(ctx, grads, _grad_mean, _grad_var):
        E, P = ctx.num_outputs, ctx.x_parts
        needs = needs_input_grad(ctx)  # each part of x, then every part's E weights
        x_needs, weight_needs = needs[:P], needs[P:]
        saved = ctx.saved_tensors
        xs, flat = list(saved[:P]), saved[P:]
        weights = [flat[p * E : (p + 1) * E] for p in range(parts)]
        grad_xs, *grad_parts = backward_op(list(grads), xs, *weights, ctx.relu, any(x_needs), any(weight_needs))
        grad_xs = [g if need else None for g, need in zip(grad_xs, x_needs)] if any(x_needs) else [None] * P
        flat_grads = [g for gs in grad_parts for g in gs] or [None] * (parts * E)
        flat_grads = [g if need else None for g, need in zip(flat_grads, weight_needs)]
        return grad_xs, *(flat_grads[p * E : (p + 1) * E] for p in range(parts)), None

    torch.library.register_autograd(f"fastdarts::{name}", backward, setup_context=setup_context)
    refuse_differentiation(
        f"fastdarts::{name}_backward",
        f"fastdarts::{name}: the 'cpp' backend is differentiable once; for higher derivatives use the 'reference' "
        "backend",
    )


_register_pointwise_bn_stats_autograd("factorized_reduce_bn_stats", 2)
_register_pointwise_bn_stats_autograd("relu_pointwise_bn_stats", 1)


def factorized_reduce(x: Tensor, conv_1: Tensor, conv_2: Tensor, relu: bool = True) -> Tensor:
    """reference.factorized_reduce by the factorized_reduce_bn_stats kernel (CPU, float32/float64); its statistics,
    a few sums per output value, go unused."""
    check_factorized_reduce_arguments("factorized_reduce", x, conv_1, conv_2)
    (out,), _, _ = torch.ops.fastdarts.factorized_reduce_bn_stats.default([x], [conv_1], [conv_2], relu)
    return out


class _ConvBNs(torch.autograd.Function):
    """K convs of one x = torch.cat(xs, 1) by a statistics kernel, each followed by an affine-free BN: a cell's
    preprocessing. `kernel` names the kernel and how many weight lists it takes: ("relu_pointwise_bn_stats", 1), K
    ReLU-1x1 convs (reference.relu_conv_bns), or ("factorized_reduce_bn_stats", 2), K FactorizedReduces
    (reference.factorized_reduce_bn). The ReLU, the K convs and their outputs' statistics run in one pass over xs
    where they are; each BN is a one-term bn_weighted_sum. The backward is each BN's backward as factors
    (bn_weighted_sum_backward_factors, through the batch statistics in training) and one conv backward for all K,
    which forms each output's gradient from them as it reads it, masks the gradient by x > 0, sums it over the
    outputs and writes it to each of xs in the same pass. Saves xs, the weights, the convs' outputs and the
    statistics."""

    @staticmethod
    def forward(ctx, kernel, num_parts, relu, trainings, momenta, epsilons, *tensors):
        name, lists = kernel
        K = len(trainings)
        xs, tensors = list(tensors[:num_parts]), tensors[num_parts:]
        weights, running_means, running_vars = tensors[: lists * K], tensors[lists * K : (lists + 1) * K], \
            tensors[(lists + 1) * K :]  # fmt: skip
        weight_lists = [list(weights[i * K : (i + 1) * K]) for i in range(lists)]
        with below_autograd():
            ts, means, variances = getattr(torch.ops.fastdarts, name).default(xs, *weight_lists, relu)
        one = xs[0].new_ones(1)
        outs, statistics = [], []
        for k, t in enumerate(ts):
            mean, var = means[k : k + 1], variances[k : k + 1]
            if trainings[k]:
                if running_means[k] is not None:  # as F.batch_norm: the running variance is the unbiased one
                    count = t.numel() // t.shape[1]
                    running_means[k].lerp_(mean[0], momenta[k])
                    running_vars[k].lerp_(var[0] * (count / max(count - 1, 1)), momenta[k])
            else:
                mean, var = running_means[k][None], running_vars[k][None]
            invstd = (var + epsilons[k]).rsqrt()
            with below_autograd():
                outs.append(torch.ops.fastdarts.bn_weighted_sum.default([t], one, mean, invstd))
            statistics += [mean, invstd]
        ctx.save_for_backward(*xs, one, *weights, *ts, *statistics)
        ctx.kernel, ctx.trainings, ctx.relu, ctx.num_parts = kernel, trainings, relu, num_parts
        ctx.set_materialize_grads(False)  # an output not in the loss gets None, and its weights no gradient
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        (name, lists), K, P = ctx.kernel, len(ctx.trainings), ctx.num_parts
        saved = ctx.saved_tensors
        xs, one, rest = list(saved[:P]), saved[P], saved[P + 1 :]
        weights, ts, statistics = rest[: lists * K], rest[lists * K : (lists + 1) * K], rest[(lists + 1) * K :]
        needs = ctx.needs_input_grad[6:]  # the parts of x, the weights, the running statistics
        # The outputs in the loss (None: not), each BN's backward as factors, with which one conv backward for them
        # all forms the gradients as it reads them.
        taken = [k for k in range(K) if grads[k] is not None]
        taken_grads, factors = [], []
        for k in taken:
            grad = grads[k].contiguous(memory_format=suggest_memory_format(ts[k]))
            with below_autograd():
                _, rows, _ = torch.ops.fastdarts.bn_weighted_sum_backward_factors.default(
                    grad, [ts[k]], one, statistics[2 * k], statistics[2 * k + 1], [ctx.trainings[k]], [False], False
                )
            taken_grads.append(grad)
            factors.append(rows)
        weight_grads = [None] * (lists * K)
        grad_xs = [None] * P
        if taken:
            x_needs, weight_needs = needs[:P], needs[P : P + lists * K]
            taken_weights = [[weights[i * K + k] for k in taken] for i in range(lists)]
            with below_autograd():
                grad_xs, *grad_lists = getattr(torch.ops.fastdarts, f"{name}_backward").default(
                    taken_grads, xs, *taken_weights, ctx.relu, any(x_needs),
                    any(weight_needs[i * K + k] for i in range(lists) for k in taken),
                    [ts[k] for k in taken], torch.cat(factors),
                )  # fmt: skip
            grad_xs = [g if need else None for g, need in zip(grad_xs, x_needs)] if any(x_needs) else [None] * P
            for i, grad_list in enumerate(grad_lists):
                for k, g in zip(taken, grad_list):
                    weight_grads[i * K + k] = g if weight_needs[i * K + k] else None
        return None, None, None, None, None, None, *grad_xs, *weight_grads, *([None] * (2 * K))


_RELU_POINTWISE = ("relu_pointwise_bn_stats", 1)
_FACTORIZED_REDUCE = ("factorized_reduce_bn_stats", 2)


def relu_conv_bns(
    x: Tensor | Sequence[Tensor], weights: Sequence[Tensor], batch_norms: Sequence[tuple], relu: bool = True
) -> list[Tensor]:  # fmt: skip
    """reference.relu_conv_bns by the C++ kernels (CPU, float32/float64); x's channel parts, when given, are read
    where they are."""
    check_relu_conv_bns_arguments("relu_conv_bns", x, weights, batch_norms)
    return _relu_conv_bns(channel_parts(x), weights, batch_norms, relu)


def _relu_conv_bns(xs: list[Tensor], weights: Sequence[Tensor], batch_norms: Sequence[tuple],
                   relu: bool) -> list[Tensor]:  # fmt: skip
    """relu_conv_bns on checked arguments, x = torch.cat(xs, 1): one kernel pass for the weights of each number of
    output channels (the kernel's products take one)."""
    outs: list[Tensor | None] = [None] * len(weights)
    for channels in dict.fromkeys(w.shape[0] for w in weights):
        ks = [k for k, w in enumerate(weights) if w.shape[0] == channels]
        running_means, running_vars, trainings, momenta, epsilons = zip(*(batch_norms[k] for k in ks))
        group = _ConvBNs.apply(_RELU_POINTWISE, len(xs), relu, trainings, momenta, epsilons, *xs,
                               *(weights[k] for k in ks), *running_means, *running_vars)  # fmt: skip
        for k, out in zip(ks, group):
            outs[k] = out
    return outs


def relu_conv_bn(
    x: Tensor, weight: Tensor, running_mean: Tensor | None, running_var: Tensor | None, training: bool,
    momentum: float, eps: float, relu: bool = True,
) -> Tensor:  # fmt: skip
    """reference.relu_conv_bn by the C++ kernels (CPU, float32/float64)."""
    check_relu_conv_bn_arguments("relu_conv_bn", x, weight, running_mean, running_var, training)
    return _relu_conv_bns([x], [weight], [(running_mean, running_var, training, momentum, eps)], relu)[0]


def factorized_reduce_bn(
    x: Tensor | Sequence[Tensor], conv_1: Tensor, conv_2: Tensor, running_mean: Tensor | None,
    running_var: Tensor | None, training: bool, momentum: float, eps: float, relu: bool = True,
) -> Tensor:  # fmt: skip
    """reference.factorized_reduce_bn by the C++ kernels (CPU, float32/float64), as relu_conv_bns: x's channel parts,
    when given, are read where they are."""
    check_factorized_reduce_bn_arguments("factorized_reduce_bn", x, conv_1, conv_2, running_mean, running_var, training)
    xs = channel_parts(x)
    (out,) = _ConvBNs.apply(_FACTORIZED_REDUCE, len(xs), relu, (training,), (momentum,), (eps,), *xs, conv_1, conv_2,
                            running_mean, running_var)  # fmt: skip
    return out


# sample_gates, pool_bn_stats and bn_weighted_sum: their autograd formulas are _autograd.py's, shared with the Triton
# ops.


@torch.library.register_fake("fastdarts::sample_gates")
def _sample_gates_fake(beta, tau, a, b, k, u, explore, perm):
    check_beta("sample_gates", beta, torch_check)
    check_supported_dtype("sample_gates", beta)
    check_gate_settings("sample_gates", tau, a, b, k, beta.shape[1], torch_check)
    check_gate_noise("sample_gates", beta, k, u, explore, perm, torch_check)
    # The kernel's at::empty({E, K}, beta.options()): contiguous, whatever beta's strides.
    return tuple(beta.new_empty(beta.shape) for _ in range(4))


register_sample_gates_autograd("fastdarts::sample_gates")


def pool_bn_stats(x: Tensor, stride: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both 3x3 pools of x and their per-channel batch statistics, by the C++ kernel (CPU, float32/float64)."""
    return torch.ops.fastdarts.pool_bn_stats.default(x, stride)


@torch.library.register_fake("fastdarts::pool_bn_stats")
def _pool_bn_stats_fake(x, stride):
    check_pool_bn_stats_arguments("pool_bn_stats", x, stride, torch_check)
    check_supported_dtype("pool_bn_stats", x)
    # The kernel's x.suggest_memory_format() for the pools; the statistics are contiguous [2, C].
    memory_format = suggest_memory_format(x)
    shape = pool_bn_stats_output_shape(x, stride)
    pools = [torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format) for _ in range(2)]
    return (*pools, x.new_empty((2, x.shape[1])), x.new_empty((2, x.shape[1])))


@torch.library.register_fake("fastdarts::pool_bn_stats_backward")
def _pool_bn_stats_backward_fake(grad_max, grad_avg, x, stride):
    op = "pool_bn_stats_backward"
    check_pool_bn_stats_arguments(op, x, stride, torch_check)
    check_supported_dtype(op, x)
    check_pool_grad(op, "grad_max", grad_max, x, stride)
    check_pool_grad(op, "grad_avg", grad_avg, x, stride)
    return torch.empty_like(x)


register_pool_bn_stats_autograd("fastdarts")


def bn_weighted_sum(ts: Sequence[Tensor], w: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    """`out = sum_k w[k] * (ts[k] - mean[k]) * invstd[k]` per channel, by the C++ kernel (CPU, float32/float64)."""
    return torch.ops.fastdarts.bn_weighted_sum.default(list(ts), w, mean, invstd)


@torch.library.register_fake("fastdarts::bn_weighted_sum")
def _bn_weighted_sum_fake(ts, w, mean, invstd):
    check_bn_weighted_sum_arguments("bn_weighted_sum", ts, w, mean, invstd, torch_check)
    check_supported_dtype("bn_weighted_sum", ts[0])
    return torch.empty_like(ts[0])


def _check_bn_weighted_sum_backward(op, grad, ts, w, mean, invstd, batch_statistics):
    """The checks both backward ops of bn_weighted_sum make, in the kernel's order."""
    check_bn_weighted_sum_arguments(op, ts, w, mean, invstd, torch_check)
    check_supported_dtype(op, ts[0])
    check_like(op, "grad", grad, "ts[0]", ts[0], torch_check)
    check_one_per_item(op, "batch_statistics", len(batch_statistics), len(ts), "tensor", torch_check)


@torch.library.register_fake("fastdarts::bn_weighted_sum_backward")
def _bn_weighted_sum_backward_fake(grad, ts, w, mean, invstd, batch_statistics, input_grad, w_grad):
    _check_bn_weighted_sum_backward("bn_weighted_sum_backward", grad, ts, w, mean, invstd, batch_statistics)
    grad_ts = [torch.empty_like(ts[0]) for _ in ts] if input_grad else []
    return grad_ts, (w.new_empty(len(ts)) if w_grad else None)


@torch.library.register_fake("fastdarts::bn_weighted_sum_backward_factors")
def _bn_weighted_sum_backward_factors_fake(grad, ts, w, mean, invstd, batch_statistics, written, w_grad):
    op = "bn_weighted_sum_backward_factors"
    _check_bn_weighted_sum_backward(op, grad, ts, w, mean, invstd, batch_statistics)
    check_one_per_item(op, "written", len(written), len(ts), "tensor", torch_check)
    grad_ts = [torch.empty_like(ts[0]) for row in written if row]
    factors = ts[0].new_empty(len(ts), 4, ts[0].shape[1])
    return grad_ts, factors, (w.new_empty(len(ts)) if w_grad else None)


register_bn_weighted_sum_autograd("fastdarts")
refuse_differentiation(
    "fastdarts::bn_weighted_sum_backward_factors",
    "fastdarts::bn_weighted_sum_backward_factors is not differentiable: it is a step of the mixed ops' backward",
)


def rnn_mixed_node(states: Tensor, ch: Tensor, p: Tensor) -> Tensor:
    """DARTS's recurrent mixed op for one node by the C++ kernel (CPU, float32/float64)."""
    return torch.ops.fastdarts.rnn_mixed_node.default(states, ch, p)


@torch.library.register_fake("fastdarts::rnn_mixed_node")
def _rnn_mixed_node_fake(states, ch, p):
    check_rnn_mixed_node_arguments("rnn_mixed_node", states, ch, p, torch_check)
    check_supported_dtype("rnn_mixed_node", states)
    return states.new_empty(states.shape[1:])


@torch.library.register_fake("fastdarts::rnn_mixed_node_backward")
def _rnn_mixed_node_backward_fake(grad, states, ch, p):
    check_rnn_mixed_node_arguments("rnn_mixed_node_backward", states, ch, p, torch_check)
    check_supported_dtype("rnn_mixed_node_backward", states)
    check_like("rnn_mixed_node_backward", "grad", grad, "states[0]", states[0], torch_check)
    return torch.empty_like(states), torch.empty_like(ch), torch.empty_like(p)


register_rnn_mixed_node_autograd("fastdarts")
