import itertools

import pytest
import torch
from torch.library import opcheck

from fastdarts import ops
from fastdarts.ops import reference

from ..conftest import requires_ext
from ._helpers import RecordCalls, memory_format_of

# (kernel size, dilation) of the first stage of DARTS's four conv candidates: sep 3x3, sep 5x5, dil 3x3, dil 5x5.
DARTS = [(3, 1), (5, 1), (3, 2), (5, 2)]
KERNELS = {"one": [(3, 1)], "darts": DARTS}
SHAPES = [(N, C, S, S) for N, C, S in itertools.product([1, 3], [4, 5, 16], [7, 9, 8])]
# Narrow channels that the CPU kernels pack several columns to a vector (see test_relu_dwconv_pointwise.py).
SHAPES += [(1, 4, 5, 36), (2, 8, 3, 10)]
# Rows of 24 output columns (stride 1 at 23, stride 2 at 45): a wide block of the AVX-512 loops and a narrow one.
SHAPES += [(1, 5, 4, 23), (1, 3, 3, 45)]
SHAPE_IDS = ["x".join(map(str, shape)) for shape in SHAPES]
# Outputs: 1e-4 relative in float32 (the kernel's sums of up to 25 products run in a different order than
# oneDNN's). Gradients: 1e-3 relative; grad_w sums up to 3 * 81 * 25 products.
TOLERANCES = {
    torch.float32: dict(out=dict(rtol=1e-4, atol=1e-5), grad=dict(rtol=1e-3, atol=1e-4)),
    torch.float64: dict(out=dict(rtol=1e-10, atol=1e-12), grad=dict(rtol=1e-10, atol=1e-10)),
}


def make_inputs(shape, kernels, dtype=torch.float32, layout="contiguous", x_grad=True, w_grad=True):
    """x with some exact zeros (ReLU's kink: its gradient there is 0 in both backends), weights, dilations."""
    x = torch.randn(shape, dtype=dtype)
    x[torch.rand(shape) < 0.1] = 0.0
    x = x.contiguous(memory_format=memory_format_of(layout)).requires_grad_(x_grad)
    weights = [torch.randn(shape[1], 1, k, k, dtype=dtype, requires_grad=w_grad) for k, _ in kernels]
    return x, weights, [d for _, d in kernels]


def grads(outs, inputs, grad_outs):
    return torch.autograd.grad(outs, inputs, grad_outs)


def assert_all_close(got, want, tol):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("kernels", list(KERNELS), ids=list(KERNELS))
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_cpp_matches_reference(shape, stride, kernels, relu, layout, dtype, cpu_isa):
    x, weights, dilations = make_inputs(shape, KERNELS[kernels], dtype, layout)
    tol = TOLERANCES[dtype]
    outs = ops.relu_dwconv(x, weights, dilations, stride, relu, backend="cpp")
    expected = ops.relu_dwconv(x, weights, dilations, stride, relu, backend="reference")
    assert_all_close(outs, expected, tol["out"])
    for out in outs:  # laid out like x
        assert out.is_contiguous(memory_format=memory_format_of(layout))

    grad_outs = [torch.randn_like(e) for e in expected]
    got = grads(outs, [x, *weights], grad_outs)
    want = grads(expected, [x, *weights], grad_outs)
    assert_all_close(got, want, tol["grad"])
    assert got[0].stride() == x.stride()


@requires_ext
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("shape", [(2, 33, 11, 10), (2, 64, 8, 8)], ids=["C33", "C64"])
def test_cpp_matches_reference_for_other_kernel_sizes(shape, stride, cpu_isa):
    # k = 1 (no padding), k = 7, dilation 3; an odd 11x10 image with C = 33 (two vectors and one channel), and
    # C = 64 (four vectors, as in the supernet's last cells).
    x, weights, dilations = make_inputs(shape, [(1, 1), (7, 1), (3, 3), (5, 2)])
    outs = ops.relu_dwconv(x, weights, dilations, stride, backend="cpp")
    expected = reference.relu_dwconv(x, weights, dilations, stride)
    assert_all_close(outs, expected, TOLERANCES[torch.float32]["out"])
    grad_outs = [torch.randn_like(e) for e in expected]
    got = grads(outs, [x, *weights], grad_outs)
    assert_all_close(got, grads(expected, [x, *weights], grad_outs), TOLERANCES[torch.float32]["grad"])


