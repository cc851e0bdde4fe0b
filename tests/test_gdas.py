"""GDAS (METHODS_MORE.md section 2) against a direct transcription of its formulas."""

import io

import pytest
import torch
import torch.nn.functional as F

from fastdarts import SearchNetwork, ops
from fastdarts.bilevel import weight_step
from fastdarts.config import TrainConfig
from fastdarts.errors import ConfigError
from fastdarts.evalnet import GDASReductionCell, NetworkCIFAR
from fastdarts.methods import GDASMethod, make_method
from fastdarts.space import edge_index
from fastdarts.supernet import OpColumns, SearchCell, selected_columns

from .conftest import requires_ext
from .method_checks import (
    assert_search_refuses,
    assert_search_resumes_bit_for_bit,
    candidate,
    hand_cell,
    published_settings,
)

F64 = torch.float64
GDAS_ORDER = ["none", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5",
              "avg_pool_3x3", "max_pool_3x3"]  # fmt: skip


def transcribed_sample(alpha, seed, tau):
    """The published sampling (columns in GDAS's op order): Exp(1) draws, g = -log E, p = softmax((log_softmax(alpha)
    + g) / tau), h = onehot(argmax p) - p.detach() + p; returned with the argmax."""
    generator = torch.Generator().manual_seed(seed)
    exponential = torch.empty(alpha.shape, dtype=alpha.dtype).exponential_(generator=generator)
    gumbel = -exponential.log()
    p = F.softmax((F.log_softmax(alpha, dim=1) + gumbel) / tau, dim=1)
    index = p.max(-1, keepdim=True)[1]
    one_h = torch.zeros_like(p).scatter_(-1, index, 1.0)
    return one_h - p.detach() + p, index.squeeze(1)


def test_sample_and_its_gradient_equal_the_transcription():
    alpha = torch.randn(14, 8, dtype=F64, requires_grad=True)
    method = GDASMethod(seed=5)
    method.set_epoch(3, 10)  # tau = 10 - 9.9 * 3 / 9
    assert method.tau == pytest.approx(6.7)
    got = method.forward_weights({"normal": alpha})["normal"]
    want, index = transcribed_sample(alpha, 5, 10 - 9.9 * 3 / 9)
    torch.testing.assert_close(got.weights, want, rtol=0, atol=1e-15)
    assert torch.equal(got.mask, F.one_hot(index, 8).to(F64))
    upstream = torch.randn(14, 8, dtype=F64)
    (got_grad,) = torch.autograd.grad((got.weights * upstream).sum(), alpha)
    (want_grad,) = torch.autograd.grad((want * upstream).sum(), alpha)
    torch.testing.assert_close(got_grad, want_grad)


def edge_of_one_op(sample):
    """The published edge: `op_idx(x) * h[idx]`, only the sampled op computed (`none`: zeros)."""
    h, index = sample

    def edge_output(edge, row, x):
        name = GDAS_ORDER[index[row]]
        if name == "none":
            return edge.zeros(x)
        return candidate(edge, name, x) * h[row, index[row]]

    return edge_output


@pytest.mark.parametrize("reduction", [False, True], ids=["normal", "reduce"])
def test_cell_output_and_architecture_gradient_equal_the_transcription(reduction):
    cell = SearchCell(4, 4, 6, 6, 4, reduction, False).to(F64)
    s0, s1 = (torch.randn(2, 6, 7, 7, dtype=F64) for _ in range(2))
    alpha = torch.randn(14, 8, dtype=F64, requires_grad=True)
    with torch.no_grad():
        alpha[3, GDAS_ORDER.index("none")] = 10.0  # edge 3 samples `none`: it adds zeros
    method = GDASMethod(seed=1)
    weights = method.forward_weights({"normal": alpha})["normal"]
    assert weights.mask[3, GDAS_ORDER.index("none")] == 1
    weights = OpColumns(GDAS_ORDER)(weights)  # as the supernet maps the method's columns onto its mixed ops
    fused = cell(s0, s1, weights.weights, selected_columns(weights.mask))
    hand = hand_cell(cell, s0, s1, edge_of_one_op(transcribed_sample(alpha, 1, method.tau)))
    torch.testing.assert_close(fused, hand)
    upstream = torch.randn_like(hand)
    # The architecture gradient, and the weights' (what a weight step trains: the sampled ops' alone).
    params = [alpha, *cell.parameters()]
    fused_grads = torch.autograd.grad((fused * upstream).sum(), params, materialize_grads=True)
    hand_grads = torch.autograd.grad((hand * upstream).sum(), params, materialize_grads=True)
    for fused_grad, hand_grad in zip(fused_grads, hand_grads):
        torch.testing.assert_close(fused_grad, hand_grad)
    assert fused_grads[0].abs().sum() > 0 and sum(bool(g.abs().sum() > 0) for g in fused_grads[1:]) > 10


