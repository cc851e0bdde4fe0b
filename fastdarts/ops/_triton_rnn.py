"""The Triton kernels of rnn_mixed_node (DARTS's recurrent mixed op), registered as fastdarts_triton ops; imported by
fastdarts.ops._triton, whose launch helpers they use. The formulas are the C++ kernel's (csrc/cpu/rnn_mixed_node.cpp).

One program owns BLOCK consecutive elements (b, f) of the node and loops over the n predecessors: the forward writes
x once; the backward writes the three gradients and, per program, its partial sums of grad_p, which PyTorch adds up
in a fixed order (deterministic).
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from ._autograd import check_supported_dtype, register_rnn_mixed_node_autograd, torch_check
from ._triton import _ADD, ELEMENTWISE_BLOCK, _Kernel, _launch_blocks
from .reference import RNN_OPS, check_like, check_rnn_mixed_node_arguments


def _rnn_mixed_node_fn(states, ch, p, x, n, B, H, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < B * H
    row, col = offsets // H, offsets % H
    acc = tl.where(inside, 0.0, 0.0).to(x.dtype.element_ty)
    for j in range(n):
        s = tl.load(states + j * B * H + offsets, mask=inside, other=0.0)
        c = tl.load(ch + (j * B + row) * 2 * H + col, mask=inside, other=0.0)
        h = tl.load(ch + (j * B + row) * 2 * H + H + col, mask=inside, other=0.0)
        p1, p2 = tl.load(p + j * 5 + 1), tl.load(p + j * 5 + 2)
        p3, p4 = tl.load(p + j * 5 + 3), tl.load(p + j * 5 + 4)
        gate = 1.0 / (1.0 + tl.exp(-c))
        q = 1.0 / (1.0 + tl.exp(-h))
        t = 2.0 / (1.0 + tl.exp(-2.0 * h)) - 1.0  # tanh
        g = p1 * t + p2 * tl.where(h < 0, 0.0, h) + p3 * q + p4 * h
        acc += (p1 + p2 + p3 + p4) * (1.0 - gate) * s + gate * g
    tl.store(x + offsets, acc, mask=inside)


def _rnn_mixed_node_backward_fn(
    grad, states, ch, p, grad_states, grad_ch, partials, n, B, H, BLOCK: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)
    offsets = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < B * H
    row, col = offsets // H, offsets % H
    d = tl.load(grad + offsets, mask=inside, other=0.0)
    for j in range(n):
        s = tl.load(states + j * B * H + offsets, mask=inside, other=0.0)
        c_at = (j * B + row) * 2 * H + col
        c = tl.load(ch + c_at, mask=inside, other=0.0)
        h = tl.load(ch + c_at + H, mask=inside, other=0.0)
        p1, p2 = tl.load(p + j * 5 + 1), tl.load(p + j * 5 + 2)
        p3, p4 = tl.load(p + j * 5 + 3), tl.load(p + j * 5 + 4)
        total = p1 + p2 + p3 + p4
        gate = 1.0 / (1.0 + tl.exp(-c))
        q = 1.0 / (1.0 + tl.exp(-h))
        t = 2.0 / (1.0 + tl.exp(-2.0 * h)) - 1.0
        r = tl.where(h < 0, 0.0, h)
        g = p1 * t + p2 * r + p3 * q + p4 * h
        keep = d * (1.0 - gate) * s
        dg = d * gate
        tl.store(grad_states + j * B * H + offsets, d * total * (1.0 - gate), mask=inside)
        tl.store(grad_ch + c_at, d * (g - total * s) * gate * (1.0 - gate), mask=inside)
        relu_slope = tl.where(h > 0, p2, 0.0)
        tl.store(grad_ch + c_at + H, dg * (p1 * (1.0 - t * t) + relu_slope + p3 * q * (1.0 - q) + p4), mask=inside)
        at = partials + (block * n + j) * 4
        tl.store(at, tl.reduce(keep + dg * t, 0, _ADD))
        tl.store(at + 1, tl.reduce(keep + dg * r, 0, _ADD))
        tl.store(at + 2, tl.reduce(keep + dg * q, 0, _ADD))
        tl.store(at + 3, tl.reduce(keep + dg * h, 0, _ADD))


_rnn_mixed_node_kernel = _Kernel(_rnn_mixed_node_fn)
_rnn_mixed_node_backward_kernel = _Kernel(_rnn_mixed_node_backward_fn)


@triton_op("fastdarts_triton::rnn_mixed_node", mutates_args=())
def _rnn_mixed_node_op(states: Tensor, ch: Tensor, p: Tensor) -> Tensor:
    check_rnn_mixed_node_arguments("rnn_mixed_node", states, ch, p, torch_check)
    check_supported_dtype("rnn_mixed_node", states)
    n, B, H = states.shape
    x = states.new_empty(B, H)
    if B * H > 0:
        grid = (_launch_blocks(B * H, ELEMENTWISE_BLOCK),)
        _rnn_mixed_node_kernel[grid](states.contiguous(), ch.contiguous(), p.contiguous(), x, n, B, H,
                                     BLOCK=ELEMENTWISE_BLOCK)  # fmt: skip
    return x


@triton_op("fastdarts_triton::rnn_mixed_node_backward", mutates_args=())
def _rnn_mixed_node_backward_op(grad: Tensor, states: Tensor, ch: Tensor, p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    op = "rnn_mixed_node_backward"
    check_rnn_mixed_node_arguments(op, states, ch, p, torch_check)
    check_supported_dtype(op, states)
    check_like(op, "grad", grad, "states[0]", states[0], torch_check)
    n, B, H = states.shape
    grad_states = torch.empty_like(states, memory_format=torch.contiguous_format)
    grad_ch = torch.empty_like(ch, memory_format=torch.contiguous_format)
    num_blocks = _launch_blocks(B * H, ELEMENTWISE_BLOCK)
    partials = states.new_zeros(num_blocks, n, RNN_OPS - 1)
    if B * H > 0:
        _rnn_mixed_node_backward_kernel[(num_blocks,)](
            grad.contiguous(), states.contiguous(), ch.contiguous(), p.contiguous(), grad_states, grad_ch, partials,
            n, B, H, BLOCK=ELEMENTWISE_BLOCK,
        )  # fmt: skip
    grad_p = torch.cat([partials.new_zeros(n, 1), partials.sum(dim=0)], dim=1)
    return grad_states, grad_ch, grad_p


def rnn_mixed_node(states: Tensor, ch: Tensor, p: Tensor) -> Tensor:
    """DARTS's recurrent mixed op for one node by the Triton kernel (CUDA; CPU under TRITON_INTERPRET=1)."""
    return torch.ops.fastdarts_triton.rnn_mixed_node.default(states, ch, p)


register_rnn_mixed_node_autograd("fastdarts_triton")
