from unittest import mock

import pytest
import torch

from fastdarts import PRIMITIVES, SearchNetwork, ops, supernet
from fastdarts.methods import CellWeights, DARTSMethod
from fastdarts.space import DARTS_V2
from fastdarts.supernet import MixedOp, _ConcatChannels, selected_columns

from .conftest import requires_ext


def test_arch_parameters_shapes_and_separation():
    net = SearchNetwork(C=4, num_classes=10, layers=5, in_channels=1)
    alpha_normal, alpha_reduce = net.arch_parameters()
    assert alpha_normal.shape == (14, 8) and alpha_reduce.shape == (14, 8)
    weight_ids = {id(p) for p in net.weight_parameters()}
    assert id(alpha_normal) not in weight_ids and id(alpha_reduce) not in weight_ids
    assert len(weight_ids) + 2 == len(list(net.parameters()))
    assert [cell.reduction for cell in net.cells] == [False, True, False, True, False]
    assert alpha_normal.abs().max() < 0.01  # initialised as 1e-3 * N(0, 1)


@pytest.mark.parametrize("size", [8, 9])
def test_forward_shape_and_edge_order(size):
    net = SearchNetwork(C=4, num_classes=7, layers=3, in_channels=3, steps=3, multiplier=3)
    assert net.alpha_normal.shape == (2 + 3 + 4, len(PRIMITIVES))
    out = net(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    # Edge k of node i reads state j with stride 2 only from the two cell inputs in a reduction cell.
    strides = [edge.stride for edge in net.cells[1].edges]
    assert strides == [2, 2, 2, 2, 1, 2, 2, 1, 1]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
@pytest.mark.parametrize("pool_bn", [True, False], ids=["pool-bn", "no-pool-bn"])
@pytest.mark.parametrize("stride", [1, 2])
def test_mixed_op_is_the_softmax_weighted_sum_of_all_primitives(stride, pool_bn, backend):
    torch.manual_seed(0)
    edge = MixedOp(4, stride, pool_bn)
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(len(PRIMITIVES)).softmax(-1)
    # `none` is not among the computed candidates but still takes part in the sum as zero.
    expected = sum(wk * op(x) for wk, op in zip(w[1:], edge.candidates))
    with ops.use_backend(backend):
        torch.testing.assert_close(edge(x, w), expected, rtol=1e-4, atol=1e-5)
    pool_bns = [m for op in edge.candidates[:2] for m in op.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(pool_bns) == (2 if pool_bn else 0)


def test_genotype_from_hand_set_alphas():
    net = SearchNetwork(C=4, num_classes=10, layers=3, in_channels=1)
    with torch.no_grad():
        for alpha, cell in ((net.alpha_normal, DARTS_V2.normal), (net.alpha_reduce, DARTS_V2.reduce)):
            alpha.fill_(0.0)
            alpha[:, 0] = 5.0  # a dominant `none` must be ignored
            start = 0
            for i in range(4):
                for rank, (op, inp) in enumerate(cell[2 * i : 2 * i + 2]):
                    alpha[start + inp, PRIMITIVES.index(op)] = 3.0 - rank
                start += 2 + i
    assert net.genotype() == DARTS_V2


def test_invalid_network_arguments():
    with pytest.raises(ValueError, match="C must be"):
        SearchNetwork(C=0)
    with pytest.raises(ValueError, match="multiplier"):
        SearchNetwork(C=4, steps=2, multiplier=4)
    with pytest.raises(ValueError, match="SearchNetwork: recompute must be True or False, got 'no'"):
        SearchNetwork(C=4, recompute="no")


@requires_ext
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "no-recompute"])
@pytest.mark.parametrize("train", [True, False])
def test_cpp_and_reference_backends_agree_on_the_whole_network(train, recompute):
    torch.manual_seed(0)
    net = SearchNetwork(C=4, num_classes=10, layers=3, in_channels=3, recompute=recompute).train(train)
    assert all(edge.recompute == recompute for cell in net.cells for edge in cell.edges)
    x, y = torch.randn(3, 3, 9, 9), torch.randint(0, 10, (3,))
    results = {}
    for backend in ("reference", "cpp"):
        state = {k: v.clone() for k, v in net.state_dict().items()}
        with ops.use_backend(backend):
            loss = torch.nn.functional.cross_entropy(net(x), y)
            grads = torch.autograd.grad(loss, list(net.parameters()))
        net.load_state_dict(state)  # undo the running-statistics update so both see the same state
        results[backend] = (loss, grads)
    torch.testing.assert_close(results["cpp"][0], results["reference"][0], rtol=1e-4, atol=1e-6)
    for g_cpp, g_ref in zip(results["cpp"][1], results["reference"][1]):
        torch.testing.assert_close(g_cpp, g_ref, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
@pytest.mark.parametrize("stride", [1, 2])
def test_mixed_op_updates_running_statistics_like_batch_norm(backend, stride):
    torch.manual_seed(0)
    edge = MixedOp(4, stride)
    modules = MixedOp(4, stride)
    modules.load_state_dict(edge.state_dict())
    x = torch.randn(3, 4, 9, 9)
    w = torch.randn(len(PRIMITIVES)).softmax(-1)
    for _ in range(2):
        with ops.use_backend(backend):
            edge(x, w)
        for op in modules.candidates:  # nn.BatchNorm2d's own update, one candidate module at a time
            op(x)
    for (name, got), want in zip(edge.state_dict().items(), modules.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    # Evaluation normalises with those running statistics.
    edge.eval(), modules.eval()
    with ops.use_backend(backend):
        got = edge(x, w)
    want = sum(wk * op(x) for wk, op in zip(w[1:], modules.candidates))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
def test_running_statistics_follow_new_buffers_and_a_cumulative_average(backend):
    """The group's update finds the buffers where they are after `.double()` replaced them (its plan, made in the
    first forward, keeps where to look, not the tensors), and with momentum None keeps nn.BatchNorm2d's cumulative
    average."""
    torch.manual_seed(0)
    edge = MixedOp(4, 1)
    modules = MixedOp(4, 1)
    modules.load_state_dict(edge.state_dict())
    x = torch.randn(3, 4, 9, 9)
    w = torch.randn(len(PRIMITIVES)).softmax(-1)
    for step in range(3):
        if step == 1:
            edge.double(), modules.double()
            x, w = x.double(), w.double()
            for bn in edge.bns + modules.bns:
                bn.momentum = None
        with ops.use_backend(backend):
            edge(x, w)
        for op in modules.candidates:
            op(x)
    for (name, got), want in zip(edge.state_dict().items(), modules.state_dict().values()):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_a_group_keeps_a_bounded_number_of_running_statistics_plans():
    """A sampling method computes other candidates every step: the group's plans stay bounded, the oldest dropped
    first, and a plan made again gives the same BNs and rows."""
    edges = [MixedOp(4, 1) for _ in range(2)]
    plans = edges[0]._running_statistics_plans
    draws = [[[a], [b]] for a in range(7) for b in range(7)] + [[[a, b], [b]] for a in range(7) for b in range(a)]
    assert len(draws) > supernet._PLANS_PER_GROUP
    for candidates in draws:
        supernet.running_statistics_plan(plans, [(edges, candidates)], torch.device("cpu"))
    assert len(plans) == supernet._PLANS_PER_GROUP
    assert tuple(map(tuple, draws[0])) not in {key[0][0][1] for key in plans}
    bns, rows = supernet.running_statistics_plan(plans, [(edges, draws[0])], torch.device("cpu"))
    B = len(edges[0].bns)
    assert bns == [edge.bns[row] for edge in edges for row in edge.bn_rows[0]]
    assert rows.tolist() == [e * B + row for e, edge in enumerate(edges) for row in edge.bn_rows[0]]


def test_a_cells_running_statistics_plan_follows_its_groups():
    """A cell's plan: each group's rows after the rows of the groups before it, B per edge of its own stride."""
    reduce_edges, normal_edges = [MixedOp(4, 2) for _ in range(2)], [MixedOp(4, 1) for _ in range(3)]
    candidates_2, candidates_1 = [[2], [3]], [[4], [], [0, 2]]
    bns, rows = supernet.running_statistics_plan(
        {}, [(reduce_edges, candidates_2), (normal_edges, candidates_1)], torch.device("cpu")
    )
    B2, B1 = len(reduce_edges[0].bns), len(normal_edges[0].bns)
    assert B2 == B1 + 1  # the stride-2 skip's BN
    want = []
    for offset, B, edges, candidates in ((0, B2, reduce_edges, candidates_2), (2 * B2, B1, normal_edges, candidates_1)):
        for e, (edge, ks) in enumerate(zip(edges, candidates)):
            want += [(edge.bns[row], offset + e * B + row) for k in ks for row in edge.bn_rows[k]]
    assert bns == [bn for bn, _ in want]
    assert rows.tolist() == [row for _, row in want]


@requires_ext
@pytest.mark.slow
def test_fused_search_step_compiles_with_fullgraph():
    torch.manual_seed(0)
    net = SearchNetwork(C=4, num_classes=10, layers=3, in_channels=3)
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))

    def loss_fn(x, y):
        return torch.nn.functional.cross_entropy(net(x), y)

    state = {k: v.clone() for k, v in net.state_dict().items()}
    eager_loss = loss_fn(x, y)
    eager_grads = torch.autograd.grad(eager_loss, list(net.parameters()))
    net.load_state_dict(state)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(x, y)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    torch.testing.assert_close(loss, eager_loss)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@requires_ext
