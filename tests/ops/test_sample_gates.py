import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from fastdarts import PRDARTSMethod, SearchNetwork, ops
from fastdarts.ops import reference

from ..conftest import requires_ext

A, B = -0.1, 1.1
# The tests of the public op run on every backend.
BACKENDS = ["reference", pytest.param("cpp", marks=requires_ext)]


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def expected_p_nonzero(beta, tau):
    return 1 / (1 + math.exp(-(beta - tau * math.log(-A / B))))


def expected_p_one(beta, tau):
    # g = 1 when the stretched sigmoid reaches 1: s >= (1 - a) / (b - a), i.e. logit(s) >= log((1 - a) / (b - 1)).
    return 1 / (1 + math.exp(-(beta - tau * math.log((1 - A) / (B - 1)))))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_frequency_of_nonzero_gates_matches_the_closed_form(tau, backend):
    betas = torch.tensor([-3.0, -1.0, -0.2, 0.0, 0.4, 1.5, 3.0], dtype=torch.float64)
    draws = 20000
    beta = betas.expand(draws, -1).contiguous()  # one column per beta, one row per draw
    g, mask, p_nonzero = ops.sample_gates(beta, tau, A, B, k=None, generator=generator(1), backend=backend)
    assert torch.equal(mask, torch.ones_like(mask))
    assert g.min() >= 0 and g.max() <= 1
    for column, value in enumerate(betas.tolist()):
        for observed, p in (
            ((g[:, column] != 0).double().mean().item(), expected_p_nonzero(value, tau)),
            ((g[:, column] == 1).double().mean().item(), expected_p_one(value, tau)),
        ):
            standard_error = math.sqrt(p * (1 - p) / draws)
            assert abs(observed - p) < 4 * standard_error, (value, tau, observed, p)
        assert p_nonzero[0, column].item() == pytest.approx(expected_p_nonzero(value, tau), rel=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gates_have_point_masses_at_0_and_1_and_a_continuous_part(backend):
    g, _, _ = ops.sample_gates(torch.zeros(4000, 8), 1.0, k=None, generator=generator(2), backend=backend)
    at_zero, at_one = (g == 0).float().mean(), (g == 1).float().mean()
    # beta = 0, tau = 1: P(g = 0) = P(g = 1) = 1/12.
    assert 0.07 < at_zero < 0.1 and 0.07 < at_one < 0.1
    inner = g[(g > 0) & (g < 1)]
    assert len(inner) > 0.8 * g.numel() and len(inner.unique()) > 1000


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_exactly_k_ones_per_edge_and_straight_through_values_are_exactly_0_or_1(k, backend):
    beta = torch.randn(300, 8, requires_grad=True)
    gates, mask, _ = ops.sample_gates(beta, 0.7, k=k, generator=generator(3), backend=backend)
    assert torch.equal(mask.sum(dim=1), torch.full((300,), float(k)))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(gates.detach(), mask)  # forward: exactly 1 on the selected ops, exactly 0 elsewhere


def test_exploration_probability():
    beta = torch.zeros(500, 8)
    _, explore, _ = reference.draw_gate_noise(beta, 2, 0.4, generator(4))
    p, n = 0.4, explore.numel()
    assert abs(explore.double().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_the_mask_is_the_top_k_of_g_minus_exploration():
    beta = torch.randn(200, 8, dtype=torch.float64)
    u, explore, perm = reference.draw_gate_noise(beta, 2, 0.4, generator(5))
    _, mask, _ = reference.gates_from_noise(beta, 0.5, A, B, 2, u, explore, perm)
    scores = reference.hard_concrete(beta, 0.5, A, B, u) - explore.double()
    kept_min = torch.where(mask.bool(), scores, math.inf).min(dim=1).values
    dropped_max = torch.where(mask.bool(), -math.inf, scores).max(dim=1).values
    assert (kept_min >= dropped_max).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_column_that_comes_first_in_the_permutation(backend):
    beta = torch.zeros(3, 6)
    u = torch.full((3, 6), 0.999)  # every gate clamped to exactly 1: all tied
    explore = torch.zeros(3, 6, dtype=torch.bool)
    explore[2, 4] = True  # explored away: 0 < every other score
    perm = torch.tensor([4, 1, 5, 0, 3, 2])
    deterministic_part = {"reference": reference.gates_from_noise, "cpp": cpp_gates_from_noise}[backend]
    _, mask, _ = deterministic_part(beta, 1.0, A, B, 2, u, explore, perm)
    assert mask.nonzero().tolist() == [[0, 1], [0, 4], [1, 1], [1, 4], [2, 1], [2, 5]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_exploration_draws_do_not_shift_the_random_stream(backend):
    # explore_p = 0 and 1 draw the same numbers; subtracting 1 from every gate changes no ranking.
    beta = torch.randn(50, 8)
    never = ops.sample_gates(beta, 1.0, explore_p=0.0, generator=generator(6), backend=backend)
    always = ops.sample_gates(beta, 1.0, explore_p=1.0, generator=generator(6), backend=backend)
    for x, y in zip(never, always):
        assert torch.equal(x, y)


def test_gradient_is_the_stretched_sigmoid_derivative_on_selected_unclamped_gates():
    tau, k = 0.6, 2
    beta = torch.tensor([[0.3, -0.4, 1.2, 0.0], [2.0, -1.0, 0.5, 0.1]], dtype=torch.float64, requires_grad=True)
    u = torch.tensor([[0.55, 0.35, 0.999999, 0.6], [0.7, 0.2, 0.45, 0.5]], dtype=torch.float64)
    explore = torch.tensor([[False, False, False, True], [False, False, False, False]])
    perm = torch.tensor([0, 1, 2, 3])
    gates, mask, p_nonzero = reference.gates_from_noise(beta, tau, A, B, k, u, explore, perm)
    upstream = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], dtype=torch.float64)
    (grad,) = torch.autograd.grad((gates * upstream).sum(), beta)

    expected = torch.zeros_like(beta)
    selected = set(map(tuple, mask.nonzero().tolist()))
    for i in range(2):
        for j in range(4):
            logit_u = math.log(u[i, j]) - math.log(1 - u[i, j])
            s = 1 / (1 + math.exp(-(beta[i, j].item() + logit_u) / tau))
            stretched = s * (B - A) + A
            if (i, j) in selected and 0 < stretched < 1:
                expected[i, j] = upstream[i, j] * (B - A) * s * (1 - s) / tau
    # The case covers all three kinds of gate: selected and free, selected but clamped, unselected.
    assert (grad != 0).sum() >= 2 and (mask.bool() & (grad == 0)).any() and (~mask.bool()).any()
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)

    (grad_p,) = torch.autograd.grad(p_nonzero.sum(), beta)
    torch.testing.assert_close(grad_p, p_nonzero * (1 - p_nonzero), rtol=1e-12, atol=0)


