"""PC-DARTS (METHODS_MORE.md section 1) against a direct transcription of its formulas."""

import pytest
import torch

from fastdarts import PRIMITIVES, SearchNetwork, ops
from fastdarts.checkpoint import load_checkpoint
from fastdarts.methods import PCDARTSMethod, make_method
from fastdarts.ops.reference import partial_channel_edge
from fastdarts.space import edge_index
from fastdarts.supernet import SearchCell

from .conftest import requires_ext
from .method_checks import (
    COMPUTED,
    assert_search_refuses,
    assert_search_resumes_bit_for_bit,
    candidate,
    hand_cell,
    published_settings,
)

F64 = torch.float64
OFFSETS = (0, 2, 5, 9)  # the first row of each node's inputs


def transcribed_weights(alpha):
    """w = softmax(alpha) over the ops; w2[o_i + j] = softmax(beta[o_i : o_i + i + 2])_j."""
    w = torch.softmax(alpha[:, :8], dim=-1)
    beta = alpha[:, 8]
    w2 = torch.cat([torch.softmax(beta[o : o + i + 2], dim=-1) for i, o in enumerate(OFFSETS)])
    return w, w2


def channel_shuffle(x, groups):
    """The published channel_shuffle: view as (B, groups, C / groups, H, W), swap dims 1 and 2, flatten."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


def pc_edge(w, w2, k=4):
    """The published MixedOp times the edge's weight: the ops on the first C/k channels, the bypass (2x2 max pool on
    a stride-2 edge), concatenated and shuffled."""

    def edge_output(edge, row, x):
        dim = x.shape[1] // k
        xp, xb = x[:, :dim], x[:, dim:]
        t = sum(w[row, PRIMITIVES.index(name)] * candidate(edge, name, xp) for name in COMPUTED)
        if edge.stride == 2:
            xb = torch.nn.MaxPool2d(2, 2)(xb)
        return w2[row] * channel_shuffle(torch.cat([t, xb], dim=1), k)

    return edge_output


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
@pytest.mark.parametrize("reduction", [False, True], ids=["normal", "reduce"])
def test_cell_output_and_gradients_equal_the_transcription(reduction, backend):
    C = 8  # the ops compute on 2 channels
    cell = SearchCell(4, 4, 6, 6, C, reduction, False, partial_channels=4).to(F64)
    s0, s1 = (torch.randn(2, 6, 8, 8, dtype=F64, requires_grad=True) for _ in range(2))
    alpha = torch.randn(14, 9, dtype=F64, requires_grad=True)
    weights = PCDARTSMethod().forward_weights({"normal": alpha})["normal"]
    with ops.use_backend(backend):
        fused = cell(s0, s1, weights.weights, edge_scale=weights.edge_scale)
    hand = hand_cell(cell, s0, s1, pc_edge(*transcribed_weights(alpha)))
    torch.testing.assert_close(fused, hand)
    upstream = torch.randn_like(hand)
    inputs = [alpha, s0, s1, *cell.parameters()]
    fused_grads = torch.autograd.grad((fused * upstream).sum(), inputs)
    hand_grads = torch.autograd.grad((hand * upstream).sum(), inputs)
    for got, want in zip(fused_grads, hand_grads):
        torch.testing.assert_close(got, want)
    assert fused_grads[0][:, 8].abs().sum() > 0  # beta is learned


@pytest.mark.parametrize("groups,c,side", [(4, 2, 8), (2, 3, 5), (6, 1, 3)])
def test_partial_channel_edge_is_the_concatenation_shuffled(groups, c, side):
    out = torch.randn(2, c, side, side, dtype=F64, requires_grad=True)
    bypass = torch.randn(2, c * (groups - 1), side, side, dtype=F64, requires_grad=True)
    got = partial_channel_edge(out, bypass, groups)
    want = channel_shuffle(torch.cat([out, bypass], dim=1), groups)
    assert torch.equal(got, want)
    upstream = torch.randn_like(want)
    for g, w in zip(torch.autograd.grad((got * upstream).sum(), [out, bypass]),
                    torch.autograd.grad((want * upstream).sum(), [out, bypass])):  # fmt: skip
        assert torch.equal(g, w)
    assert torch.autograd.gradcheck(lambda o, b: partial_channel_edge(o, b, groups), (out, bypass))


def test_an_odd_side_keeps_its_last_row_and_column_in_the_bypass():
    cell = SearchCell(2, 2, 4, 4, 4, True, False, partial_channels=2)
    out = cell(torch.randn(2, 4, 7, 7), torch.randn(2, 4, 7, 7), torch.rand(5, 8))
    assert out.shape == (2, 8, 4, 4)


def test_weights_and_genotype_equal_the_transcription():
    net = SearchNetwork(C=4, num_classes=10, layers=3, in_channels=1, method=PCDARTSMethod())
    assert net.alpha_normal.shape == (14, 9) and net.cells[0].edges[0].candidates[3][0][1].in_channels == 1
    with torch.no_grad():
        for alpha in net.arch_parameters():
            alpha.normal_()
    method = net.method
    for alpha in net.arch_parameters():
        w, w2 = transcribed_weights(alpha)
        got = method.forward_weights({"cell": alpha})["cell"]
        torch.testing.assert_close(got.weights, w, rtol=0, atol=0)
        torch.testing.assert_close(got.edge_scale, w2, rtol=0, atol=0)
        assert got.mask is None
    genotype = net.genotype()
    for cell, alpha in (("normal", net.alpha_normal), ("reduce", net.alpha_reduce)):
        w, w2 = transcribed_weights(alpha.detach())
        gene = []
        for i in range(4):
            rows = range(edge_index(i, 0), edge_index(i, 0) + i + 2)
            score = {j: max(w[r, c] * w2[r] for c in range(1, 8)).item() for j, r in enumerate(rows)}
            for j in sorted(score, key=lambda j: -score[j])[:2]:
                gene.append((PRIMITIVES[1 + int(w[rows[j], 1:].argmax())], j))
        assert getattr(genotype, cell) == tuple(gene)


def test_edge_normalisation_decides_which_inputs_a_node_keeps():
    alpha = torch.zeros(14, 9)
    alpha[0:2, PRIMITIVES.index("sep_conv_3x3")] = 1.0  # node 0: input 1's best op is the strongest ...
    alpha[1, PRIMITIVES.index("sep_conv_3x3")] = 2.0
    alpha[0, 8] = 3.0  # ... but input 0's edge weight w2 outweighs it
    cell = PCDARTSMethod().derive_cell(alpha, 4)
    assert cell[:2] == (("sep_conv_3x3", 0), ("sep_conv_3x3", 1))
    alpha[0, 8] = 0.0
    assert PCDARTSMethod().derive_cell(alpha, 4)[:2] == (("sep_conv_3x3", 1), ("sep_conv_3x3", 0))


def test_warmup_freezes_the_architecture_for_the_published_share():
    method = PCDARTSMethod()
    frozen = []
    for epoch in range(50):
        method.set_epoch(epoch, 50)
        frozen.append(not method.trains_architecture())
    assert frozen == [True] * 15 + [False] * 35
    method.set_epoch(4, 15)  # 15 * 15 // 50 = 4 frozen epochs
    assert method.trains_architecture() and method.epoch_settings() == {"architecture_frozen": 0.0}
    method = PCDARTSMethod(warmup_epochs=2)
    method.set_epoch(1, 3)
    assert not method.trains_architecture()
    assert set(method.diagnostics({"normal": torch.randn(14, 9)})) == {"entropy_normal", "input_entropy_normal"}
    for settings, message in ((dict(k=0), "k must be an integer >= 1"),
                              (dict(warmup_epochs=-1), "warmup_epochs must be None or an integer >= 0")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            make_method("pc-darts", **settings)


@pytest.mark.slow
def test_pcdarts_search_freezes_then_resumes_bit_for_bit(tmp_path, monkeypatch):
    whole = assert_search_resumes_bit_for_bit(tmp_path, monkeypatch, method="pc-darts", init_channels=4,
                                              pcdarts_warmup_epochs=1)  # fmt: skip
    assert [row["architecture_frozen"] for row in whole.history] == [1.0, 0.0]
    # The architecture stepped in the second epoch alone: its 6 steps (718 training images, batch 128).
    adam = load_checkpoint(whole.run_dir / "checkpoint.pt")["arch_optimizer"]["state"]
    assert [float(state["step"]) for state in adam.values()] == [6.0, 6.0]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "gdas", "--pcdarts_k", "2"], "pcdarts_k is an option of --method pc-darts, not of gdas"),
        (["--method", "pc-darts", "--init_channels", "6"], r"init_channels \(6\) must be a multiple of 4"),
    ],
)
def test_bad_pcdarts_options_give_one_line_and_status_2(args, message, capsys):
    assert_search_refuses(args, message, capsys)


def test_pcdarts_starts_from_its_published_cifar10_settings():
    assert published_settings("pc-darts") == dict(
        batch_size=256,
        epochs=50,
        init_channels=16,
        layers=8,
        learning_rate=0.1,
        arch_learning_rate=6e-4,
        arch_beta1=0.5,
    )