def test_a_cell_runs_as_one_op_over_the_edges_of_each_state():
    """A cell is one ops.mixed_cell call, whose groups are the states that feed a node (s0, s1 and the first three
    nodes), fewer when every edge leaving a state selects only `none`; the outputs and running statistics are the
    reference's."""
    torch.manual_seed(0)
    net = SearchNetwork(C=4, num_classes=10, layers=3, in_channels=3)
    cell = net.cells[0]
    s = net.stem(torch.randn(3, 3, 8, 8)).detach()
    weights = torch.randn(14, len(PRIMITIVES)).softmax(-1)
    mask = torch.ones(14, len(PRIMITIVES), dtype=torch.bool)
    # Node 0 -> node 1 (edge 4) and every edge leaving node 1 (8, 12) and node 2 (13) select only `none`.
    mask[[4, 8, 12, 13], :] = False
    state = {k: v.clone() for k, v in net.state_dict().items()}
    results = {}
    for backend in ("reference", "cpp"):
        net.load_state_dict(state)
        with ops.use_backend(backend), torch.profiler.profile() as profile:
            outs = [cell(s, s, weights), cell(s, s, weights, selected_columns(mask))]
        results[backend] = outs, {k: v.clone() for k, v in net.state_dict().items()}
        names = [event.name for event in profile.events()]
        assert (names.count("fastdarts::mixed_cell"), names.count("fastdarts::mixed_ops")) == (
            (2, 0) if backend == "cpp" else (0, 0)
        )
    candidates = [[k for k in range(7) if mask[e, 1 + k]] for e in range(14)]
    # All five states, then s0, s1 and node 0 (nodes 1 and 2 feed only `none` edges).
    assert [group.state for group in ops.reference.cell_groups(4, 1, list(map(list, [range(7)] * 14)), True)] == [
        0, 1, 2, 3, 4
    ]  # fmt: skip
    assert [group.state for group in ops.reference.cell_groups(4, 1, candidates, True)] == [0, 1, 2]
    (got, got_state), (want, want_state) = results["cpp"], results["reference"]
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    for name, r in want_state.items():
        torch.testing.assert_close(got_state[name], r, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@requires_ext
def test_a_state_is_preprocessed_once_for_the_cells_that_read_it():
    """The stem feeds both inputs of cell 0 and input 0 of cell 1, each cell's output input 1 of the next cell and
    input 0 of the one after: one relu_pointwise_bn_stats pass per state and number of output channels (3 cells,
    reductions at cells 1 and 2, whose input 0 from a reduction is a FactorizedReduce). On the C++ kernels no cell's
    output is concatenated: the preprocessings (cell 2's FactorizedReduce of cell 0's output too) read its nodes
    where they are, and the classifier's pooling pools each node. The outputs, gradients and running statistics are
    the reference's."""
    torch.manual_seed(0)
    net = SearchNetwork(C=4, num_classes=10, layers=3, in_channels=3)
    x, y = torch.randn(3, 3, 8, 8), torch.randint(0, 10, (3,))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    results = {}
    concatenations = []
    concatenate = supernet._ConcatChannels.apply

    def counted(*states):
        concatenations.append(len(states))
        return concatenate(*states)

    for backend in ("reference", "cpp"):
        net.load_state_dict(state)
        concatenations.clear()
        with ops.use_backend(backend), torch.profiler.profile() as profile, \
                mock.patch.object(supernet._ConcatChannels, "apply", counted):  # fmt: skip
            loss = torch.nn.functional.cross_entropy(net(x), y)
            grads = torch.autograd.grad(loss, list(net.parameters()))
        results[backend] = loss, grads, {k: v.clone() for k, v in net.state_dict().items()}
        assert concatenations == ([4] * 3 if backend == "reference" else [])
        if backend == "cpp":
            calls = [event.name for event in profile.events()]
            # the stem: 4 and 8 output channels; cell 0's output: cell 1's input 1; cell 1's: cell 2's input 1
            assert calls.count("fastdarts::relu_pointwise_bn_stats") == 4
            assert calls.count("fastdarts::relu_pointwise_bn_stats_backward") == 4
    (loss, grads, got_state), (want_loss, want_grads, want_state) = results["cpp"], results["reference"]
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-6)
    for g, r in zip(grads, want_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-6)
    for name, r in want_state.items():
        torch.testing.assert_close(got_state[name], r, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@requires_ext
def test_a_node_of_three_or_more_edges_is_summed_in_one_pass_with_the_bits_of_the_adds():
    """On the C++ kernels, a cell run group by group (as with partial channels) sums its nodes 1-3 (3, 4 and 5
    incoming edges) by one weighted_sum call each, whose value is, bit for bit, the edges' outputs added in input
    order, and whose backward hands every edge the node's gradient; node 0's two edges still add. The cell's outputs
    and gradients are the reference's."""
    torch.manual_seed(0)
    cell = supernet.SearchCell(4, 4, 8, 8, 8, reduction=False, reduction_prev=False)
    s0, s1 = (torch.randn(3, 8, 6, 6).contiguous(memory_format=torch.channels_last) for _ in range(2))
    weights = torch.randn(14, len(PRIMITIVES)).softmax(-1).requires_grad_()
    sums = []
    node_sum = supernet._NodeSum.apply

    def counted(*outs):
        sums.append(len(outs))
        return node_sum(*outs)

    results = {}
    for backend in ("reference", "cpp"):
        sums.clear()
        with ops.use_backend(backend), mock.patch.object(supernet._NodeSum, "apply", counted):
            nodes = cell._nodes_by_group(s0, s1, weights, None, None, None)
            grads = torch.autograd.grad(sum((n * n).sum() for n in nodes), [weights, *cell.edges.parameters()])
        assert sums == ([] if backend == "reference" else [3, 4, 5])
        results[backend] = nodes, grads
    (nodes, grads), (want_nodes, want_grads) = results["cpp"], results["reference"]
    for got, want in zip(nodes, want_nodes):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    outs = [torch.randn(2, 4, 5, 7).contiguous(memory_format=torch.channels_last).requires_grad_() for _ in range(4)]
    with ops.use_backend("cpp"):
        node = supernet._node_sum(outs)
    assert torch.equal(node, ((outs[0] + outs[1]) + outs[2]) + outs[3])
    grad = torch.randn_like(node)
    assert all(g.data_ptr() == grad.data_ptr() for g in torch.autograd.grad(node, outs, grad))  # no copies


@requires_ext
@pytest.mark.parametrize(
    "reduction,setting",
    [(reduction, setting) for reduction in (False, True)
     for setting in ("every-op", "subsets", "auxiliary-skip", "edge-scale", "keeping", "evaluation", "partial-channels")
     if not (reduction and setting == "auxiliary-skip")],  # a reduction cell's auxiliary skip runs group by group
)  # fmt: skip
def test_a_whole_cell_gives_the_bits_of_its_groups_run_one_by_one(reduction, setting):
    """On the C++ kernels the cell as one ops.mixed_cell call (edge_cell in C++) gives the nodes, every gradient and
    the running statistics of its groups run one by one (_nodes_by_group), bit for bit."""
    torch.manual_seed(0)
    cell = supernet.SearchCell(4, 4, 8, 8, 8, reduction=reduction, reduction_prev=False,
                               recompute=setting != "keeping", auxiliary_skip=setting == "auxiliary-skip",
                               partial_channels=2 if setting == "partial-channels" else 1)  # fmt: skip
    s0, s1 = (torch.randn(3, 8, 7, 7).contiguous(memory_format=torch.channels_last).requires_grad_() for _ in range(2))
    weights = torch.randn(14, len(PRIMITIVES)).softmax(-1).requires_grad_()
    columns = auxiliary_skip = edge_scale = None
    if setting == "subsets":  # edges 4 and 12 left out, every node still fed
        mask = torch.rand(14, len(PRIMITIVES)) < 0.4
        mask[:, 0], mask[[4, 12]] = False, False
        columns = selected_columns(mask)
    auxiliary_skip = 0.3 if setting == "auxiliary-skip" else None
    if setting in ("edge-scale", "partial-channels"):  # PC-DARTS's edge normalisation
        edge_scale = torch.rand(14).requires_grad_()
    if setting == "evaluation":
        cell._nodes_by_group(s0, s1, weights, None, None, None)  # running statistics of a batch
        cell.eval()
    state = {k: v.clone() for k, v in cell.state_dict().items()}
    inputs = [s0, s1, weights, *([edge_scale] if edge_scale is not None else []), *cell.parameters()]
    results = []
    for path in (cell._mixed_cell, cell._nodes_by_group):
        cell.load_state_dict(state)
        nodes = path(s0, s1, weights, columns, auxiliary_skip, edge_scale)
        loss = sum((node * torch.linspace(-1, 1, node.numel()).view(node.shape)).sum() for node in nodes)
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        results.append((nodes, grads, {k: v.clone() for k, v in cell.state_dict().items()}))
    (nodes, grads, got_state), (want_nodes, want_grads, want_state) = results
    assert any(not torch.equal(got_state[name], state[name]) for name in state) == (setting != "evaluation")
    for got, want in zip(nodes, want_nodes):
        assert torch.equal(got, want)
    for i, (got, want) in enumerate(zip(grads, want_grads)):
        assert (got is None) == (want is None), i
        assert got is None or torch.equal(got, want), i
    for name, want in want_state.items():
        assert torch.equal(got_state[name], want), name


class _PermutedOps(DARTSMethod):
    """DARTS over its ops in another column order, `none` left out (as a 7-op method declares them)."""

    name = "permuted-ops"
    primitives = ("dil_conv_5x5", "skip_connect", "max_pool_3x3", "sep_conv_3x3", "avg_pool_3x3", "dil_conv_3x3",
                  "sep_conv_5x5")  # fmt: skip


class _FewOps(DARTSMethod):
    name = "few-ops"
    primitives = ("sep_conv_3x3", "none", "skip_connect")


@pytest.mark.parametrize("method", [_PermutedOps, _FewOps])
def test_a_method_declares_its_ops_by_name_and_the_supernet_maps_them(method):
    """A network over the method's columns computes what DARTS's computes with the same weight on each op by
    name and 0 on the ops the method leaves out; the genotype and the alpha gradient follow the names."""
    torch.manual_seed(0)
    net = SearchNetwork(C=4, num_classes=10, layers=3, in_channels=3, steps=2, multiplier=2, method=method())
    assert net.alpha_normal.shape == (5, len(method.primitives))
    reference = SearchNetwork(C=4, num_classes=10, layers=3, in_channels=3, steps=2, multiplier=2)
    reference.load_state_dict({k: v for k, v in net.state_dict().items() if "alpha" not in k}, strict=False)
    columns = [PRIMITIVES.index(name) for name in method.primitives]
    with torch.no_grad():
        for ours, theirs in zip(net.arch_parameters(), reference.arch_parameters()):
            ours.copy_(torch.randn_like(ours))
            theirs.fill_(-torch.inf)  # softmax weight 0 on the ops the method leaves out
            theirs[:, columns] = ours
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 7])
    losses = [torch.nn.functional.cross_entropy(n(x), y) for n in (net, reference)]
    torch.testing.assert_close(losses[0], losses[1])
    for ours, theirs in zip(net.arch_parameters(), reference.arch_parameters()):
        (g_ours,) = torch.autograd.grad(losses[0], ours, retain_graph=True)
        (g_theirs,) = torch.autograd.grad(losses[1], theirs, retain_graph=True)
        torch.testing.assert_close(g_ours, g_theirs[:, columns])
    assert net.genotype() == reference.genotype()
    assert all(op in method.primitives for op, _ in net.genotype().normal)


