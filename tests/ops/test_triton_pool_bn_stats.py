"""pool_bn_stats's Triton kernels against the reference and ATen, under Triton's interpreter (tiny shapes).

The kernels take tiles of 128 pixels by up to 32 channels: 3 x 5 x 9 x 9 is two tiles of pixels (the second masked)
with 5 of 8 channels; 2 x 33 x 8 x 7 takes two tiles of channels, the second holding one.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode

# test_triton first: it sets TRITON_INTERPRET while fastdarts (and triton) import, when this module runs alone. Its
# autouse fixture `interpret` and its skip `pytestmark` apply here too.
from .test_triton import GRAD_TOL, OUT_TOL, interpret, pytestmark  # noqa: F401

# isort: split
from fastdarts import ops
from fastdarts.ops import _registry, reference

F64_TOL = dict(rtol=1e-10, atol=1e-12)
SHAPES = [(1, 4, 7, 7), (3, 5, 9, 9), (2, 33, 8, 7)]


def memory_format_of(layout):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def make_x(shape, dtype=torch.float32, layout="channels_last", requires_grad=True):
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=memory_format_of(layout))
    return x.requires_grad_(requires_grad)


def triton_pools(x, stride):
    return ops.pool_bn_stats(x, stride, backend="triton")


def test_dispatch():
    assert _registry.select("pool_bn_stats", torch.device("cuda")) == "triton"
    assert "triton" in ops.available_backends("pool_bn_stats", "cpu")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_matches_reference(shape, stride, layout):
    x = make_x(shape, layout=layout)
    outs = triton_pools(x, stride)
    expected = reference.pool_bn_stats(x, stride)
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got, want, **OUT_TOL)
    for out in outs[:2]:  # laid out like x
        assert out.is_contiguous(memory_format=memory_format_of(layout))
    # The statistics are those of the kernel's own pools.
    want_var, want_mean = torch.var_mean(torch.stack([o.detach() for o in outs[:2]]), dim=(1, 3, 4), correction=0)
    torch.testing.assert_close(outs[2], want_mean, **OUT_TOL)
    torch.testing.assert_close(outs[3], want_var, **OUT_TOL)
    grad_outs = [torch.randn_like(e) for e in expected[:2]]
    (got,) = torch.autograd.grad(outs[:2], x, grad_outs)
    (want,) = torch.autograd.grad(expected[:2], x, grad_outs)
    torch.testing.assert_close(got, want, **GRAD_TOL)
    assert got.stride() == x.stride()


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
    # Far from zero, float32 sums of squares would lose the variance (1e3^2 against 1).
    x = 1e3 + torch.randn(2, 5, 9, 9)
    for stride in (1, 2):
        max_out, avg_out, mean, var = triton_pools(x, stride)
        want_var, want_mean = torch.var_mean(torch.stack([max_out, avg_out]).double(), dim=(1, 3, 4), correction=0)
        torch.testing.assert_close(mean, want_mean.float(), rtol=1e-6, atol=0)
        torch.testing.assert_close(var, want_var.float(), rtol=1e-6, atol=0)


class RecordBackwardCalls(TorchDispatchMode):
    """Which of (grad_max, grad_avg) every Triton pool_bn_stats_backward call was given."""

    def __init__(self):
        super().__init__()
        self.given = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.fastdarts_triton.pool_bn_stats_backward.default:
            self.given.append((args[0] is not None, args[1] is not None))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("used", ["max", "avg"])
def test_gradient_of_one_pool(used, stride):
    x = make_x((2, 5, 9, 8), layout="contiguous")
    outs = triton_pools(x, stride)
    k = 0 if used == "max" else 1
    expected = (
        F.max_pool2d(x, 3, stride, 1) if used == "max" else F.avg_pool2d(x, 3, stride, 1, count_include_pad=False)
    )
    grad_out = torch.randn_like(expected)
    with RecordBackwardCalls() as record:
        (got,) = torch.autograd.grad(outs[k], x, grad_out)
    assert record.given == [(used == "max", used == "avg")]  # the unused pool's gradient is None, not zeros
    (want,) = torch.autograd.grad(expected, x, grad_out)
    torch.testing.assert_close(got, want, **GRAD_TOL)
    backward = torch.ops.fastdarts_triton.pool_bn_stats_backward
    assert torch.equal(backward(None, None, x.detach(), stride), torch.zeros_like(x))


@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract")  # -inf - -inf: the interpreter's numpy
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("case", ["zeros", "constant", "minus_inf", "few_values"])
def test_ties_route_the_gradient_like_aten(case, stride):
    # Every tie goes to the first tap in scan order, as ATen's max_pool2d indices do. Compared exactly: each grad_x
    # value is a sum of at most 9 small integers.
    shape = (2, 5, 7, 8)
    x = {
        "zeros": torch.zeros(shape),
        "constant": torch.full(shape, 2.5),
        "minus_inf": torch.full(shape, float("-inf")),
        "few_values": torch.randint(0, 3, shape).float(),
    }[case].requires_grad_()
    max_out = triton_pools(x, stride)[0]
    expected = F.max_pool2d(x, 3, stride, 1)
    assert torch.equal(max_out, expected)
    grad_out = torch.randint(1, 5, expected.shape).float()
    (got,) = torch.autograd.grad(max_out, x, grad_out)
    (want,) = torch.autograd.grad(expected, x, grad_out)
    assert torch.equal(got, want)
    if case != "few_values":  # one value everywhere: each window's gradient goes to its top-left pixel
        corners = torch.zeros_like(want)
        for ho, wo in itertools.product(range(expected.shape[2]), range(expected.shape[3])):
            corners[:, :, max(ho * stride - 1, 0), max(wo * stride - 1, 0)] += grad_out[:, :, ho, wo]
        assert torch.equal(got, corners)


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
    x = make_x((0, 4, 7, 7))
    max_out, avg_out, mean, var = triton_pools(x, 2)
    assert max_out.shape == avg_out.shape == (0, 4, 4, 4)
    assert mean.isnan().all() and var.isnan().all()
    (grad,) = torch.autograd.grad(max_out.sum() + avg_out.sum(), x)
    assert grad.shape == x.shape


@pytest.mark.parametrize("layout", ["strided_x", "permuted_x", "expanded_grads", "mixed_grads"])
def test_other_layouts(layout):
    x = make_x((2, 5, 9, 7))
    if layout == "strided_x":  # a view that is not dense
        x = torch.randn(2, 5, 9, 14)[..., ::2].requires_grad_()
    if layout == "permuted_x":  # dense, but neither contiguous nor channels_last
        x = torch.randn(2, 7, 9, 5).permute(0, 3, 2, 1).requires_grad_()
    outs = triton_pools(x, 2)
    expected = reference.pool_bn_stats(x, 2)
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got, want, **OUT_TOL)
    grad_outs = [torch.randn_like(expected[0]), torch.randn_like(expected[1])]
    if layout == "expanded_grads":  # what autograd hands over after a sum: stride 0 everywhere
        grad_outs = [torch.randn(()).expand(e.shape) for e in expected[:2]]
    if layout == "mixed_grads":
        grad_outs[1] = grad_outs[1].contiguous()
    (got,) = torch.autograd.grad(outs[:2], x, grad_outs)
    (want,) = torch.autograd.grad(expected[:2], x, grad_outs)
    torch.testing.assert_close(got, want, **GRAD_TOL)


def test_saves_only_x():
    x = make_x((2, 4, 9, 9))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _, _, mean, var = triton_pools(x, 1)
    assert len(saved) == 1 and saved[0].data_ptr() == x.data_ptr() and saved[0].shape == x.shape
    assert not mean.requires_grad and not var.requires_grad


def test_gradcheck_and_gradgradcheck_float64():
    # Distinct values a good way apart, so that finite differences never change a window's argmax.
    x = (torch.randperm(2 * 3 * 6 * 5, dtype=torch.float64).reshape(2, 3, 6, 5) / 10).requires_grad_()

    def pools(x):
        return tuple(triton_pools(x, 2)[:2])

    assert torch.autograd.gradcheck(pools, (x,), eps=1e-4, fast_mode=True)
    assert torch.autograd.gradgradcheck(pools, (x,), eps=1e-4, fast_mode=True)


def test_double_backward_matches_reference():
    x = make_x((2, 5, 7, 6), torch.float64)
    grad_outs = [torch.randn(2, 5, 4, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    direction = torch.randn_like(x)

    def second_derivatives(backend):
        outs = ops.pool_bn_stats(x, 2, backend=backend)[:2]
        (first,) = torch.autograd.grad(outs, x, grad_outs, create_graph=True)
        return torch.autograd.grad((first * direction).sum(), grad_outs)

    for got, want in zip(second_derivatives("triton"), second_derivatives("reference")):
        torch.testing.assert_close(got, want, **F64_TOL)


BAD_INPUTS = [
    ("x_3d", lambda: (torch.randn(4, 7, 7), 1), ValueError, r"pool_bn_stats: x must be a 4-D \[N, C, H, W\] tensor"),
    ("stride_3", lambda: (torch.randn(2, 4, 7, 7), 3), ValueError, "pool_bn_stats: stride must be 1 or 2, got 3"),
    ("int64", lambda: (torch.ones(2, 4, 7, 7, dtype=torch.int64), 1), TypeError, "only float32 and float64"),
]


@pytest.mark.parametrize("make,error,message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(make, error, message):
    with pytest.raises(error, match=message):
        triton_pools(*make())


@pytest.mark.parametrize(
    "grad_max,grad_avg,error,message",
    [
        (torch.randn(2, 4, 7, 7), None, ValueError, r"grad_max must have shape \[2, 4, 4, 4\], got \[2, 4, 7, 7\]"),
        (None, torch.randn(2, 4, 4, 4).double(), TypeError, "grad_avg must have the dtype of x"),
    ],
    ids=["shape", "dtype"],
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
