"""The factorized_reduce_bn_stats kernel (FactorizedReduce before its BN, for several weight pairs from one read of
x, with each output's batch statistics) and its backward, against reference.factorized_reduce_bn_stats: outputs,
statistics and every gradient, on every CPU tier, both layouts, odd sizes, with and without the ReLU; gradcheck in
float64, opcheck, the gradient flags, one-line errors, and sums that do not depend on the thread count."""

import itertools

import pytest
import torch
from torch.library import opcheck

from fastdarts.ops import reference

from ..conftest import requires_ext
from ._helpers import assert_gradients_close, memory_format_of

# (N, C, H, W, E, h): odd and even sides, a 1x1 image, channel counts below, at and past a vector, E = 1..4.
CASES = [(3, 4, 8, 8, 1, 2), (2, 6, 7, 9, 3, 3), (2, 32, 5, 4, 4, 16), (1, 5, 1, 1, 2, 5), (2, 17, 9, 3, 2, 1),
         (2, 16, 6, 6, 4, 8)]  # fmt: skip
CASE_IDS = ["N{}C{}H{}W{}E{}h{}".format(*case) for case in CASES]
TOLERANCES = {
    torch.float32: dict(out=dict(rtol=1e-5, atol=1e-5), grad=dict(rtol=1e-4, atol=1e-4)),
    torch.float64: dict(out=dict(rtol=1e-10, atol=1e-12), grad=dict(rtol=1e-10, atol=1e-10)),
}


def make_inputs(case, dtype=torch.float32, layout="channels_last", requires_grad=True):
    N, C, H, W, E, h = case
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N, C, H, W, dtype=dtype, generator=generator).contiguous(memory_format=memory_format_of(layout))
    convs = [torch.randn(h, C, 1, 1, dtype=dtype, generator=generator) for _ in range(2 * E)]
    return x.requires_grad_(requires_grad), [c.requires_grad_(requires_grad) for c in convs[:E]], [
        c.requires_grad_(requires_grad) for c in convs[E:]
    ]


def kernel(x, conv_1s, conv_2s, relu=True):
    outs, mean, var = torch.ops.fastdarts.factorized_reduce_bn_stats.default(x, conv_1s, conv_2s, relu)
    return list(outs), mean, var


@requires_ext
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_reference(case, dtype, layout, relu, cpu_isa):
    tol = TOLERANCES[dtype]
    x, conv_1s, conv_2s = make_inputs(case, dtype, layout)
    outs, mean, var = kernel(x, conv_1s, conv_2s, relu)
    want_outs, want_mean, want_var = reference.factorized_reduce_bn_stats(x, conv_1s, conv_2s, relu)
    for got, want in zip(outs, want_outs, strict=True):
        torch.testing.assert_close(got, want, **tol["out"])
        assert got.is_contiguous(memory_format=memory_format_of(layout))
    torch.testing.assert_close(mean, want_mean, **tol["out"])
    torch.testing.assert_close(var, want_var, **tol["out"])
    assert not mean.requires_grad and not var.requires_grad
    inputs = [x, *conv_1s, *conv_2s]
    grads = [torch.randn_like(out) for out in want_outs]
    assert_gradients_close(torch.autograd.grad(outs, inputs, grads), torch.autograd.grad(want_outs, inputs, grads),
                           tol["grad"])  # fmt: skip


@requires_ext
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
def test_gradcheck_float64(relu):
    x, conv_1s, conv_2s = make_inputs((2, 3, 5, 4, 2, 2), torch.float64)
    n = len(conv_1s)

    def outputs(x, *convs):
        return tuple(kernel(x, list(convs[:n]), list(convs[n:]), relu)[0])

    assert torch.autograd.gradcheck(outputs, (x, *conv_1s, *conv_2s))


@requires_ext
@pytest.mark.parametrize("input_grad, weight_grad", list(itertools.product([True, False], repeat=2)))
def test_backward_computes_only_what_is_asked(input_grad, weight_grad):
    x, conv_1s, conv_2s = make_inputs((2, 6, 7, 9, 3, 3), requires_grad=False)
    grads = [torch.randn_like(out) for out in kernel(x, conv_1s, conv_2s)[0]]
    backward = torch.ops.fastdarts.factorized_reduce_bn_stats_backward.default
    grad_x, grad_1s, grad_2s = backward(grads, x, conv_1s, conv_2s, True, input_grad, weight_grad)
    full = backward(grads, x, conv_1s, conv_2s, True, True, True)
    assert (grad_x is None) == (not input_grad)
    assert (len(grad_1s), len(grad_2s)) == ((3, 3) if weight_grad else (0, 0))
    if input_grad:
        assert torch.equal(grad_x, full[0])
    for got, want in zip([*grad_1s, *grad_2s], [*full[1], *full[2]]):
        assert torch.equal(got, want)


@requires_ext
def test_gradient_reaches_only_the_sampled_pixels_where_x_is_positive():
    x, conv_1s, conv_2s = make_inputs((2, 4, 7, 7, 1, 2), requires_grad=False)
    grads = [torch.randn_like(out) for out in kernel(x, conv_1s, conv_2s)[0]]
    grad_x = torch.ops.fastdarts.factorized_reduce_bn_stats_backward.default(
        grads, x, conv_1s, conv_2s, True, True, False
    )[0]
    sampled = torch.zeros(7, 7, dtype=torch.bool)
    sampled[::2, ::2] = sampled[1::2, 1::2] = True
    assert torch.all(grad_x[:, :, ~sampled] == 0) and torch.all(grad_x[x <= 0] == 0)
    assert torch.count_nonzero(grad_x) > 0


