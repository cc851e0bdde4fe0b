"""fastdarts::edge_group and edge_group_backward, the group of edges driven from C++ (csrc/cpu/edge_group.cpp): bit for
bit the results of the Python group (`_mixed_op.edge_group`) on the same C++ kernels, whose results test_mixed_ops.py
checks against the reference; in training and evaluation, both strides, with and without the pools' BNs, kept
tensors or a recomputation, every combination of requested gradients and an output left out of the loss; opcheck;
the errors of bad arguments."""

import pytest
import torch
from torch.library import opcheck

from ..conftest import requires_ext
from .test_mixed_op import ALL
from .test_mixed_ops import GROUP_CANDIDATES, make_group

pytestmark = requires_ext


def group_arguments(stride, training, pool_bn, keep, candidates=GROUP_CANDIDATES, dtype=torch.float32, shape=(2, 4, 7)):
    x, w, weights, bn_mean, bn_var = make_group(len(candidates), *shape, stride, dtype, pool_bn)
    x = x.detach().contiguous(memory_format=torch.channels_last)
    return (x, w.detach(), [t.detach() for ws in weights for t in ws], stride, [k for ks in candidates for k in ks],
            [len(ks) for ks in candidates], bn_mean, bn_var, training, 1e-5, pool_bn, keep)  # fmt: skip


def python_group():
    from fastdarts.ops._mixed_op import cpp_kernels, edge_group

    return edge_group(cpp_kernels)


def assert_identical(got, want, what):
    assert len(got) == len(want), what
    for i, (g, r) in enumerate(zip(got, want)):
        if r is None or isinstance(r, list):
            assert (g is None) == (r is None), f"{what}[{i}]"
            if isinstance(r, list):
                assert_identical(g, r, f"{what}[{i}]")
            continue
        assert torch.equal(g, r), f"{what}[{i}] differs by {(g - r).abs().max().item()}"
        assert g.stride() == r.stride(), f"{what}[{i}]: strides {g.stride()} against {r.stride()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep"])
@pytest.mark.parametrize("pool_bn", [True, False], ids=["pool-bn", "no-pool-bn"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
def test_equals_the_python_group(stride, training, pool_bn, keep, dtype):
    args = group_arguments(stride, training, pool_bn, keep, dtype=dtype)
    forward, backward = python_group()
    want = forward(*args)
    got = torch.ops.fastdarts.edge_group(*args)
    assert_identical(list(got), list(want), "forward")
    _, mean, var, saved = want
    generator = torch.Generator().manual_seed(3)
    grads = [torch.randn(out.shape, dtype=dtype, generator=generator) for out in want[0]]
    grads[1] = None  # an output left out of the loss
    x, w, weights, stride, candidates, counts = args[:6]
    for flags in [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]:
        backward_args = (grads, x, w, weights, stride, candidates, counts, mean, var, training, 1e-5, pool_bn, saved,
                         *flags)  # fmt: skip
        assert_identical(
            list(torch.ops.fastdarts.edge_group_backward(*backward_args)),
            list(backward(*backward_args)),
            f"backward {flags}",
        )


@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep"])
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
def test_opcheck(stride, keep):
    args = group_arguments(stride, True, True, keep, candidates=[ALL, [1, 4]], shape=(2, 4, 5))
    opcheck(torch.ops.fastdarts.edge_group.default, args)
    _, mean, var, saved = torch.ops.fastdarts.edge_group(*args)
    x, w, weights, stride, candidates, counts = args[:6]
    grads = [torch.randn_like(x[:, :, ::stride, ::stride]) for _ in range(2)]
    backward_args = (grads, x, w, weights, stride, candidates, counts, mean, var, True, 1e-5, True, saved, True,
                     True, True)  # fmt: skip
    opcheck(torch.ops.fastdarts.edge_group_backward.default, backward_args)


def test_refuses_differentiation():
    x, w, *rest = group_arguments(1, True, True, False)
    with pytest.raises(RuntimeError, match="call that"):
        outs, *_ = torch.ops.fastdarts.edge_group(x, w.requires_grad_(), *rest)
        outs[0].sum().backward()


@pytest.mark.parametrize(
    "position,value,message",
    [
        (1, torch.ones(4), r"w must be \[E, K\] with E >= 1"),
        (3, 3, "stride must be 1 or 2"),
        (5, [7, 3, 0], "4 edges need one candidate count each"),
        (4, [0, 1, 2, 3, 4, 5, 9] + [0, 3, 6] + [1, 2, 5], r"candidates must be in \[0, 7\), got 9"),
        (4, [0, 1, 2, 3, 4, 5, 6] + [0, 6, 3] + [1, 2, 5], "edge 1's candidates must be increasing, got \\[0, 6, 3\\]"),
        (2, [], "4 edges at stride 1 take 48 conv weights, got 0"),
        (6, None, "evaluation .* needs bn_mean and bn_var"),
    ],
    ids=["w-not-2d", "stride", "counts", "candidate", "unsorted", "weights", "eval-without-statistics"],
)
def test_bad_arguments(position, value, message):
    args = list(group_arguments(1, position != 6, True, False))
    args[position] = value
    with pytest.raises(ValueError, match=message):
        torch.ops.fastdarts.edge_group(*args)


def test_backward_needs_a_gradient_per_edge():
    args = group_arguments(1, True, True, False)
    _, mean, var, _ = torch.ops.fastdarts.edge_group(*args)
    x, w, weights, stride, candidates, counts = args[:6]
    with pytest.raises(ValueError, match="4 edges need one output gradient"):
        torch.ops.fastdarts.edge_group_backward(
            [None], x, w, weights, stride, candidates, counts, mean, var, True, 1e-5, True, [], True, True, True
        )


def test_backward_needs_what_the_forward_kept():
    args = group_arguments(1, True, True, True)
    _, mean, var, saved = torch.ops.fastdarts.edge_group(*args)
    x, w, weights, stride, candidates, counts = args[:6]
    with pytest.raises(ValueError, match=f"saved holds 1 tensors, the group's edges keep {len(saved)}"):
        torch.ops.fastdarts.edge_group_backward(
            [None] * 4, x, w, weights, stride, candidates, counts, mean, var, True, 1e-5, True, saved[:1], True, True,
            True,
        )  # fmt: skip


def test_statistics_of_the_wrong_shape():
    args = list(group_arguments(1, False, True, False))
    args[6] = args[6][:, :3]
    with pytest.raises(ValueError, match=r"bn_mean must have shape \[4, 8, 4\] \(\[E, B, C\]\), got \[4, 3, 4\]"):
        torch.ops.fastdarts.edge_group(*args)
