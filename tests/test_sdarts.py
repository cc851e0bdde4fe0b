"""SDARTS (RS and ADV) against a direct transcription of METHODS_MORE.md section 6."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fastdarts.bilevel import weight_step
from fastdarts.methods import CellWeights, DARTSMethod, SDARTSMethod

from .method_checks import architect_grads, cross_entropy_grads, darts_rule, tiny_batch, tiny_network


class GivenWeights(DARTSMethod):
    """Edge weights given from outside: the network of a transcription."""

    name = "given-weights"

    def __init__(self, weights):
        self.weights = weights

    def forward_weights(self, arch):
        return {cell: CellWeights(self.weights[cell]) for cell in arch}


def clip(ab):
    """The published projection, row by row: remember the argmax, clamp to [0, 1], an all-zero row gets 1 at the
    argmax, divide by the row sum."""
    rows = []
    for row in ab:
        top = int(row.argmax())
        row = row.clamp(0, 1)
        if row.sum() == 0:
            row = torch.zeros_like(row)
            row[top] = 1.0
        rows.append(row / row.sum())
    return torch.stack(rows)


def random_start(clean, eps, seed):
    generator = torch.Generator().manual_seed(seed)
    noise = {cell: torch.empty_like(w).uniform_(-eps, eps, generator=generator) for cell, w in clean.items()}
    return {cell: clip(clean[cell] + noise[cell]) for cell in clean}


def pgd(net, clean, start, batch, eps, steps):
    """Linf_PGD_alpha on a copy of the network that takes its edge weights from outside, in evaluation mode."""
    twin = copy.deepcopy(net)
    twin.method = GivenWeights(clean)
    twin.eval()
    x, y = batch
    with torch.no_grad():
        before = F.cross_entropy(twin(x), y)
    ab = start
    for _ in range(steps):
        ab = {cell: w.clone().requires_grad_() for cell, w in ab.items()}
        twin.method.weights = ab
        grads = torch.autograd.grad(F.cross_entropy(twin(x), y), list(ab.values()))
        with torch.no_grad():
            stepped = {cell: w + 2 * eps / steps * g.sign() for (cell, w), g in zip(ab.items(), grads)}
            ab = {cell: clip(clean[cell] + (w - clean[cell]).clamp(-eps, eps)) for cell, w in stepped.items()}
    twin.method.weights = ab
    with torch.no_grad():
        after = F.cross_entropy(twin(x), y)
    return clean if before > after else ab


def test_projection_matches_the_published_clip():
    ab = torch.tensor([[0.5, -0.2, 0.9, 0.1], [-0.1, -0.3, -0.05, -0.2], [1.4, 0.2, 0.0, 0.0]])
    from fastdarts.methods.sdarts import project

    torch.testing.assert_close(project(ab), clip(ab))
    assert project(ab)[1].tolist() == [0.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("variant", ["rs", "adv"])
def test_the_weight_step_trains_on_the_perturbed_weights(variant):
    method = SDARTSMethod(variant=variant, seed=3)
    net = tiny_network(method)
    with torch.no_grad():
        for alpha in net.arch_parameters():
            alpha.normal_()
    method.set_epoch(20, 50)  # eps = 0.03 + 0.27 * 20 / 50
    assert method.epsilon == pytest.approx(0.138) and method.epoch_settings() == {"epsilon": method.epsilon}
    batch = tiny_batch()
    clean = {cell: alpha.detach().softmax(-1) for cell, alpha in net.arch_parameters_by_cell().items()}
    expected = random_start(clean, method.epsilon, seed=3)
    if variant == "adv":
        expected = pgd(net, clean, expected, batch, method.epsilon, steps=7)
        assert not all(torch.equal(expected[c], clean[c]) for c in clean), "the attack should move the weights"
    twin = copy.deepcopy(net)
    twin.method = GivenWeights(expected)

    losses, grads = [], []
    for model in (net, twin):
        optimizer = torch.optim.SGD(model.weight_parameters(), lr=0.0)
        loss, _ = weight_step(model, optimizer, batch, grad_clip=None)
        losses.append(loss)
        grads.append([p.grad for p in model.weight_parameters()])
    torch.testing.assert_close(losses[0], losses[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert net.training and method.forward_weights(net.arch_parameters_by_cell())["normal"].weights.requires_grad
    # The architecture step is DARTS's: softmax weights, no regulariser, the DARTS rule.
    arch_grads, _ = architect_grads(net, batch)
    ce_grads, _ = cross_entropy_grads(net, batch)
    for cell, alpha in net.arch_parameters_by_cell().items():
        torch.testing.assert_close(arch_grads[cell], ce_grads[cell])
        assert method.derive_cell(alpha, 4) == darts_rule(alpha.softmax(-1), 4, method.primitives)


def test_state_and_bad_settings():
    method = SDARTSMethod(seed=1)
    method.set_epoch(3, 10)
    torch.rand(3, generator=method.generator)
    other = SDARTSMethod(seed=2)
    other.load_state_dict(method.state_dict())
    assert other.epsilon == method.epsilon
    assert torch.equal(torch.rand(5, generator=other.generator), torch.rand(5, generator=method.generator))
    with pytest.raises(ValueError, match="SDARTSMethod: variant must be one of rs, adv, got 'pgd'"):
        SDARTSMethod(variant="pgd")
    with pytest.raises(ValueError, match="pgd_steps must be an integer >= 1"):
        SDARTSMethod(pgd_steps=0)
    with pytest.raises(ValueError, match="generator state"):
        other.load_state_dict({"epsilon": 0.1, "generator": [1, 2]})
