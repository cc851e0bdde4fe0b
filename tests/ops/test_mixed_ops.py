"""The mixed ops of the edges leaving one state, as one group (`ops.mixed_ops`): the fused group against the reference
(each edge's `mixed_op`) in outputs, statistics and every gradient, with different candidates per edge (PR-DARTS's
subsets, an edge of only `none`), both strides, training and evaluation, with and without recomputation; gradcheck;
the passes it shares (one first-stage kernel and one pool pass for the whole group, forward and backward); an output
left out of the loss; its errors. Backends are checked the same way by `check_group` (the Triton one in
test_triton_mixed_op.py)."""

import collections

import pytest
import torch

from fastdarts import ops

from ..conftest import requires_ext
from ._helpers import assert_gradients_close
from .test_mixed_op import ALL, TOLERANCES, make_inputs

# Per edge, its candidates: every op, a PR-DARTS-like subset with a pool and a sep conv, nothing (only `none`), and
# the other pool with a dil conv and the skip.
GROUP_CANDIDATES = [ALL, [0, 3, 6], [], [1, 2, 5]]


def make_group(E, N, C, S, stride, dtype=torch.float32, pool_bn=True):
    edges = [make_inputs(N, C, S, stride, dtype, seed=e, pool_bn=pool_bn) for e in range(E)]
    x = edges[0][0]
    w = torch.stack([edge[1].detach() for edge in edges]).requires_grad_()
    weights = [edge[2] for edge in edges]
    return x, w, weights, torch.stack([edge[3] for edge in edges]), torch.stack([edge[4] for edge in edges])


def run_group(backend, x, w, weights, stride, candidates, bn_mean, bn_var, training, pool_bn, recompute, used,
              partial_channels=1, scale=None):  # fmt: skip
    """(outs, mean, var, gradients of x, w, the scale if any and every weight) for a loss over the outputs whose
    index is in `used`."""
    outs, mean, var = ops.mixed_ops(x, w, weights, stride, candidates, bn_mean, bn_var, training, pool_bn=pool_bn,
                                    recompute=recompute, partial_channels=partial_channels, scale=scale,
                                    backend=backend)  # fmt: skip
    generator = torch.Generator().manual_seed(7)
    grads_out = [torch.randn(out.shape, dtype=out.dtype, generator=generator) for out in outs]
    loss = sum((outs[e] * grads_out[e]).sum() for e in used)
    inputs = [x, w, *([] if scale is None else [scale]), *(t for ws in weights for t in ws)]
    return outs, mean, var, list(torch.autograd.grad(loss, inputs, allow_unused=True))


def assert_group_close(got, want, tol):
    """`run_group`'s results of a backend against the reference's: outputs (channels_last), statistics, gradients."""
    for g, r in zip(got[0], want[0]):
        torch.testing.assert_close(g, r, **tol["out"])
        assert g.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got[1], want[1], **tol["out"])
    torch.testing.assert_close(got[2], want[2], **tol["out"])
    assert_gradients_close(got[3], want[3], tol["grad"])


def check_group(backend, shape, stride, training, pool_bn=True, recompute=True, candidates=GROUP_CANDIDATES,
                used=None, dtype=torch.float32):  # fmt: skip
    x, w, weights, bn_mean, bn_var = make_group(len(candidates), *shape, stride, dtype, pool_bn)
    used = range(len(candidates)) if used is None else used
    args = (x, w, weights, stride, candidates, bn_mean, bn_var, training, pool_bn, recompute, used)
    assert_group_close(run_group(backend, *args), run_group("reference", *args), TOLERANCES[dtype])


SHAPES = [(3, 4, 7), (1, 6, 8), (2, 16, 9)]


@requires_ext
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_group_equals_reference(shape, stride, training, cpu_isa):
    check_group("cpp", shape, stride, training)


@requires_ext
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
@pytest.mark.parametrize(
    "pool_bn,recompute", [(False, True), (True, False), (False, False)], ids=["no-pool-bn", "no-recompute", "neither"]
)
def test_group_without_pool_bn_or_recomputation(stride, pool_bn, recompute):
    check_group("cpp", (2, 6, 7), stride, True, pool_bn, recompute)


@requires_ext
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "no-recompute"])
def test_an_output_left_out_of_the_loss(recompute):
    # Edge 1's output takes no part: its gradients are zeros, and the pools' and first stage's still come out right.
    check_group("cpp", (2, 4, 7), 1, True, recompute=recompute, used=[0, 3])


@requires_ext
def test_one_edge_group_is_mixed_op():
    x, w, weights, bn_mean, bn_var = make_inputs(2, 4, 7, 1)
    (out,), mean, var = ops.mixed_ops(x, w.unsqueeze(0), [weights], 1, [ALL], backend="cpp")
    want = ops.mixed_op(x, w, weights, 1, backend="cpp")
    torch.testing.assert_close(out, want[0], rtol=0, atol=0)
    torch.testing.assert_close(mean[0], want[1], rtol=0, atol=0)


