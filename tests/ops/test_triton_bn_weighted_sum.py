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
    BACKWARD_BAD_ARGUMENTS,
    BAD_INPUTS,
    LAYOUTS,
    OTHER_LAYOUTS,
    assert_close,
    backward_samples,
    batch_norm_graph,
    call_backward_op,
    check_backward_op_computes_only_what_is_asked,
    check_backward_op_matches_autograd_through_batch_statistics,
    check_gradcheck_float64_through_batch_statistics,
    check_matches_reference,
    check_other_layouts_and_an_empty_batch,
    check_second_derivative_raises_a_clear_error,
    factors_arguments,
    forward_samples,
    make_inputs,
    opcheck_backward_op_with_inputs_needing_grad,
    spoilt_backward_arguments,
    statistics_flags,
)
from .test_mixed_op import make_inputs as mixed_op_inputs

SHAPES = [(1, 4, 5, 5), (3, 5, 7, 7)]
CASES = [(shape, layout) for shape in SHAPES for layout in LAYOUTS]
CASE_IDS = [f"{'x'.join(map(str, shape))}-{layout}" for shape, layout in CASES]
FLAGS = [(1, [True]), (1, [False]), (3, statistics_flags(3))]  # K = 3: row 0 fixed (a skip row), rows 1, 2 batch
FLAG_IDS = ["K1-batch", "K1-fixed", "K3-mixed"]


def test_dispatch():
    assert _registry.select("bn_weighted_sum", torch.device("cuda")) == "triton"
    assert "triton" in ops.available_backends("bn_weighted_sum", "cpu")


@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("K", [1, 3])
def test_matches_reference(K, shape, layout):
    check_matches_reference("triton", K, shape, layout)


@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("K,flags", FLAGS, ids=FLAG_IDS)
def test_backward_op_matches_autograd_through_batch_statistics(K, flags, shape, layout):
    check_backward_op_matches_autograd_through_batch_statistics("triton", K, flags, shape, layout)


def test_float64_matches_reference():
    ts, w, fixed_mean, fixed_invstd = make_inputs(3, (2, 5, 7, 9), torch.float64, "contiguous")
    flags = [True, False, True]
    mean, invstd = batch_norm_graph(ts, flags, fixed_mean.detach(), fixed_invstd.detach())
    expected = reference.bn_weighted_sum(ts, w, mean, invstd)
    torch.testing.assert_close(ops.bn_weighted_sum(ts, w, mean, invstd, backend="triton"), expected, **F64_TOL)
    grad_out = torch.randn_like(expected)
    want = torch.autograd.grad(expected, [*ts, w], grad_out)
    grad_ts, grad_w = call_backward_op("triton", grad_out, ts, w, mean, invstd, flags)
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
    grad_ts, grad_w = call_backward_op("triton", grad_out, ts, w, mean, invstd, flags)
    for got, expected_grad in zip([*grad_ts, grad_w], want, strict=True):
        assert_close(got, expected_grad, 1e-3)


@pytest.mark.parametrize("input_grad,w_grad", [(True, False), (False, True), (False, False)])
def test_backward_op_computes_only_what_is_asked(input_grad, w_grad):
    check_backward_op_computes_only_what_is_asked("triton", input_grad, w_grad)


