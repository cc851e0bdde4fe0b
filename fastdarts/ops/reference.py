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

from collections.abc import Callable, Sequence

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
