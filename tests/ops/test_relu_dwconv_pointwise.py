"""relu_dwconv_pointwise: the C++ kernel (depthwise convs straight into their 1x1 convs, tile by tile) against the
reference (reference.relu_dwconv_pointwise: ATen's depthwise and 1x1 convs and torch.var_mean)."""

import pytest
import torch
from torch.library import opcheck

from fastdarts import ops
from fastdarts.ops import reference

from ..conftest import requires_ext
from ._helpers import memory_format_of
from .test_relu_dwconv import DARTS, TOLERANCES, assert_all_close, make_inputs

KERNELS = {"one": [(3, 1)], "darts": DARTS}
# Batch 1 and 3; C 4, 5 (not a whole vector) and 16; odd and even sizes.
SHAPES = [(1, 4, 7, 7), (3, 5, 9, 9), (3, 16, 8, 8), (2, 16, 9, 7), (3, 4, 9, 9)]
# Narrow channels that the CPU kernels pack several columns to a vector: C divides 16 and Wo C is a multiple of 16,
# at widths where packing saves work (2 to 16 columns to a vector in float32, a tail of padding columns at 36). The
# 1x1 convs of C = 1, 2, 4 and 8 run by lane shuffles on the tiers whose registers hold whole columns, and by the
# block-diagonal matrix on the others (C = 8 in float32 and C = 4 in float64 on the baseline's 16-byte registers).
SHAPES += [(3, 8, 5, 10), (1, 4, 5, 36), (2, 2, 3, 64), (2, 1, 3, 32)]
# Rows of 24 output columns (stride 1 at 23, stride 2 at 45): a wide block of the AVX-512 loops and a narrow one.
SHAPES += [(1, 5, 4, 23), (1, 3, 3, 45)]
SHAPE_IDS = ["x".join(map(str, shape)) for shape in SHAPES]
# The batch statistics: sums over up to 3 * 81 values of the outputs.
STAT_TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def make_pointwise(C, K, dtype=torch.float32, requires_grad=True):
    return [(0.5 * torch.randn(C, C, 1, 1, dtype=dtype)).requires_grad_(requires_grad) for _ in range(K)]


def run(backend, x, weights, pointwise, dilations, stride, relu, grad_outs=None):
    """(outs, mean, var) and, with grad_outs, the gradients of x, the depthwise and the 1x1 weights."""
    outs, mean, var = ops.relu_dwconv_pointwise(x, weights, pointwise, dilations, stride, relu, backend=backend)
    if grad_outs is None:
        return outs, mean, var, None
    inputs = [t for t in (x, *weights, *pointwise) if t.requires_grad]
    # One scalar: in the reference, the outputs that need no gradient (those of other 1x1 weights) have no graph.
    loss = sum((out * grad).sum() for out, grad in zip(outs, grad_outs))
    return outs, mean, var, torch.autograd.grad(loss, inputs)


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("kernels", list(KERNELS), ids=list(KERNELS))
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_cpp_matches_reference(shape, stride, kernels, relu, layout, dtype, cpu_isa):
    x, weights, dilations = make_inputs(shape, KERNELS[kernels], dtype, layout)
    pointwise = make_pointwise(shape[1], len(weights), dtype)
    tol = TOLERANCES[dtype]
    expected = run("reference", x, weights, pointwise, dilations, stride, relu)
    grad_outs = [torch.randn_like(e) for e in expected[0]]
    outs, mean, var, got = run("cpp", x, weights, pointwise, dilations, stride, relu, grad_outs)
    _, _, _, want = run("reference", x, weights, pointwise, dilations, stride, relu, grad_outs)
    assert_all_close(outs, expected[0], tol["out"])
    torch.testing.assert_close(mean, expected[1], **STAT_TOLERANCES[dtype])
    torch.testing.assert_close(var, expected[2], **STAT_TOLERANCES[dtype])
    assert not mean.requires_grad and not var.requires_grad
    for out in outs:  # laid out like x
        assert out.is_contiguous(memory_format=memory_format_of(layout))
    assert_all_close(got, want, tol["grad"])
    assert got[0].stride() == x.stride()


