"""The Triton kernels against the reference, on CPU tensors under Triton's interpreter (tiny shapes: it is slow).

triton itself is imported at the latest when the skip mark below asks the registry about it, after TRITON_INTERPRET is
restored; that works because fastdarts makes its kernels at their first launch and the registry reads
TRITON_INTERPRET at call time. The variable is set only while this module imports and while its tests run, so
that the other modules see "triton" on CUDA tensors only.
"""

import json
import math
import os

_INTERPRET_BEFORE = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.library import opcheck  # noqa: E402

from fastdarts import ops  # noqa: E402
from fastdarts.ops import _registry, reference  # noqa: E402

from ..test_registry import run_python  # noqa: E402
from .test_sample_gates import expected_p_nonzero, expected_p_one  # noqa: E402

if _INTERPRET_BEFORE is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _INTERPRET_BEFORE

# triton is a dependency of fastdarts: this skips only an installation without it, and says why.
pytestmark = pytest.mark.skipif(not _registry.TRITON_LOADED, reason=f"triton did not import: {_registry.TRITON_ERROR}")

A, B = -0.1, 1.1
DARTS = [(3, 1), (5, 1), (3, 2), (5, 2)]  # (kernel size, dilation) of the first stage of DARTS's conv candidates
OUT_TOL = dict(rtol=1e-4, atol=1e-5)
GRAD_TOL = dict(rtol=1e-3, atol=1e-4)
F64_TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def generator(seed):
    return torch.Generator().manual_seed(seed)


def assert_all_close(got, want, tol):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


def grads(outs, inputs, grad_outs, **kwargs):
    return torch.autograd.grad(outs, inputs, grad_outs, **kwargs)


def test_dispatch():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    assert "triton" in ops.BACKENDS
    for op in ("weighted_sum", "relu_dwconv", "sample_gates", "pool_bn_stats", "mixed_op"):
        assert _registry.select(op, cuda) == "triton"  # CUDA tensors default to Triton
        assert _registry.select(op, cpu) != "triton"  # CPU tensors only when asked for
        assert _registry.select(op, cpu, "triton") == "triton"
        assert "triton" in ops.available_backends(op, "cuda") and "triton" in ops.available_backends(op, "cpu")
    with ops.use_backend("triton"):
        assert _registry.select("weighted_sum", cpu) == "triton"


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "triton" not in ops.available_backends("weighted_sum", "cpu")
    message = r"backend 'triton' runs on cuda tensors only, got cpu tensors \(and CPU tensors when TRITON_INTERPRET=1\)"
    with pytest.raises(RuntimeError, match=message):
        ops.weighted_sum([torch.randn(3)], torch.ones(1), backend="triton")


# ----------------------------------------------------------------------------------------------
# weighted_sum. 3 x 5 x 9 x 9 = 1215 elements: a full block of 1024 and a masked tail; K = 10 takes two launches
# of up to 8 inputs.


def weighted_sum_inputs(K, shape, dtype=torch.float32, layout="contiguous"):
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    xs = [torch.randn(shape, dtype=dtype).contiguous(memory_format=memory_format).requires_grad_() for _ in range(K)]
    if layout == "mixed":  # one input in another layout, one a strided view
        xs[0] = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
        xs[-1] = torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype)[..., ::2].requires_grad_()
    return xs, torch.randn(K, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed"])
@pytest.mark.parametrize("K", [1, 3, 10])
@pytest.mark.parametrize("shape", [(1, 4, 7, 7), (3, 5, 9, 9)], ids=["1x4x7x7", "3x5x9x9"])
def test_weighted_sum_matches_reference(shape, K, layout):
    xs, w = weighted_sum_inputs(K, shape, layout=layout)
    out = ops.weighted_sum(xs, w, backend="triton")
    expected = reference.weighted_sum(xs, w)
    torch.testing.assert_close(out, expected, **OUT_TOL)
    assert out.stride() == torch.empty_like(xs[0]).stride()  # the layout of xs[0]
    grad_out = torch.randn_like(expected)
    assert_all_close(grads(out, [*xs, w], grad_out), grads(expected, [*xs, w], grad_out), GRAD_TOL)


def test_weighted_sum_double_backward_matches_reference():
    xs, w = weighted_sum_inputs(3, (2, 3, 5, 4), torch.float64)
    grad_out = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)

    def second_derivatives(fn):
        first = grads(fn(xs, w), [*xs, w], grad_out, create_graph=True)
        directional = sum((f * f.detach().flip(0)).sum() for f in first)
        return grads(directional, [*xs, w, grad_out], None)

    def triton_sum(xs, w):
        return ops.weighted_sum(xs, w, backend="triton")

    assert_all_close(second_derivatives(triton_sum), second_derivatives(reference.weighted_sum), F64_TOL)


