"""What the faithfulness tests of the methods share: a tiny supernet and batch, the architecture gradient the
Architect computes, and a direct transcription of DARTS's genotype rule (METHODS_MORE.md, "DARTS rule")."""

import torch
import torch.nn.functional as F

from fastdarts import SearchNetwork
from fastdarts.bilevel import Architect


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