def test_without_top_k_the_gates_are_g_with_its_gradient():
    beta = torch.tensor([[0.2, -0.3, 0.9]], dtype=torch.float64, requires_grad=True)
    u = torch.tensor([[0.4, 0.6, 0.5]], dtype=torch.float64)
    gates, mask, _ = reference.gates_from_noise(beta, 1.0, A, B, None, u, None, None)
    g = reference.hard_concrete(beta, 1.0, A, B, u)
    assert torch.equal(gates, g) and torch.equal(mask, torch.ones_like(mask))
    assert 0 < gates.min() and gates.max() < 1
    (grad,) = torch.autograd.grad(gates.sum(), beta)
    s = torch.sigmoid(beta.detach() + u.log() - (1 - u).log())
    torch.testing.assert_close(grad, (B - A) * s * (1 - s), rtol=1e-12, atol=0)


def cpp_gates_from_noise(*args):
    """The C++ op, called like reference.gates_from_noise, without its s_kept output."""
    return torch.ops.fastdarts.sample_gates.default(*args)[:3]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [2, None])
def test_sample_gates_is_the_deterministic_part_applied_to_the_drawn_noise(backend, k):
    beta = torch.randn(14, 8)
    deterministic_part = {"reference": reference.gates_from_noise, "cpp": cpp_gates_from_noise}[backend]
    got = ops.sample_gates(beta, 0.3, A, B, k, 0.4, generator(7), backend=backend)
    expected = deterministic_part(beta, 0.3, A, B, k, *reference.draw_gate_noise(beta, k, 0.4, generator(7)))
    for x, y in zip(got, expected):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_given_generator_is_used(backend):
    beta = torch.randn(14, 8)
    torch.manual_seed(1)
    first = ops.sample_gates(beta, 1.0, generator=generator(8), backend=backend)
    torch.manual_seed(2)
    second = ops.sample_gates(beta, 1.0, generator=generator(8), backend=backend)
    third = ops.sample_gates(beta, 1.0, generator=generator(9), backend=backend)
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert not torch.equal(first[0], third[0])