def test_weighted_sum_empty():
    xs, w = weighted_sum_inputs(2, (0, 3))
    out = ops.weighted_sum(xs, w, backend="triton")
    assert out.shape == (0, 3)
    assert torch.equal(grads(out, [w], torch.ones_like(out))[0], torch.zeros(2))


# ----------------------------------------------------------------------------------------------
# relu_dwconv. A plane of 7 x 7 or 9 x 9 outputs is one block of 256 with a masked tail; 20 x 20 takes two blocks,
# and grad_w's blocks of N * H_out * W_out outputs cross images.


def relu_dwconv_inputs(shape, kernels=DARTS, dtype=torch.float32, layout="contiguous"):
    x = torch.randn(shape, dtype=dtype)
    x[torch.rand(shape) < 0.1] = 0.0  # ReLU's kink: the gradient there is 0 in both
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = x.contiguous(memory_format=memory_format).requires_grad_()
    weights = [torch.randn(shape[1], 1, k, k, dtype=dtype, requires_grad=True) for k, _ in kernels]
    return x, weights, [d for _, d in kernels]


def check_relu_dwconv(x, weights, dilations, stride, relu=True, grad_outs=None, layout="contiguous"):
    outs = ops.relu_dwconv(x, weights, dilations, stride, relu, backend="triton")
    expected = reference.relu_dwconv(x, weights, dilations, stride, relu)
    assert_all_close(outs, expected, OUT_TOL)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert all(out.is_contiguous(memory_format=memory_format) for out in outs)  # laid out like x
    grad_outs = grad_outs or [torch.randn_like(e) for e in expected]
    got = grads(outs, [x, *weights], grad_outs)
    assert_all_close(got, grads(expected, [x, *weights], grad_outs), GRAD_TOL)
    assert got[0].stride() == torch.empty_like(x).stride()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
@pytest.mark.parametrize("shape", [(1, 4, 7, 7), (3, 5, 9, 9)], ids=["1x4x7x7", "3x5x9x9"])
def test_relu_dwconv_matches_reference(shape, stride, layout):
    check_relu_dwconv(*relu_dwconv_inputs(shape, layout=layout), stride, layout=layout)


@pytest.mark.parametrize(
    "case", ["no_relu", "two_blocks", "other_kernels_stride3", "strided_x", "expanded_grads", "nan"]
)
def test_relu_dwconv_other_cases(case):
    x, weights, dilations = relu_dwconv_inputs((1, 3, 8, 7))
    stride, relu, grad_outs = 1, True, None
    if case == "no_relu":
        relu, stride = False, 2
    if case == "two_blocks":
        x, weights, dilations = relu_dwconv_inputs((2, 2, 20, 20), DARTS[:2])
    if case == "other_kernels_stride3":  # k = 1 (no padding), k = 7, dilation 3
        x, weights, dilations = relu_dwconv_inputs((1, 3, 11, 10), [(1, 1), (7, 1), (3, 3)])
        stride = 3
    if case == "strided_x":  # a view that is not dense
        x = torch.randn(1, 3, 8, 14)[..., ::2].requires_grad_()
    if case == "expanded_grads":  # what autograd hands over after a sum: stride 0 everywhere
        grad_outs = [torch.randn(()).expand(1, 3, 8, 7) for _ in weights]
    if case == "nan":
        x = x.detach().clone()
        x[0, 1, 2, 2] = float("nan")
        out = ops.relu_dwconv(x, weights, dilations, 1, backend="triton")[0]
        expected = reference.relu_dwconv(x, weights, dilations, 1)[0]
        assert out.isnan().sum() == 9 and torch.equal(out.isnan(), expected.isnan())
        torch.testing.assert_close(out, expected, equal_nan=True, **OUT_TOL)
        return
    check_relu_dwconv(x, weights, dilations, stride, relu, grad_outs)


