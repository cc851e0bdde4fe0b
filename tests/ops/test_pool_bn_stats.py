import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from fastdarts import ops
from fastdarts.ops import reference

from ..conftest import requires_ext
from ._helpers import RecordCalls, backend_ops, memory_format_of

SHAPES = [(N, C, S, S) for N, C, S in itertools.product([1, 3], [4, 5, 16, 33], [7, 8, 9])] + [(3, 16, 7, 10)]
SHAPE_IDS = ["x".join(map(str, shape)) for shape in SHAPES]
# Outputs: 1e-4 relative in float32 (the average's sum runs in another order than ATen's). Gradients: 1e-3.
TOLERANCES = {
    torch.float32: dict(out=dict(rtol=1e-4, atol=1e-5), grad=dict(rtol=1e-3, atol=1e-4)),
    torch.float64: dict(out=dict(rtol=1e-10, atol=1e-12), grad=dict(rtol=1e-10, atol=1e-10)),
}


def make_x(shape, dtype=torch.float32, layout="channels_last", requires_grad=True):
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=memory_format_of(layout))
    return x.requires_grad_(requires_grad)


def aten_pools(x, stride):
    return F.max_pool2d(x, 3, stride, 1), F.avg_pool2d(x, 3, stride, 1, count_include_pad=False)


def var_mean_of(max_out, avg_out):
    """torch.var_mean's [2, C] statistics of the two pools, in the pools' dtype."""
    pools = torch.stack([max_out.detach(), avg_out.detach()])
    return torch.var_mean(pools, dim=(1, 3, 4), correction=0)


def check_matches_reference(backend, shape, stride, layout):
    x = make_x(shape, layout=layout)
    tol = TOLERANCES[torch.float32]
    max_out, avg_out, mean, var = ops.pool_bn_stats(x, stride, backend=backend)
    expected = reference.pool_bn_stats(x, stride)
    for got, want in zip((max_out, avg_out, mean, var), expected):
        torch.testing.assert_close(got, want, **tol["out"])
    for out in (max_out, avg_out):  # laid out like x
        assert out.is_contiguous(memory_format=memory_format_of(layout))
    assert mean.shape == var.shape == (2, shape[1])
    # The statistics are those of the kernel's own pools.
    want_var, want_mean = var_mean_of(max_out, avg_out)
    torch.testing.assert_close(mean, want_mean, **tol["out"])
    torch.testing.assert_close(var, want_var, **tol["out"])

    grad_outs = [torch.randn_like(expected[0]), torch.randn_like(expected[1])]
    (got,) = torch.autograd.grad([max_out, avg_out], x, grad_outs)
    (want,) = torch.autograd.grad(expected[:2], x, grad_outs)
    torch.testing.assert_close(got, want, **tol["grad"])
    assert got.stride() == x.stride()


@requires_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_cpp_matches_reference(shape, stride, layout, cpu_isa):
    check_matches_reference("cpp", shape, stride, layout)


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("C", [4, 8, 13, 20, 36])
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
def test_short_channel_tails_equal_one_channel_at_a_time(stride, C, dtype, cpu_isa):
    # Channels past the last 64 bytes run in 16-byte vectors, and at stride 1 a vector holds several pixels of 4 or 8
    # channels (PC-DARTS's), with each channel's arithmetic as one at a time, which a contiguous x takes: the same
    # bits, forward and backward. Only the statistics' double sums may be added in another order.
    x = make_x((2, C, 7, 9), dtype)
    results = []
    for layout in ("channels_last", "contiguous"):
        xl = x.detach().contiguous(memory_format=memory_format_of(layout)).requires_grad_()
        outs = ops.pool_bn_stats(xl, stride, backend="cpp")
        generator = torch.Generator().manual_seed(5)
        grads = [torch.randn(outs[0].shape, dtype=dtype, generator=generator) for _ in range(2)]
        (grad_x,) = torch.autograd.grad(outs[:2], xl, grads)
        results.append([t.detach() for t in outs] + [grad_x])
    for i, (got, want) in enumerate(zip(*results)):
        if i in (2, 3):  # mean, var
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        else:
            assert torch.equal(got, want)


