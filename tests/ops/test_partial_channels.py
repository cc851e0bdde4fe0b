"""`ops.mixed_ops` with partial channels (PC-DARTS, DrNAS) and an edge scale: the fused group against the reference
composition (split, mixed op on the first C/K channels, bypass, shuffle, scale) in outputs, statistics and every
gradient (x, w, the scale, the conv weights), odd sides, both strides, K in {2, 4}, with and without a scale and
recomputation, an output left out of the loss; float64 gradcheck; opcheck of the forward and backward ops;
torch.compile with fullgraph; that autograd keeps only x (no slice, bypass or output) and that K = 1 is the plain
group; its errors. The Triton group runs the same check in test_triton_mixed_op.py."""

import pytest
import torch
from torch.library import opcheck

from fastdarts import ops

from ..conftest import requires_ext
from .test_mixed_op import TOLERANCES, saved_storages
from .test_mixed_ops import GROUP_CANDIDATES, assert_group_close, make_group, run_group


def make_partial_group(E, N, C, S, stride, K, dtype=torch.float32, with_scale=True):
    """x [N, C, S, S] (channels_last), the group's w and conv weights for C/K channels, and a scale [E] or None."""
    _, w, weights, bn_mean, bn_var = make_group(E, N, C // K, S, stride, dtype)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(N, C, S, S, dtype=dtype, generator=generator)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    scale = (torch.rand(E, dtype=dtype, generator=generator) + 0.5).requires_grad_() if with_scale else None
    return x, w, weights, bn_mean, bn_var, scale


def check_partial_group(backend, shape, stride, K, training=True, recompute=True, with_scale=True,
                        candidates=GROUP_CANDIDATES, used=None):  # fmt: skip
    x, w, weights, bn_mean, bn_var, scale = make_partial_group(len(candidates), *shape, stride, K,
                                                               with_scale=with_scale)  # fmt: skip
    used = range(len(candidates)) if used is None else used
    args = (x, w, weights, stride, candidates, bn_mean, bn_var, training, True, recompute, used, K, scale)
    got, want = run_group(backend, *args), run_group("reference", *args)
    for out in got[0]:  # the full width, not C/K
        assert out.shape[:2] == (shape[0], shape[1])
    assert_group_close(got, want, TOLERANCES[torch.float32])


# (N, C, S): odd and even sides, C/K from 1 to 4 channels (C/K even on stride 2, for FactorizedReduce).
SHAPES = [(2, 8, 7), (1, 16, 6), (3, 8, 5)]


@requires_ext
@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_partial_channels_equal_reference(shape, stride, K):
    check_partial_group("cpp", shape, stride, K)


@requires_ext
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
@pytest.mark.parametrize(
    "training,recompute,with_scale",
    [(False, True, True), (True, False, True), (True, True, False)],
    ids=["eval", "no-recompute", "no-scale"],
)
def test_partial_channels_in_evaluation_without_recomputation_or_scale(stride, training, recompute, with_scale):
    check_partial_group("cpp", (2, 8, 7), stride, 2, training, recompute, with_scale)


@requires_ext
@pytest.mark.parametrize("with_scale", [True, False], ids=["scale", "no-scale"])
def test_partial_channels_with_an_output_left_out_of_the_loss(with_scale):
    check_partial_group("cpp", (2, 8, 7), 2, 4, with_scale=with_scale, used=[1, 2])


@requires_ext
@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
def test_partial_channels_gradcheck_float64(stride, K):
    candidates = [[0, 2, 3], [1, 5]]
    x, w, weights, _, _, scale = make_partial_group(2, 2, 2 * K, 5, stride, K, torch.float64)
    flat = [t for ws in weights for t in ws]
    n = len(weights[0])

    def f(x, w, scale, *flat):
        outs, _, _ = ops.mixed_ops(x, w, [flat[:n], flat[n:]], stride, candidates, partial_channels=K, scale=scale,
                                   backend="cpp")  # fmt: skip
        return tuple(outs)

    assert torch.autograd.gradcheck(f, (x, w, scale, *flat))


@requires_ext
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "no-recompute"])
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
def test_opcheck_with_partial_channels(stride, recompute):
    x, w, weights, bn_mean, bn_var, scale = make_partial_group(2, 2, 8, 7, stride, 2)
    candidates, counts = [0, 2, 3, 6, 1, 4], [4, 2]
    args = (x, w, [t for ws in weights for t in ws], stride, candidates, counts, bn_mean, bn_var, True, 1e-5, True,
            recompute, 2, scale)  # fmt: skip
    opcheck(torch.ops.fastdarts.mixed_ops.default, args)
    outs, mean, var, saved = torch.ops.fastdarts.mixed_ops.default(*args)
    grads = [torch.randn_like(out) for out in outs]
    backward_args = (grads, x.detach(), w.detach(), [t.detach() for t in args[2]], stride, candidates, counts, mean,
                     var, True, 1e-5, True, [t.detach() for t in saved], True, True, True, 2, scale.detach(),
                     True)  # fmt: skip
    opcheck(torch.ops.fastdarts.mixed_ops_backward.default, backward_args)


