"""The mixed op on the Triton kernels ("triton") against the reference, under Triton's interpreter: outputs,
statistics and every gradient over odd shapes, both strides, training and evaluation, candidate subsets; opcheck,
what it saves and which gradients it computes, its errors, and that it needs no C++ extension.

The interpreter runs a 5x5 depthwise conv in about 40 ms per (image, channel) plane, so the shapes are few and small.
"""

import json

import pytest
import torch
from torch.library import opcheck

# test_triton first: it sets TRITON_INTERPRET while fastdarts (and triton) import, when this module runs alone. Its
# autouse fixture `interpret` and its skip `pytestmark` apply here too.
from .test_triton import interpret, pytestmark  # noqa: F401

# isort: split
from fastdarts import ops
from fastdarts.ops import _registry

from ..test_registry import run_python
from .test_mixed_cell import check_cell
from .test_mixed_op import (
    ALL,
    assert_agrees_with_reference,
    check_candidate_subset,
    check_computes_only_the_gradients_asked_for,
    check_double_backward_is_refused,
    check_saves_only_the_input_the_weights_and_the_statistics,
    make_inputs,
)
from .test_mixed_ops import check_group
from .test_partial_channels import check_partial_group


def test_dispatch():
    assert _registry.select("mixed_op", torch.device("cuda")) == "triton"
    assert "triton" in ops.available_backends("mixed_op", "cpu")


# (N, C, S), stride, training, layout: batch 1 and 3, C 4 and 5, 7x7 and 9x9, both strides, both modes and layouts.
CASES = [
    ((1, 5, 7), 1, True, torch.contiguous_format),
    ((3, 5, 9), 1, False, torch.channels_last),
    ((1, 4, 9), 2, False, torch.contiguous_format),
    ((3, 4, 7), 2, True, torch.channels_last),
]


@pytest.mark.parametrize(
    "shape,stride,training,layout",
    CASES,
    ids=[f"{'x'.join(map(str, s))}-stride{st}-{'train' if t else 'eval'}" for s, st, t, _ in CASES],
)
def test_triton_equals_reference(shape, stride, training, layout):
    x, w, weights, bn_mean, bn_var = make_inputs(*shape, stride, layout=layout)
    assert_agrees_with_reference("triton", x, w, weights, stride, ALL, bn_mean, bn_var, training)


SUBSETS = [([0, 1], 1), ([0, 1], 2), ([2], 1), ([2], 2), ([3], 1), ([6], 2), ([1, 3, 5], 1), ([], 2)]


@pytest.mark.parametrize(
    "candidates,stride", SUBSETS, ids=[f"{'-'.join(map(str, c)) or 'none'}-stride{s}" for c, s in SUBSETS]
)
def test_candidate_subsets(candidates, stride):
    check_candidate_subset("triton", candidates, stride, 2, 4, 7)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
def test_pools_without_bn(stride, training):
    x, w, weights, bn_mean, bn_var = make_inputs(2, 4, 7, stride, pool_bn=False)
    assert_agrees_with_reference("triton", x, w, weights, stride, [0, 1, 2], bn_mean, bn_var, training, pool_bn=False)


@pytest.mark.parametrize(
    "op,stride,training,pool_bn,recompute",
    [("mixed_ops", 2, True, True, False), ("mixed_ops_backward", 1, False, False, True)],
    ids=["forward-no-recompute", "backward-no-pool-bn"],
)
def test_opcheck(op, stride, training, pool_bn, recompute):
    x, w, weights, bn_mean, bn_var = make_inputs(1, 2, 5, stride, pool_bn=pool_bn)
    # Two edges: a pool, the skip and a conv (each kind of candidate, on the cheapest kernels), then the other pool.
    candidates, counts = [0, 2, 5, 1], [3, 1]
    args = (x, torch.stack([w, w]), weights + weights, stride, candidates, counts, torch.stack([bn_mean, bn_mean]),
            torch.stack([bn_var, bn_var]), training, 1e-5, pool_bn, recompute)  # fmt: skip
    if op == "mixed_ops_backward":
        outs, mean, var, saved = torch.ops.fastdarts_triton.mixed_ops.default(*args)
        args = ([torch.randn_like(out) for out in outs], x.detach(), args[1].detach(), [t.detach() for t in args[2]],
                stride, candidates, counts, mean, var, training, 1e-5, pool_bn, saved, True, True, True)  # fmt: skip
    opcheck(getattr(torch.ops.fastdarts_triton, op).default, args)