@requires_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("stride", [1, 2])
def test_float64_matches_reference(stride, layout, cpu_isa):
    x = make_x((2, 19, 9, 8), torch.float64, layout)
    got = ops.pool_bn_stats(x, stride, backend="cpp")
    want = reference.pool_bn_stats(x, stride)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOLERANCES[torch.float64]["out"])
    grad_outs = [torch.randn_like(w) for w in want[:2]]
    torch.testing.assert_close(
        torch.autograd.grad(got[:2], x, grad_outs)[0],
        torch.autograd.grad(want[:2], x, grad_outs)[0],
        **TOLERANCES[torch.float64]["grad"],
    )


def check_statistics_in_double(backend, x):
    # Far from zero, float32 sums of squares would lose the variance (1e3^2 against 1); the kernel's must agree
    # with float64 statistics of its own float32 pools to the float32 rounding of the result.
    for stride in (1, 2):
        max_out, avg_out, mean, var = ops.pool_bn_stats(x, stride, backend=backend)
        want_var, want_mean = var_mean_of(max_out.double(), avg_out.double())
        torch.testing.assert_close(mean, want_mean.float(), rtol=1e-6, atol=0)
        torch.testing.assert_close(var, want_var.float(), rtol=1e-6, atol=0)


@requires_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("offset", [0.0, 1e3], ids=["centred", "offset"])
def test_statistics_are_accumulated_in_double(offset, layout, cpu_isa):
    x = (offset + torch.randn(4, 16, 16, 16)).contiguous(memory_format=memory_format_of(layout))
    check_statistics_in_double("cpp", x)


def check_gradient_of_one_pool(backend, used, stride, x):
    backward = backend_ops(backend).pool_bn_stats_backward
    outs = ops.pool_bn_stats(x, stride, backend=backend)
    k = 0 if used == "max" else 1
    expected = aten_pools(x, stride)[k]
    grad_out = torch.randn_like(expected)
    with RecordCalls(backward.default, lambda args: (args[0] is not None, args[1] is not None)) as record:
        (got,) = torch.autograd.grad(outs[k], x, grad_out)
    # The unused pool's gradient reaches the backward as None, not as zeros to add.
    assert record.calls == [(used == "max", used == "avg")]
    (want,) = torch.autograd.grad(expected, x, grad_out)
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32]["grad"])
    # The op itself, with the other gradient None, and with neither.
    grads = [grad_out, None] if used == "max" else [None, grad_out]
    torch.testing.assert_close(backward(*grads, x.detach(), stride), want, **TOLERANCES[torch.float32]["grad"])
    assert torch.equal(backward(None, None, x.detach(), stride), torch.zeros_like(x))


@requires_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("used", ["max", "avg"])
def test_gradient_of_one_pool(used, stride, layout, cpu_isa):
    check_gradient_of_one_pool("cpp", used, stride, make_x((3, 17, 9, 10), layout=layout))


def check_ties_route_the_gradient_like_aten(backend, case, stride, shape, layout):
    # Every tie must go to the first tap in scan order, as ATen's max_pool2d indices do. Compared exactly: each
    # grad_x value is a sum of at most 9 small integers, exact in any order.
    x = {
        "zeros": torch.zeros(shape),
        "constant": torch.full(shape, 2.5),
        "minus_inf": torch.full(shape, float("-inf")),
        "few_values": torch.randint(0, 3, shape).float(),
    }[case]
    x = x.contiguous(memory_format=memory_format_of(layout)).requires_grad_()
    max_out = ops.pool_bn_stats(x, stride, backend=backend)[0]
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


@requires_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("case", ["zeros", "constant", "minus_inf", "few_values"])
@pytest.mark.parametrize("C", [18, 4])  # 4: several pixels to a vector at stride 1
def test_ties_route_the_gradient_like_aten(C, case, stride, layout, cpu_isa):
    check_ties_route_the_gradient_like_aten("cpp", case, stride, (2, C, 7, 11), layout)


