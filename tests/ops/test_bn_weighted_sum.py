import pytest
import torch
from torch.library import opcheck

from fastdarts import ops
from fastdarts.ops import reference

from ..conftest import requires_ext
from ._helpers import backend_ops, memory_format_of

EPS = 1e-5
# (N, C, H, W): batch 1 and 3, odd spatial sizes; C 4 and 16, and C 3, 32 and 64, whose per-channel patterns the
# kernel holds in 1, 2 or 4 registers a tier or reads from memory (no whole-vector period).
SHAPES = [(1, 4, 7, 7), (3, 16, 9, 9), (3, 4, 9, 9), (1, 16, 7, 7), (2, 3, 5, 5), (1, 32, 5, 3), (2, 64, 3, 5)]
LAYOUTS = ["channels_last", "contiguous"]
CASES = [(shape, layout) for shape in SHAPES for layout in LAYOUTS]
CASE_IDS = [f"{'x'.join(map(str, shape))}-{layout}" for shape, layout in CASES]


def make_inputs(K, shape, dtype=torch.float32, layout="channels_last", requires_grad=True):
    """ts (means away from 0, so that subtracting the mean matters), w, and statistics whose row 0 is a skip row
    (mean 0, invstd 1) when K > 1."""
    C = shape[1]
    ts = [
        (torch.randn(shape, dtype=dtype) * 1.5 + 0.5).contiguous(memory_format=memory_format_of(layout))
        for _ in range(K)
    ]
    w = torch.randn(K, dtype=dtype)
    mean = torch.randn(K, C, dtype=dtype)
    invstd = torch.rand(K, C, dtype=dtype) + 0.5
    if K > 1:
        mean[0], invstd[0] = 0.0, 1.0
    return [t.requires_grad_(requires_grad) for t in ts], *(x.requires_grad_(requires_grad) for x in (w, mean, invstd))


def assert_close(got, want, rtol):
    """Relative to the size of the whole tensor, so that values near 0 are not held to rtol on their own."""
    scale = want.abs().max().item() if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1e-30))


def call_backward_op(backend, grad, ts, w, mean, invstd, flags, input_grad=True, w_grad=True):
    """The backend's bn_weighted_sum_backward op on detached tensors: (grad_ts or [], grad_w or None). The Triton op
    returns grad_w as [grad_w] or []."""
    grad_ts, grad_w = backend_ops(backend).bn_weighted_sum_backward(
        grad, [t.detach() for t in ts], w.detach(), mean.detach(), invstd.detach(), flags, input_grad, w_grad
    )
    if backend == "triton":
        assert len(grad_w) == w_grad
        grad_w = grad_w[0] if w_grad else None
    return grad_ts, grad_w


def check_matches_reference(backend, K, shape, layout):
    ts, w, mean, invstd = make_inputs(K, shape, layout=layout)
    out = ops.bn_weighted_sum(ts, w, mean, invstd, backend=backend)
    expected = reference.bn_weighted_sum(ts, w, mean, invstd)
    assert_close(out, expected, 1e-4)
    assert out.stride() == torch.empty_like(ts[0]).stride()  # laid out like ts[0]
    grad_out = torch.randn_like(out)
    inputs = [*ts, w, mean, invstd]
    for got, want in zip(torch.autograd.grad(out, inputs, grad_out), torch.autograd.grad(expected, inputs, grad_out)):
        assert_close(got, want, 1e-3)


@requires_ext
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("K", [1, 7])
def test_cpp_matches_reference(K, shape, layout, cpu_isa):
    check_matches_reference("cpp", K, shape, layout)


def batch_norm_graph(ts, batch_statistics, fixed_mean, fixed_invstd):
    """mean and invstd [K, C]: the batch statistics of ts[k] computed in the graph (biased variance) for the rows
    with batch_statistics[k], the fixed rows given (skip connection, eval) otherwise."""
    means, invstds = [], []
    for k, t in enumerate(ts):
        if batch_statistics[k]:
            var, m = torch.var_mean(t, dim=(0, 2, 3), unbiased=False)
            means.append(m)
            invstds.append((var + EPS).rsqrt())
        else:
            means.append(fixed_mean[k])
            invstds.append(fixed_invstd[k])
    return torch.stack(means), torch.stack(invstds)


