"""The fused mixed op ("cpp") against its reference: outputs, statistics and every gradient over odd shapes, both
strides, training and evaluation, candidate subsets; gradcheck, opcheck, what it saves and which gradients it
computes, and its errors."""

import itertools

import pytest
import torch
from torch.library import opcheck

from fastdarts import ops
from fastdarts.ops import reference

from ..conftest import requires_ext
from ._helpers import RecordCalls, assert_gradients_close, backend_ops

ALL = list(range(len(ops.MIXED_OP_CANDIDATES)))
SHAPES = [(N, C, S) for N, C, S in itertools.product([1, 3], [4, 16], [7, 9, 8])]
TOLERANCES = {
    torch.float32: dict(out=dict(rtol=1e-4, atol=1e-5), grad=dict(rtol=1e-3, atol=1e-4)),
    torch.float64: dict(out=dict(rtol=1e-9, atol=1e-11), grad=dict(rtol=1e-8, atol=1e-10)),
}


def make_inputs(N, C, S, stride, dtype=torch.float32, layout=torch.contiguous_format, seed=0, pool_bn=True):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, S, S, dtype=dtype, generator=generator).contiguous(memory_format=layout).requires_grad_()
    w = torch.randn(len(ALL), dtype=dtype, generator=generator).softmax(0).requires_grad_()
    weights = [
        (0.5 * torch.randn(shape, dtype=dtype, generator=generator)).requires_grad_()
        for shape in ops.mixed_op_weight_shapes(C, stride)
    ]
    B = sum(bns for _, bns in ops.mixed_op_layout(stride, pool_bn))
    bn_mean = 0.1 * torch.randn(B, C, dtype=dtype, generator=generator)
    bn_var = torch.rand(B, C, dtype=dtype, generator=generator) + 0.5
    return x, w, weights, bn_mean, bn_var


def run(backend, x, w, weights, stride, candidates, bn_mean, bn_var, training, grad_out=None, pool_bn=True):
    out, mean, var = ops.mixed_op(x, w, weights, stride, candidates, bn_mean, bn_var, training, pool_bn=pool_bn,
                                  backend=backend)  # fmt: skip
    if grad_out is None:
        grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    inputs = [t for t in (x, w, *weights) if t.requires_grad]
    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True) if out.requires_grad else [None] * len(inputs)
    return out, mean, var, grads, grad_out


def assert_agrees_with_reference(backend, x, w, weights, stride, candidates, bn_mean, bn_var, training, pool_bn=True):
    tol = TOLERANCES[x.dtype]
    want = run("reference", x, w, weights, stride, candidates, bn_mean, bn_var, training, pool_bn=pool_bn)
    got = run(backend, x, w, weights, stride, candidates, bn_mean, bn_var, training, want[-1], pool_bn)
    for g, r in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, r, **tol["out"])
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert_gradients_close(got[3], want[3], tol["grad"])


@requires_ext
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_fused_equals_reference(shape, stride, training, cpu_isa):
    x, w, weights, bn_mean, bn_var = make_inputs(*shape, stride)
    assert_agrees_with_reference("cpp", x, w, weights, stride, ALL, bn_mean, bn_var, training)


@requires_ext
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_fused_equals_reference_in_both_layouts_and_keeps_channels_last(layout, cpu_isa):
    x, w, weights, bn_mean, bn_var = make_inputs(2, 16, 8, 1, layout=layout)
    assert_agrees_with_reference("cpp", x, w, weights, 1, ALL, bn_mean, bn_var, True)
    out, _, _ = ops.mixed_op(x, w, weights, 1, backend="cpp")
    assert out.is_contiguous(memory_format=torch.channels_last)


def check_candidate_subset(backend, candidates, stride, N, C, S):
    x, w, weights, bn_mean, bn_var = make_inputs(N, C, S, stride)
    assert_agrees_with_reference(backend, x, w, weights, stride, candidates, bn_mean, bn_var, True)
    _, mean, var = ops.mixed_op(x, w, weights, stride, candidates, backend=backend)
    # The statistics of BNs that did not run are the neutral 0 and 1.
    rows, row = [], 0
    for k, (_, bns) in enumerate(ops.mixed_op_layout(stride)):
        rows += [row + i for i in range(bns) if k not in candidates]
        row += bns
    assert torch.equal(mean[rows], torch.zeros_like(mean[rows])) and torch.equal(var[rows], torch.ones_like(var[rows]))


SUBSETS = [[], [0], [1], [2], [3], [4], [5], [6], [0, 3], [2, 6], [1, 4, 5], [3, 4, 5, 6]]


