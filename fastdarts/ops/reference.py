"""Pure-PyTorch reference of every fastdarts op: the specification that the kernels are tested
against, the fallback when a kernel cannot run, and the eager baseline of the benchmarks.

The argument checks belong to the specification: the C++ kernels (csrc/include/fastdarts/checks.h)
and the fakes (_cpp.py) reject the same inputs with the same messages and exception types,
ValueError for shapes, lengths and devices and TypeError for dtypes. Each check goes through
`require(condition, error_type, message)`: a plain `raise` here, which torch.compile traces (a
torch._check whose message closes over tensors would break the graph); the fakes pass
torch._check_value/_check_type instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Require = Callable[[bool, type[Exception], Callable[[], str]], None]


def raise_unless(condition: bool, error: type[Exception], message: Callable[[], str]) -> None:
    if not condition:
        raise error(message())


def check_dtype_and_device(op: str, name: str, t: Tensor, like_name: str, like: Tensor, require: Require) -> None:
    require(
        t.dtype == like.dtype,
        TypeError,
        lambda: f"{op}: {name} must have the dtype of {like_name} ({like.dtype}), got {t.dtype}",
    )
    require(
        t.device == like.device,
        ValueError,
        lambda: f"{op}: {name} must be on the device of {like_name} ({like.device}), got {t.device}",
    )


def check_like(op: str, name: str, t: Tensor, like_name: str, like: Tensor, require: Require = raise_unless) -> None:
    """`t` has the shape, dtype and device of `like`."""
    require(
        t.shape == like.shape,
        ValueError,
        lambda: f"{op}: {name} must have the shape of {like_name} {list(like.shape)}, got {list(t.shape)}",
    )
    check_dtype_and_device(op, name, t, like_name, like, require)


def check_same_tensors(op: str, name: str, tensors: Sequence[Tensor], require: Require = raise_unless) -> None:
    """A non-empty list whose tensors all share the shape, dtype and device of the first."""
    require(len(tensors) > 0, ValueError, lambda: f"{op}: {name} must be a non-empty list of tensors")
    for k in range(1, len(tensors)):
        check_like(op, f"{name}[{k}]", tensors[k], f"{name}[0]", tensors[0], require)


def check_weights(op: str, name: str, w: Tensor, K: int, like: Tensor, require: Require = raise_unless) -> None:
    """One weight per tensor of a K-long list: shape [K], with the dtype and device of `like`."""
    require(
        w.dim() == 1 and w.shape[0] == K,
        ValueError,
        lambda: f"{op}: {name} must have shape [K] with K = {K} (one weight per tensor), got shape {list(w.shape)}",
    )
    check_dtype_and_device(op, name, w, "the tensors", like, require)


def check_channel_rows(op: str, name: str, t: Tensor, K: int, like: Tensor, require: Require = raise_unless) -> None:
    """Per-channel values (a BN's mean, say) for each of K batches of images like `like`: shape [K, C], with the
    dtype and device of `like`."""
    C = like.shape[1]
    require(
        t.dim() == 2 and t.shape[0] == K and t.shape[1] == C,
        ValueError,
        lambda: f"{op}: {name} must have shape [K, C] = [{K}, {C}] (one row per tensor), got shape {list(t.shape)}",
    )
    check_dtype_and_device(op, name, t, "the tensors", like, require)


def check_images(op: str, name: str, x: Tensor, require: Require = raise_unless) -> None:
    """A batch of images: a 4-D [N, C, H, W] tensor with C, H and W at least 1 (N may be 0)."""
    require(
        x.dim() == 4 and x.shape[1] >= 1 and x.shape[2] >= 1 and x.shape[3] >= 1,
        ValueError,
        lambda: f"{op}: {name} must be a 4-D [N, C, H, W] tensor with C, H, W >= 1, got shape {list(x.shape)}",
    )


def check_depthwise_weights(
    op: str, name: str, weights: Sequence[Tensor], like_name: str, like: Tensor, require: Require = raise_unless
) -> None:
    """A non-empty list of depthwise kernels for the C channels of `like`: each [C, 1, k, k] with k odd
    (so that "same" padding d*(k-1)/2 exists), with the dtype and device of `like`."""
    require(len(weights) > 0, ValueError, lambda: f"{op}: {name} must be a non-empty list of tensors")
    C = like.shape[1]
    for i, w in enumerate(weights):
        ok = w.dim() == 4 and w.shape[0] == C and w.shape[1] == 1 and w.shape[2] == w.shape[3] and w.shape[2] % 2 == 1
        require(
            ok,
            ValueError,
            lambda i=i, w=w: (
                f"{op}: {name}[{i}] must have shape [C, 1, k, k] with C = {C} and k odd, got shape {list(w.shape)}"
            ),
        )
        check_dtype_and_device(op, f"{name}[{i}]", w, like_name, like, require)


def check_one_per_item(op: str, name: str, count: int, K: int, per: str, require: Require = raise_unless) -> None:
    """A list argument with one entry per item of a K-long list (a flag per tensor, say)."""
    require(count == K, ValueError, lambda: f"{op}: {name} must have one entry per {per} (K = {K}), got {count}")


def check_positive_per_item(
    op: str, name: str, values: Sequence[int], K: int, per: str, require: Require = raise_unless
) -> None:
    """One positive integer per item of a K-long list (a dilation per kernel, say)."""
    check_one_per_item(op, name, len(values), K, per, require)
    for v in values:
        require(v >= 1, ValueError, lambda: f"{op}: {name} must be positive, got {list(values)}")


def check_flag(op: str, name: str, value: object) -> None:
    """A True/False argument, checked before anything dispatches it: a fused op's schema would turn None into False
    silently, and reject other values with a message of several lines."""
    if not isinstance(value, bool):
        raise ValueError(f"{op}: {name} must be True or False, got {value!r}")


def check_conv_settings(op: str, dilations: object, stride: object, relu: object) -> None:
    """The plain arguments of relu_dwconv and relu_dwconv_pointwise, checked before anything dispatches them (for
    check_flag's reason): an int stride, a list of int dilations, a bool relu."""
    if isinstance(stride, bool) or not isinstance(stride, int):
        raise ValueError(f"{op}: stride must be an int, got {stride!r}")
    if not isinstance(dilations, (list, tuple)) or any(
        isinstance(d, bool) or not isinstance(d, int) for d in dilations
    ):
        raise ValueError(f"{op}: dilations must be a list of ints, got {dilations!r}")
    check_flag(op, "relu", relu)


def check_positive(op: str, name: str, value: int, require: Require = raise_unless) -> None:
    require(value >= 1, ValueError, lambda: f"{op}: {name} must be positive, got {value}")


def check_sized_list(
    op: str,
    name: str,
    tensors: Sequence[Tensor],
    K: int,
    per: str,
    shape: Sequence[int],
    like_name: str,
    like: Tensor,
    require: Require = raise_unless,
) -> None:
    """A list of K tensors, each of shape `shape` with the dtype and device of `like`."""
    require(
        len(tensors) == K,
        ValueError,
        lambda: f"{op}: {name} must have one tensor per {per} (K = {K}), got {len(tensors)}",
    )
    for i, t in enumerate(tensors):
        require(
            list(t.shape) == list(shape),
            ValueError,
            lambda i=i, t=t: f"{op}: {name}[{i}] must have shape {list(shape)}, got {list(t.shape)}",
        )
        check_dtype_and_device(op, f"{name}[{i}]", t, like_name, like, require)


def weighted_sum(xs: Sequence[Tensor], w: Tensor) -> Tensor:
    """`out = sum_k w[k] * xs[k]`, the DARTS mixed-op sum of K same-shaped tensors.

    xs: K >= 1 tensors of one shape, dtype and device; w: shape [K], same dtype and device.
    Gradients: `dL/dxs[k] = w[k] * dL/dout` and `dL/dw[k] = sum(dL/dout * xs[k])`.
    """
    check_same_tensors("weighted_sum", "xs", xs)
    check_weights("weighted_sum", "w", w, len(xs), xs[0])
    weights = w.unbind(0)
    out = xs[0] * weights[0]
    for x, wk in zip(xs[1:], weights[1:]):
        out = out + x * wk
    return out


def check_bn_weighted_sum_arguments(
    op: str, ts: Sequence[Tensor], w: Tensor, mean: Tensor, invstd: Tensor, require: Require = raise_unless
) -> None:
    """The arguments of bn_weighted_sum (and of its backward), checked in the order of the C++ kernel."""
    check_same_tensors(op, "ts", ts, require)
    check_images(op, "ts", ts[0], require)
    check_weights(op, "w", w, len(ts), ts[0], require)
    check_channel_rows(op, "mean", mean, len(ts), ts[0], require)
    check_channel_rows(op, "invstd", invstd, len(ts), ts[0], require)


def bn_weighted_sum(ts: Sequence[Tensor], w: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    """`out = sum_k w[k] * (ts[k] - mean[k, c]) * invstd[k, c]`: the end of a DARTS mixed op, the weighted sum of
    K affine-free batch norms (per channel c), each with the statistics given.

    ts: K >= 1 tensors [N, C, H, W] of one shape, dtype and device; w: [K]; mean, invstd: [K, C], the same dtype
    and device. A row with mean 0 and invstd 1 adds its tensor un-normalised (the skip connection).
    Gradients, mean and invstd taken as inputs in their own right (when they are the batch statistics of ts[k]
    computed in the graph, autograd adds the path through them): with xhat_k = (ts[k] - mean[k]) * invstd[k],
    `dL/dts[k] = w[k] invstd[k] g`, `dL/dw[k] = sum(g xhat_k)`, `dL/dmean[k, c] = -w[k] invstd[k, c] sum_c(g)`,
    `dL/dinvstd[k, c] = w[k] sum_c(g (ts[k] - mean[k]))`, with g = dL/dout and sum_c the sum over (n, h, w).
    """
    check_bn_weighted_sum_arguments("bn_weighted_sum", ts, w, mean, invstd)
    C = ts[0].shape[1]
    out = None
    for t, wk, m, s in zip(ts, w.unbind(0), mean.unbind(0), invstd.unbind(0)):
        term = (t - m.view(1, C, 1, 1)) * s.view(1, C, 1, 1) * wk
        out = term if out is None else out + term
    return out


# ----------------------------------------------------------------------------------------------
# Gate sampling: PR-DARTS's hard-concrete gates and the top-k selection (METHOD.md 2.1-2.2).
# `gates_from_noise` is the deterministic part, which a kernel must reproduce exactly given the
# same noise; `draw_gate_noise` is the only place that consumes random numbers.


def check_gate_settings(
    op: str, tau: float, a: float, b: float, k: int | None, num_ops: int, require: Require = raise_unless
) -> None:
    """The scalar settings of a gate sample, for gates over `num_ops` ops per edge."""
    require(math.isfinite(tau) and tau > 0, ValueError, lambda: f"{op}: tau must be a finite number > 0, got {tau!r}")
    # a < 0 < 1 < b: the stretched sigmoid overshoots both ends, so g has point masses at 0 and 1.
    require(math.isfinite(a) and a < 0, ValueError, lambda: f"{op}: a must be a finite number < 0, got {a!r}")
    require(math.isfinite(b) and b > 1, ValueError, lambda: f"{op}: b must be a finite number > 1, got {b!r}")
    require(
        k is None or (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= num_ops),
        ValueError,
        lambda: f"{op}: k must be None or an integer in 1..{num_ops} (the ops per edge), got {k!r}",
    )


def check_explore_p(op: str, explore_p: float, require: Require = raise_unless) -> None:
    require(0 <= explore_p <= 1, ValueError, lambda: f"{op}: explore_p must lie in [0, 1], got {explore_p!r}")


def check_beta(op: str, beta: Tensor, require: Require = raise_unless) -> None:
    require(
        beta.dim() == 2 and beta.shape[1] > 0,
        ValueError,
        lambda: f"{op}: beta must have shape [num_edges, num_ops] with num_ops >= 1, got shape {list(beta.shape)}",
    )
    require(beta.is_floating_point(), TypeError, lambda: f"{op}: beta must be floating point, got {beta.dtype}")


def check_gate_noise(
    op: str, beta: Tensor, k: int | None, u: Tensor, explore: Tensor | None, perm: Tensor | None,
    require: Require = raise_unless,
) -> None:  # fmt: skip
    check_like(op, "u", u, "beta", beta, require)
    if k is None:
        return
    require(explore is not None and perm is not None, ValueError, lambda: f"{op}: top-k needs explore and perm")
    require(
        explore.shape == beta.shape and explore.dtype == torch.bool,
        ValueError,
        lambda: (
            f"{op}: explore must be a bool tensor of the shape of beta {list(beta.shape)}, "
            f"got {explore.dtype} of shape {list(explore.shape)}"
        ),
    )
    require(
        perm.shape == (beta.shape[1],) and perm.dtype == torch.int64,
        ValueError,
        lambda: (
            f"{op}: perm must be an int64 permutation of the {beta.shape[1]} op columns, "
            f"got {perm.dtype} of shape {list(perm.shape)}"
        ),
    )
    for name, t in (("explore", explore), ("perm", perm)):
        require(
            t.device == beta.device,
            ValueError,
            lambda name=name, t=t: f"{op}: {name} must be on the device of beta ({beta.device}), got {t.device}",
        )


def gate_p_nonzero(beta: Tensor, tau: float, a: float, b: float) -> Tensor:
    """`P(g != 0) = sigmoid(beta - tau * log(-a / b))`, the closed form the regularisers use."""
    return torch.sigmoid(beta - tau * math.log(-a / b))


def hard_concrete(beta: Tensor, tau: float, a: float, b: float, u: Tensor) -> Tensor:
    """`g = clamp(sigmoid((beta + logit(u)) / tau) * (b - a) + a, 0, 1)`; zero gradient where clamped."""
    s = torch.sigmoid((beta + torch.log(u) - torch.log1p(-u)) / tau)
    return torch.clamp(s * (b - a) + a, 0.0, 1.0)


def top_k_mask(scores: Tensor, k: int, perm: Tensor) -> Tensor:
    """1 on the k highest scores of each row, 0 elsewhere.

    Among equal scores the column that comes earlier in `perm` wins (one permutation for every
    row): the columns are put in `perm` order and sorted stably.
    """
    order = torch.sort(scores[:, perm], dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(scores).scatter_(1, perm[order], 1.0)


def gates_from_noise(
    beta: Tensor, tau: float, a: float, b: float, k: int | None,
    u: Tensor, explore: Tensor | None, perm: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The deterministic part of `sample_gates`, given its random inputs.

    u: uniforms in [0, 1), the shape of beta. explore: bool, the shape of beta, True where the
    gate gets 1 subtracted before the top-k. perm: a permutation of the op columns that breaks
    ties (see `top_k_mask`). `explore` and `perm` are unused when `k` is None.
    Returns `(gates, mask, p_nonzero)` as documented in `fastdarts.ops.sample_gates`.
    """
    check_beta("sample_gates", beta)
    check_gate_settings("sample_gates", tau, a, b, k, beta.shape[1])
    check_gate_noise("sample_gates", beta, k, u, explore, perm)
    g = hard_concrete(beta, tau, a, b, u)
    p_nonzero = gate_p_nonzero(beta, tau, a, b)
    if k is None:
        return g, torch.ones_like(g), p_nonzero
    mask = top_k_mask(g.detach() - explore.to(g.dtype), k, perm)
    # The straight-through 1 - g.detach() + g, grouped so that the forward value is exactly 1.
    gates = mask * ((g - g.detach()) + 1.0)
    return gates, mask, p_nonzero


def draw_gate_noise(
    beta: Tensor, k: int | None, explore_p: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The random inputs of one gate sample, in this order: u, then (top-k only) explore, perm.

    Drawn on the generator's device (the default generator of beta's device when None) and
    moved to beta's device, so one seed gives the same sample wherever beta lives.
    """
    device = beta.device if generator is None else generator.device
    u = torch.rand(beta.shape, generator=generator, dtype=beta.dtype, device=device)
    if k is None:
        return u.to(beta.device), None, None
    explore = torch.rand(beta.shape, generator=generator, dtype=beta.dtype, device=device) < explore_p
    perm = torch.randperm(beta.shape[1], generator=generator, device=device)
    return u.to(beta.device), explore.to(beta.device), perm.to(beta.device)


def sample_gates(
    beta: Tensor, tau: float, a: float = -0.1, b: float = 1.1, k: int | None = 2, explore_p: float = 0.4,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """One sample of every gate of `beta` [num_edges, num_ops]; see `fastdarts.ops.sample_gates`."""
    check_beta("sample_gates", beta)
    check_gate_settings("sample_gates", tau, a, b, k, beta.shape[1])
    check_explore_p("sample_gates", explore_p)
    u, explore, perm = draw_gate_noise(beta, k, explore_p, generator)
    return gates_from_noise(beta, tau, a, b, k, u, explore, perm)


def check_relu_dwconv_arguments(
    op: str,
    x: Tensor,
    weights: Sequence[Tensor],
    dilations: Sequence[int],
    stride: int,
    require: Require = raise_unless,
) -> None:
    """The arguments of relu_dwconv (and of its backward), checked in the order of the C++ kernel."""
    check_images(op, "x", x, require)
    check_depthwise_weights(op, "weights", weights, "x", x, require)
    check_positive_per_item(op, "dilations", dilations, len(weights), "weight", require)
    check_positive(op, "stride", stride, require)


def relu_dwconv_output_shape(x: Tensor, stride: int) -> list[int]:
    """[N, C, H_out, W_out]: with "same" padding every kernel gives floor((H - 1) / stride) + 1."""
    N, C, H, W = x.shape
    return [N, C, (H - 1) // stride + 1, (W - 1) // stride + 1]


def relu_dwconv(
    x: Tensor, weights: Sequence[Tensor], dilations: Sequence[int], stride: int, relu: bool = True
) -> list[Tensor]:
    """`out[i] = depthwise_conv(relu(x), weights[i], dilation=dilations[i], stride, padding="same")` for each i.

    The first stage of DARTS's separable and dilated convolutions, K kernels from one input:
        out[i][n, c, ho, wo] = sum_{a, b < k_i} weights[i][c, 0, a, b] * r[n, c, ho*s - p_i + d_i*a, wo*s - p_i + d_i*b]
    with r = relu(x) (x itself when relu is False, and 0 outside the image), d_i = dilations[i],
    p_i = d_i * (k_i - 1) // 2 and s = stride.
    x: [N, C, H, W]; weights[i]: [C, 1, k_i, k_i] with k_i odd; out[i]: [N, C, (H-1)//s + 1, (W-1)//s + 1].
    Gradients: dL/dx = [x > 0] * sum_i conv_transpose(dL/dout[i], weights[i]) (without the mask when relu is
    False); dL/dweights[i][c, 0, a, b] = sum over n, ho, wo of dL/dout[i] times the r value that tap (a, b) read.
    """
    check_conv_settings("relu_dwconv", dilations, stride, relu)
    check_relu_dwconv_arguments("relu_dwconv", x, weights, dilations, stride)
    r = x.relu() if relu else x
    groups = x.shape[1]
    return [
        F.conv2d(r, w, stride=stride, padding=d * (w.shape[-1] - 1) // 2, dilation=d, groups=groups)
        for w, d in zip(weights, dilations)
    ]


def normalised(x: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    """(x - mean) invstd per channel, for mean and invstd [1, C]."""
    C = x.shape[1]
    return (x - mean.reshape(1, C, 1, 1)) * invstd.reshape(1, C, 1, 1)


def formed_grads(grads: Sequence[Tensor], grad_inputs: Sequence[Tensor], grad_factors: Tensor) -> list[Tensor]:
    """The output gradients that relu_dwconv_pointwise_backward forms from grads, grad_inputs and grad_factors
    [K, 4, C] (a, b, mean and e per channel): a grads[i] + b (grad_inputs[i] - mean) + e, a BN's backward."""
    C = grad_factors.shape[2]
    formed = []
    for g, t, factors in zip(grads, grad_inputs, grad_factors):
        a, b, mean, e = (f.reshape(1, C, 1, 1) for f in factors)
        formed.append(a * g + b * (t - mean) + e)
    return formed


def check_formed_grads(
    op: str, K: int, per: str, sizes: Sequence[int], x: Tensor, grad_inputs: Sequence[Tensor] | None,
    grad_factors: Tensor | None, require: Require = raise_unless,
) -> None:  # fmt: skip
    """A backward's grad_inputs (K of shape `sizes`, one per `per`) and grad_factors [K, 4, sizes[1]] (see
    formed_grads), checked as the C++ kernels check them."""
    require(
        (grad_inputs is None) == (grad_factors is None),
        ValueError,
        lambda: (
            f"{op}: grad_inputs and grad_factors must be given together, got only "
            f"{'grad_inputs' if grad_factors is None else 'grad_factors'}"
        ),
    )
    if grad_inputs is None:
        return
    check_sized_list(op, "grad_inputs", grad_inputs, K, per, sizes, "x", x, require)
    shape = [K, 4, sizes[1]]
    require(
        list(grad_factors.shape) == shape,
        ValueError,
        lambda: (
            f"{op}: grad_factors must have shape {shape} (a, b, mean and e per channel of each of the {K} grads), "
            f"got {list(grad_factors.shape)}"
        ),
    )
    check_dtype_and_device(op, "grad_factors", grad_factors, "x", x, require)


def check_relu_dwconv_pointwise_arguments(
    op: str,
    x: Tensor,
    weights: Sequence[Tensor],
    pointwise_weights: Sequence[Tensor],
    dilations: Sequence[int],
    stride: int,
    require: Require = raise_unless,
    input_mean: Tensor | None = None,
    input_invstd: Tensor | None = None,
) -> None:
    """The arguments of relu_dwconv_pointwise (and of its backward), checked in the order of the C++ kernel."""
    check_images(op, "x", x, require)
    check_depthwise_weights(op, "weights", weights, "x", x, require)
    C = x.shape[1]
    check_sized_list(op, "pointwise_weights", pointwise_weights, len(weights), "weight", [C, C, 1, 1], "x", x, require)
    check_positive_per_item(op, "dilations", dilations, len(weights), "weight", require)
    check_positive(op, "stride", stride, require)
    require(
        (input_mean is None) == (input_invstd is None),
        ValueError,
        lambda: (
            f"{op}: input_mean and input_invstd must be given together, got only "
            f"{'input_mean' if input_invstd is None else 'input_invstd'}"
        ),
    )
    if input_mean is not None:
        check_channel_rows(op, "input_mean", input_mean, 1, x, require)
        check_channel_rows(op, "input_invstd", input_invstd, 1, x, require)


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
    """`out[i] = conv2d(relu_dwconv(x, weights, dilations, stride, relu)[i], pointwise_weights[i])`, and the batch
    statistics of each out[i]: a DARTS sep or dil conv up to its BN (the whole dil conv's, a sep conv's first or
    second half), K of them from one input.

    pointwise_weights[i]: [C, C, 1, 1]. Returns (out, mean, var): out[i] like relu_dwconv's; mean and var [K, C],
    the per-channel mean and biased variance of out[i] over (N, H_out, W_out), without gradient (the statistics a
    following BN normalises with; its backward accounts for them). With input_mean and input_invstd ([1, C] each)
    the convs read (x - input_mean) input_invstd in place of x: a sep conv's second half after its middle BN.
    """
    check_conv_settings("relu_dwconv_pointwise", dilations, stride, relu)
    check_relu_dwconv_pointwise_arguments("relu_dwconv_pointwise", x, weights, pointwise_weights, dilations, stride,
                                          raise_unless, input_mean, input_invstd)  # fmt: skip
    if input_mean is not None:
        x = normalised(x, input_mean, input_invstd)
    zs = relu_dwconv(x, weights, dilations, stride, relu)
    outs = [F.conv2d(z, p) for z, p in zip(zs, pointwise_weights)]
    moments = [torch.var_mean(t.detach(), dim=(0, 2, 3), correction=0) for t in outs]
    return outs, torch.stack([m for _, m in moments]), torch.stack([v for v, _ in moments])


# ----------------------------------------------------------------------------------------------
# The DARTS mixed op (METHOD.md 1.1): one edge of the search cell, `sum_k w[k] * o_k(x)` over the
# candidates below (`none` contributes zeros and is never computed). Every BN is affine-free and,
# in training, normalises with the batch statistics, which the op returns so that the caller can
# update its running averages; in evaluation it normalises with the running statistics given.

MIXED_OP_CANDIDATES: tuple[str, ...] = (
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)


def mixed_op_layout(stride: int, pool_bn: bool = True) -> list[tuple[int, int]]:
    """Per candidate: (conv weights it takes, BNs it has). The op's `weights` and BN rows are these, in order.

    The conv weights, each without bias: skip at stride 2 (FactorizedReduce): two [C/2, C, 1, 1]; sep_conv_k:
    depthwise [C, 1, k, k], pointwise [C, C, 1, 1], depthwise, pointwise; dil_conv_k: depthwise, pointwise.
    The BNs: one after each pool (DARTS's search network; PR-DARTS's has none there: `pool_bn` False), after
    FactorizedReduce, after each pointwise conv.
    """
    skip = (0, 0) if stride == 1 else (2, 1)
    pool = (0, 1 if pool_bn else 0)
    return [pool, pool, skip, (4, 2), (4, 2), (2, 1), (2, 1)]


def mixed_op_weight_shapes(C: int, stride: int) -> list[list[int]]:
    """The shape of every conv weight of a mixed op on C channels, in the order of mixed_op_layout."""
    dw = {3: [C, 1, 3, 3], 5: [C, 1, 5, 5]}
    pw = [C, C, 1, 1]
    skip = [] if stride == 1 else [[C // 2, C, 1, 1]] * 2
    return [*skip, dw[3], pw, dw[3], pw, dw[5], pw, dw[5], pw, dw[3], pw, dw[5], pw]


def mixed_op_output_shape(x: Tensor, stride: int) -> list[int]:
    """Every candidate pads to keep the size at stride 1 and halves it (rounding up) at stride 2."""
    return relu_dwconv_output_shape(x, stride)


def candidates_valid(candidates: Sequence[int]) -> bool:
    """Whether an edge's candidates are increasing indices of MIXED_OP_CANDIDATES."""
    K = len(MIXED_OP_CANDIDATES)
    return all(0 <= c < K for c in candidates) and all(a < b for a, b in zip(candidates, candidates[1:]))


def check_mixed_op_arguments(
    op: str,
    x: Tensor,
    w: Tensor,
    weights: Sequence[Tensor],
    stride: int,
    candidates: Sequence[int],
    bn_mean: Tensor | None,
    bn_var: Tensor | None,
    training: bool,
    pool_bn: bool = True,
    require: Require = raise_unless,
) -> None:
    check_images(op, "x", x, require)
    require(stride in (1, 2), ValueError, lambda: f"{op}: stride must be 1 or 2, got {stride}")
    C = x.shape[1]
    require(
        stride == 1 or C % 2 == 0,
        ValueError,
        lambda: f"{op}: a stride-2 edge needs an even channel count (FactorizedReduce), got C = {C}",
    )
    K = len(MIXED_OP_CANDIDATES)
    require(
        w.dim() == 1 and w.shape[0] == K,
        ValueError,
        lambda: f"{op}: w must have shape [K] with K = {K} (one weight per candidate), got shape {list(w.shape)}",
    )
    check_dtype_and_device(op, "w", w, "x", x, require)
    shapes = mixed_op_weight_shapes(C, stride)
    require(
        len(weights) == len(shapes),
        ValueError,
        lambda: f"{op}: weights must hold the {len(shapes)} conv weights of a stride-{stride} edge, got {len(weights)}",
    )
    for i, (t, shape) in enumerate(zip(weights, shapes)):
        require(
            list(t.shape) == shape,
            ValueError,
            lambda i=i, t=t, shape=shape: f"{op}: weights[{i}] must have shape {shape}, got {list(t.shape)}",
        )
        check_dtype_and_device(op, f"weights[{i}]", t, "x", x, require)
    require(
        candidates_valid(candidates),
        ValueError,
        lambda: f"{op}: candidates must be increasing indices in 0..{K - 1}, got {list(candidates)}",
    )
    if not training:
        B = sum(bns for _, bns in mixed_op_layout(stride, pool_bn))
        for name, stats in (("bn_mean", bn_mean), ("bn_var", bn_var)):
            require(
                stats is not None and list(stats.shape) == [B, C],
                ValueError,
                lambda name=name, stats=stats: (
                    f"{op}: in evaluation {name} must be the running statistics [{B}, {C}] of the edge's BNs, "
                    f"got {None if stats is None else list(stats.shape)}"
                ),
            )
            check_dtype_and_device(op, name, stats, "x", x, require)


def _is_channels_last(t: Tensor) -> bool:
    """Laid out channels_last, and not also contiguous (as a tensor with one channel or 1x1 pixels is)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def factorized_reduce_halves(r: Tensor) -> Tensor:
    """[N, 2C, Ho, Wo]: r at the even pixels (what FactorizedReduce's first stride-2 1x1 conv reads) and at the odd
    ones (what its second reads, of r shifted by one pixel), the odd half zero-padded at the end when a side is odd."""
    return _FactorizedReduceHalves.apply(r)


def _halves(r: Tensor) -> Tensor:
    even = r[:, :, ::2, ::2]
    odd = r[:, :, 1::2, 1::2]
    odd = F.pad(odd, (0, even.shape[-1] - odd.shape[-1], 0, even.shape[-2] - odd.shape[-2]))
    return torch.cat([even, odd], dim=1)


class _FactorizedReduceHalves(torch.autograd.Function):
    """factorized_reduce_halves with a gradient laid out like r. Autograd's own backward of the strided slices
    writes into a zero tensor in the contiguous format whatever r's layout, and a channels_last network then pays
    ReLU backwards and sums that mix the two layouts (ten times slower than either alone)."""

    @staticmethod
    def forward(r: Tensor) -> Tensor:
        return _halves(r)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        (r,) = inputs
        ctx.r_shape = r.shape
        ctx.r_format = torch.channels_last if _is_channels_last(r) else torch.contiguous_format

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return factorized_reduce_halves_backward(grad, ctx.r_shape, ctx.r_format)


def factorized_reduce_halves_backward(grad: Tensor, r_shape: torch.Size, r_format: torch.memory_format) -> Tensor:
    """dL/dr of factorized_reduce_halves(r) for dL/dhalves = grad, in r's layout `r_format`."""
    _, C, H, W = r_shape
    grad_r = torch.empty(r_shape, dtype=grad.dtype, device=grad.device, memory_format=r_format).zero_()
    grad_r[:, :, ::2, ::2] = grad[:, :C]
    grad_r[:, :, 1::2, 1::2] = grad[:, C:, : H // 2, : W // 2]
    return grad_r


def check_factorized_reduce_arguments(
    op: str, x: Tensor, conv_1: Tensor, conv_2: Tensor, require: Require = raise_unless
) -> None:
    """x an image batch; conv_1 a [h, C, 1, 1] weight, conv_2 one of the same shape."""
    check_images(op, "x", x, require)
    shape = check_pointwise_weight(op, "conv_1", conv_1, "C_out / 2", x, require)
    require(
        list(conv_2.shape) == shape,
        ValueError,
        lambda: f"{op}: conv_2 must have conv_1's shape {shape}, got {list(conv_2.shape)}",
    )
    check_dtype_and_device(op, "conv_2", conv_2, "x", x, require)


def check_pointwise_weight(op: str, name: str, weight: Tensor, rows: str, x: Tensor, require: Require) -> list[int]:
    """`weight` a 1x1 conv weight [rows, C, 1, 1] (rows >= 1) for the C channels of x, with x's dtype and device;
    returns its shape. `rows` names the output channels in the message ("C_out")."""
    shape = list(weight.shape)
    require(
        len(shape) == 4 and shape[0] >= 1 and shape[1:] == [x.shape[1], 1, 1],
        ValueError,
        lambda: f"{op}: {name} must have shape [{rows}, C, 1, 1] with C = {x.shape[1]}, got shape {shape}",
    )
    check_dtype_and_device(op, name, weight, "x", x, require)
    return shape


def factorized_reduce(x: Tensor, conv_1: Tensor, conv_2: Tensor, relu: bool = True) -> Tensor:
    """The skip candidate of a stride-2 edge before its BN: ReLU, two 1x1 stride-2 convs, on x and on x shifted by
    one pixel (padded back to x's size when a side is odd, so both halves align), concatenated. relu=False: x is
    already the ReLU's output.

    Computed as the subsampled halves times one block-diagonal matrix, never as a strided 1x1 convolution: oneDNN's
    AVX2 1x1 convolution backward-weights (jit_1x1:avx2) with stride 2 on a channels_last input of fewer than 8
    channels returns wrong, run-to-run different weight gradients or never returns (oneDNN issue 6035, open in
    PyTorch 2.13). A matrix product runs on the BLAS, in the forward and in autograd's backward alike."""
    check_factorized_reduce_arguments("factorized_reduce", x, conv_1, conv_2)
    halves = factorized_reduce_halves(x.relu() if relu else x)
    matrix = torch.block_diag(conv_1.flatten(1), conv_2.flatten(1))  # [C_out, 2 C_in]
    out = (halves.permute(0, 2, 3, 1) @ matrix.t()).permute(0, 3, 1, 2)  # a channels_last [N, C_out, Ho, Wo]
    return out.contiguous(memory_format=torch.channels_last if _is_channels_last(x) else torch.contiguous_format)


def check_pointwise_weights(op: str, name: str, weights: Sequence[Tensor], x: Tensor, require: Require) -> None:
    """A non-empty list of 1x1 weights for the C channels of x, all of the first's shape [C_out, C, 1, 1]."""
    require(len(weights) >= 1, ValueError, lambda: f"{op}: {name} must be a non-empty list of tensors")
    shape = list(weights[0].shape)
    require(
        len(shape) == 4 and shape[0] >= 1 and shape[1:] == [x.shape[1], 1, 1],
        ValueError,
        lambda: (
            f"{op}: {name}[0] must have shape [C_out, C, 1, 1] with C_out >= 1 and C = {x.shape[1]}, got shape {shape}"
        ),
    )
    check_sized_list(op, name, weights, len(weights), "output", shape, "x", x, require)


def check_factorized_reduce_bn_stats_arguments(
    op: str, xs: Sequence[Tensor], conv_1s: Sequence[Tensor], conv_2s: Sequence[Tensor],
    require: Require = raise_unless,
) -> None:  # fmt: skip
    """xs the channel parts of x (check_channel_parts); conv_1s a non-empty list of [h, C, 1, 1] weights for x's C
    channels, conv_2s as many of the same shape."""
    x = check_channel_parts(op, "xs", xs, require)
    check_pointwise_weights(op, "conv_1s", conv_1s, x, require)
    check_sized_list(op, "conv_2s", conv_2s, len(conv_1s), "output", list(conv_1s[0].shape), "x", x, require)


def check_channel_parts(op: str, name: str, parts: Sequence[Tensor], require: Require = raise_unless) -> Tensor:
    """`parts` the channel parts of an image batch x = torch.cat(parts, 1): a non-empty list of image batches of one
    N, H, W, dtype and device. Returns a stand-in of x's shape, dtype and device (an expanded scalar, not x) for the
    checks that compare other arguments with x."""
    require(len(parts) >= 1, ValueError, lambda: f"{op}: {name} must be a non-empty list of tensors")
    first = parts[0]
    for i, part in enumerate(parts):
        check_images(op, f"{name}[{i}]", part, require)
        require(
            part.shape[0] == first.shape[0] and part.shape[2:] == first.shape[2:],
            ValueError,
            lambda i=i, part=part: (
                f"{op}: {name}[{i}] must have the N, H, W of {name}[0] {list(first.shape)}, "
                f"got shape {list(part.shape)}"
            ),
        )
        check_dtype_and_device(op, f"{name}[{i}]", part, f"{name}[0]", first, require)
    channels = sum(part.shape[1] for part in parts)
    return first.new_empty(()).expand(first.shape[0], channels, *first.shape[2:])


def channel_parts(x: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """x as a list of its channel parts: [x] for a tensor, else the parts as given."""
    return [x] if isinstance(x, Tensor) else list(x)


def joined_channels(parts: Sequence[Tensor]) -> Tensor:
    """torch.cat(parts, 1), without a copy for a single part."""
    return parts[0] if len(parts) == 1 else torch.cat(list(parts), 1)


def check_relu_pointwise_bn_stats_arguments(
    op: str, xs: Sequence[Tensor], weights: Sequence[Tensor], require: Require = raise_unless
) -> None:
    """xs the channel parts of x (check_channel_parts); weights a non-empty list of [C_out, C, 1, 1] weights for
    x's C channels."""
    check_pointwise_weights(op, "weights", weights, check_channel_parts(op, "xs", xs, require), require)


def relu_pointwise_bn_stats(
    xs: Sequence[Tensor], weights: Sequence[Tensor], relu: bool = True
) -> tuple[list[Tensor], Tensor, Tensor]:
    """conv2d(relu(x), weights[e]) (x itself when relu is false) for every e, x = torch.cat(xs, 1), and the
    per-channel mean and biased variance of each output over (N, H, W) ([E, C_out] each, no gradient): a cell's
    preprocessing before its BN, xs the nodes of the cell before."""
    check_relu_pointwise_bn_stats_arguments("relu_pointwise_bn_stats", xs, weights)
    x = joined_channels(xs)
    r = x.relu() if relu else x
    outs = [F.conv2d(r, weight) for weight in weights]
    return outs, *_batch_statistics(outs)


def check_relu_conv_bn_arguments(
    op: str, x: Tensor, weight: Tensor, running_mean: Tensor | None, running_var: Tensor | None, training: bool,
    require: Require = raise_unless,
) -> None:  # fmt: skip
    check_images(op, "x", x, require)
    check_pointwise_weight(op, "weight", weight, "C_out", x, require)
    check_running_statistics(op, weight.shape[0], running_mean, running_var, training, x, require)


def check_running_statistics(
    op: str, C_out: int, running_mean: Tensor | None, running_var: Tensor | None, training: bool, x: Tensor,
    require: Require = raise_unless,
) -> None:  # fmt: skip
    """An affine-free BN's running statistics over C_out channels as F.batch_norm takes them: both or neither, and
    both in evaluation, each [C_out] with x's dtype and device."""
    require(
        (running_mean is None) == (running_var is None),
        ValueError,
        lambda: f"{op}: running_mean and running_var must be given together",
    )
    require(
        training or running_mean is not None,
        ValueError,
        lambda: f"{op}: in evaluation the running statistics are needed (or training=True for the batch's)",
    )
    for name, stats in (("running_mean", running_mean), ("running_var", running_var)):
        if stats is not None:
            require(
                list(stats.shape) == [C_out],
                ValueError,
                lambda name=name, stats=stats: f"{op}: {name} must have shape [{C_out}], got {list(stats.shape)}",
            )
            check_dtype_and_device(op, name, stats, "x", x, require)


def relu_conv_bn(
    x: Tensor, weight: Tensor, running_mean: Tensor | None, running_var: Tensor | None, training: bool,
    momentum: float, eps: float, relu: bool = True,
) -> Tensor:  # fmt: skip
    """ReLU (none when relu is false), a 1x1 conv without bias and an affine-free BN: a cell's preprocessing
    (space.ReLUConvBN with affine=False). The BN is F.batch_norm's: the batch's statistics in training (updating
    running_mean and running_var in place by `momentum` when they are given), else the running ones."""
    check_relu_conv_bn_arguments("relu_conv_bn", x, weight, running_mean, running_var, training)
    return _relu_conv_bn(x, weight, running_mean, running_var, training, momentum, eps, relu)


def _relu_conv_bn(x, weight, running_mean, running_var, training, momentum, eps, relu) -> Tensor:
    """relu_conv_bn on checked arguments."""
    r = x.relu() if relu else x
    return F.batch_norm(F.conv2d(r, weight), running_mean, running_var, None, None, training, momentum, eps)


def check_relu_conv_bns_arguments(
    op: str, x: Tensor | Sequence[Tensor], weights: Sequence[Tensor], batch_norms: Sequence[tuple],
    require: Require = raise_unless,
) -> None:  # fmt: skip
    """relu_conv_bns's: x a tensor or its channel parts (check_channel_parts); one BN (relu_conv_bn's running_mean,
    running_var, training, momentum, eps) per weight, each with relu_conv_bn's checks."""
    if not isinstance(x, Tensor):
        x = check_channel_parts(op, "x", x, require)
    require(
        len(weights) >= 1 and len(batch_norms) == len(weights),
        ValueError,
        lambda: (
            f"{op}: one BN per weight and at least one weight are needed, got {len(weights)} weights and "
            f"{len(batch_norms)} BNs"
        ),
    )
    for k, (weight, bn) in enumerate(zip(weights, batch_norms)):
        require(
            len(bn) == 5,
            ValueError,
            lambda k=k: f"{op}: batch_norms[{k}] must be (running_mean, running_var, training, momentum, eps)",
        )
        check_relu_conv_bn_arguments(f"{op} (weight {k})", x, weight, bn[0], bn[1], bn[2], require)


def relu_conv_bns(
    x: Tensor | Sequence[Tensor], weights: Sequence[Tensor], batch_norms: Sequence[tuple], relu: bool = True
) -> list[Tensor]:  # fmt: skip
    """relu_conv_bn of one x for each weight, with its own BN (`batch_norms`: per weight, relu_conv_bn's
    running_mean, running_var, training, momentum and eps): the preprocessing of a state in every cell that reads
    it. x may be given as its channel parts, x = torch.cat(x, 1) (a cell's output nodes)."""
    check_relu_conv_bns_arguments("relu_conv_bns", x, weights, batch_norms)
    x = joined_channels(channel_parts(x))
    return [_relu_conv_bn(x, weight, *bn, relu) for weight, bn in zip(weights, batch_norms)]


def check_factorized_reduce_bn_arguments(
    op: str, x: Tensor | Sequence[Tensor], conv_1: Tensor, conv_2: Tensor, running_mean: Tensor | None,
    running_var: Tensor | None, training: bool, require: Require = raise_unless,
) -> None:  # fmt: skip
    """factorized_reduce_bn's: x a tensor or its channel parts (check_channel_parts), factorized_reduce's weights, and
    relu_conv_bn's running statistics for the 2 conv_1.shape[0] output channels."""
    if not isinstance(x, Tensor):
        x = check_channel_parts(op, "x", x, require)
    check_factorized_reduce_arguments(op, x, conv_1, conv_2, require)
    check_running_statistics(op, 2 * conv_1.shape[0], running_mean, running_var, training, x, require)


def factorized_reduce_bn(
    x: Tensor | Sequence[Tensor], conv_1: Tensor, conv_2: Tensor, running_mean: Tensor | None,
    running_var: Tensor | None, training: bool, momentum: float, eps: float, relu: bool = True,
) -> Tensor:  # fmt: skip
    """factorized_reduce, then an affine-free BN with F.batch_norm's arguments and semantics (as relu_conv_bn's): the
    preprocessing of a cell after a reduction cell (space.FactorizedReduce with affine=False). x may be given as its
    channel parts, x = torch.cat(x, 1) (a cell's output nodes)."""
    check_factorized_reduce_bn_arguments("factorized_reduce_bn", x, conv_1, conv_2, running_mean, running_var, training)
    out = factorized_reduce(joined_channels(channel_parts(x)), conv_1, conv_2, relu)
    return F.batch_norm(out, running_mean, running_var, None, None, training, momentum, eps)


def _batch_statistics(outs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """[E, C] per-channel means and biased variances of the E outputs, without gradient."""
    with torch.no_grad():
        var_means = [torch.var_mean(out, dim=(0, 2, 3), unbiased=False) for out in outs]
    return torch.stack([mean for _, mean in var_means]), torch.stack([var for var, _ in var_means])


def factorized_reduce_output_shape(x: Tensor, conv_1: Tensor) -> list[int]:
    return [x.shape[0], 2 * conv_1.shape[0], (x.shape[2] + 1) // 2, (x.shape[3] + 1) // 2]


def factorized_reduce_bn_stats(
    xs: Sequence[Tensor], conv_1s: Sequence[Tensor], conv_2s: Sequence[Tensor], relu: bool = True
) -> tuple[list[Tensor], Tensor, Tensor]:
    """factorized_reduce(x, conv_1s[e], conv_2s[e], relu) for every e, x = torch.cat(xs, 1), and the per-channel
    mean and biased variance of each output over (N, H_out, W_out) ([E, C_out] each, no gradient): the stride-2
    skips of the edges leaving x before their BNs, or a cell's preprocessing of the nodes of a cell before a
    reduction."""
    check_factorized_reduce_bn_stats_arguments("factorized_reduce_bn_stats", xs, conv_1s, conv_2s)
    x = joined_channels(xs)
    outs = [factorized_reduce(x, conv_1, conv_2, relu) for conv_1, conv_2 in zip(conv_1s, conv_2s)]
    return outs, *_batch_statistics(outs)


def mixed_op(
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
    """One DARTS edge: `out = sum_{k in candidates} w[k] * o_k(x)`.

    Args:
        x: [N, C, H, W].
        w: [7], one weight per MIXED_OP_CANDIDATES entry (`none` excluded); those not in `candidates` are ignored.
        weights: the edge's conv weights, mixed_op_weight_shapes(C, stride), all of them whatever is computed.
        stride: 1, or 2 on a reduction edge.
        candidates: the indices into MIXED_OP_CANDIDATES to compute, increasing; empty gives zeros.
        bn_mean, bn_var: [B, C] running statistics of the edge's B BNs (rows in mixed_op_layout(stride, pool_bn)
            order), used in evaluation; ignored in training.
        training: normalise with batch statistics (True) or with bn_mean and bn_var.
        eps: the BNs' epsilon.
        pool_bn: an affine-free BN after each pool (DARTS's search network) or none (PR-DARTS's).
        recompute: the fused ops' memory choice; ignored here (autograd keeps what eager PyTorch keeps).

    Returns (out [N, C, H_out, W_out], mean [B, C], var [B, C]): in training the batch mean and biased
    variance each BN normalised with (rows of candidates not computed: 0 and 1); in evaluation copies of
    bn_mean and bn_var. Differentiable in x, w and every conv weight; mean and var are not.
    """
    check_mixed_op_arguments("mixed_op", x, w, weights, stride, candidates, bn_mean, bn_var, training, pool_bn)
    C = x.shape[1]
    layout = mixed_op_layout(stride, pool_bn)
    B = sum(bns for _, bns in layout)
    if training:
        mean, var = x.new_zeros(B, C), x.new_ones(B, C)
    else:
        mean, var = bn_mean.detach().clone(), bn_var.detach().clone()

    def bn(t: Tensor, row: int) -> Tensor:
        if not training:
            return F.batch_norm(t, bn_mean[row], bn_var[row], training=False, eps=eps)
        # With momentum 1 the "running" buffers receive the batch mean and unbiased variance: nn.BatchNorm2d's own
        # single ATen call, so this reference costs what DARTS's modules cost.
        batch_mean, batch_var = t.new_zeros(C), t.new_ones(C)
        y = F.batch_norm(t, batch_mean, batch_var, training=True, momentum=1.0, eps=eps)
        n = t.numel() // C
        mean[row], var[row] = batch_mean, batch_var * ((n - 1) / n)
        return y

    def conv(t: Tensor, dw: Tensor, pw: Tensor, stride: int, dilation: int) -> Tensor:
        padding = dilation * (dw.shape[-1] - 1) // 2
        t = F.conv2d(t.relu(), dw, stride=stride, padding=padding, dilation=dilation, groups=C)
        return F.conv2d(t, pw)

    outputs = []
    weight_at, row_at = 0, 0
    for k, (num_weights, num_bns) in enumerate(layout):
        ws, row = weights[weight_at : weight_at + num_weights], row_at
        weight_at, row_at = weight_at + num_weights, row_at + num_bns
        if k not in candidates:
            continue
        name = MIXED_OP_CANDIDATES[k]
        if name == "max_pool_3x3":
            y = F.max_pool2d(x, 3, stride, 1)
            y = bn(y, row) if pool_bn else y
        elif name == "avg_pool_3x3":
            y = F.avg_pool2d(x, 3, stride, 1, count_include_pad=False)
            y = bn(y, row) if pool_bn else y
        elif name == "skip_connect":
            y = x if stride == 1 else bn(factorized_reduce(x, *ws), row)
        elif name.startswith("sep_conv"):
            u = bn(conv(x, ws[0], ws[1], stride, 1), row)
            y = bn(conv(u, ws[2], ws[3], 1, 1), row + 1)
        else:  # dil_conv
            y = bn(conv(x, ws[0], ws[1], stride, 2), row)
        outputs.append(y)
    if not outputs:
        return x.new_zeros(mixed_op_output_shape(x, stride)), mean, var
    return weighted_sum(outputs, w[list(candidates)]), mean, var


# ----------------------------------------------------------------------------------------------
# DARTS's two pool candidates (max_pool_3x3, avg_pool_3x3) with the batch statistics of the
# affine-free BNs that follow them, which the kernels compute from one read of x.


def check_mixed_ops_edges(op: str, w: Tensor, weights: Sequence, candidates: Sequence) -> None:
    """mixed_ops's per-edge arguments: w [E, K] with E >= 1, and E lists of weights and of candidates."""
    raise_unless(
        w.dim() == 2 and w.shape[0] >= 1, ValueError, lambda: f"{op}: w must have shape [E, K], got {list(w.shape)}"
    )
    E = w.shape[0]
    raise_unless(
        len(weights) == E and len(candidates) == E,
        ValueError,
        lambda: (
            f"{op}: {E} edges need {E} weight lists and {E} candidate lists, got {len(weights)} and {len(candidates)}"
        ),
    )


def check_partial_channels(op: str, x: Tensor, E: int, partial_channels: int, scale: Tensor | None,
                           require: Require = raise_unless) -> None:  # fmt: skip
    """mixed_ops's partial channels (an integer K >= 1 dividing C) and edge scale ([E] or None)."""
    C = x.shape[1] if x.dim() == 4 else 0
    require(
        not isinstance(partial_channels, bool) and isinstance(partial_channels, int) and partial_channels >= 1
        and C % partial_channels == 0,
        ValueError,
        lambda: f"{op}: partial_channels must be an integer >= 1 dividing the {C} channels, got {partial_channels!r}",
    )  # fmt: skip
    require(
        scale is None or (scale.dim() == 1 and scale.shape[0] == E),
        ValueError,
        lambda: f"{op}: scale must be None or have shape [{E}], got {list(scale.shape)}",
    )


def split_partial_channels(x: Tensor, partial_channels: int, stride: int) -> tuple[Tensor, Tensor]:
    """PC-DARTS's split of an edge's input: the first C/K channels (what the ops compute on) and the rest, through a
    2x2 max pool (stride 2, no padding) on a stride-2 edge (the bypass). The pool rounds an odd side up, as the ops'
    output does (PC-DARTS's searches have even sides only, where this is the same pool)."""
    C = x.shape[1] // partial_channels
    processed, bypass = x[:, :C], x[:, C:]
    if stride == 2:
        bypass = F.max_pool2d(bypass, 2, 2, ceil_mode=True)
    return processed, bypass


def partial_channel_edge(out: Tensor, bypass: Tensor, partial_channels: int) -> Tensor:
    """An edge's output from the ops' output [N, C/K, H, W] and the bypass [N, C - C/K, H, W]: their concatenation
    shuffled into K groups (channel c*K + g of the result is channel g*C/K + c of the concatenation)."""
    n, c, h, w = out.shape
    return (
        torch.cat([out, bypass], dim=1)
        .unflatten(1, (partial_channels, c))
        .transpose(1, 2)
        .reshape(n, partial_channels * c, h, w)
    )


def partial_channel_outputs(outs: Sequence[Tensor], x: Tensor, partial_channels: int, stride: int,
                            bypass_w: Tensor | None = None) -> list[Tensor]:  # fmt: skip
    """Each edge's full-width output from its ops' output outs[e] [N, C/K, H_out, W_out]: partial_channel_edge with
    x's bypass (split_partial_channels), times bypass_w[e] when given. The fused mixed ops write their partial
    channels' outputs so, with the edge scale folded into w for the ops' part and into bypass_w for the bypass."""
    _, bypass = split_partial_channels(x, partial_channels, stride)
    scaled = [bypass if bypass_w is None else bypass * bypass_w[e] for e in range(len(outs))]
    return [partial_channel_edge(out, b, partial_channels) for out, b in zip(outs, scaled)]


def partial_channel_node(outs: Sequence[Tensor], xs: Sequence[Tensor], partial_channels: int,
                         bypass_w: Tensor | None = None) -> Tensor:  # fmt: skip
    """A node of a partial-channel cell: the sum, in edge order, of the full-width outputs (partial_channel_outputs,
    stride 1) of the edges entering it, edge e's from its ops' output outs[e] and the bypass of its state xs[e], or
    of xs[e] that bypass alone (C - C/K channels: a stride-2 state's, pooled once for the nodes it feeds), times
    bypass_w[e] when given."""
    total = None
    for e, (out, x) in enumerate(zip(outs, xs, strict=True)):
        if x.shape[1] == out.shape[1] * partial_channels:
            _, x = split_partial_channels(x, partial_channels, 1)
        term = partial_channel_edge(out, x if bypass_w is None else x * bypass_w[e], partial_channels)
        total = term if total is None else total + term
    return total


def mixed_ops(
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
    """The mixed ops of the E = w.shape[0] edges leaving one state x: mixed_op per edge e with w[e], weights[e],
    candidates[e] and (in evaluation) bn_mean[e], bn_var[e]. Returns (outs, mean [E, B, C/K], var [E, B, C/K]).

    With partial_channels K > 1 (PC-DARTS) the ops compute on the first C/K channels of x and the other channels
    bypass them (split_partial_channels), the two parts shuffled into K groups (partial_channel_edge); `scale`
    [E] multiplies each edge's whole output (PC-DARTS's edge normalisation)."""
    check_mixed_ops_edges("mixed_ops", w, weights, candidates)
    E = w.shape[0]
    check_partial_channels("mixed_ops", x, E, partial_channels, scale)
    processed, bypass = x, None
    if partial_channels > 1:
        processed, bypass = split_partial_channels(x, partial_channels, stride)
    results = []
    for e in range(E):
        stats = [None if t is None else t[e] for t in (bn_mean, bn_var)]
        out, mean, var = mixed_op(
            processed, w[e], weights[e], stride, candidates[e], *stats, training, eps, pool_bn, recompute
        )  # fmt: skip
        if bypass is not None:
            out = partial_channel_edge(out, bypass, partial_channels)
        results.append((out if scale is None else out * scale[e], mean, var))
    outs, means, variances = zip(*results)
    return list(outs), torch.stack(means), torch.stack(variances)


# ----------------------------------------------------------------------------------------------
# A DARTS cell's edges: every node sums the mixed ops from the cell's two inputs and the nodes before it.


def cell_edge_count(steps: int) -> int:
    """The edges of a cell with `steps` intermediate nodes: 2 + 3 + ... + (steps + 1)."""
    return steps * (steps + 3) // 2


def edge_index(node: int, inp: int) -> int:
    """The row of edge `node <- inp` (0-based intermediate node, input index: 0 and 1 the cell's inputs, 2 + i node
    i) in node-major order."""
    return cell_edge_count(node) + inp


@dataclass(frozen=True)
class CellGroup:
    """The edges leaving one state of a cell that compute something, run as one mixed_ops group."""

    state: int  # 0, 1: the cell's inputs; 2 + i: node i
    nodes: tuple[int, ...]  # the node each edge goes to, ascending
    edges: tuple[int, ...]  # their edge indices
    stride: int
    rows: int  # the rows of statistics its edges take: len(edges) * B


def cell_groups(steps: int, stride: int, candidates: Sequence[Sequence[int]], pool_bn: bool) -> list[CellGroup]:
    """The groups of a cell in the order it runs them (input 0, input 1, then each node once it is complete), each
    state's edges with candidates (an edge with none adds nothing and is left out); the inputs' edges take `stride`,
    the nodes' 1."""
    groups = []
    for state in range(steps + 1):  # the last node feeds no edge
        nodes = tuple(node for node in range(max(0, state - 1), steps) if candidates[edge_index(node, state)])
        if nodes:
            s = stride if state < 2 else 1
            B = sum(bns for _, bns in mixed_op_layout(s, pool_bn))
            edges = tuple(edge_index(node, state) for node in nodes)
            groups.append(CellGroup(state, nodes, edges, s, len(edges) * B))
    return groups


def cell_statistics_rows(steps: int, stride: int, candidates: Sequence[Sequence[int]], pool_bn: bool) -> int:
    """R, the rows of mixed_cell's statistics [R, C]: its groups' [E, B, C] statistics one after the other."""
    return sum(group.rows for group in cell_groups(steps, stride, candidates, pool_bn))


def check_mixed_cell_arguments(op: str, s0: Tensor, s1: Tensor, w: Tensor, weights: Sequence, steps: int, stride: int,
                               candidates: Sequence, bn_mean: Tensor | None, bn_var: Tensor | None, training: bool,
                               pool_bn: bool, partial_channels: int = 1, scale: Tensor | None = None,
                               require: Require = raise_unless) -> None:  # fmt: skip
    """mixed_cell's structure: what each group's mixed_ops then checks in detail (shapes of weights, candidates)
    it cannot see whole."""
    require(
        not isinstance(steps, bool) and isinstance(steps, int) and steps >= 1,
        ValueError, lambda: f"{op}: steps must be an integer >= 1, got {steps!r}",
    )  # fmt: skip
    check_images(op, "s0", s0, require)
    require(s1.shape == s0.shape, ValueError,
            lambda: f"{op}: s0 and s1 must have the same shape, got {list(s0.shape)} and {list(s1.shape)}")  # fmt: skip
    check_like(op, "s1", s1, "s0", s0, require)
    require(stride in (1, 2), ValueError, lambda: f"{op}: stride must be 1 or 2, got {stride}")
    E = cell_edge_count(steps)
    require(
        w.dim() == 2 and w.shape[0] == E, ValueError,
        lambda: f"{op}: a cell of {steps} nodes has {E} edges: w must have shape [{E}, K], got {list(w.shape)}",
    )  # fmt: skip
    require(len(weights) == E and len(candidates) == E, ValueError,
            lambda: f"{op}: {E} edges need {E} weight lists and {E} candidate lists, got {len(weights)} and "
                    f"{len(candidates)}")  # fmt: skip
    check_partial_channels(op, s0, E, partial_channels, scale, require)
    if not training:
        R, C = cell_statistics_rows(steps, stride, candidates, pool_bn), s0.shape[1] // partial_channels
        for name, t in (("bn_mean", bn_mean), ("bn_var", bn_var)):
            require(
                t is not None and list(t.shape) == [R, C], ValueError,
                lambda name=name, t=t: f"{op}: evaluation needs {name} of shape [{R}, {C}] (the computed edges' "
                f"statistics, group after group), got {None if t is None else list(t.shape)}",
            )  # fmt: skip


def mixed_cell(
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
    """The `steps` nodes of a DARTS cell from its preprocessed inputs s0 and s1: node i sums, in input order, the
    mixed ops of the edges from s0, s1 and nodes 0..i-1 (edge_index order); a node no edge computes for is zeros.
    Each state's edges run as one mixed_ops group (cell_groups), with w [E, 7], weights and candidates per edge,
    and `partial_channels` and `scale` [E] as mixed_ops takes them. Returns (nodes, mean [R, C/K], var [R, C/K]):
    the groups' statistics one after the other (bn_mean, bn_var in that order in evaluation)."""
    check_mixed_cell_arguments("mixed_cell", s0, s1, w, weights, steps, stride, candidates, bn_mean, bn_var,
                               training, pool_bn, partial_channels, scale)  # fmt: skip
    C = s0.shape[1] // partial_channels
    states, incoming = [s0, s1], [[] for _ in range(steps)]
    means, variances, at = [], [], 0

    def complete_nodes(count: int) -> None:
        while len(states) < count:
            terms = incoming[len(states) - 2]
            node = s0.new_zeros(mixed_op_output_shape(s0, stride)) if not terms else terms[0]
            for term in terms[1:]:
                node = node + term
            states.append(node)

    for group in cell_groups(steps, stride, candidates, pool_bn):
        complete_nodes(group.state + 1)
        edges = list(group.edges)
        stats = [None if t is None else t[at : at + group.rows].reshape(len(edges), -1, C) for t in (bn_mean, bn_var)]
        at += group.rows
        outs, mean, var = mixed_ops(
            states[group.state], w[edges], [weights[e] for e in edges], group.stride, [candidates[e] for e in edges],
            *stats, training, eps, pool_bn, recompute, partial_channels, None if scale is None else scale[edges],
        )  # fmt: skip
        means.append(mean.reshape(-1, C))
        variances.append(var.reshape(-1, C))
        for node, out in zip(group.nodes, outs):
            incoming[node].append(out)
    complete_nodes(steps + 2)
    empty = s0.new_zeros(0, C)
    return states[2:], torch.cat(means) if means else empty, torch.cat(variances) if variances else empty.clone()


def check_pool_bn_stats_arguments(op: str, x: Tensor, stride: int, require: Require = raise_unless) -> None:
    """The arguments of pool_bn_stats (and of its backward), checked in the order of the C++ kernel."""
    check_images(op, "x", x, require)
    # The pools of a DARTS edge: stride 1 on a normal edge, 2 on a reduction edge.
    require(stride in (1, 2), ValueError, lambda: f"{op}: stride must be 1 or 2, got {stride}")


def pool_bn_stats_output_shape(x: Tensor, stride: int) -> list[int]:
    """[N, C, H_out, W_out] of both pools: 3x3 windows with padding 1 give floor((H - 1) / stride) + 1."""
    return relu_dwconv_output_shape(x, stride)


def pool_bn_stats(x: Tensor, stride: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both 3x3 pools of `x` and the per-channel batch statistics of each; see `fastdarts.ops.pool_bn_stats`.

    max_out = max_pool2d(x, 3, stride, 1); avg_out = avg_pool2d(x, 3, stride, 1, count_include_pad=False);
    mean, var: [2, C], the mean and biased variance of max_out (row 0) and avg_out (row 1) over (N, H_out, W_out),
    without gradient. Differentiable in x through the pools, any number of times.
    """
    op = "pool_bn_stats"
    check_pool_bn_stats_arguments(op, x, stride)
    # The pools would run on integer tensors, but the statistics and the gradients need floating point.
    raise_unless(x.is_floating_point(), TypeError, lambda: f"{op}: x must be floating point, got {x.dtype}")
    max_out = F.max_pool2d(x, 3, stride, 1)
    avg_out = F.avg_pool2d(x, 3, stride, 1, count_include_pad=False)
    pools = torch.stack([max_out.detach(), avg_out.detach()])  # [2, N, C, H_out, W_out]
    var, mean = torch.var_mean(pools, dim=(1, 3, 4), correction=0)
    return max_out, avg_out, mean, var


RNN_OPS = 5  # none, tanh, relu, sigmoid, identity: the columns of rnn_mixed_node's p


def check_rnn_mixed_node_arguments(op: str, states: Tensor, ch: Tensor, p: Tensor, require: Require) -> None:
    require(
        states.dim() == 3 and states.shape[0] >= 1,
        ValueError,
        lambda: f"{op}: states must have shape [n, B, H] with n >= 1, got {list(states.shape)}",
    )
    n, batch, hidden = states.shape
    require(
        list(ch.shape) == [n, batch, 2 * hidden],
        ValueError,
        lambda: f"{op}: ch must have shape {[n, batch, 2 * hidden]} (c and h of each state), got {list(ch.shape)}",
    )
    check_dtype_and_device(op, "ch", ch, "states", states, require)
    require(
        list(p.shape) == [n, RNN_OPS],
        ValueError,
        lambda: (
            f"{op}: p must have shape {[n, RNN_OPS]} (none, tanh, relu, sigmoid, identity per state), got "
            f"{list(p.shape)}"
        ),
    )
    check_dtype_and_device(op, "p", p, "states", states, require)


def rnn_mixed_node(states: Tensor, ch: Tensor, p: Tensor) -> Tensor:
    """DARTS's recurrent mixed op for one node, after the node's one matmul (RNN.md 1.4, 4.1).

    `x = sum_j sum_{k != none} p[j, k] (s_j + sigmoid(c_j) (f_k(h_j) - s_j))
       = sum_j P_j (1 - sigmoid(c_j)) s_j + sigmoid(c_j) g_j`, with `g_j = sum_k p[j, k] f_k(h_j)` over
    f = tanh, relu, sigmoid, identity and `P_j` their total weight.

    states: `[n, B, H]`, the predecessors' states s_j (unmasked); ch: `[n, B, 2H]`, `[c_j | h_j]` = the masked
    state times the node's matrix; p: `[n, 5]`, columns none, tanh, relu, sigmoid, identity (none adds nothing).
    Returns x: `[B, H]`. Gradients (dx the output's): `ds_j = dx P_j (1 - sigma)`, `dc_j = dx (g_j - P_j s_j)
    sigma (1 - sigma)`, `dh_j = dx sigma sum_k p[j, k] f_k'(h_j)` (relu' = 0 at 0), `dp[j, k] = sum dx ((1 - sigma) s_j
    + sigma f_k(h_j))`, `dp[j, none] = 0`.
    """
    check_rnn_mixed_node_arguments("rnn_mixed_node", states, ch, p, raise_unless)
    c, h = ch.chunk(2, dim=-1)
    gate = torch.sigmoid(c)
    w = p[:, 1:, None, None]
    g = w[:, 0] * torch.tanh(h) + w[:, 1] * torch.relu(h) + w[:, 2] * torch.sigmoid(h) + w[:, 3] * h
    return (w.sum(dim=1) * (1 - gate) * states + gate * g).sum(dim=0)