def statistics_flags(K):
    return [k % 3 != 0 for k in range(K)]  # K = 7: rows 0, 3, 6 fixed (row 0 a skip row), the others batch


def check_backward_op_matches_autograd_through_batch_statistics(backend, K, flags, shape, layout):
    ts, w, fixed_mean, fixed_invstd = make_inputs(K, shape, layout=layout)
    check_backward_op_matches_autograd_through_batch_statistics_of(ts, w, fixed_mean, fixed_invstd, flags, backend)


def check_backward_op_matches_autograd_through_batch_statistics_of(ts, w, fixed_mean, fixed_invstd, flags, backend):
    ts, w = [t.detach().requires_grad_() for t in ts], w.detach().requires_grad_()
    mean, invstd = batch_norm_graph(ts, flags, fixed_mean.detach(), fixed_invstd.detach())
    expected = reference.bn_weighted_sum(ts, w, mean, invstd)
    grad_out = torch.randn_like(expected)
    *expected_ts, expected_w = torch.autograd.grad(expected, [*ts, w], grad_out)
    grad_ts, grad_w = call_backward_op(backend, grad_out, ts, w, mean, invstd, flags)
    for got, want in zip(grad_ts, expected_ts, strict=True):
        assert_close(got, want, 1e-3)
        assert got.stride() == torch.empty_like(ts[0]).stride()
    assert_close(grad_w, expected_w, 1e-3)


@requires_ext
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(
    "K,flags", [(1, [True]), (1, [False]), (7, statistics_flags(7))], ids=["K1-batch", "K1-fixed", "K7-mixed"]
)
def test_backward_op_matches_autograd_through_batch_statistics(K, flags, shape, layout, cpu_isa):
    check_backward_op_matches_autograd_through_batch_statistics("cpp", K, flags, shape, layout)


@requires_ext
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (2, 16, 5, 3), (1, 4, 3, 5)])  # C 16 and 4: patterns in registers
def test_backward_op_float64_matches_native_batch_norm_backward(shape, layout, cpu_isa):
    ts, w, mean, invstd = make_inputs(3, shape, torch.float64, layout, requires_grad=False)
    flags = [True, False, True]
    for k in (0, 2):
        _, mean[k], invstd[k] = torch.native_batch_norm(ts[k], None, None, None, None, True, 0.0, EPS)
    grad = torch.randn_like(ts[0])
    grad_ts, grad_w = torch.ops.fastdarts.bn_weighted_sum_backward(grad, ts, w, mean, invstd, flags, True, True)
    for k in range(3):
        if flags[k]:
            dt, dgamma, _ = torch.ops.aten.native_batch_norm_backward(
                grad, ts[k], None, None, None, mean[k], invstd[k], True, EPS, [True, True, False]
            )
            want_t, want_w = w[k] * dt, dgamma.sum()
        else:
            want_t = w[k] * invstd[k].view(1, -1, 1, 1) * grad
            want_w = (grad * (ts[k] - mean[k].view(1, -1, 1, 1)) * invstd[k].view(1, -1, 1, 1)).sum()
        torch.testing.assert_close(grad_ts[k], want_t, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad_w[k], want_w, rtol=1e-10, atol=1e-12)


# Outputs of 2 MiB and more are written by non-temporal stores where a group of pixels is 4 or 8 of the tier's
# vectors (C = 16: 64 values). (4, 16, 96, 97) in float32 is 2.4 MB; one image of it, 0.6 MB, takes the plain stores.
# (1, 16, 181, 183) in float64 (8.5 MB) has an odd number of pixels, so its last group of 4 pixels is partial.
LARGE = [((4, 16, 96, 97), torch.float32), ((1, 16, 181, 183), torch.float64)]


