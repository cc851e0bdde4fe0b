"""The kernels of factorized_reduce_bn_stats (FactorizedReduce before its BN, for several weight pairs from one read
of x) and relu_pointwise_bn_stats (a ReLU and 1x1 conv before a BN), each with its outputs' batch statistics, and
their backwards, against the reference: outputs, statistics and every gradient, on every CPU tier, both layouts, odd
sizes, with and without the ReLU, relu_pointwise_bn_stats's x whole and in channel parts; gradcheck in float64,
opcheck, the gradient flags, one-line errors, and sums that do not depend on the thread count. Then ops.relu_conv_bn
(a cell's preprocessing) against nn modules."""

import copy
import itertools

import pytest
import torch
from torch.library import opcheck

from fastdarts import ops, space
from fastdarts.ops import reference
from fastdarts.space import ReLUConvBN, drop_running_statistics
from fastdarts.supernet import _batch_norm_arguments

from ..conftest import requires_ext
from ._helpers import assert_gradients_close, memory_format_of

# (N, C, H, W, E, h): odd and even sides, a 1x1 image, channel counts below, at and past a vector, E = 1..4; h is
# each weight's number of output channels.
CASES = [(3, 4, 8, 8, 1, 2), (2, 6, 7, 9, 3, 3), (2, 32, 5, 4, 4, 16), (1, 5, 1, 1, 2, 5), (2, 17, 9, 3, 2, 1),
         (2, 16, 6, 6, 4, 8)]  # fmt: skip
CASE_IDS = ["N{}C{}H{}W{}E{}h{}".format(*case) for case in CASES]
TOLERANCES = {
    torch.float32: dict(out=dict(rtol=1e-5, atol=1e-5), grad=dict(rtol=1e-4, atol=1e-4)),
    torch.float64: dict(out=dict(rtol=1e-10, atol=1e-12), grad=dict(rtol=1e-10, atol=1e-10)),
}


class FactorizedReduce:
    """factorized_reduce_bn_stats: E pairs of weights, (conv_1s, conv_2s); x a list of one tensor."""

    parts = 2
    op = torch.ops.fastdarts.factorized_reduce_bn_stats.default
    backward = torch.ops.fastdarts.factorized_reduce_bn_stats_backward.default
    reference = staticmethod(reference.factorized_reduce_bn_stats)

    @staticmethod
    def channel_split(C):
        return [C]


