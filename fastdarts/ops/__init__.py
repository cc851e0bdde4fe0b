"""The kernel layer: one function per fused op, each call dispatched to a backend.

Every op has a pure-PyTorch reference (`fastdarts.ops.reference`, the specification) and a C++
CPU kernel (`fastdarts._C`). CPU tensors run the C++ kernel when it is built, everything else
the reference; `backend=`, `use_backend(...)` and FASTDARTS_BACKEND override that (`_registry`
holds the rules). Every op is differentiable and traces under torch.compile(fullgraph=True).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ._extension import EXTENSION_ERROR, EXTENSION_LOADED
from ._registry import BACKENDS, available_backends, dispatch, use_backend

__all__ = ["BACKENDS", "EXTENSION_ERROR", "EXTENSION_LOADED", "available_backends", "use_backend", "weighted_sum"]


def weighted_sum(xs: Sequence[Tensor], w: Tensor, *, backend: str | None = None) -> Tensor:
    """`out = sum_k w[k] * xs[k]`: the DARTS mixed-op sum of K candidate outputs.

    Args:
        xs: K >= 1 tensors of one shape (any), dtype and device. The output takes the memory
            layout of `xs[0]` (channels_last stays channels_last).
        w: shape [K], the dtype and device of `xs`; typically a softmax of architecture weights.
        backend: "reference" or "cpp" for this call; None follows `use_backend`, then
            FASTDARTS_BACKEND, then the device ("cpp" for CPU tensors when built).

    Differentiable in every `xs[k]` (`w[k] * grad`) and in `w` (`sum(grad * xs[k])`), twice.
    Raises ValueError for an empty list, mismatched shapes or devices, or `w` not of shape [K];
    TypeError for mismatched dtypes (and, on "cpp", dtypes other than float32/float64).
    """
    return dispatch("weighted_sum", w.device, backend)(xs, w)