@requires_ext
@pytest.mark.slow
@pytest.mark.parametrize("shape,dtype", LARGE, ids=["float32", "float64"])
def test_large_outputs_written_by_streaming_stores_match(shape, dtype, cpu_isa):
    ts, w, fixed_mean, fixed_invstd = make_inputs(7, shape, dtype, requires_grad=False)
    flags = statistics_flags(7)
    mean, invstd = batch_norm_graph(ts, flags, fixed_mean, fixed_invstd)
    out = torch.ops.fastdarts.bn_weighted_sum(ts, w, mean, invstd)
    # the forward is elementwise: each image alone (plain stores) gives the same bits
    for n in range(shape[0]):
        alone = torch.ops.fastdarts.bn_weighted_sum([t[n : n + 1] for t in ts], w, mean, invstd)
        assert torch.equal(out[n : n + 1], alone)
    assert_close(out, reference.bn_weighted_sum(ts, w, mean, invstd), 1e-4 if dtype == torch.float32 else 1e-10)
    check_backward_op_matches_autograd_through_batch_statistics_of(ts, w, fixed_mean, fixed_invstd, flags, "cpp")


OTHER_LAYOUTS = ["strided", "permuted", "mixed", "expanded_grad", "empty_batch"]


def check_other_layouts_and_an_empty_batch(backend, layout):
    """Views that are not dense, a dense layout that is neither contiguous nor channels_last, inputs in two layouts,
    an expanded gradient, and N = 0 (grad_w is then 0): the kernels copy these in and out of channels_last."""
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
    out = backend_ops(backend).bn_weighted_sum(ts, w, mean.detach(), invstd.detach())
    assert_close(out, expected, 1e-5)
    assert out.stride() == torch.empty_like(ts[0]).stride()
    if layout == "expanded_grad":  # stride 0 over images and channels; varying over pixels, or the BN would cancel it
        grad = torch.randn(1, 1, *expected.shape[2:]).expand(expected.shape)
    else:
        grad = torch.randn_like(expected)
    leaves = [*ts, w]
    want = torch.autograd.grad(expected, leaves, grad) if expected.numel() else [torch.zeros_like(t) for t in leaves]
    grad_ts, grad_w = call_backward_op(backend, grad, ts, w, mean, invstd, flags)
    for got, expected_grad in zip([*grad_ts, grad_w], want, strict=True):
        assert_close(got, expected_grad, 1e-5)
    if layout == "empty_batch":
        assert torch.equal(grad_w, torch.zeros(K))


@requires_ext
@pytest.mark.parametrize("layout", OTHER_LAYOUTS)
def test_other_layouts_and_an_empty_batch(layout, cpu_isa):
    check_other_layouts_and_an_empty_batch("cpp", layout)


def check_backward_op_computes_only_what_is_asked(backend, input_grad, w_grad):
    ts, w, mean, invstd = make_inputs(4, (2, 6, 5, 7), requires_grad=False)
    grad = torch.randn_like(ts[0])
    flags = [False, True, True, False]
    all_ts, all_w = call_backward_op(backend, grad, ts, w, mean, invstd, flags)
    grad_ts, grad_w = call_backward_op(backend, grad, ts, w, mean, invstd, flags, input_grad, w_grad)
    assert grad_ts == [] if not input_grad else all(torch.equal(a, b) for a, b in zip(grad_ts, all_ts, strict=True))
    assert grad_w is None if not w_grad else torch.equal(grad_w, all_w)


@requires_ext
@pytest.mark.parametrize("input_grad,w_grad", [(True, False), (False, True), (False, False)])
def test_backward_op_computes_only_what_is_asked(input_grad, w_grad):
    check_backward_op_computes_only_what_is_asked("cpp", input_grad, w_grad)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_float64(backend, layout):
    ts, w, mean, invstd = make_inputs(3, (2, 3, 3, 4), torch.float64, layout)

    def fn(*tensors):
        return ops.bn_weighted_sum(tensors[:3], *tensors[3:], backend=backend)

    assert torch.autograd.gradcheck(fn, (*ts, w, mean, invstd))
    if backend == "reference":
        assert torch.autograd.gradgradcheck(fn, (*ts, w, mean, invstd))


def check_gradcheck_float64_through_batch_statistics(backend, fast_mode=False):
    """The forward op's autograd, chained through statistics computed in the graph, is the BN-through gradient."""
    ts, w, fixed_mean, fixed_invstd = make_inputs(3, (2, 3, 3, 4), torch.float64)
    flags = [False, True, True]

    def fn(*tensors):
        mean, invstd = batch_norm_graph(tensors[:3], flags, fixed_mean.detach(), fixed_invstd.detach())
        return ops.bn_weighted_sum(tensors[:3], tensors[3], mean, invstd, backend=backend)

    assert torch.autograd.gradcheck(fn, (*ts, w), fast_mode=fast_mode)