@requires_ext
def test_statistics_are_accumulated_in_double():
    # Far from zero, float32 sums of squares would lose the variance; the kernel's must agree with float64
    # statistics of its own float32 outputs.
    x, conv_1s, conv_2s = make_inputs((4, 8, 16, 16, 2, 4), requires_grad=False)
    outs, mean, var = kernel(x.abs() + 1e3, conv_1s, conv_2s)
    for e, out in enumerate(outs):
        want_var, want_mean = torch.var_mean(out.double(), dim=(0, 2, 3), correction=0)
        torch.testing.assert_close(mean[e], want_mean.float(), rtol=1e-6, atol=0)
        torch.testing.assert_close(var[e], want_var.float(), rtol=1e-5, atol=0)


@requires_ext
def test_results_do_not_depend_on_the_thread_count():
    x, conv_1s, conv_2s = make_inputs((8, 16, 32, 32, 4, 8), requires_grad=False)
    grads = [torch.randn_like(out) for out in kernel(x, conv_1s, conv_2s)[0]]
    backward = torch.ops.fastdarts.factorized_reduce_bn_stats_backward.default
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs, mean, var = kernel(x, conv_1s, conv_2s)
            grad_x, grad_1s, grad_2s = backward(grads, x, conv_1s, conv_2s, True, True, True)
            results.append([*outs, mean, var, grad_x, *grad_1s, *grad_2s])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@requires_ext
def test_empty_batch():
    x, conv_1s, conv_2s = make_inputs((0, 4, 6, 6, 2, 2), requires_grad=False)
    outs, mean, var = kernel(x, conv_1s, conv_2s)
    assert [list(out.shape) for out in outs] == [[0, 4, 3, 3]] * 2
    assert mean.isnan().all() and var.isnan().all()  # as torch.var_mean of an empty tensor
    grad_x, grad_1s, _ = torch.ops.fastdarts.factorized_reduce_bn_stats_backward.default(
        outs, x, conv_1s, conv_2s, True, True, True
    )
    assert grad_x.shape == x.shape and all(torch.equal(g, torch.zeros_like(g)) for g in grad_1s)


def opcheck_samples():
    samples = []
    for needs in (True, False):
        x, conv_1s, conv_2s = make_inputs((2, 5, 7, 6, 2, 3), requires_grad=needs)
        samples.append((f"needs_grad={needs}", (x, conv_1s, conv_2s, True)))
    x, conv_1s, conv_2s = make_inputs((1, 16, 9, 9, 1, 8), torch.float64, "contiguous")
    samples.append(("contiguous_f64_no_relu", (x, conv_1s, conv_2s, False)))
    return samples


@requires_ext
@pytest.mark.parametrize("args", [s for _, s in opcheck_samples()], ids=[i for i, _ in opcheck_samples()])
def test_opcheck(args):
    opcheck(torch.ops.fastdarts.factorized_reduce_bn_stats.default, args)
    x, conv_1s, conv_2s, relu = (a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    conv_1s, conv_2s = [c.detach() for c in conv_1s], [c.detach() for c in conv_2s]
    grads = [torch.randn_like(out) for out in kernel(x, conv_1s, conv_2s, relu)[0]]
    for flags in ((True, True), (True, False), (False, True)):
        opcheck(torch.ops.fastdarts.factorized_reduce_bn_stats_backward.default,
                (grads, x, conv_1s, conv_2s, relu, *flags))  # fmt: skip


def bad_calls():
    x, conv_1s, conv_2s = make_inputs((2, 4, 6, 6, 2, 2), requires_grad=False)
    op = "factorized_reduce_bn_stats"
    return [
        ("empty", (x, [], []), f"{op}: conv_1s must be a non-empty list of tensors"),
        ("channels", (x, [torch.ones(2, 3, 1, 1)] * 2, conv_2s),
         rf"{op}: conv_1s\[0\] must have shape \[h, C, 1, 1\] with h >= 1 and C = 4, got shape \[2, 3, 1, 1\]"),
        ("count", (x, conv_1s, conv_2s[:1]), rf"{op}: conv_2s must have one tensor per output \(K = 2\), got 1"),
        ("shape", (x, conv_1s, [conv_2s[0], torch.ones(1, 4, 1, 1)]),
         rf"{op}: conv_2s\[1\] must have shape \[2, 4, 1, 1\], got \[1, 4, 1, 1\]"),
        ("image", (x[0], conv_1s, conv_2s), rf"{op}: x must be a 4-D \[N, C, H, W\] tensor"),
    ]  # fmt: skip


@requires_ext
@pytest.mark.parametrize("args, message", [c[1:] for c in bad_calls()], ids=[c[0] for c in bad_calls()])
def test_bad_arguments_raise_one_line(args, message):
    for call in (reference.factorized_reduce_bn_stats, torch.ops.fastdarts.factorized_reduce_bn_stats.default):
        with pytest.raises(ValueError, match=f"^{message}") as error:
            call(*args, True)
        assert "\n" not in str(error.value).strip()
