"""The Triton rnn_mixed_node against the reference, on CPU tensors under Triton's interpreter (tiny shapes)."""

import pytest
import torch
from torch.library import opcheck

# test_triton first: it sets TRITON_INTERPRET while fastdarts (and triton) import, when this module runs alone. Its
# autouse fixture `interpret` and its skip `pytestmark` apply here too.
from .test_triton import interpret, pytestmark  # noqa: F401

# isort: split
from fastdarts import ops

from .test_rnn_mixed_node import BAD, make_inputs


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (8, 3, 11), (2, 40, 30)])  # the last spans two blocks
@pytest.mark.parametrize("dtype,tol", [(torch.float32, dict(rtol=1e-4, atol=1e-5)),
                                       (torch.float64, dict(rtol=1e-10, atol=1e-10))])  # fmt: skip
def test_triton_matches_reference_in_values_and_gradients(shape, dtype, tol):
    inputs = make_inputs(*shape, dtype)
    expected = ops.rnn_mixed_node(*inputs, backend="reference")
    got = ops.rnn_mixed_node(*inputs, backend="triton")
    torch.testing.assert_close(got, expected, **tol)
    grad = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(a, b, **tol)


def test_triton_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 3, 4), (2, 3, 8))]
    p = torch.randn(2, 5, generator=g, dtype=torch.float64).softmax(-1)
    inputs = [t.requires_grad_() for t in (*inputs, p)]
    assert torch.autograd.gradcheck(lambda *a: ops.rnn_mixed_node(*a, backend="triton"), inputs)


def test_triton_opcheck():
    states, ch, p = make_inputs(2, 3, 4)
    opcheck(torch.ops.fastdarts_triton.rnn_mixed_node.default, (states, ch, p),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))  # fmt: skip
    opcheck(torch.ops.fastdarts_triton.rnn_mixed_node_backward.default,
            (torch.randn(3, 4), *make_inputs(2, 3, 4, requires_grad=False)),
            test_utils=("test_schema", "test_faketensor"))  # fmt: skip


@pytest.mark.parametrize("change,error,message", BAD)
def test_triton_bad_arguments(change, error, message):
    with pytest.raises(error, match=message):
        ops.rnn_mixed_node(*change(*make_inputs(3, 4, 5, requires_grad=False)), backend="triton")