def test_relu_dwconv_saves_only_x_and_the_weights():
    x, weights, dilations = relu_dwconv_inputs((1, 2, 5, 5))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.relu_dwconv(x, weights, dilations, 1, backend="triton")
    assert len(saved) == 1 + len(weights)
    assert saved[0].data_ptr() == x.data_ptr()
    assert all(s.data_ptr() == w.data_ptr() for s, w in zip(saved[1:], weights))


@pytest.mark.parametrize("stride", [1, 2])
def test_relu_dwconv_pointwise_matches_reference(stride):
    """The Triton relu_dwconv composed with ATen's 1x1 convs and statistics: outputs, statistics, every gradient."""
    x, weights, dilations = relu_dwconv_inputs((3, 4, 7, 7), layout="channels_last")
    pointwise = [torch.randn(4, 4, 1, 1, requires_grad=True) for _ in weights]
    inputs = [x, *weights, *pointwise]
    results = {}
    for backend in ("triton", "reference"):
        outs, mean, var = ops.relu_dwconv_pointwise(x, weights, pointwise, dilations, stride, backend=backend)
        grad_outs = [torch.ones_like(o) for o in outs]
        results[backend] = [outs, [mean, var], torch.autograd.grad(outs, inputs, grad_outs)]
    got, want = results["triton"], results["reference"]
    assert_all_close(got[0], want[0], OUT_TOL)
    assert_all_close(got[1], want[1], OUT_TOL)
    assert_all_close(got[2], want[2], GRAD_TOL)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
def test_relu_dwconv_double_backward_matches_reference(relu):
    x, weights, dilations = relu_dwconv_inputs((1, 2, 6, 5), DARTS[::3], torch.float64)
    grad_outs = [torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True) for _ in weights]
    wrt = [x, *weights]
    directions = [torch.randn_like(t) for t in wrt]

    def second_derivatives(backend):
        outs = ops.relu_dwconv(x, weights, dilations, 2, relu, backend=backend)
        first = grads(outs, wrt, grad_outs, create_graph=True)
        directional = sum((f * d).sum() for f, d in zip(first, directions))
        return torch.autograd.grad(directional, [*wrt, *grad_outs], allow_unused=True, materialize_grads=True)

    assert_all_close(second_derivatives("triton"), second_derivatives("reference"), F64_TOL)


# ----------------------------------------------------------------------------------------------
# sample_gates. With top-k, 300 edges of 8 ops take 5 programs of 64 edges, the last one masked (without, one of 512
# edges); 5 x 3 pads the columns to 4.


def sample_and_grads(beta, tau, k, seed, backend):
    upstream_gates = torch.randn(beta.shape, dtype=beta.dtype, generator=generator(100))
    upstream_p = torch.randn(beta.shape, dtype=beta.dtype, generator=generator(101))
    gates, mask, p_nonzero = ops.sample_gates(beta, tau, A, B, k, 0.4, generator(seed), backend=backend)
    loss = (gates * upstream_gates).sum() + (p_nonzero * upstream_p).sum()
    return gates.detach(), mask, p_nonzero.detach(), torch.autograd.grad(loss, beta)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", [(14, 8), (5, 3), (300, 8), (0, 8)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("k", [1, 2, "all", None], ids=lambda k: f"k={k}")