def transcribed_genotype(alpha, steps=4):
    """For each node, every (op != none, input) pair weighted by softmax(alpha), sorted descending, the top 2."""
    weights = alpha.softmax(-1)
    gene = []
    for i in range(steps):
        pairs = [(weights[edge_index(i, j), GDAS_ORDER.index(op)].item(), op, j)
                 for j in range(2 + i) for op in GDAS_ORDER if op != "none"]  # fmt: skip
        gene += [(op, j) for _, op, j in sorted(pairs, key=lambda pair: -pair[0])[:2]]
    return tuple(gene)


def test_genotype_rule_equals_the_transcription():
    net = SearchNetwork(C=4, num_classes=10, layers=3, in_channels=1, method=GDASMethod())
    assert GDASMethod.primitives == tuple(GDAS_ORDER)
    with torch.no_grad():
        for alpha in net.arch_parameters():
            alpha.normal_(std=0.3)
        net.alpha_normal[edge_index(2, 3)] = torch.linspace(0, 8, 8)  # node 2's two best pairs read input 3
    genotype = net.genotype()
    assert genotype.normal == transcribed_genotype(net.alpha_normal)
    assert genotype.reduce == transcribed_genotype(net.alpha_reduce)
    assert genotype.normal[4:6] == (("max_pool_3x3", 3), ("avg_pool_3x3", 3))


def test_temperature_schedule_state_and_settings():
    method = GDASMethod()
    taus = []
    for epoch in range(5):
        method.set_epoch(epoch, 5)
        taus.append(method.tau)
    assert taus == pytest.approx([10 - 9.9 * e / 4 for e in range(5)], abs=1e-12) and taus[-1] == pytest.approx(0.1)
    assert method.epoch_settings() == {"tau": method.tau}
    alpha = {"normal": torch.randn(14, 8), "reduce": torch.randn(14, 8)}
    method.forward_weights(alpha)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    expected = method.forward_weights(alpha)
    restored = GDASMethod(seed=9)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer))
    got = restored.forward_weights(alpha)
    assert restored.tau == method.tau
    for cell in alpha:
        assert torch.equal(got[cell].weights, expected[cell].weights)
    assert GDASMethod.weight_step_first and GDASMethod.samples_each_forward
    with pytest.raises(ValueError, match=r"gdas state must have the keys \['generator', 'tau'\]"):
        restored.load_state_dict({"tau": 1.0})
    with pytest.raises(ValueError, match="gdas: the generator state does not fit"):
        restored.load_state_dict({"tau": 1.0, "generator": torch.zeros(3, dtype=torch.uint8)})
    for settings, message in ((dict(tau_max=0.0), "tau_max must be a finite number > 0"),
                              (dict(tau_min=20.0), r"tau_min \(20.0\) must not exceed tau_max \(10.0\)"),
                              (dict(seed=0.5), "seed must be an integer")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            make_method("gdas", **settings)


@pytest.mark.slow
def test_gdas_search_resumes_bit_for_bit_and_writes_a_trainable_genotype(tmp_path, monkeypatch):
    whole = assert_search_resumes_bit_for_bit(tmp_path, monkeypatch, method="gdas")
    assert [row["tau"] for row in whole.history] == [10.0, pytest.approx(0.1)]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "darts", "--gdas_tau_max", "3"], "gdas_tau_max is an option of --method gdas, not of darts"),
        (["--method", "gdas", "--gdas_tau_min", "11"], r"tau_min \(11.0\) must not exceed tau_max \(10.0\)"),
        (["--method", "gdas", "--unrolled"], "gdas samples new edge weights in every forward pass"),
        (["--method", "darts", "--gdas_fixed_reduction"], "gdas_fixed_reduction is an option of --method gdas"),
        (["--method", "gdas", "--gdas_fixed_reduction", "--init_channels", "6"], r"init_channels \(6\) must be a mul"),
    ],
)
def test_bad_gdas_options_give_one_line_and_status_2(args, message, capsys):
    assert_search_refuses(args, message, capsys)