@requires_ext
def test_gradcheck_float64_through_batch_statistics(cpu_isa):
    check_gradcheck_float64_through_batch_statistics("cpp")


def check_second_derivative_raises_a_clear_error(backend):
    ts, w, mean, invstd = make_inputs(2, (2, 3, 4, 4), torch.float64)
    out = ops.bn_weighted_sum(ts, w, mean, invstd, backend=backend)
    (grad_w,) = torch.autograd.grad(out.square().sum(), [w], create_graph=True)
    namespace = backend_ops(backend).name
    with pytest.raises(RuntimeError, match=f"{namespace}::bn_weighted_sum_backward is not differentiable"):
        torch.autograd.grad(grad_w.sum(), [ts[0]])


@requires_ext
def test_cpp_second_derivative_raises_a_clear_error():
    check_second_derivative_raises_a_clear_error("cpp")


@requires_ext
def test_does_not_depend_on_the_thread_count(cpu_isa):
    # 16 units of 4096 values, two tasks of 8: both threads work with 2 threads.
    ts, w, mean, invstd = make_inputs(5, (4, 16, 32, 32), requires_grad=False)
    grad = torch.randn_like(ts[0])
    flags = [False, True, True, False, True]
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            out = torch.ops.fastdarts.bn_weighted_sum(ts, w, mean, invstd)
            grad_ts, grad_w = torch.ops.fastdarts.bn_weighted_sum_backward(grad, ts, w, mean, invstd, flags, True, True)
            results.append([out, *grad_ts, grad_w])
    finally:
        torch.set_num_threads(previous)
    for result in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(result, results[0]))


def forward_samples():
    """(id, (ts, w, mean, invstd)) for opcheck: every mix of operands needing gradients, and the layouts."""
    samples = []
    for needs in ("all", "ts", "w", "statistics", "none"):
        ts, w, mean, invstd = make_inputs(3, (2, 4, 5, 3), requires_grad=False)
        for t in ts:
            t.requires_grad_(needs in ("all", "ts"))
        w.requires_grad_(needs in ("all", "w"))
        mean.requires_grad_(needs in ("all", "statistics"))
        invstd.requires_grad_(needs in ("all", "statistics"))
        samples.append((f"needs_grad={needs}", (ts, w, mean, invstd)))
    samples.append(("K1_contiguous_f64", make_inputs(1, (1, 3, 5, 5), torch.float64, "contiguous")))
    ts, w, mean, invstd = make_inputs(2, (2, 3, 5, 4))
    samples.append(("mixed_layouts", ([ts[0], ts[1].detach().contiguous()], w, mean, invstd)))
    return samples


def backward_samples():
    """(id, args) for opcheck: no operand needs a gradient (the op is not differentiable); every output flag."""
    samples = []
    for layout in LAYOUTS:
        ts, w, mean, invstd = make_inputs(3, (2, 4, 5, 3), layout=layout, requires_grad=False)
        grad = torch.randn(2, 4, 5, 3)
        for input_grad, w_grad in ((True, True), (True, False), (False, True), (False, False)):
            args = (grad, ts, w, mean, invstd, [True, False, True], input_grad, w_grad)
            samples.append((f"{layout}-input_grad={input_grad}-w_grad={w_grad}", args))
    return samples


@requires_ext
@pytest.mark.parametrize("args", [s for _, s in forward_samples()], ids=[i for i, _ in forward_samples()])
def test_opcheck_bn_weighted_sum(args):
    opcheck(torch.ops.fastdarts.bn_weighted_sum.default, args)


@requires_ext
@pytest.mark.parametrize("args", [s for _, s in backward_samples()], ids=[i for i, _ in backward_samples()])
def test_opcheck_bn_weighted_sum_backward(args):
    opcheck(torch.ops.fastdarts.bn_weighted_sum_backward.default, args)


