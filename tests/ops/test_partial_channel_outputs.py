"""fastdarts::partial_channel_outputs and its backward, the C++ kernels of PC-DARTS's bypass and shuffle inside the
mixed ops: against reference.partial_channel_outputs and its autograd (every edge's output, the ops' gradients,
dL/dx of the bypass, dL/dbypass_w), odd sides, both strides, K from 2 to 4, with and without bypass_w, gradients
left out of the loss; the stride-2 pool's ties and NaNs routed as ATen's max_pool2d routes them; the same bits on
1 and 2 threads; opcheck; the composition the Triton backend runs; one-line errors. fastdarts::partial_channel_node
(a cell's node from its edges' ops outputs and states) against reference.partial_channel_node, bit for bit, the
same ways."""

import pytest
import torch
from torch.library import opcheck

from fastdarts.ops import _mixed_op, reference

from ..conftest import requires_ext

pytestmark = requires_ext

CL = torch.channels_last
# (N, C, H, W) and K: odd sides, one to four ops channels, a channel count K does not divide by 4, an empty batch.
CASES = [((2, 8, 7, 5), 2), ((1, 16, 6, 6), 4), ((3, 9, 5, 4), 3), ((2, 4, 1, 3), 4), ((0, 8, 3, 3), 2)]


def make_inputs(shape, K, stride, E, dtype=torch.float64, with_w=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    Ho, Wo = (H + stride - 1) // stride, (W + stride - 1) // stride
    x = torch.randn(shape, dtype=dtype, generator=generator).contiguous(memory_format=CL)
    outs = [torch.randn(N, C // K, Ho, Wo, dtype=dtype, generator=generator).contiguous(memory_format=CL)
            for _ in range(E)]  # fmt: skip
    bypass_w = torch.rand(E, dtype=dtype, generator=generator) + 0.5 if with_w else None
    grads = [torch.randn(N, C, Ho, Wo, dtype=dtype, generator=generator).contiguous(memory_format=CL)
             for _ in range(E)]  # fmt: skip
    return x, outs, bypass_w, grads


def reference_backward(x, outs, bypass_w, grads, K, stride):
    """(the ops' gradients of the given grads, dL/dx, dL/dbypass_w) by autograd through the reference."""
    x = x.detach().requires_grad_()
    outs = [o.detach().requires_grad_() for o in outs]
    w = None if bypass_w is None else bypass_w.detach().requires_grad_()
    results = reference.partial_channel_outputs(outs, x, K, stride, w)
    used = [e for e, g in enumerate(grads) if g is not None]
    loss = sum((results[e] * grads[e]).sum() for e in used)
    inputs = [x] + [outs[e] for e in used] + ([w] if w is not None else [])
    got = torch.autograd.grad(loss, inputs, allow_unused=True) if used else [None] * len(inputs)
    grad_x = torch.zeros_like(x) if got[0] is None else got[0]
    grad_w = None
    if w is not None:
        grad_w = torch.zeros_like(w) if got[-1] is None else got[-1]
    return list(got[1 : 1 + len(used)]), grad_x, grad_w


@pytest.mark.parametrize("with_w", [True, False], ids=["bypass_w", "no_bypass_w"])
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
@pytest.mark.parametrize("case", CASES, ids=["x".join(map(str, s)) + f"-K{K}" for s, K in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_forward_and_backward_match_reference(dtype, case, stride, with_w, cpu_isa):
    shape, K = case
    x, outs, bypass_w, grads = make_inputs(shape, K, stride, 3, dtype, with_w)
    got = torch.ops.fastdarts.partial_channel_outputs(outs, x, K, stride, bypass_w)
    want = reference.partial_channel_outputs(outs, x, K, stride, bypass_w)
    for g, r in zip(got, want, strict=True):
        assert g.is_contiguous(memory_format=CL)
        torch.testing.assert_close(g, r, rtol=0, atol=0)  # copies and one multiply: the same bits

    grads[1] = None  # an edge left out of the loss
    ops_grads, grad_x, grad_w = torch.ops.fastdarts.partial_channel_outputs_backward(
        grads, x, K, stride, bypass_w, True, with_w
    )
    want_ops, want_x, want_w = reference_backward(x, outs, bypass_w, grads, K, stride)
    assert len(ops_grads) == 2
    for g, r in zip(ops_grads, want_ops, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_x, want_x, **tolerance)
    if with_w:
        torch.testing.assert_close(grad_w, want_w, **tolerance)
        assert grad_w[1] == 0
    else:
        assert grad_w is None


@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
def test_only_what_is_asked_and_no_gradient_given(stride):
    x, outs, bypass_w, grads = make_inputs((2, 8, 5, 5), 4, stride, 2)
    ops_grads, grad_x, grad_w = torch.ops.fastdarts.partial_channel_outputs_backward(
        grads, x, 4, stride, bypass_w, False, False
    )
    assert len(ops_grads) == 2 and grad_x is None and grad_w is None
    ops_grads, grad_x, grad_w = torch.ops.fastdarts.partial_channel_outputs_backward(
        [None, None], x, 4, stride, bypass_w, True, True
    )
    assert ops_grads == []
    assert torch.equal(grad_x, torch.zeros_like(x)) and torch.equal(grad_w, torch.zeros(2, dtype=x.dtype))


@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
@pytest.mark.parametrize("case", CASES[:3], ids=["x".join(map(str, s)) + f"-K{K}" for s, K in CASES[:3]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_grad_x_base_is_added_bit_for_bit(dtype, case, stride, cpu_isa):
    # A cell passes a state's gradient from its other readers as grad_x_base: grad_x is base + dL/dx, the sum the
    # cell made itself before (the ops' channels the base's own: dL/dx is zero there), the other outputs unchanged.
    shape, K = case
    x, outs, bypass_w, grads = make_inputs(shape, K, stride, 3, dtype)
    grads[1] = None
    op = torch.ops.fastdarts.partial_channel_outputs_backward
    ops_grads, grad_x, grad_w = op(grads, x, K, stride, bypass_w, True, True)
    for base in (torch.randn_like(x), torch.randn(shape, dtype=dtype)):  # channels_last, and contiguous
        got_ops, got_x, got_w = op(grads, x, K, stride, bypass_w, True, True, base)
        assert all(torch.equal(a, b) for a, b in zip(got_ops, ops_grads, strict=True)) and torch.equal(got_w, grad_w)
        assert got_x.is_contiguous(memory_format=CL) and torch.equal(got_x, base + grad_x)
        composed = _mixed_op.composed_partial_channel_outputs_backward(grads, x, K, stride, bypass_w, True, True, base)
        torch.testing.assert_close(composed[1], got_x, rtol=1e-5, atol=1e-6)
    _, only_base, _ = op([None, None, None], x, K, stride, bypass_w, True, False, base)
    assert torch.equal(only_base, base)


def test_stride2_ties_and_nans_route_as_max_pool2d(cpu_isa):
    # Ties take the first maximum in scan order, a NaN wins (the last NaN of a window), as ATen's max_pool2d.
    x, outs, bypass_w, grads = make_inputs((2, 8, 5, 7), 2, 2, 2)
    x = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(1)).double().contiguous(memory_format=CL)
    x[0, 5, 0, 1] = float("nan")
    x[1, 6, 2, 2] = x[1, 6, 3, 3] = float("nan")
    got = torch.ops.fastdarts.partial_channel_outputs(outs, x, 2, 2, bypass_w)
    want = reference.partial_channel_outputs(outs, x, 2, 2, bypass_w)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=0, equal_nan=True)
    _, grad_x, _ = torch.ops.fastdarts.partial_channel_outputs_backward(grads, x, 2, 2, bypass_w, True, False)
    _, want_x, _ = reference_backward(x, outs, bypass_w, grads, 2, 2)
    torch.testing.assert_close(grad_x, want_x, rtol=1e-12, atol=1e-12)


def test_bypass_w_gradient_does_not_depend_on_the_thread_count(cpu_isa):
    x, outs, bypass_w, grads = make_inputs((8, 16, 9, 9), 4, 1, 3, torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(torch.ops.fastdarts.partial_channel_outputs_backward(grads, x, 4, 1, bypass_w, True,
                                                                                True))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    (ops_1, grad_x_1, w_1), (ops_2, grad_x_2, w_2) = results
    assert torch.equal(w_1, w_2) and torch.equal(grad_x_1, grad_x_2)
    assert all(torch.equal(a, b) for a, b in zip(ops_1, ops_2, strict=True))


@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
def test_composition_matches_the_kernels(stride):
    # What the Triton group runs (ATen's copies), against the C++ kernels.
    x, outs, bypass_w, grads = make_inputs((2, 8, 5, 6), 4, stride, 3)
    grads[0] = None
    composed = _mixed_op.composed_partial_channel_outputs(outs, x, 4, stride, bypass_w)
    for got, want in zip(composed, torch.ops.fastdarts.partial_channel_outputs(outs, x, 4, stride, bypass_w)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    got = _mixed_op.composed_partial_channel_outputs_backward(grads, x, 4, stride, bypass_w, True, True)
    want = torch.ops.fastdarts.partial_channel_outputs_backward(grads, x, 4, stride, bypass_w, True, True)
    for g, w in zip(got[0], want[0], strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[2], want[2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
def test_opcheck(stride):
    x, outs, bypass_w, grads = make_inputs((2, 8, 5, 5), 4, stride, 2, torch.float32)
    opcheck(torch.ops.fastdarts.partial_channel_outputs.default, (outs, x, 4, stride, bypass_w))
    opcheck(torch.ops.fastdarts.partial_channel_outputs.default, (outs, x, 4, stride, None))
    opcheck(torch.ops.fastdarts.partial_channel_outputs_backward.default,
            ([grads[0], None], x, 4, stride, bypass_w, True, True))  # fmt: skip
    opcheck(torch.ops.fastdarts.partial_channel_outputs_backward.default,
            ([grads[0], None], x, 4, stride, bypass_w, True, False, torch.randn_like(x)))  # fmt: skip


def test_refuses_differentiation():
    x, outs, bypass_w, _ = make_inputs((1, 8, 4, 4), 4, 1, 1)
    with pytest.raises(RuntimeError, match="a part of fastdarts.ops.mixed_ops"):
        (out,) = torch.ops.fastdarts.partial_channel_outputs([outs[0].requires_grad_()], x, 4, 1, bypass_w)
        out.sum().backward()


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(stride=3), "stride must be 1 or 2, got 3"),
        (dict(K=3), "partial_channels must be an integer >= 2 dividing the 8 channels, got 3"),
        (dict(K=1), "partial_channels must be an integer >= 2 dividing the 8 channels, got 1"),
        (dict(bypass_w=torch.ones(3, dtype=torch.float64)), "bypass_w must have shape [K] with K = 2"),
        (dict(outs=[torch.zeros(1, 2, 4, 4, dtype=torch.float64)] * 2), "outs[0] must have shape [1, 4, 4, 4]"),
        (dict(x=torch.zeros(1, 8, 4, 4), bypass_w=None), "outs[0] must have the dtype of x"),
    ],
)
def test_bad_arguments_in_one_line(change, message):
    x, outs, bypass_w, _ = make_inputs((1, 8, 4, 4), 2, 1, 2)
    args = dict(outs=outs, x=x, K=2, stride=1, bypass_w=bypass_w) | change
    for op in ("cpp", "fake"):
        with pytest.raises((ValueError, TypeError)) as error:
            if op == "cpp":
                torch.ops.fastdarts.partial_channel_outputs(args["outs"], args["x"], args["K"], args["stride"],
                                                            args["bypass_w"])  # fmt: skip
            else:
                with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
                    fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
                    fake["outs"] = [mode.from_tensor(o) for o in args["outs"]]
                    torch.ops.fastdarts.partial_channel_outputs(fake["outs"], fake["x"], fake["K"], fake["stride"],
                                                                fake["bypass_w"])  # fmt: skip
        assert message in str(error.value) and "\n" not in str(error.value).strip(), (op, str(error.value))


@pytest.mark.parametrize(
    "base,x_grad,message",
    [
        (torch.zeros(1, 8, 4, 4, dtype=torch.float64), False, "grad_x_base needs x_grad"),
        (torch.zeros(1, 8, 4, 5, dtype=torch.float64), True, "grad_x_base must have the shape of x [1, 8, 4, 4]"),
        (torch.zeros(1, 8, 4, 4), True, "grad_x_base must have the dtype of x"),
    ],
)
def test_bad_grad_x_base_in_one_line(base, x_grad, message):
    x, _, bypass_w, grads = make_inputs((1, 8, 4, 4), 2, 1, 2)
    op = torch.ops.fastdarts.partial_channel_outputs_backward
    for mode in ("cpp", "fake"):
        with pytest.raises((ValueError, TypeError)) as error:
            if mode == "cpp":
                op(grads, x, 2, 1, bypass_w, x_grad, False, base)
            else:
                with torch._subclasses.fake_tensor.FakeTensorMode() as fake_mode:
                    fake = [fake_mode.from_tensor(t) for t in (x, bypass_w, base, *grads)]
                    op(fake[3:], fake[0], 2, 1, fake[1], x_grad, False, fake[2])
        assert message in str(error.value) and "\n" not in str(error.value).strip(), (mode, str(error.value))


def make_node_inputs(shape, K, kinds, dtype=torch.float64, with_w=True, seed=0):
    """A node's terms: per edge its ops' output and what its bypass is read from: its state ("state") or the bypass
    alone ("bypass", as a reduction cell passes a stride-2 state's pooled bypass)."""
    generator = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    xs, outs = [], []
    for kind in kinds:
        channels = C if kind == "state" else C - C // K
        xs.append(torch.randn(N, channels, H, W, dtype=dtype, generator=generator).contiguous(memory_format=CL))
        outs.append(torch.randn(N, C // K, H, W, dtype=dtype, generator=generator).contiguous(memory_format=CL))
    bypass_w = torch.rand(len(kinds), dtype=dtype, generator=generator) + 0.5 if with_w else None
    return outs, xs, bypass_w


NODE_KINDS = [["state"], ["state", "state"], ["bypass", "bypass", "state"], ["bypass", "state", "state", "state"]]


@pytest.mark.parametrize("with_w", [True, False], ids=["bypass_w", "no_bypass_w"])
@pytest.mark.parametrize("kinds", NODE_KINDS, ids=["-".join(k) for k in NODE_KINDS])
@pytest.mark.parametrize("case", CASES, ids=["x".join(map(str, s)) + f"-K{K}" for s, K in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_node_matches_reference_bit_for_bit(dtype, case, kinds, with_w, cpu_isa):
    # The edges' full-width outputs summed in edge order: the same bits as writing each out and adding them in turn.
    shape, K = case
    outs, xs, bypass_w = make_node_inputs(shape, K, kinds, dtype, with_w)
    got = torch.ops.fastdarts.partial_channel_node(outs, xs, K, bypass_w)
    want = reference.partial_channel_node(outs, xs, K, bypass_w)
    assert got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    composed = _mixed_op.composed_partial_channel_node(outs, xs, K, bypass_w)
    assert composed.is_contiguous(memory_format=CL)
    torch.testing.assert_close(composed, want, rtol=0, atol=0)


@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
def test_node_equals_the_edges_outputs_added_in_turn(stride, cpu_isa):
    # What the cell replaced: partial_channel_outputs of each edge, then the node's sum, from a stride-2 state's
    # pooled bypass or a stride-1 state itself.
    outs, _, bypass_w = make_node_inputs((2, 8, 3, 4), 4, ["state"] * 3, torch.float32)
    generator = torch.Generator().manual_seed(5)
    states = [torch.randn(2, 8, 3 * stride, 4 * stride, generator=generator).contiguous(memory_format=CL)
              for _ in outs]  # fmt: skip
    terms = [torch.ops.fastdarts.partial_channel_outputs([out], x, 4, stride, bypass_w[e : e + 1])[0]
             for e, (out, x) in enumerate(zip(outs, states))]  # fmt: skip
    bypasses = states if stride == 1 else [reference.split_partial_channels(x, 4, 2)[1] for x in states]
    got = torch.ops.fastdarts.partial_channel_node(outs, bypasses, 4, bypass_w)
    assert torch.equal(got, (terms[0] + terms[1]) + terms[2])


def test_node_carries_nans(cpu_isa):
    outs, xs, bypass_w = make_node_inputs((2, 8, 3, 4), 2, ["bypass", "state"])
    xs[0][0, 1, 0, 1] = xs[1][1, 6, 2, 2] = outs[1][0, 3, 1, 1] = float("nan")
    got = torch.ops.fastdarts.partial_channel_node(outs, xs, 2, bypass_w)
    want = reference.partial_channel_node(outs, xs, 2, bypass_w)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert got.isnan().sum() == 3


def test_node_does_not_depend_on_the_thread_count(cpu_isa):
    outs, xs, bypass_w = make_node_inputs((8, 16, 9, 9), 4, ["bypass", "state", "state"], torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(torch.ops.fastdarts.partial_channel_node(outs, xs, 4, bypass_w))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*results)


def test_node_opcheck():
    outs, xs, bypass_w = make_node_inputs((2, 8, 3, 3), 4, ["bypass", "state"], torch.float32)
    opcheck(torch.ops.fastdarts.partial_channel_node.default, (outs, xs, 4, bypass_w))
    opcheck(torch.ops.fastdarts.partial_channel_node.default, (outs[:1], xs[:1], 4, None))


def test_node_refuses_differentiation():
    outs, xs, bypass_w = make_node_inputs((1, 8, 4, 4), 4, ["state"])
    with pytest.raises(RuntimeError, match="a part of fastdarts.ops.mixed_ops"):
        torch.ops.fastdarts.partial_channel_node([outs[0].requires_grad_()], xs, 4, bypass_w).sum().backward()


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(outs=[]), "outs must be a non-empty list of tensors"),
        (dict(xs=[]), "xs must have one tensor per edge (E = 2), got 0"),
        (dict(K=1), "partial_channels must be an integer >= 2, got 1"),
        (
            dict(K=4),
            "xs[0] must be a state [1, 16, 4, 4] or its bypass alone [1, 12, 4, 4] (outs[0] [1, 4, 4, 4], "
            "partial_channels 4), got [1, 4, 4, 4]",
        ),
        (
            dict(xs=[torch.zeros(1, 4, 4, 4, dtype=torch.float64), torch.zeros(1, 8, 4, 5, dtype=torch.float64)]),
            "xs[1] must be a state [1, 8, 4, 4] or its bypass alone [1, 4, 4, 4]",
        ),
        (
            dict(xs=[torch.zeros(1, 4, 4, 4, dtype=torch.float64), torch.zeros(1, 8, 4, 4)]),
            "xs[1] must have the dtype of outs[0]",
        ),
        (dict(bypass_w=torch.ones(3, dtype=torch.float64)), "bypass_w must have shape [K] with K = 2"),
        (
            dict(outs=[torch.zeros(1, 4, 4, 4, dtype=torch.float64), torch.zeros(1, 4, 4, 3, dtype=torch.float64)]),
            "outs[1] must have shape [1, 4, 4, 4]",
        ),
        (dict(outs=[torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)]), "outs[0] must be a 4-D [N, C, H, W] tensor"),
    ],
)
def test_node_bad_arguments_in_one_line(change, message):
    outs, xs, bypass_w = make_node_inputs((1, 8, 4, 4), 2, ["bypass", "state"])
    args = dict(outs=outs, xs=xs, K=2, bypass_w=bypass_w) | change
    for op in ("cpp", "fake"):
        with pytest.raises((ValueError, TypeError)) as error:
            if op == "cpp":
                torch.ops.fastdarts.partial_channel_node(args["outs"], args["xs"], args["K"], args["bypass_w"])
            else:
                with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
                    fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
                    fake["outs"] = [mode.from_tensor(o) for o in args["outs"]]
                    fake["xs"] = [mode.from_tensor(x) for x in args["xs"]]
                    torch.ops.fastdarts.partial_channel_node(fake["outs"], fake["xs"], fake["K"], fake["bypass_w"])
        assert message in str(error.value) and "\n" not in str(error.value).strip(), (op, str(error.value))