@requires_ext
@pytest.mark.parametrize("layout", ["strided_x", "permuted_x", "expanded_grads", "strided_weights", "mixed_grads"])
def test_cpp_matches_reference_on_other_layouts(layout, cpu_isa):
    x, weights, dilations = make_inputs((2, 6, 9, 7), DARTS, layout="channels_last")
    if layout == "strided_x":  # a view that is not dense
        x = torch.randn(2, 6, 9, 14)[..., ::2].requires_grad_()
    if layout == "permuted_x":  # dense, but neither contiguous nor channels_last
        x = torch.randn(2, 7, 9, 6).permute(0, 3, 2, 1).requires_grad_()
    if layout == "strided_weights":
        weights = [torch.randn(6, 2, k, k)[:, :1].requires_grad_() for k, _ in DARTS]
    outs = ops.relu_dwconv(x, weights, dilations, 2, backend="cpp")
    expected = reference.relu_dwconv(x, weights, dilations, 2)
    assert_all_close(outs, expected, TOLERANCES[torch.float32]["out"])
    grad_outs = [torch.randn_like(e) for e in expected]
    if layout == "expanded_grads":  # what autograd hands over after a sum: stride 0 everywhere
        grad_outs = [torch.randn(()).expand(e.shape) for e in expected]
    if layout == "mixed_grads":
        grad_outs = [g.contiguous(memory_format=torch.channels_last) if i % 2 else g for i, g in enumerate(grad_outs)]
    got = grads(outs, [x, *weights], grad_outs)
    assert_all_close(got, grads(expected, [x, *weights], grad_outs), TOLERANCES[torch.float32]["grad"])
    assert got[0].stride() == torch.empty_like(x).stride()


@requires_ext
def test_empty_batch():
    x, weights, dilations = make_inputs((0, 4, 7, 7), DARTS)
    outs = ops.relu_dwconv(x, weights, dilations, 2, backend="cpp")
    assert [tuple(out.shape) for out in outs] == [(0, 4, 4, 4)] * 4
    got = grads(outs, [x, *weights], [torch.ones_like(out) for out in outs])
    assert got[0].shape == x.shape
    assert all(torch.equal(g, torch.zeros_like(w)) for g, w in zip(got[1:], weights))


@requires_ext
def test_nan_propagates_like_the_reference(cpu_isa):
    x, weights, dilations = make_inputs((1, 4, 5, 5), [(3, 1)])
    x = x.detach().clone()
    x[0, 1, 2, 2] = float("nan")
    out = ops.relu_dwconv(x, weights, dilations, 1, backend="cpp")[0]
    expected = reference.relu_dwconv(x, weights, dilations, 1)[0]
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().sum() == 9
    torch.testing.assert_close(out, expected, equal_nan=True)