@pytest.mark.parametrize("layout", OTHER_LAYOUTS)
def test_other_layouts_and_an_empty_batch(layout):
    check_other_layouts_and_an_empty_batch("triton", layout)


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
    grad_ts, grad_w = call_backward_op("triton", grad, ts, w, mean, invstd, flags)
    want_ts, want_w = torch.ops.fastdarts.bn_weighted_sum_backward(grad, ts, w, mean, invstd, flags, True, True)
    for got, want in zip([*grad_ts, grad_w], [*want_ts, want_w], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("w_grad", [True, False], ids=["w_grad", "no_w_grad"])
def test_factors_op_forms_the_gradients_of_the_backward_op(w_grad, layout):
    """bn_weighted_sum_backward_factors: the written rows' gradients and grad_w are the backward op's, bit for bit
    (the same launches); every row's factors form its gradient. K = 10 over two launches, two tiles of channels."""
    K, shape = 10, (3, 33, 7, 7)
    grad, ts, w, mean, invstd = factors_arguments(K, shape, layout=layout)
    flags = [k != 4 for k in range(K)]
    written = [k % 3 == 1 for k in range(K)]  # rows 1, 4 (a fixed row), 7
    want_ts, want_w = torch.ops.fastdarts_triton.bn_weighted_sum_backward(grad, ts, w, mean, invstd, flags, True,
                                                                          w_grad)  # fmt: skip
    grad_ts, factors, grad_w = torch.ops.fastdarts_triton.bn_weighted_sum_backward_factors(
        grad, ts, w, mean, invstd, flags, written, w_grad
    )
    assert len(grad_ts) == sum(written)
    for got, want in zip(grad_ts, [t for t, row in zip(want_ts, written) if row], strict=True):
        assert torch.equal(got, want) and got.stride() == want.stride()
    assert grad_w == [] if not w_grad else torch.equal(grad_w[0], want_w[0])
    assert factors.shape == (K, 4, shape[1]) and factors.dtype == ts[0].dtype
    for k, formed in enumerate(reference.formed_grads([grad] * K, ts, factors)):
        assert_close(formed, want_ts[k], 1e-5)
    assert torch.equal(factors[4, 1], torch.zeros_like(factors[4, 1]))  # the fixed row: w invstd g
    assert torch.equal(factors[4, 3], torch.zeros_like(factors[4, 3]))


@requires_ext
def test_factors_op_agrees_with_the_cpp_op():
    grad, ts, w, mean, invstd = factors_arguments(4, (2, 6, 5, 7), torch.float64)
    flags, written = [True, False, True, True], [True, False, False, True]
    got = torch.ops.fastdarts_triton.bn_weighted_sum_backward_factors(grad, ts, w, mean, invstd, flags, written, True)
    want = torch.ops.fastdarts.bn_weighted_sum_backward_factors(grad, ts, w, mean, invstd, flags, written, True)
    for g, r in zip([*got[0], got[1], got[2][0]], [*want[0], want[1], want[2]], strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_factors_op_bad_written_gives_one_line():
    grad, ts, w, mean, invstd = factors_arguments(2, (2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"written must have one entry per tensor \(K = 2\), got 1") as raised:
        torch.ops.fastdarts_triton.bn_weighted_sum_backward_factors(grad, ts, w, mean, invstd, [True, False], [True],
                                                                    True)  # fmt: skip
    assert str(raised.value).startswith("bn_weighted_sum_backward_factors: ") and "\n" not in str(raised.value)


def test_gradcheck_float64_through_batch_statistics():
    check_gradcheck_float64_through_batch_statistics("triton", fast_mode=True)


def test_second_derivative_raises_a_clear_error():
    check_second_derivative_raises_a_clear_error("triton")


def test_the_mixed_op_folds_its_bns_with_these_kernels():
    x, w, weights, bn_mean, bn_var = mixed_op_inputs(1, 2, 5, 1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        out, _, _ = ops.mixed_op(x, w, weights, 1, [0, 1, 2], bn_mean, bn_var, True, backend="triton")
        torch.autograd.grad(out.sum(), [x, w])
    names = {event.name for event in profile.events()}
    assert {"fastdarts_triton::bn_weighted_sum", "fastdarts_triton::bn_weighted_sum_backward_factors"} <= names


@pytest.mark.parametrize("make,error,message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_arguments_raise_one_line_errors(make, error, message):
    with pytest.raises(error, match=message) as raised:
        ops.bn_weighted_sum(*make(), backend="triton")
    assert str(raised.value).startswith("bn_weighted_sum: ") and "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "change,error,message", [c[1:] for c in BACKWARD_BAD_ARGUMENTS], ids=[c[0] for c in BACKWARD_BAD_ARGUMENTS]
)
def test_backward_op_bad_arguments(change, error, message):
    with pytest.raises(error, match=f"bn_weighted_sum_backward: {message}") as raised:
        torch.ops.fastdarts_triton.bn_weighted_sum_backward(*spoilt_backward_arguments(change))
    assert "\n" not in str(raised.value)


def opcheck_samples():
    samples = [(f"bn_weighted_sum-{name}", "bn_weighted_sum", args) for name, args in forward_samples()]
    samples += [(f"backward-{name}", "bn_weighted_sum_backward", args) for name, args in backward_samples()]
    grad, ts, w, mean, invstd = factors_arguments(3, (2, 4, 5, 3))
    for w_grad in (True, False):
        args = (grad, ts, w, mean, invstd, [True, False, True], [False, True, True], w_grad)
        samples.append((f"factors-w_grad{w_grad}", "bn_weighted_sum_backward_factors", args))
    return samples


@pytest.mark.parametrize("op,args", [s[1:] for s in opcheck_samples()], ids=[s[0] for s in opcheck_samples()])
def test_opcheck(op, args):
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        opcheck(getattr(torch.ops.fastdarts_triton, op).default, args)


def test_opcheck_backward_op_with_inputs_needing_grad():
    opcheck_backward_op_with_inputs_needing_grad("triton")
