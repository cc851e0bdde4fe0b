import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fastdarts import SearchNetwork, ops
from fastdarts.bilevel import Architect, NonFiniteWeights, sgd_step, weights_finite

from .conftest import requires_ext


def tiny_setup(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    net = SearchNetwork(C=2, num_classes=3, layers=3, in_channels=1, steps=2, multiplier=2).to(dtype)
    opt = torch.optim.SGD(net.weight_parameters(), lr=0.1, momentum=0.9, weight_decay=3e-4)

    def batch():
        return torch.randn(4, 1, 5, 5, dtype=dtype), torch.randint(0, 3, (4,))

    return net, opt, batch(), batch()


def weight_step(net, opt, batch):
    opt.zero_grad()
    F.cross_entropy(net(batch[0]), batch[1]).backward(inputs=net.weight_parameters())
    opt.step()


def test_first_order_is_the_plain_validation_gradient_and_touches_no_weight_grad():
    net, opt, train, val = tiny_setup()
    architect = Architect(net, opt, unrolled=False)
    grads, _ = architect.first_order_grads(val)
    expected = torch.autograd.grad(F.cross_entropy(net(val[0]), val[1]), net.arch_parameters())
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    before = [a.detach().clone() for a in net.arch_parameters()]
    architect.step(train, val, lr=0.1)
    assert all(p.grad is None for p in net.weight_parameters())
    assert all(not torch.equal(a, b) for a, b in zip(net.arch_parameters(), before))


def exact_hypergradient(net, opt, train, val, lr):
    """d/d alpha of L_val(w - lr (mu buf + grad_w L_train + wd w), alpha), by double backward."""
    names, weights = zip(*net.named_weight_parameters())
    group = opt.param_groups[0]
    loss = F.cross_entropy(net(train[0]), train[1])
    g = torch.autograd.grad(loss, weights, create_graph=True)
    virtual = {
        n: w - lr * (group["momentum"] * opt.state[w]["momentum_buffer"] + gi + group["weight_decay"] * w)
        for n, w, gi in zip(names, weights, g)
    }
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    val_loss = F.cross_entropy(functional_call(net, {**virtual, **buffers}, (val[0],)), val[1])
    return torch.autograd.grad(val_loss, net.arch_parameters())


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
def test_second_order_matches_the_exact_hypergradient(backend):
    net, opt, train, val = tiny_setup(torch.float64)
    weight_step(net, opt, train)  # a non-zero momentum buffer enters the virtual step
    lr = 0.1
    with ops.use_backend("reference"):
        exact = exact_hypergradient(net, opt, train, val, lr)
    first_order = torch.autograd.grad(F.cross_entropy(net(val[0]), val[1]), net.arch_parameters())
    weights_before = [w.detach().clone() for w in net.weight_parameters()]
    # DARTS's r = 0.01 moves the weights across ReLU and max-pool kinks, where the gradient jumps,
    # so the finite difference is checked against the exact value with a step far below them.
    with ops.use_backend(backend):
        approx, _ = Architect(net, opt, unrolled=True, hessian_r=1e-6).second_order_grads(train, val, lr)
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    rel = (flat(approx) - flat(exact)).norm() / flat(exact).norm()
    assert rel < 1e-3, rel
    # The implicit term matters here, so agreeing with the exact value is not an accident.
    assert (flat(first_order) - flat(exact)).norm() / flat(exact).norm() > 1e-2
    assert all(torch.equal(w, b) for w, b in zip(net.weight_parameters(), weights_before))


def test_architect_refuses_a_weight_optimizer_of_the_architecture():
    net = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="the weight optimizer updates architecture parameters"):
        Architect(net, optimizer)


@pytest.mark.parametrize(
    "bad, finite",
    [(None, True), (3e30, True), (float("nan"), False), (float("inf"), False), (-float("inf"), False)],
    ids=["plain", "squares-overflow", "nan", "inf", "minus-inf"],
)
def test_weights_finite_tells_a_non_finite_weight_from_a_huge_one(bad, finite):
    """The 2-norm it tries first overflows at 3e30 although every weight is finite: the max-norm then decides."""
    weights = [torch.randn(5, 3), torch.randn(7), torch.randn(2, 2, 1, 1)]
    if bad is not None:
        weights[1][4] = bad
    assert weights_finite(weights) is finite


def test_a_weight_step_that_makes_a_weight_infinite_raises_before_the_next_step():
    """The check after the update reads the weights that have a gradient, the ones SGD moves; a weight without one
    (an op no edge computed) is left as it was."""
    layer, unused = torch.nn.Linear(3, 2), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([*layer.parameters(), unused], lr=1e38)
    x, y = torch.full((4, 3), 1e3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(NonFiniteWeights, match="^a weight became non-finite in the update$"):
        sgd_step(opt, [*layer.parameters(), unused], F.cross_entropy(layer(x), y), grad_clip=None)
    assert not torch.isfinite(layer.weight).all() and unused.grad is None and torch.equal(unused, torch.ones(2))


@pytest.mark.parametrize("grad_clip", [None, 1e-3, 1e3], ids=["no-clip", "clipped", "within-bound"])
def test_the_weight_step_clips_as_clip_grad_norm_does(grad_clip):
    """sgd_step's weights after the step are those of torch's clip_grad_norm_ and the same SGD step, bit for bit, when
    the norm is scaled down and when it is within the bound (where sgd_step skips the scaling by 1)."""
    results = []
    for clip in ("sgd_step", "torch"):
        torch.manual_seed(0)
        layer, unused = torch.nn.Linear(3, 2), torch.nn.Parameter(torch.ones(2))
        params = [*layer.parameters(), unused]
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=3e-4, foreach=True)
        x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
        loss = F.cross_entropy(layer(x), y)
        if clip == "sgd_step":
            sgd_step(opt, params, loss, grad_clip)
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else float("inf"), foreach=True)
            opt.step()
        results.append([p.detach().clone() for p in params] + [p.grad.clone() for p in layer.parameters()])
    for got, want in zip(*results):
        assert torch.equal(got, want)
    if grad_clip == 1e-3:  # the gradient was scaled down to that norm
        norm = torch.nn.utils.get_total_norm(results[0][3:])
        torch.testing.assert_close(norm, torch.tensor(1e-3), rtol=1e-4, atol=0)