@requires_ext
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("needs_grad", ["x_and_weights", "only_x", "only_weights", "some_weights"])
def test_saves_only_x_and_the_weights_and_computes_only_the_gradients_asked_for(needs_grad, relu):
    x, weights, dilations = make_inputs(
        (2, 16, 9, 9), DARTS, x_grad=needs_grad in ("x_and_weights", "only_x"), w_grad=needs_grad != "only_x"
    )
    if needs_grad == "some_weights":
        weights[2].requires_grad_(False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        outs = ops.relu_dwconv(x, weights, dilations, 1, relu, backend="cpp")
    # x and the weights themselves: no relu(x), no output, no copy.
    assert len(saved) == 1 + len(weights)
    assert saved[0] is x or saved[0].data_ptr() == x.data_ptr()
    assert all(s.data_ptr() == w.data_ptr() for s, w in zip(saved[1:], weights))

    differentiable = [t for t in (x, *weights) if t.requires_grad]
    grad_outs = [torch.randn_like(out) for out in outs]
    # The backward op's last two arguments: whether it computes the gradient of x, of the weights.
    with RecordCalls(torch.ops.fastdarts.relu_dwconv_backward.default, lambda args: tuple(args[-2:])) as record:
        got = grads(outs, differentiable, grad_outs)
    assert record.calls == [(x.requires_grad, any(w.requires_grad for w in weights))]
    # Reference outputs whose inputs need no gradient carry none (the kernel's outputs always do).
    expected = reference.relu_dwconv(x, weights, dilations, 1, relu)
    pairs = [(e, g) for e, g in zip(expected, grad_outs) if e.requires_grad]
    want = grads([e for e, _ in pairs], differentiable, [g for _, g in pairs])
    assert_all_close(got, want, TOLERANCES[torch.float32]["grad"])


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_float64(backend, relu, stride, layout):
    # x away from ReLU's kink, where finite differences would straddle it.
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64)
    x = (x + 0.1 * x.sign()).contiguous(memory_format=memory_format_of(layout)).requires_grad_()
    weights = [torch.randn(2, 1, k, k, dtype=torch.float64, requires_grad=True) for k in (3, 5)]

    def fn(x, *weights):
        return tuple(ops.relu_dwconv(x, weights, [2, 1], stride, relu, backend=backend))

    assert torch.autograd.gradcheck(fn, (x, *weights))
    # The second derivatives (the kernels' backward is registered as differentiable) by random projections:
    # the full Jacobian of the backward costs minutes.
    assert torch.autograd.gradgradcheck(fn, (x, *weights), fast_mode=True)


@requires_ext
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("needs_grad", ["x_and_weights", "only_x", "only_weights"])
def test_double_backward_matches_reference(needs_grad, relu, cpu_isa):
    x, weights, dilations = make_inputs(
        (2, 3, 7, 6), DARTS, torch.float64, x_grad=needs_grad != "only_weights", w_grad=needs_grad != "only_x"
    )
    differentiable = [t for t in (x, *weights) if t.requires_grad]
    grad_outs = [torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True) for _ in weights]
    directions = [torch.randn_like(t) for t in differentiable]

    def second_derivatives(backend):
        outs = ops.relu_dwconv(x, weights, dilations, 2, relu, backend=backend)
        first = torch.autograd.grad(outs, differentiable, grad_outs, create_graph=True)
        directional = sum((f * d).sum() for f, d in zip(first, directions))
        wrt = [*differentiable, *grad_outs]
        return torch.autograd.grad(directional, wrt, allow_unused=True, materialize_grads=True)

    assert_all_close(second_derivatives("cpp"), second_derivatives("reference"), TOLERANCES[torch.float64]["grad"])


@requires_ext
def test_grad_weights_do_not_depend_on_the_thread_count(cpu_isa):
    # 40 columns x 16 channels: 25 output rows per chunk, so 2 chunks per image and 6 in all, split between the
    # threads differently below.
    x, weights, dilations = make_inputs((3, 16, 40, 40), DARTS)
    outs = ops.relu_dwconv(x, weights, dilations, 1, backend="cpp")
    grad_outs = [torch.randn_like(out) for out in outs]
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            results.append(torch.autograd.grad(outs, [x, *weights], grad_outs, retain_graph=True))
    finally:
        torch.set_num_threads(previous)
    for result in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(result, results[0]))


def relu_dwconv_samples():
    """(id, args) for opcheck: every mix of operands needing gradients, layouts, strides, dtypes."""
    samples = []
    for x_grad, w_grad in ((True, True), (False, True), (True, False), (False, False)):
        x, weights, dilations = make_inputs((2, 5, 7, 6), DARTS, x_grad=x_grad, w_grad=w_grad)
        samples.append((f"x_grad={x_grad}-w_grad={w_grad}", (x, weights, dilations, 1, True)))
    x, weights, dilations = make_inputs((2, 5, 7, 6), DARTS)
    weights[1].requires_grad_(False)
    samples.append(("some_weights_grad", (x, weights, dilations, 2, True)))
    x, weights, dilations = make_inputs((1, 16, 9, 9), DARTS, torch.float64, "channels_last")
    samples.append(("channels_last_f64_stride2", (x, weights, dilations, 2, True)))
    x, weights, dilations = make_inputs((3, 4, 8, 8), [(5, 2)])
    samples.append(("K1_no_relu", (x, weights, dilations, 1, False)))
    x = torch.randn(2, 4, 7, 12)[..., ::2].requires_grad_()
    samples.append(("strided_x", (x, make_inputs((2, 4, 7, 6), DARTS)[1], [1, 1, 2, 2], 2, True)))
    return samples


