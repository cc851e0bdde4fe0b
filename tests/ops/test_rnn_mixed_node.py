"""fastdarts.ops.rnn_mixed_node, DARTS's recurrent mixed op: the C++ kernel against the reference (values and every
gradient), float64 gradcheck, opcheck of both registered ops, the thread count, bad arguments."""

import pytest
import torch
from torch.library import opcheck

from fastdarts import ops

from ..conftest import requires_ext

SHAPES = [(1, 1, 1), (1, 3, 4), (3, 5, 7), (8, 9, 13), (4, 17, 33)]  # (n, B, H): odd sizes, node 1 to node 8


def make_inputs(n, batch, hidden, dtype=torch.float32, requires_grad=True):
    states = torch.randn(n, batch, hidden, dtype=dtype)
    ch = 2 * torch.randn(n, batch, 2 * hidden, dtype=dtype)
    ch[0, 0, hidden] = 0.0  # a relu input of exactly 0 (derivative 0, as torch's)
    p = torch.randn(n, 5, dtype=dtype).softmax(-1)
    return [t.requires_grad_(requires_grad) for t in (states, ch, p)]


@requires_ext
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_matches_reference_in_values_and_gradients(shape, dtype, cpu_isa):
    inputs = make_inputs(*shape, dtype)
    expected = ops.rnn_mixed_node(*inputs, backend="reference")
    got = ops.rnn_mixed_node(*inputs, backend="cpp")
    torch.testing.assert_close(got, expected)
    grad = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(a, b)


@requires_ext
def test_none_column_gets_no_gradient_and_only_needed_gradients_are_returned():
    states, ch, p = make_inputs(3, 4, 5)
    states.requires_grad_(False)
    out = ops.rnn_mixed_node(states, ch, p, backend="cpp")
    grad_ch, grad_p = torch.autograd.grad(out.sum(), [ch, p])
    assert torch.all(grad_p[:, 0] == 0) and grad_ch.shape == ch.shape


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
def test_gradcheck_float64(backend):
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(*s, generator=g, dtype=torch.float64) for s in ((3, 4, 5), (3, 4, 10))]
    p = torch.randn(3, 5, generator=g, dtype=torch.float64).softmax(-1)
    inputs = [t.requires_grad_() for t in (*inputs, p)]
    assert torch.autograd.gradcheck(lambda *a: ops.rnn_mixed_node(*a, backend=backend), inputs)


@requires_ext
def test_cpp_second_derivative_raises_a_clear_error():
    states, ch, p = make_inputs(2, 3, 4, torch.float64)
    (grad_p,) = torch.autograd.grad(ops.rnn_mixed_node(states, ch, p, backend="cpp").square().sum(), [p],
                                    create_graph=True)  # fmt: skip
    with pytest.raises(RuntimeError, match="fastdarts::rnn_mixed_node_backward is not differentiable"):
        torch.autograd.grad(grad_p.sum(), [states])


@requires_ext
def test_does_not_depend_on_the_thread_count():
    states, ch, p = make_inputs(8, 40, 30, requires_grad=False)
    grad = torch.randn(40, 30)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            out = torch.ops.fastdarts.rnn_mixed_node(states, ch, p)
            results.append([out, *torch.ops.fastdarts.rnn_mixed_node_backward(grad, states, ch, p)])
    finally:
        torch.set_num_threads(previous)
    for result in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(result, results[0]))


def samples():
    out = []
    for needs in ("all", "states", "ch", "p", "none"):
        states, ch, p = make_inputs(3, 4, 5, requires_grad=False)
        for name, t in (("states", states), ("ch", ch), ("p", p)):
            t.requires_grad_(needs in ("all", name))
        out.append((f"needs_grad={needs}", (states, ch, p)))
    out.append(("f64_node1", tuple(make_inputs(1, 2, 3, torch.float64))))
    states, ch, p = make_inputs(2, 3, 4, requires_grad=False)
    out.append(("non_contiguous", (states.transpose(1, 2).contiguous().transpose(1, 2), ch, p)))
    return out


@requires_ext
@pytest.mark.parametrize("args", [s for _, s in samples()], ids=[i for i, _ in samples()])
def test_opcheck_rnn_mixed_node(args):
    opcheck(torch.ops.fastdarts.rnn_mixed_node.default, args)


@requires_ext
def test_opcheck_rnn_mixed_node_backward():
    states, ch, p = make_inputs(3, 4, 5, requires_grad=False)
    opcheck(torch.ops.fastdarts.rnn_mixed_node_backward.default, (torch.randn(4, 5), states, ch, p),
            test_utils=("test_schema", "test_faketensor"))  # fmt: skip


BAD = [
    (lambda s, c, p: (s[0], c, p), ValueError, r"states must have shape \[n, B, H\]"),
    (lambda s, c, p: (s, c[..., :-1], p), ValueError, r"ch must have shape \[3, 4, 10\]"),
    (lambda s, c, p: (s, c, p[:, :4]), ValueError, r"p must have shape \[3, 5\]"),
    (lambda s, c, p: (s, c.double(), p), TypeError, "ch must have the dtype of states"),
]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
@pytest.mark.parametrize("change,error,message", BAD)
def test_bad_arguments_raise_one_line_errors(backend, change, error, message):
    args = change(*make_inputs(3, 4, 5, requires_grad=False))
    with pytest.raises(error, match=message) as raised:
        ops.rnn_mixed_node(*args, backend=backend)
    assert "\n" not in str(raised.value).strip()


@requires_ext
def test_cpp_activations_hold_over_the_whole_float_range(cpu_isa):
    # The float kernel computes exp without libm (clamped to float's range): large, tiny and exactly-zero inputs.
    states, ch, p = make_inputs(2, 3, 40, requires_grad=False)
    ch[0, :, :] = torch.linspace(-120, 120, 80)
    ch[1, :, :] = torch.linspace(-1e-3, 1e-3, 80)
    ch[1, 0, 40:] = 0.0
    inputs = [t.requires_grad_() for t in (states, ch, p)]
    expected = ops.rnn_mixed_node(*inputs, backend="reference")
    got = ops.rnn_mixed_node(*inputs, backend="cpp")
    torch.testing.assert_close(got, expected)
    grad = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(a, b)


@requires_ext
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    states, ch, p = make_inputs(3, 4, 5)

    def node(states, ch, p):
        return ops.rnn_mixed_node(states, ch, p.softmax(-1)).square().sum()

    expected = node(states, ch, p)
    got = torch.compile(node, fullgraph=True, backend="aot_eager")(states, ch, p)
    torch.testing.assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got, (states, ch, p)), torch.autograd.grad(expected, (states, ch, p))):
        torch.testing.assert_close(a, b)
