"""pool_bn_stats's Triton kernels against the reference and ATen, under Triton's interpreter (tiny shapes).

The kernels take tiles of 128 pixels by up to 32 channels: 3 x 5 x 9 x 9 is two tiles of pixels (the second masked)
with 5 of 8 channels; 2 x 33 x 8 x 7 takes two tiles of channels, the second holding one.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

# test_triton first: it sets TRITON_INTERPRET while fastdarts (and triton) import, when this module runs alone. Its
# autouse fixture `interpret` and its skip `pytestmark` apply here too.
from .test_triton import OUT_TOL, interpret, pytestmark  # noqa: F401

# isort: split
from fastdarts import ops
from fastdarts.ops import _registry, reference

from .test_pool_bn_stats import (
    BAD_GRADIENTS,
    BAD_INPUTS,
    check_double_backward_matches_reference,
    check_empty_batch,
    check_gradient_of_one_pool,
    check_matches_reference,
    check_other_layouts,
    check_saves_only_x,
    check_statistics_in_double,
    check_ties_route_the_gradient_like_aten,
    make_x,
)

F64_TOL = dict(rtol=1e-10, atol=1e-12)
SHAPES = [(1, 4, 7, 7), (3, 5, 9, 9), (2, 33, 8, 7)]


def triton_pools(x, stride):
    return ops.pool_bn_stats(x, stride, backend="triton")


def test_dispatch():
    assert _registry.select("pool_bn_stats", torch.device("cuda")) == "triton"
    assert "triton" in ops.available_backends("pool_bn_stats", "cpu")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_matches_reference(shape, stride, layout):
    check_matches_reference("triton", shape, stride, layout)


@pytest.mark.parametrize("stride", [1, 2])
def test_float64_matches_reference(stride):
    x = make_x((2, 5, 9, 8), torch.float64, "contiguous")
    outs, expected = triton_pools(x, stride), reference.pool_bn_stats(x, stride)
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got, want, **F64_TOL)
    grad_outs = [torch.randn_like(e) for e in expected[:2]]
    got, want = torch.autograd.grad(outs[:2], x, grad_outs)[0], torch.autograd.grad(expected[:2], x, grad_outs)[0]
    torch.testing.assert_close(got, want, **F64_TOL)


def test_statistics_are_accumulated_in_double():
    check_statistics_in_double("triton", 1e3 + torch.randn(2, 5, 9, 9))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("used", ["max", "avg"])
def test_gradient_of_one_pool(used, stride):
    check_gradient_of_one_pool("triton", used, stride, make_x((2, 5, 9, 8), layout="contiguous"))


@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract")  # -inf - -inf: the interpreter's numpy
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("case", ["zeros", "constant", "minus_inf", "few_values"])
def test_ties_route_the_gradient_like_aten(case, stride):
    check_ties_route_the_gradient_like_aten("triton", case, stride, (2, 5, 7, 8), "contiguous")


@pytest.mark.parametrize("stride", [1, 2])
def test_nan_propagates_like_aten(stride):
    x = torch.randn(2, 5, 9, 9)
    x[0, 3, 4, 4] = float("nan")
    x[1, 1, 0, 0] = x[1, 1, 1, 1] = float("nan")  # two NaNs in one window: ATen's index follows the last one
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    max_out, avg_out, mean, var = triton_pools(x, stride)
    expected = F.max_pool2d(x, 3, stride, 1), F.avg_pool2d(x, 3, stride, 1, count_include_pad=False)
    torch.testing.assert_close(max_out, expected[0], equal_nan=True)
    torch.testing.assert_close(avg_out, expected[1], equal_nan=True, **OUT_TOL)
    assert max_out.isnan().sum() > 0 and torch.equal(max_out.isnan(), avg_out.isnan())
    nan_channels = torch.tensor([c in (1, 3) for c in range(5)])
    assert torch.equal(mean.isnan(), nan_channels.expand(2, 5)) and torch.equal(var.isnan(), mean.isnan())
    grad_out = torch.randint(1, 5, expected[0].shape).float()
    (got,) = torch.autograd.grad(max_out, x, grad_out)
    (want,) = torch.autograd.grad(expected[0], x, grad_out)
    assert torch.equal(got, want)


def test_empty_batch():
    check_empty_batch("triton")


@pytest.mark.parametrize("layout", ["strided_x", "permuted_x", "expanded_grads", "mixed_grads"])
def test_other_layouts(layout):
    check_other_layouts("triton", layout, 5)


def test_saves_only_x():
    check_saves_only_x("triton", 4)


def test_gradcheck_and_gradgradcheck_float64():
    # Distinct values a good way apart, so that finite differences never change a window's argmax.
    x = (torch.randperm(2 * 3 * 6 * 5, dtype=torch.float64).reshape(2, 3, 6, 5) / 10).requires_grad_()

    def pools(x):
        return tuple(triton_pools(x, 2)[:2])

    assert torch.autograd.gradcheck(pools, (x,), eps=1e-4, fast_mode=True)
    assert torch.autograd.gradgradcheck(pools, (x,), eps=1e-4, fast_mode=True)


def test_double_backward_matches_reference():
    check_double_backward_matches_reference("triton", F64_TOL)


TRITON_BAD_INPUTS = [
    *BAD_INPUTS,
    ("int64", lambda: (torch.ones(2, 4, 7, 7, dtype=torch.int64), 1), TypeError, "only float32 and float64"),
]


@pytest.mark.parametrize(
    "make,error,message", [c[1:] for c in TRITON_BAD_INPUTS], ids=[c[0] for c in TRITON_BAD_INPUTS]
)
def test_bad_inputs_raise_clear_errors(make, error, message):
    with pytest.raises(error, match=message):
        triton_pools(*make())


@pytest.mark.parametrize(
    "grad_max,grad_avg,error,message", [c[1:] for c in BAD_GRADIENTS], ids=[c[0] for c in BAD_GRADIENTS]
)
def test_backward_op_checks_its_gradients(grad_max, grad_avg, error, message):
    with pytest.raises(error, match=f"pool_bn_stats_backward: {message}"):
        torch.ops.fastdarts_triton.pool_bn_stats_backward(grad_max, grad_avg, torch.randn(2, 4, 7, 7), 2)


def opcheck_samples():
    samples = [
        ("pool_bn_stats-contiguous", "pool_bn_stats", (make_x((2, 5, 7, 6), layout="contiguous"), 1)),
        (
            "pool_bn_stats-stride2_f64_no_grad",
            "pool_bn_stats",
            (make_x((1, 3, 7, 7), torch.float64, requires_grad=False), 2),
        ),
    ]
    for given in ("both", "max", "avg"):
        grad_max = torch.randn(2, 5, 4, 3, requires_grad=True) if given != "avg" else None
        grad_avg = torch.randn(2, 5, 4, 3, requires_grad=True) if given != "max" else None
        x = make_x((2, 5, 7, 6), requires_grad=False)
        samples.append((f"pool_bn_stats_backward-{given}", "pool_bn_stats_backward", (grad_max, grad_avg, x, 2)))
    return samples


@pytest.mark.parametrize("op,args", [s[1:] for s in opcheck_samples()], ids=[s[0] for s in opcheck_samples()])
def test_opcheck(op, args):
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        opcheck(getattr(torch.ops.fastdarts_triton, op).default, args)