@requires_ext
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
@pytest.mark.parametrize("candidates", SUBSETS, ids=["-".join(map(str, c)) or "none" for c in SUBSETS])
def test_candidate_subsets(candidates, stride, cpu_isa):
    check_candidate_subset("cpp", candidates, stride, 3, 4, 7)


POOL_SUBSETS = [[0], [1], [0, 1], [0, 3], ALL]


@requires_ext
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
@pytest.mark.parametrize("candidates", POOL_SUBSETS, ids=["-".join(map(str, c)) for c in POOL_SUBSETS])
def test_pools_without_bn(candidates, stride, training, cpu_isa):
    x, w, weights, bn_mean, bn_var = make_inputs(3, 4, 7, stride, pool_bn=False)
    assert_agrees_with_reference("cpp", x, w, weights, stride, candidates, bn_mean, bn_var, training, pool_bn=False)
    # Without their BNs the pools are added as they are, so the op moves with x's scale.
    (out,) = run("cpp", x, w, weights, stride, [0, 1], bn_mean, bn_var, True, pool_bn=False)[:1]
    (doubled,) = run("cpp", 2 * x.detach(), w, weights, stride, [0, 1], bn_mean, bn_var, True, pool_bn=False)[:1]
    torch.testing.assert_close(doubled, 2 * out)


