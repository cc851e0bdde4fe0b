"""A DARTS cell as one op (`ops.mixed_cell`): the fused cell against the reference (each state's `mixed_ops`, the
nodes added in turn) in nodes, statistics and every gradient, odd sides, both strides (a normal and a reduction
cell), PR-DARTS-like subsets with edges and a whole group left out, a node no edge feeds, training and evaluation,
with and without recomputation, an edge scale; float64 gradcheck; fastdarts::edge_cell and edge_cell_backward (the
cell driven from C++) bit for bit the Python composition `_mixed_op.edge_cell` on the same C++ group ops; opcheck;
torch.compile with fullgraph; its errors. The Triton cell runs the same check in test_triton_mixed_op.py."""

import pytest
import torch
from torch.library import opcheck

from fastdarts import ops
from fastdarts.ops.reference import cell_edge_count, cell_statistics_rows, edge_index, mixed_op_weight_shapes

from ..conftest import requires_ext
from ._helpers import assert_gradients_close
from .test_edge_group import assert_identical
from .test_mixed_op import ALL, TOLERANCES


def cell_candidates(steps, kind, seed=0):
    """Per edge, its candidates: every op; or PR-DARTS-like subsets of 0-3 ops with edges left out; or subsets with
    node 0 fed by no edge and feeding none; or subsets with no edge leaving s0."""
    E = cell_edge_count(steps)
    if kind == "every-op":
        return [ALL] * E
    generator = torch.Generator().manual_seed(seed)
    candidates = [sorted(torch.randperm(7, generator=generator)[: int(n)].tolist())
                  for n in torch.randint(0, 4, (E,), generator=generator)]  # fmt: skip
    candidates[1] = [2, 3]
    leave_out = []
    if kind == "empty-node":
        leave_out = [0, 1] + [edge_index(node, 2) for node in range(1, steps)]
    if kind == "unused-input":
        leave_out = [edge_index(node, 0) for node in range(steps)]
    for e in leave_out:
        candidates[e] = []
    return candidates


def make_cell(steps, N, C, S, stride, candidates, dtype=torch.float64, training=True, scale=False, pool_bn=True,
              partial_channels=1):  # fmt: skip
    generator = torch.Generator().manual_seed(1)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=dtype, generator=generator) * scale).requires_grad_()

    s0, s1 = randn(N, C, S, S), randn(N, C, S, S)
    E = cell_edge_count(steps)
    w = torch.randn(E, 7, dtype=dtype, generator=generator).softmax(-1).requires_grad_()
    width = C // partial_channels  # the channels the ops compute on
    weights = [[randn(*shape, scale=0.3) for shape in mixed_op_weight_shapes(width, stride if state < 2 else 1)]
               for node in range(steps) for state in range(node + 2)]  # fmt: skip
    bn_mean = bn_var = None
    if not training:
        R = cell_statistics_rows(steps, stride, candidates, pool_bn)
        bn_mean = torch.randn(R, width, dtype=dtype, generator=generator) * 0.1
        bn_var = torch.rand(R, width, dtype=dtype, generator=generator) + 0.5
    edge_scale = torch.rand(E, dtype=dtype, generator=generator).requires_grad_() if scale else None
    return s0, s1, w, weights, bn_mean, bn_var, edge_scale


def run_cell(backend, steps, stride, candidates, s0, s1, w, weights, bn_mean, bn_var, edge_scale, training=True,
             recompute=True, pool_bn=True, partial_channels=1):  # fmt: skip
    """(nodes, mean, var, gradients of s0, s1, w, the scale if any and every weight) for a loss over every node."""
    nodes, mean, var = ops.mixed_cell(s0, s1, w, weights, steps, stride, candidates, bn_mean, bn_var, training,
                                      pool_bn=pool_bn, recompute=recompute, partial_channels=partial_channels,
                                      scale=edge_scale, backend=backend)  # fmt: skip
    generator = torch.Generator().manual_seed(7)
    loss = sum((node * torch.randn(node.shape, dtype=node.dtype, generator=generator)).sum() for node in nodes)
    inputs = [s0, s1, w, *([] if edge_scale is None else [edge_scale]), *(t for ws in weights for t in ws)]
    return nodes, mean, var, list(torch.autograd.grad(loss, inputs, allow_unused=True))


