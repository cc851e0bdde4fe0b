import io
import math

import pytest
import torch
import torch.nn.functional as F

from fastdarts import PRIMITIVES, SearchNetwork, ops
from fastdarts.bilevel import Architect, weight_step
from fastdarts.methods import DARTSMethod, NetworkStyle, PRDARTSMethod, edge_entropy, make_method
from fastdarts.ops.reference import gate_p_nonzero
from fastdarts.space import PRDARTS as PRDARTS_GENOTYPE
from fastdarts.space import derive_cell, derive_cell_top_ops, edge_index
from fastdarts.supernet import SearchCell, selected_columns

A, B = -0.1, 1.1
F64 = torch.float64


def col(name):
    return PRIMITIVES.index(name)


def beta_for(p, tau=1.0):
    """The beta whose P(g != 0) = sigmoid(beta - tau * log(-a/b)) is p."""
    return math.log(p / (1 - p)) + tau * math.log(-A / B)


def hand_set(entries, num_edges=14):
    """Betas and a mask from {(edge, op name): p} of the sampled gates; other gates get random betas."""
    beta = torch.randn(num_edges, len(PRIMITIVES), dtype=F64)
    mask = torch.zeros(num_edges, len(PRIMITIVES), dtype=F64)
    for (edge, name), p in entries.items():
        beta[edge, col(name)] = beta_for(p)
        mask[edge, col(name)] = 1.0
    return beta, mask


def p_nonzero(beta, tau=1.0):
    return gate_p_nonzero(beta, tau, A, B)


# The deepest chain of a 4-node cell is edges 1 (0<-1), 4 (1<-2), 8 (2<-3), 13 (3<-4).
NORMAL = {
    (0, "skip_connect"): 0.9, (0, "sep_conv_3x3"): 0.5,  # off the chain
    (1, "sep_conv_3x3"): 0.8, (1, "max_pool_3x3"): 0.3,
    (4, "dil_conv_5x5"): 0.6, (4, "dil_conv_3x3"): 0.4,
    (8, "skip_connect"): 0.7, (8, "avg_pool_3x3"): 0.2,  # a chain edge without a conv drops out
    (13, "none"): 0.1, (13, "sep_conv_5x5"): 0.5,  # `none` is not a conv
}  # fmt: skip
REDUCE = {
    (2, "skip_connect"): 0.5, (2, "max_pool_3x3"): 0.9,
    (1, "skip_connect"): 0.3, (1, "avg_pool_3x3"): 0.7,  # no conv on the chain: path term 0
}  # fmt: skip


def hand_regulariser(method, normal, reduce):
    (beta_n, mask_n), (beta_r, mask_r) = hand_set(normal), hand_set(reduce)
    return method.regulariser_of([p_nonzero(beta_n), p_nonzero(beta_r)], [mask_n, mask_r])


def test_regulariser_equals_a_hand_computation():
    torch.manual_seed(0)
    skip = ((0.9 + 0.7) / 2 + (0.5 + 0.3) / 2) / 2
    nonskip = ((0.5 + 0.8 + 0.6 + 0.4 + 0.1 + 0.5) / 6 + 0.0) / 2  # the reduction cell sampled none
    pool = ((0.3 + 0.2) / 2 + (0.9 + 0.7) / 2) / 2
    path = (0.8 * ((0.6 + 0.4) / 2) * 0.5 + 0.0) / 2
    expected = 0.01 * (skip - 0.2) + 0.005 * ((nonskip - 0.2) + (pool - 0.2)) - 0.005 * path
    got = hand_regulariser(PRDARTSMethod(), NORMAL, REDUCE)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # With hinge 0.9 every group mean (0.6 at most) hinges to 0: only the path term is left.
    assert hand_regulariser(PRDARTSMethod(hinge=0.9), NORMAL, REDUCE).item() == pytest.approx(-0.005 * path, rel=1e-12)