@requires_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("stride", [1, 2])
def test_nan_propagates_like_aten(stride, layout, cpu_isa):
    x = torch.randn(2, 20, 9, 9)
    x[0, 3, 4, 4] = float("nan")
    x[1, 17, 0, 0] = float("nan")
    x[1, 17, 1, 1] = float("nan")  # two NaNs in one window: ATen's index follows the last one
    x[0, 16:20, 6, 2] = float("nan")  # in the vector channels and the ones after them
    x = x.contiguous(memory_format=memory_format_of(layout)).requires_grad_()
    max_out, avg_out, mean, var = ops.pool_bn_stats(x, stride, backend="cpp")
    expected = aten_pools(x, stride)
    torch.testing.assert_close(max_out, expected[0], equal_nan=True)
    torch.testing.assert_close(avg_out, expected[1], equal_nan=True, **TOLERANCES[torch.float32]["out"])
    assert max_out.isnan().sum() > 0 and torch.equal(max_out.isnan(), avg_out.isnan())
    nan_channels = torch.tensor([c in (3, 16, 17, 18, 19) for c in range(20)])
    assert torch.equal(mean.isnan(), nan_channels.expand(2, 20)) and torch.equal(var.isnan(), mean.isnan())
    grad_out = torch.randint(1, 5, expected[0].shape).float()
    (got,) = torch.autograd.grad(max_out, x, grad_out)
    (want,) = torch.autograd.grad(expected[0], x, grad_out)
    assert torch.equal(got, want)


@requires_ext
def test_nan_propagates_like_aten_with_several_pixels_to_a_vector(cpu_isa):
    x = torch.randn(2, 4, 6, 11)
    x[0, 1, 3, 4] = float("nan")
    x[1, 2, 2, 5] = x[1, 2, 3, 6] = float("nan")  # two NaNs in one window: ATen's index follows the last one
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    max_out, avg_out, _, _ = ops.pool_bn_stats(x, 1, backend="cpp")
    expected = aten_pools(x, 1)
    torch.testing.assert_close(max_out, expected[0], equal_nan=True)
    torch.testing.assert_close(avg_out, expected[1], equal_nan=True, **TOLERANCES[torch.float32]["out"])
    grad_out = torch.randint(1, 5, expected[0].shape).float()
    (got,) = torch.autograd.grad(max_out, x, grad_out)
    (want,) = torch.autograd.grad(expected[0], x, grad_out)
    assert torch.equal(got, want)


def check_empty_batch(backend):
    x = make_x((0, 4, 7, 7))
    max_out, avg_out, mean, var = ops.pool_bn_stats(x, 2, backend=backend)
    assert max_out.shape == avg_out.shape == (0, 4, 4, 4)
    assert mean.isnan().all() and var.isnan().all()
    (grad,) = torch.autograd.grad(max_out.sum() + avg_out.sum(), x)
    assert grad.shape == x.shape


@requires_ext
def test_empty_batch():
    check_empty_batch("cpp")


def check_other_layouts(backend, layout, C):
    x = make_x((2, C, 9, 7))
    if layout == "strided_x":  # a view that is not dense
        x = torch.randn(2, C, 9, 14)[..., ::2].requires_grad_()
    if layout == "permuted_x":  # dense, but neither contiguous nor channels_last
        x = torch.randn(2, 7, 9, C).permute(0, 3, 2, 1).requires_grad_()
    outs = ops.pool_bn_stats(x, 2, backend=backend)
    expected = reference.pool_bn_stats(x, 2)
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32]["out"])
    grad_outs = [torch.randn_like(expected[0]), torch.randn_like(expected[1])]
    if layout == "expanded_grads":  # what autograd hands over after a sum: stride 0 everywhere
        grad_outs = [torch.randn(()).expand(e.shape) for e in expected[:2]]
    if layout == "mixed_grads":
        grad_outs[1] = grad_outs[1].contiguous()
    (got,) = torch.autograd.grad(outs[:2], x, grad_outs)
    (want,) = torch.autograd.grad(expected[:2], x, grad_outs)
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32]["grad"])