@requires_ext
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
def test_partial_channels_keep_only_the_input_for_backward(stride):
    # No slice of x, pooled bypass, shuffled output or output kept for the scale's gradient: x itself, the weights,
    # the scale and the statistics.
    x, w, weights, _, _, scale = make_partial_group(2, 4, 16, 8, stride, 4)

    def forward():
        return ops.mixed_ops(x, w, weights, stride, [GROUP_CANDIDATES[0]] * 2, partial_channels=4, scale=scale,
                             backend="cpp")  # fmt: skip

    storages, inputs = saved_storages(forward, x, w, [*(t for ws in weights for t in ws), scale])
    beyond_inputs = sum(size for ptr, size in storages.items() if ptr not in inputs)
    B = sum(bns for _, bns in ops.mixed_op_layout(stride))
    assert beyond_inputs <= 2 * (2 * B * 4 + 2 * 7) * 4  # the statistics and w * scale: no activation
    assert x.untyped_storage().data_ptr() in storages


@requires_ext
def test_one_partial_channel_group_is_the_plain_group():
    x, w, weights, _, _, scale = make_partial_group(2, 2, 4, 7, 1, 1)
    got = ops.mixed_ops(x, w, weights, 1, GROUP_CANDIDATES[:2], partial_channels=1, backend="cpp")
    want = ops.mixed_ops(x, w, weights, 1, GROUP_CANDIDATES[:2], backend="cpp")
    for g, r in zip(got[0], want[0]):
        assert torch.equal(g, r)
    # K = 1 with a scale: the scale folds into w
    scaled = ops.mixed_ops(x, w, weights, 1, GROUP_CANDIDATES[:2], scale=scale, backend="cpp")[0]
    for g, r, s in zip(scaled, want[0], scale):
        torch.testing.assert_close(g, r * s, **TOLERANCES[torch.float32]["out"])


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
@pytest.mark.parametrize(
    "change,message",
    [
        (dict(partial_channels=3), "partial_channels must be an integer >= 1 dividing the 8 channels, got 3"),
        (dict(partial_channels=0), "partial_channels must be an integer >= 1 dividing the 8 channels, got 0"),
        (dict(scale=torch.ones(3)), "scale must be None or have shape [2], got [3]"),
    ],
    ids=["not-dividing", "zero", "scale-shape"],
)
def test_bad_partial_channel_arguments(backend, change, message):
    x, w, weights, _, _, _ = make_partial_group(2, 1, 8, 5, 1, 2)
    arguments = dict(x=x, w=w, weights=weights, stride=1, candidates=GROUP_CANDIDATES[:2], partial_channels=2) | change
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ops.mixed_ops(**arguments, backend=backend)


@requires_ext
def test_compile_fullgraph_matches_eager():
    # The fakes give the full-width outputs and the C/K-channel statistics, so the group traces as one node.
    x, w, weights, _, _, scale = make_partial_group(2, 2, 8, 7, 2, 2)

    def edges(x, w, scale):
        outs, _, _ = ops.mixed_ops(x, w, weights, 2, [[0, 2, 3], [1, 5]], partial_channels=2, scale=scale,
                                   backend="cpp")  # fmt: skip
        return outs[0] + outs[1]

    want = edges(x, w, scale)
    got = torch.compile(edges, fullgraph=True, backend="aot_eager")(x, w, scale)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, r in zip(torch.autograd.grad(got.square().sum(), [x, w, scale]),
                    torch.autograd.grad(want.square().sum(), [x, w, scale])):  # fmt: skip
        torch.testing.assert_close(g, r, rtol=0, atol=0)
