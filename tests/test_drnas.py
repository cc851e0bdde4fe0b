"""DrNAS (METHODS_MORE.md section 4) against a direct transcription of its formulas."""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Dirichlet

from fastdarts import search
from fastdarts.checkpoint import load_checkpoint
from fastdarts.config import SearchConfig, TrainConfig
from fastdarts.methods import DrNASMethod, make_method
from fastdarts.space import edge_index
from fastdarts.supernet import (
    MixedOp,
    OpColumns,
    SearchCell,
    SearchNetwork,
    selected_columns,
    widen_partial_channels,
    widened,
)

from .method_checks import (
    architect_grads,
    assert_same_state,
    assert_search_refuses,
    assert_search_resumes_bit_for_bit,
    candidate,
    cross_entropy_grads,
    hand_cell,
    published_settings,
    tiny_batch,
    tiny_network,
)
from .test_pcdarts import channel_shuffle
from .test_runs import SEARCH, assert_same_end

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
        (["--method", "drnas", "--drnas_k_first", "6"], r"must be a multiple of 6 \(drnas_k_first\)"),
        (["--method", "drnas", "--drnas_k_first", "2"], r"drnas_k_first \(2\) must be at least drnas_k \(4\)"),
        (["--method", "drnas", "--drnas_k_first", "8", "--epochs", "1"], r"widens the network .* needs epochs >= 2"),
        (["--method", "pc-darts", "--drnas_k_first", "8"], "drnas_k_first is an option of --method drnas"),
    ],
)
def test_bad_drnas_options_give_one_line_and_status_2(args, message, capsys):
    assert_search_refuses(args, message, capsys)


def test_drnas_starts_from_its_published_cifar10_settings():
    assert SearchConfig(dataset="cifar10", data="/cifar", method="drnas").resolved().drnas_k_first == 6
    digits = SearchConfig(method="drnas").resolved()  # 8 channels: one factor, 4
    assert digits.drnas_k_first is None and not make_method("drnas", **digits.method_settings()).widens_network
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


# Progressive widening (METHODS_MORE.md 4a, the published net2wider.py and operations.py's `wider` methods) --------