def check_cell(backend, steps, shape, stride, kind, training=True, recompute=True, scale=False, dtype=torch.float64,
               candidates=None, partial_channels=1):  # fmt: skip
    candidates = cell_candidates(steps, kind) if candidates is None else candidates
    cell = make_cell(steps, *shape, stride, candidates, dtype, training, scale, partial_channels=partial_channels)
    args = (steps, stride, candidates, *cell)
    got, want = (run_cell(backend, *args, training, recompute, partial_channels=partial_channels)
                 for backend in (backend, "reference"))  # fmt: skip
    tol = TOLERANCES[dtype]
    for g, r in zip(got[0], want[0]):
        torch.testing.assert_close(g, r, **tol["out"])
        assert g.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got[1], want[1], **tol["out"])
    torch.testing.assert_close(got[2], want[2], **tol["out"])
    assert (got[3][0] is None) == (kind == "unused-input")  # no gradient for an input no computed edge leaves
    assert_gradients_close(got[3], want[3], tol["grad"])


SHAPES = [(2, 4, 7), (1, 6, 8), (3, 6, 5)]  # a reduction cell's FactorizedReduce needs an even C


@requires_ext
@pytest.mark.parametrize("kind", ["every-op", "subsets", "empty-node", "unused-input"])
@pytest.mark.parametrize("stride", [1, 2], ids=["normal", "reduction"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_cell_equals_reference(shape, stride, kind):
    check_cell("cpp", 4, shape, stride, kind)


@requires_ext
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "keep"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2], ids=["normal", "reduction"])
def test_cell_in_training_and_evaluation_with_and_without_recomputation(stride, training, recompute):
    check_cell("cpp", 3, (2, 4, 7), stride, "subsets", training, recompute)


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_cell_with_an_edge_scale(dtype):
    check_cell("cpp", 2, (2, 4, 6), 1, "every-op", scale=True, dtype=dtype)


@requires_ext
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "keep"])
@pytest.mark.parametrize("stride,K", [(1, 2), (2, 2), (2, 4)], ids=["normal-K2", "reduction-K2", "reduction-K4"])
def test_cell_with_partial_channels(stride, K, recompute):
    """PC-DARTS's cell: every edge on its state's first C/K channels, the rest bypassing it, with the edge scale."""
    check_cell("cpp", 3, (2, 8, 7), stride, "subsets", recompute=recompute, scale=True, partial_channels=K)


@requires_ext
@pytest.mark.parametrize("stride", [1, 2], ids=["normal", "reduction"])
def test_gradcheck_float64(stride):
    candidates = [[0, 3], [1, 2, 5], [2, 4]]  # a one-node cell: two edges from the inputs, none from nodes
    s0, s1, w, weights, _, _, scale = make_cell(1, 2, 4, 5, stride, candidates, scale=True)
    flat = [t for ws in weights for t in ws]

    def nodes(s0, s1, w, scale, *flat_weights):
        per_edge = [list(flat_weights[: len(weights[0])]), list(flat_weights[len(weights[0]) :])]
        return ops.mixed_cell(s0, s1, w, per_edge, 1, stride, candidates[:2], scale=scale, backend="cpp")[0][0]

    assert torch.autograd.gradcheck(nodes, (s0, s1, w, scale, *flat), eps=1e-6, atol=1e-5)


def edge_cell_arguments(steps, stride, kind, training, keep, dtype=torch.float32, partial_channels=1):
    candidates = cell_candidates(steps, kind, seed=3)
    s0, s1, w, weights, bn_mean, bn_var, scale = make_cell(steps, 2, 4 * partial_channels, 7, stride, candidates,
                                                           dtype, training, scale=partial_channels > 1,
                                                           partial_channels=partial_channels)  # fmt: skip
    s0, s1 = (s.detach().contiguous(memory_format=torch.channels_last) for s in (s0, s1))
    partial = (partial_channels, scale.detach()) if partial_channels > 1 else ()
    return (s0, s1, w.detach(), [t.detach() for ws in weights for t in ws], steps, stride,
            [k for ks in candidates for k in ks], [len(ks) for ks in candidates], bn_mean, bn_var, training, 1e-5,
            True, keep, *partial)  # fmt: skip


