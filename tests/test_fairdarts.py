"""Fair DARTS against a direct transcription of METHODS_MORE.md section 3."""

import math

import pytest
import torch

from fastdarts.analyze import describe_cell
from fastdarts.config import TrainConfig
from fastdarts.evalnet import NetworkCIFAR
from fastdarts.methods import FairDARTSMethod
from fastdarts.space import PRIMITIVES

from .method_checks import architect_grads, cross_entropy_grads, tiny_batch, tiny_network

SEVEN = ("max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3",
         "dil_conv_5x5")  # fmt: skip


def threshold_sparse(weights, steps, threshold):
    """The published rule as (op, node, input) triples: per node the top-2 edges by max weight, each kept only
    when its best weight reaches the threshold."""
    triples, start = [], 0
    for i in range(steps):
        rows = weights[start : start + i + 2].tolist()
        for j in sorted(range(i + 2), key=lambda j: -max(rows[j]))[:2]:
            k = rows[j].index(max(rows[j]))
            if rows[j][k] >= threshold:
                triples.append((SEVEN[k], i + 2, j))
        start += i + 2
    return triples


@pytest.mark.parametrize("form", ["l2", "l1"])
def test_weights_regulariser_gradient_and_genotype_follow_the_formulas(form):
    method = FairDARTSMethod(zero_one_form=form)
    assert method.primitives == SEVEN == tuple(p for p in PRIMITIVES if p != "none")
    net = tiny_network(method)
    assert net.alpha_normal.shape == (14, 7) and not net.alpha_normal.any()  # every weight starts at 0.5
    with torch.no_grad():
        for alpha in net.arch_parameters():
            alpha.normal_(std=2.0)
    arch = net.arch_parameters_by_cell()
    weights = method.forward_weights(arch)
    for cell, alpha in arch.items():
        torch.testing.assert_close(weights[cell].weights, 1 / (1 + torch.exp(-alpha)))  # unnormalised
    s = 1 / (1 + torch.exp(-torch.cat([net.alpha_normal, net.alpha_reduce])))
    distance = (s - 0.5) ** 2 if form == "l2" else (s - 0.5).abs()
    expected = 10.0 * -(distance.sum() / 196)
    torch.testing.assert_close(method.regulariser(), expected)

    batch = tiny_batch()
    grads, objective = architect_grads(net, batch)
    ce_grads, ce = cross_entropy_grads(net, batch)
    torch.testing.assert_close(objective, ce + expected.detach())
    for cell, alpha in arch.items():
        p = alpha.detach().sigmoid()
        d_distance = 2 * (p - 0.5) if form == "l2" else (p - 0.5).sign()
        torch.testing.assert_close(grads[cell], ce_grads[cell] - 10.0 / 196 * d_distance * p * (1 - p))


def test_genotype_keeps_only_ops_above_the_threshold_and_drops_empty_nodes_from_the_concat():
    net = tiny_network(FairDARTSMethod())
    with torch.no_grad():
        net.alpha_normal.uniform_(-3.0, 1.5)  # sigmoid up to 0.82: below the threshold
        net.alpha_normal[0, 3] = 3.0  # node 0: one edge above (sep_conv_3x3 from input 0)
        net.alpha_normal[2, 6], net.alpha_normal[4, 2] = 2.5, 4.0  # node 1: two edges above
        net.alpha_normal[7, 0], net.alpha_normal[8, 0] = 2.0, 2.0  # node 2: a tie, the lower input first
        net.alpha_reduce.uniform_(-3.0, 1.5)  # no op reaches the threshold anywhere
    genotype = net.genotype()
    for cell, alpha in (("normal", net.alpha_normal), ("reduce", net.alpha_reduce)):
        triples = threshold_sparse(alpha.sigmoid(), 4, 0.85)
        edges = getattr(genotype, cell)
        assert [(op, 2 + k // 2, j) for k, (op, j) in enumerate(edges) if op != "none"] == triples
    assert genotype.normal[:6] == (("sep_conv_3x3", 0), ("none", 1), ("skip_connect", 2), ("dil_conv_5x5", 0),
                                   ("max_pool_3x3", 2), ("max_pool_3x3", 3))  # fmt: skip
    assert genotype.normal_concat == (2, 3, 4)  # node 5 has no op
    assert genotype.reduce_concat == (2, 3, 4, 5)  # no node has one: all stay, as zeros
    # Width and depth count the edges that have an op.
    assert describe_cell(genotype, "normal")["width_c"] == 1 + 0.5 + 0
    assert describe_cell(genotype, "normal")["depth"] == 4  # input 0 -> node 2 -> node 3 -> node 4 -> the output
    assert describe_cell(genotype, "reduce")["depth"] == 0
    # fastdarts.train accepts it and builds its network.
    assert TrainConfig(genotype=str(genotype)).resolved().cell() == genotype
    out = NetworkCIFAR(genotype, C=4, num_classes=5, layers=3, in_channels=3)(torch.randn(2, 3, 8, 8))
    assert out[0].shape == (2, 5)


def test_diagnostics_and_bad_settings():
    method = FairDARTSMethod()
    alpha = torch.tensor([[0.0, 10.0, -10.0, 0.0, 0.0, 0.0, 0.0]]).repeat(14, 1)
    figures = method.diagnostics({"normal": alpha})
    assert figures["above_threshold_normal"] == pytest.approx(1 / 7)
    assert figures["entropy_normal"] == pytest.approx(5 / 7 * math.log(2), abs=1e-3)  # five weights at 0.5
    with pytest.raises(ValueError, match="FairDARTSMethod: threshold must be a number in \\(0, 1\\), got 1.5"):
        FairDARTSMethod(threshold=1.5)
    with pytest.raises(ValueError, match="zero_one_form must be one of l2, l1"):
        FairDARTSMethod(zero_one_form="l3")