def test_sample_gates_matches_reference(k, shape, dtype):
    k = shape[1] if k == "all" else k
    beta = (2 * torch.randn(shape, dtype=dtype)).requires_grad_()
    gates, mask, p_nonzero, grad = sample_and_grads(beta, 0.5, k, 10, "triton")
    ref_gates, ref_mask, ref_p_nonzero, ref_grad = sample_and_grads(beta, 0.5, k, 10, "reference")
    assert torch.equal(mask, ref_mask)
    tol = OUT_TOL if dtype == torch.float32 else F64_TOL
    if k is None:
        torch.testing.assert_close(gates, ref_gates, **tol)
    else:
        assert torch.equal(gates, ref_gates)  # exactly the 0/1 mask
    torch.testing.assert_close(p_nonzero, ref_p_nonzero, **tol)
    torch.testing.assert_close(grad, ref_grad, **(GRAD_TOL if dtype == torch.float32 else F64_TOL))


def triton_gates_from_noise(*args):
    return torch.ops.fastdarts_triton.sample_gates.default(*args)[:3]


def test_sample_gates_ties_go_to_the_column_that_comes_first_in_the_permutation():
    beta = torch.zeros(3, 6)
    u = torch.full((3, 6), 0.999)  # every gate clamped to exactly 1: all tied
    explore = torch.zeros(3, 6, dtype=torch.bool)
    explore[2, 4] = True
    perm = torch.tensor([4, 1, 5, 0, 3, 2])
    _, mask, _ = triton_gates_from_noise(beta, 1.0, A, B, 2, u, explore, perm)
    assert mask.nonzero().tolist() == [[0, 1], [0, 4], [1, 1], [1, 4], [2, 1], [2, 5]]


@pytest.mark.parametrize("k", [2, None], ids=["top2", "paper"])
def test_sample_gates_non_finite_betas_match_reference(k):
    beta = torch.randn(6, 8)
    beta[1, 3], beta[2], beta[4, 5], beta[5, 0] = float("nan"), float("nan"), float("inf"), -float("inf")
    noise = reference.draw_gate_noise(beta, k, 0.4, generator(16))
    got = triton_gates_from_noise(beta, 0.5, A, B, k, *noise)
    expected = reference.gates_from_noise(beta, 0.5, A, B, k, *noise)
    assert torch.equal(got[1], expected[1])
    assert_all_close(got, expected, dict(equal_nan=True, **OUT_TOL))
    assert got[0][2].isnan().all() and not got[0][0].isnan().any()


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(beta=torch.zeros(8)), ValueError, r"sample_gates: beta must have shape \[num_edges, num_ops\]"),
        (dict(k=9), ValueError, r"sample_gates: k must be None or an integer in 1..8"),
        (dict(beta=torch.zeros(2, 8, dtype=torch.float16)), TypeError, "only float32 and float64 are supported"),
    ],
    ids=["beta_1d", "k", "float16"],
)
def test_sample_gates_bad_arguments_raise_before_drawing(kwargs, error, message):
    gen = generator(14)
    state = gen.get_state()
    with pytest.raises(error, match=message):
        ops.sample_gates(**(dict(beta=torch.zeros(2, 8), tau=1.0) | kwargs), generator=gen, backend="triton")
    assert torch.equal(gen.get_state(), state)


