"""DARTS- against a direct transcription of METHODS_MORE.md section 5."""

import copy
import math

import pytest
import torch

from fastdarts import ops
from fastdarts.methods import DARTSMinusMethod
from fastdarts.space import FactorizedReduce

from .conftest import requires_ext
from .method_checks import architect_grads, cross_entropy_grads, darts_rule, tiny_batch, tiny_network


def transcribed_cell(cell, s0, s1, weights, beta):
    """The published MixedOp in a DARTS cell: `sum_k w_k op_k(x) + beta aux(x)`, aux the identity on stride 1 and
    the edge's own FactorizedReduce on stride 2 (column 0 of `weights` is `none`)."""
    states = [cell.preprocess0(s0), cell.preprocess1(s1)]
    row = 0
    for _ in range(cell.steps):
        node = 0
        for h in states:
            edge = cell.edges[row]
            mixed = sum(weights[row, 1 + k] * op(h) for k, op in enumerate(edge.candidates))
            node = node + mixed + beta * (h if edge.stride == 1 else edge.auxiliary(h))
            row += 1
        states.append(node)
    return torch.cat(states[-cell.multiplier :], dim=1)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
@pytest.mark.parametrize("reduction", [False, True], ids=["normal", "reduce"])
def test_the_cell_adds_the_weighted_auxiliary_skip_to_every_edge(reduction, backend):
    net = tiny_network(DARTSMinusMethod())
    cell = net.cells[1 if reduction else 0]
    assert cell.reduction == reduction
    for edge in cell.edges:
        assert isinstance(edge.auxiliary, FactorizedReduce) if edge.stride == 2 else edge.auxiliary is None
    eager = copy.deepcopy(cell)
    s0 = torch.randn(2, cell.preprocess0[1].in_channels, 6, 6)
    s1 = torch.randn(2, cell.preprocess1[1].in_channels, 6, 6)
    alpha = torch.randn(14, 8, requires_grad=True)
    beta = 0.37
    with ops.use_backend(backend):
        fused = cell(s0, s1, alpha.softmax(-1), None, beta)
    expected = transcribed_cell(eager, s0, s1, alpha.softmax(-1), beta)
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-5)
    grad_out = torch.randn_like(fused)
    params = [alpha, *cell.parameters()]
    fused_grads = torch.autograd.grad(fused, params, grad_out, allow_unused=True)
    eager_grads = torch.autograd.grad(expected, [alpha, *eager.parameters()], grad_out, allow_unused=True)
    for (name, _), a, b in zip([("alpha", None), *cell.named_parameters()], fused_grads, eager_grads):
        if b is None:
            assert a is None or not a.any(), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_weights_schedule_gradient_and_genotype_follow_the_formulas():
    method = DARTSMinusMethod()
    net = tiny_network(method)
    with torch.no_grad():
        for alpha in net.arch_parameters():
            alpha.normal_()
    method.set_epoch(10, 50)  # beta_e = (50 - e) / 50
    assert method.auxiliary_weight == 0.8 and method.epoch_settings() == {"auxiliary_skip": 0.8}
    arch = net.arch_parameters_by_cell()
    weights = method.forward_weights(arch)
    for cell, alpha in arch.items():
        torch.testing.assert_close(weights[cell].weights, torch.exp(alpha) / torch.exp(alpha).sum(1, keepdim=True))
    assert method.auxiliary_skip() == 0.8 and method.regulariser() is None
    # beta is a constant: the architecture gradient is the cross-entropy's through the softmax.
    batch = tiny_batch()
    grads, _ = architect_grads(net, batch)
    ce_grads, _ = cross_entropy_grads(net, batch)
    for cell, alpha in arch.items():
        torch.testing.assert_close(grads[cell], ce_grads[cell])
        assert method.derive_cell(alpha, 4) == darts_rule(alpha.softmax(-1), 4, method.primitives)


@pytest.mark.parametrize(
    "decay,expected",
    [
        ("linear", 0.98),
        ("cosine", (1 + math.cos(math.pi / 50)) / 2),
        ("slow_cosine", math.cos(math.pi / 100)),
        ("none", 1.0),
    ],  # fmt: skip
)
def test_decays_state_and_bad_settings(decay, expected):
    method = DARTSMinusMethod(beta=2.0, decay=decay)
    method.set_epoch(1, 50)
    assert method.auxiliary_weight == pytest.approx(2.0 * expected)
    other = DARTSMinusMethod()
    other.load_state_dict(method.state_dict())
    assert other.auxiliary_weight == method.auxiliary_weight
    with pytest.raises(ValueError, match="DARTSMinusMethod: decay must be one of linear, cosine"):
        DARTSMinusMethod(decay="step")
