import pytest
import torch
from torch.library import opcheck

from fastdarts import ops
from fastdarts.ops import reference

from ..conftest import requires_ext

# (shape, layout): odd sizes, channels_last, one case long enough for several backward chunks and
# both threads, and an empty one (grad_w is then zero).
CASES = [
    ((5,), "contiguous"),
    ((3, 4, 7, 9), "contiguous"),
    ((3, 4, 7, 9), "channels_last"),
    ((2, 16, 8, 8), "contiguous"),
    ((2, 16, 8, 8), "channels_last"),
    ((5, 7001), "contiguous"),
    ((0, 3), "contiguous"),
]
CASE_IDS = [f"{'x'.join(map(str, shape))}-{layout}" for shape, layout in CASES]
# Outputs and grad_xs: a few roundings apart. grad_w: fp32 reference sums in float32, the kernel
# in float64, so it is compared to float64 truth separately, and to the reference loosely.
TOLERANCES = {
    torch.float32: dict(out=dict(rtol=1e-5, atol=1e-6), grad_w=dict(rtol=1e-5, atol=1e-4)),
    torch.float64: dict(out=dict(rtol=1e-12, atol=1e-12), grad_w=dict(rtol=1e-12, atol=1e-10)),
}


def make_inputs(K, shape, dtype=torch.float32, layout="contiguous", xs_grad=True, w_grad=True):
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    xs = [torch.randn(shape, dtype=dtype).contiguous(memory_format=memory_format) for _ in range(K)]
    w = torch.randn(K, dtype=dtype)
    return [x.requires_grad_(xs_grad) for x in xs], w.requires_grad_(w_grad)


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("K", [1, 3, 7])
def test_cpp_matches_reference(K, shape, layout, dtype, cpu_isa):
    xs, w = make_inputs(K, shape, dtype, layout)
    tol = TOLERANCES[dtype]
    out = ops.weighted_sum(xs, w, backend="cpp")
    expected = ops.weighted_sum(xs, w, backend="reference")
    torch.testing.assert_close(out, expected, **tol["out"])
    assert out.stride() == expected.stride()  # the layout of xs[0], e.g. channels_last, is kept

    grad_out = torch.randn_like(out)
    *grad_xs, grad_w = grads(out, [*xs, w], grad_out)
    *expected_xs, expected_w = grads(expected, [*xs, w], grad_out)
    for got, want in zip(grad_xs, expected_xs):
        torch.testing.assert_close(got, want, **tol["out"])
    torch.testing.assert_close(grad_w, expected_w, **tol["grad_w"])
    # Products of floats are exact in double, so a float64 accumulation is off by one final rounding.
    truth = torch.stack([(grad_out.double() * x.double()).sum() for x in xs])
    torch.testing.assert_close(grad_w.double(), truth, rtol=2e-7 if dtype == torch.float32 else 1e-12, atol=1e-10)


# Small sums and sums of many blocks, with a partial last run of vectors (the 9 x 7 and 96 x 97 images) and none: the
# forward's vector loop and its scalar tail.
UNIT_WEIGHT_CASES = [((3, 4, 7, 9), torch.float32), ((2, 16, 8, 8), torch.float64), ((4, 16, 96, 97), torch.float32),
                     ((2, 16, 96, 97), torch.float64)]  # fmt: skip


@requires_ext
@pytest.mark.parametrize("shape,dtype", UNIT_WEIGHT_CASES, ids=[f"{'x'.join(map(str, s))}-{str(d)[6:]}" for s, d in
                                                                  UNIT_WEIGHT_CASES])  # fmt: skip
@pytest.mark.parametrize("K", [2, 5])
def test_unit_weights_give_the_bits_of_adding_in_turn(K, shape, dtype, cpu_isa):
    # What a supernet node's sum relies on: one pass with weights 1 adds each term to the running sum as adding the
    # terms in turn does, on every tier.
    xs = [torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last) for _ in range(K)]
    expected = xs[0]
    for x in xs[1:]:
        expected = expected + x
    out = ops.weighted_sum(xs, torch.ones(K, dtype=dtype), backend="cpp")
    assert torch.equal(out, expected)
    # and other weights match the reference
    w = torch.randn(K, dtype=dtype)
    tol = TOLERANCES[dtype]["out"]
    torch.testing.assert_close(ops.weighted_sum(xs, w, backend="cpp"), reference.weighted_sum(xs, w), **tol)