def python_cell():
    from fastdarts.ops._mixed_op import cpp_kernels, edge_cell

    return edge_cell(torch.ops.fastdarts.edge_group.default, torch.ops.fastdarts.edge_group_backward.default,
                     cpp_kernels)  # fmt: skip


@requires_ext
@pytest.mark.parametrize("kind", ["every-op", "subsets", "empty-node", "unused-input", "partial-channels"])
@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2], ids=["normal", "reduction"])
def test_edge_cell_equals_the_python_cell(stride, training, keep, kind):
    K = 2 if kind == "partial-channels" else 1
    args = edge_cell_arguments(4, stride, "subsets" if K > 1 else kind, training, keep, partial_channels=K)
    forward, backward = python_cell()
    want = forward(*args)
    assert_identical(list(torch.ops.fastdarts.edge_cell(*args)), list(want), "forward")
    nodes, mean, var, saved = want
    generator = torch.Generator().manual_seed(3)
    grads = [torch.randn(node.shape, generator=generator).contiguous(memory_format=torch.channels_last)
             for node in nodes]  # fmt: skip
    grads[1] = None  # a node left out of the loss: its gradient is only what its own edges send back
    s0, s1, w, weights, steps, stride, candidates, counts = args[:8]
    partial = (K, args[15], True) if K > 1 else ()  # partial channels, bypass_w and its gradient
    for flags in [(True, True, True, True), (False, False, True, False), (True, True, False, True)]:
        backward_args = (grads, s0, s1, nodes, w, weights, steps, stride, candidates, counts, mean, var, training,
                         1e-5, True, saved, *flags, *partial)  # fmt: skip
        assert_identical(
            list(torch.ops.fastdarts.edge_cell_backward(*backward_args)),
            list(backward(*backward_args)),
            f"backward {flags}",
        )


@requires_ext
@pytest.mark.parametrize("K", [1, 2], ids=["all-channels", "partial-channels"])
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "keep"])
@pytest.mark.parametrize("stride", [1, 2], ids=["normal", "reduction"])
def test_opcheck(stride, recompute, K):
    args = list(edge_cell_arguments(2, stride, "subsets", True, not recompute, partial_channels=K))
    edge_cell_args = tuple(args)
    args[13] = recompute
    opcheck(torch.ops.fastdarts.mixed_cell.default, tuple(args))
    nodes, mean, var, saved = torch.ops.fastdarts.mixed_cell.default(*args)
    s0, s1, w, weights, steps, stride, candidates, counts = args[:8]
    grads = [torch.randn_like(node) for node in nodes]
    partial = (K, args[15], True) if K > 1 else ()
    backward_args = (grads, s0, s1, nodes, w, weights, steps, stride, candidates, counts, mean, var, True, 1e-5, True,
                     saved, True, True, True, True, *partial)  # fmt: skip
    opcheck(torch.ops.fastdarts.mixed_cell_backward.default, backward_args)
    opcheck(torch.ops.fastdarts.edge_cell.default, edge_cell_args)
    opcheck(torch.ops.fastdarts.edge_cell_backward.default, backward_args)


@requires_ext
def test_compile_fullgraph_matches_eager():
    candidates = cell_candidates(2, "subsets")
    s0, s1, w, weights, _, _, _ = make_cell(2, 2, 4, 6, 1, candidates, torch.float32)

    def cell(s0, s1, w):
        nodes, _, _ = ops.mixed_cell(s0, s1, w, weights, 2, 1, candidates, backend="cpp")
        return nodes[0] + nodes[1]

    torch._dynamo.reset()
    want = cell(s0, s1, w)
    got = torch.compile(cell, fullgraph=True, backend="aot_eager")(s0, s1, w)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, r in zip(torch.autograd.grad(got.square().sum(), [s0, s1, w]),
                    torch.autograd.grad(want.square().sum(), [s0, s1, w])):  # fmt: skip
        torch.testing.assert_close(g, r, rtol=0, atol=0)