def relu_dwconv_backward_samples():
    """(id, args) for opcheck, with every operand (and none) needing a gradient, and each output left out."""
    samples = []
    for needs in ("none", "grads", "x", "weights", "all"):
        x, weights, dilations = make_inputs(
            (2, 5, 7, 6), DARTS, x_grad=needs in ("x", "all"), w_grad=needs in ("weights", "all")
        )
        grad_outs = [torch.randn(2, 5, 4, 3, requires_grad=needs in ("grads", "all")) for _ in weights]
        samples.append((f"needs_grad={needs}", (grad_outs, x, weights, dilations, 2, True, True, True)))
    x, weights, dilations = make_inputs((2, 5, 7, 6), DARTS, torch.float64, "channels_last")
    grad_outs = [torch.randn(2, 5, 7, 6, dtype=torch.float64, requires_grad=True) for _ in weights]
    samples.append(("only_input_grad_f64", (grad_outs, x, weights, dilations, 1, True, True, False)))
    samples.append(("only_weight_grad_no_relu", (grad_outs, x, weights, dilations, 1, False, False, True)))
    samples.append(("nothing", (grad_outs, x, weights, dilations, 1, True, False, False)))
    return samples


@requires_ext
@pytest.mark.parametrize("args", [s for _, s in relu_dwconv_samples()], ids=[i for i, _ in relu_dwconv_samples()])
def test_opcheck_relu_dwconv(args):
    opcheck(torch.ops.fastdarts.relu_dwconv.default, args)


@requires_ext
@pytest.mark.parametrize(
    "args", [s for _, s in relu_dwconv_backward_samples()], ids=[i for i, _ in relu_dwconv_backward_samples()]
)
def test_opcheck_relu_dwconv_backward(args):
    opcheck(torch.ops.fastdarts.relu_dwconv_backward.default, args)


def good():
    return make_inputs((2, 4, 7, 7), DARTS, x_grad=False, w_grad=False)


def with_weight(i, weight):
    x, weights, dilations = good()
    weights[i] = weight
    return x, weights, dilations