@pytest.mark.parametrize("wants", [("x", "w"), ("x", "weights"), ("w",)], ids=["arch_step", "weight_step", "w"])
def test_computes_only_the_gradients_asked_for(wants):
    check_computes_only_the_gradients_asked_for("triton", wants, 1, 2, 5)


def test_saves_only_the_input_the_weights_and_the_statistics():
    x, w, weights, _, _ = make_inputs(1, 4, 6, 1, layout=torch.channels_last)
    check_saves_only_the_input_the_weights_and_the_statistics("triton", x, w, weights)


def test_double_backward_is_refused_with_a_clear_error():
    check_double_backward_is_refused("triton", *make_inputs(1, 2, 5, 1)[:3], [0, 2])


@pytest.mark.parametrize(
    "change,error,message",
    [
        (dict(stride=3), ValueError, "mixed_op: stride must be 1 or 2"),
        (dict(dtype=torch.float16), TypeError, "mixed_op: only float32 and float64 are supported"),
    ],
    ids=["stride", "float16"],
)
def test_bad_arguments(change, error, message):
    x, w, weights, _, _ = make_inputs(1, 2, 5, 1)
    dtype = change.get("dtype", torch.float32)
    x, w, weights = x.detach().to(dtype), w.detach().to(dtype), [t.detach().to(dtype) for t in weights]
    with pytest.raises(error, match=message):
        ops.mixed_op(x, w, weights, change.get("stride", 1), backend="triton")


def test_runs_without_the_cpp_extension():
    code = """
        import json, sys, torch
        sys.modules["fastdarts._C"] = None  # what a user without a C++ build gets
        from fastdarts import ops
        from fastdarts.ops import reference
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1, 2, 5, 5, generator=generator).requires_grad_()
        w = torch.randn(7, generator=generator).softmax(0).requires_grad_()
        shapes = ops.mixed_op_weight_shapes(2, 2)
        weights = [(0.5 * torch.randn(s, generator=generator)).requires_grad_() for s in shapes]
        errors = []
        results = [ops.mixed_op(x, w, weights, 2, backend="triton"), reference.mixed_op(x, w, weights, 2)]
        grad_out = torch.randn(results[1][0].shape, generator=generator)
        grads = [torch.autograd.grad(r[0], [x, w, *weights], grad_out) for r in results]
        for got, want in zip([*results[0], *grads[0]], [*results[1], *grads[1]]):
            errors.append(((got - want).abs().max() / want.abs().max().clamp(min=1e-6)).item())
        print(json.dumps({"loaded": ops.EXTENSION_LOADED, "available": ops.available_backends("mixed_op", "cpu"),
                          "error": max(errors)}))
    """
    result = run_python(code, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["loaded"] is False and report["available"] == ["reference", "triton"]
    assert report["error"] < 1e-3


@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
def test_group_of_edges_equals_reference(stride):
    # Three edges leaving one state: a pool, the skip and a dil conv; the other pool; nothing.
    check_group("triton", (1, 2, 5), stride, True, candidates=[[0, 2, 5], [1], []])


@pytest.mark.parametrize("stride,K", [(1, 2), (2, 4)], ids=["stride1-K2", "stride2-K4"])
def test_partial_channel_group_equals_reference(stride, K):
    # The slice, the bypass and the shuffle are ATen ops inside the group op, around the Triton kernels.
    check_partial_group("triton", (1, 2 * K, 5), stride, K, candidates=[[0, 2, 5], [1]])


@pytest.mark.parametrize("stride", [1, 2], ids=["normal", "reduction"])
def test_cell_equals_reference(stride):
    # A cell of two nodes: node 0 <- s0 (a pool, the skip), s1 (a dil conv); node 1 <- s0 (nothing), s1 (the other
    # pool), node 0 (the skip).
    candidates = [[0, 2], [5], [], [1], [2]]
    check_cell("triton", 2, (1, 2, 5), stride, "subsets", dtype=torch.float32, candidates=candidates)


def test_partial_channel_cell_equals_reference():
    # A one-node cell of partial channels (K = 2) and edge scales, reduction: a pool and the skip; a dil conv.
    check_cell("triton", 1, (1, 4, 5), 2, "subsets", dtype=torch.float32, candidates=[[0, 2], [5]], scale=True,
               partial_channels=2)  # fmt: skip