def test_paper_form_regulariser_counts_every_gate_without_hinge():
    p_of_op = {"none": 0.1, "max_pool_3x3": 0.2, "avg_pool_3x3": 0.3, "skip_connect": 0.9,
               "sep_conv_3x3": 0.5, "sep_conv_5x5": 0.6, "dil_conv_3x3": 0.7, "dil_conv_5x5": 0.8}  # fmt: skip
    beta = torch.tensor([[beta_for(p_of_op[name]) for name in PRIMITIVES]] * 14, dtype=F64)
    rest = (0.1 + 0.2 + 0.3 + 0.5 + 0.6 + 0.7 + 0.8) / 7
    path = ((0.5 + 0.6 + 0.7 + 0.8) / 4) ** 4  # all four chain edges, every conv on each
    expected = 0.01 * 0.9 + 0.005 * rest - 0.005 * path
    method = PRDARTSMethod(form="paper")
    empty = torch.zeros_like(beta)  # the paper form ignores which ops were selected
    got = method.regulariser_of([p_nonzero(beta)] * 2, [empty, empty])
    assert got.item() == pytest.approx(expected, rel=1e-12)
    method.forward_weights({"normal": beta, "reduce": beta})
    assert method.regulariser().item() == pytest.approx(expected, rel=1e-12)


def raised(entries, key, by):
    """The same gates with the p of `key` taken to the p of its beta raised by `by`."""
    beta = beta_for(entries[key]) + by
    return entries | {key: 1 / (1 + math.exp(-(beta - math.log(-A / B))))}


def test_raising_a_sampled_conv_on_the_deepest_chain_lowers_the_regulariser():
    method = PRDARTSMethod()
    torch.manual_seed(0)
    before = hand_regulariser(method, NORMAL, REDUCE).item()
    on_chain = hand_regulariser(method, raised(NORMAL, (1, "sep_conv_3x3"), 0.5), REDUCE).item()
    off_chain = hand_regulariser(method, raised(NORMAL, (0, "sep_conv_3x3"), 0.5), REDUCE).item()
    assert on_chain < before  # the path term rewards depth
    assert off_chain > before  # the same conv off the chain only counts in the non-skip group


def test_raising_a_skip_beta_costs_l1_over_l2_times_a_non_skip_beta():
    # Two sampled skip gates and two sampled non-skip gates per cell, all with p = 0.5 (both hinges
    # active); the non-skip ones lie off the chain, so the path term (0 here) cannot move.
    entries = {(0, "skip_connect"): 0.5, (2, "skip_connect"): 0.5,
               (0, "sep_conv_3x3"): 0.5, (3, "dil_conv_3x3"): 0.5}  # fmt: skip
    method = PRDARTSMethod()
    before = hand_regulariser(method, entries, entries).item()
    skip_rise = hand_regulariser(method, raised(entries, (0, "skip_connect"), 0.3), entries).item() - before
    nonskip_rise = hand_regulariser(method, raised(entries, (3, "dil_conv_3x3"), 0.3), entries).item() - before
    assert skip_rise > 0 and nonskip_rise > 0
    assert skip_rise / nonskip_rise == pytest.approx(0.01 / 0.005, rel=1e-9)


def only_none_on_node_0(mask):
    mask = mask.clone()
    mask[0:2] = 0.0  # node 0 reads edges 0 and 1
    mask[0:2, col("none")] = 1.0
    return mask


@pytest.mark.parametrize("reduction", [False, True], ids=["normal", "reduce"])
def test_sparse_forward_equals_dense_forward_with_unselected_weights_zero(reduction):
    torch.manual_seed(0)
    C = 4
    cell = SearchCell(4, 4, 6, 6, C, reduction, False).to(F64)
    s0, s1 = (torch.randn(2, 6, 8, 8, dtype=F64, requires_grad=True) for _ in range(2))
    beta = torch.randn(14, 8, dtype=F64, requires_grad=True)
    _, mask, _ = ops.sample_gates(beta.detach(), 1.0, generator=torch.Generator().manual_seed(1))
    mask = only_none_on_node_0(mask)

    def weights():  # 1 on the mask, 0 elsewhere, differentiable in beta
        return mask * (beta - beta.detach() + 1.0)

    sparse = cell(s0, s1, weights(), selected_columns(mask))
    dense = cell(s0, s1, weights(), None)
    torch.testing.assert_close(sparse, dense)
    assert torch.count_nonzero(sparse[:, :C]) == 0  # node 0 selected only `none`

    upstream = torch.randn_like(dense)
    inputs = [s0, s1, beta, *cell.parameters()]
    sparse_grads = torch.autograd.grad((sparse * upstream).sum(), inputs, allow_unused=True)
    dense_grads = torch.autograd.grad((dense * upstream).sum(), inputs, allow_unused=True)
    for got, want in zip(sparse_grads, dense_grads):
        if got is None:  # an op that was not computed: the dense forward gives it a zero gradient
            assert want is None or torch.count_nonzero(want) == 0
        else:
            torch.testing.assert_close(got, want)

    # Only the selected ops ran: the others' parameters got no gradient, on every backend.
    grads = dict(zip(inputs[3:], sparse_grads[3:]))
    columns = selected_columns(mask)
    for e, edge in enumerate(cell.edges):
        for c, candidate in zip((c for c in range(len(PRIMITIVES)) if PRIMITIVES[c] != "none"), edge.candidates):
            for p in candidate.parameters():
                if c in columns[e]:
                    assert grads[p] is not None, (e, PRIMITIVES[c])
                else:
                    assert grads[p] is None, (e, PRIMITIVES[c])


