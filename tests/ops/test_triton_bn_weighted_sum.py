"""bn_weighted_sum's Triton kernels against the reference and the C++ op, under Triton's interpreter (tiny shapes).

The kernels take tiles of 128 pixels by up to 32 channels and up to 8 inputs per launch: 3 x 5 x 7 x 7 is two tiles
of pixels (the second masked) with 5 of 8 channels; 3 x 33 x 7 x 7 also takes two tiles of channels, the second
holding one, and K = 10 takes two launches of each pass.
"""

import pytest
import torch
from torch.library import opcheck

# test_triton first: it sets TRITON_INTERPRET while fastdarts (and triton) import, when this module runs alone. Its
# autouse fixture `interpret` and its skip `pytestmark` apply here too.
from .test_triton import F64_TOL, interpret, pytestmark  # noqa: F401

# isort: split
from fastdarts import ops
from fastdarts.ops import _registry, reference

from ..conftest import requires_ext
from .test_bn_weighted_sum import (
    BAD_INPUTS,
    LAYOUTS,
    assert_close,
    backward_samples,
    batch_norm_graph,
    forward_samples,
    make_inputs,
    ok,
    statistics_flags,
)
from .test_mixed_op import make_inputs as mixed_op_inputs

SHAPES = [(1, 4, 5, 5), (3, 5, 7, 7)]
CASES = [(shape, layout) for shape in SHAPES for layout in LAYOUTS]
CASE_IDS = [f"{'x'.join(map(str, shape))}-{layout}" for shape, layout in CASES]
FLAGS = [(1, [True]), (1, [False]), (3, statistics_flags(3))]  # K = 3: row 0 fixed (a skip row), rows 1, 2 batch
FLAG_IDS = ["K1-batch", "K1-fixed", "K3-mixed"]


def triton_backward(grad, ts, w, mean, invstd, flags, input_grad=True, w_grad=True):
    """The Triton backward op on detached tensors, with the C++ op's outputs: (grad_ts or [], grad_w or None)."""
    grad_ts, grad_w = torch.ops.fastdarts_triton.bn_weighted_sum_backward(
        grad, [t.detach() for t in ts], w.detach(), mean.detach(), invstd.detach(), flags, input_grad, w_grad
    )
    assert len(grad_w) == w_grad  # [grad_w] or []
    return grad_ts, (grad_w[0] if w_grad else None)


def test_dispatch():
    assert _registry.select("bn_weighted_sum", torch.device("cuda")) == "triton"
    assert "triton" in ops.available_backends("bn_weighted_sum", "cpu")


@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("K", [1, 3])
def test_matches_reference(K, shape, layout):
    ts, w, mean, invstd = make_inputs(K, shape, layout=layout)
    out = ops.bn_weighted_sum(ts, w, mean, invstd, backend="triton")
    expected = reference.bn_weighted_sum(ts, w, mean, invstd)
    assert_close(out, expected, 1e-4)
    assert out.stride() == torch.empty_like(ts[0]).stride()  # laid out like ts[0]
    grad_out = torch.randn_like(expected)
    inputs = [*ts, w, mean, invstd]
    for got, want in zip(torch.autograd.grad(out, inputs, grad_out), torch.autograd.grad(expected, inputs, grad_out)):
        assert_close(got, want, 1e-3)


@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("K,flags", FLAGS, ids=FLAG_IDS)
def test_backward_op_matches_autograd_through_batch_statistics(K, flags, shape, layout):
    ts, w, fixed_mean, fixed_invstd = make_inputs(K, shape, layout=layout)
    mean, invstd = batch_norm_graph(ts, flags, fixed_mean.detach(), fixed_invstd.detach())
    expected = reference.bn_weighted_sum(ts, w, mean, invstd)
    grad_out = torch.randn_like(expected)
    *expected_ts, expected_w = torch.autograd.grad(expected, [*ts, w], grad_out)
    grad_ts, grad_w = triton_backward(grad_out, ts, w, mean, invstd, flags)
    for got, want in zip(grad_ts, expected_ts, strict=True):
        assert_close(got, want, 1e-3)
        assert got.stride() == torch.empty_like(ts[0]).stride()
    assert_close(grad_w, expected_w, 1e-3)