def test_bad_inputs_raise_the_reference_errors():
    with pytest.raises(ValueError, match=r"xs\[1\] must have the shape"):
        ops.weighted_sum([torch.randn(2, 3), torch.randn(3, 2)], torch.randn(2), backend="triton")
    with pytest.raises(ValueError, match="K = 2"):
        ops.weighted_sum([torch.randn(2, 3)] * 2, torch.randn(3), backend="triton")
    with pytest.raises(TypeError, match="weighted_sum: only float32 and float64 are supported"):
        ops.weighted_sum([torch.ones(3, dtype=torch.float16)], torch.ones(1, dtype=torch.float16), backend="triton")
    x, weights, dilations = relu_dwconv_inputs((1, 4, 7, 7))
    with pytest.raises(ValueError, match=r"weights\[1\] must have shape \[C, 1, k, k\] with C = 4 and k odd"):
        ops.relu_dwconv(x, [weights[0], torch.randn(4, 1, 4, 4)], [1, 1], 1, backend="triton")
    with pytest.raises(ValueError, match="relu_dwconv: stride must be positive, got 0"):
        ops.relu_dwconv(x, weights, dilations, 0, backend="triton")


# ----------------------------------------------------------------------------------------------
# sample_gates with noise="kernel": the noise comes from tl.rand in the kernel. Triton makes tl.rand (a @triton.jit
# function) when it is imported, so the interpreter can run it only in a process that had TRITON_INTERPRET=1 set
# by then: these checks run in one fresh interpreter, and the tests below judge its report.