def published_wider(state, stride, old, new, generator):
    """The published MixedOp.wider(k) on one edge's state dict (ops on `old` channels, widened to `new`): per op in
    turn, each new channel a copy of an old one drawn by torch.randint, appended (InChannelWider, OutChannelWider,
    BNWider). A pointwise conv's new input columns copy the depthwise conv's drawn channels, undivided. The one
    deliberate difference: a FactorizedReduce's BN follows the copies of each of its two halves."""
    n, want = new - old, dict(state)

    def draw(high, count):
        return torch.randint(high, (count,), generator=generator)

    def bn(prefix, index):
        for name in ("running_mean", "running_var"):
            want[f"{prefix}.{name}"] = torch.cat([state[f"{prefix}.{name}"], state[f"{prefix}.{name}"][index]])

    def dil_conv(prefix):
        index = draw(old, n)
        want[f"{prefix}.1.weight"] = torch.cat([state[f"{prefix}.1.weight"], state[f"{prefix}.1.weight"][index]])
        pointwise = torch.cat([state[f"{prefix}.2.weight"], state[f"{prefix}.2.weight"][:, index]], dim=1)
        index = draw(old, n)
        want[f"{prefix}.2.weight"] = torch.cat([pointwise, pointwise[index]])
        bn(f"{prefix}.3", index)

    bn("candidates.0.1", draw(old, n))  # max_pool_3x3's BN
    bn("candidates.1.1", draw(old, n))  # avg_pool_3x3's BN
    if stride == 2:  # skip_connect: a FactorizedReduce
        halves = []
        for conv in ("conv_1", "conv_2"):
            w = state[f"candidates.2.{conv}.weight"]
            w = torch.cat([w, w[:, draw(old, n)]], dim=1)
            halves.append(draw(old // 2, n // 2))
            want[f"candidates.2.{conv}.weight"] = torch.cat([w, w[halves[-1]]])
        h = old // 2
        for name in ("running_mean", "running_var"):
            m = state[f"candidates.2.bn.{name}"]
            want[f"candidates.2.bn.{name}"] = torch.cat([m[:h], m[:h][halves[0]], m[h:], m[h:][halves[1]]])
    for prefix in ("candidates.3.0", "candidates.3.1", "candidates.4.0", "candidates.4.1", "candidates.5",
                   "candidates.6"):  # fmt: skip
        dil_conv(prefix)
    return want


def widening_network(dtype=torch.float32):
    """A tiny supernet whose ops compute on 1/4 of the channels (1 per normal edge, 2 and 4 per reduction edge), to
    widen to 1/2; its BN statistics random, so that a copy shows."""
    net = SearchNetwork(C=4, num_classes=5, layers=3, in_channels=3, method=DrNASMethod(k=2, k_first=4)).to(dtype)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return net


def test_widening_copies_channels_as_the_published_net2wider():
    net = widening_network()
    edges = [m for m in net.modules() if isinstance(m, MixedOp)]
    before = [{name: t.clone() for name, t in edge.state_dict().items()} for edge in edges]
    old_params = {p: p.detach().clone() for p in net.parameters()}
    assert net.partial_channels == 4 and {e.width for e in edges} == {1, 2, 4}

    grown = widen_partial_channels(net, 2, torch.Generator().manual_seed(11))
    replay = torch.Generator().manual_seed(11)
    for edge, state in zip(edges, before):
        old, new = edge.width // 2, edge.width
        want = published_wider(state, edge.stride, old, new, replay)
        got = edge.state_dict()
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), name
        assert edge.partial_channels == 2
        for op in edge.candidates:  # the modules say their new sizes
            for m in op.modules():
                if isinstance(m, torch.nn.Conv2d) and m.groups > 1:
                    assert m.groups == m.in_channels == m.out_channels == new
                if isinstance(m, torch.nn.BatchNorm2d):
                    assert m.num_features == new
    assert net.partial_channels == 2
    # Every widened parameter, and only those, with its steps: the same Parameter object, grown by them.
    assert {id(p) for p in grown} == {id(p) for p, old in old_params.items() if p.shape != old.shape}
    for p, steps in grown.items():
        assert torch.equal(widened(old_params[p], steps), p.detach())
        for dim, source in steps:
            assert torch.equal(source[: old_params[p].shape[dim]], torch.arange(old_params[p].shape[dim]))
    # The pointwise conv after a depthwise one: its new input columns are copies, not halves, of their sources.
    pointwise = edges[3].candidates[5][2].weight.detach()
    (_, source), _ = grown[edges[3].candidates[5][2].weight]
    assert torch.equal(pointwise[:, 1:], pointwise[:, source[1:]])
    with pytest.raises(ValueError, match=r"k must be an integer in 1\.\.1"):
        widen_partial_channels(net, 2, torch.Generator())


@pytest.mark.parametrize("reduction", [False, True], ids=["normal", "reduce"])
def test_widened_cell_computes_its_ops_on_the_wider_slice(reduction):
    net = widening_network(F64)
    widen_partial_channels(net, 2, torch.Generator().manual_seed(0))
    cell = net.cells[1 if reduction else 0]  # cell 0 reads the stem's 12 channels twice, cell 1 also cell 0's 16
    s0, s1 = torch.randn(2, 12, 8, 8, dtype=F64), torch.randn(2, 16 if reduction else 12, 8, 8, dtype=F64)
    weights = torch.rand(14, 8, dtype=F64)  # over PRIMITIVES: `none` first, then OPS7
    fused = cell(s0, s1, weights)

    def edge_output(edge, row, x):  # the published MixedOp at k=2, with the widened modules
        half = x.shape[1] // 2
        t = sum(weights[row, 1 + k] * candidate(edge, name, x[:, :half]) for k, name in enumerate(OPS7))
        bypass = x[:, half:] if edge.stride == 1 else torch.nn.MaxPool2d(2, 2)(x[:, half:])
        return channel_shuffle(torch.cat([t, bypass], dim=1), 2)

    torch.testing.assert_close(fused, hand_cell(cell, s0, s1, edge_output))


def test_restart_widens_the_momentum_buffers_alike_and_restores_the_learning_rate():
    net = widening_network()
    optimizer = torch.optim.SGD(net.weight_parameters(), 0.1, momentum=0.9, weight_decay=3e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 4, 0.001)
    x, y = tiny_batch()
    F.cross_entropy(net(x), y).backward()
    optimizer.step()
    scheduler.step()
    scheduler.step()
    old = {p: optimizer.state[p]["momentum_buffer"].clone() for p in net.weight_parameters() if p in optimizer.state}
    grown = widen_partial_channels(net, 2, torch.Generator().manual_seed(5))
    search.restart_weight_optimizer(optimizer, grown)
    assert set(map(id, grown)) <= set(map(id, old))  # every widened parameter had a buffer
    for p, buffer in old.items():
        got = optimizer.state[p]["momentum_buffer"]
        assert got.shape == p.shape
        assert torch.equal(got, widened(buffer, grown[p]) if p in grown else buffer)
    depthwise = net.cells[0].edges[0].candidates[3][0][1].weight  # sep_conv_3x3's first depthwise conv: 1 -> 2
    ((_, source),) = grown[depthwise]
    assert torch.equal(optimizer.state[depthwise]["momentum_buffer"][1], old[depthwise][source[1]])
    assert [group["lr"] for group in optimizer.param_groups] == [0.1]
    F.cross_entropy(net(x), y).backward()  # the wider network trains on
    optimizer.step()


@pytest.mark.parametrize("epochs,eta_min", [(50, 0.0), (7, 0.001)])
def test_second_stage_learning_rate_is_the_restarted_chainable_cosine(epochs, eta_min):
    """METHODS_MORE.md 4c: a new SGD at lr 0.1 with the scheduler's state reloaded, so torch's chainable cosine goes
    on from 0.1: lr_e = eta_min + (0.1 - eta_min)(1 + cos(pi e/T)) / (1 + cos(pi s/T)) from the second stage's first
    epoch s on; with T = 50, s = 25 and eta_min 0: 0.1 (1 + cos(pi e/50))."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], 0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min)
    s, lrs = epochs // 2, []
    for epoch in range(epochs):
        if epoch == s:
            search.restart_weight_optimizer(optimizer, {})
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # (no gradient: nothing moves)
        scheduler.step()
    for e in range(s):
        assert lrs[e] == pytest.approx(eta_min + (0.1 - eta_min) * (1 + math.cos(math.pi * e / epochs)) / 2)
    for e in range(s, epochs):
        cosine = (1 + math.cos(math.pi * e / epochs)) / (1 + math.cos(math.pi * s / epochs))
        assert lrs[e] == pytest.approx(eta_min + (0.1 - eta_min) * cosine, rel=1e-12)
        if epochs == 50:
            assert lrs[e] == pytest.approx(0.1 * (1 + math.cos(math.pi * e / 50)), rel=1e-12)


def test_one_factor_never_widens():
    for method in (DrNASMethod(), DrNASMethod(k=4, k_first=4)):
        assert not method.widens_network and method.network_style.partial_channels == 4
        method.set_epoch(1, 2)
        method.prepare_architecture({"normal": torch.randn(14, 7)})
        assert method.network_style.partial_channels == 4
    widening = DrNASMethod(k=4, k_first=6)
    assert widening.widens_network and widening.network_style.partial_channels == 6
    widening.set_epoch(1, 2)
    assert widening.network_style.partial_channels == 6  # until the pruning
    widening.prepare_architecture({"normal": torch.randn(14, 7)})
    assert widening.network_style.partial_channels == 4
    with pytest.raises(ValueError, match="k_first must be an integer >= 4"):
        DrNASMethod(k=4, k_first=2)
    with pytest.raises(ValueError, match="it needs epochs >= 2, got 1"):
        DrNASMethod(k=4, k_first=6).set_epoch(0, 1)


@pytest.mark.slow
def test_widened_search_resumes_bit_for_bit_across_the_widening(tmp_path, monkeypatch):
    """Four epochs, the second stage (1/2 of the channels, widened from 1/4) from epoch 2: stopped before the
    widening (after epoch 1) and after it (after epoch 2), each resumed, ends as the whole run does."""
    monkeypatch.setattr(search, "plot_run", lambda *args: None)
    monkeypatch.setattr(search, "write_cell_diagrams", lambda *args: None)
    settings = {**SEARCH, "epochs": 4, "init_channels": 4, "method": "drnas", "drnas_k": 2, "drnas_k_first": 4,
                "drnas_warmup_epochs": 0}  # fmt: skip
    whole = search.run(**settings, out=str(tmp_path / "whole"))
    assert [row["stage"] for row in whole.history] == [1.0, 1.0, 2.0, 2.0]
    lr0, eta_min = whole.history[0]["lr"], SearchConfig.learning_rate_min
    cosine = (1 + math.cos(math.pi * 3 / 4)) / (1 + math.cos(math.pi * 2 / 4))
    assert [row["lr"] for row in whole.history[2:]] == pytest.approx([lr0, eta_min + (lr0 - eta_min) * cosine])
    final = load_checkpoint(whole.run_dir / "checkpoint.pt")
    assert final["model"]["cells.0.edges.0.candidates.5.1.weight"].shape == (2, 1, 3, 3)  # C/2 of C = 4
    for stop_after in (2, 3):
        split = tmp_path / f"split-{stop_after}"
        assert search.run(**settings, stop_after=stop_after, out=str(split)).stopped_early
        resumed = search.run(resume=split, progress=False)
        assert_same_end(whole.run_dir, resumed.run_dir)
        assert_same_state(final["method"], load_checkpoint(split / "checkpoint.pt")["method"])
        assert resumed.genotype == whole.genotype
    assert TrainConfig(genotype=str(whole.run_dir)).cell() == whole.genotype