@requires_ext
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
def test_gradcheck_float64_pools_without_bn(stride):
    x, w, weights, bn_mean, bn_var = make_inputs(2, 4, 5, stride, dtype=torch.float64, pool_bn=False)

    def f(x, w, *weights):
        return ops.mixed_op(x, w, weights, stride, ALL, pool_bn=False, backend="cpp")[0]

    assert torch.autograd.gradcheck(f, (x, w, *weights), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
def test_no_candidates_gives_zeros(backend):
    x, w, weights, _, _ = make_inputs(2, 4, 9, 2)
    out, _, _ = ops.mixed_op(x, w, weights, 2, [], backend=backend)
    assert out.shape == (2, 4, 5, 5) and torch.count_nonzero(out) == 0


@requires_ext
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
def test_gradcheck_float64(stride, training, cpu_isa):
    x, w, weights, bn_mean, bn_var = make_inputs(2, 4, 5, stride, dtype=torch.float64)

    def f(x, w, *weights):
        return ops.mixed_op(x, w, weights, stride, ALL, bn_mean, bn_var, training, backend="cpp")[0]

    assert torch.autograd.gradcheck(f, (x, w, *weights), eps=1e-6, atol=1e-6, rtol=1e-4)


@requires_ext
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
def test_float64_matches_reference_tightly(stride, cpu_isa):
    x, w, weights, bn_mean, bn_var = make_inputs(3, 4, 9, stride, dtype=torch.float64)
    assert_agrees_with_reference("cpp", x, w, weights, stride, ALL, bn_mean, bn_var, True)


@requires_ext
@pytest.mark.parametrize(
    "pool_bn,recompute", [(True, True), (False, True), (True, False)], ids=["pool-bn", "no-pool-bn", "no-recompute"]
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
def test_opcheck(stride, training, pool_bn, recompute):
    x, w, weights, bn_mean, bn_var = make_inputs(2, 4, 7, stride, pool_bn=pool_bn)
    _, w2, weights2, bn_mean2, bn_var2 = make_inputs(2, 4, 7, stride, pool_bn=pool_bn, seed=1)
    # Two edges leaving x (the op behind mixed_op and mixed_ops), with different candidates.
    candidates, counts = [0, 2, 3, 6, 1, 4], [4, 2]
    args = (x, torch.stack([w, w2]), weights + weights2, stride, candidates, counts, torch.stack([bn_mean, bn_mean2]),
            torch.stack([bn_var, bn_var2]), training, 1e-5, pool_bn, recompute)  # fmt: skip
    opcheck(torch.ops.fastdarts.mixed_ops.default, args)
    outs, mean, var, saved = torch.ops.fastdarts.mixed_ops.default(*args)
    # Edge 0: max pool's output; the skip's FactorizedReduce output (stride 2 only); sep3's t and t_1; dil5's t (no
    # depthwise output: the backward recomputes those in tiles; no middle BN output: the second stage normalises t_1
    # as it reads it). Edge 1: avg pool's output; sep5's t and t_1.
    assert len(saved) == (0 if recompute else 4 + (stride == 2) + 3)
    grads = [torch.randn_like(out) for out in outs]
    backward_args = (grads, x.detach(), args[1].detach(), [t.detach() for t in args[2]], stride, candidates, counts,
                     mean, var, training, 1e-5, pool_bn, [t.detach() for t in saved], True, True, True)  # fmt: skip
    opcheck(torch.ops.fastdarts.mixed_ops_backward.default, backward_args)


def check_computes_only_the_gradients_asked_for(backend, wants, N, C, S):
    x, w, weights, _, _ = make_inputs(N, C, S, 1)
    x.requires_grad_("x" in wants)
    w.requires_grad_("w" in wants)
    for t in weights:
        t.requires_grad_("weights" in wants)
    want = run("reference", x, w, weights, 1, ALL, None, None, True)
    # The backward op's last three arguments: which of the gradients of x, w and the weights it computes.
    with RecordCalls(backend_ops(backend).mixed_ops_backward.default, lambda args: args[-3:]) as record:
        got = run(backend, x, w, weights, 1, ALL, None, None, True, grad_out=want[-1])
    assert record.calls == [("x" in wants, "w" in wants, "weights" in wants)]
    assert_gradients_close(got[3], want[3], TOLERANCES[torch.float32]["grad"])


@requires_ext
@pytest.mark.parametrize(
    "wants", [("x", "w"), ("x", "weights"), ("w",), ("x", "w", "weights")], ids=["arch_step", "weight_step", "w", "all"]
)
def test_computes_only_the_gradients_asked_for(wants):
    check_computes_only_the_gradients_asked_for("cpp", wants, 2, 4, 7)


NO_RECOMPUTE_CASES = [(1, ALL, True), (2, ALL, False), (1, [0, 1, 4], True), (2, [2, 5], True)]


@requires_ext
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride,candidates,pool_bn", NO_RECOMPUTE_CASES)
def test_without_recomputation_equals_reference_and_runs_no_forward_kernel_in_backward(
    stride, candidates, pool_bn, training
):
    x, w, weights, bn_mean, bn_var = make_inputs(3, 4, 9, stride, pool_bn=pool_bn)
    want = run("reference", x, w, weights, stride, candidates, bn_mean, bn_var, training, pool_bn=pool_bn)
    out, mean, var = ops.mixed_op(x, w, weights, stride, candidates, bn_mean, bn_var, training, pool_bn=pool_bn,
                                  recompute=False, backend="cpp")  # fmt: skip
    with RecordCalls(torch.ops.fastdarts.relu_dwconv.default) as forward_kernel:
        grads = torch.autograd.grad(out, [x, w, *weights], want[-1], allow_unused=True)
    assert forward_kernel.calls == []
    for g, r in zip((out, mean, var), want[:3]):
        torch.testing.assert_close(g, r, **TOLERANCES[torch.float32]["out"])
    assert_gradients_close(grads, want[3], TOLERANCES[torch.float32]["grad"])


@requires_ext
def test_gradcheck_float64_without_recomputation():
    x, w, weights, _, _ = make_inputs(2, 4, 5, 2, dtype=torch.float64)

    def f(x, w, *weights):
        return ops.mixed_op(x, w, weights, 2, ALL, recompute=False, backend="cpp")[0]

    assert torch.autograd.gradcheck(f, (x, w, *weights), eps=1e-6, atol=1e-6, rtol=1e-4)


def saved_storages(forward, x, w, weights) -> tuple[dict[int, int], set[int]]:
    """({storage address: bytes} of what autograd saves in `forward()`, the addresses of the inputs' storages)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return storages, {t.untyped_storage().data_ptr() for t in (x, w, *weights)}


@requires_ext
def test_without_recomputation_saves_the_eight_intermediates():
    x, w, weights, _, _ = make_inputs(4, 16, 16, 1)
    storages, inputs = saved_storages(
        lambda: ops.mixed_op(x, w, weights, 1, recompute=False, backend="cpp"), x, w, weights
    )  # fmt: skip
    activations = [size for ptr, size in storages.items() if ptr not in inputs and size == x.numel() * 4]
    # both pools' outputs; per sep conv t and t_1; per dil conv t (never a depthwise output: the backward recomputes
    # those in tiles; never a middle BN's output: the second stage normalises t_1 as it reads it)
    assert len(activations) == 8


def check_saves_only_the_input_the_weights_and_the_statistics(backend, x, w, weights):
    storages, inputs = saved_storages(lambda: ops.mixed_op(x, w, weights, 1, backend=backend), x, w, weights)
    beyond_inputs = sum(size for ptr, size in storages.items() if ptr not in inputs)
    B = sum(bns for _, bns in ops.mixed_op_layout(1))
    assert beyond_inputs <= 2 * B * x.shape[1] * 4  # the mean and variance rows: no activation at all
    # x itself, not a copy of it.
    assert x.untyped_storage().data_ptr() in storages


@requires_ext
def test_saves_only_the_input_the_weights_and_the_statistics():
    check_saves_only_the_input_the_weights_and_the_statistics("cpp", *make_inputs(4, 16, 16, 1)[:3])


def check_double_backward_is_refused(backend, x, w, weights, candidates):
    out, _, _ = ops.mixed_op(x, w, weights, 1, candidates, backend=backend)
    (grad_w,) = torch.autograd.grad(out.square().sum(), [w], create_graph=True)
    with pytest.raises(RuntimeError, match=f"the '{backend}' backend is differentiable once"):
        torch.autograd.grad(grad_w.sum(), [x])


@requires_ext
def test_double_backward_is_refused_with_a_clear_error():
    check_double_backward_is_refused("cpp", *make_inputs(2, 4, 7, 1)[:3], ALL)


BAD_ARGUMENTS = [
    (dict(stride=3), ValueError, "stride must be 1 or 2"),
    (dict(candidates=[3, 1]), ValueError, "candidates must be increasing indices in 0..6"),
    (dict(candidates=[7]), ValueError, "candidates must be increasing indices in 0..6"),
    (dict(weights="short"), ValueError, "weights must hold the 12 conv weights of a stride-1 edge, got 11"),
    (dict(weights="wrong_shape"), ValueError, r"weights\[0\] must have shape \[4, 1, 3, 3\]"),
    (dict(w="short"), ValueError, r"w must have shape \[K\] with K = 7"),
    (dict(training=False), ValueError, r"in evaluation bn_mean must be the running statistics \[8, 4\]"),
    (dict(x="3d"), ValueError, r"x must be a 4-D \[N, C, H, W\] tensor"),
    (dict(w="double"), TypeError, "w must have the dtype of x"),
    (dict(pool_bn=None), ValueError, "pool_bn must be True or False, got None"),
    (dict(recompute="no"), ValueError, "recompute must be True or False, got 'no'"),
]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
@pytest.mark.parametrize("change, error, message", BAD_ARGUMENTS, ids=[m for _, _, m in BAD_ARGUMENTS])
def test_bad_arguments(backend, change, error, message):
    x, w, weights, _, _ = make_inputs(2, 4, 7, 1)
    arguments = dict(x=x, w=w, weights=weights, stride=1, candidates=ALL, bn_mean=None, bn_var=None, training=True)
    for key, value in change.items():
        arguments[key] = value
    if change.get("weights") == "short":
        arguments["weights"] = weights[:-1]
    if change.get("weights") == "wrong_shape":
        arguments["weights"] = [torch.randn(4, 1, 5, 5)] + weights[1:]
    if change.get("w") == "short":
        arguments["w"] = w[:5]
    if change.get("w") == "double":
        arguments["w"] = w.double()
    if change.get("x") == "3d":
        arguments["x"] = x[0]
    with pytest.raises(error, match=message):
        ops.mixed_op(**arguments, backend=backend)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
def test_odd_channels_at_stride_2_are_refused(backend):
    x = torch.randn(2, 5, 8, 8)
    weights = [torch.randn(s) for s in ops.mixed_op_weight_shapes(4, 2)]
    with pytest.raises(ValueError, match="a stride-2 edge needs an even channel count"):
        ops.mixed_op(x, torch.ones(7), weights, 2, backend=backend)


@requires_ext
def test_unsupported_dtype_on_cpp():
    x, w, weights, _, _ = make_inputs(2, 4, 7, 1)
    half = [t.detach().half() for t in (x, w, *weights)]
    with pytest.raises(TypeError, match="only float32 and float64 are supported"):
        ops.mixed_op(half[0], half[1], half[2:], 1, backend="cpp")


def test_reference_is_the_functional_form_of_the_candidate_modules():
    """reference.mixed_op is DARTS's modules (space.OPS, each pool followed by a BN), written as functions."""
    from fastdarts.supernet import MixedOp

    for stride in (1, 2):
        edge = MixedOp(4, stride)
        x, w, _, _, _ = make_inputs(3, 4, 9, stride)
        with torch.no_grad():
            for p in edge.parameters():
                p.normal_()
        expected = sum(wk * op(x) for wk, op in zip(w, edge.candidates))
        got, _, _ = reference.mixed_op(x, w, edge.conv_weights(), stride)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