def test_prdarts_genotype_rule_on_hand_set_betas():
    net = SearchNetwork(C=4, num_classes=10, layers=3, in_channels=1, method=PRDARTSMethod())
    with torch.no_grad():
        for beta, cell in ((net.alpha_normal, PRDARTS_GENOTYPE.normal), (net.alpha_reduce, PRDARTS_GENOTYPE.reduce)):
            beta.fill_(0.0)
            beta[:, col("none")] = 5.0  # a dominant `none` must be ignored
            for i in range(4):
                for rank, (op, inp) in enumerate(cell[2 * i : 2 * i + 2]):
                    beta[edge_index(i, inp), col(op)] = 3.0 - rank
    assert net.genotype() == PRDARTS_GENOTYPE


def test_top_ops_rule_may_take_both_ops_from_one_input_and_breaks_ties_stably():
    weights = torch.full((5, 8), 0.01)  # two nodes: edges 0<-0, 0<-1, 1<-0, 1<-1, 1<-2
    weights[0, col("none")] = 0.9
    weights[0, col("max_pool_3x3")] = 0.2
    weights[1, col("sep_conv_3x3")] = 0.4
    weights[1, col("dil_conv_3x3")] = 0.3
    for edge, name in ((2, "sep_conv_5x5"), (4, "sep_conv_5x5"), (4, "sep_conv_3x3")):
        weights[edge, col(name)] = 0.5  # a three-way tie: lower input first, then lower column
    assert derive_cell_top_ops(weights, 2) == (
        ("sep_conv_3x3", 1), ("dil_conv_3x3", 1), ("sep_conv_5x5", 0), ("sep_conv_3x3", 2),
    )  # fmt: skip
    assert derive_cell(weights, 2)[:2] == (("sep_conv_3x3", 1), ("max_pool_3x3", 0))  # DARTS: two inputs


def arch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"normal": torch.randn(14, 8, generator=g), "reduce": torch.randn(14, 8, generator=g)}


def test_state_dict_round_trip_reproduces_the_next_sample():
    betas = arch()
    method = PRDARTSMethod(seed=3)
    method.set_epoch(2, 5)
    method.forward_weights(betas)  # move the generator along first
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    expected = method.forward_weights(betas)
    expected_r = method.regulariser()

    restored = PRDARTSMethod(seed=11)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer))
    assert restored.tau == method.tau
    got = restored.forward_weights(betas)
    for cell in betas:
        assert torch.equal(got[cell].weights, expected[cell].weights)
        assert torch.equal(got[cell].mask, expected[cell].mask)
    assert torch.equal(restored.regulariser(), expected_r)


def test_bad_state_is_rejected():
    method = PRDARTSMethod()
    with pytest.raises(ValueError, match=r"pr-darts state must have the keys \['generator', 'tau'\]"):
        method.load_state_dict({"tau": 0.5})
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        method.load_state_dict({"tau": -1.0, "generator": method.generator.get_state()})
    with pytest.raises(ValueError, match="generator state does not fit"):
        method.load_state_dict({"tau": 0.5, "generator": torch.zeros(3, dtype=torch.uint8)})
    with pytest.raises(ValueError, match=r"darts state must have the keys \[\]"):
        DARTSMethod().load_state_dict({"tau": 0.5})


