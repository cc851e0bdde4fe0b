"""DrNAS (METHODS_MORE.md section 4) against a direct transcription of its formulas."""

import io
import re

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Dirichlet

from fastdarts import search
from fastdarts.config import run_cli
from fastdarts.methods import DrNASMethod, make_method
from fastdarts.space import edge_index
from fastdarts.supernet import OpColumns, SearchCell, selected_columns

from .method_checks import (
    architect_grads,
    assert_search_resumes_bit_for_bit,
    candidate,
    cross_entropy_grads,
    hand_cell,
    published_settings,
    tiny_batch,
    tiny_network,
)
from .test_pcdarts import channel_shuffle

F64 = torch.float64
OPS7 = ("max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")


def transcribed_weights(alphas, seed, masks=None):
    """The published sampling: per edge (row) w_e = Dirichlet(elu(alpha_e) + 1).rsample() from the global generator,
    the cell types in turn; pruned ops (mask 0) set to 0 and the row renormalised."""
    torch.manual_seed(seed)
    out = []
    for i, alpha in enumerate(alphas):
        w = torch.stack([Dirichlet(F.elu(row) + 1).rsample() for row in alpha])
        if masks is not None:
            w = w * masks[i]
            w = w / w.sum(-1, keepdim=True)
        out.append(w)
    return out


def transcribed_pruning(alpha, keep=4):
    """Per edge, the `keep` largest alphas stay, the others become 0; the mask marks the kept ones."""
    mask = torch.zeros_like(alpha)
    for e, row in enumerate(alpha):
        for k in sorted(range(len(row)), key=lambda k: -row[k].item())[:keep]:
            mask[e, k] = 1.0
    return alpha.detach() * mask, mask


def test_weights_their_gradient_and_the_pruning_equal_the_transcription():
    alphas = [torch.randn(14, 7, dtype=F64, requires_grad=True) for _ in range(2)]
    arch = dict(zip(("normal", "reduce"), alphas))
    method = DrNASMethod(seed=4)
    assert method.primitives == OPS7
    got = method.forward_weights(arch)
    want = transcribed_weights(alphas, 4)
    upstream = torch.randn(14, 7, dtype=F64)
    for cell, w in zip(arch, want):
        assert got[cell].mask is None
        torch.testing.assert_close(got[cell].weights, w, rtol=1e-14, atol=1e-15)  # a batched draw's sums
        g = torch.autograd.grad((got[cell].weights * upstream).sum(), arch[cell])[0]
        torch.testing.assert_close(g, torch.autograd.grad((w * upstream).sum(), arch[cell])[0])

    method.set_epoch(25, 50)  # the second stage
    pruned = [transcribed_pruning(alpha) for alpha in alphas]
    with torch.no_grad():
        method.prepare_architecture(arch)
        method.prepare_architecture(arch)  # a second call (a resumed epoch) prunes nothing more
    for (alpha_want, mask), cell in zip(pruned, arch):
        assert torch.equal(arch[cell].detach(), alpha_want) and torch.equal(method.masks[cell], mask)
    fresh = DrNASMethod(seed=7)  # its first draws, with the masks of the second stage
    fresh.load_state_dict({"generator": torch.Generator().manual_seed(7).get_state(), "masks": method.masks})
    got = fresh.forward_weights(arch)
    want = transcribed_weights(alphas, 7, [mask for _, mask in pruned])
    for cell, w, (_, mask) in zip(arch, want, pruned):
        assert torch.equal(got[cell].mask, mask)
        torch.testing.assert_close(got[cell].weights, w, rtol=1e-14, atol=1e-15)  # a batched draw's sums
        assert torch.all((w == 0) == (mask == 0))
        g = torch.autograd.grad((got[cell].weights * upstream).sum(), arch[cell])[0]
        torch.testing.assert_close(g, torch.autograd.grad((w * upstream).sum(), arch[cell])[0])


def transcribed_kl(b):
    """KL(Dir(b) || Dir(1_K)) per row, in closed form: lnG(b0) - lnG(K) - sum lnG(b_k) + sum (b_k - 1)(psi(b_k) -
    psi(b0))."""
    b0 = b.sum(-1, keepdim=True)
    K = torch.tensor(float(b.shape[-1]), dtype=b.dtype)
    return (torch.lgamma(b0).squeeze(-1) - torch.lgamma(K) - torch.lgamma(b).sum(-1)
            + ((b - 1) * (torch.digamma(b) - torch.digamma(b0))).sum(-1))  # fmt: skip


