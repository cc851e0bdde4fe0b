"""Triton kernels of the fused ops, registered with torch.library.triton_op; imported by the registry when the
Triton backend is first needed.

The ops live in their own namespace, fastdarts_triton, with the schemas of the C++ ops (csrc/fastdarts.cpp; only the
outputs of relu_dwconv_backward and of bn_weighted_sum's two backwards take another form, see there) and the same
autograd formulas (saving the same tensors) as _cpp.py, most of them registered by _autograd.py for both namespaces. A
triton_op's body is its own fake: under FakeTensorMode the launches are skipped and only the metadata of the outputs
is computed, and torch.compile sees the launches through torch.library.wrap_triton. The mixed ops,
fastdarts_triton::mixed_ops, are _mixed_op.py's group of edges on these kernels (a torch.library.custom_op, as the
C++ backend's).

Triton kernels run on CUDA tensors. CPU tensors run only under Triton's interpreter (TRITON_INTERPRET=1, the
tests). Triton decides between compiling and interpreting a function when `triton.jit` decorates it, and
registering a triton_op imports triton, so the kernels here are decorated at their first launch (`_Kernel`), and
they call no function of triton's standard library that is itself a @triton.jit function (tl.sum and tl.zeros
are: they are made when triton is imported, usually before the tests set TRITON_INTERPRET); hence
tl.reduce(..., _ADD) and tl.full. The one exception is tl.rand4x, which sample_gates's in-kernel noise needs: that
path runs under the interpreter only when TRITON_INTERPRET=1 was set before triton was imported.

What the kernels do (one program per block of output elements, no atomics, so results are deterministic):
- weighted_sum: one pass over up to 8 inputs per launch (DARTS has 8 candidates); more are added in further
  launches. The backward writes every grad_xs[k] and a per-block partial sum of grad * xs[k]; the partials are
  summed by PyTorch.
- relu_dwconv: one launch per kernel, each recomputing relu(x) as it reads x (a GPU serves the K reads of the same
  tile from its caches). The backward recomputes relu(x) from the saved x, adds the K transposed convolutions into
  grad_x, and reduces grad_w per (channel, block of outputs) for PyTorch to sum.
- sample_gates: the deterministic part of the gate sample, from noise drawn exactly as reference.draw_gate_noise
  draws it (or, sample_gates_seeded, drawn in the kernel by tl.rand4x from one seed): one program per block of
  edges computes g, the top-k mask (a rank per gate from all pairwise comparisons of the edge's scores), the gates,
  P(g != 0) and s_kept.
- pool_bn_stats: one program per tile of output pixels by channels computes both pools and the tile's float64
  sums for the statistics, which PyTorch adds up. The backward recomputes each window's argmax (as one byte per
  output) in one launch, then gathers grad_x per input pixel from the windows that contain it in another.
- bn_weighted_sum: one program per tile of pixels by channels reads up to 8 inputs and adds them, normalised and
  weighted, into the output. The backward's first pass reads grad once, writes the fixed rows' gradients and the
  tile's float64 per-channel sums of g and g (t_k - mean), which PyTorch adds up; a second pass writes the
  batch-statistics rows' gradients from those sums. bn_weighted_sum_backward_factors runs the same passes for the rows
  it writes out only, and returns every row's factors (a, b, mean, e) from the sums.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._prims_common import suggest_memory_format
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton
from triton.runtime.interpreter import InterpretedFunction

from ._autograd import (
    check_pool_grad,
    check_supported_dtype,
    needs_input_grad,
    register_bn_weighted_sum_autograd,
    register_pool_bn_stats_autograd,
    register_sample_gates_autograd,
    register_weighted_sum_autograd,
    torch_check,
)
from ._mixed_op import (
    EdgeKernels,
    composed_factorized_reduce_bn_stats_backward,
    composed_partial_channel_node,
    composed_partial_channel_outputs,
    composed_partial_channel_outputs_backward,
    composed_relu_dwconv_pointwise,
    define_mixed_ops,
)
from .reference import (
    check_beta,
    check_bn_weighted_sum_arguments,
    check_explore_p,
    check_gate_noise,
    check_gate_settings,
    check_like,
    check_one_per_item,
    check_pool_bn_stats_arguments,
    check_relu_dwconv_arguments,
    check_relu_dwconv_pointwise_arguments,
    check_same_tensors,
    check_sized_list,
    check_weights,
    draw_gate_noise,
    factorized_reduce_bn_stats,
    pool_bn_stats_output_shape,
    raise_unless,
    relu_dwconv_output_shape,
)
from .reference import factorized_reduce as reference_factorized_reduce
from .reference import factorized_reduce_bn as reference_factorized_reduce_bn
from .reference import relu_conv_bn as reference_relu_conv_bn
from .reference import relu_conv_bns as reference_relu_conv_bns

# The combine function of tl.sum, for tl.reduce: tl.sum itself is a @triton.jit function, compiled or interpreted
# as TRITON_INTERPRET was when triton was imported, while the interpreter runs a reduction with this function by
# numpy in either case.
_ADD = tl.standard._sum_combine

# The inputs of one weighted_sum or bn_weighted_sum launch: a Triton kernel takes a fixed list of pointers, not a
# list of tensors.
MAX_INPUTS_PER_LAUNCH = 8
# Elements per program: 1-D element-wise kernels, and the output pixels of one (image, channel) plane.
ELEMENTWISE_BLOCK = 1024
CONV_BLOCK = 256
# The tiles of pool_bn_stats and bn_weighted_sum: TILE_PIXELS pixels (of all N images) by up to TILE_CHANNELS channels.
TILE_PIXELS = 128
TILE_CHANNELS = 32


class _Kernel:
    """A Triton kernel, `triton.jit(fn)` made at its first launch under each TRITON_INTERPRET setting."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self._made: dict[bool, object] = {}

    def __getitem__(self, grid):
        interpret = bool(triton.knobs.runtime.interpret)
        kernel = self._made.get(interpret)
        if kernel is None:
            kernel = self._made[interpret] = triton.jit(self.fn)
        if interpret:
            return _InterpretedLaunch(kernel[grid])
        return wrap_triton(kernel)[grid]


class _InterpretedLaunch:
    """A launch under Triton's interpreter, skipped on fake tensors.

    The interpreter reads real CPU memory, and PyTorch cannot trace it into a graph (wrap_triton hands interpreted
    kernels back as they are), so with fake tensors (the triton_op's fake) the op's body computes only the outputs'
    metadata; tracing through the ops needs them kept whole (torch._functorch.config.decompose_custom_triton_ops
    = False, as torch.export keeps them).
    """

    def __init__(self, launch) -> None:
        self.launch = launch

    def __call__(self, *args, **kwargs) -> None:
        if not any(isinstance(arg, Tensor) and is_fake(arg) for arg in args):
            self.launch(*args, **kwargs)