def test_temperature_falls_linearly_over_the_epochs():
    method = PRDARTSMethod()
    taus = []
    for epoch in range(10):
        method.set_epoch(epoch, 10)
        taus.append(method.tau)
    assert taus[0] == 1.0 and taus[-1] == pytest.approx(0.1, abs=1e-15)
    assert taus == pytest.approx([1.0 - 0.1 * e for e in range(10)], abs=1e-12)
    method.set_epoch(0, 1)
    assert method.tau == 1.0
    with pytest.raises(ValueError, match=r"epoch must be an integer in 0..9, got 10"):
        method.set_epoch(10, 10)


def test_forward_weights_of_both_forms():
    betas = arch()
    reference = PRDARTSMethod(seed=0).forward_weights(betas)
    for cell in betas:
        weights, mask = reference[cell].weights, reference[cell].mask
        assert torch.equal(weights, mask) and torch.equal(mask.sum(1), torch.full((14,), 2.0))
    paper = PRDARTSMethod(form="paper", seed=0).forward_weights(betas)
    for cell in betas:
        weights, mask = paper[cell].weights, paper[cell].mask
        assert mask is None  # every op computed, weighted by its gate
        assert weights.min() >= 0 and weights.max() <= 1 and ((weights > 0) & (weights < 1)).any()


def test_darts_method_is_the_softmax_with_no_regulariser():
    betas = arch()
    method = DARTSMethod()
    weights = method.forward_weights(betas)
    for cell, alpha in betas.items():
        assert torch.equal(weights[cell].weights, alpha.softmax(-1)) and weights[cell].mask is None
    assert method.regulariser() is None and method.state_dict() == {}
    assert not DARTSMethod.weight_step_first and PRDARTSMethod.weight_step_first
    assert set(method.diagnostics(betas)) == {"entropy_normal", "entropy_reduce"}


def test_prdarts_diagnostics():
    betas = arch()
    method = PRDARTSMethod()
    method.set_epoch(3, 4)  # tau 0.1
    figures = method.diagnostics(betas)
    groups = {"skip": ["skip_connect"], "nonskip": ["none", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3",
              "dil_conv_5x5"], "pool": ["max_pool_3x3", "avg_pool_3x3"]}  # fmt: skip
    for cell, beta in betas.items():
        assert figures[f"entropy_{cell}"] == pytest.approx(edge_entropy(beta.softmax(-1)))
        for group, names in groups.items():
            p = torch.sigmoid(beta[:, [col(n) for n in names]] - 0.1 * math.log(-A / B)).mean()
            assert figures[f"p_nonzero_{group}_{cell}"] == pytest.approx(p.item(), rel=1e-6)
    assert len(figures) == 8


def tiny_prdarts_net(seed=0, **settings):
    torch.manual_seed(seed)
    net = SearchNetwork(C=2, num_classes=3, layers=3, in_channels=1, steps=2, multiplier=2,
                        method=PRDARTSMethod(seed=seed, **settings))  # fmt: skip
    opt = torch.optim.SGD(net.weight_parameters(), lr=0.1, momentum=0.9, weight_decay=3e-4)
    batches = [(torch.randn(4, 1, 5, 5), torch.randint(0, 3, (4,))) for _ in range(2)]
    return net, opt, *batches


@pytest.mark.parametrize("form", ["reference", "paper"])
def test_tiny_prdarts_network_forward_backward_and_search_step(form):
    net, opt, train, val = tiny_prdarts_net(form=form)
    assert net.alpha_normal.shape == (5, 8) and net.alpha_normal.abs().max() < 0.01
    loss = F.cross_entropy(net(val[0]), val[1]) + net.regulariser()
    loss.backward()
    assert all(torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0 for b in net.arch_parameters())

    net.zero_grad(set_to_none=True)
    architect = Architect(net, opt, unrolled=False)
    # The architecture gradient is that of CE + R for the gates its own forward pass draws.
    state = net.method.state_dict()
    grads, objective = architect.first_order_grads(val)
    net.method.load_state_dict(state)
    ce = F.cross_entropy(net(val[0]), val[1])
    expected = torch.autograd.grad(ce + net.regulariser(), net.arch_parameters())
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    assert objective.item() == pytest.approx((ce + net.regulariser()).item())
    assert net.regulariser().item() != 0

    before = [b.detach().clone() for b in net.arch_parameters()]
    weight_step(net, opt, train, grad_clip=5.0)  # PR-DARTS steps the weights first
    architect.step(train, val, lr=0.1)
    assert all(not torch.equal(b, a) for b, a in zip(net.arch_parameters(), before))
    assert all(len(edge) == 2 for edge in net.genotype().normal)