def test_kl_regulariser_equals_the_closed_form():
    alphas = [torch.randn(14, 7, dtype=F64, requires_grad=True) for _ in range(2)]
    method = DrNASMethod(reg="kl", reg_scale=0.01)
    assert method.arch_weight_decay == 0.0 and DrNASMethod().arch_weight_decay == 1e-3
    assert DrNASMethod().regulariser() is None  # "l2" is a weight decay
    method.forward_weights(dict(zip(("normal", "reduce"), alphas)))
    got = method.regulariser()
    want = 0.01 * sum(transcribed_kl(F.elu(a) + 1).sum() for a in alphas)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, alphas), torch.autograd.grad(want, alphas)):
        torch.testing.assert_close(g, w)
    with pytest.raises(RuntimeError, match="no forward pass has run yet"):
        DrNASMethod(reg="kl").regulariser()


def transcribed_genotype(alpha, mask):
    """DARTS's rule on softmax(alpha), masked and renormalised: per node the two inputs with the highest best
    weight, each with its argmax op."""
    w = alpha.softmax(-1) * mask
    w = w / w.sum(-1, keepdim=True)
    gene = []
    for i in range(4):
        rows = [edge_index(i, j) for j in range(i + 2)]
        best = sorted(range(i + 2), key=lambda j: -w[rows[j]].max().item())[:2]
        gene += [(OPS7[int(w[rows[j]].argmax())], j) for j in best]
    return tuple(gene)


def test_genotype_rule_follows_the_kept_ops():
    alpha = torch.randn(14, 7)
    method = DrNASMethod()
    assert method.derive_cell_of("normal", alpha, 4) == transcribed_genotype(alpha, torch.ones(14, 7))
    method.set_epoch(1, 2)
    method.prepare_architecture({"normal": alpha})
    mask = method.masks["normal"]
    alpha += 3.0 * (1 - mask)  # trained on after pruning, a pruned op's alpha may grow: it stays out
    assert method.derive_cell_of("normal", alpha, 4) == transcribed_genotype(alpha, mask)
    torch.testing.assert_close(method.cell_edge_weights("normal", alpha).sum(-1), torch.ones(14))


def test_schedule_two_stages_each_with_its_warmup():
    method = DrNASMethod()
    rows = []
    for epoch in range(50):
        method.set_epoch(epoch, 50)
        rows.append((method.stage, method.trains_architecture()))
    frozen = [False] * 10 + [True] * 15
    assert rows == [(1, t) for t in frozen] + [(2, t) for t in frozen]
    method = DrNASMethod(warmup_epochs=0)
    method.set_epoch(7, 15)  # stages of 7 and 8 epochs
    assert method.epoch_settings() == {"stage": 2.0, "architecture_frozen": 0.0}
    assert set(method.diagnostics({"normal": torch.zeros(14, 7)})) == {"entropy_normal", "concentration_normal"}
    assert method.diagnostics({"normal": torch.zeros(14, 7)})["concentration_normal"] == 7.0