class FactorizedReduceParts(FactorizedReduce):
    """factorized_reduce_bn_stats with x in up to three channel parts of unequal sizes (a cell's output nodes)."""

    @staticmethod
    def channel_split(C):
        return [c for c in (C // 2, C // 4, C - C // 4 - C // 2) if c > 0]


class ReluPointwise:
    """relu_pointwise_bn_stats: E weights; x a list of one tensor."""

    parts = 1
    op = torch.ops.fastdarts.relu_pointwise_bn_stats.default
    backward = torch.ops.fastdarts.relu_pointwise_bn_stats_backward.default
    reference = staticmethod(reference.relu_pointwise_bn_stats)

    @staticmethod
    def channel_split(C):
        return [C]


class ReluPointwiseParts(ReluPointwise):
    """relu_pointwise_bn_stats with x in up to three channel parts of unequal sizes, each a tensor of its own."""

    @staticmethod
    def channel_split(C):
        return [c for c in (C // 4, C // 2, C - C // 4 - C // 2) if c > 0]


KERNELS = [FactorizedReduce, FactorizedReduceParts, ReluPointwise, ReluPointwiseParts]
KERNEL_IDS = ["factorized_reduce", "factorized_reduce_parts", "relu_pointwise", "relu_pointwise_parts"]


def make_inputs(kernel, case, dtype=torch.float32, layout="channels_last", requires_grad=True):
    """(xs, weights): xs the channel parts of x (kernel.channel_split), each a tensor of its own; weights one list per
    part."""
    N, C, H, W, E, h = case
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N, C, H, W, dtype=dtype, generator=generator).contiguous(memory_format=memory_format_of(layout))
    weights = [[torch.randn(h, C, 1, 1, dtype=dtype, generator=generator).requires_grad_(requires_grad)
                for _ in range(E)] for _ in range(kernel.parts)]  # fmt: skip
    parts = [part.contiguous(memory_format=memory_format_of(layout)) for part in x.split(kernel.channel_split(C), 1)]
    return [part.requires_grad_(requires_grad) for part in parts], weights


def forward(kernel, xs, weights, relu=True):
    outs, mean, var = kernel.op(xs, *weights, relu)
    return list(outs), mean, var


def backward(kernel, grads, xs, weights, relu, input_grad, weight_grad):
    """(the gradient of each of xs, or None; [per part, the weights' gradients])."""
    grad_xs, *grad_parts = kernel.backward(grads, xs, *weights, relu, input_grad, weight_grad)
    return (list(grad_xs) if input_grad else None), grad_parts


@requires_ext
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_matches_reference(kernel, case, dtype, layout, relu, cpu_isa):
    tol = TOLERANCES[dtype]
    x, weights = make_inputs(kernel, case, dtype, layout)
    outs, mean, var = forward(kernel, x, weights, relu)
    want_outs, want_mean, want_var = kernel.reference(x, *weights, relu)
    for got, want in zip(outs, want_outs, strict=True):
        torch.testing.assert_close(got, want, **tol["out"])
        assert got.is_contiguous(memory_format=memory_format_of(layout))
    torch.testing.assert_close(mean, want_mean, **tol["out"])
    torch.testing.assert_close(var, want_var, **tol["out"])
    assert not mean.requires_grad and not var.requires_grad
    inputs = [*x, *itertools.chain(*weights)]
    grads = [torch.randn_like(out) for out in want_outs]
    assert_gradients_close(torch.autograd.grad(outs, inputs, grads), torch.autograd.grad(want_outs, inputs, grads),
                           tol["grad"])  # fmt: skip


@requires_ext
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_gradcheck_float64(kernel, relu):
    x, weights = make_inputs(kernel, (2, 3, 5, 4, 2, 2), torch.float64)
    flat = list(itertools.chain(*weights))

    def outputs(*tensors):
        flat = tensors[len(x) :]
        parts = [list(flat[p * 2 : (p + 1) * 2]) for p in range(kernel.parts)]
        return tuple(forward(kernel, list(tensors[: len(x)]), parts, relu)[0])

    assert torch.autograd.gradcheck(outputs, (*x, *flat))


@requires_ext
@pytest.mark.parametrize("input_grad, weight_grad", list(itertools.product([True, False], repeat=2)))
@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_backward_computes_only_what_is_asked(kernel, input_grad, weight_grad):
    x, weights = make_inputs(kernel, (2, 6, 7, 9, 3, 3), requires_grad=False)
    grads = [torch.randn_like(out) for out in forward(kernel, x, weights)[0]]
    grad_x, grad_parts = backward(kernel, grads, x, weights, True, input_grad, weight_grad)
    full_x, full_parts = backward(kernel, grads, x, weights, True, True, True)
    assert (grad_x is None) == (not input_grad)
    assert [len(g) for g in grad_parts] == [3 if weight_grad else 0] * kernel.parts
    if input_grad:
        assert len(grad_x) == len(full_x) == len(x)
        assert all(torch.equal(got, want) for got, want in zip(grad_x, full_x))
    for got, want in zip(itertools.chain(*grad_parts), itertools.chain(*full_parts)):
        assert torch.equal(got, want)


@requires_ext
def test_factorized_reduce_gradient_reaches_only_the_sampled_pixels_where_x_is_positive():
    (x,), weights = make_inputs(FactorizedReduce, (2, 4, 7, 7, 1, 2), requires_grad=False)
    grads = [torch.randn_like(out) for out in forward(FactorizedReduce, [x], weights)[0]]
    (grad_x,), _ = backward(FactorizedReduce, grads, [x], weights, True, True, False)
    sampled = torch.zeros(7, 7, dtype=torch.bool)
    sampled[::2, ::2] = sampled[1::2, 1::2] = True
    assert torch.all(grad_x[:, :, ~sampled] == 0) and torch.all(grad_x[x <= 0] == 0)
    assert torch.count_nonzero(grad_x) > 0


@requires_ext
@pytest.mark.parametrize("large", ["input", "outputs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_large_tensors_match_reference(kernel, dtype, large, cpu_isa):
    # An input gradient, or outputs, of 8 MiB or more are written with non-temporal stores (whole aligned vectors), a
    # path of their own.
    W = 256 // dtype.itemsize
    case = (8, 64, 64, W, 1, 16) if large == "input" else (8, 16, 64, W, 2, 64)
    x, weights = make_inputs(kernel, case, dtype)
    outs, mean, var = forward(kernel, x, weights)
    tensors = x if large == "input" else outs
    assert sum(t.numel() for t in tensors) * dtype.itemsize >= 8 << 20
    want_outs, want_mean, want_var = kernel.reference(x, *weights)
    for got, want in zip([*outs, mean, var], [*want_outs, want_mean, want_var]):
        torch.testing.assert_close(got, want, **TOLERANCES[dtype]["out"])
    grads = [torch.randn_like(out) for out in want_outs]
    got = torch.autograd.grad(outs, x, grads)
    want = torch.autograd.grad(want_outs, x, grads)
    assert_gradients_close(got, want, TOLERANCES[dtype]["grad"])


@requires_ext
@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_statistics_are_accumulated_in_double(kernel):
    # Far from zero, float32 sums of squares would lose the variance; the kernel's must agree with float64
    # statistics of its own float32 outputs.
    x, weights = make_inputs(kernel, (4, 8, 16, 16, 2, 4), requires_grad=False)
    outs, mean, var = forward(kernel, [part.abs() + 1e3 for part in x], weights)
    for e, out in enumerate(outs):
        want_var, want_mean = torch.var_mean(out.double(), dim=(0, 2, 3), correction=0)
        torch.testing.assert_close(mean[e], want_mean.float(), rtol=1e-6, atol=0)
        torch.testing.assert_close(var[e], want_var.float(), rtol=1e-5, atol=0)


@requires_ext
@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_results_do_not_depend_on_the_thread_count(kernel):
    x, weights = make_inputs(kernel, (8, 16, 32, 32, 4, 8), requires_grad=False)
    grads = [torch.randn_like(out) for out in forward(kernel, x, weights)[0]]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs, mean, var = forward(kernel, x, weights)
            grad_x, grad_parts = backward(kernel, grads, x, weights, True, True, True)
            results.append([*outs, mean, var, *grad_x, *itertools.chain(*grad_parts)])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@requires_ext
@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_empty_batch(kernel):
    x, weights = make_inputs(kernel, (0, 4, 6, 6, 2, 2), requires_grad=False)
    outs, mean, var = forward(kernel, x, weights)
    side = 6 // kernel.parts
    assert [list(out.shape) for out in outs] == [[0, 2 * kernel.parts, side, side]] * 2
    assert mean.isnan().all() and var.isnan().all()  # as torch.var_mean of an empty tensor
    grad_x, grad_parts = backward(kernel, outs, x, weights, True, True, True)
    assert [g.shape for g in grad_x] == [part.shape for part in x]
    assert all(torch.equal(g, torch.zeros_like(g)) for g in itertools.chain(*grad_parts))


@requires_ext
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_formed_grads_are_the_grads_formed_first(kernel, case, dtype, layout, cpu_isa):
    """With grad_inputs and grad_factors the backward forms each output gradient a g + b (t - mean) + e as it reads g
    and t (a BN's backward): the same results as the backward given those gradients formed beforehand."""
    x, weights = make_inputs(kernel, case, dtype, layout, requires_grad=False)
    outs = forward(kernel, x, weights)[0]
    generator = torch.Generator().manual_seed(2)
    grads = [torch.randn(out.shape, dtype=dtype, generator=generator) for out in outs]
    layout_of_inputs = memory_format_of(layout)
    inputs = [torch.randn(out.shape, dtype=dtype, generator=generator).contiguous(memory_format=layout_of_inputs)
              for out in outs]  # fmt: skip
    factors = torch.randn(len(outs), 4, outs[0].shape[1], dtype=dtype, generator=generator)
    got = kernel.backward(grads, x, *weights, True, True, True, inputs, factors)
    want = kernel.backward(reference.formed_grads(grads, inputs, factors), x, *weights, True, True, True)
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            torch.testing.assert_close(a, b, **TOLERANCES[dtype]["grad"])


def opcheck_samples():
    samples = []
    for kernel, name in zip(KERNELS, KERNEL_IDS):
        for needs in (True, False):
            x, weights = make_inputs(kernel, (2, 5, 7, 6, 2, 3), requires_grad=needs)
            samples.append((f"{name}_needs_grad={needs}", kernel, x, weights, True))
        x, weights = make_inputs(kernel, (1, 16, 9, 9, 1, 8), torch.float64, "contiguous")
        samples.append((f"{name}_contiguous_f64_no_relu", kernel, x, weights, False))
    return samples


@requires_ext
@pytest.mark.parametrize("sample", [s[1:] for s in opcheck_samples()], ids=[s[0] for s in opcheck_samples()])
def test_opcheck(sample):
    kernel, x, weights, relu = sample
    opcheck(kernel.op, (x, *weights, relu))
    x = [part.detach() for part in x]
    weights = [[w.detach() for w in ws] for ws in weights]
    grads = [torch.randn_like(out) for out in forward(kernel, x, weights, relu)[0]]
    for flags in ((True, True), (True, False), (False, True)):
        opcheck(kernel.backward, (grads, x, *weights, relu, *flags))
    inputs = [torch.randn_like(grad) for grad in grads]
    factors = torch.randn(len(grads), 4, grads[0].shape[1], dtype=grads[0].dtype)
    opcheck(kernel.backward, (grads, x, *weights, relu, True, True, inputs, factors))


def bad_calls():
    (x,), (conv_1s, conv_2s) = make_inputs(FactorizedReduce, (2, 4, 6, 6, 2, 2), requires_grad=False)
    fr, pw = "factorized_reduce_bn_stats", "relu_pointwise_bn_stats"
    return [
        ("empty", FactorizedReduce, ([x], [], []), f"{fr}: conv_1s must be a non-empty list of tensors"),
        ("channels", FactorizedReduce, ([x], [torch.ones(2, 3, 1, 1)] * 2, conv_2s),
         rf"{fr}: conv_1s\[0\] must have shape \[C_out, C, 1, 1\] with C_out >= 1 and C = 4, got shape \[2, 3, 1, 1\]"),
        ("count", FactorizedReduce, ([x], conv_1s, conv_2s[:1]),
         rf"{fr}: conv_2s must have one tensor per output \(K = 2\), got 1"),
        ("shape", FactorizedReduce, ([x], conv_1s, [conv_2s[0], torch.ones(1, 4, 1, 1)]),
         rf"{fr}: conv_2s\[1\] must have shape \[2, 4, 1, 1\], got \[1, 4, 1, 1\]"),
        ("image", FactorizedReduce, ([x[0]], conv_1s, conv_2s), rf"{fr}: xs\[0\] must be a 4-D \[N, C, H, W\] tensor"),
        ("no_x", FactorizedReduce, ([], conv_1s, conv_2s), f"{fr}: xs must be a non-empty list of tensors"),
        ("parts_channels", FactorizedReduce, ([x, x[:, :3]], conv_1s, conv_2s),
         rf"{fr}: conv_1s\[0\] must have shape \[C_out, C, 1, 1\] with C_out >= 1 and C = 7, got shape \[2, 4, 1, 1\]"),
        ("pointwise_empty", ReluPointwise, ([x], []), f"{pw}: weights must be a non-empty list of tensors"),
        ("pointwise_shape", ReluPointwise, ([x], [torch.ones(3, 4, 1, 1), torch.ones(2, 4, 1, 1)]),
         rf"{pw}: weights\[1\] must have shape \[3, 4, 1, 1\], got \[2, 4, 1, 1\]"),
        ("pointwise_no_x", ReluPointwise, ([], [conv_1s[0]]), f"{pw}: xs must be a non-empty list of tensors"),
        ("pointwise_part_image", ReluPointwise, ([x, x[0]], [torch.ones(2, 8, 1, 1)]),
         rf"{pw}: xs\[1\] must be a 4-D \[N, C, H, W\] tensor"),
        ("pointwise_part_size", ReluPointwise, ([x, x[:, :, :5]], [torch.ones(2, 8, 1, 1)]),
         rf"{pw}: xs\[1\] must have the N, H, W of xs\[0\] \[2, 4, 6, 6\], got shape \[2, 4, 5, 6\]"),
        ("pointwise_parts_channels", ReluPointwise, ([x, x[:, :3]], [torch.ones(2, 8, 1, 1)]),
         rf"{pw}: weights\[0\] must have shape \[C_out, C, 1, 1\] with C_out >= 1 and C = 7, got shape \[2, 8, 1, 1\]"),
    ]  # fmt: skip


@requires_ext
@pytest.mark.parametrize("kernel, args, message", [c[1:] for c in bad_calls()], ids=[c[0] for c in bad_calls()])
def test_bad_arguments_raise_one_line(kernel, args, message):
    for call in (kernel.reference, kernel.op):
        with pytest.raises(ValueError, match=f"^{message}") as error:
            call(*args, True)
        assert "\n" not in str(error.value).strip()


# ops.relu_conv_bn: a cell's preprocessing, against the nn modules it replaces --------------------------------------


def preprocessing(training, track_running_stats=True, dtype=torch.float32):
    module = ReLUConvBN(12, 8, 1, 1, 0, affine=False).to(dtype)
    if not track_running_stats:
        drop_running_statistics(module)
    module.train(training)
    return module


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=requires_ext), "reference"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("mode", ["train", "eval", "eval_batch_statistics"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_relu_conv_bn_matches_the_modules(backend, relu, mode, dtype):
    tol = TOLERANCES[dtype]["grad"]
    module = preprocessing(mode == "train", mode != "eval_batch_statistics", dtype)
    if mode == "eval":  # running statistics of some earlier batches
        module[2].running_mean.uniform_(-1, 1)
        module[2].running_var.uniform_(0.5, 2)
    fused = copy.deepcopy(module)
    x = torch.randn(3, 12, 7, 5, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    for _ in range(2):  # twice: the running statistics move, and the batch count
        want = module(x) if relu else module[2](module[1](x))
        _, conv, bn = fused
        got = ops.relu_conv_bn(x, conv.weight, *_batch_norm_arguments(bn), relu=relu, backend=backend)
        torch.testing.assert_close(got, want, **tol)
        for name, buffer in module[2].named_buffers():
            torch.testing.assert_close(getattr(bn, name), buffer, **tol, msg=name)
        grad = torch.randn_like(want)
        assert_gradients_close(torch.autograd.grad(got, [x, conv.weight], grad),
                               torch.autograd.grad(want, [x, module[1].weight], grad), tol)  # fmt: skip


@requires_ext
def test_relu_conv_bn_gradcheck_float64():
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(3, 5, 1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, weight: ops.relu_conv_bn(x, weight, None, None, True, 0.1, 1e-5, backend="cpp"), (x, weight)
    )


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=requires_ext), "reference"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("in_loss", [(True, True, True), (True, False, True)], ids=["all", "one_left_out"])
@pytest.mark.parametrize("split", [None, [5, 7], [4, 4, 4]], ids=["whole", "two_parts", "three_parts"])
def test_relu_conv_bns_match_the_modules(backend, relu, dtype, in_loss, split):
    """One x through three preprocessings (two training, one in evaluation, outputs of 8, 8 and 5 channels), as a
    state feeds the cells that read it; an output left out of the loss gets no gradient for its weight. x whole, or
    as its channel parts (tensors of their own), as a cell's output nodes."""
    tol = TOLERANCES[dtype]["grad"]
    modules = [preprocessing(True, dtype=dtype), preprocessing(True, False, dtype), preprocessing(False, dtype=dtype)]
    modules[2] = ReLUConvBN(12, 5, 1, 1, 0, affine=False).to(dtype).eval()
    modules[2][2].running_mean.uniform_(-1, 1)
    modules[2][2].running_var.uniform_(0.5, 2)
    fused = copy.deepcopy(modules)
    x = torch.randn(3, 12, 7, 5, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    for _ in range(2):  # twice: the running statistics move, and the batch counts
        wants = [module(x) if relu else module[2](module[1](x)) for module in modules]
        # parts made from x by differentiable copies, so that the gradient of x is the parts' gradients joined
        x_arg = x if split is None else [p.contiguous(memory_format=torch.channels_last) for p in x.split(split, 1)]
        gots = ops.relu_conv_bns(x_arg, [m[1].weight for m in fused], [_batch_norm_arguments(m[2]) for m in fused],
                                 relu=relu, backend=backend)  # fmt: skip
        for got, want in zip(gots, wants):
            torch.testing.assert_close(got, want, **tol)
        for module, copied in zip(modules, fused):
            for name, buffer in module[2].named_buffers():
                torch.testing.assert_close(getattr(copied[2], name), buffer, **tol, msg=name)
        grads = [torch.randn_like(want) for want in wants]

        def loss(outs, grads=grads):
            return sum((out * g).sum() for out, g, taken in zip(outs, grads, in_loss) if taken)

        got_grads = torch.autograd.grad(loss(gots), [x, *(m[1].weight for m in fused)], allow_unused=True)
        want_grads = torch.autograd.grad(loss(wants), [x, *(m[1].weight for m in modules)], allow_unused=True)
        assert [g is None for g in got_grads] == [g is None for g in want_grads] == [False, *(not t for t in in_loss)]
        assert_gradients_close([g for g in got_grads if g is not None], [g for g in want_grads if g is not None], tol)


@requires_ext
def test_relu_conv_bns_gradcheck_float64():
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    parts = [torch.randn(2, c, 4, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
             .requires_grad_() for c in (2, 3)]  # fmt: skip
    weights = [torch.randn(3, 5, 1, 1, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    batch_norms = [(None, None, True, 0.1, 1e-5), (torch.zeros(3, dtype=torch.float64),
                                                   torch.ones(3, dtype=torch.float64), False, 0.1, 1e-5)]  # fmt: skip
    assert torch.autograd.gradcheck(
        lambda x, *weights: ops.relu_conv_bns(x, weights, batch_norms, backend="cpp"), (x, *weights)
    )
    assert torch.autograd.gradcheck(
        lambda a, b, *weights: ops.relu_conv_bns([a, b], weights, batch_norms, backend="cpp"), (*parts, *weights)
    )


# ops.factorized_reduce_bn: the preprocessing of a cell after a reduction, against space.FactorizedReduce ------------


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=requires_ext), "reference"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("mode", ["train", "eval", "eval_batch_statistics"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("split", [None, [5, 7], [4, 3, 5]], ids=["whole", "two_parts", "three_parts"])
def test_factorized_reduce_bn_matches_the_module(backend, relu, mode, dtype, split):
    """x whole, or as its channel parts (a cell's output nodes), on odd sides; twice, so that the running statistics
    and the batch count move."""
    tol = TOLERANCES[dtype]["grad"]
    module = space.FactorizedReduce(12, 8, affine=False).to(dtype).train(mode == "train")
    if mode == "eval_batch_statistics":
        drop_running_statistics(module)
    if mode == "eval":  # running statistics of some earlier batches
        module.bn.running_mean.uniform_(-1, 1)
        module.bn.running_var.uniform_(0.5, 2)
    fused = copy.deepcopy(module)
    x = torch.randn(3, 12, 7, 5, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    for _ in range(2):
        want = module(x, relu=relu)
        # parts made from x by differentiable copies, so that the gradient of x is the parts' gradients joined
        x_arg = x if split is None else [p.contiguous(memory_format=torch.channels_last) for p in x.split(split, 1)]
        got = ops.factorized_reduce_bn(x_arg, fused.conv_1.weight, fused.conv_2.weight,
                                       *_batch_norm_arguments(fused.bn), relu=relu, backend=backend)  # fmt: skip
        torch.testing.assert_close(got, want, **tol)
        assert got.is_contiguous(memory_format=torch.channels_last)
        for name, buffer in module.bn.named_buffers():
            torch.testing.assert_close(getattr(fused.bn, name), buffer, **tol, msg=name)
        grad = torch.randn_like(want)
        assert_gradients_close(
            torch.autograd.grad(got, [x, fused.conv_1.weight, fused.conv_2.weight], grad),
            torch.autograd.grad(want, [x, module.conv_1.weight, module.conv_2.weight], grad),
            tol,
        )


@requires_ext
def test_factorized_reduce_bn_gradcheck_float64():
    parts = [torch.randn(2, c, 5, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
             .requires_grad_() for c in (2, 3)]  # fmt: skip
    conv_1, conv_2 = (torch.randn(3, 5, 1, 1, dtype=torch.float64, requires_grad=True) for _ in range(2))
    for running in ((None, None, True), (torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64),
                                         False)):  # fmt: skip
        assert torch.autograd.gradcheck(
            lambda a, b, c1, c2, running=running: ops.factorized_reduce_bn(
                [a, b], c1, c2, *running, 0.1, 1e-5, backend="cpp"
            ),
            (*parts, conv_1, conv_2),
        )


def bad_public_calls():
    x, weight, ones = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 1, 1), torch.ones(2)
    bn = (None, None, True, 0.1, 1e-5)
    fr, pre = "factorized_reduce", "relu_conv_bn"
    return [
        ("fr_channels", ops.factorized_reduce, (x, torch.ones(2, 3, 1, 1), torch.ones(2, 3, 1, 1)),
         rf"{fr}: conv_1 must have shape \[C_out / 2, C, 1, 1\] with C = 4, got shape \[2, 3, 1, 1\]"),
        ("fr_kernel", ops.factorized_reduce, (x, torch.ones(2, 4, 3, 3), torch.ones(2, 4, 3, 3)),
         rf"{fr}: conv_1 must have shape \[C_out / 2, C, 1, 1\]"),
        ("fr_pair", ops.factorized_reduce, (x, weight, torch.ones(3, 4, 1, 1)),
         rf"{fr}: conv_2 must have conv_1's shape \[2, 4, 1, 1\], got \[3, 4, 1, 1\]"),
        ("fr_image", ops.factorized_reduce, (x[0], weight, weight), rf"{fr}: x must be a 4-D"),
        ("pre_eval", ops.relu_conv_bn, (x, weight, None, None, False, 0.1, 1e-5),
         rf"{pre}: in evaluation the running statistics are needed"),
        ("pre_one_statistic", ops.relu_conv_bn, (x, weight, None, ones, True, 0.1, 1e-5),
         rf"{pre}: running_mean and running_var must be given together"),
        ("pre_statistics_shape", ops.relu_conv_bn, (x, weight, torch.zeros(3), ones, True, 0.1, 1e-5),
         rf"{pre}: running_mean must have shape \[2\], got \[3\]"),
        ("pre_weight", ops.relu_conv_bn, (x, torch.ones(2, 3, 1, 1), None, None, True, 0.1, 1e-5),
         rf"{pre}: weight must have shape \[C_out, C, 1, 1\] with C = 4, got shape \[2, 3, 1, 1\]"),
        ("pres_count", ops.relu_conv_bns, (x, [weight, weight], [bn]),
         rf"{pre}s: one BN per weight and at least one weight are needed, got 2 weights and 1 BNs"),
        ("pres_none", ops.relu_conv_bns, (x, [], []), rf"{pre}s: one BN per weight and at least one weight"),
        ("pres_bn", ops.relu_conv_bns, (x, [weight], [bn[:4]]),
         rf"{pre}s: batch_norms\[0\] must be \(running_mean, running_var, training, momentum, eps\)"),
        ("pres_weight", ops.relu_conv_bns, (x, [weight, torch.ones(2, 3, 1, 1)], [bn, bn]),
         rf"{pre}s \(weight 1\): weight must have shape \[C_out, C, 1, 1\] with C = 4"),
        ("pres_eval", ops.relu_conv_bns, (x, [weight, weight], [bn, (None, None, False, 0.1, 1e-5)]),
         rf"{pre}s \(weight 1\): in evaluation the running statistics are needed"),
        ("pres_no_x", ops.relu_conv_bns, ([], [weight], [bn]), rf"{pre}s: x must be a tensor or a non-empty list"),
        ("pres_part_size", ops.relu_conv_bns, ([x, x[:, :, :5]], [weight], [bn]),
         rf"{pre}s: x\[1\] must have the N, H, W of x\[0\] \[2, 4, 6, 6\], got shape \[2, 4, 5, 6\]"),
        ("pres_parts_channels", ops.relu_conv_bns, ([x, x[:, :1]], [weight], [bn]),
         rf"{pre}s \(weight 0\): weight must have shape \[C_out, C, 1, 1\] with C = 5, got shape \[2, 4, 1, 1\]"),
        ("frbn_pair", ops.factorized_reduce_bn, (x, weight, torch.ones(3, 4, 1, 1), *bn),
         rf"{fr}_bn: conv_2 must have conv_1's shape \[2, 4, 1, 1\], got \[3, 4, 1, 1\]"),
        ("frbn_eval", ops.factorized_reduce_bn, (x, weight, weight, None, None, False, 0.1, 1e-5),
         rf"{fr}_bn: in evaluation the running statistics are needed"),
        ("frbn_statistics_shape", ops.factorized_reduce_bn, (x, weight, weight, ones, ones, True, 0.1, 1e-5),
         rf"{fr}_bn: running_mean must have shape \[4\], got \[2\]"),
        ("frbn_no_x", ops.factorized_reduce_bn, ([], weight, weight, *bn),
         rf"{fr}_bn: x must be a tensor or a non-empty list"),
        ("frbn_part_size", ops.factorized_reduce_bn, ([x, x[:, :, :5]], weight, weight, *bn),
         rf"{fr}_bn: x\[1\] must have the N, H, W of x\[0\] \[2, 4, 6, 6\], got shape \[2, 4, 5, 6\]"),
        ("frbn_parts_channels", ops.factorized_reduce_bn, ([x, x[:, :1]], weight, weight, *bn),
         rf"{fr}_bn: conv_1 must have shape \[C_out / 2, C, 1, 1\] with C = 5, got shape \[2, 4, 1, 1\]"),
    ]  # fmt: skip


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=requires_ext), "reference"])
@pytest.mark.parametrize(
    "op, args, message", [c[1:] for c in bad_public_calls()], ids=[c[0] for c in bad_public_calls()]
)
def test_public_ops_refuse_bad_arguments_in_one_line(op, args, message, backend):
    with pytest.raises(ValueError, match=f"^{message}") as error:
        op(*args, backend=backend)
    assert "\n" not in str(error.value).strip()


@requires_ext
def test_relu_conv_bn_compiles_fullgraph():
    torch._dynamo.reset()
    x = torch.randn(2, 6, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(4, 6, 1, 1, requires_grad=True)
    running = [torch.zeros(4), torch.ones(4)], [torch.zeros(4), torch.ones(4)]

    def preprocess(x, weight, running_mean, running_var):
        return ops.relu_conv_bn(x, weight, running_mean, running_var, True, 0.1, 1e-5, backend="cpp").square().sum()

    got = torch.compile(preprocess, fullgraph=True, backend="aot_eager")(x, weight, *running[0])
    want = preprocess(x, weight, *running[1])
    torch.testing.assert_close(got, want)
    for a, b in zip(running[0], running[1]):  # the running statistics moved the same way
        torch.testing.assert_close(a, b)
    assert_gradients_close(torch.autograd.grad(got, [x, weight]), torch.autograd.grad(want, [x, weight]),
                           TOLERANCES[torch.float32]["grad"])  # fmt: skip


@requires_ext
def test_factorized_reduce_bn_compiles_fullgraph():
    torch._dynamo.reset()
    parts = [torch.randn(2, c, 5, 7).contiguous(memory_format=torch.channels_last).requires_grad_() for c in (2, 4)]
    conv_1, conv_2 = (torch.randn(3, 6, 1, 1, requires_grad=True) for _ in range(2))
    running = [torch.zeros(6), torch.ones(6)], [torch.zeros(6), torch.ones(6)]

    def preprocess(a, b, conv_1, conv_2, running_mean, running_var):
        out = ops.factorized_reduce_bn([a, b], conv_1, conv_2, running_mean, running_var, True, 0.1, 1e-5,
                                       backend="cpp")  # fmt: skip
        return out.square().sum()

    got = torch.compile(preprocess, fullgraph=True, backend="aot_eager")(*parts, conv_1, conv_2, *running[0])
    want = preprocess(*parts, conv_1, conv_2, *running[1])
    torch.testing.assert_close(got, want)
    for a, b in zip(running[0], running[1]):
        torch.testing.assert_close(a, b)
    inputs = [*parts, conv_1, conv_2]
    assert_gradients_close(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs),
                           TOLERANCES[torch.float32]["grad"])  # fmt: skip