@requires_ext
@pytest.mark.parametrize("shape", [(2, 33, 11, 10), (2, 40, 6, 6)], ids=["C33", "C40"])
def test_cpp_matches_reference_for_wider_channels_and_stride_3(shape, cpu_isa):
    """More channels than one vector (and a part of one), a stride past DARTS's, kernel sizes 1 and 7."""
    kernels = [(1, 1), (3, 1), (7, 1), (5, 3)]
    x, weights, dilations = make_inputs(shape, kernels)
    pointwise = make_pointwise(shape[1], len(weights))
    expected = run("reference", x, weights, pointwise, dilations, 3, True)
    grad_outs = [torch.randn_like(e) for e in expected[0]]
    got = run("cpp", x, weights, pointwise, dilations, 3, True, grad_outs)
    want = run("reference", x, weights, pointwise, dilations, 3, True, grad_outs)
    assert_all_close(got[0], expected[0], TOLERANCES[torch.float32]["out"])
    torch.testing.assert_close(got[1], expected[1], **STAT_TOLERANCES[torch.float32])
    torch.testing.assert_close(got[2], expected[2], **STAT_TOLERANCES[torch.float32])
    assert_all_close(got[3], want[3], TOLERANCES[torch.float32]["grad"])


@requires_ext
def test_statistics_of_outputs_far_from_zero(cpu_isa):
    """A large mean against a small spread: the variance from sums of squares in double stays accurate."""
    x, weights, dilations = make_inputs((3, 16, 9, 9), DARTS, x_grad=False, w_grad=False)
    x = x.abs() + 100.0
    pointwise = make_pointwise(16, 4, requires_grad=False)
    _, mean, var = ops.relu_dwconv_pointwise(x, weights, pointwise, dilations, 1, backend="cpp")
    _, want_mean, want_var = ops.relu_dwconv_pointwise(x, weights, pointwise, dilations, 1, backend="reference")
    torch.testing.assert_close(mean, want_mean, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(var, want_var, rtol=1e-3, atol=1e-3)


@requires_ext
@pytest.mark.parametrize("needs_grad", ["x", "depthwise", "pointwise", "one_pointwise"])
def test_computes_only_the_gradients_asked_for(needs_grad):
    x, weights, dilations = make_inputs((2, 5, 7, 7), DARTS, x_grad=needs_grad == "x", w_grad=needs_grad == "depthwise")
    pointwise = make_pointwise(5, 4, requires_grad=needs_grad == "pointwise")
    if needs_grad == "one_pointwise":
        pointwise[2].requires_grad_()
    inputs = [t for t in (x, *weights, *pointwise) if t.requires_grad]
    grad_outs = [torch.randn(2, 5, 7, 7) for _ in weights]
    got = run("cpp", x, weights, pointwise, dilations, 1, True, grad_outs)[3]
    want = run("reference", x, weights, pointwise, dilations, 1, True, grad_outs)[3]
    assert len(got) == len(inputs)
    assert_all_close(got, want, TOLERANCES[torch.float32]["grad"])


@requires_ext
def test_saves_only_x_and_the_weights():
    x, weights, dilations = make_inputs((2, 16, 16, 16), DARTS, layout="channels_last")
    pointwise = make_pointwise(16, 4)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.relu_dwconv_pointwise(x, weights, pointwise, dilations, 1, backend="cpp")
    storages = {t.untyped_storage().data_ptr() for t in saved}
    assert storages == {t.untyped_storage().data_ptr() for t in (x, *weights, *pointwise)}


def make_normalisation(C, dtype=torch.float32, requires_grad=True):
    """A middle BN's [1, C] mean and invstd, away from 0 and 1 so that a wrong formula shows."""
    mean = (0.3 * torch.randn(1, C, dtype=dtype)).requires_grad_(requires_grad)
    invstd = (0.5 + torch.rand(1, C, dtype=dtype)).requires_grad_(requires_grad)
    return mean, invstd


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
@pytest.mark.parametrize("shape", [(3, 5, 9, 9), (2, 16, 9, 7), (1, 4, 5, 36)], ids=["C5", "C16", "C4_packed"])
def test_cpp_matches_reference_on_a_normalised_input(shape, stride, layout, dtype, cpu_isa):
    """input_mean and input_invstd (a sep conv's middle BN read by its second stage): the outputs, statistics and
    every gradient, those of the normalisation's mean and invstd included."""
    x, weights, dilations = make_inputs(shape, KERNELS["darts"], dtype, layout)
    pointwise = make_pointwise(shape[1], len(weights), dtype)
    mean, invstd = make_normalisation(shape[1], dtype)
    results = {}
    for backend in ("reference", "cpp"):
        outs, m, v = ops.relu_dwconv_pointwise(x, weights, pointwise, dilations, stride, True, mean, invstd,
                                               backend=backend)  # fmt: skip
        torch.manual_seed(1)
        loss = sum((out * torch.randn_like(out)).sum() for out in outs)
        results[backend] = outs, m, v, torch.autograd.grad(loss, [x, *weights, *pointwise, mean, invstd])
    (outs, m, v, got), (expected, em, ev, want) = results["cpp"], results["reference"]
    tol = TOLERANCES[dtype]
    assert_all_close(outs, expected, tol["out"])
    torch.testing.assert_close(m, em, **STAT_TOLERANCES[dtype])
    torch.testing.assert_close(v, ev, **STAT_TOLERANCES[dtype])
    assert_all_close(got, want, tol["grad"])


@requires_ext
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
@pytest.mark.parametrize("shape", [(2, 8, 11, 9), (3, 8, 5, 10), (1, 4, 5, 36)], ids=["C8", "C8_packed", "C4_packed"])
def test_a_normalised_input_is_the_input_normalised_first(shape, stride, cpu_isa):
    """The kernel normalises as it reads x exactly as ATen's (x - mean) * invstd: the same bits as the kernel on the
    normalised tensor, forward and backward (whose input gradient is then the normalised input's)."""
    x, weights, dilations = make_inputs(shape, KERNELS["darts"], layout="channels_last", x_grad=False, w_grad=False)
    C = shape[1]
    pointwise = make_pointwise(C, 4, requires_grad=False)
    mean, invstd = make_normalisation(C, requires_grad=False)
    u = (x - mean.reshape(1, C, 1, 1)) * invstd.reshape(1, C, 1, 1)
    fused = torch.ops.fastdarts.relu_dwconv_pointwise(x, weights, pointwise, dilations, stride, True, mean, invstd)
    plain = torch.ops.fastdarts.relu_dwconv_pointwise(u, weights, pointwise, dilations, stride, True)
    assert all(torch.equal(a, b) for a, b in zip([*fused[0], *fused[1:]], [*plain[0], *plain[1:]]))
    grads = [torch.randn_like(out) for out in plain[0]]
    backward = torch.ops.fastdarts.relu_dwconv_pointwise_backward
    fused = backward(grads, x, weights, pointwise, dilations, stride, True, True, True, mean, invstd)
    plain = backward(grads, u, weights, pointwise, dilations, stride, True, True, True)
    assert torch.equal(fused[0], plain[0])
    assert all(torch.equal(a, b) for a, b in zip([*fused[1], *fused[2]], [*plain[1], *plain[2]]))
    # The sums the normalisation's backward needs, made in the same pass: of dL/du and of dL/du u.
    assert plain[3] is None
    expected = torch.stack([fused[0].sum((0, 2, 3)), (fused[0] * u).sum((0, 2, 3))])
    torch.testing.assert_close(fused[3], expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck_float64_on_a_normalised_input(backend, stride):
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    mean, invstd = make_normalisation(3, torch.float64)
    # the normalised input away from ReLU's kink, where finite differences would straddle it
    x = (x + 0.2 * (x - mean.detach().reshape(1, 3, 1, 1)).sign()).requires_grad_()
    weights = [torch.randn(3, 1, k, k, dtype=torch.float64, requires_grad=True) for k in (3, 5)]
    pointwise = make_pointwise(3, 2, torch.float64)

    def f(x, mean, invstd, *params):
        return tuple(ops.relu_dwconv_pointwise(x, params[:2], params[2:], [2, 1], stride, True, mean, invstd,
                                               backend=backend)[0])  # fmt: skip

    assert torch.autograd.gradcheck(f, (x, mean, invstd, *weights, *pointwise))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck_float64(backend, stride):
    # x away from ReLU's kink, where finite differences would straddle it.
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    x = (x + 0.1 * x.sign()).contiguous(memory_format=torch.channels_last).requires_grad_()
    weights = [torch.randn(3, 1, k, k, dtype=torch.float64, requires_grad=True) for k in (3, 5)]
    pointwise = make_pointwise(3, 2, torch.float64)

    def f(x, *params):
        return tuple(ops.relu_dwconv_pointwise(x, params[:2], params[2:], [2, 1], stride, backend=backend)[0])

    assert torch.autograd.gradcheck(f, (x, *weights, *pointwise))


@requires_ext
def test_double_backward_is_refused_with_a_clear_error():
    x, weights, dilations = make_inputs((2, 4, 7, 7), DARTS)
    pointwise = make_pointwise(4, 4)
    outs, _, _ = ops.relu_dwconv_pointwise(x, weights, pointwise, dilations, 1, backend="cpp")
    (grad_x,) = torch.autograd.grad(sum(o.square().sum() for o in outs), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="the 'cpp' backend is differentiable once"):
        torch.autograd.grad(grad_x.sum(), [pointwise[0]])


@requires_ext
def test_results_do_not_depend_on_the_thread_count(cpu_isa):
    # 40 columns x 16 channels: 2 chunks per image and 6 in all, split between the threads differently below.
    x, weights, dilations = make_inputs((3, 16, 40, 40), DARTS)
    pointwise = make_pointwise(16, 4)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            outs, mean, var = ops.relu_dwconv_pointwise(x, weights, pointwise, dilations, 1, backend="cpp")
            grads = torch.autograd.grad(outs, [x, *weights, *pointwise], [torch.ones_like(o) for o in outs])
            results.append([mean, var, *grads])
    finally:
        torch.set_num_threads(previous)
    for result in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(result, results[0]))


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("normalised", [False, True], ids=["plain", "normalised"])
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
# C 5 (value by value), 16 and 64 (whole vectors, several blocks of them on the narrower tiers), 40 (5 AVX2 vectors: a
# block of 4 and one of 1), 4 (packed columns).
@pytest.mark.parametrize(
    "shape",
    [(3, 5, 9, 9), (2, 16, 9, 7), (2, 64, 5, 6), (1, 40, 4, 5), (1, 4, 5, 36)],
    ids=["C5", "C16", "C64", "C40", "C4_packed"],
)
def test_formed_grads_are_the_grads_formed_first(shape, stride, normalised, dtype, cpu_isa):
    """With grad_inputs and grad_factors the kernel forms each output gradient a g + b (t - mean) + e as it reads g
    and t (a BN's backward): the same results as the kernel given those gradients formed beforehand."""
    x, weights, dilations = make_inputs(shape, DARTS, dtype, "channels_last", x_grad=False, w_grad=False)
    C = shape[1]
    pointwise = make_pointwise(C, len(weights), dtype, requires_grad=False)
    normalisation = make_normalisation(C, dtype, requires_grad=False) if normalised else (None, None)
    out_shape = (shape[0], C, (shape[2] - 1) // stride + 1, (shape[3] - 1) // stride + 1)
    grad = torch.randn(out_shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    grads = [grad] * len(weights)  # one BN output gradient for every conv, as a mixed op's candidates share theirs
    inputs = [torch.randn(out_shape, dtype=dtype) for _ in weights]  # contiguous: another layout than grad's
    factors = torch.randn(len(weights), 4, C, dtype=dtype)
    backward = torch.ops.fastdarts.relu_dwconv_pointwise_backward
    got = backward(grads, x, weights, pointwise, dilations, stride, True, True, True, *normalisation, inputs, factors)
    formed = reference.formed_grads(grads, inputs, factors)
    want = backward(formed, x, weights, pointwise, dilations, stride, True, True, True, *normalisation)
    tolerances = TOLERANCES[dtype]["grad"]
    torch.testing.assert_close(got[0], want[0], **tolerances)
    for g, w in zip([*got[1], *got[2]], [*want[1], *want[2]], strict=True):
        torch.testing.assert_close(g, w, **tolerances)
    if normalised:
        torch.testing.assert_close(got[3], want[3], **tolerances)


def forward_samples():
    """(id, args) for opcheck: operands needing gradients or not, layouts, strides, dtypes."""
    samples = []
    for needs in ("all", "x", "weights", "none"):
        x, weights, dilations = make_inputs((2, 5, 7, 6), DARTS, x_grad=needs in ("all", "x"), w_grad=needs == "all")
        pointwise = make_pointwise(5, 4, requires_grad=needs in ("all", "weights"))
        samples.append((f"needs_grad={needs}", (x, weights, pointwise, dilations, 1, True)))
    x, weights, dilations = make_inputs((1, 16, 9, 9), DARTS, torch.float64, "channels_last")
    samples.append(
        ("channels_last_f64_stride2", (x, weights, make_pointwise(16, 4, torch.float64), dilations, 2, True))
    )
    x, weights, dilations = make_inputs((3, 4, 8, 8), [(5, 2)])
    samples.append(("K1_no_relu", (x, weights, make_pointwise(4, 1), dilations, 1, False)))
    for needs in ("all", "normalisation", "none"):
        x, weights, dilations = make_inputs((2, 4, 8, 8), [(3, 1)], x_grad=needs == "all", w_grad=needs == "all")
        pointwise = make_pointwise(4, 1, requires_grad=False)
        normalisation = make_normalisation(4, requires_grad=needs != "none")
        samples.append((f"normalised_needs_grad={needs}", (x, weights, pointwise, dilations, 1, True, *normalisation)))
    return samples


def backward_samples():
    samples = []
    x, weights, dilations = make_inputs((2, 5, 7, 6), DARTS, x_grad=False, w_grad=False)
    pointwise = make_pointwise(5, 4, requires_grad=False)
    grads = [torch.randn(2, 5, 4, 3) for _ in weights]
    for input_grad, weight_grad in ((True, True), (True, False), (False, True), (False, False)):
        samples.append(
            (f"input_grad={input_grad}-weight_grad={weight_grad}",
             (grads, x, weights, pointwise, dilations, 2, True, input_grad, weight_grad))
        )  # fmt: skip
    normalisation = make_normalisation(5, requires_grad=False)
    samples.append(("normalised", (grads, x, weights, pointwise, dilations, 2, True, True, True, *normalisation)))
    inputs, factors = [torch.randn(2, 5, 4, 3) for _ in weights], torch.randn(4, 4, 5)
    formed = (grads, x, weights, pointwise, dilations, 2, True, True, True, None, None, inputs, factors)
    samples.append(("formed", formed))
    return samples


@requires_ext
@pytest.mark.parametrize("args", [s for _, s in forward_samples()], ids=[i for i, _ in forward_samples()])
def test_opcheck_relu_dwconv_pointwise(args):
    opcheck(torch.ops.fastdarts.relu_dwconv_pointwise.default, args)


@requires_ext
@pytest.mark.parametrize("args", [s for _, s in backward_samples()], ids=[i for i, _ in backward_samples()])
def test_opcheck_relu_dwconv_pointwise_backward(args):
    opcheck(torch.ops.fastdarts.relu_dwconv_pointwise_backward.default, args)


def good():
    x, weights, dilations = make_inputs((2, 4, 7, 7), DARTS, x_grad=False, w_grad=False)
    return x, weights, make_pointwise(4, 4, requires_grad=False), dilations


def with_pointwise(i, weight):
    x, weights, pointwise, dilations = good()
    pointwise[i] = weight
    return x, weights, pointwise, dilations


def with_normalisation(mean, invstd):
    return (*good(), mean, invstd)


BAD_INPUTS = [
    ("x_3d", lambda: (torch.randn(4, 7, 7), *good()[1:]), ValueError, r"x must be a 4-D \[N, C, H, W\] tensor"),
    (
        "pointwise_count",
        lambda: (good()[0], good()[1], good()[2][:3], good()[3]),
        ValueError,
        r"relu_dwconv_pointwise: pointwise_weights must have one tensor per weight \(K = 4\), got 3",
    ),
    (
        "pointwise_shape",
        lambda: with_pointwise(1, torch.randn(4, 4, 3, 3)),
        ValueError,
        r"pointwise_weights\[1\] must have shape \[4, 4, 1, 1\], got \[4, 4, 3, 3\]",
    ),
    (
        "pointwise_channels",
        lambda: with_pointwise(0, torch.randn(8, 4, 1, 1)),
        ValueError,
        r"pointwise_weights\[0\] must have shape \[4, 4, 1, 1\]",
    ),
    (
        "pointwise_dtype",
        lambda: with_pointwise(2, torch.randn(4, 4, 1, 1, dtype=torch.float64)),
        TypeError,
        r"pointwise_weights\[2\] must have the dtype of x",
    ),
    (
        "dilations_length",
        lambda: (*good()[:3], [1, 1, 2]),
        ValueError,
        r"dilations must have one entry per weight \(K = 4\), got 3",
    ),
    (
        "input_mean_alone",
        lambda: with_normalisation(torch.zeros(1, 4), None),
        ValueError,
        r"input_mean and input_invstd must be given together, got only input_mean",
    ),
    (
        "input_invstd_shape",
        lambda: with_normalisation(torch.zeros(1, 4), torch.ones(4)),
        ValueError,
        r"input_invstd must have shape \[K, C\] = \[1, 4\]",
    ),
]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
@pytest.mark.parametrize("make,error,message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(backend, make, error, message):
    x, weights, pointwise, dilations, *normalisation = make()
    with pytest.raises(error, match=message):
        ops.relu_dwconv_pointwise(x, weights, pointwise, dilations, 1, True, *normalisation, backend=backend)


def first_stage(x, weights, pointwise):
    """A DARTS edge's four conv candidates up to their BNs, normalised with the returned statistics, to a scalar."""
    outs, mean, var = ops.relu_dwconv_pointwise(x, weights, pointwise, [1, 1, 2, 2], 1)
    normalised = [(t - m[:, None, None]) * (v[:, None, None] + 1e-5).rsqrt() for t, m, v in zip(outs, mean, var)]
    return sum((t * t.flip(-1)).sum() for t in normalised)


@requires_ext
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    x, weights, _ = make_inputs((2, 4, 7, 7), DARTS, layout="channels_last")
    pointwise = make_pointwise(4, 4)
    inputs = [x, *weights, *pointwise]
    got = torch.compile(first_stage, fullgraph=True, backend=backend)(x, weights, pointwise)
    expected = first_stage(x, weights, pointwise)
    torch.testing.assert_close(got, expected)
    got_grads = torch.autograd.grad(got, inputs)
    assert_all_close(got_grads, torch.autograd.grad(expected, inputs), dict(rtol=1e-5, atol=1e-5))


BAD_SETTINGS = [
    (dict(relu="no"), "relu_dwconv_pointwise: relu must be True or False, got 'no'"),
    (dict(relu=None), "relu_dwconv_pointwise: relu must be True or False, got None"),
    (dict(stride=1.5), "relu_dwconv_pointwise: stride must be an int, got 1.5"),
    (dict(dilations=1), "relu_dwconv_pointwise: dilations must be a list of ints, got 1"),
    (dict(dilations=[1, 1.0, 2, 2]), r"dilations must be a list of ints, got \[1, 1.0, 2, 2\]"),
]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
@pytest.mark.parametrize(
    "change,message", BAD_SETTINGS, ids=[next(iter(c)) + str(i) for i, (c, _) in enumerate(BAD_SETTINGS)]
)
def test_bad_settings_raise_one_line_errors(backend, change, message):
    x, weights, pointwise, dilations = good()
    settings = dict(dilations=dilations, stride=1, relu=True) | change
    with pytest.raises(ValueError, match=message) as error:
        ops.relu_dwconv_pointwise(x, weights, pointwise, settings["dilations"], settings["stride"], settings["relu"],
                                  backend=backend)  # fmt: skip
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=message.replace("relu_dwconv_pointwise", "relu_dwconv")):
        ops.relu_dwconv(x, weights, settings["dilations"], settings["stride"], settings["relu"], backend=backend)


def formed_arguments(change):
    """relu_dwconv_pointwise_backward's arguments with formed gradients, valid but for `change`."""
    x, weights, pointwise, dilations = good()
    grads = [torch.randn(2, 4, 7, 7) for _ in weights]
    inputs, factors = [torch.randn(2, 4, 7, 7) for _ in weights], torch.randn(4, 4, 4)
    if change == "only_inputs":
        factors = None
    elif change == "factors_shape":
        factors = torch.randn(4, 3, 4)
    elif change == "inputs_shape":
        inputs[2] = torch.randn(2, 4, 6, 7)
    return grads, x, weights, pointwise, dilations, 1, True, True, True, None, None, inputs, factors


@requires_ext
@pytest.mark.parametrize(
    "change,message",
    [
        ("only_inputs", "grad_inputs and grad_factors must be given together, got only grad_inputs"),
        ("factors_shape", r"grad_factors must have shape \[4, 4, 4\] \(a, b, mean and e per channel of each of the 4 "
                          r"grads\), got \[4, 3, 4\]"),
        ("inputs_shape", r"grad_inputs\[2\] must have shape \[2, 4, 7, 7\], got \[2, 4, 6, 7\]"),
    ],
    ids=["only_inputs", "factors_shape", "inputs_shape"],
)  # fmt: skip
def test_bad_formed_grads_raise_one_line_errors(change, message):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = formed_arguments(change)

    def fake_call(*args):
        with FakeTensorMode() as mode:
            fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = [[mode.from_tensor(t) for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
                    else a for a in fake]  # fmt: skip
            return torch.ops.fastdarts.relu_dwconv_pointwise_backward(*fake)

    for call in (torch.ops.fastdarts.relu_dwconv_pointwise_backward, fake_call):
        with pytest.raises(ValueError, match=message) as raised:
            call(*args)
        assert "\n" not in str(raised.value)