@requires_ext
def test_refuses_differentiation_of_the_inside():
    s0, s1, w, *rest = edge_cell_arguments(1, 1, "every-op", True, False)
    with pytest.raises(RuntimeError, match="inside of fastdarts.ops.mixed_cell"):
        nodes, *_ = torch.ops.fastdarts.edge_cell(s0, s1, w.requires_grad_(), *rest)
        nodes[0].sum().backward()


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
@pytest.mark.parametrize(
    "change,message",
    [
        (dict(steps=0), "steps must be an integer >= 1, got 0"),
        (dict(stride=3), "stride must be 1 or 2, got 3"),
        (dict(w=torch.ones(9, 7)), r"a cell of 2 nodes has 5 edges: w must have shape \[5, K\], got \[9, 7\]"),
        (dict(s1=torch.ones(2, 4, 6, 6)), "s0 and s1 must have the same shape"),
        (dict(candidates=[ALL] * 4), "5 edges need 5 weight lists and 5 candidate lists, got 5 and 4"),
        (dict(training=False), r"evaluation needs bn_mean of shape \[\d+, 4\]"),
        (dict(candidates=[[9]] * 5), r"candidates must be .*got \[9\]"),
    ],
    ids=["steps", "stride", "w", "s1", "candidates", "evaluation", "candidate"],
)
def test_bad_arguments(backend, change, message):
    candidates = [ALL] * 5
    s0, s1, w, weights, _, _, _ = make_cell(2, 2, 4, 7, 1, candidates, torch.float32)
    args = dict(s0=s0, s1=s1, w=w, weights=weights, steps=2, stride=1, candidates=candidates, training=True)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        ops.mixed_cell(**args, backend=backend)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
def test_a_reduction_cell_of_odd_channels_is_refused(backend):
    candidates = [ALL] * 5
    s0, s1, w, weights, _, _, _ = make_cell(2, 2, 5, 7, 2, candidates, torch.float32)
    with pytest.raises(ValueError, match="even"):
        ops.mixed_cell(s0, s1, w, weights, 2, 2, candidates, backend=backend)


@requires_ext
def test_edge_cell_checks_its_flat_arguments():
    args = list(edge_cell_arguments(2, 1, "every-op", True, True))
    _, mean, var, saved = torch.ops.fastdarts.edge_cell(*args)
    bad = {6: [0] * 5, 7: [7, 7, 7, 7], 3: args[3][:-1], 4: 0}
    messages = {6: "5 edges need one candidate count each", 7: "5 edges need one candidate count each",
                3: "the cell's edges take 60 conv weights, got 59", 4: "steps must be >= 1, got 0"}  # fmt: skip
    for position, value in bad.items():
        changed = list(args)
        changed[position] = value
        with pytest.raises(ValueError, match=messages[position]):
            torch.ops.fastdarts.edge_cell(*changed)
    changed = list(args)
    changed[6] = [9] + args[6][1:]
    with pytest.raises(ValueError, match=r"candidates must be in \[0, 7\), got 9"):
        torch.ops.fastdarts.edge_cell(*changed)
    s0, s1, w, weights, steps, stride, candidates, counts = args[:8]
    nodes = [torch.zeros_like(s0)] * 2
    cell = (s0, s1, nodes, w, weights, steps, stride, candidates, counts)
    with pytest.raises(ValueError, match=f"saved holds 1 tensors, the cell's groups keep {len(saved)}"):
        torch.ops.fastdarts.edge_cell_backward([None, None], *cell, mean, var, True, 1e-5, True, saved[:1], True, True,
                                               True, True)  # fmt: skip
    with pytest.raises(ValueError, match=r"mean must have shape \[\d+, 4\]"):
        torch.ops.fastdarts.edge_cell_backward([None, None], *cell, mean[1:], var, True, 1e-5, True, [], True, True,
                                               True, True)  # fmt: skip
