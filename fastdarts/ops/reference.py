"""Pure-PyTorch reference of every fastdarts op: the specification, the fallback, and what tests
and benchmarks compare the kernels against."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def weighted_sum(xs: Sequence[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """`out = sum_k w[k] * xs[k]` for K same-shaped tensors `xs` and a 1-D `w` of length K."""
    if len(xs) == 0:
        raise ValueError("weighted_sum: xs must not be empty")
    if w.dim() != 1 or w.shape[0] != len(xs):
        raise ValueError(f"weighted_sum: w must have shape [{len(xs)}] (one weight per tensor), got {list(w.shape)}")
    out = w[0] * xs[0]
    for k in range(1, len(xs)):
        out = out + w[k] * xs[k]
    return out