def test_float64_matches_reference():
    ts, w, fixed_mean, fixed_invstd = make_inputs(3, (2, 5, 7, 9), torch.float64, "contiguous")
    flags = [True, False, True]
    mean, invstd = batch_norm_graph(ts, flags, fixed_mean.detach(), fixed_invstd.detach())
    expected = reference.bn_weighted_sum(ts, w, mean, invstd)
    torch.testing.assert_close(ops.bn_weighted_sum(ts, w, mean, invstd, backend="triton"), expected, **F64_TOL)
    grad_out = torch.randn_like(expected)
    want = torch.autograd.grad(expected, [*ts, w], grad_out)
    grad_ts, grad_w = triton_backward(grad_out, ts, w, mean, invstd, flags)
    for got, expected_grad in zip([*grad_ts, grad_w], want, strict=True):
        torch.testing.assert_close(got, expected_grad, **F64_TOL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_masked_tails_and_more_inputs_than_a_launch_takes(layout):
    """Two tiles of pixels and of channels, each second one masked; K = 10 inputs, 9 of them batch-statistics rows,
    so the forward and both backward passes take two launches."""
    K, shape = 10, (3, 33, 7, 7)
    flags = [k != 4 for k in range(K)]
    ts, w, fixed_mean, fixed_invstd = make_inputs(K, shape, layout=layout)
    mean, invstd = batch_norm_graph(ts, flags, fixed_mean.detach(), fixed_invstd.detach())
    expected = reference.bn_weighted_sum(ts, w, mean, invstd)
    assert_close(ops.bn_weighted_sum(ts, w, mean.detach(), invstd.detach(), backend="triton"), expected, 1e-4)
    grad_out = torch.randn_like(expected)
    want = torch.autograd.grad(expected, [*ts, w], grad_out)
    grad_ts, grad_w = triton_backward(grad_out, ts, w, mean, invstd, flags)
    for got, expected_grad in zip([*grad_ts, grad_w], want, strict=True):
        assert_close(got, expected_grad, 1e-3)


@pytest.mark.parametrize("input_grad,w_grad", [(True, False), (False, True), (False, False)])
def test_backward_op_computes_only_what_is_asked(input_grad, w_grad):
    ts, w, mean, invstd = make_inputs(4, (2, 6, 5, 7), requires_grad=False)
    grad = torch.randn_like(ts[0])
    flags = [False, True, True, False]
    all_ts, all_w = triton_backward(grad, ts, w, mean, invstd, flags)
    grad_ts, grad_w = triton_backward(grad, ts, w, mean, invstd, flags, input_grad, w_grad)
    assert grad_ts == [] if not input_grad else all(torch.equal(a, b) for a, b in zip(grad_ts, all_ts, strict=True))
    assert grad_w is None if not w_grad else torch.equal(grad_w, all_w)


@pytest.mark.parametrize("layout", ["strided", "permuted", "mixed", "expanded_grad", "empty_batch"])
def test_other_layouts_and_an_empty_batch(layout):
    """Views that are not dense, a dense layout that is neither contiguous nor channels_last, inputs in two layouts,
    an expanded gradient, and N = 0 (grad_w is then 0)."""
    K, C = 3, 4
    if layout == "strided":
        ts = [torch.randn(2, C, 5, 14)[..., ::2] for _ in range(K)]
    elif layout == "permuted":
        ts = [torch.randn(2, C, 7, 5).permute(0, 1, 3, 2) for _ in range(K)]
    elif layout == "empty_batch":
        ts = [torch.randn(0, C, 5, 7) for _ in range(K)]
    else:  # ts[0] channels_last, the others contiguous
        ts = [torch.randn(2, C, 5, 7) for _ in range(K)]
        ts[0] = ts[0].contiguous(memory_format=torch.channels_last)
    ts = [t.requires_grad_() for t in ts]
    w, fixed_mean, fixed_invstd = torch.randn(K, requires_grad=True), torch.randn(K, C), torch.rand(K, C) + 0.5
    flags = [True, False, True] if layout != "empty_batch" else [False] * K  # no batch statistics of 0 values
    mean, invstd = batch_norm_graph(ts, flags, fixed_mean, fixed_invstd)
    expected = reference.bn_weighted_sum(ts, w, mean, invstd)
    out = ops.bn_weighted_sum(ts, w, mean.detach(), invstd.detach(), backend="triton")
    assert_close(out, expected, 1e-5)
    assert out.stride() == torch.empty_like(ts[0]).stride()
    if layout == "expanded_grad":  # stride 0 over images and channels; varying over pixels, or the BN would cancel it
        grad = torch.randn(1, 1, *expected.shape[2:]).expand(expected.shape)
    else:
        grad = torch.randn_like(expected)
    leaves = [*ts, w]
    want = torch.autograd.grad(expected, leaves, grad) if expected.numel() else [torch.zeros_like(t) for t in leaves]
    grad_ts, grad_w = triton_backward(grad, ts, w, mean, invstd, flags)
    for got, expected_grad in zip([*grad_ts, grad_w], want, strict=True):
        assert_close(got, expected_grad, 1e-5)
    if layout == "empty_batch":
        assert torch.equal(grad_w, torch.zeros(K))


@requires_ext
@pytest.mark.parametrize("layout", LAYOUTS)
def test_agrees_with_the_cpp_op(layout):
    """Both accumulate the sums in double, from the same products rounded once to float32."""
    ts, w, mean, invstd = make_inputs(5, (3, 5, 7, 7), layout=layout, requires_grad=False)
    grad = torch.randn_like(ts[0])
    flags = [False, True, True, False, True]
    torch.testing.assert_close(
        torch.ops.fastdarts_triton.bn_weighted_sum(ts, w, mean, invstd),
        torch.ops.fastdarts.bn_weighted_sum(ts, w, mean, invstd),
        rtol=1e-6,
        atol=1e-6,
    )
    grad_ts, grad_w = triton_backward(grad, ts, w, mean, invstd, flags)
    want_ts, want_w = torch.ops.fastdarts.bn_weighted_sum_backward(grad, ts, w, mean, invstd, flags, True, True)
    for got, want in zip([*grad_ts, grad_w], [*want_ts, want_w], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gradcheck_float64_through_batch_statistics():
    """The forward op's autograd, chained through statistics computed in the graph, is the BN-through gradient."""
    ts, w, fixed_mean, fixed_invstd = make_inputs(3, (2, 3, 3, 4), torch.float64)
    flags = [False, True, True]

    def fn(*tensors):
        mean, invstd = batch_norm_graph(tensors[:3], flags, fixed_mean.detach(), fixed_invstd.detach())
        return ops.bn_weighted_sum(tensors[:3], tensors[3], mean, invstd, backend="triton")

    assert torch.autograd.gradcheck(fn, (*ts, w), fast_mode=True)


def test_second_derivative_raises_a_clear_error():
    ts, w, mean, invstd = make_inputs(2, (2, 3, 4, 4), torch.float64)
    out = ops.bn_weighted_sum(ts, w, mean, invstd, backend="triton")
    (grad_w,) = torch.autograd.grad(out.square().sum(), [w], create_graph=True)
    with pytest.raises(RuntimeError, match="fastdarts_triton::bn_weighted_sum_backward is not differentiable"):
        torch.autograd.grad(grad_w.sum(), [ts[0]])


def test_the_mixed_op_folds_its_bns_with_these_kernels():
    x, w, weights, bn_mean, bn_var = mixed_op_inputs(1, 2, 5, 1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        out, _, _ = ops.mixed_op(x, w, weights, 1, [0, 1, 2], bn_mean, bn_var, True, backend="triton")
        torch.autograd.grad(out.sum(), [x, w])
    names = {event.name for event in profile.events()}
    assert {"fastdarts_triton::bn_weighted_sum", "fastdarts_triton::bn_weighted_sum_backward"} <= names


@pytest.mark.parametrize("make,error,message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_arguments_raise_one_line_errors(make, error, message):
    with pytest.raises(error, match=message) as raised:
        ops.bn_weighted_sum(*make(), backend="triton")
    assert str(raised.value).startswith("bn_weighted_sum: ") and "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "change,error,message",
    [
        (dict(grad=torch.randn(2, 3, 4, 5)), ValueError, r"grad must have the shape of ts\[0\]"),
        (dict(batch_statistics=[True]), ValueError, r"batch_statistics must have one entry per tensor \(K = 2\)"),
        (dict(dtype=torch.float16), TypeError, "only float32 and float64 are supported"),
    ],
    ids=["grad", "batch_statistics", "dtype"],
)
def test_backward_op_bad_arguments(change, error, message):
    ts, w, mean, invstd = ok()
    if "dtype" in change:
        ts, w, mean, invstd = [t.to(change["dtype"]) for t in ts], *(x.to(change["dtype"]) for x in (w, mean, invstd))
    grad = change.get("grad", torch.randn_like(ts[0]))
    flags = change.get("batch_statistics", [True, False])
    with pytest.raises(error, match=f"bn_weighted_sum_backward: {message}") as raised:
        torch.ops.fastdarts_triton.bn_weighted_sum_backward(grad, ts, w, mean, invstd, flags, True, True)
    assert "\n" not in str(raised.value)


def opcheck_samples():
    samples = [(f"bn_weighted_sum-{name}", "bn_weighted_sum", args) for name, args in forward_samples()]
    return samples + [(f"backward-{name}", "bn_weighted_sum_backward", args) for name, args in backward_samples()]


@pytest.mark.parametrize("op,args", [s[1:] for s in opcheck_samples()], ids=[s[0] for s in opcheck_samples()])
def test_opcheck(op, args):
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        opcheck(getattr(torch.ops.fastdarts_triton, op).default, args)


def test_opcheck_backward_op_with_inputs_needing_grad():
    """Its autograd is registered (it raises when used), and its fake agrees with the kernels."""
    ts, w, mean, invstd = make_inputs(2, (2, 4, 3, 3))
    args = (torch.randn(2, 4, 3, 3, requires_grad=True), ts, w, mean, invstd, [True, False], True, True)
    opcheck(
        torch.ops.fastdarts_triton.bn_weighted_sum_backward.default,
        args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