BAD_INPUTS = [
    ("x_3d", lambda: (torch.randn(4, 7, 7), *good()[1:]), ValueError, r"x must be a 4-D \[N, C, H, W\] tensor"),
    ("x_no_pixels", lambda: (torch.randn(2, 4, 0, 7), *good()[1:]), ValueError, "with C, H, W >= 1"),
    ("no_weights", lambda: (good()[0], [], []), ValueError, "weights must be a non-empty list"),
    (
        "weight_channels",
        lambda: with_weight(1, torch.randn(5, 1, 5, 5)),
        ValueError,
        r"weights\[1\] must have shape \[C, 1, k, k\] with C = 4 and k odd, got shape \[5, 1, 5, 5\]",
    ),
    ("weight_even", lambda: with_weight(0, torch.randn(4, 1, 4, 4)), ValueError, r"weights\[0\] must have shape"),
    ("weight_not_square", lambda: with_weight(2, torch.randn(4, 1, 3, 5)), ValueError, r"weights\[2\] must have"),
    ("weight_3d", lambda: with_weight(3, torch.randn(4, 5, 5)), ValueError, r"weights\[3\] must have shape"),
    ("weight_groups", lambda: with_weight(0, torch.randn(4, 2, 3, 3)), ValueError, r"weights\[0\] must have shape"),
    (
        "weight_dtype",
        lambda: with_weight(1, torch.randn(4, 1, 5, 5, dtype=torch.float64)),
        TypeError,
        r"weights\[1\] must have the dtype of x",
    ),
    (
        "weight_device",
        lambda: with_weight(1, torch.randn(4, 1, 5, 5, device="meta")),
        ValueError,
        r"weights\[1\] must be on the device of x",
    ),
    (
        "dilations_length",
        lambda: (*good()[:2], [1, 1, 2]),
        ValueError,
        r"dilations must have one entry per weight \(K = 4\), got 3",
    ),
    (
        "dilation_zero",
        lambda: (*good()[:2], [1, 0, 2, 2]),
        ValueError,
        r"dilations must be positive, got \[1, 0, 2, 2\]",
    ),
]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
@pytest.mark.parametrize("make,error,message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(backend, make, error, message):
    x, weights, dilations = make()
    with pytest.raises(error, match=message):
        ops.relu_dwconv(x, weights, dilations, 1, backend=backend)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
def test_bad_stride(backend):
    with pytest.raises(ValueError, match="relu_dwconv: stride must be positive, got 0"):
        ops.relu_dwconv(*good(), 0, backend=backend)


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.int64])
def test_cpp_rejects_unsupported_dtypes(dtype):
    x, weights, dilations = good()
    x, weights = x.to(dtype), [w.to(dtype) for w in weights]
    with pytest.raises(TypeError, match="relu_dwconv: only float32 and float64 are supported"):
        ops.relu_dwconv(x, weights, dilations, 1, backend="cpp")
    grad_outs = [torch.zeros(2, 4, 7, 7, dtype=dtype)] * 4
    with pytest.raises(TypeError, match="relu_dwconv_backward: only float32 and float64 are supported"):
        torch.ops.fastdarts.relu_dwconv_backward(grad_outs, x, weights, dilations, 1, True, True, True)


@requires_ext
@pytest.mark.parametrize(
    "grad_outs,error,message",
    [
        ([torch.randn(2, 4, 4, 4)] * 3, ValueError, r"grads must have one tensor per weight \(K = 4\), got 3"),
        (
            [torch.randn(2, 4, 4, 4)] * 3 + [torch.randn(2, 4, 7, 7)],
            ValueError,
            r"grads\[3\] must have shape \[2, 4, 4",
        ),
        (
            [torch.randn(2, 4, 4, 4)] * 3 + [torch.randn(2, 4, 4, 4).double()],
            TypeError,
            r"grads\[3\] must have the dtype",
        ),
    ],
    ids=["count", "shape", "dtype"],
)
def test_backward_op_checks_grads(grad_outs, error, message):
    with pytest.raises(error, match=message):
        torch.ops.fastdarts.relu_dwconv_backward(grad_outs, *good(), 2, True, True, True)


def first_stage(x, weights):
    """A DARTS edge's four first-stage convolutions, reduced to a scalar."""
    outs = ops.relu_dwconv(x, weights, [1, 1, 2, 2], 1)
    return sum((out * out.flip(-1)).sum() for out in outs)


@requires_ext
def test_compile_traces_the_op_without_graph_breaks():
    graphs = []

    def record(gm, example_inputs):
        graphs.append({node.target for node in gm.graph.nodes})
        return gm.forward

    torch._dynamo.reset()
    x, weights, _ = make_inputs((2, 4, 7, 7), DARTS)
    torch.compile(first_stage, fullgraph=True, backend=record)(x, weights)
    assert len(graphs) == 1 and torch.ops.fastdarts.relu_dwconv.default in graphs[0]


@requires_ext
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_compile_fullgraph_matches_eager(backend, layout):
    torch._dynamo.reset()
    x, weights, _ = make_inputs((2, 4, 7, 7), DARTS, layout=layout)
    got = torch.compile(first_stage, fullgraph=True, backend=backend)(x, weights)
    expected = first_stage(x, weights)
    torch.testing.assert_close(got, expected)
    assert_all_close(grads(got, [x, *weights], None), grads(expected, [x, *weights], None), dict(rtol=1e-5, atol=1e-5))