@requires_ext
@pytest.mark.parametrize("layout", ["strided_x", "permuted_x", "expanded_grads", "mixed_grads"])
def test_other_layouts(layout, cpu_isa):
    check_other_layouts("cpp", layout, 17)


def check_saves_only_x(backend, C):
    x = make_x((2, C, 9, 9))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        max_out, avg_out, mean, var = ops.pool_bn_stats(x, 1, backend=backend)
    assert len(saved) == 1 and saved[0].data_ptr() == x.data_ptr() and saved[0].shape == x.shape
    assert not mean.requires_grad and not var.requires_grad


@requires_ext
def test_saves_only_x():
    check_saves_only_x("cpp", 16)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_float64(backend, stride, layout):
    # Distinct values a good way apart, so that finite differences never change a window's argmax.
    x = torch.randperm(2 * 3 * 6 * 5, dtype=torch.float64).reshape(2, 3, 6, 5) / 10
    x = x.contiguous(memory_format=memory_format_of(layout)).requires_grad_()

    def pools(x):
        return tuple(ops.pool_bn_stats(x, stride, backend=backend)[:2])

    assert torch.autograd.gradcheck(pools, (x,), eps=1e-4)
    assert torch.autograd.gradgradcheck(pools, (x,), eps=1e-4, fast_mode=True)