def _launch_blocks(n: int, block: int) -> int:
    return -(-n // block)


# ----------------------------------------------------------------------------------------------
# Helpers of the ops' bodies, which run both on real tensors and, as the fakes, on fake ones. (The checks beyond the
# reference's, such as the dtypes, are in _autograd.py.)


def _tile_grid(pixels: int, C: int) -> tuple[tuple[int, int], int]:
    """The launch grid over `pixels` x C, and the channels per tile (a power of 2, at most TILE_CHANNELS)."""
    block_c = min(TILE_CHANNELS, 1 << (C - 1).bit_length())
    return (_launch_blocks(pixels, TILE_PIXELS), _launch_blocks(C, block_c)), block_c


def _laid_out_like(t: Tensor, like: Tensor) -> Tensor:
    """`t` with the strides of the dense tensor `like`, copied only if it has other strides: then element i of
    the flat storage is the same element of both, and a kernel can walk them with one offset."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


# ----------------------------------------------------------------------------------------------
# weighted_sum


def _weighted_sum_fn(
    out, w, x0, x1, x2, x3, x4, x5, x6, x7, n,
    K: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # out (+)= sum_{k < K} w[k] * x_k over one block; the reference's order of additions within a launch.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    acc = tl.load(x0 + offsets, mask=inside) * tl.load(w)
    if ACCUMULATE:
        acc = tl.load(out + offsets, mask=inside) + acc
    if K > 1:
        acc += tl.load(x1 + offsets, mask=inside) * tl.load(w + 1)
    if K > 2:
        acc += tl.load(x2 + offsets, mask=inside) * tl.load(w + 2)
    if K > 3:
        acc += tl.load(x3 + offsets, mask=inside) * tl.load(w + 3)
    if K > 4:
        acc += tl.load(x4 + offsets, mask=inside) * tl.load(w + 4)
    if K > 5:
        acc += tl.load(x5 + offsets, mask=inside) * tl.load(w + 5)
    if K > 6:
        acc += tl.load(x6 + offsets, mask=inside) * tl.load(w + 6)
    if K > 7:
        acc += tl.load(x7 + offsets, mask=inside) * tl.load(w + 7)
    tl.store(out + offsets, acc, mask=inside)


def _weighted_sum_backward_fn(
    grad, w, partials, num_blocks, n,
    x0, x1, x2, x3, x4, x5, x6, x7, gx0, gx1, gx2, gx3, gx4, gx5, gx6, gx7,
    K: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # gx_k = w[k] * grad, and partials[k, block] = sum over the block of grad * x_k: grad is read once.
    block = tl.program_id(0)
    offsets = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    g = tl.load(grad + offsets, mask=inside, other=0.0)
    tl.store(gx0 + offsets, g * tl.load(w), mask=inside)
    tl.store(partials + block, tl.reduce(g * tl.load(x0 + offsets, mask=inside, other=0.0), 0, _ADD))
    if K > 1:
        tl.store(gx1 + offsets, g * tl.load(w + 1), mask=inside)
        tl.store(partials + num_blocks + block, tl.reduce(g * tl.load(x1 + offsets, mask=inside, other=0.0), 0, _ADD))
    if K > 2:
        tl.store(gx2 + offsets, g * tl.load(w + 2), mask=inside)
        tl.store(
            partials + 2 * num_blocks + block, tl.reduce(g * tl.load(x2 + offsets, mask=inside, other=0.0), 0, _ADD)
        )
    if K > 3:
        tl.store(gx3 + offsets, g * tl.load(w + 3), mask=inside)
        tl.store(
            partials + 3 * num_blocks + block, tl.reduce(g * tl.load(x3 + offsets, mask=inside, other=0.0), 0, _ADD)
        )
    if K > 4:
        tl.store(gx4 + offsets, g * tl.load(w + 4), mask=inside)
        tl.store(
            partials + 4 * num_blocks + block, tl.reduce(g * tl.load(x4 + offsets, mask=inside, other=0.0), 0, _ADD)
        )
    if K > 5:
        tl.store(gx5 + offsets, g * tl.load(w + 5), mask=inside)
        tl.store(
            partials + 5 * num_blocks + block, tl.reduce(g * tl.load(x5 + offsets, mask=inside, other=0.0), 0, _ADD)
        )
    if K > 6:
        tl.store(gx6 + offsets, g * tl.load(w + 6), mask=inside)
        tl.store(
            partials + 6 * num_blocks + block, tl.reduce(g * tl.load(x6 + offsets, mask=inside, other=0.0), 0, _ADD)
        )
    if K > 7:
        tl.store(gx7 + offsets, g * tl.load(w + 7), mask=inside)
        tl.store(
            partials + 7 * num_blocks + block, tl.reduce(g * tl.load(x7 + offsets, mask=inside, other=0.0), 0, _ADD)
        )


_weighted_sum_kernel = _Kernel(_weighted_sum_fn)
_weighted_sum_backward_kernel = _Kernel(_weighted_sum_backward_fn)


def _padded(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The pointer arguments of one launch: the tensors, then the first repeated (never read) up to 8."""
    return [*tensors, *([tensors[0]] * (MAX_INPUTS_PER_LAUNCH - len(tensors)))]


@triton_op("fastdarts_triton::weighted_sum", mutates_args=())
def _weighted_sum_op(xs: list[Tensor], w: Tensor) -> Tensor:
    check_same_tensors("weighted_sum", "xs", xs, torch_check)
    check_supported_dtype("weighted_sum", xs[0])
    check_weights("weighted_sum", "w", w, len(xs), xs[0], torch_check)
    out = torch.empty_like(xs[0])  # the C++ op's layout: that of xs[0] when it is dense
    n = out.numel()
    if n == 0:
        return out
    xs = [_laid_out_like(x, out) for x in xs]
    w = w.contiguous()
    grid = (_launch_blocks(n, ELEMENTWISE_BLOCK),)
    for start in range(0, len(xs), MAX_INPUTS_PER_LAUNCH):
        chunk = xs[start : start + MAX_INPUTS_PER_LAUNCH]
        _weighted_sum_kernel[grid](
            out, w[start:], *_padded(chunk), n, K=len(chunk), ACCUMULATE=start > 0, BLOCK=ELEMENTWISE_BLOCK
        )
    return out


@triton_op("fastdarts_triton::weighted_sum_backward", mutates_args=())
def _weighted_sum_backward_op(grad: Tensor, xs: list[Tensor], w: Tensor) -> tuple[list[Tensor], Tensor]:
    op = "weighted_sum_backward"
    check_same_tensors(op, "xs", xs, torch_check)
    check_supported_dtype(op, xs[0])
    check_like(op, "grad", grad, "xs[0]", xs[0], torch_check)
    check_weights(op, "w", w, len(xs), xs[0], torch_check)
    grad_xs = [torch.empty_like(xs[0]) for _ in xs]
    n = xs[0].numel()
    num_blocks = _launch_blocks(n, ELEMENTWISE_BLOCK)
    # One partial sum of grad * xs[k] per block; PyTorch sums them (in a fixed order: deterministic).
    partials = w.new_empty(len(xs), num_blocks)
    if n > 0:
        like = grad_xs[0]
        grad, xs, w = _laid_out_like(grad, like), [_laid_out_like(x, like) for x in xs], w.contiguous()
        for start in range(0, len(xs), MAX_INPUTS_PER_LAUNCH):
            end = start + MAX_INPUTS_PER_LAUNCH
            K = len(xs[start:end])
            _weighted_sum_backward_kernel[(num_blocks,)](
                grad, w[start:], partials[start:], num_blocks, n, *_padded(xs[start:end]),
                *_padded(grad_xs[start:end]), K=K, BLOCK=ELEMENTWISE_BLOCK,
            )  # fmt: skip
    return grad_xs, partials.sum(dim=1)


def weighted_sum(xs: Sequence[Tensor], w: Tensor) -> Tensor:
    """`out = sum_k w[k] * xs[k]` by the Triton kernel (CUDA; CPU under TRITON_INTERPRET=1; float32/float64)."""
    return torch.ops.fastdarts_triton.weighted_sum.default(list(xs), w)


register_weighted_sum_autograd("fastdarts_triton")


# ----------------------------------------------------------------------------------------------
# relu_dwconv. Every tensor is addressed through its strides, so any layout (contiguous, channels_last, a strided
# view, an expanded gradient) is read in place.


def _relu_dwconv_fn(
    x, w, out, C, H, W, H_out, W_out,
    sxn, sxc, sxh, sxw, son, soc, soh, sow, stride, dilation, padding,
    KS: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # One block of output pixels of one (image, channel) plane: out = sum over the KS x KS taps of w * relu(x).
    plane = tl.program_id(0)
    n, c = (plane // C).to(tl.int64), plane % C
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < H_out * W_out
    ho, wo = offsets // W_out, offsets % W_out
    x_plane = x + n * sxn + c * sxc
    acc = tl.full([BLOCK], 0.0, out.dtype.element_ty)
    for a in tl.static_range(KS):
        hi = ho * stride - padding + a * dilation
        for b in tl.static_range(KS):
            wi = wo * stride - padding + b * dilation
            valid = inside & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            r = tl.load(x_plane + hi * sxh + wi * sxw, mask=valid, other=0.0)
            if RELU:
                r = tl.where(r < 0, 0.0, r)  # relu that keeps NaN, like torch.relu
            acc += tl.load(w + c * KS * KS + a * KS + b) * r
    tl.store(out + n * son + c * soc + ho * soh + wo * sow, acc, mask=inside)


def _relu_dwconv_grad_x_fn(
    g, w, x, gx, C, H, W, H_out, W_out,
    sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, stride, dilation, padding,
    KS: tl.constexpr, RELU: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # gx (+)= [x > 0] * convT(g, w) over one block of input pixels: input pixel h gets tap a from output row
    # ho = (h + padding - a * dilation) / stride when that is a whole number inside the output.
    plane = tl.program_id(0)
    n, c = (plane // C).to(tl.int64), plane % C
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < H * W
    h, w_ = offsets // W, offsets % W
    g_plane = g + n * sgn + c * sgc
    acc = tl.full([BLOCK], 0.0, gx.dtype.element_ty)
    for a in tl.static_range(KS):
        th = h + padding - a * dilation
        ho = th // stride
        rows = (th >= 0) & (th % stride == 0) & (ho < H_out)
        for b in tl.static_range(KS):
            tw = w_ + padding - b * dilation
            wo = tw // stride
            valid = inside & rows & (tw >= 0) & (tw % stride == 0) & (wo < W_out)
            gv = tl.load(g_plane + ho * sgh + wo * sgw, mask=valid, other=0.0)
            acc += tl.load(w + c * KS * KS + a * KS + b) * gv
    if RELU:
        xv = tl.load(x + n * sxn + c * sxc + h * sxh + w_ * sxw, mask=inside, other=0.0)
        acc = tl.where(xv > 0, acc, 0.0)
    gx_pointers = gx + n * sdn + c * sdc + h * sdh + w_ * sdw
    if ACCUMULATE:
        acc = tl.load(gx_pointers, mask=inside) + acc
    tl.store(gx_pointers, acc, mask=inside)


def _relu_dwconv_grad_w_fn(
    g, x, partials, N, C, H, W, H_out, W_out, num_blocks,
    sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, stride, dilation, padding,
    KS: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # partials[c, block, tap] = sum over one block of the N * H_out * W_out outputs of channel c of g times the
    # relu(x) that the tap read; g is loaded once for all the taps.
    c = tl.program_id(0)
    block = tl.program_id(1)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < N * H_out * W_out
    n = (offsets // (H_out * W_out)).to(tl.int64)
    pixel = offsets % (H_out * W_out)
    ho, wo = pixel // W_out, pixel % W_out
    gv = tl.load(g + n * sgn + c * sgc + ho * sgh + wo * sgw, mask=inside, other=0.0)
    x_planes = x + n * sxn + c * sxc
    out = partials + (c * num_blocks + block) * KS * KS
    for a in tl.static_range(KS):
        hi = ho * stride - padding + a * dilation
        for b in tl.static_range(KS):
            wi = wo * stride - padding + b * dilation
            valid = inside & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            r = tl.load(x_planes + hi * sxh + wi * sxw, mask=valid, other=0.0)
            if RELU:
                r = tl.where(r < 0, 0.0, r)
            tl.store(out + a * KS + b, tl.reduce(gv * r, 0, _ADD))


_relu_dwconv_kernel = _Kernel(_relu_dwconv_fn)
_relu_dwconv_grad_x_kernel = _Kernel(_relu_dwconv_grad_x_fn)
_relu_dwconv_grad_w_kernel = _Kernel(_relu_dwconv_grad_w_fn)


@triton_op("fastdarts_triton::relu_dwconv", mutates_args=())
def _relu_dwconv_op(x: Tensor, weights: list[Tensor], dilations: list[int], stride: int, relu: bool) -> list[Tensor]:
    check_relu_dwconv_arguments("relu_dwconv", x, weights, dilations, stride, torch_check)
    check_supported_dtype("relu_dwconv", x)
    N, C, H, W = x.shape
    shape = relu_dwconv_output_shape(x, stride)
    H_out, W_out = shape[2], shape[3]
    # Laid out like x (the C++ op's x.suggest_memory_format()): channels_last in, channels_last out.
    memory_format = suggest_memory_format(x)
    outs = [torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format) for _ in weights]
    if N == 0:
        return outs
    grid = (N * C, _launch_blocks(H_out * W_out, CONV_BLOCK))
    for w, d, out in zip(weights, dilations, outs):
        ks = w.shape[-1]
        _relu_dwconv_kernel[grid](
            x, w.contiguous(), out, C, H, W, H_out, W_out, *x.stride(), *out.stride(), stride, d, d * (ks - 1) // 2,
            KS=ks, RELU=relu, BLOCK=CONV_BLOCK,
        )  # fmt: skip
    return outs


# The C++ op's outputs (Tensor?, Tensor[]) in one list, [grad_x] if input_grad followed by the K grad_weights if
# weight_grad: triton_op infers the schema from the annotations, which cannot express an optional output.
@triton_op("fastdarts_triton::relu_dwconv_backward", mutates_args=())
def _relu_dwconv_backward_op(
    grads: list[Tensor], x: Tensor, weights: list[Tensor], dilations: list[int], stride: int,
    relu: bool, input_grad: bool, weight_grad: bool,
) -> list[Tensor]:  # fmt: skip
    op = "relu_dwconv_backward"
    check_relu_dwconv_arguments(op, x, weights, dilations, stride, torch_check)
    check_supported_dtype(op, x)
    output_shape = relu_dwconv_output_shape(x, stride)
    check_sized_list(op, "grads", grads, len(weights), "weight", output_shape, "x", x, torch_check)
    N, C, H, W = x.shape
    H_out, W_out = output_shape[2], output_shape[3]
    weights = [w.contiguous() for w in weights]

    grad_x = None
    if input_grad:
        grad_x = torch.empty_like(x)
        if N > 0:
            grid = (N * C, _launch_blocks(H * W, CONV_BLOCK))
            for i, (g, w, d) in enumerate(zip(grads, weights, dilations)):
                ks = w.shape[-1]
                _relu_dwconv_grad_x_kernel[grid](
                    g, w, x, grad_x, C, H, W, H_out, W_out, *g.stride(), *x.stride(), *grad_x.stride(), stride, d,
                    d * (ks - 1) // 2, KS=ks, RELU=relu, ACCUMULATE=i > 0, BLOCK=CONV_BLOCK,
                )  # fmt: skip

    grad_weights = []
    if weight_grad:
        num_blocks = _launch_blocks(N * H_out * W_out, CONV_BLOCK)
        for g, w, d in zip(grads, weights, dilations):
            ks = w.shape[-1]
            # One partial sum per (channel, block of outputs, tap); PyTorch sums the blocks, in a fixed order.
            partials = w.new_empty(C, num_blocks, ks * ks)
            if num_blocks > 0:
                _relu_dwconv_grad_w_kernel[(C, num_blocks)](
                    g, x, partials, N, C, H, W, H_out, W_out, num_blocks, *g.stride(), *x.stride(), stride, d,
                    d * (ks - 1) // 2, KS=ks, RELU=relu, BLOCK=CONV_BLOCK,
                )  # fmt: skip
            grad_weights.append(partials.sum(dim=1).view(w.shape))
    return ([grad_x] if grad_x is not None else []) + grad_weights


def relu_dwconv(
    x: Tensor, weights: Sequence[Tensor], dilations: Sequence[int], stride: int, relu: bool = True
) -> list[Tensor]:
    """ReLU, then one depthwise convolution of the result per weight, by the Triton kernels."""
    return torch.ops.fastdarts_triton.relu_dwconv.default(x, list(weights), list(dilations), stride, relu)


# Autograd saves x and the weights, never relu(x) or the outputs, as the C++ op's does (see _cpp.py).


def _relu_dwconv_setup_context(ctx, inputs, output):
    x, weights, dilations, stride, relu = inputs
    ctx.num_weights = len(weights)
    ctx.dilations, ctx.stride, ctx.relu = list(dilations), stride, relu
    ctx.save_for_backward(x, *weights)


def _split_relu_dwconv_gradients(outputs: Sequence, input_grad: bool) -> tuple:
    """(grad_x or None, grad_weights) from relu_dwconv_backward's one list of outputs (or of their gradients)."""
    return (outputs[0], list(outputs[1:])) if input_grad else (None, list(outputs))


def _relu_dwconv_gradients(grads, x, weights, dilations, stride, relu, input_grad, weight_grad) -> tuple:
    """relu_dwconv_backward with the C++ op's outputs: (grad_x or None, grad_weights or [])."""
    outputs = torch.ops.fastdarts_triton.relu_dwconv_backward.default(
        list(grads), x, list(weights), list(dilations), stride, relu, input_grad, weight_grad
    )
    return _split_relu_dwconv_gradients(outputs, input_grad)


def _relu_dwconv_backward(ctx, grads):
    K = ctx.num_weights
    needs = needs_input_grad(ctx)  # x, then the K weights (the int and bool arguments follow)
    x_needs_grad, weights_need_grad = needs[0], needs[1 : K + 1]
    x, *weights = ctx.saved_tensors
    grad_x, grad_weights = _relu_dwconv_gradients(
        grads, x, weights, ctx.dilations, ctx.stride, ctx.relu, x_needs_grad, any(weights_need_grad)
    )
    grad_weights = [g if need else None for g, need in zip(grad_weights, weights_need_grad)] or [None] * K
    return grad_x, grad_weights, None, None, None


torch.library.register_autograd(
    "fastdarts_triton::relu_dwconv", _relu_dwconv_backward, setup_context=_relu_dwconv_setup_context
)


# The backward's own backward is again made of relu_dwconv and its backward (the formulas are in _cpp.py).


def _relu_dwconv_backward_setup_context(ctx, inputs, output):
    grads, x, weights, dilations, stride, relu, input_grad, weight_grad = inputs
    ctx.num_weights = len(weights)
    ctx.dilations, ctx.stride, ctx.relu = list(dilations), stride, relu
    ctx.input_grad, ctx.weight_grad = input_grad, weight_grad
    ctx.save_for_backward(x, *grads, *weights)


def _relu_dwconv_backward_backward(ctx, grad_outputs):
    K = ctx.num_weights
    grad_grad_x, grad_grad_weights = _split_relu_dwconv_gradients(grad_outputs, ctx.input_grad)
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
        d_x, _ = _relu_dwconv_gradients(grads, x, gg_w, dilations, stride, relu, True, False)
    d_weights = [None] * K
    if any(weights_need) and masked_gg_x is not None:
        _, all_d_weights = _relu_dwconv_gradients(grads, masked_gg_x, weights, dilations, stride, False, False, True)
        d_weights = [d if need else None for d, need in zip(all_d_weights, weights_need)]
    return d_grads, d_x, d_weights, None, None, None, None, None


torch.library.register_autograd(
    "fastdarts_triton::relu_dwconv_backward",
    _relu_dwconv_backward_backward,
    setup_context=_relu_dwconv_backward_setup_context,
)


# ----------------------------------------------------------------------------------------------
# sample_gates. The kernel follows the reference's operations one by one, in beta's dtype (the float settings come
# in a tensor of that dtype, rounded as PyTorch rounds a Python scalar: a Triton float argument would be float32).
# Its noise comes either from tensors drawn as reference.draw_gate_noise draws them, or (SEEDED) from tl.rand4x in
# the kernel: Philox keyed by one seed and counting over the gates, its first stream the uniforms u and its second
# the exploration draws.


def _sample_gates_fn(
    beta, u, explore, seed, position, settings, gates, mask, p_nonzero, s_kept, E, K, k,
    TOP_K: tl.constexpr, SEEDED: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    columns = tl.arange(0, BLOCK_K)
    column_inside = columns < K
    inside = (rows < E)[:, None] & column_inside[None, :]
    index = rows.to(tl.int64)[:, None] * K + columns[None, :]
    beta_v = tl.load(beta + index, mask=inside, other=0.0)
    tau, scale, a, shift = tl.load(settings), tl.load(settings + 1), tl.load(settings + 2), tl.load(settings + 3)
    if SEEDED:
        uniforms, explore_draws, _, _ = tl.rand4x(tl.load(seed), index)
        u_v = tl.where(inside, uniforms.to(beta_v.dtype), 0.5)
    else:
        u_v = tl.load(u + index, mask=inside, other=0.5)

    # log1p(-u) as log(1 - u) * -u / ((1 - u) - 1), which cancels the rounding of 1 - u (exact when 1 - u
    # rounds to 1): Triton has no portable log1p.
    one_minus_u = 1.0 - u_v
    log1p_minus_u = tl.where(one_minus_u == 1.0, -u_v, tl.log(one_minus_u) * -u_v / (one_minus_u - 1.0))
    x = (beta_v + tl.log(u_v)) - log1p_minus_u
    s = 1.0 / (1.0 + tl.exp(-(x / tau)))  # torch.sigmoid's formula
    stretched = s * scale + a
    g = tl.where(stretched < 0.0, 0.0, tl.where(stretched > 1.0, 1.0, stretched))  # NaN stays NaN
    # torch.clamp's gradient passes on the closed interval, so s counts as unclamped at 0 and 1 too.
    s_unclamped = tl.where((stretched >= 0.0) & (stretched <= 1.0), s, 0.0)
    tl.store(p_nonzero + index, 1.0 / (1.0 + tl.exp(-(beta_v - shift))), mask=inside)

    if TOP_K:
        # The top-k of g - explore as the reference's stable descending sort of the columns in perm order ranks
        # them: column j is kept when fewer than k columns of its edge come before it, by score (NaN first), then
        # by position in perm.
        if SEEDED:
            explored = tl.where(explore_draws < tl.load(settings + 4), 1.0, 0.0).to(beta_v.dtype)
        else:
            explored = tl.load(explore + index, mask=inside, other=0).to(beta_v.dtype)
        scores = g - explored
        position_v = tl.load(position + columns, mask=column_inside, other=0)
        mine, other = scores[:, :, None], scores[:, None, :]
        other_first = (other > mine) | ((other != other) & (mine == mine))
        mine_first = (mine > other) | ((mine != mine) & (other == other))
        earlier = position_v[None, None, :] < position_v[None, :, None]
        ahead = (other_first | (~mine_first & ~other_first & earlier)) & column_inside[None, None, :]
        kept = tl.reduce(ahead.to(tl.int32), 2, _ADD) < k
        mask_v = tl.where(kept, 1.0, 0.0).to(beta_v.dtype)
        tl.store(gates + index, mask_v * ((g - g) + 1.0), mask=inside)  # exactly the mask, NaN where g is NaN
        tl.store(mask + index, mask_v, mask=inside)
        tl.store(s_kept + index, tl.where(kept, s_unclamped, 0.0), mask=inside)
    else:
        tl.store(gates + index, g, mask=inside)
        tl.store(mask + index, tl.full([BLOCK_E, BLOCK_K], 1.0, beta_v.dtype), mask=inside)
        tl.store(s_kept + index, s_unclamped, mask=inside)


_sample_gates_kernel = _Kernel(_sample_gates_fn)


def _launch_sample_gates(beta, tau, a, b, k, explore_p, u, explore, seed, perm) -> tuple[Tensor, ...]:
    """The outputs of both sampler ops: the noise from u and explore, or from tl.rand4x when `seed` is given."""
    E, K = beta.shape
    # Contiguous outputs whatever beta's strides, like the C++ op's.
    gates, mask, p_nonzero, s_kept = (beta.new_empty(E, K) for _ in range(4))
    if E == 0:
        return gates, mask, p_nonzero, s_kept
    settings = torch.tensor([tau, b - a, a, tau * math.log(-a / b), explore_p], dtype=beta.dtype, device=beta.device)
    top_k, seeded = k is not None, seed is not None
    # The position of each column in perm (the inverse permutation), the tie-break of the top-k.
    position = torch.argsort(perm) if top_k else beta
    block_k = 1 << (K - 1).bit_length()  # the next power of 2
    # Rows per program: the top-k's pairwise comparisons take BLOCK_E * BLOCK_K**2 values, the rest BLOCK_E * BLOCK_K.
    block_e = max(1, min(64, 4096 // (block_k * block_k)) if top_k else 4096 // block_k)
    unused = beta  # the pointer passed for an input the launch does not read
    _sample_gates_kernel[(_launch_blocks(E, block_e),)](
        beta.contiguous(), unused if seeded else u.contiguous(),
        explore.contiguous() if top_k and not seeded else unused, seed if seeded else unused, position, settings,
        gates, mask, p_nonzero, s_kept, E, K, k if top_k else 0,
        TOP_K=top_k, SEEDED=seeded, BLOCK_E=block_e, BLOCK_K=block_k,
    )  # fmt: skip
    return gates, mask, p_nonzero, s_kept


@triton_op("fastdarts_triton::sample_gates", mutates_args=())
def _sample_gates_op(
    beta: Tensor, tau: float, a: float, b: float, k: int | None, u: Tensor, explore: Tensor | None,
    perm: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    check_beta("sample_gates", beta, torch_check)
    check_supported_dtype("sample_gates", beta)
    check_gate_settings("sample_gates", tau, a, b, k, beta.shape[1], torch_check)
    check_gate_noise("sample_gates", beta, k, u, explore, perm, torch_check)
    return _launch_sample_gates(beta, tau, a, b, k, 0.0, u, explore, None, perm)


# sample_gates's schema with an int64 seed of shape [1] (on beta's device) in place of u, and explore_p in place of
# explore: the kernel draws both itself.
@triton_op("fastdarts_triton::sample_gates_seeded", mutates_args=())
def _sample_gates_seeded_op(
    beta: Tensor, tau: float, a: float, b: float, k: int | None, seed: Tensor, explore_p: float,
    perm: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    op = "sample_gates"
    check_beta(op, beta, torch_check)
    check_supported_dtype(op, beta)
    check_gate_settings(op, tau, a, b, k, beta.shape[1], torch_check)
    check_explore_p(op, explore_p, torch_check)
    torch_check(
        seed.shape == (1,) and seed.dtype == torch.int64 and seed.device == beta.device,
        ValueError,
        lambda: f"{op}: seed must be one int64 on the device of beta, got {seed.dtype} of shape {list(seed.shape)}",
    )
    if k is not None:
        K = beta.shape[1]
        torch_check(
            perm is not None and perm.shape == (K,) and perm.dtype == torch.int64 and perm.device == beta.device,
            ValueError,
            lambda: f"{op}: top-k needs perm, an int64 permutation of the {K} op columns on the device of beta",
        )
    return _launch_sample_gates(beta, tau, a, b, k, explore_p, None, None, seed, perm)


def sample_gates(
    beta: Tensor, tau: float, a: float = -0.1, b: float = 1.1, k: int | None = 2, explore_p: float = 0.4,
    generator: torch.Generator | None = None, kernel_noise: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """One sample of PR-DARTS's gates by the Triton kernel. Its noise is drawn exactly as the reference draws it, or
    with `kernel_noise` by tl.rand in the kernel, from one seed drawn from `generator` (then the column permutation,
    drawn as the reference draws it). The checks come first, so that a bad call raises the reference's error before
    it draws anything."""
    check_beta("sample_gates", beta)
    check_supported_dtype("sample_gates", beta, raise_unless)
    check_gate_settings("sample_gates", tau, a, b, k, beta.shape[1])
    check_explore_p("sample_gates", explore_p)
    if not kernel_noise:
        u, explore, perm = draw_gate_noise(beta, k, explore_p, generator)
        gates, mask, p_nonzero, _ = torch.ops.fastdarts_triton.sample_gates.default(
            beta, tau, a, b, k, u, explore, perm
        )  # fmt: skip
        return gates, mask, p_nonzero
    # Triton makes tl.rand4x, a @triton.jit function, when it is imported: the interpreter can run it only if
    # TRITON_INTERPRET=1 was set by then.
    raise_unless(
        not triton.knobs.runtime.interpret or isinstance(tl.rand4x, InterpretedFunction),
        RuntimeError,
        lambda: (
            "sample_gates: noise='kernel' under Triton's interpreter needs TRITON_INTERPRET=1 set before triton "
            "is imported (tl.rand is made then)"
        ),
    )
    device = beta.device if generator is None else generator.device
    seed = torch.randint(2**63 - 1, (1,), generator=generator, device=device)
    perm = None if k is None else torch.randperm(beta.shape[1], generator=generator, device=device)
    gates, mask, p_nonzero, _ = torch.ops.fastdarts_triton.sample_gates_seeded.default(
        beta, tau, a, b, k, seed.to(beta.device), explore_p, None if perm is None else perm.to(beta.device)
    )  # fmt: skip
    return gates, mask, p_nonzero


# The backward, in torch ops on the ops' saved outputs, so it traces and is differentiable again.
register_sample_gates_autograd("fastdarts_triton::sample_gates")
register_sample_gates_autograd("fastdarts_triton::sample_gates_seeded")


# ----------------------------------------------------------------------------------------------
# pool_bn_stats. A program takes a tile of output (or, backward, input) pixels by channels (_tile_grid), every
# tensor addressed through its strides: with channels_last the channels of a pixel are adjacent, in the contiguous
# layout the pixels of a row. The window of output (ho, wo) is the input rows ho * stride - 1 + a and columns
# wo * stride - 1 + b, a, b < 3, that lie inside the image.


def _pool_bn_stats_fn(
    x, max_out, avg_out, shift, partials, C, H, W, H_out, W_out, P,
    sxn, sxc, sxh, sxw, son, soc, soh, sow, stride,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # Both pools of the tile, and per channel the tile's sums of d and d^2, d = pool - shift in float64, for the
    # statistics (partials[block, 0:2] for max_out, [block, 2:4] for avg_out). The maximum follows ATen's rule: a
    # tap replaces it when greater or NaN, so a NaN in the window comes out.
    block = tl.program_id(0)
    pixels = block * BLOCK_P + tl.arange(0, BLOCK_P)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_inside = channels < C
    inside = (pixels < P)[:, None] & channel_inside[None, :]
    n = (pixels // (H_out * W_out)).to(tl.int64)
    ho, wo = (pixels // W_out) % H_out, pixels % W_out
    top, left = ho * stride - 1, wo * stride - 1
    x_tile = x + (n * sxn)[:, None] + channels.to(tl.int64)[None, :] * sxc
    maximum = tl.full([BLOCK_P, BLOCK_C], float("-inf"), x.dtype.element_ty)
    total = tl.full([BLOCK_P, BLOCK_C], 0.0, x.dtype.element_ty)
    for a in tl.static_range(3):
        hi = top + a
        for b in tl.static_range(3):
            wi = left + b
            valid = inside & ((hi >= 0) & (hi < H) & (wi >= 0) & (wi < W))[:, None]
            v = tl.load(x_tile + (hi * sxh + wi * sxw)[:, None], mask=valid, other=0.0)
            maximum = tl.where(valid & ((v != v) | (v > maximum)), v, maximum)
            total += v
    count = (tl.minimum(top + 3, H) - tl.maximum(top, 0)) * (tl.minimum(left + 3, W) - tl.maximum(left, 0))
    average = total / count.to(total.dtype)[:, None]
    out_offsets = (n * son + ho * soh + wo * sow)[:, None] + channels.to(tl.int64)[None, :] * soc
    tl.store(max_out + out_offsets, maximum, mask=inside)
    tl.store(avg_out + out_offsets, average, mask=inside)

    shift_v = tl.load(shift + channels, mask=channel_inside, other=0.0)[None, :]
    d_max = tl.where(inside, maximum.to(tl.float64) - shift_v, 0.0)
    d_avg = tl.where(inside, average.to(tl.float64) - shift_v, 0.0)
    row = partials + block * 4 * C + channels
    tl.store(row, tl.reduce(d_max, 0, _ADD), mask=channel_inside)
    tl.store(row + C, tl.reduce(d_max * d_max, 0, _ADD), mask=channel_inside)
    tl.store(row + 2 * C, tl.reduce(d_avg, 0, _ADD), mask=channel_inside)
    tl.store(row + 3 * C, tl.reduce(d_avg * d_avg, 0, _ADD), mask=channel_inside)


def _pool_argmax_fn(
    x, index, C, H, W, H_out, W_out, P,
    sxn, sxc, sxh, sxw, sin, sic, sih, siw, stride,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # index = 3 a + b of each window's argmax by the forward's rule: the first maximum in scan order, or the last
    # NaN (a tap wins when nothing has yet, or when it is not <= the maximum raised to +inf if NaN).
    pixels = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (pixels < P)[:, None] & (channels < C)[None, :]
    n = (pixels // (H_out * W_out)).to(tl.int64)
    ho, wo = (pixels // W_out) % H_out, pixels % W_out
    top, left = ho * stride - 1, wo * stride - 1
    x_tile = x + (n * sxn)[:, None] + channels.to(tl.int64)[None, :] * sxc
    maximum = tl.full([BLOCK_P, BLOCK_C], float("-inf"), x.dtype.element_ty)
    best = tl.full([BLOCK_P, BLOCK_C], -1, tl.int32)
    for a in tl.static_range(3):
        hi = top + a
        for b in tl.static_range(3):
            wi = left + b
            valid = inside & ((hi >= 0) & (hi < H) & (wi >= 0) & (wi < W))[:, None]
            v = tl.load(x_tile + (hi * sxh + wi * sxw)[:, None], mask=valid, other=0.0)
            ceiling = tl.where(maximum != maximum, float("inf"), maximum)
            wins = valid & ((best < 0) | ~(v <= ceiling))
            maximum = tl.where(wins, v, maximum)
            best = tl.where(wins, 3 * a + b, best)
    index_offsets = (n * sin + ho * sih + wo * siw)[:, None] + channels.to(tl.int64)[None, :] * sic
    tl.store(index + index_offsets, best.to(tl.int8), mask=inside)


def _pool_bn_stats_backward_fn(
    grad_max, grad_avg, index, grad_x, C, H, W, H_out, W_out, P,
    smn, smc, smh, smw, san, sac, sah, saw, sin, sic, sih, siw, sdn, sdc, sdh, sdw, stride,
    MAX: tl.constexpr, AVG: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # grad_x over a tile of input pixels, gathered rather than scattered (no atomics, so deterministic): input row h
    # is tap a of output row ho = (h + 1 - a) / stride when that is a whole number inside the output. It receives
    # grad_max where it was the argmax and grad_avg / count of every window it lies in, the windows in the C++
    # kernel's order (ho, then wo, ascending).
    pixels = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (pixels < P)[:, None] & (channels < C)[None, :]
    c = channels.to(tl.int64)[None, :]
    n = (pixels // (H * W)).to(tl.int64)
    h, w = (pixels // W) % H, pixels % W
    acc = tl.full([BLOCK_P, BLOCK_C], 0.0, grad_x.dtype.element_ty)
    for i in tl.static_range(3):
        a = 2 - i
        th = h + 1 - a
        ho = th // stride
        rows = (th >= 0) & (th % stride == 0) & (ho < H_out)
        for j in tl.static_range(3):
            b = 2 - j
            tw = w + 1 - b
            wo = tw // stride
            valid = inside & (rows & (tw >= 0) & (tw % stride == 0) & (wo < W_out))[:, None]
            if MAX:
                at = index + (n * sin + ho * sih + wo * siw)[:, None] + c * sic
                mine = valid & (tl.load(at, mask=valid, other=-1).to(tl.int32) == 3 * a + b)
                # A masked load, not a multiply by a 0/1 mask: an inf or NaN gradient must not reach other taps.
                acc += tl.load(grad_max + (n * smn + ho * smh + wo * smw)[:, None] + c * smc, mask=mine, other=0.0)
            if AVG:
                top, left = ho * stride - 1, wo * stride - 1
                count = (tl.minimum(top + 3, H) - tl.maximum(top, 0)) * (tl.minimum(left + 3, W) - tl.maximum(left, 0))
                g = tl.load(grad_avg + (n * san + ho * sah + wo * saw)[:, None] + c * sac, mask=valid, other=0.0)
                # ATen's avg_pool2d backward divides, too; off the output, count can be 0.
                acc += tl.where(valid, g / count.to(acc.dtype)[:, None], 0.0)
    tl.store(grad_x + (n * sdn + h * sdh + w * sdw)[:, None] + c * sdc, acc, mask=inside)


_pool_bn_stats_kernel = _Kernel(_pool_bn_stats_fn)
_pool_argmax_kernel = _Kernel(_pool_argmax_fn)
_pool_bn_stats_backward_kernel = _Kernel(_pool_bn_stats_backward_fn)


@triton_op("fastdarts_triton::pool_bn_stats", mutates_args=())
def _pool_bn_stats_op(x: Tensor, stride: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_pool_bn_stats_arguments("pool_bn_stats", x, stride, torch_check)
    check_supported_dtype("pool_bn_stats", x)
    N, C, H, W = x.shape
    shape = pool_bn_stats_output_shape(x, stride)
    H_out, W_out = shape[2], shape[3]
    # Laid out like x (the C++ op's x.suggest_memory_format()); the statistics are contiguous [2, C].
    memory_format = suggest_memory_format(x)
    max_out, avg_out = (torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format) for _ in "ma")
    if N == 0:  # no values: the statistics are NaN, as torch.var_mean's are
        return max_out, avg_out, x.new_full((2, C), math.nan), x.new_full((2, C), math.nan)
    # The statistics are sums of d and d^2 in float64 with d = v - shift, shift = x[0, c, 0, 0] a value in the data's
    # range, so that the variance does not cancel catastrophically; one partial sum per tile of pixels, added up by
    # PyTorch in a fixed order (deterministic).
    shift = x[0, :, 0, 0].to(torch.float64).contiguous()
    P = N * H_out * W_out
    grid, block_c = _tile_grid(P, C)
    partials = x.new_empty((grid[0], 4, C), dtype=torch.float64)
    _pool_bn_stats_kernel[grid](
        x, max_out, avg_out, shift, partials, C, H, W, H_out, W_out, P, *x.stride(), *max_out.stride(), stride,
        BLOCK_P=TILE_PIXELS, BLOCK_C=block_c,
    )  # fmt: skip
    sums = partials.sum(dim=0) / P  # [4, C]: E[d] and E[d^2] of max_out, then of avg_out
    mean_d, square_d = sums[0::2], sums[1::2]
    var = square_d - mean_d * mean_d
    # Rounding can leave a constant channel's variance a hair below 0; a NaN stays NaN.
    var = torch.where(var < 0, 0.0, var)
    return max_out, avg_out, (shift + mean_d).to(x.dtype), var.to(x.dtype)


@triton_op("fastdarts_triton::pool_bn_stats_backward", mutates_args=())
def _pool_bn_stats_backward_op(grad_max: Tensor | None, grad_avg: Tensor | None, x: Tensor, stride: int) -> Tensor:
    op = "pool_bn_stats_backward"
    check_pool_bn_stats_arguments(op, x, stride, torch_check)
    check_supported_dtype(op, x)
    check_pool_grad(op, "grad_max", grad_max, x, stride)
    check_pool_grad(op, "grad_avg", grad_avg, x, stride)
    if grad_max is None and grad_avg is None:
        return torch.zeros_like(x)
    grad_x = torch.empty_like(x)
    N, C, H, W = x.shape
    if N == 0:
        return grad_x
    shape = pool_bn_stats_output_shape(x, stride)
    H_out, W_out = shape[2], shape[3]
    unused = x  # the pointer passed for a gradient that is not given
    index = unused
    if grad_max is not None:  # each window's argmax, recomputed from x (autograd saved nothing else), as one byte
        index = torch.empty(shape, dtype=torch.int8, device=x.device, memory_format=suggest_memory_format(x))
        P = N * H_out * W_out
        grid, block_c = _tile_grid(P, C)
        _pool_argmax_kernel[grid](
            x, index, C, H, W, H_out, W_out, P, *x.stride(), *index.stride(), stride,
            BLOCK_P=TILE_PIXELS, BLOCK_C=block_c,
        )  # fmt: skip
    grid, block_c = _tile_grid(N * H * W, C)
    given_max, given_avg = grad_max if grad_max is not None else unused, grad_avg if grad_avg is not None else unused
    _pool_bn_stats_backward_kernel[grid](
        given_max, given_avg, index, grad_x, C, H, W, H_out, W_out, N * H * W,
        *given_max.stride(), *given_avg.stride(), *index.stride(), *grad_x.stride(), stride,
        MAX=grad_max is not None, AVG=grad_avg is not None, BLOCK_P=TILE_PIXELS, BLOCK_C=block_c,
    )  # fmt: skip
    return grad_x


def pool_bn_stats(x: Tensor, stride: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both 3x3 pools of x and their per-channel batch statistics, by the Triton kernels."""
    return torch.ops.fastdarts_triton.pool_bn_stats.default(x, stride)


register_pool_bn_stats_autograd("fastdarts_triton")


# ----------------------------------------------------------------------------------------------
# bn_weighted_sum: the C++ kernels' formulas (csrc/cpu/bn_weighted_sum.cpp) over tiles of pixels by channels
# (_tile_grid). Every tensor is read with the strides of the output (inputs in another layout are copied to it);
# with channels_last the channels of a pixel are adjacent, in the contiguous layout the pixels of a row. The K inputs
# of a launch come as a tuple of pointers indexed by the constexpr k of tl.static_range; the bit masks (bit k for
# input k of the launch) are constexprs too, so each variant compiles to straight-line code.


def _bn_weighted_sum_fn(
    out, mean, coef, t0, t1, t2, t3, t4, t5, t6, t7, C, H, W, P, sn, sc, sh, sw,
    K: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # out (+)= sum_{k < K} (t_k - mean[k, c]) * coef[k, c] over one tile, coef = w[k] invstd[k, c].
    ts = (t0, t1, t2, t3, t4, t5, t6, t7)
    pixels = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_inside = channels < C
    inside = (pixels < P)[:, None] & channel_inside[None, :]
    n = (pixels // (H * W)).to(tl.int64)
    h, w = (pixels // W) % H, pixels % W
    offsets = (n * sn + h * sh + w * sw)[:, None] + channels.to(tl.int64)[None, :] * sc
    if ACCUMULATE:
        acc = tl.load(out + offsets, mask=inside, other=0.0)
    else:
        acc = tl.full([BLOCK_P, BLOCK_C], 0.0, out.dtype.element_ty)
    for k in tl.static_range(K):
        m = tl.load(mean + k * C + channels, mask=channel_inside, other=0.0)[None, :]
        s = tl.load(coef + k * C + channels, mask=channel_inside, other=0.0)[None, :]
        acc += (tl.load(ts[k] + offsets, mask=inside, other=0.0) - m) * s
    tl.store(out + offsets, acc, mask=inside)


def _bn_weighted_sum_reduce_fn(
    grad, mean, a, partials, grad_sums, t0, t1, t2, t3, t4, t5, t6, t7, gt0, gt1, gt2, gt3, gt4, gt5, gt6, gt7,
    C, H, W, P, sn, sc, sh, sw, num_blocks,
    K: tl.constexpr, DOT: tl.constexpr, WRITE: tl.constexpr, SUM_GRAD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # The backward's first pass over one tile, grad read once: per channel, the float64 sums of g (grad_sums[block],
    # if SUM_GRAD) and of g (t_k - mean[k, c]) (partials[k, block], for the rows in DOT), each product rounded once
    # to the inputs' precision as in the C++ kernel; and gt_k = a[k, c] g for the rows in WRITE (the fixed rows,
    # which need no sums).
    ts = (t0, t1, t2, t3, t4, t5, t6, t7)
    gts = (gt0, gt1, gt2, gt3, gt4, gt5, gt6, gt7)
    block = tl.program_id(0)
    pixels = block * BLOCK_P + tl.arange(0, BLOCK_P)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_inside = channels < C
    inside = (pixels < P)[:, None] & channel_inside[None, :]
    n = (pixels // (H * W)).to(tl.int64)
    h, w = (pixels // W) % H, pixels % W
    offsets = (n * sn + h * sh + w * sw)[:, None] + channels.to(tl.int64)[None, :] * sc
    g = tl.load(grad + offsets, mask=inside, other=0.0)
    slot = block * C + channels
    if SUM_GRAD:
        tl.store(grad_sums + slot, tl.reduce(g.to(tl.float64), 0, _ADD), mask=channel_inside)
    for k in tl.static_range(K):
        if (DOT >> k) & 1:
            m = tl.load(mean + k * C + channels, mask=channel_inside, other=0.0)[None, :]
            # Zero off the tile, where 0 * (0 - mean) would be NaN for an infinite mean.
            product = tl.where(inside, g * (tl.load(ts[k] + offsets, mask=inside, other=0.0) - m), 0.0)
            total = tl.reduce(product.to(tl.float64), 0, _ADD)
            tl.store(partials + k * num_blocks * C + slot, total, mask=channel_inside)
        if (WRITE >> k) & 1:
            ak = tl.load(a + k * C + channels, mask=channel_inside, other=0.0)[None, :]
            tl.store(gts[k] + offsets, ak * g, mask=inside)


def _bn_weighted_sum_grad_fn(
    grad, mean, a, b, e, t0, t1, t2, t3, t4, t5, t6, t7, gt0, gt1, gt2, gt3, gt4, gt5, gt6, gt7,
    C, H, W, P, sn, sc, sh, sw,
    K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # The second pass, for K batch-statistics rows: gt_k = a g + b (t_k - mean) + e with the per-channel
    # coefficients [k, c] of the first pass's sums.
    ts = (t0, t1, t2, t3, t4, t5, t6, t7)
    gts = (gt0, gt1, gt2, gt3, gt4, gt5, gt6, gt7)
    pixels = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_inside = channels < C
    inside = (pixels < P)[:, None] & channel_inside[None, :]
    n = (pixels // (H * W)).to(tl.int64)
    h, w = (pixels // W) % H, pixels % W
    offsets = (n * sn + h * sh + w * sw)[:, None] + channels.to(tl.int64)[None, :] * sc
    g = tl.load(grad + offsets, mask=inside, other=0.0)
    for k in tl.static_range(K):
        row = k * C + channels
        m = tl.load(mean + row, mask=channel_inside, other=0.0)[None, :]
        ak = tl.load(a + row, mask=channel_inside, other=0.0)[None, :]
        bk = tl.load(b + row, mask=channel_inside, other=0.0)[None, :]
        ek = tl.load(e + row, mask=channel_inside, other=0.0)[None, :]
        t = tl.load(ts[k] + offsets, mask=inside, other=0.0)
        tl.store(gts[k] + offsets, ak * g + bk * (t - m) + ek, mask=inside)


_bn_weighted_sum_kernel = _Kernel(_bn_weighted_sum_fn)
_bn_weighted_sum_reduce_kernel = _Kernel(_bn_weighted_sum_reduce_fn)
_bn_weighted_sum_grad_kernel = _Kernel(_bn_weighted_sum_grad_fn)


def _tile_arguments(like: Tensor) -> tuple[tuple[int, int], int, list[int]]:
    """The grid, the channels per tile, and the size and stride arguments (C, H, W, P, then the strides) of a tile
    kernel over tensors laid out like `like`."""
    N, C, H, W = like.shape
    grid, block_c = _tile_grid(N * H * W, C)
    return grid, block_c, [C, H, W, N * H * W, *like.stride()]


def _bits(flags: Sequence[bool]) -> int:
    """A constexpr bit mask: bit i set when flags[i] is."""
    return sum(1 << i for i, flag in enumerate(flags) if flag)


@triton_op("fastdarts_triton::bn_weighted_sum", mutates_args=())
def _bn_weighted_sum_op(ts: list[Tensor], w: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    check_bn_weighted_sum_arguments("bn_weighted_sum", ts, w, mean, invstd, torch_check)
    check_supported_dtype("bn_weighted_sum", ts[0])
    out = torch.empty_like(ts[0])  # the C++ op's layout: at::empty_like(ts[0])
    if out.numel() == 0:
        return out
    ts = [_laid_out_like(t, out) for t in ts]
    # w[k] invstd[k, c] in double, rounded once, as the C++ kernel's coefficients.
    coef = (w.double()[:, None] * invstd.double()).to(out.dtype)
    mean = mean.contiguous()
    grid, block_c, sizes = _tile_arguments(out)
    for start in range(0, len(ts), MAX_INPUTS_PER_LAUNCH):
        chunk = ts[start : start + MAX_INPUTS_PER_LAUNCH]
        _bn_weighted_sum_kernel[grid](
            out, mean[start:], coef[start:], *_padded(chunk), *sizes,
            K=len(chunk), ACCUMULATE=start > 0, BLOCK_P=TILE_PIXELS, BLOCK_C=block_c,
        )  # fmt: skip
    return out


def _bn_weighted_sum_backward_passes(
    op: str, grad: Tensor, ts: list[Tensor], w: Tensor, mean: Tensor, invstd: Tensor, batch_statistics: list[bool],
    written: list[bool], w_grad: bool, want_factors: bool,
) -> tuple[list[Tensor], Tensor | None, list[Tensor]]:  # fmt: skip
    """Both backward ops of bn_weighted_sum: (the gradients of the `written` rows, in row order; every row's factors
    [K, 4, C] (a, b, mean, e) when want_factors, else None; [grad_w] or []). Pass 1 runs over every row whose sum of
    g (t_k - mean) is needed, pass 2 only over the written batch-statistics rows."""
    check_bn_weighted_sum_arguments(op, ts, w, mean, invstd, torch_check)
    check_supported_dtype(op, ts[0])
    check_like(op, "grad", grad, "ts[0]", ts[0], torch_check)
    K = len(ts)
    check_one_per_item(op, "batch_statistics", len(batch_statistics), K, "tensor", torch_check)
    check_one_per_item(op, "written", len(written), K, "tensor", torch_check)
    grad_ts = [torch.empty_like(ts[0]) if row else None for row in written]
    N, C, H, W = ts[0].shape
    M = N * H * W
    dtype = ts[0].dtype
    w64, invstd64 = w.double(), invstd.double()
    a = w64[:, None] * invstd64  # a fixed row's gradient is a g
    # The rows whose written gradient goes through their batch statistics (the second pass writes them), the rows
    # whose sum of g (t_k - mean) is needed (those, every batch-statistics row for the factors, every row for
    # grad_w), and the rows the first pass writes.
    normalised = [row and statistics for row, statistics in zip(written, batch_statistics)]
    factor_rows = [want_factors and statistics for statistics in batch_statistics]
    dot = [w_grad or n or f for n, f in zip(normalised, factor_rows)]
    fixed = [row and not statistics for row, statistics in zip(written, batch_statistics)]
    sums = torch.zeros((K + 1, C), dtype=torch.float64, device=grad.device)  # [sum g (t_k - mean)] + [sum g]
    if M > 0 and (any(dot) or any(fixed)):
        like = next((g for g in grad_ts if g is not None), None)
        like = torch.empty_like(ts[0]) if like is None else like
        grad, ts = _laid_out_like(grad, like), [_laid_out_like(t, like) for t in ts]
        outs = [t if g is None else g for g, t in zip(grad_ts, ts)]  # pointers never written where no gradient
        grid, block_c, sizes = _tile_arguments(like)
        num_blocks = grid[0]
        # Per tile and channel, the sums of g (t_k - mean[k]) (rows k < K, those in `dot`) and of g (row K), added up
        # by PyTorch in a fixed order (deterministic); the sums of rows no launch writes are never used.
        partials = w.new_empty((K + 1, num_blocks, C), dtype=torch.float64)
        mean_rows, a_rows = mean.contiguous(), a.to(dtype)
        for start in range(0, K, MAX_INPUTS_PER_LAUNCH):
            end = start + MAX_INPUTS_PER_LAUNCH
            _bn_weighted_sum_reduce_kernel[grid](
                grad, mean_rows[start:], a_rows[start:], partials[start], partials[K], *_padded(ts[start:end]),
                *_padded(outs[start:end]), *sizes, num_blocks, K=len(ts[start:end]), DOT=_bits(dot[start:end]),
                WRITE=_bits(fixed[start:end]), SUM_GRAD=start == 0 and any(normalised + factor_rows),
                BLOCK_P=TILE_PIXELS, BLOCK_C=block_c,
            )  # fmt: skip
        sums = partials.sum(dim=1)
    rows = [k for k in range(K) if normalised[k] and M > 0]
    if rows or want_factors:
        # grad_t_k = a (g - mean_c(g) - xhat mean_c(g xhat)) = a g + b (t_k - mean) + e: the C++ kernel's b and e,
        # zero for the fixed rows.
        statistics = torch.tensor(batch_statistics, dtype=torch.bool, device=grad.device)[:, None]
        b = torch.where(statistics, -a * invstd64.square() * sums[:K] / max(M, 1), 0.0)
        e = torch.where(statistics, -a * sums[K] / max(M, 1), 0.0)
    if rows:
        mean_rows, a_rows, b_rows, e_rows = mean[rows].contiguous(), a[rows].to(dtype), b[rows].to(dtype), \
            e[rows].to(dtype)  # fmt: skip
        ts_rows, outs = [ts[k] for k in rows], [grad_ts[k] for k in rows]
        for start in range(0, len(rows), MAX_INPUTS_PER_LAUNCH):
            end = start + MAX_INPUTS_PER_LAUNCH
            _bn_weighted_sum_grad_kernel[grid](
                grad, mean_rows[start:], a_rows[start:], b_rows[start:], e_rows[start:],
                *_padded(ts_rows[start:end]), *_padded(outs[start:end]), *sizes, K=len(ts_rows[start:end]),
                BLOCK_P=TILE_PIXELS, BLOCK_C=block_c,
            )  # fmt: skip
    # sum(g xhat_k) = sum over c of invstd[k, c] sum_c(g (t_k - mean[k, c]))
    grad_w = [(invstd64 * sums[:K]).sum(dim=1).to(w.dtype)] if w_grad else []
    factors = torch.stack([a, b, mean.double(), e], dim=1).to(dtype) if want_factors else None
    return [g for g in grad_ts if g is not None], factors, grad_w


# The C++ ops' outputs (Tensor[], Tensor?) as (grad_ts or [], [grad_w] or []): triton_op infers the schema from the
# annotations, which cannot express an optional output.
@triton_op("fastdarts_triton::bn_weighted_sum_backward", mutates_args=())
def _bn_weighted_sum_backward_op(
    grad: Tensor, ts: list[Tensor], w: Tensor, mean: Tensor, invstd: Tensor, batch_statistics: list[bool],
    input_grad: bool, w_grad: bool,
) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
    grad_ts, _, grad_w = _bn_weighted_sum_backward_passes(
        "bn_weighted_sum_backward", grad, ts, w, mean, invstd, batch_statistics, [input_grad] * len(ts), w_grad, False
    )  # fmt: skip
    return grad_ts, grad_w


@triton_op("fastdarts_triton::bn_weighted_sum_backward_factors", mutates_args=())
def _bn_weighted_sum_backward_factors_op(
    grad: Tensor, ts: list[Tensor], w: Tensor, mean: Tensor, invstd: Tensor, batch_statistics: list[bool],
    written: list[bool], w_grad: bool,
) -> tuple[list[Tensor], Tensor, list[Tensor]]:  # fmt: skip
    return _bn_weighted_sum_backward_passes(
        "bn_weighted_sum_backward_factors", grad, ts, w, mean, invstd, batch_statistics, written, w_grad, True
    )


def _bn_weighted_sum_backward_factors(grad, ts, w, mean, invstd, batch_statistics, written, w_grad) -> tuple:
    """bn_weighted_sum_backward_factors with the C++ op's outputs: (written rows' gradients, factors, grad_w or
    None)."""
    grad_ts, factors, grad_w = torch.ops.fastdarts_triton.bn_weighted_sum_backward_factors.default(
        grad, list(ts), w, mean, invstd, list(batch_statistics), list(written), w_grad
    )
    return grad_ts, factors, (grad_w[0] if w_grad else None)


def _bn_weighted_sum_gradients(grad, ts, w, mean, invstd, batch_statistics, input_grad, w_grad) -> tuple:
    """bn_weighted_sum_backward with the C++ op's outputs: (grad_ts or [], grad_w or None)."""
    grad_ts, grad_w = torch.ops.fastdarts_triton.bn_weighted_sum_backward.default(
        grad, list(ts), w, mean, invstd, list(batch_statistics), input_grad, w_grad
    )
    return grad_ts, (grad_w[0] if w_grad else None)


def bn_weighted_sum(ts: Sequence[Tensor], w: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    """`out = sum_k w[k] * (ts[k] - mean[k]) * invstd[k]` per channel, by the Triton kernel (CUDA; CPU under
    TRITON_INTERPRET=1; float32/float64)."""
    return torch.ops.fastdarts_triton.bn_weighted_sum.default(list(ts), w, mean, invstd)


register_bn_weighted_sum_autograd("fastdarts_triton", _bn_weighted_sum_gradients)


# ----------------------------------------------------------------------------------------------
# The mixed op: the edge of _mixed_op.py on the kernels above. Its depthwise convs and the 1x1 convs after them
# are the Triton relu_dwconv and ATen's 1x1 convs and BN statistics (cuDNN and cuBLAS on a GPU), composed; the BNs
# that bn_weighted_sum does not fold stay ATen's.

_relu_dwconv_pointwise, _relu_dwconv_pointwise_gradients = composed_relu_dwconv_pointwise(
    torch.ops.fastdarts_triton.relu_dwconv.default, _relu_dwconv_gradients
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
    """The Triton relu_dwconv, each output through ATen's 1x1 conv, and ATen's batch statistics of the results
    (differentiable through the Triton relu_dwconv's autograd and ATen's); x normalised by ATen first when
    input_mean and input_invstd are given."""
    check_relu_dwconv_pointwise_arguments("relu_dwconv_pointwise", x, weights, pointwise_weights, dilations, stride,
                                          raise_unless, input_mean, input_invstd)  # fmt: skip
    return _relu_dwconv_pointwise(x, list(weights), list(pointwise_weights), list(dilations), stride, relu, input_mean,
                                  input_invstd)  # fmt: skip


mixed_ops, mixed_op, mixed_cell = define_mixed_ops(
    "fastdarts_triton",
    EdgeKernels(
        backend="triton",
        relu_dwconv_pointwise=_relu_dwconv_pointwise,
        relu_dwconv_pointwise_backward=_relu_dwconv_pointwise_gradients,
        pool_bn_stats=torch.ops.fastdarts_triton.pool_bn_stats.default,
        pool_bn_stats_backward=torch.ops.fastdarts_triton.pool_bn_stats_backward.default,
        # no Triton kernel yet: the reference's matrix products
        factorized_reduce_bn_stats=factorized_reduce_bn_stats,
        factorized_reduce_bn_stats_backward=composed_factorized_reduce_bn_stats_backward,
        weighted_sum=torch.ops.fastdarts_triton.weighted_sum.default,
        bn_weighted_sum=torch.ops.fastdarts_triton.bn_weighted_sum.default,
        bn_weighted_sum_backward=_bn_weighted_sum_gradients,
        bn_weighted_sum_backward_factors=_bn_weighted_sum_backward_factors,
        partial_channel_outputs=composed_partial_channel_outputs,  # no Triton kernel yet: ATen's copies
        partial_channel_outputs_backward=composed_partial_channel_outputs_backward,
        partial_channel_node=composed_partial_channel_node,
    ),
    device_types=None,  # CUDA, and CPU tensors under TRITON_INTERPRET=1
)


# A cell's preprocessing and FactorizedReduce: no Triton kernels; on CUDA the reference's ReLU, cuDNN's 1x1 conv and
# BN, and cuBLAS's matrix product.
relu_conv_bn = reference_relu_conv_bn
relu_conv_bns = reference_relu_conv_bns
factorized_reduce = reference_factorized_reduce
factorized_reduce_bn = reference_factorized_reduce_bn


# The recurrent mixed op, in a module of its own; imported last: it uses the launch helpers above.
from ._triton_rnn import rnn_mixed_node  # noqa: E402, F401
