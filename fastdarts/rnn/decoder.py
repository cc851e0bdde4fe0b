"""The decoder and its loss in one: `cross_entropy(x @ W.T + b, targets)` without keeping the logits.

Autograd of the plain composition keeps the `(T*B, V)` logits, or their log-softmax: 342 MiB at DARTS's search size
(35 x 256 x 10,000 floats), a quarter of what the fused search cell keeps (RNN.md 4.4). This function keeps x and
the targets, and remakes the logits block by block of rows in the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ROWS_PER_BLOCK = 1024  # logits of a block: 1024 x V floats, 39 MiB at V = 10,000


class LinearCrossEntropy(torch.autograd.Function):
    """The mean over rows of `logsumexp(z) - z[target]`, `z = x @ weight.T + bias`; also the rows whose argmax is
    their target (not differentiable)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        lse, picked, correct = [], [], x.new_zeros((), dtype=torch.long)
        for start in range(0, len(x), ROWS_PER_BLOCK):
            z = torch.addmm(bias, x[start : start + ROWS_PER_BLOCK], weight.T)
            t = targets[start : start + ROWS_PER_BLOCK]
            lse.append(torch.logsumexp(z, dim=1))
            picked.append(z.gather(1, t[:, None])[:, 0])
            correct += (z.argmax(dim=1) == t).sum()
        lse = torch.cat(lse)
        ctx.save_for_backward(x, weight, bias, targets)
        ctx.mark_non_differentiable(correct)
        return (lse - torch.cat(picked)).mean(), correct

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_correct):
        # Out of place throughout, so that the backward is itself differentiable (create_graph=True).
        x, weight, bias, targets = ctx.saved_tensors
        needs_x, needs_weight, needs_bias, _ = ctx.needs_input_grad
        grad_x, grad_weight, grad_bias = [], 0, 0
        scale = grad / len(x)
        for start in range(0, len(x), ROWS_PER_BLOCK):
            rows = slice(start, start + ROWS_PER_BLOCK)
            z = torch.addmm(bias, x[rows], weight.T)
            softmax = torch.softmax(z, dim=1)  # recomputed, so that a second derivative sees it depend on x
            dz = (softmax - F.one_hot(targets[rows], z.shape[1]).to(z.dtype)) * scale
            if needs_x:
                grad_x.append(dz @ weight)
            if needs_weight:
                grad_weight = grad_weight + dz.T @ x[rows]
            if needs_bias:
                grad_bias = grad_bias + dz.sum(dim=0)
        return (torch.cat(grad_x) if needs_x else None, grad_weight if needs_weight else None,
                grad_bias if needs_bias else None, None)  # fmt: skip


def linear_cross_entropy(x: Tensor, weight: Tensor, bias: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """`(F.cross_entropy(F.linear(x, weight, bias), targets), correctly predicted rows)`, keeping no logits."""
    return LinearCrossEntropy.apply(x, weight, bias, targets)