@requires_ext
@pytest.mark.parametrize("layout", ["mixed", "strided", "overlapping_grad"])
def test_cpp_matches_reference_on_other_layouts(layout):
    xs, w = make_inputs(3, (2, 6, 5, 7), layout="channels_last")
    grad_out = torch.randn(2, 6, 5, 7)
    if layout == "mixed":  # xs[1] contiguous, the others channels_last
        xs[1] = xs[1].detach().contiguous().requires_grad_()
    if layout == "strided":  # views that are not dense, and a strided w
        xs = [torch.randn(2, 6, 5, 14)[..., ::2].requires_grad_() for _ in xs]
        w = torch.randn(6)[::2].requires_grad_()
    if layout == "overlapping_grad":  # what autograd hands over after an expand or a sum
        grad_out = torch.randn(1, 6, 1, 7).expand(2, 6, 5, 7)
    out = ops.weighted_sum(xs, w, backend="cpp")
    expected = reference.weighted_sum(xs, w)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert out.stride() == torch.empty_like(xs[0]).stride()
    for got, want in zip(grads(out, [*xs, w], grad_out), grads(expected, [*xs, w], grad_out)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@requires_ext
@pytest.mark.parametrize("needs_grad", ["xs_and_w", "only_w", "only_xs", "some_xs"])
def test_saves_only_what_the_requested_gradients_need(needs_grad):
    xs, w = make_inputs(3, (4, 5), xs_grad=needs_grad != "only_w", w_grad=needs_grad in ("xs_and_w", "only_w"))
    if needs_grad == "some_xs":
        xs[1].requires_grad_(False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ops.weighted_sum(xs, w, backend="cpp")
    saved_xs = [x for x in xs if any(s.data_ptr() == x.data_ptr() for s in saved)]
    # grad_w needs the K activations; grad_xs only needs the K weights.
    assert len(saved_xs) == (3 if w.requires_grad else 0)
    differentiable = [t for t in (*xs, w) if t.requires_grad]
    grad_out = torch.randn_like(out)
    expected = grads(reference.weighted_sum(xs, w), differentiable, grad_out)
    for got, want in zip(grads(out, differentiable, grad_out), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
@pytest.mark.parametrize(
    "shape,layout", [((3,), "contiguous"), ((2, 3, 5), "contiguous"), ((2, 3, 2, 2), "channels_last")]
)
def test_gradcheck_float64(backend, shape, layout):
    xs, w = make_inputs(3, shape, torch.float64, layout)

    def fn(*tensors):
        return ops.weighted_sum(tensors[:-1], tensors[-1], backend=backend)

    assert torch.autograd.gradcheck(fn, (*xs, w))
    assert torch.autograd.gradgradcheck(fn, (*xs, w))


@requires_ext
@pytest.mark.parametrize("needs_grad", ["xs_and_w", "only_w", "only_xs"])
def test_double_backward_matches_reference(needs_grad):
    xs, w = make_inputs(3, (2, 3, 4), torch.float64, xs_grad=needs_grad != "only_w", w_grad=needs_grad != "only_xs")
    grad_out = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    differentiable = [t for t in (*xs, w) if t.requires_grad]
    directions = [torch.randn_like(t) for t in differentiable]

    def second_derivatives(backend):
        first = torch.autograd.grad(
            ops.weighted_sum(xs, w, backend=backend), differentiable, grad_out, create_graph=True
        )
        directional = sum((f * d).sum() for f, d in zip(first, directions))
        return torch.autograd.grad(directional, [*differentiable, grad_out], allow_unused=True, materialize_grads=True)

    for got, want in zip(second_derivatives("cpp"), second_derivatives("reference")):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@requires_ext
def test_grad_w_does_not_depend_on_the_thread_count():
    xs, w = make_inputs(4, (9, 7001))  # 16 fixed chunks, split between threads differently below
    out = ops.weighted_sum(xs, w, backend="cpp")
    grad_out = torch.randn_like(out)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            results.append(torch.autograd.grad(out, w, grad_out, retain_graph=True)[0])
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(r, results[0]) for r in results[1:])


def weighted_sum_samples():
    """(id, (xs, w)) for opcheck: every mix of operands needing gradients, and the layout cases."""
    samples = []
    for xs_grad, w_grad in ((True, True), (False, True), (True, False), (False, False)):
        samples.append((f"xs_grad={xs_grad}-w_grad={w_grad}", make_inputs(3, (4, 5), xs_grad=xs_grad, w_grad=w_grad)))
    xs, w = make_inputs(3, (4, 5))
    xs[2].requires_grad_(False)
    samples.append(("some_xs_grad", (xs, w)))
    samples.append(("K1", make_inputs(1, (7,))))
    samples.append(("channels_last_f64", make_inputs(2, (2, 3, 5, 4), torch.float64, "channels_last")))
    xs, w = make_inputs(2, (2, 3, 5, 4), layout="channels_last")
    samples.append(("mixed_layouts", ([xs[0], xs[1].detach().contiguous()], w)))
    samples.append(("strided", ([torch.randn(3, 8)[:, ::2] for _ in range(2)], torch.randn(2, requires_grad=True))))
    return samples


def weighted_sum_backward_samples():
    """(id, (grad, xs, w)) for opcheck, including every single operand needing a gradient."""
    samples = []
    for needs in ("none", "grad", "xs", "w", "all"):
        xs, w = make_inputs(3, (4, 5), xs_grad=needs in ("xs", "all"), w_grad=needs in ("w", "all"))
        grad = torch.randn(4, 5, requires_grad=needs in ("grad", "all"))
        samples.append((f"needs_grad={needs}", (grad, xs, w)))
    xs, w = make_inputs(2, (2, 3, 5, 4), torch.float64, "channels_last")
    samples.append(("channels_last_xs_contiguous_grad_f64", (torch.randn(2, 3, 5, 4, dtype=torch.float64), xs, w)))
    return samples


@requires_ext
@pytest.mark.parametrize("args", [s for _, s in weighted_sum_samples()], ids=[i for i, _ in weighted_sum_samples()])
def test_opcheck_weighted_sum(args):
    opcheck(torch.ops.fastdarts.weighted_sum.default, args)


@requires_ext
@pytest.mark.parametrize(
    "args", [s for _, s in weighted_sum_backward_samples()], ids=[i for i, _ in weighted_sum_backward_samples()]
)
def test_opcheck_weighted_sum_backward(args):
    opcheck(torch.ops.fastdarts.weighted_sum_backward.default, args)


BAD_INPUTS = [
    ("empty", lambda: ([], torch.randn(0)), ValueError, "xs must be a non-empty list"),
    (
        "shapes",
        lambda: ([torch.randn(2, 3), torch.randn(3, 2)], torch.randn(2)),
        ValueError,
        r"xs\[1\] must have the shape",
    ),
    ("too_few_weights", lambda: ([torch.randn(2, 3)] * 3, torch.randn(2)), ValueError, "K = 3"),
    ("too_many_weights", lambda: ([torch.randn(2, 3)] * 2, torch.randn(3)), ValueError, "K = 2"),
    ("weights_2d", lambda: ([torch.randn(2, 3)] * 2, torch.randn(2, 1)), ValueError, r"shape \[K\]"),
    (
        "dtypes",
        lambda: ([torch.randn(2), torch.randn(2).double()], torch.randn(2)),
        TypeError,
        r"xs\[1\] must have the dtype",
    ),
    ("weight_dtype", lambda: ([torch.randn(2)], torch.randn(1).double()), TypeError, "w must have the dtype"),
]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
@pytest.mark.parametrize("make,error,message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(backend, make, error, message):
    xs, w = make()
    with pytest.raises(error, match=message):
        ops.weighted_sum(xs, w, backend=backend)


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.int64])
def test_cpp_rejects_unsupported_dtypes(dtype):
    xs, w = [torch.ones(3, dtype=dtype)] * 2, torch.ones(2, dtype=dtype)
    with pytest.raises(TypeError, match="only float32 and float64 are supported"):
        ops.weighted_sum(xs, w, backend="cpp")
    with pytest.raises(TypeError, match="only float32 and float64 are supported"):
        torch.ops.fastdarts.weighted_sum_backward(torch.ones(3, dtype=dtype), xs, w)


@requires_ext
def test_backward_op_checks_grad():
    xs, w = make_inputs(2, (4, 5), xs_grad=False, w_grad=False)
    with pytest.raises(ValueError, match="grad must have the shape of xs"):
        torch.ops.fastdarts.weighted_sum_backward(torch.randn(5, 4), xs, w)


def mixed_op(x, alpha):
    return ops.weighted_sum([x.relu(), x.sigmoid(), 2 * x], alpha.softmax(0)).square().sum()


@requires_ext
def test_compile_traces_the_dispatch_without_graph_breaks():
    graphs = []

    def record(gm, example_inputs):
        graphs.append({node.target for node in gm.graph.nodes})
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(mixed_op, fullgraph=True, backend=record)
    x, alpha = torch.randn(2, 3, 5, 5), torch.randn(3)
    compiled(x, alpha)
    with ops.use_backend("reference"):  # the choice is guarded on, so this recompiles
        compiled(x, alpha)
    assert len(graphs) == 2
    assert torch.ops.fastdarts.weighted_sum.default in graphs[0]
    assert torch.ops.fastdarts.weighted_sum.default not in graphs[1]


@requires_ext
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    alpha = torch.randn(3, requires_grad=True)
    got = torch.compile(mixed_op, fullgraph=True, backend=backend)(x, alpha)
    expected = mixed_op(x, alpha)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grads(got, [x, alpha], None), grads(expected, [x, alpha], None))