def check_double_backward_matches_reference(backend, tol):
    x = make_x((2, 5, 7, 6), torch.float64)
    grad_outs = [torch.randn(2, 5, 4, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    direction = torch.randn_like(x)

    def second_derivatives(backend):
        outs = ops.pool_bn_stats(x, 2, backend=backend)[:2]
        (first,) = torch.autograd.grad(outs, x, grad_outs, create_graph=True)
        return torch.autograd.grad((first * direction).sum(), grad_outs)

    for got, want in zip(second_derivatives(backend), second_derivatives("reference")):
        torch.testing.assert_close(got, want, **tol)


@requires_ext
def test_double_backward_matches_reference():
    check_double_backward_matches_reference("cpp", TOLERANCES[torch.float64]["grad"])


@requires_ext
def test_statistics_do_not_depend_on_the_thread_count(cpu_isa):
    # 512 output rows of 256 values: more than one task's worth (32768 values), so 2 threads both take rows.
    x = make_x((32, 16, 16, 16), requires_grad=False)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(ops.pool_bn_stats(x, 1, backend="cpp"))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):  # the statistics too: their sums are taken per fixed chunk of rows
        assert torch.equal(a, b)


def pool_bn_stats_samples():
    return [
        ("contiguous", (make_x((2, 5, 7, 6), layout="contiguous"), 1)),
        ("channels_last_stride2", (make_x((2, 17, 7, 6)), 2)),
        ("no_grad_f64", (make_x((1, 16, 9, 9), torch.float64, requires_grad=False), 2)),
    ]


def pool_bn_stats_backward_samples():
    samples = []
    for given in ("both", "max", "avg"):
        for needs_grad in (False, True):
            grad_max = torch.randn(2, 17, 4, 3, requires_grad=needs_grad) if given != "avg" else None
            grad_avg = torch.randn(2, 17, 4, 3, requires_grad=needs_grad) if given != "max" else None
            x = make_x((2, 17, 7, 6), requires_grad=False)
            samples.append((f"{given}-needs_grad={needs_grad}", (grad_max, grad_avg, x, 2)))
    x = make_x((2, 5, 7, 6), torch.float64, "contiguous", requires_grad=False)
    grads = [torch.randn(2, 5, 7, 6, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    samples.append(("contiguous_f64_stride1", (*grads, x, 1)))
    return samples


@requires_ext
@pytest.mark.parametrize("args", [s for _, s in pool_bn_stats_samples()], ids=[i for i, _ in pool_bn_stats_samples()])
def test_opcheck_pool_bn_stats(args):
    opcheck(torch.ops.fastdarts.pool_bn_stats.default, args)


@requires_ext
@pytest.mark.parametrize(
    "args", [s for _, s in pool_bn_stats_backward_samples()], ids=[i for i, _ in pool_bn_stats_backward_samples()]
)
def test_opcheck_pool_bn_stats_backward(args):
    opcheck(torch.ops.fastdarts.pool_bn_stats_backward.default, args)


BAD_INPUTS = [
    ("x_3d", lambda: (torch.randn(4, 7, 7), 1), ValueError, r"pool_bn_stats: x must be a 4-D \[N, C, H, W\] tensor"),
    ("x_no_pixels", lambda: (torch.randn(2, 4, 0, 7), 1), ValueError, "with C, H, W >= 1, got shape"),
    ("stride_3", lambda: (torch.randn(2, 4, 7, 7), 3), ValueError, "pool_bn_stats: stride must be 1 or 2, got 3"),
    ("stride_0", lambda: (torch.randn(2, 4, 7, 7), 0), ValueError, "pool_bn_stats: stride must be 1 or 2, got 0"),
]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
@pytest.mark.parametrize("make,error,message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(backend, make, error, message):
    with pytest.raises(error, match=message):
        ops.pool_bn_stats(*make(), backend=backend)


@pytest.mark.parametrize(
    "backend,message",
    [
        ("reference", "pool_bn_stats: x must be floating point, got torch.int64"),
        pytest.param("cpp", "pool_bn_stats: only float32 and float64 are supported, got Long", marks=requires_ext),
    ],
)
def test_integer_x_is_rejected(backend, message):
    with pytest.raises(TypeError, match=message):
        ops.pool_bn_stats(torch.ones(2, 4, 7, 7, dtype=torch.int64), 1, backend=backend)


BAD_GRADIENTS = [
    (
        "shape",
        torch.randn(2, 4, 7, 7),
        None,
        ValueError,
        r"grad_max must have shape \[2, 4, 4, 4\], got \[2, 4, 7, 7\]",
    ),
    ("dtype", None, torch.randn(2, 4, 4, 4).double(), TypeError, "grad_avg must have the dtype of x"),
    ("device", None, torch.randn(2, 4, 4, 4, device="meta"), ValueError, "grad_avg must be on the device of x"),
]


@requires_ext
@pytest.mark.parametrize(
    "grad_max,grad_avg,error,message", [c[1:] for c in BAD_GRADIENTS], ids=[c[0] for c in BAD_GRADIENTS]
)
def test_backward_op_checks_its_gradients(grad_max, grad_avg, error, message):
    with pytest.raises(error, match=f"pool_bn_stats_backward: {message}"):
        torch.ops.fastdarts.pool_bn_stats_backward(grad_max, grad_avg, torch.randn(2, 4, 7, 7), 2)


@requires_ext
def test_backward_op_rejects_integer_x_and_bad_stride():
    with pytest.raises(TypeError, match="pool_bn_stats_backward: only float32 and float64 are supported"):
        torch.ops.fastdarts.pool_bn_stats_backward(None, None, torch.ones(2, 4, 7, 7, dtype=torch.int32), 1)
    with pytest.raises(ValueError, match="pool_bn_stats_backward: stride must be 1 or 2, got 3"):
        torch.ops.fastdarts.pool_bn_stats_backward(None, None, torch.ones(2, 4, 7, 7), 3)


def normalised_pools(x):
    """The two pools through their affine-free BNs, reduced to a scalar."""
    max_out, avg_out, mean, var = ops.pool_bn_stats(x, 1)
    scale = (var + 1e-5).rsqrt()[:, None, :, None, None]
    y = (torch.stack([max_out, avg_out]) - mean[:, None, :, None, None]) * scale
    return (y * y.flip(-1)).sum()


@requires_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_compile_fullgraph_matches_eager(layout):
    torch._dynamo.reset()
    x = make_x((2, 4, 7, 7), layout=layout)
    got = torch.compile(normalised_pools, fullgraph=True, backend="aot_eager")(x)
    expected = normalised_pools(x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(expected, x)[0])
