"""The kernel layer: one public function per fused op, dispatched to a backend per call.

Every op has a pure-PyTorch reference (`fastdarts.ops.reference`) and a C++ CPU kernel; choose
with the `backend=` argument, the `use_backend(...)` context manager or `FASTDARTS_BACKEND`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._extension import EXTENSION_LOADED
from ._registry import BACKENDS, available_backends, resolve, use_backend

__all__ = ["BACKENDS", "EXTENSION_LOADED", "available_backends", "use_backend", "weighted_sum"]


def weighted_sum(xs: Sequence[torch.Tensor], w: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """`out = sum_k w[k] * xs[k]`: the mixed-op weighted sum of K same-shaped tensors.

    `w` is 1-D of length K, with the dtype and device of `xs`. Differentiable in every `xs[k]`
    and in `w`.
    """
    return resolve("weighted_sum", xs[0].device if len(xs) else w.device, backend)(xs, w)