def opcheck_backward_op_with_inputs_needing_grad(backend):
    """Its autograd is registered (it raises when used), and the fake agrees with the kernel."""
    ts, w, mean, invstd = make_inputs(2, (2, 4, 3, 3))
    args = (torch.randn(2, 4, 3, 3, requires_grad=True), ts, w, mean, invstd, [True, False], True, True)
    opcheck(
        backend_ops(backend).bn_weighted_sum_backward.default,
        args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@requires_ext
def test_opcheck_bn_weighted_sum_backward_with_inputs_needing_grad():
    opcheck_backward_op_with_inputs_needing_grad("cpp")


def ok(K=2, C=3):
    """Valid arguments, to be spoilt one at a time."""
    return [torch.randn(2, C, 4, 4) for _ in range(K)], torch.randn(K), torch.zeros(K, C), torch.ones(K, C)


def spoil(index, value):
    def make():
        args = list(ok())
        args[index] = value
        return args

    return make


BAD_INPUTS = [
    (
        "empty",
        lambda: ([], torch.randn(0), torch.zeros(0, 3), torch.ones(0, 3)),
        ValueError,
        "ts must be a non-empty list",
    ),
    (
        "shapes",
        spoil(0, [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5)]),
        ValueError,
        r"ts\[1\] must have the shape of ts\[0\]",
    ),
    ("not_images", spoil(0, [torch.randn(2, 3, 4)] * 2), ValueError, r"ts must be a 4-D \[N, C, H, W\] tensor"),
    (
        "dtypes",
        spoil(0, [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4).double()]),
        TypeError,
        r"ts\[1\] must have the dtype",
    ),
    ("weights", spoil(1, torch.randn(3)), ValueError, r"w must have shape \[K\] with K = 2"),
    (
        "mean_shape",
        spoil(2, torch.zeros(2, 4)),
        ValueError,
        r"mean must have shape \[K, C\] = \[2, 3\] \(one row per tensor\)",
    ),
    ("invstd_rows", spoil(3, torch.ones(3, 3)), ValueError, r"invstd must have shape \[K, C\] = \[2, 3\]"),
    ("invstd_dtype", spoil(3, torch.ones(2, 3).double()), TypeError, "invstd must have the dtype of the tensors"),
]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
@pytest.mark.parametrize("make,error,message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_arguments_raise_one_line_errors(backend, make, error, message):
    with pytest.raises(error, match=message) as raised:
        ops.bn_weighted_sum(*make(), backend=backend)
    assert str(raised.value).startswith("bn_weighted_sum: ") and "\n" not in str(raised.value)


BACKWARD_BAD_ARGUMENTS = [
    ("grad", dict(grad=torch.randn(2, 3, 4, 5)), ValueError, r"grad must have the shape of ts\[0\]"),
    ("batch_statistics", dict(batch_statistics=[True]), ValueError,
     r"batch_statistics must have one entry per tensor \(K = 2\), got 1"),
    ("dtype", dict(dtype=torch.float16), TypeError, "only float32 and float64 are supported"),
]  # fmt: skip


def spoilt_backward_arguments(change):
    """bn_weighted_sum_backward's arguments, valid but for `change`."""
    ts, w, mean, invstd = ok()
    if "dtype" in change:
        ts, w, mean, invstd = [t.to(change["dtype"]) for t in ts], *(x.to(change["dtype"]) for x in (w, mean, invstd))
    grad = change.get("grad", torch.randn_like(ts[0]))
    flags = change.get("batch_statistics", [True, False])
    return grad, ts, w, mean, invstd, flags, True, True


@requires_ext
@pytest.mark.parametrize(
    "change,error,message", [c[1:] for c in BACKWARD_BAD_ARGUMENTS], ids=[c[0] for c in BACKWARD_BAD_ARGUMENTS]
)
def test_backward_op_bad_arguments(change, error, message):
    args = spoilt_backward_arguments(change)
    for call in (torch.ops.fastdarts.bn_weighted_sum_backward, _fake_backward):
        with pytest.raises(error, match=message) as raised:
            call(*args)
        assert "\n" not in str(raised.value)


def _fake_backward(*args):
    """The backward op under FakeTensorMode: its fake's checks."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake[1] = [mode.from_tensor(t) for t in args[1]]
        return torch.ops.fastdarts.bn_weighted_sum_backward(*fake)


@requires_ext
def test_compile_fullgraph_matches_eager():
    def edge(ts, alpha):
        mean, invstd = batch_norm_graph(ts, [False, True], torch.zeros(2, 3), torch.ones(2, 3))
        return ops.bn_weighted_sum(ts, alpha.softmax(0), mean, invstd).square().sum()

    torch._dynamo.reset()
    ts, alpha, _, _ = make_inputs(2, (2, 3, 5, 5))
    got = torch.compile(edge, fullgraph=True, backend="aot_eager")(ts, alpha)
    expected = edge(ts, alpha)
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got, [*ts, alpha])
    for a, b in zip(grads, torch.autograd.grad(expected, [*ts, alpha])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# bn_weighted_sum_backward_factors: pass 1 for every row, pass 2 only for the rows written out, and the factors with
# which relu_dwconv_pointwise_backward forms the others' gradients as it reads them.


def factors_arguments(K, shape, dtype=torch.float32, layout="channels_last"):
    ts, w, mean, invstd = make_inputs(K, shape, dtype, layout, requires_grad=False)
    return torch.randn_like(ts[0]), ts, w, mean, invstd


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (2, 16, 5, 3), (3, 4, 8, 8)], ids=["C5", "C16", "C4"])
@pytest.mark.parametrize("w_grad", [True, False], ids=["w_grad", "no_w_grad"])
def test_factors_form_the_gradients_of_the_backward_op(shape, w_grad, dtype, cpu_isa):
    """The written rows' gradients and grad_w are bn_weighted_sum_backward's, bit for bit; every row's factors form
    its gradient, a g + b (t - mean) + e."""
    K = 7
    grad, ts, w, mean, invstd = factors_arguments(K, shape, dtype)
    flags = statistics_flags(K)
    written = [k % 3 == 0 for k in range(K)]  # batch-statistics and fixed rows among both kinds
    want_ts, want_w = torch.ops.fastdarts.bn_weighted_sum_backward(grad, ts, w, mean, invstd, flags, True, w_grad)
    grad_ts, factors, grad_w = torch.ops.fastdarts.bn_weighted_sum_backward_factors(
        grad, ts, w, mean, invstd, flags, written, w_grad
    )
    assert len(grad_ts) == sum(written)
    for got, want in zip(grad_ts, [t for t, row in zip(want_ts, written) if row], strict=True):
        assert torch.equal(got, want) and got.stride() == want.stride()
    assert (grad_w is None) if not w_grad else torch.equal(grad_w, want_w)
    assert factors.shape == (K, 4, shape[1])
    formed = reference.formed_grads([grad] * K, ts, factors)
    for k in range(K):
        assert_close(formed[k], want_ts[k], 1e-5 if dtype == torch.float32 else 1e-12)
        if not flags[k]:  # a fixed row: w invstd g
            assert torch.equal(factors[k, 1], torch.zeros_like(factors[k, 1]))
            assert torch.equal(factors[k, 3], torch.zeros_like(factors[k, 3]))


@requires_ext
@pytest.mark.parametrize("w_grad", [True, False], ids=["w_grad", "no_w_grad"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_bn_weighted_sum_backward_factors(layout, w_grad):
    grad, ts, w, mean, invstd = factors_arguments(3, (2, 4, 5, 3), layout=layout)
    args = (grad, ts, w, mean, invstd, [True, False, True], [False, True, True], w_grad)
    opcheck(torch.ops.fastdarts.bn_weighted_sum_backward_factors.default, args)


@requires_ext
def test_factors_op_bad_written_gives_one_line():
    grad, ts, w, mean, invstd = factors_arguments(2, (2, 3, 4, 4))
    args = (grad, ts, w, mean, invstd, [True, False], [True], True)
    from torch._subclasses.fake_tensor import FakeTensorMode

    def fake_call(*args):
        with FakeTensorMode() as mode:
            fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake[1] = [mode.from_tensor(t) for t in args[1]]
            return torch.ops.fastdarts.bn_weighted_sum_backward_factors(*fake)

    for call in (torch.ops.fastdarts.bn_weighted_sum_backward_factors, fake_call):
        with pytest.raises(ValueError, match=r"written must have one entry per tensor \(K = 2\), got 1") as raised:
            call(*args)
        assert "\n" not in str(raised.value)
