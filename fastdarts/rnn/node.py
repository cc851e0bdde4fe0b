"""One searched node of the recurrent cell, fused: `x_n` from the predecessors' states in one matmul and one
ops.rnn_mixed_node, with a backward that keeps only what cannot be remade cheaply (RNN.md 4.4).

Autograd of the plain composition would keep, per node, the stacked states, their masked copy (for the matmul) and
the pre-activations ch, besides the states themselves, which their producers keep anyway. This function keeps the
states (no copy), ch and p; the backward restacks and remasks the states, which costs two elementwise passes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops


def mixed_node_backward(backend: str, grad: Tensor, states: Tensor, ch: Tensor, p: Tensor) -> tuple[Tensor, ...]:
    """The gradients of ops.rnn_mixed_node(states, ch, p) on `backend`, for the output gradient `grad`."""
    if backend == "cpp":
        return torch.ops.fastdarts.rnn_mixed_node_backward.default(grad, states, ch, p)
    if backend == "triton":
        return torch.ops.fastdarts_triton.rnn_mixed_node_backward.default(grad, states, ch, p)
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (states, ch, p)]
        return torch.autograd.grad(ops.rnn_mixed_node(*inputs, backend="reference"), inputs, grad)


class FusedNode(torch.autograd.Function):
    """`x_n = rnn_mixed_node(S, (S * m_h) @ W, p)` with S the stacked `states` `(B, H)` each; W `(H, 2H)`."""

    @staticmethod
    def forward(ctx, p: Tensor, W: Tensor, h_mask: Tensor | None, *states: Tensor) -> Tensor:
        stacked = torch.stack(states)
        masked = stacked if h_mask is None else stacked * h_mask
        ch = (masked.view(-1, W.shape[0]) @ W).view(len(states), *stacked.shape[1:-1], W.shape[1])
        ctx.backend = ops.select("rnn_mixed_node", stacked.device)
        ctx.save_for_backward(p, W, h_mask, ch, *states)
        return ops.rnn_mixed_node(stacked, ch, p, backend=ctx.backend)

    @staticmethod
    def backward(ctx, grad: Tensor):
        p, W, h_mask, ch, *states = ctx.saved_tensors
        needs_p, needs_W, _, *needs_states = ctx.needs_input_grad
        stacked = torch.stack(states)
        grad_states, grad_ch, grad_p = mixed_node_backward(ctx.backend, grad.contiguous(), stacked, ch, p)
        grad_ch = grad_ch.view(-1, W.shape[1])
        grad_W = None
        if needs_W:  # skipped in the alpha-only passes, whose weights are frozen
            masked = stacked if h_mask is None else stacked * h_mask
            grad_W = masked.view(-1, W.shape[0]).T @ grad_ch
        if any(needs_states):
            through_matmul = (grad_ch @ W.T).view_as(stacked)
            grad_states = grad_states + (through_matmul if h_mask is None else through_matmul * h_mask)
            grads = list(grad_states.unbind(0))
        else:
            grads = [None] * len(states)
        return (grad_p if needs_p else None), grad_W, None, *grads
