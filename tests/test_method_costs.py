"""What a step of a sampling or partial-channel method skips, counted in FLOPs (not timed): GDAS computes the
sampled op of each edge alone, PC-DARTS and DrNAS its ops on 1/K of the channels. Counted on the reference backend,
whose convolutions torch.utils.flop_counter sees (the fused kernels compute the same convolutions)."""

import re

import pytest
import torch

from benchmarks._device import count_flops
from fastdarts import PRIMITIVES, ops
from fastdarts.errors import ConfigError
from fastdarts.methods import GDASMethod
from fastdarts.supernet import OpColumns, SearchCell, selected_columns

COMPUTED = [c for c, name in enumerate(PRIMITIVES) if name != "none"]


def edge_flops(cell, weights, columns=None):
    """FLOPs of the cell's edges, forward and backward (the cell's minus its preprocessing's)."""
    s0, s1 = (torch.randn(2, 16, 8, 8) for _ in range(2))

    def cell_step():
        cell(s0, s1, weights, columns).sum().backward()

    def preprocess_step():
        (cell.preprocess0(s0).sum() + cell.preprocess1(s1).sum()).backward()

    with ops.use_backend("reference"):
        return count_flops(cell_step) - count_flops(preprocess_step)


@pytest.mark.parametrize("reduction", [False, True], ids=["normal", "reduce"])
def test_partial_channels_compute_at_most_a_quarter_of_the_edge_flops(reduction):
    weights = torch.rand(14, 8, requires_grad=True)
    darts = edge_flops(SearchCell(4, 4, 16, 16, 16, reduction, False), weights)
    partial = edge_flops(SearchCell(4, 4, 16, 16, 16, reduction, False, partial_channels=4), weights)
    # Depthwise convs shrink with the channels (1/4), 1x1 convs with their square (1/16).
    assert darts / 16 <= partial <= darts / 4


def test_gdas_computes_the_sampled_op_of_each_edge_alone():
    cell = SearchCell(4, 4, 16, 16, 16, False, False)
    weights = torch.rand(14, 8, requires_grad=True)
    # Every normal-cell edge has the same input shape: op k costs the same on each.
    cost = {c: edge_flops(cell, weights, [[c]] * 14) / 14 for c in COMPUTED}
    assert edge_flops(cell, weights) == pytest.approx(14 * sum(cost.values()), rel=1e-6)
    alpha = torch.randn(14, 8, requires_grad=True)
    sample = OpColumns(GDASMethod.primitives)(GDASMethod(seed=3).forward_weights({"normal": alpha})["normal"])
    columns = selected_columns(sample.mask)
    expected = sum(cost[c] for cols in columns for c in cols)
    assert edge_flops(cell, sample.weights, columns) == pytest.approx(expected, rel=1e-6)
    assert expected < max(cost.values()) * 14 < edge_flops(cell, weights)


def test_step_flops_script_counts_each_method_against_darts(capsys):
    from benchmarks.step_flops import main

    assert main(["--methods", "darts,pc-darts,gdas", "--batch", "2", "--size", "8", "--samples", "2"]) == 0
    shares = dict(re.findall(r"^([\w-]+): .*, (\d\.\d{3}) of DARTS's$", capsys.readouterr().out, re.M))
    assert shares["darts"] == "1.000" and 0 < float(shares["pc-darts"]) < 0.5 and 0 < float(shares["gdas"]) < 0.5
    assert main(["--space", "rnn", "--batch", "2", "--nhid", "8", "--bptt", "3", "--ntoken", "20"]) == 0
    assert re.search(r"alpha step [\d.]+ GFLOP, weight step [\d.]+ GFLOP", capsys.readouterr().out)
    with pytest.raises(ConfigError, match="--methods must start with darts"):
        main(["--methods", "gdas"])