def test_gdas_starts_from_its_published_cifar10_settings():
    assert published_settings("gdas") == dict(
        batch_size=256,
        epochs=250,
        init_channels=16,
        layers=8,
        learning_rate=0.025,
        arch_learning_rate=3e-4,
        arch_beta1=0.5,
    )


def test_an_architecture_step_whose_sample_leaves_the_reduction_cells_unused_gives_them_a_zero_gradient():
    """Normal cells whose sampled ops all read s0 ignore the reduction cell before them: no path from alpha_reduce
    to the loss. The step must go on (as the published code's backward does), alpha_reduce's gradient zero."""
    from fastdarts.bilevel import Architect
    from fastdarts.methods.base import CellWeights

    torch.manual_seed(0)
    method = make_method("gdas", seed=0)
    model = SearchNetwork(4, 10, 5, 1, method=method)
    sep3 = method.primitives.index("sep_conv_3x3")
    # Every node's edges from s1 and from the other nodes are `none`; the edges from s0 compute sep_conv_3x3.
    from_s0 = [sep3 if state == 0 else 0 for node in range(4) for state in range(2 + node)]
    sampled = {"normal": from_s0, "reduce": [sep3] * 14}

    def forward_weights(arch):
        out = {}
        for cell, alpha in arch.items():
            p = alpha.softmax(-1)
            onehot = F.one_hot(torch.tensor(sampled[cell]), len(method.primitives)).to(p)
            out[cell] = CellWeights(onehot - p.detach() + p, onehot)
        return out

    method.forward_weights = forward_weights
    weights = torch.optim.SGD(model.weight_parameters(), 0.01)
    architect = Architect(model, weights, arch_learning_rate=3e-4, arch_weight_decay=0.0)
    batch = (torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    grads, _ = architect.first_order_grads(batch)
    assert grads[0].abs().sum() > 0 and torch.equal(grads[1], torch.zeros_like(grads[1]))
    before = model.alpha_reduce.detach().clone()
    architect.step(batch, batch, 0.01)
    assert torch.equal(model.alpha_reduce.detach(), before)  # Adam on a zero gradient, no weight decay: no move


def transcribed_reduction_cell(cell, s0, s1):
    """The published GDAS_Reduction_Cell's forward in training mode, written with functional ops on `cell`'s own
    weights: two [ReLU, 1x3 conv stride (1, 2) pad (0, 1), 3x1 conv stride (2, 1) pad (1, 0), both in 8 groups, BN,
    ReLU, 1x1 conv, BN] of s0 and s1, two [3x3 stride-2 max pool, BN] of s0 and s1, concatenated."""

    def bn(x, module):
        return F.batch_norm(x, None, None, module.weight, module.bias, training=True)

    def convs(branch, x):
        _, conv13, conv31, bn1, _, conv11, bn2 = branch
        x = F.conv2d(F.relu(x), conv13.weight, stride=(1, 2), padding=(0, 1), groups=8)
        x = bn(F.conv2d(x, conv31.weight, stride=(2, 1), padding=(1, 0), groups=8), bn1)
        return bn(F.conv2d(F.relu(x), conv11.weight), bn2)

    def pool(branch, x):
        return bn(F.max_pool2d(x, 3, stride=2, padding=1), branch[1])

    s0, s1 = cell.preprocess0(s0), cell.preprocess1(s1)
    return torch.cat([convs(cell.convs[0], s0), convs(cell.convs[1], s1), pool(cell.pools[0], s0),
                      pool(cell.pools[1], s1)], dim=1)  # fmt: skip


@pytest.mark.parametrize("affine", [True, False], ids=["evaluation", "search"])
def test_the_fixed_reduction_cell_equals_the_transcription(affine):
    torch.manual_seed(0)
    cell = GDASReductionCell(12, 20, 16, reduction_prev=False, affine=affine).double()
    if affine:
        for m in cell.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                torch.nn.init.normal_(m.weight)
                torch.nn.init.normal_(m.bias)
    s0, s1 = torch.randn(3, 12, 7, 6, dtype=F64), torch.randn(3, 20, 7, 6, dtype=F64)  # odd sides
    out = cell(s0, s1)
    assert out.shape == (3, 64, 4, 3)
    torch.testing.assert_close(out, transcribed_reduction_cell(cell, s0, s1))
    assert all(m.affine == affine for m in cell.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with pytest.raises(ValueError, match="must be a multiple of 8"):
        GDASReductionCell(12, 12, 12, reduction_prev=False)


def test_the_fixed_reduction_variant_searches_the_normal_cell_alone_and_trains_its_genotype():
    torch.manual_seed(0)
    method = make_method("gdas", seed=0, fixed_reduction=True)
    net = SearchNetwork(C=4, num_classes=10, layers=5, in_channels=1, method=method)
    kinds = [type(cell).__name__ for cell in net.cells]
    assert kinds == ["SearchCell", "GDASReductionCell", "SearchCell", "GDASReductionCell", "SearchCell"]
    assert net.alpha_reduce is None and net.arch_parameters() == [net.alpha_normal]
    assert set(net.arch_parameters_by_cell()) == {"normal"} and net.edge_weights()[1] is None
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    reduction_weights = list(net.cells[1].parameters())
    grads = torch.autograd.grad(F.cross_entropy(net(x), y), [net.alpha_normal, *reduction_weights])
    assert all(g.abs().sum() > 0 for g in grads)
    genotype = net.genotype()
    assert genotype.reduce == "gdas_reduction" and genotype.reduce_concat == ()
    assert genotype.normal == transcribed_genotype(net.alpha_normal)
    evaluation = NetworkCIFAR(genotype, C=4, num_classes=10, layers=5, in_channels=1)
    assert [type(cell).__name__ for cell in evaluation.cells][1::2] == ["GDASReductionCell"] * 2
    assert evaluation(x)[0].shape == (6, 10)
    assert TrainConfig(genotype=str(genotype), init_channels=4).resolved().cell() == genotype
    with pytest.raises(ConfigError, match=r"init_channels \(6\) must be a multiple of 4"):
        TrainConfig(genotype=str(genotype), init_channels=6).resolved()


@pytest.mark.slow
def test_a_fixed_reduction_search_resumes_bit_for_bit_and_writes_a_trainable_genotype(tmp_path, monkeypatch):
    whole = assert_search_resumes_bit_for_bit(tmp_path, monkeypatch, method="gdas", gdas_fixed_reduction=True,
                                              init_channels=4)  # fmt: skip
    assert whole.genotype.fixed_reduction == "gdas_reduction"
    assert "weights_reduce" not in whole.history[-1] and "entropy_reduce" not in whole.history[-1]


@requires_ext
def test_weight_steps_leave_the_unsampled_ops_alone_on_every_backend():
    """SGD with momentum and weight decay moves only the convs a step computed: the fused backend gives the others
    no gradient, as the reference does, so three steps end at the same weights on both."""
    batches = [(torch.randn(4, 1, 8, 8, dtype=F64), torch.randint(0, 10, (4,))) for _ in range(3)]
    initial = SearchNetwork(4, 10, 3, 1, method=make_method("gdas", seed=0)).to(F64).state_dict()
    ends = {}
    for backend in ("reference", "cpp"):
        model = SearchNetwork(4, 10, 3, 1, method=make_method("gdas", seed=0)).to(F64)
        model.load_state_dict(initial)
        optimizer = torch.optim.SGD(model.weight_parameters(), 0.1, momentum=0.9, weight_decay=3e-4)
        with ops.use_backend(backend):
            for batch in batches:
                weight_step(model, optimizer, batch, grad_clip=5.0)
        ends[backend] = model.state_dict()
    unmoved = [name for name, t in ends["cpp"].items() if name.endswith("weight") and torch.equal(t, initial[name])]
    assert any(".edges." in name for name in unmoved)  # GDAS samples one op per edge: most convs never run
    for name, want in ends["reference"].items():
        torch.testing.assert_close(ends["cpp"][name], want, msg=name)