BAD_ARGUMENTS = [
    (dict(beta=torch.zeros(8)), ValueError, r"beta must have shape \[num_edges, num_ops\]"),
    (dict(beta=torch.zeros(2, 8, dtype=torch.int64)), TypeError, "beta must be floating point"),
    (dict(tau=0.0), ValueError, "tau must be a finite number > 0, got 0.0"),
    (dict(a=0.1), ValueError, "a must be a finite number < 0"),
    (dict(b=1.0), ValueError, "b must be a finite number > 1"),
    (dict(k=9), ValueError, r"k must be None or an integer in 1..8"),
    (dict(k=0), ValueError, r"k must be None or an integer in 1..8"),
    (dict(explore_p=1.5), ValueError, r"explore_p must lie in \[0, 1\]"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs,error,message", BAD_ARGUMENTS)
def test_bad_arguments_raise_one_line_errors(kwargs, error, message, backend):
    arguments = dict(beta=torch.zeros(2, 8), tau=1.0) | kwargs
    with pytest.raises(error, match=message) as caught:
        ops.sample_gates(**arguments, backend=backend)
    assert "\n" not in str(caught.value) and str(caught.value).startswith("sample_gates: ")


def test_bad_noise_is_rejected():
    beta = torch.zeros(2, 4)
    u, explore, perm = torch.rand(2, 4), torch.zeros(2, 4, dtype=torch.bool), torch.arange(4)
    with pytest.raises(ValueError, match=r"u must have the shape of beta"):
        reference.gates_from_noise(beta, 1.0, A, B, 2, torch.rand(2, 3), explore, perm)
    with pytest.raises(ValueError, match="explore must be a bool tensor"):
        reference.gates_from_noise(beta, 1.0, A, B, 2, u, explore.float(), perm)
    with pytest.raises(ValueError, match="perm must be an int64 permutation of the 4 op columns"):
        reference.gates_from_noise(beta, 1.0, A, B, 2, u, explore, torch.arange(3))


@requires_ext
def test_cpp_runs_sample_gates_on_cpu_only():
    assert ops.available_backends("sample_gates") == ["reference", "cpp"]
    assert ops.available_backends("sample_gates", "meta") == ["reference"]
    with pytest.raises(RuntimeError, match="backend 'cpp' runs on cpu tensors only, got meta tensors"):
        ops.sample_gates(torch.zeros(2, 8, device="meta"), 1.0, backend="cpp")


# ----------------------------------------------------------------------------------------------
# The C++ kernel against the reference. Both draw the noise with reference.draw_gate_noise from the same
# generator, so everything downstream is compared on identical random inputs.

# What goes through log, log1p and exp is compared to a tight tolerance rather than bit for bit: the kernel performs
# the reference's operations in the same order and dtype, but the C library rounds those functions differently from
# PyTorch's vectorised versions now and then (by an ulp). Where the formula itself is ill-conditioned the ulp grows:
# 1 - p for p near 1 in the gradient of p_nonzero, s * (b - a) + a near 0 in g. So the tolerance is relative both
# elementwise and to the tensor's scale (atol = rtol * its largest magnitude).
RTOL = {torch.float32: 1e-6, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["float32", "float64"]


def assert_close_relative(got, expected, dtype):
    rtol = RTOL[dtype]
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * scale)


def sample_and_grads(beta, tau, k, explore_p, seed, backend):
    """The three outputs and beta's gradient through the gates alone, through p_nonzero alone and through both."""
    upstream_gates = torch.randn(beta.shape, dtype=beta.dtype, generator=generator(100))
    upstream_p = torch.randn(beta.shape, dtype=beta.dtype, generator=generator(101))
    gates, mask, p_nonzero = ops.sample_gates(beta, tau, A, B, k, explore_p, generator(seed), backend=backend)
    losses = [(gates * upstream_gates).sum(), (p_nonzero * upstream_p).sum()]
    losses.append(losses[0] + losses[1])
    grads = [torch.autograd.grad(loss, beta, retain_graph=True)[0] for loss in losses]
    return gates.detach(), mask, p_nonzero.detach(), grads


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(14, 8), (5, 3), (1, 8), (300, 8), (0, 8)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("k", [1, 2, "all", None], ids=lambda k: f"k={k}")
@pytest.mark.parametrize("explore_p", [0.0, 0.4])
@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_cpp_matches_reference_for_the_same_generator_state(tau, explore_p, k, shape, dtype):
    k = shape[1] if k == "all" else k  # every op kept through the top-k path: 8 of 8, or 3 of 3
    beta = (2 * torch.randn(shape, dtype=dtype)).requires_grad_()
    gates, mask, p_nonzero, grads = sample_and_grads(beta, tau, k, explore_p, 10, "cpp")
    ref_gates, ref_mask, ref_p_nonzero, ref_grads = sample_and_grads(beta, tau, k, explore_p, 10, "reference")

    assert torch.equal(mask, ref_mask)
    if k is None:
        assert_close_relative(gates, ref_gates, dtype)  # g itself
        assert ((gates == 0) | (gates == 1)).any() or gates.numel() < 16  # the clamped gates are part of the case
    else:
        assert torch.equal(gates, ref_gates)  # exactly the 0/1 mask
    assert_close_relative(p_nonzero, ref_p_nonzero, dtype)
    # No gradient through the gates off the mask or where the clamp holds g at 0 or 1: exactly where the reference
    # has none.
    assert torch.equal(grads[0] == 0, ref_grads[0] == 0)
    for got, expected in zip(grads, ref_grads):
        assert_close_relative(got, expected, dtype)


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpp_gradient_is_the_straight_through_gradient(dtype):
    tau = 0.5
    beta = (2 * torch.randn(14, 8, dtype=dtype)).requires_grad_()
    gates, mask, p_nonzero = ops.sample_gates(beta, tau, A, B, 2, 0.4, generator(11), backend="cpp")
    u, _, _ = reference.draw_gate_noise(beta, 2, 0.4, generator(11))
    g = reference.hard_concrete(beta, tau, A, B, u)
    straight_through = mask * (1 - g.detach() + g)  # METHOD 2.2's definition
    assert torch.equal(gates.detach(), mask)
    # 1 - g + g is 1 only up to the rounding of 1 - g.
    torch.testing.assert_close(straight_through.detach(), mask, rtol=0, atol=2 * torch.finfo(dtype).eps)

    upstream, upstream_p = torch.randn(14, 8, dtype=dtype), torch.randn(14, 8, dtype=dtype)
    (got,) = torch.autograd.grad((gates * upstream).sum() + (p_nonzero * upstream_p).sum(), beta)
    p = reference.gate_p_nonzero(beta, tau, A, B)
    (expected,) = torch.autograd.grad((straight_through * upstream).sum() + (p * upstream_p).sum(), beta)
    assert_close_relative(got, expected, dtype)

    # The same, written out: grad_beta = grad_gates * mask * dg/dbeta + grad_p * p (1 - p).
    with torch.no_grad():
        s = torch.sigmoid((beta + u.log() - (-u).log1p()) / tau)
        stretched = s * (B - A) + A
        dg = torch.where((stretched >= 0) & (stretched <= 1), (B - A) * s * (1 - s) / tau, 0.0)
        by_hand = upstream * mask * dg + upstream_p * p * (1 - p)
    assert (mask.bool() & (dg == 0)).any() and (mask.bool() & (dg != 0)).any()  # kept gates, clamped and free
    assert_close_relative(got, by_hand, dtype)


TAU = 0.3


def noise_away_from_kinks(beta, k, seed):
    """(u, explore, perm) for `beta` [E, K] with every stretched sigmoid s' = s (b - a) + a at least 0.02 away
    from the clamp's kinks at 0 and 1: s' is chosen in [-0.08, 1.08), moved off the kinks, and u solved for.
    So gates are clamped or free both sides of a finite-difference step, and gradcheck sees a smooth function."""
    gen = generator(seed)
    stretched = torch.rand(beta.shape, generator=gen, dtype=torch.float64) * 1.16 - 0.08
    stretched = torch.where((stretched.abs() < 0.02) | ((stretched - 1).abs() < 0.02), stretched + 0.04, stretched)
    s = (stretched - A) / (B - A)
    u = torch.sigmoid(TAU * torch.logit(s) - beta.detach())
    if k is None:
        return u, None, None
    return u, torch.rand(beta.shape, generator=gen) < 0.4, torch.randperm(beta.shape[1], generator=gen)


def kink_free_inputs(k, seed=13):
    beta = torch.randn(6, 8, dtype=torch.float64)
    u, explore, perm = noise_away_from_kinks(beta, k, seed)
    x = beta + u.log() - (-u).log1p()
    stretched = torch.sigmoid(x / TAU) * (B - A) + A
    assert ((stretched.abs() > 0.019) & ((stretched - 1).abs() > 0.019)).all()
    assert (stretched < 0).any() and (stretched > 1).any() and ((stretched > 0) & (stretched < 1)).any()
    return beta.requires_grad_(), u.requires_grad_(), explore, perm


@requires_ext
@pytest.mark.parametrize("k", [2, None], ids=["top2", "paper"])
def test_cpp_gradcheck_and_gradgradcheck_float64(k):
    beta, u, explore, perm = kink_free_inputs(k)

    def fn(beta, u):
        gates, _, p_nonzero, s_kept = torch.ops.fastdarts.sample_gates.default(beta, TAU, A, B, k, u, explore, perm)
        # With top-k the forward gates are the constant 0/1 mask, and their gradient is by design the straight-through
        # one, not the derivative of that constant: finite differences check the outputs whose gradient is their
        # derivative, and the straight-through gradient is checked against the reference (first and second order).
        return (p_nonzero, s_kept) if k is not None else (gates, p_nonzero, s_kept)

    assert torch.autograd.gradcheck(fn, (beta, u))
    assert torch.autograd.gradgradcheck(fn, (beta, u))


@requires_ext
@pytest.mark.parametrize("k", [2, None], ids=["top2", "paper"])
def test_cpp_second_derivatives_match_the_reference(k):
    beta, u, explore, perm = kink_free_inputs(k)
    upstream = [torch.randn(6, 8, dtype=torch.float64) for _ in range(2)]
    directions = [torch.randn(6, 8, dtype=torch.float64) for _ in range(2)]

    def second_derivatives(gates_from_noise):
        gates, _, p_nonzero = gates_from_noise(beta, TAU, A, B, k, u, explore, perm)
        loss = (gates * upstream[0]).sum() + (p_nonzero * upstream[1]).sum()
        first = torch.autograd.grad(loss, [beta, u], create_graph=True)
        directional = sum((f * d).sum() for f, d in zip(first, directions))
        return torch.autograd.grad(directional, [beta, u])

    for got, expected in zip(second_derivatives(cpp_gates_from_noise), second_derivatives(reference.gates_from_noise)):
        assert_close_relative(got, expected, torch.float64)


def sample_gates_samples():
    """(id, arguments of the op) for opcheck: both paths, both dtypes, u and beta needing gradients or not."""
    samples = []
    cases = [
        ("top2_f32", (14, 8), torch.float32, 2, True, False),
        ("paper_f64", (5, 3), torch.float64, None, True, False),
        ("all_kept_no_grad", (3, 8), torch.float32, 8, False, False),
        ("u_and_beta_grad_f64", (4, 8), torch.float64, 1, True, True),
        ("only_u_grad_paper", (4, 8), torch.float64, None, False, True),
        ("no_edges", (0, 8), torch.float32, 2, True, False),
    ]
    for name, shape, dtype, k, beta_grad, u_grad in cases:
        beta = torch.randn(shape, dtype=dtype)
        u, explore, perm = reference.draw_gate_noise(beta, k, 0.4, generator(12))
        samples.append((name, (beta.requires_grad_(beta_grad), 0.5, A, B, k, u.requires_grad_(u_grad), explore, perm)))
    beta = torch.randn(8, 6).t().requires_grad_()  # strided beta: the outputs are contiguous all the same
    samples.append(("transposed_beta", (beta, 0.5, A, B, 2, *reference.draw_gate_noise(beta, 2, 0.4, generator(12)))))
    return samples


@requires_ext
@pytest.mark.parametrize("args", [s for _, s in sample_gates_samples()], ids=[i for i, _ in sample_gates_samples()])
def test_opcheck_sample_gates(args):
    opcheck(torch.ops.fastdarts.sample_gates.default, args)


def gated_loss(beta, upstream):
    gates, mask, p_nonzero = ops.sample_gates(beta, 0.5, k=2, backend="cpp")
    return (gates * upstream).sum() + p_nonzero.sum(), mask


@requires_ext
def test_compile_fullgraph_traces_the_cpp_op_and_matches_eager():
    # torch.compile cannot take a torch.Generator argument, so the compiled function draws from the default one.
    beta, upstream = torch.randn(14, 8, requires_grad=True), torch.randn(14, 8)
    graphs = []

    def record(gm, example_inputs):
        graphs.append({node.target for node in gm.graph.nodes})
        return gm.forward

    torch._dynamo.reset()
    torch.compile(gated_loss, fullgraph=True, backend=record)(beta, upstream)
    assert torch.ops.fastdarts.sample_gates.default in graphs[0]

    torch._dynamo.reset()
    compiled = torch.compile(gated_loss, fullgraph=True, backend="aot_eager")  # traces the backward as well
    results = []
    for fn in (compiled, gated_loss):
        torch.manual_seed(3)
        loss, mask = fn(beta, upstream)
        results.append((loss, mask, torch.autograd.grad(loss, beta)[0]))
    (loss, mask, grad), (eager_loss, eager_mask, eager_grad) = results
    assert torch.equal(mask, eager_mask) and mask.sum() == 28
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-6, atol=0)


@requires_ext
@pytest.mark.parametrize("kwargs", [case[0] for case in BAD_ARGUMENTS])
def test_cpp_raises_the_reference_errors(kwargs):
    arguments = dict(beta=torch.zeros(2, 8), tau=1.0) | kwargs
    errors = {}
    for backend in ("reference", "cpp"):
        with pytest.raises((ValueError, TypeError)) as caught:
            ops.sample_gates(**arguments, backend=backend)
        errors[backend] = (type(caught.value), str(caught.value))
    assert errors["cpp"] == errors["reference"]


# The C++ checks spell dtypes as every C++ check of fastdarts does (c10's Float, Long); apart from that their
# messages are the reference's word for word.
CPP_DTYPE_NAMES = {
    "torch.float32": "Float",
    "torch.float64": "Double",
    "torch.int64": "Long",
    "torch.int32": "Int",
    "torch.bool": "Bool",
}
BAD_NOISE_ARGUMENTS = [
    ("beta_1d", dict(beta=torch.zeros(4))),
    ("beta_no_ops", dict(beta=torch.zeros(2, 0))),
    ("beta_int", dict(beta=torch.zeros(2, 4, dtype=torch.int64))),
    ("tau_zero", dict(tau=0.0)),
    ("tau_tiny_negative", dict(tau=-1e-20)),
    ("tau_huge_negative", dict(tau=-2.5e16)),
    ("tau_nan", dict(tau=math.nan)),
    ("tau_inf", dict(tau=math.inf)),
    ("a_positive", dict(a=0.1)),
    ("a_whole", dict(a=3.0)),
    ("b_one", dict(b=1.0)),
    ("b_small", dict(b=0.00012345)),
    ("b_negative_inf", dict(b=-math.inf)),
    ("k_too_big", dict(k=5)),
    ("k_zero", dict(k=0)),
    ("u_shape", dict(u=torch.rand(2, 3))),
    ("u_dtype", dict(u=torch.rand(2, 4, dtype=torch.float64))),
    ("u_device", dict(u=torch.rand(2, 4, device="meta"))),
    ("explore_missing", dict(explore=None)),
    ("perm_missing", dict(perm=None)),
    ("explore_float", dict(explore=torch.zeros(2, 4))),
    ("explore_shape", dict(explore=torch.zeros(2, 3, dtype=torch.bool))),
    ("perm_length", dict(perm=torch.arange(3))),
    ("perm_int32", dict(perm=torch.arange(4, dtype=torch.int32))),
]


def noise_arguments(**changes):
    """Valid arguments of reference.gates_from_noise (and of the op, whose argument names are the same), changed."""
    arguments = dict(
        beta=torch.zeros(2, 4), tau=1.0, a=A, b=B, k=2, u=torch.rand(2, 4),
        explore=torch.zeros(2, 4, dtype=torch.bool), perm=torch.arange(4),
    )  # fmt: skip
    return arguments | changes


@requires_ext
@pytest.mark.parametrize("changes", [c for _, c in BAD_NOISE_ARGUMENTS], ids=[i for i, _ in BAD_NOISE_ARGUMENTS])
def test_cpp_op_rejects_bad_inputs_with_the_reference_messages(changes):
    arguments = noise_arguments(**changes)
    with pytest.raises((ValueError, TypeError)) as expected:
        reference.gates_from_noise(**arguments)
    with pytest.raises((ValueError, TypeError)) as got:
        torch.ops.fastdarts.sample_gates.default(**arguments)
    message = str(expected.value)
    for python_name, cpp_name in CPP_DTYPE_NAMES.items():
        message = message.replace(python_name, cpp_name)
    assert (type(got.value), str(got.value)) == (type(expected.value), message)


@requires_ext
@pytest.mark.parametrize("k", [2, None], ids=["top2", "paper"])
def test_cpp_matches_reference_on_non_finite_betas(k):
    # A diverged run: NaN gates stay NaN (the straight-through form keeps them) and rank first, as torch.sort ranks
    # NaN; beta = +-inf gives g = 1 or 0.
    beta = torch.randn(6, 8)
    beta[1, 3], beta[2], beta[4, 5], beta[5, 0] = math.nan, math.nan, math.inf, -math.inf
    noise = reference.draw_gate_noise(beta, k, 0.4, generator(16))
    got = cpp_gates_from_noise(beta, 0.5, A, B, k, *noise)
    expected = reference.gates_from_noise(beta, 0.5, A, B, k, *noise)
    assert torch.equal(got[1], expected[1])
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert got[0][2].isnan().all() and not got[0][0].isnan().any()


@requires_ext
def test_cpp_op_ignores_explore_and_perm_without_top_k():
    beta, u = torch.randn(3, 4), torch.rand(3, 4)
    expected = reference.gates_from_noise(beta, 1.0, A, B, None, u, None, None)
    got = torch.ops.fastdarts.sample_gates.default(beta, 1.0, A, B, None, u, torch.zeros(1), torch.zeros(2))
    assert torch.equal(got[1], expected[1])
    assert_close_relative(got[0], expected[0], torch.float32)


@requires_ext
@pytest.mark.parametrize("perm", [[0, 0, 1, 2], [0, 1, 2, 4], [-1, 0, 1, 2]], ids=["repeat", "too_big", "negative"])
def test_cpp_op_rejects_a_perm_that_is_not_a_permutation(perm):
    # The kernel indexes columns with perm, so it checks the values (the reference's indexing would raise an
    # IndexError on some of these and silently count a repeated column twice on the others).
    message = f"sample_gates: perm must hold each of the 4 op columns 0..3 once, got {perm}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        torch.ops.fastdarts.sample_gates.default(**noise_arguments(perm=torch.tensor(perm)))


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_rejects_unsupported_dtypes_before_drawing(dtype):
    gen = generator(14)
    state = gen.get_state()
    with pytest.raises(TypeError, match="sample_gates: only float32 and float64 are supported"):
        ops.sample_gates(torch.zeros(2, 8, dtype=dtype), 1.0, generator=gen, backend="cpp")
    assert torch.equal(gen.get_state(), state)  # no random numbers consumed
    with pytest.raises(TypeError, match="sample_gates: only float32 and float64 are supported"):
        beta = torch.zeros(2, 4, dtype=dtype)
        torch.ops.fastdarts.sample_gates.default(**noise_arguments(beta=beta, u=torch.rand(2, 4, dtype=dtype)))


@requires_ext
def test_cpp_result_does_not_depend_on_the_thread_count():
    beta = torch.randn(2000, 8)  # 16 tasks of 128 rows
    noise = reference.draw_gate_noise(beta, 2, 0.4, generator(15))
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(torch.ops.fastdarts.sample_gates.default(beta, 0.5, A, B, 2, *noise))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(x, y) for x, y in zip(*results))


@requires_ext
@pytest.mark.parametrize("form", ["reference", "paper"])
def test_prdarts_network_on_cpp_matches_the_reference(form):
    def forward_backward(backend):
        torch.manual_seed(0)
        net = SearchNetwork(C=2, num_classes=3, layers=3, in_channels=1, steps=2, multiplier=2,
                            method=PRDARTSMethod(form=form))  # fmt: skip
        x, y = torch.randn(4, 1, 5, 5), torch.randint(0, 3, (4,))
        with ops.use_backend(backend):
            loss = F.cross_entropy(net(x), y) + net.regulariser()
            grads = torch.autograd.grad(loss, net.arch_parameters())
        return loss.detach(), grads

    loss, grads = forward_backward("cpp")
    ref_loss, ref_grads = forward_backward("reference")
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    # The same gates are sampled; the mixed ops and convolutions differ by float32 rounding between the backends.
    torch.testing.assert_close(loss, ref_loss)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
