"""What the faithfulness tests of the methods share: a tiny supernet and batch, the architecture gradient the
Architect computes, a direct transcription of DARTS's genotype rule (METHODS_MORE.md, "DARTS rule"), a search
cell's forward written out edge by edge with eager modules, and a tiny search stopped, resumed and compared with
the same search run whole."""

import re

import torch
import torch.nn.functional as F

from fastdarts import SearchNetwork, search
from fastdarts.bilevel import Architect
from fastdarts.checkpoint import load_checkpoint
from fastdarts.config import SearchConfig, TrainConfig, run_cli
from fastdarts.supernet import SearchCell

from .test_runs import SEARCH, assert_same_end


def tiny_network(method, seed=0):
    torch.manual_seed(seed)
    return SearchNetwork(C=2, num_classes=5, layers=3, in_channels=3, method=method)


def tiny_batch(seed=1, size=4):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 8, 8, generator=generator), torch.randint(0, 5, (size,), generator=generator)


def architect_grads(net, batch):
    """The first-order architecture gradient, by cell type, and the objective the Architect differentiates."""
    architect = Architect(net, torch.optim.SGD(net.weight_parameters(), 0.1))
    grads, objective = architect.first_order_grads(batch)
    return dict(zip(("normal", "reduce"), grads)), objective


def cross_entropy_grads(net, batch):
    """The gradient of the cross-entropy alone (no regulariser), by cell type, and the cross-entropy."""
    loss = F.cross_entropy(net(batch[0]), batch[1])
    grads = torch.autograd.grad(loss, net.arch_parameters())
    return dict(zip(("normal", "reduce"), grads)), loss.detach()


def darts_rule(weights, steps, names):
    """quark0/darts's derivation: per node, the 2 inputs with the largest non-`none` weight (stable sort), on each
    the first non-`none` op of largest weight (strict >)."""
    gene, start = [], 0
    for i in range(steps):
        rows = weights[start : start + i + 2].tolist()
        strongest = [max(w for w, name in zip(row, names) if name != "none") for row in rows]
        for j in sorted(range(i + 2), key=lambda j: -strongest[j])[:2]:
            best = None
            for k, name in enumerate(names):
                if name != "none" and (best is None or rows[j][k] > rows[j][best]):
                    best = k
            gene.append((names[best], j))
        start += i + 2
    return tuple(gene)


# The ops a MixedOp holds, in the order of its `candidates` (every primitive but `none`).
COMPUTED = ("max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3",
            "dil_conv_5x5")  # fmt: skip


def candidate(edge, name: str, x: torch.Tensor) -> torch.Tensor:
    """Op `name` of a MixedOp on x, run by its own eager modules."""
    return edge.candidates[COMPUTED.index(name)](x)


def hand_cell(cell: SearchCell, s0: torch.Tensor, s1: torch.Tensor, edge_output) -> torch.Tensor:
    """A search cell's output with each edge's output given by `edge_output(edge, row, x)` (row: the edge's row in
    the architecture tensors): preprocess, nodes as sums over their inputs, the last `multiplier` nodes concatenated."""
    states = [cell.preprocess0(s0), cell.preprocess1(s1)]
    for node in range(cell.steps):
        start = node * (node + 3) // 2
        states.append(sum(edge_output(cell.edges[start + j], start + j, h) for j, h in enumerate(states)))
    return torch.cat(states[-cell.multiplier :], dim=1)


def assert_same_state(a, b, where="method") -> None:
    """Two method states (nested mappings of tensors and numbers) hold the same values, bit for bit."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    else:
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b)), where


def assert_search_resumes_bit_for_bit(tmp_path, monkeypatch, **settings) -> search.SearchResult:
    """A two-epoch tiny search with `settings`, stopped after one epoch and resumed, ends as the uninterrupted one
    does; its genotype is one `fastdarts.train` accepts. Returns the whole run. (Without the end's pictures, which
    take most of a tiny run's time and are tested with DARTS.)"""
    monkeypatch.setattr(search, "plot_run", lambda *args: None)
    monkeypatch.setattr(search, "write_cell_diagrams", lambda *args: None)
    settings = {**SEARCH, **settings}
    whole = search.run(**settings, out=str(tmp_path / "whole"))
    first = search.run(**settings, stop_after=1, out=str(tmp_path / "split"))
    assert first.stopped_early
    resumed = search.run(resume=tmp_path / "split", progress=False)
    assert_same_end(whole.run_dir, resumed.run_dir)
    assert_same_state(*(load_checkpoint(run / "checkpoint.pt")["method"] for run in (whole.run_dir, resumed.run_dir)))
    assert resumed.genotype == whole.genotype
    assert TrainConfig(genotype=str(whole.run_dir)).cell() == whole.genotype
    return whole


def published_settings(method: str) -> dict:
    """The search settings a method starts from on CIFAR-10 (fields a preset fills)."""
    config = SearchConfig(dataset="cifar10", data="/cifar", method=method).resolved()
    names = ("batch_size", "epochs", "init_channels", "layers", "learning_rate", "arch_learning_rate", "arch_beta1")
    return {name: getattr(config, name) for name in names}


def assert_search_refuses(args, message: str, capsys) -> None:
    """`python -m fastdarts.search ARGS` exits with status 2 and one line of stderr that matches `message` (a
    regular expression)."""
    assert run_cli(search.main, args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