@requires_ext
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
def test_gradcheck_float64(stride):
    candidates = [[0, 2, 3], [1, 5]]
    x, w, weights, _, _ = make_group(2, 2, 4, 5, stride, torch.float64)
    flat = [t for ws in weights for t in ws]
    n = len(weights[0])

    def f(x, w, *flat):
        outs, _, _ = ops.mixed_ops(x, w, [flat[:n], flat[n:]], stride, candidates, backend="cpp")
        return tuple(outs)

    assert torch.autograd.gradcheck(f, (x, w, *flat))


def kernel_calls(run) -> dict[str, int]:
    """How often run() calls each kernel of the fused edge, nested calls included (which dispatch modes do not see
    inside a custom op): from the profiler's op events."""
    kernels = ("relu_dwconv_pointwise", "relu_dwconv_pointwise_backward", "pool_bn_stats", "pool_bn_stats_backward")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    counts = collections.Counter(event.name for event in profile.events())
    return {name: counts[f"fastdarts::{name}"] for name in kernels}


@requires_ext
def test_shares_the_first_stage_and_the_pools():
    """Four edges with 3 sep convs between them: the first stage of all 7 convs is one kernel call and the pools one
    pass, forward and backward; each sep conv adds its second stage."""
    x, w, weights, _, _ = make_group(4, 2, 4, 7, 1)
    outs = []

    def forward():
        outs.extend(ops.mixed_ops(x, w, weights, 1, GROUP_CANDIDATES, backend="cpp")[0])

    seps = sum(k in (3, 4) for ks in GROUP_CANDIDATES for k in ks)  # sep_conv_3x3 and sep_conv_5x5: 2 + 1
    assert kernel_calls(forward) == {
        "relu_dwconv_pointwise": 1 + seps, "relu_dwconv_pointwise_backward": 0,
        "pool_bn_stats": 1, "pool_bn_stats_backward": 0,
    }  # fmt: skip
    # The backward recomputes the forward, then runs one pool backward and the first stages' backward once.
    assert kernel_calls(lambda: torch.autograd.grad(sum(out.sum() for out in outs), [x, w])) == {
        "relu_dwconv_pointwise": 1 + seps, "relu_dwconv_pointwise_backward": 1 + seps,
        "pool_bn_stats": 1, "pool_bn_stats_backward": 1,
    }  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
@pytest.mark.parametrize(
    "change,message",
    [
        (dict(w=torch.ones(7)), "w must have shape [E, K]"),
        (dict(candidates=[ALL]), "2 edges need 2 weight lists and 2 candidate lists"),
        (dict(candidates=[ALL, [3, 1]]), "candidates must be increasing"),
    ],
    ids=["w-not-2d", "one-candidate-list", "unsorted"],
)
def test_bad_arguments(backend, change, message):
    x, w, weights, _, _ = make_group(2, 1, 4, 5, 1)
    arguments = dict(x=x, w=w, weights=weights, stride=1, candidates=[ALL, ALL]) | change
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ops.mixed_ops(**arguments, backend=backend)


def _later_edge_defects():
    def weight_shape(weights):
        weights[2][4] = torch.randn(4, 1, 3, 3)  # sep_conv_5x5's first depthwise kernel, 3x3

    def weight_dtype(weights):
        weights[2][7] = weights[2][7].double()

    return [(weight_shape, ValueError, "weights[4] must have shape [4, 1, 5, 5]"),
            (weight_dtype, TypeError, "weights[7] must have the dtype of x")]  # fmt: skip


@requires_ext
@pytest.mark.parametrize("defect,error,message", _later_edge_defects(), ids=["weight-shape", "weight-dtype"])
def test_a_defect_on_a_later_edge_is_named_with_its_edge(defect, error, message):
    """A group's checks run once per signature of its arguments (shapes, dtypes, devices, the rest): after a valid
    call of the same shapes, one wrong weight of the third edge still fails, naming the edge and the weight."""
    x, w, weights, _, _ = make_group(3, 1, 4, 5, 1)
    ops.mixed_ops(x, w, weights, 1, [ALL, ALL, ALL], backend="cpp")
    weights = [list(ws) for ws in weights]
    defect(weights)
    with pytest.raises(error, match=r"\(edge 2\): " + message.replace("[", r"\[").replace("]", r"\]")):
        ops.mixed_ops(x, w, weights, 1, [ALL, ALL, ALL], backend="cpp")


@requires_ext
def test_other_candidates_for_the_same_tensors_are_checked():
    """The remembered signature leaves the candidates out (a sampling method draws others every step), which are
    checked on every call: after valid calls, candidates out of order on the second edge fail, naming the edge."""
    x, w, weights, _, _ = make_group(3, 1, 4, 5, 1)
    ops.mixed_ops(x, w, weights, 1, [ALL, ALL, ALL], backend="cpp")
    ops.mixed_ops(x, w, weights, 1, [(1,), (0, 6), (2, 3)], backend="cpp")  # other draws: valid
    for candidates in ([(1,), (3, 0), (2,)], [(1,), (0, 7), (2,)]):
        with pytest.raises(ValueError, match=r"\(edge 1\): candidates must be increasing indices in 0\.\.6"):
            ops.mixed_ops(x, w, weights, 1, candidates, backend="cpp")