def cell_outputs_in_both_modes(net, x):
    """Each cell's (train-mode, eval-mode) output for its inputs and gates in one forward pass of `x` (its inputs as
    the network passed them to SearchCell.nodes: preprocessed, SearchNetwork preprocessing each state for all the
    cells that read it)."""
    calls = []
    for cell in net.cells:
        nodes = cell.nodes

        def recorded(*args, cell=cell, nodes=nodes, **kwargs):
            calls.append((cell, args, kwargs))
            return nodes(*args, **kwargs)

        cell.nodes = recorded
    try:
        net(x)
    finally:
        for cell in net.cells:
            del cell.nodes
    assert len(calls) == len(net.cells)
    return [tuple(torch.cat(cell.train(mode).nodes(*args, **kwargs), 1) for mode in (True, False))
            for cell, args, kwargs in calls]  # fmt: skip


def test_reference_network_normalises_cells_with_batch_statistics_in_evaluation_too():
    net, _, (x, _), _ = tiny_prdarts_net()
    assert net.method.network_style == NetworkStyle(running_statistics=False, head_bn_relu=True, pool_bn=False)
    assert all(not edge.pool_bn for cell in net.cells for edge in cell.edges)
    assert not any("running" in name for name in net.cells.state_dict())
    assert isinstance(net.head[0], torch.nn.BatchNorm2d) and isinstance(net.head[1], torch.nn.ReLU)
    with torch.no_grad():
        for train_out, eval_out in cell_outputs_in_both_modes(net, x):
            torch.testing.assert_close(eval_out, train_out)


def test_darts_network_keeps_running_statistics_for_evaluation():
    net, _, (x, _), _ = tiny_prdarts_net(network="darts")
    assert net.head is None and any("running_mean" in name for name in net.cells.state_dict())
    assert all(edge.pool_bn for cell in net.cells for edge in cell.edges)
    with torch.no_grad():
        for train_out, eval_out in cell_outputs_in_both_modes(net, x):
            assert not torch.allclose(eval_out, train_out)


def test_second_order_steps_refuse_a_method_that_samples_each_forward():
    net, opt, _, _ = tiny_prdarts_net()
    with pytest.raises(ValueError, match="second-order .* use the first-order step"):
        Architect(net, opt, unrolled=True)


def test_edge_weights_of_a_prdarts_network_are_the_softmax_of_the_betas():
    net, _, _, _ = tiny_prdarts_net()
    normal, reduce = net.edge_weights()
    assert torch.equal(normal, net.alpha_normal.softmax(-1)) and torch.equal(reduce, net.alpha_reduce.softmax(-1))
    assert set(net.diagnostics()) >= {"entropy_normal", "p_nonzero_skip_reduce"}


def test_regulariser_needs_a_forward_pass_first():
    with pytest.raises(RuntimeError, match="no gates have been sampled yet"):
        PRDARTSMethod().regulariser()


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(form="hard"), "form must be one of reference, paper, got 'hard'"),
        (dict(k=9), r"k must be None or an integer in 1..8"),
        (dict(k=None), "k must be an integer; form='paper' is the variant without top-k"),
        (dict(tau_end=0.0), "tau_end must be a finite number > 0"),
        (dict(l1=-1.0), "l1 must be a finite number >= 0"),
        (dict(a=0.5), "a must be a finite number < 0"),
        (dict(explore_p=2.0), r"explore_p must lie in \[0, 1\]"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(network="nasnet"), "network must be one of reference, darts, got 'nasnet'"),
    ],
)
def test_bad_settings_raise_one_line_errors(settings, message):
    with pytest.raises(ValueError, match=message) as caught:
        PRDARTSMethod(**settings)
    assert "\n" not in str(caught.value)


def test_methods_by_name():
    assert isinstance(make_method("darts"), DARTSMethod)
    method = make_method("pr-darts", form="paper", l1=0.02)
    assert isinstance(method, PRDARTSMethod) and method.form == "paper" and method.l1 == 0.02
    with pytest.raises(ValueError, match="unknown method 'enas'; the methods are darts, pr-darts, "):
        make_method("enas")
    with pytest.raises(ValueError, match="method must be a fastdarts.methods.Method, got str"):
        SearchNetwork(C=4, method="pr-darts")