@pytest.mark.parametrize("primitives", [("sep_conv_3x3", "conv_7x1_1x7"), ("none",), ("skip_connect", "skip_connect")])
def test_a_method_with_ops_the_supernet_cannot_map_is_refused(primitives):
    method = DARTSMethod()
    method.primitives = primitives
    with pytest.raises(ValueError, match="a method's ops must be distinct names of none, max_pool_3x3"):
        SearchNetwork(C=4, layers=3, method=method)


class _GivenWeights(DARTSMethod):
    """Edge weights and masks given from outside, over `primitives`."""

    name = "given-weights"

    def __init__(self, primitives, weights, masks):
        self.primitives, self.weights, self.masks = tuple(primitives), weights, masks

    def forward_weights(self, arch):
        return {cell: CellWeights(self.weights[cell], self.masks[cell]) for cell in arch}


def test_a_mask_over_the_method_s_columns_selects_the_same_ops_by_name():
    """A 7-op method that computes 2 ops per edge (a mask in its own column order) computes what a network over
    PRIMITIVES computes with the same weights and mask moved to the same names."""
    seven = _PermutedOps.primitives
    columns = [PRIMITIVES.index(name) for name in seven]
    weights, masks, spread_weights, spread_masks = {}, {}, {}, {}
    for cell in ("normal", "reduce"):
        w = torch.rand(5, 7, requires_grad=True)
        mask = torch.zeros(5, 7)
        mask[torch.arange(5).unsqueeze(1), torch.rand(5, 7).argsort(1)[:, :2]] = 1.0
        weights[cell], masks[cell] = w, mask
        spread_weights[cell] = torch.zeros(5, 8).index_copy(1, torch.tensor(columns), w * mask)
        spread_masks[cell] = torch.zeros(5, 8).index_copy(1, torch.tensor(columns), mask)
    torch.manual_seed(0)
    ours = SearchNetwork(C=4, num_classes=10, layers=3, in_channels=3, steps=2, multiplier=2,
                         method=_GivenWeights(seven, {c: w * masks[c] for c, w in weights.items()}, masks))  # fmt: skip
    torch.manual_seed(0)
    theirs = SearchNetwork(C=4, num_classes=10, layers=3, in_channels=3, steps=2, multiplier=2,
                           method=_GivenWeights(PRIMITIVES, spread_weights, spread_masks))  # fmt: skip
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if "alpha" not in k}, strict=False)
    x = torch.randn(2, 3, 8, 8)
    out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_theirs)
    grad = torch.randn_like(out_ours)
    g_ours = torch.autograd.grad(out_ours, list(weights.values()), grad, retain_graph=True)
    g_theirs = torch.autograd.grad(out_theirs, list(weights.values()), grad)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format], ids=["channels-last", "contiguous"])
def test_a_cell_s_concatenation_hands_each_state_a_gradient_in_its_own_layout(layout):
    """The cell's output is torch.cat of its nodes; each node's gradient comes back dense in the node's layout (not
    as a channel slice of the output's), with torch.cat's values."""
    torch.manual_seed(0)
    states = [torch.randn(2, c, 5, 3, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
              for c in (3, 1, 4)]  # fmt: skip
    out = _ConcatChannels.apply(*states)
    torch.testing.assert_close(out, torch.cat(states, dim=1), rtol=0, atol=0)
    grad = torch.randn(out.shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    got = torch.autograd.grad(out, states, grad)
    want = torch.autograd.grad(torch.cat(states, dim=1), states, grad)
    for g, w, state in zip(got, want, states):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
        assert g.stride() == state.stride()
    assert torch.autograd.gradcheck(lambda *s: _ConcatChannels.apply(*s), states)