@pytest.mark.parametrize("reduction", [False, True], ids=["normal", "reduce"])
def test_pruned_cell_output_and_gradient_equal_the_transcription(reduction):
    cell = SearchCell(4, 4, 6, 6, 8, reduction, False, partial_channels=4).to(F64)
    s0, s1 = (torch.randn(2, 6, 8, 8, dtype=F64) for _ in range(2))
    alpha = torch.randn(14, 7, dtype=F64, requires_grad=True)
    method = DrNASMethod(seed=2)
    method.set_epoch(1, 2)
    method.prepare_architecture({"normal": alpha})
    weights = method.forward_weights({"normal": alpha})["normal"]
    spread = OpColumns(method.primitives)(weights)
    fused = cell(s0, s1, spread.weights, selected_columns(spread.mask))

    def edge_output(edge, row, x):  # the published MixedOp: only the kept ops, on the first C/4 channels
        xp, xb = x[:, : x.shape[1] // 4], x[:, x.shape[1] // 4 :]
        t = sum(weights.weights[row, k] * candidate(edge, name, xp) for k, name in enumerate(OPS7)
                if weights.weights[row, k] != 0)  # fmt: skip
        if edge.stride == 2:
            xb = torch.nn.MaxPool2d(2, 2)(xb)
        return channel_shuffle(torch.cat([t, xb], dim=1), 4)

    hand = hand_cell(cell, s0, s1, edge_output)
    torch.testing.assert_close(fused, hand)
    upstream = torch.randn_like(hand)
    (fused_grad,) = torch.autograd.grad((fused * upstream).sum(), alpha, retain_graph=True)  # the sample is shared
    (hand_grad,) = torch.autograd.grad((hand * upstream).sum(), alpha)
    torch.testing.assert_close(fused_grad, hand_grad)


def test_state_round_trip_and_bad_state():
    alpha = {"normal": torch.randn(14, 7), "reduce": torch.randn(14, 7)}
    method = DrNASMethod(seed=1)
    method.set_epoch(1, 2)
    method.prepare_architecture(alpha)
    method.forward_weights(alpha)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    expected = method.forward_weights(alpha)
    restored = DrNASMethod(seed=5)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer))
    restored.set_epoch(1, 2)
    got = restored.forward_weights(alpha)
    for cell in alpha:
        assert torch.equal(got[cell].weights, expected[cell].weights)
        assert torch.equal(got[cell].mask, expected[cell].mask)
    with pytest.raises(ValueError, match=r"drnas state must have the keys \['generator', 'masks'\]"):
        restored.load_state_dict({"masks": {}})
    with pytest.raises(ValueError, match="the masks must map cell types to 0/1 tensors"):
        restored.load_state_dict({"generator": restored.generator.get_state(), "masks": [1]})
    for settings, message in ((dict(prune_to=8), r"prune_to \(8\) cannot exceed the 7 ops"),
                              (dict(reg="l1"), "reg must be one of l2, kl"),
                              (dict(reg_scale=-1.0), "reg_scale must be a finite number >= 0"),
                              (dict(k=0), "k must be an integer >= 1")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            make_method("drnas", **settings)


@pytest.mark.slow
def test_drnas_search_prunes_at_the_second_stage_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    whole = assert_search_resumes_bit_for_bit(tmp_path, monkeypatch, method="drnas", init_channels=4,
                                              drnas_warmup_epochs=0, drnas_reg="kl")  # fmt: skip
    assert [row["stage"] for row in whole.history] == [1.0, 2.0]
    assert [row["entropy_normal"] < 1.3863 + 1e-4 for row in whole.history] == [False, True]  # 4 ops: at most ln 4


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "pc-darts", "--drnas_reg", "kl"], "drnas_reg is an option of --method drnas, not of pc-darts"),
        (["--method", "drnas", "--drnas_prune_to", "8"], "drnas_prune_to must be <= 7"),
        (["--method", "drnas", "--drnas_k", "3", "--init_channels", "8"], r"init_channels \(8\) must be a multiple"),
    ],
)
def test_bad_drnas_options_give_one_line_and_status_2(args, message, capsys):
    assert run_cli(search.main, args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_drnas_starts_from_its_published_cifar10_settings():
    assert published_settings("drnas") == dict(
        batch_size=64,
        epochs=50,
        init_channels=36,
        layers=20,
        learning_rate=0.1,
        arch_learning_rate=6e-4,
        arch_beta1=0.5,
    )


def test_architecture_gradient_is_the_cross_entropy_s_plus_the_kl_term_s():
    net = tiny_network(DrNASMethod(k=2, reg="kl", reg_scale=0.1, seed=3))  # C=2: the ops compute on 1 channel
    batch = tiny_batch()
    state = net.method.state_dict()
    grads, objective = architect_grads(net, batch)
    net.method.load_state_dict(state)  # the same Dirichlet draws
    ce_grads, ce = cross_entropy_grads(net, batch)
    alphas = dict(zip(("normal", "reduce"), net.arch_parameters()))
    kl = 0.1 * sum(transcribed_kl(F.elu(a) + 1).sum() for a in alphas.values())
    assert objective.item() == pytest.approx((ce + kl).item(), rel=1e-6)
    for cell, g in zip(alphas, torch.autograd.grad(kl, list(alphas.values()))):
        torch.testing.assert_close(grads[cell], ce_grads[cell] + g)