KERNEL_NOISE_CHECKS = """
    import json, torch
    from torch.library import opcheck
    from fastdarts import ops

    A, B = -0.1, 1.1

    def sample(beta, tau, k, seed, explore_p=0.4):
        generator = torch.Generator().manual_seed(seed)
        return ops.sample_gates(beta, tau, A, B, k, explore_p, generator, backend="triton", noise="kernel")

    report = {"frequencies": {}}
    betas = torch.tensor([-3.0, -1.0, -0.2, 0.0, 0.4, 1.5, 3.0], dtype=torch.float64)
    for tau in (0.1, 0.5, 1.0):  # one column per beta, one row per draw
        g, mask, p_nonzero = sample(betas.expand(20000, -1).contiguous(), tau, None, 1)
        report["frequencies"][str(tau)] = {
            "nonzero": (g != 0).double().mean(0).tolist(), "one": (g == 1).double().mean(0).tolist(),
            "p_nonzero": p_nonzero[0].tolist(), "mask_all_ones": bool((mask == 1).all()),
            "in_0_1": bool(g.min() >= 0 and g.max() <= 1),
        }

    beta = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    first, again, other = sample(beta, 0.7, 2, 5), sample(beta, 0.7, 2, 5), sample(beta, 0.7, 2, 6)
    report["same_seed_same_sample"] = all(torch.equal(a, b) for a, b in zip(first, again))
    report["other_seed_other_mask"] = not torch.equal(first[1], other[1])
    torch.manual_seed(9)  # generator=None: the default generator
    default_first = ops.sample_gates(beta, 0.7, backend="triton", noise="kernel")
    torch.manual_seed(9)
    default_again = ops.sample_gates(beta, 0.7, backend="triton", noise="kernel")
    report["default_generator_reproduces"] = all(torch.equal(a, b) for a, b in zip(default_first, default_again))
    report["ones_per_edge"], report["gates_are_the_mask"] = {}, {}
    for k in (1, 2, 3, 8):
        gates, mask, _ = sample(beta, 0.7, k, 3)
        report["ones_per_edge"][k] = mask.sum(1).unique().tolist()
        report["gates_are_the_mask"][k] = torch.equal(gates, mask)

    # How often each op is kept: g, the exploration and the top-k together (one row per edge).
    _, mask, _ = sample(torch.tensor([1.0, 0.5, 0.0, -0.5]).expand(4000, -1).contiguous(), 1.0, 2, 8)
    report["keep_frequency"] = mask.mean(0).tolist()

    # Every g = 0 (beta = -inf): each edge keeps the column not explored, and on a tie (both or neither explored) the
    # one the call's permutation puts first; so the other column is kept exactly when it alone escapes exploration.
    _, mask, _ = sample(torch.full((4000, 2), -float("inf")), 1.0, 1, 4)
    report["kept_fraction_of_the_column_second_in_perm"] = mask.mean(0).min().item()

    # Without top-k the gates are g, whose gradient is (b - a) s (1 - s) / tau with s = (g - a) / (b - a) where the
    # clamp is inactive, and p_nonzero's p (1 - p).
    beta = torch.randn(50, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    g, _, p = sample(beta, 0.6, None, 7)
    up_g, up_p = torch.randn_like(g), torch.randn_like(p)
    (grad,) = torch.autograd.grad((g * up_g).sum() + (p * up_p).sum(), beta)
    g, p, s = g.detach(), p.detach(), (g.detach() - A) / (B - A)
    expected = torch.where((g > 0) & (g < 1), up_g * (B - A) * s * (1 - s) / 0.6, 0.0) + up_p * p * (1 - p)
    report["gradient_error"] = (grad - expected).abs().max().item()
    report["free_gates"] = int(((g > 0) & (g < 1)).sum())

    report["opcheck"] = []
    for k, dtype in ((2, torch.float32), (None, torch.float64)):
        beta = torch.randn(5, 4, dtype=dtype).requires_grad_()
        seed, perm = torch.tensor([123]), None if k is None else torch.randperm(4)
        with torch._functorch.config.patch(decompose_custom_triton_ops=False):
            opcheck(torch.ops.fastdarts_triton.sample_gates_seeded.default, (beta, 0.5, A, B, k, seed, 0.4, perm))
        report["opcheck"].append(k)
    print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def kernel_noise():
    result = run_python(KERNEL_NOISE_CHECKS, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("tau", ["0.1", "0.5", "1.0"])
def test_kernel_noise_frequency_of_nonzero_gates_matches_the_closed_form(kernel_noise, tau):
    report, draws = kernel_noise["frequencies"][tau], 20000
    assert report["mask_all_ones"] and report["in_0_1"]
    betas = [-3.0, -1.0, -0.2, 0.0, 0.4, 1.5, 3.0]
    for column, beta in enumerate(betas):
        for observed, p in (
            (report["nonzero"][column], expected_p_nonzero(beta, float(tau))),
            (report["one"][column], expected_p_one(beta, float(tau))),
        ):
            assert abs(observed - p) < 4 * math.sqrt(p * (1 - p) / draws), (beta, tau, observed, p)
        assert report["p_nonzero"][column] == pytest.approx(expected_p_nonzero(beta, float(tau)), rel=1e-12)


def test_kernel_noise_one_seed_reproduces_the_sample(kernel_noise):
    assert kernel_noise["same_seed_same_sample"] and kernel_noise["default_generator_reproduces"]
    assert kernel_noise["other_seed_other_mask"]


def test_kernel_noise_keeps_exactly_k_gates_per_edge(kernel_noise):
    assert kernel_noise["ones_per_edge"] == {str(k): [float(k)] for k in (1, 2, 3, 8)}
    assert all(kernel_noise["gates_are_the_mask"].values())


def test_kernel_noise_explores_with_probability_explore_p(kernel_noise):
    p, edges = 0.4 * (1 - 0.4), 4000
    observed = kernel_noise["kept_fraction_of_the_column_second_in_perm"]
    assert abs(observed - p) < 4 * math.sqrt(p * (1 - p) / edges)


def test_kernel_noise_keeps_each_op_as_often_as_the_reference_noise(kernel_noise):
    # The same distribution as the reference's draws: this fails if, say, the exploration draws depended on u.
    edges, reference_edges = 4000, 40000
    beta = torch.tensor([1.0, 0.5, 0.0, -0.5]).expand(reference_edges, -1)
    _, mask, _ = ops.sample_gates(beta, 1.0, A, B, 2, 0.4, generator(8), backend="reference")
    for observed, p in zip(kernel_noise["keep_frequency"], mask.mean(0).tolist()):
        assert abs(observed - p) < 4 * math.sqrt(p * (1 - p) * (1 / edges + 1 / reference_edges)), (observed, p)


def test_kernel_noise_gradient_is_the_stretched_sigmoid_derivative(kernel_noise):
    assert kernel_noise["free_gates"] > 100 and kernel_noise["gradient_error"] < 1e-12


def test_opcheck_sample_gates_seeded(kernel_noise):
    assert kernel_noise["opcheck"] == [2, None]


def test_kernel_noise_needs_the_triton_backend_and_a_known_name():
    beta = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="sample_gates: noise='kernel' needs the 'triton' backend, got 'reference'"):
        ops.sample_gates(beta, 1.0, backend="reference", noise="kernel")
    with pytest.raises(ValueError, match="sample_gates: noise must be 'torch' or 'kernel', got 'philox'"):
        ops.sample_gates(beta, 1.0, backend="triton", noise="philox")


def test_kernel_noise_in_an_interpreter_started_without_it_is_a_clear_error():
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    beta = torch.zeros(2, 8)
    if isinstance(tl.rand4x, InterpretedFunction):  # this module ran alone, and set TRITON_INTERPRET before triton
        assert ops.sample_gates(beta, 1.0, backend="triton", noise="kernel")[1].sum() == 4
        return
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1 set before triton is imported"):
        ops.sample_gates(beta, 1.0, generator=generator, backend="triton", noise="kernel")
    assert torch.equal(generator.get_state(), state)  # raised before drawing


# ----------------------------------------------------------------------------------------------
# opcheck: schema, fake (the triton_op's body under FakeTensorMode), autograd registration, and AOT dispatch. The
# interpreted kernels cannot be traced into a graph, so AOT dispatch keeps the ops whole instead of decomposing them
# into their kernels (on a GPU, torch.compile does the latter).


def opcheck_samples():
    samples = []
    for xs_grad, w_grad in ((True, True), (False, True), (True, False)):
        xs, w = weighted_sum_inputs(3, (2, 3, 5, 4), layout="channels_last")
        xs = [x.detach().requires_grad_(xs_grad) for x in xs]
        samples.append(
            (f"weighted_sum-xs_grad={xs_grad}-w_grad={w_grad}", "weighted_sum", (xs, w.requires_grad_(w_grad)))
        )
    xs, w = weighted_sum_inputs(2, (3, 5))
    samples.append(("weighted_sum_backward", "weighted_sum_backward", (torch.randn(3, 5, requires_grad=True), xs, w)))
    x, weights, dilations = relu_dwconv_inputs((1, 3, 7, 6), DARTS[:2], layout="channels_last")
    samples.append(("relu_dwconv", "relu_dwconv", (x, weights, dilations, 2, True)))
    x, weights, dilations = relu_dwconv_inputs((1, 3, 7, 6), DARTS[2:3])
    samples.append(("relu_dwconv-only_weights_no_relu", "relu_dwconv", (x.detach(), weights, dilations, 1, False)))
    grad_outs = [torch.randn(1, 3, 7, 6, requires_grad=True)]
    for input_grad, weight_grad in ((True, True), (True, False), (False, True)):
        args = (grad_outs, x, weights, dilations, 1, True, input_grad, weight_grad)
        samples.append((f"relu_dwconv_backward-{input_grad}-{weight_grad}", "relu_dwconv_backward", args))
    for k, dtype in ((2, torch.float32), (None, torch.float64)):
        beta = torch.randn(5, 4, dtype=dtype)
        u, explore, perm = reference.draw_gate_noise(beta, k, 0.4, generator(12))
        args = (beta.requires_grad_(), 0.5, A, B, k, u.requires_grad_(), explore, perm)
        samples.append((f"sample_gates-k={k}", "sample_gates", args))
    return samples


@pytest.mark.parametrize("op,args", [s[1:] for s in opcheck_samples()], ids=[s[0] for s in opcheck_samples()])
def test_opcheck(op, args):
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        opcheck(getattr(torch.ops.fastdarts_triton, op).default, args)
