import pytest
import torch
from torch.library import opcheck

from fastdarts import ops
from fastdarts.ops import reference

from ..conftest import requires_ext

pytestmark = requires_ext

SHAPES = [(5,), (3, 4, 7, 9), (2, 16, 8, 8), (1, 3, 9, 7), (70000,)]  # the last spans several reduce chunks
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def make_inputs(K, shape, dtype, channels_last=False, requires_grad=True):
    xs = [torch.randn(shape, dtype=dtype) for _ in range(K)]
    if channels_last:
        xs = [x.to(memory_format=torch.channels_last) for x in xs]
    w = torch.randn(K, dtype=dtype)
    for t in (*xs, w):
        t.requires_grad_(requires_grad)
    return xs, w


@pytest.mark.parametrize("K", [1, 3, 7])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference_in_value_and_every_gradient(K, shape, dtype):
    xs, w = make_inputs(K, shape, dtype)
    out = ops.weighted_sum(xs, w, backend="cpp")
    expected = reference.weighted_sum(xs, w)
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [*xs, w], grad)
    want = torch.autograd.grad(expected, [*xs, w], grad)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-4 if dtype == torch.float32 else 1e-12, atol=1e-5)


@pytest.mark.parametrize("layout", ["channels_last", "mixed", "non_contiguous"])
def test_layouts(layout):
    xs, w = make_inputs(3, (2, 16, 8, 8), torch.float32, channels_last=layout != "non_contiguous")
    if layout == "mixed":
        xs[1] = xs[1].detach().contiguous().requires_grad_()
    if layout == "non_contiguous":
        xs = [x.detach().transpose(1, 3).requires_grad_() for x in xs]
    out = ops.weighted_sum(xs, w, backend="cpp")
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference.weighted_sum(xs, w), rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out).transpose(0, 1).contiguous().transpose(0, 1)  # a strided grad too
    got = torch.autograd.grad(out, [*xs, w], grad)
    want = torch.autograd.grad(reference.weighted_sum(xs, w), [*xs, w], grad)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("shape", [(3,), (2, 3, 5)])
def test_gradcheck_float64(backend, shape):
    xs, w = make_inputs(3, shape, torch.float64)
    assert torch.autograd.gradcheck(lambda *t: ops.weighted_sum(t[:-1], t[-1], backend=backend), (*xs, w))


def test_grad_w_is_reproducible():
    xs, w = make_inputs(4, (70001,), torch.float32)
    out = ops.weighted_sum(xs, w, backend="cpp")
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, w, grad, retain_graph=True)[0]
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            assert torch.equal(torch.autograd.grad(out, w, grad, retain_graph=True)[0], first)
        finally:
            torch.set_num_threads(previous)


def sample_inputs():
    """(args) for opcheck, including inputs where only some operands need gradients."""
    for shape, dtype in (((4, 5), torch.float32), ((2, 3, 7, 9), torch.float64), ((6,), torch.float32)):
        for xs_grad, w_grad in ((True, True), (False, True), (True, False), (False, False)):
            xs = [torch.randn(shape, dtype=dtype, requires_grad=xs_grad) for _ in range(3)]
            w = torch.randn(3, dtype=dtype, requires_grad=w_grad)
            yield xs, w


@pytest.mark.parametrize("args", list(sample_inputs()))
def test_opcheck_weighted_sum(args):
    opcheck(torch.ops.fastdarts.weighted_sum.default, args)


@pytest.mark.parametrize("shape,dtype", [((4, 5), torch.float32), ((2, 3, 7, 9), torch.float64)])
def test_opcheck_weighted_sum_backward(shape, dtype):
    xs = [torch.randn(shape, dtype=dtype) for _ in range(3)]
    args = (torch.randn(shape, dtype=dtype), xs, torch.randn(3, dtype=dtype))
    opcheck(torch.ops.fastdarts.weighted_sum_backward.default, args)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: ([], torch.randn(0)), "must not be empty"),
        (lambda: ([torch.randn(2, 3), torch.randn(3, 2)], torch.randn(2)), "has shape"),
        (lambda: ([torch.randn(2, 3), torch.randn(2, 3)], torch.randn(3)), "one weight per tensor"),
        (lambda: ([torch.randn(2, 3), torch.randn(2, 3).double()], torch.randn(2)), "dtype"),
        (lambda: ([torch.randn(2, 3, dtype=torch.float64)], torch.randn(1)), "dtype"),
        (lambda: ([torch.randint(0, 3, (2, 3))], torch.randn(1)), "float32 or float64"),
    ],
)
def test_bad_inputs_raise_clear_errors(make, message):
    xs, w = make()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastdarts.weighted_sum(xs, w)


@pytest.mark.slow
def test_compiles_fullgraph():
    def mixed(x, alpha):
        w = alpha.softmax(0)
        return ops.weighted_sum([x.relu(), x.sigmoid(), x * 2], w).sum()

    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    alpha = torch.randn(3, requires_grad=True)
    compiled = torch.compile(mixed, fullgraph=True, backend="aot_eager")
    expected = mixed(x, alpha)
    got = compiled(x, alpha)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got, [x, alpha]), torch.autograd.grad(expected, [x, alpha]))
