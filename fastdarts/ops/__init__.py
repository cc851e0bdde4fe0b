"""The kernel layer: one function per fused op, each call dispatched to a backend.

Every op has a pure-PyTorch reference (`fastdarts.ops.reference`, the specification), a C++
CPU kernel (`fastdarts._C`) and a Triton version (`_triton`; the mixed op there is the same edge
on the Triton building blocks). CPU tensors run the C++ kernel when it is built, CUDA tensors the
Triton kernel when triton imports, everything else the reference;
`backend=`, `use_backend(...)` and FASTDARTS_BACKEND override that (`_registry` holds the rules;
"triton" runs CPU tensors only under TRITON_INTERPRET=1). Every op is differentiable and traces
under torch.compile(fullgraph=True).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._extension import CPU_ISAS, EXTENSION_ERROR, EXTENSION_LOADED, cpu_isa, supported_cpu_isas, use_cpu_isa
from ._registry import BACKENDS, available_backends, dispatch, select, use_backend
from .reference import (
    MIXED_OP_CANDIDATES,
    channel_parts,
    check_conv_settings,
    check_flag,
    mixed_op_layout,
    mixed_op_weight_shapes,
)

__all__ = [
    "BACKENDS",
    "CPU_ISAS",
    "EXTENSION_ERROR",
    "EXTENSION_LOADED",
    "MIXED_OP_CANDIDATES",
    "available_backends",
    "bn_weighted_sum",
    "cpu_isa",
    "describe_kernels",
    "factorized_reduce",
    "factorized_reduce_bn",
    "mixed_cell",
    "mixed_op",
    "mixed_ops",
    "mixed_op_layout",
    "mixed_op_weight_shapes",
    "pool_bn_stats",
    "relu_conv_bn",
    "relu_conv_bns",
    "relu_dwconv",
    "relu_dwconv_pointwise",
    "rnn_mixed_node",
    "sample_gates",
    "supported_cpu_isas",
    "use_backend",
    "use_cpu_isa",
    "weighted_sum",
]


def describe_kernels(device: str | torch.device = "cpu") -> str:
    """One line for a run's log: the backend the supernet's ops run on for tensors of `device`, and for the C++
    kernels the instruction-set tier in force and the CPU's best. Raises ValueError (one line) when
    FASTDARTS_CPU_ISA names an unknown tier or one the CPU lacks."""
    backend = select("mixed_op", torch.device(device))
    line = f"kernels: {backend}"
    if backend == "cpp":
        line += f" on CPU tier {cpu_isa()} (best here: {supported_cpu_isas()[-1]})"
    return f"{line}, {torch.get_num_threads()} threads"


def weighted_sum(xs: Sequence[Tensor], w: Tensor, *, backend: str | None = None) -> Tensor:
    """`out = sum_k w[k] * xs[k]`: the DARTS mixed-op sum of K candidate outputs.

    Args:
        xs: K >= 1 tensors of one shape (any), dtype and device. The output takes the memory
            layout of `xs[0]` (channels_last stays channels_last).
        w: shape [K], the dtype and device of `xs`; typically a softmax of architecture weights.
        backend: "reference", "cpp" or "triton" for this call; None follows `use_backend`, then
            FASTDARTS_BACKEND, then the device ("cpp" for CPU tensors when built, "triton" for CUDA
            tensors when triton imports).

    Differentiable in every `xs[k]` (`w[k] * grad`) and in `w` (`sum(grad * xs[k])`), twice.
    Raises ValueError for an empty list, mismatched shapes or devices, or `w` not of shape [K];
    TypeError for mismatched dtypes (and, on "cpp" and "triton", dtypes other than float32/float64).
    """
    return dispatch("weighted_sum", w.device, backend)(xs, w)


def rnn_mixed_node(states: Tensor, ch: Tensor, p: Tensor, *, backend: str | None = None) -> Tensor:
    """DARTS's recurrent mixed op for one node (RNN.md 1.4), after the node's one matmul for every candidate.

    `x = sum_j sum_{k != none} p[j, k] (s_j + sigmoid(c_j) (f_k(h_j) - s_j))` over f = tanh, relu, sigmoid,
    identity: every activation, the highway update and the weighted sum in one pass, forward and backward, with
    nothing saved but the inputs (the backward recomputes the activations from c and h).

    Args:
        states: `[n, B, H]`, the node's predecessors' states (unmasked: the highway's residual).
        ch: `[n, B, 2H]`, `[c_j | h_j]`: each masked state times the node's matrix.
        p: `[n, 5]`, the weights of none, tanh, relu, sigmoid, identity for each predecessor.
        backend: "reference", "cpp" or "triton" (default: by device, see the module docstring).

    Returns:
        x: `[B, H]`, the node's value before the search cell's BN.
    """
    return dispatch("rnn_mixed_node", states.device, backend)(states, ch, p)


def bn_weighted_sum(
    ts: Sequence[Tensor], w: Tensor, mean: Tensor, invstd: Tensor, *, backend: str | None = None
) -> Tensor:
    """`out = sum_k w[k] * (ts[k] - mean[k, c]) * invstd[k, c]`: the end of a DARTS mixed op, the weighted sum of K
    affine-free batch norms (per channel c), without writing the K normalised tensors.

    Args:
        ts: K >= 1 tensors [N, C, H, W] of one shape, dtype and device. The output takes the memory layout of
            `ts[0]` (channels_last, the layout "cpp" computes in, stays channels_last; "cpp" copies other layouts,
            "triton" reads the inputs laid out like the output in place and copies the others).
        w: [K], the dtype and device of `ts`; typically a softmax of architecture weights.
        mean, invstd: [K, C], the statistics each BN normalises with (invstd = 1 / sqrt(var + eps)). A row of
            zeros and ones adds its tensor un-normalised (the skip connection).
        backend: "reference", "cpp" or "triton" for this call; None follows `use_backend`, then FASTDARTS_BACKEND,
            then the device ("cpp" for CPU tensors when built, "triton" for CUDA tensors when triton imports).

    Differentiable in `ts`, `w`, `mean` and `invstd`, each taken as an input in its own right (statistics computed
    from `ts` in the graph pass their gradient on through autograd): with g = dL/dout and xhat_k = (ts[k] -
    mean[k]) * invstd[k], `dL/dts[k] = w[k] invstd[k] g` and `dL/dw[k] = sum(g xhat_k)`. Once on "cpp" and
    "triton" (the reference any number of times). The fused mixed op calls the backend's
    `bn_weighted_sum_backward` op instead, which takes the gradient through batch statistics of `ts[k]` in the
    same pass. Raises ValueError for an empty list, a shape or device problem; TypeError for mismatched dtypes
    (and, on "cpp" and "triton", dtypes other than float32/float64).
    """
    return dispatch("bn_weighted_sum", w.device, backend)(ts, w, mean, invstd)


def factorized_reduce(
    x: Tensor, conv_1: Tensor, conv_2: Tensor, relu: bool = True, *, backend: str | None = None
) -> Tensor:
    """DARTS's FactorizedReduce before its BN: ReLU (none when `relu` is false), then two stride-2 1x1 convs, one on
    x and one on x shifted by a pixel (padded back to x's size when a side is odd), concatenated along the channels.

    Args:
        x: [N, C_in, H, W], float32 or float64, any memory layout (channels_last is the fast one).
        conv_1, conv_2: [C_out / 2, C_in, 1, 1] each.
        backend: "reference", "cpp" or "triton" for this call, as for the other ops.

    Returns [N, C_out, (H + 1) // 2, (W + 1) // 2], laid out like `x`. Differentiable in all three; once on "cpp",
    which reads x once (the ReLU included) and saves only x and the weights for backward; "triton" runs the
    reference (a matrix product on cuBLAS). Raises ValueError for shapes that do not fit (on "cpp").
    """
    return dispatch("factorized_reduce", x.device, backend)(x, conv_1, conv_2, relu)


def _device_of_parts(op: str, x: Tensor | Sequence[Tensor]) -> torch.device:
    """The device of x, a tensor or a list of its channel parts (the first part's: the ops check the others)."""
    parts = channel_parts(x)
    if not parts:
        raise ValueError(f"{op}: x must be a tensor or a non-empty list of tensors")
    return parts[0].device


def factorized_reduce_bn(
    x: Tensor | Sequence[Tensor],
    conv_1: Tensor,
    conv_2: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    relu: bool = True,
    *,
    backend: str | None = None,
) -> Tensor:
    """A DARTS cell's preprocessing of its input 0 after a reduction cell: `factorized_reduce`, then an affine-free
    BN (space.FactorizedReduce(C_in, C_out, affine=False)), with F.batch_norm's arguments and semantics.

    Args:
        x: [N, C_in, H, W], float32 or float64, any memory layout (channels_last is the fast one); or its channel
            parts, as for `relu_conv_bns` (a cell's output nodes).
        conv_1, conv_2: [C_out / 2, C_in, 1, 1] each.
        running_mean, running_var, training, momentum, eps, relu: as for `relu_conv_bn`, over the C_out channels.
        backend: "reference", "cpp" or "triton" for this call, as for the other ops.

    Returns [N, C_out, (H + 1) // 2, (W + 1) // 2], laid out like `x`. Differentiable once in x (its parts) and the
    weights on "cpp", which reads x's parts where they are for the ReLU, the convs and the statistics, normalises by
    one more pass over the output, and in the backward forms the BN's gradient inside the convs' pass, which writes
    each part's gradient; "triton" and "reference" run factorized_reduce on the concatenation, then F.batch_norm.
    Raises ValueError as `factorized_reduce` and `relu_conv_bn` do.
    """
    return dispatch("factorized_reduce_bn", _device_of_parts("factorized_reduce_bn", x), backend)(
        x, conv_1, conv_2, running_mean, running_var, training, momentum, eps, relu
    )


def relu_conv_bn(
    x: Tensor,
    weight: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    relu: bool = True,
    *,
    backend: str | None = None,
) -> Tensor:
    """A DARTS cell's preprocessing of one input: ReLU, a 1x1 conv without bias, an affine-free BN
    (space.ReLUConvBN(C_in, C_out, 1, 1, 0, affine=False)), with F.batch_norm's arguments and semantics.

    Args:
        x: [N, C_in, H, W], float32 or float64, any memory layout (channels_last is the fast one).
        weight: [C_out, C_in, 1, 1].
        running_mean, running_var: [C_out] or None. In training they are updated in place by `momentum` (the
            variance unbiased), when given; in evaluation they normalise.
        training: normalise with the batch's statistics (else the running ones).
        momentum, eps: as F.batch_norm's.
        relu: False when x is already the ReLU's output.
        backend: "reference", "cpp" or "triton" for this call, as for the other ops.

    Returns [N, C_out, H, W], laid out like `x`. Differentiable once in `x` and `weight` on "cpp", which reads x once
    for the ReLU, the conv and the statistics, and in the backward masks grad_x in the conv's pass; "triton" runs the
    reference (cuDNN's conv on CUDA). Raises ValueError for shapes that do not fit or, in evaluation, missing running
    statistics.
    """
    return dispatch("relu_conv_bn", x.device, backend)(
        x, weight, running_mean, running_var, training, momentum, eps, relu
    )


def relu_conv_bns(
    x: Tensor | Sequence[Tensor],
    weights: Sequence[Tensor],
    batch_norms: Sequence[tuple],
    relu: bool = True,
    *,
    backend: str | None = None,
) -> list[Tensor]:
    """`relu_conv_bn` of one x for each of several weights, each with its own BN: the preprocessing of a state in
    every cell that reads it (a state feeds the next two cells).

    Args:
        x: as for `relu_conv_bn`; or its channel parts, a non-empty list of [N, C_i, H, W] tensors of one N, H, W,
            dtype and device, x = torch.cat(x, 1) (a cell's output nodes).
        weights: K >= 1 weights [C_out_k, C_in, 1, 1].
        batch_norms: per weight, its BN as `relu_conv_bn`'s (running_mean, running_var, training, momentum, eps).
        relu, backend: as for `relu_conv_bn`.

    Returns the K outputs. On "cpp" one pass over x for all K convs and their statistics, and one backward pass
    over x that gives dL/dx summed over the outputs (instead of one per output, and their sum); x's parts are read,
    and their gradients written, where they are, with no concatenated copy. Elsewhere K `relu_conv_bn` of the
    concatenation. Raises ValueError as `relu_conv_bn` does, naming the weight or the part, or for a count mismatch.
    """
    return dispatch("relu_conv_bns", _device_of_parts("relu_conv_bns", x), backend)(x, weights, batch_norms, relu)


def sample_gates(
    beta: Tensor,
    tau: float,
    a: float = -0.1,
    b: float = 1.1,
    k: int | None = 2,
    explore_p: float = 0.4,
    generator: torch.Generator | None = None,
    *,
    backend: str | None = None,
    noise: str = "torch",
) -> tuple[Tensor, Tensor, Tensor]:
    """One sample of PR-DARTS's hard-concrete gates and the top-k ops of every edge (METHOD.md 2.1-2.2).

    Args:
        beta: `[num_edges, num_ops]` gate logits, floating point.
        tau: the temperature, > 0.
        a, b: the stretch of the sigmoid, `a < 0` and `b > 1`.
        k: ops kept per edge, 1..num_ops; None keeps every op (no exploration, no top-k).
        explore_p: probability, per gate, of having 1 subtracted before the top-k.
        generator: the source of every random number (uniforms, then exploration draws, then one
            column permutation); draws happen on its device and move to beta's. None: the default
            generator of beta's device.
        backend: "reference", "cpp" or "triton" for this call; None follows `use_backend`, then
            FASTDARTS_BACKEND, then the device ("cpp" for CPU tensors when built, "triton" for CUDA
            tensors when triton imports). All draw the same random numbers from the generator; "cpp"
            and "triton" then compute every gate in one kernel. Their log and exp and PyTorch's
            can differ in the last bit, so g, `p_nonzero` and the gradients agree to a rounding, and
            the masks (so the top-k gates) are identical unless such a bit decides a near-tie of g.
        noise: where the uniforms and the exploration draws come from. "torch" (the default): drawn
            from `generator` as above, the same numbers on every backend. "kernel" ("triton" only):
            made inside the kernel by tl.rand (Philox keyed by one seed drawn from `generator`, which
            then draws the column permutation): no noise tensors, and a seed still reproduces a
            run, but the sample is not the other backends' (its distribution is).

    Returns `(gates, mask, p_nonzero)`, each the shape, dtype and device of `beta`:
        mask: 0/1, exactly k ones per edge: the top-k of `g - explore` (ties go to the column that
            comes first in the call's random permutation, the same for every edge); all ones when
            k is None.
        gates: with top-k, exactly 1 on the mask and 0 elsewhere in the forward, with the
            straight-through gradient `1 - g.detach() + g` on the mask, where
            `g = clamp(sigmoid((beta + log u - log(1 - u)) / tau) * (b - a) + a, 0, 1)`, `u ~ U(0, 1)`;
            so `d gates / d beta = mask * (b - a) * s (1 - s) / tau` (s the sigmoid), 0 where
            the clamp is active. When k is None, the gates are g itself.
        p_nonzero: `P(g != 0) = sigmoid(beta - tau * log(-a / b))`, differentiable in beta.

    Differentiable in beta, any number of times. Raises ValueError for a beta that is not 2-D,
    settings out of range or a bad `noise`, TypeError for a beta that is not floating point (and,
    on "cpp" and "triton", not float32/float64), before any random number is drawn.
    """
    if noise == "torch":
        return dispatch("sample_gates", beta.device, backend)(beta, tau, a, b, k, explore_p, generator)
    if noise != "kernel":
        raise ValueError(f"sample_gates: noise must be 'torch' or 'kernel', got {noise!r}")
    chosen = select("sample_gates", beta.device, backend)
    if chosen != "triton":
        raise ValueError(f"sample_gates: noise='kernel' needs the 'triton' backend, got {chosen!r}")
    return dispatch("sample_gates", beta.device, chosen)(beta, tau, a, b, k, explore_p, generator, kernel_noise=True)


def relu_dwconv(
    x: Tensor,
    weights: Sequence[Tensor],
    dilations: Sequence[int],
    stride: int,
    relu: bool = True,
    *,
    backend: str | None = None,
) -> list[Tensor]:
    """ReLU, then K depthwise convolutions of the result, from one read of `x`.

    `out[i] = conv2d(relu(x), weights[i], stride=stride, dilation=dilations[i], padding=dilations[i] * (k_i - 1) // 2,
    groups=C)`: the first stage of DARTS's sep_conv and dil_conv candidates (3x3, 5x5, 3x3 dilation 2, 5x5
    dilation 2 on one edge), and with K = 1 the second stage of a sep_conv.

    Args:
        x: [N, C, H, W], float32 or float64, any memory layout (channels_last is the fast one).
        weights: K >= 1 depthwise kernels, weights[i] of shape [C, 1, k_i, k_i] with k_i odd; the dtype and
            device of `x`.
        dilations: K positive ints, one per kernel. The padding is "same": dilations[i] * (k_i - 1) // 2.
        stride: a positive int shared by the K kernels (1, or 2 on a DARTS reduction edge).
        relu: apply ReLU to `x` first (True in DARTS); False convolves `x` itself.
        backend: "reference", "cpp" or "triton" for this call; None follows `use_backend`, then FASTDARTS_BACKEND,
            then the device ("cpp" for CPU tensors when built, "triton" for CUDA tensors when triton imports).

    Returns:
        K tensors [N, C, (H - 1) // stride + 1, (W - 1) // stride + 1], laid out like `x` (channels_last in,
        channels_last out).

    Differentiable in `x` and every weight, any number of times. The "cpp" and "triton" backends save only `x`
    and the weights for backward, recompute relu(x) there, and compute only the gradients asked for. Raises
    ValueError for a shape, length or device problem, a stride or dilation below 1 or not an int, or a relu that
    is not a bool; TypeError for mismatched dtypes (and, on "cpp" and "triton", dtypes other than float32/float64).
    """
    check_conv_settings("relu_dwconv", dilations, stride, relu)
    return dispatch("relu_dwconv", x.device, backend)(x, weights, dilations, stride, relu)


def relu_dwconv_pointwise(
    x: Tensor,
    weights: Sequence[Tensor],
    pointwise_weights: Sequence[Tensor],
    dilations: Sequence[int],
    stride: int,
    relu: bool = True,
    input_mean: Tensor | None = None,
    input_invstd: Tensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """relu_dwconv with each output going straight through its own 1x1 conv, and the batch statistics of the results.

    `out[i] = conv2d(relu_dwconv(x, weights, dilations, stride, relu)[i], pointwise_weights[i])`: a DARTS dil conv up
    to its BN, or one half of a sep conv (K = 4 on an edge's input for the first stage of its four conv candidates;
    K = 1 for a sep conv's second half, after its middle BN).

    Args:
        x, weights, dilations, stride, relu: as for `relu_dwconv`.
        pointwise_weights: K 1x1 kernels [C, C, 1, 1], one per depthwise kernel; the dtype and device of `x`.
        input_mean, input_invstd: [1, C] each, or both None: the convs read `(x - input_mean) * input_invstd` in
            place of `x` (a sep conv's middle BN, which the "cpp" kernel applies as it reads x, never writing the
            normalised tensor).
        backend: as for `relu_dwconv`.

    Returns:
        (out, mean, var): out[i] like relu_dwconv's outputs (laid out like `x`); mean and var [K, C], the per-channel
        mean and biased variance of out[i] over (N, H_out, W_out), the batch statistics a BN after it normalises with
        (no gradient flows through them).

    Differentiable in `x`, every weight, `input_mean` and `input_invstd`. The "cpp" kernel never writes the
    depthwise outputs: it runs each one into its 1x1 conv tile by tile with the statistics in the same pass, and its
    backward recomputes them in tiles, so autograd keeps only `x` and the weights (and the normalisation); it is
    differentiable once (the reference any number of times).
    "triton" composes its relu_dwconv with ATen's 1x1 convs. Raises ValueError and TypeError as `relu_dwconv`
    does, and ValueError for a pointwise weight not of shape [C, C, 1, 1] or not one per depthwise kernel, or for
    only one of input_mean and input_invstd, or either not of shape [1, C].
    """
    check_conv_settings("relu_dwconv_pointwise", dilations, stride, relu)
    return dispatch("relu_dwconv_pointwise", x.device, backend)(
        x, weights, pointwise_weights, dilations, stride, relu, input_mean, input_invstd
    )


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
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One DARTS edge, `sum_k w[k] * o_k(x)` over the candidates MIXED_OP_CANDIDATES (METHOD.md 1.1), in one node.

    Args:
        x: [N, C, H, W], float32 or float64 (channels_last is the layout the "cpp" backend computes in).
        w: [7], the weight of each candidate (`none` excluded: it adds zeros); those not computed are ignored.
        weights: every conv weight of the edge, shapes `mixed_op_weight_shapes(C, stride)` (sep_conv_k: depthwise,
            pointwise, depthwise, pointwise; dil_conv_k: depthwise, pointwise; at stride 2 the skip's
            FactorizedReduce convs first), passed whatever `candidates` computes.
        stride: 1, or 2 on a reduction edge (C must then be even).
        candidates: increasing indices into MIXED_OP_CANDIDATES, the ops to compute (PR-DARTS's top-k); empty
            gives zeros.
        bn_mean, bn_var: [B, C], the running statistics of the edge's B affine-free BNs (rows in
            `mixed_op_layout(stride, pool_bn)` order): what evaluation normalises with. Ignored in training.
        training: normalise with the batch's statistics (and return them) or with bn_mean and bn_var.
        eps: the BNs' epsilon.
        pool_bn: an affine-free BN after each pool (DARTS's search network) or none (PR-DARTS's).
        recompute: on "cpp" and "triton", keep only x, the weights and the statistics for backward and recompute
            the edge there (the default), or keep the edge's intermediates (10 activations of the output's size
            for all seven candidates: never a depthwise output) and skip most of the recomputation.
        backend: "reference", "cpp" or "triton" for this call; None follows `use_backend`, then FASTDARTS_BACKEND,
            then the device ("cpp" for CPU tensors when built, "triton" for CUDA tensors).

    Returns (out [N, C, (H-1)//stride + 1, (W-1)//stride + 1], mean [B, C], var [B, C]): in training the batch
    mean and biased variance each BN normalised with (rows of candidates not computed: 0 and 1), from which the
    caller updates its running statistics; in evaluation copies of bn_mean and bn_var.

    Differentiable in x, w and every conv weight (once on "cpp" and "triton"; the reference any number of times).
    The fused backends compute only the gradients asked for. Raises ValueError for a shape, length, stride or
    candidate problem and TypeError for mismatched dtypes (on "cpp", also for dtypes other than float32/float64).
    """
    check_flag("mixed_op", "pool_bn", pool_bn)
    check_flag("mixed_op", "recompute", recompute)
    return dispatch("mixed_op", x.device, backend)(
        x, w, weights, stride, candidates, bn_mean, bn_var, training, eps, pool_bn, recompute
    )  # fmt: skip


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
    *,
    backend: str | None = None,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """The mixed ops of E edges leaving the same state x (a DARTS cell has 4 from each input, then 3, 2, 1 from
    its nodes), in one node: `mixed_op` per edge, with each edge's arguments stacked or listed.

    On "cpp" and "triton" the group shares its passes over x: one relu_dwconv_pointwise call computes the first
    stage of every edge's convs, the pools (the same tensors on every edge) are computed once, and the backward runs
    one first-stage kernel, one pool backward and one sum for dL/dx.

    Args:
        x, stride, training, eps, pool_bn, recompute, backend: as for `mixed_op`, shared by the edges.
        w: [E, 7], row e the weights of edge e's candidates.
        weights: E lists, each edge's conv weights as `mixed_op` takes them.
        candidates: E lists, each edge's candidates as `mixed_op` takes them (an empty one gives zeros).
        bn_mean, bn_var: [E, B, C/K], each edge's running statistics (evaluation only).
        partial_channels: K, PC-DARTS's partial channels: the ops compute on the first C/K channels of x (their
            conv weights and statistics are those of C/K channels) and the other channels bypass them (through a 2x2
            max pool, stride 2, rounding up, on a stride-2 edge); the two parts, concatenated, are shuffled into K
            groups, the ops' output at channels c*K (reference.split_partial_channels, partial_channel_edge).
            The fused backends read the slice and write the shuffled output inside the op, keeping only x for
            backward. 1 (default): every channel, DARTS's edge.
        scale: None, or [E]: a factor on each edge's whole output (PC-DARTS's edge normalisation), differentiable;
            the fused backends fold it into w and the bypass rather than multiplying the outputs.

    Returns (outs, mean [E, B, C/K], var [E, B, C/K]): edge e's output [N, C, H_out, W_out] and statistics at
    index e. Differentiable and checked as `mixed_op` is.
    """
    check_flag("mixed_ops", "pool_bn", pool_bn)
    check_flag("mixed_ops", "recompute", recompute)
    return dispatch("mixed_ops", x.device, backend)(
        x, w, weights, stride, candidates, bn_mean, bn_var, training, eps, pool_bn, recompute, partial_channels, scale
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
    *,
    backend: str | None = None,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """The nodes of a DARTS search cell from its two preprocessed inputs, in one node: node i sums, in input order,
    the mixed ops of its edges from s0, s1 and nodes 0..i-1 (METHOD.md 1.1).

    Each state's edges run as one `mixed_ops` group, the nodes are summed once complete, and on "cpp" the whole
    cell, forward and recomputing backward, runs in C++ (fastdarts::edge_cell) with no Python between its groups.

    Args:
        s0, s1: the preprocessed inputs, [N, C, H, W] each; stride, training, eps, pool_bn, recompute, backend: as
            for `mixed_op`, `stride` that of the edges leaving s0 and s1 (2 in a reduction cell), the nodes' edges
            1.
        w: [E, 7], E = cell_edge_count(steps) edges in edge_index order (node-major, input-minor).
        weights: E lists, each edge's conv weights as `mixed_op` takes them at its stride.
        steps: the cell's intermediate nodes (4 in DARTS).
        candidates: E lists, each edge's candidates as `mixed_op` takes them; an empty one leaves the edge out (a
            node no edge computes for is zeros).
        bn_mean, bn_var: [R, C/K], the running statistics of the computed edges, group after group (evaluation
            only; reference.cell_groups gives the groups and their rows).
        partial_channels, scale: as for `mixed_ops`, for every edge of the cell.

    Returns (nodes, mean [R, C/K], var [R, C/K]): the `steps` nodes [N, C, H_out, W_out] and, in training, the
    groups' batch statistics as mixed_ops returns them ([E_g, B, C/K] each, flattened and one after the other).
    Differentiable in s0, s1, w, scale and every conv weight (once on the fused backends), checked as `mixed_ops`
    is.
    """
    check_flag("mixed_cell", "pool_bn", pool_bn)
    check_flag("mixed_cell", "recompute", recompute)
    return dispatch("mixed_cell", s0.device, backend)(
        s0, s1, w, weights, steps, stride, candidates, bn_mean, bn_var, training, eps, pool_bn, recompute,
        partial_channels, scale,
    )  # fmt: skip


def pool_bn_stats(x: Tensor, stride: int, *, backend: str | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """DARTS's two pool candidates and the batch statistics of the affine-free BNs after them, from one read of `x`.

    `max_out = max_pool2d(x, 3, stride, 1)` and `avg_out = avg_pool2d(x, 3, stride, 1, count_include_pad=False)`
    (METHOD.md 1.1's max_pool_3x3 and avg_pool_3x3 before their BNs), with the per-channel mean and biased variance
    of each over (N, H_out, W_out).

    Args:
        x: [N, C, H, W], float32 or float64, any memory layout (channels_last is the fast one).
        stride: 1, or 2 on a DARTS reduction edge.
        backend: "reference", "cpp" or "triton" for this call; None follows `use_backend`, then FASTDARTS_BACKEND,
            then the device ("cpp" for CPU tensors when built, "triton" for CUDA tensors).

    Returns (max_out, avg_out, mean, var):
        max_out, avg_out: [N, C, (H - 1) // stride + 1, (W - 1) // stride + 1], laid out like `x`. A NaN in a
            window gives NaN in both.
        mean, var: [2, C], row 0 for max_out and row 1 for avg_out; "cpp" accumulates them in double. They carry
            no gradient.

    Differentiable in `x` through the two pools: the max's gradient goes to the first maximum of each window in
    scan order, as max_pool2d's does; any number of times. The "cpp" backend saves only `x` for backward and
    recomputes the argmax there (its second derivatives run ATen's pools). Raises ValueError for an `x` that is
    not 4-D with C, H, W >= 1 or a stride other than 1 or 2; TypeError for an `x` that is not floating point (on
    "cpp", not float32/float64).
    """
    return dispatch("pool_bn_stats", x.device, backend)(x, stride)
